//! Serde models of the Compute API v1 resources the provider uses, named and shaped as the
//! discovery document (`schema.rs`) has them. Only the fields clusterctl reads or writes are
//! here; unknown fields in responses are ignored, and `None` or empty fields are not sent.
//! 64-bit integers travel as decimal strings, as the API sends them.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// A long-running operation (`compute#operation`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Operation {
    /// Decimal ID.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    /// Name, used to poll it.
    #[serde(default)]
    pub name: String,
    /// `PENDING`, `RUNNING` or `DONE`.
    #[serde(default)]
    pub status: String,
    /// URL of the zone of a zonal operation.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub zone: Option<String>,
    /// `insert`, `delete`, `start`, ...
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub operation_type: Option<String>,
    /// URL of the resource the operation acts on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_link: Option<String>,
    /// Errors of a failed operation (set once DONE).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<OperationErrors>,
    /// HTTP status of a failed operation.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http_error_status_code: Option<i32>,
    /// HTTP message of a failed operation.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http_error_message: Option<String>,
    /// Own URL.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub self_link: Option<String>,
}

impl Operation {
    /// Whether the operation finished (with or without errors).
    pub fn is_done(&self) -> bool {
        self.status == "DONE"
    }
}

/// `Operation.error`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct OperationErrors {
    /// The errors.
    #[serde(default)]
    pub errors: Vec<OperationError>,
}

/// One error of a failed operation.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct OperationError {
    /// Error code such as `QUOTA_EXCEEDED` or `RESOURCE_NOT_FOUND`.
    #[serde(default)]
    pub code: String,
    /// What went wrong.
    #[serde(default)]
    pub message: String,
}

/// A metadata entry.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MetadataItem {
    /// Key.
    pub key: String,
    /// Value.
    #[serde(default)]
    pub value: String,
}

/// Instance metadata.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Metadata {
    /// Fingerprint for optimistic locking of `setMetadata`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fingerprint: Option<String>,
    /// Entries.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub items: Vec<MetadataItem>,
}

impl Metadata {
    /// The value of `key`.
    pub fn get(&self, key: &str) -> Option<&str> {
        self.items
            .iter()
            .find(|i| i.key == key)
            .map(|i| i.value.as_str())
    }
}

/// How a new disk is made when an instance is inserted.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AttachedDiskInitializeParams {
    /// Name of the new disk.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disk_name: Option<String>,
    /// Size in GiB.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disk_size_gb: Option<String>,
    /// Disk type URL (`zones/Z/diskTypes/pd-balanced`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disk_type: Option<String>,
    /// Image URL to fill it from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source_image: Option<String>,
    /// Labels of the new disk.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
}

/// A disk attached to an instance.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AttachedDisk {
    /// Whether the instance boots from it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub boot: Option<bool>,
    /// Whether deleting the instance deletes it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auto_delete: Option<bool>,
    /// Name the guest sees (`/dev/disk/by-id/google-NAME`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device_name: Option<String>,
    /// URL of an existing disk.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<String>,
    /// A disk made with the instance.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub initialize_params: Option<AttachedDiskInitializeParams>,
}

/// External access of a network interface.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AccessConfig {
    /// `ONE_TO_ONE_NAT`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[serde(rename = "type")]
    pub kind: Option<String>,
    /// Name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// External address (output).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[serde(rename = "natIP")]
    pub nat_ip: Option<String>,
}

/// A network interface.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NetworkInterface {
    /// Network URL.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub network: Option<String>,
    /// Subnetwork URL.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subnetwork: Option<String>,
    /// Internal address (output).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[serde(rename = "networkIP")]
    pub network_ip: Option<String>,
    /// External access.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub access_configs: Vec<AccessConfig>,
}

/// Network tags (firewall targets).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Tags {
    /// The tags.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub items: Vec<String>,
}

/// A VM instance.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Instance {
    /// Decimal ID (output).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    /// Name.
    pub name: String,
    /// Zone URL (output).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub zone: Option<String>,
    /// `PROVISIONING`, `STAGING`, `RUNNING`, `STOPPING`, `TERMINATED`, ... (output).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<String>,
    /// Machine type URL.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub machine_type: Option<String>,
    /// Labels.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    /// Fingerprint for `setLabels` (output).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub label_fingerprint: Option<String>,
    /// Metadata.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metadata: Option<Metadata>,
    /// Network interfaces.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub network_interfaces: Vec<NetworkInterface>,
    /// Disks.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub disks: Vec<AttachedDisk>,
    /// Whether it may send packets with other source addresses (pod routes need it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub can_ip_forward: Option<bool>,
    /// Network tags.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tags: Option<Tags>,
    /// Own URL (output).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub self_link: Option<String>,
}

/// A persistent disk.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Disk {
    /// Name.
    pub name: String,
    /// Size in GiB.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size_gb: Option<String>,
    /// Disk type URL.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[serde(rename = "type")]
    pub kind: Option<String>,
    /// Image it was made from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source_image: Option<String>,
    /// Labels.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    /// URLs of the instances it is attached to (output).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub users: Vec<String>,
    /// `CREATING`, `READY`, ... (output).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<String>,
    /// Own URL (output).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub self_link: Option<String>,
}

/// A disk image.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Image {
    /// Name.
    pub name: String,
    /// `PENDING`, `READY`, `FAILED` (output).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<String>,
    /// Labels.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    /// Image family.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub family: Option<String>,
    /// Description.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    /// Where the disk image comes from (a `gs://` or storage URL of a `disk.raw` tar.gz).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub raw_disk: Option<RawDisk>,
    /// Guest OS features (`UEFI_COMPATIBLE`, `VIRTIO_SCSI_MULTIQUEUE`, `GVNIC`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub guest_os_features: Vec<GuestOsFeature>,
    /// Own URL (output).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub self_link: Option<String>,
}

/// `Image.rawDisk`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RawDisk {
    /// URL of the tar.gz in Cloud Storage.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<String>,
    /// SHA-1 of the tar.gz, hex (optional check).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sha1_checksum: Option<String>,
    /// `TAR`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub container_type: Option<String>,
}

/// `Image.guestOsFeatures[]`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct GuestOsFeature {
    /// The feature.
    #[serde(rename = "type")]
    pub kind: String,
}

/// A protocol and ports a firewall rule allows.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FirewallAllowed {
    /// `tcp`, `udp`, `icmp`, `all`, or a protocol number.
    #[serde(rename = "IPProtocol")]
    pub ip_protocol: String,
    /// Ports or ranges (`22`, `30000-32767`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ports: Vec<String>,
}

/// A VPC firewall rule.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Firewall {
    /// Name.
    pub name: String,
    /// Description: clusterctl marks its rules here (firewalls have no labels).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    /// Network URL.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub network: Option<String>,
    /// `INGRESS`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub direction: Option<String>,
    /// What it allows.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub allowed: Vec<FirewallAllowed>,
    /// Source address ranges.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub source_ranges: Vec<String>,
    /// Source network tags.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub source_tags: Vec<String>,
    /// Target network tags.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub target_tags: Vec<String>,
}

/// A VPC route.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Route {
    /// Name.
    pub name: String,
    /// Description: clusterctl marks its routes here (routes have no labels).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    /// Network URL.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub network: Option<String>,
    /// Destination range.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dest_range: Option<String>,
    /// Next hop instance URL.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_hop_instance: Option<String>,
}

/// One guest attribute.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct GuestAttributesEntry {
    /// Namespace (`hostkeys`).
    #[serde(default)]
    pub namespace: String,
    /// Key (`ssh-ed25519`).
    #[serde(default)]
    pub key: String,
    /// Value.
    #[serde(default)]
    pub value: String,
}

/// `GuestAttributes.queryValue`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct GuestAttributesValue {
    /// Entries.
    #[serde(default)]
    pub items: Vec<GuestAttributesEntry>,
}

/// What `instances.getGuestAttributes` answers.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct GuestAttributes {
    /// Entries under the queried path.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub query_value: Option<GuestAttributesValue>,
}

/// A page of a list call.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct List<T> {
    /// Items of the page.
    #[serde(default = "Vec::new")]
    pub items: Vec<T>,
    /// Token of the next page.
    #[serde(default)]
    pub next_page_token: Option<String>,
}
