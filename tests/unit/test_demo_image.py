"""Fast tests of the demo-image builder's pure parts: no root, network, kernel package or QEMU."""

from __future__ import annotations

import io
import os
import shutil
import stat
import subprocess
from collections.abc import Sequence
from pathlib import Path

import pytest

from vmkit.images import demo
from vmkit.images.demo import (
    CpioEntry,
    DemoBuildError,
    cache_key,
    kernel_config_value,
    module_closure,
    module_name,
    parse_kernel_depends,
    parse_ldd,
    power_button_modules,
    tree_entries,
    write_newc,
)
from vmkit.util import proc

APT_CACHE_DEPENDS = """\
linux-image-amd64
  Depends: linux-image-6.1.0-56-amd64
"""

LDD_QEMU_GA = """\
\tlinux-vdso.so.1 (0x00007ffd5b1f2000)
\tlibudev.so.1 => /lib/x86_64-linux-gnu/libudev.so.1 (0x00007f8babd96000)
\tlibglib-2.0.so.0 => /lib/x86_64-linux-gnu/libglib-2.0.so.0 (0x00007f8babc4a000)
\tlibc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x00007f8bab980000)
\t/lib64/ld-linux-x86-64.so.2 (0x00007f8babecf000)
"""


# ----------------------------------------------------------------------------------- parsers


def test_parse_kernel_depends() -> None:
    assert parse_kernel_depends(APT_CACHE_DEPENDS) == "6.1.0-56-amd64"


def test_parse_kernel_depends_ignores_other_relations() -> None:
    text = (
        "linux-image-amd64\n"
        "  Recommends: linux-image-6.1.0-1-amd64\n"
        "  Depends: linux-image-6.12.9+bpo-amd64\n"
        "  Depends: linux-image-6.1.0-2-amd64\n"
    )
    assert parse_kernel_depends(text) == "6.12.9+bpo-amd64"


def test_parse_kernel_depends_without_kernel() -> None:
    with pytest.raises(DemoBuildError):
        parse_kernel_depends("linux-image-amd64\n  Depends: firmware-linux-free\n")


def test_parse_ldd_lists_libraries_and_loader() -> None:
    assert parse_ldd(LDD_QEMU_GA) == [
        Path("/lib/x86_64-linux-gnu/libudev.so.1"),
        Path("/lib/x86_64-linux-gnu/libglib-2.0.so.0"),
        Path("/lib/x86_64-linux-gnu/libc.so.6"),
        Path("/lib64/ld-linux-x86-64.so.2"),
    ]


def test_parse_ldd_missing_library() -> None:
    with pytest.raises(DemoBuildError, match="libnuma"):
        parse_ldd("\tlibnuma.so.1 => not found\n")


def test_kernel_config_value() -> None:
    config = "# CONFIG_FOO is not set\nCONFIG_ACPI_BUTTON=m\nCONFIG_INPUT_EVDEV=y\nCONFIG_HZ=250\n"
    assert kernel_config_value(config, "CONFIG_ACPI_BUTTON") == "m"
    assert kernel_config_value(config, "CONFIG_INPUT_EVDEV") == "y"
    assert kernel_config_value(config, "CONFIG_HZ") == "250"
    assert kernel_config_value(config, "CONFIG_FOO") is None
    assert kernel_config_value(config, "CONFIG_ACPI") is None  # a prefix of another option


@pytest.mark.parametrize(
    ("button", "evdev", "expected"),
    [("m", "m", ["button", "evdev"]), ("y", "m", ["evdev"]), ("y", "y", [])],
)
def test_power_button_modules(button: str, evdev: str, expected: list[str]) -> None:
    config = f"CONFIG_ACPI_BUTTON={button}\nCONFIG_INPUT_EVDEV={evdev}\n"
    assert power_button_modules(config) == expected


def test_power_button_modules_need_acpi_button() -> None:
    with pytest.raises(DemoBuildError, match="CONFIG_ACPI_BUTTON"):
        power_button_modules("# CONFIG_ACPI_BUTTON is not set\nCONFIG_INPUT_EVDEV=m\n")


def test_module_name() -> None:
    assert module_name("virtio_net.ko") == "virtio_net"
    assert module_name("virtio-net.ko.xz") == "virtio_net"
    assert module_name("evdev.ko.zst") == "evdev"
    assert module_name("modules.dep") is None


def test_module_closure_orders_dependencies_first() -> None:
    deps = {
        "virtio_net": ["net_failover", "virtio", "virtio_ring"],
        "net_failover": ["failover"],
        "failover": [],
        "virtio": [],
        "virtio_ring": [],
        "virtio_blk": ["virtio", "virtio_ring"],
    }
    calls: list[str] = []

    def deps_of(name: str) -> Sequence[str]:
        calls.append(name)
        return deps[name]

    order = module_closure(["virtio_blk", "virtio_net"], deps_of)
    assert sorted(order) == sorted(deps)
    for name, needs in deps.items():
        assert all(order.index(d) < order.index(name) for d in needs)
    assert sorted(calls) == sorted(deps)  # each module is asked about once


def test_module_closure_cycle() -> None:
    with pytest.raises(DemoBuildError, match="cycle"):
        module_closure(["a"], lambda n: {"a": ["b"], "b": ["a"]}[n])


# ----------------------------------------------------------------------------------- cache key

FILES = {"rcS": b"#!/bin/sh\necho hi\n", "inittab": b"::sysinit:/etc/init.d/rcS\n"}
DIGESTS = {"busybox": "aa" * 32, "qemu-ga": "bb" * 32}


def test_cache_key_is_stable() -> None:
    key = cache_key(FILES, DIGESTS)
    assert key == cache_key(dict(reversed(FILES.items())), dict(reversed(DIGESTS.items())))
    assert len(key) == 64 and int(key, 16) >= 0


@pytest.mark.parametrize(
    ("files", "digests"),
    [
        ({**FILES, "rcS": b"#!/bin/sh\necho bye\n"}, DIGESTS),
        ({**FILES, "extra": b""}, DIGESTS),
        (FILES, {**DIGESTS, "qemu-ga": "cc" * 32}),
        # Moving bytes between fields must not collide.
        ({"rcS": FILES["rcS"] + FILES["inittab"], "inittab": b""}, DIGESTS),
    ],
)
def test_cache_key_changes_with_inputs(files: dict[str, bytes], digests: dict[str, str]) -> None:
    assert cache_key(files, digests) != cache_key(FILES, DIGESTS)


# ----------------------------------------------------------------------------------- cpio


def _parse_newc(blob: bytes) -> list[tuple[str, int, bytes, tuple[int, int]]]:
    """Minimal newc reader: (name, mode, data, rdev) per member, trailer excluded."""
    out: list[tuple[str, int, bytes, tuple[int, int]]] = []
    pos = 0
    while True:
        assert pos % 4 == 0
        assert blob[pos : pos + 6] == b"070701"
        f = [int(blob[pos + 6 + 8 * i : pos + 14 + 8 * i], 16) for i in range(13)]
        namesize, filesize = f[11], f[6]
        assert (f[2], f[3], f[5]) == (0, 0, 0)  # uid, gid, mtime
        name_start = pos + 110
        name = blob[name_start : name_start + namesize - 1].decode()
        assert blob[name_start + namesize - 1] == 0
        data_start = (name_start + namesize + 3) & ~3
        data = blob[data_start : data_start + filesize]
        pos = (data_start + filesize + 3) & ~3
        if name == "TRAILER!!!":
            assert pos == len(blob)
            return out
        out.append((name, f[1], data, (f[9], f[10])))


def _sample_tree(tmp_path: Path) -> Path:
    root = tmp_path / "root"
    (root / "etc/init.d").mkdir(parents=True)
    (root / "bin").mkdir()
    (root / "bin/busybox").write_bytes(b"\x7fELF-ish" * 3)
    os.chmod(root / "bin/busybox", 0o755)
    (root / "etc/init.d/rcS").write_text("#!/bin/sh\n")
    os.chmod(root / "etc/init.d/rcS", 0o700)
    (root / "bin/sh").symlink_to("/bin/busybox")
    (root / "var").mkdir()
    (root / "var/run").symlink_to("/run")
    return root


def test_tree_entries_parents_first(tmp_path: Path) -> None:
    entries = list(tree_entries(_sample_tree(tmp_path)))
    names = [e.name for e in entries]
    for i, name in enumerate(names):
        parent = name.rpartition("/")[0]
        if parent:
            assert parent in names[:i], f"{name} listed before {parent}"
    by_name = {e.name: e for e in entries}
    assert stat.S_ISLNK(by_name["var/run"].mode) and by_name["var/run"].data == b"/run"
    assert stat.S_ISDIR(by_name["etc/init.d"].mode)
    assert stat.S_IMODE(by_name["etc/init.d/rcS"].mode) == 0o700
    assert names == [e.name for e in tree_entries(tmp_path / "root")]  # stable order


def test_write_newc_round_trip(tmp_path: Path) -> None:
    root = _sample_tree(tmp_path)
    buf = io.BytesIO()
    write_newc([*tree_entries(root), CpioEntry("dev", stat.S_IFDIR | 0o755), *demo._DEVICE_NODES], buf)
    members = {name: (mode, data, rdev) for name, mode, data, rdev in _parse_newc(buf.getvalue())}
    assert members["bin/busybox"] == (stat.S_IFREG | 0o755, b"\x7fELF-ish" * 3, (0, 0))
    assert members["bin/sh"][1] == b"/bin/busybox"
    assert stat.S_ISCHR(members["dev/console"][0]) and members["dev/console"][2] == (5, 1)
    assert members["dev/null"][2] == (1, 3)


@pytest.mark.skipif(shutil.which("cpio") is None, reason="needs GNU cpio")
def test_write_newc_readable_by_cpio(tmp_path: Path) -> None:
    buf = io.BytesIO()
    write_newc(tree_entries(_sample_tree(tmp_path)), buf)
    listing = subprocess.run(
        ["cpio", "-it", "--quiet"], input=buf.getvalue(), capture_output=True, check=True
    ).stdout.decode()
    assert listing.split() == [e.name for e in tree_entries(tmp_path / "root")]


# ----------------------------------------------------------------------------------- guest files


def test_guest_files_are_packaged() -> None:
    files = demo._demo_files()
    assert set(files) == set(demo.GUEST_FILES)
    for name, (_, mode) in demo.GUEST_FILES.items():
        if mode & 0o111:
            assert files[name].startswith(b"#!/bin/sh\n"), name


@pytest.mark.skipif(not Path("/bin/busybox").exists(), reason="needs busybox for sh -n")
@pytest.mark.parametrize("name", [n for n, (_, mode) in demo.GUEST_FILES.items() if mode & 0o111])
def test_guest_scripts_parse(name: str) -> None:
    script = demo._demo_files()[name].decode()
    subprocess.run(["/bin/busybox", "sh", "-n"], input=script, text=True, check=True)


def test_rcs_prints_ready_line() -> None:
    rcs = demo._demo_files()["rcS"].decode()
    assert f"echo {demo.READY_LINE} >/dev/ttyS0" in rcs
    assert f"/dev/virtio-ports/{demo.QGA_PORT_NAME}" in rcs


# ----------------------------------------------------------------------------------- caching


def _no_subprocess(*args: object, **kwargs: object) -> proc.Result:
    raise AssertionError(f"unexpected subprocess: {args}")


@pytest.fixture
def fake_host(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Stand-ins for the host binaries and apt lists; returns the cache dir."""
    (tmp_path / "busybox").write_bytes(b"busybox")
    (tmp_path / "qemu-ga").write_bytes(b"qemu-ga")
    (tmp_path / "lists").mkdir()
    monkeypatch.setattr(demo, "BUSYBOX", tmp_path / "busybox")
    monkeypatch.setattr(demo, "QEMU_GA", tmp_path / "qemu-ga")
    monkeypatch.setattr(demo, "APT_LISTS", tmp_path / "lists")
    return tmp_path / "cache"


def test_kernel_version_is_memoised_until_apt_lists_change(fake_host: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[str, ...]] = []

    def fake_run(argv: Sequence[object], **kwargs: object) -> proc.Result:
        calls.append(tuple(map(str, argv)))
        return proc.Result(tuple(map(str, argv)), 0, APT_CACHE_DEPENDS, "", 0.0)

    monkeypatch.setattr(proc, "run", fake_run)
    fake_host.mkdir()
    assert demo.resolve_kernel_version(fake_host) == "6.1.0-56-amd64"
    assert demo.resolve_kernel_version(fake_host) == "6.1.0-56-amd64"
    assert calls == [("apt-cache", "depends", "linux-image-amd64")]

    lists = demo.APT_LISTS
    st = lists.stat()
    os.utime(lists, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))  # as after apt-get update
    demo.resolve_kernel_version(fake_host)
    assert len(calls) == 2


def test_cached_image_is_returned_without_building(fake_host: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(demo, "resolve_kernel_version", lambda cache_dir: "6.1.0-9-amd64")
    monkeypatch.setattr(proc, "run", _no_subprocess)
    key = cache_key(
        demo._demo_files(), {"busybox": demo._sha256_file(demo.BUSYBOX), "qemu-ga": demo._sha256_file(demo.QEMU_GA)}
    )
    final = fake_host / f"demo-6.1.0-9-amd64-{key[:16]}"
    final.mkdir(parents=True)
    for name in ("vmlinuz", "initrd.gz", "disk.qcow2"):
        (final / name).write_bytes(b"x")

    messages: list[tuple[float, str]] = []
    image = demo.build_demo(fake_host, progress=lambda f, m: messages.append((f, m)))
    assert image.kernel == final / "vmlinuz"
    assert image.initrd == final / "initrd.gz"
    assert image.disk == final / "disk.qcow2"
    assert image.kernel_version == "6.1.0-9-amd64"
    assert image.cmdline == demo.CMDLINE
    assert messages and messages[-1][0] == 1.0


def test_failed_build_leaves_nothing_that_looks_finished(fake_host: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(demo, "resolve_kernel_version", lambda cache_dir: "6.1.0-9-amd64")

    def crash(*args: object) -> Path:
        raise DemoBuildError("network down")

    monkeypatch.setattr(demo, "_fetch_kernel_deb", crash)
    fake_host.mkdir()
    (fake_host / ".demo-build-stale").mkdir()  # left by an earlier crash
    with pytest.raises(DemoBuildError, match="network down"):
        demo.build_demo(fake_host)
    assert not list(fake_host.glob("demo-*"))
    assert not list(fake_host.glob(".demo-build-*"))
