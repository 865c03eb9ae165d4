"""bgp.filters, bgp.advertise, bgp.services, bgp.announcer: Calico's BGP policy fields, pure.

BGPFilter rule matching and first-match semantics, prefixAdvertisement communities, the per-peer
exports, the RIB's import policy (filters and the AS-path loop check), Calico's Service
advertisement rules, and the commands the announcer sends for them.
"""

from __future__ import annotations

import pytest

from bgp.advertise import (LocalRoute, PeerExport, community_rules, communities_for, exports, import_policy)
from bgp.announcer import Announcer
from bgp.filters import BGPFilter, FilterError, Route, evaluate, render_bird_functions, resolve
from bgp.protocol import Attributes, PathAttributes, ReceivedRoute
from bgp.rib import Rib
from bgp.services import EndpointSliceInfo, ServiceInfo, ServiceSettings, service_routes

N1, N2, TOR = "192.0.2.11", "192.0.2.12", "192.0.2.1"


def bgp_filter(name: str, **spec: object) -> BGPFilter:
    return BGPFilter.from_resource({"metadata": {"name": name}, "spec": spec})


# -- BGPFilter -------------------------------------------------------------------------------------


def test_match_operators_and_prefix_length() -> None:
    def accepts(rule: dict[str, object], prefix: str) -> bool:
        verdict = evaluate([bgp_filter("f", importV4=[rule])], "import", Route(prefix), ebgp=True)
        return verdict.matched

    assert accepts({"action": "Reject", "matchOperator": "Equal", "cidr": "10.0.0.0/8"}, "10.0.0.0/8")
    assert not accepts({"action": "Reject", "matchOperator": "Equal", "cidr": "10.0.0.0/8"}, "10.1.0.0/16")
    assert accepts({"action": "Reject", "matchOperator": "NotEqual", "cidr": "10.0.0.0/8"}, "10.1.0.0/16")
    assert accepts({"action": "Reject", "matchOperator": "In", "cidr": "10.0.0.0/8"}, "10.1.0.0/16")
    assert not accepts({"action": "Reject", "matchOperator": "In", "cidr": "10.0.0.0/8"}, "11.0.0.0/16")
    assert accepts({"action": "Reject", "matchOperator": "NotIn", "cidr": "10.0.0.0/8"}, "11.0.0.0/16")
    ranged = {"action": "Reject", "matchOperator": "In", "cidr": "10.0.0.0/8", "prefixLength": {"min": 24, "max": 26}}
    assert accepts(ranged, "10.1.2.0/24") and accepts(ranged, "10.1.2.0/26")
    assert not accepts(ranged, "10.1.0.0/16") and not accepts(ranged, "10.1.2.0/27")


def test_first_match_wins_across_rules_and_filters_and_no_match_accepts() -> None:
    first = bgp_filter("first", exportV4=[{"action": "Accept", "matchOperator": "In", "cidr": "10.1.0.0/16"}])
    second = bgp_filter("second", exportV4=[{"action": "Reject", "matchOperator": "In", "cidr": "10.0.0.0/8"}])
    assert evaluate([first, second], "export", Route("10.1.1.0/24"), ebgp=False).accepted
    assert not evaluate([first, second], "export", Route("10.2.1.0/24"), ebgp=False).accepted
    verdict = evaluate([first, second], "export", Route("192.168.0.0/24"), ebgp=False)
    assert verdict.accepted and not verdict.matched
    assert evaluate([first, second], "import", Route("10.2.1.0/24"), ebgp=False).accepted  # export rules only


def test_peer_type_source_interface_community_as_path() -> None:
    f = bgp_filter("f", importV4=[
        {"action": "Reject", "peerType": "eBGP", "matchOperator": "In", "cidr": "10.9.0.0/16"},
        {"action": "Reject", "communities": {"values": ["65000:666"]}},
        {"action": "Reject", "communities": {"values": ["1:2:3"]}},
        {"action": "Reject", "asPathPrefix": [65001, 65002]},
    ], exportV4=[{"action": "Reject", "interface": "cali*"}, {"action": "Reject", "source": "RemotePeers"}])

    def imported(prefix: str, ebgp: bool = True, **attrs: object) -> bool:
        return evaluate([f], "import", Route(prefix, PathAttributes(**attrs), from_bgp=True),  # type: ignore[arg-type]
                        ebgp=ebgp).accepted

    assert not imported("10.9.1.0/24") and imported("10.9.1.0/24", ebgp=False)
    assert not imported("10.1.0.0/24", communities=("65000:666",))
    assert not imported("10.1.0.0/24", large_communities=("1:2:3",))
    assert imported("10.1.0.0/24", communities=("1:2",))
    assert not imported("10.1.0.0/24", as_path=(65001, 65002, 65009)) and imported("10.1.0.0/24", as_path=(65001,))
    assert not evaluate([f], "export", Route("10.244.1.5/32", interface="cali123"), ebgp=True).accepted
    assert evaluate([f], "export", Route("10.244.1.0/26"), ebgp=True).accepted  # our own: not RemotePeers
    assert not evaluate([f], "export", Route("10.244.1.0/26", from_bgp=True), ebgp=True).accepted


def test_operations_add_communities_and_prepend() -> None:
    f = bgp_filter("f", importV4=[{"action": "Accept", "operations": [
        {"addCommunity": {"value": "65000:1"}}, {"addCommunity": {"value": "1:2:3"}},
        {"prependASPath": {"prefix": [65009, 65010]}}]}])
    verdict = evaluate([f], "import", Route("10.0.0.0/24", PathAttributes(as_path=(65001,))), ebgp=True)
    assert verdict.attributes.communities == ("65000:1",) and verdict.attributes.large_communities == ("1:2:3",)
    assert verdict.attributes.as_path == (65009, 65010, 65001)


@pytest.mark.parametrize("spec,message", [
    ({"importV6": [{"action": "Reject", "matchOperator": "Equal", "cidr": "10.0.0.0/8"}]},
     "spec.importV6[0].cidr: '10.0.0.0/8' is not an IPv6 CIDR"),
    ({"importV4": [{"action": "Reject", "priority": 10}]}, "priority: route priorities are not supported"),
    ({"exportV4": [{"action": "Accept", "operations": [{"setPriority": {"value": 5}}]}]}, "setPriority"),
    ({"importV4": [{"action": "Reject", "cidr": "10.0.0.0/8"}]}, "cidr and matchOperator go together"),
    ({"importV4": [{"action": "Drop"}]}, "action must be Accept or Reject"),
    ({"importV4": [{"action": "Reject", "matchOperator": "Equal", "cidr": "10.0.0.0/8",
                    "prefixLength": {"min": 16}}]}, "prefixLength needs matchOperator In or NotIn"),
])
def test_unusable_filters_are_refused_in_one_line(spec: dict[str, object], message: str) -> None:
    with pytest.raises(FilterError) as info:
        bgp_filter("bad", **spec)
    assert message in str(info.value) and 'BGPFilter "bad"' in str(info.value) and "\n" not in str(info.value)


def test_bird_functions_render_every_rule() -> None:
    f = bgp_filter("tor.a", importV4=[
        {"action": "Reject", "matchOperator": "NotIn", "cidr": "10.0.0.0/8", "prefixLength": {"max": 24}},
        {"action": "Accept", "peerType": "iBGP", "communities": {"values": ["65000:1"]}, "asPathPrefix": [65001],
         "operations": [{"addCommunity": {"value": "1:2:3"}}, {"prependASPath": {"prefix": [7, 8]}}]}],
        exportV4=[{"action": "Reject", "source": "RemotePeers", "interface": "eth*"}])
    text = "\n".join(render_bird_functions([f]))
    assert "function felixpy_filter_0_import(bool is_ebgp) {" in text
    assert "if (net !~ [ 10.0.0.0/8{8,24} ]) then { reject; }" in text
    assert ("if (!is_ebgp) then { if ((65000, 1) ~ bgp_community) && (bgp_path ~ [= 65001 * =]) then "
            "{ bgp_large_community.add((1, 2, 3)); bgp_path.prepend(8); bgp_path.prepend(7); accept; } }") in text
    assert 'if (source = RTS_BGP) && (defined(ifname) && ifname ~ "eth*") then { reject; }' in text


def test_resolve_skips_missing_filters_in_order() -> None:
    a, b = bgp_filter("a"), bgp_filter("b")
    assert resolve(["b", "missing", "a"], {"a": a, "b": b}) == (b, a)


# -- communities and exports -----------------------------------------------------------------------

DEFAULT = {"spec": {"communities": [{"name": "pods", "value": "65000:100"}],
                    "prefixAdvertisements": [{"cidr": "10.244.0.0/16", "communities": ["pods", "65000:1:2"]},
                                             {"cidr": "10.244.1.0/24", "communities": ["65000:101"]}]}}


def test_communities_for_every_matching_prefix_advertisement() -> None:
    rules = community_rules(DEFAULT)
    assert communities_for("10.244.1.0/26", rules) == Attributes(communities=("65000:100", "65000:101"),
                                                                 large_communities=("65000:1:2",))
    assert communities_for("10.244.9.0/26", rules).communities == ("65000:100",)
    assert communities_for("10.96.0.0/12", rules) == Attributes()
    # A node-specific BGPConfiguration with prefixAdvertisements replaces the global ones.
    node = {"metadata": {"name": "node.n1"}, "spec": {"prefixAdvertisements": [
        {"cidr": "10.0.0.0/8", "communities": ["pods"]}]}}
    assert communities_for("10.96.0.0/12", community_rules(DEFAULT, node)).communities == ("65000:100",)
    with pytest.raises(FilterError, match="neither a community value nor the name"):
        community_rules({"spec": {"prefixAdvertisements": [{"cidr": "10.0.0.0/8", "communities": ["nope"]}]}})


def test_exports_per_peer_with_export_filters() -> None:
    rules = community_rules(DEFAULT)
    tor_filter = bgp_filter("tor", exportV4=[
        {"action": "Reject", "matchOperator": "Equal", "cidr": "10.244.1.0/26"},
        {"action": "Accept", "matchOperator": "Equal", "cidr": "10.244.2.0/26",
         "operations": [{"addCommunity": {"value": "65000:9"}}, {"prependASPath": {"prefix": [64512]}}]}])
    routes = [LocalRoute("10.244.1.0/26"), LocalRoute("10.244.2.0/26"), LocalRoute("10.96.0.0/12")]
    out = exports(routes, rules, {N2: PeerExport((), False), TOR: PeerExport((tor_filter,), True)})
    assert out[N2]["10.244.1.0/26"].communities == ("65000:100", "65000:101")
    assert "10.244.1.0/26" not in out[TOR]
    # Accepted by a rule: its operations, and none of the prefixAdvertisement communities.
    assert out[TOR]["10.244.2.0/26"] == Attributes(communities=("65000:9",), as_path=(64512,))
    assert out[TOR]["10.96.0.0/12"] == Attributes()


def test_import_policy_filters_and_as_path_loop() -> None:
    f = bgp_filter("f", importV4=[{"action": "Reject", "matchOperator": "In", "cidr": "198.51.100.0/24"}])
    policy = import_policy({TOR: (f,)}, {TOR: True}, {TOR: 64512, N2: 64512}, {TOR: 0, N2: 1})
    rib = Rib()
    rib.set_import_policy(policy)
    rib.update(TOR, [ReceivedRoute("198.51.100.0/24", TOR), ReceivedRoute("203.0.113.0/24", TOR),
                     ReceivedRoute("100.64.0.0/24", TOR, PathAttributes(as_path=(65001, 64512)))])
    rib.update(N2, [ReceivedRoute("100.64.1.0/24", N2, PathAttributes(as_path=(65001, 64512)))])
    assert rib.best_routes() == {"203.0.113.0/24": TOR, "100.64.1.0/24": N2}
    assert set(rib.received(TOR)) == {"198.51.100.0/24", "203.0.113.0/24", "100.64.0.0/24"}
    # Dropping the filter (and n2's allowance) re-decides what was received; nobody resends anything.
    delta = rib.set_import_policy(import_policy({}, {}, {TOR: 64512, N2: 64512}, {TOR: 0, N2: 0}))
    assert delta == {"198.51.100.0/24": TOR, "100.64.1.0/24": None}
    assert set(rib.best_routes()) == {"198.51.100.0/24", "203.0.113.0/24"}


# -- services ---------------------------------------------------------------------------------------

SETTINGS = ServiceSettings(cluster_cidrs=("10.96.0.0/12",), external_cidrs=("192.0.2.200/32", "203.0.113.0/24"),
                           load_balancer_cidrs=("198.18.0.0/24", "198.18.1.7/32"))


def svc(name: str, policy: str = "Cluster", type_: str = "LoadBalancer", cluster: str = "10.96.0.10",
        external: tuple[str, ...] = (), lb: tuple[str, ...] = ()) -> ServiceInfo:
    return ServiceInfo.from_object({
        "metadata": {"namespace": "ns", "name": name},
        "spec": {"type": type_, "clusterIP": cluster, "externalIPs": list(external), "externalTrafficPolicy": policy},
        "status": {"loadBalancer": {"ingress": [{"ip": ip} for ip in lb] + [{"hostname": "lb.example"}]}}})


def slice_(service: str, *endpoints: tuple[str, str | None, bool | None]) -> EndpointSliceInfo:
    return EndpointSliceInfo.from_object({
        "metadata": {"namespace": "ns", "name": f"{service}-x", "labels": {"kubernetes.io/service-name": service}},
        "addressType": "IPv4",
        "endpoints": [{"addresses": [ip], "nodeName": node, **({"conditions": {"ready": ready}}
                                                               if ready is not None else {})}
                      for ip, node, ready in endpoints]})


def test_every_node_advertises_the_ranges_but_not_single_address_entries() -> None:
    routes = service_routes(SETTINGS, [], [], node="n1")
    assert routes.announce == {"10.96.0.0/12", "192.0.2.200/32", "203.0.113.0/24", "198.18.0.0/24"}
    assert routes.reject == {"10.96.0.0/12", "192.0.2.200/32", "203.0.113.0/24", "198.18.0.0/24"}
    excluded = service_routes(SETTINGS, [], [], node="n1", excluded=True)
    assert excluded.announce == frozenset() and excluded.reject == routes.reject
    disabled = ServiceSettings(load_balancer_cidrs=("198.18.0.0/24",), load_balancer_aggregation=False)
    assert service_routes(disabled, [], [], node="n1").announce == frozenset()


def test_local_service_is_advertised_by_nodes_with_a_ready_endpoint() -> None:
    local = svc("web", "Local", external=("203.0.113.5", "192.0.2.99"), lb=("198.18.0.10", "10.1.1.1"))
    slices = [slice_("web", ("10.244.1.5", "n1", True), ("10.244.2.5", "n2", False), ("10.244.3.5", "n3", None))]
    on_n1 = service_routes(SETTINGS, [local], slices, node="n1").announce
    assert {"10.96.0.10/32", "203.0.113.5/32", "198.18.0.10/32"} <= on_n1
    assert "192.0.2.99/32" not in on_n1 and "10.1.1.1/32" not in on_n1  # outside the configured ranges
    assert "198.18.0.10/32" not in service_routes(SETTINGS, [local], slices, node="n2").announce  # not ready
    assert "198.18.0.10/32" in service_routes(SETTINGS, [local], slices, node="n3").announce  # ready unset: ready
    assert "198.18.0.10/32" not in service_routes(SETTINGS, [local], slices, node="n4").announce
    no_cluster = ServiceSettings(load_balancer_cidrs=("198.18.0.0/24",))
    assert "10.96.0.10/32" not in service_routes(no_cluster, [local], slices, node="n1").announce


def test_cluster_policy_single_address_entries_and_disabled_aggregation() -> None:
    single = svc("one", lb=("198.18.1.7",))
    assert "198.18.1.7/32" in service_routes(SETTINGS, [single], [], node="n5").announce
    ext = svc("ext", type_="ClusterIP", external=("192.0.2.200",))
    assert "192.0.2.200/32" in service_routes(SETTINGS, [ext], [], node="n5").announce
    plain = svc("plain", lb=("198.18.0.20",))
    assert "198.18.0.20/32" not in service_routes(SETTINGS, [plain], [], node="n5").announce  # the range covers it
    disabled = ServiceSettings(load_balancer_cidrs=("198.18.0.0/24",), load_balancer_aggregation=False)
    assert service_routes(disabled, [plain], [], node="n5").announce == frozenset()  # no endpoint anywhere
    with_endpoint = service_routes(disabled, [plain], [slice_("plain", ("10.244.9.9", "n9", True))], node="n5")
    assert with_endpoint.announce == {"198.18.0.20/32"}


def test_headless_and_external_name_services_are_not_advertised() -> None:
    headless = svc("h", "Local", type_="ClusterIP", cluster="None")
    external = svc("e", "Local", type_="ExternalName")
    slices = [slice_(n, ("10.244.1.5", "n1", True)) for n in ("h", "e")]
    assert service_routes(SETTINGS, [headless, external], slices, node="n1").announce == \
        service_routes(SETTINGS, [], [], node="n1").announce


# -- announcer --------------------------------------------------------------------------------------

C = Attributes(communities=("65000:1",))


def test_same_routes_everywhere_is_one_selector_free_command() -> None:
    a = Announcer()
    a.set_peers([N2, TOR])
    assert a.commands({N2: {"10.0.0.0/26": C}, TOR: {"10.0.0.0/26": C}}, N1) == [
        f"announce attributes next-hop {N1} community [ 65000:1 ] nlri 10.0.0.0/26"]
    assert a.commands({N2: {"10.0.0.0/26": C}, TOR: {"10.0.0.0/26": C}}, N1) == []


def test_differing_peers_get_selectors_and_withdraws_are_per_peer() -> None:
    a = Announcer()
    a.set_peers([N2, TOR])
    both = {"10.0.0.0/26": C, "10.0.1.0/26": Attributes()}
    assert a.commands({N2: both, TOR: {"10.0.1.0/26": Attributes()}}, N1) == [
        f"announce attributes next-hop {N1} nlri 10.0.1.0/26",
        f"neighbor {N2} announce attributes next-hop {N1} community [ 65000:1 ] nlri 10.0.0.0/26",
    ]
    assert a.commands({N2: {"10.0.1.0/26": Attributes()}, TOR: {"10.0.1.0/26": Attributes()}}, N1) == [
        f"neighbor {N2} withdraw attributes next-hop {N1} nlri 10.0.0.0/26"]


def test_up_peer_is_refreshed_alone_and_a_forgotten_peer_waits_for_it() -> None:
    a = Announcer()
    a.set_peers([N2, TOR])
    a.commands({N2: {"10.0.0.0/26": C}, TOR: {"10.0.0.0/26": C}}, N1)
    a.forget([TOR])
    assert a.commands({N2: {"10.0.0.0/26": C}, TOR: {"10.0.9.0/26": C}}, N1) == []
    assert a.commands({N2: {"10.0.0.0/26": C}, TOR: {"10.0.9.0/26": C}}, N1, eor=[TOR]) == [
        f"neighbor {TOR} withdraw attributes next-hop {N1} nlri 10.0.0.0/26",
        f"neighbor {TOR} announce attributes next-hop {N1} community [ 65000:1 ] nlri 10.0.9.0/26",
        f"neighbor {TOR} announce eor ipv4 unicast",
    ]
