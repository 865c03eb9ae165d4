"""Host endpoint policy against the real kernel (root): preDNAT, doNotTrack, applyOnForward,
failsafe ports and tiers, driven the way the agent drives them.

Resources go through validation, the dispatcher and the PolicyCalc; its FilterState goes through
the PolicyManager into real filter, mangle and raw Table drivers and the IPSets driver, all inside
a "node" network namespace:

    client ns 203.0.113.2 ── fxe<tok> (host endpoint, 203.0.113.1) ── node ns ── cali<tok> ── pod ns 10.66.0.2
                                       nat PREROUTING: tcp/30080 → 10.66.0.2:80 (a NodePort, as kube-proxy would)

TCP probes count an answer (connected or refused) as "reached" and a timeout as "dropped".
"""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import pytest

from felixpy.calc.dispatcher import Dispatcher
from felixpy.calc.policy import PolicyCalc
from felixpy.dataplane.drivers.ipsets import IPSets
from felixpy.dataplane.drivers.iptables import Table
from felixpy.dataplane.managers.policy import PolicyManager
from felixpy.datastore import keys
from felixpy.datastore.syncer import KVUpdate
from felixpy.model.resources import KINDS, validate
from tests.integration.test_policy_render_kernel import NetnsRunner, netns_add, plumb_pod, reaches, sh

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root for network namespaces"),
    pytest.mark.skipif(shutil.which("ipset") is None or shutil.which("conntrack") is None,
                       reason="ipset and conntrack needed"),
]

PREFIX = "fxh" + secrets.token_hex(3)[:5]
NODE = "node1"
NODE_IP, CLIENT_IP, POD_IP = "203.0.113.1", "203.0.113.2", "10.66.0.2"
TCP_SERVER = ("import socket,sys\n"
              "s=socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n"
              "s.bind(('0.0.0.0', int(sys.argv[1]))); s.listen(64)\n"
              "while True:\n"
              "    c, _ = s.accept(); c.close()\n")
# A reply the host's own policy drops fails with EPERM: the echo server must survive that.
UDP_ECHO = ("import socket,sys\n"
            "s=socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.bind(('0.0.0.0', int(sys.argv[1])))\n"
            "while True:\n"
            "    data, peer = s.recvfrom(2048)\n"
            "    try: s.sendto(data, peer)\n"
            "    except OSError: pass\n")
UDP_ASK = ("import socket,sys\n"
           "s=socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.settimeout(0.8)\n"
           "s.bind(('0.0.0.0', int(sys.argv[3])))\n"
           "s.sendto(b'ping', (sys.argv[1], int(sys.argv[2])))\n"
           "try:\n"
           "    s.recvfrom(2048); sys.exit(0)\n"
           "except OSError: sys.exit(1)\n")


def resource(kind: str, name: str, spec: dict[str, Any], namespace: str | None = None,
             labels: dict[str, str] | None = None) -> KVUpdate:
    meta: dict[str, Any] = {"name": name, **({"namespace": namespace} if namespace else {})}
    if labels:
        meta["labels"] = labels
    value = validate({"apiVersion": "projectcalico.org/v3", "kind": kind, "metadata": meta, "spec": spec})
    return KVUpdate(keys.resource_key(KINDS[kind].plural, name, namespace), value, 1)


class Node:
    """The agent's policy path (calc → manager → drivers) aimed at one namespace."""

    def __init__(self, ns: str) -> None:
        run = NetnsRunner(ns)
        self.calc = PolicyCalc(NODE)
        self.dispatcher = Dispatcher(self.calc)
        self.ipsets = IPSets(runner=run)
        self.tables = {t: Table(t, backend="nft", runner=run)  # type: ignore[arg-type]
                       for t in ("filter", "mangle", "raw")}
        self.manager = PolicyManager(self.tables["filter"], self.ipsets, mangle_table=self.tables["mangle"],
                                     raw_table=self.tables["raw"])

    def apply(self, *updates: KVUpdate) -> None:
        self.dispatcher.on_updates(updates)
        self.manager.on_update(self.calc.filter_state())
        self.manager.complete_deferred_work()
        self.ipsets.apply()
        for table in self.tables.values():
            table.apply()
        self.ipsets.apply_deletions()


@pytest.fixture
def node() -> Iterator[tuple[str, str, Node]]:
    created: list[str] = []
    servers: list[subprocess.Popen[bytes]] = []
    node_ns, client_ns, pod_ns = (f"{PREFIX}{s}" for s in "ncp")
    try:
        for ns in (node_ns, client_ns, pod_ns):
            netns_add(ns, created)
        token = PREFIX[3:]
        hep_iface = f"fxe{token}"
        sh("ip", "-n", node_ns, "link", "add", hep_iface, "type", "veth", "peer", "name", "eth0", "netns", client_ns)
        sh("ip", "-n", node_ns, "addr", "add", f"{NODE_IP}/24", "dev", hep_iface)
        sh("ip", "-n", client_ns, "addr", "add", f"{CLIENT_IP}/24", "dev", "eth0")
        for ns, iface in ((node_ns, hep_iface), (client_ns, "eth0"), (node_ns, "lo"), (client_ns, "lo")):
            sh("ip", "-n", ns, "link", "set", iface, "up")
        sh("ip", "-n", client_ns, "route", "add", "10.66.0.0/16", "via", NODE_IP)
        plumb_pod(node_ns, pod_ns, f"cali{token}p", POD_IP)
        sh("ip", "netns", "exec", node_ns, "sysctl", "-qw", "net.ipv4.ip_forward=1")
        # A NodePort, the way kube-proxy would write it (same backend as felixpy's tables).
        sh("ip", "netns", "exec", node_ns, "iptables-nft", "-t", "nat", "-A", "PREROUTING", "-p", "tcp",
           "--dport", "30080", "-j", "DNAT", "--to-destination", f"{POD_IP}:80")
        for ns, script, port in ((pod_ns, TCP_SERVER, 80), (node_ns, TCP_SERVER, 8080),
                                 (node_ns, UDP_ECHO, 5000), (node_ns, UDP_ECHO, 5001)):
            servers.append(subprocess.Popen(["ip", "netns", "exec", ns, sys.executable, "-c", script, str(port)]))
        time.sleep(0.5)  # the listeners bind (a positive probe below is the real check)
        yield node_ns, client_ns, Node(node_ns)
    finally:
        for proc in servers:
            proc.kill()
            proc.wait(timeout=5)
        for ns in reversed(created):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=10)


def udp_echo(client_ns: str, port: int, src_port: int) -> bool:
    result = subprocess.run(["ip", "netns", "exec", client_ns, sys.executable, "-c", UDP_ASK, NODE_IP,
                             str(port), str(src_port)], capture_output=True, timeout=15)
    return result.returncode == 0


def flows(node_ns: str, port: int) -> int:
    out = subprocess.run(["ip", "netns", "exec", node_ns, "conntrack", "-L", "-p", "udp", "--dport", str(port)],
                         capture_output=True, text=True, timeout=10)
    return sum(1 for line in out.stdout.splitlines() if line.startswith("udp"))


def hep(iface: str, profiles: list[str] | None = None) -> KVUpdate:
    return resource("HostEndpoint", "node1-ext", {"node": NODE, "interfaceName": iface,
                                                 "expectedIPs": [NODE_IP], "profiles": profiles or []},
                    labels={"role": "ext"})


def pod() -> KVUpdate:
    return resource("WorkloadEndpoint", "node1-k8s-web-eth0", {
        "node": NODE, "orchestrator": "k8s", "pod": "web", "endpoint": "eth0",
        "interfaceName": f"cali{PREFIX[3:]}p", "ipNetworks": [f"{POD_IP}/32"], "profiles": ["kns.demo"]},
        namespace="demo", labels={"app": "web"})


KNS = resource("Profile", "kns.demo", {"ingress": [{"action": "Allow"}], "egress": [{"action": "Allow"}],
                                       "labelsToApply": {"pcns.projectcalico.org/name": "demo"}})


def test_host_endpoint_default_deny_failsafe_and_forwarding(node: tuple[str, str, Node]) -> None:
    node_ns, client_ns, n = node
    iface = f"fxe{PREFIX[3:]}"
    # Baseline: everything flows before any policy, so a "dropped" below is policy.
    assert reaches(client_ns, NODE_IP, 8080) and reaches(client_ns, NODE_IP, 30080)
    n.apply(KNS, pod())
    assert reaches(client_ns, NODE_IP, 8080)  # no host endpoint: the host is not policed
    n.apply(hep(iface))
    assert not reaches(client_ns, NODE_IP, 8080)  # a host endpoint without policy: default deny
    assert reaches(client_ns, NODE_IP, 22)  # failsafe inbound tcp/22 (refused, but not dropped)
    assert reaches(client_ns, NODE_IP, 30080)  # forwarded: no applyOnForward policy, allowed
    assert reaches(client_ns, POD_IP, 80)
    # A normal policy on the host endpoint governs the host, not forwarded traffic.
    allow_8080 = resource("GlobalNetworkPolicy", "host-8080", {
        "selector": "role == 'ext'", "ingress": [{"action": "Allow", "protocol": "TCP",
                                                  "destination": {"ports": [8080]}}]})
    n.apply(allow_8080)
    assert reaches(client_ns, NODE_IP, 8080)
    # An applyOnForward policy on the same endpoint governs forwarded traffic too.
    forward_deny = resource("GlobalNetworkPolicy", "forward-deny", {
        "selector": "role == 'ext'", "applyOnForward": True,
        "ingress": [{"action": "Deny", "protocol": "TCP", "destination": {"ports": [80]}}]})
    n.apply(forward_deny)
    assert not reaches(client_ns, POD_IP, 80) and not reaches(client_ns, NODE_IP, 30080)
    n.apply(KVUpdate(forward_deny.key, None, 2))
    assert reaches(client_ns, POD_IP, 80)
    # The built-in projectcalico-default-allow profile opens the host again.
    n.apply(KVUpdate(allow_8080.key, None, 2), hep(iface, ["projectcalico-default-allow"]))
    assert reaches(client_ns, NODE_IP, 8080)


def test_pre_dnat_policy_blocks_a_node_port_before_dnat(node: tuple[str, str, Node]) -> None:
    node_ns, client_ns, n = node
    iface = f"fxe{PREFIX[3:]}"
    n.apply(KNS, pod(), hep(iface, ["projectcalico-default-allow"]))
    assert reaches(client_ns, NODE_IP, 30080) and reaches(client_ns, POD_IP, 80)
    # A normal host endpoint policy never sees the NodePort: it is DNAT'd before filter.
    normal = resource("GlobalNetworkPolicy", "normal-30080", {
        "selector": "role == 'ext'", "order": 1,
        "ingress": [{"action": "Deny", "protocol": "TCP", "destination": {"ports": [30080]}}]})
    n.apply(normal)
    assert reaches(client_ns, NODE_IP, 30080)
    pre_dnat = resource("GlobalNetworkPolicy", "block-node-port", {
        "selector": "role == 'ext'", "preDNAT": True, "applyOnForward": True,
        "ingress": [{"action": "Deny", "protocol": "TCP", "source": {"nets": [f"{CLIENT_IP}/32"]},
                     "destination": {"ports": [30080]}}]})
    n.apply(pre_dnat)
    assert not reaches(client_ns, NODE_IP, 30080)  # matched on the port before DNAT
    assert reaches(client_ns, POD_IP, 80)  # the same pod, reached directly: not this policy's port
    saved = sh("ip", "netns", "exec", node_ns, "iptables-nft-save", "-t", "mangle")
    assert "-A cali-from-host-endpoint -i " + iface in saved and "--dports 30080 -j DROP" in saved
    # A preDNAT policy is never a workload policy (it used to be enforced on pods): the pod's
    # chains do not jump to it.
    filter_rules = sh("ip", "netns", "exec", node_ns, "iptables-nft-save", "-t", "filter")
    assert "cali-pi-block-node-port" not in filter_rules
    n.apply(KVUpdate(pre_dnat.key, None, 2))
    assert reaches(client_ns, NODE_IP, 30080)


def test_do_not_track_policy_leaves_no_conntrack_entry(node: tuple[str, str, Node]) -> None:
    node_ns, client_ns, n = node
    iface = f"fxe{PREFIX[3:]}"
    tracked = resource("GlobalNetworkPolicy", "tracked-5001", {
        "selector": "role == 'ext'", "ingress": [{"action": "Allow", "protocol": "UDP",
                                                  "destination": {"ports": [5001]}}]})
    n.apply(KNS, pod(), hep(iface), tracked)
    assert udp_echo(client_ns, 5001, 40001)
    assert flows(node_ns, 5001) >= 1  # a tracked flow leaves an entry: the check can see one
    assert not udp_echo(client_ns, 5000, 40002)  # default deny
    untracked_in = resource("GlobalNetworkPolicy", "untracked-5000", {
        "selector": "role == 'ext'", "doNotTrack": True, "applyOnForward": True,
        "ingress": [{"action": "Allow", "protocol": "UDP", "destination": {"ports": [5000]}}]})
    n.apply(untracked_in)
    # Only the request is untracked: the reply is a new tracked flow the host endpoint denies.
    assert not udp_echo(client_ns, 5000, 40003)
    untracked_both = resource("GlobalNetworkPolicy", "untracked-5000", {
        "selector": "role == 'ext'", "doNotTrack": True, "applyOnForward": True,
        "ingress": [{"action": "Allow", "protocol": "UDP", "destination": {"ports": [5000]}}],
        "egress": [{"action": "Allow", "protocol": "UDP", "source": {"ports": [5000]}}]})
    subprocess.run(["ip", "netns", "exec", node_ns, "conntrack", "-F"], capture_output=True, timeout=10)
    n.apply(untracked_both)
    assert udp_echo(client_ns, 5000, 40004)
    assert flows(node_ns, 5000) == 0
    saved = sh("ip", "netns", "exec", node_ns, "iptables-nft-save", "-t", "raw")
    assert "-j NOTRACK" in saved


def test_tiers_pass_and_default_action(node: tuple[str, str, Node]) -> None:
    node_ns, client_ns, n = node
    iface = f"fxe{PREFIX[3:]}"
    security = resource("Tier", "security", {"order": 100})
    deny_all = resource("GlobalNetworkPolicy", "security-deny", {
        "tier": "security", "selector": "role == 'ext'", "ingress": [{"action": "Deny", "protocol": "TCP",
                                                                    "destination": {"ports": [8080]}}]})
    allow_default = resource("GlobalNetworkPolicy", "allow-8080", {
        "selector": "role == 'ext'", "ingress": [{"action": "Allow", "protocol": "TCP",
                                                  "destination": {"ports": [8080]}}]})
    n.apply(KNS, pod(), hep(iface), security, allow_default)
    assert reaches(client_ns, NODE_IP, 8080)
    n.apply(deny_all)
    assert not reaches(client_ns, NODE_IP, 8080)  # the security tier runs first and denies
    passing = resource("GlobalNetworkPolicy", "security-deny", {
        "tier": "security", "selector": "role == 'ext'",
        "ingress": [{"action": "Pass", "source": {"nets": [f"{CLIENT_IP}/32"]}}]})
    n.apply(passing)
    assert reaches(client_ns, NODE_IP, 8080)  # Pass: the default tier decides
    nothing = resource("GlobalNetworkPolicy", "security-deny", {
        "tier": "security", "selector": "role == 'ext'",
        "ingress": [{"action": "Allow", "source": {"nets": ["192.0.2.0/24"]}}]})
    n.apply(nothing)
    assert not reaches(client_ns, NODE_IP, 8080)  # end of tier security: Deny
    n.apply(resource("Tier", "security", {"order": 100, "defaultAction": "Pass"}))
    assert reaches(client_ns, NODE_IP, 8080)  # the tier's default action Pass: next tier allows
