"""Property-based fuzzing of the whole HTTP API, generated from the daemon's own /openapi.json.

A private daemon (fake QEMU) is driven over its UNIX socket with the requests Schemathesis derives from the
document for every operation: its coverage phase (boundary values and each constraint broken in turn, a fixed
set) and a bounded number of random valid and invalid requests, from a fixed seed. A request may be refused
(4xx) or fail where QEMU or the guest failed or the caller's time ran out (502, 504); any other 5xx is a bug,
and every answer must be what the document promises (status, content type, body schema).

Schemathesis's pytest integration is not used: with a schema from a fixture it needs a private pytest attribute
(`Node._nodeid`) that pytest 9.2 no longer has. Each operation's Hypothesis test is built with the function that
integration uses (`create_test`, schemathesis is pinned exactly) and run as a pytest subtest.
"""

from __future__ import annotations

import contextlib
import socket
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
import schemathesis
from requests.adapters import HTTPAdapter
from schemathesis.checks import (
    CheckContext,
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)
from schemathesis.generation.hypothesis.builder import HypothesisTestConfig, HypothesisTestMode, create_test
from urllib3.connection import HTTPConnection
from urllib3.connectionpool import HTTPConnectionPool

from tests.conftest import FAKE_QEMU, Daemon
from tests.netns import daemon_in, namespaces
from vmkit.cli.client import ApiError
from vmkit.model.remote import format_url, parse_url
from vmkit.model.vm import valid_name

SEED = 20261126
MAX_EXAMPLES = 100  # random requests per operation, on top of the coverage phase's fixed set
BASE_URL = "http://vmkit"
# 502: QEMU or the guest agent failed; 504: the caller's own timeout ran out. Every other 5xx is a bug.
ALLOWED_5XX = {502, 504}
# Far above any answer of the fake daemon; a hang fails the run instead of stalling it.
REQUEST_TIMEOUT_S = 30
# Generated waits are capped so a wait for a state that never comes costs little (the default is a minute).
WAIT_CAP_S = 0.2
# Each starts a real image build (minutes, downloads); image build's input checks are unit-tested instead.
EXCLUDED = {"POST /v1/images/demo", "POST /v1/images/build/{release}"}

# VMs that three in four valid VM names are swapped for, so requests reach the lifecycle logic, not just 404s.
SEEDED = {"fz-off": "shut off", "fz-run": "running", "fz-paused": "paused"}


class _UnixConnection(HTTPConnection):
    def __init__(self, *args: Any, socket_path: str, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._socket_path = socket_path

    def _new_conn(self) -> socket.socket:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(REQUEST_TIMEOUT_S)
        try:
            sock.connect(self._socket_path)
        except BaseException:
            sock.close()
            raise
        return sock


class _UnixAdapter(HTTPAdapter):
    """A requests transport that sends every request to one UNIX socket, whatever the URL's host."""

    def __init__(self, socket_path: str) -> None:
        super().__init__(max_retries=0)
        self._pool = HTTPConnectionPool("vmkit", maxsize=1)
        self._pool.ConnectionCls = _UnixConnection
        self._pool.conn_kw = {"socket_path": socket_path}

    def get_connection_with_tls_context(self, *args: Any, **kwargs: Any) -> HTTPConnectionPool:
        return self._pool

    def close(self) -> None:
        self._pool.close()
        super().close()


@pytest.fixture(scope="module")
def daemon() -> Iterator[Daemon]:
    # In a network namespace of its own: the networks, bridges and nftables tables generated requests create
    # never touch the machine's. A short root keeps the socket paths of VMs with 63-character names under the
    # kernel's 107 bytes.
    with namespaces("fuzz") as (ns,), daemon_in(ns, "vmkfz-", {"VMKIT_QEMU": str(FAKE_QEMU)}, demo=False) as d:
        yield d


@pytest.fixture(scope="module")
def session(daemon: Daemon) -> Iterator[requests.Session]:
    with requests.Session() as s:
        s.mount(BASE_URL, _UnixAdapter(str(daemon.socket)))
        yield s


def _restore_seeded(d: Daemon, names: list[str]) -> None:
    """Put back seeded VMs an earlier request deleted or moved out of their state."""
    vms = {vm["name"]: vm for vm in d.api.get("/v1/vms")}
    for name in names:
        want = SEEDED[name]
        vm = vms.get(name) or d.api.post("/v1/vms", {"name": name, "memory_mib": 64})
        state = vm["state"]
        if state == want:
            continue
        with contextlib.suppress(ApiError):  # e.g. still "in shutdown": settled by the next request
            if want == "shut off":
                d.api.post(f"/v1/vms/{name}/destroy")
                continue
            if state in ("shut off", "crashed", "saved"):  # a saved VM's start resumes its managed save
                state = d.api.post(f"/v1/vms/{name}/start")["state"]
            if (want, state) == ("paused", "running"):
                d.api.post(f"/v1/vms/{name}/pause")
            elif (want, state) == ("running", "paused"):
                d.api.post(f"/v1/vms/{name}/resume")


def no_unexpected_server_error(ctx: CheckContext, response: schemathesis.Response, case: schemathesis.Case) -> None:
    assert response.status_code < 500 or response.status_code in ALLOWED_5XX, (
        f"{response.status_code} from {case.method} {case.formatted_path}: {response.text[:500]}"
    )


CHECKS = [no_unexpected_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]


def _steer(case: schemathesis.Case) -> str | None:
    """Aim most valid VM names at a seeded VM (a fixed choice per name, so runs repeat), and cap waits.
    Returns the seeded VM the request is now for, if any."""
    seeded = None
    name = (case.path_parameters or {}).get("name")
    if isinstance(name, str) and valid_name(name) and case.operation.path.startswith("/v1/vms/"):
        name = [name, *SEEDED][zlib.crc32(name.encode()) % (len(SEEDED) + 1)]
        case.path_parameters = {**(case.path_parameters or {}), "name": name}
        seeded = name if name in SEEDED else None
    _steer_storage(case)
    _steer_remote(case)
    if case.operation.path.endswith("/wait"):
        query = dict(case.query) if isinstance(case.query, dict) else {}
        t = query.get("timeout_s", 60.0)
        query["timeout_s"] = [_cap(v) for v in t] if isinstance(t, list) else _cap(t)  # a list: repeated
        case.query = query
    return seeded


# Where generated pool paths are moved to (set by the test): a pool's directory is created, and no fuzz run may
# create directories anywhere on the host.
POOL_ROOT: list[Path] = []
# Volume sizes are capped: a thick (falloc/full) volume of a generated size would really take that much disk.
SIZE_CAP = 16 * 1024**2


def _steer_storage(case: schemathesis.Case) -> None:
    body = case.body
    if not isinstance(body, dict):
        return
    path = body.get("path")
    if case.operation.path == "/v1/pools" and isinstance(path, str) and path.startswith("/") and POOL_ROOT:
        body["path"] = str(POOL_ROOT[0] / f"p{zlib.crc32(path.encode(errors='replace')):08x}")
    size = body.get("size_bytes")
    if isinstance(size, int) and not isinstance(size, bool) and size > SIZE_CAP:
        body["size_bytes"] = SIZE_CAP


def _steer_remote(case: schemathesis.Case) -> None:
    """A remote the daemon would accept is moved to loopback (same scheme and port), where nothing of the fuzz
    namespace listens: adding it is then refused at once (502), and no fuzz run makes the daemon connect, or
    resolve a name, anywhere else (the daemon's own network namespace, which reaches nothing outside, is a
    second fence)."""
    body = case.body
    if case.operation.path != "/v1/remotes" or not isinstance(body, dict) or not isinstance(body.get("url"), str):
        return
    with contextlib.suppress(ValueError):  # not a URL the daemon accepts: refused with a 400 before any connection
        scheme, _, port = parse_url(body["url"])
        body["url"] = format_url(scheme, "127.0.0.1", port)


def _cap(timeout_s: Any) -> Any:
    with contextlib.suppress(TypeError, ValueError):  # not a number: the daemon refuses it at once
        if 0 < float(timeout_s) <= 3600:
            return min(float(timeout_s), WAIT_CAP_S)
    return timeout_s


def test_api_fuzz(daemon: Daemon, session: requests.Session, subtests: pytest.Subtests) -> None:
    _restore_seeded(daemon, list(SEEDED))
    POOL_ROOT[:] = [daemon.root / "fuzz-pools"]
    config = schemathesis.Config.from_dict(
        {
            "seed": SEED,
            "suppress-health-check": ["all"],
            "generation": {"max-examples": MAX_EXAMPLES, "database": "none", "no-shrink": True},
        }
    )
    schema = schemathesis.openapi.from_dict(daemon.api.get("/openapi.json"), config=config)
    operations = [r.ok() for r in schema.get_all_operations()]
    assert len(operations) > 10, [op.label for op in operations]

    def run(case: schemathesis.Case) -> None:
        request = f"{case.method.upper()} {case.formatted_path}"
        if request in EXCLUDED or request.startswith("POST /v1/images/build/"):  # e.g. a wrong-method probe
            return
        seeded = _steer(case)
        if seeded is not None:
            _restore_seeded(daemon, [seeded])
        response = case.call(base_url=BASE_URL, session=session, timeout=REQUEST_TIMEOUT_S)
        case.validate_response(response, checks=CHECKS)

    for op in operations:
        if op.label in EXCLUDED:
            continue
        test = create_test(
            operation=op,
            test_func=run,
            config=HypothesisTestConfig(
                project=schema.config,
                modes=list(HypothesisTestMode),
                settings=schema.config.get_hypothesis_settings(operation=op, phase="fuzzing"),
                seed=SEED,
            ),
        )
        with subtests.test(msg=op.label):
            test()
    log = (daemon.root / "daemon.log").read_text(errors="replace")
    assert "Traceback" not in log, log[-4000:]
