#!/usr/bin/env bash
# Debian packages that tests and benchmarks drive for real: Prometheus scrapes
# the sidecar, nginx is the benchmark's C baseline, wrk the load generator,
# iproute2 makes network namespaces for test hosts. The real node
# (localcluster/node.py) runs containers with runc, wires pods with the CNI
# bridge plugin, and its kube-proxy needs iptables and conntrack (nft removes
# the nftables tables iptables-nft created for it); gcc and the
# static libc build the pause program; mmdebstrap makes the image's rootfs
# (hack/image); ccache keeps the request path's compiled C between builds
# (setup.py). Installed once, as root. A key with a slash is a file to look for.
set -euo pipefail
declare -A want=([prometheus]=prometheus [nginx]=nginx [wrk]=wrk [ip]=iproute2 [curl]=curl
  [runc]=runc [/usr/lib/cni/bridge]=containernetworking-plugins [iptables]=iptables
  [conntrack]=conntrack [nft]=nftables [mmdebstrap]=mmdebstrap [gcc]=gcc [/usr/include/stdio.h]=libc6-dev
  [ccache]=ccache)
missing=()
for cmd in "${!want[@]}"; do
  if [[ $cmd == /* ]]; then [ -e "$cmd" ] || missing+=("${want[$cmd]}"); continue; fi
  command -v "$cmd" >/dev/null 2>&1 || [ -x "/usr/sbin/$cmd" ] || [ -x "/usr/bin/$cmd" ] || missing+=("${want[$cmd]}")
done
[ ${#missing[@]} -eq 0 ] && exit 0
if [ "$(id -u)" != 0 ]; then
  echo "[sidekey] missing Debian packages: ${missing[*]}; run as root: apt-get install -y ${missing[*]}" >&2
  exit 1
fi
echo "[sidekey] installing Debian packages: ${missing[*]}" >&2
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq >/dev/null || true
apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
# The packages start their services; the tests run their own instances.
for svc in prometheus nginx; do
  (command -v systemctl >/dev/null && systemctl stop "$svc" 2>/dev/null) || service "$svc" stop >/dev/null 2>&1 || true
done
