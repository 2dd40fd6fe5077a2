//! Building an image: debootstrap (cached tarball and installed tree), the updates and security
//! suites resolved on the host and installed in a chroot, configure in the chroot, ext4 without
//! mounts, dm-verity on plain files, qcow2, manifest. Every step runs a Debian tool; nothing here
//! mounts a filesystem or uses a loop device.

use std::fs;
use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use sha2::{Digest, Sha256};

use crate::files::{CONFIGURE, FILES};
use crate::manifest::{
    self, Artifact, GCE_DISK_FILE, GceDisk, Image, MANIFEST_FILE, Manifest, Package, RootDisk,
    SCHEMA, Verity,
};
use crate::updates::{self, HostApt, Resolved};
use crate::{BuildOptions, NodeImageError, mirror};

/// Bump when the build steps change in a way the embedded files do not show.
/// 3: the updates and security suites are installed.
const BUILD_SCRIPT_VERSION: &str = "nodeimage-build/3";
/// dm-verity data and hash block size.
const BLOCK: u64 = 4096;

/// Result of [`crate::build`].
#[derive(Debug, Clone)]
pub struct BuildOutcome {
    /// The image (verified against its manifest).
    pub image: Image,
    /// True if an image with the same input hash already existed and nothing was built.
    pub reused: bool,
    /// Time spent in each step (empty when reused).
    pub timings: Vec<(String, Duration)>,
}

/// The Debian packages the image is made of (debootstrap `--include`, on top of `minbase`).
pub const DEFAULT_PACKAGES: &[&str] = &[
    "linux-image-cloud-amd64",
    "initramfs-tools",
    "systemd-sysv",
    "udev",
    "dbus",
    "openssh-server",
    "sudo",
    "containerd",
    "runc",
    "containernetworking-plugins",
    "iptables",
    "ipset",
    "conntrack",
    "iproute2",
    "kmod",
    "procps",
    "cryptsetup-bin",
    "jq",
    // GCE: the UEFI stub the unified kernel image is made from, and the metadata-server client
    // of the first-boot agent (seed, guest attributes).
    "systemd-boot-efi",
    "curl",
];

/// sha256 over everything that determines the image content: the build script, the suites, the
/// requested packages, clusterctl's files and, from `resolved`, every package the image will hold
/// at its exact version (sorted by name: the order apt resolved them in does not matter). The
/// mirrors and the Release dates are not inputs: an unchanged archive gives the same image.
pub fn input_hash(opts: &BuildOptions, resolved: &Resolved) -> String {
    let mut h = Sha256::new();
    let mut field = |name: &str, value: &[u8]| {
        h.update(name.as_bytes());
        h.update((value.len() as u64).to_le_bytes());
        h.update(value);
    };
    field("script", BUILD_SCRIPT_VERSION.as_bytes());
    field("suite", opts.suite.as_bytes());
    field("packages", sorted_packages(opts).join(",").as_bytes());
    for s in &resolved.sources {
        field("source", s.suite.as_bytes());
    }
    for (name, version) in resolved.package_set() {
        field("package", name.as_bytes());
        field("version", version.as_bytes());
    }
    field("configure", CONFIGURE.as_bytes());
    for f in FILES {
        field("file", f.dest.as_bytes());
        field("mode", &f.mode.to_le_bytes());
        field("contents", f.contents.as_bytes());
    }
    hex::encode(h.finalize())
}

fn sorted_packages(opts: &BuildOptions) -> Vec<String> {
    let mut p: Vec<String> = opts.packages.clone();
    p.sort();
    p.dedup();
    p
}

/// Finds an existing image built from the same inputs.
pub fn find_by_input_hash(image_dir: &Path, hash: &str) -> Result<Option<PathBuf>, NodeImageError> {
    Ok(manifest::list(image_dir)?
        .into_iter()
        .find(|(_, m, _)| m.input_hash == hash)
        .map(|(dir, _, _)| dir))
}

/// The key of the cached debootstrap tarball and installed tree: the suite and debootstrap's
/// arguments (the package list).
fn base_key(opts: &BuildOptions) -> String {
    let mut h = Sha256::new();
    h.update(opts.suite.as_bytes());
    for a in debootstrap_args(opts) {
        h.update(b"\0");
        h.update(a.as_bytes());
    }
    hex::encode(h.finalize())
}

fn debootstrap_args(opts: &BuildOptions) -> Vec<String> {
    vec![
        "--variant=minbase".into(),
        format!("--include={}", sorted_packages(opts).join(",")),
    ]
}

/// The dpkg database of the cached installed tree, kept beside it so that resolving the updates
/// needs no unpacked tree. In a directory of its own: apt puts its lock files next to it.
fn base_status(opts: &BuildOptions, key: &str) -> PathBuf {
    opts.image_dir
        .join("cache")
        .join(format!("status-{}-{}", opts.suite, &key[..16]))
        .join("status")
}

/// The host apt that resolves and downloads the updates, with the mirrors resolved.
fn host_apt(opts: &BuildOptions) -> Result<HostApt, NodeImageError> {
    let m = mirror::resolve(&opts.mirror);
    let sec = mirror::resolve_security(&opts.security_mirror);
    tracing::info!(mirror = %m.url, from = %m.source, security_mirror = %sec.url, security_from = %sec.source, "using Debian mirrors for the updates");
    HostApt::new(
        &opts.image_dir.join("cache"),
        &opts.suite,
        updates::suites(&opts.suite, &m.url, &sec.url),
    )
}

/// Resolves the updates against the archive (or the cached lists with `offline`) and logs what
/// they bring.
fn resolve(
    opts: &BuildOptions,
    apt: &HostApt,
    status: &Path,
) -> Result<(Resolved, String), NodeImageError> {
    check_apt()?;
    let resolved = apt.resolve(status, opts.offline)?;
    let hash = input_hash(opts, &resolved);
    tracing::info!(
        lists = %updates::describe(&resolved.sources),
        upgrades = resolved.changes.len(),
        by_suite = ?resolved.counts(),
        "resolved the updates"
    );
    Ok((resolved, hash))
}

fn reuse(opts: &BuildOptions, hash: &str) -> Result<Option<BuildOutcome>, NodeImageError> {
    if opts.force {
        return Ok(None);
    }
    let Some(dir) = find_by_input_hash(&opts.image_dir, hash)? else {
        return Ok(None);
    };
    let image = manifest::load(&dir)?;
    tracing::info!(version = %image.manifest.version, "image is up to date, nothing to build");
    Ok(Some(BuildOutcome {
        image,
        reused: true,
        timings: Vec::new(),
    }))
}

pub(crate) fn build(opts: &BuildOptions) -> Result<BuildOutcome, NodeImageError> {
    validate(opts)?;
    // Even deciding that the image is up to date runs apt on the image directory's cache.
    if !is_root() {
        return Err(NodeImageError::NotRoot);
    }
    mkdir_private(&opts.image_dir)?;
    let _lock = lock(&opts.image_dir)?;
    mkdir_private(&opts.image_dir.join("cache"))?;

    // With the installed tree cached, the package set (and so the input hash) is known before
    // anything is unpacked: an unchanged archive is a no-op.
    let key = base_key(opts);
    let status = base_status(opts, &key);
    let apt = host_apt(opts)?;
    let mut resolved = None;
    let mut timings = Vec::new();
    if status.is_file() {
        let t = Instant::now();
        let (r, hash) = resolve(opts, &apt, &status)?;
        if let Some(outcome) = reuse(opts, &hash)? {
            return Ok(outcome);
        }
        resolved = Some((r, hash));
        timings.push(("updates".to_string(), t.elapsed()));
    }
    check_tools()?;

    let mut b = Builder {
        opts,
        key,
        status,
        apt,
        resolved,
        timings,
        log: PathBuf::new(),
        work: PathBuf::new(),
        mirror: None,
    };
    b.run()
}

struct Builder<'a> {
    opts: &'a BuildOptions,
    /// [`base_key`].
    key: String,
    /// [`base_status`].
    status: PathBuf,
    apt: HostApt,
    /// The resolved updates and the input hash, once known.
    resolved: Option<(Resolved, String)>,
    timings: Vec<(String, Duration)>,
    log: PathBuf,
    work: PathBuf,
    mirror: Option<String>,
}

impl Builder<'_> {
    fn run(&mut self) -> Result<BuildOutcome, NodeImageError> {
        let started = SystemTime::now();
        self.work = self
            .opts
            .image_dir
            .join(format!(".work-{}", &self.key[..12]));
        remove_dir(&self.work)?;
        mkdir_private(&self.work)?;
        self.log = self.work.join("build.log");
        let rootfs = self.work.join("rootfs");
        let out = self.work.join("out");
        mkdir_private(&out)?;

        let tarball = self.step("debootstrap", |b| b.debootstrap_tarball())?;
        self.step("unpack", |b| b.unpack(&tarball, &rootfs))?;
        if self.resolved.is_none() {
            // A fresh installed tree: the updates can be resolved only now.
            let status = self.status.clone();
            let (r, hash) = self.step("updates", |b| resolve(b.opts, &b.apt, &status))?;
            if let Some(outcome) = reuse(self.opts, &hash)? {
                remove_dir(&self.work)?;
                return Ok(outcome);
            }
            self.resolved = Some((r, hash));
        }
        let Some((resolved, hash)) = self.resolved.take() else {
            return Err(NodeImageError::Parse {
                what: "the resolved updates".into(),
            });
        };
        let version = format!("{}-{}-{}", self.opts.suite, yyyymmdd(started), &hash[..12]);
        self.step("upgrade", |b| b.upgrade(&rootfs, &resolved))?;
        self.step("configure", |b| b.configure(&rootfs))?;
        let packages = self.step("packages", |b| b.packages(&rootfs, &resolved))?;
        self.step("kernel", |b| b.take_boot_files(&rootfs, &out))?;
        let used = dir_size(&rootfs)?;
        let raw = self.work.join("root.raw");
        let fs_size = self.step("mkfs", |b| b.mkfs(&rootfs, &raw, used))?;
        let root_hash = self.step("verity", |b| b.verity(&raw, fs_size))?;
        let qcow = out.join("root.qcow2");
        self.step("qcow2", |b| b.qcow2(&raw, &qcow))?;
        let virtual_size = fs::metadata(&raw).map_err(|e| io(&raw, e))?.len();
        let gce = self.step("gce-disk", |b| b.gce_disk(&raw, &out, &root_hash, fs_size))?;
        remove_file(&raw)?;

        let cmdline = cmdline(&root_hash, fs_size);
        let (kernel, initrd, root) = (
            artifact(&out, "vmlinuz")?,
            artifact(&out, "initrd.img")?,
            artifact(&out, "root.qcow2")?,
        );
        let manifest = Manifest {
            schema: SCHEMA,
            version: version.clone(),
            input_hash: hash.clone(),
            suite: self.opts.suite.clone(),
            sources: resolved.sources.clone(),
            created: rfc3339(started),
            kernel,
            initrd,
            root: RootDisk {
                file: root,
                format: "qcow2".into(),
                virtual_size,
                verity: Verity {
                    root_hash,
                    hash_offset: fs_size,
                    algorithm: "sha256".into(),
                    block_size: BLOCK as u32,
                },
            },
            cmdline,
            installed_size_kib: packages.iter().map(|p| p.installed_size_kib).sum(),
            packages,
            rootfs_used_bytes: used,
            gce: Some(gce),
        };
        let json =
            serde_json::to_vec_pretty(&manifest).map_err(|source| NodeImageError::Manifest {
                path: out.join(MANIFEST_FILE),
                source,
            })?;
        write_file(&out.join(MANIFEST_FILE), &json, 0o644)?;

        let dest = self.opts.image_dir.join(&version);
        remove_dir(&dest)?;
        fs::rename(&out, &dest).map_err(|e| io(&dest, e))?;
        fs::set_permissions(&dest, fs::Permissions::from_mode(0o755)).map_err(|e| io(&dest, e))?;
        if !self.opts.keep_work {
            remove_dir(&self.work)?;
        }
        let image = manifest::load(&dest)?;
        Ok(BuildOutcome {
            image,
            reused: false,
            timings: std::mem::take(&mut self.timings),
        })
    }

    fn step<T>(
        &mut self,
        name: &str,
        f: impl FnOnce(&mut Self) -> Result<T, NodeImageError>,
    ) -> Result<T, NodeImageError> {
        tracing::info!(step = name, "building image: {name}");
        let t = Instant::now();
        let r = f(self)?;
        let elapsed = t.elapsed();
        tracing::info!(step = name, seconds = elapsed.as_secs_f64(), "step done");
        self.timings.push((name.to_string(), elapsed));
        Ok(r)
    }

    /// Runs a tool, appending its output to the build log.
    fn tool(&self, step: &str, cmd: &mut Command) -> Result<String, NodeImageError> {
        run_logged(&self.log, step, cmd)
    }

    /// The Debian mirror, resolved once (only a build that runs debootstrap needs it).
    fn mirror(&mut self) -> String {
        if self.mirror.is_none() {
            let m = mirror::resolve(&self.opts.mirror);
            tracing::info!(mirror = %m.url, from = %m.source, "using Debian mirror");
            self.mirror = Some(m.url);
        }
        self.mirror.clone().unwrap_or_default()
    }

    fn debootstrap_args(&self) -> Vec<String> {
        debootstrap_args(self.opts)
    }

    /// The debootstrap tarball holds every .deb of the base suite the image needs: later builds
    /// with the same suite and package list do not run debootstrap's download again.
    fn debootstrap_tarball(&mut self) -> Result<PathBuf, NodeImageError> {
        let key = self.key.clone();
        let cache = self.opts.image_dir.join("cache");
        mkdir_private(&cache)?;
        let tarball = cache.join(format!(
            "debootstrap-{}-{}.tgz",
            self.opts.suite,
            &key[..16]
        ));
        if tarball.is_file() {
            tracing::info!(tarball = %tarball.display(), "reusing cached debootstrap tarball");
            return Ok(tarball);
        }
        let partial = cache.join(format!(".partial-{}.tgz", &key[..16]));
        let scratch = self.work.join("debootstrap-download");
        remove_file(&partial)?;
        let mirror = self.mirror();
        self.tool(
            "debootstrap --make-tarball",
            Command::new("debootstrap")
                .args(self.debootstrap_args())
                .arg(format!("--make-tarball={}", partial.display()))
                .arg(&self.opts.suite)
                .arg(&scratch)
                .arg(&mirror),
        )?;
        fs::rename(&partial, &tarball).map_err(|e| io(&tarball, e))?;
        remove_dir(&scratch)?;
        Ok(tarball)
    }

    /// Installs the packages into `rootfs`. Installing (debootstrap's second stage) is the slow part
    /// of a build, so the installed tree is cached as a tar keyed like the debootstrap tarball:
    /// a build whose package list is unchanged only extracts it. The tree's dpkg database is kept
    /// beside it ([`base_status`]) for resolving the updates.
    fn unpack(&mut self, tarball: &Path, rootfs: &Path) -> Result<(), NodeImageError> {
        let key = self.key.clone();
        let status = self.status.clone();
        let cache = self.opts.image_dir.join("cache");
        let tree = cache.join(format!("rootfs-{}-{}.tar", self.opts.suite, &key[..16]));
        if tree.is_file() {
            tracing::info!(tree = %tree.display(), "reusing cached installed tree");
            mkdir_private(rootfs)?;
            self.tool(
                "extract installed tree",
                Command::new("tar")
                    .args([
                        "--numeric-owner",
                        "--xattrs",
                        "--xattrs-include=*",
                        "--acls",
                        "-xpf",
                    ])
                    .arg(&tree)
                    .arg("-C")
                    .arg(rootfs),
            )?;
            return keep_status(rootfs, &status);
        }
        let mirror = self.mirror();
        self.tool(
            "debootstrap --unpack-tarball",
            Command::new("debootstrap")
                .args(self.debootstrap_args())
                .arg(format!("--unpack-tarball={}", tarball.display()))
                .arg(&self.opts.suite)
                .arg(rootfs)
                .arg(&mirror),
        )?;
        let partial = cache.join(format!(".partial-rootfs-{}.tar", &key[..16]));
        self.tool(
            "cache installed tree",
            Command::new("tar")
                .args([
                    "--numeric-owner",
                    "--xattrs",
                    "--xattrs-include=*",
                    "--acls",
                    "-cf",
                ])
                .arg(&partial)
                .arg("-C")
                .arg(rootfs)
                .arg("."),
        )?;
        fs::rename(&partial, &tree).map_err(|e| io(&tree, e))?;
        keep_status(rootfs, &status)
    }

    /// Installs the resolved updates into the tree: the host's lists and the downloaded `.deb`
    /// files are copied in and `apt-get dist-upgrade --no-download` runs in the chroot (no
    /// network there, nothing started: `policy-rc.d` says no), superseded kernels are purged, and
    /// apt's lists and caches are removed again.
    fn upgrade(&mut self, rootfs: &Path, resolved: &Resolved) -> Result<(), NodeImageError> {
        if resolved.changes.is_empty() {
            tracing::info!("no updates to install");
            return Ok(());
        }
        let status = self.status.clone();
        self.apt.download(&status).map_err(|e| match e {
            NodeImageError::Tool { stderr, log, .. } => NodeImageError::ArchiveUnreachable {
                what: format!(
                    "the .deb files of the updates from {}",
                    resolved
                        .sources
                        .iter()
                        .map(|s| format!("{} ({})", s.suite, s.uri))
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
                detail: format!("(full output in {}):\n{stderr}", log.display()),
                hint: "or run once with the archive reachable: downloaded packages are kept in \
                       the image directory's cache/debs"
                    .into(),
            },
            e => e,
        })?;
        let lists = rootfs.join("var/lib/apt/lists");
        let archives = rootfs.join("var/cache/apt/archives");
        mkdir_private(&lists.join("partial"))?;
        mkdir_private(&archives.join("partial"))?;
        let host_lists = self.apt.lists();
        for entry in fs::read_dir(&host_lists).map_err(|e| io(&host_lists, e))? {
            let path = entry.map_err(|e| io(&host_lists, e))?.path();
            if path.is_file()
                && let Some(name) = path.file_name()
                && name != "lock"
            {
                copy(&path, &lists.join(name))?;
            }
        }
        let wanted: Vec<String> = resolved
            .installs()
            .iter()
            .map(|(n, (v, _))| updates::deb_prefix(n, v))
            .collect();
        let debs = self.apt.debs.clone();
        for entry in fs::read_dir(&debs).map_err(|e| io(&debs, e))? {
            let path = entry.map_err(|e| io(&debs, e))?.path();
            let name = path
                .file_name()
                .and_then(|n| n.to_str())
                .unwrap_or_default()
                .to_string();
            if name.ends_with(".deb") && wanted.iter().any(|w| name.starts_with(w.as_str())) {
                copy(&path, &archives.join(&name))?;
            }
        }
        let sources = rootfs.join("etc/apt/sources.list");
        write_file(
            &sources,
            updates::sources_list(&self.apt_suites(resolved)).as_bytes(),
            0o644,
        )?;
        let policy = rootfs.join("usr/sbin/policy-rc.d");
        write_file(
            &policy,
            b"#!/bin/sh\n# clusterctl image build: start nothing\nexit 101\n",
            0o755,
        )?;
        let result = self.upgrade_in_chroot(rootfs, resolved);
        remove_file(&policy)?;
        result?;
        // What the image holds is checked against the resolution in `packages`; apt's state goes.
        for dir in [&lists, &archives] {
            remove_dir(dir)?;
            mkdir_private(dir)?;
        }
        remove_file(&sources)?;
        remove_dir(&rootfs.join("var/cache/apt"))?;
        mkdir_private(&rootfs.join("var/cache/apt"))
    }

    fn apt_suites(&self, resolved: &Resolved) -> Vec<updates::Suite> {
        resolved
            .sources
            .iter()
            .map(|s| updates::Suite {
                name: s.suite.clone(),
                uri: s.uri.clone(),
            })
            .collect()
    }

    fn upgrade_in_chroot(
        &mut self,
        rootfs: &Path,
        resolved: &Resolved,
    ) -> Result<(), NodeImageError> {
        let chroot = |args: &[&str]| {
            let mut c = Command::new("chroot");
            c.arg(rootfs)
                .args(args)
                .env("DEBIAN_FRONTEND", "noninteractive")
                .env("LC_ALL", "C")
                .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin");
            c
        };
        self.tool(
            "apt-get dist-upgrade (chroot)",
            &mut chroot(&[
                "apt-get",
                "-y",
                "--no-download",
                "--no-install-recommends",
                "-o",
                "Dpkg::Options::=--force-confdef",
                "-o",
                "Dpkg::Options::=--force-confold",
                "-o",
                "Dpkg::Use-Pty=0",
                "dist-upgrade",
            ]),
        )?;
        let out = self.tool(
            "dpkg-query kernels",
            &mut chroot(&[
                "dpkg-query",
                "-W",
                "-f",
                "${db:Status-Abbrev}\t${Package}\t${Depends}\n",
            ]),
        )?;
        let kernels: Vec<(String, String)> = out
            .lines()
            .filter_map(|l| {
                let mut f = l.split('\t');
                let st = f.next()?;
                let name = f.next()?;
                (st.starts_with("ii") && name.starts_with("linux-image-"))
                    .then(|| (name.to_string(), f.next().unwrap_or("").to_string()))
            })
            .collect();
        let old = updates::superseded_kernels(&kernels);
        if !old.is_empty() {
            tracing::info!(kernels = %old.join(" "), "purging superseded kernels");
            let mut args = vec!["dpkg", "--purge"];
            args.extend(old.iter().map(String::as_str));
            self.tool("dpkg --purge old kernels", &mut chroot(&args))?;
        }
        // The image holds what the input hash says, or the build stops.
        let out = self.tool(
            "dpkg-query after the upgrade",
            &mut chroot(&[
                "dpkg-query",
                "-W",
                "-f",
                "${db:Status-Abbrev}\t${Package}\t${Version}\n",
            ]),
        )?;
        let installed: std::collections::BTreeMap<&str, &str> = out
            .lines()
            .filter_map(|l| {
                let f: Vec<&str> = l.split('\t').collect();
                (f.len() == 3 && f[0].starts_with("ii")).then(|| (f[1], f[2]))
            })
            .collect();
        match updates::check_upgrade(&installed, resolved, &old) {
            Ok(()) => Ok(()),
            Err((package, expected, found)) => Err(NodeImageError::UpgradeMismatch {
                package,
                expected,
                found,
            }),
        }
    }

    fn configure(&mut self, rootfs: &Path) -> Result<(), NodeImageError> {
        for f in FILES {
            let dest = rootfs.join(f.dest.trim_start_matches('/'));
            if let Some(parent) = dest.parent() {
                fs::create_dir_all(parent).map_err(|e| io(parent, e))?;
            }
            write_file(&dest, f.contents.as_bytes(), f.mode)?;
        }
        let script = rootfs.join("clusterctl-configure.sh");
        write_file(&script, CONFIGURE.as_bytes(), 0o755)?;
        self.tool(
            "configure",
            Command::new("chroot")
                .arg(rootfs)
                .arg("/bin/sh")
                .arg("/clusterctl-configure.sh"),
        )?;
        remove_file(&script)
    }

    /// The installed packages; those the upgrade installed carry their suite.
    fn packages(
        &mut self,
        rootfs: &Path,
        resolved: &Resolved,
    ) -> Result<Vec<Package>, NodeImageError> {
        let out = self.tool(
            "dpkg-query",
            Command::new("chroot").arg(rootfs).args([
                "dpkg-query",
                "-W",
                "-f",
                "${db:Status-Abbrev}\t${Package}\t${Version}\t${Installed-Size}\n",
            ]),
        )?;
        let mut packages = Vec::new();
        for line in out.lines() {
            let cols: Vec<&str> = line.split('\t').collect();
            if cols.len() != 4 || !cols[0].starts_with("ii") {
                continue;
            }
            packages.push(Package {
                name: cols[1].to_string(),
                version: cols[2].to_string(),
                installed_size_kib: cols[3].trim().parse().unwrap_or(0),
                suite: None,
            });
        }
        if packages.is_empty() {
            return Err(NodeImageError::Parse {
                what: "dpkg-query output (no installed packages)".into(),
            });
        }
        let installs = resolved.installs();
        for p in &mut packages {
            if let Some((version, suites)) = installs.get(p.name.as_str())
                && p.version == *version
            {
                p.suite = Some(suites.clone());
            }
        }
        packages.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(packages)
    }

    /// Copies kernel and initrd out of /boot and removes /boot from the root: the VM boots them
    /// directly, the root filesystem only needs the modules.
    fn take_boot_files(&mut self, rootfs: &Path, out: &Path) -> Result<(), NodeImageError> {
        let boot = rootfs.join("boot");
        let mut kernel = None;
        let mut initrd = None;
        let mut kernels = 0;
        for entry in fs::read_dir(&boot).map_err(|e| io(&boot, e))? {
            let entry = entry.map_err(|e| io(&boot, e))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.starts_with("vmlinuz-") {
                kernels += 1;
                kernel = Some(entry.path());
            } else if name.starts_with("initrd.img-") {
                initrd = Some(entry.path());
            }
        }
        let (Some(kernel), Some(initrd)) = (kernel, initrd) else {
            return Err(NodeImageError::Parse {
                what: format!("kernel and initrd in {}", boot.display()),
            });
        };
        if kernels > 1 {
            return Err(NodeImageError::Parse {
                what: format!(
                    "exactly one kernel in {} ({kernels} there: a superseded kernel was not purged)",
                    boot.display()
                ),
            });
        }
        copy(&kernel, &out.join("vmlinuz"))?;
        copy(&initrd, &out.join("initrd.img"))?;
        // The UEFI stub and os-release for the GCE disk's unified kernel image, from the image's
        // own packages.
        let uki = self.work.join("uki");
        mkdir_private(&uki)?;
        copy(&rootfs.join(UKI_STUB), &uki.join("linuxx64.efi.stub"))?;
        copy(&rootfs.join("usr/lib/os-release"), &uki.join("os-release"))?;
        for entry in fs::read_dir(&boot).map_err(|e| io(&boot, e))? {
            let path = entry.map_err(|e| io(&boot, e))?.path();
            if path.is_dir() {
                remove_dir(&path)?;
            } else {
                remove_file(&path)?;
            }
        }
        Ok(())
    }

    /// ext4 from the directory (`mkfs.ext4 -d`): no journal (the root is never written), no
    /// reserved blocks, sized to the content plus room for metadata. Returns the size in bytes.
    fn mkfs(&mut self, rootfs: &Path, raw: &Path, used: u64) -> Result<u64, NodeImageError> {
        let mib = 1 << 20;
        let size = ((used + used / 5 + 64 * mib) / mib) * mib;
        remove_file(raw)?;
        self.tool(
            "mkfs.ext4",
            Command::new("mkfs.ext4")
                .args([
                    "-q",
                    "-F",
                    "-L",
                    "root",
                    "-b",
                    "4096",
                    "-m",
                    "0",
                    "-O",
                    "^has_journal",
                    "-E",
                    "root_owner=0:0",
                    "-d",
                ])
                .arg(rootfs)
                .arg(raw)
                .arg(format!("{}k", size / 1024)),
        )?;
        Ok(size)
    }

    /// Appends the dm-verity hash tree to the same file, after the filesystem.
    fn verity(&mut self, raw: &Path, fs_size: u64) -> Result<String, NodeImageError> {
        let out = self.tool(
            "veritysetup format",
            Command::new("veritysetup")
                .arg("format")
                .arg(raw)
                .arg(raw)
                .arg(format!("--hash-offset={fs_size}"))
                .arg(format!("--data-blocks={}", fs_size / BLOCK))
                .args([
                    "--data-block-size=4096",
                    "--hash-block-size=4096",
                    "--hash=sha256",
                ]),
        )?;
        let hash = out
            .lines()
            .find_map(|l| l.strip_prefix("Root hash:"))
            .map(|h| h.trim().to_string())
            .filter(|h| h.len() == 64 && h.chars().all(|c| c.is_ascii_hexdigit()))
            .ok_or_else(|| NodeImageError::Parse {
                what: "root hash in veritysetup output".into(),
            })?;
        Ok(hash)
    }

    /// The GCE disk: GPT with an EFI system partition holding a unified kernel image (stub,
    /// kernel, initrd and the command line with the verity root hash, so a Secure Boot signature
    /// would cover all of it) and the verity root partition; `disk.raw` sized in whole GiB,
    /// packed as GCE imports it (GNU tar, oldgnu format, sparse, gzip).
    fn gce_disk(
        &mut self,
        raw: &Path,
        out: &Path,
        root_hash: &str,
        fs_size: u64,
    ) -> Result<GceDisk, NodeImageError> {
        let uki_dir = self.work.join("uki");
        let cmdline = gce_cmdline(root_hash, fs_size);
        let cmdline_file = uki_dir.join("cmdline");
        write_file(&cmdline_file, cmdline.as_bytes(), 0o644)?;
        let stub = uki_dir.join("linuxx64.efi.stub");
        let headers = self.tool("uki", Command::new("objdump").arg("-h").arg(&stub))?;
        let private = self.tool("uki", Command::new("objdump").arg("-p").arg(&stub))?;
        let (align, mut next) =
            pe_layout(&headers, &private).ok_or_else(|| NodeImageError::Parse {
                what: format!("PE sections of {}", stub.display()),
            })?;
        let uki = uki_dir.join("BOOTX64.EFI");
        let mut objcopy = Command::new("objcopy");
        for (section, file) in [
            (".osrel", uki_dir.join("os-release")),
            (".cmdline", cmdline_file),
            (".linux", out.join("vmlinuz")),
            (".initrd", out.join("initrd.img")),
        ] {
            next = round_up(next, align);
            objcopy
                .arg("--add-section")
                .arg(format!("{section}={}", file.display()))
                .arg("--change-section-vma")
                .arg(format!("{section}={next:#x}"));
            next += fs::metadata(&file).map_err(|e| io(&file, e))?.len();
        }
        self.tool("uki", objcopy.arg(&stub).arg(&uki))?;
        let bootx64 = fs::read(&uki).map_err(|e| io(&uki, e))?;

        let esp_size = round_up(bootx64.len() as u64 * 5 / 4 + 16 * MIB, MIB).max(64 * MIB);
        let esp = self.work.join("esp.img");
        write_esp(&esp, esp_size, &bootx64)?;
        let root_len = round_up(fs::metadata(raw).map_err(|e| io(raw, e))?.len(), MIB);
        let esp_start = MIB;
        let root_start = esp_start + esp_size;
        let total = round_up(root_start + root_len + MIB, GIB);
        let disk = self.work.join("disk.raw");
        let file = fs::OpenOptions::new()
            .create(true)
            .truncate(true)
            .read(true)
            .write(true)
            .open(&disk)
            .map_err(|e| io(&disk, e))?;
        file.set_len(total).map_err(|e| io(&disk, e))?;
        let script = format!(
            "label: gpt\n\
             start={}, size={}, type=C12A7328-F81F-11D2-BA4B-00A0C93EC93B, name=\"EFI System\"\n\
             start={}, size={}, type=4F68BCE3-E8CD-4DB1-96E7-FBCAF984B709, name=\"{GCE_ROOT_PARTLABEL}\"\n",
            esp_start / 512,
            esp_size / 512,
            root_start / 512,
            root_len / 512,
        );
        let script_file = self.work.join("gpt.sfdisk");
        write_file(&script_file, script.as_bytes(), 0o644)?;
        self.tool(
            "gpt",
            Command::new("sh")
                .arg("-c")
                .arg("exec sfdisk --quiet --no-reread --no-tell-kernel \"$1\" < \"$2\"")
                .arg("sh")
                .arg(&disk)
                .arg(&script_file),
        )?;
        copy_sparse(&esp, &file, esp_start)?;
        copy_sparse(raw, &file, root_start)?;
        file.sync_all().map_err(|e| io(&disk, e))?;
        drop(file);
        remove_file(&esp)?;
        self.tool(
            "tar",
            Command::new("tar")
                .args(["--format=oldgnu", "--sparse", "-czf"])
                .arg(out.join(GCE_DISK_FILE))
                .arg("-C")
                .arg(&self.work)
                .arg("disk.raw"),
        )?;
        remove_file(&disk)?;
        Ok(GceDisk {
            file: artifact(out, GCE_DISK_FILE)?,
            disk_size_gib: total / GIB,
            cmdline,
            root_partlabel: GCE_ROOT_PARTLABEL.into(),
            esp_bytes: esp_size,
        })
    }

    fn qcow2(&mut self, raw: &Path, qcow: &Path) -> Result<(), NodeImageError> {
        self.tool(
            "qemu-img convert",
            Command::new("qemu-img")
                .args(["convert", "-c", "-f", "raw", "-O", "qcow2"])
                .arg(raw)
                .arg(qcow),
        )?;
        Ok(())
    }
}

/// Where systemd-boot-efi puts the stub, inside the image root.
const UKI_STUB: &str = "usr/lib/systemd/boot/efi/linuxx64.efi.stub";
/// GPT partition name of the root partition on the GCE disk.
pub const GCE_ROOT_PARTLABEL: &str = "clusterctl-root";
/// The data disk as GCE names it to the guest: an attached disk with device name `data`.
pub const GCE_DATA_DEVICE: &str = "/dev/disk/by-id/scsi-0Google_PersistentDisk_data";
const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;

/// The kernel command line of the GCE disk: root and data found by name (GPT partition label,
/// GCE's disk device name), the console on ttyS0 as GCE's serial port expects.
pub fn gce_cmdline(root_hash: &str, hash_offset: u64) -> String {
    format!(
        "root=/dev/mapper/root rootfstype=ext4 ro console=ttyS0,38400n8 \
         clusterctl.verity={root_hash} clusterctl.verity_hashoffset={hash_offset} \
         clusterctl.verity_data=PARTLABEL={GCE_ROOT_PARTLABEL} clusterctl.data={GCE_DATA_DEVICE} \
         systemd.volatile=state systemd.unified_cgroup_hierarchy=0 net.ifnames=0 quiet"
    )
}

fn round_up(n: u64, to: u64) -> u64 {
    n.div_ceil(to) * to
}

/// Section alignment and the end of the last section of a PE file, from `objdump`.
fn pe_layout(headers: &str, private: &str) -> Option<(u64, u64)> {
    let align = private.lines().find_map(|l| {
        let mut f = l.split_whitespace();
        (f.next()? == "SectionAlignment").then_some(())?;
        u64::from_str_radix(f.next()?, 16).ok()
    })?;
    // Section lines: "Idx Name Size VMA LMA File-off Algn".
    let end = headers
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            if f.len() != 7 || f[0].parse::<u32>().is_err() {
                return None;
            }
            Some(u64::from_str_radix(f[2], 16).ok()? + u64::from_str_radix(f[3], 16).ok()?)
        })
        .max()?;
    Some((align.max(1), end))
}

/// Copies `from` into `to` at byte `offset`, leaving all-zero 64 KiB blocks as holes.
fn copy_sparse(from: &Path, to: &fs::File, offset: u64) -> Result<(), NodeImageError> {
    use std::io::{Read, Seek, SeekFrom};
    let mut src = fs::File::open(from).map_err(|e| io(from, e))?;
    let mut dst = to;
    let mut buf = vec![0u8; 64 << 10];
    let mut pos = offset;
    loop {
        let n = src.read(&mut buf).map_err(|e| io(from, e))?;
        if n == 0 {
            return Ok(());
        }
        if buf[..n].iter().any(|b| *b != 0) {
            dst.seek(SeekFrom::Start(pos)).map_err(|e| io(from, e))?;
            dst.write_all(&buf[..n]).map_err(|e| io(from, e))?;
        }
        pos += n as u64;
    }
}

/// A FAT EFI system partition image of `size` bytes holding `EFI/BOOT/BOOTX64.EFI`.
fn write_esp(path: &Path, size: u64, bootx64: &[u8]) -> Result<(), NodeImageError> {
    let err = |e: std::io::Error| io(path, e);
    let mut file = fs::OpenOptions::new()
        .create(true)
        .truncate(true)
        .read(true)
        .write(true)
        .open(path)
        .map_err(err)?;
    file.set_len(size).map_err(err)?;
    fatfs::format_volume(
        &mut file,
        fatfs::FormatVolumeOptions::new().volume_label(*b"ESP        "),
    )
    .map_err(err)?;
    let fs = fatfs::FileSystem::new(&mut file, fatfs::FsOptions::new()).map_err(err)?;
    {
        let dir = fs
            .root_dir()
            .create_dir("EFI")
            .and_then(|d| d.create_dir("BOOT"))
            .map_err(err)?;
        let mut f = dir.create_file("BOOTX64.EFI").map_err(err)?;
        f.truncate().map_err(err)?;
        f.write_all(bootx64).map_err(err)?;
        f.flush().map_err(err)?;
    }
    fs.unmount().map_err(err)
}

/// The kernel command line for an image with this root hash and hash offset.
pub fn cmdline(root_hash: &str, hash_offset: u64) -> String {
    format!(
        "root=/dev/mapper/root rootfstype=ext4 ro console=ttyS0 \
         clusterctl.verity={root_hash} clusterctl.verity_hashoffset={hash_offset} clusterctl.verity_data=/dev/vda \
         clusterctl.data=/dev/vdb systemd.volatile=state systemd.unified_cgroup_hierarchy=0 \
         net.ifnames=0 quiet"
    )
}

fn validate(opts: &BuildOptions) -> Result<(), NodeImageError> {
    let ok_name = |s: &str| {
        !s.is_empty()
            && s.chars()
                .all(|c| c.is_ascii_alphanumeric() || "+-.:".contains(c))
    };
    if !ok_name(&opts.suite) {
        return Err(NodeImageError::InvalidOption {
            option: "suite",
            value: opts.suite.clone(),
        });
    }
    for p in &opts.packages {
        if !ok_name(p) {
            return Err(NodeImageError::InvalidOption {
                option: "package",
                value: p.clone(),
            });
        }
    }
    Ok(())
}

fn check_tools() -> Result<(), NodeImageError> {
    for (tool, package) in [
        ("debootstrap", "debootstrap"),
        ("chroot", "coreutils"),
        ("mkfs.ext4", "e2fsprogs"),
        ("veritysetup", "cryptsetup-bin"),
        ("qemu-img", "qemu-utils"),
    ] {
        let found = std::env::var_os("PATH")
            .map(|p| std::env::split_paths(&p).any(|d| d.join(tool).is_file()))
            .unwrap_or(false)
            || ["/usr/sbin", "/sbin"]
                .iter()
                .any(|d| Path::new(d).join(tool).is_file());
        if !found {
            return Err(NodeImageError::ToolMissing { tool, package });
        }
    }
    Ok(())
}

/// apt on the host and the archive keyring it checks the lists with.
fn check_apt() -> Result<(), NodeImageError> {
    let on_path = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join("apt-get").is_file()))
        .unwrap_or(false);
    if !on_path && !Path::new("/usr/bin/apt-get").is_file() {
        return Err(NodeImageError::ToolMissing {
            tool: "apt-get",
            package: "apt",
        });
    }
    if !Path::new(updates::ARCHIVE_KEYRING).is_file() {
        return Err(NodeImageError::ToolMissing {
            tool: updates::ARCHIVE_KEYRING,
            package: "debian-archive-keyring",
        });
    }
    Ok(())
}

/// Copies the tree's dpkg database beside the cached tree.
fn keep_status(rootfs: &Path, status: &Path) -> Result<(), NodeImageError> {
    if let Some(dir) = status.parent() {
        mkdir_private(dir)?;
    }
    let partial = status.with_extension("partial");
    fs::copy(rootfs.join("var/lib/dpkg/status"), &partial).map_err(|e| io(&partial, e))?;
    fs::rename(&partial, status).map_err(|e| io(status, e))
}

/// Runs a tool, appending its command line and output to `log`; a failure carries the last lines
/// of its error output.
pub(crate) fn run_logged(
    log: &Path,
    step: &str,
    cmd: &mut Command,
) -> Result<String, NodeImageError> {
    run_logged_both(log, step, cmd).map(|(stdout, _)| stdout)
}

/// [`run_logged`], returning standard output and standard error.
pub(crate) fn run_logged_both(
    log: &Path,
    step: &str,
    cmd: &mut Command,
) -> Result<(String, String), NodeImageError> {
    let mut file = fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .map_err(|e| io(log, e))?;
    let _ = writeln!(file, "==> {step}: {cmd:?}");
    let output = cmd
        .stdin(Stdio::null())
        .output()
        .map_err(|source| NodeImageError::Spawn {
            step: step.to_string(),
            program: format!("{:?}", cmd.get_program()),
            source,
        })?;
    let _ = file.write_all(&output.stderr);
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    if !output.status.success() {
        let _ = file.write_all(stdout.as_bytes());
        let stderr = String::from_utf8_lossy(&output.stderr);
        let tail: String = stderr
            .lines()
            .rev()
            .take(8)
            .collect::<Vec<_>>()
            .into_iter()
            .rev()
            .collect::<Vec<_>>()
            .join("\n");
        return Err(NodeImageError::Tool {
            step: step.to_string(),
            status: output.status.to_string(),
            stderr: tail,
            log: log.to_path_buf(),
        });
    }
    let _ = file.write_all(stdout.as_bytes());
    Ok((stdout, String::from_utf8_lossy(&output.stderr).into_owned()))
}

fn is_root() -> bool {
    // The build chroots and writes root-owned files; /proc/self/status avoids a libc dependency.
    fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .map(|l| l.split_whitespace().nth(2) == Some("0"))
        })
        .unwrap_or(false)
}

fn lock(image_dir: &Path) -> Result<fs::File, NodeImageError> {
    let path = image_dir.join(".lock");
    let file = fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(|e| io(&path, e))?;
    match file.try_lock() {
        Ok(()) => Ok(file),
        Err(fs::TryLockError::WouldBlock) => {
            tracing::info!(lock = %path.display(), "another image build is running, waiting");
            file.lock().map_err(|e| io(&path, e))?;
            Ok(file)
        }
        Err(fs::TryLockError::Error(e)) => Err(io(&path, e)),
    }
}

fn artifact(dir: &Path, name: &str) -> Result<Artifact, NodeImageError> {
    let (sha256, size) = manifest::sha256_file(&dir.join(name))?;
    Ok(Artifact {
        path: name.to_string(),
        sha256,
        size,
    })
}

/// Bytes used by regular files and symlinks under `dir` (hard links counted once per name).
fn dir_size(dir: &Path) -> Result<u64, NodeImageError> {
    let mut total = 0;
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in fs::read_dir(&d).map_err(|e| io(&d, e))? {
            let entry = entry.map_err(|e| io(&d, e))?;
            let meta = entry.metadata().map_err(|e| io(&entry.path(), e))?;
            if meta.is_dir() {
                stack.push(entry.path());
                total += BLOCK;
            } else {
                total += meta.len().div_ceil(BLOCK) * BLOCK;
            }
        }
    }
    Ok(total)
}

fn io(path: &Path, source: std::io::Error) -> NodeImageError {
    NodeImageError::Io {
        path: path.to_path_buf(),
        source,
    }
}

fn mkdir_private(dir: &Path) -> Result<(), NodeImageError> {
    fs::create_dir_all(dir).map_err(|e| io(dir, e))
}

fn write_file(path: &Path, contents: &[u8], mode: u32) -> Result<(), NodeImageError> {
    fs::write(path, contents).map_err(|e| io(path, e))?;
    fs::set_permissions(path, fs::Permissions::from_mode(mode)).map_err(|e| io(path, e))
}

fn copy(from: &Path, to: &Path) -> Result<(), NodeImageError> {
    fs::copy(from, to).map(|_| ()).map_err(|e| io(from, e))?;
    fs::set_permissions(to, fs::Permissions::from_mode(0o644)).map_err(|e| io(to, e))
}

fn remove_file(path: &Path) -> Result<(), NodeImageError> {
    match fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(io(path, e)),
        _ => Ok(()),
    }
}

fn remove_dir(path: &Path) -> Result<(), NodeImageError> {
    match fs::remove_dir_all(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(io(path, e)),
        _ => Ok(()),
    }
}

/// Days since 1970-01-01 to (year, month, day), proleptic Gregorian (Howard Hinnant's algorithm).
fn civil(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (yoe + era * 400 + i64::from(m <= 2), m, d)
}

fn unix_secs(t: SystemTime) -> i64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

fn yyyymmdd(t: SystemTime) -> String {
    let (y, m, d) = civil(unix_secs(t).div_euclid(86_400));
    format!("{y:04}{m:02}{d:02}")
}

fn rfc3339(t: SystemTime) -> String {
    let s = unix_secs(t);
    let (y, m, d) = civil(s.div_euclid(86_400));
    let r = s.rem_euclid(86_400);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        r / 3600,
        r % 3600 / 60,
        r % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn civil_dates() {
        assert_eq!(civil(0), (1970, 1, 1));
        assert_eq!(civil(20_418), (2025, 11, 26));
        assert_eq!(civil(11_016), (2000, 2, 29));
        let t = UNIX_EPOCH + Duration::from_secs(1_764_189_296);
        assert_eq!(rfc3339(t), "2025-11-26T20:34:56Z");
        assert_eq!(yyyymmdd(t), "20251126");
    }

    /// A resolution: the base tree and the upgrades apt announced, in apt's order.
    pub(crate) fn resolved(upgrades: &[(&str, &str)]) -> Resolved {
        let source = |suite: &str, uri: &str, date: &str| crate::Source {
            suite: suite.into(),
            uri: uri.into(),
            date: date.into(),
        };
        Resolved {
            sources: vec![
                source(
                    "bookworm",
                    "http://deb.debian.org/debian",
                    "Sat, 15 Nov 2026",
                ),
                source(
                    "bookworm-updates",
                    "http://deb.debian.org/debian",
                    "Thu, 03 Dec 2026",
                ),
                source(
                    "bookworm-security",
                    "http://deb.debian.org/debian-security",
                    "Thu, 03 Dec 2026",
                ),
            ],
            base: [
                ("libc6", "2.36-9+deb12u10"),
                ("libssl3", "3.0.17-1~deb12u2"),
            ]
            .into_iter()
            .map(|(n, v)| (n.to_string(), v.to_string()))
            .collect(),
            changes: upgrades
                .iter()
                .map(|(n, v)| updates::Change::Install {
                    name: (*n).into(),
                    version: (*v).into(),
                    archives: vec!["Debian-Security:12/oldstable-security".into()],
                })
                .collect(),
            codenames: Default::default(),
        }
    }

    #[test]
    fn input_hash_changes_with_packages_not_order() {
        let r = resolved(&[]);
        let a = BuildOptions::new("/x".into());
        let mut b = a.clone();
        b.packages.reverse();
        assert_eq!(input_hash(&a, &r), input_hash(&b, &r));
        b.packages.push("strace".into());
        assert_ne!(input_hash(&a, &r), input_hash(&b, &r));
        let mut c = a.clone();
        c.image_dir = "/elsewhere".into();
        c.mirror = "http://other.example/debian".into();
        c.security_mirror = "http://other.example/debian-security".into();
        assert_eq!(
            input_hash(&a, &r),
            input_hash(&c, &r),
            "the output location and the mirrors are not inputs"
        );
    }

    #[test]
    fn input_hash_changes_with_the_versions_updates_bring_not_their_order_or_dates() {
        let a = BuildOptions::new("/x".into());
        let none = resolved(&[]);
        let fix = resolved(&[
            ("libssl3", "3.0.22-1~deb12u2"),
            ("tzdata", "2026f-0+deb12u1"),
        ]);
        let fix_reordered = resolved(&[
            ("tzdata", "2026f-0+deb12u1"),
            ("libssl3", "3.0.22-1~deb12u2"),
        ]);
        let newer_fix = resolved(&[
            ("libssl3", "3.0.23-1~deb12u2"),
            ("tzdata", "2026f-0+deb12u1"),
        ]);
        assert_ne!(
            input_hash(&a, &none),
            input_hash(&a, &fix),
            "a security fix is a new image"
        );
        assert_eq!(input_hash(&a, &fix), input_hash(&a, &fix_reordered));
        assert_ne!(input_hash(&a, &fix), input_hash(&a, &newer_fix));
        let mut later = fix.clone();
        for s in &mut later.sources {
            s.date = "Fri, 04 Dec 2026".into();
        }
        assert_eq!(
            input_hash(&a, &fix),
            input_hash(&a, &later),
            "a Release file dated later with the same packages is the same image"
        );
        // The same final set reached from another base tree (debootstrap run on another day) is
        // the same image.
        let mut other_base = fix.clone();
        other_base
            .base
            .insert("libssl3".into(), "3.0.20-1~deb12u2".into());
        assert_eq!(input_hash(&a, &fix), input_hash(&a, &other_base));
        let mut no_security = none.clone();
        no_security.sources.pop();
        assert_ne!(input_hash(&a, &none), input_hash(&a, &no_security));
    }

    #[test]
    fn pe_layout_reads_alignment_and_the_end_of_the_last_section() {
        let headers = "\nlinuxx64.efi.stub:     file format pei-x86-64\n\nSections:\n\
Idx Name          Size      VMA               LMA               File off  Algn\n\
  0 .text         0000d1b1  0000000000004000  0000000000004000  00000400  2**4\n\
                  CONTENTS, ALLOC, LOAD, READONLY, CODE\n\
  1 .sbat         000000ea  0000000000019000  0000000000019000  0000f200  2**2\n";
        let private =
            "Magic\t\t\t020b\t(PE32+)\nSectionAlignment\t00001000\nFileAlignment\t\t00000200\n";
        assert_eq!(pe_layout(headers, private), Some((0x1000, 0x190ea)));
        assert_eq!(pe_layout("", private), None);
    }

    #[test]
    fn esp_holds_the_unified_kernel_image_where_firmware_looks() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("esp.img");
        write_esp(&path, 64 * MIB, b"MZ fake efi").expect("esp");
        let mut file = fs::File::open(&path).expect("open");
        let fs = fatfs::FileSystem::new(&mut file, fatfs::FsOptions::new()).expect("fat");
        let mut f = fs
            .root_dir()
            .open_file("EFI/BOOT/BOOTX64.EFI")
            .expect("bootx64");
        let mut got = Vec::new();
        std::io::Read::read_to_end(&mut f, &mut got).expect("read");
        assert_eq!(got, b"MZ fake efi");
    }

    #[test]
    fn gce_cmdline_finds_root_and_data_by_name() {
        let c = gce_cmdline(&"ab".repeat(32), 4096);
        assert!(
            c.contains("clusterctl.verity_data=PARTLABEL=clusterctl-root"),
            "{c}"
        );
        assert!(
            c.contains("clusterctl.data=/dev/disk/by-id/scsi-0Google_PersistentDisk_data"),
            "{c}"
        );
        assert!(c.contains("console=ttyS0"), "{c}");
        assert!(!c.contains("/dev/vd"), "{c}");
    }

    #[test]
    fn cmdline_carries_root_hash() {
        let c = cmdline(&"ab".repeat(32), 4096);
        assert!(c.contains(&format!("clusterctl.verity={}", "ab".repeat(32))));
        assert!(c.contains("clusterctl.verity_hashoffset=4096"));
        assert!(c.contains(" ro "));
        assert!(c.contains("systemd.unified_cgroup_hierarchy=0"));
    }

    #[test]
    fn bad_package_name_is_rejected() {
        let mut o = BuildOptions::new("/x".into());
        o.packages.push("foo;rm".into());
        assert!(matches!(
            validate(&o),
            Err(NodeImageError::InvalidOption {
                option: "package",
                ..
            })
        ));
    }
}

#[cfg(test)]
mod reuse_tests {
    use super::*;

    #[test]
    fn unchanged_inputs_are_a_no_op() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let opts = BuildOptions::new(tmp.path().to_path_buf());
        let r = super::tests::resolved(&[("libssl3", "3.0.22-1~deb12u2")]);
        let hash = input_hash(&opts, &r);
        crate::manifest::tests::fake_image(&tmp.path().join("bookworm-x"), "bookworm-x", &hash);
        // No root, no debootstrap needed: the existing image is found by its input hash.
        let outcome = reuse(&opts, &hash).expect("scan").expect("reuse");
        assert!(outcome.reused);
        assert_eq!(outcome.image.manifest.version, "bookworm-x");
        assert!(outcome.timings.is_empty());
        let forced = BuildOptions {
            force: true,
            ..opts.clone()
        };
        assert!(reuse(&forced, &hash).expect("scan").is_none());

        let mut changed = opts.clone();
        changed.packages.push("strace".into());
        assert_eq!(
            find_by_input_hash(tmp.path(), &input_hash(&changed, &r)).expect("scan"),
            None
        );
        let fixed = super::tests::resolved(&[("libssl3", "3.0.23-1~deb12u2")]);
        assert_eq!(
            find_by_input_hash(tmp.path(), &input_hash(&opts, &fixed)).expect("scan"),
            None,
            "a newer security fix is not up to date"
        );
    }

    #[test]
    fn offline_without_lists_says_what_to_do() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let mut opts = BuildOptions::new(tmp.path().to_path_buf());
        opts.offline = true;
        opts.mirror = "http://mirror.invalid/debian".into();
        opts.security_mirror = "http://mirror.invalid/debian-security".into();
        let cache = tmp.path().join("cache");
        fs::create_dir_all(&cache).expect("cache");
        let status = cache.join("status");
        fs::write(
            &status,
            "Package: a\nStatus: install ok installed\nVersion: 1\n",
        )
        .expect("status");
        let apt = host_apt(&opts).expect("apt dir");
        let Err(e) = resolve(&opts, &apt, &status) else {
            panic!("resolved without lists");
        };
        let msg = e.to_string();
        assert!(matches!(e, NodeImageError::NoPackageLists { .. }), "{msg}");
        assert!(
            msg.contains("bookworm from http://mirror.invalid/debian") && msg.contains("--offline"),
            "{msg}"
        );
    }
}
