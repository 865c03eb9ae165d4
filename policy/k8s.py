"""Kubernetes networking.k8s.io/v1 NetworkPolicy → Calico projectcalico.org/v3 NetworkPolicy.

The output is the resource Calico's kube-controllers store for a Kubernetes policy (calico-reference
§4.4): name `knp.default.<name>`, tier default, order 1000, selector
`projectcalico.org/orchestrator == 'k8s' && <podSelector terms>`, and one Allow rule per peer ×
protocol. Everything downstream (policy/calico.py, the renderer, explain) then sees only Calico
policy, so Kubernetes semantics must be fully expressed here:

* policyTypes absent: Ingress, plus Egress when the policy has egress rules (the API server's
  defaulting; Calico's own conversion only ever sees defaulted objects). A direction in
  policyTypes with no rules denies everything in that direction; rules for a direction that is
  not in policyTypes are dropped (Kubernetes ignores them).
* A peer's podSelector alone selects pods in the policy's namespace (a Calico rule selector
  without namespaceSelector is namespace-scoped); namespaceSelector alone selects every pod in
  the matching namespaces (Calico selector empty = all()); both in one peer AND together; several
  peers are OR-ed by being separate rules. ipBlock becomes nets / notNets, which match any address
  in the range, pods included, as in Kubernetes.
* ports: protocol defaults to TCP; a port entry without port allows every port of its protocol;
  endPort makes a range; named ports stay names (resolved on the destination pod). No ports: any
  port and protocol.

Invalid input raises ValueError with one line naming the field, e.g.
`NetworkPolicy "web": spec.ingress[0].ports[1].endPort: 70 is below port 80`.

This module is pure and imports nothing from felixpy.
"""

from __future__ import annotations

import ipaddress
import re
from typing import Any, Mapping

API_VERSION = "networking.k8s.io/v1"
CALICO_API_VERSION = "projectcalico.org/v3"
NAME_PREFIX = "knp.default."
ORDER = 1000
ORCHESTRATOR_SELECTOR = "projectcalico.org/orchestrator == 'k8s'"
PROTOCOLS = ("TCP", "UDP", "SCTP")

# Kubernetes' own syntax rules (apimachinery validation), so bad input fails here with a message
# about the Kubernetes field rather than later with one about the generated Calico selector.
_DNS1123_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")
_DNS1123_SUBDOMAIN = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")
_LABEL_NAME = re.compile(r"[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?")
_LABEL_VALUE = re.compile(r"([A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?)?")
_PORT_NAME = re.compile(r"[a-z0-9]([a-z0-9-]*[a-z0-9])?")


class _FieldError(ValueError):
    def __init__(self, path: str, message: str) -> None:
        super().__init__(f"{path}: {message}")


def _q(value: Any) -> str:
    return f'"{value}"' if isinstance(value, str) else repr(value)


def _expect_map(value: Any, path: str, allowed: tuple[str, ...]) -> Mapping[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise _FieldError(path, f"expected an object, got {_q(value)}")
    for key in value:
        if key not in allowed:
            raise _FieldError(f"{path}.{key}", "unknown field")
    return value


def _expect_list(value: Any, path: str) -> list[Any]:
    if value is None:
        return []
    if not isinstance(value, list):
        raise _FieldError(path, f"expected a list, got {_q(value)}")
    return value


# -- label selectors --------------------------------------------------------------------------------


def _label_key(key: Any, path: str) -> str:
    if not isinstance(key, str):
        raise _FieldError(path, f"invalid label key {_q(key)}")
    prefix, slash, name = key.rpartition("/")
    ok = bool(_LABEL_NAME.fullmatch(name)) and len(name) <= 63
    if slash:
        ok = ok and bool(_DNS1123_SUBDOMAIN.fullmatch(prefix)) and len(prefix) <= 253
    if not ok:
        raise _FieldError(path, f"invalid label key {_q(key)}")
    return key


def _label_value(value: Any, path: str) -> str:
    if not isinstance(value, str) or len(value) > 63 or not _LABEL_VALUE.fullmatch(value):
        raise _FieldError(path, f"invalid label value {_q(value)}")
    return value


def label_selector_terms(sel: Any, path: str) -> list[str]:
    """Calico selector terms for a Kubernetes LabelSelector: matchLabels sorted by key, then
    matchExpressions in order, as Calico's conversion writes them. [] means "everything"."""
    sel = _expect_map(sel, path, ("matchLabels", "matchExpressions"))
    terms: list[str] = []
    labels = _expect_map(sel.get("matchLabels"), f"{path}.matchLabels", tuple(sel.get("matchLabels") or ()))
    for key in sorted(labels):
        where = f"{path}.matchLabels.{key}"
        terms.append(f"{_label_key(key, where)} == '{_label_value(labels[key], where)}'")
    for i, expr in enumerate(_expect_list(sel.get("matchExpressions"), f"{path}.matchExpressions")):
        where = f"{path}.matchExpressions[{i}]"
        expr = _expect_map(expr, where, ("key", "operator", "values"))
        key = _label_key(expr.get("key"), f"{where}.key")
        op = expr.get("operator")
        values = _expect_list(expr.get("values"), f"{where}.values")
        if op in ("In", "NotIn"):
            if not values:
                raise _FieldError(f"{where}.values", f"must be non-empty for operator {op}")
            quoted = ", ".join(f"'{_label_value(v, f'{where}.values[{j}]')}'" for j, v in enumerate(values))
            terms.append(f"{key} {'in' if op == 'In' else 'not in'} {{ {quoted} }}")
        elif op in ("Exists", "DoesNotExist"):
            if values:
                raise _FieldError(f"{where}.values", f"must be empty for operator {op}")
            terms.append(f"has({key})" if op == "Exists" else f"! has({key})")
        else:
            raise _FieldError(f"{where}.operator", f"invalid operator {_q(op)} (In, NotIn, Exists, DoesNotExist)")
    return terms


def pod_selector(sel: Any, path: str) -> str:
    """A podSelector as a Calico selector: only Kubernetes pods, then the selector's terms."""
    return " && ".join([ORCHESTRATOR_SELECTOR, *label_selector_terms(sel, path)])


def namespace_selector(sel: Any, path: str) -> str:
    """A namespaceSelector as a Calico namespaceSelector (over namespace labels); {} = all()."""
    terms = label_selector_terms(sel, path)
    return " && ".join(terms) if terms else "all()"


# -- peers and ports --------------------------------------------------------------------------------


def _cidr(value: Any, path: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    if not isinstance(value, str) or "/" not in value:
        raise _FieldError(path, f"invalid CIDR {_q(value)}")
    try:
        return ipaddress.ip_network(value, strict=False)
    except ValueError:
        raise _FieldError(path, f"invalid CIDR {_q(value)}") from None


def _peer(peer: Any, path: str) -> dict[str, Any]:
    """The Calico entity-rule fields for one NetworkPolicyPeer."""
    peer = _expect_map(peer, path, ("podSelector", "namespaceSelector", "ipBlock"))
    if "ipBlock" in peer and peer["ipBlock"] is not None:
        if peer.get("podSelector") is not None or peer.get("namespaceSelector") is not None:
            raise _FieldError(path, "ipBlock cannot be combined with podSelector or namespaceSelector")
        block = _expect_map(peer["ipBlock"], f"{path}.ipBlock", ("cidr", "except"))
        net = _cidr(block.get("cidr"), f"{path}.ipBlock.cidr")
        out: dict[str, Any] = {"nets": [str(net)]}
        excepts = []
        for i, text in enumerate(_expect_list(block.get("except"), f"{path}.ipBlock.except")):
            where = f"{path}.ipBlock.except[{i}]"
            ex = _cidr(text, where)
            if ex.version != net.version or not ex.subnet_of(net) or ex == net:  # type: ignore[arg-type]
                raise _FieldError(where, f"{ex} must be a strict subset of {net}")
            excepts.append(str(ex))
        if excepts:
            out["notNets"] = excepts
        return out
    has_pods = peer.get("podSelector") is not None
    has_namespaces = peer.get("namespaceSelector") is not None
    if not has_pods and not has_namespaces:
        raise _FieldError(path, "a peer needs podSelector, namespaceSelector or ipBlock")
    out = {}
    if has_pods:
        out["selector"] = pod_selector(peer["podSelector"], f"{path}.podSelector")
    if has_namespaces:
        out["namespaceSelector"] = namespace_selector(peer["namespaceSelector"], f"{path}.namespaceSelector")
    return out


def _port_entries(ports: list[Any], path: str) -> list[tuple[str, list[Any] | None]]:
    """[(protocol, ports or None for all ports)] in first-appearance order of the protocols."""
    groups: dict[str, list[Any] | None] = {}
    for i, entry in enumerate(ports):
        where = f"{path}[{i}]"
        entry = _expect_map(entry, where, ("protocol", "port", "endPort"))
        protocol = entry.get("protocol", "TCP")
        if not isinstance(protocol, str) or protocol.upper() not in PROTOCOLS:
            raise _FieldError(f"{where}.protocol", f"unsupported protocol {_q(protocol)} (TCP, UDP or SCTP)")
        protocol = protocol.upper()
        port = entry.get("port")
        end = entry.get("endPort")
        value: Any
        if port is None:
            if end is not None:
                raise _FieldError(f"{where}.endPort", "needs a numeric port")
            groups[protocol] = None  # every port of this protocol
            continue
        if isinstance(port, bool) or not isinstance(port, (int, str)):
            raise _FieldError(f"{where}.port", f"invalid port {_q(port)}")
        if isinstance(port, int):
            if not 1 <= port <= 65535:
                raise _FieldError(f"{where}.port", f"port {port} is out of range 1..65535")
            value = port
            if end is not None:
                if isinstance(end, bool) or not isinstance(end, int) or not 1 <= end <= 65535:
                    raise _FieldError(f"{where}.endPort", f"invalid endPort {_q(end)}")
                if end < port:
                    raise _FieldError(f"{where}.endPort", f"{end} is below port {port}")
                value = (port, end)
        else:
            if len(port) > 15 or not _PORT_NAME.fullmatch(port) or "--" in port or not re.search("[a-z]", port):
                raise _FieldError(f"{where}.port", f"invalid port name {_q(port)} (IANA service name: "
                                  "1-15 lowercase letters, digits and '-', at least one letter)")
            if end is not None:
                raise _FieldError(f"{where}.endPort", "cannot be used with a named port")
            value = port
        if protocol in groups and groups[protocol] is None:
            continue  # already every port
        groups.setdefault(protocol, []).append(value)  # type: ignore[union-attr]
    return [(proto, None if values is None else _simplify(values)) for proto, values in groups.items()]


def _simplify(values: list[Any]) -> list[Any]:
    """Merge numeric ports and ranges into the fewest ranges (Calico's SimplifyPorts); names kept
    in order after them. Single ports stay ints, ranges become "first:last"."""
    ranges = sorted((v, v) if isinstance(v, int) else v for v in values if not isinstance(v, str))
    merged: list[list[int]] = []
    for first, last in ranges:
        if merged and first <= merged[-1][1] + 1:
            merged[-1][1] = max(merged[-1][1], last)
        else:
            merged.append([first, last])
    out: list[Any] = [a if a == b else f"{a}:{b}" for a, b in merged]
    for v in values:
        if isinstance(v, str) and v not in out:
            out.append(v)
    return out


def _rules(rules: Any, path: str, direction: str) -> list[dict[str, Any]]:
    peers_field, side = ("from", "source") if direction == "ingress" else ("to", "destination")
    out: list[dict[str, Any]] = []
    for i, rule in enumerate(_expect_list(rules, path)):
        where = f"{path}[{i}]"
        rule = _expect_map(rule, where, (peers_field, "ports"))
        peers: list[dict[str, Any]] = [
            _peer(p, f"{where}.{peers_field}[{j}]")
            for j, p in enumerate(_expect_list(rule.get(peers_field), f"{where}.{peers_field}"))
        ] or [{}]  # no peers: any source / destination
        groups: list[tuple[str | None, list[Any] | None]] = list(
            _port_entries(_expect_list(rule.get("ports"), f"{where}.ports"), f"{where}.ports")
        ) or [(None, None)]  # no ports: any port and protocol
        for peer in peers:
            for protocol, ports in groups:
                calico: dict[str, Any] = {"action": "Allow"}
                if protocol is not None:
                    calico["protocol"] = protocol
                entity = dict(peer)
                if direction == "ingress":
                    if entity:
                        calico["source"] = entity
                    if ports:
                        calico["destination"] = {"ports": list(ports)}
                else:
                    if ports:
                        entity["ports"] = list(ports)
                    if entity:
                        calico[side] = entity
                out.append(calico)
    return out


# -- the policy -------------------------------------------------------------------------------------


def calico_name(name: str) -> str:
    """The name kube-controllers gives the Calico copy of Kubernetes policy `name`."""
    return NAME_PREFIX + name


def identity(obj: Mapping[str, Any]) -> tuple[str, str]:
    """(Calico name, namespace) of a Kubernetes NetworkPolicy, for deletes; ValueError if unnamed."""
    meta = obj.get("metadata") if isinstance(obj, Mapping) else None
    name = meta.get("name") if isinstance(meta, Mapping) else None
    if not isinstance(name, str) or not name:
        raise ValueError("NetworkPolicy: metadata.name: required field is missing")
    namespace = meta.get("namespace") if isinstance(meta, Mapping) else None
    return calico_name(name), namespace if isinstance(namespace, str) and namespace else "default"


def is_k8s_networkpolicy(obj: Any) -> bool:
    return isinstance(obj, Mapping) and obj.get("apiVersion") == API_VERSION and obj.get("kind") == "NetworkPolicy"


def convert_k8s_networkpolicy(obj: Mapping[str, Any]) -> dict[str, Any]:
    """The Calico v3 NetworkPolicy resource for a Kubernetes NetworkPolicy; ValueError (one line,
    naming the field) for anything Kubernetes' API server would reject."""
    if not isinstance(obj, Mapping):
        raise ValueError(f"NetworkPolicy: expected an object, got {type(obj).__name__}")
    meta = obj.get("metadata")
    raw_name = meta.get("name") if isinstance(meta, Mapping) else None
    where = f'NetworkPolicy "{raw_name}"' if isinstance(raw_name, str) and raw_name else "NetworkPolicy"
    try:
        return _convert(obj)
    except _FieldError as e:
        raise ValueError(f"{where}: {e}") from None


def _convert(obj: Mapping[str, Any]) -> dict[str, Any]:
    for key in obj:
        if key not in ("apiVersion", "kind", "metadata", "spec", "status"):
            raise _FieldError(str(key), "unknown field")
    if obj.get("apiVersion", API_VERSION) != API_VERSION:
        raise _FieldError("apiVersion", f"expected {API_VERSION}, got {_q(obj.get('apiVersion'))}")
    if obj.get("kind", "NetworkPolicy") != "NetworkPolicy":
        raise _FieldError("kind", f"expected NetworkPolicy, got {_q(obj.get('kind'))}")
    meta = obj.get("metadata")
    if not isinstance(meta, Mapping):
        raise _FieldError("metadata", "required field is missing")
    name = meta.get("name")
    if not isinstance(name, str) or not name:
        raise _FieldError("metadata.name", "required field is missing")
    if len(name) > 253 - len(NAME_PREFIX) or not _DNS1123_SUBDOMAIN.fullmatch(name):
        raise _FieldError("metadata.name", f"invalid name {_q(name)}")
    namespace = meta.get("namespace") or "default"
    if not isinstance(namespace, str) or len(namespace) > 63 or not _DNS1123_LABEL.fullmatch(namespace):
        raise _FieldError("metadata.namespace", f"invalid namespace {_q(namespace)}")

    spec = _expect_map(obj.get("spec"), "spec", ("podSelector", "policyTypes", "ingress", "egress"))
    types = _expect_list(spec.get("policyTypes"), "spec.policyTypes")
    for i, t in enumerate(types):
        if t not in ("Ingress", "Egress"):
            raise _FieldError(f"spec.policyTypes[{i}]", f"invalid policy type {_q(t)} (Ingress or Egress)")
    if len(set(types)) != len(types):
        raise _FieldError("spec.policyTypes", "contains duplicates")
    ingress = _rules(spec.get("ingress"), "spec.ingress", "ingress")
    egress = _rules(spec.get("egress"), "spec.egress", "egress")
    if not types:
        # The API server's defaulting: Ingress always, Egress when there are egress rules.
        types = ["Ingress"] + (["Egress"] if spec.get("egress") else [])

    calico_spec: dict[str, Any] = {
        "tier": "default",
        "order": ORDER,
        "selector": pod_selector(spec.get("podSelector"), "spec.podSelector"),
        "types": [t for t in ("Ingress", "Egress") if t in types],
    }
    if "Ingress" in types:
        calico_spec["ingress"] = ingress
    if "Egress" in types:
        calico_spec["egress"] = egress
    calico_meta: dict[str, Any] = {"name": calico_name(name), "namespace": namespace}
    if isinstance(meta.get("uid"), str):
        calico_meta["uid"] = meta["uid"]
    return {"apiVersion": CALICO_API_VERSION, "kind": "NetworkPolicy", "metadata": calico_meta, "spec": calico_spec}
