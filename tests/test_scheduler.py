"""The scheduler, driven by hand with explicit times: no I/O, no trio, exact arithmetic."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from orchestrator.graph import GraphSpec
from orchestrator.scheduler import (
    TERMINAL,
    CancelAttempt,
    Scheduler,
    SchedulerError,
    StartAttempt,
)


def graph(tasks: str, *, run: str = "", agents: str = "") -> GraphSpec:
    text = f"[run]\n{run}\n[agents.a]\n[agents.b]\n{agents}\n{tasks}"
    return GraphSpec.from_text(text, "g.toml")


def task(tid: str, *needs: str, extra: str = "") -> str:
    return f'[[tasks]]\nid = "{tid}"\nagent = "a"\nneeds = {list(needs)!r}\n{extra}\n'.replace(
        "'", '"')


def starts(actions) -> list[tuple[str, int]]:
    return [(a.task_id, a.attempt) for a in actions if isinstance(a, StartAttempt)]


def cancels(actions) -> list[tuple[str, int, str]]:
    return [(a.task_id, a.attempt, a.reason) for a in actions if isinstance(a, CancelAttempt)]


def run_ok(s: Scheduler, a: StartAttempt, now: float, result=None) -> None:
    assert s.on_started(a.task_id, a.attempt, now)
    assert s.on_succeeded(a.task_id, a.attempt, result or {"text": a.task_id, "outputs": {}},
                          now)


def test_dependencies_start_only_after_success_and_prompts_are_rendered():
    g = graph(task("x") + task("y", "x", extra='prompt = "got {{ x.text }}"'))
    s = Scheduler(g)
    [a] = s.next_actions(0.0)
    assert (a.task_id, a.attempt, a.timeout_s) == ("x", 1, 600.0)
    assert s.next_actions(0.0) == []
    run_ok(s, a, 1.0, {"text": "hello", "outputs": {}})
    [b] = s.next_actions(1.0)
    assert b.task_id == "y" and b.prompt == "got hello"
    run_ok(s, b, 2.0)
    assert s.done and s.outcome() == "succeeded" and s.counts() == {"succeeded": 2}


def test_concurrency_limit_holds_and_frees_slots():
    g = graph("".join(task(f"t{i}") for i in range(5)), run="max_concurrent = 2")
    s = Scheduler(g)
    first = s.next_actions(0.0)
    assert starts(first) == [("t0", 1), ("t1", 1)]
    assert s.next_actions(0.0) == []
    run_ok(s, first[0], 1.0)
    assert starts(s.next_actions(1.0)) == [("t2", 1)]


def test_retry_backoff_is_exponential_and_capped_exactly_without_jitter():
    g = graph(task("x", extra='retries = 5'),
              run='backoff = "1s"\nbackoff_max = "5s"\njitter = 0')
    s = Scheduler(g)
    now = 0.0
    waits = []
    for attempt in range(1, 6):
        [a] = s.next_actions(now)
        assert a.attempt == attempt
        s.on_started("x", attempt, now)
        s.on_failed("x", attempt, "boom", now)
        wake = s.next_wakeup()
        assert wake is not None
        waits.append(wake - now)
        assert s.next_actions(wake - 0.001) == []
        now = wake
    assert waits == [1.0, 2.0, 4.0, 5.0, 5.0]
    [a] = s.next_actions(now)
    s.on_started("x", 6, now)
    s.on_failed("x", 6, "boom", now)
    assert s.done and s.task_result("x")["state"] == "failed"
    assert s.task_result("x")["error"] == "boom"


def test_jitter_is_seeded_deterministic_and_bounded():
    g = graph(task("x"), run='backoff = "2s"\njitter = 0.5')
    s1, s2, s3 = Scheduler(g, seed=1), Scheduler(g, seed=1), Scheduler(g, seed=2)
    d1 = [s1.backoff_delay("x", n) for n in range(1, 6)]
    assert d1 == [s2.backoff_delay("x", n) for n in range(1, 6)]
    assert d1 != [s3.backoff_delay("x", n) for n in range(1, 6)]
    for n, d in enumerate(d1, start=1):
        base = min(60.0, 2.0 * 2 ** (n - 1))
        assert base * 0.5 <= d <= base


def test_timeout_fails_the_attempt_cancels_it_and_retries_after_backoff():
    g = graph(task("x", extra='timeout = "30s"\nretries = 1'), run='backoff = "2s"\njitter = 0')
    s = Scheduler(g)
    [a] = s.next_actions(0.0)
    s.on_started("x", 1, 10.0)
    assert s.next_wakeup() == 40.0
    assert s.check_timeouts(39.999) == []
    assert s.check_timeouts(40.0) == ["x"]
    acts = s.next_actions(40.0)
    assert cancels(acts) == [("x", 1, "timed out after 30s")]
    assert starts(acts) == []
    assert s.next_wakeup() == 42.0
    assert not s.on_succeeded("x", 1, {"text": "late"}, 41.0)  # the timed-out attempt is stale
    assert starts(s.next_actions(42.0)) == [("x", 2)]
    s.on_started("x", 2, 42.0)
    s.check_timeouts(72.0)
    s.next_actions(72.0)
    assert s.done and s.outcome() == "failed"
    assert s.task_result("x")["error"] == "timed out after 30s"


def test_lost_attempt_requeues_without_spending_a_retry_and_late_result_is_refused():
    g = graph(task("x"))  # retries = 0
    s = Scheduler(g)
    [a] = s.next_actions(0.0)
    s.on_started("x", 1, 0.0)
    assert s.on_lost("x", 1, 5.0)
    [b] = s.next_actions(5.0)
    assert b.attempt == 2
    assert not s.is_current("x", 1) and s.is_current("x", 2)
    assert not s.on_succeeded("x", 1, {"text": "from the dead"}, 6.0)
    assert not s.on_failed("x", 1, "dead", 6.0)
    run_ok(s, b, 7.0)
    assert s.task_result("x")["text"] == "x" and s.outcome() == "succeeded"


def test_stop_policy_cancels_running_and_skips_the_rest():
    g = graph(task("x") + task("y") + task("z", "y"), run='failure_policy = "stop"')
    s = Scheduler(g)
    x, y = s.next_actions(0.0)
    s.on_started("x", 1, 0.0)
    s.on_started("y", 1, 0.0)
    s.on_failed("x", 1, "bad", 1.0)
    acts = s.next_actions(1.0)
    assert cancels(acts) == [("y", 1, "run stopped: task x failed")]
    st_ = s.task_states()
    assert (st_["y"].state, st_["z"].state) == ("cancelled", "not_run")
    assert st_["z"].reason == "run stopped: task x failed"
    assert s.done and s.outcome() == "failed"


def test_continue_policy_runs_independent_branches_and_skips_dependents_with_reason():
    g = graph(task("x") + task("y") + task("z", "x") + task("w", "z"),
              run='failure_policy = "continue"')
    s = Scheduler(g)
    x, y = s.next_actions(0.0)
    s.on_started("x", 1, 0.0)
    s.on_failed("x", 1, "bad", 1.0)
    assert cancels(s.next_actions(1.0)) == []
    st_ = s.task_states()
    assert st_["z"].state == "not_run" and st_["z"].reason == "needs x, which failed"
    assert st_["w"].state == "not_run" and st_["w"].reason.startswith("needs z, which was not_run")
    run_ok(s, y, 2.0)
    assert s.done and s.outcome() == "failed" and s.task_result("y")["state"] == "succeeded"


FAN = """
[[tasks]]
id = "plan"
agent = "a"
[[tasks]]
id = "code"
agent = "b"
needs = ["plan"]
fan_out = "plan.outputs.files"
prompt = "write {{ item }}"
[[tasks]]
id = "join"
agent = "a"
needs = ["code"]
prompt = "{{ code.outputs }}"
"""


def test_fan_out_creates_one_child_per_item_and_the_join_sees_all_outputs():
    s = Scheduler(graph(FAN))
    [p] = s.next_actions(0.0)
    run_ok(s, p, 1.0, {"text": "", "outputs": {"files": ["a.py", "b.py", "c.py"]}})
    kids = s.next_actions(1.0)
    assert [(k.task_id, k.prompt, k.parent, k.agent) for k in kids] == [
        ("code[0]", "write a.py", "code", "b"), ("code[1]", "write b.py", "code", "b"),
        ("code[2]", "write c.py", "code", "b")]
    for i, k in enumerate(reversed(kids)):
        assert s.next_actions(2.0) == []
        run_ok(s, k, 2.0 + i, {"text": k.task_id, "outputs": {"n": k.task_id}})
    [j] = s.next_actions(5.0)
    assert j.prompt == '[{"n": "code[0]"}, {"n": "code[1]"}, {"n": "code[2]"}]'
    assert s.task_result("code")["text"] == "code[0]\ncode[1]\ncode[2]"


def test_fan_out_over_empty_list_joins_at_once_and_over_non_list_fails():
    s = Scheduler(graph(FAN))
    [p] = s.next_actions(0.0)
    run_ok(s, p, 1.0, {"text": "", "outputs": {"files": []}})
    [j] = s.next_actions(1.0)
    assert j.task_id == "join" and j.prompt == "[]"
    s2 = Scheduler(graph(FAN))
    [p] = s2.next_actions(0.0)
    run_ok(s2, p, 1.0, {"text": "", "outputs": {"files": "a.py"}})
    assert s2.next_actions(1.0) == []
    assert s2.done and "is not a list" in s2.task_result("code")["error"]


def test_a_failed_child_fails_the_join_under_continue():
    s = Scheduler(graph(FAN, run='failure_policy = "continue"'))
    [p] = s.next_actions(0.0)
    run_ok(s, p, 1.0, {"text": "", "outputs": {"files": [1, 2]}})
    k0, k1 = s.next_actions(1.0)
    s.on_started(k0.task_id, 1, 1.0)
    s.on_failed(k0.task_id, 1, "nope", 2.0)
    run_ok(s, k1, 3.0)
    assert s.task_result("code")["state"] == "failed"
    assert "1 of 2 children did not succeed; code[0]: nope" == s.task_result("code")["error"]
    assert s.task_result("join")["state"] == "not_run" and s.done


def test_cancel_reaches_fan_out_children_dynamic_children_and_dependents():
    s = Scheduler(graph(FAN))
    [p] = s.next_actions(0.0)
    run_ok(s, p, 1.0, {"text": "", "outputs": {"files": ["a", "b"]}})
    k0, k1 = s.next_actions(1.0)
    s.on_started(k0.task_id, 1, 1.0)
    dyn = s.spawn_child("code[0]", prompt="help", agent="a", now=1.5)
    assert dyn == "code[0]/1"
    [d] = s.next_actions(1.5)
    assert (d.task_id, d.parent, d.prompt) == ("code[0]/1", "code[0]", "help")
    s.on_started(dyn, 1, 1.5)
    cancelled = s.cancel("code", "user asked", 2.0)
    assert set(cancelled) == {"code", "code[0]", "code[1]", "code[0]/1"}
    assert sorted(cancels(s.next_actions(2.0))) == [
        ("code[0]", 1, "user asked"), ("code[0]/1", 1, "user asked"),
        ("code[1]", 1, "user asked")]
    st_ = s.task_states()
    assert st_["join"].state == "not_run" and "needs code" in st_["join"].reason
    assert not s.on_succeeded("code[0]", 1, {"text": "late"}, 3.0)
    assert s.done and s.outcome() == "cancelled"
    with pytest.raises(SchedulerError, match="no task 'nope'"):
        s.cancel("nope", "x", 3.0)


def test_spawn_child_refuses_unknown_parent_finished_parent_and_unknown_agent():
    s = Scheduler(graph(task("x") + task("y", "x")))
    [x] = s.next_actions(0.0)
    with pytest.raises(SchedulerError, match="no agent 'zz'"):
        s.spawn_child("x", prompt="p", agent="zz", now=0.0)
    with pytest.raises(SchedulerError, match="no task 'q'"):
        s.spawn_child("q", prompt="p", agent=None, now=0.0)
    assert s.add_children("x", [{"prompt": "1"}, {"prompt": "2", "agent": "b"}], 0.0) == [
        "x/1", "x/2"]
    run_ok(s, x, 1.0)
    with pytest.raises(SchedulerError, match="already ended"):
        s.spawn_child("x", prompt="p", agent=None, now=1.0)
    assert not s.done  # the children still have to run


def test_spawning_stops_at_max_spawn_depth_and_max_spawned_and_a_resume_is_not_held_to_them():
    s = Scheduler(graph(task("x") + task("y"), run="max_spawn_depth = 2\nmax_spawned = 3"))
    s.next_actions(0.0)
    assert s.spawn_child("x", prompt="p", agent=None, now=0.0) == "x/1"  # depth 1
    assert s.spawn_child("x/1", prompt="p", agent=None, now=0.0) == "x/1/1"  # depth 2
    with pytest.raises(SchedulerError, match="2 levels deep and .run. max_spawn_depth is 2"):
        s.spawn_child("x/1/1", prompt="p", agent=None, now=0.0)
    assert s.descends_from("x/1/1", "x") and s.descends_from("x/1/1", "x/1")
    assert not s.descends_from("x", "x") and not s.descends_from("x/1", "y")
    assert s.spawn_child("y", prompt="p", agent=None, now=0.0) == "y/1"  # the third
    with pytest.raises(SchedulerError, match="already spawned 3 children"):
        s.spawn_child("y", prompt="p", agent=None, now=0.0)
    # a resume restores what the journal holds (task_id given) whatever the limits
    assert s.spawn_child("y", prompt="p", agent=None, now=0.0, task_id="y/2") == "y/2"
    assert s.spawned == 4


def test_dynamic_children_do_not_wait_for_a_slot_their_parent_holds():
    s = Scheduler(graph(task("x") + task("y"), run="max_concurrent = 1"))
    [x] = s.next_actions(0.0)
    s.on_started("x", 1, 0.0)
    s.spawn_child("x", prompt="sub", agent=None, now=0.0)
    assert starts(s.next_actions(0.0)) == [("x/1", 1)]


def test_a_timed_out_parent_attempt_cancels_its_spawned_children_and_its_retry_starts_fresh():
    s = Scheduler(graph(task("x", extra="retries = 1\ntimeout = \"10s\"")))
    [x] = s.next_actions(0.0)
    s.on_started("x", 1, 0.0)
    kid = s.spawn_child("x", prompt="sub", agent=None, now=1.0)
    grandkid = s.spawn_child(kid, prompt="subsub", agent=None, now=1.0)
    done = s.spawn_child("x", prompt="quick", agent=None, now=1.0)
    [k, g, d] = s.next_actions(1.0)
    for a in (k, g, d):
        s.on_started(a.task_id, 1, 1.0)
    assert s.on_succeeded(done, 1, {"text": "ok"}, 2.0)
    assert s.check_timeouts(10.0) == ["x"]
    acts = s.next_actions(10.0)
    assert sorted(cancels(acts)) == [
        ("x", 1, "timed out after 10s"),
        ("x/1", 1, "superseded: parent x's attempt 1 timed out after 10s"),
        (grandkid, 1, "superseded: parent x's attempt 1 timed out after 10s")]
    assert s.task_result(done)["state"] == "succeeded"  # an ended child is left as it was
    assert not s.on_succeeded(kid, 1, {"text": "late"}, 11.0)
    # the retry has no live children: its own spawns are numbered after the old ones
    [x2] = s.next_actions(s.next_wakeup())
    assert (x2.task_id, x2.attempt) == ("x", 2)
    s.on_started("x", 2, 20.0)
    assert s.spawn_child("x", prompt="again", agent=None, now=20.0) == "x/3"
    [k2] = s.next_actions(20.0)
    run_ok(s, k2, 21.0)
    assert s.on_succeeded("x", 2, {"text": "done"}, 22.0)
    # superseded children do not make a successful run look cancelled
    assert s.done and s.outcome() == "succeeded"


def test_a_failed_or_lost_parent_attempt_cancels_its_live_spawned_children():
    s = Scheduler(graph(task("x", extra="retries = 1") + task("y")))
    [x, y] = s.next_actions(0.0)
    s.on_started("x", 1, 0.0)
    s.on_started("y", 1, 0.0)
    kx = s.spawn_child("x", prompt="sub", agent=None, now=0.5)
    ky = s.spawn_child("y", prompt="sub", agent=None, now=0.5)
    for a in s.next_actions(0.5):
        s.on_started(a.task_id, a.attempt, 0.5)
    assert s.on_failed("x", 1, "boom", 1.0)
    assert s.on_lost("y", 1, 1.0)
    acts = s.next_actions(1.0)
    assert sorted(cancels(acts)) == [
        (kx, 1, "superseded: parent x's attempt 1 failed"),
        (ky, 1, "superseded: parent y's attempt 1 was lost")]
    assert starts(acts) == [("y", 2)]  # a lost attempt runs again at once
    st_ = s.task_states()
    assert st_[kx].state == st_[ky].state == "cancelled"
    # the final failure of the parent: the run failed, whatever its children did
    [y2] = [a for a in acts if isinstance(a, StartAttempt)]
    run_ok(s, y2, 2.0)
    [x2] = s.next_actions(s.next_wakeup())
    s.on_started("x", 2, 5.0)
    s.on_failed("x", 2, "boom again", 6.0)
    assert s.done and s.outcome() == "failed"


def test_a_superseded_child_stays_out_of_the_outcome_after_restore():
    s = Scheduler(graph(task("x", extra="retries = 1")))
    [x] = s.next_actions(0.0)
    s.on_started("x", 1, 0.0)
    kid = s.spawn_child("x", prompt="sub", agent=None, now=0.5)
    s.next_actions(0.5)
    s.on_failed("x", 1, "boom", 1.0)
    r = Scheduler.restore(s.graph, [v.to_record() for v in s.task_states().values()])
    assert r.task_states()[kid].state == "cancelled"
    [x2] = r.next_actions(10.0)
    run_ok(r, x2, 11.0)
    assert r.done and r.outcome() == "succeeded"


def test_a_lost_parent_attempt_takes_back_the_children_it_had_finished_when_it_asks_again():
    s = Scheduler(graph(task("x")))
    [x] = s.next_actions(0.0)
    s.on_started("x", 1, 0.0)
    a = s.spawn_child("x", prompt="a", agent=None, now=0.5)
    b = s.spawn_child("x", prompt="b", agent=None, now=0.5)
    [ka, kb] = s.next_actions(0.5)
    run_ok(s, ka, 1.0)
    s.on_started(b, 1, 1.0)
    assert s.on_lost("x", 1, 2.0)  # its worker died: x runs again; b was open, so it goes
    acts = s.next_actions(2.0)
    assert cancels(acts) == [(b, 1, "superseded: parent x's attempt 1 was lost")]
    assert starts(acts) == [("x", 2)]
    s.on_started("x", 2, 3.0)
    # the same first spawn is the finished child: not run again, its result stands
    assert s.spawn_child("x", prompt="a", agent=None, now=3.0) == a
    assert s.last_spawn_adopted
    # the second one had not finished: it runs anew, as a new child
    b2 = s.spawn_child("x", prompt="b", agent=None, now=3.0)
    assert b2 not in (a, b)
    assert starts(s.next_actions(3.0)) == [(b2, 1)]
    assert s.task_result(a)["state"] == "succeeded"


def test_a_rerun_that_asks_for_other_work_cancels_what_it_did_not_take_back():
    s = Scheduler(graph(task("x")))
    [x] = s.next_actions(0.0)
    s.on_started("x", 1, 0.0)
    a = s.spawn_child("x", prompt="a", agent=None, now=0.5)
    b = s.spawn_child("x", prompt="b", agent=None, now=0.5)
    for k in s.next_actions(0.5):
        run_ok(s, k, 1.0)
    s.on_lost("x", 1, 2.0)
    [x2] = s.next_actions(2.0)
    s.on_started("x", 2, 3.0)
    other = s.spawn_child("x", prompt="something else", agent=None, now=3.0)
    assert other not in (a, b)
    # and later spawns are new too, even the same work as before: the order no longer lines up
    assert s.spawn_child("x", prompt="b", agent=None, now=3.0) not in (a, b)


def test_after_a_restore_the_rerun_parent_takes_back_finished_and_in_flight_children():
    s = Scheduler(graph(task("x", extra="retries = 1")))
    [x] = s.next_actions(0.0)
    s.on_started("x", 1, 0.0)
    old = s.spawn_child("x", prompt="old", agent=None, now=0.2)
    s.next_actions(0.2)
    s.on_failed("x", 1, "boom", 0.3)  # attempt 1's open child is superseded, never taken back
    assert ("x", 2) in starts(s.next_actions(s.next_wakeup()))
    s.on_started("x", 2, 5.0)
    a = s.spawn_child("x", prompt="a", agent=None, now=5.0)
    b = s.spawn_child("x", prompt="b", agent=None, now=5.0)
    [ka, kb] = s.next_actions(5.0)
    run_ok(s, ka, 6.0)
    s.on_started(b, 1, 6.0)
    # the orchestrator dies here; resume rebuilds from the journal's snapshots
    r = Scheduler.restore(s.graph, [v.to_record() for v in s.task_states().values()])
    acts = r.next_actions(10.0)
    assert sorted(starts(acts)) == sorted([(b, 2), ("x", 3)])  # in flight: both run again
    r.on_started("x", 3, 10.0)
    r.on_started(b, 2, 10.0)
    assert r.spawn_child("x", prompt="a", agent=None, now=11.0) == a  # finished: not re-run
    assert r.spawn_child("x", prompt="b", agent=None, now=11.0) == b  # already running again
    assert starts(r.next_actions(11.0)) == []
    assert r.task_result(old)["state"] == "cancelled"
    assert r.on_succeeded(b, 2, {"text": "b"}, 12.0)
    assert r.on_succeeded("x", 3, {"text": "x"}, 13.0)
    assert r.done and r.outcome() == "succeeded"


def test_children_a_rerun_never_asks_for_again_are_cancelled_when_it_ends():
    s = Scheduler(graph(task("x")))
    [x] = s.next_actions(0.0)
    s.on_started("x", 1, 0.0)
    kid = s.spawn_child("x", prompt="a", agent=None, now=0.5)
    s.next_actions(0.5)
    s.on_started(kid, 1, 0.5)
    r = Scheduler.restore(s.graph, [v.to_record() for v in s.task_states().values()])
    acts = r.next_actions(1.0)
    assert sorted(starts(acts)) == sorted([("x", 2), (kid, 2)])
    r.on_started("x", 2, 1.0)
    r.on_started(kid, 2, 1.0)
    assert r.on_succeeded("x", 2, {"text": "no children this time"}, 2.0)
    assert cancels(r.next_actions(2.0)) == [
        (kid, 2, "superseded: parent x's new attempt ended without asking for them")]
    assert r.done and r.outcome() == "succeeded"


def test_cancel_all_cancels_everything_and_the_outcome_says_so():
    s = Scheduler(graph(task("x") + task("y", "x")))
    [x] = s.next_actions(0.0)
    s.on_started("x", 1, 0.0)
    s.cancel_all("received SIGINT", 1.0)
    assert cancels(s.next_actions(1.0)) == [("x", 1, "received SIGINT")]
    assert s.done and s.outcome() == "cancelled"
    assert all(v.state in TERMINAL for v in s.task_states().values())


def test_missing_reference_at_run_time_fails_the_task_without_retrying():
    g = graph(task("x") + task("y", "x", extra='prompt = "{{ x.outputs.k }}"\nretries = 3'),
              run='failure_policy = "continue"')
    s = Scheduler(g)
    [x] = s.next_actions(0.0)
    run_ok(s, x, 1.0, {"text": "t", "outputs": {"other": 1}})
    assert s.next_actions(1.0) == []
    r = s.task_result("y")
    assert r["state"] == "failed" and "x.outputs has no 'k'" in r["error"]


def test_task_states_snapshots_change_identity_only_when_the_task_changes():
    s = Scheduler(graph(task("x") + task("y")))
    v1 = s.task_states()["x"]
    assert s.task_states()["x"] is v1
    n = len(s.task_states().log)
    [x, y] = s.next_actions(0.0)
    v3 = s.task_states()
    assert v3["x"] is not v1 and v3["x"].state == "queued" and v3["x"].attempt == 1
    assert sorted(v3.log[n:]) == ["x", "y"]


def test_restore_keeps_finished_work_and_reruns_in_flight_with_a_new_attempt_number():
    s = Scheduler(graph(FAN))
    [p] = s.next_actions(0.0)
    run_ok(s, p, 1.0, {"text": "P", "outputs": {"files": ["a", "b"]}})
    k0, k1 = s.next_actions(1.0)
    run_ok(s, k0, 2.0, {"text": "A", "outputs": {"v": 1}})
    s.on_started(k1.task_id, 1, 2.0)
    records = [v.to_record() for v in s.task_states().values()]
    r = Scheduler.restore(graph(FAN), records)
    acts = r.next_actions(10.0)
    assert starts(acts) == [("code[1]", 2)]  # plan and code[0] are not run again
    assert not r.on_succeeded("code[1]", 1, {"text": "late"}, 11.0)
    run_ok(r, acts[0], 11.0, {"text": "B", "outputs": {"v": 2}})
    [j] = r.next_actions(11.0)
    assert j.prompt == '[{"v": 1}, {"v": 2}]'


def test_restore_of_a_finished_run_has_nothing_to_do():
    s = Scheduler(graph(task("x") + task("y", "x")))
    [x] = s.next_actions(0.0)
    run_ok(s, x, 0.0)
    [y] = s.next_actions(0.0)
    run_ok(s, y, 0.0)
    r = Scheduler.restore(graph(task("x") + task("y", "x")), s.task_states().values())
    assert r.done and r.next_actions(0.0) == [] and r.outcome() == "succeeded"


# ---------------------------------------------------------------- property tests


@st.composite
def dag_graphs(draw):
    n = draw(st.integers(1, 10))
    needs = [sorted(draw(st.sets(st.integers(0, i - 1), max_size=3))) if i else []
             for i in range(n)]
    retries = [draw(st.integers(0, 2)) for _ in range(n)]
    limit = draw(st.integers(1, 4))
    policy = draw(st.sampled_from(["stop", "continue"]))
    text = "".join(task(f"t{i}", *[f"t{j}" for j in ns], extra=f"retries = {retries[i]}")
                   for i, ns in enumerate(needs))
    g = graph(text, run=f'max_concurrent = {limit}\nfailure_policy = "{policy}"\njitter = 0')
    return g, needs, retries, limit


@given(dag_graphs(), st.integers(0, 2**32), st.floats(0.0, 0.6))
@settings(max_examples=150, deadline=None)
def test_random_dags_respect_dependencies_limits_and_retry_bounds(gx, seed, p_fail):
    g, needs, retries, limit = gx
    rng = random.Random(seed)
    s = Scheduler(g, seed=seed)
    now = 0.0
    running: dict[str, int] = {}
    attempts: dict[str, int] = {}
    failures: dict[str, int] = {}
    losses: dict[str, int] = {}
    stopped: dict[str, int] = {}
    timed_out: set[tuple[str, int]] = set()
    succeeded: set[str] = set()
    for _step in range(1000):
        for a in s.next_actions(now):
            if isinstance(a, StartAttempt):
                i = int(a.task_id[1:])
                assert all(f"t{j}" in succeeded for j in needs[i]), "started before its needs"
                assert a.task_id not in running, "two live attempts of one task"
                attempts[a.task_id] = attempts.get(a.task_id, 0) + 1
                assert a.attempt == attempts[a.task_id]
                running[a.task_id] = a.attempt
                s.on_started(a.task_id, a.attempt, now)
            elif (a.task_id, a.attempt) in timed_out:
                assert a.task_id not in running and a.reason.startswith("timed out")
            else:
                assert running.pop(a.task_id) == a.attempt
                stopped[a.task_id] = stopped.get(a.task_id, 0) + 1
        assert len(running) <= limit
        if s.done:
            break
        if running and rng.random() < 0.1:
            now += 601.0  # past every deadline (timeout 600 s): all running attempts time out
            hit = s.check_timeouts(now)
            # every running attempt times out, unless a stop already cancelled it
            assert hit and set(hit) <= set(running)
            assert len(hit) == len(running) or g.run.failure_policy == "stop"
            for tid in hit:
                timed_out.add((tid, running.pop(tid)))
                failures[tid] = failures.get(tid, 0) + 1
        elif running:
            tid = rng.choice(sorted(running))
            att = running.pop(tid)
            r = rng.random()
            if r < p_fail:
                failures[tid] = failures.get(tid, 0) + 1
                assert s.on_failed(tid, att, "x", now)
            elif r < p_fail + 0.1:
                losses[tid] = losses.get(tid, 0) + 1
                assert s.on_lost(tid, att, now)
            else:
                assert s.on_succeeded(tid, att, {"text": "", "outputs": {}}, now)
                succeeded.add(tid)
            assert not s.is_current(tid, att)
        else:
            wake = s.next_wakeup()
            assert wake is not None, "stuck: nothing running and nothing to wait for"
            now = max(now, wake)
    assert s.done and not running
    for tid, n in attempts.items():
        i = int(tid[1:])
        assert failures.get(tid, 0) <= retries[i] + 1
        assert n == (failures.get(tid, 0) + losses.get(tid, 0) + stopped.get(tid, 0)
                     + (tid in succeeded))
    states = s.task_states()
    if succeeded == {f"t{i}" for i in range(len(needs))}:
        assert s.outcome() == "succeeded"
        assert all(attempts[t] == failures.get(t, 0) + losses.get(t, 0) + 1 for t in attempts)
    else:
        assert s.outcome() == "failed"
        for tid, v in states.items():
            if v.state == "not_run":
                assert tid not in attempts or g.run.failure_policy == "stop"


@given(dag_graphs(), st.data())
@settings(max_examples=100, deadline=None)
def test_cancel_reaches_every_task_downstream(gx, data):
    g, needs, _, _ = gx
    s = Scheduler(g)
    acts = s.next_actions(0.0)
    for a in acts:
        s.on_started(a.task_id, a.attempt, 0.0)
    victim = data.draw(st.integers(0, len(needs) - 1))
    s.cancel(f"t{victim}", "stop", 1.0)
    down = {victim}
    for i, ns in enumerate(needs):
        if any(j in down for j in ns):
            down.add(i)
    states = s.task_states()
    assert states[f"t{victim}"].state == "cancelled"
    for i in down - {victim}:
        assert states[f"t{i}"].state == "not_run"
    live = {a.task_id for a in acts}
    assert {c[0] for c in cancels(s.next_actions(1.0))} == {f"t{i}" for i in down} & live


def test_stop_policy_names_the_failure_on_every_skipped_task():
    g = graph(task("x") + task("y") + task("z", "y") + task("w", "z"),
              run='failure_policy = "stop"')
    s = Scheduler(g)
    x, y = s.next_actions(0.0)
    s.on_started("x", 1, 0.0)
    s.on_failed("x", 1, "bad", 1.0)
    states = s.task_states()
    assert {t: (v.state, v.reason) for t, v in states.items() if t != "x"} == {
        "y": ("cancelled", "run stopped: task x failed"),
        "z": ("not_run", "run stopped: task x failed"),
        "w": ("not_run", "run stopped: task x failed")}


@given(dag_graphs(), st.integers(0, 2**32), st.integers(0, 30))
@settings(max_examples=100, deadline=None)
def test_restore_at_any_point_never_reruns_a_finished_task(gx, seed, crash_after):
    g, needs, _, _ = gx
    rng = random.Random(seed)
    s = Scheduler(g)
    running: dict[str, int] = {}
    for _ in range(crash_after):
        for a in s.next_actions(0.0):
            if isinstance(a, StartAttempt):
                s.on_started(a.task_id, a.attempt, 0.0)
                running[a.task_id] = a.attempt
            else:
                running.pop(a.task_id, None)
        if not running:
            break
        tid = rng.choice(sorted(running))
        att = running.pop(tid)
        if rng.random() < 0.8:
            s.on_succeeded(tid, att, {"text": tid, "outputs": {}}, 0.0)
        else:
            s.on_failed(tid, att, "x", 0.0)
    before = {t: v for t, v in s.task_states().items()}
    finished = {t for t, v in before.items() if v.state in TERMINAL}
    r = Scheduler.restore(g, [v.to_record() for v in before.values()])
    for t in finished:
        assert r.task_states()[t].state == before[t].state
    for _ in range(200):
        acts = r.next_actions(0.0)
        for a in acts:
            if isinstance(a, StartAttempt):
                assert a.task_id not in finished
                assert a.attempt > before[a.task_id].attempt
                r.on_started(a.task_id, a.attempt, 0.0)
                r.on_succeeded(a.task_id, a.attempt, {"text": "", "outputs": {}}, 0.0)
        if r.done:
            break
        if not acts:
            now = r.next_wakeup()
            assert now is not None
            r.check_timeouts(now)
            for a in r.next_actions(now):
                if isinstance(a, StartAttempt):
                    r.on_started(a.task_id, a.attempt, now)
                    r.on_succeeded(a.task_id, a.attempt, {"text": "", "outputs": {}}, now)
    assert r.done


def test_restore_brings_back_dynamic_children_of_a_finished_parent():
    g = graph(task("x"))
    s = Scheduler(g)
    [x] = s.next_actions(0.0)
    s.on_started("x", 1, 0.0)
    child = s.spawn_child("x", prompt="sub", agent="b", now=0.0)
    [c] = s.next_actions(0.0)
    s.on_started(child, 1, 0.0)
    s.on_succeeded("x", 1, {"text": "done"}, 1.0)
    r = Scheduler.restore(g, [v.to_record() for v in s.task_states().values()])
    [c2] = r.next_actions(2.0)
    assert (c2.task_id, c2.attempt, c2.agent, c2.prompt, c2.parent) == ("x/1", 2, "b", "sub", "x")
    assert r.task_result("x")["text"] == "done"
    with pytest.raises(SchedulerError, match="already ended"):
        r.spawn_child("x", prompt="more", agent=None, now=2.0)
