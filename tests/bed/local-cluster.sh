#!/usr/bin/env bash
# A local cluster on this host: the embedded default (libvirt, examples/local.yaml: one control
# plane and two workers booted from clusterctl's own node image).
#
#   tests/bed/local-cluster.sh up      install packages, build clusterctl, the node image and the
#                                      Kubernetes bundle (all cached), bring up the libvirt bed,
#                                      `clusterctl create` from examples/local.yaml
#   tests/bed/local-cluster.sh exec CMD...  run CMD (e.g. `clusterctl get`, `kubectl get nodes`) where
#                                      the VMs are reachable; kubectl is the bundle's
#   tests/bed/local-cluster.sh down    `clusterctl delete local`, then tear the bed down
#
# On this test machine libvirtd runs inside a network namespace with no uplink (the project's
# network rule), so the cluster lives there too; on a host with a normal libvirtd you would run
# `clusterctl create -f examples/local.yaml` directly. This machine has no internet, so the spec's
# `upstream` artifacts are replaced by the offline bundle tests/bed/build-k8s-bundle.sh builds
# from Debian's source (Kubernetes 1.20.2); `create` merges the context `clusterctl-local` into
# ~/.kube/config (or $KUBECONFIG).
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd "$here/../.." && pwd)
export CLUSTERCTL_BED_STATE_ROOT=/run/clusterctl-bed-local
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-/var/cache/clusterctl/cargo-target/$(cd "$repo" && pwd -P | sha256sum | cut -c1-16)}  # as in tests/run-all.sh
bin=$CARGO_TARGET_DIR/debug/clusterctl
spec=/var/lib/clusterctl-local/cluster.yaml

case "${1:-}" in
  up)
    bash "$here/install-host-packages.sh" >&2
    (cd "$repo" && cargo build --locked -p clusterctl)
    # The image this checkout built (the directory `image build` prints), pinned in the spec by
    # version: `create` would otherwise boot the newest image in the cache, maybe another checkout's.
    image=$("$bin" image build | tail -n1)
    version=$(jq -r .version "$image/manifest.json")
    bundle=$(bash "$here/build-k8s-bundle.sh")
    mkdir -p "$(dirname "$spec")"
    { sed "s|^    channel: stable\$|    version: \"1.20.2\"\n    artifacts:\n      bundle:\n        path: $bundle|" \
        "$repo/examples/local.yaml"
      printf '  nodeImage:\n    version: "%s"\n' "$version"; } > "$spec"
    grep -q "path: $bundle" "$spec" || { echo "local-cluster: cannot point $spec at the bundle" >&2; exit 1; }
    export CLUSTERCTL_IMAGE_DIR=${image%/*}
    # A bed that is up is reused; one left by a killed run is reaped by `up`.
    bash "$here/libvirt-env.sh" exec true 2> /dev/null || bash "$here/libvirt-env.sh" up > /dev/null
    bash "$here/libvirt-env.sh" exec "$bin" create -f "$spec"
    bash "$here/libvirt-env.sh" exec "$bin" get local
    ;;
  exec)
    shift
    bundle=$(bash "$here/build-k8s-bundle.sh")
    bash "$here/libvirt-env.sh" exec env PATH="$(dirname "$bin"):$bundle/bin:$PATH" "$@"
    ;;
  down)
    if [ -f "$CLUSTERCTL_BED_STATE_ROOT/current" ]; then
      bash "$here/libvirt-env.sh" exec "$bin" delete local || true
      bash "$here/libvirt-env.sh" down
    fi
    ;;
  *) echo "usage: $0 up|exec CMD...|down" >&2; exit 2 ;;
esac
