"""Benchmark policy programming on one node: 5,000 endpoints and 1,000 policies (root).

Runs in a private network namespace (`fxb` + 5 hex chars, deleted at the end). Endpoints are
synthetic (the iptables rules only need interface names; the ipsets need addresses); policies are
Kubernetes NetworkPolicies converted the way the agent stores them (knp.default.<name>).

1. Program everything: the agent-side path (dispatcher → calc index → chains → PolicyManager →
   ipset restore + iptables-restore through the drivers) against the baseline of the same work done bare: one
   `ipset restore` of the same sets and one `iptables-restore --noflush` of the same rules text,
   into a fresh namespace. Target ≤ 2×. The agent side is split into calc (the dispatcher and
   the index: which policies and profiles apply to which endpoint, which addresses each ipset
   holds) and render (chains and rules from that), then the ipset and iptables drivers.
2. One policy change → kernel: the real agent loop (MemoryDatastore, the drivers in the
   namespace) from the datastore write until the iptables-restore carrying the change has
   returned. Target ≤ 100 ms (p50 and max over N changes).
3. Rule counts as a function of pods and policies (rendering only).

    python benchmarks/bench_policy.py [--pods 5000] [--policies 1000] [--changes 20] [--family 4|6|dual]

--family dual makes the pods dual-stack (an IPv6 /128 each, the policies' ipBlock an IPv6 twin)
and programs iptables and ip6tables in the same run: step 1 reports each family beside the
other (each against its own bare baseline), step 2 waits until the change is in both tables.
--family 6 programs ip6tables only (step 1), the pods still dual-stack. The default is 4.

Every command gets --command-timeout seconds (default 600) instead of the agent's 30 s: at this
size one iptables-nft-restore takes tens of seconds on a loaded 2-core machine (status.md).
"""

from __future__ import annotations

import argparse
import os
import secrets
import statistics
import subprocess
import sys
import threading
import time
from typing import Any, Sequence

from felixpy.calc.dispatcher import Dispatcher
from felixpy.calc.policy import PolicyCalc
from felixpy.dataplane.drivers.ipsets import IPSets
from felixpy.dataplane.drivers.iptables import Table
from felixpy.dataplane.managers.policy import PolicyManager
from felixpy.datastore import keys
from felixpy.datastore.memory import MemoryDatastore
from felixpy.datastore.syncer import KVUpdate
from felixpy.kernel import commands
from felixpy.kernel.commands import CompletedRun
from felixpy.node.agent import Agent
from policy.k8s import convert_k8s_networkpolicy

NODE = "bench"
NAMESPACES = 20
APPS = 100


# -- synthetic cluster -------------------------------------------------------------------------

def profile(ns: str) -> tuple[str, dict[str, Any]]:
    value = {"apiVersion": "projectcalico.org/v3", "kind": "Profile", "metadata": {"name": f"kns.{ns}"},
             "spec": {"ingress": [{"action": "Allow"}], "egress": [{"action": "Allow"}],
                      "labelsToApply": {"pcns.kubernetes.io/metadata.name": ns,
                                        "pcns.projectcalico.org/name": ns, "pcns.tier": f"t{int(ns[2:]) % 4}"}}}
    return keys.resource_key("profiles", f"kns.{ns}"), value


DUAL = False  # --family 6 / dual: pods get an IPv6 address too, policies an IPv6 ipBlock


def endpoint(i: int) -> tuple[str, dict[str, Any]]:
    ns = f"ns{i % NAMESPACES}"
    name = f"{NODE}-k8s-pod{i}-eth0"
    value = {
        "apiVersion": "projectcalico.org/v3", "kind": "WorkloadEndpoint",
        "metadata": {"name": name, "namespace": ns,
                     "labels": {"app": f"app{i % APPS}", "role": ("web", "db", "cache")[i % 3],
                                "projectcalico.org/namespace": ns, "projectcalico.org/orchestrator": "k8s"}},
        "spec": {"node": NODE, "orchestrator": "k8s", "pod": f"pod{i}", "endpoint": "eth0",
                 "interfaceName": f"cali{i:011x}", "ipNetworks": [f"10.{64 + i // 65536}.{i // 256 % 256}.{i % 256}/32"],
                 "profiles": [f"kns.{ns}"],
                 "ports": [{"name": "http", "port": 8080 + i % 3, "protocol": "TCP"}]},
    }
    if DUAL:
        value["spec"]["ipNetworks"].append(f"fd00:64::{i:x}/128")  # type: ignore[index]
    return keys.resource_key("workloadendpoints", name, ns), value


def k8s_policy(p: int, port: int = 80) -> tuple[str, dict[str, Any]]:
    """A realistic mix: pod selector + namespace selector peers, numbered and named ports, egress."""
    ns = f"ns{p % NAMESPACES}"
    obj = {
        "apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
        "metadata": {"name": f"np{p}", "namespace": ns},
        "spec": {
            "podSelector": {"matchLabels": {"app": f"app{p % APPS}"}},
            "policyTypes": ["Ingress", "Egress"],
            "ingress": [
                {"from": [{"podSelector": {"matchLabels": {"role": "web"}}},
                          {"namespaceSelector": {"matchLabels": {"tier": f"t{p % 4}"}},
                           "podSelector": {"matchExpressions": [{"key": "app", "operator": "In",
                                                                 "values": [f"app{(p + 1) % APPS}", f"app{(p + 2) % APPS}"]}]}}],
                 "ports": [{"port": port}, {"port": "http"}, {"port": 9000, "endPort": 9010, "protocol": "UDP"}]},
            ],
            "egress": [
                {"to": [{"namespaceSelector": {}, "podSelector": {"matchLabels": {"role": "db"}}}],
                 "ports": [{"port": 5432}]},
                {"to": [{"ipBlock": {"cidr": "0.0.0.0/0", "except": ["10.0.0.0/8"]}}]
                 + ([{"ipBlock": {"cidr": "::/0", "except": ["fd00::/8"]}}] if DUAL else [])},
            ],
        },
    }
    res = convert_k8s_networkpolicy(obj)
    return keys.resource_key("networkpolicies", res["metadata"]["name"], ns), res


def cluster(pods: int, policies: int) -> list[tuple[str, dict[str, Any]]]:
    return ([profile(f"ns{n}") for n in range(NAMESPACES)] + [endpoint(i) for i in range(pods)]
            + [k8s_policy(p) for p in range(policies)])


# -- namespaces and commands -------------------------------------------------------------------

class NetnsRunner:
    """commands.run inside one netns; records when each restore returned and what it wrote."""

    def __init__(self, netns: str, command_timeout: float) -> None:
        self.netns = netns
        self.command_timeout = command_timeout
        self.restores: list[tuple[float, str]] = []
        self.started: list[float] = []  # when each restore in `restores` started
        self.tools: list[str] = []  # the binary of each restore in `restores`
        self.cond = threading.Condition()

    def __call__(self, argv: Sequence[str], *, input: str | bytes | None = None,
                 timeout: float = 30) -> CompletedRun:
        started = time.perf_counter()
        done = commands.run(["ip", "netns", "exec", self.netns, *argv], input=input,
                            timeout=max(timeout, self.command_timeout))
        if "restore" in argv[0] and isinstance(input, str):
            with self.cond:
                self.started.append(started)
                self.tools.append(argv[0])
                self.restores.append((time.perf_counter(), input))
                self.cond.notify_all()
        return done

    def wait_for(self, needle: str, since: int, timeout: float, tool: str = "iptables-"
                 ) -> tuple[float, float] | None:
        """(when the restore by `tool` (iptables- or ip6tables-) carrying `needle` started, when it
        returned)."""
        deadline = time.monotonic() + timeout
        with self.cond:
            while True:
                for n, (stamp, text) in enumerate(self.restores[since:], since):
                    if needle in text and self.tools[n].startswith(tool):
                        return self.started[n], stamp
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return None
                self.cond.wait(remaining)


def netns_add(name: str) -> None:
    subprocess.run(["ip", "netns", "add", name], check=True)


def netns_del(name: str) -> None:
    subprocess.run(["ip", "netns", "del", name], check=False)


class FakeRoutes:
    """The route driver is not what this benchmark measures."""

    class _Result:
        pending: tuple[str, ...] = ()
        failed: dict[str, str] = {}

    programmed: dict[str, Any] = {}

    def set_routes(self, routes: Any) -> None:
        pass

    def queue_resync(self) -> None:
        pass

    def apply(self) -> Any:
        return self._Result()


def rule_count(chains: Any) -> int:
    return sum(len(c.rules) for c in chains.values())


# -- 1. program everything ---------------------------------------------------------------------

def program_everything(prefix: str, pods: int, policies: int, backend: str,
                       command_timeout: float, ip_version: int = 4) -> tuple[float, float]:
    """One run for one family (iptables or ip6tables); returns (agent seconds, bare seconds)."""
    ns = f"{prefix}a"
    base = f"{prefix}b"
    tool = "ip6tables" if ip_version == 6 else "iptables"
    netns_add(ns)
    netns_add(base)
    try:
        runner = NetnsRunner(ns, command_timeout)
        table = Table("filter", backend=backend, runner=runner, ip_version=ip_version)  # type: ignore[arg-type]
        sets = IPSets(runner=runner, ip_version=ip_version)  # type: ignore[arg-type]
        manager = PolicyManager(table, sets, ip_version=ip_version)
        updates = [KVUpdate(k, v, 1) for k, v in cluster(pods, policies)]

        t0 = time.perf_counter()
        calc = PolicyCalc(NODE, ipv6=ip_version == 6)
        Dispatcher(calc).on_updates(updates)
        calc.endpoint_chains()  # calc: selectors → endpoints' policies, ipset members
        calc.ipsets()
        tc = time.perf_counter()
        state = calc.filter_state(ip_version)  # render: chains and rules (the calc above is cached)
        t1 = time.perf_counter()
        manager.on_update(state)
        manager.complete_deferred_work()
        ipset_text = sets.apply()
        t2 = time.perf_counter()
        rules_text = table.apply()
        sets.apply_deletions()
        t3 = time.perf_counter()
        agent_total = t3 - t0

        # Baseline: the same sets and the same rules text, bare, into a fresh namespace.
        b0 = time.perf_counter()
        commands.run(["ip", "netns", "exec", base, "ipset", "restore"], input=ipset_text,
                     timeout=command_timeout)
        b1 = time.perf_counter()
        commands.run(["ip", "netns", "exec", base, f"{tool}-{backend}-restore", "--noflush", "--wait"],
                     input=rules_text, timeout=command_timeout)
        b2 = time.perf_counter()

        members = sum(len(s.members) for s in state.ipsets.values())
        print(f"program everything (IPv{ip_version}, {tool}): {pods} endpoints, {policies} policies, "
              f"backend {backend}")
        print(f"  {len(state.chains)} chains, {rule_count(state.chains)} rules, "
              f"{len(state.ipsets)} ipsets with {members} members, "
              f"restore input {len(rules_text) // 1024} KiB, ipset input {len(ipset_text) // 1024} KiB")
        print(f"  agent: calc {1000 * (tc - t0):7.1f} ms, render {1000 * (t1 - tc):7.1f} ms, manager+ipset restore "
              f"{1000 * (t2 - t1):7.1f} ms, iptables driver {1000 * (t3 - t2):7.1f} ms, "
              f"total {1000 * agent_total:7.1f} ms")
        print(f"  bare:  ipset restore {1000 * (b1 - b0):7.1f} ms, {tool}-restore "
              f"{1000 * (b2 - b1):7.1f} ms, total {1000 * (b2 - b0):7.1f} ms")
        commands_s = sum(end - start for start, (end, _) in zip(runner.started, runner.restores))
        print(f"  agent without its restore commands (calc, render, manager, drivers' own work): "
              f"{1000 * (agent_total - commands_s):7.1f} ms; its restore commands {1000 * commands_s:7.1f} ms "
              f"(the same texts as the bare run: the difference between the two is the machine's load)")
        print(f"  ratio agent/bare: total {agent_total / (b2 - b0):.2f}x, "
              f"iptables driver/bare iptables-restore {(t3 - t2) / (b2 - b1):.2f}x")
        # A second apply with nothing changed must write nothing.
        again = time.perf_counter()
        manager.on_update(calc.filter_state(ip_version))
        manager.complete_deferred_work()
        assert sets.apply() == "" and table.apply() == ""
        print(f"  no-op re-apply: {1000 * (time.perf_counter() - again):.1f} ms")
        return agent_total, b2 - b0
    finally:
        netns_del(ns)
        netns_del(base)


# -- 2. one change → kernel, through the real agent loop --------------------------------------

def change_latency(prefix: str, pods: int, policies: int, changes: int, backend: str,
                   command_timeout: float, dual: bool = False) -> list[float]:
    ns = f"{prefix}c"
    netns_add(ns)
    store = MemoryDatastore()
    agent = None
    thread = None
    try:
        for key, value in cluster(pods, policies):
            store.create(key, value)
        runner = NetnsRunner(ns, command_timeout)
        agent = Agent(store=store, node_name=NODE, networking_backend="none",
                      route_refresh_interval=0, iptables_refresh_interval=0,
                      route_table=FakeRoutes(),  # type: ignore[arg-type]
                      nat_table=Table("nat", backend=backend, runner=runner),  # type: ignore[arg-type]
                      filter_table=Table("filter", backend=backend, runner=runner),  # type: ignore[arg-type]
                      ipsets=IPSets(runner=runner),  # type: ignore[arg-type]
                      ipv6=dual,
                      filter6_table=Table("filter", backend=backend, runner=runner,  # type: ignore[arg-type]
                                          ip_version=6) if dual else None,
                      ipsets6=IPSets(runner=runner, ip_version=6) if dual else None)  # type: ignore[arg-type]
        thread = threading.Thread(target=agent.run, daemon=True)
        start = time.perf_counter()
        thread.start()
        deadline = time.monotonic() + 2 * command_timeout
        while agent.status.applies < 1 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert agent.status.last_apply_ok, agent.status.last_apply_error
        print(f"agent first apply (sync + program everything): {time.perf_counter() - start:.2f} s")

        samples = []
        before_restore = []  # datastore write → the restore starts (the agent's own work)
        bare: list[float] = []  # the same change's restore input, run by hand
        for n in range(changes):
            target = (n * 37) % policies
            key, value = k8s_policy(target, port=20000 + n)
            since = len(runner.restores)
            revision = store.get(key).revision
            t0 = time.perf_counter()
            store.update(key, value, revision)
            stamps = runner.wait_for(str(20000 + n), since, 60.0)  # the port is unique to this change
            assert stamps is not None, f"change {n} never reached iptables-restore"
            if dual:  # done once both families' tables have it
                stamps6 = runner.wait_for(str(20000 + n), since, 60.0, "ip6tables-")
                assert stamps6 is not None, f"change {n} never reached ip6tables-restore"
                stamps = (min(stamps[0], stamps6[0]), max(stamps[1], stamps6[1]))
            samples.append(stamps[1] - t0)
            before_restore.append(stamps[0] - t0)
            time.sleep(0.05)
            # Baseline: the same restore input again, bare (it is -R/-A lines: idempotent).
            b0 = time.perf_counter()
            for text, restore in [(t, tool) for (_, t), tool in zip(runner.restores[since:], runner.tools[since:])
                                  if str(20000 + n) in t]:
                commands.run(["ip", "netns", "exec", ns, f"{restore.split('-')[0]}-{backend}-restore", "--noflush",
                              "--wait"], input=text, timeout=command_timeout)
            bare.append(time.perf_counter() - b0)
        saved = commands.run(["ip", "netns", "exec", ns, f"iptables-{backend}-save", "-t", "filter"]).stdout
        assert str(20000 + changes - 1) in saved, "the last change is not in the kernel"
        ordered = sorted(samples)
        families = "iptables and ip6tables" if dual else "iptables"
        print(f"one policy change → kernel ({families}; {changes} changes, {pods} endpoints, {policies} policies): "
              f"p50 {1000 * statistics.median(samples):.1f} ms, "
              f"p90 {1000 * ordered[int(0.9 * (len(ordered) - 1))]:.1f} ms, max {1000 * max(samples):.1f} ms "
              f"(target p50 <= 100 ms)")
        print(f"  of which before the iptables-restore started (syncer, calc, render, diff) p50 "
              f"{1000 * statistics.median(before_restore):.1f} ms; the restore(s) p50 "
              f"{1000 * statistics.median(s - b for s, b in zip(samples, before_restore)):.1f} ms")
        print(f"  baseline: the same change's restore input run bare p50 {1000 * statistics.median(bare):.1f} ms; "
              f"ratio agent/bare {statistics.median(samples) / statistics.median(bare):.2f}x")
        return samples
    finally:
        if agent is not None:
            agent.stop()
        if thread is not None:
            thread.join(10)
        netns_del(ns)


# -- 3. rule counts ------------------------------------------------------------------------------

def rule_counts() -> None:
    print("rules as a function of pods and policies (filter table, rendering only):")
    print(f"  {'pods':>6} {'policies':>9} {'chains':>7} {'rules':>7} {'ipsets':>7}")
    for pods, policies in ((10, 0), (100, 0), (1000, 0), (100, 50), (1000, 50), (100, 500), (1000, 500)):
        calc = PolicyCalc(NODE)
        Dispatcher(calc).on_updates(KVUpdate(key, value, 1) for key, value in cluster(pods, policies))
        state = calc.filter_state()
        print(f"  {pods:>6} {policies:>9} {len(state.chains):>7} {rule_count(state.chains):>7} "
              f"{len(state.ipsets):>7}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pods", type=int, default=5000)
    parser.add_argument("--policies", type=int, default=1000)
    parser.add_argument("--changes", type=int, default=20)
    parser.add_argument("--repeat", type=int, default=3, help="program-everything runs (the VM is noisy)")
    parser.add_argument("--command-timeout", type=float, default=600.0)
    parser.add_argument("--skip-counts", action="store_true", help="skip the rule-count table")
    parser.add_argument("--family", choices=("4", "6", "dual"), default="4",
                        help="program iptables (4), ip6tables (6) or both in the same run (dual)")
    args = parser.parse_args()
    global DUAL
    DUAL = args.family != "4"
    families = {"4": (4,), "6": (6,), "dual": (4, 6)}[args.family]
    if os.geteuid() != 0:
        print("bench_policy: needs root (network namespaces)", file=sys.stderr)
        return 1
    prefix = "fxb" + secrets.token_hex(3)[:5]
    backend = os.environ.get("FELIX_IPTABLESBACKEND", "nft").lower()
    print(f"load average at start: {os.getloadavg()[0]:.2f} (2 cores, shared)")
    # Families interleaved run by run, so both see the same drift in the machine's load.
    by_family: dict[int, list[tuple[float, float]]] = {f: [] for f in families}
    for i in range(args.repeat):
        for family in families:
            by_family[family].append(program_everything(f"{prefix}{i}{family}", args.pods, args.policies, backend,
                                                         args.command_timeout, family))
    for family, runs in by_family.items():
        if not runs:
            continue
        agent = statistics.median(a for a, _ in runs)
        bare = statistics.median(b for _, b in runs)
        # The median of the per-run ratios: each run's agent and bare parts are minutes apart at
        # this size, and the load on a shared machine drifts in between.
        ratio = statistics.median(a / b for a, b in runs)
        print(f"program everything IPv{family}, median of {len(runs)}: agent {1000 * agent:.0f} ms, "
              f"bare {1000 * bare:.0f} ms; per-run ratios {', '.join(f'{a / b:.2f}x' for a, b in runs)}, "
              f"median {ratio:.2f}x (target <= 2x)")
    if args.family != "6":
        change_latency(prefix, args.pods, args.policies, args.changes, backend, args.command_timeout,
                       dual=args.family == "dual")
    if not args.skip_counts:
        rule_counts()
    return 0


if __name__ == "__main__":
    sys.exit(main())
