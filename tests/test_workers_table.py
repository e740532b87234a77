"""Pins WorkerTable's lease rules (pure bookkeeping, no I/O)."""

from orchestrator.workers import WorkerTable


def test_a_worker_whose_lease_expired_is_not_picked_until_heard_from_again():
    # The race seen in CI: a lease granted just after the worker's last heartbeat expires
    # before the worker counts as silent; its attempt must not go back to the same (dead) worker.
    t = WorkerTable(lease_ttl=5.0)
    t.hello("a", 4, None, "", now=0.0)
    t.heartbeat("a", [], now=1.0)
    t.grant("t1", 1, "a", now=0.5)  # expires at 5.5, while "a" counts as silent only at 6.0
    assert [lease.task_id for lease in t.expired(5.5)] == ["t1"]
    assert t.dead_workers(5.5) == []
    assert t.pick() is None  # the only worker is suspect
    t.hello("b", 4, None, "", now=5.6)
    picked = t.pick()
    assert picked is not None and picked.worker_id == "b"
    t.heartbeat("a", [], now=5.7)  # alive after all: pickable again
    t.grant("x", 1, "b", now=5.7)  # b now has fewer free slots than a
    picked = t.pick()
    assert picked is not None and picked.worker_id == "a"


def test_a_heartbeat_renews_held_leases_and_names_stale_attempts():
    t = WorkerTable(lease_ttl=5.0)
    t.hello("a", 2, None, "", now=0.0)
    t.grant("t1", 1, "a", now=0.0)
    assert t.heartbeat("a", [("t1", 1), ("old", 3)], now=4.0) == [("old", 3)]
    assert t.expired(5.0) == []
    assert [lease.task_id for lease in t.expired(9.0)] == ["t1"]
