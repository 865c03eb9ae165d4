"""Kubernetes NetworkPolicy → Calico NetworkPolicy conversion, field by field, as golden dicts."""

from __future__ import annotations

from typing import Any

import pytest

from felixpy.model.resources import validate
from policy.k8s import convert_k8s_networkpolicy, identity, is_k8s_networkpolicy

K8S = "projectcalico.org/orchestrator == 'k8s'"


def knp(spec: dict[str, Any], name: str = "web", ns: str | None = "prod") -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name}
    if ns is not None:
        meta["namespace"] = ns
    return {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy", "metadata": meta, "spec": spec}


def converted(spec: dict[str, Any], **kw: Any) -> dict[str, Any]:
    out = convert_k8s_networkpolicy(knp(spec, **kw))
    assert validate(out) == out  # what the conversion writes is already a valid, normalised resource
    return out


def spec_of(spec: dict[str, Any]) -> dict[str, Any]:
    return converted(spec)["spec"]


def test_whole_resource_golden() -> None:
    assert converted({"podSelector": {"matchLabels": {"app": "web"}},
                      "ingress": [{"from": [{"podSelector": {"matchLabels": {"app": "lb"}}}],
                                   "ports": [{"port": 443}]}]}) == {
        "apiVersion": "projectcalico.org/v3",
        "kind": "NetworkPolicy",
        "metadata": {"name": "knp.default.web", "namespace": "prod"},
        "spec": {
            "tier": "default",
            "order": 1000,
            "selector": f"{K8S} && app == 'web'",
            "types": ["Ingress"],
            "ingress": [{"action": "Allow", "protocol": "TCP",
                         "source": {"selector": f"{K8S} && app == 'lb'"},
                         "destination": {"ports": [443]}}],
        },
    }


def test_namespace_defaults_to_default() -> None:
    assert converted({"podSelector": {}}, ns=None)["metadata"] == {"name": "knp.default.web", "namespace": "default"}
    assert identity(knp({}, ns=None)) == ("knp.default.web", "default")
    assert identity(knp({}, ns="x")) == ("knp.default.web", "x")
    assert is_k8s_networkpolicy(knp({})) and not is_k8s_networkpolicy({"kind": "NetworkPolicy"})


# -- podSelector ---------------------------------------------------------------------------------


@pytest.mark.parametrize("selector, want", [
    ({}, K8S),
    (None, K8S),
    ({"matchLabels": {"b": "2", "a": "1"}}, f"{K8S} && a == '1' && b == '2'"),
    ({"matchExpressions": [{"key": "tier", "operator": "In", "values": ["web", "api"]}]},
     f"{K8S} && tier in {{ 'web', 'api' }}"),
    ({"matchExpressions": [{"key": "tier", "operator": "NotIn", "values": ["db"]}]}, f"{K8S} && tier not in {{ 'db' }}"),
    ({"matchExpressions": [{"key": "example.com/gpu", "operator": "Exists"}]}, f"{K8S} && has(example.com/gpu)"),
    ({"matchExpressions": [{"key": "legacy", "operator": "DoesNotExist"}]}, f"{K8S} && ! has(legacy)"),
    ({"matchLabels": {"app": "web"}, "matchExpressions": [{"key": "env", "operator": "In", "values": ["prod"]}]},
     f"{K8S} && app == 'web' && env in {{ 'prod' }}"),
])
def test_pod_selector(selector: Any, want: str) -> None:
    spec: dict[str, Any] = {} if selector is None else {"podSelector": selector}
    assert spec_of(spec)["selector"] == want


# -- policyTypes ---------------------------------------------------------------------------------

_EGRESS_RULE: dict[str, Any] = {"to": [{"podSelector": {}}]}
_EGRESS_CALICO = {"action": "Allow", "destination": {"selector": K8S}}


@pytest.mark.parametrize("spec, types, ingress, egress", [
    ({}, ["Ingress"], [], None),  # absent: Ingress only (deny all ingress)
    ({"egress": [_EGRESS_RULE]}, ["Ingress", "Egress"], [], [_EGRESS_CALICO]),  # + Egress when egress rules exist
    ({"egress": []}, ["Ingress"], [], None),  # an empty egress list is no egress rules
    ({"policyTypes": ["Egress"]}, ["Egress"], None, []),
    ({"policyTypes": ["Egress", "Ingress"]}, ["Ingress", "Egress"], [], []),
    ({"policyTypes": ["Ingress"], "egress": [_EGRESS_RULE]}, ["Ingress"], [], None),  # egress rules ignored
    ({"policyTypes": ["Egress"], "ingress": [{}], "egress": [_EGRESS_RULE]}, ["Egress"], None, [_EGRESS_CALICO]),
])
def test_policy_types(spec: dict[str, Any], types: list[str], ingress: Any, egress: Any) -> None:
    got = spec_of(spec)
    assert got["types"] == types
    assert got.get("ingress") == ingress
    assert got.get("egress") == egress


# -- rules and peers -----------------------------------------------------------------------------


def ingress_of(rule: dict[str, Any]) -> list[dict[str, Any]]:
    return spec_of({"podSelector": {}, "ingress": [rule]})["ingress"]


def egress_of(rule: dict[str, Any]) -> list[dict[str, Any]]:
    return spec_of({"podSelector": {}, "policyTypes": ["Egress"], "egress": [rule]})["egress"]


def test_empty_rule_allows_everything() -> None:
    assert ingress_of({}) == [{"action": "Allow"}]
    assert ingress_of({"from": []}) == [{"action": "Allow"}]
    assert egress_of({}) == [{"action": "Allow"}]
    assert spec_of({"ingress": []})["ingress"] == []


def test_ingress_peers() -> None:
    assert ingress_of({"from": [{"podSelector": {"matchLabels": {"role": "fe"}}}]}) == [
        {"action": "Allow", "source": {"selector": f"{K8S} && role == 'fe'"}}]
    assert ingress_of({"from": [{"namespaceSelector": {"matchLabels": {"team": "a"}}}]}) == [
        {"action": "Allow", "source": {"namespaceSelector": "team == 'a'"}}]
    assert ingress_of({"from": [{"namespaceSelector": {}}]}) == [
        {"action": "Allow", "source": {"namespaceSelector": "all()"}}]
    assert ingress_of({"from": [{"namespaceSelector": {"matchExpressions": [
        {"key": "ns", "operator": "NotIn", "values": ["x", "y"]}]}, "podSelector": {}}]}) == [
        {"action": "Allow", "source": {"selector": K8S, "namespaceSelector": "ns not in { 'x', 'y' }"}}]


def test_several_peers_become_several_rules_times_protocols() -> None:
    got = ingress_of({"from": [{"podSelector": {"matchLabels": {"a": "1"}}}, {"ipBlock": {"cidr": "10.0.0.0/8"}}],
                      "ports": [{"port": 80}, {"protocol": "UDP", "port": 53}]})
    assert got == [
        {"action": "Allow", "protocol": "TCP", "source": {"selector": f"{K8S} && a == '1'"},
         "destination": {"ports": [80]}},
        {"action": "Allow", "protocol": "UDP", "source": {"selector": f"{K8S} && a == '1'"},
         "destination": {"ports": [53]}},
        {"action": "Allow", "protocol": "TCP", "source": {"nets": ["10.0.0.0/8"]}, "destination": {"ports": [80]}},
        {"action": "Allow", "protocol": "UDP", "source": {"nets": ["10.0.0.0/8"]}, "destination": {"ports": [53]}},
    ]


def test_ip_block_with_except() -> None:
    assert ingress_of({"from": [{"ipBlock": {"cidr": "172.17.0.0/16", "except": ["172.17.1.0/24", "172.17.2.0/24"]}}]}) == [
        {"action": "Allow", "source": {"nets": ["172.17.0.0/16"], "notNets": ["172.17.1.0/24", "172.17.2.0/24"]}}]
    # Host bits are tolerated, as by the API server, and normalised.
    assert ingress_of({"from": [{"ipBlock": {"cidr": "10.1.2.3/16"}}]}) == [
        {"action": "Allow", "source": {"nets": ["10.1.0.0/16"]}}]


def test_egress_peers_and_ports_go_to_destination() -> None:
    assert egress_of({"to": [{"ipBlock": {"cidr": "10.0.0.0/24", "except": ["10.0.0.1/32"]}}],
                      "ports": [{"port": 5432}]}) == [
        {"action": "Allow", "protocol": "TCP",
         "destination": {"nets": ["10.0.0.0/24"], "notNets": ["10.0.0.1/32"], "ports": [5432]}}]
    assert egress_of({"to": [{"namespaceSelector": {"matchLabels": {"ns": "y"}},
                              "podSelector": {"matchLabels": {"pod": "b"}}}]}) == [
        {"action": "Allow", "destination": {"selector": f"{K8S} && pod == 'b'", "namespaceSelector": "ns == 'y'"}}]
    assert egress_of({"ports": [{"port": "dns", "protocol": "UDP"}]}) == [
        {"action": "Allow", "protocol": "UDP", "destination": {"ports": ["dns"]}}]


# -- ports ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("ports, want", [
    ([{"port": 80}], [("TCP", [80])]),  # protocol defaults to TCP
    ([{"protocol": "TCP", "port": 80}, {"protocol": "TCP", "port": 81}], [("TCP", ["80:81"])]),  # merged
    ([{"port": 80, "endPort": 90}, {"port": 85}, {"port": 100}], [("TCP", ["80:90", 100])]),
    ([{"port": "http"}, {"port": 8080}, {"port": "http"}], [("TCP", [8080, "http"])]),
    ([{"protocol": "UDP"}], [("UDP", None)]),  # a protocol without port: every port
    ([{"protocol": "UDP", "port": 53}, {"protocol": "UDP"}], [("UDP", None)]),
    ([{"protocol": "SCTP", "port": 9000}], [("SCTP", [9000])]),
    ([{"protocol": "udp", "port": 53}], [("UDP", [53])]),
    ([{"port": 53, "protocol": "UDP"}, {"port": 53}], [("UDP", [53]), ("TCP", [53])]),
])
def test_ports(ports: list[dict[str, Any]], want: list[tuple[str, Any]]) -> None:
    got = ingress_of({"ports": ports})
    assert [(r["protocol"], r.get("destination", {}).get("ports")) for r in got] == want
    assert all("source" not in r for r in got)


def test_no_ports_means_every_protocol() -> None:
    assert ingress_of({"from": [{"podSelector": {}}]}) == [{"action": "Allow", "source": {"selector": K8S}}]


# -- rejects -------------------------------------------------------------------------------------


@pytest.mark.parametrize("spec, message", [
    ({"ingress": [{"ports": [{"protocol": "ICMP"}]}]}, 'spec.ingress[0].ports[0].protocol: unsupported protocol "ICMP"'),
    ({"ingress": [{"ports": [{"port": 0}]}]}, "spec.ingress[0].ports[0].port: port 0 is out of range"),
    ({"ingress": [{"ports": [{"port": 70000}]}]}, "port 70000 is out of range"),
    ({"ingress": [{"ports": [{"port": "Not_A_Name"}]}]}, 'invalid port name "Not_A_Name"'),
    ({"ingress": [{"ports": [{"port": "80"}]}]}, 'invalid port name "80"'),
    ({"ingress": [{"ports": [{"port": 90, "endPort": 80}]}]}, "spec.ingress[0].ports[0].endPort: 80 is below port 90"),
    ({"ingress": [{"ports": [{"port": "http", "endPort": 80}]}]}, "endPort: cannot be used with a named port"),
    ({"ingress": [{"ports": [{"endPort": 80}]}]}, "endPort: needs a numeric port"),
    ({"ingress": [{"from": [{"ipBlock": {"cidr": "10.0.0.0/33"}}]}]}, 'ipBlock.cidr: invalid CIDR "10.0.0.0/33"'),
    ({"ingress": [{"from": [{"ipBlock": {"cidr": "10.0.0.1"}}]}]}, 'invalid CIDR "10.0.0.1"'),
    ({"ingress": [{"from": [{"ipBlock": {"cidr": "10.0.0.0/8", "except": ["11.0.0.0/16"]}}]}]},
     "except[0]: 11.0.0.0/16 must be a strict subset of 10.0.0.0/8"),
    ({"ingress": [{"from": [{"ipBlock": {"cidr": "10.0.0.0/8"}, "podSelector": {}}]}]},
     "from[0]: ipBlock cannot be combined"),
    ({"ingress": [{"from": [{}]}]}, "from[0]: a peer needs podSelector, namespaceSelector or ipBlock"),
    ({"podSelector": {"matchExpressions": [{"key": "a", "operator": "Equals", "values": ["b"]}]}},
     'spec.podSelector.matchExpressions[0].operator: invalid operator "Equals"'),
    ({"podSelector": {"matchExpressions": [{"key": "a", "operator": "In", "values": []}]}},
     "values: must be non-empty for operator In"),
    ({"podSelector": {"matchExpressions": [{"key": "a", "operator": "Exists", "values": ["x"]}]}},
     "values: must be empty for operator Exists"),
    ({"podSelector": {"matchLabels": {"bad key": "x"}}}, 'invalid label key "bad key"'),
    ({"podSelector": {"matchLabels": {"app": "it's"}}}, "invalid label value"),
    ({"policyTypes": ["Ingress", "Sideways"]}, 'spec.policyTypes[1]: invalid policy type "Sideways"'),
    ({"policyTypes": ["Ingress", "Ingress"]}, "spec.policyTypes: contains duplicates"),
    ({"ingres": []}, "spec.ingres: unknown field"),
    ({"ingress": [{"to": []}]}, "spec.ingress[0].to: unknown field"),
    ({"ingress": {"from": []}}, "spec.ingress: expected a list"),
])
def test_rejects_with_one_line_naming_the_field(spec: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError) as info:
        convert_k8s_networkpolicy(knp(spec))
    text = str(info.value)
    assert text.startswith('NetworkPolicy "web": ')
    assert message in text
    assert "\n" not in text


def test_rejects_bad_metadata() -> None:
    with pytest.raises(ValueError, match="metadata: required"):
        convert_k8s_networkpolicy({"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy", "spec": {}})
    with pytest.raises(ValueError, match="metadata.namespace: invalid namespace"):
        convert_k8s_networkpolicy(knp({}, ns="Bad_NS"))
    with pytest.raises(ValueError, match="apiVersion: expected networking.k8s.io/v1"):
        convert_k8s_networkpolicy({**knp({}), "apiVersion": "networking.k8s.io/v1beta1"})
