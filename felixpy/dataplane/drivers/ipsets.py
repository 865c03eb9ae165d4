"""The ipset driver: owns every IP set whose name starts with names.IPSET_PREFIX (IPv4 sets) or,
for the IPv6 instance, names.IPSET_PREFIX_V6 (Felix's cali40 / cali60 naming, `family inet6`).

API model: `set_members()` / `remove_set()` record desired state (no I/O); `apply()` creates and
updates sets with ONE `ipset restore` per call; `apply_deletions()` destroys sets no longer
desired, separately, so the caller can order the dataplane: ipsets first, then the iptables rules
that use them, then ipset deletions (a set still referenced by a rule cannot be destroyed).
`queue_resync()` makes the next apply read everything back (`ipset save`) first.

Design: member deltas (`add` / `del`) for small changes; a full rewrite into a temporary set
(prefix `cali41`, the main prefix with its last digit flipped, Felix-style) and an atomic `swap`
when the change is large, so packets never see a half-updated set. A set whose type changes
cannot be swapped (the kernel refuses to swap sets of different types), so it is destroyed and
re-created in the same restore; that fails, loudly, while an iptables rule still references it.
Callers that may change a set's type should give the new set a new name instead.

Failure: CommandFailed from the restore propagates (argv, stderr and the restore input attached)
after the driver marked itself for a read-back, so the next apply recomputes from the truth.

Thread ownership: the agent's main loop.
"""

from __future__ import annotations

import ipaddress
import logging
from dataclasses import dataclass
from typing import Iterable, Literal

from felixpy import names
from felixpy.kernel import commands
from felixpy.kernel.commands import CommandFailed, Runner

__all__ = ["IPSets", "SetType", "normalise_member", "temp_name"]

log = logging.getLogger(__name__)

SetType = Literal["hash:net", "hash:ip", "hash:ip,port"]
SET_TYPES: tuple[str, ...] = ("hash:net", "hash:ip", "hash:ip,port")
MAX_ELEMENTS = 1048576  # Felix's default MaxIpsetSize
# Rewrite (temp + swap) instead of add/del once a change touches this many members and more than
# half of the final set: cheaper for the kernel and atomic for packets.
REWRITE_MIN_CHANGES = 64
def _temp_prefix(prefix: str) -> str:
    return prefix[:-1] + ("1" if prefix[-1] != "1" else "0")


TEMP_PREFIX = _temp_prefix(names.IPSET_PREFIX)
_PREFIXES = {4: names.IPSET_PREFIX, 6: names.IPSET_PREFIX_V6}
_FAMILIES = {4: "inet", 6: "inet6"}


def temp_name(name: str, ip_version: int = 4) -> str:
    """The temporary set used to rewrite `name`: same length, prefix digit flipped."""
    prefix = _PREFIXES[ip_version]
    return _temp_prefix(prefix) + name[len(prefix):]


def check_our_set_name(name: str, ip_version: int = 4) -> str:
    names.check_ipset_name(name)
    if not name.startswith(_PREFIXES[ip_version]):
        raise ValueError(f"ipset name {name!r} must start with {_PREFIXES[ip_version]!r}")
    return name


def _addr(text: str, ip_version: int) -> str:
    addr = ipaddress.ip_address(text)
    if addr.version != ip_version:
        raise ValueError(text)
    return str(addr)


def normalise_member(set_type: str, member: str, ip_version: int = 4) -> str:
    """A member in the exact form `ipset save` prints it, so desired and actual compare equal."""
    member = member.strip()
    try:
        if set_type == "hash:net":
            net = ipaddress.ip_network(member, strict=False)
            if net.version != ip_version:
                raise ValueError(member)
            return str(net.network_address) if net.prefixlen == net.max_prefixlen else str(net)
        if set_type == "hash:ip":
            return _addr(member, ip_version)
        if set_type == "hash:ip,port":
            ip, _, port_spec = member.partition(",")
            proto, _, port = port_spec.rpartition(":")
            proto = (proto or "tcp").lower()
            if proto not in ("tcp", "udp", "sctp") or not port.isdigit() or int(port) > 65535:
                raise ValueError(member)
            return f"{_addr(ip, ip_version)},{proto}:{int(port)}"
    except ValueError:
        raise ValueError(f"invalid {set_type} member {member!r}") from None
    raise ValueError(f"unsupported ipset type {set_type!r} (one of {', '.join(SET_TYPES)})")


@dataclass(frozen=True)
class _SetState:
    type: str
    members: frozenset[str]
    maxelem: int = MAX_ELEMENTS


def parse_save(text: str, ip_version: int = 4) -> dict[str, _SetState]:
    """Our sets (main and temporary) of one family from `ipset save` output."""
    ours = (_PREFIXES[ip_version], _temp_prefix(_PREFIXES[ip_version]))
    types: dict[str, str] = {}
    maxelems: dict[str, int] = {}
    members: dict[str, set[str]] = {}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) < 3 or not parts[1].startswith(ours):
            continue
        if parts[0] == "create":
            types[parts[1]] = parts[2]
            members.setdefault(parts[1], set())
            if "maxelem" in parts[3:]:
                maxelems[parts[1]] = int(parts[parts.index("maxelem") + 1])
        elif parts[0] == "add":
            members.setdefault(parts[1], set()).add(parts[2])
    return {
        name: _SetState(set_type, frozenset(members.get(name, ())), maxelems.get(name, MAX_ELEMENTS))
        for name, set_type in types.items()
    }


class IPSets:
    """Reconciles our IP sets of one family with the declared desired sets; see the module docstring."""

    def __init__(self, *, runner: Runner = commands.run, ip_version: int = 4) -> None:
        if ip_version not in (4, 6):
            raise ValueError(f"IP version {ip_version}: expected 4 or 6")
        self._run = runner
        self.ip_version = ip_version
        self._temp_prefix = _temp_prefix(_PREFIXES[ip_version])
        self._desired: dict[str, _SetState] = {}
        self._dirty: set[str] = set()
        self._kernel: dict[str, _SetState] | None = None  # None: read back before the next write

    def set_members(self, name: str, set_type: SetType, members: Iterable[str]) -> None:
        check_our_set_name(name, self.ip_version)
        if set_type not in SET_TYPES:
            raise ValueError(f"unsupported ipset type {set_type!r} (one of {', '.join(SET_TYPES)})")
        state = _SetState(set_type, frozenset(normalise_member(set_type, m, self.ip_version) for m in members))
        if self._desired.get(name) != state:
            self._desired[name] = state
            self._dirty.add(name)

    def remove_set(self, name: str) -> None:
        if self._desired.pop(name, None) is not None:
            self._dirty.add(name)

    def queue_resync(self) -> None:
        self._kernel = None

    def counts(self) -> tuple[int, int | None]:
        """(our sets, every set in the kernel as last read back or None before the first read)."""
        return len(self._desired), (len(self._kernel) if self._kernel is not None else None)

    def apply(self) -> str:
        """Create and update sets (no deletions); returns the restore input ("" if nothing)."""
        if self._kernel is None:
            self._kernel = self._read_back()
            todo = set(self._desired) | {n for n in self._kernel if n.startswith(self._temp_prefix)}
        else:
            todo = set(self._dirty)
        lines: list[str] = []
        for name in sorted(todo):
            if name.startswith(self._temp_prefix):
                lines.append(f"destroy {name}")  # left over by an interrupted rewrite
                continue
            want = self._desired.get(name)
            if want is not None:
                lines.extend(self._update_lines(name, want, self._kernel.get(name)))
        self._dirty = set()  # deletions are found by apply_deletions comparing with the kernel
        if not lines:
            return ""
        text = "\n".join(lines) + "\n"
        self._restore(text)
        for name in todo:
            if name.startswith(self._temp_prefix):
                self._kernel.pop(name, None)
            elif name in self._desired:
                self._kernel[name] = self._desired[name]
        log.info("ipsets applied lines=%d", len(lines))
        return text

    def apply_deletions(self) -> list[str]:
        """Destroy our sets that are no longer desired; returns the names destroyed.

        Call after the iptables tables were applied, so no rule still references them. A set that
        cannot be destroyed yet (still referenced) is logged and retried on the next call.
        """
        if self._kernel is None:
            self._kernel = self._read_back()
        doomed = sorted(n for n in self._kernel if n not in self._desired)
        if not doomed:
            return []
        try:
            self._run(["ipset", "restore"], input="".join(f"destroy {n}\n" for n in doomed))
            destroyed = doomed
        except CommandFailed:
            # One bad set aborts a restore: fall back to one command per set to destroy the rest.
            destroyed = []
            for name in doomed:
                try:
                    self._run(["ipset", "destroy", name])
                    destroyed.append(name)
                except CommandFailed as exc:
                    log.warning("ipset destroy deferred set=%s error=%s", name, exc)
        kernel = self._kernel
        for name in destroyed:
            kernel.pop(name, None)
        if destroyed:
            log.info("ipsets destroyed count=%d", len(destroyed))
        return destroyed

    def _read_back(self) -> dict[str, _SetState]:
        # The save lists every member: size its timeout by the members we want (one line each).
        lines = sum(len(state.members) + 1 for state in self._desired.values())
        return parse_save(
            self._run(["ipset", "save"], timeout=commands.timeout_for_lines(lines)).stdout, self.ip_version
        )

    def _restore(self, text: str) -> None:
        try:
            self._run(["ipset", "restore"], input=text, timeout=commands.timeout_for_lines(text.count("\n")))
        except CommandFailed:
            self._kernel = None  # our picture may be wrong now: read back next time
            raise

    def _update_lines(self, name: str, want: _SetState, have: _SetState | None) -> list[str]:
        family = _FAMILIES[self.ip_version]
        create = f"create {{}} {want.type} family {family} maxelem {max(MAX_ELEMENTS, len(want.members))}"
        if have is None:
            return [create.format(name)] + [f"add {name} {m}" for m in sorted(want.members)]
        if have.type != want.type:
            return (
                [f"destroy {name}", create.format(name)]
                + [f"add {name} {m}" for m in sorted(want.members)]
            )
        adds = want.members - have.members
        dels = have.members - want.members
        changes = len(adds) + len(dels)
        too_small = len(want.members) > have.maxelem
        if too_small or (changes >= REWRITE_MIN_CHANGES and changes > len(want.members) // 2):
            temp = temp_name(name, self.ip_version)
            return (
                [create.format(temp)]
                + [f"add {temp} {m}" for m in sorted(want.members)]
                + [f"swap {temp} {name}", f"destroy {temp}"]
            )
        return [f"del {name} {m}" for m in sorted(dels)] + [f"add {name} {m}" for m in sorted(adds)]
