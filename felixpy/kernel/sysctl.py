"""Read and write kernel sysctls through /proc/sys, in the network namespace of the calling thread.

/proc/sys/net resolves against the network namespace of the thread that opens the file, so a
write from the agent's ordinary threads lands in the node's namespace. Keys use either dots
("net.ipv4.ip_forward") or slashes ("net/ipv4/conf/vxlan.calico/rp_filter"); use slashes (or the
helpers below) when a component, like an interface name, contains a dot.
"""

from __future__ import annotations

import logging
import os

__all__ = ["SysctlError", "iface_conf", "iface_neigh", "path_of", "read", "write"]

log = logging.getLogger(__name__)

PROC_SYS = "/proc/sys"


class SysctlError(Exception):
    """A sysctl could not be read or written; the message names the key and the value."""


def iface_conf(iface: str, setting: str) -> str:
    """Key of net.ipv4.conf.<iface>.<setting>, safe for interface names containing dots."""
    return f"net/ipv4/conf/{iface}/{setting}"


def iface_conf6(iface: str, setting: str) -> str:
    """Key of net.ipv6.conf.<iface>.<setting>."""
    return f"net/ipv6/conf/{iface}/{setting}"


def iface_neigh(iface: str, setting: str) -> str:
    """Key of net.ipv4.neigh.<iface>.<setting>."""
    return f"net/ipv4/neigh/{iface}/{setting}"


def path_of(key: str) -> str:
    relative = key if "/" in key else key.replace(".", "/")
    return os.path.join(PROC_SYS, relative.lstrip("/"))


def write(key: str, value: str | int) -> None:
    text = str(value)
    try:
        # os.write on an O_WRONLY fd: one syscall, no buffering, no read-modify-write.
        fd = os.open(path_of(key), os.O_WRONLY | os.O_CLOEXEC)
        try:
            os.write(fd, text.encode())
        finally:
            os.close(fd)
    except OSError as exc:
        raise SysctlError(f"sysctl {key}={text}: {exc.strerror}") from None
    log.debug("sysctl set key=%s value=%s", key, text)


def read(key: str) -> str:
    try:
        with open(path_of(key), encoding="ascii") as f:
            return f.read().strip()
    except OSError as exc:
        raise SysctlError(f"sysctl {key}: {exc.strerror}") from None
