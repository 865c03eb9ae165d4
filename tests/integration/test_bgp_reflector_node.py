"""A node that is a route reflector and runs pods, as Calico runs them, with real BIRD and ExaBGP.

n1's Node carries routeReflectorClusterID: its agent (the real BGPController) renders BIRD for the
node's sessions and peers its own ExaBGP with that BIRD over loopback (127.0.0.2 ↔ the node
address); n3 is an ordinary node whose BGPPeer selects the reflector. Checked: the reflector node's
own block reaches the client with the node's address as next hop, the client's block reaches the
reflector node's RIB (what its kernel gets), and a node can switch into reflector mode and out of
it live. The propagation delays are printed (docs/bgp.md quotes them).
"""

from __future__ import annotations

import os
import statistics
import time
from pathlib import Path
from typing import Any, Iterator

import pytest

from felixpy.datastore import keys
from felixpy.datastore.syncer import KVUpdate
from felixpy.node.reflector import ReflectorPaths
from tests.integration.bgplab import HAVE_BIRD, HAVE_EXABGP, AgentNode, Lab, sh, wait_for

pytestmark = [pytest.mark.root, pytest.mark.skipif(os.geteuid() != 0, reason="needs root")]
if not (HAVE_EXABGP and HAVE_BIRD):
    pytestmark.append(pytest.mark.skip(reason="needs exabgp in the venv and bird2"))

RR, CLIENT, OTHER = "192.0.2.11", "192.0.2.13", "192.0.2.14"
CLUSTER = "244.0.0.1"


def node(name: str, ip: str, *, reflector: bool) -> KVUpdate:
    bgp: dict[str, Any] = {"ipv4Address": f"{ip}/24"}
    labels = {}
    if reflector:
        bgp["routeReflectorClusterID"] = CLUSTER
        labels["route-reflector"] = "true"
    return KVUpdate(keys.resource_key("nodes", name), {"kind": "Node", "metadata": {"name": name, "labels": labels},
                                                       "spec": {"bgp": bgp}}, 1)


RECIPE = [
    KVUpdate(keys.resource_key("ippools", "default"),
             {"kind": "IPPool", "metadata": {"name": "default"}, "spec": {"cidr": "10.244.0.0/16"}}, 1),
    KVUpdate(keys.resource_key("bgpconfigurations", "default"),
             {"kind": "BGPConfiguration", "metadata": {"name": "default"}, "spec": {"nodeToNodeMeshEnabled": False}}, 1),
    KVUpdate(keys.resource_key("bgppeers", "peer-with-route-reflectors"),
             {"kind": "BGPPeer", "metadata": {"name": "peer-with-route-reflectors"},
              "spec": {"nodeSelector": "all()", "peerSelector": "route-reflector == 'true'"}}, 1),
]


def bird_paths(lab: Lab, name: str, ns: str) -> ReflectorPaths:
    """BIRD for the node, started by the agent (FELIXPY_BIRD_START) inside the node's namespace."""
    d = lab.dir(name) / "bird"
    d.mkdir(exist_ok=True)
    wrapper = d / "bird-in-netns"
    wrapper.write_text(f'#!/bin/sh\nexec ip netns exec {ns} bird "$@"\n')
    wrapper.chmod(0o755)
    return ReflectorPaths(config=str(d / "bird.conf"), socket=str(d / "bird.ctl"), status=str(d / "unused.json"),
                          start_bird=True, bird=str(wrapper))


class Cluster:
    def __init__(self, lab: Lab, rr: AgentNode, client: AgentNode, other: AgentNode) -> None:
        self.lab, self.rr, self.client, self.other = lab, rr, client, other

    def wait(self, what: str, predicate: Any, timeout: float = 30.0) -> Any:
        def check() -> Any:
            for agent in (self.rr, self.client, self.other):
                agent.pump(0.005)
            return predicate()
        return wait_for(what, check, timeout, interval=0)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    lab = Lab(tmp_path_factory.mktemp("rrnode"))
    agents: list[AgentNode] = []
    try:
        rr_ns = lab.prefix + "n1"
        rr = AgentNode(lab, "n1", RR, bird_paths=bird_paths(lab, "n1", rr_ns))
        agents.append(rr)
        client = AgentNode(lab, "n3", CLIENT)
        agents.append(client)
        other = AgentNode(lab, "n4", OTHER)
        agents.append(other)
        updates = [node("n1", RR, reflector=True), node("n3", CLIENT, reflector=False),
                   node("n4", OTHER, reflector=False), *RECIPE]
        for agent in agents:
            agent.feed(*updates)
        rr.ctl.set_announcements({"10.244.1.0/26"})
        # 100.64.0.0/24 is in no IP pool: BIRD takes it (the reflector node's own kernel gets it,
        # as calico-node's BIRD would program it), but does not pass it on (Calico's export).
        client.ctl.set_announcements({"10.244.3.0/26", "100.64.0.0/24"})
        other.ctl.set_announcements({"10.244.4.0/26"})
        yield Cluster(lab, rr, client, other)
    finally:
        for agent in agents:
            agent.close()
        for agent in agents:
            ctl = Path(agent.dir) / "bird" / "bird.ctl"
            if ctl.exists():
                sh("birdc", "-s", str(ctl), "down", check=False)
        lab.close()


def test_reflector_node_speaks_through_bird_and_its_agent_is_a_client(cluster: Cluster) -> None:
    rr = cluster.rr
    assert rr.ctl.reflector_mode
    exabgp = Path(rr.paths.config).read_text()
    assert f"neighbor {RR} {{" in exabgp and "local-address 127.0.0.2;" in exabgp and f"neighbor {CLIENT}" not in exabgp
    bird = Path(rr.dir / "bird" / "bird.conf").read_text()
    assert "protocol bgp Local_Agent" in bird and f"neighbor {CLIENT} as 64512;" in bird
    cluster.wait("the client's session to the reflector", lambda: cluster.client.session_up(RR))
    cluster.wait("the reflector's sessions", lambda: rr.session_up(CLIENT)
                 and rr.ctl.status()["agentSession"]["state"] == "Established")


def test_routes_flow_both_ways_with_the_originators_next_hops(cluster: Cluster) -> None:
    cluster.wait("the client learns the reflector node's block",
                 lambda: cluster.client.ctl.learned_routes().get("10.244.1.0/26") == RR)
    cluster.wait("the reflector node learns the client's block",
                 lambda: cluster.rr.ctl.learned_routes().get("10.244.3.0/26") == CLIENT)
    cluster.wait("the clients learn each other's blocks",
                 lambda: cluster.other.ctl.learned_routes().get("10.244.3.0/26") == CLIENT
                 and cluster.client.ctl.learned_routes().get("10.244.4.0/26") == OTHER)
    path = cluster.client.ctl.rib.best("10.244.1.0/26")
    # The reflector node's own routes carry its BIRD's own cluster ID (the router ID), see bgp/bird.py.
    assert path is not None and RR in path.attributes.cluster_list
    cluster.wait("the reflector node's kernel gets the non-pool route",
                 lambda: cluster.rr.ctl.learned_routes().get("100.64.0.0/24") == CLIENT)
    assert "100.64.0.0/24" not in cluster.other.ctl.learned_routes()


def test_propagation_through_the_reflector_node(cluster: Cluster) -> None:
    cluster.wait("sessions", lambda: cluster.client.ctl.learned_routes().get("10.244.1.0/26") == RR)
    to_client, to_rr = [], []
    for i in range(10):
        prefix = f"10.245.{i}.0/26"
        start = time.monotonic()
        cluster.rr.ctl.set_announcements({"10.244.1.0/26", prefix})
        cluster.wait("to the client", lambda: prefix in cluster.client.ctl.learned_routes(), timeout=10)
        to_client.append(time.monotonic() - start)
        start = time.monotonic()
        cluster.client.ctl.set_announcements({"10.244.3.0/26", prefix.replace("10.245", "10.246")})
        cluster.wait("to the reflector node",
                     lambda: prefix.replace("10.245", "10.246") in cluster.rr.ctl.learned_routes(), timeout=10)
        to_rr.append(time.monotonic() - start)
    cluster.rr.ctl.set_announcements({"10.244.1.0/26"})
    cluster.client.ctl.set_announcements({"10.244.3.0/26"})
    print(f"\nreflector node -> client RIB: p50 {statistics.median(to_client) * 1000:.1f} ms; "
          f"client -> reflector node RIB: p50 {statistics.median(to_rr) * 1000:.1f} ms")
    assert statistics.median(to_client) < 1.0 and statistics.median(to_rr) < 1.0


def test_switching_out_of_and_back_into_reflector_mode(cluster: Cluster) -> None:
    rr, client, other = cluster.rr, cluster.client, cluster.other
    bird_ctl = str(rr.dir / "bird" / "bird.ctl")
    # Without the cluster ID n1 is an ordinary node: BIRD goes, ExaBGP listens again and n1 peers
    # with n3 through the same BGPPeer (n1 no longer matches its peerSelector: n3 is not a reflector,
    # so with the mesh off there is no session; turn the mesh on for the test).
    mesh_on = KVUpdate(keys.resource_key("bgpconfigurations", "default"),
                       {"kind": "BGPConfiguration", "metadata": {"name": "default"}, "spec": {}}, 2)
    for agent in (rr, client, other):
        agent.feed(node("n1", RR, reflector=False), mesh_on)
    cluster.wait("n1 out of reflector mode", lambda: not rr.ctl.reflector_mode)
    wait_for("BIRD stopped", lambda: "Unable to connect" in sh("birdc", "-s", bird_ctl, "show", "status",
                                                                check=False) or not os.path.exists(bird_ctl), 10)
    cluster.wait("a mesh session between the two", lambda: rr.session_up(CLIENT) and client.session_up(RR))
    cluster.wait("routes over the mesh", lambda: rr.ctl.learned_routes().get("10.244.3.0/26") == CLIENT
                 and client.ctl.learned_routes().get("10.244.1.0/26") == RR)
    # And back: BIRD starts again, the client peers with it, the agent sits behind it.
    for agent in (rr, client, other):
        agent.feed(node("n1", RR, reflector=True), *RECIPE)
    cluster.wait("n1 a reflector again", lambda: rr.ctl.reflector_mode and rr.session_up(CLIENT)
                 and client.session_up(RR), timeout=40)
    cluster.wait("routes through the reflector again",
                 lambda: rr.ctl.learned_routes().get("10.244.3.0/26") == CLIENT
                 and client.ctl.learned_routes().get("10.244.1.0/26") == RR, timeout=40)
