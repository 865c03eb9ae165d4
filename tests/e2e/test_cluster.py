"""A 3-node lab with two pods per node: connectivity, status, CNI DEL, route repair, CLI errors."""

from __future__ import annotations

import ipaddress
import time

import pytest

from tests.e2e.labtools import Lab, wait_for

pytestmark = pytest.mark.e2e

PODS = {"x/a1": "n1", "x/a2": "n1", "x/b1": "n2", "x/b2": "n2", "x/c1": "n3", "x/c2": "n3"}


@pytest.fixture(scope="module")
def cluster(lab: Lab) -> Lab:
    lab.cli("ns", "add", "x", "--labels", "team=blue")
    for ref, node in PODS.items():
        lab.cli("pod", "add", ref, "--node", node, "--labels", f"app={ref.split('/')[1]}",
                "--serve", "tcp:80,udp:80")
    return lab


def test_every_pod_reaches_every_other_pod_ping_and_tcp(cluster: Lab) -> None:
    start = time.monotonic()
    data = cluster.json("matrix", "--ports", "80", "--protos", "icmp,tcp,udp")
    elapsed = time.monotonic() - start
    assert data["pods"] == sorted(PODS)
    for key in ("icmp", "tcp/80", "udp/80"):
        rows = data["results"][key]
        assert set(rows) == set(PODS)
        for src, row in rows.items():
            assert set(row) == set(PODS) - {src}
            blocked = [dst for dst, ok in row.items() if not ok]
            assert not blocked, f"{key}: {src} cannot reach {blocked}"
    assert elapsed < 15, f"matrix took {elapsed:.1f} s"


def test_matrix_reports_unserved_ports_as_blocked(cluster: Lab) -> None:
    data = cluster.json("matrix", "--ports", "81", "--protos", "tcp")
    assert list(data["results"]) == ["tcp/81"]
    assert not any(ok for row in data["results"]["tcp/81"].values() for ok in row.values())


def test_probe_exit_codes(cluster: Lab) -> None:
    assert cluster.cli("probe", "x/a1", "x/c1", "--port", "80").returncode == 0
    assert cluster.cli("probe", "x/a1", "x/c1", "--port", "80", "--proto", "udp").returncode == 0
    blocked = cluster.cli("probe", "x/a1", "x/c1", "--port", "81", check=False)
    assert blocked.returncode == 1
    assert "blocked" in blocked.stdout


def test_status_json_shape_and_blocks(cluster: Lab) -> None:
    data = cluster.json("status")
    pool = ipaddress.IPv4Network("10.244.0.0/16")
    assert [n["name"] for n in data["nodes"]] == ["n1", "n2", "n3"]
    all_blocks: list[str] = []
    for i, node in enumerate(data["nodes"], start=1):
        assert node["ip"] == f"192.0.2.{10 + i}"
        assert node["routeReflector"] is False
        assert node["bgp"] == []
        assert node["blocks"], f"{node['name']} has no block although it runs pods"
        for block in node["blocks"]:
            net = ipaddress.IPv4Network(block)
            assert net.subnet_of(pool) and net.prefixlen == 26
        all_blocks += node["blocks"]
    assert len(all_blocks) == len(set(all_blocks))
    pods = {f"{p['namespace']}/{p['name']}": p for p in data["pods"]}
    assert set(pods) == set(PODS)
    for ref, pod in pods.items():
        assert pod["node"] == PODS[ref]
        assert pod["labels"] == {"app": ref.split("/")[1]}
        (ip,) = pod["ips"]
        node_blocks = next(n["blocks"] for n in data["nodes"] if n["name"] == pod["node"])
        assert any(ipaddress.ip_address(ip) in ipaddress.ip_network(b) for b in node_blocks)


def test_workload_endpoint_carries_labels_and_named_ports(cluster: Lab) -> None:
    cluster.cli("label", "pod", "x/a1", "tier=web", "app-")
    out = cluster.cli("exec", "n1", "--", "felixctl", "get", "workloadendpoints", "-n", "x", "-o", "json").stdout
    assert "n1-k8s-a1-eth0" in out
    import json

    parsed = json.loads(out)
    items = parsed["items"] if isinstance(parsed, dict) and "items" in parsed else parsed
    wep = next(i for i in items if i["metadata"]["name"] == "n1-k8s-a1-eth0")
    assert wep["metadata"]["labels"] == {"tier": "web", "projectcalico.org/namespace": "x",
                                         "projectcalico.org/orchestrator": "k8s"}
    ports = {(p["name"], p["port"], p["protocol"]) for p in wep["spec"]["ports"]}
    assert ports == {("serve-80-tcp", 80, "TCP"), ("serve-80-udp", 80, "UDP")}


def test_deleted_route_is_repaired_within_resync_interval(cluster: Lab) -> None:
    ip = cluster.pod_ip("x/a2")
    assert ip in cluster.ip("n1", "route", "show", f"{ip}/32")
    cluster.ip("n1", "route", "del", f"{ip}/32")
    took = wait_for(f"route {ip} back on n1",
                    lambda: ip in cluster.ip("n1", "route", "show", f"{ip}/32"), timeout=15)
    print(f"route repaired after {took:.1f} s")
    # And a remote block route on another node, deleted by hand, comes back too.
    block = next(n["blocks"][0] for n in cluster.json("status")["nodes"] if n["name"] == "n1")
    assert block in cluster.ip("n2", "route", "show", block)
    cluster.ip("n2", "route", "del", block)
    wait_for(f"route {block} back on n2", lambda: block in cluster.ip("n2", "route", "show", block),
             timeout=15)
    assert cluster.cli("probe", "x/b1", "x/a2", "--port", "80").returncode == 0


def test_cni_del_frees_ip_and_route(cluster: Lab) -> None:
    cluster.cli("pod", "add", "x/gone", "--node", "n2")
    ip = cluster.pod_ip("x/gone")
    assert ip in cluster.ip("n2", "route", "show", f"{ip}/32")
    used = cluster.cli("exec", "n2", "--", "felixctl", "ipam", "show", f"--ip={ip}").stdout
    assert "in use" in used
    cluster.cli("pod", "del", "x/gone")
    assert cluster.ip("n2", "route", "show", f"{ip}/32").strip() == ""
    free = cluster.cli("exec", "n2", "--", "felixctl", "ipam", "show", f"--ip={ip}").stdout
    assert "not assigned" in free
    assert "x/gone" not in [f"{p['namespace']}/{p['name']}" for p in cluster.json("status")["pods"]]


def test_user_errors_are_one_line(cluster: Lab) -> None:
    cases = [
        ("pod", "del", "x/nosuch"),
        ("pod", "add", "x/bad", "--node", "n9"),
        ("pod", "add", "x/bad", "--node", "n1", "--labels", "novalue"),
        ("probe", "x/a1", "y/none", "--port", "80"),
        ("up",),
    ]
    for args in cases:
        done = cluster.cli(*args, check=False)
        assert done.returncode != 0, args
        assert "Traceback" not in done.stderr, args
        assert len(done.stderr.strip().splitlines()) == 1, (args, done.stderr)
        assert done.stderr.startswith("felixpy-lab: "), (args, done.stderr)
