"""ExaBGP's API text commands, its JSON messages as typed events, and the sidecar socket encoding.

Three pure pieces:
- Commands the agent writes (through the sidecar) to ExaBGP: `announce_route`, `withdraw_route`,
  batched `announce_routes` / `withdraw_routes` (`announce attributes … nlri …`, about twice as fast
  as one line per prefix: exabgp-notes §5b), `end_of_rib`, `route_refresh`.
- `parse_exabgp_line`: one line ExaBGP writes to its API process → an `Event` (`StateChange`,
  `OpenReceived`, `RoutesReceived`, `EndOfRib`, `Notification`, `Ack`, `CommandOutput`).
- `encode_event` / `decode_event`: the same events as one-line JSON on the sidecar's unix socket,
  plus the socket-only `CommandResult` and `ReplayDone`.

ExaBGP's JSON layout (format "5.0.0"): announces are grouped by next hop under
`message.update.announce["ipv4 unicast"]` (or `"ipv6 unicast"`)`[<next-hop>]`, withdraws under
`message.update.withdraw["ipv4 unicast"]`, path attributes in `message.update.attribute`; one line
per BGP UPDATE. The `counter` field restarts on reload and is ignored.
"""

from __future__ import annotations

import ipaddress
import json
from dataclasses import asdict, dataclass, field
from typing import Any, Iterable, Sequence, Union

FAMILY = "ipv4 unicast"
FAMILY6 = "ipv6 unicast"
# Calico carries IPv4 routes on sessions between IPv4 addresses and IPv6 routes on sessions between
# IPv6 addresses (confd's bird and bird6); each ExaBGP neighbour has the one family of its address.
FAMILIES = {4: FAMILY, 6: FAMILY6}
# exabgp-notes §5b measured 500 prefixes per batched command; larger lines gain nothing.
BATCH_SIZE = 500


class ProtocolError(ValueError):
    """A line that is not valid ExaBGP output or sidecar protocol."""


# -- commands --------------------------------------------------------------------------------------


def _prefix(value: str) -> str:
    try:
        return str(ipaddress.ip_network(value))
    except ValueError:
        raise ValueError(f"invalid IP prefix {value!r}") from None


def _address(value: str) -> str:
    try:
        return str(ipaddress.ip_address(value))
    except ValueError:
        raise ValueError(f"invalid IP address {value!r}") from None


def family_of(address_or_prefix: str) -> str:
    """ExaBGP's family name ("ipv4 unicast" / "ipv6 unicast") of an address or prefix."""
    return FAMILIES[ipaddress.ip_network(address_or_prefix, strict=False).version]


def _selector(neighbor: str | Sequence[str] | None) -> str:
    """ExaBGP's neighbour selector: one (`neighbor A `) or several (`neighbor A , neighbor B `)."""
    if neighbor is None:
        return ""
    if isinstance(neighbor, str):
        return f"neighbor {_address(neighbor)} "
    if not neighbor:
        raise ValueError("an empty neighbour selector would address every neighbour")
    return " , ".join(f"neighbor {_address(n)}" for n in neighbor) + " "


Neighbors = Union[str, Sequence[str], None]


@dataclass(frozen=True)
class Attributes:
    """Path attributes we may set on announced routes."""

    local_preference: int | None = None
    med: int | None = None
    communities: tuple[str, ...] = ()  # "aa:nn"
    as_path: tuple[int, ...] = ()
    large_communities: tuple[str, ...] = ()  # "aa:nn:mm" (RFC 8092)

    def render(self) -> str:
        parts = []
        if self.local_preference is not None:
            parts.append(f"local-preference {int(self.local_preference)}")
        if self.med is not None:
            parts.append(f"med {int(self.med)}")
        if self.communities:
            for community in self.communities:
                _check_community(community, 2, 0xFFFF)
            parts.append("community [ " + " ".join(self.communities) + " ]")
        if self.large_communities:
            for community in self.large_communities:
                _check_community(community, 3, 0xFFFFFFFF)
            parts.append("large-community [ " + " ".join(self.large_communities) + " ]")
        if self.as_path:
            parts.append("as-path [ " + " ".join(str(int(a)) for a in self.as_path) + " ]")
        return " ".join(parts)


def _check_community(community: str, count: int, limit: int) -> None:
    parts = community.split(":")
    if len(parts) != count or not all(p.isdigit() and int(p) <= limit for p in parts):
        raise ValueError(f"invalid community {community!r}")


NO_ATTRIBUTES = Attributes()


def announce_route(prefix: str, next_hop: str, *, neighbor: Neighbors = None,
                   attributes: Attributes = NO_ATTRIBUTES) -> str:
    extra = attributes.render()
    line = f"{_selector(neighbor)}announce route {_prefix(prefix)} next-hop {_address(next_hop)}"
    return f"{line} {extra}" if extra else line


def withdraw_route(prefix: str, *, neighbor: Neighbors = None) -> str:
    return f"{_selector(neighbor)}withdraw route {_prefix(prefix)}"


def _batches(prefixes: Iterable[str], size: int) -> list[list[str]]:
    clean = [_prefix(p) for p in prefixes]
    return [clean[i:i + size] for i in range(0, len(clean), size)]


def announce_routes(prefixes: Iterable[str], next_hop: str, *, neighbor: Neighbors = None,
                    attributes: Attributes = NO_ATTRIBUTES, batch_size: int = BATCH_SIZE) -> list[str]:
    """Batched announces sharing one next hop and attribute set: one command per `batch_size`."""
    extra = attributes.render()
    head = f"{_selector(neighbor)}announce attributes next-hop {_address(next_hop)}"
    if extra:
        head = f"{head} {extra}"
    return [f"{head} nlri {' '.join(batch)}" for batch in _batches(prefixes, batch_size)]


def withdraw_routes(prefixes: Iterable[str], next_hop: str, *, neighbor: Neighbors = None,
                    batch_size: int = BATCH_SIZE) -> list[str]:
    """Batched withdraws (ExaBGP's `withdraw attributes` grammar still wants a next hop)."""
    head = f"{_selector(neighbor)}withdraw attributes next-hop {_address(next_hop)}"
    return [f"{head} nlri {' '.join(batch)}" for batch in _batches(prefixes, batch_size)]


def end_of_rib(*, neighbor: Neighbors = None, family: str = FAMILY) -> str:
    """Send End-of-RIB by hand (neighbours use `manual-eor`); ExaBGP errors if none is established."""
    return f"{_selector(neighbor)}announce eor {family}"


def route_refresh(*, neighbor: Neighbors = None, family: str = FAMILY) -> str:
    return f"{_selector(neighbor)}announce route-refresh {family}"


# -- events ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PathAttributes:
    """The attributes best-path selection looks at (RFC 4271 §9.1.2.2), as received."""

    origin: str = "igp"  # igp | egp | incomplete
    local_preference: int = 100
    med: int = 0
    as_path: tuple[int, ...] = ()
    originator_id: str | None = None
    cluster_list: tuple[str, ...] = ()
    communities: tuple[str, ...] = ()
    large_communities: tuple[str, ...] = ()


@dataclass(frozen=True)
class ReceivedRoute:
    prefix: str
    next_hop: str
    attributes: PathAttributes = field(default_factory=PathAttributes)


@dataclass(frozen=True)
class StateChange:
    """Session state: "connected" (a TCP attempt: not meaningful), "up" or "down"."""

    peer: str
    local: str
    peer_as: int
    local_as: int
    state: str
    reason: str | None = None
    time: float = 0.0


@dataclass(frozen=True)
class OpenReceived:
    """The peer's OPEN; `graceful_restart_time` is None unless it offered GR for the session's
    family (IPv4 unicast, or IPv6 unicast on a session to an IPv6 address)."""

    peer: str
    router_id: str
    asn: int
    hold_time: int
    graceful_restart_time: int | None
    time: float = 0.0


@dataclass(frozen=True)
class RoutesReceived:
    """One UPDATE from `peer`: routes announced and prefixes withdrawn."""

    peer: str
    announced: tuple[ReceivedRoute, ...] = ()
    withdrawn: tuple[str, ...] = ()
    time: float = 0.0


@dataclass(frozen=True)
class EndOfRib:
    peer: str
    time: float = 0.0


@dataclass(frozen=True)
class Notification:
    """ExaBGP-level notice, e.g. "shutdown" right before it stops the API process."""

    text: str
    time: float = 0.0


@dataclass(frozen=True)
class Ack:
    """ExaBGP's answer to one command: `done` (ok) or `error` (the reason is only in its log)."""

    ok: bool


@dataclass(frozen=True)
class CommandOutput:
    """A non-JSON line ExaBGP writes while answering a `show …` command."""

    text: str


@dataclass(frozen=True)
class CommandResult:
    """Sidecar → agent: the command with this id finished; `output` holds its text lines."""

    id: int
    ok: bool
    output: tuple[str, ...] = ()


@dataclass(frozen=True)
class ReplayDone:
    """Sidecar → agent: the cached state sent after connecting is complete."""


Event = Union[StateChange, OpenReceived, RoutesReceived, EndOfRib, Notification, Ack, CommandOutput,
              CommandResult, ReplayDone]


def _peer(msg: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    neighbor = msg["neighbor"]
    return str(neighbor["address"]["peer"]), neighbor


def _attributes(raw: dict[str, Any]) -> PathAttributes:
    return PathAttributes(
        origin=str(raw.get("origin", "igp")),
        local_preference=int(raw.get("local-preference", 100)),
        med=int(raw.get("med", 0)),
        as_path=_as_path(raw.get("as-path")),
        originator_id=raw.get("originator-id"),
        cluster_list=tuple(str(c) for c in raw.get("cluster-list") or ()),
        communities=tuple(_community(c) for c in raw.get("community") or ()),
        large_communities=tuple(_community(c) for c in raw.get("large-community") or ()),
    )


def _community(raw: Any) -> str:
    """ExaBGP writes a community as a JSON list of its parts: [65000, 100] or [1, 2, 3]."""
    return ":".join(str(int(p)) for p in raw) if isinstance(raw, list) else str(raw)


def _as_path(raw: Any) -> tuple[int, ...]:
    """ExaBGP 5 writes {"0": {"element": "as-sequence", "value": [..]}, ...}; older builds a flat list.

    An AS_SET counts as one hop for path length (RFC 4271 §9.1.2.2), so it is kept as its first member.
    """
    if not raw:
        return ()
    if isinstance(raw, list):
        return tuple(int(a) for a in raw if not isinstance(a, list))
    path: list[int] = []
    for key in sorted(raw, key=int):
        segment = raw[key]
        values = [int(a) for a in segment.get("value") or ()]
        if "set" in str(segment.get("element", "")):
            path.extend(values[:1])
        else:
            path.extend(values)
    return tuple(path)


def _nlri(item: Any) -> str:
    # `exabgp.api.compact` makes NLRI bare strings; the default is {"nlri": P}.
    return str(item["nlri"] if isinstance(item, dict) else item)


def _update(peer: str, update: dict[str, Any], when: float) -> RoutesReceived:
    attributes = _attributes(update.get("attribute") or {})
    announced = []
    withdrawn: list[str] = []
    for family in (FAMILY, FAMILY6):
        hops: dict[str, str] = {}
        for next_hop, items in ((update.get("announce") or {}).get(family) or {}).items():
            for item in items:
                prefix = _nlri(item)
                # An IPv6 peer on the same link sends its global and its link-local address as
                # next hop (RFC 2545); ExaBGP lists the prefix under both. The global one is the
                # gateway, as bird6 uses it: a link-local hop only when there is nothing else.
                if prefix not in hops or _link_local(hops[prefix]):
                    hops[prefix] = str(next_hop)
        announced += [ReceivedRoute(prefix, hop, attributes) for prefix, hop in hops.items()]
        withdrawn += [_nlri(item) for item in (update.get("withdraw") or {}).get(family) or ()]
    return RoutesReceived(peer, tuple(announced), tuple(withdrawn), when)


def _link_local(address: str) -> bool:
    try:
        return ipaddress.ip_address(address).is_link_local
    except ValueError:
        return False


def _open(peer: str, raw: dict[str, Any], when: float) -> OpenReceived:
    restart: int | None = None
    for capability in (raw.get("capabilities") or {}).values():
        if capability.get("name") == "graceful restart":
            families = capability.get("address-family-flags") or {}
            # The family the session carries: the one of the peer's address (one family per session).
            if f"ipv{ipaddress.ip_address(peer).version}/unicast" in families:
                restart = int(capability.get("time", 0))
    return OpenReceived(peer, str(raw.get("router_id")), int(raw.get("asn", 0)),
                        int(raw.get("hold_time", 0)), restart, when)


def parse_exabgp_line(line: str) -> Event | None:
    """One line ExaBGP wrote to its API process. None for messages we do not use (keepalives…)."""
    text = line.strip()
    if text == "done":
        return Ack(True)
    if text == "error":
        return Ack(False)
    if not text.startswith("{"):
        return CommandOutput(text)
    try:
        msg = json.loads(text)
        kind = msg.get("type")
        when = float(msg.get("time", 0.0))
        if kind == "state":
            peer, neighbor = _peer(msg)
            return StateChange(peer, str(neighbor["address"]["local"]), int(neighbor["asn"]["peer"]),
                               int(neighbor["asn"]["local"]), str(neighbor["state"]),
                               neighbor.get("reason"), when)
        if kind == "notification" and "neighbor" not in msg:
            return Notification(str(msg.get("notification")), when)
        if kind == "open":
            peer, neighbor = _peer(msg)
            if neighbor.get("direction") != "receive":
                return None
            return _open(peer, neighbor["open"], when)
        if kind == "update":
            peer, neighbor = _peer(msg)
            if neighbor.get("direction", "receive") != "receive":
                return None
            message = neighbor["message"]
            if "eor" in message:
                return EndOfRib(peer, when)
            return _update(peer, message.get("update") or {}, when)
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise ProtocolError(f"malformed ExaBGP message: {exc!r}: {text[:200]}") from None
    return None


# -- the sidecar socket encoding -------------------------------------------------------------------

_EVENT_TYPES: dict[str, type] = {
    "state": StateChange,
    "open": OpenReceived,
    "routes": RoutesReceived,
    "eor": EndOfRib,
    "notification": Notification,
    "result": CommandResult,
    "replay_done": ReplayDone,
}
_TYPE_NAMES = {cls: name for name, cls in _EVENT_TYPES.items()}


def encode_event(event: Event) -> str:
    """One JSON line (no newline) for the sidecar socket."""
    try:
        name = _TYPE_NAMES[type(event)]
    except KeyError:
        raise ValueError(f"{type(event).__name__} is not sent over the sidecar socket") from None
    return json.dumps({"type": name, **asdict(event)}, separators=(",", ":"))


def decode_event(line: str) -> Event:
    try:
        raw = json.loads(line)
        cls = _EVENT_TYPES[raw.pop("type")]
        if cls is RoutesReceived:
            raw["announced"] = tuple(
                ReceivedRoute(r["prefix"], r["next_hop"], _attributes_from_dict(r["attributes"]))
                for r in raw["announced"])
            raw["withdrawn"] = tuple(raw["withdrawn"])
        elif cls is CommandResult:
            raw["output"] = tuple(raw["output"])
        event: Event = cls(**raw)
        return event
    except (KeyError, TypeError, ValueError) as exc:
        raise ProtocolError(f"malformed sidecar event: {exc!r}: {line[:200]}") from None


def _attributes_from_dict(raw: dict[str, Any]) -> PathAttributes:
    return PathAttributes(
        origin=raw["origin"], local_preference=raw["local_preference"], med=raw["med"],
        as_path=tuple(raw["as_path"]), originator_id=raw["originator_id"],
        cluster_list=tuple(raw["cluster_list"]), communities=tuple(raw["communities"]),
        large_communities=tuple(raw.get("large_communities") or ()))


def encode_command(command_id: int, command: str) -> str:
    """Agent → sidecar: one ExaBGP command to forward, with an id echoed in its CommandResult."""
    if "\n" in command or "\r" in command:
        raise ValueError("an ExaBGP command is a single line")
    return json.dumps({"id": command_id, "command": command}, separators=(",", ":"))


def decode_command(line: str) -> tuple[int, str]:
    try:
        raw = json.loads(line)
        command_id, command = int(raw["id"]), str(raw["command"])
    except (KeyError, TypeError, ValueError) as exc:
        raise ProtocolError(f"malformed sidecar command: {exc!r}: {line[:200]}") from None
    if "\n" in command or "\r" in command:
        raise ProtocolError("an ExaBGP command is a single line")
    return command_id, command

