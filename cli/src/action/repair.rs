//! `clusterctl repair NAME`: one pass of observe, decide, act once, report.
//!
//! Observe: every machine the spec wants through the provider, every Node through the API
//! (`/readyz` first), and, for a node the first two do not already show healthy, its systemd
//! units over SSH (the units the node starts at boot, `/var/lib/clusterctl/boot-units`). Decide:
//! [`crate::engine::repair::decide`], pure. Act: at most one repair per pass, under the cluster
//! lock that `upgrade`, `reset`, `drain` and `create` take (one disruption budget: one node down
//! at a time), recorded in the record's repair history before it starts (`in-progress`, with
//! the steps done so far, so a killed pass is resumed by the next), and journaled.
//!
//! Replacing a worker: a node that still answers is drained (PodDisruptionBudgets honoured, up
//! to the drain timeout); its Node object is deleted (its pods are rescheduled at once instead
//! of after the 5-minute eviction timeout); the machine is deleted through the provider, data
//! disk included; then a new machine with a name of its own (`<cluster>-<pool>-<random>`, in the
//! old one's place in the pool; host key new) is made by `create`'s reconcile from the stored
//! spec and the pinned node image, bootstrapped, and the pass waits until its node is Ready.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context as _, anyhow, bail};
use serde::Serialize;

use super::{cluster_api, load_cluster, lock_cluster, open_action_journal, runtime, wait_for_node};
use crate::engine::repair::{
    self, CONTROL_PLANE_POOL, Decision, MachineSeen, NodeObservation, NodeSeen, Observations,
    PassPlan, Policy, SshSeen,
};
use crate::engine::{Reporter, access};
use crate::state::{
    ClusterRecord, ClusterStatus, RepairAction, RepairOutcome, RepairPass, RepairRecord,
    StateStore, Timestamp,
};
use providers::{MachineRole, MachineState};

/// Journal action of a repair (`repair-restart-units`, `repair-power-cycle`, `repair-replace`).
pub fn journal_action(a: RepairAction) -> String {
    format!("repair-{a}")
}

/// How long the API may take to list nodes in a pass.
const API_TIMEOUT: Duration = Duration::from_secs(20);
/// How long SSH may take to answer a probe.
const SSH_PROBE_TIMEOUT: Duration = Duration::from_secs(10);
/// Where a node lists the units it starts at boot (written by the bootstrap).
const BOOT_UNITS: &str = "/var/lib/clusterctl/boot-units";

/// How `repair` runs.
#[derive(Debug, Clone, Copy)]
pub struct RepairOptions {
    /// Decide and report only.
    pub dry_run: bool,
    /// Started by a schedule: a cluster with `autoRepair.enabled: false` is skipped.
    pub scheduled: bool,
    /// Wait for the cluster lock instead of failing with "locked".
    pub wait_lock: bool,
    /// How long a repaired node may take to be Ready.
    pub node_timeout: Duration,
    /// How long a replaced machine may take to answer SSH.
    pub ssh_timeout: Duration,
    /// How long a node being replaced may take to drain.
    pub drain_timeout: Duration,
}

impl Default for RepairOptions {
    fn default() -> Self {
        RepairOptions {
            dry_run: false,
            scheduled: false,
            wait_lock: false,
            node_timeout: Duration::from_secs(900),
            ssh_timeout: Duration::from_secs(900),
            drain_timeout: Duration::from_secs(600),
        }
    }
}

/// What one pass saw, decided and did.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PassReport {
    /// The cluster.
    pub cluster: String,
    /// When the pass observed.
    pub at: Timestamp,
    /// Why the cluster was not looked at (disabled, not running).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub skipped: Option<String>,
    /// Whether the pass only decided (`--dry-run`).
    pub dry_run: bool,
    /// The API's error, if it did not answer.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub api_error: Option<String>,
    /// The decisions.
    #[serde(skip_serializing_if = "Option::is_none", flatten)]
    pub plan: Option<PassPlan>,
    /// The repair made, with its outcome.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub repaired: Option<RepairRecord>,
    /// Wall time of the pass in milliseconds.
    pub took_ms: u64,
}

/// Runs one pass on cluster `name`.
pub fn repair(
    store: &StateStore,
    name: &str,
    opts: &RepairOptions,
    report: Reporter,
) -> anyhow::Result<PassReport> {
    let started = Instant::now();
    let record = load_cluster(store, name)?;
    let mut out = PassReport {
        cluster: name.to_owned(),
        at: Timestamp::now(),
        skipped: None,
        dry_run: opts.dry_run,
        api_error: None,
        plan: None,
        repaired: None,
        took_ms: 0,
    };
    if opts.scheduled && !record.spec.spec.auto_repair.enabled {
        out.skipped = Some(format!(
            "autoRepair.enabled is false for cluster {name:?}; `clusterctl autorepair enable {name}` turns it on"
        ));
        return Ok(out);
    }
    // The lock first: a pass never overlaps another command (a second pass exits "locked").
    let guard = if opts.dry_run {
        None
    } else {
        Some(lock_cluster(store, name, opts.wait_lock, report)?)
    };
    // Under the lock, the record as the last writer left it.
    let mut record = match &guard {
        Some(g) => g
            .load()?
            .ok_or_else(|| anyhow!("cluster {name:?} vanished"))?,
        None => record,
    };
    if !matches!(
        record.status,
        ClusterStatus::Running | ClusterStatus::Reconciling
    ) {
        out.skipped = Some(format!(
            "cluster {name:?} is {}, not running: `clusterctl create` finishes it first",
            record.status
        ));
        return Ok(out);
    }
    let rt = runtime()?;
    let provider: Arc<dyn providers::Provider> =
        Arc::from(crate::provider::provider_for(&record.spec)?);
    let obs = rt.block_on(observe(store, &record, provider.clone()))?;
    out.at = Timestamp::now();
    out.api_error = obs.api_error.clone();
    let policy = Policy::from_spec(
        &record.spec.spec.auto_repair,
        &record.spec.spec.maintenance_policy,
    );
    let plan = repair::decide(&policy, &obs, &record.repair, out.at);
    let Some(guard) = guard else {
        out.plan = Some(plan);
        out.took_ms = elapsed_ms(started);
        return Ok(out);
    };
    // An interrupted repair whose node is healthy now was finished by its run.
    if let Some(i) = record.repair.in_progress()
        && plan
            .nodes
            .iter()
            .any(|v| record.repair.history[i].is_for(&v.name) && v.healthy)
    {
        let r = &mut record.repair.history[i];
        r.outcome = RepairOutcome::Succeeded;
        r.finished_at = Some(out.at);
        r.detail =
            Some("the node was healthy when the next pass looked (its run was interrupted)".into());
    }
    record.repair.unhealthy_since = plan.unhealthy_since.clone();
    let mut pass = RepairPass {
        at: out.at,
        scheduled: opts.scheduled,
        healthy: u32::try_from(plan.nodes.iter().filter(|v| v.healthy).count()).unwrap_or(0),
        nodes: u32::try_from(plan.nodes.len()).unwrap_or(0),
        repaired: None,
        // The pass-wide brake, else the first node a brake holds or that is left alone.
        held: plan.held.clone().or_else(|| {
            plan.nodes.iter().find_map(|v| match &v.decision {
                Decision::Held { why } | Decision::LeftAlone { why } if plan.chosen.is_none() => {
                    Some(format!("{}: {why}", v.name))
                }
                _ => None,
            })
        }),
        error: None,
    };
    record.repair.last_pass = Some(pass.clone());
    guard.save(&mut record)?;
    let Some(chosen) = plan.repair().cloned() else {
        out.plan = Some(plan);
        out.took_ms = elapsed_ms(started);
        return Ok(out);
    };
    let Decision::Repair {
        action,
        units,
        resume,
    } = chosen.decision.clone()
    else {
        bail!("internal error: the chosen node has no repair");
    };
    let (mut journal, replay) = open_action_journal(&guard, report)?;
    let idx = if resume {
        match record.repair.in_progress() {
            Some(i) => i,
            None => bail!("internal error: a resumed repair without its record"),
        }
    } else {
        let reason = chosen
            .problems
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join("; ");
        record.repair.push(RepairRecord {
            node: chosen.name.clone(),
            pool: chosen.pool.clone(),
            action,
            units: units.clone(),
            reason,
            started_at: out.at,
            finished_at: None,
            outcome: RepairOutcome::InProgress,
            detail: None,
            steps_done: Vec::new(),
            replaced_by: None,
            ready_after_secs: None,
            healed_after_secs: None,
        })
    };
    guard.save(&mut record)?;
    // A resumed replacement is still the repair of the node it started on (the chosen name may
    // be its replacement's).
    let target = record.repair.history[idx].node.clone();
    report.phase(&format!(
        "{} {} {} ({})",
        if resume { "Resuming" } else { "Repairing" },
        target,
        action,
        record.repair.history[idx].reason
    ));
    let op = journal.intent(&journal_action(action), &target)?;
    let journal = Arc::new(Mutex::new(journal));
    let act_started = Instant::now();
    let ctx = Ctx {
        rt: &rt,
        store,
        guard: &guard,
        provider,
        journal: &journal,
        replay: &replay,
        opts,
        report,
        machine_running: obs
            .nodes
            .iter()
            .any(|o| o.name == chosen.name && o.machine == MachineSeen::Running),
    };
    let result = act(&ctx, &mut record, idx);
    let done_at = Timestamp::now();
    let healed = chosen
        .unhealthy_since
        .map(|s| u64::try_from(done_at.unix_seconds() - s.unix_seconds()).unwrap_or(0));
    {
        let r = &mut record.repair.history[idx];
        r.finished_at = Some(done_at);
        match &result {
            Ok(ready_after) => {
                r.outcome = RepairOutcome::Succeeded;
                r.ready_after_secs = Some(ready_after.as_secs());
                r.healed_after_secs = healed;
                r.detail = Some(format!(
                    "Ready {} s after the repair started ({} s in this run)",
                    ready_after.as_secs(),
                    act_started.elapsed().as_secs()
                ));
            }
            Err(e) => {
                r.outcome = RepairOutcome::Failed;
                r.detail = Some(crate::error::error_chain(e.as_ref()));
            }
        }
    }
    pass.repaired = Some(format!("{action} {target}"));
    pass.error = result
        .as_ref()
        .err()
        .map(|e| crate::error::error_chain(e.as_ref()));
    record.repair.last_pass = Some(pass);
    guard.save(&mut record)?;
    {
        let mut j = journal.lock().unwrap_or_else(|p| p.into_inner());
        match &result {
            Ok(_) => j.done(&op)?,
            Err(e) => j.failed(&op, &crate::error::error_chain(e.as_ref()))?,
        }
        j.finish(result.is_ok())?;
    }
    out.repaired = Some(record.repair.history[idx].clone());
    out.plan = Some(plan);
    out.took_ms = elapsed_ms(started);
    result.map(|_| out).with_context(|| {
        format!(
            "repairing node {target} of cluster {name:?} ({action}); the next pass backs off, then tries the next step"
        )
    })
}

fn elapsed_ms(since: Instant) -> u64 {
    u64::try_from(since.elapsed().as_millis()).unwrap_or(u64::MAX)
}

/// Observes every node the spec wants.
async fn observe(
    store: &StateStore,
    record: &ClusterRecord,
    provider: Arc<dyn providers::Provider>,
) -> anyhow::Result<Observations> {
    let cluster = record.cluster_ref();
    let p = provider.clone();
    let listed = tokio::task::spawn_blocking(move || p.list_machines(&cluster));
    let api = async {
        let api = cluster_api(store, record).await?;
        let r = tokio::time::timeout(API_TIMEOUT, async {
            api.readyz().await?;
            api.list_nodes().await
        })
        .await;
        api.close().await;
        Ok::<_, anyhow::Error>(
            r.map_err(|_| anyhow!("the API did not answer within {} s", API_TIMEOUT.as_secs()))??,
        )
    };
    let (listed, nodes) = tokio::join!(listed, api);
    let machines = listed
        .context("the provider call panicked")?
        .with_context(|| format!("listing the machines of cluster {:?}", record.name))?;
    let (nodes, api_error) = match nodes {
        Ok(n) => (n, None),
        Err(e) => (Vec::new(), Some(crate::error::error_chain(e.as_ref()))),
    };
    // A cluster from before random names has no pool members in its record yet: its machines
    // are adopted here as `create` and a repair adopt them (nothing is saved by observing).
    let mut adopted = record.clone();
    super::assign_machine_names(&mut adopted, &record.spec, Reporter::silent());
    let desired = crate::engine::desired_machines(&record.spec, &adopted.pool_members)?;
    let mut out = Vec::new();
    let mut probes = tokio::task::JoinSet::new();
    let identity =
        access::client_identity(&record.spec.spec.ssh, store, &record.name, None).await?;
    for d in &desired {
        let m = machines.iter().find(|m| m.name == d.name);
        let machine = match m.map(|m| m.state) {
            None => MachineSeen::Missing,
            Some(MachineState::Running | MachineState::Pending | MachineState::Unknown) => {
                MachineSeen::Running
            }
            Some(MachineState::Stopped) => MachineSeen::Stopped,
            Some(MachineState::Failed) => MachineSeen::Failed,
        };
        let node = nodes.iter().find(|n| n.name == d.name).map(|n| NodeSeen {
            ready: n.conditions.ready_status.clone(),
            ready_since: n.conditions.ready_since,
            disk_pressure_since: n.conditions.disk_pressure_since,
        });
        let looks_healthy = api_error.is_none()
            && node
                .as_ref()
                .is_some_and(|n| n.ready == "True" && n.disk_pressure_since.is_none());
        if machine == MachineSeen::Running
            && !looks_healthy
            && let Some(m) = m
        {
            let i = out.len();
            let pin = super::pinned_endpoint(record, m);
            let identity = identity.clone();
            probes.spawn(async move { (i, probe_units(pin, identity).await) });
        }
        out.push(NodeObservation {
            name: d.name.clone(),
            pool: match d.role {
                MachineRole::ControlPlane => CONTROL_PLANE_POOL.to_owned(),
                MachineRole::Worker => d.pool.clone().unwrap_or_default(),
            },
            control_plane: d.role == MachineRole::ControlPlane,
            machine,
            node,
            ssh: SshSeen::NotProbed,
        });
    }
    while let Some(r) = probes.join_next().await {
        if let Ok((i, seen)) = r {
            out[i].ssh = seen;
        }
    }
    Ok(Observations {
        nodes: out,
        api_error,
        upgrade: record
            .upgrade
            .as_ref()
            .map(|u| format!("node image {} -> {}", u.from.version, u.to.version))
            .or_else(|| {
                // A Kubernetes upgrade: repair's reconcile would install the stored (old)
                // version on every node at once.
                record
                    .kubernetes_upgrade
                    .as_ref()
                    .map(|u| format!("Kubernetes {} -> {}", u.from, u.to))
            }),
    })
}

/// Logs in to a node and lists its boot units that are not active.
async fn probe_units(
    pin: anyhow::Result<(crate::ssh::Endpoint, String)>,
    identity: access::ClientIdentity,
) -> SshSeen {
    let unreachable = |e: String| SshSeen::Unreachable { error: e };
    let pin = match pin {
        Ok(p) => p,
        Err(e) => return unreachable(crate::error::error_chain(e.as_ref())),
    };
    let at = format!("{}:{}", pin.0.host, pin.0.port);
    let script = format!(
        "for u in $(cat {BOOT_UNITS} 2>/dev/null); do printf '%s %s\\n' \"$u\" \"$(systemctl is-active \"$u\")\"; done"
    );
    let r = tokio::time::timeout(
        SSH_PROBE_TIMEOUT,
        super::run_pinned(&identity, pin, Duration::from_secs(3), &script),
    )
    .await;
    match r {
        Err(_) => unreachable(format!(
            "no answer from {at} within {} s",
            SSH_PROBE_TIMEOUT.as_secs()
        )),
        Ok(Err(e)) => unreachable(crate::error::error_chain(e.as_ref())),
        Ok(Ok(out)) => SshSeen::Reached {
            down: parse_units(&out.stdout_text()),
        },
    }
}

/// The units of `unit state` lines whose state is not `active`. Pure.
pub fn parse_units(text: &str) -> Vec<String> {
    text.lines()
        .filter_map(|l| {
            let (unit, state) = l.trim().split_once(' ')?;
            (state.trim() != "active" && !unit.is_empty()).then(|| unit.to_owned())
        })
        .collect()
}

/// What a repair works with.
struct Ctx<'a> {
    rt: &'a tokio::runtime::Runtime,
    store: &'a StateStore,
    guard: &'a crate::state::ClusterGuard,
    provider: Arc<dyn providers::Provider>,
    journal: &'a Arc<Mutex<crate::state::Journal>>,
    replay: &'a crate::state::Replay,
    opts: &'a RepairOptions,
    report: Reporter,
    /// Whether this pass saw the node's machine running.
    machine_running: bool,
}

/// Makes the repair at `record.repair.history[idx]`; returns how long the node took to be
/// Ready from the start of the repair.
fn act(c: &Ctx<'_>, record: &mut ClusterRecord, idx: usize) -> anyhow::Result<Duration> {
    let Ctx {
        rt,
        store,
        opts,
        report,
        ..
    } = *c;
    let provider = c.provider.clone();
    let r = record.repair.history[idx].clone();
    let node = r.node.as_str();
    let started = r.started_at;
    let since_start = || {
        Duration::from_secs(
            u64::try_from(Timestamp::now().unix_seconds() - started.unix_seconds()).unwrap_or(0),
        )
    };
    match r.action {
        RepairAction::RestartUnits => {
            let units = if r.units.is_empty() {
                vec![
                    "containerd.service".to_owned(),
                    "kubelet.service".to_owned(),
                ]
            } else {
                r.units.clone()
            };
            let machine = record
                .machines
                .iter()
                .find(|m| m.name == node)
                .cloned()
                .ok_or_else(|| anyhow!("machine {node} is not in the cluster's record"))?;
            let pin = super::pinned_endpoint(record, &machine)?;
            report.machine(node, &format!("restarting {}", units.join(" ")));
            rt.block_on(async {
                let identity =
                    access::client_identity(&record.spec.spec.ssh, store, &record.name, None)
                        .await?;
                let quoted: Vec<String> =
                    units.iter().map(|u| crate::ssh::shell_quote(u)).collect();
                let command = format!("sudo -n systemctl restart {}", quoted.join(" "));
                let out =
                    super::run_pinned(&identity, pin, Duration::from_secs(30), &command).await?;
                if !out.success() {
                    bail!(
                        "systemctl restart {} failed: {}",
                        units.join(" "),
                        out.stderr_text().trim()
                    );
                }
                wait_for_node(store, record, node, None, opts.node_timeout).await?;
                Ok(())
            })?;
            Ok(since_start())
        }
        RepairAction::PowerCycle => {
            let before = rt
                .block_on(super::node_state(store, record, node))
                .ok()
                .flatten()
                .map(|n| n.boot_id);
            report.machine(node, "power-cycling through the provider");
            let cluster = record.cluster_ref();
            let name = node.to_owned();
            let p = provider.clone();
            rt.block_on(rt.spawn_blocking(move || p.reset_machine(&cluster, &name)))
                .context("the provider call panicked")?
                .with_context(|| format!("power-cycling machine {node}"))?;
            report.machine(node, "reset; waiting for it to boot and be Ready");
            rt.block_on(wait_for_node(
                store,
                record,
                node,
                before.as_deref().filter(|b| !b.is_empty()),
                opts.node_timeout,
            ))?;
            Ok(since_start())
        }
        RepairAction::Replace => {
            replace(c, record, idx)?;
            Ok(since_start())
        }
    }
}

const NODE_DELETED: &str = "node-deleted";
const MACHINE_DELETED: &str = "machine-deleted";

fn replace(c: &Ctx<'_>, record: &mut ClusterRecord, idx: usize) -> anyhow::Result<()> {
    let Ctx {
        rt,
        store,
        guard,
        journal,
        replay,
        opts,
        report,
        ..
    } = *c;
    let provider = c.provider.clone();
    let node = record.repair.history[idx].node.clone();
    let is_cp = record.repair.history[idx].pool == CONTROL_PLANE_POOL;
    if is_cp {
        bail!("a control plane is never replaced (its etcd data is on its data disk)");
    }
    let step_done = |record: &ClusterRecord, s: &str| {
        record.repair.history[idx].steps_done.iter().any(|d| d == s)
    };
    if !step_done(record, NODE_DELETED) {
        // Only a machine that still runs can give its pods back: a gone one is not drained
        // (evictions would wait for a kubelet that is not there).
        let running = c.machine_running;
        rt.block_on(async {
            let api = cluster_api(store, record).await?;
            let result = async {
                let nodes = api.list_nodes().await?;
                if let Some(n) = nodes.iter().find(|n| n.name == node) {
                    // A node that still runs (DiskPressure, never Ready) is drained first.
                    if running && n.conditions.ready_status == "True" {
                        let ours = super::drain::cordoned_by_clusterctl(replay, &node);
                        let options = crate::kube::drainer::DrainOptions {
                            timeout: opts.drain_timeout,
                            ..Default::default()
                        };
                        super::drain::cordon_and_drain(
                            &api,
                            journal,
                            &node,
                            n.unschedulable,
                            ours,
                            &options,
                            report,
                        )
                        .await?;
                    }
                    api.delete_node(&node).await?;
                    report.machine(&node, "Node object deleted (its pods are rescheduled now)");
                }
                Ok::<_, anyhow::Error>(())
            }
            .await;
            api.close().await;
            result
        })
        .with_context(|| format!("removing node {node} before its machine is replaced"))?;
        record.repair.history[idx]
            .steps_done
            .push(NODE_DELETED.into());
        guard.save(record)?;
    }
    if !step_done(record, MACHINE_DELETED) {
        report.machine(&node, "deleting the machine (boot and data disks)");
        let cluster = record.cluster_ref();
        let name = node.clone();
        let p = provider.clone();
        rt.block_on(rt.spawn_blocking(move || p.delete_machine(&cluster, &name)))
            .context("the provider call panicked")?
            .with_context(|| format!("deleting machine {node}"))?;
        record.repair.history[idx]
            .steps_done
            .push(MACHINE_DELETED.into());
        guard.save(record)?;
    }
    let spec = record.spec.clone();
    // The new machine gets a name of its own (never the old one's: its Node, host key and
    // journal records belong to the old machine), in the old one's place in its pool.
    let new_name = match record.repair.history[idx].replaced_by.clone() {
        Some(n) => n,
        None => {
            super::assign_machine_names(record, &spec, report);
            let pool = record.repair.history[idx].pool.clone();
            let fresh = super::new_pool_machine_name(record, &pool)?;
            let Some(slot) = record
                .pool_members
                .get_mut(&pool)
                .and_then(|l| l.iter_mut().find(|n| **n == node))
            else {
                bail!(
                    "node {node} is not a machine of node pool {pool} in the cluster record; run `clusterctl create -f` with the cluster's file to reconcile it"
                );
            };
            *slot = fresh.clone();
            crate::engine::names::retire(&mut record.retired_machine_names, [node.clone()]);
            record.repair.history[idx].replaced_by = Some(fresh.clone());
            guard.save(record)?;
            fresh
        }
    };
    report.machine(
        &new_name,
        &format!("creating the machine that replaces {node}, from the spec and the pinned image"),
    );
    let image = crate::provider::node_image(
        &spec,
        record.node_image.as_ref(),
        &nodeimage::default_image_dir(),
    )?;
    let artifacts = super::create::verify_artifacts(
        rt,
        &spec,
        std::path::Path::new("the cluster's stored spec"),
        report,
    )?;
    let create_opts = super::create::CreateOptions {
        wait_lock: false,
        ssh_timeout: opts.ssh_timeout,
        drain_timeout: opts.drain_timeout,
    };
    super::create::reconcile(
        rt,
        store,
        guard,
        record,
        spec,
        image,
        artifacts,
        journal,
        replay,
        create_opts,
        report,
    )
    .with_context(|| format!("creating machine {new_name} in place of {node}"))?;
    guard.save(record)?;
    rt.block_on(wait_for_node(
        store,
        record,
        &new_name,
        None,
        opts.node_timeout,
    ))?;
    Ok(())
}

/// One pass over every cluster in the state directory, as a schedule runs it: clusters with
/// `autoRepair.enabled: false` are skipped. Returns each cluster's report or error.
pub fn repair_all(
    store: &StateStore,
    opts: &RepairOptions,
    report: Reporter,
) -> anyhow::Result<Vec<(String, anyhow::Result<PassReport>)>> {
    let mut out = Vec::new();
    for name in store.names()? {
        let r = repair(store, &name, opts, report);
        out.push((name, r));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn units_not_active_are_the_ones_reported() {
        let text = "containerd.service active\nkubelet.service inactive\nkube-proxy.service activating\n\ngarbage\n";
        assert_eq!(
            parse_units(text),
            vec![
                "kubelet.service".to_owned(),
                "kube-proxy.service".to_owned()
            ]
        );
        assert!(parse_units("").is_empty());
    }
}
