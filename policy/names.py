"""Prefixes and length limits of the iptables chains, rule comments and ipsets felixpy owns.

felixpy.names re-exports these: policy/ is the lowest layer and cannot import felixpy.
"""

from __future__ import annotations

CHAIN_PREFIX = "cali-"
IPSET_PREFIX = "cali40"
IPSET_PREFIX_V6 = "cali60"  # Felix names its IPv6 sets like the IPv4 ones
RULE_HASH_PREFIX = "cali:"
MAX_CHAIN_NAME = 28  # iptables allows 28 usable characters
MAX_IPSET_NAME = 31


def check_chain_name(name: str) -> str:
    if not name or len(name) > MAX_CHAIN_NAME:
        raise ValueError(f"chain name {name!r} must be 1..{MAX_CHAIN_NAME} characters")
    return name


def check_ipset_name(name: str) -> str:
    if not name or len(name) > MAX_IPSET_NAME:
        raise ValueError(f"ipset name {name!r} must be 1..{MAX_IPSET_NAME} characters")
    return name
