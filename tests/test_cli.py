"""The `orchestrator` CLI: help, argument errors and exit codes, cancel/scale requests, examples."""

from __future__ import annotations

import importlib.util
import pathlib
import subprocess
import sys

import pytest

from orchestrator import cli
from orchestrator.cli import main
from orchestrator.journal import Journal
from orchestrator.scheduler import Scheduler, StartAttempt

ROOT = pathlib.Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"
BAD = ROOT / "tests" / "data" / "graphs" / "bad_many.toml"
SCRIPT = pathlib.Path(sys.executable).parent / "orchestrator"

GRAPH = """
[agents.a]
[agents.b]
[[tasks]]
id = "plan"
agent = "a"
[[tasks]]
id = "build"
agent = "b"
needs = ["plan"]
"""


def registered() -> list[str]:
    parser = cli.build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    return list(sub.choices)  # type: ignore[attr-defined]


# ---------------------------------------------------------------- help and parsing


def test_top_level_help_lists_commands_and_exit_codes(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for name in ("run", "validate", "status", "logs", "scale", "cancel", "resume", "worker"):
        assert f"    {name} " in out, name
    assert "exit codes: 0 success, 1 a task failed, 2 bad input" in " ".join(out.split())
    assert "130 cancelled" in out


def test_every_command_has_informative_help(capsys):
    names = registered()
    assert {"status", "cancel", "scale", "validate", "logs"} <= set(names)
    for name in names:
        with pytest.raises(SystemExit) as exc:
            main([name, "--help"])
        assert exc.value.code == 0
        out = capsys.readouterr().out
        assert out.startswith(f"usage: orchestrator {name}"), name
        body = out.split("\n\n", 2)[1]
        assert len(body.split()) >= 8, f"{name} --help has no description: {body!r}"


def test_version_prints_the_installed_version(capsys):
    from importlib.metadata import version

    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0
    assert capsys.readouterr().out == f"orchestrator {version('switchboard')} (switchboard)\n"


def test_no_command_prints_help_and_exits_2(capsys):
    assert main([]) == cli.EXIT_BAD_INPUT
    assert "usage: orchestrator" in capsys.readouterr().out


def test_unknown_command_and_bad_arguments_exit_2(capsys):
    for argv in (["frobnicate"], ["scale", "many"], ["cancel"], ["status", "--bogus"]):
        with pytest.raises(SystemExit) as exc:
            main(argv)
        assert exc.value.code == cli.EXIT_BAD_INPUT, argv
    assert "invalid int value: 'many'" in capsys.readouterr().err


# ---------------------------------------------------------------- validate and the examples


def test_validate_bad_graph_exits_2_with_file_line_and_hint(capsys):
    assert main(["validate", str(BAD)]) == cli.EXIT_BAD_INPUT
    err = capsys.readouterr().err
    assert f"{BAD}:2: unknown key 'max_concurent' in [run]" in err
    assert "hint: did you mean 'max_concurrent'?" in err
    assert err.rstrip().endswith(f"10 problems in {BAD}")


def test_validate_missing_file_exits_2(tmp_path, capsys):
    assert main(["validate", str(tmp_path / "nope.toml")]) == cli.EXIT_BAD_INPUT
    assert "cannot read graph file" in capsys.readouterr().err


def test_validate_toml_syntax_error_names_line_and_column(tmp_path, capsys):
    p = tmp_path / "g.toml"
    p.write_text('[agents.a]\n[[tasks]]\nid = "x\n')
    assert main(["validate", str(p)]) == cli.EXIT_BAD_INPUT
    assert f"{p}:3:" in capsys.readouterr().err


@pytest.mark.parametrize("name", ["quickstart.toml", "real-model.toml"])
def test_examples_validate(name, capsys):
    assert main(["validate", str(EXAMPLES / name)]) == cli.EXIT_OK
    assert capsys.readouterr().out.strip() == "OK: 3 tasks, 3 agents"


def test_quickstart_has_fan_out_join_retry_and_several_agents():
    from orchestrator.graph import GraphSpec

    g = GraphSpec.from_toml(EXAMPLES / "quickstart.toml")
    assert g.model.base_url is None  # the embedded sim
    write, edit = g.task("write"), g.task("edit")
    assert write.fan_out == "plan.outputs.sections" and edit.needs == ("write",)
    assert edit.retries >= 1 and edit.timeout_s <= 2
    assert len({t.agent for t in g.tasks}) >= 2


def test_real_model_differs_from_quickstart_in_the_model_section():
    from orchestrator.graph import GraphSpec

    q = GraphSpec.from_toml(EXAMPLES / "quickstart.toml")
    r = GraphSpec.from_toml(EXAMPLES / "real-model.toml")
    assert r.model.base_url == "https://api.openai.com/v1"
    assert r.model.api_key_env == "OPENAI_API_KEY"
    assert [(t.id, t.agent, t.needs, t.fan_out, t.prompt) for t in q.tasks] == \
        [(t.id, t.agent, t.needs, t.fan_out, t.prompt) for t in r.tasks]
    assert {n: (a.instructions, a.tools, a.script) for n, a in q.agents.items()} == \
        {n: (a.instructions, a.tools, a.script) for n, a in r.agents.items()}


needs_runtime = pytest.mark.skipif(
    importlib.util.find_spec("bus.hub") is None
    or importlib.util.find_spec("modellink.server") is None,
    reason="bus.hub / modellink.server not written yet")


@needs_runtime
def test_run_with_a_bad_graph_exits_2_with_file_line(tmp_path, capsys):
    code = main(["run", str(BAD), "--state-dir", str(tmp_path / "s"), "--progress", "none"])
    assert code == cli.EXIT_BAD_INPUT
    assert f"{BAD}:2:" in capsys.readouterr().err


@needs_runtime
def test_run_with_a_missing_file_exits_2(tmp_path, capsys):
    code = main(["run", str(tmp_path / "nope.toml"), "--state-dir", str(tmp_path / "s")])
    assert code == cli.EXIT_BAD_INPUT
    assert "cannot read graph file" in capsys.readouterr().err


# ---------------------------------------------------------------- cancel and scale


@pytest.fixture
def live(tmp_path):
    """A journal with one running run: plan running, build waiting."""
    j = Journal.open(tmp_path / "journal.sqlite")
    from orchestrator.graph import GraphSpec

    j.create_run("20260301-120000-aaaaaa", graph_path="g.toml", graph_text=GRAPH)
    s = Scheduler(GraphSpec.from_text(GRAPH, "g.toml"))
    [a] = [x for x in s.next_actions(0.0) if isinstance(x, StartAttempt)]
    s.on_started(a.task_id, a.attempt, 0.0)
    j.sync_tasks("20260301-120000-aaaaaa", s.task_states())
    yield tmp_path, j, s
    j.close()


RID = "20260301-120000-aaaaaa"


def sd(tmp_path) -> list[str]:
    return ["--state-dir", str(tmp_path)]


def test_cancel_run_writes_a_request_the_supervisor_takes(live, capsys):
    tmp_path, j, _ = live
    assert main(["cancel", RID[:8], *sd(tmp_path)]) == cli.EXIT_OK
    assert f"cancel requested for run {RID}" in capsys.readouterr().out
    [req] = j.take_requests(RID)
    assert (req["kind"], req["task_id"], req["arg"]) == ("cancel", None, None)


def test_a_request_to_a_run_whose_orchestrator_is_gone_says_resume_takes_it(live, capsys):
    from orchestrator import runlock
    from orchestrator.runs import run_dir

    tmp_path, j, _ = live
    d = run_dir(tmp_path, RID)
    d.mkdir(parents=True)
    gone = (f"note: run {RID}'s orchestrator is not running (killed, or its terminal closed); "
            f"the request waits for `orchestrator resume {RID}`")
    assert main(["cancel", RID, *sd(tmp_path)]) == cli.EXIT_OK
    assert gone in capsys.readouterr().err
    assert main(["scale", "3", "--run", RID, *sd(tmp_path)]) == cli.EXIT_OK
    assert gone in capsys.readouterr().err
    with runlock.hold(d):  # a live orchestrator holds the run: no note
        assert main(["cancel", RID, *sd(tmp_path)]) == cli.EXIT_OK
        assert "note:" not in capsys.readouterr().err


def test_cancel_task_writes_its_id(live, capsys):
    tmp_path, j, _ = live
    assert main(["cancel", "latest", "build", *sd(tmp_path)]) == cli.EXIT_OK
    [req] = j.take_requests(RID)
    assert (req["kind"], req["task_id"]) == ("cancel", "build")


def test_cancel_accepts_a_dynamic_child_from_the_journal(live, capsys):
    tmp_path, j, s = live
    child = s.spawn_child("plan", prompt="sub", agent=None, now=1.0)
    j.sync_tasks(RID, s.task_states())
    assert main(["cancel", RID, child, *sd(tmp_path)]) == cli.EXIT_OK
    assert j.take_requests(RID)[0]["task_id"] == "plan/1"


def test_cancel_unknown_task_exits_2_with_a_suggestion(live, capsys):
    tmp_path, j, _ = live
    assert main(["cancel", RID, "buidl", *sd(tmp_path)]) == cli.EXIT_BAD_INPUT
    err = capsys.readouterr().err
    assert "run has no task 'buidl'; did you mean 'build'?" in err
    assert j.take_requests(RID) == []


def test_cancel_a_finished_task_with_finished_children_exits_2(live, capsys):
    tmp_path, j, s = live
    s.on_succeeded("plan", 1, {"text": "ok", "outputs": {}}, 1.0)
    j.sync_tasks(RID, s.task_states())
    assert main(["cancel", RID, "plan", *sd(tmp_path)]) == cli.EXIT_BAD_INPUT
    assert "already ended (succeeded)" in capsys.readouterr().err


def test_cancel_a_finished_parent_whose_spawned_child_still_runs(live, capsys):
    tmp_path, j, s = live
    s.spawn_child("plan", prompt="sub", agent=None, now=1.0)
    s.on_succeeded("plan", 1, {"text": "ok", "outputs": {}}, 1.0)
    j.sync_tasks(RID, s.task_states())
    assert main(["cancel", RID, "plan", *sd(tmp_path)]) == cli.EXIT_OK


def test_cancel_unknown_run_exits_2(live, capsys):
    assert main(["cancel", "19990101", *sd(live[0])]) == cli.EXIT_BAD_INPUT
    assert "no run '19990101'" in capsys.readouterr().err


def test_cancel_ended_run_exits_2(live, capsys):
    tmp_path, j, _ = live
    j.finish_run(RID, "succeeded", summary={})
    assert main(["cancel", RID, *sd(tmp_path)]) == cli.EXIT_BAD_INPUT
    assert f"run {RID} already ended (succeeded)" in capsys.readouterr().err
    assert j.take_requests(RID) == []


def test_cancel_without_a_journal_exits_2_and_creates_nothing(tmp_path, capsys):
    assert main(["cancel", "latest", *sd(tmp_path / "s")]) == cli.EXIT_BAD_INPUT
    assert "no journal at" in capsys.readouterr().err
    assert not (tmp_path / "s").exists()


def test_ambiguous_run_prefix_exits_2(live, capsys):
    tmp_path, j, _ = live
    j.create_run("20260301-120000-bbbbbb", graph_path="g.toml", graph_text=GRAPH)
    assert main(["cancel", "20260301", *sd(tmp_path)]) == cli.EXIT_BAD_INPUT
    assert "ambiguous" in capsys.readouterr().err


def test_scale_writes_a_request_for_the_latest_run(live, capsys):
    tmp_path, j, _ = live
    assert main(["scale", "3", *sd(tmp_path)]) == cli.EXIT_OK
    assert "scale to 3 workers requested" in capsys.readouterr().out
    [req] = j.take_requests(RID)
    assert (req["kind"], req["arg"], req["task_id"]) == ("scale", "3", None)
    assert int(req["arg"]) == 3  # what supervisor._poll_control parses


def test_scale_to_zero_warns(live, capsys):
    tmp_path, j, _ = live
    assert main(["scale", "0", "--run", RID, *sd(tmp_path)]) == cli.EXIT_OK
    assert "only on remote workers" in capsys.readouterr().err
    assert j.take_requests(RID)[0]["arg"] == "0"


@pytest.mark.parametrize("n", ["-1", "257", "99999999999999999999"])
def test_scale_out_of_range_exits_2_and_writes_nothing(live, capsys, n):
    # a huge N used to make the orchestrator start processes in a loop that never ended
    tmp_path, j, _ = live
    assert main(["scale", n, *sd(tmp_path)]) == cli.EXIT_BAD_INPUT
    assert f"N must be 0..256, not {n}" in capsys.readouterr().err
    assert j.take_requests(RID) == []


@pytest.mark.parametrize(("args", "says"), [
    (["--workers", "100000"], "--workers must be 0..256"),
    (["--workers", "-1"], "--workers must be 0..256"),
    (["--lease-ttl", "nan"], "--lease-ttl must be a positive number"),
    (["--sim-ttft", "-1"], "--sim-ttft must be a finite number of seconds, zero or more"),
    (["--sim-prefill", "inf"], "--sim-prefill must be a finite number"),
    (["--sim-decode", "nan"], "--sim-decode must be a finite number"),
])
def test_run_refuses_out_of_range_numbers_before_starting_anything(tmp_path, capsys, args,
                                                                     says):
    graph = pathlib.Path(__file__).resolve().parent.parent / "examples" / "quickstart.toml"
    assert main(["run", str(graph), *sd(tmp_path), *args]) == cli.EXIT_BAD_INPUT
    assert says in capsys.readouterr().err
    assert not (tmp_path / "journal.sqlite").exists()


def test_scale_unknown_or_ended_run_exits_2(live, capsys):
    tmp_path, j, _ = live
    assert main(["scale", "2", "--run", "nope", *sd(tmp_path)]) == cli.EXIT_BAD_INPUT
    j.finish_run(RID, "failed", summary={})
    assert main(["scale", "2", *sd(tmp_path)]) == cli.EXIT_BAD_INPUT
    err = capsys.readouterr().err
    assert "no run 'nope'" in err and "already ended (failed)" in err


# ---------------------------------------------------------------- the installed console script


def console(*args: str, cwd: pathlib.Path) -> subprocess.CompletedProcess[str]:
    exe = [str(SCRIPT)] if SCRIPT.exists() else [sys.executable, "-m", "orchestrator"]
    return subprocess.run([*exe, *args], cwd=cwd, capture_output=True, text=True, timeout=60)


def test_console_script_help_and_exit_codes(tmp_path):
    r = console("--help", cwd=tmp_path)
    assert r.returncode == 0 and "exit codes" in r.stdout
    r = console("validate", str(BAD), cwd=tmp_path)
    assert r.returncode == 2 and f"{BAD}:2:" in r.stderr
    r = console("validate", str(EXAMPLES / "quickstart.toml"), cwd=tmp_path)
    assert (r.returncode, r.stdout.strip()) == (0, "OK: 3 tasks, 3 agents")


def test_console_script_scale_and_status_through_the_environment(live):
    tmp_path, j, _ = live
    import os

    env = {**os.environ, "SWITCHBOARD_HOME": str(tmp_path)}
    exe = [str(SCRIPT)] if SCRIPT.exists() else [sys.executable, "-m", "orchestrator"]
    r = subprocess.run([*exe, "scale", "4"], env=env, cwd=tmp_path.parent, capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert j.take_requests(RID)[0]["arg"] == "4"
    r = subprocess.run([*exe, "status", "--json"], env=env, cwd=tmp_path.parent,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and '"run_id": "20260301-120000-aaaaaa"' in r.stdout


# ---------------------------------------------------------------- logs


def test_logs_task_filter_includes_spawned_children():
    from orchestrator.logview import LogFilter

    f = LogFilter.build(task="plan", agent=None, level=None, since=None)
    ids = ["plan", "plan[0]", "plan/1", "plan/1/2", "planner", "plan2", None]
    assert [t for t in ids if f.accepts({"task_id": t})] == ["plan", "plan[0]", "plan/1",
                                                              "plan/1/2"]


def test_logs_latest_is_the_journal_latest_not_the_newest_directory(tmp_path, capsys):
    import os

    j = Journal.open(tmp_path / "journal.sqlite")
    j.create_run("20260301-120000-aaaaaa", graph_path="g.toml", graph_text=GRAPH)
    j.create_run("20260301-130000-bbbbbb", graph_path="g.toml", graph_text=GRAPH)
    j.close()
    for rid, line in (("20260301-120000-aaaaaa", "old"), ("20260301-130000-bbbbbb", "new")):
        d = tmp_path / "runs" / rid
        d.mkdir(parents=True)
        (d / "log.jsonl").write_text(f'{{"event": "{line}"}}\n')
    old = tmp_path / "runs" / "20260301-120000-aaaaaa"
    os.utime(old, (2_000_000_000, 2_000_000_000))  # touched later (e.g. resumed), started earlier
    assert main(["logs", "--json", "--state-dir", str(tmp_path)]) == 0
    assert capsys.readouterr().out == '{"event": "new"}\n'
    assert main(["logs", "2026", "--state-dir", str(tmp_path)]) == 2
    assert "matches 2 runs" in capsys.readouterr().err


def test_logs_filters_for_a_task_or_agent_the_run_never_had_are_refused(tmp_path, capsys):
    """A typo in --task or --agent printed nothing and exited 0, like a quiet task."""
    j = Journal.open(tmp_path / "journal.sqlite")
    j.create_run(RID, graph_path="g.toml", graph_text=GRAPH)
    j.close()
    d = tmp_path / "runs" / RID
    d.mkdir(parents=True)
    (d / "log.jsonl").write_text('{"event": "x", "task_id": "plan"}\n')
    assert main(["logs", RID, "--task", "plann", *sd(tmp_path)]) == cli.EXIT_BAD_INPUT
    assert "error: run has no task 'plann'; did you mean 'plan'? tasks: plan, build" in \
        capsys.readouterr().err
    assert main(["logs", RID, "--agent", "nobody", *sd(tmp_path)]) == cli.EXIT_BAD_INPUT
    assert "error: run has no agent 'nobody'" in capsys.readouterr().err
    assert main(["logs", RID, "--task", "plan", "--json", *sd(tmp_path)]) == cli.EXIT_OK
    assert capsys.readouterr().out == '{"event": "x", "task_id": "plan"}\n'
    # the orchestrator's lines name the task only: --agent finds them through the graph
    assert main(["logs", RID, "--agent", "a", "--json", *sd(tmp_path)]) == cli.EXIT_OK
    assert capsys.readouterr().out == '{"event": "x", "task_id": "plan"}\n'
    assert main(["logs", RID, "--agent", "b", "--json", *sd(tmp_path)]) == cli.EXIT_OK
    assert capsys.readouterr().out == ""


def test_resume_where_there_is_no_journal_says_so_and_creates_nothing(tmp_path, capsys):
    state = tmp_path / "nowhere"
    assert main(["resume", "latest", "--state-dir", str(state)]) == cli.EXIT_BAD_INPUT
    assert f"no journal at {state / 'journal.sqlite'}" in capsys.readouterr().err
    assert not state.exists()


@needs_runtime
@pytest.mark.parametrize("where", ["s", "s/deeper"])
def test_a_state_dir_that_is_a_file_is_said_plainly(tmp_path, capsys, where):
    (tmp_path / "s").write_text("not a directory")
    code = main(["run", str(EXAMPLES / "quickstart.toml"), "--state-dir", str(tmp_path / where),
                 "--progress", "none"])
    assert code == cli.EXIT_BAD_INPUT
    err = capsys.readouterr().err
    assert f"cannot use state directory {tmp_path / where}: it, or a folder above it, is a " \
        "file; pass --state-dir a directory you can write to" in err
    assert "Errno" not in err


def test_a_state_dir_without_permission_names_the_path_and_the_fix():
    from orchestrator.runner import state_dir_problem
    exc = PermissionError(13, "Permission denied", "/srv/x/journal.sqlite")
    assert state_dir_problem(pathlib.Path("/srv/x"), exc) == (
        "cannot use state directory /srv/x: permission denied (/srv/x/journal.sqlite); pass "
        "--state-dir a directory you can write to (or set SWITCHBOARD_HOME)")


@pytest.mark.parametrize(("flag", "value"), [("--ttft", "-1"), ("--prefill", "inf"),
                                             ("--decode", "nan")])
def test_model_server_refuses_a_negative_or_non_finite_time(capsys, flag, value):
    assert main(["model-server", "--port", "0", flag, value]) == cli.EXIT_BAD_INPUT
    assert f"{flag} must be a finite number of seconds, zero or more; got" in \
        capsys.readouterr().err


def _bad_graph_files(tmp_path: pathlib.Path) -> list[tuple[str, str]]:
    binary = tmp_path / "bin.toml"
    binary.write_bytes(b"\x00\xa6\xff" * 50)
    huge = tmp_path / "huge.toml"
    with huge.open("wb") as f:
        f.truncate(16 * 1024 * 1024 + 1)
    return [(str(binary), "is not UTF-8 text (byte 1 is b'\\xa6')"),
            ("/dev/zero", "is not a regular file"),
            (str(tmp_path), "is a directory"),
            (str(huge), "is over 16 MiB"),
            (str(tmp_path / "none.toml"), "No such file or directory")]


@pytest.mark.parametrize("command", ["validate", "run"])
def test_a_graph_that_is_no_text_file_is_bad_input_for_validate_and_run(tmp_path, capsys,
                                                                        command):
    # run used to die with an internal error on a binary file; /dev/zero was read until
    # memory ran out
    state = tmp_path / "state"
    for path, says in _bad_graph_files(tmp_path):
        assert main([command, path, *sd(state)][:2 if command == "validate" else 4]) == \
            cli.EXIT_BAD_INPUT, path
        err = capsys.readouterr().err
        assert says in err and "Traceback" not in err, err
    assert not state.exists()  # no run was started


def test_a_graph_saved_with_a_byte_order_mark_and_crlf_validates(tmp_path, capsys):
    """Windows editors write a UTF-8 BOM (and CRLF): tomllib took the BOM for a statement and
    the file was refused at line 1, column 1."""
    g = tmp_path / "g.toml"
    g.write_bytes(b"\xef\xbb\xbf" + GRAPH.replace("\n", "\r\n").encode())
    assert main(["validate", str(g)]) == 0, capsys.readouterr().err


@pytest.mark.parametrize("command", ["bus", "model-server"])
def test_a_port_in_use_is_said_plainly_not_as_an_internal_error(capsys, monkeypatch,
                                                                 command):
    import socket

    # the commands would point the process's logging at capsys's stream, closed after this
    monkeypatch.setattr("bus.logs.configure_logging", lambda **kw: None)

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert main([command, "--port", str(port)]) == 3
    err = capsys.readouterr().err
    assert f"127.0.0.1:{port}: Address already in use" in err
    assert "internal error" not in err


@pytest.mark.parametrize("pid", ["1", "0", "-5", "999999"])
def test_worker_parent_pid_that_is_not_its_parent_is_bad_input(capsys, pid):
    # it exited at once with no message, 130 or 143 depending on a race with its handler
    assert main(["worker", "--connect", "ws://127.0.0.1:1/bus", "--parent-pid", pid]) == \
        cli.EXIT_BAD_INPUT
    assert f"--parent-pid {pid} is not this worker's parent" in capsys.readouterr().err


def test_a_server_on_a_specific_host_prints_that_url_alone():
    from orchestrator.serving import listening_line

    assert listening_line("bus", "ws://10.1.2.3:7700/bus", "10.1.2.3") \
        == "bus listening on ws://10.1.2.3:7700/bus"
    line = listening_line("bus", "ws://[::]:7700/bus", "::")
    assert line.startswith("bus listening on ws://[::1]:7700/bus (on every interface")


async def test_a_childs_pipe_is_read_line_by_line_and_a_line_without_end_in_pieces():
    """read_lines over a real pipe from a real process: lines without their newline; output
    with no newline is handed over in pieces of the limit once it passes it, and what is left
    when the pipe closes comes last."""
    import trio

    from orchestrator.serving import read_lines

    got: list[bytes] = []
    script = ("import sys; sys.stdout.write('one\\n\\ntwo\\n' + 'x' * 25 + 'tail'); "
              "sys.stdout.flush()")
    with trio.fail_after(10):
        proc = await trio.lowlevel.open_process([sys.executable, "-c", script],
                                                stdout=subprocess.PIPE)
        assert proc.stdout is not None
        await read_lines(proc.stdout, got.extend, max_line=10)
        assert await proc.wait() == 0
    assert got == [b"one", b"", b"two", b"x" * 10, b"x" * 10, b"xxxxxtail"]


SIGTERM_PROBE = r"""
import os, signal, sys, time
import trio
from orchestrator.cli import sigterm_as_interrupt

def case(name, fn):
    try:
        fn()
    except KeyboardInterrupt:
        print(name, "interrupted", flush=True)
    else:
        print(name, "not interrupted", flush=True)

def plain():
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(5)

async def trio_before_receiver():
    os.kill(os.getpid(), signal.SIGTERM)
    await trio.sleep(5)

async def trio_receiver():
    with trio.open_signal_receiver(signal.SIGTERM) as sigs:
        os.kill(os.getpid(), signal.SIGTERM)
        async for sig in sigs:
            print("receiver got", signal.Signals(sig).name, flush=True)
            break

previous = sigterm_as_interrupt()
assert previous is signal.SIG_DFL, previous
case("plain", plain)
case("trio", lambda: trio.run(trio_before_receiver))
case("receiver", lambda: trio.run(trio_receiver))
case("after the receiver", plain)  # the receiver put this handler back
signal.signal(signal.SIGINT, signal.SIG_IGN)  # as in a job a script started with `&`
case("sigint ignored", plain)
"""


def test_sigterm_before_a_command_listens_is_a_ctrl_c_not_a_kill():
    """SIGTERM in a command's first moments used to kill it outright (exit -15): an
    `orchestrator run` that had opened its journal left its run "running". Until a command
    listens for SIGTERM itself, it is what Ctrl-C is then: KeyboardInterrupt, also inside
    trio.run (through trio's SIGINT handler) and when SIGINT is ignored."""
    out = subprocess.run([sys.executable, "-c", SIGTERM_PROBE], cwd=ROOT, capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == [
        "plain interrupted", "trio interrupted", "receiver got SIGTERM",
        "receiver not interrupted", "after the receiver interrupted",
        "sigint ignored interrupted"]


def test_main_puts_the_callers_sigterm_handler_back():
    import signal

    before = signal.getsignal(signal.SIGTERM)
    assert main(["validate", str(EXAMPLES / "quickstart.toml")]) == 0
    assert signal.getsignal(signal.SIGTERM) is before
