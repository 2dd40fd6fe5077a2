#!/usr/bin/env bash
# The libvirt test bed: libvirtd and virtlogd inside a network namespace with no uplink.
#
#   libvirt-env.sh up            create the bed, print its name (state in /run/clusterctl-bed/current);
#                                a bed left at this state root by a killed run is reaped first
#   libvirt-env.sh reap          reap the bed at this state root if its holder is gone (else no-op)
#   libvirt-env.sh exec CMD...   run CMD inside the bed (its network and mount namespace)
#   libvirt-env.sh down          tear the bed down: VMs, networks, pools, daemons, namespace, files
#   libvirt-env.sh test [PART]   up, build or reuse the node image, run the tests, down (down also
#                                runs when a test fails or the script is interrupted). PART:
#                                `provider` (the providers crate's libvirt suite), `e2e`
#                                (tests/bed/cli-e2e.sh), `all` (default: both, in one bed)
#
# Isolation: the bed is a network namespace `clusterctl-bed-<pid>` (loopback only, no veth to the
# host) plus a private mount namespace in which /etc/libvirt, /run/libvirt, /var/lib/libvirt,
# /var/cache/libvirt and /var/log/libvirt are bind mounts of a per-bed directory. So the bed's
# libvirtd shares no state, socket or config with any other libvirtd on the machine, its
# `qemu:///system` socket exists only inside the bed, and libvirt's `default` network is removed
# from the bed's config so it can never be autostarted. Bridges, dnsmasq and QEMU live in the
# namespace; every process that talks to the VMs runs in it through `exec`.
#
# Must run as root (namespaces, libvirtd). Root is also needed by `test` for debootstrap.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd "$here/../.." && pwd)
# CLUSTERCTL_BED_STATE_ROOT lets a second bed (e.g. cli-e2e.sh) run beside one that is up.
state_root=${CLUSTERCTL_BED_STATE_ROOT:-/run/clusterctl-bed}
current=$state_root/current

die() { echo "libvirt-env: $*" >&2; exit 1; }
log() { echo "libvirt-env: $*" >&2; }

[ "$(id -u)" -eq 0 ] || die "must run as root (network namespaces and libvirtd need it)"

load() {
  [ -f "$current" ] || die "no bed is up (run: $0 up)"
  # shellcheck disable=SC1090
  . "$current"
  bed_alive || die "bed $BED_NAME is broken (holder process gone); run: $0 down (or $0 up, which reaps it)"
}

# True if the bed in $current is alive: its holder is still the bed's `sleep infinity` inside the
# bed's network namespace (a PID alone could have been reused by an unrelated process).
bed_alive() {
  local BED_NAME='' BED_HOLDER='' BED_CREATOR=''
  # shellcheck disable=SC1090
  . "$current"
  if [ -z "$BED_HOLDER" ]; then
    # Still being made (the holder is recorded a moment after the file is written) while the
    # `up` that writes it runs.
    [ -n "$BED_CREATOR" ] && tr '\0' ' ' 2>/dev/null < "/proc/$BED_CREATOR/cmdline" | grep -q 'libvirt-env\.sh'
    return
  fi
  [ -r "/proc/$BED_HOLDER/cmdline" ] || return 1
  [ "$(tr '\0' ' ' 2>/dev/null < "/proc/$BED_HOLDER/cmdline")" = "sleep infinity " ] || return 1
  ip netns identify "$BED_HOLDER" 2>/dev/null | grep -qxF "$BED_NAME"
}

# A bed whose holder is gone was left by a killed run: nothing can enter it any more, but its
# namespace, daemons and VMs may still run. Reap it: end exactly the processes inside its network
# namespace (they are all the bed's), delete the namespace, its directory and the current file.
reap() {
  [ -f "$current" ] || return 0
  if bed_alive; then return 0; fi
  local name dir holder pids
  # shellcheck disable=SC1090
  read -r name dir holder < <(. "$current"; echo "${BED_NAME:-?} ${BED_DIR:-?} ${BED_HOLDER:-none}")
  pids=$(ip netns pids "$name" 2>/dev/null | tr '\n' ' ' || true)
  log "reaping bed $name left by a killed run (holder $holder gone): namespace $name, \
processes [${pids% }], directory $dir"
  for p in $pids; do log "  reaping pid $p: $(tr '\0' ' ' 2>/dev/null < "/proc/$p/cmdline" | cut -c1-100)"; done
  teardown
}

in_bed() {
  # nsenter keeps the environment; the working directory is re-entered explicitly.
  nsenter --target "$BED_HOLDER" --mount --net -- /bin/sh -c 'cd "$0" 2>/dev/null || cd /; exec "$@"' "$PWD" "$@"
}

up() {
  reap
  [ ! -f "$current" ] || die "a bed is already up ($(grep BED_NAME "$current")); run: $0 down"
  bash "$here/install-host-packages.sh" >&2
  local name=clusterctl-bed-$$
  local dir=/var/tmp/$name
  mkdir -p "$state_root" "$dir"
  chmod 0700 "$dir"
  # BED_RUN: the tests/run-all.sh run that made it (torn down by that run's stage budgets).
  printf 'BED_NAME=%s\nBED_DIR=%s\nBED_CREATOR=%s\nBED_RUN=%s\n' "$name" "$dir" "$$" "${CLUSTERCTL_RUN_ID:-}" > "$current"

  log "creating network namespace $name (loopback only)"
  ip netns add "$name"
  ip -n "$name" link set lo up

  # Private copies of libvirt's config and state directories.
  for d in etc/libvirt run/libvirt var/lib/libvirt var/cache/libvirt var/log/libvirt; do
    mkdir -p "$dir/$d" "/$d"
  done
  cp -a /etc/libvirt/. "$dir/etc/libvirt/"
  rm -f "$dir/etc/libvirt/qemu/networks/autostart/default.xml" "$dir/etc/libvirt/qemu/networks/default.xml"
  # No systemd, no AppArmor profiles inside the bed: QEMU runs without a security driver here.
  printf '\n# clusterctl test bed\nsecurity_driver = "none"\n' >> "$dir/etc/libvirt/qemu.conf"
  mkdir -p "$dir/var/lib/libvirt/images" "$dir/var/log/libvirt/qemu"

  # The holder keeps the namespaces alive; its mount namespace has the bind mounts.
  ip netns exec "$name" unshare --mount --propagation private /bin/sh -c '
    set -e
    for d in etc/libvirt run/libvirt var/lib/libvirt var/cache/libvirt var/log/libvirt; do
      mount --bind "$0/$d" "/$d"
    done
    exec sleep infinity' "$dir" &
  local holder=$!
  echo "BED_HOLDER=$holder" >> "$current"
  # shellcheck disable=SC1090
  . "$current"
  local i=0
  until in_bed test -d /etc/libvirt/qemu && in_bed sh -c "grep -q clusterctl /etc/libvirt/qemu.conf" 2>/dev/null; do
    i=$((i + 1)); [ "$i" -lt 50 ] || die "the bed's mount namespace did not come up"
    sleep 0.1
  done

  log "starting virtlogd and libvirtd inside $name"
  in_bed virtlogd --pid-file "$dir/virtlogd.pid" > "$dir/virtlogd.out" 2>&1 &
  echo "BED_VIRTLOGD=$!" >> "$current"
  in_bed libvirtd --pid-file "$dir/libvirtd.pid" > "$dir/libvirtd.out" 2>&1 &
  echo "BED_LIBVIRTD=$!" >> "$current"
  local start=$SECONDS
  i=0
  until in_bed virsh -q -c qemu:///system uri > /dev/null 2>&1; do
    i=$((i + 1)); [ "$i" -lt 600 ] || { tail -20 "$dir/libvirtd.out" >&2; die "libvirtd did not become ready within 60 s"; }
    sleep 0.1
  done
  log "libvirtd ready after $((SECONDS - start)) s"
  if in_bed virsh -q -c qemu:///system net-list --all --name | grep -qx default; then
    die "libvirt's default network exists inside the bed; refusing to continue"
  fi
  echo "$name"
}

down() {
  [ -f "$current" ] || { log "no bed is up"; return 0; }
  teardown
}

teardown() {
  BED_NAME='' BED_DIR='' BED_HOLDER=''
  # shellcheck disable=SC1090
  . "$current"
  log "tearing down ${BED_NAME:-a half-made bed}"
  if bed_alive; then
    # Orderly first, so libvirt cleans up cgroups, bridges and dnsmasq itself.
    # A wedged libvirtd must not stop the teardown: every call is bounded.
    local v="timeout 20 virsh -q -c qemu:///system"
    for d in $(in_bed $v list --all --name 2>/dev/null); do
      in_bed $v destroy "$d" > /dev/null 2>&1 || true
      in_bed $v undefine "$d" > /dev/null 2>&1 || true
    done
    for n in $(in_bed $v net-list --all --name 2>/dev/null); do
      in_bed $v net-destroy "$n" > /dev/null 2>&1 || true
      in_bed $v net-undefine "$n" > /dev/null 2>&1 || true
    done
    for p in $(in_bed $v pool-list --all --name 2>/dev/null); do
      in_bed $v pool-destroy "$p" > /dev/null 2>&1 || true
      in_bed $v pool-undefine "$p" > /dev/null 2>&1 || true
    done
  fi
  # Every process left in the bed's network namespace was started by the bed (daemons, dnsmasq,
  # QEMU, the holder): end them by PID.
  local pids=''
  if [ -n "$BED_NAME" ]; then
    pids=$(ip netns pids "$BED_NAME" 2>/dev/null || true)
    # shellcheck disable=SC2086 # one PID per word
    [ -z "$pids" ] || kill $pids 2>/dev/null || true
    for _ in $(seq 1 100); do
      pids=$(ip netns pids "$BED_NAME" 2>/dev/null || true)
      [ -n "$pids" ] || break
      sleep 0.1
    done
    # shellcheck disable=SC2086
    [ -z "$pids" ] || { log "killing what did not end on TERM: $pids"; kill -9 $pids 2>/dev/null || true; }
    ip netns del "$BED_NAME" 2>/dev/null || true
  fi
  # Only ever a directory this script made.
  case "$BED_DIR" in /var/tmp/clusterctl-bed-[0-9]*) rm -rf "$BED_DIR" ;; esac
  rm -f "$current"
  log "bed $BED_NAME removed"
}

image() {
  # The real node image when CLUSTERCTL_TEST_IMAGE names one (built by `clusterctl image build`),
  # else the stopgap dev image.
  if [ -n "${CLUSTERCTL_TEST_IMAGE:-}" ]; then
    [ -f "$CLUSTERCTL_TEST_IMAGE/manifest.json" ] || die "CLUSTERCTL_TEST_IMAGE=$CLUSTERCTL_TEST_IMAGE has no manifest.json"
    echo "$CLUSTERCTL_TEST_IMAGE"
    return
  fi
  # `clusterctl image build` (nodeimage crate) caches images under /var/cache/clusterctl/images,
  # keyed by the hash of their inputs; an unchanged rebuild is a no-op.
  # The image is the one this checkout's build printed (its directory, on stdout), never "the newest
  # in the cache", which may come from another checkout.
  log "building (or reusing) the node image with clusterctl image build"
  local built
  built=$(cd "$repo" && cargo run -q -p clusterctl -- image build | tail -n1) || die "clusterctl image build failed"
  [ -f "$built/manifest.json" ] || die "clusterctl image build printed '$built', which has no manifest.json"
  echo "$built"
}

run_tests() {
  local parts=$1 img
  img=$(image)
  log "node image: $img"
  case "$parts" in all | provider) run_provider "$img" ;; esac
  case "$parts" in all | e2e) run_e2e "$img" ;; esac
}

run_provider() {
  local img=$1
  # Build outside the bed (crates.io is not reachable from inside it), run inside.
  (cd "$repo" && cargo build -q -p providers --features libvirt --example libvirt_ensure \
    && cargo test -q -p providers --features libvirt --no-run)
  local start=$SECONDS
  CLUSTERCTL_LIBVIRT_E2E=1 CLUSTERCTL_LIBVIRT_URI=qemu:///system CLUSTERCTL_TEST_IMAGE=$img \
    CLUSTERCTL_E2E_STORAGE_ROOT=/var/lib/libvirt/images/clusterctl-e2e \
    in_bed sh -c "cd '$repo' && cargo test --offline -p providers --features libvirt -- --nocapture --test-threads=1"
  log "libvirt suite passed in $((SECONDS - start)) s"
}

run_e2e() {
  local img=$1 bundle
  # The Kubernetes bundle the clusterctl e2e bootstraps from (cached by input checksum).
  bundle=${CLUSTERCTL_BUNDLE_DIR:-$(bash "$here/build-k8s-bundle.sh")}
  log "kubernetes bundle: $bundle"
  # The clusterctl binary end to end: a real Kubernetes cluster on 3 VMs.
  (cd "$repo" && cargo build -q -p clusterctl)
  local target_dir
  target_dir=$(cd "$repo" && cargo metadata --format-version 1 --no-deps | jq -r .target_directory)
  local start=$SECONDS
  CLUSTERCTL_BIN=$target_dir/debug/clusterctl CLUSTERCTL_TEST_IMAGE=$img CLUSTERCTL_BUNDLE_DIR=$bundle \
    in_bed bash "$here/cli-e2e.sh" --inside
  log "clusterctl e2e passed in $((SECONDS - start)) s"
}

case "${1:-}" in
  up) up ;;
  down) down ;;
  reap) reap ;;
  exec)
    shift
    [ "$#" -gt 0 ] || die "usage: $0 exec CMD..."
    load
    in_bed "$@"
    ;;
  test)
    parts=${2:-all}
    case "$parts" in all | provider | e2e) ;; *) die "usage: $0 test [all|provider|e2e]" ;; esac
    trap down EXIT INT TERM
    up > /dev/null
    load
    run_tests "$parts"
    ;;
  *) die "usage: $0 up|down|reap|exec CMD...|test [all|provider|e2e]" ;;
esac
