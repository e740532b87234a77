"""`orchestrator model-server`: run the sim model server (Responses over WebSocket and HTTP)."""

from __future__ import annotations

import argparse
import json
import math
import signal
import sys
from typing import TYPE_CHECKING, Any

from orchestrator.serving import (
    ListenError,
    ServeArgsError,
    listening_line,
    print_error,
    serving_token,
    start_listening,
)

if TYPE_CHECKING:
    from modellink.sim import SimConfig

EXIT_OK, EXIT_BAD_INPUT, EXIT_INTERNAL, EXIT_CANCELLED = 0, 2, 3, 130


def add_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser(
        "model-server",
        help="serve the sim model over the Responses protocol (WebSocket and HTTP)",
        description="Serve the deterministic sim model on one port: WebSocket and POST on "
        "/v1/responses, counters on GET /v1/switchboard/stats. Runs until SIGINT/SIGTERM. "
        "Clients must send 'Authorization: Bearer <token>' when a token is configured "
        "(SWITCHBOARD_TOKEN or --token-file, never the command line); without one the server "
        "only listens on a loopback host.",
    )
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000; 0 picks one)")
    p.add_argument("--token-file", metavar="FILE", help="file holding the bearer token")
    p.add_argument("--ttft", type=float, default=None, metavar="S",
                   help="seconds to first token (default 0.05)")
    p.add_argument("--prefill", type=float, default=None, metavar="S",
                   help="seconds per input token not in the model's prefix cache "
                   "(default 0.00002)")
    p.add_argument("--decode", type=float, default=None, metavar="S",
                   help="seconds per output token (default 0.001, i.e. 1,000 tokens/s)")
    p.add_argument("--zero", action="store_true",
                   help="no simulated model time at all (measures pure overhead)")
    p.add_argument("--max-connection-age", type=float, default=3600.0, metavar="S",
                   help="close WebSockets older than this with code 1001 (default 3600)")
    p.add_argument("--log-level", default="info", help="debug, info, warning, error")
    p.add_argument("--parent-pid", type=int, default=None, metavar="PID",
                   help="stop (as on SIGTERM) when process PID is no longer this server's "
                   "parent: the embedded sim of `orchestrator run` dies with it, even when "
                   "it was killed with SIGKILL")
    # for `orchestrator run`, which starts the embedded sim this way (orchestrator.simproc):
    # the whole SimConfig as JSON, the run id its log lines carry, and the URL on stdout
    p.add_argument("--sim-json", default=None, help=argparse.SUPPRESS)
    p.add_argument("--run-id", default=None, help=argparse.SUPPRESS)
    p.add_argument("--announce", action="store_true", help=argparse.SUPPRESS)
    p.set_defaults(func=run)


def sim_config(zero: bool, ttft: float | None, prefill: float | None, decode: float | None,
               *, prefix: str = "--") -> SimConfig:
    """The SimConfig these flag values ask for (None: the default). Raises ValueError naming
    the bad flag: PREFIX + ttft, prefill or decode (model-server's --ttft, run's --sim-ttft)."""
    import attrs

    from modellink.sim import SimConfig

    sim = SimConfig.zero() if zero else SimConfig()
    changes: dict[str, Any] = {}
    for flag, field, value in (("ttft", "ttft_s", ttft), ("prefill", "prefill_s_per_token", prefill),
                               ("decode", "decode_s_per_token", decode)):
        if value is not None:
            if not 0 <= value < math.inf:  # NaN fails both
                raise ValueError(f"{prefix}{flag} must be a finite number of seconds, zero or "
                                 f"more; got {value}")
            changes[field] = value
    return attrs.evolve(sim, **changes)


def sim_config_from_args(args: argparse.Namespace) -> SimConfig:
    """model-server's SimConfig; raises ValueError naming a bad flag."""
    if args.sim_json is not None:
        from orchestrator.simproc import sim_from_json

        return sim_from_json(args.sim_json)
    return sim_config(args.zero, args.ttft, args.prefill, args.decode)


def run(args: argparse.Namespace) -> int:
    import structlog
    import trio  # imported here so `orchestrator --help` stays fast

    from bus.logs import configure_logging
    from bus.runtime import tune_process
    from orchestrator.serving import parent_pid_error, stop_with_parent

    try:
        token = serving_token(args, risk="run the model on your machine")
    except ServeArgsError as exc:
        print_error(exc)
        return EXIT_BAD_INPUT
    bad_parent = parent_pid_error(args.parent_pid, "model server")
    if bad_parent is not None:
        print(f"error: {bad_parent}", file=sys.stderr)
        return EXIT_BAD_INPUT
    if args.max_connection_age <= 0:
        print("error: --max-connection-age must be more than 0 seconds", file=sys.stderr)
        return EXIT_BAD_INPUT
    try:
        sim = sim_config_from_args(args)
        configure_logging(json=True, level=args.log_level)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    if args.run_id is not None:
        structlog.contextvars.bind_contextvars(run_id=args.run_id)
    from modellink.server import ModelServerConfig, serve_model  # after logging is configured

    config = ModelServerConfig(host=args.host, port=args.port, token=token, sim=sim,
                               max_connection_age_s=args.max_connection_age)

    async def main() -> int:
        # the handler first: whoever reads the URL may send SIGTERM at once (a stop, not a kill)
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as sigs:
            async with trio.open_nursery() as nursery:
                try:
                    info = await start_listening(nursery, serve_model, config, what=(
                        f"the model server on {args.host}:{args.port}"))
                except ListenError as exc:
                    print(f"error: {exc}", file=sys.stderr)
                    return EXIT_INTERNAL
                if args.announce:
                    print(json.dumps({"base_url": info.base_url}), flush=True)
                else:
                    print(listening_line("model server", info.base_url, args.host),
                          file=sys.stderr, flush=True)
                if args.parent_pid is not None:
                    nursery.start_soon(stop_with_parent, args.parent_pid)
                async for _ in sigs:
                    break
                nursery.cancel_scope.cancel()
        return EXIT_OK

    tune_process()
    return trio.run(main)
