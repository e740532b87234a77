"""Owns unified diffs: parsing them and applying hunks to text, with exact context and no I/O.

Rules: a hunk's context and removed lines must match the file exactly (no fuzz); a hunk that
does not match at the line its header names is looked for elsewhere in the file, nearest
first, after the previous hunk. Errors name the file and the hunk and show what differed.
"""

from __future__ import annotations

import re

import attrs

DEV_NULL = "/dev/null"
_HUNK_RE = re.compile(r"^@@ -(\d+)(?:,(\d+))? \+(\d+)(?:,(\d+))? @@")


class PatchError(Exception):
    """The patch is malformed or does not apply: the message names the file and hunk."""


@attrs.frozen(kw_only=True)
class Hunk:
    old_start: int
    old_len: int
    new_start: int
    new_len: int
    header: str
    lines: tuple[tuple[str, str], ...]  # (" " | "-" | "+", text without newline)
    old_no_newline: bool = False  # the old side's last line has no newline at end of file
    new_no_newline: bool = False

    def old_lines(self) -> list[str]:
        return [t for k, t in self.lines if k != "+"]

    def new_lines(self) -> list[str]:
        return [t for k, t in self.lines if k != "-"]


@attrs.frozen(kw_only=True)
class FilePatch:
    old_path: str | None  # None: the file is created
    new_path: str | None  # None: the file is deleted
    hunks: tuple[Hunk, ...]

    @property
    def path(self) -> str:
        p = self.new_path if self.new_path is not None else self.old_path
        assert p is not None
        return p


def _strip_path(raw: str) -> str | None:
    path = raw.split("\t", 1)[0].rstrip()
    if path.startswith('"') and path.endswith('"') and len(path) >= 2:
        path = path[1:-1]
    if path == DEV_NULL:
        return None
    if path.startswith(("a/", "b/")):
        path = path[2:]
    return path


def parse_patch(text: str) -> list[FilePatch]:
    """Parse a unified diff (one or more files; `diff --git` noise is skipped).

    Raises PatchError with the line number for anything malformed.
    """
    lines = text.splitlines()
    out: list[FilePatch] = []
    i = 0
    while i < len(lines):
        line = lines[i]
        if not line.startswith("--- "):
            if line.startswith("@@"):
                raise PatchError(f"patch line {i + 1}: hunk header before any '--- old' / "
                                 "'+++ new' file header")
            i += 1
            continue
        if i + 1 >= len(lines) or not lines[i + 1].startswith("+++ "):
            raise PatchError(f"patch line {i + 1}: '--- ' header not followed by '+++ '")
        old_path, new_path = _strip_path(line[4:]), _strip_path(lines[i + 1][4:])
        if old_path is None and new_path is None:
            raise PatchError(f"patch line {i + 1}: both sides are /dev/null")
        label = new_path or old_path
        i += 2
        hunks: list[Hunk] = []
        while i < len(lines) and lines[i].startswith("@@"):
            hunk, i = _parse_hunk(lines, i, label or "?", len(hunks) + 1)
            hunks.append(hunk)
        if not hunks:
            raise PatchError(f"patch for {label}: no hunks after the file header (line {i})")
        out.append(FilePatch(old_path=old_path, new_path=new_path, hunks=tuple(hunks)))
    if not out:
        raise PatchError("no file headers found: a unified diff has '--- a/path', '+++ b/path' "
                         "and '@@ -l,n +l,n @@' hunks")
    return out


def _parse_hunk(lines: list[str], i: int, label: str, number: int) -> tuple[Hunk, int]:
    header = lines[i]
    m = _HUNK_RE.match(header)
    if not m:
        raise PatchError(f"patch for {label}, hunk #{number}: bad header {header!r} "
                         "(expected '@@ -start,count +start,count @@')")
    old_start, new_start = int(m.group(1)), int(m.group(3))
    old_len = int(m.group(2)) if m.group(2) is not None else 1
    new_len = int(m.group(4)) if m.group(4) is not None else 1
    i += 1
    body: list[tuple[str, str]] = []
    old_seen = new_seen = 0
    old_nonl = new_nonl = False
    while old_seen < old_len or new_seen < new_len:
        if i >= len(lines):
            raise PatchError(f"patch for {label}, hunk #{number} ({header}): ends early: "
                             f"{old_len - old_seen} old and {new_len - new_seen} new lines "
                             "missing (check the counts in the header)")
        line = lines[i]
        kind, rest = (line[:1], line[1:]) if line else (" ", "")  # blank context line
        if kind == "\\":  # "\ No newline at end of file" for the line before
            old_nonl, new_nonl = _no_newline(body, old_nonl, new_nonl)
            i += 1
            continue
        if kind not in " -+":
            raise PatchError(f"patch for {label}, hunk #{number} ({header}): line {i + 1} "
                             f"{line!r} does not start with ' ', '-' or '+' (or the header "
                             "counts are too large)")
        if kind in " -":
            old_seen += 1
        if kind in " +":
            new_seen += 1
        if old_seen > old_len or new_seen > new_len:
            raise PatchError(f"patch for {label}, hunk #{number} ({header}): more lines than "
                             "the header counts")
        body.append((kind, rest))
        i += 1
    while i < len(lines) and lines[i].startswith("\\"):
        old_nonl, new_nonl = _no_newline(body, old_nonl, new_nonl)
        i += 1
    return Hunk(old_start=old_start, old_len=old_len, new_start=new_start, new_len=new_len,
                header=header, lines=tuple(body), old_no_newline=old_nonl,
                new_no_newline=new_nonl), i


def _no_newline(body: list[tuple[str, str]], old: bool, new: bool) -> tuple[bool, bool]:
    kind = body[-1][0] if body else " "
    return old or kind in " -", new or kind in " +"


@attrs.frozen(kw_only=True)
class Text:
    """A file as lines without terminators, plus how it ends."""

    lines: tuple[str, ...]
    eol: str = "\n"
    final_newline: bool = True

    @classmethod
    def parse(cls, content: str) -> Text:
        if not content:
            return cls(lines=(), final_newline=False)
        eol = "\r\n" if "\r\n" in content else "\n"
        final = content.endswith("\n")
        body = content[: -len(eol)] if content.endswith(eol) else content.rstrip("\n")
        return cls(lines=tuple(body.split(eol)), eol=eol, final_newline=final)

    def render(self) -> str:
        if not self.lines:
            return ""
        return self.eol.join(self.lines) + (self.eol if self.final_newline else "")


def apply_hunks(text: Text, fp: FilePatch) -> Text:
    """Apply one file's hunks to its text. Raises PatchError naming file and hunk on mismatch."""
    lines = list(text.lines)
    final_newline = text.final_newline
    floor = 0  # hunks apply in order, each after the previous one
    delta = 0
    for n, hunk in enumerate(fp.hunks, start=1):
        old = hunk.old_lines()
        want = max(hunk.old_start - 1, 0) + delta if hunk.old_len else hunk.old_start + delta
        at = _find(lines, old, want, floor)
        if at is None:
            raise PatchError(_mismatch(fp.path, n, hunk, lines, old, max(want, floor)))
        new = hunk.new_lines()
        reaches_end = at + len(old) == len(lines)
        lines[at:at + len(old)] = new
        if reaches_end:
            final_newline = not hunk.new_no_newline  # the hunk decides how the file ends
        floor = at + len(new)
        delta += len(new) - len(old)
    return Text(lines=tuple(lines), eol=text.eol, final_newline=final_newline if lines else False)


def _find(lines: list[str], old: list[str], want: int, floor: int) -> int | None:
    """Where `old` occurs exactly, at `want` if possible, else the nearest place at or after floor."""
    if not old:
        return min(max(want, floor), len(lines))
    last = len(lines) - len(old)
    if last < floor:
        return None

    def matches(at: int) -> bool:
        return lines[at:at + len(old)] == old

    want = min(max(want, floor), last)
    if matches(want):
        return want
    for d in range(1, last - floor + 1):
        for at in (want - d, want + d):
            if floor <= at <= last and matches(at):
                return at
    return None


def _mismatch(path: str, n: int, hunk: Hunk, lines: list[str], old: list[str], at: int) -> str:
    msg = (f"patch for {path}, hunk #{n} ({hunk.header}) does not apply: its context and "
           "removed lines are not in the file")
    for k, expected in enumerate(old):
        i = at + k
        got = lines[i] if i < len(lines) else None
        if got != expected:
            found = "end of file" if got is None else repr(got)
            msg += (f"; at line {i + 1} the hunk expects {expected!r} but the file has {found}. "
                    "Read the file again and regenerate the patch with its exact current lines")
            break
    return msg
