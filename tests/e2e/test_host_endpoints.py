"""Calico policy beyond Kubernetes NetworkPolicy in a real 2-node lab: a preDNAT policy on a
HostEndpoint blocks a NodePort-style DNAT'd flow before DNAT, a doNotTrack policy leaves no
conntrack entry, and tiers with Pass behave as in Calico's documentation.

The lab has no kube-proxy: the NodePort is one DNAT rule the test adds to n1's nat table, as
kube-proxy would. n1's eth0 gets a HostEndpoint with Calico's built-in projectcalico-default-allow
profile (as kube-controllers' automatic host endpoints have), so only the policies under test
change what reaches the node. Every wait is bounded and waits for the state it expects; a
"blocked" is always checked against a positive probe over the same path.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from typing import Any, Iterator

import pytest

from tests.e2e.labtools import Lab, wait_for

pytestmark = pytest.mark.e2e

LAB_NODES = 2
CONVERGE = 15.0
NODE_PORT = 30080
UDP_UNTRACKED, UDP_TRACKED = 5300, 5301
UDP_ECHO = ("import socket,sys\n"
            "s=socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.bind(('0.0.0.0', int(sys.argv[1])))\n"
            "while True:\n"
            "    data, peer = s.recvfrom(2048)\n"
            "    try: s.sendto(data, peer)\n"
            "    except OSError: pass\n")


def calico(kind: str, name: str, spec: dict[str, Any], **meta: Any) -> dict[str, Any]:
    return {"apiVersion": "projectcalico.org/v3", "kind": kind, "metadata": {"name": name, **meta}, "spec": spec}


class World:
    def __init__(self, lab: Lab) -> None:
        self.lab = lab
        self.node_ip = next(n["ip"] for n in lab.json("status")["nodes"] if n["name"] == "n1")

    def _file(self, docs: list[dict[str, Any]]) -> str:
        fd, path = tempfile.mkstemp(prefix="fxhep", suffix=".yaml")
        with os.fdopen(fd, "w") as f:
            f.write("\n---\n".join(json.dumps(d) for d in docs))
        return path

    def apply(self, *docs: dict[str, Any]) -> None:
        path = self._file(list(docs))
        try:
            self.lab.cli("apply", "-f", path)
        finally:
            os.unlink(path)

    def delete(self, *docs: dict[str, Any]) -> None:
        path = self._file(list(docs))
        try:
            self.lab.cli("delete", "-f", path)
        finally:
            os.unlink(path)

    def probe(self, src: str, dst: str, port: int, proto: str = "tcp") -> bool:
        return self.lab.cli("probe", src, dst, "--port", str(port), "--proto", proto, "--timeout", "0.6",
                            check=False).returncode == 0

    def wait(self, what: str, src: str, dst: str, port: int, connected: bool, proto: str = "tcp") -> None:
        wait_for(what, lambda: self.probe(src, dst, port, proto) == connected, CONVERGE)

    def node(self, *argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return self.lab.cli("exec", "n1", "--", *argv, check=check)

    def saved(self, table: str) -> str:
        return self.node("iptables-save", "-t", table).stdout


HEP = calico("HostEndpoint", "n1-eth0", {"node": "n1", "interfaceName": "eth0",
                                         "profiles": ["projectcalico-default-allow"]}, labels={"host": "n1"})


@pytest.fixture(scope="module")
def world(lab: Lab) -> Iterator[World]:
    lab.cli("ns", "add", "x")
    lab.cli("ns", "add", "y")
    lab.cli("pod", "add", "x/web", "--node", "n1", "--labels", "app=web", "--serve", "tcp:80")
    lab.cli("pod", "add", "x/client", "--node", "n2", "--labels", "app=client")
    lab.cli("pod", "add", "y/other", "--node", "n2", "--labels", "app=other")
    w = World(lab)
    web_ip = lab.pod_ip("x/web")
    # The NodePort, as kube-proxy would write it: n1:30080 -> x/web:80.
    w.node("iptables", "-t", "nat", "-A", "PREROUTING", "-p", "tcp", "--dport", str(NODE_PORT), "-j", "DNAT",
           "--to-destination", f"{web_ip}:80")
    servers = [subprocess.Popen([sys.executable, "-m", "felixpy.lab.cli", "exec", "n1", "--name", lab.name, "--",
                                 sys.executable, "-c", UDP_ECHO, str(port)], stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
               for port in (UDP_UNTRACKED, UDP_TRACKED)]
    try:
        w.apply(HEP)
        w.wait("the NodePort through n1's host endpoint", "x/client", w.node_ip, NODE_PORT, True)
        w.wait("the node's UDP echo", "x/client", w.node_ip, UDP_TRACKED, True, "udp")
        yield w
    finally:
        for proc in servers:
            proc.kill()
            proc.wait(timeout=10)


def test_pre_dnat_policy_blocks_a_node_port_before_dnat(world: World) -> None:
    pre_dnat = calico("GlobalNetworkPolicy", "block-node-port", {
        "selector": "host == 'n1'", "preDNAT": True, "applyOnForward": True,
        "ingress": [{"action": "Deny", "protocol": "TCP", "destination": {"ports": [NODE_PORT]}}]})
    world.apply(pre_dnat)
    try:
        world.wait("the preDNAT policy to block the NodePort", "x/client", world.node_ip, NODE_PORT, False)
        # The same pod behind the NodePort is still reachable directly: the policy matched the
        # port before DNAT (after DNAT the packet goes to port 80), and nothing else is broken.
        assert world.probe("x/client", "x/web", 80)
        mangle = world.saved("mangle")
        assert any(line.startswith("-A cali-from-host-endpoint -i eth0 ") and line.endswith("-g cali-fh-eth0")
                   for line in mangle.splitlines())
        assert f"--dports {NODE_PORT} -j DROP" in mangle
        # preDNAT policy is host endpoint policy only: no workload chain runs it.
        assert "cali-pi-block-node-port" not in world.saved("filter")
        verdict = world.lab.cli("exec", "n2", "--", "felixctl", "policy", "explain", world.lab.pod_ip("x/client"),
                                "hostendpoint/n1-eth0", "--port", str(NODE_PORT), check=False)
        assert verdict.returncode == 1 and "denied by preDNAT policy block-node-port" in verdict.stdout
    finally:
        world.delete(pre_dnat)
    world.wait("the NodePort to open again", "x/client", world.node_ip, NODE_PORT, True)


def test_do_not_track_policy_leaves_no_conntrack_entry(world: World) -> None:
    untracked = calico("GlobalNetworkPolicy", "untracked-echo", {
        "selector": "host == 'n1'", "doNotTrack": True, "applyOnForward": True,
        "ingress": [{"action": "Allow", "protocol": "UDP", "destination": {"ports": [UDP_UNTRACKED]}}],
        "egress": [{"action": "Allow", "protocol": "UDP", "source": {"ports": [UDP_UNTRACKED]}}]})
    world.apply(untracked)
    try:
        wait_for("the raw table's untracked chains", lambda: "-j NOTRACK" in world.saved("raw"), CONVERGE)
        world.node("conntrack", "-D", "-p", "udp", "--dport", str(UDP_UNTRACKED), check=False)
        world.node("conntrack", "-D", "-p", "udp", "--dport", str(UDP_TRACKED), check=False)
        assert world.probe("x/client", world.node_ip, UDP_UNTRACKED, "udp")
        assert world.probe("x/client", world.node_ip, UDP_TRACKED, "udp")

        def flows(port: int) -> int:
            out = world.node("conntrack", "-L", "-p", "udp", "--dport", str(port), check=False).stdout
            return sum(1 for line in out.splitlines() if line.startswith("udp"))

        assert flows(UDP_TRACKED) >= 1  # a tracked flow to the same node shows up...
        assert flows(UDP_UNTRACKED) == 0  # ...the untracked one does not
    finally:
        world.delete(untracked)


def test_tiers_with_pass(world: World) -> None:
    """Calico's tiered policy: a security tier decides first and passes what it does not decide
    to the default tier; its end of tier denies unless the tier's defaultAction is Pass."""
    tier = calico("Tier", "security", {"order": 100})
    security = calico("GlobalNetworkPolicy", "x-isolation", {
        "tier": "security", "selector": "projectcalico.org/namespace == 'x'",
        "ingress": [{"action": "Pass", "source": {"namespaceSelector": "projectcalico.org/name == 'x'"}},
                    {"action": "Deny"}]})
    knp_deny = {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
                "metadata": {"name": "web-deny-all", "namespace": "x"},
                "spec": {"podSelector": {"matchLabels": {"app": "web"}}, "policyTypes": ["Ingress"]}}
    world.apply(tier, security)
    try:
        world.wait("the security tier to deny y -> x", "y/other", "x/web", 80, False)
        assert world.probe("x/client", "x/web", 80)  # passed; no default-tier policy: the profile allows
        world.apply(knp_deny)
        world.wait("the default tier to decide what the security tier passed", "x/client", "x/web", 80, False)
        world.delete(knp_deny)
        world.wait("the default tier's deny to go", "x/client", "x/web", 80, True)
        # Only a Pass rule: what it does not match reaches the end of the tier, which denies...
        passing_only = calico("GlobalNetworkPolicy", "x-isolation", {
            "tier": "security", "selector": "projectcalico.org/namespace == 'x'",
            "ingress": [{"action": "Pass", "source": {"namespaceSelector": "projectcalico.org/name == 'x'"}}]})
        world.apply(passing_only)

        def deny_rule_gone() -> bool:
            rules = [line for line in world.saved("filter").splitlines() if line.startswith("-A cali-pi-x-isolation ")]
            return bool(rules) and not any(line.endswith("-j DROP") for line in rules)

        wait_for("the Deny rule to leave the security policy", deny_rule_gone, CONVERGE)
        assert not world.probe("y/other", "x/web", 80) and world.probe("x/client", "x/web", 80)
        # ...unless the tier's default action is Pass.
        world.apply(calico("Tier", "security", {"order": 100, "defaultAction": "Pass"}))
        world.wait("defaultAction Pass to let y through", "y/other", "x/web", 80, True)
    finally:
        world.delete(security)
        world.delete(tier)
    world.wait("no tier any more", "y/other", "x/web", 80, True)


def test_service_account_selectors(world: World) -> None:
    """Pods running as a service account, selected by the account's labels and by its name."""
    world.lab.cli("sa", "add", "x/frontend", "--labels", "role=fe")
    world.lab.cli("pod", "add", "x/fe", "--node", "n2", "--service-account", "frontend", "--labels", "app=fe")
    policy = calico("NetworkPolicy", "web-from-frontends", {
        "selector": "app == 'web'", "ingress": [
            {"action": "Allow", "source": {"serviceAccounts": {"selector": "role == 'fe'"}}}]}, namespace="x")
    world.apply(policy)
    try:
        world.wait("the frontend account's pods only", "x/client", "x/web", 80, False)
        assert world.probe("x/fe", "x/web", 80)
        # The account's labels change: its pods leave the rule's selection.
        world.lab.cli("sa", "add", "x/frontend", "--labels", "role=batch")
        world.wait("the relabelled account to lose access", "x/fe", "x/web", 80, False)
        by_name = calico("NetworkPolicy", "web-from-frontends", {
            "selector": "app == 'web'", "ingress": [
                {"action": "Allow", "source": {"serviceAccounts": {"names": ["frontend"]}}}]}, namespace="x")
        world.apply(by_name)
        world.wait("the account's name to be enough", "x/fe", "x/web", 80, True)
        assert not world.probe("x/client", "x/web", 80)
    finally:
        world.delete(policy)
        world.lab.cli("pod", "del", "x/fe")
    world.wait("the policy to go", "x/client", "x/web", 80, True)
