"""Calico's IPAM pool fields and pod/namespace annotations in the lab, driven through its CLI.

Pods get their addresses from the real agent through the real CNI plugin; their annotations
reach the agent as containerd passes them (runtimeConfig), namespace annotations and labels
through the namespace's Profile. Checked from outside: the address the pod's eth0 carries, that
it is reachable from a pod on the other node, and felixctl's view of IPAM.
"""

from __future__ import annotations

import ipaddress
import json
from pathlib import Path

import pytest

from tests.e2e.labtools import Lab

pytestmark = pytest.mark.e2e
LAB_NODES = 2

DEFAULT_POOL = "default-ipv4-ippool"  # the lab's 10.244.0.0/16
POOLS = [
    {"apiVersion": "projectcalico.org/v3", "kind": "IPPool", "metadata": {"name": "blue-pool"},
     "spec": {"cidr": "10.245.0.0/24", "blockSize": 28, "namespaceSelector": "team == 'blue'"}},
    {"apiVersion": "projectcalico.org/v3", "kind": "IPPool", "metadata": {"name": "lb-pool"},
     "spec": {"cidr": "10.246.0.0/24", "blockSize": 28, "allowedUses": ["LoadBalancer"]}},
    {"apiVersion": "projectcalico.org/v3", "kind": "IPPool", "metadata": {"name": "pinned-pool"},
     "spec": {"cidr": "10.247.0.0/24", "blockSize": 28, "assignmentMode": "Manual"}},
]
NET = ipaddress.ip_network


def annotation(key: str, value: list[str]) -> str:
    return f"cni.projectcalico.org/{key}={json.dumps(value)}"


@pytest.fixture(scope="module")
def cluster(lab: Lab, tmp_path_factory: pytest.TempPathFactory) -> Lab:
    path = Path(tmp_path_factory.mktemp("pools")) / "pools.json"
    path.write_text(json.dumps({"apiVersion": "v1", "kind": "List", "items": POOLS}))
    lab.cli("apply", "-f", str(path))
    # Blue namespaces get blue-pool only: the default pool now selects every other namespace.
    lab.cli("exec", "n1", "--", "felixctl", "patch", "ippool", DEFAULT_POOL,
            "-p", json.dumps({"spec": {"namespaceSelector": "team != 'blue'"}}))
    lab.cli("ns", "add", "blue", "--labels", "team=blue")
    lab.cli("ns", "add", "red", "--labels", "team=red")
    lab.cli("ns", "add", "pinned", "--annotations", annotation("ipv4pools", ["pinned-pool"]))
    lab.cli("pod", "add", "red/server", "--node", "n2", "--serve", "tcp:80")
    return lab


def eth0_address(lab: Lab, pod: str) -> str:
    addrs = json.loads(lab.ip(pod, "-j", "-4", "addr", "show", "dev", "eth0"))
    return str(addrs[0]["addr_info"][0]["local"])


def add_fails(lab: Lab, *args: str) -> str:
    done = lab.cli("pod", "add", *args, check=False)
    assert done.returncode == 1, done.stdout
    return done.stderr


def test_namespace_selector_picks_the_pool(cluster: Lab) -> None:
    cluster.cli("pod", "add", "blue/a", "--node", "n1", "--serve", "tcp:80")
    cluster.cli("pod", "add", "blue/b", "--node", "n2")
    cluster.cli("pod", "add", "red/a", "--node", "n1")
    assert ipaddress.IPv4Address(cluster.pod_ip("blue/a")) in NET("10.245.0.0/24")
    assert ipaddress.IPv4Address(cluster.pod_ip("blue/b")) in NET("10.245.0.0/24")
    assert ipaddress.IPv4Address(cluster.pod_ip("red/a")) in NET("10.244.0.0/16")
    # Routed like any pod: across nodes, both ways between the pools.
    cluster.cli("probe", "blue/b", "blue/a", "--port", "80", "--timeout", "3")
    cluster.cli("probe", "blue/a", "red/server", "--port", "80", "--timeout", "3")


def test_ip_addrs_annotation_gets_exactly_that_address(cluster: Lab) -> None:
    wanted = "10.244.200.7"
    cluster.cli("pod", "add", "red/fixed", "--node", "n1", "--serve", "tcp:80",
                "--annotations", annotation("ipAddrs", [wanted]))
    assert cluster.pod_ip("red/fixed") == wanted
    assert eth0_address(cluster, "red/fixed") == wanted
    cluster.cli("probe", "red/server", "red/fixed", "--port", "80", "--timeout", "3")
    shown = cluster.cli("exec", "n1", "--", "felixctl", "ipam", "show", f"--ip={wanted}").stdout
    assert f"IP {wanted} is in use" in shown and "pod: fixed" in shown

    # The same address for another pod: refused, and that pod leaves nothing behind.
    err = add_fails(cluster, "red/thief", "--node", "n2", "--annotations", annotation("ipAddrs", [wanted]))
    assert f"address {wanted} is already assigned" in err and err.count("\n") == 1
    check = cluster.cli("exec", "n1", "--", "felixctl", "ipam", "check").stdout
    assert check.splitlines()[-1] == "Check complete; found 0 problems.", check
    # Outside every pool, or in the LoadBalancer pool: refused too.
    err = add_fails(cluster, "red/outside", "--node", "n2", "--annotations", annotation("ipAddrs", ["192.168.9.9"]))
    assert "not in any enabled IP pool" in err
    err = add_fails(cluster, "red/lbip", "--node", "n2", "--annotations", annotation("ipAddrs", ["10.246.0.9"]))
    assert "which does not allow use Workload" in err


def test_a_load_balancer_pool_never_gives_pod_addresses(cluster: Lab) -> None:
    err = add_fails(cluster, "red/lb", "--node", "n1", "--annotations", annotation("ipv4pools", ["lb-pool"]))
    assert "none of the requested pools [lb-pool] allows use Workload" in err
    show = cluster.cli("exec", "n1", "--", "felixctl", "ipam", "show").stdout
    row = next(line for line in show.splitlines() if "10.246.0.0/24" in line)
    assert [c.strip() for c in row.strip("|").split("|")][3] == "0 (0%)"


def test_pool_annotations_namespace_then_pod(cluster: Lab) -> None:
    cluster.cli("pod", "add", "pinned/a", "--node", "n2")
    assert ipaddress.IPv4Address(cluster.pod_ip("pinned/a")) in NET("10.247.0.0/24")  # the namespace's
    cluster.cli("pod", "add", "pinned/b", "--node", "n2", "--annotations", annotation("ipv4pools", [DEFAULT_POOL]))
    assert ipaddress.IPv4Address(cluster.pod_ip("pinned/b")) in NET("10.244.0.0/16")  # the pod's wins
    cluster.cli("probe", "pinned/a", "red/server", "--port", "80", "--timeout", "3")


def test_ip_addrs_no_ipam_needs_the_feature_enabled(cluster: Lab) -> None:
    err = add_fails(cluster, "red/raw", "--node", "n1", "--annotations", annotation("ipAddrsNoIpam", ["10.99.0.1"]))
    assert "requested feature is not enabled: ip_addrs_no_ipam" in err
