"""IPAM garbage collection: release addresses whose owner is gone (kube-controllers' node controller).

calico-reference.md §2.6. Every pass walks every allocation of every block and asks the cluster
view (pods.PodIndex) whether its owner still exists:

* an address that a live pod holds (a WorkloadEndpoint lists it and that endpoint's node exists)
  is valid, whatever the allocation's attributes say: the collector never releases an address a
  pod still uses;
* a tunnel address (attribute `type` *TunnelAddress, or a `<kind>-tunnel-addr-<node>` handle) is
  valid iff its Node exists;
* an allocation without `namespace` and `pod` attributes has an owner we cannot check (felixctl,
  another IPAM consumer) and is assumed valid;
* a pod address whose node is gone is a *confirmed* leak at once (the pod cannot exist any more);
* any other pod address is a *candidate* leak. It is confirmed once it has stayed a candidate for
  the grace period (leakGracePeriod, default 15 min; 0 disables this part of the collection) --
  long enough for any CNI ADD still between allocating and writing its endpoint to finish.

Release is all or none per handle: a handle's addresses go together (release_by_handle) and only
when every one of them is confirmed. Just before releasing, the view is read again and every
address re-checked (still allocated to the same handle, still not valid); anything that changed
is kept. Handles are unique per container, so a release by handle cannot free an address that was
meanwhile reassigned to another pod; an address without a handle is released naming the sequence
number its allocation had when it was seen, so it cannot free a newer allocation of the address.

Candidate ages live in memory, as in Calico: a restarted controller starts every grace period
again, which can only delay a release.
"""

from __future__ import annotations

import enum
import logging
import time
from dataclasses import dataclass
from typing import Callable, Mapping

from felixpy.datastore import keys
from felixpy.datastore.api import Datastore
from felixpy.controllers.pods import ClusterView, PodIndex
from felixpy.ipam.allocator import IPAM, ReleaseOptions
from felixpy.ipam.block import Block, BlockError
from felixpy.ipam.errors import IPAMError

log = logging.getLogger(__name__)

DEFAULT_GRACE_PERIOD = 15 * 60.0
TUNNEL_TYPES = frozenset({
    "ipipTunnelAddress", "vxlanTunnelAddress", "vxlanV6TunnelAddress",
    "wireguardTunnelAddress", "wireguardV6TunnelAddress",
})
TUNNEL_HANDLE_PREFIXES = ("ipip-tunnel-addr-", "vxlan-tunnel-addr-", "vxlan-v6-tunnel-addr-",
                          "wireguard-tunnel-addr-", "wireguard-v6-tunnel-addr-")


class Verdict(enum.Enum):
    VALID = "valid"
    CANDIDATE = "candidate"  # owner not found; becomes a leak after the grace period
    NODE_GONE = "node-gone"  # owner's node deleted: a leak now


@dataclass(frozen=True, slots=True)
class Allocation:
    ip: str
    handle: str | None
    attrs: Mapping[str, str]
    block: str
    block_host: str | None
    sequence_number: int | None = None

    def owner(self) -> str:
        ns, pod = self.attrs.get("namespace"), self.attrs.get("pod")
        if ns or pod:
            return f"{ns}/{pod}"
        return self.attrs.get("type") or "-"


@dataclass(frozen=True, slots=True)
class GCPass:
    """What one reconcile pass found and did."""

    allocations: int
    candidates: int  # addresses waiting out their grace period (Calico's gc_candidates)
    confirmed: int  # addresses found to be leaks this pass
    released: tuple[str, ...]  # addresses released this pass
    kept_on_revalidation: int  # confirmed leaks that re-validation found valid (or changed)
    next_confirm_in: float | None  # seconds until the next candidate's grace period ends
    released_nodes: tuple[tuple[str, str | None], ...] = ()  # (address, its node attribute) released


def tunnel_node(alloc: Allocation) -> str | None:
    """The node a tunnel allocation belongs to, or None when it is not a tunnel address."""
    if alloc.attrs.get("type") in TUNNEL_TYPES:
        return alloc.attrs.get("node") or _node_from_handle(alloc.handle) or alloc.block_host
    node = _node_from_handle(alloc.handle)
    if node is not None:
        return alloc.attrs.get("node") or node
    return None


def _node_from_handle(handle: str | None) -> str | None:
    for prefix in TUNNEL_HANDLE_PREFIXES:
        if handle and handle.startswith(prefix) and len(handle) > len(prefix):
            return handle[len(prefix):]
    return None


def classify(alloc: Allocation, view: ClusterView) -> tuple[Verdict, str]:
    """Is this allocation's owner alive? (verdict, reason for the log)."""
    users = view.live_users(alloc.ip)
    if users:
        return Verdict.VALID, f"in use by pod {users[0].namespace}/{users[0].name}"
    node = tunnel_node(alloc)
    if node is not None:
        if view.node_exists(node):
            return Verdict.VALID, f"tunnel address of node {node}"
        return Verdict.NODE_GONE, f"tunnel address of deleted node {node}"
    if not alloc.attrs.get("namespace") or not alloc.attrs.get("pod"):
        return Verdict.VALID, "no pod attributes: owner cannot be checked"
    node = alloc.attrs.get("node") or alloc.block_host
    if node and not view.node_exists(node):
        return Verdict.NODE_GONE, f"node {node} deleted"
    return Verdict.CANDIDATE, "pod not found"


def list_allocations(store: Datastore) -> list[Allocation]:
    kvs, _ = store.list(keys.BLOCKS)
    out = []
    for kv in kvs:
        if (kv.value or {}).get("deleted"):
            continue
        try:
            block = Block.from_json(kv.value)
        except BlockError as err:
            log.warning("skipping invalid block key=%s error=%s", kv.key, err)
            continue
        for a in block.allocated():
            out.append(Allocation(ip=str(a.ip), handle=a.handle, attrs=dict(a.attrs),
                                  block=str(block.cidr), block_host=block.host,
                                  sequence_number=a.sequence_number))
    return out


def format_duration(seconds: float) -> str:
    minutes, secs = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    text = (f"{hours}h" if hours else "") + (f"{minutes}m" if minutes else "") + (f"{secs}s" if secs else "")
    return text or "0s"


class IPAMGarbageCollector:
    def __init__(
        self,
        store: Datastore,
        index: PodIndex,
        *,
        grace_period: float = DEFAULT_GRACE_PERIOD,
        clock: Callable[[], float] = time.monotonic,
        ipam: IPAM | None = None,
    ) -> None:
        self._store = store
        self._index = index
        self.grace_period = grace_period
        self._clock = clock
        self._ipam = ipam or IPAM(store, cache_ttl=0)
        self._candidates: dict[tuple[str, str | None], float] = {}  # (ip, handle) -> first seen
        self.reclamations = 0  # addresses released since start (Calico's gc_reclamations)

    @property
    def enabled(self) -> bool:
        return self.grace_period > 0

    def candidates(self) -> dict[tuple[str, str | None], float]:
        return dict(self._candidates)

    def reconcile(self) -> GCPass:
        # Blocks first, then the view: an owner that existed when its allocation was read is
        # still in the view unless it has really gone since.
        allocations = list_allocations(self._store)
        view = self._index.read()
        now = self._clock()

        by_handle: dict[str | None, list[Allocation]] = {}
        verdicts: dict[str, tuple[Verdict, str]] = {}
        seen: set[tuple[str, str | None]] = set()
        confirmed: set[str] = set()
        for alloc in allocations:
            by_handle.setdefault(alloc.handle, []).append(alloc)
            verdict, reason = classify(alloc, view)
            verdicts[alloc.ip] = (verdict, reason)
            ident = (alloc.ip, alloc.handle)
            if verdict is Verdict.NODE_GONE:
                log.info("Confirmed IP leak (node deleted) handle=%s ip=%s owner=%s reason=%s",
                         alloc.handle, alloc.ip, alloc.owner(), reason)
                confirmed.add(alloc.ip)
            elif verdict is Verdict.CANDIDATE and self.enabled:
                seen.add(ident)
                first = self._candidates.setdefault(ident, now)
                if first == now:
                    log.info("Candidate IP leak handle=%s ip=%s node=%s owner=%s grace=%s",
                             alloc.handle, alloc.ip, alloc.attrs.get("node", ""), alloc.owner(),
                             format_duration(self.grace_period))
                if now - first >= self.grace_period:
                    log.info("Confirmed IP leak after %s handle=%s ip=%s owner=%s",
                             format_duration(now - first), alloc.handle, alloc.ip, alloc.owner())
                    confirmed.add(alloc.ip)
        for ident in list(self._candidates):
            if ident not in seen:
                # Valid again, released by someone else, or reassigned: forget its age.
                if verdicts.get(ident[0], (None,))[0] is Verdict.VALID:
                    log.info("IP no longer a leak candidate handle=%s ip=%s reason=%s",
                             ident[1], ident[0], verdicts[ident[0]][1])
                del self._candidates[ident]

        to_release: list[tuple[str | None, list[Allocation]]] = []
        for handle, allocs in by_handle.items():
            if handle is None:
                to_release.extend((None, [a]) for a in allocs if a.ip in confirmed)
            elif all(a.ip in confirmed for a in allocs):
                to_release.append((handle, allocs))
            elif any(a.ip in confirmed for a in allocs):
                valid = [a.ip for a in allocs if a.ip not in confirmed]
                log.info("Not releasing handle=%s: not every address is a confirmed leak valid=%s",
                         handle, valid)

        released: list[str] = []
        released_nodes: list[tuple[str, str | None]] = []
        kept = 0
        if to_release:
            fresh = self._index.read()
            for handle, allocs in to_release:
                if not self._still_leaked(handle, allocs, fresh):
                    kept += len(allocs)
                    continue
                done = self._release(handle, allocs)
                released.extend(done)
                node_of = {a.ip: a.attrs.get("node") for a in allocs}
                released_nodes.extend((ip, node_of.get(ip)) for ip in done)
        for ip in released:
            for ident in [i for i in self._candidates if i[0] == ip]:
                del self._candidates[ident]
        self.reclamations += len(released)

        pending = [first + self.grace_period - now for first in self._candidates.values()]
        result = GCPass(
            allocations=len(allocations),
            candidates=len(self._candidates),
            confirmed=len(confirmed),
            released=tuple(released),
            kept_on_revalidation=kept,
            next_confirm_in=max(0.0, min(pending)) if pending else None,
            released_nodes=tuple(released_nodes),
        )
        log.info("ipam gc pass allocations=%d candidates=%d confirmed=%d released=%d kept=%d",
                 result.allocations, result.candidates, result.confirmed, len(released), kept)
        return result

    def _still_leaked(self, handle: str | None, allocs: list[Allocation], view: ClusterView) -> bool:
        """Re-validate against fresh data just before releasing (all of the handle, or nothing)."""
        for alloc in allocs:
            current = self._ipam.get_assignment(alloc.ip)
            if current is None or current.handle != handle or (
                    alloc.sequence_number is not None and current.sequence_number != alloc.sequence_number):
                log.info("Leak changed before release, keeping handle=%s ip=%s", handle, alloc.ip)
                return False
            now_alloc = Allocation(ip=alloc.ip, handle=handle, attrs=dict(current.attrs),
                                   block=current.block_cidr, block_host=alloc.block_host)
            verdict, reason = classify(now_alloc, view)
            if verdict is Verdict.VALID:
                log.info("Leak no longer confirmed, keeping handle=%s ip=%s reason=%s", handle, alloc.ip, reason)
                self._candidates.pop((alloc.ip, handle), None)
                return False
        return True

    def _release(self, handle: str | None, allocs: list[Allocation]) -> list[str]:
        for alloc in allocs:
            log.info("Garbage collecting leaked IP address ip=%s handle=%s node=%s owner=%s",
                     alloc.ip, handle, alloc.attrs.get("node", ""), alloc.owner())
        try:
            if handle is not None:
                return [str(ip) for ip in self._ipam.release_by_handle(handle)]
            outcome = self._ipam.release([ReleaseOptions(a.ip, None, a.sequence_number) for a in allocs])
            for reason in outcome.stale:
                log.info("Leak changed before release, keeping reason=%s", reason)
            return [str(ip) for ip in outcome.released]
        except IPAMError as err:
            # The next pass retries: the allocation is still there and still a leak.
            log.warning("releasing leaked addresses failed handle=%s error=%s", handle, err)
            return []
