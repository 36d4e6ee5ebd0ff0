"""/v1/session without a browser: the Secure flag over TLS, and a websocket from another origin refused."""

from __future__ import annotations

import ssl
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
import urllib3
from websockets.exceptions import InvalidStatus
from websockets.sync.client import connect

from tests.conftest import FAKE_QEMU, Daemon
from tests.ui.conftest import free_port, token


@pytest.fixture
def tls_daemon(tmp_path: Path) -> Iterator[Daemon]:
    port = free_port()
    d = Daemon(tmp_path, {"VMKIT_QEMU": str(FAKE_QEMU), "VMKIT_LISTEN": f"127.0.0.1:{port}", "VMKIT_TLS": "1"})
    d.url = f"https://127.0.0.1:{port}"  # type: ignore[attr-defined]
    d.start()
    try:
        yield d
    finally:
        d.cleanup()


def test_tls_session_cookie_and_origin(tls_daemon: Daemon) -> None:
    urllib3.disable_warnings()
    url: str = tls_daemon.url  # type: ignore[attr-defined]
    s = requests.Session()
    s.verify = False  # self-signed; the fingerprint pinning is tested in tests/integration
    s.trust_env = False  # else REQUESTS_CA_BUNDLE would win over verify=False
    assert s.get(url + "/ui/").status_code == 200  # the login page needs no session
    assert s.get(url + "/openapi.json").status_code == 401
    res = s.post(url + "/v1/session", json={"token": token(tls_daemon, "web")})
    assert res.status_code == 200 and res.json() == {"via": "session", "token": "web", "read_only": False}
    cookies = {c.name: c for c in s.cookies}
    assert cookies["vmkit_session"].secure and cookies["vmkit_session"].has_nonstandard_attr("HttpOnly")
    assert cookies["vmkit_csrf"].secure and not cookies["vmkit_csrf"].has_nonstandard_attr("HttpOnly")
    assert "samesite=strict" in res.headers["set-cookie"].lower()
    assert s.get(url + "/v1/session").json()["via"] == "session"
    assert s.post(url + "/v1/vms", json={"name": "x", "memory_mib": 64}).status_code == 403  # no CSRF header
    csrf = {"X-CSRF-Token": cookies["vmkit_csrf"].value}
    assert s.post(url + "/v1/vms", json={"name": "x", "memory_mib": 64}, headers=csrf).status_code == 201
    cookie = f"vmkit_session={cookies['vmkit_session'].value}"
    wss = url.replace("https", "wss") + "/v1/events"
    ctx = ssl.create_default_context()
    ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
    host = url.removeprefix("https://")
    with connect(wss, ssl=ctx, additional_headers={"Cookie": cookie}, origin=f"https://{host}"):  # type: ignore[arg-type]
        pass
    with pytest.raises(InvalidStatus) as e:
        connect(wss, ssl=ctx, additional_headers={"Cookie": cookie}, origin="https://evil.example")  # type: ignore[arg-type]
    assert e.value.response.status_code == 403
    # Revoking the token ends its sessions.
    tls_daemon.cli("token", "revoke", "web")
    assert s.get(url + "/v1/vms").status_code == 401
