from __future__ import annotations

import pytest
from pydantic import ValidationError

from vmkit.cli.main import CliError, parse_size
from vmkit.cli.output import table
from vmkit.host.check import cpu_virt_flags
from vmkit.model.vm import CreateVm, VmState, valid_name


@pytest.mark.parametrize("name", ["a", "web-1", "db.prod_2", "A" * 63, "9lives"])
def test_good_names(name: str) -> None:
    assert valid_name(name)
    CreateVm(name=name)


@pytest.mark.parametrize("name", ["", "-a", ".a", "a,b", "a b", "a/b", "A" * 64, "a;rm", "ä", "a\n"])
def test_bad_names(name: str) -> None:
    assert not valid_name(name)
    with pytest.raises(ValidationError):
        CreateVm(name=name)


@pytest.mark.parametrize(
    "fields",
    [
        {"memory_mib": 0},
        {"memory_mib": -1},
        {"memory_mib": 10**9},
        {"vcpus": 0},
        {"vcpus": 100000},
        {"bogus": 1},
        {"kernel": "relative/path"},
        {"cmdline": "a\nb"},
        {"disk_size_bytes": 0},
        {"image": "../etc"},
        {"vcpus": True},
        {"memory_mib": "512"},
        {"autostart": "yes"},
    ],
)
def test_bad_create_fields(fields: dict) -> None:
    with pytest.raises(ValidationError):
        CreateVm(name="ok", **fields)


def test_defaults() -> None:
    req = CreateVm(name="x")
    assert (req.memory_mib, req.vcpus, req.nic, req.autostart) == (512, 1, True, False)


def test_state_words_match_virsh() -> None:
    assert {s.value for s in VmState} >= {"running", "paused", "shut off", "crashed", "in shutdown"}
    assert VmState.RUNNING.active and VmState.PAUSED.active
    assert not VmState.SHUTOFF.active and not VmState.CRASHED.active


@pytest.mark.parametrize(
    ("text", "size"), [("1G", 1024**3), ("512M", 512 * 1024**2), ("1.5GiB", 3 * 1024**3 // 2), ("4096", 4096)]
)
def test_parse_size(text: str, size: int) -> None:
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["", "G", "-1G", "1X", "0"])
def test_parse_size_bad(text: str) -> None:
    with pytest.raises(CliError):
        parse_size(text)


def test_table() -> None:
    out = table(["name", "state"], [["a", "running"], ["longer", "shut off"]])
    assert out.splitlines() == ["NAME    STATE", "a       running", "longer  shut off"]


def test_cpu_flags() -> None:
    assert cpu_virt_flags("flags\t: fpu vme vmx sse\n") == {"vmx"}
    assert cpu_virt_flags("flags\t: fpu sse hypervisor\n") == set()
