//! `clusterctl upgrade NAME --node-image VERSION` (see `action::upgrade`) and
//! `clusterctl upgrade NAME --auto` (see `action::autoupgrade`).

use std::time::Duration;

use super::Global;
use crate::action::autoupgrade::{self, AutoRequest};
use crate::action::upgrade::{self, UpgradeOutcome, UpgradeRequest};
use crate::kube::drainer::DrainOptions;
use crate::output::{self, Format};
use crate::state::StateStore;

/// Arguments of `clusterctl upgrade`.
#[derive(Debug, clap::Args)]
pub struct UpgradeArgs {
    /// Name of the cluster.
    pub name: String,
    /// Node image version to roll out (`clusterctl image list`); without it, an unfinished
    /// upgrade is finished. The image the cluster booted before rolls it back.
    #[arg(long, value_name = "VERSION", conflicts_with = "auto")]
    pub node_image: Option<String>,
    /// Auto-upgrade: decide whether an upgrade is due (a newer node image built here; the
    /// maintenance window, exclusions and soak of the spec) and carry out one machine of it,
    /// or all of it with `--wait` (pausing at the window's end). What the schedule
    /// `clusterctl autoupgrade enable` installs runs.
    #[arg(long)]
    pub auto: bool,
    /// Started by the schedule (with `--auto`): rotate the cron log, record the run as scheduled.
    #[arg(long, requires = "auto")]
    pub scheduled: bool,
    /// The release channel file (path or https URL) instead of the one built in (with `--auto`).
    #[arg(long, value_name = "PATH|URL", requires = "auto")]
    pub channel_file: Option<String>,
    /// Touch nothing: show the order and what blocks each node's drain now.
    #[arg(long)]
    pub dry_run: bool,
    /// Seconds each node's drain may take before the upgrade stops (the node uncordoned again).
    #[arg(long, value_name = "SECONDS", default_value_t = crate::action::drain::DEFAULT_TIMEOUT.as_secs())]
    pub drain_timeout: u64,
    /// Also evict pods without a controller or with local storage, and delete pods still there
    /// at the drain timeout (bypassing PodDisruptionBudgets).
    #[arg(long)]
    pub force: bool,
    /// Seconds a node may take to be Ready with a new boot ID after its boot disk is replaced;
    /// after that it is rolled back and the upgrade stops.
    #[arg(long, value_name = "SECONDS", default_value_t = upgrade::DEFAULT_NODE_TIMEOUT.as_secs())]
    pub node_timeout: u64,
    /// If another command holds the cluster's lock, wait for it instead of failing; with
    /// `--auto`, also carry the whole upgrade out in this run instead of one machine.
    #[arg(long)]
    pub wait: bool,
}

/// The JSON/YAML shape of an upgrade (camelCase).
#[derive(Debug, serde::Serialize)]
#[serde(rename_all = "camelCase")]
struct OutcomeDoc<'a> {
    dry_run: bool,
    /// Why the upgrade paused (auto-upgrade), if it did.
    #[serde(skip_serializing_if = "Option::is_none")]
    paused: Option<&'a str>,
    from: &'a str,
    to: &'a str,
    nodes: Vec<NodeDoc<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    packages: Option<&'a nodeimage::PackageDiff>,
}

#[derive(Debug, serde::Serialize)]
#[serde(rename_all = "camelCase")]
struct NodeDoc<'a> {
    name: &'a str,
    role: &'a providers::MachineRole,
    /// Whether its boot disk is (or was) replaced.
    replace: bool,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    blockers: Vec<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    boot_id_before: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    boot_id_after: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    seconds: Option<f64>,
}

/// Runs `clusterctl upgrade`.
pub fn run(global: &Global, args: &UpgradeArgs) -> anyhow::Result<()> {
    let store = StateStore::resolve(global.state_dir.as_deref())?;
    let report = crate::output::reporter(global.quiet, global.output);
    let request = UpgradeRequest {
        dry_run: args.dry_run,
        wait_lock: args.wait,
        drain: DrainOptions {
            timeout: Duration::from_secs(args.drain_timeout),
            force: args.force,
            ..DrainOptions::default()
        },
        node_timeout: Duration::from_secs(args.node_timeout),
        ..UpgradeRequest::new(args.node_image.clone())
    };
    if args.auto {
        if args.scheduled {
            // A cron schedule appends to a log in the state directory: keep it small.
            let _ = crate::schedule::rotate_log(
                store.root(),
                crate::schedule::Job::Upgrade,
                &args.name,
            );
        }
        let auto = AutoRequest {
            scheduled: args.scheduled,
            wait: args.wait,
            dry_run: args.dry_run,
            channel_file: args.channel_file.clone(),
            upgrade: request,
        };
        let outcome = autoupgrade::auto_upgrade(&store, &args.name, &auto, report)?;
        return super::autoupgrade::print_auto(global.output, &args.name, &outcome, |ran| {
            print_outcome(global.output, &args.name, ran)
        });
    }
    let outcome = upgrade::upgrade(&store, &args.name, &request, report)?;
    print_outcome(global.output, &args.name, &outcome)
}

fn print_outcome(format: Format, name: &str, outcome: &UpgradeOutcome) -> anyhow::Result<()> {
    let packages = match outcome {
        UpgradeOutcome::Planned { packages, .. } => packages.as_ref(),
        UpgradeOutcome::Done { .. } | UpgradeOutcome::Paused { .. } => None,
    };
    let (plan, dry_run, paused) = match outcome {
        UpgradeOutcome::Planned { plan, .. } => (plan, true, None),
        UpgradeOutcome::Done { plan, .. } => (plan, false, None),
        UpgradeOutcome::Paused { plan, why, .. } => (plan, false, Some(why.as_str())),
    };
    let nodes: Vec<NodeDoc<'_>> = plan
        .steps
        .iter()
        .map(|s| {
            let blockers = match outcome {
                UpgradeOutcome::Planned { blockers, .. } => blockers
                    .iter()
                    .find(|(m, _)| *m == s.machine)
                    .map(|(_, b)| b.clone())
                    .unwrap_or_default(),
                UpgradeOutcome::Done { .. } | UpgradeOutcome::Paused { .. } => Vec::new(),
            };
            let done = match outcome {
                UpgradeOutcome::Done { nodes, .. } | UpgradeOutcome::Paused { nodes, .. } => {
                    nodes.iter().find(|n| n.machine == s.machine)
                }
                UpgradeOutcome::Planned { .. } => None,
            };
            NodeDoc {
                name: &s.machine,
                role: &s.role,
                replace: done.map_or(s.replace, |d| d.replaced),
                blockers,
                boot_id_before: done.and_then(|d| d.boot_ids.0.as_deref()),
                boot_id_after: done.map(|d| d.boot_ids.1.as_str()),
                seconds: done.map(|d| (d.took.as_secs_f64() * 10.0).round() / 10.0),
            }
        })
        .collect();
    if format != Format::Table {
        let doc = OutcomeDoc {
            dry_run,
            paused,
            from: &plan.from.version,
            to: &plan.to.version,
            nodes,
            packages,
        };
        output::print(&output::to_string(format, &doc)?)?;
        return Ok(());
    }
    if dry_run {
        println!(
            "Upgrade of cluster {name:?} from node image {} to {}: {} machine(s) to replace, one at a time (cordon, drain, new boot disk, Ready with a new boot ID, uncordon):",
            plan.from.version,
            plan.to.version,
            plan.replacements()
        );
        if let Some(d) = packages {
            println!(
                "Packages: {} added, {} removed, {} changed (`clusterctl image diff {} {}` lists them).",
                d.added.len(),
                d.removed.len(),
                d.changed.len(),
                plan.from.version,
                plan.to.version
            );
        }
    } else if let Some(why) = paused {
        println!(
            "The upgrade of cluster {name:?} to node image {} is paused: {why}.",
            plan.to.version
        );
    } else {
        println!(
            "Cluster {name:?} boots node image {} on every machine.",
            plan.to.version
        );
    }
    let rows: Vec<Vec<String>> = nodes
        .iter()
        .enumerate()
        .map(|(i, n)| {
            vec![
                (i + 1).to_string(),
                n.name.to_owned(),
                match n.role {
                    providers::MachineRole::ControlPlane => "control-plane".into(),
                    providers::MachineRole::Worker => "worker".into(),
                },
                if n.replace {
                    "replace"
                } else {
                    "boots it already"
                }
                .to_owned(),
                match (dry_run, n.seconds) {
                    (true, _) if n.blockers.is_empty() => "drain clear".to_owned(),
                    (true, _) => format!("drain blocked: {}", n.blockers.join("; ")),
                    (false, Some(s)) => format!("{s:.0} s"),
                    (false, None) => "-".to_owned(),
                },
            ]
        })
        .collect();
    print!(
        "{}",
        output::table(
            &[
                "#",
                "NODE",
                "ROLE",
                "ACTION",
                if dry_run { "DRAIN" } else { "TOOK" }
            ],
            &rows
        )
    );
    Ok(())
}
