"""CRDs shaped as Calico ships them (crd.projectcalico.org/v1), built from facts, for the takeover test.

Calico's own CRDs cannot be committed here, and nothing can be downloaded at test time. These are
written from what Calico's CRDs say (libcalico-go/config/crd, Calico 3.2x/3.30), and differ from
deploy/felixpy.yaml's in exactly the ways that can break a writer:

* the same group, kinds, plurals, singulars and scopes;
* `spec` is fully typed with no `x-kubernetes-preserve-unknown-fields`: anything a writer puts there
  that Calico's schema does not name is pruned (dropped silently) by the API server, and a null in a
  field not marked nullable is dropped too;
* the IPAM kinds carry Calico's exact fields, types and `required` lists: IPAMBlock requires
  allocations, attributes, cidr, sequenceNumber, strictAffinity and unallocated (allocations' items
  nullable integers, attributes' items {handle_id, secondary: map of strings}, affinityClaimTime a
  date-time); BlockAffinity requires cidr, deleted (a string), node and state; IPAMHandle requires
  block and handleID; IPAMConfig requires autoAllocateBlocks and strictAffinity;
* the resource kinds type the spec fields Calico defines (for FelixConfiguration, the ones felixpy
  writes or the tests use: the full list is some hundred parameters), policy rules down to their
  entity rules, ports as int-or-string.
"""

from __future__ import annotations

from typing import Any

STRING: dict[str, Any] = {"type": "string"}
BOOL: dict[str, Any] = {"type": "boolean"}
INT: dict[str, Any] = {"type": "integer"}
STRINGS: dict[str, Any] = {"type": "array", "items": STRING}
STRING_MAP: dict[str, Any] = {"type": "object", "additionalProperties": STRING}
PORT: dict[str, Any] = {"anyOf": [{"type": "integer"}, {"type": "string"}], "x-kubernetes-int-or-string": True}
SECRET_REF: dict[str, Any] = {"type": "object", "properties": {"secretKeyRef": {
    "type": "object", "properties": {"key": STRING, "name": STRING, "optional": BOOL}, "required": ["key"]}}}
CIDR_LIST: dict[str, Any] = {"type": "array", "items": {"type": "object", "properties": {"cidr": STRING}}}


def obj(properties: dict[str, Any], required: list[str] | None = None) -> dict[str, Any]:
    schema: dict[str, Any] = {"type": "object", "properties": properties}
    if required:
        schema["required"] = required
    return schema


ENTITY_RULE = obj({
    "nets": STRINGS, "notNets": STRINGS, "selector": STRING, "notSelector": STRING, "namespaceSelector": STRING,
    "ports": {"type": "array", "items": PORT}, "notPorts": {"type": "array", "items": PORT},
    "serviceAccounts": obj({"names": STRINGS, "selector": STRING}),
    "services": obj({"name": STRING, "namespace": STRING}),
})
ICMP = obj({"type": INT, "code": INT})
RULE = obj({
    "action": STRING, "ipVersion": INT, "protocol": PORT, "notProtocol": PORT, "icmp": ICMP, "notICMP": ICMP,
    "source": ENTITY_RULE, "destination": ENTITY_RULE, "metadata": obj({"annotations": STRING_MAP}),
    "http": obj({"methods": STRINGS, "paths": {"type": "array", "items": obj({"exact": STRING, "prefix": STRING})}}),
}, required=["action"])
POLICY = {
    "order": {"type": "number"}, "tier": STRING, "selector": STRING, "types": STRINGS,
    "ingress": {"type": "array", "items": RULE}, "egress": {"type": "array", "items": RULE},
    "serviceAccountSelector": STRING, "performanceHints": STRINGS,
}

FILTER_RULE = obj({
    "action": STRING, "cidr": STRING, "interface": STRING, "matchOperator": STRING, "source": STRING,
    "prefixLength": obj({"max": {"type": "integer", "format": "int32"}, "min": {"type": "integer", "format": "int32"}}),
    "peerType": STRING, "communities": obj({"values": STRINGS}), "asPathPrefix": {"type": "array", "items": INT},
    "priority": INT, "operations": {"type": "array", "items": obj({
        "addCommunity": obj({"value": STRING}), "prependASPath": obj({"prefix": {"type": "array", "items": INT}}),
        "setPriority": obj({"value": INT})})},
}, required=["action"])
_PEER_STATUS = {"type": "array", "items": obj({"peerIP": STRING, "since": STRING, "state": STRING, "type": STRING})}
_ROUTE_STATUS = {"type": "array", "items": obj({
    "destination": STRING, "gateway": STRING, "interface": STRING, "type": STRING,
    "learnedFrom": obj({"peerIP": STRING, "sourceType": STRING})})}
_BIRD_STATUS = obj({"lastBootTime": STRING, "lastReconfigurationTime": STRING, "routerID": STRING, "state": STRING,
                    "version": STRING})
# Calico types status too (no status subresource: calico-node writes the whole object).
STATUSES: dict[str, dict[str, Any]] = {
    "caliconodestatuses": obj({
        "agent": obj({"birdV4": _BIRD_STATUS, "birdV6": _BIRD_STATUS}),
        "bgp": obj({"numberEstablishedV4": INT, "numberEstablishedV6": INT, "numberNotEstablishedV4": INT,
                    "numberNotEstablishedV6": INT, "peersV4": _PEER_STATUS, "peersV6": _PEER_STATUS},
                   required=["numberEstablishedV4", "numberEstablishedV6", "numberNotEstablishedV4",
                             "numberNotEstablishedV6"]),
        "lastUpdated": {"type": "string", "format": "date-time", "nullable": True},
        "routes": obj({"routesV4": _ROUTE_STATUS, "routesV6": _ROUTE_STATUS}),
    }),
}

SPECS: dict[str, tuple[str, str, dict[str, Any]]] = {  # plural -> (kind, scope, spec schema)
    "ipamblocks": ("IPAMBlock", "Cluster", obj({
        "affinity": STRING, "affinityClaimTime": {"type": "string", "format": "date-time"},
        "allocations": {"type": "array", "items": {"type": "integer", "nullable": True}},
        "attributes": {"type": "array", "items": obj({"handle_id": STRING, "secondary": STRING_MAP})},
        "cidr": STRING, "deleted": BOOL, "sequenceNumber": {"type": "integer", "format": "int64"},
        "sequenceNumberForAllocation": {"type": "object", "additionalProperties": {"type": "integer", "format": "int64"}},
        "strictAffinity": BOOL, "unallocated": {"type": "array", "items": INT},
    }, required=["allocations", "attributes", "cidr", "sequenceNumber", "strictAffinity", "unallocated"])),
    "blockaffinities": ("BlockAffinity", "Cluster", obj(
        {"cidr": STRING, "deleted": STRING, "node": STRING, "state": STRING, "type": STRING},
        required=["cidr", "deleted", "node", "state"])),
    "ipamhandles": ("IPAMHandle", "Cluster", obj(
        {"block": {"type": "object", "additionalProperties": INT}, "deleted": BOOL, "handleID": STRING},
        required=["block", "handleID"])),
    "ipamconfigs": ("IPAMConfig", "Cluster", obj(
        {"autoAllocateBlocks": BOOL, "maxBlocksPerHost": {"type": "integer", "minimum": 0, "maximum": 2147483647},
         "strictAffinity": BOOL}, required=["autoAllocateBlocks", "strictAffinity"])),
    "ippools": ("IPPool", "Cluster", obj({
        "cidr": STRING, "blockSize": INT, "ipipMode": STRING, "vxlanMode": STRING, "natOutgoing": BOOL,
        "disabled": BOOL, "disableBGPExport": BOOL, "nodeSelector": STRING, "allowedUses": STRINGS,
        "assignmentMode": STRING, "awsSubnetID": STRING,
    }, required=["cidr"])),
    "bgpconfigurations": ("BGPConfiguration", "Cluster", obj({
        "logSeverityScreen": STRING, "nodeToNodeMeshEnabled": BOOL, "asNumber": {"type": "integer", "format": "int32"},
        "serviceClusterIPs": CIDR_LIST, "serviceExternalIPs": CIDR_LIST, "serviceLoadBalancerIPs": CIDR_LIST,
        "listenPort": {"type": "integer", "maximum": 65535, "minimum": 1}, "nodeMeshPassword": SECRET_REF,
        "nodeMeshMaxRestartTime": STRING, "bindMode": STRING, "ignoredInterfaces": STRINGS,
        "communities": {"type": "array", "items": obj({"name": STRING, "value": STRING})},
        "prefixAdvertisements": {"type": "array", "items": obj({"cidr": STRING, "communities": STRINGS})},
        "localWorkloadPeeringIPV4": STRING, "localWorkloadPeeringIPV6": STRING,
    })),
    "bgppeers": ("BGPPeer", "Cluster", obj({
        "node": STRING, "peerIP": STRING, "asNumber": {"type": "integer", "format": "int32"},
        "nodeSelector": STRING, "peerSelector": STRING, "keepOriginalNextHop": BOOL, "password": SECRET_REF,
        "sourceAddress": STRING, "maxRestartTime": STRING, "numAllowedLocalASNumbers": INT,
        "ttlSecurity": INT, "filters": STRINGS, "reachableBy": STRING, "keepaliveTime": STRING,
        "nextHopMode": STRING, "localWorkloadSelector": STRING, "reversePeering": STRING,
    })),
    "felixconfigurations": ("FelixConfiguration", "Cluster", obj({
        "logSeverityScreen": STRING, "reportingInterval": STRING, "routeRefreshInterval": STRING,
        "iptablesRefreshInterval": STRING, "defaultEndpointToHostAction": STRING, "vxlanVNI": INT,
        "vxlanPort": INT, "vxlanMTU": INT, "ipipMTU": INT, "bpfEnabled": BOOL, "healthEnabled": BOOL,
        "healthPort": INT, "prometheusMetricsEnabled": BOOL, "prometheusMetricsPort": INT,
        "ipv6Support": BOOL, "natOutgoingAddress": STRING, "interfacePrefix": STRING,
    })),
    "networkpolicies": ("NetworkPolicy", "Namespaced", obj(POLICY)),
    "globalnetworkpolicies": ("GlobalNetworkPolicy", "Cluster", obj({
        **POLICY, "namespaceSelector": STRING, "doNotTrack": BOOL, "preDNAT": BOOL, "applyOnForward": BOOL})),
    "bgpfilters": ("BGPFilter", "Cluster", obj({
        family: {"type": "array", "items": FILTER_RULE} for family in ("exportV4", "importV4", "exportV6", "importV6")
    })),
    "caliconodestatuses": ("CalicoNodeStatus", "Cluster", obj({
        "classes": STRINGS, "node": STRING, "updatePeriodSeconds": {"type": "integer", "format": "int32"}})),
    "clusterinformations": ("ClusterInformation", "Cluster", obj({
        "clusterGUID": STRING, "clusterType": STRING, "calicoVersion": STRING, "datastoreReady": BOOL,
        "variant": STRING, "cnxVersion": STRING})),
    "tiers": ("Tier", "Cluster", obj({"order": {"type": "number"}, "defaultAction": STRING})),
    "networksets": ("NetworkSet", "Namespaced", obj({"nets": STRINGS})),
    "globalnetworksets": ("GlobalNetworkSet", "Cluster", obj({"nets": STRINGS})),
    "hostendpoints": ("HostEndpoint", "Cluster", obj({
        "node": STRING, "interfaceName": STRING, "expectedIPs": STRINGS, "profiles": STRINGS,
        "ports": {"type": "array", "items": obj({"name": STRING, "protocol": PORT, "port": INT},
                                                 required=["name", "port", "protocol"])}})),
}


def calico_crds() -> list[dict[str, Any]]:
    crds = []
    for plural, (kind, scope, spec) in SPECS.items():
        singular = kind.lower()
        crds.append({
            "apiVersion": "apiextensions.k8s.io/v1", "kind": "CustomResourceDefinition",
            "metadata": {"name": f"{plural}.crd.projectcalico.org"},
            "spec": {
                "group": "crd.projectcalico.org",
                "names": {"kind": kind, "listKind": f"{kind}List", "plural": plural, "singular": singular},
                "scope": scope,
                "versions": [{"name": "v1", "served": True, "storage": True, "schema": {"openAPIV3Schema": {
                    "type": "object",
                    "properties": {"apiVersion": STRING, "kind": STRING, "metadata": {"type": "object"}, "spec": spec,
                                   **({"status": STATUSES[plural]} if plural in STATUSES else {})},
                }}}],
            },
        })
    return crds
