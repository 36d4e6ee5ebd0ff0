"""The migration autopilot's decisions, from query-migrate answers (pure: no QEMU)."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from tests.unit.test_savevm import ScriptedMonitor
from vmkit.qemu.migrate import GIVE_UP, SWITCH_TO_POSTCOPY, Autopilot, MigrationError, migrate


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


def test_the_dh_group_is_rfc_7919_ffdhe2048() -> None:
    import base64
    import random

    from vmkit.qemu.migrate import ffdhe2048_pem

    pem = ffdhe2048_pem().decode()
    assert pem.startswith("-----BEGIN DH PARAMETERS-----\n") and pem.endswith("-----END DH PARAMETERS-----\n")
    der = base64.b64decode("".join(pem.splitlines()[1:-1]))
    assert der[:8] == bytes.fromhex("3082010802820101") and der[-3:] == b"\x02\x01\x02"  # SEQUENCE { p, g = 2 }
    p = int.from_bytes(der[8 : 8 + 257], "big")
    assert format(p, "X").startswith("FFFFFFFFFFFFFFFFADF85458A2BB4A9AAFDC5620273D3CF1")  # RFC 7919, appendix A.1
    assert p.bit_length() == 2048 and format(p, "X").endswith("FFFFFFFFFFFFFFFF")
    rng = random.Random(7)
    q = (p - 1) // 2
    for n in (p, q):  # a safe prime (Fermat checks)
        assert all(pow(rng.randrange(2, n - 1), n - 1, n) == 1 for _ in range(5))


def test_with_postcopy_allowed_a_stuck_one_switches_instead() -> None:
    ap = Autopilot(start_ms=50, max_ms=100, patience_s=2, postcopy=True)
    assert ap.decide(active(500), 0.0) is None
    assert ap.decide(active(510), 2.5) == 100
    assert ap.decide(active(510), 5.0) == SWITCH_TO_POSTCOPY


class StuckMonitor(ScriptedMonitor):
    """A source QEMU whose migration never converges (the RAM left stays put) until it is switched to post-copy:
    then it says postcopy-active (event and query-migrate), and completed a moment later."""

    def __init__(self) -> None:
        super().__init__()
        self.status = "none"

    async def execute(self, cmd: str, args: dict[str, Any] | None = None, *, timeout_s: float = 10.0) -> Any:
        self.sent.append((cmd, args))
        if cmd == "query-migrate":
            ram = {"remaining": 1000, "dirty-sync-count": 5, "total": 4000, "transferred": 3000}
            return {"status": self.status, "ram": ram, **({"downtime": 3} if self.status == "completed" else {})}
        if cmd == "migrate":
            self.status = "active"
        if cmd == "migrate-start-postcopy":
            loop = asyncio.get_running_loop()
            loop.call_later(0.01, self._event, "postcopy-active")
            loop.call_later(0.3, self._event, "completed")
        return {}

    def _event(self, status: str) -> None:
        self.status = status
        for w in list(self.waiters):
            if w.name == "MIGRATION" and (w.match is None or w.match({"status": status})) and not w.future.done():
                w.future.set_result({"status": status})

    @property
    def cmds(self) -> list[str]:
        return [c for c, _ in self.sent]


def test_a_stuck_migration_switches_to_postcopy_and_hands_the_guest_over() -> None:
    mon = StuckMonitor()
    handed: list[str] = []

    async def on_postcopy() -> None:
        handed.append(mon.status)  # the destination is told to run the guest while pages still come

    async def go() -> dict[str, Any]:
        ap = Autopilot(start_ms=50, max_ms=50, patience_s=0.0, postcopy=True)
        return await migrate(mon, "10.0.0.2", 4444, max_bandwidth=1 << 20, autopilot=ap,  # type: ignore[arg-type]
                             progress=lambda info: None, timeout_s=10, on_postcopy=on_postcopy)  # fmt: skip

    info = asyncio.run(go())
    assert info["status"] == "completed" and info["postcopy"] and info["handed_over"]
    assert handed == ["postcopy-active"]
    assert mon.cmds.count("migrate-start-postcopy") == 1 and "migrate_cancel" not in mon.cmds


def test_without_postcopy_the_same_migration_is_cancelled() -> None:
    mon = StuckMonitor()

    async def go() -> None:
        ap = Autopilot(start_ms=50, max_ms=50, patience_s=0.0)
        task = asyncio.ensure_future(
            migrate(mon, "10.0.0.2", 4444, max_bandwidth=1 << 20, autopilot=ap,  # type: ignore[arg-type]
                    progress=lambda info: None, timeout_s=10)
        )  # fmt: skip
        while "migrate_cancel" not in mon.cmds:
            await asyncio.sleep(0.01)
        mon._event("cancelled")
        with pytest.raises(MigrationError, match="did not converge"):
            await task

    asyncio.run(go())
    assert "migrate-start-postcopy" not in mon.cmds
