//! Execution: a runner of phases, and the phases that provision and delete machines.
//!
//! A phase has a title, a `should_run` check against what is observed now, and a `run`. The runner
//! prints one line per phase (`==> Creating machines`), skips phases with nothing to do, and stops
//! at the first failure. Every side effect goes through [`Env::call`], which writes the journal
//! intent before the provider call and the outcome after it, and runs the (blocking) provider call
//! on tokio's blocking pool with bounded concurrency. Because steps are idempotent and each run
//! re-observes before planning, re-running a command that stopped, or was killed, resumes it.

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use providers::{ClusterRef, ImageRef, MachineSpec, Provider, ProviderError};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;

use super::plan::{self, DesiredMachine, Inventory, Plan, PlanError, Step};
use super::report::Reporter;
use crate::spec;
use crate::state::{InFlight, Journal, StateError};

/// A boxed future, the return type of [`Phase::run`].
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Errors of plan execution.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// A provider call failed.
    #[error("{action} {target:?}")]
    Provider {
        /// What was being done, e.g. `ensuring machine`.
        action: String,
        /// What it was done to.
        target: String,
        /// The provider's error.
        #[source]
        source: ProviderError,
    },
    /// Several operations of one phase failed; the first is the source.
    #[error("{failed} of {attempted} operations failed; the first")]
    Several {
        /// How many failed.
        failed: usize,
        /// How many were attempted.
        attempted: usize,
        /// The first failure.
        #[source]
        first: Box<EngineError>,
    },
    /// Writing the journal failed, so the side effect was not attempted or its outcome is not
    /// recorded.
    #[error("recording the operation in the journal")]
    Journal(#[source] StateError),
    /// The spec cannot be planned.
    #[error("planning")]
    Plan(#[source] PlanError),
    /// A provider call could not be run to completion (the task panicked or was cancelled).
    #[error("a provider call did not complete: {0}")]
    Task(String),
    /// After a phase the provider does not show what the phase should have produced.
    #[error("the provider does not show the expected result: {0}")]
    Verify(String),
    /// A machine's first-boot configuration could not be made.
    #[error("preparing machine {machine:?}: {detail}")]
    Template {
        /// The machine.
        machine: String,
        /// Why.
        detail: String,
    },
    /// A machine did not answer SSH with its pinned host key.
    #[error("machine {machine:?} did not answer ssh: {detail}")]
    Ssh {
        /// The machine.
        machine: String,
        /// Why (the SSH error chain).
        detail: String,
    },
    /// A step on one node failed (bootstrap over SSH).
    #[error("node {machine:?}: {step}: {detail}")]
    Node {
        /// The machine.
        machine: String,
        /// What was being done, e.g. `uploading kubelet`.
        step: String,
        /// Why (the error chain, or the command's output).
        detail: String,
    },
    /// Taking a Kubernetes node out before its machine is deleted failed (drain), or removing
    /// its Node object after.
    #[error("{action} node {node:?}")]
    NodeRemoval {
        /// `draining` or `removing the Node object of`.
        action: &'static str,
        /// The node.
        node: String,
        /// Why.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// The spec asks for a change that would break the running cluster.
    #[error("{0}")]
    Refused(String),
    /// The cluster cannot be bootstrapped as specified (artifacts, certificates, templates).
    #[error("{0}")]
    Bootstrap(String),
    /// A phase failed.
    #[error("{title}")]
    Phase {
        /// The phase title.
        title: String,
        /// Why.
        #[source]
        source: Box<EngineError>,
    },
}

/// What every phase works with: the cluster, its provider, its journal.
pub struct Env {
    /// The cluster's identity.
    pub cluster: ClusterRef,
    /// The provider.
    pub provider: Arc<dyn Provider>,
    /// The cluster's journal, opened by this run (under the cluster lock).
    pub journal: Arc<Mutex<Journal>>,
    /// Most provider calls in flight at once.
    pub concurrency: usize,
    /// Progress output.
    pub report: Reporter,
}

impl Env {
    /// Performs one side effect: writes the intent to the journal, runs `f` with the provider on
    /// the blocking pool, and writes the outcome.
    pub async fn call<T, F>(
        &self,
        action: &'static str,
        target: &str,
        f: F,
    ) -> Result<T, EngineError>
    where
        T: Send + 'static,
        F: FnOnce(&dyn Provider) -> Result<T, ProviderError> + Send + 'static,
    {
        let provider = self.provider.clone();
        let journal = self.journal.clone();
        let target_owned = target.to_owned();
        let task = tokio::task::spawn_blocking(move || {
            journaled(&journal, &*provider, action, &target_owned, f)
        });
        task.await.map_err(|e| EngineError::Task(e.to_string()))?
    }

    /// Lists the cluster's machines (not a side effect: no journal records).
    pub async fn list_machines(&self) -> Result<Inventory, EngineError> {
        let provider = self.provider.clone();
        let cluster = self.cluster.clone();
        let mut list = tokio::task::spawn_blocking(move || provider.list_machines(&cluster))
            .await
            .map_err(|e| EngineError::Task(e.to_string()))?
            .map_err(|source| EngineError::Provider {
                action: "listing machines of cluster".into(),
                target: self.cluster.name.clone(),
                source,
            })?;
        list.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(list)
    }

    fn journal(&self) -> std::sync::MutexGuard<'_, Journal> {
        lock_journal(&self.journal)
    }
}

fn lock_journal(j: &Mutex<Journal>) -> std::sync::MutexGuard<'_, Journal> {
    // A panic while holding the lock cannot leave a half-written record behind (each append is
    // one write), so the journal stays usable.
    j.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn journaled<T>(
    journal: &Mutex<Journal>,
    provider: &dyn Provider,
    action: &'static str,
    target: &str,
    f: impl FnOnce(&dyn Provider) -> Result<T, ProviderError>,
) -> Result<T, EngineError> {
    let op = lock_journal(journal)
        .intent(action, target)
        .map_err(EngineError::Journal)?;
    match f(provider) {
        Ok(v) => {
            lock_journal(journal)
                .done(&op)
                .map_err(EngineError::Journal)?;
            Ok(v)
        }
        Err(source) => {
            let err = EngineError::Provider {
                action: describe(action),
                target: target.to_owned(),
                source,
            };
            let text = error_chain(&err);
            // The provider error is what matters; a journal failure on top is only logged.
            if let Err(e) = lock_journal(journal).failed(&op, &text) {
                tracing::error!("cannot record failure of {action} {target} in the journal: {e}");
            }
            Err(err)
        }
    }
}

/// A journal action in words for error messages: `ensure-machine` -> `ensuring machine`.
fn describe(action: &str) -> String {
    match action.split_once('-') {
        Some((verb, rest)) => {
            let stem = verb.strip_suffix('e').unwrap_or(verb);
            format!("{stem}ing {}", rest.replace('-', " "))
        }
        None => action.to_owned(),
    }
}

pub use crate::error::error_chain;

/// A step of execution with a title, a check whether it still needs to run, and the run.
pub trait Phase<C>: Send + Sync {
    /// Title printed as `==> <title>`, in the -ing form.
    fn title(&self) -> String;
    /// Whether the phase has work to do given what `ctx` observed so far.
    fn should_run(&self, ctx: &C) -> bool;
    /// Does the work. Must be idempotent: running it twice gives the same result.
    fn run<'a>(&'a self, ctx: &'a mut C) -> BoxFuture<'a, Result<(), EngineError>>;
}

/// Runs `phases` in order, skipping those that have nothing to do; stops at the first failure.
pub async fn run_phases<C: Send>(
    ctx: &mut C,
    report: Reporter,
    phases: &[Box<dyn Phase<C>>],
) -> Result<(), EngineError> {
    for phase in phases {
        let title = phase.title();
        if !phase.should_run(ctx) {
            tracing::debug!(phase = %title, "nothing to do");
            continue;
        }
        report.phase(&title);
        let started = std::time::Instant::now();
        phase.run(ctx).await.map_err(|e| EngineError::Phase {
            title: title.clone(),
            source: Box::new(e),
        })?;
        let took = started.elapsed();
        tracing::info!(phase = %title, seconds = took.as_secs_f64(), "phase done");
        report.note(&format!("done in {:.1} s", took.as_secs_f64()));
    }
    Ok(())
}

/// Renders a machine's first-boot user data, or says why it cannot.
pub type UserDataFn = Arc<dyn Fn(&DesiredMachine) -> Result<String, String> + Send + Sync>;

/// How machines are made from planned ones: the image to boot and their first-boot data.
#[derive(Clone)]
pub struct MachineTemplate {
    /// Node image to boot.
    pub image: ImageRef,
    /// Renders the first-boot user data of a machine (an error says why it cannot).
    pub user_data: UserDataFn,
    /// Extra labels for every machine (the cluster's `metadata.labels`).
    pub labels: BTreeMap<String, String>,
}

impl MachineTemplate {
    /// The provider request for a planned machine.
    pub fn machine_spec(&self, m: &DesiredMachine) -> Result<MachineSpec, EngineError> {
        let user_data = (self.user_data)(m).map_err(|detail| EngineError::Template {
            machine: m.name.clone(),
            detail,
        })?;
        Ok(MachineSpec {
            name: m.name.clone(),
            role: m.role,
            pool: m.pool.clone(),
            size: m.size.clone(),
            image: self.image.clone(),
            user_data,
            labels: self.labels.clone(),
            failure_domain: None,
        })
    }
}

impl std::fmt::Debug for MachineTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MachineTemplate")
            .field("image", &self.image)
            .field("labels", &self.labels)
            .finish_non_exhaustive()
    }
}

/// What deleting a machine that is a Kubernetes node needs: drained first (cordon, evictions
/// honouring PodDisruptionBudgets), its Node object removed after. Given by the caller when the
/// cluster runs Kubernetes (`action` builds it on the API client); without it machines are
/// deleted as machines only.
pub trait NodeRemoval: Send + Sync {
    /// Cordons and drains `node`; returns a summary line.
    fn drain<'a>(
        &'a self,
        node: &'a str,
    ) -> BoxFuture<'a, Result<String, Box<dyn std::error::Error + Send + Sync>>>;
    /// Removes the Node object of `node` (gone already is fine).
    fn forget<'a>(
        &'a self,
        node: &'a str,
    ) -> BoxFuture<'a, Result<(), Box<dyn std::error::Error + Send + Sync>>>;
    /// The names of the Nodes registered in one of the cluster's node pools (clusterctl's
    /// workers, by their pool label).
    fn pool_nodes(
        &self,
    ) -> BoxFuture<'_, Result<Vec<String>, Box<dyn std::error::Error + Send + Sync>>>;
}

/// State of `clusterctl create` (and later commands that converge machines to the spec).
pub struct ApplyContext {
    /// Cluster, provider, journal.
    pub env: Env,
    /// The desired spec.
    pub desired: spec::Cluster,
    /// How to make machines.
    pub template: MachineTemplate,
    /// Operations an earlier run left in flight (from the journal).
    pub interrupted: Vec<InFlight>,
    /// Machines as last observed.
    pub observed: Inventory,
    /// The current plan (set by the observe phase).
    pub plan: Option<Plan>,
    /// SSH access to wait for after the machines run; `None` skips the wait (fake provider).
    pub ssh: Option<super::access::SshAccess>,
    /// Time from the start of the SSH wait until each machine answered (set by the wait).
    pub ssh_ready: BTreeMap<String, std::time::Duration>,
    /// Drain and Node removal for machines that are nodes of a running cluster (`None`: the
    /// cluster runs no Kubernetes yet).
    pub nodes: Option<Arc<dyn NodeRemoval>>,
    /// Pool Nodes whose machine is gone and not wanted (set by the observe phase): an earlier
    /// run was stopped between deleting the machine and removing its Node object.
    pub stale_nodes: Vec<String>,
    /// The names of each node pool's machines (from the cluster record).
    pub members: super::names::PoolMembers,
}

/// The phases of `clusterctl create` as far as this build goes: machines only.
pub fn provision_phases() -> Vec<Box<dyn Phase<ApplyContext>>> {
    vec![
        Box::new(RecoverInterrupted),
        Box::new(ObserveAndPlan),
        Box::new(EnsureMachines),
        Box::new(DeleteUnwanted),
        Box::new(VerifyMachines),
        Box::new(super::access::WaitForSsh),
    ]
}

/// Records operations an earlier, killed run left in flight. Their targets are re-checked by
/// observing and planning afresh.
pub struct RecoverInterrupted;

impl Phase<ApplyContext> for RecoverInterrupted {
    fn title(&self) -> String {
        "Recovering operations interrupted in an earlier run".into()
    }
    fn should_run(&self, ctx: &ApplyContext) -> bool {
        !ctx.interrupted.is_empty()
    }
    fn run<'a>(&'a self, ctx: &'a mut ApplyContext) -> BoxFuture<'a, Result<(), EngineError>> {
        Box::pin(async move { record_interrupted(&ctx.env, &ctx.interrupted) })
    }
}

/// Writes an `interrupted` journal record for each operation and says so.
pub fn record_interrupted(env: &Env, found: &[InFlight]) -> Result<(), EngineError> {
    let mut j = env.journal();
    for f in found {
        env.report.machine(
            &f.target,
            &format!(
                "{} was interrupted (run {} at {}); re-checking",
                f.action, f.run, f.at
            ),
        );
        j.interrupted(f).map_err(EngineError::Journal)?;
    }
    Ok(())
}

/// Lists the cluster's machines and plans against them.
pub struct ObserveAndPlan;

impl Phase<ApplyContext> for ObserveAndPlan {
    fn title(&self) -> String {
        "Observing machines".into()
    }
    fn should_run(&self, _: &ApplyContext) -> bool {
        true
    }
    fn run<'a>(&'a self, ctx: &'a mut ApplyContext) -> BoxFuture<'a, Result<(), EngineError>> {
        Box::pin(async move {
            ctx.observed = ctx.env.list_machines().await?;
            let plan =
                plan::plan(&ctx.desired, &ctx.members, &ctx.observed).map_err(EngineError::Plan)?;
            let ensure = plan.ensure_steps().count();
            let delete = plan.delete_steps().count();
            ctx.env.report.note(&format!(
                "{} machine(s) exist, {} to create or start, {} to delete, {} unchanged",
                ctx.observed.len(),
                ensure,
                delete,
                plan.unchanged.len()
            ));
            ctx.plan = Some(plan);
            if let Some(nodes) = ctx.nodes.clone() {
                // Not being able to look is no reason to stop converging the machines; the
                // next run looks again.
                match nodes.pool_nodes().await {
                    Ok(registered) => {
                        ctx.stale_nodes = stale_nodes(&plan_names(&ctx.plan), &ctx.observed, registered);
                        if !ctx.stale_nodes.is_empty() {
                            ctx.env.report.note(&format!(
                                "Node object(s) {} have no machine any more (an earlier run stopped before removing them)",
                                ctx.stale_nodes.join(", ")
                            ));
                        }
                    }
                    Err(e) => ctx.env.report.note(&format!(
                        "warning: cannot list the cluster's Nodes to find ones whose machine is gone: {}; the next run looks again",
                        error_chain(e.as_ref())
                    )),
                }
            }
            Ok(())
        })
    }
}

/// The machines a plan wants (ensured or unchanged).
fn plan_names(plan: &Option<Plan>) -> BTreeSet<String> {
    plan.iter()
        .flat_map(|p| {
            p.ensure_steps()
                .chain(p.unchanged.iter())
                .map(|m| m.name.clone())
        })
        .collect()
}

/// Pool Nodes (`registered`) that are neither a machine the provider has nor one the spec wants.
fn stale_nodes(
    wanted: &BTreeSet<String>,
    observed: &Inventory,
    registered: Vec<String>,
) -> Vec<String> {
    let mut stale: Vec<String> = registered
        .into_iter()
        .filter(|n| !wanted.contains(n) && !observed.iter().any(|m| &m.name == n))
        .collect();
    stale.sort();
    stale.dedup();
    stale
}

/// Creates (or starts) the machines of the plan, several at a time.
pub struct EnsureMachines;

impl Phase<ApplyContext> for EnsureMachines {
    fn title(&self) -> String {
        "Creating machines".into()
    }
    fn should_run(&self, ctx: &ApplyContext) -> bool {
        ctx.plan
            .as_ref()
            .is_some_and(|p| p.ensure_steps().next().is_some())
    }
    fn run<'a>(&'a self, ctx: &'a mut ApplyContext) -> BoxFuture<'a, Result<(), EngineError>> {
        Box::pin(async move {
            let mut steps: Vec<(&'static str, MachineSpec)> = Vec::new();
            for step in ctx.plan.iter().flat_map(|p| p.steps.iter()) {
                match step {
                    Step::CreateMachine { machine } => {
                        steps.push(("creating", ctx.template.machine_spec(machine)?));
                    }
                    Step::StartMachine { machine, .. } => {
                        steps.push(("starting", ctx.template.machine_spec(machine)?));
                    }
                    Step::DeleteMachine { .. } => {}
                }
            }
            let cluster = ctx.env.cluster.clone();
            let work = steps
                .into_iter()
                .map(|(starting, spec)| {
                    let cluster = cluster.clone();
                    let name = spec.name.clone();
                    (name, starting, move |p: &dyn Provider| {
                        p.ensure_machine(&cluster, &spec)
                            .map(|m| format!("running ({})", m.provider_id))
                    })
                })
                .collect();
            run_bounded(&ctx.env, "ensure-machine", work).await
        })
    }
}

/// Deletes machines of the cluster that the spec no longer asks for.
pub struct DeleteUnwanted;

impl Phase<ApplyContext> for DeleteUnwanted {
    fn title(&self) -> String {
        "Deleting machines no longer in the spec".into()
    }
    fn should_run(&self, ctx: &ApplyContext) -> bool {
        ctx.plan
            .as_ref()
            .is_some_and(|p| p.delete_steps().next().is_some())
            || !ctx.stale_nodes.is_empty()
    }
    fn run<'a>(&'a self, ctx: &'a mut ApplyContext) -> BoxFuture<'a, Result<(), EngineError>> {
        Box::pin(async move {
            let names: Vec<String> = ctx
                .plan
                .as_ref()
                .map(|p| p.delete_steps().map(str::to_owned).collect())
                .unwrap_or_default();
            if let Some(nodes) = ctx.nodes.clone() {
                // A running cluster: its etcd members live on the control-plane machines, and
                // nothing removes a member yet (HA is not built), so none is deleted.
                let control_planes: Vec<&str> = ctx
                    .plan
                    .iter()
                    .flat_map(|p| p.steps.iter())
                    .filter_map(|s| match s {
                        Step::DeleteMachine {
                            name,
                            role: providers::MachineRole::ControlPlane,
                            ..
                        } => Some(name.as_str()),
                        _ => None,
                    })
                    .collect();
                if !control_planes.is_empty() {
                    return Err(EngineError::Refused(format!(
                        "the spec no longer has control-plane machine(s) {} of the running cluster; deleting one would lose its etcd member, and changing the number of control-plane machines is not supported yet: keep controlPlane as it was",
                        control_planes.join(", ")
                    )));
                }
                // Workers leave one at a time (one disruption at a time), each drained first.
                for name in &names {
                    let op = ctx
                        .env
                        .journal()
                        .intent("drain-node", name)
                        .map_err(EngineError::Journal)?;
                    ctx.env
                        .report
                        .machine(name, "draining before it is deleted");
                    match nodes.drain(name).await {
                        Ok(summary) => {
                            ctx.env.journal().done(&op).map_err(EngineError::Journal)?;
                            ctx.env.report.machine(name, &format!("drained: {summary}"));
                        }
                        Err(source) => {
                            let err = EngineError::NodeRemoval {
                                action: "draining",
                                node: name.clone(),
                                source,
                            };
                            let _ = ctx.env.journal().failed(&op, &error_chain(&err));
                            return Err(err);
                        }
                    }
                }
            }
            let cluster = ctx.env.cluster.clone();
            let work = names
                .clone()
                .into_iter()
                .map(|name| {
                    let cluster = cluster.clone();
                    let n = name.clone();
                    (name, "deleting", move |p: &dyn Provider| {
                        p.delete_machine(&cluster, &n)
                            .map(|()| "deleted".to_owned())
                    })
                })
                .collect();
            run_bounded(&ctx.env, "delete-machine", work).await?;
            if let Some(nodes) = ctx.nodes.clone() {
                for name in names.iter().chain(&ctx.stale_nodes) {
                    let op = ctx
                        .env
                        .journal()
                        .intent("delete-node", name)
                        .map_err(EngineError::Journal)?;
                    match nodes.forget(name).await {
                        Ok(()) => {
                            ctx.env.journal().done(&op).map_err(EngineError::Journal)?;
                            ctx.env.report.machine(name, "Node object removed");
                        }
                        Err(source) => {
                            let err = EngineError::NodeRemoval {
                                action: "removing the Node object of",
                                node: name.clone(),
                                source,
                            };
                            let _ = ctx.env.journal().failed(&op, &error_chain(&err));
                            return Err(err);
                        }
                    }
                }
            }
            Ok(())
        })
    }
}

/// Lists the machines again and checks that exactly the spec's machines exist.
pub struct VerifyMachines;

impl Phase<ApplyContext> for VerifyMachines {
    fn title(&self) -> String {
        "Verifying machines".into()
    }
    fn should_run(&self, _: &ApplyContext) -> bool {
        true
    }
    fn run<'a>(&'a self, ctx: &'a mut ApplyContext) -> BoxFuture<'a, Result<(), EngineError>> {
        Box::pin(async move {
            ctx.observed = ctx.env.list_machines().await?;
            let want: BTreeSet<String> = plan::desired_names(&ctx.desired, &ctx.members)
                .map_err(EngineError::Plan)?
                .into_iter()
                .collect();
            let have: BTreeSet<String> = ctx.observed.iter().map(|m| m.name.clone()).collect();
            let missing: Vec<_> = want.difference(&have).collect();
            let extra: Vec<_> = have.difference(&want).collect();
            if !missing.is_empty() || !extra.is_empty() {
                return Err(EngineError::Verify(format!(
                    "missing {missing:?}, unexpected {extra:?}"
                )));
            }
            ctx.env
                .report
                .note(&format!("{} machine(s) match the spec", have.len()));
            Ok(())
        })
    }
}

/// Runs provider operations on up to `env.concurrency` machines at once, each journaled. After the
/// first failure no new operation starts; those already running finish and are recorded.
async fn run_bounded<F>(
    env: &Env,
    action: &'static str,
    work: Vec<(String, &'static str, F)>,
) -> Result<(), EngineError>
where
    F: FnOnce(&dyn Provider) -> Result<String, ProviderError> + Send + 'static,
{
    let limit = Arc::new(Semaphore::new(env.concurrency.max(1)));
    let stop = Arc::new(AtomicBool::new(false));
    let mut set = JoinSet::new();
    for (index, (name, starting, f)) in work.into_iter().enumerate() {
        let limit = limit.clone();
        let stop = stop.clone();
        let provider = env.provider.clone();
        let journal = env.journal.clone();
        let report = env.report;
        // Permits are taken here, in plan order, so operations start in that order (tasks
        // spawned at once would race for them).
        let permit = limit.acquire_owned().await;
        set.spawn(async move {
            let Ok(_permit) = permit else {
                return (index, name, None);
            };
            if stop.load(Ordering::SeqCst) {
                return (index, name, None);
            }
            report.machine(&name, starting);
            let target = name.clone();
            let res = tokio::task::spawn_blocking(move || {
                journaled(&journal, &*provider, action, &target, f)
            })
            .await
            .map_err(|e| EngineError::Task(e.to_string()))
            .and_then(|r| r);
            match &res {
                Ok(msg) => report.machine(&name, msg),
                Err(e) => {
                    stop.store(true, Ordering::SeqCst);
                    report.machine(&name, &format!("failed: {}", error_chain(e)));
                }
            }
            (index, name, Some(res))
        });
    }
    let mut failures: Vec<(usize, EngineError)> = Vec::new();
    let (mut attempted, mut skipped) = (0usize, Vec::new());
    while let Some(joined) = set.join_next().await {
        match joined {
            Ok((_, _, Some(Ok(_)))) => attempted += 1,
            Ok((i, _, Some(Err(e)))) => {
                attempted += 1;
                failures.push((i, e));
            }
            Ok((i, name, None)) => skipped.push((i, name)),
            Err(e) => failures.push((usize::MAX, EngineError::Task(e.to_string()))),
        }
    }
    if failures.is_empty() {
        return Ok(());
    }
    skipped.sort();
    for (_, name) in &skipped {
        env.report
            .machine(name, "not started because of the failure above");
    }
    failures.sort_by_key(|(i, _)| *i);
    let failed = failures.len();
    let mut it = failures.into_iter().map(|(_, e)| e);
    match (failed, it.next()) {
        (1, Some(e)) => Err(e),
        (_, Some(first)) => Err(EngineError::Several {
            failed,
            attempted,
            first: Box::new(first),
        }),
        (_, None) => Ok(()),
    }
}

/// State of `clusterctl delete`.
pub struct DeleteContext {
    /// Cluster, provider, journal.
    pub env: Env,
    /// Operations an earlier run left in flight.
    pub interrupted: Vec<InFlight>,
}

/// The phases of `clusterctl delete`: everything carrying the cluster's ID goes.
pub fn delete_phases() -> Vec<Box<dyn Phase<DeleteContext>>> {
    vec![
        Box::new(RecoverInterruptedDelete),
        Box::new(DeleteClusterResources),
    ]
}

/// [`RecoverInterrupted`] for deletion.
pub struct RecoverInterruptedDelete;

impl Phase<DeleteContext> for RecoverInterruptedDelete {
    fn title(&self) -> String {
        "Recovering operations interrupted in an earlier run".into()
    }
    fn should_run(&self, ctx: &DeleteContext) -> bool {
        !ctx.interrupted.is_empty()
    }
    fn run<'a>(&'a self, ctx: &'a mut DeleteContext) -> BoxFuture<'a, Result<(), EngineError>> {
        Box::pin(async move { record_interrupted(&ctx.env, &ctx.interrupted) })
    }
}

/// Deletes every resource labelled with the cluster's ID, then checks that no machine is left.
pub struct DeleteClusterResources;

impl Phase<DeleteContext> for DeleteClusterResources {
    fn title(&self) -> String {
        "Deleting machines and other provider resources".into()
    }
    fn should_run(&self, _: &DeleteContext) -> bool {
        // Always: besides machines, providers may hold networks or images that listing does not
        // show, and deleting nothing is cheap.
        true
    }
    fn run<'a>(&'a self, ctx: &'a mut DeleteContext) -> BoxFuture<'a, Result<(), EngineError>> {
        Box::pin(async move {
            let before = ctx.env.list_machines().await?;
            for m in &before {
                ctx.env.report.machine(&m.name, "deleting");
            }
            let cluster = ctx.env.cluster.clone();
            let name = cluster.name.clone();
            ctx.env
                .call("delete-cluster", &name, move |p| p.delete_cluster(&cluster))
                .await?;
            let left = ctx.env.list_machines().await?;
            if !left.is_empty() {
                let names: Vec<_> = left.iter().map(|m| m.name.as_str()).collect();
                return Err(EngineError::Verify(format!(
                    "machines still listed after deleting the cluster: {names:?}"
                )));
            }
            for m in &before {
                ctx.env.report.machine(&m.name, "deleted");
            }
            Ok(())
        })
    }
}

#[cfg(test)]
mod tests {
    use providers::fake::{FakeOptions, FakeProvider};

    use super::*;
    use crate::state::journal::{self, Event};

    fn spec() -> spec::Cluster {
        let text = "apiVersion: clusterctl.io/v1alpha1\nkind: Cluster\nmetadata:\n  name: c1\nspec:\n  provider:\n    fake:\n      directory: /unused\n  kubernetes:\n    channel: stable\n  ssh:\n    agent: true\n  nodePools:\n    - name: a\n      count: 2\n";
        match spec::parse_str(text, "test.yaml") {
            Ok(s) => s,
            Err(e) => panic!("test spec is invalid: {e}"),
        }
    }

    fn context(
        dir: &std::path::Path,
        options: FakeOptions,
        concurrency: usize,
    ) -> anyhow::Result<ApplyContext> {
        let desired = spec();
        let provider = Arc::new(FakeProvider::new(dir.join("fake"), options)?);
        let (journal, replay) = Journal::open(&dir.join(journal::JOURNAL_FILE), "test")?;
        let template = MachineTemplate {
            image: ImageRef {
                version: "v".into(),
                dir: dir.to_path_buf(),
                digest: "d".into(),
            },
            user_data: Arc::new(|m: &DesiredMachine| {
                Ok(format!("#cloud-config\nhostname: {}\n", m.name))
            }),
            labels: BTreeMap::new(),
        };
        Ok(ApplyContext {
            nodes: None,
            env: Env {
                cluster: ClusterRef {
                    name: "c1".into(),
                    id: "id-1".into(),
                },
                provider,
                journal: Arc::new(Mutex::new(journal)),
                concurrency,
                report: Reporter::silent(),
            },
            desired,
            template,
            interrupted: replay.in_flight(),
            observed: Vec::new(),
            plan: None,
            ssh: None,
            ssh_ready: BTreeMap::new(),
            stale_nodes: Vec::new(),
            // Named as the record of a cluster from before random names would adopt them.
            members: [(
                "a".to_owned(),
                vec!["c1-a-0".to_owned(), "c1-a-1".to_owned()],
            )]
            .into_iter()
            .collect(),
        })
    }

    fn journal_events(dir: &std::path::Path) -> anyhow::Result<Vec<Event>> {
        Ok(journal::read(&dir.join(journal::JOURNAL_FILE))?
            .records
            .into_iter()
            .map(|r| r.event)
            .collect())
    }

    fn intents(events: &[Event]) -> Vec<String> {
        events
            .iter()
            .filter_map(|e| match e {
                Event::Intent { target, .. } => Some(target.clone()),
                _ => None,
            })
            .collect()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn every_side_effect_is_journaled_and_a_second_run_does_nothing() -> anyhow::Result<()> {
        let tmp = tempfile::tempdir()?;
        let mut ctx = context(tmp.path(), FakeOptions::default(), 4)?;
        run_phases(&mut ctx, Reporter::silent(), &provision_phases()).await?;
        let names: Vec<&str> = ctx.observed.iter().map(|m| m.name.as_str()).collect();
        assert_eq!(names, ["c1-a-0", "c1-a-1", "c1-cp-0"]);
        let events = journal_events(tmp.path())?;
        let mut started = intents(&events);
        started.sort();
        assert_eq!(started, ["c1-a-0", "c1-a-1", "c1-cp-0"]);
        assert_eq!(
            events
                .iter()
                .filter(|e| matches!(e, Event::Done { .. }))
                .count(),
            3
        );
        assert!(
            journal::read(&tmp.path().join(journal::JOURNAL_FILE))?
                .in_flight()
                .is_empty()
        );

        let mut again = context(tmp.path(), FakeOptions::default(), 4)?;
        run_phases(&mut again, Reporter::silent(), &provision_phases()).await?;
        assert!(again.plan.as_ref().is_some_and(Plan::is_empty));
        assert!(!EnsureMachines.should_run(&again));
        assert_eq!(
            intents(&journal_events(tmp.path())?).len(),
            3,
            "the second run has no side effect"
        );
        Ok(())
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_first_failure_stops_the_phase_and_is_journaled() -> anyhow::Result<()> {
        let tmp = tempfile::tempdir()?;
        let options = FakeOptions {
            delay: std::time::Duration::ZERO,
            fail_ensure: Some("c1-a-0".into()),
        };
        // One at a time, so the order is fixed: c1-cp-0, then c1-a-0 fails, c1-a-1 never starts.
        let mut ctx = context(tmp.path(), options, 1)?;
        let err = match run_phases(&mut ctx, Reporter::silent(), &provision_phases()).await {
            Ok(()) => anyhow::bail!("the injected failure did not fail the run"),
            Err(e) => error_chain(&e),
        };
        assert!(
            err.starts_with("Creating machines: ensuring machine \"c1-a-0\": creating fake machine \"c1-a-0\" failed: failure injected"),
            "{err}"
        );
        let events = journal_events(tmp.path())?;
        assert_eq!(intents(&events), ["c1-cp-0", "c1-a-0"]);
        assert!(
            events.iter().any(
                |e| matches!(e, Event::Failed { error, .. } if error.contains("failure injected"))
            ),
            "{events:?}"
        );
        Ok(())
    }

    /// Records what it was asked, in order; fails the drain of `fail`; `registered` are its
    /// pool Nodes (`None`: listing them fails).
    struct RecordingNodes {
        calls: Mutex<Vec<String>>,
        fail: Option<String>,
        registered: Option<Vec<String>>,
    }

    impl RecordingNodes {
        fn new(fail: Option<&str>, registered: Option<&[&str]>) -> Arc<Self> {
            Arc::new(RecordingNodes {
                calls: Mutex::new(Vec::new()),
                fail: fail.map(str::to_owned),
                registered: registered.map(|r| r.iter().map(|n| n.to_string()).collect()),
            })
        }

        fn calls(&self) -> Vec<String> {
            self.calls.lock().unwrap_or_else(|p| p.into_inner()).clone()
        }
    }

    impl NodeRemoval for RecordingNodes {
        fn drain<'a>(
            &'a self,
            node: &'a str,
        ) -> BoxFuture<'a, Result<String, Box<dyn std::error::Error + Send + Sync>>> {
            Box::pin(async move {
                self.calls
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .push(format!("drain {node}"));
                if self.fail.as_deref() == Some(node) {
                    return Err("held by a budget".into());
                }
                Ok("1 pod(s) evicted".into())
            })
        }
        fn forget<'a>(
            &'a self,
            node: &'a str,
        ) -> BoxFuture<'a, Result<(), Box<dyn std::error::Error + Send + Sync>>> {
            Box::pin(async move {
                self.calls
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .push(format!("forget {node}"));
                Ok(())
            })
        }
        fn pool_nodes(
            &self,
        ) -> BoxFuture<'_, Result<Vec<String>, Box<dyn std::error::Error + Send + Sync>>> {
            Box::pin(async move {
                self.registered
                    .clone()
                    .ok_or_else(|| "the API server is not answering".into())
            })
        }
    }

    /// `workers` wanted in pool `a`, named as the record would after a scale-down (the newest
    /// name given up).
    fn smaller(ctx: &mut ApplyContext, workers: u32) {
        if let Some(pool) = ctx.desired.spec.node_pools.first_mut() {
            pool.count = workers;
        }
        if let Some(names) = ctx.members.get_mut("a") {
            names.truncate(workers as usize);
        }
    }

    /// A run of the provision phases with `workers` workers wanted and `nodes` as the cluster's
    /// Nodes; returns its context.
    async fn converge(
        dir: &std::path::Path,
        workers: u32,
        nodes: &Arc<RecordingNodes>,
    ) -> anyhow::Result<ApplyContext> {
        let mut ctx = context(dir, FakeOptions::default(), 4)?;
        smaller(&mut ctx, workers);
        ctx.nodes = Some(nodes.clone());
        run_phases(&mut ctx, Reporter::silent(), &provision_phases()).await?;
        Ok(ctx)
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_scale_down_drains_each_node_before_its_machine_goes_then_removes_the_node()
    -> anyhow::Result<()> {
        let tmp = tempfile::tempdir()?;
        run_phases(
            &mut context(tmp.path(), FakeOptions::default(), 4)?,
            Reporter::silent(),
            &provision_phases(),
        )
        .await?;

        // A drain that fails stops the run before any machine is deleted.
        let failing = RecordingNodes::new(Some("c1-a-1"), Some(&["c1-a-0", "c1-a-1"]));
        let mut ctx = context(tmp.path(), FakeOptions::default(), 4)?;
        smaller(&mut ctx, 0);
        ctx.nodes = Some(failing.clone());
        let err = match run_phases(&mut ctx, Reporter::silent(), &provision_phases()).await {
            Ok(()) => anyhow::bail!("a failed drain did not stop the run"),
            Err(e) => error_chain(&e),
        };
        assert!(
            err.contains("draining node \"c1-a-1\": held by a budget"),
            "{err}"
        );
        assert_eq!(
            *failing.calls.lock().unwrap_or_else(|p| p.into_inner()),
            ["drain c1-a-1"]
        );
        let mut again = context(tmp.path(), FakeOptions::default(), 4)?;
        again.plan = None;
        run_phases(&mut again, Reporter::silent(), &[Box::new(ObserveAndPlan)]).await?;
        assert_eq!(again.observed.len(), 3, "nothing was deleted");

        // Drains pass: newest first, every drain before any deletion, Node objects after.
        let nodes = RecordingNodes::new(None, Some(&["c1-a-0", "c1-a-1"]));
        let mut ctx = context(tmp.path(), FakeOptions::default(), 1)?;
        smaller(&mut ctx, 0);
        ctx.nodes = Some(nodes.clone());
        run_phases(&mut ctx, Reporter::silent(), &provision_phases()).await?;
        assert_eq!(
            *nodes.calls.lock().unwrap_or_else(|p| p.into_inner()),
            [
                "drain c1-a-1",
                "drain c1-a-0",
                "forget c1-a-1",
                "forget c1-a-0"
            ]
        );
        let names: Vec<&str> = ctx.observed.iter().map(|m| m.name.as_str()).collect();
        assert_eq!(names, ["c1-cp-0"]);
        let events = journal_events(tmp.path())?;
        let actions: Vec<String> = events
            .iter()
            .filter_map(|e| match e {
                Event::Intent { action, target, .. } if action.ends_with("-node") => {
                    Some(format!("{action} {target}"))
                }
                _ => None,
            })
            .collect();
        assert_eq!(
            actions,
            [
                "drain-node c1-a-1",
                "drain-node c1-a-1",
                "drain-node c1-a-0",
                "delete-node c1-a-1",
                "delete-node c1-a-0"
            ]
        );
        Ok(())
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_node_whose_machine_an_earlier_run_deleted_is_removed_by_the_next_run()
    -> anyhow::Result<()> {
        let tmp = tempfile::tempdir()?;
        run_phases(
            &mut context(tmp.path(), FakeOptions::default(), 4)?,
            Reporter::silent(),
            &provision_phases(),
        )
        .await?;
        // An earlier scale-down to one worker was killed after deleting c1-a-1's machine and
        // before removing its Node object.
        let ctx = context(tmp.path(), FakeOptions::default(), 4)?;
        ctx.env
            .provider
            .delete_machine(&ctx.env.cluster, "c1-a-1")?;

        // Listing Nodes fails: the machines still converge, the Node waits for the next run.
        let blind = RecordingNodes::new(None, None);
        converge(tmp.path(), 1, &blind).await?;
        assert!(blind.calls().is_empty(), "{:?}", blind.calls());

        // c1-a-0 is wanted and c1-cp-0 is no pool Node: only c1-a-1 goes, without a drain.
        let nodes = RecordingNodes::new(None, Some(&["c1-a-0", "c1-a-1"]));
        let ctx = converge(tmp.path(), 1, &nodes).await?;
        assert_eq!(nodes.calls(), ["forget c1-a-1"]);
        assert_eq!(ctx.stale_nodes, ["c1-a-1"]);
        let events = journal_events(tmp.path())?;
        let forgotten = events.iter().filter(|e| matches!(e, Event::Intent { action, target, .. } if action == "delete-node" && target == "c1-a-1")).count();
        assert_eq!(forgotten, 1, "journaled once: {events:?}");

        // With the Node gone, a further run has nothing to do.
        let nodes = RecordingNodes::new(None, Some(&["c1-a-0"]));
        converge(tmp.path(), 1, &nodes).await?;
        assert!(nodes.calls().is_empty(), "{:?}", nodes.calls());
        Ok(())
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_running_cluster_never_loses_a_control_plane_machine() -> anyhow::Result<()> {
        let tmp = tempfile::tempdir()?;
        run_phases(
            &mut context(tmp.path(), FakeOptions::default(), 4)?,
            Reporter::silent(),
            &provision_phases(),
        )
        .await?;
        let nodes = RecordingNodes::new(None, Some(&["c1-a-0", "c1-a-1"]));
        let mut ctx = context(tmp.path(), FakeOptions::default(), 4)?;
        ctx.desired.spec.control_plane.count = 0;
        ctx.nodes = Some(nodes.clone());
        let err = match run_phases(&mut ctx, Reporter::silent(), &provision_phases()).await {
            Ok(()) => anyhow::bail!("a control-plane deletion was not refused"),
            Err(e) => error_chain(&e),
        };
        assert!(
            err.contains("c1-cp-0") && err.contains("etcd member"),
            "{err}"
        );
        assert!(
            nodes
                .calls
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .is_empty()
        );
        Ok(())
    }

    #[test]
    fn actions_read_as_words() {
        assert_eq!(describe("ensure-machine"), "ensuring machine");
        assert_eq!(describe("delete-cluster"), "deleting cluster");
        assert_eq!(describe("start-machine"), "starting machine");
    }
}
