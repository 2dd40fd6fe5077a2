#!/bin/sh
# Runs inside the image root (chroot) after clusterctl has copied its files in. Turns a debootstrap
# tree into the container-optimized node image: services enabled or masked, host keys and
# machine identity removed, the package manager dropped, initramfs rebuilt with the verity hook.
set -eu
export DEBIAN_FRONTEND=noninteractive LC_ALL=C PATH=/usr/sbin:/usr/bin:/sbin:/bin

# Services: the first-boot agent, the data disk, the restore of clusterctl's /etc files after a
# reboot, networkd, /tmp on tmpfs (the root is read-only); containerd and sshd are enabled by their
# packages. Nothing that would write to the image or phone home at run time.
systemctl enable clusterctl-stateful.service clusterctl-firstboot.service clusterctl-metadata.service clusterctl-restore.service clusterctl-ready.service \
	systemd-networkd.service containerd.service ssh.service tmp.mount
for unit in apt-daily.timer apt-daily-upgrade.timer fstrim.timer e2scrub_all.timer \
	e2scrub_reap.service getty@tty1.service systemd-networkd-wait-online.service; do
	systemctl mask "$unit"
done

# Identity comes from the seed at boot, never from the image.
rm -f /etc/ssh/ssh_host_*
: >/etc/machine-id
rm -f /var/lib/dbus/machine-id
: >/etc/fstab
echo localhost >/etc/hostname
mkdir -p /mnt/stateful
# Accounts: no passwords anywhere; root cannot log in (sshd also says so).
passwd -l root >/dev/null

# initramfs with the verity hook; list the modules the local-top script needs.
update-initramfs -u -k all

# No package manager at run time: apt goes entirely; dpkg stays only because the package list in
# the manifest is read from its database at build time (/var is a tmpfs at run time anyway).
dpkg --purge apt >/dev/null 2>&1 || dpkg --purge --force-remove-essential apt
rm -rf /var/lib/apt /var/cache/apt /etc/apt /var/cache/debconf/*-old /var/lib/dpkg/*-old
rm -rf /usr/share/doc/* /usr/share/man/* /usr/share/info/* /usr/share/lintian
find /usr/share/locale -mindepth 1 -maxdepth 1 ! -name 'locale.alias' -exec rm -rf {} +
rm -rf /var/log/* /var/cache/ldconfig/* /tmp/* /var/tmp/*
