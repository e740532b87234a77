"""Helpers shared by the agent tests: polling with a bound, and the process table."""

from __future__ import annotations

import pathlib
from typing import Any

import trio


async def until(pred: Any, poll_s: float = 0.01) -> None:
    """Poll `pred` until it holds (the caller's fail_after bounds the wait)."""
    while True:
        if pred():
            return
        await trio.sleep(poll_s)


def _stat_fields(pid: int) -> list[str] | None:
    """The fields of /proc/PID/stat after the command name (state first, then the parent), or
    None once the process is gone (no such file, or reaped between the open and the read)."""
    try:
        stat = pathlib.Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()


def alive(pid: int) -> bool:
    """True iff pid is a live (non-zombie) process, from /proc."""
    fields = _stat_fields(pid)
    return fields is not None and fields[0] != "Z"


def parent_of(pid: int) -> int | None:
    """The parent of `pid`, or None once it is gone (it may exit between two reads)."""
    fields = _stat_fields(pid)
    return None if fields is None else int(fields[1])


def procs_mentioning(needle: str) -> list[int]:
    """Live processes whose command line contains `needle` (e.g. a test's unique state dir)."""
    out = []
    for d in pathlib.Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if needle in cmd and alive(int(d.name)):
                out.append(int(d.name))
    return out
