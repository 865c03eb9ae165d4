"""The lab's connectivity prober: runs inside a source pod's netns and probes many targets at once.

    python -m felixpy.lab.probe --lab LAB --timeout 1 tcp:10.244.1.2:80 udp:10.244.1.2:80 icmp:10.244.1.3

prints one JSON list of booleans, in the order of the targets. TCP: the connect succeeds. UDP: the
datagram comes back (the pod server echoes). ICMP: one echo reply (`ping`). Every target runs on its
own thread, so a probe run costs one timeout, not one per target. Standard library only: one of
these processes starts for every source pod of a matrix.
"""

from __future__ import annotations

import argparse
import json
import socket
import subprocess
import sys
import threading

PAYLOAD = b"felixpy-lab-probe"


def probe_tcp(ip: str, port: int, timeout: float) -> bool:
    try:
        with socket.create_connection((ip, port), timeout=timeout):
            return True
    except OSError:
        return False


def probe_udp(ip: str, port: int, timeout: float) -> bool:
    family = socket.AF_INET6 if ":" in ip else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as sock:
        sock.settimeout(timeout)
        try:
            sock.connect((ip, port))
            sock.send(PAYLOAD)
            return sock.recv(2048) == PAYLOAD
        except OSError:  # timeout, or ICMP port unreachable (ConnectionRefused)
            return False


def probe_icmp(ip: str, timeout: float) -> bool:
    wait = max(1, round(timeout))  # ping's -W takes whole seconds on older iputils
    argv = ["ping", "-n", "-q", "-c", "1", "-W", str(wait), ip]
    try:
        return subprocess.run(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              timeout=wait + 2).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def probe(target: str, timeout: float) -> bool:
    proto, _, rest = target.partition(":")
    if proto == "icmp":
        return probe_icmp(rest, timeout)
    ip, _, port = rest.rpartition(":")
    if proto == "tcp":
        return probe_tcp(ip, int(port), timeout)
    if proto == "udp":
        return probe_udp(ip, int(port), timeout)
    raise ValueError(f"unknown probe target {target!r}")


def probe_all(targets: list[str], timeout: float) -> list[bool]:
    results = [False] * len(targets)

    def run(i: int) -> None:
        results[i] = probe(targets[i], timeout)

    threads = [threading.Thread(target=run, args=(i,), daemon=True) for i in range(len(targets))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout + 5)
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="felixpy.lab.probe")
    parser.add_argument("--lab", default="", help="only marks the process as the lab's")
    parser.add_argument("--timeout", type=float, default=1.0)
    parser.add_argument("targets", nargs="*", help="tcp:IP:PORT, udp:IP:PORT or icmp:IP (IPv4 or IPv6)")
    args = parser.parse_args(argv)
    print(json.dumps(probe_all(args.targets, args.timeout)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
