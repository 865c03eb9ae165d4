"""The etcd v3 backend of the datastore contract (api.py), on the `etcd3` package.

Every conditional write is one etcd transaction: create compares the key's create_revision with 0,
update and delete compare its mod_revision with the revision the caller read. The failure branch
reads the key back so that Conflict and NotFound can be told apart in the same round trip.

The etcd3 package's high-level `transaction()` hides the response header, which carries the
revision a write produced, so the transactions are sent through its KV stub directly.

Watches run on the package's watcher thread and are handed over through a queue; a broken gRPC
stream becomes Unavailable and a compacted start revision becomes Compacted, both raised from the
iterator so that the syncer can relist.
"""

from __future__ import annotations

import json
import logging
import queue
import threading
from typing import Any, Callable, Iterator, TypeVar
from urllib.parse import urlsplit

import etcd3
import grpc
from etcd3 import etcdrpc
from etcd3 import exceptions as etcd_exceptions
from etcd3 import utils as etcd_utils

from felixpy.datastore.api import (
    KV,
    AlreadyExists,
    Compacted,
    Conflict,
    DatastoreError,
    NotFound,
    Unavailable,
    WatchEvent,
)

log = logging.getLogger(__name__)

T = TypeVar("T")

# One request to etcd never waits longer than this; an outage must surface as Unavailable quickly
# so that callers (the CNI server, felixctl) can answer with an error instead of hanging.
REQUEST_TIMEOUT = 5.0


def parse_endpoint(url: str) -> tuple[str, int, bool]:
    """`http(s)://host:port` → (host, port, tls)."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"etcd endpoint {url!r}: expected http(s)://host:port")
    return parts.hostname, parts.port or 2379, parts.scheme == "https"


def _encode(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":"), sort_keys=True).encode()


def _decode(key: str, raw: bytes) -> Any:
    try:
        return json.loads(raw)
    except ValueError:
        log.warning("etcd value is not JSON, treating as absent key=%s", key)
        return None


class EtcdDatastore:
    def __init__(
        self,
        endpoints: list[str],
        *,
        ca_cert: str | None = None,
        cert_key: str | None = None,
        cert_cert: str | None = None,
        timeout: float = REQUEST_TIMEOUT,
    ) -> None:
        if not endpoints:
            raise ValueError("no etcd endpoints given")
        self._endpoints = [parse_endpoint(e) for e in endpoints]
        self._tls = (ca_cert, cert_key, cert_cert)
        self._timeout = timeout
        self._lock = threading.Lock()
        self._current = 0
        self._client = self._connect()

    # -- connection ------------------------------------------------------------------------
    def _connect(self) -> etcd3.Etcd3Client:
        host, port, tls = self._endpoints[self._current]
        ca, key, cert = self._tls
        return etcd3.client(
            host=host,
            port=port,
            ca_cert=ca if tls else None,
            cert_key=key if tls else None,
            cert_cert=cert if tls else None,
            timeout=self._timeout,
        )

    def _failover(self) -> None:
        """Move to the next endpoint after an outage (a no-op with one endpoint)."""
        if len(self._endpoints) == 1:
            return
        with self._lock:
            old = self._client
            self._current = (self._current + 1) % len(self._endpoints)
            self._client = self._connect()
        try:
            old.close()
        except Exception:  # closing a broken channel may fail; the new one is what matters
            pass

    def _call(self, what: str, fn: Callable[[etcd3.Etcd3Client], T]) -> T:
        try:
            return fn(self._client)
        except grpc.RpcError as err:
            self._failover()
            code = err.code() if hasattr(err, "code") else None
            raise Unavailable(f"{what}: etcd unavailable ({code})") from None
        except (etcd_exceptions.ConnectionFailedError, etcd_exceptions.ConnectionTimeoutError) as err:
            self._failover()
            raise Unavailable(f"{what}: etcd unavailable ({type(err).__name__})") from None
        except etcd_exceptions.Etcd3Exception as err:
            raise DatastoreError(f"{what}: {type(err).__name__}: {err}") from None

    def _txn(self, what: str, request: Any) -> Any:
        return self._call(
            what,
            lambda c: c.kvstub.Txn(
                request, self._timeout, credentials=c.call_credentials, metadata=c.metadata
            ),
        )

    # -- reads -----------------------------------------------------------------------------
    def get(self, key: str) -> KV:
        resp = self._call(f"get {key}", lambda c: c.kvstub.Range(
            etcdrpc.RangeRequest(key=key.encode()), self._timeout,
            credentials=c.call_credentials, metadata=c.metadata))
        if not resp.kvs:
            raise NotFound(f"get {key}: not found")
        kv = resp.kvs[0]
        return KV(key, _decode(key, kv.value), kv.mod_revision)

    def list(self, prefix: str) -> tuple[list[KV], int]:
        request = etcdrpc.RangeRequest(
            key=prefix.encode(),
            range_end=etcd_utils.increment_last_byte(etcd_utils.to_bytes(prefix)),
            sort_order=etcdrpc.RangeRequest.ASCEND,
            sort_target=etcdrpc.RangeRequest.KEY,
        )
        resp = self._call(f"list {prefix}", lambda c: c.kvstub.Range(
            request, self._timeout, credentials=c.call_credentials, metadata=c.metadata))
        items = []
        for kv in resp.kvs:
            key = kv.key.decode()
            value = _decode(key, kv.value)
            if value is not None:
                items.append(KV(key, value, kv.mod_revision))
        return items, resp.header.revision

    # -- writes ----------------------------------------------------------------------------
    def create(self, key: str, value: Any) -> KV:
        k = key.encode()
        request = etcdrpc.TxnRequest(
            compare=[etcdrpc.Compare(key=k, result=etcdrpc.Compare.EQUAL,
                                     target=etcdrpc.Compare.CREATE, create_revision=0)],
            success=[etcdrpc.RequestOp(request_put=etcdrpc.PutRequest(key=k, value=_encode(value)))],
            failure=[],
        )
        resp = self._txn(f"create {key}", request)
        if not resp.succeeded:
            raise AlreadyExists(f"create {key}: already exists")
        return KV(key, value, resp.header.revision)

    def update(self, key: str, value: Any, revision: int) -> KV:
        k = key.encode()
        request = etcdrpc.TxnRequest(
            compare=[etcdrpc.Compare(key=k, result=etcdrpc.Compare.EQUAL,
                                     target=etcdrpc.Compare.MOD, mod_revision=revision)],
            success=[etcdrpc.RequestOp(request_put=etcdrpc.PutRequest(key=k, value=_encode(value)))],
            failure=[etcdrpc.RequestOp(request_range=etcdrpc.RangeRequest(key=k, keys_only=True))],
        )
        resp = self._txn(f"update {key}", request)
        if not resp.succeeded:
            self._raise_cas_failure("update", key, revision, resp)
        return KV(key, value, resp.header.revision)

    def delete(self, key: str, revision: int | None = None) -> None:
        k = key.encode()
        if revision is None:
            compare = [etcdrpc.Compare(key=k, result=etcdrpc.Compare.GREATER,
                                       target=etcdrpc.Compare.CREATE, create_revision=0)]
        else:
            compare = [etcdrpc.Compare(key=k, result=etcdrpc.Compare.EQUAL,
                                       target=etcdrpc.Compare.MOD, mod_revision=revision)]
        request = etcdrpc.TxnRequest(
            compare=compare,
            success=[etcdrpc.RequestOp(request_delete_range=etcdrpc.DeleteRangeRequest(key=k))],
            failure=[etcdrpc.RequestOp(request_range=etcdrpc.RangeRequest(key=k, keys_only=True))],
        )
        resp = self._txn(f"delete {key}", request)
        if not resp.succeeded:
            self._raise_cas_failure("delete", key, revision, resp)

    @staticmethod
    def _raise_cas_failure(op: str, key: str, revision: int | None, resp: Any) -> None:
        kvs = resp.responses[0].response_range.kvs if resp.responses else []
        if not kvs:
            raise NotFound(f"{op} {key}: not found")
        raise Conflict(f"{op} {key}: revision {revision} is stale (now {kvs[0].mod_revision})")

    # -- admin (tests, benchmarks) ---------------------------------------------------------
    def delete_prefix(self, prefix: str) -> None:
        self._call(f"delete prefix {prefix}", lambda c: c.delete_prefix(prefix))

    def compact(self, revision: int) -> None:
        self._call(f"compact {revision}", lambda c: c.compact(revision, physical=True))

    # -- watch -----------------------------------------------------------------------------
    def watch(self, prefix: str, start_revision: int) -> "EtcdWatch":
        return EtcdWatch(self, prefix, start_revision)

    def close(self) -> None:
        try:
            self._client.close()
        except Exception:
            pass


_STOP = object()


class EtcdWatch:
    """Iterates batches of WatchEvents; raises Compacted / Unavailable from the iterator."""

    def __init__(self, store: EtcdDatastore, prefix: str, start_revision: int) -> None:
        self._store = store
        self._prefix = prefix
        self._queue: queue.Queue[Any] = queue.Queue()
        self._closed = False
        client = store._client
        try:
            self._watch_id = client.add_watch_prefix_callback(
                prefix, self._queue.put, start_revision=start_revision)
        except etcd_exceptions.RevisionCompactedError as err:
            raise Compacted(
                f"watch {prefix} from {start_revision}: compacted at {err.compacted_revision}") from None
        except (grpc.RpcError, etcd_exceptions.Etcd3Exception) as err:
            store._failover()
            raise Unavailable(f"watch {prefix}: etcd unavailable ({type(err).__name__})") from None
        self._client = client

    def __iter__(self) -> Iterator[list[WatchEvent]]:
        while True:
            item = self._queue.get()
            if item is _STOP or self._closed:
                return
            if isinstance(item, etcd_exceptions.RevisionCompactedError):
                raise Compacted(f"watch {self._prefix}: compacted at {item.compacted_revision}")
            if isinstance(item, BaseException):
                raise Unavailable(f"watch {self._prefix}: stream broken ({type(item).__name__})")
            batch = []
            for ev in item.events:
                key = ev.key.decode()
                if isinstance(ev, etcd3.events.DeleteEvent):
                    batch.append(WatchEvent(key, None, ev.mod_revision))
                else:
                    batch.append(WatchEvent(key, _decode(key, ev.value), ev.mod_revision))
            if batch:
                yield batch

    def close(self) -> None:
        self._closed = True
        try:
            self._client.cancel_watch(self._watch_id)
        except Exception:
            pass
        self._queue.put(_STOP)
