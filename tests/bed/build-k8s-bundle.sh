#!/usr/bin/env bash
# Builds clusterctl's offline TEST BUNDLE of Kubernetes artifacts, with no internet, from:
#   - Debian bookworm's `kubernetes` source package (1.20.5+really1.20.2: the full upstream 1.20.2
#     tree with vendor/; see /work/shared/TESTBED.md), built with Debian's Go;
#   - Debian's etcd (package etcd-server: /usr/bin/etcd, /usr/bin/etcdctl);
#   - the pause image, compiled from build/pause/linux/pause.c of the same tree (gcc -Os -static);
#   - a busybox workload image from Debian's busybox-static;
#   - agnhost, the Kubernetes e2e suite's test server (webhooks, netexec, ...), built from
#     test/images/agnhost of the same tree (the e2e tests' admission-webhook check uses it);
#   - vendored Go modules that break on the Go Debian ships replaced by Debian's packaged sources
#     (VENDOR_OVERRIDES below; recorded in bundle.json `source.vendorOverrides`).
#
# usage: build-k8s-bundle.sh [--kube-version vX.Y.Z] [--cache DIR]
#   --kube-version  version string stamped into the Kubernetes binaries (default: the tree's own,
#                   v1.20.2). Another value, e.g. v1.20.3, makes a second bundle for upgrade tests:
#                   it is THE SAME CODE as v1.20.2 with another version string. It proves upgrade
#                   mechanics (drain, replace, restart, version checks), not API changes. bundle.json
#                   records this in `source.sameCodeAs`.
#   --cache DIR     cache root (default $CLUSTERCTL_CACHE_DIR, else /var/cache/clusterctl)
#
# Output: DIR/bundles/<key>/ with bundle.json, bin/*, images/*.tar; the path is the only line on
# stdout (logs go to stderr). <key> is the sha256 of the inputs (script version, the source package's
# .dsc sha256, the Go, etcd-server, busybox-static and gcc versions, the version string), computed from
# apt's local indexes, so a warm run is a no-op that needs no network and prints the path.
# The unpacked tree and Go's build cache stay under DIR/k8s-src/, so a second version string
# rebuilds in about 40 s instead of 6-18 min.
#
# Needs (tests/bed/install-host-packages.sh installs them): deb-src for bookworm, golang-go, rsync
# (without it code generation fails with a misleading "Permission denied"), jq, dpkg-dev, gcc,
# etcd-server, busybox-static, and the golang-*-dev packages named in VENDOR_OVERRIDES.
set -euo pipefail

# Bump when the script's output changes for the same inputs: it is part of the cache key.
SCRIPT_VERSION=3
# Debian's upstream version of the one real server release reachable offline (TESTBED.md).
DEB_UPSTREAM=1.20.5+really1.20.2
BINARIES=(kube-apiserver kube-controller-manager kube-scheduler kubelet kube-proxy kubeadm kubectl)
# Vendored modules of the 1.20.2 tree replaced by Debian's packaged sources, as "vendor path=package".
# The tree vendors github.com/modern-go/reflect2 v1.0.1, whose unsafe map iteration breaks on Go 1.18
# and later: kube-apiserver built with Go 1.19 dies with `fatal error: fault` (SIGSEGV in
# reflect2.(*UnsafeMapType).UnsafeIterate) when json-iterator encodes a map, e.g. while decoding a
# custom resource. reflect2 v1.0.2 fixed it; json-iterator v1.1.12 is the release that requires it
# (upstream Kubernetes moved both together), and modern-go/concurrent is json-iterator's dependency
# at the version its go.mod names. Same packages, same import paths: only the vendored copy changes.
VENDOR_OVERRIDES=(
  "github.com/modern-go/reflect2=golang-github-modern-go-reflect2-dev"
  "github.com/json-iterator/go=golang-github-json-iterator-go-dev"
  "github.com/modern-go/concurrent=golang-github-modern-go-concurrent-dev"
)
PAUSE_REPO=localhost/clusterctl/pause
BUSYBOX_REPO=localhost/clusterctl/busybox
AGNHOST_REPO=localhost/clusterctl/agnhost

here=$(cd "$(dirname "$0")" && pwd)
cache=${CLUSTERCTL_CACHE_DIR:-/var/cache/clusterctl}
kube_version=

log() { printf '==> %s\n' "$*" >&2; }
die() { printf 'build-k8s-bundle: %s\n' "$*" >&2; exit 1; }

while [ "$#" -gt 0 ]; do
  case "$1" in
    --kube-version) kube_version=${2:?--kube-version needs a value}; shift 2 ;;
    --cache) cache=${2:?--cache needs a value}; shift 2 ;;
    -h|--help) sed -n '2,27p' "$0"; exit 0 ;;
    *) die "unknown argument $1 (see --help)" ;;
  esac
done
if [ -n "$kube_version" ] && ! [[ "$kube_version" =~ ^v1\.20\.[0-9]+$ ]]; then
  die "--kube-version $kube_version: only v1.20.N can be stamped onto the 1.20.2 tree"
fi

for cmd in apt-get apt-cache dpkg-source dpkg-query go rsync jq gcc sha256sum tar flock; do
  command -v "$cmd" >/dev/null || die "$cmd not found: run tests/bed/install-host-packages.sh"
done
for f in /usr/bin/etcd /usr/bin/etcdctl /bin/busybox; do
  [ -x "$f" ] || die "$f not found: run tests/bed/install-host-packages.sh (etcd-server, busybox-static)"
done

pkg_version() { dpkg-query -W -f='${Version}' "$1"; }

# --- 1. Inputs and cache key, from local apt indexes only --------------------------------------
# The newest source version of the 1.20.2 upstream that apt knows, and its .dsc sha256.
srcinfo=$(apt-cache showsrc kubernetes 2>/dev/null | awk -v up="$DEB_UPSTREAM" '
  /^Package: / { ver = ""; sha = "" }
  /^Version: / { ver = $2 }
  /^Checksums-Sha256:/ { insha = 1; next }
  insha && /^ / { if ($3 ~ /\.dsc$/) sha = $1 " " $3; next }
  { insha = 0 }
  /^$/ { if (index(ver, up "-") == 1 && sha != "") print ver, sha; ver = ""; sha = "" }
  END { if (index(ver, up "-") == 1 && sha != "") print ver, sha }')
[ -n "$srcinfo" ] || die "apt knows no source package kubernetes $DEB_UPSTREAM-*: add the bookworm deb-src line and run apt-get update (tests/bed/install-host-packages.sh does both)"
deb_version=$(printf '%s\n' "$srcinfo" | cut -d' ' -f1 | sort -uV | tail -n1)
read -r _ dsc_sha dsc_name < <(printf '%s\n' "$srcinfo" | awk -v v="$deb_version" '$1 == v' | head -n1)

go_version=$(go env GOVERSION)
etcd_pkg=$(pkg_version etcd-server)
busybox_pkg=$(pkg_version busybox-static)
gcc_version=$(gcc -dumpfullversion)
overrides_key=
for o in "${VENDOR_OVERRIDES[@]}"; do
  pkg=${o#*=}
  [ -d "/usr/share/gocode/src/${o%%=*}" ] || die "/usr/share/gocode/src/${o%%=*} not found: install $pkg (tests/bed/install-host-packages.sh does)"
  overrides_key+="$pkg=$(pkg_version "$pkg");"
done

key=$(printf '%s\n' "script=$SCRIPT_VERSION" "kubernetes=$deb_version" "dsc-sha256=$dsc_sha" \
  "go=$go_version" "etcd-server=$etcd_pkg" "busybox-static=$busybox_pkg" "gcc=$gcc_version" \
  "vendor-overrides=$overrides_key" "kube-version=${kube_version:-tree}" | sha256sum | cut -c1-32)
out=$cache/bundles/$key

if [ -f "$out/bundle.json" ]; then
  log "bundle $key is cached"
  echo "$out"
  exit 0
fi

mkdir -p "$cache/bundles" "$cache/k8s-src"
src=$cache/k8s-src/$dsc_sha
mkdir -p "$src"
# One build per source tree at a time: make writes into the tree's _output.
exec 9>"$src/.lock"
flock 9
if [ -f "$out/bundle.json" ]; then
  log "bundle $key was built meanwhile"
  echo "$out"
  exit 0
fi
t_start=$(date +%s)

# --- 2. Source tree ------------------------------------------------------------------------------
if [ ! -f "$src/.unpacked" ]; then
  log "downloading source package kubernetes $deb_version"
  rm -rf "$src/dl" "$src/tree"
  mkdir -p "$src/dl"
  (cd "$src/dl" && apt-get source --download-only -qq "kubernetes=$deb_version" >&2)
  got=$(sha256sum "$src/dl/$dsc_name" | cut -d' ' -f1)
  [ "$got" = "$dsc_sha" ] || die "$dsc_name has sha256 $got, apt's index says $dsc_sha"
  log "unpacking (with Debian's patches)"
  dpkg-source -x "$src/dl/$dsc_name" "$src/tree" >&2
  touch "$src/.unpacked"
fi
tree=$src/tree
# Vendor overrides: the vendored copy replaced by Debian's, every run (idempotent; the tree is shared
# by every version string built from it). The 1.20 build runs in GOPATH mode (hack/lib/init.sh sets
# GO111MODULE=off), where vendor/ is used by import path and go.mod / vendor/modules.txt are not
# read: they still name the old versions, and bundle.json records what replaced them.
overrides_json='[]'
for o in "${VENDOR_OVERRIDES[@]}"; do
  mod=${o%%=*}; pkg=${o#*=}
  [ -d "$tree/vendor/$mod" ] || die "the tree does not vendor $mod: VENDOR_OVERRIDES is out of date"
  if [ ! -f "$src/.vendor-orig-$pkg" ]; then
    awk -v m="$mod" '$1 == "#" && $2 == m { print $3; exit }' "$tree/vendor/modules.txt" > "$src/.vendor-orig-$pkg"
  fi
  orig=$(cat "$src/.vendor-orig-$pkg")
  new=v$(pkg_version "$pkg" | sed 's/-[^-]*$//; s/^[0-9]*://')
  rsync -a --delete --exclude '*_test.go' --exclude 'debian/' "/usr/share/gocode/src/$mod/" "$tree/vendor/$mod/"
  log "vendor override: $mod $orig -> $new (Debian $pkg $(pkg_version "$pkg"))"
  overrides_json=$(jq -c --arg m "$mod" --arg from "$orig" --arg to "$new" --arg pkg "$pkg $(pkg_version "$pkg")" \
    '. + [{module: $m, vendored: $from, replacedBy: $to, debianPackage: $pkg}]' <<< "$overrides_json")
done
tree_version=$(sed -n "s/^.*'tag: \(v[0-9.]*\)'.*$/\1/p" "$tree/hack/lib/version.sh" | head -n1)
tree_commit=$(sed -n "s/^ *KUBE_GIT_COMMIT='\([0-9a-f]*\)'.*$/\1/p" "$tree/hack/lib/version.sh" | head -n1)
[ -n "$tree_version" ] && [ -n "$tree_commit" ] || die "cannot read the tree's version from hack/lib/version.sh"
version=${kube_version:-$tree_version}
epoch=$(dpkg-parsechangelog -l "$tree/debian/changelog" -STimestamp)

# --- 3. Kubernetes binaries ----------------------------------------------------------------------
# The version file replaces git metadata (the tree is an archive). The commit stays the real one.
minor=${version#v1.}; minor=${minor%%.*}
cat >"$src/version-$version" <<VER
KUBE_GIT_COMMIT=$tree_commit
KUBE_GIT_TREE_STATE=archive
KUBE_GIT_VERSION=$version
KUBE_GIT_MAJOR=1
KUBE_GIT_MINOR=$minor
VER
what=$(printf 'cmd/%s ' "${BINARIES[@]}")
log "building Kubernetes $version ($what) with $go_version under nice -n 19; cold 6-18 min"
t_go=$(date +%s)
(cd "$tree" && KUBE_GIT_VERSION_FILE="$src/version-$version" KUBE_STATIC_OVERRIDES=kubelet \
  nice -n 19 make WHAT="${what% }" >&2)
log "Go build took $(( $(date +%s) - t_go )) s"
# The canary (tests/bed/k8s-canary): the tree's vendored json-iterator + reflect2, with this Go,
# round-trip an unstructured object. It dies with "fatal error: fault" where kube-apiserver would
# die on custom resources (the reason for VENDOR_OVERRIDES).
canary=$tree/_output/local/go/src/k8s.io/kubernetes/hack/clusterctl-canary
rm -rf "$canary"; mkdir -p "$canary"
cp "$here/k8s-canary/main.go" "$canary/main.go"
(cd "$canary" && GO111MODULE=off GOPATH=$tree/_output/local/go GOCACHE=$tree/_output/local/go/cache \
  go run . >&2) || die "the canary failed: the vendored json-iterator/reflect2 cannot encode maps under $go_version (see VENDOR_OVERRIDES)"
rm -rf "$canary"
bindir=$tree/_output/local/bin/linux/amd64
[ -d "$bindir" ] || bindir=$tree/_output/bin

stage=$cache/bundles/.tmp-$key-$$
rm -rf "$stage"
trap 'rm -rf "$stage"' EXIT
mkdir -p "$stage/bin" "$stage/images"
for b in "${BINARIES[@]}"; do
  install -m 0755 "$bindir/$b" "$stage/bin/$b"
done
got=$("$stage/bin/kube-apiserver" --version)
[ "$got" = "Kubernetes $version" ] || die "kube-apiserver --version printed '$got', expected 'Kubernetes $version'"

# --- 4. etcd -------------------------------------------------------------------------------------
install -m 0755 /usr/bin/etcd "$stage/bin/etcd"
install -m 0755 /usr/bin/etcdctl "$stage/bin/etcdctl"
etcd_version=$(/usr/bin/etcd --version | sed -n 's/^etcd Version: //p')
[ -n "$etcd_version" ] || die "cannot read etcd's version"

# --- 5. Images -----------------------------------------------------------------------------------
export SOURCE_DATE_EPOCH=$epoch
work=$stage/.work
pause_tag=$(sed -n 's/^TAG = //p' "$tree/build/pause/Makefile")
[ -n "$pause_tag" ] || die "cannot read TAG from build/pause/Makefile"
pause_ref=$PAUSE_REPO:$pause_tag
log "building $pause_ref from build/pause/linux/pause.c"
mkdir -p "$work/pause"
gcc -Os -Wall -Werror -static "-DVERSION=v$pause_tag-$version" -o "$work/pause/pause" "$tree/build/pause/linux/pause.c"
strip "$work/pause/pause"
# Upstream's Dockerfile: ADD pause /pause; ENTRYPOINT ["/pause"] (runs as root, as 3.4 does).
"$here/make-image-tar.sh" "$work/pause" "$pause_ref" "$stage/images/pause.tar" '["/pause"]' null

busybox_upstream=${busybox_pkg#*:}; busybox_upstream=${busybox_upstream%%-*}
busybox_ref=$BUSYBOX_REPO:$busybox_upstream
log "building $busybox_ref from busybox-static $busybox_pkg"
bb=$work/busybox
mkdir -p "$bb/bin" "$bb/etc" "$bb/root" "$bb/tmp" "$bb/var" "$bb/proc" "$bb/sys" "$bb/dev"
chmod 1777 "$bb/tmp"
chmod 0700 "$bb/root"
install -m 0755 /bin/busybox "$bb/bin/busybox"
# Every applet as a link in /bin, as the busybox image does.
for applet in $(/bin/busybox --list); do
  [ "$applet" = busybox ] || ln -s busybox "$bb/bin/$applet"
done
printf 'root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n' >"$bb/etc/passwd"
printf 'root:x:0:\nnogroup:x:65534:\n' >"$bb/etc/group"
"$here/make-image-tar.sh" "$bb" "$busybox_ref" "$stage/images/busybox.tar" null '["sh"]'
# agnhost from the same tree, built as make builds the tree (GOPATH mode, the tree's vendor/ with
# the overrides above, its Go cache and make's flags, so the packages it shares with the server
# binaries come from the cache), static like them. Only the binary: upstream's
# image adds Alpine tools (curl, nc, dig) that the webhook, netexec and serve-hostname modes do
# not use. Tagged with the tree's agnhost VERSION.
agnhost_tag=$(cat "$tree/test/images/agnhost/VERSION")
[ -n "$agnhost_tag" ] || die "cannot read test/images/agnhost/VERSION"
agnhost_ref=$AGNHOST_REPO:$agnhost_tag
log "building $agnhost_ref from test/images/agnhost"
gopath=$tree/_output/local/go
[ -d "$gopath/src/k8s.io/kubernetes" ] || die "$gopath/src/k8s.io/kubernetes missing: the tree's make did not set up its GOPATH"
mkdir -p "$work/agnhost/etc" "$work/agnhost/tmp"
chmod 1777 "$work/agnhost/tmp"
(cd "$gopath/src/k8s.io/kubernetes" && GO111MODULE=off GOPATH=$gopath GOCACHE=$gopath/cache CGO_ENABLED=0 \
  nice -n 19 go build -installsuffix static -gcflags "-trimpath=$tree" -asmflags "-trimpath=$tree"     -ldflags "-s -w -buildid=" -tags selinux,notest -o "$work/agnhost/agnhost" ./test/images/agnhost >&2)
"$work/agnhost/agnhost" --help 2>&1 | grep -q webhook || die "the agnhost built has no webhook command"
printf 'root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n' >"$work/agnhost/etc/passwd"
printf 'root:x:0:\nnogroup:x:65534:\n' >"$work/agnhost/etc/group"
"$here/make-image-tar.sh" "$work/agnhost" "$agnhost_ref" "$stage/images/agnhost.tar" '["/agnhost"]' null
rm -rf "$work"

# --- 6. Manifest ---------------------------------------------------------------------------------
files_json=$(cd "$stage" && find bin images -type f | LC_ALL=C sort | while read -r f; do
  jq -cn --arg path "$f" --arg sha "$(sha256sum "$f" | cut -d' ' -f1)" --argjson size "$(stat -c %s "$f")" \
    '{path: $path, sha256: $sha, size: $size}'
done | jq -cs .)
same_code=null
[ "$version" = "$tree_version" ] || same_code="\"${tree_version#v}\""
jq -n --argjson files "$files_json" --arg kv "${version#v}" --arg ev "$etcd_version" \
  --arg pause "$pause_ref" --arg busybox "$busybox_ref" --arg agnhost "$agnhost_ref" --arg key "$key" \
  --arg debv "$deb_version" --arg dsc "$dsc_sha" --arg go "$go_version" --arg etcdpkg "$etcd_pkg" \
  --arg bbpkg "$busybox_pkg" --arg gcc "$gcc_version" --arg commit "$tree_commit" \
  --argjson same "$same_code" --argjson overrides "$overrides_json" '{
  formatVersion: 1,
  kubernetesVersion: $kv,
  etcdVersion: $ev,
  pauseImage: $pause,
  images: [
    {reference: $pause, path: "images/pause.tar"},
    {reference: $busybox, path: "images/busybox.tar"},
    {reference: $agnhost, path: "images/agnhost.tar"}
  ],
  files: $files,
  source: {
    kind: "debian-source-package",
    buildKey: $key,
    package: "kubernetes",
    packageVersion: $debv,
    dscSha256: $dsc,
    gitCommit: $commit,
    go: $go,
    etcdPackage: ("etcd-server " + $etcdpkg),
    busyboxPackage: ("busybox-static " + $bbpkg),
    gcc: $gcc,
    sameCodeAs: $same,
    vendorOverrides: $overrides
  }
}' >"$stage/bundle.json"
chmod -R a+rX,go-w "$stage"

# Atomic publish: readers see either no bundle or a complete one.
rm -rf "$out"
mv "$stage" "$out"
trap - EXIT
log "bundle $key ready in $(( $(date +%s) - t_start )) s: $(du -sh "$out" | cut -f1)"
echo "$out"
