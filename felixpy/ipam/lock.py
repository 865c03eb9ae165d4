"""The migration lock at IPAM's write boundary: no IPAM write while the datastore is locked.

`felixctl datastore migrate lock` sets ClusterInformation `default`'s datastoreReady to false so
that nothing changes the datastore while it is exported; Calico's CNI plugin then refuses ADD and
DEL, and kube-controllers skip their IPAM sync. Every IPAM write goes through the Datastore the
IPAM facade was given, so one wrapper there (`GuardedStore`) stops them all: `guard()` runs
before each create, update and delete and raises DatastoreLockedError while locked. Reads pass.

Who decides "locked": the agent's CNI server asks its config watch, which follows
ClusterInformation through the syncer (no extra read per write); other writers without a watch
use `ClusterLock`, which reads ClusterInformation at most once per `ttl`. Only an explicit
`datastoreReady: false` locks; a datastore without ClusterInformation is one nobody has locked.
felixctl's IPAM commands do not take the lock, as calicoctl's do not (an operator repairs IPAM
during a migration).
"""

from __future__ import annotations

import threading
import time
from typing import Any, Callable

from felixpy.datastore import keys
from felixpy.datastore.api import KV, Datastore, NotFound, Watch
from felixpy.ipam.errors import IPAMError

LOCKED = ("the datastore is locked for migration (ClusterInformation datastoreReady=false): "
          "IPAM changes are refused until `felixctl datastore migrate unlock`")
CLUSTER_INFORMATION_KEY = keys.resource_key("clusterinformations", "default")


class DatastoreLockedError(IPAMError):
    """An IPAM write while ClusterInformation datastoreReady=false."""

    def __init__(self) -> None:
        super().__init__(LOCKED)


def locked(value: Any) -> bool:
    """Does this stored ClusterInformation lock the datastore?"""
    spec = value.get("spec") if isinstance(value, dict) else None
    return isinstance(spec, dict) and spec.get("datastoreReady") is False


class ClusterLock:
    """The lock as read from the datastore, at most once per `ttl` seconds (thread-safe)."""

    def __init__(self, store: Datastore, ttl: float = 1.0, clock: Callable[[], float] = time.monotonic) -> None:
        self._store = store
        self._ttl = ttl
        self._clock = clock
        self._lock = threading.Lock()
        self._checked: tuple[float, bool] | None = None

    def is_locked(self) -> bool:
        with self._lock:
            now = self._clock()
            if self._checked is None or now - self._checked[0] >= self._ttl:
                try:
                    value = self._store.get(CLUSTER_INFORMATION_KEY).value
                except NotFound:
                    value = None
                self._checked = (now, locked(value))
            return self._checked[1]

    def check(self) -> None:
        if self.is_locked():
            raise DatastoreLockedError()


class GuardedStore:
    """`store` with `guard()` called before every write."""

    def __init__(self, store: Datastore, guard: Callable[[], None]) -> None:
        self._store = store
        self._guard = guard

    def get(self, key: str) -> KV:
        return self._store.get(key)

    def list(self, prefix: str) -> tuple[list[KV], int]:
        return self._store.list(prefix)

    def create(self, key: str, value: Any) -> KV:
        self._guard()
        return self._store.create(key, value)

    def update(self, key: str, value: Any, revision: int) -> KV:
        self._guard()
        return self._store.update(key, value, revision)

    def delete(self, key: str, revision: int | None = None) -> None:
        self._guard()
        self._store.delete(key, revision)

    def watch(self, prefix: str, start_revision: int) -> Watch:
        return self._store.watch(prefix, start_revision)

    def close(self) -> None:
        self._store.close()
