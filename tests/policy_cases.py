"""Kubernetes NetworkPolicy semantics as data: a 3-namespace × 3-pod world, policies, and the
reachability each one must produce (modelled on upstream's netpol e2e suite).

The same cases run twice: against the reference evaluator (tests/unit/test_policy_evaluate.py)
and for real in felixpy-lab with TCP/UDP probes (the e2e suite). So everything here is plain data:

* the world: namespaces x, y, z labelled ns=<name> (the lab, like Kubernetes, also gives every
  namespace kubernetes.io/metadata.name=<name>: see namespace_labels()), pods a, b, c in each,
  labelled pod=<name>, serving tcp/80, tcp/81, udp/80, udp/81 under the names serve-80-tcp etc.;
* a Case is a list of Steps. Each Step is a complete desired state: exactly these Kubernetes
  NetworkPolicies exist (earlier ones not listed are deleted), these pods / namespaces carry
  these labels instead of their defaults, and these Expectations hold;
* an Expect is (port, protocol, the set of (src, dst) pod pairs that connect). Pairs are
  "ns/pod" ids, src != dst (a pod reaching itself never leaves its netns);
* policies may name pod addresses, which only exist at run time: "$IP(x/b)" is x/b's address
  and "$NET(x/b,4)" the /4 network containing it; resolve() fills them in.
* dual-stack: every case holds for each family the pods have (the e2e lab is dual-stack). An
  ipBlock written with $IP / $NET means "this pod's address", so with IPv6 addresses given,
  resolve() gives it an IPv6 twin ($IP(x/b)/32 → x/b's IPv6 /128, $NET(x/b,4) → the IPv6 /4
  holding it) and the expectation is the same in both families. "$IP4(x/b)" is the IPv4 address
  only (no twin), for cases about one family's ipBlock not matching the other family: their
  Expects carry a `family`.
"""

from __future__ import annotations

import copy
import ipaddress
import re
from dataclasses import dataclass, field
from typing import Any, Mapping

NAMESPACES = ("x", "y", "z")
PODS = ("a", "b", "c")
ALL_PODS = tuple(f"{ns}/{pod}" for ns in NAMESPACES for pod in PODS)
SERVED = ((80, "tcp"), (81, "tcp"), (80, "udp"), (81, "udp"))
NS_NAME_LABEL = "kubernetes.io/metadata.name"

TCP80 = ((80, "tcp"),)
ALL_PROBES = SERVED


def port_name(port: int, protocol: str) -> str:
    return f"serve-{port}-{protocol}"


def default_pod_labels(pod_id: str) -> dict[str, str]:
    return {"pod": pod_id.split("/")[1]}


def default_namespace_labels(ns: str) -> dict[str, str]:
    return {"ns": ns}


def namespace_labels(ns: str, labels: Mapping[str, str]) -> dict[str, str]:
    """The labels a namespace really carries: Kubernetes adds kubernetes.io/metadata.name."""
    return {**labels, NS_NAME_LABEL: ns}


# -- expectations ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Expect:
    port: int
    protocol: str  # "tcp" | "udp"
    allowed: frozenset[tuple[str, str]]
    family: int | None = None  # 4 or 6: holds for that IP family only; None: for every family

    def is_allowed(self, src: str, dst: str) -> bool:
        return (src, dst) in self.allowed


@dataclass(frozen=True)
class Step:
    policies: tuple[dict[str, Any], ...]
    expect: tuple[Expect, ...]
    pod_labels: Mapping[str, Mapping[str, str]] = field(default_factory=dict)  # pod id -> all its labels
    namespace_labels: Mapping[str, Mapping[str, str]] = field(default_factory=dict)  # ns -> its labels
    note: str = ""

    def labels_of_pod(self, pod_id: str) -> dict[str, str]:
        return dict(self.pod_labels.get(pod_id, default_pod_labels(pod_id)))

    def labels_of_namespace(self, ns: str) -> dict[str, str]:
        return namespace_labels(ns, self.namespace_labels.get(ns, default_namespace_labels(ns)))


@dataclass(frozen=True)
class Case:
    name: str
    steps: tuple[Step, ...]


def _matches(pattern: str, pod_id: str) -> bool:
    ns, _, pod = pattern.partition("/")
    pns, _, ppod = pod_id.partition("/")
    return ns in ("*", pns) and pod in ("*", ppod)


class Reachability:
    """Upstream's reachability matrix: a default, then overrides by "ns/pod" patterns ("*" ok)."""

    def __init__(self, default: bool) -> None:
        self.matrix = {(s, d): default for s in ALL_PODS for d in ALL_PODS if s != d}

    def peer(self, src: str, dst: str, allowed: bool) -> "Reachability":
        for s, d in self.matrix:
            if _matches(src, s) and _matches(dst, d):
                self.matrix[(s, d)] = allowed
        return self

    def ingress(self, dst: str, allowed: bool) -> "Reachability":
        return self.peer("*/*", dst, allowed)

    def egress(self, src: str, allowed: bool) -> "Reachability":
        return self.peer(src, "*/*", allowed)

    def allowed(self) -> frozenset[tuple[str, str]]:
        return frozenset(pair for pair, ok in self.matrix.items() if ok)


def expect(reach: Reachability, probes: tuple[tuple[int, str], ...] = TCP80,
           family: int | None = None) -> tuple[Expect, ...]:
    allowed = reach.allowed()
    return tuple(Expect(port, proto, allowed, family) for port, proto in probes)


def expect_each(**by_probe: Reachability) -> tuple[Expect, ...]:
    """expect_each(tcp80=R1, udp81=R2, ...): a different matrix per probe."""
    out = []
    for key, reach in by_probe.items():
        m = re.fullmatch(r"(tcp|udp)(\d+)", key)
        assert m, key
        out.append(Expect(int(m.group(2)), m.group(1), reach.allowed()))
    return tuple(out)


def everyone() -> Reachability:
    return Reachability(True)


# -- policies ----------------------------------------------------------------------------------------


def np(name: str, ns: str, spec: dict[str, Any]) -> dict[str, Any]:
    return {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
            "metadata": {"name": name, "namespace": ns}, "spec": spec}


def pods(**labels: str) -> dict[str, Any]:
    return {"matchLabels": dict(labels)}


ANY: dict[str, Any] = {}


def deny_all_ingress(ns: str, name: str = "deny-all-ingress") -> dict[str, Any]:
    return np(name, ns, {"podSelector": ANY, "policyTypes": ["Ingress"]})


def deny_all_egress(ns: str, name: str = "deny-all-egress") -> dict[str, Any]:
    return np(name, ns, {"podSelector": ANY, "policyTypes": ["Egress"]})


_PLACEHOLDER = re.compile(r"\$(IP4|IP|NET)\(([a-z0-9-]+/[a-z0-9-]+)(?:,(\d+))?\)")


def _resolved(text: str, ips: Mapping[str, str]) -> str:
    def sub(m: re.Match[str]) -> str:
        ip = ips[m.group(2)]
        if m.group(1) in ("IP", "IP4"):
            return ip
        return str(ipaddress.ip_network(f"{ip}/{m.group(3)}", strict=False))

    return _PLACEHOLDER.sub(sub, text)


def _v6_twin(peer: dict[str, Any], ips6: Mapping[str, str]) -> dict[str, Any] | None:
    """The IPv6 twin of an ipBlock peer that names pod addresses with $IP / $NET (None: none)."""
    block = peer.get("ipBlock")
    if not isinstance(block, dict):
        return None
    texts = [str(block.get("cidr", "")), *map(str, block.get("except", []))]
    if "$IP4(" in " ".join(texts) or not any("$" in t for t in texts):
        return None

    def v6(text: str) -> str:
        return _resolved(text.replace(")/32", ")/128"), ips6)

    twin: dict[str, Any] = {"cidr": v6(str(block["cidr"]))}
    if "except" in block:
        twin["except"] = [v6(str(t)) for t in block["except"]]
    return {**copy.deepcopy(peer), "ipBlock": twin}


def resolve(obj: Any, ips: Mapping[str, str], ips6: Mapping[str, str] | None = None) -> Any:
    """A copy of obj with $IP(ns/pod) and $NET(ns/pod,prefix) replaced using pod addresses; with
    `ips6` (the pods' IPv6 addresses) each ipBlock peer naming pods also gets its IPv6 twin."""
    if isinstance(obj, dict):
        return {k: resolve(v, ips, ips6) for k, v in obj.items()}
    if isinstance(obj, list):
        out = []
        for v in obj:
            out.append(resolve(v, ips, ips6))
            twin = _v6_twin(v, ips6) if ips6 is not None and isinstance(v, dict) else None
            if twin is not None:
                out.append(twin)
        return out
    if isinstance(obj, str):
        return _resolved(obj, ips)
    return copy.deepcopy(obj)


# -- the cases ---------------------------------------------------------------------------------------

CASES: list[Case] = []


def case(name: str, *steps: Step) -> None:
    CASES.append(Case(name, tuple(steps)))


def one(name: str, policies: list[dict[str, Any]], expectations: tuple[Expect, ...], **kw: Any) -> None:
    case(name, Step(tuple(policies), expectations, **kw))


# No policy: everything connects, on every port and protocol.
one("no-policy-allows-all", [], expect(everyone(), ALL_PROBES))

# Isolation.
one("default-deny-ingress", [deny_all_ingress("x")],
    expect(everyone().ingress("x/*", False), ALL_PROBES))
one("default-deny-egress", [deny_all_egress("x")],
    expect(everyone().egress("x/*", False), ALL_PROBES))
one("default-deny-all", [np("deny-all", "x", {"podSelector": ANY, "policyTypes": ["Ingress", "Egress"]})],
    expect(everyone().ingress("x/*", False).egress("x/*", False), ALL_PROBES))
one("empty-ingress-list-denies-ingress",
    [np("deny-a", "x", {"podSelector": pods(pod="a"), "policyTypes": ["Ingress"], "ingress": []})],
    expect(everyone().ingress("x/a", False)))
one("allow-all-ingress-empty-rule",
    [deny_all_ingress("x"), np("allow-all", "x", {"podSelector": ANY, "ingress": [{}]})],
    expect(everyone(), ALL_PROBES))
one("allow-all-egress-empty-rule",
    [deny_all_egress("x"), np("allow-all", "x", {"podSelector": ANY, "policyTypes": ["Egress"], "egress": [{}]})],
    expect(everyone(), ALL_PROBES))
one("allow-all-ingress-empty-from-list",
    [np("allow-from-all", "x", {"podSelector": pods(pod="a"), "ingress": [{"from": [], "ports": [{"port": 80}]}]})],
    expect_each(tcp80=everyone(), tcp81=everyone().ingress("x/a", False)))

# policyTypes defaulting: absent = Ingress, plus Egress when egress rules exist.
one("policytypes-absent-with-egress-rules-isolates-both",
    [np("egress-to-b", "x", {"podSelector": pods(pod="a"), "egress": [{"to": [{"podSelector": pods(pod="b")}]}]})],
    expect(everyone().ingress("x/a", False).egress("x/a", False).peer("x/a", "x/b", True)))
one("policytypes-absent-empty-egress-list-isolates-ingress-only",
    [np("only-ingress", "x", {"podSelector": pods(pod="a"), "egress": []})],
    expect(everyone().ingress("x/a", False)))
one("policytypes-egress-ignores-ingress-rules",
    [np("egress-only", "x", {"podSelector": pods(pod="a"), "policyTypes": ["Egress"],
                             "ingress": [{"from": [{"podSelector": pods(pod="b")}]}]})],
    expect(everyone().egress("x/a", False)))
one("policytypes-ingress-ignores-egress-rules",
    [np("ingress-only", "x", {"podSelector": pods(pod="a"), "policyTypes": ["Ingress"],
                              "egress": [{"to": [{"podSelector": pods(pod="b")}]}]})],
    expect(everyone().ingress("x/a", False)))

# Peers: pod selector, namespace selector, AND within one peer, OR across peers.
one("ingress-from-pod-selector-same-namespace",
    [np("allow-b", "x", {"podSelector": pods(pod="a"), "ingress": [{"from": [{"podSelector": pods(pod="b")}]}]})],
    expect(everyone().ingress("x/a", False).peer("x/b", "x/a", True)))
one("ingress-from-empty-pod-selector-means-own-namespace",
    [np("allow-ns", "x", {"podSelector": pods(pod="a"), "ingress": [{"from": [{"podSelector": ANY}]}]})],
    expect(everyone().ingress("x/a", False).peer("x/*", "x/a", True)))
one("ingress-from-namespace-selector",
    [np("allow-y", "x", {"podSelector": pods(pod="a"), "ingress": [{"from": [{"namespaceSelector": pods(ns="y")}]}]})],
    expect(everyone().ingress("x/a", False).peer("y/*", "x/a", True)))
one("ingress-from-namespace-by-metadata-name",
    [np("allow-z", "x", {"podSelector": ANY, "ingress": [
        {"from": [{"namespaceSelector": {"matchLabels": {NS_NAME_LABEL: "z"}}}]}]})],
    expect(everyone().ingress("x/*", False).peer("z/*", "x/*", True)))
one("ingress-from-all-namespaces-empty-namespace-selector",
    [deny_all_ingress("x"),
     np("allow-all-ns", "x", {"podSelector": pods(pod="a"), "ingress": [{"from": [{"namespaceSelector": ANY}]}]})],
    expect(everyone().ingress("x/*", False).ingress("x/a", True)))
one("ingress-from-pod-in-any-namespace",
    [np("allow-b-anywhere", "x", {"podSelector": pods(pod="a"), "ingress": [
        {"from": [{"namespaceSelector": ANY, "podSelector": pods(pod="b")}]}]})],
    expect(everyone().ingress("x/a", False).peer("*/b", "x/a", True)))
one("ingress-namespace-and-pod-selector-in-one-peer-is-and",
    [np("allow-yb", "x", {"podSelector": pods(pod="a"), "ingress": [
        {"from": [{"namespaceSelector": pods(ns="y"), "podSelector": pods(pod="b")}]}]})],
    expect(everyone().ingress("x/a", False).peer("y/b", "x/a", True)))
one("ingress-namespace-or-pod-selector-in-two-peers-is-or",
    [np("allow-y-or-b", "x", {"podSelector": pods(pod="a"), "ingress": [
        {"from": [{"namespaceSelector": pods(ns="y")}, {"podSelector": pods(pod="b")}]}]})],
    expect(everyone().ingress("x/a", False).peer("y/*", "x/a", True).peer("x/b", "x/a", True)))
one("ingress-two-rules-are-or",
    [np("two-rules", "x", {"podSelector": pods(pod="a"), "ingress": [
        {"from": [{"podSelector": pods(pod="b")}]}, {"from": [{"namespaceSelector": pods(ns="z")}]}]})],
    expect(everyone().ingress("x/a", False).peer("x/b", "x/a", True).peer("z/*", "x/a", True)))

# matchExpressions.
one("match-expressions-namespace-not-in",
    [np("not-from-x", "x", {"podSelector": pods(pod="a"), "ingress": [{"from": [{"namespaceSelector": {
        "matchExpressions": [{"key": "ns", "operator": "NotIn", "values": ["x"]}]}}]}]})],
    expect(everyone().ingress("x/a", False).peer("y/*", "x/a", True).peer("z/*", "x/a", True)))
one("match-expressions-pod-in",
    [np("from-b-or-c", "x", {"podSelector": pods(pod="a"), "ingress": [{"from": [{"podSelector": {
        "matchExpressions": [{"key": "pod", "operator": "In", "values": ["b", "c"]}]}}]}]})],
    expect(everyone().ingress("x/a", False).peer("x/b", "x/a", True).peer("x/c", "x/a", True)))
one("match-expressions-pod-selector-of-policy",
    [np("isolate-not-a", "x", {"podSelector": {"matchExpressions": [
        {"key": "pod", "operator": "NotIn", "values": ["a"]}]}, "policyTypes": ["Ingress"]})],
    expect(everyone().ingress("x/b", False).ingress("x/c", False)))
one("match-expressions-exists",
    [np("from-labelled", "x", {"podSelector": pods(pod="a"), "ingress": [{"from": [
        {"namespaceSelector": ANY, "podSelector": {"matchExpressions": [{"key": "pod", "operator": "Exists"}]}}]}]})],
    expect(everyone()))
one("match-expressions-does-not-exist",
    [np("from-unlabelled", "x", {"podSelector": pods(pod="a"), "ingress": [{"from": [
        {"namespaceSelector": ANY,
         "podSelector": {"matchExpressions": [{"key": "pod", "operator": "DoesNotExist"}]}}]}]})],
    expect(everyone().ingress("x/a", False)))
one("match-labels-and-expressions-combined",
    [np("combined", "x", {"podSelector": pods(pod="a"), "ingress": [{"from": [{"namespaceSelector": {
        "matchLabels": {"ns": "y"}, "matchExpressions": [{"key": "ns", "operator": "In", "values": ["y", "z"]}]}}]}]})],
    expect(everyone().ingress("x/a", False).peer("y/*", "x/a", True)))

# Ports.
one("ingress-port-number",
    [np("allow-81", "x", {"podSelector": pods(pod="a"), "ingress": [{"ports": [{"port": 81}]}]})],
    expect_each(tcp80=everyone().ingress("x/a", False), tcp81=everyone(),
                udp80=everyone().ingress("x/a", False), udp81=everyone().ingress("x/a", False)))
one("ingress-named-port",
    [np("allow-named-81", "x", {"podSelector": ANY, "ingress": [{"ports": [{"port": "serve-81-tcp"}]}]})],
    expect_each(tcp80=everyone().ingress("x/*", False), tcp81=everyone(), udp81=everyone().ingress("x/*", False)))
one("ingress-named-port-udp",
    [np("allow-named-udp-80", "x", {"podSelector": ANY, "ingress": [
        {"ports": [{"protocol": "UDP", "port": "serve-80-udp"}]}]})],
    expect_each(udp80=everyone(), udp81=everyone().ingress("x/*", False), tcp80=everyone().ingress("x/*", False)))
one("ingress-named-port-from-namespace",
    [np("named-from-y", "x", {"podSelector": ANY, "ingress": [
        {"from": [{"namespaceSelector": pods(ns="y")}], "ports": [{"port": "serve-80-tcp"}]}]})],
    expect_each(tcp80=everyone().ingress("x/*", False).peer("y/*", "x/*", True),
                tcp81=everyone().ingress("x/*", False)))
one("ingress-end-port-range",
    [np("range-80-81", "x", {"podSelector": ANY, "ingress": [{"ports": [{"port": 80, "endPort": 81}]}]})],
    expect_each(tcp80=everyone(), tcp81=everyone(), udp80=everyone().ingress("x/*", False)))
one("ingress-end-port-range-excludes-below",
    [np("range-81-90", "x", {"podSelector": ANY, "ingress": [{"ports": [{"port": 81, "endPort": 90}]}]})],
    expect_each(tcp80=everyone().ingress("x/*", False), tcp81=everyone()))
one("ingress-protocol-without-port-allows-every-port",
    [np("all-tcp", "x", {"podSelector": ANY, "ingress": [{"ports": [{"protocol": "TCP"}]}]})],
    expect_each(tcp80=everyone(), tcp81=everyone(), udp80=everyone().ingress("x/*", False),
                udp81=everyone().ingress("x/*", False)))
one("udp-only-policy-does-not-open-tcp",
    [deny_all_ingress("x"), np("allow-udp", "x", {"podSelector": ANY, "ingress": [{"ports": [{"protocol": "UDP"}]}]})],
    expect_each(udp80=everyone(), udp81=everyone(), tcp80=everyone().ingress("x/*", False),
                tcp81=everyone().ingress("x/*", False)))
one("udp-port-policy-opens-only-that-udp-port",
    [np("udp-81", "x", {"podSelector": ANY, "ingress": [{"ports": [{"protocol": "UDP", "port": 81}]}]})],
    expect_each(udp81=everyone(), udp80=everyone().ingress("x/*", False), tcp81=everyone().ingress("x/*", False)))
one("sctp-only-policy-does-not-open-tcp-or-udp",
    [np("allow-sctp", "x", {"podSelector": ANY, "ingress": [{"ports": [{"protocol": "SCTP", "port": 80}]}]})],
    expect_each(tcp80=everyone().ingress("x/*", False), udp80=everyone().ingress("x/*", False)))
one("ports-of-several-protocols-in-one-rule",
    [np("tcp80-udp81", "x", {"podSelector": ANY, "ingress": [
        {"ports": [{"protocol": "TCP", "port": 80}, {"protocol": "UDP", "port": 81}]}]})],
    expect_each(tcp80=everyone(), udp81=everyone(), tcp81=everyone().ingress("x/*", False),
                udp80=everyone().ingress("x/*", False)))

# Egress.
one("egress-to-pod-selector",
    [np("egress-to-b", "x", {"podSelector": pods(pod="a"), "policyTypes": ["Egress"],
                             "egress": [{"to": [{"podSelector": pods(pod="b")}]}]})],
    expect(everyone().egress("x/a", False).peer("x/a", "x/b", True)))
one("egress-to-namespace",
    [np("egress-to-y", "x", {"podSelector": pods(pod="a"), "policyTypes": ["Egress"],
                             "egress": [{"to": [{"namespaceSelector": pods(ns="y")}]}]})],
    expect(everyone().egress("x/a", False).peer("x/a", "y/*", True)))
one("egress-to-pod-in-other-namespace-and",
    [np("egress-to-zc", "x", {"podSelector": pods(pod="a"), "policyTypes": ["Egress"], "egress": [
        {"to": [{"namespaceSelector": pods(ns="z"), "podSelector": pods(pod="c")}]}]})],
    expect(everyone().egress("x/a", False).peer("x/a", "z/c", True)))
one("egress-named-port-resolves-on-destination",
    [np("egress-named", "x", {"podSelector": pods(pod="a"), "policyTypes": ["Egress"],
                              "egress": [{"ports": [{"port": "serve-80-tcp"}]}]})],
    expect_each(tcp80=everyone(), tcp81=everyone().egress("x/a", False), udp80=everyone().egress("x/a", False)))
one("egress-port-and-namespace",
    [np("egress-y-81", "x", {"podSelector": ANY, "policyTypes": ["Egress"], "egress": [
        {"to": [{"namespaceSelector": pods(ns="y")}], "ports": [{"port": 81}]}]})],
    expect_each(tcp80=everyone().egress("x/*", False), tcp81=everyone().egress("x/*", False).peer("x/*", "y/*", True)))
one("egress-and-ingress-both-required-across-namespaces",
    [np("egress-to-y", "x", {"podSelector": pods(pod="a"), "policyTypes": ["Egress"],
                             "egress": [{"to": [{"namespaceSelector": pods(ns="y")}]}]}),
     deny_all_ingress("y")],
    expect(everyone().egress("x/a", False).ingress("y/*", False)))
one("egress-and-ingress-both-allow-across-namespaces",
    [np("egress-to-yb", "x", {"podSelector": pods(pod="a"), "policyTypes": ["Egress"], "egress": [
        {"to": [{"namespaceSelector": pods(ns="y"), "podSelector": pods(pod="b")}]}]}),
     np("ingress-from-xa", "y", {"podSelector": pods(pod="b"), "ingress": [
         {"from": [{"namespaceSelector": pods(ns="x"), "podSelector": pods(pod="a")}]}]})],
    expect(everyone().egress("x/a", False).ingress("y/b", False).peer("x/a", "y/b", True)))

# ipBlock: any address in the range, pods included, minus except.
one("egress-to-ip-block",
    [np("egress-ipblock", "x", {"podSelector": pods(pod="a"), "policyTypes": ["Egress"],
                                "egress": [{"to": [{"ipBlock": {"cidr": "$IP(x/b)/32"}}]}]})],
    expect(everyone().egress("x/a", False).peer("x/a", "x/b", True)))
one("egress-to-ip-block-except",
    [np("egress-except", "x", {"podSelector": pods(pod="a"), "policyTypes": ["Egress"], "egress": [
        {"to": [{"ipBlock": {"cidr": "$NET(x/b,4)", "except": ["$IP(x/b)/32"]}}]}]})],
    expect(everyone().peer("x/a", "x/b", False)))
one("ip-block-except-overlap-union-allows",
    [np("egress-except", "x", {"podSelector": pods(pod="a"), "policyTypes": ["Egress"], "egress": [
        {"to": [{"ipBlock": {"cidr": "$NET(x/b,4)", "except": ["$IP(x/b)/32"]}}]}]}),
     np("egress-b", "x", {"podSelector": pods(pod="a"), "policyTypes": ["Egress"],
                          "egress": [{"to": [{"ipBlock": {"cidr": "$IP(x/b)/32"}}]}]})],
    expect(everyone()))
one("ingress-from-ip-block",
    [np("ingress-ipblock", "x", {"podSelector": pods(pod="a"),
                                 "ingress": [{"from": [{"ipBlock": {"cidr": "$IP(y/b)/32"}}]}]})],
    expect(everyone().ingress("x/a", False).peer("y/b", "x/a", True)))
one("ingress-from-ip-block-except",
    [np("ingress-except", "x", {"podSelector": pods(pod="a"), "ingress": [
        {"from": [{"ipBlock": {"cidr": "$NET(y/b,4)", "except": ["$IP(y/b)/32"]}}]}]})],
    expect(everyone().peer("y/b", "x/a", False)))
# One family's ipBlock says nothing about the other family's traffic (Felix renders the rule for
# its own family only): x/a may reach x/b's IPv4 address and nothing over IPv6.
case("ip-block-of-one-family-does-not-match-the-other",
     Step((np("egress-ipv4-only", "x", {"podSelector": pods(pod="a"), "policyTypes": ["Egress"],
                                       "egress": [{"to": [{"ipBlock": {"cidr": "$IP4(x/b)/32"}}]}]}),),
          (*expect(everyone().egress("x/a", False).peer("x/a", "x/b", True), family=4),
           *expect(everyone().egress("x/a", False), family=6))))
one("ip-block-with-port",
    [np("ipblock-81", "x", {"podSelector": pods(pod="a"), "ingress": [
        {"from": [{"ipBlock": {"cidr": "$NET(y/b,4)"}}], "ports": [{"port": 81}]}]})],
    expect_each(tcp80=everyone().ingress("x/a", False), tcp81=everyone()))

# Several policies are a union; a policy on other pods does not matter.
one("several-policies-union",
    [np("from-b", "x", {"podSelector": pods(pod="a"), "ingress": [{"from": [{"podSelector": pods(pod="b")}]}]}),
     np("from-y", "x", {"podSelector": pods(pod="a"), "ingress": [{"from": [{"namespaceSelector": pods(ns="y")}]}]})],
    expect(everyone().ingress("x/a", False).peer("x/b", "x/a", True).peer("y/*", "x/a", True)))
one("deny-all-plus-allow-is-allow",
    [deny_all_ingress("x"),
     np("from-z", "x", {"podSelector": pods(pod="c"), "ingress": [{"from": [{"namespaceSelector": pods(ns="z")}]}]})],
    expect(everyone().ingress("x/*", False).peer("z/*", "x/c", True)))
one("policy-in-other-namespace-does-not-select",
    [np("deny-a-in-y", "y", {"podSelector": pods(pod="a"), "policyTypes": ["Ingress"]})],
    expect(everyone().ingress("y/a", False)))

# Changes over time: policy update and delete, pod and namespace label changes.
_FROM_B = np("from-peer", "x", {"podSelector": pods(pod="a"), "ingress": [{"from": [{"podSelector": pods(pod="b")}]}]})
_FROM_C = np("from-peer", "x", {"podSelector": pods(pod="a"), "ingress": [{"from": [{"podSelector": pods(pod="c")}]}]})
case("policy-update",
     Step((_FROM_B,), expect(everyone().ingress("x/a", False).peer("x/b", "x/a", True))),
     Step((_FROM_C,), expect(everyone().ingress("x/a", False).peer("x/c", "x/a", True))))
case("policy-delete",
     Step((deny_all_ingress("x"),), expect(everyone().ingress("x/*", False))),
     Step((), expect(everyone())))
_FROM_CLIENT = np("from-client", "x", {"podSelector": pods(pod="a"), "ingress": [
    {"from": [{"namespaceSelector": ANY, "podSelector": pods(role="client")}]}]})
case("pod-label-added-moves-pod-into-peer",
     Step((_FROM_CLIENT,), expect(everyone().ingress("x/a", False))),
     Step((_FROM_CLIENT,), expect(everyone().ingress("x/a", False).peer("y/b", "x/a", True)),
          pod_labels={"y/b": {"pod": "b", "role": "client"}}),
     Step((_FROM_CLIENT,), expect(everyone().ingress("x/a", False))))
_FROM_TEAM = np("from-team", "x", {"podSelector": pods(pod="a"), "ingress": [
    {"from": [{"namespaceSelector": pods(team="blue")}]}]})
case("namespace-label-added-moves-namespace-into-peer",
     Step((_FROM_TEAM,), expect(everyone().ingress("x/a", False))),
     Step((_FROM_TEAM,), expect(everyone().ingress("x/a", False).peer("z/*", "x/a", True)),
          namespace_labels={"z": {"ns": "z", "team": "blue"}}))
_ISOLATE_A = np("isolate-a", "x", {"podSelector": pods(pod="a"), "policyTypes": ["Ingress"]})
case("pod-label-change-moves-pod-out-of-policy",
     Step((_ISOLATE_A,), expect(everyone().ingress("x/a", False))),
     Step((_ISOLATE_A,), expect(everyone()), pod_labels={"x/a": {"pod": "a2"}}),
     Step((_ISOLATE_A,), expect(everyone().ingress("x/a", False))))


def by_name(name: str) -> Case:
    for c in CASES:
        if c.name == name:
            return c
    raise KeyError(name)


def checks(c: Case) -> list[tuple[int, Step, Expect, str, str, bool]]:
    """Every (step index, step, expectation, src, dst, allowed) of a case, for parametrised tests."""
    out = []
    for i, step in enumerate(c.steps):
        for exp in step.expect:
            for src in ALL_PODS:
                for dst in ALL_PODS:
                    if src != dst:
                        out.append((i, step, exp, src, dst, exp.is_allowed(src, dst)))
    return out

