"""felixctl against a real etcd: Kubernetes NetworkPolicy YAML stored as knp.default.<name>, bad
policies rejected with nothing written, and `policy explain` over WorkloadEndpoints we write."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from felixpy.datastore import keys
from felixpy.model.store import apply_resources, read_resource

pytestmark = pytest.mark.etcd

FELIXCTL = str(Path(sys.executable).parent / "felixctl")


def felixctl(endpoint: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ETCD_", "CALICO_", "DATASTORE_"))}
    env.update(ETCD_ENDPOINTS=endpoint, DATASTORE_TYPE="etcdv3")
    return subprocess.run([FELIXCTL, *args], env=env, capture_output=True, text=True, timeout=60)


def write(tmp_path: Path, name: str, docs: list[dict[str, Any]]) -> str:
    path = tmp_path / name
    path.write_text(yaml.safe_dump_all(docs))
    return str(path)


def knp(name: str, ns: str, spec: dict[str, Any]) -> dict[str, Any]:
    return {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
            "metadata": {"name": name, "namespace": ns}, "spec": spec}


ALLOW_WEB = knp("allow-web", "y", {
    "podSelector": {"matchLabels": {"pod": "b"}},
    "ingress": [{"from": [{"podSelector": {"matchLabels": {"pod": "a"}}}], "ports": [{"port": 80}]}],
})


def namespace_profile(ns: str) -> dict[str, Any]:
    return {"apiVersion": "projectcalico.org/v3", "kind": "Profile", "metadata": {"name": f"kns.{ns}"},
            "spec": {"ingress": [{"action": "Allow"}], "egress": [{"action": "Allow"}],
                     "labelsToApply": {"pcns.projectcalico.org/name": ns, "pcns.kubernetes.io/metadata.name": ns,
                                       "pcns.ns": ns}}}


def wep(ns: str, pod: str, ip: str) -> dict[str, Any]:
    return {"apiVersion": "projectcalico.org/v3", "kind": "WorkloadEndpoint",
            "metadata": {"name": f"node1-k8s-{pod}-eth0", "namespace": ns,
                         "labels": {"pod": pod, "projectcalico.org/namespace": ns,
                                    "projectcalico.org/orchestrator": "k8s"}},
            "spec": {"orchestrator": "k8s", "node": "node1", "pod": pod, "endpoint": "eth0",
                     "interfaceName": f"cali{ns}{pod}0000", "ipNetworks": [f"{ip}/32"], "profiles": [f"kns.{ns}"],
                     "ports": [{"name": "serve-80-tcp", "port": 80, "protocol": "TCP"},
                               {"name": "serve-81-tcp", "port": 81, "protocol": "TCP"}]}}


def test_apply_kubernetes_policy_stores_knp(etcd_endpoint: str, etcd_store: Any, tmp_path: Path) -> None:
    path = write(tmp_path, "knp.yaml", [ALLOW_WEB])
    done = felixctl(etcd_endpoint, "apply", "-f", path)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "Successfully applied 1 'NetworkPolicy' resource(s)"
    stored = read_resource(etcd_store, "NetworkPolicy", "knp.default.allow-web", "y")
    assert stored is not None
    assert stored["spec"]["selector"] == "projectcalico.org/orchestrator == 'k8s' && pod == 'b'"
    assert stored["spec"]["order"] == 1000 and stored["spec"]["types"] == ["Ingress"]
    assert stored["spec"]["ingress"] == [{"action": "Allow", "protocol": "TCP", "source": {
        "selector": "projectcalico.org/orchestrator == 'k8s' && pod == 'a'"}, "destination": {"ports": [80]}}]

    listing = felixctl(etcd_endpoint, "get", "np", "-n", "y", "-o", "wide")
    assert listing.returncode == 0, listing.stderr
    lines = listing.stdout.splitlines()
    assert lines[0].split() == ["NAMESPACE", "NAME", "ORDER", "SELECTOR"]
    assert lines[1].split()[:3] == ["y", "knp.default.allow-web", "1000"]
    assert felixctl(etcd_endpoint, "get", "networkpolicy", "-n", "x").stdout.splitlines()[1:] == []
    # A name after -n still names the resource (argparse alone would reject it).
    one = felixctl(etcd_endpoint, "get", "np", "-n", "y", "knp.default.allow-web", "-o", "json")
    assert one.returncode == 0, one.stderr
    assert json.loads(one.stdout)["metadata"]["name"] == "knp.default.allow-web"

    # Deleting with the Kubernetes document deletes the stored Calico policy.
    done = felixctl(etcd_endpoint, "delete", "-f", path)
    assert done.returncode == 0, done.stderr
    assert read_resource(etcd_store, "NetworkPolicy", "knp.default.allow-web", "y") is None


def test_kubernetes_policy_list_and_namespace_flag(etcd_endpoint: str, etcd_store: Any, tmp_path: Path) -> None:
    listing = {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicyList", "items": [
        {"metadata": {"name": "deny-all"}, "spec": {"podSelector": {}, "policyTypes": ["Ingress", "Egress"]}}]}
    done = felixctl(etcd_endpoint, "apply", "-f", write(tmp_path, "list.yaml", [listing]), "-n", "z")
    assert done.returncode == 0, done.stderr
    stored = read_resource(etcd_store, "NetworkPolicy", "knp.default.deny-all", "z")
    assert stored is not None and stored["spec"]["types"] == ["Ingress", "Egress"]
    assert stored["spec"]["ingress"] == [] and stored["spec"]["egress"] == []


@pytest.mark.parametrize("doc, message", [
    (knp("bad-proto", "y", {"ingress": [{"ports": [{"protocol": "ICMP"}]}]}), 'unsupported protocol "ICMP"'),
    (knp("bad-cidr", "y", {"ingress": [{"from": [{"ipBlock": {"cidr": "10.0.0.0/40"}}]}]}), 'invalid CIDR "10.0.0.0/40"'),
    (knp("bad-port", "y", {"ingress": [{"ports": [{"port": 99999}]}]}), "port 99999 is out of range"),
    ({"apiVersion": "projectcalico.org/v3", "kind": "NetworkPolicy", "metadata": {"name": "sel", "namespace": "y"},
      "spec": {"selector": "app == 'x"}}, "spec.selector: invalid selector"),
    ({"apiVersion": "projectcalico.org/v3", "kind": "GlobalNetworkPolicy", "metadata": {"name": "proto"},
      "spec": {"ingress": [{"action": "Allow", "protocol": "tcpp"}]}}, 'invalid protocol "tcpp"'),
])
def test_bad_policy_is_one_line_and_nothing_applied(etcd_endpoint: str, etcd_store: Any, tmp_path: Path,
                                                     doc: dict[str, Any], message: str) -> None:
    good = knp("good", "y", {"podSelector": {}})
    done = felixctl(etcd_endpoint, "apply", "-f", write(tmp_path, "bad.yaml", [good, doc]))
    assert done.returncode == 1
    assert done.stderr.count("\n") == 1 and done.stderr.startswith("felixctl: error: ")
    assert message in done.stderr
    items, _ = etcd_store.list(keys.ROOT)
    assert [kv.key for kv in items] == []


def _world(etcd_store: Any) -> None:
    docs: list[Any] = [namespace_profile("x"), namespace_profile("y")]
    docs += [wep("x", "a", "10.65.0.1"), wep("y", "a", "10.65.0.2"), wep("y", "b", "10.65.0.3")]
    apply_resources(etcd_store, docs, "apply")
    from felixpy.model.store import parse_documents

    apply_resources(etcd_store, parse_documents(yaml.safe_dump(ALLOW_WEB), "allow-web.yaml"), "apply")


def test_policy_explain_allowed_and_denied(etcd_endpoint: str, etcd_store: Any) -> None:
    _world(etcd_store)
    done = felixctl(etcd_endpoint, "policy", "explain", "y/a", "y/b", "--port", "80")
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [
        "y/a -> y/b tcp/80: ALLOWED",
        "  egress  (y/a): no policy selects y/a; profile kns.y allows",
        '  ingress (y/b): allowed by policy y/knp.default.allow-web rule 0 '
        '(from selector pod == "a" in namespace y, protocol TCP, port 80)',
    ]

    done = felixctl(etcd_endpoint, "policy", "explain", "x/a", "y/b", "--port", "80")
    assert done.returncode == 1
    assert done.stdout.splitlines()[0] == "x/a -> y/b tcp/80: DENIED"
    assert done.stdout.splitlines()[2] == ("  ingress (y/b): end of tier: policy y/knp.default.allow-web "
                                           "selects y/b but no rule allowed tcp/80 from x/a")

    done = felixctl(etcd_endpoint, "policy", "explain", "y/a", "y/b", "--port", "81", "-o", "json")
    assert done.returncode == 1
    data = json.loads(done.stdout)
    assert data["allowed"] is False and data["ingress"]["decided_by"] == "end-of-tier"
    assert data["ingress"]["policies"] == ["y/knp.default.allow-web"]

    # UDP is not opened by a TCP rule; a pod's IP resolves to the pod; a foreign IP is not policed.
    assert felixctl(etcd_endpoint, "policy", "explain", "y/a", "y/b", "--port", "80", "--proto", "udp").returncode == 1
    by_ip = felixctl(etcd_endpoint, "policy", "explain", "10.65.0.2", "y/b", "--port", "80")
    assert by_ip.returncode == 0 and by_ip.stdout.startswith("y/a -> y/b tcp/80: ALLOWED")
    foreign = felixctl(etcd_endpoint, "policy", "explain", "y/b", "192.0.2.9", "--port", "443")
    assert foreign.returncode == 0
    assert foreign.stdout.splitlines()[2] == "  ingress (192.0.2.9): not a workload or host endpoint: not policed here"


def test_policy_explain_answers_per_family_for_dual_stack_pods(etcd_endpoint: str, etcd_store: Any,
                                                               tmp_path: Path) -> None:
    """A pod named by its IPv6 address is explained over IPv6: an IPv4 ipBlock does not match
    it, an IPv6 one does (as ip6tables decides)."""
    docs: list[Any] = [namespace_profile("d")]
    for pod, n in (("a", 1), ("b", 2)):
        doc = wep("d", pod, f"10.66.0.{n}")
        doc["spec"]["ipNetworks"].append(f"fd00:66::{n}/128")
        docs.append(doc)
    apply_resources(etcd_store, docs, "apply")
    only_v4 = knp("from-a-v4", "d", {"podSelector": {"matchLabels": {"pod": "b"}},
                                      "ingress": [{"from": [{"ipBlock": {"cidr": "10.66.0.1/32"}}]}]})
    assert felixctl(etcd_endpoint, "apply", "-f", write(tmp_path, "v4.yaml", [only_v4])).returncode == 0
    assert felixctl(etcd_endpoint, "policy", "explain", "10.66.0.1", "10.66.0.2", "--port", "80").returncode == 0
    v6 = felixctl(etcd_endpoint, "policy", "explain", "fd00:66::1", "fd00:66::2", "--port", "80")
    assert v6.returncode == 1 and v6.stdout.startswith("d/a -> d/b tcp/80: DENIED"), v6.stdout
    only_v4["spec"]["ingress"][0]["from"].append({"ipBlock": {"cidr": "fd00:66::1/128"}})
    assert felixctl(etcd_endpoint, "apply", "-f", write(tmp_path, "dual.yaml", [only_v4])).returncode == 0
    v6 = felixctl(etcd_endpoint, "policy", "explain", "fd00:66::1", "d/b", "--port", "80")
    assert v6.returncode == 0 and "net fd00:66::1/128" in v6.stdout, v6.stdout


def test_policy_explain_unknown_pod(etcd_endpoint: str, etcd_store: Any) -> None:
    _world(etcd_store)
    done = felixctl(etcd_endpoint, "policy", "explain", "x/nope", "y/b", "--port", "80")
    assert done.returncode == 1 and done.stdout == ""
    assert done.stderr == ('felixctl: error: pod "x/nope" not found: no WorkloadEndpoint for pod "nope" '
                           'in namespace "x"\n')
    done = felixctl(etcd_endpoint, "policy", "explain", "garbage", "y/b", "--port", "80")
    assert done.returncode == 1 and "expected NAMESPACE/POD, hostendpoint/NAME or an IP address" in done.stderr


def calico_doc(kind: str, name: str, spec: dict[str, Any], **meta: Any) -> dict[str, Any]:
    return {"apiVersion": "projectcalico.org/v3", "kind": kind, "metadata": {"name": name, **meta}, "spec": spec}


def test_tiers_host_endpoints_network_sets_and_service_accounts(etcd_endpoint: str, etcd_store: Any,
                                                                  tmp_path: Path) -> None:
    web = wep("y", "b", "10.9.0.2")
    web["spec"]["serviceAccountName"] = "web"
    docs = [
        namespace_profile("y"), wep("y", "a", "10.9.0.1"), web,
        calico_doc("Profile", "ksa.y.web", {"labelsToApply": {"pcsa.projectcalico.org/name": "web",
                                                              "pcsa.role": "frontend"}}),
        calico_doc("GlobalNetworkSet", "partners", {"nets": ["198.51.100.0/24"]}, labels={"kind": "partner"}),
        calico_doc("HostEndpoint", "node1-eth0", {"node": "node1", "interfaceName": "eth0",
                                                  "expectedIPs": ["192.0.2.11"]}, labels={"role": "node"}),
    ]
    # A policy in a tier that does not exist is refused, and nothing is written.
    tiered = calico_doc("GlobalNetworkPolicy", "partners-only", {
        "tier": "security", "order": 1, "serviceAccountSelector": "role == 'frontend'",
        "ingress": [{"action": "Pass", "source": {"selector": "kind == 'partner'"}}, {"action": "Deny"}]})
    refused = felixctl(etcd_endpoint, "apply", "-f", write(tmp_path, "refused.yaml", [*docs, tiered]))
    assert refused.returncode != 0
    assert refused.stderr.strip().endswith('spec.tier: tier "security" does not exist (create the Tier first)')
    assert read_resource(etcd_store, "HostEndpoint", "node1-eth0") is None
    pre_dnat = calico_doc("GlobalNetworkPolicy", "no-node-port", {
        "selector": "role == 'node'", "preDNAT": True, "applyOnForward": True,
        "ingress": [{"action": "Deny", "protocol": "TCP", "destination": {"ports": [30080]}}]})
    security = calico_doc("Tier", "security", {"order": 100})
    done = felixctl(etcd_endpoint, "apply", "-f", write(tmp_path, "all.yaml", [*docs, security, tiered, pre_dnat]))
    assert done.returncode == 0, done.stderr

    # A partner address (in the GlobalNetworkSet) passes the security tier; the namespace profile allows.
    ok = felixctl(etcd_endpoint, "policy", "explain", "198.51.100.7", "y/b", "--port", "80")
    assert ok.returncode == 0, ok.stdout + ok.stderr
    passed = ('policy partners-only in tier security rule 0 passed '
              '(from selector kind == "partner" (network set partners)')
    assert passed in ok.stdout
    denied = felixctl(etcd_endpoint, "policy", "explain", "y/a", "y/b", "--port", "80", "-o", "json")
    assert denied.returncode == 1
    verdict = json.loads(denied.stdout)
    assert (verdict["ingress"]["policy_id"], verdict["ingress"]["tier"]) == ("partners-only", "security")
    # y/a runs as no service account: the policy does not select it.
    assert felixctl(etcd_endpoint, "policy", "explain", "y/b", "y/a", "--port", "80").returncode == 0

    # Host endpoints: the preDNAT policy, the failsafe ports and the default deny.
    blocked = felixctl(etcd_endpoint, "policy", "explain", "203.0.113.9", "hostendpoint/node1-eth0", "--port", "30080")
    assert blocked.returncode == 1 and "denied by preDNAT policy no-node-port rule 0" in blocked.stdout
    ssh = felixctl(etcd_endpoint, "policy", "explain", "203.0.113.9", "192.0.2.11", "--port", "22")
    assert ssh.returncode == 0 and "failsafe inbound tcp/22" in ssh.stdout
    other = felixctl(etcd_endpoint, "policy", "explain", "203.0.113.9", "192.0.2.11", "--port", "8080")
    assert other.returncode == 1 and "no policy selects node1-eth0; no profile allows" in other.stdout
    forwarded = felixctl(etcd_endpoint, "policy", "explain", "203.0.113.9", "y/a", "--port", "80",
                         "--via", "hostendpoint/node1-eth0")
    assert forwarded.returncode == 0 and "forwarded traffic is allowed" in forwarded.stdout
    # Deleting a tier that still has a policy in it is refused.
    still = felixctl(etcd_endpoint, "delete", "tier", "security")
    assert still.returncode != 0 and "GlobalNetworkPolicy \"partners-only\" is in it" in still.stderr
