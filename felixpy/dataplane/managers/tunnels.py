"""TunnelManager: the calc graph's encapsulation state → the links driver (vxlan.calico, tunl0).

It decides what each device needs from the node's own addresses and the configured MTUs, hands
the links driver only real changes, and tells the agent which routes cannot be programmed yet
because their tunnel device is not usable (`usable_routes`): a route via vxlan.calico before the
device exists would just sit pending, and one via tunl0 on a kernel without IPIP never works.

The inputs are plain values (not the calc graph's types: calc and dataplane meet only in
felixpy/messages.py), so the agent passes the fields of `CalcGraph.encap()`.
"""

from __future__ import annotations

import logging
from typing import Iterable

from felixpy import names
from felixpy.dataplane.drivers.links import IpipDevice, LinksResult, TunnelLinks, Vtep, VxlanDevice
from felixpy.messages import RouteSpec

log = logging.getLogger(__name__)


class TunnelManager:
    def __init__(self, links: TunnelLinks, *, vxlan_mtu: int = 0, ipip_mtu: int = 0) -> None:
        self._links = links
        self._vxlan_mtu = vxlan_mtu  # 0: parent MTU - 50
        self._ipip_mtu = ipip_mtu  # 0: parent MTU - 20
        self._vxlan: VxlanDevice | None = None
        self._vteps: frozenset[Vtep] = frozenset()
        self._ipip: IpipDevice | None = None
        self._dirty = True
        self._missing_mac_logged = False

    def on_encap(
        self,
        *,
        local_ip: str | None,
        vxlan: bool,
        vxlan_address: str | None,
        vxlan_mac: str | None,
        vteps: Iterable[tuple[str, str, str]],  # (tunnel IP, MAC, node IP) of each remote VTEP
        ipip: bool,
        ipip_address: str | None,
    ) -> None:
        """Record the desired encapsulation state; no I/O."""
        want_vxlan: VxlanDevice | None = None
        if vxlan and local_ip:
            if vxlan_mac:
                want_vxlan = VxlanDevice(local_ip=local_ip, mac=vxlan_mac, address=vxlan_address,
                                         mtu=self._vxlan_mtu)
                self._missing_mac_logged = False
            elif not self._missing_mac_logged:
                # Startup writes the MAC with the tunnel address; until then there is no VTEP.
                log.warning("VXLAN pool present but this Node has no vxlanTunnelMACAddr yet; "
                            "%s waits for it", names.VXLAN_DEVICE)
                self._missing_mac_logged = True
        want_vteps = frozenset(Vtep(t, m, n) for t, m, n in vteps) if want_vxlan else frozenset()
        want_ipip = IpipDevice(local_ip=local_ip, address=ipip_address, mtu=self._ipip_mtu) \
            if ipip and local_ip else None
        if (want_vxlan, want_vteps, want_ipip) != (self._vxlan, self._vteps, self._ipip):
            self._vxlan, self._vteps, self._ipip = want_vxlan, want_vteps, want_ipip
            self._dirty = True

    def complete_deferred_work(self) -> None:
        if self._dirty:
            self._links.set_vxlan(self._vxlan, self._vteps)
            self._links.set_ipip(self._ipip)
            self._dirty = False

    def apply(self) -> LinksResult:
        return self._links.apply()

    def queue_resync(self) -> None:
        self._links.queue_resync()

    @property
    def needs_retry(self) -> bool:
        """The driver wants another apply soon (a device is waiting for its parent, or failed)."""
        return self._links.dirty

    def usable_routes(self, routes: Iterable[RouteSpec]) -> set[RouteSpec]:
        """`routes` without those through a tunnel device that is not wanted or not usable."""
        wanted = set()
        if self._vxlan is not None:
            wanted.add(names.VXLAN_DEVICE)
        if self._ipip is not None:
            wanted.add(names.IPIP_DEVICE)
        blocked = ({names.VXLAN_DEVICE, names.IPIP_DEVICE} - wanted) | self._links.unavailable
        return {r for r in routes if r.iface not in blocked}
