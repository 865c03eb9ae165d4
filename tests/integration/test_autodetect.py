"""IP autodetection and host MTU against real interfaces in a network namespace of our own.

The namespace holds veth pairs named like a node's interfaces (this kernel has no dummy devices):

    aaa0  <-> zzz0      aaa0: only a link-local address (never qualifies)
    cali1a2b <-> eth1   eth1: 198.51.100.10/24, MTU 1400; cali1a2b: 10.99.0.1/32 (excluded by default)
    docker0x <-> ens5   ens5: 192.0.2.20/24 + 192.0.2.21/24 + 2001:db8::5/64, MTU 9000; docker0x: 10.98.0.1/24

Names sort aaa0, cali1a2b, docker0x, ens5, eth1, lo, zzz0, so first-found must skip the link-local
and excluded ones and pick ens5. The pure selection functions are tested first, without root.
"""

from __future__ import annotations

import ipaddress
import os
import secrets
import subprocess
from typing import Iterator

import pytest

from felixpy.config import AutodetectMethod, parse_autodetection_method
from felixpy.kernel import addresses
from felixpy.kernel.addresses import AutodetectError, Interface

I4 = ipaddress.IPv4Interface
I6 = ipaddress.IPv6Interface


def method(text: str) -> AutodetectMethod:
    return parse_autodetection_method("IP_AUTODETECTION_METHOD", text)


# -- pure selection (no root) ---------------------------------------------------------------------

FAKE = [
    Interface("cali123", 5, True, 1500, (I4("10.0.0.1/32"),)),
    Interface("docker0", 3, True, 1500, (I4("172.17.0.1/16"),)),
    Interface("eth0", 2, True, 1500, (I4("192.0.2.5/24"), I6("2001:db8::5/64"))),
    Interface("eth1", 4, False, 9000, (I4("198.51.100.5/24"),)),
    Interface("lo", 1, True, 65536, ()),
]


@pytest.mark.parametrize(
    "text, expected",
    [
        ("first-found", "192.0.2.5/24"),
        ("interface=eth1", "198.51.100.5/24"),
        ("interface=nomatch,cali.*", "10.0.0.1/32"),
        ("interface=th0", "192.0.2.5/24"),  # unanchored search, as Go's MatchString
        ("skip-interface=eth0", "198.51.100.5/24"),
        ("cidr=198.51.100.0/24", "198.51.100.5/24"),
        ("cidr=172.16.0.0/12,10.0.0.0/8", "10.0.0.1/32"),  # interface order decides, not CIDR order
    ],
)
def test_select_address(text: str, expected: str) -> None:
    assert addresses.select_address(FAKE, method(text)) == ipaddress.ip_interface(expected)


def test_select_ipv6() -> None:
    assert addresses.select_address(FAKE, method("first-found"), 6) == I6("2001:db8::5/64")


@pytest.mark.parametrize(
    "text, message",
    [
        ("interface=wlan.*", "no IPv4 address found on interfaces matching wlan.* (IP_AUTODETECTION_METHOD=interface=wlan.*; candidates: none)"),
        ("skip-interface=eth.*", "no IPv4 address found on interfaces not matching eth.* or the default exclusions"),
        ("cidr=203.0.113.0/24", "no IPv4 address found in 203.0.113.0/24 (IP_AUTODETECTION_METHOD=cidr=203.0.113.0/24)"),
    ],
)
def test_select_address_errors(text: str, message: str) -> None:
    with pytest.raises(AutodetectError) as info:
        addresses.select_address(FAKE, method(text))
    assert str(info.value).startswith(message)


def test_kubernetes_internal_ip_fails_clearly() -> None:
    with pytest.raises(AutodetectError, match="kubernetes-internal-ip needs the Kubernetes Node object"):
        addresses.autodetect("kubernetes-internal-ip")


def test_global_unicast() -> None:
    good = ["10.0.0.1", "192.168.1.1", "192.0.2.1", "8.8.8.8", "fd00::1", "2001:db8::1"]
    bad = ["127.0.0.1", "169.254.1.1", "224.0.0.1", "0.0.0.0", "255.255.255.255", "fe80::1", "::1", "ff02::1"]
    assert all(addresses.is_global_unicast(ipaddress.ip_address(a)) for a in good)
    assert not any(addresses.is_global_unicast(ipaddress.ip_address(a)) for a in bad)


def test_pick_host_mtu() -> None:
    pattern = r"^((en|wl|ww|sl|ib)[Pcopsvx].*|(eth|wlan|wwan).*)"
    assert addresses.pick_host_mtu(FAKE, pattern) == 1500  # eth1 (9000) is down
    assert addresses.pick_host_mtu(FAKE, r"^ens") == addresses.DEFAULT_HOST_MTU == 1460


@pytest.mark.parametrize(
    "host, ipip, vxlan, ipip_mtu, vxlan_mtu, expected",
    [
        (1500, False, False, 0, 0, 1500),
        (1500, True, False, 0, 0, 1480),
        (1500, False, True, 0, 0, 1450),
        (1460, True, True, 0, 0, 1410),
        (9000, True, False, 0, 0, 8980),
        (1500, True, False, 1400, 0, 1400),
        (1500, False, True, 0, 1300, 1300),
        (1500, False, False, 1400, 1300, 1500),  # configured MTUs only matter for enabled encaps
    ],
)
def test_pod_mtu(host: int, ipip: bool, vxlan: bool, ipip_mtu: int, vxlan_mtu: int, expected: int) -> None:
    assert addresses.pod_mtu(host, ipip=ipip, vxlan=vxlan, ipip_mtu=ipip_mtu, vxlan_mtu=vxlan_mtu) == expected


# -- real kernel ----------------------------------------------------------------------------------


def ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=10)


def make_netns() -> str:
    """A namespace with the interfaces in the module docstring; the caller deletes it."""
    name = "fxt" + secrets.token_hex(3)[:5]
    ip("netns", "add", name)
    try:
        n = ["-n", name]
        ip(*n, "link", "set", "lo", "up")
        for a, b in (("aaa0", "zzz0"), ("cali1a2b", "eth1"), ("docker0x", "ens5")):
            ip(*n, "link", "add", a, "type", "veth", "peer", "name", b)
            ip(*n, "link", "set", a, "up")
            ip(*n, "link", "set", b, "up")
        ip(*n, "addr", "add", "169.254.3.3/16", "dev", "aaa0")
        ip(*n, "link", "set", "eth1", "mtu", "1400")
        ip(*n, "addr", "add", "198.51.100.10/24", "dev", "eth1")
        ip(*n, "addr", "add", "10.99.0.1/32", "dev", "cali1a2b")
        ip(*n, "link", "set", "ens5", "mtu", "9000")
        ip(*n, "link", "set", "docker0x", "mtu", "9000")
        ip(*n, "addr", "add", "192.0.2.20/24", "dev", "ens5")
        ip(*n, "addr", "add", "192.0.2.21/24", "dev", "ens5")
        ip(*n, "addr", "add", "2001:db8::5/64", "dev", "ens5", "nodad")
        ip(*n, "addr", "add", "10.98.0.1/24", "dev", "docker0x")
    except BaseException:
        subprocess.run(["ip", "netns", "del", name], capture_output=True, timeout=10)
        raise
    return name


@pytest.fixture(scope="module")
def netns() -> Iterator[str]:
    if os.geteuid() != 0:
        pytest.skip("needs root")
    name = make_netns()
    try:
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], capture_output=True, timeout=10)


def test_list_interfaces(netns: str) -> None:
    ifaces = addresses.list_interfaces(netns=netns)
    assert [i.name for i in ifaces] == ["aaa0", "cali1a2b", "docker0x", "ens5", "eth1", "lo", "zzz0"]
    by_name = {i.name: i for i in ifaces}
    assert by_name["aaa0"].addresses == ()  # link-local only
    assert by_name["lo"].addresses == ()  # loopback is not global unicast
    assert by_name["ens5"].addresses == (I4("192.0.2.20/24"), I4("192.0.2.21/24"), I6("2001:db8::5/64"))
    assert (by_name["eth1"].mtu, by_name["eth1"].up) == (1400, True)


@pytest.mark.parametrize(
    "text, expected",
    [
        ("first-found", "192.0.2.20/24"),
        ("interface=eth.*", "198.51.100.10/24"),
        ("interface=cali.*", "10.99.0.1/32"),
        ("interface=^docker", "10.98.0.1/24"),
        ("skip-interface=ens.*", "198.51.100.10/24"),
        ("skip-interface=^x", "192.0.2.20/24"),
        ("cidr=198.51.100.0/24", "198.51.100.10/24"),
        ("cidr=10.98.0.0/16", "10.98.0.1/24"),
        ("cidr=192.0.2.21/32", "192.0.2.21/24"),
        ("can-reach=198.51.100.77", "198.51.100.10/24"),
        ("can-reach=192.0.2.0", "192.0.2.20/24"),  # a network address works as a routing lookup
        ("can-reach=10.98.0.200", "10.98.0.1/24"),
    ],
)
def test_autodetect(netns: str, text: str, expected: str) -> None:
    assert addresses.autodetect(text, 4, netns=netns) == ipaddress.ip_interface(expected)


def test_autodetect_ipv6(netns: str) -> None:
    assert addresses.autodetect("first-found", 6, netns=netns) == I6("2001:db8::5/64")
    assert addresses.autodetect("can-reach=2001:db8::99", 6, netns=netns) == I6("2001:db8::5/64")


@pytest.mark.parametrize(
    "text, message",
    [
        ("interface=wlan.*", "no IPv4 address found on interfaces matching wlan.*"),
        ("interface=aaa0", "no IPv4 address found on interfaces matching aaa0 (IP_AUTODETECTION_METHOD=interface=aaa0; candidates: aaa0)"),
        ("cidr=203.0.113.0/24", "no IPv4 address found in 203.0.113.0/24"),
        ("can-reach=203.0.113.1", "can-reach=203.0.113.1: no route to 203.0.113.1 (ENETUNREACH"),
        ("can-reach=127.0.0.1", "can-reach=127.0.0.1: source address 127.0.0.1 is not a global-unicast address"),
        ("can-reach=no-such-host.invalid", "can-reach=no-such-host.invalid: cannot resolve"),
    ],
)
def test_autodetect_errors(netns: str, text: str, message: str) -> None:
    with pytest.raises(AutodetectError) as info:
        addresses.autodetect(text, 4, netns=netns)
    assert str(info.value).startswith(message), str(info.value)
    assert "\n" not in str(info.value)


def test_host_mtu(netns: str) -> None:
    default = r"^((en|wl|ww|sl|ib)[Pcopsvx].*|(eth|wlan|wwan).*)"
    assert addresses.host_mtu(default, netns=netns) == 1400  # min(ens5 9000, eth1 1400)
    assert addresses.host_mtu(r"^ens", netns=netns) == 9000
    assert addresses.host_mtu(r"^nothing", netns=netns) == 1460


def test_host_mtu_ignores_down_interfaces() -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root")
    name = make_netns()
    try:
        ip("-n", name, "link", "set", "eth1", "down")
        assert addresses.host_mtu(r"^(eth|ens)", netns=name) == 9000
    finally:
        subprocess.run(["ip", "netns", "del", name], capture_output=True, timeout=10)
