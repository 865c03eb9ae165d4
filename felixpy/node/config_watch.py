"""The agent's watch on its configuration in the datastore: FelixConfiguration and ClusterInformation.

FelixConfiguration `default` and `node.<name>` were merged into the agent's configuration by
startup (config.felix_config: environment > node.<name> > default > built-in default). The watch
sees every later change of either resource through the agent's dispatcher and recomputes the
merged parameters the same way; when a value differs from the one the agent runs with, it logs
one line per parameter and asks for a restart (`on_restart`), because that is what Felix does:
Felix applies no parameter of its own live (daemon.go: only ClusterGUID, ClusterType,
CalicoVersion and HealthTimeoutOverrides are "handled config changes"), it exits and its
supervisor starts it again with the new configuration. The dataplane is left as it is meanwhile,
and the restarted agent reconciles it without flushing what is still right.

ClusterInformation `default`'s datastoreReady is the migration lock (`felixctl datastore migrate
lock` sets it false). Felix restarts when it goes false and waits at startup until it is true
again; felixpy-node, which also serves the CNI plugin, keeps running instead, so that the CNI
server can answer ADD and DEL with Calico's own "not ready" error and IPAM writes stop
(`datastore_ready`, read by the CNI server's threads).

No I/O: the handlers run on the agent's loop; `datastore_ready` is a plain attribute read.
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Mapping

from felixpy.calc.dispatcher import Dispatcher
from felixpy.calc.updates import Kind, Update
from felixpy.config import FelixConfig, FelixParam, felix_changes, felix_config
from felixpy.node.startup import datastore_ready

log = logging.getLogger(__name__)

Changes = list[tuple[FelixParam, object, object]]


def _spec(value: Mapping[str, Any] | None) -> dict[str, Any] | None:
    if value is None:
        return None
    spec = value.get("spec")
    return dict(spec) if isinstance(spec, Mapping) else {}


class ConfigWatch:
    def __init__(
        self,
        *,
        node_name: str,
        env: Mapping[str, str],
        running: FelixConfig,
        felix_global: Mapping[str, Any] | None,
        felix_host: Mapping[str, Any] | None,
        ready: bool = True,
        on_restart: Callable[[Changes], None],
    ) -> None:
        self._host_name = f"node.{node_name}"
        self._env = env
        self.running = running
        self._global = dict(felix_global) if felix_global is not None else None
        self._host = dict(felix_host) if felix_host is not None else None
        self._on_restart = on_restart
        self.restart_requested = False
        self.datastore_ready = ready  # read by the CNI server's threads: one attribute, no lock needed

    def register_with(self, dispatcher: Dispatcher) -> None:
        dispatcher.register(Kind.FELIX_CONFIGURATION, self._on_felix_configuration)
        dispatcher.register(Kind.CLUSTER_INFORMATION, self._on_cluster_information)

    def _on_felix_configuration(self, update: Update[Mapping[str, Any]]) -> None:
        if update.name == "default":
            self._global = _spec(update.value)
        elif update.name == self._host_name:
            self._host = _spec(update.value)
        else:
            return  # another node's, or a name Felix does not read
        if self.restart_requested:
            return
        changes = felix_changes(self.running, felix_config(self._env, self._global, self._host))
        if not changes:
            return
        for param, old, new in changes:
            log.warning("configuration changed; restarting to apply it, as Felix does param=%s old=%r new=%r",
                        param.field or param.name, old, new)
        self.restart_requested = True
        self._on_restart(changes)

    def _on_cluster_information(self, update: Update[Mapping[str, Any]]) -> None:
        if update.name != "default":
            return
        ready = datastore_ready(_spec(update.value))
        if ready != self.datastore_ready:
            if ready:
                log.warning("datastore unlocked (ClusterInformation datastoreReady=true): CNI and IPAM resume")
            else:
                log.warning("datastore locked for migration (ClusterInformation datastoreReady=false): "
                            "CNI ADD/DEL and IPAM writes are refused until it is unlocked")
        self.datastore_ready = ready
