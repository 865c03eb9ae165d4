"""The policy calc (calc/policy.py) as datastore state sequences, and the PolicyManager's deltas.

The central property: whatever sequence of updates arrives, the incremental result equals a fresh
PolicyCalc fed only the final state, and equals render.render_filter_table over that state.
"""

from __future__ import annotations

import random
import time
from typing import Any

from felixpy.calc.dispatcher import Dispatcher
from felixpy.calc.policy import PolicyCalc
from felixpy.dataplane.managers.policy import PolicyManager
from felixpy.datastore import keys
from felixpy.datastore.syncer import KVUpdate
from policy import render
from felixpy.messages import FilterState, IPSetState
from policy.iptables import Chain, Rule
from tests.fakes.dataplane import FakeDataplane
from tests.support.polling import wait_for

NODE = "n1"


# -- resources as the lab and felixctl store them ------------------------------------------------

def profile(ns: str, labels: dict[str, str] | None = None) -> KVUpdate:
    to_apply = {"pcns.projectcalico.org/name": ns, "pcns.kubernetes.io/metadata.name": ns}
    to_apply.update({f"pcns.{k}": v for k, v in (labels or {}).items()})
    value = {"apiVersion": "projectcalico.org/v3", "kind": "Profile", "metadata": {"name": f"kns.{ns}"},
             "spec": {"ingress": [{"action": "Allow"}], "egress": [{"action": "Allow"}],
                      "labelsToApply": to_apply}}
    return KVUpdate(keys.resource_key("profiles", f"kns.{ns}"), value, 1)


def wep(node: str, ns: str, pod: str, ip: str, labels: dict[str, str] | None = None,
        ports: list[dict[str, Any]] | None = None, iface: str | None = None) -> KVUpdate:
    name = f"{node}-k8s-{pod}-eth0"
    value = {
        "apiVersion": "projectcalico.org/v3", "kind": "WorkloadEndpoint",
        "metadata": {"name": name, "namespace": ns,
                     "labels": {**(labels or {}), "projectcalico.org/namespace": ns,
                                "projectcalico.org/orchestrator": "k8s"}},
        "spec": {"node": node, "orchestrator": "k8s", "pod": pod, "endpoint": "eth0",
                 "interfaceName": iface or f"cali{abs(hash((ns, pod))) % 16**11:011x}",
                 "ipNetworks": [f"{ip}/32"], "profiles": [f"kns.{ns}"], "ports": ports or []},
    }
    return KVUpdate(keys.resource_key("workloadendpoints", name, ns), value, 1)


def np(ns: str, name: str, spec: dict[str, Any]) -> KVUpdate:
    value = {"apiVersion": "projectcalico.org/v3", "kind": "NetworkPolicy",
             "metadata": {"name": name, "namespace": ns}, "spec": spec}
    return KVUpdate(keys.resource_key("networkpolicies", name, ns), value, 1)


def gnp(name: str, spec: dict[str, Any]) -> KVUpdate:
    value = {"apiVersion": "projectcalico.org/v3", "kind": "GlobalNetworkPolicy",
             "metadata": {"name": name}, "spec": spec}
    return KVUpdate(keys.resource_key("globalnetworkpolicies", name), value, 1)


def tier(name: str, spec: dict[str, Any]) -> KVUpdate:
    value = {"apiVersion": "projectcalico.org/v3", "kind": "Tier", "metadata": {"name": name}, "spec": spec}
    return KVUpdate(keys.resource_key("tiers", name), value, 1)


def netset(name: str, nets: list[str], labels: dict[str, str], ns: str | None = None) -> KVUpdate:
    kind, plural = ("NetworkSet", "networksets") if ns else ("GlobalNetworkSet", "globalnetworksets")
    meta: dict[str, Any] = {"name": name, "labels": labels, **({"namespace": ns} if ns else {})}
    value = {"apiVersion": "projectcalico.org/v3", "kind": kind, "metadata": meta, "spec": {"nets": nets}}
    return KVUpdate(keys.resource_key(plural, name, ns), value, 1)


def hep(name: str, iface: str, labels: dict[str, str], node: str = NODE, ips: list[str] | None = None,
        profiles: list[str] | None = None) -> KVUpdate:
    value = {"apiVersion": "projectcalico.org/v3", "kind": "HostEndpoint",
             "metadata": {"name": name, "labels": labels},
             "spec": {"node": node, "interfaceName": iface, "expectedIPs": ips or [], "profiles": profiles or []}}
    return KVUpdate(keys.resource_key("hostendpoints", name), value, 1)


def sa_profile(ns: str, sa: str, labels: dict[str, str]) -> KVUpdate:
    to_apply = {"pcsa.projectcalico.org/name": sa, **{f"pcsa.{k}": v for k, v in labels.items()}}
    value = {"apiVersion": "projectcalico.org/v3", "kind": "Profile", "metadata": {"name": f"ksa.{ns}.{sa}"},
             "spec": {"labelsToApply": to_apply}}
    return KVUpdate(keys.resource_key("profiles", f"ksa.{ns}.{sa}"), value, 1)


def deleted(update: KVUpdate) -> KVUpdate:
    return KVUpdate(update.key, None, 2)


def feed(calc: PolicyCalc, *updates: KVUpdate) -> PolicyCalc:
    Dispatcher(calc).on_updates(updates)
    return calc


def fresh(final: dict[str, KVUpdate]) -> PolicyCalc:
    return feed(PolicyCalc(NODE), *final.values())


def from_scratch(calc: PolicyCalc) -> render.FilterTable:
    return render.render_filter_table(list(calc.endpoint_chains().values()), calc.active_policies(),
                                      calc.active_profiles(), calc.config,
                                      host_endpoints=list(calc.host_endpoint_chains().values()))


def assert_same(incremental: PolicyCalc, final: dict[str, KVUpdate]) -> None:
    ref = fresh(final)
    assert incremental.endpoint_chains() == ref.endpoint_chains()
    assert incremental.host_endpoint_chains() == ref.host_endpoint_chains()
    assert incremental.active_policies() == ref.active_policies()
    assert incremental.ipsets() == ref.ipsets()
    state = incremental.filter_state()
    ref_state = ref.filter_state()
    assert dict(state.chains) == dict(ref_state.chains)
    assert dict(state.mangle.chains) == dict(ref_state.mangle.chains)
    assert dict(state.raw.chains) == dict(ref_state.raw.chains)
    table = from_scratch(ref)
    assert dict(state.chains) == dict(table.chains)
    assert dict(state.mangle.chains) == dict(table.mangle.chains)
    assert dict(state.raw.chains) == dict(table.raw.chains)
    assert set(state.ipsets) == set(table.ipsets)
    assert {b: tuple(r) for b, r in state.jumps.items()} == {b: tuple(r) for b, r in table.jumps.items()}


WEB_PORTS = [{"name": "http", "port": 80, "protocol": "TCP"}, {"name": "dns", "port": 53, "protocol": "UDP"}]


def small_world() -> list[KVUpdate]:
    return [
        profile("a", {"team": "red"}), profile("b", {"team": "blue"}),
        wep(NODE, "a", "web", "10.244.1.1", {"app": "web"}, WEB_PORTS),
        wep(NODE, "a", "db", "10.244.1.2", {"app": "db"}),
        wep(NODE, "b", "web", "10.244.1.3", {"app": "web"}, WEB_PORTS),
        wep("n2", "a", "client", "10.244.2.1", {"app": "client"}),
        wep("n2", "b", "client", "10.244.2.2", {"app": "client"}),
    ]


ALLOW_CLIENTS = np("a", "allow-clients", {
    "selector": "app == 'web'", "types": ["Ingress"],
    "ingress": [{"action": "Allow", "protocol": "TCP",
                 "source": {"selector": "app == 'client'"}, "destination": {"ports": ["http"]}}]})


# -- behaviour --------------------------------------------------------------------------------

def by_pod(calc: PolicyCalc) -> dict[str, render.EndpointChains]:
    return {key.rsplit("/", 2)[-2] + "/" + key.rsplit("-k8s-", 1)[1].removesuffix("-eth0"): ec
            for key, ec in calc.endpoint_chains().items()}


def test_only_local_endpoints_get_chains_and_unselected_ones_fall_to_profiles() -> None:
    calc = feed(PolicyCalc(NODE), *small_world(), ALLOW_CLIENTS)
    chains = by_pod(calc)
    assert set(chains) == {"a/web", "a/db", "b/web"}
    assert chains["a/web"].ingress == ("a/allow-clients",)
    assert chains["a/web"].egress == ()
    assert chains["a/db"].ingress == () and chains["b/web"].ingress == ()
    assert chains["a/web"].profiles == ("kns.a",)
    assert set(calc.active_policies()) == {"a/allow-clients"}


def test_ipset_members_are_cluster_wide_and_namespace_scoped() -> None:
    calc = feed(PolicyCalc(NODE), *small_world(), ALLOW_CLIENTS)
    sets = calc.ipsets()
    # The source selector is scoped to the policy's namespace: only a/client (on n2) is in it.
    selector_sets = {n: s for n, s in sets.items() if s.type == "hash:net"}
    assert list(selector_sets.values()) == [IPSetState("hash:net", frozenset({"10.244.2.1"}))]
    assert all(n.startswith("cali40") and len(n) <= 31 for n in sets)


def test_namespace_label_change_moves_endpoints_in_and_out_of_namespace_selectors() -> None:
    policy = gnp("red-only", {"selector": "app == 'web'", "namespaceSelector": "team == 'red'",
                              "types": ["Ingress"], "ingress": [{"action": "Deny"}]})
    calc = feed(PolicyCalc(NODE), *small_world(), policy)
    assert by_pod(calc)["a/web"].ingress == ("red-only",)
    assert by_pod(calc)["b/web"].ingress == ()
    feed(calc, profile("b", {"team": "red"}))
    assert by_pod(calc)["b/web"].ingress == ("red-only",)
    feed(calc, profile("a", {"team": "green"}))
    assert by_pod(calc)["a/web"].ingress == ()


def test_pod_label_change_moves_the_endpoint_and_its_ipset_membership() -> None:
    calc = feed(PolicyCalc(NODE), *small_world(), ALLOW_CLIENTS)
    feed(calc, wep("n2", "a", "client", "10.244.2.1", {"app": "other"}))
    assert all(not s.members for s in calc.ipsets().values() if s.type == "hash:net")
    feed(calc, wep(NODE, "a", "db", "10.244.1.2", {"app": "web"}))
    assert by_pod(calc)["a/db"].ingress == ("a/allow-clients",)


def test_named_port_sets_hold_ip_proto_port_of_the_pods_declaring_the_name() -> None:
    calc = feed(PolicyCalc(NODE), *small_world(), ALLOW_CLIENTS)
    named = [s for s in calc.ipsets().values() if s.type == "hash:ip,port"]
    assert named, "a named destination port needs a hash:ip,port set"
    assert any("10.244.1.1,tcp:80" in s.members for s in named)
    assert all("10.244.1.2,tcp:80" not in s.members for s in named)


def test_policy_order_and_types_order_the_endpoint_chain() -> None:
    later = gnp("later", {"order": 200, "selector": "all()", "types": ["Ingress", "Egress"],
                          "ingress": [{"action": "Pass"}], "egress": [{"action": "Allow"}]})
    earlier = gnp("earlier", {"order": 100, "selector": "app == 'web'", "types": ["Ingress"],
                              "ingress": [{"action": "Pass"}]})
    unordered = gnp("unordered", {"selector": "app == 'web'", "types": ["Ingress"],
                                  "ingress": [{"action": "Allow"}]})
    calc = feed(PolicyCalc(NODE), *small_world(), unordered, later, earlier)
    assert by_pod(calc)["a/web"].ingress == ("earlier", "later", "unordered")
    assert by_pod(calc)["a/web"].egress == ("later",)


def test_invalid_policy_is_absent_and_its_fix_applies() -> None:
    bad = gnp("bad", {"selector": "app == ", "types": ["Ingress"], "ingress": [{"action": "Deny"}]})
    calc = feed(PolicyCalc(NODE), *small_world(), bad)
    assert calc.active_policies() == {}
    feed(calc, gnp("bad", {"selector": "app == 'db'", "types": ["Ingress"], "ingress": [{"action": "Deny"}]}))
    assert set(calc.active_policies()) == {"bad"}
    feed(calc, bad)
    assert calc.active_policies() == {}
    assert by_pod(calc)["a/db"].ingress == ()


def test_deleting_a_missing_profile_drops_it_from_endpoint_chains() -> None:
    calc = feed(PolicyCalc(NODE), *small_world())
    feed(calc, deleted(profile("a")))
    assert by_pod(calc)["a/web"].profiles == ()
    feed(calc, profile("a"))
    assert by_pod(calc)["a/web"].profiles == ("kns.a",)


def test_unchanged_chains_are_the_same_objects_after_an_unrelated_update() -> None:
    calc = feed(PolicyCalc(NODE), *small_world(), ALLOW_CLIENTS)
    before = calc.filter_state().chains
    feed(calc, np("b", "other", {"selector": "app == 'db'", "ingress": [{"action": "Allow"}]}))
    after = calc.filter_state().chains
    shared = set(before) & set(after)
    assert shared == set(before)  # "other" selects no pod: nothing went away
    assert all(before[n] is after[n] for n in shared)


def test_pre_dnat_and_do_not_track_policies_never_police_workloads() -> None:
    """They used to be enforced on pods as ordinary filter policies: Felix hands workloads only
    the normal tiers, so they apply to host endpoints only."""
    pre_dnat = gnp("pre", {"selector": "all()", "preDNAT": True, "applyOnForward": True,
                           "ingress": [{"action": "Deny", "protocol": "TCP", "destination": {"ports": [30080]}}]})
    untracked = gnp("dnt", {"selector": "all()", "doNotTrack": True, "applyOnForward": True,
                            "ingress": [{"action": "Allow"}]})
    forward = gnp("fwd", {"selector": "all()", "applyOnForward": True, "types": ["Ingress"],
                          "ingress": [{"action": "Allow"}]})
    calc = feed(PolicyCalc(NODE), *small_world(), pre_dnat, untracked, forward)
    assert by_pod(calc)["a/web"].ingress == ("fwd",)  # applyOnForward policies do police workloads
    assert set(calc.active_policies()) == {"fwd"}
    state = calc.filter_state()
    assert not any(n in state.chains for n in ("cali-pi-pre", "cali-pi-dnt"))
    feed(calc, hep("n1-eth0", "eth0", {"role": "node"}))
    chains = calc.host_endpoint_chains()
    (host,) = chains.values()
    assert [t.ingress for t in host.pre_dnat] == [("pre",)] and [t.ingress for t in host.untracked] == [("dnt",)]
    assert [t.ingress for t in host.normal] == [("fwd",)] and [t.ingress for t in host.forward] == [("fwd",)]
    state = calc.filter_state()
    assert "cali-pi-pre" in state.mangle.chains and "cali-pi-pre" not in state.chains
    assert "cali-pi-dnt" in state.raw.chains and "cali-pi-dnt" not in state.chains
    assert "cali-fh-eth0" in state.chains and "cali-fh-eth0" in state.mangle.chains


def test_tiers_order_the_chains_and_a_tier_change_reorders_them() -> None:
    security = gnp("sec", {"tier": "security", "selector": "app == 'web'", "types": ["Ingress"],
                           "ingress": [{"action": "Pass"}]})
    platform = gnp("plat", {"tier": "platform", "selector": "app == 'web'", "types": ["Ingress"],
                            "ingress": [{"action": "Pass"}]})
    default = gnp("def", {"selector": "app == 'web'", "order": 1, "types": ["Ingress"],
                          "ingress": [{"action": "Allow"}]})
    calc = feed(PolicyCalc(NODE), *small_world(), security, platform, default,
                tier("security", {"order": 100}), tier("platform", {"order": 200, "defaultAction": "Pass"}))
    tiers = by_pod(calc)["a/web"].tiers
    assert [(t.name, t.default_action, t.ingress) for t in tiers] == [
        ("security", "Deny", ("sec",)), ("platform", "Pass", ("plat",)), ("default", "Deny", ("def",))]
    assert by_pod(calc)["a/db"].tiers == ()  # no tier selects it: all skipped
    feed(calc, tier("security", {"order": 300}))
    assert [t.name for t in by_pod(calc)["a/web"].tiers] == ["platform", "security", "default"]
    # A tier that has no Tier resource sorts after every existing one (Felix), and denies.
    feed(calc, deleted(tier("platform", {})))
    assert [(t.name, t.default_action) for t in by_pod(calc)["a/web"].tiers] == [
        ("security", "Deny"), ("default", "Deny"), ("platform", "Deny")]
    tw = {c.name: c for c in calc.filter_state().chains.values()}
    bodies = [r.render_body() for r in tw[render.endpoint_chain_name(by_pod(calc)["a/web"].iface, "Ingress")].rules]
    assert '-m comment --comment "Start of tier default" -j MARK --set-xmark 0x0/0x20000' in bodies
    assert sum("End of tier" in b for b in bodies) == 3


def test_network_sets_are_selector_ipset_members() -> None:
    egress = np("a", "to-ext", {"selector": "app == 'web'", "types": ["Egress"],
                                "egress": [{"action": "Allow", "destination": {"selector": "role == 'ext'"}}]})
    calc = feed(PolicyCalc(NODE), *small_world(), egress,
                netset("ext-a", ["198.51.100.0/24"], {"role": "ext"}, ns="a"),
                netset("ext-b", ["203.0.113.0/24"], {"role": "ext"}, ns="b"),
                netset("ext-global", ["192.0.2.0/28"], {"role": "ext"}))
    (members,) = [s.members for s in calc.ipsets().values()]
    assert members == {"198.51.100.0/24"}  # a namespaced policy: its own namespace's sets only
    gnp_ext = gnp("g-ext", {"selector": "app == 'db'", "types": ["Egress"],
                            "egress": [{"action": "Allow", "destination": {"selector": "role == 'ext'"}}]})
    feed(calc, gnp_ext)
    assert {"198.51.100.0/24", "203.0.113.0/24", "192.0.2.0/28"} in [s.members for s in calc.ipsets().values()]
    by_ns = gnp("g-ns", {"selector": "app == 'db'", "types": ["Egress"], "egress": [
        {"action": "Allow", "destination": {"selector": "role == 'ext'", "namespaceSelector": "team == 'blue'"}}]})
    feed(calc, deleted(gnp_ext), by_ns)
    sets = [s.members for s in calc.ipsets().values()]
    assert {"203.0.113.0/24"} in sets  # a namespaceSelector: namespaced sets of those namespaces
    feed(calc, profile("a", {"team": "blue"}))
    assert {"198.51.100.0/24", "203.0.113.0/24"} in [s.members for s in calc.ipsets().values()]
    feed(calc, netset("ext-b", ["203.0.113.128/25"], {"role": "ext"}, ns="b"))
    assert {"198.51.100.0/24", "203.0.113.128/25"} in [s.members for s in calc.ipsets().values()]


def test_service_account_selectors_follow_service_account_labels() -> None:
    def pod(name: str, ip: str, account: str) -> KVUpdate:
        update = wep(NODE, "a", name, ip, {"app": "api"})
        update.value["spec"]["serviceAccountName"] = account
        return update

    by_sa = np("a", "by-sa", {"selector": "app == 'web'", "serviceAccountSelector": "role == 'frontend'",
                              "types": ["Ingress"], "ingress": [
                                  {"action": "Allow", "source": {"serviceAccounts": {"names": ["api"]}}},
                                  {"action": "Allow", "source": {"serviceAccounts": {"selector": "team == 'x'"}}}]})
    web = wep(NODE, "a", "web", "10.244.1.1", {"app": "web"})
    web.value["spec"]["serviceAccountName"] = "web"
    calc = feed(PolicyCalc(NODE), *small_world(), web, pod("api1", "10.244.1.7", "api"),
                pod("other", "10.244.1.8", "batch"), by_sa)
    assert by_pod(calc)["a/web"].ingress == ()  # the web account is not labelled frontend yet
    feed(calc, sa_profile("a", "web", {"role": "frontend"}))
    assert by_pod(calc)["a/web"].ingress == ("a/by-sa",)
    members = sorted(sorted(s.members) for s in calc.ipsets().values())
    assert members == [[], ["10.244.1.7"]]  # names: api; selector team == 'x': nobody yet
    feed(calc, sa_profile("a", "batch", {"team": "x"}))
    assert sorted(sorted(s.members) for s in calc.ipsets().values()) == [["10.244.1.7"], ["10.244.1.8"]]
    feed(calc, deleted(sa_profile("a", "web", {})))
    assert by_pod(calc)["a/web"].ingress == ()


def test_host_endpoints_one_per_interface_wildcard_and_profile_labels() -> None:
    policy = gnp("hosts", {"selector": "role == 'node'", "types": ["Ingress"], "ingress": [{"action": "Allow"}]})
    namespaced = np("a", "ns-only", {"selector": "all()", "types": ["Ingress"], "ingress": [{"action": "Deny"}]})
    peers = gnp("peers", {"selector": "app == 'web'", "types": ["Ingress"], "ingress": [
        {"action": "Allow", "source": {"selector": "role == 'node'"}}]})
    calc = feed(PolicyCalc(NODE), *small_world(), policy, namespaced, peers,
                hep("b-eth0", "eth0", {"role": "node"}, ips=["192.0.2.11"]),
                hep("a-eth0", "eth0", {"role": "other"}, ips=["192.0.2.12"]),
                hep("remote", "eth0", {"role": "node"}, node="n2", ips=["192.0.2.21"]))
    chains = calc.host_endpoint_chains()
    assert [k.rsplit("/", 1)[1] for k in chains] == ["a-eth0"]  # the first by name wins eth0
    assert chains[keys.resource_key("hostendpoints", "a-eth0")].normal == ()
    assert {"192.0.2.11", "192.0.2.21"} in [s.members for s in calc.ipsets().values()]  # expectedIPs
    # Labels inherited from its profiles' labelsToApply select it too (its own labels win).
    labelled = KVUpdate(keys.resource_key("profiles", "nodes"), {
        "apiVersion": "projectcalico.org/v3", "kind": "Profile", "metadata": {"name": "nodes"},
        "spec": {"labelsToApply": {"role": "node"}}}, 1)
    feed(calc, labelled, hep("a-eth0", "eth0", {}, ips=["192.0.2.12"], profiles=["nodes"]))
    (host,) = calc.host_endpoint_chains().values()
    assert [t.ingress for t in host.normal] == [("hosts",)] and host.profiles == ("nodes",)
    # A `*` endpoint governs every other interface; doNotTrack policy is ignored there (Felix).
    feed(calc, hep("all", "*", {"role": "node"}),
         gnp("dnt", {"selector": "role == 'node'", "doNotTrack": True, "applyOnForward": True,
                     "ingress": [{"action": "Allow"}]}))
    by_iface = {h.iface: h for h in calc.host_endpoint_chains().values()}
    assert set(by_iface) == {"eth0", "*"} and by_iface["*"].untracked == ()
    assert [t.ingress for t in by_iface["eth0"].untracked] == [("dnt",)]
    state = calc.filter_state()
    assert "cali-fh-any-interface-at-all" in state.chains
    assert any("-g cali-fh-any-interface-at-all" in r.render_body()
               for r in state.chains["cali-from-host-endpoint"].rules)


# -- incremental == from scratch, over random sequences --------------------------------------

def _random_universe(rng: random.Random) -> list[KVUpdate]:
    choices: list[KVUpdate] = []
    for ns in ("a", "b", "c"):
        for labels in ({}, {"team": "red"}, {"team": "blue", "env": "prod"}):
            choices.append(profile(ns, labels))
    for i in range(12):
        ns = "abc"[i % 3]
        for labels in ({"app": "web"}, {"app": "db", "tier": "back"}, {}):
            choices.append(wep(NODE if i % 2 else "n2", ns, f"p{i}", f"10.244.{i % 2 + 1}.{i + 1}", labels,
                               WEB_PORTS if labels.get("app") == "web" else None))
    selectors = ["app == 'web'", "app == 'db'", "all()", "has(tier)", "app in {'web', 'db'}"]
    for i in range(6):
        sel = rng.choice(selectors)
        src = rng.choice(selectors)
        spec: dict[str, Any] = {"selector": sel, "order": rng.choice([None, 10, 500]),
                                "types": rng.choice([["Ingress"], ["Egress"], ["Ingress", "Egress"]]),
                                "ingress": [{"action": rng.choice(["Allow", "Deny", "Pass"]), "protocol": "TCP",
                                             "source": {"selector": src}, "destination": {"ports": ["http", 81]}}],
                                "egress": [{"action": "Allow", "destination": {"namespaceSelector": "team == 'red'"}}]}
        if spec["order"] is None:
            del spec["order"]
        if rng.random() < 0.5:
            spec["tier"] = rng.choice(["t1", "t2"])
        choices.append(np("abc"[i % 3], f"pol{i % 4}", spec))
        kind = rng.choice([{}, {"applyOnForward": True}, {"preDNAT": True, "applyOnForward": True, "egress": []},
                           {"doNotTrack": True, "applyOnForward": True}])
        choices.append(gnp(f"g{i % 3}", {**spec, **kind,
                                         "namespaceSelector": rng.choice(["all()", "team == 'blue'", "global()"])}))
    for name, spec in (("t1", {"order": 10}), ("t1", {"order": 2_000_000, "defaultAction": "Pass"}),
                       ("t2", {"order": 50, "defaultAction": "Pass"})):
        choices.append(tier(name, spec))
    for i, labels in enumerate(({"app": "web"}, {"tier": "edge"}, {})):
        choices.append(netset(f"ns{i}", [f"198.51.100.{16 * i}/28"], labels, ns="abc"[i]))
        choices.append(netset(f"gns{i}", [f"203.0.113.{16 * i}/28"], labels))
        choices.append(hep(f"h{i}", ("eth0", "eth0", "*")[i], labels, node=NODE if i < 2 else rng.choice([NODE, "n2"]),
                           ips=[f"192.0.2.{i + 1}"], profiles=rng.choice([[], ["kns.a"]])))
    return choices


def test_incremental_equals_from_scratch_over_random_sequences() -> None:
    rng = random.Random(4)
    for _round in range(8):
        universe = _random_universe(rng)
        calc = PolicyCalc(NODE)
        final: dict[str, KVUpdate] = {}
        for step in range(60):
            update = rng.choice(universe)
            if update.key in final and rng.random() < 0.25:
                update = deleted(update)
                final.pop(update.key)
            else:
                final[update.key] = update
            feed(calc, update)
            if step % 10 == 9:
                assert_same(calc, final)
        assert_same(calc, final)


# -- scale: one update at 1,000 local endpoints and 500 policies ------------------------------

def test_one_policy_update_at_scale_is_cheap() -> None:
    updates = [profile(f"ns{n}", {"team": f"t{n % 3}"}) for n in range(10)]
    for i in range(1000):
        updates.append(wep(NODE, f"ns{i % 10}", f"pod{i}", f"10.244.{i // 250}.{i % 250 + 1}",
                           {"app": f"app{i % 50}", "role": "web" if i % 2 else "db"}, WEB_PORTS,
                           iface=f"cali{i:011x}"))
    for p in range(500):
        updates.append(np(f"ns{p % 10}", f"pol{p}", {
            "selector": f"app == 'app{p % 50}'", "types": ["Ingress", "Egress"],
            "ingress": [{"action": "Allow", "protocol": "TCP", "source": {"selector": f"role == 'web' && app == 'app{(p + 1) % 50}'"},
                         "destination": {"ports": [80, "http"]}}],
            "egress": [{"action": "Allow", "destination": {"namespaceSelector": f"team == 't{p % 3}'"}}]}))
    calc = feed(PolicyCalc(NODE), *updates)
    calc.filter_state()
    start = time.perf_counter()
    feed(calc, np("ns3", "pol3", {"selector": "app == 'app3'", "types": ["Ingress"],
                                      "ingress": [{"action": "Allow", "protocol": "UDP", "destination": {"ports": [53]}}]}))
    state = calc.filter_state()
    policy_update = time.perf_counter() - start
    start = time.perf_counter()
    feed(calc, wep(NODE, "ns7", "pod7", "10.244.0.8", {"app": "app8", "role": "db"}, WEB_PORTS,
                       iface=f"cali{7:011x}"))
    calc.filter_state()
    endpoint_update = time.perf_counter() - start
    assert len(state.chains) > 2000
    assert policy_update < 0.25, f"policy update took {policy_update:.3f} s"
    assert endpoint_update < 0.25, f"endpoint update took {endpoint_update:.3f} s"


# -- the manager --------------------------------------------------------------------------------

class RecordingTable:
    def __init__(self) -> None:
        self.calls: list[tuple[str, str]] = []

    def update_chain(self, chain: Chain) -> None:
        self.calls.append(("update", chain.name))

    def remove_chain(self, name: str) -> None:
        self.calls.append(("remove", name))

    def set_jump_rules(self, builtin: str, rules: Any) -> None:
        self.calls.append(("jumps", builtin))


class RecordingIPSets:
    def __init__(self) -> None:
        self.calls: list[tuple[str, str]] = []

    def set_members(self, name: str, set_type: str, members: Any) -> None:
        self.calls.append(("set", name))

    def remove_set(self, name: str) -> None:
        self.calls.append(("remove", name))


def test_manager_sends_only_the_delta() -> None:
    table, sets = RecordingTable(), RecordingIPSets()
    manager = PolicyManager(table, sets)  # type: ignore[arg-type]
    chain_a = Chain("cali-a", (Rule(action="ACCEPT"),))
    chain_b = Chain("cali-b", (Rule(action="DROP"),))
    jumps = {"FORWARD": (Rule(action="-j cali-a"),)}
    set_x = IPSetState("hash:net", frozenset({"10.0.0.1"}))
    manager.on_update(FilterState({"cali-a": chain_a, "cali-b": chain_b}, jumps, {"cali40x": set_x}))
    manager.complete_deferred_work()
    assert sorted(table.calls) == [("jumps", "FORWARD"), ("update", "cali-a"), ("update", "cali-b")]
    assert sets.calls == [("set", "cali40x")]
    table.calls.clear()
    sets.calls.clear()
    manager.on_update(FilterState({"cali-a": chain_a, "cali-b": Chain("cali-b", (Rule(action="DROP"),))},
                                  jumps, {"cali40x": IPSetState("hash:net", frozenset({"10.0.0.1"}))}))
    manager.complete_deferred_work()
    assert table.calls == [] and sets.calls == []  # equal values: nothing to do
    manager.on_update(FilterState({"cali-a": Chain("cali-a", (Rule(action="RETURN"),))}, jumps, {}))
    manager.complete_deferred_work()
    assert table.calls == [("update", "cali-a"), ("remove", "cali-b")]
    assert sets.calls == [("remove", "cali40x")]


# -- the agent loop over its real drivers and the kernel fakes ---------------------------------

def test_agent_programs_a_policy_written_to_the_datastore() -> None:
    import threading

    from felixpy.datastore.memory import MemoryDatastore
    from felixpy.node.agent import Agent

    store = MemoryDatastore()
    for u in small_world():
        store.create(u.key, u.value)
    dp = FakeDataplane()
    agent = Agent(store=store, node_name=NODE, networking_backend="none", route_refresh_interval=0,
                  iptables_refresh_interval=0, **dp.drivers())
    thread = threading.Thread(target=agent.run, daemon=True)
    thread.start()

    def client_in_a_set() -> bool:
        return any("10.244.2.1" in members for members in dp.set_members().values())

    try:
        wait_for(lambda: agent.status.applies >= 1)
        chains = dp.chains("filter")
        assert "cali-FORWARD" in chains and not any(n.startswith("cali-pi-") for n in chains)
        store.create(ALLOW_CLIENTS.key, ALLOW_CLIENTS.value)
        wait_for(lambda: "cali-pi-a/allow-clients" in dp.chains("filter"))
        assert client_in_a_set()
        store.delete(ALLOW_CLIENTS.key)
        wait_for(lambda: "cali-pi-a/allow-clients" not in dp.chains("filter"))
        wait_for(lambda: not client_in_a_set())  # the set goes once no rule references it
    finally:
        agent.stop()
        thread.join(5)


def test_encapsulated_traffic_between_nodes_is_allowed_before_host_endpoint_policy() -> None:
    def pool(name: str, vxlan: str = "Never", ipip: str = "Never", disabled: bool = False) -> KVUpdate:
        value = {"apiVersion": "projectcalico.org/v3", "kind": "IPPool", "metadata": {"name": name},
                 "spec": {"cidr": "10.244.0.0/16", "vxlanMode": vxlan, "ipipMode": ipip, "disabled": disabled}}
        return KVUpdate(keys.resource_key("ippools", name), value, 1)

    def node(name: str, ip: str) -> KVUpdate:
        value = {"apiVersion": "projectcalico.org/v3", "kind": "Node", "metadata": {"name": name},
                 "spec": {"bgp": {"ipv4Address": f"{ip}/24"}}}
        return KVUpdate(keys.resource_key("nodes", name), value, 1)

    calc = feed(PolicyCalc(NODE), *small_world(), pool("p"), node(NODE, "192.0.2.11"), node("n2", "192.0.2.12"))
    state = calc.filter_state()
    assert render.ALL_HOSTS_SET not in state.ipsets
    assert not any("VXLAN" in r.comment for r in state.chains["cali-INPUT"].rules)
    feed(calc, pool("p", vxlan="Always"))
    state = calc.filter_state()
    assert state.ipsets[render.ALL_HOSTS_SET].members == {"192.0.2.11", "192.0.2.12"}
    first = state.chains["cali-INPUT"].rules[0].render_body()
    assert first == ("-p udp -m multiport --dports 4789 -m set --match-set cali40all-hosts-net src "
                     "-m addrtype --dst-type LOCAL -m comment --comment \"Allow IPv4 VXLAN packets from Calico hosts\" "
                     "-j ACCEPT")
    assert any("Allow IPv4 VXLAN packets to Calico hosts" in r.comment for r in state.chains["cali-OUTPUT"].rules)
    feed(calc, node("n3", "192.0.2.13"), pool("p", ipip="Always"))
    state = calc.filter_state()
    assert state.ipsets[render.ALL_HOSTS_SET].members == {"192.0.2.11", "192.0.2.12", "192.0.2.13"}
    assert [r.comment for r in state.chains["cali-INPUT"].rules[:1]] == ["Allow IPIP packets from Calico hosts"]
    feed(calc, pool("p", ipip="Always", disabled=True))
    assert render.ALL_HOSTS_SET not in calc.filter_state().ipsets


def test_agent_programs_host_endpoint_policy_into_mangle_and_raw() -> None:
    import threading

    from felixpy.datastore.memory import MemoryDatastore
    from felixpy.node.agent import Agent

    store = MemoryDatastore()
    pre_dnat = gnp("pre", {"selector": "role == 'node'", "preDNAT": True, "applyOnForward": True,
                           "ingress": [{"action": "Deny", "protocol": "TCP", "destination": {"ports": [30080]}}]})
    untracked = gnp("dnt", {"selector": "role == 'node'", "doNotTrack": True, "applyOnForward": True,
                            "ingress": [{"action": "Allow", "protocol": "UDP", "destination": {"ports": [53]}}]})
    for u in (*small_world(), pre_dnat, untracked):
        store.create(u.key, u.value)
    dp = FakeDataplane()
    agent = Agent(store=store, node_name=NODE, networking_backend="none", route_refresh_interval=0,
                  iptables_refresh_interval=0, **dp.drivers())
    thread = threading.Thread(target=agent.run, daemon=True)
    thread.start()

    try:
        wait_for(lambda: agent.status.applies >= 1)
        # Static chains and jumps in all three tables; no host endpoint yet, so no policy chains.
        assert {"cali-PREROUTING", "cali-POSTROUTING"} <= set(dp.chains("mangle"))
        assert {"cali-PREROUTING", "cali-OUTPUT"} <= set(dp.chains("raw"))
        assert not any(n.startswith("cali-pi-") for t in ("filter", "mangle", "raw") for n in dp.chains(t))
        node_hep = hep("n1-eth0", "eth0", {"role": "node"})
        store.create(node_hep.key, node_hep.value)
        wait_for(lambda: "cali-pi-pre" in dp.chains("mangle") and "cali-pi-dnt" in dp.chains("raw"))
        assert "cali-pi-pre" not in dp.chains("filter") and "cali-fh-eth0" in dp.chains("filter")
        store.delete(node_hep.key)
        wait_for(lambda: "cali-pi-pre" not in dp.chains("mangle") and "cali-fh-eth0" not in dp.chains("raw"))
    finally:
        agent.stop()
        thread.join(5)


def test_host_endpoint_named_ports_are_named_port_set_members() -> None:
    node_hep = hep("n2-eth0", "eth0", {"role": "node"}, node="n2", ips=["192.0.2.12"])
    node_hep.value["spec"]["ports"] = [{"name": "admin", "protocol": "TCP", "port": 2222}]
    to_admin = gnp("to-admin", {"selector": "app == 'web'", "types": ["Egress"], "egress": [
        {"action": "Allow", "protocol": "TCP", "destination": {"selector": "role == 'node'", "ports": ["admin"]}}]})
    calc = feed(PolicyCalc(NODE), *small_world(), node_hep, to_admin)
    named = [s.members for s in calc.ipsets().values() if s.type == "hash:ip,port"]
    assert named == [frozenset({"192.0.2.12,tcp:2222"})]
