"""Owns the orchestrator's view of workers: local worker processes, connected workers, leases.

Pure bookkeeping (`WorkerTable`) plus a thin trio shell that spawns and stops local worker
processes (`LocalProcesses`). A lease is valid until `expires`; heartbeats push it forward.
A worker that stops heartbeating (killed, partitioned) loses its leases when they expire, and
is forgotten when it has not been heard from for a lease TTL (so `pick` never chooses it).
"""

from __future__ import annotations

import heapq
import os
import signal
import subprocess
import sys
from collections import OrderedDict, deque
from collections.abc import Awaitable, Callable

import attrs
import trio

from bus.logs import get_logger
from orchestrator.serving import read_lines

log = get_logger("orchestrator.workers")

RETIRED_MAX = 100_000  # leases remembered after they ended, to tell a late result from a forged one
# local worker processes one orchestrator starts at most (run --workers, scale N): more
# than a few per core only adds start-up time; other machines' workers join by hand
MAX_LOCAL_WORKERS = 256
STDERR_TAIL_LINES = 20  # lines of a local worker's stderr kept for the run log when it exits
STDERR_LINE_MAX = 500  # characters kept per stderr line


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
    # When a lease held here last expired. True iff last_seen <= lease_expired_at: the worker has
    # not been heard from since one of its leases ran out, so it may be dead and is not picked
    # (a lease granted just after its last heartbeat expires before the worker counts as silent).
    lease_expired_at: float = float("-inf")
    draining: bool = False
    held: set[tuple[str, int]] = attrs.field(factory=set)

    @property
    def free(self) -> int:
        return 0 if self.draining else max(self.capacity - len(self.held), 0)


@attrs.define
class WorkerTable:
    """Which workers are connected and which attempt each holds. No I/O.

    Invariant: every lease's worker is in `workers` and lists the lease in `held`; `retired`
    maps an attempt whose lease ended without a result (expired, worker gone) to the worker
    that held it, so that worker's late result is recognised as stale rather than forged.
    """

    lease_ttl: float
    workers: dict[str, WorkerRec] = attrs.field(factory=dict)
    leases: dict[tuple[str, int], LeaseRec] = attrs.field(factory=dict)
    retired: OrderedDict[tuple[str, int], str] = attrs.field(factory=OrderedDict)
    # (expiry when pushed, task, attempt) per granted lease: a min-heap, pruned lazily (a
    # released lease's entry is dropped when it reaches the top; a renewed one is pushed again
    # with its new expiry), so `expired` and `next_deadline` cost O(log n) per lease, not
    # O(leases) per call
    _expiry: list[tuple[float, str, int]] = attrs.field(factory=list)

    def hello(self, worker_id: str, capacity: int, pid: int | None, host: str, now: float) -> bool:
        """Register a worker; True iff it is new (a reconnecting worker keeps its leases)."""
        rec = self.workers.get(worker_id)
        if rec is None:
            self.workers[worker_id] = WorkerRec(worker_id=worker_id, capacity=max(1, capacity),
                                                pid=pid, host=host, last_seen=now)
            return True
        rec.capacity, rec.pid, rec.host, rec.last_seen = max(1, capacity), pid, host, now
        return False

    def heartbeat(self, worker_id: str, held: list[tuple[str, int]], now: float) -> list[tuple[str, int]]:
        """Renew the leases `worker_id` still holds; return the attempts it runs that are not
        leased to it (stale: the orchestrator gave up on them) so the caller cancels them."""
        rec = self.workers.get(worker_id)
        if rec is None:
            return []
        rec.last_seen = now
        stale = []
        for key in held:
            lease = self.leases.get(key)
            if lease is not None and lease.worker_id == worker_id:
                lease.expires = now + self.lease_ttl
            else:
                stale.append(key)
        return stale

    def pick(self) -> WorkerRec | None:
        """The connected, non-draining worker with the most free slots (ties: oldest)."""
        best = None
        for rec in self.workers.values():
            if rec.last_seen <= rec.lease_expired_at:
                continue  # suspect: silent since a lease of its expired
            if rec.free > 0 and (best is None or rec.free > best.free):
                best = rec
        return best

    def grant(self, task_id: str, attempt: int, worker_id: str, now: float) -> None:
        self.leases[(task_id, attempt)] = LeaseRec(task_id, attempt, worker_id,
                                                   now + self.lease_ttl)
        heapq.heappush(self._expiry, (now + self.lease_ttl, task_id, attempt))
        self.workers[worker_id].held.add((task_id, attempt))

    def holder(self, task_id: str, attempt: int) -> str | None:
        lease = self.leases.get((task_id, attempt))
        return lease.worker_id if lease else None

    def earlier_held(self, task_id: str, attempt: int) -> bool:
        """True iff a worker still holds an earlier attempt of `task_id`: one the scheduler
        ended (timed out) that its worker has not yet reported stopped."""
        return any((task_id, a) in self.leases for a in range(1, attempt))

    def release(self, task_id: str, attempt: int) -> None:
        """The attempt reported: forget its lease."""
        lease = self.leases.pop((task_id, attempt), None)
        if lease is not None and lease.worker_id in self.workers:
            self.workers[lease.worker_id].held.discard((task_id, attempt))

    def _retire(self, lease: LeaseRec) -> None:
        self.retired[(lease.task_id, lease.attempt)] = lease.worker_id
        while len(self.retired) > RETIRED_MAX:
            self.retired.popitem(last=False)

    def expired(self, now: float) -> list[LeaseRec]:
        """Leases past their deadline, removed from the table (their attempts are lost)."""
        gone = []
        heap = self._expiry
        while heap and heap[0][0] <= now:
            _, task_id, attempt = heapq.heappop(heap)
            lease = self.leases.get((task_id, attempt))
            if lease is None:
                continue  # released or removed since
            if lease.expires > now:  # renewed by a heartbeat: look again then
                heapq.heappush(heap, (lease.expires, task_id, attempt))
            else:
                gone.append(lease)
        for lease in gone:
            rec = self.workers.get(lease.worker_id)
            if rec is not None:
                rec.lease_expired_at = now
            self.release(lease.task_id, lease.attempt)
            self._retire(lease)
        return gone

    def remove_worker(self, worker_id: str) -> list[LeaseRec]:
        """Forget a worker; return the leases it held (their attempts are lost)."""
        rec = self.workers.pop(worker_id, None)
        if rec is None:
            return []
        lost = [self.leases.pop(key) for key in list(rec.held) if key in self.leases]
        for lease in lost:
            self._retire(lease)
        return lost

    def dead_workers(self, now: float) -> list[str]:
        """Workers not heard from (hello or heartbeat) for a lease TTL: a lease granted when
        it was last heard from expires now too, so it must not be picked again."""
        return [w for w, rec in self.workers.items() if now - rec.last_seen >= self.lease_ttl]

    def next_deadline(self) -> float | None:
        """The earliest time a lease expires or a silent worker counts as dead."""
        heap = self._expiry
        while heap and (heap[0][1], heap[0][2]) not in self.leases:
            heapq.heappop(heap)
        # the top may be a renewed lease's old expiry: an early wakeup, never a late one
        times = [heap[0][0]] if heap else []
        times += [rec.last_seen + self.lease_ttl for rec in self.workers.values()]
        return min(times) if times else None

    @property
    def active(self) -> int:
        return sum(1 for r in self.workers.values() if not r.draining)


ExitCallback = Callable[[str, int, list[str]], Awaitable[None]]


@attrs.define
class LocalProcesses:
    """Worker processes this orchestrator started; all of them die with it.

    Each worker's stdout is discarded (it prints nothing; its log lines travel over the bus
    with --ship-logs) and the tail of its stderr (tracebacks, "cannot reach the bus") is kept
    and handed to `on_exit`, so a crash is explained in the run log.
    """

    url: str
    token: str
    state_dir: str
    capacity: int
    extra_args: tuple[str, ...] = ()
    procs: dict[str, trio.Process] = attrs.field(factory=dict)
    draining: set[str] = attrs.field(factory=set)  # ids asked to drain (or to stop)
    counter: int = 0

    def next_id(self) -> str:
        self.counter += 1
        return f"w{self.counter}-{os.getpid()}"

    def live(self) -> list[str]:
        """Ids of running workers not asked to drain (what `scale` counts)."""
        return [w for w, p in self.procs.items() if p.returncode is None and w not in self.draining]

    async def spawn(self, nursery: trio.Nursery, on_exit: ExitCallback) -> str:
        worker_id = self.next_id()
        env = dict(os.environ)
        env["SWITCHBOARD_TOKEN"] = self.token
        env.setdefault("PYTHONUNBUFFERED", "1")
        cmd = [sys.executable, "-m", "orchestrator", "worker", "--connect", self.url,
               "--worker-id", worker_id, "--capacity", str(self.capacity),
               "--state-dir", self.state_dir, "--ship-logs", "--quiet", "--parent-pid", str(os.getpid()),
               *self.extra_args]
        proc = await trio.lowlevel.open_process(cmd, env=env, stdin=subprocess.DEVNULL,
                                                stdout=subprocess.DEVNULL,
                                                stderr=subprocess.PIPE)
        self.procs[worker_id] = proc
        log.info("worker.spawned", worker_id=worker_id, pid=proc.pid)
        tail: deque[str] = deque(maxlen=STDERR_TAIL_LINES)

        def keep(lines: list[bytes]) -> None:
            tail.extend(line.decode(errors="replace")[:STDERR_LINE_MAX] for line in lines
                        if line.strip())

        async def read_stderr() -> None:
            assert proc.stderr is not None
            await read_lines(proc.stderr, keep, max_line=STDERR_LINE_MAX * 4)

        async def watch() -> None:
            async with trio.open_nursery() as n:
                n.start_soon(read_stderr)
                code = await proc.wait()
                # a tool process that inherited the pipe could hold it open: bounded wait
                n.cancel_scope.deadline = trio.current_time() + 0.5
            self.procs.pop(worker_id, None)
            try:  # on_exit reads `draining`: was this exit asked for (drain, stop, run end)?
                await on_exit(worker_id, code, list(tail))
            finally:
                self.draining.discard(worker_id)

        nursery.start_soon(watch)
        return worker_id

    def kill(self, worker_id: str) -> None:
        proc = self.procs.get(worker_id)
        if proc is not None and proc.returncode is None:
            proc.kill()

    def terminate(self, worker_id: str) -> None:
        proc = self.procs.get(worker_id)
        if proc is not None and proc.returncode is None:
            self.draining.add(worker_id)
            try:
                proc.send_signal(signal.SIGTERM)
            except ProcessLookupError:
                pass

    async def stop_all(self, grace: float = 3.0, hurry: trio.Event | None = None) -> None:
        """SIGTERM every worker, SIGKILL whoever is still there after `grace` seconds (or as
        soon as `hurry` is set). Shielded: runs to the end even while the run is cancelled."""
        with trio.CancelScope(shield=True):
            procs = list(self.procs.items())
            for wid, _proc in procs:
                self.terminate(wid)

            async def wait_all() -> None:
                for _wid, proc in procs:
                    await proc.wait()

            with trio.move_on_after(grace):
                async with trio.open_nursery() as n:
                    if hurry is not None:
                        async def on_hurry() -> None:
                            await hurry.wait()
                            n.cancel_scope.cancel()
                        n.start_soon(on_hurry)
                    await wait_all()
                    n.cancel_scope.cancel()
            for _wid, proc in procs:
                if proc.returncode is None:
                    proc.kill()
                    await proc.wait()
