"""The IPv6 policy guard: until policy is rendered into ip6tables, policed pods' IPv6 traffic is
dropped (fail closed), and pods no policy selects are left alone."""

from __future__ import annotations

from felixpy.dataplane.drivers.iptables import Table
from felixpy.dataplane.managers.policy6 import GUARD_CHAIN, Ipv6PolicyGuard, guard_chain, policed_ifaces
from policy import model
from policy.render import EndpointChains
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
    (jump,) = fake.chain("filter", "FORWARD")
    assert jump.endswith(f"-j {GUARD_CHAIN}")
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
