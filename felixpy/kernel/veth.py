"""Pod plumbing: the veth pair between the node and a pod's network namespace (Calico's layout).

Host side `cali<11 hex>` in the node's namespace (the agent's own): MAC ee:ee:ee:ee:ee:ee,
proxy_arp=1 so it answers ARP for the pod's gateway 169.254.1.1 (configured nowhere), a permanent
neighbour entry pod IP -> container MAC. Pod side `eth0`: the pod's /32 addresses, a link route to
169.254.1.1 and a default route via it. The host /32 route to the pod is the route driver's job.

IPv6 (a pod with an IPv6 address), as Calico's CNI plugin does it: the host side gets IPv6
enabled, proxy_ndp=1 and forwarding=1, and its default gateway is the host side's own link-local
address, fe80::ecee:eeff:feee:eeee (EUI-64 of ee:ee:ee:ee:ee:ee; added explicitly so that it does
not depend on the node's addr_gen_mode); DAD is off on the host side (accept_dad=0, set before the
link comes up) and the pod's /128 is added without DAD, so neither is tentative when the pod's
first packet leaves. A permanent neighbour entry pod IPv6 -> container MAC, as for IPv4.

Speed: the veth is created with its peer directly inside the pod namespace, already named and
with a MAC we chose, so the host side never has to look into the pod to learn it; the pod side is
driven through a netlink socket opened there by `netns.iproute_in` (no thread ever switches
namespace for long, see netns.py). Safe to call from many CNI threads at once: every call uses its
own sockets.
"""

from __future__ import annotations

import errno
import ipaddress
import logging
import os
import socket
from dataclasses import dataclass
from typing import Any, Sequence

from pyroute2 import IPRoute

from felixpy import names
from felixpy.kernel import netns, sysctl
from felixpy.kernel.netlink import SCOPE_LINK, NetlinkError, attempt

__all__ = [
    "PlumbingError",
    "WorkloadPlumbing",
    "check_workload",
    "setup_workload",
    "teardown_workload",
]

log = logging.getLogger(__name__)

LOOPBACK_IFINDEX = 1  # the kernel gives lo index 1 in every network namespace
AF_INET6 = 10
IFA_F_NODAD = 0x02
IPInterface = ipaddress.IPv4Interface | ipaddress.IPv6Interface
NUD_PERMANENT = 0x80
IFF_UP = 0x1
RTPROT_BOOT = 3  # what `ip route add` and Calico's CNI plugin use for the pod's own routes


class PlumbingError(Exception):
    """Setting up, tearing down or checking a pod's veth failed; one line naming the pod side."""


@dataclass(frozen=True)
class WorkloadPlumbing:
    container_mac: str
    host_ifindex: int


def random_mac() -> str:
    """A random locally administered unicast MAC, as the kernel would pick for a veth."""
    octets = bytearray(os.urandom(6))
    octets[0] = (octets[0] & 0xFE) | 0x02
    return ":".join(f"{b:02x}" for b in octets)


def setup_workload(
    *,
    netns_path: str,
    host_iface: str,
    container_iface: str = "eth0",
    ips: Sequence[IPInterface],
    mtu: int,
    gateway: str = names.POD_GATEWAY,
    host_mac: str = names.HOST_VETH_MAC,
    gateway_v6: str = names.POD_GATEWAY_V6,
) -> WorkloadPlumbing:
    """Create (or re-create) the pod's veth pair and configure both ends; see the module docstring."""
    names.check_iface_name(host_iface)
    names.check_iface_name(container_iface)
    container_mac = random_mac()
    where = f"pod veth {host_iface} ({netns_path})"
    try:
        ns_fd = os.open(netns_path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise PlumbingError(f"{where}: cannot open network namespace: {exc.strerror}") from None
    try:
        with IPRoute(groups=0) as host:
            try:
                ipv6 = any(ip.version == 6 for ip in ips)
                host_index = _create_pair(
                    host, ns_fd, netns_path, host_iface, container_iface, container_mac, mtu,
                    host_mac, up=not ipv6,
                )
                _configure_host_side(host, host_iface, host_index, ips, container_mac, gateway_v6)
                _configure_pod_side(netns_path, container_iface, ips, gateway, gateway_v6)
            except (NetlinkError, netns.NetnsError, sysctl.SysctlError) as exc:
                # Leave nothing half-built: deleting the host end deletes the pod end too.
                _delete_link(host, host_iface)
                raise PlumbingError(f"{where}: {exc}") from None
    finally:
        os.close(ns_fd)
    log.debug("workload plumbed iface=%s netns=%s ips=%s", host_iface, netns_path,
              ",".join(str(ip) for ip in ips))
    return WorkloadPlumbing(container_mac=container_mac, host_ifindex=host_index)


def _create_pair(
    host: IPRoute,
    ns_fd: int,
    netns_path: str,
    host_iface: str,
    container_iface: str,
    container_mac: str,
    mtu: int,
    host_mac: str,
    up: bool = True,
) -> int:
    # A stale host end (a pod re-created under the same name, a crashed earlier ADD) would make the
    # add fail with EEXIST; deleting it also removes its peer and any routes on it.
    _delete_link(host, host_iface)
    peer = {"ifname": container_iface, "net_ns_fd": ns_fd, "address": container_mac, "mtu": mtu}
    request: dict[str, Any] = {
        "ifname": host_iface, "kind": "veth", "address": host_mac, "mtu": mtu, "peer": peer,
    }
    if up:
        # Saves a request; the sysctls below are in place before any packet. An IPv6 pod's host
        # side comes up only after accept_dad=0 (_configure_host_side).
        request["state"] = "up"
    try:
        with attempt("veth add", f"{host_iface} peer {container_iface}"):
            host.link("add", **request)
    except NetlinkError as exc:
        if exc.errno != errno.EEXIST:
            raise
        # The pod already has an interface of that name (a retried ADD whose host end was renamed
        # or lost): remove it and try once more.
        with netns.iproute_in(netns_path) as pod:
            _delete_link(pod, container_iface)
        with attempt("veth add", f"{host_iface} peer {container_iface}"):
            host.link("add", **request)
    with attempt("link get", host_iface):
        return int(host.link("get", ifname=host_iface)[0]["index"])


def _configure_host_side(
    host: IPRoute,
    host_iface: str,
    host_index: int,
    ips: Sequence[IPInterface],
    container_mac: str,
    gateway_v6: str = names.POD_GATEWAY_V6,
) -> None:
    # This thread never left the node's namespace, so /proc/sys here is the node's.
    sysctl.write(sysctl.iface_conf(host_iface, "proxy_arp"), 1)
    sysctl.write(sysctl.iface_neigh(host_iface, "proxy_delay"), 0)
    sysctl.write(sysctl.iface_conf(host_iface, "forwarding"), 1)
    if any(ip.version == 6 for ip in ips):
        for setting, value in (("disable_ipv6", 0), ("accept_dad", 0), ("accept_ra", 0),
                               ("proxy_ndp", 1), ("forwarding", 1)):
            sysctl.write(sysctl.iface_conf6(host_iface, setting), value)
        with attempt("addr replace", f"{gateway_v6}/64 dev {host_iface}"):
            host.addr("replace", index=host_index, address=gateway_v6, prefixlen=64, family=AF_INET6,
                      flags=IFA_F_NODAD)
        with attempt("link up", host_iface):
            host.link("set", index=host_index, state="up")
    for ip in ips:
        with attempt("neigh replace", f"{ip.ip} lladdr {container_mac} dev {host_iface}"):
            host.neigh(
                "replace", dst=str(ip.ip), lladdr=container_mac, ifindex=host_index,
                state=NUD_PERMANENT, family=AF_INET6 if ip.version == 6 else socket.AF_INET,
            )


def _configure_pod_side(
    netns_path: str,
    container_iface: str,
    ips: Sequence[IPInterface],
    gateway: str,
    gateway_v6: str = names.POD_GATEWAY_V6,
) -> None:
    with netns.iproute_in(netns_path) as pod:
        with attempt("link up", "lo (pod)"):
            pod.link("set", index=LOOPBACK_IFINDEX, state="up")
        with attempt("link get", f"{container_iface} (pod)"):
            index = int(pod.link("get", ifname=container_iface)[0]["index"])
        with attempt("link up", f"{container_iface} (pod)"):
            pod.link("set", index=index, state="up")
        for ip in ips:
            with attempt("addr add", f"{ip.ip}/{ip.ip.max_prefixlen} dev {container_iface} (pod)"):
                if ip.version == 4:
                    pod.addr("replace", index=index, address=str(ip.ip), prefixlen=32)
                else:
                    pod.addr("replace", index=index, address=str(ip.ip), prefixlen=128, family=AF_INET6,
                             flags=IFA_F_NODAD)
        if any(ip.version == 4 for ip in ips):
            with attempt("route replace", f"{gateway}/32 dev {container_iface} scope link (pod)"):
                pod.route(
                    "replace", dst=f"{gateway}/32", oif=index, scope=SCOPE_LINK, proto=RTPROT_BOOT
                )
            with attempt("route replace", f"default via {gateway} (pod)"):
                pod.route(
                    "replace", dst="0.0.0.0/0", gateway=gateway, oif=index, proto=RTPROT_BOOT
                )
        if any(ip.version == 6 for ip in ips):
            # The gateway is link-local on eth0: no link route needed, only the interface.
            with attempt("route replace", f"default via {gateway_v6} dev {container_iface} (pod)"):
                pod.route("replace", dst="::/0", gateway=gateway_v6, oif=index, proto=RTPROT_BOOT,
                          family=AF_INET6)


def teardown_workload(
    *, host_iface: str, netns_path: str | None, container_iface: str = "eth0"
) -> None:
    """Remove the pod's veth pair. Idempotent: a missing link or namespace is not an error."""
    names.check_iface_name(host_iface)
    try:
        with IPRoute(groups=0) as host:
            if _delete_link(host, host_iface):
                log.debug("workload unplumbed iface=%s", host_iface)
                return
        # The host end is gone; if the pod still has our peer (a half-done ADD), remove it there.
        if netns_path and os.path.exists(netns_path):
            with netns.iproute_in(netns_path) as pod:
                _delete_link(pod, container_iface, only_kind="veth")
    except (NetlinkError, netns.NetnsError) as exc:
        if isinstance(exc, netns.NetnsError) and exc.errno in (errno.ENOENT, errno.EINVAL):
            return  # the namespace vanished between the check and the open: nothing left to do
        raise PlumbingError(f"pod veth {host_iface} teardown: {exc}") from None


def check_workload(
    *,
    netns_path: str,
    host_iface: str,
    container_iface: str = "eth0",
    ips: Sequence[IPInterface],
    gateway: str = names.POD_GATEWAY,
    host_mac: str = names.HOST_VETH_MAC,
    gateway_v6: str = names.POD_GATEWAY_V6,
) -> list[str]:
    """Everything wrong with a pod's plumbing (CNI CHECK), one sentence each; [] means healthy."""
    problems: list[str] = []
    try:
        with IPRoute(groups=0) as host:
            host_link = _get_link(host, host_iface)
            if host_link is None:
                return [f"host interface {host_iface} does not exist"]
            host_index = int(host_link["index"])
            if not host_link["flags"] & IFF_UP:
                problems.append(f"host interface {host_iface} is down")
            if (host_link.get_attr("IFLA_ADDRESS") or "").lower() != host_mac.lower():
                problems.append(f"host interface {host_iface} MAC is not {host_mac}")
            keys = [sysctl.iface_conf(host_iface, "proxy_arp"), sysctl.iface_conf(host_iface, "forwarding")]
            if any(ip.version == 6 for ip in ips):
                keys += [sysctl.iface_conf6(host_iface, "proxy_ndp"), sysctl.iface_conf6(host_iface, "forwarding")]
            for key in keys:
                if sysctl.read(key) != "1":
                    problems.append(f"sysctl {key} is not 1")
            with attempt("neigh dump", host_iface):
                neighbours = {
                    (n.get_attr("NDA_DST"), (n.get_attr("NDA_LLADDR") or "").lower())
                    for family in (socket.AF_INET, AF_INET6)
                    for n in host.neigh("dump", ifindex=host_index, family=family)
                    if n["state"] & NUD_PERMANENT
                }
        with netns.iproute_in(netns_path) as pod:
            pod_link = _get_link(pod, container_iface)
            if pod_link is None:
                return problems + [f"pod interface {container_iface} does not exist"]
            index = int(pod_link["index"])
            mac = (pod_link.get_attr("IFLA_ADDRESS") or "").lower()
            if not pod_link["flags"] & IFF_UP:
                problems.append(f"pod interface {container_iface} is down")
            with attempt("addr dump", f"{container_iface} (pod)"):
                addrs = {(a.get_attr("IFA_ADDRESS"), a["prefixlen"])
                         for family in (socket.AF_INET, AF_INET6)
                         for a in pod.addr("dump", index=index, family=family)}
            with attempt("route dump", "main (pod)"):
                gateways = {r.get_attr("RTA_GATEWAY") for family in (socket.AF_INET, AF_INET6)
                            for r in pod.route("dump", table=254, family=family) if r["dst_len"] == 0}
        for ip in ips:
            if (str(ip.ip), ip.ip.max_prefixlen) not in addrs:
                problems.append(f"pod interface {container_iface} lacks address {ip.ip}/{ip.ip.max_prefixlen}")
            if (str(ip.ip), mac) not in neighbours:
                problems.append(f"no permanent neighbour entry {ip.ip} -> {mac} on {host_iface}")
        for version, gw in ((4, gateway), (6, gateway_v6)):
            if any(ip.version == version for ip in ips) and gw not in gateways:
                problems.append(f"pod has no default route via {gw}")
    except (NetlinkError, netns.NetnsError, sysctl.SysctlError) as exc:
        problems.append(str(exc))
    return problems


def _get_link(ipr: IPRoute, name: str) -> Any | None:
    try:
        with attempt("link get", name):
            msgs = ipr.link("get", ifname=name)
    except NetlinkError as exc:
        if exc.errno in (errno.ENODEV, errno.ENOENT):
            return None
        raise
    return msgs[0] if msgs else None


def _delete_link(ipr: IPRoute, name: str, only_kind: str | None = None) -> bool:
    """Delete a link by name; False if it did not exist."""
    link = _get_link(ipr, name)
    if link is None:
        return False
    if only_kind is not None:
        info = link.get_attr("IFLA_LINKINFO")
        kind = info.get_attr("IFLA_INFO_KIND") if info is not None else None
        if kind != only_kind:
            return False
    try:
        with attempt("link delete", name):
            ipr.link("del", index=link["index"])
    except NetlinkError as exc:
        if exc.errno in (errno.ENODEV, errno.ENOENT):
            return False  # raced with another deleter (or the peer's deletion)
        raise
    return True
