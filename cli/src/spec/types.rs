//! The `Cluster` document (`cluster.yaml`) as Rust types.
//!
//! Every struct rejects unknown fields and uses camelCase names, like Kubernetes objects. Fields
//! with a default carry it through serde, so a parsed document already holds concrete values;
//! [`Cluster::with_defaults`] fills the few defaults that depend on other fields. The defaulted
//! document serializes back to the complete spec that `clusterctl plan` shows.

use std::collections::BTreeMap;
use std::path::PathBuf;

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

use super::values::{Duration, KubernetesVersion, MaxUnhealthy, Quantity, Recurrence, Timestamp};

/// The only `apiVersion` this build understands.
pub const API_VERSION: &str = "clusterctl.io/v1alpha1";

/// Version of the document schema (`apiVersion`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub enum ApiVersion {
    /// `clusterctl.io/v1alpha1`.
    #[default]
    #[serde(rename = "clusterctl.io/v1alpha1")]
    V1alpha1,
}

/// Kind of the document (`kind`); only `Cluster` exists.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub enum Kind {
    /// A cluster.
    #[default]
    Cluster,
}

/// A whole `cluster.yaml` document.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Cluster {
    /// Schema version, `clusterctl.io/v1alpha1`.
    pub api_version: ApiVersion,
    /// Always `Cluster`.
    pub kind: Kind,
    /// Name and labels of the cluster.
    pub metadata: Metadata,
    /// Desired state of the cluster.
    pub spec: ClusterSpec,
}

/// Name and labels of the cluster.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Metadata {
    /// Cluster name: a DNS-1123 label of at most 30 characters; prefixes machine names.
    pub name: String,
    /// Labels of the cluster (Kubernetes label syntax); copied to provider resources where possible.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
}

/// Desired state of a cluster.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ClusterSpec {
    /// Where machines come from.
    pub provider: Provider,
    /// Kubernetes version or channel, artifacts and cluster networking.
    pub kubernetes: Kubernetes,
    /// Control plane machines.
    #[serde(default)]
    pub control_plane: ControlPlane,
    /// Worker node pools. May be empty only when `controlPlane.schedulable` is true.
    #[serde(default)]
    pub node_pools: Vec<NodePool>,
    /// Node image selection.
    #[serde(default)]
    pub node_image: NodeImage,
    /// How clusterctl reaches machines over SSH.
    #[serde(default)]
    pub ssh: Ssh,
    /// When automatic maintenance may happen: auto-upgrade runs inside the recurring window and
    /// outside exclusions of its scope; exclusions also hold repairs that replace machines.
    #[serde(default)]
    pub maintenance_policy: MaintenancePolicy,
    /// Automatic upgrades (node images; the channel's Kubernetes releases are shown only).
    #[serde(default)]
    pub auto_upgrade: AutoUpgrade,
    /// Automatic repair of unhealthy nodes. Not implemented yet: off by default, and validation
    /// refuses `enabled: true`.
    #[serde(default)]
    pub auto_repair: AutoRepair,
    /// Who may do what in the cluster: roles granted to users, groups and service accounts,
    /// reconciled into Kubernetes RBAC (`clusterctl access`).
    #[serde(default)]
    pub access: Access,
}

impl ClusterSpec {
    /// Largest number of machines the cluster may have at once: the control plane, every pool
    /// at its maximum size, plus every pool's upgrade surge.
    pub fn max_machines(&self) -> u64 {
        super::validate::max_machines(self)
    }
}

/// Machine provider, one key naming the provider (`libvirt`, `gce`, `fake`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum Provider {
    /// VMs on a libvirt/QEMU host, local or over SSH.
    Libvirt(LibvirtProvider),
    /// Google Compute Engine instances. Not implemented yet: validation refuses it.
    Gce(GceProvider),
    /// In-memory provider that keeps its state in a file; for tests.
    Fake(FakeProvider),
}

impl Provider {
    /// Short name of the provider as written in the spec (`libvirt`, `gce`, `fake`).
    pub fn name(&self) -> &'static str {
        match self {
            Provider::Libvirt(_) => "libvirt",
            Provider::Gce(_) => "gce",
            Provider::Fake(_) => "fake",
        }
    }
}

/// Default libvirt connection URI.
pub const DEFAULT_LIBVIRT_URI: &str = "qemu:///system";
/// Default directory of the libvirt storage pool holding node disks.
pub const DEFAULT_STORAGE_DIR: &str = "/var/lib/clusterctl/storage";

/// libvirt provider settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct LibvirtProvider {
    /// Connection URI: `qemu:///system` or `qemu+ssh://user@host/system`.
    #[serde(default = "default_libvirt_uri")]
    pub uri: String,
    /// Network the machines are attached to.
    #[serde(default)]
    pub network: LibvirtNetwork,
    /// Absolute path of the storage pool directory on the libvirt host.
    #[serde(default = "default_storage_dir")]
    pub storage_dir: PathBuf,
    /// CPU virtualization: `kvm`, `tcg` (emulation) or `auto` (kvm when usable).
    #[serde(default)]
    pub accelerator: Accelerator,
}

fn default_libvirt_uri() -> String {
    DEFAULT_LIBVIRT_URI.to_owned()
}

fn default_storage_dir() -> PathBuf {
    PathBuf::from(DEFAULT_STORAGE_DIR)
}

impl Default for LibvirtProvider {
    fn default() -> Self {
        Self {
            uri: default_libvirt_uri(),
            network: LibvirtNetwork::default(),
            storage_dir: default_storage_dir(),
            accelerator: Accelerator::default(),
        }
    }
}

/// The machine network of a libvirt cluster.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct LibvirtNetwork {
    /// How the network reaches the outside. Only `isolated` is implemented; validation refuses
    /// `nat` and `bridge`.
    #[serde(default)]
    pub mode: NetworkMode,
    /// Existing host bridge to attach to; required with `mode: bridge`, not allowed otherwise.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bridge: Option<String>,
    /// CIDR of the machine network (a configuration value; machines get addresses in it).
    #[serde(default = "default_machine_cidr", with = "super::values::cidr")]
    pub cidr: IpNet,
}

/// Default machine network of libvirt clusters.
pub fn default_machine_cidr() -> IpNet {
    IpNet::V4(ipnet::Ipv4Net::new_assert(
        std::net::Ipv4Addr::new(10, 77, 0, 0),
        24,
    ))
}

impl Default for LibvirtNetwork {
    fn default() -> Self {
        Self {
            mode: NetworkMode::default(),
            bridge: None,
            cidr: default_machine_cidr(),
        }
    }
}

/// libvirt network mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum NetworkMode {
    /// A private network with no route out (the default).
    #[default]
    Isolated,
    /// A private network NATed to the host's uplink.
    Nat,
    /// Attach to an existing host bridge (`bridge` names it).
    Bridge,
}

/// CPU virtualization of libvirt machines.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum Accelerator {
    /// Hardware virtualization; fails where /dev/kvm is unusable.
    Kvm,
    /// QEMU emulation; slow but works everywhere.
    Tcg,
    /// KVM when usable, else TCG.
    #[default]
    Auto,
}

/// Google Compute Engine provider settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct GceProvider {
    /// Project ID.
    pub project: String,
    /// Zone such as `europe-west1-b`.
    pub zone: String,
    /// Where credentials come from.
    #[serde(default)]
    pub credentials: GceCredentials,
    /// VPC network name.
    #[serde(default = "default_gce_network")]
    pub network: String,
}

fn default_gce_network() -> String {
    "default".to_owned()
}

/// Source of GCE credentials: `applicationDefault` or `{file: PATH}`.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum GceCredentials {
    /// Application default credentials (environment, gcloud, metadata server).
    #[default]
    ApplicationDefault,
    /// A service account key file.
    File(PathBuf),
}

/// Fake provider settings (tests).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct FakeProvider {
    /// Directory holding the fake provider's state file.
    pub directory: PathBuf,
}

/// Default pod network.
pub fn default_pod_cidr() -> IpNet {
    IpNet::V4(ipnet::Ipv4Net::new_assert(
        std::net::Ipv4Addr::new(10, 244, 0, 0),
        16,
    ))
}

/// Default service network.
pub fn default_service_cidr() -> IpNet {
    IpNet::V4(ipnet::Ipv4Net::new_assert(
        std::net::Ipv4Addr::new(10, 96, 0, 0),
        12,
    ))
}

fn default_cluster_domain() -> String {
    "cluster.local".to_owned()
}

/// Kubernetes version, artifacts and cluster networking.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Kubernetes {
    /// Exact version `MAJOR.MINOR.PATCH`; exclusive with `channel`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<KubernetesVersion>,
    /// Release channel; exclusive with `version`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub channel: Option<ReleaseChannel>,
    /// Where Kubernetes binaries come from.
    #[serde(default)]
    pub artifacts: ArtifactSource,
    /// Pod network.
    #[serde(
        default = "default_pod_cidr",
        rename = "podCIDR",
        with = "super::values::cidr"
    )]
    pub pod_cidr: IpNet,
    /// Service network.
    #[serde(
        default = "default_service_cidr",
        rename = "serviceCIDR",
        with = "super::values::cidr"
    )]
    pub service_cidr: IpNet,
    /// DNS domain of the cluster.
    #[serde(default = "default_cluster_domain")]
    pub cluster_domain: String,
}

/// Release channel (GKE's names).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum ReleaseChannel {
    /// Newest releases first.
    Rapid,
    /// Releases after they spent time in rapid.
    Regular,
    /// Releases after they spent time in regular.
    Stable,
}

/// Source of Kubernetes artifacts: `upstream` or `{bundle: {path: DIR}}`.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum ArtifactSource {
    /// Upstream release downloads, verified against published checksums.
    #[default]
    Upstream,
    /// A local bundle for air-gapped use.
    Bundle(Bundle),
}

/// A local artifact bundle.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Bundle {
    /// Bundle directory or archive; relative paths are relative to the spec file.
    pub path: PathBuf,
}

/// Size of a machine.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct MachineSize {
    /// Virtual CPUs.
    #[serde(default = "default_cpus")]
    pub cpus: u32,
    /// Memory, such as `2Gi` or `2048Mi`.
    #[serde(default = "default_memory")]
    pub memory: Quantity,
    /// Root disk, such as `20Gi`.
    #[serde(default = "default_disk")]
    pub disk: Quantity,
}

fn default_cpus() -> u32 {
    2
}

fn default_memory() -> Quantity {
    Quantity::from_bytes(2 * 1024 * 1024 * 1024)
}

fn default_disk() -> Quantity {
    Quantity::from_bytes(20 * 1024 * 1024 * 1024)
}

impl Default for MachineSize {
    fn default() -> Self {
        Self {
            cpus: default_cpus(),
            memory: default_memory(),
            disk: default_disk(),
        }
    }
}

/// Control plane machines.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ControlPlane {
    /// Number of control plane machines: 1, 3 or 5. Only 1 is implemented (workers and clients
    /// reach the API server at one machine's address); validation refuses 3 and 5.
    #[serde(default = "default_control_plane_count")]
    pub count: u32,
    /// Size of each control plane machine.
    #[serde(default)]
    pub machine: MachineSize,
    /// Whether workloads may run on control plane nodes (their NoSchedule taint is removed).
    /// Required when there are no node pools.
    #[serde(default)]
    pub schedulable: bool,
}

fn default_control_plane_count() -> u32 {
    1
}

impl Default for ControlPlane {
    fn default() -> Self {
        Self {
            count: default_control_plane_count(),
            machine: MachineSize::default(),
            schedulable: false,
        }
    }
}

/// A group of identical worker machines.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct NodePool {
    /// Pool name: a DNS-1123 label of at most 24 characters, unique in the cluster.
    pub name: String,
    /// Number of nodes (the initial number when autoscaling).
    pub count: u32,
    /// Size of each machine.
    #[serde(default)]
    pub machine: MachineSize,
    /// Kubernetes labels put on the pool's nodes.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    /// Taints put on the pool's nodes.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub taints: Vec<Taint>,
    /// Autoscaling bounds; absent means a fixed size. Not implemented yet: validation refuses it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub autoscaling: Option<Autoscaling>,
    /// How nodes are replaced during upgrades. Not implemented yet (nothing upgrades a pool):
    /// absent by default, and validation refuses it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub upgrade_settings: Option<UpgradeSettings>,
}

/// A Kubernetes node taint.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Taint {
    /// Taint key (label key syntax).
    pub key: String,
    /// Optional value (label value syntax).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value: Option<String>,
    /// What the taint does to pods that do not tolerate it.
    pub effect: TaintEffect,
}

/// Effect of a taint.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum TaintEffect {
    /// New pods without a toleration are not scheduled.
    NoSchedule,
    /// The scheduler avoids the node.
    PreferNoSchedule,
    /// Running pods without a toleration are evicted.
    NoExecute,
}

impl TaintEffect {
    /// The effect as Kubernetes spells it.
    pub fn as_str(self) -> &'static str {
        match self {
            TaintEffect::NoSchedule => "NoSchedule",
            TaintEffect::PreferNoSchedule => "PreferNoSchedule",
            TaintEffect::NoExecute => "NoExecute",
        }
    }
}

/// Autoscaling bounds of a node pool.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Autoscaling {
    /// Fewest nodes.
    pub min_count: u32,
    /// Most nodes.
    pub max_count: u32,
}

/// Surge upgrade settings of a node pool (GKE's names).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct UpgradeSettings {
    /// Extra nodes created during an upgrade.
    #[serde(default = "default_max_surge")]
    pub max_surge: u32,
    /// Nodes that may be unavailable at once during an upgrade.
    #[serde(default)]
    pub max_unavailable: u32,
}

fn default_max_surge() -> u32 {
    1
}

impl Default for UpgradeSettings {
    fn default() -> Self {
        Self {
            max_surge: default_max_surge(),
            max_unavailable: 0,
        }
    }
}

/// Node image selection.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct NodeImage {
    /// Image version; absent means the image matching this clusterctl build.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
}

/// Default SSH user of node images.
pub const DEFAULT_SSH_USER: &str = "core";

/// SSH access to machines.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Ssh {
    /// Login user on the machines.
    #[serde(default = "default_ssh_user")]
    pub user: String,
    /// Private key file; exclusive with `agent: true` and `generatedKey: true`. Relative paths
    /// are relative to the spec file, `~/` is the home directory.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub private_key: Option<PathBuf>,
    /// Authenticate with the keys of the running ssh-agent (`SSH_AUTH_SOCK`).
    #[serde(default, skip_serializing_if = "is_false")]
    pub agent: bool,
    /// clusterctl generates a key pair for this cluster, keeps the private half in the cluster's
    /// state and installs the public half on every machine it creates. The default when neither
    /// `privateKey` nor `agent: true` is given (see [`Cluster::with_defaults`]), so a fresh
    /// machine needs no prearranged key. Read the choice with [`Ssh::key_source`].
    #[serde(default, skip_serializing_if = "is_false")]
    pub generated_key: bool,
    /// Jump host between clusterctl and the machines. Not implemented yet: the SSH client can
    /// use a jump host, but no command connects through this one; validation refuses it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bastion: Option<Bastion>,
}

fn default_ssh_user() -> String {
    DEFAULT_SSH_USER.to_owned()
}

// serde's skip_serializing_if passes a reference.
fn is_false(b: &bool) -> bool {
    !*b
}

/// Where the SSH key that logs in to the machines comes from; see [`Ssh::key_source`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeySource {
    /// A private key file, as written in the spec (resolve it with [`crate::spec::resolve_path`]).
    File(PathBuf),
    /// The keys of the running ssh-agent (`SSH_AUTH_SOCK`).
    Agent,
    /// A key pair clusterctl generates once per cluster and keeps in the cluster's state.
    Generated,
}

impl Ssh {
    /// The key source this spec selects. Validation guarantees at most one of `privateKey`,
    /// `agent: true` and `generatedKey: true` is set; when none is (a spec that was not
    /// defaulted), the answer is [`KeySource::Generated`], the same as the default.
    pub fn key_source(&self) -> KeySource {
        match (&self.private_key, self.agent) {
            (Some(path), _) => KeySource::File(path.clone()),
            (None, true) => KeySource::Agent,
            (None, false) => KeySource::Generated,
        }
    }
}

impl Default for Ssh {
    fn default() -> Self {
        Self {
            user: default_ssh_user(),
            private_key: None,
            agent: false,
            generated_key: false,
            bastion: None,
        }
    }
}

/// An SSH jump host.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Bastion {
    /// Host name or address.
    pub host: String,
    /// SSH port.
    #[serde(default = "default_ssh_port")]
    pub port: u16,
    /// Login user on the bastion; defaults to `ssh.user`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
}

fn default_ssh_port() -> u16 {
    22
}

/// When automatic maintenance (upgrades, repairs that recreate machines) may happen.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct MaintenancePolicy {
    /// Recurring window; absent means any time.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub window: Option<MaintenanceWindow>,
    /// Periods in which some maintenance must not happen.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub exclusions: Vec<MaintenanceExclusion>,
}

/// A recurring maintenance window (GKE's recurring window).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct MaintenanceWindow {
    /// First start of the window (RFC 3339).
    pub start_time: Timestamp,
    /// Length of each occurrence; exclusive with `endTime`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub duration: Option<Duration>,
    /// End of the first occurrence (RFC 3339); exclusive with `duration`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub end_time: Option<Timestamp>,
    /// Recurrence rule (RFC 5545 RRULE), such as `FREQ=WEEKLY;BYDAY=SA,SU`.
    pub recurrence: Recurrence,
}

impl MaintenanceWindow {
    /// Length of each occurrence, from `duration` or `endTime - startTime`.
    pub fn length(&self) -> Option<Duration> {
        match (self.duration, &self.end_time) {
            (Some(d), _) => Some(d),
            (None, Some(end)) => {
                let secs = end.unix_seconds() - self.start_time.unix_seconds();
                u64::try_from(secs).ok().map(Duration::from_secs)
            }
            (None, None) => None,
        }
    }
}

/// A maintenance exclusion (GKE's names and scopes).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct MaintenanceExclusion {
    /// Name, unique among exclusions.
    pub name: String,
    /// Start (RFC 3339).
    pub start_time: Timestamp,
    /// End (RFC 3339), after `startTime`.
    pub end_time: Timestamp,
    /// What is excluded.
    #[serde(default)]
    pub scope: ExclusionScope,
}

/// Scope of a maintenance exclusion.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum ExclusionScope {
    /// No upgrades at all (at most 30 days).
    #[default]
    NoUpgrades,
    /// No minor version upgrades; patch upgrades continue.
    NoMinorUpgrades,
    /// No minor version upgrades and no node upgrades.
    NoMinorOrNodeUpgrades,
}

/// Automatic upgrades (`clusterctl upgrade NAME --auto`, run by the schedule
/// `clusterctl autoupgrade enable` installs): the newest node image built here is rolled out
/// inside the maintenance window, outside exclusions, after the last upgrade soaked. With
/// `kubernetes.channel`, the channel's next Kubernetes release is shown as due (`plan --next`)
/// but not carried out: upgrading a channel cluster's Kubernetes is not built yet.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AutoUpgrade {
    /// Upgrade on the schedule `clusterctl autoupgrade enable` installs. Off by default.
    #[serde(default)]
    pub enabled: bool,
    /// Least time between the end of one upgrade (by hand or automatic) and the start of the
    /// next automatic one (GKE: 24 h between patch upgrades).
    #[serde(default = "default_soak")]
    pub soak: Duration,
}

fn default_soak() -> Duration {
    Duration::from_secs(86_400)
}

impl Default for AutoUpgrade {
    fn default() -> Self {
        Self {
            enabled: false,
            soak: default_soak(),
        }
    }
}

/// Automatic repair of unhealthy nodes (cluster-api MachineHealthCheck semantics, GKE's
/// auto-repair): `clusterctl repair` reads these settings, and `clusterctl autorepair enable`
/// runs it on a schedule. Off by default: a scheduled run skips a cluster with `enabled: false`
/// (an explicit `clusterctl repair NAME` still repairs).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AutoRepair {
    /// Repair unhealthy nodes on the schedule `clusterctl autorepair enable` installs.
    #[serde(default)]
    pub enabled: bool,
    /// How long a node must be NotReady (or unreachable) before it is power-cycled or replaced
    /// (GKE: about 10 minutes). Stopped units are restarted without waiting.
    #[serde(default = "default_unhealthy_threshold")]
    pub unhealthy_threshold: Duration,
    /// How long `DiskPressure` must last before the node is repaired (GKE: about 30 minutes).
    #[serde(default = "default_disk_pressure_threshold")]
    pub disk_pressure_threshold: Duration,
    /// How long a new machine may take to become a Ready node before it is replaced (Cluster
    /// API's nodeStartupTimeout, 10 minutes).
    #[serde(default = "default_node_startup_timeout")]
    pub node_startup_timeout: Duration,
    /// Stop repairing when more nodes than this are unhealthy (count or percent like `40%`):
    /// a network partition must not set off a wave of replacements.
    #[serde(default = "default_max_unhealthy")]
    pub max_unhealthy: MaxUnhealthy,
}

fn default_unhealthy_threshold() -> Duration {
    Duration::from_secs(600)
}

fn default_disk_pressure_threshold() -> Duration {
    Duration::from_secs(1800)
}

fn default_node_startup_timeout() -> Duration {
    Duration::from_secs(600)
}

fn default_max_unhealthy() -> MaxUnhealthy {
    MaxUnhealthy::Percent(40)
}

impl Default for AutoRepair {
    fn default() -> Self {
        Self {
            enabled: false,
            unhealthy_threshold: default_unhealthy_threshold(),
            disk_pressure_threshold: default_disk_pressure_threshold(),
            node_startup_timeout: default_node_startup_timeout(),
            max_unhealthy: default_max_unhealthy(),
        }
    }
}

/// Access bindings.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Access {
    /// Members and the role each gets.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub bindings: Vec<AccessBinding>,
}

/// Members bound to a role.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AccessBinding {
    /// Members: `user:NAME`, `group:NAME` or `serviceAccount:NAMESPACE/NAME`.
    pub members: Vec<String>,
    /// Role granted to the members.
    pub role: Role,
    /// Namespaces the role is granted in (RoleBindings); empty: the whole cluster
    /// (a ClusterRoleBinding).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub namespaces: Vec<String>,
}

/// A role of an access binding.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Role {
    /// Read-only access to most objects in all namespaces (Kubernetes `view`).
    Viewer,
    /// Read/write access to workloads in all namespaces (Kubernetes `edit`).
    Developer,
    /// Full access within namespaces (Kubernetes `admin`).
    Admin,
    /// Full access to everything (Kubernetes `cluster-admin`).
    ClusterAdmin,
}

impl Role {
    /// Every role, least to most powerful.
    pub const ALL: [Role; 4] = [
        Role::Viewer,
        Role::Developer,
        Role::Admin,
        Role::ClusterAdmin,
    ];

    /// The name in the spec and on the command line (`viewer`, `developer`, `admin`,
    /// `cluster-admin`).
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Viewer => "viewer",
            Role::Developer => "developer",
            Role::Admin => "admin",
            Role::ClusterAdmin => "cluster-admin",
        }
    }

    /// The built-in Kubernetes ClusterRole the role binds.
    pub fn cluster_role(self) -> &'static str {
        match self {
            Role::Viewer => "view",
            Role::Developer => "edit",
            Role::Admin => "admin",
            Role::ClusterAdmin => "cluster-admin",
        }
    }
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for Role {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Role::ALL
            .into_iter()
            .find(|r| r.as_str() == s)
            .ok_or_else(|| {
                format!("unknown role {s:?}: expected viewer, developer, admin or cluster-admin")
            })
    }
}

/// Kind of an access member, from its prefix.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum MemberKind {
    /// `user:NAME`.
    User,
    /// `group:NAME`.
    Group,
    /// `serviceAccount:NAMESPACE/NAME`.
    ServiceAccount,
}

/// Splits an access member such as `user:a@b` into its kind and name.
pub fn parse_member(member: &str) -> Option<(MemberKind, &str)> {
    let (prefix, name) = member.split_once(':')?;
    let kind = match prefix {
        "user" => MemberKind::User,
        "group" => MemberKind::Group,
        "serviceAccount" => MemberKind::ServiceAccount,
        _ => return None,
    };
    Some((kind, name))
}

impl Cluster {
    /// Returns the spec with every default filled in, including those that depend on other
    /// fields (a bastion's user defaults to `ssh.user`; with neither `ssh.privateKey` nor
    /// `ssh.agent: true`, `ssh.generatedKey` becomes true). Serde already fills the plain
    /// defaults at parse time; the result is what `clusterctl plan` shows.
    pub fn with_defaults(&self) -> Cluster {
        let mut c = self.clone();
        let ssh = &mut c.spec.ssh;
        if ssh.private_key.is_none() && !ssh.agent {
            ssh.generated_key = true;
        }
        let user = c.spec.ssh.user.clone();
        if let Some(b) = c.spec.ssh.bastion.as_mut()
            && b.user.is_none()
        {
            b.user = Some(user);
        }
        c
    }

    /// Name of the cluster.
    pub fn name(&self) -> &str {
        &self.metadata.name
    }
}
