"""load_config: calico-node's variables, their defaults, good values and one-line errors."""

from __future__ import annotations

import importlib.util
import ipaddress
import pathlib
from typing import Any

import pytest

from felixpy.config import (
    DEFAULT_MTU_IFACE_PATTERN,
    FELIX_PARAMS,
    VARIABLES,
    AutodetectMethod,
    ConfigError,
    felix_changes,
    felix_config,
    load_config,
    parse_address_setting,
    render_docs,
    with_datastore_config,
)
from felixpy.model.resources import validate

ETCD = {"ETCD_ENDPOINTS": "http://127.0.0.1:2379"}
REPO = pathlib.Path(__file__).resolve().parents[2]


def load(**env: str) -> Any:
    return load_config({**ETCD, **env})


def error(env: dict[str, str]) -> str:
    with pytest.raises(ConfigError) as info:
        load_config({**ETCD, **env})
    message = str(info.value)
    assert "\n" not in message and message.strip() == message
    return message


# -- defaults ----------------------------------------------------------------------------------


def test_defaults_from_an_empty_environment() -> None:
    c = load_config({})
    assert c.node.name is None
    assert c.node.nodename_file == "/var/lib/calico/nodename"
    assert c.node.ip.mode == "unset" and c.node.ip6.mode == "unset"
    assert c.node.ip_autodetection_method == AutodetectMethod("first-found")
    assert c.node.as_number is None
    assert c.node.networking_backend == "bird"
    assert c.node.disable_node_ip_check is False
    pool = c.ipv4_pool
    assert (pool.create, pool.cidr, pool.block_size) == (True, None, 26)
    assert (pool.ipip_mode, pool.vxlan_mode, pool.nat_outgoing) == ("Never", "Never", True)
    assert (pool.node_selector, pool.disable_bgp_export) == ("all()", False)
    assert c.no_default_pools is False
    assert c.datastore.type == "kubernetes" and c.datastore.etcd_endpoints == ()
    assert c.datastore.wait_for_datastore is False
    f = c.felix
    assert dict(f.params) == {}
    assert (f.route_refresh_interval, f.iptables_refresh_interval) == (90.0, 180.0)
    assert f.log_severity_screen == "INFO" and f.ipv6_support is True
    assert (f.vxlan_mtu, f.ipip_mtu, f.mtu_iface_pattern) == (0, 0, DEFAULT_MTU_IFACE_PATTERN)
    assert (f.iptables_backend, f.default_endpoint_to_host_action) == ("auto", "DROP")
    assert (f.health_enabled, f.health_port, f.interface_prefixes) == (False, 9099, ("cali",))
    a = c.agent
    assert a.cni_socket == "/var/run/calico/felixpy-cni.sock"
    assert (a.state_dir, a.mtu_file, a.log_format) == ("/var/lib/calico", "/var/lib/calico/mtu", "text")


def test_config_is_frozen() -> None:
    c = load_config({})
    with pytest.raises(AttributeError):
        c.node.name = "x"  # type: ignore[misc]
    with pytest.raises(TypeError):
        c.felix.params["x"] = "y"  # type: ignore[index]


# -- FelixConfiguration: Felix's precedence and the resource's field types -------------------------

# Every Felix parameter felixpy reads, as FelixConfiguration spells it and as the typed config holds it.
FELIX_FIELDS: list[tuple[str, object, str, object]] = [
    ("routeRefreshInterval", "1m30s", "route_refresh_interval", 90.0),
    ("iptablesRefreshInterval", "500ms", "iptables_refresh_interval", 0.5),
    ("ipsetsRefreshInterval", "0", "ipsets_refresh_interval", 0.0),
    ("logSeverityScreen", "Warning", "log_severity_screen", "WARNING"),
    ("logFilePath", "/var/log/felixpy/felix.log", "log_file_path", "/var/log/felixpy/felix.log"),
    ("logSeverityFile", "Debug", "log_severity_file", "DEBUG"),
    ("logDebugFilenameRegex", "bgp\\.py", "log_debug_filename_regex", "bgp\\.py"),
    ("ipv6Support", False, "ipv6_support", False),
    ("vxlanMTU", 1410, "vxlan_mtu", 1410),
    ("vxlanMTUV6", 1390, "vxlan_mtu_v6", 1390),
    ("ipipMTU", 1440, "ipip_mtu", 1440),
    ("vxlanVNI", 5000, "vxlan_vni", 5000),
    ("vxlanPort", 8472, "vxlan_port", 8472),
    ("mtuIfacePattern", "^ens", "mtu_iface_pattern", "^ens"),
    ("iptablesBackend", "NFT", "iptables_backend", "nft"),
    ("chainInsertMode", "Append", "chain_insert_mode", "append"),
    ("defaultEndpointToHostAction", "Return", "default_endpoint_to_host_action", "RETURN"),
    ("natOutgoingAddress", "192.0.2.7", "nat_outgoing_address", "192.0.2.7"),
    ("natPortRange", 32768, "nat_port_range", (32768, 32768)),
    ("healthEnabled", True, "health_enabled", True),
    ("healthPort", 9199, "health_port", 9199),
    ("healthHost", "0.0.0.0", "health_host", "0.0.0.0"),
    ("prometheusMetricsEnabled", True, "prometheus_metrics_enabled", True),
    ("prometheusMetricsPort", 9191, "prometheus_metrics_port", 9191),
    ("prometheusMetricsHost", "127.0.0.1", "prometheus_metrics_host", "127.0.0.1"),
    ("failsafeInboundHostPorts", [{"port": 22}, {"protocol": "UDP", "port": 68}], "failsafe_inbound",
     (("tcp", 22), ("udp", 68))),
    ("failsafeOutboundHostPorts", [], "failsafe_outbound", ()),
    ("interfacePrefix", "tap", "interface_prefixes", ("tap",)),
]


def test_every_felix_parameter_reads_its_felix_configuration_field() -> None:
    assert {f for f, *_ in FELIX_FIELDS} == {p.field for p in FELIX_PARAMS}
    for field, value, attr, expected in FELIX_FIELDS:
        for spec_of in ("global", "host"):
            spec = {field: value}
            felix = felix_config({}, spec if spec_of == "global" else None, spec if spec_of == "host" else None)
            assert getattr(felix, attr) == expected, (field, spec_of)
            assert felix.sources[attr] == f"datastore ({'global' if spec_of == 'global' else 'per-host'})"
        # The resource's value validates, so felixctl accepts what the agent reads.
        validate({"kind": "FelixConfiguration", "metadata": {"name": "default"}, "spec": {field: value}})


def test_felix_precedence_is_environment_then_node_then_default_then_built_in() -> None:
    env = {"FELIX_ROUTEREFRESHINTERVAL": "5"}
    global_spec = {"routeRefreshInterval": "30s", "iptablesRefreshInterval": "60s", "vxlanVNI": 4100}
    host_spec = {"routeRefreshInterval": "20s", "iptablesRefreshInterval": "40s"}
    felix = felix_config(env, global_spec, host_spec)
    assert (felix.route_refresh_interval, felix.iptables_refresh_interval, felix.vxlan_vni,
            felix.ipsets_refresh_interval) == (5.0, 40.0, 4100, 90.0)
    assert (felix.sources["route_refresh_interval"], felix.sources["iptables_refresh_interval"],
            felix.sources["vxlan_vni"], felix.sources["ipsets_refresh_interval"]) == \
        ("environment variable", "datastore (per-host)", "datastore (global)", "default")
    # A blank variable is unset (calico-node's rule), so the datastore's value applies.
    assert felix_config({"FELIX_ROUTEREFRESHINTERVAL": " "}, global_spec, host_spec).route_refresh_interval == 20.0
    # The typed values only are compared: where they came from is not part of the configuration.
    assert felix_config({}, {"vxlanVNI": 4096}) == felix_config({})
    changes = felix_changes(felix_config({}), felix)
    assert [p.field for p, _, _ in changes] == ["routeRefreshInterval", "iptablesRefreshInterval", "vxlanVNI"]
    cfg = with_datastore_config(load(**env), global_spec, host_spec)
    assert cfg.felix == felix and cfg.node == load(**env).node


def test_invalid_felix_configuration_value_is_replaced_by_the_default(caplog: pytest.LogCaptureFixture) -> None:
    # felixctl refuses it on write; one written some other way is logged and ignored, as Felix does.
    felix = felix_config({}, {"vxlanVNI": 4100}, {"vxlanVNI": "lots", "chainInsertMode": "Sideways"})
    assert (felix.vxlan_vni, felix.chain_insert_mode) == (4096, "insert")
    assert "replacing invalid FelixConfiguration value with the default field=vxlanVNI" in caplog.text
    # A bad environment variable still stops the agent.
    with pytest.raises(ConfigError, match='^FELIX_CHAININSERTMODE="sideways": accepted values are insert, append'):
        felix_config({"FELIX_CHAININSERTMODE": "sideways"})


# -- good values --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "value, mode, address, has_prefix",
    [
        ("", "unset", None, False),
        ("autodetect", "autodetect", None, False),
        ("AutoDetect", "autodetect", None, False),
        ("none", "none", None, False),
        ("192.0.2.10", "explicit", "192.0.2.10/32", False),
        ("192.0.2.10/24", "explicit", "192.0.2.10/24", True),
        (" 10.1.2.3/8 ", "explicit", "10.1.2.3/8", True),
    ],
)
def test_ip(value: str, mode: str, address: str | None, has_prefix: bool) -> None:
    ip = load(IP=value).node.ip
    assert ip.mode == mode
    assert ip.address == (ipaddress.ip_interface(address) if address else None)
    assert ip.has_prefix is has_prefix


def test_ip6() -> None:
    ip6 = parse_address_setting("IP6", "2001:db8::1/64", 6)
    assert (ip6.mode, str(ip6.address), ip6.has_prefix) == ("explicit", "2001:db8::1/64", True)
    assert load(IP6="none").node.ip6.mode == "none"
    vxlan = {"CALICO_NETWORKING_BACKEND": "vxlan"}
    assert load(IP6="autodetect", **vxlan).node.ip6.mode == "autodetect"
    assert str(load(IP6="2001:db8::1/64", **vxlan).node.ip6.address) == "2001:db8::1/64"
    # The bird backend runs IPv6 BGP sessions between the nodes' IPv6 addresses: accepted.
    assert str(load(IP6="2001:db8::1/64").node.ip6.address) == "2001:db8::1/64"
    assert load(IP6="autodetect").node.ip6.mode == "autodetect"
    with pytest.raises(ConfigError, match=r'^IP6="10.0.0.1": .*\(not an IPv6 address\)'):
        load(IP6="10.0.0.1")
    assert load(IP6_AUTODETECTION_METHOD="interface=eth0").node.ip6_autodetection_method.args == ("eth0",)


def test_default_ipv6_pool() -> None:
    pool = load().ipv6_pool
    # Calico's defaults: a random ULA /48 chosen at startup, /122 blocks, no NAT, no encapsulation.
    assert (pool.create, pool.cidr, pool.block_size, pool.nat_outgoing, pool.vxlan_mode, pool.ipip_mode,
            pool.node_selector, pool.disable_bgp_export) == (True, None, 122, False, "Never", "Never", "all()", False)
    pool = load(CALICO_IPV6POOL_CIDR="fd00:10:244::/48", CALICO_IPV6POOL_BLOCK_SIZE="120",
                CALICO_IPV6POOL_VXLAN="always", CALICO_IPV6POOL_NAT_OUTGOING="true",
                CALICO_IPV6POOL_NODE_SELECTOR='zone == "a"', CALICO_IPV6POOL_DISABLE_BGP_EXPORT="true").ipv6_pool
    assert (str(pool.cidr), pool.block_size, pool.vxlan_mode, pool.nat_outgoing, pool.node_selector,
            pool.disable_bgp_export) == ("fd00:10:244::/48", 120, "Always", True, 'zone == "a"', True)
    # evaluateENVBool: set to anything but a false spelling is true, even "".
    assert load(CALICO_IPV6POOL_NAT_OUTGOING="").ipv6_pool.nat_outgoing is True
    assert load(CALICO_IPV6POOL_NAT_OUTGOING="no").ipv6_pool.nat_outgoing is False
    assert load(CALICO_IPV6POOL_CIDR="none").ipv6_pool.create is False
    assert load(NO_DEFAULT_POOLS="true").ipv6_pool.create is False
    for env, message in (
        ({"CALICO_IPV6POOL_CIDR": "10.0.0.0/16"}, r'^CALICO_IPV6POOL_CIDR="10.0.0.0/16": .*\(not an IPv6 CIDR\)'),
        ({"CALICO_IPV6POOL_CIDR": "fe80::/64"}, "link-local ranges cannot be pools"),
        ({"CALICO_IPV6POOL_CIDR": "fd00::/124"}, r"smaller than the block size /122"),
        ({"CALICO_IPV6POOL_BLOCK_SIZE": "115"}, r'^CALICO_IPV6POOL_BLOCK_SIZE="115": expected an integer from 116 to 128'),
        ({"CALICO_IPV6POOL_VXLAN": "sometimes"}, r'^CALICO_IPV6POOL_VXLAN="sometimes": accepted values are Always'),
        ({"NO_DEFAULT_POOLS": "true", "CALICO_IPV6POOL_CIDR": "fd00::/48"},
         r"^NO_DEFAULT_POOLS=\"true\": cannot be combined with CALICO_IPV6POOL_CIDR"),
    ):
        with pytest.raises(ConfigError, match=message):
            load(**env)


@pytest.mark.parametrize(
    "value, kind, args",
    [
        ("first-found", "first-found", ()),
        ("", "first-found", ()),
        ("interface=eth.*", "interface", ("eth.*",)),
        ("interface=eth0, ens.*", "interface", ("eth0", "ens.*")),
        ("skip-interface=enp6s0f0,eth.*", "skip-interface", ("enp6s0f0", "eth.*")),
        ("cidr=10.0.1.0/24,10.0.2.0/24", "cidr", ("10.0.1.0/24", "10.0.2.0/24")),
        ("can-reach=8.8.8.8", "can-reach", ("8.8.8.8",)),
        ("can-reach=www.example.com", "can-reach", ("www.example.com",)),
        ("kubernetes-internal-ip", "kubernetes-internal-ip", ()),
    ],
)
def test_autodetection_methods(value: str, kind: str, args: tuple[str, ...]) -> None:
    method = load(IP_AUTODETECTION_METHOD=value).node.ip_autodetection_method
    assert (method.kind, method.args) == (kind, args)
    assert load(IP6_AUTODETECTION_METHOD=value).node.ip6_autodetection_method == method


@pytest.mark.parametrize("value, number", [("64512", 64512), ("1", 1), ("4294967295", 4294967295), ("1.10", 65546), ("65535.65535", 4294967295)])
def test_as_number(value: str, number: int) -> None:
    assert load(AS=value).node.as_number == number


@pytest.mark.parametrize(
    "value, mode",
    [("", "Never"), ("off", "Never"), ("never", "Never"), ("NEVER", "Never"), ("Always", "Always"),
     ("always", "Always"), ("CrossSubnet", "CrossSubnet"), ("cross-subnet", "CrossSubnet"), ("crosssubnet", "CrossSubnet")],
)
def test_encapsulation_modes(value: str, mode: str) -> None:
    assert load(CALICO_IPV4POOL_IPIP=value).ipv4_pool.ipip_mode == mode
    assert load(CALICO_IPV4POOL_VXLAN=value).ipv4_pool.vxlan_mode == mode


def test_one_encapsulation_enabled_with_the_other_never() -> None:
    pool = load(CALICO_IPV4POOL_IPIP="Never", CALICO_IPV4POOL_VXLAN="CrossSubnet").ipv4_pool
    assert (pool.ipip_mode, pool.vxlan_mode) == ("Never", "CrossSubnet")


@pytest.mark.parametrize(
    "value, expected",
    [("false", False), ("FALSE", False), ("0", False), ("no", False), ("n", False), ("F", False),
     ("true", True), ("yes", True), ("anything", True), ("", True)],
)
def test_nat_outgoing_parses_like_calico_node(value: str, expected: bool) -> None:
    assert load(CALICO_IPV4POOL_NAT_OUTGOING=value).ipv4_pool.nat_outgoing is expected


def test_pool_cidr_and_block_size() -> None:
    pool = load(CALICO_IPV4POOL_CIDR="10.244.0.0/16", CALICO_IPV4POOL_BLOCK_SIZE="24").ipv4_pool
    assert (pool.cidr, pool.block_size, pool.create) == (ipaddress.IPv4Network("10.244.0.0/16"), 24, True)
    # Host bits are masked, as calico-node's ParseCIDR does.
    assert load(CALICO_IPV4POOL_CIDR="10.244.7.9/16").ipv4_pool.cidr == ipaddress.IPv4Network("10.244.0.0/16")
    assert load(CALICO_IPV4POOL_BLOCK_SIZE="20").ipv4_pool.block_size == 20
    assert load(CALICO_IPV4POOL_BLOCK_SIZE="32").ipv4_pool.block_size == 32


def test_pool_none_and_no_default_pools() -> None:
    assert load(CALICO_IPV4POOL_CIDR="none").ipv4_pool.create is False
    assert load(CALICO_IPV4POOL_CIDR="None").ipv4_pool.create is False
    c = load(NO_DEFAULT_POOLS="true")
    assert c.no_default_pools is True and c.ipv4_pool.create is False
    assert load(NO_DEFAULT_POOLS="false").ipv4_pool.create is True


def test_pool_flags() -> None:
    pool = load(CALICO_IPV4POOL_DISABLE_BGP_EXPORT="true").ipv4_pool
    assert pool.disable_bgp_export is True


def test_node_selector() -> None:
    pytest.importorskip("policy.selectors")
    assert load(CALICO_IPV4POOL_NODE_SELECTOR='zone == "a"').ipv4_pool.node_selector == 'zone == "a"'
    assert load(CALICO_IPV4POOL_NODE_SELECTOR="").ipv4_pool.node_selector == "all()"


@pytest.mark.parametrize("value, backend", [("bird", "bird"), ("BIRD", "bird"), ("bgp", "bird"), ("vxlan", "vxlan"), ("none", "none"), ("", "bird")])
def test_networking_backend(value: str, backend: str) -> None:
    assert load(CALICO_NETWORKING_BACKEND=value).node.networking_backend == backend


def test_legacy_calico_networking_false_means_policy_only() -> None:
    assert load(CALICO_NETWORKING="false").node.networking_backend == "none"
    assert load(CALICO_NETWORKING="false", CALICO_NETWORKING_BACKEND="vxlan").node.networking_backend == "vxlan"


def test_node_identity_fields() -> None:
    c = load(NODENAME="node-1.example", HOSTNAME="Host-X", CLUSTER_TYPE="k8s,bgp", DISABLE_NODE_IP_CHECK="true")
    assert (c.node.name, c.node.hostname, c.node.cluster_type) == ("node-1.example", "Host-X", "k8s,bgp")
    assert c.node.disable_node_ip_check is True


def test_nodename_file_follows_the_state_dir_unless_set() -> None:
    assert load(FELIXPY_STATE_DIR="/run/fx").node.nodename_file == "/run/fx/nodename"
    assert load(FELIXPY_STATE_DIR="/run/fx").agent.mtu_file == "/run/fx/mtu"
    assert load(FELIXPY_STATE_DIR="/run/fx", CALICO_NODENAME_FILE="/etc/nn").node.nodename_file == "/etc/nn"


# -- datastore ----------------------------------------------------------------------------------


def test_datastore_type_defaults() -> None:
    assert load_config({}).datastore.type == "kubernetes"
    c = load_config({"ETCD_ENDPOINTS": "http://10.0.0.1:2379, https://etcd-2.example:2379"})
    assert c.datastore.type == "etcdv3"
    assert c.datastore.etcd_endpoints == ("http://10.0.0.1:2379", "https://etcd-2.example:2379")
    assert load_config({"DATASTORE_TYPE": "Kubernetes", "KUBECONFIG": "/k"}).datastore.kubeconfig == "/k"


def test_calico_prefixed_datastore_aliases() -> None:
    c = load_config({"CALICO_DATASTORE_TYPE": "etcdv3", "CALICO_ETCD_ENDPOINTS": "http://127.0.0.1:1"})
    assert (c.datastore.type, c.datastore.etcd_endpoints) == ("etcdv3", ("http://127.0.0.1:1",))
    # envconfig: the CALICO_ spelling wins over the bare one.
    c = load_config({"CALICO_DATASTORE_TYPE": "etcdv3", "DATASTORE_TYPE": "kubernetes", **ETCD})
    assert c.datastore.type == "etcdv3"


def test_etcd_tls_files() -> None:
    c = load(ETCD_KEY_FILE="/k.pem", ETCD_CERT_FILE="/c.pem", ETCD_CA_CERT_FILE="/ca.pem")
    ds = c.datastore
    assert (ds.etcd_key_file, ds.etcd_cert_file, ds.etcd_ca_cert_file) == ("/k.pem", "/c.pem", "/ca.pem")


def test_wait_for_datastore_only_literal_true() -> None:
    assert load(WAIT_FOR_DATASTORE="true").datastore.wait_for_datastore is True
    assert load(WAIT_FOR_DATASTORE="True").datastore.wait_for_datastore is False
    assert load(WAIT_FOR_DATASTORE="1").datastore.wait_for_datastore is False


# -- Felix parameters ---------------------------------------------------------------------------


def test_felix_params_are_case_insensitive_and_all_kept() -> None:
    c = load(
        FELIX_ROUTEREFRESHINTERVAL="0",
        felix_IptablesRefreshInterval="30.5",
        Felix_LogSeverityScreen="debug",
        FELIX_IPV6SUPPORT="false",
        FELIX_VXLANMTU="1410",
        FELIX_IPINIPMTU="1440",
        FELIX_MTUIFACEPATTERN="^eth0$",
        FELIX_IPTABLESBACKEND="NFT",
        FELIX_DEFAULTENDPOINTTOHOSTACTION="accept",
        FELIX_HEALTHENABLED="TRUE",
        FELIX_HEALTHPORT="9199",
        FELIX_INTERFACEPREFIX="cali,tap",
        FELIX_SOMETHINGNEW="42",
    )
    f = c.felix
    assert f.route_refresh_interval == 0.0 and f.iptables_refresh_interval == 30.5
    assert f.log_severity_screen == "DEBUG" and f.ipv6_support is False
    assert (f.vxlan_mtu, f.ipip_mtu, f.mtu_iface_pattern) == (1410, 1440, "^eth0$")
    assert (f.iptables_backend, f.default_endpoint_to_host_action) == ("nft", "ACCEPT")
    assert (f.health_enabled, f.health_port, f.interface_prefixes) == (True, 9199, ("cali", "tap"))
    assert f.params["iptablesrefreshinterval"] == "30.5"
    assert f.params["somethingnew"] == "42"
    assert f.unused_params() == ["somethingnew"]


def test_felix_seconds_accept_a_trailing_s() -> None:
    assert load(FELIX_ROUTEREFRESHINTERVAL="15s").felix.route_refresh_interval == 15.0


def test_felixpy_own_variables() -> None:
    c = load(FELIXPY_CNI_SOCKET="/run/x.sock", FELIXPY_STATE_DIR="/tmp/st", FELIXPY_LOG_FORMAT="JSON")
    assert (c.agent.cni_socket, c.agent.state_dir, c.agent.log_format) == ("/run/x.sock", "/tmp/st", "json")


def test_load_config_reads_only_the_mapping(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NODENAME", "from-process-env")
    monkeypatch.setenv("CALICO_IPV4POOL_IPIP", "bogus")
    assert load_config({}).node.name is None


# -- errors: one line naming the variable and what it accepts -------------------------------------

ENCAP = 'accepted values are Always, CrossSubnet, Never (case-insensitive; also "", off, cross-subnet)'
BOOL = "accepted values are true, false (case-insensitive; also 1, 0, yes, no, y, n, t, f)"


@pytest.mark.parametrize(
    "env, message",
    [
        ({"CALICO_IPV4POOL_IPIP": "sometimes"}, f'CALICO_IPV4POOL_IPIP="sometimes": {ENCAP}'),
        ({"CALICO_IPV4POOL_VXLAN": "yes"}, f'CALICO_IPV4POOL_VXLAN="yes": {ENCAP}'),
        ({"CALICO_IPV4POOL_IPIP": "Always", "CALICO_IPV4POOL_VXLAN": "CrossSubnet"},
         'CALICO_IPV4POOL_IPIP="Always" and CALICO_IPV4POOL_VXLAN="CrossSubnet": ipipMode and vxlanMode '
         "cannot both be enabled (set one of them to Never)"),
        ({"CALICO_IPV4POOL_BLOCK_SIZE": "19"}, 'CALICO_IPV4POOL_BLOCK_SIZE="19": expected an integer from 20 to 32'),
        ({"CALICO_IPV4POOL_BLOCK_SIZE": "33"}, 'CALICO_IPV4POOL_BLOCK_SIZE="33": expected an integer from 20 to 32'),
        ({"CALICO_IPV4POOL_BLOCK_SIZE": "/26"}, 'CALICO_IPV4POOL_BLOCK_SIZE="/26": expected an integer from 20 to 32'),
        ({"CALICO_IPV4POOL_CIDR": "10.0.0.0/33"},
         'CALICO_IPV4POOL_CIDR="10.0.0.0/33": expected an IPv4 CIDR such as 10.244.0.0/16, at least as large '
         'as the block size, or "none"'),
        ({"CALICO_IPV4POOL_CIDR": "fd00::/48"},
         'CALICO_IPV4POOL_CIDR="fd00::/48": expected an IPv4 CIDR such as 10.244.0.0/16, at least as large '
         'as the block size, or "none" (not an IPv4 CIDR)'),
        ({"CALICO_IPV4POOL_CIDR": "10.0.0.0/28"},
         'CALICO_IPV4POOL_CIDR="10.0.0.0/28": expected an IPv4 CIDR such as 10.244.0.0/16, at least as large '
         'as the block size, or "none" (smaller than the block size /26)'),
        ({"CALICO_IPV4POOL_CIDR": "224.0.0.0/8"}, 'CALICO_IPV4POOL_CIDR="224.0.0.0/8": expected'),
        ({"NO_DEFAULT_POOLS": "true", "CALICO_IPV4POOL_CIDR": "10.0.0.0/16"},
         'NO_DEFAULT_POOLS="true": cannot be combined with CALICO_IPV4POOL_CIDR="10.0.0.0/16" (unset one of them)'),
        ({"NO_DEFAULT_POOLS": "maybe"}, f'NO_DEFAULT_POOLS="maybe": {BOOL}'),
        ({"CALICO_IPV4POOL_DISABLE_BGP_EXPORT": "sure"}, f'CALICO_IPV4POOL_DISABLE_BGP_EXPORT="sure": {BOOL}'),
        ({"DISABLE_NODE_IP_CHECK": "please"}, f'DISABLE_NODE_IP_CHECK="please": {BOOL}'),
        ({"IP": "300.1.1.1"},
         'IP="300.1.1.1": expected "", autodetect, none, an IPv4 address or an IPv4 CIDR (e.g. 192.0.2.10 or 192.0.2.10/24)'),
        ({"IP": "2001:db8::1"}, 'IP="2001:db8::1": expected "", autodetect, none, an IPv4 address or an IPv4 CIDR '
                                "(e.g. 192.0.2.10 or 192.0.2.10/24) (not an IPv4 address)"),
        ({"IP": "127.0.0.1"}, 'IP="127.0.0.1": expected'),
        ({"IP": "auto"}, 'IP="auto": expected'),
        ({"IP6": "192.0.2.1"}, 'IP6="192.0.2.1": expected "", autodetect, none, an IPv6 address or an IPv6 CIDR (not an IPv6 address)'),
        ({"IP_AUTODETECTION_METHOD": "last-found"},
         'IP_AUTODETECTION_METHOD="last-found": accepted values are first-found, interface=REGEX[,REGEX...], '
         "skip-interface=REGEX[,REGEX...], cidr=CIDR[,CIDR...], can-reach=IP|HOSTNAME, kubernetes-internal-ip"),
        ({"IP_AUTODETECTION_METHOD": "interface=("}, 'IP_AUTODETECTION_METHOD="interface=(": accepted values are'),
        ({"IP_AUTODETECTION_METHOD": "interface="}, 'IP_AUTODETECTION_METHOD="interface=": accepted values are'),
        ({"IP_AUTODETECTION_METHOD": "cidr=10.0.0.0/40"}, "(invalid CIDR '10.0.0.0/40')"),
        ({"IP_AUTODETECTION_METHOD": "can-reach=bad host!"}, 'IP_AUTODETECTION_METHOD="can-reach=bad host!": accepted'),
        ({"IP6_AUTODETECTION_METHOD": "nearest"}, 'IP6_AUTODETECTION_METHOD="nearest": accepted values are first-found'),
        ({"AS": "0"}, 'AS="0": expected an AS number from 1 to 4294967295, or asdot A.B with A and B from 0 to 65535'),
        ({"AS": "4294967296"}, 'AS="4294967296": expected an AS number'),
        ({"AS": "65536.1"}, 'AS="65536.1": expected an AS number'),
        ({"AS": "as64512"}, 'AS="as64512": expected an AS number'),
        ({"AS": "-1"}, 'AS="-1": expected an AS number'),
        ({"NODENAME": "Node_1"},
         'NODENAME="Node_1": expected a lowercase RFC 1123 name (a-z, 0-9, "-", "."; at most 253 characters)'),
        ({"CALICO_NODENAME_FILE": "relative/nodename"}, 'CALICO_NODENAME_FILE="relative/nodename": expected an absolute path'),
        ({"CALICO_NETWORKING_BACKEND": "gobgp"},
         'CALICO_NETWORKING_BACKEND="gobgp": accepted values are bird, vxlan, none (case-insensitive; bgp means bird)'),
        ({"DATASTORE_TYPE": "etcdv2"}, 'DATASTORE_TYPE="etcdv2": accepted values are etcdv3, kubernetes'),
        ({"CALICO_DATASTORE_TYPE": "consul"}, 'CALICO_DATASTORE_TYPE="consul": accepted values are etcdv3, kubernetes'),
        ({"ETCD_ENDPOINTS": "127.0.0.1:2379"},
         'ETCD_ENDPOINTS="127.0.0.1:2379": expected a comma-separated list of http(s)://HOST:PORT URLs (bad endpoint'),
        ({"ETCD_ENDPOINTS": "http://a:1,ftp://b:2"}, "(bad endpoint 'ftp://b:2')"),
        ({"ETCD_ENDPOINTS": "http://etcd"}, "(bad endpoint 'http://etcd')"),
        ({"ETCD_ENDPOINTS": "http://etcd:99999"}, "(bad endpoint 'http://etcd:99999')"),
        ({"ETCD_KEY_FILE": "/k.pem"},
         'ETCD_KEY_FILE="/k.pem": expected an absolute path, set together with ETCD_CERT_FILE (ETCD_CERT_FILE is not set)'),
        ({"ETCD_CERT_FILE": "/c.pem"}, 'ETCD_CERT_FILE="/c.pem": expected an absolute path, set together with ETCD_KEY_FILE'),
        ({"ETCD_CA_CERT_FILE": "ca.pem"}, 'ETCD_CA_CERT_FILE="ca.pem": expected an absolute path'),
        ({"FELIX_ROUTEREFRESHINTERVAL": "-1"}, 'FELIX_ROUTEREFRESHINTERVAL="-1": expected a number of seconds >= 0 (0 disables)'),
        ({"FELIX_IPTABLESREFRESHINTERVAL": "often"}, 'FELIX_IPTABLESREFRESHINTERVAL="often": expected a number of seconds'),
        ({"felix_logSeverityScreen": "chatty"},
         'felix_logSeverityScreen="chatty": accepted values are TRACE, DEBUG, INFO, WARNING, ERROR, FATAL (case-insensitive)'),
        ({"FELIX_IPV6SUPPORT": "auto"}, f'FELIX_IPV6SUPPORT="auto": {BOOL}'),
        ({"FELIX_VXLANMTU": "50"}, 'FELIX_VXLANMTU="50": expected 0 (auto) or an MTU from 68 to 65535'),
        ({"FELIX_IPINIPMTU": "1e3"}, 'FELIX_IPINIPMTU="1e3": expected 0 (auto) or an MTU from 68 to 65535'),
        ({"FELIX_MTUIFACEPATTERN": "^(eth"}, 'FELIX_MTUIFACEPATTERN="^(eth": expected a regular expression (missing )'),
        ({"FELIX_IPTABLESBACKEND": "iptables"}, 'FELIX_IPTABLESBACKEND="iptables": accepted values are auto, legacy, nft (case-insensitive)'),
        ({"FELIX_DEFAULTENDPOINTTOHOSTACTION": "REJECT"},
         'FELIX_DEFAULTENDPOINTTOHOSTACTION="REJECT": accepted values are DROP, RETURN, ACCEPT (case-insensitive)'),
        ({"FELIX_HEALTHENABLED": "on"}, f'FELIX_HEALTHENABLED="on": {BOOL}'),
        ({"FELIX_HEALTHPORT": "0"}, 'FELIX_HEALTHPORT="0": expected a TCP port from 1 to 65535'),
        ({"FELIX_INTERFACEPREFIX": "cali,,tap"}, 'FELIX_INTERFACEPREFIX="cali,,tap": expected a comma-separated list'),
        ({"FELIX_LOGSEVERITYSCREEN": "info", "felix_logseverityscreen": "debug"},
         "FELIX_LOGSEVERITYSCREEN and felix_logseverityscreen are both set: Felix parameters are case-insensitive, set only one"),
        ({"FELIXPY_CNI_SOCKET": "felixpy.sock"}, 'FELIXPY_CNI_SOCKET="felixpy.sock": expected an absolute path'),
        ({"FELIXPY_STATE_DIR": "state"}, 'FELIXPY_STATE_DIR="state": expected an absolute path'),
        ({"FELIXPY_LOG_FORMAT": "xml"}, 'FELIXPY_LOG_FORMAT="xml": accepted values are text, json'),
        ({"IP": "bad\nvalue"}, 'IP="bad\\nvalue": expected'),
    ],
)
def test_error_lines(env: dict[str, str], message: str) -> None:
    got = error(env)
    assert message in got, got
    if not message.startswith("("):
        assert got.startswith(message)


def test_etcdv3_without_endpoints() -> None:
    with pytest.raises(ConfigError) as info:
        load_config({"DATASTORE_TYPE": "etcdv3"})
    assert str(info.value).startswith("ETCD_ENDPOINTS is not set: DATASTORE_TYPE=etcdv3 needs")
    assert info.value.variable == "ETCD_ENDPOINTS"


def test_node_selector_error() -> None:
    pytest.importorskip("policy.selectors")
    got = error({"CALICO_IPV4POOL_NODE_SELECTOR": "zone =="})
    assert got.startswith('CALICO_IPV4POOL_NODE_SELECTOR="zone ==": expected a Calico selector such as all() or zone == "a" (')


def test_error_carries_the_variable() -> None:
    with pytest.raises(ConfigError) as info:
        load(FELIX_HEALTHPORT="x")
    assert info.value.variable == "FELIX_HEALTHPORT"
    assert isinstance(info.value, ValueError)


# -- documentation --------------------------------------------------------------------------------


def test_every_variable_is_documented() -> None:
    for name in ("NODENAME", "IP", "IP_AUTODETECTION_METHOD", "AS", "CALICO_IPV4POOL_CIDR", "ETCD_ENDPOINTS",
                 "FELIX_ROUTEREFRESHINTERVAL", "FELIXPY_CNI_SOCKET", "FELIXPY_STATE_DIR", "FELIXPY_LOG_FORMAT"):
        assert name in VARIABLES
    for var in VARIABLES.values():
        assert var.accepts and var.description and "\n" not in var.accepts


def test_docs_configuration_md_is_generated_from_the_code() -> None:
    path = REPO / "docs" / "configuration.md"
    assert path.read_text(encoding="utf-8") == render_docs(), (
        "docs/configuration.md is stale: run `python -m felixpy.config > docs/configuration.md`")
    assert importlib.util.find_spec("felixpy.config") is not None
