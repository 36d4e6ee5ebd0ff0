"""iscsi-ls output parsing and iSCSI name checks. The outputs are captured from libiscsi-bin 1.19's iscsi-ls
against Debian's tgt 1.0.85: LUN files of 64 MiB, 100000000 B (tgt: 99999744, whole 512 B blocks) and
3 GiB + 512 B in one target, 10 MiB in another."""

from __future__ import annotations

import pytest

from vmkit.storage.iscsi import IscsiTarget, Lun, _listed_whole, check_iqn, parse_capacity, parse_luns, targets_in

# iscsi-ls -s -i iqn.2026-11.org.vmkit:init iscsi://127.0.0.1 (two targets on one tgtd)
TWO_TARGETS = """\
Target:iqn.2026-11.org.vmkit.test:other Portal:127.0.0.1:3260,1
Lun:0    Type:STORAGE_ARRAY_CONTROLLER
Lun:1    Type:DIRECT_ACCESS (Size:9M)
Target:iqn.2026-11.org.vmkit.test:disks Portal:127.0.0.1:3260,1
Lun:0    Type:STORAGE_ARRAY_CONTROLLER
Lun:1    Type:DIRECT_ACCESS (Size:63M)
Lun:2    Type:DIRECT_ACCESS (Size:95M)
Lun:3    Type:DIRECT_ACCESS (Size:3G)
"""

# The same over IPv6: iscsi-ls -s … iscsi://[::1]
IPV6 = TWO_TARGETS.replace("127.0.0.1:3260", "[::1]:3260")

# Without -s: targets only.
NO_LUNS = """\
Target:iqn.2026-11.org.vmkit.test:other Portal:127.0.0.1:3260,1
Target:iqn.2026-11.org.vmkit.test:disks Portal:127.0.0.1:3260,1
"""

M = 1024**2


def test_disk_luns_of_the_named_target() -> None:
    # iscsi-ls prints READ CAPACITY(10)'s last block address times the block size, divided down and truncated:
    # 64 MiB shows as 63M, 3 GiB + 512 as 3G. These are the printed figures; luns() reads the exact ones.
    assert parse_luns(TWO_TARGETS, "iqn.2026-11.org.vmkit.test:disks") == [
        Lun(1, 63 * M),
        Lun(2, 95 * M),
        Lun(3, 3 * 1024**3),
    ]
    assert parse_luns(TWO_TARGETS, "iqn.2026-11.org.vmkit.test:other") == [Lun(1, 9 * M)]
    assert parse_luns(IPV6, "iqn.2026-11.org.vmkit.test:disks") == parse_luns(
        TWO_TARGETS, "iqn.2026-11.org.vmkit.test:disks"
    )


def test_without_a_name_the_first_target_and_no_controller_lun() -> None:
    assert parse_luns(TWO_TARGETS) == [Lun(1, 9 * M)]  # LUN 0 (STORAGE_ARRAY_CONTROLLER) never counts


def test_absent_target_or_no_lun_lines() -> None:
    assert parse_luns(TWO_TARGETS, "iqn.2026-11.org.vmkit.test:nosuch") == []
    assert parse_luns(NO_LUNS, "iqn.2026-11.org.vmkit.test:disks") == []
    assert parse_luns("") == []
    assert targets_in(NO_LUNS) == {"iqn.2026-11.org.vmkit.test:other", "iqn.2026-11.org.vmkit.test:disks"}


def test_a_target_on_several_portals_counts_once_and_other_types_are_skipped() -> None:
    # Made from the captured lines: iscsi-ls repeats a target per portal it reports; a CD-ROM LUN has no size;
    # a LUN under 1 KiB is printed with a blank unit (iscsi-ls's format "%lld%c" with ' ').
    text = (
        "Target:iqn.2026-11.org.vmkit.test:disks Portal:10.0.0.1:3260,1\n"
        "Lun:0    Type:STORAGE_ARRAY_CONTROLLER\n"
        "Lun:1    Type:DIRECT_ACCESS (Size:63M)\n"
        "Lun:2    Type:CDROM (No media loaded)\n"
        "Lun:3    Type:DIRECT_ACCESS (Size:512 )\n"
        "Target:iqn.2026-11.org.vmkit.test:disks Portal:[fd00::1]:3260,1\n"
        "Lun:0    Type:STORAGE_ARRAY_CONTROLLER\n"
        "Lun:1    Type:DIRECT_ACCESS (Size:63M)\n"
        "Lun:4    Type:DIRECT_ACCESS (Size:1G)\n"
    )
    assert parse_luns(text, "iqn.2026-11.org.vmkit.test:disks") == [Lun(1, 63 * M), Lun(3, 512)]


def test_readcapacity16_output() -> None:
    assert parse_capacity("3221225984\n") == 3 * 1024**3 + 512  # iscsi-readcapacity16 -s: exact
    with pytest.raises(ValueError):
        parse_capacity("failed to send readcapacity command\n")


@pytest.mark.parametrize(
    "name",
    [
        "iqn.2026-11.org.vmkit.test:disks",
        "iqn.2003-01.org.linux-iscsi.host.x8664:sn.0123456789ab",  # LIO's default form
        "iqn.1991-05.com.microsoft:win-host.example.com",
        "iqn.2000-01.com.synology:DS920.Target-1.abc_def",  # vendors put upper case and _ in the suffix
        "iqn.2026-11.org.example",  # no suffix
        "eui.02004567A425678D",
    ],
)
def test_check_iqn_accepts(name: str) -> None:
    assert check_iqn(name) == name


@pytest.mark.parametrize(
    "name",
    [
        "",
        "iqn.",
        "iqn.2026-13.org.example:x",  # month 13
        "iqn.26-11.org.example:x",
        "iqn.2026-11:x",  # no domain
        "iqn.2026-11.org..example:x",
        "iqn.2026-11.-org.example:x",
        "iqn.2026-11.org.example:",
        "iqn.2026-11.org.example:a b",
        "iqn.2026-11.org.example:a/b",
        "IQN.2026-11.org.example:x",
        "eui.02004567A425678",  # 15 digits
        "eui.02004567A425678DX",
        "naa.6001405a1b2c3d4e",  # not offered (brief: iqn and eui)
        "iqn.2026-11.org.example:" + "x" * 220,  # over 223 bytes
        "iqn.2026-11.org.example:x\n",
    ],
)
def test_check_iqn_refuses(name: str) -> None:
    with pytest.raises(ValueError, match="invalid iSCSI name"):
        check_iqn(name)


def test_target_urls() -> None:
    t = IscsiTarget("10.0.0.1", "iqn.2026-11.org.vmkit.test:disks")
    assert t.portal == "10.0.0.1:3260"
    assert t.url(2) == "iscsi://10.0.0.1:3260/iqn.2026-11.org.vmkit.test:disks/2"
    v6 = IscsiTarget("fd00::1", "iqn.2026-11.org.vmkit.test:disks", 3261)
    assert v6.portal == "[fd00::1]:3261"
    assert v6.url(1) == "iscsi://[fd00::1]:3261/iqn.2026-11.org.vmkit.test:disks/1"
    with pytest.raises(ValueError):
        IscsiTarget("10.0.0.1", "not-an-iqn")
    with pytest.raises(ValueError):
        IscsiTarget("10.0.0.1/x", "iqn.2026-11.org.vmkit.test:disks")


# iscsi-ls -s against a portal whose first-listed target wants CHAP: it stops there (exit status 10).
CHAP_FIRST = """\
Target:iqn.2026-11.org.vmkit.test:chap Portal:127.0.0.1:3260,1
list_luns: iscsi_connect failed. Failed to log in to target. Status: Authentication failure(513)
"""


def test_a_target_that_refuses_us_stops_the_listing() -> None:
    # luns() accepts a failed iscsi-ls only when the target it wants was listed whole before the failure.
    assert parse_luns(CHAP_FIRST, "iqn.2026-11.org.vmkit.test:disks") == []
    assert not _listed_whole(CHAP_FIRST, "iqn.2026-11.org.vmkit.test:disks")
    assert not _listed_whole(CHAP_FIRST, "iqn.2026-11.org.vmkit.test:chap")
    ours_first = (
        "Target:iqn.2026-11.org.vmkit.test:disks Portal:127.0.0.1:3260,1\n"
        "Lun:0    Type:STORAGE_ARRAY_CONTROLLER\n"
        "Lun:1    Type:DIRECT_ACCESS (Size:63M)\n" + CHAP_FIRST
    )
    assert _listed_whole(ours_first, "iqn.2026-11.org.vmkit.test:disks")
    assert parse_luns(ours_first, "iqn.2026-11.org.vmkit.test:disks") == [Lun(1, 63 * M)]
