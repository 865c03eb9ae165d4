"""iptables Table and IPSets against the real kernel, for both backends, in a fresh netns (root).

The drivers run unchanged; their runner prefixes every command with `ip netns exec NS`, so all
reads and writes land in the test's namespace (iptables and ipsets are per network namespace).
"""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
from collections.abc import Iterator, Sequence

import pytest

from felixpy.dataplane.drivers.iptables import Chain, Rule, Table, detect_backend
from felixpy.dataplane.drivers.ipsets import IPSets
from felixpy.kernel import commands
from felixpy.kernel.commands import CompletedRun

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root for network namespaces"),
    pytest.mark.skipif(shutil.which("ipset") is None, reason="ipset not installed"),
]


class NetnsRunner:
    def __init__(self, ns: str) -> None:
        self.ns = ns
        self.calls: list[list[str]] = []

    def __call__(
        self, argv: Sequence[str], *, input: str | bytes | None = None, timeout: float = 30
    ) -> CompletedRun:
        self.calls.append(list(argv))
        return commands.run(["ip", "netns", "exec", self.ns, *argv], input=input, timeout=timeout)

    def sh(self, *argv: str) -> str:
        return self(list(argv)).stdout


@pytest.fixture
def run() -> Iterator[NetnsRunner]:
    name = "fxt" + secrets.token_hex(3)[:5]
    subprocess.run(["ip", "netns", "add", name], check=True, timeout=10)
    try:
        yield NetnsRunner(name)
    finally:
        subprocess.run(["ip", "netns", "del", name], capture_output=True, timeout=10)


def rules_of(run: NetnsRunner, backend: str, chain: str) -> list[str]:
    out = run.sh(f"iptables-{backend}-save", "-t", "nat")
    return [line for line in out.splitlines() if line.startswith(f"-A {chain} ")]


MASQ = Chain(
    "cali-nat-outgoing",
    (Rule("-m set --match-set cali40masq-pools src -m set ! --match-set cali40all-pools dst",
          "MASQUERADE", "nat outgoing"),),
)
POST = Chain("cali-POSTROUTING", (Rule("", "cali-nat-outgoing"),))
JUMP = Rule("", "cali-POSTROUTING")


def test_fresh_namespace_detects_nft(run: NetnsRunner) -> None:
    assert detect_backend(run) == "nft"


@pytest.mark.parametrize("backend", ["nft", "legacy"])
def test_full_lifecycle_leaves_foreign_state_alone(run: NetnsRunner, backend: str) -> None:
    ipt = f"iptables-{backend}"
    run.sh(ipt, "-t", "nat", "-N", "KUBE-POSTROUTING")
    run.sh(ipt, "-t", "nat", "-A", "KUBE-POSTROUTING", "-j", "RETURN")
    run.sh(ipt, "-t", "nat", "-A", "POSTROUTING", "-j", "KUBE-POSTROUTING")
    run.sh(ipt, "-t", "nat", "-A", "POSTROUTING", "-s", "172.17.0.0/16", "-j", "MASQUERADE")
    foreign_before = rules_of(run, backend, "POSTROUTING") + rules_of(run, backend, "KUBE-POSTROUTING")

    ipsets = IPSets(runner=run)
    ipsets.set_members("cali40masq-pools", "hash:net", ["10.244.0.0/16"])
    ipsets.set_members("cali40all-pools", "hash:net", ["10.244.0.0/16", "10.9.0.7/32"])
    table = Table("nat", backend=backend, runner=run)
    table.update_chain(MASQ)
    table.update_chain(POST)
    table.set_jump_rules("POSTROUTING", [JUMP])
    ipsets.apply()
    assert table.apply()

    post = rules_of(run, backend, "POSTROUTING")
    assert "cali:" in post[0] and post[0].endswith("-j cali-POSTROUTING")
    assert post[1:] == foreign_before[:2]
    masq = rules_of(run, backend, "cali-nat-outgoing")
    assert len(masq) == 1 and "--match-set cali40masq-pools src" in masq[0]
    assert "add cali40all-pools 10.9.0.7" in run.sh("ipset", "save", "cali40all-pools")

    # The real save output parses back to exactly what we wrote: a resync writes nothing.
    table.queue_resync()
    ipsets.queue_resync()
    assert table.apply() == "" and ipsets.apply() == ""

    # A change touches only what changed.
    table.update_chain(Chain("cali-nat-outgoing", MASQ.rules + (Rule("", "RETURN"),)))
    text = table.apply()
    assert text.splitlines()[1:-1] == [line for line in text.splitlines() if line.startswith("-A")]
    assert len(rules_of(run, backend, "cali-nat-outgoing")) == 2

    # Drift: our jump deleted and a foreign rule put on top; resync puts ours back on top.
    run.sh(ipt, "-t", "nat", "-D", "POSTROUTING", "1")
    run.sh(ipt, "-t", "nat", "-I", "POSTROUTING", "1", "-d", "198.51.100.1", "-j", "RETURN")
    table.queue_resync()
    table.apply()
    post = rules_of(run, backend, "POSTROUTING")
    assert post[0].endswith("-j cali-POSTROUTING") and "198.51.100.1" in post[1]

    # Removal, in the dataplane's order: ipset deletions are refused while rules use them.
    ipsets.remove_set("cali40masq-pools")
    ipsets.remove_set("cali40all-pools")
    assert ipsets.apply_deletions() == []
    table.remove_chain("cali-nat-outgoing")
    table.remove_chain("cali-POSTROUTING")
    table.set_jump_rules("POSTROUTING", [])
    table.apply()
    assert sorted(ipsets.apply_deletions()) == ["cali40all-pools", "cali40masq-pools"]
    save = run.sh(f"{ipt}-save", "-t", "nat")
    assert "cali" not in save
    assert rules_of(run, backend, "POSTROUTING")[1:] == foreign_before[:2]
    assert rules_of(run, backend, "KUBE-POSTROUTING") == foreign_before[2:]
    assert "cali" not in run.sh("ipset", "list", "-n")


def test_ipset_rewrite_swaps_atomically_in_the_kernel(run: NetnsRunner) -> None:
    ipsets = IPSets(runner=run)
    ipsets.set_members("cali40big", "hash:ip", [f"10.0.0.{i}" for i in range(1, 201)])
    ipsets.apply()
    ipsets.set_members("cali40big", "hash:ip", [f"10.0.1.{i}" for i in range(1, 201)])
    assert "swap cali41big cali40big" in ipsets.apply()
    saved = run.sh("ipset", "save")
    assert "add cali40big 10.0.1.200" in saved and "10.0.0.1\n" not in saved
    assert "cali41big" not in saved
    ipsets.queue_resync()
    assert ipsets.apply() == ""
