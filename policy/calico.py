"""Calico v3 resources (NetworkPolicy, GlobalNetworkPolicy, Profile, WorkloadEndpoint) → policy/model.py.

The input is a resource as felixpy.model.resources.validate() leaves it (dicts, defaults filled),
but missing defaults are tolerated so hand-built dicts work too. Selectors are stored in their
canonical printed form, so equal selectors are equal strings (ipset names hash that text).

Rule scoping follows Felix's conversion of v3 entity rules:
* namespaceSelector set: endpoints whose namespace labels match it, and the selector (all() when
  absent) over the endpoint's labels;
* no namespaceSelector in a namespaced policy: selector (or notSelector) matches only endpoints in
  the policy's own namespace;
* neither selector nor namespaceSelector: no endpoint constraint (any address, pod or not);
* notSelector itself is not namespace-scoped.

Namespace labels reach policy as Calico hands them over: a namespace profile `kns.<ns>` carries
`labelsToApply` {"pcns.<key>": value}; namespace_labels_from_profile strips the prefix.

This module is pure and imports nothing from felixpy.
"""

from __future__ import annotations

import ipaddress
from typing import Any, Mapping

from policy import selectors
from policy.model import (
    ContainerPort,
    Direction,
    Endpoint,
    EndpointMatch,
    EntityRule,
    ICMPMatch,
    NamedPort,
    Policy,
    Port,
    PortRange,
    Profile,
    Rule,
)

NAMESPACE_LABEL_PREFIX = "pcns."
_DIRECTIONS: tuple[Direction, ...] = ("Ingress", "Egress")
NAMESPACE_LABEL = "projectcalico.org/namespace"
ORCHESTRATOR_LABEL = "projectcalico.org/orchestrator"

# Protocol numbers with a name are stored by name, so `6` and `TCP` are one protocol everywhere.
PROTOCOL_NAMES = {1: "ICMP", 6: "TCP", 17: "UDP", 58: "ICMPv6", 132: "SCTP", 136: "UDPLite"}
PROTOCOL_NUMBERS = {name.upper(): number for number, name in PROTOCOL_NAMES.items()}


def canonical_selector(text: str | None) -> str:
    """The canonical printed form of a selector ("" or None: all())."""
    return str(selectors.parse(text or ""))


def protocol_name(value: Any) -> str:
    """"TCP", "UDP", ... for a protocol name (any case) or number; other numbers as text."""
    if isinstance(value, bool):
        raise ValueError(f"invalid protocol {value!r}")
    if isinstance(value, int) or (isinstance(value, str) and value.isdigit()):
        number = int(value)
        if not 0 <= number <= 255:
            raise ValueError(f"invalid protocol number {number}")
        return PROTOCOL_NAMES.get(number, str(number))
    if isinstance(value, str) and value.upper() in PROTOCOL_NUMBERS:
        return PROTOCOL_NAMES[PROTOCOL_NUMBERS[value.upper()]]
    raise ValueError(f"invalid protocol {value!r}")


def protocol_number(name: str) -> int:
    """The IP protocol number of a protocol_name() result."""
    return int(name) if name.isdigit() else PROTOCOL_NUMBERS[name.upper()]


def _net(text: str) -> str:
    return str(ipaddress.ip_network(text, strict=False))


def _port(value: Any) -> Port:
    if isinstance(value, int) and not isinstance(value, bool):
        return PortRange(value, value)
    text = str(value)
    if text.isdigit():
        return PortRange(int(text), int(text))
    first, colon, last = text.partition(":")
    if colon and first.isdigit() and last.isdigit():
        return PortRange(int(first), int(last))
    return NamedPort(text)


def _entity(er: Mapping[str, Any] | None, namespace: str | None) -> EntityRule:
    er = er or {}
    selector = er.get("selector") or None
    ns_selector = er.get("namespaceSelector") or None
    not_selector = er.get("notSelector") or None
    endpoints: EndpointMatch | None = None
    if ns_selector is not None:
        endpoints = EndpointMatch(canonical_selector(selector), canonical_selector(ns_selector), None)
    elif namespace is not None and (selector is not None or not_selector is not None):
        endpoints = EndpointMatch(canonical_selector(selector), None, namespace)
    elif selector is not None:
        endpoints = EndpointMatch(canonical_selector(selector))
    return EntityRule(
        endpoints=endpoints,
        not_endpoints=EndpointMatch(canonical_selector(not_selector)) if not_selector is not None else None,
        nets=tuple(_net(n) for n in er.get("nets") or ()),
        not_nets=tuple(_net(n) for n in er.get("notNets") or ()),
        ports=tuple(_port(p) for p in er.get("ports") or ()),
        not_ports=tuple(_port(p) for p in er.get("notPorts") or ()),
    )


def _icmp(value: Mapping[str, Any] | None) -> ICMPMatch | None:
    if value is None:
        return None
    return ICMPMatch(type=value.get("type"), code=value.get("code"))


def rule_from_resource(rule: Mapping[str, Any], namespace: str | None) -> Rule:
    """One v3 rule; `namespace` is the policy's namespace (None for global policies and profiles)."""
    for field in ("serviceAccounts", "services"):
        for side in ("source", "destination"):
            if (rule.get(side) or {}).get(field):
                raise ValueError(f"{side}.{field} is not supported")
    protocol = rule.get("protocol")
    not_protocol = rule.get("notProtocol")
    return Rule(
        action=rule["action"],
        protocol=protocol_name(protocol) if protocol is not None else None,
        not_protocol=protocol_name(not_protocol) if not_protocol is not None else None,
        icmp=_icmp(rule.get("icmp")),
        not_icmp=_icmp(rule.get("notICMP")),
        source=_entity(rule.get("source"), namespace),
        destination=_entity(rule.get("destination"), namespace),
    )


def policy_from_resource(res: Mapping[str, Any]) -> Policy:
    """A validated NetworkPolicy or GlobalNetworkPolicy resource as a Policy."""
    kind = res.get("kind")
    if kind not in ("NetworkPolicy", "GlobalNetworkPolicy"):
        raise ValueError(f"expected a NetworkPolicy or GlobalNetworkPolicy, got {kind!r}")
    meta = res["metadata"]
    spec = res.get("spec") or {}
    namespace = (meta.get("namespace") or "default") if kind == "NetworkPolicy" else None
    ingress = spec.get("ingress") or []
    egress = spec.get("egress") or []
    types = spec.get("types") or (["Ingress"] + (["Egress"] if egress else []))
    directions: frozenset[Direction] = frozenset(d for d in _DIRECTIONS if d in types)
    order = spec.get("order")
    ns_selector = spec.get("namespaceSelector") if kind == "GlobalNetworkPolicy" else None
    return Policy(
        name=meta["name"],
        namespace=namespace,
        selector=canonical_selector(spec.get("selector")),
        types=directions,
        ingress=tuple(rule_from_resource(r, namespace) for r in ingress),
        egress=tuple(rule_from_resource(r, namespace) for r in egress),
        order=float(order) if order is not None else None,
        namespace_selector=canonical_selector(ns_selector) if ns_selector else None,
    )


def profile_from_resource(res: Mapping[str, Any]) -> Profile:
    """A Profile resource (e.g. the namespace profile kns.<ns>) as a Profile."""
    spec = res.get("spec") or {}
    labels = spec.get("labelsToApply") or {}
    return Profile(
        name=res["metadata"]["name"],
        ingress=tuple(rule_from_resource(r, None) for r in spec.get("ingress") or ()),
        egress=tuple(rule_from_resource(r, None) for r in spec.get("egress") or ()),
        labels_to_apply=tuple(sorted((str(k), str(v)) for k, v in labels.items())),
    )


def namespace_labels_from_profile(res: Mapping[str, Any]) -> dict[str, str]:
    """The namespace labels a `kns.<ns>` profile hands its pods, without the "pcns." prefix."""
    labels = (res.get("spec") or {}).get("labelsToApply") or {}
    return {
        str(k)[len(NAMESPACE_LABEL_PREFIX):]: str(v)
        for k, v in labels.items()
        if str(k).startswith(NAMESPACE_LABEL_PREFIX)
    }


def _host_ip(network: str) -> str:
    """"10.0.0.5/32" → "10.0.0.5"; anything wider is kept as written."""
    iface = ipaddress.ip_interface(network)
    return str(iface.ip) if iface.network.prefixlen == iface.max_prefixlen else str(network)


def endpoint_from_resources(wep: Mapping[str, Any], namespace_labels: Mapping[str, str]) -> Endpoint:
    """A WorkloadEndpoint resource and its namespace's labels as an Endpoint.

    The endpoint's name is the pod name (spec.pod, else spec.workload, else metadata.name). Like
    Calico, the endpoint always carries projectcalico.org/namespace (and orchestrator when the
    spec names one), whatever metadata.labels says. Unnamed container ports are dropped: only
    named ports matter to policy.
    """
    meta = wep.get("metadata") or {}
    spec = wep.get("spec") or {}
    namespace = meta.get("namespace") or "default"
    labels = {str(k): str(v) for k, v in (meta.get("labels") or {}).items()}
    labels[NAMESPACE_LABEL] = namespace
    if spec.get("orchestrator"):
        labels.setdefault(ORCHESTRATOR_LABEL, str(spec["orchestrator"]))
    ports = []
    for p in spec.get("ports") or ():
        if p.get("name"):
            ports.append(ContainerPort(str(p["name"]), protocol_name(p.get("protocol", "TCP")), int(p["port"])))
    return Endpoint(
        namespace=namespace,
        name=str(spec.get("pod") or spec.get("workload") or meta.get("name")),
        labels=tuple(sorted(labels.items())),
        namespace_labels=tuple(sorted((str(k), str(v)) for k, v in namespace_labels.items())),
        ips=tuple(_host_ip(n) for n in spec.get("ipNetworks") or ()),
        ports=tuple(ports),
        profiles=tuple(spec.get("profiles") or ()),
    )
