"""The VM page's Snapshots card and Clone form in headless Chromium, against the fake-QEMU daemon: take,
revert and delete snapshots in the tree, clone linked, and a read-only session that only looks."""

from __future__ import annotations

import re
from typing import Any

from playwright.sync_api import expect

from tests.conftest import Daemon
from tests.ui.conftest import shot, token
from tests.ui.test_ui import login

GIB = 1024**3


def snap_row(page: Any, name: str) -> Any:
    return page.locator(f'#snapshots tr[data-snap="{name}"]')


def api_snaps(d: Daemon, vm: str) -> dict[str, dict[str, Any]]:
    return {s["name"]: s for s in d.api.get(f"/v1/vms/{vm}/snapshots")}


def accept_next_dialog(page: Any) -> list[str]:
    """Accept the next confirm(), keeping its message."""
    seen: list[str] = []

    def on(dialog: Any) -> None:
        seen.append(dialog.message)
        dialog.accept()

    page.once("dialog", on)
    return seen


def test_snapshot_tree_revert_delete_and_linked_clone(page: Any, daemon: Daemon) -> None:
    # A shut-off VM with a qcow2 disk (the demo image is not built for these tests: an empty thin disk is qcow2
    # too, which is all an internal snapshot of a shut-off VM needs).
    daemon.api.post("/v1/vms", {"name": "snapvm", "memory_mib": 64, "disk_size_bytes": GIB})
    login(page, daemon, token(daemon, "admin"))
    page.goto(daemon.url + "/ui/#/vms/snapvm")  # type: ignore[attr-defined]
    card = page.locator("#snapshots")
    expect(card.get_by_role("heading", name="Snapshots")).to_be_visible()
    expect(card.locator("tbody")).to_contain_text("No snapshots.")
    expect(card.get_by_role("columnheader")).to_have_text(
        ["Name", "Kind", "VM state", "Taken", "Description", "Actions"]
    )

    # An internal snapshot, then a disk-only one on top of it.
    card.get_by_label("Snapshot name").fill("s1")
    card.get_by_label("Description").fill("clean install")
    card.get_by_role("button", name="Take snapshot").click()
    s1 = snap_row(page, "s1")
    expect(s1).to_have_attribute("aria-current", "true")
    expect(s1).to_contain_text("internal")
    expect(s1).to_contain_text("shut off")
    expect(s1).to_contain_text("clean install")
    expect(card.get_by_label("Snapshot name")).to_have_value("")  # the form is cleared for the next one

    card.get_by_label("Snapshot name").fill("s2")
    card.get_by_label("Disk only").check()
    card.get_by_role("button", name="Take snapshot").click()
    s2 = snap_row(page, "s2")
    expect(s2).to_have_attribute("aria-current", "true")
    expect(s1).not_to_have_attribute("aria-current", "true")
    expect(s2).to_contain_text("disk-only")
    expect(s2).to_have_attribute("data-parent", "s1")
    expect(card.locator("tbody tr")).to_have_count(2)
    assert card.locator("tbody tr").evaluate_all("rs => rs.map(r => r.dataset.snap)") == ["s1", "s2"]
    # The child is indented under its parent, and the current one carries the mark.
    pad = "r => parseFloat(getComputedStyle(r.querySelector('td')).paddingLeft)"
    assert s2.evaluate(pad) > s1.evaluate(pad)
    expect(s2.locator(".badge.current")).to_have_text("current")
    expect(s1.locator(".badge.current")).to_have_count(0)
    # The disks table followed: the disk is an overlay now, on the frozen image.
    expect(page.locator("table.plain").first.locator("tbody tr").first.locator("td").nth(4)).not_to_have_text("—")
    snaps = api_snaps(daemon, "snapvm")
    assert snaps["s1"]["kind"] == "internal" and snaps["s2"]["kind"] == "external"
    assert snaps["s2"]["parent"] == "s1" and snaps["s2"]["current"] and not snaps["s1"]["current"]
    assert snaps["s1"]["description"] == "clean install"
    shot(page, "vm-snapshots")

    # A name that is taken: the API's message comes as an error toast, and nothing changes.
    card.get_by_label("Snapshot name").fill("s1")
    card.get_by_role("button", name="Take snapshot").click()
    expect(page.locator(".toast.error")).to_contain_text("already has a snapshot named 's1'")
    expect(card.locator("tbody tr")).to_have_count(2)

    # Revert to s1, confirming (the current state is lost).
    seen = accept_next_dialog(page)
    s1.get_by_role("button", name="Revert to s1").click()
    expect(s1).to_have_attribute("aria-current", "true")
    expect(s2).not_to_have_attribute("aria-current", "true")
    assert seen and "current state is lost" in seen[0]
    snaps = api_snaps(daemon, "snapvm")
    assert snaps["s1"]["current"] and not snaps["s2"]["current"]
    assert daemon.vm("snapvm")["state"] == "shut off"

    # Deleting: a dismissed confirm keeps it; an accepted one deletes it.
    page.once("dialog", lambda dlg: dlg.dismiss())
    s2.get_by_role("button", name="Delete snapshot s2").click()
    expect(s2).to_be_visible()
    assert set(api_snaps(daemon, "snapvm")) == {"s1", "s2"}
    seen = accept_next_dialog(page)
    s2.get_by_role("button", name="Delete snapshot s2").click()
    expect(s2).to_have_count(0)
    expect(s1).to_have_attribute("aria-current", "true")
    assert "Delete snapshot s2" in seen[0]
    assert list(api_snaps(daemon, "snapvm")) == ["s1"]

    # A linked clone, followed as an operation, lands on the new VM's page.
    toggle = page.get_by_role("button", name="Clone snapvm")
    expect(toggle).to_have_attribute("aria-expanded", "false")
    toggle.click()
    form = page.locator("#clone-form")
    expect(form).to_be_visible()
    expect(form.get_by_label("New VM's name")).to_have_value("snapvm-clone")
    form.get_by_label("New VM's name").fill("snapvm-linked")
    form.get_by_label("Linked").check()
    shot(page, "vm-clone")
    form.get_by_role("button", name="Create clone").click()
    expect(page).to_have_url(re.compile(r"#/vms/snapvm-linked$"))
    expect(page.locator("h1")).to_contain_text("snapvm-linked")
    expect(page.locator("#snapshots tbody")).to_contain_text("No snapshots.")
    clone = daemon.vm("snapvm-linked")
    assert clone["state"] == "shut off" and clone["uuid"] != daemon.vm("snapvm")["uuid"]
    disks = daemon.api.get("/v1/vms/snapvm-linked/disks")
    assert disks[0]["backing"], disks  # linked: an overlay on the source's image

    # A clone name that is taken is refused up front, shown as an error.
    page.goto(daemon.url + "/ui/#/vms/snapvm")  # type: ignore[attr-defined]
    page.get_by_role("button", name="Clone snapvm").click()
    page.locator("#clone-form").get_by_label("New VM's name").fill("snapvm-linked")
    page.locator("#clone-form").get_by_role("button", name="Create clone").click()
    expect(page.locator(".toast.error").last).to_contain_text("snapvm-linked")
    expect(page).to_have_url(re.compile(r"#/vms/snapvm$"))


def test_a_read_only_session_sees_snapshots_but_no_buttons(page: Any, daemon: Daemon) -> None:
    daemon.api.post("/v1/vms", {"name": "rosnap", "memory_mib": 64, "disk_size_bytes": GIB})
    daemon.api.post("/v1/vms/rosnap/snapshots", {"name": "base", "description": "seen, not touched"})
    login(page, daemon, token(daemon, "viewer", "--read-only"))
    page.goto(daemon.url + "/ui/#/vms/rosnap")  # type: ignore[attr-defined]
    card = page.locator("#snapshots")
    expect(snap_row(page, "base")).to_contain_text("seen, not touched")
    expect(snap_row(page, "base")).to_have_attribute("aria-current", "true")
    expect(card.get_by_role("columnheader")).to_have_text(["Name", "Kind", "VM state", "Taken", "Description"])
    expect(card.locator("button")).to_have_count(0)
    expect(card.locator("form")).to_have_count(0)
    expect(page.get_by_role("button", name="Clone rosnap")).to_have_count(0)
    shot(page, "vm-snapshots-read-only")
