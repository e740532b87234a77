"""Owns sample Python function tools for example graphs: `tools = ["agents.tools.examples:word_count"]`."""

from __future__ import annotations

import collections
import re
from typing import Literal

import trio


def word_count(text: str, top: int = 5) -> dict[str, object]:
    """Count the words in a text.

    Args:
        text: the text to count
        top: how many of the most frequent words to list
    """
    words = re.findall(r"[\w']+", text.lower())
    return {"words": len(words), "lines": len(text.splitlines()),
            "most_common": collections.Counter(words).most_common(max(top, 0))}


async def convert_case(text: str, to: Literal["upper", "lower", "title"] = "upper") -> str:
    """Change the case of a text.

    Args:
        text: the text to change
        to: the case to change it to
    """
    await trio.lowlevel.checkpoint()
    return {"upper": text.upper, "lower": text.lower, "title": text.title}[to]()
