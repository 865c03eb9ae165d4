"""Resolve Calico's `secretKeyRef`s (BGP passwords) to their values, as calico-node does.

BGPPeer `spec.password` and BGPConfiguration `spec.nodeMeshPassword` name a key of a Kubernetes
Secret. Two places hold Secrets, tried in this order:

1. the Kubernetes API, when the environment names one (the same rules as the Kubernetes
   datastore: KUBECONFIG, $HOME/.kube/config, K8S_API_ENDPOINT, in-cluster): Secret `<name>` in
   namespace FELIXPY_SECRETS_NAMESPACE (default kube-system, where calico-node runs), key `<key>`
   of its base64 `data`;
2. a directory FELIXPY_SECRETS_DIR laid out like a mounted secret volume: the file
   `<dir>/<name>/<key>` holds the value, byte for byte. This is for clusters without a
   Kubernetes API (etcd mode, the lab).

A secret found nowhere resolves to None and one warning naming it (repeated only after it was
found again): the caller then configures the session without a password. A read that fails for a
transient reason (API unreachable, 5xx) falls back to the last value seen, so an API hiccup does
not drop MD5 from running sessions. Values are read again on every `resolve` (renders are rare).
Every value resolved is registered with the log redactor (felixpy/logs.py), so no log line can
carry it.

One resolver serves both BGP speakers: the agent's ExaBGP controller (node/bgp.py) and the route
reflector's BIRD driver (node/reflector.py). A `SecretWatcher` beside it tells its owner when a
Secret it uses has changed, so a rotated password reaches ExaBGP and BIRD without a restart:

* the directory: the files in use are re-read every FILE_INTERVAL seconds (a Kubernetes secret
  volume is updated by an atomic symlink swap, so a read sees the old or the new value);
* the Kubernetes API: one list + watch per Secret name with `fieldSelector=metadata.name=<name>`,
  as Calico's confd does (RBAC: `get, list, watch` on those Secrets, which a Role can restrict
  with `resourceNames`). Where RBAC grants only `get`, the watch answers 403 and the watcher
  re-reads the Secret every POLL_INTERVAL seconds instead (one warning says so).
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import os
import re
import socket
import threading
from typing import Any, Callable, Iterable, Mapping

from felixpy.logs import REDACTOR

log = logging.getLogger(__name__)

DEFAULT_NAMESPACE = "kube-system"
FILE_INTERVAL = 1.0  # seconds between re-reads of the secret files in use
POLL_INTERVAL = 30.0  # seconds between gets of a Secret that may not be watched (RBAC: get only)
WATCH_TIMEOUT = 300  # timeoutSeconds of one watch request; the watcher then resumes
RETRY_MIN, RETRY_MAX = 1.0, 30.0

SecretRef = tuple[str, str]  # (Secret name, key)
# Kubernetes' rules for Secret names (DNS subdomain) and data keys; anything else could escape
# the secrets directory or the API path, so it is refused before any lookup.
_NAME_RE = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")
_KEY_RE = re.compile(r"[-._a-zA-Z0-9]+")


def secret_ref(ref: Mapping[str, Any] | None) -> SecretRef | None:
    """(name, key) of a `{secretKeyRef: {name, key}}`, or None for no ref."""
    sref = (ref or {}).get("secretKeyRef") or {}
    if not sref:
        return None
    return str(sref.get("name") or ""), str(sref.get("key") or "")


class _Missing(Exception):
    """The source answered: no such secret or key (not an error of the source)."""


class SecretResolver:
    """(Secret name, key) → value from the Kubernetes API and/or a mounted secret directory."""

    def __init__(self, *, secrets_dir: str | None = None,
                 kube_http: Callable[[], Any | None] | None = None,
                 namespace: str = DEFAULT_NAMESPACE) -> None:
        """`kube_http` returns the Kubernetes HTTP layer (or None); it is called once, on first use,
        so constructing a resolver never touches the network."""
        self.secrets_dir = secrets_dir
        self.namespace = namespace
        self._kube_factory = kube_http
        self._kube: Any | None = None
        self._kube_opened = False
        self._last: dict[SecretRef, str] = {}
        self._source: dict[SecretRef, str] = {}  # ref -> "kube" | "dir": which source answered last
        self._warned: set[SecretRef] = set()
        self._lock = threading.Lock()  # resolve() runs on the owner's loop, the watcher reads too

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> "SecretResolver":
        """FELIXPY_SECRETS_DIR, FELIXPY_SECRETS_NAMESPACE and the Kubernetes API variables."""
        from felixpy.node.k8s_node import kube_api_configured, open_kube_http

        snapshot = dict(env)
        factory = (lambda: open_kube_http(snapshot)) if kube_api_configured(snapshot) else None
        # NAMESPACE is calico-node's variable for where its BGP Secrets live.
        namespace = ((env.get("FELIXPY_SECRETS_NAMESPACE") or "").strip() or (env.get("NAMESPACE") or "").strip()
                     or DEFAULT_NAMESPACE)
        return cls(secrets_dir=(env.get("FELIXPY_SECRETS_DIR") or "").strip() or None,
                   kube_http=factory, namespace=namespace)

    @property
    def configured(self) -> bool:
        return self.secrets_dir is not None or self._kube_factory is not None

    @property
    def kube_configured(self) -> bool:
        return self._kube_factory is not None

    def kube_http(self) -> Any | None:
        """The Kubernetes HTTP layer (opened on first use), or None; raises _SourceError."""
        if self._kube_factory is None:
            return None
        from felixpy.datastore.kube import KubeConfigError

        with self._lock:
            if not self._kube_opened:
                try:
                    self._kube = self._kube_factory()
                except KubeConfigError as err:
                    raise _SourceError(str(err).splitlines()[0]) from None
                self._kube_opened = True
            return self._kube

    def last_value(self, ref: SecretRef) -> tuple[str | None, str | None]:
        """(value, source) the last resolve of `ref` returned; (None, None) if it found nothing."""
        with self._lock:
            return self._last.get(ref), self._source.get(ref)

    def read_file(self, ref: SecretRef) -> str | None:
        """The directory's current value of `ref` (None: no file, unreadable or no directory)."""
        if self.secrets_dir is None or not _NAME_RE.fullmatch(ref[0]) or not _KEY_RE.fullmatch(ref[1]):
            return None
        try:
            return self._from_dir(*ref)
        except (_Missing, _SourceError):
            return None

    def resolve_ref(self, ref: Mapping[str, Any] | None, *, what: str) -> str | None:
        """Value of a `{secretKeyRef: {name, key}}` (None for no ref); `what` names the user in logs."""
        ident = secret_ref(ref)
        if ident is None:
            return None
        return self.resolve(*ident, what=what)

    def resolve(self, name: str, key: str, *, what: str = "") -> str | None:
        ident = (name, key)
        if not _NAME_RE.fullmatch(name) or not _KEY_RE.fullmatch(key):
            return self._missing(ident, what, "not a valid Secret name and key")
        if not self.configured:
            return self._missing(ident, what, "no Kubernetes API and no FELIXPY_SECRETS_DIR to read it from")
        failed = False
        for source_name, source in (("kube", self._from_kube), ("dir", self._from_dir)):
            try:
                value = source(name, key)
            except _Missing:
                continue
            except _SourceError as err:
                failed = True
                log.warning("secret read failed secret=%s key=%s error=%s", name, key, err)
                continue
            if value is None:
                continue  # source not configured
            if value == "":
                self._forget(ident)
                return self._missing(ident, what, "the value is empty")
            REDACTOR.register(value)
            with self._lock:
                self._last[ident] = value
                self._source[ident] = source_name
            if ident in self._warned:
                self._warned.discard(ident)
                log.info("secret resolved again secret=%s key=%s for=%s", name, key, what or "-")
            return value
        with self._lock:
            if failed and ident in self._last:
                return self._last[ident]  # transient: keep the sessions as they are
        self._forget(ident)
        return self._missing(ident, what, "not found")

    def _forget(self, ident: SecretRef) -> None:
        with self._lock:
            self._last.pop(ident, None)
            self._source.pop(ident, None)

    def _missing(self, ident: tuple[str, str], what: str, why: str) -> str | None:
        """Log it once (until it resolves again) and answer None: the session gets no password."""
        if ident not in self._warned:
            self._warned.add(ident)
            log.warning("secret unresolved, configured without a password secret=%s key=%s for=%s reason=%s",
                        ident[0], ident[1], what or "-", why)
        return None

    # -- sources: a value, None when not configured, _Missing, or _SourceError ------------------
    def _from_kube(self, name: str, key: str) -> str | None:
        if self._kube_factory is None:
            return None
        from felixpy.datastore.api import DatastoreError
        from felixpy.datastore.kube import _ApiError

        http = self.kube_http()
        if http is None:
            return None
        try:
            obj = http.request("GET", f"/api/v1/namespaces/{self.namespace}/secrets/{name}")
        except _ApiError as err:
            if err.code == 404:
                raise _Missing() from None
            raise _SourceError(f"Kubernetes API answered {err.code} {err.reason}") from None
        except DatastoreError as err:
            raise _SourceError(str(err).splitlines()[0] if str(err) else type(err).__name__) from None
        raw = (obj.get("data") or {}).get(key)
        if raw is None:
            raise _Missing()
        try:
            return base64.b64decode(str(raw), validate=True).decode()
        except (binascii.Error, UnicodeDecodeError):
            raise _SourceError(f"key {key} of Secret {self.namespace}/{name} is not base64 UTF-8") from None

    def _from_dir(self, name: str, key: str) -> str | None:
        if self.secrets_dir is None:
            return None
        path = os.path.join(self.secrets_dir, name, key)
        try:
            with open(path, "rb") as f:
                data = f.read()
        except FileNotFoundError:
            raise _Missing() from None
        except OSError as err:
            raise _SourceError(f"{path}: {err.strerror or type(err).__name__}") from None
        try:
            return data.decode()
        except UnicodeDecodeError:
            raise _SourceError(f"{path}: not UTF-8") from None


class _SourceError(Exception):
    """The source could not answer (unreachable, permission, bad data)."""


class SecretWatcher:
    """Calls `on_change()` when a Secret its owner uses changes; see the module docstring.

    The owner hands over the refs its last render resolved (`watch(refs)`, any thread) and
    re-renders when told; `on_change` runs on the watcher's threads, so it must only post an event
    to the owner's loop. A change is reported once per new value (files) or per new
    resourceVersion (Kubernetes): a spurious report only costs a render that changes nothing.
    """

    def __init__(self, resolver: SecretResolver, on_change: Callable[[], None], *,
                 file_interval: float = FILE_INTERVAL, poll_interval: float = POLL_INTERVAL) -> None:
        self._resolver = resolver
        self._on_change = on_change
        self._file_interval = file_interval
        self._poll_interval = poll_interval
        self._lock = threading.Lock()
        self._refs: frozenset[SecretRef] = frozenset()
        self._file_seen: dict[SecretRef, str | None] = {}  # value last reported, per ref
        self._stop = threading.Event()
        self._file_thread: threading.Thread | None = None
        self._kube: dict[str, _KubeSecretWatch] = {}  # Secret name -> its watch

    def watch(self, refs: Iterable[SecretRef]) -> None:
        """The refs in use from now on (replaces the previous set); starts and stops watches."""
        refs = frozenset(refs)
        with self._lock:
            if self._stop.is_set() or refs == self._refs:
                return
            self._refs = refs
            if self._resolver.secrets_dir is not None and refs and self._file_thread is None:
                self._file_thread = threading.Thread(target=self._run_files, name="secret-files", daemon=True)
                self._file_thread.start()
            if not self._resolver.kube_configured:
                return
            names = {name for name, _ in refs}
            for name in set(self._kube) - names:
                self._kube.pop(name).stop()
            for name in names - set(self._kube):
                watch = _KubeSecretWatch(self._resolver, name, self._on_change, poll_interval=self._poll_interval)
                self._kube[name] = watch
                watch.start()

    def stop(self) -> None:
        self._stop.set()
        with self._lock:
            watches = list(self._kube.values())
            self._kube.clear()
        for watch in watches:
            watch.stop()
        if self._file_thread is not None:
            self._file_thread.join(timeout=2)

    # -- the secret directory ------------------------------------------------------------------
    def check_files(self) -> bool:
        """Compare the files in use with what the owner last resolved; True when it was told."""
        with self._lock:
            refs = self._refs
        changed = []
        for ref in sorted(refs):
            value, source = self._resolver.last_value(ref)
            if source == "kube":
                continue  # the API answered for this one: its file (if any) does not count
            current = self._resolver.read_file(ref)
            if current == "":
                current = None  # an empty value resolves to "no password", as a missing one
            if current != value and self._file_seen.get(ref, value) != current:
                changed.append(ref)
            self._file_seen[ref] = current
        for ref in set(self._file_seen) - refs:
            del self._file_seen[ref]
        if changed:
            log.info("secret changed, reconfiguring BGP secrets=%s",
                     ",".join(f"{name}/{key}" for name, key in changed))
            self._on_change()
        return bool(changed)

    def _run_files(self) -> None:
        while not self._stop.wait(self._file_interval):
            try:
                self.check_files()
            except Exception:  # never let the watcher die: the next round tries again
                log.exception("checking secret files failed")


class _KubeSecretWatch:
    """List + watch of one Secret (by name); reports new resourceVersions (not the first one)."""

    def __init__(self, resolver: SecretResolver, name: str, on_change: Callable[[], None], *,
                 poll_interval: float) -> None:
        self._resolver = resolver
        self.name = name
        self._on_change = on_change
        self._poll_interval = poll_interval
        self._stopped = threading.Event()
        self._version: str | None = None  # resourceVersion of the Secret last seen ("" = absent)
        self._resp: Any = None
        self._thread = threading.Thread(target=self._run, name=f"secret-watch-{name}", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stopped.set()
        resp = self._resp
        if resp is not None:
            _abort_stream(resp)

    def _done(self) -> bool:
        return self._stopped.is_set()

    def _wait(self, seconds: float) -> bool:
        """Sleep unless stopped; True when stopped."""
        return self._stopped.wait(seconds)

    def _seen(self, version: str) -> None:
        if self._version is not None and version != self._version:
            log.info("secret changed, reconfiguring BGP secret=%s namespace=%s", self.name,
                     self._resolver.namespace)
            self._on_change()
        self._version = version

    def _run(self) -> None:
        from felixpy.datastore.kube import _ApiError

        delay = RETRY_MIN
        path = f"/api/v1/namespaces/{self._resolver.namespace}/secrets"
        selector = {"fieldSelector": f"metadata.name={self.name}"}
        http: Any = None
        while not self._done():
            try:
                http = self._resolver.kube_http()
                if http is None:
                    return
                listing = http.request("GET", path, query=selector)
                items = listing.get("items") or []
                self._seen(str(((items[0] if items else {}).get("metadata") or {}).get("resourceVersion") or ""))
                rv = str((listing.get("metadata") or {}).get("resourceVersion") or "")
                self._stream(http, path, {**selector, "watch": "true", "resourceVersion": rv,
                                          "allowWatchBookmarks": "true", "timeoutSeconds": str(WATCH_TIMEOUT)})
                delay = RETRY_MIN
            except _ApiError as err:
                if err.code == 403:
                    log.warning("may not list/watch Secret %s/%s (RBAC grants get only?): reading it "
                                "every %gs instead", self._resolver.namespace, self.name, self._poll_interval)
                    self._poll(http, f"{path}/{self.name}")
                    return
                if err.code != 410 and self._wait(delay):  # 410: the watch fell behind; list again
                    return
                delay = min(delay * 2, RETRY_MAX)
            except Exception as err:  # unreachable API, broken stream, bad JSON: list again later
                if self._done():
                    return
                log.debug("secret watch interrupted secret=%s error=%s", self.name, err)
                if self._wait(delay):
                    return
                delay = min(delay * 2, RETRY_MAX)

    def _stream(self, http: Any, path: str, query: dict[str, str]) -> None:
        from felixpy.datastore.kube import _ApiError

        resp = http.stream(path, query, WATCH_TIMEOUT + 30.0)
        self._resp = resp
        try:
            buffer = b""
            for chunk in resp.stream(65536, decode_content=True):
                if self._done():
                    return
                buffer += chunk
                while b"\n" in buffer:
                    line, buffer = buffer.split(b"\n", 1)
                    if not line.strip():
                        continue
                    event = json.loads(line)
                    etype, obj = event.get("type"), event.get("object") or {}
                    if etype == "ERROR":
                        raise _ApiError(int(obj.get("code") or 500), str(obj.get("reason") or ""),
                                        str(obj.get("message") or ""))
                    if etype == "BOOKMARK":
                        continue
                    version = str((obj.get("metadata") or {}).get("resourceVersion") or "")
                    self._seen("" if etype == "DELETED" else version)
        finally:
            self._resp = None
            resp.close()

    def _poll(self, http: Any, path: str) -> None:
        from felixpy.datastore.kube import _ApiError

        while not self._wait(self._poll_interval):
            try:
                obj = http.request("GET", path)
                self._seen(str((obj.get("metadata") or {}).get("resourceVersion") or ""))
            except _ApiError as err:
                if err.code == 404:
                    self._seen("")
            except Exception as err:  # unreachable: try again next round
                log.debug("secret poll failed secret=%s error=%s", self.name, err)


def _abort_stream(resp: Any) -> None:
    """Wake the thread reading a watch stream: shut its socket down."""
    try:
        sock = resp.connection.sock if resp.connection is not None else None
        if sock is not None:
            sock.shutdown(socket.SHUT_RDWR)
    except (OSError, AttributeError):
        pass
