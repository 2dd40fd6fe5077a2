//! Files clusterctl adds to the Debian tree, embedded at compile time. Their contents are build
//! inputs: changing any of them changes the input hash and so the image version.

/// One file placed into the image root.
pub(crate) struct ImageFile {
    /// Absolute destination path inside the image.
    pub dest: &'static str,
    /// Unix mode.
    pub mode: u32,
    /// Contents.
    pub contents: &'static str,
}

macro_rules! file {
    ($dest:expr, $mode:expr, $src:expr) => {
        ImageFile {
            dest: $dest,
            mode: $mode,
            contents: include_str!(concat!("../files/", $src)),
        }
    };
}

/// Script run inside the image root (chroot) after the files are in place.
pub(crate) const CONFIGURE: &str = include_str!("../files/configure.sh");

/// Every file added to the image.
pub(crate) const FILES: &[ImageFile] = &[
    file!(
        "/etc/initramfs-tools/hooks/clusterctl-verity",
        0o755,
        "initramfs/hook"
    ),
    file!(
        "/etc/initramfs-tools/scripts/local-top/clusterctl-verity",
        0o755,
        "initramfs/local-top"
    ),
    file!(
        "/etc/initramfs-tools/scripts/local-bottom/clusterctl-etc",
        0o755,
        "initramfs/local-bottom"
    ),
    file!(
        "/etc/initramfs-tools/conf.d/clusterctl",
        0o644,
        "etc/initramfs.conf"
    ),
    file!(
        "/usr/local/sbin/clusterctl-firstboot",
        0o755,
        "bin/clusterctl-firstboot"
    ),
    file!(
        "/usr/local/sbin/clusterctl-stateful",
        0o755,
        "bin/clusterctl-stateful"
    ),
    file!(
        "/usr/local/sbin/clusterctl-restore",
        0o755,
        "bin/clusterctl-restore"
    ),
    file!(
        "/etc/systemd/system/clusterctl-restore.service",
        0o644,
        "systemd/clusterctl-restore.service"
    ),
    file!(
        "/etc/systemd/system/clusterctl-firstboot.service",
        0o644,
        "systemd/clusterctl-firstboot.service"
    ),
    file!(
        "/etc/systemd/system/clusterctl-metadata.service",
        0o644,
        "systemd/clusterctl-metadata.service"
    ),
    file!(
        "/etc/systemd/system/clusterctl-stateful.service",
        0o644,
        "systemd/clusterctl-stateful.service"
    ),
    file!(
        "/etc/systemd/system/clusterctl-ready.service",
        0o644,
        "systemd/clusterctl-ready.service"
    ),
    file!("/etc/systemd/system/tmp.mount", 0o644, "systemd/tmp.mount"),
    file!(
        "/etc/systemd/system/ssh.service.d/clusterctl.conf",
        0o644,
        "systemd/ssh.service.d/clusterctl.conf"
    ),
    file!(
        "/etc/ssh/sshd_config.d/clusterctl.conf",
        0o644,
        "etc/sshd_config"
    ),
    file!("/etc/sysctl.d/90-clusterctl.conf", 0o644, "etc/sysctl.conf"),
    file!(
        "/etc/modules-load.d/clusterctl.conf",
        0o644,
        "etc/modules-load.conf"
    ),
    file!(
        "/etc/systemd/network/90-clusterctl-dhcp.network",
        0o644,
        "etc/dhcp.network"
    ),
    file!(
        "/etc/systemd/journald.conf.d/clusterctl.conf",
        0o644,
        "etc/journald.conf"
    ),
    file!("/etc/containerd/config.toml", 0o644, "etc/containerd.toml"),
];
