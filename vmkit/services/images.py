"""Images VMs boot from. For now: the demo guest (kernel + initramfs + base disk) built from Debian packages.

A registered image's files are copied into the state dir, so removing the shared build cache never breaks
a VM. Registration is the last step (after the files are complete), so a crash leaves at most a stray
directory that the next build overwrites.
"""

from __future__ import annotations

import asyncio
import shutil
from pathlib import Path
from typing import Any

from vmkit.errors import NotFound
from vmkit.services.operations import Progress
from vmkit.store.db import Store

DEMO = "demo"


class ImageService:
    def __init__(self, *, store: Store, state_dir: Path, cache_dir: Path) -> None:
        self._store = store
        self._dir = state_dir / "images"
        self._cache_dir = cache_dir
        self._lock = asyncio.Lock()
        # A registration cut short by a crash leaves only a *.tmp copy; nothing refers to it.
        for tmp in self._dir.glob("*/*.tmp"):
            shutil.rmtree(tmp, ignore_errors=True)

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
        """The registered demo image if it was built by the current recipe and its files are all still there
        (then no build is needed). A newer recipe registers a new image; VMs made from the old one keep it."""
        from vmkit.images.demo import RECIPE_VERSION

        img = self._store.image(DEMO)
        if (
            img
            and img.get("recipe") == RECIPE_VERSION
            and all(Path(img[k]).is_file() for k in ("kernel", "initrd", "disk"))
        ):
            return {"name": DEMO, **img}
        return None

    async def build_demo(self, progress: Progress) -> dict[str, Any]:
        async with self._lock:
            ready = self.demo_ready()
            if ready:
                return ready
            from vmkit.images.demo import RECIPE_VERSION, build_demo

            built = await asyncio.to_thread(build_demo, self._cache_dir, progress=progress)
            progress(0.95, "registering image")
            # Keyed by the build's cache dir name (kernel version + content hash): an old image stays intact
            # for the VMs whose overlays use its disk as their backing file.
            dest = self._dir / DEMO / built.disk.parent.name
            await asyncio.to_thread(_copy_files, dest, [built.kernel, built.initrd, built.disk])
            data = {
                "kind": "kernel+initrd",
                "kernel": str(dest / built.kernel.name),
                "initrd": str(dest / built.initrd.name),
                "disk": str(dest / built.disk.name),
                "cmdline": built.cmdline,
                "kernel_version": built.kernel_version,
                "recipe": RECIPE_VERSION,
            }
            self._store.put_image(DEMO, data)
            return {"name": DEMO, **data}


def _copy_files(dest: Path, files: list[Path]) -> None:
    tmp = dest.with_name(dest.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True, mode=0o755)
    for f in files:
        shutil.copy2(f, tmp / f.name)
        # Readable by anyone, like the packages they come from: a VM's unprivileged QEMU then reopens the
        # kernel through its descriptor directly, instead of the daemon copying it into a memfd each start.
        (tmp / f.name).chmod(0o644)
    shutil.rmtree(dest, ignore_errors=True)
    tmp.rename(dest)
