"""policy/ipsets.py: set names (content hashes) and members (from evaluate.match_endpoint)."""

from __future__ import annotations

import base64
import hashlib

import pytest

from felixpy.dataplane.drivers.ipsets import normalise_member
from policy import evaluate
from policy.ipsets import (
    IPSetSpec,
    canonical_match,
    ipset_members,
    named_port_set_members,
    named_port_set_name,
    selector_set_members,
    selector_set_name,
)
from policy.model import ContainerPort, Endpoint, EndpointMatch
from policy.names import MAX_IPSET_NAME

NS = "projectcalico.org/namespace"


def ep(ns: str, name: str, labels: dict[str, str], ips: tuple[str, ...],
       ports: tuple[ContainerPort, ...] = (), ns_labels: dict[str, str] | None = None) -> Endpoint:
    return Endpoint(
        namespace=ns, name=name,
        labels=tuple(sorted({**labels, NS: ns, "projectcalico.org/orchestrator": "k8s"}.items())),
        namespace_labels=tuple(sorted((ns_labels or {"kubernetes.io/metadata.name": ns}).items())),
        ips=ips, ports=ports, profiles=(f"kns.{ns}",),
    )


WEB_A = ep("a", "web-0", {"app": "web"}, ("10.65.0.1/32",),
           (ContainerPort("http", "TCP", 8080), ContainerPort("dns", "UDP", 53)), {"team": "blue"})
WEB_B = ep("b", "web-0", {"app": "web"}, ("10.65.1.1",),
           (ContainerPort("http", "TCP", 9090),), {"team": "red"})
DB_A = ep("a", "db-0", {"app": "db"}, ("10.65.0.2/32", "fd00::2/128"),
          (ContainerPort("http", "UDP", 7070),), {"team": "blue"})
ALL = [WEB_A, WEB_B, DB_A]


def test_selector_set_name_is_felix_shaped_and_spelling_independent() -> None:
    name = selector_set_name(EndpointMatch("app == 'web'"))
    digest = base64.urlsafe_b64encode(hashlib.sha224(b"s:app == \"web\"").digest()).decode()
    assert name == "cali40s:" + digest[:23]
    assert len(name) == MAX_IPSET_NAME
    assert selector_set_name(EndpointMatch('app=="web"')) == name
    assert selector_set_name(EndpointMatch("(a == 'x' && b == 'y') && c == 'z'")) == selector_set_name(
        EndpointMatch("a == 'x' && (b == 'y' && c == 'z')"))
    # Namespace scoping is part of the identity.
    scoped = selector_set_name(EndpointMatch("app == 'web'", namespace="a"))
    by_ns_selector = selector_set_name(EndpointMatch("app == 'web'", namespace_selector="team == 'blue'"))
    assert len({name, scoped, by_ns_selector}) == 3


def test_canonical_match_keeps_fields_apart() -> None:
    one = canonical_match(EndpointMatch("all()", namespace="x"))
    two = canonical_match(EndpointMatch("all()", namespace_selector="has(x)"))
    assert one != two
    assert canonical_match(EndpointMatch("has(x)")) == "has(x)"  # no scoping: Felix's plain selector


def test_named_port_set_name() -> None:
    name = named_port_set_name(None, "http", "TCP")
    assert name.startswith("cali40n:") and len(name) == MAX_IPSET_NAME
    assert named_port_set_name(None, "http", "tcp") == name
    assert named_port_set_name(None, "http", "udp") != name
    assert named_port_set_name(EndpointMatch("app == 'web'"), "http", "tcp") != name
    assert named_port_set_name(None, "https", "tcp") != name


def test_selector_members_follow_namespace_and_namespace_selector() -> None:
    assert selector_set_members(EndpointMatch("app == 'web'"), ALL) == {"10.65.0.1", "10.65.1.1"}
    assert selector_set_members(EndpointMatch("app == 'web'", namespace="a"), ALL) == {"10.65.0.1"}
    assert selector_set_members(EndpointMatch("all()", namespace_selector="team == 'blue'"), ALL) == {
        "10.65.0.1", "10.65.0.2"}  # IPv6 addresses are left out of the IPv4 set
    assert selector_set_members(EndpointMatch("app == 'nope'"), ALL) == set()


def test_members_agree_with_evaluate_match_endpoint() -> None:
    for match in (EndpointMatch("app == 'web'"), EndpointMatch("all()", namespace_selector="team == 'red'"),
                  EndpointMatch("!has(app)"), EndpointMatch("app in {'db', 'web'}", namespace="a")):
        expected = {e.ips[0].removesuffix("/32") for e in ALL if evaluate.match_endpoint(match, e)}
        assert selector_set_members(match, ALL) == expected


def test_named_port_members_resolve_per_endpoint() -> None:
    # Each pod gives "http" its own number: one set covers all of them.
    assert named_port_set_members(None, "http", "TCP", ALL) == {"10.65.0.1,tcp:8080", "10.65.1.1,tcp:9090"}
    assert named_port_set_members(None, "http", "udp", ALL) == {"10.65.0.2,udp:7070"}
    assert named_port_set_members(EndpointMatch("app == 'web'", namespace="b"), "http", "tcp", ALL) == {
        "10.65.1.1,tcp:9090"}
    assert named_port_set_members(None, "dns", "tcp", ALL) == set()
    assert named_port_set_members(None, "http", "udplite", ALL) == set()
    for member in named_port_set_members(None, "http", "tcp", ALL):
        assert normalise_member("hash:ip,port", member) == member  # the driver's canonical form


def test_ipset_members_dispatches_on_spec() -> None:
    assert ipset_members(IPSetSpec("hash:net", EndpointMatch("app == 'db'")), ALL) == {"10.65.0.2"}
    assert ipset_members(IPSetSpec("hash:ip,port", None, "dns", "udp"), ALL) == {"10.65.0.1,udp:53"}
    with pytest.raises(ValueError):
        ipset_members(IPSetSpec("hash:net", None), ALL)
