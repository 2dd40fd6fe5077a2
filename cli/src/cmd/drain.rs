//! `clusterctl drain NAME NODE` and `clusterctl uncordon NAME NODE` (see `action::drain`).

use std::time::Duration;

use super::Global;
use crate::action::drain::{self, DrainOutcome, DrainRequest};
use crate::engine::Reporter;
use crate::kube::drain::Skip;
use crate::kube::drainer::DrainOptions;
use crate::output::{self, Format};
use crate::state::StateStore;

/// Arguments of `clusterctl drain`.
#[derive(Debug, clap::Args)]
pub struct DrainArgs {
    /// Name of the cluster.
    pub name: String,
    /// The node to drain (its machine's name; `clusterctl get NAME` lists them).
    pub node: String,
    /// Give up after this many seconds with pods still on the node (default: one hour, as GKE
    /// gives PodDisruptionBudgets during upgrades). The node is then uncordoned again if
    /// clusterctl cordoned it.
    #[arg(long, value_name = "SECONDS", default_value_t = drain::DEFAULT_TIMEOUT.as_secs())]
    pub timeout: u64,
    /// Also evict pods without a controller and pods with local storage (their data is lost),
    /// and delete the pods still there when the timeout expires (bypassing
    /// PodDisruptionBudgets).
    #[arg(long)]
    pub force: bool,
    /// Touch nothing: list what draining would evict, leave alone, and what blocks it.
    #[arg(long)]
    pub dry_run: bool,
    /// If another command holds the cluster's lock, wait for it instead of failing.
    #[arg(long)]
    pub wait: bool,
}

/// Arguments of `clusterctl uncordon`.
#[derive(Debug, clap::Args)]
pub struct UncordonArgs {
    /// Name of the cluster.
    pub name: String,
    /// The node to put back in service.
    pub node: String,
    /// If another command holds the cluster's lock, wait for it instead of failing.
    #[arg(long)]
    pub wait: bool,
}

fn reporter(global: &Global) -> Reporter {
    crate::output::reporter(global.quiet, global.output)
}

/// Runs `clusterctl drain`.
pub fn run(global: &Global, args: &DrainArgs) -> anyhow::Result<()> {
    let store = StateStore::resolve(global.state_dir.as_deref())?;
    let request = DrainRequest {
        node: args.node.clone(),
        options: DrainOptions {
            timeout: Duration::from_secs(args.timeout),
            force: args.force,
            ..DrainOptions::default()
        },
        dry_run: args.dry_run,
        wait_lock: args.wait,
    };
    let outcome = drain::drain(&store, &args.name, &request, reporter(global))?;
    print_outcome(global.output, &outcome)
}

/// Runs `clusterctl uncordon`.
pub fn run_uncordon(global: &Global, args: &UncordonArgs) -> anyhow::Result<()> {
    let store = StateStore::resolve(global.state_dir.as_deref())?;
    drain::uncordon(&store, &args.name, &args.node, args.wait, reporter(global))?;
    Ok(())
}

/// The JSON/YAML shape of a drain's outcome (camelCase, like the spec and kubectl).
#[derive(Debug, serde::Serialize)]
#[serde(rename_all = "camelCase")]
struct OutcomeDoc {
    node: String,
    dry_run: bool,
    cordoned: bool,
    /// Nothing blocks the drain (warnings aside). Always true after a finished drain.
    clear: bool,
    pods: Vec<PodDoc>,
    #[serde(skip_serializing_if = "Option::is_none")]
    seconds: Option<f64>,
}

#[derive(Debug, serde::Serialize)]
#[serde(rename_all = "camelCase")]
struct PodDoc {
    namespace: String,
    name: String,
    /// `evict`, `evicted`, `deleted` or `skip`.
    action: String,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    blockers: Vec<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    warnings: Vec<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    reason: Option<String>,
}

fn doc(outcome: &DrainOutcome) -> OutcomeDoc {
    match outcome {
        DrainOutcome::Simulated {
            node,
            simulation,
            cordoned,
        } => {
            let mut pods = Vec::new();
            for (pod, findings) in &simulation.evict {
                pods.push(PodDoc {
                    namespace: pod.namespace.clone(),
                    name: pod.name.clone(),
                    action: "evict".into(),
                    blockers: findings
                        .iter()
                        .filter(|b| b.blocks())
                        .map(ToString::to_string)
                        .collect(),
                    warnings: findings
                        .iter()
                        .filter(|b| !b.blocks())
                        .map(ToString::to_string)
                        .collect(),
                    reason: None,
                });
            }
            for (pod, skip) in &simulation.skip {
                pods.push(PodDoc {
                    namespace: pod.namespace.clone(),
                    name: pod.name.clone(),
                    action: "skip".into(),
                    blockers: Vec::new(),
                    warnings: Vec::new(),
                    reason: Some(
                        match skip {
                            Skip::DaemonSet => "DaemonSet pod",
                            Skip::Mirror => "static (mirror) pod",
                            Skip::Finished => "finished",
                        }
                        .into(),
                    ),
                });
            }
            OutcomeDoc {
                node: node.clone(),
                dry_run: true,
                cordoned: *cordoned,
                clear: simulation.clear(),
                pods,
                seconds: None,
            }
        }
        DrainOutcome::Drained { node, report } => {
            let pods = report
                .evicted
                .iter()
                .map(|p| (p, "evicted"))
                .chain(report.deleted.iter().map(|p| (p, "deleted")))
                .map(|(p, action)| PodDoc {
                    namespace: p.namespace.clone(),
                    name: p.name.clone(),
                    action: action.into(),
                    blockers: Vec::new(),
                    warnings: Vec::new(),
                    reason: None,
                })
                .collect();
            OutcomeDoc {
                node: node.clone(),
                dry_run: false,
                cordoned: true,
                clear: true,
                pods,
                seconds: Some(report.took.as_secs_f64().round()),
            }
        }
    }
}

fn print_outcome(format: Format, outcome: &DrainOutcome) -> anyhow::Result<()> {
    let d = doc(outcome);
    if format != Format::Table {
        output::print(&output::to_string(format, &d)?)?;
        return Ok(());
    }
    if !d.dry_run {
        // Progress on stderr said it all; stdout gets the summary line.
        output::print(&format!(
            "node {} drained: {} pod(s) moved in {} s; it stays cordoned until `clusterctl uncordon`\n",
            d.node,
            d.pods.len(),
            d.seconds.unwrap_or_default()
        ))?;
        return Ok(());
    }
    let rows: Vec<Vec<String>> = d
        .pods
        .iter()
        .map(|p| {
            let mut notes: Vec<String> =
                p.blockers.iter().map(|b| format!("BLOCKS: {b}")).collect();
            notes.extend(p.warnings.iter().map(|w| format!("warning: {w}")));
            notes.extend(p.reason.iter().cloned());
            vec![
                format!("{}/{}", p.namespace, p.name),
                p.action.clone(),
                notes.join("; "),
            ]
        })
        .collect();
    let mut text = format!(
        "drain of node {} (dry run{}): {}\n",
        d.node,
        if d.cordoned {
            ", node already cordoned"
        } else {
            ""
        },
        if d.clear {
            "nothing blocks it"
        } else {
            "BLOCKED; see below"
        }
    );
    text.push_str(&output::table(&["POD", "ACTION", "NOTES"], &rows));
    output::print(&text)?;
    Ok(())
}
