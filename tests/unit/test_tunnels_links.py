"""The links driver and TunnelManager against a stateful fake kernel (no root, no network)."""

from __future__ import annotations

from dataclasses import replace

import pytest

from felixpy import names
from felixpy.dataplane.drivers.links import IPIP_MISSING, TunnelLinks, Vtep, VxlanDevice
from felixpy.dataplane.drivers.routes import RouteTable
from felixpy.dataplane.managers.routes import RouteManager
from felixpy.dataplane.managers.tunnels import TunnelManager
from felixpy.kernel.tunnels import FdbEntry, NeighEntry, ParentLink
from felixpy.messages import CalcRoutes, EncapState, LearnedRoutes, RemoteVtep, Route, TunnelDevices
from tests.fakes.netlink import FakeNetlink, FakeTunnelKernel

MAC = "66:00:00:00:00:01"
V2 = Vtep("10.244.2.0", "66:00:00:00:00:02", "192.0.2.12")
V3 = Vtep("10.244.3.0", "66:00:00:00:00:03", "192.0.2.13")


def vxlan_device(**kw: object) -> VxlanDevice:
    args: dict[str, object] = {"local_ip": "192.0.2.11", "mac": MAC, "address": "10.244.1.0"}
    args.update(kw)
    return VxlanDevice(**args)  # type: ignore[arg-type]


def test_vxlan_device_fdb_and_neighbours_are_created_then_left_alone() -> None:
    kernel = FakeTunnelKernel()
    links = TunnelLinks(netlink=kernel)
    links.set_vxlan(vxlan_device(), [V2, V3])
    result = links.apply()
    assert not result.failed and result.devices_changed and not result.unavailable
    dev = kernel.links[names.VXLAN_DEVICE]
    assert (dev.kind, dev.vxlan_id, dev.vxlan_port, dev.mtu, dev.up, dev.mac) == ("vxlan", 4096, 4789, 1450, True, MAC)
    assert dev.vxlan_local == "192.0.2.11" and dev.vxlan_link == 2
    assert dev.addresses == {"10.244.1.0/32"}
    assert kernel.fdb[dev.index] == {FdbEntry(V2.mac, "192.0.2.12"), FdbEntry(V3.mac, "192.0.2.13")}
    assert kernel.neigh[dev.index] == {NeighEntry("10.244.2.0", V2.mac), NeighEntry("10.244.3.0", V3.mac)}
    kernel.calls.clear()
    assert links.apply().changes == ()  # nothing declared changed: no I/O at all
    links.queue_resync()
    assert links.apply().changes == () and kernel.calls == []  # read back, all still right


def test_vtep_changes_are_minimal_deltas() -> None:
    kernel = FakeTunnelKernel()
    links = TunnelLinks(netlink=kernel)
    links.set_vxlan(vxlan_device(), [V2, V3])
    links.apply()
    kernel.calls.clear()
    moved = Vtep(V3.tunnel_ip, "66:00:00:00:00:33", "192.0.2.23")
    links.set_vxlan(vxlan_device(), [moved])
    links.apply()
    assert sorted(kernel.calls) == sorted([
        "fdb del 66:00:00:00:00:02 192.0.2.12", "fdb del 66:00:00:00:00:03 192.0.2.13",
        "fdb add 66:00:00:00:00:33 192.0.2.23",
        "neigh del 10.244.2.0", "neigh 10.244.3.0 66:00:00:00:00:33",
    ])


def test_drift_is_repaired_on_resync() -> None:
    kernel = FakeTunnelKernel()
    links = TunnelLinks(netlink=kernel)
    links.set_vxlan(vxlan_device(), [V2])
    links.apply()
    index = kernel.links[names.VXLAN_DEVICE].index
    kernel.fdb[index].clear()
    kernel.neigh[index].clear()
    kernel.fdb[index].add(FdbEntry("66:00:00:00:00:99", "192.0.2.99"))  # stale: ours, swept
    links.queue_resync()
    changes = links.apply().changes
    assert kernel.fdb[index] == {FdbEntry(V2.mac, V2.node_ip)}
    assert kernel.neigh[index] == {NeighEntry(V2.tunnel_ip, V2.mac)}
    assert "fdb del 66:00:00:00:00:99 dst 192.0.2.99" in changes

    kernel.delete_link(index)  # the whole device deleted by hand
    links.queue_resync()
    result = links.apply()
    assert result.devices_changed
    dev = kernel.links[names.VXLAN_DEVICE]
    assert dev.up and kernel.fdb[dev.index] == {FdbEntry(V2.mac, V2.node_ip)}


def test_mismatched_device_is_recreated_and_wrong_mac_fixed() -> None:
    kernel = FakeTunnelKernel()
    kernel.create_vxlan(names.VXLAN_DEVICE, vni=1, port=8472, parent=2, local="192.0.2.11", mac=MAC, mtu=1450)
    links = TunnelLinks(netlink=kernel)
    links.set_vxlan(vxlan_device(), [])
    assert "deleted mismatched vxlan.calico" in links.apply().changes
    assert kernel.links[names.VXLAN_DEVICE].vxlan_id == 4096
    links.set_vxlan(vxlan_device(mac="66:00:00:00:00:aa", mtu=1400), [])
    links.apply()
    dev = kernel.links[names.VXLAN_DEVICE]
    assert (dev.mac, dev.mtu, dev.up) == ("66:00:00:00:00:aa", 1400, True)


def test_vxlan_without_parent_waits_and_removal_deletes_device() -> None:
    kernel = FakeTunnelKernel()
    kernel.parents.clear()
    links = TunnelLinks(netlink=kernel)
    links.set_vxlan(vxlan_device(), [V2])
    assert links.apply().unavailable == {names.VXLAN_DEVICE}
    assert links.dirty  # retried on the next apply
    kernel.parents["192.0.2.11"] = ParentLink("eth0", 2, 9000)
    assert not links.apply().unavailable
    assert kernel.links[names.VXLAN_DEVICE].mtu == 8950
    links.set_vxlan(None)
    links.apply()
    assert names.VXLAN_DEVICE not in kernel.links


def test_ipip_missing_module_is_reported_once_and_not_retried(caplog: pytest.LogCaptureFixture) -> None:
    kernel = FakeTunnelKernel(ipip_module=False)
    links = TunnelLinks(netlink=kernel)
    from felixpy.dataplane.drivers.links import IpipDevice

    links.set_ipip(IpipDevice("192.0.2.11", "10.244.1.1"))
    with caplog.at_level("ERROR"):
        for _ in range(3):
            result = links.apply()
            links.queue_resync()
    assert result.unavailable == {names.IPIP_DEVICE} and not result.failed
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 1 and "CONFIG_NET_IPIP" in errors[0] and IPIP_MISSING in errors[0]
    links.apply()
    assert not links.dirty  # no retry storm: only the periodic resync tries again


def test_ipip_adopts_the_fallback_tunl0() -> None:
    from felixpy.dataplane.drivers.links import IpipDevice

    kernel = FakeTunnelKernel(fallback_tunl0=True)
    links = TunnelLinks(netlink=kernel)
    links.set_ipip(IpipDevice("192.0.2.11", "10.244.1.1"))
    links.apply()
    assert "create tunl0" not in kernel.calls
    dev = kernel.links["tunl0"]
    assert dev.up and dev.addresses == {"10.244.1.1/32"} and dev.mtu == 1480
    links.set_ipip(None)
    links.apply()
    dev = kernel.links["tunl0"]
    assert not dev.up and dev.addresses == frozenset()


class FakeLinks:
    """Records what the manager hands the driver."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, object]] = []
        self.unavailable: frozenset[str] = frozenset()
        self.dirty = False

    def set_vxlan(self, device: object, vteps: object = (), *, version: int = 4) -> None:
        self.calls.append(("vxlan" if version == 4 else "vxlan-v6", (device, vteps)))

    def set_ipip(self, device: object) -> None:
        self.calls.append(("ipip", device))


ENCAP = EncapState(local_ip="192.0.2.11", vxlan=True, vxlan_address="10.244.1.0", vxlan_mac=MAC,
                   vteps=frozenset({RemoteVtep("n2", "192.0.2.12", "10.244.2.0", V2.mac)}))


def test_manager_hands_the_driver_only_changes() -> None:
    fake = FakeLinks()
    mgr = TunnelManager(fake, vxlan_mtu=1410)  # type: ignore[arg-type]
    mgr.on_update(ENCAP)
    mgr.complete_deferred_work()
    assert fake.calls == [("vxlan", (vxlan_device(mtu=1410), frozenset({V2}))), ("vxlan-v6", (None, frozenset())),
                          ("ipip", None)]
    fake.calls.clear()
    mgr.on_update(ENCAP)
    mgr.complete_deferred_work()
    assert fake.calls == []
    mgr.on_update(replace(ENCAP, vteps=frozenset()))
    mgr.complete_deferred_work()
    assert fake.calls[0] == ("vxlan", (vxlan_device(mtu=1410), frozenset()))


def test_manager_waits_for_the_mac_and_blocks_unusable_devices() -> None:
    fake = FakeLinks()
    mgr = TunnelManager(fake)  # type: ignore[arg-type]
    mgr.on_update(replace(ENCAP, vxlan_mac=None))
    mgr.complete_deferred_work()
    assert fake.calls[0] == ("vxlan", (None, frozenset()))
    # none wanted (no IPv6 VXLAN pool either)
    assert mgr.blocked_devices() == {names.VXLAN_DEVICE, names.VXLAN_V6_DEVICE, names.IPIP_DEVICE}
    mgr.on_update(replace(ENCAP, ipip=True))
    assert mgr.blocked_devices() == {names.VXLAN_V6_DEVICE}
    fake.unavailable = frozenset({names.IPIP_DEVICE})  # wanted, but the driver could not build it
    assert mgr.blocked_devices() == {names.VXLAN_V6_DEVICE, names.IPIP_DEVICE}


def test_route_manager_leaves_out_routes_through_blocked_devices() -> None:
    nl = FakeNetlink({"eth0": 2, names.VXLAN_DEVICE: 8, names.IPIP_DEVICE: 9})
    table = RouteTable(netlink=nl)
    mgr = RouteManager(table)
    vxlan = Route("10.244.2.0/26", gateway="10.244.2.0", iface=names.VXLAN_DEVICE, onlink=True)
    ipip = Route("10.244.3.0/26", gateway="192.0.2.13", iface=names.IPIP_DEVICE, onlink=True)
    block = Route("10.244.1.0/26", type="blackhole")
    mgr.on_update(CalcRoutes(frozenset({vxlan, ipip, block})))
    mgr.on_update(LearnedRoutes({"10.244.3.0/26": "192.0.2.13"}))
    mgr.on_update(TunnelDevices(frozenset({names.IPIP_DEVICE})))  # e.g. no ipip module
    mgr.on_update(ENCAP)  # not a route manager's message: ignored
    mgr.complete_deferred_work()
    table.apply()
    # The calc's tunl0 route is left out, so the BGP-learned route for the block takes its place.
    assert mgr.desired == {vxlan, block, Route("10.244.3.0/26", gateway="192.0.2.13")}
    assert set(nl.ours()) == {vxlan.dst, ipip.dst, block.dst}
    mgr.on_update(TunnelDevices(frozenset()))
    mgr.complete_deferred_work()
    table.apply()
    assert mgr.desired == {vxlan, ipip, block} and nl.ours()[ipip.dst].ifindex == 9


def test_manager_builds_vxlan_v6_over_the_nodes_ipv6_address() -> None:
    fake = FakeLinks()
    mgr = TunnelManager(fake, vxlan_mtu_v6=1390)  # type: ignore[arg-type]
    encap = EncapState(local_ip="192.0.2.11", local_ipv6="2001:db8::11", vxlan_v6=True,
                       vxlan_v6_address="fd00:10:244::40", vxlan_v6_mac=MAC,
                       vteps_v6=frozenset({RemoteVtep("n2", "2001:db8::12", "fd00:10:244::80", V2.mac)}))
    mgr.on_update(encap)
    mgr.complete_deferred_work()
    device = VxlanDevice(local_ip="2001:db8::11", mac=MAC, address="fd00:10:244::40", mtu=1390)
    assert fake.calls == [("vxlan", (None, frozenset())),
                          ("vxlan-v6", (device, frozenset({Vtep("fd00:10:244::80", V2.mac, "2001:db8::12")}))),
                          ("ipip", None)]
    assert mgr.blocked_devices() == {names.VXLAN_DEVICE, names.IPIP_DEVICE}
