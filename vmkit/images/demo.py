"""Build a tiny bootable demo guest from Debian packages only.

The guest is a Debian kernel plus a busybox initramfs running the host's qemu-guest-agent. It needs no
network access beyond the Debian archive (for the kernel package) and boots to VMKIT-DEMO-READY on ttyS0
in a few seconds even under TCG.

One build yields the guest in three forms:

- direct kernel boot (QEMU -kernel/-initrd): the kernel is shipped uncompressed, because QEMU's -kernel
  boots an ELF that carries a Xen PVH entry note directly, which under TCG saves the ~3 s the bzImage
  (vmlinuz) spends decompressing itself, about half of the boot. Kernels without that note, or whose
  payload is not xz, are shipped as the bzImage instead. disk.qcow2 is an empty data disk beside it.
- boot.qcow2, a BIOS-bootable disk: an MBR with syslinux's boot code and one active FAT16 partition
  holding syslinux, the packaged bzImage (syslinux cannot boot the PVH ELF), the same initramfs and a
  syslinux.cfg with the same command line. Built from image files only (mkfs.vfat --offset, mcopy,
  syslinux --offset): no loop device, no mount, no root.
- installer.iso, a bootable isolinux CD (also isohybrid) whose installer partitions the guest's first
  writable virtio disk, makes it bootable and copies the same system onto it, then powers off; the disk
  then boots alone like boot.qcow2. Its initramfs is the demo one plus the payload and
  demo_files/install, started instead of init by rdinit= so the normal boot path is untouched.

Layout of a finished image, committed by one atomic rename so a crash never leaves a half image:

    cache_dir/debs/linux-image-<ver>_<pkgver>_amd64.deb     kept for rebuilds
    cache_dir/demo-<ver>-<key>/{vmlinux or vmlinuz,initrd.gz,disk.qcow2,boot.qcow2,installer.iso,image.json}
"""

from __future__ import annotations

import fcntl
import gzip
import hashlib
import json
import lzma
import os
import re
import shutil
import stat
import struct
import tempfile
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import NamedTuple, Protocol

from vmkit.errors import CommandFailed, VmkitError
from vmkit.util import proc

CMDLINE = "console=ttyS0 quiet panic=-1"
READY_LINE = "VMKIT-DEMO-READY"
QGA_PORT_NAME = "org.qemu.guest_agent.0"
DISK_SIZE = "64M"

# Bump whenever the build recipe changes in a way the hashed inputs below do not capture.
# 2: the kernel is the uncompressed, trimmed ELF (vmlinux, PVH boot) instead of vmlinuz.
# 3: the image also holds boot.qcow2 (BIOS-bootable syslinux disk) and installer.iso.
# 4: the 8021q module (VLAN interfaces in the guest).
RECIPE_VERSION = 4

# File names in an image directory besides the kernel.
INITRD = "initrd.gz"
DATA_DISK = "disk.qcow2"
BOOT_DISK = "boot.qcow2"
INSTALLER_ISO = "installer.iso"

# The installer: the ISO boots the kernel with this command line; rdinit= runs the install script as the
# first process instead of busybox init, so the demo's own rcS needs no install branch at all.
INSTALL_INIT = "/sbin/vmkit-install"
INSTALLER_CMDLINE = f"{CMDLINE} rdinit={INSTALL_INIT}"
INSTALL_DONE_LINE = "VMKIT-INSTALL-DONE"
INSTALL_FAILED_LINE = "VMKIT-INSTALL-FAILED"
# Where the installer initramfs carries what it writes onto the disk.
INSTALL_PAYLOAD = "usr/share/vmkit-install"

# boot.qcow2: 64 MiB virtual (qcow2 keeps it thin), one partition from 1 MiB (the usual alignment) to the
# end. FAT16 is the natural FAT for that size (FAT32 would need 512-byte clusters to reach its minimum of
# 65525); syslinux boots from either.
SECTOR_SIZE = 512
BOOT_DISK_BYTES = 64 << 20
BOOT_PARTITION_START = 2048  # sectors
PARTITION_TYPE_FAT16_LBA = 0x0E
FAT_LABEL = "VMKITDEMO"
# mtools checks that a filesystem's size fits the BPB's CHS geometry, which means nothing for an image file.
MTOOLS_ENV = {"MTOOLS_SKIP_CHECK": "1"}

# Boot loader files from Debian's syslinux, syslinux-common, isolinux and extlinux packages. Their
# content is part of the cache key: the boot sectors and ldlinux.sys come from them.
SYSLINUX = Path("/usr/bin/syslinux")  # mtools-based installer, works on image files
EXTLINUX = Path("/usr/bin/extlinux")  # installer for a mounted filesystem, run inside the installer guest
SYSLINUX_MBR = Path("/usr/lib/syslinux/mbr/mbr.bin")
LDLINUX_C32 = Path("/usr/lib/syslinux/modules/bios/ldlinux.c32")
ISOLINUX_BIN = Path("/usr/lib/ISOLINUX/isolinux.bin")
ISOHYBRID_MBR = Path("/usr/lib/ISOLINUX/isohdpfx.bin")

# Kernel file names in an image directory: the uncompressed ELF (PVH boot) or the bzImage as packaged.
VMLINUX = "vmlinux"
VMLINUZ = "vmlinuz"
XZ_MAGIC = b"\xfd7zXZ\x00"
ELF_MAGIC = b"\x7fELF"
# Xen ELF note holding the 32-bit PVH entry point; QEMU refuses to boot an ELF kernel without it.
XEN_ELFNOTE_PHYS32_ENTRY = 18

BUSYBOX = Path("/bin/busybox")
QEMU_GA = Path("/usr/sbin/qemu-ga")
APT_LISTS = Path("/var/lib/apt/lists")
KERNEL_META_PACKAGE = "linux-image-amd64"

# Loaded by the guest in this order; modprobe resolves the dependencies between them.
BASE_MODULES = (
    "virtio_ring",
    "virtio",
    "virtio_pci_modern_dev",
    "virtio_pci_legacy_dev",
    "virtio_pci",
    "virtio_blk",
    "failover",
    "net_failover",
    "virtio_net",
    "virtio_console",
    "8021q",  # VLAN interfaces in the guest (a trunk port on an ovs network)
)
# Kernel options that must be built in or loaded for the ACPI power button to reach acpid, and the
# module providing each when it is built as a module.
POWER_BUTTON_OPTIONS = (("CONFIG_ACPI_BUTTON", "button"), ("CONFIG_INPUT_EVDEV", "evdev"))

# demo_files/<name> -> (path in the guest, mode). Each file's content is part of the cache key.
GUEST_FILES: Mapping[str, tuple[str, int]] = {
    "inittab": ("etc/inittab", 0o644),
    "rcS": ("etc/init.d/rcS", 0o755),
    "udhcpc.script": ("etc/udhcpc/default.script", 0o755),
    "shutdown": ("sbin/shutdown", 0o755),
    "acpid.conf": ("etc/acpid.conf", 0o644),
    "acpi-power": ("etc/acpi/power", 0o755),
    "profile": ("etc/profile", 0o644),
    "passwd": ("etc/passwd", 0o644),
    "group": ("etc/group", 0o644),
}
# demo_files/<name> -> (path, mode) in the installer initramfs only; also part of the cache key.
INSTALLER_FILES: Mapping[str, tuple[str, int]] = {
    "install": (INSTALL_INIT.lstrip("/"), 0o755),
}

_MODULE_SUFFIXES = (".ko", ".ko.xz", ".ko.gz", ".ko.zst")
_BUILD_PREFIX = ".demo-build-"

Progress = Callable[[float, str], None]


class _Writer(Protocol):
    def write(self, data: bytes, /) -> object: ...


class DemoBuildError(VmkitError):
    """The demo guest cannot be built from what the host and its packages provide."""


@dataclass(frozen=True)
class DemoImage:
    kernel: Path  # vmlinux: uncompressed ELF with a PVH entry; vmlinuz (bzImage) for kernels without PVH
    initrd: Path  # initrd.gz (gzip'd newc cpio)
    disk: Path  # small empty qcow2 base disk; VMs get an overlay of it
    cmdline: str  # kernel command line; serial console on ttyS0
    kernel_version: str  # e.g. "6.1.0-56-amd64"
    # BIOS-bootable qcow2 (MBR + syslinux + bzImage + initrd.gz), booted without -kernel; use an overlay.
    boot_disk: Path
    # Bootable installer CD: installs the boot_disk system onto the guest's first writable virtio disk,
    # prints INSTALL_DONE_LINE on ttyS0 and powers off.
    installer_iso: Path


# --------------------------------------------------------------------------- pure helpers


def parse_kernel_depends(apt_cache_output: str) -> str:
    """Kernel version from `apt-cache depends linux-image-amd64` ("Depends: linux-image-6.1.0-N-amd64")."""
    for line in apt_cache_output.splitlines():
        m = re.fullmatch(r"\s*\|?Depends:\s*linux-image-(\d[\w.+~-]*)\s*", line)
        if m:
            return m.group(1)
    raise DemoBuildError(f"{KERNEL_META_PACKAGE} depends on no versioned linux-image package")


def parse_ldd(ldd_output: str) -> list[Path]:
    """Absolute paths of the shared objects (loader included) that ldd lists; the vDSO has no file."""
    paths: list[Path] = []
    for raw in ldd_output.splitlines():
        line = raw.strip()
        if not line:
            continue
        if "not found" in line:
            raise DemoBuildError(f"ldd: missing library: {line}")
        target = line.split("=>", 1)[1].strip() if "=>" in line else line
        path = target.split(" (", 1)[0].strip()
        if path.startswith("/"):
            paths.append(Path(path))
    return paths


def kernel_config_value(config_text: str, option: str) -> str | None:
    """'y', 'm', another value, or None when the option is unset in a kernel .config text."""
    prefix = option + "="
    for line in config_text.splitlines():
        if line.startswith(prefix):
            return line[len(prefix) :].strip()
    return None


def _config_modules(config_text: str, options: Iterable[tuple[str, str]], purpose: str) -> list[str]:
    """The module of each (option, module) that the kernel builds as a module; none for built-in ones."""
    mods: list[str] = []
    for option, module in options:
        value = kernel_config_value(config_text, option)
        if value == "m":
            mods.append(module)
        elif value != "y":
            raise DemoBuildError(f"kernel lacks {option}: {purpose}")
    return mods


def power_button_modules(config_text: str) -> list[str]:
    """Modules to load so ACPI power-button presses reach /dev/input/event* (nothing when built in)."""
    return _config_modules(config_text, POWER_BUTTON_OPTIONS, "ACPI power-off could not work")


def fat_modules(config_text: str) -> list[str]:
    """Modules the installer loads to mount a vfat filesystem with the kernel's default options.

    vfat always loads the NLS tables of its default code page and I/O charset (mount fails with "IO
    charset ... not found" otherwise), so those are needed too; which ones is read from the config.
    """
    codepage = kernel_config_value(config_text, "CONFIG_FAT_DEFAULT_CODEPAGE") or "437"
    iocharset = (kernel_config_value(config_text, "CONFIG_FAT_DEFAULT_IOCHARSET") or "iso8859-1").strip('"')
    nls = iocharset.replace("-", "_")
    options = (
        ("CONFIG_VFAT_FS", "vfat"),
        (f"CONFIG_NLS_CODEPAGE_{codepage}", f"nls_cp{codepage}"),
        (f"CONFIG_NLS_{nls.upper()}", f"nls_{nls.lower()}"),
    )
    return _config_modules(config_text, options, "the installer could not mount its FAT partition")


class MbrPartition(NamedTuple):
    """One primary partition of an MBR partition table."""

    start: int  # first sector (LBA)
    sectors: int
    type: int  # partition type byte, e.g. PARTITION_TYPE_FAT16_LBA
    bootable: bool = False  # the "active" flag: syslinux's mbr.bin boots the active partition


MBR_BOOT_CODE_SIZE = 440  # then the disk signature (4 bytes), 2 reserved, 4 x 16-byte entries, 0x55 0xAA
_MBR_ENTRY = struct.Struct("<B3sB3sII")
# The conventional geometry for CHS fields of LBA disks (what fdisk and sfdisk write).
_CHS_HEADS = 255
_CHS_SECTORS = 63


def chs_address(lba: int) -> bytes:
    """The 3-byte CHS field for lba (head, sector | cylinder high bits, cylinder low byte).

    Only firmware without LBA reads these; SeaBIOS and syslinux's MBR code use the LBA fields. Past
    cylinder 1023 CHS cannot address a sector, and the field holds the maximum (1023, 254, 63).
    """
    cylinder, rest = divmod(lba, _CHS_HEADS * _CHS_SECTORS)
    head, sector = divmod(rest, _CHS_SECTORS)
    if cylinder > 1023:
        cylinder, head, sector = 1023, _CHS_HEADS - 1, _CHS_SECTORS - 1
    return bytes([head, (sector + 1) | ((cylinder >> 2) & 0xC0), cylinder & 0xFF])


def mbr_sector(boot_code: bytes, partitions: Sequence[MbrPartition], disk_id: int) -> bytes:
    """Sector 0 of an MBR disk: boot code, disk signature, up to four primary partitions, boot signature."""
    if len(boot_code) > MBR_BOOT_CODE_SIZE:
        raise DemoBuildError(f"MBR boot code is {len(boot_code)} bytes, at most {MBR_BOOT_CODE_SIZE} fit")
    if len(partitions) > 4:
        raise DemoBuildError("an MBR holds at most four primary partitions")
    if not 0 <= disk_id < 1 << 32:
        raise DemoBuildError(f"disk signature {disk_id:#x} does not fit 32 bits")
    taken: list[tuple[int, int]] = []
    entries = b""
    for p in partitions:
        end = p.start + p.sectors  # exclusive
        if p.start < 1 or p.sectors < 1 or end > 1 << 32 or not 0 < p.type < 256:
            raise DemoBuildError(f"invalid MBR partition {p}")
        if any(p.start < e and s < end for s, e in taken):
            raise DemoBuildError(f"MBR partition {p} overlaps another")
        taken.append((p.start, end))
        status = 0x80 if p.bootable else 0x00
        entries += _MBR_ENTRY.pack(status, chs_address(p.start), p.type, chs_address(end - 1), p.start, p.sectors)
    sector = (
        boot_code.ljust(MBR_BOOT_CODE_SIZE, b"\0")
        + struct.pack("<IH", disk_id, 0)
        + entries.ljust(4 * _MBR_ENTRY.size, b"\0")
        + b"\x55\xaa"
    )
    assert len(sector) == SECTOR_SIZE
    return sector


def syslinux_config(label: str, kernel: str, initrd: str, append: str) -> str:
    """A syslinux/isolinux/extlinux config that boots kernel + initrd with append, at once and unattended.

    SERIAL (which must be the first directive) mirrors the boot loader's console on ttyS0, so a serial log
    shows it loading the kernel. PROMPT 0 without a TIMEOUT boots the default without waiting; syslinux
    appends "initrd=<initrd>" to the command line itself.
    """
    for value in (label, kernel, initrd, append):
        if not value or "\n" in value or "\r" in value:
            raise DemoBuildError(f"invalid syslinux config value {value!r}")
    for value in (label, kernel, initrd):
        if any(c.isspace() for c in value):
            raise DemoBuildError(f"syslinux label or path with whitespace: {value!r}")
    return (
        "# Written by vmkit (vmkit/images/demo.py).\n"
        "SERIAL 0 115200\n"
        f"DEFAULT {label}\n"
        "PROMPT 0\n"
        f"LABEL {label}\n"
        f"  LINUX {kernel}\n"
        f"  INITRD {initrd}\n"
        f"  APPEND {append}\n"
    )


def module_name(filename: str) -> str | None:
    """Canonical module name of a module file name (dashes folded to underscores, as modprobe does)."""
    for suffix in _MODULE_SUFFIXES:
        if filename.endswith(suffix):
            return filename[: -len(suffix)].replace("-", "_")
    return None


def module_closure(roots: Iterable[str], deps_of: Callable[[str], Sequence[str]]) -> list[str]:
    """roots and everything they depend on, each module after its dependencies."""
    order: list[str] = []
    state: dict[str, str] = {}  # name -> "visiting" | "done"

    def visit(name: str) -> None:
        seen = state.get(name)
        if seen == "done":
            return
        if seen == "visiting":
            raise DemoBuildError(f"module dependency cycle through {name}")
        state[name] = "visiting"
        for dep in deps_of(name):
            visit(dep)
        state[name] = "done"
        order.append(name)

    for root in roots:
        visit(root)
    return order


def extract_vmlinux(bzimage: bytes) -> bytes | None:
    """The uncompressed kernel ELF inside an x86 bzImage (vmlinuz) whose payload is xz, else None.

    The payload is the first xz stream that decodes to an ELF. The magic also occurs elsewhere (the
    decompressor's own xz decoder holds it), so every occurrence is a candidate.
    """
    view = memoryview(bzimage)
    start = bzimage.find(XZ_MAGIC)
    while start >= 0:
        decoder = lzma.LZMADecompressor(format=lzma.FORMAT_XZ)
        try:
            data = decoder.decompress(view[start:])
        except lzma.LZMAError:
            data = b""
        if decoder.eof and data.startswith(ELF_MAGIC):
            return data
        start = bzimage.find(XZ_MAGIC, start + 1)
    return None


class ProgramHeader(NamedTuple):
    """One ELF64 program header; table_offset is where it sits in the file."""

    table_offset: int
    type: int
    flags: int
    offset: int
    vaddr: int
    paddr: int
    filesz: int
    memsz: int
    align: int


PT_LOAD = 1
PT_NOTE = 4
_ELF64_HEADER = struct.Struct("<16sHHIQQQIHHHHHH")
_ELF64_PHDR = struct.Struct("<IIQQQQQQ")
_NOTE_HEADER = struct.Struct("<III")


def elf64_program_headers(elf: bytes) -> list[ProgramHeader]:
    """The program headers of a little-endian ELF64 file (the only kind of x86-64 kernel)."""
    if len(elf) < _ELF64_HEADER.size or not elf.startswith(ELF_MAGIC):
        raise DemoBuildError("not an ELF file")
    fields = _ELF64_HEADER.unpack_from(elf)
    ident, phoff, phentsize, phnum = fields[0], fields[5], fields[9], fields[10]
    if ident[4] != 2 or ident[5] != 1:  # EI_CLASS ELFCLASS64, EI_DATA ELFDATA2LSB
        raise DemoBuildError("not a little-endian 64-bit ELF file")
    if phnum and phentsize != _ELF64_PHDR.size:
        raise DemoBuildError(f"unexpected ELF program header size {phentsize}")
    if phoff + phnum * _ELF64_PHDR.size > len(elf):
        raise DemoBuildError("ELF program header table is truncated")
    headers = []
    for i in range(phnum):
        at = phoff + i * _ELF64_PHDR.size
        ph = ProgramHeader(at, *_ELF64_PHDR.unpack_from(elf, at))
        if ph.offset + ph.filesz > len(elf):
            raise DemoBuildError(f"ELF segment {i} extends past the end of the file")
        headers.append(ph)
    return headers


def elf_notes(data: bytes, align: int = 4) -> Iterator[tuple[bytes, int, bytes]]:
    """(owner name, type, descriptor) of each note in the contents of a note segment."""
    pos = 0
    while pos + _NOTE_HEADER.size <= len(data):
        namesz, descsz, note_type = _NOTE_HEADER.unpack_from(data, pos)
        name_at = pos + _NOTE_HEADER.size
        desc_at = name_at + -(-namesz // align) * align
        if desc_at + descsz > len(data):
            return
        yield data[name_at : name_at + namesz].rstrip(b"\0"), note_type, data[desc_at : desc_at + descsz]
        pos = desc_at + -(-descsz // align) * align


def pvh_entry(elf: bytes) -> int | None:
    """The 32-bit PVH entry point an ELF kernel declares (XEN_ELFNOTE_PHYS32_ENTRY), or None."""
    try:
        headers = elf64_program_headers(elf)
    except DemoBuildError:
        return None
    for ph in headers:
        if ph.type != PT_NOTE:
            continue
        segment = elf[ph.offset : ph.offset + ph.filesz]
        for name, note_type, desc in elf_notes(segment, 8 if ph.align == 8 else 4):
            if name == b"Xen" and note_type == XEN_ELFNOTE_PHYS32_ENTRY and len(desc) in (4, 8):
                entry = int.from_bytes(desc, "little")
                if 0 < entry < 1 << 32:
                    return entry
    return None


def trim_elf(elf: bytes) -> bytes:
    """elf without what loading it does not need; a loader puts the very same bytes into memory.

    Trailing zeros of each loadable segment leave the file (p_filesz shrinks; the loader zero-fills up to
    p_memsz, as it does for .bss). So do the section headers, which would then describe data no longer
    in the file, and anything after the last segment: in a kernel extracted from a bzImage that is the
    relocation table the decompressor would have applied. Linux's stripped vmlinux carries ~24 MB of
    zeros (.bss, .brk and .init.scratch share the last segment) and ~0.9 MB of relocations.
    """
    headers = elf64_program_headers(elf)
    out = bytearray(elf)
    end = max([_ELF64_HEADER.size, *(ph.table_offset + _ELF64_PHDR.size for ph in headers)])
    for ph in headers:
        filesz = ph.filesz
        if ph.type == PT_LOAD and filesz:
            filesz = len(elf[ph.offset : ph.offset + filesz].rstrip(b"\0"))
            # p_filesz is the 6th field: after p_type, p_flags (4 bytes each), p_offset, p_vaddr, p_paddr.
            struct.pack_into("<Q", out, ph.table_offset + 32, filesz)
        if filesz:
            end = max(end, ph.offset + filesz)
    struct.pack_into("<Q", out, 40, 0)  # e_shoff
    struct.pack_into("<HH", out, 60, 0, 0)  # e_shnum, e_shstrndx
    del out[end:]
    return bytes(out)


def cache_key(files: Mapping[str, bytes], binary_digests: Mapping[str, str]) -> str:
    """Hex digest identifying one image recipe: guest files' content, host binaries, recipe constants."""
    h = hashlib.sha256()

    def field(tag: str, value: bytes) -> None:
        # Length-prefixed so that no two different inputs serialise to the same byte stream.
        h.update(f"{tag}:{len(value)}:".encode())
        h.update(value)

    field("recipe", str(RECIPE_VERSION).encode())
    field("cmdline", CMDLINE.encode())
    field("installer_cmdline", INSTALLER_CMDLINE.encode())
    field("modules", ",".join(BASE_MODULES).encode())
    for name in sorted(files):
        field("file:" + name, files[name])
    for name in sorted(binary_digests):
        field("bin:" + name, binary_digests[name].encode())
    return h.hexdigest()


@dataclass(frozen=True)
class CpioEntry:
    """One member of a newc archive. uid/gid are always 0 and mtime 0, for reproducible archives."""

    name: str  # relative, no leading "/"
    mode: int  # including the file type bits
    source: Path | None = None  # regular file content
    data: bytes = b""  # content for symlinks (target) or small regular files
    rdev: tuple[int, int] = (0, 0)


def write_newc(entries: Iterable[CpioEntry], out: _Writer) -> None:
    """Write a newc ("070701") cpio archive, as the kernel's initramfs unpacker reads it."""
    written = 0

    def put(chunk: bytes) -> None:
        nonlocal written
        out.write(chunk)
        written += len(chunk)

    def pad() -> None:
        put(b"\0" * (-written % 4))

    def member(ino: int, e: CpioEntry, body: bytes) -> None:
        name = e.name.encode() + b"\0"
        nlink = 2 if stat.S_ISDIR(e.mode) else 1
        # ino mode uid gid nlink mtime filesize devmajor devminor rdevmajor rdevminor namesize check
        fields = (ino, e.mode, 0, 0, nlink, 0, len(body), 0, 0, *e.rdev, len(name), 0)
        put(b"070701" + b"".join(b"%08X" % f for f in fields) + name)
        pad()
        put(body)
        pad()

    ino = 0
    for ino, e in enumerate(entries, start=1):
        body = e.source.read_bytes() if e.source is not None else e.data
        member(ino, e, body)
    member(ino + 1, CpioEntry("TRAILER!!!", 0), b"")


def tree_entries(root: Path) -> Iterator[CpioEntry]:
    """Entries for everything under root, each directory before its contents, in a stable order."""
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        base = Path(dirpath)
        names = sorted(dirnames + filenames)
        for name in names:
            path = base / name
            rel = path.relative_to(root).as_posix()
            st = path.lstat()
            if stat.S_ISLNK(st.st_mode):
                yield CpioEntry(rel, stat.S_IFLNK | 0o777, data=os.readlink(path).encode())
            elif stat.S_ISDIR(st.st_mode):
                yield CpioEntry(rel, stat.S_IFDIR | stat.S_IMODE(st.st_mode))
            elif stat.S_ISREG(st.st_mode):
                yield CpioEntry(rel, stat.S_IFREG | stat.S_IMODE(st.st_mode), source=path)
            else:
                raise DemoBuildError(f"unexpected file type in initramfs tree: {rel}")


# Device nodes the kernel needs before /init mounts devtmpfs: without /dev/console, init starts with no
# stdin/stdout. Written straight into the archive so the build needs no mknod (root).
_DEVICE_NODES = (
    CpioEntry("dev/console", stat.S_IFCHR | 0o600, rdev=(5, 1)),
    CpioEntry("dev/null", stat.S_IFCHR | 0o666, rdev=(1, 3)),
)


# --------------------------------------------------------------------------- host facts


def _demo_files() -> dict[str, bytes]:
    folder = resources.files(__package__ or "vmkit.images").joinpath("demo_files")
    files = {name: folder.joinpath(name).read_bytes() for name in (*GUEST_FILES, *INSTALLER_FILES)}
    return files


def _host_inputs() -> dict[str, Path]:
    """Host files copied into the image (or whose code ends up in it): their digests are cache-key inputs.

    Read at call time (not a module constant) so tests can point the paths elsewhere.
    """
    return {
        "busybox": BUSYBOX,
        "qemu-ga": QEMU_GA,
        "syslinux": SYSLINUX,
        "extlinux": EXTLINUX,
        "mbr.bin": SYSLINUX_MBR,
        "ldlinux.c32": LDLINUX_C32,
        "isolinux.bin": ISOLINUX_BIN,
        "isohdpfx.bin": ISOHYBRID_MBR,
    }


def _host_digests() -> dict[str, str]:
    inputs = _host_inputs()
    missing = sorted(str(path) for path in inputs.values() if not path.is_file())
    if missing:
        raise DemoBuildError(
            f"missing host files: {', '.join(missing)} (Debian packages busybox-static, qemu-guest-agent, "
            "syslinux, syslinux-common, extlinux, isolinux; scripts/install-deps.sh installs them)"
        )
    return {name: _sha256_file(path) for name, path in inputs.items()}


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _atomic_write(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _apt_lists_stamp() -> str | None:
    # apt-get update renames new index files into this directory, which changes its mtime.
    try:
        st = APT_LISTS.stat()
    except OSError:
        return None
    return f"{st.st_ino}:{st.st_mtime_ns}"


def resolve_kernel_version(cache_dir: Path) -> str:
    """The kernel version linux-image-amd64 currently depends on.

    apt-cache takes ~0.6 s here (no pkgcache.bin), too slow for a cached build_demo call, so the answer
    is memoised in cache_dir and reused while apt's package lists are unchanged.
    """
    memo = cache_dir / "kernel-version.json"
    stamp = _apt_lists_stamp()
    if stamp is not None:
        try:
            data = json.loads(memo.read_text())
            if data["apt_lists"] == stamp and isinstance(data["version"], str):
                return data["version"]
        except (OSError, ValueError, KeyError, TypeError):
            pass
    version = parse_kernel_depends(proc.run(["apt-cache", "depends", KERNEL_META_PACKAGE]).stdout)
    if stamp is not None:
        _atomic_write(memo, json.dumps({"apt_lists": stamp, "version": version}).encode())
    return version


# --------------------------------------------------------------------------- build steps


def _fetch_kernel_deb(cache_dir: Path, version: str, work: Path) -> Path:
    debs = cache_dir / "debs"
    debs.mkdir(parents=True, exist_ok=True)
    package = f"linux-image-{version}"
    cached = sorted(debs.glob(f"{package}_*.deb"))
    if cached:
        return cached[-1]
    download = work / "download"
    download.mkdir()
    try:
        proc.run(["apt-get", "download", package], cwd=download, timeout_s=1800)
    except CommandFailed:
        # Package lists older than the archive name a revision the mirror no longer has: refresh them
        # once and retry. (If even the kernel ABI moved on, the next build resolves the new version.)
        for partial in download.iterdir():
            partial.unlink()
        proc.run(["apt-get", "update", "-q"], timeout_s=900)
        proc.run(["apt-get", "download", package], cwd=download, timeout_s=1800)
    got = sorted(download.glob(f"{package}_*.deb"))
    if len(got) != 1:
        raise DemoBuildError(f"apt-get download {package} produced {len(got)} .deb files")
    # Same filesystem (work is inside cache_dir): debs/ only ever holds complete downloads.
    dest = debs / got[0].name
    os.replace(got[0], dest)
    return dest


def _find_modules_dir(tree: Path, version: str) -> Path:
    for rel in (f"lib/modules/{version}", f"usr/lib/modules/{version}"):
        if (tree / rel / "kernel").is_dir():
            return tree / rel
    raise DemoBuildError(f"kernel package has no modules for {version}")


def _install_module(src: Path, dest_dir: Path) -> None:
    """Copy one module uncompressed: busybox modprobe cannot read compressed modules."""
    name = src.name
    if name.endswith(".ko"):
        shutil.copyfile(src, dest_dir / name)
    elif name.endswith(".ko.xz"):
        (dest_dir / name[:-3]).write_bytes(lzma.decompress(src.read_bytes()))
    elif name.endswith(".ko.gz"):
        (dest_dir / name[:-3]).write_bytes(gzip.decompress(src.read_bytes()))
    else:
        raise DemoBuildError(f"cannot decompress kernel module {name}")


def _install_modules(tree: Path, version: str, roots: Sequence[str], root: Path) -> list[str]:
    """Copy the modules roots and their dependencies into root and index them with depmod.

    Returns the roots that are modules (not built in): the ones to modprobe. Callable again on the same
    root to add modules; depmod then indexes all of them.
    """
    src_dir = _find_modules_dir(tree, version)
    index: dict[str, Path] = {}
    for path in (src_dir / "kernel").rglob("*.ko*"):
        name = module_name(path.name)
        if name is not None:
            index[name] = path

    def deps_of(name: str) -> list[str]:
        if name not in index:
            raise DemoBuildError(f"kernel package has no module {name}")
        out = proc.run(["modinfo", "-F", "depends", index[name]]).stdout
        return [d.strip().replace("-", "_") for d in out.strip().split(",") if d.strip()]

    # Other kernel builds may have some of these built in; those need no file and no modprobe.
    builtin_list = src_dir / "modules.builtin"
    builtin: set[str | None] = set()
    if builtin_list.is_file():
        builtin = {module_name(Path(line).name) for line in builtin_list.read_text().split()}
    wanted = [m for m in roots if m not in builtin]
    dest_root = root / "lib/modules" / version
    dest_root.mkdir(parents=True, exist_ok=True)
    for name in module_closure(wanted, deps_of):
        src = index[name]
        dest_dir = dest_root / src.parent.relative_to(src_dir)
        dest_dir.mkdir(parents=True, exist_ok=True)
        _install_module(src, dest_dir)
    # modules.builtin lets modprobe treat built-in drivers as present instead of failing.
    if builtin_list.is_file():
        shutil.copyfile(builtin_list, dest_root / "modules.builtin")
    proc.run(["depmod", "-b", root, version])
    if not (dest_root / "modules.dep").is_file():
        raise DemoBuildError("depmod wrote no modules.dep")
    return wanted


def _copy_host_file(src: Path, root: Path, mode: int | None = None) -> None:
    """Copy src (following symlinks) to the same absolute path inside root."""
    dest = root / src.relative_to("/")
    dest.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src, dest)
    os.chmod(dest, mode if mode is not None else stat.S_IMODE(src.stat().st_mode))


def _install_userland(root: Path, files: Mapping[str, bytes], modules: Sequence[str]) -> None:
    for d in ("proc", "sys", "dev", "run", "root", "mnt", "var/log", "var/lib", "etc/acpi"):
        (root / d).mkdir(parents=True, exist_ok=True)
    (root / "tmp").mkdir(mode=0o1777)
    os.chmod(root / "tmp", 0o1777)  # mkdir's mode is filtered by the umask
    (root / "var/run").symlink_to("/run")

    # busybox: the binary as /bin/busybox and every applet it has as a symlink to it.
    _copy_host_file(BUSYBOX, root, 0o755)
    for rel in proc.run([BUSYBOX, "--list-full"]).stdout.split():
        link = root / rel
        if not link.exists() and not link.is_symlink():
            link.parent.mkdir(parents=True, exist_ok=True)
            link.symlink_to("/bin/busybox")
    # The kernel runs /init; invoked under that name busybox runs its init applet.
    (root / "init").symlink_to("/bin/busybox")

    # qemu-ga and its shared libraries, each at the path ldd names (incl. /lib64/ld-linux-x86-64.so.2).
    _copy_host_file(QEMU_GA, root, 0o755)
    for lib in parse_ldd(proc.run(["ldd", QEMU_GA]).stdout):
        _copy_host_file(lib, root, 0o755)

    # Our files last: they win over busybox applet links of the same name.
    _install_files(root, files, GUEST_FILES)
    (root / "etc/vmkit-modules").write_text("".join(m + "\n" for m in modules))


def _install_files(root: Path, files: Mapping[str, bytes], layout: Mapping[str, tuple[str, int]]) -> None:
    for name, (rel, mode) in layout.items():
        dest = root / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        if dest.is_symlink():
            dest.unlink()
        dest.write_bytes(files[name])
        os.chmod(dest, mode)


def _pack_initramfs(root: Path, out: Path) -> None:
    # mtime=0 and fixed owners/timestamps in the archive keep identical inputs byte-identical. Level 6:
    # level 9 takes 3x as long here for 0.5 % less.
    with (
        out.open("wb") as raw,
        gzip.GzipFile(filename="", mode="wb", fileobj=raw, compresslevel=6, mtime=0) as gz,
    ):
        write_newc([*tree_entries(root), *_DEVICE_NODES], gz)


def _install_kernel(vmlinuz: Path, out: Path) -> dict[str, str]:
    """Put the kernel QEMU boots fastest into out; returns what was chosen, for image.json.

    That is the uncompressed ELF when it has a PVH entry (QEMU boots such an ELF directly and fails on
    one without); otherwise the bzImage as packaged.
    """
    elf = extract_vmlinux(vmlinuz.read_bytes())
    if elf is None:
        fallback = "no xz-compressed ELF kernel in the bzImage"
    else:
        entry = pvh_entry(elf)  # None also for an ELF this module cannot parse (and so cannot trim)
        if entry is not None:
            (out / VMLINUX).write_bytes(trim_elf(elf))
            return {"kernel_format": "elf-pvh", "pvh_entry": hex(entry)}
        fallback = "the uncompressed kernel has no Xen PVH entry note"
    shutil.copyfile(vmlinuz, out / VMLINUZ)
    return {"kernel_format": "bzimage", "pvh_fallback": fallback}


def fat_boot_partition(raw: Path, start_sector: int, sectors: int, label: str, disk_id: int, files: Path) -> None:
    """Format the partition at start_sector of the image file raw as FAT16 (mkfs.vfat --offset), copy the files of
    directory `files` into it (mtools' "file@@byte-offset" names a filesystem inside an image) and install
    syslinux there (its mtools installer): no loop device, no mount. -h (hidden sectors) = the partition's
    offset: syslinux's boot sector uses it to find ldlinux.sys."""
    proc.run(
        [
            "mkfs.vfat", "-F", "16", "-n", label, "-i", f"{disk_id:08x}",
            "--offset", str(start_sector), "-h", str(start_sector), raw, str(sectors * SECTOR_SIZE // 1024),
        ]
    )  # fmt: skip
    offset = start_sector * SECTOR_SIZE
    proc.run(["mcopy", "-i", f"{raw}@@{offset}", *sorted(files.iterdir()), "::/"], env=MTOOLS_ENV)
    proc.run([SYSLINUX, "--install", "--offset", str(offset), raw], env=MTOOLS_ENV)


def _build_boot_disk(
    work: Path, vmlinuz: Path, initrd: Path, boot_cfg: str, disk_id: int, out: Path
) -> dict[str, object]:
    """boot.qcow2: MBR (syslinux mbr.bin) + one active FAT16 partition with syslinux, kernel, initrd, config.

    Everything works on a plain image file: the partition table is written here, mkfs.vfat --offset
    formats the partition inside the file, mtools copies files into it and syslinux's mtools installer
    writes its boot sector and ldlinux.sys there. No loop device, no mount.
    """
    raw = work / "boot.raw"
    part_sectors = BOOT_DISK_BYTES // SECTOR_SIZE - BOOT_PARTITION_START
    partition = MbrPartition(BOOT_PARTITION_START, part_sectors, PARTITION_TYPE_FAT16_LBA, bootable=True)
    with raw.open("wb") as f:
        f.truncate(BOOT_DISK_BYTES)  # sparse; qemu-img convert leaves the unwritten zeros out of the qcow2
        f.write(mbr_sector(SYSLINUX_MBR.read_bytes(), [partition], disk_id))
    staged = work / "bootfs"
    staged.mkdir()
    shutil.copyfile(vmlinuz, staged / VMLINUZ)
    shutil.copyfile(initrd, staged / INITRD)
    (staged / "syslinux.cfg").write_text(boot_cfg)
    fat_boot_partition(raw, BOOT_PARTITION_START, part_sectors, FAT_LABEL, disk_id, staged)
    proc.run(["qemu-img", "convert", "-q", "-f", "raw", "-O", "qcow2", raw, out])
    raw.unlink()
    return {
        "size": BOOT_DISK_BYTES,
        "partition_start_sector": BOOT_PARTITION_START,
        "partition_sectors": part_sectors,
        "filesystem": "vfat (FAT16)",
        "boot_loader": "syslinux",
    }


def _add_installer(
    root: Path,
    tree: Path,
    version: str,
    config_text: str,
    files: Mapping[str, bytes],
    payload: Mapping[str, Path | bytes],
) -> list[str]:
    """Turn the packed demo root into the installer's: FAT drivers, extlinux, the script, the payload.

    Returns the extra modules the install script loads.
    """
    modules = _install_modules(tree, version, fat_modules(config_text), root)
    (root / "etc/vmkit-install-modules").write_text("".join(m + "\n" for m in modules))
    _copy_host_file(EXTLINUX, root, 0o755)
    for lib in parse_ldd(proc.run(["ldd", EXTLINUX]).stdout):
        _copy_host_file(lib, root, 0o755)
    _install_files(root, files, INSTALLER_FILES)
    dest = root / INSTALL_PAYLOAD
    dest.mkdir(parents=True)
    for name, content in payload.items():
        if isinstance(content, Path):
            shutil.copyfile(content, dest / name)
        else:
            (dest / name).write_bytes(content)
        os.chmod(dest / name, 0o644)
    return modules


def _build_installer_iso(work: Path, vmlinuz: Path, install_initrd: Path, out: Path) -> None:
    """installer.iso: isolinux (El Torito, no emulation; isohybrid so it boots as a disk too)."""
    iso = work / "iso"
    (iso / "isolinux").mkdir(parents=True)
    # Copies, not links: xorriso writes the boot info table into isolinux.bin.
    shutil.copyfile(ISOLINUX_BIN, iso / "isolinux/isolinux.bin")
    shutil.copyfile(LDLINUX_C32, iso / "isolinux/ldlinux.c32")  # isolinux >= 5 loads its core from it
    (iso / "isolinux/isolinux.cfg").write_text(syslinux_config("install", "/vmlinuz", "/install.gz", INSTALLER_CMDLINE))
    shutil.copyfile(vmlinuz, iso / VMLINUZ)
    os.replace(install_initrd, iso / "install.gz")
    proc.run(
        [
            "xorriso", "-as", "mkisofs", "-quiet", "-o", out, "-V", "VMKIT_DEMO_INSTALL", "-R",
            "-isohybrid-mbr", ISOHYBRID_MBR,
            "-b", "isolinux/isolinux.bin", "-c", "isolinux/boot.cat",
            "-no-emul-boot", "-boot-load-size", "4", "-boot-info-table",
            iso,
        ],
        timeout_s=600,
    )  # fmt: skip


def _image_from_dir(path: Path, version: str) -> DemoImage:
    # A finished image holds exactly one of the two kernels.
    kernel = path / VMLINUX
    if not kernel.is_file():
        kernel = path / VMLINUZ
    return DemoImage(
        kernel=kernel,
        initrd=path / INITRD,
        disk=path / DATA_DISK,
        cmdline=CMDLINE,
        kernel_version=version,
        boot_disk=path / BOOT_DISK,
        installer_iso=path / INSTALLER_ISO,
    )


def _is_complete(image: DemoImage) -> bool:
    return all(p.is_file() for p in (image.kernel, image.initrd, image.disk, image.boot_disk, image.installer_iso))


def _build(cache_dir: Path, version: str, key: str, files: Mapping[str, bytes], final: Path, report: Progress) -> None:
    # Leftovers of crashed builds; we hold the build lock, so no live build owns them.
    for stale in cache_dir.glob(_BUILD_PREFIX + "*"):
        shutil.rmtree(stale, ignore_errors=True)
    work = Path(tempfile.mkdtemp(prefix=_BUILD_PREFIX, dir=cache_dir))
    try:
        report(0.05, f"fetching linux-image-{version}")
        deb = _fetch_kernel_deb(cache_dir, version, work)

        report(0.30, f"unpacking {deb.name}")
        tree = work / "kernel"
        proc.run(["dpkg-deb", "-x", deb, tree])
        vmlinuz = tree / "boot" / f"vmlinuz-{version}"
        config = tree / "boot" / f"config-{version}"
        if not vmlinuz.is_file() or not config.is_file():
            raise DemoBuildError(f"{deb.name} has no boot/vmlinuz-{version} or boot/config-{version}")

        report(0.40, "collecting kernel modules")
        config_text = config.read_text()
        root = work / "root"
        root.mkdir()
        modules = _install_modules(tree, version, [*BASE_MODULES, *power_button_modules(config_text)], root)

        report(0.45, "installing busybox and qemu-ga")
        _install_userland(root, files, modules)

        report(0.50, "packing initramfs")
        out = work / "out"
        out.mkdir()
        _pack_initramfs(root, out / INITRD)

        report(0.60, "extracting the uncompressed kernel")
        kernel_meta = _install_kernel(vmlinuz, out)

        report(0.65, "creating base disk")
        proc.run(["qemu-img", "create", "-q", "-f", "qcow2", out / DATA_DISK, DISK_SIZE])

        report(0.70, "creating the bootable disk")
        # The installed disk gets the very same boot files and config as boot.qcow2.
        boot_cfg = syslinux_config("demo", "/" + VMLINUZ, "/" + INITRD, CMDLINE)
        disk_id = int(key[:8], 16)  # the MBR disk signature: stable per recipe
        boot_meta = _build_boot_disk(work, vmlinuz, out / INITRD, boot_cfg, disk_id, out / BOOT_DISK)

        report(0.80, "packing the installer initramfs")
        # The demo initramfs is packed already, so the installer's additions do not reach it.
        payload: dict[str, Path | bytes] = {
            VMLINUZ: vmlinuz,
            INITRD: out / INITRD,
            "syslinux.cfg": boot_cfg.encode(),
            "mbr.bin": SYSLINUX_MBR.read_bytes(),
        }
        install_modules = _add_installer(root, tree, version, config_text, files, payload)
        install_initrd = work / "install.gz"
        _pack_initramfs(root, install_initrd)

        report(0.90, "creating the installer ISO")
        _build_installer_iso(work, vmlinuz, install_initrd, out / INSTALLER_ISO)
        meta = {
            "kernel_version": version,
            "cmdline": CMDLINE,
            "key": key,
            "kernel_deb": deb.name,
            "modules": modules,
            "recipe": RECIPE_VERSION,
            **kernel_meta,
            "boot_disk": BOOT_DISK,
            "boot_disk_layout": boot_meta,
            "installer_iso": INSTALLER_ISO,
            "installer_cmdline": INSTALLER_CMDLINE,
            "installer_modules": install_modules,
        }
        (out / "image.json").write_text(json.dumps(meta, indent=2) + "\n")
        # World-readable whatever the builder's umask (the daemon's is 077), like the Debian packages they come
        # from: a QEMU running as another user may open them (the daemon copies them into pools anyway).
        os.chmod(out, 0o755)
        for f in out.iterdir():
            os.chmod(f, 0o644)
        if final.exists():
            # Only possible if someone removed files from a finished image; never overwrite it blindly,
            # VMs may still use its disk as a backing file.
            raise DemoBuildError(f"{final} exists but is incomplete; remove it to rebuild")
        # The commit point: the image directory appears complete or not at all.
        os.rename(out, final)
    finally:
        shutil.rmtree(work, ignore_errors=True)


# --------------------------------------------------------------------------- public entry point


def build_demo(cache_dir: Path, *, progress: Callable[[float, str], None] | None = None) -> DemoImage:
    """Build (or return the cached) demo guest under cache_dir. progress(fraction 0..1, message)."""

    def report(fraction: float, message: str) -> None:
        if progress is not None:
            progress(fraction, message)

    # Absolute: the paths end up in QEMU argv and as backing-file names inside overlays.
    cache_dir = Path(cache_dir).absolute()
    cache_dir.mkdir(parents=True, exist_ok=True)
    files = _demo_files()
    key = cache_key(files, _host_digests())
    version = resolve_kernel_version(cache_dir)
    final = cache_dir / f"demo-{version}-{key[:16]}"
    image = _image_from_dir(final, version)
    if _is_complete(image):
        report(1.0, "demo image cached")
        return image

    # One builder at a time per cache_dir; a waiter usually finds the image done once it gets the lock.
    with (cache_dir / ".demo.lock").open("a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not _is_complete(_image_from_dir(final, version)):
            report(0.0, f"building demo image for kernel {version}")
            _build(cache_dir, version, key, files, final, report)
    report(1.0, "demo image ready")
    # Only now is it known which kernel file the image has.
    return _image_from_dir(final, version)
