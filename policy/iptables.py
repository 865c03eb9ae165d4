"""iptables rule and chain values, rendered as `iptables-restore` text: pure, no I/O.

Every rule felixpy writes carries `-m comment --comment "cali:<hash>"`: the first 16 characters
of base64url(SHA-224) chained over the chain name, the previous rule's hash and the rendered rule
(Felix's scheme). The hash therefore encodes the rule's text, chain and position, which lets the
driver compare what is in the kernel with what is wanted by hash alone.
"""

from __future__ import annotations

import base64
import hashlib
from dataclasses import dataclass
from typing import Iterable

from policy.names import CHAIN_PREFIX, RULE_HASH_PREFIX, check_chain_name

HASH_LENGTH = 16


@dataclass(frozen=True)
class Rule:
    """One rule: iptables match options, the action ("ACCEPT", "MARK --set-mark 0x1", or verbatim
    when it starts with "-", e.g. "-g cali-x"), and an optional human comment."""

    match: str = ""
    action: str = ""
    comment: str = ""

    def __post_init__(self) -> None:
        for label, text in (("match", self.match), ("action", self.action), ("comment", self.comment)):
            if "\n" in text:
                raise ValueError(f"rule {label} must be one line: {text!r}")
        if '"' in self.comment:
            raise ValueError(f"rule comment cannot contain a double quote: {self.comment!r}")

    def render_body(self) -> str:
        """The rule without the chain and without our hash comment."""
        parts = []
        if self.match:
            parts.append(self.match.strip())
        if self.comment:
            parts.append(f'-m comment --comment "{self.comment[:200]}"')
        action = self.action.strip()
        if action:
            parts.append(action if action.startswith("-") else f"-j {action}")
        return " ".join(parts)


@dataclass(frozen=True)
class Chain:
    name: str
    rules: tuple[Rule, ...] = ()

    def __post_init__(self) -> None:
        check_our_chain_name(self.name)
        object.__setattr__(self, "rules", tuple(self.rules))


def check_our_chain_name(name: str) -> str:
    check_chain_name(name)
    if not name.startswith(CHAIN_PREFIX):
        raise ValueError(f"chain name {name!r} must start with {CHAIN_PREFIX!r}")
    return name


def rule_hashes(chain_name: str, rules: Iterable[Rule]) -> list[str]:
    """Felix's chained rule hashes: each covers the chain, the previous hash and the rule."""
    hashes = []
    prev = ""
    for rule in rules:
        digest = hashlib.sha224()
        digest.update(chain_name.encode())
        digest.update(prev.encode())
        digest.update(rule.render_body().encode())
        prev = base64.urlsafe_b64encode(digest.digest()).decode()[:HASH_LENGTH]
        hashes.append(prev)
    return hashes


def render_with_hash(rule: Rule, rule_hash: str) -> str:
    body = rule.render_body()
    tag = f'-m comment --comment "{RULE_HASH_PREFIX}{rule_hash}"'
    return f"{tag} {body}" if body else tag


def render_chain(chain: Chain) -> list[str]:
    """The `-A` lines of a whole chain (what a fresh chain gets), for logging and tests."""
    hashes = rule_hashes(chain.name, chain.rules)
    return [f"-A {chain.name} {render_with_hash(r, h)}" for r, h in zip(chain.rules, hashes)]
