//! Kubernetes node configuration: systemd units, component configs, containerd, CNI and kernel
//! settings for one node of a cluster, rendered from typed inputs. No I/O.
//!
//! [`render_node`] takes the whole cluster ([`ClusterInput`], every node included) and a node's
//! name and returns [`NodeFiles`]: the files to write on that node, the units to (re)start in
//! order, and the files the units read that are made elsewhere (PKI and kubeconfigs, made by
//! clusterctl's `pki` module). Taking every node at once means the etcd member list, the per-node
//! pod CIDRs and the routes between nodes are derived here and cannot disagree between nodes.
//!
//! # What runs where
//! Every node runs containerd (already in the node image), kubelet and kube-proxy as systemd
//! units, a CNI bridge network on its own `/24` of the pod CIDR ([`node_pod_cidr`]) and a
//! unit that routes every other node's pod `/24` via that node's address. Control-plane nodes add
//! etcd, kube-apiserver, kube-controller-manager and kube-scheduler, also as systemd units:
//! services rather than static pods, so the control plane needs no image pull (works offline).
//!
//! # Pod CIDRs are assigned here, not by the controller-manager
//! kube-controller-manager runs with `--allocate-node-cidrs=false`. Its allocator hands out ranges
//! in registration order, known only after kubelet registered; but the CNI configuration (the
//! bridge's host-local range) and the routes on every other node must be written before that, and
//! the bridge plugin cannot read `Node.spec.podCIDR`. So node `i` gets `/24` number `i` of the pod
//! CIDR, fixed by clusterctl and kept in its state, and `Node.spec.podCIDR` stays empty (nothing
//! in this setup reads it: kube-proxy uses `clusterCIDR`, there is no cloud route controller).
//!
//! # Where files live on the node image (assumption)
//! The node image (`nodeimage/README.md`) has a read-only root, `/etc` as an overlay on tmpfs
//! (writable, but lost at reboot) and `/var` as tmpfs, except `/var/lib/{clusterctl,kubelet,
//! containerd,etcd}` bound from the persistent data disk. Hence [`Layout::default`]: binaries in
//! `/var/lib/clusterctl/bin`, component configs, kubeconfigs and PKI under
//! `/var/lib/clusterctl/kubernetes`, all persistent, so secrets are uploaded once. Files whose
//! path the system fixes are in `/etc`: units in `/etc/systemd/system`, containerd's
//! `/etc/containerd/config.toml`, the CNI conflist in `/etc/cni/net.d`, `/etc/sysctl.d` and
//! `/etc/modules-load.d`. On the node image these vanish at reboot and must be written again
//! before the node works (by the bootstrap, or restored by the image at boot); they hold no
//! secrets. Every rendered path is absolute; [`File::path`] says where the file must end up.
//!
//! # Versions
//! The supported minor versions are a table ([`SUPPORTED_MINOR_VERSIONS`]); each row records the
//! flags and config API versions that differ between minors. Any other version is
//! [`RenderError::UnsupportedVersion`]; call [`check_version`] at plan time to refuse early.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::{IpAddr, Ipv4Addr};

use ipnet::Ipv4Net;
use serde::Serialize;

use crate::RenderError;

const UNIT: &str = include_str!("kubernetes/unit.service");
const KUBELET_CONFIG: &str = include_str!("kubernetes/kubelet-config.yaml");
const KUBE_PROXY_CONFIG: &str = include_str!("kubernetes/kube-proxy-config.yaml");
const CONTAINERD: &str = include_str!("kubernetes/containerd.toml");
const CNI: &str = include_str!("kubernetes/cni.conflist");
const SYSCTL: &str = include_str!("kubernetes/sysctl.conf");
const MODULES: &str = include_str!("kubernetes/modules-load.conf");
const AUDIT_POLICY: &str = include_str!("kubernetes/audit-policy.yaml");
const COREDNS: &str = include_str!("kubernetes/coredns.yaml");

/// Prefix length of each node's pod range.
pub const NODE_POD_PREFIX: u8 = 24;
/// CNI plugins of the node image (Debian's containernetworking-plugins).
pub const CNI_BIN_DIR: &str = "/usr/lib/cni";
/// CNI configuration directory, as in the containerd configuration.
pub const CNI_CONF_DIR: &str = "/etc/cni/net.d";
/// containerd's CRI socket.
pub const CONTAINERD_ENDPOINT: &str = "unix:///run/containerd/containerd.sock";
/// etcd's client port.
pub const ETCD_CLIENT_PORT: u16 = 2379;
/// etcd's peer port.
pub const ETCD_PEER_PORT: u16 = 2380;
/// Leader election of the controller-manager and scheduler: lease, renew deadline and retry
/// period. Kubernetes' defaults (15 s, 10 s, 2 s) make a component that cannot renew within 10 s
/// exit; on a slow or busy control plane (measured under QEMU TCG: the controller-manager restarted
/// 3 times in 10 minutes and Deployments made no pods meanwhile) that loses minutes. These give a
/// busy API server 40 s, at the cost of up to 60 s before a standby takes over in an HA control plane.
const LEADER_LEASE: &str = "60s";
const LEADER_RENEW: &str = "40s";
const LEADER_RETRY: &str = "5s";

/// Leader-election flags of the controller-manager and scheduler: with one control plane there
/// is no standby to elect, and a renewal that times out on a starved API server makes the
/// component exit (`leaderelection lost`) and then wait out the old lease before it works again
/// (measured under QEMU TCG on a loaded host: a ReplicaSet made no pods for 10 minutes), so
/// election is off; with several, on with the lease above.
fn leader_election_flags(control_planes: usize) -> Vec<String> {
    if control_planes > 1 {
        vec![
            flag("leader-elect", "true"),
            flag("leader-elect-lease-duration", LEADER_LEASE),
            flag("leader-elect-renew-deadline", LEADER_RENEW),
            flag("leader-elect-retry-period", LEADER_RETRY),
        ]
    } else {
        vec![flag("leader-elect", "false")]
    }
}

/// One supported Kubernetes minor version and what differs in it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VersionProfile {
    /// Minor version, such as `"1.20"`.
    pub minor: &'static str,
    /// `apiVersion` of the KubeletConfiguration file.
    pub kubelet_config_api: &'static str,
    /// `apiVersion` of the KubeProxyConfiguration file.
    pub kube_proxy_config_api: &'static str,
    /// kubelet needs `--container-runtime=remote` to use containerd (the flag is gone in 1.27,
    /// where remote is the only runtime).
    pub kubelet_container_runtime_flag: bool,
    /// kubelet's `--pod-infra-container-image` exists (it keeps the pause image from image GC;
    /// deprecated in 1.27).
    pub kubelet_pod_infra_image_flag: bool,
    /// controller-manager and scheduler still serve an insecure port that `--port=0` turns off
    /// (the flag is gone in 1.24).
    pub insecure_port_flag: bool,
    /// The taint key kubeadm puts on control-plane nodes in this version (informational for
    /// callers choosing taints: `node-role.kubernetes.io/master` until 1.24).
    pub control_plane_taint_key: &'static str,
    /// kube-apiserver runs with `--enable-priority-and-fairness=false` (the max-in-flight limits
    /// protect it instead). 1.20's API Priority and Fairness updates its sample-and-watermark
    /// histograms every few milliseconds whether or not requests arrive (kubernetes/kubernetes
    /// #97685, reworked upstream in 1.25): profiled on an idle 3-node cluster under QEMU TCG it
    /// was 45% of the API server's CPU (24.1 s of samples in 60 s with it, 6.8 s in 30 s without),
    /// on a control plane that shares 2 host cores with its workers.
    pub disable_priority_and_fairness: bool,
    /// The CoreDNS release that goes with this minor (kubeadm's `CoreDNSVersion`), and its image
    /// in the upstream registry.
    pub coredns_version: &'static str,
    /// See `coredns_version`.
    pub coredns_image: &'static str,
}

/// The supported minor versions, oldest first. 1.20 is the only server version buildable offline
/// here (see `/work/shared/TESTBED.md`); a new row needs its own flag check against real binaries.
pub const SUPPORTED_MINOR_VERSIONS: &[VersionProfile] = &[VersionProfile {
    minor: "1.20",
    kubelet_config_api: "kubelet.config.k8s.io/v1beta1",
    kube_proxy_config_api: "kubeproxy.config.k8s.io/v1alpha1",
    kubelet_container_runtime_flag: true,
    kubelet_pod_infra_image_flag: true,
    insecure_port_flag: true,
    control_plane_taint_key: "node-role.kubernetes.io/master",
    disable_priority_and_fairness: true,
    coredns_version: "1.7.0",
    coredns_image: "registry.k8s.io/coredns:1.7.0",
}];

/// Returns the profile of a Kubernetes version such as `1.20.2` or `v1.20.2` (pre-release and
/// build suffixes allowed), or [`RenderError::UnsupportedVersion`] naming the supported minors.
pub fn check_version(version: &str) -> Result<&'static VersionProfile, RenderError> {
    let unsupported = || RenderError::UnsupportedVersion {
        version: version.to_owned(),
        supported: SUPPORTED_MINOR_VERSIONS
            .iter()
            .map(|p| p.minor)
            .collect::<Vec<_>>()
            .join(", "),
    };
    let core = version.strip_prefix('v').unwrap_or(version);
    let core = core.split(['-', '+']).next().unwrap_or(core);
    let parts: Vec<&str> = core.split('.').collect();
    let numeric = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    if !(parts.len() == 2 || parts.len() == 3) || !parts.iter().all(|p| numeric(p)) {
        return Err(unsupported());
    }
    let (Ok(major), Ok(minor)) = (parts[0].parse::<u64>(), parts[1].parse::<u64>()) else {
        return Err(unsupported());
    };
    let minor = format!("{major}.{minor}");
    SUPPORTED_MINOR_VERSIONS
        .iter()
        .find(|p| p.minor == minor)
        .ok_or_else(unsupported)
}

/// Where things live on a node. Every path is absolute.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Layout {
    /// Directory of the Kubernetes and etcd binaries (`kube-apiserver`, `kubelet`, `etcd`, ...).
    pub bin_dir: String,
    /// Directory of the component configs (`kubelet-config.yaml`, `kube-proxy-config.yaml`) and
    /// kubeconfigs (`kubelet.conf`, `kube-proxy.conf`, `controller-manager.conf`,
    /// `scheduler.conf`).
    pub config_dir: String,
    /// The PKI directory in kubeadm's layout, as made by clusterctl's `pki` module: `ca.crt`,
    /// `etcd/ca.crt`, `front-proxy-ca.crt`, `sa.key`, `sa.pub`, `apiserver.crt`,
    /// `etcd/server-<node>.crt`, `kubelet/<node>-serving.crt`, ...
    pub pki_dir: String,
    /// etcd's data directory.
    pub etcd_data_dir: String,
}

impl Default for Layout {
    /// The node image layout: everything clusterctl uploads under the persistent
    /// `/var/lib/clusterctl`, etcd's data on the persistent `/var/lib/etcd`.
    fn default() -> Self {
        Self {
            bin_dir: "/var/lib/clusterctl/bin".to_owned(),
            config_dir: "/var/lib/clusterctl/kubernetes".to_owned(),
            pki_dir: "/var/lib/clusterctl/kubernetes/pki".to_owned(),
            etcd_data_dir: "/var/lib/etcd".to_owned(),
        }
    }
}

/// Where kube-apiserver writes its audit log (JSON lines, rotated at 20 MiB, 3 old files
/// kept): under the config directory, on the data disk.
pub fn audit_log_path(layout: &Layout) -> String {
    format!("{}/audit/audit.log", layout.config_dir)
}

/// Whether etcd members form a new cluster or join a running one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum EtcdClusterState {
    /// First start of every member listed (`--initial-cluster-state=new`).
    New,
    /// A member added to a running cluster with `etcdctl member add` first.
    Existing,
}

/// Role of a node.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum Role {
    /// Runs etcd and the control-plane components, plus kubelet and kube-proxy.
    ControlPlane,
    /// Runs kubelet and kube-proxy.
    Worker,
}

/// Effect of a taint.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum TaintEffect {
    /// `NoSchedule`.
    NoSchedule,
    /// `PreferNoSchedule`.
    PreferNoSchedule,
    /// `NoExecute`.
    NoExecute,
}

impl fmt::Display for TaintEffect {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            TaintEffect::NoSchedule => "NoSchedule",
            TaintEffect::PreferNoSchedule => "PreferNoSchedule",
            TaintEffect::NoExecute => "NoExecute",
        })
    }
}

/// A taint kubelet registers the node with.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Taint {
    /// Key (label-key syntax).
    pub key: String,
    /// Value (label-value syntax), if any.
    pub value: Option<String>,
    /// Effect.
    pub effect: TaintEffect,
}

/// One node of the cluster.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct NodeInput {
    /// Node name (DNS-1123 subdomain); the name in its kubelet certificate
    /// (`system:node:<name>`) and its etcd member name on a control-plane node.
    pub name: String,
    /// The node's address on the machine network; other nodes route its pods via it.
    pub ip: Ipv4Addr,
    /// Role.
    pub role: Role,
    /// Index of the node's pod range: `/24` number `pod_cidr_index` of the cluster's pod CIDR
    /// ([`node_pod_cidr`]). Unique in the cluster and kept for the node's life.
    pub pod_cidr_index: u32,
    /// Labels kubelet registers the node with. Keys in the `kubernetes.io`/`k8s.io` namespaces
    /// are refused unless kubelet may set them (`node.kubernetes.io/`, `kubelet.kubernetes.io/`
    /// and a few well-known ones); role labels such as `node-role.kubernetes.io/control-plane`
    /// must be set through the API by an administrator.
    pub labels: BTreeMap<String, String>,
    /// Taints kubelet registers the node with.
    pub taints: Vec<Taint>,
}

/// Everything cluster-wide, with every node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ClusterInput {
    /// Kubernetes version, such as `1.20.2` ([`check_version`]).
    pub kubernetes_version: String,
    /// Cluster name (controller-manager `--cluster-name`, etcd cluster token).
    pub cluster_name: String,
    /// Service CIDR (`--service-cluster-ip-range`).
    pub service_cidr: Ipv4Net,
    /// Cluster DNS service address given to pods (kubelet `clusterDNS`), inside the service CIDR;
    /// by convention the tenth address (`10.96.0.10`).
    pub dns_service_ip: Ipv4Addr,
    /// Pod CIDR of the cluster; each node gets a `/24` of it.
    pub pod_cidr: Ipv4Net,
    /// Cluster DNS domain, such as `cluster.local`.
    pub cluster_domain: String,
    /// kube-apiserver's secure port on every control-plane node.
    pub api_server_port: u16,
    /// Address kubelet and kube-proxy on workers reach the API server at (a load balancer or
    /// virtual IP for several control-plane nodes); `None` means the first control-plane node's
    /// address. Components on control-plane nodes use their local API server.
    pub api_server_host: Option<IpAddr>,
    /// Whether etcd forms a new cluster or members join a running one.
    pub etcd_cluster_state: EtcdClusterState,
    /// The pause image of the bundle, as loaded into containerd (`sandbox_image`).
    pub pause_image: String,
    /// Give the controller-manager the cluster CA's private key so it signs certificate signing
    /// requests (`--cluster-signing-*`; needed for `kubectl certificate approve` and kubelet
    /// serving-certificate rotation). Off by default: clusterctl issues every certificate itself
    /// and the CA key stays in the cluster's state on the admin machine.
    pub controller_manager_signs: bool,
    /// Paths on the nodes.
    pub layout: Layout,
    /// Every node of the cluster; control-plane nodes in etcd member order.
    pub nodes: Vec<NodeInput>,
}

/// A file to write on a node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct File {
    /// Absolute path on the node.
    pub path: String,
    /// Permission bits, such as `0o644`.
    pub mode: u32,
    /// Contents.
    pub contents: String,
}

/// Where a file the units read (but this module does not render) comes from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub enum Source {
    /// A file of the cluster's PKI, by its path relative to the PKI directory, such as `ca.crt`,
    /// `sa.key` or `etcd/server-cp-1.key`.
    Pki(String),
    /// A kubeconfig for the client certificate with this stem (`scheduler`,
    /// `kubelet/w-1-client`: the `pki` module's `kubeconfig(stem, server)`), pointing at `server`.
    Kubeconfig {
        /// Stem of the client certificate in the PKI.
        cert: String,
        /// API server URL, such as `https://127.0.0.1:6443`.
        server: String,
    },
}

/// A file the rendered units read that the caller must provide.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ExternalFile {
    /// Absolute path on the node.
    pub path: String,
    /// What to put there. Every one of these is secret or integrity-relevant: write it 0600.
    pub source: Source,
}

/// Everything for one node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct NodeFiles {
    /// Files to write, in a stable order.
    pub files: Vec<File>,
    /// Units to restart after writing the files (after `systemctl daemon-reload`), in this
    /// order: kernel settings and containerd first, then the cluster's own units, each enabled.
    pub units: Vec<String>,
    /// Files the units read that are made elsewhere (PKI, kubeconfigs).
    pub external: Vec<ExternalFile>,
}

/// The `/24` pod range number `index` of `pod_cidr`, or an error naming how many there are.
pub fn node_pod_cidr(pod_cidr: Ipv4Net, index: u32) -> Result<Ipv4Net, RenderError> {
    let prefix = pod_cidr.prefix_len();
    if prefix > NODE_POD_PREFIX {
        return Err(invalid(
            "pod_cidr",
            format!("{pod_cidr} is smaller than one /{NODE_POD_PREFIX} per node; use a /16"),
        ));
    }
    let count = 1u64 << (NODE_POD_PREFIX - prefix);
    if u64::from(index) >= count {
        return Err(invalid(
            "pod_cidr_index",
            format!(
                "index {index} is outside {pod_cidr}, which has {count} /{NODE_POD_PREFIX} ranges"
            ),
        ));
    }
    let base = u32::from(pod_cidr.network()) + (index << (32 - u32::from(NODE_POD_PREFIX)));
    Ipv4Net::new(Ipv4Addr::from(base), NODE_POD_PREFIX)
        .map_err(|e| invalid("pod_cidr", e.to_string()))
}

fn invalid(field: impl Into<String>, reason: impl Into<String>) -> RenderError {
    RenderError::Invalid {
        field: field.into(),
        reason: reason.into(),
    }
}

fn template_error(template: &str, e: &dyn std::error::Error) -> RenderError {
    RenderError::Template {
        template: template.to_owned(),
        detail: e.to_string().lines().next().unwrap_or_default().to_owned(),
    }
}

// ---- validation ----------------------------------------------------------------------------

fn is_dns_label(s: &str) -> bool {
    let b = s.as_bytes();
    !b.is_empty()
        && b.len() <= 63
        && b[0].is_ascii_alphanumeric()
        && b[b.len() - 1].is_ascii_alphanumeric()
        && b.iter()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
}

fn is_dns_subdomain(s: &str) -> bool {
    !s.is_empty() && s.len() <= 253 && s.split('.').all(is_dns_label)
}

fn is_label_value(s: &str) -> bool {
    let b = s.as_bytes();
    b.is_empty()
        || (b.len() <= 63
            && b[0].is_ascii_alphanumeric()
            && b[b.len() - 1].is_ascii_alphanumeric()
            && b.iter()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'-' | b'_' | b'.')))
}

fn is_label_key(s: &str) -> bool {
    let (prefix, name) = match s.split_once('/') {
        Some((p, n)) => (Some(p), n),
        None => (None, s),
    };
    prefix.is_none_or(is_dns_subdomain) && !name.is_empty() && is_label_value(name)
}

/// Whether kubelet may register its node with label `key` (`--node-labels`): keys outside the
/// `kubernetes.io` and `k8s.io` namespaces, `node.kubernetes.io/` and `kubelet.kubernetes.io/`
/// keys, and a few well-known ones (`pkg/kubelet/apis/well_known_labels.go` in 1.20; the same set
/// through 1.30). kubelet refuses to start with any other key in those namespaces, and the
/// NodeRestriction admission plugin refuses them too, so such labels must be set through the API.
pub fn kubelet_may_set_label(key: &str) -> bool {
    const ALLOWED: &[&str] = &[
        "kubernetes.io/hostname",
        "kubernetes.io/arch",
        "kubernetes.io/os",
        "beta.kubernetes.io/arch",
        "beta.kubernetes.io/os",
        "beta.kubernetes.io/instance-type",
        "node.kubernetes.io/instance-type",
        "topology.kubernetes.io/region",
        "topology.kubernetes.io/zone",
        "failure-domain.beta.kubernetes.io/region",
        "failure-domain.beta.kubernetes.io/zone",
    ];
    let Some((namespace, _)) = key.split_once('/') else {
        return true;
    };
    let restricted = ["kubernetes.io", "k8s.io"]
        .iter()
        .any(|d| namespace == *d || namespace.ends_with(&format!(".{d}")));
    if !restricted || ALLOWED.contains(&key) {
        return true;
    }
    ["kubelet.kubernetes.io", "node.kubernetes.io"]
        .iter()
        .any(|d| namespace == *d || namespace.ends_with(&format!(".{d}")))
}

/// A path rendered into unit command lines and configs: absolute, no characters that systemd,
/// YAML or a shell would interpret.
fn check_path(field: &str, p: &str) -> Result<(), RenderError> {
    let ok = p.starts_with('/')
        && p.len() > 1
        && !p.ends_with('/')
        && !p.split('/').any(|c| c == "..")
        && p.bytes()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'/' | b'.' | b'_' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(invalid(
            field,
            format!(
                "{p:?} is not an absolute path of letters, digits, '/', '.', '_' and '-' without a trailing '/'"
            ),
        ))
    }
}

fn check_image_ref(r: &str) -> Result<(), RenderError> {
    let ok = !r.is_empty()
        && r.len() <= 255
        && r.bytes().all(|c| {
            c.is_ascii_alphanumeric() || matches!(c, b'.' | b'/' | b':' | b'_' | b'-' | b'@')
        })
        && r.bytes().next().is_some_and(|c| c.is_ascii_alphanumeric());
    if ok {
        Ok(())
    } else {
        Err(invalid(
            "pause_image",
            format!("{r:?} is not an image reference such as localhost/clusterctl/pause:3.4.1"),
        ))
    }
}

fn validate(c: &ClusterInput) -> Result<(), RenderError> {
    if !is_dns_label(&c.cluster_name) {
        return Err(invalid(
            "cluster_name",
            format!("{:?} is not a DNS-1123 label", c.cluster_name),
        ));
    }
    if !is_dns_subdomain(&c.cluster_domain) {
        return Err(invalid(
            "cluster_domain",
            format!(
                "{:?} is not a DNS name such as cluster.local",
                c.cluster_domain
            ),
        ));
    }
    if !c.service_cidr.contains(&c.dns_service_ip) {
        return Err(invalid(
            "dns_service_ip",
            format!(
                "{} is outside the service CIDR {}",
                c.dns_service_ip, c.service_cidr
            ),
        ));
    }
    if c.service_cidr.contains(&c.pod_cidr.network())
        || c.pod_cidr.contains(&c.service_cidr.network())
    {
        return Err(invalid(
            "pod_cidr",
            format!(
                "pod CIDR {} overlaps service CIDR {}",
                c.pod_cidr, c.service_cidr
            ),
        ));
    }
    if c.api_server_port == 0 {
        return Err(invalid("api_server_port", "port 0 is not a port"));
    }
    check_image_ref(&c.pause_image)?;
    check_path("layout.bin_dir", &c.layout.bin_dir)?;
    check_path("layout.config_dir", &c.layout.config_dir)?;
    check_path("layout.pki_dir", &c.layout.pki_dir)?;
    check_path("layout.etcd_data_dir", &c.layout.etcd_data_dir)?;
    if !c.nodes.iter().any(|n| n.role == Role::ControlPlane) {
        return Err(invalid("nodes", "no control-plane node"));
    }
    let mut names = BTreeSet::new();
    let mut ips = BTreeSet::new();
    let mut indexes = BTreeSet::new();
    for (i, n) in c.nodes.iter().enumerate() {
        let f = |field: &str| format!("nodes[{i}].{field}");
        if !is_dns_subdomain(&n.name) {
            return Err(invalid(
                f("name"),
                format!("{:?} is not a DNS-1123 subdomain", n.name),
            ));
        }
        if !names.insert(n.name.as_str()) {
            return Err(invalid(
                f("name"),
                format!("node {} is listed twice", n.name),
            ));
        }
        if !ips.insert(n.ip) {
            return Err(invalid(f("ip"), format!("{} is used by two nodes", n.ip)));
        }
        if c.pod_cidr.contains(&n.ip) || c.service_cidr.contains(&n.ip) {
            return Err(invalid(
                f("ip"),
                format!("{} is inside the pod or service CIDR", n.ip),
            ));
        }
        node_pod_cidr(c.pod_cidr, n.pod_cidr_index)?;
        if !indexes.insert(n.pod_cidr_index) {
            return Err(invalid(
                f("pod_cidr_index"),
                format!("index {} is used by two nodes", n.pod_cidr_index),
            ));
        }
        for (k, v) in &n.labels {
            if !is_label_key(k) || !is_label_value(v) {
                return Err(invalid(
                    f("labels"),
                    format!("{k}={v} is not a valid Kubernetes label"),
                ));
            }
            if !kubelet_may_set_label(k) {
                return Err(invalid(
                    f("labels"),
                    format!(
                        "kubelet may not set label {k}: the kubernetes.io and k8s.io namespaces are reserved; \
                         use node.kubernetes.io/ or your own prefix, or set it through the API"
                    ),
                ));
            }
        }
        for t in &n.taints {
            if !is_label_key(&t.key) || !t.value.as_deref().is_none_or(is_label_value) {
                return Err(invalid(
                    f("taints"),
                    format!("{} is not a valid taint key and value", taint_string(t)),
                ));
            }
        }
    }
    Ok(())
}

fn taint_string(t: &Taint) -> String {
    match &t.value {
        Some(v) => format!("{}={}:{}", t.key, v, t.effect),
        None => format!("{}:{}", t.key, t.effect),
    }
}

// ---- rendering -----------------------------------------------------------------------------

/// A systemd unit's content, for the unit template.
#[derive(Serialize)]
struct UnitCtx<'a> {
    version: &'a str,
    description: String,
    documentation: &'a str,
    after: Vec<&'a str>,
    wants: Vec<&'a str>,
    before: Vec<&'a str>,
    /// Steps run once in order (ExecStartPre), then `exec` keeps them applied.
    reconciler: bool,
    exec: String,
    flags: Vec<String>,
    commands: Vec<String>,
}

struct Renderer<'a> {
    tera: tera::Tera,
    version: &'a str,
}

impl<'a> Renderer<'a> {
    fn new(version: &'a str) -> Result<Self, RenderError> {
        let mut tera = tera::Tera::default();
        // Nothing here is HTML; values are quoted explicitly with `q` where the format needs it.
        tera.autoescape_on(Vec::<&str>::new());
        // A JSON string literal: also a valid YAML double-quoted scalar and TOML basic string.
        tera.register_filter("q", |s: &str, _: tera::Kwargs, _: &tera::State| -> String {
            serde_json::Value::String(s.to_owned()).to_string()
        });
        for (name, src) in [
            ("unit.service", UNIT),
            ("kubelet-config.yaml", KUBELET_CONFIG),
            ("kube-proxy-config.yaml", KUBE_PROXY_CONFIG),
            ("containerd.toml", CONTAINERD),
            ("cni.conflist", CNI),
            ("sysctl.conf", SYSCTL),
            ("modules-load.conf", MODULES),
            ("audit-policy.yaml", AUDIT_POLICY),
            ("coredns.yaml", COREDNS),
        ] {
            tera.add_raw_template(name, src)
                .map_err(|e| template_error(name, &e))?;
        }
        Ok(Self { tera, version })
    }

    fn render(&self, name: &str, ctx: &impl Serialize) -> Result<String, RenderError> {
        let ctx = tera::Context::from_serialize(ctx).map_err(|e| template_error(name, &e))?;
        self.tera
            .render(name, &ctx)
            .map_err(|e| template_error(name, &e))
    }

    fn config(&self, name: &str, pairs: &[(&str, &str)]) -> Result<String, RenderError> {
        let mut map: BTreeMap<&str, &str> = pairs.iter().copied().collect();
        map.insert("version", self.version);
        self.render(name, &map)
    }

    fn unit(&self, ctx: &UnitCtx<'_>) -> Result<String, RenderError> {
        self.render("unit.service", ctx)
    }
}

fn flag(name: &str, value: impl fmt::Display) -> String {
    format!("--{name}={value}")
}

/// What the cluster DNS add-on is rendered from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClusterDnsInput {
    /// Kubernetes version of the cluster (picks the CoreDNS release).
    pub version: String,
    /// The kube-dns Service's address: every kubelet's `clusterDNS`.
    pub cluster_dns: Ipv4Addr,
    /// The cluster domain (`cluster.local`).
    pub cluster_domain: String,
    /// The image to run; `None`: the version's upstream image ([`VersionProfile::coredns_image`]).
    pub image: Option<String>,
    /// Replicas (spread over nodes where it can).
    pub replicas: u32,
}

/// Label every object of a clusterctl add-on carries (so it can be found and pruned).
pub const ADDON_LABEL: &str = "clusterctl.io/addon";

/// Renders cluster DNS: CoreDNS (ServiceAccount, RBAC, Corefile, Deployment) and the Service
/// `kube-system/kube-dns` at `cluster_dns`, as one multi-document YAML stream to apply.
pub fn render_cluster_dns(input: &ClusterDnsInput) -> Result<String, RenderError> {
    let profile = check_version(&input.version)?;
    if input.replicas == 0 {
        return Err(RenderError::Invalid {
            field: "replicas".into(),
            reason: "cluster DNS needs at least 1 replica".into(),
        });
    }
    // The domain goes into the Corefile unquoted: a DNS name only.
    let d = &input.cluster_domain;
    if d.is_empty()
        || d.starts_with(['.', '-'])
        || !d
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'.' || b == b'-')
    {
        return Err(RenderError::Invalid {
            field: "cluster_domain".into(),
            reason: format!("{d:?} is not a DNS name (lowercase letters, digits, '.', '-')"),
        });
    }
    let r = Renderer::new(&input.version)?;
    let labels = format!("{{{ADDON_LABEL}: coredns}}");
    let ctx = serde_json::json!({
        "version": profile.coredns_version,
        "image": input.image.as_deref().unwrap_or(profile.coredns_image),
        "cluster_dns": input.cluster_dns.to_string(),
        "cluster_domain": input.cluster_domain,
        "replicas": input.replicas,
        "control_plane_taint": profile.control_plane_taint_key,
        "labels": labels,
        "service_labels": format!(
            "{{{ADDON_LABEL}: coredns, k8s-app: kube-dns, kubernetes.io/cluster-service: \"true\", kubernetes.io/name: CoreDNS}}"
        ),
    });
    r.render("coredns.yaml", &ctx)
}

/// Renders every file of node `node_name`; see the module documentation.
pub fn render_node(cluster: &ClusterInput, node_name: &str) -> Result<NodeFiles, RenderError> {
    let profile = check_version(&cluster.kubernetes_version)?;
    validate(cluster)?;
    let node = cluster
        .nodes
        .iter()
        .find(|n| n.name == node_name)
        .ok_or_else(|| {
            invalid(
                "node_name",
                format!("{node_name} is not a node of the cluster"),
            )
        })?;
    let version = cluster.kubernetes_version.as_str();
    let r = Renderer::new(version)?;
    let layout = &cluster.layout;
    let bin = |b: &str| format!("{}/{b}", layout.bin_dir);
    let conf = |f: &str| format!("{}/{f}", layout.config_dir);
    let pki = |f: &str| format!("{}/{f}", layout.pki_dir);
    let control_planes: Vec<&NodeInput> = cluster
        .nodes
        .iter()
        .filter(|n| n.role == Role::ControlPlane)
        .collect();
    let local_api = format!("https://127.0.0.1:{}", cluster.api_server_port);
    let remote_api = {
        let host = cluster
            .api_server_host
            .unwrap_or_else(|| IpAddr::V4(control_planes[0].ip));
        match host {
            IpAddr::V4(a) => format!("https://{a}:{}", cluster.api_server_port),
            IpAddr::V6(a) => format!("https://[{a}]:{}", cluster.api_server_port),
        }
    };
    let node_api = if node.role == Role::ControlPlane {
        &local_api
    } else {
        &remote_api
    };

    let mut files = Vec::new();
    let mut external: Vec<ExternalFile> = Vec::new();
    let mut need_pki = |rel: &str| {
        let path = pki(rel);
        if !external.iter().any(|e| e.path == path) {
            external.push(ExternalFile {
                path: path.clone(),
                source: Source::Pki(rel.to_owned()),
            });
        }
        path
    };
    let mut kubeconfigs: Vec<ExternalFile> = Vec::new();
    let mut need_kubeconfig = |file: &str, cert: String, server: &str| {
        let path = conf(file);
        kubeconfigs.push(ExternalFile {
            path: path.clone(),
            source: Source::Kubeconfig {
                cert,
                server: server.to_owned(),
            },
        });
        path
    };
    let unit_path = |name: &str| format!("/etc/systemd/system/{name}");
    let docs = "https://kubernetes.io/docs/reference/command-line-tools-reference/";
    let base_unit = |description: String| UnitCtx {
        version,
        description,
        documentation: docs,
        after: vec!["network.target"],
        wants: Vec::new(),
        before: Vec::new(),
        reconciler: false,
        exec: String::new(),
        flags: Vec::new(),
        commands: Vec::new(),
    };
    let mut units: Vec<String> = vec![
        "systemd-modules-load.service".to_owned(),
        "systemd-sysctl.service".to_owned(),
        "containerd.service".to_owned(),
        "clusterctl-pod-network.service".to_owned(),
    ];

    // -- kernel, containerd, CNI -------------------------------------------------------------
    files.push(File {
        path: "/etc/modules-load.d/clusterctl-kubernetes.conf".to_owned(),
        mode: 0o644,
        contents: r.config("modules-load.conf", &[])?,
    });
    files.push(File {
        path: "/etc/sysctl.d/90-clusterctl-kubernetes.conf".to_owned(),
        mode: 0o644,
        contents: r.config("sysctl.conf", &[])?,
    });
    files.push(File {
        path: "/etc/containerd/config.toml".to_owned(),
        mode: 0o644,
        contents: r.config(
            "containerd.toml",
            &[
                ("pause_image", &cluster.pause_image),
                ("cni_bin_dir", CNI_BIN_DIR),
                ("cni_conf_dir", CNI_CONF_DIR),
            ],
        )?,
    });
    let own_pods = node_pod_cidr(cluster.pod_cidr, node.pod_cidr_index)?;
    let gateway = Ipv4Addr::from(u32::from(own_pods.network()) + 1).to_string();
    files.push(File {
        path: format!("{CNI_CONF_DIR}/10-clusterctl.conflist"),
        mode: 0o644,
        contents: r.config(
            "cni.conflist",
            &[("pod_cidr", &own_pods.to_string()), ("gateway", &gateway)],
        )?,
    });

    // -- pod network: routes to every other node's pods, masquerade for the rest -------------
    // Each step is a shell snippet: run once, in order, before kubelet starts (ExecStartPre: a
    // step that fails, e.g. before DHCP gave the node its address, fails the unit, which is
    // started again), then again every 15 s for the life of the node (ExecStart). The routes are
    // not networkd's own, and something on the node (systemd-networkd dropping routes it did not
    // configure when it reconfigures a link is the usual suspect) removed the service route from
    // a control-plane node minutes after it was set, in a CI run: re-applying them is what
    // route-programming daemons (flannel's host-gw, kube-proxy's resync) do as well. A route
    // found gone is logged to the unit's journal.
    let ip = "/usr/sbin/ip";
    let mut steps = Vec::new();
    let mut destinations = Vec::new();
    for other in cluster.nodes.iter().filter(|n| n.name != node.name) {
        let cidr = node_pod_cidr(cluster.pod_cidr, other.pod_cidr_index)?;
        steps.push(format!("{ip} route replace {cidr} via {}", other.ip));
        destinations.push(cidr.to_string());
    }
    // Service IPs from the node itself. kube-proxy rewrites a connection to a Service IP in the
    // nat OUTPUT chain, but the kernel routes a locally made packet before that chain runs: with
    // no route covering the service CIDR (an isolated machine network has no default route) the
    // connect fails with "network is unreachable" before kube-proxy's rules are reached. So the
    // API server could not call an admission or conversion webhook through its Service, and no
    // process on a node could use a ClusterIP. Route the service CIDR out of the interface that
    // holds the node's address, from that address; after the DNAT the packet is routed again to
    // the backing pod (pod routes above). The interface name is looked up on the node: the image
    // does not promise one. (`$$` is systemd's escape for `$`.)
    let (node_ip, svc) = (node.ip, cluster.service_cidr);
    steps.push(format!(
        "dev=$$({ip} -o -4 addr show to {node_ip}/32 | /usr/bin/cut -d\" \" -f2) && [ -n \"$$dev\" ] && {ip} route replace {svc} dev \"$$dev\" src {node_ip}"
    ));
    destinations.push(svc.to_string());
    // Pods reach each other with their own addresses (the Kubernetes network model: no NAT
    // between pods); traffic leaving the pod network is masqueraded behind the node's address.
    let rule = format!(
        "POSTROUTING -s {own_pods} ! -d {} -m comment --comment clusterctl-pod-egress -j MASQUERADE",
        cluster.pod_cidr
    );
    steps.push(format!(
        "/usr/sbin/iptables -w -t nat -C {rule} 2>/dev/null || /usr/sbin/iptables -w -t nat -A {rule}"
    ));
    // Plain commands run as they are; the others through the shell.
    let commands: Vec<String> = steps
        .iter()
        .map(|s| {
            if s.contains(['$', '|', '&', '>']) {
                format!("/bin/sh -c '{s}'")
            } else {
                s.clone()
            }
        })
        .collect();
    let watch = format!(
        "/bin/sh -c 'while sleep 15; do for r in {}; do {ip} route show $$r | /bin/grep -q . || echo \"route $$r was gone: restoring it\"; done; {}; done'",
        destinations.join(" "),
        steps.join("; ")
    );
    let mut net = base_unit(format!(
        "Pod network of node {}: routes to other nodes' pods and to Service IPs (clusterctl)",
        node.name
    ));
    net.documentation = "https://kubernetes.io/docs/concepts/cluster-administration/networking/";
    net.after = vec!["network.target", "systemd-networkd.service"];
    net.before = vec!["kubelet.service"];
    net.reconciler = true;
    net.commands = commands;
    net.exec = watch;
    files.push(File {
        path: unit_path("clusterctl-pod-network.service"),
        mode: 0o644,
        contents: r.unit(&net)?,
    });

    // -- control plane -----------------------------------------------------------------------
    if node.role == Role::ControlPlane {
        let initial_cluster = control_planes
            .iter()
            .map(|n| format!("{}=https://{}:{ETCD_PEER_PORT}", n.name, n.ip))
            .collect::<Vec<_>>()
            .join(",");
        let etcd_servers = control_planes
            .iter()
            .map(|n| format!("https://{}:{ETCD_CLIENT_PORT}", n.ip))
            .collect::<Vec<_>>()
            .join(",");
        let etcd_ca = need_pki("etcd/ca.crt");
        let mut etcd =
            base_unit("etcd key-value store of the Kubernetes cluster (clusterctl)".into());
        etcd.documentation = "https://etcd.io/docs/v3.4/op-guide/configuration/";
        etcd.exec = bin("etcd");
        let state = match cluster.etcd_cluster_state {
            EtcdClusterState::New => "new",
            EtcdClusterState::Existing => "existing",
        };
        etcd.flags = vec![
            flag("name", &node.name),
            flag("data-dir", &layout.etcd_data_dir),
            flag(
                "listen-client-urls",
                format!(
                    "https://127.0.0.1:{ETCD_CLIENT_PORT},https://{}:{ETCD_CLIENT_PORT}",
                    node.ip
                ),
            ),
            flag(
                "advertise-client-urls",
                format!("https://{}:{ETCD_CLIENT_PORT}", node.ip),
            ),
            flag(
                "listen-peer-urls",
                format!("https://{}:{ETCD_PEER_PORT}", node.ip),
            ),
            flag(
                "initial-advertise-peer-urls",
                format!("https://{}:{ETCD_PEER_PORT}", node.ip),
            ),
            flag("initial-cluster", initial_cluster),
            flag("initial-cluster-state", state),
            flag("initial-cluster-token", &cluster.cluster_name),
            flag("client-cert-auth", "true"),
            flag("trusted-ca-file", &etcd_ca),
            flag(
                "cert-file",
                need_pki(&format!("etcd/server-{}.crt", node.name)),
            ),
            flag(
                "key-file",
                need_pki(&format!("etcd/server-{}.key", node.name)),
            ),
            flag("peer-client-cert-auth", "true"),
            flag("peer-trusted-ca-file", &etcd_ca),
            flag(
                "peer-cert-file",
                need_pki(&format!("etcd/peer-{}.crt", node.name)),
            ),
            flag(
                "peer-key-file",
                need_pki(&format!("etcd/peer-{}.key", node.name)),
            ),
            flag("snapshot-count", 10000),
        ];
        files.push(File {
            path: unit_path("etcd.service"),
            mode: 0o644,
            contents: r.unit(&etcd)?,
        });

        let ca = need_pki("ca.crt");
        let front_proxy_ca = need_pki("front-proxy-ca.crt");
        let issuer = format!("https://kubernetes.default.svc.{}", cluster.cluster_domain);
        let mut api = base_unit("Kubernetes API server (clusterctl)".into());
        api.after = vec!["network.target", "etcd.service"];
        api.wants = vec!["etcd.service"];
        api.exec = bin("kube-apiserver");
        api.flags = vec![
            flag("advertise-address", node.ip),
            flag("secure-port", cluster.api_server_port),
            flag("allow-privileged", "true"),
            flag("authorization-mode", "Node,RBAC"),
            flag("enable-admission-plugins", "NodeRestriction"),
            flag("client-ca-file", &ca),
            flag("tls-cert-file", need_pki("apiserver.crt")),
            flag("tls-private-key-file", need_pki("apiserver.key")),
            flag("etcd-servers", etcd_servers),
            flag("etcd-cafile", &etcd_ca),
            flag("etcd-certfile", need_pki("apiserver-etcd-client.crt")),
            flag("etcd-keyfile", need_pki("apiserver-etcd-client.key")),
            flag(
                "kubelet-client-certificate",
                need_pki("apiserver-kubelet-client.crt"),
            ),
            flag(
                "kubelet-client-key",
                need_pki("apiserver-kubelet-client.key"),
            ),
            // Kubelet serving certificates are issued by the cluster CA with the node's address
            // in them, and the node names do not resolve on an isolated network.
            flag("kubelet-certificate-authority", &ca),
            flag("kubelet-preferred-address-types", "InternalIP"),
            flag("service-cluster-ip-range", cluster.service_cidr),
            flag("service-account-issuer", &issuer),
            flag("service-account-key-file", need_pki("sa.pub")),
            flag("service-account-signing-key-file", need_pki("sa.key")),
            flag("api-audiences", &issuer),
            flag("requestheader-client-ca-file", &front_proxy_ca),
            flag("requestheader-allowed-names", "front-proxy-client"),
            flag("requestheader-extra-headers-prefix", "X-Remote-Extra-"),
            flag("requestheader-group-headers", "X-Remote-Group"),
            flag("requestheader-username-headers", "X-Remote-User"),
            flag("proxy-client-cert-file", need_pki("front-proxy-client.crt")),
            flag("proxy-client-key-file", need_pki("front-proxy-client.key")),
            flag("audit-policy-file", conf("audit-policy.yaml")),
            flag("audit-log-path", audit_log_path(layout)),
            flag("audit-log-maxsize", 20),
            flag("audit-log-maxbackup", 3),
        ];
        if profile.disable_priority_and_fairness {
            api.flags
                .push(flag("enable-priority-and-fairness", "false"));
        }
        files.push(File {
            path: conf("audit-policy.yaml"),
            mode: 0o644,
            contents: r.config("audit-policy.yaml", &[])?,
        });
        files.push(File {
            path: unit_path("kube-apiserver.service"),
            mode: 0o644,
            contents: r.unit(&api)?,
        });

        let cm_kubeconfig = need_kubeconfig(
            "controller-manager.conf",
            "controller-manager".into(),
            &local_api,
        );
        let mut cm = base_unit("Kubernetes controller manager (clusterctl)".into());
        cm.after = vec!["network.target", "kube-apiserver.service"];
        cm.exec = bin("kube-controller-manager");
        cm.flags = vec![
            flag("kubeconfig", &cm_kubeconfig),
            flag("authentication-kubeconfig", &cm_kubeconfig),
            flag("authorization-kubeconfig", &cm_kubeconfig),
            flag("bind-address", "127.0.0.1"),
            flag("cluster-name", &cluster.cluster_name),
            flag("client-ca-file", &ca),
            flag("requestheader-client-ca-file", &front_proxy_ca),
            flag("root-ca-file", &ca),
            flag("service-account-private-key-file", need_pki("sa.key")),
            flag("service-cluster-ip-range", cluster.service_cidr),
            flag("use-service-account-credentials", "true"),
            // clusterctl assigns each node's pod range itself (module documentation).
            flag("allocate-node-cidrs", "false"),
        ];
        cm.flags.extend(leader_election_flags(control_planes.len()));
        if cluster.controller_manager_signs {
            cm.flags.push(flag("cluster-signing-cert-file", &ca));
            cm.flags
                .push(flag("cluster-signing-key-file", need_pki("ca.key")));
        }
        if profile.insecure_port_flag {
            cm.flags.push(flag("port", 0));
        }
        files.push(File {
            path: unit_path("kube-controller-manager.service"),
            mode: 0o644,
            contents: r.unit(&cm)?,
        });

        let sched_kubeconfig = need_kubeconfig("scheduler.conf", "scheduler".into(), &local_api);
        let mut sched = base_unit("Kubernetes scheduler (clusterctl)".into());
        sched.after = vec!["network.target", "kube-apiserver.service"];
        sched.exec = bin("kube-scheduler");
        sched.flags = vec![
            flag("kubeconfig", &sched_kubeconfig),
            flag("authentication-kubeconfig", &sched_kubeconfig),
            flag("authorization-kubeconfig", &sched_kubeconfig),
            flag("bind-address", "127.0.0.1"),
        ];
        sched
            .flags
            .extend(leader_election_flags(control_planes.len()));
        if profile.insecure_port_flag {
            sched.flags.push(flag("port", 0));
        }
        files.push(File {
            path: unit_path("kube-scheduler.service"),
            mode: 0o644,
            contents: r.unit(&sched)?,
        });
        units.extend(
            [
                "etcd.service",
                "kube-apiserver.service",
                "kube-controller-manager.service",
                "kube-scheduler.service",
            ]
            .map(str::to_owned),
        );
    }

    // -- kubelet -------------------------------------------------------------------------------
    let kubelet_config_path = conf("kubelet-config.yaml");
    files.push(File {
        path: kubelet_config_path.clone(),
        mode: 0o644,
        contents: r.config(
            "kubelet-config.yaml",
            &[
                ("api", profile.kubelet_config_api),
                ("client_ca", &need_pki("ca.crt")),
                ("cluster_dns", &cluster.dns_service_ip.to_string()),
                ("cluster_domain", &cluster.cluster_domain),
                (
                    "tls_cert",
                    &need_pki(&format!("kubelet/{}-serving.crt", node.name)),
                ),
                (
                    "tls_key",
                    &need_pki(&format!("kubelet/{}-serving.key", node.name)),
                ),
            ],
        )?,
    });
    let kubelet_kubeconfig = need_kubeconfig(
        "kubelet.conf",
        format!("kubelet/{}-client", node.name),
        node_api,
    );
    let mut kubelet = base_unit(format!(
        "Kubernetes node agent of {} (clusterctl)",
        node.name
    ));
    kubelet.after = vec![
        "network.target",
        "containerd.service",
        "clusterctl-pod-network.service",
    ];
    kubelet.wants = vec!["containerd.service", "clusterctl-pod-network.service"];
    kubelet.exec = bin("kubelet");
    kubelet.flags = vec![
        flag("config", &kubelet_config_path),
        flag("kubeconfig", &kubelet_kubeconfig),
        flag("hostname-override", &node.name),
        flag("node-ip", node.ip),
    ];
    if profile.kubelet_container_runtime_flag {
        kubelet.flags.push(flag("container-runtime", "remote"));
    }
    kubelet
        .flags
        .push(flag("container-runtime-endpoint", CONTAINERD_ENDPOINT));
    if profile.kubelet_pod_infra_image_flag {
        kubelet
            .flags
            .push(flag("pod-infra-container-image", &cluster.pause_image));
    }
    if !node.labels.is_empty() {
        let labels = node
            .labels
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join(",");
        kubelet.flags.push(flag("node-labels", labels));
    }
    if !node.taints.is_empty() {
        let taints = node
            .taints
            .iter()
            .map(taint_string)
            .collect::<Vec<_>>()
            .join(",");
        kubelet.flags.push(flag("register-with-taints", taints));
    }
    files.push(File {
        path: unit_path("kubelet.service"),
        mode: 0o644,
        contents: r.unit(&kubelet)?,
    });

    // -- kube-proxy ----------------------------------------------------------------------------
    let proxy_kubeconfig = need_kubeconfig("kube-proxy.conf", "kube-proxy".into(), node_api);
    let proxy_config_path = conf("kube-proxy-config.yaml");
    files.push(File {
        path: proxy_config_path.clone(),
        mode: 0o644,
        contents: r.config(
            "kube-proxy-config.yaml",
            &[
                ("api", profile.kube_proxy_config_api),
                ("kubeconfig", &proxy_kubeconfig),
                ("node_name", &node.name),
                ("cluster_cidr", &cluster.pod_cidr.to_string()),
            ],
        )?,
    });
    let mut proxy = base_unit(format!(
        "Kubernetes network proxy of {} (clusterctl)",
        node.name
    ));
    proxy.exec = bin("kube-proxy");
    proxy.flags = vec![flag("config", &proxy_config_path)];
    files.push(File {
        path: unit_path("kube-proxy.service"),
        mode: 0o644,
        contents: r.unit(&proxy)?,
    });
    units.extend(["kubelet.service", "kube-proxy.service"].map(str::to_owned));

    external.extend(kubeconfigs);
    Ok(NodeFiles {
        files,
        units,
        external,
    })
}

#[cfg(test)]
mod tests;
