//! `clusterctl upgrade NAME --node-image VERSION`: roll a new node image out to every machine,
//! control plane first, one machine at a time, the immutable-node way (see
//! [`engine::upgrade`](crate::engine::upgrade)).
//!
//! For each machine: cordon and drain it (PodDisruptionBudgets honoured, the drain of
//! `clusterctl drain`), replace its boot disk from the new image (`replace-boot-disk`, journaled;
//! the data disk, address and host key stay), then the health gate: `/readyz` ok and the node
//! Ready with a new kubelet boot ID within the node timeout. Passed: the node is uncordoned and
//! the next one goes. Failed: the machine's boot disk is replaced back from the image it booted
//! before, the node gated again and uncordoned, and the upgrade stops with a report; the cluster
//! record keeps the unfinished upgrade (`upgrade`), so `clusterctl upgrade NAME` goes on and
//! `clusterctl upgrade NAME --node-image <previous>` rolls every machine back. Killed anywhere,
//! a re-run finishes: machines on the target are gated again and uncordoned if clusterctl
//! cordoned them. When every machine boots the target, it becomes the cluster's pinned image,
//! which later `create` runs give new machines.
//!
//! Auto-upgrade (`action::autoupgrade`) runs it with a step limit and a deadline: it pauses
//! before the next machine ([`UpgradeOutcome::Paused`]) and a later run goes on.
//!
//! Before the first control-plane machine is touched, an etcd snapshot is taken and kept in the
//! state ([`super::snapshot`]); the unfinished upgrade's record names it.
//!
//! Node pools with `upgradeSettings.maxSurge` are upgraded by surge instead of in place, in the
//! batches of [`upgrade::batches`] (a canary of one first, then `maxSurge` at a time): each
//! machine of a batch gets a new machine on the target image, named and recorded in the
//! unfinished upgrade (`surge`) before it is made by `create`'s reconcile (host key, bootstrap);
//! all of them must be Ready (the health gate), else the batch is rolled back (the new machines
//! deleted; the old ones were never cordoned) and the upgrade stops. Then each old machine is
//! cordoned and drained (PodDisruptionBudgets honoured), the new one takes its place in the
//! pool, and the reconcile deletes the old machine and its Node. Killed anywhere, a re-run
//! settles the recorded replacements first: finishes the ones whose old machine was leaving, and
//! goes on with (or, rolling back to another image, removes) the others.
//!
//! A worker whose size differs from its pool's spec (the pool's `machine` changed; `create -f`
//! runs this after saving the spec) is replaced by a new machine of the new size on the target
//! image: by surge in a surge pool, else drained and deleted first and then made again
//! ([`Batch::Recreate`]: no extra capacity, as `maxUnavailable: 1`). `clusterctl upgrade NAME`
//! without `--node-image` does only that when no upgrade is unfinished.
//!
//! Not here yet (issue 10): `maxUnavailable` above 1 or with a surge (refused by the spec),
//! restoring a snapshot.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use providers::{ImageRef, MachineRole, Provider};

use super::drain::{cordon_and_drain, cordoned_by_clusterctl, lock};
use super::snapshot;
use super::{
    cluster_api, load_cluster, lock_cluster, node_state, open_action_journal, runtime,
    wait_for_node,
};
use crate::engine::upgrade::{self, Batch, NodeStep, UpgradePlan};
use crate::engine::{Reporter, names};
use crate::kube::drainer::DrainOptions;
use crate::state::{
    ClusterGuard, ClusterRecord, Journal, PinnedImage, StateStore, SurgeReplacement, UpgradeStatus,
};

/// Journal action: a machine's boot disk was replaced from an image (target: the machine).
pub const REPLACE: &str = "replace-boot-disk";

/// Journal action: a machine's CPUs and memory were changed in place (target: the machine).
pub const RESIZE: &str = "resize-machine";

/// How long a node may take to be Ready with a new boot ID after its boot disk was replaced.
pub const DEFAULT_NODE_TIMEOUT: Duration = Duration::from_secs(1200);

/// What `upgrade` is asked to do.
#[derive(Debug, Clone)]
pub struct UpgradeRequest {
    /// The image to roll out; `None` finishes an unfinished upgrade.
    pub node_image: Option<String>,
    /// Only show the plan and what would block the drains.
    pub dry_run: bool,
    /// Wait for the cluster lock instead of failing at once.
    pub wait_lock: bool,
    /// Each drain's timeout and force.
    pub drain: DrainOptions,
    /// Health gate: how long a node may take to come back.
    pub node_timeout: Duration,
    /// Started by auto-upgrade (`upgrade --auto`): recorded in the unfinished upgrade.
    pub automatic: bool,
    /// Replace at most this many boot disks in this run, then pause (auto-upgrade's one step
    /// per run); `None`: all.
    pub max_replacements: Option<usize>,
    /// Start no machine's replacement at or after this time (the maintenance window's end, an
    /// exclusion's start): the upgrade pauses at that machine boundary.
    pub deadline: Option<crate::state::Timestamp>,
}

impl UpgradeRequest {
    /// A by-hand upgrade to `node_image` (or finishing the unfinished one).
    pub fn new(node_image: Option<String>) -> Self {
        UpgradeRequest {
            node_image,
            dry_run: false,
            wait_lock: false,
            drain: DrainOptions::default(),
            node_timeout: DEFAULT_NODE_TIMEOUT,
            automatic: false,
            max_replacements: None,
            deadline: None,
        }
    }
}

/// What happened to one machine.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeResult {
    /// The machine.
    pub machine: String,
    /// Whether its boot disk was replaced (false: it booted the target already).
    pub replaced: bool,
    /// Kubelet boot ID before and after.
    pub boot_ids: (Option<String>, String),
    /// From the start of its drain until it was Ready again.
    pub took: Duration,
    /// The machine that replaced it (surge); `None`: its boot disk was replaced in place.
    pub replaced_by: Option<String>,
}

/// What `upgrade` did.
#[derive(Debug, Clone)]
pub enum UpgradeOutcome {
    /// `--dry-run`: the plan, and for each machine to replace what blocks its drain.
    Planned {
        /// The plan.
        plan: UpgradePlan,
        /// (machine, blockers) for machines whose drain something blocks now.
        blockers: Vec<(String, Vec<String>)>,
        /// What changes in the packages, when both images are built here.
        packages: Option<nodeimage::PackageDiff>,
    },
    /// Paused at a machine boundary (auto-upgrade's step limit or deadline); the record keeps
    /// the unfinished upgrade for the next run.
    Paused {
        /// The plan being carried out.
        plan: UpgradePlan,
        /// The machines done in this run, in order.
        nodes: Vec<NodeResult>,
        /// Why it paused.
        why: String,
    },
    /// Every machine boots the target.
    Done {
        /// The plan that was carried out.
        plan: UpgradePlan,
        /// Per machine, in order.
        nodes: Vec<NodeResult>,
    },
}

/// Runs `clusterctl upgrade`.
pub fn upgrade(
    store: &StateStore,
    name: &str,
    request: &UpgradeRequest,
    report: Reporter,
) -> anyhow::Result<UpgradeOutcome> {
    let record = load_cluster(store, name)?;
    let image_dir = nodeimage::default_image_dir();
    let Some(pinned) = record.node_image.clone() else {
        bail!(
            "cluster {name:?} has no node image in its record (created by an older clusterctl, or never finished): run `clusterctl create` for it first"
        );
    };
    let target_version = match (&request.node_image, &record.upgrade) {
        (Some(v), _) => v.clone(),
        (None, Some(u)) => u.to.version.clone(),
        // The cluster's own image: only machines whose size changed are replaced (seen in the
        // last observation here, so nothing else is asked for; the plan below decides).
        (None, None) if pending_resizes(&record) > 0 => pinned.version.clone(),
        (None, None) => bail!(
            "nothing to do: every machine of cluster {name:?} boots its node image {} and has the size its spec asks for; say which node image to roll out: `clusterctl upgrade {name} --node-image VERSION` (`clusterctl image list` shows the built ones)",
            pinned.version
        ),
    };
    if let Some(k) = &record.kubernetes_upgrade {
        bail!(
            "cluster {name:?} has an unfinished Kubernetes upgrade ({} -> {}): finish it (`clusterctl upgrade {name} --kubernetes-version {}`) or roll it back before changing node images",
            k.from,
            k.to,
            k.to
        );
    }
    let target = crate::provider::built_image(&target_version, &image_dir)?;
    if let Some(u) = &record.upgrade
        && u.to.version == target.version
        && u.to.digest != target.digest
    {
        bail!(
            "node image {} was rebuilt with other content since the unfinished upgrade started (digest {} then, {} now); roll back with `--node-image {}`",
            target.version,
            u.to.digest,
            target.digest,
            u.from.version
        );
    }
    let to = PinnedImage {
        version: target.version.clone(),
        digest: target.digest.clone(),
    };
    let provider: Arc<dyn Provider> = Arc::from(crate::provider::provider_for(&record.spec)?);
    let rt = runtime()?;
    let machines = list_machines(&rt, &provider, &record)?;
    let pools: Vec<String> = record
        .spec
        .spec
        .node_pools
        .iter()
        .map(|p| p.name.clone())
        .collect();
    let max_surge = surge_pools(&record);
    let sizes = spec_sizes(&record);
    let mut plan = upgrade::plan(&machines, &pools, &max_surge, &sizes, &pinned, &to);
    if request.node_image.is_none() && record.upgrade.is_none() && plan.replacements() == 0 {
        bail!(
            "nothing to do: every machine of cluster {name:?} boots its node image {} and has the size its spec asks for; say which node image to roll out: `clusterctl upgrade {name} --node-image VERSION` (`clusterctl image list` shows the built ones)",
            pinned.version
        );
    }
    if request.dry_run {
        let blockers = rt.block_on(drain_blockers(store, &record, &plan))?;
        let packages = nodeimage::list(&image_dir).ok().and_then(|images| {
            let find = |d: &str| images.iter().find(|i| i.digest == d);
            Some(nodeimage::package_diff(
                &find(&pinned.digest)?.manifest.packages,
                &find(&to.digest)?.manifest.packages,
            ))
        });
        return Ok(UpgradeOutcome::Planned {
            plan,
            blockers,
            packages,
        });
    }

    let guard = lock_cluster(store, name, request.wait_lock, report)?;
    let mut record = guard.load()?.unwrap_or(record);
    if request.automatic {
        // Auto-upgrade decided without the lock: what another command did meanwhile wins.
        if let Some(u) = &record.upgrade
            && let Some(why) = &u.stopped
        {
            bail!(
                "the upgrade of cluster {name:?} to node image {} stopped ({why}) while this run waited; auto-upgrade leaves it to a person: `clusterctl upgrade {name}` tries again, `--node-image {}` rolls it back",
                u.to.version,
                u.from.version
            );
        }
        if record.upgrade.is_none() && record.node_image.as_ref() == Some(&to) {
            report.note(&format!(
                "every machine boots node image {} already (another run finished it)",
                to.version
            ));
            return Ok(UpgradeOutcome::Done {
                plan,
                nodes: Vec::new(),
            });
        }
    }
    let (journal, replay) = open_action_journal(&guard, report)?;
    let journal = Arc::new(Mutex::new(journal));
    record.machines = machines.clone();
    let result = rt.block_on(async {
        let nodes = node_list(store, &record).await?;
        // The new machines of an interrupted surge may not be nodes yet: their batch gates them.
        let surging = record.surge_machines();
        let checked: Vec<providers::Machine> = machines
            .iter()
            .filter(|m| !surging.contains(&m.name))
            .cloned()
            .collect();
        let problems = upgrade::preflight(&checked, &nodes, &to, record.upgrade.as_ref());
        if !problems.is_empty() {
            bail!(
                "the upgrade of cluster {name:?} to node image {} did not start, nothing was changed:\n  {}",
                to.version,
                problems.join("\n  ")
            );
        }
        if plan.replacements() == 0 && record.upgrade.is_none() && pinned == to {
            report.note(&format!(
                "every machine boots node image {} already",
                to.version
            ));
        }
        let started = record
            .upgrade
            .as_ref()
            .filter(|u| u.to == to)
            .map_or_else(crate::state::Timestamp::now, |u| u.started_at);
        let automatic = request.automatic
            || record
                .upgrade
                .as_ref()
                .is_some_and(|u| u.to == to && u.automatic);
        // Rolling an unfinished upgrade back: its target is remembered as rejected at the end.
        let rolled_back_from = record
            .upgrade
            .as_ref()
            .filter(|u| u.to != to && u.from == to)
            .map(|u| u.to.version.clone());
        let same = record.upgrade.as_ref().filter(|u| u.to == to);
        let mut status = UpgradeStatus {
            from: same.map_or_else(|| pinned.clone(), |u| u.from.clone()),
            to: to.clone(),
            started_at: started,
            stopped: None,
            automatic,
            snapshot: same.and_then(|u| u.snapshot.clone()),
            // Kept whatever the target: rolling back settles them first.
            surge: record
                .upgrade
                .as_ref()
                .map(|u| u.surge.clone())
                .unwrap_or_default(),
        };
        // The rollback point: etcd as it is before the first control plane is touched (once
        // per upgrade; a re-run that finds it recorded goes on without another).
        if status.snapshot.is_none()
            && plan
                .steps
                .iter()
                .any(|s| s.replace && s.role == MachineRole::ControlPlane)
        {
            let etcdctl = snapshot::etcdctl_of(&record).await?;
            let snap = snapshot::take(
                store,
                &guard,
                &journal,
                &mut record,
                &etcdctl,
                &format!("before the upgrade to node image {}", to.version),
                report,
            )
            .await
            .with_context(|| {
                format!(
                    "the upgrade of cluster {name:?} to node image {} takes an etcd snapshot before it touches the control plane, and could not; no machine was changed",
                    to.version
                )
            })?;
            status.snapshot = Some(snap.file);
        }
        let previous_target = record.upgrade.as_ref().map(|u| u.to.digest.clone());
        record.upgrade = Some(status);
        guard.save(&mut record)?;
        let mut run = Run {
            rt: &rt,
            store,
            guard: &guard,
            provider: &provider,
            journal: &journal,
            replay: &replay,
            request,
            report,
            image_dir: &image_dir,
            artifacts: None,
            previous_target,
        };
        if run.settle_surge(&mut record, &target).await? {
            let machines = list_machines_async(&provider, &record).await?;
            record.machines = machines.clone();
            guard.save(&mut record)?;
            plan = upgrade::plan(&machines, &pools, &max_surge, &sizes, &pinned, &to);
        }
        // A pool whose first machine is on the target had its canary.
        let canary_done: BTreeSet<String> = plan
            .steps
            .iter()
            .filter(|s| !s.replace && s.max_surge > 0)
            .filter_map(|s| s.pool.clone())
            .collect();
        let batches = upgrade::batches(
            &plan,
            &record.surge_machines(),
            &canary_done,
            request.max_replacements,
        );
        let mut results: Vec<NodeResult> = Vec::new();
        for (i, batch) in batches.iter().enumerate() {
            let replaces = match batch {
                Batch::InPlace(s) => s.replace,
                Batch::Surge { .. } | Batch::Recreate { .. } => true,
            };
            if replaces && let Some(why) = pause_reason(request, &results) {
                report.note(&format!(
                    "the upgrade to node image {} pauses before {}: {why}",
                    to.version,
                    batch.machines().join(", ")
                ));
                return Ok(UpgradeOutcome::Paused {
                    plan: plan.clone(),
                    nodes: results,
                    why,
                });
            }
            let done = match batch {
                Batch::Surge { pool, steps } => {
                    report.phase(&format!(
                        "Replacing {} ({} of {}) with new machine(s) {} by surge: {} new machine(s) first",
                        batch.machines().join(", "),
                        i + 1,
                        batches.len(),
                        what_for(&steps[0], &to),
                        steps.len()
                    ));
                    run.surge(&mut record, pool, steps, &target)
                        .await
                        .inspect(|done| {
                            for (r, step) in done.iter().zip(steps) {
                                report.machine(
                                    &r.machine,
                                    &format!(
                                        "replaced by {} ({}, Ready) after {:.0} s",
                                        r.replaced_by.as_deref().unwrap_or("?"),
                                        what_for(step, &to),
                                        r.took.as_secs_f64()
                                    ),
                                );
                            }
                        })
                }
                Batch::Recreate { pool, step } => {
                    report.phase(&format!(
                        "Replacing {} ({} of {}) with a new machine {}: drained and deleted first (pool {pool} has no surge)",
                        step.machine,
                        i + 1,
                        batches.len(),
                        what_for(step, &to),
                    ));
                    run.recreate(&mut record, pool, step, &target)
                        .await
                        .inspect(|r| {
                            report.machine(
                                &r.machine,
                                &format!(
                                    "replaced by {} ({}, Ready) after {:.0} s",
                                    r.replaced_by.as_deref().unwrap_or("?"),
                                    what_for(step, &to),
                                    r.took.as_secs_f64()
                                ),
                            );
                        })
                        .map(|r| vec![r])
                }
                Batch::InPlace(step) => {
                    report.phase(&match &step.resize {
                        Some(r) => format!(
                            "Resizing {} ({} of {}) in place: {} -> {} (node image {})",
                            step.machine,
                            i + 1,
                            batches.len(),
                            crate::engine::plan::MachineSizeDisplay(&r.from),
                            crate::engine::plan::MachineSizeDisplay(&r.to),
                            to.version
                        ),
                        None => format!(
                            "Upgrading {} ({} of {}) to node image {}",
                            step.machine,
                            i + 1,
                            batches.len(),
                            to.version
                        ),
                    });
                    run.node(&mut record, step, &target).await.map(|r| {
                        report.machine(
                            &step.machine,
                            &format!(
                                "{} and Ready after {:.0} s",
                                if r.replaced {
                                    "boots the new image"
                                } else {
                                    "boots the new image already"
                                },
                                r.took.as_secs_f64()
                            ),
                        );
                        vec![r]
                    })
                }
            };
            match done {
                Ok(done) => results.extend(done),
                Err(e) => {
                    if let Some(u) = &mut record.upgrade {
                        u.stopped = Some(crate::error::error_chain(e.as_ref()));
                    }
                    guard.save(&mut record)?;
                    let upgraded = results.iter().filter(|r| r.replaced).count();
                    return Err(e.context(format!(
                        "the upgrade of cluster {name:?} to node image {} stopped at {} ({upgraded} machine(s) upgraded before it); `clusterctl upgrade {name}` tries again, `clusterctl upgrade {name} --node-image {}` rolls every machine back",
                        to.version,
                        batch.machines().join(", "),
                        pinned.version
                    )));
                }
            }
        }
        record.node_image = Some(to.clone());
        // A rollback: auto-upgrade must not roll the image it came back from out again.
        if let Some(v) = rolled_back_from
            && !record.auto_upgrade.rejected.contains(&v)
        {
            record.auto_upgrade.rejected.push(v);
        }
        record.upgrade = None;
        // Only a new image starts auto-upgrade's soak (replacements for a new size do not).
        if pinned != to {
            record.auto_upgrade.last_upgrade_finished = Some(crate::state::Timestamp::now());
        }
        record.machines = list_machines_async(&provider, &record).await?;
        guard.save(&mut record)?;
        Ok(UpgradeOutcome::Done {
            plan: plan.clone(),
            nodes: results,
        })
    });
    lock(&journal).finish(result.is_ok())?;
    result
}

/// Why the next replacement must wait for a later run, if it must.
fn pause_reason(request: &UpgradeRequest, done: &[NodeResult]) -> Option<String> {
    let replaced = done.iter().filter(|r| r.replaced).count();
    if let Some(max) = request.max_replacements
        && replaced >= max
    {
        return Some(format!(
            "{replaced} machine(s) replaced, the most one run does (`--wait` does them all)"
        ));
    }
    if let Some(d) = &request.deadline
        && crate::state::Timestamp::now() >= *d
    {
        return Some(format!(
            "the maintenance window ends (or an exclusion starts) at {d}; the next window goes on"
        ));
    }
    None
}

/// What a replaced machine is made for: its new size, or the target image.
fn what_for(step: &NodeStep, to: &PinnedImage) -> String {
    use crate::engine::plan::MachineSizeDisplay;
    match &step.resize {
        Some(r) => format!(
            "of the new size {} (was {}) on node image {}",
            MachineSizeDisplay(&r.to),
            MachineSizeDisplay(&r.from),
            to.version
        ),
        None => format!("on node image {}", to.version),
    }
}

/// The sizes the spec asks for: the control plane's and each node pool's.
fn spec_sizes(record: &ClusterRecord) -> upgrade::Sizes {
    let spec = &record.spec.spec;
    upgrade::Sizes {
        control_plane: Some(crate::engine::plan::machine_size(
            &spec.control_plane.machine,
        )),
        pools: spec
            .node_pools
            .iter()
            .map(|p| {
                (
                    p.name.clone(),
                    crate::engine::plan::machine_size(&p.machine),
                )
            })
            .collect(),
    }
}

/// How many machines of the record's last observation differ in size from their spec (a
/// `create -f` that changed a size replaces the workers and resizes the control plane with
/// [`upgrade`]).
pub fn pending_resizes(record: &ClusterRecord) -> usize {
    let to = record.node_image.clone().unwrap_or(PinnedImage {
        version: String::new(),
        digest: String::new(),
    });
    let pools: Vec<String> = record
        .spec
        .spec
        .node_pools
        .iter()
        .map(|p| p.name.clone())
        .collect();
    upgrade::plan(
        &record.machines,
        &pools,
        &BTreeMap::new(),
        &spec_sizes(record),
        &to,
        &to,
    )
    .resizes()
}

/// `upgradeSettings.maxSurge` of the spec's pools that have one above 0.
fn surge_pools(record: &ClusterRecord) -> BTreeMap<String, u32> {
    record
        .spec
        .spec
        .node_pools
        .iter()
        .filter_map(|p| {
            p.upgrade_settings
                .filter(|u| u.max_surge > 0)
                .map(|u| (p.name.clone(), u.max_surge))
        })
        .collect()
}

struct Run<'a> {
    rt: &'a tokio::runtime::Runtime,
    store: &'a StateStore,
    guard: &'a ClusterGuard,
    provider: &'a Arc<dyn Provider>,
    journal: &'a Arc<Mutex<Journal>>,
    replay: &'a crate::state::Replay,
    request: &'a UpgradeRequest,
    report: Reporter,
    image_dir: &'a std::path::Path,
    /// The cluster's Kubernetes artifacts, verified once per run (for surge machines).
    artifacts: Option<Option<Arc<crate::engine::artifacts::Artifacts>>>,
    /// The target digest of the upgrade that was unfinished when this run started.
    previous_target: Option<String>,
}

impl Run<'_> {
    /// One machine: drain, replace, gate, uncordon; on a failed gate, replace back.
    async fn node(
        &mut self,
        record: &mut ClusterRecord,
        step: &NodeStep,
        target: &ImageRef,
    ) -> anyhow::Result<NodeResult> {
        let node = step.machine.as_str();
        let started = Instant::now();
        let before = node_state(self.store, record, node).await.ok().flatten();
        let ours_before = cordoned_by_clusterctl(self.replay, node);
        if !step.replace {
            // Replaced by an earlier, interrupted run: start it if that run was killed before it
            // did (the replacement is idempotent: on the target, it only starts the machine),
            // gate it and put it back in service.
            let running = record
                .machines
                .iter()
                .find(|m| m.name == node)
                .is_some_and(|m| m.state == providers::MachineState::Running);
            if !running {
                self.replace(record, node, target).await?;
            }
            let (n, _) = wait_for_node(self.store, record, node, None, self.request.node_timeout)
                .await
                .with_context(|| format!("node {node} boots the new image but is not healthy"))?;
            if n.unschedulable && ours_before {
                self.uncordon(record, node).await?;
            }
            return Ok(NodeResult {
                machine: node.to_owned(),
                replaced: false,
                boot_ids: (Some(n.boot_id.clone()), n.boot_id),
                took: started.elapsed(),
                replaced_by: None,
            });
        }
        let previous = step
            .current_digest
            .as_deref()
            .and_then(|d| crate::provider::built_image_by_digest(d, self.image_dir));
        let Some(previous) = previous else {
            bail!(
                "node {node} boots an image (digest {}) that is not built in {}, so it could not be rolled back if the new one failed: build it again, or `clusterctl reset` the node",
                step.current_digest.as_deref().unwrap_or("unknown"),
                self.image_dir.display()
            );
        };
        // Drain (cordons it unless it is; uncordons it again if the drain fails).
        {
            let api = cluster_api(self.store, record).await?;
            let was_cordoned = before.as_ref().is_some_and(|n| n.unschedulable);
            let drained = cordon_and_drain(
                &api,
                self.journal,
                node,
                was_cordoned,
                ours_before,
                &self.request.drain,
                self.report,
            )
            .await;
            api.close().await;
            let done = drained.with_context(|| format!("draining node {node}"))?;
            self.report.machine(node, &format!("drained: {done}"));
        }
        let ours = ours_before || !before.as_ref().is_some_and(|n| n.unschedulable);
        let new_image = step.current_digest.as_deref() != Some(target.digest.as_str());
        if let Some(r) = &step.resize {
            self.resize(record, node, &r.to).await?;
        }
        if new_image || step.resize.is_none() {
            self.replace(record, node, target).await?;
        }
        let before_id = before.as_ref().map(|n| n.boot_id.clone());
        match wait_for_node(
            self.store,
            record,
            node,
            before_id.as_deref(),
            self.request.node_timeout,
        )
        .await
        {
            Ok((n, _)) => {
                if ours {
                    self.uncordon(record, node).await?;
                }
                Ok(NodeResult {
                    machine: node.to_owned(),
                    replaced: true,
                    boot_ids: (before_id, n.boot_id),
                    took: started.elapsed(),
                    replaced_by: None,
                })
            }
            Err(gate) => {
                self.report.machine(
                    node,
                    &format!(
                        "failed its health gate ({}); rolling it back to node image {}{}",
                        crate::error::error_chain(gate.as_ref()),
                        previous.version,
                        step.resize.as_ref().map_or_else(String::new, |r| format!(
                            " and its size {}",
                            crate::engine::plan::MachineSizeDisplay(&r.from)
                        ))
                    ),
                );
                // The boot the rollback must replace: the failed one if its kubelet reported,
                // else the one from before the upgrade (a stale Ready must not pass the gate).
                // (Asked briefly: the API is often down with the failed control plane.)
                let failed_boot = tokio::time::timeout(
                    Duration::from_secs(10),
                    node_state(self.store, record, node),
                )
                .await
                .ok()
                .and_then(Result::ok)
                .flatten()
                .map(|n| n.boot_id)
                .or_else(|| before_id.clone());
                if let Some(r) = &step.resize {
                    self.resize(record, node, &r.from).await?;
                }
                if new_image || step.resize.is_none() {
                    self.replace(record, node, &previous).await?;
                }
                // The old image is known to boot: it gets the full default time whatever the
                // gate allowed the new one.
                let back = wait_for_node(
                    self.store,
                    record,
                    node,
                    failed_boot.as_deref(),
                    self.request.node_timeout.max(DEFAULT_NODE_TIMEOUT),
                )
                .await;
                if back.is_ok() && ours {
                    self.uncordon(record, node).await?;
                }
                let rolled = match back {
                    Ok(_) => format!(
                        "it was rolled back to node image {} and is Ready again",
                        previous.version
                    ),
                    Err(e) => format!(
                        "it was rolled back to node image {} but is not Ready either ({}); it stays cordoned",
                        previous.version,
                        crate::error::error_chain(e.as_ref())
                    ),
                };
                Err(gate.context(format!(
                    "node {node} did not come back healthy on node image {}: {rolled}",
                    target.version
                )))
            }
        }
    }

    /// Resizes a machine in place through the provider (journaled `resize-machine`).
    async fn resize(
        &self,
        record: &mut ClusterRecord,
        node: &str,
        size: &providers::MachineSize,
    ) -> anyhow::Result<()> {
        self.report.machine(
            node,
            &format!(
                "resizing it in place to {}",
                crate::engine::plan::MachineSizeDisplay(size)
            ),
        );
        let op = lock(self.journal).intent(RESIZE, node)?;
        let (p, cluster, machine, to) = (
            self.provider.clone(),
            record.cluster_ref(),
            node.to_owned(),
            size.clone(),
        );
        let result = tokio::task::spawn_blocking(move || p.resize_machine(&cluster, &machine, &to))
            .await
            .context("the provider call panicked")?;
        match result {
            Ok(m) => {
                lock(self.journal).done(&op)?;
                if let Some(slot) = record.machines.iter_mut().find(|x| x.name == m.name) {
                    *slot = m;
                }
                self.guard.save(record)?;
                Ok(())
            }
            Err(e) => {
                lock(self.journal).failed(&op, &e.to_string())?;
                Err(anyhow::Error::from(e).context(format!("resizing machine {node}")))
            }
        }
    }

    async fn replace(
        &self,
        record: &mut ClusterRecord,
        node: &str,
        image: &ImageRef,
    ) -> anyhow::Result<()> {
        self.report.machine(
            node,
            &format!("replacing its boot disk from node image {}", image.version),
        );
        let op = lock(self.journal).intent(REPLACE, node)?;
        let (p, cluster, machine, image_ref) = (
            self.provider.clone(),
            record.cluster_ref(),
            node.to_owned(),
            image.clone(),
        );
        let result = tokio::task::spawn_blocking(move || {
            p.replace_boot_disk(&cluster, &machine, &image_ref)
        })
        .await
        .context("the provider call panicked")?;
        match result {
            Ok(m) => {
                lock(self.journal).done(&op)?;
                if let Some(slot) = record.machines.iter_mut().find(|x| x.name == m.name) {
                    *slot = m;
                }
                self.guard.save(record)?;
                Ok(())
            }
            Err(e) => {
                lock(self.journal).failed(&op, &e.to_string())?;
                Err(anyhow::Error::from(e)
                    .context(format!("replacing the boot disk of machine {node}")))
            }
        }
    }

    /// `create`'s reconcile on the running cluster, new machines booting `image`: makes the
    /// pool machines the record names that do not exist (their host keys, their bootstrap) and
    /// deletes (drained, Node removed) the ones it no longer names.
    async fn reconcile(
        &mut self,
        record: &mut ClusterRecord,
        image: &ImageRef,
    ) -> anyhow::Result<()> {
        let spec = record.spec.clone();
        let (rt, report) = (self.rt, self.report);
        let artifacts = match &self.artifacts {
            Some(a) => a.clone(),
            None => {
                let a = tokio::task::block_in_place(|| {
                    super::create::verify_artifacts(
                        rt,
                        &spec,
                        std::path::Path::new("the cluster's stored spec"),
                        report,
                    )
                })?;
                self.artifacts = Some(a.clone());
                a
            }
        };
        let opts = super::create::CreateOptions {
            wait_lock: false,
            ssh_timeout: crate::engine::access::DEFAULT_SSH_TIMEOUT,
            drain_timeout: self.request.drain.timeout,
        };
        let image = image.clone();
        // The reconcile runs its own phases on this runtime: the upgrade's task steps aside.
        tokio::task::block_in_place(|| {
            super::create::reconcile(
                rt,
                self.store,
                self.guard,
                record,
                spec,
                image,
                artifacts,
                self.journal,
                self.replay,
                opts,
                report,
            )
        })?;
        self.guard.save(record)?;
        Ok(())
    }

    /// Settles the surge replacements an earlier run left in the record: the ones whose old
    /// machine was leaving are finished (it is deleted), and the others removed (their new
    /// machine deleted) when the upgrade now goes to another image (a rollback) or their old
    /// machine is gone. Returns whether machines changed.
    async fn settle_surge(
        &mut self,
        record: &mut ClusterRecord,
        target: &ImageRef,
    ) -> anyhow::Result<bool> {
        let Some(u) = record.upgrade.clone() else {
            return Ok(false);
        };
        if u.surge.is_empty() {
            return Ok(false);
        }
        // The entries were recorded under the upgrade that was unfinished before this run.
        let retarget = self
            .previous_target
            .as_deref()
            .is_some_and(|d| d != target.digest);
        let mut keep = Vec::new();
        let mut undone = Vec::new();
        let mut finished = Vec::new();
        for e in &u.surge {
            let old_there = record.machines.iter().any(|m| m.name == e.old);
            if e.leaving {
                finished.push(e.clone());
            } else if retarget || !old_there {
                undone.push(e.clone());
            } else {
                keep.push(e.clone());
            }
        }
        for e in &undone {
            self.report.machine(
                &e.new,
                &format!(
                    "removing it: it was made to replace {} on node image {}, which this run does not roll out",
                    e.old, u.to.version
                ),
            );
            if let Some(list) = record.pool_members.get_mut(&e.pool) {
                list.retain(|n| *n != e.new);
            }
            names::retire(&mut record.retired_machine_names, [e.new.clone()]);
        }
        for e in &finished {
            self.report.machine(
                &e.old,
                &format!(
                    "replaced by {}: deleting it (an earlier run stopped before)",
                    e.new
                ),
            );
        }
        if undone.is_empty() && finished.is_empty() {
            return Ok(false);
        }
        if let Some(u) = &mut record.upgrade {
            u.surge = keep;
        }
        self.guard.save(record)?;
        self.reconcile(record, target)
            .await
            .context("settling the surge replacements an earlier run left")?;
        Ok(true)
    }

    /// Replaces the machines of `steps` (pool `pool`) by surge: new machines on `target`, all
    /// gated, then each old one drained and deleted. A new machine that does not get Ready
    /// rolls the batch back (new machines deleted) and fails.
    async fn surge(
        &mut self,
        record: &mut ClusterRecord,
        pool: &str,
        steps: &[NodeStep],
        target: &ImageRef,
    ) -> anyhow::Result<Vec<NodeResult>> {
        let started = Instant::now();
        let spec = record.spec.clone();
        // A cluster from before random names adopts its machines' names first.
        super::assign_machine_names(record, &spec, self.report);
        // 1. The new machines' names, in the record before anything is made.
        for s in steps {
            let known = record
                .upgrade
                .as_ref()
                .is_some_and(|u| u.surge.iter().any(|e| e.old == s.machine));
            if known {
                continue;
            }
            let new = super::new_pool_machine_name(record, pool)?;
            record
                .pool_members
                .entry(pool.to_owned())
                .or_default()
                .push(new.clone());
            if let Some(u) = &mut record.upgrade {
                u.surge.push(SurgeReplacement {
                    pool: pool.to_owned(),
                    old: s.machine.clone(),
                    new: new.clone(),
                    leaving: false,
                });
            }
            self.guard.save(record)?;
            self.report.machine(
                &new,
                &format!(
                    "named to replace {} (surge: made on node image {} and Ready before {} is drained)",
                    s.machine, target.version, s.machine
                ),
            );
        }
        let batch: Vec<SurgeReplacement> = record
            .upgrade
            .as_ref()
            .map(|u| {
                u.surge
                    .iter()
                    .filter(|e| steps.iter().any(|s| s.machine == e.old))
                    .cloned()
                    .collect()
            })
            .unwrap_or_default();
        let boot_before: BTreeMap<String, String> = {
            let mut m = BTreeMap::new();
            for e in &batch {
                if let Ok(Some(n)) = node_state(self.store, record, &e.old).await {
                    m.insert(e.old.clone(), n.boot_id);
                }
            }
            m
        };
        // 2. Make them (host keys, first boot, bootstrap), and 3. the health gate.
        let made = self.reconcile(record, target).await;
        let mut gate: anyhow::Result<BTreeMap<String, String>> = made.map(|()| BTreeMap::new());
        if let Ok(ids) = &mut gate {
            for e in &batch {
                match wait_for_node(self.store, record, &e.new, None, self.request.node_timeout)
                    .await
                {
                    Ok((n, _)) => {
                        ids.insert(e.new.clone(), n.boot_id);
                    }
                    Err(err) => {
                        gate = Err(err.context(format!("node {} did not get Ready", e.new)));
                        break;
                    }
                }
            }
        }
        let ids = match gate {
            Ok(ids) => ids,
            Err(err) => {
                let news: Vec<&str> = batch.iter().map(|e| e.new.as_str()).collect();
                self.report.note(&format!(
                    "the new machine(s) {} did not come up healthy on node image {} ({}); removing them, {} stay in service",
                    news.join(", "),
                    target.version,
                    crate::error::error_chain(err.as_ref()),
                    batch.iter().map(|e| e.old.as_str()).collect::<Vec<_>>().join(", ")
                ));
                for e in &batch {
                    if let Some(list) = record.pool_members.get_mut(&e.pool) {
                        list.retain(|n| *n != e.new);
                    }
                    names::retire(&mut record.retired_machine_names, [e.new.clone()]);
                }
                if let Some(u) = &mut record.upgrade {
                    u.surge.retain(|e| !batch.contains(e));
                }
                self.guard.save(record)?;
                let removed = self.reconcile(record, target).await;
                let rolled = match removed {
                    Ok(()) => "the new machine(s) were removed".to_owned(),
                    Err(e) => format!(
                        "removing the new machine(s) failed too ({}); `clusterctl create -f` with the cluster's file removes them",
                        crate::error::error_chain(e.as_ref())
                    ),
                };
                return Err(err.context(format!(
                    "the surge batch {} did not come up healthy on node image {}: {rolled}; {} were not touched",
                    news.join(", "),
                    target.version,
                    batch.iter().map(|e| e.old.as_str()).collect::<Vec<_>>().join(", ")
                )));
            }
        };
        // 4. Drain each old machine (PodDisruptionBudgets honoured; a failed drain uncordons it
        // again and stops here: the new machines stay, a re-run goes on).
        for e in &batch {
            let before = node_state(self.store, record, &e.old).await.ok().flatten();
            let Some(before) = before else { continue };
            let ours_before = cordoned_by_clusterctl(self.replay, &e.old);
            let api = cluster_api(self.store, record).await?;
            let drained = cordon_and_drain(
                &api,
                self.journal,
                &e.old,
                before.unschedulable,
                ours_before,
                &self.request.drain,
                self.report,
            )
            .await;
            api.close().await;
            let done = drained.with_context(|| {
                format!(
                    "draining node {} (its replacement {} is Ready and stays)",
                    e.old, e.new
                )
            })?;
            self.report.machine(&e.old, &format!("drained: {done}"));
        }
        // 5. The new machines take the old ones' places in the pool; 6. the old ones leave.
        for e in &batch {
            if let Some(list) = record.pool_members.get_mut(&e.pool) {
                list.retain(|n| *n != e.new);
                match list.iter_mut().find(|n| **n == e.old) {
                    Some(slot) => *slot = e.new.clone(),
                    None => list.push(e.new.clone()),
                }
            }
            names::retire(&mut record.retired_machine_names, [e.old.clone()]);
            if let Some(u) = &mut record.upgrade
                && let Some(x) = u.surge.iter_mut().find(|x| x.old == e.old)
            {
                x.leaving = true;
            }
        }
        self.guard.save(record)?;
        self.reconcile(record, target)
            .await
            .context("deleting the machines the surge replaced")?;
        if let Some(u) = &mut record.upgrade {
            u.surge.retain(|x| !batch.iter().any(|e| e.old == x.old));
        }
        self.guard.save(record)?;
        Ok(batch
            .iter()
            .map(|e| NodeResult {
                machine: e.old.clone(),
                replaced: true,
                boot_ids: (
                    boot_before.get(&e.old).cloned(),
                    ids.get(&e.new).cloned().unwrap_or_default(),
                ),
                took: started.elapsed(),
                replaced_by: Some(e.new.clone()),
            })
            .collect())
    }

    /// Replaces the worker of `step` (pool `pool`, no surge) by a new machine: the new name
    /// recorded in the unfinished upgrade, the old machine drained (PodDisruptionBudgets
    /// honoured), the new name put in its place in the pool, then `create`'s reconcile deletes
    /// the old machine and its Node and makes the new one (spec size, `target` image, host key,
    /// bootstrap), and the new one must get Ready. Killed after the swap, a re-run's
    /// [`Run::settle_surge`] finishes the reconcile and the plan gates the new machine.
    async fn recreate(
        &mut self,
        record: &mut ClusterRecord,
        pool: &str,
        step: &NodeStep,
        target: &ImageRef,
    ) -> anyhow::Result<NodeResult> {
        let started = Instant::now();
        let old = step.machine.as_str();
        let spec = record.spec.clone();
        super::assign_machine_names(record, &spec, self.report);
        // 1. The new machine's name, in the record before anything changes.
        let known = record
            .upgrade
            .as_ref()
            .and_then(|u| u.surge.iter().find(|e| e.old == old).cloned());
        let entry = match known {
            Some(e) => e,
            None => {
                let e = SurgeReplacement {
                    pool: pool.to_owned(),
                    old: old.to_owned(),
                    new: super::new_pool_machine_name(record, pool)?,
                    leaving: false,
                };
                if let Some(u) = &mut record.upgrade {
                    u.surge.push(e.clone());
                }
                self.guard.save(record)?;
                self.report.machine(
                    &e.new,
                    &format!("named to replace {old} (made once {old} is drained and deleted)"),
                );
                e
            }
        };
        // 2. Drain the old machine (a failed drain uncordons it again and stops here).
        let before = node_state(self.store, record, old).await.ok().flatten();
        if let Some(before) = &before {
            let ours_before = cordoned_by_clusterctl(self.replay, old);
            let api = cluster_api(self.store, record).await?;
            let drained = cordon_and_drain(
                &api,
                self.journal,
                old,
                before.unschedulable,
                ours_before,
                &self.request.drain,
                self.report,
            )
            .await;
            api.close().await;
            let done = drained.with_context(|| format!("draining node {old}"))?;
            self.report.machine(old, &format!("drained: {done}"));
        }
        // 3. The new machine takes the old one's place; 4. the reconcile deletes and makes.
        if let Some(list) = record.pool_members.get_mut(pool) {
            if let Some(i) = list.iter().position(|n| n == old) {
                list[i] = entry.new.clone();
            } else if !list.contains(&entry.new) {
                list.push(entry.new.clone());
            }
        }
        names::retire(&mut record.retired_machine_names, [old.to_owned()]);
        if let Some(u) = &mut record.upgrade
            && let Some(x) = u.surge.iter_mut().find(|x| x.old == old)
        {
            x.leaving = true;
        }
        self.guard.save(record)?;
        self.reconcile(record, target).await.with_context(|| {
            format!(
                "replacing machine {old} by {} (`clusterctl upgrade {}` goes on)",
                entry.new, record.name
            )
        })?;
        // 5. The health gate.
        let (n, _) = wait_for_node(
            self.store,
            record,
            &entry.new,
            None,
            self.request.node_timeout,
        )
        .await
        .with_context(|| {
            format!(
                "the new machine {} did not get Ready ({old} was drained and deleted before it was made, so there is nothing to roll back to: `clusterctl repair {}` or `clusterctl create -f` with the cluster's file tries again)",
                entry.new, record.name
            )
        })?;
        if let Some(u) = &mut record.upgrade {
            u.surge.retain(|x| x.old != old);
        }
        self.guard.save(record)?;
        Ok(NodeResult {
            machine: old.to_owned(),
            replaced: true,
            boot_ids: (before.map(|b| b.boot_id), n.boot_id),
            took: started.elapsed(),
            replaced_by: Some(entry.new),
        })
    }

    async fn uncordon(&self, record: &ClusterRecord, node: &str) -> anyhow::Result<()> {
        super::drain::uncordon_node(self.store, record, self.journal, node, self.report).await
    }
}

fn list_machines(
    rt: &tokio::runtime::Runtime,
    provider: &Arc<dyn Provider>,
    record: &ClusterRecord,
) -> anyhow::Result<Vec<providers::Machine>> {
    rt.block_on(list_machines_async(provider, record))
}

async fn list_machines_async(
    provider: &Arc<dyn Provider>,
    record: &ClusterRecord,
) -> anyhow::Result<Vec<providers::Machine>> {
    let (p, cluster) = (provider.clone(), record.cluster_ref());
    let mut list = tokio::task::spawn_blocking(move || p.list_machines(&cluster))
        .await
        .context("the provider call panicked")?
        .with_context(|| format!("listing the machines of cluster {:?}", record.name))?;
    list.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(list)
}

async fn node_list(
    store: &StateStore,
    record: &ClusterRecord,
) -> anyhow::Result<Vec<crate::kube::NodeState>> {
    let api = cluster_api(store, record).await?;
    let r = async {
        api.readyz().await?;
        api.list_nodes().await
    }
    .await;
    api.close().await;
    r.with_context(|| format!("checking the nodes of cluster {:?}", record.name))
}

/// For each machine the plan replaces, what would block its drain now.
async fn drain_blockers(
    store: &StateStore,
    record: &ClusterRecord,
    plan: &UpgradePlan,
) -> anyhow::Result<Vec<(String, Vec<String>)>> {
    let api = cluster_api(store, record).await?;
    let r = async {
        let policy = api.server_version().await?.policy_api();
        let mut out = Vec::new();
        for step in plan.steps.iter().filter(|s| s.replace) {
            let sim = api.simulate_drain(&step.machine, policy).await?;
            let blockers: Vec<String> = sim
                .findings()
                .filter(|(_, b)| b.blocks())
                .map(|(p, b)| format!("{p}: {b}"))
                .collect();
            if !blockers.is_empty() {
                out.push((step.machine.clone(), blockers));
            }
        }
        Ok::<_, anyhow::Error>(out)
    }
    .await;
    api.close().await;
    r
}
