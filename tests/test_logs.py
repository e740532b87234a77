"""Pins bus.logs: loggers made at import follow the configuration set later; ids reach lines."""

import contextvars
import json
import time
from datetime import UTC, datetime

import pytest
import structlog

from bus import logs as logs_module
from bus.logs import configure_logging, get_logger, level_number
from orchestrator.logview import TimeOrder, parse_ts

log = get_logger("early")  # made before configure_logging, as every module-level logger is


def test_logger_made_before_configure_uses_the_later_configuration():
    lines: list[bytes] = []
    configure_logging(json=True, level="info", tee=lines.append, quiet=True)
    log.info("hello", x=1)
    rec = json.loads(lines[-1])
    assert rec["event"] == "hello" and rec["logger"] == "early" and rec["x"] == 1
    assert rec["level"] == "info" and "timestamp" in rec


def test_bound_contextvars_reach_every_line_and_debug_is_filtered():
    lines: list[bytes] = []
    configure_logging(json=True, level="info", tee=lines.append, quiet=True)
    with structlog.contextvars.bound_contextvars(run_id="r1", task_id="t1"):
        log.debug("dropped")
        log.info("kept")
    assert len(lines) == 1
    rec = json.loads(lines[0])
    assert (rec["run_id"], rec["task_id"], rec["event"]) == ("r1", "t1", "kept")


def test_a_line_carries_ids_bound_in_its_task_level_names_and_a_formatted_exception():
    """The one-processor JSON chain (json_line): ids bound with bind_contextvars in this
    context only, "warn" and "exception" logged under their level names, exc_info as text."""
    lines: list[bytes] = []
    configure_logging(json=True, level="info", tee=lines.append, quiet=True)
    ctx = contextvars.copy_context()
    ctx.run(structlog.contextvars.bind_contextvars, run_id="r2", attempt=3)
    ctx.run(log.warn, "inside")
    log.info("outside")
    try:
        raise ValueError("boom")
    except ValueError:
        ctx.run(log.exception, "failed")
    inside, outside, failed = (json.loads(line) for line in lines)
    assert (inside["run_id"], inside["attempt"], inside["level"]) == ("r2", 3, "warning")
    assert "run_id" not in outside and outside["level"] == "info"
    assert failed["level"] == "error" and "ValueError: boom" in failed["exception"]


def test_unknown_level_names_the_allowed_ones():
    try:
        level_number("loud")
    except ValueError as exc:
        assert "debug" in str(exc) and "loud" in str(exc)
    else:
        raise AssertionError("no error for an unknown level")


def test_timestamps_always_carry_microseconds_so_their_text_sorts_in_time_order(
        monkeypatch: pytest.MonkeyPatch):
    # A line at a whole second used to read "...:03Z" (isoformat drops ".000000"), which
    # sorts after "...:03.5Z": `logs` orders lines by this text, and put it last.
    lines: list[bytes] = []
    configure_logging(json=True, level="info", tee=lines.append, quiet=True)
    whole = 1795626303.0  # 2026-11-25T17:05:03Z
    for t in (whole, whole + 0.5, whole + 1.25):
        monkeypatch.setattr(logs_module.time, "time", lambda t=t: t)
        log.info("tick")
    stamps = [json.loads(line)["timestamp"] for line in lines]
    assert stamps == ["2026-11-25T17:05:03.000000Z", "2026-11-25T17:05:03.500000Z",
                      "2026-11-25T17:05:04.250000Z"]
    order = TimeOrder(window=10)
    for i, ts in reversed(list(enumerate(stamps))):
        order.push({"timestamp": ts}, i)
    assert order.drain() == [0, 1, 2]
    assert parse_ts(stamps[0]) == datetime.fromtimestamp(whole, UTC)
    monkeypatch.undo()  # the real clock: a stamp within seconds of now
    log.info("now")
    got = parse_ts(json.loads(lines[-1])["timestamp"])
    assert got is not None and abs(got.timestamp() - time.time()) < 5
