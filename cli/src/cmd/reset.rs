//! `clusterctl reset NAME NODE` (see `action::reset`).

use std::time::Duration;

use super::Global;
use crate::action::reset::{self, ResetOutcome};
use crate::output::{self, Format};
use crate::state::StateStore;

/// Arguments of `clusterctl reset`.
#[derive(Debug, clap::Args)]
pub struct ResetArgs {
    /// Name of the cluster.
    pub name: String,
    /// The node whose machine to power-cycle (its machine's name; `clusterctl get NAME` lists
    /// them). A hard reset, for a machine that hangs: nothing is drained.
    pub node: String,
    /// Seconds to wait for the node to be Ready again with a new boot ID.
    #[arg(long, value_name = "SECONDS", default_value_t = reset::DEFAULT_TIMEOUT.as_secs())]
    pub timeout: u64,
    /// If another command holds the cluster's lock, wait for it instead of failing.
    #[arg(long)]
    pub wait: bool,
}

/// The JSON/YAML shape of a reset's outcome (camelCase).
#[derive(Debug, serde::Serialize)]
#[serde(rename_all = "camelCase")]
struct OutcomeDoc<'a> {
    node: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    boot_id_before: Option<&'a str>,
    boot_id_after: &'a str,
    ready_after_seconds: f64,
}

/// Runs `clusterctl reset`.
pub fn run(global: &Global, args: &ResetArgs) -> anyhow::Result<()> {
    let store = StateStore::resolve(global.state_dir.as_deref())?;
    let report = crate::output::reporter(global.quiet, global.output);
    let outcome = reset::reset(
        &store,
        &args.name,
        &args.node,
        Duration::from_secs(args.timeout),
        args.wait,
        report,
    )?;
    print_outcome(global.output, &outcome)
}

fn print_outcome(format: Format, o: &ResetOutcome) -> anyhow::Result<()> {
    if format == Format::Table {
        println!(
            "node {} booted again (boot id {} -> {}) and is Ready, {:.0} s after the reset",
            o.node,
            o.boot_id_before.as_deref().unwrap_or("unknown"),
            o.boot_id_after,
            o.ready_after.as_secs_f64()
        );
        return Ok(());
    }
    let doc = OutcomeDoc {
        node: &o.node,
        boot_id_before: o.boot_id_before.as_deref(),
        boot_id_after: &o.boot_id_after,
        ready_after_seconds: (o.ready_after.as_secs_f64() * 10.0).round() / 10.0,
    };
    output::print(&output::to_string(format, &doc)?)?;
    Ok(())
}
