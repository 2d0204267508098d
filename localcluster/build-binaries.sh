#!/usr/bin/env bash
# Build the control-plane binaries the tests need (kube-apiserver,
# kube-controller-manager, kubectl, etcd, helm) from the Go module proxy with the
# machine's own Go toolchain, and cache them outside the repo.
#
# Why a wrapper module: k8s.io/kubernetes requires its staging modules at
# v0.0.0 and maps them to ./staging with replace directives, which Go ignores
# in a dependency. So each build happens in a throwaway module that replaces
# every staging module with its matching v0.X.Y release.
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

k8s_minor="${K8S_VERSION#v1.}"; k8s_minor="${k8s_minor%%.*}"
staging_version="v0.${K8S_VERSION#v1.}"

if need kube-apiserver kube-controller-manager kubectl; then
  log "kubernetes $K8S_VERSION: resolving staging modules"
  mkdir -p "$work/k8s" && cd "$work/k8s"
  gomod="$(go mod download -json "k8s.io/kubernetes@$K8S_VERSION" | sed -n 's/.*"GoMod": "\(.*\)".*/\1/p')"
  {
    echo "module sidekey.local/k8sbuild"
    echo
    grep -E '^go [0-9]' "$gomod"
    grep -E '^godebug ' "$gomod" || true
    echo
    echo "require k8s.io/kubernetes $K8S_VERSION"
    echo
    grep -oE 'k8s\.io/[a-z0-9-]+ => \./staging' "$gomod" | awk -v v="$staging_version" '{print "replace " $1 " => " $1 " " v}'
  } > go.mod
  log "$(grep -c '^replace' go.mod) staging replaces at $staging_version"
  cat > tools.go <<GO
//go:build tools

package tools

import (
	_ "k8s.io/kubernetes/cmd/kube-apiserver"
	_ "k8s.io/kubernetes/cmd/kube-controller-manager"
	_ "k8s.io/kubernetes/cmd/kubectl"
)
GO
  go mod tidy >/dev/null 2>"$work/tidy.err" || { cat "$work/tidy.err" >&2; exit 1; }
  ld=""
  for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
    ld="$ld -X $pkg.gitVersion=$K8S_VERSION -X $pkg.gitMajor=1 -X $pkg.gitMinor=$k8s_minor -X $pkg.gitTreeState=clean -X $pkg.buildDate=1970-01-01T00:00:00Z"
  done
  for cmd in kube-apiserver kube-controller-manager kubectl; do
    [ -x "$dest/$cmd" ] && continue
    log "building $cmd (the first build takes several minutes)"
    go build -trimpath -ldflags "-s -w $ld" -o "$dest/$cmd.tmp" "k8s.io/kubernetes/cmd/$cmd"
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
