"""IP_AUTODETECTION_METHOD=kubernetes-internal-ip against the real API server (tests/support/kube_cluster.py):
startup reads the Kubernetes Node and stores its InternalIP, with the local interface's prefix, as the
node address (in the Kubernetes datastore: the Node's projectcalico.org/IPv4Address annotation)."""

from __future__ import annotations

import ipaddress
import pathlib

import pytest

from felixpy.config import load_config
from felixpy.kernel.addresses import Interface
from felixpy.node.startup import StartupError, startup
from tests.support.kube_cluster import KubeCluster

IFACES = [Interface("eth0", 2, True, 1500, (ipaddress.ip_interface("192.0.2.77/24"),))]


def _config(kube: KubeCluster, tmp_path: pathlib.Path, node: str) -> object:
    return load_config({**kube.env(), "NODENAME": node,
                        "IP": "autodetect", "IP_AUTODETECTION_METHOD": "kubernetes-internal-ip",
                        "CALICO_IPV4POOL_CIDR": "10.233.0.0/16", "FELIXPY_STATE_DIR": str(tmp_path)})


def test_the_nodes_internal_ip_becomes_the_node_address(kube: KubeCluster, tmp_path: pathlib.Path) -> None:
    kube.node("fxt-kip1", address="192.0.2.77")
    store = kube.store()
    try:
        result = startup(store, _config(kube, tmp_path, "fxt-kip1"), interfaces=lambda: IFACES,  # type: ignore[arg-type]
                         os_hostname=lambda: "fxt-kip1")
    finally:
        store.close()
    assert str(result.ipv4) == "192.0.2.77/24"
    annotations = kube.request("GET", "/api/v1/nodes/fxt-kip1")["metadata"]["annotations"]
    assert annotations["projectcalico.org/IPv4Address"] == "192.0.2.77/24"


def test_a_node_without_an_internal_ip_stops_startup_in_one_line(kube: KubeCluster, tmp_path: pathlib.Path) -> None:
    kube.node("fxt-kip2")
    store = kube.store()
    try:
        with pytest.raises(StartupError) as info:
            startup(store, _config(kube, tmp_path, "fxt-kip2"), interfaces=lambda: IFACES,  # type: ignore[arg-type]
                    os_hostname=lambda: "fxt-kip2")
    finally:
        store.close()
    assert str(info.value) == "kubernetes-internal-ip: the Kubernetes Node fxt-kip2 has no IPv4 InternalIP"
