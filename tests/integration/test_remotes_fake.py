"""Remotes: a daemon that knows another one, talking to it over its TCP API only (TLS, a pinned certificate, a
token). Two daemons with fake QEMU, their listeners on loopback; nothing leaves this host."""

from __future__ import annotations

import asyncio
import json
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import FAKE_QEMU, Daemon
from vmkit.cli.client import ApiError, Client
from vmkit.errors import VmkitError
from vmkit.model.remote import CreateRemote
from vmkit.services.remotes import RemoteError, RemoteService
from vmkit.store.db import RemoteRow, Store


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Host:
    """A daemon with a TCP listener on loopback, and what a test needs of it."""

    def __init__(self, root: Path, *, tls: bool) -> None:
        root.mkdir()
        self.port = _free_port()
        self.url = f"{'https' if tls else 'http'}://127.0.0.1:{self.port}"
        self.d = Daemon(
            root,
            {"VMKIT_QEMU": str(FAKE_QEMU), "VMKIT_LISTEN": f"127.0.0.1:{self.port}", "VMKIT_TLS": str(int(tls))},
        )
        self.d.start()
        self.fingerprint: str | None = self.d.api.get("/v1")["tls_fingerprint"]
        self.outputs: list[str] = []  # every answer and CLI output, to look for tokens in

    def token(self, name: str, read_only: bool = False) -> str:
        return str(self.d.api.post("/v1/tokens", {"name": name, "read_only": read_only})["secret"])

    def cli(self, *args: str, check: bool = True, stdin: str | None = None) -> Any:
        res = self.d.cli(*args, check=check, stdin=stdin)
        self.outputs += [res.stdout, res.stderr]
        return res

    def api(self, method: str, path: str, body: Any = None) -> Any:
        out = self.d.api.request(method, path, body)
        self.outputs.append(json.dumps(out))
        return out

    def refused(self, method: str, path: str, body: Any = None) -> tuple[int, str]:
        with pytest.raises(ApiError) as e:
            self.d.api.request(method, path, body)
        self.outputs.append(e.value.message)
        return e.value.status, e.value.message


@pytest.fixture(scope="module")
def hosts(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Host, Host, Host]]:
    """a (plain http on loopback, where this test's read-only caller comes in), b (TLS), c (plain http)."""
    root = tmp_path_factory.mktemp("remotes")
    made: list[Host] = []
    try:
        for name, tls in (("a", False), ("b", True), ("c", False)):
            made.append(Host(root / name, tls=tls))
        yield made[0], made[1], made[2]
    finally:
        for h in made:
            h.d.cleanup()


@pytest.fixture
def ab(hosts: tuple[Host, Host, Host]) -> Iterator[tuple[Host, Host]]:
    a, b, _ = hosts
    yield a, b
    for r in a.d.api.get("/v1/remotes"):
        a.d.api.request("DELETE", f"/v1/remotes/{r['name']}")
    for t in b.d.api.get("/v1/tokens"):
        b.d.api.request("DELETE", f"/v1/tokens/{t['name']}")


def _stored(a: Host) -> list[str]:
    return [r["name"] for r in a.d.api.get("/v1/remotes")]


def test_add_pins_on_first_use_then_verifies_a_given_fingerprint(ab: tuple[Host, Host]) -> None:
    a, b = ab
    secret = b.token("from-a")
    res = a.cli("remote", "add", "b", b.url, "--token", secret)
    assert b.fingerprint is not None and len(b.fingerprint) == 64
    assert f"pinned fingerprint {b.fingerprint}" in res.stdout and "trust on first use" in res.stdout
    assert res.stdout.startswith(f"remote b added: {b.url}, vmkit ")
    [listed] = a.api("GET", "/v1/remotes")
    assert listed.keys() == {"name", "url", "fingerprint", "created_at"}
    assert (listed["name"], listed["url"], listed["fingerprint"]) == ("b", b.url, b.fingerprint)
    info = a.api("GET", "/v1/remotes/b")
    assert (info["reachable"], info["read_only"], info["error"]) == (True, False, None)
    assert info["version"] == b.d.api.get("/v1")["version"]
    assert "token" not in info and "token" not in listed
    # The token was used over there, by a's daemon.
    assert next(t for t in b.d.api.get("/v1/tokens") if t["name"] == "from-a")["last_used_at"] is not None
    assert a.cli("remote", "remove", "b").stdout.strip() == "remote b removed"
    assert _stored(a) == []

    # A given fingerprint, written as browsers show it, with the token on standard input.
    colons = ":".join(b.fingerprint[i : i + 2] for i in range(0, 64, 2)).upper()
    res = a.cli("remote", "add", "b", b.url + "/", "--token", "-", "--fingerprint", colons, "--json", stdin=secret)
    out = json.loads(res.stdout)
    assert out["fingerprint"] == b.fingerprint and out["url"] == b.url and out["pinned_on_first_use"] is False
    assert out["notes"] == [] and "token" not in out
    res = a.cli("remote", "add", "b2", b.url, "--token", secret, "--fingerprint", b.fingerprint)
    assert f"fingerprint {b.fingerprint} verified and pinned" in res.stdout
    # list and info for people.
    table = a.cli("remote", "list").stdout.splitlines()
    assert table[0].split() == ["NAME", "URL", "FINGERPRINT", "ADDED"]
    assert [line.split()[:3] for line in table[1:]] == [["b", b.url, b.fingerprint], ["b2", b.url, b.fingerprint]]
    text = a.cli("remote", "info", "b").stdout
    assert "Reachable:" in text and "yes (vmkit " in text and "token may change things" in text
    assert secret not in "".join(a.outputs)


def test_what_is_refused_stores_nothing(ab: tuple[Host, Host], tmp_path: Path) -> None:
    a, b = ab
    secret = b.token("good")
    ro = b.token("viewer", read_only=True)
    assert b.fingerprint is not None
    wrong_fp = ("0" if b.fingerprint[0] != "0" else "1") + b.fingerprint[1:]
    closed = f"https://127.0.0.1:{_free_port()}"

    def refused(body: dict[str, Any]) -> tuple[int, str]:
        return a.refused("POST", "/v1/remotes", {"name": "b", "url": b.url, "token": secret, **body})

    status, msg = refused({"token": "vmk_wrong"})
    assert status == 400 and "the token was refused" in msg and "invalid or revoked token" in msg, msg
    status, msg = refused({"fingerprint": wrong_fp})
    assert status == 400 and "fingerprint mismatch" in msg and b.fingerprint in msg and wrong_fp in msg, msg
    status, msg = refused({"token": ro})
    assert status == 400 and "read-only" in msg and "migrations need a token that may change things" in msg, msg
    t0 = time.monotonic()
    status, msg = refused({"url": closed})
    assert status == 502 and "cannot reach" in msg and "refused" in msg.lower(), msg
    status, msg = refused({"url": closed.replace("https", "http")})
    assert status == 502 and "cannot reach" in msg, msg
    assert time.monotonic() - t0 < 5
    # https to a plain-http listener (a's own), and http to a TLS one (b's).
    status, msg = refused({"url": a.url.replace("http://", "https://")})
    assert status == 502 and "TLS" in msg, msg
    status, msg = refused({"url": b.url.replace("https://", "http://")})
    assert status == 502, msg
    # Input refused before any connection.
    for body, why in [
        ({"url": "http://192.0.2.1:8443"}, "only a loopback address may go without TLS"),
        ({"url": "https://192.0.2.1"}, "has no port"),
        ({"url": "https://192.0.2.1:8443/v1"}, "invalid remote URL"),
        ({"url": a.url, "fingerprint": b.fingerprint}, "plain http: there is no certificate to pin"),
        ({"fingerprint": "12"}, "invalid fingerprint"),
        ({"name": "no/slash"}, "invalid remote name"),
        ({"token": ""}, "token"),
    ]:
        status, msg = refused(body)
        assert status == 400 and why in msg, (body, msg)
    assert _stored(a) == []
    # The CLI says it too.
    res = a.cli("remote", "add", "b", b.url, "--token", "vmk_wrong", check=False)
    assert res.returncode == 1 and "the token was refused" in res.stderr and "nothing stored" in res.stderr
    res = a.cli("remote", "add", "b", "b.example:8443", "--token", secret, check=False)
    assert res.returncode == 1 and "invalid remote URL" in res.stderr
    # A duplicate name.
    a.cli("remote", "add", "b", b.url, "--token", secret)
    status, msg = refused({})
    assert (status, msg) == (409, "remote 'b' already exists")
    assert a.refused("DELETE", "/v1/remotes/nope") == (404, "no remote named 'nope'")
    assert a.refused("GET", "/v1/remotes/nope")[0] == 404
    res = a.cli("remote", "remove", "nope", check=False)
    assert res.returncode == 1 and "no remote named 'nope'" in res.stderr
    assert secret not in "".join(a.outputs) and ro not in "".join(a.outputs)
    assert secret not in (a.d.root / "daemon.log").read_text()


def test_plain_http_on_loopback_and_who_may_add(hosts: tuple[Host, Host, Host], ab: tuple[Host, Host]) -> None:
    a, _, c = hosts
    secret = c.token("from-a")
    try:
        out = json.loads(a.cli("remote", "add", "c", c.url, "--token", secret, "--json").stdout)
        assert (out["url"], out["fingerprint"], out["pinned_on_first_use"]) == (c.url, None, False)
        assert a.api("GET", "/v1/remotes/c")["reachable"] is True
        # Over a's TCP listener: a read-only token may read remotes, not add or remove them; a full one may.
        ro = Client(url=a.url, token=a.token("ro", read_only=True), timeout_s=30)
        full = Client(url=a.url, token=a.token("full"), timeout_s=30)
        assert [r["name"] for r in ro.get("/v1/remotes")] == ["c"]
        assert ro.get("/v1/remotes/c")["reachable"] is True
        for method, path, body in [
            ("POST", "/v1/remotes", {"name": "x", "url": c.url, "token": secret}),
            ("DELETE", "/v1/remotes/c", None),
        ]:
            with pytest.raises(ApiError) as e:
                ro.request(method, path, body)
            assert (e.value.status, e.value.message) == (403, "read-only token")
        assert full.post("/v1/remotes", {"name": "x", "url": c.url, "token": secret})["name"] == "x"
        full.request("DELETE", "/v1/remotes/x")
        assert _stored(a) == ["c"]
        # c goes away: info says so (list does not ask).
        c.d.stop()
        info = a.api("GET", "/v1/remotes/c")
        assert info["reachable"] is False and "cannot reach" in info["error"] and info["version"] is None
        assert "NO — " in a.cli("remote", "info", "c").stdout
        assert _stored(a) == ["c"]
    finally:
        if c.d.proc is None:
            c.d.start()
        for t in a.d.api.get("/v1/tokens"):
            a.d.api.request("DELETE", f"/v1/tokens/{t['name']}")
        for t in c.d.api.get("/v1/tokens"):
            c.d.api.request("DELETE", f"/v1/tokens/{t['name']}")
    assert secret not in "".join(a.outputs)


def test_info_says_when_the_token_was_revoked_over_there(ab: tuple[Host, Host]) -> None:
    a, b = ab
    secret = b.token("later-revoked")
    a.cli("remote", "add", "b", b.url, "--token", secret)
    b.d.api.request("DELETE", "/v1/tokens/later-revoked")
    info = a.api("GET", "/v1/remotes/b")
    assert info["reachable"] is False and "the token was refused" in info["error"], info


def test_the_service_round_trips_requests(ab: tuple[Host, Host], tmp_path: Path) -> None:
    """RemoteService.request, what migration uses: answers, the remote's errors, no answer."""
    _, b = ab
    secret = b.token("svc")
    b.d.cli("vm", "create", "rt", "--memory", "64")
    silent = socket.socket()  # accepts connections (backlog) and never answers
    silent.bind(("127.0.0.1", 0))
    silent.listen(4)

    async def scenario() -> None:
        store = Store(tmp_path / "vmkit.db")
        svc = RemoteService(store=store)
        added = await svc.add(CreateRemote(name="b", url=b.url, token=secret))
        assert added.fingerprint == b.fingerprint and added.pinned_on_first_use
        assert svc.info("b").url == b.url and [r.name for r in svc.list()] == ["b"]
        vms = await svc.request("b", "GET", "/v1/vms")
        assert [v["name"] for v in vms] == ["rt"]
        started = await svc.request("b", "POST", "/v1/vms/rt/start")
        assert started["state"] == "running"
        c = svc.client("b")
        assert c.url == b.url and c.fingerprint == b.fingerprint and c.get("/v1/vms/rt")["state"] == "running"
        # The remote's own errors keep their status, said with the remote's name.
        with pytest.raises(RemoteError) as e:
            await svc.request("b", "GET", "/v1/vms/nope")
        assert (e.value.status, e.value.remote_status) == (404, 404)
        assert e.value.message == "remote 'b': no VM named 'nope'"
        with pytest.raises(RemoteError) as e:
            await svc.request("b", "POST", "/v1/vms", {"name": "rt", "memory_mib": 64})
        assert e.value.status == 409 and e.value.message.startswith("remote 'b': ")
        # Not a remote of this daemon's.
        with pytest.raises(VmkitError) as ee:
            await svc.request("nope", "GET", "/v1")
        assert ee.value.status == 404
        # The wrong certificate (a pin b does not match): 502, and nothing sent.
        store.add_remote(RemoteRow("b-other-cert", b.url, secret, "ab" * 32, time.time()))
        with pytest.raises(RemoteError) as e:
            await svc.request("b-other-cert", "GET", "/v1")
        assert e.value.status == 502 and "fingerprint mismatch" in e.value.message
        # No answer in time: 504; no listener: 502.
        port = silent.getsockname()[1]
        store.add_remote(RemoteRow("silent", f"http://127.0.0.1:{port}", secret, None, time.time()))
        t0 = time.monotonic()
        with pytest.raises(RemoteError) as e:
            await svc.request("silent", "GET", "/v1", timeout_s=0.5)
        assert e.value.status == 504 and e.value.remote_status is None and time.monotonic() - t0 < 5
        store.add_remote(RemoteRow("closed", f"http://127.0.0.1:{_free_port()}", secret, None, time.time()))
        with pytest.raises(RemoteError) as e:
            await svc.request("closed", "GET", "/v1")
        assert e.value.status == 502 and "cannot reach" in e.value.message
        # The token revoked over there: 403 here (a 401 would log this daemon's own caller out).
        b.d.api.request("DELETE", "/v1/tokens/svc")
        with pytest.raises(RemoteError) as e:
            await svc.request("b", "GET", "/v1/vms")
        assert (e.value.status, e.value.remote_status) == (403, 401) and "token was refused" in e.value.message
        svc.remove("b")
        assert [r.name for r in svc.list()] == ["b-other-cert", "closed", "silent"]
        store.close()

    try:
        asyncio.run(scenario())
    finally:
        silent.close()
        b.d.api.post("/v1/vms/rt/destroy")
        b.d.api.request("DELETE", "/v1/vms/rt")
