"""BGP over IPv6 through the agent's real BGPController against real peers: a BIRD 2 ToR and a
FRR router on IPv6 addresses, reached by BGPPeers with an IPv6 peerIP, and a second felixpy node
in a dual-stack mesh.

  n1 192.0.2.11 / fd00:192:0:2::11, n2 .12 / ::12   AS 64512, mesh (an IPv4 and an IPv6 session)
  tor fd00:192:0:2::1   BIRD 2, AS 65001, ipv6 channel: originates 2001:db8:100::/48
  frr fd00:192:0:2::3   FRR, AS 65003, address-family ipv6 unicast

Checked on the wire: the IPv6 sessions establish (ExaBGP `family ipv6 unicast` from the node's
IPv6 address), n1's IPv6 block reaches BIRD and FRR with n1's IPv6 next hop and its
prefixAdvertisement community, its IPv4 block does not (no IPv6 NLRI on IPv4 sessions and no
IPv4 on IPv6 ones), and the ToR's IPv6 prefix is learned by n1 via the ToR's IPv6 address.
"""

from __future__ import annotations

import os
from typing import Any, Iterator

import pytest

from felixpy.datastore import keys
from felixpy.datastore.syncer import KVUpdate
from tests.integration.bgplab import (FRR_BGPD, HAVE_BIRD, HAVE_EXABGP, HAVE_FRR, AgentNode, Lab, bird_route,
                                      frr_json, sh, wait_pumping)

pytestmark = [pytest.mark.root, pytest.mark.skipif(os.geteuid() != 0, reason="needs root")]
if not (HAVE_EXABGP and HAVE_BIRD and HAVE_FRR):
    pytestmark.append(pytest.mark.skip(reason="needs exabgp in the venv, bird2 and frr"))

N1, N2, TOR4, FRR4 = "192.0.2.11", "192.0.2.12", "192.0.2.1", "192.0.2.3"
N1_6, N2_6, TOR6, FRR6 = "fd00:192:0:2::11", "fd00:192:0:2::12", "fd00:192:0:2::1", "fd00:192:0:2::3"
BLOCK6, BLOCK4, TOR_PREFIX = "fd00:10:244::40/122", "10.244.1.0/26", "2001:db8:100::/48"
BLOCK6_HIDDEN, TOR_REJECTED = "fd00:10:244::c0/122", "2001:db8:200::/48"  # BGPFilter V6 rules

TOR_CONF = """
log "{log}" all;
router id 192.0.2.1;
protocol device {{ scan time 10; }}
protocol static originated {{
  ipv6;
  route 2001:db8:100::/48 blackhole;
  route 2001:db8:200::/48 blackhole;
}}
protocol bgp n1 {{
  local fd00:192:0:2::1 as 65001;
  neighbor fd00:192:0:2::11 as 64512;
  direct;
  connect delay time 1;
  error wait time 1, 5;
  ipv6 {{ import all; export where proto = "originated"; next hop self; }};
}}
"""

FRR_CONF = """
hostname frr
router bgp 65003
 bgp router-id 192.0.2.3
 no bgp ebgp-requires-policy
 no bgp default ipv4-unicast
 neighbor fd00:192:0:2::11 remote-as 64512
 neighbor fd00:192:0:2::11 timers connect 1
 address-family ipv6 unicast
  neighbor fd00:192:0:2::11 activate
 exit-address-family
"""


def resource(plural: str, name: str, spec: dict[str, Any], kind: str) -> KVUpdate:
    return KVUpdate(keys.resource_key(plural, name), {"apiVersion": "projectcalico.org/v3", "kind": kind,
                                                      "metadata": {"name": name}, "spec": spec}, 1)


def node(name: str, ip: str, ip6: str) -> KVUpdate:
    return resource("nodes", name, {"bgp": {"ipv4Address": f"{ip}/24", "ipv6Address": f"{ip6}/64"}}, "Node")


CLUSTER = [
    node("n1", N1, N1_6), node("n2", N2, N2_6),
    resource("bgpconfigurations", "default", {
        "prefixAdvertisements": [{"cidr": "fd00:10:244::/64", "communities": ["65000:6"]}]}, "BGPConfiguration"),
    resource("bgpfilters", "edge6", {
        "importV6": [{"action": "Reject", "matchOperator": "Equal", "cidr": TOR_REJECTED}],
        "exportV6": [{"action": "Reject", "matchOperator": "Equal", "cidr": BLOCK6_HIDDEN}],
        "exportV4": [{"action": "Reject", "matchOperator": "In", "cidr": "0.0.0.0/0"}],
    }, "BGPFilter"),
    resource("bgppeers", "tor6", {"node": "n1", "peerIP": TOR6, "asNumber": 65001, "filters": ["edge6"]},
             "BGPPeer"),
    resource("bgppeers", "frr6", {"node": "n1", "peerIP": f"[{FRR6}]:179", "asNumber": 65003,
                                  "filters": ["edge6"]}, "BGPPeer"),
]


def add_v6(ns: str, address: str) -> None:
    sh("ip", "-n", ns, "addr", "add", f"{address}/64", "dev", "eth0", "nodad")


class V6Lab:
    def __init__(self, lab: Lab, n1: AgentNode, n2: AgentNode, tor_ctl: str, frr_ns: str, frr_vty: str) -> None:
        self.lab, self.n1, self.n2, self.tor_ctl, self.frr_ns, self.frr_vty = lab, n1, n2, tor_ctl, frr_ns, frr_vty

    def wait(self, what: str, predicate: Any, timeout: float = 30.0) -> Any:
        return wait_pumping([self.n1, self.n2], what, predicate, timeout)

    def frr(self, command: str) -> Any:
        return frr_json(self.frr_ns, self.frr_vty, command)


@pytest.fixture(scope="module")
def v6lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[V6Lab]:
    lab = Lab(tmp_path_factory.mktemp("bgp6"))
    agents: list[AgentNode] = []
    try:
        tor_ns = lab.host("tor", TOR4)
        add_v6(tor_ns, TOR6)
        _, tor_ctl = lab.bird("tor", tor_ns, TOR_CONF.format(log=lab.dir("tor") / "bird.log"))
        frr_ns = lab.host("frr", FRR4)
        add_v6(frr_ns, FRR6)
        d = lab.dir("frr")
        (d / "frr.conf").write_text(FRR_CONF)
        lab.daemons.start(frr_ns, [FRR_BGPD, "-Z", "-n", "-S", "-f", str(d / "frr.conf"), "-i", str(d / "bgpd.pid"),
                                   "--vty_socket", str(d), "-P", "0", "-l", FRR6], d / "bgpd.out")
        n1 = AgentNode(lab, "n1", N1)
        agents.append(n1)
        n2 = AgentNode(lab, "n2", N2)
        agents.append(n2)
        add_v6(n1.ns, N1_6)
        add_v6(n2.ns, N2_6)
        for agent in (n1, n2):
            agent.feed(*CLUSTER)
        n1.ctl.set_announcements({BLOCK6, BLOCK6_HIDDEN, BLOCK4})
        n2.ctl.set_announcements({"fd00:10:244::80/122"})
        yield V6Lab(lab, n1, n2, tor_ctl, frr_ns, str(d))
    finally:
        for agent in agents:
            agent.close()
        lab.close()


def test_ipv6_sessions_to_bird_frr_and_the_mesh_peer(v6lab: V6Lab) -> None:
    n1 = v6lab.n1
    v6lab.wait("n1's sessions", lambda: all(n1.session_up(p) for p in (N2, N2_6, TOR6, FRR6)), timeout=40)
    conf = (n1.dir / "exabgp.conf").read_text()
    tor = conf[conf.index(f"neighbor {TOR6} {{"):]
    assert f"local-address {N1_6};" in tor[:tor.index("\n}\n")] and "ipv6 unicast;" in tor[:tor.index("\n}\n")]


def test_ipv6_block_reaches_bird_and_frr_with_the_ipv6_next_hop_and_community(v6lab: V6Lab) -> None:
    route = v6lab.wait("BIRD learns n1's IPv6 block", lambda: BLOCK6 in bird_route(v6lab.tor_ctl, BLOCK6)
                       and bird_route(v6lab.tor_ctl, BLOCK6))
    assert f"BGP.next_hop: {N1_6}" in route and "(65000,6)" in route, route
    assert "Network not found" in bird_route(v6lab.tor_ctl, BLOCK4) or BLOCK4 not in bird_route(v6lab.tor_ctl, BLOCK4)

    def frr_path() -> Any:
        paths = v6lab.frr(f"show bgp ipv6 unicast {BLOCK6} json").get("paths") or []
        return paths[0] if paths else None

    path = v6lab.wait("FRR learns n1's IPv6 block", frr_path)
    hops = [h.get("ip") for h in path.get("nexthops") or []]
    assert N1_6 in hops, path
    assert path["community"]["string"] == "65000:6"
    # The mesh peer has it over the IPv6 session, the IPv4 block over the IPv4 one.
    v6lab.wait("n2 learns both blocks", lambda: v6lab.n2.ctl.rib.best(BLOCK6) is not None
               and v6lab.n2.ctl.rib.best(BLOCK4) is not None)
    assert v6lab.n2.ctl.rib.best(BLOCK6).peer == N1_6  # type: ignore[union-attr]
    assert v6lab.n2.ctl.rib.best(BLOCK4).peer == N1  # type: ignore[union-attr]


def test_tor_ipv6_prefix_is_learned_via_the_tors_ipv6_address(v6lab: V6Lab) -> None:
    v6lab.wait("n1 learns the ToR's prefix", lambda: TOR_PREFIX in v6lab.n1.ctl.learned_routes())
    assert v6lab.n1.ctl.learned_routes()[TOR_PREFIX] == TOR6
    assert v6lab.n1.ctl.learned_routes()["fd00:10:244::80/122"] == N2_6


def test_ipv6_filter_rules_on_the_wire(v6lab: V6Lab) -> None:
    """BGPFilter exportV6 keeps one IPv6 block from the filtered sessions (BIRD, FRR) but not from
    the mesh peer; importV6 keeps one of the ToR's IPv6 prefixes out of n1's routes; the V4 rules
    (reject everything) touch no IPv6 route."""
    v6lab.wait("n2 learns the block the filter hides from the ToR", lambda: v6lab.n2.ctl.rib.best(BLOCK6_HIDDEN))
    v6lab.wait("FRR learns n1's other IPv6 block",
               lambda: v6lab.frr(f"show bgp ipv6 unicast {BLOCK6} json").get("paths"))
    v6lab.wait("BIRD learns n1's other IPv6 block", lambda: BLOCK6 in bird_route(v6lab.tor_ctl, BLOCK6))
    assert not v6lab.frr(f"show bgp ipv6 unicast {BLOCK6_HIDDEN} json").get("paths")
    assert BLOCK6_HIDDEN not in bird_route(v6lab.tor_ctl, BLOCK6_HIDDEN)
    v6lab.wait("n1 received the rejected ToR prefix", lambda: TOR_REJECTED in v6lab.n1.ctl.rib.received(TOR6))
    assert TOR_REJECTED not in v6lab.n1.ctl.learned_routes() and TOR_PREFIX in v6lab.n1.ctl.learned_routes()


def test_bird_reflector_with_ipv6_filter_functions_parses(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from bgp.bird import render_bird_reflector
    from bgp.filters import BGPFilter
    from bgp.peers import BGPPeerSpec, BGPSettings, NodeInfo, select_peers

    edge = BGPFilter.from_resource({"metadata": {"name": "edge6"}, "spec": CLUSTER[2].value["spec"]})
    nodes = [NodeInfo("rr1", "192.0.2.221", labels={"rr": "true"}, rr_cluster_id="244.0.0.1",
                      ipv6="fd00:192:0:2::221"), NodeInfo("n1", N1, ipv6=N1_6)]
    peers = select_peers("rr1", nodes, BGPSettings(node_to_node_mesh=False),
                         [BGPPeerSpec("rr", node_selector="all()", peer_selector="rr == 'true'", filters=("edge6",))])
    text = render_bird_reflector(router_id="192.0.2.221", as_number=64512, cluster_id="244.0.0.1", peers=peers,
                                 filters=[edge], export_pools=["10.244.0.0/16", "fd00:10:244::/64"])
    assert "felixpy_filter_0_export6(false);" in text and "felixpy_filter_0_import6(false);" in text
    conf = tmp_path / "bird.conf"
    conf.write_text(text)
    sh("bird", "-p", "-c", str(conf))
