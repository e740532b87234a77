"""Owns one run: the bus hub, the embedded sim model, worker processes, leases and the journal.

Nursery tree: run -> (hub, model server, bus client, workers, dispatcher). The scheduler
decides what runs; this module turns its actions into leases, journal rows and bus messages,
and turns bus messages back into scheduler events. Every state change is journaled before it
is acted on (a lease is written before it is sent; a result before dependents start).
"""

from __future__ import annotations

import os
import pathlib
import secrets
import signal
import sys
import time
from collections import deque
from typing import Any

import attrs
import structlog
import trio

from agents import protocol as P
from bus.client import open_bus_client
from bus.config import HubConfig
from bus.errors import BusError
from bus.hub import serve_bus
from bus.logs import get_logger
from modellink.server import ModelServerConfig, serve_model
from modellink.sim import SimConfig
from orchestrator import scheduler as S
from orchestrator.graph import GraphSpec
from orchestrator.journal import Journal
from orchestrator.progress import Progress
from orchestrator.workers import LocalProcesses, WorkerTable

log = get_logger("orchestrator.supervisor")

CONTROL_POLL_S = 0.25  # how often `orchestrator cancel/scale` requests are picked up


@attrs.frozen(kw_only=True)
class RunOptions:
    state_dir: pathlib.Path
    workers: int = 2
    worker_capacity: int = 16
    bus_host: str = "127.0.0.1"
    bus_port: int = 0
    bus_url: str | None = None  # an external hub; None starts one in this process
    token: str | None = None
    model_url: str | None = None  # an external model server; None embeds the sim
    sim: SimConfig = SimConfig()
    lease_ttl_s: float = 5.0
    progress: str = "auto"  # auto | tty | plain | none
    worker_args: tuple[str, ...] = ()
    resume: bool = False


@attrs.define
class RunOutcome:
    run_id: str
    status: str  # succeeded | failed | cancelled
    summary: dict[str, Any]


class Supervisor:
    def __init__(self, *, graph: GraphSpec, journal: Journal, run_id: str, opts: RunOptions,
                 scheduler: S.Scheduler) -> None:
        self.graph = graph
        self.journal = journal
        self.run_id = run_id
        self.opts = opts
        self.sched = scheduler
        self.table = WorkerTable(lease_ttl=opts.lease_ttl_s)
        self.pending: deque[Any] = deque()  # StartAttempt actions waiting for a free worker
        self.waits: list[tuple[Any, list[str]]] = []  # (request message, children) for `wait`
        self.bus: Any = None
        self.procs: LocalProcesses | None = None
        self.model_base_url: str | None = None
        self.bus_url: str = ""
        self._wake = trio.Event()
        self._nursery: trio.Nursery | None = None
        self.target_workers = opts.workers
        self.cancel_reason: str | None = None
        self.tokens_out = 0
        self.started_wall = time.time()
        self.progress: Progress | None = None
        self.log_file = (opts.state_dir / "runs" / run_id / "log.jsonl")

    # ------------------------------------------------------------ entry

    async def run(self) -> RunOutcome:
        opts = self.opts
        token = opts.token or secrets.token_urlsafe(24)
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            if opts.bus_url is None:
                info = await nursery.start(serve_bus, HubConfig(
                    host=opts.bus_host, port=opts.bus_port, token=token))
                self.bus_url = info.url
            else:
                self.bus_url = opts.bus_url
            if opts.model_url is None and self._needs_embedded_model():
                minfo = await nursery.start(serve_model, ModelServerConfig(
                    host="127.0.0.1", port=0, token=None, sim=opts.sim))
                self.model_base_url = minfo.base_url
            else:
                self.model_base_url = opts.model_url
            log.info("run.start", bus=self.bus_url, model=self.model_base_url,
                     workers=opts.workers, tasks=len(self.graph.tasks))
            async with open_bus_client(self.bus_url, token=token,
                                       endpoint_id=P.ORCHESTRATOR_ID) as bus:
                self.bus = bus
                self.procs = LocalProcesses(url=self.bus_url, token=token,
                                            state_dir=str(opts.state_dir),
                                            capacity=opts.worker_capacity,
                                            extra_args=opts.worker_args)
                self.progress = Progress.make(opts.progress, total=self.sched.total())
                try:
                    async with trio.open_nursery() as inner:
                        inner.start_soon(self._receive_loop)
                        inner.start_soon(self._signals)
                        if self.progress is not None:
                            inner.start_soon(self._progress_loop)
                        for _ in range(opts.workers):
                            await self.procs.spawn(inner, self._on_process_exit)
                        await self._dispatch_loop()
                        await self._finish_workers()
                        inner.cancel_scope.cancel()
                finally:
                    if self.procs is not None:
                        await self.procs.stop_all()
            nursery.cancel_scope.cancel()
        outcome = self.sched.outcome()
        status = "cancelled" if self.cancel_reason else outcome
        summary = self.summary()
        self.journal.finish_run(self.run_id, status, summary=summary,
                                reason=self.cancel_reason)
        if self.progress is not None:
            self.progress.close(self._progress_state())
        log.info("run.end", status=status, **{k: v for k, v in summary.items() if k != "tasks"})
        return RunOutcome(run_id=self.run_id, status=status, summary=summary)

    def _needs_embedded_model(self) -> bool:
        return any(a.model.base_url is None for a in self.graph.agent_specs().values())

    # ------------------------------------------------------------ dispatch

    def wake(self) -> None:
        self._wake.set()

    async def _dispatch_loop(self) -> None:
        next_poll = trio.current_time()
        while not self.sched.done:
            now = trio.current_time()
            for lease in self.table.expired(now):
                log.warning("lease.expired", task_id=lease.task_id, attempt=lease.attempt,
                            worker_id=lease.worker_id)
                self._lost(lease.task_id, lease.attempt, f"lease expired on {lease.worker_id}")
            self.sched.check_timeouts(now)
            if now >= next_poll:
                self._poll_control()
                next_poll = now + CONTROL_POLL_S
            for act in self.sched.next_actions(now):
                if isinstance(act, S.StartAttempt):
                    self.journal.attempt_queued(self.run_id, act.task_id, act.attempt)
                    self.pending.append(act)
                elif isinstance(act, S.CancelAttempt):
                    await self._send_cancel(act.task_id, act.attempt, act.reason)
            await self._assign(now)
            self._answer_waits()
            self._sync_journal()
            if self.sched.done:
                break
            deadline = next_poll
            wake_at = self.sched.next_wakeup()
            if wake_at is not None:
                deadline = min(deadline, wake_at)
            if self.table.leases:
                deadline = min(deadline, min(lease.expires for lease in self.table.leases.values()))
            with trio.move_on_at(deadline):
                await self._wake.wait()
            self._wake = trio.Event()

    async def _assign(self, now: float) -> None:
        while self.pending:
            act = self.pending[0]
            if not self.sched.is_current(act.task_id, act.attempt):
                self.pending.popleft()
                continue
            worker = self.table.pick()
            if worker is None:
                return
            self.pending.popleft()
            spec = self.graph.agent_specs()[act.agent]
            lease = P.Lease(run_id=self.run_id, task_id=act.task_id, attempt=act.attempt,
                            agent=spec, prompt=act.prompt, timeout_s=act.timeout_s,
                            model_base_url=spec.model.base_url or self.model_base_url,
                            parent_task=act.parent)
            # journal first: a crash after this line re-runs the attempt, never loses it
            self.journal.attempt_started(self.run_id, act.task_id, act.attempt,
                                         worker.worker_id)
            self.table.grant(act.task_id, act.attempt, worker.worker_id, now)
            self.sched.on_started(act.task_id, act.attempt, now)
            try:
                await self.bus.send(P.worker_endpoint(worker.worker_id), P.to_wire(lease))
            except BusError as exc:
                log.warning("lease.send_failed", worker_id=worker.worker_id, error=str(exc))

    async def _send_cancel(self, task_id: str, attempt: int, reason: str) -> None:
        holder = self.table.holder(task_id, attempt)
        if holder is None:
            return
        try:
            await self.bus.send(P.worker_endpoint(holder), P.cancel(task_id, attempt, reason))
        except BusError as exc:
            log.warning("cancel.send_failed", worker_id=holder, error=str(exc))

    def _lost(self, task_id: str, attempt: int, why: str) -> None:
        self.journal.attempt_ended(self.run_id, task_id, attempt, "lost", error=why)
        self.sched.on_lost(task_id, attempt, trio.current_time())
        self.wake()

    def _sync_journal(self) -> None:
        self.journal.sync_tasks(self.run_id, self.sched.task_states())

    # ------------------------------------------------------------ bus input

    async def _receive_loop(self) -> None:
        async for msg in self.bus:
            try:
                body = P.parse_message(msg.payload())
            except Exception as exc:
                await self._cut_off(msg.source, f"protocol error: {exc}")
                continue
            worker_id = msg.source[len("worker."):] if msg.source.startswith("worker.") else None
            if isinstance(body, P.Result):
                self._on_result(msg.source, body)
            elif isinstance(body, dict):
                t = body["t"]
                if t == "hello" and worker_id:
                    self.table.hello(body["worker_id"], body["capacity"], body.get("pid"),
                                     str(body.get("host", "")), trio.current_time())
                    log.info("worker.joined", worker_id=body["worker_id"],
                             capacity=body["capacity"], host=body.get("host"))
                elif t == "heartbeat" and worker_id:
                    self.table.heartbeat(body["worker_id"],
                                         [(h[0], h[1]) for h in body["held"]],
                                         trio.current_time())
                elif t == "refused":
                    self.table.release(body["task_id"], body["attempt"])
                    self._lost(body["task_id"], body["attempt"], f"refused: {body.get('reason')}")
                elif t == "bye" and worker_id:
                    for lease in self.table.remove_worker(worker_id):
                        self._lost(lease.task_id, lease.attempt, "worker left")
                    log.info("worker.left", worker_id=worker_id, reason=body.get("reason"))
                elif t == "logs":
                    self._append_logs(body.get("lines") or [])
                elif t == "spawn" and msg.kind == "request":
                    await self._on_spawn(msg, body)
                elif t == "wait" and msg.kind == "request":
                    self.waits.append((msg, [str(c) for c in body.get("children") or []]))
            self.wake()

    def _on_result(self, source: str, res: P.Result) -> None:
        holder = self.table.holder(res.task_id, res.attempt)
        if holder is None or P.worker_endpoint(holder) != source or res.run_id != self.run_id:
            log.warning("result.refused", task_id=res.task_id, attempt=res.attempt,
                        source=source, holder=holder,
                        reason="attempt not leased to this worker (late, dead or foreign)")
            return
        self.table.release(res.task_id, res.attempt)
        now = trio.current_time()
        toks = sum(t.output_tokens for t in res.turns)
        self.tokens_out += toks
        record = {"text": res.text, "outputs": res.outputs}
        usage = _usage(res)
        # journal before the scheduler acts: dependents start only after this is durable
        self.journal.attempt_ended(self.run_id, res.task_id, res.attempt, res.status,
                                   error=res.error, result=record, usage=usage,
                                   stopped_at=res.stopped_at)
        if res.status == "succeeded":
            self.sched.on_succeeded(res.task_id, res.attempt, record, now)
        elif res.status == "cancelled":
            self.sched.on_cancelled(res.task_id, res.attempt, res.error or "cancelled", now)
        else:
            self.sched.on_failed(res.task_id, res.attempt, res.error or "failed", now)
        log.info("task.result", task_id=res.task_id, attempt=res.attempt, status=res.status,
                 worker_id=holder, error=res.error, output_tokens=toks)

    async def _on_spawn(self, msg: Any, body: dict[str, Any]) -> None:
        parent = str(body.get("parent"))
        agent = body.get("agent")
        try:
            child = self.sched.spawn_child(parent, prompt=str(body.get("prompt", "")),
                                           agent=str(agent) if agent else None,
                                           now=trio.current_time())
        except S.SchedulerError as exc:
            await self.bus.reply(msg, {"error": str(exc)})
            return
        self.journal.event(self.run_id, child, "spawned", {"parent": parent})
        await self.bus.reply(msg, {"child": child})

    def _answer_waits(self) -> None:
        if not self.waits or self._nursery is None:
            return
        still = []
        for msg, children in self.waits:
            states = {c: self.sched.task_result(c) for c in children}
            if all(s is not None and s["state"] in S.TERMINAL for s in states.values()):
                self._nursery.start_soon(self._reply_safe, msg, {"results": states})
            else:
                still.append((msg, children))
        self.waits = still

    async def _reply_safe(self, msg: Any, body: Any) -> None:
        try:
            await self.bus.reply(msg, body)
        except BusError as exc:
            log.warning("reply.failed", error=str(exc))

    async def _cut_off(self, source: str, why: str) -> None:
        log.warning("worker.cut_off", source=source, reason=why)
        if source.startswith("worker."):
            wid = source[len("worker."):]
            for lease in self.table.remove_worker(wid):
                self._lost(lease.task_id, lease.attempt, f"worker cut off: {why}")
            proc = self.procs.procs.get(wid) if self.procs else None
            if proc is not None and proc.returncode is None:
                proc.kill()

    async def _on_process_exit(self, worker_id: str, code: int) -> None:
        lost = self.table.remove_worker(worker_id)
        if code != 0 or lost:
            log.warning("worker.exited", worker_id=worker_id, code=code, lost=len(lost))
        for lease in lost:
            self._lost(lease.task_id, lease.attempt, f"worker {worker_id} exited with {code}")
        if (not self.sched.done and self.cancel_reason is None and self.procs is not None
                and self._nursery is not None and len(self.procs.procs) < self.target_workers):
            # a crashed local worker is replaced so the run keeps its capacity
            await self.procs.spawn(self._nursery, self._on_process_exit)

    # ------------------------------------------------------------ control

    def _poll_control(self) -> None:
        for req in self.journal.take_requests(self.run_id):
            if req["kind"] == "cancel":
                if req.get("task_id"):
                    log.info("cancel.task", task_id=req["task_id"])
                    self.sched.cancel(req["task_id"], "cancelled by request",
                                      trio.current_time())
                else:
                    self.cancel_run("cancelled by `orchestrator cancel`")
            elif req["kind"] == "scale":
                self._scale(int(req["arg"]))
        self.wake()

    def _scale(self, n: int) -> None:
        if self.procs is None or self._nursery is None:
            return
        self.target_workers = n
        have = [w for w, rec in self.table.workers.items() if not rec.draining]
        log.info("scale", target=n, have=len(have))
        if n > len(have):
            for _ in range(n - len(have)):
                self._nursery.start_soon(self.procs.spawn, self._nursery, self._on_process_exit)
        else:
            # drain the least loaded first: they finish what they hold, then exit
            for wid in sorted(have, key=lambda w: len(self.table.workers[w].held))[:len(have) - n]:
                self.table.workers[wid].draining = True
                self._nursery.start_soon(self._reply_drain, wid)

    async def _reply_drain(self, wid: str) -> None:
        try:
            await self.bus.send(P.worker_endpoint(wid), P.drain())
        except BusError as exc:
            log.warning("drain.send_failed", worker_id=wid, error=str(exc))

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
                if self.cancel_reason is not None:
                    raise KeyboardInterrupt  # second signal: stop waiting for workers
                self.cancel_run(f"received {name}")

    async def _finish_workers(self) -> None:
        """After the run: give cancelled attempts a moment to report, then drain the workers."""
        with trio.move_on_after(2.0):
            while self.table.leases:
                self._wake = trio.Event()
                await self._wake.wait()

    # ------------------------------------------------------------ logs and progress

    def _append_logs(self, lines: list[Any]) -> None:
        sink = getattr(self, "_sink", None)
        if sink is not None:
            for line in lines:
                if isinstance(line, bytes):
                    sink(line)

    def _progress_state(self) -> dict[str, Any]:
        counts = self.sched.counts()
        elapsed = max(time.time() - self.started_wall, 1e-9)
        return {"done": counts.get("succeeded", 0), "total": self.sched.total(),
                "running": counts.get("running", 0), "failed": counts.get("failed", 0),
                "workers": self.table.active, "tokens_per_s": self.tokens_out / elapsed,
                "elapsed": elapsed}

    async def _progress_loop(self) -> None:
        assert self.progress is not None
        while True:
            self.progress.update(self._progress_state())
            await trio.sleep(self.progress.interval)

    def summary(self) -> dict[str, Any]:
        usage = self.journal.usage_summary(self.run_id)
        counts = self.sched.counts()
        return {"run_id": self.run_id, "counts": counts, "usage": usage,
                "seconds": round(time.time() - self.started_wall, 3)}


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


__all__ = ["RunOptions", "RunOutcome", "Supervisor", "new_run_id", "default_state_dir",
           "bind_run", "sys"]
