"""Consistency check of the IPAM data against what is actually in use (`felixctl ipam check`).

Like `calicoctl ipam check` (calico-reference.md §2.7) it loads blocks, pools, affinities, handles,
Node tunnel addresses and WorkloadEndpoints, and reports:

* leaks: addresses allocated in a block that no WorkloadEndpoint and no Node tunnel uses (with the
  allocation's handle and sequence number, so that a release from the report frees exactly that
  allocation and never one made since);
* in-use addresses (WorkloadEndpoint ipNetworks, Node tunnel addresses) with no allocation, or
  outside every IP pool, or claimed by more than one owner;
* handles with no addresses, handles that blocks refer to but that do not exist, and handle
  counts that disagree with the blocks;
* affinities without a block, and blocks whose owner's affinity is pending or missing.

The data is read with one list per prefix, not as one snapshot, so an allocation in flight while
the check runs can show up as a transient problem; run it again (or with the cluster quiet)
before releasing anything.
"""

from __future__ import annotations

import ipaddress
import logging
from dataclasses import dataclass, field
from typing import Any, Mapping

from felixpy.datastore import keys
from felixpy.datastore.api import Datastore
from felixpy.ipam.affinity import AFFINITY_CONFIRMED
from felixpy.ipam.pools import Pool, parse_pool
from felixpy.ipam.block import Block, BlockError

log = logging.getLogger(__name__)

LEAK = "allocated-not-in-use"
NOT_ALLOCATED = "in-use-not-allocated"
OUTSIDE_POOLS = "in-use-outside-pools"
MULTIPLE_OWNERS = "multiple-owners"
EMPTY_HANDLE = "handle-without-ips"
MISSING_HANDLE = "handle-missing"
HANDLE_COUNT = "handle-count-mismatch"
AFFINITY_WITHOUT_BLOCK = "affinity-without-block"
BLOCK_AFFINITY_NOT_CONFIRMED = "block-affinity-not-confirmed"
INVALID_BLOCK = "invalid-block"


@dataclass(frozen=True, slots=True)
class Problem:
    kind: str
    detail: str  # one line for the user
    ip: str | None = None
    handle: str | None = None
    block: str | None = None
    sequence_number: int | None = None  # of a leaked allocation: `ipam release --from-report` names it

    def to_json(self) -> dict[str, Any]:
        return {k: v for k, v in (("kind", self.kind), ("detail", self.detail), ("ip", self.ip),
                                  ("handle", self.handle), ("block", self.block),
                                  ("sequenceNumber", self.sequence_number)) if v is not None}


@dataclass(frozen=True, slots=True)
class CheckReport:
    problems: tuple[Problem, ...]
    blocks: int
    pools: tuple[str, ...]
    allocations: int
    in_use: int
    handles: int
    allocations_by_node: Mapping[str, int] = field(default_factory=dict)

    def of_kind(self, kind: str) -> list[Problem]:
        return [p for p in self.problems if p.kind == kind]

    def leaked_ips(self) -> list[str]:
        return [p.ip for p in self.of_kind(LEAK) if p.ip is not None]

    def lines(self) -> list[str]:
        out = [
            "Checking IPAM for inconsistencies...",
            f"Found {self.blocks} IPAM blocks.",
            f"Found {len(self.pools)} active IP pools: {', '.join(self.pools) or '-'}.",
            f"Found {self.allocations} allocated IPs; workloads and nodes are using {self.in_use} IPs.",
            f"Found {self.handles} IPAM handles.",
        ]
        top = sorted(self.allocations_by_node.items(), key=lambda kv: (-kv[1], kv[0]))[:20]
        for node, count in top:
            out.append(f"  {node} has {count} allocations")
        sections = [
            (LEAK, "IPs that are allocated in IPAM but not actually in use"),
            (NOT_ALLOCATED, "in-use IPs that are not allocated in IPAM"),
            (OUTSIDE_POOLS, "in-use IPs that are not in active IP pools"),
            (MULTIPLE_OWNERS, "in-use IPs with more than one owner"),
            (EMPTY_HANDLE, "handles with no matching IPs"),
            (MISSING_HANDLE, "handles mentioned in blocks with no matching handle resource"),
            (HANDLE_COUNT, "handles whose counts disagree with the blocks"),
            (AFFINITY_WITHOUT_BLOCK, "block affinities without a block"),
            (BLOCK_AFFINITY_NOT_CONFIRMED, "blocks whose affinity is not confirmed"),
            (INVALID_BLOCK, "invalid blocks"),
        ]
        for kind, title in sections:
            found = self.of_kind(kind)
            out.append(f"Found {len(found)} {title}.")
            out.extend(f"  {p.detail}" for p in found)
        out.append(f"Check complete; found {len(self.problems)} problems.")
        return out

    def to_json(self) -> dict[str, Any]:
        return {
            "problems": [p.to_json() for p in self.problems],
            "leakedIPs": self.leaked_ips(),
            "blocks": self.blocks,
            "pools": list(self.pools),
            "allocations": self.allocations,
            "inUse": self.in_use,
            "handles": self.handles,
            "allocationsByNode": dict(self.allocations_by_node),
        }


def _ip_of(text: Any) -> str | None:
    try:
        addr = ipaddress.ip_interface(str(text)).ip
    except ValueError:
        return None
    return str(addr)


def _sort_key(ip: str) -> tuple[int, int]:
    addr = ipaddress.ip_address(ip)
    return addr.version, int(addr)


def _in_use(store: Datastore) -> dict[str, list[str]]:
    """ip -> owners ("workloadendpoint ns/name", "node n1 (ipip tunnel)")."""
    owners: dict[str, list[str]] = {}
    weps, _ = store.list(keys.resource_prefix("workloadendpoints"))
    for kv in weps:
        meta = (kv.value or {}).get("metadata") or {}
        who = f"workloadendpoint {meta.get('namespace', '')}/{meta.get('name', '')}"
        for net in ((kv.value or {}).get("spec") or {}).get("ipNetworks") or []:
            ip = _ip_of(net)
            if ip is not None:
                owners.setdefault(ip, []).append(who)
    nodes, _ = store.list(keys.resource_prefix("nodes"))
    for kv in nodes:
        name = ((kv.value or {}).get("metadata") or {}).get("name", "")
        spec = (kv.value or {}).get("spec") or {}
        for label, text in (
            ("ipip tunnel", (spec.get("bgp") or {}).get("ipv4IPIPTunnelAddr")),
            ("vxlan tunnel", spec.get("ipv4VXLANTunnelAddr")),
            ("vxlan-v6 tunnel", spec.get("ipv6VXLANTunnelAddr")),
        ):
            ip = _ip_of(text) if text else None
            if ip is not None:
                owners.setdefault(ip, []).append(f"node {name} ({label})")
    return owners


def check(store: Datastore) -> CheckReport:
    problems: list[Problem] = []

    pool_kvs, _ = store.list(keys.resource_prefix("ippools"))
    pools: list[Pool] = [p for p in (parse_pool(kv.value) for kv in pool_kvs) if p is not None]
    active = [p for p in pools if not p.disabled]

    blocks: dict[str, Block] = {}
    block_kvs, _ = store.list(keys.BLOCKS)
    for kv in block_kvs:
        if (kv.value or {}).get("deleted"):
            continue
        try:
            block = Block.from_json(kv.value)
        except BlockError as err:
            problems.append(Problem(INVALID_BLOCK, f"{kv.key}: {err}", block=keys.parse_key(kv.key).name))
            continue
        blocks[str(block.cidr)] = block

    in_use = _in_use(store)
    allocated: dict[str, tuple[str | None, str]] = {}  # ip -> (handle, block)
    by_node: dict[str, int] = {}
    block_handle_counts: dict[str, dict[str, int]] = {}  # handle -> block -> count
    for cidr, block in blocks.items():
        for alloc in block.allocated():
            ip = str(alloc.ip)
            allocated[ip] = (alloc.handle, cidr)
            node = alloc.attrs.get("node") or block.host or "(unknown)"
            by_node[node] = by_node.get(node, 0) + 1
            if alloc.handle:
                per_block = block_handle_counts.setdefault(alloc.handle, {})
                per_block[cidr] = per_block.get(cidr, 0) + 1
            if ip not in in_use:
                problems.append(Problem(
                    LEAK,
                    f"{ip} is allocated (handle {alloc.handle}, block {cidr}) but not in use",
                    ip=ip, handle=alloc.handle, block=cidr, sequence_number=alloc.sequence_number,
                ))

    for ip, owners in sorted(in_use.items(), key=lambda kv: _sort_key(kv[0])):
        addr = ipaddress.ip_address(ip)
        if not any(addr in p.cidr for p in active):
            problems.append(Problem(OUTSIDE_POOLS, f"{ip} is used by {owners[0]} but is in no active IP pool", ip=ip))
        if ip not in allocated:
            problems.append(Problem(NOT_ALLOCATED, f"{ip} is used by {owners[0]} but not allocated in IPAM", ip=ip))
        if len(owners) > 1:
            problems.append(Problem(MULTIPLE_OWNERS, f"{ip} is used by {len(owners)} owners: {', '.join(owners)}", ip=ip))

    handle_kvs, _ = store.list(keys.HANDLES)
    handles: dict[str, dict[str, int]] = {}
    for kv in handle_kvs:
        if (kv.value or {}).get("deleted"):
            continue
        handle = keys.parse_key(kv.key).name
        handles[handle] = {str(c): int(n) for c, n in ((kv.value or {}).get("block") or {}).items()}
    for handle, counts in sorted(handles.items()):
        actual = block_handle_counts.get(handle, {})
        if not actual:
            problems.append(Problem(EMPTY_HANDLE, f"handle {handle} has no IPs", handle=handle))
        elif counts != actual:
            problems.append(Problem(
                HANDLE_COUNT, f"handle {handle} records {counts} but the blocks hold {actual}", handle=handle))
    for handle in sorted(set(block_handle_counts) - set(handles)):
        cidrs = ", ".join(sorted(block_handle_counts[handle]))
        problems.append(Problem(MISSING_HANDLE, f"handle {handle} (used in {cidrs}) does not exist", handle=handle))

    affinity_kvs, _ = store.list(keys.HOSTS)
    affinities: dict[tuple[str, str], str] = {}
    for kv in affinity_kvs:
        parsed = keys.parse_key(kv.key)
        if parsed.kind != "affinity" or (kv.value or {}).get("deleted"):
            continue
        affinities[(parsed.node, parsed.name)] = str((kv.value or {}).get("state", ""))
    for (node, cidr), state in sorted(affinities.items()):
        if cidr not in blocks:
            problems.append(Problem(
                AFFINITY_WITHOUT_BLOCK, f"node {node} has a {state} affinity to {cidr} but the block does not exist",
                block=cidr))
    for cidr, block in sorted(blocks.items()):
        owner = block.host
        if owner is None:
            continue
        owner_state = affinities.get((owner, cidr))
        if owner_state != AFFINITY_CONFIRMED:
            problems.append(Problem(
                BLOCK_AFFINITY_NOT_CONFIRMED,
                f"block {cidr} is affine to node {owner} but its affinity is {owner_state or 'missing'}",
                block=cidr))

    report = CheckReport(
        problems=tuple(problems),
        blocks=len(blocks),
        pools=tuple(str(p.cidr) for p in active),
        allocations=len(allocated),
        in_use=len(in_use),
        handles=len(handles),
        allocations_by_node=by_node,
    )
    log.info("ipam check done problems=%d allocations=%d in_use=%d", len(problems), len(allocated), len(in_use))
    return report
