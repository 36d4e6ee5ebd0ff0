"""The migration autopilot's decisions, from query-migrate answers (pure: no QEMU)."""

from __future__ import annotations

from vmkit.qemu.migrate import GIVE_UP, Autopilot


def active(remaining: int, passes: int = 3) -> dict:
    return {"status": "active", "ram": {"remaining": remaining, "dirty-sync-count": passes}}


def test_a_converging_migration_is_left_alone() -> None:
    ap = Autopilot(start_ms=50, max_ms=400, patience_s=2)
    assert ap.limit_ms == 50
    for t, left in enumerate((1000, 800, 600, 300, 100)):
        assert ap.decide(active(left), float(t)) is None


def test_a_stuck_one_gets_longer_downtime_then_is_given_up() -> None:
    ap = Autopilot(start_ms=50, max_ms=300, patience_s=2)
    assert ap.decide(active(500), 0.0) is None
    assert ap.decide(active(520), 1.0) is None  # not yet: patience
    assert ap.decide(active(510), 2.5) == 100
    assert ap.decide(active(510), 5.0) == 200
    assert ap.decide(active(510), 7.5) == 300  # capped at the maximum
    assert ap.decide(active(510), 8.0) is None
    assert ap.decide(active(510), 10.0) == GIVE_UP


def test_progress_resets_the_patience() -> None:
    ap = Autopilot(start_ms=50, max_ms=300, patience_s=2)
    ap.decide(active(500), 0.0)
    assert ap.decide(active(400), 1.9) is None  # shrank
    assert ap.decide(active(400), 3.0) is None
    assert ap.decide(active(400), 4.0) == 100


def test_nothing_is_judged_during_the_first_pass() -> None:
    ap = Autopilot(start_ms=50, max_ms=300, patience_s=2)
    for t in range(10):  # a slow link: the first pass over RAM takes long, and that is fine
        assert ap.decide(active(500, passes=1), float(t)) is None


def test_a_small_maximum_is_the_start() -> None:
    assert Autopilot(start_ms=50, max_ms=20).limit_ms == 20
    assert Autopilot(start_ms=50, max_ms=20).decide({"status": "setup"}, 0.0) is None
