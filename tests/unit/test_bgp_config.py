"""bgp.config (ExaBGP) and bgp.bird (BIRD reflector) rendering, checked as text."""

from __future__ import annotations

import base64

import pytest

from bgp.bird import render_bird_reflector
from bgp.config import SpeakerConfig, render_exabgp_conf, render_exabgp_env, sidecar_command
from bgp.peers import Peer, PeerType

MESH = Peer("192.0.2.12", 64512, PeerType.MESH, "Mesh_192_0_2_12", source_address="192.0.2.11", passive=True)
TOR = Peer("198.51.100.1", 65001, PeerType.GLOBAL, "Global_198_51_100_1", port=1179, password='p"w d',
           source_address=None, max_restart_time=0)


def speaker(*peers: Peer) -> SpeakerConfig:
    return SpeakerConfig(node_name="n1", router_id="192.0.2.11", local_address="192.0.2.11", as_number=64512,
                         peers=peers, sidecar_socket="/run/felixpy/bgp.sock", python="/usr/bin/python3")


def test_mesh_neighbor_renders_exactly():
    text = render_exabgp_conf(speaker(MESH))
    assert text == """\
# ExaBGP configuration for node n1, rendered by felixpy (bgp.config). Do not edit.
process felixpy-sidecar {
    run /usr/bin/python3 -m bgp.sidecar --socket /run/felixpy/bgp.sock;
    encoder json;
}

neighbor 192.0.2.12 {
    description "Mesh_192_0_2_12 mesh";
    router-id 192.0.2.11;
    local-address 192.0.2.11;
    local-as 64512;
    peer-as 64512;
    hold-time 90;
    listen 179;
    passive true;
    manual-eor true;
    family {
        ipv4 unicast;
    }
    capability {
        route-refresh;
        graceful-restart 120;
    }
    api {
        processes [ felixpy-sidecar ];
        neighbor-changes;
        receive {
            parsed;
            update;
            open;
        }
    }
}
"""


def test_password_port_no_source_and_no_graceful_restart():
    text = render_exabgp_conf(speaker(TOR))
    encoded = base64.b64encode('p"w d'.encode()).decode()
    assert f"md5-password {encoded};" in text
    assert "md5-base64 true;" in text
    assert "connect 1179;" in text
    assert "local-address" not in text
    assert "graceful-restart" not in text and "manual-eor" not in text
    assert "passive" not in text


def test_rendering_is_deterministic_and_sorted():
    assert render_exabgp_conf(speaker(TOR, MESH)) == render_exabgp_conf(speaker(MESH, TOR))
    text = render_exabgp_conf(speaker(TOR, MESH))
    assert text.index("neighbor 192.0.2.12") < text.index("neighbor 198.51.100.1")


def test_bad_values_are_refused():
    with pytest.raises(ValueError, match="run line"):
        sidecar_command("/usr/bin/python3", "/tmp/my socket")
    with pytest.raises(ValueError, match="80 bytes"):
        render_exabgp_conf(speaker(Peer("192.0.2.1", 1, PeerType.GLOBAL, "G", password="x" * 81)))
    with pytest.raises(ValueError):
        render_exabgp_conf(SpeakerConfig("n1", "not-an-ip", "192.0.2.11", 64512, (), "/s"))


def test_env_file_keeps_the_helper_privileged_and_acks_on():
    env = render_exabgp_env(log_destination="/var/log/exabgp.log")
    for line in ("user = 'root'", "drop = false", "daemonize = false", "ack = true", "encoder = json",
                 "cli = false", "level = WARNING", "destination = '/var/log/exabgp.log'"):
        assert line in env.splitlines()
    with pytest.raises(ValueError):
        render_exabgp_env(log_level="LOUD")


CLIENT = Peer("192.0.2.11", 64512, PeerType.NODE, "Node_192_0_2_11", rr_client=True, password="pw",
              source_address="192.0.2.2")
TWIN = Peer("192.0.2.3", 64512, PeerType.NODE, "Node_192_0_2_3", passive=True, max_restart_time=0,
            source_address="192.0.2.2")
EBGP = Peer("198.51.100.1", 65001, PeerType.GLOBAL, "Global_198_51_100_1", source_address="192.0.2.2")


def test_bird_reflector_renders_clients_and_plain_peers():
    text = render_bird_reflector(router_id="192.0.2.2", as_number=64512, cluster_id="244.0.0.1",
                                 peers=[EBGP, CLIENT, TWIN], log_file="/tmp/rr.log")
    assert "protocol kernel" not in text
    assert 'log "/tmp/rr.log" all;' in text and "router id 192.0.2.2;" in text
    assert "error wait time 5, 30;" in text
    client = text[text.index("protocol bgp Node_192_0_2_11"):].split("\n}\n")[0]
    assert client == """\
protocol bgp Node_192_0_2_11 from felixpy_template {
  description "node";
  local 192.0.2.2 as 64512;
  neighbor 192.0.2.11 as 64512;
  direct;
  rr client;
  rr cluster id 244.0.0.1;
  password "pw";
  graceful restart on;
  graceful restart time 120;
  ipv4 {
    import all;
    export filter { if source = RTS_BGP then accept; reject; };
    next hop keep;
    gateway direct;
  };"""
    twin = text[text.index("protocol bgp Node_192_0_2_3"):].split("\n}\n")[0]
    assert "rr client" not in twin and "passive on;" in twin and "graceful restart off;" in twin
    ebgp = text[text.index("protocol bgp Global_198_51_100_1"):].split("\n}\n")[0]
    assert "next hop self;" in ebgp and "rr client" not in ebgp
    # Sorted by address, deterministic.
    assert text.index("Node_192_0_2_3 ") < text.index("Node_192_0_2_11 ") < text.index("Global_198_51_100_1 ")
    assert text == render_bird_reflector(router_id="192.0.2.2", as_number=64512, cluster_id="244.0.0.1",
                                         peers=[TWIN, EBGP, CLIENT], log_file="/tmp/rr.log")


def test_bird_multihop_uses_recursive_gateway_and_direct_routes():
    text = render_bird_reflector(router_id="192.0.2.2", as_number=64512, cluster_id=None, peers=[EBGP],
                                 multihop=True)
    assert "multihop;" in text and "gateway recursive;" in text
    assert 'protocol direct { ipv4; interface -"cali*", -"kube-ipvs*", "*"; }' in text


def test_bird_refuses_unquotable_password_and_client_without_cluster():
    with pytest.raises(ValueError, match="double quote"):
        render_bird_reflector(router_id="192.0.2.2", as_number=64512, cluster_id="244.0.0.1",
                              peers=[Peer("192.0.2.11", 64512, PeerType.NODE, "N", password='a"b')])
    with pytest.raises(ValueError, match="cluster ID"):
        render_bird_reflector(router_id="192.0.2.2", as_number=64512, cluster_id=None, peers=[CLIENT])


def test_exabgp_local_as_gtsm_keepalive_and_listen_port():
    peer = Peer("198.51.100.1", 65001, PeerType.NODE, "Node_198_51_100_1", source_address="192.0.2.11",
                local_as=65100, ttl_security=2, keepalive_time=10, listen_port=1179, passive=True)
    text = render_exabgp_conf(speaker(peer))
    assert "local-as 65100;" in text and "peer-as 65001;" in text
    assert "incoming-ttl 254;" in text  # GTSM: at most 2 hops away
    assert "hold-time 30;" in text  # keepalives every 10 s: ExaBGP sends them every hold time / 3
    # A GTSM session is connected out only (the listening socket is shared by every neighbour).
    assert "listen" not in text and "passive" not in text
    plain = render_exabgp_conf(speaker(Peer("192.0.2.12", 64512, PeerType.MESH, "M", source_address="192.0.2.11",
                                            listen_port=1179)))
    assert "listen 1179;" in plain


def test_bird_renders_the_per_session_fields():
    peers = [
        Peer("198.51.100.1", 65001, PeerType.NODE, "Tor", local_as=65100, ttl_security=2, keepalive_time=10,
             num_allowed_local_as=1, next_hop_mode="Keep"),
        Peer("192.0.2.11", 64512, PeerType.NODE, "Client", rr_client=True, next_hop_mode="Self"),
        Peer("192.0.2.3", 64512, PeerType.NODE, "Twin", remote_cluster_id="244.0.0.1"),
        Peer("198.51.100.9", 65009, PeerType.GLOBAL, "Ebgp"),
    ]
    text = render_bird_reflector(router_id="192.0.2.2", as_number=64512, cluster_id="244.0.0.1", peers=peers,
                                 listen_address="192.0.2.2", listen_port=1179, multihop=True,
                                 ignored_interfaces=["eth9"])

    def block(name: str) -> str:
        return text[text.index(f"protocol bgp {name} "):].split("\n}\n")[0]

    tor = block("Tor")
    for line in ("local 192.0.2.2 port 1179 as 65100;", "ttl security on;", "multihop 2;", "keepalive time 10;",
                 "allow local as 1;", "next hop keep;"):
        assert line in tor, line
    assert "next hop self;" in block("Client") and "rr cluster id 244.0.0.1;" in block("Client")
    twin = block("Twin")  # another reflector of the cluster: plain iBGP, as in Calico
    assert "rr cluster id" not in twin and "rr client;" not in twin
    assert "next hop self;" in block("Ebgp")  # Auto on eBGP
    assert "strict bind yes;" in text  # bindMode NodeIP
    assert 'protocol direct { ipv4; interface -"eth9", -"cali*", -"kube-ipvs*", "*"; }' in text
    anywhere = render_bird_reflector(router_id="192.0.2.2", as_number=64512, cluster_id=None, peers=peers[3:])
    assert "strict bind" not in anywhere and " port " not in anywhere  # bindMode None, port 179


def test_bird_source_address_none_and_reachable_by():
    peers = [Peer("198.51.100.1", 65001, PeerType.GLOBAL, "Tor", reachable_by="192.0.2.1"),  # sourceAddress None
             Peer("192.0.2.11", 64512, PeerType.NODE, "Client", rr_client=True, source_address="192.0.2.2")]
    text = render_bird_reflector(router_id="192.0.2.2", as_number=64512, cluster_id="244.0.0.1", peers=peers)
    tor = text[text.index("protocol bgp Tor "):].split("\n}\n")[0]
    assert "  local as 64512;" in tor  # no address: the kernel picks the source, as confd renders None
    assert "local 192.0.2.2 as 64512;" in text[text.index("protocol bgp Client "):]
    # reachableBy: a dedicated reflector's BIRD programs the /32 to the peer, and nothing else.
    assert "route 198.51.100.1/32 via 192.0.2.1;" in text
    assert 'export where proto = "felixpy_reachable_by";' in text and "No kernel protocol" not in text
    # On a node with pods the agent programs it with the node's other routes: BIRD stays out of the FIB.
    local = Peer("127.0.0.2", 64512, PeerType.LOCAL, "Local_Agent", port=1790, source_address="192.0.2.2",
                 rr_client=True)
    node = render_bird_reflector(router_id="192.0.2.2", as_number=64512, cluster_id="244.0.0.1",
                                 peers=[*peers, local])
    assert "protocol kernel" not in node and "reachable_by" not in node


def test_bird_exports_what_calicos_filter_lets_out():
    peers = [Peer("192.0.2.11", 64512, PeerType.NODE, "Client", rr_client=True),
             Peer("127.0.0.2", 64512, PeerType.LOCAL, "Local_Agent", port=1790, source_address="192.0.2.2",
                  rr_client=True)]
    text = render_bird_reflector(router_id="192.0.2.2", as_number=64512, cluster_id="244.0.0.1", peers=peers,
                                 export_pools=["10.244.0.0/16"], no_export_pools=["10.99.0.0/16"],
                                 service_cidrs=["198.18.0.0/24"])
    assert "if net ~ [ 10.99.0.0/16+ ] then return false;" in text
    assert "if net ~ [ 10.244.0.0/16+ ] then return true;" in text
    assert "if net ~ [ 198.18.0.0/24+ ] then return true;" in text
    client = text[text.index("protocol bgp Client "):].split("\n}\n")[0]
    assert ('export filter { if proto = "Local_Agent" then { accept; } '
            "if source = RTS_BGP && felixpy_calico_route() then { accept; } reject; };") in client
    local = text[text.index("protocol bgp Local_Agent "):].split("\n}\n")[0]
    assert "export filter { if source = RTS_BGP then accept; reject; };" in local  # the kernel's stand-in
    assert "preference 200;" in local and "rr client;" in local and "rr cluster id" not in local
