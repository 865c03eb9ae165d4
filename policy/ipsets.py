"""The IP sets policy rules match against: their names, what they hold, and which rule needs which.

Two kinds, as in Felix, each once per IP family (`cali40` sets hold IPv4 addresses for
iptables, `cali60` sets the IPv6 ones for ip6tables; the same id after the prefix):
* selector sets (`hash:net`, named `cali40s:<23 chars>`): the addresses of everything an
  EndpointMatch selects: pods' IPs, network sets' nets (a CIDR is one member), host endpoints'
  expectedIPs; a rule's source/destination selector becomes `-m set --match-set`.
* named-port sets (`hash:ip,port`, named `cali40n:<23 chars>`): "ip,proto:port" for every
  endpoint the match selects (None: every endpoint) that declares a container port with that
  name and protocol. Kubernetes named ports are resolved per destination pod, so one iptables
  rule `-m set --match-set <set> dst,dst` covers pods that give the name different numbers.

Names are content hashes (base64url(SHA-224) over a canonical text, Felix's `s:` / `n:` ids), so
equal matches share one set however the selector was spelled, and a changed selector gets a new
name rather than an in-place type or meaning change. The canonical text of a match is the
canonical selector alone when it has no namespace constraints (Felix's formula), otherwise a
tagged text that also names the namespace and the namespace selector.

Membership is policy.evaluate.match_endpoint, the same definition `felixctl policy explain` uses,
so the kernel and explain agree.

This module is pure: values only, no I/O, no imports from felixpy.
"""

from __future__ import annotations

import base64
import functools
import hashlib
from dataclasses import dataclass
from typing import Iterable, Literal

from policy import selectors
from policy.evaluate import match_endpoint
from policy.model import Endpoint, EndpointMatch
from policy.names import IPSET_PREFIX, IPSET_PREFIX_V6, check_ipset_name

__all__ = [
    "IPSetSpec",
    "SetType",
    "canonical_match",
    "ipset_members",
    "named_port_set_members",
    "named_port_set_name",
    "selected_members",
    "selector_set_members",
    "selector_set_name",
]

SetType = Literal["hash:net", "hash:ip,port"]

_ID_CHARS = 23  # "cali40" + "s:" + 23 = 31, the kernel's limit
PORT_PROTOCOLS = ("tcp", "udp", "sctp")  # what hash:ip,port members may carry (and the driver takes)


@dataclass(frozen=True)
class IPSetSpec:
    """What one set holds: a selector set (port_name None) or a named-port set."""

    type: SetType
    match: EndpointMatch | None  # None only for a named-port set over every endpoint
    port_name: str | None = None
    protocol: str | None = None  # lower case, named-port sets only
    ip_version: int = 4  # which family's addresses it holds (cali40 / cali60 names)


@functools.lru_cache(maxsize=8192)
def _parsed(text: str) -> selectors.Selector:
    return selectors.parse(text)


@functools.lru_cache(maxsize=8192)
def canonical_match(match: EndpointMatch) -> str:
    """The identity of a match: equal meaning (modulo selector spelling) gives equal text."""
    selector = str(_parsed(match.selector))
    if match.namespace is None and match.namespace_selector is None:
        return selector
    ns_selector = "" if match.namespace_selector is None else str(_parsed(match.namespace_selector))
    namespace = "" if match.namespace is None else match.namespace
    # Tags and a separator that cannot occur in a selector keep the fields apart.
    return f"{selector}\x00namespace={namespace}\x00namespaceSelector={ns_selector}"


_PREFIXES = {4: IPSET_PREFIX, 6: IPSET_PREFIX_V6}
_HOST_SUFFIXES = {4: "/32", 6: "/128"}


def _hashed_name(kind: str, identity: str, ip_version: int) -> str:
    digest = hashlib.sha224(f"{kind}:{identity}".encode()).digest()
    name = f"{_PREFIXES[ip_version]}{kind}:{base64.urlsafe_b64encode(digest).decode()[:_ID_CHARS]}"
    return check_ipset_name(name)


def selector_set_name(match: EndpointMatch, ip_version: int = 4) -> str:
    """`cali40s:` (`cali60s:` for IPv6) + 23 characters of base64url(SHA-224("s:" + canonical match))."""
    return _hashed_name("s", canonical_match(match), ip_version)


def named_port_set_name(match: EndpointMatch | None, port_name: str, protocol: str, ip_version: int = 4) -> str:
    """`cali40n:` (`cali60n:`) + 23 characters of base64url(SHA-224) over the match, protocol and port name."""
    scope = "all()" if match is None else canonical_match(match)
    return _hashed_name("n", f"{scope},{protocol.lower()}:{port_name}", ip_version)


def _member(ip: str, ip_version: int) -> str | None:
    """The member form of an endpoint address in a set of `ip_version`; None for the other family."""
    if (":" in ip) != (ip_version == 6):
        return None
    suffix = _HOST_SUFFIXES[ip_version]
    return ip[: -len(suffix)] if ip.endswith(suffix) else ip


def _host(ip: str, ip_version: int) -> str | None:
    """An endpoint address as a hash:ip,port member takes it: one address of the family, else None."""
    member = _member(ip, ip_version)
    return member if member is not None and "/" not in member else None


def selector_set_members(match: EndpointMatch, endpoints: Iterable[Endpoint], ip_version: int = 4) -> set[str]:
    """The addresses of family `ip_version` of every endpoint `match` selects."""
    members: set[str] = set()
    for ep in endpoints:
        if match_endpoint(match, ep):
            members.update(ip for ip in (_member(a, ip_version) for a in ep.ips) if ip is not None)
    return members


def named_port_set_members(
    match: EndpointMatch | None, port_name: str, protocol: str, endpoints: Iterable[Endpoint],
    ip_version: int = 4,
) -> set[str]:
    """"ip,proto:port" for every selected endpoint that declares `port_name` with `protocol`."""
    proto = protocol.lower()
    if proto not in PORT_PROTOCOLS:
        return set()
    members: set[str] = set()
    for ep in endpoints:
        numbers = [p.port for p in ep.ports if p.name == port_name and p.protocol.lower() == proto]
        if not numbers or (match is not None and not match_endpoint(match, ep)):
            continue
        for ip in (_host(a, ip_version) for a in ep.ips):
            if ip is not None:
                members.update(f"{ip},{proto}:{number}" for number in numbers)
    return members


def selected_members(spec: IPSetSpec, ep: Endpoint) -> set[str]:
    """What `ep` contributes to the set once its match is known to select it (a caller that
    matched it already, e.g. for the other family's twin set, need not match it again)."""
    if spec.port_name is None:
        return {ip for ip in (_member(a, spec.ip_version) for a in ep.ips) if ip is not None}
    return named_port_set_members(None, spec.port_name, spec.protocol or "", (ep,), spec.ip_version)


def ipset_members(spec: IPSetSpec, endpoints: Iterable[Endpoint]) -> set[str]:
    """The members of the set `spec` describes, given every endpoint known to the agent."""
    if spec.port_name is None:
        if spec.match is None:
            raise ValueError("a selector set needs a match")
        return selector_set_members(spec.match, endpoints, spec.ip_version)
    return named_port_set_members(spec.match, spec.port_name, spec.protocol or "", endpoints, spec.ip_version)
