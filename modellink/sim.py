"""Owns the sim model with no I/O: rendering contexts to tokens, the prefix cache, scripts, timing.

The sim is a deterministic stand-in for a model. What it does to its input is real work (every
item it is sent is validated, rendered and tokenized with a real BPE tokenizer); what a model
would spend on a GPU is simulated time at stated rates (SimConfig), which the server pays with
`trio.sleep` as it streams. Two caches, kept apart on purpose:

* RenderedContext: the tokens of one conversation. The server keeps the last one per WebSocket
  connection (the *connection cache*), so a continuation renders only its new items. HTTP
  requests (and cache misses) render the whole context again: that is the real cost saved.
* PrefixCache: the *model's* KV-style cache, global to one SimModel (so across transports and
  connections): an LRU of hashes of fixed-size token blocks, each hash chained to the previous
  block's. The same context gets the same cached_tokens and the same simulated time whether it
  came as a full HTTP request or as a WebSocket delta.

Scripts (metadata["sim_script"], a JSON string; a continuation without it keeps the script of
the response it continues): a list of steps, one per model turn,
`{"text": str, "output_tokens"?: int}`, `{"call": {"name": str, "arguments": obj}}` or
`{"calls": [call, ...]}`. The turn index is the number of model responses already in the
context; past the end of the script the sim answers with the script's last text step.
"""

from __future__ import annotations

import functools
import json
import random
from collections import OrderedDict
from collections.abc import Iterable
from typing import Any, Final

import attrs

from modellink.protocol import ErrorCode, ProtocolError
from modellink.tokenizer import Tokenizer, get_tokenizer

DEFAULT_TEXT: Final = "I have read the context. Done."
SIM_METADATA_KEYS: Final = ("sim_script", "sim_attempt")  # read by the sim, carried along chains
_SCRIPT_CACHE_MAX: Final = 256
_PLAN_CACHE_MAX: Final = 1024
_PREFIX_CACHE_MAX: Final = 64

# Words used to pad a text step to its output_tokens; each is one token of our BPE.
_FILLER_CANDIDATES: Final = (
    " the", " and", " to", " of", " in", " is", " it", " that", " for", " file", " test",
    " code", " agent", " tool", " model", " run", " line", " value", " result", " read",
)


@attrs.frozen(kw_only=True)
class SimConfig:
    """Simulated model time and sim behaviour.

    Defaults resemble a fast coding model: 50 ms to first token, prefill 20 µs per uncached
    input token (50k tokens/s), decode 1 ms per output token (1,000 tokens/s).
    """

    ttft_s: float = 0.05
    prefill_s_per_token: float = 0.00002
    decode_s_per_token: float = 0.001
    # Tokens per text/arguments delta event (the last delta may be shorter).
    chunk_tokens: int = 8
    # Model names served; any other name gets model_not_found (unless accept_any_model).
    models: tuple[str, ...] = ("sim",)
    accept_any_model: bool = False
    # The script used when a request's metadata has no sim_script (JSON string); None -> a
    # short text answer.
    default_script: str | None = None
    seed: int = 0
    # Prefix cache geometry: block_tokens per block, at most prefix_cache_blocks blocks (LRU).
    block_tokens: int = 32
    prefix_cache_blocks: int = 65_536

    @classmethod
    def zero(cls) -> SimConfig:
        """No simulated model time at all: benchmarks of pure overhead, fast tests."""
        return cls(ttft_s=0.0, prefill_s_per_token=0.0, decode_s_per_token=0.0)


# --------------------------------------------------------------------------- prefix cache


class PrefixCache:
    """LRU set of chained block hashes. `match(hashes)` = leading blocks already cached.

    `version` changes with every match and insert, so a caller can tell that nothing touched
    the LRU since it last looked (see `tail_is`).
    """

    def __init__(self, max_blocks: int) -> None:
        self._max = max_blocks
        self._lru: OrderedDict[int, None] = OrderedDict()
        self.version = 0

    def __len__(self) -> int:
        return len(self._lru)

    @property
    def max_blocks(self) -> int:
        return self._max

    def match(self, hashes: list[int], start: int = 0) -> int:
        """Number of leading blocks present (each hash chains its prefix, so the first miss ends
        the match); hits are refreshed. `start` > 0 skips blocks the caller knows are present
        and already the most recently used, in order (refreshing them would change nothing)."""
        self.version += 1
        n = start
        lru = self._lru
        for i in range(start, len(hashes)):
            h = hashes[i]
            if h not in lru:
                break
            lru.move_to_end(h)
            n += 1
        return n

    def insert(self, hashes: Iterable[int]) -> None:
        self.version += 1
        lru = self._lru
        for h in hashes:
            if h in lru:
                lru.move_to_end(h)
            else:
                lru[h] = None
        while len(lru) > self._max:
            lru.popitem(last=False)


# --------------------------------------------------------------------------- rendering


def _is_model_output(item: dict[str, Any]) -> bool:
    kind = item.get("type")
    return kind == "function_call" or (kind == "message" and item.get("role") == "assistant")


@attrs.frozen
class _Marks:
    """The special tokens a rendering uses, looked up once per tokenizer."""

    start: int
    end: int
    role: dict[str, int]
    call: int
    result: int


@functools.cache
def _marks(tk: Tokenizer) -> _Marks:
    sp = tk.special
    return _Marks(sp["<|im_start|>"], sp["<|im_end|>"],
                  {r: sp[f"<|{r}|>"] for r in ("system", "developer", "user", "assistant")},
                  sp["<|tool_call|>"], sp["<|tool_result|>"])


class PrefixTokens:
    """The rendered tokens of recent (instructions, tools JSON) prefixes, shared by every context
    of one SimModel: each request names its prefix again, and most name the same few. Bounded:
    cleared when full. The tokens are the same as rendering again, so `tokens_rendered` (what a
    request had to render into its context) does not change; only the tokenizer's work is saved.
    """

    def __init__(self, max_entries: int = _PREFIX_CACHE_MAX) -> None:
        self._max = max_entries
        self._d: dict[tuple[str | None, str], tuple[int, ...]] = {}

    def get(self, key: tuple[str | None, str], tk: Tokenizer) -> tuple[int, ...]:
        toks = self._d.get(key)
        if toks is None:
            instructions, tools_json = key
            m = _marks(tk)
            out: list[int] = []
            if instructions:
                out += [m.start, m.role["system"], *tk.encode(instructions), m.end]
            if tools_json:
                out += [m.start, m.role["system"], *tk.encode(tools_json), m.end]
            if len(self._d) >= self._max:
                self._d.clear()
            toks = self._d[key] = tuple(out)
        return toks


class RenderedContext:
    """The tokens of one conversation: a prefix (instructions, tools) then every item.

    Invariant: `tokens` is exactly render(prefix) + render(item) for each item in order, and
    `hashes[i]` is the chained hash of block i of `tokens` (full blocks only), so two contexts
    with the same items have the same tokens and hashes however they were built.
    """

    def __init__(self, tokenizer: Tokenizer, block_tokens: int,
                 prefixes: PrefixTokens | None = None) -> None:
        self._tk = tokenizer
        self._block = block_tokens
        self._prefixes = prefixes if prefixes is not None else PrefixTokens()
        self.tokens: list[int] = []
        self.hashes: list[int] = []
        self.items: list[dict[str, Any]] = []
        self.prefix_key: tuple[str | None, str] | None = None
        # What prefix_key was made from, as received: a request whose instructions and tools
        # equal these has the same key (the tools serialize the same), without serializing
        # them again; that was ~9% of the server's CPU per WebSocket turn. (Python equality
        # takes 1, 1.0 and true in a schema for one another; a sim may render those alike.)
        self._prefix_src: tuple[str | None, list[dict[str, Any]]] | None = None
        self.model_turns = 0  # model responses (runs of output items) in the context
        self._in_output_run = False
        # (prefix cache version, n): True iff the cache is unchanged since that version, whose
        # n most recently used blocks are hashes[:n] in order (set by SimModel.finish).
        self.lru_tail: tuple[int, int] | None = None
        self.plan_version = -1  # the prefix cache version right after this context's plan
        # The sim keys of the metadata this conversation's last response was planned with: a
        # continuation that sends none of its own carries these on (SimModel.plan).
        self.sim_metadata: dict[str, str] | None = None
        m = _marks(tokenizer)
        self._start, self._end, self._role = m.start, m.end, m.role
        self._call, self._result = m.call, m.result

    def copy(self) -> RenderedContext:
        """An independent copy (a fork of a conversation); no rendering, lists copied."""
        c = RenderedContext(self._tk, self._block, self._prefixes)
        c.tokens, c.hashes, c.items = list(self.tokens), list(self.hashes), list(self.items)
        c.prefix_key, c.model_turns = self.prefix_key, self.model_turns
        c._prefix_src = self._prefix_src
        c._in_output_run = self._in_output_run
        c.lru_tail = self.lru_tail  # same blocks; whichever plans first changes the version
        c.sim_metadata = self.sim_metadata
        return c

    def mark(self) -> tuple[Any, ...]:
        """A point to `truncate` back to (e.g. when a continuation is cancelled)."""
        return (len(self.tokens), len(self.hashes), len(self.items), self.model_turns,
                self._in_output_run, self.prefix_key)

    def truncate(self, mark: tuple[Any, ...]) -> bool:
        """Drop everything appended since `mark`; False (and no change) if the prefix was
        re-rendered since, which a truncation cannot undo."""
        n_tokens, n_hashes, n_items, turns, in_run, prefix_key = mark
        if prefix_key != self.prefix_key or len(self.items) < n_items:
            return False
        del self.tokens[n_tokens:], self.hashes[n_hashes:], self.items[n_items:]
        self.model_turns, self._in_output_run = turns, in_run
        self.lru_tail = None
        return True

    def set_prefix(self, instructions: str | None, tools: list[dict[str, Any]]) -> int:
        """Make the context start with these instructions and tools; returns tokens rendered.

        Unchanged -> nothing to do. Changed -> the prefix and every item are rendered again.
        """
        if self.prefix_key is not None and self._prefix_src == (instructions, tools):
            return 0  # the same as last time: comparing costs less than re-serializing
        tools_json = json.dumps(tools, sort_keys=True, separators=(",", ":")) if tools else ""
        key = (instructions, tools_json)
        self._prefix_src = (instructions, tools)
        if key == self.prefix_key:
            return 0
        items = self.items
        self.tokens, self.hashes, self.items = [], [], []
        self.model_turns, self._in_output_run = 0, False
        self.lru_tail = None
        self.prefix_key = key
        toks = self._prefixes.get(key, self._tk)
        self._extend(toks)
        return len(toks) + self.append_items(items)

    def append_items(self, items: list[dict[str, Any]]) -> int:
        """Render and append items (already validated by protocol); returns tokens rendered."""
        n = 0
        for item in items:
            toks = self.render_item(item)
            n += len(toks)
            self._extend(toks)
            self.items.append(item)
            out = _is_model_output(item)
            if out and not self._in_output_run:
                self.model_turns += 1
            self._in_output_run = out
        return n

    def render_item(self, item: dict[str, Any]) -> list[int]:
        enc = self._tk.encode
        kind = item.get("type", "message")
        if kind == "message":
            content = item["content"]
            toks = [self._start, self._role[item["role"]]]
            if isinstance(content, str):
                toks += enc(content)
            else:
                for part in content:
                    toks += enc(part.get("text", part.get("refusal", "")))
            toks.append(self._end)
            return toks
        if kind == "function_call":
            return [self._call, *enc(item["name"]), *enc(item["arguments"]), self._end]
        out = item["output"]
        text = out if isinstance(out, str) else "".join(p["text"] for p in out)
        return [self._result, *enc(item["call_id"]), *enc(text), self._end]

    def _extend(self, toks: list[int] | tuple[int, ...]) -> None:
        b = self._block
        start = len(self.hashes) * b
        self.tokens += toks
        prev = self.hashes[-1] if self.hashes else 0
        while start + b <= len(self.tokens):
            prev = hash((prev, tuple(self.tokens[start : start + b])))
            self.hashes.append(prev)
            start += b


# --------------------------------------------------------------------------- scripts


@attrs.frozen(kw_only=True)
class ScriptCall:
    name: str
    arguments: str  # JSON text


@attrs.frozen(kw_only=True)
class ScriptStep:
    text: str | None = None
    output_tokens: int | None = None
    calls: tuple[ScriptCall, ...] = ()
    fail: str | None = None  # answer response.failed with this reason ...
    attempts: tuple[int, ...] | None = None  # ... on these attempts only (None: every attempt)


def steps_for_attempt(steps: tuple[ScriptStep, ...], attempt: int) -> tuple[ScriptStep, ...]:
    """The script as attempt `attempt` sees it: a `fail` step that does not name this attempt
    is left out, so the steps after it move up one turn."""
    return tuple(s for s in steps
                 if s.fail is None or s.attempts is None or attempt in s.attempts)


def parse_script(text: str, *, param: str = "metadata.sim_script") -> tuple[ScriptStep, ...]:
    """Parse a sim script; raises ProtocolError(invalid_value, param) saying what to fix."""

    def bad(msg: str) -> ProtocolError:
        return ProtocolError(ErrorCode.INVALID_VALUE, f"{param}: {msg}", param=param)

    try:
        raw = json.loads(text)
    except (ValueError, RecursionError) as exc:
        raise bad(f"not valid JSON ({exc})") from None
    if not isinstance(raw, list) or not raw:
        raise bad("must be a non-empty JSON list of steps")

    def call(c: Any, where: str) -> ScriptCall:
        if not isinstance(c, dict) or not isinstance(c.get("name"), str) or not c["name"]:
            raise bad(f"{where} must be an object with a non-empty string 'name'")
        args = c.get("arguments", {})
        if isinstance(args, str):
            return ScriptCall(name=c["name"], arguments=args)
        return ScriptCall(name=c["name"], arguments=json.dumps(args, separators=(",", ":")))

    steps: list[ScriptStep] = []
    for i, s in enumerate(raw):
        where = f"step {i}"
        if not isinstance(s, dict):
            raise bad(f"{where} must be an object")
        if "fail" in s:
            if not isinstance(s["fail"], str):
                raise bad(f"{where}.fail must be a string (the failure's reason)")
            att = s.get("attempts")
            if att is not None and (not isinstance(att, list) or not all(
                    isinstance(a, int) and not isinstance(a, bool) and a >= 1 for a in att)):
                raise bad(f"{where}.attempts must be a list of attempt numbers (1, 2, ...)")
            steps.append(ScriptStep(fail=s["fail"],
                                    attempts=tuple(att) if att is not None else None))
        elif "text" in s:
            if not isinstance(s["text"], str):
                raise bad(f"{where}.text must be a string")
            n = s.get("output_tokens")
            if n is not None and (not isinstance(n, int) or isinstance(n, bool) or n < 0):
                raise bad(f"{where}.output_tokens must be a non-negative integer")
            steps.append(ScriptStep(text=s["text"], output_tokens=n))
        elif "call" in s:
            steps.append(ScriptStep(calls=(call(s["call"], f"{where}.call"),)))
        elif "calls" in s:
            cs = s["calls"]
            if not isinstance(cs, list) or not cs:
                raise bad(f"{where}.calls must be a non-empty list")
            steps.append(
                ScriptStep(calls=tuple(call(c, f"{where}.calls[{j}]") for j, c in enumerate(cs)))
            )
        else:
            raise bad(f"{where} needs one of 'text', 'call', 'calls', 'fail'")
    return tuple(steps)


def step_for_turn(steps: tuple[ScriptStep, ...], turn: int) -> ScriptStep:
    """Step `turn` of the script; past the end, the last text step (or the default text)."""
    if turn < len(steps):
        return steps[turn]
    for s in reversed(steps):
        if s.text is not None:
            return s
    return ScriptStep(text=DEFAULT_TEXT)


# --------------------------------------------------------------------------- generation


@attrs.frozen(kw_only=True)
class OutputPlan:
    """One output item to stream: text (a message) or a function call, in delta chunks.

    `chunks` are (delta, tokens) pairs; joined, the deltas are the whole text / arguments.
    """

    kind: str  # "text" | "call"
    chunks: tuple[tuple[str, int], ...]
    name: str = ""  # function name for calls

    @property
    def full(self) -> str:
        return "".join(c for c, _ in self.chunks)

    @property
    def tokens(self) -> int:
        return sum(n for _, n in self.chunks)


@attrs.frozen(kw_only=True)
class Generation:
    """What the model will do for one request, and what it costs in simulated time."""

    input_tokens: int
    cached_tokens: int
    prefill_s: float  # ttft + prefill of the uncached tokens, paid before the first event
    decode_s_per_token: float
    outputs: tuple[OutputPlan, ...]
    fail: str | None = None  # a scripted failure: answer response.failed with this reason

    @property
    def output_tokens(self) -> int:
        return sum(o.tokens for o in self.outputs)


class SimModel:
    """The sim backend's model: one per server, so its prefix cache is shared by all transports."""

    def __init__(self, config: SimConfig) -> None:
        self.config = config
        self.tokenizer = get_tokenizer()
        self.prefix_cache = PrefixCache(config.prefix_cache_blocks)
        self._default_steps = (
            parse_script(config.default_script, param="default_script")
            if config.default_script
            else (ScriptStep(text=DEFAULT_TEXT),)
        )
        # Parsed scripts by their JSON text: a session sends the same script every turn.
        self._scripts: dict[str, tuple[ScriptStep, ...]] = {}
        self._prefixes = PrefixTokens()
        # Output plans by (step, turn); turn is -1 for a step whose plan does not depend on it
        # (only padding to output_tokens draws from a per-turn random stream).
        self._plans: dict[tuple[ScriptStep, int], tuple[OutputPlan, ...]] = {}
        self._filler = tuple(w for w in _FILLER_CANDIDATES if len(self.tokenizer.encode(w)) == 1)
        if not self._filler:  # pragma: no cover - the embedded corpus guarantees some
            self._filler = (" a",)

    def check_model(self, model: str) -> None:
        """Raises ProtocolError(model_not_found) for a model this server does not serve."""
        if not self.config.accept_any_model and model not in self.config.models:
            raise ProtocolError(
                ErrorCode.MODEL_NOT_FOUND,
                f"the model {model!r} does not exist on this server: use one of "
                f"{', '.join(self.config.models)}",
                param="model",
            )

    def new_context(self) -> RenderedContext:
        return RenderedContext(self.tokenizer, self.config.block_tokens, self._prefixes)

    def script_for(self, metadata: dict[str, str]) -> tuple[ScriptStep, ...]:
        """The script steps for a request: metadata["sim_script"] (else the default), as seen
        by attempt metadata["sim_attempt"] (default 1). Raises ProtocolError."""
        text = metadata.get("sim_script")
        if text is None:
            steps = self._default_steps
        else:
            cached = self._scripts.get(text)
            if cached is None:
                cached = parse_script(text)
                if len(self._scripts) >= _SCRIPT_CACHE_MAX:
                    self._scripts.pop(next(iter(self._scripts)))  # bounded: drop the oldest
                self._scripts[text] = cached
            steps = cached
        raw = metadata.get("sim_attempt", "1")
        try:
            attempt = int(raw)
        except ValueError:
            attempt = 0
        if attempt < 1:
            raise ProtocolError(ErrorCode.INVALID_VALUE, "metadata.sim_attempt must be an "
                                f"attempt number (1, 2, ...), got {raw!r}",
                                param="metadata.sim_attempt")
        return steps_for_attempt(steps, attempt)

    def plan(self, ctx: RenderedContext, metadata: dict[str, str], *, generate: bool = True
             ) -> Generation:
        """Decide the output for `ctx` and price it. Registers the prompt's blocks as cached
        (prefill fills the cache). Raises ProtocolError for a bad script.

        The script and attempt are the request's metadata["sim_script"] / ["sim_attempt"]; a
        request with neither key takes both from the conversation it continues (ctx), so a
        client need send a long script once per conversation, not with every turn."""
        sim: dict[str, str] = {k: metadata[k] for k in SIM_METADATA_KEYS if k in metadata}
        if not sim and ctx.sim_metadata is not None:
            sim = ctx.sim_metadata  # a continuation that sends none: its conversation's
        ctx.sim_metadata = sim
        steps = self.script_for(sim)
        cfg = self.config
        pc = self.prefix_cache
        # A continuation whose previous response was the last thing to touch the cache: its
        # blocks so far are the cache's most recently used, in order, so matching them again
        # would find and refresh them all without changing anything; start after them. Any
        # other request in between (any connection, any transport) means a full match. Either
        # way the result and the LRU order are exactly those of a full match.
        tail = ctx.lru_tail
        start = tail[1] if tail is not None and tail[0] == pc.version \
            and tail[1] <= len(ctx.hashes) else 0
        cached_blocks = pc.match(ctx.hashes, start)
        cached = min(cached_blocks * cfg.block_tokens, len(ctx.tokens))
        pc.insert(ctx.hashes[cached_blocks:])
        ctx.lru_tail = None
        ctx.plan_version = pc.version
        uncached = len(ctx.tokens) - cached
        outputs: tuple[OutputPlan, ...] = ()
        fail = None
        if generate:
            step = step_for_turn(steps, ctx.model_turns)
            if step.fail is not None:
                fail = step.fail
            else:
                outputs = self._plan_outputs(step, ctx.model_turns)
        return Generation(
            input_tokens=len(ctx.tokens),
            cached_tokens=cached,
            prefill_s=(cfg.ttft_s + cfg.prefill_s_per_token * uncached) if generate else 0.0,
            decode_s_per_token=cfg.decode_s_per_token,
            outputs=outputs,
            fail=fail,
        )

    def finish(self, ctx: RenderedContext, output_items: list[dict[str, Any]]) -> None:
        """Append the response's output to the context and cache its blocks (decode fills the
        cache too, so the next turn's prefix hits)."""
        n = len(ctx.hashes)  # the prompt's blocks were cached (and refreshed) by plan()
        pc = self.prefix_cache
        # Nothing touched the cache since plan() left the prompt's blocks most recently used,
        # in order, and these go after them: then the context's blocks are the LRU's tail.
        untouched = ctx.plan_version == pc.version
        ctx.append_items(output_items)
        pc.insert(ctx.hashes[n:])
        ctx.lru_tail = (pc.version, len(ctx.hashes)) \
            if untouched and len(ctx.hashes) <= pc.max_blocks else None

    def _plan_outputs(self, step: ScriptStep, turn: int) -> tuple[OutputPlan, ...]:
        key = (step, turn if step.output_tokens is not None else -1)
        plans = self._plans.get(key)
        if plans is None:
            if len(self._plans) >= _PLAN_CACHE_MAX:
                self._plans.clear()
            plans = self._plans[key] = self._outputs(step, turn)
        return plans

    def _outputs(self, step: ScriptStep, turn: int) -> tuple[OutputPlan, ...]:
        if step.calls:
            return tuple(
                OutputPlan(kind="call", name=c.name, chunks=self._chunks(c.arguments))
                for c in step.calls
            )
        text = step.text or ""
        chunks = list(self._chunks(text))
        have = sum(n for _, n in chunks)
        if step.output_tokens is not None and step.output_tokens > have:
            rng = random.Random(f"{self.config.seed}:{turn}")
            pad = [rng.choice(self._filler) for _ in range(step.output_tokens - have)]
            k = self.config.chunk_tokens
            chunks += [("".join(pad[i : i + k]), len(pad[i : i + k]))
                       for i in range(0, len(pad), k)]
        return (OutputPlan(kind="text", chunks=tuple(chunks)),)

    def _chunks(self, text: str) -> tuple[tuple[str, int], ...]:
        """Split text into deltas of about chunk_tokens tokens, on pre-tokenizer boundaries
        (never inside a UTF-8 character)."""
        k = max(1, self.config.chunk_tokens)
        out: list[tuple[str, int]] = []
        buf: list[str] = []
        n = 0
        for piece in self.tokenizer.split(text):
            buf.append(piece)
            n += len(self.tokenizer.encode(piece))
            if n >= k:
                out.append(("".join(buf), n))
                buf, n = [], 0
        if buf:
            out.append(("".join(buf), n))
        return tuple(out)
