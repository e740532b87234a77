"""The journal on a real SQLite file: schema, migration, refusal of bad files, write-ahead reads."""

from __future__ import annotations

import json
import pathlib
import sqlite3
import time

import pytest

from orchestrator import journal as J
from orchestrator.graph import GraphSpec
from orchestrator.journal import Journal, JournalError
from orchestrator.scheduler import Scheduler

GRAPH = """
[agents.a]
[[tasks]]
id = "x"
agent = "a"
[[tasks]]
id = "y"
agent = "a"
needs = ["x"]
prompt = "{{ x.text }}"
"""


@pytest.fixture
def jpath(tmp_path):
    return tmp_path / "journal.sqlite"


def test_new_journal_is_wal_at_the_current_version(jpath):
    j = Journal.open(jpath)
    assert j.conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert j.conn.execute("PRAGMA user_version").fetchone()[0] == J.SCHEMA_VERSION
    j.close()
    Journal.open(jpath).close()  # reopening an existing journal is fine


def test_garbage_file_is_refused_and_left_byte_for_byte(jpath):
    data = bytes(range(256)) * 40
    jpath.write_bytes(data)
    with pytest.raises(JournalError, match="not a Switchboard journal .*left untouched"):
        Journal.open(jpath)
    assert jpath.read_bytes() == data
    assert not jpath.with_name(jpath.name + "-wal").exists()


def test_corrupt_sqlite_journal_is_refused_and_left_untouched(jpath):
    j = Journal.open(jpath)
    j.create_run("r1", graph_path="g.toml", graph_text="x" * 20000)
    j.close()
    raw = bytearray(jpath.read_bytes())
    assert len(raw) > 8192
    raw[4096:8192] = b"\xde\xad\xbe\xef" * 1024  # smash the second page
    jpath.write_bytes(bytes(raw))
    with pytest.raises(JournalError, match="corrupt"):
        Journal.open(jpath)
    assert jpath.read_bytes() == bytes(raw)


def test_other_sqlite_database_is_refused(jpath):
    c = sqlite3.connect(jpath)
    c.execute("CREATE TABLE mine (x)")
    c.commit()
    c.close()
    with pytest.raises(JournalError, match="not a Switchboard journal"):
        Journal.open(jpath)


def test_newer_schema_is_refused_naming_the_versions(jpath):
    c = sqlite3.connect(jpath)
    c.execute("CREATE TABLE runs (x)")
    c.execute("PRAGMA user_version = 99")
    c.commit()
    c.close()
    with pytest.raises(JournalError, match=r"schema version 99, newer .* \(up to 2\); upgrade"):
        Journal.open(jpath)


def make_v1(jpath):
    c = sqlite3.connect(jpath)
    c.executescript(J._SCHEMA_V1 + "PRAGMA user_version = 1;")
    c.execute("INSERT INTO runs (run_id, graph_path, graph_text, graph_hash, status, started) "
              "VALUES ('old', 'g.toml', 'text', 'h', 'running', 1.0)")
    c.execute("INSERT INTO attempts (run_id, task_id, attempt, state) "
              "VALUES ('old', 'x', 1, 'succeeded')")
    c.commit()
    c.close()


def test_v1_journal_is_migrated_keeping_its_runs(jpath):
    make_v1(jpath)
    j = Journal.open(jpath)
    assert j.conn.execute("PRAGMA user_version").fetchone()[0] == 2
    assert j.get_run("old")["graph_text"] == "text"
    assert j.attempts("old")[0]["usage"] is None
    j.add_request("old", "cancel")
    assert [r["kind"] for r in j.take_requests("old")] == ["cancel"]


def test_v1_journal_without_migration_is_refused_with_what_to_do(jpath):
    make_v1(jpath)
    before = jpath.read_bytes()
    with pytest.raises(JournalError, match="schema version 1; this Switchboard needs 2"):
        Journal.open(jpath, migrate=False)
    assert jpath.read_bytes() == before


def test_runs_find_list_latest_and_finish(jpath):
    j = Journal.open(jpath)
    j.create_run("20260101-aaa", graph_path="g.toml", graph_text="t1")
    time.sleep(0.002)
    j.create_run("20260101-abb", graph_path="g.toml", graph_text="t2")
    assert j.latest_run()["run_id"] == "20260101-abb"
    assert [r["run_id"] for r in j.list_runs()] == ["20260101-abb", "20260101-aaa"]
    assert j.find_run("20260101-aa")["graph_text"] == "t1"
    assert j.find_run(None)["run_id"] == "20260101-abb"
    with pytest.raises(JournalError, match="ambiguous"):
        j.find_run("20260101-a")
    with pytest.raises(JournalError, match="no run 'zzz'"):
        j.find_run("zzz")
    j.finish_run("20260101-aaa", "failed", summary={"counts": {"failed": 1}}, reason="x failed")
    r = j.get_run("20260101-aaa")
    assert (r["status"], r["reason"], r["summary"]) == ("failed", "x failed",
                                                        {"counts": {"failed": 1}})
    assert [e["kind"] for e in j.events("20260101-aaa")] == ["run.created", "run.ended"]


def test_sync_tasks_writes_changes_only_with_state_events(jpath):
    j = Journal.open(jpath)
    g = GraphSpec.from_text(GRAPH, "g.toml")
    j.create_run("r", graph_path="g.toml", graph_text=GRAPH)
    s = Scheduler(g)
    assert j.sync_tasks("r", s.task_states()) == 2
    assert j.sync_tasks("r", s.task_states()) == 0
    [x] = s.next_actions(0.0)
    assert j.sync_tasks("r", s.task_states()) == 1
    rows = {r["task_id"]: r for r in j.task_rows("r")}
    assert (rows["x"]["state"], rows["x"]["attempt"], rows["y"]["state"]) == ("queued", 1,
                                                                              "waiting")
    states = [e["data"]["state"] for e in j.events("r") if e["task_id"] == "x"]
    assert states == ["ready", "queued"]


def test_the_first_sync_writes_the_graphs_tasks_in_file_order(jpath):
    """`status` reads a run's rows back in the order they were first written and no longer
    parses the graph for its order, so the first sync must follow the file."""
    text = "[agents.a]\n" + "".join(f'[[tasks]]\nid = "t{i}"\nagent = "a"\nprompt = "p"\n'
                                      for i in range(40))
    j = Journal.open(jpath)
    j.create_run("r", graph_path="g.toml", graph_text=text)
    assert j.sync_tasks("r", Scheduler(GraphSpec.from_text(text, "g.toml")).task_states()) == 40
    assert [r["task_id"] for r in j.task_rows("r")] == [f"t{i}" for i in range(40)]


def test_a_runs_name_is_kept_when_given(jpath):
    j = Journal.open(jpath)
    j.create_run("named", graph_path="g.toml", graph_text="t", name="nightly")
    j.create_run("older", graph_path="g.toml", graph_text="t")  # as before names were kept
    assert (j.run_name("named"), j.run_name("older"), j.run_name("nope")) == ("nightly", None,
                                                                              None)


def test_closing_open_attempts_says_which_never_started(jpath):
    """A queued attempt no worker took was never "in flight": closing it says so."""
    j = Journal.open(jpath)
    j.create_run("r", graph_path="g.toml", graph_text=GRAPH)
    j.attempt_queued("r", "x", 1)
    j.attempt_started("r", "x", 1, "w1")
    j.attempt_queued("r", "y", 1)
    j.attempt_queued("r", "z", 1)
    j.attempt_started("r", "z", 1, "w1")
    j.attempt_ended("r", "z", 1, "succeeded", result={"text": "", "outputs": {}})
    assert j.close_open_attempts("r", "lost", "was in flight", "never started") == 2
    got = {(a["task_id"], a["state"], a["error"]) for a in j.attempts("r")}
    assert got == {("x", "lost", "was in flight"), ("y", "lost", "never started"),
                   ("z", "succeeded", None)}
    assert j.close_open_attempts("r", "lost", "again", "again") == 0


def test_an_attempt_queued_and_leased_in_one_batch_is_one_row_with_both_times(jpath):
    """In a batch, a queued attempt is written with its start when it is leased in the same
    batch, and otherwise when the batch ends; a batch that fails leaves neither."""
    j = Journal.open(jpath)
    j.create_run("r", graph_path="g.toml", graph_text=GRAPH)
    before = time.time()
    with j.batch():
        j.attempt_queued("r", "x", 1)
        j.attempt_queued("r", "y", 1)
        j.attempt_started("r", "x", 1, "w1")
        j.attempt_queued("r", "z", 1)
        j.attempt_ended("r", "z", 1, "cancelled", error="stop")  # writes z's queued row first
    rows = {a["task_id"]: a for a in j.attempts("r")}
    assert (rows["x"]["state"], rows["x"]["worker_id"]) == ("running", "w1")
    assert before <= rows["x"]["queued"] <= rows["x"]["started"]
    assert (rows["y"]["state"], rows["y"]["started"]) == ("queued", None)
    assert before <= rows["y"]["queued"]
    assert (rows["z"]["state"], rows["z"]["error"]) == ("cancelled", "stop")
    assert rows["z"]["queued"] is not None
    with pytest.raises(RuntimeError), j.batch():
        j.attempt_queued("r", "w", 1)
        raise RuntimeError("the dispatcher failed")
    with j.batch():
        j.attempt_started("r", "w", 1, "w2")  # not queued by the failed batch: no queued time
    assert [(a["state"], a["queued"]) for a in j.attempts("r", "w")] == [("running", None)]
    with j.batch():  # an attempt leased again (after a resume) keeps its first queued time
        j.attempt_queued("r", "x", 1)
        j.attempt_started("r", "x", 1, "w3")
    again = j.attempts("r", "x")[0]
    assert (again["worker_id"], again["queued"]) == ("w3", rows["x"]["queued"])


def test_journal_json_is_orjson_with_the_stdlib_for_what_orjson_refuses(jpath):
    """Values come back as they went in: sorted keys, non-string keys as text, and an int
    over 64 bits (orjson refuses it) through the stdlib's encoder."""
    _dumps = J._dumps
    assert _dumps({"b": 1, "a": ["é", None], 3: 2.5}) == '{"3":2.5,"a":["é",null],"b":1}'
    assert json.loads(_dumps({"big": 2 ** 70}) or "") == {"big": 2 ** 70}
    with pytest.raises(TypeError, match="object"):
        _dumps({"x": object()})


def test_resume_after_a_crash_between_result_and_task_sync_does_not_repeat_the_task(jpath):
    g = GraphSpec.from_text(GRAPH, "g.toml")
    j = Journal.open(jpath)
    j.create_run("r", graph_path="g.toml", graph_text=GRAPH)
    s = Scheduler(g)
    [x] = s.next_actions(0.0)
    j.attempt_queued("r", "x", 1)
    j.attempt_started("r", "x", 1, "w1")
    s.on_started("x", 1, 0.0)
    j.sync_tasks("r", s.task_states())
    j.attempt_ended("r", "x", 1, "succeeded", result={"text": "hi", "outputs": {}},
                    usage={"output_tokens": 7, "input_tokens": 3, "cost_usd": 0.5})
    j.close()  # the orchestrator dies here, before the task row says succeeded

    j2 = Journal.open(jpath)
    run = j2.find_run("r")
    g2 = GraphSpec.from_text(run["graph_text"], run["graph_path"])
    s2 = Scheduler.restore(g2, j2.task_records("r"))
    [y] = s2.next_actions(0.0)
    assert (y.task_id, y.prompt) == ("y", "hi")
    u = j2.usage_summary("r")
    assert u["total"]["output_tokens"] == 7 and u["by_agent"]["a"]["input_tokens"] == 3
    assert [a["worker_id"] for a in j2.attempts("r")] == ["w1"]


def test_in_flight_attempt_gets_a_higher_number_after_resume(jpath):
    g = GraphSpec.from_text(GRAPH, "g.toml")
    j = Journal.open(jpath)
    j.create_run("r", graph_path="g.toml", graph_text=GRAPH)
    s = Scheduler(g)
    s.next_actions(0.0)
    j.attempt_started("r", "x", 1, "w1")  # task row never synced: the attempt row decides
    j.sync_tasks("r", {})
    j.sync_tasks("r", s.task_states())
    s2 = Scheduler.restore(g, j.task_records("r"))
    [x] = s2.next_actions(0.0)
    assert (x.task_id, x.attempt) == ("x", 2)


def test_requests_from_another_process_are_taken_once(jpath):
    running = Journal.open(jpath)
    running.create_run("r", graph_path="g.toml", graph_text="t")
    other = Journal.open(jpath)  # e.g. `orchestrator cancel` in another process
    other.add_request("r", "scale", arg="4")
    other.add_request("r", "cancel", task_id="x")
    other.add_request("r2", "cancel")
    got = running.take_requests("r")
    assert [(r["kind"], r["task_id"], r["arg"]) for r in got] == [("scale", None, "4"),
                                                                  ("cancel", "x", None)]
    assert running.take_requests("r") == []
    with pytest.raises(JournalError, match="unknown request kind"):
        other.add_request("r", "explode")
    assert other.get_run("r")["status"] == "running"  # readers see the writer's commits


def test_each_write_is_fast(jpath):
    j = Journal.open(jpath)
    j.create_run("r", graph_path="g.toml", graph_text="t")
    n = 300
    t0 = time.perf_counter()
    for i in range(n):
        j.attempt_started("r", f"t{i}", 1, "w")
        j.attempt_ended("r", f"t{i}", 1, "succeeded", result={"text": "x", "outputs": {}})
    per_call = (time.perf_counter() - t0) / (2 * n)
    print(f"journal write: {per_call * 1e6:.0f} us per call")
    assert per_call < 0.003, f"{per_call * 1e6:.0f} us per call"


def test_missing_directory_is_named(tmp_path):
    with pytest.raises(JournalError, match="directory .*nope does not exist"):
        Journal.open(tmp_path / "nope" / "journal.sqlite")


def test_a_cancelled_or_timed_out_attempt_keeps_where_it_stopped_and_status_shows_it(jpath):
    from orchestrator import status as ST
    from orchestrator.cmd_status import load_status

    j = Journal.open(jpath)
    j.create_run("r1", graph_path="g.toml", graph_text=GRAPH)
    s = Scheduler(GraphSpec.from_text(GRAPH, "g.toml"))
    j.sync_tasks("r1", s.task_states())
    for n, state in ((1, "timed_out"), (2, "cancelled")):
        j.attempt_queued("r1", "x", n)
        j.attempt_started("r1", "x", n, "w1")
        # the supervisor ends the attempt first (deadline or cancel), the worker reports later
        j.attempt_ended("r1", "x", n, state, error=f"{state} by the supervisor")
        j.attempt_refused("r1", "x", n, reported="cancelled", why="attempt had already ended",
                          worker_id="w1", usage={"turns": 2, "output_tokens": 7},
                          stopped_at=f"turn {n + 1}: tools")
    rows = {a["attempt"]: a for a in j.attempts("r1", "x")}
    assert [(rows[n]["state"], rows[n]["stopped_at"], rows[n]["usage"]["output_tokens"])
            for n in (1, 2)] == [("timed_out", "turn 2: tools", 7),
                                 ("cancelled", "turn 3: tools", 7)]
    assert rows[1]["error"] == "timed_out by the supervisor"
    out = ST.render_text(load_status(j, "r1", now=time.time()), attempts=True, error_width=200)
    assert "timed_out by the supervisor (stopped at turn 2: tools)" in out
    assert "cancelled by the supervisor (stopped at turn 3: tools)" in out
    assert ST.to_json(load_status(j, "r1", now=time.time()))["tasks"][0]["attempt_list"][0]["stopped_at"] == \
        "turn 2: tools"
    j.close()


def test_usage_by_agent_counts_spawned_sub_agents_in_their_parents_agent_and_separately(jpath):
    from orchestrator.runner import summary_lines

    g = GraphSpec.from_text(GRAPH.replace('[agents.a]', '[agents.a]\n[agents.b]'), "g.toml")
    j = Journal.open(jpath)
    j.create_run("r", graph_path="g.toml", graph_text=g.source_text)
    s = Scheduler(g)
    [x] = s.next_actions(0.0)
    s.on_started("x", 1, 0.0)
    kid = s.spawn_child("x", prompt="sub", agent="b", now=0.0)  # another agent ...
    grandkid = s.spawn_child(kid, prompt="subsub", agent="b", now=0.0)  # ... and its child
    j.sync_tasks("r", s.task_states())

    def used(tid: str, n: int, out: int, cost: float) -> None:
        j.attempt_ended("r", tid, n, "succeeded", result={"text": "", "outputs": {}},
                        usage={"turns": 1, "input_tokens": 10 * out, "cached_tokens": out,
                               "output_tokens": out, "cost_usd": cost})

    used("x", 1, 1, 0.25)
    used("x", 2, 2, 0.25)  # a second attempt of the same task is the same task
    used(kid, 1, 10, 0.5)
    used(grandkid, 1, 100, 1.0)
    used("y", 1, 1000, 2.0)
    u = j.usage_summary("r")
    a = u["by_agent"]["a"]
    assert (a["tasks"], a["output_tokens"], a["input_tokens"], a["cost_usd"]) == (
        4, 1113, 11130, 4.0)
    assert (a["sub_agents"]["tasks"], a["sub_agents"]["output_tokens"],
            a["sub_agents"]["cost_usd"]) == (2, 110, 1.5)
    assert "b" not in u["by_agent"]  # b only ran as a's sub-agent: counted there
    assert u["total"]["output_tokens"] == sum(v["output_tokens"]
                                              for v in u["by_agent"].values())
    lines = summary_lines({"run_id": "r", "seconds": 1.0, "counts": {"succeeded": 4},
                           "usage": u}, "succeeded")
    assert lines[1] == "tokens: input 11130 (cached 1113), output 1113; cost $4.0000"
    assert lines[2] == "  agent a  4 tasks, input 11130 (cached 1113), output 1113; cost $4.0000"
    assert lines[3].split() == ["of", "which", "spawned", "sub-agents", "(2", "tasks):",
                                "input", "1100", "(cached", "110),", "output", "110;", "cost",
                                "$1.5000"]
    j.close()


def test_the_end_of_run_summary_names_failed_tasks_and_why_up_to_a_limit():
    from orchestrator.runner import SUMMARY_FAILED_MAX, summary_lines

    def lines(n: int) -> list[str]:
        failed = [(f"t{i}", f"boom {i}\n  traceback line") for i in range(n)]
        return summary_lines({"run_id": "r", "seconds": 1.0, "counts": {"failed": n},
                              "failed": failed}, "failed")

    one = lines(1)
    assert one[1] == "  failed t0: boom 0 traceback line"  # one line each
    assert one[2] == "  (details: orchestrator status r, orchestrator logs r --level warning)"
    many = lines(SUMMARY_FAILED_MAX + 3)
    assert [ln.split(":")[0] for ln in many[1:-1]] == [
        f"  failed t{i}" for i in range(SUMMARY_FAILED_MAX)]
    assert many[-1] == "  ... and 3 more failed tasks: orchestrator status r"
    assert summary_lines({"run_id": "r", "seconds": 1.0, "counts": {"succeeded": 1}},
                         "succeeded") == ['run r succeeded in 1.0s: {"succeeded": 1}']


def test_runs_starting_together_in_a_new_state_dir_all_open_the_new_journal(tmp_path):
    # Two `orchestrator run`s at once in a new state directory: the second to create the
    # schema used to be told the journal was corrupt ("table runs already exists").
    import subprocess
    import sys

    code = ("import os, sys, time\n"
            "sys.path.insert(0, sys.argv[1])\n"
            "from orchestrator.journal import Journal\n"
            "while not os.path.exists(sys.argv[3]):\n"
            "    time.sleep(0.001)\n"
            "Journal.open(sys.argv[2]).close()\n")
    repo = str(pathlib.Path(__file__).resolve().parent.parent)
    for n in range(6):
        path, go = tmp_path / f"j{n}.sqlite", tmp_path / f"go{n}"
        procs = [subprocess.Popen([sys.executable, "-c", code, repo, str(path), str(go)],
                                  stderr=subprocess.PIPE) for _ in range(6)]
        time.sleep(0.3)  # all six are waiting for the go (import takes ~0.1 s)
        go.touch()
        for p in procs:
            _, err = p.communicate(timeout=60)
            assert p.returncode == 0, err.decode()
        Journal.open_readonly(path).close()


def test_failing_to_write_is_told_apart_from_a_corrupt_journal(jpath):
    # A read-only state directory or a full disk is the environment's problem: the message
    # must not say "corrupt ... move it away", which would cost the user their history.
    Journal.open(jpath).close()
    ro = sqlite3.connect(f"file:{jpath}?mode=ro", uri=True)
    with pytest.raises(sqlite3.OperationalError) as readonly:
        ro.execute("INSERT INTO runs (run_id) VALUES ('x')")
    ro.close()
    assert J._cannot_write(readonly.value)
    assert not J._cannot_write(sqlite3.DatabaseError("file is not a database"))
