"""`felixctl ipam split N --name|--cidr`: split one IP pool into N equal pools, as calicoctl does.

calicoctl's sequence, which `felixctl ipam` follows: the datastore must be locked (`datastore
migrate lock`, ClusterInformation datastoreReady=false) so that no CNI ADD allocates meanwhile;
the old pool is disabled, N pools `split-<name>-<i>` with the old pool's spec and the N equal
parts of its CIDR are created (enabled), and the old pool is deleted. Existing blocks, affinities
and allocations stay as they are: each block lies inside exactly one of the new pools.

Everything that can be wrong is checked before anything is written: N must be a power of 2 of
at least 2, the parts must still hold at least one block (felixpy refuses a part smaller than the
pool's blockSize; such a pool could never hand out a block), and no pool of the new names may
exist. The new pools overlap the disabled old one until it is deleted, so they are written
directly rather than through `apply` (which refuses overlapping pools), as calicoctl's
UnsafeCreate does.
"""

from __future__ import annotations

import copy
import ipaddress
from dataclasses import dataclass
from typing import Any

from felixpy.datastore import keys
from felixpy.datastore.api import KV, Conflict, Datastore, NotFound
from felixpy.ipam.errors import IPAMError
from felixpy.model import resources

MAX_NAME = 253


@dataclass(frozen=True, slots=True)
class SplitResult:
    old_name: str
    created: tuple[tuple[str, str], ...]  # (name, cidr) of each new pool


def _find(store: Datastore, name: str | None, cidr: str | None) -> KV:
    if name:
        try:
            return store.get(keys.resource_key("ippools", name))
        except NotFound:
            raise IPAMError(f"unable to find IP pool with name {name}") from None
    try:
        wanted = ipaddress.ip_network(str(cidr), strict=False)
    except ValueError:
        raise IPAMError(f"invalid CIDR {cidr!r}") from None
    for kv in store.list(keys.resource_prefix("ippools"))[0]:
        try:
            if ipaddress.ip_network(str((kv.value.get("spec") or {}).get("cidr")), strict=False) == wanted:
                return kv
        except ValueError:
            continue
    raise IPAMError(f"unable to find an IP pool with CIDR {cidr}")


def split_cidr(cidr: str, parts: int) -> list[str]:
    """The `parts` equal sub-networks of cidr, in address order."""
    if parts < 2 or parts & (parts - 1):
        raise IPAMError(f"number to split the pool into is not a power of 2 of at least 2: {parts}")
    net = ipaddress.ip_network(cidr, strict=False)
    extra = parts.bit_length() - 1
    if net.prefixlen + extra > net.max_prefixlen:
        raise IPAMError(f"the CIDR {cidr} is not large enough to be split into {parts} parts")
    return [str(sub) for sub in net.subnets(prefixlen_diff=extra)]


def _new_name(old: str, index: int) -> str:
    name = f"split-{old}-{index}"
    return name if len(name) <= MAX_NAME else f"split-{old[:245]}-{index}"


def split_pool(store: Datastore, parts: int, *, name: str | None = None, cidr: str | None = None) -> SplitResult:
    """Disable the pool, create its N parts, delete it (see the module docstring)."""
    if not name and not cidr:
        raise IPAMError("no name or CIDR given: give --name or --cidr of the IP pool to split")
    kv = _find(store, name, cidr)
    old: dict[str, Any] = copy.deepcopy(kv.value)
    old_name = str(old["metadata"]["name"])
    spec = old.get("spec") or {}
    subnets = split_cidr(str(spec["cidr"]), parts)
    block_size = int(spec.get("blockSize") or 0)
    new_prefix = ipaddress.ip_network(subnets[0]).prefixlen
    if block_size and new_prefix > block_size:
        raise IPAMError(f"splitting {spec['cidr']} into {parts} gives /{new_prefix} pools, smaller than the "
                        f"pool's /{block_size} blocks")
    new_pools = []
    for i, sub in enumerate(subnets):
        pool: dict[str, Any] = {"apiVersion": resources.API_VERSION, "kind": "IPPool",
                "metadata": {"name": _new_name(old_name, i),
                             **({"labels": old["metadata"]["labels"]} if old["metadata"].get("labels") else {}),
                             **({"annotations": old["metadata"]["annotations"]}
                                if old["metadata"].get("annotations") else {})},
                "spec": {**copy.deepcopy(spec), "cidr": sub, "disabled": False}}
        try:
            new_pools.append(resources.validate(pool))
        except resources.ValidationError as err:
            raise IPAMError(str(err)) from None
    for pool in new_pools:
        try:
            store.get(keys.resource_key("ippools", pool["metadata"]["name"]))
        except NotFound:
            continue
        raise IPAMError(f"an IP pool named {pool['metadata']['name']} already exists")

    disabled = copy.deepcopy(old)
    disabled["spec"]["disabled"] = True
    try:
        kv = store.update(kv.key, disabled, kv.revision)
    except (Conflict, NotFound):
        raise IPAMError(f"IP pool {old_name} changed while splitting it; nothing was changed, try again") from None
    created = []
    for pool in new_pools:
        store.create(keys.resource_key("ippools", pool["metadata"]["name"]), pool)
        created.append((str(pool["metadata"]["name"]), str(pool["spec"]["cidr"])))
    try:
        store.delete(kv.key, kv.revision)
    except (Conflict, NotFound):
        raise IPAMError(f"IP pool {old_name} changed while splitting it: the new pools exist and it is "
                        "disabled; delete it by hand") from None
    return SplitResult(old_name=old_name, created=tuple(created))
