"""TunnelManager: the calc graph's EncapState → the links driver (vxlan.calico, vxlan-v6.calico, tunl0).

It decides what each device needs from the node's own addresses and the configured MTUs, hands
the links driver only real changes, and says which tunnel devices routes must not go through
yet (`blocked_devices()`, sent to the RouteManager as TunnelDevices after the links apply): a
route via vxlan.calico before the device exists would just sit pending, and one via tunl0 on a
kernel without IPIP never works.
"""

from __future__ import annotations

import logging

from felixpy import names
from felixpy.dataplane.drivers.links import IpipDevice, TunnelLinks, Vtep, VxlanDevice
from felixpy.messages import EncapState, Message

log = logging.getLogger(__name__)

TUNNEL_DEVICES = frozenset({names.VXLAN_DEVICE, names.VXLAN_V6_DEVICE, names.IPIP_DEVICE})


class TunnelManager:
    def __init__(self, links: TunnelLinks, *, vxlan_mtu: int = 0, ipip_mtu: int = 0,
                 vxlan_vni: int = names.VXLAN_VNI, vxlan_port: int = names.VXLAN_PORT,
                 vxlan_mtu_v6: int = 0) -> None:
        self._links = links
        self._vxlan_mtu = vxlan_mtu  # 0: parent MTU - 50
        self._vxlan_mtu_v6 = vxlan_mtu_v6  # 0: parent MTU - 70
        self._ipip_mtu = ipip_mtu  # 0: parent MTU - 20
        self._vxlan_vni = vxlan_vni  # Felix's VXLANVNI / VXLANPort
        self._vxlan_port = vxlan_port
        self._vxlan: VxlanDevice | None = None
        self._vteps: frozenset[Vtep] = frozenset()
        self._vxlan_v6: VxlanDevice | None = None
        self._vteps_v6: frozenset[Vtep] = frozenset()
        self._ipip: IpipDevice | None = None
        self._dirty = True
        self._missing_mac_logged: set[int] = set()  # IP versions whose missing MAC was logged

    def on_update(self, message: Message) -> None:
        if isinstance(message, EncapState):
            self._on_encap(message)

    def _vxlan_device(self, version: int, local_ip: str | None, enabled: bool, mac: str | None,
                      address: str | None) -> VxlanDevice | None:
        """The VTEP of one family (Felix: the same VNI and port for both, each over the node's
        address of its family), or None."""
        if not (enabled and local_ip):
            return None
        device = names.VXLAN_DEVICE if version == 4 else names.VXLAN_V6_DEVICE
        if not mac:
            if version not in self._missing_mac_logged:
                # Startup writes the MAC with the tunnel address; until then there is no VTEP.
                log.warning("VXLAN pool present but this Node has no VTEP MAC yet; %s waits for it "
                            "ip_version=%d", device, version)
                self._missing_mac_logged.add(version)
            return None
        self._missing_mac_logged.discard(version)
        return VxlanDevice(local_ip=local_ip, mac=mac, address=address,
                           mtu=self._vxlan_mtu if version == 4 else self._vxlan_mtu_v6,
                           vni=self._vxlan_vni, port=self._vxlan_port)

    def _on_encap(self, encap: EncapState) -> None:
        local_ip = encap.local_ip
        want_vxlan = self._vxlan_device(4, local_ip, encap.vxlan, encap.vxlan_mac, encap.vxlan_address)
        want_vteps = frozenset(Vtep(v.tunnel_ip, v.mac, v.node_ip) for v in encap.vteps) \
            if want_vxlan else frozenset()
        want_v6 = self._vxlan_device(6, encap.local_ipv6, encap.vxlan_v6, encap.vxlan_v6_mac,
                                     encap.vxlan_v6_address)
        want_vteps_v6 = frozenset(Vtep(v.tunnel_ip, v.mac, v.node_ip) for v in encap.vteps_v6) \
            if want_v6 else frozenset()
        want_ipip = IpipDevice(local_ip=local_ip, address=encap.ipip_address, mtu=self._ipip_mtu) \
            if encap.ipip and local_ip else None
        want = (want_vxlan, want_vteps, want_v6, want_vteps_v6, want_ipip)
        if want != (self._vxlan, self._vteps, self._vxlan_v6, self._vteps_v6, self._ipip):
            self._vxlan, self._vteps, self._vxlan_v6, self._vteps_v6, self._ipip = want
            self._dirty = True

    def complete_deferred_work(self) -> None:
        if self._dirty:
            self._links.set_vxlan(self._vxlan, self._vteps)
            self._links.set_vxlan(self._vxlan_v6, self._vteps_v6, version=6)
            self._links.set_ipip(self._ipip)
            self._dirty = False

    def blocked_devices(self) -> frozenset[str]:
        """The tunnel devices no route may use: not wanted, or (after an apply) not usable."""
        wanted = set()
        if self._vxlan is not None:
            wanted.add(names.VXLAN_DEVICE)
        if self._vxlan_v6 is not None:
            wanted.add(names.VXLAN_V6_DEVICE)
        if self._ipip is not None:
            wanted.add(names.IPIP_DEVICE)
        return (TUNNEL_DEVICES - wanted) | self._links.unavailable
