#!/usr/bin/env bash
# Builds the upstream Kubernetes conformance suite and the container images its [Conformance]
# tests run, offline, from the same Debian source tree (1.20.2) the test bundle is built from
# (tests/bed/build-k8s-bundle.sh, which this runs first so the tree is unpacked, patched and its Go
# cache warm).
#
# usage: build-suite.sh [--cache DIR]
#
# Output: DIR/conformance/<key>/, its path the only line on stdout (logs on stderr):
#   bin/e2e.test, bin/ginkgo     `make WHAT="test/e2e/e2e.test vendor/github.com/onsi/ginkgo/ginkgo"`
#   images/*.tar                 docker-archive images, for `clusterctl load`
#   repo-list.yaml               KUBE_TEST_REPO_LIST: the suite's registries mapped to localhost/conformance/*
#   conformance.yaml             the tree's list of [Conformance] tests (the report's denominator)
#   suite.json                   what was built: every image, its reference and what it is
# <key> is the sha256 of this script's version, the bundle's build key (source package, Go, ...)
# and the Debian packages copied into images, so a warm run is a no-op.
#
# The images, by the name the suite asks for (test/utils/image/manifest.go, with repo-list.yaml):
#   built from the tree, as upstream builds them:
#     e2e-test-images/agnhost:2.21   test/images/agnhost (the tree is at agnhost 2.25, a superset the
#                                    2.21 tests run), on a base with the tools upstream's Alpine base
#                                    adds and the tests call: sh (dash), bash, curl, nc (netcat-openbsd,
#                                    as upstream; busybox's nc lacks -z), ip, and busybox's utilities;
#                                    /agnhost-2, /uploads and porter's certificates as upstream
#     e2e/kitten:1.0, e2e/nautilus:1.0   test/images/{kitten,nautilus}: agnhost + their html/ files,
#                                    CMD test-webserver
#     e2e/nonewprivs:1.0             test/images/nonewprivs/nnp.go, setuid root, on busybox
#     k8s/pause:3.2                  build/pause/linux/pause.c
#   stand-ins from Debian packages (no registry can be reached here), faithful to what the tests
#   use of them:
#     library/busybox:1.29           Debian's busybox-static (1.35): the tests run sh and coreutils
#     e2e/nonroot:1.0                busybox with USER 1234 (upstream: debian-base with USER 1234;
#                                    the tests read the user id)
#     library/httpd:2.4.38-alpine, :2.4.39-alpine   busybox httpd serving /usr/local/apache2/htdocs
#                                    on port 80 as Apache's image does (index.html "It works!"); the
#                                    tests use it as a long-running server, probe it over HTTP, and
#                                    StatefulSet tests move htdocs/index.html away to fail a probe
#     library/nginx:1.14-alpine, :1.15-alpine   busybox httpd serving /usr/share/nginx/html on 80
#   not built (the tests that need them fail, and the report says why):
#     sample-apiserver, etcd (the aggregator test), jessie-dnsutils (DNS tests: no cluster DNS
#     offline), images in authenticated or invalid registries (by design of those tests).
set -euo pipefail

SCRIPT_VERSION=3
here=$(cd "$(dirname "$0")" && pwd)
bed=$here/../bed
cache=${CLUSTERCTL_CACHE_DIR:-/var/cache/clusterctl}
REPO=localhost/conformance
# Debian packages whose files go into images: part of the cache key.
PKGS=(dash bash curl netcat-openbsd iproute2 busybox-static libc6)

log() { printf '==> %s\n' "$*" >&2; }
die() { printf 'build-suite: %s\n' "$*" >&2; exit 1; }

while [ "$#" -gt 0 ]; do
  case "$1" in
    --cache) cache=${2:?--cache needs a value}; shift 2 ;;
    -h|--help) sed -n '2,43p' "$0"; exit 0 ;;
    *) die "unknown argument $1 (see --help)" ;;
  esac
done
for cmd in jq go gcc ldd sha256sum flock make; do
  command -v "$cmd" > /dev/null || die "$cmd not found: run tests/bed/install-host-packages.sh"
done

bundle=$(bash "$bed/build-k8s-bundle.sh" --cache "$cache")
bundle_key=$(jq -r .source.buildKey "$bundle/bundle.json")
dsc=$(jq -r .source.dscSha256 "$bundle/bundle.json")
src=$cache/k8s-src/$dsc
tree=$src/tree
[ -d "$tree/test/e2e" ] || die "$tree has no test/e2e: the bundle's source tree is gone; remove $bundle and run again"
pkgs_key=
for p in "${PKGS[@]}"; do
  v=$(dpkg-query -W -f='${Version}' "$p" 2>/dev/null) || die "package $p is not installed: run tests/bed/install-host-packages.sh"
  pkgs_key+="$p=$v;"
done
key=$(printf '%s\n' "script=$SCRIPT_VERSION" "bundle=$bundle_key" "packages=$pkgs_key" | sha256sum | cut -c1-32)
out=$cache/conformance/$key
if [ -f "$out/suite.json" ]; then
  log "conformance suite $key is cached"
  echo "$out"
  exit 0
fi
mkdir -p "$cache/conformance"
# The tree's _output is shared with the bundle builds: one make at a time.
exec 9>"$src/.lock"
flock 9
if [ -f "$out/suite.json" ]; then echo "$out"; exit 0; fi
t_start=$(date +%s)
stage=$cache/conformance/.tmp-$key-$$
rm -rf "$stage"
trap 'rm -rf "$stage"' EXIT
mkdir -p "$stage/bin" "$stage/images"

# --- 1. e2e.test and ginkgo ------------------------------------------------------------------------
version=$(jq -r .kubernetesVersion "$bundle/bundle.json")
vfile=$src/version-v$version
[ -f "$vfile" ] || die "$vfile missing: the bundle build writes it"
log "building e2e.test and ginkgo from the tree under nice -n 19 (warm Go cache: about 8 min; cold: longer)"
t_go=$(date +%s)
(cd "$tree" && KUBE_GIT_VERSION_FILE=$vfile nice -n 19 make WHAT="test/e2e/e2e.test vendor/github.com/onsi/ginkgo/ginkgo" >&2)
log "Go build took $(( $(date +%s) - t_go )) s"
bindir=$tree/_output/local/bin/linux/amd64
install -m 0755 "$bindir/e2e.test" "$stage/bin/e2e.test"
install -m 0755 "$bindir/ginkgo" "$stage/bin/ginkgo"
install -m 0644 "$tree/test/conformance/testdata/conformance.yaml" "$stage/conformance.yaml"
total=$(grep -c '^- testname:' "$stage/conformance.yaml")

# --- 2. Images -----------------------------------------------------------------------------------
export SOURCE_DATE_EPOCH=$(dpkg-parsechangelog -l "$tree/debian/changelog" -STimestamp)
work=$stage/.work
mkdir -p "$work"
images_json='[]'
image() { # NAME ROOTFS REF ENTRYPOINT CMD [USER] WHAT
  local file=$1 rootfs=$2 ref=$3 ep=$4 cmd=$5 user=$6 what=$7
  "$bed/make-image-tar.sh" "$rootfs" "$ref" "$stage/images/$file.tar" "$ep" "$cmd" $user
  images_json=$(jq -c --arg ref "$ref" --arg path "images/$file.tar" --arg what "$what" \
    '. + [{reference: $ref, path: $path, what: $what}]' <<< "$images_json")
  log "image $ref"
}
# Busybox's utilities as links in DIR/bin, with a minimal /etc; without nc (netcat-openbsd's is
# the one the tests need) and, if asked, without sh (dash is /bin/sh then).
busybox_root() { # DIR [--tools]
  local d=$1 applet
  mkdir -p "$d/bin" "$d/etc" "$d/root" "$d/tmp" "$d/var" "$d/proc" "$d/sys" "$d/dev" "$d/usr/bin" "$d/usr/sbin"
  chmod 1777 "$d/tmp"; chmod 0700 "$d/root"
  install -m 0755 /bin/busybox "$d/bin/busybox"
  for applet in $(/bin/busybox --list); do
    case "$applet" in busybox) continue ;; esac
    if [ "${2:-}" = --tools ]; then case "$applet" in nc|sh|bash|ip) continue ;; esac; fi
    ln -s busybox "$d/bin/$applet"
  done
  printf 'root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n' > "$d/etc/passwd"
  printf 'root:x:0:\nnogroup:x:65534:\n' > "$d/etc/group"
  printf 'hosts: files dns\n' > "$d/etc/nsswitch.conf"
}
# A dynamically linked Debian program with the libraries ldd finds for it (and the loader).
copy_prog() { # ROOT SRC DEST
  local root=$1 src=$2 dest=$3 lib
  install -D -m 0755 "$src" "$root$dest"
  for lib in $(ldd "$src" | grep -o '/[^ ]*'); do
    [ -e "$root$lib" ] || install -D -m 0755 "$(readlink -f "$lib")" "$root$lib"
  done
}

gopath=$tree/_output/local/go
gobuild() { # OUT PKG
  (cd "$gopath/src/k8s.io/kubernetes" && GO111MODULE=off GOPATH=$gopath GOCACHE=$gopath/cache CGO_ENABLED=0 \
    nice -n 19 go build -installsuffix static -gcflags "-trimpath=$tree" -asmflags "-trimpath=$tree" \
    -ldflags "-s -w -buildid=" -tags selinux,notest -o "$1" "$2" >&2)
}

# agnhost, on the tools base.
a=$work/agnhost
busybox_root "$a" --tools
copy_prog "$a" /usr/bin/dash /bin/sh
copy_prog "$a" /usr/bin/bash /bin/bash
copy_prog "$a" /usr/bin/curl /usr/bin/curl
copy_prog "$a" /bin/nc.openbsd /usr/bin/nc
copy_prog "$a" /usr/sbin/ip /sbin/ip
# curl's TLS needs no CA bundle here (the tests speak plain HTTP or pass -k).
gobuild "$a/agnhost" ./test/images/agnhost
"$a/agnhost" --help 2>&1 | grep -q netexec || die "the agnhost built has no netexec command"
ln -s agnhost "$a/agnhost-2"
mkdir -p "$a/uploads"
install -m 0644 "$tree/test/images/agnhost/porter/localhost.crt" "$a/localhost.crt"
install -m 0644 "$tree/test/images/agnhost/porter/localhost.key" "$a/localhost.key"
image agnhost "$a" "$REPO/e2e-test-images/agnhost:2.21" '["/agnhost"]' '["pause"]' "" \
  "built: test/images/agnhost of the tree (VERSION $(cat "$tree/test/images/agnhost/VERSION")); tools from Debian (dash as sh, bash, curl, netcat-openbsd, iproute2, busybox)"
# kitten and nautilus are agnhost plus their html files (as upstream's `FROM agnhost`): agnhost's
# layer byte for byte under a layer of those files, all three images in agnhost.tar, so `load`
# sends the shared 50 MB layer once, not three times.
for pic in kitten nautilus; do
  mkdir -p "$work/$pic"
  install -m 0644 "$tree/test/images/$pic/html/$pic.jpg" "$work/$pic/$pic.jpg"
  install -m 0644 "$tree/test/images/$pic/html/data.json" "$work/$pic/data.json"
  MAKE_IMAGE_BASE=$stage/images/agnhost.tar image "$pic" "$work/$pic" "$REPO/e2e/$pic:1.0" '["/agnhost"]' '["test-webserver"]' "" \
    "built: test/images/$pic (agnhost + html/$pic.jpg, html/data.json; CMD test-webserver)"
done
MAKE_IMAGE_MERGE=1 "$bed/make-image-tar.sh" "$work/agnhost-all.tar" "$stage/images/agnhost.tar" \
  "$stage/images/kitten.tar" "$stage/images/nautilus.tar"
mv "$work/agnhost-all.tar" "$stage/images/agnhost.tar"
rm "$stage/images/kitten.tar" "$stage/images/nautilus.tar"
images_json=$(jq -c 'map(if .path == "images/kitten.tar" or .path == "images/nautilus.tar" then .path = "images/agnhost.tar" else . end)' <<< "$images_json")

# pause 3.2 from the tree's pause.c (the kubelet's sandbox image is the bundle's; tests that
# run a pause container by name ask for this one).
p=$work/pause; mkdir -p "$p"
gcc -Os -Wall -Werror -static "-DVERSION=v3.2-conformance" -o "$p/pause" "$tree/build/pause/linux/pause.c"
strip "$p/pause"
image pause "$p" "$REPO/k8s/pause:3.2" '["/pause"]' null "" "built: build/pause/linux/pause.c of the tree"

b=$work/busybox; busybox_root "$b"
image busybox "$b" "$REPO/library/busybox:1.29" null '["sh"]' "" \
  "stand-in: Debian busybox-static $(dpkg-query -W -f='${Version}' busybox-static) for busybox 1.29"
image nonroot "$b" "$REPO/e2e/nonroot:1.0" null '["sh"]' 1234 \
  "stand-in: busybox with USER 1234 (upstream: debian-base with USER 1234)"

n=$work/nonewprivs; cp -a "$b" "$n"
mkdir -p "$n/usr/local/bin"
gobuild "$n/usr/local/bin/nnp" ./test/images/nonewprivs
chmod 4755 "$n/usr/local/bin/nnp"
image nonewprivs "$n" "$REPO/e2e/nonewprivs:1.0" null '["nnp"]' "" \
  "built: test/images/nonewprivs/nnp.go (setuid root) on busybox"

h=$work/httpd; cp -a "$b" "$h"
mkdir -p "$h/usr/local/apache2/htdocs" "$h/usr/local/bin"
printf '<html><body><h1>It works!</h1></body></html>\n' > "$h/usr/local/apache2/htdocs/index.html"
printf '#!/bin/sh\n# clusterctl stand-in for httpd:2.4-alpine: busybox httpd on port 80.\nexec httpd -f -v -p 80 -h /usr/local/apache2/htdocs\n' > "$h/usr/local/bin/httpd-foreground"
chmod 0755 "$h/usr/local/bin/httpd-foreground"
for v in 2.4.38-alpine 2.4.39-alpine; do
  image "httpd-$v" "$h" "$REPO/library/httpd:$v" null '["httpd-foreground"]' "" \
    "stand-in: busybox httpd serving /usr/local/apache2/htdocs on port 80, as Apache's image"
done
x=$work/nginx; cp -a "$b" "$x"
mkdir -p "$x/usr/share/nginx/html" "$x/usr/sbin"
printf '<!DOCTYPE html>\n<html><head><title>Welcome to nginx!</title></head><body><h1>Welcome to nginx!</h1></body></html>\n' > "$x/usr/share/nginx/html/index.html"
rm -f "$x/usr/sbin/nginx"
printf '#!/bin/sh\n# clusterctl stand-in for nginx:1.1x-alpine: busybox httpd on port 80 (nginx arguments ignored).\nexec httpd -f -v -p 80 -h /usr/share/nginx/html\n' > "$x/usr/sbin/nginx"
chmod 0755 "$x/usr/sbin/nginx"
for v in 1.14-alpine 1.15-alpine; do
  image "nginx-$v" "$x" "$REPO/library/nginx:$v" null '["nginx", "-g", "daemon off;"]' "" \
    "stand-in: busybox httpd serving /usr/share/nginx/html on port 80, as nginx's image"
done
rm -rf "$work"

cat > "$stage/repo-list.yaml" <<YAML
# KUBE_TEST_REPO_LIST for e2e.test: the registries of test/utils/image/manifest.go mapped to the
# images build-suite.sh made (loaded onto the nodes with clusterctl load). Registries not named
# here keep their defaults: invalid and authenticated registries must stay unreachable.
dockerLibraryRegistry: $REPO/library
e2eRegistry: $REPO/e2e
promoterE2eRegistry: $REPO/e2e-test-images
gcRegistry: $REPO/k8s
YAML

jq -n --argjson images "$images_json" --arg key "$key" --arg bundle "$bundle_key" --arg v "$version" \
  --argjson total "$total" --arg pkgs "$pkgs_key" '{
  formatVersion: 1, key: $key, kubernetesVersion: $v, bundleBuildKey: $bundle,
  conformanceTests: $total, packages: $pkgs, images: $images,
  binaries: ["bin/e2e.test", "bin/ginkgo"]
}' > "$stage/suite.json"
chmod -R a+rX,go-w "$stage"
rm -rf "$out"
mv "$stage" "$out"
trap - EXIT
log "conformance suite $key ready in $(( $(date +%s) - t_start )) s: $(du -sh "$out" | cut -f1)"
echo "$out"
