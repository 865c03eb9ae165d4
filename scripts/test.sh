#!/usr/bin/env bash
# The test suite: unit tests (no root needed), then integration and e2e tests (root: network
# namespaces, iptables, a real etcd, a whole felixpy-lab cluster). Then the IPIP-marked tests
# (tests/ipip), which need the ipip kernel module this host kernel lacks: they run for real in one
# boot of ../shared/tools/ipip-vm.sh (Debian's stock kernel under qemu) when that tool is beside
# the clone, as in CI. The exit code is non-zero when either run fails.
set -uo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || ./scripts/setup.sh
.venv/bin/python -m pytest -q -p no:cacheprovider "$@" tests
rc=$?
# pytest exits 5 when it collected nothing; that is a failure of the suite here, not a pass.

IPIP_VM=../shared/tools/ipip-vm.sh
if [ -x "$IPIP_VM" ]; then
    started=$SECONDS
    # --setup is idempotent (installs qemu and caches the kernel once); one VM boot runs them all.
    "$IPIP_VM" --setup && "$IPIP_VM" -t 600 .venv/bin/python -m pytest -q -p no:cacheprovider tests/ipip
    ipip_rc=$?
    echo "IPIP tests in the ipip VM: exit $ipip_rc in $((SECONDS - started)) s"
    [ "$rc" -ne 0 ] || rc=$ipip_rc
else
    echo "IPIP tests skipped: $IPIP_VM not found (this kernel has no ipip module; the VM tool runs them)"
fi
exit $rc
