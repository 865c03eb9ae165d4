"""policy/render.py: model values → Felix-style filter chains, checked as text (golden files).

Goldens live in tests/unit/golden/; regenerate after an intended change with
`FELIXPY_UPDATE_GOLDEN=1 .venv/bin/python -m pytest -q tests/unit/test_policy_render.py` and
review the diff. The policies below are written directly as model values, shaped like what the
Kubernetes converter produces (order 1000, knp.default.<name>, orchestrator selector).
"""

from __future__ import annotations

import base64
import hashlib
import os
import random
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from policy import render
from policy.iptables import Chain, render_chain
from policy.ipsets import named_port_set_name, selector_set_name
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
from policy.names import MAX_CHAIN_NAME, MAX_IPSET_NAME
from policy.render import EndpointChains, RenderConfig

GOLDEN = Path(__file__).parent / "golden"
K8S = "projectcalico.org/orchestrator == 'k8s'"


def check_golden(name: str, text: str) -> None:
    path = GOLDEN / name
    if os.environ.get("FELIXPY_UPDATE_GOLDEN") == "1":
        path.parent.mkdir(exist_ok=True)
        path.write_text(text)
    assert path.exists(), f"golden {path} missing: run with FELIXPY_UPDATE_GOLDEN=1"
    assert text == path.read_text(), f"{name} differs from its golden file"


def chains_text(chains: list[Chain]) -> str:
    out: list[str] = []
    for chain in chains:
        out.append(f":{chain.name}")
        out.extend(render_chain(chain))
    return "\n".join(out) + "\n"


def port(n: int, m: int | None = None) -> PortRange:
    return PortRange(n, n if m is None else m)


# -- the policies the goldens are made of ---------------------------------------------------------

DENY_ALL_INGRESS = Policy(
    name="knp.default.deny-all", namespace="demo", selector=K8S,
    types=frozenset({"Ingress"}), order=1000,
)

ALLOW_FRONTEND = Policy(
    name="knp.default.allow-frontend", namespace="demo",
    selector=f"{K8S} && app == 'web'", types=frozenset({"Ingress"}), order=1000,
    ingress=(
        # podSelector peer: same namespace, TCP 80 and a named port.
        Rule("Allow", protocol="TCP",
             source=EntityRule(endpoints=EndpointMatch(f"{K8S} && role == 'frontend'", namespace="demo")),
             destination=EntityRule(ports=(port(80), NamedPort("http")))),
        # namespaceSelector + podSelector in one peer (AND), UDP endPort range.
        Rule("Allow", protocol="UDP",
             source=EntityRule(endpoints=EndpointMatch(f"{K8S} && role == 'probe'",
                                                       namespace_selector="team == 'ops'")),
             destination=EntityRule(ports=(port(5000, 5100),))),
    ),
)

IPBLOCK_EGRESS = Policy(
    name="knp.default.egress-ipblock", namespace="demo", selector=K8S,
    types=frozenset({"Egress"}), order=1000,
    egress=(
        Rule("Allow", protocol="TCP",
             destination=EntityRule(nets=("10.0.0.0/8",), not_nets=("10.1.0.0/16",), ports=(port(443),))),
        Rule("Allow",
             destination=EntityRule(nets=("192.0.2.0/24",), not_nets=("192.0.2.0/28", "192.0.2.128/25"))),
        Rule("Allow", destination=EntityRule(nets=("198.51.100.0/24", "203.0.113.7/32", "2001:db8::/32"))),
    ),
)

GNP_ACTIONS = Policy(
    name="ops-all-actions", namespace=None, selector="all()", order=10,
    types=frozenset({"Ingress", "Egress"}),
    ingress=(
        Rule("Log", protocol="TCP", destination=EntityRule(ports=(port(22),))),
        Rule("Deny", protocol="ICMP", icmp=ICMPMatch(8, 0)),
        Rule("Allow", not_icmp=ICMPMatch(3)),  # no protocol: ICMP but not type 3, or not ICMP
        Rule("Pass", protocol="UDP", destination=EntityRule(not_ports=(port(53), NamedPort("dns")))),
        Rule("Deny", not_protocol="TCP", source=EntityRule(not_endpoints=EndpointMatch("quarantine == 'true'"))),
        Rule("Allow", protocol="47"),  # GRE by number
        Rule("Allow", protocol="6", destination=EntityRule(ports=tuple(port(p) for p in range(1000, 1020)))),
    ),
    egress=(
        Rule("Allow", destination=EntityRule(ports=(port(8080, 8090),))),  # any port protocol
        Rule("Deny", protocol="ICMP", destination=EntityRule(ports=(port(1),))),  # never matches
        Rule("Allow", protocol="ICMPv6"),  # never matches IPv4
        Rule("Deny", source=EntityRule(ports=(NamedPort("metrics"),)), protocol="SCTP"),
    ),
)

KNS_DEMO = Profile("kns.demo", ingress=(Rule("Allow"),), egress=(Rule("Allow"),),
                   labels_to_apply=(("kubernetes.io/metadata.name", "demo"),))


def test_golden_k8s_deny_all_ingress() -> None:
    chains = render.policy_chains(DENY_ALL_INGRESS)
    assert [c.rules for c in chains] == [()]  # nothing allows: the end-of-tier DROP decides
    check_golden("policy_deny_all_ingress.txt", chains_text(chains))


def test_golden_k8s_allow_frontend() -> None:
    check_golden("policy_allow_frontend.txt", chains_text(render.policy_chains(ALLOW_FRONTEND)))


def test_golden_k8s_ipblock_egress() -> None:
    chains = render.policy_chains(IPBLOCK_EGRESS)
    text = chains_text(chains)
    assert "2001:db8" not in text  # IPv6 nets have no place in the IPv4 table
    assert "-j MARK --set-xmark 0x40000/0x40000" in text  # two excepts need the scratch mark
    check_golden("policy_ipblock_egress.txt", text)


def test_golden_calico_all_actions() -> None:
    text = chains_text(render.policy_chains(GNP_ACTIONS))
    assert "icmpv6" not in text
    check_golden("policy_gnp_actions.txt", text)


def test_golden_profile() -> None:
    check_golden("profile_kns_demo.txt", chains_text(render.profile_chains(KNS_DEMO)))


def two_endpoint_table(config: RenderConfig = RenderConfig()) -> render.FilterTable:
    policies = {p.id: p for p in (DENY_ALL_INGRESS, ALLOW_FRONTEND, IPBLOCK_EGRESS, GNP_ACTIONS)}
    endpoints = [
        EndpointChains.default_tier("cali0a1b2c3d4e5",
                                    ingress=(GNP_ACTIONS.id, ALLOW_FRONTEND.id, DENY_ALL_INGRESS.id),
                                    egress=(GNP_ACTIONS.id, IPBLOCK_EGRESS.id), profiles=("kns.demo",)),
        EndpointChains("cali9f8e7d6c5b4", profiles=("kns.demo",)),
    ]
    return render.render_filter_table(endpoints, policies, {"kns.demo": KNS_DEMO}, config)


def test_golden_filter_table_two_endpoints() -> None:
    check_golden("filter_two_endpoints.txt", render.restore_text(two_endpoint_table()))


def test_golden_dispatch_tree() -> None:
    ifaces = [f"cali{i:02x}{'0' * 9}" for i in range(0, 40)]
    check_golden("dispatch_40.txt", chains_text(render.dispatch_chains(ifaces)))


# -- endpoint chains ------------------------------------------------------------------------------


def bodies(chain: Chain) -> list[str]:
    return [r.render_body() for r in chain.rules]


def test_endpoint_chain_order_follows_felix() -> None:
    policies = {ALLOW_FRONTEND.id: ALLOW_FRONTEND, DENY_ALL_INGRESS.id: DENY_ALL_INGRESS}
    tw, fw = render.endpoint_chains(
        EndpointChains.default_tier("cali12345", ingress=(ALLOW_FRONTEND.id, DENY_ALL_INGRESS.id),
                                    profiles=("kns.demo",)),
        policies,
    )
    pi_front = render.policy_chain_name(ALLOW_FRONTEND.id, "Ingress")
    pi_deny = render.policy_chain_name(DENY_ALL_INGRESS.id, "Ingress")
    assert tw.name == "cali-tw-cali12345" and fw.name == "cali-fw-cali12345"
    assert bodies(tw) == [
        "-m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT",
        "-m conntrack --ctstate INVALID -j DROP",
        "-j MARK --set-xmark 0x0/0x30000",
        f"-m mark --mark 0x0/0x20000 -j {pi_front}",
        '-m mark --mark 0x10000/0x10000 -m comment --comment "Return if policy accepted" -j RETURN',
        f"-m mark --mark 0x0/0x20000 -j {pi_deny}",
        '-m mark --mark 0x10000/0x10000 -m comment --comment "Return if policy accepted" -j RETURN',
        '-m mark --mark 0x0/0x20000 -m comment --comment "End of tier default. Drop if no policies passed packet" -j DROP',
        "-j cali-pri-kns.demo",
        '-m mark --mark 0x10000/0x10000 -m comment --comment "Return if profile accepted" -j RETURN',
        '-m comment --comment "Drop if no profiles matched" -j DROP',
    ]
    # No egress policy: no end-of-tier drop, the profile decides.
    assert bodies(fw)[3:] == [
        "-j cali-pro-kns.demo",
        '-m mark --mark 0x10000/0x10000 -m comment --comment "Return if profile accepted" -j RETURN',
        '-m comment --comment "Drop if no profiles matched" -j DROP',
    ]


def test_endpoint_chain_skips_wrong_direction_and_fails_closed_on_missing_policy() -> None:
    tw, fw = render.endpoint_chains(
        EndpointChains.default_tier("cali1", ingress=(IPBLOCK_EGRESS.id,), egress=("demo/vanished",)),
        {IPBLOCK_EGRESS.id: IPBLOCK_EGRESS},
    )
    # An Egress-only policy listed for ingress is not a policy for that direction.
    assert not any("End of tier" in b or "cali-pi-" in b for b in bodies(tw))
    # A listed policy that is unknown keeps the end-of-tier DROP but has no jump to a missing chain.
    assert any("End of tier" in b for b in bodies(fw))
    assert not any("cali-po-" in b for b in bodies(fw))
    assert bodies(fw)[-1] == '-m comment --comment "Drop if no profiles matched" -j DROP'


def test_endpoint_chain_leaves_out_unknown_profiles() -> None:
    tw, _ = render.endpoint_chains(EndpointChains("cali1", profiles=("kns.a", "kns.gone")), {},
                                   known_profiles={"kns.a"})
    assert "-j cali-pri-kns.a" in bodies(tw)
    assert not any("kns.gone" in b for b in bodies(tw))


# -- static chains, config ------------------------------------------------------------------------


@pytest.mark.parametrize("action", ["DROP", "RETURN", "ACCEPT"])
def test_wl_to_host_runs_egress_policy_then_configured_action(action: str) -> None:
    chains = {c.name: c for c in render.static_chains(RenderConfig(default_endpoint_to_host_action=action))}  # type: ignore[arg-type]
    assert bodies(chains["cali-wl-to-host"]) == [
        "-j cali-from-wl-dispatch",
        f'-m comment --comment "Configured DefaultEndpointToHostAction" -j {action}',
    ]
    assert bodies(chains["cali-INPUT"])[0] == "-i cali+ -g cali-wl-to-host"


def test_static_chains_forward_and_failsafes() -> None:
    chains = {c.name: c for c in render.static_chains(RenderConfig())}
    assert bodies(chains["cali-FORWARD"]) == [
        "-j MARK --set-xmark 0x0/0x60000",
        '-m mark --mark 0x0/0x10000 -m comment --comment "Ingress host endpoint: forward policy" '
        "-j cali-from-hep-forward",
        '-i cali+ -m comment --comment "From workload: egress policy" -j cali-from-wl-dispatch',
        '-o cali+ -m comment --comment "To workload: ingress policy" -j cali-to-wl-dispatch',
        '-m comment --comment "Egress host endpoint: forward policy" -j cali-to-hep-forward',
        '-m mark --mark 0x10000/0x10000 -m comment --comment "Policy explicitly accepted packet" -j ACCEPT',
        "-j MARK --set-xmark 0x10000/0x10000",
    ]
    assert bodies(chains["cali-INPUT"]) == [
        "-i cali+ -g cali-wl-to-host",
        '-m mark --mark 0x10000/0x10000 -m comment --comment "Accepted by raw or mangle host endpoint policy" '
        "-j ACCEPT",
        "-j MARK --set-xmark 0x0/0x70000",
        "-j cali-from-host-endpoint",
        '-m mark --mark 0x10000/0x10000 -m comment --comment "Host endpoint policy accepted packet" -j ACCEPT',
    ]
    output = bodies(chains["cali-OUTPUT"])
    assert output[1] == '-o cali+ -m comment --comment "Host to workload traffic is not policed" -j RETURN'
    assert "-m conntrack ! --ctstate DNAT -j cali-to-host-endpoint" in output
    # Failsafe ports ACCEPT (Felix's Allow): only host endpoint chains jump to them.
    failsafe_in = " ".join(bodies(chains["cali-failsafe-in"]))
    assert "-p tcp -m multiport --dports 22,179,2379,2380,5473,6443,6666,6667" in failsafe_in
    assert "-p udp -m multiport --dports 68" in failsafe_in
    assert all(b.endswith("-j ACCEPT") for b in bodies(chains["cali-failsafe-in"]))
    assert "-p udp -m multiport --dports 53,67" in " ".join(bodies(chains["cali-failsafe-out"]))
    assert render.jump_rules() == {
        "INPUT": [render.Rule("", "cali-INPUT")],
        "FORWARD": [render.Rule("", "cali-FORWARD")],
        "OUTPUT": [render.Rule("", "cali-OUTPUT")],
    }


def test_custom_iface_prefix() -> None:
    config = RenderConfig(iface_prefix="tap")
    chains = {c.name: c for c in render.static_chains(config)}
    assert "-i tap+" in bodies(chains["cali-FORWARD"])[2]


@pytest.mark.parametrize("kwargs", [
    {"default_endpoint_to_host_action": "REJECT"},
    {"iface_prefix": "ca li"},
    {"failsafe_inbound": (("tcp", 0),)},
    {"failsafe_outbound": (("icmp", 22),)},
])
def test_bad_config_is_one_clear_error(kwargs: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        RenderConfig(**kwargs)  # type: ignore[arg-type]


# -- policy rules ---------------------------------------------------------------------------------


def rule_bodies(*rules: Rule) -> list[str]:
    policy = Policy(name="p", namespace=None, selector="all()", types=frozenset({"Ingress"}), ingress=rules)
    return bodies(render.policy_chains(policy)[0])


def test_allow_deny_pass_log_actions() -> None:
    assert rule_bodies(Rule("Allow")) == [
        "-j MARK --set-xmark 0x10000/0x10000", "-m mark --mark 0x10000/0x10000 -j RETURN"]
    assert rule_bodies(Rule("Pass")) == [
        "-j MARK --set-xmark 0x20000/0x20000", "-m mark --mark 0x20000/0x20000 -j RETURN"]
    assert rule_bodies(Rule("Deny")) == ["-j DROP"]
    assert rule_bodies(Rule("Log")) == ['-j LOG --log-prefix "calico-packet: " --log-level 5']


@pytest.mark.parametrize("rule", [
    Rule("Deny", protocol="ICMP", destination=EntityRule(ports=(port(80),))),
    Rule("Deny", protocol="47", source=EntityRule(ports=(port(80),))),
    Rule("Deny", protocol="UDP", icmp=ICMPMatch(8)),
    Rule("Deny", protocol="ICMPv6"),
    Rule("Deny", protocol="TCP", not_protocol="TCP"),
    Rule("Deny", destination=EntityRule(nets=("2001:db8::/32",))),
    Rule("Deny", protocol="UDPLite", destination=EntityRule(ports=(NamedPort("http"),))),
    Rule("Deny", protocol="ICMP", not_icmp=ICMPMatch()),
])
def test_rule_that_cannot_match_renders_to_nothing(rule: Rule) -> None:
    assert rule_bodies(rule) == []
    policy = Policy(name="p", namespace=None, selector="all()", types=frozenset({"Ingress"}), ingress=(rule,))
    assert render.ipsets_for_policy(policy) == {}


def test_ports_without_protocol_mean_every_port_protocol() -> None:
    assert rule_bodies(Rule("Deny", destination=EntityRule(ports=(port(53),)))) == [
        f"-p {p} -m multiport --dports 53 -j DROP" for p in ("tcp", "udp", "sctp", "udplite")]
    assert rule_bodies(Rule("Deny", not_protocol="UDP", destination=EntityRule(ports=(port(53),)))) == [
        f"-p {p} -m multiport --dports 53 -j DROP" for p in ("tcp", "sctp", "udplite")]


def test_multiport_holds_at_most_15_entries_ranges_count_twice() -> None:
    singles = rule_bodies(Rule("Deny", protocol="TCP", destination=EntityRule(ports=tuple(port(p) for p in range(1, 21)))))
    assert singles == [
        "-p tcp -m multiport --dports 1,2,3,4,5,6,7,8,9,10,11,12,13,14,15 -j DROP",
        "-p tcp -m multiport --dports 16,17,18,19,20 -j DROP",
    ]
    ranges = rule_bodies(Rule("Deny", protocol="TCP", destination=EntityRule(
        ports=tuple(port(p, p + 5) for p in range(100, 200, 10)))))
    assert [b.split("--dports ")[1].split()[0].count(",") + 1 for b in ranges] == [7, 3]
    # Negated port lists are AND-ed, so several multiport matches share one rule.
    negated = rule_bodies(Rule("Deny", protocol="TCP", destination=EntityRule(not_ports=tuple(port(p) for p in range(1, 21)))))
    assert negated == ["-p tcp -m multiport ! --dports 1,2,3,4,5,6,7,8,9,10,11,12,13,14,15 "
                       "-m multiport ! --dports 16,17,18,19,20 -j DROP"]


def test_or_of_nets_and_named_ports_expands() -> None:
    dst = EndpointMatch("app == 'db'")
    out = rule_bodies(Rule("Deny", protocol="TCP", source=EntityRule(nets=("10.0.0.0/8", "172.16.0.1")),
                           destination=EntityRule(endpoints=dst, ports=(port(5432), NamedPort("pg")))))
    sel = selector_set_name(dst)
    named = named_port_set_name(dst, "pg", "tcp")
    assert out == [
        f"-p tcp -s 10.0.0.0/8 -m set --match-set {sel} dst -m multiport --dports 5432 -j DROP",
        f"-p tcp -s 10.0.0.0/8 -m set --match-set {sel} dst -m set --match-set {named} dst,dst -j DROP",
        f"-p tcp -s 172.16.0.1/32 -m set --match-set {sel} dst -m multiport --dports 5432 -j DROP",
        f"-p tcp -s 172.16.0.1/32 -m set --match-set {sel} dst -m set --match-set {named} dst,dst -j DROP",
    ]


def test_single_not_net_is_inline_several_use_scratch_mark() -> None:
    assert rule_bodies(Rule("Deny", source=EntityRule(not_nets=("10.0.0.0/8",)),
                            destination=EntityRule(not_nets=("10.1.0.0/16",)))) == [
        "! -s 10.0.0.0/8 ! -d 10.1.0.0/16 -j DROP"]
    assert rule_bodies(Rule("Deny", source=EntityRule(nets=("10.0.0.0/8",), not_nets=("10.1.0.0/16",)))) == [
        "-j MARK --set-xmark 0x40000/0x40000",
        "-s 10.1.0.0/16 -j MARK --set-xmark 0x0/0x40000",
        "-s 10.0.0.0/8 -m mark --mark 0x40000/0x40000 -j DROP",
    ]


def test_icmp_type_and_code() -> None:
    assert rule_bodies(Rule("Deny", protocol="ICMP", icmp=ICMPMatch(8))) == ["-p icmp -m icmp --icmp-type 8 -j DROP"]
    assert rule_bodies(Rule("Deny", icmp=ICMPMatch(3, 4))) == ["-p icmp -m icmp --icmp-type 3/4 -j DROP"]
    assert rule_bodies(Rule("Deny", protocol="ICMP", not_icmp=ICMPMatch(0))) == [
        "-p icmp -m icmp ! --icmp-type 0 -j DROP"]
    with pytest.raises(ValueError, match="ICMP code needs an ICMP type"):
        rule_bodies(Rule("Deny", protocol="ICMP", icmp=ICMPMatch(None, 1)))


@pytest.mark.parametrize("rule, message", [
    (Rule("Deny", protocol="bogus"), "unknown protocol"),
    (Rule("Deny", protocol="300"), "unknown protocol"),
    (Rule("Deny", source=EntityRule(nets=("10.0.0.300/8",))), "invalid CIDR"),
    (Rule("Deny", protocol="TCP", destination=EntityRule(ports=(port(10, 5),))), "invalid port range"),
    (Rule("Reject"), "unknown rule action"),  # type: ignore[arg-type]
])
def test_invalid_rules_raise_one_line_errors(rule: Rule, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        rule_bodies(rule)


def test_ipsets_for_policy_names_every_set_the_chains_use() -> None:
    sets = render.ipsets_for_policy(ALLOW_FRONTEND) | render.ipsets_for_policy(GNP_ACTIONS)
    text = chains_text(render.policy_chains(ALLOW_FRONTEND) + render.policy_chains(GNP_ACTIONS))
    used = set(re.findall(r"--match-set (\S+)", text))
    assert used == set(sets)
    by_type = {spec.type for spec in sets.values()}
    assert by_type == {"hash:net", "hash:ip,port"}
    http = named_port_set_name(None, "http", "TCP")
    assert sets[http] == render.IPSetSpec("hash:ip,port", None, "http", "tcp")
    metrics = named_port_set_name(None, "metrics", "sctp")
    assert "-p sctp -m set --match-set " + metrics + " src,src -j DROP" in text


# -- names ----------------------------------------------------------------------------------------


def test_long_names_are_hashed_like_felix() -> None:
    long_id = "a-namespace/knp.default.a-rather-long-policy-name"
    name = render.policy_chain_name(long_id, "Ingress")
    digest = base64.urlsafe_b64encode(hashlib.sha256(long_id.encode()).digest()).decode()
    assert name == "cali-pi-_" + digest[: MAX_CHAIN_NAME - len("cali-pi-_")]
    assert len(name) == MAX_CHAIN_NAME
    assert render.policy_chain_name("demo/short", "Egress") == "cali-po-demo/short"
    assert render.profile_chain_name("kns.default", "Ingress") == "cali-pri-kns.default"
    # A suffix that looks hashed is hashed, so it can never collide with a real hash.
    assert render.policy_chain_name("_x", "Ingress").startswith("cali-pi-_") and len(render.policy_chain_name("_x", "Ingress")) == 28
    assert render.length_limited_name("cali-pi-", "has space").startswith("cali-pi-_")
    with pytest.raises(ValueError):
        render.endpoint_chain_name("bad iface", "Ingress")


def test_every_name_in_a_big_table_is_within_limits() -> None:
    table = big_table(200, 100, 5, seed=3)
    assert all(len(n) <= MAX_CHAIN_NAME and n.startswith("cali-") for n in table.chains)
    assert all(len(n) <= MAX_IPSET_NAME and n.startswith("cali40") for n in table.ipsets)


def test_table_references_only_chains_and_sets_it_defines() -> None:
    table = big_table(60, 40, 5, seed=4)
    text = render.restore_text(table)
    chain_lines = "\n".join(line for line in text.splitlines() if line.startswith("-A "))
    targets = set(re.findall(r" -[jg] (cali-\S+)", chain_lines))
    assert targets <= set(table.chains)
    assert set(re.findall(r"--match-set (\S+)", text)) == set(table.ipsets)
    # Every chain is reachable: nothing dead is rendered.
    # (The failsafe chains are static, as in Felix: only host endpoint chains jump to them.)
    assert set(table.chains) - targets == {"cali-INPUT", "cali-FORWARD", "cali-OUTPUT", "cali-failsafe-in",
                                           "cali-failsafe-out"}


# -- dispatch -------------------------------------------------------------------------------------


def dispatch(chains: list[Chain], root: str, iface: str) -> str:
    """Follow the dispatch tree for one interface the way the kernel would."""
    by_name = {c.name: c for c in chains}
    chain = by_name[root]
    for _ in range(20):
        for rule in chain.rules:
            m = re.fullmatch(r"-[io] (\S+)", rule.match)
            if not rule.match:
                return rule.action  # the final DROP
            assert m is not None
            pattern = m.group(1)
            if pattern == iface or (pattern.endswith("+") and iface.startswith(pattern[:-1])):
                target = rule.action.removeprefix("-g ")
                if target.startswith(("cali-fw-", "cali-tw-")):
                    return target
                chain = by_name[target]
                break
        else:
            raise AssertionError(f"chain {chain.name} has no final rule")
    raise AssertionError("dispatch loop")


@pytest.mark.parametrize("count", [0, 1, 16, 17, 40, 300, 1000])
def test_dispatch_tree_reaches_every_interface_and_drops_unknown(count: int) -> None:
    rng = random.Random(count)
    ifaces = sorted({"cali" + "".join(rng.choice("0123456789abcdef") for _ in range(11)) for _ in range(count)})
    chains = render.dispatch_chains(ifaces)
    for iface in ifaces:
        assert dispatch(chains, "cali-from-wl-dispatch", iface) == f"cali-fw-{iface}"
        assert dispatch(chains, "cali-to-wl-dispatch", iface) == f"cali-tw-{iface}"
    for unknown in ("cali00000000000", "califfffffffff0", "calix"):
        if unknown not in ifaces:
            assert dispatch(chains, "cali-from-wl-dispatch", unknown) == "DROP"
    # No chain is longer than the fan-out plus its DROP (except leaves with shared prefixes).
    assert max(len(c.rules) for c in chains) <= render.DISPATCH_FANOUT + 1
    if count <= render.DISPATCH_FANOUT:
        assert [c.name for c in chains] == ["cali-from-wl-dispatch", "cali-to-wl-dispatch"]


def test_dispatch_tree_shape_for_shared_prefixes() -> None:
    # 20 interfaces that share "cali12": the split happens after the common prefix.
    ifaces = [f"cali12{c}{i}" for c in "ab" for i in range(10)]
    chains = render.dispatch_chains(ifaces)
    root = {c.name: c for c in chains}["cali-from-wl-dispatch"]
    assert bodies(root) == [
        "-i cali12a+ -g cali-from-wl-dispatch-12a",
        "-i cali12b+ -g cali-from-wl-dispatch-12b",
        '-m comment --comment "Unknown interface" -j DROP',
    ]
    # An interface that is a prefix of others still gets its own rule.
    nested = [f"cali7{i:02d}" for i in range(20)] + ["cali7"]
    chains = render.dispatch_chains(nested)
    assert dispatch(chains, "cali-to-wl-dispatch", "cali7") == "cali-tw-cali7"
    with pytest.raises(ValueError, match="duplicate"):
        render.dispatch_chains(["cali1", "cali1"])


# -- determinism and cost -------------------------------------------------------------------------


def test_equal_policies_render_equal_chains() -> None:
    copy = Policy(**{f: getattr(ALLOW_FRONTEND, f) for f in ALLOW_FRONTEND.__slots__})  # type: ignore[arg-type]
    assert copy == ALLOW_FRONTEND and copy is not ALLOW_FRONTEND
    assert render.policy_chains(copy) == render.policy_chains(ALLOW_FRONTEND)
    assert hash(copy) == hash(ALLOW_FRONTEND)  # usable as a memo key


def test_rendering_is_stable_across_interpreter_runs() -> None:
    code = (
        "from tests.unit.test_policy_render import two_endpoint_table, big_table;"
        "from policy.render import restore_text;"
        "import hashlib;"
        "print(hashlib.sha256((restore_text(two_endpoint_table()) + restore_text(big_table(50, 30, 5, seed=1))).encode()).hexdigest())"
    )
    root = Path(__file__).resolve().parents[2]
    digests = set()
    for seed in ("1", "2", "random"):
        out = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True,
                             timeout=60, env={**os.environ, "PYTHONHASHSEED": seed}, check=True)
        digests.add(out.stdout.strip())
    local = hashlib.sha256((render.restore_text(two_endpoint_table())
                            + render.restore_text(big_table(50, 30, 5, seed=1))).encode()).hexdigest()
    assert digests == {local}


def synthetic_policy(i: int) -> Policy:
    ns = f"ns{i % 10}"
    return Policy(
        name=f"knp.default.policy-{i}", namespace=ns, selector=f"{K8S} && app == 'app{i % 50}'",
        types=frozenset({"Ingress", "Egress"}), order=1000,
        ingress=(
            Rule("Allow", protocol="TCP",
                 source=EntityRule(endpoints=EndpointMatch(f"{K8S} && role == 'r{i % 7}'", namespace=ns)),
                 destination=EntityRule(ports=(port(80), port(8000, 8100), NamedPort("http")))),
            Rule("Allow", protocol="UDP",
                 source=EntityRule(endpoints=EndpointMatch(K8S, namespace_selector=f"team == 't{i % 3}'"))),
        ),
        egress=(
            Rule("Allow", protocol="TCP", destination=EntityRule(nets=("10.0.0.0/8",), not_nets=(f"10.{i % 250}.0.0/16",),
                                                                 ports=(port(443),))),
            Rule("Allow", protocol="UDP", destination=EntityRule(ports=(port(53),))),
        ),
    )


def big_table(n_endpoints: int, n_policies: int, per_endpoint: int, seed: int) -> render.FilterTable:
    rng = random.Random(seed)
    policies = {p.id: p for p in map(synthetic_policy, range(n_policies))}
    ids = sorted(policies)
    profiles = {f"kns.ns{i}": Profile(f"kns.ns{i}", (Rule("Allow"),), (Rule("Allow"),)) for i in range(10)}
    endpoints: list[EndpointChains] = []
    seen: set[str] = set()
    while len(endpoints) < n_endpoints:
        iface = "cali" + "".join(rng.choice("0123456789abcdef") for _ in range(11))
        if iface in seen:
            continue
        seen.add(iface)
        chosen = tuple(rng.sample(ids, per_endpoint))
        endpoints.append(EndpointChains.default_tier(iface, ingress=chosen, egress=chosen,
                                                     profiles=(f"kns.ns{len(endpoints) % 10}",)))
    return render.render_filter_table(endpoints, policies, profiles)


def test_render_1000_endpoints_500_policies_is_fast() -> None:
    start = time.perf_counter()
    table = big_table(1000, 500, 5, seed=7)
    elapsed = time.perf_counter() - start
    rules = sum(len(c.rules) for c in table.chains.values())
    text_start = time.perf_counter()
    text = render.restore_text(table)
    text_elapsed = time.perf_counter() - text_start
    print(f"render 1000 endpoints x 500 policies: {elapsed * 1000:.0f} ms, chains={len(table.chains)} "
          f"rules={rules} ipsets={len(table.ipsets)}; restore text {text_elapsed * 1000:.0f} ms, "
          f"{len(text) // 1024} KiB")
    assert len([n for n in table.chains if n.startswith("cali-pi-")]) == 500
    assert elapsed < 5.0  # generous for slow CI; typically well under a second


def test_endpoint_for_ipsets_fixture_is_consistent() -> None:
    # Named-port sets used by the goldens carry real members for endpoints declaring the port.
    ep = Endpoint("demo", "web-0", (("app", "web"),), (), ("10.65.0.5/32",),
                  ports=(ContainerPort("http", "TCP", 8080),))
    from policy.ipsets import ipset_members
    spec = render.ipsets_for_policy(ALLOW_FRONTEND)[named_port_set_name(None, "http", "tcp")]
    assert ipset_members(spec, [ep]) == {"10.65.0.5,tcp:8080"}


# -- tiers and host endpoints ---------------------------------------------------------------------

PRE_DNAT = Policy("block-node-port", None, "role == 'node'", frozenset({"Ingress"}), order=10,
                  ingress=(Rule("Deny", protocol="TCP", destination=EntityRule(ports=(port(30080),))),),
                  pre_dnat=True, apply_on_forward=True)
UNTRACKED = Policy("untracked-dns", None, "role == 'node'", frozenset({"Ingress", "Egress"}),
                   ingress=(Rule("Allow", protocol="UDP", destination=EntityRule(ports=(port(53),))),),
                   egress=(Rule("Allow", protocol="UDP", source=EntityRule(ports=(port(53),))),),
                   do_not_track=True, apply_on_forward=True)
HOST_ALLOW = Policy("host-ssh-from-admins", None, "role == 'node'", frozenset({"Ingress"}), tier="security",
                    ingress=(Rule("Allow", protocol="TCP", source=EntityRule(
                        endpoints=EndpointMatch("role == 'admin'")), destination=EntityRule(ports=(port(2222),))),
                             Rule("Pass")))
FORWARD = Policy("forward-web", None, "role == 'node'", frozenset({"Ingress"}), apply_on_forward=True,
                 ingress=(Rule("Allow", protocol="TCP", destination=EntityRule(ports=(port(80),))),))
DEFAULT_ALLOW = Profile("projectcalico-default-allow", (Rule("Allow"),), (Rule("Allow"),))


def host_endpoint_tables() -> render.FilterTable:
    policies = {p.id: p for p in (PRE_DNAT, UNTRACKED, HOST_ALLOW, FORWARD)}
    security = render.TierPolicies("security", "Pass", (HOST_ALLOW.id,))
    default = render.TierPolicies("default", "Deny", (FORWARD.id,))
    eth0 = render.HostEndpointChains(
        "eth0", normal=(security, default), forward=(default,),
        pre_dnat=(render.TierPolicies("default", "Deny", (PRE_DNAT.id,)),),
        untracked=(render.TierPolicies("default", "Deny", (UNTRACKED.id,), (UNTRACKED.id,)),),
        profiles=(DEFAULT_ALLOW.name,))
    wildcard = render.HostEndpointChains("*", normal=(default,), pre_dnat=eth0.pre_dnat, untracked=eth0.untracked)
    workload = EndpointChains("cali0a1b2c3d4e5", (security, default), ("kns.demo",))
    return render.render_filter_table([workload], policies, {"kns.demo": KNS_DEMO, DEFAULT_ALLOW.name: DEFAULT_ALLOW},
                                      host_endpoints=[eth0, wildcard])


def test_golden_host_endpoint_tables() -> None:
    table = host_endpoint_tables()
    check_golden("host_endpoints_filter.txt", render.restore_text(table))
    check_golden("host_endpoints_mangle.txt", render.restore_text(table.mangle, "mangle"))
    check_golden("host_endpoints_raw.txt", render.restore_text(table.raw, "raw"))


def test_tiers_in_an_endpoint_chain() -> None:
    table = host_endpoint_tables()
    tw = bodies(table.chains["cali-tw-cali0a1b2c3d4e5"])
    pi_sec, pi_fwd = (render.policy_chain_name(p.id, "Ingress") for p in (HOST_ALLOW, FORWARD))
    assert tw[3:] == [
        f"-m mark --mark 0x0/0x20000 -j {pi_sec}",
        '-m mark --mark 0x10000/0x10000 -m comment --comment "Return if policy accepted" -j RETURN',
        # No end of tier: the security tier's default action is Pass.
        '-m comment --comment "Start of tier default" -j MARK --set-xmark 0x0/0x20000',
        f"-m mark --mark 0x0/0x20000 -j {pi_fwd}",
        '-m mark --mark 0x10000/0x10000 -m comment --comment "Return if policy accepted" -j RETURN',
        '-m mark --mark 0x0/0x20000 -m comment --comment "End of tier default. Drop if no policies passed packet" -j DROP',
        "-j cali-pri-kns.demo",
        '-m mark --mark 0x10000/0x10000 -m comment --comment "Return if profile accepted" -j RETURN',
        '-m comment --comment "Drop if no profiles matched" -j DROP',
    ]


def test_host_endpoint_chains_per_table() -> None:
    table = host_endpoint_tables()
    fh = bodies(table.chains["cali-fh-eth0"])
    assert fh[:4] == ["-m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT", "-m conntrack --ctstate INVALID -j DROP",
                      "-j cali-failsafe-in", "-j MARK --set-xmark 0x0/0x30000"]
    assert fh[-1] == '-m comment --comment "Drop if no profiles matched" -j DROP'
    # Forward chains: no failsafe, no profiles; with no policy, forwarded traffic is allowed.
    fhfw = bodies(table.chains["cali-fhfw-eth0"])
    assert "-j cali-failsafe-in" not in fhfw and not any("cali-pri-" in b for b in fhfw)
    thfw = bodies(table.chains["cali-thfw-eth0"])
    assert thfw[-2:] == ['-m comment --comment "Allow forwarded traffic by default" -j MARK --set-xmark 0x10000/0x10000',
                         '-m comment --comment "Return for accepted forward traffic" -j RETURN']
    # preDNAT (mangle): no end of tier and no profiles, so normal policy still has its say.
    pre = bodies(table.mangle.chains["cali-fh-eth0"])
    assert not any("End of tier" in b or "profiles" in b for b in pre)
    # The mangle egress chain returns (the filter table decides) and marks established traffic.
    th_mangle = bodies(table.mangle.chains["cali-th-eth0"])
    assert th_mangle[:2] == ["-m conntrack --ctstate RELATED,ESTABLISHED -j MARK --set-xmark 0x10000/0x10000",
                             "-m conntrack --ctstate RELATED,ESTABLISHED -j RETURN"]
    assert render.profile_chain_name(DEFAULT_ALLOW.name, "Egress") in table.mangle.chains
    # Untracked (raw): no conntrack rules, NOTRACK on accept, raw failsafes include the replies.
    raw_fh = bodies(table.raw.chains["cali-fh-eth0"])
    assert not any("conntrack" in b for b in raw_fh)
    assert "-m mark --mark 0x10000/0x10000 -j NOTRACK" in raw_fh
    assert any("--sports 53,67" in b for b in bodies(table.raw.chains["cali-failsafe-in"]))
    # The `*` endpoint: every interface's default, but never in the raw table.
    assert bodies(table.chains["cali-from-host-endpoint"]) == [
        "-i eth0 -g cali-fh-eth0", "-g cali-fh-any-interface-at-all"]
    assert "cali-fh-any-interface-at-all" not in table.raw.chains
    assert bodies(table.raw.chains["cali-from-host-endpoint"]) == ["-i eth0 -g cali-fh-eth0"]
    assert bodies(table.mangle.chains["cali-to-host-endpoint"])[1:] == [
        '-o cali+ -m comment --comment "Skip egress WHEP policy for traffic to local workload" -j RETURN',
        "-g cali-th-any-interface-at-all"]
    # Every chain a rule jumps to exists in that table.
    for chains in (table.chains, table.mangle.chains, table.raw.chains):
        text = "\n".join(b for c in chains.values() for b in bodies(c))
        assert set(re.findall(r"-[jg] (cali-\S+)", text)) <= set(chains)
