//! `clusterctl repair NAME | --all` and `clusterctl autorepair enable|disable|status NAME`
//! (see `action::repair` and `schedule`).

use std::time::Duration;

use anyhow::{Context as _, bail};

use super::Global;
use crate::action::repair::{self, PassReport, RepairOptions};
use crate::engine::Reporter;
use crate::engine::repair::Decision;
use crate::output::{self, Format};
use crate::schedule::{self, Scheduler};
use crate::state::StateStore;

/// Arguments of `clusterctl repair`.
#[derive(Debug, clap::Args)]
pub struct RepairArgs {
    /// Name of the cluster (or `--all`).
    #[arg(required_unless_present = "all", conflicts_with = "all")]
    pub name: Option<String>,
    /// One pass over every cluster in the state directory, skipping those with
    /// `autoRepair.enabled: false` (what a schedule runs).
    #[arg(long)]
    pub all: bool,
    /// Only observe and print the decisions; change nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Run passes until interrupted, `--interval` apart.
    #[arg(long)]
    pub watch: bool,
    /// Seconds between `--watch` passes.
    #[arg(long, value_name = "SECONDS", default_value_t = 60)]
    pub interval: u64,
    /// Started by a schedule: skip the cluster when its `autoRepair.enabled` is false.
    #[arg(long)]
    pub scheduled: bool,
    /// If another command holds the cluster's lock, wait for it instead of exiting with 3.
    #[arg(long)]
    pub wait: bool,
    /// Seconds a repaired node may take to be Ready.
    #[arg(long, value_name = "SECONDS", default_value_t = 900)]
    pub node_timeout: u64,
}

/// Runs `clusterctl repair`.
pub fn run(global: &Global, args: &RepairArgs) -> anyhow::Result<()> {
    let store = StateStore::resolve(global.state_dir.as_deref())?;
    let report = crate::output::reporter(global.quiet, global.output);
    if args.scheduled
        && let Some(name) = &args.name
    {
        // A cron schedule appends to a log in the state directory: keep it small.
        let _ = schedule::rotate_log(store.root(), schedule::Job::Repair, name);
    }
    let opts = RepairOptions {
        dry_run: args.dry_run,
        scheduled: args.scheduled || args.all,
        wait_lock: args.wait,
        node_timeout: Duration::from_secs(args.node_timeout),
        ..Default::default()
    };
    loop {
        let result = one_pass(&store, args, &opts, global, report);
        if !args.watch {
            return result;
        }
        if let Err(e) = result {
            eprintln!("error: {e:#}");
        }
        std::thread::sleep(Duration::from_secs(args.interval.max(1)));
    }
}

fn one_pass(
    store: &StateStore,
    args: &RepairArgs,
    opts: &RepairOptions,
    global: &Global,
    report: Reporter,
) -> anyhow::Result<()> {
    if let Some(name) = &args.name {
        let r = repair::repair(store, name, opts, report)?;
        return print(global.output, &[r]);
    }
    let results = repair::repair_all(store, opts, report)?;
    let mut reports = Vec::new();
    let mut first_err: Option<anyhow::Error> = None;
    for (name, r) in results {
        match r {
            Ok(r) => reports.push(r),
            Err(e) => {
                eprintln!("error: cluster {name:?}: {e:#}");
                first_err.get_or_insert(e.context(format!("repairing cluster {name:?}")));
            }
        }
    }
    print(global.output, &reports)?;
    match first_err {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

fn print(format: Format, reports: &[PassReport]) -> anyhow::Result<()> {
    if format != Format::Table {
        output::print(&output::to_string(format, &reports)?)?;
        return Ok(());
    }
    let mut out = String::new();
    for r in reports {
        use std::fmt::Write as _;
        if let Some(s) = &r.skipped {
            let _ = writeln!(out, "{}: skipped: {s}", r.cluster);
            continue;
        }
        let Some(plan) = &r.plan else { continue };
        let _ = writeln!(
            out,
            "{}: {}/{} nodes healthy at {} ({} ms){}",
            r.cluster,
            plan.nodes.iter().filter(|v| v.healthy).count(),
            plan.nodes.len(),
            r.at,
            r.took_ms,
            if r.dry_run { ", dry run" } else { "" }
        );
        if let Some(e) = &r.api_error {
            let _ = writeln!(out, "  the API did not answer: {e}");
        }
        let rows: Vec<Vec<String>> = plan
            .nodes
            .iter()
            .map(|v| {
                let problems = v
                    .problems
                    .iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join("; ");
                let decision = match &v.decision {
                    Decision::Healthy => "-".to_owned(),
                    Decision::Wait { why } => format!("wait: {why}"),
                    Decision::Repair {
                        action,
                        units,
                        resume,
                    } => format!(
                        "{}{action}{}",
                        if *resume { "resume " } else { "" },
                        if units.is_empty() {
                            String::new()
                        } else {
                            format!(" {}", units.join(","))
                        }
                    ),
                    Decision::Held { why } => format!("held: {why}"),
                    Decision::LeftAlone { why } => format!("left alone: {why}"),
                };
                vec![
                    v.name.clone(),
                    v.pool.clone(),
                    if v.healthy { "healthy" } else { "unhealthy" }.to_owned(),
                    v.unhealthy_since
                        .map_or_else(|| "-".to_owned(), |s| s.to_string()),
                    if problems.is_empty() {
                        "-".into()
                    } else {
                        problems
                    },
                    decision,
                ]
            })
            .collect();
        out.push_str(&output::table(
            &["NODE", "POOL", "HEALTH", "SINCE", "SEEN", "DECISION"],
            &rows,
        ));
        if let Some(h) = &plan.held {
            let _ = writeln!(out, "no repair: {h}");
        }
        match &r.repaired {
            Some(rep) => {
                let _ = writeln!(
                    out,
                    "repaired: {} {} -> {}{}",
                    rep.action,
                    rep.node,
                    rep.outcome,
                    rep.detail
                        .as_ref()
                        .map(|d| format!(" ({d})"))
                        .unwrap_or_default()
                );
            }
            None if plan.held.is_none() => {
                let _ = writeln!(out, "repairs: 0");
            }
            None => {}
        }
    }
    output::print(&out)?;
    Ok(())
}

/// `clusterctl autorepair`.
#[derive(Debug, clap::Subcommand)]
pub enum AutorepairCommand {
    /// Turn auto-repair on for a cluster (its stored `autoRepair.enabled`) and install the
    /// schedule that runs `clusterctl repair NAME --scheduled`.
    Enable(EnableArgs),
    /// Remove the schedule and turn auto-repair off.
    Disable(NameArg),
    /// Show the schedule, the last pass and the latest repairs.
    Status(NameArg),
}

/// A cluster name.
#[derive(Debug, clap::Args)]
pub struct NameArg {
    /// Name of the cluster.
    pub name: String,
}

/// Arguments of `autorepair enable`.
#[derive(Debug, clap::Args)]
pub struct EnableArgs {
    /// Name of the cluster.
    pub name: String,
    /// How often a pass runs (whole minutes below an hour, or whole hours: 1m, 5m, 2h).
    #[arg(long, default_value = "5m", value_parser = parse_every)]
    pub every: Duration,
    /// Where to install it (default: systemd when it runs as PID 1, else cron).
    #[arg(long, value_enum)]
    pub scheduler: Option<Scheduler>,
}

/// A duration such as `5m`, `12h` or `30d`.
pub(super) fn parse_every(s: &str) -> Result<Duration, String> {
    s.parse::<crate::spec::Duration>()
        .map(|d| Duration::from_secs(d.as_secs()))
        .map_err(|e| e.to_string())
}

/// Runs `clusterctl autorepair`.
pub fn run_autorepair(global: &Global, command: &AutorepairCommand) -> anyhow::Result<()> {
    let store = StateStore::resolve(global.state_dir.as_deref())?;
    let report = crate::output::line_reporter(global.quiet);
    match command {
        AutorepairCommand::Enable(a) => {
            set_enabled(&store, &a.name, true, report)?;
            let where_ =
                install_schedule(&store, schedule::Job::Repair, &a.name, a.every, a.scheduler)?;
            println!(
                "auto-repair of cluster {:?} enabled, every {}: {where_}",
                a.name,
                crate::spec::Duration::from_secs(a.every.as_secs())
            );
            Ok(())
        }
        AutorepairCommand::Disable(a) => {
            let removed = schedule::remove(schedule::Job::Repair, &a.name)?;
            set_enabled(&store, &a.name, false, report)?;
            println!(
                "auto-repair of cluster {:?} disabled{}",
                a.name,
                removed_text(&removed)
            );
            Ok(())
        }
        AutorepairCommand::Status(a) => {
            let record = crate::action::load_cluster(&store, &a.name)?;
            let found = schedule::find(schedule::Job::Repair, &a.name);
            if global.output != Format::Table {
                #[derive(serde::Serialize)]
                #[serde(rename_all = "camelCase")]
                struct Doc<'a> {
                    cluster: &'a str,
                    enabled: bool,
                    scheduler: Option<Scheduler>,
                    schedule: Option<&'a str>,
                    last_pass: Option<&'a crate::state::RepairPass>,
                    repairs: &'a [crate::state::RepairRecord],
                }
                let doc = Doc {
                    cluster: &a.name,
                    enabled: record.spec.spec.auto_repair.enabled,
                    scheduler: found.as_ref().map(|f| f.0),
                    schedule: found.as_ref().map(|f| f.1.as_str()),
                    last_pass: record.repair.last_pass.as_ref(),
                    repairs: &record.repair.history,
                };
                output::print(&output::to_string(global.output, &doc)?)?;
                return Ok(());
            }
            println!(
                "auto-repair: {}",
                if record.spec.spec.auto_repair.enabled {
                    "enabled"
                } else {
                    "disabled"
                }
            );
            match &found {
                Some((s, def)) => println!("schedule ({s:?}): {def}"),
                None => println!("schedule: none installed"),
            }
            match &record.repair.last_pass {
                Some(p) => println!(
                    "last pass ({}): {}",
                    if p.scheduled { "scheduled" } else { "by hand" },
                    p.summary()
                ),
                None => println!("last pass: none"),
            }
            if !record.repair.history.is_empty() {
                print!("{}", super::get::repairs_table(&record.repair.history, 10));
            }
            Ok(())
        }
    }
}

/// Installs `job`'s schedule for cluster `name`, keeping the environment a run needs; returns
/// where it is.
pub(super) fn install_schedule(
    store: &StateStore,
    job: schedule::Job,
    name: &str,
    every: Duration,
    scheduler: Option<Scheduler>,
) -> anyhow::Result<String> {
    let exe = std::env::current_exe().context("finding the clusterctl binary")?;
    let state_dir = std::fs::canonicalize(store.root())
        .with_context(|| format!("resolving {}", store.root().display()))?;
    let env = schedule::KEPT_ENV
        .iter()
        .filter_map(|k| std::env::var(k).ok().map(|v| ((*k).to_owned(), v)))
        .collect();
    let entry = schedule::Entry {
        job,
        cluster: name.to_owned(),
        every,
        exe,
        state_dir,
        env,
    };
    schedule::install(&entry, scheduler.unwrap_or_else(Scheduler::detect))
}

/// `" (no schedule was installed)"` or `"; removed: ..."`.
pub(super) fn removed_text(removed: &[String]) -> String {
    if removed.is_empty() {
        " (no schedule was installed)".to_owned()
    } else {
        format!("; removed: {}", removed.join(", "))
    }
}

/// Sets the stored spec's `autoRepair.enabled` (under the lock).
fn set_enabled(store: &StateStore, name: &str, on: bool, report: Reporter) -> anyhow::Result<()> {
    let guard = crate::action::lock_cluster(store, name, true, report)?;
    let Some(mut record) = guard.load()? else {
        bail!(
            "cluster {name:?} not found in {}; `clusterctl get` lists the known clusters",
            store.root().display()
        );
    };
    if record.spec.spec.auto_repair.enabled != on {
        record.spec.spec.auto_repair.enabled = on;
        guard.save(&mut record)?;
    }
    Ok(())
}
