"""Network requests are checked at the edge; bridge and tap names fit IFNAMSIZ and stay unique."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from vmkit.model.network import CreateNetwork, NetworkSpec, NicRequest
from vmkit.services.networks import bridge_name, tap_name


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"name": "n", "subnet": "8.8.8.0/24"}, "not a private-use range"),
        ({"name": "n", "subnet": "10.0.0.0/30"}, "prefix length"),
        ({"name": "n", "subnet": "10.0.0.1/24"}, "host bits"),
        ({"name": "n", "subnet": "300.0.0.0/24"}, "invalid subnet"),
        ({"name": "../n"}, "invalid network name"),
        ({"name": "n", "mode": "bridge"}, "needs bridge"),
        ({"name": "n", "mode": "bridge", "bridge": "br0", "subnet": "10.0.0.0/24"}, "give no subnet"),
        ({"name": "n", "mode": "nat", "bridge": "br0"}, "give no bridge"),
        ({"name": "n", "mode": "bridge", "bridge": "this-name-is-too-long"}, "interface name"),
        ({"name": "n", "mode": "vde"}, "mode"),
        ({"name": "n", "mode": "ovs", "subnet": "10.0.0.0/24"}, "layer-2 switch"),
        ({"name": "n", "mode": "ovs", "bridge": "br0"}, "layer-2 switch"),
    ],
)
def test_bad_networks_are_refused(body: dict[str, object], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        CreateNetwork.model_validate(body)


def test_nic_requests() -> None:
    assert NicRequest(network="default", mac="52:54:00:AA:bb:01").mac == "52:54:00:aa:bb:01"
    with pytest.raises(ValidationError, match="multicast"):
        NicRequest(network="default", mac="01:54:00:aa:bb:01")
    with pytest.raises(ValidationError):
        NicRequest(network="default", mac="52:54:00:aa:bb")
    assert NicRequest(network="sw", trunks=[10, 20]).trunks == [10, 20]
    for bad in ({"vlan": 0}, {"vlan": 4095}, {"trunks": []}, {"vlan": 10, "trunks": [20]}):
        with pytest.raises(ValidationError):
            NicRequest.model_validate({"network": "sw", **bad})


def test_libvirt_shaped_defaults() -> None:
    spec = NetworkSpec(name="default", mode="nat", bridge="vk-default", subnet="192.168.122.0/24")
    assert spec.gateway == "192.168.122.1" and spec.dhcp_range == ("192.168.122.2", "192.168.122.254")
    assert NetworkSpec(name="x", mode="isolated", bridge="b", subnet="10.0.0.0/24", dhcp=False).dhcp_range is None


def test_link_names() -> None:
    assert bridge_name("default", set()) == "vk-default"
    long = "a-rather-long-network-name"
    first = bridge_name(long, set())
    assert len(first) == 15 and bridge_name(long, {first}) != first and len(bridge_name(long, {first})) == 15
    assert tap_name("web", 0, lambda n: False) == "vk-web-0"
    assert len(tap_name("a-very-long-vm-name", 12, lambda n: False)) <= 15
    assert tap_name("web", 1, lambda n: n == "vk-web-1") == "vk-t1-1"
