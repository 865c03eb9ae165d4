"""One allocating process for the IPAM etcd tests: allocate like the CNI server, write a WEP each.

    ipam_worker.py ENDPOINT --node N --count C --prefix P [--pool NAME] [--hold-after K]

For every allocation it writes a WorkloadEndpoint with the address, as the CNI server would.
With --hold-after K it prints `HOLD <ip>` after the K-th allocation and sleeps *before* writing
that WorkloadEndpoint, so that the test can kill -9 it in the window a crashed CNI leaves a leak.
At the end it prints one JSON line: {"handles": {handle: ip}, "error": null | "message",
"seconds": elapsed}.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from felixpy.datastore import keys
from felixpy.datastore.etcd import EtcdDatastore
from felixpy.ipam.allocator import IPAM
from felixpy.ipam.errors import IPAMError


def write_wep(store: EtcdDatastore, name: str, node: str, ip: str) -> None:
    store.create(
        keys.resource_key("workloadendpoints", name, "default"),
        {
            "apiVersion": "projectcalico.org/v3",
            "kind": "WorkloadEndpoint",
            "metadata": {"name": name, "namespace": "default"},
            "spec": {"node": node, "pod": name, "ipNetworks": [f"{ip}/32"]},
        },
    )


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("endpoint")
    parser.add_argument("--node", required=True)
    parser.add_argument("--count", type=int, required=True)
    parser.add_argument("--prefix", required=True)
    parser.add_argument("--pool")
    parser.add_argument("--hold-after", type=int, default=0)
    args = parser.parse_args()

    store = EtcdDatastore([args.endpoint])
    ipam = IPAM(store)
    handles: dict[str, str] = {}
    error = None
    start = time.monotonic()
    for i in range(args.count):
        name = f"{args.prefix}-{i}"
        handle = f"k8s-pod-network.{name}"
        try:
            (ip,) = ipam.auto_assign(
                handle=handle,
                attrs={"node": args.node, "namespace": "default", "pod": name},
                node=args.node,
                pools=[args.pool] if args.pool else None,
            )
        except IPAMError as err:
            error = str(err)
            break
        if args.hold_after and i + 1 == args.hold_after:
            print(f"HOLD {ip}", flush=True)
            time.sleep(3600)
        write_wep(store, name, args.node, str(ip))
        handles[handle] = str(ip)
    print(json.dumps({"handles": handles, "error": error, "seconds": time.monotonic() - start}), flush=True)
    store.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
