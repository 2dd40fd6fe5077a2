//! `clusterctl drain` and `clusterctl uncordon`: take a node out of service safely, and put it
//! back.
//!
//! A drain takes the cluster lock (the one lock of everything that takes nodes down), checks the
//! node exists, cordons it unless it already is (journaled: `cordon-node`), then evicts its pods
//! ([`kube::drainer`](crate::kube::drainer)) under a journaled `drain-node`. When the drain fails
//! or is interrupted (Ctrl-C, SIGTERM), the node is uncordoned again if, and only if, clusterctl
//! cordoned it (the journal says so: see [`cordoned_by_clusterctl`]); a node an operator had
//! cordoned stays as it was. A drain that finishes leaves the node cordoned and empty (that is
//! what it is for); `uncordon` puts it back in service. A drain killed outright is finished by
//! running it again.
//!
//! `--dry-run` touches nothing and takes no lock: it lists what draining would evict, what it
//! would leave alone and what will block or hurt (PodDisruptionBudgets allowing no disruption,
//! pods without a controller, local storage, single replicas).

use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context as _, bail};

use super::{cluster_api, load_cluster, lock_cluster, open_action_journal, runtime};
use crate::engine::Reporter;
use crate::kube::drain::DrainSimulation;
use crate::kube::drainer::{self, DrainError, DrainEvent, DrainOptions, DrainReport};
use crate::kube::{KubeClient, PolicyApi, TokioClock};
use crate::state::{Event, Journal, Replay, StateStore};

/// Journal action: a node was cordoned by clusterctl.
pub const CORDON: &str = "cordon-node";
/// Journal action: a node was uncordoned by clusterctl.
pub const UNCORDON: &str = "uncordon-node";
/// Journal action: a node's pods were evicted.
pub const DRAIN: &str = "drain-node";

/// What `drain` is asked to do.
#[derive(Debug, Clone)]
pub struct DrainRequest {
    /// The node (its machine's name).
    pub node: String,
    /// Timeout, force, pace.
    pub options: DrainOptions,
    /// Only say what would happen.
    pub dry_run: bool,
    /// Wait for the cluster lock instead of failing at once.
    pub wait_lock: bool,
}

/// What `drain` did.
#[derive(Debug, Clone)]
pub enum DrainOutcome {
    /// `--dry-run`: what a drain would do now.
    Simulated {
        /// The node.
        node: String,
        /// Evictions, skips and findings.
        simulation: DrainSimulation,
        /// The node is cordoned already.
        cordoned: bool,
    },
    /// The node is cordoned and has no pod left to move.
    Drained {
        /// The node.
        node: String,
        /// What the drain did.
        report: DrainReport,
    },
}

/// Whether the journal says clusterctl cordoned `node` and has not uncordoned it since. An
/// interrupted cordon counts as done (the API call may have happened).
pub fn cordoned_by_clusterctl(replay: &Replay, node: &str) -> bool {
    let mut intents = std::collections::BTreeMap::new();
    let mut state = false;
    for record in &replay.records {
        match &record.event {
            Event::Intent { op, action, target } if target == node => {
                intents.insert(op.clone(), action.clone());
            }
            Event::Done { op } | Event::Interrupted { op, .. } => match intents.get(op) {
                Some(a) if a == CORDON => state = true,
                Some(a) if a == UNCORDON => state = false,
                _ => {}
            },
            _ => {}
        }
    }
    state
}

/// Runs `clusterctl drain`.
pub fn drain(
    store: &StateStore,
    name: &str,
    request: &DrainRequest,
    report: Reporter,
) -> anyhow::Result<DrainOutcome> {
    let record = load_cluster(store, name)?;
    let node = request.node.as_str();
    let rt = runtime()?;
    if request.dry_run {
        return rt.block_on(async {
            let api = cluster_api(store, &record).await?;
            let result = async {
                let policy = policy(&api).await?;
                let cordoned = node_cordoned(&api, name, node).await?;
                let simulation = api.simulate_drain(node, policy).await?;
                Ok(DrainOutcome::Simulated {
                    node: node.to_owned(),
                    simulation,
                    cordoned,
                })
            }
            .await;
            api.close().await;
            result
        });
    }
    let guard = lock_cluster(store, name, request.wait_lock, report)?;
    let (journal, replay) = open_action_journal(&guard, report)?;
    let journal = Mutex::new(journal);
    let ours_before = cordoned_by_clusterctl(&replay, node);
    let result = rt.block_on(async {
        let api = cluster_api(store, &record).await?;
        let result = drain_with(&api, &journal, name, node, request, ours_before, report).await;
        api.close().await;
        result
    });
    lock(&journal).finish(result.is_ok())?;
    result
}

pub(crate) fn lock(journal: &Mutex<Journal>) -> std::sync::MutexGuard<'_, Journal> {
    journal.lock().unwrap_or_else(|p| p.into_inner())
}

async fn drain_with(
    api: &KubeClient,
    journal: &Mutex<Journal>,
    name: &str,
    node: &str,
    request: &DrainRequest,
    ours_before: bool,
    report: Reporter,
) -> anyhow::Result<DrainOutcome> {
    let was_cordoned = node_cordoned(api, name, node).await?;
    let op = lock(journal).intent(DRAIN, node)?;
    match cordon_and_drain(
        api,
        journal,
        node,
        was_cordoned,
        ours_before,
        &request.options,
        report,
    )
    .await
    {
        Ok(done) => {
            lock(journal).done(&op)?;
            report.machine(node, &format!("drained: {done}"));
            Ok(DrainOutcome::Drained {
                node: node.to_owned(),
                report: done,
            })
        }
        Err(err) => {
            lock(journal).failed(&op, &crate::error::error_chain(err.as_ref()))?;
            Err(err.context(format!("draining node {node} of cluster {name:?}")))
        }
    }
}

/// The drain both `clusterctl drain` and `create`'s scale-down run: cordons the node unless it
/// is (journaled `cordon-node`), evicts its pods, and when that fails or is interrupted
/// (Ctrl-C, SIGTERM) uncordons it again (journaled `uncordon-node`) if clusterctl cordoned it:
/// now, or by an earlier run (`ours_before`, from the journal). A node an operator cordoned
/// stays cordoned. The error is the bare [`DrainError`] (for the exit code), unless the
/// uncordon failed too.
pub(crate) async fn cordon_and_drain(
    api: &KubeClient,
    journal: &Mutex<Journal>,
    node: &str,
    was_cordoned: bool,
    ours_before: bool,
    options: &DrainOptions,
    report: Reporter,
) -> anyhow::Result<DrainReport> {
    let policy = policy(api).await?;
    let ours = if was_cordoned {
        if ours_before {
            report.machine(node, "cordoned by an earlier clusterctl run; draining on");
        } else {
            report.machine(
                node,
                "already cordoned (not by clusterctl: it stays cordoned)",
            );
        }
        ours_before
    } else {
        journaled(journal, CORDON, node, async {
            api.set_unschedulable(node, true).await
        })
        .await?;
        report.machine(node, "cordoned");
        true
    };
    let clock = TokioClock;
    let mut on_event = |event: DrainEvent| report_event(report, node, event);
    let drained = tokio::select! {
        r = drainer::drain_node(api, node, policy, options, &clock, &mut on_event) => r.map_err(anyhow::Error::from),
        _ = interrupted() => Err(anyhow::anyhow!("interrupted")),
    };
    let err = match drained {
        Ok(done) => return Ok(done),
        Err(err) => err,
    };
    if ours {
        match journaled(journal, UNCORDON, node, async {
            api.set_unschedulable(node, false).await
        })
        .await
        {
            Ok(()) => report.machine(
                node,
                "uncordoned again: the drain did not finish, and clusterctl had cordoned it",
            ),
            Err(e) => {
                return Err(err.context(format!(
                    "and node {node} could not be uncordoned ({e:#}): run `clusterctl uncordon` for it"
                )));
            }
        }
    }
    Err(err)
}

/// Runs `clusterctl uncordon`: the node is schedulable again (whoever cordoned it). Returns
/// whether it was cordoned.
pub fn uncordon(
    store: &StateStore,
    name: &str,
    node: &str,
    wait_lock: bool,
    report: Reporter,
) -> anyhow::Result<bool> {
    let record = load_cluster(store, name)?;
    let guard = lock_cluster(store, name, wait_lock, report)?;
    let (journal, _) = open_action_journal(&guard, report)?;
    let journal = Mutex::new(journal);
    let rt = runtime()?;
    let result = rt.block_on(async {
        let api = cluster_api(store, &record).await?;
        let result = async {
            let cordoned = node_cordoned(&api, name, node).await?;
            if cordoned {
                journaled(&journal, UNCORDON, node, async {
                    api.set_unschedulable(node, false).await
                })
                .await?;
                report.machine(node, "uncordoned");
            } else {
                report.machine(node, "not cordoned: nothing to do");
            }
            Ok(cordoned)
        }
        .await;
        api.close().await;
        result
    });
    lock(&journal).finish(result.is_ok())?;
    result
}

/// A drain's progress line.
fn report_event(report: Reporter, node: &str, event: DrainEvent) {
    match event {
        DrainEvent::Evicted(pod) => report.machine(node, &format!("evicted {pod}")),
        DrainEvent::Deleted(pod) => {
            report.machine(node, &format!("deleted {pod} (--force, after the timeout)"))
        }
        DrainEvent::Held { pod, reason } => {
            report.machine(node, &format!("waiting to evict {pod}: {reason}"))
        }
        DrainEvent::Retrying(why) => report.machine(node, &format!("retrying: {why}")),
    }
}

/// Uncordons `node` (journaled `uncordon-node`) through a fresh API client: the end of an
/// upgrade's step for a node clusterctl cordoned.
pub(crate) async fn uncordon_node(
    store: &StateStore,
    record: &crate::state::ClusterRecord,
    journal: &Mutex<Journal>,
    node: &str,
    report: Reporter,
) -> anyhow::Result<()> {
    let api = cluster_api(store, record).await?;
    let r = journaled(journal, UNCORDON, node, async {
        api.set_unschedulable(node, false).await
    })
    .await;
    api.close().await;
    r.with_context(|| format!("uncordoning node {node}; run `clusterctl uncordon` for it"))?;
    report.machine(node, "uncordoned");
    Ok(())
}

/// One journaled API side effect: intent, call, outcome.
pub(crate) async fn journaled(
    journal: &Mutex<Journal>,
    action: &str,
    target: &str,
    call: impl std::future::Future<Output = Result<(), crate::kube::KubeError>>,
) -> anyhow::Result<()> {
    let op = lock(journal).intent(action, target)?;
    match call.await {
        Ok(()) => {
            lock(journal).done(&op)?;
            Ok(())
        }
        Err(e) => {
            lock(journal).failed(&op, &crate::error::error_chain(&e))?;
            Err(e.into())
        }
    }
}

async fn policy(api: &KubeClient) -> anyhow::Result<PolicyApi> {
    Ok(api.server_version().await?.policy_api())
}

/// Whether the node is cordoned; an unknown node is an error naming the known ones.
async fn node_cordoned(api: &KubeClient, cluster: &str, node: &str) -> anyhow::Result<bool> {
    let nodes = api
        .list_nodes()
        .await
        .with_context(|| format!("listing the nodes of cluster {cluster:?}"))?;
    match nodes.iter().find(|n| n.name == node) {
        Some(n) => Ok(n.unschedulable),
        None => bail!(
            "cluster {cluster:?} has no node {node:?} (nodes: {}); `clusterctl get {cluster}` lists them",
            nodes
                .iter()
                .map(|n| n.name.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        ),
    }
}

/// Resolves on Ctrl-C or SIGTERM, so that an interrupted drain can uncordon what it cordoned.
async fn interrupted() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {},
                    _ = term.recv() => {},
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

/// Drain and Node removal on the API client, for machines `create` deletes on a scale-down
/// (see [`crate::engine::apply::NodeRemoval`]; the engine journals `drain-node` and
/// `delete-node`). Each drain is [`cordon_and_drain`], journaled in `create`'s journal like
/// `clusterctl drain`'s.
pub struct ApiNodeRemoval {
    api: KubeClient,
    journal: Arc<Mutex<Journal>>,
    /// The journal as this run found it: which nodes earlier runs cordoned.
    replay: Replay,
    options: DrainOptions,
    report: Reporter,
}

impl ApiNodeRemoval {
    /// Over `api`, recording in `create`'s `journal` (found as `replay`), with `options` for
    /// every drain.
    pub fn new(
        api: KubeClient,
        journal: Arc<Mutex<Journal>>,
        replay: Replay,
        options: DrainOptions,
        report: Reporter,
    ) -> Self {
        ApiNodeRemoval {
            api,
            journal,
            replay,
            options,
            report,
        }
    }

    async fn drain_one(&self, node: &str) -> anyhow::Result<String> {
        let nodes = self.api.list_nodes().await?;
        let Some(state) = nodes.iter().find(|n| n.name == node) else {
            return Ok("not a node of the cluster (never joined): nothing to drain".into());
        };
        let ours_before = cordoned_by_clusterctl(&self.replay, node);
        cordon_and_drain(
            &self.api,
            &self.journal,
            node,
            state.unschedulable,
            ours_before,
            &self.options,
            self.report,
        )
        .await
        .map(|done| done.to_string())
    }
}

impl crate::engine::apply::NodeRemoval for ApiNodeRemoval {
    fn drain<'a>(
        &'a self,
        node: &'a str,
    ) -> crate::engine::apply::BoxFuture<'a, Result<String, Box<dyn std::error::Error + Send + Sync>>>
    {
        Box::pin(async move {
            // A drain stopped by a budget or a refusal stays a DrainError in the chain, so the
            // exit code says "drain blocked" for `create` too.
            // (Only a bare one: a context, "could not be uncordoned", must not be dropped.)
            self.drain_one(node).await.map_err(|e| {
                if e.chain().count() == 1 {
                    match e.downcast::<DrainError>() {
                        Ok(d) => return Box::new(d) as Box<dyn std::error::Error + Send + Sync>,
                        Err(e) => return e.into(),
                    }
                }
                e.into()
            })
        })
    }

    fn forget<'a>(
        &'a self,
        node: &'a str,
    ) -> crate::engine::apply::BoxFuture<'a, Result<(), Box<dyn std::error::Error + Send + Sync>>>
    {
        Box::pin(async move { self.api.delete_node(node).await.map_err(Into::into) })
    }

    fn pool_nodes(
        &self,
    ) -> crate::engine::apply::BoxFuture<
        '_,
        Result<Vec<String>, Box<dyn std::error::Error + Send + Sync>>,
    > {
        Box::pin(async move {
            let nodes = self.api.list_nodes().await?;
            Ok(nodes
                .into_iter()
                .filter(|n| n.pool.is_some())
                .map(|n| n.name)
                .collect())
        })
    }
}

/// The default per-node timeout, for the CLI's help.
pub const DEFAULT_TIMEOUT: Duration = drainer::DEFAULT_DRAIN_TIMEOUT;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::{Record, Timestamp};

    fn replay(events: Vec<Event>) -> Replay {
        let mut replay = Replay::default();
        replay.records = events
            .into_iter()
            .enumerate()
            .map(|(i, event)| Record {
                seq: i as u64,
                at: Timestamp::now(),
                run: "r".into(),
                event,
            })
            .collect();
        replay
    }

    fn intent(op: &str, action: &str, target: &str) -> Event {
        Event::Intent {
            op: op.into(),
            action: action.into(),
            target: target.into(),
        }
    }

    fn done(op: &str) -> Event {
        Event::Done { op: op.into() }
    }

    #[test]
    fn the_journal_says_which_nodes_clusterctl_cordoned() {
        let r = replay(vec![
            intent("r.1", CORDON, "w1"),
            done("r.1"),
            intent("r.2", DRAIN, "w1"),
            intent("r.3", CORDON, "w2"),
            done("r.3"),
            intent("r.4", UNCORDON, "w2"),
            done("r.4"),
            // A cordon that failed never happened.
            intent("r.5", CORDON, "w3"),
            Event::Failed {
                op: "r.5".into(),
                error: "x".into(),
            },
            // One killed mid-call may have happened.
            intent("r.6", CORDON, "w4"),
            Event::Interrupted {
                op: "r.6".into(),
                action: CORDON.into(),
                target: "w4".into(),
                started_by: "r".into(),
            },
        ]);
        assert!(cordoned_by_clusterctl(&r, "w1"));
        assert!(!cordoned_by_clusterctl(&r, "w2"));
        assert!(!cordoned_by_clusterctl(&r, "w3"));
        assert!(cordoned_by_clusterctl(&r, "w4"));
        assert!(!cordoned_by_clusterctl(&r, "cp"));
    }
}
