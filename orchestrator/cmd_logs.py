"""`orchestrator logs RUN`: show one run's gathered log lines, filtered, readable or as JSON."""

from __future__ import annotations

import argparse
import contextlib
import datetime
import os
import pathlib
import sys
import time
from collections.abc import Iterator
from typing import Any

import attrs

from orchestrator import runlock
from orchestrator.cmd_cancel import unknown_name
from orchestrator.logview import LogFilter, LogFilterError, TimeOrder, parse_line, render
from orchestrator.runs import RunNotFound, resolve_run_dir

EXIT_OK, EXIT_BAD_INPUT = 0, 2
FOLLOW_CHECK_S = 1.0  # --follow: how often the journal is asked whether the run ended


def add_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser(
        "logs", help="show a run's structured logs",
        description="Show the log lines of one run (the orchestrator's and every worker's, "
        "gathered in STATE_DIR/runs/RUN/log.jsonl). RUN is a run id, a unique prefix of one, "
        "or 'latest'.")
    p.add_argument("run", nargs="?", default="latest", metavar="RUN",
                   help="run id, a unique prefix of one, or 'latest' (the default)")
    p.add_argument("--task", help="only lines of this task and its children (fan-out TASK[i], "
                   "spawned TASK/n)")
    p.add_argument("--agent", help="only lines of this agent")
    p.add_argument("--level", help="minimum level: debug, info, warning, error")
    p.add_argument("--since", help="only lines newer than this: 90s, 5m, 2h, an ISO time, or "
                   "a time of day as the lines show it (21:00:05)")
    p.add_argument("--follow", "-f", action="store_true", help="keep printing new lines until "
                   "the run ends (as they arrive; without --follow lines are in time order)")
    p.add_argument("--json", action="store_true", help="print the JSON lines as they are")
    p.add_argument("--utc", action="store_true", help="show and read times in UTC instead of "
                   "the local time zone (as `orchestrator status --utc`)")
    p.add_argument("--state-dir", default=os.environ.get("SWITCHBOARD_HOME", ".switchboard"),
                   help="where the runs are (default $SWITCHBOARD_HOME or ./.switchboard)")
    p.set_defaults(func=run)


@contextlib.contextmanager
def _journal(state: pathlib.Path) -> Iterator[Any]:
    """The state directory's journal, read-only, or None when there is none to read (each
    question below then falls back to what the run directory alone says)."""
    from orchestrator.journal import Journal, JournalError
    from orchestrator.runs import journal_path

    try:
        journal = Journal.open_readonly(journal_path(state))
    except JournalError:
        yield None
        return
    try:
        yield journal
    finally:
        journal.close()


def _run_names(state: pathlib.Path, run_id: str) -> tuple[list[str], dict[str, str]] | None:
    """(the run's agents, its task ids with the agent of each) from the journal, or None when
    the journal cannot say (filters are then applied as typed)."""
    from orchestrator.graph import GraphError, GraphSpec
    from orchestrator.journal import JournalError

    with _journal(state) as journal:
        if journal is None:
            return None
        try:
            row = journal.find_run(run_id)
            rows = journal.task_rows(run_id)
            graph = GraphSpec.from_text(row["graph_text"], row["graph_path"])
        except (JournalError, GraphError):
            return None
    tasks = {t.id: t.agent for t in graph.tasks}
    tasks.update((str(r["task_id"]), str(r["agent"])) for r in rows)
    return list(graph.agents), tasks


def _journal_run_id(state: pathlib.Path, ref: str) -> str:
    """The run id the journal gives for `ref` (so `logs latest` and `status latest` agree: the
    journal knows when runs started, directory times do not); `ref` as typed without one."""
    from orchestrator.journal import JournalError

    with _journal(state) as journal:
        try:
            return ref if journal is None else str(journal.find_run(ref)["run_id"])
        except JournalError:
            return ref  # the directory scan below says what exists


def _run_ended(state: pathlib.Path, run_id: str) -> bool:
    """True iff the journal says the run is over (so `--follow` has nothing more to wait for).
    A run whose orchestrator was killed stays "running" until resumed (see runlock)."""
    from orchestrator.journal import JournalError

    with _journal(state) as journal:
        try:
            return journal is not None and str(journal.find_run(run_id)["status"]) != "running"
        except JournalError:
            return False


def run(args: argparse.Namespace) -> int:
    try:
        tz = datetime.UTC if args.utc else None
        flt = LogFilter.build(task=args.task, agent=args.agent, level=args.level,
                              since=args.since, tz=tz)
        run_dir = resolve_run_dir(pathlib.Path(args.state_dir),
                                  _journal_run_id(pathlib.Path(args.state_dir), args.run))
    except (LogFilterError, RunNotFound) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    names = _run_names(pathlib.Path(args.state_dir), run_dir.name) \
        if args.task or args.agent else None
    if names is not None:
        agents, tasks = names
        # a typo in --task or --agent would print nothing, as if the task were quiet
        problem = ((unknown_name("task", args.task, list(tasks)) if args.task else None)
                   or (unknown_name("agent", args.agent, agents) if args.agent else None))
        if problem:
            print(f"error: {problem}", file=sys.stderr)
            return EXIT_BAD_INPUT
        if args.agent:  # the orchestrator's lines about its tasks carry task ids only
            flt = attrs.evolve(flt, agent_tasks=frozenset(
                t for t, a in tasks.items() if a == args.agent))
    path = run_dir / "log.jsonl"
    if not path.exists():
        print(f"error: run {run_dir.name} has no log file at {path}", file=sys.stderr)
        return EXIT_BAD_INPUT
    out = sys.stdout
    state = pathlib.Path(args.state_dir)
    last_check = 0.0
    ended = False  # the run was over when last checked: one more read to the end, then stop
    gone = ""  # why following stopped though the run has not ended
    order = TimeOrder()  # without --follow, lines come out in time order
    try:
        with open(path, "rb") as f:
            while True:
                line = f.readline()
                if not line:
                    out.writelines(order.drain())
                    if not args.follow or ended:
                        if gone:
                            print(gone, file=sys.stderr)
                        return EXIT_OK
                    out.flush()
                    if time.monotonic() - last_check >= FOLLOW_CHECK_S:
                        last_check = time.monotonic()
                        ended = _run_ended(state, run_dir.name)
                        if not ended:  # nobody will write more: the orchestrator is gone
                            gone = runlock.gone_note(run_dir, run_dir.name,
                                                     "nothing more is written until") or ""
                            ended = bool(gone)
                        if ended:
                            continue  # lines written before the run ended: read them first
                    time.sleep(0.2)
                    continue
                if not line.endswith(b"\n"):  # a line still being written: read it whole later
                    f.seek(-len(line), 1)
                    if not args.follow:
                        out.writelines(order.drain())
                        return EXIT_OK
                    time.sleep(0.05)
                    continue
                rec = parse_line(line)
                if rec is None or not flt.accepts(rec):
                    continue
                text = line.decode(errors="replace") if args.json else render(rec, tz) + "\n"
                if args.follow:
                    out.write(text)  # as it comes: following waits for nothing
                else:
                    out.writelines(order.push(rec, text))
    except KeyboardInterrupt:
        return EXIT_OK
    except BrokenPipeError:
        return EXIT_OK
