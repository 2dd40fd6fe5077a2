//! Semantic checks of a parsed spec. Every check runs and all problems are returned, each at
//! the field path it concerns; the caller turns paths into lines and columns.

use std::collections::{BTreeMap, HashMap, HashSet};

use ipnet::IpNet;

use super::locate::{join_index, join_key};
use super::types::*;
use super::values::{MaxUnhealthy, Quantity};

/// A semantic problem at a field path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Problem {
    pub path: String,
    pub message: String,
    pub hint: Option<String>,
}

/// Longest cluster name; with a pool name of at most [`MAX_POOL_NAME`] and a node index,
/// machine names `CLUSTER-POOL-NNNNN` stay within a 63-character host name.
pub const MAX_CLUSTER_NAME: usize = 30;
/// Longest node pool name.
pub const MAX_POOL_NAME: usize = 24;
/// Smallest control plane machine: kubeadm's preflight minimum of 2 CPUs and 1700 MiB.
pub const MIN_CONTROL_PLANE_CPUS: u32 = 2;
/// See [`MIN_CONTROL_PLANE_CPUS`].
pub const MIN_CONTROL_PLANE_MEMORY: Quantity = Quantity::from_bytes(1700 << 20);
/// Smallest worker memory that runs kubelet, a container runtime and some pods.
pub const MIN_WORKER_MEMORY: Quantity = Quantity::from_bytes(1 << 30);
/// Smallest root disk that stays clear of kubelet's disk-pressure eviction.
pub const MIN_DISK: Quantity = Quantity::from_bytes(4 << 30);
/// Longest `NO_UPGRADES` exclusion (GKE's limit).
pub const MAX_NO_UPGRADES_DAYS: i64 = 30;
/// Shortest auto-repair threshold; shorter ones repair nodes that are only rebooting.
pub const MIN_UNHEALTHY_THRESHOLD_SECS: u64 = 30;

struct Checker {
    problems: Vec<Problem>,
}

impl Checker {
    fn err(
        &mut self,
        path: impl Into<String>,
        message: impl Into<String>,
        hint: impl Into<String>,
    ) {
        let hint = hint.into();
        self.problems.push(Problem {
            path: path.into(),
            message: message.into(),
            hint: if hint.is_empty() { None } else { Some(hint) },
        });
    }

    /// A field the spec accepts but nothing in clusterctl implements yet. `what` names the
    /// feature as the subject of "is not implemented yet"; the hint says how to do without it.
    fn not_implemented(&mut self, path: impl Into<String>, what: &str, hint: impl Into<String>) {
        self.err(path, format!("{what} is {NOT_IMPLEMENTED}"), hint);
    }
}

/// The words every refusal of an unimplemented field carries, so a user (and a test) can tell
/// "not built" from "wrong".
pub const NOT_IMPLEMENTED: &str = "not implemented yet";

/// Runs every semantic check on `c`.
pub(crate) fn validate(c: &Cluster) -> Vec<Problem> {
    let mut ck = Checker {
        problems: Vec::new(),
    };
    check_metadata(&mut ck, &c.metadata);
    let spec = &c.spec;
    check_provider(&mut ck, &spec.provider);
    check_kubernetes(&mut ck, spec);
    check_networks(&mut ck, spec);
    check_control_plane(&mut ck, &spec.control_plane);
    check_node_pools(&mut ck, spec);
    check_node_image(&mut ck, &spec.node_image);
    check_ssh(&mut ck, &spec.ssh);
    check_maintenance(&mut ck, &spec.maintenance_policy);
    check_auto_repair(&mut ck, &spec.auto_repair);
    check_access(&mut ck, &spec.access);
    ck.problems
}

// Fields that nothing implements are refused where they are checked below (each with
// `Checker::not_implemented`), so a spec never asks for something `create` would silently
// skip: `provider.gce`, `provider.libvirt.network.mode` other than isolated, IPv6 networks,
// `controlPlane.count` above 1, `nodePools[].autoscaling`, `nodePools[].upgradeSettings`
// and `ssh.bastion`. Their other checks still run, so every problem is reported at once.

// ---- name syntax -------------------------------------------------------------------------

/// A DNS-1123 label: at most 63 lowercase letters, digits and '-', starting and ending with a
/// letter or digit.
pub fn is_dns1123_label(s: &str) -> bool {
    providers::is_dns1123_label(s)
}

/// A DNS-1123 subdomain: dot-separated DNS-1123 labels, at most 253 characters.
pub fn is_dns1123_subdomain(s: &str) -> bool {
    !s.is_empty() && s.len() <= 253 && s.split('.').all(is_dns1123_label)
}

/// The name part of a Kubernetes qualified name or a label value: at most 63 characters,
/// alphanumerics, '-', '_' and '.', starting and ending with an alphanumeric.
fn is_qualified_name_part(s: &str) -> bool {
    let b = s.as_bytes();
    !b.is_empty()
        && b.len() <= 63
        && b.iter()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'-' | b'_' | b'.'))
        && b[0].is_ascii_alphanumeric()
        && b[b.len() - 1].is_ascii_alphanumeric()
}

/// Why `key` is not a valid Kubernetes label key, if it is not.
pub fn label_key_problem(key: &str) -> Option<String> {
    let (prefix, name) = match key.split_once('/') {
        Some((p, n)) => (Some(p), n),
        None => (None, key),
    };
    if let Some(p) = prefix
        && !is_dns1123_subdomain(p)
    {
        return Some(format!(
            "invalid label key {key:?}: the prefix {p:?} must be a DNS-1123 subdomain such as example.com"
        ));
    }
    if !is_qualified_name_part(name) {
        return Some(format!(
            "invalid label key {key:?}: the name must be 1-63 characters of letters, digits, '-', '_' and '.', starting and ending with a letter or digit"
        ));
    }
    None
}

/// Why `value` is not a valid Kubernetes label value, if it is not.
pub fn label_value_problem(value: &str) -> Option<String> {
    if value.is_empty() || is_qualified_name_part(value) {
        return None;
    }
    Some(format!(
        "invalid label value {value:?}: must be at most 63 characters of letters, digits, '-', '_' and '.', starting and ending with a letter or digit"
    ))
}

fn check_labels(ck: &mut Checker, path: &str, labels: &BTreeMap<String, String>) {
    for (k, v) in labels {
        let p = join_key(path, k);
        if let Some(m) = label_key_problem(k) {
            ck.err(&p, m, "use a key such as example.com/tier or tier");
        }
        if let Some(m) = label_value_problem(v) {
            ck.err(&p, m, "use a value such as web or v1.2");
        }
    }
}

fn plural(n: u64, word: &str) -> String {
    if n == 1 {
        format!("{n} {word}")
    } else {
        format!("{n} {word}s")
    }
}

fn dns_label_hint(example: &str) -> String {
    format!("use lowercase letters, digits and '-', such as {example}")
}

// ---- metadata ----------------------------------------------------------------------------

fn check_metadata(ck: &mut Checker, m: &Metadata) {
    let p = "metadata.name";
    if !is_dns1123_label(&m.name) {
        ck.err(
            p,
            format!("invalid cluster name {:?}: must be a DNS-1123 label (lowercase letters, digits and '-', starting and ending with a letter or digit)", m.name),
            dns_label_hint("dev-cluster"),
        );
    } else if m.name.len() > MAX_CLUSTER_NAME {
        ck.err(
            p,
            format!(
                "cluster name {:?} is {} characters long; at most {MAX_CLUSTER_NAME} are allowed",
                m.name,
                m.name.len()
            ),
            "shorten the name: it prefixes every machine's host name",
        );
    }
    check_labels(ck, "metadata.labels", &m.labels);
}

// ---- provider ----------------------------------------------------------------------------

fn check_provider(ck: &mut Checker, p: &Provider) {
    match p {
        Provider::Libvirt(l) => check_libvirt(ck, l),
        Provider::Gce(g) => {
            ck.not_implemented(
                "spec.provider.gce",
                "the gce provider",
                "use provider: {libvirt: {}} (machines on a libvirt host)",
            );
            check_gce(ck, g);
        }
        Provider::Fake(f) => {
            if f.directory.as_os_str().is_empty() {
                ck.err(
                    "spec.provider.fake.directory",
                    "the fake provider's directory is empty",
                    "set a directory for its state file",
                );
            }
        }
    }
}

/// Why `uri` is not a usable libvirt QEMU connection URI, if it is not.
pub fn libvirt_uri_problem(uri: &str) -> Option<String> {
    let bad = |why: &str| Some(format!("invalid libvirt uri {uri:?}: {why}"));
    let Some((scheme, rest)) = uri.split_once("://") else {
        return bad("missing \"://\"");
    };
    let transport = match scheme.split_once('+') {
        None if scheme == "qemu" => None,
        Some(("qemu", t)) => Some(t),
        _ => return bad("only the qemu driver is supported (qemu:// or qemu+TRANSPORT://)"),
    };
    if let Some(t) = transport
        && !["ssh", "libssh", "libssh2", "tcp", "tls", "unix", "ext"].contains(&t)
    {
        return bad(&format!(
            "unknown transport {t:?} (use ssh, libssh, libssh2, tcp, tls or unix)"
        ));
    }
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, ""),
    };
    let path = path.split('?').next().unwrap_or("");
    if path != "/system" && path != "/session" {
        return bad("the path must be /system or /session");
    }
    let host = authority.rsplit('@').next().unwrap_or("");
    let remote = matches!(
        transport,
        Some("ssh" | "libssh" | "libssh2" | "tcp" | "tls")
    );
    if remote && host.is_empty() {
        return bad("a remote transport needs a host, such as qemu+ssh://user@host/system");
    }
    if transport == Some("unix") && !host.is_empty() {
        return bad("the unix transport takes no host");
    }
    None
}

fn check_libvirt(ck: &mut Checker, l: &LibvirtProvider) {
    let base = "spec.provider.libvirt";
    if let Some(m) = libvirt_uri_problem(&l.uri) {
        ck.err(
            format!("{base}.uri"),
            m,
            "use qemu:///system for this host or qemu+ssh://user@host/system for another",
        );
    }
    let net = format!("{base}.network");
    if l.network.mode != NetworkMode::Isolated {
        ck.not_implemented(
            format!("{net}.mode"),
            &format!("network mode {}", network_mode_name(l.network.mode)),
            "use mode: isolated (the default), the only mode the libvirt provider builds",
        );
    }
    match (l.network.mode, &l.network.bridge) {
        (NetworkMode::Bridge, None) => ck.err(
            format!("{net}.mode"),
            "network mode bridge needs the name of an existing host bridge",
            "add network.bridge, such as bridge: br0",
        ),
        (NetworkMode::Bridge, Some(b)) => {
            let ok = !b.is_empty()
                && b.len() <= 15
                && b.bytes()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'-' | b'_' | b'.'));
            if !ok {
                ck.err(
                    format!("{net}.bridge"),
                    format!(
                        "invalid bridge name {b:?}: at most 15 letters, digits, '-', '_' or '.'"
                    ),
                    "use the name of an existing host bridge such as br0",
                );
            }
        }
        (mode, Some(_)) => ck.err(
            format!("{net}.bridge"),
            format!(
                "bridge is only used with mode bridge, not {}",
                network_mode_name(mode)
            ),
            "remove bridge or set mode: bridge",
        ),
        (_, None) => {}
    }
    if !l.storage_dir.is_absolute() {
        ck.err(
            format!("{base}.storageDir"),
            format!(
                "storage directory {:?} is not an absolute path",
                l.storage_dir.display().to_string()
            ),
            "use an absolute path on the libvirt host, such as /var/lib/clusterctl/storage",
        );
    }
}

fn network_mode_name(mode: NetworkMode) -> &'static str {
    match mode {
        NetworkMode::Isolated => "isolated",
        NetworkMode::Nat => "nat",
        NetworkMode::Bridge => "bridge",
    }
}

fn check_gce(ck: &mut Checker, g: &GceProvider) {
    let base = "spec.provider.gce";
    let b = g.project.as_bytes();
    let project_ok = (6..=30).contains(&b.len())
        && b[0].is_ascii_lowercase()
        && b.iter()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
        && b[b.len() - 1] != b'-';
    if !project_ok {
        ck.err(
            format!("{base}.project"),
            format!("invalid project ID {:?}: 6-30 lowercase letters, digits or '-', starting with a letter", g.project),
            "use the project ID (not its display name or number), such as my-project-123",
        );
    }
    let parts: Vec<&str> = g.zone.split('-').collect();
    let zone_ok = parts.len() == 3
        && !parts[0].is_empty()
        && parts[0].bytes().all(|c| c.is_ascii_lowercase())
        && parts[1].bytes().any(|c| c.is_ascii_digit())
        && parts[1]
            .bytes()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit())
        && parts[1]
            .as_bytes()
            .first()
            .is_some_and(u8::is_ascii_lowercase)
        && parts[2].len() == 1
        && parts[2].bytes().all(|c| c.is_ascii_lowercase());
    if !zone_ok {
        ck.err(
            format!("{base}.zone"),
            format!(
                "invalid zone {:?}: expected REGION-ZONE such as europe-west1-b",
                g.zone
            ),
            "use a zone, not a region: add the zone letter",
        );
    }
    if !is_dns1123_label(&g.network) {
        ck.err(
            format!("{base}.network"),
            format!("invalid network name {:?}", g.network),
            dns_label_hint("default"),
        );
    }
    if let GceCredentials::File(f) = &g.credentials
        && f.as_os_str().is_empty()
    {
        ck.err(
            format!("{base}.credentials.file"),
            "the credentials file path is empty",
            "set the path of a service account key file or use credentials: applicationDefault",
        );
    }
}

// ---- kubernetes and networks -------------------------------------------------------------

fn check_kubernetes(ck: &mut Checker, spec: &ClusterSpec) {
    let k = &spec.kubernetes;
    let base = "spec.kubernetes";
    match (&k.version, &k.channel) {
        (Some(_), Some(_)) => ck.err(
            format!("{base}.channel"),
            "version and channel are both set; they are exclusive",
            "keep version to pin an exact release, or channel to follow a release channel",
        ),
        (None, None) => ck.err(
            base,
            "neither version nor channel is set",
            "set version: \"1.30.2\" or channel: stable",
        ),
        _ => {}
    }
    if let Some(v) = &k.version
        && v.major != 1
    {
        ck.err(
            format!("{base}.version"),
            format!("unsupported kubernetes version {v}: only 1.x exists"),
            "use a version such as \"1.30.2\"",
        );
    }
    if spec.auto_upgrade.soak.as_secs() > 90 * 86_400 {
        ck.err(
            "spec.autoUpgrade.soak",
            format!(
                "a soak of {} would hold security fixes for months",
                spec.auto_upgrade.soak
            ),
            "use at most 90d (24h, the default, is GKE's soak between patch upgrades)",
        );
    }
    if let ArtifactSource::Bundle(b) = &k.artifacts
        && b.path.as_os_str().is_empty()
    {
        ck.err(
            format!("{base}.artifacts.bundle.path"),
            "the bundle path is empty",
            "set the path of an artifact bundle made for air-gapped use",
        );
    }
    if !is_dns1123_subdomain(&k.cluster_domain) {
        ck.err(
            format!("{base}.clusterDomain"),
            format!(
                "invalid cluster domain {:?}: must be a DNS-1123 subdomain",
                k.cluster_domain
            ),
            "use a domain such as cluster.local",
        );
    }
}

/// Largest number of machines the cluster may have at once: the control plane, each pool at its
/// maximum size, plus every pool's upgrade surge.
pub fn max_machines(spec: &ClusterSpec) -> u64 {
    let pools: u64 = spec
        .node_pools
        .iter()
        .map(|p| {
            let top = p.autoscaling.map_or(p.count, |a| a.max_count.max(p.count));
            u64::from(top) + u64::from(p.upgrade_settings.map_or(0, |u| u.max_surge))
        })
        .sum();
    u64::from(spec.control_plane.count) + pools
}

fn check_cidr(ck: &mut Checker, path: &str, what: &str, net: &IpNet) -> bool {
    if let IpNet::V6(_) = net {
        // The bootstrap renders IPv4 node networking only; refuse before any machine exists.
        ck.not_implemented(
            path,
            &format!("an IPv6 {what} ({net})"),
            "use an IPv4 range",
        );
    }
    if net.trunc() != *net {
        ck.err(
            path,
            format!("{what} {net} has host bits set"),
            format!("use the network address, {}", net.trunc()),
        );
        return false;
    }
    true
}

fn check_networks(ck: &mut Checker, spec: &ClusterSpec) {
    let k = &spec.kubernetes;
    let pod_path = "spec.kubernetes.podCIDR";
    let svc_path = "spec.kubernetes.serviceCIDR";
    let machine_path = "spec.provider.libvirt.network.cidr";
    let mut nets: Vec<(&str, &str, IpNet)> = Vec::new();
    if check_cidr(ck, pod_path, "podCIDR", &k.pod_cidr) {
        nets.push((pod_path, "podCIDR", k.pod_cidr));
    }
    if check_cidr(ck, svc_path, "serviceCIDR", &k.service_cidr) {
        nets.push((svc_path, "serviceCIDR", k.service_cidr));
    }
    let machines = max_machines(spec);
    if let Provider::Libvirt(l) = &spec.provider {
        let cidr = l.network.cidr;
        if check_cidr(ck, machine_path, "machine network", &cidr) {
            nets.push((machine_path, "machine network", cidr));
            if let IpNet::V4(v4) = cidr {
                // Network address, broadcast and the host's gateway address are not for machines.
                let room = (1u64 << (32 - u32::from(v4.prefix_len()))).saturating_sub(3);
                if room < machines {
                    ck.err(
                        machine_path,
                        format!("machine network {cidr} has room for {} but the cluster may need {machines} (control plane, pools at maximum size, upgrade surge)", plural(room, "machine")),
                        "use a larger network such as a /24",
                    );
                }
            }
        }
    }
    if matches!(k.pod_cidr, IpNet::V4(_)) != matches!(k.service_cidr, IpNet::V4(_)) {
        ck.err(
            pod_path,
            "podCIDR and serviceCIDR are of different IP families",
            "use IPv4 for both or IPv6 for both",
        );
    }
    match k.service_cidr {
        IpNet::V4(n) if n.prefix_len() < 12 => ck.err(
            svc_path,
            format!(
                "serviceCIDR {} is too large: kube-apiserver allows at most a /12",
                k.service_cidr
            ),
            "use a /12 or smaller, such as 10.96.0.0/12",
        ),
        IpNet::V6(n) if n.prefix_len() < 108 => ck.err(
            svc_path,
            format!(
                "serviceCIDR {} is too large: kube-apiserver allows at most a /108 for IPv6",
                k.service_cidr
            ),
            "use a /108 or smaller",
        ),
        _ => {}
    }
    // Each node gets a /24 (IPv4) or /64 (IPv6) of the pod network.
    let (node_bits, prefix) = match k.pod_cidr {
        IpNet::V4(n) => (24u8, n.prefix_len()),
        IpNet::V6(n) => (64u8, n.prefix_len()),
    };
    if prefix > node_bits {
        ck.err(
            pod_path,
            format!(
                "podCIDR {} is smaller than the /{node_bits} each node gets",
                k.pod_cidr
            ),
            format!(
                "use a /{} or larger, such as 10.244.0.0/16",
                node_bits.saturating_sub(8)
            ),
        );
    } else {
        let subnets = 1u64
            .checked_shl(u32::from(node_bits - prefix))
            .unwrap_or(u64::MAX);
        if subnets < machines {
            ck.err(
                pod_path,
                format!("podCIDR {} has room for {subnets} nodes (a /{node_bits} each) but the cluster may have {machines}", k.pod_cidr),
                "use a larger pod network such as a /16",
            );
        }
    }
    for i in 0..nets.len() {
        for j in i + 1..nets.len() {
            let (_, a_name, a) = nets[i];
            let (b_path, b_name, b) = nets[j];
            if a.contains(&b.network()) || b.contains(&a.network()) {
                ck.err(
                    b_path,
                    format!("{b_name} {b} overlaps {a_name} {a}"),
                    format!("choose non-overlapping ranges for {a_name} and {b_name}"),
                );
            }
        }
    }
}

// ---- machines ----------------------------------------------------------------------------

fn check_machine(
    ck: &mut Checker,
    path: &str,
    m: &MachineSize,
    min_cpus: u32,
    min_memory: Quantity,
    what: &str,
) {
    if m.cpus < min_cpus {
        ck.err(
            format!("{path}.cpus"),
            format!(
                "{what} need at least {}, got {}",
                plural(u64::from(min_cpus), "cpu"),
                m.cpus
            ),
            format!("set cpus: {min_cpus} or more"),
        );
    }
    if m.memory < min_memory {
        ck.err(
            format!("{path}.memory"),
            format!("{what} need at least {min_memory} memory, got {}", m.memory),
            format!("set memory: {min_memory} or more"),
        );
    }
    if m.disk < MIN_DISK {
        ck.err(
            format!("{path}.disk"),
            format!("{what} need at least {MIN_DISK} disk, got {}", m.disk),
            format!("set disk: {MIN_DISK} or more"),
        );
    }
}

fn check_control_plane(ck: &mut Checker, cp: &ControlPlane) {
    let path = "spec.controlPlane.count";
    if ![1, 3, 5].contains(&cp.count) {
        ck.err(
            path,
            format!("control plane count must be 1, 3 or 5, got {}", cp.count),
            "use 1: more control planes (3 or 5, an etcd quorum that survives failures) are not implemented yet",
        );
    } else if cp.count > 1 {
        // The machines and etcd members could be made, but workers, kubeconfigs and clusterctl
        // reach the API server at the first control plane's address: no failover.
        ck.not_implemented(
            path,
            &format!(
                "a highly available control plane ({} machines)",
                cp.count
            ),
            "use count: 1; the API server address is one machine, so more control planes would not survive its failure",
        );
    }
    check_machine(
        ck,
        "spec.controlPlane.machine",
        &cp.machine,
        MIN_CONTROL_PLANE_CPUS,
        MIN_CONTROL_PLANE_MEMORY,
        "control plane machines",
    );
}

fn check_node_pools(ck: &mut Checker, spec: &ClusterSpec) {
    if spec.node_pools.is_empty() && !spec.control_plane.schedulable {
        ck.err(
            "spec.nodePools",
            "the cluster has no node pools, so workloads have nowhere to run",
            "add a node pool, or set controlPlane.schedulable: true to run workloads on the control plane",
        );
    }
    let mut seen = HashSet::new();
    for (i, pool) in spec.node_pools.iter().enumerate() {
        let base = join_index("spec.nodePools", i);
        let name_path = format!("{base}.name");
        if !is_dns1123_label(&pool.name) {
            ck.err(
                &name_path,
                format!(
                    "invalid node pool name {:?}: must be a DNS-1123 label",
                    pool.name
                ),
                dns_label_hint("workers"),
            );
        } else if pool.name.len() > MAX_POOL_NAME {
            ck.err(&name_path, format!("node pool name {:?} is {} characters long; at most {MAX_POOL_NAME} are allowed", pool.name, pool.name.len()), "shorten the name: it is part of every node's host name");
        }
        if !seen.insert(pool.name.as_str()) {
            ck.err(
                &name_path,
                format!("duplicate node pool name {:?}", pool.name),
                "give every node pool a unique name",
            );
        }
        check_machine(
            ck,
            &format!("{base}.machine"),
            &pool.machine,
            1,
            MIN_WORKER_MEMORY,
            "worker machines",
        );
        check_labels(ck, &format!("{base}.labels"), &pool.labels);
        for k in pool.labels.keys() {
            if label_key_problem(k).is_none() && !templates::kubernetes::kubelet_may_set_label(k) {
                ck.err(
                    join_key(&format!("{base}.labels"), k),
                    format!("label {k} cannot be set by a node: the kubernetes.io and k8s.io namespaces are reserved"),
                    "use node.kubernetes.io/NAME or a prefix of your own, such as example.com/role",
                );
            }
        }
        let mut taints = HashSet::new();
        for (j, t) in pool.taints.iter().enumerate() {
            let tp = join_index(&format!("{base}.taints"), j);
            if let Some(m) = label_key_problem(&t.key) {
                ck.err(
                    format!("{tp}.key"),
                    m.replace("label key", "taint key"),
                    "use a key such as dedicated or example.com/gpu",
                );
            }
            if let Some(v) = &t.value
                && let Some(m) = label_value_problem(v)
            {
                ck.err(
                    format!("{tp}.value"),
                    m.replace("label value", "taint value"),
                    "use a value such as gpu",
                );
            }
            if !taints.insert((t.key.as_str(), t.effect)) {
                ck.err(
                    format!("{tp}.key"),
                    format!("duplicate taint {}:{}", t.key, t.effect.as_str()),
                    "keep one taint per key and effect",
                );
            }
        }
        if let Some(a) = pool.autoscaling {
            let ap = format!("{base}.autoscaling");
            ck.not_implemented(
                &ap,
                "node pool autoscaling",
                "remove autoscaling: the pool keeps count nodes",
            );
            if a.max_count == 0 {
                ck.err(
                    format!("{ap}.maxCount"),
                    "maxCount must be at least 1",
                    "set maxCount to the largest pool size you allow",
                );
            }
            if a.min_count > a.max_count {
                ck.err(
                    format!("{ap}.minCount"),
                    format!(
                        "minCount {} is greater than maxCount {}",
                        a.min_count, a.max_count
                    ),
                    "make minCount <= count <= maxCount",
                );
            } else if pool.count < a.min_count || pool.count > a.max_count {
                ck.err(
                    format!("{base}.count"),
                    format!(
                        "count {} is outside the autoscaling range {}..={}",
                        pool.count, a.min_count, a.max_count
                    ),
                    "make minCount <= count <= maxCount",
                );
            }
        }
        if let Some(u) = pool.upgrade_settings {
            // Built: surge (maxSurge >= 1, maxUnavailable 0) and in place one at a time
            // (maxSurge 0, maxUnavailable 1, the default without upgradeSettings).
            if u.max_unavailable > 1 || (u.max_unavailable > 0 && u.max_surge > 0) {
                ck.not_implemented(
                    format!("{base}.upgradeSettings.maxUnavailable"),
                    &format!(
                        "maxUnavailable {} with maxSurge {} (upgrades take nodes down one at a time in place, or replace them by surge with maxUnavailable 0)",
                        u.max_unavailable, u.max_surge
                    ),
                    "use maxSurge: N with maxUnavailable: 0 (surge), or maxSurge: 0 with maxUnavailable: 1 (in place)",
                );
            }
            if u.max_surge == 0 && u.max_unavailable == 0 {
                ck.err(
                format!("{base}.upgradeSettings"),
                "maxSurge and maxUnavailable are both 0, so an upgrade could never replace a node",
                "set maxSurge: 1 (add a node first) or maxUnavailable: 1 (replace in place)",
            );
            }
        }
    }
}

fn check_node_image(ck: &mut Checker, img: &NodeImage) {
    if let Some(v) = &img.version {
        let ok = !v.is_empty()
            && v.len() <= 64
            && v.bytes()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'.' | b'-' | b'_' | b'+'));
        if !ok {
            ck.err("spec.nodeImage.version", format!("invalid node image version {v:?}"), "use letters, digits, '.', '-', '_' or '+', or remove it to use the image of this release");
        }
    }
}

// ---- ssh ---------------------------------------------------------------------------------

fn is_unix_user(u: &str) -> bool {
    let b = u.as_bytes();
    !b.is_empty()
        && b.len() <= 32
        && (b[0].is_ascii_lowercase() || b[0] == b'_')
        && b.iter()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, b'_' | b'-'))
}

fn check_ssh(ck: &mut Checker, s: &Ssh) {
    if !is_unix_user(&s.user) {
        ck.err(
            "spec.ssh.user",
            format!("invalid ssh user {:?}", s.user),
            "use a login name of lowercase letters, digits, '_' and '-', such as core",
        );
    }
    // At most one key source; none at all means a generated key (the default).
    let given: Vec<&str> = [
        (s.private_key.is_some(), "privateKey"),
        (s.agent, "agent: true"),
        (s.generated_key, "generatedKey: true"),
    ]
    .into_iter()
    .filter_map(|(set, name)| set.then_some(name))
    .collect();
    if given.len() > 1 {
        // Point at the last of the conflicting fields, the one usually added by mistake.
        let field = if s.generated_key {
            "generatedKey"
        } else {
            "agent"
        };
        let quantifier = if given.len() == 2 { "both" } else { "all" };
        ck.err(
            format!("spec.ssh.{field}"),
            format!("{} are {quantifier} set; they are exclusive", given.join(" and ")),
            "keep privateKey to use a key file, agent: true to use ssh-agent, or none of them to have clusterctl generate a key for the cluster",
        );
    }
    if let Some(k) = &s.private_key
        && k.as_os_str().is_empty()
    {
        ck.err(
            "spec.ssh.privateKey",
            "the private key path is empty",
            "set the path of a private key file such as ~/.ssh/id_ed25519, or remove privateKey to have clusterctl generate a key",
        );
    }
    if let Some(b) = &s.bastion {
        ck.not_implemented(
            "spec.ssh.bastion",
            "connecting through a bastion",
            "remove bastion: clusterctl connects to the machines directly",
        );
        let ok = !b.host.is_empty()
            && !b
                .host
                .chars()
                .any(|c| c.is_whitespace() || c == '/' || c == '@');
        if !ok {
            ck.err(
                "spec.ssh.bastion.host",
                format!("invalid bastion host {:?}", b.host),
                "use a host name or address; put the user in bastion.user",
            );
        }
        if b.port == 0 {
            ck.err(
                "spec.ssh.bastion.port",
                "bastion port 0 is not a valid port",
                "use the bastion's ssh port, usually 22",
            );
        }
        if let Some(u) = &b.user
            && !is_unix_user(u)
        {
            ck.err(
                "spec.ssh.bastion.user",
                format!("invalid bastion user {u:?}"),
                "use a login name of lowercase letters, digits, '_' and '-'",
            );
        }
    }
}

// ---- maintenance, repair, access ---------------------------------------------------------

fn check_maintenance(ck: &mut Checker, m: &MaintenancePolicy) {
    let base = "spec.maintenancePolicy";
    if let Some(w) = &m.window {
        let wp = format!("{base}.window");
        match (&w.duration, &w.end_time) {
            (Some(_), Some(_)) => ck.err(
                format!("{wp}.endTime"),
                "duration and endTime are both set; they are exclusive",
                "keep one of duration or endTime",
            ),
            (None, None) => ck.err(
                &wp,
                "the window has neither duration nor endTime",
                "add duration, such as duration: 4h",
            ),
            (Some(d), None) if d.as_secs() == 0 => ck.err(
                format!("{wp}.duration"),
                "the window duration is 0",
                "use a duration such as 4h",
            ),
            (None, Some(end)) if *end <= w.start_time => ck.err(
                format!("{wp}.endTime"),
                format!("endTime {end} is not after startTime {}", w.start_time),
                "set endTime after startTime",
            ),
            _ => {
                if let Some(len) = w.length() {
                    let period = w.recurrence.shortest_gap_secs();
                    if len.as_secs() > period {
                        let field = if w.duration.is_some() {
                            "duration"
                        } else {
                            "endTime"
                        };
                        ck.err(
                            format!("{wp}.{field}"),
                            format!("the window lasts {len}, longer than the {} between occurrences of {}", super::values::Duration::from_secs(period), w.recurrence),
                            "shorten the window or space out the recurrence",
                        );
                    }
                }
            }
        }
    }
    let mut names = HashSet::new();
    for (i, e) in m.exclusions.iter().enumerate() {
        let ep = join_index(&format!("{base}.exclusions"), i);
        if e.name.trim().is_empty() {
            ck.err(
                format!("{ep}.name"),
                "the exclusion name is empty",
                "name the exclusion, such as black-friday",
            );
        } else if !names.insert(e.name.as_str()) {
            ck.err(
                format!("{ep}.name"),
                format!("duplicate exclusion name {:?}", e.name),
                "give every exclusion a unique name",
            );
        }
        if e.end_time <= e.start_time {
            ck.err(
                format!("{ep}.endTime"),
                format!(
                    "endTime {} is not after startTime {}",
                    e.end_time, e.start_time
                ),
                "set endTime after startTime",
            );
        } else if e.scope == ExclusionScope::NoUpgrades
            && e.end_time.unix_seconds() - e.start_time.unix_seconds()
                > MAX_NO_UPGRADES_DAYS * 86_400
        {
            ck.err(
                format!("{ep}.endTime"),
                format!("a NO_UPGRADES exclusion may last at most {MAX_NO_UPGRADES_DAYS} days"),
                "shorten it, or use scope NO_MINOR_UPGRADES or NO_MINOR_OR_NODE_UPGRADES for longer periods",
            );
        }
    }
}

fn check_auto_repair(ck: &mut Checker, r: &AutoRepair) {
    let base = "spec.autoRepair";
    if r.unhealthy_threshold.as_secs() < MIN_UNHEALTHY_THRESHOLD_SECS {
        ck.err(
            format!("{base}.unhealthyThreshold"),
            format!("unhealthyThreshold {} is shorter than {MIN_UNHEALTHY_THRESHOLD_SECS}s, so rebooting nodes would be repaired", r.unhealthy_threshold),
            "use 5m or more",
        );
    }
    let zero = matches!(
        r.max_unhealthy,
        MaxUnhealthy::Count(0) | MaxUnhealthy::Percent(0)
    );
    if r.enabled && zero {
        ck.err(
            format!("{base}.maxUnhealthy"),
            format!("maxUnhealthy {} stops every repair", r.max_unhealthy),
            "allow at least one node (such as 1 or \"40%\"), or set autoRepair.enabled: false",
        );
    }
}

fn check_access(ck: &mut Checker, a: &Access) {
    // (member, role, namespace or "" for the whole cluster) -> where it was first granted.
    let mut granted: HashMap<(&str, Role, &str), String> = HashMap::new();
    for (i, b) in a.bindings.iter().enumerate() {
        let bp = join_index("spec.access.bindings", i);
        if b.members.is_empty() {
            ck.err(
                format!("{bp}.members"),
                "the binding has no members",
                "add members such as user:alice@example.com or group:ops",
            );
        }
        let mut seen_ns = HashSet::new();
        for (k, ns) in b.namespaces.iter().enumerate() {
            let np = join_index(&format!("{bp}.namespaces"), k);
            if !is_dns1123_label(ns) {
                ck.err(
                    &np,
                    format!("invalid namespace {ns:?}"),
                    "write a Kubernetes namespace name: lowercase letters, digits and '-', at most 63 characters",
                );
            }
            if !seen_ns.insert(ns.as_str()) {
                ck.err(
                    &np,
                    format!("duplicate namespace {ns:?}"),
                    "list each namespace once",
                );
            }
        }
        let scopes: Vec<&str> = if b.namespaces.is_empty() {
            vec![""]
        } else {
            // Each namespace once (a repeated one is reported above).
            let mut once = HashSet::new();
            b.namespaces
                .iter()
                .map(String::as_str)
                .filter(|ns| once.insert(*ns))
                .collect()
        };
        let mut seen = HashSet::new();
        for (j, m) in b.members.iter().enumerate() {
            let mp = join_index(&format!("{bp}.members"), j);
            if let Some((problem, hint)) = member_problem(m) {
                ck.err(&mp, problem, hint);
            }
            if !seen.insert(m.as_str()) {
                ck.err(
                    &mp,
                    format!("duplicate member {m:?} in this binding"),
                    "list each member once",
                );
                continue;
            }
            for scope in &scopes {
                match granted.get(&(m.as_str(), b.role, *scope)) {
                    Some(first) => {
                        let where_ = if scope.is_empty() {
                            "on the whole cluster".to_owned()
                        } else {
                            format!("in namespace {scope:?}")
                        };
                        ck.err(
                            &mp,
                            format!(
                                "duplicate grant: {m:?} already has role {} {where_} at {first}",
                                b.role
                            ),
                            "grant each member a role once per scope",
                        );
                    }
                    None => {
                        granted.insert((m.as_str(), b.role, scope), mp.clone());
                    }
                }
            }
        }
    }
}

/// What is wrong with an access member (`user:NAME`, `group:NAME`,
/// `serviceAccount:NAMESPACE/NAME`), with a hint; `None` if it is well formed.
pub fn member_problem(m: &str) -> Option<(String, String)> {
    match parse_member(m) {
        None => Some((
            format!(
                "invalid member {m:?}: expected user:NAME, group:NAME or serviceAccount:NAMESPACE/NAME"
            ),
            "prefix the member with its kind, such as user:alice@example.com".to_owned(),
        )),
        Some((kind, name)) => {
            let ok = match kind {
                MemberKind::User | MemberKind::Group => {
                    !name.is_empty()
                        && name.len() <= 253
                        && !name.starts_with("system:")
                        && !name.chars().any(|c| c.is_whitespace() || c.is_control())
                }
                MemberKind::ServiceAccount => name
                    .split_once('/')
                    .is_some_and(|(ns, n)| is_dns1123_label(ns) && is_dns1123_subdomain(n)),
            };
            if ok {
                return None;
            }
            let expect = match kind {
                MemberKind::User => {
                    "a user name without spaces and not starting with system: (Kubernetes' own), such as user:alice@example.com"
                }
                MemberKind::Group => {
                    "a group name without spaces and not starting with system: (Kubernetes' own), such as group:ops"
                }
                MemberKind::ServiceAccount => "NAMESPACE/NAME, such as serviceAccount:ci/deployer",
            };
            Some((format!("invalid member {m:?}"), format!("write {expect}")))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dns_names() {
        assert!(is_dns1123_label("a-1"));
        assert!(!is_dns1123_label("-a"));
        assert!(!is_dns1123_label("A"));
        assert!(!is_dns1123_label(&"a".repeat(64)));
        assert!(is_dns1123_subdomain("cluster.local"));
        assert!(!is_dns1123_subdomain("cluster..local"));
    }

    #[test]
    fn label_syntax_follows_kubernetes() {
        assert_eq!(label_key_problem("example.com/tier"), None);
        assert_eq!(label_key_problem("node.kubernetes.io/My_role.1"), None);
        assert!(label_key_problem("Example.com/tier").is_some());
        assert!(label_key_problem("/tier").is_some());
        assert!(label_key_problem("tier-").is_some());
        assert_eq!(label_value_problem(""), None);
        assert!(label_value_problem(&"a".repeat(64)).is_some());
    }

    #[test]
    fn libvirt_uris() {
        assert_eq!(libvirt_uri_problem("qemu:///system"), None);
        assert_eq!(
            libvirt_uri_problem("qemu+ssh://root@host/system?keyfile=/k"),
            None
        );
        assert_eq!(libvirt_uri_problem("qemu:///session"), None);
        assert!(libvirt_uri_problem("xen:///system").is_some());
        assert!(libvirt_uri_problem("qemu+ssh:///system").is_some());
        assert!(libvirt_uri_problem("qemu:///").is_some());
        assert!(libvirt_uri_problem("/system").is_some());
    }
}
