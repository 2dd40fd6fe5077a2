//! The bootstrap's per-node install (`engine::install`) against a real OpenSSH server on
//! 127.0.0.1: what a re-run on an unchanged node costs in remote commands, and that changed
//! binaries and files are still installed and marked for restart.
//!
//! The "node" is a directory of this machine: the install's directories are below the test's
//! temp dir, and its root commands run through `env PATH=<fakes>:...` instead of `sudo`, so
//! `systemctl` and `ctr` are small scripts (`ctr` keeps the references of the archives it
//! imported in a file). Run with `--nocapture` to see the numbers.

mod support;

use std::fs;
use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use clusterctl::engine::Reporter;
use clusterctl::engine::install::{
    self, Artifact, ConfigFile, Image, Installed, NodeDirs, NodeFiles, RESTART_ALL,
};
use clusterctl::ssh::Session;
use sha2::{Digest, Sha256};
use support::Fixture;
use zeroize::Zeroizing;

/// At most this many commands run on a node where nothing changed, however many files it has:
/// one that prepares the directories and compares every binary and archive, one root script that
/// checks the staged files, installs what differs and imports missing images.
const UNCHANGED_EXECS: u64 = 2;
/// The SFTP sessions of an unchanged node: the one that stages its configuration files.
const UNCHANGED_SFTP: u64 = 1;

/// Writes `size` pseudo-random bytes seeded by `seed`; returns the sha256 (hex).
fn write_random_file(path: &Path, size: usize, seed: u64) -> String {
    let mut file = fs::File::create(path).expect("create");
    let mut hasher = Sha256::new();
    let mut state: u64 = 0x9E37_79B9_7F4A_7C15 ^ seed;
    let mut chunk = vec![0u8; 1 << 20];
    let mut written = 0;
    while written < size {
        for word in chunk.chunks_exact_mut(8) {
            state ^= state >> 12;
            state ^= state << 25;
            state ^= state >> 27;
            word.copy_from_slice(&state.wrapping_mul(0x2545_F491_4F6C_DD1D).to_le_bytes());
        }
        let n = chunk.len().min(size - written);
        file.write_all(&chunk[..n]).expect("write");
        hasher.update(&chunk[..n]);
        written += n;
    }
    hex::encode(hasher.finalize())
}

fn write_script(path: &Path, text: &str) {
    fs::write(path, text).expect("write script");
    fs::set_permissions(path, fs::Permissions::from_mode(0o755)).expect("chmod script");
}

/// A node: its directories below `root`, fake `systemctl` and `ctr`, local artifacts.
struct Node {
    root: PathBuf,
    dirs: NodeDirs,
    binaries: Vec<Artifact>,
    images: Vec<Image>,
    files: Vec<ConfigFile>,
}

impl Node {
    /// `binaries` of 16 MiB, two 8 MiB image archives and `files` configuration files (one of
    /// them the kubelet's unit file).
    fn new(base: &Path, name: &str, binaries: usize, files: usize) -> Node {
        let root = base.join(name);
        let local = root.join("local");
        let fakes = root.join("fakes");
        fs::create_dir_all(&local).expect("local dir");
        fs::create_dir_all(&fakes).expect("fakes dir");
        let images_seen = root.join("containerd-images");
        write_script(&fakes.join("systemctl"), "#!/bin/sh\nexit 0\n");
        write_script(
            &fakes.join("ctr"),
            &format!(
                "#!/bin/sh\n# ctr -n k8s.io images ls -q | ctr -n k8s.io images import FILE\n\
                 case \"$3 $4\" in\n\
                 'images ls') cat {seen} 2>/dev/null; exit 0 ;;\n\
                 'images import') head -n 1 \"$5\" >> {seen}; exit 0 ;;\n\
                 esac\nexit 1\n",
                seen = images_seen.display()
            ),
        );
        let r = |p: &str| root.join(p).display().to_string();
        let dirs = NodeDirs {
            as_root: format!("env PATH={}:/usr/sbin:/usr/bin:/sbin:/bin", fakes.display()),
            bin: r("bin"),
            images: r("images"),
            staging: r("staging"),
            restart_pending: r("restart-pending"),
            etc: (r("etc"), r("saved/etc")),
        };
        let binaries = (0..binaries)
            .map(|i| {
                let path = local.join(format!("bin-{i}"));
                let sha256 = write_random_file(&path, 16 << 20, i as u64);
                Artifact {
                    label: format!("bin-{i}"),
                    local: path,
                    sha256: Some(sha256),
                    remote: r(&format!("bin/bin-{i}")),
                }
            })
            .collect();
        let images = (0..2)
            .map(|i| {
                let reference = format!("registry.test/image-{i}:1");
                let path = local.join(format!("image-{i}.tar"));
                write_random_file(&path, 8 << 20, 100 + i as u64);
                // The fake ctr reads the reference from the first line.
                let mut data = fs::read(&path).expect("read archive");
                data.splice(0..0, format!("{reference}\n").into_bytes());
                fs::write(&path, &data).expect("write archive");
                Image {
                    artifact: Artifact {
                        label: format!("image {reference}"),
                        local: path,
                        sha256: Some(hex::encode(Sha256::digest(&data))),
                        remote: r(&format!("images/image-{i}.tar")),
                    },
                    reference,
                }
            })
            .collect();
        let files = (0..files)
            .map(|i| {
                let (dest, restart) = match i {
                    0 => (
                        r("etc/systemd/system/kubelet.service"),
                        "kubelet.service".to_owned(),
                    ),
                    i if i % 2 == 0 => (r(&format!("etc/kubernetes/config-{i}.yaml")), "*".into()),
                    i => (r(&format!("pki/key-{i}.pem")), RESTART_ALL.to_owned()),
                };
                ConfigFile {
                    dest,
                    mode: if i % 2 == 0 { 0o644 } else { 0o600 },
                    content: Zeroizing::new(format!("file {i}\n{}", "x".repeat(2000)).into_bytes()),
                    restart,
                }
            })
            .collect();
        Node {
            root,
            dirs,
            binaries,
            images,
            files,
        }
    }

    fn files(&self) -> NodeFiles<'_> {
        NodeFiles {
            binaries: &self.binaries,
            images: &self.images,
            files: &self.files,
        }
    }

    fn marker(&self) -> Option<String> {
        fs::read_to_string(&self.dirs.restart_pending).ok()
    }

    /// What the start phase does with the marker once the units restarted.
    fn restarted(&self) {
        let _ = fs::remove_file(&self.dirs.restart_pending);
    }
}

/// One install: what it did, the commands and SFTP sessions it took, how long.
async fn install(session: &Session, node: &Node) -> (Installed, u64, u64, Duration) {
    let lines = Reporter::silent().lines();
    let line = lines.line("node");
    let (execs, sftps) = (session.exec_count(), session.sftp_count());
    let started = Instant::now();
    let done = install::install(session, "node", &node.dirs, node.files(), &line)
        .await
        .unwrap_or_else(|e| panic!("install: {}", clusterctl::error::error_chain(&e)));
    (
        done,
        session.exec_count() - execs,
        session.sftp_count() - sftps,
        started.elapsed(),
    )
}

#[tokio::test]
async fn an_unchanged_node_costs_few_commands_and_changes_are_still_installed_and_marked() {
    let fx = Fixture::new();
    let sshd = fx.sshd();
    let client = fx.client(sshd.pinned());
    let session = client.connect(&fx.target(&sshd)).await.expect("connect");

    let mut report = Vec::new();
    let mut unchanged_execs = Vec::new();
    for (name, binaries, files) in [("small", 2, 5), ("large", 7, 25)] {
        let mut node = Node::new(fx.path(), name, binaries, files);

        // First install: everything is sent and installed; a new binary marks every unit.
        let (done, execs, sftps, took) = install(&session, &node).await;
        assert_eq!(done.uploaded, binaries + 2, "{done:?}");
        assert_eq!(done.changed, files, "{done:?}");
        assert_eq!(done.imported, 2, "{done:?}");
        assert!(
            node.marker()
                .is_some_and(|m| m.lines().any(|l| l == RESTART_ALL)),
            "{:?}",
            node.marker()
        );
        for f in &node.files {
            assert_eq!(
                fs::read(&f.dest).expect("installed").as_slice(),
                &f.content[..]
            );
        }
        report.push(format!(
            "{name} node ({binaries} binaries, 2 images, {files} files): first install {execs} commands, \
             {sftps} sftp sessions, {took:.2?}"
        ));
        node.restarted();

        // Again, nothing changed: nothing is sent, nothing changes, nothing is marked.
        let (done, execs, sftps, took) = install(&session, &node).await;
        assert_eq!(
            done,
            Installed {
                kept: binaries + 2,
                ..Installed::default()
            }
        );
        assert_eq!(node.marker(), None, "no change, no restart");
        report.push(format!(
            "{name} node: unchanged re-install {execs} commands, {sftps} sftp sessions, {took:.2?}"
        ));
        unchanged_execs.push(execs);
        assert!(
            execs <= UNCHANGED_EXECS && sftps <= UNCHANGED_SFTP,
            "an unchanged node took {execs} commands and {sftps} sftp sessions"
        );

        // A binary and the kubelet's unit file change: both are installed, and the marker
        // names every unit (the binary) and the kubelet (its unit file).
        let new_sum = write_random_file(&node.binaries[0].local, 1 << 20, 999);
        node.binaries[0].sha256 = Some(new_sum.clone());
        node.files[0].content = Zeroizing::new(b"[Service]\nExecStart=/bin/true\n".to_vec());
        let (done, execs, sftps, took) = install(&session, &node).await;
        assert_eq!(done.uploaded, 1, "{done:?}");
        assert_eq!(done.changed, 1, "{done:?}");
        let remote = fs::read(&node.binaries[0].remote).expect("binary");
        assert_eq!(hex::encode(Sha256::digest(&remote)), new_sum);
        assert_eq!(
            fs::read(&node.files[0].dest).expect("unit file").as_slice(),
            &node.files[0].content[..]
        );
        let marker = node.marker().unwrap_or_default();
        let lines: Vec<&str> = marker.lines().collect();
        assert!(
            lines.contains(&RESTART_ALL) && lines.contains(&"kubelet.service"),
            "{marker:?}"
        );
        report.push(format!(
            "{name} node: one binary and one file changed {execs} commands, {sftps} sftp sessions, {took:.2?}"
        ));
        // One command more for the binary: it is verified, marked and renamed in one.
        assert!(
            execs <= UNCHANGED_EXECS + 1 && sftps <= UNCHANGED_SFTP + 1,
            "{execs} commands, {sftps} sftp sessions"
        );
        assert!(node.root.exists());
    }
    eprintln!("{}", report.join("\n"));
    assert_eq!(
        unchanged_execs[0], unchanged_execs[1],
        "an unchanged node's commands depend on its number of files"
    );
}
