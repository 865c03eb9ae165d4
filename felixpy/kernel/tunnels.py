"""Typed netlink calls for tunnel devices: vxlan / ipip links, their addresses, FDB and neighbour entries.

The links driver (dataplane/drivers/links.py) works with the frozen values here (`TunnelLink`,
`FdbEntry`, `NeighEntry`) and with `NetlinkError` from kernel/netlink.py, so that unit tests can
swap in a stateful fake behind the `TunnelNetlink` protocol.

Thread ownership: a `TunnelKernel` belongs to the thread that created it (pyroute2 keeps
per-thread sockets); the agent's main loop owns the links driver's instance.
"""

from __future__ import annotations

import ipaddress
import logging
from dataclasses import dataclass
from typing import Any, Protocol

from pyroute2 import IPRoute

from felixpy.kernel.netlink import attempt, get_link_message

__all__ = ["FdbEntry", "NeighEntry", "TunnelKernel", "TunnelLink", "TunnelNetlink", "ParentLink"]

log = logging.getLogger(__name__)

AF_INET = 2
AF_INET6 = 10
AF_BRIDGE = 7
IFA_F_NODAD = 0x02
NUD_PERMANENT = 0x80
NTF_SELF = 0x02
IFF_UP = 0x1


@dataclass(frozen=True, slots=True)
class TunnelLink:
    """A tunnel device as the kernel has it. vxlan_* are None for other kinds."""

    name: str
    index: int
    kind: str  # "vxlan", "ipip", ... ("" when the kernel reports none)
    mac: str
    mtu: int
    up: bool
    addresses: frozenset[str]  # global ones, both families: "a.b.c.d/len", "fd00::1/128"
    vxlan_id: int | None = None
    vxlan_port: int | None = None
    vxlan_local: str | None = None
    vxlan_link: int | None = None
    vxlan_learning: bool | None = None


@dataclass(frozen=True, slots=True)
class ParentLink:
    """The interface carrying a given local address: the VTEP's underlay."""

    name: str
    index: int
    mtu: int


@dataclass(frozen=True, slots=True, order=True)
class FdbEntry:
    """A permanent `self` FDB entry on a vxlan device: frames for `mac` go to VTEP `dst`."""

    mac: str
    dst: str


@dataclass(frozen=True, slots=True, order=True)
class NeighEntry:
    """A permanent ARP (IPv4) or NDP (IPv6) entry on a tunnel device: `ip` is at `mac`."""

    ip: str
    mac: str


class TunnelNetlink(Protocol):
    """What the links driver needs from the kernel (real: `TunnelKernel`; tests: a fake)."""

    def get_link(self, name: str) -> TunnelLink | None: ...

    def parent_of(self, ip: str) -> ParentLink | None: ...

    def create_vxlan(self, name: str, *, vni: int, port: int, parent: int, local: str, mac: str,
                     mtu: int) -> None: ...

    def create_ipip(self, name: str) -> None: ...

    def delete_link(self, index: int) -> None: ...

    def set_link(self, index: int, *, mac: str | None = None, mtu: int | None = None,
                 up: bool | None = None) -> None: ...

    def add_address(self, index: int, cidr: str) -> None: ...

    def delete_address(self, index: int, cidr: str) -> None: ...

    def list_fdb(self, index: int) -> set[FdbEntry]: ...

    def add_fdb(self, index: int, entry: FdbEntry) -> None: ...

    def delete_fdb(self, index: int, entry: FdbEntry) -> None: ...

    def list_neigh(self, index: int) -> set[NeighEntry]: ...

    def replace_neigh(self, index: int, entry: NeighEntry) -> None: ...

    def delete_neigh(self, index: int, entry: NeighEntry) -> None: ...


class TunnelKernel:
    """The real TunnelNetlink: one pyroute2 IPRoute socket in the current thread's namespace."""

    def __init__(self, ipr: IPRoute | None = None) -> None:
        self._ipr = ipr if ipr is not None else IPRoute(groups=0)

    def close(self) -> None:
        self._ipr.close()

    # -- links -----------------------------------------------------------------------------
    def get_link(self, name: str) -> TunnelLink | None:
        msg = get_link_message(self._ipr, name)
        if msg is None:
            return None
        index = int(msg["index"])
        return _link_from_message(msg, self._addresses(index))

    def _addresses(self, index: int) -> frozenset[str]:
        msgs = []
        for family in (AF_INET, AF_INET6):
            with attempt("addr dump", f"ifindex {index}"):
                msgs.extend(self._ipr.addr("dump", family=family, index=index))
        out = set()
        for m in msgs:
            text = m.get_attr("IFA_LOCAL") or m.get_attr("IFA_ADDRESS")
            # The kernel gives every IPv6 device a link-local address of its own: not ours.
            if m["index"] == index and text and not ipaddress.ip_address(text).is_link_local:
                out.add(f"{text}/{m['prefixlen']}")
        return frozenset(out)

    def parent_of(self, ip: str) -> ParentLink | None:
        family = AF_INET6 if ":" in ip else AF_INET
        ip = str(ipaddress.ip_address(ip))
        with attempt("addr dump", f"owner of {ip}"):
            msgs = list(self._ipr.addr("dump", family=family))
        for msg in msgs:
            if (msg.get_attr("IFA_LOCAL") or msg.get_attr("IFA_ADDRESS")) != ip:
                continue
            index = int(msg["index"])
            with attempt("link get", f"ifindex {index}"):
                link = self._ipr.link("get", index=index)[0]
            return ParentLink(str(link.get_attr("IFLA_IFNAME")), index, int(link.get_attr("IFLA_MTU") or 0))
        return None

    def create_vxlan(self, name: str, *, vni: int, port: int, parent: int, local: str, mac: str,
                     mtu: int) -> None:
        local_attr = "vxlan_local6" if ":" in local else "vxlan_local"
        with attempt("link add", f"{name} type vxlan id {vni} dstport {port} local {local}"):
            self._ipr.link("add", ifname=name, kind="vxlan", vxlan_id=vni, vxlan_port=port,
                           vxlan_link=parent, vxlan_learning=0, address=mac, mtu=mtu,
                           **{local_attr: local})

    def create_ipip(self, name: str) -> None:
        with attempt("link add", f"{name} type ipip"):
            self._ipr.link("add", ifname=name, kind="ipip")

    def delete_link(self, index: int) -> None:
        with attempt("link delete", f"ifindex {index}"):
            self._ipr.link("del", index=index)

    def set_link(self, index: int, *, mac: str | None = None, mtu: int | None = None,
                 up: bool | None = None) -> None:
        changes: dict[str, Any] = {}
        if mac is not None:
            changes["address"] = mac
        if mtu is not None:
            changes["mtu"] = mtu
        if up is not None:
            changes["state"] = "up" if up else "down"
        if not changes:
            return
        with attempt("link set", f"ifindex {index} {changes}"):
            self._ipr.link("set", index=index, **changes)

    def add_address(self, index: int, cidr: str) -> None:
        iface = ipaddress.ip_interface(cidr)
        # No duplicate address detection on a tunnel address: a tentative address could not be
        # the source of the node's own traffic into the tunnel for the first second.
        extra = {"flags": IFA_F_NODAD} if iface.version == 6 else {}
        with attempt("addr add", f"{cidr} ifindex {index}"):
            self._ipr.addr("add", index=index, address=str(iface.ip), prefixlen=iface.network.prefixlen, **extra)

    def delete_address(self, index: int, cidr: str) -> None:
        iface = ipaddress.ip_interface(cidr)
        with attempt("addr delete", f"{cidr} ifindex {index}"):
            self._ipr.addr("del", index=index, address=str(iface.ip), prefixlen=iface.network.prefixlen)

    # -- FDB -------------------------------------------------------------------------------
    def list_fdb(self, index: int) -> set[FdbEntry]:
        with attempt("fdb dump", f"ifindex {index}"):
            msgs = list(self._ipr.fdb("dump", ifindex=index))
        entries = set()
        for msg in msgs:
            dst = msg.get_attr("NDA_DST")
            mac = msg.get_attr("NDA_LLADDR")
            if msg["ifindex"] != index or not dst or not mac or not msg["state"] & NUD_PERMANENT:
                continue
            entries.add(FdbEntry(str(mac).lower(), str(dst)))
        return entries

    def add_fdb(self, index: int, entry: FdbEntry) -> None:
        # "append" (NLM_F_APPEND): one MAC may need several destinations on a vxlan device; the
        # driver deletes stale ones itself.
        with attempt("fdb append", f"{entry.mac} dst {entry.dst} ifindex {index}"):
            self._ipr.fdb("append", ifindex=index, lladdr=entry.mac, dst=entry.dst,
                          state=NUD_PERMANENT)

    def delete_fdb(self, index: int, entry: FdbEntry) -> None:
        with attempt("fdb delete", f"{entry.mac} dst {entry.dst} ifindex {index}"):
            self._ipr.fdb("del", ifindex=index, lladdr=entry.mac, dst=entry.dst)

    # -- neighbours ------------------------------------------------------------------------
    def list_neigh(self, index: int) -> set[NeighEntry]:
        msgs = []
        for family in (AF_INET, AF_INET6):
            with attempt("neigh dump", f"ifindex {index}"):
                msgs.extend(self._ipr.neigh("dump", ifindex=index, family=family))
        entries = set()
        for msg in msgs:
            dst = msg.get_attr("NDA_DST")
            mac = msg.get_attr("NDA_LLADDR")
            if msg["ifindex"] != index or not dst or not mac or not msg["state"] & NUD_PERMANENT:
                continue
            entries.add(NeighEntry(str(dst), str(mac).lower()))
        return entries

    def replace_neigh(self, index: int, entry: NeighEntry) -> None:
        family = AF_INET6 if ":" in entry.ip else AF_INET
        with attempt("neigh replace", f"{entry.ip} lladdr {entry.mac} ifindex {index}"):
            self._ipr.neigh("replace", ifindex=index, dst=entry.ip, lladdr=entry.mac, state=NUD_PERMANENT,
                            family=family)

    def delete_neigh(self, index: int, entry: NeighEntry) -> None:
        family = AF_INET6 if ":" in entry.ip else AF_INET
        with attempt("neigh delete", f"{entry.ip} ifindex {index}"):
            self._ipr.neigh("del", ifindex=index, dst=entry.ip, lladdr=entry.mac, family=family)


def _link_from_message(msg: Any, addresses: frozenset[str]) -> TunnelLink:
    info = msg.get_attr("IFLA_LINKINFO")
    kind = str(info.get_attr("IFLA_INFO_KIND") or "") if info is not None else ""
    data = info.get_attr("IFLA_INFO_DATA") if info is not None else None
    vxlan: dict[str, Any] = {}
    if kind == "vxlan" and data is not None:
        learning = data.get_attr("IFLA_VXLAN_LEARNING")
        vxlan = {
            "vxlan_id": data.get_attr("IFLA_VXLAN_ID"),
            "vxlan_port": data.get_attr("IFLA_VXLAN_PORT"),
            "vxlan_local": data.get_attr("IFLA_VXLAN_LOCAL") or data.get_attr("IFLA_VXLAN_LOCAL6"),
            "vxlan_link": data.get_attr("IFLA_VXLAN_LINK"),
            "vxlan_learning": bool(learning) if learning is not None else None,
        }
    return TunnelLink(
        name=str(msg.get_attr("IFLA_IFNAME")),
        index=int(msg["index"]),
        kind=kind,
        mac=str(msg.get_attr("IFLA_ADDRESS") or "").lower(),
        mtu=int(msg.get_attr("IFLA_MTU") or 0),
        up=bool(msg["flags"] & IFF_UP),
        addresses=addresses,
        **vxlan,
    )
