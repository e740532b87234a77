"""Owns starting and resuming a run from the CLI: graph, journal, log file, supervisor, exit code.

Order matters: the graph is parsed before anything is created, so a bad graph never leaves a
state directory, a journal or a run row behind; once the run row exists, every way out of
here (success, cancel, a crash, a second Ctrl-C) ends it with `finish_run`.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import signal
import sys
import traceback
from typing import Any

EXIT_OK, EXIT_TASK_FAILED, EXIT_BAD_INPUT, EXIT_INTERNAL, EXIT_CANCELLED = 0, 1, 2, 3, 130
SUMMARY_FAILED_MAX = 5  # failed tasks the end-of-run summary names, with why
SUMMARY_ERROR_WIDTH = 400  # room for the advice at the end of an error (its last clause)


def _err(msg: str) -> None:
    print(f"error: {msg}", file=sys.stderr)


def state_dir_problem(state: pathlib.Path, exc: OSError) -> str:
    """What is wrong with `state` as a state directory, and what to do, for an OSError that
    creating it or its journal raised."""
    fix = "pass --state-dir a directory you can write to (or set SWITCHBOARD_HOME)"
    if isinstance(exc, FileExistsError | NotADirectoryError):
        return f"cannot use state directory {state}: it, or a folder above it, is a file; {fix}"
    if isinstance(exc, PermissionError):
        return (f"cannot use state directory {state}: permission denied "
                f"({exc.filename or state}); {fix}")
    return f"cannot use state directory {state}: {exc.strerror or exc}; {fix}"


def start_run(args: argparse.Namespace, *, resume_run: str | None) -> int:
    import trio

    from bus.logs import configure_logging, get_logger, level_number
    from bus.runtime import tune_process
    from bus.tokens import TokenError, load_token
    from orchestrator import runlock
    from orchestrator import scheduler as S
    from orchestrator.cli import leaves
    from orchestrator.cmd_run import _check_args, _options
    from orchestrator.graph import GraphError, GraphFileError, GraphSpec
    from orchestrator.journal import Journal, JournalError
    from orchestrator.runs import run_dir
    from orchestrator.supervisor import StartError, Supervisor, bind_run, new_run_id

    try:
        token = load_token(args.token_file)
    except TokenError as exc:
        _err(str(exc))
        return EXIT_BAD_INPUT
    args.token = token
    problem = _check_args(args)
    if problem:
        _err(problem)
        return EXIT_BAD_INPUT
    try:
        level_number(args.log_level)
    except ValueError as exc:
        _err(str(exc))
        return EXIT_BAD_INPUT

    graph: GraphSpec | None = None
    if resume_run is None:
        try:
            graph = GraphSpec.from_toml(pathlib.Path(args.file))
        except GraphError as exc:
            print(exc.render(), file=sys.stderr)
            return EXIT_BAD_INPUT
        except GraphFileError as exc:
            _err(str(exc))
            return EXIT_BAD_INPUT

    if graph is not None and _keys_missing(graph, args):
        return EXIT_BAD_INPUT

    state = pathlib.Path(args.state_dir)
    if resume_run is not None and not (state / "journal.sqlite").is_file():
        # nothing to resume here: do not leave an empty journal behind
        _err(f"no journal at {state / 'journal.sqlite'}: pass --state-dir where the run was "
             "started (or set SWITCHBOARD_HOME)")
        return EXIT_BAD_INPUT
    try:
        state.mkdir(parents=True, exist_ok=True)
        journal = Journal.open(state / "journal.sqlite")
    except JournalError as exc:
        _err(str(exc))
        return EXIT_BAD_INPUT
    except OSError as exc:
        _err(state_dir_problem(state, exc))
        return EXIT_BAD_INPUT

    if graph is not None:
        run_id = new_run_id()
        sched = S.Scheduler(graph)  # before the row: a Ctrl-C here leaves no run behind
        closed = 0
        journal.create_run(run_id, graph_path=str(args.file), graph_text=graph.source_text,
                           name=graph.run.name)
    else:
        try:
            row = journal.find_run(resume_run)
        except JournalError as exc:
            _err(str(exc))
            return EXIT_BAD_INPUT
        run_id = row["run_id"]
        if row["status"] in ("succeeded", "failed", "cancelled"):
            _err(f"run {run_id} already ended ({row['status']}); nothing to resume")
            return EXIT_BAD_INPUT
        try:
            graph = GraphSpec.from_text(row["graph_text"], row["graph_path"])
        except GraphError as exc:
            print(exc.render(), file=sys.stderr)
            return EXIT_BAD_INPUT
        if _keys_missing(graph, args):
            return EXIT_BAD_INPUT

    lock: Any = None
    try:  # from here a Ctrl-C ends the run row too (a run left "running" was never resumable)
        rdir = run_dir(state, run_id)
        rdir.mkdir(parents=True, exist_ok=True)
        try:
            lock = runlock.hold(rdir)  # ours until this process ends, however it ends
        except runlock.RunLocked as exc:
            _err(f"run {run_id} is still running: its orchestrator (pid {exc.pid or '?'}) is "
                 f"alive, and resuming it would run its tasks twice. Stop it with `orchestrator "
                 f"cancel {run_id}` (or Ctrl-C where it runs), or wait for it to end")
            return EXIT_BAD_INPUT
        except OSError as exc:
            _err(f"cannot lock run {run_id} in {rdir}: {exc}")
            return EXIT_BAD_INPUT
        if resume_run is not None:
            # whatever was in flight when the orchestrator died will never report
            journal.reopen_run(run_id)  # a stopped run (no worker, disk, sim process) goes on
            closed = journal.close_open_attempts(
                run_id, "lost", "the orchestrator stopped while this attempt was in flight",
                "never started: the orchestrator stopped before a worker took it")
            sched = S.Scheduler.restore(graph, journal.task_records(run_id))
            journal.event(run_id, None, "resumed", {"closed_attempts": closed})
        log_f = open(rdir / "log.jsonl", "ab", buffering=0)  # noqa: SIM115 - lives for the run

        def sink(line: bytes) -> None:
            log_f.write(line + b"\n")

        configure_logging(json=True, level=args.log_level, tee=sink, quiet=True)
        bind_run(run_id)
        log = get_logger("orchestrator.runner")
        if resume_run is not None:
            log.info("run.resumed", closed_attempts=closed,
                     note="attempts in flight when the orchestrator before this one stopped "
                          "were closed as lost; their tasks run again")
        opts = _options(args, token)
        sup = Supervisor(graph=graph, journal=journal, run_id=run_id, opts=opts,  # type: ignore[arg-type]
                         scheduler=sched, sink=sink)
        verb = "resuming" if resume_run is not None else "run"
        # The progress line counts tasks made at run time too (fan_out children, spawns)
        grows = any(t.fan_out for t in graph.tasks) or any(
            "spawn" in a.tools for a in graph.agents.values())
        count = f"{len(graph.tasks)} tasks" + (" in the graph, more as they fan out or spawn"
                                               if grows else "")
        print(f"{verb} {run_id}: {count}; logs: orchestrator logs {run_id}", file=sys.stderr)
        if args.workers > 0:
            for line in graph.unimportable_tools():
                print(f"warning: {line}", file=sys.stderr)
    except KeyboardInterrupt:
        if lock is not None:  # only the run's holder may end it: not a refused resume
            journal.finish_run(run_id, "cancelled", summary={}, reason="interrupted while starting")
            lock.close()
        return EXIT_CANCELLED
    tune_process()
    try:
        outcome = trio.run(sup.run)
        # The run has ended and is journaled: a Ctrl-C (or SIGTERM) while its summary prints
        # changes nothing
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    except BaseException as exc:  # noqa: BLE001 - every way out must end the run row
        found = leaves(exc)
        ended = _ended(journal, run_id)
        if ended is not None:  # a signal as the run finished: the journaled outcome stands
            print_summary(ended["summary"] or {}, ended["status"], graph=graph)
            print_answers(journal, run_id, graph)
            return _exit_code(ended["status"])
        if any(isinstance(e, KeyboardInterrupt) for e in found):
            journal.finish_run(run_id, "cancelled", summary={}, reason="interrupted")
            log.warning("run.interrupted")
            return EXIT_CANCELLED
        full = next((e for e in found if _out_of_space(e)), None)
        if full is not None:
            # Not the run's fault, and the journal holds every step it committed: leave the
            # run resumable ("stopped" if that can still be written, else "running" as a
            # killed orchestrator leaves it; `resume` takes both).
            reason = f"could not write to {journal.path.parent}: {_describe(full)}"
            try:
                journal.finish_run(run_id, "stopped", summary={}, reason=reason)
            except Exception:  # noqa: BLE001,S110 - the same disk: the row stays "running"
                pass
            _err(f"{reason}. Run {run_id} stopped; every step it journaled is kept: once "
                 "the disk takes writes again (free space, raise the quota or file-size limit), "
                 + _resume_hint(run_id))
            return EXIT_INTERNAL
        start = next((e for e in found if isinstance(e, StartError)), None)
        if start is not None and resume_run is not None:
            # nothing of the run ran here: it stays as the dead orchestrator left it
            _err(f"{start}; run {run_id} was not changed: resume it again once that is fixed")
            return EXIT_INTERNAL
        first = start or (found[0] if found else exc)
        msg = str(first) if start else f"{type(first).__name__}: {first}"
        log.error("run.crashed", error=msg, traceback="".join(
            traceback.format_exception(type(exc), exc, exc.__traceback__)))
        journal.finish_run(run_id, "failed", summary={}, reason=f"internal error: {msg}")
        if getattr(args, "debug", False):
            traceback.print_exception(type(exc), exc, exc.__traceback__)
        _err(f"{msg} (run {run_id} marked failed; traceback in its log"
             + ("" if getattr(args, "debug", False) else ", or rerun with --debug") + ")")
        return EXIT_INTERNAL
    finally:
        log_f.close()
        lock.close()
    print_summary(outcome.summary, outcome.status, graph=graph)
    print_answers(journal, run_id, graph)
    if outcome.fatal:
        _err(f"{outcome.fatal}. Run {run_id} stopped with its tasks as they were: fix the "
             "cause, then " + _resume_hint(run_id))
        return EXIT_INTERNAL
    return _exit_code(outcome.status)


def _keys_missing(graph: Any, args: argparse.Namespace) -> bool:
    """Say so and return True if local workers would start without a model key the graph's
    agents need (every task of those agents would fail at its first turn). With --workers 0
    the workers are remote, with their own environment: nothing to check here."""
    missing = graph.unset_keys(os.environ) if args.workers > 0 else []
    for line in missing:
        _err(line)
    if missing:
        print(f"nothing was started: the {args.workers} local workers would fail those agents' "
              "tasks at their first model turn (use --workers 0 if only remote workers, which "
              "have the key, are to run them)", file=sys.stderr)
    return bool(missing)


def _resume_hint(run_id: str) -> str:
    return f"`orchestrator resume {run_id}` goes on without repeating what finished"


def _out_of_space(exc: BaseException) -> bool:
    """The disk (or a quota, or a file-size limit) refused a write: SQLite's "database or
    disk is full" or "disk I/O error" (what a refused write becomes when it is not ENOSPC),
    or ENOSPC/EDQUOT/EFBIG from a log write."""
    import errno
    import sqlite3

    if isinstance(exc, sqlite3.OperationalError):
        return "disk is full" in str(exc) or "disk I/O error" in str(exc)
    return isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


def _describe(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror.lower() + (f" ({exc.filename})" if exc.filename else "")
    return str(exc)


def _exit_code(status: str) -> int:
    return {"succeeded": EXIT_OK, "cancelled": EXIT_CANCELLED}.get(status, EXIT_TASK_FAILED)


def _ended(journal: Any, run_id: str) -> dict[str, Any] | None:
    """The run's row if it has already ended (journaled its outcome), else None."""
    try:
        row = journal.find_run(run_id)
    except Exception:  # noqa: BLE001 - only a hint for the caller: assume it has not
        return None
    ended = row is not None and row["status"] in ("succeeded", "failed", "cancelled")
    return dict(row) if ended else None


def print_summary(summary: dict[str, Any], status: str, *, graph: Any) -> None:
    """The end of `orchestrator run`: counts, the run's tokens and cost, then one line per
    agent (its sub-agents included) and, under it, its spawned sub-agents' share."""
    for line in summary_lines(summary, status):
        print(line, file=sys.stderr)


def final_answers(journal: Any, run_id: str, graph: Any) -> list[tuple[str, str]]:
    """(task id, answer text) of the graph's final tasks (those no other task needs) that
    succeeded, in file order: what the run produced."""
    needed = {n for t in graph.tasks for n in t.needs}
    rows = {r["task_id"]: r for r in journal.task_rows(run_id)}
    out = []
    for t in graph.tasks:
        r = rows.get(t.id)
        if t.id not in needed and r is not None and r["state"] == "succeeded":
            result = r.get("result") if isinstance(r.get("result"), dict) else {}
            out.append((t.id, str(result.get("text") or "")))
    return out


def print_answers(journal: Any, run_id: str, graph: Any) -> None:
    """The run's product on stdout (progress and summary are on stderr): each final task's
    answer under a `== TASK ==` line, so `orchestrator run g.toml > answers.txt` keeps it."""
    try:
        answers = final_answers(journal, run_id, graph)
    except Exception as exc:  # noqa: BLE001 - the run's outcome stands; say why none show
        _err(f"could not read the final answers from the journal: {exc}; "
             f"`orchestrator status {run_id} --task TASK` shows one")
        return
    try:
        for tid, text in answers:
            sys.stdout.write(f"== {tid} ==\n{text}\n")
        sys.stdout.flush()
    except BrokenPipeError:  # `orchestrator run g.toml | head`
        pass


def summary_lines(summary: dict[str, Any], status: str) -> list[str]:
    usage = summary.get("usage") or {}
    total = usage.get("total") or {}
    rid = summary.get("run_id")
    lines = [f"run {rid} {status} in {summary.get('seconds')}s: "
             f"{json.dumps(summary.get('counts'))}"]
    failed = summary.get("failed") or []
    for task_id, error in failed[:SUMMARY_FAILED_MAX]:
        lines.append(f"  failed {task_id}: {_one_line(error, SUMMARY_ERROR_WIDTH)}")
    if len(failed) > SUMMARY_FAILED_MAX:
        lines.append(f"  ... and {len(failed) - SUMMARY_FAILED_MAX} more failed tasks: "
                     f"orchestrator status {rid}")
    elif failed:
        lines.append(f"  (details: orchestrator status {rid}, orchestrator logs {rid} "
                     "--level warning)")
    if not total:
        return lines
    lines.append(f"tokens: {_usage_text(total)}")
    by_agent = usage.get("by_agent") or {}
    width = max((len(a) for a in by_agent), default=0)
    for agent in sorted(by_agent):
        per = by_agent[agent]
        n = per.get("tasks", 0)
        lines.append(f"  agent {agent:<{width}}  {n} task{'s' if n != 1 else ''}, "
                     f"{_usage_text(per)}")
        subs = per.get("sub_agents") or {}
        if subs.get("tasks"):
            m = subs["tasks"]
            lines.append(f"  {'':<{width + 6}}  of which spawned sub-agents ({m} task"
                         f"{'s' if m != 1 else ''}): {_usage_text(subs)}")
    return lines


def _one_line(text: str, width: int) -> str:
    text = " ".join(str(text).split()) or "no error recorded"
    return text if len(text) <= width else text[:width - 1] + "…"


def _usage_text(u: dict[str, Any]) -> str:
    return (f"input {u.get('input_tokens', 0)} (cached {u.get('cached_tokens', 0)}), "
            f"output {u.get('output_tokens', 0)}; cost ${u.get('cost_usd', 0.0):.4f}")
