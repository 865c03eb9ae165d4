"""Run external commands (iptables-restore, ipset, ...) with errors that carry the evidence.

Every subprocess felixpy starts goes through `run`, so a failure always says what was run, with
which input, and what the command answered. For the same reason it is where the agent's metrics
count iptables-restore and ipset calls (`add_observer`): no driver has to know about metrics.
"""

from __future__ import annotations

import logging
import subprocess
import time
from dataclasses import dataclass
from typing import Callable, Protocol, Sequence

__all__ = [
    "CommandFailed", "CompletedRun", "Observer", "Runner", "add_observer", "remove_observer", "run",
    "timeout_for_lines",
]

log = logging.getLogger(__name__)

# (argv, input, seconds, ok) after every run; called on the caller's thread, must not raise.
Observer = Callable[[Sequence[str], "str | bytes | None", float, bool], None]
_observers: list[Observer] = []


def add_observer(observer: Observer) -> None:
    _observers.append(observer)


def remove_observer(observer: Observer) -> None:
    if observer in _observers:
        _observers.remove(observer)


def _notify(argv: Sequence[str], input: str | bytes | None, started: float, ok: bool) -> None:
    seconds = time.monotonic() - started
    for observer in list(_observers):
        try:
            observer(argv, input, seconds, ok)
        except Exception:  # an observer's bug must never fail a kernel write
            log.exception("command observer failed")


DEFAULT_TIMEOUT = 30.0
# A restore's time grows with its size: a 300,000-rule iptables-nft-restore took 21-39 s here
# (benchmarks/bench_policy.py, 2 loaded cores), over a flat 30 s limit. Allow one second per
# LINES_PER_SECOND lines on top of the default, ~4x slower than that measured worst case, so only a
# command that is truly stuck (e.g. waiting on a lock forever) is killed.
LINES_PER_SECOND = 2000


def timeout_for_lines(lines: int) -> float:
    """The timeout for a command that reads or writes `lines` lines (restore input, save output)."""
    return DEFAULT_TIMEOUT + max(0, lines) / LINES_PER_SECOND


@dataclass(frozen=True)
class CompletedRun:
    stdout: str
    stderr: str


class CommandFailed(Exception):
    """A command exited non-zero, timed out or could not be started.

    str() is one line (argv, rc, last stderr line); the attributes keep everything else, including
    the stdin that was fed to it, for logging.
    """

    def __init__(
        self,
        argv: Sequence[str],
        rc: int | None,
        stdout: str,
        stderr: str,
        input: str | bytes | None = None,
    ) -> None:
        self.argv = tuple(argv)
        self.rc = rc
        self.stdout = stdout
        self.stderr = stderr
        self.input = input
        super().__init__(self._one_line())

    def _one_line(self) -> str:
        lines = [ln.strip() for ln in self.stderr.splitlines() if ln.strip()]
        last = lines[-1] if lines else "(no stderr)"
        rc = "timeout" if self.rc is None else str(self.rc)
        return f"command {' '.join(self.argv)!r} failed (rc={rc}): {last}"


class Runner(Protocol):
    """The seam drivers take instead of calling `run` directly (tests pass a stateful fake)."""

    def __call__(
        self, argv: Sequence[str], *, input: str | bytes | None = None, timeout: float = DEFAULT_TIMEOUT
    ) -> CompletedRun: ...


def run(
    argv: Sequence[str], *, input: str | bytes | None = None, timeout: float = DEFAULT_TIMEOUT
) -> CompletedRun:
    """Run argv (no shell), feed it input, and return its output; raise CommandFailed on rc != 0."""
    argv = [str(a) for a in argv]
    data = input.encode() if isinstance(input, str) else input
    started = time.monotonic()
    try:
        proc = subprocess.run(
            argv, input=data, capture_output=True, timeout=timeout, check=False
        )
    except subprocess.TimeoutExpired as exc:
        _notify(argv, input, started, False)
        raise CommandFailed(argv, None, _text(exc.stdout), _text(exc.stderr), input) from None
    except OSError as exc:  # binary missing, not executable, ...
        _notify(argv, input, started, False)
        raise CommandFailed(argv, 127, "", f"{exc.strerror}: {argv[0]}", input) from None
    if _observers:
        _notify(argv, input, started, proc.returncode == 0)
    stdout, stderr = _text(proc.stdout), _text(proc.stderr)
    if proc.returncode != 0:
        log.debug("command failed argv=%r rc=%d stderr=%r", argv, proc.returncode, stderr)
        raise CommandFailed(argv, proc.returncode, stdout, stderr, input)
    return CompletedRun(stdout=stdout, stderr=stderr)


def _text(data: bytes | str | None) -> str:
    if data is None:
        return ""
    if isinstance(data, str):
        return data
    return data.decode(errors="replace")
