//! `clusterctl reset NAME NODE`: power-cycle a hung machine through its provider, then wait until
//! its node has booted again (a new kubelet boot ID) and is Ready.
//!
//! This is the repair verb for a machine that no longer answers (a kernel hang, a wedged kubelet
//! or SSH): a hard reset, as `gcloud compute instances reset` does, without a drain (a hung node
//! cannot be drained; its pods are already unreachable). It takes the cluster lock like
//! everything else that takes nodes down, and journals `reset-machine`. Run again after a kill,
//! it resets again (a reset is safe to repeat) and waits.
//!
//! The boot is proven, not assumed: the node's `status.nodeInfo.bootID` is read before the reset
//! (when the API answers) and the wait ends only when the kubelet reports another one with the
//! node Ready. The API is reached through the first control plane, so when that machine is the
//! one reset, the client is made afresh on each poll until it answers again.

use std::time::Duration;

use anyhow::{Context as _, bail};

use super::{load_cluster, lock_cluster, node_state, open_action_journal, runtime, wait_for_node};
use crate::engine::Reporter;
use crate::state::StateStore;

/// Journal action: a machine was reset through its provider.
pub const RESET: &str = "reset-machine";

/// How long `reset` waits by default for the node to be Ready again.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(900);

/// What `reset` did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResetOutcome {
    /// The node (its machine's name).
    pub node: String,
    /// Its boot ID before the reset, if the API answered.
    pub boot_id_before: Option<String>,
    /// Its boot ID once Ready again.
    pub boot_id_after: String,
    /// Seconds from the reset until the node was Ready with a new boot ID.
    pub ready_after: Duration,
}

/// Runs `clusterctl reset`.
pub fn reset(
    store: &StateStore,
    name: &str,
    node: &str,
    timeout: Duration,
    wait_lock: bool,
    report: Reporter,
) -> anyhow::Result<ResetOutcome> {
    let record = load_cluster(store, name)?;
    if !record.machines.iter().any(|m| m.name == node) {
        let known: Vec<&str> = record.machines.iter().map(|m| m.name.as_str()).collect();
        bail!(
            "cluster {name:?} has no machine {node:?}; its machines are {}",
            known.join(", ")
        );
    }
    let provider: std::sync::Arc<dyn providers::Provider> =
        std::sync::Arc::from(crate::provider::provider_for(&record.spec)?);
    let guard = lock_cluster(store, name, wait_lock, report)?;
    let (mut journal, _) = open_action_journal(&guard, report)?;
    let rt = runtime()?;
    let result = rt.block_on(async {
        let before = node_state(store, &record, node).await.ok().flatten();
        match &before {
            Some(n) => report.note(&format!(
                "node {node} boot id {} ({})",
                n.boot_id,
                if n.ready { "Ready" } else { "NotReady" }
            )),
            None => report.note(&format!(
                "the API did not report node {node} before the reset; waiting for it to be Ready after"
            )),
        }
        report.phase(&format!("Resetting {node}"));
        let op = journal.intent(RESET, node)?;
        let cluster = record.cluster_ref();
        let machine = node.to_owned();
        let p = provider.clone();
        let reset = tokio::task::spawn_blocking(move || p.reset_machine(&cluster, &machine))
            .await
            .context("the provider call panicked")?;
        match reset {
            Ok(_) => journal.done(&op)?,
            Err(e) => {
                journal.failed(&op, &e.to_string())?;
                return Err(anyhow::Error::from(e).context(format!("resetting machine {node}")));
            }
        }
        report.machine(node, "reset; waiting for it to boot and be Ready");
        let before_id = before.as_ref().map(|n| n.boot_id.clone());
        match wait_for_node(store, &record, node, before_id.as_deref(), timeout).await {
            Ok((n, took)) => Ok(ResetOutcome {
                node: node.to_owned(),
                boot_id_before: before_id,
                boot_id_after: n.boot_id,
                ready_after: took,
            }),
            Err(e) => Err(e.context(format!(
                "machine {node} was reset, but its node did not come back; look at the machine's console log, or run `clusterctl reset {name} {node}` again"
            ))),
        }
    });
    journal.finish(result.is_ok())?;
    result
}
