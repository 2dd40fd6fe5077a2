//! Google Compute Engine provider (issue 13).
//!
//! - `api`: serde models of the Compute API resources clusterctl uses.
//! - `client`: the [`client::Compute`] trait (the calls the provider makes) and its REST
//!   implementation on reqwest: a `requestId` on every mutating call, bounded retries with
//!   jitter, operations waited for under a deadline of our own.
//! - `auth`: access tokens (service-account key files, application default credentials).
//! - `schema`: the published discovery document (trimmed) and a checker that every request the
//!   client sends and every response the fake serves goes through in tests.
//! - `fake`: an in-process fake of the Compute API on 127.0.0.1 with fault injection.
//!
//! Why our own client and not the official `google-cloud-compute-v1` crate: that crate brings a
//! gRPC and OpenTelemetry stack (about 40 crates new to this workspace), retries only 503 and
//! does not fill `requestId`, so a retried insert after a lost answer could make a second VM.
//! The provider needs about 20 calls; [`client::Compute`] is the seam where the generated crate
//! could come in later.
//!
//! How clusterctl's resources look on GCE:
//! - an instance per machine, named as the machine, in the machine's failure domain (a zone of
//!   [`GceConfig::zones`]) or, without one, in a zone picked from the name (spread, and found
//!   again without a list); labels carry the cluster ID, name, role and pool, in GCE's label
//!   syntax ([`encode_label`]: keys and values allow only `a-z0-9_-`);
//! - two disks per instance: the boot disk `NAME-boot-<digest8>` from the node image
//!   `clusterctl-<version>` (pushed beforehand), and the data disk `NAME-data` that keeps etcd,
//!   kubelet state and host identity across boot-disk replacements; both labelled like the
//!   instance, so a disk left by a killed replacement is found and deleted;
//! - firewall rules (GCE gives them no labels) named `clusterctl-<cluster-id>-...` and marked in
//!   their description with the cluster ID: traffic within the cluster's network tag, and SSH
//!   and the API server from [`GceConfig::admin_ranges`];
//! - the first-boot seed in the `user-data` metadata key. Instance metadata is readable by
//!   anyone with viewer rights on the project, so a seed that carries a private key is refused:
//!   machines on GCE make their own host keys and report the public halves as guest attributes
//!   (`hostkeys/`), read back over the authenticated API ([`GceProvider::host_keys`]).
//!
//! Not here yet: pod routes (VPC routes with `canIpForward`, which instances already have),
//! machines on regional or shared VPC subnetworks, and `create` driving this provider (the
//! engine does not yet pin host keys that machines report).

pub mod api;
pub mod auth;
pub mod client;
#[cfg(feature = "fake")]
pub mod fake;
#[cfg(feature = "fake")]
pub mod fake_gcs;
pub mod schema;
pub mod storage;

use std::collections::BTreeMap;
use std::sync::Arc;

use self::api::{
    AccessConfig, AttachedDisk, AttachedDiskInitializeParams, Disk, Firewall, FirewallAllowed,
    Instance, Metadata, MetadataItem, NetworkInterface, Tags,
};
use self::client::{ApiError, Compute, last_segment};
use crate::{
    ClusterRef, ImageRef, LABEL_CLUSTER_ID, LABEL_CLUSTER_NAME, LABEL_POOL, LABEL_ROLE, Machine,
    MachineAddress, MachineRole, MachineSpec, MachineState, Provider, ProviderError, Resource,
    Result, check_machine_name,
};

/// Label key (before encoding) that names the machine a disk belongs to.
pub const LABEL_MACHINE: &str = "clusterctl.io/machine";
/// Metadata key that holds the first-boot seed (cloud-init `user-data`).
pub const METADATA_USER_DATA: &str = "user-data";
/// Metadata key that records the digest of the node image the boot disk was made from.
pub const METADATA_IMAGE_DIGEST: &str = "clusterctl-image-digest";
/// Metadata key that records the size the machine was made with (`<cpus>/<MiB>/<GiB>`): its
/// machine type is that size rounded to an E2 custom shape, so the type alone cannot tell.
pub const METADATA_SIZE: &str = "clusterctl-size";

/// `<cpus>/<MiB>/<GiB>`, as [`METADATA_SIZE`] holds it.
fn size_text(size: &crate::MachineSize) -> String {
    format!("{}/{}/{}", size.cpus, size.memory_mib, size.disk_gib)
}

/// The size [`size_text`] wrote; `None` for anything else.
fn parse_size(text: &str) -> Option<crate::MachineSize> {
    let mut parts = text.split('/').map(|p| p.trim().parse::<u64>().ok());
    let (Some(Some(cpus)), Some(Some(memory_mib)), Some(Some(disk_gib)), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return None;
    };
    Some(crate::MachineSize {
        cpus: u32::try_from(cpus).ok()?,
        memory_mib,
        disk_gib,
    })
}
/// Guest-attribute namespace where a machine reports its SSH host public keys.
pub const HOSTKEYS_NAMESPACE: &str = "hostkeys";
/// Longest machine name: its disks' names (`NAME-boot-<8>`) must fit GCE's 63 characters.
pub const MAX_MACHINE_NAME: usize = 49;

/// Settings of the GCE provider.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GceConfig {
    /// Project ID.
    pub project: String,
    /// Zones machines go in; the first is the default.
    pub zones: Vec<String>,
    /// VPC network name.
    pub network: String,
    /// Give machines an external address (a one-to-one NAT access config).
    pub external_ip: bool,
    /// Address ranges allowed to reach SSH (22) and the API server (6443); none: no such rule.
    pub admin_ranges: Vec<String>,
    /// Boot disk size in GiB.
    pub boot_disk_gib: u64,
    /// Disk type of both disks (`pd-balanced`).
    pub disk_type: String,
}

impl GceConfig {
    /// Settings with the defaults for everything but the project and zones.
    pub fn new(project: impl Into<String>, zones: Vec<String>) -> Self {
        GceConfig {
            project: project.into(),
            zones,
            network: "default".into(),
            external_ip: false,
            admin_ranges: Vec::new(),
            boot_disk_gib: 10,
            disk_type: "pd-balanced".into(),
        }
    }
}

/// Encodes a label key or value in GCE's label syntax (lowercase letters, digits, `_` and `-`,
/// at most 63 characters; keys start with a letter): `_` escapes: `__` is `_`, `_d` is `.`,
/// `_s` is `/`, `_u` + a letter is that letter upper-case. `clusterctl.io/role` becomes
/// `clusterctl_dio_srole`. Anything else cannot be carried and is refused.
pub fn encode_label(s: &str, is_key: bool) -> Result<String> {
    let mut out = String::with_capacity(s.len() + 4);
    for c in s.chars() {
        match c {
            'a'..='z' | '0'..='9' | '-' => out.push(c),
            '_' => out.push_str("__"),
            '.' => out.push_str("_d"),
            '/' => out.push_str("_s"),
            'A'..='Z' => {
                out.push_str("_u");
                out.push(c.to_ascii_lowercase());
            }
            _ => {
                return Err(ProviderError::Invalid(format!(
                    "label {} {s:?} holds {c:?}, which GCE labels cannot carry; use letters, digits, '-', '_', '.' and '/'",
                    if is_key { "key" } else { "value" }
                )));
            }
        }
    }
    if out.len() > 63 {
        return Err(ProviderError::Invalid(format!(
            "label {} {s:?} is {} characters in GCE's label syntax, more than 63; shorten it",
            if is_key { "key" } else { "value" },
            out.len()
        )));
    }
    if is_key && !out.starts_with(|c: char| c.is_ascii_lowercase()) {
        return Err(ProviderError::Invalid(format!(
            "label key {s:?} must start with a lowercase letter on GCE"
        )));
    }
    Ok(out)
}

/// Decodes what [`encode_label`] made; `None` for a string it cannot have made.
pub fn decode_label(s: &str) -> Option<String> {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c != '_' {
            out.push(c);
            continue;
        }
        match chars.next()? {
            '_' => out.push('_'),
            'd' => out.push('.'),
            's' => out.push('/'),
            'u' => out.push(
                chars
                    .next()
                    .filter(char::is_ascii_lowercase)?
                    .to_ascii_uppercase(),
            ),
            _ => return None,
        }
    }
    Some(out)
}

/// The GCE image name clusterctl pushes a node image as: `clusterctl-<version>`.
pub fn image_name(image: &ImageRef) -> String {
    let mut name: String = format!("clusterctl-{}", image.version)
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_lowercase()
            } else {
                '-'
            }
        })
        .collect();
    name.truncate(63);
    name.trim_end_matches('-').to_owned()
}

/// The first 8 hex digits of an image digest (with or without a `sha256:` prefix).
fn digest8(digest: &str) -> String {
    digest
        .trim_start_matches("sha256:")
        .chars()
        .filter(char::is_ascii_hexdigit)
        .take(8)
        .collect::<String>()
        .to_ascii_lowercase()
}

/// The boot disk name of a machine booting `image`.
pub fn boot_disk_name(machine: &str, image: &ImageRef) -> String {
    format!("{machine}-boot-{}", digest8(&image.digest))
}

/// The data disk name of a machine.
pub fn data_disk_name(machine: &str) -> String {
    format!("{machine}-data")
}

/// The GCE machine type for a size: an E2 custom type (2 or more even vCPUs, memory a multiple
/// of 256 MiB, at least 512 MiB and at most 8 GiB per vCPU).
pub fn machine_type(size: &crate::MachineSize) -> Result<String> {
    let cpus = size.cpus.max(2).div_ceil(2) * 2;
    let mem = size.memory_mib.max(512 * u64::from(cpus)).div_ceil(256) * 256;
    if mem > 8192 * u64::from(cpus) {
        return Err(ProviderError::Invalid(format!(
            "{} MiB of memory for {} vCPUs is more than E2 machines allow (8 GiB per vCPU); add vCPUs or use less memory",
            size.memory_mib, size.cpus
        )));
    }
    Ok(format!("e2-custom-{cpus}-{mem}"))
}

/// The GCE provider over a [`Compute`] client.
pub struct GceProvider {
    api: Arc<dyn Compute>,
    config: GceConfig,
}

impl std::fmt::Debug for GceProvider {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GceProvider")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

/// What a Compute API error means for the provider's callers.
fn map_err(operation: &str, e: ApiError) -> ProviderError {
    let operation = operation.to_owned();
    match &e {
        ApiError::Transport(_) | ApiError::OperationTimeout { .. } => ProviderError::Retryable {
            operation,
            detail: e.to_string(),
        },
        ApiError::Auth(auth::AuthError::Transient { .. }) => ProviderError::Retryable {
            operation,
            detail: e.to_string(),
        },
        ApiError::Auth(_) => ProviderError::Api {
            operation,
            detail: e.to_string(),
        },
        ApiError::Http { status, reason, .. } => match (*status, reason.as_str()) {
            (403, "quotaExceeded") => ProviderError::Quota {
                operation,
                detail: e.to_string(),
            },
            (429 | 500..=599, _) | (403, "rateLimitExceeded" | "userRateLimitExceeded") => {
                ProviderError::Retryable {
                    operation,
                    detail: e.to_string(),
                }
            }
            (401 | 403, _) => ProviderError::Api {
                operation,
                detail: format!(
                    "{e}; check the credentials and that the service account has roles/compute.instanceAdmin.v1 and roles/iam.serviceAccountUser"
                ),
            },
            _ => ProviderError::Api {
                operation,
                detail: e.to_string(),
            },
        },
        ApiError::Operation { code, .. }
            if code == "QUOTA_EXCEEDED" || code.starts_with("ZONE_RESOURCE_POOL_EXHAUSTED") =>
        {
            ProviderError::Quota {
                operation,
                detail: e.to_string(),
            }
        }
        ApiError::Operation { .. } => ProviderError::Api {
            operation,
            detail: e.to_string(),
        },
    }
}

fn is_stopped(status: &str) -> bool {
    matches!(
        status,
        "STOPPING" | "TERMINATED" | "SUSPENDING" | "SUSPENDED"
    )
}

impl GceProvider {
    /// A provider over `api` with `config`.
    pub fn new(api: Arc<dyn Compute>, config: GceConfig) -> Result<Self> {
        if config.zones.is_empty() {
            return Err(ProviderError::Invalid(
                "the gce provider needs at least one zone".into(),
            ));
        }
        Ok(GceProvider { api, config })
    }

    fn cluster_filter(cluster: &ClusterRef) -> Result<String> {
        Ok(format!(
            "labels.{} = \"{}\"",
            encode_label(LABEL_CLUSTER_ID, true)?,
            encode_label(&cluster.id, false)?
        ))
    }

    fn is_ours(labels: &BTreeMap<String, String>, cluster: &ClusterRef) -> bool {
        encode_label(LABEL_CLUSTER_ID, true)
            .ok()
            .and_then(|k| labels.get(&k))
            .and_then(|v| decode_label(v))
            .is_some_and(|v| v == cluster.id)
    }

    /// The encoded labels of a cluster resource.
    fn labels(
        cluster: &ClusterRef,
        attributes: &[(&str, &str)],
        extra: &BTreeMap<String, String>,
    ) -> Result<BTreeMap<String, String>> {
        let mut out = BTreeMap::new();
        let base = [
            (LABEL_CLUSTER_ID, cluster.id.as_str()),
            (LABEL_CLUSTER_NAME, cluster.name.as_str()),
        ];
        for (k, v) in extra
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .chain(base.into_iter().chain(attributes.iter().copied()))
        {
            out.insert(encode_label(k, true)?, encode_label(v, false)?);
        }
        if out.len() > 64 {
            return Err(ProviderError::Invalid(
                "more than 64 labels: GCE allows 64 per resource".into(),
            ));
        }
        Ok(out)
    }

    fn zone_for(&self, spec: &MachineSpec) -> Result<String> {
        match &spec.failure_domain {
            Some(z) if self.config.zones.contains(z) => Ok(z.clone()),
            Some(z) => Err(ProviderError::Invalid(format!(
                "machine {} asks for zone {z}, which is not one of the provider's zones ({}); add it to provider.gce.zones",
                spec.name,
                self.config.zones.join(", ")
            ))),
            None => {
                // Spread by name: the same name always lands in the same zone.
                let h = spec
                    .name
                    .bytes()
                    .fold(0u64, |h, b| h.wrapping_mul(31).wrapping_add(u64::from(b)));
                let i = usize::try_from(h % self.config.zones.len() as u64).unwrap_or(0);
                Ok(self.config.zones[i].clone())
            }
        }
    }

    /// The instance named `name` in any of the provider's zones, with its zone.
    fn find(&self, name: &str) -> Result<Option<(String, Instance)>> {
        for zone in &self.config.zones {
            if let Some(i) = self
                .api
                .get_instance(zone, name)
                .map_err(|e| map_err(&format!("reading instance {name:?} in {zone}"), e))?
            {
                return Ok(Some((zone.clone(), i)));
            }
        }
        Ok(None)
    }

    /// The instance named `name`, which must be this cluster's.
    fn find_ours(&self, cluster: &ClusterRef, name: &str) -> Result<(String, Instance)> {
        match self.find(name)? {
            Some((zone, i)) if Self::is_ours(&i.labels, cluster) => Ok((zone, i)),
            _ => Err(ProviderError::NotFound {
                kind: "machine",
                name: name.to_owned(),
            }),
        }
    }

    fn wait(&self, what: &str, op: std::result::Result<api::Operation, ApiError>) -> Result<()> {
        let op = op.map_err(|e| map_err(what, e))?;
        self.api.wait(op).map(|_| ()).map_err(|e| map_err(what, e))
    }

    fn machine(&self, zone: &str, i: &Instance) -> Machine {
        let decoded: BTreeMap<String, String> = i
            .labels
            .iter()
            .filter_map(|(k, v)| Some((decode_label(k)?, decode_label(v)?)))
            .collect();
        let role = match decoded.get(LABEL_ROLE).map(String::as_str) {
            Some("control-plane") => MachineRole::ControlPlane,
            _ => MachineRole::Worker,
        };
        let state = match i.status.as_deref().unwrap_or("") {
            "PROVISIONING" | "STAGING" | "REPAIRING" => MachineState::Pending,
            "RUNNING" => MachineState::Running,
            s if is_stopped(s) => MachineState::Stopped,
            _ => MachineState::Unknown,
        };
        let mut addresses = Vec::new();
        for nic in &i.network_interfaces {
            if let Some(ip) = nic.network_ip.as_deref().and_then(|a| a.parse().ok()) {
                addresses.push(MachineAddress::internal(ip));
            }
            for ac in &nic.access_configs {
                if let Some(ip) = ac.nat_ip.as_deref().and_then(|a| a.parse().ok()) {
                    addresses.push(MachineAddress {
                        kind: crate::AddressKind::External,
                        address: ip,
                    });
                }
            }
        }
        let labels = decoded
            .iter()
            .filter(|(k, _)| {
                ![LABEL_CLUSTER_ID, LABEL_CLUSTER_NAME, LABEL_ROLE, LABEL_POOL]
                    .contains(&k.as_str())
            })
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        Machine {
            name: i.name.clone(),
            provider_id: format!("gce://{}/{zone}/{}", self.config.project, i.name),
            role,
            pool: decoded.get(LABEL_POOL).cloned(),
            state,
            addresses,
            failure_domain: Some(zone.to_owned()),
            image_digest: i
                .metadata
                .as_ref()
                .and_then(|m| m.get(METADATA_IMAGE_DIGEST))
                .map(str::to_owned),
            size: i
                .metadata
                .as_ref()
                .and_then(|m| m.get(METADATA_SIZE))
                .and_then(parse_size),
            labels,
        }
    }

    fn refetch(&self, zone: &str, name: &str) -> Result<Machine> {
        match self
            .api
            .get_instance(zone, name)
            .map_err(|e| map_err(&format!("reading instance {name:?}"), e))?
        {
            Some(i) => Ok(self.machine(zone, &i)),
            None => Err(ProviderError::NotFound {
                kind: "instance",
                name: name.to_owned(),
            }),
        }
    }

    /// Checks that the node image was pushed and is this build; its URL.
    fn image_url(&self, image: &ImageRef) -> Result<String> {
        let name = image_name(image);
        let found = self
            .api
            .get_image(&name)
            .map_err(|e| map_err(&format!("reading image {name:?}"), e))?;
        match found {
            Some(i) if i.status.as_deref().is_some_and(|s| s != "READY") => {
                Err(ProviderError::ImageMissing {
                    image: name,
                    detail: format!(
                        "it is {} in project {}, not READY",
                        i.status.unwrap_or_default(),
                        self.config.project
                    ),
                })
            }
            Some(i) => {
                let want = digest8(&image.digest);
                let have = encode_label("clusterctl.io/digest8", true)
                    .ok()
                    .and_then(|k| i.labels.get(&k).cloned());
                if have.as_deref().is_some_and(|h| h != want) {
                    return Err(ProviderError::ImageMissing {
                        image: name,
                        detail: format!(
                            "project {} has another build under that name (digest {}, this one {want}); delete it and push this one",
                            self.config.project,
                            have.unwrap_or_default()
                        ),
                    });
                }
                Ok(format!(
                    "projects/{}/global/images/{name}",
                    self.config.project
                ))
            }
            None => Err(ProviderError::ImageMissing {
                image: name,
                detail: format!(
                    "no such image in project {}; push it with `clusterctl image push --provider gce`",
                    self.config.project
                ),
            }),
        }
    }

    fn firewall_prefix(cluster: &ClusterRef) -> String {
        format!(
            "clusterctl-{}-",
            cluster.id.to_ascii_lowercase().replace('_', "-")
        )
    }

    fn network_tag(cluster: &ClusterRef) -> String {
        let mut t = format!(
            "clusterctl-{}",
            cluster.id.to_ascii_lowercase().replace('_', "-")
        );
        t.truncate(63);
        t
    }

    fn marker(cluster: &ClusterRef) -> String {
        format!("clusterctl cluster {} ({})", cluster.id, cluster.name)
    }

    /// The cluster's firewall rules: within its network tag, and from the admin ranges.
    fn ensure_firewalls(&self, cluster: &ClusterRef) -> Result<()> {
        let prefix = Self::firewall_prefix(cluster);
        let existing: Vec<String> = self
            .api
            .list_firewalls("")
            .map_err(|e| map_err("listing firewall rules", e))?
            .into_iter()
            .map(|f| f.name)
            .collect();
        let network = format!(
            "projects/{}/global/networks/{}",
            self.config.project, self.config.network
        );
        let tag = Self::network_tag(cluster);
        let mut wanted = vec![Firewall {
            name: format!("{prefix}internal"),
            description: Some(Self::marker(cluster)),
            network: Some(network.clone()),
            direction: Some("INGRESS".into()),
            allowed: ["tcp", "udp", "icmp", "ipip"]
                .into_iter()
                .map(|p| FirewallAllowed {
                    ip_protocol: p.into(),
                    ports: Vec::new(),
                })
                .collect(),
            source_tags: vec![tag.clone()],
            target_tags: vec![tag.clone()],
            ..Firewall::default()
        }];
        if !self.config.admin_ranges.is_empty() {
            wanted.push(Firewall {
                name: format!("{prefix}admin"),
                description: Some(Self::marker(cluster)),
                network: Some(network),
                direction: Some("INGRESS".into()),
                allowed: vec![FirewallAllowed {
                    ip_protocol: "tcp".into(),
                    ports: vec!["22".into(), "6443".into()],
                }],
                source_ranges: self.config.admin_ranges.clone(),
                target_tags: vec![tag],
                ..Firewall::default()
            });
        }
        for f in wanted {
            if existing.contains(&f.name) {
                continue;
            }
            let what = format!("creating firewall rule {:?}", f.name);
            match self
                .api
                .insert_firewall(&f)
                .and_then(|op| self.api.wait(op))
            {
                Ok(_) => {}
                Err(e) if e.is_already_exists() => {}
                Err(e) => return Err(map_err(&what, e)),
            }
        }
        Ok(())
    }

    /// The cluster's firewall rules and routes (which GCE gives no labels): named with the
    /// cluster's prefix and marked with its ID in their description, as `(kind, name)`.
    fn network_resources(&self, cluster: &ClusterRef) -> Result<Vec<(&'static str, String)>> {
        let prefix = Self::firewall_prefix(cluster);
        let marker = Self::marker(cluster);
        let ours = |name: &str, description: Option<&str>| {
            name.starts_with(&prefix) && description == Some(marker.as_str())
        };
        let mut out: Vec<(&'static str, String)> = self
            .api
            .list_firewalls("")
            .map_err(|e| map_err("listing firewall rules", e))?
            .into_iter()
            .filter(|f| ours(&f.name, f.description.as_deref()))
            .map(|f| ("firewall", f.name))
            .collect();
        out.extend(
            self.api
                .list_routes("")
                .map_err(|e| map_err("listing routes", e))?
                .into_iter()
                .filter(|r| ours(&r.name, r.description.as_deref()))
                .map(|r| ("route", r.name)),
        );
        Ok(out)
    }

    /// The SSH host public keys the machine reported as guest attributes (`hostkeys/`), as
    /// `(algorithm, base64 key)`; empty until its first boot has written them.
    pub fn host_keys(&self, cluster: &ClusterRef, name: &str) -> Result<Vec<(String, String)>> {
        let (zone, _) = self.find_ours(cluster, name)?;
        let attrs = self
            .api
            .guest_attributes(&zone, name, &format!("{HOSTKEYS_NAMESPACE}/"))
            .map_err(|e| map_err(&format!("reading host keys of {name:?}"), e))?;
        Ok(attrs
            .and_then(|a| a.query_value)
            .map(|v| v.items)
            .unwrap_or_default()
            .into_iter()
            .filter(|e| e.namespace == HOSTKEYS_NAMESPACE)
            .map(|e| (e.key, e.value))
            .collect())
    }

    fn start(&self, zone: &str, name: &str) -> Result<()> {
        self.wait(
            &format!("starting instance {name:?}"),
            self.api.start_instance(zone, name),
        )
    }

    fn stop(&self, zone: &str, name: &str) -> Result<()> {
        self.wait(
            &format!("stopping instance {name:?}"),
            self.api.stop_instance(zone, name),
        )
    }

    /// Deletes this cluster's disks of machine `name` that no instance uses (left by a killed
    /// replacement), except `keep`.
    fn delete_loose_disks(
        &self,
        cluster: &ClusterRef,
        zone: &str,
        name: Option<&str>,
        keep: &[String],
    ) -> Result<()> {
        let mut filter = Self::cluster_filter(cluster)?;
        if let Some(n) = name {
            filter = format!(
                "({filter}) (labels.{} = \"{}\")",
                encode_label(LABEL_MACHINE, true)?,
                encode_label(n, false)?
            );
        }
        let disks = self
            .api
            .list_disks(zone, &filter)
            .map_err(|e| map_err("listing disks", e))?;
        for d in disks {
            if !d.users.is_empty() || keep.contains(&d.name) {
                continue;
            }
            let what = format!("deleting disk {:?}", d.name);
            match self
                .api
                .delete_disk(zone, &d.name)
                .and_then(|op| self.api.wait(op))
            {
                Ok(_) => {}
                Err(e) if e.is_not_found() => {}
                Err(e) => return Err(map_err(&what, e)),
            }
        }
        Ok(())
    }
}

impl Provider for GceProvider {
    fn name(&self) -> &'static str {
        "gce"
    }

    fn ensure_machine(&self, cluster: &ClusterRef, spec: &MachineSpec) -> Result<Machine> {
        check_machine_name(&spec.name)?;
        if !spec.name.starts_with(|c: char| c.is_ascii_lowercase())
            || spec.name.len() > MAX_MACHINE_NAME
        {
            return Err(ProviderError::Invalid(format!(
                "machine name {:?} must start with a letter and be at most {MAX_MACHINE_NAME} characters on GCE (its disks are named after it)",
                spec.name
            )));
        }
        if spec.user_data.contains("PRIVATE KEY-----") {
            return Err(ProviderError::Invalid(format!(
                "the first-boot seed of machine {:?} carries a private key; GCE instance metadata is readable by every viewer of the project, so the gce provider never puts secrets there (machines make their own host keys and report them as guest attributes)",
                spec.name
            )));
        }
        if let Some((zone, i)) = self.find(&spec.name)? {
            if !Self::is_ours(&i.labels, cluster) {
                return Err(ProviderError::NameClash {
                    kind: "instance",
                    name: spec.name.clone(),
                });
            }
            if i.status.as_deref().is_some_and(is_stopped) {
                if i.status.as_deref() == Some("STOPPING") {
                    // Starting a stopping instance is refused: wait for it to stop.
                    self.stop(&zone, &spec.name)?;
                }
                self.start(&zone, &spec.name)?;
                return self.refetch(&zone, &spec.name);
            }
            return Ok(self.machine(&zone, &i));
        }
        let zone = self.zone_for(spec)?;
        let source_image = self.image_url(&spec.image)?;
        self.ensure_firewalls(cluster)?;
        let role = match spec.role {
            MachineRole::ControlPlane => "control-plane",
            MachineRole::Worker => "worker",
        };
        let mut attributes = vec![(LABEL_ROLE, role)];
        if let Some(p) = &spec.pool {
            attributes.push((LABEL_POOL, p.as_str()));
        }
        let labels = Self::labels(cluster, &attributes, &spec.labels)?;
        let disk_labels = Self::labels(
            cluster,
            &[(LABEL_MACHINE, spec.name.as_str())],
            &BTreeMap::new(),
        )?;
        let disk_type = format!("zones/{zone}/diskTypes/{}", self.config.disk_type);
        let instance = Instance {
            name: spec.name.clone(),
            machine_type: Some(format!(
                "zones/{zone}/machineTypes/{}",
                machine_type(&spec.size)?
            )),
            labels,
            metadata: Some(Metadata {
                fingerprint: None,
                items: vec![
                    MetadataItem {
                        key: METADATA_USER_DATA.into(),
                        value: spec.user_data.clone(),
                    },
                    MetadataItem {
                        key: METADATA_IMAGE_DIGEST.into(),
                        value: spec.image.digest.clone(),
                    },
                    MetadataItem {
                        key: METADATA_SIZE.into(),
                        value: size_text(&spec.size),
                    },
                    MetadataItem {
                        key: "enable-guest-attributes".into(),
                        value: "TRUE".into(),
                    },
                ],
            }),
            network_interfaces: vec![NetworkInterface {
                network: Some(format!(
                    "projects/{}/global/networks/{}",
                    self.config.project, self.config.network
                )),
                access_configs: if self.config.external_ip {
                    vec![AccessConfig {
                        kind: Some("ONE_TO_ONE_NAT".into()),
                        name: Some("external-nat".into()),
                        nat_ip: None,
                    }]
                } else {
                    Vec::new()
                },
                ..NetworkInterface::default()
            }],
            disks: vec![
                AttachedDisk {
                    boot: Some(true),
                    auto_delete: Some(true),
                    device_name: Some("boot".into()),
                    initialize_params: Some(AttachedDiskInitializeParams {
                        disk_name: Some(boot_disk_name(&spec.name, &spec.image)),
                        disk_size_gb: Some(self.config.boot_disk_gib.to_string()),
                        disk_type: Some(disk_type.clone()),
                        source_image: Some(source_image),
                        labels: disk_labels.clone(),
                    }),
                    ..AttachedDisk::default()
                },
                AttachedDisk {
                    boot: Some(false),
                    auto_delete: Some(true),
                    device_name: Some("data".into()),
                    initialize_params: Some(AttachedDiskInitializeParams {
                        disk_name: Some(data_disk_name(&spec.name)),
                        disk_size_gb: Some(spec.size.disk_gib.to_string()),
                        disk_type: Some(disk_type),
                        labels: disk_labels,
                        ..AttachedDiskInitializeParams::default()
                    }),
                    ..AttachedDisk::default()
                },
            ],
            can_ip_forward: Some(true),
            tags: Some(Tags {
                items: vec![Self::network_tag(cluster)],
            }),
            ..Instance::default()
        };
        let what = format!("creating instance {:?} in {zone}", spec.name);
        match self
            .api
            .insert_instance(&zone, &instance)
            .and_then(|op| self.api.wait(op))
        {
            Ok(_) => {}
            // Another ensure made it meanwhile (or a retry after a lost answer outlived the
            // request ID): look at what is there.
            Err(e) if e.is_already_exists() => {
                let (zone, i) = self.find(&spec.name)?.ok_or_else(|| map_err(&what, e))?;
                if !Self::is_ours(&i.labels, cluster) {
                    return Err(ProviderError::NameClash {
                        kind: "instance",
                        name: spec.name.clone(),
                    });
                }
                return Ok(self.machine(&zone, &i));
            }
            Err(e) => return Err(map_err(&what, e)),
        }
        self.refetch(&zone, &spec.name)
    }

    fn list_machines(&self, cluster: &ClusterRef) -> Result<Vec<Machine>> {
        let filter = Self::cluster_filter(cluster)?;
        let mut out = Vec::new();
        for zone in &self.config.zones {
            let found = self
                .api
                .list_instances(zone, &filter)
                .map_err(|e| map_err(&format!("listing instances in {zone}"), e))?;
            out.extend(
                found
                    .iter()
                    .filter(|i| Self::is_ours(&i.labels, cluster))
                    .map(|i| self.machine(zone, i)),
            );
        }
        out.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(out)
    }

    fn delete_machine(&self, cluster: &ClusterRef, name: &str) -> Result<()> {
        if let Some((zone, i)) = self.find(name)? {
            if !Self::is_ours(&i.labels, cluster) {
                return Err(ProviderError::NameClash {
                    kind: "instance",
                    name: name.to_owned(),
                });
            }
            let what = format!("deleting instance {name:?}");
            match self
                .api
                .delete_instance(&zone, name)
                .and_then(|op| self.api.wait(op))
            {
                Ok(_) => {}
                Err(e) if e.is_not_found() => {}
                Err(e) => return Err(map_err(&what, e)),
            }
        }
        for zone in &self.config.zones {
            self.delete_loose_disks(cluster, zone, Some(name), &[])?;
        }
        Ok(())
    }

    fn delete_cluster(&self, cluster: &ClusterRef) -> Result<()> {
        // Every delete is started first, then waited for: GCE works on them in parallel.
        let filter = Self::cluster_filter(cluster)?;
        let mut pending = Vec::new();
        for zone in &self.config.zones {
            let found = self
                .api
                .list_instances(zone, &filter)
                .map_err(|e| map_err(&format!("listing instances in {zone}"), e))?;
            for i in found.iter().filter(|i| Self::is_ours(&i.labels, cluster)) {
                match self.api.delete_instance(zone, &i.name) {
                    Ok(op) => pending.push((format!("deleting instance {:?}", i.name), op)),
                    Err(e) if e.is_not_found() => {}
                    Err(e) => return Err(map_err(&format!("deleting instance {:?}", i.name), e)),
                }
            }
        }
        for (what, op) in pending {
            match self.api.wait(op) {
                Ok(_) => {}
                Err(e) if e.is_not_found() => {}
                Err(e) => return Err(map_err(&what, e)),
            }
        }
        for zone in &self.config.zones {
            self.delete_loose_disks(cluster, zone, None, &[])?;
        }
        for (kind, name) in self.network_resources(cluster)? {
            let deleted = match kind {
                "firewall" => self.api.delete_firewall(&name),
                _ => self.api.delete_route(&name),
            };
            match deleted.and_then(|op| self.api.wait(op)) {
                Ok(_) => {}
                Err(e) if e.is_not_found() => {}
                Err(e) => return Err(map_err(&format!("deleting {kind} {name:?}"), e)),
            }
        }
        Ok(())
    }

    fn inventory(&self, cluster: &ClusterRef) -> Result<Vec<Resource>> {
        let filter = Self::cluster_filter(cluster)?;
        let mut out = Vec::new();
        for zone in &self.config.zones {
            for i in self
                .api
                .list_instances(zone, &filter)
                .map_err(|e| map_err("listing instances", e))?
            {
                out.push(Resource {
                    kind: "instance".into(),
                    name: format!("{zone}/{}", i.name),
                });
            }
            for d in self
                .api
                .list_disks(zone, &filter)
                .map_err(|e| map_err("listing disks", e))?
            {
                out.push(Resource {
                    kind: "disk".into(),
                    name: format!("{zone}/{}", d.name),
                });
            }
        }
        out.extend(
            self.network_resources(cluster)?
                .into_iter()
                .map(|(kind, name)| Resource {
                    kind: kind.into(),
                    name,
                }),
        );
        out.sort();
        Ok(out)
    }

    fn stop_machine(&self, cluster: &ClusterRef, name: &str) -> Result<Machine> {
        let (zone, i) = self.find_ours(cluster, name)?;
        if i.status.as_deref() != Some("TERMINATED") {
            self.stop(&zone, name)?;
        }
        self.refetch(&zone, name)
    }

    fn reset_machine(&self, cluster: &ClusterRef, name: &str) -> Result<Machine> {
        let (zone, i) = self.find_ours(cluster, name)?;
        match i.status.as_deref() {
            Some("RUNNING") => self.wait(
                &format!("resetting instance {name:?}"),
                self.api.reset_instance(&zone, name),
            )?,
            Some("STOPPING") => {
                self.stop(&zone, name)?;
                self.start(&zone, name)?;
            }
            Some(s) if is_stopped(s) => self.start(&zone, name)?,
            // PROVISIONING or STAGING: it is booting already; a reset would be refused.
            _ => {}
        }
        self.refetch(&zone, name)
    }

    fn replace_boot_disk(
        &self,
        cluster: &ClusterRef,
        name: &str,
        image: &ImageRef,
    ) -> Result<Machine> {
        let (zone, i) = self.find_ours(cluster, name)?;
        let new_disk = boot_disk_name(name, image);
        let boot = i.disks.iter().find(|d| d.boot == Some(true));
        let boots_new = boot
            .and_then(|d| d.source.as_deref())
            .is_some_and(|s| last_segment(s) == new_disk);
        let recorded = i
            .metadata
            .as_ref()
            .and_then(|m| m.get(METADATA_IMAGE_DIGEST))
            == Some(image.digest.as_str());
        if boots_new && recorded {
            if i.status.as_deref().is_some_and(is_stopped) {
                self.start(&zone, name)?;
            }
            return self.refetch(&zone, name);
        }
        let source_image = self.image_url(image)?;
        // 1. The new boot disk, made while the machine still runs.
        let exists = self
            .api
            .get_disk(&zone, &new_disk)
            .map_err(|e| map_err(&format!("reading disk {new_disk:?}"), e))?
            .is_some();
        if !exists {
            let disk = Disk {
                name: new_disk.clone(),
                size_gb: Some(self.config.boot_disk_gib.to_string()),
                kind: Some(format!("zones/{zone}/diskTypes/{}", self.config.disk_type)),
                source_image: Some(source_image),
                labels: Self::labels(cluster, &[(LABEL_MACHINE, name)], &BTreeMap::new())?,
                ..Disk::default()
            };
            let what = format!("creating disk {new_disk:?}");
            match self
                .api
                .insert_disk(&zone, &disk)
                .and_then(|op| self.api.wait(op))
            {
                Ok(_) => {}
                Err(e) if e.is_already_exists() => {}
                Err(e) => return Err(map_err(&what, e)),
            }
        }
        // 2. Stopped, the old boot disk out, the new one in.
        if i.status.as_deref() != Some("TERMINATED") {
            self.stop(&zone, name)?;
        }
        if !boots_new {
            if let Some(old) = boot.and_then(|d| d.device_name.clone()) {
                self.wait(
                    &format!("detaching the boot disk of {name:?}"),
                    self.api.detach_disk(&zone, name, &old),
                )?;
            }
            let attach = AttachedDisk {
                boot: Some(true),
                auto_delete: Some(true),
                device_name: Some("boot".into()),
                source: Some(format!(
                    "projects/{}/zones/{zone}/disks/{new_disk}",
                    self.config.project
                )),
                ..AttachedDisk::default()
            };
            self.wait(
                &format!("attaching disk {new_disk:?} to {name:?}"),
                self.api.attach_disk(&zone, name, &attach),
            )?;
        }
        // 3. The record of what it boots (metadata; the fingerprint of the last read).
        let current = self
            .api
            .get_instance(&zone, name)
            .map_err(|e| map_err(&format!("reading instance {name:?}"), e))?
            .ok_or_else(|| ProviderError::NotFound {
                kind: "instance",
                name: name.to_owned(),
            })?;
        let mut metadata = current.metadata.clone().unwrap_or_default();
        metadata.items.retain(|m| m.key != METADATA_IMAGE_DIGEST);
        metadata.items.push(MetadataItem {
            key: METADATA_IMAGE_DIGEST.into(),
            value: image.digest.clone(),
        });
        self.wait(
            &format!("recording the image of {name:?}"),
            self.api.set_metadata(&zone, name, &metadata),
        )?;
        // 4. Booted again; the old boot disk (and any left by a killed run) deleted.
        self.start(&zone, name)?;
        self.delete_loose_disks(
            cluster,
            &zone,
            Some(name),
            &[new_disk, data_disk_name(name)],
        )?;
        self.refetch(&zone, name)
    }

    fn resize_machine(
        &self,
        cluster: &ClusterRef,
        name: &str,
        size: &crate::MachineSize,
    ) -> Result<Machine> {
        let (zone, i) = self.find_ours(cluster, name)?;
        let current = i
            .metadata
            .as_ref()
            .and_then(|m| m.get(METADATA_SIZE))
            .and_then(parse_size)
            .ok_or_else(|| ProviderError::Api {
                operation: format!("resizing machine {name:?}"),
                detail: format!(
                    "its size is not recorded in its metadata ({METADATA_SIZE}): it was made by an older clusterctl"
                ),
            })?;
        if current.disk_gib != size.disk_gib {
            return Err(ProviderError::Invalid(format!(
                "machine {name:?} has a {} GiB data disk; it cannot become {} GiB in place (only CPUs and memory change)",
                current.disk_gib, size.disk_gib
            )));
        }
        let machine_type = format!("zones/{zone}/machineTypes/{}", machine_type(size)?);
        if current == *size {
            if i.status.as_deref().is_some_and(is_stopped) {
                self.start(&zone, name)?;
            }
            return self.refetch(&zone, name);
        }
        // Stopped, the new type set (its check runs before anything changes: a size no E2
        // custom type fits was refused above), then the size recorded, then started. Killed
        // between, the recorded size is still the old one and the next call does it again.
        if i.status.as_deref() != Some("TERMINATED") {
            self.stop(&zone, name)?;
        }
        self.wait(
            &format!("setting the machine type of {name:?} to {machine_type}"),
            self.api.set_machine_type(&zone, name, &machine_type),
        )?;
        let now = self
            .api
            .get_instance(&zone, name)
            .map_err(|e| map_err(&format!("reading instance {name:?}"), e))?
            .ok_or_else(|| ProviderError::NotFound {
                kind: "instance",
                name: name.to_owned(),
            })?;
        let mut metadata = now.metadata.clone().unwrap_or_default();
        metadata.items.retain(|m| m.key != METADATA_SIZE);
        metadata.items.push(MetadataItem {
            key: METADATA_SIZE.into(),
            value: size_text(size),
        });
        self.wait(
            &format!("recording the size of {name:?}"),
            self.api.set_metadata(&zone, name, &metadata),
        )?;
        self.start(&zone, name)?;
        self.refetch(&zone, name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_round_trip_through_gce_syntax() {
        for s in [
            "clusterctl.io/cluster-id",
            "example.com/Team_A",
            "plain",
            "",
        ] {
            let e = encode_label(s, false).expect("encodes");
            assert!(
                e.bytes().all(|c| c.is_ascii_lowercase()
                    || c.is_ascii_digit()
                    || c == b'_'
                    || c == b'-'),
                "{e}"
            );
            assert_eq!(decode_label(&e).as_deref(), Some(s));
        }
        assert_eq!(
            encode_label("clusterctl.io/role", true).expect("key"),
            "clusterctl_dio_srole"
        );
        assert!(encode_label("a b", true).is_err());
        assert!(
            encode_label("1abc", true).is_err(),
            "keys start with a letter"
        );
        assert!(encode_label(&"x".repeat(64), false).is_err());
        assert_eq!(decode_label("bad_x"), None);
    }

    #[test]
    fn the_recorded_size_reads_back_and_nothing_else_does() {
        let s = crate::MachineSize {
            cpus: 3,
            memory_mib: 2000,
            disk_gib: 20,
        };
        assert_eq!(parse_size(&size_text(&s)), Some(s));
        for bad in [
            "",
            "2/4096",
            "2/4096/20/1",
            "a/b/c",
            "-1/2/3",
            "99999999999/1/1",
        ] {
            assert_eq!(parse_size(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn machine_types_are_valid_e2_custom_shapes() {
        let size = |cpus, memory_mib| crate::MachineSize {
            cpus,
            memory_mib,
            disk_gib: 20,
        };
        assert_eq!(
            machine_type(&size(2, 4096)).expect("ok"),
            "e2-custom-2-4096"
        );
        assert_eq!(
            machine_type(&size(1, 1000)).expect("ok"),
            "e2-custom-2-1024"
        );
        assert_eq!(
            machine_type(&size(3, 2000)).expect("ok"),
            "e2-custom-4-2048"
        );
        assert!(machine_type(&size(2, 20_000)).is_err());
    }

    #[test]
    fn image_and_disk_names_fit_gce() {
        let image = ImageRef {
            version: "bookworm-20261202-eaaa25c3621b".into(),
            dir: "/x".into(),
            digest: "sha256:ABCDEF0123456789".into(),
        };
        assert_eq!(
            image_name(&image),
            "clusterctl-bookworm-20261202-eaaa25c3621b"
        );
        assert_eq!(boot_disk_name("c1-cp-0", &image), "c1-cp-0-boot-abcdef01");
        let long = "a".repeat(MAX_MACHINE_NAME);
        assert!(boot_disk_name(&long, &image).len() <= 63);
    }
}

#[cfg(all(test, feature = "fake", feature = "conformance"))]
mod conformance_tests;
