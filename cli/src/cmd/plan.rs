//! `clusterctl plan -f FILE`: shows the spec with its defaults and what `create` would do.
//! `clusterctl plan NAME --next 30d`: auto-upgrade's forward calendar (`action::autoupgrade`).
//!
//! Read-only: takes no lock and changes nothing. For a cluster that exists in the state store the
//! plan is made against what its provider lists now; for a new cluster, against nothing. When a
//! running cluster would lose workers, each is drained first: the plan shows that drain as the
//! API server sees it now (pods to evict, what blocks them), from a drain simulation.

use std::fmt::Write as _;
use std::path::PathBuf;

use anyhow::Context as _;
use serde::Serialize;

use super::Global;
use super::create::load_spec;
use crate::engine::plan::{self as planner, MachineSizeDisplay, Plan};
use crate::output::{self, Format};
use crate::provider;
use crate::spec;
use crate::state::StateStore;

/// Arguments of `clusterctl plan`.
#[derive(Debug, clap::Args)]
pub struct PlanArgs {
    /// The cluster spec (cluster.yaml).
    #[arg(
        short = 'f',
        long = "file",
        value_name = "FILE",
        required_unless_present = "next"
    )]
    pub file: Option<PathBuf>,
    /// With `--next`: the cluster whose automatic upgrades to show.
    #[arg(requires = "next", conflicts_with = "file")]
    pub name: Option<String>,
    /// Auto-upgrade's calendar for this long ahead (such as 30d): what would upgrade when, and
    /// why not sooner (maintenance window, exclusion, soak, release date).
    #[arg(long, value_name = "DURATION", requires = "name", value_parser = super::repair::parse_every)]
    pub next: Option<std::time::Duration>,
    /// The release channel file (path or https URL) instead of the one built in (with `--next`).
    #[arg(long, value_name = "PATH|URL", requires = "next")]
    pub channel_file: Option<String>,
}

/// A drain `create` would run before deleting or replacing a worker, as simulated now.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct DrainView {
    /// The node.
    node: String,
    /// `deletion` (a scale-down), `replacement` (its pool's size changed) or `resize` (the
    /// control plane's size changed).
    reason: &'static str,
    /// Pods the drain would evict.
    evict: Vec<String>,
    /// What blocks the drain (`pod: reason`); empty: nothing.
    blockers: Vec<String>,
    /// Warnings (single replicas).
    warnings: Vec<String>,
    /// Why the simulation could not be made (the API server unreachable), if so.
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<String>,
}

/// What `plan -o json|yaml` prints.
#[derive(Debug, Serialize)]
struct PlanView<'a> {
    /// The spec with defaults filled in.
    spec: &'a spec::Cluster,
    /// ID of the existing cluster, absent for a new one.
    #[serde(skip_serializing_if = "Option::is_none")]
    cluster_id: Option<String>,
    /// The plan.
    plan: &'a Plan,
    /// Drains before worker deletions on a running cluster.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    drains: Vec<DrainView>,
}

/// The drains of the workers `plan` deletes from a running cluster, simulated through the API.
fn simulate_drains(
    store: &StateStore,
    record: &crate::state::ClusterRecord,
    plan: &Plan,
) -> Vec<DrainView> {
    let workers: Vec<(String, &'static str)> = plan
        .steps
        .iter()
        .filter_map(|s| match s {
            planner::Step::DeleteMachine {
                name,
                role: providers::MachineRole::Worker,
                ..
            } => Some((name.clone(), "deletion")),
            _ => None,
        })
        .chain(plan.replacements.iter().map(|r| {
            (
                r.machine.name.clone(),
                if r.in_place { "resize" } else { "replacement" },
            )
        }))
        .collect();
    if workers.is_empty() || record.kubernetes.is_none() {
        return Vec::new();
    }
    let failed = |e: &anyhow::Error| {
        workers
            .iter()
            .map(|(w, reason)| DrainView {
                node: w.clone(),
                reason,
                evict: Vec::new(),
                blockers: Vec::new(),
                warnings: Vec::new(),
                error: Some(format!("{e:#}")),
            })
            .collect()
    };
    let rt = match crate::action::runtime() {
        Ok(rt) => rt,
        Err(e) => return failed(&e),
    };
    rt.block_on(async {
        let api = match crate::action::cluster_api(store, record).await {
            Ok(api) => api,
            Err(e) => return failed(&e),
        };
        let policy = match api.server_version().await {
            Ok(v) => v.policy_api(),
            Err(e) => {
                api.close().await;
                return failed(&e.into());
            }
        };
        let mut out = Vec::new();
        for (node, reason) in &workers {
            let view = match api.simulate_drain(node, policy).await {
                Ok(sim) => DrainView {
                    node: node.clone(),
                    reason,
                    evict: sim.evict.iter().map(|(p, _)| p.to_string()).collect(),
                    blockers: sim
                        .findings()
                        .filter(|(_, b)| b.blocks())
                        .map(|(p, b)| format!("{p}: {b}"))
                        .collect(),
                    warnings: sim
                        .findings()
                        .filter(|(_, b)| !b.blocks())
                        .map(|(p, b)| format!("{p}: {b}"))
                        .collect(),
                    error: None,
                },
                Err(e) => DrainView {
                    node: node.clone(),
                    reason,
                    evict: Vec::new(),
                    blockers: Vec::new(),
                    warnings: Vec::new(),
                    error: Some(crate::error::error_chain(&e)),
                },
            };
            out.push(view);
        }
        api.close().await;
        out
    })
}

/// Runs `clusterctl plan`.
pub fn run(global: &Global, args: &PlanArgs) -> anyhow::Result<()> {
    if let (Some(name), Some(horizon)) = (&args.name, args.next) {
        let store = StateStore::resolve(global.state_dir.as_deref())?;
        let (policy, calendar, notes) = crate::action::autoupgrade::calendar(
            &store,
            name,
            horizon,
            args.channel_file.as_deref(),
        )?;
        return super::autoupgrade::print_calendar(
            global.output,
            name,
            horizon,
            &policy,
            &calendar,
            &notes,
        );
    }
    let Some(file) = &args.file else {
        anyhow::bail!("say what to plan: `plan -f cluster.yaml`, or `plan NAME --next 30d`");
    };
    let spec = load_spec(file)?;
    let name = &spec.metadata.name;
    // An unsupported Kubernetes version (or a bundle of another version) is refused here,
    // before anything would be created.
    let kubernetes = crate::engine::artifacts::check_spec(&spec)
        .with_context(|| format!("checking kubernetes in {}", file.display()))?;
    let store = StateStore::resolve(global.state_dir.as_deref())?;
    let record = store.load(name)?;
    if let Some(r) = &record {
        crate::spec::changes::check_reapply(file, &r.spec, &spec)?;
    }
    let observed = match &record {
        Some(r) => {
            let p = provider::provider_for(&r.spec)
                .with_context(|| format!("cannot reach the provider of cluster {name:?}"))?;
            let mut list = p
                .list_machines(&r.cluster_ref())
                .with_context(|| format!("listing the machines of cluster {name:?}"))?;
            list.sort_by(|a, b| a.name.cmp(&b.name));
            list
        }
        None => Vec::new(),
    };
    // The names a run would keep; new machines get theirs (random) when they are made, shown
    // here as `<new-N>`.
    let mut members = record
        .as_ref()
        .map(|r| r.pool_members.clone())
        .unwrap_or_default();
    {
        let mut retired = record
            .as_ref()
            .map(|r| r.retired_machine_names.clone())
            .unwrap_or_default();
        let host_keys: std::collections::BTreeSet<String> = record
            .as_ref()
            .map(|r| r.ssh_host_keys.keys().cloned().collect())
            .unwrap_or_default();
        let last: Vec<providers::Machine> = record
            .as_ref()
            .map(|r| r.machines.clone())
            .unwrap_or_default();
        let surge = record
            .as_ref()
            .map(|r| r.surge_machines())
            .unwrap_or_default();
        let known = crate::engine::names::Known {
            machines: if last.is_empty() { &observed } else { &last },
            host_keys: &host_keys,
            surge: &surge,
        };
        let mut n = 0;
        let mut placeholder = || {
            n += 1;
            format!("<new-{n}>")
        };
        crate::engine::names::assign(&spec, &mut members, &mut retired, &known, &mut placeholder);
    }
    let plan = planner::plan(&spec, &members, &observed)?;
    let drains = record
        .as_ref()
        .map(|r| simulate_drains(&store, r, &plan))
        .unwrap_or_default();
    if global.output != Format::Table {
        let view = PlanView {
            spec: &spec,
            cluster_id: record.as_ref().map(|r| r.id.clone()),
            plan: &plan,
            drains,
        };
        output::print(&output::to_string(global.output, &view)?)?;
        return Ok(());
    }

    let mut out = String::new();
    writeln!(out, "Cluster {name:?} (Kubernetes {kubernetes})")?;
    match &record {
        Some(r) => writeln!(
            out,
            "  state:          exists (id {}, {}), {} machine(s) observed",
            r.id,
            r.status,
            observed.len()
        )?,
        None => writeln!(out, "  state:          new cluster")?,
    }
    writeln!(out, "  provider:       {}", spec.spec.provider.name())?;
    let cp = &spec.spec.control_plane;
    writeln!(
        out,
        "  control plane:  {} x {}",
        cp.count,
        MachineSizeDisplay(&planner::machine_size(&cp.machine))
    )?;
    for pool in &spec.spec.node_pools {
        writeln!(
            out,
            "  node pool {:?}: {} x {}",
            pool.name,
            pool.count,
            MachineSizeDisplay(&planner::machine_size(&pool.machine))
        )?;
    }
    writeln!(out)?;
    writeln!(out, "Spec with defaults:")?;
    for line in output::to_string(Format::Yaml, &spec)?.lines() {
        writeln!(out, "  {line}")?;
    }
    writeln!(out)?;
    let count = |verb: &str| plan.steps.iter().filter(|s| s.verb() == verb).count();
    writeln!(
        out,
        "Plan: {} to create, {} to start, {} to delete, {} to replace (new size), {} to resize in place, {} unchanged",
        count("create"),
        count("start"),
        count("delete"),
        plan.replacements.iter().filter(|r| !r.in_place).count(),
        plan.replacements.iter().filter(|r| r.in_place).count(),
        plan.unchanged.len() - plan.replacements.len()
    )?;
    out.push_str(&planner::render_table(&plan));
    if !plan.replacements.is_empty() {
        writeln!(
            out,
            "\n{} machine(s) of a new size, after the steps above, control plane first: a control plane is drained and resized in place (CPUs and memory, through a reboot; its disks and etcd data stay); a worker is replaced by a new machine as its pool's upgradeSettings say: with maxSurge the new machine is made and Ready before the old one is drained and deleted; without it the old one is drained and deleted first. `create` does it; if it is stopped, `clusterctl upgrade {name}` finishes it.",
            plan.replacements.len()
        )?;
    }
    for d in &drains {
        writeln!(out)?;
        match &d.error {
            Some(e) => writeln!(
                out,
                "Drain of node {} before its {}: cannot be simulated now ({e})",
                d.node, d.reason
            )?,
            None => {
                writeln!(
                    out,
                    "Drain of node {} before its {}: {} pod(s) to evict{}",
                    d.node,
                    d.reason,
                    d.evict.len(),
                    if d.blockers.is_empty() {
                        ", nothing blocks it".to_owned()
                    } else {
                        "; BLOCKED until these allow it (create waits up to --drain-timeout):"
                            .to_owned()
                    }
                )?;
                for b in &d.blockers {
                    writeln!(out, "  blocks:  {b}")?;
                }
                for w in &d.warnings {
                    writeln!(out, "  warning: {w}")?;
                }
            }
        }
    }
    output::print(&out)?;
    Ok(())
}
