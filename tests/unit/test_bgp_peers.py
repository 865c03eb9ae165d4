"""bgp.peers: Calico's peer selection (mesh, global / node / selector peers, route reflectors)."""

from __future__ import annotations

import pytest

from bgp.peers import (BGPPeerSpec, BGPSettings, NodeInfo, PeerType, PeeringError, parse_duration,
                       protocol_name, select_peers)

N1 = NodeInfo("n1", "192.0.2.11/24", labels={"rack": "a"})
N2 = NodeInfo("n2", "192.0.2.12", labels={"rack": "b"})
N3 = NodeInfo("n3", "192.0.2.9", as_number=64999, labels={"rack": "a"})
NOIP = NodeInfo("noip", None)
RR1 = NodeInfo("rr1", "192.0.2.2", labels={"route-reflector": "true"}, rr_cluster_id="244.0.0.1")
RR2 = NodeInfo("rr2", "192.0.2.3", labels={"route-reflector": "true"}, rr_cluster_id="244.0.0.1")
TO_RR = BGPPeerSpec("to-rr", node_selector="all()", peer_selector="route-reflector == 'true'")


def addresses(peers):
    return [p.address for p in peers]


def test_default_full_mesh_skips_self_and_nodes_without_address():
    peers = select_peers("n1", [N1, N2, N3, NOIP], BGPSettings(), [])
    assert addresses(peers) == ["192.0.2.9", "192.0.2.12"]
    assert {p.type for p in peers} == {PeerType.MESH}
    by = {p.address: p for p in peers}
    assert by["192.0.2.12"].as_number == 64512  # the global default AS
    assert by["192.0.2.9"].as_number == 64999  # the node's own AS
    assert by["192.0.2.12"].name == "Mesh_192_0_2_12"
    assert by["192.0.2.12"].source_address == "192.0.2.11"
    assert by["192.0.2.12"].max_restart_time == 120


def test_mesh_passive_side_is_the_lexically_lower_ip():
    n1 = {p.address: p for p in select_peers("n1", [N1, N2, N3], BGPSettings(), [])}
    n2 = {p.address: p for p in select_peers("n2", [N1, N2, N3], BGPSettings(), [])}
    # "192.0.2.12" > "192.0.2.11": n1 waits, n2 connects; exactly one side of each pair is passive.
    assert n1["192.0.2.12"].passive and not n2["192.0.2.11"].passive
    # Lexical, like confd: "192.0.2.9" > "192.0.2.11".
    assert n1["192.0.2.9"].passive


def test_mesh_settings_password_and_restart_time():
    settings = BGPSettings(node_mesh_password="pw", node_mesh_max_restart_time=30, as_number=65100)
    (peer,) = select_peers("n1", [N1, N2], settings, [])
    assert (peer.password, peer.max_restart_time, peer.as_number) == ("pw", 30, 65100)


def test_mesh_disabled_gives_no_peers():
    assert select_peers("n1", [N1, N2], BGPSettings(node_to_node_mesh=False), []) == []


def test_global_and_node_peers():
    specs = [
        BGPPeerSpec("tor", peer_ip="198.51.100.1", as_number=65001, password="x", max_restart_time=0),
        BGPPeerSpec("only-n2", node="n2", peer_ip="198.51.100.2", as_number=65002),
        BGPPeerSpec("rack-a", node_selector="rack == 'a'", peer_ip="198.51.100.3:1179", as_number=65003,
                    source_address="None", keep_original_next_hop=True),
    ]
    peers = {p.address: p for p in select_peers("n1", [N1, N2], BGPSettings(node_to_node_mesh=False), specs)}
    assert sorted(peers) == ["198.51.100.1", "198.51.100.3"]
    tor = peers["198.51.100.1"]
    assert (tor.type, tor.name, tor.password, tor.max_restart_time) == (PeerType.GLOBAL, "Global_198_51_100_1", "x", 0)
    assert not tor.passive and not tor.rr_client
    rack = peers["198.51.100.3"]
    assert (rack.type, rack.port, rack.source_address, rack.keep_original_next_hop) == (PeerType.NODE, 1179, None, True)
    assert rack.name == "Node_198_51_100_3_port_1179"


def test_explicit_peer_beats_mesh_for_the_same_address():
    spec = BGPPeerSpec("n2-direct", node="n1", peer_ip="192.0.2.12", as_number=64512, password="pw")
    (peer,) = select_peers("n1", [N1, N2], BGPSettings(), [spec])
    assert (peer.type, peer.password) == (PeerType.NODE, "pw")


def test_peer_with_own_address_is_skipped():
    spec = BGPPeerSpec("self", peer_ip="192.0.2.11", as_number=64512)
    assert select_peers("n1", [N1], BGPSettings(), [spec]) == []


def test_route_reflector_client_peers_with_all_reflectors_only():
    nodes = [N1, N2, RR1, RR2]
    settings = BGPSettings(node_to_node_mesh=False)
    peers = select_peers("n1", nodes, settings, [TO_RR])
    assert addresses(peers) == ["192.0.2.2", "192.0.2.3"]
    assert {p.type for p in peers} == {PeerType.REFLECTOR}
    assert not any(p.rr_client for p in peers)


def test_reflector_reflects_to_clients_and_plain_ibgp_with_same_cluster():
    peers = {p.address: p for p in select_peers("rr1", [N1, N2, RR1, RR2], BGPSettings(node_to_node_mesh=False),
                                                [TO_RR])}
    assert list(peers) == ["192.0.2.3", "192.0.2.11", "192.0.2.12"]  # sorted by address; reverse peering finds the clients
    assert peers["192.0.2.11"].rr_client and peers["192.0.2.12"].rr_client
    assert not peers["192.0.2.3"].rr_client  # same cluster ID: plain iBGP
    assert peers["192.0.2.3"].type == PeerType.NODE


def test_reflectors_never_join_the_mesh_and_mesh_skips_them():
    nodes = [N1, N2, RR1, RR2]
    assert select_peers("rr1", nodes, BGPSettings(), []) == []
    assert addresses(select_peers("n1", nodes, BGPSettings(), [])) == ["192.0.2.12"]


def test_reflector_with_other_cluster_treats_reflector_as_client():
    other = NodeInfo("rr9", "192.0.2.4", rr_cluster_id="244.0.0.9", labels={"route-reflector": "true"})
    peers = {p.address: p for p in select_peers("rr1", [RR1, other], BGPSettings(node_to_node_mesh=False), [TO_RR])}
    assert peers["192.0.2.4"].rr_client and peers["192.0.2.4"].type == PeerType.REFLECTOR


def test_ebgp_peer_is_never_an_rr_client():
    spec = BGPPeerSpec("tor", peer_ip="198.51.100.1", as_number=65001)
    (peer,) = select_peers("rr1", [RR1], BGPSettings(), [spec])
    assert not peer.rr_client


@pytest.mark.parametrize("spec, message", [
    (BGPPeerSpec("b", peer_ip="300.1.1.1", as_number=1), 'BGPPeer "b": spec.peerIP'),
    (BGPPeerSpec("b", peer_ip="192.0.2.1"), "asNumber is required"),
    (BGPPeerSpec("b"), "exactly one of"),
    (BGPPeerSpec("b", node="n1", node_selector="all()", peer_ip="192.0.2.1", as_number=1), "mutually exclusive"),
    (BGPPeerSpec("b", peer_selector="a ==", as_number=1), 'BGPPeer "b": selector'),
    (BGPPeerSpec("b", peer_ip="192.0.2.1", as_number=1, source_address="Bogus"), "sourceAddress"),
])
def test_invalid_peers_raise_one_line_errors(spec, message):
    with pytest.raises(PeeringError, match=message.replace("(", r"\(")) as info:
        select_peers("n1", [N1], BGPSettings(), [spec])
    assert "\n" not in str(info.value)


def test_unknown_node_is_an_error():
    with pytest.raises(PeeringError, match='Node "nx"'):
        select_peers("nx", [N1], BGPSettings(), [])


def test_from_resources():
    node = NodeInfo.from_resource({"metadata": {"name": "n1", "labels": {"a": "b"}},
                                   "spec": {"bgp": {"ipv4Address": "192.0.2.11/24", "asNumber": "1.10",
                                                    "routeReflectorClusterID": "244.0.0.1"}}})
    assert node == NodeInfo("n1", "192.0.2.11", 65546, {"a": "b"}, "244.0.0.1")
    settings = BGPSettings.from_resource({"spec": {"nodeToNodeMeshEnabled": False, "asNumber": 65000,
                                                   "nodeMeshMaxRestartTime": "2m0s"}})
    assert settings == BGPSettings(False, 65000, None, 120)
    assert BGPSettings.from_resource(None) == BGPSettings()
    peer = BGPPeerSpec.from_resource({"metadata": {"name": "p"}, "spec": {
        "peerIP": "192.0.2.1", "asNumber": 65001, "maxRestartTime": "90s", "keepOriginalNextHop": True}},
        password="pw")
    assert (peer.peer_ip, peer.as_number, peer.max_restart_time, peer.keep_original_next_hop, peer.password) == \
        ("192.0.2.1", 65001, 90, True, "pw")


def test_parse_duration():
    assert parse_duration("120s") == 120
    assert parse_duration("1h2m3s") == 3723
    assert parse_duration(45) == 45
    assert parse_duration(None) is None
    with pytest.raises(PeeringError):
        parse_duration("soon")


def test_protocol_names():
    assert protocol_name(PeerType.MESH, "192.0.2.1") == "Mesh_192_0_2_1"
    assert protocol_name(PeerType.REFLECTOR, "2001:db8::1", 1179) == "Node_2001_db8__1_port_1179"


def test_bgp_package_imports_no_felixpy():
    """felixpy imports bgp, never the reverse; bgp may use the pure policy package (selectors)."""
    import ast
    import pathlib

    root = pathlib.Path(__file__).resolve().parents[2] / "bgp"
    for path in root.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [node.module] if isinstance(node, ast.ImportFrom) and node.module else [])
            assert not any(n == "felixpy" or n.startswith("felixpy.") for n in names), path


def test_listen_port_global_and_per_node():
    default = {"spec": {"listenPort": 1179}}
    node_configs = {"n2": {"metadata": {"name": "node.n2"}, "spec": {"listenPort": 2179, "bindMode": "NodeIP"}}}
    settings = BGPSettings.from_resource(default, node_configs=node_configs)
    assert settings.listen_port_of("n1") == 1179 and settings.listen_port_of("n2") == 2179
    assert settings.bind_mode_of("n2") == "NodeIP" and settings.bind_mode_of("n1") == "None"
    (peer,) = select_peers("n1", [N1, N2], settings, [])
    # n1 connects to n2's port and listens on its own.
    assert (peer.port, peer.listen_port, peer.name) == (2179, 1179, "Mesh_192_0_2_12_port_2179")
    with pytest.raises(PeeringError, match='BGPConfiguration "default": spec.listenPort'):
        BGPSettings.from_resource({"spec": {"listenPort": 70000}})


def test_reverse_peering_manual_needs_the_other_side_configured():
    manual = BGPPeerSpec("to-rr", node_selector="all()", peer_selector="route-reflector == 'true'",
                         reverse_peering="Manual")
    settings = BGPSettings(node_to_node_mesh=False)
    assert addresses(select_peers("n1", [N1, RR1], settings, [manual])) == ["192.0.2.2"]
    assert select_peers("rr1", [N1, RR1], settings, [manual]) == []  # Auto would give it n1
    assert addresses(select_peers("rr1", [N1, RR1], settings, [TO_RR])) == ["192.0.2.11"]


def test_per_session_fields_travel_on_the_peer():
    spec = BGPPeerSpec.from_resource({"metadata": {"name": "tor"}, "spec": {
        "peerIP": "198.51.100.1", "asNumber": 65001, "localASNumber": 65100, "keepaliveTime": "10s",
        "ttlSecurity": 2, "numAllowedLocalASNumbers": 1, "reachableBy": "192.0.2.254", "filters": ["a", "b"],
        "nextHopMode": "Self"}})
    (peer,) = select_peers("n1", [N1], BGPSettings(), [spec])
    assert (peer.local_as, peer.keepalive_time, peer.ttl_security, peer.num_allowed_local_as, peer.reachable_by,
            peer.filters, peer.next_hop_mode) == (65100, 10, 2, 1, "192.0.2.254", ("a", "b"), "Self")
    assert peer.is_ebgp(64512) and peer.local_as_for(64512) == 65100
    ibgp = BGPPeerSpec("ibgp-with-local-as", peer_ip="198.51.100.2", as_number=65100, local_as_number=65100)
    assert not select_peers("n1", [N1], BGPSettings(), [ibgp])[0].is_ebgp(64512)
    with pytest.raises(PeeringError, match="spec.reachableBy"):
        select_peers("n1", [N1], BGPSettings(), [BGPPeerSpec("x", peer_ip="198.51.100.3", as_number=1,
                                                            reachable_by="nope")])
