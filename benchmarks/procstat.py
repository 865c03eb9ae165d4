"""What /proc says about a process, for the benchmarks that report CPU and memory per process.

Every reader answers 0 (or an empty list) when the process is gone: a benchmark samples processes
that a lab may be restarting, and a vanished process is a sample of nothing, not an error.
"""

from __future__ import annotations

import os


def cpu_ticks(pid: int) -> int:
    """User + system CPU time of `pid` in clock ticks (os.sysconf("SC_CLK_TCK") per second)."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return int(fields[11]) + int(fields[12])  # utime, stime
    except (OSError, IndexError, ValueError):
        return 0


def memory_kib(pid: int) -> tuple[int, int]:
    """(RSS, PSS) of `pid` in KiB from smaps_rollup."""
    rss = pss = 0
    try:
        with open(f"/proc/{pid}/smaps_rollup", encoding="ascii") as f:
            for line in f:
                if line.startswith("Rss:"):
                    rss = int(line.split()[1])
                elif line.startswith("Pss:"):
                    pss = int(line.split()[1])
    except OSError:
        pass
    return rss, pss


def rss_mib(pid: int) -> float:
    """Resident set size of `pid` in MiB (VmRSS)."""
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def children(pid: int) -> list[int]:
    """Direct children of `pid`, from every thread's list (e.g. ExaBGP's API process)."""
    found: list[int] = []
    try:
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/children", encoding="ascii") as f:
                found += [int(c) for c in f.read().split()]
    except OSError:
        pass
    return found
