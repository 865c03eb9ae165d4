"""Block cleanup: a deleted node's affinities and blocks, and empty blocks nodes no longer need.

calico-reference.md §2.6 (kube-controllers' node controller):

* A node whose Node resource is gone but which still has block affinities
  (/calico/ipam/v2/host/<node>/...) is cleaned up: every affinity is released
  (IPAM.release_host_affinities); blocks that are empty by then are deleted, blocks that still
  hold addresses stay but become unowned. Its pod and tunnel addresses are released by the IPAM
  garbage collector in the same pass, which runs first, so normally every block goes. The
  Node's absence is re-checked with a fresh read just before the release.
* A live node's block that has been empty for at least `empty_block_age` seconds, seen empty in
  at least two passes, has its affinity released and is deleted -- never the node's last block, so
  a node keeps a place for its next pod. The release itself is compare-and-swap guarded: a block
  that gets an address meanwhile is kept (IPAM.release_affinity with must_be_empty).
* An empty block that belongs to no live node (left unowned by a node cleanup, or crash debris
  whose owner is gone) is deleted after the same two observations, compare-and-swap guarded.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Callable

from felixpy.controllers.pods import read_nodes
from felixpy.datastore import keys
from felixpy.datastore.api import Conflict, Datastore, NotFound
from felixpy.ipam.affinity import AFFINITY_CONFIRMED
from felixpy.ipam.allocator import IPAM
from felixpy.ipam.block import Block, BlockError
from felixpy.ipam.errors import IPAMError

log = logging.getLogger(__name__)

DEFAULT_EMPTY_BLOCK_AGE = 5 * 60.0


@dataclass(frozen=True, slots=True)
class NodePass:
    deleted_nodes: tuple[str, ...]  # nodes whose affinities were released this pass
    released_blocks: tuple[str, ...]  # block CIDRs released or deleted this pass
    blocks: int


class NodeCleanup:
    def __init__(
        self,
        store: Datastore,
        *,
        empty_block_age: float = DEFAULT_EMPTY_BLOCK_AGE,
        clock: Callable[[], float] = time.monotonic,
        ipam: IPAM | None = None,
    ) -> None:
        self._store = store
        self._empty_block_age = empty_block_age
        self._clock = clock
        self._ipam = ipam or IPAM(store, cache_ttl=0)
        self._empty_since: dict[str, tuple[float, int]] = {}  # block cidr -> (first seen empty, passes)

    def reconcile(self) -> NodePass:
        affinity_kvs, _ = self._store.list(keys.HOSTS)
        block_kvs, _ = self._store.list(keys.BLOCKS)
        nodes = read_nodes(self._store)  # after the IPAM reads: see pods.py on read order
        now = self._clock()

        affinities: dict[str, dict[str, str]] = {}  # node -> cidr -> state
        for kv in affinity_kvs:
            parsed = keys.parse_key(kv.key)
            if parsed.kind != "affinity" or (kv.value or {}).get("deleted"):
                continue
            affinities.setdefault(parsed.node, {})[parsed.name] = str((kv.value or {}).get("state", ""))
        blocks: dict[str, Block] = {}
        for kv in block_kvs:
            if (kv.value or {}).get("deleted"):
                continue
            try:
                block = Block.from_json(kv.value)
            except BlockError:
                continue  # felixctl ipam check reports it; nothing here may touch it
            blocks[str(block.cidr)] = block

        released: list[str] = []
        deleted_nodes: list[str] = []
        for node in sorted(set(affinities) - nodes):
            if self._node_exists(node):
                continue
            log.info("Cleaning up IPAM of deleted node node=%s blocks=%s", node, sorted(affinities[node]))
            try:
                released.extend(self._ipam.release_host_affinities(node))
                deleted_nodes.append(node)
            except IPAMError as err:
                log.warning("cleanup of deleted node failed node=%s error=%s", node, err)

        released.extend(self._release_empty(blocks, affinities, nodes, now))
        for cidr in list(self._empty_since):
            if cidr not in blocks or not blocks[cidr].is_empty() or cidr in released:
                del self._empty_since[cidr]
        return NodePass(tuple(deleted_nodes), tuple(released), len(blocks))

    def _node_exists(self, node: str) -> bool:
        try:
            self._store.get(keys.resource_key("nodes", node))
            return True
        except NotFound:
            return False

    def _aged(self, cidr: str, now: float) -> bool:
        first, passes = self._empty_since.get(cidr, (now, 0))
        self._empty_since[cidr] = (first, passes + 1)
        return passes + 1 >= 2 and now - first >= self._empty_block_age

    def _release_empty(self, blocks: dict[str, Block], affinities: dict[str, dict[str, str]],
                       nodes: set[str], now: float) -> list[str]:
        released: list[str] = []
        for node, family in sorted((n, f) for n in nodes for f in (4, 6)):
            owned = sorted(c for c, state in affinities.get(node, {}).items()
                           if state == AFFINITY_CONFIRMED and c in blocks and blocks[c].host == node
                           and blocks[c].cidr.version == family)
            empty = [c for c in owned if blocks[c].is_empty()]
            # Keep the node's last block of each family: when every one is empty, the first stays.
            if empty and len(empty) == len(owned):
                self._empty_since.pop(empty[0], None)
                empty = empty[1:]
            for cidr in empty:
                if not self._aged(cidr, now):
                    continue
                try:
                    self._ipam.release_affinity(node, cidr, must_be_empty=True)
                except IPAMError as err:
                    log.info("kept empty block node=%s cidr=%s reason=%s", node, cidr, err)
                    continue
                log.info("Released empty block node=%s cidr=%s", node, cidr)
                released.append(cidr)
        for cidr, block in sorted(blocks.items()):
            # Orphans: unowned blocks, and blocks whose owner is gone but that no affinity
            # points at (so the deleted-node cleanup above cannot find them).
            if block.host is not None and block.host in nodes:
                continue
            if not block.is_empty() or not self._aged(cidr, now):
                continue
            if self._delete_orphan_block(cidr):
                released.append(cidr)
        return released

    def _delete_orphan_block(self, cidr: str) -> bool:
        key = keys.block_key(cidr)
        try:
            kv = self._store.get(key)
            block = Block.from_json(kv.value)
            if not block.is_empty() or (block.host is not None and self._node_exists(block.host)):
                return False
            self._store.delete(key, kv.revision)  # CAS: an address assigned meanwhile keeps it
        except (NotFound, Conflict, BlockError):
            return False
        log.info("Deleted empty orphan block cidr=%s owner=%s", cidr, block.host or "-")
        return True
