#!/usr/bin/env bash
# Runs every test of clusterctl on this machine, installing what a fresh Debian 12 machine lacks.
# Needs root (apt, debootstrap, network namespaces, libvirtd). Stages:
#   1. host packages (tests/bed/install-host-packages.sh)
#   2. cargo test --workspace: unit tests, the spec corpus, the SSH executor against real OpenSSH sshd
#      on 127.0.0.1, the engine and kill/resume tests with the fake provider, bundle and PKI tests
#   3. the node image: built (or reused from its input-hash cache) and booted once under QEMU TCG
#   4. real libvirt VMs inside a network namespace: the provider suite (conformance + e2e) and
#      a real Kubernetes cluster through the binary: create, workloads across nodes, kill and
#      resume, delete (tests/bed/libvirt-env.sh test, tests/bed/cli-e2e.sh)
# Big artifacts (cargo target dir, node image, Kubernetes bundle) are cached under
# /var/cache/clusterctl, keyed by their inputs; a warm machine skips rebuilding them.
set -euo pipefail
cd "$(dirname "$0")/.."
start=$(date +%s)
stage() { printf '\n==> %s (%ss)\n' "$*" "$(( $(date +%s) - start ))"; }

[ "$(id -u)" -eq 0 ] || { echo "run-all: must run as root (apt, namespaces, libvirtd)" >&2; exit 1; }
# One cargo target dir per checkout path: cargo keys workspace crates by their path relative to the
# workspace, so a target dir shared by two checkouts can reuse test binaries whose compile-time paths
# (insta snapshot dirs, CARGO_MANIFEST_DIR) point into the other checkout.
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-/var/cache/clusterctl/cargo-target/$(pwd -P | sha256sum | cut -c1-16)}
mkdir -p "$CARGO_TARGET_DIR"

stage "installing host packages"
./tests/bed/install-host-packages.sh

stage "cargo test --workspace (unit, spec corpus, real sshd, fake-provider engine)"
cargo test --workspace --locked

stage "Kubernetes test bundle (cached by input checksum; cold 6-18 min, warm 1 s)"
bundle=$(./tests/bed/build-k8s-bundle.sh)

stage "bundle proof: etcd + kube-apiserver from the bundle with clusterctl's PKI, images in containerd"
CLUSTERCTL_BUNDLE_TEST=1 CLUSTERCTL_BUNDLE="$bundle" cargo test --workspace --locked --test bundle_control_plane

stage "API client through a real sshd to the bundle's kube-apiserver: readiness, version, nodes, cordon, eviction with a PDB, refusals"
CLUSTERCTL_BUNDLE_TEST=1 CLUSTERCTL_BUNDLE="$bundle" cargo test --workspace --locked --test kube_client

stage "Kubernetes node templates: every rendered flag and config accepted by the real binaries"
CLUSTERCTL_BUNDLE_DIR="$bundle" cargo test --workspace --locked --test kubernetes_bundle
stage "kubeconfig files read back by the bundle's real kubectl"
CLUSTERCTL_BUNDLE_DIR="$bundle" cargo test -p clusterctl --locked --lib kubeconfig
CLUSTERCTL_BUNDLE_DIR="$bundle" cargo test -p clusterctl --locked --test get_credentials

stage "node image: build or reuse, boot once under QEMU TCG"
CLUSTERCTL_IMAGE_TEST=1 cargo test --workspace --locked --test boot -- --nocapture

stage "real libvirt VMs in a network namespace (provider suite, clusterctl end to end)"
CLUSTERCTL_BUNDLE_DIR="$bundle" ./tests/bed/libvirt-env.sh test

stage "all tests passed"
