"""The policy model: what a network policy means, independent of where it came from.

Kubernetes NetworkPolicies are first converted to Calico NetworkPolicy resources (policy/k8s.py,
as Calico's kube-controllers store them), and every Calico NetworkPolicy / GlobalNetworkPolicy /
Profile / Tier / NetworkSet / GlobalNetworkSet / HostEndpoint / WorkloadEndpoint resource becomes
these values (policy/calico.py). Everything downstream — the iptables renderer (policy/render.py),
the agent's calculation graph and `felixctl policy explain` (policy/evaluate.py) — works on this
one model, so what explain says is what the kernel does.

Semantics (Calico's):
* Selectors see an endpoint's labels as Calico's v1 data model has them: its own labels (pods
  carry projectcalico.org/namespace, orchestrator and serviceaccount), its namespace's labels as
  `pcns.<key>`, its service account's labels as `pcsa.<key>`, and (host endpoints) the
  labelsToApply of its profiles. A policy's namespaceSelector and serviceAccountSelector are
  folded into its `selector` the way libcalico-go does (policy/calico.py).
* A policy applies to an endpoint when its `selector` matches and, for a namespaced policy, the
  endpoint is in the policy's namespace. Workload endpoints get every applicable policy except
  preDNAT and doNotTrack ones (those exist only for host endpoints); host endpoints get normal
  policies on traffic to/from the host, applyOnForward ones on forwarded traffic too, preDNAT
  ones before DNAT (ingress only) and doNotTrack ones before conntrack.
* Policies run tier by tier (Tier.sort_key); a tier no applicable policy belongs to is skipped.
  Inside a tier, policies run in order (`order` ascending, None last, then by id); inside a
  policy the first matching rule decides: Allow accepts, Deny drops, Pass ends the tier and goes
  on with the next tier (or the profiles after the last), Log logs and goes on.
* If a policy of a tier applied in that direction and none decided, the tier's default action
  holds: Deny drops ("end of tier"), Pass goes on to the next tier. If no policy applied at all,
  the endpoint's profiles decide (the namespace profile `kns.<ns>` allows everything:
  Kubernetes' non-isolated default); no matching profile drops.
* A packet between two endpoints must be allowed by the source's egress AND the destination's
  ingress.

This module is pure: values only, no I/O, no imports from felixpy.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Literal, Mapping, Union

Action = Literal["Allow", "Deny", "Log", "Pass"]
Direction = Literal["Ingress", "Egress"]
TierAction = Literal["Deny", "Pass"]
EndpointKind = Literal["workload", "host", "networkset"]

DEFAULT_TIER = "default"
DEFAULT_TIER_ORDER = 1_000_000.0  # Calico's default tier order; a Tier without order gets it too
ALL_INTERFACES = "*"  # a HostEndpoint's interfaceName for every interface of the host


@dataclass(frozen=True, slots=True)
class Tier:
    """A Calico Tier. `exists` False: policies name it but there is no Tier resource (Felix keeps
    enforcing them, in a tier sorted after every existing one, with the Deny default)."""

    name: str
    order: float | None = DEFAULT_TIER_ORDER
    default_action: TierAction = "Deny"
    exists: bool = True

    def sort_key(self) -> tuple[bool, bool, float, str]:
        """Felix's TierLess: existing tiers first, then by order (None last), then by name."""
        return (not self.exists, self.order is None, self.order if self.order is not None else 0.0, self.name)


DEFAULT = Tier(DEFAULT_TIER)


def resolve_tier(name: str, tiers: Mapping[str, Tier]) -> Tier:
    """The Tier a policy names: the stored one, the built-in default tier, or (no Tier resource)
    one that sorts after every existing tier and denies at its end, as Felix treats it."""
    tier = tiers.get(name)
    if tier is not None:
        return tier
    if name == DEFAULT_TIER:
        return DEFAULT
    return Tier(name, None, "Deny", exists=False)


# Calico's default failsafe ports (FelixConfiguration failsafeInboundHostPorts / Outbound):
# (protocol, port) a host endpoint's policy never blocks.
DEFAULT_FAILSAFE_INBOUND: tuple[tuple[str, int], ...] = (
    ("tcp", 22), ("udp", 68), ("tcp", 179), ("tcp", 2379), ("tcp", 2380), ("tcp", 5473),
    ("tcp", 6443), ("tcp", 6666), ("tcp", 6667),
)
DEFAULT_FAILSAFE_OUTBOUND: tuple[tuple[str, int], ...] = (
    ("udp", 53), ("udp", 67), ("tcp", 179), ("tcp", 2379), ("tcp", 2380), ("tcp", 5473),
    ("tcp", 6443), ("tcp", 6666), ("tcp", 6667),
)


@dataclass(frozen=True, slots=True, order=True)
class PortRange:
    first: int
    last: int  # == first for a single port


@dataclass(frozen=True, slots=True, order=True)
class NamedPort:
    """A container port name, resolved per destination endpoint (Kubernetes named ports)."""

    name: str


Port = Union[PortRange, NamedPort]


@dataclass(frozen=True, slots=True, order=True)
class EndpointMatch:
    """Which endpoints a rule's source or destination selects.

    selector:           Calico selector over the endpoint's labels (canonical text; "all()" = any).
    namespace_selector: Calico selector over the endpoint's namespace labels; None = no constraint.
    namespace:          the endpoint must be in exactly this namespace; None = any namespace.
    A namespaced policy's rule with a selector but no namespaceSelector gets namespace = the
    policy's namespace, as in Calico.
    """

    selector: str = "all()"
    namespace_selector: str | None = None
    namespace: str | None = None


@dataclass(frozen=True, slots=True)
class EntityRule:
    """A rule's source or destination. Every field present must match (AND); empty = no constraint."""

    endpoints: EndpointMatch | None = None  # None: any address, pod or not
    not_endpoints: EndpointMatch | None = None  # Calico's notSelector
    nets: tuple[str, ...] = ()  # CIDRs, OR-ed
    not_nets: tuple[str, ...] = ()  # CIDRs, none may match
    ports: tuple[Port, ...] = ()  # OR-ed; only with protocol TCP / UDP / SCTP / UDPLite
    not_ports: tuple[Port, ...] = ()


@dataclass(frozen=True, slots=True)
class ICMPMatch:
    type: int | None = None
    code: int | None = None


@dataclass(frozen=True, slots=True)
class Rule:
    action: Action
    protocol: str | None = None  # "TCP", "UDP", "SCTP", "UDPLite", "ICMP" or a number as text
    not_protocol: str | None = None
    icmp: ICMPMatch | None = None
    not_icmp: ICMPMatch | None = None
    source: EntityRule = field(default_factory=EntityRule)
    destination: EntityRule = field(default_factory=EntityRule)
    ip_version: int | None = None  # Calico's ipVersion: 4 or 6 only, None for both families


@dataclass(frozen=True, slots=True)
class Policy:
    """A Calico NetworkPolicy (namespace set) or GlobalNetworkPolicy (namespace None).

    `selector` is the whole endpoint selector as Felix evaluates it: a GlobalNetworkPolicy's
    namespaceSelector and a policy's serviceAccountSelector are already folded in
    (`namespace_selector` keeps the namespaceSelector as written, for people).
    """

    name: str
    namespace: str | None
    selector: str  # canonical Calico selector over endpoint labels
    types: frozenset[Direction]
    ingress: tuple[Rule, ...] = ()
    egress: tuple[Rule, ...] = ()
    order: float | None = None  # None sorts last
    namespace_selector: str | None = None  # GlobalNetworkPolicy only, as written
    tier: str = DEFAULT_TIER
    pre_dnat: bool = False  # GlobalNetworkPolicy only: host endpoints, mangle PREROUTING
    do_not_track: bool = False  # GlobalNetworkPolicy only: host endpoints, raw table, untracked
    apply_on_forward: bool = False  # GlobalNetworkPolicy only: host endpoints' forwarded traffic

    @property
    def id(self) -> str:
        """Unique across kinds: "ns/name" for NetworkPolicy, "name" for GlobalNetworkPolicy."""
        return f"{self.namespace}/{self.name}" if self.namespace is not None else self.name

    def sort_key(self) -> tuple[bool, float, str]:
        return (self.order is None, self.order if self.order is not None else 0.0, self.id)

    @property
    def for_workloads(self) -> bool:
        """Workload endpoints get every policy but preDNAT and doNotTrack ones (Felix's calc
        hands workloads the "normal" tiers only)."""
        return not (self.pre_dnat or self.do_not_track)


@dataclass(frozen=True, slots=True)
class Profile:
    """A Calico Profile: `kns.<ns>` for Kubernetes namespaces (allow-all rules, namespace labels)."""

    name: str
    ingress: tuple[Rule, ...] = ()
    egress: tuple[Rule, ...] = ()
    labels_to_apply: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True, slots=True)
class ContainerPort:
    """A named container port of an endpoint (WorkloadEndpoint spec.ports)."""

    name: str
    protocol: str  # "TCP" | "UDP" | "SCTP"
    port: int


@dataclass(frozen=True, slots=True)
class Endpoint:
    """Something a selector can pick out, as policy sees it.

    kind "workload": a pod (its namespace's and service account's labels joined in);
    "host": a HostEndpoint (namespace None; ips are its expectedIPs); "networkset": a NetworkSet
    (namespaced) or GlobalNetworkSet (namespace None), whose ips are its nets. Only workload and
    host endpoints are policed; every kind contributes its addresses to the selector ipsets.
    """

    namespace: str | None
    name: str
    labels: tuple[tuple[str, str], ...]
    namespace_labels: tuple[tuple[str, str], ...]
    ips: tuple[str, ...]
    ports: tuple[ContainerPort, ...] = ()
    profiles: tuple[str, ...] = ()
    sa_labels: tuple[tuple[str, str], ...] = ()  # the service account's labels (pcsa.<key>)
    kind: EndpointKind = "workload"
    profile_labels: tuple[tuple[str, str], ...] = ()  # host endpoints: its profiles' labelsToApply
    node: str | None = None  # workload and host endpoints: where they live (explain's paths)
    # Endpoints are dict keys and lru_cache arguments on every selector match of the calc: hashing
    # the nested label tuples each time cost ~2.4 s of a 5,000-endpoint first build. Computed once.
    _hash: int = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_hash", hash(tuple(getattr(self, f.name) for f in fields(self) if f.compare)))

    def __hash__(self) -> int:
        return self._hash

    @property
    def id(self) -> str:
        return f"{self.namespace}/{self.name}" if self.namespace is not None else self.name

    def label_map(self) -> Mapping[str, str]:
        return dict(self.labels)

    def namespace_label_map(self) -> Mapping[str, str]:
        return dict(self.namespace_labels)


@dataclass(frozen=True, slots=True)
class HostEndpoint:
    """A Calico HostEndpoint: the node it belongs to, the interface it governs ("*": all of
    them), and the endpoint selectors and rules see (kind "host")."""

    name: str
    node: str
    iface: str
    endpoint: Endpoint

    @property
    def all_interfaces(self) -> bool:
        return self.iface == ALL_INTERFACES
