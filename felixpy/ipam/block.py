"""Pure arithmetic on one IPAM allocation block, in the JSON layout of Calico's AllocationBlock.

A block is a power-of-two slice of an IP pool (a /26 by default, a /122 in an IPv6 pool). Its
datastore value, at /calico/ipam/v2/assignment/ipv4/block/<addr>-<len> (ipv6/ for IPv6), is:

    cidr                         "10.0.1.0/26"
    affinity                     "host:<node>" (or "virtual:<name>", or null when nobody owns it)
    affinity_claim_time          RFC 3339 time of the claim, or null
    allocations                  one entry per ordinal: null = free, int = index into attributes
    unallocated                  free ordinals, a FIFO: assign takes from the front, release
                                 appends, so the address that has been free longest is reused first
    attributes                   [{"handle_id": ..., "secondary": {node, namespace, pod, ...}}]
    sequenceNumber               bumped on every assignment (ABA protection for releases)
    sequenceNumberForAllocation  ordinal (as a string) -> sequenceNumber when it was assigned; a
                                 release that names the number it saw frees the address only if
                                 it is still that allocation (not one made since)
    deleted                      soft-delete flag (Kubernetes datastore); readers ignore such blocks

Allocations that share the same handle and attributes share one attributes entry; entries no
allocation points at any more are dropped on release and the indexes renumbered, so a block's
value stays small however often it churns. Unknown fields are kept so that a round trip through
this class never loses data written by a newer Calico.

This module does no I/O: the allocator reads a block, changes it here, and writes it back with a
compare-and-swap on the revision it read.
"""

from __future__ import annotations

import copy
import ipaddress
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, Protocol

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

_KNOWN_FIELDS = frozenset(
    {
        "cidr",
        "affinity",
        "affinity_claim_time",
        "allocations",
        "unallocated",
        "attributes",
        "sequenceNumber",
        "sequenceNumberForAllocation",
        "deleted",
    }
)


class BlockError(ValueError):
    """A block operation that cannot be done (the message says why, in one line)."""


class AddressInUse(BlockError):
    pass


class AddressNotInBlock(BlockError):
    pass


class BlockFull(BlockError):
    pass


class StaleRelease(BlockError):
    """A release named a handle or sequence number the address no longer has: it was released
    and assigned again since the caller looked, so it is not the caller's to free."""


class AddressFilter(Protocol):
    """Addresses automatic assignment must skip (reservations.Reservations)."""

    def matches(self, ip: IPAddress) -> bool: ...


@dataclass(frozen=True, slots=True)
class ReleaseGuard:
    """What a releaser believes an address holds; None = not checked."""

    handle: str | None = None
    sequence_number: int | None = None


@dataclass(frozen=True, slots=True)
class Allocation:
    """One allocated address of a block, as reported to callers."""

    ip: IPAddress
    handle: str | None
    attrs: Mapping[str, str]
    sequence_number: int | None


def host_affinity(node: str) -> str:
    return f"host:{node}"


def _as_network(cidr: str | IPNetwork) -> IPNetwork:
    return ipaddress.ip_network(cidr) if isinstance(cidr, str) else cidr


def _as_address(ip: str | IPAddress) -> IPAddress:
    return ipaddress.ip_address(ip) if isinstance(ip, str) else ip


@dataclass
class Block:
    """A mutable working copy of one block's value (read, change, CAS back)."""

    cidr: IPNetwork
    affinity: str | None = None
    affinity_claim_time: str | None = None
    allocations: list[int | None] = field(default_factory=list)
    unallocated: list[int] = field(default_factory=list)
    attributes: list[dict[str, Any]] = field(default_factory=list)
    sequence_number: int = 0
    sequence_for_allocation: dict[str, int] = field(default_factory=dict)
    deleted: bool = False
    extra: dict[str, Any] = field(default_factory=dict)

    # -- construction and serialisation ----------------------------------------------------
    @classmethod
    def new(
        cls,
        cidr: str | IPNetwork,
        affinity: str | None = None,
        claim_time: str | None = None,
    ) -> Block:
        net = _as_network(cidr)
        size = net.num_addresses
        return cls(
            cidr=net,
            affinity=affinity,
            affinity_claim_time=claim_time,
            allocations=[None] * size,
            unallocated=list(range(size)),
        )

    @classmethod
    def from_json(cls, value: Mapping[str, Any]) -> Block:
        try:
            net = _as_network(str(value["cidr"]))
        except (KeyError, ValueError) as err:
            raise BlockError(f"invalid block value: {err}") from None
        size = net.num_addresses
        allocations = list(value.get("allocations") or [None] * size)
        if len(allocations) != size:
            raise BlockError(f"block {net}: {len(allocations)} allocations for {size} addresses")
        unallocated = value.get("unallocated")
        if unallocated is None:
            unallocated = [i for i, a in enumerate(allocations) if a is None]
        return cls(
            cidr=net,
            affinity=value.get("affinity"),
            affinity_claim_time=value.get("affinity_claim_time"),
            allocations=allocations,
            unallocated=[int(o) for o in unallocated],
            # Attribute entries are never changed in place (only appended, dropped or reordered),
            # so sharing them with the caller's value is safe and keeps parsing cheap on the
            # allocation hot path.
            attributes=list(value.get("attributes") or []),
            sequence_number=int(value.get("sequenceNumber") or 0),
            sequence_for_allocation={
                str(k): int(v) for k, v in (value.get("sequenceNumberForAllocation") or {}).items()
            },
            deleted=bool(value.get("deleted", False)),
            extra={k: copy.deepcopy(v) for k, v in value.items() if k not in _KNOWN_FIELDS},
        )

    def to_json(self) -> dict[str, Any]:
        value: dict[str, Any] = dict(copy.deepcopy(self.extra))
        value.update(
            {
                "cidr": str(self.cidr),
                "affinity": self.affinity,
                "affinity_claim_time": self.affinity_claim_time,
                "allocations": list(self.allocations),
                "unallocated": list(self.unallocated),
                "attributes": list(self.attributes),
                "sequenceNumber": self.sequence_number,
                "sequenceNumberForAllocation": dict(self.sequence_for_allocation),
                "deleted": self.deleted,
            }
        )
        return value

    # -- addressing -------------------------------------------------------------------------
    @property
    def size(self) -> int:
        return self.cidr.num_addresses

    @property
    def host(self) -> str | None:
        """The node this block is affine to, or None (virtual or no affinity)."""
        if self.affinity and self.affinity.startswith("host:"):
            return self.affinity[len("host:"):]
        return None

    def contains(self, ip: str | IPAddress) -> bool:
        return _as_address(ip) in self.cidr

    def ordinal(self, ip: str | IPAddress) -> int:
        addr = _as_address(ip)
        if addr not in self.cidr:
            raise AddressNotInBlock(f"address {addr} is not in block {self.cidr}")
        return int(addr) - int(self.cidr.network_address)

    def address(self, ordinal: int) -> IPAddress:
        if not 0 <= ordinal < self.size:
            raise AddressNotInBlock(f"ordinal {ordinal} is outside block {self.cidr}")
        return self.cidr.network_address + ordinal

    # -- counts -----------------------------------------------------------------------------
    def free_count(self, skip: AddressFilter | None = None) -> int:
        """Free addresses; with skip, only those automatic assignment may hand out."""
        if not skip:
            return len(self.unallocated)
        base = self.cidr.network_address
        return sum(1 for o in self.unallocated if not skip.matches(base + o))

    def in_use_count(self) -> int:
        return sum(1 for a in self.allocations if a is not None)

    def is_empty(self) -> bool:
        return all(a is None for a in self.allocations)

    # -- assignment -------------------------------------------------------------------------
    def _attribute_index(self, handle: str | None, attrs: Mapping[str, str]) -> int:
        """Reuse an identical attributes entry, as Calico does, else append a new one."""
        secondary = dict(attrs)
        for i, existing in enumerate(self.attributes):
            if existing.get("handle_id") == handle and (existing.get("secondary") or {}) == secondary:
                return i
        self.attributes.append({"handle_id": handle, "secondary": secondary})
        return len(self.attributes) - 1

    def _mark_assigned(self, ordinal: int, attr_index: int) -> None:
        self.allocations[ordinal] = attr_index
        self.sequence_for_allocation[str(ordinal)] = self.sequence_number
        self.sequence_number += 1

    def assign(self, num: int, handle: str | None, attrs: Mapping[str, str],
               skip: AddressFilter | None = None) -> list[IPAddress]:
        """Take up to `num` free addresses from the front of the FIFO; may return fewer.

        Addresses skip matches (reserved ones) stay where they are in the FIFO.
        """
        if num < 0:
            raise BlockError(f"cannot assign {num} addresses")
        if skip:
            take: list[int] = []
            keep: list[int] = []
            base = self.cidr.network_address
            for ordinal in self.unallocated:
                if len(take) < num and not skip.matches(base + ordinal):
                    take.append(ordinal)
                else:
                    keep.append(ordinal)
            if not take:
                return []
            self.unallocated = keep
        else:
            take = self.unallocated[:num]
            if not take:
                return []
            del self.unallocated[: len(take)]
        index = self._attribute_index(handle, attrs)
        for ordinal in take:
            self._mark_assigned(ordinal, index)
        return [self.address(o) for o in take]

    def assign_ip(self, ip: str | IPAddress, handle: str | None, attrs: Mapping[str, str]) -> IPAddress:
        """Assign one specific address; AddressInUse if it is taken."""
        addr = _as_address(ip)
        ordinal = self.ordinal(addr)
        if self.allocations[ordinal] is not None:
            raise AddressInUse(f"address {addr} is already assigned in block {self.cidr}")
        self.unallocated.remove(ordinal)
        self._mark_assigned(ordinal, self._attribute_index(handle, attrs))
        return addr

    # -- release ----------------------------------------------------------------------------
    def release_counting(
        self, ips: Iterable[str | IPAddress], guards: Mapping[IPAddress, ReleaseGuard] | None = None,
    ) -> tuple[list[IPAddress], dict[str, int]]:
        """Release addresses; returns (those that were not allocated, released count per handle).

        guards: per address, the handle and sequence number the caller saw; if an allocated
        address has another one, StaleRelease is raised and nothing is released (Calico fails
        the block's release wholesale the same way).
        """
        addrs = [_as_address(ip) for ip in ips]
        for guarded, guard in (guards or {}).items():
            self._check_guard(guarded, guard)
        not_allocated: list[IPAddress] = []
        per_handle: dict[str, int] = {}
        seen: set[int] = set()
        for addr in addrs:
            ordinal = self.ordinal(addr)
            index = self.allocations[ordinal]
            if index is None or ordinal in seen:
                not_allocated.append(addr)
                continue
            seen.add(ordinal)
            handle = self.attributes[index].get("handle_id")
            if handle:
                per_handle[handle] = per_handle.get(handle, 0) + 1
            self.allocations[ordinal] = None
            self.unallocated.append(ordinal)
            self.sequence_for_allocation.pop(str(ordinal), None)
        if seen:
            self._compact_attributes()
        return not_allocated, per_handle

    def _check_guard(self, addr: IPAddress, guard: ReleaseGuard) -> None:
        ordinal = self.ordinal(addr)
        index = self.allocations[ordinal]
        if index is None:
            return  # free already: reported as not allocated, nothing to protect
        if guard.sequence_number is not None:
            current = self.sequence_for_allocation.get(str(ordinal))
            if current != guard.sequence_number:
                raise StaleRelease(f"address {addr} was assigned again since it was looked at "
                                   f"(sequence number {current}, expected {guard.sequence_number}); not released")
        if guard.handle is not None and self._handle_of(index) != guard.handle:
            raise StaleRelease(f"address {addr} now belongs to handle {self._handle_of(index)}, "
                               f"not {guard.handle}; not released")

    def release(self, ips: Iterable[str | IPAddress]) -> list[IPAddress]:
        """Release addresses; returns those that were not allocated (they are left alone)."""
        return self.release_counting(ips)[0]

    def release_by_handle(self, handle: str) -> list[IPAddress]:
        ips = self.ips_for_handle(handle)
        self.release(ips)
        return ips

    def _compact_attributes(self) -> None:
        """Drop attribute entries nothing points at and renumber the allocations."""
        used = sorted({a for a in self.allocations if a is not None})
        if used == list(range(len(self.attributes))):
            return
        renumber = {old: new for new, old in enumerate(used)}
        self.attributes = [self.attributes[old] for old in used]
        self.allocations = [None if a is None else renumber[a] for a in self.allocations]

    # -- queries ----------------------------------------------------------------------------
    def _handle_of(self, index: int) -> str | None:
        handle = self.attributes[index].get("handle_id")
        return str(handle) if handle is not None else None

    def ips_for_handle(self, handle: str) -> list[IPAddress]:
        wanted = {i for i, a in enumerate(self.attributes) if a.get("handle_id") == handle}
        return [self.address(o) for o, a in enumerate(self.allocations) if a is not None and a in wanted]

    def handle_counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for a in self.allocations:
            if a is not None:
                handle = self._handle_of(a)
                if handle:
                    counts[handle] = counts.get(handle, 0) + 1
        return counts

    def allocation(self, ip: str | IPAddress) -> Allocation | None:
        addr = _as_address(ip)
        ordinal = self.ordinal(addr)
        index = self.allocations[ordinal]
        if index is None:
            return None
        attrs = self.attributes[index].get("secondary") or {}
        return Allocation(
            ip=addr,
            handle=self._handle_of(index),
            attrs={str(k): str(v) for k, v in attrs.items()},
            sequence_number=self.sequence_for_allocation.get(str(ordinal)),
        )

    def allocated(self) -> list[Allocation]:
        out: list[Allocation] = []
        for ordinal, index in enumerate(self.allocations):
            if index is not None:
                found = self.allocation(self.address(ordinal))
                if found is not None:
                    out.append(found)
        return out
