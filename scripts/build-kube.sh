#!/usr/bin/env bash
# Builds a real Kubernetes control plane for the tests and the lab from Go modules (no prebuilt
# binaries exist on this machine's network): kube-apiserver and kube-controller-manager from
# k8s.io/kubernetes, and etcd from go.etcd.io/etcd/server/v3.
#
# etcd: Debian's 3.4 is below the API server's minimum (kubeadm 1.37: MinExternalEtcdVersion
# 3.5.24), and Kubernetes 1.37 is built against the etcd v3.7 client and tested (hack/lib/etcd.sh)
# and deployed (kubeadm's DefaultEtcdVersion) with an etcd 3.7 server, so that is what we build.
#
# k8s.io/kubernetes's go.mod points every staging module (k8s.io/api, k8s.io/apiserver, ...) at
# ./staging/src/..., which Go ignores when the module is a dependency; a small wrapper module of
# ours requires k8s.io/kubernetes and pins each of those to its published v0.X.Y tag. The list
# is read from the downloaded go.mod, never written by hand.
#
# Binaries and the wrapper modules live outside the repository, in $FELIXPY_KUBE_DIR (default
# /var/cache/felixpy/kube); Go's build cache is kept, so a warm rebuild is quick, and a run with
# the binaries present at the wanted versions does nothing at all. Go's own chatter (hundreds of
# "go: downloading" lines) goes to $FELIXPY_KUBE_DIR/build.log and is shown only on failure.
set -euo pipefail

KUBE_VERSION=${FELIXPY_KUBE_VERSION:-v1.37.2}
ETCD_VERSION=${FELIXPY_ETCD_VERSION:-v3.7.3}
DIR=${FELIXPY_KUBE_DIR:-/var/cache/felixpy/kube}
BIN=$DIR/bin
LOG=$DIR/build.log

# One stamp per part, so bumping one version rebuilds only that part.
up_to_date() {  # stamp-file wanted binary...
    local stamp=$1 wanted=$2
    shift 2
    [ -f "$BIN/$stamp" ] && [ "$(cat "$BIN/$stamp")" = "$wanted" ] || return 1
    for b in "$@"; do [ -x "$BIN/$b" ] || return 1; done
}
kube_ok() { up_to_date .kube-version "$KUBE_VERSION" kube-apiserver kube-controller-manager; }
etcd_ok() { up_to_date .etcd-version "$ETCD_VERSION" etcd; }

if kube_ok && etcd_ok; then
    echo "build-kube: up to date (kubernetes $KUBE_VERSION, etcd $ETCD_VERSION in $BIN)"
    exit 0
fi
command -v go >/dev/null || { echo "build-kube: needs Go (the go command is not on PATH)" >&2; exit 1; }

export GOFLAGS=-mod=mod
export CGO_ENABLED=0
export GOTOOLCHAIN=local  # never fetch another toolchain: the one installed builds these
started=$SECONDS
mkdir -p "$DIR/kube-src" "$DIR/etcd-src" "$BIN"
: > "$LOG"

quietly() {  # run a go command with its output in the log; show the log's tail if it fails
    if ! "$@" >>"$LOG" 2>&1; then
        echo "build-kube: failed: $* (last lines of $LOG):" >&2
        tail -n 30 "$LOG" >&2
        exit 1
    fi
}

# --- kube-apiserver and kube-controller-manager -------------------------------------------
if ! kube_ok; then
    part_started=$SECONDS
    cd "$DIR/kube-src"
    staging_version="v0.${KUBE_VERSION#v1.}"
    gomod=$(go mod download -json "k8s.io/kubernetes@$KUBE_VERSION" 2>>"$LOG" |
            sed -n 's/^[[:space:]]*"GoMod": "\(.*\)",\{0,1\}$/\1/p')
    [ -f "$gomod" ] || { echo "build-kube: could not download k8s.io/kubernetes@$KUBE_VERSION (see $LOG)" >&2; exit 1; }
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
    echo "build-kube: kubernetes $KUBE_VERSION ($(echo "$staging" | wc -l) staging modules pinned to $staging_version)"
    quietly go mod tidy
    minor=$(echo "$KUBE_VERSION" | cut -d. -f2)
    ldflags="-s -w -X k8s.io/component-base/version.gitVersion=$KUBE_VERSION"
    ldflags+=" -X k8s.io/component-base/version.gitMajor=1 -X k8s.io/component-base/version.gitMinor=$minor"
    for cmd in kube-apiserver kube-controller-manager; do
        echo "build-kube: building $cmd"
        quietly go build -trimpath -ldflags "$ldflags" -o "$BIN/$cmd.new" "k8s.io/kubernetes/cmd/$cmd"
        mv "$BIN/$cmd.new" "$BIN/$cmd"
    done
    echo "$KUBE_VERSION" > "$BIN/.kube-version"
    echo "build-kube: kubernetes built in $((SECONDS - part_started)) s"
fi

# --- etcd ----------------------------------------------------------------------------------
if ! etcd_ok; then
    part_started=$SECONDS
    cd "$DIR/etcd-src"
    rm -f go.sum
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
    quietly go mod tidy
    quietly go build -trimpath -ldflags "-s -w" -o "$BIN/etcd.new" .
    mv "$BIN/etcd.new" "$BIN/etcd"
    echo "$ETCD_VERSION" > "$BIN/.etcd-version"
    echo "build-kube: etcd built in $((SECONDS - part_started)) s"
fi

rm -f "$BIN/VERSION"  # the single stamp of earlier versions of this script
sizes=$(cd "$BIN" && du -m kube-apiserver kube-controller-manager etcd | awk '{printf "%s%s %s MB", sep, $2, $1; sep=", "}')
echo "build-kube: done in $((SECONDS - started)) s ($sizes) in $BIN"
