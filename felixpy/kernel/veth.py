"""Pod plumbing: the veth pair between the node and a pod's network namespace (Calico's layout).

Host side `cali<11 hex>` in the node's namespace (the agent's own): MAC ee:ee:ee:ee:ee:ee,
proxy_arp=1 so it answers ARP for the pod's gateway 169.254.1.1 (configured nowhere), a permanent
neighbour entry pod IP -> container MAC. Pod side `eth0`: the pod's /32 addresses, a link route to
169.254.1.1 and a default route via it. The host /32 route to the pod is written by the CNI path
(`add_host_routes`, with the route driver's proto and value, as Calico's CNI plugin writes it
before Felix owns it) and from then on owned by the agent's route driver.

Speed: every request goes over a raw rtnetlink socket (kernel/rtnl.py; pyroute2 costs ~40x more
per request). The veth is created with its peer directly inside the pod namespace, already named
and with a MAC we chose, so the host side never has to look into the pod to learn it; the
pod side is driven through a netlink socket opened there by `netns.open_netlink_socket` (no
thread ever switches namespace for long, see netns.py). Safe to call from many CNI threads at
once: every call uses its own sockets.

Identity: a pod's veth is removed from inside its own sandbox (CNI_NETNS), by the container
interface name, so a late DEL for an old sandbox can never remove the veth of the pod's newer
sandbox, which has the same host-side name. The host side is deleted by name only when the
caller knows it is this sandbox's (the WorkloadEndpoint names this container).
"""

from __future__ import annotations

import errno
import ipaddress
import logging
import os
from dataclasses import dataclass
from typing import Sequence

from felixpy import names
from felixpy.kernel import netns, sysctl
from felixpy.kernel.netlink import SCOPE_LINK, KernelRoute, NetlinkError
from felixpy.kernel.rtnl import Rtnl

__all__ = [
    "PlumbingError",
    "WorkloadPlumbing",
    "add_host_routes",
    "check_workload",
    "configure_workload",
    "create_workload_link",
    "random_mac",
    "setup_workload",
    "teardown_workload",
]

log = logging.getLogger(__name__)

LOOPBACK_IFINDEX = 1  # the kernel gives lo index 1 in every network namespace
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
    ips: Sequence[ipaddress.IPv4Interface],
    mtu: int,
    gateway: str = names.POD_GATEWAY,
    host_mac: str = names.HOST_VETH_MAC,
    container_mac: str | None = None,
) -> WorkloadPlumbing:
    """Create (or re-create) the pod's veth pair and configure both ends; see the module docstring.

    The two halves are also callable alone (create_workload_link, configure_workload): the CNI
    path creates the link while IPAM is choosing the address.
    """
    plumbing = create_workload_link(netns_path=netns_path, host_iface=host_iface,
                                    container_iface=container_iface, mtu=mtu, host_mac=host_mac,
                                    container_mac=container_mac)
    configure_workload(plumbing, netns_path=netns_path, host_iface=host_iface,
                       container_iface=container_iface, ips=ips, gateway=gateway)
    return plumbing


def create_workload_link(
    *,
    netns_path: str,
    host_iface: str,
    container_iface: str = "eth0",
    mtu: int,
    host_mac: str = names.HOST_VETH_MAC,
    container_mac: str | None = None,
) -> WorkloadPlumbing:
    """The veth pair alone: host end up with its sysctls, pod end (down, no address) in the pod.

    container_mac: the pod side's MAC (random when None). A stale host end of the same name is
    replaced. On failure nothing is left behind.
    """
    names.check_iface_name(host_iface)
    names.check_iface_name(container_iface)
    container_mac = container_mac or random_mac()
    where = f"pod veth {host_iface} ({netns_path})"
    try:
        ns_fd = os.open(netns_path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise PlumbingError(f"{where}: cannot open network namespace: {exc.strerror}") from None
    try:
        with Rtnl() as host:
            try:
                host_index = _create_pair(host, ns_fd, netns_path, host_iface, container_iface,
                                          container_mac, mtu, host_mac)
                # This thread never left the node's namespace, so /proc/sys here is the node's.
                sysctl.write(sysctl.iface_conf(host_iface, "proxy_arp"), 1)
                sysctl.write(sysctl.iface_neigh(host_iface, "proxy_delay"), 0)
                sysctl.write(sysctl.iface_conf(host_iface, "forwarding"), 1)
            except (NetlinkError, netns.NetnsError, sysctl.SysctlError) as exc:
                # Leave nothing half-built: deleting the host end deletes the pod end too.
                _delete_quietly(host, host_iface)
                raise PlumbingError(f"{where}: {exc}") from None
    finally:
        os.close(ns_fd)
    return WorkloadPlumbing(container_mac=container_mac, host_ifindex=host_index)


def configure_workload(
    plumbing: WorkloadPlumbing,
    *,
    netns_path: str,
    host_iface: str,
    container_iface: str = "eth0",
    ips: Sequence[ipaddress.IPv4Interface],
    gateway: str = names.POD_GATEWAY,
) -> None:
    """The pod's addresses and routes, and the host's neighbour entries, on a created link.

    On failure the pair is deleted (nothing half-configured stays behind).
    """
    where = f"pod veth {host_iface} ({netns_path})"
    with Rtnl() as host:
        try:
            for ip in ips:
                host.replace_neighbour(plumbing.host_ifindex, str(ip.ip), plumbing.container_mac, host_iface)
            _configure_pod_side(netns_path, container_iface, ips, gateway)
        except (NetlinkError, netns.NetnsError) as exc:
            _delete_quietly(host, host_iface)
            raise PlumbingError(f"{where}: {exc}") from None
    log.debug("workload plumbed iface=%s netns=%s ips=%s", host_iface, netns_path,
              ",".join(str(ip) for ip in ips))


def _delete_quietly(host: Rtnl, host_iface: str) -> None:
    try:
        host.delete_link(name=host_iface)
    except NetlinkError as exc:
        log.warning("could not remove half-built veth iface=%s error=%s", host_iface, exc)


def _create_pair(host: Rtnl, ns_fd: int, netns_path: str, host_iface: str, container_iface: str,
                 container_mac: str, mtu: int, host_mac: str) -> int:
    # A stale host end (a pod re-created under the same name, a crashed earlier ADD) would make the
    # add fail with EEXIST; deleting it also removes its peer and any routes on it.
    host.delete_link(name=host_iface)

    def add() -> None:
        host.add_veth(name=host_iface, mac=host_mac, mtu=mtu, peer_name=container_iface,
                      peer_mac=container_mac, peer_netns_fd=ns_fd)

    try:
        add()
    except NetlinkError as exc:
        if exc.errno != errno.EEXIST:
            raise
        # The pod already has an interface of that name (a retried ADD whose host end was renamed
        # or lost): remove it and try once more.
        with Rtnl(netns.open_netlink_socket(netns_path)) as pod:
            pod.delete_link(name=container_iface)
        add()
    link = host.link(host_iface)
    if link is None:
        raise NetlinkError("link get", host_iface, errno.ENODEV, "vanished right after creation")
    return link.index


def _configure_pod_side(netns_path: str, container_iface: str, ips: Sequence[ipaddress.IPv4Interface],
                        gateway: str) -> None:
    with Rtnl(netns.open_netlink_socket(netns_path)) as pod:
        pod.set_up(LOOPBACK_IFINDEX, "lo (pod)")
        link = pod.link(container_iface)
        if link is None:
            raise NetlinkError("link get", f"{container_iface} (pod)", errno.ENODEV, "no such device")
        where = f"{container_iface} (pod)"
        pod.set_up(link.index, where)
        for ip in ips:
            pod.replace_address(link.index, str(ip.ip), 32, where)
        pod.replace_route(KernelRoute(dst=f"{gateway}/32", ifindex=link.index, scope=SCOPE_LINK,
                                      proto=RTPROT_BOOT))
        pod.replace_route(KernelRoute(dst="0.0.0.0/0", gateway=gateway, ifindex=link.index,
                                      proto=RTPROT_BOOT))


def add_host_routes(routes: Sequence[KernelRoute]) -> None:
    """Write the pod's host-side /32 routes (create-only; replace only a route of the same proto).

    Like Calico's CNI plugin: a route of another owner at the pod's address is an error naming
    it, never overwritten. One of ours (the same proto: a learned /32 of a borrowed address now
    handed out here, a leftover) is replaced, as the route driver would.
    """
    with Rtnl() as host:
        for route in routes:
            try:
                host.add_route(route)
                continue
            except NetlinkError as exc:
                if exc.errno != errno.EEXIST:
                    raise PlumbingError(f"pod route {route.dst}: {exc}") from None
            try:
                existing = host.fib_entry(route.dst.split("/")[0])
                if existing is None or existing.dst != route.dst or existing.proto != route.proto:
                    owner = existing.describe() if existing is not None else "not a unicast route"
                    raise PlumbingError(f"pod route {route.dst}: a route of another owner exists "
                                        f"({owner}); not replacing it")
                host.replace_route(route)
            except NetlinkError as exc:
                raise PlumbingError(f"pod route {route.dst}: {exc}") from None


def teardown_workload(*, netns_path: str | None, container_iface: str = "eth0",
                      host_iface: str | None = None) -> bool:
    """Remove the pod's veth pair; True if something was removed. Idempotent.

    From inside the sandbox when its namespace still exists (see "Identity" above); the host end
    by name only when host_iface is given, i.e. the caller knows it is this sandbox's. A missing
    namespace or link is not an error: a deleted namespace took its veth pair along.
    """
    try:
        if netns_path and os.path.exists(netns_path):
            try:
                with Rtnl(netns.open_netlink_socket(netns_path)) as pod:
                    link = pod.link(container_iface)
                    if link is not None and link.kind == "veth" and pod.delete_link(index=link.index):
                        log.debug("workload unplumbed netns=%s iface=%s", netns_path, container_iface)
                        return True
            except netns.NetnsError as exc:
                if exc.errno not in (errno.ENOENT, errno.EINVAL):
                    raise
                # The namespace vanished between the check and the open: nothing left in it.
        if host_iface:
            names.check_iface_name(host_iface)
            with Rtnl() as host:
                link = host.link(host_iface)
                if link is not None and link.kind == "veth" and host.delete_link(index=link.index):
                    log.debug("workload unplumbed iface=%s", host_iface)
                    return True
    except (NetlinkError, netns.NetnsError) as exc:
        raise PlumbingError(f"pod veth {host_iface or container_iface} teardown: {exc}") from None
    return False


def check_workload(
    *,
    netns_path: str,
    host_iface: str,
    container_iface: str = "eth0",
    ips: Sequence[ipaddress.IPv4Interface],
    gateway: str = names.POD_GATEWAY,
    host_mac: str = names.HOST_VETH_MAC,
    container_mac: str | None = None,
    route_proto: int | None = None,
) -> list[str]:
    """Everything wrong with a pod's plumbing (CNI CHECK), one sentence each; [] means healthy.

    container_mac: the MAC the pod side must have (CHECK's prevResult); route_proto: also check
    the host /32 route to each address through the host side, with that proto.
    """
    problems: list[str] = []
    try:
        with Rtnl() as host:
            host_link = host.link(host_iface)
            if host_link is None:
                return [f"host interface {host_iface} does not exist"]
            if not host_link.up:
                problems.append(f"host interface {host_iface} is down")
            if host_link.mac.lower() != host_mac.lower():
                problems.append(f"host interface {host_iface} MAC is not {host_mac}")
            for key in (sysctl.iface_conf(host_iface, "proxy_arp"),
                        sysctl.iface_conf(host_iface, "forwarding")):
                if sysctl.read(key) != "1":
                    problems.append(f"sysctl {key} is not 1")
            neighbours = host.permanent_neighbours(host_link.index)
            host_routes = {ip: host.fib_entry(str(ip.ip)) for ip in ips} if route_proto is not None else {}
        with Rtnl(netns.open_netlink_socket(netns_path)) as pod:
            pod_link = pod.link(container_iface)
            if pod_link is None:
                return problems + [f"pod interface {container_iface} does not exist"]
            if not pod_link.up:
                problems.append(f"pod interface {container_iface} is down")
            addrs = pod.addresses(pod_link.index)
            gateways = {r.gateway for r in pod.routes() if r.dst == "0.0.0.0/0"}
        mac = pod_link.mac.lower()
        if container_mac is not None and mac != container_mac.lower():
            problems.append(f"pod interface {container_iface} MAC is {mac}, not {container_mac.lower()}")
        for ip in ips:
            if (str(ip.ip), 32) not in addrs:
                problems.append(f"pod interface {container_iface} lacks address {ip.ip}/32")
            if (str(ip.ip), mac) not in neighbours:
                problems.append(f"no permanent neighbour entry {ip.ip} -> {mac} on {host_iface}")
        for ip, route in host_routes.items():
            if (route is None or route.dst != f"{ip.ip}/32" or route.ifindex != host_link.index
                    or route.proto != route_proto):
                problems.append(f"no route {ip.ip}/32 dev {host_iface} proto {route_proto} on the node")
        if gateway not in gateways:
            problems.append(f"pod has no default route via {gateway}")
    except (NetlinkError, netns.NetnsError, sysctl.SysctlError) as exc:
        problems.append(str(exc))
    return problems
