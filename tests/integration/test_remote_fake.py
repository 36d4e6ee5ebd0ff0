"""Remote access: the API on a TCP listener (loopback only here), tokens, read-only tokens, TLS with a pinned
certificate. The UNIX socket stays token-free throughout."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from websockets.exceptions import InvalidStatus

from tests.conftest import FAKE_QEMU, Daemon
from vmkit.cli.client import ApiError, Client


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _daemon(root: Path, *, tls: bool) -> Daemon:
    port = _free_port()
    d = Daemon(root, {"VMKIT_QEMU": str(FAKE_QEMU), "VMKIT_LISTEN": f"127.0.0.1:{port}", "VMKIT_TLS": str(int(tls))})
    d.url = f"{'https' if tls else 'http'}://127.0.0.1:{port}"  # type: ignore[attr-defined]
    d.start()
    return d


@pytest.fixture
def plain(tmp_path: Path) -> Iterator[Daemon]:
    d = _daemon(tmp_path, tls=False)
    try:
        yield d
    finally:
        d.cleanup()


@pytest.fixture
def tls(tmp_path: Path) -> Iterator[Daemon]:
    d = _daemon(tmp_path, tls=True)
    try:
        yield d
    finally:
        d.cleanup()


def _token(d: Daemon, name: str, *read_only: str) -> str:
    out = json.loads(d.cli("token", "create", name, *read_only, "--json").stdout)
    assert out["name"] == name and out["secret"].startswith("vmk_")
    return str(out["secret"])


def _remote(d: Daemon, token: str | None, fingerprint: str | None = None) -> Client:
    return Client(url=d.url, token=token, fingerprint=fingerprint, timeout_s=30)  # type: ignore[attr-defined]


def _status(client: Client, method: str, url: str, body: object = None) -> int:
    with pytest.raises(ApiError) as e:
        client.request(method, url, body)
    return e.value.status


def test_plain_http_on_loopback_needs_a_token(plain: Daemon) -> None:
    secret = _token(plain, "ops")
    assert _status(_remote(plain, None), "GET", "/v1/vms") == 401
    assert _status(_remote(plain, "vmk_nope"), "GET", "/v1/vms") == 401
    assert _status(_remote(plain, None), "GET", "/openapi.json") == 401
    remote = _remote(plain, secret)
    assert remote.get("/v1")["tls_fingerprint"] is None
    remote.post("/v1/vms", {"name": "r", "memory_mib": 64})
    assert remote.post("/v1/vms/r/start")["state"] == "running"
    assert [v["name"] for v in plain.api.get("/v1/vms")] == ["r"]  # the UNIX socket: same state, no token
    # Token management over TCP with a full token.
    assert remote.post("/v1/tokens", {"name": "second"})["secret"]
    assert {t["name"] for t in remote.get("/v1/tokens")} == {"ops", "second"}
    listed = json.loads(plain.cli("token", "list", "--json").stdout)
    assert all("secret" not in t and "secret_sha256" not in t for t in listed)
    assert next(t for t in listed if t["name"] == "ops")["last_used_at"] is not None
    # Websockets: the header, or ?token= (for browsers).
    with remote.websocket("/v1/events") as ws:
        remote.post("/v1/vms/r/pause")
        assert json.loads(ws.recv(timeout=5))["vm"] == "r"
    anon = _remote(plain, None)
    with anon.websocket(f"/v1/events?token={secret}") as ws:
        remote.post("/v1/vms/r/resume")
        assert json.loads(ws.recv(timeout=5))["vm"] == "r"
    with pytest.raises(InvalidStatus) as e:
        anon.websocket("/v1/events")
    assert e.value.response.status_code == 401
    # ?token= is for websockets only.
    assert _status(anon, "GET", f"/v1/vms?token={secret}") == 401


def test_a_read_only_token_reads_and_changes_nothing(plain: Daemon) -> None:
    plain.cli("vm", "create", "keep", "--memory", "64")
    ro = _remote(plain, _token(plain, "viewer", "--read-only"))
    assert [v["name"] for v in ro.get("/v1/vms")] == ["keep"]
    assert ro.get("/v1/vms/keep")["state"] == "shut off"
    assert ro.get("/openapi.json")["openapi"]
    for method, url, body in [
        ("POST", "/v1/vms", {"name": "new", "memory_mib": 64}),
        ("POST", "/v1/vms/keep/start", None),
        ("DELETE", "/v1/vms/keep", None),
        ("PATCH", "/v1/vms/keep", {"cpu_weight": 5}),
        ("POST", "/v1/tokens", {"name": "mine"}),
        ("GET", "/v1/tokens", None),  # token management needs a full token
        ("DELETE", "/v1/tokens/viewer", None),
    ]:
        with pytest.raises(ApiError) as e:
            ro.request(method, url, body)
        assert (e.value.status, e.value.message) == (403, "read-only token"), (method, url)
    assert [(v["name"], v["state"]) for v in plain.api.get("/v1/vms")] == [("keep", "shut off")]
    assert [t["name"] for t in plain.api.get("/v1/tokens")] == ["viewer"]
    with ro.websocket("/v1/events"):  # following events is reading
        pass
    with pytest.raises(InvalidStatus) as e:
        ro.websocket("/v1/vms/keep/console")
    assert e.value.response.status_code == 403


def test_a_revoked_token_is_refused(plain: Daemon) -> None:
    secret = _token(plain, "temp")
    remote = _remote(plain, secret)
    assert remote.get("/v1/vms") == []
    assert plain.cli("token", "revoke", "temp").stdout.strip() == "token temp revoked"
    assert _status(remote, "GET", "/v1/vms") == 401
    assert plain.cli("token", "list", "--json").stdout.strip() == "[]"
    res = plain.cli("token", "revoke", "temp", check=False)
    assert res.returncode == 1 and "no token named 'temp'" in res.stderr
    res = plain.cli("token", "create", "bad/name", check=False)
    assert res.returncode == 1 and "invalid token name" in res.stderr


def test_tls_with_the_pinned_fingerprint(tls: Daemon) -> None:
    fp = tls.api.get("/v1")["tls_fingerprint"]
    assert len(fp) == 64 and fp in (tls.root / "daemon.log").read_text()
    key = tls.state_dir / "tls" / "key.pem"
    assert key.stat().st_mode & 0o777 == 0o600
    secret = _token(tls, "admin")
    url: str = tls.url  # type: ignore[attr-defined]
    tls.cli("vm", "create", "t1", "--memory", "64")
    res = tls.cli("--url", url, "--token", secret, "--fingerprint", fp, "vm", "list")
    assert res.stdout.splitlines()[1].split()[:2] == ["t1", "shut", "off"][:2]
    # The same through the environment, fingerprint in the colon form.
    colons = ":".join(fp[i : i + 2] for i in range(0, 64, 2)).upper()
    env = {"VMKIT_URL": url, "VMKIT_TOKEN": secret, "VMKIT_FINGERPRINT": colons}
    tls.env.update(env)
    try:
        assert json.loads(tls.cli("vm", "start", "t1", "--json").stdout)["state"] == "running"
    finally:
        for k in env:
            del tls.env[k]
    wrong = "0" * 64
    res = tls.cli("--url", url, "--token", secret, "--fingerprint", wrong, "vm", "list", check=False)
    assert res.returncode != 0 and "fingerprint mismatch" in res.stderr and "refusing to connect" in res.stderr
    assert res.stdout == ""
    res = tls.cli("--url", url, "--token", secret, "vm", "list", check=False)  # self-signed, nothing pinned
    assert res.returncode != 0 and "cannot verify the certificate" in res.stderr
    # Plain HTTP to the TLS listener gets nowhere.
    with pytest.raises(ApiError):
        Client(url=url.replace("https", "http"), token=secret, timeout_s=5).get("/v1/vms")
    # Websockets ride the same checked TLS connection.
    with _remote(tls, secret, fp).websocket("/v1/events") as ws:
        tls.cli("vm", "pause", "t1")
        assert json.loads(ws.recv(timeout=5))["vm"] == "t1"
    # The pair is made once: a restart serves the same certificate.
    tls.stop()
    tls.start()
    assert tls.api.get("/v1")["tls_fingerprint"] == fp


def test_sigterm_stops_both_listeners(tls: Daemon) -> None:
    secret = _token(tls, "admin")
    fp = tls.api.get("/v1")["tls_fingerprint"]
    with _remote(tls, secret, fp).websocket("/v1/events"):
        assert tls.proc is not None
        proc, tls.proc = tls.proc, None
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(15) == 0
    assert time.monotonic() - t0 < 5
    assert not tls.socket.exists()
    with pytest.raises(ApiError):
        _remote(tls, secret, fp).get("/v1")
    assert "Traceback" not in (tls.root / "daemon.log").read_text()


def test_volumes_over_tcp_are_uploaded_never_read_by_path(plain: Daemon, tmp_path: Path) -> None:
    secret = _token(plain, "ops")
    remote = _remote(plain, secret)
    # A token holder cannot make the daemon read a file of its host.
    assert _status(remote, "POST", "/v1/pools/default/volumes/shadow/import", {"path": "/etc/shadow"}) == 403
    assert plain.api.get("/v1/volumes?pool=default") == []
    # The CLI given --url sends the file itself, streamed; it comes back byte for byte.
    src = tmp_path / "disk.img"
    src.write_bytes(os.urandom(3 * 1024 * 1024 + 512))
    env = {"VMKIT_URL": plain.url, "VMKIT_TOKEN": secret}  # type: ignore[attr-defined]
    out = subprocess.run([sys.executable, "-m", "vmkit", "volume", "import", "default/disk.img", str(src), "--json"],
                         env={**plain.env, **env}, capture_output=True, text=True, check=True)  # fmt: skip
    assert json.loads(out.stdout)["format"] == "raw"
    back = tmp_path / "back.img"
    subprocess.run([sys.executable, "-m", "vmkit", "volume", "export", "default/disk.img", str(back)],
                   env={**plain.env, **env}, check=True, capture_output=True)  # fmt: skip
    assert back.read_bytes() == src.read_bytes()
