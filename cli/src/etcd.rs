//! etcd snapshots of a control plane, taken over its pinned SSH connection and kept in the
//! cluster's state on the admin machine (0600): the rollback point an upgrade takes before it
//! touches the first control plane, and what `clusterctl snapshot` takes by hand.
//!
//! On the node: the bundle's `etcdctl` is uploaded beside the other binaries (by checksum, so
//! only once), `etcdctl snapshot save` runs as root with the API server's etcd client
//! certificate against etcd on the node's loopback, `etcdctl snapshot status` checks what it
//! wrote (hash, revision, keys), and the file, handed to the login user, is downloaded over SFTP
//! with its sha256 checked on both sides and then removed from the node. The data disk never
//! fills with snapshots; the admin machine keeps the last [`KEEP`] of a cluster.

use std::path::Path;
use std::time::Duration;

use anyhow::{Context as _, bail};
use serde::{Deserialize, Serialize};

use crate::ssh::{ExecOptions, Session, shell_quote};
use crate::state::Timestamp;

/// How many snapshots of a cluster the state keeps (older ones are deleted when a new one is
/// taken).
pub const KEEP: usize = 5;

/// The longest `etcdctl snapshot save` may take.
const SAVE_TIMEOUT: Duration = Duration::from_secs(600);

/// How to reach etcd on a control-plane node.
#[derive(Debug, Clone)]
pub struct EtcdAccess {
    /// etcd's client URL as the node sees it (`https://127.0.0.1:2379`).
    pub endpoint: String,
    /// etcd's CA certificate file on the node.
    pub cacert: String,
    /// Client certificate file on the node.
    pub cert: String,
    /// Client key file on the node.
    pub key: String,
    /// Where `etcdctl` is (or is uploaded to) on the node.
    pub etcdctl: String,
    /// A directory on the node for the snapshot while it is taken (made 0700, the login
    /// user's).
    pub work_dir: String,
    /// What runs a command as root on the node (`sudo -n`; empty when the login user is root).
    pub as_root: String,
}

/// One snapshot, as the cluster record keeps it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Snapshot {
    /// File name under the cluster's `snapshots/` directory in the state.
    pub file: String,
    /// The node it was taken on.
    pub node: String,
    /// When.
    pub taken_at: Timestamp,
    /// Why (`before the upgrade to node image 2026.12.03-1`, `by hand`).
    pub reason: String,
    /// sha256 of the file (hex).
    pub sha256: String,
    /// Size in bytes.
    pub bytes: u64,
    /// etcd's revision in it.
    pub revision: i64,
    /// Keys in it.
    pub keys: i64,
}

/// What `etcdctl snapshot status -w json` says of a snapshot file.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Status {
    revision: i64,
    total_key: i64,
}

/// Takes a snapshot of etcd on the node `node` (the session's) into `dest` (a file that must
/// not exist yet; written 0600 through `dest.part`). `etcdctl` is a local copy of the binary
/// to upload if the node's differs.
pub async fn snapshot(
    session: &Session,
    access: &EtcdAccess,
    etcdctl: &Path,
    node: &str,
    reason: &str,
    dest: &Path,
) -> anyhow::Result<Snapshot> {
    let file = dest
        .file_name()
        .and_then(|f| f.to_str())
        .context("the snapshot's file name is not UTF-8")?
        .to_owned();
    session
        .upload_file(etcdctl, &access.etcdctl, 0o755)
        .await
        .with_context(|| format!("node {node}: uploading etcdctl"))?;
    let work = &access.work_dir;
    let made = session
        .run(&format!(
            "{root} install -d -o \"$(id -u)\" -g \"$(id -g)\" -m 0700 {w} && echo \"$(id -u):$(id -g)\"",
            root = access.as_root,
            w = shell_quote(work),
        ))
        .await
        .with_context(|| format!("node {node}: making {work}"))?;
    if !made.success() {
        bail!(
            "node {node}: cannot make {work}: {}",
            made.stderr_text().trim()
        );
    }
    let owner = made.stdout_text().trim().to_owned();
    let remote = format!("{work}/{file}");
    let part = format!("{remote}.part");
    let ctl = format!(
        "ETCDCTL_API=3 {etcdctl} --endpoints={ep} --cacert={ca} --cert={cert} --key={key}",
        etcdctl = shell_quote(&access.etcdctl),
        ep = shell_quote(&access.endpoint),
        ca = shell_quote(&access.cacert),
        cert = shell_quote(&access.cert),
        key = shell_quote(&access.key),
    );
    let taken_at = Timestamp::now();
    let script = format!(
        "set -eu\numask 077\nrm -f {part} {remote}\n\
         {ctl} --command-timeout={t}s snapshot save {part} >&2\n\
         ETCDCTL_API=3 {etcdctl} --write-out=json snapshot status {part}\n\
         chown {owner} {part}\nmv -f {part} {remote}\n",
        part = shell_quote(&part),
        remote = shell_quote(&remote),
        t = SAVE_TIMEOUT.as_secs(),
        etcdctl = shell_quote(&access.etcdctl),
        owner = shell_quote(&owner),
    );
    let out = session
        .exec_with(
            &format!("{} sh -s", access.as_root),
            ExecOptions {
                timeout: Some(SAVE_TIMEOUT + Duration::from_secs(60)),
                stdin: Some(script.as_bytes()),
                ..Default::default()
            },
        )
        .await
        .with_context(|| format!("node {node}: etcdctl snapshot save"))?;
    if !out.success() {
        let _ = session
            .run(&format!("{} rm -f {}", access.as_root, shell_quote(&part)))
            .await;
        bail!(
            "node {node}: etcdctl snapshot save failed (exit status {}): {}",
            out.exit_status.map_or("none".into(), |s| s.to_string()),
            last_words(&out.stderr_text())
        );
    }
    let status: Status = serde_json::from_str(out.stdout_text().trim()).with_context(|| {
        format!(
            "node {node}: etcdctl snapshot status said {:?}, not its JSON",
            last_words(&out.stdout_text())
        )
    })?;
    if status.revision <= 0 || status.total_key <= 0 {
        bail!(
            "node {node}: the snapshot holds no data (revision {}, {} keys): etcd on the node is empty or not the cluster's",
            status.revision,
            status.total_key
        );
    }
    let got = session.download_file(&remote, dest).await;
    let _ = session
        .run(&format!("rm -f {}", shell_quote(&remote)))
        .await;
    let got = got.with_context(|| format!("node {node}: downloading {remote}"))?;
    Ok(Snapshot {
        file,
        node: node.to_owned(),
        taken_at,
        reason: reason.to_owned(),
        sha256: got.sha256,
        bytes: got.bytes,
        revision: status.revision,
        keys: status.total_key,
    })
}

/// The last few lines of a command's output, for an error message.
fn last_words(text: &str) -> String {
    let lines: Vec<&str> = text.trim().lines().collect();
    lines[lines.len().saturating_sub(5)..].join(" | ")
}

/// The record's snapshots once `new` is added: the newest [`KEEP`], and the files of those
/// dropped (to delete).
pub fn keep_newest(mut have: Vec<Snapshot>, new: Snapshot) -> (Vec<Snapshot>, Vec<String>) {
    have.push(new);
    have.sort_by(|a, b| a.taken_at.cmp(&b.taken_at).then(a.file.cmp(&b.file)));
    let drop = have.len().saturating_sub(KEEP);
    let dropped = have.drain(..drop).map(|s| s.file).collect();
    (have, dropped)
}

/// A snapshot file name for a time: `etcd-20261203T131500Z.db`.
pub fn file_name(at: &Timestamp) -> String {
    format!("etcd-{}.db", at.0.format("%Y%m%dT%H%M%SZ"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(text: &str) -> Timestamp {
        Timestamp(
            chrono::DateTime::parse_from_rfc3339(text)
                .expect("timestamp")
                .with_timezone(&chrono::Utc),
        )
    }

    fn snap(file: &str, when: &str) -> Snapshot {
        Snapshot {
            file: file.into(),
            node: "cp".into(),
            taken_at: at(when),
            reason: "by hand".into(),
            sha256: "0".repeat(64),
            bytes: 1,
            revision: 1,
            keys: 1,
        }
    }

    #[test]
    fn the_newest_are_kept_and_the_rest_named_for_deletion() {
        let have: Vec<Snapshot> = (1..=KEEP)
            .map(|i| snap(&format!("s{i}"), &format!("2026-12-0{i}T00:00:00Z")))
            .collect();
        let (kept, dropped) = keep_newest(have.clone(), snap("new", "2026-12-09T00:00:00Z"));
        assert_eq!(dropped, vec!["s1".to_owned()]);
        assert_eq!(kept.len(), KEEP);
        assert_eq!(kept.last().map(|s| s.file.as_str()), Some("new"));
        let (kept, dropped) = keep_newest(have[..2].to_vec(), snap("new", "2026-12-09T00:00:00Z"));
        assert!(dropped.is_empty());
        assert_eq!(kept.len(), 3);
    }

    #[test]
    fn file_names_sort_by_time() {
        let a = file_name(&at("2026-12-03T09:05:01Z"));
        let b = file_name(&at("2026-12-03T10:00:00Z"));
        assert_eq!(a, "etcd-20261203T090501Z.db");
        assert!(a < b);
    }
}
