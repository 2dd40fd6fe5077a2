//! `clusterctl load NAME ARCHIVE...` (see `action::load`).

use std::path::PathBuf;

use super::Global;
use crate::action::load::{self, NodeLoad};
use crate::output::{self, Format};
use crate::state::StateStore;

/// Arguments of `clusterctl load`.
#[derive(Debug, clap::Args)]
pub struct LoadArgs {
    /// Name of the cluster.
    pub name: String,
    /// Image archives to load: `docker save` tars or OCI image layouts (uncompressed), each
    /// naming its images (`docker save REPO:TAG`).
    #[arg(required = true, value_name = "ARCHIVE")]
    pub archives: Vec<PathBuf>,
    /// Load only into this node (repeatable; default: every node).
    #[arg(long = "node", value_name = "NODE")]
    pub nodes: Vec<String>,
}

/// The JSON/YAML shape of one node's load (camelCase).
#[derive(Debug, serde::Serialize)]
#[serde(rename_all = "camelCase")]
struct NodeDoc<'a> {
    node: &'a str,
    imported: &'a [String],
    already_present: &'a [String],
    bytes_sent: u64,
}

/// Runs `clusterctl load`.
pub fn run(global: &Global, args: &LoadArgs) -> anyhow::Result<()> {
    let store = StateStore::resolve(global.state_dir.as_deref())?;
    let report = crate::output::reporter(global.quiet, global.output);
    let done = load::load(&store, &args.name, &args.archives, &args.nodes, report)?;
    print(global.output, &done)
}

fn print(format: Format, done: &[NodeLoad]) -> anyhow::Result<()> {
    if format == Format::Table {
        for n in done {
            println!(
                "{}: {} image(s) imported, {} already there",
                n.node,
                n.imported.len(),
                n.present.len()
            );
        }
        return Ok(());
    }
    let docs: Vec<NodeDoc<'_>> = done
        .iter()
        .map(|n| NodeDoc {
            node: &n.node,
            imported: &n.imported,
            already_present: &n.present,
            bytes_sent: n.bytes_sent,
        })
        .collect();
    output::print(&output::to_string(format, &docs)?)?;
    Ok(())
}
