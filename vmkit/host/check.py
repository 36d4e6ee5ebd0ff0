"""Host capability check, in the spirit of virt-host-validate.

KVM counts as usable only when the CPU advertises vmx/svm *and* a probe VM runs: some hosts expose a
/dev/kvm that opens but cannot run ordinary guests (e.g. a paravirtual KVM), and trusting the device node
alone gives guests that abort or crawl. This module imports nothing heavy: the CLI runs it in-process.
"""

from __future__ import annotations

import os
import re
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from vmkit.errors import CommandFailed, VmkitError
from vmkit.util.proc import run

QEMU_CANDIDATES = ("qemu-system-x86_64", "/usr/libexec/qemu-kvm")


@dataclass
class Check:
    name: str
    ok: bool
    detail: str


@dataclass
class HostReport:
    qemu_path: str | None
    qemu_version: str | None
    accelerators: dict[str, dict[str, Any]]
    accelerator: str | None
    checks: list[Check] = field(default_factory=list)
    # Whether each VM's QEMU can run isolated: own identity, own cgroup, seccomp; and what is missing.
    isolation: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def find_qemu() -> str | None:
    for cand in QEMU_CANDIDATES:
        path = shutil.which(cand)
        if path:
            return path
    return None


def cpu_virt_flags(cpuinfo: str) -> set[str]:
    """The hardware-virtualization flags (vmx, svm) listed in /proc/cpuinfo text."""
    found: set[str] = set()
    for line in cpuinfo.splitlines():
        if line.startswith("flags"):
            found |= {f for f in line.split(":", 1)[1].split() if f in ("vmx", "svm")}
    return found


def _unprivileged(extra_gids: tuple[int, ...] = ()) -> list[str]:
    """Prefix that runs a QEMU query as `nobody`: vmkit runs no QEMU as root, not even to ask its version."""
    from vmkit.host import identity

    return identity.launcher(identity.Identity(65534, 65534), extra_gids=extra_gids)


def _probe_kvm(qemu: str) -> tuple[bool, str]:
    """Start a throwaway VM under KVM with the host CPU model and run it briefly.

    Like every QEMU vmkit runs, not as root: as `nobody`, with /dev/kvm's group, as a VM's QEMU would get."""
    from vmkit.host import identity

    kvm = identity.kvm_gid()
    launcher = _unprivileged(extra_gids=(kvm,) if kvm is not None else ())
    argv = [*launcher, qemu, "-nodefaults", "-no-user-config", "-display", "none", "-machine", "q35,accel=kvm",
            "-cpu", "host", "-m", "32", "-qmp", "stdio", "-S"]  # fmt: skip
    script = '{"execute":"qmp_capabilities"}\n{"execute":"cont"}\n{"execute":"query-status"}\n{"execute":"quit"}\n'
    try:
        res = run(argv, check=False, input_text=script, timeout_s=20)
    except Exception as e:  # noqa: BLE001 - any failure means "not usable", with the reason shown
        return False, f"probe failed: {e}"
    if res.returncode != 0 or '"running"' not in res.stdout:
        err = (res.stderr.strip().splitlines() or ["probe VM did not run"])[-1]
        return False, f"probe VM failed: {err}"
    return True, "probe VM ran"


def check_kvm(qemu: str | None, cpuinfo: str) -> dict[str, Any]:
    present = os.path.exists("/dev/kvm")
    info: dict[str, Any] = {"present": present, "usable": False}
    if not present:
        info["detail"] = "/dev/kvm does not exist (kvm module not loaded or no hardware support)"
        return info
    flags = cpu_virt_flags(cpuinfo)
    if not flags:
        info["detail"] = (
            "/dev/kvm is present but the CPU advertises neither vmx nor svm (paravirtual or nested KVM "
            "without hardware virtualization): ordinary guests cannot run on it"
        )
        return info
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        info["detail"] = "/dev/kvm is not accessible by this user"
        return info
    if qemu is None:
        info["detail"] = "QEMU not found, cannot probe"
        return info
    if not os.stat("/dev/kvm").st_mode & 0o060:
        info["detail"] = (
            "/dev/kvm is root-only: QEMU runs unprivileged and needs it group-accessible "
            "(Debian's udev rule makes it root:kvm 0660)"
        )
        return info
    ok, detail = _probe_kvm(qemu)
    info.update(usable=ok, detail=f"CPU flags {','.join(sorted(flags))}; {detail}")
    return info


def check_tcg(qemu: str | None) -> dict[str, Any]:
    if qemu is None:
        return {"present": False, "usable": False, "detail": "QEMU not found"}
    res = run([*_unprivileged(), qemu, "-accel", "help"], check=False, timeout_s=20)
    ok = res.ok and re.search(r"^tcg$", res.stdout, re.M) is not None
    return {"present": ok, "usable": ok, "detail": "software emulation (slow)" if ok else "not built in"}


def _cgroups() -> Check:
    from vmkit.host.cgroups import Cgroups

    cg = Cgroups.detect()
    return Check("cgroups", cg.mode != "none", f"one cgroup per VM: {cg.describe()}")


def _identity(id_range: str | None) -> Check:
    """Can QEMU be started as a VM's own uid: setpriv present, and the id range free on this host."""
    from vmkit.host import identity

    if shutil.which(identity.SETPRIV) is None:
        return Check("identity", False, "setpriv (util-linux) not found: QEMU cannot drop root")
    try:
        r = identity.IdRange.parse(id_range) if id_range else identity.DEFAULT_RANGE
    except VmkitError as e:
        return Check("identity", False, e.message)
    clash = identity.host_conflicts(r)
    if clash:
        return Check("identity", False, f"VM id range {r} overlaps {', '.join(clash[:3])}")
    return Check("identity", True, f"one uid/gid per VM from {r}; no capabilities, no_new_privs")


def _isolation(checks: list[Check]) -> dict[str, Any]:
    by_name = {c.name: c for c in checks}
    parts = ("identity", "cgroups", "seccomp")
    missing = [f"{n}: {by_name[n].detail}" for n in parts if not by_name[n].ok]
    return {"in_force": not missing, **{n: by_name[n].ok for n in parts}, "missing": missing}


def _seccomp() -> Check:
    try:
        status = Path("/proc/self/status").read_text()
    except OSError:
        return Check("seccomp", False, "cannot read /proc/self/status")
    ok = "Seccomp:" in status
    return Check("seccomp", ok, "kernel supports seccomp (QEMU -sandbox)" if ok else "kernel lacks seccomp")


def _nftables() -> Check:
    nft = shutil.which("nft")
    if not nft:
        return Check("nftables", False, "nft not installed (needed for NAT networks)")
    res = run([nft, "--version"], check=False, timeout_s=10)
    return Check("nftables", res.ok, res.stdout.strip() or res.stderr.strip())


def _kernel_module(name: str, sysfs: str, what: str) -> Check:
    ok = Path(sysfs).exists() or Path(f"/sys/module/{name}").exists()
    if not ok:
        # Not loaded yet; a dry-run modprobe tells whether it could be.
        try:
            ok = run(["modprobe", "-n", name], check=False, timeout_s=10).ok
        except CommandFailed:
            ok = False
    return Check(name, ok, f"{what} {'available' if ok else 'missing'}")


def host_check(id_range: str | None = None) -> HostReport:
    """id_range: the daemon's VM id range (default: env VMKIT_ID_RANGE, else vmkit's default)."""
    id_range = id_range or os.environ.get("VMKIT_ID_RANGE")
    qemu = find_qemu()
    version = None
    if qemu:
        res = run([*_unprivileged(), qemu, "--version"], check=False, timeout_s=20)
        m = re.search(r"version (\S+)", res.stdout)
        version = m.group(1) if m else None
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text()
    except OSError:
        cpuinfo = ""
    accels = {"kvm": check_kvm(qemu, cpuinfo), "tcg": check_tcg(qemu)}
    chosen = "kvm" if accels["kvm"]["usable"] else "tcg" if accels["tcg"]["usable"] else None
    checks = [
        Check("qemu", qemu is not None, f"{qemu} {version}" if qemu else "qemu-system-x86_64 not found"),
        Check("tun", os.path.exists("/dev/net/tun"), "/dev/net/tun (tap NICs)"),
        _kernel_module("bridge", "/sys/class/net/bridge", "Linux bridge"),
        _nftables(),
        _identity(id_range),
        _cgroups(),
        _seccomp(),
        Check("vhost-net", os.path.exists("/dev/vhost-net"), "/dev/vhost-net (faster virtio-net)"),
    ]
    return HostReport(qemu, version, accels, chosen, checks, _isolation(checks))
