#!/usr/bin/env bash
# Build the control-plane binaries the tests need (kube-apiserver,
# kube-controller-manager, kubectl, etcd, helm) from the Go module proxy with the
# machine's own Go toolchain, and cache them outside the repo.
#
# The kubernetes commands build in a wrapper module (k8s-module.sh says why).
#
# Usage: build-binaries.sh [--check] [DEST]   (default DEST: $SIDEKEY_BIN_CACHE or
#        ~/.cache/sidekey/bin/k8s-<ver>_etcd-<ver>_helm-<ver>)
# --check only prints DEST if every binary is already there (exit 3 if not).
set -euo pipefail

K8S_VERSION="${SIDEKEY_K8S_VERSION:-v1.36.3}"
ETCD_VERSION="${SIDEKEY_ETCD_VERSION:-v3.6.16}"
HELM_VERSION="${SIDEKEY_HELM_VERSION:-v3.22.0}"

export GOTOOLCHAIN=local GOFLAGS=-buildvcs=false CGO_ENABLED=0

check=0
if [ "${1:-}" = "--check" ]; then check=1; shift; fi

key="k8s-${K8S_VERSION}_etcd-${ETCD_VERSION}_helm-${HELM_VERSION}"
dest="${1:-${SIDEKEY_BIN_CACHE:-$HOME/.cache/sidekey/bin}/$key}"
if [ "$check" = 1 ]; then
  for b in etcd kube-apiserver kube-controller-manager kubectl helm; do [ -x "$dest/$b" ] || exit 3; done
  echo "$dest"; exit 0
fi
mkdir -p "$dest"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

log() { printf '[build-binaries] %s\n' "$*" >&2; }

need() {
  for b in "$@"; do [ -x "$dest/$b" ] || return 0; done
  return 1
}

# shellcheck source=k8s-module.sh
source "$(dirname "${BASH_SOURCE[0]}")/k8s-module.sh"

if need kube-apiserver kube-controller-manager kubectl; then
  log "kubernetes $K8S_VERSION: resolving staging modules"
  mkdir -p "$work/k8s" && cd "$work/k8s"
  k8s_module k8sbuild kube-apiserver kube-controller-manager kubectl
  for cmd in kube-apiserver kube-controller-manager kubectl; do
    [ -x "$dest/$cmd" ] && continue
    log "building $cmd (the first build takes several minutes)"
    go build -trimpath -ldflags "-s -w $k8s_ld" -o "$dest/$cmd.tmp" "k8s.io/kubernetes/cmd/$cmd"
    mv "$dest/$cmd.tmp" "$dest/$cmd"
  done
fi

if need etcd; then
  log "etcd $ETCD_VERSION"
  mkdir -p "$work/etcd" && cd "$work/etcd"
  printf 'module sidekey.local/etcdbuild\n\ngo 1.25.0\n\nrequire go.etcd.io/etcd/server/v3 %s\n' "$ETCD_VERSION" > go.mod
  printf '//go:build tools\n\npackage tools\n\nimport _ "go.etcd.io/etcd/server/v3"\n' > tools.go
  go mod tidy >/dev/null 2>"$work/tidy.err" || { cat "$work/tidy.err" >&2; exit 1; }
  go build -trimpath -ldflags "-s -w" -o "$dest/etcd.tmp" go.etcd.io/etcd/server/v3
  mv "$dest/etcd.tmp" "$dest/etcd"
fi

if need helm; then
  log "helm $HELM_VERSION"
  mkdir -p "$work/helm" && cd "$work/helm"
  printf 'module sidekey.local/helmbuild\n\ngo 1.26.0\n\nrequire helm.sh/helm/v3 %s\n' "$HELM_VERSION" > go.mod
  printf '//go:build tools\n\npackage tools\n\nimport _ "helm.sh/helm/v3/cmd/helm"\n' > tools.go
  go mod tidy >/dev/null 2>"$work/tidy.err" || { cat "$work/tidy.err" >&2; exit 1; }
  go build -trimpath -ldflags "-s -w -X helm.sh/helm/v3/internal/version.version=$HELM_VERSION -X helm.sh/helm/v3/internal/version.gitTreeState=clean" -o "$dest/helm.tmp" helm.sh/helm/v3/cmd/helm
  mv "$dest/helm.tmp" "$dest/helm"
fi

echo "$dest"
