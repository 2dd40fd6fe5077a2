//! etcd snapshots of a cluster ([`crate::etcd`]): `clusterctl snapshot NAME` by hand, and the
//! rollback point both upgrades take before they touch the first control-plane machine.
//!
//! A snapshot is taken on the first control plane over its pinned SSH connection, downloaded
//! into `<state>/<cluster>/snapshots/` (0700, files 0600: a snapshot holds every Secret of the
//! cluster) and recorded in the cluster record (`etcd_snapshots`, the last [`etcd::KEEP`]).
//! Journaled as `etcd-snapshot`; a run killed half-way leaves at most a `.part` file, which the
//! next snapshot replaces.

use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

use anyhow::{Context as _, bail};

use super::drain::lock;
use super::{
    connect_pinned, first_control_plane, load_cluster, lock_cluster, open_action_journal,
    pinned_endpoint, runtime,
};
use crate::engine::Reporter;
use crate::engine::access;
use crate::engine::artifacts;
use crate::etcd::{self, EtcdAccess, Snapshot};
use crate::state::{ClusterGuard, ClusterRecord, Journal, StateStore, Timestamp};

/// Journal action: an etcd snapshot was taken (target: the snapshot's file name).
pub const SNAPSHOT: &str = "etcd-snapshot";

/// The directory of a cluster's snapshots in the state.
pub const DIR: &str = "snapshots";

/// Where etcd is reached on a control-plane node (the layout every node has), and where the
/// snapshot is made.
fn access() -> EtcdAccess {
    let layout = templates::kubernetes::Layout::default();
    let pki = |f: &str| format!("{}/{f}", layout.pki_dir);
    EtcdAccess {
        endpoint: format!(
            "https://127.0.0.1:{}",
            templates::kubernetes::ETCD_CLIENT_PORT
        ),
        cacert: pki("etcd/ca.crt"),
        cert: pki("apiserver-etcd-client.crt"),
        key: pki("apiserver-etcd-client.key"),
        etcdctl: format!("{}/etcdctl", layout.bin_dir),
        work_dir: "/var/lib/clusterctl/snapshots".to_owned(),
        as_root: "sudo -n".to_owned(),
    }
}

/// The local `etcdctl` of the cluster's Kubernetes files (resolved and verified).
pub async fn etcdctl_of(record: &ClusterRecord) -> anyhow::Result<PathBuf> {
    let files = artifacts::resolve(&record.spec, &super::create::download_dir()?)
        .await
        .context("the cluster's Kubernetes files (etcdctl is taken from them)")?;
    Ok(files
        .binary("etcdctl")
        .context("the cluster's Kubernetes files")?
        .path
        .clone())
}

/// Takes a snapshot of the cluster's etcd for `reason` with the local `etcdctl` (uploaded to
/// the node if its copy differs), keeps it in the state and records it in `record` (saved
/// through `guard`; older snapshots beyond [`etcd::KEEP`] deleted). The caller holds the
/// cluster lock.
pub async fn take(
    store: &StateStore,
    guard: &ClusterGuard,
    journal: &Mutex<Journal>,
    record: &mut ClusterRecord,
    etcdctl: &Path,
    reason: &str,
    report: Reporter,
) -> anyhow::Result<Snapshot> {
    let name = record.name.clone();
    let cp = first_control_plane(record)?.clone();
    let pin = pinned_endpoint(record, &cp)?;
    let dir = store.cluster_dir(&name)?.join(DIR);
    crate::state::fsio::ensure_private_dir(&dir)
        .with_context(|| format!("making {}", dir.display()))?;
    let now = Timestamp::now();
    let file = etcd::file_name(&now);
    let dest = dir.join(&file);
    if dest.exists() {
        bail!(
            "{} exists already (a snapshot taken this second); try again",
            dest.display()
        );
    }
    report.phase(&format!(
        "Taking an etcd snapshot on {} ({reason})",
        cp.name
    ));
    let op = lock(journal).intent(SNAPSHOT, &file)?;
    let identity = access::client_identity(&record.spec.spec.ssh, store, &name, None).await?;
    let result = async {
        let session = connect_pinned(&identity, pin, Duration::from_secs(60)).await?;
        let taken = etcd::snapshot(&session, &access(), etcdctl, &cp.name, reason, &dest).await;
        session.close().await;
        taken
    }
    .await;
    let snap = match result {
        Ok(s) => s,
        Err(e) => {
            lock(journal).failed(&op, &format!("{e:#}"))?;
            return Err(e.context(format!("the etcd snapshot of cluster {name:?}")));
        }
    };
    let (kept, dropped) =
        etcd::keep_newest(std::mem::take(&mut record.etcd_snapshots), snap.clone());
    record.etcd_snapshots = kept;
    guard.save(record)?;
    lock(journal).done(&op)?;
    for old in dropped {
        let path = dir.join(&old);
        if let Err(e) = std::fs::remove_file(&path)
            && e.kind() != std::io::ErrorKind::NotFound
        {
            report.note(&format!(
                "could not delete the old snapshot {}: {e}",
                path.display()
            ));
        }
    }
    report.note(&format!(
        "etcd snapshot {} of {}: revision {}, {} keys, {:.1} MiB, sha256 {}",
        path_of(store, &name, &snap.file).display(),
        snap.node,
        snap.revision,
        snap.keys,
        snap.bytes as f64 / f64::from(1u32 << 20),
        &snap.sha256[..16]
    ));
    Ok(snap)
}

/// Where a snapshot of the cluster is kept.
pub fn path_of(store: &StateStore, cluster: &str, file: &str) -> PathBuf {
    store.root().join(cluster).join(DIR).join(file)
}

/// `clusterctl snapshot NAME`: a snapshot by hand, under the cluster lock.
pub fn by_hand(
    store: &StateStore,
    name: &str,
    wait_lock: bool,
    report: Reporter,
) -> anyhow::Result<(Snapshot, PathBuf)> {
    let record = load_cluster(store, name)?;
    let guard = lock_cluster(store, name, wait_lock, report)?;
    let mut record = guard.load()?.unwrap_or(record);
    if record.kubernetes.is_none() {
        bail!(
            "cluster {name:?} has no Kubernetes yet (its create never finished): run `clusterctl create` for it first"
        );
    }
    let (journal, _) = open_action_journal(&guard, report)?;
    let journal = Mutex::new(journal);
    let rt = runtime()?;
    let result = rt.block_on(async {
        let etcdctl = etcdctl_of(&record).await?;
        take(
            store,
            &guard,
            &journal,
            &mut record,
            &etcdctl,
            "by hand",
            report,
        )
        .await
    });
    lock(&journal).finish(result.is_ok())?;
    let snap = result?;
    let path = path_of(store, name, &snap.file);
    Ok((snap, path))
}
