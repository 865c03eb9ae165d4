#!/usr/bin/env python3
"""How long pure policy rendering takes: 1,000 endpoints, each with 5 of 500 policies (no root).

Times, best of --repeat runs:
  * render_filter_table (everything, cold: no memo) and its pieces — policy chains, endpoint
    chains, the dispatch trees;
  * the rule hashes the Table driver computes for every chain (SHA-224 per rule);
  * restore_text (the whole table as one iptables-restore input);
  * one changed policy re-rendered (what the agent does per policy update with its memo).
Prints chain / rule / ipset counts too. The end-to-end kernel numbers are benchmarks/bench_policy.py.

    .venv/bin/python benchmarks/bench_policy_render.py [--pods 1000] [--policies 500] [--per-pod 5]
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import time
from typing import Callable, TypeVar

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from policy import render  # noqa: E402
from policy.iptables import rule_hashes  # noqa: E402
from policy.model import EndpointMatch, EntityRule, NamedPort, Policy, PortRange, Profile, Rule  # noqa: E402

T = TypeVar("T")
K8S = "projectcalico.org/orchestrator == 'k8s'"


def k8s_like_policy(i: int) -> Policy:
    """A converted Kubernetes NetworkPolicy: pod + namespace selector peers, ports, an ipBlock."""
    ns = f"ns{i % 20}"
    return Policy(
        name=f"knp.default.policy-{i}", namespace=ns, selector=f"{K8S} && app == 'app{i % 50}'",
        types=frozenset({"Ingress", "Egress"}), order=1000,
        ingress=(
            Rule("Allow", protocol="TCP",
                 source=EntityRule(endpoints=EndpointMatch(f"{K8S} && role == 'r{i % 7}'", namespace=ns)),
                 destination=EntityRule(ports=(PortRange(80, 80), PortRange(8000, 8100), NamedPort("http")))),
            Rule("Allow", protocol="UDP",
                 source=EntityRule(endpoints=EndpointMatch(K8S, namespace_selector=f"team == 't{i % 3}'"))),
        ),
        egress=(
            Rule("Allow", protocol="TCP",
                 destination=EntityRule(nets=("10.0.0.0/8",), not_nets=(f"10.{i % 250}.0.0/16",),
                                        ports=(PortRange(443, 443),))),
            Rule("Allow", protocol="UDP", destination=EntityRule(ports=(PortRange(53, 53),))),
        ),
    )


def best(repeat: int, fn: Callable[[], T]) -> tuple[float, T]:
    times, result = [], None
    for _ in range(repeat):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    assert result is not None
    return min(times), result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pods", type=int, default=1000)
    parser.add_argument("--policies", type=int, default=500)
    parser.add_argument("--per-pod", type=int, default=5)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()

    rng = random.Random(1)
    policies = {p.id: p for p in map(k8s_like_policy, range(args.policies))}
    ids = sorted(policies)
    profiles = {f"kns.ns{i}": Profile(f"kns.ns{i}", (Rule("Allow"),), (Rule("Allow"),)) for i in range(20)}
    ifaces: set[str] = set()
    while len(ifaces) < args.pods:
        ifaces.add("cali" + "".join(rng.choice("0123456789abcdef") for _ in range(11)))
    endpoints = [
        render.EndpointChains.default_tier(iface, ingress=tuple(rng.sample(ids, args.per_pod)),
                              egress=tuple(rng.sample(ids, args.per_pod)), profiles=(f"kns.ns{n % 20}",))
        for n, iface in enumerate(sorted(ifaces))
    ]

    t_all, table = best(args.repeat, lambda: render.render_filter_table(endpoints, policies, profiles))
    t_pol, _ = best(args.repeat, lambda: [render.policy_chains(p) for p in policies.values()])
    t_ep, _ = best(args.repeat, lambda: [render.endpoint_chains(e, policies) for e in endpoints])
    t_disp, _ = best(args.repeat, lambda: render.dispatch_chains(sorted(ifaces)))
    t_hash, _ = best(args.repeat, lambda: [rule_hashes(c.name, c.rules) for c in table.chains.values()])
    t_text, text = best(args.repeat, lambda: render.restore_text(table))
    changed = k8s_like_policy(0)
    changed = Policy(**{**{f: getattr(changed, f) for f in changed.__slots__}, "egress": changed.egress[:1]})  # type: ignore[arg-type]
    t_one, _ = best(args.repeat, lambda: (render.policy_chains(changed), render.ipsets_for_policy(changed)))

    rules = sum(len(c.rules) for c in table.chains.values())
    kinds: dict[str, int] = {}
    for name in table.chains:
        kind = name.split("-")[1] if name.count("-") >= 2 else name
        kinds[kind] = kinds.get(kind, 0) + 1
    print(f"pods={args.pods} policies={args.policies} per_pod={args.per_pod} (best of {args.repeat})")
    print(f"  render_filter_table     {t_all * 1000:8.1f} ms  chains={len(table.chains)} rules={rules} "
          f"ipsets={len(table.ipsets)}")
    print(f"    policy chains         {t_pol * 1000:8.1f} ms  ({args.policies} policies)")
    print(f"    endpoint chains       {t_ep * 1000:8.1f} ms  ({2 * args.pods} chains)")
    print(f"    dispatch trees        {t_disp * 1000:8.1f} ms  "
          f"({kinds.get('from', 0) + kinds.get('to', 0)} chains)")
    print(f"  rule hashes (driver)    {t_hash * 1000:8.1f} ms")
    print(f"  restore_text            {t_text * 1000:8.1f} ms  ({len(text) / 1e6:.1f} MB)")
    print(f"  one policy re-render    {t_one * 1e6:8.1f} µs")


if __name__ == "__main__":
    main()
