"""The stats service's pure parts (exposition text, /proc and QMP parsing) and its ring buffers, without a daemon."""

from __future__ import annotations

import asyncio
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from vmkit.errors import NotFound
from vmkit.model.stats import DiskSample, NicSample, VmSample
from vmkit.model.vm import VmSpec, VmState
from vmkit.services import stats
from vmkit.services.stats import Domain, RoundStats, StatsService, disk_samples, escape_label, exposition

DOMAINS = [
    Domain(
        "web",
        "00000000-0000-4000-8000-000000000001",
        VmState.RUNNING,
        2,
        256,
        {"disk0": "/var/lib/vmkit/vms/web/d.qcow2"},
    ),
    Domain("idle", "00000000-0000-4000-8000-000000000002", VmState.SHUTOFF, 1, 64),
]
SAMPLE = VmSample(
    time_s=1_800_000_000.0,
    cpu_time_ns=12_500_000_000,
    vcpu_time_ns=(7_000_000_000, 250_000_000),
    rss_bytes=123_456_789,
    cgroup_memory_bytes=130_000_000,
    disks=(DiskSample("disk0", 1000, 2000, 10, 20, 3, 1_500_000_000, 2_000_000_000, 0),),
    nics=(NicSample("net0", "vk-web-0", 100, 2, 0, 1, 300, 4, 0, 0),),
)
ROUNDS = RoundStats(interval_s=2.0, rounds=7, last_duration_s=0.5, total_duration_s=3.0, total_cpu_s=0.25)

EXPECTED = """\
# HELP libvirt_domain_info_meta Domain metadata
# TYPE libvirt_domain_info_meta gauge
libvirt_domain_info_meta{domain="web",uuid="00000000-0000-4000-8000-000000000001"} 1
libvirt_domain_info_meta{domain="idle",uuid="00000000-0000-4000-8000-000000000002"} 1
# HELP libvirt_domain_info_vstate VSTATE_HELP
# TYPE libvirt_domain_info_vstate gauge
libvirt_domain_info_vstate{domain="web"} 1
libvirt_domain_info_vstate{domain="idle"} 5
# HELP libvirt_domain_info_maximum_memory_bytes Maximum allowed memory of the domain, in bytes.
# TYPE libvirt_domain_info_maximum_memory_bytes gauge
libvirt_domain_info_maximum_memory_bytes{domain="web"} 268435456
libvirt_domain_info_maximum_memory_bytes{domain="idle"} 67108864
# HELP libvirt_domain_info_memory_usage_bytes Memory usage of the domain, in bytes.
# TYPE libvirt_domain_info_memory_usage_bytes gauge
libvirt_domain_info_memory_usage_bytes{domain="web"} 268435456
libvirt_domain_info_memory_usage_bytes{domain="idle"} 67108864
# HELP libvirt_domain_info_virtual_cpus Number of virtual CPUs for the domain.
# TYPE libvirt_domain_info_virtual_cpus gauge
libvirt_domain_info_virtual_cpus{domain="web"} 2
libvirt_domain_info_virtual_cpus{domain="idle"} 1
# HELP libvirt_domain_info_cpu_time_seconds_total Amount of CPU time used by the domain, in seconds.
# TYPE libvirt_domain_info_cpu_time_seconds_total counter
libvirt_domain_info_cpu_time_seconds_total{domain="web"} 12.5
# HELP libvirt_domain_vcpu_time_seconds_total Amount of CPU time used by the domain's VCPU, in seconds.
# TYPE libvirt_domain_vcpu_time_seconds_total counter
libvirt_domain_vcpu_time_seconds_total{domain="web",vcpu="0"} 7.0
libvirt_domain_vcpu_time_seconds_total{domain="web",vcpu="1"} 0.25
# HELP libvirt_domain_memory_stats_rss_bytes Resident Set Size of the process running the domain, in bytes.
# TYPE libvirt_domain_memory_stats_rss_bytes gauge
libvirt_domain_memory_stats_rss_bytes{domain="web"} 123456789
"""
BLOCK = [
    ("read_bytes_total", "1000"),
    ("read_requests_total", "10"),
    ("read_time_seconds_total", "1.5"),
    ("write_bytes_total", "2000"),
    ("write_requests_total", "20"),
    ("write_time_seconds_total", "2.0"),
    ("flush_requests_total", "3"),
    ("flush_time_seconds_total", "0.0"),
]
EXPECTED_TAIL = """\
# HELP vmkit_vm_cgroup_memory_bytes Memory charged to the VM's cgroup (RSS and page cache), in bytes.
# TYPE vmkit_vm_cgroup_memory_bytes gauge
vmkit_vm_cgroup_memory_bytes{domain="web"} 130000000
# HELP vmkit_vms Defined VMs by state.
# TYPE vmkit_vms gauge
vmkit_vms{state="running"} 1
vmkit_vms{state="paused"} 0
vmkit_vms{state="in shutdown"} 0
vmkit_vms{state="shut off"} 1
vmkit_vms{state="crashed"} 0
vmkit_vms{state="pmsuspended"} 0
vmkit_vms{state="saved"} 0
# HELP vmkit_stats_interval_seconds Time between two sampling rounds, in seconds.
# TYPE vmkit_stats_interval_seconds gauge
vmkit_stats_interval_seconds 2.0
# HELP vmkit_stats_rounds_total Sampling rounds done since the daemon started.
# TYPE vmkit_stats_rounds_total counter
vmkit_stats_rounds_total 7
# HELP vmkit_stats_round_duration_seconds Wall-clock time of the last sampling round, in seconds.
# TYPE vmkit_stats_round_duration_seconds gauge
vmkit_stats_round_duration_seconds 0.5
# HELP vmkit_stats_round_seconds_total Wall-clock time of all sampling rounds, in seconds.
# TYPE vmkit_stats_round_seconds_total counter
vmkit_stats_round_seconds_total 3.0
# HELP vmkit_stats_round_cpu_seconds_total CPU time of the daemon's event loop during sampling rounds, in seconds.
# TYPE vmkit_stats_round_cpu_seconds_total counter
vmkit_stats_round_cpu_seconds_total 0.25
"""


def test_exposition_exact_lines() -> None:
    text = exposition(DOMAINS, {"web": SAMPLE, "idle": SAMPLE}, ROUNDS)
    block = ""
    for suffix, value in BLOCK:
        name = f"libvirt_domain_block_stats_{suffix}"
        help_ = next(h for s, _, _, h in stats._BLOCK if s == suffix)
        block += f"# HELP {name} {help_}\n# TYPE {name} counter\n"
        block += f'{name}{{domain="web",source_file="/var/lib/vmkit/vms/web/d.qcow2",target_device="disk0"}} {value}\n'
    iface = ""
    for suffix, attr, help_ in stats._IFACE:
        name = f"libvirt_domain_interface_stats_{suffix}"
        iface += f"# HELP {name} {help_}\n# TYPE {name} counter\n"
        value = getattr(SAMPLE.nics[0], attr)
        iface += f'{name}{{domain="web",target_device="vk-web-0",virtual_interface="net0"}} {value}\n'
    # "idle" is shut off: its (stale) sample is not shown, only its info gauges.
    assert text == EXPECTED.replace("VSTATE_HELP", stats._VSTATE_HELP) + block + iface + EXPECTED_TAIL


def test_exposition_parses_with_prometheus_client() -> None:
    text = exposition(DOMAINS, {"web": SAMPLE}, ROUNDS)
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for fam in text_string_to_metric_families(text)
        for s in fam.samples
    }
    assert samples[("libvirt_domain_info_cpu_time_seconds_total", (("domain", "web"),))] == 12.5
    key = (("domain", "web"), ("source_file", "/var/lib/vmkit/vms/web/d.qcow2"), ("target_device", "disk0"))
    assert samples[("libvirt_domain_block_stats_read_bytes_total", key)] == 1000
    assert samples[("vmkit_vms", (("state", "shut off"),))] == 1


def test_exposition_without_vms_or_samples() -> None:
    """Families are declared even when empty; a running VM not yet sampled has only its info gauges."""
    running = [Domain("new", "u", VmState.RUNNING, 1, 64)]
    text = exposition(running, {}, RoundStats(2.0, 0, 0.0, 0.0))
    names = {f.name for f in text_string_to_metric_families(text)}
    assert "libvirt_domain_info_cpu_time_seconds" in names  # the parser drops a counter's _total
    assert "libvirt_domain_info_cpu_time_seconds_total{" not in text
    assert 'libvirt_domain_info_vstate{domain="new"} 1' in text
    assert exposition([], {}, RoundStats(2.0, 0, 0.0, 0.0)).count('vmkit_vms{state="running"} 0') == 1


def test_label_escaping() -> None:
    assert escape_label('a"b\\c\nd') == 'a\\"b\\\\c\\nd'
    odd = Domain('we"ird\\na\nme', "u", VmState.PAUSED, 1, 64)
    text = exposition([odd], {}, ROUNDS)
    assert 'libvirt_domain_info_vstate{domain="we\\"ird\\\\na\\nme"} 3' in text
    fams = {f.name: f for f in text_string_to_metric_families(text)}
    assert fams["libvirt_domain_info_vstate"].samples[0].labels["domain"] == 'we"ird\\na\nme'


def test_parse_proc_stat() -> None:
    line = "4242 (CPU 0/TCG) S 1 4200 4200 0 -1 4194368 5 0 0 0 150 25 0 0 20 0 7 0 99 123456 300 18446744073709551615"
    assert stats.parse_proc_stat(line) == ("CPU 0/TCG", 175, 300)
    # comm may contain ') ' itself: the last ')' ends it.
    tricky = line.replace("(CPU 0/TCG)", "(a) b (c)")
    assert stats.parse_proc_stat(tricky)[0] == "a) b (c"
    own = stats.parse_proc_stat(Path(f"/proc/{os.getpid()}/stat").read_text())
    assert own[1] >= 0 and own[2] > 0


def test_disk_samples_from_query_blockstats() -> None:
    entry = {
        "device": "",
        "node-name": "disk1",
        "qdev": "/machine/peripheral/disk1-dev/virtio-backend",
        "stats": {"rd_bytes": 512, "wr_bytes": 4096, "rd_operations": 1, "wr_operations": 2, "flush_operations": 3}
        | {"rd_total_time_ns": 5, "wr_total_time_ns": 6, "flush_total_time_ns": 7, "idle_time_ns": 8},
        "parent": {"node-name": "disk1-file", "stats": {"rd_bytes": 99}},
    }
    other = {"device": "cd0", "node-name": "#block123", "qdev": "/machine/peripheral/cdrom/x", "stats": {}}
    by_node = {"node-name": "disk0", "stats": {"rd_bytes": 1}}
    got = disk_samples([entry, other, by_node])
    assert [d.name for d in got] == ["disk0", "disk1"]
    assert got[1] == DiskSample("disk1", 512, 4096, 1, 2, 3, 5, 6, 7)


# ---- the sampler over stand-in VMs ------------------------------------------------------------------------------


@dataclass
class _Proc:
    pid: int


class _Monitor:
    def __init__(self) -> None:
        self.calls = 0
        self.fail = False

    async def query_blockstats(self, *, timeout_s: float = 10.0) -> list[dict[str, Any]]:
        self.calls += 1
        if self.fail:
            raise TimeoutError
        return [{"qdev": "/machine/peripheral/disk0-dev/virtio-backend", "stats": {"rd_bytes": 100 * self.calls}}]


@dataclass
class _Vm:
    spec: VmSpec
    state: VmState
    proc: _Proc | None = None
    monitor: _Monitor | None = None
    cgroup: Any = None


@dataclass
class _Vms:
    vms: list[_Vm] = field(default_factory=list)

    def runtimes(self) -> list[_Vm]:
        return self.vms


def _vm(name: str, uuid: str = "u1", *, running: bool = True) -> _Vm:
    spec = VmSpec(name=name, uuid=uuid, memory_mib=64, vcpus=1)
    if not running:
        return _Vm(spec, VmState.SHUTOFF)
    # This test process stands in for QEMU: its /proc files are real.
    return _Vm(spec, VmState.RUNNING, _Proc(os.getpid()), _Monitor())


def test_sampler_ring_buffer_and_history() -> None:
    vms = _Vms([_vm("a"), _vm("off", running=False)])
    svc = StatsService(vms, interval_s=1.0, history_s=3.0)  # type: ignore[arg-type]

    async def rounds(n: int) -> None:
        for _ in range(n):
            await svc.sample_once()

    asyncio.run(rounds(5))
    hist = svc.history("a")
    assert len(hist.samples) == 3 and hist.interval_s == 1.0
    assert [s.disks[0].read_bytes for s in hist.samples if s.disks] == [300, 400, 500]
    s = hist.samples[-1]
    assert s.cpu_time_ns is not None and s.cpu_time_ns > 0  # no cgroup: /proc/PID/stat
    assert s.rss_bytes is not None and s.rss_bytes > 0 and s.cgroup_memory_bytes is None
    assert svc.history("off").samples == []
    with pytest.raises(NotFound):
        svc.history("nope")
    assert 'libvirt_domain_block_stats_read_bytes_total{domain="a",source_file="",target_device="disk0"} 500' in (
        svc.metrics()
    )

    # A QEMU that does not answer: the sample has no disk figures, the rest is there.
    vms.vms[0].monitor.fail = True  # type: ignore[union-attr]
    asyncio.run(rounds(1))
    assert svc.history("a").samples[-1].disks is None
    assert "libvirt_domain_block_stats_read_bytes_total{" not in svc.metrics()
    assert 'libvirt_domain_info_cpu_time_seconds_total{domain="a"}' in svc.metrics()

    # Same name, new VM: its history starts afresh; a deleted VM's history goes.
    vms.vms = [_vm("a", uuid="u2")]
    assert svc.history("a").samples == []
    asyncio.run(rounds(1))
    assert len(svc.history("a").samples) == 1
    assert svc.round_stats().rounds == 7
