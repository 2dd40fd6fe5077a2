//! Auto-upgrade's decisions, pure over (policy from the spec, what the cluster runs, what is
//! available, now), tested with a fixed clock.
//!
//! - **What is due**: a node image built here after the one the cluster boots (same Debian
//!   suite, the newest by build time), and, for a cluster on a release channel, the newest
//!   Kubernetes release of its minor in the channel file (a patch upgrade), else the newest of
//!   the next minor (a minor upgrade; minors are never skipped). A release counts from the date
//!   it entered the channel.
//! - **When it may run** (GKE's rules): inside the recurring maintenance window (UTC; none
//!   means any time); never during an exclusion whose scope covers it (`NO_UPGRADES`: all;
//!   `NO_MINOR_UPGRADES`: Kubernetes minor upgrades; `NO_MINOR_OR_NODE_UPGRADES`: those and
//!   node upgrades); a new upgrade only once the last one has soaked (`autoUpgrade.soak`,
//!   24 h by default). An unfinished upgrade goes on in the next allowed time without a soak;
//!   one stopped by a failed health gate waits for a person.
//! - **How long it may run**: [`deadline`], the end of the window occurrence or the start of
//!   an exclusion, whichever comes first: the upgrade pauses at the next machine boundary
//!   after it and goes on in the next window.
//!
//! [`calendar`] plays the same rules forward (`clusterctl plan NAME --next 30d`): what would
//! upgrade when, and why not sooner.
//!
//! Kubernetes versions are decided and shown, not carried out: auto-upgrade rolls out node
//! images only so far, and a channel cluster's version is not upgraded yet ([`Kind::carried_out`]).

use serde::Serialize;

use crate::bundle::KubeVersion;
use crate::spec::{self, ExclusionScope, Frequency, MaintenancePolicy, Recurrence, ReleaseChannel};
use crate::state::Timestamp;

const DAY: i64 = 86_400;

/// A recurring maintenance window in UTC: occurrences last `length` seconds and start at
/// `start`'s time of day on the days `recurrence` names, from `start`'s day on (that day too
/// only if the rule names it, as RFC 5545 counts a DTSTART that does not match its rule).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Window {
    /// First start, Unix seconds.
    pub start: i64,
    /// Length of each occurrence, seconds.
    pub length: i64,
    /// Which days.
    pub recurrence: Recurrence,
}

/// Day index (days since 1970-01-01, UTC) of `t`.
fn day_of(t: i64) -> i64 {
    t.div_euclid(DAY)
}

/// Monday = 0 (1970-01-01 was a Thursday).
fn weekday(day: i64) -> i64 {
    (day + 3).rem_euclid(7)
}

/// Weeks starting on Monday (RFC 5545's default WKST).
fn week(day: i64) -> i64 {
    (day + 3).div_euclid(7)
}

/// (months since year 0, day of month) of a day index.
fn month_and_day(day: i64) -> (i64, u32) {
    use chrono::Datelike as _;
    let date = chrono::DateTime::from_timestamp(day * DAY, 0)
        .unwrap_or_default()
        .date_naive();
    (
        i64::from(date.year()) * 12 + i64::from(date.month0()),
        date.day(),
    )
}

impl Window {
    /// The window a spec's maintenance policy describes.
    pub fn from_spec(w: &spec::MaintenanceWindow) -> Option<Window> {
        let length = i64::try_from(w.length()?.as_secs()).ok()?;
        Some(Window {
            start: w.start_time.unix_seconds(),
            length,
            recurrence: w.recurrence.clone(),
        })
    }

    /// Whether an occurrence starts on `day`.
    fn occurs_on(&self, day: i64) -> bool {
        let first = day_of(self.start);
        if day < first {
            return false;
        }
        let interval = i64::from(self.recurrence.interval.max(1));
        match self.recurrence.freq {
            Frequency::Daily => (day - first) % interval == 0,
            Frequency::Weekly => {
                let on_day = if self.recurrence.by_day.is_empty() {
                    weekday(day) == weekday(first)
                } else {
                    self.recurrence
                        .by_day
                        .iter()
                        .any(|d| *d as i64 == weekday(day))
                };
                on_day && (week(day) - week(first)) % interval == 0
            }
            Frequency::Monthly => {
                let ((m, dom), (m0, dom0)) = (month_and_day(day), month_and_day(first));
                let on_day = if self.recurrence.by_month_day.is_empty() {
                    dom == dom0
                } else {
                    self.recurrence
                        .by_month_day
                        .iter()
                        .any(|d| u32::from(*d) == dom)
                };
                on_day && (m - m0) % interval == 0
            }
        }
    }

    fn start_on(&self, day: i64) -> i64 {
        day * DAY + self.start.rem_euclid(DAY)
    }

    /// The occurrence `[start, end)` that contains `t`, if any.
    pub fn containing(&self, t: i64) -> Option<(i64, i64)> {
        let back = self.length.div_euclid(DAY) + 1;
        (day_of(t) - back..=day_of(t))
            .rev()
            .filter(|d| self.occurs_on(*d))
            .map(|d| (self.start_on(d), self.start_on(d) + self.length))
            .find(|(s, e)| *s <= t && t < *e)
    }

    /// The first occurrence start at or after `t` (looking 5 years ahead).
    pub fn next_start(&self, t: i64) -> Option<i64> {
        (day_of(t) - 1..day_of(t) + 5 * 366)
            .filter(|d| self.occurs_on(*d))
            .map(|d| self.start_on(d))
            .find(|s| *s >= t)
    }
}

/// What an upgrade changes, for the exclusion scopes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Kind {
    /// A new node image (the nodes' OS).
    NodeImage,
    /// A Kubernetes patch release of the same minor.
    KubernetesPatch,
    /// The next Kubernetes minor release.
    KubernetesMinor,
}

impl Kind {
    /// Whether an exclusion of `scope` holds this kind.
    pub fn held_by(self, scope: ExclusionScope) -> bool {
        match scope {
            ExclusionScope::NoUpgrades => true,
            ExclusionScope::NoMinorUpgrades => self == Kind::KubernetesMinor,
            ExclusionScope::NoMinorOrNodeUpgrades => self != Kind::KubernetesPatch,
        }
    }

    /// Whether clusterctl carries this kind out (node images only so far).
    pub fn carried_out(self) -> bool {
        self == Kind::NodeImage
    }

    fn describe(self) -> &'static str {
        match self {
            Kind::NodeImage => "node image",
            Kind::KubernetesPatch => "Kubernetes patch",
            Kind::KubernetesMinor => "Kubernetes minor",
        }
    }
}

/// A maintenance exclusion.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Exclusion {
    /// Its name.
    pub name: String,
    /// Start, Unix seconds.
    pub start: i64,
    /// End (exclusive), Unix seconds.
    pub end: i64,
    /// What it holds.
    pub scope: ExclusionScope,
}

/// The auto-upgrade settings of a cluster (`spec.autoUpgrade`, `spec.kubernetes.channel`,
/// `spec.maintenancePolicy`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Policy {
    /// `autoUpgrade.enabled`.
    pub enabled: bool,
    /// The release channel followed, if any.
    pub channel: Option<ReleaseChannel>,
    /// The recurring window; `None`: any time.
    pub window: Option<Window>,
    /// Exclusions.
    pub exclusions: Vec<Exclusion>,
    /// Minimum time between the end of an upgrade and the start of the next automatic one.
    pub soak: i64,
}

impl Policy {
    /// The policy a spec asks for.
    pub fn from_spec(s: &spec::ClusterSpec) -> Policy {
        let m: &MaintenancePolicy = &s.maintenance_policy;
        Policy {
            enabled: s.auto_upgrade.enabled,
            channel: s.kubernetes.channel,
            window: m.window.as_ref().and_then(Window::from_spec),
            exclusions: m
                .exclusions
                .iter()
                .map(|e| Exclusion {
                    name: e.name.clone(),
                    start: e.start_time.unix_seconds(),
                    end: e.end_time.unix_seconds(),
                    scope: e.scope,
                })
                .collect(),
            soak: i64::try_from(s.auto_upgrade.soak.as_secs()).unwrap_or(i64::MAX),
        }
    }
}

/// A node image as auto-upgrade sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageSeen {
    /// Version.
    pub version: String,
    /// Debian suite.
    pub suite: String,
    /// Build time, Unix seconds.
    pub created: i64,
}

/// One release in a channel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Release {
    /// The version.
    pub version: KubeVersion,
    /// When it entered the channel, Unix seconds.
    pub since: i64,
}

/// What the cluster runs and what happened to it.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Observed {
    /// Its Kubernetes version.
    pub kubernetes: Option<KubeVersion>,
    /// The node image it boots.
    pub node_image: Option<ImageSeen>,
    /// An unfinished upgrade: its target, and why it stopped if it did.
    pub unfinished: Option<(String, Option<String>)>,
    /// When the last upgrade (by hand or automatic) finished, Unix seconds.
    pub last_upgrade: Option<i64>,
    /// Node images an upgrade was rolled back from: never candidates.
    pub rejected: Vec<String>,
}

/// What could be upgraded to.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Available {
    /// Node images built here.
    pub images: Vec<ImageSeen>,
    /// The releases of the cluster's channel (from the channel file).
    pub releases: Vec<Release>,
}

/// An upgrade that could be made.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Candidate {
    /// What it changes.
    pub kind: Kind,
    /// The version (node image or Kubernetes) it goes to.
    pub to: String,
    /// When it became available (built, or entered the channel), Unix seconds.
    #[serde(skip)]
    pub since: i64,
}

impl Candidate {
    /// `node image X` / `Kubernetes patch 1.20.3`.
    pub fn describe(&self) -> String {
        format!("{} {}", self.kind.describe(), self.to)
    }
}

/// Why an upgrade waits.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase", tag = "reason")]
pub enum Hold {
    /// Outside the maintenance window, until its next start.
    Window {
        /// Next start.
        #[serde(serialize_with = "unix")]
        until: i64,
    },
    /// An exclusion covers it.
    Exclusion {
        /// Its name.
        name: String,
        /// Its scope.
        scope: ExclusionScope,
        /// Its end.
        #[serde(serialize_with = "unix")]
        until: i64,
    },
    /// The last upgrade has not soaked yet.
    Soak {
        /// When it has.
        #[serde(serialize_with = "unix")]
        until: i64,
    },
    /// Not available yet (a release enters the channel later).
    NotYet {
        /// When it is.
        #[serde(serialize_with = "unix")]
        until: i64,
    },
}

fn unix<S: serde::Serializer>(t: &i64, s: S) -> Result<S::Ok, S::Error> {
    Timestamp::from_unix(*t).serialize(s)
}

impl std::fmt::Display for Hold {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Hold::Window { until } => write!(
                f,
                "outside the maintenance window until {}",
                Timestamp::from_unix(*until)
            ),
            Hold::Exclusion { name, scope, until } => write!(
                f,
                "maintenance exclusion {name:?} ({}) until {}",
                scope_name(*scope),
                Timestamp::from_unix(*until)
            ),
            Hold::Soak { until } => write!(
                f,
                "the last upgrade soaks until {}",
                Timestamp::from_unix(*until)
            ),
            Hold::NotYet { until } => {
                write!(f, "enters the channel at {}", Timestamp::from_unix(*until))
            }
        }
    }
}

fn scope_name(s: ExclusionScope) -> &'static str {
    match s {
        ExclusionScope::NoUpgrades => "NO_UPGRADES",
        ExclusionScope::NoMinorUpgrades => "NO_MINOR_UPGRADES",
        ExclusionScope::NoMinorOrNodeUpgrades => "NO_MINOR_OR_NODE_UPGRADES",
    }
}

/// The upgrades available at `at`: the newest newer node image of the same suite, and the
/// Kubernetes release the channel offers next. Pure.
pub fn candidates(
    policy: &Policy,
    observed: &Observed,
    available: &Available,
    at: i64,
) -> Vec<Candidate> {
    let mut out = Vec::new();
    if let Some(current) = &observed.node_image
        && let Some(newest) = available
            .images
            .iter()
            .filter(|i| {
                i.suite == current.suite
                    && i.created > current.created
                    && i.created <= at
                    && !observed.rejected.contains(&i.version)
            })
            .max_by(|a, b| (a.created, &a.version).cmp(&(b.created, &b.version)))
    {
        out.push(Candidate {
            kind: Kind::NodeImage,
            to: newest.version.clone(),
            since: newest.created,
        });
    }
    if policy.channel.is_some()
        && let Some(current) = observed.kubernetes
    {
        let entered: Vec<&Release> = available
            .releases
            .iter()
            .filter(|r| r.since <= at && r.version > current)
            .collect();
        let newest_of = |minor: u32| {
            entered
                .iter()
                .filter(|r| r.version.major == current.major && r.version.minor == minor)
                .max_by_key(|r| r.version)
        };
        let pick = newest_of(current.minor)
            .map(|r| (Kind::KubernetesPatch, r))
            .or_else(|| newest_of(current.minor + 1).map(|r| (Kind::KubernetesMinor, r)));
        if let Some((kind, r)) = pick {
            out.push(Candidate {
                kind,
                to: r.version.to_string(),
                since: r.since,
            });
        }
    }
    out
}

/// The earliest time at or after `from` at which an upgrade of `kind` may run, and what holds
/// it until then, in the order met. `soak_from`: when the soak started (`None`: no soak, an
/// unfinished upgrade going on). Pure.
pub fn allowed_from(
    policy: &Policy,
    kind: Kind,
    from: i64,
    soak_from: Option<i64>,
) -> (i64, Vec<Hold>) {
    let mut t = from;
    let mut holds: Vec<Hold> = Vec::new();
    // Each step moves t forward; a bounded loop guards against a pathological policy.
    for _ in 0..256 {
        if let Some(s) = soak_from
            && t < s.saturating_add(policy.soak)
        {
            t = s.saturating_add(policy.soak);
            holds.push(Hold::Soak { until: t });
            continue;
        }
        if let Some(x) = policy
            .exclusions
            .iter()
            .filter(|x| x.start <= t && t < x.end && kind.held_by(x.scope))
            .max_by_key(|x| x.end)
        {
            t = x.end;
            holds.push(Hold::Exclusion {
                name: x.name.clone(),
                scope: x.scope,
                until: x.end,
            });
            continue;
        }
        if let Some(w) = &policy.window
            && w.containing(t).is_none()
        {
            match w.next_start(t) {
                Some(n) => {
                    t = n;
                    holds.push(Hold::Window { until: n });
                    continue;
                }
                None => return (i64::MAX, holds),
            }
        }
        return (t, holds);
    }
    (i64::MAX, holds)
}

/// Until when an upgrade of `kind` that may run at `now` may go on: the end of the window
/// occurrence, or the start of the next exclusion holding it, whichever comes first (`None`:
/// no end). Pure.
pub fn deadline(policy: &Policy, kind: Kind, now: i64) -> Option<i64> {
    let window_end = policy
        .window
        .as_ref()
        .and_then(|w| w.containing(now))
        .map(|(_, e)| e);
    let next_exclusion = policy
        .exclusions
        .iter()
        .filter(|x| x.start > now && kind.held_by(x.scope))
        .map(|x| x.start)
        .min();
    match (window_end, next_exclusion) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

/// What one `upgrade --auto` run does.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase", tag = "decision")]
pub enum Decision {
    /// `autoUpgrade.enabled` is false.
    Off,
    /// Nothing to do (a Kubernetes release the channel offers is listed in `pending`).
    UpToDate,
    /// An upgrade stopped by a failure waits for a person.
    Stopped {
        /// Its target.
        to: String,
        /// Why it stopped.
        reason: String,
    },
    /// Go on with the unfinished upgrade, until `until`.
    Continue {
        /// Its target.
        to: String,
        /// When to pause (window end or exclusion start), Unix seconds.
        #[serde(skip_serializing_if = "Option::is_none", serialize_with = "opt_unix")]
        until: Option<i64>,
    },
    /// Start this upgrade, until `until`.
    Start {
        /// The upgrade.
        candidate: Candidate,
        /// When to pause, Unix seconds.
        #[serde(skip_serializing_if = "Option::is_none", serialize_with = "opt_unix")]
        until: Option<i64>,
    },
    /// An upgrade (or the unfinished one, `candidate: None`) is due but held.
    Wait {
        /// The upgrade held; `None`: the unfinished one.
        #[serde(skip_serializing_if = "Option::is_none")]
        candidate: Option<Candidate>,
        /// When it may run (`None`: never, e.g. a window that does not recur).
        #[serde(skip_serializing_if = "Option::is_none", serialize_with = "opt_unix")]
        at: Option<i64>,
        /// What holds it.
        holds: Vec<Hold>,
    },
}

fn opt_unix<S: serde::Serializer>(t: &Option<i64>, s: S) -> Result<S::Ok, S::Error> {
    t.map(Timestamp::from_unix).serialize(s)
}

/// Auto-upgrade's decision for one run, and the upgrades due that clusterctl does not carry
/// out (Kubernetes releases of the channel). Pure.
pub fn decide(
    policy: &Policy,
    observed: &Observed,
    available: &Available,
    now: i64,
) -> (Decision, Vec<Candidate>) {
    let all = candidates(policy, observed, available, now);
    let (ours, pending): (Vec<Candidate>, Vec<Candidate>) =
        all.into_iter().partition(|c| c.kind.carried_out());
    if !policy.enabled {
        return (Decision::Off, pending);
    }
    if let Some((to, stopped)) = &observed.unfinished {
        if let Some(reason) = stopped {
            return (
                Decision::Stopped {
                    to: to.clone(),
                    reason: reason.clone(),
                },
                pending,
            );
        }
        let (at, holds) = allowed_from(policy, Kind::NodeImage, now, None);
        return if holds.is_empty() {
            (
                Decision::Continue {
                    to: to.clone(),
                    until: deadline(policy, Kind::NodeImage, now),
                },
                pending,
            )
        } else {
            (
                Decision::Wait {
                    candidate: None,
                    at: (at != i64::MAX).then_some(at),
                    holds,
                },
                pending,
            )
        };
    }
    let Some(candidate) = ours.into_iter().next() else {
        return (Decision::UpToDate, pending);
    };
    let (at, holds) = allowed_from(policy, candidate.kind, now, observed.last_upgrade);
    if holds.is_empty() {
        let until = deadline(policy, candidate.kind, now);
        (Decision::Start { candidate, until }, pending)
    } else {
        (
            Decision::Wait {
                candidate: Some(candidate),
                at: (at != i64::MAX).then_some(at),
                holds,
            },
            pending,
        )
    }
}

/// One line of the forward calendar.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Planned {
    /// When it would start.
    pub at: Timestamp,
    /// The upgrade (`None`: the unfinished one goes on).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub candidate: Option<Candidate>,
    /// Why not sooner, in the order met.
    pub held_by: Vec<Hold>,
    /// Whether clusterctl would carry it out (false: a Kubernetes release, shown only).
    pub carried_out: bool,
}

/// The forward calendar from `now` to `now + horizon`: the same rules as [`decide`] played
/// forward, each upgrade assumed to take `duration` seconds (its soak starts after it): the
/// unfinished upgrade going on, each node image in turn, and the next Kubernetes release of the
/// channel where it would be due (shown, not carried out). Pure.
pub fn calendar(
    policy: &Policy,
    observed: &Observed,
    available: &Available,
    now: i64,
    horizon: i64,
    duration: i64,
) -> Vec<Planned> {
    let end = now.saturating_add(horizon);
    let mut out = Vec::new();
    if !policy.enabled {
        return out;
    }
    let mut sim = observed.clone();
    let mut t = now;
    if let Some((to, stopped)) = &observed.unfinished {
        if stopped.is_some() {
            return out;
        }
        let (at, held_by) = allowed_from(policy, Kind::NodeImage, t, None);
        if at > end {
            return out;
        }
        out.push(Planned {
            at: Timestamp::from_unix(at),
            candidate: None,
            held_by,
            carried_out: true,
        });
        if let Some(image) = available.images.iter().find(|i| &i.version == to) {
            sim.node_image = Some(image.clone());
        }
        sim.unfinished = None;
        sim.last_upgrade = Some(at.saturating_add(duration));
        t = at.saturating_add(duration);
    }
    for _ in 0..64 {
        let Some((at, c, held_by)) = next_due(policy, &sim, available, t, true) else {
            break;
        };
        if at > end {
            break;
        }
        if let Some(image) = available.images.iter().find(|i| i.version == c.to) {
            sim.node_image = Some(image.clone());
        }
        sim.last_upgrade = Some(at.saturating_add(duration));
        t = at.saturating_add(duration);
        out.push(Planned {
            at: Timestamp::from_unix(at),
            candidate: Some(c),
            held_by,
            carried_out: true,
        });
    }
    if let Some((at, c, held_by)) = next_due(policy, observed, available, now, false)
        && at <= end
    {
        out.push(Planned {
            at: Timestamp::from_unix(at),
            candidate: Some(c),
            held_by,
            carried_out: false,
        });
    }
    out.sort_by_key(|p| p.at.unix_seconds());
    out
}

/// The next node image (`node`) or Kubernetes release upgrade due at or after `from`: when,
/// which (as available then), and what holds it until then.
fn next_due(
    policy: &Policy,
    sim: &Observed,
    available: &Available,
    from: i64,
    node: bool,
) -> Option<(i64, Candidate, Vec<Hold>)> {
    let group = |at: i64| {
        candidates(policy, sim, available, at)
            .into_iter()
            .find(|c| (c.kind == Kind::NodeImage) == node)
    };
    let mut holds = Vec::new();
    let start = if group(from).is_some() {
        from
    } else {
        // The first time one becomes available.
        let mut arrivals: Vec<i64> = available
            .images
            .iter()
            .map(|i| i.created)
            .chain(available.releases.iter().map(|r| r.since))
            .filter(|s| *s > from)
            .collect();
        arrivals.sort_unstable();
        let s = arrivals.into_iter().find(|s| group(*s).is_some())?;
        holds.push(Hold::NotYet { until: s });
        s
    };
    let kind = group(start)?.kind;
    let (at, more) = allowed_from(policy, kind, start, sim.last_upgrade);
    if at == i64::MAX {
        return None;
    }
    holds.extend(more);
    Some((at, group(at)?, holds))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(s: &str) -> i64 {
        s.parse::<spec::Timestamp>().unwrap().unix_seconds()
    }

    fn window(start: &str, hours: i64, rule: &str) -> Window {
        Window {
            start: t(start),
            length: hours * 3600,
            recurrence: rule.parse().unwrap(),
        }
    }

    fn policy() -> Policy {
        Policy {
            enabled: true,
            channel: None,
            window: None,
            exclusions: Vec::new(),
            soak: DAY,
        }
    }

    fn image(v: &str, created: &str) -> ImageSeen {
        ImageSeen {
            version: v.into(),
            suite: "bookworm".into(),
            created: t(created),
        }
    }

    fn kv(s: &str) -> KubeVersion {
        s.parse().unwrap()
    }

    fn observed() -> Observed {
        Observed {
            kubernetes: Some(kv("1.20.2")),
            node_image: Some(image("v1", "2026-11-01T00:00:00Z")),
            unfinished: None,
            last_upgrade: None,
            rejected: Vec::new(),
        }
    }

    fn available() -> Available {
        Available {
            images: vec![
                image("v0", "2026-10-01T00:00:00Z"),
                image("v1", "2026-11-01T00:00:00Z"),
                image("v2", "2026-11-20T00:00:00Z"),
            ],
            releases: Vec::new(),
        }
    }

    #[test]
    fn weekly_window_edges_and_recurrence() {
        // Saturdays and Sundays, 02:00-06:00 UTC, from Saturday 2026-11-07.
        let w = window("2026-11-07T02:00:00Z", 4, "FREQ=WEEKLY;BYDAY=SA,SU");
        assert_eq!(
            w.containing(t("2026-11-14T02:00:00Z")),
            Some((t("2026-11-14T02:00:00Z"), t("2026-11-14T06:00:00Z")))
        );
        assert_eq!(w.containing(t("2026-11-14T01:59:59Z")), None);
        // The end is exclusive.
        assert_eq!(w.containing(t("2026-11-15T06:00:00Z")), None);
        assert!(w.containing(t("2026-11-15T05:59:59Z")).is_some());
        // Not on a weekday, and never before the first start.
        assert_eq!(w.containing(t("2026-11-18T03:00:00Z")), None);
        assert_eq!(w.containing(t("2026-11-01T03:00:00Z")), None);
        assert_eq!(
            w.next_start(t("2026-11-16T00:00:00Z")),
            Some(t("2026-11-21T02:00:00Z"))
        );
        assert_eq!(
            w.next_start(t("2026-11-21T02:00:00Z")),
            Some(t("2026-11-21T02:00:00Z"))
        );
        assert_eq!(
            w.next_start(t("2026-11-01T00:00:00Z")),
            Some(t("2026-11-07T02:00:00Z"))
        );
        // Every other week (weeks start on Monday).
        let w = window(
            "2026-11-07T02:00:00Z",
            4,
            "FREQ=WEEKLY;INTERVAL=2;BYDAY=SA,SU",
        );
        assert_eq!(
            w.next_start(t("2026-11-09T00:00:00Z")),
            Some(t("2026-11-21T02:00:00Z"))
        );
        assert!(w.containing(t("2026-11-22T03:00:00Z")).is_some());
        assert!(w.containing(t("2026-11-14T03:00:00Z")).is_none());
    }

    #[test]
    fn daily_monthly_and_overnight_windows() {
        // 22:00 for 4 h: an occurrence spans midnight.
        let w = window("2026-11-01T22:00:00Z", 4, "FREQ=DAILY");
        assert_eq!(
            w.containing(t("2026-11-10T01:00:00Z")),
            Some((t("2026-11-09T22:00:00Z"), t("2026-11-10T02:00:00Z")))
        );
        assert_eq!(
            w.next_start(t("2026-11-10T03:00:00Z")),
            Some(t("2026-11-10T22:00:00Z"))
        );
        let w = window("2026-11-01T22:00:00Z", 4, "FREQ=DAILY;INTERVAL=3");
        assert_eq!(
            w.next_start(t("2026-11-02T00:00:00Z")),
            Some(t("2026-11-04T22:00:00Z"))
        );
        // The 1st and 15th of each month.
        let w = window("2026-11-01T03:00:00Z", 2, "FREQ=MONTHLY;BYMONTHDAY=1,15");
        assert_eq!(
            w.next_start(t("2026-11-02T00:00:00Z")),
            Some(t("2026-11-15T03:00:00Z"))
        );
        assert_eq!(
            w.next_start(t("2026-11-16T00:00:00Z")),
            Some(t("2026-12-01T03:00:00Z"))
        );
        // Across a year.
        assert_eq!(
            w.next_start(t("2026-12-16T00:00:00Z")),
            Some(t("2027-01-01T03:00:00Z"))
        );
    }

    #[test]
    fn exclusion_scopes() {
        use ExclusionScope::*;
        assert!(Kind::NodeImage.held_by(NoUpgrades));
        assert!(!Kind::NodeImage.held_by(NoMinorUpgrades));
        assert!(Kind::NodeImage.held_by(NoMinorOrNodeUpgrades));
        assert!(Kind::KubernetesMinor.held_by(NoMinorUpgrades));
        assert!(!Kind::KubernetesPatch.held_by(NoMinorOrNodeUpgrades));
        assert!(Kind::KubernetesPatch.held_by(NoUpgrades));
    }

    #[test]
    fn a_newer_image_starts_at_once_without_window_or_soak() {
        let now = t("2026-12-01T10:00:00Z");
        let (d, pending) = decide(&policy(), &observed(), &available(), now);
        assert_eq!(
            d,
            Decision::Start {
                candidate: Candidate {
                    kind: Kind::NodeImage,
                    to: "v2".into(),
                    since: t("2026-11-20T00:00:00Z"),
                },
                until: None,
            }
        );
        assert!(pending.is_empty());
        // Off: nothing, whatever is due.
        let mut off = policy();
        off.enabled = false;
        assert_eq!(
            decide(&off, &observed(), &available(), now).0,
            Decision::Off
        );
        // An image of another suite, or older, is no candidate.
        let mut seen = observed();
        seen.node_image = Some(image("v2", "2026-11-20T00:00:00Z"));
        let mut other = available();
        other.images.push(ImageSeen {
            suite: "trixie".into(),
            ..image("t1", "2026-11-25T00:00:00Z")
        });
        assert_eq!(decide(&policy(), &seen, &other, now).0, Decision::UpToDate);
        // An image an upgrade was rolled back from is not rolled out again; an older one is
        // not offered instead either.
        let mut back = observed();
        back.rejected = vec!["v2".into()];
        assert_eq!(
            decide(&policy(), &back, &available(), now).0,
            Decision::UpToDate
        );
    }

    #[test]
    fn window_exclusions_and_soak_hold_a_start_and_say_until_when() {
        let now = t("2026-12-02T10:00:00Z"); // a Wednesday
        let mut p = policy();
        p.window = Some(window("2026-11-07T02:00:00Z", 4, "FREQ=WEEKLY;BYDAY=SA,SU"));
        let (d, _) = decide(&p, &observed(), &available(), now);
        let Decision::Wait { at, holds, .. } = d else {
            panic!("{d:?}")
        };
        assert_eq!(at, Some(t("2026-12-05T02:00:00Z")));
        assert_eq!(
            holds,
            [Hold::Window {
                until: t("2026-12-05T02:00:00Z")
            }]
        );
        // Inside the window it starts, and runs until the window's end.
        let (d, _) = decide(&p, &observed(), &available(), t("2026-12-05T03:00:00Z"));
        assert!(
            matches!(d, Decision::Start { until: Some(u), .. } if u == t("2026-12-05T06:00:00Z")),
            "{d:?}"
        );
        // An exclusion over that weekend (overlapping another one): the next weekend after both.
        p.exclusions = vec![
            Exclusion {
                name: "freeze".into(),
                start: t("2026-12-04T00:00:00Z"),
                end: t("2026-12-06T00:00:00Z"),
                scope: ExclusionScope::NoUpgrades,
            },
            Exclusion {
                name: "launch".into(),
                start: t("2026-12-05T12:00:00Z"),
                end: t("2026-12-07T00:00:00Z"),
                scope: ExclusionScope::NoMinorOrNodeUpgrades,
            },
            // Does not hold node images.
            Exclusion {
                name: "minor-freeze".into(),
                start: t("2026-12-01T00:00:00Z"),
                end: t("2027-01-01T00:00:00Z"),
                scope: ExclusionScope::NoMinorUpgrades,
            },
        ];
        let (d, _) = decide(&p, &observed(), &available(), now);
        let Decision::Wait { at, holds, .. } = d else {
            panic!("{d:?}")
        };
        assert_eq!(at, Some(t("2026-12-12T02:00:00Z")), "{holds:?}");
        assert_eq!(
            holds,
            [
                Hold::Window {
                    until: t("2026-12-05T02:00:00Z")
                },
                Hold::Exclusion {
                    name: "freeze".into(),
                    scope: ExclusionScope::NoUpgrades,
                    until: t("2026-12-06T00:00:00Z")
                },
                Hold::Exclusion {
                    name: "launch".into(),
                    scope: ExclusionScope::NoMinorOrNodeUpgrades,
                    until: t("2026-12-07T00:00:00Z")
                },
                Hold::Window {
                    until: t("2026-12-12T02:00:00Z")
                },
            ]
        );
        // Started inside a window, an exclusion beginning before its end is the deadline.
        let mut q = policy();
        q.window = Some(window("2026-11-07T02:00:00Z", 4, "FREQ=WEEKLY;BYDAY=SA,SU"));
        q.exclusions = vec![Exclusion {
            name: "x".into(),
            start: t("2026-12-05T04:00:00Z"),
            end: t("2026-12-05T08:00:00Z"),
            scope: ExclusionScope::NoUpgrades,
        }];
        assert_eq!(
            deadline(&q, Kind::NodeImage, t("2026-12-05T03:00:00Z")),
            Some(t("2026-12-05T04:00:00Z"))
        );
        // Soak: an upgrade finished 2 h ago holds the next one 22 h more.
        let mut seen = observed();
        seen.last_upgrade = Some(now - 7200);
        let (d, _) = decide(&policy(), &seen, &available(), now);
        assert_eq!(
            d,
            Decision::Wait {
                candidate: Some(Candidate {
                    kind: Kind::NodeImage,
                    to: "v2".into(),
                    since: t("2026-11-20T00:00:00Z")
                }),
                at: Some(now + 22 * 3600),
                holds: vec![Hold::Soak {
                    until: now + 22 * 3600
                }],
            }
        );
    }

    #[test]
    fn an_unfinished_upgrade_goes_on_in_the_window_without_soak_and_a_stopped_one_waits_for_a_person()
     {
        let mut seen = observed();
        seen.unfinished = Some(("v2".into(), None));
        seen.last_upgrade = Some(t("2026-12-05T01:00:00Z"));
        let mut p = policy();
        p.window = Some(window("2026-11-07T02:00:00Z", 4, "FREQ=WEEKLY;BYDAY=SA,SU"));
        let (d, _) = decide(&p, &seen, &available(), t("2026-12-05T05:00:00Z"));
        assert_eq!(
            d,
            Decision::Continue {
                to: "v2".into(),
                until: Some(t("2026-12-05T06:00:00Z"))
            }
        );
        // Overrun: after the window's end it waits for the next occurrence.
        let (d, _) = decide(&p, &seen, &available(), t("2026-12-05T06:00:00Z"));
        assert_eq!(
            d,
            Decision::Wait {
                candidate: None,
                at: Some(t("2026-12-06T02:00:00Z")),
                holds: vec![Hold::Window {
                    until: t("2026-12-06T02:00:00Z")
                }]
            }
        );
        seen.unfinished = Some(("v2".into(), Some("node c1-cp-0 failed its gate".into())));
        assert!(matches!(
            decide(&p, &seen, &available(), t("2026-12-05T05:00:00Z")).0,
            Decision::Stopped { .. }
        ));
    }

    fn releases() -> Vec<Release> {
        vec![
            Release {
                version: kv("1.20.2"),
                since: t("2021-01-20T00:00:00Z"),
            },
            Release {
                version: kv("1.20.3"),
                since: t("2026-11-01T00:00:00Z"),
            },
            Release {
                version: kv("1.20.4"),
                since: t("2026-12-10T00:00:00Z"),
            },
            Release {
                version: kv("1.21.1"),
                since: t("2026-11-01T00:00:00Z"),
            },
            Release {
                version: kv("1.22.0"),
                since: t("2026-11-01T00:00:00Z"),
            },
        ]
    }

    #[test]
    fn channel_releases_patch_first_never_skip_a_minor_and_are_only_pending() {
        let mut p = policy();
        p.channel = Some(ReleaseChannel::Regular);
        let mut av = available();
        av.releases = releases();
        let now = t("2026-12-02T10:00:00Z");
        // 1.20.3 is the newest patch entered; 1.20.4 enters later; 1.21 waits for the patches.
        let c = candidates(&p, &observed(), &av, now);
        assert_eq!(c[1].kind, Kind::KubernetesPatch);
        assert_eq!(c[1].to, "1.20.3");
        let mut seen = observed();
        seen.kubernetes = Some(kv("1.20.4"));
        let c = candidates(&p, &seen, &av, now);
        assert_eq!(
            (c[1].kind, c[1].to.as_str()),
            (Kind::KubernetesMinor, "1.21.1")
        );
        // Not carried out: the node image is decided, the release reported.
        let (d, pending) = decide(&p, &observed(), &av, now);
        assert!(matches!(d, Decision::Start { .. }), "{d:?}");
        assert_eq!(pending.len(), 1);
        // Without a channel, no Kubernetes candidate.
        p.channel = None;
        assert_eq!(candidates(&p, &observed(), &av, now).len(), 1);
    }

    #[test]
    fn calendar_plays_the_rules_forward() {
        let mut p = policy();
        p.channel = Some(ReleaseChannel::Regular);
        p.window = Some(window("2026-11-07T02:00:00Z", 4, "FREQ=WEEKLY;BYDAY=SA,SU"));
        p.exclusions = vec![Exclusion {
            name: "freeze".into(),
            start: t("2026-12-04T00:00:00Z"),
            end: t("2026-12-07T00:00:00Z"),
            scope: ExclusionScope::NoUpgrades,
        }];
        let mut av = available();
        av.releases = releases();
        // A third image built later: it waits for the soak after v2.
        av.images.push(image("v3", "2026-12-12T03:00:00Z"));
        let now = t("2026-12-02T10:00:00Z");
        let cal = calendar(&p, &observed(), &av, now, 30 * DAY, 3600);
        let lines: Vec<(String, String, bool)> = cal
            .iter()
            .map(|e| {
                (
                    e.at.to_string(),
                    e.candidate
                        .as_ref()
                        .map_or("continue".into(), Candidate::describe),
                    e.carried_out,
                )
            })
            .collect();
        assert_eq!(
            lines,
            [
                ("2026-12-12T02:00:00Z".into(), "node image v2".into(), true),
                // The release due then: 1.20.4 entered on the 10th.
                (
                    "2026-12-12T02:00:00Z".into(),
                    "Kubernetes patch 1.20.4".into(),
                    false
                ),
                // v3 is built at 03:00 on the 12th; the soak after v2 (done at 03:00) ends on
                // the 13th at 03:00, inside Sunday's window.
                ("2026-12-13T03:00:00Z".into(), "node image v3".into(), true),
            ],
            "{cal:#?}"
        );
        assert!(cal[0].held_by.contains(&Hold::Exclusion {
            name: "freeze".into(),
            scope: ExclusionScope::NoUpgrades,
            until: t("2026-12-07T00:00:00Z")
        }));
        assert_eq!(
            cal[2].held_by,
            [Hold::Soak {
                until: t("2026-12-13T03:00:00Z")
            }]
        );
        // Off: an empty calendar.
        p.enabled = false;
        assert!(calendar(&p, &observed(), &av, now, 30 * DAY, 3600).is_empty());
    }
}
