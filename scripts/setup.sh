#!/usr/bin/env bash
# Installs felixpy's system packages (Debian), a virtualenv with the project, and the real
# Kubernetes control plane the tests and `felixpy-lab up --datastore kubernetes` run
# (scripts/build-kube.sh: built from Go modules, cached outside the repository), idempotently.
set -euo pipefail
cd "$(dirname "$0")/.."

# prometheus: only for promtool, which checks and unit-tests deploy/alerts.yaml.
APT_PACKAGES=(etcd-server etcd-client iptables ipset iproute2 iputils-ping conntrack
              containernetworking-plugins procps gcc make libc6-dev bird2 frr gobgpd openssl prometheus)

missing=()
for pkg in "${APT_PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "ok installed" || missing+=("$pkg")
done
if [ "${#missing[@]}" -gt 0 ]; then
    echo "setup: installing ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
# etcd-server's package starts a system etcd on :2379; felixpy starts its own, so stop that one.
if command -v systemctl >/dev/null 2>&1 && systemctl is-active --quiet etcd 2>/dev/null; then
    systemctl stop etcd || true
fi
# Likewise the Prometheus server the prometheus package starts: we only want promtool.
if command -v systemctl >/dev/null 2>&1 && systemctl is-active --quiet prometheus 2>/dev/null; then
    systemctl stop prometheus || true
fi

if [ ! -x .venv/bin/python ]; then
    python3 -m venv .venv
fi
.venv/bin/pip install -q --disable-pip-version-check -e '.[test]' 2>&1 | grep -v '^WARNING: Location' || true
.venv/bin/python -c 'import felixpy, etcd3, pyroute2, yaml' >/dev/null
./scripts/build-kube.sh
echo "setup: ok ($(.venv/bin/python --version), etcd $(etcd --version | head -1 | awk '{print $3}'))"
