//! Cluster state on the admin machine: one private directory per cluster.
//!
//! ```text
//! $XDG_STATE_HOME/clusterctl/          (or ~/.local/state/clusterctl, or --state-dir)  0700
//!   <cluster>/                                                                         0700
//!     cluster.json    the cluster record: ID, spec, timestamps, machine inventory      0600
//!     journal.jsonl   append-only operation journal                                    0600
//!     lock            flock(2) target of the exclusive per-cluster lock                0600
//!     holder.json     who holds the lock (informational)                               0600
//! ```
//!
//! Whole files are only ever replaced atomically ([`fsio::write_atomic`]). Mutating commands hold
//! the cluster's [`ClusterGuard`]; read-only commands may read without it because a reader always
//! sees a complete old or new file. Damaged files are reported with their path and what to do,
//! never reset.

pub mod fsio;
pub mod journal;
pub mod lock;
pub mod repairs;

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::fs;
use std::io::{self, Read};
use std::path::{Path, PathBuf};

use providers::{ClusterRef, Machine};
use serde::{Deserialize, Serialize};

pub use journal::{Event, InFlight, Journal, Record, Replay, TornTail};
pub use lock::{ClusterLock, LockHolder, WaitMode};
pub use repairs::{RepairAction, RepairOutcome, RepairPass, RepairRecord, RepairState};

use fsio::FILE_MODE;

/// Schema version of `cluster.json` written by this build. Older versions are migrated on load;
/// newer ones are refused.
pub const SCHEMA_VERSION: u32 = 2;

/// File name of the cluster record inside a cluster directory.
pub const RECORD_FILE: &str = "cluster.json";

/// The cluster spec as stored in the record.
pub type StoredSpec = crate::spec::Cluster;

/// Errors of the state store. Each names the file involved and what to do.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// Neither a state directory was given nor a home directory is known.
    #[error(
        "cannot determine the state directory: XDG_STATE_HOME and HOME are both unset; pass --state-dir or set CLUSTERCTL_STATE_DIR"
    )]
    NoStateHome,
    /// A file-system operation failed.
    #[error("cannot {action} {}", path.display())]
    Io {
        /// What was being done, e.g. `read`, `create directory`.
        action: &'static str,
        /// The path involved.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// A state file exists but cannot be understood.
    #[error(
        "state file {} is corrupt: {detail}; clusterctl never resets state on its own: restore the file from a backup or repair it by hand",
        path.display()
    )]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        detail: String,
    },
    /// A state file was written by a newer clusterctl.
    #[error(
        "state file {} has schema version {found}, newer than the {supported} this clusterctl understands; use a newer clusterctl",
        path.display()
    )]
    NewerSchema {
        /// The file.
        path: PathBuf,
        /// Its schema version.
        found: u64,
        /// The newest version this build understands.
        supported: u32,
    },
    /// The journal has a damaged record that is not a torn last line.
    #[error(
        "journal {} is corrupt at line {line}: {detail}; clusterctl never resets it: repair the line by hand, or move the file aside if you are sure no operation was in flight",
        path.display()
    )]
    CorruptJournal {
        /// The journal file.
        path: PathBuf,
        /// 1-based line number.
        line: usize,
        /// The parse error.
        detail: String,
    },
    /// Another process holds the cluster lock.
    #[error("cluster {cluster:?} is locked by {}; wait for it or pass --wait", HolderDisplay(holder.as_ref()))]
    Locked {
        /// Cluster name.
        cluster: String,
        /// The holder, if its record could be read.
        holder: Option<LockHolder>,
    },
    /// A secret file can be read or written by other users.
    #[error(
        "secret file {} has mode {mode:04o}, so other users may have read it; run `chmod 600 {}` and consider the secret leaked",
        path.display(),
        path.display()
    )]
    InsecurePermissions {
        /// The file.
        path: PathBuf,
        /// Its permission bits.
        mode: u32,
    },
    /// A cluster name that cannot be a directory name of the store.
    #[error(
        "invalid cluster name {name:?}: use 1 to 63 lowercase letters, digits and '-', starting and ending with a letter or digit"
    )]
    InvalidName {
        /// The name given.
        name: String,
    },
}

struct HolderDisplay<'a>(Option<&'a LockHolder>);

impl fmt::Display for HolderDisplay<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            Some(h) => write!(f, "pid {} ({}) since {}", h.pid, h.command, h.since),
            None => f.write_str("another process (its holder record is missing)"),
        }
    }
}

/// A point in time, stored as RFC 3339 in UTC with millisecond precision and shown to seconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Timestamp(pub chrono::DateTime<chrono::Utc>);

impl Timestamp {
    /// The current time, truncated to the stored precision (milliseconds) so that a stored and
    /// reloaded timestamp compares equal to the original.
    pub fn now() -> Self {
        use chrono::SubsecRound;
        Timestamp(chrono::Utc::now().trunc_subsecs(3))
    }

    /// The time `secs` seconds after the Unix epoch (the epoch itself if out of range).
    pub fn from_unix(secs: i64) -> Self {
        Timestamp(chrono::DateTime::from_timestamp(secs, 0).unwrap_or_default())
    }

    /// Seconds since the Unix epoch.
    pub fn unix_seconds(&self) -> i64 {
        self.0.timestamp()
    }
}

impl fmt::Display for Timestamp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0.to_rfc3339_opts(chrono::SecondsFormat::Secs, true))
    }
}

impl Serialize for Timestamp {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.0.to_rfc3339_opts(chrono::SecondsFormat::Millis, true))
    }
}

impl<'de> Deserialize<'de> for Timestamp {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        chrono::DateTime::parse_from_rfc3339(&s)
            .map(|t| Timestamp(t.with_timezone(&chrono::Utc)))
            .map_err(|e| serde::de::Error::custom(format!("invalid timestamp {s:?}: {e}")))
    }
}

/// Lifecycle of a cluster as far as clusterctl has taken it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ClusterStatus {
    /// `create` has started; machines may be partly provisioned.
    Creating,
    /// All machines of the spec are provisioned; Kubernetes is not bootstrapped yet.
    Provisioned,
    /// Kubernetes is bootstrapped and every node was Ready when `create` finished.
    Running,
    /// `create` was run again on a running cluster and has not finished (it is running, or it
    /// failed: the cluster may still serve, but it does not match its spec yet).
    Reconciling,
    /// `delete` has started; resources may be partly removed.
    Deleting,
}

impl fmt::Display for ClusterStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ClusterStatus::Creating => "creating",
            ClusterStatus::Provisioned => "provisioned",
            ClusterStatus::Running => "running",
            ClusterStatus::Reconciling => "reconciling",
            ClusterStatus::Deleting => "deleting",
        })
    }
}

/// The record of one cluster (`cluster.json`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterRecord {
    /// Schema version of this record ([`SCHEMA_VERSION`] when written by this build).
    pub schema_version: u32,
    /// Cluster name (`metadata.name`), also the directory name.
    pub name: String,
    /// Unique cluster ID, generated at first create and never changed; providers label every
    /// resource with it.
    pub id: String,
    /// How far clusterctl has taken the cluster.
    pub status: ClusterStatus,
    /// When the cluster was first created.
    pub created_at: Timestamp,
    /// When the record was last written.
    pub updated_at: Timestamp,
    /// The spec the cluster was last created or changed from (defaults filled in).
    pub spec: StoredSpec,
    /// Machines as last observed through the provider.
    pub machines: Vec<Machine>,
    /// When `machines` was observed; `None` before the first observation.
    pub observed_at: Option<Timestamp>,
    /// The SSH host key pinned for each machine (`ssh-ed25519 AAAA...`), by machine name.
    /// clusterctl generates it before the machine is created and installs it through the
    /// first-boot seed, so the very first connection is already verified (schema version 2).
    #[serde(default)]
    pub ssh_host_keys: BTreeMap<String, String>,
    /// Index of each node's pod range (`/24` number N of the pod CIDR), by machine name; fixed
    /// when the node is first bootstrapped and kept for its life.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub pod_cidr_indexes: BTreeMap<String, u32>,
    /// The names of each node pool's machines, in the order they were given out
    /// ([`crate::engine::names`]); given out before the machines are made.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub pool_members: BTreeMap<String, Vec<String>>,
    /// Pool machine names given up (a smaller pool, a replaced machine), never handed out again
    /// (the newest [`crate::engine::names::RETIRED_KEPT`]).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub retired_machine_names: Vec<String>,
    /// Kubernetes as last bootstrapped and checked; `None` before the first bootstrap finished.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kubernetes: Option<KubernetesStatus>,
    /// The node image the cluster's machines boot: pinned at the first `create` (new machines of
    /// a later re-run boot it too, whatever was built since) and changed only by
    /// `clusterctl upgrade --node-image`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_image: Option<PinnedImage>,
    /// A node-image upgrade that has not finished (in progress, or stopped by a failure):
    /// `clusterctl upgrade NAME` finishes it, or rolls it back.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub upgrade: Option<UpgradeStatus>,
    /// A Kubernetes version upgrade that has not finished: `clusterctl upgrade NAME
    /// --kubernetes-version` with its target finishes it, with its source rolls it back.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kubernetes_upgrade: Option<KubernetesUpgradeStatus>,
    /// Auto-repair's history, the nodes it is watching and its last pass.
    #[serde(default, skip_serializing_if = "RepairState::is_empty")]
    pub repair: RepairState,
    /// Auto-upgrade's part: when the last upgrade finished (its soak) and the last automatic run.
    #[serde(default, skip_serializing_if = "AutoUpgradeState::is_empty")]
    pub auto_upgrade: AutoUpgradeState,
    /// etcd snapshots kept in the cluster's `snapshots/` directory, oldest first (the last
    /// [`crate::etcd::KEEP`]).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub etcd_snapshots: Vec<crate::etcd::Snapshot>,
}

/// Auto-upgrade's part of the cluster record.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AutoUpgradeState {
    /// When the last upgrade (by hand or automatic) finished: the soak counts from here.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_upgrade_finished: Option<Timestamp>,
    /// The last `upgrade --auto` run.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_run: Option<AutoUpgradeRun>,
    /// Node images an upgrade was rolled back from: auto-upgrade never rolls them out again
    /// (`clusterctl upgrade --node-image` by hand still can).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub rejected: Vec<String>,
}

impl AutoUpgradeState {
    /// Whether nothing is recorded.
    pub fn is_empty(&self) -> bool {
        self.last_upgrade_finished.is_none() && self.last_run.is_none() && self.rejected.is_empty()
    }
}

/// One `upgrade --auto` run.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AutoUpgradeRun {
    /// When it ran.
    pub at: Timestamp,
    /// Whether the schedule ran it.
    pub scheduled: bool,
    /// What it decided and did, one line.
    pub summary: String,
}

/// A node image by version and manifest digest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PinnedImage {
    /// Image version (`bookworm-20261130-eaaa25c3621b`).
    pub version: String,
    /// sha256 of its manifest.
    pub digest: String,
}

/// A pool machine being replaced by a new one in a surge upgrade.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SurgeReplacement {
    /// The node pool.
    pub pool: String,
    /// The machine on the old image.
    pub old: String,
    /// The machine made for it on the target image (named before it is made).
    pub new: String,
    /// The new machine passed its health gate and took the old one's place in the pool: the old
    /// one is being drained and deleted.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub leaving: bool,
}

/// An unfinished node-image upgrade.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpgradeStatus {
    /// The image the cluster booted before (the rollback target).
    pub from: PinnedImage,
    /// The image being rolled out.
    pub to: PinnedImage,
    /// When the upgrade started.
    pub started_at: Timestamp,
    /// Why it stopped, if it did (a failed health gate, rolled back).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stopped: Option<String>,
    /// Whether auto-upgrade started it (`upgrade --auto`).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub automatic: bool,
    /// The etcd snapshot taken before its first control-plane machine (a file of
    /// `etcd_snapshots`): the state to restore if the control plane is lost.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snapshot: Option<String>,
    /// Surge replacements under way (node pools with `upgradeSettings.maxSurge`): each old
    /// machine and the new one made for it on the target image.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub surge: Vec<SurgeReplacement>,
}

/// An unfinished Kubernetes version upgrade.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct KubernetesUpgradeStatus {
    /// The version before (the rollback target).
    pub from: String,
    /// Where its files came from.
    pub from_artifacts: crate::spec::ArtifactSource,
    /// The version rolled out.
    pub to: String,
    /// Where its files come from.
    pub to_artifacts: crate::spec::ArtifactSource,
    /// When it started.
    pub started_at: Timestamp,
    /// Why it stopped, if it did (a node failed its gate and was rolled back).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stopped: Option<String>,
    /// The etcd snapshot taken before its first control-plane node (a file of
    /// `etcd_snapshots`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snapshot: Option<String>,
}

/// The cluster's Kubernetes as clusterctl last saw it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KubernetesStatus {
    /// Kubernetes version installed (`1.20.2`).
    pub version: String,
    /// API server URL clients use (`https://10.77.0.11:6443`).
    pub api_server: String,
    /// Nodes as last listed through the API.
    pub nodes: Vec<NodeStatus>,
    /// When `nodes` was listed.
    pub checked_at: Timestamp,
}

/// One Kubernetes node as last listed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeStatus {
    /// Node name (the machine name).
    pub name: String,
    /// Whether its `Ready` condition was `True`.
    pub ready: bool,
    /// kubelet version it reported (`v1.20.2`).
    pub kubelet_version: String,
}

impl ClusterRecord {
    /// The new machines of an unfinished surge upgrade that are on top of their pool's count
    /// (their old machines have not left yet).
    pub fn surge_machines(&self) -> BTreeSet<String> {
        self.upgrade
            .iter()
            .flat_map(|u| u.surge.iter())
            .filter(|s| !s.leaving)
            .map(|s| s.new.clone())
            .collect()
    }

    /// A new record with a fresh cluster ID, in status [`ClusterStatus::Creating`].
    pub fn new(name: &str, spec: StoredSpec) -> Result<Self, StateError> {
        let now = Timestamp::now();
        let id = new_cluster_id().map_err(|source| StateError::Io {
            action: "read random bytes from",
            path: "/dev/urandom".into(),
            source,
        })?;
        Ok(ClusterRecord {
            schema_version: SCHEMA_VERSION,
            name: name.to_owned(),
            id,
            status: ClusterStatus::Creating,
            created_at: now,
            updated_at: now,
            spec,
            machines: Vec::new(),
            observed_at: None,
            ssh_host_keys: BTreeMap::new(),
            pod_cidr_indexes: BTreeMap::new(),
            pool_members: BTreeMap::new(),
            retired_machine_names: Vec::new(),
            kubernetes: None,
            node_image: None,
            upgrade: None,
            kubernetes_upgrade: None,
            repair: RepairState::default(),
            auto_upgrade: AutoUpgradeState::default(),
            etcd_snapshots: Vec::new(),
        })
    }

    /// The identity providers label resources with.
    pub fn cluster_ref(&self) -> ClusterRef {
        ClusterRef {
            name: self.name.clone(),
            id: self.id.clone(),
        }
    }
}

/// Reads `n` random bytes from the kernel and returns them as lowercase hex.
pub(crate) fn random_hex(n: usize) -> io::Result<String> {
    let mut buf = vec![0u8; n];
    fs::File::open("/dev/urandom")?.read_exact(&mut buf)?;
    Ok(hex::encode(buf))
}

/// A new random (version 4) UUID in its usual text form.
fn new_cluster_id() -> io::Result<String> {
    let mut b = [0u8; 16];
    fs::File::open("/dev/urandom")?.read_exact(&mut b)?;
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let h = hex::encode(b);
    Ok(format!(
        "{}-{}-{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    ))
}

/// Whether `name` is a DNS-1123 label, the only names the store accepts as directory names.
pub fn valid_cluster_name(name: &str) -> bool {
    providers::is_dns1123_label(name)
}

/// The state store: a root directory with one subdirectory per cluster.
#[derive(Debug, Clone)]
pub struct StateStore {
    root: PathBuf,
}

impl StateStore {
    /// A store rooted at `root` (nothing is created until a cluster is locked).
    pub fn new(root: impl Into<PathBuf>) -> Self {
        StateStore { root: root.into() }
    }

    /// The store for the global `--state-dir` option (which clap already fills from
    /// `CLUSTERCTL_STATE_DIR`), else `$XDG_STATE_HOME/clusterctl`, else
    /// `~/.local/state/clusterctl`.
    pub fn resolve(state_dir: Option<&Path>) -> Result<Self, StateError> {
        Self::resolve_with(state_dir, |k| std::env::var_os(k))
    }

    fn resolve_with(
        state_dir: Option<&Path>,
        env: impl Fn(&str) -> Option<std::ffi::OsString>,
    ) -> Result<Self, StateError> {
        if let Some(d) = state_dir {
            return Ok(Self::new(d));
        }
        // The XDG base directory spec says relative values are invalid and must be ignored.
        if let Some(x) = env("XDG_STATE_HOME")
            .map(PathBuf::from)
            .filter(|p| p.is_absolute())
        {
            return Ok(Self::new(x.join("clusterctl")));
        }
        match env("HOME").map(PathBuf::from).filter(|p| p.is_absolute()) {
            Some(home) => Ok(Self::new(home.join(".local/state/clusterctl"))),
            None => Err(StateError::NoStateHome),
        }
    }

    /// The root directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The directory of cluster `name` (which must be a DNS-1123 label).
    pub fn cluster_dir(&self, name: &str) -> Result<PathBuf, StateError> {
        if !valid_cluster_name(name) {
            return Err(StateError::InvalidName {
                name: name.to_owned(),
            });
        }
        Ok(self.root.join(name))
    }

    /// Names of the clusters that have a directory in the store, sorted.
    pub fn names(&self) -> Result<Vec<String>, StateError> {
        let entries = match fs::read_dir(&self.root) {
            Ok(e) => e,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(source) => {
                return Err(StateError::Io {
                    action: "list directory",
                    path: self.root.clone(),
                    source,
                });
            }
        };
        let mut names = Vec::new();
        for entry in entries {
            let entry = entry.map_err(|source| StateError::Io {
                action: "list directory",
                path: self.root.clone(),
                source,
            })?;
            let is_dir = entry.file_type().map(|t| t.is_dir()).unwrap_or(false);
            if let Some(name) = entry
                .file_name()
                .to_str()
                .filter(|n| is_dir && valid_cluster_name(n))
            {
                names.push(name.to_owned());
            }
        }
        names.sort();
        Ok(names)
    }

    /// Reads the record of cluster `name` without taking the lock; `Ok(None)` if there is none.
    pub fn load(&self, name: &str) -> Result<Option<ClusterRecord>, StateError> {
        let dir = self.cluster_dir(name)?;
        load_record(&dir, name)
    }

    /// Reads secret `file_name` of cluster `name` without taking the lock (secrets are written
    /// atomically); refuses it if other users can access it. `Ok(None)` if it does not exist.
    pub fn read_secret(&self, name: &str, file_name: &str) -> Result<Option<Vec<u8>>, StateError> {
        read_secret_in(&self.cluster_dir(name)?, file_name)
    }

    /// Takes the exclusive lock of cluster `name` for a mutating command (see [`ClusterLock`]).
    /// Creates the store root and the cluster directory if needed.
    pub fn lock(
        &self,
        name: &str,
        wait: WaitMode,
        on_wait: &mut dyn FnMut(Option<&LockHolder>),
    ) -> Result<ClusterGuard, StateError> {
        let dir = self.cluster_dir(name)?;
        fsio::ensure_dir(&self.root)?;
        let lock = ClusterLock::acquire(&dir, name, &LockHolder::current(), wait, on_wait)?;
        Ok(ClusterGuard {
            lock,
            name: name.to_owned(),
            dir,
        })
    }
}

fn load_record(dir: &Path, name: &str) -> Result<Option<ClusterRecord>, StateError> {
    let path = dir.join(RECORD_FILE);
    let Some(bytes) = fsio::read_optional(&path)? else {
        return Ok(None);
    };
    fsio::tighten(&path, FILE_MODE)?;
    let corrupt = |detail: String| StateError::Corrupt {
        path: path.clone(),
        detail,
    };
    let value: serde_json::Value =
        serde_json::from_slice(&bytes).map_err(|e| corrupt(e.to_string()))?;
    let version = value
        .get("schema_version")
        .ok_or_else(|| corrupt("missing field `schema_version`".into()))?
        .as_u64()
        .ok_or_else(|| corrupt("`schema_version` is not a non-negative integer".into()))?;
    if version > u64::from(SCHEMA_VERSION) {
        return Err(StateError::NewerSchema {
            path,
            found: version,
            supported: SCHEMA_VERSION,
        });
    }
    // Migrations: version 1 had no `ssh_host_keys` (it defaults to empty), nothing else changed.
    let mut record: ClusterRecord =
        serde_json::from_value(value).map_err(|e| corrupt(e.to_string()))?;
    record.schema_version = SCHEMA_VERSION;
    if record.name != name {
        return Err(corrupt(format!(
            "it names cluster {:?} but lies in the directory of {name:?}",
            record.name
        )));
    }
    Ok(Some(record))
}

/// The path of secret `file_name` in cluster directory `dir`: a plain file name of its own, never
/// one of the store's files.
fn secret_path_in(dir: &Path, file_name: &str) -> Result<PathBuf, StateError> {
    let ok = !file_name.is_empty()
        && !file_name.starts_with('.')
        && file_name
            .bytes()
            .all(|c| c.is_ascii_alphanumeric() || b"-_.".contains(&c))
        && ![
            RECORD_FILE,
            journal::JOURNAL_FILE,
            lock::LOCK_FILE,
            lock::HOLDER_FILE,
        ]
        .contains(&file_name);
    if !ok {
        return Err(StateError::Io {
            action: "store a secret as",
            path: dir.join(file_name),
            source: io::Error::new(
                io::ErrorKind::InvalidInput,
                "not a plain file name of its own",
            ),
        });
    }
    Ok(dir.join(file_name))
}

fn read_secret_in(dir: &Path, file_name: &str) -> Result<Option<Vec<u8>>, StateError> {
    let path = secret_path_in(dir, file_name)?;
    if !path.exists() {
        return Ok(None);
    }
    fsio::check_secret_mode(&path)?;
    fsio::read_optional(&path)
}

/// Exclusive access to one cluster's state, held by a mutating command. Dropping it releases the
/// lock.
#[derive(Debug)]
pub struct ClusterGuard {
    lock: ClusterLock,
    name: String,
    dir: PathBuf,
}

impl ClusterGuard {
    /// The cluster name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The cluster directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Reads the cluster record; `Ok(None)` if the cluster has none yet.
    pub fn load(&self) -> Result<Option<ClusterRecord>, StateError> {
        load_record(&self.dir, &self.name)
    }

    /// Writes the cluster record atomically, setting `updated_at` to now.
    pub fn save(&self, record: &mut ClusterRecord) -> Result<(), StateError> {
        let path = self.dir.join(RECORD_FILE);
        if record.name != self.name {
            return Err(StateError::Corrupt {
                path,
                detail: format!(
                    "refusing to write a record of cluster {:?} here",
                    record.name
                ),
            });
        }
        record.updated_at = Timestamp::now();
        let mut bytes = serde_json::to_vec_pretty(record).map_err(|e| StateError::Io {
            action: "encode",
            path: path.clone(),
            source: io::Error::other(e),
        })?;
        bytes.push(b'\n');
        fsio::write_atomic(&path, &bytes, FILE_MODE)
    }

    /// Opens the cluster's journal for this command run (see [`Journal::open`]).
    pub fn open_journal(&self, command: &str) -> Result<(Journal, Replay), StateError> {
        Journal::open(&self.dir.join(journal::JOURNAL_FILE), command)
    }

    /// Stores a secret (a private key, a token) in the cluster directory with mode 0600.
    pub fn write_secret(&self, file_name: &str, content: &[u8]) -> Result<(), StateError> {
        fsio::write_atomic(&self.secret_path(file_name)?, content, FILE_MODE)
    }

    /// Reads a secret written by [`write_secret`](Self::write_secret); refuses it if other users
    /// can access it. `Ok(None)` if it does not exist.
    pub fn read_secret(&self, file_name: &str) -> Result<Option<Vec<u8>>, StateError> {
        read_secret_in(&self.dir, file_name)
    }

    /// Removes a secret written by [`write_secret`](Self::write_secret); Ok if it is absent.
    pub fn remove_secret(&self, file_name: &str) -> Result<(), StateError> {
        let path = self.secret_path(file_name)?;
        match fs::remove_file(&path) {
            Ok(()) => fsio::sync_dir(&self.dir),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(source) => Err(StateError::Io {
                action: "remove",
                path,
                source,
            }),
        }
    }

    fn secret_path(&self, file_name: &str) -> Result<PathBuf, StateError> {
        secret_path_in(&self.dir, file_name)
    }

    /// Removes the whole cluster directory (record, journal, secrets, lock file), then releases
    /// the lock. Waiting commands notice the removal and start over on a fresh directory.
    pub fn remove(self) -> Result<(), StateError> {
        fs::remove_dir_all(&self.dir).map_err(|source| StateError::Io {
            action: "remove directory",
            path: self.dir.clone(),
            source,
        })?;
        if let Some(parent) = self.dir.parent() {
            fsio::sync_dir(parent)?;
        }
        drop(self.lock);
        Ok(())
    }
}

#[cfg(test)]
mod tests;
