"""The iptables driver: one `Table` per iptables table owns our chains and our rules in built-ins.

API model: `update_chain()` / `remove_chain()` / `set_jump_rules()` record desired state (no I/O);
`apply()` writes the difference with ONE `iptables-restore --noflush --wait` per call;
`queue_resync()` makes the next apply read the table back first (drift repair).

What is ours: chains named with names.CHAIN_PREFIX, and rules in built-in chains that carry a
`-m comment --comment "cali:<hash>"` comment. Every rule we write carries such a hash: SHA-224
chained over the chain name, the previous rule's hash and the rendered rule (Felix's scheme), so
comparing hash lists tells which rules differ without parsing iptables-save's rewritten rule
text. Nothing else in the table is ever touched; our chains that are no longer desired are
deleted (after the first apply's read-back, i.e. only once the caller is in sync).

Design:
- Our chains: rules from the first differing hash onwards are replaced in place (`-R`), extra
  ones deleted from the end (`-D chain N`, safe: nobody else writes our chains), missing ones
  appended. Unchanged rules keep their counters.
- Built-ins (shared with kube-proxy, docker, ...): our rules must be the first N rules in order
  (Felix's ChainInsertMode "insert", the default) or the last N ("append"); otherwise all of ours
  are deleted by their exact spec (never by position, which could hit a rule someone inserted
  meanwhile) and re-inserted at the top, or appended at the bottom.
- Ordering inside one restore: new chain declarations, removal of our built-in rules, flush of
  doomed chains, chain updates, built-in inserts, chain deletions, so references never dangle.

Failure: a failed restore marks the table for read-back and is retried a bounded number of times
(re-reading in between); then `IptablesError` carries the command, its stderr and the input.

Backend: "nft" or "legacy" (iptables-nft-* / iptables-legacy-*), or None to detect it the way
kube-proxy's iptables-wrappers do (see `detect_backend`). A table of ip_version 6 drives the same
table of ip6tables (ip6tables-nft-* / ip6tables-legacy-*), as Felix keeps one table per family.

Thread ownership: the agent's main loop.
"""

from __future__ import annotations

import logging
import os
import re
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable, Literal

from felixpy import names
from felixpy.kernel import commands
from felixpy.kernel.commands import CommandFailed, Runner
from policy.iptables import (
    Chain,
    Rule,
    render_chain,
    render_with_hash as _render_with_hash,
    rule_hashes,
)

__all__ = [
    "BUILTIN_CHAINS",
    "Chain",
    "IptablesError",
    "Rule",
    "Table",
    "detect_backend",
    "render_chain",
    "rule_hashes",
]

log = logging.getLogger(__name__)

Backend = Literal["nft", "legacy"]
InsertMode = Literal["insert", "append"]

BUILTIN_CHAINS: dict[str, tuple[str, ...]] = {
    "filter": ("INPUT", "FORWARD", "OUTPUT"),
    "nat": ("PREROUTING", "INPUT", "OUTPUT", "POSTROUTING"),
    "mangle": ("PREROUTING", "INPUT", "FORWARD", "OUTPUT", "POSTROUTING"),
    "raw": ("PREROUTING", "OUTPUT"),
}

_HASH_RE = re.compile(r'--comment "?' + re.escape(names.RULE_HASH_PREFIX) + r'([A-Za-z0-9_-]+)"?')
_KUBE_HINTS = ("KUBE-IPTABLES-HINT", "KUBE-KUBELET-CANARY")


class IptablesError(Exception):
    """iptables-restore kept failing; `cause` is the last CommandFailed (argv, stderr, input)."""

    def __init__(self, message: str, cause: CommandFailed | None = None) -> None:
        self.cause = cause
        super().__init__(message)


@dataclass
class _BuiltinRule:
    hash: str | None  # None: not ours
    line: str  # "-A CHAIN ..." as saved (or as we wrote it)


@dataclass
class _KernelTable:
    """What the table holds, as far as we care: our chains' hashes, the built-ins' rules."""

    ours: dict[str, list[str | None]] = field(default_factory=dict)
    builtins: dict[str, list[_BuiltinRule]] = field(default_factory=dict)


def parse_save(text: str, table: str) -> _KernelTable:
    """Parse `iptables-save -t table` output into our view of it."""
    kernel = _KernelTable()
    in_table = False
    builtin = set(BUILTIN_CHAINS[table])
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("*"):
            in_table = line[1:] == table
            continue
        if not in_table or line == "COMMIT":
            continue
        if line.startswith(":"):
            chain = line[1:].split()[0]
            if chain.startswith(names.CHAIN_PREFIX):
                kernel.ours.setdefault(chain, [])
            elif chain in builtin:
                kernel.builtins.setdefault(chain, [])
            continue
        if line.startswith("-A "):
            chain = line.split()[1]
            found = _HASH_RE.search(line)
            rule_hash = found.group(1) if found else None
            if chain.startswith(names.CHAIN_PREFIX):
                kernel.ours.setdefault(chain, []).append(rule_hash)
            elif chain in builtin:
                kernel.builtins.setdefault(chain, []).append(_BuiltinRule(rule_hash, line))
    return kernel


def _binary(backend: Backend, tool: str, ip_version: int = 4) -> str:
    return f"{'ip6tables' if ip_version == 6 else 'iptables'}-{backend}-{tool}"


def detect_backend(runner: Runner = commands.run) -> Backend:
    """Pick nft or legacy like kube-proxy's iptables-wrappers.

    A kubelet/kube-proxy hint chain in the mangle table decides (nft checked first); otherwise the
    backend holding more rules wins, ties (a fresh node) go to nft. Legacy is only probed when its
    kernel tables are already loaded, so that probing never loads the legacy modules.
    """
    legacy_loaded = os.path.exists("/proc/net/ip_tables_names")
    candidates: list[Backend] = ["nft", "legacy"] if legacy_loaded else ["nft"]
    for backend in candidates:
        if any(hint in _save_or_empty(runner, backend, "mangle") for hint in _KUBE_HINTS):
            log.info("iptables backend detected backend=%s reason=kube-hint", backend)
            return backend
    counts = {b: _count_rules(_save_or_empty(runner, b, None)) for b in candidates}
    chosen: Backend = "legacy" if counts.get("legacy", 0) > counts["nft"] else "nft"
    log.info("iptables backend detected backend=%s nft_rules=%d legacy_rules=%d", chosen,
             counts["nft"], counts.get("legacy", 0))
    return chosen


def _save_or_empty(runner: Runner, backend: Backend, table: str | None) -> str:
    argv = [_binary(backend, "save")] + (["-t", table] if table else [])
    try:
        return runner(argv).stdout
    except CommandFailed as exc:
        log.debug("iptables save failed backend=%s error=%s", backend, exc)
        return ""


def _count_rules(text: str) -> int:
    return sum(1 for line in text.splitlines() if line.startswith("-A "))


class Table:
    """Owns our part of one iptables table; see the module docstring."""

    def __init__(
        self,
        name: str,
        *,
        backend: Backend | None = None,
        runner: Runner = commands.run,
        sleep: Callable[[float], None] = time.sleep,
        max_attempts: int = 3,
        insert_mode: InsertMode = "insert",
        ip_version: int = 4,
    ) -> None:
        if ip_version not in (4, 6):
            raise ValueError(f"IP version {ip_version}: expected 4 or 6")
        if name not in BUILTIN_CHAINS:
            raise ValueError(f"unknown iptables table {name!r} (one of {', '.join(BUILTIN_CHAINS)})")
        if insert_mode not in ("insert", "append"):
            raise ValueError(f"unknown chain insert mode {insert_mode!r} (insert or append)")
        self.name = name
        self.ip_version = ip_version
        self.insert_mode = insert_mode
        self._backend = backend
        self._run = runner
        self._sleep = sleep
        self._max_attempts = max_attempts
        self._chains: dict[str, Chain] = {}
        self._jumps: dict[str, tuple[Rule, ...]] = {}
        self._kernel: _KernelTable | None = None  # None: read back before the next write
        # Rule hashes per chain, kept while the caller keeps handing us the same Chain object:
        # hashing every rule of a 40,000-rule table costs ~100 ms, and most applies change a few
        # chains only.
        self._hash_cache: dict[str, tuple[Chain, list[str]]] = {}
        # Chains updated or removed since the last successful write; None: compare them all (after
        # a read-back). With 12,000 chains, walking every chain on each apply cost ~250 ms of a
        # one-policy change (benchmarks/bench_policy.py at 5,000 endpoints x 1,000 policies).
        self._dirty: set[str] | None = None

    @property
    def backend(self) -> Backend:
        if self._backend is None:
            self._backend = detect_backend(self._run)
        return self._backend

    def update_chain(self, chain: Chain) -> None:
        if self._chains.get(chain.name) is not chain:
            self._chains[chain.name] = chain
            if self._dirty is not None:
                self._dirty.add(chain.name)

    def remove_chain(self, name: str) -> None:
        self._chains.pop(name, None)
        self._hash_cache.pop(name, None)
        if self._dirty is not None:
            self._dirty.add(name)

    def _chain_hashes(self, chain: Chain) -> list[str]:
        cached = self._hash_cache.get(chain.name)
        if cached is not None and cached[0] is chain:
            return cached[1]
        hashes = rule_hashes(chain.name, chain.rules)
        self._hash_cache[chain.name] = (chain, hashes)
        return hashes

    def set_jump_rules(self, builtin_chain: str, rules: Iterable[Rule]) -> None:
        """Our rules in a built-in chain, in this order, at its top (insert mode) or bottom
        (append mode); empty: remove ours."""
        if builtin_chain not in BUILTIN_CHAINS[self.name]:
            raise ValueError(f"{builtin_chain!r} is not a built-in chain of table {self.name}")
        rules = tuple(rules)
        if rules:
            self._jumps[builtin_chain] = rules
        else:
            self._jumps.pop(builtin_chain, None)

    def queue_resync(self) -> None:
        self._kernel = None
        self._dirty = None

    def counts(self) -> tuple[int, int]:
        """(our chains, our rules: in our chains plus ours in built-ins), Felix's
        felix_iptables_chains / felix_iptables_rules."""
        rules = sum(len(c.rules) for c in self._chains.values()) + sum(len(r) for r in self._jumps.values())
        return len(self._chains), rules

    def apply(self) -> str:
        """Bring the table in line; returns the restore input written ("" when nothing differed)."""
        last_error: CommandFailed | None = None
        for attempt in range(1, self._max_attempts + 1):
            if self._kernel is None:
                self._kernel = self._read_back()
                self._dirty = None
            text = self.render_delta(self._kernel, self._dirty)
            if not text:
                self._dirty = set()  # the kernel holds what we want: only later changes differ
                return ""
            written = time.monotonic()
            try:
                self._run(
                    [_binary(self.backend, "restore", self.ip_version), "--noflush", "--wait"],
                    input=text,
                    timeout=commands.timeout_for_lines(text.count("\n")),
                )
            except CommandFailed as exc:
                last_error = exc
                self._kernel = None
                self._dirty = None
                # The input can be tens of MB at scale: log its size and head, not all of it.
                log.warning(
                    "iptables-restore failed table=%s attempt=%d error=%s input_lines=%d input_head=%r",
                    self.name, attempt, exc, text.count("\n"), text[:2000],
                )
                if attempt < self._max_attempts:
                    self._sleep(0.05 * 2 ** (attempt - 1))
                continue
            self._kernel = self._expected_after_write(self._kernel, self._dirty)
            self._dirty = set()
            log.info("iptables applied table=%s ip_version=%d lines=%d restore_seconds=%.4f", self.name,
                     self.ip_version, text.count("\n") - 2, time.monotonic() - written)
            return text
        raise IptablesError(
            f"iptables table {self.name}: restore failed {self._max_attempts} times: {last_error}",
            last_error,
        )

    def _read_back(self) -> _KernelTable:
        # The save is as long as the table: size its timeout by what we last programmed.
        expected_lines = sum(self.counts())
        out = self._run(
            [_binary(self.backend, "save", self.ip_version), "-t", self.name],
            timeout=commands.timeout_for_lines(expected_lines),
        ).stdout
        return parse_save(out, self.name)

    # -- diff -----------------------------------------------------------------------------------

    def render_delta(self, kernel: _KernelTable, only: set[str] | None = None) -> str:
        """The iptables-restore input that turns `kernel` into the desired state ("" if equal).

        `only`: the chains that may differ (the rest match `kernel`); None compares every chain."""
        declare: list[str] = []
        unhook: list[str] = []
        flush: list[str] = []
        update: list[str] = []
        hook: list[str] = []
        delete: list[str] = []

        names = self._chains if only is None else [n for n in only if n in self._chains]
        for name in sorted(names):
            chain = self._chains[name]
            want = self._chain_hashes(chain)
            if name not in kernel.ours:
                declare.append(f":{name} - [0:0]")
            have = kernel.ours.get(name, [])
            if want == have:
                continue
            first = next(
                (i for i, (w, h) in enumerate(zip(want, have)) if w != h), min(len(want), len(have))
            )
            for i in range(first, len(want)):
                body = _render_with_hash(chain.rules[i], want[i])
                if i < len(have):
                    update.append(f"-R {name} {i + 1} {body}")
                else:
                    update.append(f"-A {name} {body}")
            for i in range(len(have), len(want), -1):
                update.append(f"-D {name} {i}")

        gone = set(kernel.ours) if only is None else {n for n in only if n in kernel.ours}
        for name in sorted(gone - set(self._chains)):
            flush.append(f"-F {name}")
            delete.append(f"-X {name}")

        builtins = set(self._jumps) | {
            b for b, rules in kernel.builtins.items() if any(r.hash for r in rules)
        }
        for builtin in sorted(builtins):
            jumps = self._jumps.get(builtin, ())
            want_jumps = rule_hashes(builtin, jumps)
            present = kernel.builtins.get(builtin, [])
            ours = [r for r in present if r.hash is not None]
            if self.insert_mode == "append":
                in_place = [r.hash for r in present[len(present) - len(want_jumps):]] == want_jumps
            else:
                in_place = [r.hash for r in present[: len(want_jumps)]] == want_jumps
            if in_place and len(ours) == len(want_jumps):
                continue
            for old in ours:
                unhook.append("-D" + old.line[2:])  # by exact spec, never by position
            if self.insert_mode == "append":
                for jump, jump_hash in zip(jumps, want_jumps):
                    hook.append(f"-A {builtin} {_render_with_hash(jump, jump_hash)}")
            else:
                for jump, jump_hash in reversed(list(zip(jumps, want_jumps))):
                    hook.append(f"-I {builtin} 1 {_render_with_hash(jump, jump_hash)}")

        lines = declare + unhook + flush + update + hook + delete
        if not lines:
            return ""
        return "\n".join([f"*{self.name}", *lines, "COMMIT", ""])

    def _expected_after_write(self, kernel: _KernelTable, only: set[str] | None = None) -> _KernelTable:
        """What the table holds after a successful restore of render_delta(kernel, only)."""
        after = _KernelTable()
        if only is None:
            for name, chain in self._chains.items():
                after.ours[name] = list(self._chain_hashes(chain))
        else:
            after.ours = dict(kernel.ours)
            for name in only:
                if name in self._chains:
                    after.ours[name] = list(self._chain_hashes(self._chains[name]))
                else:
                    after.ours.pop(name, None)
        for builtin in set(kernel.builtins) | set(self._jumps):
            rules = self._jumps.get(builtin, ())
            hashes = rule_hashes(builtin, rules)
            ours = [
                _BuiltinRule(h, f"-A {builtin} {_render_with_hash(r, h)}")
                for r, h in zip(rules, hashes)
            ]
            foreign = [r for r in kernel.builtins.get(builtin, []) if r.hash is None]
            after.builtins[builtin] = foreign + ours if self.insert_mode == "append" else ours + foreign
        return after
