"""Owns structlog configuration for every Switchboard process: JSON lines, contextvars first."""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable, MutableMapping
from typing import IO, Any

import orjson
import structlog

_second: tuple[int, str] = (-1, "")  # the last whole second stamped, and its text


def add_timestamp(_logger: Any, _method: str,
                  event_dict: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    """`timestamp`: UTC, ISO 8601, always with microseconds ("2026-11-25T17:05:03.000000Z").
    structlog's TimeStamper("iso") drops ".000000" at a whole second, and the text then sorts
    after the rest of that second: `logs` puts lines in order by this text. The date and time
    of day are formatted once per second, not per line (~5 us a line with TimeStamper)."""
    global _second
    t = time.time()
    sec = int(t)
    known = _second  # one read: another thread may replace it
    if known[0] != sec:
        known = _second = (sec, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(sec)))
    event_dict["timestamp"] = f"{known[1]}.{int((t - sec) * 1_000_000):06d}Z"
    return event_dict


# structlog's own map of the context variables bind_contextvars made (name -> variable). Read
# directly, a line looks up the few it holds instead of walking the whole context, which
# merge_contextvars does (~3 of a line's ~8 us). Without it (another structlog), that walk.
_BOUND: dict[str, Any] | None = getattr(structlog.contextvars, "_CONTEXT_VARS", None)
_PREFIX_LEN = len(getattr(structlog.contextvars, "STRUCTLOG_KEY_PREFIX", "structlog_"))
_LEVEL_NAMES = {"warn": "warning", "exception": "error"}


def json_line(logger: Any, method: str, event_dict: MutableMapping[str, Any]) -> bytes:
    """The JSON-lines chain in one processor (a line is logged per event of every attempt,
    and each processor is a call of its own): the ids bound with bind_contextvars, `level`,
    `timestamp`, a formatted exception if `exc_info` asks for one, then the line (orjson)."""
    if _BOUND is None:
        structlog.contextvars.merge_contextvars(logger, method, event_dict)
    else:
        for name, var in tuple(_BOUND.items()):  # a copy: another thread may bind a new name
            value = var.get()
            if value is not Ellipsis:
                event_dict.setdefault(name[_PREFIX_LEN:], value)
    event_dict["level"] = _LEVEL_NAMES.get(method, method)
    add_timestamp(logger, method, event_dict)
    if "exc_info" in event_dict:
        structlog.processors.format_exc_info(logger, method, event_dict)
    return orjson.dumps(event_dict, default=str)


_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING,
           "error": logging.ERROR, "critical": logging.CRITICAL}


def level_number(level: str | int) -> int:
    """Map a level name to its number; raises ValueError naming the allowed names."""
    if isinstance(level, int):
        return level
    try:
        return _LEVELS[level.lower()]
    except KeyError:
        raise ValueError(
            f"unknown log level {level!r}: use one of {', '.join(_LEVELS)}"
        ) from None


class _TeeLogger:
    """Writes each rendered JSON line to a stream and hands it to `tee` (a file, a shipper)."""

    def __init__(self, stream: IO[Any] | None, tee: Callable[[bytes], None]) -> None:
        self._stream = stream
        self._tee = tee

    def msg(self, message: bytes) -> None:
        line = message if isinstance(message, bytes) else str(message).encode()
        if self._stream is not None:
            buf = getattr(self._stream, "buffer", None)
            if buf is not None:
                buf.write(line + b"\n")
                buf.flush()
            else:
                self._stream.write(line.decode() + "\n")
        self._tee(line)

    log = debug = info = warning = warn = error = critical = exception = fatal = msg


def configure_logging(*, json: bool = True, level: str | int = "info",
                      stream: IO[Any] | None = None,
                      tee: Callable[[bytes], None] | None = None,
                      quiet: bool = False) -> None:
    """Configure structlog once for this process.

    JSON lines (bytes, `json_line`) when `json` is true, a readable console format otherwise;
    either way the ids bound with `bind_contextvars` reach every line.
    With `tee`, every JSON line is also handed to it (the run's log file, a log shipper);
    `quiet` then stops the copy to the stream.
    """
    global _generation
    _generation += 1
    out = stream if stream is not None else sys.stderr
    if tee is not None:
        structlog.configure(
            processors=[json_line],
            wrapper_class=structlog.make_filtering_bound_logger(level_number(level)),
            logger_factory=lambda *a: _TeeLogger(None if quiet else out, tee),
            cache_logger_on_first_use=True,
        )
        return
    processors: list[Any]
    if json:
        processors = [json_line]
        binary = getattr(out, "buffer", None)
        factory: Any = (structlog.BytesLoggerFactory(file=binary) if binary is not None
                        else structlog.PrintLoggerFactory(file=out))  # type: ignore[arg-type]
        if binary is None:
            processors.append(lambda _l, _m, ev: ev.decode() if isinstance(ev, bytes) else ev)
    else:
        processors = [structlog.contextvars.merge_contextvars, structlog.processors.add_log_level,
                      add_timestamp, structlog.processors.format_exc_info,
                      structlog.dev.ConsoleRenderer(colors=False)]
        factory = structlog.PrintLoggerFactory(file=out)  # type: ignore[arg-type]
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(level_number(level)),
        logger_factory=factory,
        cache_logger_on_first_use=True,
    )


_generation = 0  # bumped by every configure_logging; loggers rebuild themselves when it moves


class _NamedLogger:
    """A logger that binds `logger=name` against the configuration in force when it logs.

    Modules make their loggers at import, before `configure_logging` runs (and tests configure
    more than once), so binding at creation would pin the default configuration forever.
    """

    __slots__ = ("_name", "_gen", "_bound")

    def __init__(self, name: str) -> None:
        self._name = name
        self._gen = -1
        self._bound: Any = None

    def __getattr__(self, attr: str) -> Any:
        if self._gen != _generation:
            self._bound = structlog.get_logger().bind(logger=self._name)
            self._gen = _generation
        return getattr(self._bound, attr)


def get_logger(name: str) -> Any:
    """A structlog logger carrying `logger=name` on each line (see _NamedLogger)."""
    return _NamedLogger(name)
