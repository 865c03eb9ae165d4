"""Tell Kubernetes the node's pod network is up: clear the Node's NetworkUnavailable condition.

Cloud node controllers (and some installers) set `NetworkUnavailable=True` on a new Node, and the
scheduler keeps pods off it until the network plugin says otherwise. calico-node clears it once
its routes are programmed (reason `CalicoIsUp`); felixpy-node does the same with reason
`FelixpyIsUp`, through the `nodes/status` subresource. The Node is read with a plain GET of the
Node (which carries its status): the ClusterRole grants `patch` on nodes/status and nothing else
there, as Calico's does.

The write is a JSON merge patch of `status.conditions` carrying the resourceVersion that was read:
a merge patch replaces the whole list, so the precondition makes sure the kubelet's own
conditions (Ready, MemoryPressure, ...) written in between are never lost (409 → read again).
A condition that already says False with our reason is left alone: no write, no new revision.

Also here: where the Kubernetes API is, for processes that may or may not have one (etcd mode
with or without KUBECONFIG). The HTTP layer and configuration rules are the Kubernetes
datastore's (felixpy/datastore/kube.py), so both modes read the same variables.
"""

from __future__ import annotations

import datetime
import logging
import os
import threading
from typing import Any, Callable, Mapping

log = logging.getLogger(__name__)

CONDITION = "NetworkUnavailable"
REASON = "FelixpyIsUp"
MESSAGE = "felixpy-node is running on this node"
RETRY_INTERVAL = 30.0
CONFLICT_RETRIES = 5


def kube_api_configured(env: Mapping[str, str]) -> bool:
    """True when env names a Kubernetes API the way the Kubernetes datastore looks for one:
    KUBECONFIG, $HOME/.kube/config, K8S_API_ENDPOINT, or the in-cluster service account."""
    def get(name: str) -> str:
        return (env.get(f"CALICO_{name}") or env.get(name) or "").strip()

    if get("KUBECONFIG") or get("K8S_API_ENDPOINT") or env.get("KUBERNETES_SERVICE_HOST"):
        return True
    home = env.get("HOME") or ""
    return bool(home) and os.path.exists(os.path.join(home, ".kube", "config"))


def open_kube_http(env: Mapping[str, str]) -> Any | None:
    """The Kubernetes datastore's HTTP layer for the API env names, or None when none is configured.

    Raises felixpy.datastore.kube.KubeConfigError (one line) when one is named but unusable."""
    if not kube_api_configured(env):
        return None
    from felixpy.datastore.kube import open_kube_datastore

    # The datastore object is only the carrier of the configured connection: its request
    # handling (timeouts, retries of reads only, error mapping) is what we reuse.
    return open_kube_datastore(env)._http


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def cleared_conditions(conditions: list[dict[str, Any]], now: str) -> list[dict[str, Any]] | None:
    """The condition list with NetworkUnavailable=False (reason FelixpyIsUp), or None when it
    already says so. Other conditions are kept as they are, in order."""
    out: list[dict[str, Any]] = []
    found = False
    for cond in conditions:
        if cond.get("type") != CONDITION:
            out.append(cond)
            continue
        found = True
        if cond.get("status") == "False" and cond.get("reason") == REASON:
            return None
        updated = dict(cond)
        if updated.get("status") != "False":
            updated["lastTransitionTime"] = now
        updated.update({"status": "False", "reason": REASON, "message": MESSAGE, "lastHeartbeatTime": now})
        out.append(updated)
    if not found:
        out.append({"type": CONDITION, "status": "False", "reason": REASON, "message": MESSAGE,
                    "lastTransitionTime": now, "lastHeartbeatTime": now})
    return out


def clear_network_unavailable(node_name: str, env: Mapping[str, str], *, http: Any | None = None) -> bool:
    """Set the Kubernetes Node's NetworkUnavailable condition to False. True when done (or when
    there is nothing to do: already clear, or no Kubernetes API configured); False after an error,
    which is logged in one line: call again later."""
    from felixpy.datastore.api import Conflict, DatastoreError
    from felixpy.datastore.kube import KubeConfigError, _ApiError

    try:
        if http is None:
            http = open_kube_http(env)
        if http is None:
            log.debug("no Kubernetes API configured: NetworkUnavailable left alone node=%s", node_name)
            return True
        path = f"/api/v1/nodes/{node_name}"
        for _ in range(CONFLICT_RETRIES):
            # Read the Node itself (RBAC `get nodes`), write through its status subresource (`patch
            # nodes/status`): the role grants no `get` on nodes/status, and needs none.
            node = http.request("GET", path)
            conditions = list((node.get("status") or {}).get("conditions") or [])
            updated = cleared_conditions(conditions, _now())
            if updated is None:
                return True
            patch = {"metadata": {"resourceVersion": (node.get("metadata") or {}).get("resourceVersion")},
                     "status": {"conditions": updated}}
            try:
                http.request("PATCH", path + "/status", body=patch, content_type="application/merge-patch+json")
            except _ApiError as err:
                if err.code == 409:
                    continue  # the kubelet's heartbeat landed in between: read again
                raise
            log.info("cleared node condition node=%s condition=%s reason=%s", node_name, CONDITION, REASON)
            return True
        raise Conflict(f"node {node_name} status kept changing under {CONFLICT_RETRIES} attempts")
    except (_ApiError, DatastoreError, KubeConfigError) as err:
        log.warning("could not clear NetworkUnavailable, will retry node=%s error=%s", node_name,
                    str(err).splitlines()[0] if str(err) else type(err).__name__)
        return False


class NetworkUnavailableClearer:
    """Clears the condition on a background thread, retrying every `retry_interval` seconds until it
    succeeds, so a slow or absent API server never holds up the agent loop. start() is idempotent."""

    def __init__(self, node_name: str, env: Mapping[str, str], *, retry_interval: float = RETRY_INTERVAL,
                 clear: Callable[[str, Mapping[str, str]], bool] = clear_network_unavailable) -> None:
        self._node = node_name
        self._env = dict(env)
        self._retry = retry_interval
        self._clear = clear
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.done = threading.Event()

    def start(self) -> None:
        if self._thread is not None:
            return
        self._thread = threading.Thread(target=self._run, name="clear-network-unavailable", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        while not self._stop.is_set():
            if self._clear(self._node, self._env):
                self.done.set()
                return
            self._stop.wait(self._retry)
