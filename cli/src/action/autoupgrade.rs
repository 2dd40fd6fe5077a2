//! `clusterctl upgrade NAME --auto` (what the auto-upgrade schedule runs) and
//! `clusterctl plan NAME --next`: the inputs of [`engine::autoupgrade`](crate::engine::autoupgrade)
//! gathered from the record, the node images built here and the channel file, the decision, and
//! the node-image upgrade it asks for, carried out by [`super::upgrade`] one machine per run (or
//! all of them with `--wait`) and paused at the window's end.

use std::path::Path;

use anyhow::{Context as _, bail};
use serde::Deserialize;

use super::upgrade::{self, UpgradeOutcome, UpgradeRequest};
use super::{load_cluster, lock_cluster};
use crate::bundle::KubeVersion;
use crate::engine::Reporter;
use crate::engine::autoupgrade::{
    self, Available, Candidate, Decision, ImageSeen, Observed, Planned, Policy, Release,
};
use crate::spec::ReleaseChannel;
use crate::state::{AutoUpgradeRun, ClusterRecord, StateStore, Timestamp};

/// The channel file built into clusterctl.
pub const SHIPPED_CHANNELS: &str = include_str!("../../channels.yaml");

/// Environment variable naming another channel file (path or https URL).
pub const CHANNEL_FILE_ENV: &str = "CLUSTERCTL_CHANNEL_FILE";

/// How long the calendar assumes one machine's upgrade takes.
pub const ASSUMED_SECONDS_PER_MACHINE: i64 = 600;

/// A channel file.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ChannelFile {
    /// `clusterctl.io/v1alpha1`.
    pub api_version: String,
    /// `ReleaseChannels`.
    pub kind: String,
    /// Releases per channel.
    pub channels: Channels,
}

/// The three channels.
#[derive(Debug, Clone, PartialEq, Eq, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Channels {
    /// Rapid.
    #[serde(default)]
    pub rapid: Vec<ChannelRelease>,
    /// Regular.
    #[serde(default)]
    pub regular: Vec<ChannelRelease>,
    /// Stable.
    #[serde(default)]
    pub stable: Vec<ChannelRelease>,
}

/// One release of a channel.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChannelRelease {
    /// The Kubernetes version.
    pub version: KubeVersion,
    /// When it entered the channel (RFC 3339).
    pub since: crate::spec::Timestamp,
}

impl ChannelFile {
    /// Parses a channel file; `source` names it in errors.
    pub fn parse(text: &str, source: &str) -> anyhow::Result<ChannelFile> {
        let file: ChannelFile = serde_saphyr::from_str(text).with_context(|| {
            format!("reading the channel file {source}: expected apiVersion, kind: ReleaseChannels and channels.{{rapid,regular,stable}}[].{{version,since}}")
        })?;
        if file.api_version != "clusterctl.io/v1alpha1" || file.kind != "ReleaseChannels" {
            bail!(
                "the channel file {source} is {}/{}, not clusterctl.io/v1alpha1/ReleaseChannels",
                file.api_version,
                file.kind
            );
        }
        Ok(file)
    }

    /// The releases of `channel`.
    pub fn releases(&self, channel: ReleaseChannel) -> Vec<Release> {
        let list = match channel {
            ReleaseChannel::Rapid => &self.channels.rapid,
            ReleaseChannel::Regular => &self.channels.regular,
            ReleaseChannel::Stable => &self.channels.stable,
        };
        list.iter()
            .map(|r| Release {
                version: r.version,
                since: r.since.unix_seconds(),
            })
            .collect()
    }
}

/// The channel file to use: `explicit` (path or https URL), else `$CLUSTERCTL_CHANNEL_FILE`,
/// else the one built in.
pub fn channel_file(explicit: Option<&str>) -> anyhow::Result<ChannelFile> {
    let env = std::env::var(CHANNEL_FILE_ENV)
        .ok()
        .filter(|v| !v.is_empty());
    let Some(source) = explicit.map(str::to_owned).or(env) else {
        return ChannelFile::parse(SHIPPED_CHANNELS, "built into clusterctl");
    };
    let text = if source.starts_with("https://") || source.starts_with("http://") {
        let rt = super::runtime()?;
        rt.block_on(async {
            let resp = reqwest::Client::builder()
                .timeout(std::time::Duration::from_secs(30))
                .build()?
                .get(&source)
                .send()
                .await?
                .error_for_status()?;
            resp.text().await
        })
        .with_context(|| format!("downloading the channel file {source}"))?
    } else {
        std::fs::read_to_string(&source)
            .with_context(|| format!("reading the channel file {source}"))?
    };
    ChannelFile::parse(&text, &source)
}

/// What `upgrade --auto` is asked to do.
#[derive(Debug, Clone)]
pub struct AutoRequest {
    /// Run by the schedule (`--scheduled`): recorded as such.
    pub scheduled: bool,
    /// Carry the whole upgrade out in this run (still pausing at the window's end) and wait for
    /// the cluster lock; without it, one machine per run.
    pub wait: bool,
    /// Only decide and show.
    pub dry_run: bool,
    /// Another channel file.
    pub channel_file: Option<String>,
    /// Drain and gate settings of the upgrade.
    pub upgrade: UpgradeRequest,
}

/// What `upgrade --auto` decided and did.
#[derive(Debug)]
pub struct AutoOutcome {
    /// The decision.
    pub decision: Decision,
    /// Kubernetes releases due that clusterctl does not carry out.
    pub pending: Vec<Candidate>,
    /// The upgrade it ran, if any.
    pub ran: Option<UpgradeOutcome>,
    /// Things worth saying (an image no longer built here, ...).
    pub notes: Vec<String>,
}

/// The decision's inputs for `record` at the images in `image_dir` and the channel file
/// (`channel_file_arg`, read only for a cluster on a channel; unreadable, it is a note and no
/// Kubernetes release is due).
pub fn inputs(
    record: &ClusterRecord,
    image_dir: &Path,
    channel_file_arg: Option<&str>,
) -> (Policy, Observed, Available, Vec<String>) {
    let policy = Policy::from_spec(&record.spec.spec);
    let mut notes = Vec::new();
    let releases = match policy.channel {
        None => Vec::new(),
        Some(c) => match channel_file(channel_file_arg) {
            Ok(f) => f.releases(c),
            Err(e) => {
                notes.push(format!(
                    "no Kubernetes release is considered: {}",
                    crate::error::error_chain(e.as_ref())
                ));
                Vec::new()
            }
        },
    };
    let images: Vec<(String, ImageSeen)> = match nodeimage::list(image_dir) {
        Ok(list) => list
            .into_iter()
            .filter_map(|i| {
                let created = i.manifest.created.parse::<crate::spec::Timestamp>().ok()?;
                Some((
                    i.digest,
                    ImageSeen {
                        version: i.manifest.version,
                        suite: i.manifest.suite,
                        created: created.unix_seconds(),
                    },
                ))
            })
            .collect(),
        Err(e) => {
            notes.push(format!(
                "no node images could be listed in {}: {e}",
                image_dir.display()
            ));
            Vec::new()
        }
    };
    let node_image = record.node_image.as_ref().and_then(|p| {
        let found = images.iter().find(|(d, _)| *d == p.digest).map(|(_, i)| i.clone());
        if found.is_none() {
            notes.push(format!(
                "the node image the cluster boots ({}) is not built in {}: newer images cannot be compared with it",
                p.version,
                image_dir.display()
            ));
        }
        found
    });
    let observed = Observed {
        kubernetes: record
            .kubernetes
            .as_ref()
            .and_then(|k| k.version.parse::<KubeVersion>().ok()),
        node_image,
        unfinished: record
            .upgrade
            .as_ref()
            .map(|u| (u.to.version.clone(), u.stopped.clone())),
        last_upgrade: record
            .auto_upgrade
            .last_upgrade_finished
            .map(|t| t.unix_seconds()),
        rejected: record.auto_upgrade.rejected.clone(),
    };
    let available = Available {
        images: images.into_iter().map(|(_, i)| i).collect(),
        releases,
    };
    (policy, observed, available, notes)
}

/// Runs `clusterctl upgrade NAME --auto`.
pub fn auto_upgrade(
    store: &StateStore,
    name: &str,
    request: &AutoRequest,
    report: Reporter,
) -> anyhow::Result<AutoOutcome> {
    let record = load_cluster(store, name)?;
    if let Some(explicit) = &request.channel_file {
        // Asked for by name: a file that cannot be read is an error, not a note.
        channel_file(Some(explicit))?;
    }
    let image_dir = nodeimage::default_image_dir();
    let (policy, observed, available, notes) =
        inputs(&record, &image_dir, request.channel_file.as_deref());
    let now = Timestamp::now();
    let (decision, pending) =
        autoupgrade::decide(&policy, &observed, &available, now.unix_seconds());
    let mut outcome = AutoOutcome {
        decision: decision.clone(),
        pending,
        ran: None,
        notes,
    };
    if request.dry_run {
        return Ok(outcome);
    }
    let (to, until) = match &decision {
        Decision::Continue { to, until } => (to.clone(), *until),
        Decision::Start { candidate, until } => (candidate.to.clone(), *until),
        _ => {
            record_run(store, name, request, &summary(&outcome), report);
            return Ok(outcome);
        }
    };
    report.phase(&format!(
        "Auto-upgrade of cluster {name:?}: {}",
        match &decision {
            Decision::Continue { .. } => format!("going on with the upgrade to node image {to}"),
            _ => format!("upgrading to node image {to}"),
        }
    ));
    let mut up = request.upgrade.clone();
    up.node_image = Some(to);
    up.automatic = true;
    up.wait_lock = request.wait;
    up.max_replacements = if request.wait { None } else { Some(1) };
    up.deadline = until.map(Timestamp::from_unix);
    up.dry_run = false;
    let result = upgrade::upgrade(store, name, &up, report);
    match result {
        Ok(ran) => {
            outcome.ran = Some(ran);
            record_run(store, name, request, &summary(&outcome), report);
            Ok(outcome)
        }
        Err(e) => {
            let line = format!("failed: {}", crate::error::error_chain(e.as_ref()));
            // A run that found the cluster locked changed nothing worth recording.
            if !is_locked(&e) {
                record_run(store, name, request, &line, report);
            }
            Err(e)
        }
    }
}

fn is_locked(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        matches!(
            c.downcast_ref::<crate::state::StateError>(),
            Some(crate::state::StateError::Locked { .. })
        )
    })
}

/// One line saying what a run decided and did.
pub fn summary(o: &AutoOutcome) -> String {
    let mut s = match (&o.decision, &o.ran) {
        (Decision::Off, _) => "auto-upgrade is off".to_owned(),
        (Decision::UpToDate, _) => "up to date".to_owned(),
        (Decision::Stopped { to, reason }, _) => {
            format!("the upgrade to node image {to} stopped ({reason}); it waits for a person")
        }
        (
            Decision::Wait {
                candidate,
                at,
                holds,
            },
            _,
        ) => format!(
            "{} waits: {}{}",
            candidate
                .as_ref()
                .map_or("the unfinished upgrade".to_owned(), Candidate::describe),
            holds
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join("; then "),
            at.map(|a| format!("; next chance {}", Timestamp::from_unix(a)))
                .unwrap_or_default()
        ),
        (_, Some(UpgradeOutcome::Paused { plan, nodes, why })) => format!(
            "node image {}: {} machine(s) upgraded in this run, paused ({why})",
            plan.to.version,
            nodes.iter().filter(|n| n.replaced).count()
        ),
        (_, Some(UpgradeOutcome::Done { plan, .. })) => {
            format!("node image {}: every machine boots it", plan.to.version)
        }
        (_, _) => "decided to upgrade".to_owned(),
    };
    for p in &o.pending {
        s.push_str(&format!(
            "; {} is due on the channel, not carried out (upgrading a channel cluster's Kubernetes is not built yet)",
            p.describe()
        ));
    }
    s
}

/// Records the run in the cluster's record; best effort (a lock another command holds makes it
/// a note: the run's work is done either way).
fn record_run(
    store: &StateStore,
    name: &str,
    request: &AutoRequest,
    summary: &str,
    report: Reporter,
) {
    if let Err(e) = try_record_run(store, name, request, summary, report) {
        report.note(&format!(
            "this run is not recorded in the cluster's record: {}",
            crate::error::error_chain(e.as_ref())
        ));
    }
}

fn try_record_run(
    store: &StateStore,
    name: &str,
    request: &AutoRequest,
    summary: &str,
    report: Reporter,
) -> anyhow::Result<()> {
    let guard = lock_cluster(store, name, request.wait, report)?;
    let Some(mut record) = guard.load()? else {
        return Ok(());
    };
    record.auto_upgrade.last_run = Some(AutoUpgradeRun {
        at: Timestamp::now(),
        scheduled: request.scheduled,
        summary: summary.to_owned(),
    });
    guard.save(&mut record)?;
    Ok(())
}

/// `clusterctl plan NAME --next HORIZON`: the forward calendar.
pub fn calendar(
    store: &StateStore,
    name: &str,
    horizon: std::time::Duration,
    channel_file_arg: Option<&str>,
) -> anyhow::Result<(Policy, Vec<Planned>, Vec<String>)> {
    let record = load_cluster(store, name)?;
    if let Some(explicit) = channel_file_arg {
        channel_file(Some(explicit))?;
    }
    let (policy, observed, available, notes) =
        inputs(&record, &nodeimage::default_image_dir(), channel_file_arg);
    let machines = i64::try_from(record.machines.len().max(1)).unwrap_or(1);
    let cal = autoupgrade::calendar(
        &policy,
        &observed,
        &available,
        Timestamp::now().unix_seconds(),
        i64::try_from(horizon.as_secs()).unwrap_or(i64::MAX),
        machines * ASSUMED_SECONDS_PER_MACHINE,
    );
    Ok((policy, cal, notes))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_shipped_channel_file_parses_and_agrees_with_what_create_installs() -> anyhow::Result<()>
    {
        let f = ChannelFile::parse(SHIPPED_CHANNELS, "shipped")?;
        for c in [
            ReleaseChannel::Rapid,
            ReleaseChannel::Regular,
            ReleaseChannel::Stable,
        ] {
            let newest = f.releases(c).iter().map(|r| r.version).max();
            assert_eq!(
                newest,
                Some(crate::engine::artifacts::channel_version(c)),
                "{c:?}"
            );
            for r in f.releases(c) {
                crate::bundle::check_supported(&r.version)?;
            }
        }
        Ok(())
    }

    #[test]
    fn a_bad_channel_file_is_refused_naming_it() {
        let e = ChannelFile::parse(
            "apiVersion: x\nkind: ReleaseChannels\nchannels: {}\n",
            "/tmp/c.yaml",
        )
        .expect_err("accepted");
        assert!(e.to_string().contains("/tmp/c.yaml"), "{e}");
        let e = ChannelFile::parse(
            "apiVersion: clusterctl.io/v1alpha1\nkind: ReleaseChannels\nchannels:\n  rapid:\n    - version: 1.x\n      since: 2026-01-01T00:00:00Z\n",
            "/tmp/c.yaml",
        )
        .expect_err("accepted");
        assert!(format!("{e:#}").contains("/tmp/c.yaml"), "{e:#}");
    }
}
