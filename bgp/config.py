"""Render ExaBGP 5's configuration and env file for one node from plain values.

Pure text rendering (tested as strings). The choices follow the measured spike
(`../shared/docs/exabgp-notes.md`):
- `exabgp.daemon.user = 'root'` and `drop = false`: with the default (nobody) the API process cannot
  program routes and a respawned one cannot even start (gotcha 3).
- `api.ack = true`: the sidecar relays every `done`/`error` to the agent, which waits for it.
- `api.cli = false`: the CLI needs pre-created FIFOs and costs a 29 MB relay process.
- `log.level = WARNING` by default: INFO writes one line per route and halves announce throughput.
- Neighbours `listen` on the node address so a restarted peer reconnects at once instead of
  waiting for ExaBGP's connect backoff (up to 60 s); a mesh pair's lower IP is `passive`. Not a
  neighbour without a local address (`sourceAddress: None`: ExaBGP refuses `listen` there) nor a
  GTSM one (ExaBGP puts its minimum TTL on the listening socket all neighbours share): those
  only connect out, and are never passive.
- Graceful restart with `manual-eor true`: the agent sends End-of-RIB after re-announcing, so a
  restart is hitless (gotcha 6). `maxRestartTime` 0 turns graceful restart off for that peer.
- `route-refresh` so a respawned API process can ask peers to resend (gotcha 7).
- `receive { parsed; update; open; }` plus `neighbor-changes`: the OPEN tells the RIB whether the peer
  negotiated graceful restart.
- A neighbour carries the one family of its address (`ipv4 unicast` or `ipv6 unicast`), as
  Calico's bird and bird6 do: IPv6 routes go over sessions between IPv6 addresses only.
- MD5 passwords are written base64-encoded (`md5-base64 true`), so any secret survives ExaBGP's
  tokeniser unquoted and unescaped.
- Per-session BGPPeer knobs: `localASNumber` is the neighbour's `local-as`; `ttlSecurity N` is
  GTSM, `incoming-ttl 256-N` (ExaBGP then sends with TTL 255, as BIRD's `ttl security on`);
  `keepaliveTime K` becomes `hold-time 3K`: ExaBGP 5.0.15 has no keepalive setting of its own and
  sends keepalives every negotiated hold time / 3 (measured: exabgp/bgp/timer.py), so this is how
  keepalives go out every K seconds. The session's listen port is the node's BGP listen port.
- The listening socket is bound to the node address (ExaBGP binds `md5-ip`, which is also the
  source of its outgoing connections), whatever BGPConfiguration bindMode says; see docs/bgp.md.

Neighbours are static in ExaBGP: change them by re-rendering the file and sending SIGUSR1 (never
SIGHUP, which shuts ExaBGP down). Changing an existing neighbour's stanza tears its session down
(Cease 6/3), so rendering is deterministic: the same inputs give byte-identical text.
"""

from __future__ import annotations

import base64
import ipaddress
import re
import sys
from dataclasses import dataclass
from bgp.peers import Peer
from bgp.protocol import family_of

PROCESS_NAME = "felixpy-sidecar"
DEFAULT_HOLD_TIME = 90

_SAFE_WORD = re.compile(r"[A-Za-z0-9_./:@+=,-]+")


@dataclass(frozen=True)
class SpeakerConfig:
    """Everything ExaBGP's configuration for one node is rendered from."""

    node_name: str
    router_id: str
    local_address: str
    as_number: int
    peers: tuple[Peer, ...]
    sidecar_socket: str  # unix socket the sidecar serves the agent on
    python: str = sys.executable  # interpreter that runs `-m bgp.sidecar`
    hold_time: int = DEFAULT_HOLD_TIME


def sidecar_command(python: str, socket_path: str) -> str:
    """The `run` line of the process stanza. ExaBGP splits it on whitespace, so no quoting exists."""
    for part in (python, socket_path):
        if not _SAFE_WORD.fullmatch(part):
            raise ValueError(f"path {part!r} cannot appear in ExaBGP's run line (whitespace or special characters)")
    return f"{python} -m bgp.sidecar --socket {socket_path}"


def _md5_base64(password: str) -> str:
    raw = password.encode()
    if not 0 < len(raw) <= 80:
        # TCP_MD5SIG_MAXKEYLEN in the kernel.
        raise ValueError("BGP password must be 1 to 80 bytes long")
    return base64.b64encode(raw).decode()


def hold_time_for(peer: Peer, default: int = DEFAULT_HOLD_TIME) -> int:
    """The hold time ExaBGP offers on `peer`'s session: 3 × keepaliveTime when one is set (ExaBGP
    sends keepalives every hold time / 3 and has no separate keepalive setting)."""
    return 3 * peer.keepalive_time if peer.keepalive_time else default


def _neighbor(cfg: SpeakerConfig, peer: Peer) -> list[str]:
    ipaddress.ip_address(peer.address)
    lines = [
        f"neighbor {peer.address} {{",
        f'    description "{peer.name} {peer.type.value}";',
        f"    router-id {cfg.router_id};",
    ]
    if peer.source_address is not None:
        lines.append(f"    local-address {peer.source_address};")
    lines += [
        f"    local-as {peer.local_as_for(cfg.as_number)};",
        f"    peer-as {peer.as_number};",
        f"    hold-time {hold_time_for(peer, cfg.hold_time)};",
    ]
    # ExaBGP listens on one socket per local address and port for every neighbour, and puts a
    # neighbour's incoming-ttl on that shared socket: a GTSM neighbour listening there would hold
    # every other session's connections to its minimum TTL (measured: the mesh peer's SYNs, TTL
    # 64, were dropped). So a ttlSecurity session is one we connect out on, where ExaBGP sets the
    # minimum on that session's own socket. A listening neighbour also needs a local address.
    listening = bool(peer.listen_port) and peer.source_address is not None and not peer.ttl_security
    if listening:
        lines.append(f"    listen {peer.listen_port};")
    if peer.port != 179:
        lines.append(f"    connect {peer.port};")
    if peer.passive and listening:
        lines.append("    passive true;")
    if peer.ttl_security:
        # GTSM (RFC 5082): the peer is at most N hops away, so its packets arrive with TTL
        # 256-N or more; ExaBGP sends with 255 when only incoming-ttl is set.
        lines.append(f"    incoming-ttl {256 - peer.ttl_security};")
    if peer.password:
        lines += [f"    md5-password {_md5_base64(peer.password)};", "    md5-base64 true;"]
    graceful = peer.max_restart_time > 0
    if graceful:
        lines.append("    manual-eor true;")
    lines += [
        "    family {",
        f"        {family_of(peer.address)};",
        "    }",
        "    capability {",
        "        route-refresh;",
    ]
    if graceful:
        lines.append(f"        graceful-restart {peer.max_restart_time};")
    lines += [
        "    }",
        "    api {",
        f"        processes [ {PROCESS_NAME} ];",
        "        neighbor-changes;",
        "        receive {",
        "            parsed;",
        "            update;",
        "            open;",
        "        }",
        "    }",
        "}",
    ]
    return lines


def render_exabgp_conf(cfg: SpeakerConfig) -> str:
    """The ExaBGP configuration file text for `cfg` (deterministic)."""
    ipaddress.IPv4Address(cfg.router_id)  # a BGP identifier is 32 bits, even on an IPv6-only node
    ipaddress.ip_address(cfg.local_address)
    if not 0 < cfg.as_number < 2**32:
        raise ValueError(f"invalid AS number {cfg.as_number}")
    lines = [
        f"# ExaBGP configuration for node {cfg.node_name}, rendered by felixpy (bgp.config). Do not edit.",
        f"process {PROCESS_NAME} {{",
        f"    run {sidecar_command(cfg.python, cfg.sidecar_socket)};",
        "    encoder json;",
        "}",
    ]
    for peer in sorted(cfg.peers, key=lambda p: (ipaddress.ip_address(p.address).version,
                                                 int(ipaddress.ip_address(p.address)))):
        lines.append("")
        lines += _neighbor(cfg, peer)
    return "\n".join(lines) + "\n"


def render_exabgp_env(*, log_destination: str = "stderr", log_level: str = "WARNING") -> str:
    """ExaBGP's ini env file (pass with `--env-file`)."""
    if log_level not in ("DEBUG", "INFO", "NOTICE", "WARNING", "ERR", "CRIT"):
        raise ValueError(f"invalid ExaBGP log level {log_level!r}")
    if not _SAFE_WORD.fullmatch(log_destination):
        raise ValueError(f"invalid ExaBGP log destination {log_destination!r}")
    return (
        "# ExaBGP environment, rendered by felixpy (bgp.config). Do not edit.\n"
        "[exabgp.daemon]\n"
        "user = 'root'\n"
        "daemonize = false\n"
        "drop = false\n"
        "\n"
        "[exabgp.log]\n"
        f"destination = '{log_destination}'\n"
        f"level = {log_level}\n"
        "\n"
        "[exabgp.api]\n"
        "ack = true\n"
        "encoder = json\n"
        "cli = false\n"
        "respawn = true\n"
        "\n"
        # ExaBGP's reactor polls every speed/100 s when idle: 10 ms by default, ~0.7-1.7 % of a
        # core per idle speaker here. Socket and API input still wake the poll at once; only
        # timers (keepalives, connect retries) are checked at this 50 ms granularity.
        "[exabgp.reactor]\n"
        "speed = 5.0\n"
    )

