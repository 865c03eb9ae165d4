"""Policy rendered for both families against the real kernel (root): iptables and ip6tables hold
the same chains, each family's rules, and dual-stack packets obey them.

* A small dual-stack node: a "host" namespace with pods behind cali* veths, plumbed as Calico's
  CNI plugin does (a /32 and a /128 route per pod; the pod's IPv4 gateway 169.254.1.1 and its
  IPv6 gateway the host veth's link-local fe80::ecee:eeff:feee:eeee, found by neighbour
  discovery). Both rendered families are loaded through felixpy's Table and IPSets drivers.
* A host endpoint with IPv6 policy on a veth between two namespaces: the failsafe ports pass,
  other traffic obeys the policy, in ip6tables' filter table.
A TCP probe that gets a connection or a refusal went through; one that times out was dropped.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Sequence

import pytest

from felixpy.dataplane.drivers.ipsets import IPSets
from felixpy.dataplane.drivers.iptables import Table
from policy import render
from policy.ipsets import ipset_members
from policy.model import (
    ContainerPort,
    Endpoint,
    EndpointMatch,
    EntityRule,
    ICMPMatch,
    NamedPort,
    Policy,
    PortRange,
    Profile,
    Rule,
)
from policy.render import EndpointChains, HostEndpointChains, RenderConfig, TierPolicies
from tests.integration.test_policy_render_kernel import (  # noqa: F401 (the fixture)
    PREFIX,
    NetnsRunner,
    namespaces,
    netns_add,
    sh,
)

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root for network namespaces"),
    pytest.mark.skipif(shutil.which("ipset") is None, reason="ipset not installed"),
    pytest.mark.skipif(shutil.which("ip6tables-nft-restore") is None, reason="ip6tables (nft) not installed"),
]

K8S = "projectcalico.org/orchestrator == 'k8s'"
GATEWAY6 = "fe80::ecee:eeff:feee:eeee"
HOST_IP4, HOST_IP6 = "198.51.100.1", "fd00:198::1"


def load(run: NetnsRunner, table: render.FilterTable, endpoints: Sequence[Endpoint], ip_version: int) -> Table:
    ipsets = IPSets(runner=run, ip_version=ip_version)
    for name, spec in table.ipsets.items():
        ipsets.set_members(name, spec.type, ipset_members(spec, endpoints))
    ipsets.apply()
    driver = Table("filter", backend="nft", runner=run, ip_version=ip_version)
    for chain in table.chains.values():
        driver.update_chain(chain)
    for builtin, rules in table.jumps.items():
        driver.set_jump_rules(builtin, rules)
    driver.apply()
    return driver


def plumb_pod(host: str, pod: str, iface: str, ip4: str, ip6: str) -> None:
    """Calico's dual-stack pod plumbing (no DAD anywhere: the addresses are usable at once)."""
    for ns in (host, pod):
        sh("ip", "netns", "exec", ns, "sysctl", "-qw", "net.ipv6.conf.default.accept_dad=0")
    sh("ip", "-n", host, "link", "add", iface, "address", "ee:ee:ee:ee:ee:ee", "type", "veth",
       "peer", "name", "eth0", "netns", pod)
    sh("ip", "-n", pod, "addr", "add", f"{ip4}/32", "dev", "eth0")
    sh("ip", "-n", pod, "addr", "add", f"{ip6}/128", "dev", "eth0", "nodad")
    for ns, dev in ((pod, "eth0"), (pod, "lo"), (host, iface)):
        sh("ip", "-n", ns, "link", "set", dev, "up")
    sh("ip", "-n", pod, "route", "add", "169.254.1.1", "dev", "eth0", "scope", "link")
    sh("ip", "-n", pod, "route", "add", "default", "via", "169.254.1.1", "dev", "eth0")
    sh("ip", "-n", pod, "neigh", "add", "169.254.1.1", "lladdr", "ee:ee:ee:ee:ee:ee", "dev", "eth0")
    # IPv6: the gateway's MAC comes from neighbour discovery, which policy must never break.
    sh("ip", "-n", pod, "-6", "route", "add", "default", "via", GATEWAY6, "dev", "eth0")
    sh("ip", "-n", host, "route", "add", f"{ip4}/32", "dev", iface)
    sh("ip", "-n", host, "-6", "route", "add", f"{ip6}/128", "dev", iface)


def reaches(src_ns: str, ip: str, port: int, timeout: float = 0.8) -> bool:
    """True when a TCP SYN got an answer (connected or refused), False when it was dropped."""
    family = "socket.AF_INET6" if ":" in ip else "socket.AF_INET"
    code = (
        "import socket,sys\n"
        f"s=socket.socket({family}); s.settimeout({timeout})\n"
        "try:\n"
        f"    s.connect(({ip!r},{port})); sys.exit(0)\n"
        "except ConnectionRefusedError: sys.exit(0)\n"
        "except OSError: sys.exit(1)\n"
    )
    result = subprocess.run(["ip", "netns", "exec", src_ns, "python3", "-c", code], capture_output=True, timeout=15)
    return result.returncode == 0


def pings(src_ns: str, ip: str) -> bool:
    flag = "-6" if ":" in ip else "-4"
    return subprocess.run(["ip", "netns", "exec", src_ns, "ping", flag, "-c", "1", "-W", "1", ip],
                          capture_output=True, timeout=15).returncode == 0


def pod_endpoint(name: str, ip4: str, ip6: str, labels: dict[str, str],
                 ports: tuple[ContainerPort, ...] = ()) -> Endpoint:
    return Endpoint("demo", name,
                    tuple(sorted({**labels, "projectcalico.org/namespace": "demo",
                                  "projectcalico.org/orchestrator": "k8s"}.items())),
                    (("kubernetes.io/metadata.name", "demo"),), (f"{ip4}/32", f"{ip6}/128"), ports, ("kns.demo",))


def test_dual_stack_pods_obey_each_familys_rendering(namespaces: list[str]) -> None:  # noqa: F811
    host, pod_a, pod_b, pod_c, pod_x = (f"{PREFIX}6{s}" for s in "habcx")
    for ns in (host, pod_a, pod_b, pod_c, pod_x):
        netns_add(ns, namespaces)
    token = PREFIX[3:]
    ifaces = {name: f"cali{token}6{name}" for name in "abcx"}
    ip4 = {"a": "10.65.0.1", "b": "10.65.0.2", "c": "10.65.0.3", "x": "10.65.0.9"}
    ip6 = {"a": "fd00:65::1", "b": "fd00:65::2", "c": "fd00:65::3", "x": "fd00:65::9"}
    sh("ip", "netns", "exec", host, "sysctl", "-qw", "net.ipv4.ip_forward=1")
    sh("ip", "netns", "exec", host, "sysctl", "-qw", "net.ipv6.conf.all.forwarding=1")
    for name, ns in (("a", pod_a), ("b", pod_b), ("c", pod_c), ("x", pod_x)):
        plumb_pod(host, ns, ifaces[name], ip4[name], ip6[name])
    sh("ip", "-n", host, "addr", "add", f"{HOST_IP4}/32", "dev", "lo")
    sh("ip", "-n", host, "addr", "add", f"{HOST_IP6}/128", "dev", "lo")
    sh("ip", "-n", host, "link", "set", "lo", "up")

    ep_a = pod_endpoint("a", ip4["a"], ip6["a"], {"app": "a"})
    ep_b = pod_endpoint("b", ip4["b"], ip6["b"], {"app": "b"}, (ContainerPort("alt", "TCP", 8080),))
    ep_c = pod_endpoint("c", ip4["c"], ip6["c"], {"app": "c"})
    from_a = EndpointMatch(f"{K8S} && app == 'a'", namespace="demo")
    # B: from app=a on TCP 80 (a selector: both families), anyone to its named port "alt", A's
    # IPv4 address only on TCP 9000 (an ipBlock: IPv4 only), ping6 from anyone (ICMPv6 type 128).
    ingress_b = Policy(
        name="knp.default.b-ingress", namespace="demo", selector=f"{K8S} && app == 'b'",
        types=frozenset({"Ingress"}), order=1000,
        ingress=(
            Rule("Allow", protocol="TCP", source=EntityRule(endpoints=from_a),
                 destination=EntityRule(ports=(PortRange(80, 80),))),
            Rule("Allow", protocol="TCP", destination=EntityRule(ports=(NamedPort("alt"),))),
            Rule("Allow", protocol="TCP", source=EntityRule(nets=(f"{ip4['a']}/32",)),
                 destination=EntityRule(ports=(PortRange(9000, 9000),))),
            Rule("Allow", protocol="ICMPv6", icmp=ICMPMatch(128)),
        ),
    )
    # C: egress to TCP 80 only; nothing allows ICMPv6, so neighbour discovery with its gateway
    # works only because cali-wl-to-host accepts it ahead of policy.
    egress_c = Policy(name="knp.default.c-egress", namespace="demo", selector=f"{K8S} && app == 'c'",
                      types=frozenset({"Egress"}), order=1000,
                      egress=(Rule("Allow", protocol="TCP", destination=EntityRule(ports=(PortRange(80, 80),))),))
    policies = {p.id: p for p in (ingress_b, egress_c)}
    profiles = {"kns.demo": Profile("kns.demo", ingress=(Rule("Allow"),), egress=(Rule("Allow"),))}
    endpoints = [  # pod x's interface is deliberately not rendered: unknown interfaces fail closed
        EndpointChains(ifaces["a"], profiles=("kns.demo",)),
        EndpointChains.default_tier(ifaces["b"], ingress=(ingress_b.id,), profiles=("kns.demo",)),
        EndpointChains.default_tier(ifaces["c"], egress=(egress_c.id,), profiles=("kns.demo",)),
    ]
    run = NetnsRunner(host)
    # Baseline before any policy, both families (so "blocked" below means policy).
    assert reaches(pod_a, ip6["b"], 81) and reaches(pod_x, ip6["a"], 80) and reaches(pod_a, ip4["b"], 81)

    tables = {v: render.render_filter_table(endpoints, policies, profiles, RenderConfig(), ip_version=v)
              for v in (4, 6)}
    assert set(tables[4].chains) == set(tables[6].chains)  # the same chains in both tables
    assert all(n.startswith("cali60") for n in tables[6].ipsets)
    drivers = {version: load(run, table, [ep_a, ep_b, ep_c], version) for version, table in tables.items()}
    saved6 = run(["ip6tables-nft-save", "-t", "filter"]).stdout
    assert "-j cali-FORWARD" in saved6 and "cali60s:" in saved6
    for driver in drivers.values():  # ip6tables kept every rule hash too: a read-back changes nothing
        driver.queue_resync()
        assert driver.apply() == ""

    for ip in (ip4, ip6):
        assert reaches(pod_a, ip["b"], 80)  # the selector's set holds A's address of this family
        assert not reaches(pod_a, ip["b"], 81)  # B is isolated for ingress
        assert reaches(pod_a, ip["b"], 8080)  # B's named port, through its hash:ip,port set
        assert not reaches(pod_x, ip["a"], 80)  # unknown interface: dropped
    assert reaches(pod_a, ip4["b"], 9000) and not reaches(pod_a, ip6["b"], 9000)  # an IPv4 ipBlock
    assert pings(pod_a, ip6["b"]) and not pings(pod_a, ip4["b"])  # an ICMPv6 rule: IPv6 only

    # C's egress allows TCP 80 only, yet after forgetting every neighbour it still finds its
    # gateway (and the host finds the pods): neighbour discovery is accepted ahead of policy.
    for ns in (pod_c, host):
        sh("ip", "-n", ns, "-6", "neigh", "flush", "all")
    assert reaches(pod_c, ip6["a"], 80)
    assert not reaches(pod_c, ip6["a"], 81) and not pings(pod_c, ip6["a"])
    assert not reaches(pod_a, HOST_IP6, 22)  # DefaultEndpointToHostAction DROP, in ip6tables too


def test_ipv6_host_endpoint_policy_with_failsafes(namespaces: list[str]) -> None:  # noqa: F811
    host, peer = f"{PREFIX}6h", f"{PREFIX}6p"
    for ns in (host, peer):
        netns_add(ns, namespaces)
    host_ip, peer_ip = "fd00:fe::1", "fd00:fe::2"
    sh("ip", "-n", host, "link", "add", "h0", "type", "veth", "peer", "name", "p0", "netns", peer)
    for ns, dev, ip in ((host, "h0", host_ip), (peer, "p0", peer_ip)):
        sh("ip", "-n", ns, "addr", "add", f"{ip}/64", "dev", dev, "nodad")
        for up in (dev, "lo"):
            sh("ip", "-n", ns, "link", "set", up, "up")
    servers = [subprocess.Popen(["ip", "netns", "exec", ns, "python3", "-c", SERVER, *map(str, ports)],
                                stdout=subprocess.PIPE, text=True)
               for ns, ports in ((host, (8080, 22, 9090)), (peer, (8080, 2379)))]
    try:
        for proc in servers:
            assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
        # As in Felix, host endpoint policy decides the node's own ICMPv6 too (no neighbour
        # discovery exception for host endpoints): fixed neighbours keep this test about TCP.
        for ns, dev, other in ((host, "h0", peer), (peer, "p0", host)):
            mac = sh("ip", "netns", "exec", other, "cat", f"/sys/class/net/{'p0' if other == peer else 'h0'}/address")
            ip = peer_ip if other == peer else host_ip
            sh("ip", "-n", ns, "-6", "neigh", "replace", ip, "lladdr", mac.strip(), "dev", dev, "nud", "permanent")
        assert reaches(peer, host_ip, 8080) and reaches(peer, host_ip, 9090)

        only_9090 = Policy(name="allow-9090", namespace=None, selector="all()", types=frozenset({"Ingress", "Egress"}),
                           ingress=(Rule("Allow", protocol="TCP", destination=EntityRule(ports=(PortRange(9090, 9090),))),
                                    Rule("Allow", protocol="ICMPv6", icmp=ICMPMatch(128))))
        hep = HostEndpointChains("h0", normal=(TierPolicies("default", "Deny", (only_9090.id,), (only_9090.id,)),))
        config = RenderConfig(failsafe_inbound=(("tcp", 22),), failsafe_outbound=(("tcp", 2379),))
        table = render.render_filter_table([], {only_9090.id: only_9090}, {}, config, host_endpoints=[hep],
                                           ip_version=6)
        load(NetnsRunner(host), table, [], 6)

        assert reaches(peer, host_ip, 22), "inbound failsafe port"
        assert reaches(host, peer_ip, 2379), "outbound failsafe port (its replies are established)"
        assert reaches(peer, host_ip, 9090) and pings(peer, host_ip)  # the policy's own allows
        assert not reaches(peer, host_ip, 8080)
        assert not reaches(host, peer_ip, 8080)  # egress: the policy has no egress rules
    finally:
        for proc in servers:
            proc.kill()
            proc.wait(timeout=10)


# Accepts on every port given, forever (killed by the test); echoes nothing.
SERVER = """
import selectors, socket, sys
sel = selectors.DefaultSelector()
for port in map(int, sys.argv[1:]):
    s = socket.socket(socket.AF_INET6); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("::", port)); s.listen(16); sel.register(s, selectors.EVENT_READ)
print("ready", flush=True)
while True:
    for key, _ in sel.select():
        key.fileobj.accept()[0].close()
"""
