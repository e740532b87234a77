"""Owns one run: the bus hub, the embedded sim model, worker processes, leases and the journal.

Nursery tree: run -> (hub, model server, signals, bus client -> (receiver, progress, workers,
dispatcher)). The scheduler decides what runs; this module turns its actions into leases,
journal rows and bus messages, and turns bus messages back into scheduler events. Every state
change is journaled before it is acted on (a lease is written before it is sent; a result
before dependents start).

Trust: a worker is identified by the endpoint id the hub authenticated (`msg.source`), never
by ids in a body. A worker that breaks the protocol or reports an attempt it does not hold is
cut off: its leases are re-queued, its later messages ignored, and a local one is killed.
"""

from __future__ import annotations

import ipaddress
import os
import pathlib
import secrets
import signal
import socket
import time
from collections import deque
from collections.abc import Callable
from typing import Any

import attrs
import structlog
import trio

from agents import protocol as P
from bus.client import open_bus_client
from bus.config import HubConfig
from bus.errors import BodyTooLargeError, BusClosedError, BusError, BusNoRouteError
from bus.hub import serve_bus
from bus.local import LocalHub
from bus.logs import get_logger
from modellink.server import ModelServerConfig, serve_model
from modellink.sim import SimConfig
from orchestrator import runlock
from orchestrator import scheduler as S
from orchestrator.graph import GraphSpec
from orchestrator.journal import Journal
from orchestrator.progress import Progress
from orchestrator.runs import run_dir
from orchestrator.serving import ListenError, is_wildcard, start_listening, with_host
from orchestrator.simproc import SimProcess, SimStartError, start_sim_process
from orchestrator.workers import MAX_LOCAL_WORKERS, LocalProcesses, WorkerRec, WorkerTable

log = get_logger("orchestrator.supervisor")

CONTROL_POLL_S = 0.25  # how often `orchestrator cancel/scale` requests are picked up
FINISH_GRACE_S = 2.0  # after the last task: how long cancelled attempts may take to report
STOP_GRACE_S = 3.0  # SIGTERM -> SIGKILL for local workers (a second signal: at once)
CRASH_WINDOW_S = 30.0  # local workers exiting unasked ...
CRASH_LIMIT = 5  # ... this many times within the window stop being respawned
TASK_ADDRESSING_TOOLS = frozenset({"ask", "send_message"})  # tools that reach `task.<id>`
RECEIVE_BATCH = 256  # bus messages handled per pass; a row of results is one journal transaction
HUB_PROBE_S = 3.0  # how long a run on an external hub waits to hear who holds it
TOKEN_ENV = "SWITCHBOARD_TOKEN"  # the env var workers read the bus (and embedded sim) token from


class StartError(ListenError):
    """The run could not start (a port in use, an address that cannot be bound)."""


@attrs.frozen(kw_only=True)
class RunOptions:
    state_dir: pathlib.Path
    workers: int = 2
    worker_capacity: int = 16
    bus_host: str = "127.0.0.1"
    bus_port: int = 0
    bus_url: str | None = None  # an external hub; None starts one in this process
    advertise_host: str | None = None  # the host remote workers reach us at (bus and model)
    token: str | None = None
    model_url: str | None = None  # an external model server; None embeds the sim
    sim: SimConfig = SimConfig()
    # True: the embedded sim runs in a child process of its own (what `orchestrator run`
    # does; see orchestrator.simproc); False: in this process's event loop (tests on trio's
    # autojump clock, library use). Its log lines are at log_level.
    sim_process: bool = False
    log_level: str = "info"
    lease_ttl_s: float = 5.0
    progress: str = "auto"  # auto | tty | plain | none
    worker_args: tuple[str, ...] = ()
    resume: bool = False


@attrs.define
class RunOutcome:
    run_id: str
    status: str  # succeeded | failed | cancelled | stopped (resumable: see Supervisor.fatal)
    summary: dict[str, Any]
    fatal: str | None = None  # why the run stopped; None unless "stopped"


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class Supervisor:
    def __init__(self, *, graph: GraphSpec, journal: Journal, run_id: str, opts: RunOptions,
                 scheduler: S.Scheduler, sink: Callable[[bytes], None] | None = None) -> None:
        self.graph = graph
        self.journal = journal
        self.run_id = run_id
        self.opts = opts
        self.sched = scheduler
        self.sink = sink  # where shipped log lines of workers go (the run's log.jsonl)
        self.table = WorkerTable(lease_ttl=opts.lease_ttl_s)
        self.pending: deque[S.StartAttempt] = deque()  # attempts waiting for a free worker
        self.waits: list[tuple[Any, list[str]]] = []  # (request message, children) for `wait`
        self.bus: Any = None
        self.procs: LocalProcesses | None = None
        self.model_base_url: str | None = None  # as leases carry it (advertised)
        self.model_token: str | None = None  # the embedded sim's bearer token (the bus token)
        self.sim_proc: SimProcess | None = None  # the embedded sim's process (opts.sim_process)
        self._sim_ready: trio.Event | None = None  # set once that process listens, or failed to
        self._sim_error: str | None = None  # why it did not come up
        self.bus_url: str = ""  # as local workers dial it
        # the embedded hub, which our own client reaches over memory channels; None when
        # --bus-url names an external hub (then our client dials it like any worker)
        self.hub: LocalHub | None = None
        self.advertised_bus_url: str = ""  # as remote workers dial it
        self._wake = trio.Event()
        self._hurry = trio.Event()  # a second signal: stop waiting for workers
        self._outer: trio.Nursery | None = None
        self._inner: trio.Nursery | None = None
        self.target_workers = opts.workers
        self.cancel_reason: str | None = None
        self.fatal: str | None = None
        self.respawn_stopped: str | None = None
        self.crashes: deque[float] = deque()
        self.banned: set[str] = set()  # worker ids cut off
        self.capacities: dict[str, int] = {}  # every worker that said hello, for a comeback
        self.tokens_out = 0
        self.peak_workers = 0  # most workers connected at once (the last progress line)
        self.started_wall = time.time()
        self.clock_offset = 0.0  # wall time - trio time, set when the run starts
        self.progress: Progress | None = None
        self._progress_scope = trio.CancelScope()
        self._lease_agents: dict[str, Any] = {}
        # True iff some agent can address another task (ask, send_message): only then do
        # workers claim `task.<id>` for each attempt on the bus
        self._reachable = any(
            t in TASK_ADDRESSING_TOOLS for a in graph.agent_specs().values() for t in a.tools
            if isinstance(t, str))

    # ------------------------------------------------------------ entry

    async def run(self) -> RunOutcome:
        """Run the graph to the end. Raises StartError if the bus or model cannot listen."""
        opts = self.opts
        self.clock_offset = time.time() - trio.current_time()
        token = opts.token or secrets.token_urlsafe(24)
        async with trio.open_nursery() as nursery:
            self._outer = nursery
            nursery.start_soon(self._signals)
            await self._start_servers(nursery, token)
            if self.hub is None:
                await self._check_hub_free(token)
            async with open_bus_client(self.bus_url, token=token, endpoint_id=P.ORCHESTRATOR_ID,
                                       local=self.hub) as bus:
                self.bus = bus
                self.procs = LocalProcesses(url=self.bus_url, token=token,
                                            state_dir=str(opts.state_dir),
                                            capacity=opts.worker_capacity,
                                            extra_args=opts.worker_args)
                self.progress = Progress.make(opts.progress, total=self.sched.total())
                if self.progress is not None and opts.workers == 0:
                    self.progress.note(self._no_workers_hint())
                try:
                    async with trio.open_nursery() as inner:
                        self._inner = inner
                        inner.start_soon(self._receive_loop)
                        inner.start_soon(self._stamp_alive)
                        if self.progress is not None:
                            inner.start_soon(self._progress_loop)
                        for _ in range(opts.workers):
                            await self.procs.spawn(inner, self._on_process_exit)
                        await self._endpoints_ready()  # the sim's process came up meanwhile
                        await self._dispatch_loop()
                        # the graph is settled: the last progress line is close()'s, not one
                        # drawn while the workers stop (it said "workers 0", then the peak)
                        self._progress_scope.cancel()
                        self._sync_journal()
                        await self._finish_workers()
                        # stop workers while still receiving: their last log lines and byes
                        await self.procs.stop_all(grace=STOP_GRACE_S, hurry=self._hurry)
                        inner.cancel_scope.cancel()
                finally:
                    await self.procs.stop_all(grace=STOP_GRACE_S, hurry=self._hurry)
            nursery.cancel_scope.cancel()
        self._sync_journal()
        outcome = self.sched.outcome()
        # a cancel the user asked for wins over a stop: a cancelled run is not to go on
        status = "cancelled" if self.cancel_reason else "stopped" if self.fatal else outcome
        reason = self.cancel_reason or self.fatal
        self.journal.close_open_attempts(
            self.run_id, "cancelled" if status == "cancelled" else "lost",
            "the run ended before the attempt reported",
            "never started: the run ended before a worker took it")
        summary = self.summary()
        self.journal.finish_run(self.run_id, status, summary=summary, reason=reason)
        if self.progress is not None:
            self.progress.close(self._progress_state())
        log.info("run.end", status=status, reason=reason,
                 **{k: v for k, v in summary.items() if k != "tasks"})
        return RunOutcome(run_id=self.run_id, status=status, summary=summary,
                          fatal=self.fatal if status == "stopped" else None)

    async def _check_hub_free(self, token: str) -> None:
        """An external hub serves one run at a time: the hub gives the `orchestrator` endpoint
        to the newest claim, so a second run would cut the first off mid-run. Ask who holds
        it first. Raises StartError if a live orchestrator answers (or anything holds it)."""
        async with open_bus_client(self.bus_url, token=token,
                                   endpoint_id=f"probe.{self.run_id}") as probe:
            try:
                reply = await probe.request(P.ORCHESTRATOR_ID, {"t": "who"},
                                            timeout=HUB_PROBE_S)
            except BusNoRouteError:
                return  # free
            except BusError:
                reply = None
        other = reply.get("run_id") if isinstance(reply, dict) else None
        held = f"run {other}" if other else "another orchestrator"
        raise StartError(
            f"the hub at {self.bus_url} is in use by {held}: a hub serves one run at a time "
            "(a second would cut the first off); wait for it to end, or leave out --bus-url "
            "to give this run its own hub")

    async def _start_servers(self, nursery: trio.Nursery, token: str) -> None:
        opts = self.opts
        bind = opts.bus_host
        if opts.bus_url is None:
            info = await _start(nursery, serve_bus, HubConfig(host=bind, port=opts.bus_port,
                                                              token=token),
                                what=f"the bus on {bind}:{opts.bus_port}")
            self.bus_url = with_host(info.url, "127.0.0.1") if is_wildcard(bind) else info.url
            self.hub = info.hub
        else:
            self.bus_url = opts.bus_url
        adv = opts.advertise_host
        if adv is None and not is_loopback(bind):
            adv = socket.gethostname() if is_wildcard(bind) else bind
        self.advertised_bus_url = with_host(self.bus_url, adv) if adv else self.bus_url
        if opts.model_url is None and self._needs_embedded_model():
            # reachable where remote workers can reach the bus; loopback otherwise. It takes
            # the bus token as its bearer token and answers to any model name.
            mhost = "127.0.0.1"
            if not is_loopback(bind):
                mhost = bind
            elif adv is not None and not is_loopback(adv):
                mhost = "0.0.0.0"
            sim = attrs.evolve(opts.sim, accept_any_model=True)
            self.model_token = token

            def publish(base: str) -> None:
                if is_wildcard(mhost):
                    base = with_host(base, "127.0.0.1")
                self.model_base_url = with_host(base, adv) if adv else base

            if opts.sim_process:
                # it takes ~0.5 s to come up (a Python start-up and the tokenizer): started
                # now, awaited in _endpoints_ready, so the workers start meanwhile
                ready = self._sim_ready = trio.Event()

                async def start_sim() -> None:
                    try:
                        self.sim_proc = await start_sim_process(
                            nursery, host=mhost, token=token, sim=sim,
                            log_level=opts.log_level, run_id=self.run_id, sink=self.sink,
                            on_exit=self._on_sim_exit, cwd=opts.state_dir)
                        publish(self.sim_proc.base_url)
                        log.info("model_server.process", pid=self.sim_proc.proc.pid,
                                 base_url=self.sim_proc.base_url)
                    except SimStartError as exc:
                        self._sim_error = str(exc)
                    finally:
                        ready.set()

                nursery.start_soon(start_sim)
            else:
                minfo = await _start(nursery, serve_model,
                                     ModelServerConfig(host=mhost, port=0, token=token, sim=sim),
                                     what=f"the embedded sim model on {mhost}")
                publish(minfo.base_url)
        else:
            self.model_base_url = opts.model_url

    async def _endpoints_ready(self) -> None:
        """Wait for the embedded sim's process if it is starting, then journal and log where
        the run's bus and model are. Raises StartError if that process did not come up."""
        if self._sim_ready is not None:
            await self._sim_ready.wait()
            if self._sim_error is not None:
                raise StartError(self._sim_error)
        opts = self.opts
        self.journal.event(self.run_id, None, "run.endpoints",
                           {"bus": self.advertised_bus_url, "local_bus": self.bus_url,
                            "model": self.model_base_url, "pid": os.getpid()})
        log.info("run.start", bus=self.advertised_bus_url, model=self.model_base_url,
                 workers=opts.workers, tasks=len(self.graph.tasks),
                 remote_workers=f"orchestrator worker --connect {self.advertised_bus_url}")

    async def _on_sim_exit(self, code: int, stderr_tail: list[str]) -> None:
        """The embedded sim's process exited mid-run (it is stopped only after the run): no
        attempt can reach a model, so the run stops, resumable like one with no worker left.

        The attempts in flight are lost, not failed (their turns broke for a reason not
        theirs, so they cost no retry): their workers are told to cancel them, and a resume
        runs them again with a new sim."""
        if self.sched.done or self.cancel_reason is not None or self.fatal is not None:
            return
        why = f"the embedded sim model server's process {_how_exited(code)}"
        if stderr_tail:
            why += f" ({stderr_tail[-1]})"
        self.fatal = why
        log.error("run.model_exited", reason=why, stderr_tail=stderr_tail,
                  next=f"`orchestrator resume {self.run_id}` starts a new one")
        self.journal.event(self.run_id, None, "run.fatal", {"reason": why})
        sends: list[tuple[str, Any]] = []
        with self.journal.batch():
            for lease in list(self.table.leases.values()):
                if self.sched.is_current(lease.task_id, lease.attempt):
                    self._lost(lease.task_id, lease.attempt, why)
                    sends.append((lease.worker_id, P.cancel(lease.task_id, lease.attempt, why)))
            self._sync_journal()
        for worker_id, body in sends:
            await self._send(worker_id, body)
        self.wake()

    def _no_workers_hint(self) -> str:
        """What `orchestrator run --workers 0` tells its user: how workers join this run."""
        scale = f"`orchestrator scale N --run {self.run_id}` starts N here"
        if self.opts.token is None:  # a random token: nobody outside this process knows it
            return (f"no workers yet (--workers 0): {scale}; workers started by hand need "
                    "the run's token, so rerun with SWITCHBOARD_TOKEN (or --token-file) set for "
                    "it and for them")
        return (f"no workers yet (--workers 0): {scale}, or start them by hand: "
                f"orchestrator worker --connect {self.advertised_bus_url} with the run's token "
                "in SWITCHBOARD_TOKEN or --token-file")

    def _needs_embedded_model(self) -> bool:
        return any(a.model.base_url is None for a in self.graph.agent_specs().values())

    # ------------------------------------------------------------ dispatch

    def wake(self) -> None:
        self._wake.set()

    async def _dispatch_loop(self) -> None:
        next_poll = trio.current_time()
        while True:
            now = trio.current_time()
            # silent workers first: their leases expire with them, and they are never picked
            for wid in self.table.dead_workers(now):
                self._forget_worker(wid, f"no heartbeat for {self.opts.lease_ttl_s:g}s")
                if self.procs is not None and wid in self.procs.procs:
                    # ours but silent (hung, or stopped): its attempts run again elsewhere
                    # now, so its tools must not go on beside them; a new worker replaces it
                    self.procs.kill(wid)
            for lease in self.table.expired(now):
                log.warning("lease.expired", task_id=lease.task_id, attempt=lease.attempt,
                            worker_id=lease.worker_id)
                self._lost(lease.task_id, lease.attempt, f"lease expired on {lease.worker_id}")
            self.sched.check_timeouts(now)
            if now >= next_poll:
                self._poll_control()
                next_poll = now + CONTROL_POLL_S
            self._check_workers_left()
            # one journal transaction per step, committed before any of it is sent
            sends: list[tuple[str, Any]] = []
            with self.journal.batch():
                for act in self.sched.next_actions(now):
                    if isinstance(act, S.StartAttempt):
                        self.journal.attempt_queued(self.run_id, act.task_id, act.attempt)
                        self.pending.append(act)
                    elif isinstance(act, S.CancelAttempt):
                        self._cancel_attempt(act, sends)
                if self.fatal is None:
                    # a stopping run leases nothing more: an attempt queued now (one its lost
                    # predecessor left) stays queued, and is closed as never started
                    self._assign(now, sends)
                self._answer_waits()
                self._sync_journal()
            for worker_id, body in sends:
                await self._send(worker_id, body)
            if self.sched.done or self.fatal is not None:
                break  # after carrying out the last actions: a cancel_all's CancelAttempts
            deadline = next_poll
            for t in (self.sched.next_wakeup(), self.table.next_deadline()):
                if t is not None:
                    deadline = min(deadline, t)
            with trio.move_on_at(deadline):
                await self._wake.wait()
            self._wake = trio.Event()

    def _assign(self, now: float, sends: list[tuple[str, Any]]) -> None:
        """Lease pending attempts to free workers: journaled now, sent by the caller after
        the journal batch commits.

        An attempt waits while its task's previous attempt is still stopping on its worker (a
        timeout's cancel: tools get a grace period, then SIGKILL): the two would otherwise run
        at once in the task's one workspace. It goes when that worker reports, or its lease
        expires."""
        waiting: list[S.StartAttempt] = []
        try:
            while self.pending:
                act = self.pending[0]
                if not self.sched.is_current(act.task_id, act.attempt):
                    self.pending.popleft()
                    continue
                if self.table.earlier_held(act.task_id, act.attempt):
                    waiting.append(self.pending.popleft())
                    continue
                worker = self.table.pick()
                if worker is None:
                    return
                self.pending.popleft()
                self._lease(act, worker, now, sends)
        finally:
            self.pending.extendleft(reversed(waiting))

    def _lease(self, act: S.StartAttempt, worker: WorkerRec, now: float,
               sends: list[tuple[str, Any]]) -> None:
        lease = P.Lease(run_id=self.run_id, task_id=act.task_id, attempt=act.attempt,
                        agent=self._lease_agent(act.agent), prompt=act.prompt,
                        timeout_s=act.timeout_s,
                        model_base_url=self._lease_model_url(act.agent),
                        parent_task=act.parent, reachable=self._reachable)
        # journal first: a crash after this line re-runs the attempt, never loses it
        self.journal.attempt_started(self.run_id, act.task_id, act.attempt,
                                     worker.worker_id)
        self.table.grant(act.task_id, act.attempt, worker.worker_id, now)
        self.sched.on_started(act.task_id, act.attempt, now)
        sends.append((worker.worker_id, P.to_wire(lease)))

    def _lease_agent(self, name: str) -> P.AgentSpec:
        """The agent spec a lease carries: on the embedded sim, the worker sends the bus token
        (from its SWITCHBOARD_TOKEN) as the model key."""
        spec = self._lease_agents.get(name)
        if spec is None:
            spec = self.graph.agent_specs()[name]
            if spec.model.base_url is None and self.model_token is not None:
                spec = attrs.evolve(spec, model=attrs.evolve(spec.model, api_key_env=TOKEN_ENV))
            self._lease_agents[name] = spec
        return spec

    def _lease_model_url(self, name: str) -> str | None:
        return self.graph.agent_specs()[name].model.base_url or self.model_base_url

    def _cancel_attempt(self, act: S.CancelAttempt, sends: list[tuple[str, Any]]) -> None:
        """The scheduler ended a live attempt (timeout, cancel, stop policy): journal how, then
        tell its worker. The lease stays until the worker reports, so its capacity is held."""
        state = "timed_out" if act.reason.startswith("timed out") else "cancelled"
        self.journal.attempt_ended(self.run_id, act.task_id, act.attempt, state,
                                   error=act.reason)
        holder = self.table.holder(act.task_id, act.attempt)
        # a timeout is a failure (`logs --level warning` shows it); a requested cancel is not
        (log.warning if state == "timed_out" else log.info)(
            "attempt.cancel", task_id=act.task_id, attempt=act.attempt, worker_id=holder,
            reason=act.reason)
        if holder is not None:
            sends.append((holder, P.cancel(act.task_id, act.attempt, act.reason)))

    async def _send(self, worker_id: str, body: Any) -> None:
        try:
            await self.bus.send(P.worker_endpoint(worker_id), body)
        except BodyTooLargeError as exc:
            if body.get("t") != "lease":
                raise  # our own control messages are small: a bug
            self._unsendable(worker_id, str(body["task_id"]), int(body["attempt"]), exc)
        except BusError as exc:
            log.warning("send.failed", worker_id=worker_id, t=body.get("t"), error=str(exc))

    def _unsendable(self, worker_id: str, task_id: str, attempt: int,
                    exc: BodyTooLargeError) -> None:
        """A lease too large for one bus message (its prompt, with what its {{ }} references
        brought in): the attempt fails, not retried (the next would be as large)."""
        if self.table.holder(task_id, attempt) == worker_id:
            self.table.release(task_id, attempt)
        if not self.sched.is_current(task_id, attempt):
            return
        error = (f"the task's lease is {exc.size} bytes, over the bus's message limit of "
                 f"{exc.limit}: its prompt (with the upstream outputs its {{{{ }}}} references "
                 "bring in) or its agent's instructions are too long; reference less output, "
                 "e.g. one field of each upstream task instead of its whole text")
        self.journal.attempt_ended(self.run_id, task_id, attempt, "failed", error=error)
        self.sched.on_failed(task_id, attempt,
                             error + " (not retried: another attempt would fail the same way)",
                             trio.current_time(), retryable=False)
        log.warning("lease.too_large", task_id=task_id, attempt=attempt, bytes=exc.size,
                    limit=exc.limit)
        self.wake()

    def _lost(self, task_id: str, attempt: int, why: str) -> None:
        """An attempt's worker is gone: run it again (if it is still the live attempt)."""
        if not self.sched.is_current(task_id, attempt):
            return  # already ended (cancelled, timed out): journaled then
        self.journal.attempt_ended(self.run_id, task_id, attempt, "lost", error=why)
        self.sched.on_lost(task_id, attempt, trio.current_time())
        log.warning("attempt.lost", task_id=task_id, attempt=attempt, reason=why)
        self.wake()

    def _forget_worker(self, worker_id: str, why: str) -> None:
        lost = self.table.remove_worker(worker_id)
        (log.warning if lost else log.info)("worker.gone", worker_id=worker_id, reason=why,
                                            lost=len(lost))
        for lease in lost:
            self._lost(lease.task_id, lease.attempt, f"worker {worker_id}: {why}")

    def _sync_journal(self) -> None:
        self.journal.sync_tasks(self.run_id, self.sched.task_states(),
                                clock_offset=self.clock_offset, on_state=self._log_decision)

    def _log_decision(self, before: S.TaskView | None, v: S.TaskView) -> None:
        """One log line for each of the scheduler's decisions that `logs` would otherwise
        leave a user to infer: a retry and when, a task failed for good, one not run or
        cancelled and why."""
        if v.state == "failed":
            log.error("task.failed", task_id=v.task_id, attempts=v.attempt, error=v.error,
                      **({"reason": v.reason} if v.reason else {}))
        elif before is not None and v.failures > before.failures:
            # with no backoff left the next attempt is already handed out (attempt + 1)
            failed = v.attempt - 1 if v.state in ("queued", "running") else v.attempt
            retries = self.sched.retries_of(v.task_id)
            log.warning("task.retry", task_id=v.task_id, attempt=failed,
                        error=v.error, retry=f"{v.failures} of {retries}",
                        in_s=round(self.sched.backoff_delay(v.task_id, v.failures), 3))
        elif v.state in ("not_run", "cancelled") and before is not None \
                and before.state != v.state:
            log.warning(f"task.{v.state}", task_id=v.task_id, reason=v.reason)

    def _check_workers_left(self) -> None:
        """Stop the run when local workers keep crashing and no worker is left to run it.

        Its tasks keep their states (none runs: there is no worker), so once the cause is
        fixed (a tool that kills its process, a bad worker option, no memory) `orchestrator
        resume RUN` goes on from there: what had finished is not run again."""
        if self.respawn_stopped is None or self.fatal is not None or self.sched.done:
            return
        if self.table.workers or (self.procs is not None and self.procs.procs):
            return
        self.fatal = f"no workers left: {self.respawn_stopped}"
        log.error("run.no_workers", reason=self.fatal,
                  next=f"fix the cause, then `orchestrator resume {self.run_id}`")
        self.journal.event(self.run_id, None, "run.fatal", {"reason": self.fatal})

    # ------------------------------------------------------------ bus input

    async def _receive_loop(self) -> None:
        """Take what the bus has, up to RECEIVE_BATCH messages at a time, in order. Results
        in a row are journaled in one transaction (`_apply_results`); anything else is
        handled one by one, after the results before it."""
        results: list[tuple[str, str | None, P.Result]] = []
        while True:
            try:
                group = [await self.bus.receive()]
            except BusClosedError:
                return
            while len(group) < RECEIVE_BATCH:
                try:
                    group.append(self.bus.receive_nowait())
                except (trio.WouldBlock, BusError):
                    break  # an error is raised by the next receive(), after this group
            for msg in group:
                src = msg.source
                wid = src[len("worker."):] if src.startswith("worker.") else None
                if wid is not None and wid in self.banned:
                    continue
                try:
                    body = P.parse_message(msg.payload())
                except Exception as exc:  # the peer's fault: cut it off, the run goes on
                    await self._apply_results(results)
                    await self._cut_off(src, f"protocol error: {type(exc).__name__}: {exc}")
                    continue
                if isinstance(body, P.Result):
                    results.append((src, wid, body))
                    continue
                # a journal that cannot commit is fatal: _apply_results is not in the try
                await self._apply_results(results)
                try:
                    await self._on_message(msg, wid, body)
                except Exception as exc:  # the peer's fault, as above
                    await self._cut_off(src, f"protocol error: {type(exc).__name__}: {exc}")
            await self._apply_results(results)
            self.wake()

    async def _apply_results(self, results: list[tuple[str, str | None, P.Result]]) -> None:
        """Journal and apply `results` (emptied) in one transaction; no await inside it, so
        it is committed before the dispatcher can act on what it changed. Then cut off the
        workers whose results broke the rules."""
        if not results:
            return
        cut: list[tuple[str, str]] = []
        with self.journal.batch():
            for src, wid, res in results:
                if wid is not None and wid in self.banned:
                    continue
                try:
                    why = self._on_result(src, wid, res)
                except Exception as exc:  # the peer's fault, as in _receive_loop
                    why = f"protocol error: {type(exc).__name__}: {exc}"
                if why is not None:
                    cut.append((src, why))
                    if wid is not None:
                        self.banned.add(wid)  # its later results in this batch are ignored
        results.clear()
        for src, why in cut:
            await self._cut_off(src, why)

    async def _on_message(self, msg: Any, wid: str | None, body: Any) -> None:
        if isinstance(body, P.Result):
            await self._apply_results([(msg.source, wid, body)])
            return
        if isinstance(body, P.Lease):
            raise P.WorkerProtocolError("a worker does not send leases")
        t = body["t"]
        now = trio.current_time()
        if t == "who" and msg.kind == "request":  # another run probing this hub
            await self._reply_safe(msg, {"run_id": self.run_id})
            return
        if wid is None:
            log.warning("message.ignored", source=msg.source, t=t,
                        reason="only worker.* endpoints speak the worker protocol")
            return
        if t == "hello":
            self._join(wid, body, now)
            if self.procs is not None and wid in self.procs.draining:
                await self._send(wid, P.drain())
        elif t == "heartbeat":
            held = [(h[0], h[1]) for h in body["held"]]
            join = body.get("join")
            if wid not in self.table.workers and wid in self.capacities:
                # heard from again after it was given up on (a partition): it may work again
                self.table.hello(wid, self.capacities[wid], None, "", now)
                log.info("worker.returned", worker_id=wid)
            elif wid not in self.capacities and join is not None and not body["draining"]:
                # serving since before this run (a standalone hub, or a resumed run): its
                # hello went to another orchestrator; the heartbeat repeats it
                self._join(wid, join, now, by="heartbeat")
            for task_id, attempt in self.table.heartbeat(wid, held, now):
                await self._send(wid, P.cancel(task_id, attempt,
                                               "this attempt is no longer leased to you"))
        elif t == "refused":
            key = (str(body["task_id"]), int(body["attempt"]))
            if self.table.holder(*key) == wid:
                self.table.release(*key)
                self._lost(key[0], key[1], f"refused by {wid}: {body.get('reason')}")
        elif t == "bye":
            self._forget_worker(wid, f"said bye ({body.get('reason')})")
        elif t == "logs":
            self._append_logs(body.get("lines") or [])
        elif t == "spawn" and msg.kind == "request":
            await self._on_spawn(msg, wid, body)
        elif t == "wait" and msg.kind == "request":
            await self._on_wait(msg, body)
        else:
            raise P.WorkerProtocolError(f"unexpected {t!r} ({msg.kind}) from a worker")

    def _join(self, wid: str, hello: dict[str, Any], now: float, **how: str) -> None:
        """Take worker `wid` on with what its hello says (capacity, pid, host)."""
        capacity = int(hello["capacity"])
        self.capacities[wid] = capacity
        self.table.hello(wid, capacity, hello.get("pid"), str(hello.get("host", "")), now)
        self.peak_workers = max(self.peak_workers, self.table.active)
        log.info("worker.joined", worker_id=wid, capacity=capacity, host=hello.get("host"),
                 pid=hello.get("pid"), **how)

    def _on_result(self, source: str, wid: str | None, res: P.Result) -> str | None:
        """Journal a result and feed it to the scheduler. Returns why its sender must be cut
        off (a result for an attempt it does not hold), else None."""
        key = (res.task_id, res.attempt)
        holder = self.table.holder(*key)
        usage = _usage(res)
        if wid is None or res.run_id != self.run_id:
            log.warning("result.refused", task_id=res.task_id, attempt=res.attempt,
                        source=source, reason="not from a worker of this run")
            return None
        if holder != wid:
            # given up on while this worker ran it; or, after a resume, an attempt the dead
            # orchestrator had leased (this one never did): late, not forged
            if holder is None and (self.table.retired.get(key) == wid or (
                    key not in self.table.retired and self.sched.was_attempt(*key))):
                why = "late result from an attempt that had been given up on"
                self.journal.attempt_refused(self.run_id, res.task_id, res.attempt,
                                             reported=res.status, why=why, worker_id=wid,
                                             usage=usage, stopped_at=res.stopped_at)
                log.warning("result.refused", task_id=res.task_id, attempt=res.attempt,
                            worker_id=wid, status=res.status, reason=why)
                return None
            return f"result for {res.task_id}#{res.attempt}, which it does not hold"
        self.table.release(*key)
        self.tokens_out += usage["output_tokens"]
        if not self.sched.is_current(*key):
            # the attempt ended while the worker ran it (timeout, cancel): journaled then
            why = "attempt had already ended (timed out or cancelled)"
            self.journal.attempt_refused(self.run_id, res.task_id, res.attempt,
                                         reported=res.status, why=why, worker_id=wid,
                                         usage=usage, stopped_at=res.stopped_at)
            log.info("result.stale", task_id=res.task_id, attempt=res.attempt, worker_id=wid,
                     status=res.status, reason=why)
            return None
        now = trio.current_time()
        record = {"text": res.text, "outputs": res.outputs}
        # journal before the scheduler acts: dependents start only after this is durable
        self.journal.attempt_ended(self.run_id, res.task_id, res.attempt, res.status,
                                   error=res.error, result=record, usage=usage,
                                   stopped_at=res.stopped_at)
        if res.status == "succeeded":
            self.sched.on_succeeded(res.task_id, res.attempt, record, now)
        elif res.status == "cancelled":
            self.sched.on_cancelled(res.task_id, res.attempt, res.error or "cancelled", now)
        else:
            error = res.error or "failed"
            if not res.retryable:
                error += " (not retried: another attempt would fail the same way)"
            self.sched.on_failed(res.task_id, res.attempt, error, now, retryable=res.retryable)
        log.info("task.result", task_id=res.task_id, attempt=res.attempt, status=res.status,
                 worker_id=wid, error=res.error, output_tokens=usage["output_tokens"])
        return None

    async def _on_spawn(self, msg: Any, wid: str, body: dict[str, Any]) -> None:
        parent = str(body.get("parent"))
        attempt = body.get("attempt")
        if not (isinstance(attempt, int) and self.sched.is_current(parent, attempt)
                and self.table.holder(parent, attempt) == wid):
            await self._reply_safe(msg, {"error": f"spawn: {parent}#{attempt} is not a live "
                                                  "attempt held by the requester"})
            return
        agent = body.get("agent")
        try:
            child = self.sched.spawn_child(parent, prompt=str(body.get("prompt", "")),
                                           agent=str(agent) if agent else None,
                                           now=trio.current_time())
        except S.SchedulerError as exc:
            await self._reply_safe(msg, {"error": str(exc)})
            return
        adopted = self.sched.last_spawn_adopted
        self.journal.event(self.run_id, child, "spawned", {"parent": parent, "attempt": attempt,
                                                           "adopted": adopted})
        if adopted:
            log.info("task.adopted", task_id=child, parent=parent, attempt=attempt,
                     why="a lost attempt of the parent spawned it; its run stands")
        await self._reply_safe(msg, {"child": child})

    async def _on_wait(self, msg: Any, body: dict[str, Any]) -> None:
        children = [str(c) for c in body.get("children") or []]
        unknown = [c for c in children if self.sched.task_result(c) is None]
        if unknown:
            await self._reply_safe(msg, {"error": f"wait: no task {', '.join(unknown)} in "
                                                  "this run"})
            return
        parent = str(body.get("parent"))
        strangers = [c for c in children if not self.sched.descends_from(c, parent)]
        if strangers:
            await self._reply_safe(msg, {"error": (
                f"wait: {', '.join(strangers)} {'is' if len(strangers) == 1 else 'are'} not "
                f"a child of {parent}: wait takes the ids that spawn returned")})
            return
        self.waits.append((msg, children))

    def _answer_waits(self) -> None:
        if not self.waits or self._inner is None:
            return
        still = []
        for msg, children in self.waits:
            body = msg.payload()
            parent, attempt = str(body.get("parent")), body.get("attempt")
            asker = self.sched.task_result(parent)
            if asker is None or asker["state"] in S.TERMINAL or (
                    isinstance(attempt, int) and not self.sched.is_current(parent, attempt)):
                continue  # the waiting attempt ended (cancelled, timed out, failed): an
                # answer would only wake it for one more model turn
            states = {c: self.sched.task_result(c) for c in children}
            if all(s is not None and s["state"] in S.TERMINAL for s in states.values()):
                self._inner.start_soon(self._reply_safe, msg, {"results": states})
            else:
                still.append((msg, children))
        self.waits = still

    async def _reply_safe(self, msg: Any, body: Any) -> None:
        try:
            await self.bus.reply(msg, body)
        except BodyTooLargeError as exc:  # wait's results: the asker hears why
            await self._reply_safe(msg, {"error": (
                f"the answer is {exc.size} bytes, over the bus's message limit of {exc.limit}: "
                "wait for fewer children at once")})
        except BusError as exc:
            log.warning("reply.failed", error=str(exc))

    async def _cut_off(self, source: str, why: str) -> None:
        log.warning("worker.cut_off", source=source, reason=why)
        self.journal.event(self.run_id, None, "worker.cut_off", {"source": source, "why": why})
        if not source.startswith("worker."):
            return
        wid = source[len("worker."):]
        self.banned.add(wid)
        self._forget_worker(wid, f"cut off: {why}")
        if self.procs is not None and wid in self.procs.procs:
            self.procs.kill(wid)
        else:
            await self._send(wid, P.drain())  # an honest but buggy remote worker stops

    async def _on_process_exit(self, worker_id: str, code: int, stderr_tail: list[str]) -> None:
        asked = self.procs is not None and (worker_id in self.procs.draining)
        lost = self.table.remove_worker(worker_id)
        for lease in lost:
            self._lost(lease.task_id, lease.attempt, f"worker {worker_id} {_how_exited(code)}")
        if (code != 0 and not asked) or lost or (stderr_tail and code != 0):
            log.warning("worker.exited", worker_id=worker_id, code=code, lost=len(lost),
                        stderr_tail=stderr_tail)
        else:
            log.info("worker.exited", worker_id=worker_id, code=code)
        if self.sched.done or self.cancel_reason is not None or self.procs is None \
                or self._inner is None:
            return
        if not asked:
            now = trio.current_time()
            self.crashes.append(now)
            while self.crashes and self.crashes[0] < now - CRASH_WINDOW_S:
                self.crashes.popleft()
            if len(self.crashes) >= CRASH_LIMIT and self.respawn_stopped is None:
                last = stderr_tail[-1] if stderr_tail else f"it {_how_exited(code)}"
                self.respawn_stopped = (f"{len(self.crashes)} local workers exited within "
                                        f"{CRASH_WINDOW_S:g}s; last: {last}")
                log.error("worker.respawn_stopped", reason=self.respawn_stopped)
                self.journal.event(self.run_id, None, "worker.respawn_stopped",
                                   {"reason": self.respawn_stopped})
        if self.respawn_stopped is None and len(self.procs.live()) < self.target_workers:
            # a crashed local worker is replaced so the run keeps its capacity
            await self.procs.spawn(self._inner, self._on_process_exit)
        self.wake()

    # ------------------------------------------------------------ control

    def _poll_control(self) -> None:
        for req in self.journal.take_requests(self.run_id):
            try:
                if req["kind"] == "cancel":
                    if req.get("task_id"):
                        done = self.sched.cancel(req["task_id"], "cancelled by request",
                                                 trio.current_time())
                        log.info("cancel.task", task_id=req["task_id"], cancelled=done)
                    else:
                        self.cancel_run("cancelled by `orchestrator cancel`")
                elif req["kind"] == "scale":
                    self._scale(int(req["arg"]))
            except (S.SchedulerError, ValueError, TypeError) as exc:
                # checked by the CLI already; a stale or hand-written request is not fatal
                log.warning("request.ignored", kind=req["kind"], task_id=req.get("task_id"),
                            arg=req.get("arg"), error=str(exc))
        self.wake()

    def _scale(self, n: int) -> None:
        """Make the number of LOCAL worker processes n: spawn more, or drain the least loaded.
        Remote workers are not counted: they are scaled where they run (a Deployment)."""
        if not 0 <= n <= MAX_LOCAL_WORKERS:  # the CLI checks too: a hand-written request
            raise ValueError(f"scale: {n} is not 0..{MAX_LOCAL_WORKERS}")
        if self.procs is None or self._inner is None:
            return
        self.target_workers = n
        have = self.procs.live()
        log.info("scale", target=n, have=len(have))
        if n > len(have):
            for _ in range(n - len(have)):
                self._inner.start_soon(self.procs.spawn, self._inner, self._on_process_exit)
            return

        def load(w: str) -> tuple[int, int]:
            rec = self.table.workers.get(w)
            return (0, 0) if rec is None else (1, len(rec.held))

        for wid in sorted(have, key=load)[:len(have) - n]:
            self.procs.draining.add(wid)
            rec = self.table.workers.get(wid)
            if rec is None:
                self.procs.terminate(wid)  # not connected yet: holds nothing
            else:
                rec.draining = True  # finishes what it holds, then exits
                self._inner.start_soon(self._send, wid, P.drain())

    def cancel_run(self, reason: str) -> None:
        if self.cancel_reason is None:
            self.cancel_reason = reason
            log.warning("run.cancel", reason=reason)
            self.sched.cancel_all(reason, trio.current_time())
            self.journal.event(self.run_id, None, "cancel", {"reason": reason})
            self.wake()

    async def _signals(self) -> None:
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as sigs:
            async for sig in sigs:
                name = signal.Signals(sig).name
                if self.cancel_reason is None and self.sched.done:
                    # every task has ended: the run's outcome stands; stop the workers now
                    log.info("run.signal_after_end", signal=name)
                    self._hurry.set()
                elif self.cancel_reason is None:
                    self.cancel_run(f"received {name}")
                else:
                    # a second signal: stop waiting for attempts to report; workers get
                    # SIGKILL now instead of after the grace period
                    log.warning("run.hurry", signal=name)
                    self._hurry.set()
                    if self._inner is not None:
                        self._inner.cancel_scope.cancel()

    async def _finish_workers(self) -> None:
        """After the run: give cancelled attempts a moment to report, then stop the workers."""
        with trio.move_on_after(FINISH_GRACE_S):
            while self.table.leases and not self._hurry.is_set():
                self._wake = trio.Event()
                await self._wake.wait()

    # ------------------------------------------------------------ logs and progress

    def _append_logs(self, lines: list[Any]) -> None:
        if self.sink is None:
            return
        # one write for the whole shipped batch: the run's log file is unbuffered, so a write
        # per line was a syscall per line (the sink ends what it is given with a newline)
        good = [line.replace(b"\n", b" ") for line in lines if isinstance(line, bytes)]
        if good:
            self.sink(b"\n".join(good))

    def _progress_state(self) -> dict[str, Any]:
        counts = self.sched.counts()
        elapsed = max(time.time() - self.started_wall, 1e-9)
        return {"done": counts.get("succeeded", 0), "total": self.sched.total(),
                "running": counts.get("running", 0), "waiting": counts.get("queued", 0),
                "failed": counts.get("failed", 0), "workers": self.table.active,
                "workers_peak": self.peak_workers,
                "tokens_per_s": self.tokens_out / elapsed, "elapsed": elapsed}

    async def _stamp_alive(self) -> None:
        """Keep the run's lock file's mtime fresh, so `status` of a run whose orchestrator
        died can say when (within ALIVE_EVERY_S) instead of counting its times to now."""
        rdir = run_dir(pathlib.Path(self.opts.state_dir), self.run_id)
        while True:
            runlock.stamp(rdir)
            await trio.sleep(runlock.ALIVE_EVERY_S)

    async def _progress_loop(self) -> None:
        assert self.progress is not None
        with self._progress_scope:
            while True:
                self.progress.update(self._progress_state())
                await trio.sleep(self.progress.interval)

    def summary(self) -> dict[str, Any]:
        usage = self.journal.usage_summary(self.run_id)
        counts = self.sched.counts()
        # why tasks failed, so the end of `orchestrator run` says it without a second command
        failed = [(v.task_id, v.error or v.reason or "") for v in
                  self.sched.task_states().values() if v.state == "failed"]
        return {"run_id": self.run_id, "counts": counts, "usage": usage, "failed": failed,
                "seconds": round(time.time() - self.started_wall, 3)}


async def _start(nursery: trio.Nursery, fn: Any, config: Any, *, what: str) -> Any:
    """nursery.start(fn, config), with a failure to listen raised as one StartError."""
    return await start_listening(nursery, fn, config, what=what, error=StartError)


def _how_exited(code: int) -> str:
    """How a worker process ended, e.g. 'exited with 2' or 'was killed by SIGKILL'."""
    if code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with {code}"


def _usage(res: P.Result) -> dict[str, Any]:
    return {
        "turns": len(res.turns),
        "input_tokens": sum(t.input_tokens for t in res.turns),
        "cached_tokens": sum(t.cached_tokens for t in res.turns),
        "output_tokens": sum(t.output_tokens for t in res.turns),
        "bytes_sent": sum(t.bytes_sent for t in res.turns),
        "bytes_received": sum(t.bytes_received for t in res.turns),
        "model_s": round(sum(t.model_s for t in res.turns), 6),
        "tools_s": round(sum(t.tools_s for t in res.turns), 6),
        "cost_usd": res.cost_usd,
    }


def new_run_id() -> str:
    return time.strftime("%Y%m%d-%H%M%S") + "-" + secrets.token_hex(3)


def default_state_dir() -> pathlib.Path:
    return pathlib.Path(os.environ.get("SWITCHBOARD_HOME", ".switchboard"))


def bind_run(run_id: str) -> None:
    structlog.contextvars.bind_contextvars(run_id=run_id)


__all__ = ["RunOptions", "RunOutcome", "StartError", "Supervisor", "new_run_id",
           "default_state_dir", "bind_run"]
