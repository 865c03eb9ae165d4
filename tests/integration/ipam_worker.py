"""One allocating process for the IPAM etcd tests: allocate like the CNI server, write a WEP each.

    ipam_worker.py ENDPOINT --node N --count C --prefix P [--pool NAME] [--hold-after K] [--namespace NS]

ENDPOINT is an etcd URL, or kubeconfig:PATH for the Kubernetes datastore (there the Pods
<prefix>-<i> must exist in NS, bound to the node: a WorkloadEndpoint is their CNI annotations).
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

from typing import Any

from felixpy import names
from felixpy.datastore import keys
from felixpy.ipam.allocator import IPAM
from felixpy.ipam.errors import IPAMError


def write_wep(store: Any, name: str, node: str, ip: str, namespace: str, kube: bool) -> None:
    wep = name
    if kube:
        wep = names.workload_endpoint_name(node, name)
    store.create(
        keys.resource_key("workloadendpoints", wep, namespace),
        {
            "apiVersion": "projectcalico.org/v3",
            "kind": "WorkloadEndpoint",
            "metadata": {"name": wep, "namespace": namespace},
            "spec": {"node": node, "pod": name, "ipNetworks": [f"{ip}/32"]},
        },
    )


def open_store(endpoint: str) -> Any:
    if endpoint.startswith("kubeconfig:"):
        from felixpy.datastore.kube import KubeDatastore, load_settings

        return KubeDatastore(load_settings(kubeconfig=endpoint.split(":", 1)[1]))
    from felixpy.datastore.etcd import EtcdDatastore

    return EtcdDatastore([endpoint])


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("endpoint")
    parser.add_argument("--node", required=True)
    parser.add_argument("--count", type=int, required=True)
    parser.add_argument("--prefix", required=True)
    parser.add_argument("--pool")
    parser.add_argument("--hold-after", type=int, default=0)
    parser.add_argument("--namespace", default="default")
    args = parser.parse_args()

    store = open_store(args.endpoint)
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
                attrs={"node": args.node, "namespace": args.namespace, "pod": name},
                node=args.node,
                pools=[args.pool] if args.pool else None,
            )
        except IPAMError as err:
            error = str(err)
            break
        if args.hold_after and i + 1 == args.hold_after:
            print(f"HOLD {ip}", flush=True)
            time.sleep(3600)
        write_wep(store, name, args.node, str(ip), args.namespace, args.endpoint.startswith("kubeconfig:"))
        handles[handle] = str(ip)
    print(json.dumps({"handles": handles, "error": error, "seconds": time.monotonic() - start}), flush=True)
    store.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
