"""Owns reading a run's gathered log lines: filtering and readable rendering (no I/O loops)."""

from __future__ import annotations

import heapq
import json
import re
from datetime import UTC, datetime, timedelta, tzinfo
from typing import Any

import attrs

LEVELS = {"debug": 10, "info": 20, "warning": 30, "error": 40, "critical": 50}
_DUR = re.compile(r"^(\d+(?:\.\d+)?)(ms|s|m|h|d)$")
_UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400}
# Keys shown in the line's prefix rather than in its key=value tail.
_PREFIX_KEYS = ("timestamp", "level", "event", "logger", "run_id", "task_id", "attempt",
                "agent_id", "worker_id", "turn")


class LogFilterError(ValueError):
    """A filter argument is malformed (the user's fault: the message says what to write)."""


@attrs.frozen(kw_only=True)
class LogFilter:
    task: str | None = None
    agent: str | None = None
    min_level: int = 0
    since: datetime | None = None
    # with `agent`: the tasks it ran, so lines that name only a task (the orchestrator's) count
    agent_tasks: frozenset[str] = frozenset()

    @classmethod
    def build(cls, *, task: str | None, agent: str | None, level: str | None,
              since: str | None, now: datetime | None = None,
              tz: tzinfo | None = None) -> LogFilter:
        lvl = 0
        if level:
            if level.lower() not in LEVELS:
                raise LogFilterError(f"--level {level!r}: use one of {', '.join(LEVELS)}")
            lvl = LEVELS[level.lower()]
        return cls(task=task, agent=agent, min_level=lvl,
                   since=parse_since(since, now, tz) if since else None)

    def accepts(self, rec: dict[str, Any]) -> bool:
        if self.task is not None and rec.get("task_id") != self.task:
            tid = rec.get("task_id")
            # fan-out children are TASK[i], spawned ones TASK/n (and theirs TASK/n/m, ...)
            if not (isinstance(tid, str) and tid.startswith((self.task + "[", self.task + "/"))):
                return False
        if self.agent is not None and rec.get("agent_id") != self.agent and not (
                rec.get("agent_id") is None and rec.get("task_id") in self.agent_tasks):
            return False
        if self.min_level and LEVELS.get(str(rec.get("level", "info")), 20) < self.min_level:
            return False
        if self.since is not None:
            ts = parse_ts(rec.get("timestamp"))
            if ts is None or ts < self.since:
                return False
        return True


def parse_ts(value: Any) -> datetime | None:
    if not isinstance(value, str):
        return None
    try:
        ts = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    return ts if ts.tzinfo else ts.replace(tzinfo=UTC)


_CLOCK = re.compile(r"^\d{1,2}:\d{2}(:\d{2}(\.\d+)?)?$")


def parse_since(text: str, now: datetime | None = None, tz: tzinfo | None = None) -> datetime:
    """`--since` takes a duration back from now ("90s", "5m", "2h"), an ISO time (without a
    zone: in `tz`, the local zone when None, as `logs` and `status` print times), or a time of
    day as `logs` prints it (today's, in `tz`)."""
    given = text = text.strip()
    m = _DUR.match(text)
    if m:
        now = now or datetime.now(UTC)
        try:
            return now - timedelta(seconds=float(m.group(1)) * _UNITS[m.group(2)])
        except OverflowError:  # further back than datetime goes: every line is newer
            return datetime.min.replace(tzinfo=UTC)
    if _CLOCK.match(text):
        now = (now or datetime.now(UTC)).astimezone(tz)
        hour, rest = text.split(":", 1)
        text = f"{now.date().isoformat()}T{int(hour):02d}:{rest}"
    try:
        ts = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise LogFilterError(
            f"--since {given!r}: write a duration back from now (250ms, 90s, 5m, 2h, 1d), "
            "an ISO time such as 2026-11-24T21:00:00Z, or a time of day such as 21:00:00"
        ) from None
    if ts.tzinfo is None:  # a zone-less time is in `tz`, the local zone when None
        ts = ts.astimezone() if tz is None else ts.replace(tzinfo=tz)
    return ts


def parse_line(line: bytes | str) -> dict[str, Any] | None:
    """One JSON log line as a dict, or None for a line that is not a JSON object."""
    try:
        rec = json.loads(line)
    except ValueError:
        return None
    return rec if isinstance(rec, dict) else None


def render(rec: dict[str, Any], tz: tzinfo | None = None) -> str:
    """A readable one-line form: time (in `tz`, the local zone when None, as `status` shows
    times), level, where (task/attempt/agent/worker), event, rest."""
    when = parse_ts(rec.get("timestamp"))
    ts = when.astimezone(tz).strftime("%H:%M:%S.%f")[:12] if when is not None else ""
    level = str(rec.get("level", "")).upper()
    level = {"WARNING": "WARN", "CRITICAL": "CRIT"}.get(level, level)[:5]
    where = []
    if rec.get("task_id"):  # a task-level line (no attempt) shows the task alone
        attempt = rec.get("attempt")
        where.append(f"{rec['task_id']}#{attempt}" if attempt is not None else rec["task_id"])
    if rec.get("agent_id"):
        where.append(str(rec["agent_id"]))
    if rec.get("worker_id"):
        where.append(f"@{rec['worker_id']}")
    if rec.get("turn") is not None:
        where.append(f"turn {rec['turn']}")
    rest = " ".join(f"{k}={_fmt(v)}" for k, v in rec.items() if k not in _PREFIX_KEYS)
    return f"{ts} {level:<5} [{' '.join(where) or '-'}] {rec.get('event', '')} {rest}".rstrip()


def _fmt(v: Any) -> str:
    if isinstance(v, str):
        return v if v and " " not in v else json.dumps(v)
    return json.dumps(v, default=str)


# Lines a process wrote reach the run's log in batches (workers ship theirs over the bus), so
# the file is in arrival order: a worker's task.start can land after the orchestrator's
# task.result for it. This many lines are held to put them back in time order.
REORDER_WINDOW = 10_000


class TimeOrder:
    """Releases records in timestamp order, holding at most `window` of them (a record that
    arrives later than that many newer ones is released late, never lost)."""

    def __init__(self, window: int = REORDER_WINDOW) -> None:
        self.window = window
        self._heap: list[tuple[str, int, Any]] = []
        self._n = 0
        self._last = ""

    def push(self, rec: dict[str, Any], item: Any) -> list[Any]:
        """Add `item` (for record `rec`); returns the items now due, oldest first."""
        ts = rec.get("timestamp")
        self._last = ts if isinstance(ts, str) else self._last  # a line without one stays put
        self._n += 1
        heapq.heappush(self._heap, (self._last, self._n, item))
        if len(self._heap) > self.window:
            return [heapq.heappop(self._heap)[2]]
        return []

    def drain(self) -> list[Any]:
        """Every item still held, oldest first."""
        return [heapq.heappop(self._heap)[2] for _ in range(len(self._heap))]
