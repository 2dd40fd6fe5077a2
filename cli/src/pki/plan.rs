//! Which certificates a cluster needs, with their subjects, SANs and usages: a pure function of
//! the cluster's identity (names, addresses, service CIDR), in kubeadm's layout.

use std::collections::BTreeSet;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnet::IpNet;

use super::PkiError;

/// Identity of one machine, as certificates see it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeIdentity {
    /// Node name (DNS-1123), also the kubelet's node name.
    pub name: String,
    /// Addresses the node is reached at (its InternalIP first).
    pub addresses: Vec<IpAddr>,
}

/// What the PKI is made for: the cluster's names and addresses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PkiSpec {
    /// Cluster name (used in kubeconfigs).
    pub cluster_name: String,
    /// Cluster DNS domain, e.g. `cluster.local`.
    pub cluster_domain: String,
    /// Service CIDR; its first address is the `kubernetes` Service's ClusterIP.
    pub service_cidr: IpNet,
    /// Control-plane machines (etcd members and API servers).
    pub control_plane: Vec<NodeIdentity>,
    /// Worker machines (kubelet certificates only).
    pub workers: Vec<NodeIdentity>,
    /// Extra API server names or IPs (a load balancer, a public name).
    pub extra_api_server_sans: Vec<String>,
}

/// The certificate authorities of a cluster.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum CaKind {
    /// Signs API server, kubelet and client certificates (`ca.crt`).
    Cluster,
    /// Signs etcd's server, peer and client certificates (`etcd/ca.crt`).
    Etcd,
    /// Signs the aggregation layer's client certificate (`front-proxy-ca.crt`).
    FrontProxy,
}

impl CaKind {
    /// All CAs, in creation order.
    pub const ALL: [CaKind; 3] = [CaKind::Cluster, CaKind::Etcd, CaKind::FrontProxy];

    /// File stem relative to the PKI directory (`.crt` and `.key` are appended).
    pub fn stem(self) -> &'static str {
        match self {
            CaKind::Cluster => "ca",
            CaKind::Etcd => "etcd/ca",
            CaKind::FrontProxy => "front-proxy-ca",
        }
    }

    /// The CA certificate's common name (kubeadm's).
    pub fn common_name(self) -> &'static str {
        match self {
            CaKind::Cluster => "kubernetes",
            CaKind::Etcd => "etcd-ca",
            CaKind::FrontProxy => "front-proxy-ca",
        }
    }
}

/// Extended key usage of a leaf certificate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Usage {
    /// TLS server only.
    Server,
    /// TLS client only.
    Client,
    /// Both (etcd members).
    ServerAndClient,
}

/// One leaf certificate to issue.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertSpec {
    /// File stem relative to the PKI directory, e.g. `apiserver` or `kubelet/node-1-client`.
    pub stem: String,
    /// The signing CA.
    pub ca: CaKind,
    /// Subject common name (the Kubernetes user name for client certificates).
    pub common_name: String,
    /// Subject organizations (the Kubernetes groups for client certificates).
    pub organizations: Vec<String>,
    /// DNS subject alternative names, sorted and unique.
    pub dns_names: Vec<String>,
    /// IP subject alternative names, sorted and unique.
    pub ips: Vec<IpAddr>,
    /// Extended key usage.
    pub usage: Usage,
}

/// The first usable address of the service CIDR: the `kubernetes` Service's ClusterIP.
pub fn first_service_ip(cidr: &IpNet) -> Result<IpAddr, PkiError> {
    let too_small = || PkiError::InvalidSpec {
        reason: format!("service CIDR {cidr} has no usable address"),
    };
    match cidr.network() {
        IpAddr::V4(net) => {
            let ip = u32::from(net).checked_add(1).ok_or_else(too_small)?;
            let ip = IpAddr::V4(Ipv4Addr::from(ip));
            if cidr.contains(&ip) && cidr.prefix_len() < 31 {
                Ok(ip)
            } else {
                Err(too_small())
            }
        }
        IpAddr::V6(net) => {
            let ip = u128::from(net).checked_add(1).ok_or_else(too_small)?;
            let ip = IpAddr::V6(Ipv6Addr::from(ip));
            if cidr.contains(&ip) && cidr.prefix_len() < 127 {
                Ok(ip)
            } else {
                Err(too_small())
            }
        }
    }
}

/// DNS-1123 subdomain check for node names and the cluster domain; they become file names and
/// certificate names, so anything else is refused.
fn check_dns_name(what: &str, name: &str) -> Result<(), PkiError> {
    let label_ok = |l: &str| {
        !l.is_empty()
            && l.len() <= 63
            && l.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
            && !l.starts_with('-')
            && !l.ends_with('-')
    };
    if name.is_empty() || name.len() > 253 || !name.split('.').all(label_ok) {
        return Err(PkiError::InvalidSpec {
            reason: format!(
                "{what} {name:?} is not a DNS-1123 name (lowercase letters, digits, '-' and '.')"
            ),
        });
    }
    Ok(())
}

fn leaf(
    stem: String,
    ca: CaKind,
    cn: &str,
    orgs: &[&str],
    names: Vec<String>,
    usage: Usage,
) -> CertSpec {
    let mut dns = BTreeSet::new();
    let mut ips = BTreeSet::new();
    for n in names {
        match n.parse::<IpAddr>() {
            Ok(ip) => {
                ips.insert(ip);
            }
            Err(_) => {
                dns.insert(n);
            }
        }
    }
    CertSpec {
        stem,
        ca,
        common_name: cn.to_string(),
        organizations: orgs.iter().map(|o| o.to_string()).collect(),
        dns_names: dns.into_iter().collect(),
        ips: ips.into_iter().collect(),
        usage,
    }
}

/// Every leaf certificate the cluster needs, in a stable order.
pub fn plan_certificates(spec: &PkiSpec) -> Result<Vec<CertSpec>, PkiError> {
    check_dns_name("cluster domain", &spec.cluster_domain)?;
    if spec.control_plane.is_empty() {
        return Err(PkiError::InvalidSpec {
            reason: "at least one control-plane node is needed".to_string(),
        });
    }
    let mut names = BTreeSet::new();
    for node in spec.control_plane.iter().chain(&spec.workers) {
        check_dns_name("node name", &node.name)?;
        if !names.insert(node.name.as_str()) {
            return Err(PkiError::InvalidSpec {
                reason: format!("node name {} is used twice", node.name),
            });
        }
    }
    let service_ip = first_service_ip(&spec.service_cidr)?;
    let ips = |node: &NodeIdentity| {
        node.addresses
            .iter()
            .map(|a| a.to_string())
            .collect::<Vec<_>>()
    };

    let mut apiserver_names = vec![
        "kubernetes".to_string(),
        "kubernetes.default".to_string(),
        "kubernetes.default.svc".to_string(),
        format!("kubernetes.default.svc.{}", spec.cluster_domain),
        "localhost".to_string(),
        "127.0.0.1".to_string(),
        service_ip.to_string(),
    ];
    for node in &spec.control_plane {
        apiserver_names.push(node.name.clone());
        apiserver_names.extend(ips(node));
    }
    for extra in &spec.extra_api_server_sans {
        if extra.parse::<IpAddr>().is_err() {
            check_dns_name("extra API server name", extra)?;
        }
        apiserver_names.push(extra.clone());
    }

    use CaKind::{Cluster, Etcd, FrontProxy};
    use Usage::{Client, Server, ServerAndClient};
    let mut certs = vec![
        leaf(
            "apiserver".into(),
            Cluster,
            "kube-apiserver",
            &[],
            apiserver_names,
            Server,
        ),
        leaf(
            "apiserver-kubelet-client".into(),
            Cluster,
            "kube-apiserver-kubelet-client",
            &["system:masters"],
            vec![],
            Client,
        ),
        leaf(
            "apiserver-etcd-client".into(),
            Etcd,
            "kube-apiserver-etcd-client",
            &[],
            vec![],
            Client,
        ),
        leaf(
            "front-proxy-client".into(),
            FrontProxy,
            "front-proxy-client",
            &[],
            vec![],
            Client,
        ),
        leaf(
            "etcd/healthcheck-client".into(),
            Etcd,
            "kube-etcd-healthcheck-client",
            &[],
            vec![],
            Client,
        ),
        leaf(
            "admin".into(),
            Cluster,
            "kubernetes-admin",
            &["system:masters"],
            vec![],
            Client,
        ),
        leaf(
            "controller-manager".into(),
            Cluster,
            "system:kube-controller-manager",
            &[],
            vec![],
            Client,
        ),
        leaf(
            "scheduler".into(),
            Cluster,
            "system:kube-scheduler",
            &[],
            vec![],
            Client,
        ),
        leaf(
            "kube-proxy".into(),
            Cluster,
            "system:kube-proxy",
            &[],
            vec![],
            Client,
        ),
    ];
    for node in &spec.control_plane {
        // etcd members are reached by name and address, and by loopback for local clients.
        let mut etcd_names = vec![
            node.name.clone(),
            "localhost".into(),
            "127.0.0.1".into(),
            "::1".into(),
        ];
        etcd_names.extend(ips(node));
        certs.push(leaf(
            format!("etcd/server-{}", node.name),
            Etcd,
            &node.name,
            &[],
            etcd_names.clone(),
            ServerAndClient,
        ));
        certs.push(leaf(
            format!("etcd/peer-{}", node.name),
            Etcd,
            &node.name,
            &[],
            etcd_names,
            ServerAndClient,
        ));
    }
    for node in spec.control_plane.iter().chain(&spec.workers) {
        let user = format!("system:node:{}", node.name);
        certs.push(leaf(
            format!("kubelet/{}-client", node.name),
            Cluster,
            &user,
            &["system:nodes"],
            vec![],
            Client,
        ));
        let mut serving = vec![node.name.clone()];
        serving.extend(ips(node));
        certs.push(leaf(
            format!("kubelet/{}-serving", node.name),
            Cluster,
            &user,
            &["system:nodes"],
            serving,
            Server,
        ));
    }
    Ok(certs)
}
