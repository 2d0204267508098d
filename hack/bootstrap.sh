# Sourced by hack/test and hack/demo: a venv with sidekey installed, and the
# control-plane binaries built or found. Everything is installed by this
# repo's own files; nothing by hand.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${SIDEKEY_VENV:-$root/.venv}"
extras="${1:-test}"

log() { printf '[sidekey] %s\n' "$*" >&2; }

if [ ! -x "$venv/bin/python" ]; then
  log "creating $venv"
  python3 -m venv "$venv"
fi
stamp="$venv/.sidekey-installed-$extras"
if [ ! -f "$stamp" ] || [ "$root/pyproject.toml" -nt "$stamp" ]; then
  log "installing sidekey[$extras] into $venv"
  "$venv/bin/python" -m pip install -q --upgrade pip
  # the build requirements (mypy compiles the request path: setup.py) go into the venv
  # itself, so that hack/relink rebuilds without build isolation (nothing downloaded per rebuild)
  mapfile -t build_requires < <("$venv/bin/python" -c 'import sys, tomllib
print("\n".join(tomllib.load(open(sys.argv[1], "rb"))["build-system"]["requires"]))' "$root/pyproject.toml")
  "$venv/bin/python" -m pip install -q "${build_requires[@]}"
  # strict editable mode: mypy follows the mapped package folders
  "$venv/bin/python" -m pip install -q --no-build-isolation -e "$root[$extras]" \
    --config-settings editable_mode=strict
  # built from this tree just now: hack/relink below has nothing to rebuild
  (cd "$root" && "$venv/bin/python" -m bench.compiled --digest) > "$venv/.sidekey-relinked"
  touch "$stamp"
fi
"$root/hack/relink"   # pick up modules added, and recompile those changed, since the last build
export PATH="$venv/bin:$PATH"

if [ -z "${KUBEBUILDER_ASSETS:-}" ]; then
  log "control-plane binaries: building or reusing the cache (the first build takes 10-25 minutes)"
  KUBEBUILDER_ASSETS="$("$root/localcluster/build-binaries.sh")"
  export KUBEBUILDER_ASSETS
fi
log "control-plane binaries in $KUBEBUILDER_ASSETS"
