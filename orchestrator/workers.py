"""Owns the orchestrator's view of workers: local worker processes, connected workers, leases.

Pure bookkeeping (`WorkerTable`) plus a thin trio shell that spawns and stops local worker
processes (`LocalProcesses`). A lease is valid until `expires`; heartbeats push it forward.
A worker that stops heartbeating (killed, partitioned) loses its leases when they expire.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from typing import Any

import attrs
import trio

from bus.logs import get_logger

log = get_logger("orchestrator.workers")


@attrs.define
class LeaseRec:
    task_id: str
    attempt: int
    worker_id: str
    expires: float


@attrs.define
class WorkerRec:
    worker_id: str
    capacity: int
    pid: int | None = None
    host: str = ""
    last_seen: float = 0.0
    draining: bool = False
    held: set[tuple[str, int]] = attrs.field(factory=set)

    @property
    def free(self) -> int:
        return 0 if self.draining else max(self.capacity - len(self.held), 0)


@attrs.define
class WorkerTable:
    """Which workers are connected and which attempt each holds. No I/O."""

    lease_ttl: float
    workers: dict[str, WorkerRec] = attrs.field(factory=dict)
    leases: dict[tuple[str, int], LeaseRec] = attrs.field(factory=dict)

    def hello(self, worker_id: str, capacity: int, pid: int | None, host: str, now: float) -> bool:
        """Register a worker; True iff it is new (a reconnecting worker keeps its leases)."""
        rec = self.workers.get(worker_id)
        if rec is None:
            self.workers[worker_id] = WorkerRec(worker_id=worker_id, capacity=max(1, capacity),
                                                pid=pid, host=host, last_seen=now)
            return True
        rec.capacity, rec.pid, rec.host, rec.last_seen = max(1, capacity), pid, host, now
        return False

    def heartbeat(self, worker_id: str, held: list[tuple[str, int]], now: float) -> None:
        rec = self.workers.get(worker_id)
        if rec is None:
            return
        rec.last_seen = now
        for key in held:
            lease = self.leases.get(key)
            if lease is not None and lease.worker_id == worker_id:
                lease.expires = now + self.lease_ttl

    def pick(self) -> WorkerRec | None:
        """The connected, non-draining worker with the most free slots (ties: oldest)."""
        best = None
        for rec in self.workers.values():
            if rec.free > 0 and (best is None or rec.free > best.free):
                best = rec
        return best

    def grant(self, task_id: str, attempt: int, worker_id: str, now: float) -> None:
        self.leases[(task_id, attempt)] = LeaseRec(task_id, attempt, worker_id,
                                                   now + self.lease_ttl)
        self.workers[worker_id].held.add((task_id, attempt))

    def holder(self, task_id: str, attempt: int) -> str | None:
        lease = self.leases.get((task_id, attempt))
        return lease.worker_id if lease else None

    def release(self, task_id: str, attempt: int) -> None:
        lease = self.leases.pop((task_id, attempt), None)
        if lease is not None and lease.worker_id in self.workers:
            self.workers[lease.worker_id].held.discard((task_id, attempt))

    def expired(self, now: float) -> list[LeaseRec]:
        """Leases past their deadline, removed from the table (their attempts are lost)."""
        gone = [lease for lease in self.leases.values() if lease.expires <= now]
        for lease in gone:
            self.release(lease.task_id, lease.attempt)
        return gone

    def remove_worker(self, worker_id: str) -> list[LeaseRec]:
        """Forget a worker; return the leases it held (their attempts are lost)."""
        rec = self.workers.pop(worker_id, None)
        if rec is None:
            return []
        lost = [lease for lease in self.leases.values() if lease.worker_id == worker_id]
        for lease in lost:
            self.leases.pop((lease.task_id, lease.attempt), None)
        return lost

    def dead_workers(self, now: float) -> list[str]:
        return [w for w, rec in self.workers.items() if now - rec.last_seen > self.lease_ttl]

    @property
    def active(self) -> int:
        return sum(1 for r in self.workers.values() if not r.draining)


@attrs.define
class LocalProcesses:
    """Worker processes this orchestrator started; all of them die with it."""

    url: str
    token: str
    state_dir: str
    capacity: int
    extra_args: tuple[str, ...] = ()
    procs: dict[str, trio.Process] = attrs.field(factory=dict)
    counter: int = 0

    def next_id(self) -> str:
        self.counter += 1
        return f"w{self.counter}-{os.getpid()}"

    async def spawn(self, nursery: trio.Nursery, on_exit: Any) -> str:
        worker_id = self.next_id()
        env = dict(os.environ)
        env["SWITCHBOARD_TOKEN"] = self.token
        env.setdefault("PYTHONUNBUFFERED", "1")
        cmd = [sys.executable, "-m", "orchestrator", "worker", "--connect", self.url,
               "--worker-id", worker_id, "--capacity", str(self.capacity),
               "--state-dir", self.state_dir, "--ship-logs", *self.extra_args]
        proc = await trio.lowlevel.open_process(cmd, env=env, stdin=subprocess.DEVNULL,
                                                stdout=subprocess.DEVNULL,
                                                stderr=subprocess.DEVNULL)
        self.procs[worker_id] = proc
        log.info("worker.spawned", worker_id=worker_id, pid=proc.pid)

        async def watch() -> None:
            code = await proc.wait()
            self.procs.pop(worker_id, None)
            await on_exit(worker_id, code)

        nursery.start_soon(watch)
        return worker_id

    async def stop_all(self, grace: float = 3.0) -> None:
        """SIGTERM every worker, SIGKILL whoever is still there after `grace` seconds."""
        with trio.CancelScope(shield=True):
            for proc in list(self.procs.values()):
                if proc.returncode is None:
                    try:
                        proc.send_signal(signal.SIGTERM)
                    except ProcessLookupError:
                        pass
            with trio.move_on_after(grace):
                for proc in list(self.procs.values()):
                    await proc.wait()
            for proc in list(self.procs.values()):
                if proc.returncode is None:
                    proc.kill()
                    await proc.wait()
