"""iptables Table and IPSets drivers against stateful fakes that parse the restore input.

The fakes (tests/fakes/iptables.py) keep tables / sets the way the kernel does and answer
`*-save` from that state, so the tests check what ends up "in the kernel", plus golden restore
texts for the rendering.
"""

from __future__ import annotations

from collections.abc import Sequence

import pytest

from felixpy.dataplane.drivers.iptables import (
    Chain,
    IptablesError,
    Rule,
    Table,
    detect_backend,
    rule_hashes,
)
from felixpy.dataplane.drivers.ipsets import IPSets, normalise_member, temp_name
from felixpy.kernel.commands import CommandFailed, CompletedRun
from tests.fakes.iptables import FakeIpset, FakeIptables


def hashed(line: str) -> str:
    """A rule body as the driver writes it, with the hash comment cut off for readable asserts."""
    return line.split('" ', 1)[1] if line.startswith("-m comment --comment \"cali:") else line


NAT_CHAIN = Chain(
    "cali-POSTROUTING",
    (
        Rule("-s 10.244.0.0/16 ! -d 10.244.0.0/16", "MASQUERADE", "nat-outgoing"),
        Rule("", "RETURN"),
    ),
)
JUMP = Rule("", "cali-POSTROUTING")


def test_rule_hashes_are_chained_and_stable() -> None:
    same = (Rule("-p tcp", "ACCEPT"), Rule("-p tcp", "ACCEPT"))
    first, second = rule_hashes("cali-x", same)
    assert first != second and len(first) == 16
    assert rule_hashes("cali-x", same) == [first, second]
    assert rule_hashes("cali-y", same)[0] != first
    assert rule_hashes("cali-x", (Rule("", "RETURN"),)) == ["r-lvOQJCXvkw4-uZ"]


def test_first_apply_golden_restore_text() -> None:
    fake = FakeIptables()
    table = Table("nat", backend="nft", runner=fake)
    table.update_chain(NAT_CHAIN)
    table.set_jump_rules("POSTROUTING", [JUMP])
    text = table.apply()
    h = rule_hashes("cali-POSTROUTING", NAT_CHAIN.rules)
    j = rule_hashes("POSTROUTING", [JUMP])[0]
    assert text == (
        "*nat\n"
        ":cali-POSTROUTING - [0:0]\n"
        f'-A cali-POSTROUTING -m comment --comment "cali:{h[0]}" -s 10.244.0.0/16 ! -d 10.244.0.0/16 '
        '-m comment --comment "nat-outgoing" -j MASQUERADE\n'
        f'-A cali-POSTROUTING -m comment --comment "cali:{h[1]}" -j RETURN\n'
        f'-I POSTROUTING 1 -m comment --comment "cali:{j}" -j cali-POSTROUTING\n'
        "COMMIT\n"
    )
    assert fake.argv_log[-1] == ["iptables-nft-restore", "--noflush", "--wait"]
    assert [hashed(r) for r in fake.chain("nat", "POSTROUTING")] == ["-j cali-POSTROUTING"]
    fake.restores.clear()
    assert table.apply() == "" and fake.restores == []


def test_changes_are_minimal_and_keep_unchanged_rules() -> None:
    fake = FakeIptables()
    table = Table("filter", backend="legacy", runner=fake)
    rules = tuple(Rule(f"-s 10.0.{i}.0/24", "ACCEPT") for i in range(4))
    table.update_chain(Chain("cali-fw", rules))
    table.apply()
    # Change the third rule: the first two are untouched, later ones rewritten (chained hashes).
    changed = rules[:2] + (Rule("-s 10.9.9.0/24", "DROP"),) + rules[3:]
    table.update_chain(Chain("cali-fw", changed))
    text = table.apply()
    assert [line.split(" ")[:3] for line in text.splitlines()[1:-1]] == [
        ["-R", "cali-fw", "3"], ["-R", "cali-fw", "4"],
    ]
    # Shrink: the extra rules are deleted from the end.
    table.update_chain(Chain("cali-fw", changed[:1]))
    text = table.apply()
    assert text.splitlines()[1:-1] == ["-D cali-fw 4", "-D cali-fw 3", "-D cali-fw 2"]
    assert [hashed(r) for r in fake.chain("filter", "cali-fw")] == ["-s 10.0.0.0/24 -j ACCEPT"]
    assert fake.argv_log[-1][0] == "iptables-legacy-restore"


def test_foreign_chains_and_rules_survive_and_our_jump_stays_on_top() -> None:
    fake = FakeIptables()
    fake.tables["nat"]["KUBE-POSTROUTING"] = ["-j MASQUERADE"]
    fake.tables["nat"]["POSTROUTING"] = ["-j KUBE-POSTROUTING", "-s 172.17.0.0/16 -j MASQUERADE"]
    table = Table("nat", backend="nft", runner=fake)
    table.update_chain(NAT_CHAIN)
    table.set_jump_rules("POSTROUTING", [JUMP])
    table.apply()
    post = fake.chain("nat", "POSTROUTING")
    assert [hashed(r) for r in post] == [
        "-j cali-POSTROUTING", "-j KUBE-POSTROUTING", "-s 172.17.0.0/16 -j MASQUERADE",
    ]
    # Someone inserts above us: after a resync our rule is moved back to the top, theirs kept.
    post.insert(0, "-j DOCKER-POSTROUTING")
    table.queue_resync()
    text = table.apply()
    assert text.count("-D POSTROUTING") == 1 and text.count("-I POSTROUTING 1") == 1
    assert [hashed(r) for r in fake.chain("nat", "POSTROUTING")] == [
        "-j cali-POSTROUTING", "-j DOCKER-POSTROUTING", "-j KUBE-POSTROUTING",
        "-s 172.17.0.0/16 -j MASQUERADE",
    ]
    # Removing everything of ours leaves exactly the foreign state.
    table.remove_chain("cali-POSTROUTING")
    table.set_jump_rules("POSTROUTING", [])
    table.apply()
    assert fake.tables["nat"]["KUBE-POSTROUTING"] == ["-j MASQUERADE"]
    assert fake.chain("nat", "POSTROUTING") == [
        "-j DOCKER-POSTROUTING", "-j KUBE-POSTROUTING", "-s 172.17.0.0/16 -j MASQUERADE",
    ]
    assert "cali-POSTROUTING" not in fake.tables["nat"]


def test_first_apply_sweeps_stale_chains_and_rules_of_ours() -> None:
    fake = FakeIptables()
    fake.tables["filter"]["cali-old"] = ['-m comment --comment "cali:AAAAAAAAAAAAAAAA" -j DROP']
    fake.tables["filter"]["FORWARD"] = [
        '-m comment --comment "cali:BBBBBBBBBBBBBBBB" -j cali-old', "-j KUBE-FORWARD",
    ]
    fake.tables["filter"]["KUBE-FORWARD"] = []
    table = Table("filter", backend="nft", runner=fake)
    table.update_chain(Chain("cali-new", (Rule("", "ACCEPT"),)))
    text = table.apply()
    assert text.index("-D FORWARD") < text.index("-X cali-old")
    assert set(fake.tables["filter"]) == {"INPUT", "FORWARD", "OUTPUT", "KUBE-FORWARD", "cali-new"}
    assert fake.chain("filter", "FORWARD") == ["-j KUBE-FORWARD"]


def test_resync_repairs_drift_inside_our_chain() -> None:
    fake = FakeIptables()
    table = Table("filter", backend="nft", runner=fake)
    table.update_chain(Chain("cali-fw", (Rule("-p tcp", "ACCEPT"), Rule("", "DROP"))))
    table.apply()
    fake.chain("filter", "cali-fw")[1] = "-j ACCEPT"  # tampered with, no hash
    fake.chain("filter", "cali-fw").append("-j LOG")
    assert table.apply() == ""  # trusted cache until a resync
    table.queue_resync()
    text = table.apply()
    assert "-R cali-fw 2" in text and "-D cali-fw 3" in text
    assert [hashed(r) for r in fake.chain("filter", "cali-fw")] == ["-p tcp -j ACCEPT", "-j DROP"]


def test_apply_after_a_write_diffs_only_the_chains_changed_since() -> None:
    """At 12,000 chains, walking them all per apply cost ~250 ms of a one-policy change."""
    fake = FakeIptables()
    table = Table("filter", backend="nft", runner=fake)
    chains = [Chain(f"cali-c{i}", (Rule(f"-s 10.0.{i}.0/24", "ACCEPT"),)) for i in range(5)]
    for chain in chains:
        table.update_chain(chain)
    table.apply()
    table.update_chain(chains[1])  # the same object again: not a change
    assert table.apply() == ""
    table.update_chain(Chain("cali-c2", (Rule("-s 10.9.9.0/24", "DROP"),)))
    table.update_chain(Chain("cali-new", (Rule("", "RETURN"),)))
    table.remove_chain("cali-c4")
    text = table.apply()
    assert [line.split(" ")[:2] for line in text.splitlines()[1:-1]] == [
        [":cali-new", "-"], ["-F", "cali-c4"], ["-R", "cali-c2"], ["-A", "cali-new"], ["-X", "cali-c4"],
    ]
    assert [hashed(r) for r in fake.chain("filter", "cali-c2")] == ["-s 10.9.9.0/24 -j DROP"]
    assert table.apply() == ""
    # A resync still compares every chain with what the kernel holds.
    fake.chain("filter", "cali-c0")[0] = "-j ACCEPT"
    table.queue_resync()
    assert "-R cali-c0 1" in table.apply()
    assert [hashed(r) for r in fake.chain("filter", "cali-c0")] == ["-s 10.0.0.0/24 -j ACCEPT"]


def test_failed_restore_is_retried_after_a_read_back_then_raises_with_evidence() -> None:
    fake = FakeIptables()
    sleeps: list[float] = []
    table = Table("nat", backend="nft", runner=fake, sleep=sleeps.append)
    table.update_chain(NAT_CHAIN)
    fake.fail_restores = 1
    table.apply()
    assert len(fake.restores) == 2 and sleeps == [0.05]
    assert sum(1 for argv in fake.argv_log if argv[0] == "iptables-nft-save") == 2
    assert len(fake.chain("nat", "cali-POSTROUTING")) == 2

    table.update_chain(Chain("cali-other", (Rule("", "RETURN"),)))
    fake.fail_restores = 5
    with pytest.raises(IptablesError) as info:
        table.apply()
    assert "restore failed 3 times" in str(info.value) and "\n" not in str(info.value)
    assert info.value.cause is not None and "cali-other" in str(info.value.cause.input)


def test_validation() -> None:
    with pytest.raises(ValueError, match="must start with"):
        Chain("KUBE-x")
    with pytest.raises(ValueError, match="1..28"):
        Chain("cali-" + "x" * 30)
    with pytest.raises(ValueError, match="built-in"):
        Table("nat", backend="nft", runner=FakeIptables()).set_jump_rules("FORWARD", [JUMP])
    with pytest.raises(ValueError, match="unknown iptables table"):
        Table("security")
    with pytest.raises(ValueError, match="double quote"):
        Rule("", "ACCEPT", 'say "hi"')


def test_rule_rendering_of_actions() -> None:
    assert Rule("-p udp", "MARK --set-mark 0x1/0x1").render_body() == "-p udp -j MARK --set-mark 0x1/0x1"
    assert Rule("", "-g cali-to-wl").render_body() == "-g cali-to-wl"
    assert Rule("-p tcp").render_body() == "-p tcp"


@pytest.mark.parametrize(
    ("nft_mangle", "legacy_mangle", "nft_all", "legacy_all", "expected"),
    [
        (":KUBE-IPTABLES-HINT - [0:0]\n", "", "", "-A X\n" * 50, "nft"),
        ("", ":KUBE-KUBELET-CANARY - [0:0]\n", "-A X\n" * 50, "", "legacy"),
        ("", "", "-A X\n", "-A X\n-A Y\n", "legacy"),
        ("", "", "", "", "nft"),
    ],
)
def test_backend_detection(
    nft_mangle: str, legacy_mangle: str, nft_all: str, legacy_all: str, expected: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr("os.path.exists", lambda path: path == "/proc/net/ip_tables_names")

    def runner(argv: Sequence[str], *, input: str | bytes | None = None, timeout: float = 30) -> CompletedRun:
        nft = argv[0] == "iptables-nft-save"
        if "-t" in argv:
            return CompletedRun(nft_mangle if nft else legacy_mangle, "")
        return CompletedRun(nft_all if nft else legacy_all, "")

    assert detect_backend(runner) == expected


# -- ipsets ----------------------------------------------------------------------------------------

def test_ipsets_create_then_apply_member_deltas() -> None:
    fake = FakeIpset()
    ipsets = IPSets(runner=fake)
    ipsets.set_members("cali40all-pools", "hash:net", ["10.244.0.0/16", "10.9.0.1/32"])
    ipsets.set_members("cali40ports", "hash:ip,port", ["10.0.0.1,80", "10.0.0.2,UDP:53"])
    text = ipsets.apply()
    assert text == (
        "create cali40all-pools hash:net family inet maxelem 1048576\n"
        "add cali40all-pools 10.244.0.0/16\n"
        "add cali40all-pools 10.9.0.1\n"
        "create cali40ports hash:ip,port family inet maxelem 1048576\n"
        "add cali40ports 10.0.0.1,tcp:80\n"
        "add cali40ports 10.0.0.2,udp:53\n"
    )
    assert ipsets.apply() == ""
    ipsets.set_members("cali40all-pools", "hash:net", ["10.244.0.0/16", "10.10.0.0/16"])
    assert ipsets.apply() == "del cali40all-pools 10.9.0.1\nadd cali40all-pools 10.10.0.0/16\n"
    assert fake.sets["cali40all-pools"] == ("hash:net", {"10.244.0.0/16", "10.10.0.0/16"})


def test_ipsets_large_change_rewrites_via_temp_and_swap() -> None:
    fake = FakeIpset()
    ipsets = IPSets(runner=fake)
    ipsets.set_members("cali40big", "hash:ip", [f"10.0.0.{i}" for i in range(1, 101)])
    ipsets.apply()
    ipsets.set_members("cali40big", "hash:ip", [f"10.0.1.{i}" for i in range(1, 101)])
    lines = ipsets.apply().splitlines()
    assert lines[0] == "create cali41big hash:ip family inet maxelem 1048576"
    assert lines[-2:] == ["swap cali41big cali40big", "destroy cali41big"]
    assert fake.sets["cali40big"][1] == {f"10.0.1.{i}" for i in range(1, 101)}
    assert set(fake.sets) == {"cali40big"}


def test_ipsets_type_change_recreates_and_leftover_temp_sets_are_removed() -> None:
    fake = FakeIpset()
    fake.sets["cali41stale"] = ("hash:ip", {"10.0.0.1"})  # from an interrupted rewrite
    fake.sets["cali40a"] = ("hash:ip", {"10.0.0.1"})
    ipsets = IPSets(runner=fake)
    ipsets.set_members("cali40a", "hash:net", ["10.0.0.0/24"])
    text = ipsets.apply()
    assert "destroy cali41stale\n" in text and "destroy cali40a\ncreate cali40a hash:net" in text
    assert fake.sets == {"cali40a": ("hash:net", {"10.0.0.0/24"})}


def test_ipsets_read_back_normalises_and_resync_repairs_drift() -> None:
    fake = FakeIpset()
    fake.sets["cali40a"] = ("hash:net", {"10.0.0.1", "10.1.0.0/16"})
    ipsets = IPSets(runner=fake)
    ipsets.set_members("cali40a", "hash:net", ["10.0.0.1/32", "10.1.0.0/16"])
    assert ipsets.apply() == ""
    fake.sets["cali40a"][1].discard("10.1.0.0/16")
    ipsets.queue_resync()
    assert ipsets.apply() == "add cali40a 10.1.0.0/16\n"


def test_ipsets_deletions_are_separate_and_deferred_while_in_use() -> None:
    fake = FakeIpset()
    fake.sets["other"] = ("hash:ip", set())  # not ours: never touched
    ipsets = IPSets(runner=fake)
    for name in ("cali40a", "cali40b", "cali40c"):
        ipsets.set_members(name, "hash:ip", ["10.0.0.1"])
    ipsets.apply()
    ipsets.remove_set("cali40a")
    ipsets.remove_set("cali40b")
    assert ipsets.apply() == "" and "cali40a" in fake.sets  # apply() never deletes
    fake.in_use.add("cali40a")
    assert ipsets.apply_deletions() == ["cali40b"]
    assert set(fake.sets) == {"other", "cali40a", "cali40c"}
    fake.in_use.clear()
    assert ipsets.apply_deletions() == ["cali40a"]
    assert set(fake.sets) == {"other", "cali40c"}


def test_ipsets_failed_restore_raises_and_next_apply_reads_back() -> None:
    fake = FakeIpset()
    ipsets = IPSets(runner=fake)
    ipsets.set_members("cali40a", "hash:ip", ["10.0.0.1"])
    ipsets.apply()
    fake.sets["cali40a"][1].add("10.0.0.2")  # drift that makes our "add" collide
    ipsets.set_members("cali40a", "hash:ip", ["10.0.0.1", "10.0.0.2"])
    with pytest.raises(CommandFailed) as info:
        ipsets.apply()
    assert "add cali40a 10.0.0.2" in str(info.value.input)
    assert ipsets.apply() == ""  # read back: already right


def test_ipset_names_and_members_are_validated() -> None:
    ipsets = IPSets(runner=FakeIpset())
    with pytest.raises(ValueError, match="must start with"):
        ipsets.set_members("kube-x", "hash:ip", [])
    with pytest.raises(ValueError, match="1..31"):
        ipsets.set_members("cali40" + "x" * 30, "hash:ip", [])
    with pytest.raises(ValueError, match="invalid hash:ip member"):
        ipsets.set_members("cali40a", "hash:ip", ["10.0.0.300"])
    with pytest.raises(ValueError, match="unsupported"):
        ipsets.set_members("cali40a", "bitmap:port", [])  # type: ignore[arg-type]
    assert normalise_member("hash:ip,port", "10.0.0.1,sctp:9") == "10.0.0.1,sctp:9"
    assert temp_name("cali40abc") == "cali41abc"


def test_restore_and_save_timeouts_grow_with_the_table() -> None:
    """A 300,000-rule restore takes longer than the default 30 s on a loaded node: the limit is
    sized by the lines written (restore) or expected back (save), so only a stuck command is killed."""
    fake = FakeIptables()
    table = Table("filter", backend="nft", runner=fake)
    big = Chain("cali-big", tuple(Rule(f"-s 10.{i // 65536 % 256}.{i // 256 % 256}.{i % 256}", "ACCEPT")
                                   for i in range(100_000)))
    table.update_chain(big)
    table.apply()
    restore_timeout = fake.timeouts[[a[0].endswith("-restore") for a in fake.argv_log].index(True)]
    assert restore_timeout >= 30 + 100_000 / 2000
    table.queue_resync()
    table.apply()  # reads back a table it knows holds 100,000 rules
    assert fake.argv_log[-1][0].endswith("-save") and fake.timeouts[-1] >= 30 + 100_000 / 2000
    small = Table("nat", backend="nft", runner=fake)
    small.update_chain(NAT_CHAIN)
    first = len(fake.timeouts)
    small.apply()  # a save of an empty table, then a restore of two rules: the default
    assert len(fake.timeouts) - first == 2 and all(30 <= t < 31 for t in fake.timeouts[first:])
