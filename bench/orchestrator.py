"""Orchestrator benchmark: per-task orchestration overhead across processes, and memory per
idle agent session.

    python bench/orchestrator.py            # 10,000 tasks, 1,000 sessions
    python bench/orchestrator.py --quick    # 2,000 tasks, 1,000 sessions (under 60 s)

Cost model: the embedded sim model with model time zero (no prefill, no decode, no time to
first token): every model turn still really encodes, sends, decodes and tokenizes. What is
measured is everything else.

1. Throughput: one graph of N independent tasks (one agent, one model turn each) run by the
   real supervisor (in this process: hub, scheduler, journal in WAL SQLite, logs at info into
   the run's log.jsonl), the embedded sim in its child process, and two real `orchestrator
   worker` processes dialing them over loopback WebSockets. Each task is a full attempt: journal (queued, started, ended,
   task row), lease over the bus, agent session on the worker (a model WebSocket from its
   pool, one turn, given back), result over the bus, dependents. `overhead_us_per_task` = wall time from the
   first lease to the last result / N (worker start-up excluded and reported apart);
   `tasks_per_s` = N / that time.

2. Sessions: S agent sessions held open at once, idle. A *session* is one leased task attempt
   running on a worker: its cancel scope and agent loop, its model WebSocket (client side in
   the worker, connection state and cached context in the sim server), its transcript after
   one model turn, its tool registry, its `task.<id>` alias on the bus, and its lease in the
   supervisor; it sits in a Python tool (`hold`) awaiting a release file. RSS of every process
   holding them (this process: supervisor, hub; the sim's process; both workers) is measured with one
   session open and with S + 1 open; `kb_per_idle_session` = the difference / S.

Where the sim runs: by default the task graph is run twice, first with the embedded sim in a
child process of its own, as `orchestrator run` starts it (orchestrator.simproc: the headline
figures), then inside the orchestrator's process (`run --sim-in-process`: `sim_in_process` in
the JSON). `--layout embedded` or `--layout in-process` runs one. On the 2-core box the child
is faster (2026-11-26, one full run: 270.2 against 411.2 us per task): inside the orchestrator
the sim takes a large share of its one event loop, so that process is the bottleneck. The
sessions measure counts the sim's process too: it holds each session's context.

These shared machines change speed by ~1.4x and more within minutes (CPU per task of the same
code: 487-569 us on a fast stretch, 650-1,041 on slower ones, 2026-11-26): compare changes in
alternating runs, as docs/benchmarks.md does.

The orchestrator's own bus client reaches the embedded hub over memory channels (bus.local),
not a loopback WebSocket, and lone ACKs wait up to 20 ms for data to carry them. Measured
alternating with the commit before them (2,000 tasks, load 1.4-2.1 from other work on the box):
`--quick`: orchestrator CPU 2,260-2,380 -> 2,095-2,235 us/task; `--quick --sessions 10`
(load 2.4-2.8): 2,725-2,805 -> 2,190-2,345; `--quick --model-process` (a sim started apart; a flag since removed): 585-640 -> 435-565.
Frames through the hub per 2,000 tasks: 3,564 -> 2,120. The orchestrator's link (1,574 ->
946) no longer is a WebSocket (each of its frames was one at the hub and one at the client,
both in this process); the worker links' WebSocket messages went 1,990 -> 1,174 (lone ACKs
786 -> 123). Wall time follows the load too closely to show the change on 2 shared cores.

The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys
import tempfile
import time
from typing import Any

REPO = pathlib.Path(__file__).resolve().parent.parent
POLL_S = 0.01  # how often the task bench looks for its first lease and for the end


async def hold(path: str) -> str:
    """Wait until the file `path` exists (the bench's idle tool).

    Args:
        path: the file to wait for
    """
    import trio

    while not os.path.exists(path):  # noqa: ASYNC110, ASYNC240 - a file is the cross-process signal
        await trio.sleep(1.0)
    return "released"


def _rss_kb(pid: int) -> int:
    for line in pathlib.Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def _cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process so far."""
    fields = pathlib.Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _graph_tasks(n: int) -> str:
    parts = ['[run]\nmax_concurrent = 512\nretries = 0\ntimeout = "10m"\n'
             '[agents.a]\ninstructions = "answer"\nscript = [{text = "ok"}]\n']
    parts += [f'[[tasks]]\nid = "t{i}"\nagent = "a"\nprompt = "task {i}"\n' for i in range(n)]
    return "".join(parts)


def _graph_sessions(n: int, gate: pathlib.Path, release: pathlib.Path) -> str:
    parts = [f'[run]\nmax_concurrent = {n + 1}\ntimeout = "10m"\n'
             '[agents.gate]\ninstructions = "wait"\ntools = ["bench.orchestrator:hold"]\n'
             f'script = [{{call = {{name = "hold", arguments = {{path = "{gate}"}}}}}}, '
             '{text = "open"}]\n'
             '[agents.idle]\ninstructions = "wait"\ntools = ["bench.orchestrator:hold"]\n'
             f'script = [{{call = {{name = "hold", arguments = {{path = "{release}"}}}}}}, '
             '{text = "done"}]\n'
             '[[tasks]]\nid = "gate"\nagent = "gate"\nprompt = "go"\n']
    parts += [f'[[tasks]]\nid = "s{i}"\nagent = "idle"\nneeds = ["gate"]\nprompt = "idle {i}"\n'
              for i in range(n)]
    return "".join(parts)


def _supervisor(text: str, state: pathlib.Path, *, capacity: int, log_level: str,
                sim_process: bool = True) -> Any:
    from bus.logs import configure_logging
    from bus.runtime import tune_process
    from modellink.sim import SimConfig
    from orchestrator import scheduler as S
    from orchestrator.graph import GraphSpec
    from orchestrator.journal import Journal
    from orchestrator.supervisor import RunOptions, Supervisor, bind_run

    graph = GraphSpec.from_text(text, "bench.toml")
    state.mkdir(parents=True, exist_ok=True)
    journal = Journal.open(state / "journal.sqlite")
    run_id = f"bench-{time.time_ns()}"
    journal.create_run(run_id, graph_path="bench.toml", graph_text=text)
    (state / "runs" / run_id).mkdir(parents=True)
    # unbuffered, as `orchestrator run` writes it (a line is in the file when it is logged)
    log_f = open(state / "runs" / run_id / "log.jsonl", "ab", buffering=0)  # noqa: SIM115

    def sink(line: bytes) -> None:
        log_f.write(line + b"\n")

    configure_logging(json=True, level=log_level, tee=sink, quiet=True)
    tune_process()  # as `orchestrator run` does before its event loop
    bind_run(run_id)
    opts = RunOptions(state_dir=state, workers=2, worker_capacity=capacity,
                      sim=SimConfig.zero(), progress="none", lease_ttl_s=30.0,
                      sim_process=sim_process, log_level=log_level,
                      worker_args=("--log-level", log_level))
    return Supervisor(graph=graph, journal=journal, run_id=run_id, opts=opts,
                      scheduler=S.Scheduler(graph), sink=sink)


def _pids(sup: Any) -> dict[str, int]:
    """The run's processes: this one (supervisor, hub; the sim too with --sim-in-process),
    the sim's own process, the workers."""
    out = {"orchestrator": os.getpid()}
    if sup.sim_proc is not None:
        out["model_server"] = sup.sim_proc.proc.pid
    if sup.procs is not None:
        out.update({w: p.pid for w, p in sup.procs.procs.items()})
    return out


async def bench_tasks(n: int, state: pathlib.Path, log_level: str,
                      sim_process: bool = True) -> dict[str, Any]:
    import trio

    sup = _supervisor(_graph_tasks(n), state, capacity=256, log_level=log_level,
                      sim_process=sim_process)
    marks: dict[str, float] = {}

    cpu: dict[str, float] = {}

    async def watch() -> None:  # polling: the bench must not change what it measures
        # every POLL_S: polling every 1 ms alone costs ~6% of a core (measured: 1,000 trio
        # wakeups a second), ~150 us of the orchestrator's CPU per task at 400 tasks/s;
        # every 10 ms costs a tenth of that and bounds the timing error at 10 ms
        t0 = time.perf_counter()
        while not sup.table.leases:  # noqa: ASYNC110
            await trio.sleep(POLL_S)
        marks["first_lease"] = time.perf_counter()
        marks["startup"] = marks["first_lease"] - t0
        for k, pid in _pids(sup).items():
            cpu[k] = -_cpu_s(pid)
        while not sup.sched.done:  # noqa: ASYNC110
            await trio.sleep(POLL_S)
        marks["done"] = time.perf_counter()
        for k, pid in _pids(sup).items():
            cpu[k] = cpu.get(k, 0.0) + _cpu_s(pid)

    t0 = time.perf_counter()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(watch)
        outcome = await sup.run()
    wall = time.perf_counter() - t0
    busy = marks["done"] - marks["first_lease"]
    assert outcome.status == "succeeded", outcome
    attempts = sup.journal.conn.execute(
        "SELECT COUNT(*) FROM attempts WHERE run_id = ? AND state = 'succeeded'",
        (sup.run_id,)).fetchone()[0]
    assert attempts == n, attempts
    return {"tasks": n, "seconds_first_lease_to_done": round(busy, 3),
            "worker_startup_s": round(marks["startup"], 3), "run_wall_s": round(wall, 3),
            "overhead_us_per_task": round(busy / n * 1e6, 1),
            "tasks_per_s": round(n / busy, 1),
            "cpu_us_per_task": {k: round(v / n * 1e6, 1) for k, v in cpu.items()},
            "cpu_us_per_task_total": round(sum(cpu.values()) / n * 1e6, 1)}


async def bench_sessions(n: int, state: pathlib.Path, log_level: str) -> dict[str, Any]:
    import trio

    gate, release = state / "GATE", state / "RELEASE"
    sup = _supervisor(_graph_sessions(n, gate, release), state, capacity=n, log_level=log_level)
    out: dict[str, Any] = {}

    def rss() -> dict[str, int]:
        return {k: _rss_kb(pid) for k, pid in _pids(sup).items()}

    def running() -> int:
        return int(sup.sched.counts().get("running", 0))

    async def drive() -> None:
        while running() < 1 or len(sup.table.workers) < 2:  # noqa: ASYNC110
            await trio.sleep(0.05)
        await trio.sleep(1.5)  # the gate session is in its tool; workers settled
        before = rss()
        gate.write_text("go")
        t0 = time.perf_counter()
        while running() < n:  # noqa: ASYNC110
            await trio.sleep(0.05)
        out["open_s"] = round(time.perf_counter() - t0, 3)
        # every session has had its model turn and sits in the tool
        while sup.table.leases and len(sup.table.leases) < n:  # noqa: ASYNC110
            await trio.sleep(0.05)
        await trio.sleep(3.0)
        after = rss()
        out["rss_kb_before"], out["rss_kb_after"] = before, after
        out["kb_per_idle_session"] = round((sum(after.values()) - sum(before.values())) / n, 1)
        out["kb_per_idle_session_by_process"] = {
            k: round((after[k] - before.get(k, 0)) / n, 1) for k in after}
        release.write_text("go")

    async with trio.open_nursery() as nursery:
        nursery.start_soon(drive)
        outcome = await sup.run()
    assert outcome.status == "succeeded", outcome
    out["concurrent_sessions"] = n
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="2,000 tasks instead of 10,000")
    ap.add_argument("--tasks", type=int, default=None)
    ap.add_argument("--sessions", type=int, default=1000)
    ap.add_argument("--log-level", default="info")
    ap.add_argument("--layout", choices=("both", "embedded", "in-process"), default="both",
                    help="where the embedded sim runs for the task graph: in a child process "
                    "of its own (`orchestrator run`'s default), inside the orchestrator's "
                    "process (`run --sim-in-process`), or both one after the other (default)")
    args = ap.parse_args()
    n = args.tasks or (2000 if args.quick else 10_000)
    sys.path.insert(0, str(REPO))
    os.environ["PYTHONPATH"] = str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")
    import trio

    result: dict[str, Any] = {"quick": args.quick, "cost_model": "sim, model time zero",
                              "workers": 2, "log_level": args.log_level}
    layouts = ("embedded", "in-process") if args.layout == "both" else (args.layout,)
    with tempfile.TemporaryDirectory() as tmp:
        for layout in layouts:
            t = trio.run(bench_tasks, n, pathlib.Path(tmp) / f"tasks-{layout}",
                         args.log_level, layout == "embedded")
            print(f"tasks (sim {layout}): {json.dumps(t)}", file=sys.stderr)
            if layout == layouts[0]:  # the headline figures: the first layout run
                result["layout"] = layout
                result.update(t)
            else:
                result["sim_in_process"] = {k: t[k] for k in (
                    "overhead_us_per_task", "tasks_per_s", "cpu_us_per_task",
                    "cpu_us_per_task_total")}
        s = trio.run(bench_sessions, args.sessions, pathlib.Path(tmp) / "sessions",
                     args.log_level)
        print(f"sessions: {json.dumps(s)}", file=sys.stderr)
        result.update(s)
    result["targets"] = {"overhead_us_per_task": 300, "concurrent_sessions": 1000,
                         "kb_per_idle_session": 100}
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
