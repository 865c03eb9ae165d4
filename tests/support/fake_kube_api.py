"""A small, honest stand-in for the Kubernetes API server, for the calls felixpy's KDD backend makes.

It serves exactly these resources over HTTP/1.1 on 127.0.0.1:

    /api/v1                           nodes, namespaces (cluster), pods, serviceaccounts, secrets, services
                                      (namespaced)
    /apis/networking.k8s.io/v1        networkpolicies (namespaced)
    /apis/discovery.k8s.io/v1         endpointslices (namespaced)
    /apis/crd.projectcalico.org/v1    Calico's KDD custom resources (CRD_RESOURCES)

and follows the API conventions for them (kubernetes.io/docs/reference/using-api/api-concepts):

* One global resourceVersion counter, as an etcd-backed API server has; every write bumps it and
  stamps the object. A write that changes nothing is not a write: no new resourceVersion, no event.
* Collections: GET list carries the counter in ListMeta.resourceVersion; with `limit` it is paged
  (metadata.continue), every page from the first page's snapshot, a token that outlived a
  compaction answering 410 Expired. POST creates (201; 409
  AlreadyExists for an existing name; 404 when the namespace does not exist; 422 for an invalid
  name). PUT replaces (404 when missing; 409 Conflict when metadata.resourceVersion or uid is
  stale; no resourceVersion = unconditional). PATCH takes application/merge-patch+json and
  application/strategic-merge-patch+json (applied as a JSON merge patch, which is what a strategic
  patch does for the map fields we patch: labels and annotations); metadata.resourceVersion in
  the patch is a precondition. DELETE honours DeleteOptions.preconditions.{resourceVersion,uid}.
  Errors are v1 Status objects with the standard reasons.
* Watch (?watch=true): newline-delimited JSON events ADDED / MODIFIED / DELETED, sent as HTTP
  chunks. From resourceVersion N: every event with resourceVersion > N; unset or "0": synthetic
  ADDED events for the current objects first. N older than the compaction point: one ERROR event
  carrying a Status with code 410 (reason Expired), then the stream ends, as the real server does
  for watches served from its cache. allowWatchBookmarks=true: a BOOKMARK (an object with only
  kind, apiVersion and metadata.resourceVersion) every `bookmark_interval` seconds of quiet.
  timeoutSeconds ends the stream cleanly.
* The nodes/status subresource (GET, PUT, PATCH): a write through it changes only `status`; spec
  and metadata keep their stored values (the node status strategy), metadata.resourceVersion in
  the body is still a precondition.

* fieldSelector=metadata.name=<name> on a collection (list and watch): what a client of one named
  object sends (the BGP secret watcher, as Calico's confd).
* labelSelector with equality terms (`k=v,k2=v2`) on a collection list, and the pods/<name>/log
  subresource (text/plain; the text a test set with `set_pod_log`; `container`, `sinceSeconds`,
  `timestamps` are accepted and recorded in `requests`, not applied): what `felixctl cluster
  diags` sends.

Not implemented (the backend does not send them, and the fake answers 400 rather than ignoring
them): set-based label selectors, other field selectors, JSON patch, generateName, dry-run.
Deleting a Namespace removes only the Namespace (no cascading, no Terminating phase).
"""

from __future__ import annotations

import copy
import dataclasses
import datetime
import json
import re
import threading
import time
import uuid
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable, Iterator
from urllib.parse import parse_qs, urlsplit

CRD_GROUP_VERSION = "crd.projectcalico.org/v1"
CRD_RESOURCES: dict[str, tuple[str, bool]] = {  # plural -> (kind, namespaced)
    "ippools": ("IPPool", False),
    "ipreservations": ("IPReservation", False),
    "ipamblocks": ("IPAMBlock", False),
    "blockaffinities": ("BlockAffinity", False),
    "ipamhandles": ("IPAMHandle", False),
    "ipamconfigs": ("IPAMConfig", False),
    "bgpconfigurations": ("BGPConfiguration", False),
    "bgppeers": ("BGPPeer", False),
    "felixconfigurations": ("FelixConfiguration", False),
    "networkpolicies": ("NetworkPolicy", True),
    "globalnetworkpolicies": ("GlobalNetworkPolicy", False),
    "clusterinformations": ("ClusterInformation", False),
    "bgpfilters": ("BGPFilter", False),
    "caliconodestatuses": ("CalicoNodeStatus", False),
    "tiers": ("Tier", False),
    "networksets": ("NetworkSet", True),
    "globalnetworksets": ("GlobalNetworkSet", False),
    "hostendpoints": ("HostEndpoint", False),
}

_DNS1123_SUBDOMAIN = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")
_DNS1123_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")


@dataclass(frozen=True, slots=True)
class ResourceType:
    group_version: str  # "v1" for the core group
    plural: str
    kind: str
    namespaced: bool

    @property
    def path_prefix(self) -> str:
        return "/api/v1" if self.group_version == "v1" else f"/apis/{self.group_version}"


def _types() -> dict[tuple[str, str], ResourceType]:
    types = [
        ResourceType("v1", "nodes", "Node", False),
        ResourceType("v1", "namespaces", "Namespace", False),
        ResourceType("v1", "pods", "Pod", True),
        ResourceType("v1", "serviceaccounts", "ServiceAccount", True),
        ResourceType("v1", "secrets", "Secret", True),
        ResourceType("v1", "services", "Service", True),
        ResourceType("networking.k8s.io/v1", "networkpolicies", "NetworkPolicy", True),
        ResourceType("discovery.k8s.io/v1", "endpointslices", "EndpointSlice", True),
    ]
    types += [ResourceType(CRD_GROUP_VERSION, p, k, ns) for p, (k, ns) in CRD_RESOURCES.items()]
    return {(t.group_version, t.plural): t for t in types}


@dataclasses.dataclass(frozen=True, order=True)
class RbacRequest:
    """One request as RBAC sees it: a ClusterRole rule grants it when it lists the group, the
    resource and the verb."""

    group: str  # "" for the core group
    resource: str  # plural, "nodes/status" for a subresource
    verb: str  # get list watch create update patch delete


_VERBS = {"POST": "create", "PUT": "update", "PATCH": "patch"}


def rbac_request(method: str, raw_path: str) -> RbacRequest | None:
    """The RBAC attributes of an HTTP request (k8s.io/apiserver's RequestInfoFactory, for what the
    fake serves): GET is get on a name, list on a collection, watch with ?watch=true; DELETE is
    delete on a name, deletecollection on a collection. None for paths outside /api and /apis."""
    parts = urlsplit(raw_path)
    segments = parts.path.strip("/").split("/")
    if segments[:2] == ["api", "v1"]:
        group, rest = "", segments[2:]
    elif segments[0] == "apis" and len(segments) >= 3:
        group, rest = segments[1], segments[3:]
    else:
        return None
    if len(rest) >= 3 and rest[0] == "namespaces":
        rest = rest[2:]
    if not rest or not rest[0]:
        return None
    resource = rest[0] + (f"/{rest[2]}" if len(rest) >= 3 else "")
    named = len(rest) >= 2
    query = parse_qs(parts.query)
    if method == "GET":
        verb = "watch" if query.get("watch", [""])[-1] in ("true", "1") else "get" if named else "list"
    elif method == "DELETE":
        verb = "delete" if named else "deletecollection"
    else:
        verb = _VERBS.get(method, method.lower())
    return RbacRequest(group, resource, verb)


class ApiError(Exception):
    def __init__(self, code: int, reason: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.reason = reason
        self.message = message


def status_object(code: int, reason: str, message: str) -> dict[str, Any]:
    return {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
            "message": message, "reason": reason, "code": code}


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386 JSON merge patch."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    result = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = merge_patch(result.get(key), value)
    return result


@dataclass(frozen=True, slots=True)
class _Event:
    revision: int
    rtype: ResourceType
    namespace: str
    type: str  # ADDED / MODIFIED / DELETED
    obj: dict[str, Any]


@dataclass(frozen=True, slots=True)
class _Target:
    rtype: ResourceType
    namespace: str  # "" for cluster-scoped, or a namespaced collection across all namespaces
    name: str  # "" for a collection
    subresource: str = ""  # "status" for nodes/<name>/status, "log" for pods/<name>/log
    field_name: str = ""  # fieldSelector=metadata.name=<name> on a collection
    labels: tuple[tuple[str, str], ...] = ()  # labelSelector equality terms on a collection


class FakeKubeAPI:
    """The server and its state; `url` once started. Thread-safe."""

    def __init__(self, *, bookmark_interval: float = 1.0) -> None:
        self.bookmark_interval = bookmark_interval
        self._types = _types()
        self._cond = threading.Condition()
        self._objects: dict[tuple[str, str, str, str], dict[str, Any]] = {}  # (gv, plural, ns, name)
        self._history: list[_Event] = []
        self._revision = 1  # like etcd: the empty store is revision 1, the first write is 2
        self._compacted = 1  # events with revision <= this are gone
        # Paginated lists (limit/continue): token -> (snapshot revision, the items still to send).
        self._continues: dict[str, tuple[int, list[dict[str, Any]]]] = {}
        self._watch_generation = 0  # bumped by drop_watches() to end every open stream
        self._stopping = False
        self.requests: list[tuple[str, str]] = []  # (method, path?query), for tests to inspect
        self.pod_logs: dict[tuple[str, str, str], str] = {}  # (namespace, pod, container) -> log text
        # Called with (method, path) before each request is handled: tests use it to interleave
        # another client's write (the kubelet's) at an exact point.
        self.before_request: Callable[[str, str], None] | None = None
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # -- lifecycle --------------------------------------------------------------------------
    def start(self) -> "FakeKubeAPI":
        api = self

        class Handler(_Handler):
            fake = api

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, args=(0.05,), name="fake-kube-api", daemon=True)
        self._thread.start()
        return self

    @property
    def url(self) -> str:
        assert self._server is not None, "not started"
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def stop(self) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()

    def kubeconfig(self) -> str:
        """A kubeconfig document (YAML is a superset of JSON) pointing at this server."""
        return json.dumps({
            "apiVersion": "v1", "kind": "Config", "current-context": "fake",
            "clusters": [{"name": "fake", "cluster": {"server": self.url}}],
            "users": [{"name": "fake", "user": {"token": "fake-token"}}],
            "contexts": [{"name": "fake", "context": {"cluster": "fake", "user": "fake"}}],
        })

    def rbac_requests(self, since: int = 0) -> set["RbacRequest"]:
        """What RBAC would authorize for requests[since:], as the real API server's RequestInfo
        names it (apiGroup, resource[/subresource], verb); paths outside the API are left out."""
        return {r for method, path in list(self.requests)[since:] if (r := rbac_request(method, path)) is not None}

    # -- test controls ----------------------------------------------------------------------
    @property
    def revision(self) -> int:
        with self._cond:
            return self._revision

    def compact(self, revision: int | None = None) -> None:
        """Forget history up to and including `revision` (default: everything so far)."""
        with self._cond:
            self._compacted = max(self._compacted, self._revision if revision is None else revision)
            self._history = [e for e in self._history if e.revision > self._compacted]

    def drop_watches(self) -> None:
        """End every open watch stream cleanly, as an API server restart or timeout does."""
        with self._cond:
            self._watch_generation += 1
            self._cond.notify_all()

    def put(self, path: str, obj: dict[str, Any]) -> dict[str, Any]:
        """Create an object directly, e.g. put("/api/v1/nodes", {...}) (tests' kubelet/kubectl)."""
        target = self._resolve(path)
        with self._cond:
            return self._create(target, obj)

    def modify(self, path: str, change: Callable[[dict[str, Any]], None]) -> dict[str, Any]:
        """Change a stored object in place through the normal write path (tests' kubelet)."""
        target = self._resolve(path)
        with self._cond:
            obj = copy.deepcopy(self._existing(target))
            change(obj)
            return self._write(target, obj, None)

    def object(self, path: str) -> dict[str, Any] | None:
        target = self._resolve(path)
        with self._cond:
            obj = self._objects.get(self._key(target.rtype, target.namespace, target.name))
            return copy.deepcopy(obj) if obj is not None else None

    def set_pod_log(self, namespace: str, pod: str, container: str, text: str) -> None:
        """What GET pods/<pod>/log?container=<container> answers (the pod must exist)."""
        self.pod_logs[(namespace, pod, container)] = text

    # -- request handling (called from handler threads) ---------------------------------------
    def _resolve(self, path: str) -> _Target:
        parts = path.strip("/").split("/")
        if parts[:2] == ["api", "v1"]:
            gv, rest = "v1", parts[2:]
        elif parts[0] == "apis" and len(parts) >= 3:
            gv, rest = f"{parts[1]}/{parts[2]}", parts[3:]
        else:
            gv, rest = "", []
        ns = ""
        if len(rest) >= 3 and rest[0] == "namespaces":
            ns, rest = rest[1], rest[2:]
        rtype = self._types.get((gv, rest[0])) if rest else None
        subresource = ""
        if rtype is not None and len(rest) == 3 and rest[2] == "status" and rtype.plural == "nodes":
            subresource, rest = "status", rest[:2]
        elif rtype is not None and len(rest) == 3 and rest[2] == "log" and rtype.plural == "pods":
            subresource, rest = "log", rest[:2]
        if rtype is None or len(rest) > 2 or (ns and not rtype.namespaced):
            raise ApiError(404, "NotFound", f"the server could not find the requested resource ({path})")
        return _Target(rtype, ns, rest[1] if len(rest) == 2 else "", subresource)

    @staticmethod
    def _key(rtype: ResourceType, namespace: str, name: str) -> tuple[str, str, str, str]:
        return (rtype.group_version, rtype.plural, namespace, name)

    def _stamp(self, rtype: ResourceType, obj: dict[str, Any]) -> dict[str, Any]:
        out = copy.deepcopy(obj)
        out["apiVersion"] = rtype.group_version
        out["kind"] = rtype.kind
        return out

    def _record(self, rtype: ResourceType, ns: str, type_: str, obj: dict[str, Any]) -> None:
        self._history.append(_Event(self._revision, rtype, ns, type_, copy.deepcopy(obj)))
        self._cond.notify_all()

    def _check_namespace(self, target: _Target) -> None:
        if target.rtype.namespaced:
            if not target.namespace:
                raise ApiError(405, "MethodNotAllowed", "the server does not allow this method on the requested resource")
            if self._key(self._types[("v1", "namespaces")], "", target.namespace) not in self._objects:
                raise ApiError(404, "NotFound", f'namespaces "{target.namespace}" not found')

    def _create(self, target: _Target, body: Any) -> dict[str, Any]:
        rtype = target.rtype
        if target.name or target.subresource:
            raise ApiError(405, "MethodNotAllowed", "POST goes to the collection")
        if not isinstance(body, dict) or not isinstance(body.get("metadata"), dict):
            raise ApiError(400, "BadRequest", "the body must be an object with metadata")
        meta = body["metadata"]
        name = meta.get("name")
        if not isinstance(name, str) or not name:
            raise ApiError(422, "Invalid", f"{rtype.kind} is invalid: metadata.name: Required value")
        pattern = _DNS1123_LABEL if rtype.plural == "namespaces" else _DNS1123_SUBDOMAIN
        limit = 63 if rtype.plural == "namespaces" else 253
        if len(name) > limit or not pattern.fullmatch(name):
            raise ApiError(422, "Invalid", f'{rtype.kind} "{name}" is invalid: metadata.name: Invalid value')
        if meta.get("namespace") and meta["namespace"] != target.namespace:
            raise ApiError(400, "BadRequest",
                           "the namespace of the provided object does not match the namespace sent on the request")
        if meta.get("resourceVersion"):
            raise ApiError(500, "InternalError", "resourceVersion should not be set on objects to be created")
        self._check_namespace(target)
        key = self._key(rtype, target.namespace, name)
        if key in self._objects:
            raise ApiError(409, "AlreadyExists", f'{rtype.plural} "{name}" already exists')
        self._revision += 1
        obj = self._stamp(rtype, body)
        meta = obj["metadata"]
        if rtype.namespaced:
            meta["namespace"] = target.namespace
        meta["uid"] = str(uuid.uuid4())
        meta["creationTimestamp"] = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
        meta["resourceVersion"] = str(self._revision)
        if rtype.group_version == CRD_GROUP_VERSION:
            meta["generation"] = 1
        self._objects[key] = obj
        self._record(rtype, target.namespace, "ADDED", obj)
        return copy.deepcopy(obj)

    def _existing(self, target: _Target) -> dict[str, Any]:
        obj = self._objects.get(self._key(target.rtype, target.namespace, target.name))
        if obj is None:
            raise ApiError(404, "NotFound", f'{target.rtype.plural} "{target.name}" not found')
        return obj

    def _write(self, target: _Target, new: dict[str, Any], precondition_rv: Any) -> dict[str, Any]:
        """Replace the stored object with `new` (system metadata kept) under a resourceVersion check."""
        old = self._existing(target)
        if precondition_rv not in (None, "") and str(precondition_rv) != old["metadata"]["resourceVersion"]:
            raise ApiError(409, "Conflict",
                           f'Operation cannot be fulfilled on {target.rtype.plural} "{target.name}": '
                           "the object has been modified; please apply your changes to the latest version "
                           "and try again")
        obj = self._stamp(target.rtype, new)
        if target.subresource == "status":
            # The status strategy: only status is taken from the request.
            status = obj.get("status")
            obj = copy.deepcopy(old)
            if status is None:
                obj.pop("status", None)
            else:
                obj["status"] = status
        meta = obj.setdefault("metadata", {})
        if meta.get("name", target.name) != target.name:
            raise ApiError(400, "BadRequest", "the name of the object does not match the name on the URL")
        if meta.get("uid") not in (None, old["metadata"]["uid"]):
            raise ApiError(409, "Conflict", f"Precondition failed: UID in precondition: {meta['uid']}, "
                                            f"UID in object meta: {old['metadata']['uid']}")
        for field in ("name", "namespace", "uid", "creationTimestamp", "generation"):
            if field in old["metadata"]:
                meta[field] = old["metadata"][field]
        meta["resourceVersion"] = old["metadata"]["resourceVersion"]
        if obj == old:
            return copy.deepcopy(old)  # a no-op write is not a write
        if "generation" in meta and obj.get("spec") != old.get("spec"):
            meta["generation"] += 1
        self._revision += 1
        meta["resourceVersion"] = str(self._revision)
        self._objects[self._key(target.rtype, target.namespace, target.name)] = obj
        self._record(target.rtype, target.namespace, "MODIFIED", obj)
        return copy.deepcopy(obj)

    def _replace(self, target: _Target, body: Any) -> dict[str, Any]:
        if not target.name or not isinstance(body, dict):
            raise ApiError(405 if not target.name else 400, "BadRequest", "PUT needs an object URL and body")
        rv = (body.get("metadata") or {}).get("resourceVersion")
        return self._write(target, body, rv)

    def _patch(self, target: _Target, body: Any, content_type: str) -> dict[str, Any]:
        if content_type not in ("application/merge-patch+json", "application/strategic-merge-patch+json"):
            raise ApiError(415, "UnsupportedMediaType", f"the body of the request was in an unknown format: {content_type}")
        if not target.name or not isinstance(body, dict):
            raise ApiError(400, "BadRequest", "PATCH needs an object URL and an object body")
        old = self._existing(target)
        rv = (body.get("metadata") or {}).get("resourceVersion")
        new = merge_patch(old, body)
        new.setdefault("metadata", {})["resourceVersion"] = old["metadata"]["resourceVersion"]
        return self._write(target, new, rv)

    def _delete(self, target: _Target, body: Any) -> dict[str, Any]:
        if target.subresource:
            raise ApiError(405, "MethodNotAllowed", "DELETE goes to the object, not its status")
        old = self._existing(target)
        pre = (body or {}).get("preconditions") or {} if isinstance(body, dict) else {}
        if pre.get("resourceVersion") not in (None, "") and str(pre["resourceVersion"]) != old["metadata"]["resourceVersion"]:
            raise ApiError(409, "Conflict",
                           f"Precondition failed: ResourceVersion in precondition: {pre['resourceVersion']}, "
                           f"ResourceVersion in object meta: {old['metadata']['resourceVersion']}")
        if pre.get("uid") not in (None, "") and pre["uid"] != old["metadata"]["uid"]:
            raise ApiError(409, "Conflict", f"Precondition failed: UID in precondition: {pre['uid']}")
        self._revision += 1
        del self._objects[self._key(target.rtype, target.namespace, target.name)]
        gone = copy.deepcopy(old)
        gone["metadata"]["resourceVersion"] = str(self._revision)
        self._record(target.rtype, target.namespace, "DELETED", gone)
        return gone

    def _matches(self, target: _Target, rtype: ResourceType, namespace: str, name: str = "") -> bool:
        return rtype == target.rtype and (not target.namespace or namespace == target.namespace) and \
            (not target.field_name or name == target.field_name)

    def _list_page(self, target: _Target, limit: str, token: str) -> dict[str, Any]:
        """A list, paginated as the real server does: every page comes from the snapshot the first
        page was taken at (its resourceVersion); a token older than the compaction is 410 Expired."""
        if token:
            if token not in self._continues:
                raise ApiError(400, "BadRequest", "continue key is not valid")
            revision, items = self._continues.pop(token)
            if revision <= self._compacted:
                raise ApiError(410, "Expired", "The provided continue parameter is too old to display a "
                                              "consistent list result.")
            listing: dict[str, Any] = {"kind": target.rtype.kind + "List", "apiVersion": target.rtype.group_version,
                       "metadata": {"resourceVersion": str(revision)}, "items": items}
        else:
            listing = self._list(target)
        if not limit:
            return listing
        try:
            size = int(limit)
        except ValueError:
            raise ApiError(400, "BadRequest", f"invalid limit {limit!r}") from None
        items = listing["items"]
        if size > 0 and len(items) > size:
            rest = items[size:]
            listing["items"] = items[:size]
            next_token = uuid.uuid4().hex
            self._continues[next_token] = (int(listing["metadata"]["resourceVersion"]), rest)
            listing["metadata"]["continue"] = next_token
            listing["metadata"]["remainingItemCount"] = len(rest)
        return listing

    def _list(self, target: _Target) -> dict[str, Any]:
        items = []
        for (gv, plural, ns, name), obj in sorted(self._objects.items()):
            labels = (obj.get("metadata") or {}).get("labels") or {}
            if (gv, plural) == (target.rtype.group_version, target.rtype.plural) and \
                    (not target.namespace or ns == target.namespace) and \
                    (not target.field_name or name == target.field_name) and \
                    all(labels.get(k) == v for k, v in target.labels):
                item = copy.deepcopy(obj)
                if target.rtype.group_version != CRD_GROUP_VERSION:
                    # Typed lists of built-in kinds carry no per-item kind/apiVersion.
                    item.pop("kind", None)
                    item.pop("apiVersion", None)
                items.append(item)
        return {"kind": target.rtype.kind + "List", "apiVersion": target.rtype.group_version,
                "metadata": {"resourceVersion": str(self._revision)}, "items": items}

    def _watch(self, target: _Target, rv_param: str, bookmarks: bool, timeout: float | None) -> Iterator[dict[str, Any]]:
        """Watch events as dicts; ends on timeout, drop_watches() or stop()."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            generation = self._watch_generation
            expired = False
            initial: list[dict[str, Any]] = []
            if rv_param in ("", "0"):
                initial = [{"type": "ADDED", "object": copy.deepcopy(o)}
                           for (gv, plural, ns, name), o in sorted(self._objects.items())
                           if self._matches(target, self._types[(gv, plural)], ns, name)]
                since = self._revision
            else:
                try:
                    since = int(rv_param)
                except ValueError:
                    raise ApiError(400, "BadRequest", f"invalid resourceVersion {rv_param!r}") from None
                expired = since < self._compacted
        if expired:
            yield {"type": "ERROR", "object": status_object(
                410, "Expired", f"too old resource version: {since} ({self._compacted + 1})")}
            return
        yield from initial
        last_sent = time.monotonic()
        while True:
            events: list[_Event] = []
            with self._cond:
                while True:
                    if self._stopping or self._watch_generation != generation:
                        return
                    if since < self._compacted:
                        # The watcher fell behind a compaction: what the real server's cache does.
                        expired = True
                        break
                    events = [e for e in self._history
                              if e.revision > since and self._matches(target, e.rtype, e.namespace,
                                                                      (e.obj.get("metadata") or {}).get("name", ""))]
                    now = time.monotonic()
                    if events:
                        since = events[-1].revision
                        break
                    if deadline is not None and now >= deadline:
                        return
                    if bookmarks and now - last_sent >= self.bookmark_interval:
                        since = self._revision  # nothing of ours happened up to here
                        break
                    wait = self.bookmark_interval - (now - last_sent) if bookmarks else 0.5
                    if deadline is not None:
                        wait = min(wait, deadline - now)
                    self._cond.wait(max(0.01, min(wait, 0.5)))
            if expired:
                yield {"type": "ERROR", "object": status_object(410, "Expired", f"too old resource version: {since}")}
                return
            if events:
                for e in events:
                    yield {"type": e.type, "object": e.obj}
            else:
                yield {"type": "BOOKMARK", "object": {
                    "kind": target.rtype.kind, "apiVersion": target.rtype.group_version,
                    "metadata": {"resourceVersion": str(since)}}}
            last_sent = time.monotonic()


class _Handler(BaseHTTPRequestHandler):
    fake: FakeKubeAPI
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # headers and body go out in separate writes

    def log_message(self, format: str, *args: Any) -> None:  # quiet: tests read fake.requests
        pass

    def _body(self) -> Any:
        length = int(self.headers.get("Content-Length") or 0)
        if not length:
            return None
        raw = self.rfile.read(length)
        try:
            return json.loads(raw)
        except ValueError:
            raise ApiError(400, "BadRequest", "the request body is not JSON") from None

    def _send_text(self, code: int, text: str) -> None:
        data = text.encode()
        self.send_response(code)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _send(self, code: int, obj: Any) -> None:
        data = json.dumps(obj).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _handle(self, method: str) -> None:
        fake = self.fake
        parts = urlsplit(self.path)
        query = {k: v[-1] for k, v in parse_qs(parts.query, keep_blank_values=True).items()}
        fake.requests.append((method, self.path))
        if fake.before_request is not None:
            fake.before_request(method, parts.path)
        try:
            body = self._body() if method in ("POST", "PUT", "PATCH", "DELETE") else None
            target = fake._resolve(parts.path)
            allowed = {"watch", "resourceVersion", "resourceVersionMatch", "allowWatchBookmarks", "timeoutSeconds",
                       "limit", "continue", "fieldSelector", "labelSelector"}
            if target.subresource == "log":
                allowed = {"container", "sinceSeconds", "timestamps"}
            unsupported = set(query) - allowed
            if unsupported:
                raise ApiError(400, "BadRequest", f"the fake API server does not implement {sorted(unsupported)}")
            if target.subresource == "log":
                if method != "GET":
                    raise ApiError(405, "MethodNotAllowed", "pods/log is read-only")
                with fake._cond:
                    fake._existing(target)  # 404 for a pod that does not exist
                self._send_text(200, fake.pod_logs.get((target.namespace, target.name, query.get("container", "")), ""))
                return
            if "labelSelector" in query:
                terms = []
                for term in query["labelSelector"].split(","):
                    key, sep, value = term.replace("==", "=").partition("=")
                    if not sep or not key or "!" in key or target.name:
                        raise ApiError(400, "BadRequest", "the fake API server implements only equality "
                                       "labelSelector terms (k=v,...) on collections")
                    terms.append((key.strip(), value.strip()))
                target = dataclasses.replace(target, labels=tuple(terms))
            if "fieldSelector" in query:
                # Only what clients of one named object use (Calico's secret watcher, felixpy's too).
                field, _, value = query["fieldSelector"].replace("==", "=").partition("=")
                if field != "metadata.name" or not value or target.name:
                    raise ApiError(400, "BadRequest", "the fake API server implements only "
                                   "fieldSelector=metadata.name=<name> on collections")
                target = dataclasses.replace(target, field_name=value)
            if method == "GET" and query.get("watch") in ("true", "1"):
                if target.name:
                    raise ApiError(400, "BadRequest", "watch a collection")
                timeout = float(query["timeoutSeconds"]) if query.get("timeoutSeconds") else None
                self._stream(fake._watch(target, query.get("resourceVersion", ""),
                                         query.get("allowWatchBookmarks") == "true", timeout))
                return
            with fake._cond:
                if method == "GET":
                    result = (fake._list_page(target, query.get("limit", ""), query.get("continue", ""))
                              if not target.name else copy.deepcopy(fake._existing(target)))
                    code = 200
                elif method == "POST":
                    result, code = fake._create(target, body), 201
                elif method == "PUT":
                    result, code = fake._replace(target, body), 200
                elif method == "PATCH":
                    ctype = (self.headers.get("Content-Type") or "").split(";")[0].strip()
                    result, code = fake._patch(target, body, ctype), 200
                else:
                    if not target.name:
                        raise ApiError(405, "MethodNotAllowed", "deletecollection is not implemented")
                    result, code = fake._delete(target, body), 200
            self._send(code, result)
        except ApiError as err:
            self._send(err.code, status_object(err.code, err.reason, err.message))

    def _stream(self, events: Iterator[dict[str, Any]]) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Transfer-Encoding", "chunked")
        self.send_header("Connection", "close")  # one stream per connection: it ends with the watch
        self.end_headers()
        try:
            for event in events:
                line = json.dumps(event).encode() + b"\n"
                self.wfile.write(b"%x\r\n%s\r\n" % (len(line), line))
                self.wfile.flush()
            self.wfile.write(b"0\r\n\r\n")
            self.wfile.flush()
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client went away
        self.close_connection = True

    def do_GET(self) -> None:
        self._handle("GET")

    def do_POST(self) -> None:
        self._handle("POST")

    def do_PUT(self) -> None:
        self._handle("PUT")

    def do_PATCH(self) -> None:
        self._handle("PATCH")

    def do_DELETE(self) -> None:
        self._handle("DELETE")
