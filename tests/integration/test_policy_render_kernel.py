"""Rendered policy against the real kernel (root): the text loads, and packets obey it.

* The whole rendered filter table and its IP sets go through felixpy's Table and IPSets drivers
  into a fresh network namespace, for both iptables backends; a read-back finds exactly what was
  written. The plain `restore_text` of the same table loads with iptables-restore too.
* A small node: a "host" namespace with three pod namespaces behind cali* veths (Calico's
  plumbing: /32 routes, a link-local gateway), the rendered chains, and TCP probes. A probe that
  gets a connection or a refusal went through; one that times out was dropped by policy.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
from collections.abc import Iterator, Sequence

import pytest

from felixpy.dataplane.drivers.ipsets import IPSets
from felixpy.dataplane.drivers.iptables import Table
from felixpy.kernel import commands
from felixpy.kernel.commands import CompletedRun
from policy import render
from policy.ipsets import ipset_members
from policy.model import (
    ContainerPort,
    Endpoint,
    EndpointMatch,
    EntityRule,
    NamedPort,
    Policy,
    PortRange,
    Profile,
    Rule,
)
from policy.render import EndpointChains, RenderConfig
from tests.unit.test_policy_render import big_table, two_endpoint_table

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root for network namespaces"),
    pytest.mark.skipif(shutil.which("ipset") is None, reason="ipset not installed"),
]

PREFIX = "fxt" + secrets.token_hex(3)[:5]


class NetnsRunner:
    """A driver runner whose commands all run inside one network namespace."""

    def __init__(self, ns: str) -> None:
        self.ns = ns

    def __call__(
        self, argv: Sequence[str], *, input: str | bytes | None = None, timeout: float = 30
    ) -> CompletedRun:
        return commands.run(["ip", "netns", "exec", self.ns, *argv], input=input, timeout=timeout)


def sh(*argv: str) -> str:
    return subprocess.run(list(argv), check=True, capture_output=True, text=True, timeout=20).stdout


def netns_add(name: str, created: list[str]) -> None:
    subprocess.run(["ip", "netns", "add", name], check=True, timeout=10)
    created.append(name)


@pytest.fixture
def namespaces() -> Iterator[list[str]]:
    created: list[str] = []
    try:
        yield created
    finally:
        for name in reversed(created):
            subprocess.run(["ip", "netns", "del", name], capture_output=True, timeout=10)


def load(run: NetnsRunner, backend: str, table: render.FilterTable, endpoints: Sequence[Endpoint]) -> Table:
    ipsets = IPSets(runner=run)
    for name, spec in table.ipsets.items():
        ipsets.set_members(name, spec.type, ipset_members(spec, endpoints))
    ipsets.apply()
    filter_table = Table("filter", backend=backend, runner=run)  # type: ignore[arg-type]
    for chain in table.chains.values():
        filter_table.update_chain(chain)
    for builtin, rules in table.jumps.items():
        filter_table.set_jump_rules(builtin, rules)
    filter_table.apply()
    return filter_table


@pytest.mark.parametrize("backend", ["nft", "legacy"])
def test_rendered_table_and_ipsets_load_into_the_kernel(backend: str, namespaces: list[str]) -> None:
    ns = f"{PREFIX}l{backend[0]}"
    netns_add(ns, namespaces)
    run = NetnsRunner(ns)
    table = big_table(60, 40, 5, seed=11)
    extra = two_endpoint_table()
    table.chains.update(extra.chains)  # the goldens' policies: every rule shape we render
    table.ipsets.update(extra.ipsets)
    members_of = [Endpoint("ns1", f"p{i}", (("app", f"app{i}"),), (("team", "t1"),), (f"10.65.0.{i}/32",),
                           (ContainerPort("http", "TCP", 8000 + i), ContainerPort("dns", "UDP", 53)))
                  for i in range(1, 20)]
    driver = load(run, backend, table, members_of)

    saved = run(["iptables-" + backend + "-save", "-t", "filter"]).stdout
    declared = {line[1:].split()[0] for line in saved.splitlines() if line.startswith(":cali-")}
    assert declared == set(table.chains)
    appended = [line for line in saved.splitlines() if line.startswith("-A cali-")]
    assert len(appended) == sum(len(c.rules) for c in table.chains.values())
    for builtin in ("INPUT", "FORWARD", "OUTPUT"):
        assert f"-A {builtin} " in saved and f"-j cali-{builtin}" in saved
    # The kernel kept every rule hash: reading back finds nothing to change.
    driver.queue_resync()
    assert driver.apply() == ""
    sets = run(["ipset", "list", "-n"]).stdout.split()
    assert set(table.ipsets) <= set(sets)

    # The one-shot restore text of the same table loads into a fresh namespace as well.
    ns2 = f"{PREFIX}r{backend[0]}"
    netns_add(ns2, namespaces)
    run2 = NetnsRunner(ns2)
    ipsets2 = IPSets(runner=run2)
    for name, spec in table.ipsets.items():
        ipsets2.set_members(name, spec.type, ())
    ipsets2.apply()
    run2([f"iptables-{backend}-restore", "--noflush"], input=render.restore_text(table))
    saved2 = run2([f"iptables-{backend}-save", "-t", "filter"]).stdout
    assert len([line for line in saved2.splitlines() if line.startswith("-A cali-")]) == len(appended)


# -- packets --------------------------------------------------------------------------------------

HOST_IP = "198.51.100.1"
K8S = "projectcalico.org/orchestrator == 'k8s'"


def pod_endpoint(name: str, ip: str, labels: dict[str, str], ports: tuple[ContainerPort, ...] = ()) -> Endpoint:
    return Endpoint("demo", name,
                    tuple(sorted({**labels, "projectcalico.org/namespace": "demo",
                                  "projectcalico.org/orchestrator": "k8s"}.items())),
                    (("kubernetes.io/metadata.name", "demo"),), (f"{ip}/32",), ports, ("kns.demo",))


def plumb_pod(host: str, pod: str, iface: str, ip: str) -> None:
    """Calico's pod plumbing: veth, /32 route on the host, link-local default route in the pod."""
    sh("ip", "-n", host, "link", "add", iface, "type", "veth", "peer", "name", "eth0", "netns", pod)
    sh("ip", "-n", pod, "addr", "add", f"{ip}/32", "dev", "eth0")
    sh("ip", "-n", pod, "link", "set", "eth0", "up")
    sh("ip", "-n", pod, "link", "set", "lo", "up")
    sh("ip", "-n", host, "link", "set", iface, "up")
    mac = json.loads(sh("ip", "-n", host, "-j", "link", "show", "dev", iface))[0]["address"]
    sh("ip", "-n", pod, "route", "add", "169.254.1.1", "dev", "eth0", "scope", "link")
    sh("ip", "-n", pod, "route", "add", "default", "via", "169.254.1.1", "dev", "eth0")
    sh("ip", "-n", pod, "neigh", "add", "169.254.1.1", "lladdr", mac, "dev", "eth0")
    sh("ip", "-n", host, "route", "add", f"{ip}/32", "dev", iface)


def reaches(src_ns: str, ip: str, port: int, timeout: float = 0.6) -> bool:
    """True when a TCP SYN got an answer (connected or refused), False when it was dropped."""
    code = (
        "import socket,sys\n"
        f"s=socket.socket(); s.settimeout({timeout})\n"
        "try:\n"
        f"    s.connect(({ip!r},{port})); sys.exit(0)\n"
        "except ConnectionRefusedError: sys.exit(0)\n"
        "except OSError: sys.exit(1)\n"
    )
    result = subprocess.run(["ip", "netns", "exec", src_ns, "python3", "-c", code],
                            capture_output=True, timeout=15)
    return result.returncode == 0


def test_rendered_policy_decides_real_traffic(namespaces: list[str]) -> None:
    host, pod_a, pod_b, pod_c, pod_x = (f"{PREFIX}{s}" for s in "habcx")
    for ns in (host, pod_a, pod_b, pod_c, pod_x):
        netns_add(ns, namespaces)
    token = PREFIX[3:]
    ifaces = {name: f"cali{token}{name}" for name in "abcx"}
    ips = {"a": "10.65.0.1", "b": "10.65.0.2", "c": "10.65.0.3", "x": "10.65.0.9"}
    for name, ns in (("a", pod_a), ("b", pod_b), ("c", pod_c), ("x", pod_x)):
        plumb_pod(host, ns, ifaces[name], ips[name])
    sh("ip", "netns", "exec", host, "sysctl", "-qw", "net.ipv4.ip_forward=1")
    sh("ip", "-n", host, "addr", "add", f"{HOST_IP}/32", "dev", "lo")  # a host address
    sh("ip", "-n", host, "link", "set", "lo", "up")

    ep_a = pod_endpoint("a", ips["a"], {"app": "a"})
    ep_b = pod_endpoint("b", ips["b"], {"app": "b"}, (ContainerPort("alt", "TCP", 8080),))
    ep_c = pod_endpoint("c", ips["c"], {"app": "c"})
    # B: ingress only from app=a on TCP 80, or from anyone to its named port "alt".
    ingress_b = Policy(
        name="knp.default.b-ingress", namespace="demo", selector=f"{K8S} && app == 'b'",
        types=frozenset({"Ingress"}), order=1000,
        ingress=(
            Rule("Allow", protocol="TCP",
                 source=EntityRule(endpoints=EndpointMatch(f"{K8S} && app == 'a'", namespace="demo")),
                 destination=EntityRule(ports=(PortRange(80, 80),))),
            Rule("Allow", protocol="TCP", destination=EntityRule(ports=(NamedPort("alt"),))),
        ),
    )
    # C: egress deny-all.
    egress_c = Policy(name="knp.default.c-egress", namespace="demo", selector=f"{K8S} && app == 'c'",
                      types=frozenset({"Egress"}), order=1000)
    policies = {p.id: p for p in (ingress_b, egress_c)}
    kns = Profile("kns.demo", ingress=(Rule("Allow"),), egress=(Rule("Allow"),))
    # Pod x's interface is deliberately not rendered: unknown interfaces must fail closed.
    endpoints = [
        EndpointChains(ifaces["a"], profiles=("kns.demo",)),
        EndpointChains.default_tier(ifaces["b"], ingress=(ingress_b.id,), profiles=("kns.demo",)),
        EndpointChains.default_tier(ifaces["c"], egress=(egress_c.id,), profiles=("kns.demo",)),
    ]
    run = NetnsRunner(host)

    # Before any policy: everything flows (a baseline, so a "blocked" below means policy).
    assert reaches(pod_a, ips["b"], 81) and reaches(pod_x, ips["a"], 80)
    assert reaches(pod_c, ips["a"], 80) and reaches(pod_a, HOST_IP, 22)

    table = render.render_filter_table(endpoints, policies, {"kns.demo": kns}, RenderConfig())
    driver = load(run, "nft", table, [ep_a, ep_b, ep_c])

    assert reaches(pod_a, ips["b"], 80)  # allowed by selector + port
    assert not reaches(pod_a, ips["b"], 81)  # B is isolated for ingress: end of tier
    assert not reaches(pod_c, ips["a"], 80)  # C's egress deny-all
    assert reaches(pod_b, ips["a"], 80)  # A has no policy: its namespace profile allows
    assert reaches(pod_a, ips["b"], 8080)  # named port resolved through the hash:ip,port set
    assert not reaches(pod_x, ips["a"], 80)  # unknown interface: dropped
    assert not reaches(pod_a, HOST_IP, 22)  # DefaultEndpointToHostAction DROP (failsafe is host-only)

    # RETURN hands pod→host traffic back to the host's own rules (none here: it gets through).
    relaxed = render.render_filter_table(endpoints, policies, {"kns.demo": kns},
                                         RenderConfig(default_endpoint_to_host_action="RETURN"))
    for chain in relaxed.chains.values():
        driver.update_chain(chain)
    driver.apply()
    assert reaches(pod_a, HOST_IP, 22)
    assert not reaches(pod_c, HOST_IP, 22)  # but C's egress policy still runs first
