"""Calico policy resources in the Kubernetes datastore, against a real kube-apiserver
(tests/support/kube_cluster.py with deploy/felixpy.yaml's CRDs): Tier, NetworkSet,
GlobalNetworkSet and HostEndpoint round-trip unpruned, ServiceAccounts are the ksa.<ns>.<sa>
profiles with their labels (read-only), and the policy calc fed from the datastore selects a pod
by its service account's labels.
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from felixpy import names
from felixpy.calc.dispatcher import Dispatcher
from felixpy.calc.policy import PolicyCalc
from felixpy.datastore import keys
from felixpy.datastore.api import DatastoreError
from felixpy.datastore.syncer import KVUpdate
from felixpy.model import resources
from tests.integration.test_kube_calico_crds import calico  # noqa: F401  (the fixture: Calico's own CRDs)
from tests.support.kube_cluster import KubeCluster

NS = "fxt-pol"
NODE = "fxt-n1"


def plain(value: Any) -> Any:
    value = json.loads(json.dumps(value))
    meta = value.get("metadata") if isinstance(value, dict) else None
    if isinstance(meta, dict):
        for field in ("uid", "creationTimestamp", "resourceVersion", "generation"):
            meta.pop(field, None)
    return value


def v3(kind: str, name: str, spec: dict[str, Any], **meta: Any) -> dict[str, Any]:
    return resources.validate({"apiVersion": "projectcalico.org/v3", "kind": kind,
                               "metadata": {"name": name, **meta}, "spec": spec})


def policy_values() -> list[dict[str, Any]]:
    return [
        v3("Tier", "security", {"order": 100, "defaultAction": "Pass"}),
        v3("NetworkSet", "partners", {"nets": ["198.51.100.0/24"]}, namespace=NS, labels={"kind": "partner"}),
        v3("GlobalNetworkSet", "blocklist", {"nets": ["203.0.113.0/24", "192.0.2.7"]}, labels={"kind": "bad"}),
        v3("HostEndpoint", "n1-eth0", {"node": NODE, "interfaceName": "eth0", "expectedIPs": ["192.0.2.11"],
                                           "profiles": ["projectcalico-default-allow"],
                                           "ports": [{"name": "ssh", "protocol": "TCP", "port": 22}]},
               labels={"host": "n1"}),
        v3("GlobalNetworkPolicy", "frontends", {
            "tier": "security", "order": 1, "serviceAccountSelector": "role == 'frontend'",
            "ingress": [{"action": "Allow", "source": {"serviceAccounts": {"names": ["api"],
                                                                           "selector": "team == 'x'"}}},
                        {"action": "Pass"}]}),
        v3("GlobalNetworkPolicy", "no-node-port", {
            "selector": "host == 'n1'", "preDNAT": True, "applyOnForward": True,
            "ingress": [{"action": "Deny", "protocol": "TCP", "destination": {"ports": [30080]}}]}),
    ]


def round_trip(store: Any, values: list[dict[str, Any]]) -> None:
    for value in values:
        meta = value["metadata"]
        key = resources.storage_key(value["kind"], meta["name"], meta.get("namespace"))
        assert plain(store.create(key, value).value) == value, value["kind"]
        assert plain(store.get(key).value) == value, value["kind"]


def test_policy_resources_round_trip_and_service_accounts_are_profiles(kube: KubeCluster) -> None:
    store = kube.store()
    kube.namespace(NS, {"team": "a"})
    round_trip(store, policy_values())

    # ServiceAccounts are the ksa.<ns>.<sa> profiles, with their labels as pcsa.<key>.
    kube.request("POST", f"/api/v1/namespaces/{NS}/serviceaccounts", {
        "apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": "web", "labels": {"role": "frontend"}}})
    profile = store.get(keys.resource_key("profiles", f"ksa.{NS}.web")).value
    assert profile["spec"] == {"labelsToApply": {"pcsa.role": "frontend", "pcsa.projectcalico.org/name": "web"}}
    listed = {kv.key for kv in store.list(keys.resource_prefix("profiles"))[0]}
    assert {keys.resource_key("profiles", f"ksa.{NS}.default"), keys.resource_key("profiles", f"kns.{NS}")} <= listed
    with pytest.raises(DatastoreError, match="derived from the ServiceAccount and read-only"):
        store.delete(keys.resource_key("profiles", f"ksa.{NS}.web"))

    # A pod running as that account, networked by the CNI plugin, is selected by the account's labels.
    kube.node(NODE)
    kube.pod(NS, "web", NODE, labels={"app": "web"}, service_account="web")
    name = names.workload_endpoint_name(NODE, "web")
    store.create(keys.resource_key("workloadendpoints", name, NS), {
        "apiVersion": "projectcalico.org/v3", "kind": "WorkloadEndpoint", "metadata": {"name": name, "namespace": NS},
        "spec": {"orchestrator": "k8s", "node": NODE, "containerID": "cid1", "pod": "web", "endpoint": "eth0",
                 "interfaceName": "caliweb", "ipNetworks": ["10.65.0.7/32"], "profiles": [f"kns.{NS}"]}})
    calc = PolicyCalc(NODE)
    kvs, _ = store.list("/calico/resources/v3/projectcalico.org/")
    Dispatcher(calc).on_updates(KVUpdate(kv.key, kv.value, kv.revision) for kv in kvs)
    (chains,) = calc.endpoint_chains().values()
    assert [(t.name, t.ingress) for t in chains.tiers] == [("security", ("frontends",))]
    (host,) = calc.host_endpoint_chains().values()
    assert [t.ingress for t in host.pre_dnat] == [("no-node-port",)] and host.profiles == (
        "projectcalico-default-allow",)


def test_policy_resources_round_trip_on_calicos_own_crds(calico: KubeCluster) -> None:  # noqa: F811
    """The takeover path: what felixpy writes survives the fully typed schemas Calico ships."""
    calico.namespace(NS)
    round_trip(calico.store(), policy_values())
