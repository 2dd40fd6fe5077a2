//! The libvirt provider: domains, volumes and networks labelled with the cluster ID in libvirt metadata.
//!
//! # What a cluster looks like on a libvirt host
//! - **Network** `clusterctl-<id>`: isolated (no `<forward>`), bridge `ccbr<hash>`, one IPv4
//!   subnet (configured, or the first free /24 of 10.213.0.0/16), DHCP with one reservation
//!   (`<host mac name ip>`) per machine. The reservation is the machine's address: deterministic,
//!   known before the guest boots, and the record from which a re-run recovers the MAC and IP.
//! - **Storage pool** `clusterctl-<id>`: a directory pool at `<storage root>/<id>` holding every
//!   volume of the cluster: the image's kernel, initrd and root (uploaded once per image digest
//!   with `virStorageVolUpload`, so remote hosts work), and per machine a qcow2 overlay on the
//!   image root, a data disk and a NoCloud seed disk.
//! - **Domains**, one per machine, booted directly from the kernel and initrd volumes.
//!
//! # How resources are known to be ours
//! Domains and networks carry `<clusterctl:cluster xmlns:clusterctl="https://clusterctl.io/xmlns/v1"
//! id=.. name=.. .../>` in `<metadata>`; only that element with the cluster's ID counts. Volumes
//! have no metadata, so they are ours by being inside a pool that is ours, and a pool is ours when
//! it is named `clusterctl-<id>` **and** holds the owner marker volume
//! `clusterctl-owner-<id>` (written right after the pool is created). A pool with that name but
//! no marker is only touched when it holds no volumes at all (deleting it loses nothing); with
//! other volumes and no marker it is reported as a name clash and left alone.
//!
//! # Crash safety
//! Every step checks before it acts, and the domain definition is the commit point of a machine:
//! until a labelled domain exists, leftover volumes of that machine (from a killed run) are
//! deleted and recreated; an image upload counts only once its `.complete` marker volume exists.
//!
//! # Day 2
//! - **Stop**: an ACPI shutdown, then a hard stop after the configured grace period.
//! - **Reset**: `virDomainReset` (a hard reset, what a hung guest needs); a stopped domain is started.
//! - **Boot-disk replacement**: the domain is stopped, the image uploaded (once per digest), the
//!   root overlay deleted and made afresh on the new image's root, and the domain redefined with
//!   the same UUID, MAC, data disk and seed disk (so the same address, host key and kubelet state)
//!   but the new image's kernel, initrd and command line; the label's `image-digest` is the
//!   commit point. Interrupted anywhere, the same call finishes it; rollback is the same call
//!   with the old image, whose volumes stay in the pool until the cluster is deleted.

mod accel;
mod image;
mod names;
mod seed;
mod xmlread;

use std::net::{IpAddr, Ipv4Addr};
use std::path::PathBuf;
use std::sync::Mutex;
use std::time::Duration;

use templates::libvirt::{
    ClusterLabel, DhcpHost, DirPoolXml, DomainAccel, DomainDisk, DomainXml, NetworkXml, VolumeXml,
};
use virt::connect::Connect;
use virt::domain::Domain;
use virt::error::ErrorNumber;
use virt::network::Network;
use virt::storage_pool::StoragePool;
use virt::storage_vol::StorageVol;
use virt::stream::Stream;

pub use accel::{ACCELERATOR_ENV, Accelerator, ProbeVerdict};

use crate::{
    ClusterRef, ImageRef, Machine, MachineAddress, MachineRole, MachineSpec, MachineState,
    Provider, ProviderError, Resource, Result,
};
use image::ImageArtifacts;
use xmlread::{DomainFacts, Label};

/// Settings of the libvirt provider (from the cluster spec's `provider.libvirt` block).
#[derive(Debug, Clone)]
pub struct LibvirtConfig {
    /// Connection URI, e.g. `qemu:///system` or `qemu+ssh://root@host/system`.
    pub uri: String,
    /// Directory on the libvirt host under which each cluster gets its pool directory.
    pub storage_root: String,
    /// Accelerator; `CLUSTERCTL_ACCELERATOR` overrides it.
    pub accelerator: Accelerator,
    /// Subnet of the cluster network; `None` picks a free /24 in 10.213.0.0/16.
    pub network_cidr: Option<(Ipv4Addr, u8)>,
    /// Where the KVM probe verdict is cached on the admin machine; `None` disables the cache.
    pub cache_dir: Option<PathBuf>,
    /// TCG translation-block cache in MiB. QEMU allocates it lazily, so RSS grows only with the code
    /// actually translated. A Kubernetes control plane translates over 100 MiB of code: with a
    /// 128 MiB cache QEMU flushed it 126 times in 30 minutes (every ~15 s, retranslating
    /// everything), which starved the API server; 512 MiB holds it.
    pub tcg_tb_cache_mib: u32,
    /// How long the KVM probe may take before KVM is declared unusable.
    pub kvm_probe_timeout: Duration,
    /// How long a stop (and a boot-disk replacement) waits for the guest to power off after an
    /// ACPI shutdown request before it stops the domain hard.
    pub shutdown_grace: Duration,
}

impl LibvirtConfig {
    /// Defaults for a URI: storage under `/var/lib/libvirt/images/clusterctl`, `auto`
    /// accelerator, probe cache under `$XDG_CACHE_HOME/clusterctl` (or `~/.cache/clusterctl`).
    #[must_use]
    pub fn new(uri: impl Into<String>) -> Self {
        let cache_dir = std::env::var_os("XDG_CACHE_HOME")
            .map(PathBuf::from)
            .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
            .map(|d| d.join("clusterctl"));
        Self {
            uri: uri.into(),
            storage_root: "/var/lib/libvirt/images/clusterctl".into(),
            accelerator: Accelerator::Auto,
            network_cidr: None,
            cache_dir,
            tcg_tb_cache_mib: 512,
            kvm_probe_timeout: Duration::from_secs(20),
            shutdown_grace: Duration::from_secs(120),
        }
    }
}

/// The libvirt provider. One connection, shared by all calls; cluster-wide setup (network, pool,
/// image upload, address reservations) is serialized inside the process, per-machine work is not.
pub struct LibvirtProvider {
    config: LibvirtConfig,
    conn: Connect,
    setup: Mutex<()>,
    accel: Mutex<Option<DomainAccel>>,
    probe: Mutex<Option<ProbeVerdict>>,
}

impl std::fmt::Debug for LibvirtProvider {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LibvirtProvider")
            .field("uri", &self.config.uri)
            .finish_non_exhaustive()
    }
}

/// A libvirt error as a provider error of the kind a control loop acts on.
fn api(operation: impl Into<String>, e: &virt::error::Error) -> ProviderError {
    let operation = operation.into();
    let detail = e.message().to_string();
    let transient = [
        ErrorNumber::OperationTimeout,
        ErrorNumber::Rpc,
        ErrorNumber::NoConnect,
        ErrorNumber::AgentUnresponsive,
        ErrorNumber::ResourceBusy,
    ];
    if transient.iter().any(|c| is_code(e, *c)) {
        ProviderError::Retryable { operation, detail }
    } else if detail.contains("No space left on device")
        || detail.contains("Cannot allocate memory")
    {
        ProviderError::Quota { operation, detail }
    } else {
        ProviderError::Api { operation, detail }
    }
}

fn is_code(e: &virt::error::Error, code: ErrorNumber) -> bool {
    e.code().is_known_and(|c| c == code)
}

/// How long a domain libvirt says exists but does not list may take to show up again (measured:
/// 1-4 s after the client that was starting it was SIGKILLed).
const DOMAIN_REAPPEAR_TIMEOUT: Duration = Duration::from_secs(60);

/// Machine metadata attribute names.
const ATTR_MACHINE: &str = "machine";
const ATTR_ROLE: &str = "role";
const ATTR_POOL: &str = "pool";
const ATTR_IMAGE: &str = "image-digest";
const ATTR_KIND: &str = "kind";

impl LibvirtProvider {
    /// Connects to libvirt. An unreachable daemon or a bad URI is [`ProviderError::Unreachable`].
    pub fn connect(config: LibvirtConfig) -> Result<Self> {
        // libvirt prints every error to stderr by default; errors are returned to callers instead.
        virt::error::clear_error_callback();
        let conn = Connect::open(Some(&config.uri)).map_err(|e| ProviderError::Unreachable {
            endpoint: config.uri.clone(),
            detail: e.message().to_string(),
        })?;
        Ok(Self {
            config,
            conn,
            setup: Mutex::new(()),
            accel: Mutex::new(None),
            probe: Mutex::new(None),
        })
    }

    /// The KVM probe verdict, if `auto` ran (or read) one in this process.
    pub fn probe_verdict(&self) -> Option<ProbeVerdict> {
        self.probe.lock().ok().and_then(|g| g.clone())
    }

    fn host(&self) -> String {
        self.conn.hostname().unwrap_or_else(|_| "unknown".into())
    }

    fn label(&self, cluster: &ClusterRef, attributes: Vec<(String, String)>) -> ClusterLabel {
        ClusterLabel {
            cluster_id: cluster.id.clone(),
            cluster_name: cluster.name.clone(),
            attributes,
            labels: Vec::new(),
        }
    }

    // ----- domains -----

    /// Looks the domain up until it is found or `timeout` has passed.
    fn wait_for_domain(&self, name: &str, timeout: Duration) -> Result<Option<Domain>> {
        let deadline = std::time::Instant::now() + timeout;
        loop {
            if let Some(dom) = self.lookup_domain(name)? {
                return Ok(Some(dom));
            }
            if std::time::Instant::now() >= deadline {
                return Ok(None);
            }
            std::thread::sleep(Duration::from_millis(500));
        }
    }

    fn lookup_domain(&self, name: &str) -> Result<Option<Domain>> {
        match self.conn.lookup_domain_by_name(name) {
            Ok(d) => Ok(Some(d)),
            Err(e) if is_code(&e, ErrorNumber::NoDomain) => Ok(None),
            Err(e) => Err(api(format!("looking up domain {name:?}"), &e)),
        }
    }

    fn facts(&self, dom: &Domain) -> Result<DomainFacts> {
        let xml = dom
            .xml_desc(0)
            .map_err(|e| api("reading a domain definition", &e))?;
        xmlread::domain_facts(&xml).map_err(|d| ProviderError::Api {
            operation: "reading a domain definition".into(),
            detail: d,
        })
    }

    fn is_ours(label: Option<&Label>, cluster: &ClusterRef) -> bool {
        label.is_some_and(|l| l.cluster_id == cluster.id)
    }

    /// Every domain labelled with the cluster's ID, with its facts.
    fn cluster_domains(&self, cluster: &ClusterRef) -> Result<Vec<(Domain, DomainFacts)>> {
        let all = self
            .conn
            .list_all_domains(0)
            .map_err(|e| api("listing domains", &e))?;
        let mut ours = Vec::new();
        for dom in all {
            // A domain can vanish between listing and reading it; that one is simply not ours.
            let Ok(facts) = self.facts(&dom) else {
                continue;
            };
            if Self::is_ours(facts.label.as_ref(), cluster) {
                ours.push((dom, facts));
            }
        }
        Ok(ours)
    }

    fn machine_of(
        &self,
        dom: &Domain,
        facts: &DomainFacts,
        reservations: &[DhcpHost],
    ) -> Result<Machine> {
        let name = dom.name().map_err(|e| api("reading a domain name", &e))?;
        let label = facts.label.clone().unwrap_or_default();
        let role = match label.attr(ATTR_ROLE) {
            Some("control-plane") => MachineRole::ControlPlane,
            _ => MachineRole::Worker,
        };
        let (state, _) = dom
            .state()
            .map_err(|e| api(format!("reading the state of domain {name:?}"), &e))?;
        use virt::domain::DomainState as S;
        let state = match state {
            virt::enumutil::Enum::Known(S::Running | S::Blocked) => MachineState::Running,
            virt::enumutil::Enum::Known(S::Shutoff | S::Shutdown) => MachineState::Stopped,
            virt::enumutil::Enum::Known(S::Paused | S::PMSuspended) => MachineState::Stopped,
            virt::enumutil::Enum::Known(S::Crashed) => MachineState::Failed,
            _ => MachineState::Unknown,
        };
        let addresses = if state == MachineState::Running {
            reservations
                .iter()
                .filter(|h| facts.macs.iter().any(|m| m.eq_ignore_ascii_case(&h.mac)))
                .map(|h| MachineAddress::internal(IpAddr::V4(h.ip)))
                .collect()
        } else {
            Vec::new()
        };
        let uuid = dom
            .uuid_string()
            .map_err(|e| api("reading a domain uuid", &e))?;
        let size = self.size_of(facts, &name);
        Ok(Machine {
            name,
            provider_id: format!("libvirt://{}/{uuid}", self.host()),
            role,
            pool: label
                .attr(ATTR_POOL)
                .filter(|p| !p.is_empty())
                .map(str::to_string),
            state,
            addresses,
            failure_domain: Some(self.host()),
            image_digest: label.attr(ATTR_IMAGE).map(str::to_string),
            size,
            labels: label.labels.clone(),
        })
    }

    /// The machine's size as defined: vCPUs and memory of the domain's persistent definition
    /// (what its next boot gets), and the capacity of its data volume. `None` if any of them
    /// cannot be read (the planner then leaves the machine's size alone).
    fn size_of(&self, facts: &DomainFacts, name: &str) -> Option<crate::MachineSize> {
        let data = names::machine_volumes(name).data;
        let (pool, _) = facts.volumes.iter().find(|(_, v)| *v == data)?;
        let capacity = self
            .conn
            .lookup_storage_pool_by_name(pool)
            .and_then(|p| p.lookup_storage_vol_by_name(&data))
            .and_then(|v| v.info())
            .ok()?
            .capacity;
        Some(crate::MachineSize {
            cpus: facts.vcpus?,
            memory_mib: facts.memory_kib? / 1024,
            disk_gib: capacity >> 30,
        })
    }

    // ----- network -----

    fn lookup_network(&self, name: &str) -> Result<Option<Network>> {
        match self.conn.lookup_network_by_name(name) {
            Ok(n) => Ok(Some(n)),
            Err(e) if is_code(&e, ErrorNumber::NoNetwork) => Ok(None),
            Err(e) => Err(api(format!("looking up network {name:?}"), &e)),
        }
    }

    fn network_facts(net: &Network) -> Result<xmlread::NetworkFacts> {
        let xml = net
            .xml_desc(0)
            .map_err(|e| api("reading a network definition", &e))?;
        xmlread::network_facts(&xml).map_err(|d| ProviderError::Api {
            operation: "reading a network definition".into(),
            detail: d,
        })
    }

    /// The cluster's network, if it exists and is ours.
    fn our_network(
        &self,
        cluster: &ClusterRef,
    ) -> Result<Option<(Network, xmlread::NetworkFacts)>> {
        let name = names::cluster_object_name(&cluster.id);
        let Some(net) = self.lookup_network(&name)? else {
            return Ok(None);
        };
        let facts = Self::network_facts(&net)?;
        if Self::is_ours(facts.label.as_ref(), cluster) {
            Ok(Some((net, facts)))
        } else {
            Err(ProviderError::NameClash {
                kind: "network",
                name,
            })
        }
    }

    fn ensure_network(&self, cluster: &ClusterRef) -> Result<(Network, xmlread::NetworkFacts)> {
        let name = names::cluster_object_name(&cluster.id);
        if let Some((net, facts)) = self.our_network(cluster)? {
            if !net
                .is_active()
                .map_err(|e| api(format!("reading network {name:?}"), &e))?
            {
                tracing::info!(cluster = %cluster.name, network = %name, "starting network");
                net.create()
                    .map_err(|e| api(format!("starting network {name:?}"), &e))?;
            }
            return Ok((net, facts));
        }
        // Subnets other libvirt networks use are skipped; a host route clash shows up when the
        // network starts, and then the next candidate is tried.
        let taken: Vec<(Ipv4Addr, u8)> = self
            .conn
            .list_all_networks(0)
            .map_err(|e| api("listing networks", &e))?
            .iter()
            .filter_map(|n| Self::network_facts(n).ok().and_then(|f| f.ipv4))
            .collect();
        let candidates: Vec<(Ipv4Addr, u8)> = match self.config.network_cidr {
            Some(c) => vec![c],
            None => names::default_network_candidates(&cluster.id)
                .map(|n| (n, 24))
                .collect(),
        };
        let mut last_err = None;
        for (addr, prefix) in candidates {
            let plan = names::AddressPlan::new(addr, prefix)?;
            if taken.iter().any(|(a, p)| plan.overlaps(*a, *p)) {
                if self.config.network_cidr.is_some() {
                    return Err(ProviderError::Invalid(format!(
                        "network {}/{prefix} overlaps another libvirt network on {}; choose another subnet",
                        plan.network, self.config.uri
                    )));
                }
                continue;
            }
            let xml = NetworkXml {
                name: name.clone(),
                bridge: names::bridge_name(&cluster.id),
                gateway: plan.gateway,
                prefix,
                dhcp_start: plan.dhcp_start,
                dhcp_end: plan.dhcp_end,
                hosts: Vec::new(),
                label: self.label(cluster, vec![(ATTR_KIND.into(), "network".into())]),
            }
            .render();
            tracing::info!(cluster = %cluster.name, network = %name, subnet = %format!("{}/{prefix}", plan.network), "creating network");
            let net = self
                .conn
                .define_network_xml(&xml)
                .map_err(|e| api(format!("defining network {name:?}"), &e))?;
            match net.create() {
                Ok(()) => {
                    let facts = Self::network_facts(&net)?;
                    return Ok((net, facts));
                }
                Err(e) => {
                    let _ = net.undefine();
                    last_err = Some(api(
                        format!("starting network {name:?} on {}/{prefix}", plan.network),
                        &e,
                    ));
                    if self.config.network_cidr.is_some() {
                        break;
                    }
                }
            }
        }
        Err(last_err.unwrap_or_else(|| ProviderError::Api {
            operation: format!("creating network {name:?}"),
            detail:
                "no free /24 left in 10.213.0.0/16; set a network CIDR in the provider settings"
                    .into(),
        }))
    }

    /// The machine's DHCP reservation: found by name, or a new one with a fresh MAC and the
    /// lowest free address, added to the live and persistent network definition.
    fn ensure_reservation(
        &self,
        cluster: &ClusterRef,
        net: &Network,
        machine: &str,
    ) -> Result<DhcpHost> {
        let facts = Self::network_facts(net)?;
        if let Some(h) = facts.hosts.iter().find(|h| h.name == machine) {
            return Ok(h.clone());
        }
        let (gw, prefix) = facts.ipv4.ok_or_else(|| ProviderError::Api {
            operation: format!("reserving an address for {machine:?}"),
            detail: "the cluster network has no IPv4 address".into(),
        })?;
        let plan = names::AddressPlan::new(gw, prefix)?;
        let hosts: Vec<(Ipv4Addr, String)> =
            facts.hosts.iter().map(|h| (h.ip, h.name.clone())).collect();
        let (ip, reclaimed) = plan.choose(&hosts).ok_or_else(|| {
            ProviderError::Invalid(format!(
                "the cluster network {}/{prefix} has no free address left for {machine:?}",
                plan.network
            ))
        })?;
        if let Some(tomb) = reclaimed
            && let Some(h) = facts.hosts.iter().find(|h| h.name == tomb)
        {
            net.update(
                virt::sys::VIR_NETWORK_UPDATE_COMMAND_DELETE,
                virt::sys::VIR_NETWORK_SECTION_IP_DHCP_HOST,
                -1,
                &h.render(),
                virt::sys::VIR_NETWORK_UPDATE_AFFECT_LIVE
                    | virt::sys::VIR_NETWORK_UPDATE_AFFECT_CONFIG,
            )
            .map_err(|e| api(format!("taking back address {ip} for {machine:?}"), &e))?;
        }
        let mac = (0..64)
            .map(|i| names::candidate_mac(&cluster.id, machine, i))
            .find(|m| !facts.hosts.iter().any(|h| h.mac.eq_ignore_ascii_case(m)))
            .ok_or_else(|| {
                ProviderError::Invalid(format!("no free MAC address for {machine:?}"))
            })?;
        let host = DhcpHost {
            mac,
            name: machine.to_string(),
            ip,
        };
        net.update(
            virt::sys::VIR_NETWORK_UPDATE_COMMAND_ADD_LAST,
            virt::sys::VIR_NETWORK_SECTION_IP_DHCP_HOST,
            -1,
            &host.render(),
            virt::sys::VIR_NETWORK_UPDATE_AFFECT_LIVE | virt::sys::VIR_NETWORK_UPDATE_AFFECT_CONFIG,
        )
        .map_err(|e| api(format!("reserving {ip} for {machine:?}"), &e))?;
        Ok(host)
    }

    /// Ends a deleted machine's reservation. The entry stays as a tombstone (same MAC and
    /// address, named `retired-<unix time>-<mac>`, changed in one `MODIFY`): dnsmasq keeps the
    /// machine's lease for up to an hour, and a new machine given that address meanwhile would
    /// get a dynamic one instead ([`names::AddressPlan::choose`] takes tombstones back only when
    /// the range is full).
    fn remove_reservation(net: &Network, machine: &str) -> Result<()> {
        let facts = Self::network_facts(net)?;
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        for h in facts.hosts.iter().filter(|h| h.name == machine) {
            let flags = if net.is_active().unwrap_or(false) {
                virt::sys::VIR_NETWORK_UPDATE_AFFECT_LIVE
                    | virt::sys::VIR_NETWORK_UPDATE_AFFECT_CONFIG
            } else {
                virt::sys::VIR_NETWORK_UPDATE_AFFECT_CONFIG
            };
            let tomb = DhcpHost {
                mac: h.mac.clone(),
                name: names::retired_host_name(now, &h.mac),
                ip: h.ip,
            };
            if net
                .update(
                    virt::sys::VIR_NETWORK_UPDATE_COMMAND_MODIFY,
                    virt::sys::VIR_NETWORK_SECTION_IP_DHCP_HOST,
                    -1,
                    &tomb.render(),
                    flags,
                )
                .is_ok()
            {
                continue;
            }
            net.update(
                virt::sys::VIR_NETWORK_UPDATE_COMMAND_DELETE,
                virt::sys::VIR_NETWORK_SECTION_IP_DHCP_HOST,
                -1,
                &h.render(),
                flags,
            )
            .map_err(|e| {
                api(
                    format!("removing the address reservation of {machine:?}"),
                    &e,
                )
            })?;
        }
        Ok(())
    }

    // ----- storage -----

    fn lookup_pool(&self, name: &str) -> Result<Option<StoragePool>> {
        match self.conn.lookup_storage_pool_by_name(name) {
            Ok(p) => Ok(Some(p)),
            Err(e) if is_code(&e, ErrorNumber::NoStoragePool) => Ok(None),
            Err(e) => Err(api(format!("looking up storage pool {name:?}"), &e)),
        }
    }

    fn pool_volume_names(pool: &StoragePool) -> Result<Vec<String>> {
        if !pool.is_active().unwrap_or(false) {
            return Ok(Vec::new());
        }
        // Refreshing picks up files libvirt did not create; it is refused while another thread
        // uploads into the pool, and then libvirt's own list is current anyway.
        let _ = pool.refresh(0);
        pool.list_volumes().map_err(|e| api("listing volumes", &e))
    }

    /// The cluster's pool if it is provably ours (see the module docs), started.
    fn our_pool(&self, cluster: &ClusterRef) -> Result<Option<StoragePool>> {
        let name = names::cluster_object_name(&cluster.id);
        let Some(pool) = self.lookup_pool(&name)? else {
            return Ok(None);
        };
        if !pool
            .is_active()
            .map_err(|e| api(format!("reading storage pool {name:?}"), &e))?
        {
            // A run killed between defining and building the pool left no directory: build it
            // (on an existing directory this fails harmlessly).
            let _ = pool.build(0);
            pool.create(0)
                .map_err(|e| api(format!("starting storage pool {name:?}"), &e))?;
        }
        let vols = Self::pool_volume_names(&pool)?;
        let marker = names::owner_marker_volume(&cluster.id);
        if vols.contains(&marker) || vols.is_empty() {
            Ok(Some(pool))
        } else {
            Err(ProviderError::NameClash {
                kind: "storage pool",
                name,
            })
        }
    }

    fn ensure_pool(&self, cluster: &ClusterRef) -> Result<StoragePool> {
        let name = names::cluster_object_name(&cluster.id);
        let pool = match self.our_pool(cluster)? {
            Some(p) => p,
            None => {
                let path = format!(
                    "{}/{}",
                    self.config.storage_root.trim_end_matches('/'),
                    cluster.id
                );
                tracing::info!(cluster = %cluster.name, pool = %name, %path, "creating storage pool");
                let xml = DirPoolXml {
                    name: name.clone(),
                    path,
                }
                .render();
                let pool = self
                    .conn
                    .define_storage_pool_xml(&xml, 0)
                    .map_err(|e| api(format!("defining storage pool {name:?}"), &e))?;
                pool.build(0).map_err(|e| {
                    api(
                        format!("creating the directory of storage pool {name:?}"),
                        &e,
                    )
                })?;
                pool.create(0)
                    .map_err(|e| api(format!("starting storage pool {name:?}"), &e))?;
                pool
            }
        };
        let marker = names::owner_marker_volume(&cluster.id);
        if self.lookup_volume(&pool, &marker)?.is_none() {
            let content = format!(
                "clusterctl storage pool of cluster {} (id {})\n",
                cluster.name, cluster.id
            );
            self.upload_volume(&pool, &marker, content.as_bytes(), None)?;
        }
        Ok(pool)
    }

    fn lookup_volume(&self, pool: &StoragePool, name: &str) -> Result<Option<StorageVol>> {
        match pool.lookup_storage_vol_by_name(name) {
            Ok(v) => Ok(Some(v)),
            Err(e) if is_code(&e, ErrorNumber::NoStorageVolume) => Ok(None),
            Err(e) => Err(api(format!("looking up volume {name:?}"), &e)),
        }
    }

    fn delete_volume_if_present(&self, pool: &StoragePool, name: &str) -> Result<()> {
        if let Some(v) = self.lookup_volume(pool, name)? {
            v.delete(0)
                .map_err(|e| api(format!("deleting volume {name:?}"), &e))?;
        }
        Ok(())
    }

    fn create_volume(&self, pool: &StoragePool, spec: &VolumeXml) -> Result<StorageVol> {
        StorageVol::create_xml(pool, &spec.render(), 0)
            .map_err(|e| api(format!("creating volume {:?}", spec.name), &e))
    }

    /// Creates a raw volume and streams `data` (or the file at `file`) into it.
    fn upload_volume(
        &self,
        pool: &StoragePool,
        name: &str,
        data: &[u8],
        file: Option<&std::path::Path>,
    ) -> Result<StorageVol> {
        let op = format!("uploading volume {name:?}");
        let len = match file {
            Some(f) => std::fs::metadata(f)
                .map_err(|e| ProviderError::Api {
                    operation: op.clone(),
                    detail: format!("{}: {e}", f.display()),
                })?
                .len(),
            None => data.len() as u64,
        };
        let vol = self.create_volume(
            pool,
            &VolumeXml {
                name: name.into(),
                capacity_bytes: len.max(1),
                format: "raw".into(),
                backing: None,
            },
        )?;
        let stream = Stream::new(&self.conn, 0).map_err(|e| api(op.clone(), &e))?;
        vol.upload(&stream, 0, len, 0)
            .map_err(|e| api(op.clone(), &e))?;
        let send_all = |chunk: &[u8]| -> Result<()> {
            let mut off = 0;
            while off < chunk.len() {
                let n = stream
                    .send(&chunk[off..])
                    .map_err(|e| api(op.clone(), &e))?;
                if n <= 0 {
                    return Err(ProviderError::Api {
                        operation: op.clone(),
                        detail: "the stream accepted no data".into(),
                    });
                }
                off += n as usize;
            }
            Ok(())
        };
        let sent = match file {
            None => send_all(data),
            Some(path) => (|| {
                use std::io::Read;
                let mut f = std::fs::File::open(path).map_err(|e| ProviderError::Api {
                    operation: op.clone(),
                    detail: format!("{}: {e}", path.display()),
                })?;
                let mut buf = vec![0u8; 1 << 20];
                loop {
                    let n = f.read(&mut buf).map_err(|e| ProviderError::Api {
                        operation: op.clone(),
                        detail: format!("{}: {e}", path.display()),
                    })?;
                    if n == 0 {
                        return Ok(());
                    }
                    send_all(&buf[..n])?;
                }
            })(),
        };
        match sent {
            Ok(()) => stream.finish().map_err(|e| api(op.clone(), &e))?,
            Err(err) => {
                let _ = stream.abort();
                let _ = vol.delete(0);
                return Err(err);
            }
        }
        Ok(vol)
    }

    fn volume_path(vol: &StorageVol) -> Result<String> {
        vol.path().map_err(|e| api("reading a volume path", &e))
    }

    /// Uploads the image's kernel, initrd and root into the pool once per image digest.
    fn ensure_image(
        &self,
        cluster: &ClusterRef,
        pool: &StoragePool,
        image: &ImageRef,
        art: &ImageArtifacts,
    ) -> Result<ImageVolumes> {
        let n = names::image_volumes(&image.digest);
        if self.lookup_volume(pool, &n.complete)?.is_none() {
            // Anything from an interrupted upload is discarded and uploaded again.
            for v in [&n.kernel, &n.initrd, &n.root] {
                self.delete_volume_if_present(pool, v)?;
            }
            tracing::info!(cluster = %cluster.name, image = %image.version, "uploading node image");
            self.upload_volume(pool, &n.kernel, &[], Some(&art.kernel))?;
            self.upload_volume(pool, &n.initrd, &[], Some(&art.initrd))?;
            self.upload_volume(pool, &n.root, &[], Some(&art.root))?;
            self.upload_volume(pool, &n.complete, image.digest.as_bytes(), None)?;
        }
        let path_of = |name: &str| -> Result<String> {
            let v = self
                .lookup_volume(pool, name)?
                .ok_or_else(|| ProviderError::Api {
                    operation: "reading image volumes".into(),
                    detail: format!("volume {name:?} disappeared"),
                })?;
            Self::volume_path(&v)
        };
        let virtual_size = image::virtual_size(&art.root, &art.root_format).map_err(|e| {
            ProviderError::ImageMissing {
                image: image.version.clone(),
                detail: format!("cannot read {}: {e}", art.root.display()),
            }
        })?;
        Ok(ImageVolumes {
            kernel: path_of(&n.kernel)?,
            initrd: path_of(&n.initrd)?,
            root: path_of(&n.root)?,
            root_format: art.root_format.clone(),
            root_virtual_size: virtual_size,
        })
    }

    // ----- accelerator -----

    fn resolve_accel(&self, cluster: &ClusterRef, kernel_path: &str) -> Result<DomainAccel> {
        let mut cached = self
            .accel
            .lock()
            .map_err(|_| ProviderError::Invalid("internal lock poisoned".into()))?;
        if let Some(a) = *cached {
            return Ok(a);
        }
        let tcg = DomainAccel::Tcg {
            tb_cache_mib: self.config.tcg_tb_cache_mib,
        };
        let wanted = accel::requested(self.config.accelerator).map_err(ProviderError::Invalid)?;
        let chosen = match wanted {
            Accelerator::Kvm => DomainAccel::Kvm,
            Accelerator::Tcg => tcg,
            Accelerator::Auto => {
                let host = self.host();
                let cache = self
                    .config
                    .cache_dir
                    .as_ref()
                    .map(|d| accel::cache_file(d, &self.config.uri, &host));
                let verdict = match cache.as_deref().and_then(accel::read_cache) {
                    Some(v) => v,
                    None => {
                        tracing::info!(cluster = %cluster.name, %host, "probing whether KVM boots a guest");
                        let label =
                            self.label(cluster, vec![(ATTR_KIND.into(), "kvm-probe".into())]);
                        let v = accel::probe(
                            &self.conn,
                            kernel_path,
                            label,
                            self.config.kvm_probe_timeout,
                        );
                        tracing::info!(kvm_works = v.kvm_works, probe_ms = v.probe_ms, detail = %v.detail, "KVM probe finished");
                        if let Some(c) = &cache {
                            accel::write_cache(c, &v);
                        }
                        v
                    }
                };
                let a = if verdict.kvm_works {
                    DomainAccel::Kvm
                } else {
                    tcg
                };
                if let Ok(mut p) = self.probe.lock() {
                    *p = Some(verdict);
                }
                a
            }
        };
        *cached = Some(chosen);
        Ok(chosen)
    }

    // ----- machines -----

    /// The domain XML of a machine: direct kernel boot of its image, root overlay, data disk and
    /// seed disk from the cluster's pool, one NIC with the reserved MAC, console logged.
    fn machine_domain_xml(&self, d: &MachineDomain<'_>) -> String {
        let pool_name = names::cluster_object_name(&d.cluster.id);
        let vols = names::machine_volumes(d.name);
        let disk =
            |volume: &str, target: &str, format: &str, readonly: bool, serial: &str| DomainDisk {
                pool: pool_name.clone(),
                volume: volume.to_string(),
                format: format.to_string(),
                target: target.to_string(),
                readonly,
                serial: Some(serial.to_string()),
            };
        DomainXml {
            name: d.name.to_string(),
            uuid: d.uuid.clone(),
            accel: d.accel,
            vcpus: d.vcpus.max(1),
            memory_mib: d.memory_mib.max(128),
            kernel: d.image.kernel.clone(),
            initrd: Some(d.image.initrd.clone()),
            cmdline: format!("{} systemd.hostname={}", d.art.cmdline.trim(), d.name),
            disks: vec![
                disk(&vols.root, "vda", "qcow2", false, "root"),
                disk(&vols.data, "vdb", "qcow2", false, "data"),
                disk(&vols.seed, "vdc", "raw", true, "cidata"),
            ],
            network: Some(d.network.clone()),
            mac: Some(d.mac.clone()),
            console_log: Some(format!("/var/log/libvirt/qemu/{}-console.log", d.name)),
            on_reboot: "restart",
            label: d.label.clone(),
        }
        .render()
    }

    /// This cluster's domain `name`: not found, or a name clash if it is another's.
    fn own_domain(&self, cluster: &ClusterRef, name: &str) -> Result<(Domain, DomainFacts)> {
        names::check_cluster_id(&cluster.id)?;
        names::check_machine_name(name)?;
        let Some(dom) = self.lookup_domain(name)? else {
            return Err(ProviderError::NotFound {
                kind: "machine",
                name: name.to_string(),
            });
        };
        let facts = self.facts(&dom)?;
        if !Self::is_ours(facts.label.as_ref(), cluster) {
            return Err(ProviderError::NameClash {
                kind: "domain",
                name: name.to_string(),
            });
        }
        Ok((dom, facts))
    }

    /// Powers a domain off: ACPI shutdown, up to the grace period, then a hard stop.
    fn power_off(&self, dom: &Domain, name: &str) -> Result<()> {
        let active = |d: &Domain| {
            d.is_active()
                .map_err(|e| api(format!("reading the state of domain {name:?}"), &e))
        };
        if !active(dom)? {
            return Ok(());
        }
        if !self.config.shutdown_grace.is_zero() {
            tracing::info!(node = %name, grace_s = self.config.shutdown_grace.as_secs(), "shutting the machine down");
            match dom.shutdown() {
                Ok(()) => {
                    let deadline = std::time::Instant::now() + self.config.shutdown_grace;
                    while active(dom)? && std::time::Instant::now() < deadline {
                        std::thread::sleep(Duration::from_millis(500));
                    }
                }
                Err(e) if is_code(&e, ErrorNumber::OperationInvalid) => {}
                Err(e) => return Err(api(format!("shutting down domain {name:?}"), &e)),
            }
        }
        if active(dom)? {
            tracing::info!(node = %name, "stopping the machine hard");
            if let Err(e) = dom.destroy()
                && !is_code(&e, ErrorNumber::OperationInvalid)
            {
                return Err(api(format!("stopping domain {name:?}"), &e));
            }
        }
        Ok(())
    }

    fn start_if_stopped(dom: &Domain, name: &str) -> Result<()> {
        let (state, _) = dom
            .state()
            .map_err(|e| api(format!("reading the state of domain {name:?}"), &e))?;
        use virt::domain::DomainState as S;
        match state {
            virt::enumutil::Enum::Known(S::Running | S::Blocked) => Ok(()),
            virt::enumutil::Enum::Known(S::Paused) => dom
                .resume()
                .map_err(|e| api(format!("resuming domain {name:?}"), &e)),
            _ => {
                tracing::info!(node = %name, "starting machine");
                dom.create()
                    .map(|_| ())
                    .map_err(|e| api(format!("starting domain {name:?}"), &e))
            }
        }
    }

    fn machine_by_domain(&self, cluster: &ClusterRef, dom: &Domain) -> Result<Machine> {
        let facts = self.facts(dom)?;
        let reservations = match self.our_network(cluster) {
            Ok(Some((_, f))) => f.hosts,
            _ => Vec::new(),
        };
        self.machine_of(dom, &facts, &reservations)
    }

    fn create_machine(&self, cluster: &ClusterRef, spec: &MachineSpec) -> Result<Machine> {
        let art = ImageArtifacts::load(&spec.image)?;
        let seed_content = |mac: &str| {
            let meta = templates::libvirt::nocloud_meta_data(
                &format!("{}-{}", cluster.id, spec.name),
                &spec.name,
            );
            let net = templates::libvirt::nocloud_network_config(mac);
            seed::build(&[
                ("meta-data", &meta),
                ("user-data", &spec.user_data),
                ("network-config", &net),
            ])
            .map_err(ProviderError::Invalid)
        };
        let (net_name, pool, image, host) = {
            let _guard = self
                .setup
                .lock()
                .map_err(|_| ProviderError::Invalid("internal lock poisoned".into()))?;
            let (net, _) = self.ensure_network(cluster)?;
            let pool = self.ensure_pool(cluster)?;
            let image = self.ensure_image(cluster, &pool, &spec.image, &art)?;
            let host = self.ensure_reservation(cluster, &net, &spec.name)?;
            (
                net.name()
                    .map_err(|e| api("reading the network name", &e))?,
                pool,
                image,
                host,
            )
        };
        let accel = self.resolve_accel(cluster, &image.kernel)?;
        let vols = names::machine_volumes(&spec.name);
        // No labelled domain exists, so these are leftovers of an interrupted run: start over.
        for v in vols.all() {
            self.delete_volume_if_present(&pool, v)?;
        }
        tracing::info!(cluster = %cluster.name, node = %spec.name, ip = %host.ip, "creating machine disks");
        self.create_volume(
            &pool,
            &VolumeXml {
                name: vols.root.clone(),
                capacity_bytes: image.root_virtual_size,
                format: "qcow2".into(),
                backing: Some((image.root.clone(), image.root_format.clone())),
            },
        )?;
        self.create_volume(
            &pool,
            &VolumeXml {
                name: vols.data.clone(),
                capacity_bytes: spec.size.disk_gib.max(1) << 30,
                format: "qcow2".into(),
                backing: None,
            },
        )?;
        let seed = seed_content(&host.mac)?;
        self.upload_volume(&pool, &vols.seed, &seed, None)?;

        let mut attributes = vec![
            (ATTR_KIND.to_string(), "machine".to_string()),
            (ATTR_MACHINE.to_string(), spec.name.clone()),
            (
                ATTR_ROLE.to_string(),
                match spec.role {
                    MachineRole::ControlPlane => "control-plane".to_string(),
                    MachineRole::Worker => "worker".to_string(),
                },
            ),
            (ATTR_IMAGE.to_string(), spec.image.digest.clone()),
        ];
        if let Some(p) = &spec.pool {
            attributes.push((ATTR_POOL.to_string(), p.clone()));
        }
        let mut label = self.label(cluster, attributes);
        label.labels = spec
            .labels
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        let xml = self.machine_domain_xml(&MachineDomain {
            cluster,
            name: &spec.name,
            uuid: None,
            vcpus: spec.size.cpus,
            memory_mib: spec.size.memory_mib,
            network: net_name,
            mac: host.mac.clone(),
            image: &image,
            art: &art,
            accel,
            label,
        });
        tracing::info!(cluster = %cluster.name, node = %spec.name, "defining machine");
        let dom = match self.conn.define_domain_xml(&xml) {
            Ok(dom) => dom,
            Err(e) if is_code(&e, ErrorNumber::OperationFailed) => {
                // "already exists": a run killed while libvirtd was starting this domain leaves it
                // out of lookups and listings for a few seconds while libvirtd aborts the start.
                let Some(dom) = self.wait_for_domain(&spec.name, DOMAIN_REAPPEAR_TIMEOUT)? else {
                    return Err(api(format!("defining domain {:?}", spec.name), &e));
                };
                if !Self::is_ours(self.facts(&dom)?.label.as_ref(), cluster) {
                    return Err(ProviderError::NameClash {
                        kind: "domain",
                        name: spec.name.clone(),
                    });
                }
                tracing::info!(node = %spec.name, "the domain reappeared; using it");
                dom
            }
            Err(e) => return Err(api(format!("defining domain {:?}", spec.name), &e)),
        };
        Self::start_if_stopped(&dom, &spec.name)?;
        self.machine_by_domain(cluster, &dom)
    }
}

/// What a machine's domain definition is made of.
struct MachineDomain<'a> {
    cluster: &'a ClusterRef,
    name: &'a str,
    uuid: Option<String>,
    vcpus: u32,
    memory_mib: u64,
    network: String,
    mac: String,
    image: &'a ImageVolumes,
    art: &'a ImageArtifacts,
    accel: DomainAccel,
    label: ClusterLabel,
}

/// Paths of an image's volumes on the libvirt host.
struct ImageVolumes {
    kernel: String,
    initrd: String,
    root: String,
    root_format: String,
    root_virtual_size: u64,
}

impl Provider for LibvirtProvider {
    fn name(&self) -> &'static str {
        "libvirt"
    }

    fn ensure_machine(&self, cluster: &ClusterRef, spec: &MachineSpec) -> Result<Machine> {
        names::check_cluster_id(&cluster.id)?;
        names::check_machine_name(&spec.name)?;
        if let Some(fd) = &spec.failure_domain {
            let host = self.host();
            if *fd != host {
                return Err(ProviderError::Invalid(format!(
                    "machine {:?} asks for failure domain {fd:?}, but the libvirt provider has one, the host {host:?}; leave it unset",
                    spec.name
                )));
            }
        }
        if let Some(dom) = self.lookup_domain(&spec.name)? {
            let facts = self.facts(&dom)?;
            if !Self::is_ours(facts.label.as_ref(), cluster) {
                return Err(ProviderError::NameClash {
                    kind: "domain",
                    name: spec.name.clone(),
                });
            }
            Self::start_if_stopped(&dom, &spec.name)?;
            return self.machine_by_domain(cluster, &dom);
        }
        self.create_machine(cluster, spec)
    }

    fn list_machines(&self, cluster: &ClusterRef) -> Result<Vec<Machine>> {
        names::check_cluster_id(&cluster.id)?;
        let reservations = match self.our_network(cluster)? {
            Some((_, f)) => f.hosts,
            None => Vec::new(),
        };
        let mut machines = Vec::new();
        for (dom, facts) in self.cluster_domains(cluster)? {
            if facts.label.as_ref().and_then(|l| l.attr(ATTR_KIND)) == Some("kvm-probe") {
                continue;
            }
            machines.push(self.machine_of(&dom, &facts, &reservations)?);
        }
        machines.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(machines)
    }

    fn delete_machine(&self, cluster: &ClusterRef, name: &str) -> Result<()> {
        names::check_cluster_id(&cluster.id)?;
        names::check_machine_name(name)?;
        if let Some(dom) = self.lookup_domain(name)? {
            let facts = self.facts(&dom)?;
            if Self::is_ours(facts.label.as_ref(), cluster) {
                tracing::info!(cluster = %cluster.name, node = %name, "deleting machine");
                if dom.is_active().unwrap_or(false) {
                    dom.destroy()
                        .map_err(|e| api(format!("stopping domain {name:?}"), &e))?;
                }
                if let Err(e) = dom.undefine()
                    && !is_code(&e, ErrorNumber::NoDomain)
                {
                    return Err(api(format!("undefining domain {name:?}"), &e));
                }
            } else {
                tracing::warn!(node = %name, "a domain with this name exists but is not this cluster's; leaving it alone");
            }
        }
        if let Some(pool) = self.our_pool(cluster)? {
            for v in names::machine_volumes(name).all() {
                self.delete_volume_if_present(&pool, v)?;
            }
        }
        if let Some((net, _)) = self.our_network(cluster)? {
            let _guard = self
                .setup
                .lock()
                .map_err(|_| ProviderError::Invalid("internal lock poisoned".into()))?;
            Self::remove_reservation(&net, name)?;
        }
        Ok(())
    }

    fn delete_cluster(&self, cluster: &ClusterRef) -> Result<()> {
        names::check_cluster_id(&cluster.id)?;
        for (dom, _) in self.cluster_domains(cluster)? {
            let name = dom.name().unwrap_or_default();
            tracing::info!(cluster = %cluster.name, node = %name, "deleting machine");
            if dom.is_active().unwrap_or(false)
                && let Err(e) = dom.destroy()
                && !is_code(&e, ErrorNumber::NoDomain)
                && !is_code(&e, ErrorNumber::OperationInvalid)
            {
                return Err(api(format!("stopping domain {name:?}"), &e));
            }
            if dom.is_persistent().unwrap_or(false)
                && let Err(e) = dom.undefine()
                && !is_code(&e, ErrorNumber::NoDomain)
            {
                return Err(api(format!("undefining domain {name:?}"), &e));
            }
        }
        if let Some(pool) = self.our_pool(cluster)? {
            let name = names::cluster_object_name(&cluster.id);
            tracing::info!(cluster = %cluster.name, pool = %name, "deleting storage pool");
            let marker = names::owner_marker_volume(&cluster.id);
            let mut vols = Self::pool_volume_names(&pool)?;
            // The owner marker goes last, so an interrupted delete still finds the pool ours.
            vols.sort_by_key(|v| *v == marker);
            for v in vols {
                self.delete_volume_if_present(&pool, &v)?;
            }
            if pool.is_active().unwrap_or(false) {
                pool.destroy()
                    .map_err(|e| api(format!("stopping storage pool {name:?}"), &e))?;
            }
            // Removes the (now empty) pool directory.
            if let Err(e) = pool.delete(0) {
                tracing::warn!(pool = %name, error = %e.message(), "could not remove the pool directory");
            }
            pool.undefine()
                .map_err(|e| api(format!("undefining storage pool {name:?}"), &e))?;
        }
        // Networks are found by label, not only by the conventional name.
        for net in self
            .conn
            .list_all_networks(0)
            .map_err(|e| api("listing networks", &e))?
        {
            let Ok(facts) = Self::network_facts(&net) else {
                continue;
            };
            if !Self::is_ours(facts.label.as_ref(), cluster) {
                continue;
            }
            let name = net.name().unwrap_or_default();
            tracing::info!(cluster = %cluster.name, network = %name, "deleting network");
            if net.is_active().unwrap_or(false) {
                net.destroy()
                    .map_err(|e| api(format!("stopping network {name:?}"), &e))?;
            }
            if net.is_persistent().unwrap_or(false) {
                net.undefine()
                    .map_err(|e| api(format!("undefining network {name:?}"), &e))?;
            }
        }
        Ok(())
    }

    fn inventory(&self, cluster: &ClusterRef) -> Result<Vec<Resource>> {
        names::check_cluster_id(&cluster.id)?;
        let mut out = Vec::new();
        for (dom, _) in self.cluster_domains(cluster)? {
            out.push(Resource {
                kind: "domain".into(),
                name: dom.name().unwrap_or_default(),
            });
        }
        let pool_name = names::cluster_object_name(&cluster.id);
        if let Some(pool) = self.lookup_pool(&pool_name)? {
            let vols = Self::pool_volume_names(&pool)?;
            let marker = names::owner_marker_volume(&cluster.id);
            // A same-named pool with other volumes and no marker is not ours (see the module docs).
            if vols.is_empty() || vols.contains(&marker) {
                out.push(Resource {
                    kind: "storage-pool".into(),
                    name: pool_name.clone(),
                });
                out.extend(vols.into_iter().map(|v| Resource {
                    kind: "volume".into(),
                    name: format!("{pool_name}/{v}"),
                }));
            }
        }
        for net in self
            .conn
            .list_all_networks(0)
            .map_err(|e| api("listing networks", &e))?
        {
            if let Ok(facts) = Self::network_facts(&net)
                && Self::is_ours(facts.label.as_ref(), cluster)
            {
                out.push(Resource {
                    kind: "network".into(),
                    name: net.name().unwrap_or_default(),
                });
            }
        }
        out.sort();
        Ok(out)
    }

    fn stop_machine(&self, cluster: &ClusterRef, name: &str) -> Result<Machine> {
        let (dom, _) = self.own_domain(cluster, name)?;
        self.power_off(&dom, name)?;
        self.machine_by_domain(cluster, &dom)
    }

    fn reset_machine(&self, cluster: &ClusterRef, name: &str) -> Result<Machine> {
        let (dom, _) = self.own_domain(cluster, name)?;
        let active = dom
            .is_active()
            .map_err(|e| api(format!("reading the state of domain {name:?}"), &e))?;
        if active {
            tracing::info!(cluster = %cluster.name, node = %name, "resetting machine");
            dom.reset()
                .map_err(|e| api(format!("resetting domain {name:?}"), &e))?;
        }
        // A paused domain resumes; a stopped one starts.
        Self::start_if_stopped(&dom, name)?;
        self.machine_by_domain(cluster, &dom)
    }

    fn replace_boot_disk(
        &self,
        cluster: &ClusterRef,
        name: &str,
        image: &ImageRef,
    ) -> Result<Machine> {
        let (dom, facts) = self.own_domain(cluster, name)?;
        let art = ImageArtifacts::load(image)?;
        let label = facts.label.clone().unwrap_or_default();
        let vols = names::machine_volumes(name);
        let pool = self.our_pool(cluster)?.ok_or_else(|| ProviderError::Api {
            operation: format!("replacing the boot disk of {name:?}"),
            detail: format!(
                "the cluster's storage pool {:?} is missing",
                names::cluster_object_name(&cluster.id)
            ),
        })?;
        if label.attr(ATTR_IMAGE) == Some(image.digest.as_str())
            && self.lookup_volume(&pool, &vols.root)?.is_some()
        {
            // Already done (or done by an interrupted call up to the definition): start it.
            Self::start_if_stopped(&dom, name)?;
            return self.machine_by_domain(cluster, &dom);
        }
        let image_vols = {
            let _guard = self
                .setup
                .lock()
                .map_err(|_| ProviderError::Invalid("internal lock poisoned".into()))?;
            self.ensure_image(cluster, &pool, image, &art)?
        };
        let mac = facts
            .macs
            .first()
            .cloned()
            .ok_or_else(|| ProviderError::Api {
                operation: format!("replacing the boot disk of {name:?}"),
                detail: "the domain has no network interface to keep".into(),
            })?;
        let info = dom
            .info()
            .map_err(|e| api(format!("reading domain {name:?}"), &e))?;
        let uuid = dom
            .uuid_string()
            .map_err(|e| api("reading a domain uuid", &e))?;
        let accel = self.resolve_accel(cluster, &image_vols.kernel)?;
        tracing::info!(cluster = %cluster.name, node = %name, image = %image.version, "replacing the boot disk");
        self.power_off(&dom, name)?;
        self.delete_volume_if_present(&pool, &vols.root)?;
        self.create_volume(
            &pool,
            &VolumeXml {
                name: vols.root.clone(),
                capacity_bytes: image_vols.root_virtual_size,
                format: "qcow2".into(),
                backing: Some((image_vols.root.clone(), image_vols.root_format.clone())),
            },
        )?;
        let mut attributes: Vec<(String, String)> = label
            .attributes
            .iter()
            .filter(|(k, _)| k.as_str() != ATTR_IMAGE)
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        attributes.push((ATTR_IMAGE.to_string(), image.digest.clone()));
        let mut new_label = self.label(cluster, attributes);
        new_label.labels = label.labels.into_iter().collect();
        let xml = self.machine_domain_xml(&MachineDomain {
            cluster,
            name,
            uuid: Some(uuid),
            vcpus: info.nr_virt_cpu,
            memory_mib: info.max_mem / 1024,
            network: names::cluster_object_name(&cluster.id),
            mac,
            image: &image_vols,
            art: &art,
            accel,
            label: new_label,
        });
        let dom = self
            .conn
            .define_domain_xml(&xml)
            .map_err(|e| api(format!("redefining domain {name:?}"), &e))?;
        Self::start_if_stopped(&dom, name)?;
        self.machine_by_domain(cluster, &dom)
    }

    fn resize_machine(
        &self,
        cluster: &ClusterRef,
        name: &str,
        size: &crate::MachineSize,
    ) -> Result<Machine> {
        let (dom, facts) = self.own_domain(cluster, name)?;
        let current = self
            .size_of(&facts, name)
            .ok_or_else(|| ProviderError::Api {
                operation: format!("resizing machine {name:?}"),
                detail: "its vCPUs, memory or data volume cannot be read from libvirt".into(),
            })?;
        if current.disk_gib != size.disk_gib {
            return Err(ProviderError::Invalid(format!(
                "machine {name:?} has a {} GiB data disk; it cannot become {} GiB in place (only CPUs and memory change)",
                current.disk_gib, size.disk_gib
            )));
        }
        if current == *size {
            Self::start_if_stopped(&dom, name)?;
            return self.machine_by_domain(cluster, &dom);
        }
        tracing::info!(cluster = %cluster.name, node = %name, cpus = size.cpus, memory_mib = size.memory_mib, "resizing the machine");
        self.power_off(&dom, name)?;
        // The persistent definition only; the maximum first when growing, last when shrinking,
        // so the current value never exceeds it. A call killed half-way leaves a definition
        // that differs from `size`, which the next call changes again.
        let kib = size.memory_mib.saturating_mul(1024);
        let mem = |flags: u32| {
            dom.set_memory_flags(kib, flags)
                .map_err(|e| api(format!("setting the memory of domain {name:?}"), &e))
        };
        let config = virt::sys::VIR_DOMAIN_MEM_CONFIG;
        let maximum = config | virt::sys::VIR_DOMAIN_MEM_MAXIMUM;
        if size.memory_mib >= current.memory_mib {
            mem(maximum)?;
            mem(config)?;
        } else {
            mem(config)?;
            mem(maximum)?;
        }
        let cpus = |flags: u32| {
            dom.set_vcpus_flags(size.cpus, flags)
                .map_err(|e| api(format!("setting the vCPUs of domain {name:?}"), &e))
        };
        let config = virt::sys::VIR_DOMAIN_VCPU_CONFIG;
        let maximum = config | virt::sys::VIR_DOMAIN_VCPU_MAXIMUM;
        if size.cpus >= current.cpus {
            cpus(maximum)?;
            cpus(config)?;
        } else {
            cpus(config)?;
            cpus(maximum)?;
        }
        Self::start_if_stopped(&dom, name)?;
        self.machine_by_domain(cluster, &dom)
    }
}

#[cfg(test)]
mod tests;
