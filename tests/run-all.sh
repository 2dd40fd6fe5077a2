#!/usr/bin/env bash
# Runs every test of clusterctl on this machine, installing what a fresh Debian 12 machine lacks.
# Stages: host packages, the Rust workspace tests (unit, spec corpus, real sshd, fake-provider engine),
# then the heavy suites that need root: the node image boot test and the real libvirt VMs inside a
# network namespace. Needs root (apt, debootstrap, network namespaces, libvirtd).
set -euo pipefail
cd "$(dirname "$0")/.."
start=$(date +%s)
stage() { printf '\n==> %s (%ss)\n' "$*" "$(( $(date +%s) - start ))"; }

stage "installing host packages"
./tests/bed/install-host-packages.sh

stage "cargo test --workspace"
cargo test --workspace --locked

stage "Kubernetes test bundle (cached by input checksum; cold 6-18 min, warm 1 s)"
bundle=$(./tests/bed/build-k8s-bundle.sh)

stage "bundle proof: etcd + kube-apiserver from the bundle with clusterctl's PKI, images in containerd"
CLUSTERCTL_BUNDLE_TEST=1 CLUSTERCTL_BUNDLE="$bundle" cargo test -p clusterctl --locked --test bundle_control_plane

stage "all tests passed"
