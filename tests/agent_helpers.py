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


def alive(pid: int) -> bool:
    """True iff pid is a live (non-zombie) process, from /proc."""
    try:
        stat = pathlib.Path(f"/proc/{pid}/stat").read_text()
    except OSError:  # gone: no such file, or reaped between the open and the read
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


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
