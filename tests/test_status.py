"""`orchestrator status`: the task tree, times and token totals built from a real journal file."""

from __future__ import annotations

import datetime
import hashlib
import json

import attrs
import pytest

from orchestrator import journal as J
from orchestrator import status as ST
from orchestrator.cli import main
from orchestrator.graph import GraphSpec
from orchestrator.journal import Journal
from orchestrator.scheduler import Scheduler, StartAttempt

GRAPH = """
[run]
name = "demo"
retries = 1
backoff = "1s"
jitter = 0

[agents.planner]
script = [{text = '{"files": ["a.py", "b.py"]}'}]
[agents.coder]
[agents.reviewer]

[[tasks]]
id = "plan"
agent = "planner"
prompt = "plan"

[[tasks]]
id = "code"
agent = "coder"
needs = ["plan"]
fan_out = "plan.outputs.files"
prompt = "write {{ item }}"

[[tasks]]
id = "review"
agent = "reviewer"
needs = ["code"]
prompt = "review {{ code.text }}"
"""

RUN = "20260301-120000-abcdef"
T0 = 1_772_366_400.0  # 2026-03-01 12:00:00 UTC


class Clock:
    """Stands in for the journal's `time` module: wall time moves only when a test says so."""

    def __init__(self, t: float) -> None:
        self.t = t

    def time(self) -> float:
        return self.t


def usage(inp: int, cached: int, out: int, cost: float, turns: int = 1) -> dict:
    # the shape supervisor._usage writes
    return {"turns": turns, "input_tokens": inp, "cached_tokens": cached, "output_tokens": out,
            "bytes_sent": 10, "bytes_received": 20, "model_s": 0.1, "tools_s": 0.0,
            "cost_usd": cost}


class Driver:
    """Drives a Scheduler and journals every step the way the supervisor does."""

    def __init__(self, j: Journal, clock: Clock, run_id: str = RUN,
                 name: str | None = None) -> None:
        self.j, self.clock, self.run_id = j, clock, run_id
        self.graph = GraphSpec.from_text(GRAPH, "graphs/demo.toml")
        j.create_run(run_id, graph_path="graphs/demo.toml", graph_text=GRAPH, name=name)
        self.s = Scheduler(self.graph)
        self.sync()

    def sync(self) -> None:
        self.j.sync_tasks(self.run_id, self.s.task_states())

    def starts(self) -> dict[str, StartAttempt]:
        acts = {a.task_id: a for a in self.s.next_actions(self.clock.t - T0)
                if isinstance(a, StartAttempt)}
        for a in acts.values():
            self.j.attempt_queued(self.run_id, a.task_id, a.attempt)
        self.sync()
        return acts

    def start(self, a: StartAttempt, worker: str) -> None:
        self.j.attempt_started(self.run_id, a.task_id, a.attempt, worker)
        self.s.on_started(a.task_id, a.attempt, self.clock.t - T0)
        self.sync()

    def end(self, a: StartAttempt, status: str, u: dict, *, text: str = "", outputs=None,
            error: str | None = None) -> None:
        result = {"text": text, "outputs": outputs or {}}
        self.j.attempt_ended(self.run_id, a.task_id, a.attempt, status, error=error,
                             result=result, usage=u)
        now = self.clock.t - T0
        if status == "succeeded":
            self.s.on_succeeded(a.task_id, a.attempt, result, now)
        else:
            self.s.on_failed(a.task_id, a.attempt, error or "failed", now)
        self.sync()


@pytest.fixture
def clock(monkeypatch):
    c = Clock(T0)
    monkeypatch.setattr(J, "time", c)
    return c


@pytest.fixture
def state(tmp_path, clock):
    """A journal in the middle of a run: plan done, code[0] retried, code[1] spawned a child,
    review running."""
    j = Journal.open(tmp_path / "journal.sqlite")
    d = Driver(j, clock)
    plan = d.starts()["plan"]
    d.start(plan, "w1")
    clock.t += 2
    d.end(plan, "succeeded", usage(100, 0, 20, 0.001), text='{"files": ["a.py", "b.py"]}',
          outputs={"files": ["a.py", "b.py"]})
    acts = d.starts()
    c0, c1 = acts["code[0]"], acts["code[1]"]
    d.start(c0, "w1")
    d.start(c1, "w2")
    child = d.s.spawn_child("code[1]", prompt="tests for b.py", agent=None, now=clock.t - T0)
    kid = d.starts()[child]
    d.start(kid, "w2")
    clock.t += 1
    d.end(c0, "failed", usage(50, 10, 0, 0.0005), error="timed out after 1s")
    d.end(kid, "succeeded", usage(30, 20, 5, 0.0002), text="ok")
    clock.t += 1
    d.end(c1, "succeeded", usage(60, 40, 6, 0.0003), text="b done")
    clock.t += 1  # the backoff of code[0] is over
    c0b = d.starts()["code[0]"]
    assert c0b.attempt == 2
    d.start(c0b, "w3")
    clock.t += 2
    d.end(c0b, "succeeded", usage(70, 50, 7, 0.0004), text="a done")
    review = d.starts()["review"]
    d.start(review, "w1")
    clock.t += 0.5
    return tmp_path, j, d


def load(tmp_path, ref="latest", now=None) -> ST.RunStatus:
    from orchestrator.cmd_status import load_status

    j = Journal.open_readonly(tmp_path / "journal.sqlite")
    try:
        return load_status(j, ref, now=now if now is not None else T0 + 100)
    finally:
        j.close()


def by_id(st: ST.RunStatus) -> dict[str, ST.TaskStatus]:
    return {t.task_id: t for t in st.tasks}


def test_children_follow_their_parent_in_tree_order(state):
    st = load(state[0])
    assert [(t.task_id, t.depth) for t in st.tasks] == [
        ("plan", 0), ("code", 0), ("code[0]", 1), ("code[1]", 1), ("code[1]/1", 2),
        ("review", 0)]
    assert by_id(st)["code"].children == ("code[0]", "code[1]")
    assert by_id(st)["code[1]"].children == ("code[1]/1",)


def test_parent_totals_include_children_and_own_usage_stays_separate(state):
    t = by_id(load(state[0]))
    assert t["code[1]"].usage == ST.Usage(turns=1, input_tokens=60, cached_tokens=40,
                                          output_tokens=6, cost_usd=0.0003)
    assert t["code[1]"].total.input_tokens == 60 + 30
    assert t["code[0]"].usage.input_tokens == 50 + 70  # both attempts count
    assert t["code"].usage.empty  # a fan-out join never runs itself
    assert t["code"].total.input_tokens == 50 + 70 + 60 + 30
    assert t["code"].total.cost_usd == pytest.approx(0.0005 + 0.0004 + 0.0003 + 0.0002)


def test_run_total_is_every_attempt_and_matches_the_journal_summary(state):
    tmp_path, j, d = state
    st = load(tmp_path)
    assert st.usage.input_tokens == 100 + 50 + 70 + 60 + 30
    assert st.usage.cached_tokens == 0 + 10 + 50 + 40 + 20
    assert st.usage.output_tokens == 20 + 0 + 7 + 6 + 5
    summary = j.usage_summary(RUN)["total"]
    assert st.usage.to_dict() == {k: summary[k] for k in st.usage.to_dict()}


def test_attempts_workers_wall_times_and_errors(state):
    t = by_id(load(state[0]))
    assert (t["code[0]"].attempts, t["code[0]"].failures, t["code[0]"].worker) == (2, 1, "w3")
    [a1, a2] = t["code[0]"].attempt_list
    assert (a1.state, a1.worker_id, a1.error) == ("failed", "w1", "timed out after 1s")
    assert (a2.state, a2.worker_id, a2.error) == ("succeeded", "w3", None)
    # wall times from the attempts: first start to last end
    assert t["code[0]"].started == T0 + 2 and t["code[0]"].ended == T0 + 7
    assert t["code[0]"].duration(0) == 5
    # the join's times are its children's
    assert (t["code"].started, t["code"].ended) == (T0 + 2, T0 + 7)
    assert t["code"].state == "succeeded"


def test_a_running_task_counts_its_time_up_to_now_and_the_run_is_still_going(state):
    st = load(state[0], now=T0 + 10)
    review = by_id(st)["review"]
    assert (review.state, review.ended, review.worker) == ("running", None, "w1")
    assert review.duration(st.now) == pytest.approx(10 - 7)
    assert st.status == "running" and st.ended is None and st.duration() == 10
    assert st.counts == {"succeeded": 5, "running": 1}


def test_a_run_whose_orchestrator_is_gone_counts_its_times_to_when_it_was_last_alive(state):
    """No live orchestrator holds the run (no lock holder): its times stop when it was last
    seen alive (the lock file's stamp, or its last journaled start/end if later), not now."""
    import os

    from orchestrator import runlock
    from orchestrator.runs import run_dir

    st0 = load(state[0], now=T0 + 10)
    rdir = run_dir(state[0], st0.run_id)
    rdir.mkdir(parents=True, exist_ok=True)
    runlock.lock_path(rdir).write_text("")  # nobody holds it
    os.utime(runlock.lock_path(rdir), (T0 + 8.5, T0 + 8.5))
    st = load(state[0], now=T0 + 600)
    assert st.gone and st.clock == T0 + 8.5 and st.duration() == pytest.approx(8.5)
    assert by_id(st)["review"].duration(st.clock) == pytest.approx(1.5)
    text = ST.render_text(st)
    assert "its orchestrator last seen alive 8.50s after" in text
    assert "within 2s after it was last seen" in text
    assert ST.to_json(st)["run"]["last_alive"] == T0 + 8.5
    # a stamp older than its last journaled start: that start is the later sign of life
    os.utime(runlock.lock_path(rdir), (T0 + 1, T0 + 1))
    assert load(state[0], now=T0 + 600).clock == T0 + 7


def test_text_shows_the_tree_the_tokens_and_the_total(state):
    st = load(state[0], now=T0 + 10)
    out = ST.render_text(st, tz=datetime.UTC)
    lines = out.splitlines()
    assert lines[0] == ("run 20260301-120000-abcdef (demo): running, started 2026-03-01 "
                        "12:00:00 UTC, 10.0s so far")
    assert "graph: graphs/demo.toml" in lines
    assert "tasks: 6 (5 succeeded, 1 running)" in lines
    header = next(ln for ln in lines if ln.startswith("TASK"))
    assert header.split() == list(ST.HEADER)
    rows = {ln.split()[0]: ln.split() for ln in lines if ln and not ln.startswith("TASK")}
    assert rows["code[1]/1"][:4] == ["code[1]/1", "succeeded", "1", "w2"]
    assert rows["code[0]"][1:7] == ["succeeded", "2", "w3", "12:00:02", "12:00:07", "5.00s"]
    # code's total: 210 in, 120 cached, 18 out
    assert rows["code"][-4:] == ["210", "120", "18", "$0.0014"]
    assert rows["total"][-4:] == ["310", "120", "38", "$0.0024"]
    assert rows["(own)"][-4:] == ["60", "40", "6", "$0.0003"]  # code[1]'s own share
    assert rows["review"][1:4] == ["running", "1", "w1"]
    indent = {ln.split()[0]: len(ln) - len(ln.lstrip()) for ln in lines if ln.strip()}
    assert (indent["code"], indent["code[0]"], indent["code[1]/1"]) == (0, 2, 4)


def test_text_with_attempts_lists_each_attempt_and_its_error(state):
    out = ST.render_text(load(state[0]), tz=datetime.UTC, attempts=True)
    rows = [ln.split() for ln in out.splitlines()]
    first = next(r for r in rows if r[:2] == ["#1", "failed"])
    assert first[2] == "w1" and " ".join(first[-4:]) == "timed out after 1s"
    assert any(r[:3] == ["#2", "succeeded", "w3"] for r in rows)


def test_json_has_every_task_with_own_and_total_usage(state):
    st = load(state[0], now=T0 + 10)
    doc = json.loads(json.dumps(ST.to_json(st)))
    assert doc["run"]["run_id"] == RUN and doc["run"]["status"] == "running"
    assert doc["run"]["usage"]["input_tokens"] == 310
    tasks = {t["task_id"]: t for t in doc["tasks"]}
    assert list(tasks) == ["plan", "code", "code[0]", "code[1]", "code[1]/1", "review"]
    assert tasks["code[1]/1"]["kind"] == "dynamic" and tasks["code[1]/1"]["parent"] == "code[1]"
    assert tasks["code[1]"]["usage"]["input_tokens"] == 60
    assert tasks["code[1]"]["total_usage"]["input_tokens"] == 90
    assert tasks["code[0]"]["attempt_list"][0]["error"] == "timed out after 1s"
    assert tasks["review"]["duration_s"] == 3.0 and tasks["review"]["ended"] is None


def test_a_named_run_with_task_rows_is_shown_without_parsing_its_graph(tmp_path, clock,
                                                                      monkeypatch):
    """`orchestrator run` journals the run's name; once its tasks are rows, `status` takes
    them as they are (parsing and checking a 20,000-task graph was half of its time), and
    shows what the graph would have given."""
    j = Journal.open(tmp_path / "journal.sqlite")
    d = Driver(j, clock, name="demo")
    plan = d.starts()["plan"]
    d.start(plan, "w1")
    clock.t += 2
    d.end(plan, "succeeded", usage(100, 0, 20, 0.001), text='{"files": ["a.py", "b.py"]}',
          outputs={"files": ["a.py", "b.py"]})
    d.start(d.starts()["code[1]"], "w2")
    row = j.find_run(RUN)
    with_graph = ST.build_status(row, j.task_rows(RUN), j.attempts(RUN), graph=d.graph,
                                 now=T0 + 100)

    def parse(*_a, **_k):
        raise AssertionError("status parsed the graph")

    monkeypatch.setattr(GraphSpec, "from_text", parse)
    st = load(tmp_path)
    assert st.name == "demo"
    assert [t.task_id for t in st.tasks] == ["plan", "code", "code[0]", "code[1]", "review"]
    assert ST.render_text(st, attempts=True) == ST.render_text(with_graph, attempts=True)
    assert ST.to_json(st) == ST.to_json(with_graph)


def test_graph_tasks_not_journaled_yet_show_as_waiting(tmp_path, clock):
    j = Journal.open(tmp_path / "journal.sqlite")
    j.create_run(RUN, graph_path="g.toml", graph_text=GRAPH)  # crashed before the first sync
    st = load(tmp_path)
    assert [(t.task_id, t.state, t.agent) for t in st.tasks] == [
        ("plan", "waiting", "planner"), ("code", "waiting", "coder"),
        ("review", "waiting", "reviewer")]
    assert st.usage.empty and "-" in ST.render_text(st)


def test_finished_run_shows_its_end_and_reason(state, clock):
    tmp_path, j, d = state
    j.finish_run(RUN, "cancelled", summary={}, reason="cancelled by `orchestrator cancel`")
    st = load(tmp_path)
    assert st.ended == clock.t and st.reason.startswith("cancelled by")
    out = ST.render_text(st, tz=datetime.UTC)
    assert ": cancelled, started" in out and "took 7.50s" in out
    assert "reason: cancelled by `orchestrator cancel`" in out


def test_a_stopped_run_says_how_to_go_on_and_a_resume_reopens_it(state, clock):
    tmp_path, j, d = state
    j.finish_run(RUN, "stopped", summary={}, reason="no workers left: 5 local workers exited")
    out = ST.render_text(load(tmp_path), tz=datetime.UTC)
    assert ": stopped, started" in out and "reason: no workers left" in out
    assert f"`orchestrator resume {RUN}` goes on from here" in out
    j.reopen_run(RUN)
    st = load(tmp_path)
    assert (st.status, st.ended, st.reason) == ("running", None, None)
    j.finish_run(RUN, "succeeded", summary={})
    assert not j.reopen_run(RUN)  # only a stopped run reopens
    assert load(tmp_path).status == "succeeded"
    assert [e["kind"] for e in j.events(RUN)].count("run.reopened") == 1


def test_pending_requests_are_shown_until_taken(state, clock):
    tmp_path, j, d = state
    j.add_request(RUN, "cancel", task_id="review")
    st = load(tmp_path, now=clock.t + 30)
    out = ST.render_text(st)
    assert "pending request: cancel review (asked 30.0s ago" in out
    assert f"orchestrator resume {RUN}" in out  # so long: the orchestrator may be gone
    j.take_requests(RUN)
    assert load(tmp_path).requests == ()


def test_usage_from_odd_dicts_counts_zero():
    assert ST.Usage.from_dict(None) == ST.Usage()
    assert ST.Usage.from_dict({"input_tokens": "x", "cost_usd": None, "turns": True}) == ST.Usage()
    assert ST.Usage.from_dict({"output_tokens": 5}).output_tokens == 5


@pytest.mark.parametrize(("s", "text"), [(None, "-"), (0.5, "0.50s"), (42.25, "42.2s"),
                                         (125, "2m05s"), (7322, "2h02m")])
def test_durations_are_short(s, text):
    assert ST.fmt_duration(s) == text


@pytest.mark.parametrize(("n", "text"), [(0, "0"), (99_999, "99999"), (123_456, "123.5k"),
                                         (12_345_678, "12.35M")])
def test_token_counts_are_short(n, text):
    assert ST.fmt_tokens(n) == text


# ---------------------------------------------------------------- the command


def test_status_command_prints_the_latest_run(state, capsys):
    tmp_path = state[0]
    assert main(["status", "--state-dir", str(tmp_path), "--utc"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"run {RUN} (demo): running")
    assert "code[1]/1" in out


def test_status_command_json_by_prefix(state, capsys):
    assert main(["status", RUN[:10], "--json", "--state-dir", str(state[0])]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["run"]["run_id"] == RUN and len(doc["tasks"]) == 6


def test_status_of_an_unknown_run_is_bad_input(state, capsys):
    assert main(["status", "nope", "--state-dir", str(state[0])]) == 2
    assert "no run 'nope'" in capsys.readouterr().err


def test_status_without_a_journal_says_how_to_start(tmp_path, capsys):
    assert main(["status", "--state-dir", str(tmp_path / "none")]) == 2
    err = capsys.readouterr().err
    assert "no journal at" in err and "orchestrator run FILE" in err
    assert not (tmp_path / "none").exists()  # status creates nothing


def test_status_with_an_empty_journal_says_there_are_no_runs(tmp_path, capsys):
    Journal.open(tmp_path / "journal.sqlite").close()
    assert main(["status", "--state-dir", str(tmp_path)]) == 2
    assert "no runs yet" in capsys.readouterr().err


def test_status_lists_runs(state, capsys, clock):
    tmp_path, j, d = state
    clock.t += 60
    Driver(j, clock, run_id="20260301-120100-000000")
    assert main(["status", "--runs", "--utc", "--state-dir", str(tmp_path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["RUN", "STATUS", "STARTED", "TIME", "COST", "GRAPH"]
    assert [ln.split()[0] for ln in lines[1:]] == ["20260301-120100-000000", RUN]


def test_status_never_writes_the_journal(state, capsys):
    tmp_path, j, d = state
    j.close()  # checkpoints the WAL into the main file
    path = tmp_path / "journal.sqlite"
    before = hashlib.sha256(path.read_bytes()).hexdigest()
    assert main(["status", "--state-dir", str(tmp_path)]) == 0
    assert main(["status", "--json", "--state-dir", str(tmp_path)]) == 0
    assert hashlib.sha256(path.read_bytes()).hexdigest() == before


def test_status_reads_while_the_run_writes(state, capsys, clock):
    tmp_path, j, d = state
    reader = Journal.open_readonly(tmp_path / "journal.sqlite")
    j.event(RUN, None, "x", {})  # the writer is not blocked by an open reader
    with pytest.raises(Exception, match="readonly|read-only|query_only"):
        reader.event(RUN, None, "x", {})
    reader.close()


def test_readonly_open_refuses_an_older_schema(tmp_path):
    import sqlite3

    path = tmp_path / "journal.sqlite"
    conn = sqlite3.connect(path)
    conn.executescript(J._SCHEMA_V1 + "PRAGMA user_version = 1;")
    conn.close()
    with pytest.raises(J.JournalError, match="schema version 1.*upgrades it in place"):
        Journal.open_readonly(path)


def test_a_journaled_success_counts_when_the_task_row_was_not_synced_after_it(state, clock):
    tmp_path, j, d = state
    review = by_id(load(tmp_path))["review"]
    assert review.state == "running"
    # the run's last result: journaled, then the run ended before the rows were synced
    j.attempt_ended(RUN, "review", 1, "succeeded", result={"text": "ok", "outputs": {}},
                    usage=usage(5, 0, 1, 0.0))
    j.finish_run(RUN, "succeeded", summary={})
    t = by_id(load(tmp_path))["review"]
    assert (t.state, t.error, t.ended) == ("succeeded", None, clock.t)
    assert load(tmp_path).counts == {"succeeded": 6}


def test_a_stale_success_of_an_earlier_attempt_does_not_count(state, clock):
    tmp_path, j, d = state
    # attempt 1 of review timed out and attempt 2 runs; attempt 1's late success arrives
    j.attempt_ended(RUN, "review", 1, "failed", error="timed out after 1s")
    d.s.check_timeouts(1e9)
    d.sync()
    j.attempt_ended(RUN, "review", 1, "succeeded", result={"text": "late", "outputs": {}})
    t = by_id(load(tmp_path))["review"]
    assert t.state != "succeeded"


def test_a_failed_tasks_error_cut_in_the_table_is_shown_whole_below_it(state):
    st = load(state[0])
    long = ("ModelRequestError: POST http://127.0.0.1:18001/v1/responses: error [404]: "
            "File Not Found; the server may not implement the Responses API")
    tasks = [attrs.evolve(st.tasks[0], state="failed", error=long), *st.tasks[1:]]
    out = ST.render_text(attrs.evolve(st, tasks=tasks), tz=datetime.UTC)
    table, _, below = out.partition("\nerrors in full:\n")
    assert "File Not Found" not in table  # cut at ERROR_WIDTH in its row
    assert below.splitlines() == [f"  plan: {long}"]
    assert "errors in full" not in ST.render_text(st, tz=datetime.UTC)  # short ones: no list


def test_task_view_shows_its_subtree_every_attempt_and_its_answer(state, capsys):
    assert main(["status", "--state-dir", str(state[0]), "--utc", "--task", "code[1]"]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines[0] == f"task code[1] (agent coder) in run {RUN}: succeeded"
    rows = [ln.split() for ln in lines if ln.startswith(" ") or ln.startswith("code")]
    # the task, its (own) share, its attempt, its spawned child and the child's attempt
    assert [r[0] for r in rows if r and r[0] != "answer:"][:5] == [
        "code[1]", "(own)", "#1", "code[1]/1", "#1"]
    assert out.endswith("answer:\n  b done\n")
    assert "code[0]" not in out and "review" not in out  # nothing outside the subtree


def test_task_view_names_outputs_and_says_why_there_is_no_answer(state, capsys):
    st = load(state[0], now=T0 + 10)
    plan = ST.render_task(st, "plan", tz=datetime.UTC)
    assert plan.splitlines()[-2:] == [
        '  {"files": ["a.py", "b.py"]}',
        "outputs: files (downstream prompts use {{ plan.outputs.KEY }})"]
    review = ST.render_task(st, "review", tz=datetime.UTC)
    assert review.splitlines()[-1] == "answer: none (running)"
    # a cut attempt error is shown whole, whatever the task's state
    long = "timed out after 1s " + "while the shell ran a very long command " * 4
    a1, a2 = by_id(st)["code[0]"].attempt_list
    tasks = [attrs.evolve(t, attempt_list=(attrs.evolve(a1, error=long), a2))
             if t.task_id == "code[0]" else t for t in st.tasks]
    out = ST.render_task(attrs.evolve(st, tasks=tuple(tasks)), "code[0]", tz=datetime.UTC)
    assert f"  code[0] #1: {long.strip()}" in out.splitlines()


def test_task_view_of_an_unknown_task_is_bad_input_with_a_suggestion(state, capsys):
    assert main(["status", "--state-dir", str(state[0]), "--task", "code[2]"]) == 2
    err = capsys.readouterr().err
    assert "run has no task 'code[2]'; did you mean" in err and "code[1]/1" in err


def test_task_json_is_the_subtree_with_results(state, capsys):
    assert main(["status", "--state-dir", str(state[0]), "--json", "--task", "code"]) == 0
    doc = json.loads(capsys.readouterr().out)
    tasks = {t["task_id"]: t for t in doc["tasks"]}
    assert list(tasks) == ["code", "code[0]", "code[1]", "code[1]/1"]
    assert tasks["code[1]/1"]["result"] == {"text": "ok", "outputs": {}}
    assert tasks["code"]["result"]["outputs"] == [{}, {}]
