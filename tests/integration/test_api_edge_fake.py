"""Bad input is refused at the API edge with 400 and a message, and the OpenAPI document says what is checked."""

from __future__ import annotations

import pytest

from tests.conftest import Daemon
from vmkit.cli.client import ApiError
from vmkit.model.storage import IMAGE_REF_PATTERN
from vmkit.model.vm import NAME_PATTERN


def _error(d: Daemon, method: str, url: str, body: object = None) -> ApiError:
    with pytest.raises(ApiError) as e:
        d.api.request(method, url, body)
    return e.value


@pytest.mark.parametrize("data", ["é", "YQ=", "abc", "YQ==\n", "Y Q==", "YQ==YQ=="])
def test_exec_input_not_base64_is_400(fake_daemon: Daemon, data: str) -> None:
    fake_daemon.cli("vm", "create", "x", "--memory", "64")
    err = _error(fake_daemon, "POST", "/v1/vms/x/exec", {"argv": ["true"], "input_b64": data})
    assert err.status == 400 and err.message.startswith("input_b64: must be base64"), err.message


def test_exec_input_base64_passes_the_edge(fake_daemon: Daemon) -> None:
    fake_daemon.cli("vm", "create", "x", "--memory", "64")
    err = _error(fake_daemon, "POST", "/v1/vms/x/exec", {"argv": ["cat"], "input_b64": "aGk="})
    assert err.status == 409  # refused for the VM's state, not its input


@pytest.mark.parametrize("name", ["-x", "a%20b", "%C3%A9", "x" * 64, "a%0A"])
def test_malformed_names_in_paths_are_400(fake_daemon: Daemon, name: str) -> None:
    for method, url in [("GET", f"/v1/vms/{name}"), ("POST", f"/v1/vms/{name}/start"), ("GET", f"/v1/images/{name}")]:
        err = _error(fake_daemon, method, url)
        assert err.status == 400 and err.message.startswith("name: "), (url, err.message)
    assert _error(fake_daemon, "GET", "/v1/vms/" + "x" * 63).status == 404  # the longest valid name


def test_wait_for_an_unknown_word_is_400_at_once(fake_daemon: Daemon) -> None:
    fake_daemon.cli("vm", "create", "x", "--memory", "64")
    err = _error(fake_daemon, "GET", "/v1/vms/x/wait?state=runing&timeout_s=60")
    assert err.status == 400 and "'running'" in err.message and "'agent'" in err.message, err.message
    assert fake_daemon.api.get("/v1/vms/x/wait?state=shut%20off")["state"] == "shut off"


def test_operation_ids_are_checked(fake_daemon: Daemon) -> None:
    assert _error(fake_daemon, "GET", "/v1/operations/nope").status == 400
    assert _error(fake_daemon, "GET", "/v1/operations/" + "0" * 32).status == 404


def test_openapi_states_the_checks(fake_daemon: Daemon) -> None:
    doc = fake_daemon.api.get("/openapi.json")
    ops = [op for item in doc["paths"].values() for op in item.values()]
    # Invalid requests are answered 400 {"error": ...}, never FastAPI's 422.
    assert all("422" not in op["responses"] and "default" in op["responses"] for op in ops)
    start = doc["paths"]["/v1/vms/{name}/start"]["post"]
    assert start["parameters"][0]["schema"]["pattern"] == NAME_PATTERN
    assert start["responses"]["400"]["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/Error"}
    create = doc["components"]["schemas"]["CreateVm"]["properties"]
    assert create["name"]["pattern"] == NAME_PATTERN and create["image"]["pattern"] == IMAGE_REF_PATTERN
    assert "pattern" in doc["components"]["schemas"]["ExecRequest"]["properties"]["input_b64"]
    wait = {p["name"]: p["schema"] for p in doc["paths"]["/v1/vms/{name}/wait"]["get"]["parameters"]}
    assert "agent" in wait["state"]["enum"] and "shut off" in wait["state"]["enum"]
