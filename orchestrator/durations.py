"""Owns the duration syntax of graph files: "250ms", "30s", "5m", "1h30m" -> seconds."""

from __future__ import annotations

import re

_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h)")
_WHOLE = re.compile(r"^(?:\d+(?:\.\d+)?(?:ms|s|m|h))+$")
_UNIT = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}

ALLOWED = 'a number with a unit: "250ms", "30s", "5m", "1h30m" (units ms, s, m, h), or a plain number of seconds'


class DurationError(ValueError):
    """The text is not a duration; the message says what is allowed."""


def parse_duration(value: object) -> float:
    """Seconds for a duration string or a non-negative number of seconds.

    Raises DurationError for anything else (including negative numbers and bools).
    """
    if isinstance(value, bool):
        raise DurationError(f"{value!r} is not a duration; use {ALLOWED}")
    if isinstance(value, int | float):
        if value < 0:
            raise DurationError(f"{value!r} is negative; use {ALLOWED}")
        return float(value)
    if not isinstance(value, str):
        raise DurationError(f"{value!r} is not a duration; use {ALLOWED}")
    text = value.strip().replace(" ", "")
    if not _WHOLE.match(text):
        raise DurationError(f"{value!r} is not a duration; use {ALLOWED}")
    return sum(float(n) * _UNIT[u] for n, u in _PART.findall(text))
