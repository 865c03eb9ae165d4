"""What `felixctl ipam show` reports: pool and block utilisation, and borrowed addresses.

Utilisation is Calico's (`calicoctl ipam show`): per pool and per block, the addresses in use
(allocated), those an IPReservation covers, and those free (neither). An address allocated before
it was reserved counts as in use and as reserved, never twice as not free.

A borrowed address is one whose allocation names a node (the `node` attribute) other than the
node its block is affine to, or that was taken from a block affine to nobody. Allocations without
a `node` attribute cannot be classified and are counted apart, as calicoctl does.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from typing import Sequence

from felixpy.datastore import keys
from felixpy.datastore.api import Datastore
from felixpy.ipam.blockstore import live
from felixpy.ipam.block import Block, BlockError
from felixpy.ipam.pools import Pool
from felixpy.ipam.reservations import Reservations

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True, slots=True)
class Utilisation:
    cidr: str
    total: int
    in_use: int
    reserved: int
    free: int
    blocks: tuple[Utilisation, ...] = ()


@dataclass(frozen=True, slots=True)
class Borrowed:
    ip: str
    borrowing_node: str
    block: str
    block_owner: str  # "" when the block is affine to nobody
    type: str  # "pod", or the tunnel type attribute
    allocated_to: str  # "<namespace>/<pod>" for pods


def _blocks(store: Datastore) -> list[Block]:
    out = []
    for kv in store.list(keys.BLOCKS)[0]:
        if not live(kv.value):
            continue
        try:
            out.append(Block.from_json(kv.value))
        except BlockError:
            continue  # `felixctl ipam check` reports it
    out.sort(key=lambda b: (b.cidr.version, int(b.cidr.network_address)))
    return out


def _count(cidr: IPNetwork, blocks: Sequence[Block], reserved: Reservations) -> tuple[int, int, int]:
    """(in use, reserved, in use and reserved) within cidr."""
    in_use = both = 0
    for block in blocks:
        skip = reserved.overlapping(block.cidr)
        for alloc in block.allocated():
            if alloc.ip in cidr:
                in_use += 1
                if skip and skip.matches(alloc.ip):
                    both += 1
    return in_use, reserved.reserved_count(cidr), both


def _utilisation(cidr: IPNetwork, blocks: Sequence[Block], reserved: Reservations,
                 children: tuple[Utilisation, ...] = ()) -> Utilisation:
    in_use, held, both = _count(cidr, blocks, reserved)
    total = cidr.num_addresses
    return Utilisation(cidr=str(cidr), total=total, in_use=in_use, reserved=held,
                       free=total - in_use - held + both, blocks=children)


def utilisation(store: Datastore, pools: Sequence[Pool], reserved: Reservations) -> list[Utilisation]:
    """One entry per pool (by address), each with one entry per existing block inside it."""
    blocks = _blocks(store)
    out = []
    for pool in sorted(pools, key=lambda p: (p.version, int(p.cidr.network_address))):
        inside = [b for b in blocks if b.cidr.version == pool.version and b.cidr.subnet_of(pool.cidr)]  # type: ignore[arg-type]
        children = tuple(_utilisation(b.cidr, [b], reserved) for b in inside)
        out.append(_utilisation(pool.cidr, inside, reserved, children))
    return out


def borrowed(store: Datastore) -> tuple[list[Borrowed], int]:
    """(the borrowed addresses, how many allocations have no node attribute)."""
    found: list[Borrowed] = []
    unclassified = 0
    for block in _blocks(store):
        owner = block.host or ((block.affinity or "").split(":", 1)[-1] if block.affinity else "")
        for alloc in block.allocated():
            node = alloc.attrs.get("node")
            if not node:
                unclassified += 1
                continue
            if node == owner:
                continue
            if alloc.attrs.get("pod"):
                kind, to = "pod", f"{alloc.attrs.get('namespace', '')}/{alloc.attrs['pod']}"
            else:
                kind, to = alloc.attrs.get("type", ""), ""
            found.append(Borrowed(ip=str(alloc.ip), borrowing_node=node, block=str(block.cidr),
                                  block_owner=owner, type=kind, allocated_to=to))
    return found, unclassified
