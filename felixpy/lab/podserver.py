"""The lab's pod server: accepts TCP connections and echoes UDP datagrams on the given ports.

Runs inside a pod's network namespace, one process per pod:

    python -m felixpy.lab.podserver --lab LAB --pod NS/POD tcp:80 udp:80 ...

`--lab` and `--pod` are not used by the server; they put the lab's name in the process's argv so
that `felixpy-lab down` and people reading `ps` can tell whose server it is. Standard library only.
"""

from __future__ import annotations

import argparse
import os
import selectors
import socket
import sys


def _open(spec: str) -> socket.socket:
    proto, _, port = spec.partition(":")
    kind = socket.SOCK_STREAM if proto == "tcp" else socket.SOCK_DGRAM
    try:
        # One dual-stack socket serves the pod's IPv4 and IPv6 addresses alike.
        sock = socket.socket(socket.AF_INET6, kind)
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        address: tuple[str, int] = ("::", int(port))
    except OSError:  # a pod netns without IPv6
        sock = socket.socket(socket.AF_INET, kind)
        address = ("0.0.0.0", int(port))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(address)
    if kind == socket.SOCK_STREAM:
        sock.listen(128)
    sock.setblocking(False)
    return sock


def serve(specs: list[str]) -> None:
    sel = selectors.DefaultSelector()
    for spec in specs:
        sock = _open(spec)
        sel.register(sock, selectors.EVENT_READ, sock.type)
    # Every port is bound: tell the lab (which reads one line from our stdout), then let go of it.
    print("ready", flush=True)
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    while True:
        for key, _ in sel.select():
            ready = key.fileobj
            assert isinstance(ready, socket.socket)
            try:
                if key.data == socket.SOCK_STREAM:
                    # A probe only needs the handshake; close at once so no connection lingers.
                    conn, _ = ready.accept()
                    conn.close()
                else:
                    data, peer = ready.recvfrom(2048)
                    ready.sendto(data, peer)
            except OSError:
                continue


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="felixpy.lab.podserver")
    parser.add_argument("--lab", required=True)
    parser.add_argument("--pod", required=True)
    parser.add_argument("ports", nargs="+", help="tcp:PORT or udp:PORT")
    args = parser.parse_args(argv)
    try:
        serve(args.ports)
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
