"""`orchestrator bus`: run a standalone bus hub until SIGINT/SIGTERM."""

from __future__ import annotations

import argparse
import signal
import sys

from orchestrator.serving import (
    ListenError,
    ServeArgsError,
    listening_line,
    print_error,
    serving_token,
    start_listening,
)

EXIT_OK, EXIT_BAD_INPUT, EXIT_INTERNAL = 0, 2, 3


def add_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser(
        "bus",
        help="run a standalone message-bus hub",
        description="Run a bus hub that workers and orchestrators dial with "
        "ws://HOST:PORT/bus. The token comes from SWITCHBOARD_TOKEN or --token-file, never "
        "the command line; without one the hub only listens on a loopback address. "
        "Stops on SIGINT/SIGTERM after flushing and closing every connection (1001), exit 0.",
    )
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=7700, help="port (default 7700; 0 picks one)")
    p.add_argument("--token-file", metavar="FILE", help="file holding the shared bus token")
    p.add_argument("--resume-window", type=float, default=30.0, metavar="SECONDS",
                   help="how long a dropped peer's session waits for it to resume (default 30)")
    p.add_argument("--log-level", default="info", help="debug, info, warning, error")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.resume_window < 0:
        print("error: --resume-window must not be negative", file=sys.stderr)
        return EXIT_BAD_INPUT
    try:
        token = serving_token(args, risk="read and send every message on the bus")
    except ServeArgsError as exc:
        print_error(exc)
        return EXIT_BAD_INPUT

    import trio  # imported here so `orchestrator --help` stays fast

    from bus.config import HubConfig
    from bus.hub import serve_bus
    from bus.logs import configure_logging
    from bus.runtime import tune_process

    try:
        configure_logging(json=True, level=args.log_level)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    config = HubConfig(host=args.host, port=args.port, token=token,
                       resume_window=args.resume_window)

    async def main() -> int:
        async with trio.open_nursery() as nursery:
            try:
                info = await start_listening(nursery, serve_bus, config,
                                             what=f"the bus on {args.host}:{args.port}")
            except ListenError as exc:
                print(f"error: {exc}", file=sys.stderr)
                return EXIT_INTERNAL
            print(listening_line("bus", info.url, args.host), flush=True)
            with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as sigs:
                async for _ in sigs:
                    break
            nursery.cancel_scope.cancel()
        return EXIT_OK  # asked to stop, and stopped cleanly (as `orchestrator model-server`)

    tune_process()
    return trio.run(main)
