//! `clusterctl snapshot NAME` (see `action::snapshot`).

use super::Global;
use crate::action::snapshot;
use crate::output::{self, Format};
use crate::state::StateStore;

/// Arguments of `clusterctl snapshot`.
#[derive(Debug, clap::Args)]
pub struct SnapshotArgs {
    /// Name of the cluster.
    pub name: String,
    /// List the snapshots kept in the state instead of taking one.
    #[arg(long)]
    pub list: bool,
    /// If another command holds the cluster's lock, wait for it instead of failing.
    #[arg(long)]
    pub wait: bool,
}

/// The JSON/YAML shape of a snapshot (camelCase), with where it is kept.
#[derive(Debug, serde::Serialize)]
#[serde(rename_all = "camelCase")]
struct SnapshotDoc<'a> {
    path: String,
    #[serde(flatten)]
    snapshot: &'a crate::etcd::Snapshot,
}

/// Runs `clusterctl snapshot`.
pub fn run(global: &Global, args: &SnapshotArgs) -> anyhow::Result<()> {
    let store = StateStore::resolve(global.state_dir.as_deref())?;
    let report = crate::output::reporter(global.quiet, global.output);
    let snaps = if args.list {
        crate::action::load_cluster(&store, &args.name)?.etcd_snapshots
    } else {
        vec![snapshot::by_hand(&store, &args.name, args.wait, report)?.0]
    };
    let docs: Vec<SnapshotDoc> = snaps
        .iter()
        .map(|s| SnapshotDoc {
            path: snapshot::path_of(&store, &args.name, &s.file)
                .display()
                .to_string(),
            snapshot: s,
        })
        .collect();
    if global.output != Format::Table {
        return Ok(output::print(&output::to_string(global.output, &docs)?)?);
    }
    if docs.is_empty() {
        println!(
            "no etcd snapshots of cluster {} in the state (`clusterctl snapshot {}` takes one; upgrades take one before the control plane)",
            args.name, args.name
        );
        return Ok(());
    }
    let mut rows = Vec::new();
    for d in &docs {
        let s = d.snapshot;
        rows.push(vec![
            s.taken_at.to_string(),
            s.node.clone(),
            s.revision.to_string(),
            s.keys.to_string(),
            format!("{:.1} MiB", s.bytes as f64 / f64::from(1u32 << 20)),
            s.reason.clone(),
            d.path.clone(),
        ]);
    }
    output::print(&output::table(
        &[
            "TAKEN", "NODE", "REVISION", "KEYS", "SIZE", "REASON", "PATH",
        ],
        &rows,
    ))?;
    Ok(())
}
