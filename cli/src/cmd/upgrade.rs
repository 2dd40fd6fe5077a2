//! `clusterctl upgrade NAME --node-image VERSION` (see `action::upgrade`) and
//! `clusterctl upgrade NAME --auto` (see `action::autoupgrade`).

use std::time::Duration;

use super::Global;
use crate::action::autoupgrade::{self, AutoRequest};
use crate::action::kubeupgrade::{self, KubeUpgradeOutcome, KubeUpgradeRequest};
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
    #[arg(long, value_name = "VERSION", conflicts_with_all = ["auto", "kubernetes_version"])]
    pub node_image: Option<String>,
    /// Kubernetes version to roll out in place (a patch, or the next minor), control plane
    /// first, one node at a time; the version an unfinished upgrade came from rolls it back.
    #[arg(long, value_name = "VERSION", conflicts_with = "auto")]
    pub kubernetes_version: Option<crate::bundle::KubeVersion>,
    /// With `--kubernetes-version`: the bundle holding that version (a cluster whose
    /// Kubernetes comes from a bundle needs one).
    #[arg(long, value_name = "PATH", requires = "kubernetes_version")]
    pub bundle: Option<std::path::PathBuf>,
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
    /// How: `in-place` (a new boot disk), `surge` (a new machine first, then this one
    /// deleted) or `recreate` (this one drained and deleted, then a new machine: its size
    /// changed in a pool without surge).
    #[serde(skip_serializing_if = "Option::is_none")]
    strategy: Option<&'static str>,
    /// Its size now and the size its pool's spec asks for, when they differ.
    #[serde(skip_serializing_if = "Option::is_none")]
    resize: Option<&'a crate::engine::upgrade::Resize>,
    /// The machine that replaced it (surge).
    #[serde(skip_serializing_if = "Option::is_none")]
    replaced_by: Option<&'a str>,
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
    if let Some(version) = args.kubernetes_version {
        let k = KubeUpgradeRequest {
            version,
            bundle: args.bundle.clone(),
            dry_run: args.dry_run,
            wait_lock: args.wait,
            drain: request.drain,
            node_timeout: request.node_timeout,
        };
        let outcome = kubeupgrade::upgrade_kubernetes(&store, &args.name, &k, report)?;
        return print_kubernetes(global.output, &args.name, &outcome);
    }
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
                strategy: s.replace.then_some(match (s.max_surge > 0, &s.resize) {
                    (true, _) => "surge",
                    (false, Some(_)) if s.role == providers::MachineRole::Worker => "recreate",
                    (false, _) => "in-place",
                }),
                resize: s.resize.as_ref(),
                replaced_by: done.and_then(|d| d.replaced_by.as_deref()),
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
        if plan.from == plan.to {
            println!(
                "Cluster {name:?} boots node image {}: {} machine(s) to replace by new machines of their pool's new size:",
                plan.to.version,
                plan.replacements()
            );
        } else {
            println!(
                "Upgrade of cluster {name:?} from node image {} to {}: {} machine(s) to replace, control plane first; in place one at a time (cordon, drain, new boot disk, Ready with a new boot ID, uncordon) unless their pool surges:",
                plan.from.version,
                plan.to.version,
                plan.replacements()
            );
        }
        for st in plan.steps.iter().filter(|s| s.replace && s.max_surge == 0) {
            if let Some(r) = &st.resize
                && st.role == providers::MachineRole::ControlPlane
            {
                println!(
                    "Machine {} ({} -> {}): resized in place (drained, CPUs and memory changed through a reboot, its disks, address and etcd data kept, Ready with a new boot ID, uncordoned; resized back if it fails its gate).",
                    st.machine,
                    crate::engine::plan::MachineSizeDisplay(&r.from),
                    crate::engine::plan::MachineSizeDisplay(&r.to),
                );
            } else if let Some(r) = &st.resize {
                println!(
                    "Machine {} ({} -> {}): pool {} has no surge, so it is drained and deleted first, then a new machine of the new size is made and must get Ready.",
                    st.machine,
                    crate::engine::plan::MachineSizeDisplay(&r.from),
                    crate::engine::plan::MachineSizeDisplay(&r.to),
                    st.pool.as_deref().unwrap_or("-")
                );
            }
        }
        let mut surging: Vec<(&str, u32, usize)> = Vec::new();
        for st in plan.steps.iter().filter(|s| s.replace && s.max_surge > 0) {
            let pool = st.pool.as_deref().unwrap_or("-");
            match surging.iter_mut().find(|(p, _, _)| *p == pool) {
                Some((_, _, n)) => *n += 1,
                None => surging.push((pool, st.max_surge, 1)),
            }
        }
        for (pool, max_surge, n) in surging {
            println!(
                "Node pool {pool}: {n} machine(s) replaced by surge (maxSurge {max_surge}): a first batch of one (the canary), then {max_surge} at a time; each gets a new machine (the new image, the pool's size), Ready, before it is drained and deleted; a batch whose new machines are not healthy is removed and the upgrade stops."
            );
        }
        if plan
            .steps
            .iter()
            .any(|s| s.replace && s.role == providers::MachineRole::ControlPlane)
        {
            println!("{SNAPSHOT_FIRST}");
        }
        if let Some(d) = packages {
            println!(
                "Packages: {} added, {} removed, {} changed, {} of them from a security suite (`clusterctl image diff {} {}` lists them).",
                d.added.len(),
                d.removed.len(),
                d.changed.len(),
                d.changed
                    .iter()
                    .filter_map(|c| c.suite.as_deref())
                    .chain(d.added.iter().filter_map(|p| p.suite.as_deref()))
                    .filter(|s| s.contains("-security"))
                    .count(),
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
                match (n.replace, n.strategy, n.replaced_by) {
                    (_, _, Some(by)) => format!("replaced by {by}"),
                    (true, Some("surge"), None) => "replace (surge)".to_owned(),
                    (true, Some("recreate"), None) => "replace (drain first)".to_owned(),
                    (true, _, None) => "replace".to_owned(),
                    (false, _, None) => "boots it already".to_owned(),
                },
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

fn role_name(r: providers::MachineRole) -> &'static str {
    match r {
        providers::MachineRole::ControlPlane => "control-plane",
        providers::MachineRole::Worker => "worker",
    }
}

/// Prints what `upgrade --kubernetes-version` planned or did.
fn print_kubernetes(
    format: Format,
    name: &str,
    outcome: &KubeUpgradeOutcome,
) -> anyhow::Result<()> {
    #[derive(serde::Serialize)]
    #[serde(rename_all = "camelCase")]
    struct Node<'a> {
        name: &'a str,
        role: &'static str,
        kubelet_before: &'a str,
        #[serde(skip_serializing_if = "Option::is_none")]
        kubelet_after: Option<&'a str>,
        #[serde(skip_serializing_if = "Option::is_none")]
        upgraded: Option<bool>,
        #[serde(skip_serializing_if = "Option::is_none")]
        seconds: Option<f64>,
    }
    #[derive(serde::Serialize)]
    #[serde(rename_all = "camelCase")]
    struct Doc<'a> {
        dry_run: bool,
        kubernetes_from: &'a str,
        kubernetes_to: &'a str,
        nodes: Vec<Node<'a>>,
    }
    let (dry_run, from, to, nodes) = match outcome {
        KubeUpgradeOutcome::Planned { from, to, nodes } => (
            true,
            from,
            to,
            nodes
                .iter()
                .map(|(n, r, v)| Node {
                    name: n,
                    role: role_name(*r),
                    kubelet_before: v,
                    kubelet_after: None,
                    upgraded: None,
                    seconds: None,
                })
                .collect::<Vec<_>>(),
        ),
        KubeUpgradeOutcome::Done { from, to, nodes } => (
            false,
            from,
            to,
            nodes
                .iter()
                .map(|r| Node {
                    name: &r.node,
                    role: role_name(r.role),
                    kubelet_before: &r.versions.0,
                    kubelet_after: Some(&r.versions.1),
                    upgraded: Some(r.upgraded),
                    seconds: Some((r.took.as_secs_f64() * 10.0).round() / 10.0),
                })
                .collect(),
        ),
    };
    if format != Format::Table {
        let doc = Doc {
            dry_run,
            kubernetes_from: from,
            kubernetes_to: to,
            nodes,
        };
        output::print(&output::to_string(format, &doc)?)?;
        return Ok(());
    }
    if dry_run {
        println!(
            "Upgrade of cluster {name:?} from Kubernetes {from} to {to}, in place, one node at a time (cordon, drain, new binaries, units restarted, Ready on the new version, uncordon):"
        );
        println!("{SNAPSHOT_FIRST}");
    } else {
        println!("Cluster {name:?} runs Kubernetes {to} on every node.");
    }
    let rows: Vec<Vec<String>> = nodes
        .iter()
        .enumerate()
        .map(|(i, n)| {
            vec![
                (i + 1).to_string(),
                n.name.to_owned(),
                n.role.to_owned(),
                n.kubelet_before.to_owned(),
                match (n.upgraded, n.seconds) {
                    (Some(true), Some(s)) => {
                        format!("{} ({s:.0} s)", n.kubelet_after.unwrap_or(""))
                    }
                    (Some(false), _) => "ran it already".to_owned(),
                    _ => format!("v{to}"),
                },
            ]
        })
        .collect();
    print!(
        "{}",
        output::table(&["#", "NODE", "ROLE", "KUBELET", "AFTER"], &rows)
    );
    Ok(())
}

/// What a dry run says of the snapshot an upgrade takes first.
const SNAPSHOT_FIRST: &str = "First, an etcd snapshot on the first control plane, kept in the cluster's state as the rollback point (`clusterctl snapshot NAME --list` shows them).";
