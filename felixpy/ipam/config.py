"""The cluster-wide IPAM configuration (/calico/ipam/v2/config), as Calico's IPAMConfig.

MaxBlocksPerHost: 0 means 20 (current Calico; older releases treated 0 as unlimited). The cap
limits claims only, never allocation from blocks already owned. As in Calico's SetIPAMConfig,
maxBlocksPerHost > 0 requires strict_affinity, and strict_affinity=false together with
auto_allocate_blocks=false is rejected.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

from felixpy.datastore import keys
from felixpy.datastore.api import Datastore, NotFound
from felixpy.datastore.cas import compare_and_swap
from felixpy.ipam.errors import InvalidConfigError, TooManyConflictsError

DEFAULT_MAX_BLOCKS_PER_HOST = 20  # what maxBlocksPerHost = 0 means


@dataclass(frozen=True, slots=True)
class IPAMConfig:
    strict_affinity: bool = False
    auto_allocate_blocks: bool = True
    max_blocks_per_host: int = 0

    @property
    def block_cap(self) -> int:
        return self.max_blocks_per_host or DEFAULT_MAX_BLOCKS_PER_HOST

    def validate(self) -> None:
        if self.max_blocks_per_host < 0:
            raise InvalidConfigError(f"maxBlocksPerHost must be >= 0, not {self.max_blocks_per_host}")
        if self.max_blocks_per_host > 0 and not self.strict_affinity:
            raise InvalidConfigError("maxBlocksPerHost > 0 requires strict affinity to be enabled")
        if not self.strict_affinity and not self.auto_allocate_blocks:
            raise InvalidConfigError("auto_allocate_blocks=false requires strict affinity to be enabled")

    def to_json(self) -> dict[str, Any]:
        return {
            "strict_affinity": self.strict_affinity,
            "auto_allocate_blocks": self.auto_allocate_blocks,
            "maxBlocksPerHost": self.max_blocks_per_host,
        }

    @classmethod
    def from_json(cls, value: Mapping[str, Any]) -> IPAMConfig:
        return cls(
            strict_affinity=bool(value.get("strict_affinity", False)),
            auto_allocate_blocks=bool(value.get("auto_allocate_blocks", True)),
            max_blocks_per_host=int(value.get("maxBlocksPerHost") or 0),
        )


def read_config(store: Datastore) -> IPAMConfig:
    """The stored configuration; Calico's defaults when there is none."""
    try:
        kv = store.get(keys.IPAM_CONFIG)
    except NotFound:
        return IPAMConfig()
    return IPAMConfig.from_json(kv.value or {})


def write_config(store: Datastore, config: IPAMConfig, *, retries: int) -> None:
    """Validate and store config, keeping any fields of the stored object felixpy does not know."""
    config.validate()

    def merge(value: Any) -> tuple[dict[str, Any], None]:
        return {**(value or {}), **config.to_json()}, None

    compare_and_swap(store, keys.IPAM_CONFIG, merge, retries=retries,
                     what="write the IPAM configuration", error=TooManyConflictsError)
