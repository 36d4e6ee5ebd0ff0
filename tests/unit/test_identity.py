"""Per-VM identities: range parsing, collisions, allocation, the launcher prefix."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from vmkit.errors import Conflict, InvalidInput
from vmkit.host import identity
from vmkit.host.identity import Identity, IdRange, RangeConflict


@pytest.mark.parametrize(
    ("text", "first", "count"),
    [
        ("1900000000-1900000099", 1_900_000_000, 100),
        ("1900000000:65536", 1_900_000_000, 65536),
        (" 70000 : 1 ", 70000, 1),
    ],
)
def test_parse(text: str, first: int, count: int) -> None:
    r = IdRange.parse(text)
    assert (r.first, r.count) == (first, count)
    assert r.first in r and r.last in r and r.first - 1 not in r and r.last + 1 not in r


@pytest.mark.parametrize("text", ["", "abc", "100-50", "0:100", "1000-2000", "65000:1000", "2147483000:10000", "5:0"])
def test_parse_refuses(text: str) -> None:
    with pytest.raises(InvalidInput):
        IdRange.parse(text)


def test_allocate_goes_round_and_skips_used() -> None:
    r = IdRange(100_000, 4)
    assert identity.allocate(r, set(), None) == 100_000
    assert identity.allocate(r, set(), 100_001) == 100_002
    assert identity.allocate(r, {100_000, 100_003}, 100_002) == 100_001  # wraps, skips the used ones
    assert identity.allocate(r, set(), 5) == 100_000  # a last id outside the range starts over
    with pytest.raises(Conflict, match="all 4 ids"):
        identity.allocate(r, {100_000, 100_001, 100_002, 100_003}, None)


def test_host_users_and_subordinate_ranges_collide(tmp_path: Path) -> None:
    (tmp_path / "subuid").write_text("alice:100000:65536\nbad line\n")
    (tmp_path / "subgid").write_text("")
    assert identity.host_conflicts(IdRange(150_000, 10), etc=tmp_path) == ["alice's range 100000-165535 in /etc/subuid"]
    assert identity.host_conflicts(IdRange(165_536, 10), etc=tmp_path) == []
    # nobody (65534) exists on every Debian host.
    assert any("nobody" in c for c in identity.host_conflicts(IdRange(65_530, 10), etc=tmp_path))


def test_registry_refuses_another_state_dirs_range(tmp_path: Path) -> None:
    reg = tmp_path / "reg"
    a, b = tmp_path / "a", tmp_path / "b"
    for s in (a, b):
        s.mkdir()
        (s / "vmkit.db").touch()
    identity.claim(IdRange(3_000_000, 100), state_dir=a, registry=reg)
    identity.claim(IdRange(3_000_000, 100), state_dir=a, registry=reg)  # its own range again: fine
    with pytest.raises(RangeConflict, match=f"3000000-3000099 of the vmkit state dir {a}"):
        identity.claim(IdRange(3_000_050, 100), state_dir=b, registry=reg)
    identity.claim(IdRange(3_000_100, 100), state_dir=b, registry=reg)
    entries = sorted(json.loads(p.read_text())["first"] for p in reg.glob("*.json"))
    assert entries == [3_000_000, 3_000_100]
    # A state dir that is gone no longer holds its range.
    (a / "vmkit.db").unlink()
    identity.claim(IdRange(3_000_000, 50), state_dir=tmp_path / "c", registry=reg)
    assert len(list(reg.glob("*.json"))) == 2


def test_launcher_drops_everything() -> None:
    argv = identity.launcher(Identity(1_900_000_007, 1_900_000_007))
    assert argv == ["setpriv", "--reuid", "1900000007", "--regid", "1900000007", "--clear-groups",
                    "--no-new-privs", "--inh-caps=-all", "--bounding-set=-all", "--"]  # fmt: skip
    assert identity.launcher(Identity(5, 5), extra_gids=(106,))[5:7] == ["--groups", "106"]
