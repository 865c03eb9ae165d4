"""Tunnel address allocation at startup (calico-reference §2.5), against the in-memory datastore."""

from __future__ import annotations

import ipaddress
from typing import Any

from felixpy.datastore import keys
from felixpy.datastore.memory import MemoryDatastore
from felixpy.ipam.allocator import IPAM
from felixpy.node.startup import ensure_tunnel_addresses, random_vtep_mac

NODE_KEY = keys.resource_key("nodes", "n1")


def make_store(*, vxlan: str = "Always", ipip: str = "Never", selector: str = "") -> MemoryDatastore:
    store = MemoryDatastore()
    store.create(NODE_KEY, {"apiVersion": "projectcalico.org/v3", "kind": "Node",
                            "metadata": {"name": "n1", "labels": {"zone": "a"}},
                            "spec": {"bgp": {"ipv4Address": "192.0.2.11/24"}}})
    set_pool(store, vxlan=vxlan, ipip=ipip, selector=selector, create=True)
    return store


def set_pool(store: MemoryDatastore, *, vxlan: str = "Never", ipip: str = "Never", selector: str = "",
             create: bool = False) -> None:
    key = keys.resource_key("ippools", "p")
    value = {"apiVersion": "projectcalico.org/v3", "kind": "IPPool", "metadata": {"name": "p"},
             "spec": {"cidr": "10.244.0.0/16", "blockSize": 26, "vxlanMode": vxlan, "ipipMode": ipip,
                      "nodeSelector": selector, "allowedUses": ["Workload", "Tunnel"]}}
    if create:
        store.create(key, value)
    else:
        store.update(key, value, store.get(key).revision)


def spec(store: MemoryDatastore) -> dict[str, Any]:
    return dict(store.get(NODE_KEY).value["spec"])


def test_vxlan_address_and_mac_are_allocated_once_and_kept() -> None:
    store = make_store()
    node = ensure_tunnel_addresses(store, "n1")
    addr = node["spec"]["ipv4VXLANTunnelAddr"]
    mac = node["spec"]["vxlanTunnelMACAddr"]
    assert ipaddress.IPv4Address(addr) in ipaddress.IPv4Network("10.244.0.0/16")
    ipam = IPAM(store, cache_ttl=0)
    assignment = ipam.get_assignment(addr)
    assert assignment is not None and assignment.handle == "vxlan-tunnel-addr-n1"
    assert assignment.attrs.get("type") == "vxlanTunnelAddress"
    # The node now has an affine block containing its tunnel address.
    assert any(ipaddress.IPv4Address(addr) in ipaddress.IPv4Network(b) for b in ipam.affine_blocks("n1"))
    revision = store.get(NODE_KEY).revision
    again = ensure_tunnel_addresses(store, "n1")  # a restart
    assert (again["spec"]["ipv4VXLANTunnelAddr"], again["spec"]["vxlanTunnelMACAddr"]) == (addr, mac)
    assert store.get(NODE_KEY).revision == revision  # nothing rewritten
    assert ipam.ips_by_handle("vxlan-tunnel-addr-n1") == [ipaddress.IPv4Address(addr)]


def test_allocation_that_never_reached_the_node_is_reused() -> None:
    store = make_store()
    ipam = IPAM(store, cache_ttl=0)
    [ip] = ipam.auto_assign(num=1, handle="vxlan-tunnel-addr-n1", attrs={"type": "vxlanTunnelAddress"}, node="n1")
    node = ensure_tunnel_addresses(store, "n1")
    assert node["spec"]["ipv4VXLANTunnelAddr"] == str(ip)
    assert ipam.ips_by_handle("vxlan-tunnel-addr-n1") == [ip]


def test_released_when_the_pool_is_no_longer_encapsulated() -> None:
    store = make_store()
    addr = ensure_tunnel_addresses(store, "n1")["spec"]["ipv4VXLANTunnelAddr"]
    set_pool(store, vxlan="Never")
    node = ensure_tunnel_addresses(store, "n1")
    assert "ipv4VXLANTunnelAddr" not in node["spec"] and "vxlanTunnelMACAddr" not in node["spec"]
    ipam = IPAM(store, cache_ttl=0)
    assert ipam.get_assignment(addr) is None
    assert ipam.ips_by_handle("vxlan-tunnel-addr-n1") == []


def test_switch_from_vxlan_to_ipip() -> None:
    store = make_store()
    ensure_tunnel_addresses(store, "n1")
    set_pool(store, ipip="CrossSubnet")
    node = ensure_tunnel_addresses(store, "n1")
    ipip = node["spec"]["bgp"]["ipv4IPIPTunnelAddr"]
    assert node["spec"]["bgp"]["ipv4Address"] == "192.0.2.11/24"
    assert "ipv4VXLANTunnelAddr" not in node["spec"]
    ipam = IPAM(store, cache_ttl=0)
    assignment = ipam.get_assignment(ipip)
    assert assignment is not None and assignment.handle == "ipip-tunnel-addr-n1"
    assert assignment.attrs.get("type") == "ipipTunnelAddress"
    assert ipam.ips_by_handle("vxlan-tunnel-addr-n1") == []


def test_pool_that_does_not_select_the_node_gives_no_address() -> None:
    store = make_store(selector="zone == 'b'")
    node = ensure_tunnel_addresses(store, "n1")
    assert "ipv4VXLANTunnelAddr" not in node["spec"]


def test_random_vtep_mac_is_unicast_and_locally_administered() -> None:
    for _ in range(50):
        first = int(random_vtep_mac().split(":")[0], 16)
        assert first & 0x01 == 0 and first & 0x02 == 0x02
