"""Calico's IPAM annotations and network config, as the CNI server turns them into IPAM requests.

Pure parsing (cni/ipam_request.py) and the CNI handler's assignment step on the in-memory
datastore: the same code the agent runs for a pod, without the veth plumbing (which the e2e test
tests/e2e/test_ipam_annotations.py covers in the lab).
"""

from __future__ import annotations

import ipaddress
from typing import Any, Mapping

import pytest

from felixpy.cni import ipam_request as ir
from felixpy.cni.server import CNIHandler, parse_request
from felixpy.datastore import keys
from felixpy.datastore.kube_mapping import profile_value
from felixpy.datastore.memory import MemoryDatastore
from felixpy.ipam.errors import AddressInUseError, NoQualifiedPoolError
from felixpy.model.resources import validate

IP = ipaddress.IPv4Address
NET = ipaddress.ip_network


def no_namespace() -> ir.Metadata:
    raise AssertionError("the namespace must not be read")


def ns(**annotations: str) -> Any:
    return lambda: ir.Metadata(annotations={f"cni.projectcalico.org/{k}": v for k, v in annotations.items()})


POOLS = "cni.projectcalico.org/ipv4pools"
ADDRS = "cni.projectcalico.org/ipAddrs"
NO_IPAM = "cni.projectcalico.org/ipAddrsNoIpam"
FAMILIES = "cni.projectcalico.org/ipFamilies"


# -- parsing -------------------------------------------------------------------------------------------
def test_pool_precedence_pod_then_namespace_then_config() -> None:
    conf = {"ipam": {"type": "calico-ipam", "ipv4_pools": ["from-conf"]}}
    assert ir.ip_request({POOLS: '["pod-pool", "10.1.0.0/16"]'}, ns(ipv4pools='["ns-pool"]'), conf) == \
        ir.IPRequest(pools=("pod-pool", "10.1.0.0/16"))
    assert ir.ip_request({}, ns(ipv4pools='["ns-pool"]'), conf) == ir.IPRequest(pools=("ns-pool",))
    assert ir.ip_request({}, ns(), conf) == ir.IPRequest(pools=("from-conf",))
    assert ir.ip_request({}, ns(), {}) == ir.IPRequest(pools=None)
    assert ir.ip_request({POOLS: "[]"}, ns(), conf) == ir.IPRequest(pools=None)  # as Calico: every pool


def test_fixed_addresses_and_no_ipam() -> None:
    assert ir.ip_request({ADDRS: '["10.244.0.7"]', POOLS: '["ignored"]'}, no_namespace, {}) == \
        ir.IPRequest(ips=(IP("10.244.0.7"),))
    with pytest.raises(ir.RequestError, match="requested feature is not enabled: ip_addrs_no_ipam"):
        ir.ip_request({NO_IPAM: '["10.9.9.9"]'}, no_namespace, {})
    with pytest.raises(ir.RequestError, match="requested feature is not enabled"):
        ir.ip_request({NO_IPAM: '["10.9.9.9"]'}, no_namespace, {"feature_control": {"ip_addrs_no_ipam": False}})
    enabled = {"feature_control": {"ip_addrs_no_ipam": True}}
    assert ir.ip_request({NO_IPAM: '["10.9.9.9"]'}, no_namespace, enabled) == \
        ir.IPRequest(ips=(IP("10.9.9.9"),), bypass_ipam=True)


@pytest.mark.parametrize("pod, config, message", [
    ({ADDRS: '["10.0.0.1"]', NO_IPAM: '["10.0.0.1"]'}, {}, "can't have both annotations"),
    ({ADDRS: "10.0.0.1"}, {}, "is not a JSON list of strings"),
    ({ADDRS: "[]"}, {}, 'annotation "cni.projectcalico.org/ipAddrs" specified but empty'),
    ({ADDRS: '["10.0.0.300"]'}, {}, "invalid IP address '10.0.0.300'"),
    ({ADDRS: '["fd00::1", "fd00::2"]'}, {}, "cannot have more than one IPv6 address"),
    ({ADDRS: '["10.0.0.1", "10.0.0.2"]'}, {}, "cannot have more than one IPv4 address"),
    ({POOLS: '"p1"'}, {}, "is not a JSON list of strings"),
    ({FAMILIES: '[]'}, {}, "error parsing ipFamilies"),
    ({FAMILIES: '["IPv5"]'}, {}, "error parsing ipFamilies"),
    ({}, {"ipam": {"assign_ipv6": True}}, 'ipam.assign_ipv6 must be "true" or "false"'),
    ({}, {"ipam": {"assign_ipv4": "false"}}, "are both false"),
    ({}, {"ipam": {"ipv6_pools": "p6"}}, "ipam.ipv6_pools must be a list"),
    ({}, {"ipam": {"type": "host-local"}}, "ipam.type 'host-local' is not supported"),
    ({}, {"ipam": {"ipv4_pools": "p1"}}, "ipam.ipv4_pools must be a list"),
    ({NO_IPAM: '["10.0.0.1"]'}, {"feature_control": {"ip_addrs_no_ipam": "yes"}}, "must be true or false"),
])
def test_bad_requests_are_one_line_errors(pod: Mapping[str, str], config: Mapping[str, Any], message: str) -> None:
    with pytest.raises(ir.RequestError) as info:
        ir.ip_request(pod, ns(), config)
    assert message in str(info.value) and "\n" not in str(info.value)


def test_ip_families_from_the_namespace() -> None:
    assert ir.ip_request({}, ns(ipFamilies='["IPv4"]'), {}) == ir.IPRequest()
    assert ir.ip_request({}, ns(ipFamilies='["IPv6"]'), {}) == ir.IPRequest(families=(6,))
    assert ir.ip_request({FAMILIES: '["IPv6", "IPv4"]'}, ns(), {}).families == (4, 6)


def test_assign_ipv6_makes_a_dual_stack_request_with_its_own_pools() -> None:
    dual = {"ipam": {"type": "calico-ipam", "assign_ipv4": "true", "assign_ipv6": "true",
                     "ipv4_pools": ["p4"], "ipv6_pools": ["p6"]}}
    assert ir.ip_request({}, ns(), dual) == ir.IPRequest(pools=("p4",), families=(4, 6), pools6=("p6",))
    v6_only = {"ipam": {"assign_ipv4": "false", "assign_ipv6": "true"}}
    assert ir.ip_request({}, ns(), v6_only) == ir.IPRequest(families=(6,))
    # The pod's ipv6pools annotation wins over the network config's.
    assert ir.ip_request({"cni.projectcalico.org/ipv6pools": '["other"]'}, ns(), dual).pools6 == ("other",)
    # ipAddrs: one address per family.
    assert ir.ip_request({ADDRS: '["10.0.0.1", "fd00::1"]'}, ns(), {}).ips == (IP("10.0.0.1"), ipaddress.ip_address("fd00::1"))


def test_runtime_pod_annotations() -> None:
    cap = "io.kubernetes.cri.pod-annotations"
    assert ir.runtime_pod_annotations({"runtimeConfig": {cap: {ADDRS: '["10.0.0.1"]'}}}) == {ADDRS: '["10.0.0.1"]'}
    assert ir.runtime_pod_annotations({"runtimeConfig": {"portMappings": []}}) is None
    assert ir.runtime_pod_annotations({}) is None


def test_namespace_metadata_from_the_profile_kubernetes_maps() -> None:
    store = MemoryDatastore()
    namespace = {"metadata": {"name": "shop", "labels": {"team": "blue", "kubernetes.io/metadata.name": "shop"},
                              "annotations": {POOLS: '["blue"]', "kubectl.kubernetes.io/last-applied-configuration": "{}"}}}
    profile = profile_value(namespace)
    assert profile["metadata"]["annotations"] == {POOLS: '["blue"]'}  # only the CNI plugin's annotations
    store.create(keys.resource_key("profiles", "kns.shop"), profile)
    meta = ir.namespace_metadata(store, "shop")
    assert meta.labels == {"team": "blue", "kubernetes.io/metadata.name": "shop"}
    assert meta.annotations == {POOLS: '["blue"]'}
    assert ir.namespace_metadata(store, "none") == ir.Metadata()


def test_kube_pod_annotations_reads_the_pod_once_opened() -> None:
    opened: list[int] = []

    class Http:
        def request(self, method: str, path: str) -> dict[str, Any]:
            if path.endswith("/pods/gone"):
                raise RuntimeError("404 NotFound: pods \"gone\" not found\nmore")
            return {"metadata": {"annotations": {ADDRS: '["10.0.0.1"]'}}}

    def open_http() -> Http:
        opened.append(1)
        return Http()

    lookup = ir.kube_pod_annotations(open_http)
    assert lookup("x", "a") == {ADDRS: '["10.0.0.1"]'}
    assert lookup("x", "b") == {ADDRS: '["10.0.0.1"]'} and opened == [1]
    with pytest.raises(ir.RequestError, match=r'^cannot read pod x/gone from the Kubernetes API: 404 NotFound: pods "gone" not found$'):
        lookup("x", "gone")


# -- the CNI handler's assignment step ------------------------------------------------------------------
def add_pool(store: MemoryDatastore, name: str, cidr: str, **spec: Any) -> None:
    store.create(keys.resource_key("ippools", name),
                 validate({"kind": "IPPool", "metadata": {"name": name}, "spec": {"cidr": cidr, "blockSize": 28, **spec}}))


def add_namespace(store: MemoryDatastore, name: str, labels: Mapping[str, str], **annotations: str) -> None:
    obj = {"metadata": {"name": name, "labels": dict(labels),
                        "annotations": {f"cni.projectcalico.org/{k}": v for k, v in annotations.items()}}}
    store.create(keys.resource_key("profiles", f"kns.{name}"), profile_value(obj))


def handler(store: MemoryDatastore, pods: Mapping[str, Mapping[str, str]] | None = None) -> CNIHandler:
    def from_api(namespace: str, pod: str) -> Mapping[str, str]:
        return (pods or {}).get(f"{namespace}/{pod}", {})

    return CNIHandler(store=store, node_name="n1", mtu=1500, node_labels=lambda: {},
                      wait_programmed=lambda key, rev, timeout: True, ready=lambda: (True, ""),
                      pod_annotations=from_api if pods is not None else None)


def request(namespace: str, pod: str, cid: str = "c" * 64, **config: Any) -> Any:
    return parse_request({
        "env": {"CNI_COMMAND": "ADD", "CNI_CONTAINERID": cid, "CNI_NETNS": "/run/netns/x", "CNI_IFNAME": "eth0",
                "CNI_ARGS": f"K8S_POD_NAMESPACE={namespace};K8S_POD_NAME={pod}"},
        "config": {"cniVersion": "1.0.0", "name": "k8s-pod-network", "type": "felixpy", **config}})


def runtime(**annotations: str) -> dict[str, Any]:
    return {"runtimeConfig": {"io.kubernetes.cri.pod-annotations":
                              {f"cni.projectcalico.org/{k}": v for k, v in annotations.items()}}}


def test_handler_fixed_address_from_the_runtime_annotations() -> None:
    store = MemoryDatastore()
    add_pool(store, "default", "10.244.0.0/24")
    h = handler(store)
    assert h._assign(request("x", "a", **runtime(ipAddrs='["10.244.0.77"]'))) == [IP("10.244.0.77")]
    assignment = h.ipam.get_assignment("10.244.0.77")
    assert assignment is not None and assignment.handle == "k8s-pod-network." + "c" * 64
    assert assignment.attrs["pod"] == "a" and assignment.attrs["namespace"] == "x"
    with pytest.raises(AddressInUseError, match="already assigned"):
        h._assign(request("x", "b", cid="d" * 64, **runtime(ipAddrs='["10.244.0.77"]')))
    with pytest.raises(NoQualifiedPoolError, match="not in any enabled IP pool"):
        h._assign(request("x", "c", cid="e" * 64, **runtime(ipAddrs='["192.168.0.1"]')))


def test_handler_fixed_address_releases_a_previous_sandboxs_addresses() -> None:
    store = MemoryDatastore()
    add_pool(store, "default", "10.244.0.0/24")
    h = handler(store)
    h._assign(request("x", "a", cid="1" * 64, **runtime(ipAddrs='["10.244.0.77"]')))
    store.create(keys.resource_key("workloadendpoints", "n1-k8s-a-eth0", "x"), {
        "metadata": {"name": "n1-k8s-a-eth0", "namespace": "x"},
        "spec": {"containerID": "1" * 64, "ipNetworks": ["10.244.0.77/32"]}})
    # A new sandbox of the same pod asks for the same address: the old sandbox's is released.
    assert h._assign(request("x", "a", cid="2" * 64, **runtime(ipAddrs='["10.244.0.77"]'))) == [IP("10.244.0.77")]
    assert h.ipam.get_assignment("10.244.0.77").handle == "k8s-pod-network." + "2" * 64  # type: ignore[union-attr]


def test_handler_pools_from_pod_namespace_and_api() -> None:
    store = MemoryDatastore()
    add_pool(store, "default", "10.244.0.0/24", namespaceSelector="team != 'blue'")
    add_pool(store, "blue", "10.245.0.0/24", namespaceSelector="team == 'blue'")
    add_pool(store, "special", "10.246.0.0/24", assignmentMode="Manual")
    add_pool(store, "lb", "10.250.0.0/24", allowedUses=["LoadBalancer"])
    add_namespace(store, "shop", {"team": "blue"})
    add_namespace(store, "pinned", {"team": "red"}, ipv4pools='["special"]')
    h = handler(store, pods={"shop/api": {POOLS: '["10.246.0.0/24"]'}})
    assert h._assign(request("shop", "web", cid="1" * 64))[0] in NET("10.245.0.0/24")  # namespaceSelector
    assert h._assign(request("other", "web", cid="2" * 64))[0] in NET("10.244.0.0/24")  # no profile: no labels
    assert h._assign(request("pinned", "web", cid="3" * 64))[0] in NET("10.246.0.0/24")  # namespace annotation
    assert h._assign(request("shop", "api", cid="4" * 64))[0] in NET("10.246.0.0/24")  # pod's, from the API
    with pytest.raises(NoQualifiedPoolError, match="allows use Workload"):
        h._assign(request("shop", "x", cid="5" * 64, **runtime(ipv4pools='["lb"]')))


def test_handler_no_ipam_when_enabled_allocates_nothing() -> None:
    store = MemoryDatastore()
    add_pool(store, "default", "10.244.0.0/24")
    h = handler(store)
    req = request("x", "a", feature_control={"ip_addrs_no_ipam": True}, **runtime(ipAddrsNoIpam='["10.99.0.1"]'))
    assert h._assign(req) == [IP("10.99.0.1")]
    assert store.list(keys.BLOCKS)[0] == [] and h.ipam.ips_by_handle(req.handle) == []


def test_handler_refusal_is_a_cni_error_result() -> None:
    store = MemoryDatastore()
    add_pool(store, "default", "10.244.0.0/24")
    h = handler(store)
    raw = {"env": {"CNI_COMMAND": "ADD", "CNI_CONTAINERID": "c" * 64, "CNI_NETNS": "/run/netns/x", "CNI_IFNAME": "eth0",
                   "CNI_ARGS": "K8S_POD_NAMESPACE=x;K8S_POD_NAME=a"},
           "config": {"cniVersion": "1.0.0", "name": "k8s-pod-network", "type": "felixpy",
                      **runtime(ipAddrsNoIpam='["10.99.0.1"]')}}
    assert h.handle(raw) == {"error": {"code": 7, "msg": "requested feature is not enabled: ip_addrs_no_ipam",
                                       "details": ""}}
    assert store.list(keys.BLOCKS)[0] == []


def test_node_refuses_ipv6_pods_it_would_not_route() -> None:
    from types import SimpleNamespace

    from felixpy.node.main import ipv6_refusal

    def cfg(backend: str, v6: bool = True) -> Any:
        return SimpleNamespace(felix=SimpleNamespace(ipv6_support=v6), node=SimpleNamespace(networking_backend=backend))

    assert ipv6_refusal(cfg("vxlan")) is None and ipv6_refusal(cfg("none")) is None
    assert ipv6_refusal(cfg("bird")) is None  # IPv6 blocks travel over the IPv6 BGP sessions
    assert "FELIX_IPV6SUPPORT" in (ipv6_refusal(cfg("vxlan", v6=False)) or "")


def test_cni_add_asking_for_ipv6_on_such_a_node_is_one_line_and_allocates_nothing() -> None:
    from felixpy.cni.server import CNIHandler
    from felixpy.datastore import keys
    from felixpy.datastore.memory import MemoryDatastore

    store = MemoryDatastore()
    store.create(keys.resource_key("ippools", "p6"), {"spec": {"cidr": "fd00:10:244::/64", "blockSize": 122}})
    handler = CNIHandler(store=store, node_name="n1", mtu=1450, node_labels=dict,
                         wait_programmed=lambda *a: True, ready=lambda: (True, ""),
                         ipv6_refusal="BGP over IPv6 is not done yet")
    before = store.revision
    reply = handler.handle({
        "env": {"CNI_COMMAND": "ADD", "CNI_CONTAINERID": "c1", "CNI_NETNS": "/proc/1/ns/net", "CNI_IFNAME": "eth0",
                "CNI_ARGS": "K8S_POD_NAMESPACE=x;K8S_POD_NAME=a"},
        "config": {"cniVersion": "1.0.0", "name": "k8s-pod-network",
                   "ipam": {"type": "calico-ipam", "assign_ipv4": "false", "assign_ipv6": "true"}}})
    details = reply["error"]["msg"] + " " + reply["error"].get("details", "")
    assert "an IPv6 address was requested: BGP over IPv6 is not done yet" in details and "\n" not in details
    assert store.revision == before
