"""The agent's BGP RIB: per-peer adj-RIB-in, best path per prefix, graceful-restart stale handling.

ExaBGP keeps no RIB the agent can use and sends no withdraws when a session drops
(exabgp-notes gotcha 2), so the agent keeps its own. Every mutating call returns the *delta of best
routes*: `{prefix: next_hop}` for a new or changed best next hop, `{prefix: None}` when no path is
left. The agent feeds the delta to the route driver; prefixes whose best path changed without a
next-hop change are not reported.

Best path (RFC 4271 §9.1.2.2, simplified — MED is compared across neighbour ASes): highest
LOCAL_PREF, shortest AS_PATH, lowest ORIGIN (igp < egp < incomplete), lowest MED, lowest BGP
identifier (the ORIGINATOR_ID for reflected routes, RFC 4456 §9), then lowest peer address so the
result never depends on arrival order.

Graceful restart (RFC 4724, helper side): when a session goes down and GR was negotiated (the peer
offered a restart time in its OPEN and we advertised GR to it) its paths stay, marked stale, until
the restart time runs out; once the session is back the peer's fresh announcements replace them and
its End-of-RIB drops whatever stayed stale (or `stale_path_time` after re-establishment, if the EoR
never comes). Without GR the peer's paths are flushed at once. `suspend` covers the agent losing the
sidecar itself: everything goes stale for a while and the sidecar's replay refreshes it.

Import policy: every received path passes the policy (`set_import_policy`) before it can be
selected: the BGPFilter import rules of the session that brought it, and the AS-path loop check
(a path carrying our own AS more often than the session's `numAllowedLocalASNumbers` is
dropped, RFC 4271 §9.1.2). What arrived is kept as received, so a changed policy re-decides
every path at once without asking the peers to resend.

Pure and single-threaded: time is passed in (`now`), nothing here reads a clock.
"""

from __future__ import annotations

import ipaddress
import logging
from dataclasses import dataclass, field, replace
from typing import Callable, Iterable

from bgp.protocol import (EndOfRib, Event, OpenReceived, PathAttributes, ReceivedRoute, RoutesReceived,
                          StateChange)

log = logging.getLogger(__name__)

Delta = dict[str, "str | None"]
# (peer, prefix, attributes as received) → the attributes to use, or None to drop the path.
ImportPolicy = Callable[[str, str, "PathAttributes"], "PathAttributes | None"]

_ORIGIN_RANK = {"igp": 0, "egp": 1, "incomplete": 2}
DEFAULT_STALE_PATH_TIME = 360.0  # BIRD's default for the post-restart wait for End-of-RIB


@dataclass(frozen=True)
class Path:
    """One peer's route to one prefix."""

    prefix: str
    peer: str
    next_hop: str
    attributes: PathAttributes = field(default_factory=PathAttributes)
    peer_router_id: str = "0.0.0.0"
    stale: bool = False

    def sort_key(self) -> tuple[int, int, int, int, int, int]:
        a = self.attributes
        identifier = a.originator_id or self.peer_router_id
        return (-a.local_preference, len(a.as_path), _ORIGIN_RANK.get(a.origin, 3), a.med,
                int(ipaddress.IPv4Address(identifier)), int(ipaddress.ip_address(self.peer)))


@dataclass
class _PeerState:
    up: bool = False
    router_id: str = "0.0.0.0"
    restart_time: int | None = None  # negotiated graceful-restart time, None when not negotiated
    stale_deadline: float | None = None


class Rib:
    """Adj-RIBs-in of every peer and the best path per prefix."""

    def __init__(self, *, stale_path_time: float = DEFAULT_STALE_PATH_TIME) -> None:
        self._stale_path_time = stale_path_time
        self._peers: dict[str, _PeerState] = {}
        self._received: dict[str, dict[str, Path]] = {}  # peer → prefix → path as received
        self._adj: dict[str, dict[str, Path]] = {}  # peer → prefix → path the import policy accepted
        self._policy: ImportPolicy | None = None
        self._paths: dict[str, dict[str, Path]] = {}  # prefix → peer → path
        self._best: dict[str, Path] = {}

    # -- queries --------------------------------------------------------------------------------

    def best(self, prefix: str) -> Path | None:
        return self._best.get(str(ipaddress.ip_network(prefix)))

    def best_routes(self) -> dict[str, str]:
        """prefix → next hop of every best path (what the kernel should hold)."""
        return {prefix: path.next_hop for prefix, path in self._best.items()}

    def adj_rib_in(self, peer: str) -> dict[str, Path]:
        """The peer's paths the import policy accepted."""
        return dict(self._adj.get(peer, {}))

    def received(self, peer: str) -> dict[str, Path]:
        """Everything the peer sent, before the import policy."""
        return dict(self._received.get(peer, {}))

    def paths(self, prefix: str) -> list[Path]:
        """Every accepted path to `prefix`, best first."""
        return sorted((self._paths.get(str(ipaddress.ip_network(prefix))) or {}).values(), key=Path.sort_key)

    def prefixes(self) -> list[str]:
        return list(self._paths)

    def set_import_policy(self, policy: ImportPolicy | None) -> Delta:
        """Install a new import policy and re-decide every received path under it."""
        self._policy = policy
        touched: dict[str, str | None] = {}
        for peer, received in self._received.items():
            adj = self._adj.setdefault(peer, {})
            for prefix, raw in received.items():
                accepted = self._accept(raw)
                if accepted == adj.get(prefix):
                    continue
                self._note(touched, prefix)
                if accepted is None:
                    del adj[prefix]
                    del self._paths[prefix][peer]
                else:
                    adj[prefix] = accepted
                    self._paths.setdefault(prefix, {})[peer] = accepted
        return self._reselect(touched)

    def _accept(self, raw: Path) -> Path | None:
        if self._policy is None:
            return raw
        attributes = self._policy(raw.peer, raw.prefix, raw.attributes)
        if attributes is None:
            return None
        return raw if attributes is raw.attributes else replace(raw, attributes=attributes)

    def is_up(self, peer: str) -> bool:
        state = self._peers.get(peer)
        return bool(state and state.up)

    def next_deadline(self) -> float | None:
        """When `expire` next has work to do, or None."""
        deadlines = [s.stale_deadline for s in self._peers.values() if s.stale_deadline is not None]
        return min(deadlines) if deadlines else None

    # -- session events -------------------------------------------------------------------------

    def open(self, peer: str, *, router_id: str, graceful_restart_time: int | None) -> Delta:
        """The peer's OPEN. Pass `graceful_restart_time=None` unless GR is negotiated both ways."""
        state = self._peers.setdefault(peer, _PeerState())
        state.router_id = router_id
        state.restart_time = graceful_restart_time or None
        return {}

    def peer_up(self, peer: str, *, now: float) -> Delta:
        state = self._peers.setdefault(peer, _PeerState())
        state.up = True
        if not self._has_stale(peer):
            state.stale_deadline = None
            return {}
        if state.restart_time is None:
            # The restarted peer no longer offers GR: its stale paths cannot be trusted (RFC 4724 §4.2).
            return self._drop(peer, stale_only=True)
        state.stale_deadline = now + self._stale_path_time
        return {}

    def peer_down(self, peer: str, *, now: float) -> Delta:
        state = self._peers.setdefault(peer, _PeerState())
        was_up, state.up = state.up, False
        if state.restart_time is None:
            log.info("bgp peer down, flushing peer=%s paths=%d", peer, len(self._adj.get(peer, {})))
            return self._drop(peer, stale_only=False)
        if was_up or state.stale_deadline is None:
            state.stale_deadline = now + state.restart_time
        log.info("bgp peer down, graceful restart peer=%s paths=%d restart_time=%s",
                 peer, len(self._adj.get(peer, {})), state.restart_time)
        return self._mark_stale(peer)

    def end_of_rib(self, peer: str) -> Delta:
        state = self._peers.setdefault(peer, _PeerState())
        state.stale_deadline = None
        return self._drop(peer, stale_only=True)

    def remove_peer(self, peer: str) -> Delta:
        """The session was removed from the configuration: forget the peer and its paths."""
        delta = self._drop(peer, stale_only=False)
        self._peers.pop(peer, None)
        self._adj.pop(peer, None)
        self._received.pop(peer, None)
        return delta

    def suspend(self, *, now: float, hold: float) -> Delta:
        """The sidecar connection dropped: keep every path as stale for `hold` seconds.

        The sidecar's replay after reconnecting re-announces what is still valid, and each peer's
        replayed End-of-RIB drops the rest.
        """
        for peer, state in self._peers.items():
            state.stale_deadline = now + hold if state.stale_deadline is None else min(state.stale_deadline, now + hold)
            self._mark_stale(peer)
        return {}

    def expire(self, now: float) -> Delta:
        """Drop stale paths whose restart or stale-path timer ran out."""
        delta: Delta = {}
        for peer, state in self._peers.items():
            if state.stale_deadline is not None and state.stale_deadline <= now:
                state.stale_deadline = None
                log.info("bgp stale paths expired peer=%s", peer)
                delta.update(self._drop(peer, stale_only=True))
        return delta

    # -- routes ---------------------------------------------------------------------------------

    def update(self, peer: str, announced: Iterable[ReceivedRoute] = (), withdrawn: Iterable[str] = ()) -> Delta:
        state = self._peers.setdefault(peer, _PeerState())
        adj = self._adj.setdefault(peer, {})
        received = self._received.setdefault(peer, {})
        touched: dict[str, str | None] = {}
        for prefix in withdrawn:
            prefix = str(ipaddress.ip_network(prefix))
            received.pop(prefix, None)
            if prefix in adj:
                self._note(touched, prefix)
                del adj[prefix]
                del self._paths[prefix][peer]
        for route in announced:
            prefix = str(ipaddress.ip_network(route.prefix))
            raw = Path(prefix, peer, route.next_hop, route.attributes, state.router_id)
            received[prefix] = raw
            path = self._accept(raw)
            if path is None:
                if prefix in adj:
                    self._note(touched, prefix)
                    del adj[prefix]
                    del self._paths[prefix][peer]
                continue
            self._note(touched, prefix)
            adj[prefix] = path
            self._paths.setdefault(prefix, {})[peer] = path
        return self._reselect(touched)

    def apply(self, event: Event, *, now: float, local_graceful_restart: bool = True) -> Delta:
        """Feed one protocol event; `local_graceful_restart` says whether we advertised GR to its peer."""
        if isinstance(event, RoutesReceived):
            return self.update(event.peer, event.announced, event.withdrawn)
        if isinstance(event, OpenReceived):
            restart = event.graceful_restart_time if local_graceful_restart else None
            return self.open(event.peer, router_id=event.router_id, graceful_restart_time=restart)
        if isinstance(event, StateChange):
            if event.state == "up":
                return self.peer_up(event.peer, now=now)
            if event.state == "down":
                return self.peer_down(event.peer, now=now)
            return {}
        if isinstance(event, EndOfRib):
            return self.end_of_rib(event.peer)
        return {}

    # -- internals ------------------------------------------------------------------------------

    def _has_stale(self, peer: str) -> bool:
        return any(p.stale for p in self._received.get(peer, {}).values())

    def _note(self, touched: dict[str, str | None], prefix: str) -> None:
        if prefix not in touched:
            best = self._best.get(prefix)
            touched[prefix] = best.next_hop if best else None

    def _mark_stale(self, peer: str) -> Delta:
        received = self._received.get(peer, {})
        for prefix, path in list(received.items()):
            if not path.stale:
                received[prefix] = replace(path, stale=True)
        adj = self._adj.get(peer, {})
        for prefix, path in list(adj.items()):
            if not path.stale:
                stale = replace(path, stale=True)
                adj[prefix] = stale
                self._paths[prefix][peer] = stale
                if self._best.get(prefix) is path:
                    self._best[prefix] = stale
        return {}

    def _drop(self, peer: str, *, stale_only: bool) -> Delta:
        received = self._received.get(peer, {})
        for prefix, path in list(received.items()):
            if path.stale or not stale_only:
                del received[prefix]
        adj = self._adj.get(peer, {})
        touched: dict[str, str | None] = {}
        for prefix, path in list(adj.items()):
            if stale_only and not path.stale:
                continue
            self._note(touched, prefix)
            del adj[prefix]
            del self._paths[prefix][peer]
        return self._reselect(touched)

    def _reselect(self, touched: dict[str, str | None]) -> Delta:
        delta: Delta = {}
        for prefix, before in touched.items():
            candidates = self._paths.get(prefix) or {}
            if candidates:
                best = min(candidates.values(), key=Path.sort_key)
                self._best[prefix] = best
                after: str | None = best.next_hop
            else:
                self._paths.pop(prefix, None)
                self._best.pop(prefix, None)
                after = None
            if after != before:
                delta[prefix] = after
        return delta
