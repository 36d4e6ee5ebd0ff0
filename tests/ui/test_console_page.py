"""The console page in headless Chromium on a real demo guest: the serial tab (xterm.js) shows the guest's boot
live and types into its shell; the graphics tab (noVNC) paints the VGA screen. Logged in by session cookie, so
the websockets are authenticated the way the UI's own pages are."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from playwright.sync_api import expect

from tests.conftest import Daemon
from tests.e2e.guest import boot
from tests.ui.conftest import free_port, token

pytestmark = pytest.mark.e2e

# Painted pixels of noVNC's canvas (not the background): more than a few means the screen arrived.
_PAINTED = """() => {
  const c = document.querySelector('#graphics-screen canvas');
  if (!c || !c.width) return 0;
  const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
  let n = 0;
  for (let i = 0; i < d.length; i += 4) if (d[i] > 64 || d[i + 1] > 64 || d[i + 2] > 64) n++;
  return n;
}"""


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    """A real-QEMU daemon (the module's own, instead of the fake one) with a plain-HTTP listener on loopback."""
    port = free_port()
    d = Daemon(tmp_path_factory.mktemp("console"), {"VMKIT_LISTEN": f"127.0.0.1:{port}", "VMKIT_TLS": "0"})
    d.url = f"http://127.0.0.1:{port}"  # type: ignore[attr-defined]
    d.start()
    try:
        d.cli("image", "demo", timeout_s=900)
        yield d
    finally:
        d.cleanup()


def test_serial_and_graphics_tabs(page: Any, daemon: Daemon) -> None:
    url: str = daemon.url  # type: ignore[attr-defined]
    assert page.request.post(url + "/v1/session", data={"token": token(daemon, "console")}).ok
    boot(daemon, "web1", wait=False)
    # Held paused (long before the guest's READY, ~2.5 s into its boot) until the page is connected, so the boot
    # is seen live however slowly the page loads: the serial socket has no scrollback.
    daemon.cli("vm", "pause", "web1")
    page.goto(url + "/ui/console.html?vm=web1")
    serial = page.locator("#serial .xterm-rows")
    expect(page.locator("#serial")).to_have_attribute("data-state", "connected")
    daemon.cli("vm", "resume", "web1")
    expect(serial).to_contain_text("VMKIT-DEMO-READY", timeout=90_000)
    page.locator("#serial .xterm").click()
    page.keyboard.press("Enter")
    page.keyboard.type("echo ok-$((6*7))\n")
    expect(serial).to_contain_text("ok-42")

    page.get_by_role("tab", name="Graphics").click()
    expect(page.locator("#graphics")).to_have_attribute("data-state", "connected")
    deadline = time.monotonic() + 20
    while page.evaluate(_PAINTED) < 100 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert page.evaluate(_PAINTED) >= 100, "the graphics canvas stayed blank"
    page.screenshot(path=str(Path(__file__).resolve().parent / "artifacts" / "console-graphics-1280x800.png"))
    # Back to serial: still connected, still the same terminal.
    page.get_by_role("tab", name="Serial").click()
    expect(serial).to_contain_text("ok-42")


def test_a_vm_that_is_not_running_says_so(page: Any, daemon: Daemon) -> None:
    url: str = daemon.url  # type: ignore[attr-defined]
    page.goto(f"{url}/ui/console.html?vm=nowhere&token={token(daemon, 'console2')}#graphics")
    expect(page.locator("#status")).to_contain_text("no VM named 'nowhere'")
    page.get_by_role("tab", name="Serial").click()
    expect(page.locator("#status")).to_contain_text("no VM named 'nowhere'")
