"""BGP as on-prem operators use Calico, end to end in a 3-node lab with a real FRR top-of-rack router.

The lab's fabric runs FRR's bgpd (`felixpy-lab tor up`), peered with every node through the
BGPPeer `tor`. Checked on the router and in the nodes' kernels:

* Service advertisement: the cluster-IP and LoadBalancer ranges from every node; a Local
  service's /32s only from the node with its ready endpoint, following the endpoint as it moves
  and withdrawn when the last one goes; no node programs Service routes it learns.
* Communities: prefixAdvertisements' standard and large communities on the nodes' blocks.
* BGPFilter: an import Reject attached to the ToR's BGPPeer keeps the ToR's prefix out of every
  node's kernel, and it comes back when the filter is detached.
* Reflectors that run pods, set up with Calico's recipe through felixctl (cluster ID, label,
  BGPPeer, mesh off): the node keeps serving pods, its blocks are announced and learned, the ToR
  still learns everything; a second reflector of the same cluster peers with the first using the
  cluster ID.
* CalicoNodeStatus: the agent fills in the status, and refreshes it every period.
"""

from __future__ import annotations

import json
import tempfile
from typing import Any

import yaml

from tests.e2e.labtools import Lab, wait_for

LAB_NODES = 3
LAB_MODE = "bgp"

N1, N2, N3 = "192.0.2.11", "192.0.2.12", "192.0.2.13"
TOR_PREFIX = "203.0.113.0/24"
LB_IP = "198.18.0.10"

BGP_CONFIG = {
    "apiVersion": "projectcalico.org/v3", "kind": "BGPConfiguration", "metadata": {"name": "default"},
    "spec": {"serviceClusterIPs": [{"cidr": "10.96.0.0/16"}], "serviceLoadBalancerIPs": [{"cidr": "198.18.0.0/24"}],
             "communities": [{"name": "pods", "value": "65000:100"}],
             "prefixAdvertisements": [{"cidr": "10.244.0.0/16", "communities": ["pods", "65000:200:300"]}]},
}


def apply(lab: Lab, *docs: dict[str, Any], delete: bool = False) -> None:
    with tempfile.NamedTemporaryFile("w", suffix=".yaml") as f:
        yaml.safe_dump_all(list(docs), f)
        f.flush()
        lab.cli("delete" if delete else "apply", "-f", f.name)


def tor_routes(lab: Lab) -> dict[str, list[dict[str, Any]]]:
    data: dict[str, list[dict[str, Any]]] = json.loads(lab.cli("tor", "routes", "-o", "json").stdout)
    return data


def next_hops(lab: Lab, prefix: str) -> set[str]:
    return {p["nextHop"] for p in tor_routes(lab).get(prefix, [])}


def kernel_has(lab: Lab, node: str, prefix: str) -> bool:
    return any(line.split()[:1] == [prefix] for line in lab.ip(node, "route").splitlines())


def felixctl(lab: Lab, *args: str) -> str:
    return lab.cli("exec", "n1", "--", "felixctl", *args).stdout


def test_tor_learns_service_ranges_and_blocks_with_communities(lab: Lab) -> None:
    lab.cli("tor", "up", "--asn", "65000", "--originate", TOR_PREFIX)
    wait_for("every node's session to the ToR", lambda: json.loads(
        lab.cli("tor", "sessions", "-o", "json").stdout) == {N1: "Established", N2: "Established", N3: "Established"},
        timeout=30)
    apply(lab, BGP_CONFIG)
    lab.cli("ns", "add", "shop")
    lab.cli("pod", "add", "shop/web", "--node", "n1", "--serve", "tcp:80")
    lab.cli("pod", "add", "shop/api", "--node", "n3", "--serve", "tcp:80")
    everyone = {N1, N2, N3}
    wait_for("the service ranges from every node", lambda: next_hops(lab, "10.96.0.0/16") == everyone
             and next_hops(lab, "198.18.0.0/24") == everyone, timeout=20)
    block = lab.json("status")["nodes"][0]["blocks"][0]
    wait_for("n1's block", lambda: next_hops(lab, block) == {N1}, timeout=20)
    (path,) = tor_routes(lab)[block]
    assert path["communities"] == ["65000:100"] and path["largeCommunities"] == ["65000:200:300"]
    assert path["asPath"] == "64512"


def test_local_service_is_advertised_where_its_endpoint_is(lab: Lab) -> None:
    lab.cli("service", "add", "shop/web", "--type", "LoadBalancer", "--lb-ip", LB_IP, "--local",
            "--endpoints", "shop/web")
    cluster_ip = lab.json("status")["services"][0]["clusterIP"]
    wait_for("the /32s from n1 only", lambda: next_hops(lab, f"{LB_IP}/32") == {N1}
             and next_hops(lab, f"{cluster_ip}/32") == {N1}, timeout=20)
    # Nodes learn each other's service routes but program none of them (kube-proxy's business).
    for node in ("n2", "n3"):
        assert not kernel_has(lab, node, f"{LB_IP}/32") and not kernel_has(lab, node, "10.96.0.0/16")
    lab.cli("pod", "add", "shop/web2", "--node", "n2", "--serve", "tcp:80")
    lab.cli("service", "endpoints", "shop/web", "shop/web2")
    wait_for("the /32 moves to n2", lambda: next_hops(lab, f"{LB_IP}/32") == {N2}, timeout=20)
    lab.cli("service", "endpoints", "shop/web", "shop/web,shop/web2")
    wait_for("both endpoint nodes", lambda: next_hops(lab, f"{LB_IP}/32") == {N1, N2}, timeout=20)
    lab.cli("pod", "del", "shop/web2")  # the pod goes: so does its endpoint
    wait_for("only n1 again", lambda: next_hops(lab, f"{LB_IP}/32") == {N1}, timeout=20)
    lab.cli("service", "endpoints", "shop/web")  # none left
    wait_for("the /32 withdrawn", lambda: f"{LB_IP}/32" not in tor_routes(lab), timeout=20)
    assert next_hops(lab, "198.18.0.0/24") == {N1, N2, N3}  # the range stays
    lab.cli("service", "endpoints", "shop/web", "shop/web")


def test_bgp_filter_keeps_the_tors_prefix_out_of_every_kernel(lab: Lab) -> None:
    nodes = ("n1", "n2", "n3")
    wait_for("the ToR's prefix in every kernel", lambda: all(kernel_has(lab, n, TOR_PREFIX) for n in nodes),
             timeout=20)
    reject = {"apiVersion": "projectcalico.org/v3", "kind": "BGPFilter", "metadata": {"name": "no-tor-prefix"},
              "spec": {"importV4": [{"action": "Reject", "matchOperator": "In", "cidr": TOR_PREFIX}]}}
    peer = {"apiVersion": "projectcalico.org/v3", "kind": "BGPPeer", "metadata": {"name": "tor"},
            "spec": {"peerIP": "192.0.2.1", "asNumber": 65000, "filters": ["no-tor-prefix"]}}
    apply(lab, reject, peer)
    wait_for("the prefix gone from every kernel", lambda: not any(kernel_has(lab, n, TOR_PREFIX) for n in nodes),
             timeout=20)
    # The sessions stayed up (no reset for a filter change) and the ToR still has our routes.
    assert json.loads(lab.cli("tor", "sessions", "-o", "json").stdout)[N1] == "Established"
    assert next_hops(lab, "10.96.0.0/16") == {N1, N2, N3}
    apply(lab, {**peer, "spec": {"peerIP": "192.0.2.1", "asNumber": 65000}})
    wait_for("the prefix back", lambda: all(kernel_has(lab, n, TOR_PREFIX) for n in nodes), timeout=20)
    apply(lab, reject, delete=True)


def _reflector_nodes(lab: Lab) -> set[str]:
    return {n["name"] for n in lab.json("status")["nodes"] if n["routeReflector"]}


def _all_established(lab: Lab) -> bool:
    return all(s["state"] == "Established" for n in lab.json("status")["nodes"] for s in n["bgp"])


def test_reflector_node_runs_pods_with_calicos_recipe(lab: Lab) -> None:
    # Calico's documented steps, through felixctl (calicoctl's verbs).
    felixctl(lab, "patch", "node", "n1", "-p", '{"spec":{"bgp":{"routeReflectorClusterID":"244.0.0.1"}}}')
    felixctl(lab, "label", "node", "n1", "route-reflector=true")
    apply(lab, {"apiVersion": "projectcalico.org/v3", "kind": "BGPPeer",
                "metadata": {"name": "peer-with-route-reflectors"},
                "spec": {"nodeSelector": "all()", "peerSelector": "route-reflector == 'true'"}})
    felixctl(lab, "patch", "bgpconfiguration", "default", "-p", '{"spec":{"nodeToNodeMeshEnabled":false}}')
    wait_for("n1 a reflector", lambda: _reflector_nodes(lab) == {"n1"}, timeout=20)
    wait_for("every session established", lambda: _all_established(lab), timeout=40)
    status = {n["name"]: {s["peer"] for s in n["bgp"]} for n in lab.json("status")["nodes"]}
    assert status["n1"] == {"192.0.2.1", N2, N3} and status["n2"] == {"192.0.2.1", N1}  # no mesh
    # Pods on every node reach each other: n1's block is announced and the others' are learned.
    lab.cli("pod", "add", "shop/far", "--node", "n2", "--serve", "tcp:80")
    matrix = lab.json("matrix", "--ports", "80", "--protos", "tcp")["results"]["tcp/80"]
    assert all(ok for row in matrix.values() for ok in row.values()), matrix
    far_ip = lab.pod_ip("shop/far")
    assert any(far_ip.rsplit(".", 1)[0] in line for line in lab.ip("n1", "route").splitlines())
    # The ToR peers with n1's BIRD now and still learns everything, services included.
    wait_for("the ToR's view", lambda: N1 in next_hops(lab, f"{LB_IP}/32")
             and next_hops(lab, "10.96.0.0/16") == {N1, N2, N3}, timeout=30)
    # A second reflector of the same cluster: plain iBGP between the two, as in Calico (what BIRD
    # writes on the CLUSTER_LIST across it is the cluster ID: test_bgp_daemons checks the wire).
    felixctl(lab, "patch", "node", "n2", "-p", '{"spec":{"bgp":{"routeReflectorClusterID":"244.0.0.1"}}}')
    felixctl(lab, "label", "node", "n2", "route-reflector=true")
    wait_for("two reflectors", lambda: _reflector_nodes(lab) == {"n1", "n2"}, timeout=20)
    wait_for("every session established", lambda: _all_established(lab), timeout=60)
    bird = open(f"/run/felixpy-lab/{lab.name}/n1/bird/bird.conf").read()
    twin = bird[bird.index(f"neighbor {N2} as"):].split("\n}\n")[0]
    assert "rr client;" not in twin and "rr cluster id" not in twin
    matrix = lab.json("matrix", "--ports", "80", "--protos", "tcp")["results"]["tcp/80"]
    assert all(ok for row in matrix.values() for ok in row.values()), matrix


def test_calico_node_status_reports_sessions_and_routes(lab: Lab) -> None:
    apply(lab, {"apiVersion": "projectcalico.org/v3", "kind": "CalicoNodeStatus", "metadata": {"name": "n3-status"},
                "spec": {"node": "n3", "classes": ["Agent", "BGP", "Routes"], "updatePeriodSeconds": 1}})

    def status() -> dict[str, Any]:
        out = felixctl(lab, "get", "caliconodestatus", "n3-status", "-o", "json")
        data: dict[str, Any] = json.loads(out).get("status") or {}
        return data

    first = wait_for_value("the status", lambda: status().get("bgp"), timeout=20)
    assert first["numberEstablishedV4"] == 3 and first["numberNotEstablishedV4"] == 0
    assert {p["peerIP"] for p in first["peersV4"]} == {"192.0.2.1", N1, N2}
    full = status()
    assert full["agent"]["birdV4"]["state"] == "Ready" and full["agent"]["birdV4"]["routerID"] == N3
    learned = [r for r in full["routes"]["routesV4"] if r["type"] == "FIB"
               and r["learnedFrom"].get("sourceType") == "BGPPeer"]
    assert any(r["gateway"] in (N1, N2) and r["interface"] == "eth0" for r in learned), learned
    stamp = full["lastUpdated"]
    wait_for("a refresh one period later", lambda: status()["lastUpdated"] != stamp, timeout=10)


def wait_for_value(what: str, get: Any, timeout: float) -> Any:
    found: list[Any] = []

    def check() -> bool:
        value = get()
        if value:
            found.append(value)
        return bool(value)

    wait_for(what, check, timeout)
    return found[-1]


def test_teardown_stops_the_tor(lab: Lab) -> None:
    lab.cli("tor", "down")
    assert "tor" not in lab.json("status")
