"""TunnelManager: the calc graph's EncapState → the links driver (vxlan.calico, tunl0).

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

TUNNEL_DEVICES = frozenset({names.VXLAN_DEVICE, names.IPIP_DEVICE})


class TunnelManager:
    def __init__(self, links: TunnelLinks, *, vxlan_mtu: int = 0, ipip_mtu: int = 0,
                 vxlan_vni: int = names.VXLAN_VNI, vxlan_port: int = names.VXLAN_PORT) -> None:
        self._links = links
        self._vxlan_mtu = vxlan_mtu  # 0: parent MTU - 50
        self._ipip_mtu = ipip_mtu  # 0: parent MTU - 20
        self._vxlan_vni = vxlan_vni  # Felix's VXLANVNI / VXLANPort
        self._vxlan_port = vxlan_port
        self._vxlan: VxlanDevice | None = None
        self._vteps: frozenset[Vtep] = frozenset()
        self._ipip: IpipDevice | None = None
        self._dirty = True
        self._missing_mac_logged = False

    def on_update(self, message: Message) -> None:
        if isinstance(message, EncapState):
            self._on_encap(message)

    def _on_encap(self, encap: EncapState) -> None:
        local_ip = encap.local_ip
        want_vxlan: VxlanDevice | None = None
        if encap.vxlan and local_ip:
            if encap.vxlan_mac:
                want_vxlan = VxlanDevice(local_ip=local_ip, mac=encap.vxlan_mac,
                                         address=encap.vxlan_address, mtu=self._vxlan_mtu,
                                         vni=self._vxlan_vni, port=self._vxlan_port)
                self._missing_mac_logged = False
            elif not self._missing_mac_logged:
                # Startup writes the MAC with the tunnel address; until then there is no VTEP.
                log.warning("VXLAN pool present but this Node has no vxlanTunnelMACAddr yet; "
                            "%s waits for it", names.VXLAN_DEVICE)
                self._missing_mac_logged = True
        want_vteps = frozenset(Vtep(v.tunnel_ip, v.mac, v.node_ip) for v in encap.vteps) \
            if want_vxlan else frozenset()
        want_ipip = IpipDevice(local_ip=local_ip, address=encap.ipip_address, mtu=self._ipip_mtu) \
            if encap.ipip and local_ip else None
        if (want_vxlan, want_vteps, want_ipip) != (self._vxlan, self._vteps, self._ipip):
            self._vxlan, self._vteps, self._ipip = want_vxlan, want_vteps, want_ipip
            self._dirty = True

    def complete_deferred_work(self) -> None:
        if self._dirty:
            self._links.set_vxlan(self._vxlan, self._vteps)
            self._links.set_ipip(self._ipip)
            self._dirty = False

    def blocked_devices(self) -> frozenset[str]:
        """The tunnel devices no route may use: not wanted, or (after an apply) not usable."""
        wanted = set()
        if self._vxlan is not None:
            wanted.add(names.VXLAN_DEVICE)
        if self._ipip is not None:
            wanted.add(names.IPIP_DEVICE)
        return (TUNNEL_DEVICES - wanted) | self._links.unavailable
