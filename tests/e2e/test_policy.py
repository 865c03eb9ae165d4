"""Kubernetes NetworkPolicy in a real 3-node lab: every case of tests/policy_cases.py with real TCP
and UDP probes, policy changes and label changes live, and drift repair.

One dual-stack lab for the module (3 nodes, `--ip-family dual`, FELIX_IPTABLESREFRESHINTERVAL and
FELIX_IPSETSREFRESHINTERVAL short so drift is repaired within seconds); the 3 namespaces × 3 pods of
policy_cases.py spread over the nodes so that every case has same-node and cross-node pairs. Every
case is checked over IPv4 and IPv6 in the same matrix (policy is rendered into iptables and
ip6tables alike); ipBlocks naming pods get their IPv6 twin (policy_cases.resolve). Each case applies its policies (`felixpy-lab apply -f`), waits
(bounded) until `felixpy-lab matrix -o json` equals the expected reachability, then deletes them and
waits until everything connects again.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import tempfile
import time
from typing import Any, Iterator

import pytest

from tests import policy_cases as pc
from tests.e2e.labtools import Lab

pytestmark = pytest.mark.e2e

LAB_NODES = 3
LAB_ARGS = ("--ip-family", "dual")
FAMILIES = (4, 6)  # this module's lab; test_kube_policy.py reuses World on an IPv4-only one
REFRESH_SECONDS = 3
CONVERGE_TIMEOUT = 10.0  # a policy change must be visible to probes well within this
PROBE_TIMEOUT = "0.6"  # seconds a blocked probe waits; lab latency is microseconds
SERVE = ",".join(f"{proto}:{port}" for port, proto in pc.SERVED)


def node_of(pod_id: str) -> str:
    """x/a→n1, x/b→n2, x/c→n3, y/a→n2, ...: every namespace on every node, pairs on one node too."""
    ns_index = pc.NAMESPACES.index(pod_id.split("/")[0])
    pod_index = pc.PODS.index(pod_id.split("/")[1])
    return f"n{(ns_index + pod_index) % LAB_NODES + 1}"


class World:
    """The lab with the case table's pods, and what policies / labels it currently carries."""

    def __init__(self, lab: Lab) -> None:
        self.lab = lab
        self.policies: dict[tuple[str, str], dict[str, Any]] = {}  # (ns, name) -> applied object
        self.pod_labels = {p: pc.default_pod_labels(p) for p in pc.ALL_PODS}
        self.ns_labels = {ns: pc.default_namespace_labels(ns) for ns in pc.NAMESPACES}
        addresses = {f"{p['namespace']}/{p['name']}": p["ips"] for p in lab.state()["pods"]}
        self.ips = {p: next(ip for ip in addresses[p] if ":" not in ip) for p in pc.ALL_PODS}
        self.ips6 = {p: ip for p in pc.ALL_PODS for ip in addresses[p] if ":" in ip}
        # Every family the pods have is probed and checked (the lab's matrix does the same).
        self.families = (4, 6) if len(self.ips6) == len(pc.ALL_PODS) else (4,)

    # -- resources ---------------------------------------------------------------------------
    def _file(self, docs: list[dict[str, Any]]) -> str:
        fd, path = tempfile.mkstemp(prefix="fxpol", suffix=".yaml")
        with os.fdopen(fd, "w") as f:
            f.write("\n---\n".join(json.dumps(d) for d in docs))
        return path

    def _cli_file(self, verb: str, docs: list[dict[str, Any]]) -> None:
        path = self._file(docs)
        try:
            self.lab.cli(verb, "-f", path)
        finally:
            os.unlink(path)

    def set_policies(self, policies: tuple[dict[str, Any], ...]) -> None:
        """Exactly these policies exist afterwards: stale ones deleted, new or changed ones applied."""
        ips6 = self.ips6 if 6 in self.families else None
        wanted = {(p["metadata"]["namespace"], p["metadata"]["name"]): pc.resolve(p, self.ips, ips6)
                  for p in policies}
        stale = [obj for key, obj in self.policies.items() if key not in wanted]
        changed = [obj for key, obj in wanted.items() if self.policies.get(key) != obj]
        if stale:
            self._cli_file("delete", stale)
        if changed:
            self._cli_file("apply", changed)
        self.policies = wanted

    def set_labels(self, step: pc.Step | None) -> None:
        for pod_id in pc.ALL_PODS:
            want = step.labels_of_pod(pod_id) if step else pc.default_pod_labels(pod_id)
            self._relabel("pod", pod_id, self.pod_labels[pod_id], want)
            self.pod_labels[pod_id] = want
        for ns in pc.NAMESPACES:
            want = dict(step.namespace_labels.get(ns, pc.default_namespace_labels(ns))) if step \
                else pc.default_namespace_labels(ns)
            self._relabel("ns", ns, self.ns_labels[ns], want)
            self.ns_labels[ns] = want

    def _relabel(self, kind: str, target: str, have: dict[str, str], want: dict[str, str]) -> None:
        changes = [f"{k}-" for k in sorted(have) if k not in want]
        changes += [f"{k}={v}" for k, v in sorted(want.items()) if have.get(k) != v]
        if changes:
            self.lab.cli("label", kind, target, *changes)

    # -- probing -----------------------------------------------------------------------------
    def matrix(self, probes: list[tuple[int, str]]) -> dict[str, dict[str, dict[str, bool]]]:
        ports = sorted({port for port, _ in probes})
        protos = sorted({proto for _, proto in probes})
        data = self.lab.json("matrix", "--ports", ",".join(map(str, ports)), "--protos", ",".join(protos),
                             "--timeout", PROBE_TIMEOUT)
        results: dict[str, dict[str, dict[str, bool]]] = data["results"]
        return results

    def differences(self, expectations: tuple[pc.Expect, ...]) -> list[str]:
        """Every pair whose probe disagrees with its expectation, in every family (one matrix run:
        the lab probes each family the pods have, keys "tcp/80" and "tcp6/80")."""
        results = self.matrix([(e.port, e.protocol) for e in expectations])
        wrong = []
        for exp in expectations:
            for family in self.families:
                if exp.family not in (None, family):
                    continue
                key = f"{exp.protocol}{'6' if family == 6 else ''}/{exp.port}"
                rows = results[key]
                for src in pc.ALL_PODS:
                    for dst in pc.ALL_PODS:
                        if src != dst and rows[src][dst] != exp.is_allowed(src, dst):
                            wrong.append(f"{key} {src}->{dst} "
                                         f"{'connected' if rows[src][dst] else 'blocked'}, expected "
                                         f"{'connected' if exp.is_allowed(src, dst) else 'blocked'}")
        return wrong

    def wait_matrix(self, expectations: tuple[pc.Expect, ...], what: str,
                    timeout: float = CONVERGE_TIMEOUT) -> float:
        start = time.monotonic()
        while True:
            wrong = self.differences(expectations)
            if not wrong:
                return time.monotonic() - start
            if time.monotonic() - start > timeout:
                raise AssertionError(f"{what}: reachability still wrong after {timeout:g} s "
                                     f"({len(wrong)} pairs):\n  " + "\n  ".join(wrong[:20]))
            time.sleep(0.2)

    def reset(self, probes: tuple[tuple[int, str], ...]) -> None:
        """No policies, default labels, and everything connects again."""
        self.set_policies(())
        self.set_labels(None)
        self.wait_matrix(pc.expect(pc.everyone(), probes), "after deleting every policy")


@pytest.fixture(scope="module")
def world(request: pytest.FixtureRequest) -> Iterator[World]:
    # The agents read FELIX_* from the environment `felixpy-lab up` runs in; ipsets have their
    # own refresh interval, as in Felix.
    variables = ("FELIX_IPTABLESREFRESHINTERVAL", "FELIX_IPSETSREFRESHINTERVAL")
    saved = {name: os.environ.get(name) for name in variables}
    os.environ.update({name: str(REFRESH_SECONDS) for name in variables})
    try:
        lab: Lab = request.getfixturevalue("lab")
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
    for ns in pc.NAMESPACES:
        labels = ",".join(f"{k}={v}" for k, v in pc.default_namespace_labels(ns).items())
        lab.cli("ns", "add", ns, "--labels", labels)
    for pod_id in pc.ALL_PODS:
        labels = ",".join(f"{k}={v}" for k, v in pc.default_pod_labels(pod_id).items())
        lab.cli("pod", "add", pod_id, "--node", node_of(pod_id), "--labels", labels, "--serve", SERVE)
    w = World(lab)
    w.wait_matrix(pc.expect(pc.everyone(), pc.ALL_PROBES), "the world before any policy", timeout=20)
    yield w


def test_the_lab_is_dual_stack(world: World) -> None:
    """Every case below is checked over both families only if every pod has both: say so."""
    assert world.families == FAMILIES, f"pods' IPv6 addresses: {world.ips6}"


def probes_of(case: pc.Case) -> tuple[tuple[int, str], ...]:
    return tuple(sorted({(e.port, e.protocol) for step in case.steps for e in step.expect}))


@pytest.mark.parametrize("case", pc.CASES, ids=[c.name for c in pc.CASES])
def test_policy_case(world: World, case: pc.Case) -> None:
    try:
        for i, step in enumerate(case.steps):
            world.set_labels(step)
            world.set_policies(step.policies)
            world.wait_matrix(step.expect, f"{case.name} step {i + 1}/{len(case.steps)}"
                              + (f" ({step.note})" if step.note else ""))
    finally:
        world.reset(probes_of(case))


# -- drift -----------------------------------------------------------------------------------------

def node_exec(lab: Lab, node: str, *argv: str, check: bool = True) -> str:
    done = subprocess.run(["ip", "netns", "exec", lab.netns(node), *argv], capture_output=True, text=True,
                          timeout=20)
    if check and done.returncode != 0:
        raise AssertionError(f"{' '.join(argv)} on {node}: {done.stderr.strip()}")
    return done.stdout


def iptables_tool(lab: Lab, node: str, tool: str, family: int = 4) -> str:
    """The backend binary the agent writes with (the one whose filter table has our chains)."""
    base = "ip6tables" if family == 6 else "iptables"
    for backend in ("nft", "legacy"):
        out = node_exec(lab, node, f"{base}-{backend}-save", "-t", "filter", check=False)
        if ":cali-FORWARD" in out:
            return f"{base}-{backend}{'-' + tool if tool else ''}"
    raise AssertionError(f"no cali-FORWARD chain on {node} ({base})")


def save(lab: Lab, node: str, family: int = 4) -> str:
    return node_exec(lab, node, iptables_tool(lab, node, "save", family), "-t", "filter")


def wait_until(what: str, predicate: Any, timeout: float) -> float:
    start = time.monotonic()
    while not predicate():
        if time.monotonic() - start > timeout:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(0.2)
    return time.monotonic() - start


@pytest.mark.parametrize("family", FAMILIES, ids=["iptables", "ip6tables"])
def test_hand_deleted_rule_is_repaired_within_the_refresh_interval(world: World, family: int) -> None:
    lab = world.lab
    isolate = pc.by_name("default-deny-ingress")
    node = node_of("x/a")
    try:
        world.set_policies(isolate.steps[0].policies)
        world.wait_matrix(isolate.steps[0].expect, "deny-all ingress in x")
        # x/a's ingress chain ends its tier with a DROP: delete it by hand.
        line = next((ln for ln in save(lab, node, family).splitlines()
                     if ln.startswith("-A cali-tw-") and "End of tier" in ln), None)
        assert line is not None, "no end-of-tier rule in any cali-tw- chain"
        rule_hash = re.search(r"cali:([A-Za-z0-9_-]+)", line)
        assert rule_hash is not None
        # -D fails (and node_exec raises) unless the rule was there and is now gone. No read-back
        # here: the agent's 3 s refresh may already have put it back, which is what is tested.
        node_exec(lab, node, iptables_tool(lab, node, "", family), "-t", "filter", "-D", *shlex.split(line)[1:])
        took = wait_until("the deleted rule to come back", lambda: rule_hash.group(1) in save(lab, node, family),
                          REFRESH_SECONDS + 5)
        assert took <= REFRESH_SECONDS + 5
        world.wait_matrix(isolate.steps[0].expect, "deny-all ingress in x after the repair")
    finally:
        world.reset(pc.TCP80)


@pytest.mark.parametrize("family", FAMILIES, ids=["cali40", "cali60"])
def test_hand_deleted_ipset_member_is_repaired_within_the_refresh_interval(world: World, family: int) -> None:
    lab = world.lab
    allow_b = pc.by_name("ingress-from-pod-selector-same-namespace")
    node = node_of("x/a")
    member = world.ips["x/b"] if family == 4 else world.ips6["x/b"]
    try:
        world.set_policies(allow_b.steps[0].policies)
        world.wait_matrix(allow_b.steps[0].expect, "x/a allows x/b only")
        sets = [n for n in node_exec(lab, node, "ipset", "list", "-n").split() if n.startswith(f"cali{family}0s:")]
        holding = [s for s in sets if member in node_exec(lab, node, "ipset", "list", s)]
        assert holding, f"no selector set on {node} holds {member}: {sets}"
        # ipset del fails (and node_exec raises) unless the member was there; no read-back, since
        # the refresh may already have repaired it.
        node_exec(lab, node, "ipset", "del", holding[0], member)
        wait_until("the deleted member to come back",
                   lambda: member in node_exec(lab, node, "ipset", "list", holding[0]), REFRESH_SECONDS + 5)
        world.wait_matrix(allow_b.steps[0].expect, "x/a allows x/b only after the repair")
    finally:
        world.reset(pc.TCP80)


def test_chains_and_rules_of_other_owners_survive(world: World) -> None:
    lab = world.lab
    node = "n1"
    tool = iptables_tool(lab, node, "")
    foreign = "FXT-FOREIGN"
    node_exec(lab, node, tool, "-t", "filter", "-N", foreign)
    try:
        node_exec(lab, node, tool, "-t", "filter", "-A", foreign, "-p", "tcp", "--dport", "9999", "-j", "ACCEPT")
        node_exec(lab, node, tool, "-t", "filter", "-A", "FORWARD", "-p", "tcp", "--dport", "9998", "-j", foreign)
        deny = pc.by_name("default-deny-all")
        world.set_policies(deny.steps[0].policies)
        world.wait_matrix(deny.steps[0].expect, "deny-all in x")
        time.sleep(REFRESH_SECONDS + 1)  # at least one full resync (read-back and rewrite) happened
        world.set_policies(())
        world.wait_matrix(pc.expect(pc.everyone()), "no policy")
        text = save(lab, node)
        assert f":{foreign}" in text and "--dport 9999" in text, text
        assert f"-A FORWARD -p tcp -m tcp --dport 9998 -j {foreign}" in text, text
        # Ours stay on top of the built-in chain, the foreign rule after them.
        forward = [ln for ln in text.splitlines() if ln.startswith("-A FORWARD")]
        assert "cali-FORWARD" in forward[0] and foreign in forward[-1]
    finally:
        world.reset(pc.TCP80)
        node_exec(lab, node, tool, "-t", "filter", "-D", "FORWARD", "-p", "tcp", "--dport", "9998", "-j", foreign,
                  check=False)
        node_exec(lab, node, tool, "-t", "filter", "-F", foreign, check=False)
        node_exec(lab, node, tool, "-t", "filter", "-X", foreign, check=False)


def test_calico_globalnetworkpolicy_and_delete(world: World) -> None:
    """projectcalico.org/v3 policies go through the same lab commands: a GNP denying udp/81 to pods
    labelled pod=c everywhere, then its delete."""
    gnp = {"apiVersion": "projectcalico.org/v3", "kind": "GlobalNetworkPolicy",
           "metadata": {"name": "fxt-deny-udp81-to-c"},
           "spec": {"order": 10, "selector": "pod == 'c'", "types": ["Ingress"],
                    "ingress": [{"action": "Deny", "protocol": "UDP", "destination": {"ports": [81]}},
                                {"action": "Allow"}]}}
    blocked = pc.everyone().ingress("*/c", False)
    expect = pc.expect_each(udp81=blocked, udp80=pc.everyone(), tcp81=pc.everyone())
    world._cli_file("apply", [gnp])
    try:
        world.wait_matrix(expect, "GNP denies udp/81 to */c")
    finally:
        world._cli_file("delete", [gnp])
    world.wait_matrix(pc.expect(pc.everyone(), ((81, "udp"),)), "GNP deleted")
