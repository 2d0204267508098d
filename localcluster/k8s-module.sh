# Sourced by build-binaries.sh and build-node-binaries.sh: the throwaway Go
# module that builds commands of k8s.io/kubernetes, and the version ldflags.
#
# Why a wrapper module: k8s.io/kubernetes requires its staging modules at
# v0.0.0 and maps them to ./staging with replace directives, which Go ignores
# in a dependency. So the build happens in a module of our own that replaces
# every staging module with its matching v0.X.Y release.
#
# k8s_module NAME CMD...   writes go.mod and tools.go for the commands (under
#                          k8s.io/kubernetes/cmd/) in the current folder, tidies
#                          it, and sets $k8s_ld (the -X flags /version reports)
#                          and $k8s_src (the module's source folder).
# Needs K8S_VERSION, $work and log().

k8s_module() {
  local name="$1"; shift
  local minor="${K8S_VERSION#v1.}"; minor="${minor%%.*}"
  local staging_version="v0.${K8S_VERSION#v1.}"
  local info gomod
  info="$(go mod download -json "k8s.io/kubernetes@$K8S_VERSION")"
  gomod="$(sed -n 's/.*"GoMod": "\(.*\)".*/\1/p' <<<"$info")"
  k8s_src="$(sed -n 's/.*"Dir": "\(.*\)".*/\1/p' <<<"$info")"
  {
    echo "module sidekey.local/$name"
    echo
    grep -E '^go [0-9]' "$gomod"
    grep -E '^godebug ' "$gomod" || true
    echo
    echo "require k8s.io/kubernetes $K8S_VERSION"
    echo
    grep -oE 'k8s\.io/[a-z0-9-]+ => \./staging' "$gomod" | awk -v v="$staging_version" '{print "replace " $1 " => " $1 " " v}'
  } > go.mod
  log "$(grep -c '^replace' go.mod) staging replaces at $staging_version"
  {
    printf '//go:build tools\n\npackage tools\n\nimport (\n'
    for cmd in "$@"; do printf '\t_ "k8s.io/kubernetes/cmd/%s"\n' "$cmd"; done
    printf ')\n'
  } > tools.go
  go mod tidy >/dev/null 2>"$work/tidy.err" || { cat "$work/tidy.err" >&2; exit 1; }
  k8s_ld=""
  for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
    k8s_ld="$k8s_ld -X $pkg.gitVersion=$K8S_VERSION -X $pkg.gitMajor=1 -X $pkg.gitMinor=$minor -X $pkg.gitTreeState=clean -X $pkg.buildDate=1970-01-01T00:00:00Z"
  done
}
