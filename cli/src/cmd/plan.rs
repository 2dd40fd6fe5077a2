//! `clusterctl plan -f FILE`: shows the spec with its defaults and what `create` would do.
//!
//! Read-only: takes no lock and changes nothing. For a cluster that exists in the state store the
//! plan is made against what its provider lists now; for a new cluster, against nothing.

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
    #[arg(short = 'f', long = "file", value_name = "FILE")]
    pub file: PathBuf,
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
}

/// Runs `clusterctl plan`.
pub fn run(global: &Global, args: &PlanArgs) -> anyhow::Result<()> {
    let spec = load_spec(&args.file)?;
    let name = &spec.metadata.name;
    // An unsupported Kubernetes version (or a bundle of another version) is refused here,
    // before anything would be created.
    let kubernetes = crate::engine::artifacts::check_spec(&spec)
        .with_context(|| format!("checking kubernetes in {}", args.file.display()))?;
    let store = StateStore::resolve(global.state_dir.as_deref())?;
    let record = store.load(name)?;
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
    let plan = planner::plan(&spec, &observed)?;
    if global.output != Format::Table {
        let view = PlanView {
            spec: &spec,
            cluster_id: record.as_ref().map(|r| r.id.clone()),
            plan: &plan,
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
        "Plan: {} to create, {} to start, {} to delete, {} unchanged",
        count("create"),
        count("start"),
        count("delete"),
        plan.unchanged.len()
    )?;
    out.push_str(&planner::render_table(&plan));
    output::print(&out)?;
    Ok(())
}
