"""The mirror's conversions and its reconcile / resync logic (felixpy/controllers/mirror.py), on
the in-memory datastore with the Kubernetes side fed by hand (no network)."""

from __future__ import annotations

from typing import Any

import pytest

from felixpy.controllers import mirror as mm
from felixpy.datastore import keys
from felixpy.datastore.api import NotFound
from felixpy.datastore.memory import MemoryDatastore
from felixpy.model import resources as r

NS = "shop"


def ns_obj(name: str, labels: dict[str, str] | None = None, rv: str = "1") -> dict[str, Any]:
    return {"metadata": {"name": name, "labels": labels or {}, "resourceVersion": rv}}


def pod_obj(name: str, labels: dict[str, str], rv: str = "1", node: str = "n1") -> dict[str, Any]:
    return {"metadata": {"name": name, "namespace": NS, "labels": labels, "resourceVersion": rv},
            "spec": {"nodeName": node, "serviceAccountName": "api",
                     "containers": [{"name": "c", "ports": [{"name": "http", "containerPort": 80},
                                                            {"containerPort": 9090}]}]}}


def np_obj(name: str, rv: str = "1", **spec: Any) -> dict[str, Any]:
    return {"metadata": {"name": name, "namespace": NS, "resourceVersion": rv},
            "spec": spec or {"podSelector": {}, "policyTypes": ["Ingress"]}}


class NoReader:
    def close(self) -> None:
        pass


def source(name: str) -> mm.Source:
    return next(s for s in mm.SOURCES if s.name == name)


def make(store: MemoryDatastore) -> mm.Mirror:
    return mm.Mirror(store, NoReader(), resync_period=60)  # type: ignore[arg-type]


def get(store: MemoryDatastore, key: str) -> Any:
    try:
        return store.get(key).value
    except NotFound:
        return None


def test_profiles_validate_as_calico_resources() -> None:
    key, kns = mm.namespace_profile(ns_obj(NS, {"team": "a"}))
    assert key == keys.resource_key("profiles", "kns.shop")
    r.validate(kns)
    assert kns["spec"]["labelsToApply"] == {"pcns.team": "a", "pcns.projectcalico.org/name": NS}
    key, ksa = mm.service_account_profile({"metadata": {"name": "api", "namespace": NS, "labels": {"x": "y"}}})
    assert key == keys.resource_key("profiles", "ksa.shop.api")
    r.validate(ksa)
    assert ksa["spec"] == {"labelsToApply": {"pcsa.x": "y", "pcsa.projectcalico.org/name": "api"}}


def test_endpoint_gets_pod_labels_named_ports_and_service_account_only() -> None:
    wep: dict[str, Any] = {"metadata": {"name": "n1-k8s-web-eth0", "namespace": NS, "labels": {"stale": "1"}},
           "spec": {"ipNetworks": ["10.0.0.1/32"], "mac": "02:00:00:00:00:01", "ports": []}}
    out = mm.endpoint_with_pod(wep, pod_obj("web", {"app": "web"}))
    assert out["metadata"]["labels"] == {"app": "web", "projectcalico.org/namespace": NS,
                                         "projectcalico.org/orchestrator": "k8s",
                                         "projectcalico.org/serviceaccount": "api"}
    assert out["spec"] == {"ipNetworks": ["10.0.0.1/32"], "mac": "02:00:00:00:00:01",
                           "ports": [{"name": "http", "protocol": "TCP", "port": 80}], "serviceAccountName": "api"}
    assert wep["metadata"]["labels"] == {"stale": "1"}  # the input is not changed


def test_endpoint_key_skips_unscheduled_and_host_network_pods() -> None:
    assert mm.endpoint_key(pod_obj("web", {})) == keys.resource_key("workloadendpoints", "n1-k8s-web-eth0", NS)
    assert mm.endpoint_key({"metadata": {"name": "p", "namespace": NS}, "spec": {}}) is None
    assert mm.endpoint_key({"metadata": {"name": "p", "namespace": NS},
                            "spec": {"nodeName": "n1", "hostNetwork": True}}) is None


@pytest.mark.parametrize("key,owned", [
    (keys.resource_key("profiles", "kns.a"), True),
    (keys.resource_key("profiles", "ksa.a.b"), True),
    (keys.resource_key("profiles", "custom"), False),
    (keys.resource_key("networkpolicies", "knp.default.x", "a"), True),
    (keys.resource_key("networkpolicies", "x", "a"), False),
    (keys.resource_key("globalnetworkpolicies", "knp.default.x"), False),
    (keys.handle_key("knp.default.x"), False),
])
def test_only_mirrored_names_are_owned(key: str, owned: bool) -> None:
    assert mm.owned_key(key) is owned


def test_unconvertible_policy_is_removed_not_left_stale() -> None:
    key, value = mm.network_policy(np_obj("bad", podSelector={}, policyTypes=["Sideways"]))
    assert key == keys.resource_key("networkpolicies", "knp.default.bad", NS) and value is None


def test_reconcile_writes_once_and_follows_deletion() -> None:
    store = MemoryDatastore()
    m = make(store)
    m._replace(source("networkpolicies"), [np_obj("a")])
    m.reconcile("networkpolicies", (NS, "a"))
    key = keys.resource_key("networkpolicies", "knp.default.a", NS)
    revision = store.get(key).revision
    m.reconcile("networkpolicies", (NS, "a"))  # unchanged: no write
    assert store.get(key).revision == revision and m.writes == 1
    m._apply_event(source("networkpolicies"), "DELETED", np_obj("a", rv="2"))
    m.reconcile("networkpolicies", (NS, "a"))
    assert get(store, key) is None and m.deletes == 1


def test_pods_never_create_endpoints() -> None:
    store = MemoryDatastore()
    m = make(store)
    m._replace(source("pods"), [pod_obj("web", {"app": "web"})])
    m.reconcile("pods", (NS, "web"))
    assert store.list(keys.resource_prefix("workloadendpoints"))[0] == []


def test_resync_waits_for_every_kind_then_deletes_stale_owned_copies() -> None:
    store = MemoryDatastore()
    stale = keys.resource_key("profiles", "kns.gone")
    user = keys.resource_key("profiles", "custom")
    for key in (stale, user):
        store.create(key, {"kind": "Profile"})
    m = make(store)
    m._replace(source("namespaces"), [ns_obj(NS)])
    assert not m.in_sync  # pods, service accounts and policies not listed yet
    for name in ("serviceaccounts", "networkpolicies", "pods", "services", "endpointslices"):
        m._replace(source(name), [])
    assert m.in_sync
    result = m.resync()
    assert result.deleted == 1 and result.written == 1
    assert get(store, stale) is None and get(store, user) == {"kind": "Profile"}
    assert get(store, keys.resource_key("profiles", f"kns.{NS}")) is not None
    assert m.resync() == mm.MirrorPass(0, 0, 0)


def test_relist_marks_changed_and_vanished_objects_dirty() -> None:
    store = MemoryDatastore()
    m = make(store)
    m._replace(source("namespaces"), [ns_obj("a"), ns_obj("b")])
    while not m._dirty.empty():
        m._dirty.get_nowait()
    m._replace(source("namespaces"), [ns_obj("a"), ns_obj("c")])
    dirty = set()
    while not m._dirty.empty():
        dirty.add(m._dirty.get_nowait())
    assert dirty == {("namespaces", ("", "b")), ("namespaces", ("", "c")), "resync"}
