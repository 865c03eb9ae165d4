"""Dual-stack on a lab whose datastore is a real kube-apiserver (VXLAN mode, both families).

`felixpy-lab up --datastore kubernetes --ip-family dual`: the IPv6 pool, blocks, affinities and
handles are Calico's CRDs on the real server under Calico's names, the Nodes carry the IPv6
annotations, the Pods the IPs of both families (status.podIPs, cni.projectcalico.org/podIPs), and
pods reach each other over both families; deleting a pod releases both addresses through the API.
"""

from __future__ import annotations

import ipaddress
from typing import Any

import pytest

from tests.e2e.labtools import Lab, blocked_pairs, wait_for

pytestmark = pytest.mark.e2e
LAB_MODE = "vxlan"
LAB_NODES = 2
LAB_ARGS = ["--datastore", "kubernetes", "--ip-family", "dual"]
PODS = {"x/a": "n1", "x/b": "n2", "x/c": "n1"}


@pytest.fixture(scope="module")
def cluster(lab: Lab) -> Lab:
    lab.cli("ns", "add", "x")
    for ref, node in PODS.items():
        lab.cli("pod", "add", ref, "--node", node, "--serve", "tcp:80,udp:80")
    return lab


def calico_crds(lab: Lab, plural: str) -> dict[str, dict[str, Any]]:
    items = lab.kube_get(f"/apis/crd.projectcalico.org/v1/{plural}")["items"]
    return {item["metadata"]["name"]: item["spec"] for item in items}


def cidr_to_name(cidr: str) -> str:
    """Calico's names.CIDRToName: ':' and '/' become '-' (so '::' is '--'), lower case."""
    return cidr.replace(":", "-").replace("/", "-").replace(".", "-").lower()


def test_ipv6_objects_are_calicos_crds_on_the_real_server(cluster: Lab) -> None:
    status = cluster.json("status", "-o", "json")
    for node in status["nodes"]:
        families = sorted(ipaddress.ip_network(b).version for b in node["blocks"])
        assert families == [4, 6], node
    blocks = calico_crds(cluster, "ipamblocks")
    affinities = calico_crds(cluster, "blockaffinities")
    for node in status["nodes"]:
        v6_block = next(b for b in node["blocks"] if ":" in b)
        assert blocks[cidr_to_name(v6_block)]["affinity"] == f"host:{node['name']}"
        affinity = affinities[f"{node['name']}-{cidr_to_name(v6_block)}"]
        assert affinity["cidr"] == v6_block and affinity["state"] == "confirmed"
        annotations = cluster.kube_get(f"/api/v1/nodes/{node['name']}")["metadata"]["annotations"]
        assert annotations["projectcalico.org/IPv6Address"].startswith("fd00:192:0:2::"), annotations
        tunnel = annotations["projectcalico.org/IPv6VXLANTunnelAddr"]
        assert ipaddress.ip_address(tunnel) in ipaddress.ip_network(v6_block)
    for pod in status["pods"]:
        v4, v6 = sorted(pod["ips"], key=lambda ip: ipaddress.ip_address(ip).version)
        obj = cluster.kube_get(f"/api/v1/namespaces/{pod['namespace']}/pods/{pod['name']}")
        assert [p["ip"] for p in obj["status"]["podIPs"]] == [v4, v6]
        assert obj["metadata"]["annotations"]["cni.projectcalico.org/podIPs"] == f"{v4}/32,{v6}/128"


def test_full_matrix_over_both_families(cluster: Lab) -> None:
    data = cluster.json("matrix", "--ports", "80", "--protos", "icmp,tcp,udp")
    assert set(data["results"]) == {"icmp", "tcp/80", "udp/80", "icmp6", "tcp6/80", "udp6/80"}
    assert not blocked_pairs(data), blocked_pairs(data)


def test_pod_delete_releases_both_addresses_through_the_api(cluster: Lab) -> None:
    cluster.cli("pod", "add", "x/d", "--node", "n2")
    ips = next(p["ips"] for p in cluster.json("status", "-o", "json")["pods"] if p["name"] == "d")
    container = cluster.kube_get("/api/v1/namespaces/x/pods/d")["metadata"]["annotations"][
        "cni.projectcalico.org/containerID"]
    handle = f"k8s-pod-network.{container}"  # Calico's handle id: network name + container id
    blocks = calico_crds(cluster, "ipamhandles")[handle]["block"]
    assert sorted(ipaddress.ip_network(b).version for b in blocks) == [4, 6], blocks
    cluster.cli("pod", "del", "x/d")
    wait_for("the pod's handle to be deleted", lambda: handle not in calico_crds(cluster, "ipamhandles"), 10)
    for ip in ips:
        shown = cluster.cli("exec", "n1", "--", "felixctl", "ipam", "show", "--ip", ip).stdout
        assert f"IP {ip} is not assigned" in shown, shown
    check = cluster.cli("exec", "n1", "--", "felixctl", "ipam", "check").stdout
    assert "found 0 problems" in check, check
