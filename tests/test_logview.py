"""Pins `orchestrator logs` filtering and rendering, and its CLI on a real log file."""

import json
import subprocess
import sys
from datetime import UTC, datetime, timedelta, timezone

import pytest

from orchestrator.logview import LogFilter, LogFilterError, parse_since, render

NOW = datetime(2026, 11, 24, 21, 0, 0, tzinfo=UTC)
LINES = [
    {"timestamp": "2026-11-24T20:50:00Z", "level": "info", "event": "run.start", "run_id": "r1"},
    {"timestamp": "2026-11-24T20:58:00Z", "level": "info", "event": "task.start",
     "run_id": "r1", "task_id": "plan", "attempt": 1, "agent_id": "planner", "worker_id": "w1"},
    {"timestamp": "2026-11-24T20:59:00Z", "level": "warning", "event": "tool.error",
     "run_id": "r1", "task_id": "code[0]", "attempt": 2, "agent_id": "coder", "worker_id": "w2",
     "tool": "shell", "error": "exit 1"},
]


def test_filter_by_task_includes_fan_out_children():
    f = LogFilter.build(task="code", agent=None, level=None, since=None)
    assert [r["event"] for r in LINES if f.accepts(r)] == ["tool.error"]


def test_filter_by_agent_level_and_since():
    assert [r["event"] for r in LINES
            if LogFilter.build(task=None, agent="planner", level=None, since=None).accepts(r)] \
        == ["task.start"]
    assert [r["event"] for r in LINES
            if LogFilter.build(task=None, agent=None, level="warning", since=None).accepts(r)] \
        == ["tool.error"]
    f = LogFilter.build(task=None, agent=None, level=None, since="5m", now=NOW)
    assert [r["event"] for r in LINES if f.accepts(r)] == ["task.start", "tool.error"]


def test_since_accepts_iso_and_rejects_nonsense_with_a_hint():
    assert parse_since("2026-11-24T20:00:00Z") == datetime(2026, 11, 24, 20, tzinfo=UTC)
    with pytest.raises(LogFilterError, match="duration back from now"):
        parse_since("yesterday")
    with pytest.raises(LogFilterError, match="use one of"):
        LogFilter.build(task=None, agent=None, level="loud", since=None)
    # the error quotes what was typed, not the date a time of day became
    with pytest.raises(LogFilterError, match="--since '25:61'"):
        parse_since("25:61")


@pytest.mark.parametrize("text", ["99999999999h", "9999999d", "1" + "0" * 400 + "s"])
def test_since_further_back_than_a_date_can_go_means_every_line(text):
    # these raised OverflowError: an internal error (exit 3) instead of all lines
    assert parse_since(text) == datetime.min.replace(tzinfo=UTC)


def test_times_are_shown_and_read_in_one_zone_as_status_shows_them():
    """logs printed UTC while status printed local time, and a zone-less --since was UTC."""
    tokyo = timezone(timedelta(hours=9))
    rec = {"timestamp": "2026-11-24T20:31:05.123456Z", "level": "info", "event": "x"}
    assert render(rec, UTC).startswith("20:31:05.123 INFO")
    assert render(rec, tokyo).startswith("05:31:05.123 INFO")
    now = datetime(2026, 11, 24, 21, 0, tzinfo=UTC)
    assert parse_since("2026-11-25T05:31:05", now, tokyo) == datetime(2026, 11, 24, 20, 31, 5,
                                                                        tzinfo=UTC)
    assert parse_since("05:31:05", now, tokyo) == datetime(2026, 11, 24, 20, 31, 5, tzinfo=UTC)
    assert parse_since("9:05", now, UTC) == datetime(2026, 11, 24, 9, 5, tzinfo=UTC)
    assert parse_since("2026-11-24T20:00:00Z", now, tokyo) == datetime(2026, 11, 24, 20,
                                                                         tzinfo=UTC)


def test_lines_are_put_back_in_time_order_within_the_window():
    from orchestrator.logview import TimeOrder

    recs = [{"timestamp": f"2026-11-24T20:00:0{d}Z", "event": str(d)} for d in (1, 3, 2, 0)]
    recs.insert(2, {"event": "no time"})  # stays after the line before it
    order = TimeOrder(window=3)
    out = [x for r in recs for x in order.push(r, r["event"])] + order.drain()
    assert out == ["1", "0", "2", "3", "no time"]  # 0 came 4 lines late: out of order, kept
    wide = TimeOrder()
    assert [x for r in recs for x in wide.push(r, r["event"])] + wide.drain() == [
        "0", "1", "2", "3", "no time"]


def test_logs_prints_a_workers_late_shipped_lines_in_time_order(tmp_path):
    d = tmp_path / "runs" / "20261124-205000-abc123"
    d.mkdir(parents=True)
    lines = [{"timestamp": "2026-11-24T20:00:07.868Z", "event": "task.result"},
             {"timestamp": "2026-11-24T20:00:07.686Z", "event": "task.start"}]
    (d / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    out = subprocess.run([sys.executable, "-m", "orchestrator", "logs", "--json",
                          "--state-dir", str(tmp_path)], capture_output=True, text=True,
                         check=True).stdout
    assert [json.loads(x)["event"] for x in out.splitlines()] == ["task.start", "task.result"]


def test_render_shows_where_and_the_rest():
    line = render(LINES[2])
    assert "code[0]#2" in line and "coder" in line and "@w2" in line
    assert "tool.error" in line and "tool=shell" in line and 'error="exit 1"' in line


def test_logs_command_reads_a_run_directory(tmp_path):
    d = tmp_path / "runs" / "20261124-205000-abc123"
    d.mkdir(parents=True)
    (d / "log.jsonl").write_bytes(b"".join(json.dumps(r).encode() + b"\n" for r in LINES)
                                  + b"not json\n")
    base = [sys.executable, "-m", "orchestrator", "logs", "--state-dir", str(tmp_path)]
    out = subprocess.run(base + ["2026", "--agent", "coder"], capture_output=True, text=True,
                         check=True).stdout
    assert "tool.error" in out and "task.start" not in out
    out = subprocess.run(base + ["latest", "--json", "--task", "plan"], capture_output=True,
                         text=True, check=True).stdout
    assert [json.loads(x)["event"] for x in out.splitlines()] == ["task.start"]
    bad = subprocess.run(base + ["nope"], capture_output=True, text=True)
    assert bad.returncode == 2 and "no run 'nope'" in bad.stderr


def test_logs_follow_prints_lines_as_they_come_and_stops_when_the_run_ends(tmp_path):
    from orchestrator import runlock
    from orchestrator.journal import Journal
    from orchestrator.runs import journal_path, run_dir

    rid = "20261124-205000-abc123"
    j = Journal.open(journal_path(tmp_path))
    j.create_run(rid, graph_path="g.toml", graph_text="")
    d = run_dir(tmp_path, rid)
    d.mkdir(parents=True)
    lock = runlock.hold(d)  # this test is the run's orchestrator
    log = d / "log.jsonl"
    log.write_bytes(json.dumps(LINES[0]).encode() + b"\n")
    proc = subprocess.Popen([sys.executable, "-m", "orchestrator", "logs", rid, "--follow",
                             "--json", "--state-dir", str(tmp_path)],
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        assert json.loads(proc.stdout.readline())["event"] == LINES[0]["event"]
        with log.open("ab") as f:  # written while it follows: printed too
            f.write(json.dumps(LINES[1]).encode() + b"\n")
        assert json.loads(proc.stdout.readline())["event"] == LINES[1]["event"]
        with log.open("ab") as f:  # the run's last line, then the run ends
            f.write(json.dumps(LINES[2]).encode() + b"\n")
        j.finish_run(rid, "succeeded", summary={})
        assert proc.wait(timeout=30) == 0  # it stopped by itself ...
        rest = proc.stdout.read()
        assert [json.loads(x)["event"] for x in rest.splitlines()] == [LINES[2]["event"]]
    finally:  # ... having printed every line the run wrote
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        j.close()
        lock.close()


def test_logs_follow_stops_when_the_runs_orchestrator_is_gone(tmp_path):
    """A run left "running" by a killed orchestrator: following it used to wait for ever."""
    from orchestrator.journal import Journal
    from orchestrator.runs import journal_path, run_dir

    rid = "20261124-205000-abc123"
    j = Journal.open(journal_path(tmp_path))
    j.create_run(rid, graph_path="g.toml", graph_text="")
    j.close()
    d = run_dir(tmp_path, rid)
    d.mkdir(parents=True)
    (d / "log.jsonl").write_bytes(json.dumps(LINES[0]).encode() + b"\n")
    r = subprocess.run([sys.executable, "-m", "orchestrator", "logs", rid, "--follow", "--json",
                        "--state-dir", str(tmp_path)], capture_output=True, text=True, timeout=30)
    assert r.returncode == 0
    assert [json.loads(x)["event"] for x in r.stdout.splitlines()] == [LINES[0]["event"]]
    assert r.stderr == (f"note: run {rid}'s orchestrator is not running (killed, or its terminal "
                        f"closed); nothing more is written until `orchestrator resume {rid}`\n")
