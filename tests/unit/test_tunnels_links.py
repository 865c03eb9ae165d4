"""The links driver and TunnelManager against a stateful fake kernel (no root, no network)."""

from __future__ import annotations

import errno
from dataclasses import replace

import pytest

from felixpy import names
from felixpy.dataplane.drivers.links import IPIP_MISSING, TunnelLinks, Vtep, VxlanDevice
from felixpy.dataplane.managers.tunnels import TunnelManager
from felixpy.kernel.netlink import NetlinkError
from felixpy.kernel.tunnels import FdbEntry, NeighEntry, ParentLink, TunnelLink
from felixpy.messages import RouteSpec

MAC = "66:00:00:00:00:01"
V2 = Vtep("10.244.2.0", "66:00:00:00:00:02", "192.0.2.12")
V3 = Vtep("10.244.3.0", "66:00:00:00:00:03", "192.0.2.13")


class FakeKernel:
    """Links, addresses, FDB and neighbours of one namespace; `calls` records every write."""

    def __init__(self, *, ipip_module: bool = True, fallback_tunl0: bool = False) -> None:
        self.parents = {"192.0.2.11": ParentLink("eth0", 2, 1500)}
        self.links: dict[str, TunnelLink] = {}
        self.fdb: dict[int, set[FdbEntry]] = {}
        self.neigh: dict[int, set[NeighEntry]] = {}
        self.ipip_module = ipip_module
        self.calls: list[str] = []
        self._next = 10
        if fallback_tunl0:
            self._add(TunnelLink("tunl0", 0, "ipip", "", 1480, False, frozenset()))

    def _add(self, link: TunnelLink) -> None:
        self._next += 1
        self.links[link.name] = replace(link, index=self._next)
        self.fdb[self._next], self.neigh[self._next] = set(), set()

    def _by_index(self, index: int) -> TunnelLink:
        return next(link for link in self.links.values() if link.index == index)

    def _update(self, index: int, **changes: object) -> None:
        link = self._by_index(index)
        self.links[link.name] = replace(link, **changes)  # type: ignore[arg-type]

    def get_link(self, name: str) -> TunnelLink | None:
        return self.links.get(name)

    def parent_of(self, ip: str) -> ParentLink | None:
        return self.parents.get(ip)

    def create_vxlan(self, name: str, *, vni: int, port: int, parent: int, local: str, mac: str, mtu: int) -> None:
        self.calls.append(f"create {name}")
        self._add(TunnelLink(name, 0, "vxlan", mac, mtu, False, frozenset(), vni, port, local, parent, False))

    def create_ipip(self, name: str) -> None:
        self.calls.append(f"create {name}")
        if not self.ipip_module:
            raise NetlinkError("link add", f"{name} type ipip", errno.EOPNOTSUPP, "EOPNOTSUPP")
        self._add(TunnelLink(name, 0, "ipip", "", 1480, False, frozenset()))

    def delete_link(self, index: int) -> None:
        self.calls.append(f"delete {index}")
        del self.links[self._by_index(index).name]

    def set_link(self, index: int, *, mac: str | None = None, mtu: int | None = None, up: bool | None = None) -> None:
        self.calls.append(f"set {index} mac={mac} mtu={mtu} up={up}")
        link = self._by_index(index)
        self._update(index, mac=mac or link.mac, mtu=mtu or link.mtu, up=link.up if up is None else up)

    def add_address(self, index: int, cidr: str) -> None:
        self.calls.append(f"addr add {cidr}")
        self._update(index, addresses=self._by_index(index).addresses | {cidr})

    def delete_address(self, index: int, cidr: str) -> None:
        self.calls.append(f"addr del {cidr}")
        self._update(index, addresses=self._by_index(index).addresses - {cidr})

    def list_fdb(self, index: int) -> set[FdbEntry]:
        return set(self.fdb[index])

    def add_fdb(self, index: int, entry: FdbEntry) -> None:
        self.calls.append(f"fdb add {entry.mac} {entry.dst}")
        self.fdb[index].add(entry)

    def delete_fdb(self, index: int, entry: FdbEntry) -> None:
        self.calls.append(f"fdb del {entry.mac} {entry.dst}")
        self.fdb[index].discard(entry)

    def list_neigh(self, index: int) -> set[NeighEntry]:
        return set(self.neigh[index])

    def replace_neigh(self, index: int, entry: NeighEntry) -> None:
        self.calls.append(f"neigh {entry.ip} {entry.mac}")
        self.neigh[index] = {e for e in self.neigh[index] if e.ip != entry.ip} | {entry}

    def delete_neigh(self, index: int, entry: NeighEntry) -> None:
        self.calls.append(f"neigh del {entry.ip}")
        self.neigh[index].discard(entry)


def vxlan_device(**kw: object) -> VxlanDevice:
    args: dict[str, object] = {"local_ip": "192.0.2.11", "mac": MAC, "address": "10.244.1.0"}
    args.update(kw)
    return VxlanDevice(**args)  # type: ignore[arg-type]


def test_vxlan_device_fdb_and_neighbours_are_created_then_left_alone() -> None:
    kernel = FakeKernel()
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
    kernel = FakeKernel()
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
    kernel = FakeKernel()
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
    kernel = FakeKernel()
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
    kernel = FakeKernel()
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
    kernel = FakeKernel(ipip_module=False)
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

    kernel = FakeKernel(fallback_tunl0=True)
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

    def set_vxlan(self, device: object, vteps: object = ()) -> None:
        self.calls.append(("vxlan", (device, vteps)))

    def set_ipip(self, device: object) -> None:
        self.calls.append(("ipip", device))


ENCAP = dict(local_ip="192.0.2.11", vxlan=True, vxlan_address="10.244.1.0", vxlan_mac=MAC,
             vteps=[("10.244.2.0", V2.mac, "192.0.2.12")], ipip=False, ipip_address=None)


def test_manager_hands_the_driver_only_changes() -> None:
    fake = FakeLinks()
    mgr = TunnelManager(fake, vxlan_mtu=1410)  # type: ignore[arg-type]
    mgr.on_encap(**ENCAP)  # type: ignore[arg-type]
    mgr.complete_deferred_work()
    assert fake.calls == [("vxlan", (vxlan_device(mtu=1410), frozenset({V2}))), ("ipip", None)]
    fake.calls.clear()
    mgr.on_encap(**ENCAP)  # type: ignore[arg-type]
    mgr.complete_deferred_work()
    assert fake.calls == []
    mgr.on_encap(**{**ENCAP, "vteps": []})  # type: ignore[arg-type]
    mgr.complete_deferred_work()
    assert fake.calls[0] == ("vxlan", (vxlan_device(mtu=1410), frozenset()))


def test_manager_waits_for_the_mac_and_filters_routes_through_unusable_devices() -> None:
    fake = FakeLinks()
    mgr = TunnelManager(fake)  # type: ignore[arg-type]
    mgr.on_encap(**{**ENCAP, "vxlan_mac": None})  # type: ignore[arg-type]
    mgr.complete_deferred_work()
    assert fake.calls[0] == ("vxlan", (None, frozenset()))
    routes = {RouteSpec("10.244.2.0/26", gateway="10.244.2.0", iface=names.VXLAN_DEVICE, onlink=True),
              RouteSpec("10.244.3.0/26", gateway="192.0.2.13", iface=names.IPIP_DEVICE, onlink=True),
              RouteSpec("10.244.1.0/26", type="blackhole")}
    assert mgr.usable_routes(routes) == {RouteSpec("10.244.1.0/26", type="blackhole")}
    mgr.on_encap(**{**ENCAP, "ipip": True})  # type: ignore[arg-type]
    assert len(mgr.usable_routes(routes)) == 3
    fake.unavailable = frozenset({names.IPIP_DEVICE})
    assert {r.iface for r in mgr.usable_routes(routes)} == {None, names.VXLAN_DEVICE}
