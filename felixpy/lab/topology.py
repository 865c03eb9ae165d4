"""The lab's naming and addressing rules, pure: every name a lab creates is built and checked here.

Every namespace, directory and process of a lab carries the lab's name, so two labs (or two test
runs) on one machine never collide:

    <lab>-fabric             the "physical" network: a bridge joining the nodes, and etcd; with
                             --cross-subnet a second bridge, and the namespace routes between them
    <lab>-n1 .. <lab>-nN     one per node, eth0 = 192.0.2.(10+i)/24 (--cross-subnet: even nodes
                             on the second subnet, 198.51.100.(10+i)/24); with --ip-family ipv6
                             or dual also fd00:192:0:2::(10+i)/64 (the fabric bridge has ::1)
    <lab>-rr1 .. <lab>-rrN   --route-reflectors: one per reflector, eth0 = 192.0.2.(220+i)/24
    <lab>-<ns>-<pod>         one per pod, plumbed by the CNI plugin
    /run/felixpy-lab/<lab>/  state.json, etcd data, per-node agent log, CNI socket and state dir,
                             and in mode bgp the node's ExaBGP files (<node>/exabgp/)

Links need no lab name: each one lives inside one of the lab's own namespaces.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass

RUN_ROOT = "/run/felixpy-lab"
DEFAULT_LAB = "felixpy"

FABRIC_SUBNET = ipaddress.IPv4Network("192.0.2.0/24")
FABRIC_IP = "192.0.2.1"
FABRIC_BRIDGE = "fabric0"
ETCD_CLIENT_PORT = 2379
ETCD_ENDPOINT = f"http://{FABRIC_IP}:{ETCD_CLIENT_PORT}"
NODE_IFACE = "eth0"
# --cross-subnet: the second "physical" subnet, for even nodes; the fabric namespace routes.
FABRIC_B_SUBNET = ipaddress.IPv4Network("198.51.100.0/24")
FABRIC_B_IP = "198.51.100.1"
FABRIC_B_BRIDGE = "fabric1"
POD_IFACE = "eth0"

MAX_NODES = 200  # node addresses are 192.0.2.11 .. 192.0.2.210, inside the /24
MAX_REFLECTORS = 20  # reflector addresses are 192.0.2.221 .. 192.0.2.240
RR_CLUSTER_ID = "244.0.0.1"  # every lab reflector shares it (redundant pair, Calico's usual example)
RR_LABEL = "route-reflector"
MODES = ("bgp", "routes", "vxlan", "ipip")
# --ip-family: which families pods get. IPv6 and dual give nodes an IPv6 address on the fabric and
# the pool below; the control plane (etcd) stays on the IPv4 fabric.
IP_FAMILIES = ("ipv4", "ipv6", "dual")
FABRIC6_SUBNET = ipaddress.IPv6Network("fd00:192:0:2::/64")
FABRIC6_IP = "fd00:192:0:2::1"
# --cross-subnet with IPv6: the second subnet's IPv6 prefix (even nodes), on fabric1.
FABRIC6_B_SUBNET = ipaddress.IPv6Network("fd00:198:51:100::/64")
FABRIC6_B_IP = "fd00:198:51:100::1"
POOL6 = "fd00:10:244::/64"
POOL6_BLOCK_SIZE = 122  # Calico's default for IPv6 pools

_LAB_NAME = re.compile(r"^[a-z0-9]([a-z0-9-]{0,22}[a-z0-9])?$")
# Kubernetes namespaces and pod names are DNS labels / subdomains; the lab accepts DNS labels.
_K8S_NAME = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")
_NODE_NAME = re.compile(r"^n[1-9][0-9]*$")
_REFLECTOR_NAME = re.compile(r"^rr[1-9][0-9]*$")
# Label keys: optional DNS-subdomain prefix, then a name of alphanumerics, '-', '_', '.'.
_LABEL_NAME = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9_.-]{0,61}[A-Za-z0-9])?$")
_LABEL_PREFIX = re.compile(r"^[a-z0-9]([a-z0-9.-]{0,251}[a-z0-9])?$")
_LABEL_VALUE = re.compile(r"^([A-Za-z0-9]([A-Za-z0-9_.-]{0,61}[A-Za-z0-9])?)?$")


class LabUsageError(ValueError):
    """The user asked for something malformed; the message is one line for the terminal."""


def check_lab_name(name: str) -> str:
    if not _LAB_NAME.match(name):
        raise LabUsageError(
            f'lab name "{name}": use 1-24 lowercase letters, digits and "-", '
            "starting and ending with a letter or digit")
    return name


def check_k8s_name(what: str, name: str) -> str:
    if not _K8S_NAME.match(name):
        raise LabUsageError(
            f'{what} "{name}": must be a DNS label (lowercase letters, digits, "-", at most 63)')
    return name


def run_dir(lab: str) -> str:
    return f"{RUN_ROOT}/{lab}"


def state_path(lab: str) -> str:
    return f"{run_dir(lab)}/state.json"


def node_dir(lab: str, node: str) -> str:
    return f"{run_dir(lab)}/{node}"


def cni_socket(lab: str, node: str) -> str:
    return f"{node_dir(lab, node)}/cni.sock"


def exabgp_dir(lab: str, node: str) -> str:
    """Mode bgp: the node's ExaBGP files (exabgp.conf written by the agent, exabgp.env, pid, socket)."""
    return f"{node_dir(lab, node)}/exabgp"


def bgp_status_file(lab: str, node: str) -> str:
    """The agent's BGP status JSON (in its state dir), read by `status` and `felixctl node status`."""
    return f"{node_dir(lab, node)}/lib/bgp-status.json"


def fabric_netns(lab: str) -> str:
    return f"{lab}-fabric"


def node_names(count: int) -> list[str]:
    return [f"n{i}" for i in range(1, count + 1)]


def reflector_names(count: int) -> list[str]:
    return [f"rr{i}" for i in range(1, count + 1)]


def is_reflector(node: str) -> bool:
    return bool(_REFLECTOR_NAME.match(node))


def node_index(node: str) -> int:
    if not _NODE_NAME.match(node):
        raise LabUsageError(f'node "{node}": lab nodes are named n1, n2, ...')
    return int(node[1:])


def node_netns(lab: str, node: str) -> str:
    return f"{lab}-{node}"


@dataclass(frozen=True, slots=True)
class NodeLink:
    """Where a node's eth0 sits on the fabric: its address, subnet, bridge and default gateway."""

    ip: str
    prefixlen: int
    bridge: str
    gateway: str


def node_link(node: str, cross_subnet: bool = False) -> NodeLink:
    """n<i> → 192.0.2.(10+i) on bridge fabric0; reflector rr<i> → 192.0.2.(220+i).

    With `cross_subnet`, even nodes sit on 198.51.100.(10+i)/24 behind bridge fabric1 instead, so
    every node has neighbours in its own subnet and in the other one (reflectors stay on the first).
    """
    if is_reflector(node):
        return NodeLink(str(FABRIC_SUBNET.network_address + 220 + int(node[2:])), FABRIC_SUBNET.prefixlen,
                        FABRIC_BRIDGE, FABRIC_IP)
    index = node_index(node)
    if cross_subnet and index % 2 == 0:
        return NodeLink(str(FABRIC_B_SUBNET.network_address + 10 + index), FABRIC_B_SUBNET.prefixlen,
                        FABRIC_B_BRIDGE, FABRIC_B_IP)
    return NodeLink(str(FABRIC_SUBNET.network_address + 10 + index), FABRIC_SUBNET.prefixlen,
                    FABRIC_BRIDGE, FABRIC_IP)


def node_ip(node: str, cross_subnet: bool = False) -> str:
    """The node's eth0 address (see node_link)."""
    return node_link(node, cross_subnet).ip


def bird_dir(lab: str, node: str) -> str:
    """A reflector's BIRD files (bird.conf written by felixpy-node, bird.ctl, bird.log)."""
    return f"{node_dir(lab, node)}/bird"


def is_node_netns(lab: str, netns: str) -> bool:
    """True for `<lab>-n<digits>` and `<lab>-rr<digits>`: found again by `down` without the state file."""
    prefix = f"{lab}-"
    rest = netns[len(prefix):]
    return netns.startswith(prefix) and bool(_NODE_NAME.match(rest) or _REFLECTOR_NAME.match(rest))


def _sanitise(part: str) -> str:
    return re.sub(r"[^a-z0-9-]", "-", part.lower())


def pod_netns(lab: str, namespace: str, pod: str) -> str:
    return f"{lab}-{_sanitise(namespace)}-{_sanitise(pod)}"


@dataclass(frozen=True, slots=True)
class PodRef:
    namespace: str
    name: str

    def __str__(self) -> str:
        return f"{self.namespace}/{self.name}"


def parse_pod_ref(text: str) -> PodRef:
    ns, sep, name = text.partition("/")
    if not sep:
        raise LabUsageError(f'pod "{text}": expected NAMESPACE/POD')
    return PodRef(check_k8s_name("namespace", ns), check_k8s_name("pod", name))


# --- labels -------------------------------------------------------------------------------------

def check_label_key(key: str) -> str:
    prefix, sep, name = key.rpartition("/")
    if not _LABEL_NAME.match(name) or (sep and not _LABEL_PREFIX.match(prefix)):
        raise LabUsageError(f'label key "{key}": expected [prefix/]name of letters, digits, "-_."')
    return key


def check_label_value(key: str, value: str) -> str:
    if not _LABEL_VALUE.match(value):
        raise LabUsageError(f'label {key}="{value}": value must be at most 63 letters, digits, "-_."')
    return value


def parse_labels(text: str) -> dict[str, str]:
    """`k=v,k2=v2` (the --labels option) → dict; an empty string is no labels."""
    labels: dict[str, str] = {}
    for item in (p.strip() for p in text.split(",")):
        if not item:
            continue
        key, sep, value = item.partition("=")
        if not sep:
            raise LabUsageError(f'label "{item}": expected key=value')
        labels[check_label_key(key.strip())] = check_label_value(key, value.strip())
    return labels


def parse_annotations(items: list[str] | None) -> dict[str, str]:
    """`--annotations KEY=VALUE` (repeatable; the value is taken verbatim, commas and all, so JSON
    such as `cni.projectcalico.org/ipAddrs=["10.244.1.7"]` needs no escaping) → dict."""
    annotations: dict[str, str] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep:
            raise LabUsageError(f'annotation "{item}": expected key=value')
        annotations[check_label_key(key.strip())] = value
    return annotations


def apply_label_changes(current: dict[str, str], changes: list[str]) -> dict[str, str]:
    """kubectl-label semantics: `k=v` sets (overwriting), `k-` removes; returns the new labels."""
    if not changes:
        raise LabUsageError("label: give at least one key=value or key-")
    labels = dict(current)
    for change in changes:
        if change.endswith("-") and "=" not in change:
            labels.pop(check_label_key(change[:-1]), None)
            continue
        key, sep, value = change.partition("=")
        if not sep:
            raise LabUsageError(f'label "{change}": expected key=value or key-')
        labels[check_label_key(key)] = check_label_value(key, value)
    return labels


# --- served ports -------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class ServedPort:
    name: str
    protocol: str  # "tcp" or "udp"
    port: int

    def spec(self) -> str:
        """The form the pod server takes on its command line."""
        return f"{self.protocol}:{self.port}"

    def to_wep_port(self) -> dict[str, object]:
        return {"name": self.name, "port": self.port, "protocol": self.protocol.upper()}


def parse_serve(text: str) -> list[ServedPort]:
    """`tcp:80,udp:80,web=tcp:8080` → ports; unnamed ones are called `serve-<port>-<proto>`."""
    ports: list[ServedPort] = []
    seen: set[tuple[str, int]] = set()
    names: set[str] = set()
    for item in (p.strip() for p in text.split(",")):
        if not item:
            continue
        name, sep, rest = item.rpartition("=")
        proto, colon, port_text = rest.partition(":")
        proto = proto.lower()
        if not colon or proto not in ("tcp", "udp") or not port_text.isdigit():
            raise LabUsageError(f'--serve "{item}": expected [name=]tcp:PORT or [name=]udp:PORT')
        port = int(port_text)
        if not 1 <= port <= 65535:
            raise LabUsageError(f'--serve "{item}": port must be 1-65535')
        if not sep:
            name = f"serve-{port}-{proto}"
        elif not re.match(r"^[a-z0-9]([a-z0-9-]{0,13}[a-z0-9])?$", name) or not re.search("[a-z]", name):
            # Kubernetes container port names: IANA_SVC_NAME, at most 15 characters.
            raise LabUsageError(f'--serve "{item}": port name must be 1-15 lowercase letters, '
                                'digits and "-", with at least one letter')
        if (proto, port) in seen or name in names:
            raise LabUsageError(f'--serve "{item}": port or name given twice')
        seen.add((proto, port))
        names.add(name)
        ports.append(ServedPort(name, proto, port))
    return ports


def parse_csv_ports(text: str) -> list[int]:
    ports: list[int] = []
    for item in (p.strip() for p in text.split(",")):
        if not item:
            continue
        if not item.isdigit() or not 1 <= int(item) <= 65535:
            raise LabUsageError(f'port "{item}": expected 1-65535')
        ports.append(int(item))
    if not ports:
        raise LabUsageError("--ports: give at least one port")
    return ports


def parse_csv_protos(text: str) -> list[str]:
    protos = [p.strip().lower() for p in text.split(",") if p.strip()]
    for p in protos:
        if p not in ("tcp", "udp"):
            raise LabUsageError(f'protocol "{p}": expected tcp or udp')
    if not protos:
        raise LabUsageError("--protos: give at least one of tcp, udp")
    return protos


def check_pool(cidr: str, block_size: int) -> str:
    try:
        net = ipaddress.IPv4Network(cidr, strict=True)
    except ValueError:
        raise LabUsageError(f'--pool "{cidr}": expected an IPv4 CIDR such as 10.244.0.0/16') from None
    for fabric in (FABRIC_SUBNET, FABRIC_B_SUBNET):
        if net.overlaps(fabric):
            raise LabUsageError(f'--pool "{cidr}": overlaps the lab fabric {fabric}')
    # Calico accepts IPv4 block sizes 20..32, never larger than the pool itself.
    if not max(20, net.prefixlen) <= block_size <= 32:
        raise LabUsageError(f"--block-size {block_size}: must be between "
                            f"{max(20, net.prefixlen)} and 32 for pool {net}")
    return str(net)


def node_ip6(node: str, cross_subnet: bool = False) -> str:
    """A node's IPv6 address on the fabric (--ip-family ipv6 / dual): the same digits as its IPv4
    (reflector rr<i>: fd00:192:0:2::(220+i)); with `cross_subnet` even nodes are in the second
    subnet's prefix, fd00:198:51:100::(10+i), as their IPv4 is in 198.51.100.0/24."""
    if is_reflector(node):
        return f"fd00:192:0:2::{220 + int(node[2:])}"
    index = node_index(node)
    if cross_subnet and index % 2 == 0:
        return f"fd00:198:51:100::{10 + index}"
    return f"fd00:192:0:2::{10 + index}"


def node_gateway6(node: str, cross_subnet: bool = False) -> str:
    """The fabric router's IPv6 address on the node's subnet."""
    return FABRIC6_B_IP if ipaddress.IPv6Address(node_ip6(node, cross_subnet)) in FABRIC6_B_SUBNET else FABRIC6_IP


def families(ip_family: str) -> tuple[int, ...]:
    """The IP versions pods of a lab get."""
    return {"ipv4": (4,), "ipv6": (6,), "dual": (4, 6)}[ip_family]
