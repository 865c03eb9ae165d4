"""Which resource fields felixpy honours, and the refusal of every field it does not.

The rule (issue #9): every field of every kind felixpy accepts either does what Calico does with it
or is refused at validation with one line naming the field:

    FelixConfiguration "default": spec.bpfEnabled: felixpy does not support this field yet (the eBPF dataplane)

`SUPPORT` declares each field once, by its path in the field tables of model/resources.py:

- `Honoured(test)`: felixpy does what Calico does; `test` (`tests/unit/test_x.py::test_name`) is
  the test that shows the field's effect.
- `HonouredIf(test, allowed, values, accepted_example, refused_example)`: honoured for the
  (normalised) values `allowed` accepts (`values` says which, for the error and the docs),
  refused for the others; a malformed value gets the field's own error first.
- `Refused(reason)`: refused whatever its value.
- `Tolerated(why)`: accepted with a warning; only where Calico itself attaches no behaviour to
  the field (a hint), never to skip work.

Paths are dotted field names from the kind's root (`spec.bgp.asNumber`, `status.podCIDRs`); a
field inside a list of objects is `spec.orchRefs[].nodeName`. Objects that several kinds share
under a type name (`s.obj(..., name="Rule")`) are declared once, under that name, with paths
relative to the object (`Rule`: `action`, `metadata.annotations`; `EntityRule`: `nets`).

`install()` (called by model/resources.py) attaches the refusals to the Obj that owns each field,
so validation checks them as it meets the field: a refused field is refused whatever its value
(before the field's own checker), a limited one after it, on the normalised value. tests/unit/test_field_coverage.py walks the field tables and fails
when a field has no declaration, a declaration names no field, an honoured field's test does not
exist, or a refused field is accepted; so a field cannot be added without deciding which it is.
docs/fields.md is generated from this table (`python -m felixpy.model.coverage > docs/fields.md`).
"""

from __future__ import annotations

import json
import logging
import sys
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Mapping

from felixpy.model import schema as s
from felixpy.model.schema import FieldError, q

log = logging.getLogger(__name__)

NOT_YET = "felixpy does not support this field yet"


@dataclass(frozen=True, slots=True)
class Honoured:
    test: str  # tests/<dir>/test_x.py::test_name, the test that shows the field's effect
    note: str = ""

    def check_present(self, value: Any, path: str) -> None:
        return None

    def check_value(self, value: Any, path: str) -> None:
        return None


@dataclass(frozen=True, slots=True)
class HonouredIf:
    test: str
    allowed: Callable[[Any], bool]
    values: str  # which values are honoured, for the message and the docs
    accepted_example: Any  # a value felixpy honours and one it refuses, both well-formed:
    refused_example: Any  # the coverage test tries them

    def check_present(self, value: Any, path: str) -> None:
        return None

    def check_value(self, value: Any, path: str) -> None:
        if not self.allowed(value):
            shown = q(value) if isinstance(value, str) else json.dumps(value)
            raise FieldError(path, f"felixpy does not support {shown} yet (only {self.values})")


@dataclass(frozen=True, slots=True)
class Refused:
    reason: str = ""  # what the field is for, so the user knows what is missing

    def check_present(self, value: Any, path: str) -> None:
        raise FieldError(path, f"{NOT_YET} ({self.reason})" if self.reason else NOT_YET)

    def check_value(self, value: Any, path: str) -> None:
        return None


@dataclass(frozen=True, slots=True)
class Tolerated:
    why: str  # why Calico attaches no behaviour to it either

    def check_present(self, value: Any, path: str) -> None:
        return None

    def check_value(self, value: Any, path: str) -> None:
        s.warn(path, f"accepted but has no effect in felixpy: {self.why}")


Support = Honoured | HonouredIf | Refused | Tolerated


def _one_of(*values: Any) -> Callable[[Any], bool]:
    return lambda value: value in values


def _ci(*values: str) -> Callable[[Any], bool]:
    lowered = {v.lower() for v in values}
    return lambda value: isinstance(value, str) and value.lower() in lowered


def _zero_duration(value: Any) -> bool:
    return isinstance(value, str) and value.strip("0") in ("", "s", "ms", "m", "h", "us", "ns", ".s")


def _off(test: str, off: Any = False, on: Any = True, what: str = "false") -> HonouredIf:
    """A switch for a feature felixpy does not have: honoured when off (felixpy behaves as Calico
    does with the feature off, which `test` shows), refused when on."""
    return HonouredIf(test, _one_of(off), what, off, on)


def _not(*values: str) -> Callable[[Any], bool]:
    return lambda value: value not in values


def _no_comma(value: Any) -> bool:
    return isinstance(value, str) and "," not in value


def _default_uses(value: Any) -> bool:
    return isinstance(value, list) and sorted(value) == ["Tunnel", "Workload"]


# Tests cited more than once.
_T_POOL_CLAIM = "tests/unit/test_ipam_allocator.py::test_first_allocation_claims_a_confirmed_block_and_reuses_it"
_T_ROUTES = "tests/unit/test_calc_graph.py::test_routes_mode_programs_local_blackhole_remote_and_borrowed"
_T_VXLAN = "tests/unit/test_tunnels_calc.py::test_vxlan_always_routes_every_remote_block_via_its_vtep"
_T_IPIP = "tests/unit/test_tunnels_calc.py::test_ipip_always_and_cross_subnet"
_T_ROUTES_V6 = "tests/unit/test_calc_ipv6.py::test_routes_mode_routes_ipv6_pods_blocks_and_remote_blocks"
_T_IPV6_OFF = "tests/unit/test_calc_ipv6.py::test_ipv6_support_off_leaves_every_ipv6_thing_out"
_T_VXLAN_V6 = "tests/unit/test_calc_ipv6.py::test_vxlan_v6_routes_every_remote_ipv6_block_via_its_vtep"
_T_PEERS = "tests/unit/test_bgp_peers.py::test_global_and_node_peers"
_T_FROM_RES = "tests/unit/test_bgp_peers.py::test_from_resources"
_T_ENDPOINT = "tests/unit/test_policy_calico.py::test_endpoint_from_resources"
_T_STORED = "tests/unit/test_resources.py::test_informational_fields_are_stored_as_given"
_T_KUBE_NODES = "tests/integration/test_kube_datastore.py::test_nodes_are_kubernetes_nodes_with_calico_annotations"
_T_FULL_POLICY = "tests/unit/test_policy_calico.py::test_full_network_policy"
_T_NOT = "tests/unit/test_policy_evaluate.py::test_not_selector_not_nets_not_ports_and_protocol_numbers"
_T_ICMP = "tests/unit/test_policy_render.py::test_icmp_type_and_code"
_T_FAILSAFE = "tests/unit/test_policy_render.py::test_static_chains_forward_and_failsafes"
_T_TIERS = "tests/unit/test_calc_policy.py::test_tiers_order_the_chains_and_a_tier_change_reorders_them"
_T_TIER_PASS = "tests/unit/test_policy_evaluate.py::test_tiers_run_in_order_and_pass_goes_to_the_next_tier"
_T_SA = "tests/unit/test_calc_policy.py::test_service_account_selectors_follow_service_account_labels"
_T_NETSETS = "tests/unit/test_calc_policy.py::test_network_sets_are_selector_ipset_members"
_T_HEPS = "tests/unit/test_calc_policy.py::test_host_endpoints_one_per_interface_wildcard_and_profile_labels"
_T_HEP_KERNEL = ("tests/integration/test_policy_host_endpoints.py::"
                 "test_host_endpoint_default_deny_failsafe_and_forwarding")

_T_OFF = "tests/unit/test_field_coverage.py::test_switches_of_missing_features_are_accepted_off_and_refused_on"
_T_FELIX = ("tests/integration/test_felix_configuration.py::"
            "test_felix_configuration_reaches_the_kernel_and_a_change_restarts_the_agent")
_T_REFRESH = "tests/unit/test_felix_params.py::test_refresh_intervals_from_felix_configuration_drive_the_resyncs"
_T_MERGE = "tests/unit/test_felix_params.py::test_startup_merges_felix_configuration_before_using_it"
_T_IPTABLES = "tests/integration/test_policy_render_kernel.py::test_rendered_table_and_ipsets_load_into_the_kernel"

_T_BGP_LOG = "tests/unit/test_bgp_controller.py::test_log_severity_sets_the_speaker_log_level"
_T_SVC_RANGES = "tests/unit/test_bgp_policy.py::test_every_node_advertises_the_ranges_but_not_single_address_entries"
_T_SVC_LOCAL = "tests/e2e/test_bgp_onprem.py::test_local_service_is_advertised_where_its_endpoint_is"
_T_SVC_CLUSTER = "tests/unit/test_bgp_policy.py::test_cluster_policy_single_address_entries_and_disabled_aggregation"
_T_COMMUNITIES = "tests/integration/test_bgp_fields.py::test_communities_and_local_as_reach_frr"
_T_LISTEN = "tests/unit/test_bgp_peers.py::test_listen_port_global_and_per_node"
_T_BIRD_FIELDS = "tests/unit/test_bgp_config.py::test_bird_renders_the_per_session_fields"
_T_WIRE_SESSIONS = "tests/integration/test_bgp_fields.py::test_sessions_establish_including_local_as_and_gtsm"
_T_IMPORT = "tests/integration/test_bgp_fields.py::test_import_filter_and_as_path_loop"
_T_FILTER_FIRST = "tests/unit/test_bgp_policy.py::test_first_match_wins_across_rules_and_filters_and_no_match_accepts"
_T_FILTER_MATCH = "tests/unit/test_bgp_policy.py::test_match_operators_and_prefix_length"
_T_FILTER_FIELDS = "tests/unit/test_bgp_policy.py::test_peer_type_source_interface_community_as_path"
_T_FILTER_OPS = "tests/unit/test_bgp_policy.py::test_operations_add_communities_and_prepend"
_T_NODE_STATUS = "tests/unit/test_bgp_resources.py::test_reporter_writes_own_node_at_once_then_every_period"

_IPV6 = "IPv6"
_WIREGUARD = "WireGuard encryption"
_BPF = "the eBPF dataplane"
_XDP = "XDP"
_OPENSTACK = "OpenStack"
_NFT = "the native nftables dataplane"


SUPPORT: dict[str, dict[str, Support]] = {
    # -- metadata (every kind) -------------------------------------------------------------------
    "ObjectMeta": {
        "name": Honoured("tests/unit/test_resources.py::test_apply_modes_and_metadata"),
        "namespace": Honoured("tests/integration/test_felixctl.py::test_namespaced_resources"),
        "labels": Honoured("tests/unit/test_ipam_allocator.py::test_node_selector_chooses_pools",
                           "selectable where Calico selects the kind; stored as given elsewhere, as in Calico"),
        "annotations": Honoured(_T_STORED, "stored as given, as in Calico"),
        "resourceVersion": Honoured("tests/unit/test_resources.py::test_apply_stale_resource_version"),
        "creationTimestamp": Honoured(_T_STORED, "set by the store on create"),
        "uid": Honoured(_T_STORED, "set by the store on create"),
        "generation": Honoured(_T_STORED, "stored as given"),
    },
    # -- IPAM ------------------------------------------------------------------------------------
    "IPPool": {
        "spec.cidr": Honoured(_T_POOL_CLAIM),
        "spec.blockSize": Honoured(_T_POOL_CLAIM),
        "spec.ipipMode": Honoured(_T_IPIP),
        "spec.vxlanMode": Honoured(_T_VXLAN),
        "spec.natOutgoing": Honoured("tests/unit/test_calc_graph.py::test_nat_state_from_pools"),
        "spec.disabled": Honoured("tests/unit/test_ipam_allocator.py::test_disabled_pools_get_no_new_allocations"),
        "spec.disableBGPExport": Honoured(
            "tests/unit/test_bgp_controller.py::test_announcements_blocks_borrowed_and_disable_bgp_export"),
        "spec.nodeSelector": Honoured("tests/unit/test_ipam_allocator.py::test_node_selector_chooses_pools"),
        "spec.namespaceSelector": Honoured(
            "tests/unit/test_ipam_fields.py::test_namespace_selector_and_node_selector_must_both_match"),
        "spec.allowedUses": Honoured("tests/unit/test_ipam_fields.py::test_uses_pick_the_pool_for_pods_and_tunnels"),
        "spec.assignmentMode": Honoured("tests/unit/test_ipam_allocator.py::test_manual_pools_only_serve_explicit_requests"),
    },
    "IPReservation": {
        "spec.reservedCIDRs": Honoured(
            "tests/unit/test_ipam_fields.py::test_auto_assign_never_hands_out_reserved_addresses"),
    },
    "IPAMConfiguration": {
        "spec.strictAffinity": Honoured("tests/unit/test_ipam_allocator.py::test_strict_affinity_never_borrows"),
        "spec.autoAllocateBlocks": Honoured(
            "tests/unit/test_ipam_allocator.py::test_auto_allocate_blocks_false_uses_only_owned_blocks"),
        "spec.maxBlocksPerHost": Honoured(
            "tests/unit/test_ipam_allocator.py::test_max_blocks_per_host_limits_claims_and_rolls_back"),
        "spec.kubeVirtVMAddressPersistence": HonouredIf(
            _T_STORED, _one_of("Disabled"), "Disabled: felixpy keeps no KubeVirt VM addresses", "Disabled",
            "Enabled"),
    },
    # -- Node ------------------------------------------------------------------------------------
    "Node": {
        "spec.bgp.asNumber": Honoured(_T_FROM_RES),
        "spec.bgp.ipv4Address": Honoured(_T_ROUTES),
        "spec.bgp.ipv6Address": Honoured(_T_ROUTES_V6, "also the node's IPv6 BGP sessions (bird backend): "
                                         "tests/unit/test_bgp_ipv6.py, e2e test_ipv6_bgp"),
        "spec.bgp.ipv4IPIPTunnelAddr": Honoured(_T_IPIP),
        "spec.bgp.routeReflectorClusterID": Honoured(
            "tests/unit/test_bgp_peers.py::test_route_reflector_client_peers_with_all_reflectors_only"),
        "spec.ipv4VXLANTunnelAddr": Honoured(_T_VXLAN),
        "spec.ipv6VXLANTunnelAddr": Honoured(_T_VXLAN_V6),
        "spec.vxlanTunnelMACAddr": Honoured(_T_VXLAN),
        "spec.vxlanTunnelMACAddrV6": Honoured(_T_VXLAN_V6),
        "spec.orchRefs[].nodeName": Honoured(_T_KUBE_NODES, "written from the Kubernetes Node, as calico-node does"),
        "spec.orchRefs[].orchestrator": Honoured(_T_KUBE_NODES),
        "spec.addresses[].address": Honoured(_T_KUBE_NODES, "written from the Kubernetes Node's addresses"),
        "spec.addresses[].type": Honoured(_T_KUBE_NODES),
        "spec.interfaces": Refused("the host interface inventory calico-node reports"),
        "spec.wireguard": Refused(_WIREGUARD),
        "status.wireguardPublicKey": Refused(_WIREGUARD),
        "status.wireguardPublicKeyV6": Refused(_WIREGUARD),
        "status.podCIDRs": Refused("host-local IPAM from the Kubernetes Node's podCIDR"),
    },
    # -- BGP (issue #11) ----------------------------------------------------------------------------
    "BGPConfiguration": {
        "spec.logSeverityScreen": Honoured(_T_BGP_LOG, "the BGP speaker's log level (agent and BIRD debug)"),
        "spec.nodeToNodeMeshEnabled": Honoured("tests/unit/test_bgp_peers.py::test_mesh_disabled_gives_no_peers"),
        "spec.asNumber": Honoured(_T_FROM_RES),
        "spec.serviceClusterIPs[].cidr": Honoured(_T_SVC_RANGES),
        "spec.serviceExternalIPs[].cidr": Honoured(_T_SVC_RANGES),
        "spec.serviceLoadBalancerIPs[].cidr": Honoured(_T_SVC_LOCAL),
        "spec.serviceLoadBalancerAggregation": Honoured(_T_SVC_CLUSTER),
        "spec.communities[].name": Honoured(_T_COMMUNITIES),
        "spec.communities[].value": Honoured(_T_COMMUNITIES),
        "spec.prefixAdvertisements[].cidr": Honoured(_T_COMMUNITIES, "IPv4 or IPv6 (test_bgp_ipv6.py "
                                                     "test_exports_give_each_session_its_family_with_prefix_advertisement_communities)"),
        "spec.prefixAdvertisements[].communities": Honoured(_T_COMMUNITIES),
        "spec.listenPort": Honoured(_T_LISTEN),
        "spec.nodeMeshPassword.secretKeyRef.name": Honoured(
            "tests/unit/test_bgp_peers.py::test_mesh_settings_password_and_restart_time"),
        "spec.nodeMeshPassword.secretKeyRef.key": Honoured(
            "tests/unit/test_bgp_peers.py::test_mesh_settings_password_and_restart_time"),
        "spec.nodeMeshMaxRestartTime": Honoured(
            "tests/unit/test_bgp_peers.py::test_mesh_settings_password_and_restart_time"),
        "spec.bindMode": Honoured(_T_BIRD_FIELDS, "NodeIP: the node's address only (BIRD strict bind); None: BIRD "
                                                  "listens on every address, ExaBGP on the node's (docs/bgp.md)"),
        "spec.ignoredInterfaces": Honoured(_T_BIRD_FIELDS, "kept out of BIRD's direct protocol; ExaBGP nodes "
                                                           "import no interface routes at all"),
        "spec.localWorkloadPeeringIPV4": Refused("peering with local workloads"),
        "spec.localWorkloadPeeringIPV6": Refused("peering with local workloads"),
        "spec.programClusterRoutes": Refused("choosing who programs cluster routes: the agent programs all"),
        "spec.ipv4NormalRoutePriority": Refused("route metrics"),
        "spec.ipv6NormalRoutePriority": Refused("route metrics"),
    },
    "BGPPeer": {
        "spec.node": Honoured(_T_PEERS),
        "spec.nodeSelector": Honoured(_T_PEERS),
        "spec.peerIP": Honoured(_T_PEERS, "IPv4 or IPv6: an IPv6 peerIP is an ipv6 unicast session from the "
                                          "node's IPv6 address (test_bgp_ipv6.py "
                                          "test_ipv6_only_nodes_mesh_over_ipv6_and_explicit_ipv6_peers_bind_the_node_ipv6)"),
        "spec.asNumber": Honoured(_T_PEERS),
        "spec.peerSelector": Honoured("tests/unit/test_bgp_peers.py::test_route_reflector_client_peers_with_all_reflectors_only"),
        "spec.localASNumber": Honoured(_T_WIRE_SESSIONS),
        "spec.keepOriginalNextHop": Honoured(_T_BIRD_FIELDS, "routes a reflector passes on (felixpy nodes "
                                                             "announce only their own, next hop self)"),
        "spec.nextHopMode": Honoured(_T_BIRD_FIELDS, "routes a reflector passes on (felixpy nodes announce only "
                                                     "their own, next hop self)"),
        "spec.password.secretKeyRef.name": Honoured(_T_PEERS),
        "spec.password.secretKeyRef.key": Honoured(_T_PEERS),
        "spec.sourceAddress": Honoured(_T_PEERS),
        "spec.failureDetectionMode": HonouredIf(_T_FROM_RES, _one_of("None"), "None: felixpy's speakers have no BFD",
                                                "None", "BFDIfDirectlyConnected"),
        "spec.restartMode": HonouredIf("tests/unit/test_bgp_rib.py::test_graceful_restart_keeps_stale_until_end_of_rib",
                                       _one_of("GracefulRestart"), "GracefulRestart (RFC 4724)", "GracefulRestart",
                                       "LongLivedGracefulRestart"),
        "spec.maxRestartTime": Honoured(_T_FROM_RES),
        "spec.keepaliveTime": Honoured(_T_WIRE_SESSIONS, "ExaBGP offers hold time 3 × keepaliveTime (docs/bgp.md)"),
        "spec.birdGatewayMode": HonouredIf(
            "tests/unit/test_bgp_controller.py::test_learned_routes_never_override_own_routes",
            _one_of("DirectIfDirectlyConnected"), "DirectIfDirectlyConnected: next hops are programmed as gateways",
            "DirectIfDirectlyConnected", "Recursive"),
        "spec.numAllowedLocalASNumbers": Honoured(_T_IMPORT),
        "spec.ttlSecurity": Honoured(_T_WIRE_SESSIONS),
        "spec.reachableBy": Honoured("tests/integration/test_bgp_fields.py::test_reachable_by_route"),
        "spec.filters": Honoured(_T_IMPORT),
        "spec.localWorkloadSelector": Refused("peering with local workloads"),
        "spec.reversePeering": Honoured(
            "tests/unit/test_bgp_peers.py::test_reverse_peering_manual_needs_the_other_side_configured"),
    },
    "BGPFilter": {
        "spec.exportV6": Honoured("tests/integration/test_bgp_ipv6.py::test_ipv6_filter_rules_on_the_wire",
                                  "the IPv6 routes' rules, on the IPv6 sessions (agent and BIRD)"),
        "spec.importV6": Honoured("tests/integration/test_bgp_ipv6.py::test_ipv6_filter_rules_on_the_wire",
                                  "the IPv6 routes' rules, on the IPv6 sessions (agent and BIRD)"),
    },
    "BGPFilterRule": {
        "action": Honoured(_T_FILTER_FIRST),
        "matchOperator": Honoured(_T_FILTER_MATCH),
        "cidr": Honoured(_T_FILTER_MATCH),
        "prefixLength.min": Honoured(_T_FILTER_MATCH),
        "prefixLength.max": Honoured(_T_FILTER_MATCH),
        "source": Honoured(_T_FILTER_FIELDS),
        "interface": Honoured(_T_FILTER_FIELDS),
        "peerType": Honoured(_T_FILTER_FIELDS),
        "communities.values": Honoured(_T_FILTER_FIELDS),
        "asPathPrefix": Honoured(_T_FILTER_FIELDS),
        "priority": Refused("route priorities"),
        "operations[].addCommunity.value": Honoured(_T_FILTER_OPS),
        "operations[].prependASPath.prefix": Honoured(_T_FILTER_OPS),
        "operations[].setPriority": Refused("route priorities"),
    },
    "CalicoNodeStatus": {
        "spec.node": Honoured(_T_NODE_STATUS),
        "spec.classes": Honoured(_T_NODE_STATUS),
        "spec.updatePeriodSeconds": Honoured(_T_NODE_STATUS),
    },
    # -- FelixConfiguration ------------------------------------------------------------------------
    "FelixConfiguration": {
        # Written by startup (calico-node's ensureDefaultConfig); felixpy never reports status.
        "spec.reportingInterval": HonouredIf(_T_STORED, _zero_duration, "0s: felixpy writes no status reports",
                                             "0s", "30s"),
        "spec.logSeverityScreen": HonouredIf(_T_FELIX, _not("None"), "Trace to Fatal", "Debug", "None"),
        # Felix's parameters felixpy reads (config.FELIX_PARAMS), with Felix's precedence.
        "spec.routeRefreshInterval": Honoured(_T_REFRESH),
        "spec.iptablesRefreshInterval": Honoured(_T_REFRESH),
        "spec.ipsetsRefreshInterval": Honoured(_T_REFRESH),
        "spec.logFilePath": Honoured(_T_FELIX),
        "spec.logSeverityFile": HonouredIf(_T_FELIX, _not("None"), "Trace to Fatal", "Warning", "None"),
        "spec.logDebugFilenameRegex": Honoured(
            "tests/unit/test_logs.py::test_debug_lines_only_from_files_matching_the_regex"),
        "spec.healthEnabled": Honoured(_T_FELIX),
        "spec.healthHost": Honoured(_T_FELIX),
        "spec.healthPort": Honoured(_T_FELIX),
        "spec.prometheusMetricsEnabled": Honoured(_T_FELIX),
        "spec.prometheusMetricsHost": Honoured(_T_FELIX),
        "spec.prometheusMetricsPort": Honoured(_T_FELIX),
        "spec.failsafeInboundHostPorts[].protocol": Honoured(_T_FELIX),
        "spec.failsafeInboundHostPorts[].port": Honoured(_T_FELIX),
        "spec.failsafeInboundHostPorts[].net": Refused("failsafe ports for one network only"),
        "spec.failsafeOutboundHostPorts[].protocol": Honoured(_T_FELIX),
        "spec.failsafeOutboundHostPorts[].port": Honoured(_T_FELIX),
        "spec.failsafeOutboundHostPorts[].net": Refused("failsafe ports for one network only"),
        "spec.iptablesBackend": Honoured(_T_FELIX),
        "spec.chainInsertMode": Honoured(_T_FELIX),
        "spec.defaultEndpointToHostAction": Honoured(_T_FELIX),
        "spec.natOutgoingAddress": Honoured(_T_FELIX),
        "spec.natPortRange": Honoured(_T_FELIX),
        "spec.vxlanMTU": Honoured(_T_FELIX),
        "spec.ipipMTU": Honoured(_T_MERGE),
        "spec.vxlanVNI": Honoured(_T_FELIX),
        "spec.vxlanPort": Honoured(_T_FELIX),
        "spec.mtuIfacePattern": Honoured(_T_MERGE),
        "spec.interfacePrefix": HonouredIf("tests/unit/test_policy_render.py::test_custom_iface_prefix",
                                           _no_comma, "one prefix", "cali", "cali,tap"),
        "spec.ipv6Support": Honoured(_T_IPV6_OFF, "false: nothing IPv6 is computed, read back or programmed"),
        "spec.ipForwarding": _off(_T_FELIX, "Enabled", "Disabled", "Enabled"),
        **{f"spec.{field}": Refused() for field in (
            "useInternalDataplaneDriver", "dataplaneDriver", "dataplaneWatchdogTimeout", "logPrefix",
            "logSeveritySys", "logActionRateLimit", "logActionRateLimitBurst", "reportingTTL",
            "endpointReportingDelay", "endpointStatusPathPrefix",
            "usageReportingInitialDelay", "usageReportingInterval",
            "healthTimeoutOverrides", "prometheusGoMetricsEnabled", "prometheusProcessMetricsEnabled",
            "featureDetectOverride", "featureGates", "debugMemoryProfilePath", "debugDisableLogDropping",
            "debugSimulateCalcGraphHangAfter", "debugSimulateDataplaneHangAfter",
            "debugSimulateDataplaneApplyDelay", "debugHost", "debugPort", "policySyncPathPrefix",
            "externalNodesList", "interfaceExclude",
            "interfaceRefreshInterval", "routeSyncDisabled", "routeSource", "routeTableRange",
            "routeTableRanges", "removeExternalRoutes", "deviceRouteSourceAddress", "deviceRouteProtocol",
            "ipv4ElevatedRoutePriority", "ipv4NormalRoutePriority", "programClusterRoutes",
            "netlinkTimeout", "ipipEnabled", "vxlanEnabled", "allowVXLANPacketsFromWorkloads",
            "allowIPIPPacketsFromWorkloads",
            "iptablesPostWriteCheckInterval", "iptablesLockFilePath", "iptablesLockTimeout",
            "iptablesLockProbeInterval", "maxIpsetSize", "iptablesMarkMask",
            "iptablesNATOutgoingInterfaceFilter", "iptablesFilterAllowAction", "iptablesMangleAllowAction",
            "iptablesFilterDenyAction", "disableConntrackInvalidCheck", "kubeNodePortRanges",
            "natOutgoingExclusions", "serviceLoopPrevention",
        )},
        # Switches of features felixpy does not have: "off" is what felixpy does.
        "spec.bpfEnabled": _off(_T_IPTABLES),
        "spec.xdpEnabled": _off(_T_IPTABLES),
        "spec.genericXDPEnabled": _off(_T_IPTABLES),
        "spec.nftablesMode": _off(_T_IPTABLES, "Disabled", "Enabled", "Disabled"),
        "spec.wireguardEnabled": _off(_T_ROUTES),
        "spec.wireguardEnabledV6": _off(_T_ROUTES),
        "spec.wireguardHostEncryptionEnabled": _off(_T_ROUTES),
        "spec.usageReportingEnabled": _off(_T_OFF),
        "spec.endpointReportingEnabled": _off(_T_OFF),
        "spec.sidecarAccelerationEnabled": _off(_T_OFF),
        "spec.awsSrcDstCheck": _off(_T_OFF, "DoNothing", "Enable", "DoNothing"),
        "spec.floatingIPs": _off(_T_OFF, "Disabled", "Enabled", "Disabled"),
        "spec.vxlanMTUV6": Honoured(_T_MERGE),
        **{f"spec.{field}": Refused("route metrics and source addresses") for field in (
            "deviceRouteSourceAddressIPv6", "ipv6ElevatedRoutePriority", "ipv6NormalRoutePriority")},
        **{f"spec.{field}": Refused(_WIREGUARD) for field in (
            "prometheusWireGuardMetricsEnabled", "wireguardListeningPort", "wireguardListeningPortV6", "wireguardRoutingRulePriority",
            "wireguardInterfaceName", "wireguardInterfaceNameV6", "wireguardMTU", "wireguardMTUV6",
            "wireguardKeepAlive", "wireguardThreadingEnabled")},
        **{f"spec.{field}": Refused(_OPENSTACK) for field in ("openstackRegion", "metadataAddr", "metadataPort")},
        **{f"spec.{field}": Refused(_NFT) for field in ("nftablesRefreshInterval",)},
        **{f"spec.{field}": Refused(_XDP) for field in ("xdpRefreshInterval",)},
        **{f"spec.{field}": Refused(_BPF) for field in (
            "bpfDisableUnprivileged", "bpfLogLevel", "bpfDataIfacePattern",
            "bpfConnectTimeLoadBalancingEnabled", "bpfConnectTimeLoadBalancing", "bpfExternalServiceMode",
            "bpfKubeProxyIptablesCleanupEnabled", "bpfKubeProxyMinSyncPeriod",
            "bpfKubeProxyEndpointSlicesEnabled")},
    },
    # -- Endpoints and profiles ---------------------------------------------------------------------
    "WorkloadEndpoint": {
        "spec.orchestrator": Honoured(_T_ENDPOINT, "the projectcalico.org/orchestrator label"),
        "spec.workload": Honoured("tests/unit/test_policy_calico.py::test_workload_name_falls_back_to_workload"),
        "spec.node": Honoured(_T_ROUTES),
        "spec.containerID": Honoured(
            "tests/integration/test_kube_datastore.py::test_workload_endpoints_are_pods",
            "which sandbox the endpoint belongs to (CNI DEL and CHECK)"),
        "spec.pod": Honoured(_T_ENDPOINT),
        "spec.endpoint": Honoured(_T_STORED, "the interface name inside the pod, part of the endpoint's name"),
        "spec.serviceAccountName": Honoured(_T_SA, "the projectcalico.org/serviceaccount label and the "
                                            "ksa.<ns>.<sa> profile's labels"),
        "spec.ipNetworks": Honoured(_T_ROUTES),
        "spec.ipv4Gateway": Refused("a per-endpoint gateway"),
        "spec.ipv6Gateway": Refused("a per-endpoint gateway"),
        "spec.ipNATs": Refused("floating IPs (1:1 NAT)"),
        "spec.profiles": Honoured(_T_ENDPOINT),
        "spec.interfaceName": Honoured(_T_ROUTES),
        "spec.mac": Honoured(_T_STORED, "the pod side's MAC, as the CNI plugin reports it"),
        "spec.ports[].name": Honoured(_T_ENDPOINT, "named ports in policy"),
        "spec.ports[].protocol": Honoured(_T_ENDPOINT),
        "spec.ports[].port": Honoured(_T_ENDPOINT),
        "spec.ports[].hostPort": Refused("host ports"),
        "spec.ports[].hostIP": Refused("host ports"),
        "spec.allowSpoofedSourcePrefixes": Refused("source address spoofing"),
        "spec.qosControls": Refused("bandwidth and packet-rate limits"),
    },
    "Profile": {
        "spec.labelsToApply": Honoured("tests/unit/test_policy_calico.py::test_profile_and_namespace_labels"),
    },
    # -- Policy ------------------------------------------------------------------------------------
    "NetworkPolicy": {
        "spec.tier": Honoured(_T_TIERS, "the tier must exist (felixctl); the default tier always does"),
        "spec.order": Honoured("tests/unit/test_policy_evaluate.py::test_order_then_first_matching_rule_decides"),
        "spec.selector": Honoured(_T_FULL_POLICY),
        "spec.serviceAccountSelector": Honoured(_T_SA, "over the ksa.<ns>.<sa> profile's labels (pcsa.<key>)"),
        "spec.types": Honoured("tests/unit/test_policy_render.py::test_endpoint_chain_skips_wrong_direction_and_fails_closed_on_missing_policy"),
        "spec.performanceHints": Tolerated("a hint for Calico's dataplane; the policy means the same without it"),
    },
    "GlobalNetworkPolicy": {
        "spec.tier": Honoured(_T_TIERS, "the tier must exist (felixctl); the default tier always does"),
        "spec.order": Honoured("tests/unit/test_policy_evaluate.py::test_order_then_first_matching_rule_decides"),
        "spec.selector": Honoured("tests/unit/test_policy_calico.py::test_global_policy_scoping"),
        "spec.serviceAccountSelector": Honoured(_T_SA, "over the ksa.<ns>.<sa> profile's labels (pcsa.<key>)"),
        "spec.types": Honoured("tests/unit/test_policy_render.py::test_endpoint_chain_skips_wrong_direction_and_fails_closed_on_missing_policy"),
        "spec.performanceHints": Tolerated("a hint for Calico's dataplane; the policy means the same without it"),
        "spec.namespaceSelector": Honoured("tests/unit/test_policy_evaluate.py::test_global_policy_namespace_selector_and_icmp"),
        "spec.doNotTrack": Honoured(
            "tests/integration/test_policy_host_endpoints.py::test_do_not_track_policy_leaves_no_conntrack_entry",
            "host endpoints only (raw table); never a `*` one, as in Calico"),
        "spec.preDNAT": Honoured(
            "tests/integration/test_policy_host_endpoints.py::test_pre_dnat_policy_blocks_a_node_port_before_dnat",
            "host endpoints only (mangle PREROUTING, before DNAT)"),
        "spec.applyOnForward": Honoured(_T_HEP_KERNEL, "host endpoints' forwarded traffic"),
    },
    "Rule": {
        "action": Honoured("tests/unit/test_policy_render.py::test_allow_deny_pass_log_actions"),
        "protocol": Honoured(_T_NOT),
        "notProtocol": Honoured(_T_FULL_POLICY),
        "ipVersion": Honoured("tests/unit/test_policy_render_v6.py::test_ip_version_renders_a_rule_in_its_family_only",
                              "the rule is rendered for that family's table only (iptables or ip6tables)"),
        "metadata.annotations": Honoured(_T_STORED, "stored as given, as in Calico"),
    },
    "ICMPFields": {
        "type": Honoured(_T_ICMP),
        "code": Honoured(_T_ICMP),
    },
    "EntityRule": {
        "nets": Honoured("tests/unit/test_policy_evaluate.py::test_reason_for_ip_block"),
        "notNets": Honoured(_T_NOT),
        "selector": Honoured(_T_FULL_POLICY),
        "notSelector": Honoured(_T_NOT),
        "namespaceSelector": Honoured("tests/unit/test_policy_evaluate.py::test_reason_names_named_port_and_namespace_selector"),
        "ports": Honoured("tests/unit/test_policy_evaluate.py::test_reason_for_policy_allow"),
        "notPorts": Honoured(_T_NOT),
        "serviceAccounts.names": Honoured(
            "tests/unit/test_policy_evaluate.py::test_service_account_selectors",
            "projectcalico.org/serviceaccount in {names}"),
        "serviceAccounts.selector": Honoured(_T_SA, "over the ksa.<ns>.<sa> profile's labels (pcsa.<key>)"),
        "services": Refused("Service matching"),
    },
    # -- Tiers, network sets, host endpoints -----------------------------------------------------------
    "Tier": {
        "spec.order": Honoured(_T_TIERS),
        "spec.defaultAction": Honoured(_T_TIER_PASS),
    },
    "NetworkSet": {
        "spec.nets": Honoured(_T_NETSETS, "members of the selector ipsets that select the set"),
    },
    "GlobalNetworkSet": {
        "spec.nets": Honoured(_T_NETSETS, "members of the selector ipsets that select the set"),
    },
    "HostEndpoint": {
        "spec.node": Honoured(_T_HEPS, "only this node's host endpoints are policed"),
        "spec.interfaceName": Honoured(_T_HEP_KERNEL, "required by felixpy (finding the interface by "
                                       "expectedIPs alone is refused); `*` for every interface"),
        "spec.expectedIPs": Honoured(_T_HEPS, "members of the selector ipsets that select the endpoint"),
        "spec.profiles": Honoured(_T_HEPS, "jumped to after the policies; their labelsToApply are inherited"),
        "spec.ports[].name": Honoured(
            "tests/unit/test_calc_policy.py::test_host_endpoint_named_ports_are_named_port_set_members"),
        "spec.ports[].protocol": Honoured(
            "tests/unit/test_calc_policy.py::test_host_endpoint_named_ports_are_named_port_set_members"),
        "spec.ports[].port": Honoured(
            "tests/unit/test_calc_policy.py::test_host_endpoint_named_ports_are_named_port_set_members"),
    },
    # -- ClusterInformation --------------------------------------------------------------------------
    "ClusterInformation": {
        "spec.clusterGUID": Honoured(_T_STORED, "written by startup; informational, as in Calico"),
        "spec.clusterType": Honoured("tests/integration/test_startup.py::test_first_start_creates_node_pool_and_defaults",
                                     "CLUSTER_TYPE, written by startup"),
        "spec.calicoVersion": Honoured(_T_STORED, "written by startup; informational, as in Calico"),
        "spec.datastoreReady": Honoured("tests/integration/test_migrate.py::test_etcd_to_kubernetes_and_back",
                                        "the migration lock: felixctl datastore migrate lock/unlock/export"),
        "spec.variant": Honoured(_T_STORED, "informational, as in Calico"),
    },
}


# -- walking the field tables -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Field:
    """One field met by the walk: in `table` at `path`, owned by `owner` under `name`."""

    table: str
    path: str
    owner: s.Obj
    name: str
    checker: s.Checker

    @property
    def child(self) -> s.Obj | None:
        """The object this field holds (directly or as list items), or None for a value field."""
        checker = self.checker
        while isinstance(checker, s.ListOf):
            checker = checker.item
        return checker if isinstance(checker, s.Obj) else None

    @property
    def child_prefix(self) -> str:
        checker, path = self.checker, self.path
        while isinstance(checker, s.ListOf):
            checker, path = checker.item, path + "[]"
        return path


def walk(table: str, root: s.Obj, prefix: str = "") -> Iterator[Field]:
    """Every field under `root`, depth first. A named object below the root is not entered: its
    fields are declared (and walked) once under its own name (`named_objects`)."""
    for name, checker in root.fields.items():
        field = Field(table, s.join(prefix, name), root, name, checker)
        yield field
        child = field.child
        if child is not None and child.name is None:
            yield from walk(table, child, field.child_prefix)


def named_objects(roots: Mapping[str, tuple[tuple[str, s.Obj], ...]]) -> dict[str, s.Obj]:
    """Every named object reachable from `roots`, by name."""
    found: dict[str, s.Obj] = {}
    pending = [obj for parts in roots.values() for _, obj in parts]
    while pending:
        obj = pending.pop()
        for field in walk("", obj):
            child = field.child
            if child is not None and child.name is not None and child.name not in found:
                found[child.name] = child
                pending.append(child)
    return found


def all_fields(roots: Mapping[str, tuple[tuple[str, s.Obj], ...]]) -> list[Field]:
    """Every field of every table: the kinds' (`spec.…`, `status.…`) and the named objects'."""
    fields = [f for table, parts in roots.items() for prefix, obj in parts for f in walk(table, obj, prefix)]
    for name, obj in sorted(named_objects(roots).items()):
        fields.extend(walk(name, obj))
    return fields


def install(roots: Mapping[str, tuple[tuple[str, s.Obj], ...]]) -> list[str]:
    """Attach every refusal (and value limit, and warning) to the Obj owning the field; returns
    the problems found (an undeclared field, a declaration naming no field, one Obj field declared
    two ways). The coverage test asserts there are none; validation works regardless."""
    problems: list[str] = []
    seen: set[tuple[str, str]] = set()
    refused_prefixes: list[tuple[str, str]] = []
    for field in all_fields(roots):
        declared = SUPPORT.get(field.table, {}).get(field.path)
        if declared is not None:
            seen.add((field.table, field.path))
            current = field.owner.support.get(field.name)
            if current is not None and current != declared and not (
                    isinstance(current, Honoured) and isinstance(declared, Honoured)):
                # Two paths through one shared Obj: validation cannot treat them differently.
                problems.append(f"{field.table} {field.path}: shares its object with a field declared {current}")
            if not isinstance(declared, Honoured):
                field.owner.support[field.name] = declared
            if isinstance(declared, Refused):
                refused_prefixes.append((field.table, field.path))
    for table, paths in SUPPORT.items():
        for path in paths:
            if (table, path) not in seen:
                problems.append(f"{table} {path}: declared, but there is no such field")
    for field in all_fields(roots):
        if (field.table, field.path) in seen or field.child is not None:
            continue  # declared, or an object whose fields are declared one by one
        if any(field.table == table and field.path.startswith((path + ".", path + "[]"))
               for table, path in refused_prefixes):
            continue  # inside a refused object
        problems.append(f"{field.table} {field.path}: not declared honoured or refused in model/coverage.py")
    return problems


# -- docs ----------------------------------------------------------------------------------------------


def _describe(support: Support) -> tuple[str, str]:
    if isinstance(support, Honoured):
        return "honoured", support.note
    if isinstance(support, HonouredIf):
        return "honoured", f"only {support.values}; other values refused"
    if isinstance(support, Tolerated):
        return "accepted with a warning", support.why
    return "**refused**", support.reason


def render_docs() -> str:
    lines = [
        "# Resource fields: what felixpy honours",
        "",
        "<!-- Generated by `python -m felixpy.model.coverage > docs/fields.md`; edit felixpy/model/coverage.py. -->",
        "",
        "Every field of every `projectcalico.org/v3` kind felixpy accepts either does what Calico does",
        "with it (*honoured*, with the test that shows it) or is refused at validation with one line",
        "naming the field, e.g.",
        "",
        "```",
        f'FelixConfiguration "default": spec.bpfEnabled: {NOT_YET} (the eBPF dataplane)',
        "```",
        "",
        "A refused object refuses everything inside it. *Accepted with a warning* is only for fields",
        "Calico itself attaches no behaviour to. `tests/unit/test_field_coverage.py` fails when a field",
        "is added without a declaration here. Objects shared by several kinds (ObjectMeta, Rule,",
        "EntityRule, ICMPFields) are listed once.",
    ]
    for table, paths in SUPPORT.items():
        lines += ["", f"## {table}", "", "| Field | Status | Notes |", "|---|---|---|"]
        for path, support in paths.items():
            status, note = _describe(support)
            lines.append(f"| `{path}` | {status} | {note.replace('|', '/')} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.stdout.write(render_docs())
