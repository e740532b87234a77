"""Owns what runs when: the ready set, fan-out and join, dynamic children, retries, timeouts.

Pure: no I/O, no trio, time comes in as floats. The supervisor feeds it events (`on_*`) and
carries out the actions it returns (`next_actions`). See docs/scheduler.md.

Every state transition lives in this file. Task states:
  waiting   needs something that has not succeeded yet
  ready     may start (queued in order); `backoff` is ready but not before `ready_at`
  queued    a StartAttempt was handed out; counts against max_concurrent
  running   the supervisor said it started (`on_started`); has a deadline
  fanned    a fan-out task whose children run; joins when all of them are terminal
  succeeded / failed / cancelled / not_run   terminal
An attempt is *live* iff its StartAttempt was handed out and no result, loss, timeout or cancel
ended it. Only the live attempt of a task may report; anything else is stale and refused.
"""

from __future__ import annotations

import functools
import heapq
import math
import random
from collections import Counter, deque
from collections.abc import Iterable, Mapping
from typing import Any

import attrs

from orchestrator.graph import GraphSpec, RenderError, TaskSpec, references, render_prompt

TERMINAL = frozenset({"succeeded", "failed", "cancelled", "not_run"})
# the reason given to dynamic children cancelled because the parent attempt that spawned them
# ended without succeeding (failed, timed out, lost): the parent's next attempt starts fresh
# and never inherits them, and they do not count against the run's outcome
SUPERSEDED = "superseded: "


class SchedulerError(Exception):
    """The caller asked for something impossible (unknown task, finished parent, bad agent)."""


@attrs.frozen(kw_only=True)
class StartAttempt:
    task_id: str
    attempt: int
    agent: str
    prompt: str
    timeout_s: float
    parent: str | None = None


@attrs.frozen(kw_only=True)
class CancelAttempt:
    task_id: str
    attempt: int
    reason: str


Action = StartAttempt | CancelAttempt


@attrs.frozen(kw_only=True)
class TaskView:
    """A snapshot of one task, as the journal stores it and `restore` reads it back."""

    task_id: str
    kind: str  # "task" | "fanout_child" | "dynamic"
    parent: str | None
    agent: str
    state: str
    attempt: int  # the number of attempts handed out so far
    failures: int
    prompt: str | None = None  # the rendered prompt of children (graph tasks render from graph)
    item: Any = None
    result: dict[str, Any] | None = None
    error: str | None = None
    reason: str | None = None
    started: float | None = None
    ended: float | None = None

    def to_record(self) -> dict[str, Any]:
        return attrs.asdict(self)


class TaskStates(dict[str, TaskView]):
    """task id -> TaskView, plus `log`: task ids in the order they changed (append-only)."""

    log: list[str]


@attrs.define
class _Task:
    id: str
    kind: str
    agent: str
    parent: str | None
    needs: tuple[str, ...]
    retries: int
    timeout_s: float
    spec: TaskSpec | None = None
    prompt: str | None = None
    item: Any = None
    state: str = "waiting"
    attempt: int = 0
    live: bool = False
    failures: int = 0
    ready_at: float = 0.0
    deadline: float | None = None
    started: float | None = None
    ended: float | None = None
    result: dict[str, Any] | None = None
    error: str | None = None
    reason: str | None = None
    children: list[str] = attrs.Factory(list)  # fan-out children, in item order
    dynamic: list[str] = attrs.Factory(list)
    # Dynamic children the live attempt asked for (spawned or adopted), in order; and those a
    # lost attempt (dead worker, dead orchestrator) had asked for, which the next attempt takes
    # back instead of running again when it asks for the same ones in the same order.
    spawns: list[str] = attrs.Factory(list)
    adopt: list[str] = attrs.Factory(list)
    view: TaskView | None = None


class Scheduler:
    """Decides what runs when for one run of `graph`. Deterministic for a given seed."""

    def __init__(self, graph: GraphSpec, *, seed: int = 0) -> None:
        self.graph = graph
        self.last_spawn_adopted = False  # spawn_child's last answer was a lost attempt's child
        self.spawned = 0  # dynamic children in the run (restored ones included)
        self.seed = seed
        self._run = graph.run
        self._tasks: dict[str, _Task] = {}
        self._dependents: dict[str, list[str]] = {}
        self._ready: deque[str] = deque()  # graph tasks and fan-out children, in order
        self._ready_dyn: deque[str] = deque()  # dynamic children: not held to max_concurrent
        self._open = 0  # tasks not in a terminal state
        self._counts: Counter[str] = Counter()
        self._log: list[str] = []  # ids of tasks as they change (append-only; for the journal)
        self._dirty: set[str] = set()
        self._views = TaskStates()
        self._views.log = self._log
        self._backoff: list[tuple[float, str, int]] = []  # (ready_at, task, failures)
        self._deadlines: list[tuple[float, str, int]] = []  # (deadline, task, attempt)
        self._out: list[Action] = []
        self._active = 0  # live attempts of tasks that count against max_concurrent
        self.cancel_reason: str | None = None
        self.stop_reason: str | None = None
        for spec in graph.tasks:
            t = _Task(id=spec.id, kind="task", agent=spec.agent, parent=None, needs=spec.needs,
                      retries=spec.retries, timeout_s=spec.timeout_s, spec=spec)
            self._add(t)
            for n in spec.needs:
                self._dependents.setdefault(n, []).append(spec.id)
        for spec in graph.tasks:
            if not spec.needs:
                self._make_ready(self._tasks[spec.id], 0.0)

    # ------------------------------------------------------------ queries

    @property
    def done(self) -> bool:
        """True iff every task is terminal (nothing runs or will run)."""
        return self._open == 0

    def outcome(self) -> str:
        """"succeeded" iff every task succeeded; "cancelled" after cancel_all; else "failed"
        if any task failed, else "cancelled"."""
        if self.cancel_reason is not None:
            return "cancelled"
        states = {t.state for t in self._tasks.values() if not _superseded(t)}
        if states <= {"succeeded"}:
            return "succeeded"
        return "failed" if "failed" in states or self.stop_reason else "cancelled"

    def total(self) -> int:
        return len(self._tasks)

    def counts(self) -> dict[str, int]:
        return {k: v for k, v in self._counts.items() if v}

    def is_current(self, task_id: str, attempt: int) -> bool:
        """True iff `attempt` is the live attempt of `task_id`."""
        t = self._tasks.get(task_id)
        return t is not None and t.live and t.attempt == attempt

    def was_attempt(self, task_id: str, attempt: int) -> bool:
        """True iff `attempt` of `task_id` was started and is no longer live (it ended, or was
        closed as lost: by a dead worker, or by a resume)."""
        t = self._tasks.get(task_id)
        return t is not None and 1 <= attempt <= t.attempt and not (t.live and
                                                                     t.attempt == attempt)

    def task_states(self) -> TaskStates:
        """Snapshots of every task (a read-only view, updated in place by later calls).

        A task's snapshot object is replaced only when the task changed; `.log` lists task ids
        in the order they changed, so a consumer can pick up only what changed (the journal
        does). Cost is proportional to the tasks changed since the last call.
        """
        for tid in self._dirty:
            t = self._tasks[tid]
            t.view = TaskView(task_id=t.id, kind=t.kind, parent=t.parent, agent=t.agent,
                              state=t.state, attempt=t.attempt, failures=t.failures,
                              prompt=t.prompt, item=t.item, result=t.result, error=t.error,
                              reason=t.reason, started=t.started, ended=t.ended)
            self._views[tid] = t.view
        self._dirty.clear()
        return self._views

    def task_result(self, task_id: str) -> dict[str, Any] | None:
        t = self._tasks.get(task_id)
        if t is None:
            return None
        r = t.result or {}
        return {"state": t.state, "text": r.get("text"), "outputs": r.get("outputs"),
                "error": t.error or t.reason}

    def next_wakeup(self) -> float | None:
        """The earliest time something changes on its own: a backoff ends or a deadline passes."""
        self._prune()
        times = [h[0][0] for h in (self._backoff, self._deadlines) if h]
        return min(times) if times else None

    # ------------------------------------------------------------ actions

    def next_actions(self, now: float) -> list[Action]:
        """Cancels to send, then attempts to start (up to max_concurrent live attempts)."""
        while self._backoff and self._backoff[0][0] <= now:
            _, tid, failures = heapq.heappop(self._backoff)
            t = self._tasks[tid]
            if t.state == "backoff" and t.failures == failures:
                self._set(t, "ready")
                self._enqueue(t)
        out, self._out = self._out, []
        while self._ready_dyn or (self._ready and self._active < self._run.max_concurrent):
            queue = self._ready_dyn if self._ready_dyn else self._ready
            tid = queue.popleft()
            t = self._tasks[tid]
            if t.state != "ready":
                continue
            counts = t.kind != "dynamic"
            prompt = self._render(t, now)
            if prompt is None:
                continue  # the task failed for good: its references cannot be filled
            t.attempt += 1
            t.live = True
            if counts:
                self._active += 1
            self._set(t, "queued")
            out.append(StartAttempt(task_id=t.id, attempt=t.attempt, agent=t.agent,
                                    prompt=prompt, timeout_s=t.timeout_s, parent=t.parent))
        out.extend(self._out)
        self._out = []
        return out

    # ------------------------------------------------------------ events from the supervisor

    def on_started(self, task_id: str, attempt: int, now: float) -> bool:
        t = self._current(task_id, attempt)
        if t is None:
            return False
        self._set(t, "running")
        t.started = now
        t.deadline = now + t.timeout_s
        heapq.heappush(self._deadlines, (t.deadline, t.id, t.attempt))
        return True

    def on_succeeded(self, task_id: str, attempt: int, result: Mapping[str, Any],
                     now: float) -> bool:
        t = self._current(task_id, attempt)
        if t is None:
            return False
        self._end_attempt(t, now)
        self._succeed(t, {"text": result.get("text", ""), "outputs": result.get("outputs") or {}},
                      now)
        return True

    def on_failed(self, task_id: str, attempt: int, error: str, now: float, *,
                  retryable: bool = True) -> bool:
        t = self._current(task_id, attempt)
        if t is None:
            return False
        self._end_attempt(t, now)
        self._drop_children(t, f"attempt {attempt} failed", now)
        self._fail_attempt(t, error, now, retryable=retryable)
        return True

    def on_lost(self, task_id: str, attempt: int, now: float) -> bool:
        """The worker died or refused: run the task again at once, without spending a retry.
        Children the lost attempt spawned that finished are handed to the next attempt when it
        spawns the same ones again (spawn_child); open ones are cancelled and run anew."""
        t = self._current(task_id, attempt)
        if t is None:
            return False
        # what it asked for, then what it had yet to ask for again (if it was adopting)
        lost_spawns, t.adopt = t.spawns + t.adopt, []
        self._end_attempt(t, now)
        self._drop_children(t, f"attempt {attempt} was lost", now)
        t.adopt = lost_spawns
        self._set(t, "ready")
        self._enqueue(t, front=True)
        return True

    def on_cancelled(self, task_id: str, attempt: int, error: str, now: float) -> bool:
        """A live attempt reported cancelled without our asking (its worker shut down): lost."""
        return self.on_lost(task_id, attempt, now)

    def check_timeouts(self, now: float) -> list[str]:
        """Fail every running attempt past its deadline (retried per policy); returns task ids."""
        hit = []
        while self._deadlines and self._deadlines[0][0] <= now:
            _, tid, attempt = heapq.heappop(self._deadlines)
            t = self._tasks[tid]
            if not (t.live and t.attempt == attempt and t.state == "running"):
                continue
            why = f"timed out after {_fmt_s(t.timeout_s)}"
            self._out.append(CancelAttempt(task_id=tid, attempt=attempt, reason=why))
            self._end_attempt(t, now)
            self._drop_children(t, f"attempt {attempt} {why}", now)
            self._fail_attempt(t, why, now, retryable=True)
            hit.append(tid)
        return hit

    # ------------------------------------------------------------ cancellation

    def cancel(self, task_id: str, reason: str, now: float) -> list[str]:
        """Cancel a task and its subtree (fan-out and dynamic children); tasks that need any
        of them become not_run. Returns the ids that were cancelled."""
        t = self._tasks.get(task_id)
        if t is None:
            raise SchedulerError(f"no task {task_id!r} in this run")
        done: list[str] = []
        self._cancel_tree(t, reason, now, done)
        return done

    def cancel_all(self, reason: str, now: float) -> None:
        """Cancel the run: every live attempt gets a CancelAttempt, every open task ends."""
        if self.cancel_reason is None:
            self.cancel_reason = reason
        for t in list(self._tasks.values()):
            if t.state not in TERMINAL:
                self._terminate(t, "cancelled", reason, now)

    # ------------------------------------------------------------ dynamic children

    def spawn_child(self, parent_id: str, *, prompt: str, agent: str | None, now: float,
                    task_id: str | None = None) -> str:
        """Add a dynamic child of a running task; it is ready at once. Returns its id.

        Dynamic children do not count against max_concurrent: their parent holds a slot and
        may be waiting for them. Raises SchedulerError if the parent is unknown or finished,
        or the agent is not in the graph.
        """
        p = self._tasks.get(parent_id)
        if p is None:
            raise SchedulerError(f"spawn: no task {parent_id!r} in this run")
        if p.state in TERMINAL:
            raise SchedulerError(f"spawn: parent {parent_id!r} already ended ({p.state})")
        agent = agent or p.agent
        if agent not in self.graph.agents:
            raise SchedulerError(f"spawn: no agent {agent!r} in the graph (have: "
                                 f"{', '.join(sorted(self.graph.agents))})")
        if p.adopt and task_id is None:
            # a re-run of a lost attempt: its k-th spawn is the lost attempt's k-th child when
            # it asks for the same work; that child's result (or its run in progress) stands
            c = self._tasks[p.adopt.pop(0)]
            if (c.agent, c.prompt) != (agent, prompt):
                self._release_adopted(p, "asked for other work", now)
            elif c.state not in ("failed", "cancelled", "not_run"):
                p.spawns.append(c.id)
                self.last_spawn_adopted = True
                return c.id
        self.last_spawn_adopted = False
        if task_id is None:  # a new spawn (a resume restores the journal's without limits)
            self._check_spawn_limits(p)
        cid = self._new_dynamic(p, prompt=prompt, agent=agent, now=now, task_id=task_id)
        p.spawns.append(cid)
        return cid

    def _check_spawn_limits(self, p: _Task) -> None:
        depth, t = 1, p
        while t.kind == "dynamic" and t.parent is not None:
            depth += 1
            t = self._tasks[t.parent]
        limit = self._run.max_spawn_depth
        if depth > limit:
            raise SchedulerError(
                f"spawn: {p.id!r} is a child {depth - 1} levels deep and [run] max_spawn_depth "
                f"is {limit}: do this work here instead of in another child (or raise "
                "max_spawn_depth in the graph's [run] table)")
        if self.spawned >= self._run.max_spawned:
            raise SchedulerError(
                f"spawn: this run already spawned {self.spawned} children, its [run] "
                "max_spawned: do the rest of the work here (or raise max_spawned in the "
                "graph's [run] table)")

    def descends_from(self, task_id: str, ancestor: str) -> bool:
        """True iff `task_id` is a fan-out or spawned child of `ancestor`, at any depth."""
        t = self._tasks.get(task_id)
        while t is not None and t.parent is not None:
            if t.parent == ancestor:
                return True
            t = self._tasks.get(t.parent)
        return False

    def _release_adopted(self, p: _Task, why: str, now: float) -> None:
        """Children of a lost attempt that the attempt re-running it did not ask for again:
        cancel the open ones (superseded), keep what finished."""
        left, p.adopt = p.adopt, []
        for cid in left:
            c = self._tasks[cid]
            if c.state not in TERMINAL:
                self._cancel_tree(c, f"{SUPERSEDED}parent {p.id}'s new attempt {why}", now, [])

    def _new_dynamic(self, p: _Task, *, prompt: str, agent: str, now: float,
                     task_id: str | None) -> str:
        cid = task_id or f"{p.id}/{len(p.dynamic) + 1}"
        c = _Task(id=cid, kind="dynamic", agent=agent, parent=p.id, needs=(),
                  retries=self._run.retries, timeout_s=self._run.timeout_s, prompt=prompt)
        self._add(c)
        self.spawned += 1
        p.dynamic.append(cid)
        self._touch(p)
        self._make_ready(c, now)
        return cid

    def add_children(self, parent_id: str, specs: Iterable[Mapping[str, Any]],
                     now: float) -> list[str]:
        """spawn_child for each {"prompt": ..., "agent": ...}; returns the new ids."""
        return [self.spawn_child(parent_id, prompt=str(s.get("prompt", "")),
                                 agent=s.get("agent"), now=now) for s in specs]

    # ------------------------------------------------------------ resume

    @classmethod
    def restore(cls, graph: GraphSpec, records: Iterable[Mapping[str, Any] | TaskView], *,
                seed: int = 0) -> Scheduler:
        """Rebuild from journaled task snapshots (TaskView.to_record() dicts).

        Succeeded tasks keep their results and are not run again; failed, cancelled and
        not_run tasks stay as they were; anything in flight runs again with the next attempt
        number (so a late result from before the crash is refused), without spending a retry.
        Fan-out children are re-created from their upstream's journaled result.
        """
        s = cls(graph, seed=seed)
        recs = {}
        for r in records:
            d = r.to_record() if isinstance(r, TaskView) else dict(r)
            recs[d["task_id"]] = d
        applied: set[str] = set()
        # successes (and in-flight records) first, to a fixpoint: each may unlock fan-outs and
        # dynamic children; then cancels, then failures, so a stop policy re-applied by a
        # failure cannot overwrite what the journal says
        for phase in ("succeeded", "cancelled", "failed"):
            changed = True
            while changed:
                changed = False
                for tid, r in recs.items():
                    state = r.get("state")
                    if tid in applied or (state in ("failed", "cancelled") and state != phase) \
                            or (phase != "succeeded" and state != phase):
                        continue
                    if tid not in s._tasks:
                        parent = r.get("parent")
                        if r.get("kind") != "dynamic" or parent not in s._tasks:
                            continue
                        s._new_dynamic(s._tasks[parent], prompt=r.get("prompt") or "",
                                       agent=r.get("agent") or s._tasks[parent].agent,
                                       now=0.0, task_id=tid)
                    t = s._tasks[tid]
                    if t.state == "waiting" and state == "succeeded":
                        continue  # its inputs are restored later in this loop
                    t.attempt = max(t.attempt, int(r.get("attempt") or 0))
                    t.failures = int(r.get("failures") or 0)
                    s._touch(t)
                    if t.state == "fanned" or t.state in TERMINAL:
                        pass  # a join derives its state from its children
                    elif state == "succeeded":
                        s._succeed(t, r.get("result") or {"text": "", "outputs": {}}, 0.0)
                    elif state == "failed":
                        s._final_fail(t, r.get("error") or "failed", 0.0)
                    elif state == "cancelled":
                        s._cancel_tree(t, r.get("reason") or "cancelled", 0.0, [])
                    applied.add(tid)
                    changed = True
        # a task in flight when the orchestrator died runs again: its next attempt takes back
        # the children the lost one spawned (those not superseded by an earlier failure)
        for t in s._tasks.values():
            t.dynamic.sort(key=functools.partial(_spawn_ordinal, t.id))  # journal order
            if t.dynamic and t.state not in TERMINAL:
                t.adopt = [c for c in t.dynamic if not _superseded(s._tasks[c])]
        s._out = []  # nothing was live before the restore
        return s

    # ------------------------------------------------------------ internals

    def _add(self, t: _Task) -> None:
        self._tasks[t.id] = t
        self._open += 1
        self._counts[t.state] += 1
        self._touch(t)

    def _touch(self, t: _Task) -> None:
        if t.id not in self._dirty:
            self._dirty.add(t.id)
            self._log.append(t.id)
        t.view = None

    def _enqueue(self, t: _Task, *, front: bool = False) -> None:
        q = self._ready_dyn if t.kind == "dynamic" else self._ready
        if front:
            q.appendleft(t.id)
        else:
            q.append(t.id)

    def _set(self, t: _Task, state: str) -> None:
        self._counts[t.state] -= 1
        self._counts[state] += 1
        if t.state not in TERMINAL and state in TERMINAL:
            self._open -= 1
        elif t.state in TERMINAL and state not in TERMINAL:
            self._open += 1
        t.state = state
        self._touch(t)

    def _current(self, task_id: str, attempt: int) -> _Task | None:
        t = self._tasks.get(task_id)
        if t is None or not t.live or t.attempt != attempt:
            return None
        return t

    def _end_attempt(self, t: _Task, now: float) -> None:
        t.live = False
        t.deadline = None
        t.spawns = []
        if t.adopt:
            self._release_adopted(t, "ended without asking for them", now)
        if t.kind != "dynamic":
            self._active -= 1

    def _make_ready(self, t: _Task, now: float) -> None:
        spec = t.spec
        if spec is not None and spec.fan_out is not None:
            self._expand(t, spec, now)
            return
        self._set(t, "ready")
        self._enqueue(t)

    def _context(self, t: _Task) -> dict[str, Any]:
        """The results a task's prompt refers to (validation made sure they are upstream)."""
        ctx: dict[str, Any] = {}
        spec = t.spec
        if spec is not None:
            for ref, _ in references(spec.prompt):
                head = ref.split(".", 1)[0]
                u = self._tasks.get(head)
                if u is not None and u.result is not None:
                    ctx[head] = u.result
        return ctx

    def _render(self, t: _Task, now: float) -> str | None:
        if t.prompt is not None:
            return t.prompt
        assert t.spec is not None
        try:
            return render_prompt(t.spec.prompt, self._context(t))
        except RenderError as exc:
            self._final_fail(t, f"prompt: {exc}", now)
            return None

    def _expand(self, t: _Task, spec: TaskSpec, now: float) -> None:
        src = spec.fan_out_source
        assert src is not None
        up = self._tasks[src[0]].result or {}
        outputs = up.get("outputs")
        items = outputs.get(src[1]) if isinstance(outputs, Mapping) else None
        if not isinstance(items, list):
            self._final_fail(t, f"fan_out: {spec.fan_out} is not a list in {src[0]}'s result "
                             f"(got {type(items).__name__})", now)
            return
        self._set(t, "fanned")
        t.started = now
        ctx = self._context(t)
        for i, item in enumerate(items):
            cid = f"{t.id}[{i}]"
            try:
                prompt: str | None = render_prompt(spec.prompt, {**ctx, "item": item})
            except RenderError as exc:
                prompt = None
                err = f"prompt: {exc}"
            c = _Task(id=cid, kind="fanout_child", agent=t.agent, parent=t.id, needs=(),
                      retries=t.retries, timeout_s=t.timeout_s, prompt=prompt or "", item=item)
            self._add(c)
            t.children.append(cid)
            if prompt is None:
                self._final_fail(c, err, now)
            else:
                self._set(c, "ready")
                self._enqueue(c)
        self._maybe_join(t, now)

    def _maybe_join(self, t: _Task, now: float) -> None:
        if t.state != "fanned":
            return
        kids = [self._tasks[c] for c in t.children]
        if any(k.state not in TERMINAL for k in kids):
            return
        bad = [k for k in kids if k.state != "succeeded"]
        if not bad:
            results = [k.result or {} for k in kids]
            self._succeed(t, {"text": "\n".join(str(r.get("text", "")) for r in results),
                              "outputs": [r.get("outputs") for r in results]}, now)
        elif any(k.state == "failed" for k in bad):
            first = next(k for k in bad if k.state == "failed")
            self._final_fail(t, f"{len(bad)} of {len(kids)} children did not succeed; "
                             f"{first.id}: {first.error}", now)
        else:
            self._terminate(t, "cancelled", bad[0].reason or "child cancelled", now)

    def _succeed(self, t: _Task, result: Mapping[str, Any], now: float) -> None:
        self._set(t, "succeeded")
        t.result = dict(result)
        t.error = None
        t.ended = now
        self._after_terminal(t, now)
        for d in self._dependents.get(t.id, ()):
            dt = self._tasks[d]
            if dt.state == "waiting" and all(self._tasks[n].state == "succeeded"
                                             for n in dt.needs):
                self._make_ready(dt, now)

    def _fail_attempt(self, t: _Task, error: str, now: float, *, retryable: bool) -> None:
        t.failures += 1
        t.error = error
        if retryable and t.failures <= t.retries:
            self._set(t, "backoff")
            t.ready_at = now + self.backoff_delay(t.id, t.failures)
            heapq.heappush(self._backoff, (t.ready_at, t.id, t.failures))
        else:
            self._final_fail(t, error, now)

    def retries_of(self, task_id: str) -> int:
        """How many retries the task may have (its own `retries`, or the run's)."""
        return self._tasks[task_id].retries

    def backoff_delay(self, task_id: str, failures: int) -> float:
        """Seconds before retry number `failures`: min(backoff_max, backoff * 2**(failures-1))
        times a factor in [1 - jitter, 1], drawn from a generator seeded by (seed, task, n)."""
        base = min(self._run.backoff_max_s, self._run.backoff_s * 2 ** (failures - 1))
        u = random.Random(f"{self.seed}:{task_id}:{failures}").random()
        return base * (1.0 - self._run.jitter * u)

    def _final_fail(self, t: _Task, error: str, now: float) -> None:
        self._terminate(t, "failed", None, now, error=error)
        if self._run.failure_policy == "stop" and self.stop_reason is None \
                and self.cancel_reason is None:
            self.stop_reason = f"run stopped: task {t.id} failed"
            rest = [o for o in self._tasks.values() if o.state not in TERMINAL]
            # every task that had not started is not_run naming the failure (not a peer)
            for o in rest:
                if not o.live and o.state not in TERMINAL:
                    self._set(o, "not_run")
                    o.reason = self.stop_reason
                    o.ended = now
            for o in rest:
                if o.live:
                    self._terminate(o, "cancelled", self.stop_reason, now)

    def _terminate(self, t: _Task, state: str, reason: str | None, now: float, *,
                   error: str | None = None) -> None:
        if t.state in TERMINAL:
            return
        if t.live:
            self._out.append(CancelAttempt(task_id=t.id, attempt=t.attempt,
                                           reason=reason or error or state))
            self._end_attempt(t, now)
        self._set(t, state)
        if error is not None:
            t.error = error
        t.reason = reason
        t.ended = now
        self._after_terminal(t, now)
        why = f"needs {t.id}, which {'was ' if state != 'failed' else ''}{state}" + (
            f" ({reason})" if reason and state != "failed" else "")
        for d in self._dependents.get(t.id, ()):
            self._terminate(self._tasks[d], "not_run", why, now)

    def _after_terminal(self, t: _Task, now: float) -> None:
        if t.kind == "fanout_child" and t.parent is not None:
            self._maybe_join(self._tasks[t.parent], now)

    def _cancel_tree(self, t: _Task, reason: str, now: float, done: list[str]) -> None:
        if t.state not in TERMINAL:
            done.append(t.id)
            self._terminate(t, "cancelled", reason, now)  # first, so no join derives its state
        for c in t.children + t.dynamic:
            self._cancel_tree(self._tasks[c], reason, now, done)

    def _drop_children(self, t: _Task, why: str, now: float) -> None:
        """The attempt of `t` ended without succeeding: cancel the dynamic children it spawned
        that are still open (and their subtrees), so a retry does not inherit them."""
        for c in t.dynamic:
            child = self._tasks[c]
            if child.state not in TERMINAL:
                self._cancel_tree(child, f"{SUPERSEDED}parent {t.id}'s {why}", now, [])

    def _prune(self) -> None:
        while self._backoff and not (
                self._tasks[self._backoff[0][1]].state == "backoff"
                and self._tasks[self._backoff[0][1]].failures == self._backoff[0][2]):
            heapq.heappop(self._backoff)
        while self._deadlines:
            _, tid, attempt = self._deadlines[0]
            t = self._tasks[tid]
            if t.live and t.attempt == attempt and t.state == "running":
                break
            heapq.heappop(self._deadlines)


def _spawn_ordinal(parent: str, child: str) -> float:
    """Where `child` came in its parent's spawns: ids are "<parent>/<n>", n counting up."""
    n = child[len(parent) + 1:] if child.startswith(parent + "/") else ""
    return int(n) if n.isdigit() else math.inf


def _superseded(t: _Task) -> bool:
    return t.kind == "dynamic" and t.state == "cancelled" and \
        (t.reason or "").startswith(SUPERSEDED)


def _fmt_s(s: float) -> str:
    return f"{s:g}s"
