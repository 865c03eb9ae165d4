"""`felixctl datastore migrate` (felixpy/ctl/migrate.py): etcd → the Kubernetes datastore (on the
fake API server) → etcd again keeps every resource and every IPAM allocation; the lock, the
refusal of an unlocked export and of a non-empty target.
"""

from __future__ import annotations

import argparse
import io
from pathlib import Path
from typing import Any, Iterator

import pytest

from felixpy.ctl import migrate
from felixpy.datastore import keys
from felixpy.datastore.kube import KubeDatastore, load_settings
from felixpy.ipam.allocator import IPAM
from felixpy.model import store as ms
from tests.support.fake_kube_api import FakeKubeAPI

pytestmark = pytest.mark.etcd

NS = "fxt-mig"
HANDLE = "k8s-pod-network.0a1b2c3d"
COMPARED = ("IPPool", "IPReservation", "BGPPeer", "GlobalNetworkPolicy", "NetworkPolicy", "BGPConfiguration",
            "FelixConfiguration", "IPAMConfiguration")


@pytest.fixture
def fake() -> Iterator[FakeKubeAPI]:
    api = FakeKubeAPI(bookmark_interval=0.2).start()
    try:
        # What the cluster has before the migration: the kubelet's Node, namespaces, a pod.
        api.put("/api/v1/nodes", {"metadata": {"name": "n1"},
                                   "status": {"addresses": [{"type": "InternalIP", "address": "192.0.2.11"}]}})
        for ns in ("default", NS):
            api.put("/api/v1/namespaces", {"metadata": {"name": ns}})
        api.put(f"/api/v1/namespaces/{NS}/pods", {"metadata": {"name": "web-1", "namespace": NS, "labels": {"app": "web"}},
                                                  "spec": {"nodeName": "n1", "containers": [{"name": "c"}]}})
        yield api
    finally:
        api.stop()


@pytest.fixture
def kube_store(fake: FakeKubeAPI, tmp_path: Path) -> Iterator[KubeDatastore]:
    path = tmp_path / "kubeconfig"
    path.write_text(fake.kubeconfig())
    store = KubeDatastore(load_settings(kubeconfig=str(path)))
    try:
        yield store
    finally:
        store.close()


def felixctl(store: Any, *argv: str, stdin: str | None = None, tmp_path: Path | None = None) -> tuple[int, str, str]:
    parser = argparse.ArgumentParser(prog="felixctl")
    sub = parser.add_subparsers(dest="command")
    migrate.add_parser(sub)
    args = parser.parse_args(list(argv))
    out, err = io.StringIO(), io.StringIO()
    code = migrate.run(args, store, out, err)
    return code, out.getvalue(), err.getvalue()


def populate(store: Any) -> None:
    docs = [
        {"kind": "IPPool", "metadata": {"name": "pool-a"},
         "spec": {"cidr": "10.65.0.0/16", "blockSize": 26, "ipipMode": "Never", "natOutgoing": True}},
        {"kind": "IPReservation", "metadata": {"name": "gw"}, "spec": {"reservedCIDRs": ["10.65.0.1", "10.65.9.0/28"]}},
        {"kind": "BGPPeer", "metadata": {"name": "rr"}, "spec": {"peerIP": "192.0.2.50", "asNumber": 64512}},
        {"kind": "GlobalNetworkPolicy", "metadata": {"name": "deny-db"},
         "spec": {"selector": "app == 'db'", "types": ["Ingress"], "ingress": [{"action": "Deny"}]}},
        {"kind": "NetworkPolicy", "metadata": {"name": "allow-web", "namespace": NS},
         "spec": {"selector": "app == 'web'", "ingress": [{"action": "Allow", "protocol": "TCP",
                                                            "destination": {"ports": [80]}}]}},
        # A Kubernetes policy's mirrored copy: derived, not exported.
        {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy", "metadata": {"name": "k8s-np", "namespace": NS},
         "spec": {"podSelector": {}, "policyTypes": ["Ingress"]}},
        {"kind": "Node", "metadata": {"name": "n1"},
         "spec": {"bgp": {"ipv4Address": "192.0.2.11/24", "asNumber": 64513},
                  "orchRefs": [{"nodeName": "n1", "orchestrator": "k8s"}]}},
        {"kind": "BGPConfiguration", "metadata": {"name": "default"},
         "spec": {"nodeToNodeMeshEnabled": False, "asNumber": 64512}},
        {"kind": "FelixConfiguration", "metadata": {"name": "default"}, "spec": {"logSeverityScreen": "Info"}},
        {"kind": "IPAMConfiguration", "metadata": {"name": "default"},
         "spec": {"strictAffinity": True, "maxBlocksPerHost": 7}},
    ]
    ms.apply_resources(store, [{"apiVersion": "projectcalico.org/v3", **d} if "apiVersion" not in d else d
                               for d in docs], "apply")
    store.create(keys.resource_key("profiles", f"kns.{NS}"),
                 {"apiVersion": "projectcalico.org/v3", "kind": "Profile", "metadata": {"name": f"kns.{NS}"},
                  "spec": {"ingress": [{"action": "Allow"}], "egress": [{"action": "Allow"}]}})
    ipam = IPAM(store, cache_ttl=0)
    ips = ipam.auto_assign(num=2, handle=HANDLE, attrs={"namespace": NS, "pod": "web-1", "node": "n1"}, node="n1")
    ipam.auto_assign(handle="ipip-tunnel-addr-n1", attrs={"type": "ipipTunnelAddress", "node": "n1"}, node="n1")
    wep = "n1-k8s-web--1-eth0"
    store.create(keys.resource_key("workloadendpoints", wep, NS), {
        "apiVersion": "projectcalico.org/v3", "kind": "WorkloadEndpoint",
        "metadata": {"name": wep, "namespace": NS, "labels": {"app": "web"}},
        "spec": {"orchestrator": "k8s", "node": "n1", "pod": "web-1", "endpoint": "eth0", "containerID": "abc",
                 "interfaceName": "cali0000000000a", "ipNetworks": [f"{ips[0]}/32"], "profiles": [f"kns.{NS}"]}})


def snapshot(store: Any) -> dict[str, Any]:
    """What must survive a migration, backend-neutral."""
    out: dict[str, Any] = {}
    for kind in COMPARED:
        items, _ = ms.list_resources(store, kind)
        out[kind] = [migrate._clean(i) for i in items if not migrate.derived(kind, i["metadata"]["name"])]
    node = ms.read_resource(store, "Node", "n1")
    out["node-bgp"] = (node or {}).get("spec", {}).get("bgp")
    weps, _ = ms.list_resources(store, "WorkloadEndpoint")
    out["weps"] = sorted((w["metadata"]["name"], tuple(w["spec"]["ipNetworks"])) for w in weps)
    info = ms.read_resource(store, "ClusterInformation", "default")
    out["guid"] = (info or {}).get("spec", {}).get("clusterGUID")
    ipam = IPAM(store, cache_ttl=0)
    out["handle"] = sorted(str(ip) for ip in ipam.ips_by_handle(HANDLE))
    out["tunnel"] = sorted(str(ip) for ip in ipam.ips_by_handle("ipip-tunnel-addr-n1"))
    out["blocks"] = {kv.key: kv.value for kv in store.list(keys.BLOCKS)[0]}
    out["affinities"] = {kv.key: kv.value for kv in store.list(keys.HOSTS)[0]}
    out["handles"] = {kv.key: kv.value for kv in store.list(keys.HANDLES)[0]}
    return out


def test_etcd_to_kubernetes_and_back(etcd_store: Any, kube_store: KubeDatastore, tmp_path: Path) -> None:
    populate(etcd_store)
    code, _, err = felixctl(etcd_store, "datastore", "migrate", "export")
    assert code == 1 and "not locked" in err

    assert felixctl(etcd_store, "datastore", "migrate", "lock")[0] == 0
    before = snapshot(etcd_store)
    assert len(before["handle"]) == 2 and before["tunnel"] and before["guid"]
    assert all(before[kind] for kind in COMPARED) and before["weps"] and before["node-bgp"]
    assert before["blocks"] and before["affinities"] and len(before["handles"]) == 2
    code, text, err = felixctl(etcd_store, "datastore", "migrate", "export")
    assert code == 0, err
    assert "knp.default." not in text and f"kns.{NS}" not in text.replace(f"- kns.{NS}", "")
    dump = tmp_path / "cluster.yaml"
    dump.write_text(text)

    code, out, err = felixctl(kube_store, "datastore", "migrate", "import", "-f", str(dump))
    assert code == 0, err
    assert "Successfully imported" in out and err == ""
    assert migrate.is_locked(kube_store)
    in_kube = snapshot(kube_store)
    assert in_kube == before

    # Back again, into an emptied etcd.
    code, text2, err = felixctl(kube_store, "datastore", "migrate", "export")
    assert code == 0, err
    etcd_store.delete_prefix("/calico/")
    dump.write_text(text2)
    code, out, err = felixctl(etcd_store, "datastore", "migrate", "import", "-f", str(dump))
    assert code == 0, err
    assert snapshot(etcd_store) == before
    assert felixctl(etcd_store, "datastore", "migrate", "unlock")[0] == 0
    assert not migrate.is_locked(etcd_store)


def test_import_refuses_a_non_empty_target_unless_forced(etcd_store: Any, kube_store: KubeDatastore,
                                                         tmp_path: Path) -> None:
    populate(etcd_store)
    felixctl(etcd_store, "datastore", "migrate", "lock")
    dump = tmp_path / "cluster.yaml"
    dump.write_text(felixctl(etcd_store, "datastore", "migrate", "export")[1])
    code, _, err = felixctl(etcd_store, "datastore", "migrate", "import", "-f", str(dump))
    assert code == 1
    assert "not empty" in err and "IPPool" in err and err.count("\n") == 1
    code, out, err = felixctl(etcd_store, "datastore", "migrate", "import", "-f", str(dump), "--force")
    assert code == 0, err


def test_node_and_endpoint_without_kubernetes_object_are_skipped(etcd_store: Any, kube_store: KubeDatastore,
                                                                 fake: FakeKubeAPI, tmp_path: Path) -> None:
    populate(etcd_store)
    ms.apply_resources(etcd_store, [{"apiVersion": "projectcalico.org/v3", "kind": "Node",
                                     "metadata": {"name": "bare-metal-1"}, "spec": {}}], "apply")
    felixctl(etcd_store, "datastore", "migrate", "lock")
    dump = tmp_path / "cluster.yaml"
    dump.write_text(felixctl(etcd_store, "datastore", "migrate", "export")[1])
    code, out, err = felixctl(kube_store, "datastore", "migrate", "import", "-f", str(dump))
    assert code == 0, err
    assert "skipped Node bare-metal-1" in err
    assert fake.object("/api/v1/nodes/bare-metal-1") is None


def test_invalid_document_writes_nothing(etcd_store: Any, tmp_path: Path) -> None:
    dump = tmp_path / "bad.yaml"
    dump.write_text("apiVersion: projectcalico.org/v3\nkind: IPPool\nmetadata: {name: p}\nspec: {cidr: 10.9.0.0/16}\n"
                    "---\napiVersion: projectcalico.org/v3\nkind: IPPool\nmetadata: {name: q}\nspec: {cidr: nonsense}\n")
    code, _, err = felixctl(etcd_store, "datastore", "migrate", "import", "-f", str(dump))
    assert code == 1 and "document 2" in err
    assert etcd_store.list("/calico/")[0] == []
