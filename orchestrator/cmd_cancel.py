"""`orchestrator cancel RUN [TASK]`: ask a running orchestrator to cancel its run or one subtree."""

from __future__ import annotations

import argparse
import difflib
import os
import pathlib
import sys
import textwrap
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from orchestrator import runlock
from orchestrator.cli import EXIT_BAD_INPUT, EXIT_OK
from orchestrator.journal import Journal, JournalError
from orchestrator.runs import journal_path, run_dir

TERMINAL = frozenset({"succeeded", "failed", "cancelled", "not_run"})


class ControlError(Exception):
    """The request cannot be made (the user's input: the message says what to do instead)."""


def wrap(text: str) -> str:
    """A help description filled to the terminal-friendly width (the epilog stays as written)."""
    return textwrap.fill(text, 78)


def add_state_dir(p: argparse.ArgumentParser) -> None:
    p.add_argument("--state-dir", default=os.environ.get("SWITCHBOARD_HOME", ".switchboard"),
                   help="where the run's journal is (default $SWITCHBOARD_HOME or "
                   "./.switchboard): the same as the running orchestrator's")


def add_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser(
        "cancel", help="cancel a running run, or one task and its subtree",
        description=wrap(
            "Ask the orchestrator running RUN to cancel it. With TASK, only that task, "
        "its fan-out and spawned children are cancelled, and tasks that need them are marked "
        "not_run; the rest of the run goes on. The request goes through the journal: the "
        "orchestrator picks it up within a second, cancels live attempts on their workers "
        "(model responses are cancelled, tool processes killed) and `orchestrator run` exits "
        "130. If the orchestrator was killed, the request waits for `orchestrator resume`."),
        epilog="examples:\n  orchestrator cancel latest\n"
        "  orchestrator cancel 20260301-1203 code        the task `code` and its children\n"
        "  orchestrator cancel 20260301-1203 'code[2]'   one fan-out child\n\n"
        "exit codes: 0 request written, 2 unknown run or task, run already ended",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", metavar="RUN", help="run id, a unique prefix of one, or 'latest'")
    p.add_argument("task", nargs="?", metavar="TASK",
                   help="a task id from the graph, a fan-out child (code[0]) or a spawned "
                   "child (plan/1); default: the whole run")
    add_state_dir(p)
    p.set_defaults(func=run)


def open_for_control(state_dir: str, ref: str) -> tuple[Journal, dict[str, Any]]:
    """The journal (writable: requests are rows) and the row of running run `ref`.

    Raises ControlError when there is no journal, no such run, or the run already ended.
    A journal that does not exist is not created.
    """
    path = journal_path(pathlib.Path(state_dir))
    if not path.is_file():
        raise ControlError(f"no journal at {path}: no run to control there; pass --state-dir "
                           "(or set SWITCHBOARD_HOME) as for the running `orchestrator run`")
    try:
        journal = Journal.open(path)
    except JournalError as exc:
        raise ControlError(str(exc)) from None
    try:
        row = journal.find_run(ref)
    except JournalError as exc:
        journal.close()
        raise ControlError(str(exc)) from None
    if row["status"] == "stopped":
        journal.close()
        raise ControlError(f"run {row['run_id']} stopped ({row['reason']}) and no orchestrator "
                           "runs it: there is nothing to control. `orchestrator resume "
                           f"{row['run_id']}` goes on with it once the cause is fixed.")
    if row["status"] != "running":
        journal.close()
        raise ControlError(f"run {row['run_id']} already ended ({row['status']}); there is "
                           "nothing to control. `orchestrator status --runs` lists the runs.")
    return journal, row


def unknown_name(kind: str, name: str, known: Sequence[str]) -> str | None:
    """"run has no KIND NAME; did you mean ...? KINDs: ..." when `name` is not in `known`."""
    known = list(dict.fromkeys(known))
    if name in known:
        return None
    close = difflib.get_close_matches(name, known, n=1, cutoff=0.6)
    hint = f"did you mean {close[0]!r}? " if close else ""
    listed = ", ".join(known[:12]) + (f", ... ({len(known) - 12} more)" if len(known) > 12
                                      else "")
    return f"run has no {kind} {name!r}; {hint}{kind}s: {listed or 'none'}"


def check_task(task_id: str, graph_ids: Sequence[str],
               rows: Sequence[Mapping[str, Any]]) -> str | None:
    """A problem with cancelling `task_id`, or None. Known ids: the graph's tasks and the
    journaled ones (fan-out and dynamic children); a task is cancellable while it or one of
    its descendants has not ended."""
    states = {str(r["task_id"]): str(r["state"]) for r in rows}
    unknown = unknown_name("task", task_id, [*graph_ids, *states])
    if unknown:
        return unknown
    kids: dict[str, list[str]] = {}
    for r in rows:
        if r.get("parent"):
            kids.setdefault(str(r["parent"]), []).append(str(r["task_id"]))
    todo, seen = [task_id], set()
    while todo:
        tid = todo.pop()
        if tid in seen:
            continue
        seen.add(tid)
        if states.get(tid, "waiting") not in TERMINAL:
            return None
        todo.extend(kids.get(tid, ()))
    return (f"task {task_id!r} already ended ({states[task_id]}), and so did its children: "
            "nothing to cancel")


def write_request(state_dir: str, ref: str, kind: str, *, task_id: str | None = None,
                  arg: str | None = None,
                  check: Callable[[Journal, dict[str, Any]], str | None] | None = None,
                  ) -> tuple[str, int]:
    """Write one control request for running run `ref`: (run id, request id).

    Raises ControlError for no journal, no such run, a run that ended, or what `check` finds.
    """
    journal, row = open_for_control(state_dir, ref)
    try:
        problem = check(journal, row) if check is not None else None
        if problem:
            raise ControlError(problem)
        return row["run_id"], journal.add_request(row["run_id"], kind, task_id=task_id, arg=arg)
    finally:
        journal.close()


def _task_check(task_id: str) -> Callable[[Journal, dict[str, Any]], str | None]:
    def check(journal: Journal, row: dict[str, Any]) -> str | None:
        from orchestrator.graph import GraphError, GraphSpec

        try:
            graph_ids = [t.id for t in GraphSpec.from_text(row["graph_text"],
                                                           row["graph_path"]).tasks]
        except GraphError:
            graph_ids = []
        return check_task(task_id, graph_ids, journal.task_rows(row["run_id"]))

    return check


def run(args: argparse.Namespace) -> int:
    try:
        rid, req = write_request(args.state_dir, args.run, "cancel", task_id=args.task,
                                 check=_task_check(args.task) if args.task else None)
    except ControlError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    what = f"task {args.task} (and its children) in run {rid}" if args.task else f"run {rid}"
    print(f"cancel requested for {what} (request {req}); the running orchestrator picks it "
          f"up within a second. Follow with `orchestrator status {rid}`.")
    note_if_gone(args.state_dir, rid)
    return EXIT_OK


def note_if_gone(state_dir: str, run_id: str) -> None:
    """After a request: say so on stderr when the run's orchestrator is not there to take it."""
    note = runlock.gone_note(run_dir(pathlib.Path(state_dir), run_id), run_id,
                             "the request waits for")
    if note:
        print(note, file=sys.stderr)
