//! `clusterctl delete NAME [--wait]`: arguments and output; the work is [`crate::action::delete`].

use super::Global;
use crate::action::delete::{DeleteOutcome, delete};
use crate::state::StateStore;

/// Arguments of `clusterctl delete`.
#[derive(Debug, clap::Args)]
pub struct DeleteArgs {
    /// Name of the cluster.
    pub name: String,
    /// If another command holds the cluster's lock, wait for it instead of failing.
    #[arg(long)]
    pub wait: bool,
}

/// Runs `clusterctl delete`.
pub fn run(global: &Global, args: &DeleteArgs) -> anyhow::Result<()> {
    let report = crate::output::reporter(global.quiet, global.output);
    let name = args.name.as_str();
    let store = StateStore::resolve(global.state_dir.as_deref())?;
    match delete(&store, name, args.wait, report)? {
        DeleteOutcome::NothingProvisioned => report.note(&format!(
            "cluster {name:?} had no state record, so nothing was provisioned; removed its state directory"
        )),
        DeleteOutcome::Deleted { kubeconfigs } => {
            super::credentials::forget_context(name, &kubeconfigs, global.quiet);
            if !global.quiet {
                eprintln!("Cluster {name:?} deleted.");
            }
        }
    }
    Ok(())
}
