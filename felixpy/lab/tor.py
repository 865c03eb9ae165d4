"""The fabric's top-of-rack router: FRR's bgpd in the lab's fabric namespace (`felixpy-lab tor up`).

On-prem clusters peer their nodes with the rack's switch; here the fabric namespace (the bridge
every node hangs off, 192.0.2.1) plays that switch with a real BGP daemon, FRR 8: it accepts a
session from every node (`bgp listen range` over the node subnet, so nodes added later peer too),
originates the prefixes it is given, and learns what the nodes announce — pod blocks, Service
addresses, communities. bgpd runs without zebra: the fabric's kernel is not programmed, the
check is what the router learns (`felixpy-lab tor routes`).

The nodes peer with it through an ordinary global BGPPeer named `tor` (written by `tor up`, unless
`--no-peer`), which users may replace (e.g. to attach BGPFilters).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from typing import Any

from felixpy.lab import procs, topology
from felixpy.lab.topology import LabUsageError

BGPD = "/usr/lib/frr/bgpd"
PEER_NAME = "tor"
NODE_AS = 64512


def tor_dir(lab: str) -> str:
    return f"{topology.run_dir(lab)}/tor"


def frr_config(asn: int, originate: list[str], cross_subnet: bool) -> str:
    remote = "internal" if asn == NODE_AS else "external"
    lines = [
        "hostname tor",
        "log stdout informational",
        f"router bgp {asn}",
        f" bgp router-id {topology.FABRIC_IP}",
        " no bgp ebgp-requires-policy",
        " no bgp network import-check",
        " bgp bestpath as-path multipath-relax",
        " neighbor nodes peer-group",
        f" neighbor nodes remote-as {remote}",
        f" bgp listen range {topology.FABRIC_SUBNET} peer-group nodes",
    ]
    if cross_subnet:
        # Nodes on the second subnet reach 192.0.2.1 through this very namespace: one hop more.
        lines += [f" bgp listen range {topology.FABRIC_B_SUBNET} peer-group nodes",
                  " neighbor nodes ebgp-multihop 2" if remote == "external" else ""]
    lines += [" address-family ipv4 unicast", "  neighbor nodes activate",
              "  maximum-paths 16", "  maximum-paths ibgp 16"]
    lines += [f"  network {prefix}" for prefix in originate]
    lines += [" exit-address-family", ""]
    return "\n".join(line for line in lines if line != "") + "\n"


def start(lab: str, asn: int, originate: list[str], cross_subnet: bool) -> int:
    if not (os.path.exists(BGPD) and shutil.which("vtysh")):
        raise procs.LabCommandError((BGPD,), 127, "FRR is not installed (apt-get install frr)")
    d = tor_dir(lab)
    os.makedirs(d, exist_ok=True)
    with open(f"{d}/frr.conf", "w") as f:
        f.write(frr_config(asn, originate, cross_subnet))
    # -Z: no zebra (the fabric's kernel stays as it is); -n: no VRF netns; -S: no kernel routes.
    argv = [BGPD, "-Z", "-n", "-S", "-f", f"{d}/frr.conf", "-i", f"{d}/bgpd.pid", "--vty_socket", d,
            "-P", "0", "-l", topology.FABRIC_IP]
    return procs.spawn_in_fabric(lab, argv, f"{d}/bgpd.log")


def vtysh(lab: str, command: str) -> str:
    done = subprocess.run(["vtysh", "--vty_socket", tor_dir(lab), "-c", command], capture_output=True, text=True,
                          timeout=20)
    if done.returncode != 0:
        raise LabUsageError(f"the ToR's bgpd did not answer: {(done.stderr or done.stdout).strip()[:200]}")
    return done.stdout


def _json(lab: str, command: str) -> Any:
    try:
        return json.loads(vtysh(lab, command))
    except ValueError:
        raise LabUsageError(f"the ToR's bgpd answered something that is not JSON to {command!r}") from None


def sessions(lab: str) -> dict[str, str]:
    """Node address → BGP state, as the ToR sees them."""
    summary = _json(lab, "show bgp ipv4 unicast summary json")
    peers = (summary.get("ipv4Unicast") or summary).get("peers") or {}
    return {address: str(info.get("state", "")) for address, info in peers.items()}


def routes(lab: str) -> dict[str, list[dict[str, Any]]]:
    """Every path the ToR has: prefix → [{nextHop, asPath, communities, largeCommunities, best}]."""
    table = _json(lab, "show bgp ipv4 unicast json").get("routes") or {}
    out: dict[str, list[dict[str, Any]]] = {}
    for prefix in sorted(table):
        detail = _json(lab, f"show bgp ipv4 unicast {prefix} json").get("paths") or []
        paths = []
        for path in detail:
            hops = [h.get("ip") for h in path.get("nexthops") or [] if h.get("ip")]
            paths.append({
                "nextHop": hops[0] if hops else "",
                "asPath": (path.get("aspath") or {}).get("string", ""),
                "communities": ((path.get("community") or {}).get("string") or "").split(),
                "largeCommunities": ((path.get("largeCommunity") or {}).get("string") or "").split(),
                "best": bool((path.get("bestpath") or {}).get("overall")),
            })
        out[prefix] = paths
    return out
