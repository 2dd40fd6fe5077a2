//! Kubernetes bootstrap over SSH, after the machines answer SSH: certificates, files, units,
//! control plane first, then the node agents, then a wait until every node is Ready.
//!
//! Every phase is idempotent and converges: files are compared by checksum on the node and only
//! changed ones are written; a node whose files changed gets a persistent restart marker
//! (`/var/lib/clusterctl/restart-pending`), so a run killed between writing and restarting still
//! restarts the units on the next run. Re-running on a complete cluster uploads nothing and
//! restarts nothing.
//!
//! # Where things go on a node
//! Binaries and image archives are uploaded straight to `/var/lib/clusterctl/{bin,images}`, owned
//! by the login user (who has passwordless sudo anyway), so an unchanged file is never sent twice.
//! Configuration, PKI and kubeconfigs are uploaded to `/var/lib/clusterctl/staging` (0700,
//! 0600 files) and installed as root with their final mode by one script per node. `/etc` is a
//! tmpfs overlay on the node image: after a reboot the next `create` finds the files missing,
//! writes them again and restarts the units.
//!
//! # What is talked to
//! clusterctl reaches the API server with its own API client ([`crate::kube`]) through SSH:
//! each HTTP connection is a `direct-tcpip` channel on the pinned SSH connection to a
//! control-plane node, to `127.0.0.1:6443` as that node sees it, TLS end to end with the state's
//! CA and admin certificate. So the bootstrap needs no route from the admin machine to the API
//! server, only SSH (through a jump host too, once `ssh.bastion` is built), and starts no
//! kubectl on the control plane.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ipnet::{IpNet, Ipv4Net};
use k8s_openapi::api::core::v1::Node;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams};
use providers::MachineRole;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use zeroize::Zeroizing;

use super::access::{SSH_PORT, ssh_address};
use super::apply::{BoxFuture, EngineError, Phase, error_chain};
use super::artifacts::Artifacts;
use super::install::{self, Artifact, ConfigFile, Image, NodeDirs, NodeFiles, RESTART_ALL};
use super::plan::{self, Inventory};
use super::report::{MachineLine, Reporter};
use crate::kube::{
    API_SERVER_PORT, Credentials, KubeClient, KubeError, NodeState, TokioClock, WaitPolicy,
};
use crate::pki::{NodeIdentity, Pki, PkiSpec};
use crate::spec;
use crate::ssh::{Endpoint, Session, SshClient, Target, shell_quote};
use crate::state::{KubernetesStatus, NodeStatus, Timestamp};
use templates::kubernetes::{
    self as k8s, ClusterInput, EtcdClusterState, Layout, NodeInput, Role, Source, Taint,
    TaintEffect,
};

/// Where uploads of configuration and secrets wait before they are installed as root.
const STAGING: &str = "/var/lib/clusterctl/staging";
/// Where image archives are kept on a node.
const IMAGES: &str = "/var/lib/clusterctl/images";
/// Marker: files changed, units must be restarted (survives a killed run). One line per change,
/// written before the change: the unit whose own unit file changed, or `*` for anything else
/// (a binary, a certificate, a config several units read): every unit. An empty marker (from an
/// older clusterctl) also means every unit.
const RESTART_PENDING: &str = "/var/lib/clusterctl/restart-pending";
/// Where binaries are kept on a node (the templates' `layout.bin_dir`).
const BIN: &str = "/var/lib/clusterctl/bin";
/// The node image's `/etc` starts afresh on every boot; every file installed under `/etc` is also
/// kept here, on the data disk, and the image's `clusterctl-restore` puts it back at boot
/// (nodeimage/files/bin/clusterctl-restore).
const SAVED_ETC: &str = "/var/lib/clusterctl/etc";
/// The units `clusterctl-restore` starts after a reboot, one per line.
const BOOT_UNITS: &str = "/var/lib/clusterctl/boot-units";
/// The node label naming a worker's pool.
pub use crate::kube::POOL_LABEL;
/// How long the API server may take to answer `/readyz` after its units started (under QEMU TCG
/// on a busy 2-core host its first start, which creates the bootstrap RBAC roles, took over 7 min).
const API_TIMEOUT: Duration = Duration::from_secs(1200);
/// How long nodes may take to become Ready after their agents started.
const NODES_TIMEOUT: Duration = Duration::from_secs(900);

/// A machine to bootstrap.
#[derive(Debug, Clone)]
pub struct BootMachine {
    /// Machine (and node) name.
    pub name: String,
    /// Role.
    pub role: MachineRole,
    /// Node pool of a worker.
    pub pool: Option<String>,
    /// Address on the machine network (node IP, SSH target).
    pub ip: Ipv4Addr,
}

/// Everything one node gets.
struct NodePlan {
    cluster: String,
    name: String,
    role: MachineRole,
    target: Target,
    /// Binaries.
    binaries: Vec<Artifact>,
    /// Small files staged then installed as root.
    files: Vec<ConfigFile>,
    /// Units to (re)start, in order.
    units: Vec<String>,
    /// Units clusterctl wrote and enables.
    own_units: Vec<String>,
}

/// State of the bootstrap.
pub struct BootstrapContext {
    /// Progress output.
    pub report: Reporter,
    /// Nodes handled at once.
    pub concurrency: usize,
    /// The desired spec.
    pub spec: spec::Cluster,
    /// Verified Kubernetes artifacts.
    pub artifacts: Arc<Artifacts>,
    /// Machines, control plane first, in spec order.
    pub machines: Vec<BootMachine>,
    /// The cluster's PKI directory (in its state directory).
    pub pki_dir: PathBuf,
    /// Pod range index per machine; new machines get the lowest free index. Save it afterwards.
    pub pod_cidr_indexes: BTreeMap<String, u32>,
    /// SSH client trusting exactly the pinned host keys.
    pub client: SshClient,
    /// Login user.
    pub user: String,
    /// Install and start on these machines only (`None`: all). Every node's files are still
    /// rendered from the whole cluster; a Kubernetes upgrade goes one node at a time this way.
    pub only: Option<std::collections::BTreeSet<String>>,
    plans: Vec<Arc<NodePlan>>,
    api_server: String,
    /// Kubernetes as checked at the end (set by the last phase).
    pub status: Option<KubernetesStatus>,
}

impl BootstrapContext {
    /// A context for `machines` (from the provider's inventory).
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        report: Reporter,
        concurrency: usize,
        spec: spec::Cluster,
        artifacts: Arc<Artifacts>,
        machines: Vec<BootMachine>,
        pki_dir: PathBuf,
        pod_cidr_indexes: BTreeMap<String, u32>,
        client: SshClient,
        user: String,
    ) -> Self {
        BootstrapContext {
            report,
            concurrency,
            spec,
            artifacts,
            machines,
            pki_dir,
            pod_cidr_indexes,
            client,
            user,
            only: None,
            plans: Vec::new(),
            api_server: String::new(),
            status: None,
        }
    }

    fn first_control_plane(&self) -> Result<Arc<NodePlan>, EngineError> {
        self.plans
            .iter()
            .find(|p| p.role == MachineRole::ControlPlane)
            .cloned()
            .ok_or_else(|| {
                EngineError::Bootstrap("the cluster has no control-plane machine".into())
            })
    }
}

/// The machines of `desired` as observed, control plane first; errors name a machine without an
/// IPv4 address.
pub fn boot_machines(
    desired: &spec::Cluster,
    members: &super::names::PoolMembers,
    observed: &Inventory,
) -> Result<Vec<BootMachine>, EngineError> {
    let mut out = Vec::new();
    for d in plan::desired_machines(desired, members).map_err(EngineError::Plan)? {
        let m = observed.iter().find(|m| m.name == d.name);
        let ip = match m.and_then(ssh_address) {
            Some(IpAddr::V4(ip)) => ip,
            _ => {
                return Err(EngineError::Node {
                    machine: d.name,
                    step: "finding its address".into(),
                    detail: "the provider reports no IPv4 address for it".into(),
                });
            }
        };
        out.push(BootMachine {
            name: d.name,
            role: d.role,
            pool: d.pool,
            ip,
        });
    }
    out.sort_by_key(|m| m.role != MachineRole::ControlPlane);
    Ok(out)
}

/// The bootstrap phases without the final wait for every node: what a Kubernetes upgrade runs
/// on one node, whose own health gate then waits for that node on the new version.
pub fn install_phases() -> Vec<Box<dyn Phase<BootstrapContext>>> {
    vec![
        Box::new(Prepare),
        Box::new(Install),
        Box::new(StartControlPlane),
        Box::new(StartWorkers),
    ]
}

/// The bootstrap phases, in order.
pub fn bootstrap_phases() -> Vec<Box<dyn Phase<BootstrapContext>>> {
    vec![
        Box::new(Prepare),
        Box::new(Install),
        Box::new(StartControlPlane),
        Box::new(StartWorkers),
        Box::new(WaitForNodes),
    ]
}

fn bootstrap_err(what: &str, e: &dyn std::error::Error) -> EngineError {
    EngineError::Bootstrap(format!("{what}: {}", error_chain(e)))
}

fn v4(net: &IpNet, field: &str) -> Result<Ipv4Net, EngineError> {
    match net {
        IpNet::V4(n) => Ok(*n),
        IpNet::V6(_) => Err(EngineError::Bootstrap(format!(
            "{field} {net} is IPv6; clusterctl bootstraps IPv4 clusters only so far: use an IPv4 range"
        ))),
    }
}

/// Assigns pod range indexes: kept ones stay, gone machines lose theirs, new ones get the lowest
/// free index.
fn assign_pod_indexes(indexes: &mut BTreeMap<String, u32>, machines: &[BootMachine]) {
    let names: BTreeSet<&str> = machines.iter().map(|m| m.name.as_str()).collect();
    indexes.retain(|n, _| names.contains(n.as_str()));
    for m in machines {
        if !indexes.contains_key(&m.name) {
            let used: BTreeSet<u32> = indexes.values().copied().collect();
            let free = (0..).find(|i| !used.contains(i)).unwrap_or(0);
            indexes.insert(m.name.clone(), free);
        }
    }
}

fn taint_effect(e: spec::TaintEffect) -> TaintEffect {
    match e {
        spec::TaintEffect::NoSchedule => TaintEffect::NoSchedule,
        spec::TaintEffect::PreferNoSchedule => TaintEffect::PreferNoSchedule,
        spec::TaintEffect::NoExecute => TaintEffect::NoExecute,
    }
}

/// Issues certificates and renders every node's files.
struct Prepare;

impl Phase<BootstrapContext> for Prepare {
    fn title(&self) -> String {
        "Issuing certificates and rendering node configuration".into()
    }
    fn should_run(&self, _: &BootstrapContext) -> bool {
        true
    }
    fn run<'a>(&'a self, ctx: &'a mut BootstrapContext) -> BoxFuture<'a, Result<(), EngineError>> {
        Box::pin(async move {
            let k = &ctx.spec.spec.kubernetes;
            let service_cidr = v4(&k.service_cidr, "kubernetes.serviceCIDR")?;
            let pod_cidr = v4(&k.pod_cidr, "kubernetes.podCIDR")?;
            assign_pod_indexes(&mut ctx.pod_cidr_indexes, &ctx.machines);
            let identity = |m: &BootMachine| NodeIdentity {
                name: m.name.clone(),
                addresses: vec![IpAddr::V4(m.ip)],
            };
            let pki_spec = PkiSpec {
                cluster_name: ctx.spec.metadata.name.clone(),
                cluster_domain: k.cluster_domain.clone(),
                service_cidr: k.service_cidr,
                control_plane: ctx
                    .machines
                    .iter()
                    .filter(|m| m.role == MachineRole::ControlPlane)
                    .map(identity)
                    .collect(),
                workers: ctx
                    .machines
                    .iter()
                    .filter(|m| m.role == MachineRole::Worker)
                    .map(identity)
                    .collect(),
                extra_api_server_sans: Vec::new(),
            };
            let dir = ctx.pki_dir.clone();
            let (pki, actions) = tokio::task::spawn_blocking(move || Pki::ensure(&dir, &pki_spec))
                .await
                .map_err(|e| EngineError::Task(e.to_string()))?
                .map_err(|e| bootstrap_err("issuing certificates", &e))?;
            let created = actions
                .iter()
                .filter(|a| !matches!(a.action, crate::pki::Action::Reused))
                .count();
            ctx.report.note(&format!(
                "{} certificate(s) and keys in {}: {created} new or re-issued, {} kept",
                actions.len(),
                ctx.pki_dir.display(),
                actions.len() - created
            ));

            let profile = k8s::check_version(&ctx.artifacts.version)
                .map_err(|e| bootstrap_err("kubernetes version", &e))?;
            let dns_ip = cluster_dns_ip(service_cidr).ok_or_else(|| {
                    EngineError::Bootstrap(format!(
                        "kubernetes.serviceCIDR {service_cidr} is too small for the cluster DNS address (its 10th address); use a /12 to /24"
                    ))
                })?;
            let schedulable = ctx.spec.spec.control_plane.schedulable;
            let pools: BTreeMap<&str, &spec::NodePool> = ctx
                .spec
                .spec
                .node_pools
                .iter()
                .map(|p| (p.name.as_str(), p))
                .collect();
            let mut nodes = Vec::new();
            for m in &ctx.machines {
                let mut labels = BTreeMap::new();
                let mut taints = Vec::new();
                let role = match m.role {
                    MachineRole::ControlPlane => {
                        if !schedulable {
                            taints.push(Taint {
                                key: profile.control_plane_taint_key.to_owned(),
                                value: None,
                                effect: TaintEffect::NoSchedule,
                            });
                        }
                        Role::ControlPlane
                    }
                    MachineRole::Worker => {
                        if let Some(pool) = m.pool.as_deref().and_then(|p| pools.get(p)) {
                            labels.insert(POOL_LABEL.to_owned(), pool.name.clone());
                            labels.extend(pool.labels.clone());
                            taints.extend(pool.taints.iter().map(|t| Taint {
                                key: t.key.clone(),
                                value: t.value.clone(),
                                effect: taint_effect(t.effect),
                            }));
                        }
                        Role::Worker
                    }
                };
                nodes.push(NodeInput {
                    name: m.name.clone(),
                    ip: m.ip,
                    role,
                    pod_cidr_index: ctx.pod_cidr_indexes.get(&m.name).copied().unwrap_or(0),
                    labels,
                    taints,
                });
            }
            let input = ClusterInput {
                kubernetes_version: ctx.artifacts.version.clone(),
                cluster_name: ctx.spec.metadata.name.clone(),
                service_cidr,
                dns_service_ip: dns_ip,
                pod_cidr,
                cluster_domain: k.cluster_domain.clone(),
                api_server_port: 6443,
                api_server_host: None,
                etcd_cluster_state: EtcdClusterState::New,
                pause_image: ctx.artifacts.pause_image.clone(),
                controller_manager_signs: false,
                layout: Layout::default(),
                nodes,
            };
            let first_cp = ctx
                .machines
                .iter()
                .find(|m| m.role == MachineRole::ControlPlane)
                .ok_or_else(|| EngineError::Bootstrap("the spec has no control plane".into()))?;
            ctx.api_server = format!("https://{}:{}", first_cp.ip, input.api_server_port);

            let mut plans = Vec::new();
            for m in &ctx.machines {
                plans.push(Arc::new(node_plan(ctx, &pki, &input, m)?));
            }
            ctx.plans = plans;
            Ok(())
        })
    }
}

fn node_plan(
    ctx: &BootstrapContext,
    pki: &Pki,
    input: &ClusterInput,
    m: &BootMachine,
) -> Result<NodePlan, EngineError> {
    let rendered = k8s::render_node(input, &m.name).map_err(|e| EngineError::Node {
        machine: m.name.clone(),
        step: "rendering its configuration".into(),
        detail: error_chain(&e),
    })?;
    let mut files: Vec<(String, u32, Zeroizing<Vec<u8>>)> = rendered
        .files
        .iter()
        .map(|f| {
            (
                f.path.clone(),
                f.mode,
                Zeroizing::new(f.contents.clone().into_bytes()),
            )
        })
        .collect();
    for e in &rendered.external {
        let content =
            match &e.source {
                Source::Pki(rel) => {
                    let path = pki.dir().join(rel);
                    Zeroizing::new(std::fs::read(&path).map_err(|err| {
                        bootstrap_err(&format!("reading {}", path.display()), &err)
                    })?)
                }
                Source::Kubeconfig { cert, server } => {
                    let text = pki
                        .kubeconfig(cert, server)
                        .map_err(|err| bootstrap_err(&format!("kubeconfig {cert}"), &err))?;
                    Zeroizing::new(text.as_bytes().to_vec())
                }
            };
        files.push((e.path.clone(), 0o600, content));
    }
    let layout = &input.layout;
    let mut binaries = vec!["kubelet", "kube-proxy"];
    if m.role == MachineRole::ControlPlane {
        binaries.extend([
            "etcd",
            "kube-apiserver",
            "kube-controller-manager",
            "kube-scheduler",
            "kubectl",
        ]);
        let admin = pki
            .kubeconfig(
                "admin",
                &format!("https://127.0.0.1:{}", input.api_server_port),
            )
            .map_err(|err| bootstrap_err("kubeconfig admin", &err))?;
        files.push((
            format!("{}/admin.conf", layout.config_dir),
            0o600,
            Zeroizing::new(admin.as_bytes().to_vec()),
        ));
    }
    let mut bins = Vec::new();
    for b in binaries {
        let file = ctx
            .artifacts
            .binary(b)
            .map_err(|e| bootstrap_err("artifacts", &e))?;
        bins.push(Artifact {
            label: b.to_owned(),
            local: file.path.clone(),
            sha256: file.known_sha256(),
            remote: format!("{}/{b}", layout.bin_dir),
        });
    }
    let own_units = rendered
        .files
        .iter()
        .filter_map(|f| f.path.strip_prefix("/etc/systemd/system/"))
        .filter(|u| u.ends_with(".service"))
        .map(str::to_owned)
        .collect();
    let units = rendered.units.clone();
    let files = files
        .into_iter()
        .map(|(dest, mode, content)| ConfigFile {
            restart: restart_key(&units, &dest),
            dest,
            mode,
            content,
        })
        .collect();
    Ok(NodePlan {
        cluster: ctx.spec.metadata.name.clone(),
        name: m.name.clone(),
        role: m.role,
        target: Target::new(m.ip.to_string(), SSH_PORT, ctx.user.clone()),
        binaries: bins,
        files,
        units,
        own_units,
    })
}

/// Runs `f` on each plan, up to `concurrency` at once, one progress line per node. The first
/// failure is returned (named by node and step); the others are reported.
async fn for_nodes<F, Fut>(
    ctx: &BootstrapContext,
    plans: Vec<Arc<NodePlan>>,
    f: F,
) -> Result<(), EngineError>
where
    F: Fn(SshClient, Arc<NodePlan>, Arc<MachineLine>) -> Fut,
    Fut: std::future::Future<Output = Result<String, EngineError>> + Send + 'static,
{
    for_nodes_at_most(ctx, plans, ctx.concurrency, f).await
}

/// [`for_nodes`] with at most `limit` nodes at once (1: one after the other, in order).
async fn for_nodes_at_most<F, Fut>(
    ctx: &BootstrapContext,
    plans: Vec<Arc<NodePlan>>,
    limit: usize,
    f: F,
) -> Result<(), EngineError>
where
    F: Fn(SshClient, Arc<NodePlan>, Arc<MachineLine>) -> Fut,
    Fut: std::future::Future<Output = Result<String, EngineError>> + Send + 'static,
{
    let limit = Arc::new(Semaphore::new(limit.max(1)));
    let lines = ctx.report.lines();
    let plans: Vec<Arc<NodePlan>> = plans
        .into_iter()
        .filter(|p| ctx.only.as_ref().is_none_or(|o| o.contains(&p.name)))
        .collect();
    let attempted = plans.len();
    let mut set = JoinSet::new();
    for (i, plan) in plans.into_iter().enumerate() {
        let line = Arc::new(lines.line(&plan.name));
        let fut = f(ctx.client.clone(), plan, line.clone());
        let limit = limit.clone();
        set.spawn(async move {
            let _permit = limit.acquire_owned().await;
            let started = Instant::now();
            let res = fut.await;
            match &res {
                Ok(msg) => {
                    line.finish(&format!("{msg} ({:.1} s)", started.elapsed().as_secs_f64()))
                }
                Err(e) => line.finish(&format!("failed: {}", error_chain(e))),
            }
            (i, res)
        });
    }
    let mut errors = Vec::new();
    while let Some(j) = set.join_next().await {
        match j {
            Ok((i, Err(e))) => errors.push((i, e)),
            Ok((_, Ok(_))) => {}
            Err(e) => errors.push((usize::MAX, EngineError::Task(e.to_string()))),
        }
    }
    errors.sort_by_key(|(i, _)| *i);
    let failed = errors.len();
    match errors.into_iter().next() {
        None => Ok(()),
        Some((_, e)) if failed == 1 => Err(e),
        Some((_, e)) => Err(EngineError::Several {
            failed,
            attempted,
            first: Box::new(e),
        }),
    }
}

fn node_err(node: &str, step: impl Into<String>, e: &dyn std::error::Error) -> EngineError {
    EngineError::Node {
        machine: node.to_owned(),
        step: step.into(),
        detail: error_chain(e),
    }
}

async fn connect(client: &SshClient, plan: &NodePlan) -> Result<Session, EngineError> {
    client
        .connect(&plan.target)
        .await
        .map_err(|e| node_err(&plan.name, "connecting over ssh", &e))
}

/// Runs a root shell script on a node (see [`install::root_script`]).
async fn root_script(
    session: &Session,
    node: &str,
    step: &str,
    script: &str,
    timeout: Duration,
) -> Result<String, EngineError> {
    install::root_script(session, "sudo -n", node, step, script, timeout).await
}

/// Uploads binaries, images and files, installs changed files as root and imports images.
struct Install;

impl Phase<BootstrapContext> for Install {
    fn title(&self) -> String {
        "Installing Kubernetes on the machines".into()
    }
    fn should_run(&self, _: &BootstrapContext) -> bool {
        true
    }
    fn run<'a>(&'a self, ctx: &'a mut BootstrapContext) -> BoxFuture<'a, Result<(), EngineError>> {
        Box::pin(async move {
            // The manifest's sums, verified when the artifacts were resolved: no file is
            // hashed again to compare it with a node's.
            let images: Arc<Vec<Image>> = Arc::new(
                remote_image_names(
                    ctx.artifacts
                        .images
                        .iter()
                        .map(|i| (i.reference.clone(), i.file.path.clone())),
                )
                .into_iter()
                .zip(&ctx.artifacts.images)
                .map(|((reference, local, file), image)| Image {
                    artifact: Artifact {
                        label: format!("image {reference}"),
                        local,
                        sha256: image.file.known_sha256(),
                        remote: format!("{IMAGES}/{file}"),
                    },
                    reference,
                })
                .collect(),
            );
            for_nodes(ctx, ctx.plans.clone(), move |client, plan, line| {
                let images = images.clone();
                async move { install_node(&client, &plan, &line, &images).await }
            })
            .await
        })
    }
}

/// Each image archive with the file name it gets in the node's image directory: its own name,
/// or `<n>-<name>` when an earlier archive (from another bundle directory) has that name.
fn remote_image_names(
    images: impl Iterator<Item = (String, PathBuf)>,
) -> Vec<(String, PathBuf, String)> {
    let mut taken = BTreeSet::new();
    let mut out = Vec::new();
    for (n, (reference, local)) in images.enumerate() {
        let base = local
            .file_name()
            .map(|f| f.to_string_lossy().into_owned())
            .unwrap_or_else(|| "image.tar".into());
        let mut name = base.clone();
        let mut k = n;
        while taken.contains(&name) {
            name = format!("{k}-{base}");
            k += 1;
        }
        taken.insert(name.clone());
        out.push((reference, local, name));
    }
    out
}

/// The node image's directories, reached through `sudo`.
fn node_dirs() -> NodeDirs {
    NodeDirs {
        as_root: "sudo -n".to_owned(),
        bin: BIN.to_owned(),
        images: IMAGES.to_owned(),
        staging: STAGING.to_owned(),
        restart_pending: RESTART_PENDING.to_owned(),
        etc: ("/etc".to_owned(), SAVED_ETC.to_owned()),
    }
}

async fn install_node(
    client: &SshClient,
    plan: &NodePlan,
    line: &MachineLine,
    images: &[Image],
) -> Result<String, EngineError> {
    let session = connect(client, plan).await?;
    let files = NodeFiles {
        binaries: &plan.binaries,
        images,
        files: &plan.files,
    };
    let result = install::install(&session, &plan.name, &node_dirs(), files, line).await;
    session.close().await;
    result.map(|done| done.summary())
}

/// What a change of `dest` restarts: its unit if `dest` is the unit file of one of the node's
/// `units` (nothing else reads a unit file), else every unit ([`RESTART_ALL`]).
fn restart_key(units: &[String], dest: &str) -> String {
    dest.strip_prefix("/etc/systemd/system/")
        .filter(|u| units.iter().any(|x| x == u))
        .map_or_else(|| RESTART_ALL.to_owned(), str::to_owned)
}

/// The script that (re)starts `units` of a node: restarts them in order when its files changed
/// (the marker), otherwise only starts what is not running. `last` removes the marker: the other
/// units' stage is done. `quiet` are units stopped before kube-apiserver restarts (the next stage
/// starts them again once it is ready).
fn start_script(plan: &NodePlan, units: &[String], last: bool, quiet: &[String]) -> String {
    start_script_with(
        &plan.own_units,
        units,
        last,
        quiet,
        RESTART_PENDING,
        BOOT_UNITS,
    )
}

fn start_script_with(
    own_units: &[String],
    units: &[String],
    last: bool,
    quiet: &[String],
    marker: &str,
    boot_units: &str,
) -> String {
    let units: Vec<String> = units.iter().map(|u| shell_quote(u)).collect();
    let own: Vec<String> = own_units.iter().map(|u| shell_quote(u)).collect();
    let (marker, boot_units) = (shell_quote(marker), shell_quote(boot_units));
    let quiet: Vec<String> = quiet.iter().map(|u| shell_quote(u)).collect();
    let quiet = if quiet.is_empty() {
        String::new()
    } else {
        format!(
            "\x20 if [ \"$all\" = 1 ] || grep -qxF kube-apiserver.service {marker}; then\n\
             \x20   for u in {}; do systemctl stop \"$u\"; echo \"stopped $u\"; done\n\
             \x20 fi\n",
            quiet.join(" ")
        )
    };
    let done = if last {
        format!("rm -f {marker}")
    } else {
        ":".to_owned()
    };
    format!(
        "set -eu\n\
         systemctl daemon-reload\n\
         systemctl enable -q {own}\n\
         printf '%s\\n' {own} > {boot_units}.new && mv -f {boot_units}.new {boot_units}\n\
         if [ -e {marker} ]; then\n\
         \x20 all=0; [ -s {marker} ] || all=1; ! grep -qxF '{RESTART_ALL}' {marker} || all=1\n\
         {quiet}\
         \x20 n=0\n\
         \x20 for u in {units}; do\n\
         \x20   if [ \"$all\" = 1 ] || grep -qxF \"$u\" {marker}; then systemctl restart \"$u\"; n=$((n+1)); else systemctl is-active -q \"$u\" || systemctl start \"$u\"; fi\n\
         \x20 done\n\
         \x20 {done}\n\
         \x20 echo \"restarted $n\"\n\
         else\n\
         \x20 for u in {units}; do systemctl is-active -q \"$u\" || {{ systemctl start \"$u\"; echo \"started $u\"; }}; done\n\
         fi\n",
        own = own.join(" "),
        units = units.join(" "),
    )
}

/// A control-plane node's units in two stages: through kube-apiserver, then the rest. The API
/// server's first start (creating the bootstrap RBAC roles) is CPU-bound; under emulation the
/// other components hammering it while it starts doubled the time.
fn control_plane_stages(plan: &NodePlan) -> (Vec<String>, Vec<String>) {
    let split = plan
        .units
        .iter()
        .position(|u| u == "kube-apiserver.service")
        .map_or(plan.units.len(), |i| i + 1);
    (plan.units[..split].to_vec(), plan.units[split..].to_vec())
}

/// The units of the second stage stopped whenever kube-apiserver restarts (a changed flag,
/// binary or certificate): the controller-manager holds one connection per controller (50
/// measured) and the scheduler several (9), and all of them reconnecting at once made a restarted
/// API server time out on its own loopback TLS handshakes and exit, six times in a row, on a busy
/// emulated control plane. The second stage starts them once `/readyz` answers; when it never
/// does they stay stopped until a re-run, which finds the restart marker and runs both stages.
fn quiet_during_api_restart(rest: &[String]) -> Vec<String> {
    rest.iter()
        .filter(|u| *u == "kube-controller-manager.service" || *u == "kube-scheduler.service")
        .cloned()
        .collect()
}

async fn start_node(
    client: &SshClient,
    plan: &NodePlan,
    units: &[String],
    last: bool,
    quiet: &[String],
) -> Result<String, EngineError> {
    let session = connect(client, plan).await?;
    let result = root_script(
        &session,
        &plan.name,
        "starting its units",
        &start_script(plan, units, last, quiet),
        Duration::from_secs(300),
    )
    .await;
    session.close().await;
    let out = result?;
    let restarted = out
        .lines()
        .find_map(|l| l.strip_prefix("restarted "))
        .and_then(|n| n.trim().parse::<usize>().ok());
    Ok(if let Some(n) = restarted {
        if n == 0 {
            "no unit of this stage changed".into()
        } else {
            format!("{n} of {} unit(s) restarted in order", units.len())
        }
    } else {
        let started = out.lines().filter(|l| l.starts_with("started ")).count();
        if started == 0 {
            "all units already running".into()
        } else {
            format!("{started} unit(s) started")
        }
    })
}

/// An API client for the cluster through SSH to `plan`'s machine (a control plane), to the API
/// server on that machine's loopback.
fn kube_client(
    client: &SshClient,
    plan: &NodePlan,
    credentials: &Credentials,
) -> Result<KubeClient, EngineError> {
    KubeClient::new(
        client.clone(),
        plan.target.clone(),
        Endpoint::new("127.0.0.1", API_SERVER_PORT),
        credentials,
    )
    .map_err(|e| node_err(&plan.name, "setting up the API client", &e))
}

fn admin_credentials(ctx: &BootstrapContext) -> Result<Arc<Credentials>, EngineError> {
    Credentials::from_pki_dir(&ctx.pki_dir)
        .map(Arc::new)
        .map_err(|e| bootstrap_err("reading the admin credential", &e))
}

/// Starts etcd and the control plane and waits for the API server.
struct StartControlPlane;

impl Phase<BootstrapContext> for StartControlPlane {
    fn title(&self) -> String {
        "Starting etcd and the control plane".into()
    }
    fn should_run(&self, _: &BootstrapContext) -> bool {
        true
    }
    fn run<'a>(&'a self, ctx: &'a mut BootstrapContext) -> BoxFuture<'a, Result<(), EngineError>> {
        Box::pin(async move {
            let cps: Vec<Arc<NodePlan>> = ctx
                .plans
                .iter()
                .filter(|p| p.role == MachineRole::ControlPlane)
                .cloned()
                .collect();
            let credentials = admin_credentials(ctx)?;
            // One control plane at a time, the next only once this one's API server is ready
            // and reports its etcd healthy: restarting them all at once could take etcd's quorum
            // and every API server down together.
            for_nodes_at_most(ctx, cps, 1, move |client, plan, line| {
                let credentials = credentials.clone();
                async move {
                    let (first, rest) = control_plane_stages(&plan);
                    line.say("starting etcd and the API server");
                    let quiet = quiet_during_api_restart(&rest);
                    let msg = start_node(&client, &plan, &first, false, &quiet).await?;
                    line.say(&format!("{msg}; waiting for the API server"));
                    let kube = kube_client(&client, &plan, &credentials)?;
                    let progress_line = line.clone();
                    let waited = kube
                        .wait_for_api_ready(
                            &WaitPolicy::for_up_to(API_TIMEOUT),
                            &TokioClock,
                            &mut move |s: &str| progress_line.say(s),
                        )
                        .await;
                    let waited = match waited {
                        Ok(()) => etcd_healthy(&kube).await,
                        Err(e) => Err(e),
                    };
                    kube.close().await;
                    if let Err(e) = waited {
                        let journal =
                            unit_journal(&client, &plan, &["etcd", "kube-apiserver"], 25).await;
                        return Err(EngineError::Node {
                            machine: plan.name.clone(),
                            step: "waiting for the API server".into(),
                            detail: format!(
                                "{}; see `clusterctl ssh {} {} -- sudo journalctl -u \
                                 kube-apiserver`; last log lines:\n{journal}",
                                error_chain(&e),
                                plan.cluster,
                                plan.name
                            ),
                        });
                    }
                    line.say("API server ready, etcd healthy; starting the other components");
                    let rest_msg = start_node(&client, &plan, &rest, true, &[]).await?;
                    Ok(if msg == rest_msg {
                        msg
                    } else {
                        format!("{msg}, then {rest_msg}; API server ready, etcd healthy")
                    })
                }
            })
            .await
        })
    }
}

/// How long etcd may take to report healthy once the API server is ready (it is part of
/// `/readyz`, so this only covers a moment's flap).
const ETCD_HEALTH_TIMEOUT: Duration = Duration::from_secs(60);

/// Waits until the API server reports its etcd healthy (`/readyz/etcd`).
async fn etcd_healthy(kube: &KubeClient) -> Result<(), crate::kube::KubeError> {
    let started = Instant::now();
    loop {
        match kube.etcd_ready().await {
            Ok(()) => return Ok(()),
            Err(e) if started.elapsed() >= ETCD_HEALTH_TIMEOUT => return Err(e),
            Err(_) => tokio::time::sleep(Duration::from_secs(2)).await,
        }
    }
}

/// Starts kubelet and kube-proxy on the workers.
struct StartWorkers;

impl Phase<BootstrapContext> for StartWorkers {
    fn title(&self) -> String {
        "Starting kubelet and kube-proxy on the workers".into()
    }
    fn should_run(&self, ctx: &BootstrapContext) -> bool {
        ctx.plans.iter().any(|p| p.role == MachineRole::Worker)
    }
    fn run<'a>(&'a self, ctx: &'a mut BootstrapContext) -> BoxFuture<'a, Result<(), EngineError>> {
        Box::pin(async move {
            let workers: Vec<Arc<NodePlan>> = ctx
                .plans
                .iter()
                .filter(|p| p.role == MachineRole::Worker)
                .cloned()
                .collect();
            for_nodes(ctx, workers, |client, plan, line| async move {
                line.say("starting units");
                start_node(&client, &plan, &plan.units, true, &[]).await
            })
            .await
        })
    }
}

/// Waits until every machine's node is Ready, labels control-plane nodes and removes Node
/// objects of machines that are gone.
struct WaitForNodes;

impl Phase<BootstrapContext> for WaitForNodes {
    fn title(&self) -> String {
        "Waiting for every node to be Ready".into()
    }
    fn should_run(&self, _: &BootstrapContext) -> bool {
        true
    }
    fn run<'a>(&'a self, ctx: &'a mut BootstrapContext) -> BoxFuture<'a, Result<(), EngineError>> {
        Box::pin(async move {
            let cp = ctx.first_control_plane()?;
            let credentials = admin_credentials(ctx)?;
            let kube = kube_client(&ctx.client, &cp, &credentials)?;
            let result = wait_for_nodes(ctx, &kube, &cp).await;
            kube.close().await;
            let nodes = result?;
            ctx.status = Some(KubernetesStatus {
                version: ctx.artifacts.version.clone(),
                api_server: ctx.api_server.clone(),
                nodes,
                checked_at: Timestamp::now(),
            });
            Ok(())
        })
    }
}

/// Waits through `kube` (via `cp_plan`'s machine) until every machine's node is Ready, then
/// removes Node objects of machines that are gone and labels control-plane nodes.
async fn wait_for_nodes(
    ctx: &BootstrapContext,
    kube: &KubeClient,
    cp_plan: &NodePlan,
) -> Result<Vec<NodeStatus>, EngineError> {
    let cp = cp_plan.name.as_str();
    let wanted: BTreeSet<String> = ctx.machines.iter().map(|m| m.name.clone()).collect();
    let report = ctx.report;
    let waited = kube
        .wait_for_nodes_ready(
            &wanted,
            &WaitPolicy::for_up_to(NODES_TIMEOUT),
            &TokioClock,
            &mut move |s: &str| report.note(s),
        )
        .await;
    let ready = match waited {
        Ok(ready) => ready,
        Err(e @ KubeError::Timeout { .. }) => {
            // Name the first node that is not Ready and show its kubelet's log.
            let listed = kube.list_nodes().await.unwrap_or_default();
            let first = wanted
                .iter()
                .find(|w| !listed.iter().any(|n| &n.name == *w && n.ready))
                .cloned()
                .unwrap_or_else(|| cp.to_owned());
            let detail = match ctx.plans.iter().find(|p| p.name == first) {
                Some(plan) => node_journal(&ctx.client, plan).await,
                None => String::new(),
            };
            return Err(EngineError::Node {
                machine: first,
                step: "waiting for the node to be Ready".into(),
                detail: format!("{}; kubelet's last log lines:\n{detail}", error_chain(&e)),
            });
        }
        Err(e) => return Err(node_err(cp, "waiting for nodes to be Ready", &e)),
    };
    let nodes: Api<Node> = Api::all(kube.client());
    // The API server answered the readiness wait, but a control plane short of CPU (software
    // emulation, a busy host) may still time out one request: these are retried (error policy).
    let patience = Duration::from_secs(180);
    let (list_all, delete_params, patch_params) = (
        ListParams::default(),
        DeleteParams::default(),
        PatchParams::default(),
    );
    let listed = kube
        .call_retrying("listing nodes", patience, || nodes.list(&list_all))
        .await
        .map_err(|e| node_err(cp, "listing nodes", &e))?;
    // Nodes of machines that no longer exist (scaled down, replaced) go from the API too.
    let stale: Vec<String> = listed
        .items
        .iter()
        .filter_map(|n| n.metadata.name.clone())
        .filter(|n| !wanted.contains(n))
        .collect();
    for name in &stale {
        let op = format!("deleting node {name}");
        match kube
            .call_retrying(&op, patience, || nodes.delete(name, &delete_params))
            .await
        {
            Ok(_) => {}
            Err(e) => {
                if e.status_code() != Some(404) {
                    return Err(node_err(cp, "removing nodes of deleted machines", &e));
                }
            }
        }
    }
    if !stale.is_empty() {
        ctx.report.note(&format!(
            "removed node(s) of deleted machines: {}",
            stale.join(", ")
        ));
    }
    // Role labels are set through the API: kubelet may not set node-role labels.
    let roles = Patch::Merge(serde_json::json!({"metadata": {"labels": {
        "node-role.kubernetes.io/control-plane": "",
        "node-role.kubernetes.io/master": "",
    }}}));
    for m in ctx
        .machines
        .iter()
        .filter(|m| m.role == MachineRole::ControlPlane)
    {
        let has = listed.items.iter().any(|n| {
            n.metadata.name.as_deref() == Some(m.name.as_str())
                && n.metadata
                    .labels
                    .as_ref()
                    .is_some_and(|l| l.contains_key("node-role.kubernetes.io/control-plane"))
        });
        if !has {
            let op = format!("labelling node {}", m.name);
            kube.call_retrying(&op, patience, || {
                nodes.patch(&m.name, &patch_params, &roles)
            })
            .await
            .map_err(|e| node_err(cp, "labelling control-plane nodes", &e))?;
        }
    }
    let nodes: Vec<NodeStatus> = ready.into_iter().map(node_status).collect();
    for n in &nodes {
        ctx.report
            .machine(&n.name, &format!("Ready, kubelet {}", n.kubelet_version));
    }
    Ok(nodes)
}

/// The cluster DNS address of a Service network: its 10th address, as kubeadm chooses (every
/// kubelet's `clusterDNS`, the kube-dns Service's `clusterIP`); `None` if the network is too small.
pub fn cluster_dns_ip(service_cidr: ipnet::Ipv4Net) -> Option<Ipv4Addr> {
    u32::from(service_cidr.network())
        .checked_add(10)
        .map(Ipv4Addr::from)
        .filter(|ip| service_cidr.contains(ip))
}

fn node_status(n: NodeState) -> NodeStatus {
    NodeStatus {
        name: n.name,
        ready: n.ready,
        kubelet_version: n.kubelet_version,
    }
}

/// The last `lines` lines of the given units' journal on `plan`'s machine (for error details).
async fn unit_journal(client: &SshClient, plan: &NodePlan, units: &[&str], lines: u32) -> String {
    let Ok(session) = client.connect(&plan.target).await else {
        return "(cannot connect to read the log)".into();
    };
    let units: String = units.iter().map(|u| format!(" -u {u}")).collect();
    let out = session
        .exec(&format!("sudo -n journalctl{units} -n {lines} --no-pager"))
        .await
        .map(|o| o.stdout_text())
        .unwrap_or_default();
    session.close().await;
    out
}

async fn node_journal(client: &SshClient, plan: &NodePlan) -> String {
    unit_journal(client, plan, &["kubelet"], 15).await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(name: &str, role: MachineRole) -> BootMachine {
        BootMachine {
            name: name.into(),
            role,
            pool: None,
            ip: Ipv4Addr::new(10, 0, 0, 1),
        }
    }

    #[test]
    fn pod_indexes_are_kept_freed_and_reused_lowest_first() {
        let mut idx = BTreeMap::new();
        let machines = vec![
            m("cp", MachineRole::ControlPlane),
            m("w1", MachineRole::Worker),
            m("w2", MachineRole::Worker),
        ];
        assign_pod_indexes(&mut idx, &machines);
        assert_eq!(idx.get("cp"), Some(&0));
        assert_eq!(idx.get("w1"), Some(&1));
        assert_eq!(idx.get("w2"), Some(&2));
        // w1 is replaced by w3: w2 keeps 2, w3 takes the freed 1.
        let machines = vec![
            m("cp", MachineRole::ControlPlane),
            m("w2", MachineRole::Worker),
            m("w3", MachineRole::Worker),
        ];
        assign_pod_indexes(&mut idx, &machines);
        assert_eq!(idx.get("w2"), Some(&2));
        assert_eq!(idx.get("w3"), Some(&1));
        assert!(!idx.contains_key("w1"));
    }

    #[test]
    fn image_archives_with_the_same_file_name_get_distinct_remote_names() {
        let images = [
            ("a:1", "/b/images/pause.tar"),
            ("b:1", "/b/other/pause.tar"),
            ("c:1", "/b/images/busybox.tar"),
            ("d:1", "/b/x/1-pause.tar"),
            ("e:1", "/b/y/pause.tar"),
        ]
        .map(|(r, p)| (r.to_owned(), PathBuf::from(p)));
        let names: Vec<String> = remote_image_names(images.into_iter())
            .into_iter()
            .map(|(_, _, n)| n)
            .collect();
        assert_eq!(names[..3], ["pause.tar", "1-pause.tar", "busybox.tar"]);
        let unique: BTreeSet<&String> = names.iter().collect();
        assert_eq!(unique.len(), names.len(), "{names:?}");
    }

    /// Runs the start script with a `systemctl` that logs its calls (every unit active).
    fn started(marker: Option<&str>, last: bool) -> (Vec<String>, String, bool) {
        let (restarts, out, left, _) = started_quiet(marker, last, &[]);
        (restarts, out, left)
    }

    /// Runs the start script against a fake systemctl: (restarted units, stdout, marker left,
    /// every systemctl call in order).
    fn started_quiet(
        marker: Option<&str>,
        last: bool,
        quiet: &[&str],
    ) -> (Vec<String>, String, bool, Vec<String>) {
        let quiet: Vec<String> = quiet.iter().map(|u| (*u).to_owned()).collect();
        let Ok(dir) = tempfile::tempdir() else {
            panic!("no temp dir");
        };
        let d = |p: &str| dir.path().join(p).display().to_string();
        std::fs::write(
            d("systemctl"),
            format!("#!/bin/sh\necho \"$*\" >> {}\nexit 0\n", d("calls")),
        )
        .unwrap_or_default();
        let _ = std::process::Command::new("chmod")
            .args(["+x", &d("systemctl")])
            .status();
        if let Some(content) = marker {
            std::fs::write(d("marker"), content).unwrap_or_default();
        }
        let units: Vec<String> = [
            "etcd.service",
            "kube-apiserver.service",
            "pod-network.service",
        ]
        .iter()
        .map(|u| (*u).to_owned())
        .collect();
        let script =
            start_script_with(&units, &units, last, &quiet, &d("marker"), &d("boot-units"));
        let out = std::process::Command::new("sh")
            .arg("-c")
            .arg(&script)
            .env("PATH", format!("{}:/usr/bin:/bin", dir.path().display()))
            .output()
            .unwrap_or_else(|e| panic!("sh: {e}"));
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let calls = std::fs::read_to_string(d("calls")).unwrap_or_default();
        let restarts = calls
            .lines()
            .filter_map(|l| l.strip_prefix("restart "))
            .map(str::to_owned)
            .collect();
        (
            restarts,
            String::from_utf8_lossy(&out.stdout).into_owned(),
            std::path::Path::new(&d("marker")).exists(),
            calls.lines().map(str::to_owned).collect(),
        )
    }

    #[test]
    fn api_clients_stop_before_a_restart_of_the_api_server_only() {
        let quiet = ["kube-controller-manager.service"];
        let (r, out, _, calls) = started_quiet(Some("kube-apiserver.service\n"), false, &quiet);
        assert_eq!(r, ["kube-apiserver.service"]);
        assert!(
            out.contains("stopped kube-controller-manager.service"),
            "{out}"
        );
        let at = |c: &str| calls.iter().position(|l| l == c);
        assert!(
            at("stop kube-controller-manager.service") < at("restart kube-apiserver.service"),
            "{calls:?}"
        );
        // Everything restarts: the clients stop first too.
        let (_, _, _, calls) = started_quiet(Some("*\n"), false, &quiet);
        assert!(calls.contains(&"stop kube-controller-manager.service".to_owned()));
        // Another unit changed: the API server keeps running and so do its clients.
        let (_, out, _, calls) = started_quiet(Some("pod-network.service\n"), false, &quiet);
        assert!(!out.contains("stopped"), "{out}");
        assert!(!calls.iter().any(|c| c.starts_with("stop ")), "{calls:?}");
        // No marker: nothing was changed, nothing stops.
        let (_, _, _, calls) = started_quiet(None, false, &quiet);
        assert!(!calls.iter().any(|c| c.starts_with("stop ")), "{calls:?}");
    }

    #[test]
    fn the_clients_quieted_are_the_controller_manager_and_scheduler_of_the_second_stage() {
        let rest: Vec<String> = [
            "kube-controller-manager.service",
            "kube-scheduler.service",
            "kubelet.service",
        ]
        .iter()
        .map(|u| (*u).to_owned())
        .collect();
        assert_eq!(quiet_during_api_restart(&rest), rest[..2]);
        assert!(quiet_during_api_restart(&rest[2..]).is_empty());
    }

    #[test]
    fn only_the_units_the_marker_names_restart_unless_it_says_all() {
        // A unit file alone changed: that unit restarts, nothing else.
        let (r, out, left) = started(Some("pod-network.service\n"), true);
        assert_eq!(r, ["pod-network.service"]);
        assert_eq!(out.trim(), "restarted 1");
        assert!(!left, "the last stage removes the marker");
        // A binary or shared file: every unit, in order.
        let (r, _, _) = started(Some("pod-network.service\n*\n"), true);
        assert_eq!(
            r,
            [
                "etcd.service",
                "kube-apiserver.service",
                "pod-network.service"
            ]
        );
        // An empty marker (an older clusterctl's): every unit.
        let (r, _, _) = started(Some(""), false);
        assert_eq!(r.len(), 3);
        // Not the last stage: the marker stays for the next one.
        let (_, _, left) = started(Some("etcd.service\n"), false);
        assert!(left);
        // No marker: nothing restarts (only what is not running would be started).
        let (r, out, _) = started(None, true);
        assert!(r.is_empty(), "{r:?}");
        assert!(!out.contains("restarted"), "{out}");
    }
}
