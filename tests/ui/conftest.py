"""The web UI in real Chromium (Debian's package) driven by Playwright, against a fake-QEMU daemon whose TCP
listener is on loopback. Screenshots land in tests/ui/artifacts/ (git-ignored)."""

from __future__ import annotations

import json
import os
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import FAKE_QEMU, Daemon

CHROMIUM = os.environ.get("VMKIT_CHROMIUM", "/usr/bin/chromium")
ARTIFACTS = Path(__file__).resolve().parent / "artifacts"
DESKTOP = {"width": 1280, "height": 800}
PHONE = {"width": 390, "height": 844}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def listening_daemon(root: Path) -> Daemon:
    """A fake-QEMU daemon with a plain-HTTP TCP listener on 127.0.0.1 (d.url)."""
    port = free_port()
    d = Daemon(root, {"VMKIT_QEMU": str(FAKE_QEMU), "VMKIT_LISTEN": f"127.0.0.1:{port}", "VMKIT_TLS": "0"})
    d.url = f"http://127.0.0.1:{port}"  # type: ignore[attr-defined]
    d.start()
    return d


def token(d: Daemon, name: str, *flags: str) -> str:
    return str(json.loads(d.cli("token", "create", name, *flags, "--json").stdout)["secret"])


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    d = listening_daemon(tmp_path_factory.mktemp("ui"))
    try:
        yield d
    finally:
        d.cleanup()


# Package scope: Playwright's sync API keeps an event loop running in this thread while it is open, which would
# break later tests that call asyncio.run().
@pytest.fixture(scope="package")
def browser() -> Iterator[Any]:
    # `make test` installs chromium: a missing one is a broken install step, so it fails, never skips.
    assert Path(CHROMIUM).exists(), f"{CHROMIUM} is missing: apt-get install chromium (scripts/install-deps.sh does)"
    from playwright.sync_api import sync_playwright

    ARTIFACTS.mkdir(exist_ok=True)
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
        try:
            yield b
        finally:
            b.close()


@pytest.fixture
def page(browser: Any) -> Iterator[Any]:
    ctx = browser.new_context(viewport=DESKTOP)
    ctx.set_default_timeout(10_000)
    pg = ctx.new_page()
    errors: list[str] = []
    pg.on("pageerror", lambda e: errors.append(str(e)))
    try:
        yield pg
    finally:
        ctx.close()
    assert not errors, f"uncaught errors in the page: {errors}"


def shot(page: Any, name: str) -> None:
    """A screenshot at the page's viewport, and the same page at a phone's."""
    page.screenshot(path=str(ARTIFACTS / f"{name}-1280x800.png"), full_page=True)
    size = page.viewport_size
    page.set_viewport_size(PHONE)
    page.screenshot(path=str(ARTIFACTS / f"{name}-390x844.png"), full_page=True)
    page.set_viewport_size(size)
