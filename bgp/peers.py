"""Calico's BGP peer selection: which sessions one node opens, computed from plain values.

This is the part of confd's `getBGPConfig` that decides *who* a node peers with (calico-reference
§3.6 "Mesh generation", §3.7). Inputs are the Nodes, the global BGPConfiguration and the BGPPeers,
already reduced to small values (`NodeInfo`, `BGPSettings`, `BGPPeerSpec`; the `from_resource`
helpers read projectcalico.org/v3 objects). The output is this node's sorted list of `Peer`s, which
`bgp.config` renders for ExaBGP and `bgp.bird` for a BIRD route reflector.

Rules, as confd applies them:
- Full mesh (`nodeToNodeMeshEnabled`, default true) only on nodes without a route-reflector cluster
  ID; it pairs with every other node that has an IPv4 address and no cluster ID. The node with the
  lexically lower IP string is passive for a mesh pair, so only one side initiates.
- IPv6 as confd renders bird6: every session to a Calico node exists once per family both ends
  have an address of (Node `ipv4Address` / `ipv6Address`), between those addresses; IPv6 routes
  travel only on the IPv6 sessions, never as IPv6 NLRI over an IPv4 session. A node without an
  IPv6 address has no IPv6 sessions (bird6: "IPv6 disabled on this node"), and a `peerIP` of the
  family the node has no address of gives no session.
- A BGPPeer applies to this node when `node` names it, or `nodeSelector` matches its labels, or
  neither is set (a "global" peer). It names the remote side by `peerIP` (+ `asNumber`) or by
  `peerSelector` (the Calico nodes it selects; their AS comes from the Node or the global AS).
- Reverse peering: a node selected by some BGPPeer's `peerSelector` also peers with the nodes that
  BGPPeer applies to, so both ends of a selector-based session are configured.
- A peer is a route-reflector *client* of this node iff this node has a cluster ID, the session is
  iBGP, and the peer has no cluster ID or a different one. Two reflectors sharing a cluster ID peer
  as plain iBGP.
- Never a session to our own address. When several rules name the same address, the most specific
  wins: node-scoped BGPPeer, then global BGPPeer, then mesh.
- The port of a session to a Calico node is that node's BGP listen port (BGPConfiguration
  `node.<name>` listenPort, else the global one, else 179); a BGPPeer's `peerIP` may carry its own.
- `reversePeering: Manual` turns the reverse half off: the selected nodes need their own BGPPeer.
- The per-session knobs of a BGPPeer (localASNumber, keepaliveTime, ttlSecurity,
  numAllowedLocalASNumbers, reachableBy, filters, nextHopMode) travel on its `Peer`; mesh
  sessions have none of them (confd renders the mesh with `ttl security off` and no filters).

Pure: no I/O, imports only the selector language.
"""

from __future__ import annotations

import enum
import ipaddress
import re
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping

from policy.selectors import parse

DEFAULT_AS_NUMBER = 64512
DEFAULT_PORT = 179
# Calico's default graceful-restart time (BIRD `graceful restart` without a time).
DEFAULT_RESTART_TIME = 120
# A keepalive interval the BGP hold time (3 × keepalive, at most 65535 s) can carry.
MAX_KEEPALIVE = 65535 // 3


class PeerType(str, enum.Enum):
    """Why a session exists; also what `felixctl node status` prints."""

    MESH = "mesh"
    GLOBAL = "global"
    NODE = "node"
    REFLECTOR = "reflector"  # the remote side is a Calico route reflector (has a cluster ID)
    LOCAL = "local"  # a reflector node's own agent, peering with its BIRD over loopback


@dataclass(frozen=True)
class NodeInfo:
    """The BGP-relevant part of a Calico Node."""

    name: str
    ipv4: str | None  # address only; a CIDR like "192.0.2.11/24" is accepted and trimmed
    as_number: int | None = None
    labels: Mapping[str, str] = field(default_factory=dict)
    rr_cluster_id: str | None = None
    ipv6: str | None = None  # spec.bgp.ipv6Address, trimmed the same way

    def __post_init__(self) -> None:
        if self.ipv4 is not None:
            object.__setattr__(self, "ipv4", str(ipaddress.ip_interface(self.ipv4).ip))
        if self.ipv6 is not None:
            object.__setattr__(self, "ipv6", str(ipaddress.ip_interface(self.ipv6).ip))

    def address(self, version: int) -> str | None:
        return self.ipv4 if version == 4 else self.ipv6

    @classmethod
    def from_resource(cls, obj: Mapping[str, Any]) -> "NodeInfo":
        meta = obj.get("metadata") or {}
        bgp = (obj.get("spec") or {}).get("bgp") or {}
        return cls(
            name=str(meta["name"]),
            ipv4=bgp.get("ipv4Address") or None,
            as_number=_as_number(bgp.get("asNumber")),
            labels=dict(meta.get("labels") or {}),
            rr_cluster_id=bgp.get("routeReflectorClusterID") or None,
            ipv6=bgp.get("ipv6Address") or None,
        )


@dataclass(frozen=True)
class BGPSettings:
    """The BGPConfiguration fields that shape peering: `default`, plus the per-node overrides
    (`node.<name>`) of the listen port and bind mode."""

    node_to_node_mesh: bool = True
    as_number: int = DEFAULT_AS_NUMBER
    node_mesh_password: str | None = field(default=None, repr=False)  # resolved secret value: never in a repr
    node_mesh_max_restart_time: int | None = None  # seconds; None means the default
    listen_port: int = DEFAULT_PORT
    node_listen_ports: Mapping[str, int] = field(default_factory=dict)  # node name → its override
    bind_mode: str = "None"  # None: listen on every address; NodeIP: on the node's address only
    node_bind_modes: Mapping[str, str] = field(default_factory=dict)

    @classmethod
    def from_resource(cls, obj: Mapping[str, Any] | None, *,
                      node_mesh_password: str | None = None,
                      node_configs: Mapping[str, Mapping[str, Any]] | None = None) -> "BGPSettings":
        """`obj` is BGPConfiguration `default`; `node_configs` maps node names to their
        `node.<name>` BGPConfigurations."""
        spec = (obj or {}).get("spec") or {}
        mesh = spec.get("nodeToNodeMeshEnabled")
        ports: dict[str, int] = {}
        binds: dict[str, str] = {}
        for node, config in (node_configs or {}).items():
            node_spec = (config or {}).get("spec") or {}
            if node_spec.get("listenPort") is not None:
                ports[node] = _port(node_spec["listenPort"], f'BGPConfiguration "node.{node}"')
            if node_spec.get("bindMode"):
                binds[node] = _bind_mode(node_spec["bindMode"], f'BGPConfiguration "node.{node}"')
        return cls(
            node_to_node_mesh=True if mesh is None else bool(mesh),
            as_number=_as_number(spec.get("asNumber")) or DEFAULT_AS_NUMBER,
            node_mesh_password=node_mesh_password,
            node_mesh_max_restart_time=parse_duration(spec.get("nodeMeshMaxRestartTime")),
            listen_port=(_port(spec["listenPort"], 'BGPConfiguration "default"')
                         if spec.get("listenPort") is not None else DEFAULT_PORT),
            node_listen_ports=ports,
            bind_mode=_bind_mode(spec.get("bindMode") or "None", 'BGPConfiguration "default"'),
            node_bind_modes=binds,
        )

    def listen_port_of(self, node: str) -> int:
        """The port a Calico node's speaker listens on (and its peers connect to)."""
        return self.node_listen_ports.get(node, self.listen_port)

    def bind_mode_of(self, node: str) -> str:
        return self.node_bind_modes.get(node, self.bind_mode)


def _port(value: object, resource: str) -> int:
    try:
        port = int(str(value))
    except ValueError:
        port = 0
    if not 0 < port < 65536:
        raise PeeringError(f"{resource}: spec.listenPort: invalid port {value!r}")
    return port


def _bind_mode(value: object, resource: str) -> str:
    if value not in ("None", "NodeIP"):
        raise PeeringError(f"{resource}: spec.bindMode must be None or NodeIP")
    return str(value)


@dataclass(frozen=True)
class BGPPeerSpec:
    """One BGPPeer resource. `password` is the already-resolved secret value."""

    name: str
    node: str | None = None
    node_selector: str | None = None
    peer_selector: str | None = None
    peer_ip: str | None = None  # "ip" or "ip:port"
    as_number: int | None = None
    password: str | None = field(default=None, repr=False)  # never in a repr (logs)
    source_address: str = "UseNodeIP"  # or "None": let the kernel choose the source
    keep_original_next_hop: bool = False
    max_restart_time: int | None = None  # seconds
    next_hop_mode: str = "Auto"  # Auto | Self | Keep
    local_as_number: int | None = None  # localASNumber: the AS this node presents on these sessions
    keepalive_time: int | None = None  # seconds between keepalives; None: hold time / 3
    ttl_security: int = 0  # GTSM: accept only packets from at most this many hops away; 0 = off
    num_allowed_local_as: int = 0  # how often our own AS may appear in a received AS path
    reachable_by: str | None = None  # gateway of a /32 route to the peer
    filters: tuple[str, ...] = ()  # BGPFilter names, in order
    reverse_peering: str = "Auto"  # Auto | Manual

    @classmethod
    def from_resource(cls, obj: Mapping[str, Any], *, password: str | None = None) -> "BGPPeerSpec":
        spec = obj.get("spec") or {}
        name = str((obj.get("metadata") or {})["name"])
        return cls(
            name=name,
            node=spec.get("node") or None,
            node_selector=spec.get("nodeSelector") or None,
            peer_selector=spec.get("peerSelector") or None,
            peer_ip=spec.get("peerIP") or None,
            as_number=_as_number(spec.get("asNumber")),
            password=password,
            source_address=spec.get("sourceAddress") or "UseNodeIP",
            keep_original_next_hop=bool(spec.get("keepOriginalNextHop", False)),
            max_restart_time=parse_duration(spec.get("maxRestartTime")),
            next_hop_mode=str(spec.get("nextHopMode") or "Auto"),
            local_as_number=_as_number(spec.get("localASNumber")),
            keepalive_time=parse_duration(spec.get("keepaliveTime")),
            ttl_security=int(spec.get("ttlSecurity") or 0),
            num_allowed_local_as=int(spec.get("numAllowedLocalASNumbers") or 0),
            reachable_by=spec.get("reachableBy") or None,
            filters=tuple(str(f) for f in spec.get("filters") or ()),
            reverse_peering=str(spec.get("reversePeering") or "Auto"),
        )


@dataclass(frozen=True)
class Peer:
    """One BGP session this node should have."""

    address: str
    as_number: int
    type: PeerType
    name: str  # confd-style protocol name: Mesh_192_0_2_12, Global_..., Node_...
    port: int = DEFAULT_PORT
    password: str | None = field(default=None, repr=False)  # never in a repr (logs)
    source_address: str | None = None  # local address to bind; None lets the kernel choose
    keep_original_next_hop: bool = False
    max_restart_time: int = DEFAULT_RESTART_TIME  # 0 disables graceful restart
    passive: bool = False  # wait for the peer to connect (the lower IP of a mesh pair)
    rr_client: bool = False  # this node reflects routes to and from this peer
    node: str | None = None  # the Calico node behind the address, when there is one
    next_hop_mode: str = "Auto"  # Auto | Self | Keep
    local_as: int | None = None  # localASNumber; None: the node's AS
    keepalive_time: int | None = None  # seconds; None: hold time / 3
    ttl_security: int = 0  # GTSM hops; 0 = off
    num_allowed_local_as: int = 0
    reachable_by: str | None = None
    filters: tuple[str, ...] = ()  # BGPFilter names, in order
    listen_port: int = DEFAULT_PORT  # where this node accepts the session
    remote_cluster_id: str | None = None  # the peer node's routeReflectorClusterID

    def local_as_for(self, node_as: int) -> int:
        """The AS this node presents on this session."""
        return self.local_as or node_as

    def is_ebgp(self, node_as: int) -> bool:
        return self.as_number != self.local_as_for(node_as)

    @property
    def version(self) -> int:
        """The session's address family (4 or 6): the family of the routes it carries."""
        return ipaddress.ip_address(self.address).version


@dataclass(frozen=True)
class LocalSpeaker:
    """This node's own side of every session."""

    name: str
    address: str | None  # IPv4; None on an IPv6-only node
    as_number: int
    rr_cluster_id: str | None
    address6: str | None = None

    def address_of(self, version: int) -> str | None:
        return self.address if version == 4 else self.address6


class PeeringError(ValueError):
    """Bad peering input; the message is one line naming the resource and field."""


_DURATION_RE = re.compile(r"(\d+(?:\.\d+)?)(h|ms|m|s)")


def parse_duration(value: object) -> int | None:
    """Seconds from a Kubernetes/Go duration ("120s", "2m0s", "1h") or a number; None if unset."""
    if value is None or value == "":
        return None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return int(value)
    text = str(value).strip()
    if not text or _DURATION_RE.sub("", text) != "":
        raise PeeringError(f"invalid duration {value!r}")
    scale = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001}
    return int(sum(float(n) * scale[unit] for n, unit in _DURATION_RE.findall(text)))


def _as_number(value: object) -> int | None:
    if value is None or value == "":
        return None
    try:
        # Calico also accepts AS-dot notation "1.10" = 1*65536 + 10.
        text = str(value)
        if "." in text:
            high, low = text.split(".", 1)
            number = int(high) * 65536 + int(low)
        else:
            number = int(text)
    except ValueError:
        raise PeeringError(f"invalid AS number {value!r}") from None
    if not 0 < number < 2**32:
        raise PeeringError(f"invalid AS number {value!r}")
    return number


def _split_peer_ip(text: str, resource: str) -> tuple[str, int]:
    """ "ip", "ip:port" or "[v6]:port" → (address, port)."""
    try:
        return str(ipaddress.ip_address(text)), DEFAULT_PORT
    except ValueError:
        pass
    match = re.fullmatch(r"\[([^\]]+)\]:(\d+)|([^:]+):(\d+)", text)
    try:
        if not match:
            raise ValueError
        address = match.group(1) or match.group(3)
        port = int(match.group(2) or match.group(4))
        if not 0 < port < 65536:
            raise ValueError
        return str(ipaddress.ip_address(address)), port
    except ValueError:
        raise PeeringError(f'BGPPeer "{resource}": spec.peerIP: invalid address {text!r}') from None


def protocol_name(kind: PeerType, address: str, port: int = DEFAULT_PORT) -> str:
    """confd's BIRD protocol name for a peer (also a valid BIRD and ExaBGP identifier)."""
    prefix = {PeerType.MESH: "Mesh", PeerType.GLOBAL: "Global"}.get(kind, "Node")
    name = f"{prefix}_{address.replace('.', '_').replace(':', '_')}"
    return name if port == DEFAULT_PORT else f"{name}_port_{port}"


def local_speaker(node: NodeInfo, settings: BGPSettings) -> LocalSpeaker:
    if node.ipv4 is None and node.ipv6 is None:
        raise PeeringError(f'Node "{node.name}": neither spec.bgp.ipv4Address nor spec.bgp.ipv6Address is set')
    return LocalSpeaker(node.name, node.ipv4, node.as_number or settings.as_number, node.rr_cluster_id,
                        node.ipv6)


def _selects(selector: str, labels: Mapping[str, str]) -> bool:
    return parse(selector).evaluate(labels)


def _applies_to(spec: BGPPeerSpec, node: NodeInfo) -> bool:
    if spec.node:
        return spec.node == node.name
    if spec.node_selector:
        return _selects(spec.node_selector, node.labels)
    return True


def _check_spec(spec: BGPPeerSpec) -> None:
    if spec.node and spec.node_selector:
        raise PeeringError(f'BGPPeer "{spec.name}": spec.node and spec.nodeSelector are mutually exclusive')
    if bool(spec.peer_ip) == bool(spec.peer_selector):
        raise PeeringError(f'BGPPeer "{spec.name}": exactly one of spec.peerIP and spec.peerSelector is required')
    if spec.peer_ip and spec.as_number is None:
        raise PeeringError(f'BGPPeer "{spec.name}": spec.asNumber is required with spec.peerIP')
    if spec.source_address not in ("UseNodeIP", "None"):
        raise PeeringError(f'BGPPeer "{spec.name}": spec.sourceAddress must be UseNodeIP or None')
    if spec.next_hop_mode not in ("Auto", "Self", "Keep"):
        raise PeeringError(f'BGPPeer "{spec.name}": spec.nextHopMode must be Auto, Self or Keep')
    if spec.reverse_peering not in ("Auto", "Manual"):
        raise PeeringError(f'BGPPeer "{spec.name}": spec.reversePeering must be Auto or Manual')
    if not 0 <= spec.ttl_security <= 255:
        raise PeeringError(f'BGPPeer "{spec.name}": spec.ttlSecurity must be 0-255')
    if not 0 <= spec.num_allowed_local_as <= 10:
        raise PeeringError(f'BGPPeer "{spec.name}": spec.numAllowedLocalASNumbers must be 0-10')
    if spec.keepalive_time is not None and not 1 <= spec.keepalive_time <= MAX_KEEPALIVE:
        raise PeeringError(f'BGPPeer "{spec.name}": spec.keepaliveTime must be 1s to {MAX_KEEPALIVE}s')
    if spec.reachable_by is not None:
        try:
            gateway = ipaddress.ip_address(spec.reachable_by)
        except ValueError:
            raise PeeringError(f'BGPPeer "{spec.name}": spec.reachableBy: invalid IP address '
                               f'{spec.reachable_by!r}') from None
        if spec.peer_ip and gateway.version != ipaddress.ip_address(
                _split_peer_ip(spec.peer_ip, spec.name)[0]).version:
            raise PeeringError(f'BGPPeer "{spec.name}": spec.reachableBy: {spec.reachable_by} is not of '
                               "spec.peerIP's address family")
    for selector in (spec.node_selector, spec.peer_selector):
        if selector:
            try:
                parse(selector)
            except ValueError as exc:
                raise PeeringError(f'BGPPeer "{spec.name}": {exc}') from None


def select_peers(node_name: str, nodes: Iterable[NodeInfo], settings: BGPSettings,
                 bgp_peers: Iterable[BGPPeerSpec]) -> list[Peer]:
    """This node's sessions, sorted by address. Raises PeeringError on invalid input."""
    all_nodes = {n.name: n for n in nodes}
    me = all_nodes.get(node_name)
    if me is None:
        raise PeeringError(f'Node "{node_name}" does not exist')
    local = local_speaker(me, settings)
    my_port = settings.listen_port_of(node_name)
    specs = list(bgp_peers)
    for spec in specs:
        _check_spec(spec)
    others = [n for n in all_nodes.values() if n.name != node_name and (n.ipv4 or n.ipv6)]
    # confd renders bird (IPv4) and bird6 (IPv6) alike: a session per family both ends have.
    families = [v for v in (4, 6) if local.address_of(v) is not None]

    # Rank: lower wins when two rules name the same address (most specific first).
    found: dict[str, tuple[int, Peer]] = {}

    def add(rank: int, peer: Peer) -> None:
        if peer.address in (local.address, local.address6):
            return
        if peer.address not in found or rank < found[peer.address][0]:
            found[peer.address] = (rank, peer)

    def node_peers(kind: PeerType, other: NodeInfo, spec: BGPPeerSpec | None) -> list[Peer]:
        return [node_peer(kind, other, spec, v) for v in families if other.address(v) is not None]

    def node_peer(kind: PeerType, other: NodeInfo, spec: BGPPeerSpec | None, version: int) -> Peer:
        address, mine = other.address(version), local.address_of(version)
        assert address is not None and mine is not None
        as_number = other.as_number or settings.as_number
        if kind is not PeerType.MESH and other.rr_cluster_id and other.rr_cluster_id != local.rr_cluster_id:
            kind = PeerType.REFLECTOR
        port = settings.listen_port_of(other.name)
        common = dict(address=address, as_number=as_number, type=kind,
                      name=protocol_name(kind, address, port), port=port, listen_port=my_port,
                      # Both ends are Calico nodes: the higher IP initiates (confd compares the strings).
                      passive=address > mine, node=other.name,
                      remote_cluster_id=other.rr_cluster_id)
        if spec is None:
            return Peer(**common, password=settings.node_mesh_password,  # type: ignore[arg-type]
                        source_address=mine,
                        max_restart_time=_restart(settings.node_mesh_max_restart_time),
                        rr_client=_is_rr_client(local.rr_cluster_id, local.as_number, as_number,
                                                other.rr_cluster_id))
        return Peer(**common, **_spec_fields(spec, mine),  # type: ignore[arg-type]
                    rr_client=_is_rr_client(local.rr_cluster_id, spec.local_as_number or local.as_number,
                                            as_number, other.rr_cluster_id))

    if settings.node_to_node_mesh and not local.rr_cluster_id:
        for other in others:
            if not other.rr_cluster_id:
                for peer in node_peers(PeerType.MESH, other, None):
                    add(2, peer)

    for spec in specs:
        kind = PeerType.NODE if (spec.node or spec.node_selector) else PeerType.GLOBAL
        rank = 0 if kind is PeerType.NODE else 1
        if _applies_to(spec, me):
            if spec.peer_ip:
                address, port = _split_peer_ip(spec.peer_ip, spec.name)
                assert spec.as_number is not None
                mine = local.address_of(ipaddress.ip_address(address).version)
                if mine is None:
                    continue  # confd: no bird6 sessions on a node without an IPv6 address (and vice versa)
                add(rank, Peer(
                    address=address,
                    as_number=spec.as_number,
                    type=kind,
                    name=protocol_name(kind, address, port),
                    port=port,
                    listen_port=my_port,
                    rr_client=_is_rr_client(local.rr_cluster_id, spec.local_as_number or local.as_number,
                                            spec.as_number, None),
                    **_spec_fields(spec, mine),  # type: ignore[arg-type]
                ))
            else:
                assert spec.peer_selector
                for other in others:
                    if _selects(spec.peer_selector, other.labels):
                        for peer in node_peers(kind, other, spec):
                            add(rank, peer)
        # Reverse peering (Auto): the selected nodes configure their end of the same sessions.
        if spec.peer_selector and spec.reverse_peering == "Auto" and _selects(spec.peer_selector, me.labels):
            for other in others:
                if _applies_to(spec, other):
                    for peer in node_peers(kind, other, spec):
                        add(rank, peer)

    return [peer for _, peer in sorted(found.values(), key=lambda item: address_key(item[1].address))]


def _restart(value: int | None) -> int:
    return DEFAULT_RESTART_TIME if value is None else value


def _spec_fields(spec: BGPPeerSpec, local_address: str) -> dict[str, Any]:
    """The Peer fields a BGPPeer sets, the same whether it names an IP or selects nodes."""
    return dict(
        password=spec.password,
        source_address=local_address if spec.source_address == "UseNodeIP" else None,
        keep_original_next_hop=spec.keep_original_next_hop,
        max_restart_time=_restart(spec.max_restart_time),
        next_hop_mode=spec.next_hop_mode,
        local_as=spec.local_as_number,
        keepalive_time=spec.keepalive_time,
        ttl_security=spec.ttl_security,
        num_allowed_local_as=spec.num_allowed_local_as,
        reachable_by=spec.reachable_by,
        filters=spec.filters,
    )


def _is_rr_client(cluster_id: str | None, local_as: int, peer_as: int, peer_cluster_id: str | None) -> bool:
    """confd's rule: this node reflects for an iBGP peer unless the peer shares its cluster ID."""
    return bool(cluster_id) and peer_as == local_as and peer_cluster_id != cluster_id


def address_key(address: str) -> tuple[int, int]:
    """Sort key for addresses of both families: IPv4 first, then numerically."""
    ip = ipaddress.ip_address(address)
    return ip.version, int(ip)
