"""BGP over IPv6, the pure parts: Calico's per-family sessions (confd's bird and bird6), what each
session carries, ExaBGP's rendering and its IPv6 messages."""

from __future__ import annotations

import json

import pytest

from bgp.advertise import CommunityRule, LocalRoute, PeerExport, communities_for, exports
from bgp.announcer import Announcer
from bgp.config import SpeakerConfig, render_exabgp_conf
from bgp.filters import BGPFilter, Route, evaluate
from bgp.peers import BGPPeerSpec, BGPSettings, NodeInfo, PeerType, PeeringError, select_peers
from bgp.protocol import Attributes, OpenReceived, RoutesReceived, parse_exabgp_line
from bgp.rib import Rib
from felixpy.node.bgp import parse_adj_rib_out

V6 = {"n1": "fd00:192:0:2::11", "n2": "fd00:192:0:2::12", "n3": "fd00:192:0:2::13"}


def _nodes(*, v4: bool = True, v6: tuple[str, ...] = ("n1", "n2", "n3")) -> list[NodeInfo]:
    return [NodeInfo(name, f"192.0.2.{11 + i}" if v4 else None, ipv6=V6[name] if name in v6 else None)
            for i, name in enumerate(("n1", "n2", "n3"))]


def test_dual_stack_mesh_has_one_session_per_family_between_the_same_family_addresses() -> None:
    peers = select_peers("n1", _nodes(), BGPSettings(), [])
    assert [(p.address, p.source_address, p.version, p.type) for p in peers] == [
        ("192.0.2.12", "192.0.2.11", 4, PeerType.MESH), ("192.0.2.13", "192.0.2.11", 4, PeerType.MESH),
        (V6["n2"], V6["n1"], 6, PeerType.MESH), (V6["n3"], V6["n1"], 6, PeerType.MESH)]
    assert [p.name for p in peers if p.version == 6] == ["Mesh_fd00_192_0_2__12", "Mesh_fd00_192_0_2__13"]
    # The lower address of each pair waits (confd compares the strings, per family).
    assert [p.passive for p in peers] == [True, True, True, True]
    assert all(not p.passive for p in select_peers("n3", _nodes(), BGPSettings(), []))


def test_ipv6_sessions_need_an_ipv6_address_at_both_ends() -> None:
    nodes = _nodes(v6=("n1", "n2"))
    assert [p.address for p in select_peers("n1", nodes, BGPSettings(), [])] == [
        "192.0.2.12", "192.0.2.13", V6["n2"]]
    # No IPv6 address here: no IPv6 sessions at all, also not to an explicit IPv6 peerIP (bird6
    # is "IPv6 disabled on this node").
    explicit = BGPPeerSpec("tor6", peer_ip="fd00:192:0:2::1", as_number=65001)
    assert [p.address for p in select_peers("n3", nodes, BGPSettings(), [explicit])] == [
        "192.0.2.11", "192.0.2.12"]


def test_ipv6_only_nodes_mesh_over_ipv6_and_explicit_ipv6_peers_bind_the_node_ipv6() -> None:
    nodes = _nodes(v4=False)
    tor = BGPPeerSpec("tor", peer_ip="[fd00:192:0:2::1]:1179", as_number=65001, node="n1")
    tor4 = BGPPeerSpec("tor4", peer_ip="192.0.2.1", as_number=65001)
    peers = select_peers("n1", nodes, BGPSettings(), [tor, tor4])
    assert [(p.address, p.port, p.source_address, p.type) for p in peers] == [
        ("fd00:192:0:2::1", 1179, V6["n1"], PeerType.NODE),
        (V6["n2"], 179, V6["n1"], PeerType.MESH), (V6["n3"], 179, V6["n1"], PeerType.MESH)]


def test_selector_peers_are_per_family_and_reachable_by_must_match_the_peer_family() -> None:
    spec = BGPPeerSpec("rr", peer_selector="all()", node="n1")
    peers = select_peers("n1", _nodes(), BGPSettings(node_to_node_mesh=False), [spec])
    assert [(p.address, p.type) for p in peers] == [
        ("192.0.2.12", PeerType.NODE), ("192.0.2.13", PeerType.NODE),
        (V6["n2"], PeerType.NODE), (V6["n3"], PeerType.NODE)]
    bad = BGPPeerSpec("x", peer_ip="fd00::1", as_number=65001, reachable_by="192.0.2.1")
    with pytest.raises(PeeringError, match=r'^BGPPeer "x": spec.reachableBy: 192.0.2.1 is not of spec.peerIP'):
        select_peers("n1", _nodes(), BGPSettings(), [bad])


def test_from_resource_reads_ipv6_address() -> None:
    node = NodeInfo.from_resource({"metadata": {"name": "n1"},
                                   "spec": {"bgp": {"ipv6Address": "fd00:192:0:2::11/64"}}})
    assert (node.ipv4, node.ipv6) == (None, "fd00:192:0:2::11")


def test_exabgp_neighbour_carries_the_family_of_its_address() -> None:
    peers = select_peers("n1", _nodes(), BGPSettings(), [])
    text = render_exabgp_conf(SpeakerConfig("n1", "192.0.2.11", "192.0.2.11", 64512, tuple(peers), "/run/s.sock",
                                            python="/usr/bin/python3"))
    v6 = text[text.index(f"neighbor {V6['n2']} {{"):]
    v6 = v6[:v6.index("\n}\n")]
    assert f"local-address {V6['n1']};" in v6 and "        ipv6 unicast;" in v6 and "ipv4 unicast" not in v6
    v4 = text[text.index("neighbor 192.0.2.12 {"):]
    assert "        ipv4 unicast;" in v4[:v4.index("\n}\n")]
    with pytest.raises(ValueError):  # the BGP identifier stays 32 bits
        render_exabgp_conf(SpeakerConfig("n1", V6["n1"], V6["n1"], 64512, (), "/run/s.sock", python="/usr/bin/python3"))


def test_exports_give_each_session_its_family_with_prefix_advertisement_communities() -> None:
    routes = [LocalRoute("10.244.1.0/26"), LocalRoute("fd00:10:244::/122"), LocalRoute("fd00:10:244::1:5/128")]
    rules = (CommunityRule("fd00:10:244::/64", ("65000:6",), ()), CommunityRule("10.244.0.0/16", ("65000:4",), ()))
    out = exports(routes, rules, {"192.0.2.12": PeerExport((), False), V6["n2"]: PeerExport((), False)})
    assert out["192.0.2.12"] == {"10.244.1.0/26": Attributes(communities=("65000:4",))}
    assert out[V6["n2"]] == {"fd00:10:244::/122": Attributes(communities=("65000:6",)),
                             "fd00:10:244::1:5/128": Attributes(communities=("65000:6",))}
    assert communities_for("fd00:10:245::/122", rules) == Attributes()


def test_each_family_meets_its_own_filter_rules() -> None:
    f = BGPFilter.from_resource({"metadata": {"name": "f"}, "spec": {
        "exportV4": [{"action": "Reject", "matchOperator": "NotIn", "cidr": "10.0.0.0/8"}, {"action": "Reject"}],
        "exportV6": [{"action": "Reject", "matchOperator": "In", "cidr": "fd00:10:244::/64",
                      "prefixLength": {"min": 128, "max": 128}}]}})
    assert not evaluate((f,), "export", Route("10.244.0.0/26"), ebgp=False).accepted
    assert not evaluate((f,), "export", Route("fd00:10:244::1:5/128"), ebgp=False).accepted
    verdict = evaluate((f,), "export", Route("fd00:10:244::/122"), ebgp=False)
    assert verdict.accepted and not verdict.matched  # no V6 rule matched: Calico's default
    from bgp.filters import FilterError, render_bird_functions

    with pytest.raises(FilterError, match=r'spec.exportV6\[0\].cidr: .10.0.0.0/8. is not an IPv6 CIDR'):
        BGPFilter.from_resource({"metadata": {"name": "g"}, "spec": {"exportV6": [
            {"action": "Reject", "matchOperator": "Equal", "cidr": "10.0.0.0/8"}]}})
    text = "\n".join(render_bird_functions([f]))
    assert "function felixpy_filter_0_export6(bool is_ebgp) {\n  if (net ~ [ fd00:10:244::/64{128,128} ]) then { reject; }" in text


def test_announcer_uses_each_familys_next_hop_and_end_of_rib() -> None:
    announcer = Announcer()
    announcer.set_peers(["192.0.2.12", V6["n2"]])
    announcer.reset()
    desired = {"192.0.2.12": {"10.244.1.0/26": Attributes()}, V6["n2"]: {"fd00:10:244::/122": Attributes()}}
    hops = {4: "192.0.2.11", 6: V6["n1"]}
    commands = announcer.commands(desired, hops, refresh=["192.0.2.12", V6["n2"]])
    assert commands == [
        "neighbor 192.0.2.12 announce attributes next-hop 192.0.2.11 nlri 10.244.1.0/26",
        f"neighbor {V6['n2']} announce attributes next-hop {V6['n1']} nlri fd00:10:244::/122"]
    # A peer coming up gets its own family's routes, withdraws and End-of-RIB only.
    announcer.seen_announced({"10.244.9.0/26", "fd00:10:244::40/122"})
    up = announcer.commands(desired, hops, eor=[V6["n2"]])
    assert up == ["neighbor 192.0.2.12 withdraw attributes next-hop 192.0.2.11 nlri 10.244.9.0/26",
                  f"neighbor {V6['n2']} withdraw attributes next-hop {V6['n1']} nlri fd00:10:244::40/122",
                  f"neighbor {V6['n2']} announce attributes next-hop {V6['n1']} nlri fd00:10:244::/122",
                  f"neighbor {V6['n2']} announce eor ipv6 unicast"]
    # IPv6-only: every peer is IPv6, so one command addresses them all.
    only6 = Announcer()
    only6.set_peers([V6["n2"], V6["n3"]])
    routes = {"fd00:10:244::/122": Attributes()}
    assert only6.commands({V6["n2"]: routes, V6["n3"]: routes}, {6: V6["n1"]}) == [
        f"announce attributes next-hop {V6['n1']} nlri fd00:10:244::/122"]


def _update(peer: str, body: dict[str, object]) -> str:
    return json.dumps({"exabgp": "5.0.0", "time": 1.0, "type": "update", "neighbor": {
        "address": {"local": V6["n1"], "peer": peer}, "asn": {"local": 64512, "peer": 64512},
        "direction": "receive", "message": {"update": body}}})


def test_ipv6_updates_and_open_parse_into_the_rib() -> None:
    line = _update(V6["n2"], {"attribute": {"origin": "igp", "local-preference": 100},
                              "announce": {"ipv6 unicast": {V6["n2"]: [{"nlri": "fd00:10:244::40/122"}]}}})
    event = parse_exabgp_line(line)
    assert isinstance(event, RoutesReceived) and event.announced[0].prefix == "fd00:10:244::40/122"
    rib = Rib()
    assert rib.apply(event, now=0.0) == {"fd00:10:244::40/122": V6["n2"]}
    gone = parse_exabgp_line(_update(V6["n2"], {"withdraw": {"ipv6 unicast": [{"nlri": "fd00:10:244::40/122"}]}}))
    assert isinstance(gone, RoutesReceived) and gone.withdrawn == ("fd00:10:244::40/122",)
    assert rib.apply(gone, now=0.0) == {"fd00:10:244::40/122": None}
    open_line = json.dumps({"exabgp": "5.0.0", "time": 1.0, "type": "open", "neighbor": {
        "address": {"local": V6["n1"], "peer": V6["n2"]}, "direction": "receive", "open": {
            "router_id": "192.0.2.12", "asn": 64512, "hold_time": 90, "capabilities": {"64": {
                "name": "graceful restart", "time": 120, "address-family-flags": {"ipv6/unicast": []}}}}}})
    opened = parse_exabgp_line(open_line)
    assert isinstance(opened, OpenReceived) and opened.graceful_restart_time == 120


def test_a_global_next_hop_wins_over_the_link_local_one_sent_beside_it() -> None:
    """BIRD on the same link sends both (RFC 2545); ExaBGP lists the prefix under each."""
    body = {"announce": {"ipv6 unicast": {"fe80::1": [{"nlri": "2001:db8::/48"}], "fd00::1": [{"nlri": "2001:db8::/48"}],
                                          "fe80::2": [{"nlri": "2001:db8:1::/48"}]}}}
    event = parse_exabgp_line(_update(V6["n2"], body))
    assert isinstance(event, RoutesReceived)
    assert {r.prefix: r.next_hop for r in event.announced} == {"2001:db8::/48": "fd00::1", "2001:db8:1::/48": "fe80::2"}


def test_adj_rib_out_read_back_finds_both_families() -> None:
    lines = ["neighbor 192.0.2.12 ipv4 unicast 10.244.1.0/26 next-hop 192.0.2.11",
             f"neighbor {V6['n2']} ipv6 unicast fd00:10:244::40/122 next-hop {V6['n1']}"]
    assert parse_adj_rib_out(lines) == frozenset({"10.244.1.0/26", "fd00:10:244::40/122"})


def test_felixctl_node_status_prints_an_ipv6_table_as_calicoctl(tmp_path, capsys) -> None:
    import os

    from felixpy.ctl.main import run

    status = tmp_path / "bgp-status.json"
    peer = {"type": "mesh", "asNumber": 64512, "since": 0, "info": "", "node": "n2"}
    status.write_text(json.dumps({"node": "n1", "pid": os.getpid(), "updated": 0, "sidecar": "connected",
                                  "peers": [{**peer, "peer": "192.0.2.12", "state": "Established", "routesReceived": 1},
                                            {**peer, "peer": V6["n2"], "state": "Idle", "routesReceived": 0}]}))
    assert run(["node", "status", "--status-file", str(status)]) == 0
    out = capsys.readouterr().out
    v4, v6 = out.split("IPv6 BGP status")
    assert "IPv4 BGP status" in v4 and "192.0.2.12" in v4 and V6["n2"] not in v4
    assert f"| {V6['n2']} | node-to-node mesh | down  |" in v6 and "192.0.2.12" not in v6
    status.write_text(json.dumps({"node": "n1", "pid": os.getpid(), "updated": 0, "sidecar": "connected",
                                  "peers": [{**peer, "peer": "192.0.2.12", "state": "Established"}]}))
    run(["node", "status", "--status-file", str(status)])
    assert "IPv6 BGP status\nNo IPv6 peers found." in capsys.readouterr().out


def test_calico_node_status_has_peers_v6_and_routes_v6() -> None:
    from felixpy.node.nodestatus import PathView, Snapshot, build_status

    snapshot = Snapshot(
        speaker_ready=True, version="ExaBGP", router_id="192.0.2.11", boot_time=None, reconfigured=None,
        peers=({"peer": "192.0.2.12", "type": "mesh", "state": "Established", "since": 0.0},
               {"peer": V6["n2"], "type": "mesh", "state": "Established", "since": 0.0},
               {"peer": V6["n3"], "type": "node", "state": "Connect", "since": 0.0}),
        best=(PathView("10.244.2.0/26", "192.0.2.12", "192.0.2.12", "mesh"),
              PathView("fd00:10:244::40/122", V6["n2"], V6["n2"], "mesh")),
        others=(), own_blocks=frozenset({"fd00:10:244::/122"}))
    kernel = [{"dst": "fd00:10:244::40/122", "gateway": V6["n2"], "interface": "eth0", "type": "unicast",
               "scope": "global", "ours": True},
              {"dst": "fd00:10:244::/122", "gateway": None, "interface": None, "type": "blackhole",
               "scope": "global", "ours": True},
              {"dst": "10.244.2.0/26", "gateway": "192.0.2.12", "interface": "eth0", "type": "unicast",
               "scope": "global", "ours": True}]
    status = build_status(snapshot, ("Agent", "BGP", "Routes"), now=10.0, kernel_routes=lambda: kernel)
    assert status["agent"]["birdV6"] == status["agent"]["birdV4"]
    bgp = status["bgp"]
    assert (bgp["numberEstablishedV4"], bgp["numberNotEstablishedV4"]) == (1, 0)
    assert (bgp["numberEstablishedV6"], bgp["numberNotEstablishedV6"]) == (1, 1)
    assert [p["peerIP"] for p in bgp["peersV4"]] == ["192.0.2.12"]
    assert [(p["peerIP"], p["type"], p["state"]) for p in bgp["peersV6"]] == [
        (V6["n2"], "NodeMesh", "Established"), (V6["n3"], "NodePeer", "Connect")]
    v6 = {r["destination"]: r for r in status["routes"]["routesV6"]}
    assert v6["fd00:10:244::40/122"]["learnedFrom"] == {"sourceType": "NodeMesh", "peerIP": V6["n2"]}
    assert v6["fd00:10:244::/122"]["learnedFrom"] == {"sourceType": "Static"}
    assert [r["destination"] for r in status["routes"]["routesV4"]] == ["10.244.2.0/26"]


def test_bird_reflector_renders_ipv6_channels_and_typed_prefix_sets() -> None:
    from bgp.bird import render_bird_reflector

    nodes = [NodeInfo("rr1", "192.0.2.221", labels={"rr": "true"}, rr_cluster_id="244.0.0.1",
                      ipv6="fd00:192:0:2::221"), *_nodes()]
    spec = BGPPeerSpec("rr", node_selector="all()", peer_selector="rr == 'true'")
    peers = select_peers("rr1", nodes, BGPSettings(node_to_node_mesh=False), [spec])
    text = render_bird_reflector(router_id="192.0.2.221", as_number=64512, cluster_id="244.0.0.1", peers=peers,
                                 export_pools=["10.244.0.0/16", "fd00:10:244::/64"], listen_address="192.0.2.221",
                                 communities=(CommunityRule("fd00:10:244::/64", ("65000:6",), ()),))
    block = text[text.index("protocol bgp Node_fd00_192_0_2__11 "):]
    block = block[:block.index("\n}\n")]
    assert "  local fd00:192:0:2::221 as 64512;" in block  # bindMode NodeIP: the node's IPv6 here
    assert "  ipv6 {" in block and "ipv4 {" not in block and "rr cluster id 244.0.0.1;" in block
    assert ("  if net.type = NET_IP6 then { if net ~ [ fd00:10:244::/64+ ] then return true; }" in text)
    assert "  if net.type = NET_IP6 then { if net ~ fd00:10:244::/64 then { bgp_community.add((65000, 6)); } }" in text


def test_ipv6_service_ranges_and_local_service_addresses() -> None:
    from bgp.services import EndpointSliceInfo, ServiceInfo, ServiceSettings, service_routes

    settings = ServiceSettings.from_resource({"spec": {
        "serviceClusterIPs": [{"cidr": "10.96.0.0/12"}, {"cidr": "fd00:96::/108"}],
        "serviceLoadBalancerIPs": [{"cidr": "fd00:18::/120"}, {"cidr": "fd00:19::7"}]}})
    svc = ServiceInfo.from_object({"metadata": {"namespace": "shop", "name": "web"}, "spec": {
        "type": "LoadBalancer", "clusterIP": "10.96.0.10", "clusterIPs": ["10.96.0.10", "fd00:96::10"],
        "externalTrafficPolicy": "Local"}, "status": {"loadBalancer": {"ingress": [{"ip": "fd00:18::5"}]}}})
    v6_slice = EndpointSliceInfo.from_object({
        "metadata": {"namespace": "shop", "name": "web-v6", "labels": {"kubernetes.io/service-name": "web"}},
        "addressType": "IPv6", "endpoints": [{"addresses": ["fd00:10:244::5"], "nodeName": "n1"}]})
    here = service_routes(settings, [svc], [v6_slice], node="n1")
    assert here.announce == {"10.96.0.0/12", "fd00:96::/108", "fd00:18::/120",
                             "10.96.0.10/32", "fd00:96::10/128", "fd00:18::5/128"}
    assert "fd00:19::7/128" not in here.reject and "fd00:18::/120" in here.reject
    assert service_routes(settings, [svc], [v6_slice], node="n2").announce == {
        "10.96.0.0/12", "fd00:96::/108", "fd00:18::/120"}
