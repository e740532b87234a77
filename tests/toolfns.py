"""Sample Python function tools for the tool tests ("toolfns:add" and friends)."""

import time
from typing import Literal, Optional

import trio
import trio.lowlevel

CALLS: list[str] = []


def add(a: int, b: int = 2) -> int:
    """Add two integers.

    Args:
        a: the first number
        b: the second number,
            two by default
    """
    return a + b


async def greet(name: str, style: Literal["plain", "loud"] = "plain",
                tags: Optional[list[str]] = None) -> dict:  # noqa: UP045 (typing spelling on purpose)
    """Greet someone and echo the tags."""
    await trio.lowlevel.checkpoint()
    text = f"hello {name}"
    return {"text": text.upper() if style == "loud" else text, "tags": tags or []}


def scale(values: list[float], factor: float, inplace: bool = False,
          offset: float | None = None) -> list[float]:
    return [v * factor + (offset or 0) for v in values]


def boom(reason: str) -> str:
    """Always fails."""
    raise ValueError(f"cannot handle {reason}")


def slow_sync(seconds: float) -> str:
    """Blocks its thread (sync tools cannot be interrupted)."""
    time.sleep(seconds)
    CALLS.append("slow_sync done")
    return "slept"


async def slow_async(seconds: float) -> str:
    await trio.sleep(seconds)
    return "slept"


def huge(n: int) -> str:
    return "x" * n


def raw_bytes() -> bytes:
    return b"\x00\xffabc"


def kwargs_tool(**kw: str) -> str:
    return ""


def bad_hint(x: complex) -> str:
    return ""


NOT_CALLABLE = 42


async def own_deadline() -> str:
    with trio.fail_after(0.01):
        await trio.sleep(1)
    return "unreachable"
