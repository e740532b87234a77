"""Owns the sim model's offline tokenizer: a byte-level BPE trained deterministically at import.

No downloads, no data files: a regex pre-tokenizer (GPT-2 style) splits text into pieces, and a
merges table learned from the embedded corpus below turns each piece's UTF-8 bytes into tokens.
Like tiktoken, encoded pieces are cached (a bounded dict), so repeated words cost a dict lookup.
The work is real CPU work proportional to the text, which is what the model link's connection
cache saves; the exact vocabulary does not matter. That is also why nothing coarser than a piece
is cached: a cache of lines would make text sent again (HTTP's full context) nearly free.

Token ids: 0-255 are raw bytes, 256.. are merges, then the special tokens in SPECIAL_TOKENS.
"""

from __future__ import annotations

import functools
import re
from collections import defaultdict
from typing import Final

# GPT-2's pre-tokenizer, with stdlib `re` classes standing in for \p{L} / \p{N}. The definition:
# Tokenizer.split must give exactly these pieces for every text (the tests compare the two).
_PIECE_RE: Final = re.compile(
    r"""'(?:[sdmt]|ll|ve|re)| ?[^\W\d_]+| ?\d{1,3}| ?(?:[^\s\w]|_)+|\s+(?!\S)|\s+|[\s\S]""",
    re.UNICODE,
)


@functools.cache
def _fast_piece_re() -> re.Pattern[str]:
    r"""_PIECE_RE's exact equivalent on text with no character above U+FFFF, ~40% less CPU.

    Every character is in exactly one of _PIECE_RE's classes: whitespace S = \s, letter
    L = [^\W\d_], digit D = \d, other P = [^\s\w]|_ (so its last branch is never reached).
    Its branches compete only at a "'" (a contraction before a P run) and at a " " (before
    L, D or P the space joins that run, else it is whitespace): this keeps those two orders,
    puts the common branches first and starts each with a set, which re checks before trying
    the branch. When `\s+(?!\S)` fails the run is one character long, so `\s` does; a lone
    newline before a non-space (line-oriented tool output) is tried first of all. A run always
    ends its branch, so it never has to give characters back: possessive `++` is exact.
    L, D and S are spelled out as sets of code points taken from those very classes (so they
    follow this Python's Unicode database): one table lookup instead of \w's four. Only the
    Basic Multilingual Plane is spelled out (above it re keeps a list of ranges, scanned on
    every miss): an astral character would land in P here, so such text takes _PIECE_RE.
    Built on first use, in ~20 ms.
    """
    bmp = "".join(map(chr, range(0x10000)))

    def members(cls: str) -> str:  # runs of consecutive code points in cls, as set ranges
        return "".join(rf"\u{ord(m[0][0]):04x}-\u{ord(m[0][-1]):04x}"
                       for m in re.finditer(f"{cls}+", bmp))

    let, dig, spc = members(r"[^\W\d_]"), members(r"\d"), members(r"\s")
    other = f"[^{spc}{let}{dig}]++"
    return re.compile(
        rf"\n(?!\s)| (?:[{let}]++|[{dig}]{{1,3}}+|{other})|[{let}]++|[{dig}]{{1,3}}+"
        rf"|'(?:[sdmt]|ll|ve|re)|{other}|\s+(?!\S)|\s"
    )


# Training text: English prose and Python, the two things an agent's context is made of.
_CORPUS: Final = r'''
The agent reads the task, plans the steps, and calls a tool. The tool runs in the workspace and
returns its output. The model reads the result and decides what to do next: edit a file, run the
tests again, search the code, or answer the user. Every turn adds new items to the context, and
the server keeps the rendered tokens of the conversation so that only the new items are processed.
When the tests pass, the agent writes a short summary of what changed and why, and the task is done.
If a command fails, read the error message, find the file and the line, and fix the cause instead
of the symptom. Prefer small changes that are easy to review. Write a test that fails first, then
make it pass. Keep the functions short and the names clear. The user asked for a function that
returns the sum of the numbers in a list, and for a second function that counts the words in a file.
The following is the content of the file you asked for, with line numbers. Please review it and
tell me whether the change is correct, and what you would do differently in this situation.

def fizz_buzz(n: int) -> list[str]:
    """Return the fizz buzz sequence from 1 to n."""
    result = []
    for i in range(1, n + 1):
        if i % 15 == 0:
            result.append("FizzBuzz")
        elif i % 3 == 0:
            result.append("Fizz")
        elif i % 5 == 0:
            result.append("Buzz")
        else:
            result.append(str(i))
    return result


class Config:
    def __init__(self, path: str, *, timeout: float = 10.0) -> None:
        self.path = path
        self.timeout = timeout
        self.values: dict[str, str] = {}

    def load(self) -> None:
        with open(self.path, encoding="utf-8") as f:
            for line in f:
                line = line.strip()
                if not line or line.startswith("#"):
                    continue
                key, _, value = line.partition("=")
                self.values[key.strip()] = value.strip()

    def get(self, key: str, default: str | None = None) -> str | None:
        return self.values.get(key, default)


async def fetch_all(urls: list[str]) -> dict[str, int]:
    results: dict[str, int] = {}
    async with trio.open_nursery() as nursery:
        for url in urls:
            nursery.start_soon(fetch_one, url, results)
    return results


import json
import os
import sys

def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.verbose:
        print("reading", args.input, file=sys.stderr)
    data = json.loads(open(args.input).read())
    total = sum(item["value"] for item in data["items"] if item.get("enabled", True))
    print(json.dumps({"total": total, "count": len(data["items"])}, indent=2))
    return 0

if __name__ == "__main__":
    raise SystemExit(main())

{"type": "function_call", "name": "run_shell", "arguments": "{\"command\": \"pytest -q tests\"}"}
{"type": "function_call_output", "call_id": "call_1", "output": "3 passed, 1 failed in 0.42s"}
$ git diff --stat
 src/app/config.py   | 12 +++++++-----
 tests/test_config.py | 30 ++++++++++++++++++++++++++++++
 2 files changed, 37 insertions(+), 5 deletions(-)
Traceback (most recent call last):
  File "/work/src/app/main.py", line 42, in main
    value = config.get("timeout")
KeyError: 'timeout'
'''

N_MERGES: Final = 512
SPECIAL_TOKENS: Final = (
    "<|im_start|>",
    "<|im_end|>",
    "<|system|>",
    "<|developer|>",
    "<|user|>",
    "<|assistant|>",
    "<|tool_call|>",
    "<|tool_result|>",
)
_PIECE_CACHE_MAX: Final = 65_536


def _train(corpus: str, n_merges: int) -> list[tuple[int, int]]:
    """Learn `n_merges` merges from the corpus: always the most frequent pair, ties by lowest ids.

    Deterministic: word counts come from the corpus alone and ties break on the pair itself.
    """
    counts: dict[bytes, int] = defaultdict(int)
    for piece in _PIECE_RE.findall(corpus):
        counts[piece.encode("utf-8")] += 1
    words: list[list[int]] = [list(w) for w in counts]
    freqs: list[int] = list(counts.values())
    pair_counts: dict[tuple[int, int], int] = defaultdict(int)
    where: dict[tuple[int, int], set[int]] = defaultdict(set)
    for wi, w in enumerate(words):
        for a, b in zip(w, w[1:], strict=False):
            pair_counts[(a, b)] += freqs[wi]
            where[(a, b)].add(wi)
    merges: list[tuple[int, int]] = []
    for new_id in range(256, 256 + n_merges):
        if not pair_counts:
            break
        best = max(pair_counts.items(), key=lambda kv: (kv[1], -kv[0][0], -kv[0][1]))[0]
        if pair_counts[best] < 2:
            break
        merges.append(best)
        for wi in sorted(where.pop(best, ())):
            w, f = words[wi], freqs[wi]
            for a, b in zip(w, w[1:], strict=False):
                pair_counts[(a, b)] -= f
                if pair_counts[(a, b)] <= 0:
                    del pair_counts[(a, b)]
            out: list[int] = []
            i = 0
            while i < len(w):
                if i + 1 < len(w) and w[i] == best[0] and w[i + 1] == best[1]:
                    out.append(new_id)
                    i += 2
                else:
                    out.append(w[i])
                    i += 1
            words[wi] = out
            for a, b in zip(out, out[1:], strict=False):
                pair_counts[(a, b)] += f
                where[(a, b)].add(wi)
        pair_counts.pop(best, None)
    return merges


class Tokenizer:
    """Byte-level BPE. `encode(text) -> list[int]`, `decode(ids) -> str`, exact round trip."""

    def __init__(self, merges: list[tuple[int, int]]) -> None:
        self._ranks: dict[tuple[int, int], int] = {p: i for i, p in enumerate(merges)}
        self._vocab: list[bytes] = [bytes([i]) for i in range(256)]
        for a, b in merges:
            self._vocab.append(self._vocab[a] + self._vocab[b])
        self.special: dict[str, int] = {}
        for name in SPECIAL_TOKENS:
            self.special[name] = len(self._vocab)
            self._vocab.append(name.encode())
        self._cache: dict[str, tuple[int, ...]] = {}
        self._split_bmp = _fast_piece_re().findall

    @property
    def vocab_size(self) -> int:
        return len(self._vocab)

    def _bpe(self, piece: bytes) -> tuple[int, ...]:
        ids = list(piece)
        ranks = self._ranks
        while len(ids) > 1:
            best_rank = -1
            best_at = -1
            for i in range(len(ids) - 1):
                r = ranks.get((ids[i], ids[i + 1]))
                if r is not None and (best_rank < 0 or r < best_rank):
                    best_rank, best_at = r, i
            if best_at < 0:
                break
            ids[best_at : best_at + 2] = [256 + best_rank]
        return tuple(ids)

    def split(self, text: str) -> list[str]:
        """The pre-tokenizer's pieces (_PIECE_RE's); tokens never cross a piece boundary."""
        # True iff no character is above U+FFFF: UTF-16 spends 4 bytes on those, 2 on the rest.
        if text.isascii() or len(text.encode("utf-16-le", "surrogatepass")) == 2 * len(text):
            return self._split_bmp(text)
        return _PIECE_RE.findall(text)

    def encode(self, text: str) -> list[int]:
        """Tokenize `text` (no special tokens are recognised inside it)."""
        out: list[int] = []
        pieces = iter(self.split(text))
        cached = self._cache.__getitem__
        while True:
            try:
                for ids in map(cached, pieces):
                    out += ids
                return out
            except KeyError as exc:  # a piece not cached yet: map has taken it, the rest follow
                piece = exc.args[0]
            out += self._learn(piece)

    def _learn(self, piece: str) -> tuple[int, ...]:
        ids = self._bpe(piece.encode("utf-8"))
        if len(self._cache) >= _PIECE_CACHE_MAX:
            self._cache.clear()  # bounded: a cheap reset beats tracking recency per piece
        self._cache[piece] = ids
        return ids

    def count(self, text: str) -> int:
        return len(self.encode(text))

    def decode(self, ids: list[int]) -> str:
        return b"".join(self._vocab[i] for i in ids).decode("utf-8", errors="replace")

    def token_bytes(self, token: int) -> bytes:
        return self._vocab[token]


_default: Tokenizer | None = None


def get_tokenizer() -> Tokenizer:
    """The process-wide tokenizer (trained on first use, deterministically)."""
    global _default
    if _default is None:
        _default = Tokenizer(_train(_CORPUS, N_MERGES))
    return _default
