"""The TCP listener's address and TLS: when TLS is required, the self-signed pair, its fingerprint.

Plain HTTP is allowed on loopback only: anything reaching another address crosses a network, and a token
sent in clear there is a token given away.
"""

from __future__ import annotations

import hashlib
import ipaddress
import os
import socket
import ssl
from pathlib import Path

from vmkit.errors import InvalidInput
from vmkit.util.proc import run

CERT_DAYS = 3650


def parse_listen(text: str) -> tuple[str, int]:
    """'HOST:PORT' or '[V6]:PORT' → (host, port)."""
    host, sep, port = text.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise InvalidInput(f"invalid listen address {text!r}: use HOST:PORT, e.g. 0.0.0.0:8443 or [::1]:8443")
    return host, int(port)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def use_tls(host: str, *, tls: bool | None, cert: str | None, key: str | None) -> bool:
    """Whether the listener on host speaks TLS. tls: True/False when asked for (--tls/--no-tls), None when not.
    Off loopback TLS is always on, and asking for it off there is refused."""
    if (cert is None) != (key is None):
        raise InvalidInput("give both --tls-cert and --tls-key, or neither (a self-signed pair is then made)")
    if not is_loopback(host):
        if tls is False:
            raise InvalidInput(f"refusing plain HTTP on {host}: only a loopback address may go without TLS")
        return True
    return bool(tls) or cert is not None


def san_entries(host: str, hostname: str) -> list[str]:
    """subjectAltName entries for a self-signed certificate serving host (a wildcard address names none)."""
    out = ["DNS:localhost", "IP:127.0.0.1", "IP:::1"]
    if hostname:
        out.append(f"DNS:{hostname}")
    if host not in ("", "0.0.0.0", "::", "localhost"):
        try:
            out.append(f"IP:{ipaddress.ip_address(host)}")
        except ValueError:
            out.append(f"DNS:{host}")
    return list(dict.fromkeys(out))


def ensure_self_signed(tls_dir: Path, host: str) -> tuple[Path, Path]:
    """STATE/tls/{cert,key}.pem, made once (an EC P-256 key, 0600) and reused from then on."""
    cert, key = tls_dir / "cert.pem", tls_dir / "key.pem"
    if cert.exists() and key.exists():
        return cert, key
    tls_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    tmp_cert, tmp_key = tls_dir / "cert.pem.tmp", tls_dir / "key.pem.tmp"
    # The key file is created 0600 before openssl writes into it.
    os.close(os.open(tmp_key, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600))
    os.chmod(tmp_key, 0o600)
    run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
         "-keyout", tmp_key, "-out", tmp_cert, "-days", str(CERT_DAYS), "-subj", "/CN=vmkit",
         "-addext", "subjectAltName=" + ",".join(san_entries(host, socket.gethostname())),
         "-addext", "basicConstraints=critical,CA:FALSE"],
        timeout_s=60,
    )  # fmt: skip
    os.chmod(tmp_key, 0o600)
    # Key first: a crash in between leaves no cert, so the next start makes a new pair.
    tmp_key.replace(key)
    tmp_cert.replace(cert)
    return cert, key


def check_pair(cert: Path, key: Path) -> None:
    """Refuse, with a message, a certificate and key that TLS cannot serve."""
    try:
        ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(cert, key)
    except (OSError, ssl.SSLError) as e:
        raise InvalidInput(f"cannot use TLS certificate {cert} with key {key}: {e}") from None


def fingerprint(cert: Path) -> str:
    """SHA-256 of the certificate's DER form, lowercase hex: what `vmkit --fingerprint` pins."""
    return hashlib.sha256(ssl.PEM_cert_to_DER_cert(cert.read_text())).hexdigest()
