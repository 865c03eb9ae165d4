"""Kubernetes Services in the lab: `felixpy-lab service add|endpoints|del`.

The lab has no kube-proxy and no EndpointSlice controller: a Service is made with the pods it
should select named explicitly, and the lab writes the Service and its one EndpointSlice itself
(managed-by felixpy-lab), as the Kubernetes controllers would. What matters is what the agents do
with them — advertise the Service's addresses over BGP (docs/bgp.md) — and what the fabric's BGP
peer learns.

* `--datastore kubernetes`: the Service (no selector, so no controller claims its endpoints) and
  the EndpointSlice are created in the real API server; the API server allocates the cluster IP
  and the lab writes LoadBalancer IPs into status, the cloud controller's part.
* etcd: the lab writes the same objects where felixpy-controllers' mirror would
  (`kubernetesservices/<ns>/<name>`, `kubernetesendpointslices/<ns>/<name>`, through the mirror's
  own functions), and allocates cluster IPs from the lab's service range (10.96.0.0/16).

An endpoint is ready once its pod has an address; deleting a pod removes it from the Services
that named it (`pod del` calls `refresh`).
"""

from __future__ import annotations

import ipaddress
from typing import Any

from felixpy.lab.controlplane import SERVICE_CIDR
from felixpy.lab.state import LabState, PodState, ServiceState
from felixpy.lab.topology import LabUsageError

TYPES = ("ClusterIP", "NodePort", "LoadBalancer")
SLICE_SUFFIX = "felixpy-lab"
MANAGED_BY = "felixpy-lab"


def parse_ips(text: str, what: str) -> list[str]:
    out = []
    for item in (t.strip() for t in text.split(",")):
        if not item:
            continue
        try:
            out.append(str(ipaddress.IPv4Address(item)))
        except ValueError:
            raise LabUsageError(f'{what} "{item}": expected an IPv4 address') from None
    return out


def check(svc: ServiceState) -> None:
    if svc.type not in TYPES:
        raise LabUsageError(f'--type "{svc.type}": expected one of {", ".join(TYPES)}')
    if svc.local and svc.type == "ClusterIP":
        raise LabUsageError("--local (externalTrafficPolicy: Local) needs --type NodePort or LoadBalancer")
    if svc.load_balancer_ips and svc.type != "LoadBalancer":
        raise LabUsageError("--lb-ip needs --type LoadBalancer")
    if svc.cluster_ip and ipaddress.IPv4Address(svc.cluster_ip) not in ipaddress.IPv4Network(SERVICE_CIDR):
        raise LabUsageError(f'--cluster-ip "{svc.cluster_ip}": not in the lab\'s service range {SERVICE_CIDR}')


def free_cluster_ip(st: LabState) -> str:
    """etcd: the first free address of the service range from .10 up (.1 is the API's in Kubernetes)."""
    used = {s.cluster_ip for s in st.services}
    for address in list(ipaddress.IPv4Network(SERVICE_CIDR).hosts())[9:]:
        if str(address) not in used:
            return str(address)
    raise LabUsageError(f"no free cluster IP left in {SERVICE_CIDR}")


def service_object(svc: ServiceState) -> dict[str, Any]:
    spec: dict[str, Any] = {"type": svc.type, "ports": [{"name": "tcp-80", "port": 80, "protocol": "TCP"}]}
    if svc.cluster_ip:
        spec["clusterIP"] = svc.cluster_ip
        spec["clusterIPs"] = [svc.cluster_ip]
    if svc.external_ips:
        spec["externalIPs"] = list(svc.external_ips)
    if svc.type in ("NodePort", "LoadBalancer"):
        spec["externalTrafficPolicy"] = "Local" if svc.local else "Cluster"
    return {"apiVersion": "v1", "kind": "Service", "metadata": {"name": svc.name, "namespace": svc.namespace},
            "spec": spec,
            "status": {"loadBalancer": {"ingress": [{"ip": ip} for ip in svc.load_balancer_ips]}}}


def slice_name(svc: ServiceState) -> str:
    return f"{svc.name}-{SLICE_SUFFIX}"


def endpoint_slice_object(svc: ServiceState, pods: list[PodState]) -> dict[str, Any]:
    endpoints = [{"addresses": [pod.ips[0]], "nodeName": pod.node, "conditions": {"ready": True},
                  "targetRef": {"kind": "Pod", "namespace": pod.namespace, "name": pod.name}}
                 for pod in pods if pod.ips]
    return {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {"name": slice_name(svc), "namespace": svc.namespace,
                         "labels": {"kubernetes.io/service-name": svc.name,
                                    "endpointslice.kubernetes.io/managed-by": MANAGED_BY}},
            "addressType": "IPv4", "ports": [{"name": "tcp-80", "port": 80, "protocol": "TCP"}],
            "endpoints": endpoints}


def endpoint_pods(st: LabState, svc: ServiceState) -> list[PodState]:
    return [p for p in (st.find_pod(*ref.split("/", 1)) for ref in svc.endpoints) if p is not None]


# -- writing them --------------------------------------------------------------------------------


def write(st: LabState, svc: ServiceState, *, create: bool) -> None:
    """Create (or update) the Service and its EndpointSlice in the lab's datastore."""
    from felixpy.lab import pods as labpods

    service = service_object(svc)
    eps = endpoint_slice_object(svc, endpoint_pods(st, svc))
    if st.datastore == "kubernetes":
        _write_kube(labpods.kube_api(st.name), svc, service, eps, create=create)
        return
    from felixpy.controllers.mirror import endpoint_slice_copy, service_copy
    from felixpy.datastore.cas import read_modify_write

    store = labpods.open_datastore(st.name)
    try:
        for key, value in (service_copy(service), endpoint_slice_copy(eps)):
            def replace(_current: Any, wanted: dict[str, Any] = value) -> dict[str, Any]:
                return wanted

            read_modify_write(store, key, replace)
    finally:
        store.close()


def _write_kube(api: Any, svc: ServiceState, service: dict[str, Any], eps: dict[str, Any], *, create: bool) -> None:
    base = f"/api/v1/namespaces/{svc.namespace}/services"
    status = service.pop("status")
    if create:
        created = api.request("POST", base, service)
        svc.cluster_ip = str(created["spec"].get("clusterIP") or "")
    current = api.request("GET", f"{base}/{svc.name}")
    if status["loadBalancer"]["ingress"] != ((current.get("status") or {}).get("loadBalancer") or {}).get("ingress", []):
        api.request("PUT", f"{base}/{svc.name}/status", {**current, "status": status})
    slices = f"/apis/discovery.k8s.io/v1/namespaces/{svc.namespace}/endpointslices"
    if create:
        api.request("POST", slices, eps)
    else:
        current_slice = api.request("GET", f"{slices}/{slice_name(svc)}")
        eps["metadata"]["resourceVersion"] = current_slice["metadata"]["resourceVersion"]
        api.request("PUT", f"{slices}/{slice_name(svc)}", eps)


def delete(st: LabState, svc: ServiceState) -> None:
    from felixpy.lab import pods as labpods

    if st.datastore == "kubernetes":
        api = labpods.kube_api(st.name)
        for path in (f"/apis/discovery.k8s.io/v1/namespaces/{svc.namespace}/endpointslices/{slice_name(svc)}",
                     f"/api/v1/namespaces/{svc.namespace}/services/{svc.name}"):
            try:
                api.request("DELETE", path)
            except Exception as err:  # already gone is fine
                if ": 404 " not in str(err):
                    raise
        return
    from felixpy.controllers.mirror import endpoint_slice_copy, service_copy
    from felixpy.datastore.api import NotFound

    store = labpods.open_datastore(st.name)
    try:
        for key, _ in (service_copy(service_object(svc)),
                       endpoint_slice_copy(endpoint_slice_object(svc, []))):
            try:
                store.delete(key)
            except NotFound:
                pass
    finally:
        store.close()


def refresh_for_pod(st: LabState, pod: PodState) -> list[ServiceState]:
    """A pod went: drop it from the Services that named it and rewrite their EndpointSlices."""
    changed = []
    for svc in st.services:
        if pod.ref in svc.endpoints:
            svc.endpoints = [e for e in svc.endpoints if e != pod.ref]
            write(st, svc, create=False)
            changed.append(svc)
    return changed
