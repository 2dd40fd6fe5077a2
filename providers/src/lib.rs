//! Machine providers for clusterctl.
//!
//! A provider turns a [`MachineSpec`] into a running virtual machine and finds the machines of a
//! cluster again by the labels it put on them, never by guessing names. The verb set is small on
//! purpose (ensure, list, delete, plus cluster-wide cleanup) so that every provider, local or cloud,
//! can pass the same conformance suite.
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
    /// Extra labels to attach besides the cluster labels.
    pub labels: BTreeMap<String, String>,
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
    /// Addresses the admin machine can reach it on (may be empty while booting).
    pub addresses: Vec<IpAddr>,
    /// Failure domain (zone, host) if the provider has one.
    pub failure_domain: Option<String>,
    /// Digest of the image the machine was created from.
    pub image_digest: Option<String>,
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
    /// Any other failure of the provider's API.
    #[error("{operation} failed: {detail}")]
    Api {
        /// What was being done, e.g. `defining domain "c1-cp-0"`.
        operation: String,
        /// What the underlying API said.
        detail: String,
    },
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
}
