"""The policy part of the calculation graph: datastore updates in, the node's filter table out.

Registered with the same dispatcher as calc/graph.py (calc/dispatcher.py), which hands it
decoded WorkloadEndpoints of ALL nodes (ipset members are cluster-wide), Profiles (`kns.<ns>`
carries the namespace's labels), NetworkPolicies and GlobalNetworkPolicies. It produces:

  * for each LOCAL endpoint (spec.node == this node) the ordered ingress / egress policy ids and
    its existing profiles (`render.EndpointChains`);
  * the active policies (those that apply to at least one local endpoint) and active profiles;
  * the ipsets the active policies reference, with their members;
  * all of it rendered as iptables chains (`filter_state()`, a messages.FilterState), for the
    PolicyManager.

Synchronous, no I/O. It is incremental because the agent must follow one policy change within
~100 ms at 1,000 local endpoints and 500 policies (kube-router's full rebuild per change is what
we must not be):

  * an endpoint update matches that endpoint against every policy (not every pair);
  * a policy update matches that policy against every local endpoint;
  * a namespace label change re-matches the endpoints of that namespace only;
  * ipset members are kept per (set, endpoint) so an endpoint update touches only its own
    contribution, and a set is computed over all endpoints only when it first becomes active;
  * rendering is memoised by value (a Policy, a Profile, an EndpointChains, the interface set),
    so unchanged chains are the very same objects and the manager diffs them by identity.

An invalid policy, profile or endpoint arrives as a deletion (calc/updates.py decides and logs
it); an endpoint whose interface name cannot carry a chain is left out and fails closed.
The invariant (checked by tests/unit/test_calc_policy.py): `filter_state()` equals
`render.render_filter_table()` over the same index.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Iterable, Mapping, TypeVar

from felixpy.calc.updates import (NAMESPACE_PROFILE_PREFIX, Kind, NamedProfile, Update, WorkloadEndpoint,
                                  with_namespace_labels)
from felixpy.messages import FilterState, IPSetState
from policy import evaluate, render
from policy import ipsets as policy_ipsets
from policy.iptables import Chain
from policy.model import Endpoint, Policy, Profile

if TYPE_CHECKING:
    from felixpy.calc.dispatcher import Dispatcher

log = logging.getLogger(__name__)


def _profile_ref(name: str) -> str:
    """The reference key of a profile among the policy ids that hold ipsets (cannot clash)."""
    return "\x00profile:" + name


@dataclass(frozen=True, slots=True)
class _Workload:
    key: str
    decoded: WorkloadEndpoint  # as stored, kept to rebuild on namespace label changes
    endpoint: Endpoint  # with its namespace's labels

    @property
    def node(self) -> str:
        return self.decoded.node

    @property
    def namespace(self) -> str:
        return self.decoded.namespace

    @property
    def iface(self) -> str:
        return self.decoded.iface


class PolicyCalc:
    """See the module docstring. `on_update` indexes; the output methods flush lazily."""

    def __init__(self, node_name: str, config: render.RenderConfig | None = None) -> None:
        self.node_name = node_name
        self.config = config or render.RenderConfig()
        self.dirty = True
        # -- the index
        self._workloads: dict[str, _Workload] = {}  # WEP key -> workload (all nodes)
        self._ns_workloads: dict[str, set[str]] = {}  # namespace -> WEP keys
        self._profiles: dict[str, Profile] = {}
        self._ns_labels: dict[str, dict[str, str]] = {}  # from the kns.<ns> profiles
        self._policies: dict[str, Policy] = {}  # policy id -> policy
        # A NetworkPolicy only ever selects endpoints of its own namespace: matching an endpoint
        # needs its namespace's policies and the global ones, not all of them.
        self._ns_policies: dict[str | None, set[str]] = {}  # namespace (None: global) -> ids
        self._policy_ids: dict[str, str] = {}  # datastore key -> policy id
        # -- local endpoints and which policies apply to them
        self._matches: dict[str, set[str]] = {}  # local WEP key -> policy ids that apply
        self._applied_to: dict[str, set[str]] = {}  # policy id -> local WEP keys (non-empty = active)
        self._endpoint_chains: dict[str, render.EndpointChains] = {}  # local WEP key -> ...
        self._dirty_local: set[str] = set()
        # -- ipsets
        self._set_specs: dict[str, policy_ipsets.IPSetSpec] = {}  # active sets
        self._set_refs: dict[str, set[str]] = {}  # set name -> active policy ids using it
        self._policy_sets: dict[str, dict[str, policy_ipsets.IPSetSpec]] = {}  # active policy id -> its sets
        self._set_contrib: dict[str, dict[str, frozenset[str]]] = {}  # set -> WEP key -> members
        self._set_counts: dict[str, Counter[str]] = {}
        self._set_cache: dict[str, IPSetState] = {}
        self._new_sets: set[str] = set()
        self._dirty_members: set[str] = set()  # WEP keys whose contributions must be recomputed
        self._active_profiles: dict[str, Profile] = {}  # profiles local endpoint chains jump to
        # -- rendering memos (value -> chains)
        self._policy_memo: dict[str, tuple[Policy, tuple[Chain, ...]]] = {}
        self._profile_memo: dict[str, tuple[Profile, tuple[Chain, ...]]] = {}
        self._ep_memo: dict[str, tuple[render.EndpointChains, tuple[Chain, ...]]] = {}
        self._dispatch_memo: tuple[frozenset[str], tuple[Chain, ...]] | None = None
        self._static = tuple(render.static_chains(self.config))
        self._jumps = {b: tuple(rules) for b, rules in render.jump_rules().items()}

    # -- input -----------------------------------------------------------------------------
    def register_with(self, dispatcher: Dispatcher) -> None:
        dispatcher.register(Kind.WORKLOAD_ENDPOINT, self.on_workload)
        dispatcher.register(Kind.PROFILE, self.on_profile)
        dispatcher.register(Kind.NETWORK_POLICY, self.on_policy)
        dispatcher.register(Kind.GLOBAL_NETWORK_POLICY, self.on_policy)

    def on_workload(self, update: Update[WorkloadEndpoint]) -> None:
        workload = None
        if update.value is not None:
            workload = self._workload_from(update.key, update.value)
        self._set_workload(update.key, workload)
        self.dirty = True

    def _workload_from(self, key: str, decoded: WorkloadEndpoint) -> _Workload:
        labels = self._ns_labels.get(decoded.namespace, {})
        return _Workload(key, decoded, with_namespace_labels(decoded.endpoint, labels))

    def on_profile(self, update: Update[NamedProfile]) -> None:
        name = update.name
        profile = update.value.profile if update.value is not None else None
        labels = update.value.namespace_labels if update.value is not None else None
        if profile is None:
            self._profiles.pop(name, None)
        else:
            self._profiles[name] = profile
        # Endpoints that reference the profile: their profile list (existing profiles only) may change.
        for key, workload in self._workloads.items():
            if key in self._matches and name in workload.endpoint.profiles:
                self._dirty_local.add(key)
        if name.startswith(NAMESPACE_PROFILE_PREFIX):
            namespace = name[len(NAMESPACE_PROFILE_PREFIX):]
            if (labels or {}) != self._ns_labels.get(namespace, {}):
                if labels is None:
                    self._ns_labels.pop(namespace, None)
                else:
                    self._ns_labels[namespace] = dict(labels)
                # The namespace's labels are part of each of its endpoints: rebuild them.
                for key in sorted(self._ns_workloads.get(namespace, ())):
                    old = self._workloads[key]
                    self._set_workload(key, self._workload_from(key, old.decoded))
        self.dirty = True

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

    # -- index maintenance -----------------------------------------------------------------
    def _is_local(self, workload: _Workload | None) -> bool:
        return workload is not None and workload.node == self.node_name

    def _set_workload(self, key: str, workload: _Workload | None) -> None:
        old = self._workloads.get(key)
        if old is not None:
            self._ns_workloads.get(old.namespace, set()).discard(key)
        if workload is None:
            self._workloads.pop(key, None)
        else:
            self._workloads[key] = workload
            self._ns_workloads.setdefault(workload.namespace, set()).add(key)
        self._dirty_members.add(key)
        was_local, is_local = key in self._matches, self._is_local(workload)
        if not was_local and not is_local:
            return
        self._dirty_local.add(key)
        before = self._matches.pop(key, set())
        after: set[str] = set()
        if is_local:
            assert workload is not None
            ep = workload.endpoint
            candidates = self._ns_policies.get(ep.namespace, set()) | self._ns_policies.get(None, set())
            after = {pid for pid in candidates if evaluate.applies(self._policies[pid], ep)}
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
            candidates = self._matches if policy.namespace is None else (
                self._ns_workloads.get(policy.namespace, set()) & self._matches.keys())
            for key in candidates:
                if evaluate.applies(policy, self._workloads[key].endpoint):
                    after.add(key)
        for key in before - after:
            self._matches[key].discard(pid)
        for key in after - before:
            self._matches[key].add(pid)
        # Order and types shape every selected endpoint's chain, not only the newly selected ones.
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
        """The policy is active (or changed while active): reference exactly its sets."""
        self._activate_sets(pid, render.ipsets_for_policy(policy))

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
    def _members(spec: policy_ipsets.IPSetSpec, endpoints: Iterable[Endpoint]) -> set[str]:
        return policy_ipsets.ipset_members(spec, endpoints)

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
        for name in sorted(self._new_sets):
            spec = self._set_specs[name]
            namespace = spec.match.namespace if spec.match is not None else None
            scope = self._workloads.keys() if namespace is None else self._ns_workloads.get(namespace, set())
            for key in scope:
                found = self._members(spec, (self._workloads[key].endpoint,))
                if found:
                    self._contribute(name, key, frozenset(found))
        for key in self._dirty_members:
            changed = self._workloads.get(key)
            endpoints = () if changed is None else (changed.endpoint,)
            for name, spec in self._set_specs.items():
                if name in self._new_sets:
                    continue  # computed from scratch just above
                members: frozenset[str] = frozenset()  # also: a namespace-scoped set, other namespace
                if endpoints and (spec.match is None or spec.match.namespace is None
                                  or spec.match.namespace == endpoints[0].namespace):
                    members = frozenset(self._members(spec, endpoints))
                self._contribute(name, key, members)
        self._new_sets.clear()
        self._dirty_members.clear()

    # -- outputs ---------------------------------------------------------------------------
    def _flush(self) -> None:
        for key in self._dirty_local:
            if key not in self._matches:
                self._endpoint_chains.pop(key, None)
                continue
            workload = self._workloads[key]
            if not workload.iface:
                self._endpoint_chains.pop(key, None)  # not plumbed yet: nothing to police
                continue
            try:
                render.endpoint_chain_name(workload.iface, "Ingress")
            except ValueError as err:
                # Its traffic hits the dispatch chains' "Unknown interface" DROP: fail closed.
                log.warning("workload endpoint has an unusable interface key=%s error=%s", key, err)
                self._endpoint_chains.pop(key, None)
                continue
            self._endpoint_chains[key] = self._chains_for(workload)
        self._dirty_local.clear()
        self._flush_profiles()
        self._flush_ipsets()

    def _flush_profiles(self) -> None:
        """Profiles some local endpoint jumps to: their ipsets are referenced like a policy's."""
        wanted = {name: self._profiles[name] for ec in self._endpoint_chains.values() for name in ec.profiles}
        for name in [n for n in self._active_profiles if n not in wanted]:
            del self._active_profiles[name]
            self._deactivate(_profile_ref(name))
        for name, profile in wanted.items():
            if self._active_profiles.get(name) is not profile:
                self._active_profiles[name] = profile
                self._activate_sets(_profile_ref(name), render.ipsets_for_profile(profile))

    def _chains_for(self, workload: _Workload) -> render.EndpointChains:
        ordered = sorted((self._policies[pid] for pid in self._matches[workload.key]),
                         key=Policy.sort_key)
        return render.EndpointChains(
            iface=workload.iface,
            ingress=tuple(p.id for p in ordered if "Ingress" in p.types),
            egress=tuple(p.id for p in ordered if "Egress" in p.types),
            profiles=tuple(p for p in workload.endpoint.profiles if p in self._profiles),
        )

    def endpoint_chains(self) -> dict[str, render.EndpointChains]:
        """Local WEP key -> the policies and profiles its chains run, in order."""
        self._flush()
        return dict(self._endpoint_chains)

    def active_policies(self) -> dict[str, Policy]:
        self._flush()
        return {pid: self._policies[pid] for pid in self._applied_to}

    def active_profiles(self) -> dict[str, Profile]:
        self._flush()
        return dict(self._active_profiles)

    def ipsets(self) -> dict[str, IPSetState]:
        """The sets the active policies reference, with their members (cluster-wide)."""
        self._flush()
        out = {}
        for name, spec in self._set_specs.items():
            state = self._set_cache.get(name)
            if state is None:
                state = IPSetState(spec.type, frozenset(self._set_counts[name]))
                self._set_cache[name] = state
            out[name] = state
        return out

    def endpoints(self) -> list[Endpoint]:
        """Every usable endpoint of the cluster (for explain-style checks and tests)."""
        return [w.endpoint for w in self._workloads.values()]

    def filter_state(self) -> FilterState:
        """All chains, jump rules and ipsets of the filter table, memoised by value."""
        endpoint_chains = self.endpoint_chains()
        policies = self.active_policies()
        profiles = self.active_profiles()
        chains: dict[str, Chain] = {}
        for chain in self._static:
            chains[chain.name] = chain
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
            chains[chain.name] = chain
        for pid, policy in policies.items():
            for chain in _memoised(self._policy_memo, pid, policy, render.policy_chains):
                chains[chain.name] = chain
        for name, profile in profiles.items():
            for chain in _memoised(self._profile_memo, name, profile, render.profile_chains):
                chains[chain.name] = chain
        for ec in by_iface.values():
            ememo = self._ep_memo.get(ec.iface)
            if ememo is None or ememo[0] != ec:
                ememo = (ec, tuple(render.endpoint_chains(ec, policies)))
                self._ep_memo[ec.iface] = ememo
            for chain in ememo[1]:
                chains[chain.name] = chain
        # Forget memos of things that went away, so memory follows the cluster.
        for memo_table, live in ((self._policy_memo, policies), (self._profile_memo, profiles),
                                 (self._ep_memo, ifaces)):
            for gone in [k for k in memo_table if k not in live]:
                del memo_table[gone]
        return FilterState(chains=chains, jumps=self._jumps, ipsets=self.ipsets())


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
