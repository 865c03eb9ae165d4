"""Upgrades: agents restarted one node at a time under traffic lose nothing, and the datastore the
previous release (be5aee6) wrote is read by today's agents.

The fixture tests/data/upgrade/be5aee6-etcd.json is every /calico/ key as that release's lab wrote
it (2 nodes, mode bgp, namespace upg with pods web on n1 and db on n2, a Kubernetes NetworkPolicy, a
Calico NetworkPolicy and a GlobalNetworkPolicy); tests/e2e/upgrade_fixture.py made it and says how
to make it again for a later release.
"""

from __future__ import annotations

import ipaddress
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from felixpy.lab import topology
from tests.e2e.labtools import Lab, wait_for

pytestmark = pytest.mark.e2e

LAB_MODE = "bgp"
LAB_NODES = 3
NODES = ["n1", "n2", "n3"]
FIXTURE = Path(__file__).resolve().parents[1] / "data/upgrade/be5aee6-etcd.json"
FLOW_PORT = 7000


def _all_established(lab: Lab) -> bool:
    return all(len(n["bgp"]) == LAB_NODES - 1 and all(p["state"] == "Established" for p in n["bgp"])
               for n in lab.json("status")["nodes"])


class Traffic:
    """felixpy.lab.traffic in one pod: a TCP flow and pings to every target, counted."""

    def __init__(self, lab: Lab, pod: str, targets: list[str]) -> None:
        argv = ["ip", "netns", "exec", lab.netns(pod), sys.executable, "-m", "felixpy.lab.traffic",
                "--lab", lab.name, "--pod", pod, "--listen", str(FLOW_PORT), "--max-seconds", "600"]
        for ip in targets:
            argv += ["--flow", f"{ip}:{FLOW_PORT}", "--ping", ip]
        self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     text=True, start_new_session=True)
        assert self.proc.stdout is not None and self.proc.stdout.readline().strip() == "ready"

    def send(self, line: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()

    def summary(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        result: dict[str, Any] = json.loads(self.proc.stdout.readline())
        return result

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=10)


def test_rolling_restart_of_every_agent_under_traffic_loses_nothing(lab: Lab) -> None:
    pods = {f"roll/p{i}": node for i, node in enumerate(NODES, 1)}
    lab.cli("ns", "add", "roll")
    for ref, node in pods.items():
        lab.cli("pod", "add", ref, "--node", node, "--serve", "tcp:80")
    wait_for("every BGP session Established", lambda: _all_established(lab), timeout=30)
    ips = {ref: lab.pod_ip(ref) for ref in pods}
    traffic = [Traffic(lab, ref, [ip for other, ip in ips.items() if other != ref]) for ref in pods]
    try:
        for t in traffic:
            t.send("go")
        # One node at a time, each back and its sessions up before the next, as a DaemonSet's
        # rolling update (maxUnavailable 1) waits for readiness.
        for node in NODES:
            lab.cli("agent", "stop", node)
            lab.cli("agent", "start", node, timeout=180)
            wait_for(f"{node}'s sessions Established again", lambda: _all_established(lab), timeout=60)
        for t in traffic:
            t.send("stop")
        summaries = [t.summary() for t in traffic]
        for t in traffic:
            t.send("exit")
    finally:
        for t in traffic:
            t.close()
    flows = [f for s in summaries for f in s["flows"]]
    pings = [p for s in summaries for p in s["pings"]]
    sent = sum(p["sent"] for p in pings)
    print(f"rolling restart of {len(NODES)} agents: {len(flows)} flows, {sent} pings, "
          f"{sum(len(p['lost']) for p in pings)} lost, longest flow stall "
          f"{max(f['maxStall'] for f in flows):.2f} s")
    assert len(flows) == 6 and all(f["connected"] and f["broken"] is None for f in flows), flows
    assert sent > 100 and all(p["lost"] == [] for p in pings), pings
    for ref in pods:
        lab.cli("pod", "del", ref)


def test_the_previous_releases_datastore_is_read_by_todays_agents(lab: Lab) -> None:
    """Every agent stopped, the datastore replaced by the fixture, the agents started: routes,
    IPAM and policies all come from what be5aee6 wrote. Last in this module: it rewrites the lab."""
    fixture = json.loads(FIXTURE.read_text())
    assert fixture["release"].startswith("be5aee6")
    old_keys: dict[str, str] = fixture["keys"]
    old_ips = {ep["metadata"]["name"]: ipaddress.ip_interface(ep["spec"]["ipNetworks"][0]).ip
               for key, value in old_keys.items() if "/workloadendpoints/" in key for ep in [json.loads(value)]}
    blocks = {key.split("/")[5]: ipaddress.ip_network(key.rsplit("/", 1)[1].replace("-", "/"))
              for key in old_keys if key.startswith("/calico/ipam/v2/host/")}
    assert sorted(blocks) == ["n1", "n2"] and len(old_ips) == 2

    for node in NODES:
        lab.cli("agent", "stop", node)
    env = {**os.environ, "ETCD_ENDPOINTS": topology.ETCD_ENDPOINT}
    fabric = ["ip", "netns", "exec", topology.fabric_netns(lab.name)]
    subprocess.run([*fabric, "etcdctl", "--endpoints", topology.ETCD_ENDPOINT, "del", "--prefix", "/calico/"],
                   check=True, capture_output=True, timeout=30)
    done = subprocess.run([*fabric, sys.executable, "-m", "tests.e2e.upgrade_fixture", "load", str(FIXTURE)],
                          capture_output=True, text=True, timeout=60, env=env)
    assert done.returncode == 0, done.stderr
    for node in NODES:  # n3 is not in the old datastore: it joins as a new node would
        lab.cli("agent", "start", node, timeout=180)

    # Routes: the old blocks of n1 and n2 reach the other nodes over BGP.
    wait_for("every BGP session Established", lambda: _all_established(lab), timeout=60)
    for node, block in blocks.items():
        via = f"192.0.2.{10 + int(node[1:])}"
        for other in NODES:
            if other != node:
                wait_for(f"{block} via {via} on {other}",
                         lambda: f"{block} via {via} " in lab.ip(other, "route", "show", "proto", "80"), timeout=30)

    # IPAM: new pods on n1 and n2 get addresses of their old affine blocks, never an old pod's.
    lab.cli("ns", "add", "upg", "--labels", "team=a")
    new = {"upg/web2": ("n1", "app=web"), "upg/db2": ("n2", "app=db"), "upg/other": ("n3", "app=other")}
    for ref, (node, labels) in new.items():
        lab.cli("pod", "add", ref, "--node", node, "--labels", labels, "--serve", "tcp:80,tcp:81")
    for ref, (node, _) in new.items():
        ip = ipaddress.ip_address(lab.pod_ip(ref))
        assert ip not in old_ips.values(), f"{ref} got {ip}, an address the old release handed out"
        if node in blocks:
            assert ip in blocks[node], f"{ref} on {node}: {ip} is not in its old block {blocks[node]}"
    check = lab.cli("exec", "fabric", "--", "felixctl", "ipam", "check", check=False)
    assert check.returncode == 0, check.stdout + check.stderr

    # Policies: the old Kubernetes NetworkPolicy, Calico NetworkPolicy and GlobalNetworkPolicy.
    expect = [("upg/web2", "upg/db2", 80, True),     # db-from-web allows web -> db on 80
              ("upg/other", "upg/db2", 80, False),   # ... and nothing else into db
              ("upg/other", "upg/web2", 80, True),   # deny-81 passes the rest: kns.upg allows
              ("upg/other", "upg/web2", 81, False),  # deny-81 (GlobalNetworkPolicy, app != 'db')
              ("upg/web2", "upg/other", 80, True),   # web-egress allows TCP 80 ...
              ("upg/web2", "upg/other", 81, False)]  # ... and ICMP only
    # In this order, each "blocked" comes after a "connected" to the same pod: a drop that is the
    # policy's, not a route still missing.
    for src, dst, port, allowed in expect:
        wait_for(f"{src} -> {dst}:{port} {'connected' if allowed else 'blocked'}",
                 lambda: (lab.cli("probe", src, dst, "--port", str(port), check=False).returncode == 0) == allowed,
                 timeout=30)
