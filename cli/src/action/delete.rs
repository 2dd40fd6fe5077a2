//! `clusterctl delete NAME`: removes every provider resource labelled with the cluster's ID, then
//! the cluster's state. Works on half-created clusters and after a crash of either `create` or
//! `delete`: re-running it finishes the job (the engine's delete phases re-check what an
//! interrupted run left in flight against the provider).

use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use anyhow::{Context as _, bail};

use super::{lock_cluster, open_journal, runtime};
use crate::engine::{self, DeleteContext, Env, Reporter};
use crate::provider;
use crate::state::{ClusterStatus, StateStore};

/// What `delete` did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DeleteOutcome {
    /// The cluster's resources and state are gone.
    Deleted {
        /// The files `get-credentials` wrote the cluster's context into (beside the default
        /// one), for the caller to clean.
        kubeconfigs: Vec<PathBuf>,
    },
    /// The cluster had a state directory but no record: nothing was ever provisioned (the record
    /// is written before any side effect); the directory was removed.
    NothingProvisioned,
}

/// Runs `clusterctl delete`.
pub fn delete(
    store: &StateStore,
    name: &str,
    wait_lock: bool,
    report: Reporter,
) -> anyhow::Result<DeleteOutcome> {
    let dir = store.cluster_dir(name)?;
    if !dir.exists() {
        bail!(
            "cluster {name:?} not found in {}; `clusterctl get` lists the known clusters",
            store.root().display()
        );
    }
    let guard = lock_cluster(store, name, wait_lock, report)?;
    let Some(mut record) = guard.load()? else {
        guard.remove()?;
        return Ok(DeleteOutcome::NothingProvisioned);
    };
    let provider: Arc<dyn providers::Provider> = Arc::from(
        provider::provider_for(&record.spec)
            .with_context(|| format!("cannot reach the provider of cluster {name:?}"))?,
    );
    if record.status != ClusterStatus::Deleting {
        record.status = ClusterStatus::Deleting;
        guard.save(&mut record)?;
    }
    let (journal, replay) = open_journal(&guard, report)?;
    let journal = Arc::new(Mutex::new(journal));
    let mut ctx = DeleteContext {
        env: Env {
            cluster: record.cluster_ref(),
            provider,
            journal: journal.clone(),
            concurrency: 1,
            report,
        },
        interrupted: replay.in_flight(),
    };
    let result = runtime()?.block_on(engine::run_phases(
        &mut ctx,
        report,
        &engine::apply::delete_phases(),
    ));
    if let Err(e) = result {
        let _ = journal
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .finish(false);
        return Err(anyhow::Error::new(e)).with_context(|| {
            format!(
                "deleting cluster {name:?} stopped; run `clusterctl delete {name}` again to finish"
            )
        });
    }
    drop(ctx);
    drop(journal);
    report.phase("Removing cluster state");
    let kubeconfigs = crate::kubeconfig::remembered(store, name).unwrap_or_else(|e| {
        report.note(&format!(
            "warning: cannot read which kubeconfig files hold cluster {name:?}: {e}; only the default one is cleaned"
        ));
        Vec::new()
    });
    guard.remove()?;
    Ok(DeleteOutcome::Deleted { kubeconfigs })
}
