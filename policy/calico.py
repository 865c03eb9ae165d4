"""Calico v3 resources → policy/model.py: NetworkPolicy, GlobalNetworkPolicy, Tier, Profile,
WorkloadEndpoint, NetworkSet, GlobalNetworkSet and HostEndpoint.

The input is a resource as felixpy.model.resources.validate() leaves it (dicts, defaults filled),
but missing defaults are tolerated so hand-built dicts work too. Selectors are stored in their
canonical printed form, so equal selectors are equal strings (ipset names hash that text).

Rule scoping follows Felix's conversion of v3 entity rules:
* namespaceSelector set: endpoints whose namespace labels match it, and the selector (all() when
  absent) over the endpoint's labels;
* no namespaceSelector in a namespaced policy: selector (or notSelector) matches only endpoints in
  the policy's own namespace;
* neither selector nor namespaceSelector: no endpoint constraint (any address, pod or not);
* notSelector itself is not namespace-scoped;
* serviceAccounts {names, selector}: `projectcalico.org/serviceaccount in {names}` AND the
  selector over `pcsa.<key>` labels, AND-ed with the selector (libcalico-go's
  GetEntityRuleSelector), then scoped like a selector.

Policy selectors are folded as libcalico-go's update processors fold them: a GlobalNetworkPolicy's
namespaceSelector becomes `(selector) && <namespaceSelector over pcns.<key>>` with every all()
turned into has(projectcalico.org/namespace); a serviceAccountSelector is appended over
`pcsa.<key>` (in a GlobalNetworkPolicy with all() turned into has(projectcalico.org/serviceaccount)).

Namespace labels reach policy as Calico hands them over: a namespace profile `kns.<ns>` carries
`labelsToApply` {"pcns.<key>": value}; namespace_labels_from_profile strips the prefix. Service
account labels likewise come from the `ksa.<ns>.<sa>` profile's {"pcsa.<key>": value}.

This module is pure and imports nothing from felixpy.
"""

from __future__ import annotations

import ipaddress
from typing import Any, Mapping

from policy import selectors
from policy.model import (
    DEFAULT_TIER,
    DEFAULT_TIER_ORDER,
    ContainerPort,
    Direction,
    Endpoint,
    EndpointMatch,
    EntityRule,
    HostEndpoint,
    ICMPMatch,
    NamedPort,
    Policy,
    Port,
    PortRange,
    Profile,
    Rule,
    Tier,
)

NAMESPACE_LABEL_PREFIX = "pcns."
SERVICE_ACCOUNT_LABEL_PREFIX = "pcsa."
_DIRECTIONS: tuple[Direction, ...] = ("Ingress", "Egress")
NAMESPACE_LABEL = "projectcalico.org/namespace"
ORCHESTRATOR_LABEL = "projectcalico.org/orchestrator"
SERVICE_ACCOUNT_LABEL = "projectcalico.org/serviceaccount"
# Calico's built-in profile (libcalico-go resources.DefaultAllowProfileName): allow everything.
DEFAULT_ALLOW_PROFILE = "projectcalico-default-allow"

# Protocol numbers with a name are stored by name, so `6` and `TCP` are one protocol everywhere.
PROTOCOL_NAMES = {1: "ICMP", 6: "TCP", 17: "UDP", 58: "ICMPv6", 132: "SCTP", 136: "UDPLite"}
PROTOCOL_NUMBERS = {name.upper(): number for number, name in PROTOCOL_NAMES.items()}


def canonical_selector(text: str | None) -> str:
    """The canonical printed form of a selector ("" or None: all())."""
    return str(selectors.parse(text or ""))


def _sa_names_selector(names: Any) -> selectors.Selector:
    return selectors.In(SERVICE_ACCOUNT_LABEL, frozenset(str(n) for n in names))


def service_account_selector(sam: Mapping[str, Any] | None) -> selectors.Selector | None:
    """A rule's serviceAccounts {names, selector} as one selector (None: no constraint)."""
    if not sam:
        return None
    terms: list[selectors.Selector] = []
    if sam.get("selector"):
        terms.append(selectors.prefixed(selectors.parse(sam["selector"]), SERVICE_ACCOUNT_LABEL_PREFIX))
    if sam.get("names"):
        terms.append(_sa_names_selector(sam["names"]))
    return selectors.and_(*terms) if terms else None


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
    ns_selector = er.get("namespaceSelector") or None
    not_selector = er.get("notSelector") or None
    terms = [t for t in (service_account_selector(er.get("serviceAccounts")),
                         selectors.parse(er["selector"]) if er.get("selector") else None) if t is not None]
    selector = str(selectors.and_(*terms)) if terms else None
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
    for side in ("source", "destination"):
        if (rule.get(side) or {}).get("services"):
            raise ValueError(f"{side}.services is not supported")
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
        ip_version=int(rule["ipVersion"]) if rule.get("ipVersion") is not None else None,
    )


def default_types(spec: Mapping[str, Any]) -> list[str]:
    """Calico's default for a policy without `types`: Ingress, unless it has egress rules only
    (Egress) or both kinds (both)."""
    if not spec.get("egress"):
        return ["Ingress"]
    if not spec.get("ingress"):
        return ["Egress"]
    return ["Ingress", "Egress"]


_HAS_NAMESPACE = selectors.Has(NAMESPACE_LABEL)
_HAS_SERVICE_ACCOUNT = selectors.Has(SERVICE_ACCOUNT_LABEL)


def policy_selector(kind: str, spec: Mapping[str, Any]) -> str:
    """The policy's whole endpoint selector, folded as libcalico-go's update processors fold it
    (the namespace constraint of a NetworkPolicy stays in Policy.namespace)."""
    sel = selectors.parse(spec.get("selector") or "")
    ns_selector = spec.get("namespaceSelector") if kind == "GlobalNetworkPolicy" else None
    if ns_selector:
        sel = selectors.and_(sel, selectors.prefixed(selectors.parse(ns_selector), NAMESPACE_LABEL_PREFIX))
        sel = selectors.replace_all(sel, _HAS_NAMESPACE)
    sa_selector = spec.get("serviceAccountSelector")
    if sa_selector:
        sel = selectors.and_(sel, selectors.prefixed(selectors.parse(sa_selector), SERVICE_ACCOUNT_LABEL_PREFIX))
        if kind == "GlobalNetworkPolicy":
            sel = selectors.replace_all(sel, _HAS_SERVICE_ACCOUNT)
    return _simplified(sel)


def _simplified(sel: selectors.Selector) -> str:
    """all() terms of a conjunction dropped, so `all() && x` and `x` are one selector (one ipset)."""
    if isinstance(sel, selectors.And):
        terms = [t for t in sel.terms if not isinstance(t, selectors.All)]
        sel = selectors.and_(*terms) if terms else selectors.All()
    return str(sel)


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
    types = spec.get("types") or default_types(spec)
    directions: frozenset[Direction] = frozenset(d for d in _DIRECTIONS if d in types)
    order = spec.get("order")
    ns_selector = spec.get("namespaceSelector") if kind == "GlobalNetworkPolicy" else None
    is_global = kind == "GlobalNetworkPolicy"
    return Policy(
        name=meta["name"],
        namespace=namespace,
        selector=policy_selector(str(kind), spec),
        types=directions,
        ingress=tuple(rule_from_resource(r, namespace) for r in ingress),
        egress=tuple(rule_from_resource(r, namespace) for r in egress),
        order=float(order) if order is not None else None,
        namespace_selector=canonical_selector(ns_selector) if ns_selector else None,
        tier=str(spec.get("tier") or DEFAULT_TIER),
        pre_dnat=is_global and bool(spec.get("preDNAT")),
        do_not_track=is_global and bool(spec.get("doNotTrack")),
        apply_on_forward=is_global and bool(spec.get("applyOnForward")),
    )


def tier_from_resource(res: Mapping[str, Any]) -> Tier:
    """A Tier resource (order defaults to the default tier's; any defaultAction but Pass is Deny,
    as libcalico-go's tier processor reads it)."""
    spec = res.get("spec") or {}
    order = spec.get("order")
    return Tier(
        name=str(res["metadata"]["name"]),
        order=float(order) if order is not None else DEFAULT_TIER_ORDER,
        default_action="Pass" if spec.get("defaultAction") == "Pass" else "Deny",
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
    return _unprefixed_labels(res, NAMESPACE_LABEL_PREFIX)


def service_account_labels_from_profile(res: Mapping[str, Any]) -> dict[str, str]:
    """The service account labels a `ksa.<ns>.<sa>` profile hands its pods, without "pcsa."."""
    return _unprefixed_labels(res, SERVICE_ACCOUNT_LABEL_PREFIX)


def _unprefixed_labels(res: Mapping[str, Any], prefix: str) -> dict[str, str]:
    labels = (res.get("spec") or {}).get("labelsToApply") or {}
    return {str(k)[len(prefix):]: str(v) for k, v in labels.items() if str(k).startswith(prefix)}


DEFAULT_ALLOW = Profile(
    name=DEFAULT_ALLOW_PROFILE, ingress=(Rule("Allow"),), egress=(Rule("Allow"),),
)


def _host_ip(network: str) -> str:
    """"10.0.0.5/32" → "10.0.0.5"; anything wider is kept as written."""
    iface = ipaddress.ip_interface(network)
    return str(iface.ip) if iface.network.prefixlen == iface.max_prefixlen else str(network)


def endpoint_from_resources(
    wep: Mapping[str, Any],
    namespace_labels: Mapping[str, str],
    sa_labels: Mapping[str, str] | None = None,
) -> Endpoint:
    """A WorkloadEndpoint resource, its namespace's labels and its service account's labels as
    an Endpoint.

    The endpoint's name is the pod name (spec.pod, else spec.workload, else metadata.name). Like
    Calico, the endpoint always carries projectcalico.org/namespace (and orchestrator and
    serviceaccount when the spec names them), whatever metadata.labels says. Unnamed container
    ports are dropped: only named ports matter to policy.
    """
    meta = wep.get("metadata") or {}
    spec = wep.get("spec") or {}
    namespace = meta.get("namespace") or "default"
    labels = {str(k): str(v) for k, v in (meta.get("labels") or {}).items()}
    labels[NAMESPACE_LABEL] = namespace
    if spec.get("orchestrator"):
        labels.setdefault(ORCHESTRATOR_LABEL, str(spec["orchestrator"]))
    if spec.get("serviceAccountName"):
        labels[SERVICE_ACCOUNT_LABEL] = str(spec["serviceAccountName"])
    return Endpoint(
        namespace=namespace,
        name=str(spec.get("pod") or spec.get("workload") or meta.get("name")),
        labels=tuple(sorted(labels.items())),
        namespace_labels=tuple(sorted((str(k), str(v)) for k, v in namespace_labels.items())),
        ips=tuple(_host_ip(n) for n in spec.get("ipNetworks") or ()),
        ports=_named_ports(spec),
        profiles=tuple(spec.get("profiles") or ()),
        sa_labels=tuple(sorted((str(k), str(v)) for k, v in (sa_labels or {}).items())),
        node=str(spec["node"]) if spec.get("node") else None,
    )


def _named_ports(spec: Mapping[str, Any]) -> tuple[ContainerPort, ...]:
    return tuple(
        ContainerPort(str(p["name"]), protocol_name(p.get("protocol", "TCP")), int(p["port"]))
        for p in spec.get("ports") or () if p.get("name")
    )


def service_account_of(wep: Mapping[str, Any]) -> str | None:
    """The service account a WorkloadEndpoint's pod runs as (spec.serviceAccountName)."""
    account = (wep.get("spec") or {}).get("serviceAccountName")
    return str(account) if account else None


def network_set_from_resource(res: Mapping[str, Any], namespace_labels: Mapping[str, str]) -> Endpoint:
    """A NetworkSet (namespaced: carries projectcalico.org/namespace and its namespace's labels,
    as libcalico-go's network set processor gives it the kns.<ns> profile) or a GlobalNetworkSet
    (labels only) as an Endpoint whose addresses are its nets."""
    meta = res.get("metadata") or {}
    kind = res.get("kind")
    if kind not in ("NetworkSet", "GlobalNetworkSet"):
        raise ValueError(f"expected a NetworkSet or GlobalNetworkSet, got {kind!r}")
    labels = {str(k): str(v) for k, v in (meta.get("labels") or {}).items()}
    namespace: str | None = None
    if kind == "NetworkSet":
        namespace = str(meta.get("namespace") or "default")
        labels[NAMESPACE_LABEL] = namespace
    nets = tuple(_net(n) for n in (res.get("spec") or {}).get("nets") or ())
    return Endpoint(
        namespace=namespace,
        name=str(meta["name"]),
        labels=tuple(sorted(labels.items())),
        namespace_labels=tuple(sorted((str(k), str(v)) for k, v in namespace_labels.items()))
        if namespace is not None else (),
        ips=tuple(_host_ip(n) for n in nets),
        kind="networkset",
    )


def host_endpoint_from_resource(
    res: Mapping[str, Any], profiles: Mapping[str, Profile] | None = None
) -> HostEndpoint:
    """A HostEndpoint resource as a HostEndpoint. Selectors see its labels and (Calico's label
    inheritance) the labelsToApply of its profiles, its own labels winning; `profiles` maps the
    profile names known so far to their Profile."""
    meta = res.get("metadata") or {}
    spec = res.get("spec") or {}
    inherited: dict[str, str] = {}
    for name in reversed(spec.get("profiles") or ()):
        profile = (profiles or {}).get(name)
        if profile is not None:
            inherited.update(profile.labels_to_apply)
    iface = str(spec.get("interfaceName") or "")
    if not iface:
        raise ValueError("spec.interfaceName is required")
    if not spec.get("node"):
        raise ValueError("spec.node is required")
    endpoint = Endpoint(
        namespace=None,
        name=str(meta["name"]),
        labels=tuple(sorted((str(k), str(v)) for k, v in (meta.get("labels") or {}).items())),
        namespace_labels=(),
        ips=tuple(str(ipaddress.ip_address(ip)) for ip in spec.get("expectedIPs") or ()),
        ports=_named_ports(spec),
        profiles=tuple(spec.get("profiles") or ()),
        kind="host",
        profile_labels=tuple(sorted(inherited.items())),
        node=str(spec["node"]),
    )
    return HostEndpoint(name=endpoint.name, node=str(spec["node"]), iface=iface, endpoint=endpoint)

