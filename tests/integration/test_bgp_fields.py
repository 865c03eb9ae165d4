"""Calico's BGP fields through the agent's real BGPController, against real FRR, GoBGP and BIRD peers.

Two felixpy nodes (ExaBGP + sidecar, each driven by a BGPController fed datastore updates, as the
agent's loop feeds it) in a mesh, and three top-of-rack style peers on the same segment:

  n1 .11, n2 .12   AS 64512, node-to-node mesh
  tor .1           BIRD 2, AS 65001: originates 198.51.100.0/24, 203.0.113.0/24 and 100.64.0.0/24
                   (the last with our AS 64512 in its path)
  frr .3           FRR, AS 65003, expects n1 as AS 65100 (localASNumber)
  gobgp .4         GoBGP, AS 65004, GTSM (ttl-security, minimum TTL 255)

What is checked on the wire: prefixAdvertisement communities (standard and large), localASNumber,
keepaliveTime (as the hold time ExaBGP offers), ttlSecurity (GoBGP only accepts TTL 255),
BGPFilter export (the ToR does not get a block) and import (n1 keeps a ToR prefix out of its
routes), numAllowedLocalASNumbers, reachableBy, and Service advertisement (the cluster-IP and
LoadBalancer ranges, and a Local service's /32 following its endpoint).
"""

from __future__ import annotations

import json
import os
from typing import Any, Iterator

import pytest

from felixpy.datastore import keys
from felixpy.datastore.syncer import KVUpdate
from tests.integration.bgplab import (FRR_BGPD, HAVE_BIRD, HAVE_EXABGP, HAVE_FRR, HAVE_GOBGP, AgentNode, Lab,
                                      bird_route, frr_json, sh, wait_pumping)

pytestmark = [pytest.mark.root, pytest.mark.skipif(os.geteuid() != 0, reason="needs root")]
if not (HAVE_EXABGP and HAVE_BIRD and HAVE_FRR and HAVE_GOBGP):
    pytestmark.append(pytest.mark.skip(reason="needs exabgp in the venv, bird2, frr and gobgpd"))

N1, N2, TOR, FRR, GOBGP = "192.0.2.11", "192.0.2.12", "192.0.2.1", "192.0.2.3", "192.0.2.4"
BLOCK_FILTERED, BLOCK = "10.244.1.0/26", "10.244.11.0/26"

TOR_CONF = """
log "{log}" all;
router id 192.0.2.1;
protocol device {{ scan time 10; }}
protocol static originated {{
  ipv4;
  route 198.51.100.0/24 blackhole;
  route 203.0.113.0/24 blackhole;
  route 100.64.0.0/24 blackhole;
}}
template bgp node {{
  local 192.0.2.1 as 65001;
  direct;
  connect delay time 1;
  error wait time 1, 5;
  ipv4 {{
    import all;
    export filter {{
      if proto = "originated" then {{ if net = 100.64.0.0/24 then bgp_path.prepend(64512); accept; }}
      reject;
    }};
    next hop self;
  }};
}}
protocol bgp n1 from node {{ neighbor 192.0.2.11 as 64512; }}
protocol bgp n2 from node {{ neighbor 192.0.2.12 as 64512; }}
"""

FRR_CONF = """
hostname frr
router bgp 65003
 bgp router-id 192.0.2.3
 no bgp ebgp-requires-policy
 neighbor 192.0.2.11 remote-as 65100
 neighbor 192.0.2.11 timers connect 1
 address-family ipv4 unicast
  neighbor 192.0.2.11 activate
 exit-address-family
"""

GOBGP_CONF = """
[global.config]
  as = 65004
  router-id = "192.0.2.4"
  port = 179
[[neighbors]]
  [neighbors.config]
    neighbor-address = "192.0.2.11"
    peer-as = 64512
  [neighbors.timers.config]
    connect-retry = 1
  [neighbors.ttl-security.config]
    enabled = true
    ttl-min = 255
"""


def resource(plural: str, name: str, spec: dict[str, Any], kind: str, **meta: Any) -> KVUpdate:
    return KVUpdate(keys.resource_key(plural, name), {"apiVersion": "projectcalico.org/v3", "kind": kind,
                                                      "metadata": {"name": name, **meta}, "spec": spec}, 1)


def node(name: str, ip: str) -> KVUpdate:
    return resource("nodes", name, {"bgp": {"ipv4Address": f"{ip}/24"}}, "Node")


def kube(plural: str, ns: str, name: str, obj: dict[str, Any] | None) -> KVUpdate:
    return KVUpdate(keys.resource_key(plural, name, ns), obj, 1)


SERVICE = {"metadata": {"namespace": "shop", "name": "web"},
           "spec": {"type": "LoadBalancer", "clusterIP": "10.96.0.10", "externalTrafficPolicy": "Local"},
           "status": {"loadBalancer": {"ingress": [{"ip": "198.18.0.10"}]}}}


def slice_on(node_name: str | None) -> dict[str, Any]:
    endpoints = [] if node_name is None else [{"addresses": ["10.244.1.5"], "nodeName": node_name,
                                               "conditions": {"ready": True}}]
    return {"metadata": {"namespace": "shop", "name": "web-abc", "labels": {"kubernetes.io/service-name": "web"}},
            "addressType": "IPv4", "endpoints": endpoints}


CLUSTER = [
    node("n1", N1), node("n2", N2),
    resource("bgpconfigurations", "default", {
        "asNumber": 64512,
        "serviceClusterIPs": [{"cidr": "10.96.0.0/12"}],
        "serviceLoadBalancerIPs": [{"cidr": "198.18.0.0/24"}],
        "communities": [{"name": "pods", "value": "65000:100"}],
        "prefixAdvertisements": [{"cidr": "10.244.0.0/16", "communities": ["pods", "65000:200:300"]}],
    }, "BGPConfiguration"),
    resource("bgpfilters", "tor", {
        "importV4": [{"action": "Reject", "matchOperator": "Equal", "cidr": "198.51.100.0/24"}],
        "exportV4": [{"action": "Reject", "matchOperator": "Equal", "cidr": BLOCK_FILTERED}],
    }, "BGPFilter"),
    resource("bgppeers", "tor-n1", {"node": "n1", "peerIP": TOR, "asNumber": 65001, "filters": ["tor"]}, "BGPPeer"),
    resource("bgppeers", "tor-n2", {"node": "n2", "peerIP": TOR, "asNumber": 65001, "numAllowedLocalASNumbers": 1,
                                    "reachableBy": TOR}, "BGPPeer"),
    resource("bgppeers", "frr", {"node": "n1", "peerIP": FRR, "asNumber": 65003, "localASNumber": 65100,
                                 "keepaliveTime": "10s"}, "BGPPeer"),
    resource("bgppeers", "gobgp", {"node": "n1", "peerIP": GOBGP, "asNumber": 65004, "ttlSecurity": 1}, "BGPPeer"),
    kube("kubernetesservices", "shop", "web", SERVICE),
    kube("kubernetesendpointslices", "shop", "web-abc", slice_on("n1")),
]


class Fields:
    def __init__(self, lab: Lab, n1: AgentNode, n2: AgentNode, tor_ctl: str, frr_ns: str, frr_vty: str,
                 gobgp_ns: str) -> None:
        self.lab, self.n1, self.n2, self.tor_ctl = lab, n1, n2, tor_ctl
        self.frr_ns, self.frr_vty, self.gobgp_ns = frr_ns, frr_vty, gobgp_ns

    def pump(self) -> None:
        self.n1.pump(0.02)
        self.n2.pump(0.02)

    def wait(self, what: str, predicate: Any, timeout: float = 20.0) -> Any:
        return wait_pumping([self.n1, self.n2], what, predicate, timeout)

    def frr(self, command: str) -> Any:
        return frr_json(self.frr_ns, self.frr_vty, command)

    def frr_path(self, prefix: str) -> dict[str, Any] | None:
        paths = self.frr(f"show ip bgp {prefix} json").get("paths") or []
        return paths[0] if paths else None

    def gobgp_prefixes(self) -> set[str]:
        out = sh("ip", "netns", "exec", self.gobgp_ns, "gobgp", "-j", "global", "rib", check=False)
        try:
            return set(json.loads(out))
        except ValueError:
            return set()


@pytest.fixture(scope="module")
def fields(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fields]:
    lab = Lab(tmp_path_factory.mktemp("fields"))
    agents: list[AgentNode] = []
    try:
        tor_ns = lab.host("tor", TOR)
        _, tor_ctl = lab.bird("tor", tor_ns, TOR_CONF.format(log=lab.dir("tor") / "bird.log"))
        frr_ns = lab.host("frr", FRR)
        d = lab.dir("frr")
        (d / "frr.conf").write_text(FRR_CONF)
        lab.daemons.start(frr_ns, [FRR_BGPD, "-Z", "-n", "-S", "-f", str(d / "frr.conf"), "-i", str(d / "bgpd.pid"),
                                   "--vty_socket", str(d), "-P", "0", "-l", FRR], d / "bgpd.out")
        gobgp_ns = lab.host("gbp", GOBGP)
        g = lab.dir("gobgp")
        (g / "gobgpd.toml").write_text(GOBGP_CONF)
        lab.daemons.start(gobgp_ns, ["gobgpd", "-f", str(g / "gobgpd.toml"), "-t", "toml",
                                     "--api-hosts", "127.0.0.1:50051"], g / "gobgpd.out")
        n1 = AgentNode(lab, "n1", N1)
        agents.append(n1)
        n2 = AgentNode(lab, "n2", N2)
        agents.append(n2)
        for agent in (n1, n2):
            agent.feed(*CLUSTER)
        n1.ctl.set_announcements({BLOCK_FILTERED, BLOCK})
        n2.ctl.set_announcements({"10.244.2.0/26"})
        yield Fields(lab, n1, n2, tor_ctl, frr_ns, str(d), gobgp_ns)
    finally:
        for agent in agents:
            agent.close()
        lab.close()


def test_sessions_establish_including_local_as_and_gtsm(fields: Fields) -> None:
    n1 = fields.n1
    fields.wait("n1's sessions", lambda: all(n1.session_up(p) for p in (N2, TOR, FRR, GOBGP)), timeout=40)
    neighbor = fields.frr("show bgp neighbors 192.0.2.11 json").get("192.0.2.11", {})
    assert neighbor.get("remoteAs") == 65100  # localASNumber
    # keepaliveTime 10s: ExaBGP offers hold time 30 s and sends keepalives every hold time / 3.
    assert neighbor.get("bgpTimerHoldTimeMsecs") == 30000
    assert neighbor.get("bgpTimerKeepAliveIntervalMsecs") == 10000


def test_communities_and_local_as_reach_frr(fields: Fields) -> None:
    def path() -> dict[str, Any] | None:
        return fields.frr_path(BLOCK)

    found = fields.wait("FRR learns n1's block", path)
    assert found["aspath"]["string"] == "65100"
    assert found["community"]["string"] == "65000:100"
    assert found["largeCommunity"]["string"] == "65000:200:300"
    # The mesh peer gets the same attributes.
    fields.wait("n2 learns n1's block", lambda: fields.n2.ctl.rib.best(BLOCK) is not None)
    attributes = fields.n2.ctl.rib.best(BLOCK).attributes  # type: ignore[union-attr]
    assert attributes.communities == ("65000:100",) and attributes.large_communities == ("65000:200:300",)


def test_gtsm_peer_gets_routes(fields: Fields) -> None:
    fields.wait("GoBGP learns n1's blocks", lambda: {BLOCK, BLOCK_FILTERED} <= fields.gobgp_prefixes())


def test_export_filter_keeps_a_block_from_the_tor_only(fields: Fields) -> None:
    fields.wait("the ToR learns the unfiltered block", lambda: "via 192.0.2.11" in bird_route(fields.tor_ctl, BLOCK))
    fields.wait("FRR has the filtered block", lambda: fields.frr_path(BLOCK_FILTERED))
    assert "via 192.0.2.11" not in bird_route(fields.tor_ctl, BLOCK_FILTERED)
    assert BLOCK_FILTERED not in fields.n1.ctl.desired_exports()[TOR]


def test_import_filter_and_as_path_loop(fields: Fields) -> None:
    fields.wait("n2 learns the ToR's prefixes", lambda: {"198.51.100.0/24", "203.0.113.0/24", "100.64.0.0/24"}
                <= set(fields.n2.ctl.learned_routes()))
    fields.wait("n1 learns the ToR's other prefix", lambda: "203.0.113.0/24" in fields.n1.ctl.learned_routes())
    learned = fields.n1.ctl.learned_routes()
    assert "198.51.100.0/24" not in learned  # BGPFilter import Reject
    assert "100.64.0.0/24" not in learned  # our AS in the path, none allowed
    assert "198.51.100.0/24" in fields.n1.ctl.rib.received(TOR)  # received, refused by the policy


def test_reachable_by_route(fields: Fields) -> None:
    assert fields.n2.ctl.learned_routes()[f"{TOR}/32"] == TOR
    assert f"{TOR}/32" not in fields.n1.ctl.learned_routes()


def test_service_ranges_and_local_service_follow_the_endpoint(fields: Fields) -> None:
    fields.wait("FRR learns the service ranges", lambda: fields.frr_path("10.96.0.0/12")
                and fields.frr_path("198.18.0.0/24"))
    fields.wait("FRR learns the Local service's /32 from n1", lambda: fields.frr_path("198.18.0.10/32"))
    assert fields.frr_path("10.96.0.10/32") is not None  # its cluster IP, cluster IPs being advertised
    # n2 hosts no endpoint: it does not advertise the /32s, and programs no route for them.
    assert "198.18.0.10/32" not in fields.n2.ctl.desired_exports()[N1]
    fields.wait("n2 learns n1's /32", lambda: fields.n2.ctl.rib.best("198.18.0.10/32") is not None)
    assert "198.18.0.10/32" not in fields.n2.ctl.learned_routes()  # inside serviceLoadBalancerIPs
    # The endpoint goes: the /32 is withdrawn.
    fields.n1.feed(kube("kubernetesendpointslices", "shop", "web-abc", slice_on(None)))
    fields.wait("FRR loses the /32", lambda: fields.frr_path("198.18.0.10/32") is None)
    assert fields.frr_path("198.18.0.0/24") is not None
    fields.n1.feed(kube("kubernetesendpointslices", "shop", "web-abc", slice_on("n1")))
    fields.wait("FRR has the /32 again", lambda: fields.frr_path("198.18.0.10/32"))
