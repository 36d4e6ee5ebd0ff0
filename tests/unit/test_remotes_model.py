"""Remotes: what `remote add` accepts (name, URL, token, fingerprint) and how a remote's failures are said."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError

from vmkit.cli.client import ApiError
from vmkit.model.remote import CreateRemote, normalize_fingerprint, parse_url
from vmkit.services.remotes import RemoteError, remote_error

FP = "ab" * 32


def _create(**kw: Any) -> CreateRemote:
    return CreateRemote.model_validate({"name": "b", "url": "https://192.0.2.1:8443", "token": "vmk_x", **kw})


@pytest.mark.parametrize(
    ("url", "normal"),
    [
        ("https://192.0.2.1:8443", "https://192.0.2.1:8443"),
        ("https://192.0.2.1:8443/", "https://192.0.2.1:8443"),
        ("https://Host-2.Example.org:443", "https://host-2.example.org:443"),
        ("https://[2001:DB8:0::1]:8443", "https://[2001:db8::1]:8443"),
        ("http://127.0.0.1:8006", "http://127.0.0.1:8006"),
        ("http://localhost:08006", "http://localhost:8006"),
        ("http://[::1]:1", "http://[::1]:1"),
    ],
)
def test_urls_taken_and_normalised(url: str, normal: str) -> None:
    assert _create(url=url).url == normal


@pytest.mark.parametrize(
    ("url", "why"),
    [
        ("https://192.0.2.1", "has no port"),
        ("192.0.2.1:8443", "invalid remote URL"),
        ("ftp://192.0.2.1:21", "invalid remote URL"),
        ("https://192.0.2.1:8443/v1", "invalid remote URL"),
        ("https://user@192.0.2.1:8443", "invalid remote URL"),
        ("https://192.0.2.1:0", "invalid port"),
        ("https://192.0.2.1:65536", "invalid port"),
        ("https://192.0.2.1:-1", "invalid port"),
        ("https://a..b:1", "invalid host"),
        ("https://-a:1", "invalid host"),
        ("https://é.example:1", "invalid host"),
        ("https://1.2.3:1", "invalid host"),
        ("https://::1:1", "invalid host"),
        ("https://[1.2.3.4]:1", "invalid IPv6"),
        ("https://[fe80::1%eth0]:1", "invalid IPv6"),
        ("https://[::1]", "invalid remote URL"),
        ("http://192.0.2.1:80", "only a loopback address may go without TLS"),
        ("http://example.org:80", "only a loopback address may go without TLS"),
    ],
)
def test_urls_refused(url: str, why: str) -> None:
    with pytest.raises(ValidationError, match=why):
        _create(url=url)
    with pytest.raises(ValueError, match=why):
        parse_url(url)


def test_names_tokens_and_fingerprints() -> None:
    assert _create(fingerprint=":".join(["AB"] * 32)).fingerprint == FP
    assert _create(fingerprint=FP.upper()).fingerprint == FP
    assert _create().fingerprint is None
    assert normalize_fingerprint("Ab" * 32) == FP
    for bad in ["ab" * 31, "ab" * 33, "zz" * 32, "sha256:" + FP, "ab:" * 31 + "abc", ":".join(["ab"] * 32) + ":"]:
        with pytest.raises(ValidationError, match="invalid fingerprint"):
            _create(fingerprint=bad)
    for bad_name in ["", "a/b", "-a", "a" * 64, "a\n"]:
        with pytest.raises(ValidationError, match="invalid remote name"):
            _create(name=bad_name)
    for bad_token in ["a b", "a\r\nX-Evil: 1", "é", "\t"]:
        with pytest.raises(ValidationError, match="visible ASCII"):
            _create(token=bad_token)
    with pytest.raises(ValidationError, match="at least 1"):
        _create(token="")
    with pytest.raises(ValidationError, match="at most 512"):
        _create(token="x" * 513)
    with pytest.raises(ValidationError, match="unknown|Extra inputs"):
        _create(secret="x")
    with pytest.raises(ValidationError):
        _create(token=5)  # strict: no coercion


def test_failures_said_with_the_remote_s_name_and_a_status() -> None:
    def said(e: BaseException) -> tuple[int, str, int | None]:
        err = remote_error("b", e)
        assert isinstance(err, RemoteError)
        return err.status, err.message, err.remote_status

    # The remote's own answers keep their status and message...
    assert said(ApiError(404, "no VM named 'x'")) == (404, "remote 'b': no VM named 'x'", 404)
    assert said(ApiError(409, "busy")) == (409, "remote 'b': busy", 409)
    assert said(ApiError(503, "stopping")) == (503, "remote 'b': stopping", 503)
    # ...but its 401 must not log this daemon's own caller out, and its 500 is not this daemon's bug.
    assert said(ApiError(401, "invalid or revoked token")) == (
        403,
        "remote 'b': the token was refused: invalid or revoked token",
        401,
    )
    assert said(ApiError(500, "internal error: X"))[:1] == (502,)
    # No answer: 502 (refused, TLS, fingerprint), 504 (timed out).
    try:
        raise ApiError(0, "cannot reach the vmkit daemon at https://x:1 (timed out)") from TimeoutError()
    except ApiError as e:
        assert said(e)[0] == 504
    assert said(ApiError(0, "certificate fingerprint mismatch"))[:2] == (
        502,
        "remote 'b': certificate fingerprint mismatch",
    )
    assert said(TimeoutError("timed out"))[0] == 504
    assert said(ConnectionResetError(104, "reset"))[0] == 502
    assert said(ValueError("not json"))[0] == 502
    assert said(IndexError("bad status line"))[0] == 502
