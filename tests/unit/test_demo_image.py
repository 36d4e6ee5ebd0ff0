"""Fast tests of the demo-image builder's pure parts: no root, network, kernel package or QEMU."""

from __future__ import annotations

import gzip
import io
import lzma
import os
import re
import shutil
import stat
import struct
import subprocess
from collections.abc import Sequence
from pathlib import Path

import pytest

from vmkit.images import demo
from vmkit.images.demo import (
    PT_LOAD,
    PT_NOTE,
    VMLINUX,
    VMLINUZ,
    XEN_ELFNOTE_PHYS32_ENTRY,
    XZ_MAGIC,
    CpioEntry,
    DemoBuildError,
    MbrPartition,
    cache_key,
    chs_address,
    elf64_program_headers,
    elf_notes,
    extract_vmlinux,
    fat_modules,
    kernel_config_value,
    mbr_sector,
    module_closure,
    module_name,
    parse_kernel_depends,
    parse_ldd,
    power_button_modules,
    pvh_entry,
    syslinux_config,
    tree_entries,
    trim_elf,
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


def test_fat_modules_follow_the_default_code_page_and_charset() -> None:
    debian = (
        'CONFIG_VFAT_FS=m\nCONFIG_FAT_DEFAULT_CODEPAGE=437\nCONFIG_FAT_DEFAULT_IOCHARSET="ascii"\n'
        "CONFIG_NLS_CODEPAGE_437=m\nCONFIG_NLS_ASCII=m\nCONFIG_NLS_UTF8=m\n"
    )
    assert fat_modules(debian) == ["vfat", "nls_cp437", "nls_ascii"]
    other = (
        'CONFIG_VFAT_FS=y\nCONFIG_FAT_DEFAULT_CODEPAGE=850\nCONFIG_FAT_DEFAULT_IOCHARSET="iso8859-15"\n'
        "CONFIG_NLS_CODEPAGE_850=y\nCONFIG_NLS_ISO8859_15=m\n"
    )
    assert fat_modules(other) == ["nls_iso8859_15"]


def test_fat_modules_need_vfat_and_its_nls_tables() -> None:
    with pytest.raises(DemoBuildError, match="CONFIG_VFAT_FS"):
        fat_modules("# CONFIG_VFAT_FS is not set\nCONFIG_NLS_CODEPAGE_437=y\nCONFIG_NLS_ISO8859_1=y\n")
    with pytest.raises(DemoBuildError, match="CONFIG_NLS_UTF8"):
        fat_modules('CONFIG_VFAT_FS=m\nCONFIG_FAT_DEFAULT_IOCHARSET="utf8"\nCONFIG_NLS_CODEPAGE_437=m\n')


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


def test_cache_key_changes_with_recipe_version(monkeypatch: pytest.MonkeyPatch) -> None:
    key = cache_key(FILES, DIGESTS)
    monkeypatch.setattr(demo, "RECIPE_VERSION", demo.RECIPE_VERSION + 1)
    assert cache_key(FILES, DIGESTS) != key


# ----------------------------------------------------------------------------------- kernel (ELF, PVH)

PVH_ENTRY = 0x1000850


def _note(name: bytes, note_type: int, desc: bytes, align: int = 4) -> bytes:
    def pad(b: bytes) -> bytes:
        return b + b"\0" * (-len(b) % align)

    name += b"\0"
    return struct.pack("<III", len(name), len(desc), note_type) + pad(name) + pad(desc)


PVH_NOTES = (
    _note(b"Xen", 6, b"linux\0")
    + _note(b"Xen", XEN_ELFNOTE_PHYS32_ENTRY, PVH_ENTRY.to_bytes(8, "little"))
    + _note(b"GNU", 3, b"\x12" * 20)
)


def _elf(
    segments: Sequence[tuple[int, bytes, int]],
    notes: bytes = PVH_NOTES,
    *,
    tail: bytes = b"",
    note_align: int = 4,
    elf_class: int = 2,
) -> bytes:
    """A little-endian ELF64 like an x86 vmlinux: PT_LOAD per (paddr, file data, memsz), then a PT_NOTE
    (its data inside the first segment's, as in the kernel), a section header table and tail (relocs)."""
    phnum = len(segments) + 1
    offsets = []
    pos = 0x1000
    for _, data, _ in segments:
        offsets.append(pos)
        pos += -(-len(data) // 0x1000) * 0x1000 or 0x1000
    shoff = pos
    sections = b"\0" * 64 * 3  # the contents do not matter to the loader
    header = struct.pack(
        "<16sHHIQQQIHHHHHH",
        b"\x7fELF" + bytes([elf_class, 1, 1]) + b"\0" * 9,
        2, 62, 1, 0x1000000, 64, shoff, 0, 64, 56, phnum, 64, 3, 2,
    )  # fmt: skip
    phdrs = b""
    for (paddr, data, memsz), off in zip(segments, offsets, strict=True):
        phdrs += struct.pack("<IIQQQQQQ", PT_LOAD, 5, off, paddr | 0xFFFFFFFF80000000, paddr, len(data), memsz, 0x1000)
    note_off = offsets[0] + 16
    phdrs += struct.pack("<IIQQQQQQ", PT_NOTE, 4, note_off, 0, 0, len(notes), len(notes), note_align)
    out = bytearray(header + phdrs)
    for (_, data, _), off in zip(segments, offsets, strict=True):
        out += b"\0" * (off - len(out)) + data
    out[note_off : note_off + len(notes)] = notes
    out += b"\0" * (shoff - len(out)) + sections + tail
    return bytes(out)


def _loaded(elf: bytes) -> dict[int, bytes]:
    """What an ELF loader (QEMU's -kernel) puts into guest memory: paddr -> p_memsz bytes."""
    memory = {}
    for ph in elf64_program_headers(elf):
        if ph.type == PT_LOAD:
            data = elf[ph.offset : ph.offset + ph.filesz]
            memory[ph.paddr] = data + b"\0" * (ph.memsz - len(data))
    return memory


TEXT = b"\x55\x48\x89\xe5" * 64 + b"\0" * 16 + b"\xc3" + b"\0" * 300  # code, then zeros up to the end
DATA = b"\1\2\3" + b"\0" * 5000  # data, then .bss stored as zeros in the file
VMLINUX_ELF = _elf([(0x1000000, TEXT, len(TEXT)), (0x2000000, DATA, 0x8000)], tail=b"RELOCS" * 100)


def _bzimage(*payloads: bytes) -> bytes:
    """A stand-in for vmlinuz: setup code, the decompressor (holding a stray xz magic), payloads."""
    return b"MZ" + b"\0" * 510 + b"HdrS" + b"\x90" * 100 + XZ_MAGIC + b"decoder" + b"".join(payloads)


def _xz(data: bytes) -> bytes:
    return lzma.compress(data, format=lzma.FORMAT_XZ, check=lzma.CHECK_CRC32)


def test_extract_vmlinux_finds_the_elf_payload() -> None:
    # Not every xz stream is the kernel: one that decodes to something else is skipped too.
    bzimage = _bzimage(_xz(b"not a kernel"), _xz(VMLINUX_ELF), b"\x00\x10\x00\x00", XZ_MAGIC)
    assert extract_vmlinux(bzimage) == VMLINUX_ELF


@pytest.mark.parametrize(
    "payload",
    [
        gzip.compress(VMLINUX_ELF),  # a kernel built with another compressor
        _xz(VMLINUX_ELF)[:-100],  # truncated stream
        b"",
    ],
)
def test_extract_vmlinux_without_xz_elf(payload: bytes) -> None:
    assert extract_vmlinux(_bzimage(payload)) is None


def test_elf_notes() -> None:
    assert list(elf_notes(PVH_NOTES)) == [
        (b"Xen", 6, b"linux\0"),
        (b"Xen", XEN_ELFNOTE_PHYS32_ENTRY, PVH_ENTRY.to_bytes(8, "little")),
        (b"GNU", 3, b"\x12" * 20),
    ]
    aligned8 = _note(b"Xen", 6, b"linux\0", 8) + _note(b"Xen", 18, b"\1\0\0\0", 8)
    assert [n[1:] for n in elf_notes(aligned8, 8)] == [(6, b"linux\0"), (18, b"\1\0\0\0")]
    assert list(elf_notes(PVH_NOTES[:30])) == [(b"Xen", 6, b"linux\0")]  # a cut note is ignored


def test_pvh_entry() -> None:
    assert pvh_entry(VMLINUX_ELF) == PVH_ENTRY
    four_bytes = _note(b"Xen", XEN_ELFNOTE_PHYS32_ENTRY, PVH_ENTRY.to_bytes(4, "little"))
    assert pvh_entry(_elf([(0x1000000, TEXT, len(TEXT))], four_bytes)) == PVH_ENTRY
    eight_aligned = _note(b"Xen", XEN_ELFNOTE_PHYS32_ENTRY, PVH_ENTRY.to_bytes(8, "little"), 8)
    assert pvh_entry(_elf([(0x1000000, TEXT, len(TEXT))], eight_aligned, note_align=8)) == PVH_ENTRY


@pytest.mark.parametrize(
    "elf",
    [
        _elf([(0x1000000, TEXT, len(TEXT))], _note(b"Xen", 6, b"linux\0")),  # Xen notes, but no PVH entry
        _elf([(0x1000000, TEXT, len(TEXT))], _note(b"Lnx", 18, PVH_ENTRY.to_bytes(8, "little"))),  # not Xen's
        _elf([(0x1000000, TEXT, len(TEXT))], _note(b"Xen", 18, b"\0" * 8)),  # entry 0
        _elf([(0x1000000, TEXT, len(TEXT))], elf_class=1),  # ELF32 headers are laid out differently
        VMLINUX_ELF[:100],  # program headers cut off
        b"MZ" + VMLINUX_ELF[2:],
    ],
)
def test_pvh_entry_missing(elf: bytes) -> None:
    assert pvh_entry(elf) is None


def test_trim_elf_keeps_what_is_loaded() -> None:
    trimmed = trim_elf(VMLINUX_ELF)
    assert _loaded(trimmed) == _loaded(VMLINUX_ELF)
    assert pvh_entry(trimmed) == PVH_ENTRY
    headers = elf64_program_headers(trimmed)
    # The zeros after the data segment's last byte, the section headers and the relocs are gone.
    data_segment = headers[1]
    assert data_segment.filesz == 3 and data_segment.memsz == 0x8000
    assert len(trimmed) == data_segment.offset + 3
    assert headers[0].filesz == len(TEXT.rstrip(b"\0"))
    e_shoff, _, _, _, _, _, e_shnum, e_shstrndx = struct.unpack_from("<QIHHHHHH", trimmed, 40)
    assert (e_shoff, e_shnum, e_shstrndx) == (0, 0, 0)
    assert trim_elf(trimmed) == trimmed


def test_trim_elf_keeps_notes_past_the_last_segment() -> None:
    # A PT_NOTE outside every PT_LOAD, at the very end of the file, must stay in it.
    elf = bytearray(VMLINUX_ELF)
    notes_at = len(elf)
    elf += PVH_NOTES
    phdr = 64 + 2 * 56
    struct.pack_into("<Q", elf, phdr + 8, notes_at)
    trimmed = trim_elf(bytes(elf))
    assert trimmed.endswith(PVH_NOTES)
    assert pvh_entry(trimmed) == PVH_ENTRY


@pytest.mark.parametrize(
    "elf",
    [
        VMLINUX_ELF[:0x1200],  # the first segment's data is cut off
        VMLINUX_ELF[:200],  # so is the program header table
        b"\x7fELF" + bytes([1, 1]) + VMLINUX_ELF[6:],  # 32-bit
        b"\x7fELF" + bytes([2, 2]) + VMLINUX_ELF[6:],  # big-endian
        b"\x7fELF",
    ],
)
def test_trim_elf_rejects_what_it_cannot_parse(elf: bytes) -> None:
    with pytest.raises(DemoBuildError):
        trim_elf(elf)


def test_install_kernel_ships_the_trimmed_pvh_elf(tmp_path: Path) -> None:
    vmlinuz = tmp_path / "vmlinuz-6.1.0-9-amd64"
    vmlinuz.write_bytes(_bzimage(_xz(VMLINUX_ELF)))
    out = tmp_path / "out"
    out.mkdir()
    assert demo._install_kernel(vmlinuz, out) == {"kernel_format": "elf-pvh", "pvh_entry": hex(PVH_ENTRY)}
    assert sorted(p.name for p in out.iterdir()) == [VMLINUX]
    assert (out / VMLINUX).read_bytes() == trim_elf(VMLINUX_ELF)


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        (_xz(_elf([(0x1000000, TEXT, len(TEXT))], _note(b"Xen", 6, b"linux\0"))), "PVH"),
        (_xz(_elf([(0x1000000, TEXT, len(TEXT))], elf_class=1)), "PVH"),  # not an ELF64 it can read
        (gzip.compress(VMLINUX_ELF), "xz"),
    ],
)
def test_install_kernel_falls_back_to_the_bzimage(tmp_path: Path, payload: bytes, reason: str) -> None:
    vmlinuz = tmp_path / "vmlinuz-6.1.0-9-amd64"
    vmlinuz.write_bytes(_bzimage(payload))
    out = tmp_path / "out"
    out.mkdir()
    meta = demo._install_kernel(vmlinuz, out)
    assert meta["kernel_format"] == "bzimage" and reason in meta["pvh_fallback"]
    assert sorted(p.name for p in out.iterdir()) == [VMLINUZ]
    assert (out / VMLINUZ).read_bytes() == vmlinuz.read_bytes()


# ----------------------------------------------------------------------------------- boot disk (MBR, syslinux)

MBR_CODE = bytes(range(256)) + bytes(range(184))  # 440 bytes standing in for syslinux's mbr.bin


@pytest.mark.parametrize(
    ("lba", "chs"),
    [
        (0, (0, 0, 1)),  # (cylinder, head, sector); sectors count from 1
        (62, (0, 0, 63)),
        (63, (0, 1, 1)),
        (2048, (0, 32, 33)),  # what fdisk writes for the usual 1 MiB partition start
        (131071, (8, 40, 32)),
        (1023 * 255 * 63 + 254 * 63 + 62, (1023, 254, 63)),  # the last CHS-addressable sector
        (1024 * 255 * 63, (1023, 254, 63)),  # beyond: the maximum
        (1 << 31, (1023, 254, 63)),
    ],
)
def test_chs_address(lba: int, chs: tuple[int, int, int]) -> None:
    cylinder, head, sector = chs
    assert chs_address(lba) == bytes([head, sector | (cylinder >> 8) << 6, cylinder & 0xFF])


def test_mbr_sector_layout() -> None:
    part = MbrPartition(2048, 129024, demo.PARTITION_TYPE_FAT16_LBA, bootable=True)
    mbr = mbr_sector(MBR_CODE, [part], 0x12345678)
    assert len(mbr) == 512
    assert mbr[:440] == MBR_CODE
    assert mbr[440:446] == b"\x78\x56\x34\x12\0\0"  # disk signature (little-endian), reserved
    assert mbr[446:462] == bytes([0x80, 32, 33, 0, 0x0E, 40, 32, 8]) + struct.pack("<II", 2048, 129024)
    assert mbr[462:510] == b"\0" * 48  # three unused entries
    assert mbr[510:] == b"\x55\xaa"


def test_mbr_sector_pads_short_boot_code_and_orders_entries() -> None:
    parts = [MbrPartition(2048, 100, 0x83), MbrPartition(4096, 100, 0x0C, bootable=True)]
    mbr = mbr_sector(b"\xeb\xfe", parts, 0)
    assert mbr[:440] == b"\xeb\xfe" + b"\0" * 438
    assert mbr[446] == 0x00 and mbr[450] == 0x83
    assert mbr[462] == 0x80 and mbr[466] == 0x0C
    assert struct.unpack_from("<II", mbr, 462 + 8) == (4096, 100)


def test_mbr_sector_is_read_by_fdisk(tmp_path: Path) -> None:
    image = tmp_path / "disk.img"
    with image.open("wb") as f:
        f.truncate(64 << 20)
        part = MbrPartition(2048, (64 << 11) - 2048, demo.PARTITION_TYPE_FAT16_LBA, bootable=True)
        f.write(mbr_sector(MBR_CODE, [part], 0xCAFE))
    listing = subprocess.run(
        ["/bin/busybox", "fdisk", "-l", "-u", str(image)], capture_output=True, text=True, check=True
    ).stdout
    row = next(line for line in listing.splitlines() if line.startswith(f"{image}1"))
    assert row.split()[1] == "*"  # active
    assert row.split()[4:7] == ["2048", "131071", "129024"]
    assert " e " in row  # type


@pytest.mark.parametrize(
    ("code", "parts", "disk_id", "message"),
    [
        (b"\0" * 441, [], 0, "boot code"),
        (b"", [MbrPartition(2048, 10, 0x0C)] * 5, 0, "four"),
        (b"", [MbrPartition(2048, 100, 0x0C), MbrPartition(2100, 100, 0x83)], 0, "overlaps"),
        (b"", [MbrPartition(0, 100, 0x0C)], 0, "invalid"),  # sector 0 is the MBR itself
        (b"", [MbrPartition(1, 0, 0x0C)], 0, "invalid"),
        (b"", [MbrPartition(1, 1 << 32, 0x0C)], 0, "invalid"),  # ends past what 32-bit LBA reaches
        (b"", [MbrPartition(1, 10, 0)], 0, "invalid"),  # type 0 marks an unused entry
        (b"", [], 1 << 32, "signature"),
    ],
)
def test_mbr_sector_rejects(code: bytes, parts: list[MbrPartition], disk_id: int, message: str) -> None:
    with pytest.raises(DemoBuildError, match=message):
        mbr_sector(code, parts, disk_id)


def test_syslinux_config() -> None:
    cfg = syslinux_config("demo", "/vmlinuz", "/initrd.gz", demo.CMDLINE)
    lines = [line.strip() for line in cfg.splitlines() if line.strip() and not line.startswith("#")]
    assert lines == [
        "SERIAL 0 115200",  # syslinux requires SERIAL to be the first directive
        "DEFAULT demo",
        "PROMPT 0",
        "LABEL demo",
        "LINUX /vmlinuz",
        "INITRD /initrd.gz",
        f"APPEND {demo.CMDLINE}",
    ]


@pytest.mark.parametrize(
    "args",
    [
        ("demo", "/vmlinuz", "/initrd.gz", "quiet\nDEFAULT evil"),
        ("demo x", "/vmlinuz", "/initrd.gz", "quiet"),
        ("demo", "/vm linuz", "/initrd.gz", "quiet"),
        ("demo", "/vmlinuz", "", "quiet"),
    ],
)
def test_syslinux_config_rejects(args: tuple[str, str, str, str]) -> None:
    with pytest.raises(DemoBuildError):
        syslinux_config(*args)


def test_installer_cmdline_runs_the_install_script() -> None:
    assert demo.INSTALLER_CMDLINE.startswith(demo.CMDLINE + " ")
    assert f"rdinit={demo.INSTALL_INIT}" in demo.INSTALLER_CMDLINE.split()
    assert demo.INSTALLER_FILES["install"][0] == demo.INSTALL_INIT.lstrip("/")


_BOOT_DISK_TOOLS = ("mkfs.vfat", "mcopy", "mdir", "qemu-img")


@pytest.mark.skipif(
    any(shutil.which(t) is None for t in _BOOT_DISK_TOOLS) or not demo.SYSLINUX.is_file(),
    reason="needs dosfstools, mtools, syslinux and qemu-utils (scripts/install-deps.sh)",
)
def test_build_boot_disk_from_image_files(tmp_path: Path) -> None:
    # The real tools on plain files: no root, no loop device, no QEMU. A stand-in mbr.bin is enough.
    vmlinuz = tmp_path / "vmlinuz-6.1.0-9-amd64"
    vmlinuz.write_bytes(b"bzImage" * 1000)
    initrd = tmp_path / "initrd.gz"
    initrd.write_bytes(b"initrd" * 1000)
    cfg = syslinux_config("demo", "/vmlinuz", "/initrd.gz", demo.CMDLINE)
    work = tmp_path / "work"
    work.mkdir()
    out = tmp_path / "boot.qcow2"
    with pytest.MonkeyPatch.context() as mp:
        mbr_bin = tmp_path / "mbr.bin"
        mbr_bin.write_bytes(MBR_CODE)
        mp.setattr(demo, "SYSLINUX_MBR", mbr_bin)
        meta = demo._build_boot_disk(work, vmlinuz, initrd, cfg, 0x1234ABCD, out)
    assert meta["partition_start_sector"] == demo.BOOT_PARTITION_START
    assert not (work / "boot.raw").exists()
    raw = tmp_path / "boot.raw"
    subprocess.run(["qemu-img", "convert", "-f", "qcow2", "-O", "raw", str(out), str(raw)], check=True)
    data = raw.read_bytes()
    assert len(data) == demo.BOOT_DISK_BYTES
    part = MbrPartition(demo.BOOT_PARTITION_START, (len(data) >> 9) - demo.BOOT_PARTITION_START, 0x0E, True)
    assert data[:512] == mbr_sector(MBR_CODE, [part], 0x1234ABCD)
    boot_sector = data[demo.BOOT_PARTITION_START * 512 :][:512]
    assert boot_sector[3:11] == b"SYSLINUX"  # OEM name written by syslinux's installer
    assert struct.unpack_from("<I", boot_sector, 28)[0] == demo.BOOT_PARTITION_START  # hidden sectors
    assert boot_sector[54:62] == b"FAT16   "
    listing = subprocess.run(
        ["mdir", "-a", "-b", "-i", f"{raw}@@{demo.BOOT_PARTITION_START * 512}", "::/"],
        capture_output=True, text=True, check=True, env={**os.environ, **demo.MTOOLS_ENV},
    ).stdout  # fmt: skip
    names = {line.strip().lstrip(":/").lower() for line in listing.splitlines()}
    assert {"vmlinuz", "initrd.gz", "syslinux.cfg", "ldlinux.sys", "ldlinux.c32"} <= names


def test_install_script_partitions_like_the_boot_disk(tmp_path: Path) -> None:
    # Feed the fdisk commands from the install script to busybox fdisk on an image file: one active FAT32
    # (LBA) partition from sector 2048 to the end of the disk.
    script = demo._demo_files()["install"].decode()
    m = re.search(r"printf '([^']*)' \| fdisk -u ", script)
    assert m, "install script no longer feeds fdisk through printf"
    commands = m.group(1).encode().decode("unicode_escape")
    image = tmp_path / "disk.img"
    with image.open("wb") as f:
        f.truncate(128 << 20)
    # fdisk exits 1 here only because an image file cannot re-read its partition table.
    subprocess.run(["/bin/busybox", "fdisk", "-u", str(image)], input=commands, capture_output=True, text=True)
    mbr = image.read_bytes()[:512]
    assert mbr[510:] == b"\x55\xaa"
    status, _, ptype, _, start, sectors = struct.unpack_from("<B3sB3sII", mbr, 446)
    assert (status, ptype, start, sectors) == (0x80, 0x0C, 2048, (128 << 11) - 2048)
    assert mbr[462:510] == b"\0" * 48


def test_install_script_reports_and_uses_the_payload() -> None:
    script = demo._demo_files()["install"].decode()
    assert f"say {demo.INSTALL_DONE_LINE}" in script
    assert f"{demo.INSTALL_FAILED_LINE}: " in script
    assert f"payload=/{demo.INSTALL_PAYLOAD}" in script
    for name in (demo.VMLINUZ, demo.INITRD, "syslinux.cfg", "mbr.bin"):
        assert f"$payload/{name}" in script
    assert "poweroff -f" in script


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


def test_write_newc_readable_by_cpio(tmp_path: Path) -> None:
    buf = io.BytesIO()
    write_newc(tree_entries(_sample_tree(tmp_path)), buf)
    listing = subprocess.run(
        ["cpio", "-it", "--quiet"], input=buf.getvalue(), capture_output=True, check=True
    ).stdout.decode()
    assert listing.split() == [e.name for e in tree_entries(tmp_path / "root")]


# ----------------------------------------------------------------------------------- guest files


ALL_GUEST_FILES = {**demo.GUEST_FILES, **demo.INSTALLER_FILES}


def test_guest_files_are_packaged() -> None:
    files = demo._demo_files()
    assert set(files) == set(ALL_GUEST_FILES)
    for name, (_, mode) in ALL_GUEST_FILES.items():
        if mode & 0o111:
            assert files[name].startswith(b"#!/bin/sh\n"), name


@pytest.mark.parametrize("name", [n for n, (_, mode) in ALL_GUEST_FILES.items() if mode & 0o111])
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


# Module constants naming the host files whose digests enter the cache key.
HOST_FILE_ATTRS = (
    "BUSYBOX",
    "QEMU_GA",
    "SYSLINUX",
    "EXTLINUX",
    "SYSLINUX_MBR",
    "LDLINUX_C32",
    "ISOLINUX_BIN",
    "ISOHYBRID_MBR",
)


@pytest.fixture
def fake_host(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Stand-ins for the host binaries and apt lists; returns the cache dir."""
    (tmp_path / "lists").mkdir()
    monkeypatch.setattr(demo, "APT_LISTS", tmp_path / "lists")
    for attr in HOST_FILE_ATTRS:
        fake = tmp_path / "host" / attr.lower()
        fake.parent.mkdir(exist_ok=True)
        fake.write_bytes(attr.encode())
        monkeypatch.setattr(demo, attr, fake)
    return tmp_path / "cache"


def test_host_inputs_are_the_patchable_constants(fake_host: Path) -> None:
    assert sorted(demo._host_inputs().values()) == sorted(getattr(demo, a) for a in HOST_FILE_ATTRS)


def test_missing_boot_loader_files_are_named(fake_host: Path) -> None:
    demo.EXTLINUX.unlink()
    with pytest.raises(DemoBuildError, match="extlinux"):
        demo._host_digests()


def test_boot_loader_files_are_in_the_cache_key(fake_host: Path) -> None:
    key = cache_key(FILES, demo._host_digests())
    demo.SYSLINUX_MBR.write_bytes(b"another mbr.bin")
    assert cache_key(FILES, demo._host_digests()) != key


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


@pytest.mark.parametrize("kernel", [VMLINUX, VMLINUZ])  # a kernel without PVH is shipped as vmlinuz
def test_cached_image_is_returned_without_building(
    fake_host: Path, monkeypatch: pytest.MonkeyPatch, kernel: str
) -> None:
    monkeypatch.setattr(demo, "resolve_kernel_version", lambda cache_dir: "6.1.0-9-amd64")
    monkeypatch.setattr(proc, "run", _no_subprocess)
    key = cache_key(demo._demo_files(), demo._host_digests())
    final = fake_host / f"demo-6.1.0-9-amd64-{key[:16]}"
    final.mkdir(parents=True)
    for name in (kernel, "initrd.gz", "disk.qcow2", "boot.qcow2", "installer.iso"):
        (final / name).write_bytes(b"x")

    messages: list[tuple[float, str]] = []
    image = demo.build_demo(fake_host, progress=lambda f, m: messages.append((f, m)))
    assert image.kernel == final / kernel
    assert image.initrd == final / "initrd.gz"
    assert image.disk == final / "disk.qcow2"
    assert image.boot_disk == final / "boot.qcow2"
    assert image.installer_iso == final / "installer.iso"
    assert image.kernel_version == "6.1.0-9-amd64"
    assert image.cmdline == demo.CMDLINE
    assert messages and messages[-1][0] == 1.0


@pytest.mark.parametrize("missing", ["boot.qcow2", "installer.iso"])
def test_image_without_every_form_is_incomplete(tmp_path: Path, missing: str) -> None:
    for name in (VMLINUX, "initrd.gz", "disk.qcow2", "boot.qcow2", "installer.iso"):
        if name != missing:
            (tmp_path / name).write_bytes(b"x")
    assert not demo._is_complete(demo._image_from_dir(tmp_path, "6.1.0-9-amd64"))
    (tmp_path / missing).write_bytes(b"x")
    assert demo._is_complete(demo._image_from_dir(tmp_path, "6.1.0-9-amd64"))


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


def test_kernel_download_refreshes_stale_package_lists_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from vmkit.errors import CommandFailed
    from vmkit.util.proc import Result

    calls: list[tuple[str, ...]] = []

    def fake_run(argv: Sequence[str], **kw: object) -> Result:
        calls.append(tuple(argv))
        if argv[:2] == ["apt-get", "download"]:
            if sum(c[:2] == ("apt-get", "download") for c in calls) == 1:
                raise CommandFailed("apt-get failed: 404  Not Found")
            cwd = kw["cwd"]
            assert isinstance(cwd, Path)
            (cwd / f"{argv[2]}_1.0_amd64.deb").write_bytes(b"deb")
        return Result(tuple(argv), 0, "", "", 0.0)

    monkeypatch.setattr(demo.proc, "run", fake_run)
    work = tmp_path / "work"
    work.mkdir()
    deb = demo._fetch_kernel_deb(tmp_path, "6.1.0-99-amd64", work)
    assert deb == tmp_path / "debs" / "linux-image-6.1.0-99-amd64_1.0_amd64.deb"
    assert [c[:2] for c in calls] == [("apt-get", "download"), ("apt-get", "update"), ("apt-get", "download")]
