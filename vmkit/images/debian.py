"""Build a Debian 12 (bookworm) cloud image from Debian packages: debootstrap, a few config files, no mount.

The recipe (release, disk size, extra packages, mirror) is pure data with a stable hash; the files written into
the guest come from pure builders (tested with golden files) and the static files in debian_files/. A build:

1. debootstrap --variant=minbase with BASE_PACKAGES (+ the recipe's) from the host's Debian mirror, inside a
   private mount and PID namespace (`unshare`): the proc/sys mounts it makes never reach the host, and no
   process it starts outlives it. INITRD=No skips the kernel package's 15 MB initramfs, made again below.
2. configuring: systemd-networkd + resolved with DHCP on any NIC, cloud-init for NoCloud seeds, qemu-guest-agent
   (started by udev when the org.qemu.guest_agent.0 port appears), no SSH host keys, an empty machine-id, no
   root password, timers that cost boot time masked, apt lists and documentation removed.
3. initramfs: initramfs-tools with MODULES=list (INITRAMFS_MODULES) in a chroot: ~6 MB instead of ~15 MB.
4. filesystem: one raw disk image with an MBR (syslinux's boot code), an active FAT16 partition holding
   syslinux, the kernel and the initramfs, and the ext4 root made by `mkfs.ext4 -d` straight into its partition
   (`-E offset`): no loop device, no mount.
5. qcow2: `qemu-img convert -c` (compressed, ~150 MB), hashed (sha256).

Layout of a finished build, committed by one atomic rename so a crash never leaves half an image:

    cache_dir/debian-debs/*.deb                       debootstrap's package cache, kept for rebuilds
    cache_dir/debian-12-<key16>/{disk.qcow2,vmlinuz,initrd.img,image.json}

The kernel and initramfs beside the disk are the ones in it: `-kernel vmlinuz -initrd initrd.img -append CMDLINE`
boots the disk directly, and without them the disk boots through its own boot loader with the same command line.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from importlib import resources
from pathlib import Path

from vmkit.errors import InvalidInput, NotFound, VmkitError
from vmkit.images.demo import SYSLINUX_MBR, MbrPartition, fat_boot_partition, mbr_sector, syslinux_config
from vmkit.util import proc

# Bump whenever the build changes in a way the recipe and the guest files do not capture.
BUILD_VERSION = 1

# Image name -> Debian suite.
RELEASES: Mapping[str, str] = {"debian-12": "bookworm"}
DEFAULT_MIRROR = "http://deb.debian.org/debian"
DEFAULT_SECURITY_MIRROR = "http://deb.debian.org/debian-security"

MIB = 1 << 20
GIB = 1 << 30
DEFAULT_SIZE_BYTES = 4 * GIB
MIN_SIZE_BYTES = 1 * GIB  # the root takes ~600 MB
MAX_SIZE_BYTES = 1 << 40  # 1 TiB: a virtual size (the qcow2 stays small); MBR tops out at 2 TiB
# Debian policy 5.6.1: at least two characters, lower case letters, digits, + - and .; a letter or digit first.
PACKAGE_PATTERN = r"^[a-z0-9][a-z0-9+.-]+$"
_PACKAGE_RE = re.compile(PACKAGE_PATTERN)
MAX_PACKAGES = 100
MAX_PACKAGE_CHARS = 100

# The system itself. python3-cffi-backend must be named: debootstrap does not resolve the virtual package
# python3-cffi-backend-api-* that cloud-init's python3-cryptography needs. systemd-resolved is its own package in
# bookworm (DNS servers from DHCP reach /etc/resolv.conf through it); cloud-guest-utils has growpart, which
# cloud-init runs to grow the root partition into a disk made larger than the image.
BASE_PACKAGES = (
    "systemd-sysv",
    "udev",
    "dbus",
    "kmod",
    "linux-image-cloud-amd64",
    "cloud-init",
    "python3-cffi-backend",
    "qemu-guest-agent",
    "openssh-server",
    "netbase",
    "iproute2",
    "sudo",
    "systemd-resolved",
    "cloud-guest-utils",
)

ROOT_LABEL = "rootfs"
HOSTNAME = "debian"  # until cloud-init sets the seed's
CMDLINE = f"console=ttyS0 root=LABEL={ROOT_LABEL} ro quiet"
# Loaded by the initramfs (MODULES=list). The cloud kernel builds virtio, the ISO9660 of a cidata seed and the
# agent's virtio-serial port as modules (ext4 and crc32c are built in: listed for other kernels, skipped here).
# virtio_net is here so that a NIC exists before systemd-networkd-wait-online's condition is checked.
INITRAMFS_MODULES = (
    "virtio_pci",
    "virtio_blk",
    "virtio_net",
    "virtio_console",
    "ext4",
    "crc32c_generic",
    "isofs",
)
# Units that cost boot time or do periodic work a short-lived VM does not want.
MASKED_UNITS = (
    "apt-daily.timer",
    "apt-daily-upgrade.timer",
    "dpkg-db-backup.timer",
    "e2scrub_all.timer",
    "e2scrub_reap.service",
    "fstrim.timer",
)
ENABLED_UNITS = ("systemd-networkd.service", "systemd-resolved.service", "vmkit-ssh-hostkey.service")
# The kernel a VM boots is the image's (beside it for direct boot, in the boot partition otherwise), whatever
# apt does inside: a newer kernel package there would never boot, and an autoremove of this one would take the
# modules the image's kernel loads. So apt keeps it (`apt-mark unhold` to take upgrades anyway).
HELD_PACKAGES = ("linux-image-cloud-amd64",)

# debian_files/<name> -> (path in the guest, mode).
STATIC_FILES: Mapping[str, tuple[str, int]] = {
    "99-vmkit-dhcp.network": ("etc/systemd/network/99-vmkit-dhcp.network", 0o644),
    "wait-online.conf": ("etc/systemd/system/systemd-networkd-wait-online.service.d/vmkit.conf", 0o644),
    "90_vmkit.cfg": ("etc/cloud/cloud.cfg.d/90_vmkit.cfg", 0o644),
    "sshd-vmkit.conf": ("etc/ssh/sshd_config.d/vmkit.conf", 0o644),
    "vmkit-ssh-hostkey.service": ("etc/systemd/system/vmkit-ssh-hostkey.service", 0o644),
    "dpkg-excludes": ("etc/dpkg/dpkg.cfg.d/vmkit-excludes", 0o644),
}

# The disk: MBR, a FAT16 boot partition from 1 MiB (syslinux, kernel, initramfs), the ext4 root after it up to
# the end (last, so cloud-init's growpart can grow it).
SECTOR_SIZE = 512
BOOT_START_SECTOR = 2048
BOOT_SECTORS = 64 * MIB // SECTOR_SIZE
ROOT_START_SECTOR = BOOT_START_SECTOR + BOOT_SECTORS
PARTITION_TYPE_FAT16_LBA = 0x0E
PARTITION_TYPE_LINUX = 0x83
BOOT_LABEL = "VMKITBOOT"

# File names in a build directory.
DISK = "disk.qcow2"
KERNEL = "vmlinuz"
INITRD = "initrd.img"
META = "image.json"

DEBOOTSTRAP_TIMEOUT_S = 1800
CHROOT_TIMEOUT_S = 600
# debootstrap prints ~900 "I: ..." lines for the base set (retrieving, validating, extracting, unpacking and
# configuring each package); progress through it is the share of those seen.
DEBOOTSTRAP_LINES = 900
DEBOOTSTRAP_LINES_PER_PACKAGE = 5
_CHROOT_PATH = "/usr/sbin:/usr/bin:/sbin:/bin"
_BUILD_PREFIX = ".debian-build-"

Progress = Callable[[float, str], None]


class DebianBuildError(VmkitError):
    """The image cannot be built (a step failed); what failed is in the message."""


# --------------------------------------------------------------------------- the recipe (pure)


@dataclass(frozen=True)
class Recipe:
    """Everything a build depends on besides the code and the guest files (which the key also covers)."""

    release: str  # an image name of RELEASES, e.g. "debian-12"
    suite: str  # its Debian suite, e.g. "bookworm"
    size_bytes: int  # the disk's virtual size
    packages: tuple[str, ...]  # asked for on top of BASE_PACKAGES: sorted, no duplicates, none of the base
    mirror: str  # where debootstrap fetches from, and the guest's apt source
    security_mirror: str  # the guest's apt source for <suite>-security

    def to_dict(self) -> dict[str, object]:
        return {**asdict(self), "packages": list(self.packages)}

    def key(self) -> str:
        """Hex sha256 naming this recipe's build: the recipe, BUILD_VERSION, the base system and every file put
        into the guest (the boot loader's config included)."""
        h = hashlib.sha256()
        inputs = {
            "build": BUILD_VERSION,
            "recipe": self.to_dict(),
            "base_packages": BASE_PACKAGES,
            "enabled": ENABLED_UNITS,
            "masked": MASKED_UNITS,
            "held": HELD_PACKAGES,
            "syslinux.cfg": boot_config(),
        }
        h.update(json.dumps(inputs, sort_keys=True).encode())
        for path, (content, mode) in sorted(guest_files(self).items()):
            # Length-prefixed so that no two different file sets serialise to the same bytes.
            h.update(f"\0{path}:{mode:o}:{len(content)}:".encode())
            h.update(content)
        return h.hexdigest()


def known_releases() -> str:
    return ", ".join(sorted(RELEASES))


def check_release(release: str) -> str:
    """The Debian suite of an image name (404 naming the known ones when there is none)."""
    suite = RELEASES.get(release)
    if suite is None:
        raise NotFound(f"no image recipe named {release[:80]!r}: known ones are {known_releases()}")
    return suite


def check_size(size_bytes: int) -> int:
    if size_bytes < MIN_SIZE_BYTES:
        raise InvalidInput(f"size {size_bytes} bytes is too small: a Debian image needs at least 1 GiB")
    if size_bytes > MAX_SIZE_BYTES:
        raise InvalidInput(f"size {size_bytes} bytes is too large: at most 1 TiB")
    if size_bytes % MIB:
        raise InvalidInput(f"size {size_bytes} bytes is not a whole number of MiB")
    return size_bytes


def check_packages(packages: Sequence[str]) -> tuple[str, ...]:
    """The extra packages as a recipe holds them: checked, sorted, without duplicates and base packages."""
    if len(packages) > MAX_PACKAGES:
        raise InvalidInput(f"{len(packages)} packages: at most {MAX_PACKAGES} may be added")
    for name in packages:
        if len(name) > MAX_PACKAGE_CHARS or not _PACKAGE_RE.fullmatch(name):
            raise InvalidInput(
                f"invalid package name {name[:80]!r}: Debian package names are at least two characters from "
                "a-z 0-9 + - . starting with a letter or digit"
            )
    return tuple(sorted(set(packages) - set(BASE_PACKAGES)))


def make_recipe(
    release: str,
    *,
    size_bytes: int = DEFAULT_SIZE_BYTES,
    packages: Sequence[str] = (),
    mirror: str = DEFAULT_MIRROR,
    security_mirror: str = DEFAULT_SECURITY_MIRROR,
) -> Recipe:
    """A checked recipe: NotFound for an unknown release, InvalidInput for a bad size or package name."""
    return Recipe(
        release=release,
        suite=check_release(release),
        size_bytes=check_size(size_bytes),
        packages=check_packages(packages),
        mirror=mirror,
        security_mirror=security_mirror,
    )


# --------------------------------------------------------------------------- the host's mirror (pure parsers)


def _uri_ok(uri: str) -> bool:
    return uri.startswith(("http://", "https://")) and not any(c.isspace() for c in uri)


def _mirror_for(entries: Sequence[tuple[list[str], list[str]]], suite: str) -> str | None:
    for uris, suites in entries:
        if suite in suites:
            for uri in uris:
                if _uri_ok(uri):
                    return uri.rstrip("/")
    return None


def deb822_entries(text: str) -> list[tuple[list[str], list[str]]]:
    """(URIs, Suites) of each enabled `Types: deb` stanza of a Deb822 .sources file."""
    entries = []
    for stanza in re.split(r"\n\s*\n", text):
        fields: dict[str, str] = {}
        current = None
        for line in stanza.splitlines():
            if line.startswith("#") or not line.strip():
                continue
            if line[0].isspace() and current is not None:  # a continuation line
                fields[current] += " " + line.strip()
                continue
            name, sep, value = line.partition(":")
            if not sep:
                continue
            current = name.strip().lower()
            fields[current] = value.strip()
        if "deb" not in fields.get("types", "").split() or fields.get("enabled", "yes").lower() == "no":
            continue
        entries.append((fields.get("uris", "").split(), fields.get("suites", "").split()))
    return entries


def one_line_entries(text: str) -> list[tuple[list[str], list[str]]]:
    """(URIs, Suites) of each `deb URI SUITE COMPONENT...` line of a sources.list (options in [...] skipped)."""
    entries = []
    for raw in text.splitlines():
        line = raw.split("#", 1)[0].strip()
        line = re.sub(r"\[[^\]]*\]", " ", line)
        words = line.split()
        if len(words) >= 3 and words[0] == "deb":
            entries.append(([words[1]], [words[2]]))
    return entries


def parse_mirror(deb822_texts: Sequence[str], one_line_texts: Sequence[str], suite: str) -> str | None:
    """The first http(s) URI that serves `suite` (Deb822 files first, then sources.list lines), or None."""
    entries = [e for t in deb822_texts for e in deb822_entries(t)]
    entries += [e for t in one_line_texts for e in one_line_entries(t)]
    return _mirror_for(entries, suite)


def host_mirrors(suite: str, apt_dir: Path = Path("/etc/apt")) -> tuple[str, str]:
    """(mirror, security mirror) the host's apt uses for suite, each falling back to deb.debian.org."""
    parts = apt_dir / "sources.list.d"
    deb822 = [p.read_text(errors="replace") for p in sorted(parts.glob("*.sources"))]
    lists = [
        p.read_text(errors="replace") for p in [apt_dir / "sources.list", *sorted(parts.glob("*.list"))] if p.is_file()
    ]
    mirror = parse_mirror(deb822, lists, suite) or DEFAULT_MIRROR
    security = parse_mirror(deb822, lists, f"{suite}-security") or DEFAULT_SECURITY_MIRROR
    return mirror, security


# --------------------------------------------------------------------------- files written into the guest (pure)


def apt_sources(recipe: Recipe) -> str:
    return (
        "# Written by vmkit (vmkit/images/debian.py). Package lists are not in the image: apt-get update first.\n"
        "Types: deb\n"
        f"URIs: {recipe.mirror}\n"
        f"Suites: {recipe.suite} {recipe.suite}-updates\n"
        "Components: main\n"
        "Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg\n"
        "\n"
        "Types: deb\n"
        f"URIs: {recipe.security_mirror}\n"
        f"Suites: {recipe.suite}-security\n"
        "Components: main\n"
        "Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg\n"
    )


def fstab() -> str:
    return (
        "# Written by vmkit (vmkit/images/debian.py). The boot partition (syslinux, first partition) is not mounted.\n"
        f"LABEL={ROOT_LABEL} / ext4 defaults,errors=remount-ro 0 1\n"
    )


def hosts(hostname: str = HOSTNAME) -> str:
    # cloud-init (manage_etc_hosts) rewrites this from a seed's host name.
    return (
        f"127.0.0.1\tlocalhost\n127.0.1.1\t{hostname}\n"
        "::1\t\tlocalhost ip6-localhost ip6-loopback\nff02::1\t\tip6-allnodes\nff02::2\t\tip6-allrouters\n"
    )


def initramfs_conf() -> str:
    return "# Written by vmkit (vmkit/images/debian.py): only the modules listed in ../modules.\nMODULES=list\n"


def initramfs_modules() -> str:
    return "# Written by vmkit (vmkit/images/debian.py): loaded by the initramfs.\n" + "".join(
        m + "\n" for m in INITRAMFS_MODULES
    )


def boot_config() -> str:
    """syslinux.cfg of the boot partition: the same kernel, initramfs and command line as direct kernel boot."""
    return syslinux_config("debian", "/" + KERNEL, "/" + INITRD, CMDLINE)


def static_files() -> dict[str, bytes]:
    folder = resources.files(__package__ or "vmkit.images").joinpath("debian_files")
    return {name: folder.joinpath(name).read_bytes() for name in STATIC_FILES}


def guest_files(recipe: Recipe) -> dict[str, tuple[bytes, int]]:
    """Every file vmkit writes into the root: path (relative) -> (content, mode)."""
    static = static_files()
    files = {path: (static[name], mode) for name, (path, mode) in STATIC_FILES.items()}
    for path, text in (
        ("etc/apt/sources.list.d/debian.sources", apt_sources(recipe)),
        ("etc/fstab", fstab()),
        ("etc/hostname", HOSTNAME + "\n"),
        ("etc/hosts", hosts()),
        ("etc/initramfs-tools/conf.d/vmkit.conf", initramfs_conf()),
        ("etc/initramfs-tools/modules", initramfs_modules()),
    ):
        files[path] = (text.encode(), 0o644)
    files["etc/machine-id"] = (b"", 0o444)  # empty: systemd makes one at each VM's first boot
    return files


def render_guest_files(recipe: Recipe) -> str:
    """All guest files as one text (for golden files and review)."""
    parts = []
    for path, (content, mode) in sorted(guest_files(recipe).items()):
        parts.append(f"==> /{path} ({mode:04o}) <==\n{content.decode()}")
    parts.append(f"==> boot partition: /syslinux.cfg <==\n{boot_config()}")
    return "\n".join(parts)


# --------------------------------------------------------------------------- the build


@dataclass(frozen=True)
class DebianImage:
    disk: Path  # compressed qcow2: MBR + FAT boot partition (syslinux) + ext4 root labelled rootfs
    kernel: Path  # the disk's kernel (bzImage), for direct kernel boot
    initrd: Path  # the disk's initramfs
    cmdline: str
    kernel_version: str  # e.g. "6.1.0-50-cloud-amd64"
    sha256: str  # of disk
    recipe: Recipe
    key: str  # recipe.key()
    cached: bool  # found built, not built by this call


def _in_namespace(argv: Sequence[str | os.PathLike[str]], proc_at: Path | None = None) -> list[str]:
    """argv run in a private mount namespace and a PID namespace of its own.

    Mounts made inside (debootstrap's proc and sys, our /proc of a chroot) vanish with the namespace and never
    propagate to the host; --kill-child ends every process left in the PID namespace when the command ends, or
    when unshare itself is killed (a timeout).
    """
    mount_proc = f"--mount-proc={proc_at}" if proc_at is not None else "--mount-proc"
    return [
        "unshare", "--mount", "--propagation", "private", "--pid", "--fork", "--kill-child", mount_proc,
        *(os.fspath(a) for a in argv),
    ]  # fmt: skip


def _chroot(root: Path, *argv: str, timeout_s: float = CHROOT_TIMEOUT_S) -> proc.Result:
    env = {"PATH": _CHROOT_PATH, "LC_ALL": "C.UTF-8", "DEBIAN_FRONTEND": "noninteractive"}
    return proc.run(_in_namespace(["chroot", root, *argv], proc_at=root / "proc"), env=env, timeout_s=timeout_s)


def _debootstrap(recipe: Recipe, root: Path, debs: Path, report: Progress, start: float, end: float) -> None:
    packages = ",".join([*BASE_PACKAGES, *recipe.packages])
    expected = DEBOOTSTRAP_LINES + DEBOOTSTRAP_LINES_PER_PACKAGE * len(recipe.packages)
    seen = 0

    def on_output(line: str) -> None:
        nonlocal seen
        if line.startswith("I: "):
            seen += 1
            fraction = start + (end - start) * min(seen / expected, 0.99)
            report(fraction, f"debootstrap: {line[3:].strip()[:80]}")

    argv = _in_namespace(
        [
            "debootstrap", "--variant=minbase", f"--include={packages}", "--components=main",
            f"--cache-dir={debs}", recipe.suite, root, recipe.mirror,
        ]
    )  # fmt: skip
    # INITRD=No: the kernel's postinst makes no initramfs (MODULES=most, 15 MB); ours is made once, later.
    env = {"INITRD": "No", "LC_ALL": "C.UTF-8", "DEBIAN_FRONTEND": "noninteractive"}
    try:
        proc.run_streaming(argv, on_output=on_output, timeout_s=DEBOOTSTRAP_TIMEOUT_S, env=env, merge_stderr=True)
    except VmkitError as e:
        log = root / "debootstrap" / "debootstrap.log"
        tail = log.read_text(errors="replace").strip().splitlines()[-5:] if log.is_file() else []
        raise DebianBuildError(f"debootstrap failed: {e.message}" + "".join("\n  " + t for t in tail)) from None


def _write_files(root: Path, files: Mapping[str, tuple[bytes, int]]) -> None:
    for rel, (content, mode) in files.items():
        dest = root / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        if dest.is_symlink() or dest.exists():
            dest.unlink()
        dest.write_bytes(content)
        os.chmod(dest, mode)


def _remove_contents(directory: Path, keep: Callable[[Path], bool] = lambda p: False) -> None:
    if not directory.is_dir():
        return
    for child in directory.iterdir():
        if keep(child):
            continue
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child)
        else:
            child.unlink()


def _trim(root: Path) -> None:
    """What a VM does not need from the image, or must not share with other VMs."""
    for key in (root / "etc/ssh").glob("ssh_host_*"):
        key.unlink()  # each VM makes its own at first boot
    (root / "var/lib/dbus/machine-id").unlink(missing_ok=True)  # systemd-tmpfiles links it to /etc/machine-id
    _remove_contents(root / "var/lib/apt/lists", keep=lambda p: p.name in ("partial", "lock"))
    _remove_contents(root / "var/cache/apt", keep=lambda p: p.name == "archives")
    _remove_contents(root / "var/cache/apt/archives", keep=lambda p: p.name in ("partial", "lock"))
    _remove_contents(root / "var/log", keep=lambda p: p.is_dir())  # directories packages made stay
    shutil.rmtree(root / "debootstrap", ignore_errors=True)
    # What dpkg-excludes keeps out of later installs; copyright notices stay.
    for doc in (root / "usr/share/doc").glob("*"):
        if doc.is_dir() and not doc.is_symlink():
            _remove_contents(doc, keep=lambda p: p.name == "copyright")
    _remove_contents(root / "usr/share/man")
    _remove_contents(root / "usr/share/info")
    _remove_contents(root / "usr/share/locale", keep=lambda p: p.name == "locale.alias")


def _configure(recipe: Recipe, root: Path) -> None:
    (root / "etc/apt/sources.list").unlink(missing_ok=True)  # debootstrap's; debian.sources replaces it
    resolv = root / "etc/resolv.conf"  # debootstrap copies the host's; resolved's stub is the guest's
    if not resolv.is_symlink():
        resolv.unlink(missing_ok=True)
        resolv.symlink_to("../run/systemd/resolve/stub-resolv.conf")
    _write_files(root, guest_files(recipe))
    _chroot(root, "systemctl", "enable", *ENABLED_UNITS)
    _chroot(root, "systemctl", "mask", *MASKED_UNITS)
    _chroot(root, "apt-mark", "hold", *HELD_PACKAGES)
    # No root password (debootstrap leaves root locked with "*"; make sure): log in with a key through a seed.
    _chroot(root, "passwd", "--lock", "root")
    _trim(root)


def _kernel_version(root: Path) -> str:
    found = sorted(p.name.removeprefix("vmlinuz-") for p in (root / "boot").glob("vmlinuz-*"))
    if len(found) != 1:
        raise DebianBuildError(f"expected one kernel in /boot, found {found or 'none'}")
    return found[0]


def _make_initramfs(root: Path, version: str) -> None:
    mode = "-u" if (root / "boot" / f"initrd.img-{version}").exists() else "-c"
    _chroot(root, "update-initramfs", mode, "-k", version)


def _make_disk(work: Path, root: Path, recipe: Recipe, version: str, key: str) -> Path:
    """The raw disk: MBR, FAT16 boot partition (syslinux + kernel + initramfs), ext4 root. Sparse throughout."""
    raw = work / "disk.raw"
    total_sectors = recipe.size_bytes // SECTOR_SIZE
    root_sectors = total_sectors - ROOT_START_SECTOR
    boot = MbrPartition(BOOT_START_SECTOR, BOOT_SECTORS, PARTITION_TYPE_FAT16_LBA, bootable=True)
    rootp = MbrPartition(ROOT_START_SECTOR, root_sectors, PARTITION_TYPE_LINUX)
    disk_id = int(key[:8], 16)  # the MBR disk signature: stable per recipe
    with raw.open("wb") as f:
        f.truncate(recipe.size_bytes)
        f.write(mbr_sector(SYSLINUX_MBR.read_bytes(), [boot, rootp], disk_id))
    # The root straight into its partition: mke2fs writes at the offset, -d copies the tree in, and the blocks it
    # zeroes stay holes (it punches them in a regular file), so the raw file stays as small as the data.
    proc.run(
        [
            "mkfs.ext4", "-q", "-F", "-L", ROOT_LABEL, "-d", root,
            "-E", f"offset={ROOT_START_SECTOR * SECTOR_SIZE}", raw, f"{root_sectors * SECTOR_SIZE // 1024}k",
        ],
        timeout_s=1200,
    )  # fmt: skip
    # The boot partition, as the demo's boot disk.
    staged = work / "bootfs"
    staged.mkdir()
    shutil.copyfile(root / "boot" / f"vmlinuz-{version}", staged / KERNEL)
    shutil.copyfile(root / "boot" / f"initrd.img-{version}", staged / INITRD)
    (staged / "syslinux.cfg").write_text(boot_config())
    fat_boot_partition(raw, BOOT_START_SECTOR, BOOT_SECTORS, BOOT_LABEL, disk_id, staged)
    return raw


def _convert(raw: Path, out: Path, report: Progress, start: float, end: float) -> None:
    last = -1

    def on_output(piece: str) -> None:
        nonlocal last
        m = re.search(r"\((\d+)(?:\.\d+)?/100%\)", piece)
        if m and int(m.group(1)) > last:  # qemu-img redraws every 0.01 %: one report per percent is plenty
            last = int(m.group(1))
            report(start + (end - start) * last / 100, f"qcow2: compressing ({last} %)")

    proc.run_streaming(
        ["qemu-img", "convert", "-p", "-c", "-f", "raw", "-O", "qcow2", raw, out], on_output=on_output, timeout_s=3600
    )


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _build(cache_dir: Path, recipe: Recipe, key: str, final: Path, report: Progress) -> None:
    for stale in cache_dir.glob(_BUILD_PREFIX + "*"):  # crashed builds'; we hold the lock, no live build owns them
        shutil.rmtree(stale, ignore_errors=True)
    work = Path(tempfile.mkdtemp(prefix=_BUILD_PREFIX, dir=cache_dir))
    started = time.monotonic()
    marks: list[tuple[str, float]] = []  # (step, when it began), for image.json

    def step(fraction: float, name: str) -> None:
        marks.append((name, time.monotonic()))
        report(fraction, name)

    try:
        root = work / "root"
        debs = cache_dir / "debian-debs"
        debs.mkdir(exist_ok=True)
        step(0.01, "debootstrap")
        _debootstrap(recipe, root, debs, report, 0.01, 0.60)

        step(0.60, "configuring")
        _configure(recipe, root)

        step(0.65, "initramfs")
        version = _kernel_version(root)
        _make_initramfs(root, version)

        step(0.72, "filesystem")
        raw = _make_disk(work, root, recipe, version, key)

        step(0.78, "qcow2")
        out = work / "out"
        out.mkdir()
        _convert(raw, out / DISK, report, 0.78, 0.97)
        raw.unlink()
        shutil.copyfile(root / "boot" / f"vmlinuz-{version}", out / KERNEL)
        shutil.copyfile(root / "boot" / f"initrd.img-{version}", out / INITRD)
        step(0.97, "hashing")
        sha256 = _sha256_file(out / DISK)
        ends = [t for _, t in marks[1:]] + [time.monotonic()]
        steps = {name: round(end - began, 1) for (name, began), end in zip(marks, ends, strict=True)}
        meta = {
            "recipe": recipe.to_dict(),
            "key": key,
            "build": BUILD_VERSION,
            "sha256": sha256,
            "kernel_version": version,
            "cmdline": CMDLINE,
            "disk_file_bytes": (out / DISK).stat().st_size,
            "base_packages": list(BASE_PACKAGES),
            "build_seconds": round(time.monotonic() - started, 1),
            "step_seconds": steps,
        }
        (out / META).write_text(json.dumps(meta, indent=2) + "\n")
        os.chmod(out, 0o755)
        for f in out.iterdir():
            os.chmod(f, 0o644)  # as the demo's: the daemon copies them into pool images with its own modes
        if final.exists():
            raise DebianBuildError(f"{final} exists but is incomplete; remove it to rebuild")
        os.rename(out, final)  # the commit point
    finally:
        shutil.rmtree(work, ignore_errors=True)


def build_dir(cache_dir: Path, recipe: Recipe) -> Path:
    return Path(cache_dir).absolute() / f"{recipe.release}-{recipe.key()[:16]}"


def cached(cache_dir: Path, recipe: Recipe) -> DebianImage | None:
    """The finished build of recipe under cache_dir, if there is one."""
    path = build_dir(cache_dir, recipe)
    try:
        meta = json.loads((path / META).read_text())
    except (OSError, ValueError):
        return None
    if not all((path / f).is_file() for f in (DISK, KERNEL, INITRD)):
        return None
    return DebianImage(
        disk=path / DISK,
        kernel=path / KERNEL,
        initrd=path / INITRD,
        cmdline=meta["cmdline"],
        kernel_version=meta["kernel_version"],
        sha256=meta["sha256"],
        recipe=recipe,
        key=meta["key"],
        cached=True,
    )


def build_debian(cache_dir: Path, recipe: Recipe, *, progress: Progress | None = None) -> DebianImage:
    """Build (or find cached) the image of recipe under cache_dir. progress(fraction 0..1, message)."""

    def report(fraction: float, message: str) -> None:
        if progress is not None:
            progress(fraction, message)

    cache_dir = Path(cache_dir).absolute()
    cache_dir.mkdir(parents=True, exist_ok=True)
    found = cached(cache_dir, recipe)
    if found is not None:
        report(1.0, "cached")
        return found
    # One build at a time per cache_dir (each takes ~1.5 GB and both CPUs); a waiter usually finds it done.
    with (cache_dir / ".debian.lock").open("a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        found = cached(cache_dir, recipe)
        if found is not None:
            report(1.0, "cached")
            return found
        key = recipe.key()
        _build(cache_dir, recipe, key, build_dir(cache_dir, recipe), report)
    built = cached(cache_dir, recipe)
    if built is None:
        raise DebianBuildError("the build finished but its files are not there")
    return replace(built, cached=False)
