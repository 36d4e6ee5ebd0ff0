"""Remote access's pure parts: where the TCP listener may go without TLS, addresses, URLs, fingerprints."""

from __future__ import annotations

import subprocess
import sys

import pytest

from vmkit.cli.client import ApiError, normalize_fingerprint, split_url
from vmkit.cli.main import _wanted
from vmkit.errors import InvalidInput
from vmkit.host.tls import is_loopback, parse_listen, san_entries, use_tls


@pytest.mark.parametrize("host", ["127.0.0.1", "127.8.9.10", "::1", "localhost"])
def test_loopback_may_go_plain_unless_tls_is_asked_for(host: str) -> None:
    assert is_loopback(host)
    assert use_tls(host, tls=None, cert=None, key=None) is False
    assert use_tls(host, tls=False, cert=None, key=None) is False
    assert use_tls(host, tls=True, cert=None, key=None) is True
    assert use_tls(host, tls=None, cert="c.pem", key="k.pem") is True


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "192.0.2.7", "2001:db8::1", "vmhost.example"])
def test_any_other_address_gets_tls_and_refuses_plain(host: str) -> None:
    assert not is_loopback(host)
    assert use_tls(host, tls=None, cert=None, key=None) is True  # a self-signed pair is made
    assert use_tls(host, tls=True, cert="c.pem", key="k.pem") is True
    with pytest.raises(InvalidInput, match="refusing plain HTTP"):
        use_tls(host, tls=False, cert=None, key=None)


def test_cert_and_key_go_together() -> None:
    with pytest.raises(InvalidInput, match="both"):
        use_tls("0.0.0.0", tls=None, cert="c.pem", key=None)


def test_listen_addresses() -> None:
    assert parse_listen("0.0.0.0:8443") == ("0.0.0.0", 8443)
    assert parse_listen("[::1]:8443") == ("::1", 8443)
    assert parse_listen("localhost:1") == ("localhost", 1)
    for bad in ("8443", ":8443", "host:", "host:0", "host:65536", "host:x"):
        with pytest.raises(InvalidInput):
            parse_listen(bad)


def test_self_signed_names() -> None:
    assert "IP:192.0.2.7" in san_entries("192.0.2.7", "h")
    assert "DNS:vm.example" in san_entries("vm.example", "h")
    assert san_entries("0.0.0.0", "h") == ["DNS:localhost", "IP:127.0.0.1", "IP:::1", "DNS:h"]


def test_urls_and_fingerprints() -> None:
    assert split_url("https://127.0.0.1:8443") == (True, "127.0.0.1", 8443)
    assert split_url("http://[::1]:80/") == (False, "::1", 80)
    assert split_url("https://vm.example") == (True, "vm.example", 443)
    for bad in ("127.0.0.1:8443", "ftp://x:1", "https://x:y", "https://x:1/v1"):
        with pytest.raises(ApiError):
            split_url(bad)
    fp = "ab" * 32
    assert normalize_fingerprint(":".join(["AB"] * 32)) == fp
    assert normalize_fingerprint("sha256:" + fp) == fp
    with pytest.raises(ApiError, match="invalid fingerprint"):
        normalize_fingerprint("ab" * 31)


def test_global_options_keep_the_fast_parser() -> None:
    argv = ["--url", "https://h:1", "--token", "vm", "--fingerprint=x", "vm", "list"]
    assert _wanted(argv) == ("vm", "list")
    assert _wanted(["--socket", "/s", "token", "create", "n"]) == ("token", "create")


def test_the_cli_imports_no_ssl_for_the_local_socket() -> None:
    code = "import sys; from vmkit.cli import main; main.main(['vm', 'list']); print('ssl' in sys.modules)"
    res = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env={"VMKIT_SOCKET": "/nonexistent/vmkit.sock", "PATH": "/usr/bin:/bin"},
        check=False,
    )
    assert res.stdout.strip() == "False", res
