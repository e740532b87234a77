"""`orchestrator worker`: a worker process that dials the orchestrator's bus and runs agents."""

from __future__ import annotations

import argparse
import os
import pathlib
import signal
import socket
import sys
from collections.abc import Mapping

from bus.tokens import TokenError, load_token

EXIT_OK, EXIT_BAD_INPUT, EXIT_INTERNAL, EXIT_CANCELLED = 0, 2, 3, 130
MODEL_TOKEN_ENV = "SWITCHBOARD_MODEL_TOKEN"  # agents.worker.MODEL_TOKEN_ENV (no agents import
# at module level: `orchestrator --help` stays fast)


def add_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser(
        "worker",
        help="run a worker that dials an orchestrator's bus and runs agent sessions",
        description="Run a worker process. It connects to the orchestrator's bus, registers its "
        "capacity, and runs the task attempts leased to it until drained or stopped. "
        "The token comes from SWITCHBOARD_TOKEN or --token-file, never the command line.",
    )
    p.add_argument("--connect", required=True, metavar="URL",
                   help="the orchestrator's bus URL, e.g. ws://host:7700/bus")
    p.add_argument("--token-file", metavar="FILE", help="file holding the bus token")
    p.add_argument("--model-token-file", metavar="FILE",
                   help="file holding the bearer token for a token-protected `orchestrator "
                   "model-server`, sent to sim endpoints whose agent names no api_key_env "
                   "(never to other URLs); else $SWITCHBOARD_MODEL_TOKEN")
    p.add_argument("--worker-id", default=None, help="unique id (default: HOST-PID)")
    p.add_argument("--capacity", type=int, default=8,
                   help="task attempts run at once (default 8)")
    p.add_argument("--state-dir", default=os.environ.get("SWITCHBOARD_HOME", ".switchboard"),
                   help="where task workspaces live (default $SWITCHBOARD_HOME or ./.switchboard)")
    p.add_argument("--pass-env", action="append", default=[], metavar="NAME",
                   help="environment variable the shell tool may see (repeatable); "
                   "others, secrets included, are not passed")
    p.add_argument("--ship-logs", action="store_true",
                   help="send this worker's log lines to the orchestrator's run log")
    p.add_argument("--parent-pid", type=int, default=None, metavar="PID",
                   help="stop (as on SIGTERM) when process PID is no longer this worker's "
                   "parent: local workers die with the orchestrator that started them, even "
                   "when it was killed with SIGKILL")
    p.add_argument("--quiet", action="store_true",
                   help="do not also print log lines on stderr (with --ship-logs they still "
                   "reach the run log; local workers run this way)")
    p.add_argument("--log-level", default="info", help="debug, info, warning, error")
    p.set_defaults(func=run)


def load_model_token(token_file: str | None, *,
                     env: Mapping[str, str] | None = None) -> str | None:
    """The model servers' bearer token: the file's content (stripped) if given, else
    $SWITCHBOARD_MODEL_TOKEN, else None. Raises TokenError for an unreadable or empty file."""
    environ = os.environ if env is None else env
    if token_file is None:
        return environ.get(MODEL_TOKEN_ENV, "").strip() or None
    try:
        # the same rules as the bus token's file (bus.tokens.load_token); a file wins
        return load_token(token_file, env={})
    except TokenError as exc:
        raise TokenError(str(exc).replace("--token-file or set SWITCHBOARD_TOKEN",
                                          f"--model-token-file or set {MODEL_TOKEN_ENV}")
                         ) from None


def run(args: argparse.Namespace) -> int:
    import trio  # imported here so `orchestrator --help` stays fast

    from agents.worker import LogShipper, Worker, WorkerConfig
    from bus.errors import CLOSE_GOING_AWAY, CLOSE_RESUME_REFUSED, BusAuthError, BusError
    from bus.logs import configure_logging
    from bus.runtime import tune_process
    from orchestrator.cli import leaves
    from orchestrator.serving import parent_pid_error, stop_with_parent

    if args.capacity < 1:
        print("error: --capacity must be at least 1", file=sys.stderr)
        return EXIT_BAD_INPUT
    bad_parent = parent_pid_error(args.parent_pid, "worker")
    if bad_parent is not None:
        print(f"error: {bad_parent}", file=sys.stderr)
        return EXIT_BAD_INPUT
    if not args.connect.startswith(("ws://", "wss://")):
        print(f"error: --connect {args.connect!r} is not a ws:// or wss:// URL", file=sys.stderr)
        return EXIT_BAD_INPUT
    try:
        token = load_token(args.token_file)
        model_token = load_model_token(args.model_token_file)
    except TokenError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    shipper = LogShipper() if args.ship_logs else None
    try:
        configure_logging(json=True, level=args.log_level,
                          tee=shipper.add if shipper else None,
                          quiet=bool(args.quiet and shipper is not None))
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    if token is not None:
        # the embedded sim takes the bus token as its key; leases name this variable
        # (tools never see it: the shell tool's environment is an allow-list)
        os.environ["SWITCHBOARD_TOKEN"] = token
    worker_id = args.worker_id or f"{socket.gethostname()}-{os.getpid()}"
    cfg = WorkerConfig(url=args.connect, token=token, worker_id=worker_id,
                       capacity=args.capacity,
                       workspace_root=pathlib.Path(args.state_dir) / "workspaces",
                       pass_env=tuple(args.pass_env), model_token=model_token)
    worker = Worker(config=cfg, shipper=shipper)
    # the guardian of tool process groups (a small Python process, ~15 ms of CPU to start) is
    # started now, and the built-in tools loaded (~8 ms), not inside the first attempt
    from agents.tools.registry import builtin_tools
    from agents.tools.shell import GUARDIAN
    GUARDIAN.start()
    builtin_tools()

    signalled = False

    async def main() -> int:
        nonlocal signalled
        async with trio.open_nursery() as nursery:
            async def on_signal() -> None:
                nonlocal signalled
                with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as sigs:
                    async for sig in sigs:
                        # first signal: cancel the attempts (each reports "cancelled"), then
                        # the worker ships its last log lines and says bye before it exits
                        if signalled or not worker.stop(f"received {signal.Signals(sig).name}"):
                            nursery.cancel_scope.cancel()  # second signal, or not serving yet
                            return
                        signalled = True

            nursery.start_soon(on_signal)
            if args.parent_pid is not None:
                # orphaned: the orchestrator is gone, and with it the bus and the model
                nursery.start_soon(stop_with_parent, args.parent_pid)
            code = await worker.run()
            nursery.cancel_scope.cancel()
            return EXIT_CANCELLED if signalled else code
        return EXIT_CANCELLED

    tune_process()
    try:
        return trio.run(main)
    except BaseException as exc:
        # trio wraps what escapes a nursery in exception groups: classify the leaves
        found = leaves(exc)
        if any(isinstance(e, KeyboardInterrupt) for e in found):
            return EXIT_CANCELLED
        auth = next((e for e in found if isinstance(e, BusAuthError)), None)
        if auth is not None:
            print(f"error: the bus refused this worker's token: {auth}; set SWITCHBOARD_TOKEN "
                  "or --token-file to the orchestrator's token", file=sys.stderr)
            return EXIT_BAD_INPUT
        net = next((e for e in found if isinstance(e, (BusError, OSError))), None)
        if net is not None and worker.served:
            if getattr(net, "close_code", None) == CLOSE_GOING_AWAY:
                # `orchestrator run` ended (its embedded hub stops with it), or the hub stopped
                print(f"the bus at {args.connect} shut down (its run ended, or its hub "
                      "stopped); this worker exits", file=sys.stderr)
                return EXIT_OK
            if getattr(net, "close_code", None) == CLOSE_RESUME_REFUSED:
                print(f"error: the bus at {args.connect} no longer knows this worker: its hub "
                      "restarted, or this worker was cut off for longer than the resume window. "
                      "What it held is re-run elsewhere when the leases expire. Start the worker "
                      "again (compose and Kubernetes restart it on this exit code, 3)",
                      file=sys.stderr)
                return EXIT_INTERNAL
            print(f"error: lost the bus at {args.connect}: {net}", file=sys.stderr)
            return EXIT_INTERNAL
        if net is not None:
            # no hint when a server answered: it is the wrong one, or the wrong path
            answered = "the server answered" in str(net) or "refused the upgrade" in str(net)
            print(f"error: cannot reach the bus at {args.connect}: {net}" + ("" if answered else
                  "\nhint: start the orchestrator (`orchestrator run FILE`, or `orchestrator "
                  "bus`) first, and pass --connect the bus URL it prints"), file=sys.stderr)
            return EXIT_INTERNAL
        raise
