//! `clusterctl upgrade NAME --kubernetes-version V [--bundle PATH]`: a Kubernetes version
//! upgrade in place, one node at a time, the control plane first (no kubelet is ever newer than
//! the API server).
//!
//! Before anything changes: the preflight (`engine::upgrade::kubernetes_preflight`: supported,
//! no downgrade, no skipped minor; every machine running and its node Ready, `/readyz` ok), and
//! both versions' files resolved and verified (the new ones to install, the old ones to roll
//! back with). Then for each node: cordon and drain (the drain of `clusterctl drain`), the
//! bootstrap restricted to that node with the new version's files (new binaries installed by
//! checksum; its units restarted, the control plane in its two stages), the health gate
//! (`/readyz`, node Ready, its kubelet reporting the new version), uncordon. A node that fails
//! its gate gets the old version's files back the same way and the upgrade stops; the record
//! keeps it unfinished (`kubernetes_upgrade`), so running the command again with the same
//! version goes on and with the old one rolls every node back. When every node runs the new
//! version, it becomes the cluster's version in its stored spec.
//!
//! Before the first node changes, an etcd snapshot is taken and kept in the state
//! ([`super::snapshot`]); the unfinished upgrade's record names it.
//!
//! Not here: restoring a snapshot, surge pools, auto-upgrade of Kubernetes
//! versions (the channel's releases are shown as due only).

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use providers::MachineRole;

use super::drain::{cordon_and_drain, cordoned_by_clusterctl, lock};
use super::{cluster_api, load_cluster, lock_cluster, node_state, open_action_journal, runtime};
use crate::bundle::KubeVersion;
use crate::engine::Reporter;
use crate::engine::artifacts::{self, Artifacts};
use crate::engine::upgrade as planner;
use crate::kube::drainer::DrainOptions;
use crate::spec::{self, ArtifactSource};
use crate::state::{ClusterGuard, ClusterRecord, KubernetesUpgradeStatus, StateStore, Timestamp};

/// Journal action: a node's Kubernetes files were installed and its units restarted for a
/// version (target: the node).
pub const INSTALL: &str = "install-kubernetes";

/// What `upgrade --kubernetes-version` is asked to do.
#[derive(Debug, Clone)]
pub struct KubeUpgradeRequest {
    /// The version to roll out (or the one an unfinished upgrade came from: a rollback).
    pub version: KubeVersion,
    /// A bundle of that version (air-gapped clusters, whose files come from a bundle).
    pub bundle: Option<PathBuf>,
    /// Only show the order and the preflight.
    pub dry_run: bool,
    /// Wait for the cluster lock.
    pub wait_lock: bool,
    /// Each drain's timeout and force.
    pub drain: DrainOptions,
    /// How long a node may take to report the new version and be Ready.
    pub node_timeout: Duration,
}

/// What happened to one node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KubeNodeResult {
    /// The node.
    pub node: String,
    /// Its role.
    pub role: MachineRole,
    /// Whether its files were installed (false: it ran the version already).
    pub upgraded: bool,
    /// Its kubelet version before and after.
    pub versions: (String, String),
    /// From the start of its drain until it was Ready on the new version.
    pub took: Duration,
}

/// What `upgrade --kubernetes-version` did.
#[derive(Debug, Clone)]
pub enum KubeUpgradeOutcome {
    /// `--dry-run`: the order, each node with its kubelet version now.
    Planned {
        /// Version now.
        from: String,
        /// Target.
        to: String,
        /// (node, role, kubelet version now).
        nodes: Vec<(String, MachineRole, String)>,
    },
    /// Every node runs the target.
    Done {
        /// Version before.
        from: String,
        /// Target.
        to: String,
        /// Per node, in order.
        nodes: Vec<KubeNodeResult>,
    },
}

/// The spec's Kubernetes block for `version` from `source`.
fn kubernetes_for(
    base: &spec::Cluster,
    version: KubeVersion,
    source: ArtifactSource,
) -> anyhow::Result<spec::Cluster> {
    let mut s = base.clone();
    s.spec.kubernetes.version = Some(
        version
            .to_string()
            .parse()
            .map_err(|e| anyhow::anyhow!("version {version}: {e}"))?,
    );
    s.spec.kubernetes.channel = None;
    s.spec.kubernetes.artifacts = source;
    Ok(s)
}

/// Runs `clusterctl upgrade NAME --kubernetes-version`.
pub fn upgrade_kubernetes(
    store: &StateStore,
    name: &str,
    request: &KubeUpgradeRequest,
    report: Reporter,
) -> anyhow::Result<KubeUpgradeOutcome> {
    let record = load_cluster(store, name)?;
    let Some(status) = &record.kubernetes else {
        bail!("cluster {name:?} runs no Kubernetes yet: run `clusterctl create` for it first");
    };
    let current: KubeVersion = status
        .version
        .parse()
        .with_context(|| format!("the record's Kubernetes version {:?}", status.version))?;
    let unfinished = record
        .kubernetes_upgrade
        .as_ref()
        .map(|u| -> anyhow::Result<(KubeVersion, KubeVersion)> {
            Ok((u.from.parse()?, u.to.parse()?))
        })
        .transpose()
        .context("the record's unfinished Kubernetes upgrade")?;
    if let Some(c) = record.spec.spec.kubernetes.channel {
        bail!(
            "cluster {name:?} follows the {c:?} release channel: its Kubernetes version comes from the channel, and upgrading a channel cluster is not built yet (auto-upgrade shows the channel's next release as due)"
        );
    }
    if record.upgrade.is_some() {
        bail!(
            "cluster {name:?} has an unfinished node-image upgrade: finish it (`clusterctl upgrade {name}`) or roll it back before upgrading Kubernetes"
        );
    }
    let target = request.version;
    let problems = planner::kubernetes_preflight(current, target, unfinished);
    if !problems.is_empty() {
        bail!(
            "the upgrade of cluster {name:?} to Kubernetes {target} did not start, nothing was changed:\n  {}",
            problems.join("\n  ")
        );
    }
    // Where each version's files come from: the source the cluster (or the unfinished upgrade)
    // used for the one it runs, the request's bundle (or upstream) for the target.
    let stored = &record.spec;
    // The version a node that fails its gate goes back to: the other end of the unfinished
    // upgrade when one is finished or reversed, else what the cluster runs.
    let (from_version, from_source) = match &record.kubernetes_upgrade {
        Some(u) if u.to == target.to_string() => {
            (u.from.parse::<KubeVersion>()?, u.from_artifacts.clone())
        }
        Some(u) => (u.to.parse::<KubeVersion>()?, u.to_artifacts.clone()),
        None => (current, stored.spec.kubernetes.artifacts.clone()),
    };
    // Reversing an unfinished upgrade (its target is where it came from).
    let reversing = record
        .kubernetes_upgrade
        .as_ref()
        .is_some_and(|u| u.from == target.to_string());
    let to_source = match (
        &request.bundle,
        &record.kubernetes_upgrade,
        &stored.spec.kubernetes.artifacts,
    ) {
        (Some(p), _, _) => ArtifactSource::Bundle(spec::Bundle {
            path: std::path::absolute(p).with_context(|| format!("--bundle {}", p.display()))?,
        }),
        (None, Some(u), _) if u.to == target.to_string() => u.to_artifacts.clone(),
        (None, Some(u), _) if u.from == target.to_string() => u.from_artifacts.clone(),
        (None, _, ArtifactSource::Upstream) => ArtifactSource::Upstream,
        (None, _, ArtifactSource::Bundle(b)) => bail!(
            "cluster {name:?} installs Kubernetes from the bundle {}; pass --bundle PATH with a bundle of {target}",
            b.path.display()
        ),
    };
    let old_spec = kubernetes_for(stored, from_version, from_source.clone())?;
    let new_spec = kubernetes_for(stored, target, to_source.clone())?;
    let rt = runtime()?;
    let download = super::create::download_dir()?;
    let new_files: Arc<Artifacts> = Arc::new(
        rt.block_on(artifacts::resolve(&new_spec, &download))
            .with_context(|| format!("the files of Kubernetes {target}"))?,
    );
    let old_files: Arc<Artifacts> = Arc::new(
        rt.block_on(artifacts::resolve(&old_spec, &download))
            .with_context(|| {
                format!("the files of Kubernetes {from_version}, needed to roll a node back")
            })?,
    );
    let pools: Vec<String> = stored
        .spec
        .node_pools
        .iter()
        .map(|p| p.name.clone())
        .collect();
    let mut order = planner::kubernetes_order(&record.machines, &pools);
    if reversing {
        // Back down: workers first, so no kubelet is ever newer than the API server.
        order.reverse();
    }
    let nodes_now = rt.block_on(async {
        let api = cluster_api(store, &record).await?;
        let r = async {
            api.readyz().await?;
            api.list_nodes().await
        }
        .await;
        api.close().await;
        r.with_context(|| format!("checking the nodes of cluster {name:?}"))
    })?;
    let version_of = |n: &str| {
        nodes_now
            .iter()
            .find(|x| x.name == n)
            .map_or_else(|| "unknown".to_owned(), |x| x.kubelet_version.clone())
    };
    if reversing && from_version.minor != target.minor {
        // Reversing a minor upgrade would take the API server back a minor version (etcd's
        // data may use the newer one's schema): only while no control plane runs it.
        let newer = format!("v{from_version}");
        let cps: Vec<&str> = order
            .iter()
            .filter(|(n, r)| {
                *r == MachineRole::ControlPlane
                    && nodes_now
                        .iter()
                        .any(|x| &x.name == n && x.kubelet_version == newer)
            })
            .map(|(n, _)| n.as_str())
            .collect();
        if !cps.is_empty() {
            bail!(
                "the control plane ({}) runs Kubernetes {from_version} already: going back a minor version is not supported (etcd's data may use its schema); finish the upgrade with `--kubernetes-version {from_version}`",
                cps.join(", ")
            );
        }
    }
    if request.dry_run {
        return Ok(KubeUpgradeOutcome::Planned {
            from: current.to_string(),
            to: target.to_string(),
            nodes: order
                .iter()
                .map(|(n, r)| (n.clone(), *r, version_of(n)))
                .collect(),
        });
    }
    let want = format!("v{target}");
    let mut down = Vec::new();
    for (n, _) in &order {
        match nodes_now.iter().find(|x| &x.name == n) {
            None => down.push(format!("machine {n} has no Kubernetes node")),
            // A node on the target may still be coming back (an interrupted run).
            Some(x) if !x.ready && x.kubelet_version != want => {
                down.push(format!("node {n} is not Ready: repair it before upgrading"));
            }
            Some(_) => {}
        }
    }
    if !(down.is_empty() || unfinished.is_some() && down.len() <= 1) {
        bail!(
            "the upgrade of cluster {name:?} to Kubernetes {target} did not start, nothing was changed:\n  {}",
            down.join("\n  ")
        );
    }

    let guard = lock_cluster(store, name, request.wait_lock, report)?;
    let seen = (
        record.kubernetes.as_ref().map(|k| k.version.clone()),
        record.kubernetes_upgrade.clone(),
        record.upgrade.is_some(),
    );
    let mut record = guard.load()?.unwrap_or(record);
    if (
        record.kubernetes.as_ref().map(|k| k.version.clone()),
        record.kubernetes_upgrade.clone(),
        record.upgrade.is_some(),
    ) != seen
    {
        bail!(
            "cluster {name:?} changed while this command waited for its lock (another upgrade ran); nothing was changed: run the command again"
        );
    }
    let (journal, replay) = open_action_journal(&guard, report)?;
    let journal = Mutex::new(journal);
    let before = current.to_string();
    let mut status = match record.kubernetes_upgrade.clone() {
        Some(u) if u.to == target.to_string() => KubernetesUpgradeStatus { stopped: None, ..u },
        // Rolling the unfinished one back: the same record, the other way.
        Some(u) => KubernetesUpgradeStatus {
            from: u.to,
            from_artifacts: u.to_artifacts,
            to: u.from,
            to_artifacts: u.from_artifacts,
            started_at: Timestamp::now(),
            stopped: None,
            snapshot: None,
        },
        None => KubernetesUpgradeStatus {
            from: before.clone(),
            from_artifacts: from_source,
            to: target.to_string(),
            to_artifacts: to_source.clone(),
            started_at: Timestamp::now(),
            stopped: None,
            snapshot: None,
        },
    };
    // The rollback point: etcd before the first node changes (once per upgrade; etcd is the
    // same binary in both versions' files, the running version's etcdctl takes it).
    if status.snapshot.is_none() {
        let etcdctl = old_files
            .binary("etcdctl")
            .context("the running version's files")?
            .path
            .clone();
        let snap = rt
            .block_on(super::snapshot::take(
                store,
                &guard,
                &journal,
                &mut record,
                &etcdctl,
                &format!("before the upgrade to Kubernetes {target}"),
                report,
            ))
            .with_context(|| {
                format!(
                    "the upgrade of cluster {name:?} to Kubernetes {target} takes an etcd snapshot before it changes a node, and could not; nothing was changed"
                )
            })?;
        status.snapshot = Some(snap.file);
    }
    record.kubernetes_upgrade = Some(status);
    guard.save(&mut record)?;
    let run = Run {
        store,
        guard: &guard,
        journal: &journal,
        replay: &replay,
        request,
        report,
    };
    let mut results = Vec::new();
    let mut outcome = Ok(());
    for (i, (node, role)) in order.iter().enumerate() {
        report.phase(&format!(
            "Upgrading {node} ({} of {}) to Kubernetes {target}",
            i + 1,
            order.len()
        ));
        let r = rt.block_on(run.node(
            &mut record,
            node,
            *role,
            (&new_spec, &new_files, target),
            (&old_spec, &old_files, from_version),
        ));
        match r {
            Ok(r) => {
                report.machine(
                    node,
                    &format!(
                        "runs Kubernetes {target} and is Ready ({:.0} s)",
                        r.took.as_secs_f64()
                    ),
                );
                results.push(r);
            }
            Err(e) => {
                outcome = Err(e);
                break;
            }
        }
    }
    let result = match outcome {
        Ok(()) => {
            record.spec.spec.kubernetes = new_spec.spec.kubernetes.clone();
            if let Some(k) = &mut record.kubernetes {
                k.version = target.to_string();
                k.checked_at = Timestamp::now();
            }
            record.kubernetes_upgrade = None;
            record.auto_upgrade.last_upgrade_finished = Some(Timestamp::now());
            guard.save(&mut record)?;
            Ok(KubeUpgradeOutcome::Done {
                from: before,
                to: target.to_string(),
                nodes: results,
            })
        }
        Err(e) => {
            if let Some(u) = &mut record.kubernetes_upgrade {
                u.stopped = Some(crate::error::error_chain(e.as_ref()));
            }
            guard.save(&mut record)?;
            let done = results.iter().filter(|r| r.upgraded).count();
            Err(e.context(format!(
                "the upgrade of cluster {name:?} to Kubernetes {target} stopped ({done} node(s) upgraded before); `clusterctl upgrade {name} --kubernetes-version {target}` tries again, `--kubernetes-version {from_version}` rolls every node back"
            )))
        }
    };
    lock(&journal).finish(result.is_ok())?;
    result
}

struct Run<'a> {
    store: &'a StateStore,
    guard: &'a ClusterGuard,
    journal: &'a Mutex<crate::state::Journal>,
    replay: &'a crate::state::Replay,
    request: &'a KubeUpgradeRequest,
    report: Reporter,
}

type Version<'a> = (&'a spec::Cluster, &'a Arc<Artifacts>, KubeVersion);

impl Run<'_> {
    /// One node: drain, install the new version, gate, uncordon; on a failed gate, the old
    /// version back.
    async fn node(
        &self,
        record: &mut ClusterRecord,
        node: &str,
        role: MachineRole,
        new: Version<'_>,
        old: Version<'_>,
    ) -> anyhow::Result<KubeNodeResult> {
        let started = Instant::now();
        let want = format!("v{}", new.2);
        // Whether the node was cordoned before decides whether it is uncordoned after: an API
        // that does not answer is an error, not "not cordoned".
        let before = node_state(self.store, record, node)
            .await
            .with_context(|| format!("reading node {node} before its upgrade"))?;
        let ours_before = cordoned_by_clusterctl(self.replay, node);
        let was_cordoned = before.as_ref().is_some_and(|n| n.unschedulable);
        let version_before = before
            .as_ref()
            .map_or_else(|| "unknown".to_owned(), |n| n.kubelet_version.clone());
        if before
            .as_ref()
            .is_some_and(|n| n.ready && n.kubelet_version == want)
        {
            // Done by an earlier, interrupted run: put it back in service.
            if was_cordoned && ours_before {
                self.uncordon(record, node).await?;
            }
            return Ok(KubeNodeResult {
                node: node.to_owned(),
                role,
                upgraded: false,
                versions: (version_before.clone(), version_before),
                took: started.elapsed(),
            });
        }
        {
            let api = cluster_api(self.store, record).await?;
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
        let ours = ours_before || !was_cordoned;
        let gate = async {
            self.install(record, node, new.0, new.1).await?;
            wait_for_version(self.store, record, node, &want, self.request.node_timeout).await
        }
        .await;
        match gate {
            Ok(()) => {
                if ours {
                    self.uncordon(record, node).await?;
                }
                Ok(KubeNodeResult {
                    node: node.to_owned(),
                    role,
                    upgraded: true,
                    versions: (version_before, want),
                    took: started.elapsed(),
                })
            }
            Err(failed) => {
                self.report.machine(
                    node,
                    &format!(
                        "failed on Kubernetes {} ({}); putting Kubernetes {} back",
                        new.2,
                        crate::error::error_chain(failed.as_ref()),
                        old.2
                    ),
                );
                let back = async {
                    self.install(record, node, old.0, old.1).await?;
                    wait_for_version(
                        self.store,
                        record,
                        node,
                        &format!("v{}", old.2),
                        self.request.node_timeout.max(Duration::from_secs(900)),
                    )
                    .await
                }
                .await;
                if back.is_ok() && ours {
                    self.uncordon(record, node).await?;
                }
                let rolled = match back {
                    Ok(()) => format!("it runs Kubernetes {} again and is Ready", old.2),
                    Err(e) => format!(
                        "Kubernetes {} was put back but the node is not Ready either ({}); it stays cordoned",
                        old.2,
                        crate::error::error_chain(e.as_ref())
                    ),
                };
                Err(failed.context(format!(
                    "node {node} did not come back healthy on Kubernetes {}: {rolled}",
                    new.2
                )))
            }
        }
    }

    /// The bootstrap on `node` alone with `spec`'s version and files, journaled.
    async fn install(
        &self,
        record: &mut ClusterRecord,
        node: &str,
        spec: &spec::Cluster,
        files: &Arc<Artifacts>,
    ) -> anyhow::Result<()> {
        self.report.machine(
            node,
            &format!(
                "installing Kubernetes {} and restarting its units",
                files.version
            ),
        );
        let op = lock(self.journal).intent(INSTALL, node)?;
        let only: BTreeSet<String> = [node.to_owned()].into();
        let r = super::create::bootstrap_nodes(
            self.store,
            self.guard,
            record,
            spec,
            files.clone(),
            only,
            crate::engine::Reporter::silent(),
        )
        .await;
        match r {
            Ok(_) => {
                lock(self.journal).done(&op)?;
                Ok(())
            }
            Err(e) => {
                lock(self.journal).failed(&op, &crate::error::error_chain(e.as_ref()))?;
                Err(e.context(format!("installing Kubernetes {} on {node}", files.version)))
            }
        }
    }

    async fn uncordon(&self, record: &ClusterRecord, node: &str) -> anyhow::Result<()> {
        super::drain::uncordon_node(self.store, record, self.journal, node, self.report).await
    }
}

/// Waits until `/readyz` is ok and `node` is Ready with its kubelet reporting `version`
/// (`v1.20.3`).
async fn wait_for_version(
    store: &StateStore,
    record: &ClusterRecord,
    node: &str,
    version: &str,
    timeout: Duration,
) -> anyhow::Result<()> {
    super::wait_for_node_where(
        store,
        record,
        node,
        &format!("Ready on kubelet {version}"),
        timeout,
        |n| n.ready && n.kubelet_version == version,
    )
    .await
    .map(|_| ())
}
