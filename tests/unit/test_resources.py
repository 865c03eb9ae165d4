"""Unit tests for felixpy.model: the kind table, validation and defaults, IPAM config storage,
pool overlap, and the all-or-nothing apply against the in-memory datastore."""

from __future__ import annotations

import copy
import ipaddress
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from felixpy.datastore import keys
from felixpy.datastore.memory import MemoryDatastore
from felixpy.model.resources import (
    KINDS,
    ValidationError,
    check_pool_overlap,
    from_ipam_config_value,
    lookup_kind,
    storage_key,
    to_ipam_config_value,
    validate,
)
from felixpy.model.store import ApplyError, Document, apply_resources, list_resources, read_resource


def pool(name: str, cidr: str, **spec: Any) -> dict[str, Any]:
    return {"apiVersion": "projectcalico.org/v3", "kind": "IPPool", "metadata": {"name": name},
            "spec": {"cidr": cidr, **spec}}


def policy(kind: str = "NetworkPolicy", **spec: Any) -> dict[str, Any]:
    return {"kind": kind, "metadata": {"name": "pol"}, "spec": spec}


def rejects(obj: dict[str, Any], message: str) -> str:
    with pytest.raises(ValidationError) as info:
        validate(obj)
    text = str(info.value)
    assert message in text
    assert "\n" not in text
    return text


# -- kinds -----------------------------------------------------------------------------------------


def test_kind_table() -> None:
    assert {k: (v.plural, v.namespaced) for k, v in KINDS.items()} == {
        "IPPool": ("ippools", False),
        "IPReservation": ("ipreservations", False),
        "IPAMConfiguration": ("ipamconfigurations", False),
        "Node": ("nodes", False),
        "BGPConfiguration": ("bgpconfigurations", False),
        "BGPPeer": ("bgppeers", False),
        "BGPFilter": ("bgpfilters", False),
        "CalicoNodeStatus": ("caliconodestatuses", False),
        "FelixConfiguration": ("felixconfigurations", False),
        "WorkloadEndpoint": ("workloadendpoints", True),
        "Profile": ("profiles", False),
        "NetworkPolicy": ("networkpolicies", True),
        "GlobalNetworkPolicy": ("globalnetworkpolicies", False),
        "ClusterInformation": ("clusterinformations", False),
        "Tier": ("tiers", False),
        "NetworkSet": ("networksets", True),
        "GlobalNetworkSet": ("globalnetworksets", False),
        "HostEndpoint": ("hostendpoints", False),
    }


@pytest.mark.parametrize(
    "alias, kind",
    [("ippool", "IPPool"), ("ipp", "IPPool"), ("pool", "IPPool"), ("IPPools", "IPPool"), ("no", "Node"),
     ("bgpp", "BGPPeer"), ("bp", "BGPPeer"), ("bgpconfig", "BGPConfiguration"), ("felixconfig", "FelixConfiguration"),
     ("np", "NetworkPolicy"), ("policy", "NetworkPolicy"), ("pol", "NetworkPolicy"), ("gnp", "GlobalNetworkPolicy"),
     ("wep", "WorkloadEndpoint"), ("pro", "Profile"), ("ipamconfig", "IPAMConfiguration"),
     ("clusterinfo", "ClusterInformation"), ("ippools.projectcalico.org", "IPPool")],
)
def test_aliases(alias: str, kind: str) -> None:
    assert lookup_kind(alias).kind == kind


def test_unknown_alias() -> None:
    with pytest.raises(ValueError, match="not supported"):
        lookup_kind("frobs")


def test_storage_keys() -> None:
    assert storage_key("IPPool", "p") == "/calico/resources/v3/projectcalico.org/ippools/p"
    assert storage_key("NetworkPolicy", "x", "prod") == "/calico/resources/v3/projectcalico.org/networkpolicies/prod/x"
    assert storage_key("NetworkPolicy", "x") == "/calico/resources/v3/projectcalico.org/networkpolicies/default/x"
    assert storage_key("IPAMConfiguration", "default") == keys.IPAM_CONFIG


# -- IPPool ------------------------------------------------------------------------------------------


def test_ippool_defaults() -> None:
    out = validate(pool("p1", "10.0.0.0/16"))
    assert out == {
        "apiVersion": "projectcalico.org/v3",
        "kind": "IPPool",
        "metadata": {"name": "p1"},
        "spec": {"cidr": "10.0.0.0/16", "blockSize": 26, "ipipMode": "Never", "vxlanMode": "Never",
                 "natOutgoing": False, "disabled": False, "disableBGPExport": False, "nodeSelector": "all()",
                 "allowedUses": ["Workload", "Tunnel"], "assignmentMode": "Automatic"},
    }
    assert validate(pool("p6", "fd00:1::/48"))["spec"]["blockSize"] == 122


def test_validate_does_not_mutate_input() -> None:
    obj = pool("p1", "10.0.0.0/16")
    before = copy.deepcopy(obj)
    validate(obj)
    assert obj == before


@pytest.mark.parametrize(
    "spec, message",
    [
        ({"cidr": "10.0.0.0/33"}, 'IPPool "p1": spec.cidr: invalid CIDR "10.0.0.0/33"'),
        ({"cidr": "10.0.0.1/8"}, 'IPPool "p1": spec.cidr: CIDR "10.0.0.1/8" has host bits set (did you mean 10.0.0.0/8?)'),
        ({"cidr": "10.0.0.0"}, "missing /prefix"),
        ({"cidr": "banana/8"}, "invalid CIDR"),
        ({}, "spec.cidr: required field is missing"),
        ({"cidr": "10.0.0.0/16", "blockSize": 19}, "spec.blockSize: 19 is out of range 20..32 for an IPv4 pool"),
        ({"cidr": "10.0.0.0/16", "blockSize": 33}, "out of range 20..32"),
        ({"cidr": "fd00::/48", "blockSize": 112}, "out of range 116..128 for an IPv6 pool"),
        ({"cidr": "10.0.0.0/24", "blockSize": 20}, "a /20 block does not fit in the /24 pool"),
        ({"cidr": "10.0.0.0/16", "blockSize": "26"}, "spec.blockSize: expected an integer"),
        ({"cidr": "10.0.0.0/16", "ipipMode": "Always", "vxlanMode": "CrossSubnet"},
         "ipipMode and vxlanMode cannot both be enabled"),
        ({"cidr": "10.0.0.0/16", "ipipMode": "Sometimes"},
         'spec.ipipMode: invalid value "Sometimes" (expected one of Always, CrossSubnet, Never)'),
        ({"cidr": "fd00::/48", "ipipMode": "Always"}, "IPIP is not supported on an IPv6 pool"),
        ({"cidr": "10.0.0.0/16", "natOutgoing": "yes"}, "spec.natOutgoing: expected true or false"),
        ({"cidr": "10.0.0.0/16", "foo": 1}, "spec.foo: unknown field"),
        ({"cidr": "10.0.0.0/16", "nodeSelector": "a == "},
         "spec.nodeSelector: invalid selector: expected a string literal at column 6"),
        ({"cidr": "10.0.0.0/16", "allowedUses": ["Pods"]}, "spec.allowedUses[0]: invalid value"),
        ({"cidr": "10.0.0.0/16", "allowedUses": ["LoadBalancer", "Workload"]}, "spec.allowedUses"),
    ],
)
def test_ippool_rejections(spec: dict[str, Any], message: str) -> None:
    rejects({"kind": "IPPool", "metadata": {"name": "p1"}, "spec": spec}, message)


@pytest.mark.parametrize("name", ["P1", "p_1", "-p", "p-", "a" * 254, ""])
def test_invalid_names(name: str) -> None:
    rejects(pool(name, "10.0.0.0/16"), "metadata.name")


def test_envelope_errors() -> None:
    rejects({**pool("p", "10.0.0.0/16"), "apiVersion": "v1"}, 'apiVersion: unsupported apiVersion "v1"')
    rejects({**pool("p", "10.0.0.0/16"), "extra": 1}, "extra: unknown field")
    rejects({"kind": "Pod", "metadata": {"name": "p"}}, "unsupported kind")
    rejects({"metadata": {"name": "p"}}, "kind: required")
    rejects({"kind": "IPPool", "spec": {"cidr": "10.0.0.0/16"}}, "metadata.name: required field is missing")
    rejects({**pool("p", "10.0.0.0/16"), "metadata": {"name": "p", "labels": {"bad key!": "x"}}},
            "metadata.labels[bad key!]: invalid label key")
    rejects({**pool("p", "10.0.0.0/16"), "metadata": {"name": "p", "namespace": "x"}}, "IPPool is not namespaced")
    rejects({**pool("p", "10.0.0.0/16"), "metadata": {"name": "p", "owner": "x"}}, "metadata.owner: unknown field")


def test_metadata_kept() -> None:
    obj = pool("p", "10.0.0.0/16")
    obj["metadata"].update(labels={"example.com/team": "net"}, annotations={"note": "x y"}, resourceVersion="12",
                           uid="u", creationTimestamp="2024-01-01T00:00:00Z")
    assert validate(obj)["metadata"] == obj["metadata"]


@settings(max_examples=200)
@given(st.ip_addresses(v=4), st.integers(8, 32), st.integers(20, 32))
def test_ippool_property(addr: ipaddress.IPv4Address, prefix: int, block: int) -> None:
    net = ipaddress.ip_network(f"{addr}/{prefix}", strict=False)
    obj = pool("p", str(net), blockSize=block)
    if block >= prefix:
        assert validate(obj)["spec"]["blockSize"] == block
    else:
        rejects(obj, "does not fit")


# -- pool overlap ------------------------------------------------------------------------------------


def test_pool_overlap() -> None:
    a = validate(pool("a", "10.0.0.0/8"))
    b = validate(pool("b", "10.0.0.0/16"))
    with pytest.raises(ValidationError) as info:
        check_pool_overlap(b, [a])
    assert str(info.value) == 'IPPool "b": spec.cidr 10.0.0.0/16 overlaps IPPool "a" (10.0.0.0/8)'
    check_pool_overlap(validate(pool("a", "10.0.0.0/16")), [a])  # same name: an update of itself
    check_pool_overlap(validate(pool("c", "11.0.0.0/8")), [a, b])
    check_pool_overlap(validate(pool("v6", "fd00::/8")), [a])


@settings(max_examples=200)
@given(st.ip_addresses(v=4), st.integers(8, 30), st.ip_addresses(v=4), st.integers(8, 30))
def test_pool_overlap_is_symmetric(a1: Any, p1: int, a2: Any, p2: int) -> None:
    n1, n2 = ipaddress.ip_network(f"{a1}/{p1}", strict=False), ipaddress.ip_network(f"{a2}/{p2}", strict=False)
    x, y = validate(pool("x", str(n1), blockSize=30)), validate(pool("y", str(n2), blockSize=30))
    results = []
    for new, old in ((x, y), (y, x)):
        try:
            check_pool_overlap(new, [old])
            results.append(False)
        except ValidationError:
            results.append(True)
    assert results[0] == results[1] == n1.overlaps(n2)


# -- IPAMConfiguration -------------------------------------------------------------------------------


def test_ipam_config_round_trip() -> None:
    res = validate({"kind": "IPAMConfiguration", "metadata": {"name": "default"},
                    "spec": {"strictAffinity": True, "maxBlocksPerHost": 3}})
    value = to_ipam_config_value(res)
    assert value == {"strict_affinity": True, "auto_allocate_blocks": True, "maxBlocksPerHost": 3}
    assert from_ipam_config_value(value) == res
    assert from_ipam_config_value({})["spec"] == {"strictAffinity": False, "autoAllocateBlocks": True,
                                                  "maxBlocksPerHost": 0}


def test_ipam_config_rules() -> None:
    rejects({"kind": "IPAMConfiguration", "metadata": {"name": "other"}, "spec": {}}, "must be named 'default'")
    rejects({"kind": "IPAMConfiguration", "metadata": {"name": "default"},
             "spec": {"strictAffinity": False, "autoAllocateBlocks": False}}, "cannot both be false")
    rejects({"kind": "IPAMConfiguration", "metadata": {"name": "default"}, "spec": {"maxBlocksPerHost": -1}},
            "spec.maxBlocksPerHost")


# -- Node, BGP ---------------------------------------------------------------------------------------


def test_node() -> None:
    out = validate({"kind": "Node", "metadata": {"name": "n1.example.com"},
                    "spec": {"bgp": {"ipv4Address": "192.0.2.11/24", "asNumber": "64512.7",
                                     "routeReflectorClusterID": "244.0.0.1"}}})
    assert out["spec"]["bgp"]["asNumber"] == 64512 * 65536 + 7
    rejects({"kind": "Node", "metadata": {"name": "n1"}, "status": {"podCIDRs": ["10.244.1.0/24"]}},
            "status.podCIDRs: felixpy does not support this field yet")
    rejects({"kind": "Node", "metadata": {"name": "n1"}, "spec": {"bgp": {"ipv4Address": "192.0.2.300/24"}}},
            'spec.bgp.ipv4Address: invalid address "192.0.2.300/24"')
    rejects({"kind": "Node", "metadata": {"name": "n1"}, "spec": {"bgp": {"ipv4Address": "fd00::1/64"}}},
            "is not an IPv4 address")
    rejects({"kind": "Node", "metadata": {"name": "n1"}, "spec": {"bgp": {"asNumber": 0}}}, "out of range")
    rejects({"kind": "Node", "metadata": {"name": "n1"}, "spec": {"bgp": {"asNumber": "65536.1"}}}, "invalid AS number")
    rejects({"kind": "Node", "metadata": {"name": "n1"}, "spec": {"bgp": {"asn": 1}}}, "spec.bgp.asn: unknown field")


def test_bgp_configuration() -> None:
    default = validate({"kind": "BGPConfiguration", "metadata": {"name": "default"}, "spec": {"logSeverityScreen": "info"}})
    assert default["spec"] == {"logSeverityScreen": "Info", "nodeToNodeMeshEnabled": True, "asNumber": 64512}
    node = validate({"kind": "BGPConfiguration", "metadata": {"name": "node.n1"}, "spec": {"logSeverityScreen": "Info"}})
    assert node["spec"] == {"logSeverityScreen": "Info"}
    rejects({"kind": "BGPConfiguration", "metadata": {"name": "node.n1"}, "spec": {"asNumber": 65000}},
            "spec.asNumber: cannot be set in a node-specific BGPConfiguration")
    validate({"kind": "BGPConfiguration", "metadata": {"name": "default"},
              "spec": {"serviceClusterIPs": [{"cidr": "10.96.0.0/24"}]}})  # honoured since issue #11
    rejects({"kind": "BGPConfiguration", "metadata": {"name": "default"},
             "spec": {"programClusterRoutes": "Enabled"}}, "spec.programClusterRoutes: felixpy does not support")
    rejects({"kind": "BGPConfiguration", "metadata": {"name": "default"}, "spec": {"bindMode": "All"}}, "spec.bindMode")


@pytest.mark.parametrize(
    "spec, message",
    [
        ({"peerIP": "192.0.2.1", "asNumber": 65001, "node": "n1"}, ""),
        ({"peerIP": "192.0.2.1:1179", "asNumber": "65001"}, ""),
        ({"peerIP": "[fd00::1]:1179", "asNumber": 65001}, ""),
        ({"peerIP": "fd00::1", "asNumber": 65001}, ""),
        ({"peerIP": "[fd00::1:1179", "asNumber": 65001}, 'spec.peerIP: invalid peer IP "[fd00::1:1179"'),
        ({"nodeSelector": "all()", "peerSelector": "route-reflector == 'true'"}, ""),
        ({"peerIP": "192.0.2.256", "asNumber": 65001}, 'spec.peerIP: invalid peer IP "192.0.2.256"'),
        ({"peerIP": "192.0.2.1"}, "either peerIP and asNumber, or peerSelector"),
        ({"peerIP": "192.0.2.1", "asNumber": 65001, "peerSelector": "all()"}, "peerSelector cannot be combined"),
        ({"node": "n1", "nodeSelector": "all()", "peerSelector": "all()"}, "node and nodeSelector"),
        ({"nodeSelector": "all(", "peerSelector": "all()"}, "spec.nodeSelector: invalid selector"),
        ({"peerSelector": "x ="}, "spec.peerSelector: invalid selector"),
        ({"peerIP": "192.0.2.1", "asNumber": 65001, "keepaliveTime": "90s"}, ""),
        ({"peerIP": "10.0.0.1", "asNumber": 65001, "reachableBy": "192.0.2.1"}, ""),
        ({"peerIP": "fd00::1", "asNumber": 65001, "reachableBy": "192.0.2.1"},
         "spec.reachableBy: an IPv6 peerIP needs an IPv6 gateway"),
        ({"peerIP": "[fd00::1]:1179", "asNumber": 65001, "reachableBy": "fd00::2"},
         'spec.reachableBy: "fd00::2" is not an IPv4 address'),
        ({"peerIP": "192.0.2.1", "asNumber": 65001, "localWorkloadSelector": "all()"},
         "spec.localWorkloadSelector: felixpy does not support"),
    ],
)
def test_bgp_peer(spec: dict[str, Any], message: str) -> None:
    obj = {"kind": "BGPPeer", "metadata": {"name": "peer"}, "spec": spec}
    if message:
        rejects(obj, message)
    else:
        validate(obj)


def test_felix_configuration() -> None:
    out = validate({"kind": "FelixConfiguration", "metadata": {"name": "default"},
                    "spec": {"reportingInterval": "0s", "logSeverityScreen": "info"}})
    assert out["spec"] == {"reportingInterval": "0s", "logSeverityScreen": "Info"}
    rejects({"kind": "FelixConfiguration", "metadata": {"name": "default"}, "spec": {"noSuchParam": True}},
            "spec.noSuchParam: unknown field")
    rejects({"kind": "FelixConfiguration", "metadata": {"name": "default"},
             "spec": {"defaultEndpointToHostAction": "Maybe"}}, "spec.defaultEndpointToHostAction")


# -- policies ----------------------------------------------------------------------------------------


def test_policy_normalisation() -> None:
    out = validate(policy(selector="app == 'web'", ingress=[{"action": "Allow", "protocol": "tcp",
                                                             "destination": {"ports": [80, "8000:9000", "http"]}}],
                          egress=[{"action": "Deny"}]))
    assert out["metadata"] == {"name": "pol", "namespace": "default"}
    assert out["spec"]["types"] == ["Ingress", "Egress"]
    assert out["spec"]["ingress"][0]["protocol"] == "TCP"
    assert out["spec"]["tier"] == "default"
    assert validate(policy())["spec"] == {"selector": "all()", "types": ["Ingress"], "tier": "default"}
    gnp = validate(policy("GlobalNetworkPolicy", namespaceSelector="has(team)", order=10.5,
                          ingress=[{"action": "Allow", "protocol": "ICMP", "icmp": {"type": 8, "code": 0}}]))
    assert "namespace" not in gnp["metadata"] and gnp["spec"]["order"] == 10.5


@pytest.mark.parametrize(
    "spec, message",
    [
        ({"selector": "a ="}, "spec.selector: invalid selector"),
        ({"types": ["Inbound"]}, "spec.types[0]: invalid value"),
        ({"ingress": [{"action": "Accept"}]}, 'spec.ingress[0].action: invalid value "Accept"'),
        ({"ingress": [{}]}, "spec.ingress[0].action: required field is missing"),
        ({"ingress": [{"action": "Allow", "protocol": "TCPX"}]}, "spec.ingress[0].protocol: invalid protocol"),
        ({"ingress": [{"action": "Allow", "protocol": 256}]}, "out of range 1..255"),
        ({"ingress": [{"action": "Allow", "destination": {"ports": [80]}}]}, "ports are only valid with protocol"),
        ({"ingress": [{"action": "Allow", "protocol": "TCP", "destination": {"ports": [70000]}}]},
         "spec.ingress[0].destination.ports[0]: port 70000 is out of range"),
        ({"ingress": [{"action": "Allow", "protocol": "TCP", "destination": {"ports": ["90:80"]}}]},
         'invalid port range "90:80"'),
        ({"ingress": [{"action": "Allow", "protocol": "TCP", "destination": {"notPorts": ["Bad_Name"]}}]},
         "spec.ingress[0].destination.notPorts[0]: invalid port"),
        ({"ingress": [{"action": "Allow", "source": {"selector": "x == 'y"}}]}, "spec.ingress[0].source.selector"),
        ({"egress": [{"action": "Allow", "destination": {"namespaceSelector": "!"}}]},
         "spec.egress[0].destination.namespaceSelector: invalid selector"),
        ({"egress": [{"action": "Allow", "destination": {"nets": ["10.0.0.0/40"]}}]}, "spec.egress[0].destination.nets[0]"),
        ({"egress": [{"action": "Allow", "source": {"notNets": ["x"]}}]}, "spec.egress[0].source.notNets[0]"),
        ({"egress": [{"action": "Allow", "protocol": "TCP", "icmp": {"type": 8}}]}, "only valid with protocol ICMP"),
        ({"egress": [{"action": "Allow", "protocol": "ICMP", "icmp": {"type": 300}}]}, "spec.egress[0].icmp.type"),
        ({"egress": [{"action": "Allow", "ipVersion": 5}]}, "spec.egress[0].ipVersion: must be 4 or 6"),
        ({"egress": [{"action": "Allow", "http": {}}]}, "spec.egress[0].http: unknown field"),
        ({"namespaceSelector": "all()"}, "spec.namespaceSelector: unknown field"),
        ({"tier": "Security"}, "spec.tier: invalid tier name \"Security\""),
        ({"order": "first"}, "spec.order: expected a number"),
    ],
)
def test_policy_rejections(spec: dict[str, Any], message: str) -> None:
    rejects(policy(**spec), message)


def test_profile_workload_endpoint_cluster_info() -> None:
    validate({"kind": "Profile", "metadata": {"name": "kns.prod"},
              "spec": {"ingress": [{"action": "Allow"}], "egress": [{"action": "Allow"}],
                       "labelsToApply": {"pcns.projectcalico.org/name": "prod"}}})
    wep = validate({"kind": "WorkloadEndpoint", "metadata": {"name": "n1-k8s-a-eth0", "namespace": "prod"},
                    "spec": {"node": "n1", "pod": "a", "interfaceName": "cali1234567890a", "mac": "ee:ee:ee:ee:ee:ee",
                             "ipNetworks": ["10.244.0.5/32"], "profiles": ["kns.prod"],
                             "ports": [{"name": "serve-80-tcp", "protocol": "TCP", "port": 80}]}})
    assert wep["spec"]["ports"][0]["protocol"] == "TCP"
    rejects({"kind": "WorkloadEndpoint", "metadata": {"name": "w"}, "spec": {"ipNetworks": ["10.0.0.300/32"]}},
            "spec.ipNetworks[0]")
    validate({"kind": "ClusterInformation", "metadata": {"name": "default"},
              "spec": {"clusterGUID": "abc", "datastoreReady": True, "calicoVersion": "v3.28"}})
    rejects({"kind": "ClusterInformation", "metadata": {"name": "default"}, "spec": {"datastoreReady": "yes"}},
            "spec.datastoreReady")


def test_informational_fields_are_stored_as_given() -> None:
    # Fields Calico gives no dataplane meaning: their effect is that they are kept exactly and read
    # back (felixctl get), including the store-managed uid and creationTimestamp.
    store = MemoryDatastore()
    info = {"kind": "ClusterInformation", "metadata": {"name": "default", "annotations": {"owner": "net team"},
                                                         "generation": 3},
            "spec": {"clusterGUID": "abc", "calicoVersion": "v3.28", "clusterType": "k8s,bgp", "variant": "Calico"}}
    wep = {"kind": "WorkloadEndpoint", "metadata": {"name": "n1-k8s-a-eth0", "namespace": "prod"},
           "spec": {"node": "n1", "pod": "a", "endpoint": "eth0", "interfaceName": "cali1234567890a",
                    "mac": "ee:ee:ee:ee:ee:01", "ipNetworks": ["10.244.0.5/32"]}}
    rule = {"action": "Allow", "metadata": {"annotations": {"why": "web tier"}}}
    pol = {**policy(ingress=[rule]), "kind": "GlobalNetworkPolicy"}
    felix = {"kind": "FelixConfiguration", "metadata": {"name": "default"},
             "spec": {"reportingInterval": "0s", "logSeverityScreen": "Info"}}
    bgp = {"kind": "BGPConfiguration", "metadata": {"name": "default"}, "spec": {"logSeverityScreen": "Info"}}
    ipam = {"kind": "IPAMConfiguration", "metadata": {"name": "default"},
            "spec": {"kubeVirtVMAddressPersistence": "Disabled"}}
    apply_resources(store, [info, wep, pol, felix, bgp, ipam], "create")
    got = read_resource(store, "ClusterInformation", "default")
    assert got is not None and got["spec"] == info["spec"]
    assert got["metadata"]["annotations"] == {"owner": "net team"} and got["metadata"]["generation"] == 3
    assert got["metadata"]["uid"] and got["metadata"]["creationTimestamp"].endswith("Z")
    got = read_resource(store, "WorkloadEndpoint", "n1-k8s-a-eth0", "prod")
    assert got is not None and (got["spec"]["endpoint"], got["spec"]["mac"]) == ("eth0", "ee:ee:ee:ee:ee:01")
    got = read_resource(store, "GlobalNetworkPolicy", "pol")
    assert got is not None and got["spec"]["ingress"][0]["metadata"] == {"annotations": {"why": "web tier"}}
    got = read_resource(store, "FelixConfiguration", "default")
    assert got is not None and got["spec"] == felix["spec"]
    got = read_resource(store, "BGPConfiguration", "default")
    assert got is not None and got["spec"]["logSeverityScreen"] == "Info"
    got = read_resource(store, "IPAMConfiguration", "default")
    assert got is not None and got["spec"]["kubeVirtVMAddressPersistence"] == "Disabled"


# -- apply_resources against the in-memory datastore --------------------------------------------------


def snapshot(store: MemoryDatastore) -> dict[str, Any]:
    items, _ = store.list("/")
    return {kv.key: (kv.value, kv.revision) for kv in items}


def test_apply_all_or_nothing() -> None:
    store = MemoryDatastore()
    summary = apply_resources(store, [pool("a", "10.0.0.0/16"), pool("b", "10.1.0.0/16")], "create")
    assert summary.count("created") == 2
    before = snapshot(store)
    docs = [Document("f.yaml document 1", pool("c", "10.2.0.0/16")),
            Document("f.yaml document 2", pool("d", "10.0.128.0/17"))]
    with pytest.raises(ApplyError) as info:
        apply_resources(store, docs, "apply")
    assert str(info.value) == ('f.yaml document 2: IPPool "d": spec.cidr 10.0.128.0/17 overlaps IPPool "a" '
                               "(10.0.0.0/16)")
    assert snapshot(store) == before


def test_apply_modes_and_metadata() -> None:
    store = MemoryDatastore()
    apply_resources(store, [pool("a", "10.0.0.0/16")], "apply")
    stored = store.get(storage_key("IPPool", "a")).value
    assert stored["metadata"]["uid"] and stored["metadata"]["creationTimestamp"].endswith("Z")
    apply_resources(store, [pool("a", "10.0.0.0/16", disabled=True)], "replace")
    again = store.get(storage_key("IPPool", "a")).value
    assert again["spec"]["disabled"] is True and again["metadata"]["uid"] == stored["metadata"]["uid"]
    res = read_resource(store, "IPPool", "a")
    assert res is not None and res["metadata"]["resourceVersion"] == str(store.get(storage_key("IPPool", "a")).revision)
    assert apply_resources(store, [pool("a", "10.0.0.0/16")], "create", skip_exists=True).count("skipped") == 1
    # A pool deleted in the same input frees its range for a new pool.
    summary = apply_resources(store, [{"kind": "IPPool", "metadata": {"name": "a"}}], "delete")
    assert summary.count("deleted") == 1
    assert list_resources(store, "IPPool") == ([], store.revision)
    assert apply_resources(store, [pool("a", "10.0.0.0/16")], "delete", skip_not_exists=True).count("skipped") == 1


def test_apply_stale_resource_version() -> None:
    store = MemoryDatastore()
    apply_resources(store, [pool("a", "10.0.0.0/16")], "create")
    res = read_resource(store, "IPPool", "a")
    assert res is not None
    apply_resources(store, [pool("a", "10.0.0.0/16", natOutgoing=True)], "apply")
    with pytest.raises(ApplyError, match="resourceVersion .* is stale"):
        apply_resources(store, [res], "replace")


def test_apply_ipam_configuration_and_namespaced() -> None:
    store = MemoryDatastore()
    ipam = {"kind": "IPAMConfiguration", "metadata": {"name": "default"}, "spec": {"maxBlocksPerHost": 2}}
    apply_resources(store, [ipam], "apply")
    assert store.get(keys.IPAM_CONFIG).value == {"strict_affinity": False, "auto_allocate_blocks": True,
                                                 "maxBlocksPerHost": 2}
    res = read_resource(store, "IPAMConfiguration", "default")
    assert res is not None and res["spec"]["maxBlocksPerHost"] == 2
    p1, p2 = policy(), policy()
    p2["metadata"] = {"name": "pol", "namespace": "dev"}
    apply_resources(store, [p1, p2], "create")
    assert [r["metadata"]["namespace"] for r in list_resources(store, "NetworkPolicy")[0]] == ["default", "dev"]
    assert len(list_resources(store, "NetworkPolicy", "dev")[0]) == 1
    with pytest.raises(ApplyError, match="also appears in"):
        apply_resources(store, [p2, p2], "apply")


def test_parse_documents() -> None:
    from felixpy.model.store import parse_documents

    docs = parse_documents("---\nkind: IPPool\nmetadata: {name: a}\n---\n---\nkind: IPPoolList\nitems:\n"
                           "- metadata: {name: b}\n- metadata: {name: c}\n", "f.yaml")
    assert [d.source for d in docs] == ["f.yaml document 1", "f.yaml document 3 item 1", "f.yaml document 3 item 2"]
    assert [d.obj["kind"] for d in docs] == ["IPPool", "IPPool", "IPPool"]
    assert [d.obj["metadata"]["name"] for d in parse_documents('[{"kind": "Node", "metadata": {"name": "n"}}]', "j")] == ["n"]
    with pytest.raises(ApplyError, match=r"^f.yaml: invalid YAML at line 3, column 1: expected"):
        parse_documents("kind: IPPool\nmetadata: {name: a\n", "f.yaml")
