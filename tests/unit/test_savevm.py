"""The save file's header, the check that a saved state fits the VM now, and the QMP sequences of a save and a
restore against a scripted monitor (the fake QEMU runs them for real: tests/integration/test_save_fake.py)."""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from vmkit.model.vm import CdromSpec, DiskSpec, NicSpec, VmSpec
from vmkit.qemu import savevm
from vmkit.qemu.monitor import EventWaiter
from vmkit.services.vmsave import machine_changes
from vmkit.storage import files, savefile
from vmkit.storage.savefile import BadSaveFile, SaveHeader

SPEC = VmSpec(
    name="web",
    uuid="00000000-0000-4000-8000-000000000001",
    memory_mib=256,
    vcpus=1,
    kernel="/k",
    disks=[DiskSpec(name="disk0", path="/p/web-disk0.qcow2", format="qcow2", volume="default/web-disk0.qcow2")],
    cdroms=[CdromSpec(name="cd0")],
    nics=[NicSpec(name="net0", mac="52:54:00:00:00:01")],
)


def header(**kw: Any) -> SaveHeader:
    base: dict[str, Any] = {"vm": "web", "uuid": SPEC.uuid, "state": "running", "managed": False, "saved_at": 1.5,
                            "spec": SPEC.model_dump(mode="json")}  # fmt: skip
    return SaveHeader(**(base | kw))


def test_header_round_trip_and_alignment(tmp_path: Path) -> None:
    data = savefile.encode(header(managed=True))
    assert data.startswith(savefile.MAGIC) and len(data) % savefile.HEADER_ALIGN == 0
    h = savefile.decode(data)
    assert (h.vm, h.state, h.managed, h.stream_offset) == ("web", "running", True, len(data))
    assert VmSpec.model_validate(h.spec) == SPEC
    f = tmp_path / "web.save"
    f.write_bytes(data + b"STREAM")
    assert savefile.read_header_at(f) == h
    assert files.detect_format(f) == "save"  # a pool refresh adopts it as what it is
    f.write_bytes(data)  # a header and nothing after it holds no state
    with pytest.raises(BadSaveFile, match="no VM state"):
        savefile.read_header_at(f)


@pytest.mark.parametrize(
    "data",
    [b"", b"QFI\xfb" + bytes(100), savefile.MAGIC, savefile.MAGIC + b"\xff\xff\xff\xff" + bytes(8192),
     savefile.MAGIC + b"\0\0\0\x05{bad}" + bytes(8192), savefile.MAGIC + b"\0\0\0\x02{}" + bytes(8192)],
)  # fmt: skip
def test_a_damaged_header_is_refused(tmp_path: Path, data: bytes) -> None:
    f = tmp_path / "x"
    f.write_bytes(data)
    with pytest.raises(BadSaveFile):
        savefile.read_header_at(f)


def test_machine_changes() -> None:
    def below(key: str) -> set[str]:
        return {"default/web-disk0.qcow2"} if key == "default/ov.qcow2" else set()

    assert machine_changes(SPEC, SPEC, below) == []
    # Limits are not part of the machine; a disk on an overlay of the saved image reads the same.
    ov = SPEC.disks[0].model_copy(update={"volume": "default/ov.qcow2", "path": "/p/ov.qcow2"})
    same = SPEC.model_copy(update={"cpu_weight": 5, "disks": [ov]})
    assert machine_changes(SPEC, same, below) == []
    other = SPEC.disks[0].model_copy(update={"volume": "default/other.qcow2"})
    extra = DiskSpec(name="disk1", path="/p/x", format="raw", volume="default/x")
    changed = SPEC.model_copy(
        update={"memory_mib": 512, "disks": [other, extra], "cdroms": [CdromSpec(name="cd0", path="/i.iso")],
                "nics": [SPEC.nics[0].model_copy(update={"mac": "52:54:00:00:00:02"})]}
    )  # fmt: skip
    assert machine_changes(SPEC, changed, below) == [
        "memory (MiB) 256 → 512",
        "disk disk1 added",
        "disk disk0 is now default/other.qcow2 (was default/web-disk0.qcow2)",
        "the medium in cd0 changed",
        "NIC net0 is now virtio 52:54:00:00:00:02 (was virtio 52:54:00:00:00:01)",
    ]


class ScriptedMonitor:
    """Records commands; answers migrations as QEMU does (events after the reply), or as told."""

    def __init__(self, *, end: str = "completed", die: bool = False) -> None:
        self.sent: list[tuple[str, dict[str, Any] | None]] = []
        self.fds: list[tuple[int, str]] = []
        self.end, self.die = end, die
        self.migration = "none"
        self.waiters: list[EventWaiter] = []

    async def execute(self, cmd: str, args: dict[str, Any] | None = None, *, timeout_s: float = 10.0) -> Any:
        self.sent.append((cmd, args))
        if cmd == "query-migrate":
            if self.die and self.migration == "failed":
                raise ConnectionResetError("QEMU exited")
            return {"status": self.migration, **({"error-desc": "boom"} if self.migration == "failed" else {})}
        if cmd in ("migrate", "migrate-incoming"):
            self.migration = "active"
            asyncio.get_running_loop().call_later(0.01, self._finish)
        return {}

    def _finish(self) -> None:
        self.migration = self.end
        for w in self.waiters:
            if w.name == "MIGRATION" and w.match is not None and w.match({"status": self.end}):
                w.future.set_result({"status": self.end})

    async def getfd(self, fd: int, fdname: str) -> None:
        self.fds.append((fd, fdname))

    async def closefd(self, fdname: str) -> None:
        self.sent.append(("closefd", {"fdname": fdname}))

    @contextlib.contextmanager
    def expect_event(self, name: str, match: Any = None) -> Iterator[EventWaiter]:
        w = EventWaiter(name, match, asyncio.get_running_loop().create_future())
        self.waiters.append(w)
        try:
            yield w
        finally:
            self.waiters.remove(w)


def test_save_sequence() -> None:
    mon = ScriptedMonitor()
    info = asyncio.run(savevm.save_state(mon, 7, timeout_s=5))  # type: ignore[arg-type]
    assert info["status"] == "completed"
    cmds = [c for c, _ in mon.sent]
    assert cmds[:3] == ["migrate-set-capabilities", "migrate-set-parameters", "migrate"]
    assert mon.sent[1][1] == {"max-bandwidth": savevm.MAX_BANDWIDTH}
    assert mon.fds == [(7, savevm.SAVE_FD)] and mon.sent[2][1] == {"uri": f"fd:{savevm.SAVE_FD}"}


def test_load_sequence_and_failures() -> None:
    mon = ScriptedMonitor()
    asyncio.run(savevm.load_state(mon, 9, timeout_s=5))  # type: ignore[arg-type]
    assert [c for c, _ in mon.sent][:2] == ["migrate-set-capabilities", "migrate-incoming"]
    assert mon.fds == [(9, savevm.LOAD_FD)]
    # QEMU ends itself when an incoming migration fails: the event is enough to say so.
    with pytest.raises(savevm.MigrationFailed, match="failed"):
        asyncio.run(savevm.load_state(ScriptedMonitor(end="failed", die=True), 9, timeout_s=5))  # type: ignore[arg-type]
    with pytest.raises(savevm.MigrationFailed, match="boom"):
        asyncio.run(savevm.save_state(ScriptedMonitor(end="failed"), 9, timeout_s=5))  # type: ignore[arg-type]
    with pytest.raises(TimeoutError):
        asyncio.run(savevm.save_state(ScriptedMonitor(end="active"), 9, timeout_s=0.2))  # type: ignore[arg-type]


def test_timeouts_grow_with_memory() -> None:
    assert savevm.timeout_for(256) < savevm.timeout_for(65536)


def test_no_descriptor_is_leaked_by_a_header_read(tmp_path: Path) -> None:
    f = tmp_path / "web.save"
    f.write_bytes(savefile.encode(header()) + b"S")
    before = len(os.listdir("/proc/self/fd"))
    for _ in range(20):
        savefile.read_header_at(f)
    assert len(os.listdir("/proc/self/fd")) == before
