"""The policy model: what a network policy means, independent of where it came from.

Kubernetes NetworkPolicies are first converted to Calico NetworkPolicy resources (policy/k8s.py,
as Calico's kube-controllers store them), and every Calico NetworkPolicy / GlobalNetworkPolicy /
namespace Profile resource becomes these values (policy/calico.py). Everything downstream — the
iptables renderer (policy/render.py), the agent's calculation graph and `felixctl policy explain`
(policy/evaluate.py) — works on this one model, so what explain says is what the kernel does.

Semantics (Calico's, tier "default" only):
* A policy applies to an endpoint when its `selector` matches the endpoint's labels and, for a
  namespaced policy, the endpoint is in the policy's namespace (GlobalNetworkPolicy: its
  `namespace_selector`, when set, must match the endpoint's namespace labels).
* For each direction, the policies that apply to the endpoint run in order (`order` ascending,
  None last, then by id). Inside a policy the first rule that matches decides: Allow accepts,
  Deny drops, Pass skips the remaining policies and goes to the profiles, Log logs and goes on.
* If at least one policy applied in that direction and none decided, the packet is dropped
  ("end of tier"). If no policy applied, the endpoint's profiles decide (the namespace profile
  `kns.<ns>` allows everything: Kubernetes' non-isolated default); no matching profile drops.
* A packet between two endpoints must be allowed by the source's egress AND the destination's
  ingress.

This module is pure: values only, no I/O, no imports from felixpy.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Mapping, Union

Action = Literal["Allow", "Deny", "Log", "Pass"]
Direction = Literal["Ingress", "Egress"]


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


@dataclass(frozen=True, slots=True)
class Policy:
    """A Calico NetworkPolicy (namespace set) or GlobalNetworkPolicy (namespace None)."""

    name: str
    namespace: str | None
    selector: str  # canonical Calico selector over endpoint labels
    types: frozenset[Direction]
    ingress: tuple[Rule, ...] = ()
    egress: tuple[Rule, ...] = ()
    order: float | None = None  # None sorts last
    namespace_selector: str | None = None  # GlobalNetworkPolicy only

    @property
    def id(self) -> str:
        """Unique across kinds: "ns/name" for NetworkPolicy, "name" for GlobalNetworkPolicy."""
        return f"{self.namespace}/{self.name}" if self.namespace is not None else self.name

    def sort_key(self) -> tuple[bool, float, str]:
        return (self.order is None, self.order if self.order is not None else 0.0, self.id)


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
    """A pod as policy sees it: its labels, its namespace's labels, its addresses and ports."""

    namespace: str
    name: str
    labels: tuple[tuple[str, str], ...]
    namespace_labels: tuple[tuple[str, str], ...]
    ips: tuple[str, ...]
    ports: tuple[ContainerPort, ...] = ()
    profiles: tuple[str, ...] = ()

    @property
    def id(self) -> str:
        return f"{self.namespace}/{self.name}"

    def label_map(self) -> Mapping[str, str]:
        return dict(self.labels)

    def namespace_label_map(self) -> Mapping[str, str]:
        return dict(self.namespace_labels)
