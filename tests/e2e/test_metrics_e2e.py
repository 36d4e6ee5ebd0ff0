"""/metrics and per-VM stats on real QEMU: the text parses with prometheus_client's parser, the libvirt exporter's
families are there for a booted demo guest, and its counters rise while the guest works."""

from __future__ import annotations

import time

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import Daemon
from tests.e2e.guest import boot

pytestmark = pytest.mark.e2e

# Sample name -> labels it must carry for the VM (besides domain).
EXPECTED = {
    "libvirt_domain_info_meta": {"uuid"},
    "libvirt_domain_info_vstate": set(),
    "libvirt_domain_info_maximum_memory_bytes": set(),
    "libvirt_domain_info_memory_usage_bytes": set(),
    "libvirt_domain_info_virtual_cpus": set(),
    "libvirt_domain_info_cpu_time_seconds_total": set(),
    "libvirt_domain_vcpu_time_seconds_total": {"vcpu"},
    "libvirt_domain_memory_stats_rss_bytes": set(),
    "libvirt_domain_block_stats_read_bytes_total": {"target_device", "source_file"},
    "libvirt_domain_block_stats_write_bytes_total": {"target_device", "source_file"},
    "libvirt_domain_block_stats_read_requests_total": {"target_device", "source_file"},
    "libvirt_domain_block_stats_write_requests_total": {"target_device", "source_file"},
}
WORK = "dd if=/dev/vda of=/dev/null bs=64k count=200 iflag=direct; i=0; while [ $i -lt 200000 ]; do i=$((i+1)); done"


def scrape(d: Daemon, name: str) -> dict[str, float]:
    """Samples of VM `name` as 'metric{label=value,...}' (domain left out) -> value."""
    text = d.api.get("/metrics", raw=True).decode()
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.labels.get("domain") == name:
                labels = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()) if k not in ("domain", "uuid"))
                out[f"{s.name}{{{labels}}}"] = s.value
    return out


def next_round(d: Daemon, timeout_s: float = 10.0) -> None:
    """Wait until a sampling round has finished after this call."""

    def rounds() -> float:
        text = d.api.get("/metrics", raw=True).decode()
        fam = next(f for f in text_string_to_metric_families(text) if f.name == "vmkit_stats_rounds")
        return fam.samples[0].value

    first = rounds()
    deadline = time.monotonic() + timeout_s
    while rounds() < first + 1:
        assert time.monotonic() < deadline, "no sampling round in time"
        time.sleep(0.1)


def test_metrics_rise_while_guest_works(daemon: Daemon) -> None:
    d, name = daemon, "met"
    boot(d, name)
    try:
        d.cli("vm", "wait", name, "--for", "agent", "--timeout", "60")
        next_round(d)
        before = scrape(d, name)
        present = {k.split("{")[0] for k in before}
        assert set(EXPECTED) <= present, set(EXPECTED) - present
        assert before["libvirt_domain_info_vstate{}"] == 1
        assert before["libvirt_domain_info_virtual_cpus{}"] == 1
        assert before["libvirt_domain_info_maximum_memory_bytes{}"] == 256 * 1024 * 1024
        assert before["libvirt_domain_memory_stats_rss_bytes{}"] > 16 * 1024 * 1024
        disk = "{source_file=" + d.vm(name)["disks"][0]["path"] + ",target_device=disk0}"
        assert f"libvirt_domain_block_stats_read_bytes_total{disk}" in before
        assert "libvirt_domain_vcpu_time_seconds_total{vcpu=0}" in before

        d.cli("vm", "exec", name, "--", "sh", "-c", WORK, timeout_s=180)
        next_round(d)
        after = scrape(d, name)
        cpu = "libvirt_domain_info_cpu_time_seconds_total{}"
        assert after[cpu] > before[cpu] + 0.1, (before[cpu], after[cpu])
        vcpu = "libvirt_domain_vcpu_time_seconds_total{vcpu=0}"
        assert after[vcpu] > before[vcpu], (before[vcpu], after[vcpu])
        read = f"libvirt_domain_block_stats_read_bytes_total{disk}"
        assert after[read] >= before[read] + 200 * 64 * 1024, (before[read], after[read])
        reqs = f"libvirt_domain_block_stats_read_requests_total{disk}"
        assert after[reqs] > before[reqs]

        hist = d.api.get(f"/v1/vms/{name}/stats")
        assert hist["name"] == name and hist["interval_s"] > 0 and len(hist["samples"]) >= 2
        last = hist["samples"][-1]
        assert last["cpu_time_ns"] >= after[cpu] * 1e9 * 0.99
        assert last["disks"][0]["name"] == "disk0" and last["vcpu_time_ns"]
    finally:
        d.cli("vm", "stop", name, "--force", check=False)
    next_round(d)
    gone = scrape(d, name)
    assert gone["libvirt_domain_info_vstate{}"] == 5
    assert not any(k.startswith("libvirt_domain_block_stats") for k in gone)
