"""The Debian image recipe's pure parts: its hash, the host mirror parsers, the guest files (golden), input checks.

Regenerate the golden file with: VMKIT_REGEN_GOLDEN=1 pytest tests/unit/test_debian_image.py
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from vmkit.errors import CommandFailed, InvalidInput, NotFound
from vmkit.images import debian
from vmkit.images.debian import GIB, MIB, Recipe, make_recipe
from vmkit.util import proc

GOLDEN = Path(__file__).resolve().parent.parent / "golden"


def recipe(**kw: object) -> Recipe:
    return make_recipe("debian-12", **kw)  # type: ignore[arg-type]


# ----- the recipe and its hash ----------------------------------------------------------------------------------
def test_recipe_defaults_and_canonical_packages() -> None:
    r = recipe(packages=["vim", "curl", "vim", "sudo"])
    assert (r.release, r.suite, r.size_bytes) == ("debian-12", "bookworm", 4 * GIB)
    assert r.packages == ("curl", "vim")  # sorted, once each, base packages (sudo) left out
    assert r.mirror == debian.DEFAULT_MIRROR
    assert r.to_dict()["packages"] == ["curl", "vim"]


def test_recipe_key_is_stable_and_follows_every_input() -> None:
    base = recipe()
    assert base.key() == recipe().key()
    assert len(base.key()) == 64 and int(base.key(), 16) >= 0
    assert recipe(packages=["curl", "vim"]).key() == recipe(packages=["vim", "curl", "sudo"]).key()
    others = {
        recipe(packages=["curl"]).key(),
        recipe(size_bytes=8 * GIB).key(),
        recipe(mirror="http://mirror.example/debian").key(),
        recipe(security_mirror="http://mirror.example/debian-security").key(),
    }
    assert base.key() not in others and len(others) == 4


def test_recipe_key_covers_the_guest_files(monkeypatch: pytest.MonkeyPatch) -> None:
    before = recipe().key()
    for name, value in (
        ("CMDLINE", debian.CMDLINE + " debug"),  # in the boot partition's syslinux.cfg
        ("INITRAMFS_MODULES", (*debian.INITRAMFS_MODULES, "virtio_scsi")),
        ("BASE_PACKAGES", (*debian.BASE_PACKAGES, "vim")),
        ("MASKED_UNITS", ()),
        ("HELD_PACKAGES", ()),
        ("BUILD_VERSION", debian.BUILD_VERSION + 1),
    ):
        with monkeypatch.context() as m:
            m.setattr(debian, name, value)
            assert recipe().key() != before, name
    assert recipe().key() == before


# ----- input checks ---------------------------------------------------------------------------------------------
def test_unknown_release_names_the_known_ones() -> None:
    with pytest.raises(NotFound, match="known ones are debian-12"):
        make_recipe("ubuntu-24.04")


@pytest.mark.parametrize(
    ("size", "message"),
    [
        (GIB - MIB, "too small"),
        (0, "too small"),
        (-1, "too small"),
        ((1 << 40) + MIB, "too large"),
        (10**18, "too large"),
        (4 * GIB + 1, "whole number of MiB"),
    ],
)
def test_bad_sizes(size: int, message: str) -> None:
    with pytest.raises(InvalidInput, match=message):
        recipe(size_bytes=size)


def test_size_limits_are_inclusive() -> None:
    assert recipe(size_bytes=GIB).size_bytes == GIB
    assert recipe(size_bytes=1 << 40).size_bytes == 1 << 40


@pytest.mark.parametrize(
    "name", ["Vim", "a", "-x", "+x", ".x", "vim;rm", "vim rm", "vim,curl", "../etc", "", "vim\n", "x" * 101, "é"]
)
def test_bad_package_names(name: str) -> None:
    with pytest.raises(InvalidInput, match="invalid package name"):
        recipe(packages=[name])


@pytest.mark.parametrize("name", ["vim", "g++", "libc6-dev", "python3.11", "0ad", "x2"])
def test_good_package_names(name: str) -> None:
    assert recipe(packages=[name]).packages == (name,)


def test_too_many_packages() -> None:
    with pytest.raises(InvalidInput, match="at most 100"):
        recipe(packages=[f"p{i}" for i in range(101)])


# ----- the host's mirror ----------------------------------------------------------------------------------------
DEB822 = """\
Types: deb deb-src
# http://snapshot.debian.org/archive/debian/20250520T000000Z
URIs: http://mirror.example.org/debian/
Suites: bookworm bookworm-updates
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb
URIs: http://security.example.org/debian-security
Suites: bookworm-security
Components: main

Types: deb
Enabled: no
URIs: http://disabled.example.org/debian
Suites: trixie
"""

ONE_LINE = """\
# deb http://commented.example.org/debian bookworm main
deb-src http://src.example.org/debian bookworm main
deb [arch=amd64 signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://one.example.org/debian bookworm main
deb http://one.example.org/debian-security bookworm-security main contrib
deb cdrom:[Debian GNU/Linux 12]/ trixie main
"""


def test_parse_deb822() -> None:
    assert debian.parse_mirror([DEB822], [], "bookworm") == "http://mirror.example.org/debian"
    assert debian.parse_mirror([DEB822], [], "bookworm-security") == "http://security.example.org/debian-security"
    assert debian.parse_mirror([DEB822], [], "trixie") is None  # only in a disabled stanza


def test_parse_one_line_format() -> None:
    assert debian.parse_mirror([], [ONE_LINE], "bookworm") == "http://one.example.org/debian"
    assert debian.parse_mirror([], [ONE_LINE], "bookworm-security") == "http://one.example.org/debian-security"
    assert debian.parse_mirror([], [ONE_LINE], "trixie") is None  # a cdrom: source is no mirror


def test_deb822_wins_and_fallbacks(tmp_path: Path) -> None:
    (tmp_path / "sources.list.d").mkdir()
    assert debian.host_mirrors("bookworm", tmp_path) == (debian.DEFAULT_MIRROR, debian.DEFAULT_SECURITY_MIRROR)
    (tmp_path / "sources.list").write_text(ONE_LINE)
    assert debian.host_mirrors("bookworm", tmp_path)[0] == "http://one.example.org/debian"
    (tmp_path / "sources.list.d" / "debian.sources").write_text(DEB822)
    assert debian.host_mirrors("bookworm", tmp_path) == (
        "http://mirror.example.org/debian",
        "http://security.example.org/debian-security",
    )


# ----- the files written into the guest -------------------------------------------------------------------------
def test_guest_files_golden() -> None:
    text = debian.render_guest_files(
        recipe(mirror="http://mirror.example.org/debian", security_mirror="http://security.example.org/debian-security")
    )
    golden = GOLDEN / "debian-12-files.txt"
    if os.environ.get("VMKIT_REGEN_GOLDEN"):
        golden.write_text(text)
    assert text == golden.read_text(), f"guest files changed; regenerate with VMKIT_REGEN_GOLDEN=1 and review {golden}"


def test_guest_files_hold_no_secrets_and_no_identity() -> None:
    files = debian.guest_files(recipe())
    assert files["etc/machine-id"] == (b"", 0o444)  # each VM makes its own at first boot
    assert not any("ssh_host_" in path for path in files)
    cloud = files["etc/cloud/cloud.cfg.d/90_vmkit.cfg"][0].decode()
    for line in ("locale: C.UTF-8", "manage_etc_hosts: true", "ssh_genkeytypes: [ ed25519 ]", "[ NoCloud,"):
        assert line in cloud
    assert "MODULES=list" in files["etc/initramfs-tools/conf.d/vmkit.conf"][0].decode()
    modules = files["etc/initramfs-tools/modules"][0].decode().split()
    for m in ("virtio_pci", "virtio_blk", "virtio_net", "ext4", "crc32c_generic", "isofs"):
        assert m in modules


def test_boot_config_matches_direct_kernel_boot() -> None:
    cfg = debian.boot_config()
    assert f"APPEND {debian.CMDLINE}\n" in cfg
    assert "LINUX /vmlinuz\n" in cfg and "INITRD /initrd.img\n" in cfg
    assert "console=ttyS0" in debian.CMDLINE and "root=LABEL=rootfs" in debian.CMDLINE


def test_partitions_fit_the_smallest_disk() -> None:
    assert debian.ROOT_START_SECTOR * debian.SECTOR_SIZE < debian.MIN_SIZE_BYTES // 8
    assert debian.ROOT_START_SECTOR % 2048 == 0  # 1 MiB aligned
    assert debian.MAX_SIZE_BYTES // debian.SECTOR_SIZE < 1 << 32  # MBR's 32-bit sector numbers


def test_namespace_wrapper_keeps_mounts_and_processes_inside() -> None:
    argv = debian._in_namespace(["debootstrap", Path("/x")], proc_at=Path("/r/proc"))
    assert argv[:8] == [
        "unshare", "--mount", "--propagation", "private", "--pid", "--fork", "--kill-child", "--mount-proc=/r/proc",
    ]  # fmt: skip
    assert argv[8:] == ["debootstrap", "/x"]


def test_streaming_with_stderr_merged_sees_both() -> None:
    # debootstrap reports its progress ("I: Retrieving …") on stderr.
    seen: list[str] = []
    res = proc.run_streaming(["sh", "-c", "echo I: one >&2; echo two; echo I: three >&2"], on_output=seen.append,
                             merge_stderr=True)  # fmt: skip
    assert seen == ["I: one", "two", "I: three"] and res.stderr == ""
    with pytest.raises(CommandFailed, match="sh failed: bad"):
        proc.run_streaming(["sh", "-c", "echo bad >&2; exit 3"], on_output=seen.append, merge_stderr=True)
