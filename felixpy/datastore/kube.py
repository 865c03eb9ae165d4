"""The Kubernetes datastore backend (DATASTORE_TYPE=kubernetes) of the datastore contract (api.py).

Keys map onto Kubernetes objects as Calico's KDD stores them (kube_mapping.py): Calico resources
and IPAM objects are crd.projectcalico.org/v1 custom resources, Nodes carry Calico's fields in
annotations, WorkloadEndpoints are Pods (plus the CNI plugin's pod annotations), Profiles are
Namespaces and Kubernetes NetworkPolicies appear as Calico NetworkPolicies knp.default.<name>.

Revisions are resourceVersions read as integers. The API conventions call resourceVersion opaque;
every API server backed by etcd uses etcd's global revision, and this backend relies on that (an
object's resourceVersion is its mod revision; list and watch resourceVersions are comparable across
kinds). Compare-and-swap: update = PUT (or a merge PATCH for Nodes and Pods) carrying
metadata.resourceVersion, 409 Conflict → Conflict; create = POST, 409 AlreadyExists →
AlreadyExists; delete = DELETE with preconditions.resourceVersion.

Several kinds under one prefix: list() lists each kind and returns the smallest list
resourceVersion, a revision every kind's snapshot is at least as new as. It also remembers each
kind's own list resourceVersion (and, for kinds derived from larger Kubernetes objects, which
objects gave which key). watch(prefix, revision + 1) right after that list watches every kind from
its own list resourceVersion: no gap (each kind resumes exactly where its snapshot ended) and no
duplicate (nothing its snapshot already held is replayed). Any other start revision R watches
every kind from R - 1, which on an etcd-backed server means "every change with revision >= R".
Events of one kind arrive in revision order; events of different kinds are merged as they come.
Each kind's stream requests bookmarks and resumes from the newest resourceVersion it has seen when
the server ends it (timeoutSeconds); a 410 Gone (an ERROR event with a Status of code 410, or an
HTTP 410) becomes Compacted, a server that cannot be reached Unavailable.

The `kubernetes` package is imported only to read kubeconfig / in-cluster configuration (contexts,
client certificates, token refresh); requests go through urllib3, which it depends on, so that the
watch streams and error codes stay under this module's control. Both are imported lazily: nothing
else in felixpy pays for them.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
import queue
import socket
import threading
import time
from builtins import list as List
from dataclasses import dataclass
from typing import Any, Iterator, Mapping

from felixpy.datastore import kube_mapping as m
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

REQUEST_TIMEOUT = 10.0  # one request never waits longer: outages must surface as Unavailable
WATCH_TIMEOUT_SECONDS = 300  # the server ends each watch after this; we resume from the last RV
WRITE_RETRIES = 5  # re-reads when a Pod/Node changed under a create (kubelet status writes)
_MARKS_KEPT = 8  # list() snapshots remembered for the watch that follows
LIST_PAGE_SIZE = 500  # client-go's pager default
LIST_ATTEMPTS = 3  # a paged list whose snapshot expired between pages starts over this often


class KubeConfigError(ValueError):
    """The Kubernetes client configuration cannot be loaded; one line for the user."""


@dataclass(frozen=True, slots=True)
class ClientSettings:
    host: str  # https://host:port
    headers: Mapping[str, str]
    ca_file: str | None
    cert_file: str | None
    key_file: str | None
    verify: bool


def load_settings(
    *, kubeconfig: str | None = None, context: str | None = None, in_cluster: bool = False,
    api_endpoint: str | None = None, ca_file: str | None = None, cert_file: str | None = None,
    key_file: str | None = None, insecure: bool = False,
) -> Any:
    """A kubernetes.client.Configuration from a kubeconfig file or the in-cluster service account."""
    try:
        from kubernetes import client as k8s_client
        from kubernetes import config as k8s_config
    except ImportError:
        raise KubeConfigError("the Kubernetes datastore needs the `kubernetes` Python package") from None
    cfg = k8s_client.Configuration()
    try:
        if in_cluster:
            k8s_config.load_incluster_config(client_configuration=cfg)  # type: ignore[no-untyped-call]
        else:
            k8s_config.load_kube_config(  # type: ignore[no-untyped-call]
                config_file=kubeconfig, context=context, client_configuration=cfg)
    except Exception as err:  # the loaders raise several unrelated types; all mean "unusable config"
        where = "in-cluster service account" if in_cluster else f"kubeconfig {kubeconfig}"
        raise KubeConfigError(f"{where}: {str(err).splitlines()[0] if str(err) else type(err).__name__}") from None
    if api_endpoint:
        cfg.host = api_endpoint.rstrip("/")
    if ca_file:
        cfg.ssl_ca_cert = ca_file
    if cert_file:
        cfg.cert_file = cert_file
    if key_file:
        cfg.key_file = key_file
    if insecure:
        cfg.verify_ssl = False
    return cfg


def open_kube_datastore(env: Mapping[str, str]) -> "KubeDatastore":
    """KubeDatastore from calico-node's variables (§1.5): KUBECONFIG, else $HOME/.kube/config if it
    exists, else the in-cluster service account; K8S_API_ENDPOINT, K8S_CA_FILE, K8S_CERT_FILE,
    K8S_KEY_FILE, K8S_INSECURE_SKIP_TLS_VERIFY, K8S_CURRENT_CONTEXT override. Raises
    KubeConfigError (a ValueError) with one line."""
    def get(name: str) -> str:
        return (env.get(f"CALICO_{name}") or env.get(name) or "").strip()

    kubeconfig = get("KUBECONFIG") or None
    if kubeconfig is None and env.get("HOME"):
        candidate = os.path.join(env["HOME"], ".kube", "config")
        if os.path.exists(candidate):
            kubeconfig = candidate
    in_cluster = kubeconfig is None
    if in_cluster and not env.get("KUBERNETES_SERVICE_HOST") and not get("K8S_API_ENDPOINT"):
        raise KubeConfigError(
            "DATASTORE_TYPE=kubernetes: set KUBECONFIG, create $HOME/.kube/config, or run in a pod")
    cfg = load_settings(
        kubeconfig=kubeconfig, context=get("K8S_CURRENT_CONTEXT") or None, in_cluster=in_cluster,
        api_endpoint=get("K8S_API_ENDPOINT") or None, ca_file=get("K8S_CA_FILE") or None,
        cert_file=get("K8S_CERT_FILE") or None, key_file=get("K8S_KEY_FILE") or None,
        insecure=get("K8S_INSECURE_SKIP_TLS_VERIFY").lower() == "true",
    )
    return KubeDatastore(cfg)


class _ApiError(Exception):
    """A non-2xx answer: HTTP code, Status reason and message."""

    def __init__(self, code: int, reason: str, message: str) -> None:
        super().__init__(f"{code} {reason}: {message}")
        self.code = code
        self.reason = reason
        self.message = message


class _Http:
    """JSON requests to the API server over one urllib3 pool (thread-safe)."""

    def __init__(self, cfg: Any, timeout: float) -> None:
        import urllib3

        self._urllib3 = urllib3
        self._cfg = cfg
        self._timeout = timeout
        self.host = cfg.host.rstrip("/")
        kwargs: dict[str, Any] = {"maxsize": 16, "block": False}
        if self.host.startswith("https"):
            kwargs["cert_reqs"] = "CERT_REQUIRED" if cfg.verify_ssl else "CERT_NONE"
            if cfg.ssl_ca_cert:
                kwargs["ca_certs"] = cfg.ssl_ca_cert
            if cfg.cert_file:
                kwargs["cert_file"] = cfg.cert_file
            if cfg.key_file:
                kwargs["key_file"] = cfg.key_file
            if not cfg.verify_ssl:
                urllib3.disable_warnings(urllib3.exceptions.InsecureRequestWarning)
        self._pool = urllib3.PoolManager(**kwargs)
        # A write that was sent is never re-sent (read=0): it must not be applied twice. Reads may
        # be retried once, e.g. on a pooled keep-alive connection the server closed meanwhile.
        # urllib3 would answer a 429 carrying Retry-After with MaxRetryError (status=0): the status
        # is ours to read, and request()/stream() honour Retry-After themselves.
        self._retries = urllib3.Retry(total=2, connect=2, read=0, redirect=0, status=0, other=0,
                                      respect_retry_after_header=False)
        self._read_retries = urllib3.Retry(total=2, connect=2, read=1, redirect=0, status=0, other=0,
                                           respect_retry_after_header=False)

    def _headers(self, content_type: str | None) -> dict[str, str]:
        headers = {"Accept": "application/json", "User-Agent": "felixpy"}
        token = self._bearer_token()
        if token:
            headers["Authorization"] = token
        elif self._cfg.username or self._cfg.password:
            headers.update(self._urllib3.make_headers(basic_auth=f"{self._cfg.username}:{self._cfg.password}"))
        if content_type:
            headers["Content-Type"] = content_type
        return headers

    def _bearer_token(self) -> str | None:
        """"Bearer <token>" from the loaded configuration (kubeconfig token or token file, exec
        plugin, in-cluster service account), asked for on every request: the loaders' refresh hook
        renews expiring tokens. The client library keeps it under "BearerToken" (older releases:
        "authorization"); its auth_settings() says which, so read it from there."""
        for setting in (self._cfg.auth_settings() or {}).values():
            if setting.get("in") == "header" and str(setting.get("key", "")).lower() == "authorization":
                value = setting.get("value")
                if value:
                    return str(value)
        return None

    def request(self, method: str, path: str, *, query: Mapping[str, str] | None = None,
                body: Any = None, content_type: str = "application/json") -> dict[str, Any]:
        url = self.host + path
        data = None if body is None else json.dumps(body).encode()
        deadline = time.monotonic() + self._timeout
        while True:
            try:
                resp = self._pool.request(
                    method, url, fields=query if method == "GET" else None, body=data,
                    headers=self._headers(content_type if data is not None else None),
                    timeout=self._urllib3.Timeout(connect=self._timeout, read=self._timeout),
                    retries=self._read_retries if method == "GET" else self._retries,
                )
            except self._urllib3.exceptions.HTTPError as err:
                raise Unavailable(f"{method} {path}: Kubernetes API unreachable ({type(err).__name__})") from None
            wait = _retry_after(resp.status, resp.headers)
            if wait is None or time.monotonic() + wait > deadline:
                return self._decode(method, path, resp.status, resp.data)
            # 429 with Retry-After: the server did not process the request (a new CRD's watch
            # cache still initializing, API priority and fairness shedding load), so even a write
            # is safe to send again, as client-go does; bounded by the request timeout.
            time.sleep(wait)

    @staticmethod
    def _decode(method: str, path: str, status: int, raw: bytes) -> dict[str, Any]:
        try:
            obj = json.loads(raw) if raw else {}
        except ValueError:
            obj = {}
        if 200 <= status < 300:
            return obj if isinstance(obj, dict) else {}
        reason = obj.get("reason", "") if isinstance(obj, dict) else ""
        message = obj.get("message", "") if isinstance(obj, dict) else ""
        raise _ApiError(status, reason or "Unknown", message or raw[:200].decode(errors="replace"))

    def stream(self, path: str, query: Mapping[str, str], read_timeout: float) -> Any:
        """An open watch response (preload off); the caller reads lines and closes it."""
        deadline = time.monotonic() + self._timeout
        while True:
            try:
                resp = self._pool.request(
                    "GET", self.host + path, fields=query, headers=self._headers(None), preload_content=False,
                    # A watch is a GET: re-sending it over a fresh connection when a pooled one
                    # turns out dead (the API server restarted) is safe.
                    timeout=self._urllib3.Timeout(connect=self._timeout, read=read_timeout),
                    retries=self._read_retries,
                )
            except self._urllib3.exceptions.HTTPError as err:
                raise Unavailable(f"watch {path}: Kubernetes API unreachable ({type(err).__name__})") from None
            if resp.status == 200:
                return resp
            raw = resp.read()
            resp.close()
            wait = _retry_after(resp.status, resp.headers)
            if wait is None or time.monotonic() + wait > deadline:
                self._decode("GET", path, resp.status, raw)  # raises for every non-2xx
                raise Unavailable(f"watch {path}: unexpected status {resp.status}")
            time.sleep(wait)

    def close(self) -> None:
        self._pool.clear()


def _retry_after(status: int, headers: Any) -> float | None:
    """Seconds to wait before sending a request again that the server refused unprocessed, or None."""
    if status != 429:
        return None
    raw = str(headers.get("Retry-After") or "")
    return min(float(raw), 1.0) if raw.isdigit() else None


def _digest(value: Any) -> str:
    return hashlib.sha1(json.dumps(value, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _obj_id(obj: dict[str, Any]) -> str:
    meta = obj.get("metadata") or {}
    return f"{meta.get('namespace', '')}/{meta.get('name', '')}"


@dataclass(frozen=True, slots=True)
class _Mark:
    """What one list() saw of one kind: its list resourceVersion and, for derived kinds, each
    Kubernetes object's key and value digest (so that the watch skips changes that are no-ops)."""

    revision: int
    seen: Mapping[str, tuple[str | None, str]]
    primed: bool = True  # False: started from a bare revision, `seen` knows nothing


class KubeDatastore:
    def __init__(self, cfg: Any, *, timeout: float = REQUEST_TIMEOUT,
                 watch_timeout_seconds: int = WATCH_TIMEOUT_SECONDS, list_page_size: int = LIST_PAGE_SIZE) -> None:
        self._http = _Http(cfg, timeout)
        self._watch_timeout = watch_timeout_seconds
        self._page_size = list_page_size
        self._lock = threading.Lock()
        self._marks: dict[tuple[str, int], dict[str, _Mark]] = {}

    # -- helpers ---------------------------------------------------------------------------
    def _call(self, what: str, method: str, path: str, **kwargs: Any) -> dict[str, Any]:
        try:
            return self._http.request(method, path, **kwargs)
        except _ApiError as err:
            if err.code == 404:
                raise NotFound(f"{what}: not found") from None
            if err.code == 409 and err.reason == "AlreadyExists":
                raise AlreadyExists(f"{what}: already exists") from None
            if err.code == 409:
                raise Conflict(f"{what}: {err.message}") from None
            if err.code == 410:
                raise Compacted(f"{what}: {err.message}") from None
            if err.code in (429,) or err.code >= 500:
                raise Unavailable(f"{what}: Kubernetes API answered {err.code} {err.reason}") from None
            raise DatastoreError(f"{what}: Kubernetes API answered {err.code} {err.reason}: {err.message}") from None

    @staticmethod
    def _locate(what: str, key: str) -> m.Location:
        try:
            return m.locate(key)
        except m.MappingError as err:
            raise DatastoreError(f"{what}: {err}") from None

    @staticmethod
    def _kv(loc: m.Location, key: str, obj: dict[str, Any]) -> KV | None:
        converted = loc.kind.convert(obj)
        if converted is None or converted[0] != key:
            return None
        return KV(key, converted[1], m.revision_of(obj))

    def _read_only(self, what: str, loc: m.Location) -> DatastoreError:
        source = {m.NAMESPACES.id: "Namespace", m.SERVICE_ACCOUNTS.id: "ServiceAccount",
                  m.SERVICES.id: "Kubernetes Service", m.ENDPOINT_SLICES.id: "Kubernetes EndpointSlice"}.get(
            loc.kind.id, "Kubernetes NetworkPolicy")
        return DatastoreError(f"{what}: derived from the {source} and read-only in the Kubernetes datastore")

    # -- reads -----------------------------------------------------------------------------
    def get(self, key: str) -> KV:
        loc = self._locate(f"get {key}", key)
        obj = self._call(f"get {key}", "GET", loc.kind.object_path(loc.name, loc.namespace))
        kv = self._kv(loc, key, obj)
        if kv is None:
            raise NotFound(f"get {key}: not found")
        return kv

    def list(self, prefix: str) -> tuple[list[KV], int]:
        items: list[KV] = []
        marks: dict[str, _Mark] = {}
        for kind in m.kinds_for_prefix(prefix):
            kvs, mark = self._list_kind(kind, prefix)
            items.extend(kvs)
            marks[kind.id] = mark
        if not marks:
            raise DatastoreError(f"list {prefix}: the Kubernetes datastore has no keys under this prefix")
        revision = min(mark.revision for mark in marks.values())
        with self._lock:
            self._marks[(prefix, revision)] = marks
            while len(self._marks) > _MARKS_KEPT:
                del self._marks[next(iter(self._marks))]
        items.sort(key=lambda kv: kv.key)
        return items, revision

    def _list_kind(self, kind: m.Kind, prefix: str) -> tuple[List[KV], _Mark]:
        what = f"list {prefix} ({kind.resource})"
        for _ in range(LIST_ATTEMPTS):
            try:
                items, list_rv = self._list_pages(what, kind, prefix)
                break
            except _ContinueExpired:
                continue  # the snapshot the pages came from was compacted away: list again
        else:
            raise Unavailable(f"{what}: the list kept expiring between pages ({LIST_ATTEMPTS} attempts)")
        kvs: List[KV] = []
        seen: dict[str, tuple[str | None, str]] = {}
        for obj in items:
            converted = kind.convert(obj)
            if kind.derived:
                seen[_obj_id(obj)] = (converted[0], _digest(converted[1])) if converted else (None, "")
            if converted is not None and converted[0].startswith(prefix):
                kvs.append(KV(converted[0], converted[1], m.revision_of(obj)))
        return kvs, _Mark(list_rv, seen)

    def _list_pages(self, what: str, kind: m.Kind, prefix: str) -> tuple[List[dict[str, Any]], int]:
        """Every item of a collection, in pages of `list_page_size` as client-go's pager reads
        them (a large cluster's Pods in one response would cost the API server and us a burst of
        memory). Every page comes from the first page's snapshot: its resourceVersion is the list's."""
        items: List[dict[str, Any]] = []
        query = {"limit": str(self._page_size)} if self._page_size else {}
        list_rv: int | None = None
        while True:
            try:
                result = self._http.request("GET", self._collection(kind, prefix), query=query)
            except _ApiError as err:
                if err.code == 410 and "continue" in query:
                    raise _ContinueExpired() from None
                if err.code == 404:
                    raise DatastoreError(
                        f"{what}: the API server does not serve {kind.api}/{kind.resource}; "
                        "are the felixpy CRDs installed?") from None
                if err.code == 403:
                    raise DatastoreError(f"{what}: forbidden: {err.message}") from None
                if err.code in (429,) or err.code >= 500:
                    raise Unavailable(f"{what}: Kubernetes API answered {err.code} {err.reason}") from None
                raise DatastoreError(f"{what}: {err}") from None
            meta = result.get("metadata") or {}
            if list_rv is None:
                try:
                    list_rv = int(meta.get("resourceVersion", ""))
                except ValueError:
                    raise DatastoreError(f"{what}: list resourceVersion is not an integer") from None
            items.extend(result.get("items") or [])
            token = meta.get("continue")
            if not token:
                return items, list_rv
            query = {"limit": str(self._page_size), "continue": str(token)}

    def _collection(self, kind: m.Kind, prefix: str) -> str:
        """The narrowest collection path for a prefix: one namespace when the prefix names one."""
        if kind.namespaced and prefix.startswith(kind.key_prefix):
            rest = prefix[len(kind.key_prefix):]
            if "/" in rest:
                return kind.collection_path(rest.split("/", 1)[0])
        return kind.collection_path()

    # -- writes ----------------------------------------------------------------------------
    def create(self, key: str, value: Any) -> KV:
        what = f"create {key}"
        loc = self._locate(what, key)
        if not loc.kind.writable:
            raise self._read_only(what, loc)
        if loc.kind is m.NODES:
            return self._create_node(what, loc, key, value)
        if loc.kind is m.PODS:
            return self._create_wep(what, loc, key, value)
        try:
            obj = m.object_for(loc, value)
        except m.MappingError as err:
            raise DatastoreError(f"{what}: {err}") from None
        try:
            created = self._http.request("POST", loc.kind.collection_path(loc.namespace), body=obj)
        except _ApiError as err:
            if err.code == 409:
                raise AlreadyExists(f"{what}: already exists") from None
            if err.code == 404:  # the namespace does not exist, or the CRD is not installed
                raise DatastoreError(f"{what}: {err.message}") from None
            raise self._write_error(what, err) from None
        kv = self._kv(loc, key, created)
        if kv is None:
            raise DatastoreError(f"{what}: the API server stored an object that does not map back to the key")
        return kv

    def update(self, key: str, value: Any, revision: int) -> KV:
        what = f"update {key}"
        loc = self._locate(what, key)
        if not loc.kind.writable:
            raise self._read_only(what, loc)
        if loc.kind is m.NODES:
            return self._update_node(what, loc, key, value, revision)
        if loc.kind is m.PODS:
            return self._patch_wep(what, loc, key, value, revision, creating=False)
        try:
            obj = m.object_for(loc, value)
        except m.MappingError as err:
            raise DatastoreError(f"{what}: {err}") from None
        obj["metadata"]["resourceVersion"] = str(revision)
        try:
            updated = self._http.request("PUT", loc.kind.object_path(loc.name, loc.namespace), body=obj)
        except _ApiError as err:
            raise self._write_error(what, err) from None
        kv = self._kv(loc, key, updated)
        if kv is None:
            raise DatastoreError(f"{what}: the API server stored an object that does not map back to the key")
        return kv

    def delete(self, key: str, revision: int | None = None) -> None:
        what = f"delete {key}"
        loc = self._locate(what, key)
        if not loc.kind.writable:
            raise self._read_only(what, loc)
        if loc.kind is m.PODS:
            self._delete_wep(what, loc, key, revision)
            return
        path = loc.kind.object_path(loc.name, loc.namespace)
        if loc.kind in (m.HANDLES, m.AFFINITIES) or loc.kind is m.NODES:
            # Names are lower-cased or hashed: make sure the object really is this key's.
            current = self.get(key)
            if revision is None:
                revision = current.revision
        body: dict[str, Any] = {"apiVersion": "v1", "kind": "DeleteOptions"}
        if revision is not None:
            body["preconditions"] = {"resourceVersion": str(revision)}
        try:
            self._http.request("DELETE", path, body=body)
        except _ApiError as err:
            raise self._write_error(what, err) from None

    @staticmethod
    def _write_error(what: str, err: _ApiError) -> DatastoreError:
        if err.code == 404:
            return NotFound(f"{what}: not found")
        if err.code == 409 and err.reason == "AlreadyExists":
            return AlreadyExists(f"{what}: already exists")
        if err.code == 409:
            return Conflict(f"{what}: {err.message}")
        if err.code in (429,) or err.code >= 500:
            return Unavailable(f"{what}: Kubernetes API answered {err.code} {err.reason}")
        return DatastoreError(f"{what}: Kubernetes API answered {err.code} {err.reason}: {err.message}")

    # Nodes: the Kubernetes Node belongs to the kubelet; we only patch our annotations and labels.
    def _node(self, what: str, loc: m.Location) -> dict[str, Any]:
        return self._call(what, "GET", loc.kind.object_path(loc.name))

    def _create_node(self, what: str, loc: m.Location, key: str, value: Any) -> KV:
        try:
            self._node(what, loc)
        except NotFound:
            raise DatastoreError(
                f'{what}: Kubernetes has no Node "{loc.name}"; in the Kubernetes datastore Nodes are '
                "created by the kubelet") from None
        raise AlreadyExists(f"{what}: already exists")

    def _update_node(self, what: str, loc: m.Location, key: str, value: Any, revision: int) -> KV:
        current = self._node(what, loc)
        if m.revision_of(current) != revision:
            raise Conflict(f"{what}: revision {revision} is stale (now {m.revision_of(current)})")
        try:
            patch = m.node_patch(current, value)
        except m.MappingError as err:
            raise DatastoreError(f"{what}: {err}") from None
        updated = self._merge_patch(what, loc.kind.object_path(loc.name), patch, revision)
        return KV(key, m.node_value(updated), m.revision_of(updated))

    def _merge_patch(self, what: str, path: str, patch: dict[str, Any], revision: int) -> Any:
        """A JSON merge patch that only applies while the object is still at `revision` (CAS)."""
        patch["metadata"]["resourceVersion"] = str(revision)
        try:
            return self._http.request("PATCH", path, body=patch, content_type="application/merge-patch+json")
        except _ApiError as err:
            raise self._write_error(what, err) from None

    # WorkloadEndpoints: the Pod belongs to the kubelet; the CNI plugin's record is three annotations.
    def _create_wep(self, what: str, loc: m.Location, key: str, value: Any) -> KV:
        for _ in range(WRITE_RETRIES):
            pod = self._call(what, "GET", loc.kind.object_path(loc.name, loc.namespace))
            if m.wep_value(pod) is not None and m.PODS.key_of(pod) == key:
                raise AlreadyExists(f"{what}: already exists")
            try:
                return self._patch_wep(what, loc, key, value, m.revision_of(pod), creating=True, pod=pod)
            except Conflict:
                continue  # the kubelet wrote the Pod meanwhile: look again
        raise Conflict(f"{what}: the Pod kept changing under {WRITE_RETRIES} attempts")

    def _patch_wep(self, what: str, loc: m.Location, key: str, value: Any, revision: int, *,
                   creating: bool, pod: dict[str, Any] | None = None) -> KV:
        if pod is None:
            pod = self._call(what, "GET", loc.kind.object_path(loc.name, loc.namespace))
            if m.wep_value(pod) is None:
                raise NotFound(f"{what}: not found")
        if m.PODS.key_of(pod) != key:
            node = (pod.get("spec") or {}).get("nodeName") or "no node"
            raise DatastoreError(f"{what}: the Pod is scheduled to {node}, which does not match the key")
        try:
            patch = m.wep_patch(value, key)
        except m.MappingError as err:
            raise DatastoreError(f"{what}: {err}") from None
        updated = self._merge_patch(what, loc.kind.object_path(loc.name, loc.namespace), patch, revision)
        kv = self._kv(loc, key, updated)
        if kv is None:
            raise DatastoreError(f"{what}: the Pod does not carry a WorkloadEndpoint after the patch")
        return kv

    def _delete_wep(self, what: str, loc: m.Location, key: str, revision: int | None) -> None:
        current = self.get(key)  # NotFound when the Pod carries no endpoint of this key
        patch = copy.deepcopy(m.WEP_REMOVE_PATCH)
        patch["metadata"]["resourceVersion"] = str(current.revision if revision is None else revision)
        try:
            self._http.request("PATCH", loc.kind.object_path(loc.name, loc.namespace), body=patch,
                               content_type="application/merge-patch+json")
        except _ApiError as err:
            raise self._write_error(what, err) from None

    # -- watch -----------------------------------------------------------------------------
    def watch(self, prefix: str, start_revision: int) -> "KubeWatch":
        kinds = m.kinds_for_prefix(prefix)
        if not kinds:
            raise DatastoreError(f"watch {prefix}: the Kubernetes datastore has no keys under this prefix")
        with self._lock:
            marks = self._marks.get((prefix, start_revision - 1))
        starts: dict[str, _Mark] = {}
        for kind in kinds:
            if marks is not None and kind.id in marks:
                starts[kind.id] = marks[kind.id]
            else:
                starts[kind.id] = _Mark(max(start_revision - 1, 1), {}, primed=False)
        return KubeWatch(self, prefix, kinds, starts)

    def close(self) -> None:
        self._http.close()


class _ContinueExpired(Exception):
    """A continue token outlived its snapshot (410 on a later page): the list must start over."""


_STOP = object()


class KubeWatch:
    """Merges one watch stream per kind into batches of WatchEvents; raises Compacted / Unavailable."""

    def __init__(self, store: KubeDatastore, prefix: str, kinds: list[m.Kind], starts: Mapping[str, _Mark]) -> None:
        self._store = store
        self._prefix = prefix
        self._queue: queue.Queue[Any] = queue.Queue()
        self._closed = threading.Event()
        self._responses: dict[str, Any] = {}
        self._resp_lock = threading.Lock()
        self._threads = [
            threading.Thread(target=self._run, args=(kind, starts[kind.id]), name=f"kube-watch-{kind.resource}",
                             daemon=True)
            for kind in kinds
        ]
        for t in self._threads:
            t.start()

    def __iter__(self) -> Iterator[list[WatchEvent]]:
        while True:
            item = self._queue.get()
            if item is _STOP or self._closed.is_set():
                return
            if isinstance(item, BaseException):
                self.close()
                raise item
            batch: list[WatchEvent] = list(item)
            # Coalesce what is already waiting into one batch (a burst of writes, one callback).
            while True:
                try:
                    more = self._queue.get_nowait()
                except queue.Empty:
                    break
                if more is _STOP or isinstance(more, BaseException):
                    self._queue.put(more)
                    break
                batch.extend(more)
            if batch:
                yield batch

    def close(self) -> None:
        if self._closed.is_set():
            return
        self._closed.set()
        with self._resp_lock:
            responses = list(self._responses.values())
        for resp in responses:
            _abort(resp)
        self._queue.put(_STOP)

    # -- one kind's stream -------------------------------------------------------------------
    def _run(self, kind: m.Kind, start: _Mark) -> None:
        rv = start.revision
        seen: dict[str, tuple[str | None, str]] = dict(start.seen)
        primed = start.primed
        path = self._store._collection(kind, self._prefix)
        query = {"watch": "true", "allowWatchBookmarks": "true", "resourceVersion": str(rv),
                 "timeoutSeconds": str(self._store._watch_timeout)}
        read_timeout = self._store._watch_timeout + 30.0
        try:
            while not self._closed.is_set():
                query["resourceVersion"] = str(rv)
                try:
                    resp = self._store._http.stream(path, query, read_timeout)
                except _ApiError as err:
                    if err.code == 410:
                        raise Compacted(f"watch {self._prefix} ({kind.resource}) from {rv}: {err.message}") from None
                    if err.code == 404:
                        raise DatastoreError(f"watch {kind.api}/{kind.resource}: not served; are the CRDs installed?") from None
                    if err.code in (401, 403):
                        raise DatastoreError(f"watch {kind.resource}: {err.code} {err.reason}: {err.message}") from None
                    raise Unavailable(f"watch {kind.resource}: Kubernetes API answered {err.code} {err.reason}") from None
                with self._resp_lock:
                    self._responses[kind.id] = resp
                try:
                    rv = self._consume(kind, resp, rv, seen, primed)
                finally:
                    with self._resp_lock:
                        self._responses.pop(kind.id, None)
                    # Never hand a finished stream's connection back to the pool: the server may
                    # be closing it, and a write reusing it would fail.
                    resp.close()
                # The server ended the stream (timeoutSeconds): resume where we are.
        except DatastoreError as err:
            if not self._closed.is_set():
                self._queue.put(err)
        except Exception as err:  # a broken stream: urllib3 / socket errors of many kinds
            if not self._closed.is_set():
                self._queue.put(Unavailable(f"watch {kind.resource}: stream broken ({type(err).__name__})"))

    def _consume(self, kind: m.Kind, resp: Any, rv: int, seen: dict[str, tuple[str | None, str]], primed: bool) -> int:
        buffer = b""
        for chunk in resp.stream(65536, decode_content=True):
            if self._closed.is_set():
                return rv
            buffer += chunk
            while b"\n" in buffer:
                line, buffer = buffer.split(b"\n", 1)
                if line.strip():
                    rv = self._event(kind, json.loads(line), rv, seen, primed)
        return rv

    def _event(self, kind: m.Kind, event: dict[str, Any], rv: int, seen: dict[str, tuple[str | None, str]],
               primed: bool) -> int:
        etype = str(event.get("type"))
        obj = event.get("object") or {}
        if etype == "ERROR":
            code = obj.get("code")
            if code == 410:
                raise Compacted(f"watch {self._prefix} ({kind.resource}) from {rv}: {obj.get('message', '')}")
            raise Unavailable(f"watch {kind.resource}: error event {code} {obj.get('reason', '')}")
        revision = m.revision_of(obj)
        if etype == "BOOKMARK":
            return max(rv, revision)
        events: list[WatchEvent] = []
        if not kind.derived:
            # One object, one key: every event is a change of that key.
            key = kind.key_of(obj)
            converted = None if etype == "DELETED" else kind.convert(obj)
            if converted is not None:
                events.append(WatchEvent(converted[0], converted[1], revision))
            elif key is not None:
                events.append(WatchEvent(key, None, revision))
        else:
            events = self._derived_event(kind, etype, obj, revision, seen, primed)
        events = [e for e in events if e.key and e.key.startswith(self._prefix)]
        if events:
            self._queue.put(events)
        return max(rv, revision)

    @staticmethod
    def _derived_event(kind: m.Kind, etype: str, obj: dict[str, Any], revision: int,
                       seen: dict[str, tuple[str | None, str]], primed: bool) -> list[WatchEvent]:
        """Events for a Pod / Node / Namespace / NetworkPolicy change: only what changed for us.

        `seen` holds, per Kubernetes object, the key it stood for and a digest of the value last
        emitted; a kubelet status write that leaves the endpoint unchanged emits nothing."""
        oid = _obj_id(obj)
        old_key, old_digest = seen.get(oid, (None, ""))
        if etype == "DELETED":
            if oid in seen:
                gone = seen.pop(oid)[0]
            else:
                last = kind.convert(obj)  # a DELETED event carries the object's last state
                gone = last[0] if last else (None if primed else kind.key_of(obj))
            return [WatchEvent(gone, None, revision)] if gone else []
        converted = kind.convert(obj)
        events: list[WatchEvent] = []
        if converted is None:
            if old_key is not None:
                events.append(WatchEvent(old_key, None, revision))
            elif not primed and oid not in seen and etype == "MODIFIED":
                # Watching from a bare revision we do not know what this object stood for
                # before: say its key is gone (a no-op delete is harmless, a missed one is not).
                gone = kind.key_of(obj)
                if gone:
                    events.append(WatchEvent(gone, None, revision))
            seen[oid] = (None, "")
            return events
        key, value = converted
        digest = _digest(value)
        if old_key is not None and old_key != key:
            events.append(WatchEvent(old_key, None, revision))
        if old_key != key or old_digest != digest:
            events.append(WatchEvent(key, value, revision))
        seen[oid] = (key, digest)
        return events


def _abort(resp: Any) -> None:
    """Wake a thread blocked reading a watch stream: shut the socket down under it."""
    try:
        sock = resp.connection.sock if resp.connection is not None else None
        if sock is not None:
            sock.shutdown(socket.SHUT_RDWR)
    except (OSError, AttributeError):
        pass
