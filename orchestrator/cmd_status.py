"""`orchestrator status [RUN]`: a run's tasks, attempts, times and token costs, read from the journal."""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys
import time
from typing import Any

from orchestrator.cli import EXIT_BAD_INPUT, EXIT_OK
from orchestrator.cmd_cancel import unknown_name, wrap
from orchestrator.journal import Journal, JournalError
from orchestrator.runs import journal_path


def add_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser(
        "status", help="show a run's tasks, attempts, times and token costs",
        description=wrap(
            "Show one run from the journal: every task with its state, attempts, "
        "worker, start and end times, duration, error, and tokens (input, cached, output) and "
        "cost. Fan-out children and spawned (dynamic) children are listed under their parent, "
        "and a parent's totals include them. Works while the run is going (it only reads the "
        "journal) and after it ended."),
        epilog="examples:\n  orchestrator status                 the newest run\n"
        "  orchestrator status 20260301-1203   a run by a unique prefix of its id\n"
        "  orchestrator status --json | jq '.tasks[] | {task_id, state}'\n"
        "  orchestrator status --runs          every run, newest first\n"
        "  orchestrator status latest --task review   one task: its attempts, answer, outputs\n\n"
        "exit codes: 0 shown, 2 no such run or no journal (bad input)",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", nargs="?", default="latest", metavar="RUN",
                   help="run id, a unique prefix of one, or 'latest' (the default)")
    p.add_argument("--json", action="store_true",
                   help="print one JSON object (run, tasks in tree order with attempts and "
                   "usage, pending requests) instead of the table")
    p.add_argument("--attempts", "-a", action="store_true",
                   help="list every attempt under its task (worker, times, tokens, error, "
                   "and where a cancelled, failed or timed-out attempt's session stopped)")
    p.add_argument("--task", "-t", metavar="TASK",
                   help="show this task in full instead: its children and every attempt, its "
                   "error whole, its answer and the names of its outputs")
    p.add_argument("--runs", action="store_true", help="list every run instead, newest first")
    p.add_argument("--utc", action="store_true", help="show times in UTC (default: local time)")
    p.add_argument("--state-dir", default=os.environ.get("SWITCHBOARD_HOME", ".switchboard"),
                   help="where the journal is (default $SWITCHBOARD_HOME or ./.switchboard)")
    p.set_defaults(func=run)


def _err(msg: str) -> int:
    print(f"error: {msg}", file=sys.stderr)
    return EXIT_BAD_INPUT


def load_status(journal: Journal, ref: str | None, *, now: float) -> Any:
    """The RunStatus of run `ref` (id, prefix, 'latest'), read in one snapshot of the journal,
    with the pid of its live orchestrator (from the run's lock next to the journal).

    Raises JournalError when there is no such run.
    """
    from orchestrator import runlock
    from orchestrator.graph import GraphError, GraphSpec
    from orchestrator.runs import run_dir
    from orchestrator.status import build_status

    conn = journal.conn
    conn.execute("BEGIN")  # one read transaction: rows, attempts and requests agree
    try:
        if ref in (None, "", "latest") and journal.latest_run() is None:
            raise JournalError(f"no runs yet in {journal.path}: start one with "
                               "`orchestrator run FILE`, or pass --state-dir where your runs are")
        row = journal.find_run(ref)
        rid = row["run_id"]
        rows = journal.task_rows(rid)
        attempts = journal.attempts(rid)
        requests = journal.open_requests(rid)
        # The run's first journal sync writes a row for every task of its graph, in file
        # order: with rows, the graph has nothing to add but its name (parsing and checking
        # a 20,000-task graph took half of a 3.3 s `status`)
        name = journal.run_name(rid) if rows else None
    finally:
        conn.execute("ROLLBACK")
    graph = None
    if name is None:  # nothing synced yet, or a journal from before names were kept
        try:
            graph = GraphSpec.from_text(row["graph_text"], row["graph_path"])
        except GraphError:
            pass  # the journaled rows still say everything that ran
    pid = last_alive = None
    if row["status"] == "running":
        rdir = run_dir(journal.path.parent, rid)
        pid, last_alive = runlock.holder(rdir), runlock.last_alive(rdir)
    return build_status(row, rows, attempts, graph=graph, name=name, requests=requests, now=now,
                        orchestrator_pid=pid, last_alive=last_alive)


def run(args: argparse.Namespace) -> int:
    import datetime

    from orchestrator.status import render_runs, render_task, render_text, subtree, to_json

    path = journal_path(pathlib.Path(args.state_dir))
    try:
        journal = Journal.open_readonly(path)
    except JournalError as exc:
        return _err(str(exc))
    tz = datetime.UTC if args.utc else None
    now = time.time()
    try:
        if args.runs:
            runs = journal.list_runs()
            if args.json:
                print(json.dumps({"runs": runs}, indent=2, default=str))
            else:
                print(render_runs(runs, tz=tz, now=now))
            return EXIT_OK
        try:
            st = load_status(journal, args.run, now=now)
        except JournalError as exc:
            return _err(str(exc))
    finally:
        journal.close()
    if args.task is not None and not subtree(st, args.task):
        return _err(str(unknown_name("task", args.task, [t.task_id for t in st.tasks])))
    try:
        if args.json:
            out = to_json(st)
            if args.task is not None:
                keep = {t.task_id for t in subtree(st, args.task)}
                out["tasks"] = [t for t in out["tasks"] if t["task_id"] in keep]
            print(json.dumps(out, indent=2, ensure_ascii=False))
        elif args.task is not None:
            print(render_task(st, args.task, tz=tz))
        else:
            print(render_text(st, tz=tz, attempts=args.attempts))
    except BrokenPipeError:  # `status | head`
        pass
    return EXIT_OK
