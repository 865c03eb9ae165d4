"""Calico v3 NetworkPolicy / GlobalNetworkPolicy / Profile / WorkloadEndpoint → policy model."""

from __future__ import annotations

from typing import Any

import pytest

from felixpy.model.resources import ValidationError, validate
from policy.calico import (
    canonical_selector,
    endpoint_from_resources,
    namespace_labels_from_profile,
    policy_from_resource,
    profile_from_resource,
    protocol_name,
)
from policy.model import (
    ContainerPort,
    EndpointMatch,
    EntityRule,
    ICMPMatch,
    NamedPort,
    Policy,
    PortRange,
    Profile,
    Rule,
)


def np(spec: dict[str, Any], kind: str = "NetworkPolicy", name: str = "p", ns: str = "prod") -> Policy:
    meta: dict[str, Any] = {"name": name}
    if kind == "NetworkPolicy":
        meta["namespace"] = ns
    return policy_from_resource(validate({"kind": kind, "metadata": meta, "spec": spec}))


def test_full_network_policy() -> None:
    pol = np({
        "order": 100,
        "selector": "app == 'web'",
        "types": ["Ingress", "Egress"],
        "ingress": [
            {"action": "Allow", "protocol": "TCP",
             "source": {"selector": "role == 'fe'", "nets": ["10.0.0.5"], "notNets": ["10.1.2.3/16"]},
             "destination": {"ports": [80, "8000:8080", "http"], "notPorts": [8081]}},
            {"action": "Deny", "protocol": "ICMP", "icmp": {"type": 8, "code": 0}},
            {"action": "Log", "notProtocol": 17},
        ],
        "egress": [{"action": "Pass", "destination": {"namespaceSelector": "team == 'a'"}}],
    })
    assert pol == Policy(
        name="p", namespace="prod", selector='app == "web"', types=frozenset({"Ingress", "Egress"}), order=100.0,
        ingress=(
            Rule("Allow", protocol="TCP",
                 source=EntityRule(endpoints=EndpointMatch('role == "fe"', None, "prod"),
                                   nets=("10.0.0.5/32",), not_nets=("10.1.0.0/16",)),
                 destination=EntityRule(ports=(PortRange(80, 80), PortRange(8000, 8080), NamedPort("http")),
                                        not_ports=(PortRange(8081, 8081),))),
            Rule("Deny", protocol="ICMP", icmp=ICMPMatch(8, 0)),
            Rule("Log", not_protocol="UDP"),
        ),
        egress=(Rule("Pass", destination=EntityRule(endpoints=EndpointMatch("all()", 'team == "a"', None))),),
    )
    assert pol.id == "prod/p" and pol.sort_key() == (False, 100.0, "prod/p")


def test_defaults_and_types() -> None:
    pol = np({})
    assert (pol.selector, pol.types, pol.order, pol.ingress) == ("all()", frozenset({"Ingress"}), None, ())
    # Calico's default types: Egress only for a policy with egress rules only, both with both.
    assert np({"egress": [{"action": "Allow"}]}).types == frozenset({"Egress"})
    assert np({"ingress": [{"action": "Allow"}], "egress": [{"action": "Allow"}]}).types == frozenset(
        {"Ingress", "Egress"})
    assert np({"types": ["Egress"]}).types == frozenset({"Egress"})
    assert np({}).sort_key() == (True, 0.0, "prod/p")


def test_global_policy_scoping() -> None:
    pol = np({"namespaceSelector": "env == 'prod'", "selector": "has(app)",
              "ingress": [{"action": "Allow", "source": {"selector": "role == 'x'"}},
                          {"action": "Allow", "source": {"namespaceSelector": "all()"}}]},
             kind="GlobalNetworkPolicy", name="g")
    assert (pol.id, pol.namespace, pol.namespace_selector) == ("g", None, 'env == "prod"')
    # A global policy's selector is not namespace-scoped.
    assert pol.ingress[0].source.endpoints == EndpointMatch('role == "x"', None, None)
    assert pol.ingress[1].source.endpoints == EndpointMatch("all()", "all()", None)


def test_entity_rule_scoping_in_a_namespaced_policy() -> None:
    def source(er: dict[str, Any]) -> EntityRule:
        return np({"ingress": [{"action": "Allow", "source": er}]}).ingress[0].source

    assert source({}) == EntityRule()  # no selector: any address, pod or not
    assert source({"nets": ["192.0.2.0/24"]}) == EntityRule(nets=("192.0.2.0/24",))
    assert source({"selector": "a == 'b'"}).endpoints == EndpointMatch('a == "b"', None, "prod")
    assert source({"selector": "a == 'b'", "namespaceSelector": "ns == 'y'"}).endpoints == EndpointMatch(
        'a == "b"', 'ns == "y"', None)
    # notSelector alone: the endpoints of the policy's namespace that do not match it.
    er = source({"notSelector": "a == 'b'"})
    assert er.endpoints == EndpointMatch("all()", None, "prod")
    assert er.not_endpoints == EndpointMatch('a == "b"', None, None)


@pytest.mark.parametrize("value, want", [
    ("TCP", "TCP"), ("tcp", "TCP"), (6, "TCP"), ("17", "UDP"), ("sctp", "SCTP"), (132, "SCTP"),
    ("ICMP", "ICMP"), ("icmpv6", "ICMPv6"), ("UDPLite", "UDPLite"), (47, "47"),
])
def test_protocols_are_canonical(value: Any, want: str) -> None:
    assert protocol_name(value) == want


def test_canonical_selector() -> None:
    assert canonical_selector("") == "all()"
    assert canonical_selector(None) == "all()"
    assert canonical_selector("b in {'y','x'} && a=='1'") == 'b in {"x", "y"} && a == "1"'


def test_profile_and_namespace_labels() -> None:
    res = validate({"kind": "Profile", "metadata": {"name": "kns.y"}, "spec": {
        "ingress": [{"action": "Allow"}], "egress": [{"action": "Allow"}],
        "labelsToApply": {"pcns.projectcalico.org/name": "y", "pcns.team": "blue", "pcsa.other": "z"}}})
    assert profile_from_resource(res) == Profile(
        "kns.y", ingress=(Rule("Allow"),), egress=(Rule("Allow"),),
        labels_to_apply=(("pcns.projectcalico.org/name", "y"), ("pcns.team", "blue"), ("pcsa.other", "z")))
    assert namespace_labels_from_profile(res) == {"projectcalico.org/name": "y", "team": "blue"}
    assert namespace_labels_from_profile({"kind": "Profile", "metadata": {"name": "kns.e"}, "spec": {}}) == {}


def test_endpoint_from_resources() -> None:
    res = validate({"kind": "WorkloadEndpoint", "metadata": {"name": "n1-k8s-web-eth0", "namespace": "prod",
                                                              "labels": {"app": "web"}},
                    "spec": {"orchestrator": "k8s", "pod": "web", "ipNetworks": ["10.0.0.7/32", "10.9.0.0/24"],
                             "profiles": ["kns.prod"],
                             "ports": [{"name": "http", "port": 80, "protocol": "tcp"},
                                       {"name": "dns", "port": 53, "protocol": 17}, {"port": 9}]}})
    ep = endpoint_from_resources(res, {"team": "blue"})
    assert ep.id == "prod/web"
    assert ep.label_map() == {"app": "web", "projectcalico.org/namespace": "prod",
                              "projectcalico.org/orchestrator": "k8s"}
    assert ep.namespace_label_map() == {"team": "blue"}
    assert ep.ips == ("10.0.0.7", "10.9.0.0/24")
    assert ep.ports == (ContainerPort("http", "TCP", 80), ContainerPort("dns", "UDP", 53))
    assert ep.profiles == ("kns.prod",)


def test_workload_name_falls_back_to_workload() -> None:
    # A non-Kubernetes orchestrator names the workload in spec.workload: policy sees that name.
    res = validate({"kind": "WorkloadEndpoint", "metadata": {"name": "n1-cni-abc-eth0", "namespace": "ops"},
                    "spec": {"orchestrator": "cni", "workload": "backup-job", "ipNetworks": ["10.0.0.9/32"]}})
    assert endpoint_from_resources(res, {}).id == "ops/backup-job"


@pytest.mark.parametrize("spec, message", [
    ({"ingress": [{"action": "Allow", "source": {"serviceAccounts": {"names": "sa"}}}]},
     "spec.ingress[0].source.serviceAccounts.names: expected a list"),
    ({"tier": "a.b"}, 'spec.tier: invalid tier name "a.b"'),
    ({"ingress": [{"action": "Allow", "destination": {"services": {"name": "kubernetes"}}}]},
     "spec.ingress[0].destination.services: felixpy does not support this field yet"),
    ({"serviceAccountSelector": "a =="}, "spec.serviceAccountSelector: invalid selector"),
    ({"egress": [{"action": "Allow", "ipVersion": 5}]}, "spec.egress[0].ipVersion: must be 4 or 6"),
    ({"ingress": [{"action": "Allow", "protocol": "TCPX"}]}, 'spec.ingress[0].protocol: invalid protocol "TCPX"'),
    ({"ingress": [{"action": "Allow", "source": {"nets": ["10.0.0.0/33"]}}]}, 'invalid CIDR "10.0.0.0/33"'),
    ({"ingress": [{"action": "Allow", "source": {"selector": "a =="}}]}, "source.selector: invalid selector"),
    ({"ingress": [{"action": "Allow", "protocol": "TCP", "destination": {"ports": ["9:8"]}}]}, "invalid port range"),
    ({"ingress": [{"action": "Allow", "destination": {"ports": [80]}}]}, "ports are only valid with protocol"),
])
def test_validation_rejects_what_the_model_cannot_mean(spec: dict[str, Any], message: str) -> None:
    with pytest.raises(ValidationError) as info:
        validate({"kind": "NetworkPolicy", "metadata": {"name": "p", "namespace": "prod"}, "spec": spec})
    assert message in str(info.value) and "\n" not in str(info.value)
