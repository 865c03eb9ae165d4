"""felixpy-controllers' Prometheus metrics: kube-controllers' IPAM metrics under their own names.

calico-kube-controllers exports these from its node controller (calico-reference §2.6); an
operator's IPAM dashboards and alerts read them, so they are copied name for name, with the same
types, labels and special label values:

    ipam_allocations_in_use{ippool,node}           gauge   addresses allocated, by allocation node
    ipam_allocations_borrowed{ippool,node}         gauge   of those, in a block affine to another node
    ipam_allocations_gc_candidates{ippool,node}    gauge   leak candidates waiting out the grace period
    ipam_allocations_gc_reclamations{ippool,node}  counter addresses the garbage collector released
    ipam_blocks{ippool,node}                       gauge   blocks, by affine node ("no_affinity")
    ipam_ippool_size{ippool}                       gauge   addresses in the pool's CIDR
    ipam_allocations_per_node{node}                gauge   legacy, all pools
    ipam_allocations_borrowed_per_node{node}       gauge   legacy
    ipam_blocks_per_node{node}                     gauge   legacy

An allocation without a node attribute counts under node "unknown_node", a block outside every
pool under ippool "no_ippool", as in Calico. Every (pool, Calico Node) pair is exported, at 0 when
the node has no allocation there, so a node's series exist before its first pod. Not exported:
`ipam_ippool_reserved` (felixpy has no IPReservations).

The values are computed when /metrics is scraped, from an index of blocks, pools and nodes that
the controllers' syncers keep current (a block update costs one parse), plus the garbage
collector's candidates and releases. felixpy's own controller metrics sit beside them:
felixpy_controller_passes_total, felixpy_controller_pass_failures_total and
felixpy_controller_last_pass_timestamp_seconds.
"""

from __future__ import annotations

import ipaddress
import threading
from dataclasses import dataclass
from typing import Any, Iterable, Mapping

from felixpy.datastore import keys
from felixpy.ipam.block import Block, BlockError
from felixpy.node.metrics import Counter, Gauge, Metric, ProcessCollector, Registry

UNKNOWN_NODE = "unknown_node"
NO_POOL = "no_ippool"
NO_AFFINITY = "no_affinity"


@dataclass(frozen=True, slots=True)
class _BlockSummary:
    """What the metrics need from one block: its network, affine node and allocations by node."""

    network: ipaddress.IPv4Network | ipaddress.IPv6Network
    affine_node: str | None
    by_node: Mapping[str, tuple[int, int]]  # allocation node -> (in use, borrowed)
    nodes_by_ip: Mapping[str, str]  # allocated address -> allocation node


def summarise_block(value: Mapping[str, Any]) -> _BlockSummary | None:
    try:
        block = Block.from_json(value)
    except (BlockError, KeyError, TypeError, ValueError):
        return None
    affinity = block.affinity or ""
    affine = affinity[len("host:"):] if affinity.startswith("host:") else None
    by_node: dict[str, tuple[int, int]] = {}
    nodes_by_ip: dict[str, str] = {}
    for alloc in block.allocated():
        node = str(alloc.attrs.get("node") or "") or UNKNOWN_NODE
        # Calico: borrowed when the allocation's node is known and is not the block's owner.
        borrowed = node != UNKNOWN_NODE and node != affine
        in_use, lent = by_node.get(node, (0, 0))
        by_node[node] = (in_use + 1, lent + int(borrowed))
        nodes_by_ip[str(alloc.ip)] = node
    return _BlockSummary(block.cidr, affine, by_node, nodes_by_ip)


class ControllerMetrics:
    """Indexes the syncer updates the controllers see and renders the metrics on demand."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._blocks: dict[str, _BlockSummary] = {}  # block key -> summary
        self._pools: dict[str, ipaddress.IPv4Network | ipaddress.IPv6Network] = {}  # pool name -> CIDR
        self._nodes: set[str] = set()
        self._candidates: dict[str, str | None] = {}  # leak candidate address -> its node (if known)
        self.registry = Registry()
        r = self.registry
        self.reclamations: Counter = r.register(Counter(
            "ipam_allocations_gc_reclamations",
            "The total allocations that have been reclaimed by the garbage collector over time. Under normal "
            "operation, this counter should increase, and increases of this counter should align to a return "
            "to zero for the candidate gauge.", ("ippool", "node"), calico_name=True))
        self.passes: Counter = r.register(Counter(
            "felixpy_controller_passes_total", "Reconcile passes (IPAM garbage collection and node cleanup) "
            "that completed."))
        self.pass_failures: Counter = r.register(Counter(
            "felixpy_controller_pass_failures_total", "Reconcile passes that failed on the datastore and "
            "will be retried."))
        self.last_pass: Gauge = r.register(Gauge(
            "felixpy_controller_last_pass_timestamp_seconds", "Unix time of the last completed reconcile "
            "pass (0 before the first)."))
        r.register_collector(_IPAMCollector(self))
        r.register_collector(ProcessCollector())

    # -- input ------------------------------------------------------------------------------------
    def on_event(self, event: Any) -> None:
        """A syncer callback: lists of KVUpdates are indexed, sync statuses ignored."""
        if isinstance(event, list):
            for update in event:
                self.on_update(update.key, update.value)

    def on_update(self, key: str, value: Any) -> None:
        with self._lock:
            if key.startswith(keys.BLOCKS):
                summary = summarise_block(value) if value is not None and not value.get("deleted") else None
                if summary is None:
                    self._blocks.pop(key, None)
                else:
                    self._blocks[key] = summary
                return
            parsed = keys.parse_key(key)
            if parsed.kind != "resource":
                return
            if parsed.plural == "nodes":
                if value is None:
                    self._nodes.discard(parsed.name)
                else:
                    self._nodes.add(parsed.name)
            elif parsed.plural == "ippools":
                cidr = ((value or {}).get("spec") or {}).get("cidr") if value is not None else None
                try:
                    network = ipaddress.ip_network(str(cidr), strict=False) if cidr else None
                except ValueError:
                    network = None
                if network is not None:
                    self._pools[parsed.name] = network
                else:
                    self._pools.pop(parsed.name, None)

    def set_candidates(self, addresses: Iterable[str]) -> None:
        """The garbage collector's current leak candidates (after each pass)."""
        with self._lock:
            self._candidates = {ip: self._node_of(ip) for ip in addresses}

    def reclaimed(self, released: Iterable[tuple[str, str | None]]) -> None:
        """Addresses the collector released in a pass, with the node their allocation named."""
        with self._lock:
            items = [(self._pool_of_ip(ip), node or UNKNOWN_NODE) for ip, node in released]
        for pool, node in items:
            self.reclamations.inc(ippool=pool, node=node)

    def pass_done(self, ok: bool, wall_time: float) -> None:
        if ok:
            self.passes.inc()
            self.last_pass.set(wall_time)
        else:
            self.pass_failures.inc()

    # -- lookups (lock held) --------------------------------------------------------------------------
    def _pool_of(self, network: ipaddress.IPv4Network | ipaddress.IPv6Network) -> str:
        best: tuple[int, str] | None = None
        for name, pool in self._pools.items():
            inside = network.version == pool.version and network.subnet_of(pool)  # type: ignore[arg-type]
            if inside and (best is None or pool.prefixlen > best[0]):
                best = (pool.prefixlen, name)
        return best[1] if best else NO_POOL

    def _pool_of_ip(self, ip: str) -> str:
        address = ipaddress.ip_address(ip)
        for name, pool in sorted(self._pools.items(), key=lambda p: -p[1].prefixlen):
            if address in pool:
                return name
        return NO_POOL

    def _node_of(self, ip: str) -> str | None:
        for summary in self._blocks.values():
            node = summary.nodes_by_ip.get(ip)
            if node is not None:
                return node
        return None

    # -- output -----------------------------------------------------------------------------------
    def compute(self) -> list[Metric]:
        with self._lock:
            blocks = list(self._blocks.values())
            pools = dict(self._pools)
            nodes = sorted(self._nodes)
            candidates = dict(self._candidates)
            pool_of = {id(b): self._pool_of(b.network) for b in blocks}
            candidate_pools = {ip: self._pool_of_ip(ip) for ip in candidates}
        pool_names = sorted(set(pools) | {NO_POOL})
        in_use: dict[tuple[str, str], int] = {(p, n): 0 for p in pool_names for n in nodes}
        borrowed = dict(in_use)
        gc_candidates = dict(in_use)
        block_count: dict[tuple[str, str], int] = {}
        legacy_allocs: dict[str, int] = {}
        legacy_borrowed: dict[str, int] = {}
        legacy_blocks: dict[str, int] = {}
        for block in blocks:
            pool = pool_of[id(block)]
            owner = block.affine_node or NO_AFFINITY
            block_count[(pool, owner)] = block_count.get((pool, owner), 0) + 1
            legacy_blocks[owner] = legacy_blocks.get(owner, 0) + 1
            for node, (used, lent) in block.by_node.items():
                in_use[(pool, node)] = in_use.get((pool, node), 0) + used
                borrowed[(pool, node)] = borrowed.get((pool, node), 0) + lent
                legacy_allocs[node] = legacy_allocs.get(node, 0) + used
                if lent:
                    legacy_borrowed[node] = legacy_borrowed.get(node, 0) + lent
        for ip, candidate_node in candidates.items():
            key = (candidate_pools[ip], candidate_node or UNKNOWN_NODE)
            gc_candidates[key] = gc_candidates.get(key, 0) + 1

        def by_pool(name: str, help_text: str, values: Mapping[Any, float]) -> Gauge:
            gauge = Gauge(name, help_text, ("ippool", "node"))
            gauge.replace(values)
            return gauge

        size = Gauge("ipam_ippool_size", "Total number of addresses in the IP Pool", ("ippool",))
        size.replace({(name, ): net.num_addresses for name, net in pools.items()})
        out: list[Metric] = [
            by_pool("ipam_allocations_in_use", "IPs currently allocated in IPAM to a workload or tunnel "
                    "endpoint.", in_use),
            by_pool("ipam_allocations_borrowed", "IPs currently allocated in IPAM to a workload or tunnel "
                    "endpoint, where the allocation was borrowed from a block affine to another node.", borrowed),
            by_pool("ipam_allocations_gc_candidates", "Allocations that are currently marked by the garbage "
                    "collector as potential candidates to reclaim. Under normal operation, this metric should "
                    "return to zero after the garbage collector confirms that this allocation can be reclaimed "
                    "and reclaims it, or the allocation is confirmed as valid.", gc_candidates),
            by_pool("ipam_blocks", "IPAM blocks currently allocated for the IP pool.", block_count),
            size,
        ]
        for name, help_text, values in (
                ("ipam_allocations_per_node", "Number of IPs allocated", legacy_allocs),
                ("ipam_allocations_borrowed_per_node", "Number of allocated IPs that are from non-affine blocks.",
                 legacy_borrowed),
                ("ipam_blocks_per_node", "Number of blocks in IPAM", legacy_blocks)):
            gauge = Gauge(name, help_text, ("node",))
            gauge.replace({(node, ): count for node, count in values.items()})
            out.append(gauge)
        return out

    def render(self) -> str:
        return self.registry.render()


class _IPAMCollector:
    def __init__(self, metrics: ControllerMetrics) -> None:
        self._metrics = metrics

    def collect(self) -> Iterable[Metric]:
        return self._metrics.compute()
