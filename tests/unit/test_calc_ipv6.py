"""The calc graph with IPv6 and dual-stack state: /128 pod routes, IPv6 blackholes, remote IPv6 blocks
over the nodes' IPv6 addresses, vxlan-v6.calico, and IPv6 support switched off."""

from __future__ import annotations

from typing import Any

from felixpy import names
from felixpy.calc.dispatcher import Dispatcher
from felixpy.calc.graph import CalcGraph
from felixpy.datastore import keys
from felixpy.datastore.syncer import KVUpdate
from felixpy.messages import RemoteVtep, Route


def node(name: str, ip4: str | None, ip6: str | None, **spec: Any) -> KVUpdate:
    bgp = {k: v for k, v in (("ipv4Address", ip4), ("ipv6Address", ip6)) if v}
    return KVUpdate(keys.resource_key("nodes", name), {"metadata": {"name": name}, "spec": {"bgp": bgp, **spec}}, 1)


def pool(name: str, cidr: str, **spec: Any) -> KVUpdate:
    return KVUpdate(keys.resource_key("ippools", name), {"spec": {"cidr": cidr, **spec}}, 1)


def affinity(node_name: str, cidr: str) -> KVUpdate:
    return KVUpdate(keys.affinity_key(node_name, cidr), {"state": "confirmed", "deleted": False}, 1)


def wep(node_name: str, pod: str, *nets: str, iface: str = "cali0123456789a") -> KVUpdate:
    key = keys.resource_key("workloadendpoints", f"{node_name}-k8s-{pod}-eth0", "x")
    return KVUpdate(key, {"metadata": {"namespace": "x"},
                          "spec": {"node": node_name, "pod": pod, "interfaceName": iface, "ipNetworks": list(nets)}}, 1)


def graph(name: str, *updates: KVUpdate, datastore_routes: bool = True, ipv6: bool = True) -> CalcGraph:
    g = CalcGraph(name, remote_routes_from_datastore=datastore_routes, ipv6=ipv6)
    Dispatcher(g).on_updates(updates)
    return g


DUAL = [
    pool("v4", "10.244.0.0/16"), pool("v6", "fd00:10:244::/64"),
    node("n1", "192.0.2.11/24", "2001:db8::11/64"), node("n2", "192.0.2.12/24", "2001:db8::12/64"),
    node("n3", "192.0.2.13/24", None),  # IPv4 only: its IPv6 blocks cannot be routed to
    affinity("n1", "10.244.1.0/26"), affinity("n1", "fd00:10:244::40/122"),
    affinity("n2", "10.244.2.0/26"), affinity("n2", "fd00:10:244::80/122"),
    affinity("n3", "fd00:10:244::c0/122"),
    wep("n1", "a", "10.244.1.1/32", "fd00:10:244::41/128"),
    wep("n2", "b", "10.244.2.1/32", "fd00:10:244::81/128", iface="calibbbbbbbbbbb"),
    # an IPv6 address borrowed from n1's block by a pod on n2
    wep("n2", "borrowed", "fd00:10:244::7f/128", iface="caliccccccccccc"),
]


def test_routes_mode_routes_ipv6_pods_blocks_and_remote_blocks() -> None:
    g = graph("n1", *DUAL)
    assert g.routes() == {
        Route("10.244.1.1/32", iface="cali0123456789a"),
        Route("fd00:10:244::41/128", iface="cali0123456789a"),
        Route("10.244.1.0/26", type="blackhole"),
        Route("fd00:10:244::40/122", type="blackhole"),
        Route("10.244.2.0/26", gateway="192.0.2.12"),
        # IPv6 blocks go via the node's IPv6 address (spec.bgp.ipv6Address)
        Route("fd00:10:244::80/122", gateway="2001:db8::12"),
        Route("fd00:10:244::7f/128", gateway="2001:db8::12"),
    }
    [local] = g.local_endpoints()
    assert local.ips == ("10.244.1.1", "fd00:10:244::41")
    assert {r.dst for r in local.routes} == {"10.244.1.1/32", "fd00:10:244::41/128"}


def test_ipv6_only_nodes_and_bgp_announcements() -> None:
    state = [pool("v6", "fd00:10:244::/64"), node("n1", None, "2001:db8::11/64"), node("n2", None, "2001:db8::12/64"),
             affinity("n1", "fd00:10:244::40/122"), affinity("n2", "fd00:10:244::80/122"),
             wep("n1", "a", "fd00:10:244::41/128"), wep("n1", "b", "fd00:10:244::99/128", iface="calibbbbbbbbbbb")]
    g = graph("n1", *state)
    assert Route("fd00:10:244::80/122", gateway="2001:db8::12") in g.routes()
    # the block, and the pod address outside it (borrowed from n2's block)
    assert g.bgp_announcements() == {"fd00:10:244::40/122", "fd00:10:244::99/128"}
    assert graph("n1", *state, datastore_routes=False).routes() == {
        Route("fd00:10:244::41/128", iface="cali0123456789a"),
        Route("fd00:10:244::99/128", iface="calibbbbbbbbbbb"),
        Route("fd00:10:244::40/122", type="blackhole"),
    }


def test_vxlan_v6_routes_every_remote_ipv6_block_via_its_vtep() -> None:
    state = [pool("v4", "10.244.0.0/16", vxlanMode="Always"), pool("v6", "fd00:10:244::/64", vxlanMode="Always"),
             node("n1", "192.0.2.11/24", "2001:db8::11/64", ipv4VXLANTunnelAddr="10.244.1.0",
                  vxlanTunnelMACAddr="66:00:00:00:00:01", ipv6VXLANTunnelAddr="fd00:10:244::40",
                  vxlanTunnelMACAddrV6="66:00:00:00:06:01"),
             node("n2", "192.0.2.12/24", "2001:db8::12/64", ipv4VXLANTunnelAddr="10.244.2.0",
                  vxlanTunnelMACAddr="66:00:00:00:00:02", ipv6VXLANTunnelAddr="fd00:10:244::80",
                  vxlanTunnelMACAddrV6="66:00:00:00:06:02"),
             affinity("n2", "10.244.2.0/26"), affinity("n2", "fd00:10:244::80/122")]
    g = graph("n1", *state, datastore_routes=False)  # VXLAN routes do not depend on the backend
    assert g.routes() == {
        Route("10.244.2.0/26", gateway="10.244.2.0", iface=names.VXLAN_DEVICE, onlink=True),
        Route("fd00:10:244::80/122", gateway="fd00:10:244::80", iface=names.VXLAN_V6_DEVICE, onlink=True),
    }
    encap = g.encap()
    assert (encap.vxlan_v6, encap.local_ipv6, encap.vxlan_v6_address, encap.vxlan_v6_mac) == \
        (True, "2001:db8::11", "fd00:10:244::40", "66:00:00:00:06:01")
    assert encap.vteps_v6 == {RemoteVtep("n2", "2001:db8::12", "fd00:10:244::80", "66:00:00:00:06:02")}
    assert encap.vteps == {RemoteVtep("n2", "192.0.2.12", "10.244.2.0", "66:00:00:00:00:02")}
    # CrossSubnet: same IPv6 subnet, no encapsulation.
    cross = [pool("v6", "fd00:10:244::/64", vxlanMode="CrossSubnet"), *state[2:]]
    assert Route("fd00:10:244::80/122", gateway="2001:db8::12") in graph("n1", *cross).routes()
    # A node without its IPv6 VTEP yet gets no IPv6 VXLAN route.
    no_vtep = [*state[:3], node("n2", "192.0.2.12/24", "2001:db8::12/64"), *state[4:]]
    assert not any(r.version == 6 for r in graph("n1", *no_vtep).routes())


def test_ipv6_support_off_leaves_every_ipv6_thing_out() -> None:
    g = graph("n1", *DUAL, ipv6=False)
    assert all(r.version == 4 for r in g.routes()) and len(g.routes()) == 3
    assert g.local_endpoints()[0].ips == ("10.244.1.1",)
    assert g.nat().all_pools == {"10.244.0.0/16"}
    assert g.bgp_announcements() == {"10.244.1.0/26"}
    assert g.encap().local_ipv6 is None


def test_nat_state_has_both_families() -> None:
    g = graph("n1", pool("v4", "10.244.0.0/16", natOutgoing=True), pool("v6", "fd00:10:244::/64", natOutgoing=True),
              pool("v6b", "fd00:99::/64"))
    assert g.nat().masq_pools == {"10.244.0.0/16", "fd00:10:244::/64"}
    assert g.nat().all_pools == {"10.244.0.0/16", "fd00:10:244::/64", "fd00:99::/64"}


def test_route_values_check_the_gateway_family() -> None:
    assert Route("FD00:10:244::41/128", iface="cali0").dst == "fd00:10:244::41/128"
    assert Route("fd00:10:244::80/122", gateway="2001:DB8::12").gateway == "2001:db8::12"
    try:
        Route("fd00:10:244::80/122", gateway="192.0.2.12")
    except ValueError as err:
        assert "gateway 192.0.2.12 is not an IPv6 address" in str(err)
    else:
        raise AssertionError("a mixed-family route was accepted")
