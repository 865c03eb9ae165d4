"""A small synchronous rtnetlink client for pod plumbing: raw messages over one socket, no pyroute2.

Why not pyroute2 here: pyroute2 0.9 runs every request through an asyncio event loop, about
0.4–0.7 ms a request and 0.5 ms to open a socket on this VM; the same request on a raw socket
costs about 0.01 ms. A pod's veth takes a dozen requests on the CNI ADD path, so the library was
most of the plumbing time (docs/status.md has the profile). The route driver keeps pyroute2
(kernel/netlink.py): it runs on the agent's loop, a few requests per apply.

Scope: exactly the messages kernel/veth.py needs — links, addresses, neighbours, routes, and the
kernel's FIB entry for one destination — built and parsed with struct. Every change request
carries NLM_F_ACK and every call returns once the kernel has answered; a failure raises
kernel.netlink.NetlinkError naming the request and the errno.

Thread ownership: an Rtnl belongs to the thread that uses it (one per CNI request). A socket
opened in another network namespace (netns.open_netlink_socket) keeps talking to that namespace.
"""

from __future__ import annotations

import errno
import ipaddress
import os
import socket
import struct
from dataclasses import dataclass
from typing import Iterator

from felixpy.kernel.netlink import MAIN_TABLE, SCOPE_UNIVERSE, KernelRoute, NetlinkError

__all__ = ["Link", "Rtnl"]

# netlink(7) / rtnetlink(7) numbers used below
NETLINK_ROUTE = 0
NLMSG_ERROR, NLMSG_DONE = 2, 3
NLM_F_REQUEST, NLM_F_MULTI, NLM_F_ACK = 0x1, 0x2, 0x4
NLM_F_DUMP = 0x300
NLM_F_REPLACE, NLM_F_EXCL, NLM_F_CREATE = 0x100, 0x200, 0x400
RTM_NEWLINK, RTM_DELLINK, RTM_GETLINK = 16, 17, 18
RTM_NEWADDR, RTM_GETADDR = 20, 22
RTM_NEWROUTE, RTM_DELROUTE, RTM_GETROUTE = 24, 25, 26
RTM_NEWNEIGH, RTM_GETNEIGH = 28, 30
IFLA_ADDRESS, IFLA_IFNAME, IFLA_MTU, IFLA_LINKINFO, IFLA_NET_NS_FD = 1, 3, 4, 18, 28
IFLA_INFO_KIND, IFLA_INFO_DATA = 1, 2
VETH_INFO_PEER = 1
IFA_ADDRESS, IFA_LOCAL = 1, 2
NDA_DST, NDA_LLADDR = 1, 2
RTA_DST, RTA_OIF, RTA_GATEWAY, RTA_PRIORITY, RTA_TABLE = 1, 4, 5, 6, 15
RTM_F_FIB_MATCH = 0x2000
NLA_TYPE_MASK = 0x3FFF  # without NLA_F_NESTED / NLA_F_NET_BYTEORDER
IFF_UP = 0x1
NUD_PERMANENT = 0x80
RTN_UNICAST = 1
_RTN_NAMES = {1: "unicast", 2: "local", 3: "broadcast", 6: "blackhole", 7: "unreachable", 8: "prohibit"}
_RTN_NUMBERS = {name: number for number, name in _RTN_NAMES.items()}

_NLMSGHDR = struct.Struct("=IHHII")  # len, type, flags, seq, pid
_IFINFOMSG = struct.Struct("=BxHiII")  # family, type, index, flags, change
_IFADDRMSG = struct.Struct("=BBBBI")  # family, prefixlen, flags, scope, index
_NDMSG = struct.Struct("=BBHiHBB")  # family, pad, pad, ifindex, state, flags, type
_RTMSG = struct.Struct("=BBBBBBBBI")  # family, dst_len, src_len, tos, table, proto, scope, type, flags
_RTATTR = struct.Struct("=HH")
_ERRNO = struct.Struct("=i")
RECV_BUFFER = 1 << 20  # one datagram of a dump; the kernel never sends more than 64 KiB at once


@dataclass(frozen=True)
class Link:
    """What the plumbing reads back about one interface."""

    index: int
    name: str
    up: bool
    mac: str
    mtu: int
    kind: str | None  # IFLA_INFO_KIND ("veth"), None for devices without one (lo)


def _attr(kind: int, payload: bytes) -> bytes:
    length = _RTATTR.size + len(payload)
    return _RTATTR.pack(length, kind) + payload + b"\0" * (-length % 4)


def _str_attr(kind: int, text: str) -> bytes:
    return _attr(kind, text.encode() + b"\0")


def _u32_attr(kind: int, value: int) -> bytes:
    return _attr(kind, struct.pack("=I", value))


def _mac_bytes(mac: str) -> bytes:
    return bytes(int(part, 16) for part in mac.split(":"))


def _mac_text(data: bytes) -> str:
    return ":".join(f"{b:02x}" for b in data)


def _ipv4_bytes(ip: str) -> bytes:
    return ipaddress.IPv4Address(ip).packed


def _attrs(data: bytes, offset: int = 0) -> dict[int, bytes]:
    """The attributes (type -> payload) of one message body from offset on; later duplicates win."""
    found: dict[int, bytes] = {}
    while offset + _RTATTR.size <= len(data):
        length, kind = _RTATTR.unpack_from(data, offset)
        if length < _RTATTR.size:
            break
        found[kind & NLA_TYPE_MASK] = data[offset + _RTATTR.size:offset + length]
        offset += (length + 3) & ~3
    return found


def _c_string(data: bytes) -> str:
    return data.split(b"\0", 1)[0].decode(errors="replace")


class Rtnl:
    """One NETLINK_ROUTE socket; see the module docstring."""

    def __init__(self, sock: socket.socket | None = None) -> None:
        self._sock = sock if sock is not None else socket.socket(
            socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, NETLINK_ROUTE)
        self._seq = 0

    def close(self) -> None:
        self._sock.close()

    def __enter__(self) -> Rtnl:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- transport ----------------------------------------------------------------------------
    def _request(self, op: str, target: str, msg_type: int, flags: int, body: bytes,
                 ) -> list[tuple[int, bytes]]:
        """Send one request; return the (type, payload) messages of the answer (acks excluded)."""
        self._seq = (self._seq + 1) & 0xFFFFFFFF
        seq = self._seq
        header = _NLMSGHDR.pack(_NLMSGHDR.size + len(body), msg_type, NLM_F_REQUEST | flags, seq, 0)
        dump = flags & NLM_F_DUMP == NLM_F_DUMP
        try:
            self._sock.send(header + body)
            replies: list[tuple[int, bytes]] = []
            while True:
                for kind, msg_flags, msg_seq, payload in self._messages(self._sock.recv(RECV_BUFFER)):
                    if msg_seq != seq:
                        continue  # not ours (cannot happen on a private socket; be safe)
                    if kind == NLMSG_ERROR:
                        (code,) = _ERRNO.unpack_from(payload)
                        if code:
                            raise NetlinkError(op, target, -code, os.strerror(-code))
                        return replies
                    if kind == NLMSG_DONE:
                        return replies
                    replies.append((kind, payload))
                    if not dump and not msg_flags & NLM_F_MULTI and not flags & NLM_F_ACK:
                        return replies
        except OSError as exc:
            code = exc.errno or 0
            raise NetlinkError(op, target, code, exc.strerror or os.strerror(code)) from None

    @staticmethod
    def _messages(data: bytes) -> Iterator[tuple[int, int, int, bytes]]:
        offset = 0
        while offset + _NLMSGHDR.size <= len(data):
            length, kind, flags, seq, _pid = _NLMSGHDR.unpack_from(data, offset)
            if length < _NLMSGHDR.size:
                return
            yield kind, flags, seq, data[offset + _NLMSGHDR.size:offset + length]
            offset += (length + 3) & ~3

    # -- links --------------------------------------------------------------------------------
    def link(self, name: str) -> Link | None:
        """The interface called name in this socket's namespace, or None."""
        body = _IFINFOMSG.pack(socket.AF_UNSPEC, 0, 0, 0, 0) + _str_attr(IFLA_IFNAME, name)
        try:
            replies = self._request("link get", name, RTM_GETLINK, NLM_F_ACK, body)
        except NetlinkError as exc:
            if exc.errno in (errno.ENODEV, errno.ENOENT):
                return None
            raise
        for kind, payload in replies:
            if kind == RTM_NEWLINK:
                return self._parse_link(payload)
        return None

    @staticmethod
    def _parse_link(payload: bytes) -> Link:
        _family, _type, index, flags, _change = _IFINFOMSG.unpack_from(payload)
        attrs = _attrs(payload, _IFINFOMSG.size)
        kind = None
        if IFLA_LINKINFO in attrs:
            info = _attrs(attrs[IFLA_LINKINFO])
            if IFLA_INFO_KIND in info:
                kind = _c_string(info[IFLA_INFO_KIND])
        mtu = struct.unpack("=I", attrs[IFLA_MTU][:4])[0] if IFLA_MTU in attrs else 0
        return Link(index=index, name=_c_string(attrs.get(IFLA_IFNAME, b"")), up=bool(flags & IFF_UP),
                    mac=_mac_text(attrs.get(IFLA_ADDRESS, b"")), mtu=mtu, kind=kind)

    def add_veth(self, *, name: str, mac: str, mtu: int, peer_name: str, peer_mac: str,
                 peer_netns_fd: int) -> None:
        """Create a veth pair, the host end up, the peer created directly in the namespace of the fd.

        The peer cannot come up in the same request: the kernel configures it before the two ends
        are linked, and a veth without its peer refuses to open (ENOTCONN). The caller sets it up.
        """
        peer = (_IFINFOMSG.pack(socket.AF_UNSPEC, 0, 0, 0, 0)
                + _str_attr(IFLA_IFNAME, peer_name) + _attr(IFLA_ADDRESS, _mac_bytes(peer_mac))
                + (_u32_attr(IFLA_MTU, mtu) if mtu else b"") + _u32_attr(IFLA_NET_NS_FD, peer_netns_fd))
        linkinfo = _str_attr(IFLA_INFO_KIND, "veth") + _attr(IFLA_INFO_DATA, _attr(VETH_INFO_PEER, peer))
        body = (_IFINFOMSG.pack(socket.AF_UNSPEC, 0, 0, IFF_UP, IFF_UP)
                + _str_attr(IFLA_IFNAME, name) + _attr(IFLA_ADDRESS, _mac_bytes(mac))
                + (_u32_attr(IFLA_MTU, mtu) if mtu else b"") + _attr(IFLA_LINKINFO, linkinfo))
        self._request("veth add", f"{name} peer {peer_name}", RTM_NEWLINK,
                      NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL, body)

    def set_up(self, index: int, what: str) -> None:
        body = _IFINFOMSG.pack(socket.AF_UNSPEC, 0, index, IFF_UP, IFF_UP)
        self._request("link up", what, RTM_NEWLINK, NLM_F_ACK, body)

    def delete_link(self, *, index: int = 0, name: str = "") -> bool:
        """Delete the interface with that index (or that name); False when it does not exist."""
        body = _IFINFOMSG.pack(socket.AF_UNSPEC, 0, index, 0, 0) + (_str_attr(IFLA_IFNAME, name) if name else b"")
        what = name or f"ifindex {index}"
        try:
            self._request("link delete", what, RTM_DELLINK, NLM_F_ACK, body)
        except NetlinkError as exc:
            if exc.errno in (errno.ENODEV, errno.ENOENT):
                return False  # raced with another deleter (or the peer's deletion)
            raise
        return True

    # -- addresses and neighbours ---------------------------------------------------------------
    def replace_address(self, index: int, ip: str, prefixlen: int, what: str) -> None:
        packed = _ipv4_bytes(ip)
        body = (_IFADDRMSG.pack(socket.AF_INET, prefixlen, 0, SCOPE_UNIVERSE, index)
                + _attr(IFA_LOCAL, packed) + _attr(IFA_ADDRESS, packed))
        self._request("addr replace", f"{ip}/{prefixlen} dev {what}", RTM_NEWADDR,
                      NLM_F_ACK | NLM_F_CREATE | NLM_F_REPLACE, body)

    def addresses(self, index: int) -> set[tuple[str, int]]:
        """(address, prefix length) of the IPv4 addresses on the interface."""
        body = _IFADDRMSG.pack(socket.AF_INET, 0, 0, 0, 0)
        found = set()
        for kind, payload in self._request("addr dump", f"ifindex {index}", RTM_GETADDR, NLM_F_DUMP, body):
            _family, prefixlen, _flags, _scope, msg_index = _IFADDRMSG.unpack_from(payload)
            attrs = _attrs(payload, _IFADDRMSG.size)
            if msg_index == index and IFA_ADDRESS in attrs:
                found.add((str(ipaddress.IPv4Address(attrs[IFA_ADDRESS])), prefixlen))
        return found

    def replace_neighbour(self, index: int, ip: str, mac: str, what: str) -> None:
        """A permanent ARP entry ip -> mac on the interface."""
        body = (_NDMSG.pack(socket.AF_INET, 0, 0, index, NUD_PERMANENT, 0, 0)
                + _attr(NDA_DST, _ipv4_bytes(ip)) + _attr(NDA_LLADDR, _mac_bytes(mac)))
        self._request("neigh replace", f"{ip} lladdr {mac} dev {what}", RTM_NEWNEIGH,
                      NLM_F_ACK | NLM_F_CREATE | NLM_F_REPLACE, body)

    def permanent_neighbours(self, index: int) -> set[tuple[str, str]]:
        """(address, MAC) of the interface's permanent IPv4 neighbour entries."""
        body = _NDMSG.pack(socket.AF_INET, 0, 0, index, 0, 0, 0)
        found = set()
        for kind, payload in self._request("neigh dump", f"ifindex {index}", RTM_GETNEIGH, NLM_F_DUMP, body):
            _family, _p1, _p2, msg_index, state, _flags, _type = _NDMSG.unpack_from(payload)
            attrs = _attrs(payload, _NDMSG.size)
            if msg_index == index and state & NUD_PERMANENT and NDA_DST in attrs:
                found.add((str(ipaddress.IPv4Address(attrs[NDA_DST])), _mac_text(attrs.get(NDA_LLADDR, b""))))
        return found

    # -- routes -------------------------------------------------------------------------------
    def _route_body(self, route: KernelRoute) -> bytes:
        net = ipaddress.IPv4Network(route.dst)
        table = route.table if route.table < 256 else 252  # RT_TABLE_COMPAT; RTA_TABLE says which
        body = _RTMSG.pack(socket.AF_INET, net.prefixlen, 0, 0, table, route.proto, route.scope,
                           _RTN_NUMBERS.get(route.type, RTN_UNICAST), 4 if route.onlink else 0)
        body += _u32_attr(RTA_TABLE, route.table)
        if net.prefixlen:
            body += _attr(RTA_DST, net.network_address.packed)
        if route.gateway:
            body += _attr(RTA_GATEWAY, _ipv4_bytes(route.gateway))
        if route.ifindex is not None:
            body += _u32_attr(RTA_OIF, route.ifindex)
        if route.priority:
            body += _u32_attr(RTA_PRIORITY, route.priority)
        return body

    def add_route(self, route: KernelRoute) -> None:
        """Create-only: EEXIST when the kernel has a route for dst at that metric already."""
        self._request("route add", route.describe(), RTM_NEWROUTE, NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL,
                      self._route_body(route))

    def replace_route(self, route: KernelRoute) -> None:
        self._request("route replace", route.describe(), RTM_NEWROUTE,
                      NLM_F_ACK | NLM_F_CREATE | NLM_F_REPLACE, self._route_body(route))

    def delete_route(self, route: KernelRoute) -> None:
        self._request("route delete", route.describe(), RTM_DELROUTE, NLM_F_ACK, self._route_body(route))

    def fib_entry(self, ip: str) -> KernelRoute | None:
        """The unicast route the kernel would use for ip (RTM_F_FIB_MATCH: the entry itself, with
        its dst and proto), or None: no route, or a blackhole / unreachable / prohibit one (the
        kernel answers those lookups with EINVAL)."""
        body = (_RTMSG.pack(socket.AF_INET, 32, 0, 0, 0, 0, 0, 0, RTM_F_FIB_MATCH)
                + _attr(RTA_DST, _ipv4_bytes(ip)))
        try:
            replies = self._request("route get", ip, RTM_GETROUTE, NLM_F_ACK, body)
        except NetlinkError as exc:
            if exc.errno in (errno.ENETUNREACH, errno.EHOSTUNREACH, errno.ESRCH, errno.EINVAL,
                             errno.EACCES):
                return None
            raise
        routes = [self._parse_route(p) for kind, p in replies if kind == RTM_NEWROUTE]
        return routes[0] if routes else None

    def routes(self, table: int = MAIN_TABLE) -> list[KernelRoute]:
        """Every IPv4 route of a table."""
        body = _RTMSG.pack(socket.AF_INET, 0, 0, 0, 0, 0, 0, 0, 0)
        found = []
        for kind, payload in self._request("route dump", f"table {table}", RTM_GETROUTE, NLM_F_DUMP, body):
            route = self._parse_route(payload)
            if route.table == table:
                found.append(route)
        return found

    @staticmethod
    def _parse_route(payload: bytes) -> KernelRoute:
        (_family, dst_len, _src_len, _tos, table, proto, scope, rtype,
         flags) = _RTMSG.unpack_from(payload)
        attrs = _attrs(payload, _RTMSG.size)
        dst = str(ipaddress.IPv4Address(attrs[RTA_DST])) if RTA_DST in attrs else "0.0.0.0"
        oif = struct.unpack("=I", attrs[RTA_OIF][:4])[0] if RTA_OIF in attrs else None
        return KernelRoute(
            dst=str(ipaddress.IPv4Network(f"{dst}/{dst_len}", strict=False)),
            type=_RTN_NAMES.get(rtype, f"type{rtype}"),
            gateway=str(ipaddress.IPv4Address(attrs[RTA_GATEWAY])) if RTA_GATEWAY in attrs else None,
            ifindex=oif,
            onlink=bool(flags & 4),
            scope=scope,
            proto=proto,
            priority=struct.unpack("=I", attrs[RTA_PRIORITY][:4])[0] if RTA_PRIORITY in attrs else 0,
            table=struct.unpack("=I", attrs[RTA_TABLE][:4])[0] if RTA_TABLE in attrs else table,
        )

