#!/usr/bin/env bash
# The demo: a 3-node felixpy cluster on this machine (network namespaces, a real etcd, one real
# agent and one ExaBGP speaker per node), six pods plumbed by the real CNI plugin, the proof that
# they reach each other over BGP-learned routes, and a NetworkPolicy taking effect.
set -euo pipefail
cd "$(dirname "$0")/.."
[ "$(id -u)" = 0 ] || { echo "demo: run as root (it creates network namespaces)" >&2; exit 1; }
./scripts/setup.sh
NAME="${LAB_NAME:-felixpy}"
lab() { .venv/bin/felixpy-lab "$@" --name "$NAME"; }

if [ -d "/run/felixpy-lab/$NAME" ]; then
    echo "demo: lab $NAME is already up; '.venv/bin/felixpy-lab down --name $NAME' first" >&2
    exit 1
fi
lab up --nodes 3 --mode "${LAB_MODE:-bgp}"
lab ns add demo --labels team=blue
for node in n1 n2 n3; do
    for pod in a b; do
        lab pod add "demo/${node}-${pod}" --node "$node" --labels "app=${pod}" --serve tcp:80,udp:80
    done
done
echo
lab status
echo
echo "== node n1's BGP sessions and routes (proto 80 = felixpy's)"
.venv/bin/felixpy-lab exec n1 --name "$NAME" -- felixctl node status || true
.venv/bin/felixpy-lab exec n1 --name "$NAME" -- ip route
echo
echo "== every pod to every other pod: ICMP, TCP/80, UDP/80"
lab matrix --ports 80 --protos icmp,tcp,udp
echo
echo "== a Kubernetes NetworkPolicy: pods labelled app=b accept TCP/80 only from app=a"
policy=$(mktemp --suffix=.yaml)
cat > "$policy" <<'YAML'
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: b-from-a, namespace: demo}
spec:
  podSelector: {matchLabels: {app: b}}
  ingress:
  - from: [{podSelector: {matchLabels: {app: a}}}]
    ports: [{protocol: TCP, port: 80}]
YAML
lab apply -f "$policy"
rm -f "$policy"
sleep 1
lab matrix --ports 80 --protos tcp
.venv/bin/felixpy-lab exec n1 --name "$NAME" -- felixctl policy explain demo/n1-b demo/n2-b --port 80 || true
echo
echo "The lab keeps running. Try: .venv/bin/felixpy-lab exec n1 --name $NAME -- felixctl ipam show --show-blocks"
echo "Tear it down with: .venv/bin/felixpy-lab down --name $NAME"
