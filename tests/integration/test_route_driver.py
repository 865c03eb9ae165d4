"""RouteTable against a real kernel, inside a throw-away network namespace (root)."""

from __future__ import annotations

import os
import secrets
import subprocess
from collections.abc import Iterator

import pytest

from felixpy import names
from felixpy.dataplane.drivers.routes import RouteTable
from felixpy.kernel import netns
from felixpy.kernel.netlink import Netlink
from felixpy.messages import Route

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root for network namespaces"),
]


def sh(*argv: str) -> str:
    return subprocess.run(argv, check=True, capture_output=True, text=True, timeout=10).stdout


@pytest.fixture
def ns() -> Iterator[str]:
    name = "fxt" + secrets.token_hex(3)[:5]
    sh("ip", "netns", "add", name)
    try:
        # No dummy module on every kernel: a veth pair makes a perfectly good uplink.
        sh("ip", "-n", name, "link", "add", f"{name}a", "type", "veth", "peer", "name", f"{name}b")
        sh("ip", "-n", name, "link", "set", f"{name}a", "up")
        sh("ip", "-n", name, "link", "set", f"{name}b", "up")
        sh("ip", "-n", name, "addr", "add", "192.0.2.1/24", "dev", f"{name}a")
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], capture_output=True, timeout=10)


@pytest.fixture
def table(ns: str) -> Iterator[RouteTable]:
    with netns.iproute_in(f"/run/netns/{ns}") as ipr:
        # Link lookups over the raw socket, as the agent's own Netlink() does.
        sock = netns.open_netlink_socket(f"/run/netns/{ns}")
        try:
            yield RouteTable(netlink=Netlink(ipr, rtnl_sock=sock))
        finally:
            sock.close()


def our_routes(ns: str) -> list[str]:
    out = sh("ip", "-n", ns, "route", "show", "table", "main", "proto", str(names.ROUTE_PROTO))
    return sorted(line.strip() for line in out.splitlines() if line.strip())


def test_programs_repairs_and_sweeps_only_our_routes(ns: str, table: RouteTable) -> None:
    up = f"{ns}a"
    sh("ip", "-n", ns, "route", "add", "10.9.0.0/24", "via", "192.0.2.1", "proto", "static")
    sh("ip", "-n", ns, "route", "add", "blackhole", "10.244.7.0/26", "proto", str(names.ROUTE_PROTO))
    table.set_routes([
        Route("10.244.1.0/26", type="blackhole"),
        Route("10.244.2.0/26", gateway="192.0.2.12", iface=up, onlink=True),
        Route("10.244.3.0/26", gateway="192.0.2.13"),
        Route("10.244.1.5/32", iface=up),
    ])
    result = table.apply()
    assert not result.failed and result.deleted == ("10.244.7.0/26",)
    assert our_routes(ns) == sorted([
        "blackhole 10.244.1.0/26",
        f"10.244.1.5 dev {up} scope link",
        f"10.244.2.0/26 via 192.0.2.12 dev {up} onlink",
        f"10.244.3.0/26 via 192.0.2.13 dev {up}",
    ])
    assert not table.apply().changed

    # Drift: a route deleted and one changed by hand come back on resync.
    sh("ip", "-n", ns, "route", "del", "10.244.1.5/32")
    sh("ip", "-n", ns, "route", "replace", "10.244.2.0/26", "via", "192.0.2.99", "dev", up,
       "proto", str(names.ROUTE_PROTO))
    table.queue_resync()
    result = table.apply()
    assert result.added == ("10.244.1.5/32",) and result.replaced == ("10.244.2.0/26",)
    assert f"10.244.2.0/26 via 192.0.2.12 dev {up} onlink" in our_routes(ns)

    table.set_routes([])
    table.apply()
    assert our_routes(ns) == []
    foreign = sh("ip", "-n", ns, "route", "show", "10.9.0.0/24")
    assert "via 192.0.2.1" in foreign  # the static route of someone else survived


def test_foreign_route_at_our_destination_is_left_alone(ns: str, table: RouteTable) -> None:
    sh("ip", "-n", ns, "route", "add", "blackhole", "10.244.1.0/26", "proto", "static")
    table.set_routes([Route("10.244.1.0/26", gateway="192.0.2.12", iface=f"{ns}a", onlink=True)])
    result = table.apply()
    assert "10.244.1.0/26" in result.failed
    assert "proto static" in sh("ip", "-n", ns, "route", "show", "10.244.1.0/26")


def test_route_waits_for_its_interface(ns: str, table: RouteTable) -> None:
    pod_iface = f"{ns}p"
    table.set_routes([Route("10.244.1.9/32", iface=pod_iface)])
    assert table.apply().pending == ("10.244.1.9/32",)
    sh("ip", "-n", ns, "link", "add", pod_iface, "type", "veth", "peer", "name", f"{ns}q")
    sh("ip", "-n", ns, "link", "set", pod_iface, "up")
    sh("ip", "-n", ns, "link", "set", f"{ns}q", "up")
    assert table.apply().added == ("10.244.1.9/32",)
    assert our_routes(ns) == [f"10.244.1.9 dev {pod_iface} scope link"]


def test_link_lookups_agree_over_raw_rtnetlink_and_pyroute2(ns: str) -> None:
    path = f"/run/netns/{ns}"
    with netns.iproute_in(path) as ipr:
        sock = netns.open_netlink_socket(path)
        try:
            raw, pyroute = Netlink(ipr, rtnl_sock=sock), Netlink(ipr)
            for name in (f"{ns}a", f"{ns}b", "lo", "nosuchlink0"):
                assert raw.link_index(name) == pyroute.link_index(name), name
            assert raw.link_index("nosuchlink0") is None and raw.link_index("lo") == 1
        finally:
            sock.close()
