#!/usr/bin/env bash
# End-to-end test of the clusterctl binary on libvirt: create / get / ssh / delete of a cluster of
# 1 control plane + 2 workers booted from clusterctl's own node image, inside the libvirt test bed.
#
#   tests/bed/cli-e2e.sh            build clusterctl, bring up a bed of its own (libvirt-env.sh),
#                                   run the test inside it, tear the bed down (also on failure)
#   tests/bed/cli-e2e.sh --inside   run the test in the current bed (libvirt-env.sh test uses this;
#                                   needs CLUSTERCTL_BIN and CLUSTERCTL_TEST_IMAGE)
#
# Environment:
#   CLUSTERCTL_TEST_IMAGE  node image directory (with manifest.json); default: the newest image in
#                          $CLUSTERCTL_IMAGE_DIR or /var/cache/clusterctl/images, built with
#                          `clusterctl image build` if there is none
#   CLUSTERCTL_E2E_PHASES  which parts to run: `clean kill` (default, two boot cycles: ~6 min on an
#                          idle 2-core host, far longer under load), or only `clean` or `kill`
#
# What it proves, through the binary only (phase `clean`: 1-3, phase `kill`: 4, 2, 3):
#   1. `create` from nothing: 3 domains running, each answering SSH with the host key clusterctl
#      generated and pinned (checked by `clusterctl ssh`, and the key read back from the machine);
#      a machine presenting another key than the pinned one is refused
#   2. `create` again changes nothing: same domains, volumes, networks, pools and host keys
#   3. `delete` removes every domain, volume, network and pool carrying the cluster's ID and the
#      cluster's state directory
#   4. `create` SIGKILLed while machines are being created, then run again: exactly 3 machines,
#      the same set of volumes as a clean create (nothing orphaned), all answering SSH; `delete`
#      then cleans up completely again
# Must run as root (the bed needs it).
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd "$here/../.." && pwd)

die() { echo "cli-e2e: FAIL: $*" >&2; exit 1; }
log() { echo "cli-e2e: $*" >&2; }

if [ "${1:-}" != --inside ]; then
  [ "$(id -u)" -eq 0 ] || die "must run as root (the libvirt bed needs it)"
  log "building clusterctl"
  (cd "$repo" && cargo build -q -p clusterctl)
  target_dir=$(cd "$repo" && cargo metadata --format-version 1 --no-deps | jq -r .target_directory)
  bin=$target_dir/debug/clusterctl
  if [ -z "${CLUSTERCTL_TEST_IMAGE:-}" ]; then
    image_dir=${CLUSTERCTL_IMAGE_DIR:-/var/cache/clusterctl/images}
    if ! "$bin" image list --image-dir "$image_dir" -o json | jq -e 'length > 0' > /dev/null; then
      log "no node image built yet: building one (several minutes)"
      nice -n 10 "$bin" image build --image-dir "$image_dir" >&2
    fi
    CLUSTERCTL_TEST_IMAGE=$("$bin" image list --image-dir "$image_dir" -o json | jq -r '.[-1].dir')
  fi
  export CLUSTERCTL_TEST_IMAGE
  # A bed of its own (own state root), so it never collides with a bed someone else has up.
  export CLUSTERCTL_BED_STATE_ROOT=/run/clusterctl-bed-cli-$$
  trap 'bash "$here/libvirt-env.sh" down; rmdir "$CLUSTERCTL_BED_STATE_ROOT" 2>/dev/null || true' EXIT INT TERM
  bash "$here/libvirt-env.sh" up > /dev/null
  CLUSTERCTL_BIN=$bin bash "$here/libvirt-env.sh" exec bash "$here/cli-e2e.sh" --inside
  exit 0
fi

bin=${CLUSTERCTL_BIN:?CLUSTERCTL_BIN must name the clusterctl binary}
image=${CLUSTERCTL_TEST_IMAGE:?CLUSTERCTL_TEST_IMAGE must name the node image directory}
[ -f "$image/manifest.json" ] || die "$image has no manifest.json"
virsh="virsh -q -c qemu:///system"
$virsh uri > /dev/null || die "libvirtd is not reachable: run inside the bed (libvirt-env.sh)"

work=$(mktemp -d /var/tmp/clusterctl-cli-e2e.XXXXXX)
name=e2e-cli
export CLUSTERCTL_STATE_DIR=$work/state
export CLUSTERCTL_IMAGE_DIR=$(dirname "$image")
unset CLUSTERCTL_ACCELERATOR
version=$(jq -r .version "$image/manifest.json")
storage=/var/lib/libvirt/images/clusterctl-cli-e2e

cleanup() {
  # Whatever happened: delete the cluster through clusterctl, then make sure nothing is left.
  if [ -d "$CLUSTERCTL_STATE_DIR/$name" ]; then
    "$bin" delete "$name" --wait -q || log "cleanup: clusterctl delete failed"
  fi
  rm -rf "$work"
}
trap cleanup EXIT

cat > "$work/cluster.yaml" <<EOF
apiVersion: clusterctl.io/v1alpha1
kind: Cluster
metadata:
  name: $name
spec:
  provider:
    libvirt:
      uri: qemu:///system
      storageDir: $storage
      network:
        mode: isolated
        cidr: 10.78.5.0/24
      accelerator: tcg
  nodeImage:
    version: $version
  kubernetes:
    channel: stable
  controlPlane:
    count: 1
    machine: {cpus: 2, memory: 1800Mi, disk: 4Gi}
  nodePools:
    - name: workers
      count: 2
      machine: {cpus: 1, memory: 1Gi, disk: 4Gi}
EOF
machines="$name-cp-0 $name-workers-0 $name-workers-1"

cluster_id() { jq -r .id "$CLUSTERCTL_STATE_DIR/$name/cluster.json"; }

# Everything in libvirt that belongs to cluster $1 (by ID), one sorted line per object; volume
# lines name the pool by role, so two clusters' inventories compare equal.
inventory() {
  local id=$1 d p
  local xml
  # (The XML is read first: `virsh ... | grep -q` fails under pipefail when grep exits early.)
  for d in $($virsh list --all --name); do
    xml=$($virsh dumpxml "$d")
    case $xml in *"id=\"$id\""*) echo "domain $d $($virsh domstate "$d")" ;; esac
  done
  for n in $($virsh net-list --all --name); do
    xml=$($virsh net-dumpxml "$n")
    case $xml in *"$id"*) echo "network ${n//$id/ID}" ;; esac
  done
  for p in $($virsh pool-list --all --name); do
    case $p in
      *"$id"*)
        echo "pool ${p//$id/ID}"
        $virsh pool-refresh "$p" > /dev/null 2>&1 || true
        $virsh vol-list "$p" | awk '{print $1}' | sed "s/$id/ID/g" | sort | sed 's/^/volume /'
        ;;
    esac
  done
}

# What libvirt must hold for a complete cluster: 3 running domains, its network and pool, the
# pool's owner marker, the image's 4 volumes and 3 volumes per machine. Nothing else.
check_inventory() {
  local inv=$1 m want
  want=$(
    for m in $machines; do echo "domain $m running"; done
    echo "network clusterctl-ID"
    echo "pool clusterctl-ID"
    { echo "volume clusterctl-owner-ID"
      for m in $machines; do printf 'volume %s-data.qcow2\nvolume %s-root.qcow2\nvolume %s-seed.img\n' "$m" "$m" "$m"; done
      grep '^volume image-' <<< "$inv" || true; } | sort
  )
  [ "$(grep -c '^volume image-' <<< "$inv")" -eq 4 ] || die "want 4 image volumes: $inv"
  [ "$(sort <<< "$inv")" = "$(sort <<< "$want")" ] || die "libvirt objects of the cluster are not exactly the expected ones: have: $inv want: $want"
}

check_running() {
  local json count
  json=$("$bin" get "$name" -o json)
  count=$(jq '.machines | length' <<< "$json")
  [ "$count" -eq 3 ] || die "get shows $count machines, want 3: $json"
  for m in $machines; do
    jq -e --arg m "$m" '.machines[] | select(.name == $m and .state == "running" and (.addresses | length) > 0)' <<< "$json" > /dev/null \
      || die "machine $m is not running with an address: $json"
  done
  [ "$(jq -r .status <<< "$json")" = provisioned ] || die "cluster status is not provisioned: $json"
}

check_ssh() {
  local m out pinned actual
  for m in $machines; do
    out=$("$bin" ssh "$name" "$m" -- hostname) || die "clusterctl ssh $m failed"
    [ "$out" = "$m" ] || die "machine $m calls itself '$out'"
    pinned=$(jq -r --arg m "$m" '.ssh_host_keys[$m]' "$CLUSTERCTL_STATE_DIR/$name/cluster.json" | awk '{print $1, $2}')
    actual=$("$bin" ssh "$name" "$m" -- cat /etc/ssh/ssh_host_ed25519_key.pub | awk '{print $1, $2}')
    [ -n "$pinned" ] && [ "$pinned" = "$actual" ] || die "machine $m has host key '$actual', pinned '$pinned'"
  done
  log "all 3 machines answer ssh as themselves with the pinned host key"
}

check_gone() {
  local id=$1 left
  left=$(inventory "$id")
  [ -z "$left" ] || die "left behind after delete of cluster $id: $left"
  [ ! -e "$storage/$id" ] || die "storage directory $storage/$id is left behind"
  [ ! -e "$CLUSTERCTL_STATE_DIR/$name" ] || die "state directory $CLUSTERCTL_STATE_DIR/$name is left behind"
}

check_secrets() {
  local f
  for f in ssh-client-key $(for m in $machines; do echo "ssh-host-key-$m"; done); do
    [ "$(stat -c %a "$CLUSTERCTL_STATE_DIR/$name/$f")" = 600 ] || die "secret $f is not mode 0600"
  done
}

# Only the pinned key is trusted: pin another key for one machine and `ssh` must refuse it.
check_pinned_only() {
  local other
  cp "$CLUSTERCTL_STATE_DIR/$name/cluster.json" "$work/cluster.json.good"
  rm -f "$work/otherkey" "$work/otherkey.pub"
  ssh-keygen -q -t ed25519 -N '' -f "$work/otherkey" > /dev/null
  other=$(cut -d' ' -f1,2 "$work/otherkey.pub")
  jq --arg m "$name-cp-0" --arg k "$other" '.ssh_host_keys[$m] = $k' "$work/cluster.json.good" > "$CLUSTERCTL_STATE_DIR/$name/cluster.json"
  if "$bin" ssh "$name" "$name-cp-0" -- true 2> "$work/wrongkey.log"; then
    cp "$work/cluster.json.good" "$CLUSTERCTL_STATE_DIR/$name/cluster.json"
    die "clusterctl ssh accepted a host key that is not the pinned one"
  fi
  cp "$work/cluster.json.good" "$CLUSTERCTL_STATE_DIR/$name/cluster.json"
  grep -qi "host key" "$work/wrongkey.log" || { cat "$work/wrongkey.log" >&2; die "the refusal does not name the host key"; }
  log "a host key other than the pinned one is refused"
}

# `create` again: plans nothing, changes no libvirt object and no host key.
check_again() {
  local id=$1 before keys
  before=$(inventory "$id")
  keys=$(jq -S .ssh_host_keys "$CLUSTERCTL_STATE_DIR/$name/cluster.json")
  "$bin" create -f "$work/cluster.yaml" 2> "$work/again.log" || { cat "$work/again.log" >&2; die "create again failed"; }
  grep -q '0 to create or start, 0 to delete, 3 unchanged' "$work/again.log" || { cat "$work/again.log" >&2; die "create again planned changes"; }
  [ "$(inventory "$id")" = "$before" ] || die "create again changed libvirt objects"
  [ "$(jq -S .ssh_host_keys "$CLUSTERCTL_STATE_DIR/$name/cluster.json")" = "$keys" ] || die "create again changed host keys"
  check_ssh
  log "create again changed nothing"
}

phases=${CLUSTERCTL_E2E_PHASES:-clean kill}

# ---- clean: create from nothing, create again, delete ----
if [[ " $phases " == *" clean "* ]]; then
log "clean 1. create from nothing"
start=$SECONDS
"$bin" create -f "$work/cluster.yaml" --ssh-timeout 1500 2> "$work/create1.log" || { cat "$work/create1.log" >&2; die "create failed"; }
create_secs=$((SECONDS - start))
cat "$work/create1.log" >&2
grep -q '^==> Waiting for SSH' "$work/create1.log" || die "no 'Waiting for SSH' phase in the output"
log "create from nothing took ${create_secs} s"
check_running
check_ssh
id=$(cluster_id)
check_inventory "$(inventory "$id")"
check_secrets
check_pinned_only
check_again "$id"
log "clean 3. delete"
"$bin" delete "$name" || die "delete failed"
check_gone "$id"
log "delete left nothing of cluster $id"
fi

# ---- kill: create SIGKILLed while machines are being created, create again, delete ----
if [[ " $phases " == *" kill "* ]]; then
log "kill 1. create from nothing, SIGKILL while machines are being created"
"$bin" create -f "$work/cluster.yaml" --ssh-timeout 1500 2> "$work/create3.log" &
pid=$!
for _ in $(seq 1 3000); do
  grep -q ': creating$' "$work/create3.log" 2>/dev/null && break
  kill -0 "$pid" 2>/dev/null || break
  sleep 0.1
done
grep -q ': creating$' "$work/create3.log" || { cat "$work/create3.log" >&2; die "create never reached 'creating'"; }
sleep 3
kill -9 "$pid" 2>/dev/null || die "create finished before it could be killed"
wait "$pid" 2>/dev/null || true
cat "$work/create3.log" >&2
log "killed create (pid $pid) while creating machines"
id2=$(cluster_id)
log "kill 2. create again (resumes)"
start=$SECONDS
"$bin" create -f "$work/cluster.yaml" --ssh-timeout 1500 2> "$work/create4.log" || { cat "$work/create4.log" >&2; die "resumed create failed"; }
cat "$work/create4.log" >&2
log "resumed create took $((SECONDS - start)) s"
[ "$(cluster_id)" = "$id2" ] || die "the resumed create changed the cluster ID"
check_running
check_ssh
check_inventory "$(inventory "$id2")"
check_secrets
check_pinned_only
log "after kill and resume: exactly 3 machines, nothing orphaned"
check_again "$id2"
log "kill 4. delete"
"$bin" delete "$name" || die "delete after resume failed"
check_gone "$id2"
log "delete left nothing of cluster $id2"
fi
log "PASS (phases: $phases)"
