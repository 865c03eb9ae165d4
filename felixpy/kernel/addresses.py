"""Host interfaces and addresses: node IP autodetection (IP_AUTODETECTION_METHOD) and host MTU.

Reading the kernel (one netlink dump of links and one of addresses) is kept apart from deciding:
`list_interfaces()` returns plain values, and the selection functions (`select_address`,
`pick_host_mtu`, `pod_mtu`) are pure, so unit tests need no kernel. `can-reach` is the one method
that asks the kernel a question (the route lookup a UDP connect() performs), so it lives in
`autodetect()`.

Semantics follow calico-node (calico-reference.md §1.4, §3.5). Deliberate differences: interfaces
are enumerated sorted by name (calico-node uses the kernel's order, which is system dependent), so
"first-found" is reproducible.

Every public function takes `netns=`: when given, the netlink socket and the UDP socket are
opened inside that named network namespace (from a short-lived thread, because setns() changes
only the calling thread). The agent itself passes nothing; tests and the lab use it.
"""

from __future__ import annotations

import errno
import ipaddress
import logging
import re
import socket
from dataclasses import dataclass
from typing import Callable, Iterable, Sequence, TypeVar

from felixpy.config import AutodetectMethod, parse_autodetection_method

log = logging.getLogger(__name__)

T = TypeVar("T")
IPInterface = ipaddress.IPv4Interface | ipaddress.IPv6Interface

# calico-node's exclusions for first-found and skip-interface: container bridges, pod veths and
# tunnels carry addresses that are not the node's.
DEFAULT_EXCLUDES: tuple[str, ...] = (
    r"^docker.*", r"^cbr.*", r"^dummy.*", r"^podman.*", r"^virbr.*", r"^lxcbr.*", r"^veth.*", r"^lo",
    r"^br-.*", r"^cali.*", r"^tunl.*", r"^flannel.*", r"^kube-ipvs.*", r"^cni.*", r"^vxlan\.calico.*",
    r"^vxlan-v6\.calico.*", r"^wireguard\.cali.*", r"^wg-v6\.cali.*", r"^nodelocaldns.*",
)

DEFAULT_HOST_MTU = 1460  # Felix's choice when no interface matches MTUIfacePattern
IPIP_OVERHEAD = 20
VXLAN_OVERHEAD = 50
VXLAN_V6_OVERHEAD = 70  # the outer IPv6 header is 20 bytes longer

_IFF_UP = 0x1


class AutodetectError(Exception):
    """No usable address (or the kernel could not be read); str() is one line for the user."""


@dataclass(frozen=True, slots=True)
class Interface:
    name: str
    index: int
    up: bool
    mtu: int
    addresses: tuple[IPInterface, ...]  # global unicast only, in the kernel's order

    def addresses_of(self, version: int) -> list[IPInterface]:
        return [a for a in self.addresses if a.version == version]


def is_global_unicast(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    """Go's net.IP.IsGlobalUnicast: private ranges count, link-local/loopback/multicast do not."""
    if ip.is_unspecified or ip.is_loopback or ip.is_multicast or ip.is_link_local:
        return False
    return not (ip.version == 4 and ip == ipaddress.IPv4Address("255.255.255.255"))


# --------------------------------------------------------------------------------------------
# Reading the kernel
# --------------------------------------------------------------------------------------------


def _in_netns(netns: str | None, fn: Callable[[], T]) -> T:
    if netns is None:
        return fn()
    from felixpy.kernel.netns import run_in_netns

    return run_in_netns(netns if netns.startswith("/") else f"/run/netns/{netns}", fn)


def _read_interfaces() -> list[Interface]:
    from pyroute2 import IPRoute
    from pyroute2.netlink.exceptions import NetlinkError

    try:
        with IPRoute() as ipr:
            links = list(ipr.get_links())
            addrs = list(ipr.get_addr())
    except (NetlinkError, OSError) as exc:
        raise AutodetectError(f"cannot list interfaces: {exc}") from exc
    by_index: dict[int, list[IPInterface]] = {}
    for msg in addrs:
        # IFA_LOCAL is the local end on point-to-point links, where IFA_ADDRESS is the peer.
        text = msg.get("IFA_LOCAL") or msg.get("IFA_ADDRESS")
        if not text:
            continue
        iface = ipaddress.ip_interface(f"{text}/{msg['prefixlen']}")
        if is_global_unicast(iface.ip):
            by_index.setdefault(msg["index"], []).append(iface)
    result = [
        Interface(
            name=str(link.get("IFLA_IFNAME")),
            index=int(link["index"]),
            up=bool(link["flags"] & _IFF_UP),
            mtu=int(link.get("IFLA_MTU") or 0),
            addresses=tuple(by_index.get(link["index"], ())),
        )
        for link in links
    ]
    return sorted(result, key=lambda i: i.name)


def list_interfaces(*, netns: str | None = None) -> list[Interface]:
    """Every interface, sorted by name, with its global-unicast IPv4 and IPv6 addresses."""
    return _in_netns(netns, _read_interfaces)


# --------------------------------------------------------------------------------------------
# Autodetection
# --------------------------------------------------------------------------------------------


def _matches_any(name: str, patterns: Iterable[str]) -> bool:
    # Go's regexp.MatchString searches: "interface=eth0" also matches "veth0" unless anchored.
    return any(re.search(p, name) for p in patterns)


def _describe(method: AutodetectMethod) -> str:
    if method.kind == "first-found":
        return "first-found (all interfaces except the default exclusions)"
    return str(method)


def select_address(interfaces: Sequence[Interface], method: AutodetectMethod, version: int = 4) -> IPInterface:
    """The address `method` picks among `interfaces` (all methods except can-reach and k8s)."""
    family = f"IPv{version}"
    if method.kind == "first-found":
        candidates = [i for i in interfaces if not _matches_any(i.name, DEFAULT_EXCLUDES)]
        where = "interfaces other than the default exclusions (docker*, veth*, cali*, tunl*, lo, ...)"
    elif method.kind == "interface":
        candidates = [i for i in interfaces if _matches_any(i.name, method.args)]
        where = f"interfaces matching {', '.join(method.args)}"
    elif method.kind == "skip-interface":
        excludes = DEFAULT_EXCLUDES + method.args
        candidates = [i for i in interfaces if not _matches_any(i.name, excludes)]
        where = f"interfaces not matching {', '.join(method.args)} or the default exclusions"
    elif method.kind == "cidr":
        networks = [ipaddress.ip_network(c, strict=False) for c in method.args]
        for iface in interfaces:
            for addr in iface.addresses_of(version):
                if any(addr.ip in net for net in networks if net.version == version):
                    log.info("autodetected address method=%s interface=%s address=%s", method, iface.name, addr)
                    return addr
        raise AutodetectError(f"no {family} address found in {', '.join(method.args)} (IP_AUTODETECTION_METHOD={method})")
    else:
        raise AutodetectError(f"IP_AUTODETECTION_METHOD={method} cannot be decided from interface addresses")
    for iface in candidates:
        addrs = iface.addresses_of(version)
        if addrs:
            log.info("autodetected address method=%s interface=%s address=%s", method, iface.name, addrs[0])
            return addrs[0]
    names = ", ".join(i.name for i in candidates) or "none"
    raise AutodetectError(
        f"no {family} address found on {where} (IP_AUTODETECTION_METHOD={method}; candidates: {names})")


def find_interface_address(
    interfaces: Sequence[Interface], ip: ipaddress.IPv4Address | ipaddress.IPv6Address,
) -> tuple[Interface, IPInterface] | None:
    """The interface carrying `ip` and the address with its prefix, or None."""
    for iface in interfaces:
        for addr in iface.addresses:
            if addr.ip == ip:
                return iface, addr
    return None


def _source_address(dest: str, version: int) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    family = socket.AF_INET if version == 4 else socket.AF_INET6
    try:
        infos = socket.getaddrinfo(dest, 80, family, socket.SOCK_DGRAM)
    except socket.gaierror as exc:
        raise AutodetectError(f"can-reach={dest}: cannot resolve {dest} to an IPv{version} address: {exc.strerror}") from None
    last: OSError | None = None
    for _family, _type, _proto, _name, sockaddr in infos:
        # connect() on a UDP socket sends nothing: the kernel only picks the route and source address.
        with socket.socket(family, socket.SOCK_DGRAM) as sock:
            try:
                sock.connect(sockaddr)
            except OSError as exc:
                last = exc
                continue
            return ipaddress.ip_address(sock.getsockname()[0])
    reason = errno.errorcode.get(last.errno or 0, str(last)) if last else "no address"
    raise AutodetectError(f"can-reach={dest}: no route to {dest} ({reason}: {last.strerror if last else ''})")


def _can_reach(method: AutodetectMethod, version: int) -> IPInterface:
    dest = method.args[0]
    source = _source_address(dest, version)
    found = find_interface_address(_read_interfaces(), source)
    if found is None:
        raise AutodetectError(
            f"can-reach={dest}: source address {source} is not a global-unicast address of any interface")
    iface, addr = found
    log.info("autodetected address method=%s interface=%s address=%s", method, iface.name, addr)
    return addr


def autodetect(method: AutodetectMethod | str, version: int = 4, *, netns: str | None = None) -> IPInterface:
    """Detect the node's address (with its interface prefix) as IP_AUTODETECTION_METHOD says."""
    if isinstance(method, str):
        method = parse_autodetection_method("IP_AUTODETECTION_METHOD" if version == 4 else "IP6_AUTODETECTION_METHOD", method)
    if method.kind == "kubernetes-internal-ip":
        raise AutodetectError(
            "IP_AUTODETECTION_METHOD=kubernetes-internal-ip needs the Kubernetes Node object, which felixpy "
            "cannot read with the etcd datastore; use first-found, interface=, skip-interface=, cidr= or can-reach=")
    resolved = method
    if method.kind == "can-reach":
        return _in_netns(netns, lambda: _can_reach(resolved, version))
    return select_address(list_interfaces(netns=netns), method, version)


# --------------------------------------------------------------------------------------------
# MTU
# --------------------------------------------------------------------------------------------


def pick_host_mtu(interfaces: Sequence[Interface], pattern: str) -> int:
    """Smallest MTU among up interfaces whose name matches `pattern` (MTUIfacePattern), else 1460."""
    mtus = [i.mtu for i in interfaces if i.up and i.mtu > 0 and re.search(pattern, i.name)]
    return min(mtus) if mtus else DEFAULT_HOST_MTU


def host_mtu(pattern: str, *, netns: str | None = None) -> int:
    return pick_host_mtu(list_interfaces(netns=netns), pattern)


def pod_mtu(host: int, *, ipip: bool, vxlan: bool, ipip_mtu: int = 0, vxlan_mtu: int = 0,
            vxlan_v6: bool = False, vxlan_mtu_v6: int = 0) -> int:
    """Felix's pod MTU: the smallest over the enabled encapsulations, each either configured or
    host MTU minus its overhead; the host MTU when no encapsulation is enabled."""
    candidates = []
    if ipip:
        candidates.append(ipip_mtu or host - IPIP_OVERHEAD)
    if vxlan:
        candidates.append(vxlan_mtu or host - VXLAN_OVERHEAD)
    if vxlan_v6:
        candidates.append(vxlan_mtu_v6 or host - VXLAN_V6_OVERHEAD)
    return min(candidates) if candidates else host
