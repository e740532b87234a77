"""`orchestrator run FILE` and `orchestrator resume RUN`: the main job."""

from __future__ import annotations

import argparse
import math
import pathlib
import sys
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from modellink.sim import SimConfig

EXIT_OK, EXIT_TASK_FAILED, EXIT_BAD_INPUT, EXIT_INTERNAL, EXIT_CANCELLED = 0, 1, 2, 3, 130


def _common(p: argparse.ArgumentParser) -> None:
    import os

    p.add_argument("--workers", type=int, default=2,
                   help="local worker processes to start (default 2; 0 = remote workers only)")
    p.add_argument("--capacity", type=int, default=16,
                   help="task attempts each local worker runs at once (default 16)")
    p.add_argument("--state-dir", default=os.environ.get("SWITCHBOARD_HOME", ".switchboard"),
                   help="journal, logs and workspaces (default $SWITCHBOARD_HOME or ./.switchboard)")
    p.add_argument("--bus-host", default="127.0.0.1",
                   help="address the embedded bus listens on (default 127.0.0.1; remote workers "
                   "need a reachable one, and then a token)")
    p.add_argument("--bus-port", type=int, default=0, help="bus port (default: any free port)")
    p.add_argument("--bus-url", default=None,
                   help="use an external hub (orchestrator bus) instead of the embedded one")
    p.add_argument("--advertise-host", default=None, metavar="HOST",
                   help="the host name remote workers reach this machine by, put in the bus URL "
                   "printed for them and the embedded sim's URL in leases (default: --bus-host, "
                   "or this machine's host name when that is 0.0.0.0)")
    p.add_argument("--model-url", default=None,
                   help="use an external model server for agents on the sim provider")
    p.add_argument("--token-file", metavar="FILE",
                   help="bus token (else SWITCHBOARD_TOKEN; else a random one for local workers)")
    p.add_argument("--lease-ttl", type=float, default=5.0,
                   help="seconds without a heartbeat after which a worker's attempts are re-queued")
    p.add_argument("--progress", choices=["auto", "tty", "plain", "none"], default="auto",
                   help="live progress on a terminal, plain lines otherwise (default auto)")
    p.add_argument("--log-level", default="info", help="debug, info, warning, error")
    p.add_argument("--sim-ttft", type=float, default=None,
                   help="embedded sim: seconds to first token")
    p.add_argument("--sim-prefill", type=float, default=None,
                   help="embedded sim: seconds per uncached input token")
    p.add_argument("--sim-decode", type=float, default=None,
                   help="embedded sim: seconds per output token")
    p.add_argument("--sim-zero", action="store_true",
                   help="embedded sim: model time zero (benchmarks of pure overhead)")
    p.add_argument("--sim-in-process", action="store_true",
                   help="embedded sim: run it inside the orchestrator's process instead of a "
                   "child process of its own (one process fewer; on many short tasks the "
                   "orchestrator's event loop then becomes the bottleneck)")


def add_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser(
        "run", help="run a task graph (the main job)",
        description="Validate FILE, start the bus, the embedded sim model and local workers, "
        "and run the graph to the end. Ctrl-C cancels the run cleanly. Progress and the "
        "summary go to stderr; the answer of each final task (one no other task needs) goes "
        "to stdout under a '== TASK ==' line.",
        epilog="exit codes: 0 all tasks succeeded, 1 a task failed, 2 bad input, 3 internal "
        "error, or the run stopped with no worker left, a disk that refused writes or the "
        "embedded sim's process gone "
        "(`resume` goes on with it), "
        "130 cancelled")
    p.add_argument("file", metavar="FILE", help="the task graph (TOML)")
    _common(p)
    p.set_defaults(func=run)
    r = sub.add_parser(
        "resume", help="finish a run after the orchestrator was killed, or after it stopped",
        description="Resume RUN from the journal: tasks that finished are not run again; "
        "attempts that were in flight are run again. RUN is one whose orchestrator was killed "
        "(still 'running' in the journal) or one that stopped because no worker was left, "
        "the disk refused writes or the embedded sim's process exited. "
        "The graph comes from the journal, not a file; a run whose orchestrator is still "
        "alive is refused. Output as for run.")
    r.add_argument("run", metavar="RUN", help="run id, unique prefix, or 'latest'")
    _common(r)
    r.set_defaults(func=run_resume)


def _options(args: argparse.Namespace, token: str | None) -> object:
    from orchestrator.supervisor import RunOptions

    sim = _sim(args)  # _check_args has refused bad values
    return RunOptions(state_dir=pathlib.Path(args.state_dir), workers=args.workers,
                      worker_capacity=args.capacity, bus_host=args.bus_host,
                      bus_port=args.bus_port, bus_url=args.bus_url, token=token,
                      advertise_host=args.advertise_host,
                      model_url=args.model_url, sim=sim, lease_ttl_s=args.lease_ttl,
                      sim_process=not args.sim_in_process, log_level=args.log_level,
                      progress=args.progress,
                      # local workers log (and ship) at the run's level: debug has per turn lines
                      worker_args=("--log-level", args.log_level))


def _sim(args: argparse.Namespace) -> SimConfig:
    """The embedded sim's config from --sim-*. Raises ValueError naming a bad flag."""
    from orchestrator.cmd_model import sim_config

    return sim_config(args.sim_zero, args.sim_ttft, args.sim_prefill, args.sim_decode,
                      prefix="--sim-")


def _check_args(args: argparse.Namespace) -> str | None:
    from bus.tokens import is_loopback
    from orchestrator.workers import MAX_LOCAL_WORKERS

    if not 0 <= args.workers <= MAX_LOCAL_WORKERS:
        return (f"--workers must be 0..{MAX_LOCAL_WORKERS} (local worker processes; more "
                "machines join with `orchestrator worker --connect URL`)")
    if args.capacity < 1:
        return "--capacity must be at least 1"
    if not 0 < args.lease_ttl < math.inf:
        return "--lease-ttl must be a positive number of seconds"
    try:
        _sim(args)
    except ValueError as exc:
        return str(exc)
    if not (0 <= args.bus_port <= 65535):
        return "--bus-port must be 0..65535"
    if args.bus_url is None and not is_loopback(args.bus_host) and args.token is None:
        return (f"--bus-host {args.bus_host} is reachable from other machines, so the bus needs "
                "a token: set SWITCHBOARD_TOKEN or pass --token-file")
    return None


def run(args: argparse.Namespace) -> int:
    from orchestrator.runner import start_run

    return start_run(args, resume_run=None)


def run_resume(args: argparse.Namespace) -> int:
    from orchestrator.runner import start_run

    return start_run(args, resume_run=args.run)


__all__ = ["add_parser", "run", "run_resume", "_options", "_check_args", "sys"]
