"""Pins bus.logs: loggers made at import follow the configuration set later; ids reach lines."""

import json

import structlog

from bus.logs import configure_logging, get_logger, level_number

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


def test_unknown_level_names_the_allowed_ones():
    try:
        level_number("loud")
    except ValueError as exc:
        assert "debug" in str(exc) and "loud" in str(exc)
    else:
        raise AssertionError("no error for an unknown level")
