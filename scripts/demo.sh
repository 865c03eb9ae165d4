#!/usr/bin/env bash
# The demo: a 3-node felixpy cluster on this machine (network namespaces, a real etcd, one real
# agent per node), six pods plumbed by the real CNI plugin, and the proof that they reach each other.
set -euo pipefail
cd "$(dirname "$0")/.."
[ "$(id -u)" = 0 ] || { echo "demo: run as root (it creates network namespaces)" >&2; exit 1; }
./scripts/setup.sh
LAB=(--name "${LAB_NAME:-felixpy}")
lab() { .venv/bin/felixpy-lab "$@" "${LAB[@]}"; }

if [ -d "/run/felixpy-lab/${LAB_NAME:-felixpy}" ]; then
    echo "demo: lab ${LAB_NAME:-felixpy} is already up; '.venv/bin/felixpy-lab down' first" >&2
    exit 1
fi
lab up --nodes 3 --mode routes
lab ns add demo --labels team=blue
for node in n1 n2 n3; do
    for pod in a b; do
        lab pod add "demo/${node}-${pod}" --node "$node" --labels "app=${pod}" --serve tcp:80,udp:80
    done
done
echo
lab status
echo
echo "== every pod to every other pod: ICMP, TCP/80, UDP/80"
lab matrix --ports 80 --protos icmp,tcp,udp
echo
echo "== node n1's routes (proto 80 = felixpy's: pod /32s, its own blackholed block, the others' blocks)"
.venv/bin/felixpy-lab exec n1 "${LAB[@]}" -- ip route
echo
echo "The lab keeps running. Try: .venv/bin/felixpy-lab exec n1 -- felixctl ipam show --show-blocks"
echo "Tear it down with: .venv/bin/felixpy-lab down"
