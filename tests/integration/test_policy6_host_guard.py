"""The IPv6 host endpoint guard on the real kernel (root): a policed host endpoint's IPv6 is
dropped in ip6tables except loopback, established replies, neighbour discovery, the failsafe
ports and VXLAN, and it all comes back when the guard is lifted.

Two namespaces joined by a veth pair: `host` (the node, its endpoint the veth `h0`) and `peer`
(another machine on that link)."""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
import sys
import time
from typing import Iterator, Sequence

import pytest

from felixpy.kernel import commands
from felixpy.kernel.commands import CompletedRun
from felixpy.dataplane.drivers.iptables import Table
from felixpy.dataplane.managers.policy6 import HostGuard, Ipv6PolicyGuard

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root for network namespaces"),
    pytest.mark.skipif(shutil.which("ip6tables-nft-restore") is None, reason="ip6tables (nft) not installed"),
]

HOST_IP, PEER_IP = "fd00:fe::1", "fd00:fe::2"
OPEN_PORT, FAILSAFE_IN, FAILSAFE_OUT = 8080, 22, 2379

# Accepts on every port given, forever (killed by the fixture); echoes nothing.
SERVER = """
import selectors, socket, sys
sel = selectors.DefaultSelector()
for port in map(int, sys.argv[1:]):
    s = socket.socket(socket.AF_INET6); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("::", port)); s.listen(16); sel.register(s, selectors.EVENT_READ)
print("ready", flush=True)
while True:
    for key, _ in sel.select():
        key.fileobj.accept()[0].close()
"""

CONNECT = """
import socket, sys
try:
    socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=1.5).close()
except OSError:
    sys.exit(1)
"""


class Netns:
    def __init__(self, name: str) -> None:
        self.name = name

    def __call__(self, argv: Sequence[str], *, input: str | bytes | None = None,
                 timeout: float = 30) -> CompletedRun:
        return commands.run(["ip", "netns", "exec", self.name, *argv], input=input, timeout=timeout)

    def ok(self, *argv: str) -> bool:
        return subprocess.run(["ip", "netns", "exec", self.name, *argv], capture_output=True,
                              timeout=15).returncode == 0

    def connects(self, ip: str, port: int) -> bool:
        return self.ok(sys.executable, "-c", CONNECT, ip, str(port))

    def pings(self, ip: str) -> bool:
        return self.ok("ping", "-6", "-c", "1", "-W", "1", ip)


@pytest.fixture
def link() -> Iterator[tuple[Netns, Netns]]:
    tag = secrets.token_hex(3)
    host, peer = Netns(f"fxt6h{tag}"), Netns(f"fxt6p{tag}")
    servers: list[subprocess.Popen[str]] = []
    try:
        for ns in (host, peer):
            subprocess.run(["ip", "netns", "add", ns.name], check=True, timeout=10)
        subprocess.run(["ip", "-n", host.name, "link", "add", "h0", "type", "veth", "peer", "name", "p0",
                        "netns", peer.name], check=True, timeout=10)
        for ns, dev, ip in ((host, "h0", HOST_IP), (peer, "p0", PEER_IP)):
            subprocess.run(["ip", "-n", ns.name, "addr", "add", f"{ip}/64", "dev", dev, "nodad"], check=True, timeout=10)
            for up in (dev, "lo"):
                subprocess.run(["ip", "-n", ns.name, "link", "set", up, "up"], check=True, timeout=10)
        for ns, ports in ((host, (OPEN_PORT, FAILSAFE_IN)), (peer, (OPEN_PORT, FAILSAFE_OUT))):
            proc = subprocess.Popen(["ip", "netns", "exec", ns.name, sys.executable, "-c", SERVER,
                                     *map(str, ports)], stdout=subprocess.PIPE, text=True)
            servers.append(proc)
            assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
        yield host, peer
    finally:
        for proc in servers:
            proc.kill()
            proc.wait(timeout=10)
        for ns in (host, peer):
            subprocess.run(["ip", "netns", "del", ns.name], capture_output=True, timeout=10)


def _until(what: str, cond: object, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


def test_policed_host_endpoint_drops_ipv6_but_failsafes_and_neighbour_discovery(link: tuple[Netns, Netns]) -> None:
    host, peer = link
    _until("IPv6 up between the namespaces", lambda: peer.pings(HOST_IP))
    table = Table("filter", backend="nft", runner=host, ip_version=6)
    guard = Ipv6PolicyGuard(table, failsafe_inbound=[("tcp", FAILSAFE_IN)], failsafe_outbound=[("tcp", FAILSAFE_OUT)])
    guard.set_endpoints(frozenset(), frozenset())
    guard.set_host_endpoints([HostGuard("h0", local=True, forward=False)])
    guard.complete_deferred_work()
    table.apply()

    # Forget the neighbours first: the failsafe connections below need neighbour discovery.
    for ns in (host, peer):
        assert ns.ok("ip", "-6", "neigh", "flush", "all")
    assert peer.connects(HOST_IP, FAILSAFE_IN), "inbound failsafe port"
    assert host.connects(PEER_IP, FAILSAFE_OUT), "outbound failsafe port (its replies are established)"
    assert not peer.pings(HOST_IP)
    assert not peer.connects(HOST_IP, OPEN_PORT)
    assert not host.connects(PEER_IP, OPEN_PORT)
    assert host.ok("ping", "-6", "-c", "1", "-W", "1", "::1"), "loopback is never policed"

    # The host endpoint's policy gone (or rendered open): everything passes again.
    guard.set_host_endpoints([])
    guard.complete_deferred_work()
    table.apply()
    assert peer.pings(HOST_IP) and peer.connects(HOST_IP, OPEN_PORT) and host.connects(PEER_IP, OPEN_PORT)
