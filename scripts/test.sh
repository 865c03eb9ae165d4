#!/usr/bin/env bash
# The test suite: unit tests (no root needed), integration and e2e tests (root: network namespaces,
# iptables, a real etcd, whole felixpy-lab clusters), and the IPIP-marked tests (tests/ipip), which
# need the ipip kernel module this host kernel lacks: they run for real in one boot of
# ../shared/tools/ipip-vm.sh (Debian's stock kernel under qemu) when that tool is beside the clone,
# as in CI. The exit code is non-zero when either run fails.
#
# Layout (docs/testing.md): pytest-xdist runs two workers (`-n 2 --dist loadscope`); each test
# module is one work unit, so an e2e module's lab starts once and its tests keep their order.
# Each worker has its own session etcd and control plane. The IPIP VM boots at the same time (at
# normal priority: niced, it starved to 558 s on a loaded machine, near its 600 s bound).
# Arguments go to the main pytest run and come after the defaults, so `-n 0` runs it serially.
set -uo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || ./scripts/setup.sh

IPIP_VM=../shared/tools/ipip-vm.sh
ipip_pid=""
ipip_log=$(mktemp /tmp/felixpy-ipip.XXXXXX)
trap 'rm -f "$ipip_log"' EXIT
if [ -x "$IPIP_VM" ]; then
    (
        started=$SECONDS
        # --setup is idempotent (installs qemu and caches the kernel once); one VM boot runs them all.
        "$IPIP_VM" --setup &&
            "$IPIP_VM" -t 600 .venv/bin/python -m pytest -q -p no:cacheprovider tests/ipip
        ipip_rc=$?
        echo "IPIP tests in the ipip VM: exit $ipip_rc in $((SECONDS - started)) s"
        exit $ipip_rc
    ) >"$ipip_log" 2>&1 &
    ipip_pid=$!
fi

started=$SECONDS
# pytest exits 5 when it collected nothing; that is a failure of the suite here, not a pass.
.venv/bin/python -m pytest -q -p no:cacheprovider -n 2 --dist loadscope "$@" tests
rc=$?
echo "main run (unit, integration, e2e): exit $rc in $((SECONDS - started)) s"

if [ -n "$ipip_pid" ]; then
    wait "$ipip_pid"
    ipip_rc=$?
    cat "$ipip_log"
    [ "$rc" -ne 0 ] || rc=$ipip_rc
else
    echo "IPIP tests skipped: $IPIP_VM not found (this kernel has no ipip module; the VM tool runs them)"
fi
exit $rc
