#!/usr/bin/env bash
# Build the node's binaries (kubelet, kube-proxy, kube-scheduler, containerd
# with its runc shim and ctr, and the pause program) from the Go module proxy
# and the k8s.io/kubernetes module's own pause.c, and cache them outside the
# repo next to the control plane's (build-binaries.sh), keyed by version.
#
# A separate script from build-binaries.sh so that its cache key, and a build
# of it in progress, stay as they are: the node is opt-in, the control plane
# is not. The kubernetes build uses the same wrapper module (see there).
#
# runc, the CNI plugins, iptables and conntrack come from Debian
# (hack/system-packages.sh); containerd is built because Debian's 1.6 lacks
# the CRI RuntimeConfig call that kubelet 1.37 will require.
#
# Usage: build-node-binaries.sh [--check] [DEST]   (default DEST: $SIDEKEY_BIN_CACHE or
#        ~/.cache/sidekey/bin/node_k8s-<ver>_containerd-<ver>)
# --check only prints DEST if every binary is already there (exit 3 if not).
set -euo pipefail

K8S_VERSION="${SIDEKEY_K8S_VERSION:-v1.36.3}"
CONTAINERD_VERSION="${SIDEKEY_CONTAINERD_VERSION:-v2.4.2}"
BINARIES=(kubelet kube-proxy kube-scheduler containerd containerd-shim-runc-v2 ctr pause)

export GOTOOLCHAIN=local GOFLAGS=-buildvcs=false CGO_ENABLED=0

check=0
if [ "${1:-}" = "--check" ]; then check=1; shift; fi

key="node_k8s-${K8S_VERSION}_containerd-${CONTAINERD_VERSION}"
dest="${1:-${SIDEKEY_BIN_CACHE:-$HOME/.cache/sidekey/bin}/$key}"
if [ "$check" = 1 ]; then
  for b in "${BINARIES[@]}"; do [ -x "$dest/$b" ] || exit 3; done
  echo "$dest"; exit 0
fi
mkdir -p "$dest"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

log() { printf '[build-node-binaries] %s %s\n' "$(date -u +%T)" "$*" >&2; }

need() {
  for b in "$@"; do [ -x "$dest/$b" ] || return 0; done
  return 1
}

# shellcheck source=k8s-module.sh
source "$(dirname "${BASH_SOURCE[0]}")/k8s-module.sh"

if need kubelet kube-proxy kube-scheduler pause; then
  log "kubernetes $K8S_VERSION: resolving staging modules"
  mkdir -p "$work/k8s" && cd "$work/k8s"
  k8s_module k8snodebuild kube-proxy kube-scheduler kubelet
  for cmd in kubelet kube-proxy kube-scheduler; do
    [ -x "$dest/$cmd" ] && continue
    log "building $cmd"
    go build -trimpath -ldflags "-s -w $k8s_ld" -o "$dest/$cmd.tmp" "k8s.io/kubernetes/cmd/$cmd"
    mv "$dest/$cmd.tmp" "$dest/$cmd"
  done
  if [ ! -x "$dest/pause" ]; then
    # The sandbox's init: the same C file the registry.k8s.io/pause image holds.
    log "building pause from $k8s_src/build/pause/linux/pause.c"
    pause_version="$(sed -n 's/^TAG ?= *//p' "$k8s_src/build/pause/Makefile")"
    gcc -Os -Wall -Werror -static -DVERSION="v${pause_version:-3.10}-sidekey" \
      -o "$dest/pause.tmp" "$k8s_src/build/pause/linux/pause.c"
    strip "$dest/pause.tmp"
    mv "$dest/pause.tmp" "$dest/pause"
  fi
fi

if need containerd containerd-shim-runc-v2 ctr; then
  log "containerd $CONTAINERD_VERSION"
  mkdir -p "$work/containerd" && cd "$work/containerd"
  printf 'module sidekey.local/containerdbuild\n\ngo 1.24.0\n\nrequire github.com/containerd/containerd/v2 %s\n' "$CONTAINERD_VERSION" > go.mod
  cat > tools.go <<GO
//go:build tools

package tools

import (
	_ "github.com/containerd/containerd/v2/cmd/containerd"
	_ "github.com/containerd/containerd/v2/cmd/containerd-shim-runc-v2"
	_ "github.com/containerd/containerd/v2/cmd/ctr"
)
GO
  go mod tidy >/dev/null 2>"$work/tidy.err" || { cat "$work/tidy.err" >&2; exit 1; }
  tags="no_btrfs no_devmapper no_zfs no_aufs no_dynamic_plugins"
  ld="-s -w -X github.com/containerd/containerd/v2/version.Version=$CONTAINERD_VERSION -X github.com/containerd/containerd/v2/version.Revision=sidekey"
  for cmd in containerd containerd-shim-runc-v2 ctr; do
    [ -x "$dest/$cmd" ] && continue
    log "building $cmd"
    go build -trimpath -tags "$tags" -ldflags "$ld" -o "$dest/$cmd.tmp" "github.com/containerd/containerd/v2/cmd/$cmd"
    mv "$dest/$cmd.tmp" "$dest/$cmd"
  done
fi

log "done"
echo "$dest"
