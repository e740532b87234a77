"""`orchestrator scale N`: ask a running orchestrator to grow or drain its worker pool to N."""

from __future__ import annotations

import argparse
import sys

from orchestrator.cli import EXIT_BAD_INPUT, EXIT_OK
from orchestrator.cmd_cancel import (
    ControlError,
    add_state_dir,
    note_if_gone,
    wrap,
    write_request,
)


def add_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser(
        "scale", help="change how many workers a running run uses",
        description=wrap(
            "Ask the orchestrator running a run to use N local worker processes (the ones "
        "it starts itself; remote workers are not counted and not touched). Growing starts "
        "local workers; shrinking drains the least loaded local ones: they finish the "
        "attempts they hold, take no new ones, and exit. The request goes through the "
        "journal and is picked up within a second. Workers on Kubernetes are scaled by their "
        "Deployment (kubectl scale, HPA, KEDA), not by this command."),
        epilog="examples:\n  orchestrator scale 8                  the newest run\n"
        "  orchestrator scale 2 --run 20260301-1203\n\n"
        "exit codes: 0 request written, 2 N not 0..256, unknown run, run already ended",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("n", type=int, metavar="N", help="the number of workers wanted (0 or more)")
    p.add_argument("--run", default="latest", metavar="RUN",
                   help="run id, a unique prefix of one, or 'latest' (the default)")
    add_state_dir(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from orchestrator.workers import MAX_LOCAL_WORKERS

    if not 0 <= args.n <= MAX_LOCAL_WORKERS:
        print(f"error: N must be 0..{MAX_LOCAL_WORKERS}, not {args.n} (scale starts local "
              "worker processes; more machines join with `orchestrator worker --connect URL`)",
              file=sys.stderr)
        return EXIT_BAD_INPUT
    try:
        rid, req = write_request(args.state_dir, args.run, "scale", arg=str(args.n))
    except ControlError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    print(f"scale to {args.n} worker{'s' if args.n != 1 else ''} requested for run {rid} "
          f"(request {req}); the running orchestrator picks it up within a second.")
    note_if_gone(args.state_dir, rid)
    if args.n == 0:
        print("note: with 0 local workers the run makes progress only on remote workers, "
              "if it has any (or after another `orchestrator scale`)", file=sys.stderr)
    return EXIT_OK
