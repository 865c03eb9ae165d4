"""The links driver: owns the tunnel devices vxlan.calico, vxlan-v6.calico and tunl0, their address,
FDB and neighbours.

API model, like the route driver: `set_vxlan()` / `set_ipip()` declare the desired state (no I/O),
`apply()` reconciles the kernel with it, `queue_resync()` makes the next apply read everything
back even if nothing changed (periodic drift repair: a device, FDB entry or neighbour deleted by
hand comes back).

What is ours: the device names `names.VXLAN_DEVICE`, `names.VXLAN_V6_DEVICE` and
`names.IPIP_DEVICE`, every permanent FDB and neighbour entry on the VXLAN devices, and the global
addresses on all three (an IPv6 device's kernel-made link-local address is left alone). A VXLAN
device whose VNI, port, parent or local address is wrong is deleted and recreated (its routes go
with it, the route driver puts them back on its next apply).

vxlan-v6.calico is Felix's IPv6 VTEP: the same VNI and UDP port as vxlan.calico, its local address
the node's IPv6 address (so the two devices' sockets never clash), the Node's
vxlanTunnelMACAddrV6 and ipv6VXLANTunnelAddr, IPv6 FDB destinations and NDP neighbour entries,
and an MTU 70 bytes below its parent's (the outer IPv6 header is 20 bytes longer).

IPIP: once the ipip module is loaded every namespace has a fallback tunl0 (`ipip any remote any`),
which is adopted as it is; without the module the device cannot be created at all ("Unknown device
type"), which is reported once per change of the desired state as one error line naming
CONFIG_NET_IPIP, and the device is listed in `unavailable` so that routes through it are not
attempted (no crash loop, no retry storm).

Apply is a full read-back of the two devices each time the desired state changed or a resync is
due; it costs a handful of netlink dumps and only runs when something changed.

Thread ownership: the agent's main loop.
"""

from __future__ import annotations

import errno
import ipaddress
import logging
from dataclasses import dataclass, field, replace
from typing import Callable, Iterable

from felixpy import names
from felixpy.kernel.netlink import NetlinkError
from felixpy.kernel.tunnels import FdbEntry, NeighEntry, TunnelLink, TunnelNetlink

__all__ = ["IpipDevice", "LinksResult", "TunnelLinks", "VxlanDevice", "Vtep",
           "VXLAN_OVERHEAD", "VXLAN_V6_OVERHEAD", "IPIP_OVERHEAD", "IPIP_MISSING"]

log = logging.getLogger(__name__)

VXLAN_OVERHEAD = 50
VXLAN_V6_OVERHEAD = 70
IPIP_OVERHEAD = 20
IPIP_MISSING = ("IPIP encapsulation needs CONFIG_NET_IPIP (the ipip kernel module), which this kernel "
                "lacks: tunl0 cannot be created, so blocks of IPIP pools are not routed")


@dataclass(frozen=True, slots=True)
class VxlanDevice:
    """This node's VTEP of one family (local_ip's). `mtu` 0 means the parent's MTU minus
    VXLAN_OVERHEAD (VXLAN_V6_OVERHEAD over IPv6)."""

    local_ip: str  # the node IP; its interface is the parent
    mac: str
    address: str | None  # the node's VXLAN tunnel address, None until IPAM gave one
    mtu: int = 0
    vni: int = names.VXLAN_VNI
    port: int = names.VXLAN_PORT

    def __post_init__(self) -> None:
        object.__setattr__(self, "mac", self.mac.lower())

    @property
    def version(self) -> int:
        return 6 if ":" in self.local_ip else 4


@dataclass(frozen=True, slots=True, order=True)
class Vtep:
    """A remote node's VTEP: its tunnel address and MAC, reached over its node IP."""

    tunnel_ip: str
    mac: str
    node_ip: str

    def __post_init__(self) -> None:
        object.__setattr__(self, "mac", self.mac.lower())


@dataclass(frozen=True, slots=True)
class IpipDevice:
    """This node's tunl0. `mtu` 0 means the node interface's MTU minus IPIP_OVERHEAD."""

    local_ip: str
    address: str | None
    mtu: int = 0


@dataclass(frozen=True)
class LinksResult:
    changes: tuple[str, ...] = ()  # human-readable, for logs and tests
    unavailable: frozenset[str] = frozenset()  # devices that are wanted but not there
    failed: dict[str, str] = field(default_factory=dict)  # device -> error
    # A device was created or deleted: routes through it were dropped by the kernel, so the
    # route driver must read back before trusting its picture.
    devices_changed: bool = False


class TunnelLinks:
    """Reconciles vxlan.calico and tunl0 with the declared desired state."""

    def __init__(self, *, netlink: TunnelNetlink | None = None) -> None:
        if netlink is None:
            from felixpy.kernel.tunnels import TunnelKernel

            netlink = TunnelKernel()
        self._nl = netlink
        self._vxlan: dict[int, VxlanDevice | None] = {4: None, 6: None}
        self._vteps: dict[int, frozenset[Vtep]] = {4: frozenset(), 6: frozenset()}
        self._ipip: IpipDevice | None = None
        self._dirty = True
        self._unavailable: frozenset[str] = frozenset()
        self._reported: set[str] = set()  # one error line per device until it works again

    @property
    def unavailable(self) -> frozenset[str]:
        """Wanted devices that are not usable (missing parent, no kernel support, failed)."""
        return self._unavailable

    def set_vxlan(self, device: VxlanDevice | None, vteps: Iterable[Vtep] = (), *, version: int = 4) -> None:
        """vxlan.calico (version 4) or vxlan-v6.calico (version 6); None: no such device."""
        vteps = frozenset(vteps) if device is not None else frozenset()
        if device is not None and device.version != version:
            raise ValueError(f"VXLAN device for IPv{version} with local address {device.local_ip}")
        if device != self._vxlan[version] or vteps != self._vteps[version]:
            self._vxlan[version], self._vteps[version] = device, vteps
            self._dirty = True

    def set_ipip(self, device: IpipDevice | None) -> None:
        if device != self._ipip:
            self._ipip = device
            self._reported.discard(names.IPIP_DEVICE)
            self._dirty = True

    def queue_resync(self) -> None:
        self._dirty = True

    @property
    def dirty(self) -> bool:
        return self._dirty

    def apply(self) -> LinksResult:
        if not self._dirty:
            return LinksResult(unavailable=self._unavailable)
        self._dirty = False
        changes: list[str] = []
        unavailable: set[str] = set()
        failed: dict[str, str] = {}
        steps: tuple[tuple[str, Callable[[list[str]], bool]], ...] = (
            (names.VXLAN_DEVICE, lambda c: self._apply_vxlan(c, 4)),
            (names.VXLAN_V6_DEVICE, lambda c: self._apply_vxlan(c, 6)),
            (names.IPIP_DEVICE, self._apply_ipip),
        )
        for device, step in steps:
            try:
                if not step(changes):
                    unavailable.add(device)
            except NetlinkError as exc:
                unavailable.add(device)
                failed[device] = str(exc)
                self._dirty = True  # retried on the next apply
                log.warning("tunnel device programming failed device=%s error=%s", device, exc)
        self._unavailable = frozenset(unavailable)
        if changes:
            log.info("tunnel devices applied changes=%d: %s", len(changes), "; ".join(changes))
        devices_changed = any(c.startswith(("created ", "deleted ")) for c in changes)
        return LinksResult(tuple(changes), self._unavailable, failed, devices_changed)

    # -- vxlan.calico and vxlan-v6.calico ---------------------------------------------------
    def _apply_vxlan(self, changes: list[str], version: int) -> bool:
        name = names.VXLAN_DEVICE if version == 4 else names.VXLAN_V6_DEVICE
        want = self._vxlan[version]
        have = self._nl.get_link(name)
        if want is None:
            if have is not None:
                self._nl.delete_link(have.index)
                changes.append(f"deleted {name}")
            return True
        parent = self._nl.parent_of(want.local_ip)
        if parent is None:
            # The node IP is not configured (yet): nothing to build the VTEP on; retried.
            self._report(name, f"no interface carries the node IP {want.local_ip}; {name} waits for it")
            self._dirty = True
            return False
        mtu = want.mtu or parent.mtu - (VXLAN_OVERHEAD if version == 4 else VXLAN_V6_OVERHEAD)
        if have is not None and not _vxlan_matches(have, want, parent.index):
            log.info("recreating %s: kind=%s vni=%s port=%s local=%s parent=%s", name, have.kind,
                     have.vxlan_id, have.vxlan_port, have.vxlan_local, have.vxlan_link)
            self._nl.delete_link(have.index)
            changes.append(f"deleted mismatched {name}")
            have = None
        if have is None:
            self._nl.create_vxlan(name, vni=want.vni, port=want.port, parent=parent.index,
                                  local=want.local_ip, mac=want.mac, mtu=mtu)
            changes.append(f"created {name} vni {want.vni} parent {parent.name} mtu {mtu}")
            have = self._nl.get_link(name)
            if have is None:
                raise NetlinkError("link get", name, errno.ENODEV, "vanished right after creation")
        if have.mac != want.mac:
            # A VTEP's MAC is what remote nodes' FDB entries point at: it must be the Node's.
            self._nl.set_link(have.index, up=False)
            self._nl.set_link(have.index, mac=want.mac)
            changes.append(f"{name} mac {want.mac}")
            have = replace(have, up=False)
        self._sync_mtu_up_address(name, have, mtu, want.address, changes)
        vteps = self._vteps[version]
        self._sync_fdb(have.index, {FdbEntry(v.mac, v.node_ip) for v in vteps}, changes)
        self._sync_neigh(have.index, {NeighEntry(v.tunnel_ip, v.mac) for v in vteps}, changes)
        self._reported.discard(name)
        return True

    def _sync_fdb(self, index: int, want: set[FdbEntry], changes: list[str]) -> None:
        have = self._nl.list_fdb(index)
        for entry in sorted(have - want):
            self._nl.delete_fdb(index, entry)
            changes.append(f"fdb del {entry.mac} dst {entry.dst}")
        for entry in sorted(want - have):
            self._nl.add_fdb(index, entry)
            changes.append(f"fdb add {entry.mac} dst {entry.dst}")

    def _sync_neigh(self, index: int, want: set[NeighEntry], changes: list[str]) -> None:
        have = self._nl.list_neigh(index)
        wanted_ips = {e.ip for e in want}
        for entry in sorted(have - want):
            if entry.ip not in wanted_ips:  # a wrong MAC is fixed by the replace below
                self._nl.delete_neigh(index, entry)
                changes.append(f"neigh del {entry.ip}")
        for entry in sorted(want - have):
            self._nl.replace_neigh(index, entry)
            changes.append(f"neigh {entry.ip} lladdr {entry.mac}")

    # -- tunl0 -----------------------------------------------------------------------------
    def _apply_ipip(self, changes: list[str]) -> bool:
        name = names.IPIP_DEVICE
        want = self._ipip
        have = self._nl.get_link(name)
        if want is None:
            if have is not None and have.addresses:
                # The fallback tunl0 cannot be deleted while the module is loaded: just stop
                # using it (our address off, link down).
                self._sync_addresses(have, None, changes)
                self._nl.set_link(have.index, up=False)
                changes.append(f"{name} down")
            return True
        if have is None:
            try:
                self._nl.create_ipip(name)
            except NetlinkError as exc:
                if exc.errno in (errno.EOPNOTSUPP, errno.ENOENT, errno.EAFNOSUPPORT):
                    self._report(name, f"{IPIP_MISSING} ({exc})", error=True)
                    return False
                if exc.errno != errno.EEXIST:  # EEXIST: the module just loaded; adopt it
                    raise
            else:
                changes.append(f"created {name}")
            have = self._nl.get_link(name)
            if have is None:
                raise NetlinkError("link get", name, errno.ENODEV, "vanished right after creation")
        if have.kind and have.kind != "ipip":
            self._report(name, f"{name} exists but is a {have.kind} device, not ipip; not touching it",
                         error=True)
            return False
        mtu = want.mtu
        if not mtu:
            parent = self._nl.parent_of(want.local_ip)
            mtu = (parent.mtu if parent is not None else 1500) - IPIP_OVERHEAD
        self._sync_mtu_up_address(name, have, mtu, want.address, changes)
        self._reported.discard(name)
        return True

    # -- shared ----------------------------------------------------------------------------
    def _sync_mtu_up_address(self, name: str, have: TunnelLink, mtu: int, address: str | None,
                             changes: list[str]) -> None:
        """What both tunnel devices need once they exist: their MTU, up, and our address on them."""
        if have.mtu != mtu:
            self._nl.set_link(have.index, mtu=mtu)
            changes.append(f"{name} mtu {mtu}")
        if not have.up:
            self._nl.set_link(have.index, up=True)
            changes.append(f"{name} up")
        self._sync_addresses(have, address, changes)

    def _sync_addresses(self, have: TunnelLink, address: str | None, changes: list[str]) -> None:
        addr = ipaddress.ip_address(address) if address else None
        want = {f"{addr}/{addr.max_prefixlen}"} if addr is not None else set()
        for cidr in sorted(have.addresses - want):
            self._nl.delete_address(have.index, cidr)
            changes.append(f"{have.name} addr del {cidr}")
        for cidr in sorted(want - have.addresses):
            self._nl.add_address(have.index, cidr)
            changes.append(f"{have.name} addr add {cidr}")

    def _report(self, device: str, message: str, *, error: bool = False) -> None:
        if device in self._reported:
            return
        self._reported.add(device)
        (log.error if error else log.warning)("%s", message)


def _vxlan_matches(have: TunnelLink, want: VxlanDevice, parent_index: int) -> bool:
    return (
        have.kind == "vxlan"
        and have.vxlan_id == want.vni
        and have.vxlan_port == want.port
        and have.vxlan_local == want.local_ip
        and have.vxlan_link == parent_index
        and not have.vxlan_learning
    )

