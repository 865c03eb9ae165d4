"""The policy part of the calculation graph: datastore updates in, the node's policy tables out.

Registered with the same dispatcher as calc/graph.py (calc/dispatcher.py), which hands it
decoded WorkloadEndpoints of ALL nodes, NetworkSets, GlobalNetworkSets and HostEndpoints of all
nodes (ipset members are cluster-wide), Profiles (`kns.<ns>` carries the namespace's labels,
`ksa.<ns>.<sa>` the service account's), Tiers, NetworkPolicies and GlobalNetworkPolicies. It
produces:

  * for each LOCAL workload endpoint (spec.node == this node) its tiers of ordered ingress /
    egress policy ids and its existing profiles (`render.EndpointChains`); preDNAT and
    doNotTrack policies never apply to workloads;
  * for each active LOCAL host endpoint its normal, applyOnForward, preDNAT and doNotTrack tiers
    and profiles (`render.HostEndpointChains`); one host endpoint per interface (the first by
    name, as Felix resolves them), one `*` host endpoint at most;
  * the active policies (those that apply to at least one local endpoint) and active profiles;
  * the ipsets the active policies reference, with their members: the addresses of the
    workloads, network sets (their nets) and host endpoints (their expectedIPs) they select;
  * all of it rendered as iptables chains of the filter, mangle and raw tables
    (`filter_state()`, a messages.FilterState), for the PolicyManager; with `ipv6` the same for
    ip6tables too (`filter_state(6)`): the endpoint, dispatch and host endpoint chains are the
    same objects in both families, the policy and profile chains are rendered per family (a
    rule of the other family renders nothing), and every selector set exists once per family
    (`cali40…` with the members' IPv4 addresses, `cali60…` with their IPv6 ones).

Synchronous, no I/O. It is incremental because the agent must follow one policy change within
~100 ms at 1,000 local endpoints and 500 policies (kube-router's full rebuild per change is what
we must not be):

  * an endpoint update matches that endpoint against its namespace's and the global policies;
  * a policy update matches that policy against the local endpoints of its namespace (all of
    them for a GlobalNetworkPolicy);
  * a namespace or service account label change re-matches the members of that namespace or
    service account only; a profile's labelsToApply change the host endpoints that list it;
  * ipset members are kept per (set, member) so an update touches only that member's
    contribution, and a set is computed over all members only when it first becomes active;
  * a Tier change re-orders the chains of the local endpoints (tiers change rarely);
  * rendering is memoised by value (a Policy, a Profile, an EndpointChains, the interface set),
    so unchanged chains are the very same objects and the manager diffs them by identity.

An invalid resource arrives as a deletion (calc/updates.py decides and logs it); an endpoint
whose interface name cannot carry a chain is left out and fails closed.
The invariant (checked by tests/unit/test_calc_policy.py): `filter_state()` equals
`render.render_filter_table()` over the same index.
"""

from __future__ import annotations

import functools
import logging
from collections import Counter
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, Callable, Iterable, Mapping, TypeVar

from felixpy.calc.updates import (NAMESPACE_PROFILE_PREFIX, IPPool, Kind, NamedProfile, Node, Update,
                                  WorkloadEndpoint, service_account_of_profile, with_namespace_labels)
from felixpy.messages import FilterState, IPSetState, TableState
from policy import calico, evaluate, render
from policy import ipsets as policy_ipsets
from policy.iptables import Chain
from policy.model import ALL_INTERFACES, Endpoint, EndpointMatch, HostEndpoint, Policy, Profile, Tier

if TYPE_CHECKING:
    from felixpy.calc.dispatcher import Dispatcher

log = logging.getLogger(__name__)

TABLES = ("filter", "mangle", "raw")
_HostDispatchMemo = tuple[tuple[render.HostEndpointChains, ...], dict[str, render.TableChains]]


def _profile_ref(name: str) -> str:
    """The reference key of a profile among the policy ids that hold ipsets (cannot clash)."""
    return "\x00profile:" + name


@dataclass(frozen=True, slots=True)
class _Member:
    """Something selectors pick out: a workload, a network set or a host endpoint."""

    key: str
    kind: Kind
    raw: Endpoint  # as decoded, without the labels joined in from namespaces, accounts, profiles
    endpoint: Endpoint  # as policy matches it
    iface: str = ""  # workloads: the veth; host endpoints: the interface or "*"
    node: str | None = None  # workloads and host endpoints

    @property
    def namespace(self) -> str | None:
        return self.raw.namespace

    @property
    def service_account(self) -> tuple[str, str] | None:
        account = dict(self.raw.labels).get(calico.SERVICE_ACCOUNT_LABEL)
        if self.kind is not Kind.WORKLOAD_ENDPOINT or account is None or self.raw.namespace is None:
            return None
        return (self.raw.namespace, account)


def _tiers_of(policies: Iterable[Policy], tiers: Mapping[str, Tier]) -> render.Tiers:
    return tuple(
        render.TierPolicies(
            tier.name, tier.default_action,
            tuple(p.id for p in group if "Ingress" in p.types),
            tuple(p.id for p in group if "Egress" in p.types),
        )
        for tier, group in evaluate.tiered(policies, tiers)
    )


class PolicyCalc:
    """See the module docstring. `on_update` indexes; the output methods flush lazily."""

    def __init__(self, node_name: str, config: render.RenderConfig | None = None, *, ipv6: bool = False) -> None:
        self.node_name = node_name
        self.config = config or render.RenderConfig()
        # The IP families rendered: IPv6 only with Felix's Ipv6Support.
        self.families: tuple[int, ...] = (4, 6) if ipv6 else (4,)
        self.dirty = True
        # -- the index
        self._members: dict[str, _Member] = {}  # key -> workload / network set / host endpoint (all nodes)
        self._ns_members: dict[str, set[str]] = {}  # namespace -> member keys
        self._sa_members: dict[tuple[str, str], set[str]] = {}  # (namespace, account) -> workload keys
        self._profile_heps: dict[str, set[str]] = {}  # profile -> host endpoint keys listing it
        self._local_heps: dict[str, dict[str, str]] = {}  # interface -> this node's host endpoints (key -> name)
        self._profiles: dict[str, Profile] = {calico.DEFAULT_ALLOW_PROFILE: calico.DEFAULT_ALLOW}
        self._ns_labels: dict[str, dict[str, str]] = {}  # from the kns.<ns> profiles
        self._sa_labels: dict[tuple[str, str], dict[str, str]] = {}  # from the ksa.<ns>.<sa> profiles
        self._tiers: dict[str, Tier] = {}
        self._policies: dict[str, Policy] = {}  # policy id -> policy
        # A NetworkPolicy only ever selects endpoints of its own namespace: matching an endpoint
        # needs its namespace's policies and the global ones, not all of them.
        self._ns_policies: dict[str | None, set[str]] = {}  # namespace (None: global) -> ids
        self._policy_ids: dict[str, str] = {}  # datastore key -> policy id
        # -- local policed endpoints (workloads and host endpoints) and which policies apply
        self._matches: dict[str, set[str]] = {}  # local key -> policy ids that apply
        self._applied_to: dict[str, set[str]] = {}  # policy id -> local keys (non-empty = active)
        self._endpoint_chains: dict[str, render.EndpointChains] = {}  # local workload key -> ...
        self._host_chains: dict[str, render.HostEndpointChains] = {}  # local host endpoint key -> ...
        self._dirty_local: set[str] = set()
        # -- ipsets
        self._set_specs: dict[str, policy_ipsets.IPSetSpec] = {}  # active sets
        self._set_refs: dict[str, set[str]] = {}  # set name -> active policy ids using it
        self._policy_sets: dict[str, dict[str, policy_ipsets.IPSetSpec]] = {}  # active policy id -> its sets
        self._set_contrib: dict[str, dict[str, frozenset[str]]] = {}  # set -> member key -> members
        self._set_counts: dict[str, Counter[str]] = {}
        self._set_cache: dict[str, IPSetState] = {}
        self._new_sets: set[str] = set()
        self._dirty_members: set[str] = set()  # member keys whose contributions must be recomputed
        self._active_profiles: dict[str, Profile] = {}  # profiles local endpoint chains jump to
        # -- rendering memos (value -> chains)
        self._policy_memo: dict[int, dict[str, tuple[Policy, tuple[Chain, ...]]]] = {f: {} for f in self.families}
        self._profile_memo: dict[int, dict[str, tuple[Profile, tuple[Chain, ...]]]] = {f: {} for f in self.families}
        # Per interface: its EndpointChains, their rendering, and the policy ids they use (a
        # frozenset: the union over 5,000 endpoints costs a few ms instead of ~40 ms of generators).
        self._ep_memo: dict[str, tuple[render.EndpointChains, tuple[Chain, ...], frozenset[str]]] = {}
        self._hep_memo: dict[str, tuple[render.HostEndpointChains, render.HostChains]] = {}
        self._dispatch_memo: tuple[frozenset[str], tuple[Chain, ...]] | None = None
        self._hep_dispatch_memo: _HostDispatchMemo | None = None
        # Encapsulated traffic between nodes is allowed before host endpoint policy: which
        # encapsulations the enabled pools use, and every node's address.
        # Per family: which encapsulations that family's pools use, and every node's address.
        self._pool_encap: dict[int, dict[str, render.HostEncap]] = {f: {} for f in self.families}
        self._node_ips: dict[int, dict[str, str]] = {f: {} for f in self.families}
        self._encap = {f: render.HostEncap() for f in self.families}
        self._static = {f: {
            "filter": tuple(render.static_chains(self.config, ip_version=f)),
            "mangle": tuple(render.mangle_static_chains(self.config)),
            "raw": tuple(render.raw_static_chains(self.config)),
        } for f in self.families}
        self._jumps = {t: {b: tuple(rules) for b, rules in render.table_jump_rules(t).items()} for t in TABLES}
        self._warned: set[str] = set()

    # -- input -----------------------------------------------------------------------------
    def register_with(self, dispatcher: Dispatcher) -> None:
        dispatcher.register(Kind.WORKLOAD_ENDPOINT, self.on_workload)
        dispatcher.register(Kind.PROFILE, self.on_profile)
        dispatcher.register(Kind.NETWORK_POLICY, self.on_policy)
        dispatcher.register(Kind.GLOBAL_NETWORK_POLICY, self.on_policy)
        dispatcher.register(Kind.TIER, self.on_tier)
        dispatcher.register(Kind.NETWORK_SET, self.on_network_set)
        dispatcher.register(Kind.GLOBAL_NETWORK_SET, self.on_network_set)
        dispatcher.register(Kind.HOST_ENDPOINT, self.on_host_endpoint)
        dispatcher.register(Kind.IP_POOL, self.on_pool)
        dispatcher.register(Kind.NODE, self.on_node)

    def on_pool(self, update: Update[IPPool]) -> None:
        pool = update.value
        for family, pools in self._pool_encap.items():
            if pool is None or pool.disabled or (":" in pool.cidr) != (family == 6):
                pools.pop(update.key, None)
            else:
                pools[update.key] = render.HostEncap(vxlan=pool.vxlan_mode != "Never",
                                                     ipip=pool.ipip_mode != "Never")
            encap = render.HostEncap(vxlan=any(e.vxlan for e in pools.values()),
                                     ipip=any(e.ipip for e in pools.values()))
            if encap != self._encap[family]:
                self._encap[family] = encap
                self._static[family]["filter"] = tuple(render.static_chains(self.config, encap, family))
                self.dirty = True

    def on_node(self, update: Update[Node]) -> None:
        for family, ips in self._node_ips.items():
            node = update.value
            address = None if node is None else (node.ipv4 if family == 4 else node.ipv6)
            if address is None:
                changed = ips.pop(update.key, None) is not None
            else:
                changed = ips.get(update.key) != address
                ips[update.key] = address
            if changed:
                self._set_cache.pop(render.ALL_HOSTS_SETS[family], None)
                self.dirty = True

    def on_workload(self, update: Update[WorkloadEndpoint]) -> None:
        member = None
        if update.value is not None:
            decoded = update.value
            member = self._joined(_Member(update.key, Kind.WORKLOAD_ENDPOINT, decoded.endpoint, decoded.endpoint,
                                          decoded.iface, decoded.node))
        self._set_member(update.key, member)
        self.dirty = True

    def on_network_set(self, update: Update[Endpoint]) -> None:
        member = None
        if update.value is not None:
            member = self._joined(_Member(update.key, update.kind, update.value, update.value))
        self._set_member(update.key, member)
        self.dirty = True

    def on_host_endpoint(self, update: Update[HostEndpoint]) -> None:
        member = None
        if update.value is not None:
            hep = update.value
            member = self._joined(_Member(update.key, Kind.HOST_ENDPOINT, hep.endpoint, hep.endpoint,
                                          hep.iface, hep.node))
        # One host endpoint per interface is in force (the first by name, as Felix resolves
        # them); the others are not policed and reference nothing, until they win.
        old = self._members.get(update.key)
        touched = set()
        if old is not None and old.node == self.node_name:
            self._local_heps.get(old.iface, {}).pop(update.key, None)
            touched.add(old.iface)
        if member is not None and member.node == self.node_name:
            self._local_heps.setdefault(member.iface, {})[update.key] = member.raw.name
            touched.add(member.iface)
        self._set_member(update.key, member)
        for iface in sorted(touched):
            for key in sorted(self._local_heps.get(iface, {})):
                if key != update.key and self._is_local(self._members[key]) != (key in self._matches):
                    self._set_member(key, self._members[key])
        self.dirty = True

    def _joined(self, member: _Member) -> _Member:
        """The member as policy matches it: the labels it inherits joined in."""
        raw = member.raw
        if member.kind is Kind.HOST_ENDPOINT:
            inherited: dict[str, str] = {}
            for name in reversed(raw.profiles):
                profile = self._profiles.get(name)
                if profile is not None:
                    inherited.update(profile.labels_to_apply)
            labels = tuple(sorted(inherited.items()))
            endpoint = raw if labels == raw.profile_labels else replace(raw, profile_labels=labels)
            return replace(member, endpoint=endpoint)
        if raw.namespace is None:
            return member  # a GlobalNetworkSet: its own labels only
        ns_labels = self._ns_labels.get(raw.namespace, {})
        account = member.service_account
        sa_labels = self._sa_labels.get(account) if account is not None else None
        return replace(member, endpoint=with_namespace_labels(raw, ns_labels, sa_labels))

    def on_profile(self, update: Update[NamedProfile]) -> None:
        name = update.name
        value = update.value
        profile = value.profile if value is not None else None
        old = self._profiles.get(name)
        if profile is None:
            if name == calico.DEFAULT_ALLOW_PROFILE:
                profile = calico.DEFAULT_ALLOW  # built in: a stored one only overrides it
            else:
                self._profiles.pop(name, None)
        if profile is not None:
            self._profiles[name] = profile
        # Endpoints that reference the profile: their profile list (existing profiles only) may change.
        for key in self._matches:
            if name in self._members[key].endpoint.profiles:
                self._dirty_local.add(key)
        if (old.labels_to_apply if old else ()) != (profile.labels_to_apply if profile else ()):
            self._rejoin(self._profile_heps.get(name, ()))
        if name.startswith(NAMESPACE_PROFILE_PREFIX):
            namespace = name[len(NAMESPACE_PROFILE_PREFIX):]
            labels = value.namespace_labels if value is not None else None
            if (labels or {}) != self._ns_labels.get(namespace, {}):
                if labels is None:
                    self._ns_labels.pop(namespace, None)
                else:
                    self._ns_labels[namespace] = dict(labels)
                # The namespace's labels are part of each of its members: rebuild them.
                self._rejoin(self._ns_members.get(namespace, ()))
        account = value.service_account if value is not None else service_account_of_profile(name)
        if account is not None:
            sa_labels = value.sa_labels if value is not None else None
            if (sa_labels or {}) != self._sa_labels.get(account, {}):
                if sa_labels is None:
                    self._sa_labels.pop(account, None)
                else:
                    self._sa_labels[account] = dict(sa_labels)
                self._rejoin(self._sa_members.get(account, ()))
        self.dirty = True

    def _rejoin(self, keys_: Iterable[str]) -> None:
        for key in sorted(keys_):
            self._set_member(key, self._joined(self._members[key]))

    def on_policy(self, update: Update[Policy]) -> None:
        new = update.value
        old_id = self._policy_ids.get(update.key)
        if old_id is not None and (new is None or new.id != old_id):
            self._set_policy(old_id, None)
            del self._policy_ids[update.key]
        if new is not None:
            self._policy_ids[update.key] = new.id
            self._set_policy(new.id, new)
        self.dirty = True

    def on_tier(self, update: Update[Tier]) -> None:
        if update.value is None:
            self._tiers.pop(update.name, None)
        else:
            self._tiers[update.name] = update.value
        # Tier order and default action shape the chains of every local endpoint with a policy.
        self._dirty_local |= {key for key, pids in self._matches.items() if pids}
        self.dirty = True

    # -- index maintenance -----------------------------------------------------------------
    def _is_local(self, member: _Member | None) -> bool:
        """A workload of this node, or the host endpoint of this node in force on its interface."""
        if member is None or member.node != self.node_name:
            return False
        if member.kind is Kind.HOST_ENDPOINT:
            on_iface = self._local_heps.get(member.iface, {})
            return bool(on_iface) and min(on_iface.items(), key=lambda item: (item[1], item[0]))[0] == member.key
        return member.kind is Kind.WORKLOAD_ENDPOINT

    def _wanted(self, policy: Policy, member: _Member) -> bool:
        """Does this policy apply to this local endpoint in some chain of it?"""
        if member.kind is Kind.WORKLOAD_ENDPOINT:
            if not policy.for_workloads:
                return False
        elif policy.do_not_track and member.iface == ALL_INTERFACES:
            if policy.id not in self._warned:
                self._warned.add(policy.id)
                log.warning("doNotTrack policy is not supported for a host endpoint with interfaceName * "
                            "(as in Calico); ignoring it there policy=%s", policy.id)
            return False
        return evaluate.applies(policy, member.endpoint)

    def _set_member(self, key: str, member: _Member | None) -> None:
        old = self._members.get(key)
        if old is not None:
            if old.namespace is not None:
                self._ns_members.get(old.namespace, set()).discard(key)
            if old.service_account is not None:
                self._sa_members.get(old.service_account, set()).discard(key)
            if old.kind is Kind.HOST_ENDPOINT:
                for name in old.raw.profiles:
                    self._profile_heps.get(name, set()).discard(key)
        if member is None:
            self._members.pop(key, None)
        else:
            self._members[key] = member
            if member.namespace is not None:
                self._ns_members.setdefault(member.namespace, set()).add(key)
            if member.service_account is not None:
                self._sa_members.setdefault(member.service_account, set()).add(key)
            if member.kind is Kind.HOST_ENDPOINT:
                for name in member.raw.profiles:
                    self._profile_heps.setdefault(name, set()).add(key)
        self._dirty_members.add(key)
        was_local, is_local = key in self._matches, self._is_local(member)
        if not was_local and not is_local:
            return
        self._dirty_local.add(key)
        before = self._matches.pop(key, set())
        after: set[str] = set()
        if is_local:
            assert member is not None
            candidates = self._ns_policies.get(member.namespace, set()) | self._ns_policies.get(None, set())
            after = {pid for pid in candidates if self._wanted(self._policies[pid], member)}
            self._matches[key] = after
        for pid in before - after:
            self._unapply(pid, key)
        for pid in after - before:
            self._apply_to(pid, key)

    def _apply_to(self, pid: str, key: str) -> None:
        keys_ = self._applied_to.setdefault(pid, set())
        keys_.add(key)
        if len(keys_) == 1:
            self._activate(pid, self._policies[pid])

    def _unapply(self, pid: str, key: str) -> None:
        keys_ = self._applied_to.get(pid)
        if keys_ is None:
            return
        keys_.discard(key)
        if not keys_:
            del self._applied_to[pid]
            self._deactivate(pid)

    def _set_policy(self, pid: str, policy: Policy | None) -> None:
        old = self._policies.get(pid)
        if policy is not None and old is not None and policy == old:
            return
        before = self._applied_to.get(pid, set())
        after: set[str] = set()
        if old is not None:
            self._ns_policies[old.namespace].discard(pid)
        if policy is None:
            self._policies.pop(pid, None)
        else:
            self._policies[pid] = policy
            self._ns_policies.setdefault(policy.namespace, set()).add(pid)
            candidates = self._matches.keys() if policy.namespace is None else (
                self._ns_members.get(policy.namespace, set()) & self._matches.keys())
            for key in candidates:
                if self._wanted(policy, self._members[key]):
                    after.add(key)
        for key in before - after:
            self._matches[key].discard(pid)
        for key in after - before:
            self._matches[key].add(pid)
        # Order, tier, kind and types shape every selected endpoint's chain, not only the newly
        # selected ones.
        self._dirty_local |= before | after
        if before and after:
            assert policy is not None
            self._applied_to[pid] = after
            self._activate(pid, policy)  # swaps the policy's ipsets for the new value's
        elif before:
            del self._applied_to[pid]
            self._deactivate(pid)
        elif after:
            self._applied_to[pid] = after
            self._activate(pid, policy)  # type: ignore[arg-type]

    # -- ipsets ----------------------------------------------------------------------------
    def _activate(self, pid: str, policy: Policy) -> None:
        """The policy is active (or changed while active): reference exactly its sets (each family's)."""
        wanted: dict[str, policy_ipsets.IPSetSpec] = {}
        for family in self.families:
            wanted.update(render.ipsets_for_policy(policy, family))
        self._activate_sets(pid, wanted)

    def _activate_sets(self, pid: str, wanted: Mapping[str, policy_ipsets.IPSetSpec]) -> None:
        had = self._policy_sets.get(pid, {})
        for name in set(had) - set(wanted):
            self._unref_set(name, pid)
        for name, spec in wanted.items():
            self._set_refs.setdefault(name, set()).add(pid)
            if name not in self._set_specs:
                self._set_specs[name] = spec
                self._set_contrib[name] = {}
                self._set_counts[name] = Counter()
                self._new_sets.add(name)
        self._policy_sets[pid] = dict(wanted)

    def _deactivate(self, pid: str) -> None:
        for name in self._policy_sets.pop(pid, {}):
            self._unref_set(name, pid)

    def _unref_set(self, name: str, pid: str) -> None:
        refs = self._set_refs.get(name)
        if refs is None:
            return
        refs.discard(pid)
        if not refs:
            for table in (self._set_refs, self._set_specs, self._set_contrib, self._set_counts, self._set_cache):
                table.pop(name, None)
            self._new_sets.discard(name)

    @staticmethod
    def _members_of(spec: policy_ipsets.IPSetSpec, key: str, endpoint: Endpoint,
                    selected: dict[str, bool] | None) -> frozenset[str]:
        """The member's contribution to one set. `selected` (member key -> verdict, one dict per
        match for the flush) lets the IPv4 and IPv6 twins of a set, and sets sharing a match,
        match each member once."""
        if spec.match is not None:
            assert selected is not None
            hit = selected.get(key)
            if hit is None:
                hit = selected[key] = evaluate.match_endpoint(spec.match, endpoint)
            if not hit:
                return frozenset()
        return frozenset(policy_ipsets.selected_members(spec, endpoint))

    def _contribute(self, name: str, key: str, members: frozenset[str]) -> None:
        contrib = self._set_contrib[name]
        old = contrib.get(key, frozenset())
        if old == members:
            return
        counts = self._set_counts[name]
        counts.subtract(old)
        counts.update(members)
        for member in old - members:
            if counts[member] <= 0:
                del counts[member]
        if members:
            contrib[key] = members
        else:
            contrib.pop(key, None)
        self._set_cache.pop(name, None)

    def _flush_ipsets(self) -> None:
        # match -> member key -> whether it selects the member, for this flush.
        selected: dict[EndpointMatch | None, dict[str, bool]] = {}
        for name in sorted(self._new_sets):
            spec = self._set_specs[name]
            namespace = spec.match.namespace if spec.match is not None else None
            scope = self._members.keys() if namespace is None else self._ns_members.get(namespace, set())
            verdicts = selected.setdefault(spec.match, {})
            for key in scope:
                found = self._members_of(spec, key, self._members[key].endpoint, verdicts)
                if found:
                    self._contribute(name, key, found)
        for key in self._dirty_members:
            changed = self._members.get(key)
            endpoints = () if changed is None else (changed.endpoint,)
            for name, spec in self._set_specs.items():
                if name in self._new_sets:
                    continue  # computed from scratch just above
                members: frozenset[str] = frozenset()  # also: a namespace-scoped set, other namespace
                if endpoints and (spec.match is None or spec.match.namespace is None
                                  or spec.match.namespace == endpoints[0].namespace):
                    members = self._members_of(spec, key, endpoints[0], selected.setdefault(spec.match, {}))
                self._contribute(name, key, members)
        self._new_sets.clear()
        self._dirty_members.clear()

    # -- outputs ---------------------------------------------------------------------------
    def _flush(self) -> None:
        endpoints_changed = bool(self._dirty_local)
        for key in self._dirty_local:
            self._endpoint_chains.pop(key, None)
            self._host_chains.pop(key, None)
            if key not in self._matches:
                continue
            member = self._members[key]
            if member.kind is Kind.HOST_ENDPOINT:
                hep = self._host_chains_for(member)
                if hep is not None:
                    self._host_chains[key] = hep
                continue
            if not member.iface:
                continue  # not plumbed yet: nothing to police
            try:
                render.endpoint_chain_name(member.iface, "Ingress")
            except ValueError as err:
                # Its traffic hits the dispatch chains' "Unknown interface" DROP: fail closed.
                log.warning("workload endpoint has an unusable interface key=%s error=%s", key, err)
                continue
            self._endpoint_chains[key] = self._chains_for(member)
        self._dirty_local.clear()
        if endpoints_changed:
            # The active profiles change only with some endpoint's chains (a profile's own update
            # marks the endpoints that use it dirty): at 5,000 endpoints walking them all on every
            # flush cost ~10 ms, several times per policy change (benchmarks/bench_policy.py).
            self._flush_profiles()
        self._flush_ipsets()

    def _flush_profiles(self) -> None:
        """Profiles some local endpoint jumps to: their ipsets are referenced like a policy's."""
        wanted = {name: self._profiles[name] for ec in self._endpoint_chains.values() for name in ec.profiles}
        wanted.update((name, self._profiles[name]) for hc in self._host_chains.values() for name in hc.profiles)
        for name in [n for n in self._active_profiles if n not in wanted]:
            del self._active_profiles[name]
            self._deactivate(_profile_ref(name))
        for name, profile in wanted.items():
            if self._active_profiles.get(name) is not profile:
                self._active_profiles[name] = profile
                wanted_sets: dict[str, policy_ipsets.IPSetSpec] = {}
                for family in self.families:
                    wanted_sets.update(render.ipsets_for_profile(profile, family))
                self._activate_sets(_profile_ref(name), wanted_sets)

    def _existing_profiles(self, member: _Member) -> tuple[str, ...]:
        return tuple(p for p in member.endpoint.profiles if p in self._profiles)

    def _chains_for(self, member: _Member) -> render.EndpointChains:
        policies = [self._policies[pid] for pid in self._matches[member.key]]
        return render.EndpointChains(member.iface, _tiers_of(policies, self._tiers), self._existing_profiles(member))

    def _host_chains_for(self, member: _Member) -> render.HostEndpointChains | None:
        try:
            if member.iface != ALL_INTERFACES:
                render.host_chain_name(render.FROM_HOST_PREFIX, member.iface)
        except ValueError as err:
            log.warning("host endpoint has an unusable interface key=%s error=%s", member.key, err)
            return None
        policies = [self._policies[pid] for pid in self._matches[member.key]]
        normal = [p for p in policies if p.for_workloads]
        return render.HostEndpointChains(
            iface=member.iface,
            normal=_tiers_of(normal, self._tiers),
            forward=_tiers_of((p for p in normal if p.apply_on_forward), self._tiers),
            pre_dnat=_tiers_of((replace(p, types=p.types & {"Ingress"}) for p in policies if p.pre_dnat),
                               self._tiers),
            untracked=_tiers_of((p for p in policies if p.do_not_track), self._tiers),
            profiles=self._existing_profiles(member),
        )

    def endpoint_chains(self) -> dict[str, render.EndpointChains]:
        """Local workload key -> the tiers of policies and the profiles its chains run, in order."""
        self._flush()
        return dict(self._endpoint_chains)

    def host_endpoint_chains(self) -> dict[str, render.HostEndpointChains]:
        """Local host endpoint key -> its chains' policies, for the host endpoints in force: one
        per interface (the first by name, Felix's rule) and at most one for "*"."""
        self._flush()
        return {key: self._host_chains[key] for key in sorted(self._host_chains)}

    def active_policies(self) -> dict[str, Policy]:
        self._flush()
        return {pid: self._policies[pid] for pid in self._applied_to}

    def active_profiles(self) -> dict[str, Profile]:
        self._flush()
        return dict(self._active_profiles)

    def tiers(self) -> dict[str, Tier]:
        return dict(self._tiers)

    def ipsets(self, ip_version: int | None = None) -> dict[str, IPSetState]:
        """The sets the active policies reference, with their members (cluster-wide), and the
        set of node addresses when encapsulated traffic between nodes must be allowed: of one
        family, or (None) of every family rendered."""
        self._flush()
        out = {}
        for family in self.families:
            if ip_version is not None and family != ip_version:
                continue
            encap = self._encap[family]
            if encap.vxlan or (encap.ipip and family == 4):
                hosts = render.ALL_HOSTS_SETS[family]
                state = self._set_cache.get(hosts)
                if state is None:
                    state = IPSetState("hash:net", frozenset(self._node_ips[family].values()))
                    self._set_cache[hosts] = state
                out[hosts] = state
        for name, spec in self._set_specs.items():
            if ip_version is not None and spec.ip_version != ip_version:
                continue
            state = self._set_cache.get(name)
            if state is None:
                state = IPSetState(spec.type, frozenset(self._set_counts[name]))
                self._set_cache[name] = state
            out[name] = state
        return out

    def endpoints(self) -> list[Endpoint]:
        """Every workload, network set and host endpoint of the cluster (for explain-style checks
        and tests)."""
        return [m.endpoint for m in self._members.values()]

    def filter_state(self, ip_version: int = 4) -> FilterState:
        """All chains, jump rules and ipsets of the filter, mangle and raw tables of one family
        (iptables or ip6tables), memoised by value."""
        if ip_version not in self.families:
            raise ValueError(f"IPv{ip_version} policy is not rendered on this node")
        endpoint_chains = self.endpoint_chains()
        host_chains = self.host_endpoint_chains()
        policies = self.active_policies()
        profiles = self.active_profiles()
        tables: dict[str, dict[str, Chain]] = {t: {c.name: c for c in self._static[ip_version][t]} for t in TABLES}
        by_iface: dict[str, render.EndpointChains] = {}
        for key in sorted(endpoint_chains):
            ec = endpoint_chains[key]
            if ec.iface in by_iface:
                # Two endpoints claim one interface (a stale WorkloadEndpoint): keep the first.
                log.warning("interface claimed twice iface=%s key=%s", ec.iface, key)
                continue
            by_iface[ec.iface] = ec
        ifaces = frozenset(by_iface)
        if self._dispatch_memo is None or self._dispatch_memo[0] != ifaces:
            self._dispatch_memo = (ifaces, tuple(render.dispatch_chains(sorted(ifaces), self.config)))
        for chain in self._dispatch_memo[1]:
            tables["filter"][chain.name] = chain
        heps = tuple(host_chains[k] for k in sorted(host_chains))
        if self._hep_dispatch_memo is None or self._hep_dispatch_memo[0] != heps:
            self._hep_dispatch_memo = (heps, render.host_dispatch_chains(heps, self.config))
        for table, dispatch in self._hep_dispatch_memo[1].items():
            tables[table].update(dispatch.chains)
        used: dict[str, set[str]] = {t: set() for t in TABLES}
        for ec in by_iface.values():
            ememo = self._ep_memo.get(ec.iface)
            if ememo is None or ememo[0] != ec:
                ememo = (ec, tuple(render.endpoint_chains(ec, policies)), frozenset(ec.policy_ids()))
                self._ep_memo[ec.iface] = ememo
            used["filter"].update(ememo[2])
            for chain in ememo[1]:
                tables["filter"][chain.name] = chain
        for hc in heps:
            hmemo = self._hep_memo.get(hc.iface)
            if hmemo is None or hmemo[0] != hc:
                hmemo = (hc, render.host_endpoint_chains(hc, policies, known_profiles=profiles))
                self._hep_memo[hc.iface] = hmemo
            for table in TABLES:
                tables[table].update((c.name, c) for c in getattr(hmemo[1], table))
            normal = set(render.tier_ids(hc.normal))
            used["filter"] |= normal | set(render.tier_ids(hc.forward))
            used["mangle"] |= normal | set(render.tier_ids(hc.pre_dnat))
            if hc.iface != ALL_INTERFACES:
                used["raw"] |= set(render.tier_ids(hc.untracked))
        for pid in sorted(set().union(*used.values())):
            policy = policies.get(pid)
            if policy is None:
                continue
            chains = _memoised(self._policy_memo[ip_version], pid, policy,
                               functools.partial(render.policy_chains, ip_version=ip_version))
            for table in TABLES:
                if pid in used[table]:
                    tables[table].update((c.name, c) for c in chains)
        hep_profiles = {name for hc in heps for name in hc.profiles}
        for name, profile in profiles.items():
            for chain in _memoised(self._profile_memo[ip_version], name, profile,
                                   functools.partial(render.profile_chains, ip_version=ip_version)):
                tables["filter"][chain.name] = chain
                if name in hep_profiles and chain.name.startswith(render.PROFILE_OUT_PREFIX):
                    tables["mangle"][chain.name] = chain  # host endpoints' mangle egress chains
        # Forget memos of things that went away, so memory follows the cluster.
        live_heps = {hc.iface for hc in heps}
        memos: tuple[tuple[dict[str, Any], Any], ...] = (
            (self._policy_memo[ip_version], policies), (self._profile_memo[ip_version], profiles), (self._ep_memo, ifaces),
            (self._hep_memo, live_heps))
        for memo_table, live in memos:
            for gone in [k for k in memo_table if k not in live]:
                del memo_table[gone]
        return FilterState(
            chains=tables["filter"], jumps=self._jumps["filter"], ipsets=self.ipsets(ip_version),
            mangle=TableState(tables["mangle"], self._jumps["mangle"]),
            raw=TableState(tables["raw"], self._jumps["raw"]),
            ip_version=ip_version,
        )


V = TypeVar("V")


def _memoised(memo: dict[str, tuple[V, tuple[Chain, ...]]], key: str, value: V,
              render_chains: Callable[[V], Iterable[Chain]]) -> tuple[Chain, ...]:
    """The chains rendered for value, re-rendered only when value changed: unchanged chains stay
    the same objects, which is what lets the iptables driver reuse their rule hashes."""
    hit = memo.get(key)
    if hit is None or (hit[0] is not value and hit[0] != value):
        hit = (value, tuple(render_chains(value)))
        memo[key] = hit
    return hit[1]
