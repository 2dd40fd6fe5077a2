//! `clusterctl autoupgrade enable|disable|status NAME`, `clusterctl upgrade NAME --auto`'s
//! output and `clusterctl plan NAME --next`'s calendar (see `action::autoupgrade`).

use std::time::Duration;

use anyhow::bail;

use super::Global;
use super::repair::{install_schedule, parse_every, removed_text};
use crate::action::autoupgrade::{self, AutoOutcome};
use crate::engine::Reporter;
use crate::engine::autoupgrade::{Candidate, Decision, Planned, Policy};
use crate::output::{self, Format};
use crate::schedule::{self, Job, Scheduler};
use crate::state::{StateStore, Timestamp};

/// `clusterctl autoupgrade`.
#[derive(Debug, clap::Subcommand)]
pub enum AutoupgradeCommand {
    /// Turn auto-upgrade on for a cluster (its stored `autoUpgrade.enabled`) and install the
    /// schedule that runs `clusterctl upgrade NAME --auto --scheduled`.
    Enable(EnableArgs),
    /// Remove the schedule and turn auto-upgrade off.
    Disable(super::repair::NameArg),
    /// Show the schedule, the last automatic run and what the next one would decide.
    Status(super::repair::NameArg),
}

/// Arguments of `autoupgrade enable`.
#[derive(Debug, clap::Args)]
pub struct EnableArgs {
    /// Name of the cluster.
    pub name: String,
    /// How often a run looks (whole minutes below an hour, or whole hours: 10m, 1h). Each run
    /// upgrades at most one machine, so this is also the pace of an upgrade.
    #[arg(long, default_value = "10m", value_parser = parse_every)]
    pub every: Duration,
    /// Where to install it (default: systemd when it runs as PID 1, else cron).
    #[arg(long, value_enum)]
    pub scheduler: Option<Scheduler>,
}

/// Runs `clusterctl autoupgrade`.
pub fn run(global: &Global, command: &AutoupgradeCommand) -> anyhow::Result<()> {
    let store = StateStore::resolve(global.state_dir.as_deref())?;
    let report = crate::output::line_reporter(global.quiet);
    match command {
        AutoupgradeCommand::Enable(a) => {
            set_enabled(&store, &a.name, true, report)?;
            let where_ = install_schedule(&store, Job::Upgrade, &a.name, a.every, a.scheduler)?;
            println!(
                "auto-upgrade of cluster {:?} enabled, every {}: {where_}",
                a.name,
                crate::spec::Duration::from_secs(a.every.as_secs())
            );
            Ok(())
        }
        AutoupgradeCommand::Disable(a) => {
            let removed = schedule::remove(Job::Upgrade, &a.name)?;
            set_enabled(&store, &a.name, false, report)?;
            println!(
                "auto-upgrade of cluster {:?} disabled{}",
                a.name,
                removed_text(&removed)
            );
            Ok(())
        }
        AutoupgradeCommand::Status(a) => {
            let record = crate::action::load_cluster(&store, &a.name)?;
            let found = schedule::find(Job::Upgrade, &a.name);
            let request = autoupgrade::AutoRequest {
                scheduled: false,
                wait: false,
                dry_run: true,
                channel_file: None,
                upgrade: crate::action::upgrade::UpgradeRequest::new(None),
            };
            let next = autoupgrade::auto_upgrade(&store, &a.name, &request, Reporter::silent())?;
            if global.output != Format::Table {
                #[derive(serde::Serialize)]
                #[serde(rename_all = "camelCase")]
                struct Doc<'a> {
                    cluster: &'a str,
                    enabled: bool,
                    scheduler: Option<Scheduler>,
                    schedule: Option<&'a str>,
                    last_upgrade_finished: Option<Timestamp>,
                    last_run: Option<&'a crate::state::AutoUpgradeRun>,
                    next: &'a Decision,
                    pending: &'a [Candidate],
                }
                let doc = Doc {
                    cluster: &a.name,
                    enabled: record.spec.spec.auto_upgrade.enabled,
                    scheduler: found.as_ref().map(|f| f.0),
                    schedule: found.as_ref().map(|f| f.1.as_str()),
                    last_upgrade_finished: record.auto_upgrade.last_upgrade_finished,
                    last_run: record.auto_upgrade.last_run.as_ref(),
                    next: &next.decision,
                    pending: &next.pending,
                };
                output::print(&output::to_string(global.output, &doc)?)?;
                return Ok(());
            }
            println!(
                "auto-upgrade: {}",
                if record.spec.spec.auto_upgrade.enabled {
                    "enabled"
                } else {
                    "disabled"
                }
            );
            match &found {
                Some((s, def)) => println!("schedule ({s:?}): {def}"),
                None => println!("schedule: none installed"),
            }
            match &record.auto_upgrade.last_run {
                Some(r) => println!(
                    "last run ({}, {}): {}",
                    r.at,
                    if r.scheduled { "scheduled" } else { "by hand" },
                    r.summary
                ),
                None => println!("last run: none"),
            }
            if let Some(t) = record.auto_upgrade.last_upgrade_finished {
                println!("last upgrade finished: {t}");
            }
            println!("a run now: {}", autoupgrade::summary(&next));
            Ok(())
        }
    }
}

/// Sets the stored spec's `autoUpgrade.enabled` (under the lock).
fn set_enabled(store: &StateStore, name: &str, on: bool, report: Reporter) -> anyhow::Result<()> {
    let guard = crate::action::lock_cluster(store, name, true, report)?;
    let Some(mut record) = guard.load()? else {
        bail!(
            "cluster {name:?} not found in {}; `clusterctl get` lists the known clusters",
            store.root().display()
        );
    };
    if record.spec.spec.auto_upgrade.enabled != on {
        record.spec.spec.auto_upgrade.enabled = on;
        guard.save(&mut record)?;
    }
    Ok(())
}

/// Prints what `upgrade --auto` decided (and the upgrade it ran, through `print_upgrade`).
pub fn print_auto(
    format: Format,
    name: &str,
    outcome: &AutoOutcome,
    print_upgrade: impl Fn(&crate::action::upgrade::UpgradeOutcome) -> anyhow::Result<()>,
) -> anyhow::Result<()> {
    if format != Format::Table {
        #[derive(serde::Serialize)]
        #[serde(rename_all = "camelCase")]
        struct Doc<'a> {
            cluster: &'a str,
            decision: &'a Decision,
            #[serde(skip_serializing_if = "<[Candidate]>::is_empty")]
            pending: &'a [Candidate],
            summary: String,
            #[serde(skip_serializing_if = "<[String]>::is_empty")]
            notes: &'a [String],
        }
        let doc = Doc {
            cluster: name,
            decision: &outcome.decision,
            pending: &outcome.pending,
            summary: autoupgrade::summary(outcome),
            notes: &outcome.notes,
        };
        output::print(&output::to_string(format, &doc)?)?;
        return Ok(());
    }
    for n in &outcome.notes {
        println!("note: {n}");
    }
    match (&outcome.decision, &outcome.ran) {
        (Decision::Off, _) => println!(
            "auto-upgrade of cluster {name:?} is off: nothing done (`clusterctl autoupgrade enable {name}` turns it on)"
        ),
        (_, Some(ran)) => {
            print_upgrade(ran)?;
            println!("auto-upgrade: {}", autoupgrade::summary(outcome));
        }
        _ => println!(
            "auto-upgrade of cluster {name:?}: {}",
            autoupgrade::summary(outcome)
        ),
    }
    Ok(())
}

/// Prints `plan NAME --next`'s calendar.
pub fn print_calendar(
    format: Format,
    name: &str,
    horizon: Duration,
    policy: &Policy,
    calendar: &[Planned],
    notes: &[String],
) -> anyhow::Result<()> {
    if format != Format::Table {
        #[derive(serde::Serialize)]
        #[serde(rename_all = "camelCase")]
        struct Doc<'a> {
            cluster: &'a str,
            enabled: bool,
            horizon: String,
            upgrades: &'a [Planned],
            #[serde(skip_serializing_if = "<[String]>::is_empty")]
            notes: &'a [String],
        }
        let doc = Doc {
            cluster: name,
            enabled: policy.enabled,
            horizon: crate::spec::Duration::from_secs(horizon.as_secs()).to_string(),
            upgrades: calendar,
            notes,
        };
        output::print(&output::to_string(format, &doc)?)?;
        return Ok(());
    }
    for n in notes {
        println!("note: {n}");
    }
    let span = crate::spec::Duration::from_secs(horizon.as_secs());
    if !policy.enabled {
        println!(
            "auto-upgrade of cluster {name:?} is off: nothing upgrades by itself in the next {span} (`clusterctl autoupgrade enable {name}`)"
        );
        return Ok(());
    }
    if calendar.is_empty() {
        println!("no automatic upgrade of cluster {name:?} in the next {span}");
        return Ok(());
    }
    println!(
        "Automatic upgrades of cluster {name:?} in the next {span} (each assumed to take {} min per machine):",
        autoupgrade::ASSUMED_SECONDS_PER_MACHINE / 60
    );
    let rows: Vec<Vec<String>> = calendar
        .iter()
        .map(|p| {
            vec![
                p.at.to_string(),
                p.candidate.as_ref().map_or(
                    "the unfinished upgrade goes on".to_owned(),
                    Candidate::describe,
                ),
                if p.carried_out {
                    "upgrade"
                } else {
                    "shown only (channel upgrades not built)"
                }
                .to_owned(),
                if p.held_by.is_empty() {
                    "-".to_owned()
                } else {
                    p.held_by
                        .iter()
                        .map(ToString::to_string)
                        .collect::<Vec<_>>()
                        .join("; then ")
                },
            ]
        })
        .collect();
    print!(
        "{}",
        output::table(&["WHEN", "WHAT", "ACTION", "NOT SOONER BECAUSE"], &rows)
    );
    Ok(())
}
