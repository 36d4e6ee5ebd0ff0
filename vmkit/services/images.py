"""Images VMs are made from, built from Debian packages:

- `demo`: kernel + initramfs (direct kernel boot) and an empty base disk VMs get an overlay of;
- `demo-disk`: a BIOS-bootable disk image (partition table, syslinux, kernel, initramfs);
- `demo-installer`: an installer ISO that installs the demo system onto a blank disk;
- `debian-12` (`image build`, images/debian.py): a Debian system disk with cloud-init, and its kernel and
  initramfs beside it, so that a VM boots it directly (like `demo`) or through the disk's own boot loader.

Every file is a volume of pool `images` named after its build (kernel version + content hash), so removing the
shared build cache never breaks a VM and a newer build never touches the volumes older VMs are backed by.
Registration is the last step (after every volume is complete); a crash before it leaves only volumes the next
build reuses.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from vmkit.errors import NotFound, VmkitError
from vmkit.images import debian
from vmkit.model.storage import IMAGES_POOL
from vmkit.services.operations import Progress
from vmkit.services.volumes import VolumeService
from vmkit.store.db import Store

DEMO = "demo"
DEMO_DISK = "demo-disk"
DEMO_INSTALLER = "demo-installer"


class ImageService:
    def __init__(self, *, store: Store, volumes: VolumeService, cache_dir: Path) -> None:
        self._store = store
        self._volumes = volumes
        self._cache_dir = cache_dir
        self._lock = asyncio.Lock()
        self._debian_lock = asyncio.Lock()  # apart: a demo build need not wait minutes for a Debian one

    def list(self) -> list[dict[str, Any]]:
        return [{"name": n, **d} for n, d in self._store.images().items()]

    def get(self, name: str) -> dict[str, Any]:
        img = self._store.image(name)
        if img is None:
            raise NotFound(f"no image named {name!r}")
        return {"name": name, **img}

    def lookup(self, name: str) -> dict[str, Any] | None:
        return self._store.image(name)

    def demo_ready(self) -> dict[str, Any] | None:
        """The registered demo image if it was built by the current recipe and all its volumes are still there
        (then no build is needed). A newer recipe registers new volumes; VMs made from the old ones keep them."""
        from vmkit.images.demo import RECIPE_VERSION

        img = self._store.image(DEMO)
        keys = ("kernel_volume", "initrd_volume", "disk_volume")
        complete = img is not None and all(self._exists(img.get(k)) for k in keys)
        others = all(self._store.image(n) for n in (DEMO_DISK, DEMO_INSTALLER))
        if img and complete and others and img.get("recipe") == RECIPE_VERSION:
            return {"name": DEMO, **img}
        return None

    def _exists(self, key: str | None) -> bool:
        if not key:
            return False
        try:
            return self._volumes.path(key).is_file() and self._volumes.row(key) is not None
        except VmkitError:
            return False

    async def build_demo(self, progress: Progress) -> dict[str, Any]:
        async with self._lock:
            ready = self.demo_ready()
            if ready:
                return ready
            from vmkit.images.demo import RECIPE_VERSION, build_demo

            built = await asyncio.to_thread(build_demo, self._cache_dir, progress=progress)
            progress(0.9, "copying the image into pool images")
            build = built.disk.parent.name  # demo-<kernel version>-<content hash>
            volumes: dict[str, str] = {}
            for field, src, fmt, mode in (
                # Kernel and initrd stay world-readable, like the packages they come from: a VM's unprivileged
                # QEMU then reopens them through its descriptor directly, instead of the daemon copying them
                # into a memfd at each start.
                ("kernel", built.kernel, "raw", 0o644),
                ("initrd", built.initrd, "raw", 0o644),
                ("disk", built.disk, "qcow2", 0o600),
                ("boot_disk", built.boot_disk, "qcow2", 0o600),
                ("installer", built.installer_iso, "iso", 0o600),
            ):
                info = await self._volumes.register_file(
                    IMAGES_POOL, f"{build}-{src.name}", src, fmt=fmt, mode=mode, reuse=True
                )
                volumes[field] = info.key
            progress(0.98, "registering images")
            data = {
                "kind": "kernel+initrd",
                "kernel": str(self._volumes.path(volumes["kernel"])),
                "initrd": str(self._volumes.path(volumes["initrd"])),
                "disk": str(self._volumes.path(volumes["disk"])),
                "kernel_volume": volumes["kernel"],
                "initrd_volume": volumes["initrd"],
                "disk_volume": volumes["disk"],
                "cmdline": built.cmdline,
                "kernel_version": built.kernel_version,
                "recipe": RECIPE_VERSION,
            }
            common = {"kernel_version": built.kernel_version, "recipe": RECIPE_VERSION}
            self._store.put_image(DEMO_DISK, {"kind": "disk", "disk_volume": volumes["boot_disk"], **common})
            self._store.put_image(DEMO_INSTALLER, {"kind": "iso", "iso_volume": volumes["installer"], **common})
            self._store.put_image(DEMO, data)  # last: demo_ready() looks at it first
            return {"name": DEMO, **data}

    # ----- Debian images (images/debian.py) ---------------------------------------------------------------------
    def debian_recipe(self, release: str, *, size_bytes: int | None, packages: Sequence[str]) -> debian.Recipe:
        """The checked recipe for a request (404 unknown release, 400 bad size or package); the host's mirror."""
        suite = debian.check_release(release)
        mirror, security = debian.host_mirrors(suite)
        size = debian.DEFAULT_SIZE_BYTES if size_bytes is None else size_bytes
        return debian.make_recipe(release, size_bytes=size, packages=packages, mirror=mirror, security_mirror=security)

    def debian_ready(self, recipe: debian.Recipe) -> dict[str, Any] | None:
        """The registered image if it was built from this very recipe and its volumes are all still there."""
        img = self._store.image(recipe.release)
        keys = ("kernel_volume", "initrd_volume", "disk_volume")
        if img and img.get("recipe_key") == recipe.key() and all(self._exists(img.get(k)) for k in keys):
            return {"name": recipe.release, **img}
        return None

    async def build_debian(self, recipe: debian.Recipe, progress: Progress) -> dict[str, Any]:
        """Build the image of recipe (or take it from the build cache) and register it as image recipe.release.

        Its volumes are named after the build (release + recipe hash): a rebuild with another recipe registers new
        ones and moves the image record to them, while VMs made from the old ones keep theirs."""
        async with self._debian_lock:
            ready = self.debian_ready(recipe)
            if ready:
                return ready
            built = await asyncio.to_thread(debian.build_debian, self._cache_dir, recipe, progress=progress)
            progress(0.98, "copying the image into pool images")
            build = built.disk.parent.name  # <release>-<recipe hash>
            volumes: dict[str, str] = {}
            for field, src, fmt, mode in (
                ("kernel", built.kernel, "raw", 0o644),  # world-readable, as the demo's (see build_demo)
                ("initrd", built.initrd, "raw", 0o644),
                ("disk", built.disk, "qcow2", 0o600),
            ):
                info = await self._volumes.register_file(
                    IMAGES_POOL, f"{build}-{src.name}", src, fmt=fmt, mode=mode, reuse=True
                )
                volumes[field] = info.key
            data = {
                "kind": "disk",
                "kernel": str(self._volumes.path(volumes["kernel"])),
                "initrd": str(self._volumes.path(volumes["initrd"])),
                "kernel_volume": volumes["kernel"],
                "initrd_volume": volumes["initrd"],
                "disk_volume": volumes["disk"],
                "cmdline": built.cmdline,
                "kernel_version": built.kernel_version,
                "recipe": recipe.to_dict(),
                "recipe_key": built.key,
                "sha256": built.sha256,
                "disk_file_bytes": built.disk.stat().st_size,
            }
            self._store.put_image(recipe.release, data)
            return {"name": recipe.release, **data}
