"""Mirror Kubernetes into etcd (etcd mode): what Calico's kube-controllers' namespace, service
account, pod and policy controllers do.

Watched from the Kubernetes API (list, then watch from the list's resourceVersion; relist on 410
Gone or a broken stream):

| Kubernetes object | written to etcd |
|---|---|
| Namespace `<ns>` | Profile `kns.<ns>`: allow all, `labelsToApply` `pcns.<label>` + `pcns.projectcalico.org/name` |
| ServiceAccount `<ns>/<sa>` | Profile `ksa.<ns>.<sa>`: no rules, `labelsToApply` `pcsa.<label>` + `pcsa.projectcalico.org/name` |
| networking.k8s.io NetworkPolicy `<ns>/<name>` | NetworkPolicy `<ns>/knp.default.<name>` (policy/k8s.py) |
| Pod `<ns>/<pod>` on node `<n>` | labels, named ports, serviceAccountName of the existing WorkloadEndpoint `<n>-k8s-<pod>-eth0` |
| Service `<ns>/<name>` | `kubernetesservices/<ns>/<name>`: the fields BGP service advertisement reads |
| discovery.k8s.io EndpointSlice `<ns>/<name>` | `kubernetesendpointslices/<ns>/<name>`: its Service, endpoints' nodes and readiness |

WorkloadEndpoints are the CNI plugin's: the mirror never creates or deletes one, it only keeps
the labels (pod labels plus projectcalico.org/namespace, orchestrator, serviceaccount) and named
ports of an endpoint that exists. Endpoints are watched in etcd too, so an endpoint the CNI plugin
writes after the pod was seen gets its labels at once rather than at the next resync.

Every write is compare-and-swap and idempotent: a value that is already right is not written.
Deletions follow Kubernetes deletions; a full resync (every `resync_period`, and after each
relist) also deletes mirrored objects that no Kubernetes object stands for any more -- only
objects the mirror owns (`kns.*`, `ksa.*` Profiles and `knp.default.*` policies), and only once
every watched kind has been listed completely.
"""

from __future__ import annotations

import json
import logging
import queue
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Mapping

from felixpy import names
from felixpy.datastore import keys
from felixpy.datastore.api import Conflict, Datastore, DatastoreError, NotFound
from felixpy.datastore.cas import read_modify_write

log = logging.getLogger(__name__)

DEFAULT_RESYNC_PERIOD = 5 * 60.0
RETRY_INTERVAL = 2.0
MAX_RETRY_INTERVAL = 30.0
WATCH_TIMEOUT_SECONDS = 300
CAS_RETRIES = 10

NAMESPACE_PROFILE_PREFIX = names.NAMESPACE_PROFILE_PREFIX
SERVICE_ACCOUNT_PROFILE_PREFIX = names.SERVICE_ACCOUNT_PROFILE_PREFIX
K8S_POLICY_PREFIX = "knp.default."
NAMESPACE_LABEL = "projectcalico.org/namespace"
ORCHESTRATOR_LABEL = "projectcalico.org/orchestrator"
SERVICE_ACCOUNT_LABEL = "projectcalico.org/serviceaccount"
CALICO_API_VERSION = "projectcalico.org/v3"


# -- what each Kubernetes object becomes (pure) ------------------------------------------------------


def _meta(obj: Mapping[str, Any]) -> Mapping[str, Any]:
    meta = obj.get("metadata")
    return meta if isinstance(meta, Mapping) else {}


def namespace_profile(ns: Mapping[str, Any]) -> tuple[str, dict[str, Any]]:
    """(key, value) of the kns.<ns> Profile of a Namespace."""
    from felixpy.datastore.kube_mapping import profile_value

    name = str(_meta(ns).get("name", ""))
    return keys.resource_key("profiles", NAMESPACE_PROFILE_PREFIX + name), profile_value(dict(ns))


def service_account_profile(sa: Mapping[str, Any]) -> tuple[str, dict[str, Any]]:
    """(key, value) of the ksa.<ns>.<sa> Profile of a ServiceAccount (kube-controllers' shape:
    labels to apply, no rules; the namespace profile carries the allow-all)."""
    meta = _meta(sa)
    ns, name = str(meta.get("namespace", "")), str(meta.get("name", ""))
    labels = {f"pcsa.{k}": str(v) for k, v in (meta.get("labels") or {}).items()}
    labels["pcsa.projectcalico.org/name"] = name
    profile = f"{SERVICE_ACCOUNT_PROFILE_PREFIX}{ns}.{name}"
    value = {"apiVersion": CALICO_API_VERSION, "kind": "Profile", "metadata": {"name": profile},
             "spec": {"labelsToApply": labels}}
    return keys.resource_key("profiles", profile), value


def policy_key(namespace: str, name: str) -> str:
    return keys.resource_key("networkpolicies", K8S_POLICY_PREFIX + name, namespace or "default")


def network_policy(np: Mapping[str, Any]) -> tuple[str, dict[str, Any] | None]:
    """(key, Calico policy) of a Kubernetes NetworkPolicy; the value is None when it cannot be
    converted (the mirrored copy is then removed rather than left stale)."""
    from policy.k8s import convert_k8s_networkpolicy

    meta = _meta(np)
    key = policy_key(str(meta.get("namespace") or "default"), str(meta.get("name", "")))
    full = dict(np)
    full.setdefault("apiVersion", "networking.k8s.io/v1")  # list items carry no kind of their own
    full.setdefault("kind", "NetworkPolicy")
    try:
        return key, convert_k8s_networkpolicy(full)
    except ValueError as err:
        log.warning("cannot mirror NetworkPolicy key=%s error=%s", key, err)
        return key, None


def endpoint_key(pod: Mapping[str, Any]) -> str | None:
    """The key of the WorkloadEndpoint the CNI plugin writes for this pod, None if unscheduled."""
    meta = _meta(pod)
    node = (pod.get("spec") or {}).get("nodeName")
    if not node or not meta.get("name") or not meta.get("namespace") or (pod.get("spec") or {}).get("hostNetwork"):
        return None
    name = names.workload_endpoint_name(str(node), str(meta["name"]))
    return keys.resource_key("workloadendpoints", name, str(meta["namespace"]))


def pod_labels(pod: Mapping[str, Any]) -> dict[str, str]:
    meta = _meta(pod)
    labels = {str(k): str(v) for k, v in (meta.get("labels") or {}).items()}
    labels[NAMESPACE_LABEL] = str(meta.get("namespace", ""))
    labels[ORCHESTRATOR_LABEL] = "k8s"
    account = (pod.get("spec") or {}).get("serviceAccountName")
    if account:
        labels[SERVICE_ACCOUNT_LABEL] = str(account)
    return labels


def pod_ports(pod: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Named container ports, as WorkloadEndpoint ports (what named ports in policy resolve to)."""
    ports = []
    for container in (pod.get("spec") or {}).get("containers") or []:
        for port in container.get("ports") or []:
            if port.get("name"):
                ports.append({"name": port["name"], "protocol": port.get("protocol") or "TCP",
                              "port": port.get("containerPort", 0)})
    return ports


def endpoint_with_pod(wep: Mapping[str, Any], pod: Mapping[str, Any]) -> dict[str, Any]:
    """The endpoint value with the pod's labels, named ports and service account (policy's
    serviceAccounts matches and ksa.<ns>.<sa> labels follow it); everything else as the CNI
    plugin wrote it."""
    out = json.loads(json.dumps(wep))  # a deep copy of plain JSON
    out.setdefault("metadata", {})["labels"] = pod_labels(pod)
    spec = out.setdefault("spec", {})
    spec["ports"] = pod_ports(pod)
    account = (pod.get("spec") or {}).get("serviceAccountName")
    if account:
        spec["serviceAccountName"] = str(account)
    else:
        spec.pop("serviceAccountName", None)
    return out


def service_copy(obj: Mapping[str, Any]) -> tuple[str, dict[str, Any]]:
    """(key, value) of a Service in etcd: the fields BGP service advertisement reads."""
    from felixpy.datastore.kube_mapping import SERVICE_PLURAL, service_value

    meta = _meta(obj)
    key = keys.resource_key(SERVICE_PLURAL, str(meta.get("name", "")), str(meta.get("namespace") or "default"))
    return key, service_value(dict(obj))


def endpoint_slice_copy(obj: Mapping[str, Any]) -> tuple[str, dict[str, Any]]:
    from felixpy.datastore.kube_mapping import ENDPOINT_SLICE_PLURAL, endpoint_slice_value

    meta = _meta(obj)
    key = keys.resource_key(ENDPOINT_SLICE_PLURAL, str(meta.get("name", "")), str(meta.get("namespace") or "default"))
    return key, endpoint_slice_value(dict(obj))


COPIED_PLURALS = ("kubernetesservices", "kubernetesendpointslices")


def owned_key(key: str) -> bool:
    """Is this a key only the mirror writes (and so may delete when stale)?"""
    parsed = keys.parse_key(key)
    if parsed.kind != "resource":
        return False
    if parsed.plural in COPIED_PLURALS:
        return True
    if parsed.plural == "profiles":
        return parsed.name.startswith((NAMESPACE_PROFILE_PREFIX, SERVICE_ACCOUNT_PROFILE_PREFIX))
    return parsed.plural == "networkpolicies" and parsed.name.startswith(K8S_POLICY_PREFIX)


# -- the Kubernetes side -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Source:
    """One watched Kubernetes collection."""

    name: str  # namespaces, pods, serviceaccounts, networkpolicies
    path: str  # the collection URL path, all namespaces


SOURCES = (
    Source("namespaces", "/api/v1/namespaces"),
    Source("serviceaccounts", "/api/v1/serviceaccounts"),
    Source("networkpolicies", "/apis/networking.k8s.io/v1/networkpolicies"),
    Source("pods", "/api/v1/pods"),
    Source("services", "/api/v1/services"),
    Source("endpointslices", "/apis/discovery.k8s.io/v1/endpointslices"),
)


class Gone(Exception):
    """The watch's resourceVersion is too old (410): list again."""


def _object_id(obj: Mapping[str, Any]) -> tuple[str, str]:
    meta = _meta(obj)
    return str(meta.get("namespace") or ""), str(meta.get("name") or "")


def _rv(obj: Mapping[str, Any]) -> str:
    return str(_meta(obj).get("resourceVersion") or "")


class KubeReader:
    """List and watch raw Kubernetes collections over the Kubernetes datastore's HTTP layer."""

    def __init__(self, http: Any, *, watch_timeout_seconds: int = WATCH_TIMEOUT_SECONDS) -> None:
        self._http = http
        self._timeout = watch_timeout_seconds
        self._lock = threading.Lock()
        self._open: set[Any] = set()
        self._closed = False

    def list(self, path: str) -> tuple[list[dict[str, Any]], str]:
        """Every object of the collection and the list's resourceVersion; raises DatastoreError."""
        from felixpy.datastore.kube import _ApiError

        try:
            body = self._http.request("GET", path)
        except _ApiError as err:
            raise DatastoreError(f"list {path}: Kubernetes API answered {err.code} {err.reason}") from None
        items = [i for i in body.get("items") or [] if isinstance(i, dict)]
        return items, str(_meta(body).get("resourceVersion") or "")

    def watch(self, path: str, resource_version: str) -> Iterator[tuple[str, dict[str, Any]]]:
        """(type, object) events after resource_version, bookmarks included, until the server ends
        the stream; raises Gone on 410 and DatastoreError when the stream breaks."""
        from felixpy.datastore.kube import _ApiError

        query = {"watch": "true", "allowWatchBookmarks": "true", "resourceVersion": resource_version,
                 "timeoutSeconds": str(self._timeout)}
        try:
            resp = self._http.stream(path, query, self._timeout + 30.0)
        except _ApiError as err:
            if err.code == 410:
                raise Gone(err.message) from None
            raise DatastoreError(f"watch {path}: Kubernetes API answered {err.code} {err.reason}") from None
        with self._lock:
            if self._closed:
                resp.close()
                return
            self._open.add(resp)
        try:
            buffer = b""
            try:
                for chunk in resp.stream(65536, decode_content=True):
                    buffer += chunk
                    while b"\n" in buffer:
                        line, buffer = buffer.split(b"\n", 1)
                        if not line.strip():
                            continue
                        event = json.loads(line)
                        etype, obj = str(event.get("type")), event.get("object") or {}
                        if etype == "ERROR":
                            if obj.get("code") == 410:
                                raise Gone(str(obj.get("message", "")))
                            raise DatastoreError(f"watch {path}: error event {obj.get('code')} {obj.get('reason', '')}")
                        yield etype, obj
            except (Gone, DatastoreError):
                raise
            except Exception as err:  # urllib3 / socket errors of many kinds: a broken stream
                if not self._closed:
                    raise DatastoreError(f"watch {path}: stream broken ({type(err).__name__})") from None
        finally:
            with self._lock:
                self._open.discard(resp)
            resp.close()

    def close(self) -> None:
        from felixpy.datastore.kube import _abort

        with self._lock:
            self._closed = True
            streams = list(self._open)
        for resp in streams:
            _abort(resp)


# -- the controller ------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class MirrorPass:
    """What one full resync wrote."""

    written: int
    deleted: int
    endpoints_updated: int


class Mirror:
    """Keeps etcd in step with the Kubernetes objects above. run() blocks until stop()."""

    def __init__(self, store: Datastore, reader: KubeReader, *, resync_period: float = DEFAULT_RESYNC_PERIOD,
                 retry_interval: float = RETRY_INTERVAL, clock: Callable[[], float] = time.monotonic) -> None:
        self._store = store
        self._reader = reader
        self._resync_period = resync_period
        self._retry_interval = retry_interval
        self._clock = clock
        self._lock = threading.Lock()
        self._objects: dict[str, dict[tuple[str, str], dict[str, Any]]] = {s.name: {} for s in SOURCES}
        self._listed: set[str] = set()
        self._dirty: queue.Queue[tuple[str, tuple[str, str]] | str] = queue.Queue()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._syncer: Any = None
        self.resyncs = 0
        self.writes = 0
        self.deletes = 0

    # -- lifecycle ---------------------------------------------------------------------------
    def start(self) -> None:
        """Start the watches and the worker in the background."""
        from felixpy.datastore.syncer import Syncer

        for source in SOURCES:
            t = threading.Thread(target=self._watch_source, args=(source,), name=f"mirror-{source.name}", daemon=True)
            t.start()
            self._threads.append(t)
        self._syncer = Syncer(self._store, self._on_endpoints, prefix=keys.resource_prefix("workloadendpoints"))
        self._syncer.start()
        worker = threading.Thread(target=self._work, name="mirror-worker", daemon=True)
        worker.start()
        self._threads.append(worker)
        log.info("mirror running resync_period=%.0fs", self._resync_period)

    def stop(self) -> None:
        self._stop.set()
        self._dirty.put("stop")
        self._reader.close()
        if self._syncer is not None:
            self._syncer.stop()

    def join(self, timeout: float = 5.0) -> None:
        deadline = time.monotonic() + timeout
        for t in self._threads:
            t.join(max(0.0, deadline - time.monotonic()))

    @property
    def in_sync(self) -> bool:
        """Every kind listed at least once (deletions of stale objects are allowed)."""
        with self._lock:
            return len(self._listed) == len(SOURCES)

    # -- Kubernetes side ------------------------------------------------------------------------
    def _watch_source(self, source: Source) -> None:
        delay = self._retry_interval
        while not self._stop.is_set():
            try:
                items, rv = self._reader.list(source.path)
                self._replace(source, items)
                delay = self._retry_interval
                while not self._stop.is_set():
                    for etype, obj in self._reader.watch(source.path, rv):
                        if self._stop.is_set():
                            return
                        rv = _rv(obj) or rv
                        if etype != "BOOKMARK":
                            self._apply_event(source, etype, obj)
                    # The server ended the stream (timeoutSeconds): resume from the last version.
            except Gone:
                log.info("mirror watch expired, listing again kind=%s", source.name)
            except DatastoreError as err:
                if self._stop.is_set():
                    return
                log.warning("mirror watch failed, retrying in %.0fs kind=%s error=%s", delay, source.name, err)
                self._stop.wait(delay)
                delay = min(delay * 2, MAX_RETRY_INTERVAL)

    def _replace(self, source: Source, items: list[dict[str, Any]]) -> None:
        fresh = {_object_id(o): o for o in items}
        with self._lock:
            old = self._objects[source.name]
            changed = {i for i in set(old) | set(fresh) if _rv(old.get(i, {})) != _rv(fresh.get(i, {}))}
            self._objects[source.name] = fresh
            first = source.name not in self._listed
            self._listed.add(source.name)
        for ident in changed:
            self._dirty.put((source.name, ident))
        if first or changed:
            # A relist may have missed deletions of objects we never held: look for stale copies.
            self._dirty.put("resync")

    def _apply_event(self, source: Source, etype: str, obj: dict[str, Any]) -> None:
        ident = _object_id(obj)
        with self._lock:
            if etype == "DELETED":
                self._objects[source.name].pop(ident, None)
            else:
                self._objects[source.name][ident] = obj
        self._dirty.put((source.name, ident))

    def _on_endpoints(self, event: Any) -> None:
        if not isinstance(event, list):
            return
        for update in event:
            if update.value is None:
                continue
            parsed = keys.parse_key(update.key)
            pod = ((update.value or {}).get("spec") or {}).get("pod")
            if parsed.namespace and pod:
                self._dirty.put(("pods", (parsed.namespace, str(pod))))

    # -- etcd side ------------------------------------------------------------------------------
    def _work(self) -> None:
        next_resync = self._clock() + self._resync_period
        resync_wanted = False
        while not self._stop.is_set():
            try:
                item = self._dirty.get(timeout=max(0.05, min(1.0, next_resync - self._clock())))
            except queue.Empty:
                item = None
            if self._stop.is_set():
                return
            resync_wanted = resync_wanted or item == "resync" or self._clock() >= next_resync
            try:
                if isinstance(item, tuple):
                    self.reconcile(item[0], item[1])
                if resync_wanted:
                    # Until every kind is listed a missing object may only be not seen yet:
                    # the last first listing asks for the resync again.
                    if self.in_sync:
                        self.resync()
                    resync_wanted = False
                    next_resync = self._clock() + self._resync_period
            except DatastoreError as err:
                log.warning("mirror write failed, retrying in %.0fs error=%s", self._retry_interval, err)
                if isinstance(item, tuple):
                    self._requeue_later(item)
                self._stop.wait(self._retry_interval)

    def _requeue_later(self, item: tuple[str, tuple[str, str]]) -> None:
        timer = threading.Timer(self._retry_interval, self._dirty.put, args=(item,))
        timer.daemon = True
        timer.start()

    def _get(self, kind: str, ident: tuple[str, str]) -> dict[str, Any] | None:
        with self._lock:
            return self._objects[kind].get(ident)

    def reconcile(self, kind: str, ident: tuple[str, str]) -> None:
        """Bring etcd in line with one Kubernetes object (present or deleted)."""
        obj = self._get(kind, ident)
        ns, name = ident
        if kind == "namespaces":
            key = keys.resource_key("profiles", NAMESPACE_PROFILE_PREFIX + name)
            self._put_or_delete(key, None if obj is None else namespace_profile(obj)[1])
        elif kind == "serviceaccounts":
            key = keys.resource_key("profiles", f"{SERVICE_ACCOUNT_PROFILE_PREFIX}{ns}.{name}")
            self._put_or_delete(key, None if obj is None else service_account_profile(obj)[1])
        elif kind == "networkpolicies":
            value = None if obj is None else network_policy(obj)[1]
            self._put_or_delete(policy_key(ns, name), value)
        elif kind == "pods" and obj is not None:
            self._label_endpoint(obj)
        elif kind in ("services", "endpointslices"):
            plural = COPIED_PLURALS[0] if kind == "services" else COPIED_PLURALS[1]
            copy = service_copy if kind == "services" else endpoint_slice_copy
            self._put_or_delete(keys.resource_key(plural, name, ns or "default"),
                                None if obj is None else copy(obj)[1])

    def _put_or_delete(self, key: str, value: dict[str, Any] | None) -> bool:
        """Write value (or delete the key when None); True when the datastore changed."""
        if value is None:
            return self._delete(key)
        differs = False

        def change(current: Any) -> Any:
            nonlocal differs  # the last call is the one whose result was written (or not)
            differs = current != value
            return value

        read_modify_write(self._store, key, change, retries=CAS_RETRIES)
        if differs:
            self.writes += 1
            log.info("mirror wrote key=%s", key)
        return differs

    def _delete(self, key: str) -> bool:
        for _ in range(CAS_RETRIES):
            try:
                current = self._store.get(key)
                self._store.delete(key, current.revision)
            except NotFound:
                return False
            except Conflict:
                continue
            self.deletes += 1
            log.info("mirror deleted key=%s", key)
            return True
        raise Conflict(f"{key}: kept changing under {CAS_RETRIES} attempts to delete it")

    def _label_endpoint(self, pod: Mapping[str, Any]) -> bool:
        """Update the pod's WorkloadEndpoint labels and ports if the endpoint exists; never create."""
        key = endpoint_key(pod)
        if key is None:
            return False
        for _ in range(CAS_RETRIES):
            try:
                current = self._store.get(key)
            except NotFound:
                return False  # not networked (yet): the endpoint watch brings us back when it is
            wanted = endpoint_with_pod(current.value or {}, pod)
            if wanted == current.value:
                return False
            try:
                self._store.update(key, wanted, current.revision)
            except (Conflict, NotFound):
                continue
            self.writes += 1
            log.info("mirror labelled endpoint key=%s", key)
            return True
        raise Conflict(f"{key}: kept changing under {CAS_RETRIES} attempts to label it")

    def resync(self) -> MirrorPass:
        """Reconcile everything and delete owned copies that nothing in Kubernetes stands for."""
        with self._lock:
            snapshot = {kind: dict(objs) for kind, objs in self._objects.items()}
        wanted: dict[str, dict[str, Any] | None] = {}
        for obj in snapshot["namespaces"].values():
            key, profile = namespace_profile(obj)
            wanted[key] = profile
        for obj in snapshot["serviceaccounts"].values():
            key, profile = service_account_profile(obj)
            wanted[key] = profile
        for obj in snapshot["networkpolicies"].values():
            key, policy = network_policy(obj)
            wanted[key] = policy
        for obj in snapshot["services"].values():
            key, copied = service_copy(obj)
            wanted[key] = copied
        for obj in snapshot["endpointslices"].values():
            key, copied = endpoint_slice_copy(obj)
            wanted[key] = copied
        written = deleted = 0
        for key, value in wanted.items():
            if self._put_or_delete(key, value):
                written += value is not None
                deleted += value is None
        existing = self._store.list(keys.resource_prefix("profiles"))[0] + \
            self._store.list(keys.resource_prefix("networkpolicies"))[0]
        for plural in COPIED_PLURALS:
            existing += self._store.list(keys.resource_prefix(plural))[0]
        for kv in existing:
            if owned_key(kv.key) and kv.key not in wanted:
                try:
                    self._store.delete(kv.key, kv.revision)
                    deleted += 1
                    self.deletes += 1
                    log.info("mirror deleted stale key=%s", kv.key)
                except (NotFound, Conflict):
                    pass  # changed meanwhile: the next resync looks again
        updated = 0
        for pod in snapshot["pods"].values():
            updated += self._label_endpoint(pod)
        self.resyncs += 1
        result = MirrorPass(written=written, deleted=deleted, endpoints_updated=updated)
        log.info("mirror resync written=%d deleted=%d endpoints_updated=%d", written, deleted, updated)
        return result

    def run(self) -> None:
        self.start()
        try:
            self._stop.wait()
        finally:
            self.join()


def open_mirror(store: Datastore, env: Mapping[str, str], *, resync_period: float = DEFAULT_RESYNC_PERIOD) -> Mirror | None:
    """A Mirror onto store for the Kubernetes API env names, or None when none is configured."""
    from felixpy.node.k8s_node import open_kube_http

    http = open_kube_http(env)
    if http is None:
        return None
    return Mirror(store, KubeReader(http), resync_period=resync_period)
