"""The lab's own record of what it built: /run/felixpy-lab/<lab>/state.json, written atomically.

Everything is recorded *before* it is created (a namespace, a pod), so that `down` finds it again
after a crash or a half-built `up`. Commands that change the state hold an flock on the lab's
lock file, so concurrent `felixpy-lab` invocations do not lose each other's updates.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import os
from dataclasses import dataclass, field
from typing import Any, Iterator

from felixpy.lab import topology


@dataclass
class NodeState:
    name: str
    ip: str
    netns: str
    agent_pid: int = 0
    exabgp_pid: int = 0  # mode bgp: the node's ExaBGP (its API process is bgp.sidecar)
    route_reflector: bool = False  # rr<i>: BIRD 2 + felixpy-node in route-reflector mode, no pods
    bird_pid: int = 0  # reflectors: the BIRD daemon


@dataclass
class PodState:
    namespace: str
    name: str
    node: str
    netns: str
    container_id: str
    labels: dict[str, str] = field(default_factory=dict)
    annotations: dict[str, str] = field(default_factory=dict)  # passed to the CNI plugin as the runtime does
    serve: list[str] = field(default_factory=list)  # "name=proto:port"
    ips: list[str] = field(default_factory=list)
    server_pid: int = 0
    service_account: str = ""  # the pod's serviceAccountName ("": none)

    @property
    def ref(self) -> str:
        return f"{self.namespace}/{self.name}"


@dataclass
class ServiceState:
    """A Kubernetes Service the lab made (`felixpy-lab service add`), with the pods it selects."""

    namespace: str
    name: str
    type: str  # ClusterIP | NodePort | LoadBalancer
    cluster_ip: str = ""
    external_ips: list[str] = field(default_factory=list)
    load_balancer_ips: list[str] = field(default_factory=list)
    local: bool = False  # externalTrafficPolicy: Local
    endpoints: list[str] = field(default_factory=list)  # pod refs "ns/pod"

    @property
    def ref(self) -> str:
        return f"{self.namespace}/{self.name}"


@dataclass
class TorState:
    """The fabric's top-of-rack BGP router (`felixpy-lab tor up`): FRR's bgpd in the fabric netns."""

    asn: int
    pid: int = 0
    originate: list[str] = field(default_factory=list)


@dataclass
class LabState:
    name: str
    mode: str
    pool: str
    block_size: int
    nodes: list[NodeState] = field(default_factory=list)
    pods: list[PodState] = field(default_factory=list)
    namespaces: dict[str, dict[str, str]] = field(default_factory=dict)  # ns -> labels
    namespace_annotations: dict[str, dict[str, str]] = field(default_factory=dict)  # ns -> annotations
    netns: list[str] = field(default_factory=list)  # every netns the lab may have created
    etcd_pid: int = 0
    cross_subnet: bool = False  # even nodes on the fabric's second subnet; pools use CrossSubnet
    phase: str = "starting"  # starting | up
    datastore: str = "etcd"  # etcd | kubernetes (a real control plane in the fabric: lab/kube.py)
    kube_pids: dict[str, int] = field(default_factory=dict)  # etcd, kube-apiserver, kube-controller-manager
    heartbeat_pid: int = 0  # kubernetes: the process renewing the nodes' Leases (the kubelets' part)
    services: list[ServiceState] = field(default_factory=list)
    tor: TorState | None = None
    ip_family: str = "ipv4"  # ipv4 | ipv6 | dual (topology.IP_FAMILIES)

    def node(self, name: str) -> NodeState:
        for n in self.nodes:
            if n.name == name:
                return n
        raise topology.LabUsageError(
            f'node "{name}" is not in lab {self.name} (nodes: {", ".join(n.name for n in self.nodes)})')

    def find_pod(self, namespace: str, name: str) -> PodState | None:
        for p in self.pods:
            if p.namespace == namespace and p.name == name:
                return p
        return None

    def pod(self, namespace: str, name: str) -> PodState:
        pod = self.find_pod(namespace, name)
        if pod is None:
            raise topology.LabUsageError(f'pod "{namespace}/{name}" is not in lab {self.name}')
        return pod

    def remember_netns(self, netns: str) -> None:
        if netns not in self.netns:
            self.netns.append(netns)

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> LabState:
        data = dict(data)
        nodes = [NodeState(**n) for n in data.pop("nodes", [])]
        pods = [PodState(**p) for p in data.pop("pods", [])]
        services = [ServiceState(**s) for s in data.pop("services", [])]
        tor = data.pop("tor", None)
        return cls(nodes=nodes, pods=pods, services=services, tor=TorState(**tor) if tor else None, **data)

    def find_service(self, namespace: str, name: str) -> ServiceState | None:
        for s in self.services:
            if s.namespace == namespace and s.name == name:
                return s
        return None

    def service(self, namespace: str, name: str) -> ServiceState:
        svc = self.find_service(namespace, name)
        if svc is None:
            raise topology.LabUsageError(
                f"service {namespace}/{name} is not in lab {self.name} (felixpy-lab service add)")
        return svc


class LabNotFound(topology.LabUsageError):
    pass


def exists(lab: str) -> bool:
    return os.path.exists(topology.state_path(lab))


def load(lab: str) -> LabState:
    try:
        with open(topology.state_path(lab)) as f:
            return LabState.from_json(json.load(f))
    except FileNotFoundError:
        raise LabNotFound(f"lab {lab} is not up (start it with: felixpy-lab up --name {lab})") from None
    except (ValueError, TypeError) as e:
        raise topology.LabUsageError(
            f"lab {lab}: unreadable {topology.state_path(lab)} ({e}); felixpy-lab down --name {lab}"
        ) from None


def save(state: LabState) -> None:
    path = topology.state_path(state.name)
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(state.to_json(), f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


@contextlib.contextmanager
def locked(lab: str, create: bool = False) -> Iterator[None]:
    """Serialise state changes of one lab across processes (`create` only for `up`)."""
    if create:
        os.makedirs(topology.run_dir(lab), exist_ok=True)
    try:
        fd = os.open(f"{topology.run_dir(lab)}/lock", os.O_RDWR | os.O_CREAT, 0o600)
    except FileNotFoundError:
        raise LabNotFound(f"lab {lab} is not up (start it with: felixpy-lab up --name {lab})") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)
