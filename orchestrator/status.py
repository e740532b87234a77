"""Owns what `orchestrator status` shows: a run's task tree, attempts, times and token costs (pure).

`build_status` folds the journal's rows (runs, tasks, attempts, requests) into frozen values;
`render_text` and `to_json` turn those into what the user reads. No I/O and no clock here:
the caller passes `now`, so a status taken while a run is going is rendered like any other.

Times: attempt rows carry wall-clock times (time.time()), task rows carry the scheduler's
clock (trio.current_time(), not wall time), so every time shown comes from attempts (or, for a
task that never ran, the wall time its row was last written).
"""

from __future__ import annotations

import datetime as _dt
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import attrs

from orchestrator import runlock

TERMINAL = frozenset({"succeeded", "failed", "cancelled", "not_run"})
# The order states are counted in, in the header line.
STATE_ORDER = ("succeeded", "failed", "cancelled", "not_run", "running", "queued", "fanned",
               "backoff", "ready", "waiting")
ERROR_WIDTH = 70  # characters of an error shown in the table; --json has it whole


def _num(v: Any) -> float:
    return float(v) if isinstance(v, int | float) and not isinstance(v, bool) else 0.0


@attrs.frozen(kw_only=True)
class Usage:
    """Model turns, tokens and cost of one attempt, one task, a subtree or a run."""

    turns: int = 0
    input_tokens: int = 0
    cached_tokens: int = 0
    output_tokens: int = 0
    cost_usd: float = 0.0

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | None) -> Usage:
        """From a journaled `usage` dict (supervisor `_usage`); missing or odd values count 0."""
        if not isinstance(d, Mapping):
            return cls()
        return cls(turns=int(_num(d.get("turns"))), input_tokens=int(_num(d.get("input_tokens"))),
                   cached_tokens=int(_num(d.get("cached_tokens"))),
                   output_tokens=int(_num(d.get("output_tokens"))),
                   cost_usd=_num(d.get("cost_usd")))

    def __add__(self, other: Usage) -> Usage:
        return Usage(turns=self.turns + other.turns,
                     input_tokens=self.input_tokens + other.input_tokens,
                     cached_tokens=self.cached_tokens + other.cached_tokens,
                     output_tokens=self.output_tokens + other.output_tokens,
                     cost_usd=self.cost_usd + other.cost_usd)

    @property
    def empty(self) -> bool:
        return not (self.turns or self.input_tokens or self.output_tokens or self.cost_usd)

    def to_dict(self) -> dict[str, Any]:
        return {"turns": self.turns, "input_tokens": self.input_tokens,
                "cached_tokens": self.cached_tokens, "output_tokens": self.output_tokens,
                "cost_usd": round(self.cost_usd, 6)}


def _sum(usages: Iterable[Usage]) -> Usage:
    total = Usage()
    for u in usages:
        total = total + u
    return total


@attrs.frozen(kw_only=True)
class AttemptStatus:
    attempt: int
    state: str  # queued | running | succeeded | failed | cancelled | lost
    worker_id: str | None
    started: float | None  # wall clock
    ended: float | None
    error: str | None
    stopped_at: str | None
    usage: Usage


@attrs.frozen(kw_only=True)
class TaskStatus:
    """One task as `status` shows it. `usage` is its own attempts'; `total` adds its subtree's."""

    task_id: str
    kind: str  # task | fanout_child | dynamic
    parent: str | None
    agent: str
    state: str
    attempts: int
    failures: int
    worker: str | None
    started: float | None  # wall clock
    ended: float | None  # wall clock; None while the task is open
    error: str | None
    reason: str | None
    usage: Usage
    total: Usage
    children: tuple[str, ...]
    depth: int
    attempt_list: tuple[AttemptStatus, ...]
    result: Mapping[str, Any] | None = None  # {"text", "outputs"} once it succeeded

    def duration(self, now: float) -> float | None:
        """Seconds from the first start to the end (to `now` while open), or None."""
        if self.started is None:
            return None
        end = self.ended if self.ended is not None else (None if self.state in TERMINAL else now)
        return None if end is None else max(end - self.started, 0.0)


@attrs.frozen(kw_only=True)
class RunStatus:
    run_id: str
    name: str
    graph_path: str
    status: str  # running | succeeded | failed | cancelled | stopped (resumable)
    started: float
    ended: float | None
    reason: str | None
    tasks: tuple[TaskStatus, ...]  # tree order: each task followed by its children
    usage: Usage  # every attempt of the run
    counts: Mapping[str, int]
    requests: tuple[Mapping[str, Any], ...]  # control requests not taken yet
    now: float
    # pid of the live orchestrator holding the run (runlock), None if none does; only read
    # while the run's row says running
    orchestrator_pid: int | None = None
    # when its orchestrator was last known alive: its stamp (runlock.last_alive) or its last
    # journaled attempt start or end, whichever is later. For a run whose orchestrator is
    # gone, open times are counted to then, not to now
    last_alive: float | None = None

    @property
    def gone(self) -> bool:
        """The journal says running, but no orchestrator holds the run (killed, or its
        terminal or machine went away)."""
        return self.status == "running" and self.orchestrator_pid is None

    @property
    def clock(self) -> float:
        """What open times are counted to: now, or when a gone orchestrator was last alive
        (a task it left "running" runs no more)."""
        if self.gone and self.last_alive is not None:
            return min(max(self.last_alive, self.started), self.now)
        return self.now

    def duration(self) -> float:
        return max((self.ended if self.ended is not None else self.clock) - self.started, 0.0)


def _placeholder(task_id: str, agent: str) -> dict[str, Any]:
    return {"task_id": task_id, "kind": "task", "parent": None, "agent": agent,
            "state": "waiting", "attempt": 0, "failures": 0, "error": None, "reason": None,
            "updated": None}


def build_status(run: Mapping[str, Any], rows: Sequence[Mapping[str, Any]],
                 attempts: Sequence[Mapping[str, Any]], *, graph: Any = None,
                 name: str | None = None,
                 requests: Sequence[Mapping[str, Any]] = (), now: float,
                 orchestrator_pid: int | None = None,
                 last_alive: float | None = None) -> RunStatus:
    """Fold journal rows into a RunStatus.

    `run` is a `Journal.find_run` dict, `rows` `Journal.task_rows`, `attempts`
    `Journal.attempts`, `last_alive` the run lock's stamp (None: not asked, or no lock file),
    `graph` the run's GraphSpec (or None: its text no longer parses, or every graph task is
    a row already, which the first journal sync of a run makes so): graph tasks not journaled
    yet are shown waiting, in file order. `name` the run's name (else the graph's). Children
    (fan-out and dynamic) follow their parent; a parent's `total` includes its whole subtree.
    """
    info: dict[str, Mapping[str, Any]] = {}
    order: list[str] = []
    if graph is not None:
        for spec in graph.tasks:
            info[spec.id] = _placeholder(spec.id, spec.agent)
            order.append(spec.id)
    for r in rows:
        tid = str(r["task_id"])
        if tid not in info:
            order.append(tid)
        info[tid] = r
    by_task: dict[str, list[AttemptStatus]] = {}
    for a in sorted(attempts, key=lambda a: (str(a["task_id"]), int(a["attempt"]))):
        by_task.setdefault(str(a["task_id"]), []).append(AttemptStatus(
            attempt=int(a["attempt"]), state=str(a.get("state") or "?"),
            worker_id=a.get("worker_id"), started=a.get("started"), ended=a.get("ended"),
            error=a.get("error"), stopped_at=a.get("stopped_at"),
            usage=Usage.from_dict(a.get("usage"))))
    for tid in by_task:  # attempts whose task row was not synced yet
        if tid not in info:
            info[tid] = _placeholder(tid, "?")
            order.append(tid)

    children: dict[str, list[str]] = {}
    roots: list[str] = []
    for tid in order:
        parent = info[tid].get("parent")
        if parent is not None and parent in info and parent != tid:
            children.setdefault(str(parent), []).append(tid)
        else:
            roots.append(tid)

    built: dict[str, TaskStatus] = {}

    def build(tid: str, depth: int, seen: frozenset[str]) -> TaskStatus:
        r = info[tid]
        kids = [built[c] if c in built else build(c, depth + 1, seen | {tid})
                for c in children.get(tid, ()) if c not in seen]
        own = by_task.get(tid, [])
        usage = _sum(a.usage for a in own)
        state = str(r.get("state") or "waiting")
        error = r.get("error") or None
        if state in ("queued", "running") and own and own[-1].state == "succeeded" \
                and own[-1].attempt >= int(r.get("attempt") or 0):
            # the live attempt's success is journaled but the task row was not synced after
            # it (a crash, or the run's last step): what `resume` would restore, too
            state, error = "succeeded", None
        starts = [a.started for a in own if a.started is not None]
        ends = [a.ended for a in own if a.ended is not None]
        if not starts:  # a fan-out join never runs itself: its children's times are its own
            starts = [k.started for k in kids if k.started is not None]
            ends = [k.ended for k in kids if k.ended is not None]
        ended = None
        if state in TERMINAL:
            ended = max(ends) if ends else r.get("updated")
        workers = [a.worker_id for a in own if a.worker_id]
        if error is None and state != "succeeded" and own and own[-1].error:
            error = own[-1].error
        ts = TaskStatus(
            task_id=tid, kind=str(r.get("kind") or "task"), parent=r.get("parent"),
            agent=str(r.get("agent") or "?"), state=state,
            attempts=max(int(r.get("attempt") or 0), max((a.attempt for a in own), default=0)),
            failures=int(r.get("failures") or 0), worker=workers[-1] if workers else None,
            started=min(starts) if starts else None, ended=ended, error=error,
            reason=r.get("reason") or None, usage=usage,
            total=usage + _sum(k.total for k in kids), children=tuple(k.task_id for k in kids),
            depth=depth, attempt_list=tuple(own),
            result=r.get("result") if isinstance(r.get("result"), Mapping) else None)
        built[tid] = ts
        return ts

    flat: list[TaskStatus] = []

    def walk(tid: str) -> None:
        stack = [tid]
        while stack:
            t = built[stack.pop()]
            flat.append(t)
            stack.extend(reversed(t.children))

    for tid in roots:
        build(tid, 0, frozenset())
        walk(tid)
    counts = Counter(t.state for t in flat)
    return RunStatus(
        run_id=str(run["run_id"]),
        name=name if name is not None else graph.run.name if graph is not None else "",
        graph_path=str(run.get("graph_path") or ""), status=str(run.get("status") or "?"),
        started=float(run.get("started") or 0.0), ended=run.get("ended"),
        reason=run.get("reason"), tasks=tuple(flat),
        usage=_sum(a.usage for own in by_task.values() for a in own),
        counts={s: counts[s] for s in (*STATE_ORDER, *sorted(counts)) if counts.get(s)},
        requests=tuple(dict(q) for q in requests), now=now, orchestrator_pid=orchestrator_pid,
        # it was alive when it journaled an attempt's start or end, too
        last_alive=None if last_alive is None else max(
            [last_alive, *(x for a in attempts for x in (a.get("started"), a.get("ended"))
                           if x is not None)]))


# ---------------------------------------------------------------- formatting


def fmt_duration(s: float | None) -> str:
    if s is None:
        return "-"
    if s < 10:
        return f"{s:.2f}s"
    if s < 60:
        return f"{s:.1f}s"
    if s < 3600:
        return f"{int(s // 60)}m{int(s % 60):02d}s"
    return f"{int(s // 3600)}h{int(s % 3600 // 60):02d}m"


def fmt_tokens(n: int) -> str:
    if n < 100_000:
        return str(n)
    if n < 10_000_000:
        return f"{n / 1000:.1f}k"
    return f"{n / 1_000_000:.2f}M"


def fmt_cost(c: float) -> str:
    return f"${c:.4f}"


def fmt_clock(ts: float | None, tz: _dt.tzinfo | None) -> str:
    if ts is None:
        return "-"
    return _dt.datetime.fromtimestamp(ts, tz).strftime("%H:%M:%S")


def fmt_when(ts: float, tz: _dt.tzinfo | None) -> str:
    return _dt.datetime.fromtimestamp(ts, tz).strftime("%Y-%m-%d %H:%M:%S %Z").strip()


def _clip(text: str | None, width: int) -> str:
    if not text:
        return ""
    one = " ".join(text.split())
    return one if len(one) <= width else one[:width - 1] + "…"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]], right: set[int]) -> list[str]:
    widths = [max([len(header[i])] + [len(r[i]) for r in rows]) for i in range(len(header))]

    def line(cells: Sequence[str]) -> str:
        out = [c.rjust(w) if i in right else c.ljust(w)
               for i, (c, w) in enumerate(zip(cells, widths, strict=True))]
        return "  ".join(out).rstrip()

    return [line(header)] + [line(r) for r in rows]


def _usage_cells(u: Usage) -> list[str]:
    if u.empty:
        return ["-", "-", "-", "-"]
    return [fmt_tokens(u.input_tokens), fmt_tokens(u.cached_tokens), fmt_tokens(u.output_tokens),
            fmt_cost(u.cost_usd)]


HEADER = ("TASK", "STATE", "ATT", "WORKER", "STARTED", "ENDED", "TIME", "IN", "CACHED", "OUT",
          "COST", "ERROR")


def render_text(st: RunStatus, *, tz: _dt.tzinfo | None = None, attempts: bool = False,
                error_width: int = ERROR_WIDTH) -> str:
    """The readable status: a header, one row per task (children indented under their
    parent), every attempt with `attempts`, and the run's total."""
    head = f"run {st.run_id}"
    if st.name:
        head += f" ({st.name})"
    when = fmt_when(st.started, tz)
    dur = fmt_duration(st.duration())
    gone = st.gone
    alive = gone and st.last_alive is not None
    head += f": {st.status}, started {when}, " + (
        f"took {dur}" if st.ended is not None else
        f"its orchestrator last seen alive {dur} after" if alive else f"{dur} so far")
    lines = [head]
    if gone:
        seen = (f", within {runlock.ALIVE_EVERY_S:g}s after it was last seen; times below "
                "are counted to then" if alive else "")
        lines.append(f"orchestrator: not running (killed, or its terminal or machine went "
                     f"away{seen}): `orchestrator resume {st.run_id}` finishes the run")
    elif st.status == "stopped":
        lines.append(f"orchestrator: stopped (no worker was left, the disk refused writes, "
                     f"or the embedded sim's process exited): once the cause below is fixed, "
                     f"`orchestrator resume {st.run_id}` goes on from here")
    if st.graph_path:
        lines.append(f"graph: {st.graph_path}")
    if st.reason:
        lines.append(f"reason: {st.reason}")
    counts = ", ".join(f"{n} {s}" for s, n in st.counts.items())
    lines.append(f"tasks: {len(st.tasks)} ({counts or 'none journaled yet'})")
    for q in st.requests:
        what = q.get("kind", "?")
        if q.get("task_id"):
            what += f" {q['task_id']}"
        if q.get("arg") is not None:
            what += f" {q['arg']}"
        age = fmt_duration(max(st.now - _num(q.get("created")), 0.0))
        lines.append(f"pending request: {what} (asked {age} ago; " + (
            "`orchestrator resume` applies it)" if gone else
            "the orchestrator picks requests up within a second while it runs)"))
    lines.append("")
    rows, any_split = _rows(st.tasks, st.clock, tz=tz, attempts=attempts,
                            error_width=error_width)
    rows.append(["total", "", "", "", "", "", "", *_usage_cells(st.usage), ""])
    lines.extend(_table(HEADER, rows, right=_RIGHT))
    if any_split or any(t.children for t in st.tasks):
        lines.append("")
        lines.append("A parent's tokens and cost include its children's" + (
            "; (own) is the parent's share." if any_split else "."))
    # The table's column cuts an error where its cause often starts (after a URL, say): the
    # failed tasks' errors whole, once each.
    lines.extend(_errors_in_full([(t.task_id, t.error) for t in st.tasks
                                  if t.state == "failed" and t.error
                                  and len(t.error) > error_width]))
    return "\n".join(lines)


_RIGHT = {2, 6, 7, 8, 9, 10}  # right-aligned columns of HEADER


def _errors_in_full(errors: Sequence[tuple[str, str]]) -> list[str]:
    """Lines showing each (whose, error) whole, on one line each; none for no errors."""
    if not errors:
        return []
    return ["", "errors in full:", *(f"  {who}: {' '.join(e.split())}" for who, e in errors)]


def _rows(tasks: Sequence[TaskStatus], now: float, *, tz: _dt.tzinfo | None, attempts: bool,
          error_width: int) -> tuple[list[list[str]], bool]:
    """The table's rows for `tasks` (and their attempts), and whether any has an (own) row."""
    rows: list[list[str]] = []
    any_split = False
    for t in tasks:
        indent = "  " * t.depth
        err = t.error or (t.reason if t.state in ("cancelled", "not_run") else None)
        rows.append([indent + t.task_id, t.state, str(t.attempts) if t.attempts else "-",
                     t.worker or "-", fmt_clock(t.started, tz), fmt_clock(t.ended, tz),
                     fmt_duration(t.duration(now)), *_usage_cells(t.total),
                     _clip(err, error_width)])
        if t.children and not t.usage.empty:
            any_split = True
            rows.append([indent + "  (own)", "", "", "", "", "", "", *_usage_cells(t.usage),
                         ""])
        if attempts:
            for a in t.attempt_list:
                end = a.ended if a.ended is not None else (None if a.state in TERMINAL
                                                           else now)
                took = None if a.started is None or end is None else max(end - a.started, 0.0)
                err = a.error
                if a.stopped_at:  # where the session stopped, as its worker reported it
                    err = f"{err} (stopped at {a.stopped_at})" if err else \
                        f"stopped at {a.stopped_at}"
                rows.append([indent + f"  #{a.attempt}", a.state, "", a.worker_id or "-",
                             fmt_clock(a.started, tz), fmt_clock(a.ended, tz),
                             fmt_duration(took), *_usage_cells(a.usage),
                             _clip(err, error_width)])
    return rows, any_split


def subtree(st: RunStatus, task_id: str) -> list[TaskStatus]:
    """The task `task_id` and its descendants, in tree order ([] if the run has no such task)."""
    for i, t in enumerate(st.tasks):
        if t.task_id == task_id:
            out = [t]
            for c in st.tasks[i + 1:]:
                if c.depth <= t.depth:
                    break
                out.append(c)
            return out
    return []


def render_task(st: RunStatus, task_id: str, *, tz: _dt.tzinfo | None = None,
                error_width: int = ERROR_WIDTH) -> str:
    """One task in full: its row, its children's and every attempt; its error whole; its
    answer and the names of its outputs (what downstream prompts can reference)."""
    tasks = subtree(st, task_id)
    t = tasks[0]
    head = f"task {t.task_id} (agent {t.agent}) in run {st.run_id}: {t.state}"
    if t.reason and t.state in ("cancelled", "not_run"):
        head += f" ({t.reason})"
    lines = [head, ""]
    rows, any_split = _rows(tasks, st.clock, tz=tz, attempts=True, error_width=error_width)
    lines.extend(_table(HEADER, rows, right=_RIGHT))
    if any_split:
        lines.extend(["", "A parent's tokens and cost include its children's; (own) is the "
                      "parent's share."])
    # here every cut error is shown whole: the attempts' are the causes
    lines.extend(_errors_in_full([(f"{c.task_id} #{a.attempt}", a.error) for c in tasks
                                  for a in c.attempt_list
                                  if a.error and len(a.error) > error_width]))
    lines.append("")
    if t.result is None:
        lines.append(f"answer: none ({t.state})")
        return "\n".join(lines)
    text = str(t.result.get("text") or "")
    lines.append("answer:" if text else "answer: (empty)")
    lines.extend(f"  {line}" for line in text.splitlines())
    outputs = t.result.get("outputs")
    if isinstance(outputs, Mapping) and outputs:
        lines.append(f"outputs: {', '.join(map(str, outputs))} "
                     f"(downstream prompts use {{{{ {t.task_id}.outputs.KEY }}}})")
    elif isinstance(outputs, list):
        lines.append(f"outputs: a list of {len(outputs)}, one per child, in item order "
                     f"({{{{ {t.task_id}.outputs }}}})")
    return "\n".join(lines)


def to_json(st: RunStatus) -> dict[str, Any]:
    """The machine form: the run, then every task in tree order with its attempts."""
    return {
        "run": {"run_id": st.run_id, "name": st.name, "graph_path": st.graph_path,
                "status": st.status, "started": st.started, "ended": st.ended,
                "duration_s": round(st.duration(), 3), "reason": st.reason,
                "counts": dict(st.counts), "usage": st.usage.to_dict(),
                "orchestrator_pid": st.orchestrator_pid,
                "last_alive": st.last_alive if st.gone else None},
        "tasks": [{
            "task_id": t.task_id, "kind": t.kind, "parent": t.parent, "agent": t.agent,
            "state": t.state, "attempts": t.attempts, "failures": t.failures,
            "worker": t.worker, "started": t.started, "ended": t.ended,
            "duration_s": None if (d := t.duration(st.clock)) is None else round(d, 3),
            "error": t.error, "reason": t.reason, "usage": t.usage.to_dict(),
            "total_usage": t.total.to_dict(), "children": list(t.children), "depth": t.depth,
            "result": None if t.result is None else dict(t.result),
            "attempt_list": [{
                "attempt": a.attempt, "state": a.state, "worker": a.worker_id,
                "started": a.started, "ended": a.ended, "error": a.error,
                "stopped_at": a.stopped_at, "usage": a.usage.to_dict()}
                for a in t.attempt_list],
        } for t in st.tasks],
        "pending_requests": [dict(q) for q in st.requests],
        "now": st.now,
    }


def render_runs(runs: Sequence[Mapping[str, Any]], *, tz: _dt.tzinfo | None = None,
                now: float) -> str:
    """`status --runs`: one line per run, newest first."""
    rows = []
    for r in runs:
        started = float(r.get("started") or 0.0)
        ended = r.get("ended")
        summary = r.get("summary") or {}
        total = ((summary.get("usage") or {}).get("total") or {}) if isinstance(
            summary, Mapping) else {}
        rows.append([str(r["run_id"]), str(r.get("status")), fmt_when(started, tz),
                     fmt_duration(max((ended if ended is not None else now) - started, 0.0)),
                     fmt_cost(_num(total.get("cost_usd"))) if total else "-",
                     str(r.get("graph_path") or "")])
    if not rows:
        return "no runs yet: start one with `orchestrator run FILE`"
    return "\n".join(_table(("RUN", "STATUS", "STARTED", "TIME", "COST", "GRAPH"), rows,
                            right={3, 4}))
