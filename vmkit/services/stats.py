"""Statistics: one sampler for every running VM, feeding both per-VM history (graphs) and `GET /metrics`.

Every `interval_s` (2 s) one round samples each VM whose QEMU runs: its cgroup's CPU time and memory
(VmCgroup.stats()), QEMU's RSS and each vCPU thread's CPU time from /proc, and the disks' counters from one QMP
`query-blockstats` per VM (sent to all VMs at once, read back while the files are read). The round runs on the
daemon's event loop; its file reads take microseconds per VM and it sends nothing to a VM that is not running,
so its cost grows with running VMs only, by a fixed amount each. Each VM keeps the last `history_s` (10 min)
of samples in a ring buffer. `/metrics` is rendered from the latest round and the VMs' current state and never
samples itself, so its cost is a few string joins per VM, never a QMP round trip.

`/metrics` speaks the Prometheus text format (0.0.4) with the metric names of the libvirt exporters
(github.com/Tinkoff/libvirt-exporter, from kumina/libvirt_exporter; labels `domain` = VM name), so dashboards
built for them work. Emitted:

- every defined VM: `libvirt_domain_info_meta{domain,uuid}` (1), `libvirt_domain_info_vstate` (libvirt's
  virDomainState: 1 running, 3 paused, 4 being shut down, 5 shut off, 6 crashed, 7 pmsuspended),
  `libvirt_domain_info_maximum_memory_bytes`, `libvirt_domain_info_memory_usage_bytes` and
  `libvirt_domain_info_virtual_cpus`. memory_usage is what libvirt reports there too: the guest's current
  allocation, i.e. the balloon's size. vmkit's guests have no balloon device, so it equals the maximum; what
  the VM really uses on the host is `libvirt_domain_memory_stats_rss_bytes` (and vmkit_vm_cgroup_memory_bytes).
- every running VM, from the latest round: `libvirt_domain_info_cpu_time_seconds_total` (the cgroup's CPU
  time, as libvirt's QEMU driver reads it from cpuacct), `libvirt_domain_vcpu_time_seconds_total{vcpu}`
  (QEMU names vCPU threads "CPU n/TCG" or "CPU n/KVM" with debug-threads=on), `libvirt_domain_memory_stats_rss_bytes`,
  and per disk (labels `target_device` = disk0, disk1, ... and `source_file`) `libvirt_domain_block_stats_`
  `read_bytes_total`, `write_bytes_total`, `read_requests_total`, `write_requests_total`, `flush_requests_total`,
  `read_time_seconds_total`, `write_time_seconds_total`, `flush_time_seconds_total`.
- vmkit's own: `vmkit_vms{state}` (defined VMs per state word), `vmkit_vm_cgroup_memory_bytes{domain}`, and the
  sampler's `vmkit_stats_interval_seconds`, `vmkit_stats_rounds_total`, `vmkit_stats_round_duration_seconds`
  (the last round, wall clock), `vmkit_stats_round_seconds_total` and `vmkit_stats_round_cpu_seconds_total`.

Not emitted, and why:
- `libvirt_domain_interface_stats_*` of user-mode (slirp) NICs: QMP exposes no counters for them (no query for
  netdev or virtio-net counters; `query-stats` covers KVM only). Tap NICs (vmkit networks) have them, read from
  the host side of the tap (labels `target_device` = the tap, `virtual_interface` = net0, …).
- `libvirt_domain_memory_stats_*` other than rss (balloon: actual, unused, available, usable, swap, faults,
  disk cache): they need a virtio-balloon device with stats polling, which vmkit's guests do not have.
- `libvirt_domain_vcpu_{state,cpu,wait_seconds_total,delay_seconds_total}`, `libvirt_domain_block_stats_`
  `{allocation,capacity_bytes,physicalsize_bytes,limit_*}`, `libvirt_versions_info`, `libvirt_up`: not needed by
  the common dashboards; left for when a graph wants them (`up` is Prometheus's own for the scrape).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import time
from collections import deque
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vmkit.errors import NotFound
from vmkit.model.stats import DiskSample, NicSample, VmSample, VmStatsHistory
from vmkit.model.vm import VmState

if TYPE_CHECKING:
    from vmkit.services.vms import VmRuntime, VmService

log = logging.getLogger(__name__)

DEFAULT_INTERVAL_S = 2.0
DEFAULT_HISTORY_S = 600.0
MIB = 1024 * 1024
_CLK_TCK = os.sysconf("SC_CLK_TCK")
_PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")
_VCPU_THREAD = re.compile(r"CPU (\d+)/(?:TCG|KVM|HVF|WHPX)")
_DISK_QDEV = re.compile(r"/machine/peripheral/(disk\d+)-dev(?:/virtio-backend)?")
_DISK_NODE = re.compile(r"disk\d+")

# libvirt's virDomainState numbers (libvirt_domain_info_vstate).
LIBVIRT_STATE = {
    VmState.RUNNING: 1,
    VmState.PAUSED: 3,
    VmState.SHUTDOWN: 4,
    VmState.SHUTOFF: 5,
    VmState.CRASHED: 6,
    VmState.PMSUSPENDED: 7,
    VmState.SAVED: 5,  # libvirt: shut off, reason "saved"
}


# ---- pure: /proc and QMP parsing -------------------------------------------------------------------------------


def parse_proc_stat(text: str) -> tuple[str, int, int]:
    """(comm, utime+stime in clock ticks, rss in pages) from a /proc/PID/stat or /proc/PID/task/TID/stat line.

    comm may itself hold spaces and parentheses ("CPU 0/TCG"), so it is what lies between the first '(' and
    the last ')'."""
    _, _, rest = text.partition("(")
    comm, _, tail = rest.rpartition(")")
    fields = tail.split()
    # After comm: state is field 3 of proc(5), so field N is fields[N - 3].
    return comm, int(fields[11]) + int(fields[12]), int(fields[21])


def disk_samples(blockstats: Iterable[Mapping[str, Any]]) -> tuple[DiskSample, ...]:
    """vmkit's disks (disk0-dev, ...) among query-blockstats' entries, by name; others are skipped."""
    out = []
    for entry in blockstats:
        m = _DISK_QDEV.fullmatch(str(entry.get("qdev", "")))
        node = str(entry.get("node-name", ""))
        name = m.group(1) if m else node if _DISK_NODE.fullmatch(node) else None
        st = entry.get("stats") or {}
        if name is None:
            continue
        out.append(
            DiskSample(
                name=name,
                read_bytes=int(st.get("rd_bytes", 0)),
                write_bytes=int(st.get("wr_bytes", 0)),
                read_requests=int(st.get("rd_operations", 0)),
                write_requests=int(st.get("wr_operations", 0)),
                flush_requests=int(st.get("flush_operations", 0)),
                read_time_ns=int(st.get("rd_total_time_ns", 0)),
                write_time_ns=int(st.get("wr_total_time_ns", 0)),
                flush_time_ns=int(st.get("flush_total_time_ns", 0)),
            )
        )
    return tuple(sorted(out, key=lambda d: int(d.name.removeprefix("disk"))))


# ---- pure: the exposition text ---------------------------------------------------------------------------------

_VSTATE_HELP = (
    "Virtual domain state. 1: the domain is running, 3: paused, 4: being shut down, 5: shut off, 6: crashed, "
    "7: suspended by guest power management"
)


@dataclass(frozen=True, slots=True)
class Domain:
    """What /metrics says of one defined VM besides its samples."""

    name: str
    uuid: str
    state: VmState
    vcpus: int
    memory_mib: int
    disk_paths: Mapping[str, str] = field(default_factory=dict)  # disk name (disk0, …) -> its file


@dataclass(frozen=True, slots=True)
class RoundStats:
    interval_s: float
    rounds: int
    last_duration_s: float
    total_duration_s: float
    total_cpu_s: float = 0.0


# (metric suffix, NicSample attribute, help), as libvirt's exporter names them.
_IFACE = (
    ("receive_bytes_total", "rx_bytes", "Number of bytes received on a network interface, in bytes."),
    ("receive_packets_total", "rx_packets", "Number of packets received on a network interface."),
    ("receive_errors_total", "rx_errors", "Number of packet receive errors on a network interface."),
    ("receive_drops_total", "rx_drops", "Number of packet receive drops on a network interface."),
    ("transmit_bytes_total", "tx_bytes", "Number of bytes transmitted on a network interface, in bytes."),
    ("transmit_packets_total", "tx_packets", "Number of packets transmitted on a network interface."),
    ("transmit_errors_total", "tx_errors", "Number of packet transmit errors on a network interface."),
    ("transmit_drops_total", "tx_drops", "Number of packet transmit drops on a network interface."),
)
# Host side of a tap: what it receives the guest sent. Guest-side name -> host-side counter file.
_TAP_COUNTERS = {
    "rx_bytes": "tx_bytes", "rx_packets": "tx_packets", "rx_errors": "tx_errors", "rx_drops": "tx_dropped",
    "tx_bytes": "rx_bytes", "tx_packets": "rx_packets", "tx_errors": "rx_errors", "tx_drops": "rx_dropped",
}  # fmt: skip


def qemu_taps(pid: int) -> list[str]:
    """The taps QEMU holds (from /proc/PID/fdinfo: a tun descriptor says `iff: NAME`), so a daemon restarted
    while the VM runs finds them again without records of its own."""
    taps = []
    try:
        fds = os.listdir(f"/proc/{pid}/fdinfo")
    except OSError:
        return []
    for fd in fds:
        try:
            with open(f"/proc/{pid}/fdinfo/{fd}") as fh:
                for line in fh:
                    if line.startswith("iff:"):
                        taps.append(line.split(":", 1)[1].strip())
        except OSError:
            continue
    return sorted(taps)


def nic_samples(pid: int) -> tuple[NicSample, ...]:
    """Counters of QEMU's tap NICs. A tap is named …-N for NIC netN (services/networks.py tap_name)."""
    out = []
    for tap in qemu_taps(pid):
        stats = Path(f"/sys/class/net/{tap}/statistics")
        try:
            values = {k: int((stats / v).read_text()) for k, v in _TAP_COUNTERS.items()}
        except (OSError, ValueError):
            continue
        out.append(NicSample(name="net" + tap.rsplit("-", 1)[-1], tap=tap, **values))
    return tuple(out)


def escape_label(value: str) -> str:
    """A label value as the text format wants it: backslash, double quote and newline escaped."""
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _labels(labels: Mapping[str, str]) -> str:
    if not labels:
        return ""
    return "{" + ",".join(f'{k}="{escape_label(v)}"' for k, v in labels.items()) + "}"


def _num(v: float) -> str:
    return str(v) if isinstance(v, int) else repr(float(v))


class _Families:
    """Metric families in the order first declared; each is HELP, TYPE, then its samples."""

    def __init__(self) -> None:
        self._families: dict[str, tuple[str, str, list[str]]] = {}

    def declare(self, name: str, typ: str, help_: str) -> None:
        self._families[name] = (typ, help_, [])

    def add(self, name: str, value: float, **labels: str) -> None:
        self._families[name][2].append(f"{name}{_labels(labels)} {_num(value)}")

    def text(self) -> str:
        lines = []
        for name, (typ, help_, samples) in self._families.items():
            lines.append(f"# HELP {name} {help_}")
            lines.append(f"# TYPE {name} {typ}")
            lines.extend(samples)
        return "\n".join(lines) + "\n"


_BLOCK = (
    ("read_bytes_total", "read_bytes", 1, "Number of bytes read from a block device, in bytes."),
    ("read_requests_total", "read_requests", 1, "Number of read requests from a block device."),
    ("read_time_seconds_total", "read_time_ns", 1e-9, "Total time spent on reads from a block device, in seconds."),
    ("write_bytes_total", "write_bytes", 1, "Number of bytes written to a block device, in bytes."),
    ("write_requests_total", "write_requests", 1, "Number of write requests to a block device."),
    ("write_time_seconds_total", "write_time_ns", 1e-9, "Total time spent on writes to a block device, in seconds."),
    ("flush_requests_total", "flush_requests", 1, "Total flush requests to a block device."),
    ("flush_time_seconds_total", "flush_time_ns", 1e-9, "Total time spent on cache flushing, in seconds."),
)


def exposition(domains: Sequence[Domain], latest: Mapping[str, VmSample], rounds: RoundStats) -> str:
    """The Prometheus text (format 0.0.4) for these VMs: info gauges for each, counters for each active one
    that has a sample in `latest` (keyed by name)."""
    f = _Families()
    f.declare("libvirt_domain_info_meta", "gauge", "Domain metadata")
    f.declare("libvirt_domain_info_vstate", "gauge", _VSTATE_HELP)
    f.declare("libvirt_domain_info_maximum_memory_bytes", "gauge", "Maximum allowed memory of the domain, in bytes.")
    f.declare("libvirt_domain_info_memory_usage_bytes", "gauge", "Memory usage of the domain, in bytes.")
    f.declare("libvirt_domain_info_virtual_cpus", "gauge", "Number of virtual CPUs for the domain.")
    f.declare(
        "libvirt_domain_info_cpu_time_seconds_total", "counter", "Amount of CPU time used by the domain, in seconds."
    )
    f.declare(
        "libvirt_domain_vcpu_time_seconds_total", "counter", "Amount of CPU time used by the domain's VCPU, in seconds."
    )
    f.declare(
        "libvirt_domain_memory_stats_rss_bytes",
        "gauge",
        "Resident Set Size of the process running the domain, in bytes.",
    )
    for suffix, _, _, help_ in _BLOCK:
        f.declare(f"libvirt_domain_block_stats_{suffix}", "counter", help_)
    for suffix, _, help_ in _IFACE:
        f.declare(f"libvirt_domain_interface_stats_{suffix}", "counter", help_)
    f.declare(
        "vmkit_vm_cgroup_memory_bytes", "gauge", "Memory charged to the VM's cgroup (RSS and page cache), in bytes."
    )
    f.declare("vmkit_vms", "gauge", "Defined VMs by state.")
    f.declare("vmkit_stats_interval_seconds", "gauge", "Time between two sampling rounds, in seconds.")
    f.declare("vmkit_stats_rounds_total", "counter", "Sampling rounds done since the daemon started.")
    f.declare("vmkit_stats_round_duration_seconds", "gauge", "Wall-clock time of the last sampling round, in seconds.")
    f.declare("vmkit_stats_round_seconds_total", "counter", "Wall-clock time of all sampling rounds, in seconds.")
    f.declare(
        "vmkit_stats_round_cpu_seconds_total",
        "counter",
        "CPU time of the daemon's event loop during sampling rounds, in seconds.",
    )

    by_state = dict.fromkeys(VmState, 0)
    for d in domains:
        by_state[d.state] += 1
        dom = d.name
        f.add("libvirt_domain_info_meta", 1, domain=dom, uuid=d.uuid)
        f.add("libvirt_domain_info_vstate", LIBVIRT_STATE[d.state], domain=dom)
        f.add("libvirt_domain_info_maximum_memory_bytes", d.memory_mib * MIB, domain=dom)
        f.add("libvirt_domain_info_memory_usage_bytes", d.memory_mib * MIB, domain=dom)
        f.add("libvirt_domain_info_virtual_cpus", d.vcpus, domain=dom)
        s = latest.get(dom) if d.state.active else None
        if s is None:
            continue
        if s.cpu_time_ns is not None:
            f.add("libvirt_domain_info_cpu_time_seconds_total", s.cpu_time_ns / 1e9, domain=dom)
        for i, ns in enumerate(s.vcpu_time_ns):
            f.add("libvirt_domain_vcpu_time_seconds_total", ns / 1e9, domain=dom, vcpu=str(i))
        if s.rss_bytes is not None:
            f.add("libvirt_domain_memory_stats_rss_bytes", s.rss_bytes, domain=dom)
        if s.cgroup_memory_bytes is not None:
            f.add("vmkit_vm_cgroup_memory_bytes", s.cgroup_memory_bytes, domain=dom)
        for disk in s.disks or ():
            source = d.disk_paths.get(disk.name, "")
            for suffix, attr, scale, _ in _BLOCK:
                value = getattr(disk, attr)
                f.add(
                    f"libvirt_domain_block_stats_{suffix}",
                    value * scale if scale != 1 else value,
                    domain=dom,
                    source_file=source,
                    target_device=disk.name,
                )
        for nic in s.nics:
            for suffix, attr, _ in _IFACE:
                f.add(f"libvirt_domain_interface_stats_{suffix}", getattr(nic, attr), domain=dom,
                      target_device=nic.tap, virtual_interface=nic.name)  # fmt: skip
    for state, n in by_state.items():
        f.add("vmkit_vms", n, state=str(state))
    f.add("vmkit_stats_interval_seconds", rounds.interval_s)
    f.add("vmkit_stats_rounds_total", rounds.rounds)
    f.add("vmkit_stats_round_duration_seconds", rounds.last_duration_s)
    f.add("vmkit_stats_round_seconds_total", rounds.total_duration_s)
    f.add("vmkit_stats_round_cpu_seconds_total", rounds.total_cpu_s)
    return f.text()


# ---- the sampler -----------------------------------------------------------------------------------------------


@dataclass
class _Track:
    """Per VM: its history (for one QEMU identity: a VM deleted and made again under its name starts afresh) and
    which threads of its QEMU run which vCPU (found once per QEMU)."""

    uuid: str
    samples: deque[VmSample]
    pid: int | None = None
    vcpu_tids: list[int] = field(default_factory=list)


class StatsService:
    def __init__(
        self, vms: VmService, *, interval_s: float = DEFAULT_INTERVAL_S, history_s: float = DEFAULT_HISTORY_S
    ) -> None:
        self._vms = vms  # only its runtimes() is read
        self.interval_s = interval_s
        self._maxlen = max(1, round(history_s / interval_s))
        self._tracks: dict[str, _Track] = {}
        self._latest: dict[str, VmSample] = {}
        self._rounds = 0
        self._last_s = 0.0
        self._total_s = 0.0
        self._cpu_s = 0.0
        self._task: asyncio.Task[None] | None = None

    # ----- lifetime ------------------------------------------------------------------------------
    def start(self) -> None:
        """Start sampling every interval_s on the running loop (after VmService.load())."""
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            started = loop.time()
            try:
                await self.sample_once()
            except Exception:  # a bug here must not end sampling for good
                log.exception("stats sampling round failed")
            # Rounds start interval_s apart; one that overran is followed by the next after a short breath.
            await asyncio.sleep(max(self.interval_s - (loop.time() - started), self.interval_s / 10))

    # ----- queries -------------------------------------------------------------------------------
    def history(self, name: str) -> VmStatsHistory:
        """The VM's samples of the last history_s, oldest first; NotFound for an unknown VM."""
        vm = next((v for v in self._vms.runtimes() if v.spec.name == name), None)
        if vm is None:
            raise NotFound(f"no VM named {name!r}")
        track = self._tracks.get(name)
        samples = list(track.samples) if track is not None and track.uuid == vm.spec.uuid else []
        return VmStatsHistory(name=name, interval_s=self.interval_s, samples=samples)

    def metrics(self) -> str:
        """The Prometheus text for every defined VM, from the latest round (no sampling here)."""
        domains = [
            Domain(
                name=vm.spec.name,
                uuid=vm.spec.uuid,
                state=vm.state,
                vcpus=vm.spec.vcpus,
                memory_mib=vm.spec.memory_mib,
                disk_paths={d.name: d.path for d in vm.spec.disks},
            )
            for vm in self._vms.runtimes()
        ]
        return exposition(domains, self._latest, self.round_stats())

    def round_stats(self) -> RoundStats:
        return RoundStats(self.interval_s, self._rounds, self._last_s, self._total_s, self._cpu_s)

    # ----- sampling ------------------------------------------------------------------------------
    async def sample_once(self) -> None:
        """One round over every running VM. QMP queries go out first, the /proc and cgroup files are read
        while QEMU answers."""
        t0, cpu0 = time.perf_counter(), time.thread_time()
        runtimes = self._vms.runtimes()
        defined = {vm.spec.name for vm in runtimes}
        for gone in self._tracks.keys() - defined:
            del self._tracks[gone]
        running = [vm for vm in runtimes if vm.state.active and vm.proc is not None]
        queries = [
            asyncio.ensure_future(vm.monitor.query_blockstats(timeout_s=self.interval_s)) if vm.monitor else None
            for vm in running
        ]
        latest: dict[str, VmSample] = {}
        try:
            now = time.time()
            local = [self._sample_files(vm) for vm in running]
            for vm, query, (cpu_ns, vcpus, rss, cg_mem) in zip(running, queries, local, strict=True):
                disks = None
                if query is not None:
                    try:
                        disks = disk_samples(await query)
                    except Exception as e:  # noqa: BLE001 - a busy or dying QEMU: this sample has no disk figures
                        log.debug("VM %s: query-blockstats: %s", vm.spec.name, e)
                sample = VmSample(
                    time_s=now,
                    cpu_time_ns=cpu_ns,
                    vcpu_time_ns=vcpus,
                    rss_bytes=rss,
                    cgroup_memory_bytes=cg_mem,
                    disks=disks,
                    nics=self._nics(vm),
                )
                latest[vm.spec.name] = sample
                self._track(vm).samples.append(sample)
        finally:
            for q in queries:
                if q is not None and not q.done():
                    q.cancel()
        self._latest = latest
        self._last_s = time.perf_counter() - t0
        self._total_s += self._last_s
        # The loop thread's CPU time while the round ran: the round's own cost, plus whatever else the loop did
        # while it waited for QMP replies (little: a round takes milliseconds).
        self._cpu_s += time.thread_time() - cpu0
        self._rounds += 1

    @staticmethod
    def _nics(vm: VmRuntime) -> tuple[NicSample, ...]:
        if vm.proc is None or not any(n.kind == "network" for n in vm.spec.nics):
            return ()
        return nic_samples(vm.proc.pid)

    def _track(self, vm: VmRuntime) -> _Track:
        track = self._tracks.get(vm.spec.name)
        if track is None or track.uuid != vm.spec.uuid:
            track = self._tracks[vm.spec.name] = _Track(vm.spec.uuid, deque(maxlen=self._maxlen))
        return track

    def _sample_files(self, vm: VmRuntime) -> tuple[int | None, tuple[int, ...], int | None, int | None]:
        """(cpu_time_ns, vcpu_time_ns, rss_bytes, cgroup_memory_bytes) from the cgroup and /proc."""
        track = self._track(vm)
        assert vm.proc is not None
        pid = vm.proc.pid
        cpu_ns = cg_mem = rss = None
        if vm.cgroup is not None:
            st = vm.cgroup.stats()
            cpu_ns, cg_mem = st.cpu_time_ns, st.memory_bytes
        try:
            with open(f"/proc/{pid}/stat") as fh:
                _, ticks, rss_pages = parse_proc_stat(fh.read())
            rss = rss_pages * _PAGE_SIZE
            if cpu_ns is None:  # a QEMU outside any cgroup (started before isolation, or none usable)
                cpu_ns = ticks * 1_000_000_000 // _CLK_TCK
        except (OSError, ValueError, IndexError):
            return cpu_ns, (), None, cg_mem  # it is exiting; the next round will not see it
        return cpu_ns, self._vcpu_times(track, pid), rss, cg_mem

    def _vcpu_times(self, track: _Track, pid: int) -> tuple[int, ...]:
        """CPU time of each vCPU thread. The threads are found once per QEMU (they live as long as it does): a
        round reads one stat file per vCPU, not one per QEMU thread."""
        if track.pid != pid:
            track.pid, track.vcpu_tids = pid, _find_vcpu_threads(pid)
        times = []
        for tid in track.vcpu_tids:
            try:
                with open(f"/proc/{pid}/task/{tid}/stat") as fh:
                    times.append(parse_proc_stat(fh.read())[1] * 1_000_000_000 // _CLK_TCK)
            except (OSError, ValueError, IndexError):
                track.pid = None  # look again next round
                return ()
        return tuple(times)


def _find_vcpu_threads(pid: int) -> list[int]:
    """Thread ids of QEMU's vCPUs, ordered by vCPU number; [] if it names none (single-threaded TCG)."""
    found: dict[int, int] = {}
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return []
    for tid in tids:
        try:
            with open(f"/proc/{pid}/task/{tid}/comm") as fh:
                m = _VCPU_THREAD.fullmatch(fh.read().strip())
        except OSError:
            continue
        if m:
            found[int(m.group(1))] = int(tid)
    # Only a complete set 0..n-1 maps thread to vCPU number without gaps.
    return [found[i] for i in range(len(found))] if set(found) == set(range(len(found))) else []
