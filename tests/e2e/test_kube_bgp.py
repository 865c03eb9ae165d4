"""The BGP mesh of test_bgp.py on a lab whose datastore is a real kube-apiserver, and what an API
server outage does to it: nothing to the dataplane, and the agents catch up when it returns.

`felixpy-lab up --datastore kubernetes --mode bgp`: 5 nodes registered as Kubernetes Nodes, agents
with the felixpy-node token, pods created, bound and reported Running through the API.
"""

from __future__ import annotations


import pytest

from tests.e2e.labtools import Lab, finish_ping, start_ping, wait_for
from tests.e2e.test_bgp import (  # noqa: F401  (the fixture and the tests, collected here again)
    mesh,
    test_agent_restart_under_ping_loses_nothing,
    test_full_ping_and_tcp_matrix,
    test_new_block_route_appears_on_every_node,
    test_remote_blocks_are_learned_over_bgp,
    test_status_shows_established_mesh_sessions,
)

pytestmark = pytest.mark.e2e

LAB_NODES = 5
LAB_MODE = "bgp"
LAB_ARGS = ["--datastore", "kubernetes"]


def test_nodes_are_kubernetes_nodes_whose_network_the_agents_declared_up(mesh: Lab) -> None:
    data = mesh.json("status")
    assert data["datastore"] == "kubernetes" and data["apiServer"].startswith("https://192.0.2.1:")
    for n in range(1, 6):
        node = mesh.kube_get(f"/api/v1/nodes/n{n}")
        conditions = {c["type"]: c for c in node["status"]["conditions"]}
        assert conditions["NetworkUnavailable"]["status"] == "False", node
        assert conditions["Ready"]["status"] == "True"
        assert node["metadata"]["annotations"]["projectcalico.org/IPv4Address"]
    pod = mesh.kube_get("/api/v1/namespaces/b/pods/p1")
    assert pod["spec"]["nodeName"] == "n1" and pod["status"]["phase"] == "Running"
    assert pod["status"]["podIP"] == mesh.pod_ip("b/p1")
    assert pod["metadata"]["annotations"]["cni.projectcalico.org/podIP"] == f"{mesh.pod_ip('b/p1')}/32"


def test_api_server_outage_leaves_the_dataplane_and_agents_catch_up(mesh: Lab) -> None:
    ping = start_ping(mesh, "b/p1", mesh.pod_ip("b/p3"), interval=0.1, count=150)  # ~15 s
    mesh.cli("apiserver", "stop")
    try:
        # Mid-outage, a fresh TCP connection across nodes still works: nothing was flushed.
        assert mesh.cli("probe", "b/p2", "b/p4", "--port", "80", check=False).returncode == 0
    finally:
        mesh.cli("apiserver", "start", timeout=120)
        sent, received = finish_ping(ping, timeout=60)
    assert sent == 150 and received == sent, f"lost {sent - received} of {sent} pings across the outage"
    # After it returns the agents resync: a new pod gets a fresh address and is reachable.
    mesh.cli("pod", "add", "b/after", "--node", "n3", "--serve", "tcp:80")
    ips = [p["ips"][0] for p in mesh.json("status")["pods"]]
    assert len(ips) == len(set(ips)), ips
    wait_for("b/p1 reaches b/after", lambda: mesh.cli("probe", "b/p1", "b/after", "--port", "80",
                                                     check=False).returncode == 0, timeout=20)
    check = mesh.cli("exec", "n1", "--", "felixctl", "ipam", "check")
    assert "Check complete; found 0 problems." in check.stdout, check.stdout
