"""IPReservations: addresses automatic assignment never hands out.

An IPReservation (`spec.reservedCIDRs`: addresses and CIDRs) tells IPAM to leave those addresses
alone when it picks addresses itself (libcalico-go's reservation filter):

* a reserved address stays in its block's free list but `auto_assign` and borrowing skip it, so
  it is never handed out automatically;
* a block CIDR that reservations cover entirely is never claimed;
* an address that was allocated before it was reserved keeps its allocation (a reservation
  never evicts anybody), and once released it is not handed out again;
* assigning a *specific* address (`assign_ip`, the CNI `ipAddrs` annotation) is not affected:
  a reservation only keeps automatic assignment away, as in Calico.

Reservations are read with the pools (cached for the allocator's cache_ttl); Calico, too, lists
them on every request, so one or two resources holding several CIDRs each are cheaper than many.
"""

from __future__ import annotations

import ipaddress
import logging
from dataclasses import dataclass
from typing import Any, Iterable, Mapping

from felixpy.datastore import keys
from felixpy.datastore.api import Datastore

log = logging.getLogger(__name__)

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True, slots=True)
class Reservations:
    """The reserved networks of both families, merged per family (no two overlap or touch)."""

    nets: tuple[IPNetwork, ...] = ()

    @classmethod
    def of(cls, cidrs: Iterable[str | IPNetwork]) -> Reservations:
        by_family: dict[int, list[IPNetwork]] = {4: [], 6: []}
        for cidr in cidrs:
            net = ipaddress.ip_network(str(cidr), strict=False)
            by_family[net.version].append(net)
        merged: list[IPNetwork] = []
        for family in (4, 6):  # collapse_addresses refuses to mix families
            merged.extend(ipaddress.collapse_addresses(by_family[family]))  # type: ignore[arg-type, type-var]
        return cls(tuple(merged))

    def __bool__(self) -> bool:
        return bool(self.nets)

    def matches(self, ip: IPAddress) -> bool:
        return any(ip in net for net in self.nets)

    def overlapping(self, cidr: IPNetwork) -> Reservations:
        """Only the reservations that touch cidr (a block), to test its addresses cheaply."""
        return Reservations(tuple(n for n in self.nets if n.overlaps(cidr)))

    def reserved_count(self, cidr: IPNetwork) -> int:
        """How many addresses of cidr are reserved (the merged networks never double count)."""
        total = 0
        for net in self.nets:
            if net.version == cidr.version and net.overlaps(cidr):
                total += (net if net.subnet_of(cidr) else cidr).num_addresses  # type: ignore[arg-type]
        return total

    def covers(self, cidr: IPNetwork) -> bool:
        """True when every address of cidr is reserved (such a block is never claimed)."""
        return self.reserved_count(cidr) == cidr.num_addresses


NO_RESERVATIONS = Reservations()


def reserved_cidrs(resource: Mapping[str, Any]) -> list[str]:
    """The reservedCIDRs of an IPReservation resource, unparseable entries skipped (logged)."""
    out = []
    for cidr in (resource.get("spec") or {}).get("reservedCIDRs") or []:
        try:
            ipaddress.ip_network(str(cidr), strict=False)
        except ValueError:
            name = (resource.get("metadata") or {}).get("name")
            log.warning("ignoring invalid reserved CIDR reservation=%s cidr=%s", name, cidr)
            continue
        out.append(str(cidr))
    return out


def list_reservations(store: Datastore) -> Reservations:
    kvs, _ = store.list(keys.resource_prefix("ipreservations"))
    return Reservations.of(cidr for kv in kvs for cidr in reserved_cidrs(kv.value or {}))
