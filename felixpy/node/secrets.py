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
"""

from __future__ import annotations

import base64
import binascii
import logging
import os
import re
from typing import Any, Callable, Mapping

log = logging.getLogger(__name__)

DEFAULT_NAMESPACE = "kube-system"
# Kubernetes' rules for Secret names (DNS subdomain) and data keys; anything else could escape
# the secrets directory or the API path, so it is refused before any lookup.
_NAME_RE = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")
_KEY_RE = re.compile(r"[-._a-zA-Z0-9]+")


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
        self._last: dict[tuple[str, str], str] = {}
        self._warned: set[tuple[str, str]] = set()

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> "SecretResolver":
        """FELIXPY_SECRETS_DIR, FELIXPY_SECRETS_NAMESPACE and the Kubernetes API variables."""
        from felixpy.node.k8s_node import kube_api_configured, open_kube_http

        snapshot = dict(env)
        factory = (lambda: open_kube_http(snapshot)) if kube_api_configured(snapshot) else None
        return cls(secrets_dir=(env.get("FELIXPY_SECRETS_DIR") or "").strip() or None,
                   kube_http=factory,
                   namespace=(env.get("FELIXPY_SECRETS_NAMESPACE") or "").strip() or DEFAULT_NAMESPACE)

    @property
    def configured(self) -> bool:
        return self.secrets_dir is not None or self._kube_factory is not None

    def resolve_ref(self, ref: Mapping[str, Any] | None, *, what: str) -> str | None:
        """Value of a `{secretKeyRef: {name, key}}` (None for no ref); `what` names the user in logs."""
        sref = (ref or {}).get("secretKeyRef") or {}
        if not sref:
            return None
        return self.resolve(str(sref.get("name") or ""), str(sref.get("key") or ""), what=what)

    def resolve(self, name: str, key: str, *, what: str = "") -> str | None:
        ident = (name, key)
        if not _NAME_RE.fullmatch(name) or not _KEY_RE.fullmatch(key):
            return self._missing(ident, what, "not a valid Secret name and key")
        if not self.configured:
            return self._missing(ident, what, "no Kubernetes API and no FELIXPY_SECRETS_DIR to read it from")
        failed = False
        for source in (self._from_kube, self._from_dir):
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
                return self._missing(ident, what, "the value is empty")
            self._last[ident] = value
            if ident in self._warned:
                self._warned.discard(ident)
                log.info("secret resolved again secret=%s key=%s for=%s", name, key, what or "-")
            return value
        if failed and ident in self._last:
            return self._last[ident]  # transient: keep the sessions as they are
        self._last.pop(ident, None)
        return self._missing(ident, what, "not found")

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
        from felixpy.datastore.kube import KubeConfigError, _ApiError

        if not self._kube_opened:
            try:
                self._kube = self._kube_factory()
            except KubeConfigError as err:
                raise _SourceError(str(err).splitlines()[0]) from None
            self._kube_opened = True
        if self._kube is None:
            return None
        try:
            obj = self._kube.request("GET", f"/api/v1/namespaces/{self.namespace}/secrets/{name}")
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
