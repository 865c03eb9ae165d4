"""felixctl node checksystem (felixpy/ctl/checksystem.py) on fake host trees: kernel configuration,
module tree, programs and sysctls; and on this machine, whose kernel has no IPIP."""

from __future__ import annotations

import gzip
import json
import os
import pathlib
import subprocess
import sys

import pytest

from felixpy.ctl.checksystem import (DEFAULT_MAX_PODS, FEATURES, Host, check_iptables, check_sysctls,
                                     feature_status, neighbour_limits, run_checks)

RELEASE = "6.1.0-13-amd64"
ALL_CONFIGS = sorted({f.configs[0] for f in FEATURES} | {"CONFIG_NF_TABLES", "CONFIG_NFT_COMPAT"})


def _tree(root: pathlib.Path, *, config: dict[str, str] | None = None, gz: bool = True,
          loaded: tuple[str, ...] = (), builtin: tuple[str, ...] = (), available: tuple[str, ...] = (),
          sysctls: dict[str, str] | None = None) -> pathlib.Path:
    if config is not None:
        text = "\n".join(f"# {k} is not set" if v == "n" else f"{k}={v}" for k, v in config.items()) + "\n"
        if gz:
            (root / "proc").mkdir(parents=True, exist_ok=True)
            with gzip.open(root / "proc" / "config.gz", "wt") as f:
                f.write(text)
        else:
            (root / "boot").mkdir(parents=True, exist_ok=True)
            (root / "boot" / f"config-{RELEASE}").write_text(text)
    (root / "proc").mkdir(parents=True, exist_ok=True)
    if loaded:
        (root / "proc" / "modules").write_text("".join(f"{m} 16384 0 - Live 0x0\n" for m in loaded))
    mods = root / "lib" / "modules" / RELEASE
    mods.mkdir(parents=True, exist_ok=True)
    (mods / "modules.builtin").write_text("".join(f"kernel/net/{m}.ko\n" for m in builtin))
    (mods / "modules.dep").write_text("".join(f"kernel/net/{m}.ko.xz: kernel/net/dep.ko.xz\n" for m in available))
    for key, value in (sysctls or {}).items():
        path = root / "proc" / "sys" / key.replace(".", "/")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(value + "\n")
    return root


def _host(root: pathlib.Path, **kwargs: object) -> Host:
    return Host(str(root), release=RELEASE, which=lambda p: f"/usr/sbin/{p}", **kwargs)  # type: ignore[arg-type]


def _feature(name: str):  # type: ignore[no-untyped-def]
    return next(f for f in FEATURES if f.name == name)


def test_config_not_set_is_a_fail_with_its_reason(tmp_path: pathlib.Path) -> None:
    config = {c: "y" for c in ALL_CONFIGS}
    config["CONFIG_NET_IPIP"] = "n"
    host = _host(_tree(tmp_path, config=config))
    ok, detail = feature_status(host, _feature("ipip"))
    assert not ok and detail == "CONFIG_NET_IPIP is not set in /proc/config.gz"
    result = next(r for r in run_checks(host, nodes=3, nodes_source="from --nodes") if r.name == "ipip")
    assert "CONFIG_NET_IPIP" in result.fix and "vxlanMode" in result.fix
    assert all(r.ok for r in run_checks(host, nodes=3, nodes_source="") if r.name in ("vxlan", "xt_set"))


def test_modules_loaded_builtin_or_installed_pass(tmp_path: pathlib.Path) -> None:
    # A Debian kernel: /boot/config-<release>, most things =m, modules on disk.
    config = {c: "m" for c in ALL_CONFIGS}
    host = _host(_tree(tmp_path, config=config, gz=False, loaded=("vxlan",), builtin=("veth",),
                       available=("ipip", "ip_set", "ipt_MASQUERADE")))
    assert host.config_source == f"/boot/config-{RELEASE}"
    assert feature_status(host, _feature("vxlan")) == (True, "module vxlan loaded")
    assert feature_status(host, _feature("veth")) == (True, "built in (modules.builtin lists veth)")
    assert feature_status(host, _feature("ipip")) == (True, "module ipip installed (loaded on first use)")
    assert feature_status(host, _feature("xt_MASQUERADE"))[0]  # by its older name ipt_MASQUERADE
    ok, detail = feature_status(host, _feature("xt_set"))
    assert not ok and detail == f"CONFIG_NETFILTER_XT_SET=m but module xt_set is not installed under {host.module_dir}"


def test_no_kernel_configuration_at_all(tmp_path: pathlib.Path) -> None:
    host = _host(_tree(tmp_path, available=("vxlan",)))
    assert host.config_source is None
    assert feature_status(host, _feature("vxlan"))[0]
    ok, detail = feature_status(host, _feature("ipip"))
    assert not ok and "no kernel configuration found" in detail


def test_explicit_kernel_config_file(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "my.config"
    path.write_text("CONFIG_NET_IPIP=m\n")
    host = _host(_tree(tmp_path / "root", available=("ipip",)), kernel_config=str(path))
    assert host.config_source == str(path) and feature_status(host, _feature("ipip"))[0]
    with pytest.raises(OSError):
        _host(tmp_path, kernel_config=str(tmp_path / "missing"))


def test_iptables_backend_needs_kernel_and_programs(tmp_path: pathlib.Path) -> None:
    config = {c: "y" for c in ALL_CONFIGS}
    config["CONFIG_NFT_COMPAT"] = "n"
    root = _tree(tmp_path, config=config)
    host = _host(root)
    [nft] = check_iptables(host, "nft")
    assert not nft.ok and "nft: missing nft_compat" in nft.detail and "CONFIG_NFT_COMPAT is not set" in nft.detail
    config["CONFIG_NFT_COMPAT"] = "y"
    nothing = Host(str(_tree(tmp_path / "b", config=config)), release=RELEASE, which=lambda p: None)
    [missing] = check_iptables(nothing, "auto")
    assert not missing.ok and "iptables-nft-restore" in missing.detail and "apt-get install iptables" in missing.fix
    [auto] = check_iptables(_host(tmp_path / "b"), "auto")
    assert auto.ok and auto.detail.startswith("backend nft")


def test_neighbour_limits_for_the_cluster_size(tmp_path: pathlib.Path) -> None:
    sysctls = {"net.ipv4.ip_forward": "1", "net.ipv4.neigh.default.gc_thresh1": "128",
               "net.ipv4.neigh.default.gc_thresh2": "512", "net.ipv4.neigh.default.gc_thresh3": "1024"}
    host = _host(_tree(tmp_path, sysctls=sysctls))
    assert neighbour_limits(3, DEFAULT_MAX_PODS) == 114
    forward, small = check_sysctls(host, nodes=3, nodes_source="in the datastore", max_pods=DEFAULT_MAX_PODS)
    assert forward.ok and small.ok and "3 nodes in the datastore" in small.detail
    _, big = check_sysctls(host, nodes=300, nodes_source="from --nodes", max_pods=DEFAULT_MAX_PODS)
    assert not big.ok and "needs 708" not in big.detail and "may need 708 entries" in big.detail
    assert "above gc_thresh2" in big.detail
    assert big.fix == ("sysctl -w net.ipv4.neigh.default.gc_thresh1=512 net.ipv4.neigh.default.gc_thresh2=1024 "
                       "net.ipv4.neigh.default.gc_thresh3=2048")
    _, overflow = check_sysctls(host, nodes=2000, nodes_source="from --nodes", max_pods=DEFAULT_MAX_PODS)
    assert not overflow.ok and "No buffer space available" in overflow.detail
    _, unknown = check_sysctls(host, nodes=None, nodes_source="no datastore configured", max_pods=DEFAULT_MAX_PODS)
    assert not unknown.ok and unknown.fix.startswith("pass --nodes")


def test_neighbour_limits_come_from_the_host_namespace_when_missing_here(tmp_path: pathlib.Path) -> None:
    host = _host(_tree(tmp_path, sysctls={"net.ipv4.ip_forward": "1"}),
                 init_netns_sysctl=lambda key: {"net.ipv4.neigh.default.gc_thresh1": "4096",
                                                "net.ipv4.neigh.default.gc_thresh2": "8192",
                                                "net.ipv4.neigh.default.gc_thresh3": "16384"}.get(key))
    _, neigh = check_sysctls(host, nodes=1000, nodes_source="", max_pods=DEFAULT_MAX_PODS)
    assert neigh.ok and "the host's network namespace" in neigh.detail


def _felixctl(*args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ETCD_", "DATASTORE_TYPE", "KUBECONFIG"))}
    return subprocess.run([sys.executable, "-m", "felixpy.ctl.main", *args], capture_output=True, text=True,
                          timeout=60, env=env)


@pytest.mark.skipif(not os.path.exists("/proc/config.gz"), reason="needs /proc/config.gz")
def test_this_machine_reports_the_missing_ipip_module() -> None:
    import gzip as gz

    with gz.open("/proc/config.gz", "rt") as f:
        has_ipip = any(line.startswith("CONFIG_NET_IPIP=") for line in f)
    done = _felixctl("node", "checksystem", "--nodes", "3", "-o", "json")
    assert done.returncode in (0, 1), done.stderr
    data = json.loads(done.stdout)
    ipip = next(c for c in data["checks"] if c["name"] == "ipip")
    if has_ipip:
        assert ipip["result"] == "PASS"
    else:  # the sandbox kernel (shared docs/sandbox.md)
        assert ipip == {"name": "ipip", "result": "FAIL", "detail": "CONFIG_NET_IPIP is not set in /proc/config.gz",
                        "fix": ipip["fix"], "neededFor": "IP pools with ipipMode Always or CrossSubnet (tunl0)"}
        assert done.returncode == 1 and not data["ok"]
    text = _felixctl("node", "checksystem", "--nodes", "3")
    assert ("FAIL  ipip" in text.stdout) != has_ipip
    assert text.stdout.splitlines()[-1].startswith("System ")


def test_bad_arguments_are_one_line() -> None:
    for args, message in ((("--nodes", "0"), "--nodes 0: expected a number of nodes >= 1"),
                          (("-f", "/nonexistent/config"), "--kernel-config /nonexistent/config: cannot read")):
        done = _felixctl("node", "checksystem", *args)
        assert done.returncode == 1 and done.stdout == ""
        assert done.stderr.startswith(f"felixctl: error: {message}") and done.stderr.count("\n") == 1
