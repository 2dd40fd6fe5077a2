//! `create`: provisions a cluster's machines and bootstraps Kubernetes on them, or, run again,
//! brings a running cluster to its spec (new machines, removed workers drained first).
//!
//! Takes the cluster lock, creates or loads the state record (the cluster ID is generated and
//! saved before any side effect, so everything a provider creates can be found again), plans
//! against the provider's inventory and applies the machine steps, then bootstraps Kubernetes on
//! the machines over SSH (`engine::bootstrap`). The Kubernetes artifacts are resolved and every
//! file's checksum verified before anything is created. Re-running it after a failure or a kill
//! resumes; on a complete cluster it changes nothing. The fake provider boots nothing, so with it
//! `create` stops at machines and says so. [`reconcile`] is the part after the lock, which
//! `repair` runs (under its own lock) to make a machine it deleted again.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context as _, bail};

use super::{lock_cluster, open_journal, runtime};
use crate::engine::access::{self, SshAccess};
use crate::engine::artifacts::{self, Artifacts};
use crate::engine::bootstrap::{self, BootstrapContext};
use crate::engine::{self, ApplyContext, Env, MachineTemplate, Reporter};
use crate::provider;
use crate::spec;
use crate::state::{
    ClusterGuard, ClusterRecord, ClusterStatus, Journal, Replay, StateStore, Timestamp,
};

/// Most provider calls in flight at once.
pub const CONCURRENCY: usize = 4;

/// How `create` runs.
#[derive(Debug, Clone, Copy)]
pub struct CreateOptions {
    /// Wait for the cluster lock instead of failing.
    pub wait_lock: bool,
    /// How long each machine may take to answer SSH after it was started.
    pub ssh_timeout: Duration,
    /// How long each node removed by a scale-down may take to drain.
    pub drain_timeout: Duration,
}

/// Loads and validates a spec and makes its provider paths absolute.
pub fn load_spec(file: &Path) -> anyhow::Result<spec::Cluster> {
    let mut spec = spec::load(file)?;
    provider::absolutize_paths(&mut spec, file);
    Ok(spec)
}

/// Checks that an existing cluster is not half deleted (what the spec may change is
/// [`spec::changes::check_reapply`]'s).
fn check_existing(record: &ClusterRecord) -> anyhow::Result<()> {
    if record.status == ClusterStatus::Deleting {
        bail!(
            "cluster {:?} is being deleted (an earlier `clusterctl delete` did not finish); run `clusterctl delete {}` to finish, then create it again",
            record.name,
            record.name
        );
    }
    Ok(())
}

/// Runs `clusterctl create` for the spec read from `file`; returns the cluster's record.
pub fn create(
    store: &StateStore,
    file: &Path,
    opts: CreateOptions,
    report: Reporter,
) -> anyhow::Result<ClusterRecord> {
    let spec = load_spec(file)?;
    let name = spec.metadata.name.clone();
    // Everything that can fail without touching anything comes first, so that a provider that is
    // not available leaves no state behind.
    drop(provider::provider_for(&spec)?);
    // An existing cluster's machines boot the image pinned in its record (read without the lock:
    // it is read again under the lock below, and only an upgrade changes it).
    let pinned = store.load(&name)?.and_then(|r| r.node_image);
    let image = provider::node_image(&spec, pinned.as_ref(), &nodeimage::default_image_dir())?;
    let rt = runtime()?;
    let artifacts = verify_artifacts(&rt, &spec, file, report)?;
    let guard = lock_cluster(store, &name, opts.wait_lock, report)?;

    let mut record = match guard.load()? {
        Some(mut r) => {
            check_existing(&r)?;
            spec::changes::check_reapply(file, &r.spec, &spec)?;
            report.note(&format!(
                "cluster {name:?} exists (id {}, {}); resuming",
                r.id, r.status
            ));
            r.spec = spec.clone();
            r.status = resumed_status(r.status);
            r
        }
        None => {
            let r = ClusterRecord::new(&name, spec.clone())?;
            report.note(&format!("new cluster {name:?} (id {})", r.id));
            r
        }
    };
    if record.node_image.as_ref().map(|p| &p.digest) != Some(&image.digest) {
        if let Some(p) = &record.node_image {
            bail!(
                "the node image {:?} of cluster {name:?} changed while this command waited for the lock (an upgrade ran); run the command again",
                p.version
            );
        }
        record.node_image = Some(crate::state::PinnedImage {
            version: image.version.clone(),
            digest: image.digest.clone(),
        });
    }
    if let Some(u) = &record.upgrade
        && u.from == u.to
    {
        bail!(
            "cluster {name:?} has an unfinished replacement of workers for their pool's new size; run `clusterctl upgrade {name}` to finish it first"
        );
    }
    if let Some(u) = &record.upgrade {
        bail!(
            "cluster {name:?} has an unfinished node-image upgrade ({} -> {}); run `clusterctl upgrade {name}` to finish or roll it back first",
            u.from.version,
            u.to.version
        );
    }
    if let Some(u) = &record.kubernetes_upgrade {
        bail!(
            "cluster {name:?} has an unfinished Kubernetes upgrade ({} -> {}); run `clusterctl upgrade {name} --kubernetes-version {}` to finish it (or `--kubernetes-version {}` to roll it back) first",
            u.from,
            u.to,
            u.to,
            u.from
        );
    }
    // The record, with the cluster ID, is durable before the first side effect.
    guard.save(&mut record)?;

    let (journal, replay) = open_journal(&guard, report)?;
    let journal = Arc::new(Mutex::new(journal));
    let result = reconcile(
        &rt,
        store,
        &guard,
        &mut record,
        spec,
        image,
        artifacts,
        &journal,
        &replay,
        opts,
        report,
    );
    let saved = guard.save(&mut record);
    let finished = journal
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .finish(result.is_ok() && saved.is_ok());
    if let Err(e) = result {
        return Err(e).with_context(|| {
            format!(
                "creating cluster {name:?} stopped; run `clusterctl create -f {}` again to resume (finished steps are not redone)",
                file.display()
            )
        });
    }
    saved?;
    finished?;
    // Machines whose size changed: the control plane resized in place, workers replaced by new
    // machines of the new size by their pool's upgradeSettings (the upgrade engine, under its
    // own lock and journal).
    let resizes = super::upgrade::pending_resizes(&record);
    if resizes > 0 {
        if record.status != ClusterStatus::Running {
            report.note(&format!(
                "{resizes} machine(s) have another size than their spec; they are replaced or resized once the cluster runs Kubernetes (the {} provider boots nothing)",
                record.spec.spec.provider.name()
            ));
            return Ok(record);
        }
        drop(guard);
        let request = super::upgrade::UpgradeRequest {
            drain: crate::kube::drainer::DrainOptions {
                timeout: opts.drain_timeout,
                ..Default::default()
            },
            ..super::upgrade::UpgradeRequest::new(None)
        };
        super::upgrade::upgrade(store, &name, &request, report).with_context(|| {
            format!(
                "replacing or resizing the {resizes} machine(s) of cluster {name:?} whose size changed stopped; `clusterctl upgrade {name}` goes on (or `clusterctl create -f {}` once it is finished)",
                file.display()
            )
        })?;
        if let Some(r) = store.load(&name)? {
            record = r;
        }
    }
    Ok(record)
}

/// Checks (and for `upstream`, downloads) the spec's Kubernetes artifacts, every file's
/// checksum verified; `None` for a provider that boots nothing.
pub fn verify_artifacts(
    rt: &tokio::runtime::Runtime,
    spec: &spec::Cluster,
    file: &Path,
    report: Reporter,
) -> anyhow::Result<Option<Arc<Artifacts>>> {
    let boots = !matches!(spec.spec.provider, spec::Provider::Fake(_));
    // A local bundle is verified with every provider, so a bad one is refused the same way.
    let verify = boots
        || matches!(
            spec.spec.kubernetes.artifacts,
            spec::ArtifactSource::Bundle(_)
        );
    if !verify {
        artifacts::check_spec(spec)
            .with_context(|| format!("checking kubernetes in {}", file.display()))?;
        return Ok(None);
    }
    report.phase("Verifying Kubernetes artifacts");
    let started = std::time::Instant::now();
    let a = rt
        .block_on(artifacts::resolve(spec, &download_dir()?))
        .with_context(|| format!("checking the Kubernetes artifacts of {}", file.display()))?;
    report.note(&format!(
        "Kubernetes {} (etcd {}) from {}: {} binaries and {} image(s) verified in {:.1} s",
        a.version,
        a.etcd_version,
        a.origin,
        a.binaries.len(),
        a.images.len(),
        started.elapsed().as_secs_f64()
    ));
    Ok(boots.then(|| Arc::new(a)))
}

/// Under the cluster lock: provisions what `spec` wants that the provider does not have (and
/// deletes what it no longer wants), then bootstraps Kubernetes on every machine, recording
/// what was observed in `record` (saved by the caller). Idempotent: on a complete cluster it
/// changes nothing.
#[allow(clippy::too_many_arguments)]
pub fn reconcile(
    rt: &tokio::runtime::Runtime,
    store: &StateStore,
    guard: &ClusterGuard,
    record: &mut ClusterRecord,
    spec: spec::Cluster,
    image: providers::ImageRef,
    artifacts: Option<Arc<Artifacts>>,
    journal: &Arc<Mutex<Journal>>,
    replay: &Replay,
    opts: CreateOptions,
    report: Reporter,
) -> anyhow::Result<()> {
    let name = record.name.clone();
    let provider: Arc<dyn providers::Provider> = Arc::from(provider::provider_for(&spec)?);
    // Pool machines are named before anything is made, and the names kept in the record, so a
    // killed run goes on with the same ones.
    super::assign_machine_names(record, &spec, report);
    guard.save(record)?;
    let desired_names = engine::desired_names(&spec, &record.pool_members)?;
    let cluster = record.cluster_ref();
    let labels = spec.metadata.labels.clone().into_iter().collect();
    let (template, ssh) = if matches!(spec.spec.provider, spec::Provider::Fake(_)) {
        // The fake provider boots nothing: no keys, nothing to log in to.
        let template = MachineTemplate {
            image,
            user_data: Arc::new(|m: &engine::DesiredMachine| {
                Ok(format!("#cloud-config\nhostname: {}\n", m.name))
            }),
            labels,
        };
        (template, None)
    } else {
        let identity = rt.block_on(access::client_identity(
            &spec.spec.ssh,
            store,
            &name,
            Some(guard),
        ))?;
        // Host keys are generated (or the stored ones reused) and pinned in the record before
        // any machine that holds them is created.
        let host_keys = access::ensure_host_keys(guard, record, &desired_names)?;
        guard.save(record)?;
        let for_seed = identity.clone();
        let seed_cluster = cluster.clone();
        let template = MachineTemplate {
            image,
            user_data: Arc::new(move |m: &engine::DesiredMachine| {
                let key = host_keys
                    .get(&m.name)
                    .ok_or_else(|| "no host key was prepared for it".to_owned())?;
                access::render_user_data(&seed_cluster, &m.name, &for_seed, key)
                    .map_err(|e| engine::apply::error_chain(&e))
            }),
            labels,
        };
        let ssh = SshAccess {
            identity,
            host_keys: record.ssh_host_keys.clone(),
            timeout: opts.ssh_timeout,
        };
        (template, Some(ssh))
    };

    // A cluster that runs Kubernetes: machines it deletes (a smaller pool) are drained first
    // and their Node objects removed, through the API client.
    let nodes: Option<Arc<dyn engine::apply::NodeRemoval>> = if record.kubernetes.is_some() {
        let api = rt
            .block_on(crate::action::cluster_api(store, record))
            .with_context(|| format!("preparing the API client of cluster {name:?}"))?;
        Some(Arc::new(crate::action::drain::ApiNodeRemoval::new(
            api,
            journal.clone(),
            replay.clone(),
            crate::kube::drainer::DrainOptions {
                timeout: opts.drain_timeout,
                ..Default::default()
            },
            report,
        )))
    } else {
        None
    };
    let mut ctx = ApplyContext {
        env: Env {
            cluster: record.cluster_ref(),
            provider,
            journal: journal.clone(),
            concurrency: CONCURRENCY,
            report,
        },
        desired: spec,
        template,
        interrupted: replay.in_flight(),
        observed: Vec::new(),
        plan: None,
        ssh,
        ssh_ready: Default::default(),
        nodes,
        stale_nodes: Vec::new(),
        members: record.pool_members.clone(),
    };
    let result = rt.block_on(engine::run_phases(
        &mut ctx,
        report,
        &engine::apply::provision_phases(),
    ));

    // Whatever happened, remember what was last observed.
    if ctx.plan.is_some() {
        record.machines = ctx.observed.clone();
        record.observed_at = Some(Timestamp::now());
    }
    let mut result = result.map_err(anyhow::Error::new);
    if result.is_ok() {
        record.status = ClusterStatus::Provisioned;
        // Keys of machines that are gone and not wanted are of no use any more.
        let mut keep = desired_names.clone();
        keep.extend(record.machines.iter().map(|m| m.name.clone()));
        access::prune_host_keys(guard, record, &keep)?;
        guard.save(record)?;
    }
    if result.is_ok()
        && let (Some(artifacts), Some(access)) = (artifacts, ctx.ssh.clone())
    {
        let dns =
            cluster_dns_image(&record.spec, &artifacts).map(|i| (artifacts.version.clone(), i));
        result = bootstrap_kubernetes(rt, &ctx, guard, record, artifacts, access, report);
        if result.is_ok() {
            result = apply_access(rt, store, record, journal, report);
        }
        if result.is_ok() {
            result = apply_cluster_dns(rt, store, record, dns, report);
        }
    }
    result
}

/// The CoreDNS image of the cluster's DNS: with `upstream` artifacts the one that goes with
/// the version (the downloaded bundle carries it, pulled by clusterctl's registry client, so
/// nodes import it and pull nothing); with a bundle, the CoreDNS image the bundle carries
/// (imported on every node with its other images). `Err` says why the
/// cluster gets no DNS: a bundle without a CoreDNS image (the offline test bundle has none:
/// CoreDNS cannot be built or pulled here).
fn cluster_dns_image(spec: &crate::spec::Cluster, artifacts: &Artifacts) -> Result<String, String> {
    match &spec.spec.kubernetes.artifacts {
        crate::spec::ArtifactSource::Upstream => templates::kubernetes::check_version(&artifacts.version)
            .map(|p| p.coredns_image.to_owned())
            .map_err(|e| e.to_string()),
        crate::spec::ArtifactSource::Bundle(b) => artifacts
            .images
            .iter()
            .find(|i| {
                let repo = i.reference.rsplit_once(':').map_or(i.reference.as_str(), |(r, _)| r);
                repo.rsplit('/').next() == Some("coredns")
            })
            .map(|i| i.reference.clone())
            .ok_or_else(|| {
                format!(
                    "the bundle {} carries no CoreDNS image: the cluster has no cluster DNS (Services are reached by address only); add a coredns image to the bundle",
                    b.path.display()
                )
            }),
    }
}

/// Applies cluster DNS (CoreDNS and the kube-dns Service at every kubelet's `clusterDNS`)
/// through the API with server-side apply: a re-run changes nothing that is in step.
fn apply_cluster_dns(
    rt: &tokio::runtime::Runtime,
    store: &StateStore,
    record: &ClusterRecord,
    image: Result<(String, String), String>,
    report: Reporter,
) -> anyhow::Result<()> {
    let (version, image) = match image {
        Ok(v) => v,
        Err(why) => {
            report.note(&format!("no cluster DNS: {why}"));
            return Ok(());
        }
    };
    report.phase("Applying cluster DNS (CoreDNS)");
    let k = &record.spec.spec.kubernetes;
    let ipnet::IpNet::V4(service_cidr) = k.service_cidr else {
        anyhow::bail!(
            "kubernetes.serviceCIDR {} is not IPv4; cluster DNS needs an IPv4 Service network",
            k.service_cidr
        );
    };
    let dns_ip = crate::engine::bootstrap::cluster_dns_ip(service_cidr).ok_or_else(|| {
        anyhow::anyhow!(
            "kubernetes.serviceCIDR {service_cidr} is too small for the cluster DNS address"
        )
    })?;
    let yaml =
        templates::kubernetes::render_cluster_dns(&templates::kubernetes::ClusterDnsInput {
            version,
            cluster_dns: dns_ip,
            cluster_domain: k.cluster_domain.clone(),
            image: Some(image.clone()),
            replicas: if record.machines.len() > 1 { 2 } else { 1 },
        })?;
    rt.block_on(async {
        let api = crate::action::cluster_api(store, record).await?;
        let r = api.apply_manifests(&yaml, false).await;
        api.close().await;
        let applied = r?;
        report.note(&format!(
            "CoreDNS ({image}) at {dns_ip}: {} object(s) applied",
            applied.len()
        ));
        anyhow::Ok(())
    })
}

/// Brings the cluster's RBAC bindings and users' accounts in step with the spec's
/// `access.bindings` (`action::iam`).
fn apply_access(
    rt: &tokio::runtime::Runtime,
    store: &StateStore,
    record: &ClusterRecord,
    journal: &Arc<Mutex<Journal>>,
    report: Reporter,
) -> anyhow::Result<()> {
    report.phase("Applying access bindings");
    // Locked for the whole step, outside the future: nothing else writes the journal while the
    // bindings are applied (bootstrap has finished).
    let mut journal = journal
        .lock()
        .map_err(|_| anyhow::anyhow!("the journal lock is poisoned"))?;
    let journal: &mut Journal = &mut journal;
    rt.block_on(async {
        let api = crate::action::cluster_api(store, record).await?;
        let r =
            crate::action::iam::reconcile(&api, &record.spec.spec.access, journal, report).await;
        api.close().await;
        r.map(drop)
    })
}

/// Where `upstream` artifacts are downloaded and kept: `$XDG_CACHE_HOME/clusterctl/kubernetes`
/// or `~/.cache/clusterctl/kubernetes`.
pub(crate) fn download_dir() -> anyhow::Result<PathBuf> {
    let base = match std::env::var_os("XDG_CACHE_HOME").filter(|v| !v.is_empty()) {
        Some(dir) => PathBuf::from(dir),
        None => {
            let home = std::env::var_os("HOME")
                .filter(|v| !v.is_empty())
                .ok_or_else(|| anyhow::anyhow!("neither XDG_CACHE_HOME nor HOME is set; set one so clusterctl can keep downloaded Kubernetes releases"))?;
            PathBuf::from(home).join(".cache")
        }
    };
    Ok(base.join("clusterctl").join("kubernetes"))
}

/// Runs the bootstrap phases on the provisioned machines and records the outcome.
fn bootstrap_kubernetes(
    rt: &tokio::runtime::Runtime,
    ctx: &ApplyContext,
    guard: &ClusterGuard,
    record: &mut ClusterRecord,
    artifacts: Arc<Artifacts>,
    access: SshAccess,
    report: Reporter,
) -> anyhow::Result<()> {
    let machines = bootstrap::boot_machines(&ctx.desired, &ctx.members, &ctx.observed)?;
    let pins: Vec<(crate::ssh::Endpoint, String)> = machines
        .iter()
        .filter_map(|m| {
            access.host_keys.get(&m.name).map(|k| {
                (
                    crate::ssh::Endpoint::new(m.ip.to_string(), access::SSH_PORT),
                    k.clone(),
                )
            })
        })
        .collect();
    let retry = crate::ssh::RetryPolicy::for_up_to(std::time::Duration::from_secs(60));
    let client = access::pinned_client(&access.identity, &pins, retry)?;
    let mut bctx = BootstrapContext::new(
        report,
        CONCURRENCY,
        ctx.desired.clone(),
        artifacts,
        machines,
        guard.dir().join(crate::kubeconfig::PKI_DIR),
        record.pod_cidr_indexes.clone(),
        client,
        access.identity.user.clone(),
    );
    let result = rt.block_on(engine::run_phases(
        &mut bctx,
        report,
        &bootstrap::bootstrap_phases(),
    ));
    record.pod_cidr_indexes = bctx.pod_cidr_indexes.clone();
    if let Some(status) = bctx.status.take() {
        record.kubernetes = Some(status);
    }
    result?;
    record.status = ClusterStatus::Running;
    Ok(())
}

/// Runs the bootstrap with `spec` and `artifacts` on the machines of `record` as last observed,
/// installing and (re)starting on the machines in `only` and nowhere else: every node's files
/// are still rendered from the whole cluster, so the others are not touched. What a Kubernetes
/// version upgrade does to one node at a time; it does not wait for the nodes (the caller's
/// health gate does).
pub async fn bootstrap_nodes(
    store: &StateStore,
    guard: &ClusterGuard,
    record: &mut ClusterRecord,
    spec: &spec::Cluster,
    artifacts: Arc<Artifacts>,
    only: std::collections::BTreeSet<String>,
    report: Reporter,
) -> anyhow::Result<()> {
    let identity =
        access::client_identity(&spec.spec.ssh, store, &record.name, Some(guard)).await?;
    let machines = bootstrap::boot_machines(spec, &record.pool_members, &record.machines)?;
    let pins: Vec<(crate::ssh::Endpoint, String)> = machines
        .iter()
        .filter_map(|m| {
            record.ssh_host_keys.get(&m.name).map(|k| {
                (
                    crate::ssh::Endpoint::new(m.ip.to_string(), access::SSH_PORT),
                    k.clone(),
                )
            })
        })
        .collect();
    let retry = crate::ssh::RetryPolicy::for_up_to(std::time::Duration::from_secs(60));
    let client = access::pinned_client(&identity, &pins, retry)?;
    let mut bctx = BootstrapContext::new(
        report,
        CONCURRENCY,
        spec.clone(),
        artifacts,
        machines,
        guard.dir().join(crate::kubeconfig::PKI_DIR),
        record.pod_cidr_indexes.clone(),
        client,
        identity.user.clone(),
    );
    bctx.only = Some(only);
    let result = engine::run_phases(&mut bctx, report, &bootstrap::install_phases()).await;
    record.pod_cidr_indexes = bctx.pod_cidr_indexes.clone();
    result?;
    Ok(())
}

/// The status of an existing cluster while `create` runs on it again: a cluster that ran stays
/// known as one, so a failed re-run leaves it `reconciling`, not `creating`.
fn resumed_status(previous: ClusterStatus) -> ClusterStatus {
    match previous {
        ClusterStatus::Running | ClusterStatus::Reconciling => ClusterStatus::Reconciling,
        _ => ClusterStatus::Creating,
    }
}

#[cfg(test)]
mod status_tests {
    use super::*;

    #[test]
    fn a_rerun_on_a_running_cluster_reconciles_and_anything_else_creates() {
        use ClusterStatus::{Creating, Provisioned, Reconciling, Running};
        for (before, during) in [
            (Running, Reconciling),
            (Reconciling, Reconciling),
            (Creating, Creating),
            (Provisioned, Creating),
        ] {
            assert_eq!(resumed_status(before), during, "after {before}");
        }
    }
}
