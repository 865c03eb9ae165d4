"""The takeover path: felixpy on a cluster that has Calico's own CRDs installed instead of felixpy's.

tests/support/calico_crds.py builds CRDs shaped as Calico ships them (fully typed specs that prune
unknown fields and drop nulls, Calico's required fields); they replace deploy/felixpy.yaml's for
the test and are put back afterwards. Node startup, IPAM, every resource kind and the Syncer must
work unchanged, and every value felixpy writes must read back exactly as written.
"""

from __future__ import annotations

import ipaddress
import json
from pathlib import Path
from typing import Any, Iterator

import pytest

from felixpy.config import AutodetectMethod, load_config
from felixpy.datastore import keys
from felixpy.datastore import kube_mapping as m
from felixpy.datastore.syncer import Syncer, SyncStatus
from felixpy.ipam import check as ipam_check
from felixpy.ipam.allocator import IPAM
from felixpy.kernel.addresses import Interface, IPInterface
from felixpy.model import resources
from felixpy.node.startup import startup
from tests.integration.test_kube_real_datastore import RESOURCES, plain
from tests.support.calico_crds import calico_crds
from tests.support.kube_cluster import KubeCluster, manifest_objects

HOST = [Interface("eth0", 2, True, 1500, (ipaddress.IPv4Interface("192.0.2.21/24"),))]


@pytest.fixture
def calico(kube: KubeCluster) -> Iterator[KubeCluster]:
    kube.apply(calico_crds())
    try:
        # The replaced schema is in force once an unknown spec field is pruned.
        kube.request("POST", f"{m.CRD_API}/ippools", {
            "apiVersion": "crd.projectcalico.org/v1", "kind": "IPPool", "metadata": {"name": "probe"},
            "spec": {"cidr": "10.99.0.0/24", "notACalicoField": True}})
        assert "notACalicoField" not in kube.request("GET", f"{m.CRD_API}/ippools/probe")["spec"]
        kube.request("DELETE", f"{m.CRD_API}/ippools/probe")
        yield kube
    finally:
        kube.reset()
        kube.apply(manifest_objects(kinds=("CustomResourceDefinition",)))


def _detect(method: AutodetectMethod, version: int = 4) -> IPInterface:
    return HOST[0].addresses[0]


def test_startup_ipam_and_resources_on_calicos_crds(calico: KubeCluster, tmp_path: Path) -> None:
    kube = calico
    kube.node("fxt-n1", address="192.0.2.21")
    store = kube.store()
    env = {**kube.env(), "NODENAME": "fxt-n1", "CALICO_IPV4POOL_CIDR": "10.74.0.0/16",
           "CALICO_IPV4POOL_VXLAN": "Always", "FELIXPY_STATE_DIR": str(tmp_path),
           "CALICO_NODENAME_FILE": str(tmp_path / "nodename")}
    result = startup(store, load_config(env), detect=_detect,
                     interfaces=lambda: list(HOST))
    assert result.node["spec"]["ipv4VXLANTunnelAddr"]
    assert store.get(keys.IPAM_CONFIG).value == {"strict_affinity": False, "auto_allocate_blocks": True,
                                                 "maxBlocksPerHost": 0}

    # Every resource kind, written and read back through Calico's schemas: nothing pruned.
    kube.namespace("fxt-np")
    values = [resources.validate(json.loads(json.dumps(v))) for v in RESOURCES
              if v["kind"] not in ("ClusterInformation", "FelixConfiguration", "BGPConfiguration")]
    values.append(resources.validate({
        "apiVersion": "projectcalico.org/v3", "kind": "NetworkPolicy",
        "metadata": {"name": "allow-web", "namespace": "fxt-np"},
        "spec": {"order": 10, "selector": "app == 'web'", "types": ["Ingress"],
                 "ingress": [{"action": "Allow", "protocol": "TCP",
                              "source": {"namespaceSelector": "team == 'a'"}, "destination": {"ports": [80, "http"]}}]}}))
    for value in values:
        meta = value["metadata"]
        key = resources.storage_key(value["kind"], meta["name"], meta.get("namespace"))
        store.create(key, value)
        assert plain(store.get(key).value) == value, value["kind"]
    for plural in ("felixconfigurations", "bgpconfigurations", "clusterinformations"):
        kv = store.get(keys.resource_key(plural, "default"))
        assert kv.value["spec"] == plain(kv.value)["spec"]

    # IPAM: blocks, affinities, handles exactly as written, then released.
    ipam = IPAM(store, cache_ttl=0)
    ips = ipam.auto_assign(num=70, handle="k8s-pod-network.abc", attrs={"node": "fxt-n1", "pod": "p",
                                                                         "namespace": "fxt-np"}, node="fxt-n1")
    assert len(set(ips)) == 70
    for kv in store.list(keys.BLOCKS)[0]:
        raw = kube.request("GET", f"{m.CRD_API}/ipamblocks/{m.cidr_to_name(kv.value['cidr'])}")
        assert raw["spec"]["strictAffinity"] is False and raw["spec"]["affinityClaimTime"]
        assert m._block_convert(raw) == (kv.key, kv.value)
        assert all(a.get("handle_id") for a in kv.value["attributes"])
    assert {kv.value["state"] for kv in store.list(keys.HOSTS)[0]} == {"confirmed"}
    # No pod uses these addresses (no endpoint was made): every one is reported as a leak, and
    # nothing else (blocks, handles and affinities agree with each other).
    problems = ipam_check.check(store).problems
    assert {p.kind for p in problems} == {ipam_check.LEAK}
    assert sorted(str(p.ip) for p in problems) == sorted(str(ip) for ip in ips)
    assert len(ipam.release_by_handle("k8s-pod-network.abc")) == 70
    assert ipam_check.check(store).problems == ()

    statuses: list[Any] = []
    syncer = Syncer(store, lambda e: statuses.append(e) if isinstance(e, SyncStatus) else None)
    syncer.start()
    try:
        kube.wait("the syncer in sync on Calico's CRDs", lambda: SyncStatus.IN_SYNC in statuses)
    finally:
        syncer.stop()
