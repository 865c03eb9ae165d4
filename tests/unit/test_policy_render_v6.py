"""Policy rendered for ip6tables (Felix renders every chain once per IP family), and the policy
calc's second family: rules split by family, ICMPv6, cali60 sets with IPv6 members, neighbour
discovery ahead of workload egress policy, IPv6 VXLAN between nodes."""

from __future__ import annotations

from typing import Any

from felixpy.calc.policy import PolicyCalc
from felixpy.datastore import keys
from felixpy.datastore.syncer import KVUpdate
from felixpy.model.resources import validate
from policy import calico, k8s, render
from policy.ipsets import ipset_members, named_port_set_name, selector_set_name
from policy.model import (
    ContainerPort,
    Endpoint,
    EndpointMatch,
    EntityRule,
    ICMPMatch,
    NamedPort,
    Policy,
    PortRange,
    Rule,
)
from tests.support.polling import wait_for
from tests.unit.test_calc_policy import NODE, feed, gnp, hep, netset, np, profile

WEB = EndpointMatch("app == 'web'", namespace="demo")


def bodies(rules: tuple[Any, ...] | list[Any]) -> list[str]:
    return [r.render_body() for r in rules]


def ingress(*rules: Rule) -> Policy:
    return Policy(name="p", namespace="demo", selector="all()", types=frozenset({"Ingress"}), ingress=rules)


def rendered(policy: Policy, ip_version: int) -> list[str]:
    return bodies(render.policy_chains(policy, ip_version)[0].rules)


def test_ip_version_renders_a_rule_in_its_family_only() -> None:
    policy = ingress(Rule("Allow", protocol="TCP", ip_version=4), Rule("Deny", protocol="UDP", ip_version=6),
                     Rule("Log"))
    v4, v6 = rendered(policy, 4), rendered(policy, 6)
    assert [b for b in v4 if "-p tcp" in b] and not [b for b in v4 if "-p udp" in b]
    assert [b for b in v6 if "-p udp" in b] and not [b for b in v6 if "-p tcp" in b]
    assert any("LOG" in b for b in v4) and any("LOG" in b for b in v6)  # no ipVersion: both


def test_nets_of_the_other_family_drop_the_rule_there_and_mixed_lists_keep_their_own() -> None:
    only_v4 = Rule("Allow", source=EntityRule(nets=("10.0.0.0/8",)))
    only_v6 = Rule("Allow", source=EntityRule(nets=("fd00::/8",)))
    mixed = Rule("Deny", destination=EntityRule(nets=("192.0.2.0/24", "2001:db8::/32")))
    not_v4 = Rule("Allow", protocol="UDP", destination=EntityRule(not_nets=("10.1.0.0/16",)))
    v4 = rendered(ingress(only_v4, only_v6, mixed, not_v4), 4)
    v6 = rendered(ingress(only_v4, only_v6, mixed, not_v4), 6)
    assert any("-s 10.0.0.0/8" in b for b in v4) and not any("fd00::/8" in b for b in v4)
    assert any("-s fd00::/8" in b for b in v6) and not any("10.0.0.0/8" in b for b in v6)
    assert any("-d 192.0.2.0/24" in b and "DROP" in b for b in v4)
    assert any("-d 2001:db8::/32" in b and "DROP" in b for b in v6)
    # Felix's FilterRuleToIPVersion: notNets all of the other family leave no rule in that table.
    assert any("! -d 10.1.0.0/16" in b for b in v4) and not any("-p udp" in b for b in v6)


def test_icmpv6_rules_render_for_ip6tables_and_icmp_rules_for_iptables() -> None:
    ping6 = Rule("Allow", protocol="ICMPv6", icmp=ICMPMatch(128, 0))
    any_icmp6 = Rule("Deny", protocol="ICMPv6")
    ping4 = Rule("Allow", protocol="ICMP", icmp=ICMPMatch(8))
    not_echo6 = Rule("Allow", protocol="ICMPv6", not_icmp=ICMPMatch(129))
    not_icmp = Rule("Deny", not_protocol="ICMPv6")
    policy = ingress(ping6, any_icmp6, ping4, not_echo6, not_icmp)
    v4, v6 = rendered(policy, 4), rendered(policy, 6)
    assert "-p ipv6-icmp -m icmp6 --icmpv6-type 128/0 -j MARK --set-xmark 0x10000/0x10000" in v6
    assert "-p ipv6-icmp -j DROP" in v6
    assert "-p ipv6-icmp -m icmp6 ! --icmpv6-type 129 -j MARK --set-xmark 0x10000/0x10000" in v6
    assert "! -p ipv6-icmp -j DROP" in v6
    assert not any("-p icmp " in b or "-m icmp " in b for b in v6)  # no IPv4 ICMP in ip6tables
    assert "-p icmp -m icmp --icmp-type 8 -j MARK --set-xmark 0x10000/0x10000" in v4
    assert not any("ipv6-icmp" in b for b in v4)
    assert "-j DROP" in v4  # notProtocol ICMPv6 is always true for IPv4


def test_selector_and_named_port_sets_are_per_family_with_that_familys_members() -> None:
    policy = ingress(Rule("Allow", protocol="TCP", source=EntityRule(endpoints=WEB),
                          destination=EntityRule(ports=(NamedPort("http"), PortRange(443, 443)))))
    sets4, sets6 = render.ipsets_for_policy(policy, 4), render.ipsets_for_policy(policy, 6)
    sel4, sel6 = selector_set_name(WEB), selector_set_name(WEB, 6)
    assert sel4.startswith("cali40s:") and sel6 == "cali60s:" + sel4.removeprefix("cali40s:")
    named6 = named_port_set_name(None, "http", "tcp", 6)
    assert set(sets6) == {sel6, named6} and set(sets4) == {sel4, named_port_set_name(None, "http", "tcp")}
    v6 = " ".join(rendered(policy, 6))
    assert f"--match-set {sel6} src" in v6 and f"--match-set {named6} dst,dst" in v6 and "cali40" not in v6
    web = Endpoint("demo", "web", (("app", "web"),), (), ("10.65.0.5/32", "fd00:10:244::5/128"),
                   (ContainerPort("http", "TCP", 8080),))
    net = Endpoint("demo", "nets", (("app", "web"),), (), ("192.0.2.0/24", "2001:db8::/64"), kind="networkset")
    assert ipset_members(sets4[sel4], [web, net]) == {"10.65.0.5", "192.0.2.0/24"}
    assert ipset_members(sets6[sel6], [web, net]) == {"fd00:10:244::5", "2001:db8::/64"}
    assert ipset_members(sets6[named6], [web]) == {"fd00:10:244::5,tcp:8080"}


def test_workloads_keep_neighbour_discovery_to_the_host_ahead_of_egress_policy() -> None:
    v6 = {c.name: c for c in render.static_chains(ip_version=6)}
    v4 = {c.name: c for c in render.static_chains()}
    to_host = bodies(v6[render.CHAIN_WL_TO_HOST].rules)
    # Felix's ICMPv6Filter: MLD 130-132, router solicitation 133, neighbour solicitation and
    # advertisement 135/136 accepted before the endpoint's egress chain (dispatch) runs.
    assert to_host[:6] == [f"-p ipv6-icmp -m icmp6 --icmpv6-type {t} -j ACCEPT" for t in (130, 131, 132, 133, 135, 136)]
    assert to_host[6] == f"-j {render.CHAIN_FROM_WL_DISPATCH}"
    assert bodies(v4[render.CHAIN_WL_TO_HOST].rules)[0] == f"-j {render.CHAIN_FROM_WL_DISPATCH}"
    # Router advertisements (134) from a pod are not among them: policy decides.
    assert not any("--icmpv6-type 134" in b for b in to_host)
    # Everything else is the same chain in both families.
    for name in (render.CHAIN_FORWARD, render.CHAIN_OUTPUT, render.CHAIN_FAILSAFE_IN, render.CHAIN_FAILSAFE_OUT):
        assert v4[name] == v6[name]


def test_ipv6_vxlan_between_nodes_is_allowed_before_host_endpoint_policy_and_ipip_is_ipv4_only() -> None:
    encap = render.HostEncap(vxlan=True, ipip=True)
    v6 = {c.name: c for c in render.static_chains(encap=encap, ip_version=6)}
    first = bodies(v6[render.CHAIN_INPUT].rules)
    assert first[0] == ("-p udp -m multiport --dports 4789 -m set --match-set cali60all-hosts-net src "
                        "-m addrtype --dst-type LOCAL -m comment --comment \"Allow IPv6 VXLAN packets from "
                        "Calico hosts\" -j ACCEPT")
    assert not any("-p 4 " in b for b in first)
    table = render.render_filter_table([], {}, {}, encap=encap, ip_version=6)
    assert set(table.ipsets) == {render.ALL_HOSTS_SET_V6}


def test_kubernetes_policy_with_both_families_ipblocks_renders_each_in_its_table() -> None:
    knp = {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
           "metadata": {"name": "dual", "namespace": "demo"},
           "spec": {"podSelector": {}, "policyTypes": ["Ingress"],
                    "ingress": [{"from": [{"ipBlock": {"cidr": "10.0.0.0/8", "except": ["10.1.0.0/16"]}},
                                          {"ipBlock": {"cidr": "fd00::/8", "except": ["fd00:1::/32"]}}]}]}}
    policy = calico.policy_from_resource(k8s.convert_k8s_networkpolicy(knp))
    v4, v6 = rendered(policy, 4), rendered(policy, 6)
    for rules, net, excepted, other in ((v4, "10.0.0.0/8", "10.1.0.0/16", "fd00"), (v6, "fd00::/8", "fd00:1::/32", "10.")):
        assert any(f"-s {excepted} -j MARK --set-xmark 0x0/0x40000" == b for b in rules)
        assert any(b.startswith(f"-s {net} -m mark --mark 0x40000/0x40000") for b in rules)
        assert not any(other in b for b in rules)


def test_calico_ip_version_and_icmpv6_fields_are_accepted_and_converted() -> None:
    res = validate({"apiVersion": "projectcalico.org/v3", "kind": "GlobalNetworkPolicy", "metadata": {"name": "g"},
                    "spec": {"ingress": [{"action": "Allow", "ipVersion": 6, "protocol": "ICMPv6",
                                          "icmp": {"type": 128, "code": 0}}]}})
    rule = calico.policy_from_resource(res).ingress[0]
    assert rule.ip_version == 6 and rule.protocol == "ICMPv6" and rule.icmp == ICMPMatch(128, 0)


# -- the policy calc's IPv6 family ---------------------------------------------------------------

def dual_wep(node: str, ns: str, pod: str, ip4: str, ip6: str, labels: dict[str, str],
             ports: list[dict[str, Any]] | None = None) -> KVUpdate:
    name = f"{node}-k8s-{pod}-eth0"
    value = {
        "apiVersion": "projectcalico.org/v3", "kind": "WorkloadEndpoint",
        "metadata": {"name": name, "namespace": ns,
                     "labels": {**labels, "projectcalico.org/namespace": ns, "projectcalico.org/orchestrator": "k8s"}},
        "spec": {"node": node, "orchestrator": "k8s", "pod": pod, "endpoint": "eth0", "interfaceName": f"cali{pod}",
                 "ipNetworks": [f"{ip4}/32", f"{ip6}/128"], "profiles": [f"kns.{ns}"], "ports": ports or []},
    }
    return KVUpdate(keys.resource_key("workloadendpoints", name, ns), value, 1)


ALLOW_WEB = np("a", "allow-web", {
    "selector": "app == 'db'", "types": ["Ingress"],
    "ingress": [{"action": "Allow", "protocol": "TCP", "source": {"selector": "app == 'web'"},
                 "destination": {"ports": ["http"]}},
                {"action": "Allow", "source": {"selector": "role == 'ext'"}},
                {"action": "Allow", "ipVersion": 6, "protocol": "ICMPv6", "icmp": {"type": 128}}]})


def dual_world() -> list[KVUpdate]:
    return [profile("a"),
            dual_wep(NODE, "a", "web", "10.244.1.1", "fd00:10:244::1", {"app": "web"}),
            dual_wep(NODE, "a", "db", "10.244.1.2", "fd00:10:244::2", {"app": "db"},
                     [{"name": "http", "port": 5432, "protocol": "TCP"}]),
            dual_wep("n2", "a", "web2", "10.244.2.1", "fd00:10:244::41", {"app": "web"}),
            netset("ext", ["198.51.100.0/24", "2001:db8:1::/48"], {"role": "ext"}, ns="a"),
            hep("n2-eth0", "eth0", {"role": "node"}, node="n2", ips=["192.0.2.12", "fd00:192::12"]),
            gnp("from-nodes", {"selector": "app == 'db'", "types": ["Ingress"],
                               "ingress": [{"action": "Allow", "source": {"selector": "role == 'node'"}}]})]


def test_policy_calc_renders_ip6tables_with_cali60_sets_of_ipv6_members() -> None:
    calc = feed(PolicyCalc(NODE, ipv6=True), *dual_world(), ALLOW_WEB)
    v4, v6 = calc.filter_state(4), calc.filter_state(6)
    assert v4.ip_version == 4 and v6.ip_version == 6
    assert all(n.startswith("cali40") for n in v4.ipsets) and all(n.startswith("cali60") for n in v6.ipsets)
    members6 = set().union(*(s.members for s in v6.ipsets.values()))
    assert {"fd00:10:244::1", "fd00:10:244::41", "fd00:10:244::2,tcp:5432", "2001:db8:1::/48",
            "fd00:192::12"} <= members6
    assert not any("." in m.split(",")[0] for m in members6)
    members4 = set().union(*(s.members for s in v4.ipsets.values()))
    assert {"10.244.1.1", "198.51.100.0/24", "192.0.2.12"} <= members4 and not any(":" in m.split(",")[0]
                                                                                 for m in members4)
    # Endpoint and dispatch chains are the very same objects in both families; policy chains differ.
    assert v4.chains["cali-tw-calidb"] is v6.chains["cali-tw-calidb"]
    assert v4.chains["cali-pi-a/allow-web"] != v6.chains["cali-pi-a/allow-web"]
    assert any("--icmpv6-type 128" in b for b in bodies(v6.chains["cali-pi-a/allow-web"].rules))
    # The calc's output equals a from-scratch render of the same index, per family.
    for state, family in ((v4, 4), (v6, 6)):
        table = render.render_filter_table(list(calc.endpoint_chains().values()), calc.active_policies(),
                                           calc.active_profiles(), calc.config,
                                           host_endpoints=list(calc.host_endpoint_chains().values()),
                                           ip_version=family)
        assert dict(state.chains) == dict(table.chains) and set(state.ipsets) == set(table.ipsets)


def test_policy_calc_without_ipv6_renders_no_ipv6_family() -> None:
    calc = feed(PolicyCalc(NODE), *dual_world(), ALLOW_WEB)
    assert not any(n.startswith("cali60") for n in calc.ipsets())
    try:
        calc.filter_state(6)
    except ValueError as err:
        assert "IPv6" in str(err)
    else:
        raise AssertionError("filter_state(6) without IPv6 support")


def test_ipv6_pools_and_node_addresses_feed_the_ipv6_all_hosts_set() -> None:
    def pool(name: str, cidr: str, vxlan: str) -> KVUpdate:
        value = {"apiVersion": "projectcalico.org/v3", "kind": "IPPool", "metadata": {"name": name},
                 "spec": {"cidr": cidr, "vxlanMode": vxlan, "ipipMode": "Never"}}
        return KVUpdate(keys.resource_key("ippools", name), value, 1)

    def node(name: str, ip4: str, ip6: str) -> KVUpdate:
        value = {"apiVersion": "projectcalico.org/v3", "kind": "Node", "metadata": {"name": name},
                 "spec": {"bgp": {"ipv4Address": f"{ip4}/24", "ipv6Address": f"{ip6}/64"}}}
        return KVUpdate(keys.resource_key("nodes", name), value, 1)

    calc = feed(PolicyCalc(NODE, ipv6=True), *dual_world(), pool("p4", "10.244.0.0/16", "Never"),
                pool("p6", "fd00:10:244::/64", "Always"), node(NODE, "192.0.2.11", "fd00:192::11"),
                node("n2", "192.0.2.12", "fd00:192::12"))
    v4, v6 = calc.filter_state(4), calc.filter_state(6)
    assert render.ALL_HOSTS_SET not in v4.ipsets  # the IPv4 pool does not encapsulate
    assert v6.ipsets[render.ALL_HOSTS_SET_V6].members == {"fd00:192::11", "fd00:192::12"}
    assert "Allow IPv6 VXLAN packets from Calico hosts" in v6.chains["cali-INPUT"].rules[0].comment


def test_agent_programs_each_family_into_its_own_tables_and_sets() -> None:
    import threading

    from felixpy.dataplane.drivers.ipsets import IPSets
    from felixpy.dataplane.drivers.iptables import Table
    from felixpy.datastore.memory import MemoryDatastore
    from felixpy.node.agent import Agent
    from tests.fakes.dataplane import FakeDataplane
    from tests.fakes.iptables import FakeIpset, FakeIptables

    store = MemoryDatastore()
    for u in dual_world():
        store.create(u.key, u.value)
    dp, ip6tables, ipset6 = FakeDataplane(), FakeIptables(), FakeIpset()
    def table6(name: str) -> Table:
        return Table(name, backend="nft", runner=ip6tables, ip_version=6, sleep=lambda _: None)

    agent = Agent(store=store, node_name=NODE, networking_backend="none", route_refresh_interval=0,
                  iptables_refresh_interval=0, **dp.drivers(), filter6_table=table6("filter"),
                  mangle6_table=table6("mangle"), raw6_table=table6("raw"), ipsets6=IPSets(runner=ipset6, ip_version=6))
    thread = threading.Thread(target=agent.run, daemon=True)
    thread.start()

    try:
        wait_for(lambda: agent.status.applies >= 1)
        assert "cali-wl-to-host" in ip6tables.tables["filter"] and "cali-PREROUTING" in ip6tables.tables["raw"]
        store.create(ALLOW_WEB.key, ALLOW_WEB.value)
        wait_for(lambda: "cali-pi-a/allow-web" in ip6tables.tables["filter"]
                 and "cali-pi-a/allow-web" in dp.chains("filter"))
        members6 = set().union(*(m for _, m in ipset6.sets.values()))
        members4 = set().union(*dp.set_members().values())
        assert "fd00:10:244::1" in members6 and "10.244.1.1" in members4
        assert not any("." in m.split(",")[0] for m in members6) and all(n.startswith("cali60") for n in ipset6.sets)
        assert any("--icmpv6-type 128" in r for r in ip6tables.tables["filter"]["cali-pi-a/allow-web"])
        assert not any("icmp" in r for r in dp.chains("filter")["cali-pi-a/allow-web"])
        store.delete(ALLOW_WEB.key)
        wait_for(lambda: "cali-pi-a/allow-web" not in ip6tables.tables["filter"])
    finally:
        agent.stop()
        thread.join(5)
