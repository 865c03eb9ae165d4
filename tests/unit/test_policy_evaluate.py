"""The reference evaluator against the Kubernetes semantics table (tests/policy_cases.py), plus
Calico-only behaviour (order, Deny, Pass, Log, notSelector, notNets, profiles) and the reasons
explain gives."""

from __future__ import annotations

import json
from dataclasses import replace
from typing import Any

import pytest

from felixpy.model.resources import validate
from policy.calico import (
    endpoint_from_resources,
    host_endpoint_from_resource,
    network_set_from_resource,
    policy_from_resource,
    profile_from_resource,
)
from policy.evaluate import applies, explain, match_endpoint, policies_for, tiered
from policy.k8s import convert_k8s_networkpolicy
from policy.model import Endpoint, EndpointMatch, HostEndpoint, Policy, Profile, Rule, Tier
from tests import policy_cases as pc

# A fixed address per pod: x/a = 10.1.0.1 ... z/c = 10.3.0.3 (all inside one /4, like a pool).
IPS = {f"{ns}/{pod}": f"10.{i + 1}.0.{j + 1}" for i, ns in enumerate(pc.NAMESPACES) for j, pod in enumerate(pc.PODS)}
# And dual-stack: x/a = fd00:10:1::1 ... (all inside one /4 too), as the e2e lab's pods are.
IPS6 = {f"{ns}/{pod}": f"fd00:10:{i + 1}::{j + 1}" for i, ns in enumerate(pc.NAMESPACES) for j, pod in enumerate(pc.PODS)}


def profile_res(ns: str, labels: dict[str, str]) -> dict[str, Any]:
    to_apply = {"pcns.projectcalico.org/name": ns, **{f"pcns.{k}": v for k, v in labels.items()}}
    return {"kind": "Profile", "metadata": {"name": f"kns.{ns}"},
            "spec": {"ingress": [{"action": "Allow"}], "egress": [{"action": "Allow"}], "labelsToApply": to_apply}}


def wep_res(pod_id: str, labels: dict[str, str]) -> dict[str, Any]:
    ns, pod = pod_id.split("/")
    ports = [{"name": pc.port_name(port, proto), "port": port, "protocol": proto.upper()} for port, proto in pc.SERVED]
    return {"kind": "WorkloadEndpoint", "metadata": {
        "name": f"node1-k8s-{pod}-eth0", "namespace": ns,
        "labels": {**labels, "projectcalico.org/namespace": ns, "projectcalico.org/orchestrator": "k8s"}},
        "spec": {"orchestrator": "k8s", "pod": pod, "ipNetworks": [f"{IPS[pod_id]}/32", f"{IPS6[pod_id]}/128"],
                 "profiles": [f"kns.{ns}"], "ports": ports, "interfaceName": f"cali{ns}{pod}"}}


def world(step: pc.Step) -> tuple[dict[str, Endpoint], list[Policy], list[Profile]]:
    """The step's state as the agent sees it: every resource through the same conversions."""
    profiles = {ns: profile_res(ns, step.labels_of_namespace(ns)) for ns in pc.NAMESPACES}
    from policy.calico import namespace_labels_from_profile

    endpoints = {
        pod_id: endpoint_from_resources(wep_res(pod_id, step.labels_of_pod(pod_id)),
                                        namespace_labels_from_profile(profiles[pod_id.split("/")[0]]))
        for pod_id in pc.ALL_PODS
    }
    policies = []
    for k8s in step.policies:
        calico = convert_k8s_networkpolicy(pc.resolve(k8s, IPS, IPS6))
        policies.append(policy_from_resource(validate(calico)))  # what apply would store
    return endpoints, policies, [profile_from_resource(p) for p in profiles.values()]


def _case_ids() -> list[str]:
    return [c.name for c in pc.CASES]


@pytest.mark.parametrize("name", _case_ids())
def test_kubernetes_semantics_table(name: str) -> None:
    case = pc.by_name(name)
    for index, step in enumerate(case.steps):
        endpoints, policies, profiles = world(step)
        wrong = []
        for exp in step.expect:
            for family in (4, 6):
                if exp.family not in (None, family):
                    continue
                for src in pc.ALL_PODS:
                    for dst in pc.ALL_PODS:
                        if src == dst:
                            continue
                        verdict = explain(endpoints[src], endpoints[dst], exp.port, exp.protocol,
                                          policies=policies, profiles=profiles, ip_version=family)
                        if verdict.allowed != exp.is_allowed(src, dst):
                            wrong.append(f"step {index} IPv{family} {exp.protocol}/{exp.port} {src}->{dst}: "
                                         f"got {verdict.allowed}, want {exp.is_allowed(src, dst)}")
        assert not wrong, "\n".join(wrong[:20])


def test_table_covers_the_semantics_list() -> None:
    names = " ".join(_case_ids())
    for topic in ("default-deny-ingress", "default-deny-egress", "allow-all", "pod-selector", "namespace-selector",
                  "is-and", "is-or", "match-expressions", "ip-block-except", "named-port", "end-port",
                  "egress-and-ingress-both", "union", "policy-update", "policy-delete", "pod-label",
                  "namespace-label", "udp-only", "sctp", "policytypes-absent", "empty-ingress-list"):
        assert topic in names, topic
    assert len(pc.CASES) >= 40


def test_resolve_fills_in_addresses() -> None:
    obj = {"cidr": "$NET(x/b,4)", "except": ["$IP(x/b)/32"], "n": 3}
    assert pc.resolve(obj, IPS) == {"cidr": "0.0.0.0/4", "except": ["10.1.0.2/32"], "n": 3}


def test_resolve_gives_pod_ip_blocks_an_ipv6_twin_and_ip4_none() -> None:
    peers = [{"ipBlock": {"cidr": "$NET(x/b,4)", "except": ["$IP(x/b)/32"]}}, {"podSelector": {}},
             {"ipBlock": {"cidr": "$IP4(x/b)/32"}}, {"ipBlock": {"cidr": "192.0.2.0/24"}}]
    assert pc.resolve(peers, IPS, IPS6) == [
        {"ipBlock": {"cidr": "0.0.0.0/4", "except": ["10.1.0.2/32"]}},
        {"ipBlock": {"cidr": "f000::/4", "except": ["fd00:10:1::2/128"]}},
        {"podSelector": {}}, {"ipBlock": {"cidr": "10.1.0.2/32"}}, {"ipBlock": {"cidr": "192.0.2.0/24"}}]


# -- reasons --------------------------------------------------------------------------------------


def _explain(step: pc.Step, src: str, dst: str, port: int = 80, proto: str = "tcp") -> Any:
    endpoints, policies, profiles = world(step)
    return explain(endpoints[src], endpoints[dst], port, proto, policies=policies, profiles=profiles)


def test_reason_for_policy_allow() -> None:
    step = pc.Step((pc.np("allow-web", "y", {"podSelector": pc.pods(pod="b"), "ingress": [
        {"from": [{"podSelector": pc.pods(pod="a")}], "ports": [{"port": 80}]}]}),), ())
    v = _explain(step, "y/a", "y/b")
    assert v.allowed
    assert v.egress is not None and v.egress.decided_by == "profile" and v.egress.profile == "kns.y"
    assert v.egress.reason == "no policy selects y/a; profile kns.y allows"
    assert v.ingress is not None
    assert (v.ingress.decided_by, v.ingress.policy_id, v.ingress.rule_index, v.ingress.action) == (
        "policy", "y/knp.default.allow-web", 0, "Allow")
    assert v.ingress.reason == ('allowed by policy y/knp.default.allow-web rule 0 '
                                '(from selector pod == "a" in namespace y, protocol TCP, port 80)')
    assert v.ingress.policies == ("y/knp.default.allow-web",)


def test_reason_for_end_of_tier() -> None:
    step = pc.Step((pc.deny_all_ingress("y"),), ())
    v = _explain(step, "x/a", "y/b")
    assert not v.allowed
    assert v.ingress is not None and v.ingress.decided_by == "end-of-tier"
    assert v.ingress.policy_id == "y/knp.default.deny-all-ingress"
    assert v.ingress.reason == ("end of tier: policy y/knp.default.deny-all-ingress selects y/b "
                                "but no rule allowed tcp/80 from x/a")


def test_reason_names_named_port_and_namespace_selector() -> None:
    step = pc.Step((pc.np("named", "x", {"podSelector": pc.ANY, "ingress": [
        {"from": [{"namespaceSelector": pc.pods(ns="y")}], "ports": [{"port": "serve-81-tcp"}]}]}),), ())
    v = _explain(step, "y/c", "x/a", 81)
    assert v.allowed and v.ingress is not None
    assert v.ingress.reason.endswith('(from pods in namespaces ns == "y", protocol TCP, port serve-81-tcp (=81))')


def test_reason_for_ip_block() -> None:
    step = pc.Step((pc.np("block", "x", {"podSelector": pc.ANY, "ingress": [
        {"from": [{"ipBlock": {"cidr": "10.0.0.0/8", "except": ["10.3.0.0/16"]}}]}]}),), ())
    v = _explain(step, "y/c", "x/a")
    assert v.ingress is not None and "from net 10.0.0.0/8 except 10.3.0.0/16" in v.ingress.reason
    assert not _explain(step, "z/c", "x/a").allowed


def test_verdict_serialises_to_json() -> None:
    v = _explain(pc.Step((), ()), "x/a", "y/b")
    data = json.loads(json.dumps(v.to_dict()))
    assert data["allowed"] is True
    assert data["ingress"]["decided_by"] == "profile" and data["egress"]["direction"] == "Egress"
    assert (data["src"], data["dst"], data["port"], data["protocol"]) == ("x/a", "y/b", 80, "tcp")


# -- Calico semantics -----------------------------------------------------------------------------


def ep(ns: str, name: str, ip: str, ns_labels: dict[str, str] | None = None, **labels: str) -> Endpoint:
    return Endpoint(ns, name, tuple(sorted({**labels, "projectcalico.org/namespace": ns}.items())),
                    tuple(sorted((ns_labels or {"name": ns}).items())), (ip,), (), (f"kns.{ns}",))


ALLOW_ALL = [Profile("kns.x", ingress=(Rule("Allow"),), egress=(Rule("Allow"),)),
             Profile("kns.y", ingress=(Rule("Allow"),), egress=(Rule("Allow"),))]
A = ep("x", "a", "10.0.0.1", role="client")
B = ep("x", "b", "10.0.0.2", role="server")


def calico(kind: str, name: str, spec: dict[str, Any], ns: str | None = "x") -> Policy:
    meta: dict[str, Any] = {"name": name}
    if kind == "NetworkPolicy":
        meta["namespace"] = ns
    return policy_from_resource(validate({"kind": kind, "metadata": meta, "spec": spec}))


def test_order_then_first_matching_rule_decides() -> None:
    deny = calico("NetworkPolicy", "deny", {"order": 10, "ingress": [
        {"action": "Deny", "source": {"selector": "role == 'client'"}}]})
    allow = calico("NetworkPolicy", "allow", {"order": 20, "ingress": [{"action": "Allow"}]})
    v = explain(A, B, 80, "tcp", policies=[allow, deny], profiles=ALLOW_ALL)
    assert not v.allowed and v.ingress is not None
    assert (v.ingress.policy_id, v.ingress.action) == ("x/deny", "Deny")
    assert v.ingress.policies == ("x/deny", "x/allow")
    unordered = calico("NetworkPolicy", "unordered", {"ingress": [{"action": "Deny"}]})
    assert [p.id for p in policies_for(B, "Ingress", [unordered, allow, deny])] == ["x/deny", "x/allow", "x/unordered"]


def test_pass_skips_to_profiles_and_log_carries_on() -> None:
    passing = calico("NetworkPolicy", "pass", {"order": 1, "ingress": [{"action": "Log"}, {"action": "Pass"}]})
    deny = calico("NetworkPolicy", "deny", {"order": 2, "ingress": [{"action": "Deny"}]})
    v = explain(A, B, 80, "tcp", policies=[passing, deny], profiles=ALLOW_ALL)
    assert v.allowed and v.ingress is not None and v.ingress.decided_by == "profile"
    assert v.ingress.reason.startswith("policy x/pass rule 1 passed")
    v = explain(A, B, 80, "tcp", policies=[passing, deny], profiles=[])
    assert not v.allowed and v.ingress is not None and v.ingress.decided_by == "no-profile"


def test_not_selector_not_nets_not_ports_and_protocol_numbers() -> None:
    pol = calico("NetworkPolicy", "p", {"ingress": [
        {"action": "Allow", "protocol": 6, "source": {"notSelector": "role == 'client'"}},
        {"action": "Allow", "protocol": "UDP", "source": {"notNets": ["10.0.0.0/31"]}, "destination": {"notPorts": [53]}},
    ]})
    c = ep("x", "c", "10.0.0.3", role="other")
    assert not explain(A, B, 80, "tcp", policies=[pol], profiles=ALLOW_ALL).allowed
    assert explain(c, B, 80, "tcp", policies=[pol], profiles=ALLOW_ALL).allowed
    assert explain(c, B, 80, "udp", policies=[pol], profiles=ALLOW_ALL).allowed
    assert not explain(c, B, 53, "udp", policies=[pol], profiles=ALLOW_ALL).allowed
    assert not explain(A, B, 80, "udp", policies=[pol], profiles=ALLOW_ALL).allowed  # 10.0.0.1 in notNets
    # notSelector in a namespaced policy is scoped to the policy's namespace, like a selector.
    other_ns = ep("y", "c", "10.0.1.3", role="other")
    assert not explain(other_ns, B, 80, "tcp", policies=[pol], profiles=ALLOW_ALL).allowed


def test_plain_ip_peer_matches_only_rules_without_selectors() -> None:
    pol = calico("NetworkPolicy", "p", {"ingress": [
        {"action": "Allow", "source": {"selector": "all()"}},
        {"action": "Allow", "protocol": "TCP", "source": {"nets": ["192.0.2.0/24"]}},
    ]})
    assert explain("192.0.2.7", B, 80, "tcp", policies=[pol], profiles=ALLOW_ALL).allowed
    v = explain("198.51.100.7", B, 80, "tcp", policies=[pol], profiles=ALLOW_ALL)
    assert not v.allowed and v.egress is None and v.ingress is not None
    assert explain(A, "198.51.100.7", 80, "tcp", policies=[pol], profiles=ALLOW_ALL).ingress is None


def test_global_policy_namespace_selector_and_icmp() -> None:
    gnp = calico("GlobalNetworkPolicy", "g", {"namespaceSelector": "name == 'x'", "selector": "role == 'server'",
                                               "ingress": [{"action": "Allow", "protocol": "ICMP",
                                                            "icmp": {"type": 8}}]}, ns=None)
    assert applies(gnp, B) and not applies(gnp, A)
    assert not applies(gnp, ep("y", "b", "10.0.1.2", role="server"))
    assert explain(A, B, 0, "icmp", policies=[gnp], profiles=ALLOW_ALL).allowed
    assert not explain(A, B, 0, "icmp", policies=[gnp], profiles=ALLOW_ALL, icmp_type=0).allowed
    assert not explain(A, B, 80, "tcp", policies=[gnp], profiles=ALLOW_ALL).allowed


def test_match_endpoint_scoping_and_inherited_namespace_labels() -> None:
    b = ep("x", "b", "10.0.0.2", {"team": "blue"}, role="server")
    assert match_endpoint(EndpointMatch("role == 'server'", None, "x"), b)
    assert not match_endpoint(EndpointMatch("role == 'server'", None, "y"), b)
    assert match_endpoint(EndpointMatch("all()", "team == 'blue'", None), b)
    assert not match_endpoint(EndpointMatch("all()", "team == 'red'", None), b)
    # Calico's profile labelsToApply: namespace labels are visible to selectors as pcns.*.
    assert match_endpoint(EndpointMatch("pcns.team == 'blue'"), b)
    assert not match_endpoint(EndpointMatch("team == 'blue'"), b)


def test_endpoint_from_resources() -> None:
    wep = wep_res("y/c", {"pod": "c"})
    got = endpoint_from_resources(wep, {"ns": "y", "kubernetes.io/metadata.name": "y"})
    assert got.id == "y/c" and got.ips == ("10.2.0.3", "fd00:10:2::3") and got.profiles == ("kns.y",)
    assert dict(got.labels)["projectcalico.org/orchestrator"] == "k8s"
    assert [(p.name, p.protocol, p.port) for p in got.ports][:2] == [("serve-80-tcp", "TCP", 80),
                                                                     ("serve-81-tcp", "TCP", 81)]
    assert dict(got.namespace_labels) == {"ns": "y", "kubernetes.io/metadata.name": "y"}


# -- tiers ------------------------------------------------------------------------------------------

SECURITY = Tier("security", 100.0)


def test_tiers_run_in_order_and_pass_goes_to_the_next_tier() -> None:
    deny = calico("GlobalNetworkPolicy", "sec-deny", {"tier": "security", "selector": "role == 'server'",
                                                      "ingress": [{"action": "Deny"}]}, ns=None)
    allow = calico("NetworkPolicy", "allow", {"ingress": [{"action": "Allow"}]})
    v = explain(A, B, 80, "tcp", policies=[allow, deny], profiles=ALLOW_ALL, tiers=[SECURITY])
    assert not v.allowed and v.ingress is not None
    assert (v.ingress.policy_id, v.ingress.tier) == ("sec-deny", "security")
    assert v.ingress.reason.startswith("denied by policy sec-deny in tier security rule 0")
    passing = calico("GlobalNetworkPolicy", "sec-deny", {"tier": "security", "selector": "role == 'server'",
                                                         "ingress": [{"action": "Pass", "source": {
                                                             "selector": "role == 'client'"}}]}, ns=None)
    v = explain(A, B, 80, "tcp", policies=[allow, passing], profiles=ALLOW_ALL, tiers=[SECURITY])
    assert v.allowed and v.ingress is not None and v.ingress.tier == "default"
    assert v.ingress.reason.startswith("policy sec-deny in tier security rule 0 passed")
    # Nothing in the security tier matches C: its end of tier drops, the default tier never runs.
    c = ep("x", "c", "10.0.0.3", role="other")
    v = explain(c, B, 80, "tcp", policies=[allow, passing], profiles=ALLOW_ALL, tiers=[SECURITY])
    assert not v.allowed and v.ingress is not None and v.ingress.decided_by == "end-of-tier"
    assert v.ingress.reason.startswith("end of tier security: policy sec-deny selects x/b")
    # With defaultAction Pass the next tier decides.
    v = explain(c, B, 80, "tcp", policies=[allow, passing], profiles=ALLOW_ALL,
                tiers=[Tier("security", 100.0, "Pass")])
    assert v.allowed and v.ingress is not None and v.ingress.policy_id == "x/allow"
    # A tier without a Tier resource runs after every existing one, with the Deny default.
    v = explain(c, B, 80, "tcp", policies=[allow, passing], profiles=ALLOW_ALL, tiers=[])
    assert v.allowed and v.ingress is not None and v.ingress.policy_id == "x/allow"


def test_tiered_orders_tiers_like_felix() -> None:
    policies = [calico("GlobalNetworkPolicy", n, {"tier": t}, ns=None)
                for n, t in (("p1", "zeta"), ("p2", "default"), ("p3", "alpha"), ("p4", "missing"))]
    tiers = {"zeta": Tier("zeta", 10.0), "alpha": Tier("alpha", 1_000_000.0)}
    assert [t.name for t, _ in tiered(policies, tiers)] == ["zeta", "alpha", "default", "missing"]


# -- policy kinds, service accounts, network sets ---------------------------------------------------


def test_pre_dnat_and_do_not_track_policies_never_police_pods() -> None:
    for flags in ({"preDNAT": True, "applyOnForward": True}, {"doNotTrack": True, "applyOnForward": True}):
        pol = calico("GlobalNetworkPolicy", "host-only", {**flags, "ingress": [{"action": "Deny"}]}, ns=None)
        v = explain(A, B, 80, "tcp", policies=[pol], profiles=ALLOW_ALL)
        assert v.allowed and v.ingress is not None and v.ingress.decided_by == "profile"
    forward = calico("GlobalNetworkPolicy", "fwd", {"applyOnForward": True, "ingress": [{"action": "Deny"}]}, ns=None)
    assert not explain(A, B, 80, "tcp", policies=[forward], profiles=ALLOW_ALL).allowed


def test_service_account_selectors() -> None:
    web = replace(B, labels=B.labels + (("projectcalico.org/serviceaccount", "web"),), sa_labels=(("tier", "fe"),))
    client = replace(A, labels=A.labels + (("projectcalico.org/serviceaccount", "api"),))
    pol = calico("NetworkPolicy", "by-sa", {"serviceAccountSelector": "tier == 'fe'", "ingress": [
        {"action": "Allow", "source": {"serviceAccounts": {"names": ["api"]}}}]})
    assert applies(pol, web) and not applies(pol, B)
    assert explain(client, web, 80, "tcp", policies=[pol], profiles=ALLOW_ALL).allowed
    assert not explain(A, web, 80, "tcp", policies=[pol], profiles=ALLOW_ALL).allowed


def test_network_sets_and_host_endpoint_addresses_match_selectors_by_address() -> None:
    ext = network_set_from_resource({"kind": "GlobalNetworkSet", "metadata": {"name": "ext", "labels": {"role": "ext"}},
                                     "spec": {"nets": ["198.51.100.0/24"]}}, {})
    pol = calico("GlobalNetworkPolicy", "from-ext", {"selector": "role == 'server'", "ingress": [
        {"action": "Allow", "source": {"selector": "role == 'ext'"}}]}, ns=None)
    assert not explain("198.51.100.7", B, 80, "tcp", policies=[pol], profiles=ALLOW_ALL).allowed
    v = explain("198.51.100.7", B, 80, "tcp", policies=[pol], profiles=ALLOW_ALL, others=[ext])
    assert v.allowed and v.ingress is not None and "(network set ext)" in v.ingress.reason
    assert not explain("203.0.113.7", B, 80, "tcp", policies=[pol], profiles=ALLOW_ALL, others=[ext]).allowed
    # A namespaced policy's selector only selects network sets of its own namespace: not the
    # global one, not another namespace's.
    scoped = calico("NetworkPolicy", "from-ext", {"ingress": [{"action": "Allow", "source": {
        "selector": "role == 'ext'"}}]}, ns="x")
    namespaced = network_set_from_resource({"kind": "NetworkSet", "metadata": {
        "name": "ext", "namespace": "y", "labels": {"role": "ext"}}, "spec": {"nets": ["198.51.100.0/24"]}}, {})
    for other in (ext, namespaced):
        assert not explain("198.51.100.7", B, 80, "tcp", policies=[scoped], profiles=ALLOW_ALL, others=[other]).allowed
    mine = replace(namespaced, namespace="x", labels=(("projectcalico.org/namespace", "x"), ("role", "ext")))
    assert explain("198.51.100.7", B, 80, "tcp", policies=[scoped], profiles=ALLOW_ALL, others=[mine]).allowed


# -- host endpoints ---------------------------------------------------------------------------------


def host(iface: str = "eth0", labels: dict[str, str] | None = None, node: str = "n1") -> HostEndpoint:
    return host_endpoint_from_resource({"kind": "HostEndpoint", "metadata": {"name": f"{node}-{iface}",
                                                                            "labels": labels or {"role": "node"}},
                                        "spec": {"node": node, "interfaceName": iface,
                                                 "expectedIPs": ["192.0.2.11"]}})


def test_host_endpoint_ingress_default_deny_failsafe_and_stages() -> None:
    hep = host()
    v = explain("192.0.2.99", hep, 8080, "tcp", policies=[], profiles=ALLOW_ALL)
    assert not v.allowed and v.ingress is not None and v.ingress.decided_by == "no-profile"
    assert v.dst == "hostendpoint/n1-eth0"
    v = explain("192.0.2.99", hep, 22, "tcp", policies=[], profiles=ALLOW_ALL)
    assert v.allowed and v.ingress is not None and v.ingress.decided_by == "failsafe"
    pre = calico("GlobalNetworkPolicy", "pre", {"selector": "role == 'node'", "preDNAT": True, "applyOnForward": True,
                                                "ingress": [{"action": "Deny", "protocol": "TCP",
                                                             "destination": {"ports": [30080]}}]}, ns=None)
    allow = calico("GlobalNetworkPolicy", "allow", {"selector": "role == 'node'", "ingress": [{"action": "Allow"}]},
                   ns=None)
    v = explain("192.0.2.99", hep, 30080, "tcp", policies=[pre, allow], profiles=ALLOW_ALL)
    assert not v.allowed and v.ingress is not None and v.ingress.stage == "pre-dnat"
    assert v.ingress.reason.startswith("denied by preDNAT policy pre rule 0")
    v = explain("192.0.2.99", hep, 8080, "tcp", policies=[pre, allow], profiles=ALLOW_ALL)
    assert v.allowed and v.ingress is not None and v.ingress.stage == "normal" and v.ingress.policy_id == "allow"
    untracked = calico("GlobalNetworkPolicy", "dnt", {"selector": "role == 'node'", "doNotTrack": True,
                                                      "applyOnForward": True, "ingress": [{"action": "Allow"}]}, ns=None)
    v = explain("192.0.2.99", hep, 30080, "tcp", policies=[pre, untracked], profiles=ALLOW_ALL)
    assert v.allowed and v.ingress is not None and v.ingress.stage == "untracked"  # raw runs before mangle
    # A `*` host endpoint never gets doNotTrack policy (Felix ignores it there).
    v = explain("192.0.2.99", host("*"), 30080, "tcp", policies=[pre, untracked], profiles=ALLOW_ALL)
    assert not v.allowed and v.ingress is not None and v.ingress.stage == "pre-dnat"


def test_host_endpoint_egress_forward_and_local_paths() -> None:
    hep = host()
    allow_out = calico("GlobalNetworkPolicy", "out", {"selector": "role == 'node'", "egress": [
        {"action": "Allow", "protocol": "TCP", "destination": {"ports": [443]}}]}, ns=None)
    assert explain(hep, "203.0.113.5", 443, "tcp", policies=[allow_out], profiles=ALLOW_ALL).allowed
    v = explain(hep, "203.0.113.5", 80, "tcp", policies=[allow_out], profiles=ALLOW_ALL)
    assert not v.allowed and v.egress is not None and v.egress.decided_by == "end-of-tier"
    assert explain(hep, "203.0.113.5", 53, "udp", policies=[allow_out], profiles=ALLOW_ALL).allowed  # failsafe
    # Forwarded in through the host endpoint: allowed without applyOnForward policy...
    pod = replace(B, node="n1")
    v = explain("198.51.100.9", pod, 80, "tcp", policies=[], profiles=ALLOW_ALL, via=hep)
    assert v.allowed and v.forward is not None and v.forward.decided_by == "forward-default"
    # ...and decided by it once there is one (normal policy does not apply to forwarded traffic).
    fwd = calico("GlobalNetworkPolicy", "fwd", {"selector": "role == 'node'", "applyOnForward": True,
                                                "ingress": [{"action": "Deny"}]}, ns=None)
    v = explain("198.51.100.9", pod, 80, "tcp", policies=[fwd], profiles=ALLOW_ALL, via=hep)
    assert not v.allowed and v.forward is not None and v.forward.stage == "forward"
    # A pod talking to its own host: no host endpoint policy (cali-INPUT sends it to wl-to-host).
    v = explain(pod, hep, 8080, "tcp", policies=[], profiles=ALLOW_ALL)
    assert v.allowed and v.ingress is not None and v.ingress.decided_by == "not-policed"
    v = explain(hep, pod, 80, "tcp", policies=[], profiles=ALLOW_ALL)
    assert v.allowed and v.egress is not None and v.egress.decided_by == "not-policed"
