"""The web UI end to end in headless Chromium: login, the wizard, live state, read-only, CSRF."""

from __future__ import annotations

import re
from typing import Any

from playwright.sync_api import expect

from tests.conftest import Daemon
from tests.ui.conftest import shot, token


def login(page: Any, d: Daemon, secret: str) -> None:
    page.goto(d.url + "/")  # type: ignore[attr-defined]
    expect(page).to_have_url(re.compile(r"/ui/#/login$"))
    page.get_by_label("API token").fill(secret)
    page.get_by_role("button", name="Log in").click()
    expect(page.get_by_role("heading", name="Dashboard")).to_be_visible()


def row(page: Any, name: str) -> Any:
    return page.locator(f'tr[data-vm="{name}"]')


def test_a_wrong_token_is_refused(page: Any, daemon: Daemon) -> None:
    page.goto(daemon.url + "/ui/")  # type: ignore[attr-defined]
    page.get_by_label("API token").fill("vmk_wrong")
    page.get_by_role("button", name="Log in").click()
    expect(page.locator("#login-error")).to_contain_text("wrong token")
    expect(page.get_by_role("heading", name="Log in to vmkit")).to_be_visible()
    shot(page, "login-refused")
    # Nothing but the login is reachable without a session.
    res = page.request.get(daemon.url + "/v1/vms")  # type: ignore[attr-defined]
    assert res.status == 401


def test_wizard_lifecycle_live(page: Any, daemon: Daemon) -> None:
    login(page, daemon, token(daemon, "admin"))
    cookies = {c["name"]: c for c in page.context.cookies()}
    assert cookies["vmkit_session"]["httpOnly"] and cookies["vmkit_session"]["sameSite"] == "Strict"
    assert not cookies["vmkit_csrf"]["httpOnly"]
    expect(page.locator("#live")).to_have_text(re.compile("live"))
    shot(page, "dashboard")

    page.get_by_role("link", name="Create VM").first.click()
    page.get_by_label("Name").fill("web1")
    page.get_by_label("Memory (MiB)").fill("64")
    page.get_by_label("Virtual CPUs").fill("2")
    page.get_by_label("Disk size (GiB)").fill("1")
    shot(page, "wizard")
    page.get_by_role("button", name="Create").click()
    expect(page).to_have_url(re.compile(r"#/vms$"))
    expect(row(page, "web1")).to_contain_text("shut off")
    assert daemon.vm("web1")["vcpus"] == 2

    # A bad name: the API's message is shown.
    page.goto(daemon.url + "/ui/#/create")  # type: ignore[attr-defined]
    page.get_by_label("Name").fill("bad name")
    page.get_by_role("button", name="Create").click()
    expect(page.locator("#create-error")).to_contain_text("invalid VM name")
    page.get_by_role("link", name="Virtual machines").click()

    page.get_by_role("button", name="Start web1").click()
    expect(row(page, "web1")).to_contain_text("running")
    page.get_by_role("button", name="Pause web1").click()
    expect(row(page, "web1")).to_contain_text("paused")
    page.get_by_role("button", name="Resume web1").click()
    expect(row(page, "web1")).to_contain_text("running")
    # Changes made elsewhere (the CLI, on the UNIX socket) arrive through /v1/events, without a reload.
    daemon.cli("vm", "pause", "web1")
    expect(row(page, "web1")).to_contain_text("paused")
    daemon.cli("vm", "resume", "web1")
    expect(row(page, "web1")).to_contain_text("running")
    daemon.cli("vm", "create", "other", "--memory", "64")
    expect(row(page, "other")).to_contain_text("shut off")
    shot(page, "vm-list")

    page.get_by_role("link", name="web1").click()
    expect(page.get_by_role("heading", name="Overview")).to_be_visible()
    expect(page.locator("#console-link")).to_have_attribute("href", "/ui/console.html?vm=web1")
    expect(page.get_by_role("cell", name="disk0", exact=True)).to_be_visible()
    shot(page, "vm-detail")

    page.get_by_role("button", name="Stop web1").click()
    expect(page.locator("h1 .badge")).to_have_text("shut off")
    page.once("dialog", lambda dlg: dlg.accept())
    page.get_by_role("button", name="Delete web1").click()
    expect(page).to_have_url(re.compile(r"#/vms$"))
    expect(row(page, "web1")).to_have_count(0)
    daemon.cli("vm", "delete", "other")
    expect(row(page, "other")).to_have_count(0)
    assert [v["name"] for v in daemon.api.get("/v1/vms")] == []

    # CSRF: the session cookie alone does not change anything; with the header it does.
    daemon.cli("vm", "create", "csrf", "--memory", "64")
    url = daemon.url + "/v1/vms/csrf/start"  # type: ignore[attr-defined]
    status = page.evaluate("u => fetch(u, {method: 'POST'}).then(r => r.status)", url)
    assert status == 403
    assert daemon.vm("csrf")["state"] == "shut off"
    status = page.evaluate(
        """u => fetch(u, {method: 'POST', headers: {'X-CSRF-Token':
             document.cookie.match(/vmkit_csrf=([^;]*)/)[1]}}).then(r => r.status)""",
        url,
    )
    assert status == 200
    daemon.cli("vm", "stop", "csrf", "--force")
    daemon.cli("vm", "delete", "csrf")

    # Logging out ends the session on the daemon's side too.
    page.get_by_role("button", name="Log out").click()
    expect(page.get_by_role("heading", name="Log in to vmkit")).to_be_visible()
    assert page.request.get(daemon.url + "/v1/vms").status == 401  # type: ignore[attr-defined]


def test_a_read_only_token_changes_nothing(page: Any, daemon: Daemon) -> None:
    daemon.cli("vm", "create", "ro1", "--memory", "64")
    try:
        login(page, daemon, token(daemon, "viewer", "--read-only"))
        expect(page.locator("#whoami")).to_have_text("viewer (read-only)")
        expect(page.get_by_role("link", name="Create VM")).to_have_count(0)
        page.get_by_role("link", name="Virtual machines").click()
        expect(page.get_by_role("button", name="Start ro1")).to_be_disabled()
        expect(page.get_by_role("button", name="Delete ro1")).to_be_disabled()
        shot(page, "read-only")
        for method, path in [("POST", "/v1/vms/ro1/start"), ("DELETE", "/v1/vms/ro1")]:
            status = page.evaluate(
                """([m, u]) => fetch(u, {method: m, headers: {'X-CSRF-Token':
                     document.cookie.match(/vmkit_csrf=([^;]*)/)[1]}}).then(r => r.status)""",
                [method, daemon.url + path],  # type: ignore[attr-defined]
            )
            assert status == 403, (method, path)
        assert daemon.vm("ro1")["state"] == "shut off"
    finally:
        daemon.cli("vm", "delete", "ro1")


def test_vmkit_ui_prints_a_one_time_link(page: Any, daemon: Daemon) -> None:
    out = daemon.cli("ui").stdout.strip()
    assert re.fullmatch(re.escape(daemon.url) + r"/ui/#/login\?code=[\w-]+", out)  # type: ignore[attr-defined]
    page.goto(out)
    expect(page.get_by_role("heading", name="Dashboard")).to_be_visible()
    expect(page.locator("#whoami")).to_have_text("admin")
    # Spent: a second browser gets the login page and a message.
    other = page.context.browser.new_context()
    try:
        p2 = other.new_page()
        p2.goto(out)
        expect(p2.locator("#login-error")).to_contain_text("used up or expired")
    finally:
        other.close()
