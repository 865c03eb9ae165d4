#!/usr/bin/env bash
# The test suite: unit tests (no root needed), then integration and e2e tests (root: network
# namespaces, iptables, a real etcd, a whole felixpy-lab cluster).
set -uo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || ./scripts/setup.sh
.venv/bin/python -m pytest -q -p no:cacheprovider "$@" tests
rc=$?
# pytest exits 5 when it collected nothing; that is a failure of the suite here, not a pass.
exit $rc
