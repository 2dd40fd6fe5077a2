//! Auto-repair's decisions: a pure function of (spec, observations, repair history, now).
//!
//! A pass observes every node the spec wants (the machine through its provider, the Node
//! through the API, the node's systemd units over SSH when the first two do not already say it
//! is healthy), then [`decide`] says, for each node, whether it is healthy, what is wrong, and
//! what to do, and picks at most one repair for the pass (one node down at a time: the same
//! budget `upgrade` uses).
//!
//! **Escalation.** A node's repairs since it was last healthy climb a ladder: restart the
//! stopped units, then power-cycle the machine, then replace it (a worker: drained when it still
//! answers, deleted, created again from the spec and the pinned image). A control plane is never
//! replaced: its etcd data is on its data disk, and a single control plane rebuilt from nothing
//! would lose the cluster; its ladder ends at the power-cycle and the report says so.
//!
//! **When.** Stopped units are restarted as soon as they are seen (systemd would have done the
//! same). A machine gone or stopped is acted on at once (the provider says so; nothing to wait
//! for). NotReady or unreachable waits `unhealthyThreshold`, DiskPressure
//! `diskPressureThreshold`, a machine whose node never registered `nodeStartupTimeout`.
//!
//! **Brakes**, checked before any repair: an unfinished upgrade (the upgrade rolls back a node
//! that fails its gate; repairing it onto the same image would fight it), more unhealthy nodes
//! than `maxUnhealthy` (a partition must not set off a wave of replacements), a node repaired
//! [`NODE_MAX_PER_HOUR`] times in the last hour (left alone and reported), a backoff after a
//! failed repair (5 min, doubling, at most 1 h), a per-pool limit of disruptive repairs per hour
//! (GKE on-prem's max(3, 10% of the pool)), and maintenance exclusions, which hold replacements
//! (not restarts or power-cycles: they change nothing that runs).

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use serde::Serialize;

use crate::spec::{AutoRepair, MaintenancePolicy, MaxUnhealthy};
use crate::state::{RepairAction, RepairOutcome, RepairRecord, RepairState, Timestamp};

/// Repairs of one node in one hour after which it is left alone.
pub const NODE_MAX_PER_HOUR: usize = 3;
/// First backoff after a failed repair; doubles with each failure in a row.
pub const BACKOFF_START: Duration = Duration::from_secs(300);
/// Longest backoff.
pub const BACKOFF_MAX: Duration = Duration::from_secs(3600);
/// The pool name repairs of the control plane are counted under.
pub const CONTROL_PLANE_POOL: &str = "control-plane";

const HOUR: i64 = 3600;

/// The thresholds and brakes of a cluster (`spec.autoRepair`, `spec.maintenancePolicy`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Policy {
    /// NotReady or unreachable this long: power-cycle or replace.
    pub unhealthy_threshold: Duration,
    /// DiskPressure this long: replace.
    pub disk_pressure_threshold: Duration,
    /// A machine whose node is not Ready this long after it was first seen: replace.
    pub node_startup_timeout: Duration,
    /// More unhealthy nodes than this: no repair.
    pub max_unhealthy: MaxUnhealthy,
    /// Exclusions: (name, start, end); replacements wait while one is active.
    pub exclusions: Vec<(String, Timestamp, Timestamp)>,
}

impl Policy {
    /// The policy a spec asks for.
    pub fn from_spec(r: &AutoRepair, m: &MaintenancePolicy) -> Self {
        Policy {
            unhealthy_threshold: Duration::from_secs(r.unhealthy_threshold.as_secs()),
            disk_pressure_threshold: Duration::from_secs(r.disk_pressure_threshold.as_secs()),
            node_startup_timeout: Duration::from_secs(r.node_startup_timeout.as_secs()),
            max_unhealthy: r.max_unhealthy,
            exclusions: m
                .exclusions
                .iter()
                .map(|e| {
                    (
                        e.name.clone(),
                        Timestamp::from_unix(e.start_time.unix_seconds()),
                        Timestamp::from_unix(e.end_time.unix_seconds()),
                    )
                })
                .collect(),
        }
    }
}

/// The machine as the provider reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum MachineSeen {
    /// The provider has no such machine.
    Missing,
    /// Running (or booting).
    Running,
    /// Exists but is not running.
    Stopped,
    /// The provider reports a failure.
    Failed,
}

/// What SSH to the node found.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case", tag = "state")]
pub enum SshSeen {
    /// Not asked (the API and the provider already say the node is healthy, or the machine
    /// is not running).
    NotProbed,
    /// No answer (the error).
    Unreachable {
        /// The error.
        error: String,
    },
    /// Logged in; the units the node runs and whether each is active.
    Reached {
        /// Units that are not active.
        down: Vec<String>,
    },
}

/// The Node as the API lists it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct NodeSeen {
    /// `Ready` status: `True`, `False`, `Unknown` or empty.
    pub ready: String,
    /// When `Ready` last changed.
    pub ready_since: Option<Timestamp>,
    /// Since when `DiskPressure` has been true.
    pub disk_pressure_since: Option<Timestamp>,
}

/// One node's observations.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct NodeObservation {
    /// Node (machine) name.
    pub name: String,
    /// Its pool, or [`CONTROL_PLANE_POOL`].
    pub pool: String,
    /// A control-plane node.
    pub control_plane: bool,
    /// The machine.
    pub machine: MachineSeen,
    /// The Node object; `None` when the API answered without it (never registered, or deleted).
    pub node: Option<NodeSeen>,
    /// SSH.
    pub ssh: SshSeen,
}

/// Everything a pass saw.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Observations {
    /// Nodes the spec wants, in spec order.
    pub nodes: Vec<NodeObservation>,
    /// `None` when the API answered; the error when it did not (Node facts are then unknown).
    pub api_error: Option<String>,
    /// An upgrade is unfinished (`from -> to`).
    pub upgrade: Option<String>,
}

/// Something wrong with a node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case", tag = "kind")]
pub enum Problem {
    /// The provider has no machine.
    MachineMissing,
    /// The machine is stopped or failed.
    MachineDown {
        /// `stopped` or `failed`.
        state: String,
    },
    /// Units not active (SSH answered).
    UnitsDown {
        /// The units.
        units: Vec<String>,
    },
    /// SSH does not answer.
    Unreachable {
        /// The error.
        error: String,
    },
    /// `Ready` is not `True`.
    NotReady {
        /// `False`, `Unknown` (kubelet stopped posting).
        status: String,
    },
    /// `DiskPressure` is true.
    DiskPressure,
    /// The machine has no Node object.
    NotRegistered,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Problem::MachineMissing => f.write_str("the provider has no machine"),
            Problem::MachineDown { state } => write!(f, "the machine is {state}"),
            Problem::UnitsDown { units } => write!(f, "{} not active", units.join(", ")),
            Problem::Unreachable { error } => write!(f, "SSH does not answer ({error})"),
            Problem::NotReady { status } if status == "Unknown" => {
                f.write_str("NotReady (the kubelet stopped posting status)")
            }
            Problem::NotReady { status } => write!(f, "NotReady (Ready={status})"),
            Problem::DiskPressure => f.write_str("DiskPressure"),
            Problem::NotRegistered => f.write_str("no Node object (never registered)"),
        }
    }
}

/// What a pass decided for one node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case", tag = "decision")]
pub enum Decision {
    /// Nothing wrong.
    Healthy,
    /// Wrong, but not for long enough yet (or not the node's turn: one repair per pass).
    Wait {
        /// Why.
        why: String,
    },
    /// Repair it now.
    Repair {
        /// What to do.
        action: RepairAction,
        /// Units to restart.
        #[serde(skip_serializing_if = "Vec::is_empty")]
        units: Vec<String>,
        /// Whether this resumes an interrupted repair.
        resume: bool,
    },
    /// A brake holds it.
    Held {
        /// Which brake, and until when if known.
        why: String,
    },
    /// Nothing clusterctl may do (a control plane past its ladder, repaired too often).
    LeftAlone {
        /// Why, and what the user can do.
        why: String,
    },
}

/// One node's verdict.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct NodeVerdict {
    /// Node name.
    pub name: String,
    /// Pool.
    pub pool: String,
    /// Whether it is healthy.
    pub healthy: bool,
    /// What is wrong.
    pub problems: Vec<Problem>,
    /// Since when it has been unhealthy (as first seen, or as the API says).
    pub unhealthy_since: Option<Timestamp>,
    /// The decision.
    #[serde(flatten)]
    pub decision: Decision,
}

/// The outcome of [`decide`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PassPlan {
    /// Every node's verdict, in spec order.
    pub nodes: Vec<NodeVerdict>,
    /// The one repair to make: index into `nodes`.
    #[serde(skip)]
    pub chosen: Option<usize>,
    /// A brake that holds every repair of the pass.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub held: Option<String>,
    /// Unhealthy nodes, and the most `maxUnhealthy` allows.
    pub unhealthy: u32,
    /// The limit.
    pub max_unhealthy: u32,
    /// The new `unhealthy_since` memory (nodes healthy now are forgotten).
    #[serde(skip)]
    pub unhealthy_since: BTreeMap<String, Timestamp>,
}

impl PassPlan {
    /// The chosen repair's verdict.
    pub fn repair(&self) -> Option<&NodeVerdict> {
        self.chosen.map(|i| &self.nodes[i])
    }
}

fn secs_between(from: Timestamp, to: Timestamp) -> i64 {
    to.unix_seconds() - from.unix_seconds()
}

fn human(secs: i64) -> String {
    let s = secs.max(0);
    if s >= 3600 {
        format!("{}h{:02}m", s / 3600, (s % 3600) / 60)
    } else if s >= 60 {
        format!("{}m{:02}s", s / 60, s % 60)
    } else {
        format!("{s}s")
    }
}

/// The problems of one node, from its observations alone. Pure.
pub fn problems(o: &NodeObservation, api_answered: bool) -> Vec<Problem> {
    let mut out = Vec::new();
    match o.machine {
        MachineSeen::Missing => return vec![Problem::MachineMissing],
        MachineSeen::Stopped => out.push(Problem::MachineDown {
            state: "stopped".into(),
        }),
        MachineSeen::Failed => out.push(Problem::MachineDown {
            state: "failed".into(),
        }),
        MachineSeen::Running => {}
    }
    match &o.ssh {
        SshSeen::Unreachable { error } if out.is_empty() => out.push(Problem::Unreachable {
            error: error.clone(),
        }),
        SshSeen::Reached { down } if !down.is_empty() => out.push(Problem::UnitsDown {
            units: down.clone(),
        }),
        _ => {}
    }
    if api_answered {
        match &o.node {
            None => out.push(Problem::NotRegistered),
            Some(n) => {
                if n.ready != "True" {
                    out.push(Problem::NotReady {
                        status: if n.ready.is_empty() {
                            "absent".into()
                        } else {
                            n.ready.clone()
                        },
                    });
                }
                if n.disk_pressure_since.is_some() {
                    out.push(Problem::DiskPressure);
                }
            }
        }
    }
    out
}

/// Repairs of `node` started at or after `since`.
fn repairs_since<'a>(
    history: &'a [RepairRecord],
    node: &'a str,
    since: i64,
) -> impl Iterator<Item = &'a RepairRecord> + 'a {
    history
        .iter()
        .filter(move |r| r.node == node && r.started_at.unix_seconds() >= since)
}

/// The backoff after the node's failed repairs in a row, and when it ends; `None` if its last
/// repair did not fail.
fn backoff_until(history: &[RepairRecord], node: &str) -> Option<Timestamp> {
    let mine: Vec<&RepairRecord> = history.iter().filter(|r| r.node == node).collect();
    let last = mine.last()?;
    if last.outcome != RepairOutcome::Failed {
        return None;
    }
    let fails = mine
        .iter()
        .rev()
        .take_while(|r| r.outcome == RepairOutcome::Failed)
        .count();
    let shift = u32::try_from(fails.saturating_sub(1))
        .unwrap_or(u32::MAX)
        .min(6);
    let secs = (BACKOFF_START.as_secs() << shift).min(BACKOFF_MAX.as_secs());
    let end = last.finished_at.unwrap_or(last.started_at);
    Some(Timestamp::from_unix(
        end.unix_seconds() + i64::try_from(secs).unwrap_or(i64::MAX / 2),
    ))
}

/// The most disruptive repairs a pool of `size` nodes gets per hour: max(3, 10%).
pub fn pool_hourly_limit(size: usize) -> usize {
    3.max(size / 10)
}

/// Decides one pass. Pure: (policy, observations, history, now) in, verdicts out.
pub fn decide(
    policy: &Policy,
    obs: &Observations,
    state: &RepairState,
    now: Timestamp,
) -> PassPlan {
    let api_answered = obs.api_error.is_none();
    let history = &state.history;
    let total = u32::try_from(obs.nodes.len()).unwrap_or(u32::MAX);
    // A percentage allows at least one node: 40% of a 2-node cluster must not forbid every
    // repair (Cluster API rounds down to 0 there; GKE repairs).
    let limit = match policy.max_unhealthy {
        MaxUnhealthy::Percent(p) if p > 0 => policy.max_unhealthy.limit(total).max(1),
        m => m.limit(total),
    };
    let mut since_map = BTreeMap::new();
    let mut verdicts = Vec::new();
    // Pass 1: health, and since when.
    for o in &obs.nodes {
        let problems = problems(o, api_answered);
        let healthy = problems.is_empty();
        let since = if healthy {
            None
        } else {
            let first_seen = state.unhealthy_since.get(&o.name).copied().unwrap_or(now);
            // The API's own time for NotReady, when it is older than our first sighting.
            let api_since = o.node.as_ref().and_then(|n| {
                if n.ready != "True" {
                    n.ready_since
                } else {
                    None
                }
            });
            let s = match api_since {
                Some(a) if a < first_seen => a,
                _ => first_seen,
            };
            since_map.insert(o.name.clone(), first_seen);
            Some(s)
        };
        verdicts.push(NodeVerdict {
            name: o.name.clone(),
            pool: o.pool.clone(),
            healthy,
            problems,
            unhealthy_since: since,
            decision: Decision::Healthy,
        });
    }
    let unhealthy = u32::try_from(verdicts.iter().filter(|v| !v.healthy).count()).unwrap_or(0);
    // Pass 2: what each unhealthy node needs.
    let in_progress = state.in_progress().map(|i| &history[i]);
    for (v, o) in verdicts.iter_mut().zip(&obs.nodes) {
        if v.healthy {
            continue;
        }
        v.decision = node_decision(policy, o, v, history, in_progress, now);
    }
    // Cluster-wide brakes.
    let wants_repair = verdicts
        .iter()
        .any(|v| matches!(v.decision, Decision::Repair { .. }));
    let held = if !wants_repair {
        None
    } else if let Some(u) = &obs.upgrade {
        Some(format!(
            "an upgrade is unfinished ({u}): it rolls back a node that fails its health gate, so repair waits; run `clusterctl upgrade` for the cluster to finish or roll it back"
        ))
    } else if unhealthy > limit {
        Some(format!(
            "{unhealthy} of {total} nodes are unhealthy, more than maxUnhealthy {} ({limit} node(s)): a partition or an outage is more likely than {unhealthy} broken machines, so nothing is repaired until at most {limit} are",
            policy.max_unhealthy
        ))
    } else {
        None
    };
    let mut chosen = None;
    // A repair that already took something down (a machine deleted) is finished whatever the
    // brakes say: stopping half-way leaves the node gone.
    let started = in_progress.filter(|r| !r.steps_done.is_empty());
    if let (Some(_), Some(r)) = (&held, started)
        && let Some(i) = verdicts.iter().position(|v| r.is_for(&v.name))
        && matches!(verdicts[i].decision, Decision::Repair { resume: true, .. })
    {
        chosen = Some(i);
    }
    if let Some(why) = &held {
        for (i, v) in verdicts.iter_mut().enumerate() {
            if matches!(v.decision, Decision::Repair { .. }) && chosen != Some(i) {
                v.decision = Decision::Held { why: why.clone() };
            }
        }
    } else {
        // One repair per pass: an interrupted one first, then the node unhealthy longest.
        let mut candidates: Vec<usize> = verdicts
            .iter()
            .enumerate()
            .filter(|(_, v)| matches!(v.decision, Decision::Repair { .. }))
            .map(|(i, _)| i)
            .collect();
        candidates.sort_by_key(|&i| {
            let resume = matches!(verdicts[i].decision, Decision::Repair { resume: true, .. });
            (!resume, verdicts[i].unhealthy_since)
        });
        // Per-pool limit of disruptive repairs in the last hour.
        for i in candidates {
            let v = &verdicts[i];
            let Decision::Repair { action, resume, .. } = &v.decision else {
                continue;
            };
            if chosen.is_none() && !*resume && action.disruptive() {
                let pool_size = obs.nodes.iter().filter(|o| o.pool == v.pool).count();
                let cap = pool_hourly_limit(pool_size);
                let recent = history
                    .iter()
                    .filter(|r| {
                        r.pool == v.pool
                            && r.action.disruptive()
                            && secs_between(r.started_at, now) < HOUR
                    })
                    .count();
                if recent >= cap {
                    let why = format!(
                        "pool {} had {recent} disruptive repair(s) in the last hour, its limit (max(3, 10% of {pool_size} nodes))",
                        v.pool
                    );
                    verdicts[i].decision = Decision::Held { why };
                    continue;
                }
            }
            if chosen.is_none() {
                chosen = Some(i);
            } else {
                verdicts[i].decision = Decision::Wait {
                    why: "one repair at a time: another node goes first".into(),
                };
            }
        }
    }
    PassPlan {
        nodes: verdicts,
        chosen,
        held,
        unhealthy,
        max_unhealthy: limit,
        unhealthy_since: since_map,
    }
}

fn node_decision(
    policy: &Policy,
    o: &NodeObservation,
    v: &NodeVerdict,
    history: &[RepairRecord],
    in_progress: Option<&RepairRecord>,
    now: Timestamp,
) -> Decision {
    let now_s = now.unix_seconds();
    // An interrupted repair of this node is finished first.
    // (A replacement is observed under its new machine's name once that name is given.)
    if let Some(r) = in_progress.filter(|r| r.is_for(&o.name)) {
        return Decision::Repair {
            action: r.action,
            units: r.units.clone(),
            resume: true,
        };
    }
    let recent = repairs_since(history, &o.name, now_s - HOUR).count();
    if recent >= NODE_MAX_PER_HOUR {
        return Decision::LeftAlone {
            why: format!(
                "repaired {recent} times in the last hour and still unhealthy: left alone so a machine that keeps failing is looked at by a person (`clusterctl describe` shows the history)"
            ),
        };
    }
    if let Some(until) = backoff_until(history, &o.name)
        && until > now
    {
        return Decision::Wait {
            why: format!("backing off after a failed repair until {until}"),
        };
    }
    let since = v.unhealthy_since.unwrap_or(now);
    let age = secs_between(since, now);
    // The ladder: repairs already made in this incident (since the node was first seen
    // unhealthy, or the API's NotReady time).
    let done: Vec<RepairAction> = repairs_since(history, &o.name, since.unix_seconds())
        .map(|r| r.action)
        .collect();
    let did = |a: RepairAction| done.contains(&a);
    let threshold = |d: Duration| i64::try_from(d.as_secs()).unwrap_or(i64::MAX);
    let wait = |what: &str, d: Duration| Decision::Wait {
        why: format!(
            "{what} for {}; repaired after {}",
            human(age),
            human(threshold(d))
        ),
    };
    let repair = |action: RepairAction| Decision::Repair {
        action,
        units: Vec::new(),
        resume: false,
    };
    let next_after = |action: RepairAction| -> Decision {
        // Escalate past what was already tried in this incident.
        let mut a = action;
        loop {
            if !did(a) {
                break;
            }
            a = match a {
                RepairAction::RestartUnits => RepairAction::PowerCycle,
                RepairAction::PowerCycle => RepairAction::Replace,
                RepairAction::Replace => {
                    return Decision::LeftAlone {
                        why: "already replaced in this incident and still unhealthy; look at the console log and the spec".into(),
                    };
                }
            };
        }
        if a == RepairAction::Replace && o.control_plane {
            return Decision::LeftAlone {
                why: "a control plane is never replaced (its etcd data is on its data disk and there is one member): power-cycle did not help; run `clusterctl reset`, or look at its console log".into(),
            };
        }
        repair(a)
    };
    let p = &v.problems;
    let has = |f: &dyn Fn(&Problem) -> bool| p.iter().any(f);
    // 1. The machine is gone.
    if has(&|p| matches!(p, Problem::MachineMissing)) {
        if o.control_plane {
            return Decision::LeftAlone {
                why: "the control-plane machine is gone; clusterctl does not rebuild a control plane (its etcd data was on that machine's data disk): restore it, or create the cluster again".into(),
            };
        }
        return guarded_replace(policy, now, repair(RepairAction::Replace));
    }
    // 2. The machine is stopped or failed: start it.
    if has(&|p| matches!(p, Problem::MachineDown { .. })) {
        return next_after(RepairAction::PowerCycle);
    }
    // 3. Units down: restart them at once (once per incident; then climb).
    if let Some(Problem::UnitsDown { units }) =
        p.iter().find(|p| matches!(p, Problem::UnitsDown { .. }))
        && !did(RepairAction::RestartUnits)
    {
        return Decision::Repair {
            action: RepairAction::RestartUnits,
            units: units.clone(),
            resume: false,
        };
    }
    // 4. A node that never registered.
    if has(&|p| matches!(p, Problem::NotRegistered)) {
        if age < threshold(policy.node_startup_timeout) {
            return wait("not registered", policy.node_startup_timeout);
        }
        return guarded_replace(policy, now, next_after(RepairAction::PowerCycle));
    }
    // 5. NotReady, unreachable, or units that a restart did not bring back.
    let unready = has(&|p| {
        matches!(
            p,
            Problem::NotReady { .. } | Problem::Unreachable { .. } | Problem::UnitsDown { .. }
        )
    });
    if unready {
        if age < threshold(policy.unhealthy_threshold) {
            return wait("unhealthy", policy.unhealthy_threshold);
        }
        // Reachable with every unit up but NotReady: restart the node's agents first.
        let first = if matches!(o.ssh, SshSeen::Reached { .. }) {
            RepairAction::RestartUnits
        } else {
            RepairAction::PowerCycle
        };
        return guarded_replace(policy, now, next_after(first));
    }
    // 6. DiskPressure: restarting frees nothing; a worker is replaced.
    if has(&|p| matches!(p, Problem::DiskPressure)) {
        let since = o
            .node
            .as_ref()
            .and_then(|n| n.disk_pressure_since)
            .unwrap_or(now);
        let for_secs = secs_between(since, now);
        if for_secs < threshold(policy.disk_pressure_threshold) {
            return Decision::Wait {
                why: format!(
                    "DiskPressure for {}; repaired after {}",
                    human(for_secs),
                    human(threshold(policy.disk_pressure_threshold))
                ),
            };
        }
        if o.control_plane {
            return Decision::LeftAlone {
                why: "the control plane is under DiskPressure; a control plane is never replaced: free space on its data disk".into(),
            };
        }
        return guarded_replace(policy, now, repair(RepairAction::Replace));
    }
    Decision::Wait {
        why: "nothing clusterctl can repair".into(),
    }
}

fn exclusion_active(policy: &Policy, now: Timestamp) -> Option<&(String, Timestamp, Timestamp)> {
    policy
        .exclusions
        .iter()
        .find(|(_, start, end)| *start <= now && now < *end)
}

/// `d`, unless it replaces a machine during a maintenance exclusion.
fn guarded_replace(policy: &Policy, now: Timestamp, d: Decision) -> Decision {
    match (&d, exclusion_active(policy, now)) {
        (
            Decision::Repair {
                action: RepairAction::Replace,
                ..
            },
            Some((name, _, end)),
        ) => Decision::Held {
            why: format!(
                "maintenance exclusion {name:?} until {end}: machines are not replaced during an exclusion (restarts and power-cycles still are)"
            ),
        },
        _ => d,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spec::MaxUnhealthy;

    const T0: i64 = 1_790_000_000;

    fn at(secs: i64) -> Timestamp {
        Timestamp::from_unix(T0 + secs)
    }

    fn policy() -> Policy {
        Policy {
            unhealthy_threshold: Duration::from_secs(600),
            disk_pressure_threshold: Duration::from_secs(1800),
            node_startup_timeout: Duration::from_secs(600),
            max_unhealthy: MaxUnhealthy::Percent(40),
            exclusions: Vec::new(),
        }
    }

    fn healthy(name: &str, pool: &str) -> NodeObservation {
        NodeObservation {
            name: name.into(),
            pool: pool.into(),
            control_plane: pool == CONTROL_PLANE_POOL,
            machine: MachineSeen::Running,
            node: Some(NodeSeen {
                ready: "True".into(),
                ready_since: Some(at(-86_400)),
                disk_pressure_since: None,
            }),
            ssh: SshSeen::NotProbed,
        }
    }

    /// A control plane and `n` workers of pool `w`, all healthy.
    fn cluster(n: usize) -> Observations {
        let mut nodes = vec![healthy("cp-0", CONTROL_PLANE_POOL)];
        for i in 0..n {
            nodes.push(healthy(&format!("w-{i}"), "w"));
        }
        Observations {
            nodes,
            api_error: None,
            upgrade: None,
        }
    }

    fn not_ready(o: &mut NodeObservation, since: i64, status: &str) {
        o.node = Some(NodeSeen {
            ready: status.into(),
            ready_since: Some(at(since)),
            disk_pressure_since: None,
        });
    }

    fn record(
        node: &str,
        action: RepairAction,
        start: i64,
        outcome: RepairOutcome,
    ) -> RepairRecord {
        RepairRecord {
            node: node.into(),
            pool: if node.starts_with("cp") {
                CONTROL_PLANE_POOL.into()
            } else {
                "w".into()
            },
            action,
            units: Vec::new(),
            reason: "r".into(),
            started_at: at(start),
            finished_at: Some(at(start + 60)),
            outcome,
            detail: None,
            steps_done: Vec::new(),
            replaced_by: None,
            ready_after_secs: None,
            healed_after_secs: None,
        }
    }

    fn chosen(plan: &PassPlan) -> Option<(&str, RepairAction)> {
        plan.repair().and_then(|v| match &v.decision {
            Decision::Repair { action, .. } => Some((v.name.as_str(), *action)),
            _ => None,
        })
    }

    #[test]
    fn a_healthy_cluster_needs_nothing_and_forgets_old_sightings() {
        let mut state = RepairState::default();
        state.unhealthy_since.insert("w-0".into(), at(-100));
        let plan = decide(&policy(), &cluster(2), &state, at(0));
        assert!(
            plan.nodes
                .iter()
                .all(|v| v.healthy && v.decision == Decision::Healthy)
        );
        assert_eq!(plan.chosen, None);
        assert_eq!(plan.held, None);
        assert!(plan.unhealthy_since.is_empty());
    }

    #[test]
    fn stopped_units_are_restarted_at_once_then_the_ladder_climbs() {
        let mut obs = cluster(2);
        obs.nodes[1].ssh = SshSeen::Reached {
            down: vec!["kubelet.service".into()],
        };
        let state = RepairState::default();
        let plan = decide(&policy(), &obs, &state, at(0));
        let v = plan.repair().map(|v| v.decision.clone());
        assert_eq!(
            v,
            Some(Decision::Repair {
                action: RepairAction::RestartUnits,
                units: vec!["kubelet.service".into()],
                resume: false
            })
        );
        // The restart did not help; the kubelet stays down and the node goes NotReady. Until
        // the threshold it waits; then the machine is power-cycled, then replaced.
        let mut state = RepairState::default();
        state.unhealthy_since.insert("w-0".into(), at(0));
        state.push(record(
            "w-0",
            RepairAction::RestartUnits,
            10,
            RepairOutcome::Succeeded,
        ));
        not_ready(&mut obs.nodes[1], 40, "Unknown");
        let plan = decide(&policy(), &obs, &state, at(300));
        assert!(
            matches!(plan.nodes[1].decision, Decision::Wait { .. }),
            "{:?}",
            plan.nodes[1]
        );
        let plan = decide(&policy(), &obs, &state, at(601));
        assert_eq!(chosen(&plan), Some(("w-0", RepairAction::PowerCycle)));
        state.push(record(
            "w-0",
            RepairAction::PowerCycle,
            601,
            RepairOutcome::Succeeded,
        ));
        let plan = decide(&policy(), &obs, &state, at(900));
        assert_eq!(chosen(&plan), Some(("w-0", RepairAction::Replace)));
        // Three repairs in the hour: left alone.
        state.push(record(
            "w-0",
            RepairAction::Replace,
            900,
            RepairOutcome::Succeeded,
        ));
        let plan = decide(&policy(), &obs, &state, at(1200));
        assert!(
            matches!(plan.nodes[1].decision, Decision::LeftAlone { .. }),
            "{:?}",
            plan.nodes[1]
        );
        assert_eq!(plan.chosen, None);
    }

    #[test]
    fn a_missing_worker_is_replaced_at_once_a_missing_control_plane_never() {
        let mut obs = cluster(2);
        obs.nodes[2].machine = MachineSeen::Missing;
        let plan = decide(&policy(), &obs, &RepairState::default(), at(0));
        assert_eq!(chosen(&plan), Some(("w-1", RepairAction::Replace)));
        assert_eq!(plan.nodes[2].problems, vec![Problem::MachineMissing]);
        let mut obs = cluster(2);
        obs.nodes[0].machine = MachineSeen::Missing;
        let plan = decide(&policy(), &obs, &RepairState::default(), at(0));
        assert_eq!(plan.chosen, None);
        assert!(matches!(plan.nodes[0].decision, Decision::LeftAlone { .. }));
    }

    #[test]
    fn an_unreachable_node_waits_for_the_threshold_then_is_power_cycled() {
        let mut obs = cluster(2);
        obs.nodes[1].ssh = SshSeen::Unreachable {
            error: "timed out".into(),
        };
        not_ready(&mut obs.nodes[1], -30, "Unknown");
        let state = RepairState::default();
        let plan = decide(&policy(), &obs, &state, at(0));
        // The API's NotReady time counts: 30 s, not 10 min.
        assert_eq!(plan.nodes[1].unhealthy_since, Some(at(-30)));
        assert!(matches!(plan.nodes[1].decision, Decision::Wait { .. }));
        // First sighting remembered.
        assert_eq!(plan.unhealthy_since.get("w-0"), Some(&at(0)));
        let plan = decide(&policy(), &obs, &state, at(571));
        assert_eq!(chosen(&plan), Some(("w-0", RepairAction::PowerCycle)));
        // Window edge: 1 s before the threshold it still waits.
        let plan = decide(&policy(), &obs, &state, at(569));
        assert_eq!(plan.chosen, None);
    }

    #[test]
    fn reachable_but_not_ready_restarts_the_agents_first() {
        let mut obs = cluster(1);
        obs.nodes[1].ssh = SshSeen::Reached { down: Vec::new() };
        not_ready(&mut obs.nodes[1], 0, "False");
        let plan = decide(&policy(), &obs, &RepairState::default(), at(600));
        assert_eq!(chosen(&plan), Some(("w-0", RepairAction::RestartUnits)));
    }

    #[test]
    fn the_brake_holds_every_repair_when_too_many_nodes_are_unhealthy() {
        // A percentage allows one node in a small cluster.
        let mut two = cluster(1);
        two.nodes[1].machine = MachineSeen::Missing;
        let plan = decide(&policy(), &two, &RepairState::default(), at(0));
        assert_eq!((plan.unhealthy, plan.max_unhealthy), (1, 1));
        assert_eq!(chosen(&plan), Some(("w-0", RepairAction::Replace)));
        // 2 of 3 nodes cut off: 40% of 3 is 1 node.
        let mut obs = cluster(2);
        for i in [1, 2] {
            obs.nodes[i].ssh = SshSeen::Unreachable {
                error: "no route".into(),
            };
            not_ready(&mut obs.nodes[i], 0, "Unknown");
        }
        let plan = decide(&policy(), &obs, &RepairState::default(), at(3600));
        assert_eq!(plan.chosen, None);
        assert_eq!((plan.unhealthy, plan.max_unhealthy), (2, 1));
        let held = plan.held.clone().unwrap_or_default();
        assert!(held.contains("2 of 3 nodes are unhealthy"), "{held}");
        assert!(
            plan.nodes[1..]
                .iter()
                .all(|v| matches!(v.decision, Decision::Held { .. }))
        );
        // A count allows it.
        let mut p = policy();
        p.max_unhealthy = MaxUnhealthy::Count(2);
        let plan = decide(&p, &obs, &RepairState::default(), at(3600));
        assert!(plan.held.is_none());
        assert_eq!(plan.chosen, Some(1), "one repair per pass");
        assert!(matches!(plan.nodes[2].decision, Decision::Wait { .. }));
    }

    #[test]
    fn an_unfinished_upgrade_holds_repairs() {
        let mut obs = cluster(2);
        obs.nodes[1].machine = MachineSeen::Missing;
        obs.upgrade = Some("v1 -> v2".into());
        let plan = decide(&policy(), &obs, &RepairState::default(), at(0));
        assert_eq!(plan.chosen, None);
        assert!(
            plan.held
                .unwrap_or_default()
                .contains("upgrade is unfinished")
        );
    }

    #[test]
    fn a_failed_repair_backs_off_doubling() {
        let mut obs = cluster(2);
        obs.nodes[1].machine = MachineSeen::Stopped;
        let mut state = RepairState::default();
        // Two failures in a row (over an hour ago, so not "too often"): 10 min backoff.
        state.push(record(
            "w-0",
            RepairAction::PowerCycle,
            -7200,
            RepairOutcome::Failed,
        ));
        let mut last = record(
            "w-0",
            RepairAction::PowerCycle,
            -3700,
            RepairOutcome::Failed,
        );
        last.finished_at = Some(at(-100));
        state.push(last);
        let plan = decide(&policy(), &obs, &state, at(0));
        assert!(
            matches!(&plan.nodes[1].decision, Decision::Wait { why } if why.contains("backing off")),
            "{:?}",
            plan.nodes[1].decision
        );
        let plan = decide(&policy(), &obs, &state, at(501));
        assert_eq!(chosen(&plan), Some(("w-0", RepairAction::PowerCycle)));
    }

    #[test]
    fn a_pool_gets_at_most_three_disruptive_repairs_an_hour() {
        let mut obs = cluster(5);
        obs.nodes[5].machine = MachineSeen::Missing;
        let mut state = RepairState::default();
        for (i, n) in ["w-0", "w-1", "w-2"].iter().enumerate() {
            state.push(record(
                n,
                RepairAction::PowerCycle,
                -3000 + i as i64,
                RepairOutcome::Succeeded,
            ));
        }
        // Unit restarts do not count.
        state.push(record(
            "w-3",
            RepairAction::RestartUnits,
            -10,
            RepairOutcome::Succeeded,
        ));
        let plan = decide(&policy(), &obs, &state, at(0));
        assert_eq!(plan.chosen, None);
        assert!(
            matches!(&plan.nodes[5].decision, Decision::Held { why } if why.contains("pool w had 3"))
        );
        // An hour after the first, one slot is free again.
        let plan = decide(&policy(), &obs, &state, at(601));
        assert_eq!(chosen(&plan), Some(("w-4", RepairAction::Replace)));
        assert_eq!(pool_hourly_limit(50), 5);
    }

    #[test]
    fn exclusions_hold_replacements_but_not_restarts() {
        let mut p = policy();
        p.max_unhealthy = MaxUnhealthy::Count(2);
        p.exclusions = vec![("freeze".into(), at(-100), at(100))];
        let mut obs = cluster(2);
        obs.nodes[1].machine = MachineSeen::Missing;
        obs.nodes[2].ssh = SshSeen::Reached {
            down: vec!["containerd.service".into()],
        };
        let plan = decide(&p, &obs, &RepairState::default(), at(0));
        assert!(
            matches!(&plan.nodes[1].decision, Decision::Held { why } if why.contains("freeze"))
        );
        assert_eq!(chosen(&plan), Some(("w-1", RepairAction::RestartUnits)));
        // At the exclusion's end (exclusive) the replacement goes ahead.
        let plan = decide(&p, &obs, &RepairState::default(), at(100));
        assert_eq!(chosen(&plan), Some(("w-0", RepairAction::Replace)));
    }

    #[test]
    fn an_interrupted_repair_is_resumed_first_and_past_the_brakes_of_the_pool() {
        let mut obs = cluster(2);
        obs.nodes[1].machine = MachineSeen::Missing;
        obs.nodes[2].machine = MachineSeen::Stopped;
        let mut state = RepairState::default();
        let mut r = record("w-0", RepairAction::Replace, -50, RepairOutcome::InProgress);
        r.finished_at = None;
        r.steps_done = vec!["machine-deleted".into()];
        state.push(r);
        state.unhealthy_since.insert("w-1".into(), at(-500));
        // 2 of 3 unhealthy: the brake holds w-1, but the half-done replacement of w-0 finishes.
        let plan = decide(&policy(), &obs, &state, at(0));
        assert!(plan.held.is_some());
        assert_eq!(chosen(&plan), Some(("w-0", RepairAction::Replace)));
        assert!(matches!(
            plan.repair().map(|v| &v.decision),
            Some(Decision::Repair { resume: true, .. })
        ));
        assert!(matches!(plan.nodes[2].decision, Decision::Held { .. }));
    }

    #[test]
    fn an_interrupted_replacement_is_resumed_under_its_new_machine_name() {
        // The old machine w-0 is gone from the pool; its replacement w-new is named, not made.
        let mut obs = cluster(2);
        obs.nodes[1].name = "w-new".into();
        obs.nodes[1].machine = MachineSeen::Missing;
        obs.nodes[1].node = None;
        let mut state = RepairState::default();
        let mut r = record("w-0", RepairAction::Replace, -50, RepairOutcome::InProgress);
        r.finished_at = None;
        r.steps_done = vec!["node-deleted".into(), "machine-deleted".into()];
        r.replaced_by = Some("w-new".into());
        state.push(r);
        let plan = decide(&policy(), &obs, &state, at(0));
        assert_eq!(chosen(&plan), Some(("w-new", RepairAction::Replace)));
        assert!(matches!(
            plan.repair().map(|v| &v.decision),
            Some(Decision::Repair { resume: true, .. })
        ));
    }

    #[test]
    fn a_machine_that_never_registers_is_replaced_after_the_startup_timeout() {
        let mut obs = cluster(1);
        obs.nodes[1].node = None;
        let mut state = RepairState::default();
        state.unhealthy_since.insert("w-0".into(), at(0));
        let plan = decide(&policy(), &obs, &state, at(599));
        assert!(matches!(plan.nodes[1].decision, Decision::Wait { .. }));
        let plan = decide(&policy(), &obs, &state, at(600));
        assert_eq!(chosen(&plan), Some(("w-0", RepairAction::PowerCycle)));
        // Without an API answer the node's registration is unknown, not a problem.
        obs.api_error = Some("timed out".into());
        let plan = decide(&policy(), &obs, &state, at(600));
        assert!(plan.nodes[1].healthy);
    }

    #[test]
    fn disk_pressure_replaces_a_worker_after_its_own_threshold() {
        let mut obs = cluster(1);
        if let Some(n) = obs.nodes[1].node.as_mut() {
            n.disk_pressure_since = Some(at(0));
        }
        let plan = decide(&policy(), &obs, &RepairState::default(), at(1799));
        assert!(matches!(plan.nodes[1].decision, Decision::Wait { .. }));
        let plan = decide(&policy(), &obs, &RepairState::default(), at(1800));
        assert_eq!(chosen(&plan), Some(("w-0", RepairAction::Replace)));
    }

    #[test]
    fn a_control_plane_stops_at_the_power_cycle() {
        let mut obs = cluster(1);
        obs.nodes[0].ssh = SshSeen::Unreachable {
            error: "timed out".into(),
        };
        obs.api_error = Some("no answer".into());
        let mut state = RepairState::default();
        state.unhealthy_since.insert("cp-0".into(), at(0));
        let plan = decide(&policy(), &obs, &state, at(600));
        assert_eq!(chosen(&plan), Some(("cp-0", RepairAction::PowerCycle)));
        state.push(record(
            "cp-0",
            RepairAction::PowerCycle,
            600,
            RepairOutcome::Succeeded,
        ));
        let plan = decide(&policy(), &obs, &state, at(1300));
        assert!(
            matches!(&plan.nodes[0].decision, Decision::LeftAlone { why } if why.contains("never replaced"))
        );
    }
}
