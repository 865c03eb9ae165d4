#!/usr/bin/env bash
# Builds a real Kubernetes control plane for the tests and the lab from Go modules (no prebuilt
# binaries exist on this machine's network): kube-apiserver and kube-controller-manager from
# k8s.io/kubernetes, and etcd from go.etcd.io/etcd/server/v3 (Debian's etcd 3.4 is older than
# the API server supports).
#
# k8s.io/kubernetes's go.mod points every staging module (k8s.io/api, k8s.io/apiserver, ...) at
# ./staging/src/..., which Go ignores when the module is a dependency; a small wrapper module of
# ours requires k8s.io/kubernetes and pins each of those to its published v0.X.Y tag. The list
# is read from the downloaded go.mod, never written by hand.
#
# Binaries and the wrapper module live outside the repository, in $FELIXPY_KUBE_DIR
# (default /var/cache/felixpy/kube); Go's build cache is kept, so a warm rebuild is quick and a
# run with all binaries present at the right versions does nothing at all.
set -euo pipefail

KUBE_VERSION=${FELIXPY_KUBE_VERSION:-v1.37.2}
ETCD_VERSION=${FELIXPY_ETCD_VERSION:-v3.6.16}
DIR=${FELIXPY_KUBE_DIR:-/var/cache/felixpy/kube}
BIN=$DIR/bin
STAMP="kubernetes $KUBE_VERSION etcd $ETCD_VERSION"

if [ -f "$BIN/VERSION" ] && [ "$(cat "$BIN/VERSION")" = "$STAMP" ] &&
   [ -x "$BIN/kube-apiserver" ] && [ -x "$BIN/kube-controller-manager" ] && [ -x "$BIN/etcd" ]; then
    echo "build-kube: up to date ($STAMP in $BIN)"
    exit 0
fi
command -v go >/dev/null || { echo "build-kube: needs Go (the go command is not on PATH)" >&2; exit 1; }

export GOFLAGS=-mod=mod
export CGO_ENABLED=0
started=$SECONDS
mkdir -p "$DIR/kube-src" "$DIR/etcd-src" "$BIN"

# --- kube-apiserver and kube-controller-manager -------------------------------------------
cd "$DIR/kube-src"
staging_version="v0.${KUBE_VERSION#v1.}"
gomod=$(go mod download -json "k8s.io/kubernetes@$KUBE_VERSION" |
        sed -n 's/^[[:space:]]*"GoMod": "\(.*\)",\{0,1\}$/\1/p')
[ -f "$gomod" ] || { echo "build-kube: could not download k8s.io/kubernetes@$KUBE_VERSION" >&2; exit 1; }
staging=$(sed -n 's#^[[:space:]]*\(k8s\.io/[a-z0-9.-]*\) => \./staging/.*#\1#p' "$gomod")
[ -n "$staging" ] || { echo "build-kube: no staging replacements found in $gomod" >&2; exit 1; }
go_directive=$(sed -n 's/^go \([0-9.]*\)$/\1/p' "$gomod")
{
    echo "module felixpy.local/kube"
    echo
    echo "go $go_directive"
    echo
    echo "require k8s.io/kubernetes $KUBE_VERSION"
    echo
    for module in $staging; do
        echo "replace $module => $module $staging_version"
    done
} > go.mod
cat > tools.go <<'EOF'
//go:build tools

// Package tools pins the control-plane commands this module builds.
package tools

import (
	_ "k8s.io/kubernetes/cmd/kube-apiserver"
	_ "k8s.io/kubernetes/cmd/kube-controller-manager"
)
EOF
echo "build-kube: resolving k8s.io/kubernetes $KUBE_VERSION ($(echo "$staging" | wc -l) staging modules at $staging_version)"
go mod tidy >/dev/null
ldflags="-s -w -X k8s.io/component-base/version.gitVersion=$KUBE_VERSION -X k8s.io/component-base/version.gitMajor=1 -X k8s.io/component-base/version.gitMinor=$(echo "$KUBE_VERSION" | cut -d. -f2)"
for cmd in kube-apiserver kube-controller-manager; do
    echo "build-kube: building $cmd"
    go build -trimpath -ldflags "$ldflags" -o "$BIN/$cmd.new" "k8s.io/kubernetes/cmd/$cmd"
    mv "$BIN/$cmd.new" "$BIN/$cmd"
done

# --- etcd ----------------------------------------------------------------------------------
cd "$DIR/etcd-src"
cat > go.mod <<EOF
module felixpy.local/etcd

go 1.24

require go.etcd.io/etcd/server/v3 $ETCD_VERSION
EOF
cat > main.go <<'EOF'
// Command etcd is etcd's own server entry point, built from its Go module.
package main

import (
	"os"

	"go.etcd.io/etcd/server/v3/etcdmain"
)

func main() { etcdmain.Main(os.Args) }
EOF
echo "build-kube: building etcd $ETCD_VERSION"
go mod tidy >/dev/null
go build -trimpath -ldflags "-s -w" -o "$BIN/etcd.new" .
mv "$BIN/etcd.new" "$BIN/etcd"

echo "$STAMP" > "$BIN/VERSION"
echo "build-kube: done in $((SECONDS - started)) s: $(du -sh "$BIN" | cut -f1) in $BIN"
ls -la "$BIN"
