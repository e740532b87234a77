"""`orchestrator worker`: a worker process that dials the orchestrator's bus and runs agents."""

from __future__ import annotations

import argparse
import os
import pathlib
import signal
import socket
import sys

from bus.tokens import TokenError, load_token

EXIT_OK, EXIT_BAD_INPUT, EXIT_INTERNAL, EXIT_CANCELLED = 0, 2, 3, 130


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
    p.add_argument("--log-level", default="info")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import trio  # imported here so `orchestrator --help` stays fast

    from agents.worker import LogShipper, Worker, WorkerConfig
    from bus.errors import BusAuthError, BusError
    from bus.logs import configure_logging

    if args.capacity < 1:
        print("error: --capacity must be at least 1", file=sys.stderr)
        return EXIT_BAD_INPUT
    if not args.connect.startswith(("ws://", "wss://")):
        print(f"error: --connect {args.connect!r} is not a ws:// or wss:// URL", file=sys.stderr)
        return EXIT_BAD_INPUT
    try:
        token = load_token(args.token_file)
    except TokenError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    shipper = LogShipper() if args.ship_logs else None
    try:
        configure_logging(json=True, level=args.log_level,
                          tee=shipper.add if shipper else None)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    worker_id = args.worker_id or f"{socket.gethostname()}-{os.getpid()}"
    cfg = WorkerConfig(url=args.connect, token=token, worker_id=worker_id,
                       capacity=args.capacity,
                       workspace_root=pathlib.Path(args.state_dir) / "workspaces",
                       pass_env=tuple(args.pass_env))
    worker = Worker(config=cfg, shipper=shipper)

    async def main() -> int:
        async with trio.open_nursery() as nursery:
            async def on_signal() -> None:
                with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as sigs:
                    async for _ in sigs:
                        nursery.cancel_scope.cancel()
                        return

            nursery.start_soon(on_signal)
            code = await worker.run()
            nursery.cancel_scope.cancel()
            return code
        return EXIT_CANCELLED

    try:
        return trio.run(main)
    except BusAuthError as exc:
        print(f"error: the bus refused this worker's token: {exc}; set SWITCHBOARD_TOKEN "
              "or --token-file to the orchestrator's token", file=sys.stderr)
        return EXIT_BAD_INPUT
    except (BusError, OSError) as exc:
        print(f"error: cannot reach the bus at {args.connect}: {exc}", file=sys.stderr)
        return EXIT_INTERNAL
