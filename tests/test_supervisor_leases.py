"""WorkerTable lease expiry as the dispatcher asks for it every step: exact times, no I/O."""

from __future__ import annotations

from orchestrator.workers import WorkerTable


def test_expiry_follows_renewals_releases_and_removals_exactly():
    t = WorkerTable(lease_ttl=5.0)
    t.hello("w1", 4, None, "", 0.0)
    t.hello("w2", 4, None, "", 0.0)
    t.grant("a", 1, "w1", 0.0)
    t.grant("b", 1, "w1", 1.0)
    t.grant("c", 1, "w2", 2.0)
    t.grant("d", 1, "w2", 2.0)
    assert t.next_deadline() == 5.0
    t.release("a", 1)  # reported: its entry no longer counts
    assert t.next_deadline() == 5.0  # w2's silence deadline (last heard at 0)
    t.heartbeat("w2", [("c", 1), ("d", 1)], 3.0)
    t.heartbeat("w1", [("b", 1)], 4.0)  # b now expires at 9
    assert t.next_deadline() == 6.0  # b's old entry (6) wakes early, never late
    assert t.expired(6.0) == []  # renewed: re-queued with its new expiry
    t.release("d", 1)
    assert [(x.task_id, x.worker_id) for x in t.expired(8.0)] == [("c", "w2")]
    assert t.holder("c", 1) is None and t.retired[("c", 1)] == "w2"
    assert t.pick() is not None and t.pick().worker_id == "w1"  # w2 is suspect now
    t.remove_worker("w1")
    assert t.expired(100.0) == [] and t.leases == {}
    assert t.next_deadline() == 8.0  # only w2's silence is left (last heard at 3)


def test_an_earlier_attempt_counts_as_held_until_its_worker_reports_or_it_expires():
    t = WorkerTable(lease_ttl=5.0)
    t.hello("w1", 4, None, "", 0.0)
    t.grant("a", 1, "w1", 0.0)
    assert t.earlier_held("a", 2) and not t.earlier_held("a", 1)
    assert not t.earlier_held("b", 2)
    t.release("a", 1)
    assert not t.earlier_held("a", 2)
    t.grant("a", 2, "w1", 1.0)
    assert [x.attempt for x in t.expired(100.0)] == [2] and not t.earlier_held("a", 3)
