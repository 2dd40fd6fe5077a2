#!/usr/bin/env bash
# Builds a development node image for the libvirt provider's tests when the real image
# (`clusterctl image build`, nodeimage crate) is not available: a TESTBED-style Debian bookworm
# rootfs with containerd and sshd, booted by direct kernel boot with `ro systemd.volatile=state`
# (read-only root, /var on tmpfs; /etc and /home get tmpfs overlays), and a tiny first-boot script
# that applies the JSON subset of a NoCloud seed the real image's agent reads (hostname, users with
# authorized keys and sudo, the ed25519 host key). No dm-verity: the e2e test reports that check
# as not done when it runs on this image.
#
# Output (cached by a hash of this script): $OUT/{vmlinuz,initrd.img,root.qcow2,manifest.json}
# Usage: dev-image.sh [OUT_DIR]   (default /var/cache/clusterctl/dev-image)
set -euo pipefail
out=${1:-/var/cache/clusterctl/dev-image}
key=$(sha256sum "$0" | cut -c1-16)
if [ -f "$out/manifest.json" ] && grep -q "\"inputs\": \"$key\"" "$out/manifest.json"; then
  echo "dev image: cached at $out"
  exit 0
fi
mirror=${MIRROR:-http://deb.debian.org/debian}
work=$(mktemp -d /var/tmp/clusterctl-dev-image.XXXXXX)
trap 'rm -rf "$work"' EXIT
root=$work/rootfs
pkgs=linux-image-cloud-amd64,initramfs-tools,systemd-sysv,udev,dbus,openssh-server,containerd,runc,\
containernetworking-plugins,ipset,iptables,iproute2,kmod,procps,e2fsprogs,jq,sudo
tarball=/var/cache/clusterctl/dev-image-debootstrap-$(echo "$pkgs" | sha256sum | cut -c1-16).tgz
mkdir -p "$(dirname "$tarball")"
if [ ! -f "$tarball" ]; then
  debootstrap --variant=minbase --include="$pkgs" --make-tarball="$tarball.tmp" bookworm "$work/tb" "$mirror"
  mv "$tarball.tmp" "$tarball"
fi
debootstrap --variant=minbase --include="$pkgs" --unpack-tarball="$tarball" bookworm "$root" "$mirror"

# First boot comes only from the NoCloud seed disk (JSON documents, as the real image expects).
cat > "$root/usr/local/sbin/dev-firstboot" <<'SH'
#!/bin/sh
set -eu
seed=/run/clusterctl-seed
mkdir -p "$seed"
i=0
until dev=$(blkid -o device -t LABEL=CIDATA || blkid -o device -t LABEL=cidata); do
  i=$((i + 1)); [ "$i" -lt 100 ] || { echo "dev-firstboot: no seed disk"; exit 1; }; sleep 0.2
done
mount -o ro "$dev" "$seed"
# The root is read-only (initramfs-tools has no systemd.volatile=overlay): /etc and /home get
# tmpfs-backed overlays so users and host keys can be applied on every boot.
for d in etc home; do
  mkdir -p "/run/dev-overlay/$d/upper" "/run/dev-overlay/$d/work"
  mountpoint -q "/$d" || mount -t overlay overlay -o "lowerdir=/$d,upperdir=/run/dev-overlay/$d/upper,workdir=/run/dev-overlay/$d/work" "/$d"
done
ud=$(sed '1{/^#cloud-config/d}' "$seed/user-data")
name=$(jq -r '."local-hostname" // empty' "$seed/meta-data")
[ -z "$name" ] || { echo "$name" > /etc/hostname; hostname "$name"; }
rm -f /etc/ssh/ssh_host_*
(umask 077; echo "$ud" | jq -r '.ssh_keys.ed25519_private' > /etc/ssh/ssh_host_ed25519_key)
echo "$ud" | jq -r '.ssh_keys.ed25519_public' > /etc/ssh/ssh_host_ed25519_key.pub
n=$(echo "$ud" | jq '.users // [] | length'); j=0
while [ "$j" -lt "$n" ]; do
  u=$(echo "$ud" | jq -c ".users[$j]"); j=$((j + 1))
  user=$(echo "$u" | jq -r .name)
  id -u "$user" >/dev/null 2>&1 || useradd -m -s /bin/bash "$user"
  mkdir -p "/home/$user/.ssh"
  echo "$u" | jq -r '.ssh_authorized_keys // [] | .[]' > "/home/$user/.ssh/authorized_keys"
  chown -R "$user:" "/home/$user/.ssh"; chmod 700 "/home/$user/.ssh"; chmod 600 "/home/$user/.ssh/authorized_keys"
  s=$(echo "$u" | jq -r '.sudo // empty')
  [ -z "$s" ] || { echo "$user $s" > "/etc/sudoers.d/90-$user"; chmod 440 "/etc/sudoers.d/90-$user"; }
done
umount "$seed"
SH
chmod 0755 "$root/usr/local/sbin/dev-firstboot"
cat > "$root/etc/systemd/system/dev-firstboot.service" <<'UNIT'
[Unit]
Description=Apply the NoCloud seed (dev image)
After=local-fs.target systemd-udev-settle.service
Before=ssh.service systemd-networkd.service
[Service]
Type=oneshot
RemainAfterExit=yes
ExecStart=/usr/local/sbin/dev-firstboot
StandardOutput=journal+console
[Install]
WantedBy=multi-user.target
UNIT
mkdir -p "$root/etc/systemd/system/multi-user.target.wants"
ln -sf /etc/systemd/system/dev-firstboot.service "$root/etc/systemd/system/multi-user.target.wants/dev-firstboot.service"
cat > "$root/etc/systemd/network/10-dhcp.network" <<'NET'
[Match]
Name=e*
[Network]
DHCP=ipv4
[DHCPv4]
ClientIdentifier=mac
NET
printf 'PasswordAuthentication no\nPermitRootLogin no\nHostKey /etc/ssh/ssh_host_ed25519_key\n' > "$root/etc/ssh/sshd_config.d/clusterctl.conf"
# Data disk (vdb, serial "data"): formatted on first use, mounted at /data.
cat > "$root/etc/systemd/system/clusterctl-data.service" <<'UNIT'
[Unit]
Description=Format (if blank) and mount the persistent data disk
DefaultDependencies=no
After=dev-disk-by\x2did-virtio\x2ddata.device
Requires=dev-disk-by\x2did-virtio\x2ddata.device
Before=local-fs.target containerd.service
[Service]
Type=oneshot
RemainAfterExit=yes
ExecStart=/bin/sh -c 'blkid /dev/disk/by-id/virtio-data || mkfs.ext4 -q -L data /dev/disk/by-id/virtio-data; mkdir -p /data; mount /dev/disk/by-id/virtio-data /data'
[Install]
WantedBy=local-fs.target
UNIT
ln -sf /etc/systemd/system/clusterctl-data.service "$root/etc/systemd/system/local-fs.target.wants/clusterctl-data.service" 2>/dev/null || {
  mkdir -p "$root/etc/systemd/system/local-fs.target.wants"
  ln -sf /etc/systemd/system/clusterctl-data.service "$root/etc/systemd/system/local-fs.target.wants/clusterctl-data.service"; }
for u in apt-daily.timer apt-daily-upgrade.timer fstrim.timer getty@tty1.service e2scrub_all.timer; do
  ln -sf /dev/null "$root/etc/systemd/system/$u"
done
: > "$root/etc/machine-id"; : > "$root/etc/fstab"
rm -f "$root"/etc/ssh/ssh_host_*
chroot "$root" systemctl enable systemd-networkd >/dev/null 2>&1 || true
mkdir -p "$out.tmp"
cp "$root"/boot/vmlinuz-* "$out.tmp/vmlinuz"
cp "$root"/boot/initrd.img-* "$out.tmp/initrd.img"
mkdir -p "$root/run"; mkfs.ext4 -q -F -L root -E root_owner=0:0 -d "$root" "$work/root.raw" 2G
qemu-img convert -O qcow2 "$work/root.raw" "$out.tmp/root.qcow2"
cmdline="root=/dev/vda ro console=ttyS0 systemd.volatile=state"
cat > "$out.tmp/manifest.json" <<JSON
{
  "version": "dev-$key",
  "inputs": "$key",
  "kernel": "vmlinuz",
  "initrd": "initrd.img",
  "root": { "file": "root.qcow2", "format": "qcow2" },
  "cmdline": "$cmdline",
  "verity": null
}
JSON
rm -rf "$out"; mv "$out.tmp" "$out"
echo "dev image: built at $out"
