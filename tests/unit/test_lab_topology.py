"""The lab's pure naming, parsing and argument rules (no root, no namespaces)."""

from __future__ import annotations

import pytest

from felixpy.lab import cli, topology
from felixpy.lab.state import LabState, NodeState, PodState
from felixpy.lab.topology import LabUsageError


def test_names_carry_the_lab_name() -> None:
    assert topology.fabric_netns("demo") == "demo-fabric"
    assert topology.node_netns("demo", "n2") == "demo-n2"
    assert topology.node_ip("n1") == "192.0.2.11"
    assert topology.node_ip("n3") == "192.0.2.13"
    assert topology.pod_netns("demo", "x", "a.b") == "demo-x-a-b"
    assert topology.cni_socket("demo", "n1") == "/run/felixpy-lab/demo/n1/cni.sock"
    assert topology.is_node_netns("demo", "demo-n12")
    assert not topology.is_node_netns("demo", "demo-x-n1")
    assert not topology.is_node_netns("demo", "demo2-n1")


@pytest.mark.parametrize("name", ["", "Demo", "-x", "x-", "a" * 25, "a_b"])
def test_bad_lab_names(name: str) -> None:
    with pytest.raises(LabUsageError):
        topology.check_lab_name(name)


def test_labels_parse_and_change() -> None:
    assert topology.parse_labels("") == {}
    assert topology.parse_labels("app=web, tier=db,k8s.io/x=1") == {"app": "web", "tier": "db", "k8s.io/x": "1"}
    for bad in ("novalue", "=v", "a=b c", "a=" + "x" * 64):
        with pytest.raises(LabUsageError):
            topology.parse_labels(bad)
    current = {"app": "web", "tier": "db"}
    assert topology.apply_label_changes(current, ["app=api", "tier-", "new=1"]) == {"app": "api", "new": "1"}
    assert current == {"app": "web", "tier": "db"}
    with pytest.raises(LabUsageError):
        topology.apply_label_changes(current, ["justakey"])


def test_serve_specs() -> None:
    ports = topology.parse_serve("tcp:80,udp:80,web=tcp:8080")
    assert [p.to_wep_port() for p in ports] == [
        {"name": "serve-80-tcp", "port": 80, "protocol": "TCP"},
        {"name": "serve-80-udp", "port": 80, "protocol": "UDP"},
        {"name": "web", "port": 8080, "protocol": "TCP"},
    ]
    assert [p.spec() for p in ports] == ["tcp:80", "udp:80", "tcp:8080"]
    for bad in ("sctp:80", "tcp:0", "tcp:x", "tcp:80,tcp:80", "Web=tcp:1", "80=tcp:1"):
        with pytest.raises(LabUsageError):
            topology.parse_serve(bad)


def test_pool_checks() -> None:
    assert topology.check_pool("10.244.0.0/16", 26) == "10.244.0.0/16"
    for pool, bs in (("10.244.0.1/16", 26), ("192.0.2.0/25", 26), ("10.0.0.0/24", 20), ("10.0.0.0/16", 33)):
        with pytest.raises(LabUsageError):
            topology.check_pool(pool, bs)


def test_name_accepted_before_and_after_subcommand_arguments() -> None:
    args = cli.parse_args(["pod", "add", "x/a", "--node", "n1", "--name", "demo"])
    assert (args.name, args.pod, args.node) == ("demo", "x/a", "n1")
    assert cli.parse_args(["--name", "top", "status"]).name == "top"
    assert cli.parse_args(["status", "-o", "json"]).name == "felixpy"
    args = cli.parse_args(["exec", "n1", "--name", "demo", "--", "felixctl", "get", "ippools", "--name", "x"])
    assert args.name == "demo" and args.command_argv == ["felixctl", "get", "ippools", "--name", "x"]
    args = cli.parse_args(["label", "pod", "x/a", "app=web", "tier-", "--name", "demo"])
    assert args.changes == ["app=web", "tier-"] and args.name == "demo"


def test_unsupported_modes_answer_one_line_and_create_nothing(capsys: pytest.CaptureFixture[str],
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cli.os, "geteuid", lambda: 0)
    created: list[str] = []
    monkeypatch.setattr(cli.procs, "netns_add", created.append)
    monkeypatch.setattr(cli.procs, "kernel_has_ipip", lambda lab: False)
    assert cli.main(["up", "--mode", "ipip", "--name", "zz"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("felixpy-lab: --mode ipip needs a kernel with IPIP (CONFIG_NET_IPIP")
    assert err.count("\n") == 1
    # Reflectors and two subnets exist, but only with BGP (or VXLAN) and within bounds: user
    # errors, one line, exit 1.
    for argv in (["up", "--route-reflectors", "1", "--mode", "routes"], ["up", "--route-reflectors", "21"],
                 ["up", "--cross-subnet", "--mode", "routes"]):
        assert cli.main([*argv, "--name", "zz"]) == 1
        err = capsys.readouterr().err
        assert err.startswith("felixpy-lab: ") and err.count("\n") == 1
    assert created == []


def test_state_round_trips() -> None:
    st = LabState(name="demo", mode="routes", pool="10.244.0.0/16", block_size=26,
                  nodes=[NodeState("n1", "192.0.2.11", "demo-n1", 42)],
                  pods=[PodState("x", "a", "n1", "demo-x-a", "ab" * 32, {"app": "a"}, ["serve-80-tcp=tcp:80"],
                                 ["10.244.1.1"], 43)],
                  namespaces={"x": {"kubernetes.io/metadata.name": "x"}}, netns=["demo-fabric"])
    again = LabState.from_json(st.to_json())
    assert again == st
    assert again.pod("x", "a").ref == "x/a"
    with pytest.raises(LabUsageError):
        again.pod("x", "b")
    with pytest.raises(LabUsageError):
        again.node("n7")


def test_ip_family_environment_and_cni_config() -> None:
    from felixpy.lab import pods, procs

    v4 = procs.agent_env("demo", "n1", "10.244.0.0/16", 26, outer_env={}, mode="vxlan")
    assert v4["FELIX_IPV6SUPPORT"] == "false" and "IP6" not in v4
    dual = procs.agent_env("demo", "n1", "10.244.0.0/16", 26, outer_env={}, mode="vxlan", ip_family="dual")
    assert (dual["IP6"], dual["IP6_AUTODETECTION_METHOD"], dual["CALICO_IPV6POOL_CIDR"],
            dual["CALICO_IPV6POOL_BLOCK_SIZE"], dual["CALICO_IPV6POOL_VXLAN"]) == \
        ("autodetect", "interface=eth0", topology.POOL6, "122", "Always")
    assert "FELIX_IPV6SUPPORT" not in dual and dual["IP"] == "autodetect"
    only6 = procs.agent_env("demo", "n1", "10.244.0.0/16", 26, outer_env={}, mode="routes", ip_family="ipv6")
    assert (only6["IP"], only6["CALICO_IPV4POOL_CIDR"], only6["CALICO_IPV6POOL_VXLAN"]) == ("none", "none", "Never")
    assert "ipam" not in pods.cni_config("demo", "n1")
    assert pods.cni_config("demo", "n1", ip_family="dual")["ipam"] == {
        "type": "calico-ipam", "assign_ipv4": "true", "assign_ipv6": "true"}
    assert pods.cni_config("demo", "n1", ip_family="ipv6")["ipam"]["assign_ipv4"] == "false"
    assert topology.node_ip6("n3") == "fd00:192:0:2::13"


def test_matrix_keys_and_families() -> None:
    assert [cli._result_key(p, port, f) for p, port, f in
            (("tcp", 80, 4), ("icmp", None, 4), ("udp", 81, 6), ("icmp", None, 6))] == \
        ["tcp/80", "icmp", "udp6/81", "icmp6"]
    a = PodState("x", "a", "n1", "lab-x-a", "c1", ips=["10.244.0.1", "fd00:10:244::1"])
    b = PodState("x", "b", "n1", "lab-x-b", "c2", ips=["fd00:10:244::2"])
    assert cli._families(None, [a, b]) == [4, 6] and cli._families("6", [a]) == [6]
    assert cli._targets("tcp", 80, a, 6) == "tcp:fd00:10:244::1:80"
    assert cli._targets("icmp", None, b, 4) is None


def test_ip_family_needs_a_mode_that_routes_ipv6() -> None:
    args = cli.parse_args(["up", "--name", "demo", "--mode", "ipip", "--ip-family", "dual"])
    # (on a kernel without ipip the kernel check answers first: both lines name IPIP)
    with pytest.raises(LabUsageError, match="--ip-family dual needs --mode bgp, routes or vxlan|IPIP"):
        cli.cmd_up(args)
    # BGP carries IPv6 on IPv6 sessions; the default mode is bgp.
    assert cli.parse_args(["up", "--ip-family", "dual"]).mode == "bgp"
    assert topology.node_ip6("rr2") == "fd00:192:0:2::222" and topology.node_ip6("n3") == "fd00:192:0:2::13"


def test_cross_subnet_puts_even_nodes_in_the_second_ipv6_prefix_with_crosssubnet_pools() -> None:
    from felixpy.lab import procs

    assert [topology.node_ip6(n, cross_subnet=True) for n in ("n1", "n2", "n3")] == \
        ["fd00:192:0:2::11", "fd00:198:51:100::12", "fd00:192:0:2::13"]
    assert [topology.node_gateway6(n, cross_subnet=True) for n in ("n1", "n2")] == \
        [topology.FABRIC6_IP, topology.FABRIC6_B_IP]
    env = procs.agent_env("demo", "n2", "10.244.0.0/16", 26, outer_env={}, mode="bgp", cross_subnet=True,
                          ip_family="dual")
    assert (env["CALICO_IPV4POOL_VXLAN"], env["CALICO_IPV6POOL_VXLAN"]) == ("CrossSubnet", "CrossSubnet")
    assert "CALICO_IPV6POOL_VXLAN" not in procs.agent_env("demo", "n2", "10.244.0.0/16", 26, outer_env={},
                                                           mode="bgp", cross_subnet=True)


def test_neighbour_limits_grow_with_the_lab_and_leave_small_labs_alone() -> None:
    from felixpy.lab.procs import neighbour_limits_needed

    # The kernel's defaults (gc_thresh2 512, gc_thresh3 1024) fit up to 10 namespaces: no change.
    assert neighbour_limits_needed(3) <= 512 and neighbour_limits_needed(10) <= 512
    # sandbox.md: 30 nodes + 2 reflectors needed gc_thresh2 4096 / gc_thresh3 8192.
    assert neighbour_limits_needed(32) == 4096
    assert neighbour_limits_needed(52) == 8192
