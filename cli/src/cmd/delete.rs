//! `clusterctl delete NAME [--wait]`: removes every provider resource labelled with the cluster's
//! ID, then the cluster's state. Works on half-created clusters and after a crash of either
//! `create` or `delete`: re-running it finishes the job.

use std::sync::{Arc, Mutex};

use anyhow::{Context as _, bail};

use super::Global;
use crate::action::{lock_cluster, open_journal, runtime};
use crate::engine::{self, DeleteContext, Env};
use crate::provider;
use crate::state::{ClusterStatus, StateStore};

/// Arguments of `clusterctl delete`.
#[derive(Debug, clap::Args)]
pub struct DeleteArgs {
    /// Name of the cluster.
    pub name: String,
    /// If another command holds the cluster's lock, wait for it instead of failing.
    #[arg(long)]
    pub wait: bool,
}

/// Runs `clusterctl delete`.
pub fn run(global: &Global, args: &DeleteArgs) -> anyhow::Result<()> {
    let report = crate::output::reporter(global.quiet, global.output);
    let name = args.name.as_str();
    let store = StateStore::resolve(global.state_dir.as_deref())?;
    let dir = store.cluster_dir(name)?;
    if !dir.exists() {
        bail!(
            "cluster {name:?} not found in {}; `clusterctl get` lists the known clusters",
            store.root().display()
        );
    }
    let guard = lock_cluster(&store, name, args.wait, report)?;
    let Some(mut record) = guard.load()? else {
        // The record is written before any side effect, so without one nothing was provisioned.
        guard.remove()?;
        report.note(&format!("cluster {name:?} had no state record, so nothing was provisioned; removed its state directory"));
        return Ok(());
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
    let written = crate::kubeconfig::remembered(&store, name).unwrap_or_else(|e| {
        eprintln!("warning: cannot read which kubeconfig files hold cluster {name:?}: {e}; only the default one is cleaned");
        Vec::new()
    });
    guard.remove()?;
    super::credentials::forget_context(name, &written, global.quiet);
    if !global.quiet {
        eprintln!("Cluster {name:?} deleted.");
    }
    Ok(())
}
