"""The IPv6 policy guard: until policy is rendered into ip6tables, policed pods' IPv6 traffic is
dropped (fail closed), and pods no policy selects are left alone."""

from __future__ import annotations

from felixpy.dataplane.drivers.iptables import Table
from felixpy.dataplane.managers.policy6 import (GUARD_CHAIN, HostGuard, Ipv6PolicyGuard, guard_chain, host_guard_chains,
                                                policed_host_endpoints, policed_ifaces)
from policy import model
from policy.render import EndpointChains, HostEndpointChains, TierPolicies
from tests.fakes.iptables import FakeIptables


def test_guard_chain_drops_each_policed_direction() -> None:
    chain = guard_chain(frozenset({"calib", "calia"}), frozenset({"calia"}))
    assert [(r.match, r.action) for r in chain.rules] == [
        ("-o calia", "DROP"), ("-o calib", "DROP"), ("-i calia", "DROP")]
    assert guard_chain(frozenset(), frozenset()).rules == ()


def test_guard_programs_ip6tables_filter_only_on_change() -> None:
    fake = FakeIptables()
    calls: list[list[str]] = []

    def runner(argv: list[str], **kw: object) -> object:
        calls.append(argv)
        return fake(argv, **kw)  # type: ignore[arg-type]

    table = Table("filter", backend="nft", runner=runner, ip_version=6)  # type: ignore[arg-type]
    guard = Ipv6PolicyGuard(table)
    guard.set_endpoints(frozenset({"calia"}), frozenset())
    guard.complete_deferred_work()
    table.apply()
    assert any(argv[0] == "ip6tables-nft-restore" for argv in calls)
    (rule,) = fake.chain("filter", GUARD_CHAIN)
    assert rule.endswith('-o calia -m comment --comment "ingress policy not rendered for IPv6" -j DROP')
    workload_jump, host_jump = fake.chain("filter", "FORWARD")
    assert workload_jump.endswith(f"-j {GUARD_CHAIN}") and host_jump.endswith("-j cali-v6-hep-fwd")
    calls.clear()
    guard.set_endpoints(frozenset({"calia"}), frozenset())
    guard.complete_deferred_work()
    assert table.apply() == ""  # nothing changed, nothing written


def test_policed_interfaces_by_policy_and_by_profile() -> None:
    allow = model.Profile("kns.x", ingress=(model.Rule("Allow"),), egress=(model.Rule("Allow"),))
    closed_in = model.Profile("locked", egress=(model.Rule("Allow"),))
    chains = [
        EndpointChains.default_tier("calia", profiles=["kns.x"]),  # namespace profile only: open
        EndpointChains.default_tier("calib", ingress=["knp.default.x.p"], profiles=["kns.x"]),
        EndpointChains.default_tier("calic", profiles=["locked"]),  # profile denies ingress
        EndpointChains.default_tier("calid", profiles=["missing"]),  # Calico denies both ways
        EndpointChains.default_tier("calie"),  # no profile at all: denied
    ]
    ingress, egress = policed_ifaces(chains, {"kns.x": allow, "locked": closed_in})
    assert ingress == {"calib", "calic", "calid", "calie"}
    assert egress == {"calid", "calie"}


def _hep(iface: str, **kw: object) -> HostEndpointChains:
    return HostEndpointChains(iface, **kw)  # type: ignore[arg-type]  # the test's keyword subsets


def test_host_endpoints_policed_by_policy_kind_and_profile() -> None:
    tiers = (TierPolicies("default", ingress=("default.p",)),)
    allow = model.Profile("allow-all", ingress=(model.Rule("Allow"),), egress=(model.Rule("Allow"),))
    guards = policed_host_endpoints([
        _hep("eth0", normal=tiers, profiles=("allow-all",)),    # normal policy: its own traffic
        _hep("eth1", profiles=("allow-all",)),                  # open profile, no policy: untouched
        _hep("eth2"),                                           # no profile: Calico denies
        _hep("eth3", forward=tiers, profiles=("allow-all",)),   # applyOnForward only: forwarded
        _hep("eth4", pre_dnat=tiers, profiles=("allow-all",)),  # preDNAT: both
    ], {"allow-all": allow})
    assert guards == (HostGuard("eth0", True, False), HostGuard("eth2", True, False),
                      HostGuard("eth3", False, True), HostGuard("eth4", True, True))


def test_host_guard_chains_keep_failsafes_neighbour_discovery_and_vxlan() -> None:
    chains = host_guard_chains([HostGuard("eth0", True, True), HostGuard("*", True, False)],
                               [("tcp", 22)], [("tcp", 2379)], 4789)
    inp = [(r.match, r.action) for r in chains["INPUT"].rules]
    assert inp[0] == ("-i lo", "RETURN")
    # "*" sorts first: every interface but the workloads'.
    assert inp[1] == ("! -i cali+ -m conntrack --ctstate RELATED,ESTABLISHED", "RETURN")
    assert ("-i eth0 -p ipv6-icmp --icmpv6-type neighbour-solicitation", "RETURN") in inp
    assert ("-i eth0 -p tcp --dport 22", "RETURN") in inp and ("-i eth0 -p udp --dport 4789", "RETURN") in inp
    assert inp[-1] == ("-i eth0", "DROP")
    out = [(r.match, r.action) for r in chains["OUTPUT"].rules]
    assert ("-o eth0 -p tcp --dport 2379", "RETURN") in out and out[-1] == ("-o eth0", "DROP")
    assert ("-o eth0 -p tcp --dport 22", "RETURN") not in out
    fwd = [(r.match, r.action) for r in chains["FORWARD"].rules]
    assert fwd == [("-i eth0 -m conntrack --ctstate RELATED,ESTABLISHED", "RETURN"), ("-i eth0", "DROP"),
                   ("-o eth0 -m conntrack --ctstate RELATED,ESTABLISHED", "RETURN"), ("-o eth0", "DROP")]
    assert all(c.rules == () or c.name.startswith("cali-v6-hep-") for c in chains.values())
    assert [r.match for r in host_guard_chains([], [], [], 4789)["INPUT"].rules] == ["-i lo"]
