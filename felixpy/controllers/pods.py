"""Which nodes and pods exist, and which addresses the pods hold: the controllers' view of the cluster.

The IPAM garbage collector never decides from IPAM data alone: an allocation is only a leak when
this view says its owner is gone. `PodIndex` is the small protocol behind that question, read
once per reconcile pass (and once more just before anything is released).

`WorkloadEndpointIndex` answers it from the datastore: a pod exists while its WorkloadEndpoint
does, and holds the addresses in the endpoint's `ipNetworks`. That is the source of truth in etcd
mode, where the CNI plugin writes the endpoint, and it is also right with the Kubernetes datastore,
where endpoints *are* the pods carrying our CNI annotations (docs/kubernetes-datastore.md).

A Kubernetes pod-list implementation (etcd mode inside a Kubernetes cluster, where a pod deleted
while its node's agent was down leaves its endpoint behind in etcd) needs: a list of all pods
(namespace, name, spec.nodeName, status.phase, status.podIPs and the
`cni.projectcalico.org/podIPs` annotation), with Succeeded/Failed pods counted as gone; nodes
still come from the datastore. See docs/operations.md.

Read order matters: endpoints are listed before nodes, so an endpoint seen here has its node in
the node list unless the node was deleted in between (an agent creates its Node before it serves
any pod).
"""

from __future__ import annotations

import ipaddress
import logging
from dataclasses import dataclass, field
from typing import Any, Mapping, Protocol

from felixpy.datastore import keys
from felixpy.datastore.api import Datastore

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class PodRecord:
    namespace: str
    name: str
    node: str
    ips: frozenset[str]


@dataclass(frozen=True, slots=True)
class ClusterView:
    """One read of the cluster: the nodes that exist and the pods that exist, with their addresses."""

    nodes: frozenset[str]
    pods: tuple[PodRecord, ...] = ()
    _by_ip: Mapping[str, tuple[PodRecord, ...]] = field(default_factory=dict, repr=False)

    @classmethod
    def build(cls, nodes: set[str] | frozenset[str], pods: list[PodRecord]) -> ClusterView:
        by_ip: dict[str, list[PodRecord]] = {}
        for pod in pods:
            for ip in pod.ips:
                by_ip.setdefault(ip, []).append(pod)
        return cls(frozenset(nodes), tuple(pods), {ip: tuple(p) for ip, p in by_ip.items()})

    def node_exists(self, node: str) -> bool:
        return node in self.nodes

    def live_users(self, ip: str) -> tuple[PodRecord, ...]:
        """The pods that hold ip and whose node still exists (a pod cannot outlive its node)."""
        return tuple(p for p in self._by_ip.get(ip, ()) if p.node in self.nodes)


class PodIndex(Protocol):
    def read(self) -> ClusterView:
        """A fresh read of nodes and pods; raises DatastoreError (never returns a partial view)."""
        ...


def _ipv4(text: Any) -> str | None:
    try:
        addr = ipaddress.ip_interface(str(text)).ip
    except ValueError:
        return None
    return str(addr) if addr.version == 4 else None


def pod_from_endpoint(value: Mapping[str, Any]) -> PodRecord | None:
    """The pod a WorkloadEndpoint value stands for, or None when it names no pod."""
    meta = value.get("metadata") or {}
    spec = value.get("spec") or {}
    pod = spec.get("pod") or spec.get("workload") or ""
    if not pod:
        return None
    ips = frozenset(ip for ip in (_ipv4(n) for n in spec.get("ipNetworks") or []) if ip is not None)
    return PodRecord(namespace=str(meta.get("namespace") or ""), name=str(pod),
                     node=str(spec.get("node") or ""), ips=ips)


class WorkloadEndpointIndex:
    """PodIndex from the datastore's WorkloadEndpoints (etcd mode; KDD maps them onto pods)."""

    def __init__(self, store: Datastore) -> None:
        self._store = store

    def read(self) -> ClusterView:
        weps, _ = self._store.list(keys.resource_prefix("workloadendpoints"))
        pods = [p for p in (pod_from_endpoint(kv.value or {}) for kv in weps) if p is not None]
        nodes = read_nodes(self._store)
        return ClusterView.build(nodes, pods)


def read_nodes(store: Datastore) -> set[str]:
    kvs, _ = store.list(keys.resource_prefix("nodes"))
    return {keys.parse_key(kv.key).name for kv in kvs}
