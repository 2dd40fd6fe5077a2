//! A provider without VMs, for engine and CLI tests: machines are records in a JSON file.
//!
//! The file (`machines.json` in the provider's directory) outlives the process, so a test can kill
//! `clusterctl` in the middle of a command and look at what it left behind, exactly as it would
//! with real VMs. The semantics are the contract's, honestly implemented: ensure is idempotent,
//! delete succeeds when the machine is gone, a same-named machine of another cluster is a name
//! clash and is left alone, and `delete_cluster` removes everything carrying the cluster's ID.
//!
//! Every change is a read-modify-write of the whole file under an exclusive `flock` on
//! `machines.lock` (so several processes can share one directory), written atomically (temporary
//! file, fsync, rename, fsync of the directory).
//!
//! Options for tests ([`FakeOptions::from_env`]):
//! - `CLUSTERCTL_FAKE_DELAY_MS`: sleep this long in every ensure, and before each machine removed
//!   by delete, so a test can kill the process while calls are in flight;
//! - `CLUSTERCTL_FAKE_FAIL_ENSURE`: ensuring the machine with this name fails with an API error;
//!   a prefix ending in `*` fails the first machine of the process whose name starts with it.

use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::{
    ClusterRef, ImageRef, LABEL_CLUSTER_ID, LABEL_CLUSTER_NAME, LABEL_POOL, LABEL_ROLE, Machine,
    MachineAddress, MachineRole, MachineSize, MachineSpec, MachineState, Provider, ProviderError,
    Resource, Result,
};

/// File holding the machines.
pub const MACHINES_FILE: &str = "machines.json";
const LOCK_FILE: &str = "machines.lock";
const FORMAT_VERSION: u32 = 1;

/// Environment variable with a per-call delay in milliseconds.
pub const ENV_DELAY_MS: &str = "CLUSTERCTL_FAKE_DELAY_MS";
/// Environment variable naming a machine whose ensure fails.
pub const ENV_FAIL_ENSURE: &str = "CLUSTERCTL_FAKE_FAIL_ENSURE";

/// Test knobs of the fake provider.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FakeOptions {
    /// Delay of every ensure and of each machine removal.
    pub delay: Duration,
    /// Name of a machine whose ensure fails with [`ProviderError::Api`].
    pub fail_ensure: Option<String>,
}

impl FakeOptions {
    /// Reads [`ENV_DELAY_MS`] and [`ENV_FAIL_ENSURE`].
    pub fn from_env() -> Result<Self> {
        let delay = match std::env::var(ENV_DELAY_MS) {
            Ok(v) => Duration::from_millis(v.trim().parse().map_err(|_| {
                ProviderError::Invalid(format!(
                    "{ENV_DELAY_MS}={v:?} is not a whole number of milliseconds"
                ))
            })?),
            Err(_) => Duration::ZERO,
        };
        let fail_ensure = std::env::var(ENV_FAIL_ENSURE)
            .ok()
            .filter(|s| !s.is_empty());
        Ok(FakeOptions { delay, fail_ensure })
    }
}

/// A machine as the fake provider stores it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FakeMachine {
    /// Machine name (unique in the directory, like a libvirt domain name).
    pub name: String,
    /// Provider ID, `fake://<name>/<random>`: a recreated machine gets a new one.
    pub provider_id: String,
    /// Labels, including the cluster labels.
    pub labels: BTreeMap<String, String>,
    /// Size it was created with.
    pub size: MachineSize,
    /// Digest of the image it was created from.
    pub image_digest: String,
    /// Lifecycle state.
    pub state: MachineState,
    /// Failure domain it was placed in.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failure_domain: Option<String>,
    /// How many times it has booted (create, start, reset and boot-disk replacement each count).
    #[serde(default)]
    pub boots: u32,
    /// What was written on its data disk (kept by a boot-disk replacement, gone with the machine).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data_disk: Option<String>,
}

/// Label keys the fake stores for the provider's own use; everything else is a user label.
const OWN_LABELS: [&str; 4] = [LABEL_CLUSTER_ID, LABEL_CLUSTER_NAME, LABEL_ROLE, LABEL_POOL];

impl FakeMachine {
    fn cluster_id(&self) -> Option<&str> {
        self.labels.get(LABEL_CLUSTER_ID).map(String::as_str)
    }

    fn to_machine(&self) -> Machine {
        let role = match self.labels.get(LABEL_ROLE).map(String::as_str) {
            Some("control-plane") => MachineRole::ControlPlane,
            _ => MachineRole::Worker,
        };
        Machine {
            name: self.name.clone(),
            provider_id: self.provider_id.clone(),
            role,
            pool: self.labels.get(LABEL_POOL).cloned(),
            state: self.state,
            addresses: if self.state == MachineState::Running {
                vec![MachineAddress::internal(self.loopback_address())]
            } else {
                Vec::new()
            },
            failure_domain: Some(
                self.failure_domain
                    .clone()
                    .unwrap_or_else(|| FAKE_ZONE.to_string()),
            ),
            image_digest: Some(self.image_digest.clone()),
            size: Some(self.size.clone()),
            labels: self
                .labels
                .iter()
                .filter(|(k, _)| !OWN_LABELS.contains(&k.as_str()))
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
        }
    }

    /// A loopback address derived from the provider ID: distinct per machine, never routed
    /// anywhere (the engine does not connect to fake machines).
    fn loopback_address(&self) -> std::net::IpAddr {
        let h = self
            .provider_id
            .bytes()
            .fold(0u32, |h, b| h.wrapping_mul(31).wrapping_add(u32::from(b)));
        let [_, a, b, c] = h.to_be_bytes();
        std::net::IpAddr::V4(std::net::Ipv4Addr::new(127, a, b, c.max(2)))
    }
}

/// The failure domain of a machine placed without one.
pub const FAKE_ZONE: &str = "fake-zone-a";

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Store {
    version: u32,
    machines: Vec<FakeMachine>,
}

/// The fake provider. See the module documentation.
#[derive(Debug)]
pub struct FakeProvider {
    dir: PathBuf,
    options: FakeOptions,
    // flock excludes other processes; this excludes other threads of this one, which would
    // otherwise each open their own descriptor and contend on flock needlessly.
    local: Mutex<()>,
    // A `prefix*` failure has happened (it fails once per process).
    failed_once: std::sync::atomic::AtomicBool,
}

fn api(operation: impl Into<String>, detail: impl std::fmt::Display) -> ProviderError {
    ProviderError::Api {
        operation: operation.into(),
        detail: detail.to_string(),
    }
}

impl FakeProvider {
    /// A fake provider keeping its machines in `dir` (created with mode 0700 if missing).
    pub fn new(dir: impl Into<PathBuf>, options: FakeOptions) -> Result<Self> {
        let dir = dir.into();
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&dir)
            .map_err(|e| ProviderError::Unreachable {
                endpoint: format!("fake:{}", dir.display()),
                detail: e.to_string(),
            })?;
        Ok(FakeProvider {
            dir,
            options,
            local: Mutex::new(()),
            failed_once: std::sync::atomic::AtomicBool::new(false),
        })
    }

    /// The directory holding the machines.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Every machine in the directory, of every cluster, sorted by name (for tests).
    pub fn all_machines(&self) -> Result<Vec<FakeMachine>> {
        self.transact("reading fake machines", |s| Ok((s.machines.clone(), false)))
    }

    /// Sets the state of machine `name` (for tests: a machine that stopped or failed).
    pub fn set_state(&self, name: &str, state: MachineState) -> Result<()> {
        self.transact(format!("setting state of fake machine {name:?}"), |s| {
            let m = s
                .machines
                .iter_mut()
                .find(|m| m.name == name)
                .ok_or_else(|| ProviderError::Invalid(format!("no fake machine {name:?}")))?;
            m.state = state;
            Ok(((), true))
        })
    }

    /// Writes `content` on the data disk of machine `name` (for tests and the conformance probe).
    pub fn write_data_disk(&self, name: &str, content: &str) -> Result<()> {
        self.with_machine(name, |m| {
            m.data_disk = Some(content.to_string());
            Ok(((), true))
        })
    }

    /// What the data disk of machine `name` holds (for tests and the conformance probe).
    pub fn read_data_disk(&self, name: &str) -> Result<Option<String>> {
        self.with_machine(name, |m| Ok((m.data_disk.clone(), false)))
    }

    /// How many times machine `name` has booted (for tests and the conformance probe).
    pub fn boot_count(&self, name: &str) -> Result<u32> {
        self.with_machine(name, |m| Ok((m.boots, false)))
    }

    fn with_machine<T>(
        &self,
        name: &str,
        f: impl FnOnce(&mut FakeMachine) -> Result<(T, bool)>,
    ) -> Result<T> {
        self.find_machine(None, name, "reading", f)
    }

    fn with_own_machine<T>(
        &self,
        cluster: &ClusterRef,
        name: &str,
        operation: &str,
        f: impl FnOnce(&mut FakeMachine) -> Result<(T, bool)>,
    ) -> Result<T> {
        self.find_machine(Some(cluster), name, operation, f)
    }

    /// Runs `f` on machine `name`: not found, or (with a cluster) a name clash if another
    /// cluster's machine has that name.
    fn find_machine<T>(
        &self,
        cluster: Option<&ClusterRef>,
        name: &str,
        operation: &str,
        f: impl FnOnce(&mut FakeMachine) -> Result<(T, bool)>,
    ) -> Result<T> {
        self.transact(format!("{operation} fake machine {name:?}"), |s| {
            let m = s
                .machines
                .iter_mut()
                .find(|m| m.name == name)
                .ok_or_else(|| ProviderError::NotFound {
                    kind: "machine",
                    name: name.to_string(),
                })?;
            if let Some(c) = cluster
                && m.cluster_id() != Some(c.id.as_str())
            {
                return Err(ProviderError::NameClash {
                    kind: "machine",
                    name: name.to_string(),
                });
            }
            f(m)
        })
    }

    /// Runs `f` on the stored machines under the locks; writes them back if `f` says so.
    fn transact<T>(
        &self,
        operation: impl Into<String>,
        f: impl FnOnce(&mut Store) -> Result<(T, bool)>,
    ) -> Result<T> {
        let operation = operation.into();
        let _local = self
            .local
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let lock_path = self.dir.join(LOCK_FILE);
        let lock = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(&lock_path)
            .map_err(|e| {
                api(
                    &operation,
                    format!("cannot open {}: {e}", lock_path.display()),
                )
            })?;
        lock.lock().map_err(|e| {
            api(
                &operation,
                format!("cannot lock {}: {e}", lock_path.display()),
            )
        })?;
        let path = self.dir.join(MACHINES_FILE);
        let mut store = match File::open(&path) {
            Ok(mut f) => {
                let mut text = String::new();
                f.read_to_string(&mut text)
                    .map_err(|e| api(&operation, format!("cannot read {}: {e}", path.display())))?;
                let store: Store = serde_json::from_str(&text).map_err(|e| {
                    api(
                        &operation,
                        format!("{} is corrupt: {e}; fix or remove it", path.display()),
                    )
                })?;
                if store.version != FORMAT_VERSION {
                    return Err(api(
                        &operation,
                        format!(
                            "{} has unknown format version {}",
                            path.display(),
                            store.version
                        ),
                    ));
                }
                store
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => Store {
                version: FORMAT_VERSION,
                machines: Vec::new(),
            },
            Err(e) => {
                return Err(api(
                    &operation,
                    format!("cannot read {}: {e}", path.display()),
                ));
            }
        };
        let (out, changed) = f(&mut store)?;
        if changed {
            store.machines.sort_by(|a, b| a.name.cmp(&b.name));
            let mut bytes = serde_json::to_vec_pretty(&store).map_err(|e| api(&operation, e))?;
            bytes.push(b'\n');
            write_atomic(&path, &bytes)
                .map_err(|e| api(&operation, format!("cannot write {}: {e}", path.display())))?;
        }
        // The flock is released when `lock` is closed here.
        Ok(out)
    }

    fn pause(&self) {
        if !self.options.delay.is_zero() {
            std::thread::sleep(self.options.delay);
        }
    }
}

fn write_atomic(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let tmp = dir.join(format!(
        ".{MACHINES_FILE}.tmp.{}.{}",
        std::process::id(),
        random_hex(4)?
    ));
    let result = (|| {
        let mut f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        fs::rename(&tmp, path)?;
        File::open(dir)?.sync_all()
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

fn random_hex(n: usize) -> io::Result<String> {
    let mut b = vec![0u8; n];
    File::open("/dev/urandom")?.read_exact(&mut b)?;
    Ok(b.iter().map(|x| format!("{x:02x}")).collect())
}

impl Provider for FakeProvider {
    fn name(&self) -> &'static str {
        "fake"
    }

    fn ensure_machine(&self, cluster: &ClusterRef, spec: &MachineSpec) -> Result<Machine> {
        crate::check_machine_name(&spec.name)?;
        if spec.role == MachineRole::Worker && spec.pool.is_none() {
            return Err(ProviderError::Invalid(format!(
                "worker machine {:?} has no node pool",
                spec.name
            )));
        }
        // Creating takes time; do it outside the lock so concurrent ensures overlap, as real ones do.
        self.pause();
        let fail = match self.options.fail_ensure.as_deref() {
            Some(p) if p.ends_with('*') => {
                spec.name.starts_with(&p[..p.len() - 1])
                    && !self
                        .failed_once
                        .swap(true, std::sync::atomic::Ordering::SeqCst)
            }
            Some(name) => name == spec.name,
            None => false,
        };
        if fail {
            return Err(api(
                format!("creating fake machine {:?}", spec.name),
                format!("failure injected by {ENV_FAIL_ENSURE}"),
            ));
        }
        let provider_id = format!(
            "fake://{}/{}",
            spec.name,
            random_hex(4).map_err(|e| api("reading random bytes", e))?
        );
        self.transact(format!("ensuring fake machine {:?}", spec.name), |s| {
            if let Some(m) = s.machines.iter_mut().find(|m| m.name == spec.name) {
                if m.cluster_id() != Some(cluster.id.as_str()) {
                    return Err(ProviderError::NameClash {
                        kind: "machine",
                        name: spec.name.clone(),
                    });
                }
                let changed = matches!(
                    m.state,
                    MachineState::Stopped | MachineState::Failed | MachineState::Unknown
                );
                if changed {
                    m.state = MachineState::Running;
                    m.boots += 1;
                }
                return Ok((m.to_machine(), changed));
            }
            let mut labels = spec.labels.clone();
            labels.insert(LABEL_CLUSTER_ID.into(), cluster.id.clone());
            labels.insert(LABEL_CLUSTER_NAME.into(), cluster.name.clone());
            labels.insert(
                LABEL_ROLE.into(),
                match spec.role {
                    MachineRole::ControlPlane => "control-plane",
                    MachineRole::Worker => "worker",
                }
                .into(),
            );
            match &spec.pool {
                Some(p) => labels.insert(LABEL_POOL.into(), p.clone()),
                None => labels.remove(LABEL_POOL),
            };
            let m = FakeMachine {
                name: spec.name.clone(),
                provider_id,
                labels,
                size: spec.size.clone(),
                image_digest: spec.image.digest.clone(),
                state: MachineState::Running,
                failure_domain: spec.failure_domain.clone(),
                boots: 1,
                data_disk: None,
            };
            let out = m.to_machine();
            s.machines.push(m);
            Ok((out, true))
        })
    }

    fn list_machines(&self, cluster: &ClusterRef) -> Result<Vec<Machine>> {
        self.transact("listing fake machines", |s| {
            let list = s
                .machines
                .iter()
                .filter(|m| m.cluster_id() == Some(cluster.id.as_str()))
                .map(FakeMachine::to_machine)
                .collect();
            Ok((list, false))
        })
    }

    fn delete_machine(&self, cluster: &ClusterRef, name: &str) -> Result<()> {
        self.pause();
        self.transact(format!("deleting fake machine {name:?}"), |s| {
            let before = s.machines.len();
            // Only this cluster's machine: a same-named machine of another cluster is not ours.
            s.machines
                .retain(|m| !(m.name == name && m.cluster_id() == Some(cluster.id.as_str())));
            Ok(((), s.machines.len() != before))
        })
    }

    fn delete_cluster(&self, cluster: &ClusterRef) -> Result<()> {
        // One machine at a time, each removal persisted, so a kill leaves a partly deleted cluster.
        loop {
            let next = self.transact("listing fake machines", |s| {
                Ok((
                    s.machines
                        .iter()
                        .find(|m| m.cluster_id() == Some(cluster.id.as_str()))
                        .map(|m| m.name.clone()),
                    false,
                ))
            })?;
            let Some(name) = next else { return Ok(()) };
            self.delete_machine(cluster, &name)?;
        }
    }

    fn inventory(&self, cluster: &ClusterRef) -> Result<Vec<Resource>> {
        self.transact("listing fake machines", |s| {
            let list = s
                .machines
                .iter()
                .filter(|m| m.cluster_id() == Some(cluster.id.as_str()))
                .map(|m| Resource {
                    kind: "machine".into(),
                    name: m.name.clone(),
                })
                .collect();
            Ok((list, false))
        })
    }

    fn stop_machine(&self, cluster: &ClusterRef, name: &str) -> Result<Machine> {
        self.with_own_machine(cluster, name, "stopping", |m| {
            let changed = m.state != MachineState::Stopped;
            m.state = MachineState::Stopped;
            Ok((m.to_machine(), changed))
        })
    }

    fn reset_machine(&self, cluster: &ClusterRef, name: &str) -> Result<Machine> {
        self.pause();
        self.with_own_machine(cluster, name, "resetting", |m| {
            m.state = MachineState::Running;
            m.boots += 1;
            Ok((m.to_machine(), true))
        })
    }

    fn replace_boot_disk(
        &self,
        cluster: &ClusterRef,
        name: &str,
        image: &ImageRef,
    ) -> Result<Machine> {
        self.pause();
        self.with_own_machine(cluster, name, "replacing the boot disk of", |m| {
            if m.image_digest == image.digest {
                let start = m.state != MachineState::Running;
                if start {
                    m.state = MachineState::Running;
                    m.boots += 1;
                }
                return Ok((m.to_machine(), start));
            }
            m.image_digest = image.digest.clone();
            m.state = MachineState::Running;
            m.boots += 1;
            Ok((m.to_machine(), true))
        })
    }

    fn resize_machine(
        &self,
        cluster: &ClusterRef,
        name: &str,
        size: &MachineSize,
    ) -> Result<Machine> {
        self.pause();
        self.with_own_machine(cluster, name, "resizing", |m| {
            if m.size.disk_gib != size.disk_gib {
                return Err(ProviderError::Invalid(format!(
                    "machine {name:?} has a {} GiB data disk; it cannot become {} GiB in place (only CPUs and memory change)",
                    m.size.disk_gib, size.disk_gib
                )));
            }
            if m.size == *size {
                let start = m.state != MachineState::Running;
                if start {
                    m.state = MachineState::Running;
                    m.boots += 1;
                }
                return Ok((m.to_machine(), start));
            }
            m.size = size.clone();
            m.state = MachineState::Running;
            m.boots += 1;
            Ok((m.to_machine(), true))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ImageRef;

    fn spec(name: &str, role: MachineRole, pool: Option<&str>) -> MachineSpec {
        MachineSpec {
            name: name.into(),
            role,
            pool: pool.map(Into::into),
            size: MachineSize {
                cpus: 2,
                memory_mib: 2048,
                disk_gib: 20,
            },
            image: ImageRef {
                version: "v1".into(),
                dir: "/nonexistent".into(),
                digest: "sha256:abc".into(),
            },
            user_data: "#cloud-config\n".into(),
            labels: BTreeMap::new(),
            failure_domain: None,
        }
    }

    /// Looks inside fake machines through a second provider instance on the same directory.
    struct FakeProbe(FakeProvider);

    impl crate::conformance::MachineProbe for FakeProbe {
        fn write_data_marker(
            &self,
            _: &dyn Provider,
            _: &ClusterRef,
            machine: &str,
            marker: u8,
        ) -> std::result::Result<(), String> {
            self.0
                .write_data_disk(machine, &format!("{marker:02x}"))
                .map_err(|e| e.to_string())
        }

        fn read_data_marker(
            &self,
            _: &dyn Provider,
            _: &ClusterRef,
            machine: &str,
        ) -> std::result::Result<Option<u8>, String> {
            let data = self.0.read_data_disk(machine).map_err(|e| e.to_string())?;
            data.map(|d| u8::from_str_radix(&d, 16).map_err(|e| e.to_string()))
                .transpose()
        }

        fn boot_count(
            &self,
            _: &dyn Provider,
            _: &ClusterRef,
            machine: &str,
        ) -> std::result::Result<u64, String> {
            self.0
                .boot_count(machine)
                .map(u64::from)
                .map_err(|e| e.to_string())
        }
    }

    #[test]
    fn machines_survive_a_new_provider_instance_and_labels_carry_identity() -> Result<()> {
        let tmp = tempfile::tempdir().map_err(|e| api("tempdir", e))?;
        let c = ClusterRef {
            name: "c1".into(),
            id: "id-1".into(),
        };
        let p = FakeProvider::new(tmp.path(), FakeOptions::default())?;
        let m = p.ensure_machine(&c, &spec("c1-pool-a-0", MachineRole::Worker, Some("a")))?;
        assert_eq!(m.pool.as_deref(), Some("a"));
        assert_eq!(m.role, MachineRole::Worker);
        drop(p);
        let p = FakeProvider::new(tmp.path(), FakeOptions::default())?;
        let all = p.all_machines()?;
        assert_eq!(all.len(), 1);
        assert_eq!(
            all[0].labels.get(LABEL_CLUSTER_ID).map(String::as_str),
            Some("id-1")
        );
        assert_eq!(p.list_machines(&c)?, vec![m]);
        Ok(())
    }

    #[test]
    fn ensure_starts_a_stopped_machine() -> Result<()> {
        let tmp = tempfile::tempdir().map_err(|e| api("tempdir", e))?;
        let c = ClusterRef {
            name: "c1".into(),
            id: "id-1".into(),
        };
        let p = FakeProvider::new(tmp.path(), FakeOptions::default())?;
        let first = p.ensure_machine(&c, &spec("c1-cp-0", MachineRole::ControlPlane, None))?;
        p.set_state("c1-cp-0", MachineState::Stopped)?;
        assert_eq!(p.list_machines(&c)?[0].state, MachineState::Stopped);
        let again = p.ensure_machine(&c, &spec("c1-cp-0", MachineRole::ControlPlane, None))?;
        assert_eq!(again.state, MachineState::Running);
        assert_eq!(
            again.provider_id, first.provider_id,
            "started, not recreated"
        );
        Ok(())
    }

    #[test]
    fn injected_failure_and_corrupt_file_are_errors() -> Result<()> {
        let tmp = tempfile::tempdir().map_err(|e| api("tempdir", e))?;
        let c = ClusterRef {
            name: "c1".into(),
            id: "id-1".into(),
        };
        let opts = FakeOptions {
            delay: Duration::ZERO,
            fail_ensure: Some("c1-cp-0".into()),
        };
        let p = FakeProvider::new(tmp.path(), opts)?;
        let err = p.ensure_machine(&c, &spec("c1-cp-0", MachineRole::ControlPlane, None));
        assert!(matches!(err, Err(ProviderError::Api { .. })), "{err:?}");
        assert!(p.list_machines(&c)?.is_empty());
        fs::write(tmp.path().join(MACHINES_FILE), b"{").map_err(|e| api("write", e))?;
        let err = p
            .list_machines(&c)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(
            err.contains("is corrupt") && err.contains("machines.json"),
            "{err}"
        );
        Ok(())
    }

    #[cfg(feature = "conformance")]
    #[test]
    fn conformance_suite_passes() -> std::result::Result<(), crate::conformance::ConformanceError> {
        let tmp = tempfile::tempdir().map_err(crate::conformance::ConformanceError::setup)?;
        let p = FakeProvider::new(tmp.path(), FakeOptions::default())
            .map_err(crate::conformance::ConformanceError::setup)?;
        let template = spec("unused", MachineRole::Worker, Some("p"));
        let mut other = template.image.clone();
        other.version = "v2".into();
        other.digest = "sha256:def".into();
        let probe = FakeProbe(
            FakeProvider::new(tmp.path(), FakeOptions::default())
                .map_err(crate::conformance::ConformanceError::setup)?,
        );
        let fixture = crate::conformance::Fixture::new("fk", template, other)
            .with_probe(std::sync::Arc::new(probe));
        crate::conformance::run_all(&p, &fixture)?;
        // Every check cleaned up after itself.
        assert_eq!(
            p.all_machines()
                .map_err(crate::conformance::ConformanceError::setup)?,
            vec![]
        );
        Ok(())
    }
}
