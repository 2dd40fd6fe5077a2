//! `clusterctl operations NAME`: the commands run on a cluster, newest last, from its journal
//! (GKE's `gcloud container operations list`): when each ran, what it was, how it ended and
//! the side effects it made (a repair shows as `repair-<action> <node>`).

use std::collections::BTreeMap;

use serde::Serialize;

use super::Global;
use crate::output::{self, Format};
use crate::state::{Event, Record, StateStore, Timestamp};

/// Arguments of `clusterctl operations`.
#[derive(Debug, clap::Args)]
pub struct OperationsArgs {
    /// Name of the cluster.
    pub name: String,
    /// Show only the newest N.
    #[arg(long, default_value_t = 50)]
    pub last: usize,
}

/// One command run.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Operation {
    /// Run ID.
    pub run: String,
    /// Its command line.
    pub command: String,
    /// When it started.
    pub started_at: Timestamp,
    /// When it ended, if it did.
    pub finished_at: Option<Timestamp>,
    /// `succeeded`, `failed`, or `interrupted` (no end record: killed, or still running).
    pub status: String,
    /// Its side effects: `action target: outcome`.
    pub steps: Vec<String>,
}

/// The runs of a journal, in order. Pure.
pub fn operations(records: &[Record]) -> Vec<Operation> {
    let mut order: Vec<String> = Vec::new();
    let mut ops: BTreeMap<String, Operation> = BTreeMap::new();
    let mut step_of: BTreeMap<String, (String, usize)> = BTreeMap::new();
    for r in records {
        let op = ops.entry(r.run.clone()).or_insert_with(|| {
            order.push(r.run.clone());
            Operation {
                run: r.run.clone(),
                command: String::new(),
                started_at: r.at,
                finished_at: None,
                status: "interrupted".into(),
                steps: Vec::new(),
            }
        });
        match &r.event {
            Event::RunStarted { command, .. } => {
                op.command = command.clone();
                op.started_at = r.at;
            }
            Event::RunFinished { ok } => {
                op.finished_at = Some(r.at);
                op.status = if *ok { "succeeded" } else { "failed" }.into();
            }
            Event::Intent {
                op: id,
                action,
                target,
            } => {
                step_of.insert(id.clone(), (r.run.clone(), op.steps.len()));
                op.steps.push(format!("{action} {target}: in flight"));
            }
            Event::Done { op: id }
            | Event::Failed { op: id, .. }
            | Event::Interrupted { op: id, .. } => {
                let outcome = match &r.event {
                    Event::Done { .. } => "done",
                    Event::Failed { .. } => "failed",
                    _ => "interrupted",
                };
                if let Some((run, i)) = step_of.get(id)
                    && let Some(o) = ops.get_mut(run)
                    && let Some(s) = o.steps.get_mut(*i)
                    && let Some(head) = s.strip_suffix(": in flight")
                {
                    *s = format!("{head}: {outcome}");
                }
            }
        }
    }
    order
        .into_iter()
        .filter_map(|run| ops.remove(&run))
        .collect()
}

/// Runs `clusterctl operations`.
pub fn run(global: &Global, args: &OperationsArgs) -> anyhow::Result<()> {
    let store = StateStore::resolve(global.state_dir.as_deref())?;
    crate::action::load_cluster(&store, &args.name)?;
    let dir = store.cluster_dir(&args.name)?;
    let replay = crate::state::journal::read(&dir.join(crate::state::journal::JOURNAL_FILE))?;
    let all = operations(&replay.records);
    let shown = &all[all.len().saturating_sub(args.last)..];
    if global.output != Format::Table {
        output::print(&output::to_string(global.output, &shown)?)?;
        return Ok(());
    }
    let rows: Vec<Vec<String>> = shown
        .iter()
        .map(|o| {
            let took = o
                .finished_at
                .map(|f| format!("{}s", f.unix_seconds() - o.started_at.unix_seconds()))
                .unwrap_or_else(|| "-".into());
            vec![
                o.started_at.to_string(),
                o.command.clone(),
                o.status.clone(),
                took,
                if o.steps.is_empty() {
                    "-".into()
                } else {
                    o.steps.join("; ")
                },
            ]
        })
        .collect();
    output::print(&output::table(
        &["STARTED", "COMMAND", "STATUS", "TOOK", "STEPS"],
        &rows,
    ))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(seq: u64, run: &str, event: Event) -> Record {
        Record {
            seq,
            at: Timestamp::from_unix(1_790_000_000 + i64::try_from(seq).unwrap_or(0)),
            run: run.into(),
            event,
        }
    }

    #[test]
    fn runs_with_their_steps_and_outcomes_in_order() {
        let records = vec![
            rec(
                1,
                "a",
                Event::RunStarted {
                    pid: 1,
                    command: "clusterctl repair c".into(),
                },
            ),
            rec(
                2,
                "a",
                Event::Intent {
                    op: "a.1".into(),
                    action: "repair-replace".into(),
                    target: "w-0".into(),
                },
            ),
            // Killed: no outcome, no end.
            rec(
                3,
                "b",
                Event::RunStarted {
                    pid: 2,
                    command: "clusterctl repair c".into(),
                },
            ),
            rec(
                4,
                "b",
                Event::Interrupted {
                    op: "a.1".into(),
                    action: "repair-replace".into(),
                    target: "w-0".into(),
                    started_by: "a".into(),
                },
            ),
            rec(
                5,
                "b",
                Event::Intent {
                    op: "b.1".into(),
                    action: "repair-replace".into(),
                    target: "w-0".into(),
                },
            ),
            rec(6, "b", Event::Done { op: "b.1".into() }),
            rec(7, "b", Event::RunFinished { ok: true }),
        ];
        let ops = operations(&records);
        assert_eq!(ops.len(), 2);
        assert_eq!(ops[0].status, "interrupted");
        assert_eq!(
            ops[0].steps,
            vec!["repair-replace w-0: interrupted".to_owned()]
        );
        assert_eq!(ops[1].status, "succeeded");
        assert_eq!(ops[1].steps, vec!["repair-replace w-0: done".to_owned()]);
        assert_eq!(ops[1].command, "clusterctl repair c");
        assert_eq!(
            ops[1]
                .finished_at
                .map(|t| t.unix_seconds() - ops[1].started_at.unix_seconds()),
            Some(4)
        );
    }
}
