//! Installing one node's files over its SSH session: binaries and image archives uploaded by
//! checksum, configuration and secrets staged and installed as root by one script, images
//! imported into containerd.
//!
//! The bootstrap ([`super::bootstrap`]) runs this on every node at every reconcile, so a node
//! where nothing changed must cost little: what it costs is remote commands (each one a login
//! shell that sshd starts; about half a second on an emulated machine), which
//! [`crate::ssh::Session::exec_count`] counts.
//!
//! The restart marker ([`NodeDirs::restart_pending`]) is written before anything a unit reads
//! changes, so a run killed at any point still restarts the units on the next run.

use std::path::PathBuf;
use std::time::Duration;

use sha2::{Digest, Sha256};
use zeroize::Zeroizing;

use super::apply::{EngineError, error_chain};
use super::report::MachineLine;
use crate::ssh::{ExecOptions, FileUpload, Session, UploadOutcome, shell_quote};

/// The marker line that restarts every unit of a node.
pub const RESTART_ALL: &str = "*";

/// Where a node's files go and how commands become root there.
#[derive(Debug, Clone)]
pub struct NodeDirs {
    /// What runs a command as root (`sudo -n`; empty when the login user is root).
    pub as_root: String,
    /// Directory of the binaries (made, owned by the login user).
    pub bin: String,
    /// Directory of the image archives (made, owned by the login user).
    pub images: String,
    /// Where configuration and secrets wait before they are installed as root (made 0700,
    /// owned by the login user).
    pub staging: String,
    /// The restart marker: one line per change, written before the change (see
    /// [`super::bootstrap`]).
    pub restart_pending: String,
    /// `/etc`, which the node image resets at boot, and where a copy of every file installed
    /// below it is kept for the image's restore service.
    pub etc: (String, String),
}

/// A binary or image archive to copy to a node.
#[derive(Debug, Clone)]
pub struct Artifact {
    /// What it is, for messages (`kubelet`, `image registry.k8s.io/pause:3.2`).
    pub label: String,
    /// The local file.
    pub local: PathBuf,
    /// Its sha256 (hex) when known (a verified bundle's manifest), so it is not hashed again.
    pub sha256: Option<String>,
    /// Where it goes on the node.
    pub remote: String,
}

/// A container image archive to import.
#[derive(Debug, Clone)]
pub struct Image {
    /// The image reference the archive holds.
    pub reference: String,
    /// The archive.
    pub artifact: Artifact,
}

/// A small file installed as root: a rendered configuration, a certificate, a key.
pub struct ConfigFile {
    /// Where it goes.
    pub dest: String,
    /// Its permission bits.
    pub mode: u32,
    /// Its content (wiped from memory when dropped: it may be a key).
    pub content: Zeroizing<Vec<u8>>,
    /// What a change restarts: a unit name, or [`RESTART_ALL`].
    pub restart: String,
}

/// Everything one node gets.
#[derive(Clone, Copy)]
pub struct NodeFiles<'a> {
    /// Binaries (0755); a new one restarts every unit.
    pub binaries: &'a [Artifact],
    /// Image archives (0644), imported into containerd's `k8s.io` namespace.
    pub images: &'a [Image],
    /// Configuration and secrets.
    pub files: &'a [ConfigFile],
}

/// What an install did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Installed {
    /// Binaries and archives sent.
    pub uploaded: usize,
    /// Bytes sent for them.
    pub bytes: u64,
    /// Binaries and archives already there.
    pub kept: usize,
    /// Configuration files that changed.
    pub changed: usize,
    /// Images imported.
    pub imported: usize,
}

impl Installed {
    /// One line for the node's progress line.
    pub fn summary(&self) -> String {
        format!(
            "{} file(s) uploaded ({:.0} MiB), {} artifact(s) already there, {} file(s) changed, {} image(s) imported",
            self.uploaded,
            self.bytes as f64 / (1u64 << 20) as f64,
            self.kept,
            self.changed,
            self.imported
        )
    }
}

fn node_err(node: &str, step: impl Into<String>, e: &dyn std::error::Error) -> EngineError {
    EngineError::Node {
        machine: node.to_owned(),
        step: step.into(),
        detail: error_chain(e),
    }
}

/// Runs a root shell script (sent on stdin, never on a command line: it may name secrets' paths
/// but holds no secret) and fails with its output.
pub(crate) async fn root_script(
    session: &Session,
    as_root: &str,
    node: &str,
    step: &str,
    script: &str,
    timeout: Duration,
) -> Result<String, EngineError> {
    let out = session
        .exec_with(
            &format!("{as_root} sh -s"),
            ExecOptions {
                timeout: Some(timeout),
                stdin: Some(script.as_bytes()),
                ..Default::default()
            },
        )
        .await
        .map_err(|e| node_err(node, step, &e))?;
    if !out.success() {
        let mut detail = out.stderr_text().trim().to_owned();
        if detail.is_empty() {
            detail = out.stdout_text().trim().to_owned();
        }
        return Err(EngineError::Node {
            machine: node.to_owned(),
            step: step.to_owned(),
            detail: format!(
                "exit status {}: {}",
                out.exit_status.map_or("none".into(), |s| s.to_string()),
                last_lines(&detail, 15)
            ),
        });
    }
    Ok(out.stdout_text())
}

fn last_lines(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// The name of a file's staged copy: its destination path made flat.
pub(crate) fn staged_name(dest: &str) -> String {
    dest.trim_start_matches('/').replace('/', "__")
}

/// How long the install script may take (it also imports image archives into containerd).
const INSTALL_TIMEOUT: Duration = Duration::from_secs(420);

/// Installs `files` on the node of `session` (named `node` in errors). On a node where nothing
/// changed this is two commands and one SFTP session, however many files there are:
///
/// 1. one command makes the directories, removes what a killed run left (temporary files of
///    uploads, staged files) and reports every binary's and archive's sha256 on the node
///    ([`Session::probe_uploads`]); nothing is hashed locally (the bundle's manifest has the
///    sums) nor, while the files are untouched, on the node;
/// 2. only the binaries and archives that differ are sent, each verified and renamed into place
///    by one command, which for a binary first adds [`RESTART_ALL`] to the restart marker (and
///    syncs it), so a run killed once a binary is replaced still restarts the units next time;
/// 3. the configuration files are written into the staging directory over one SFTP session,
///    without a command per file;
/// 4. one root script checks every staged file's sha256 against what was sent and stops before
///    changing anything if one differs (cut short, altered), installs what differs (the marker
///    written before the first change) and imports the images containerd lacks.
pub async fn install(
    session: &Session,
    node: &str,
    dirs: &NodeDirs,
    files: NodeFiles<'_>,
    line: &MachineLine,
) -> Result<Installed, EngineError> {
    let as_root = &dirs.as_root;
    let (bin, images, staging) = (
        shell_quote(&dirs.bin),
        shell_quote(&dirs.images),
        shell_quote(&dirs.staging),
    );
    let marker = shell_quote(&dirs.restart_pending);
    // Staged files a killed run left may hold keys; `load` keeps its archives in a directory of
    // its own below the staging directory, which stays. The cluster lock is ours.
    let setup = format!(
        "{as_root} install -d -o \"$(id -u)\" -g \"$(id -g)\" -m 0755 {bin} {images} && \
         {as_root} install -d -o \"$(id -u)\" -g \"$(id -g)\" -m 0700 {staging} && \
         find {bin} {images} -maxdepth 1 -name '.*.clusterctl-*.tmp' -delete && \
         find {staging} -mindepth 1 -maxdepth 1 ! -type d -delete"
    );
    let mark = format!(
        "echo '{RESTART_ALL}' | {as_root} tee -a {marker} > /dev/null && {as_root} sync {marker}"
    );
    let artifacts: Vec<(&Artifact, FileUpload<'_>)> = files
        .binaries
        .iter()
        .map(|a| (a, 0o755, Some(mark.as_str())))
        .chain(files.images.iter().map(|i| (&i.artifact, 0o644, None)))
        .map(|(a, mode, before_replace)| {
            let upload = FileUpload {
                local: &a.local,
                remote: &a.remote,
                mode,
                sha256: a.sha256.as_deref(),
                before_replace,
            };
            (a, upload)
        })
        .collect();
    line.say("comparing binaries and images");
    let remote: Vec<&str> = artifacts.iter().map(|(a, _)| a.remote.as_str()).collect();
    let found = session
        .probe_uploads(Some(&setup), &remote)
        .await
        .map_err(|e| {
            node_err(
                node,
                "preparing /var/lib/clusterctl and comparing binaries and images",
                &e,
            )
        })?;
    let mut done = Installed::default();
    for ((artifact, upload), there) in artifacts.iter().zip(&found) {
        let label = &artifact.label;
        if there.sha256().is_none() || there.sha256() != upload.sha256 {
            line.say(&format!("uploading {label}"));
        }
        match session
            .upload_probed(upload, there)
            .await
            .map_err(|e| node_err(node, format!("uploading {label}"), &e))?
        {
            UploadOutcome::Uploaded { bytes, .. } => {
                done.bytes += bytes;
                done.uploaded += 1;
            }
            UploadOutcome::Unchanged { .. } => done.kept += 1,
        }
    }

    line.say("writing configuration and certificates");
    let staged: Vec<Staged> = files
        .files
        .iter()
        .map(|f| Staged {
            staged: format!("{}/{}", dirs.staging, staged_name(&f.dest)),
            dest: f.dest.clone(),
            mode: f.mode,
            restart: f.restart.clone(),
            sha256: hex::encode(Sha256::digest(&f.content[..])),
        })
        .collect();
    let contents: Vec<(&str, &[u8])> = staged
        .iter()
        .zip(files.files)
        .map(|(s, f)| (s.staged.as_str(), &f.content[..]))
        .collect();
    session
        .put_files(&contents)
        .await
        .map_err(|e| node_err(node, "staging configuration and certificates", &e))?;
    line.say("installing configuration files and importing images into containerd");
    let mut script = install_script(&dirs.restart_pending, (&dirs.etc.0, &dirs.etc.1), &staged);
    script.push_str(&import_script(files.images));
    let out = root_script(
        session,
        as_root,
        node,
        "installing configuration files and importing images",
        &script,
        INSTALL_TIMEOUT,
    )
    .await?;
    done.changed = out.lines().filter(|l| l.starts_with("changed ")).count();
    done.imported = out.lines().filter(|l| l.starts_with("imported ")).count();
    Ok(done)
}

/// A configuration file in the staging directory.
pub(crate) struct Staged {
    /// Its staged copy.
    pub staged: String,
    /// Where it goes.
    pub dest: String,
    /// Its mode there.
    pub mode: u32,
    /// What a change restarts: a unit name or [`RESTART_ALL`].
    pub restart: String,
    /// The sha256 (hex) of what was sent.
    pub sha256: String,
}

/// The root script that installs staged files. First it checks every staged file against the
/// sha256 of what was sent and stops, changing nothing, if one differs. Then each file whose
/// content differs from its destination is copied next to it, fsynced and renamed into place;
/// the restart marker is written (and synced) before the first destination changes, so a run
/// killed at any point still restarts the units next time. Staged copies are removed when the
/// script ends (they may hold keys). Prints `changed PATH` per changed file.
/// `saved` is (`/etc`, where its copy lives): every file installed under the first is also
/// copied below the second (silently: a copy is not a change), so it survives the reboot that
/// resets `/etc`.
///
/// A file that is already in place costs no process of its own: one `sha256sum` and one `stat`
/// over all destinations and copies say which are (a fork is slow on an emulated machine, and
/// a node has 15 to 25 files); a file they do not vouch for is compared with `cmp` as before.
pub(crate) fn install_script(marker: &str, saved: (&str, &str), files: &[Staged]) -> String {
    let marker = shell_quote(marker);
    let copy_of = |dest: &str| {
        dest.strip_prefix(saved.0)
            .and_then(|rest| rest.strip_prefix('/'))
            .map(|rest| format!("{}/{rest}", saved.1))
    };
    let quoted = |paths: &mut dyn Iterator<Item = &str>| {
        paths.map(shell_quote).collect::<Vec<String>>().join(" ")
    };
    let staged = quoted(&mut files.iter().map(|f| f.staged.as_str()));
    let copies: Vec<Option<String>> = files.iter().map(|f| copy_of(&f.dest)).collect();
    let there = quoted(
        &mut files
            .iter()
            .map(|f| f.dest.as_str())
            .chain(copies.iter().flatten().map(String::as_str)),
    );
    let mut script = String::from("set -eu\numask 077\nchanged=0\n");
    if files.is_empty() {
        return script;
    }
    script.push_str(&format!("trap 'rm -f -- {staged}' EXIT\n"));
    // One sha256sum for all staged files; `printf` is a shell builtin.
    script.push_str("if ! printf '%s  %s\\n'");
    for file in files {
        script.push_str(&format!(
            " {} {}",
            shell_quote(&file.sha256),
            shell_quote(&file.staged)
        ));
    }
    script.push_str(&format!(
        " | sha256sum -c --quiet - >&2; then\n\
         \x20 echo 'staged files differ from what was sent (cut short or altered on the way): \
         nothing was installed; run the command again' >&2\n\
         \x20 exit 1\n\
         fi\n\
         nl='\n'\n\
         sums=\"$nl$(sha256sum -- {there} 2>/dev/null || true)$nl\"\n\
         modes=\"$nl$(stat -c '%a %n' -- {there} 2>/dev/null || true)$nl\"\n\
         has() {{ case \"$1\" in *\"$nl$2$nl\"*) return 0 ;; esac; return 1; }}\n\
         save() {{\n\
         \x20 [ -n \"$3\" ] || return 0\n\
         \x20 if has \"$sums\" \"$4  $3\"; then has \"$modes\" \"$2 $3\" || chmod \"$2\" \"$3\"; return 0; fi\n\
         \x20 (umask 022 && mkdir -p \"$(dirname \"$3\")\")\n\
         \x20 cp \"$1\" \"$3.clusterctl-new\"\n\
         \x20 chmod \"$2\" \"$3.clusterctl-new\"\n\
         \x20 sync \"$3.clusterctl-new\"\n\
         \x20 mv -f \"$3.clusterctl-new\" \"$3\"\n\
         }}\n\
         put() {{\n\
         \x20 if has \"$sums\" \"$5  $2\" || {{ [ -f \"$2\" ] && cmp -s \"$1\" \"$2\"; }}; then\n\
         \x20   has \"$modes\" \"$3 $2\" || chmod \"$3\" \"$2\"; save \"$2\" \"$3\" \"$6\" \"$5\"; return 0\n\
         \x20 fi\n\
         \x20 mkdir -p \"$(dirname \"$2\")\"\n\
         \x20 cp \"$1\" \"$2.clusterctl-new\"\n\
         \x20 chmod \"$3\" \"$2.clusterctl-new\"\n\
         \x20 sync \"$2.clusterctl-new\"\n\
         \x20 printf '%s\\n' \"$4\" >> {marker}; sync {marker}; changed=1\n\
         \x20 mv -f \"$2.clusterctl-new\" \"$2\"\n\
         \x20 save \"$2\" \"$3\" \"$6\" \"$5\"\n\
         \x20 echo \"changed $2\"\n\
         }}\n"
    ));
    for (file, copy) in files.iter().zip(&copies) {
        script.push_str(&format!(
            "put {} {} {:o} {} {} {}\n",
            shell_quote(&file.staged),
            shell_quote(&file.dest),
            file.mode,
            shell_quote(&file.restart),
            shell_quote(&file.sha256),
            shell_quote(copy.as_deref().unwrap_or("")),
        ));
    }
    script
}

/// The part of the root script that imports the image archives whose images containerd lacks
/// (after the configuration: containerd's own may just have been installed). Prints
/// `imported REFERENCE` per image.
fn import_script(images: &[Image]) -> String {
    let mut script = String::from(
        "umask 022\nsystemctl start containerd\n\
         have=$(ctr -n k8s.io images ls -q)\n",
    );
    for image in images {
        script.push_str(&format!(
            "printf '%s\\n' \"$have\" | grep -qxF {r} || {{ ctr -n k8s.io images import {p} >/dev/null; \
             ctr -n k8s.io images ls -q | grep -qxF {r} || {{ echo \"the archive {p} does not hold the image {r}; rebuild the bundle\" >&2; exit 1; }}; \
             echo imported {r}; }}\n",
            r = shell_quote(&image.reference),
            p = shell_quote(&image.artifact.remote),
        ));
    }
    script
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn staged_names_are_flat_and_distinct() {
        assert_eq!(
            staged_name("/etc/systemd/system/kubelet.service"),
            "etc__systemd__system__kubelet.service"
        );
        assert_ne!(
            staged_name("/var/lib/clusterctl/kubernetes/pki/ca.crt"),
            staged_name("/var/lib/clusterctl/kubernetes/pki/etcd/ca.crt")
        );
    }

    #[test]
    fn install_script_changes_only_what_differs_and_marks_before_the_first_change() {
        use std::os::unix::fs::PermissionsExt;
        let Ok(dir) = tempfile::tempdir() else {
            panic!("no temp dir");
        };
        let d = |p: &str| dir.path().join(p).display().to_string();
        let marker = d("restart-pending");
        let stage = |content: &str, name: &str| {
            std::fs::write(d(name), content).unwrap_or_default();
        };
        let sum = |content: &str| hex::encode(Sha256::digest(content.as_bytes()));
        // The script for staged contents `a` (s1) and `b` (s2), and what it checks they are.
        let files = |a: &str, b: &str| {
            vec![
                Staged {
                    staged: d("s1"),
                    dest: d("etc/a.conf"),
                    mode: 0o644,
                    restart: "kubelet.service".to_owned(),
                    sha256: sum(a),
                },
                Staged {
                    staged: d("s2"),
                    dest: d("pki/b.key"),
                    mode: 0o600,
                    restart: RESTART_ALL.to_owned(),
                    sha256: sum(b),
                },
            ]
        };
        let run = |script: &str| {
            let out = std::process::Command::new("sh")
                .arg("-c")
                .arg(script)
                .output()
                .unwrap_or_else(|e| panic!("sh: {e}"));
            assert!(
                out.status.success(),
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );
            String::from_utf8_lossy(&out.stdout).into_owned()
        };
        let (etc, saved) = (d("etc"), d("saved/etc"));
        let script = |a: &str, b: &str| install_script(&marker, (&etc, &saved), &files(a, b));
        stage("a", "s1");
        stage("b", "s2");
        let out = run(&script("a", "b"));
        assert_eq!(
            out.lines().filter(|l| l.starts_with("changed ")).count(),
            2,
            "{out}"
        );
        assert!(std::path::Path::new(&marker).exists(), "marker written");
        assert_eq!(
            std::fs::read_to_string(d("etc/a.conf")).unwrap_or_default(),
            "a"
        );
        let mode = std::fs::metadata(d("pki/b.key")).map(|m| m.permissions().mode() & 0o777);
        assert_eq!(mode.unwrap_or(0), 0o600);
        assert!(
            !std::path::Path::new(&d("s2")).exists(),
            "staged secret removed"
        );
        // Files under /etc (here: etc/) are kept below saved/ for the reboot, nothing else.
        assert_eq!(
            std::fs::read_to_string(d("saved/etc/a.conf")).unwrap_or_default(),
            "a"
        );
        assert!(!std::path::Path::new(&d("saved/etc/pki")).exists());
        assert!(!std::path::Path::new(&d("saved/pki")).exists());
        // Same content again: nothing changes and no marker appears; a lost copy comes back
        // without counting as a change.
        std::fs::remove_file(&marker).unwrap_or_default();
        std::fs::remove_file(d("saved/etc/a.conf")).unwrap_or_default();
        stage("a", "s1");
        stage("b", "s2");
        let out = run(&script("a", "b"));
        assert!(!out.contains("changed"), "{out}");
        assert!(
            !std::path::Path::new(&marker).exists(),
            "no marker without a change"
        );
        assert_eq!(
            std::fs::read_to_string(d("saved/etc/a.conf")).unwrap_or_default(),
            "a"
        );
        // One file differs: only it changes, and the marker is back naming what it restarts;
        // the copy follows.
        stage("a2", "s1");
        stage("b", "s2");
        let out = run(&script("a2", "b"));
        assert_eq!(out.trim(), format!("changed {}", d("etc/a.conf")));
        assert_eq!(
            std::fs::read_to_string(&marker).unwrap_or_default(),
            "kubelet.service\n"
        );
        assert_eq!(
            std::fs::read_to_string(d("saved/etc/a.conf")).unwrap_or_default(),
            "a2"
        );
    }

    #[test]
    fn a_staged_file_cut_short_or_altered_stops_the_install_before_any_change() {
        let Ok(dir) = tempfile::tempdir() else {
            panic!("no temp dir");
        };
        let d = |p: &str| dir.path().join(p).display().to_string();
        let marker = d("restart-pending");
        let sum = |content: &str| hex::encode(Sha256::digest(content.as_bytes()));
        let staged = |name: &str, dest: &str, content: &str| Staged {
            staged: d(name),
            dest: d(dest),
            mode: 0o644,
            restart: RESTART_ALL.to_owned(),
            sha256: sum(content),
        };
        // The first file is fine and would change its destination; the second arrived cut
        // short, the third altered, and the fourth not at all.
        let files = [
            staged("s1", "etc/a.conf", "new a"),
            staged("s2", "etc/b.conf", "complete b"),
            staged("s3", "etc/c.conf", "c"),
            staged("s4", "etc/d.conf", "d"),
        ];
        std::fs::create_dir_all(d("etc")).unwrap_or_default();
        std::fs::write(d("etc/a.conf"), "old a").unwrap_or_default();
        std::fs::write(d("s1"), "new a").unwrap_or_default();
        std::fs::write(d("s2"), "compl").unwrap_or_default();
        std::fs::write(d("s3"), "C").unwrap_or_default();
        let script = install_script(&marker, (&d("etc"), &d("saved/etc")), &files);
        let out = std::process::Command::new("sh")
            .arg("-c")
            .arg(&script)
            .output()
            .unwrap_or_else(|e| panic!("sh: {e}"));
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{stderr}");
        assert!(stderr.contains("nothing was installed"), "{stderr}");
        for bad in ["s2", "s3", "s4"] {
            assert!(stderr.contains(&d(bad)), "{bad} not named: {stderr}");
        }
        assert!(
            !stderr.contains(&format!("{}: FAILED", d("s1"))),
            "{stderr}"
        );
        assert_eq!(
            std::fs::read_to_string(d("etc/a.conf")).unwrap_or_default(),
            "old a",
            "nothing changes"
        );
        assert!(!std::path::Path::new(&d("etc/b.conf")).exists());
        assert!(
            !std::path::Path::new(&marker).exists(),
            "nothing to restart"
        );
        assert!(!std::path::Path::new(&d("saved")).exists());
    }

    #[test]
    fn a_file_already_in_place_costs_no_process_of_its_own() {
        use std::os::unix::fs::PermissionsExt;
        let Ok(dir) = tempfile::tempdir() else {
            panic!("no temp dir");
        };
        let d = |p: &str| dir.path().join(p).display().to_string();
        // cmp, cp and chmod log their calls, then do their work.
        std::fs::create_dir_all(d("bin")).unwrap_or_default();
        for tool in ["cmp", "cp", "chmod"] {
            let real = ["/usr/bin", "/bin"]
                .iter()
                .map(|b| format!("{b}/{tool}"))
                .find(|p| std::path::Path::new(p).exists())
                .unwrap_or_else(|| panic!("no {tool}"));
            let wrapper = d(&format!("bin/{tool}"));
            std::fs::write(
                &wrapper,
                format!(
                    "#!/bin/sh\necho \"{tool} $*\" >> {}\nexec {real} \"$@\"\n",
                    d("calls")
                ),
            )
            .unwrap_or_default();
            std::fs::set_permissions(&wrapper, std::fs::Permissions::from_mode(0o755))
                .unwrap_or_default();
        }
        let sum = |content: &str| hex::encode(Sha256::digest(content.as_bytes()));
        let files = |mode: u32| {
            (0..10)
                .map(|i| Staged {
                    staged: d(&format!("s{i}")),
                    dest: d(&format!("etc/f{i}")),
                    mode,
                    restart: RESTART_ALL.to_owned(),
                    sha256: sum(&format!("{i}")),
                })
                .collect::<Vec<_>>()
        };
        let run = |mode: u32| {
            for i in 0..10 {
                std::fs::write(d(&format!("s{i}")), format!("{i}")).unwrap_or_default();
            }
            let _ = std::fs::remove_file(d("calls"));
            let script = install_script(
                &d("restart-pending"),
                (&d("etc"), &d("saved/etc")),
                &files(mode),
            );
            let out = std::process::Command::new("sh")
                .arg("-c")
                .arg(&script)
                .env("PATH", format!("{}:/usr/bin:/bin", d("bin")))
                .output()
                .unwrap_or_else(|e| panic!("sh: {e}"));
            assert!(
                out.status.success(),
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );
            let calls = std::fs::read_to_string(d("calls")).unwrap_or_default();
            (String::from_utf8_lossy(&out.stdout).into_owned(), calls)
        };
        let (out, _) = run(0o644);
        assert_eq!(out.lines().count(), 10, "{out}");
        std::fs::remove_file(d("restart-pending")).unwrap_or_default();
        // Nothing changed: no cmp, cp or chmod at all, nothing marked, staged copies gone.
        let (out, calls) = run(0o644);
        assert_eq!((out.as_str(), calls.as_str()), ("", ""));
        assert!(!std::path::Path::new(&d("restart-pending")).exists());
        assert!(!std::path::Path::new(&d("s3")).exists());
        // Only the mode changed: a chmod of each file and its copy, no change, no marker.
        let (out, calls) = run(0o600);
        assert_eq!(out, "");
        assert!(
            calls.lines().all(|c| c.starts_with("chmod 600 ")),
            "{calls}"
        );
        assert_eq!(calls.lines().count(), 20, "{calls}");
        let mode = std::fs::metadata(d("etc/f3")).map(|m| m.permissions().mode() & 0o777);
        assert_eq!(mode.unwrap_or(0), 0o600);
        let mode = std::fs::metadata(d("saved/etc/f3")).map(|m| m.permissions().mode() & 0o777);
        assert_eq!(mode.unwrap_or(0), 0o600);
        assert!(!std::path::Path::new(&d("restart-pending")).exists());
    }
}
