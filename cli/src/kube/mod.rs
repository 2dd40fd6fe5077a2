//! The Kubernetes API client: kube-rs over the cluster's pinned SSH connection.
//!
//! - [`KubeClient`] talks to the API server of a cluster as its admin. Every HTTP connection is
//!   an SSH `direct-tcpip` channel on one SSH connection to a control-plane machine (through
//!   its jump host, if any; host key pinned like every other connection), to the API server
//!   address as that machine sees it (`127.0.0.1:6443` on the control plane itself). TLS runs
//!   end to end on top: the server certificate is verified against the cluster CA from the
//!   state for the name [`API_SERVER_NAME`], and the client presents the admin certificate.
//!   So clusterctl needs no route to the API server and runs no kubectl.
//! - [`ServerVersion`] and [`PolicyApi`]: the server's version decides which `policy` API
//!   version (v1beta1 or v1) serves evictions and PodDisruptionBudgets.
//! - [`readiness`]: waits until `/readyz` answers and nodes are Ready, with a deadline and a
//!   [`Clock`](readiness::Clock) so the decisions are tested with a fixed clock.
//! - [`KubeError`] with [`KubeError::disposition`]: one policy for every error: retry
//!   (connection refused while the API server starts, 5xx), wait (429) or fail (401/403,
//!   certificate mismatch, host key mismatch).
//! - [`drain`]: the drain simulation, a pure function of the listed pods, PodDisruptionBudgets
//!   (small serde types: k8s-openapi no longer has `policy/v1beta1`) and replica counts.
//!
//! Nothing here prints: progress goes to a callback, diagnostics to `tracing`.

pub mod access;
pub mod addons;
pub mod drain;
pub mod drainer;
mod error;
pub mod readiness;
mod tunnel;
mod version;

use std::collections::BTreeSet;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use hyper_util::rt::TokioExecutor;
use k8s_openapi::api::core::v1::Node;
use kube::api::{Api, ListParams};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use zeroize::Zeroizing;

pub use error::{Disposition, KubeError, disposition_of_status};
pub use readiness::{Clock, TokioClock, WaitPolicy};
pub use tunnel::{TunnelError, TunnelFailure};
pub use version::{PolicyApi, ServerVersion};

use crate::ssh::{Endpoint, SshClient, Target};
use tunnel::Tunnel;

/// The name the client expects in the API server's certificate. Every API server certificate
/// clusterctl issues carries it (`pki::plan`: `kubernetes`, `kubernetes.default`, ...,
/// `localhost`, `127.0.0.1`, the node names and addresses), whatever address the tunnel uses.
pub const API_SERVER_NAME: &str = "kubernetes";

/// The API server's port on a control-plane machine.
pub const API_SERVER_PORT: u16 = 6443;

/// How long one API request may take before it counts as failed (and is retried by waits).
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// The cluster admin's TLS credential: the cluster CA, the admin client certificate and key.
pub struct Credentials {
    ca_pem: Vec<u8>,
    cert_pem: Vec<u8>,
    key_pem: Zeroizing<Vec<u8>>,
    source: PathBuf,
}

impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Credentials")
            .field("source", &self.source)
            .finish_non_exhaustive()
    }
}

impl Credentials {
    /// Reads `ca.crt`, `admin.crt` and `admin.key` from a cluster's PKI directory (the state's
    /// `pki/`, as `pki::Pki::ensure` writes it).
    pub fn from_pki_dir(dir: &Path) -> Result<Credentials, KubeError> {
        let read = |name: &str| {
            let path = dir.join(name);
            std::fs::read(&path).map_err(|source| KubeError::CredentialFile { path, source })
        };
        Ok(Credentials {
            ca_pem: read("ca.crt")?,
            cert_pem: read("admin.crt")?,
            key_pem: Zeroizing::new(read("admin.key")?),
            source: dir.to_path_buf(),
        })
    }

    /// A credential from PEM texts; `source` names where they came from (for messages).
    pub fn from_pem(ca: &str, cert: &str, key: &str, source: impl Into<PathBuf>) -> Credentials {
        Credentials {
            ca_pem: ca.as_bytes().to_vec(),
            cert_pem: cert.as_bytes().to_vec(),
            key_pem: Zeroizing::new(key.as_bytes().to_vec()),
            source: source.into(),
        }
    }

    fn tls_config(&self) -> Result<rustls::ClientConfig, KubeError> {
        let bad = |file: &str, detail: String| KubeError::BadCredential {
            path: self.source.join(file),
            detail,
        };
        let mut roots = rustls::RootCertStore::empty();
        for cert in CertificateDer::pem_slice_iter(&self.ca_pem) {
            let cert = cert.map_err(|e| bad("ca.crt", format!("not a PEM certificate: {e}")))?;
            roots
                .add(cert)
                .map_err(|e| bad("ca.crt", format!("not a usable CA certificate: {e}")))?;
        }
        if roots.is_empty() {
            return Err(bad("ca.crt", "holds no certificate".into()));
        }
        let chain = CertificateDer::pem_slice_iter(&self.cert_pem)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| bad("admin.crt", format!("not a PEM certificate: {e}")))?;
        if chain.is_empty() {
            return Err(bad("admin.crt", "holds no certificate".into()));
        }
        let key = PrivateKeyDer::from_pem_slice(&self.key_pem)
            .map_err(|e| bad("admin.key", format!("not a PEM private key: {e}")))?;
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let mut config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| bad("admin.key", format!("TLS setup: {e}")))?
            .with_root_certificates(roots)
            .with_client_auth_cert(chain, key)
            .map_err(|e| bad("admin.key", format!("does not fit admin.crt: {e}")))?;
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(config)
    }
}

/// A node as the API lists it: what readiness waits, drain and repair decisions look at.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct NodeState {
    /// Node name.
    pub name: String,
    /// Whether its `Ready` condition is `True`.
    pub ready: bool,
    /// The kubelet's version (`status.nodeInfo.kubeletVersion`), empty if not reported.
    pub kubelet_version: String,
    /// Whether it is cordoned (`spec.unschedulable`).
    pub unschedulable: bool,
    /// The kubelet's boot ID (`status.nodeInfo.bootID`): changes exactly when the machine boots.
    pub boot_id: String,
    /// The conditions repair decisions read (times as the API server recorded them).
    pub conditions: NodeConditions,
    /// The node pool clusterctl registered it in (its [`POOL_LABEL`]); `None` for control
    /// planes and for nodes clusterctl did not make.
    pub pool: Option<String>,
}

/// The label kubelet registers a worker with: the name of its node pool in the cluster spec.
pub const POOL_LABEL: &str = "clusterctl.io/node-pool";

/// The node conditions auto-repair looks at, with their times.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct NodeConditions {
    /// `Ready`'s status as written: `True`, `False`, `Unknown` (the kubelet stopped posting and
    /// the node controller marked it), or empty when the node has no `Ready` condition yet.
    pub ready_status: String,
    /// When `Ready` last changed status.
    pub ready_since: Option<crate::state::Timestamp>,
    /// Since when `DiskPressure` has been `True`; `None` when it is not.
    pub disk_pressure_since: Option<crate::state::Timestamp>,
}

fn to_timestamp(
    t: &k8s_openapi::apimachinery::pkg::apis::meta::v1::Time,
) -> Option<crate::state::Timestamp> {
    chrono::DateTime::from_timestamp(t.0.as_second(), t.0.subsec_nanosecond().max(0) as u32)
        .map(crate::state::Timestamp)
}

impl NodeConditions {
    fn from_status(status: Option<&k8s_openapi::api::core::v1::NodeStatus>) -> Self {
        let conditions = status.and_then(|s| s.conditions.as_deref()).unwrap_or(&[]);
        let ready = conditions.iter().find(|c| c.type_ == "Ready");
        let pressure = conditions
            .iter()
            .find(|c| c.type_ == "DiskPressure" && c.status == "True");
        NodeConditions {
            ready_status: ready.map(|c| c.status.clone()).unwrap_or_default(),
            ready_since: ready
                .and_then(|c| c.last_transition_time.as_ref())
                .and_then(to_timestamp),
            disk_pressure_since: pressure
                .and_then(|c| c.last_transition_time.as_ref())
                .and_then(to_timestamp),
        }
    }
}

impl From<&Node> for NodeState {
    fn from(node: &Node) -> Self {
        let status = node.status.as_ref();
        NodeState {
            name: node.metadata.name.clone().unwrap_or_default(),
            ready: status
                .and_then(|s| s.conditions.as_ref())
                .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True")),
            kubelet_version: status
                .and_then(|s| s.node_info.as_ref())
                .map(|i| i.kubelet_version.clone())
                .unwrap_or_default(),
            unschedulable: node
                .spec
                .as_ref()
                .and_then(|s| s.unschedulable)
                .unwrap_or(false),
            boot_id: status
                .and_then(|s| s.node_info.as_ref())
                .map(|i| i.boot_id.clone())
                .unwrap_or_default(),
            conditions: NodeConditions::from_status(status),
            pool: node
                .metadata
                .labels
                .as_ref()
                .and_then(|l| l.get(POOL_LABEL))
                .cloned(),
        }
    }
}

/// A client for one cluster's API server, reached through SSH. Cheap to clone; clones share
/// the SSH connection and the pool of HTTP connections.
#[derive(Clone)]
pub struct KubeClient {
    client: kube::Client,
    tunnel: Tunnel,
}

impl fmt::Debug for KubeClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KubeClient")
            .field("via", self.tunnel.via())
            .field("api", self.tunnel.api())
            .finish_non_exhaustive()
    }
}

impl KubeClient {
    /// A client that reaches the API server at `api` (as `via` sees it, e.g.
    /// `127.0.0.1:6443` on a control-plane machine) through SSH to `via` with `ssh` (which
    /// trusts the pinned host keys). Nothing is connected yet: the SSH connection is made by the
    /// first request and made again if it is lost. Must be called inside a tokio runtime.
    pub fn new(
        ssh: SshClient,
        via: Target,
        api: Endpoint,
        credentials: &Credentials,
    ) -> Result<KubeClient, KubeError> {
        let tls = Arc::new(credentials.tls_config()?);
        let server_name =
            ServerName::try_from(API_SERVER_NAME).map_err(|e| KubeError::BadCredential {
                path: credentials.source.clone(),
                detail: format!("server name {API_SERVER_NAME:?}: {e}"),
            })?;
        let tunnel = Tunnel::new(ssh, via, api, tls, server_name);
        let http = hyper_util::client::legacy::Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(60))
            .pool_max_idle_per_host(4)
            .build::<_, kube::client::Body>(tunnel.clone());
        // The host is only a label (the tunnel ignores it); TLS checks API_SERVER_NAME.
        let base = http::Uri::from_static("https://kubernetes");
        let service = tower::ServiceBuilder::new()
            .layer(kube::client::middleware::BaseUriLayer::new(base))
            .service(http);
        Ok(KubeClient {
            client: kube::Client::new(service, "default"),
            tunnel,
        })
    }

    /// The kube-rs client, for typed `Api<K>` calls (its errors convert with
    /// [`KubeClient::error`]).
    pub fn client(&self) -> kube::Client {
        self.client.clone()
    }

    /// Converts a kube-rs error from a call made for `op` through [`KubeClient::client`].
    pub fn error(op: &str, error: kube::Error) -> KubeError {
        KubeError::from_kube(op, error)
    }

    /// SSH channels opened so far: one per HTTP connection the client made.
    pub fn channels_opened(&self) -> u64 {
        self.tunnel.channels_opened()
    }

    /// SSH connections made so far (1, unless one was lost and made again).
    pub fn ssh_connections(&self) -> u64 {
        self.tunnel.ssh_connections()
    }

    /// Closes the SSH connection.
    pub async fn close(&self) {
        self.tunnel.close().await;
    }

    /// Runs one kube-rs request (e.g. an `Api<K>` call on [`KubeClient::client`]) for `op`
    /// with [`REQUEST_TIMEOUT`] (a timeout is a 408, retried by waits), converting its error.
    pub async fn call<T>(
        &self,
        op: &str,
        request: impl Future<Output = Result<T, kube::Error>>,
    ) -> Result<T, KubeError> {
        match tokio::time::timeout(REQUEST_TIMEOUT, request).await {
            Ok(result) => result.map_err(|e| KubeError::from_kube(op, e)),
            Err(_) => Err(KubeError::Api {
                op: op.to_owned(),
                code: 408,
                reason: "Timeout".into(),
                message: format!(
                    "no answer within {} s (clusterctl's request timeout)",
                    REQUEST_TIMEOUT.as_secs()
                ),
                retry_after: None,
            }),
        }
    }

    /// [`KubeClient::call`] under the error policy: a request whose error says retry or wait
    /// (a timeout, 429, 5xx, a broken connection: an API server short of CPU or restarting) is
    /// made again, 2 s, 4 s, ... at most 15 s apart, until `budget` is spent; then, or on an
    /// error that says fail, the last error is returned. `request` makes the request afresh.
    pub async fn call_retrying<T, F, Fut>(
        &self,
        op: &str,
        budget: Duration,
        mut request: F,
    ) -> Result<T, KubeError>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, kube::Error>>,
    {
        let deadline = tokio::time::Instant::now() + budget;
        let mut pause = Duration::from_secs(2);
        loop {
            match self.call(op, request()).await {
                Ok(v) => return Ok(v),
                Err(e) => {
                    let again = matches!(
                        e.disposition(),
                        error::Disposition::Retry | error::Disposition::Wait
                    );
                    if !again || tokio::time::Instant::now() + pause > deadline {
                        return Err(e);
                    }
                    tracing::info!(op, error = %e, "retrying after {} s", pause.as_secs());
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(Duration::from_secs(15));
                }
            }
        }
    }

    /// The server's version (`/version`).
    pub async fn server_version(&self) -> Result<ServerVersion, KubeError> {
        let info = self
            .call("reading /version", self.client.apiserver_version())
            .await?;
        ServerVersion::parse(&info.major, &info.minor, &info.git_version)
    }

    /// `Ok` if `/readyz` answers `ok`.
    pub async fn readyz(&self) -> Result<(), KubeError> {
        self.ready_check("/readyz", "reading /readyz").await
    }

    /// The API server's own check of its etcd (`/readyz/etcd`): etcd answers the API server.
    pub async fn etcd_ready(&self) -> Result<(), KubeError> {
        self.ready_check("/readyz/etcd", "reading /readyz/etcd (etcd's health)")
            .await
    }

    async fn ready_check(&self, path: &str, op: &str) -> Result<(), KubeError> {
        let request =
            http::Request::get(path)
                .body(Vec::new())
                .map_err(|e| KubeError::Unexpected {
                    op: op.into(),
                    detail: e.to_string(),
                })?;
        let text = self.call(op, self.client.request_text(request)).await?;
        if text.trim() == "ok" {
            Ok(())
        } else {
            Err(KubeError::Api {
                op: op.into(),
                code: 503,
                reason: "NotReady".into(),
                message: text.trim().chars().take(500).collect(),
                retry_after: None,
            })
        }
    }

    /// Every node, as [`NodeState`]s.
    pub async fn list_nodes(&self) -> Result<Vec<NodeState>, KubeError> {
        let nodes: Api<Node> = Api::all(self.client.clone());
        let list = self
            .call("listing nodes", nodes.list(&ListParams::default()))
            .await?;
        Ok(list.items.iter().map(NodeState::from).collect())
    }

    /// Waits until `/readyz` answers ok and every node in `wanted` is Ready; returns the wanted
    /// nodes. Transient errors are retried until `policy.timeout`; permanent ones (credential
    /// refused, certificate or host key mismatch) end the wait at once.
    pub async fn wait_for_nodes_ready(
        &self,
        wanted: &BTreeSet<String>,
        policy: &WaitPolicy,
        clock: &dyn Clock,
        progress: &mut (dyn FnMut(&str) + Send),
    ) -> Result<Vec<NodeState>, KubeError> {
        readiness::wait_until_ready(
            wanted,
            policy,
            clock,
            || async move {
                self.readyz().await?;
                if wanted.is_empty() {
                    return Ok(Vec::new());
                }
                self.list_nodes().await
            },
            progress,
        )
        .await
    }

    /// Waits until `/readyz` answers ok (see [`KubeClient::wait_for_nodes_ready`]).
    pub async fn wait_for_api_ready(
        &self,
        policy: &WaitPolicy,
        clock: &dyn Clock,
        progress: &mut (dyn FnMut(&str) + Send),
    ) -> Result<(), KubeError> {
        self.wait_for_nodes_ready(&BTreeSet::new(), policy, clock, progress)
            .await
            .map(|_| ())
    }
}

pub(crate) use crate::error::error_chain as chain;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_state_reads_readiness_version_cordon_and_pool() {
        let list: k8s_openapi::List<Node> = serde_json::from_str(
            r#"{"apiVersion":"v1","kind":"NodeList","metadata":{},"items":[
              {"metadata":{"name":"a","labels":{"x":"y"}},"spec":{"unschedulable":true},
               "status":{"conditions":[{"type":"MemoryPressure","status":"False"},{"type":"Ready","status":"True"}],
                         "nodeInfo":{"kubeletVersion":"v1.20.2","machineID":"","systemUUID":"","bootID":"",
                         "kernelVersion":"","osImage":"","containerRuntimeVersion":"","kubeProxyVersion":"",
                         "operatingSystem":"linux","architecture":"amd64"}}},
              {"metadata":{"name":"b","labels":{"clusterctl.io/node-pool":"workers"}},"status":{"conditions":[{"type":"Ready","status":"Unknown"}]}},
              {"metadata":{"name":"c"}}
            ]}"#,
        )
        .unwrap_or_else(|e| panic!("{e}"));
        let states: Vec<NodeState> = list.items.iter().map(NodeState::from).collect();
        assert_eq!(
            states,
            vec![
                NodeState {
                    name: "a".into(),
                    ready: true,
                    kubelet_version: "v1.20.2".into(),
                    unschedulable: true,
                    boot_id: String::new(),
                    conditions: NodeConditions {
                        ready_status: "True".into(),
                        ..Default::default()
                    },
                    pool: None,
                },
                NodeState {
                    name: "b".into(),
                    ready: false,
                    kubelet_version: String::new(),
                    unschedulable: false,
                    boot_id: String::new(),
                    conditions: NodeConditions {
                        ready_status: "Unknown".into(),
                        ..Default::default()
                    },
                    pool: Some("workers".into()),
                },
                NodeState {
                    name: "c".into(),
                    ready: false,
                    kubelet_version: String::new(),
                    unschedulable: false,
                    boot_id: String::new(),
                    ..Default::default()
                },
            ]
        );
    }

    #[test]
    fn node_state_reads_condition_times_and_disk_pressure() {
        let node: Node = serde_json::from_str(
            r#"{"metadata":{"name":"w"},"status":{"conditions":[
                {"type":"DiskPressure","status":"True","lastTransitionTime":"2026-12-01T10:00:00Z","lastHeartbeatTime":"2026-12-01T10:20:00Z"},
                {"type":"Ready","status":"False","lastTransitionTime":"2026-12-01T10:05:00Z","lastHeartbeatTime":"2026-12-01T10:20:30Z"}]}}"#,
        )
        .unwrap_or_else(|e| panic!("{e}"));
        let c = NodeState::from(&node).conditions;
        let at = |s: &str| {
            Some(crate::state::Timestamp(
                chrono::DateTime::parse_from_rfc3339(s)
                    .unwrap_or_else(|e| panic!("{e}"))
                    .with_timezone(&chrono::Utc),
            ))
        };
        assert_eq!(c.ready_status, "False");
        assert_eq!(c.ready_since, at("2026-12-01T10:05:00Z"));
        assert_eq!(c.disk_pressure_since, at("2026-12-01T10:00:00Z"));
    }

    #[test]
    fn credentials_refuse_garbage_and_mismatched_keys() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let missing = Credentials::from_pki_dir(dir.path()).expect_err("no files");
        assert!(missing.to_string().contains("ca.crt"), "{missing}");
        let garbage = Credentials::from_pem("x", "y", "z", dir.path());
        let err = garbage.tls_config().expect_err("garbage");
        assert!(err.to_string().contains("ca.crt"), "{err}");
    }
}
