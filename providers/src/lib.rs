//! Machine providers for clusterctl.
//!
//! A provider turns a [`MachineSpec`] into a running virtual machine and finds the machines of a
//! cluster again by the labels it put on them, never by guessing names. The verb set is small on
//! purpose so that every provider, local or cloud, can pass the same conformance suite:
//! - day 1: ensure, list, delete, and cluster-wide cleanup with an inventory to prove it;
//! - day 2: stop, reset (power-cycle a hung machine) and boot-disk replacement (the immutable-node
//!   upgrade path: a new OS image on a fresh boot disk, the data disk, address and host identity
//!   kept; rollback is the same call with the old image).
//!
//! Errors carry a kind ([`ErrorKind`]) a control loop can act on: retry, wait, or stop.
//!
//! The trait is synchronous: libvirt's C API blocks, and cloud APIs are called with a blocking
//! client too. The engine calls providers from `tokio::task::spawn_blocking`.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

#[cfg(feature = "conformance")]
pub mod conformance;
#[cfg(feature = "fake")]
pub mod fake;
#[cfg(feature = "gce")]
pub mod gce;
#[cfg(feature = "libvirt")]
pub mod libvirt;

/// Label key that carries the cluster's unique ID on every resource a provider creates.
pub const LABEL_CLUSTER_ID: &str = "clusterctl.io/cluster-id";
/// Label key that carries the cluster's name (informational; identity is the ID).
pub const LABEL_CLUSTER_NAME: &str = "clusterctl.io/cluster-name";
/// Label key that carries the machine's role (`control-plane` or `worker`).
pub const LABEL_ROLE: &str = "clusterctl.io/role";
/// Label key that carries the node pool name for worker machines.
pub const LABEL_POOL: &str = "clusterctl.io/pool";

/// Identity of the cluster whose resources a provider call concerns.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterRef {
    /// Cluster name from `metadata.name` (DNS-1123 label).
    pub name: String,
    /// Unique ID generated when the cluster is first created; stored in the cluster state.
    pub id: String,
}

/// Role of a machine in the cluster.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum MachineRole {
    /// Runs etcd and the Kubernetes control plane.
    ControlPlane,
    /// Runs workloads; belongs to a node pool.
    Worker,
}

/// Size of a machine.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MachineSize {
    /// Virtual CPUs.
    pub cpus: u32,
    /// Memory in MiB.
    pub memory_mib: u64,
    /// Size of the persistent data disk in GiB (containerd, kubelet, etcd state).
    pub disk_gib: u64,
}

/// Kind of a machine address, named as Kubernetes names node addresses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum AddressKind {
    /// Reachable inside the cluster's network (and from the admin machine on a local provider).
    #[serde(rename = "InternalIP")]
    Internal,
    /// Reachable from outside the cluster's network (a cloud's public address).
    #[serde(rename = "ExternalIP")]
    External,
}

/// A typed machine address.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub struct MachineAddress {
    /// Internal or external.
    #[serde(rename = "type")]
    pub kind: AddressKind,
    /// The IP address.
    pub address: IpAddr,
}

impl MachineAddress {
    /// An internal address.
    #[must_use]
    pub fn internal(address: IpAddr) -> Self {
        MachineAddress {
            kind: AddressKind::Internal,
            address,
        }
    }
}

/// Parses an IP address as an internal address.
impl std::str::FromStr for MachineAddress {
    type Err = std::net::AddrParseError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        s.parse().map(MachineAddress::internal)
    }
}

impl std::fmt::Display for MachineAddress {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.address.fmt(f)
    }
}

/// Reads `{"type": "InternalIP", "address": "10.0.0.2"}`, and a bare `"10.0.0.2"` as an internal
/// address (state files written before addresses were typed).
impl<'de> Deserialize<'de> for MachineAddress {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Repr {
            Bare(IpAddr),
            Typed {
                #[serde(rename = "type")]
                kind: AddressKind,
                address: IpAddr,
            },
        }
        Ok(match Repr::deserialize(d)? {
            Repr::Bare(address) => MachineAddress::internal(address),
            Repr::Typed { kind, address } => MachineAddress { kind, address },
        })
    }
}

/// A reference to a built node image that a provider can boot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageRef {
    /// Image version, e.g. `2026.11.26-3f2a9c1d`.
    pub version: String,
    /// Directory that holds the image artifacts and its manifest.
    pub dir: PathBuf,
    /// sha256 of the image manifest, so a changed image is never mistaken for the same one.
    pub digest: String,
}

/// Everything a provider needs to create one machine. Produced by the planner; leaves no choices.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MachineSpec {
    /// Machine name, unique within the cluster (DNS-1123 label), also its hostname.
    pub name: String,
    /// Role of the machine.
    pub role: MachineRole,
    /// Node pool of a worker; `None` for control plane machines.
    pub pool: Option<String>,
    /// Size of the machine.
    pub size: MachineSize,
    /// Node image to boot.
    pub image: ImageRef,
    /// First-boot configuration (cloud-init NoCloud `user-data`), rendered by the `templates` crate.
    /// It carries the SSH host key clusterctl generated, so the key is pinned before first contact.
    pub user_data: String,
    /// Extra labels to attach besides the cluster labels. Keys may hold `.` and `/`
    /// (`example.com/team`); each provider encodes them as its API allows and reads them back.
    pub labels: BTreeMap<String, String>,
    /// Zone or failure domain to place the machine in; `None` lets the provider choose (a
    /// provider with a single failure domain refuses any other).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failure_domain: Option<String>,
}

/// Observed lifecycle state of a machine.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum MachineState {
    /// Being created or booting.
    Pending,
    /// Running.
    Running,
    /// Exists but is not running.
    Stopped,
    /// The provider reports a failure.
    Failed,
    /// The provider could not tell.
    Unknown,
}

/// A machine as observed through a provider (cluster-api's machine contract).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Machine {
    /// Machine name.
    pub name: String,
    /// Provider-specific ID, e.g. `libvirt:///<domain-uuid>` or `gce://project/zone/name`.
    pub provider_id: String,
    /// Role, read back from the machine's labels.
    pub role: MachineRole,
    /// Node pool, read back from the machine's labels.
    pub pool: Option<String>,
    /// Lifecycle state.
    pub state: MachineState,
    /// Typed addresses (may be empty while booting or stopped).
    pub addresses: Vec<MachineAddress>,
    /// Failure domain (zone, host) if the provider has one.
    pub failure_domain: Option<String>,
    /// Digest of the image the machine boots (after a boot-disk replacement, the new one).
    pub image_digest: Option<String>,
    /// Its size as the provider reports it (CPUs and memory as defined, the data disk's
    /// capacity); `None` if the provider cannot tell. The planner compares it with the spec's
    /// and replaces a machine whose size differs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size: Option<MachineSize>,
    /// Extra labels, read back and decoded (the cluster labels are not repeated here).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
}

impl Machine {
    /// Addresses of one kind, in the provider's order.
    pub fn addresses_of(&self, kind: AddressKind) -> impl Iterator<Item = IpAddr> + '_ {
        self.addresses
            .iter()
            .filter(move |a| a.kind == kind)
            .map(|a| a.address)
    }
}

/// One resource a provider made for a cluster (for inventories: `delete_cluster` must leave none).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Resource {
    /// Kind: `domain`, `volume`, `network`, `storage-pool`, `instance`, `disk`, ...
    pub kind: String,
    /// Name (volumes as `pool/volume`).
    pub name: String,
}

/// What a control loop does about a provider error: the error-to-action policy every caller shares.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ErrorKind {
    /// The machine (or other resource) does not exist: re-plan, do not retry the same call.
    NotFound,
    /// The name is taken (by something not this cluster's): stop, a person must rename or remove.
    AlreadyExists,
    /// Out of quota or capacity: wait (minutes), then try again; report it.
    Quota,
    /// Transient (service unreachable, timeout, busy): retry with backoff.
    Retryable,
    /// Anything else (bad input, missing image, API refusal): stop and report.
    Permanent,
}

/// What to do about an error of a [`ErrorKind`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorAction {
    /// Call again after a short backoff (seconds).
    Retry,
    /// Call again after a long pause (minutes): capacity may come back.
    Wait,
    /// Stop and report.
    Fail,
}

impl ErrorKind {
    /// The one error-to-action policy.
    #[must_use]
    pub fn action(self) -> ErrorAction {
        match self {
            ErrorKind::Retryable => ErrorAction::Retry,
            ErrorKind::Quota => ErrorAction::Wait,
            ErrorKind::NotFound | ErrorKind::AlreadyExists | ErrorKind::Permanent => {
                ErrorAction::Fail
            }
        }
    }
}

/// Errors a provider returns. Each names the resource and what to do.
#[derive(Debug, thiserror::Error)]
pub enum ProviderError {
    /// The provider endpoint (libvirt URI, cloud API) could not be reached.
    #[error(
        "cannot connect to {endpoint}: {detail}; check that the service is running and the URI is right"
    )]
    Unreachable {
        /// The endpoint, e.g. `qemu:///system`.
        endpoint: String,
        /// What the underlying library said.
        detail: String,
    },
    /// A resource with the wanted name exists but does not carry this cluster's labels.
    #[error(
        "{kind} {name:?} already exists and was not created by this cluster; rename the cluster or remove the {kind} yourself"
    )]
    NameClash {
        /// Kind of resource: `domain`, `volume`, `network`, `instance`.
        kind: &'static str,
        /// Its name.
        name: String,
    },
    /// The node image to boot is missing or incomplete.
    #[error("node image {image} is not usable: {detail}; build it with `clusterctl image build`")]
    ImageMissing {
        /// The image directory or version.
        image: String,
        /// What is missing.
        detail: String,
    },
    /// The request is invalid for this provider.
    #[error("invalid request: {0}")]
    Invalid(String),
    /// The machine the call names does not exist (in this cluster).
    #[error(
        "{kind} {name:?} does not exist in this cluster; run `clusterctl get` to see its machines"
    )]
    NotFound {
        /// Kind of resource: `machine`, `domain`, `instance`.
        kind: &'static str,
        /// Its name.
        name: String,
    },
    /// Out of quota or capacity (disk space, memory, a cloud quota).
    #[error(
        "{operation} failed: out of capacity: {detail}; free capacity or raise the quota, then run the command again"
    )]
    Quota {
        /// What was being done.
        operation: String,
        /// What the underlying API said.
        detail: String,
    },
    /// A transient failure: the same call may well succeed shortly.
    #[error("{operation} failed for now: {detail}; it is retried, or run the command again")]
    Retryable {
        /// What was being done.
        operation: String,
        /// What the underlying API said.
        detail: String,
    },
    /// Any other failure of the provider's API.
    #[error("{operation} failed: {detail}")]
    Api {
        /// What was being done, e.g. `defining domain "c1-cp-0"`.
        operation: String,
        /// What the underlying API said.
        detail: String,
    },
}

impl ProviderError {
    /// The kind of this error, for [`ErrorKind::action`].
    #[must_use]
    pub fn kind(&self) -> ErrorKind {
        match self {
            ProviderError::Unreachable { .. } | ProviderError::Retryable { .. } => {
                ErrorKind::Retryable
            }
            ProviderError::NameClash { .. } => ErrorKind::AlreadyExists,
            ProviderError::NotFound { .. } => ErrorKind::NotFound,
            ProviderError::Quota { .. } => ErrorKind::Quota,
            ProviderError::ImageMissing { .. }
            | ProviderError::Invalid(_)
            | ProviderError::Api { .. } => ErrorKind::Permanent,
        }
    }
}

/// Whether `s` is a DNS-1123 label: 1-63 lowercase letters, digits and '-', starting and ending
/// with a letter or digit. Cluster, node pool and machine names all follow this rule (machine names
/// become domain names and hostnames).
pub fn is_dns1123_label(s: &str) -> bool {
    let b = s.as_bytes();
    !b.is_empty()
        && b.len() <= 63
        && b.iter()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
        && b[0] != b'-'
        && b[b.len() - 1] != b'-'
}

/// Checks that a machine name is a DNS-1123 label, the error every provider returns otherwise.
pub fn check_machine_name(name: &str) -> Result<()> {
    if is_dns1123_label(name) {
        Ok(())
    } else {
        Err(ProviderError::Invalid(format!(
            "machine name {name:?} must be a DNS-1123 label (lowercase letters, digits and '-', at most 63 characters)"
        )))
    }
}

/// Result type of provider calls.
pub type Result<T, E = ProviderError> = std::result::Result<T, E>;

/// The provider contract. Every implementation passes the shared conformance suite.
pub trait Provider: Send + Sync {
    /// Short provider name: `libvirt`, `gce`, `fake`.
    fn name(&self) -> &'static str;

    /// Creates the machine if it does not exist and starts it if it is stopped. Ensuring a machine
    /// that already exists with this cluster's labels changes nothing. A same-named resource that
    /// is not this cluster's is an error ([`ProviderError::NameClash`]) and is left untouched.
    fn ensure_machine(&self, cluster: &ClusterRef, spec: &MachineSpec) -> Result<Machine>;

    /// Lists the machines carrying the cluster's ID label.
    fn list_machines(&self, cluster: &ClusterRef) -> Result<Vec<Machine>>;

    /// Deletes the machine and its disks. Succeeds if it is already gone.
    fn delete_machine(&self, cluster: &ClusterRef, name: &str) -> Result<()>;

    /// Deletes every resource carrying the cluster's ID label (machines, disks, networks, base
    /// images). Succeeds if nothing is left. Used by `clusterctl delete` and after a crash.
    fn delete_cluster(&self, cluster: &ClusterRef) -> Result<()>;

    /// Everything the provider made for the cluster (machines, disks, images, networks, pools):
    /// empty exactly when `delete_cluster` has nothing left to do.
    fn inventory(&self, cluster: &ClusterRef) -> Result<Vec<Resource>>;

    /// Powers the machine off: a graceful shutdown first (the provider's grace period), then a
    /// hard stop. Succeeds if it is already stopped. [`ProviderError::NotFound`] if it does not
    /// exist.
    fn stop_machine(&self, cluster: &ClusterRef, name: &str) -> Result<Machine>;

    /// Power-cycles the machine (a hard reset, as a hung guest needs); starts it if it is stopped.
    /// [`ProviderError::NotFound`] if it does not exist.
    fn reset_machine(&self, cluster: &ClusterRef, name: &str) -> Result<Machine>;

    /// Boots the machine from a fresh boot disk made from `image`, keeping its data disk, its
    /// addresses, its provider ID and its host identity (first-boot seed, host keys). The machine
    /// is stopped (as [`Provider::stop_machine`]) and started again. Idempotent: a machine that
    /// already boots `image` is only started if it is stopped; a call interrupted at any point
    /// can be repeated. Rollback is the same call with the previous image.
    fn replace_boot_disk(
        &self,
        cluster: &ClusterRef,
        name: &str,
        image: &ImageRef,
    ) -> Result<Machine>;

    /// Gives the machine the CPUs and memory of `size`, keeping its boot and data disks, its
    /// addresses, its provider ID and its host identity (what a control plane, which keeps its
    /// etcd data, needs). The machine is stopped (as [`Provider::stop_machine`]) and started
    /// again. The data disk keeps its size: a `size` with another `disk_gib` is refused
    /// ([`ProviderError::Invalid`]), since the node image does not grow its filesystem yet.
    /// Idempotent: a machine of that size already is only started if it is stopped; a call
    /// interrupted at any point can be repeated. Rollback is the same call with the old size.
    fn resize_machine(
        &self,
        cluster: &ClusterRef,
        name: &str,
        size: &MachineSize,
    ) -> Result<Machine>;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_are_typed_and_old_bare_addresses_still_read() {
        let typed: Vec<MachineAddress> =
            serde_json::from_str(r#"[{"type":"ExternalIP","address":"203.0.113.7"},"10.0.0.2"]"#)
                .expect("both forms parse");
        assert_eq!(typed[0].kind, AddressKind::External);
        assert_eq!(typed[1], "10.0.0.2".parse().expect("ip"));
        assert_eq!(
            serde_json::to_string(&typed[1]).expect("json"),
            r#"{"type":"InternalIP","address":"10.0.0.2"}"#
        );
    }

    #[test]
    fn every_error_has_a_kind_and_one_action() {
        let cases = [
            (
                ProviderError::Unreachable {
                    endpoint: "qemu:///system".into(),
                    detail: "refused".into(),
                },
                ErrorKind::Retryable,
                ErrorAction::Retry,
            ),
            (
                ProviderError::Retryable {
                    operation: "resetting domain".into(),
                    detail: "timed out".into(),
                },
                ErrorKind::Retryable,
                ErrorAction::Retry,
            ),
            (
                ProviderError::Quota {
                    operation: "creating volume".into(),
                    detail: "No space left on device".into(),
                },
                ErrorKind::Quota,
                ErrorAction::Wait,
            ),
            (
                ProviderError::NameClash {
                    kind: "domain",
                    name: "x".into(),
                },
                ErrorKind::AlreadyExists,
                ErrorAction::Fail,
            ),
            (
                ProviderError::NotFound {
                    kind: "machine",
                    name: "x".into(),
                },
                ErrorKind::NotFound,
                ErrorAction::Fail,
            ),
            (
                ProviderError::Invalid("bad".into()),
                ErrorKind::Permanent,
                ErrorAction::Fail,
            ),
            (
                ProviderError::ImageMissing {
                    image: "v1".into(),
                    detail: "gone".into(),
                },
                ErrorKind::Permanent,
                ErrorAction::Fail,
            ),
        ];
        for (e, kind, action) in cases {
            assert_eq!(e.kind(), kind, "{e}");
            assert_eq!(e.kind().action(), action, "{e}");
        }
    }
}
