#!/usr/bin/env bash
# Runs every test of clusterctl on this machine, installing what a fresh Debian 12 machine lacks.
# Needs root (apt, debootstrap, network namespaces, libvirtd) and a Rust toolchain (rustup; the
# version is pinned in rust-toolchain.toml). Stages, each under a time budget (seconds; cold times
# measured on an idle 2-core machine in brackets):
#   packages   90  host packages (tests/bed/install-host-packages.sh) [30 s cold on a new machine]
#   cargo    1500  cargo test --workspace: unit tests, the spec corpus, the SSH executor against
#                  real OpenSSH sshd on 127.0.0.1, the engine and kill/resume tests with the fake
#                  provider, the GCE provider against its fakes, bundle and PKI tests [456 s before
#                  kube-rs and k8s-openapi joined; 772 s in CI; more than 870 s from an empty target
#                  dir on 2026-12-01; 1178 s from an empty target dir on 2026-12-02 with the GCE
#                  code, while other cargo builds shared the 2 cores]
#   bundle    900  the offline Kubernetes test bundle (tests/bed/build-k8s-bundle.sh) [307 s with
#                  Go's build cache warm; on a new machine on 2026-12-02 the cold build was cut at
#                  its old 360 s budget while a cargo build shared the 2 cores, and a second run
#                  finished in 213 s: about 9 min cold; 541 s cold on another new machine]; with
#                  phase upgrade-kubernetes in CLUSTERCTL_E2E_PHASES (not in CI's list), also
#                  the same tree relinked as v1.20.3 [67 s]
#   suite    1200  the upstream conformance suite from the bundle's tree (tests/conformance/
#                  build-suite.sh: e2e.test, ginkgo, the test images; cached by input checksum)
#                  [226 s cold after the bundle on a new machine on 2026-12-03; 55 s warm]
#   k8s       150  the bundle's proofs: etcd + kube-apiserver from the bundle with clusterctl's PKI
#                  (custom resources included), clusterctl's API client through a real sshd
#                  (access grants, revocation and the API server's 10 s token cache included),
#                  the node templates' flags and configs accepted by the real binaries, kubeconfig
#                  files read back by the real kubectl [about 45 s of tests; 144 s wall with a
#                  cold build of the test binaries on 2026-12-01]
#   image     540  the node image: `clusterctl image build` (or reuse), whose printed directory
#                  every later stage uses (CLUSTERCTL_TEST_IMAGE) [84 s; 167 s cold with the GCE
#                  disk on 2026-12-02, of which 30 s make the GCE disk], and a second one with
#                  one more package (`--add-package less`) the e2e upgrades to
#                  (CLUSTERCTL_TEST_IMAGE_V2) [217 s]. Since the updates and security suites
#                  (2026-12-03, host load 5-7): 273 s cold (211 s without them on the same host),
#                  the second 258 s, 82 s warm (60 s); a reuse fetches the package lists (2-6 s).
#                  Budget raised from 420 s for that.
#   boot      330  that image booted under QEMU TCG (nodeimage's boot test) [~50 s; 70 s; 84-90 s on 2026-12-01],
#                  and its GCE disk on UEFI firmware with its seed from a metadata server, booted
#                  twice (the gce_boot test) [109 s on 2026-12-02]
#   provider  400  real libvirt VMs in a network namespace: the provider suite, conformance (day 2
#                  included: stop, reset, boot-disk replacement) + e2e
#                  (tests/bed/libvirt-env.sh test provider) [186-197 s with day 2; over 230 s on 2026-12-01]
#   e2e      4400  one real Kubernetes cluster through the binary, through cli-e2e.sh's named phases
#                  (create with kills and resume, workloads, drain, node-services, webhooks,
#                  custom-resources, conformance, access, repair, upgrade, access-expired,
#                  unreachable, scale-down, resize, delete)
#                  (tests/bed/libvirt-env.sh test e2e) [2626 s on this 2-core host on a quiet
#                  day, over 3400 s on a busy one (CI of 2026-12-01 was cut at 3020 s in phase
#                  drain, every phase 1.3-2.4x slower; on 2026-12-01 create took 601 s,
#                  the first five phases 873 s against 549); upgrade alone 1245-1612 s]
# Every stage also ends at the run's deadline, 86 min after the start (tests/bed/stage.sh): a hang
# anywhere ends the run inside CI's 90 minutes, while a slow e2e may use what faster stages left.
# A stage over its budget or the deadline is diagnosed (what it waited for, operation journals,
# virsh list and VM console logs), killed, and the run's test beds torn down. The run ends with a
# table of stage times, pass or fail.
# For local runs: CLUSTERCTL_STAGES="image boot" runs only those stages; CLUSTERCTL_STAGE_BUDGET_<NAME>
# overrides a budget; CLUSTERCTL_RUN_DEADLINE=SECONDS the run's deadline; CLUSTERCTL_STAGE_HANG=NAME
# makes a stage hang on purpose (.ci/run ignores all four).
# Big artifacts (cargo target dir, node image, Kubernetes bundle) are cached under
# /var/cache/clusterctl, keyed by their inputs; a warm machine skips rebuilding them.
set -euo pipefail
cd "$(dirname "$0")/.."

[ "$(id -u)" -eq 0 ] || { echo "run-all: must run as root (apt, namespaces, libvirtd)" >&2; exit 1; }
command -v cargo > /dev/null || { echo "run-all: no cargo: install Rust with rustup (see README, Prerequisites)" >&2; exit 1; }
# One cargo target dir per checkout path: cargo keys workspace crates by their path relative to the
# workspace, so a target dir shared by two checkouts can reuse test binaries whose compile-time paths
# (insta snapshot dirs, CARGO_MANIFEST_DIR) point into the other checkout.
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-/var/cache/clusterctl/cargo-target/$(pwd -P | sha256sum | cut -c1-16)}
mkdir -p "$CARGO_TARGET_DIR"

# This run's directory: stage logs, process groups, and CLUSTERCTL_DIAG_DIR, where scripts say what
# they are waiting for (cli-e2e.sh writes `e2e`: phase, waiting for, state dir).
run_dir=/run/clusterctl-ci/$$
rm -rf "$run_dir"
mkdir -p "$run_dir/diag" "$run_dir/out"
CLUSTERCTL_RUN_ID=$$-$(date +%s)
export CLUSTERCTL_RUN_ID CLUSTERCTL_DIAG_DIR=$run_dir/diag
# The run's own bed state root: never collides with a bed someone has up at the default root.
export CLUSTERCTL_BED_STATE_ROOT=/run/clusterctl-bed-ci-$$
out=$run_dir/out
run_t0=$SECONDS
# shellcheck source=tests/bed/stage.sh
. tests/bed/stage.sh
stage_register_run

# An interrupted run (CI cancel, Ctrl-C) still ends its stage, tears down its beds and prints the table.
trap stage_interrupted INT TERM

# What a killed earlier run left behind (its stage still running, its beds, dead beds anywhere).
stage_reap_dead_runs

# Stage bodies run in the stage's own shell (exported functions, set -euo pipefail); values for
# later stages go through files in $out, so a stage selected alone can also find or make them.
bundle_dir() {
  if [ -s "$out/bundle" ]; then cat "$out/bundle"; else ./tests/bed/build-k8s-bundle.sh; fi
}
# The bundle the e2e's Kubernetes upgrade goes to: the same 1.20.2 code stamped v1.20.3.
# Only a local run that names phase upgrade-kubernetes needs it (not in CI's list: its time).
wants_bundle_v2() { case " ${CLUSTERCTL_E2E_PHASES:-} " in *" upgrade-kubernetes "*) return 0 ;; *) return 1 ;; esac; }
bundle_dir_v2() {
  if [ -s "$out/bundle2" ]; then cat "$out/bundle2"; else ./tests/bed/build-k8s-bundle.sh --kube-version v1.20.3; fi
}
test_image() {
  if [ -s "$out/image" ]; then cat "$out/image"; else cargo run -q --locked -p clusterctl -- image build | tail -n1; fi
}
# The second image the e2e upgrades to: the first plus one Debian package (a real, different image).
test_image_v2() {
  if [ -s "$out/image2" ]; then cat "$out/image2"; else cargo run -q --locked -p clusterctl -- image build --add-package less | tail -n1; fi
}
stage_bundle() {
  ./tests/bed/build-k8s-bundle.sh > "$out/bundle"; echo "bundle: $(cat "$out/bundle")"
  if wants_bundle_v2; then
    # Relinks the same tree with another version string (Go's build cache is warm by now).
    ./tests/bed/build-k8s-bundle.sh --kube-version v1.20.3 > "$out/bundle2"; echo "bundle for the upgrade: $(cat "$out/bundle2")"
  fi
}
stage_k8s() {
  local bundle
  bundle=$(bundle_dir)
  echo "etcd + kube-apiserver from the bundle with clusterctl's PKI, images in containerd"
  CLUSTERCTL_BUNDLE_TEST=1 CLUSTERCTL_BUNDLE="$bundle" cargo test --workspace --locked --test bundle_control_plane
  echo "the API client through a real sshd to the bundle's kube-apiserver: readiness, version, nodes, cordon, eviction with a PDB, refusals"
  CLUSTERCTL_BUNDLE_TEST=1 CLUSTERCTL_BUNDLE="$bundle" cargo test --workspace --locked --test kube_client
  echo "node templates: every rendered flag and config accepted by the real binaries"
  CLUSTERCTL_BUNDLE_DIR="$bundle" cargo test --workspace --locked --test kubernetes_bundle
  echo "kubeconfig files read back by the bundle's real kubectl"
  # --workspace like the cargo stage: the same features, so nothing is compiled again here.
  CLUSTERCTL_BUNDLE_DIR="$bundle" cargo test --workspace --locked --lib kubeconfig
  CLUSTERCTL_BUNDLE_DIR="$bundle" cargo test --workspace --locked --test get_credentials
}
stage_image() {
  # The directory `image build` prints is this checkout's image, not "the newest in the cache".
  cargo run -q --locked -p clusterctl -- image build | tail -n1 > "$out/image"
  [ -f "$(cat "$out/image")/manifest.json" ] || { echo "image build printed '$(cat "$out/image")': no manifest.json"; exit 1; }
  echo "node image: $(cat "$out/image")"
  cargo run -q --locked -p clusterctl -- image build --add-package less | tail -n1 > "$out/image2"
  [ -f "$(cat "$out/image2")/manifest.json" ] || { echo "image build printed '$(cat "$out/image2")': no manifest.json"; exit 1; }
  echo "second node image (for the upgrade): $(cat "$out/image2")"
}
stage_boot() {
  CLUSTERCTL_TEST_IMAGE=$(test_image) CLUSTERCTL_IMAGE_TEST=1 \
    cargo test --workspace --locked --test boot --test gce_boot -- --nocapture --test-threads 1
}
stage_libvirt() {
  CLUSTERCTL_TEST_IMAGE=$(test_image)
  export CLUSTERCTL_TEST_IMAGE
  # Only the cluster e2e needs the Kubernetes bundle.
  if [ "$1" = e2e ]; then
    CLUSTERCTL_BUNDLE_DIR=$(bundle_dir)
    if wants_bundle_v2; then CLUSTERCTL_BUNDLE_DIR_V2=$(bundle_dir_v2); else CLUSTERCTL_BUNDLE_DIR_V2=; fi
    CLUSTERCTL_TEST_IMAGE_V2=$(test_image_v2)
    export CLUSTERCTL_BUNDLE_DIR CLUSTERCTL_BUNDLE_DIR_V2 CLUSTERCTL_TEST_IMAGE_V2
  fi
  ./tests/bed/libvirt-env.sh test "$1"
}
export out
export -f wants_bundle_v2 bundle_dir bundle_dir_v2 test_image test_image_v2 stage_bundle stage_k8s stage_image stage_boot stage_libvirt

run_stage packages 90 "host packages" ./tests/bed/install-host-packages.sh
run_stage cargo 1500 "cargo test --workspace (unit, spec corpus, real sshd, fake-provider engine)" \
  cargo test --workspace --locked
run_stage bundle 900 "Kubernetes test bundle (cached by input checksum; cold ~9 min, warm 1 s)" stage_bundle
run_stage suite 1200 "upstream conformance suite: e2e.test, ginkgo and the test images from the bundle's tree (cached by input checksum)" \
  ./tests/conformance/build-suite.sh
run_stage k8s 150 "bundle proofs: control plane from the bundle, node templates, kubeconfig with the real kubectl" stage_k8s
run_stage image 540 "node images: build or reuse (the second one for the upgrade)" stage_image
run_stage boot 330 "node image booted under QEMU TCG: direct kernel boot, and its GCE disk on UEFI" stage_boot
run_stage provider 400 "real libvirt VMs in a network namespace: provider conformance + e2e" stage_libvirt provider
run_stage e2e 4400 "a real Kubernetes cluster through clusterctl (tests/bed/cli-e2e.sh)" stage_libvirt e2e

trap - INT TERM
rmdir "$CLUSTERCTL_BED_STATE_ROOT" 2>/dev/null || true
stage_table
if [ -n "$stage_stopped" ]; then
  echo "run-all: FAILED at stage $stage_stopped (stage logs in $run_dir)" >&2
  exit 1
fi
rm -rf "$run_dir"
echo "run-all: all tests passed"
