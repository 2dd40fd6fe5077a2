//! `clusterctl get [NAME]`: the known clusters, or one cluster and its machines, from the state
//! store (machines as last observed by a mutating command). Reads without taking the lock.

use std::fmt::Write as _;

use providers::Machine;
use serde::Serialize;

use super::Global;
use crate::engine::plan::{role_word, state_word};
use crate::output::{self, Format};
use crate::spec;
use crate::state::{ClusterRecord, KubernetesStatus, StateStore, Timestamp};

/// Arguments of `clusterctl get`.
#[derive(Debug, clap::Args)]
pub struct GetArgs {
    /// Show only this cluster, with its machines.
    pub name: Option<String>,
}

/// A cluster as `get` shows it. `-o json|yaml` prints it in camelCase, like the spec and
/// kubectl: a documented, stable interface (the state file keeps its own field names).
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct ClusterView {
    name: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    id: Option<String>,
    status: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    provider: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    created_at: Option<Timestamp>,
    #[serde(skip_serializing_if = "Option::is_none")]
    updated_at: Option<Timestamp>,
    #[serde(skip_serializing_if = "Option::is_none")]
    observed_at: Option<Timestamp>,
    #[serde(serialize_with = "machines_camel")]
    machines: Vec<Machine>,
    /// Pinned SSH host key per machine.
    #[serde(skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    ssh_host_keys: std::collections::BTreeMap<String, String>,
    /// Kubernetes as last checked by `create`.
    #[serde(
        skip_serializing_if = "Option::is_none",
        serialize_with = "kubernetes_camel"
    )]
    kubernetes: Option<KubernetesStatus>,
    /// The node image every machine boots (pinned at create, changed by `upgrade`).
    #[serde(skip_serializing_if = "Option::is_none")]
    node_image: Option<crate::state::PinnedImage>,
    /// An unfinished node-image upgrade.
    #[serde(skip_serializing_if = "Option::is_none")]
    upgrade: Option<UpgradeDoc>,
    /// Auto-repair: the last pass and the repair history (newest last).
    #[serde(skip_serializing_if = "crate::state::RepairState::is_empty")]
    repair: crate::state::RepairState,
    /// Auto-upgrade: the last automatic run and when the last upgrade finished.
    #[serde(skip_serializing_if = "crate::state::AutoUpgradeState::is_empty")]
    auto_upgrade: crate::state::AutoUpgradeState,
    /// etcd snapshots kept in the state (oldest first).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    etcd_snapshots: Vec<crate::etcd::Snapshot>,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    spec: Option<spec::Cluster>,
    /// The spec, for the node-pool table (not serialized: `spec` is, in JSON and YAML).
    #[serde(skip)]
    spec_for_pools: Option<spec::Cluster>,
}

impl ClusterView {
    fn from_record(r: ClusterRecord, with_spec: bool) -> Self {
        ClusterView {
            provider: Some(r.spec.spec.provider.name()),
            name: r.name,
            id: Some(r.id),
            status: r.status.to_string(),
            created_at: Some(r.created_at),
            updated_at: Some(r.updated_at),
            observed_at: r.observed_at,
            machines: r.machines,
            ssh_host_keys: r.ssh_host_keys,
            kubernetes: r.kubernetes,
            node_image: r.node_image,
            upgrade: r.upgrade.map(|u| UpgradeDoc {
                from: u.from,
                to: u.to,
                started_at: u.started_at,
                stopped: u.stopped,
                automatic: u.automatic,
                snapshot: u.snapshot,
            }),
            repair: r.repair,
            auto_upgrade: r.auto_upgrade,
            etcd_snapshots: r.etcd_snapshots,
            error: None,
            spec_for_pools: Some(r.spec.clone()),
            spec: with_spec.then_some(r.spec),
        }
    }

    fn broken(name: String, status: &str, error: String) -> Self {
        ClusterView {
            name,
            id: None,
            status: status.to_owned(),
            provider: None,
            created_at: None,
            updated_at: None,
            observed_at: None,
            machines: Vec::new(),
            ssh_host_keys: Default::default(),
            kubernetes: None,
            node_image: None,
            upgrade: None,
            repair: Default::default(),
            auto_upgrade: Default::default(),
            etcd_snapshots: Vec::new(),
            error: Some(error),
            spec: None,
            spec_for_pools: None,
        }
    }
}

/// A machine in `-o json|yaml` (camelCase).
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct MachineDoc<'a> {
    name: &'a str,
    provider_id: &'a str,
    role: &'a providers::MachineRole,
    #[serde(skip_serializing_if = "Option::is_none")]
    pool: &'a Option<String>,
    state: &'a providers::MachineState,
    addresses: &'a [providers::MachineAddress],
    #[serde(skip_serializing_if = "Option::is_none")]
    failure_domain: &'a Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    image_digest: &'a Option<String>,
    #[serde(skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    labels: &'a std::collections::BTreeMap<String, String>,
}

fn machines_camel<S: serde::Serializer>(ms: &[Machine], s: S) -> Result<S::Ok, S::Error> {
    s.collect_seq(ms.iter().map(|m| MachineDoc {
        name: &m.name,
        provider_id: &m.provider_id,
        role: &m.role,
        pool: &m.pool,
        state: &m.state,
        addresses: &m.addresses,
        failure_domain: &m.failure_domain,
        image_digest: &m.image_digest,
        labels: &m.labels,
    }))
}

/// An unfinished upgrade in `-o json|yaml` (camelCase).
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct UpgradeDoc {
    from: crate::state::PinnedImage,
    to: crate::state::PinnedImage,
    started_at: Timestamp,
    #[serde(skip_serializing_if = "Option::is_none")]
    stopped: Option<String>,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    automatic: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    snapshot: Option<String>,
}

/// Kubernetes in `-o json|yaml` (camelCase).
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct KubernetesDoc<'a> {
    version: &'a str,
    api_server: &'a str,
    nodes: Vec<NodeDoc<'a>>,
    checked_at: &'a Timestamp,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct NodeDoc<'a> {
    name: &'a str,
    ready: bool,
    kubelet_version: &'a str,
}

fn kubernetes_camel<S: serde::Serializer>(
    k: &Option<KubernetesStatus>,
    s: S,
) -> Result<S::Ok, S::Error> {
    match k {
        None => s.serialize_none(),
        Some(k) => s.serialize_some(&KubernetesDoc {
            version: &k.version,
            api_server: &k.api_server,
            nodes: k
                .nodes
                .iter()
                .map(|n| NodeDoc {
                    name: &n.name,
                    ready: n.ready,
                    kubelet_version: &n.kubelet_version,
                })
                .collect(),
            checked_at: &k.checked_at,
        }),
    }
}

fn opt<T: ToString>(v: &Option<T>) -> String {
    v.as_ref()
        .map_or_else(|| "-".to_owned(), ToString::to_string)
}

fn machines_table(ms: &[Machine], k8s: Option<&KubernetesStatus>) -> String {
    let rows: Vec<Vec<String>> = ms
        .iter()
        .map(|m| {
            let addrs: Vec<String> = m.addresses.iter().map(ToString::to_string).collect();
            let node = k8s.and_then(|k| k.nodes.iter().find(|n| n.name == m.name));
            vec![
                m.name.clone(),
                role_word(m.role).to_owned(),
                m.pool.clone().unwrap_or_else(|| "-".into()),
                state_word(m.state).to_owned(),
                if addrs.is_empty() {
                    "-".into()
                } else {
                    addrs.join(",")
                },
                node.map_or_else(
                    || "-".to_owned(),
                    |n| if n.ready { "Ready" } else { "NotReady" }.to_owned(),
                ),
                node.map_or_else(|| "-".to_owned(), |n| n.kubelet_version.clone()),
                m.provider_id.clone(),
            ]
        })
        .collect();
    output::table(
        &[
            "MACHINE",
            "ROLE",
            "POOL",
            "STATE",
            "ADDRESSES",
            "NODE",
            "VERSION",
            "PROVIDER-ID",
        ],
        &rows,
    )
}

/// The control plane and node pools: size, wanted count and machines that exist.
fn pools_table(spec: &spec::Cluster, ms: &[Machine]) -> String {
    let size = |m: &spec::MachineSize| format!("{} CPU, {}", m.cpus, m.memory);
    let cp = &spec.spec.control_plane;
    let mut rows = vec![vec![
        "(control plane)".to_owned(),
        size(&cp.machine),
        cp.count.to_string(),
        ms.iter()
            .filter(|m| m.role == providers::MachineRole::ControlPlane)
            .count()
            .to_string(),
    ]];
    for p in &spec.spec.node_pools {
        rows.push(vec![
            p.name.clone(),
            size(&p.machine),
            p.count.to_string(),
            ms.iter()
                .filter(|m| m.pool.as_deref() == Some(p.name.as_str()))
                .count()
                .to_string(),
        ]);
    }
    // No AUTOSCALING column: nothing implements autoscaling (the spec refuses it).
    output::table(&["POOL", "MACHINE", "WANTED", "MACHINES"], &rows)
}

/// Runs `clusterctl get`.
pub fn run(global: &Global, args: &GetArgs) -> anyhow::Result<()> {
    let store = StateStore::resolve(global.state_dir.as_deref())?;
    if let Some(name) = &args.name {
        let record = store.load(name)?.ok_or_else(|| {
            anyhow::anyhow!(
                "cluster {name:?} not found in {}; `clusterctl get` lists the known clusters",
                store.root().display()
            )
        })?;
        let view = ClusterView::from_record(record, global.output != Format::Table);
        if global.output != Format::Table {
            output::print(&output::to_string(global.output, &view)?)?;
            return Ok(());
        }
        let mut out = String::new();
        writeln!(out, "Cluster:   {}", view.name)?;
        writeln!(out, "ID:        {}", opt(&view.id))?;
        writeln!(out, "Status:    {}", view.status)?;
        writeln!(out, "Provider:  {}", opt(&view.provider))?;
        writeln!(out, "Created:   {}", opt(&view.created_at))?;
        writeln!(out, "Updated:   {}", opt(&view.updated_at))?;
        writeln!(out, "Observed:  {}", opt(&view.observed_at))?;
        match &view.kubernetes {
            Some(k) => {
                let ready = k.nodes.iter().filter(|n| n.ready).count();
                writeln!(
                    out,
                    "Kubernetes: {} (API server {})",
                    k.version, k.api_server
                )?;
                writeln!(
                    out,
                    "Nodes:     {ready}/{} Ready (checked {})",
                    k.nodes.len(),
                    k.checked_at
                )?;
            }
            None => writeln!(out, "Kubernetes: not bootstrapped")?,
        }
        if let Some(i) = &view.node_image {
            writeln!(out, "Image:     {}", i.version)?;
        }
        if let Some(u) = &view.upgrade {
            writeln!(
                out,
                "Upgrade:   {} -> {} unfinished (since {}){}; `clusterctl upgrade {}` finishes it",
                u.from.version,
                u.to.version,
                u.started_at,
                u.stopped
                    .as_ref()
                    .map(|s| format!(", stopped: {s}"))
                    .unwrap_or_default(),
                view.name
            )?;
        }
        if let Some(last) = view.etcd_snapshots.last() {
            writeln!(
                out,
                "Snapshots: {} of etcd kept; the last {} ({}, revision {}); `clusterctl snapshot {} --list`",
                view.etcd_snapshots.len(),
                last.taken_at,
                last.reason,
                last.revision,
                view.name
            )?;
        }
        if let Some(spec) = &view.spec_for_pools {
            writeln!(out, "Auto-repair: {}", auto_repair_line(spec, &view.repair))?;
            writeln!(
                out,
                "Auto-upgrade: {}{}",
                if spec.spec.auto_upgrade.enabled {
                    "enabled"
                } else {
                    "disabled"
                },
                view.auto_upgrade
                    .last_run
                    .as_ref()
                    .map(|r| format!("; last run {}: {}", r.at, r.summary))
                    .unwrap_or_default()
            )?;
            writeln!(out)?;
            out.push_str(&pools_table(spec, &view.machines));
        }
        writeln!(out)?;
        out.push_str(&machines_table(&view.machines, view.kubernetes.as_ref()));
        if !view.repair.history.is_empty() {
            writeln!(out)?;
            writeln!(
                out,
                "Repairs (last 10; `clusterctl operations {}` lists all):",
                view.name
            )?;
            out.push_str(&repairs_table(&view.repair.history, 10));
        }
        output::print(&out)?;
        return Ok(());
    }

    let mut views = Vec::new();
    for name in store.names()? {
        // One damaged cluster must not hide the others: show it with its error.
        match store.load(&name) {
            Ok(Some(r)) => views.push(ClusterView::from_record(r, false)),
            Ok(None) => views.push(ClusterView::broken(
                name,
                "no-record",
                "no state record (nothing was provisioned)".into(),
            )),
            Err(e) => views.push(ClusterView::broken(name, "error", format!("{e:#}"))),
        }
    }
    if global.output != Format::Table {
        output::print(&output::to_string(global.output, &views)?)?;
        return Ok(());
    }
    let rows: Vec<Vec<String>> = views
        .iter()
        .map(|v| {
            vec![
                v.name.clone(),
                v.status.clone(),
                opt(&v.provider),
                v.machines.len().to_string(),
                v.kubernetes
                    .as_ref()
                    .map_or_else(|| "-".to_owned(), |k| k.version.clone()),
                v.kubernetes.as_ref().map_or_else(
                    || "-".to_owned(),
                    |k| {
                        format!(
                            "{}/{}",
                            k.nodes.iter().filter(|n| n.ready).count(),
                            k.nodes.len()
                        )
                    },
                ),
                opt(&v.created_at),
                opt(&v.id),
            ]
        })
        .collect();
    output::print(&output::table(
        &[
            "NAME", "STATUS", "PROVIDER", "MACHINES", "VERSION", "READY", "CREATED", "ID",
        ],
        &rows,
    ))?;
    for v in &views {
        if let Some(e) = &v.error {
            eprintln!("warning: cluster {:?}: {e}", v.name);
        }
    }
    Ok(())
}

/// `enabled`/`disabled` with the last pass, for describe.
fn auto_repair_line(spec: &spec::Cluster, r: &crate::state::RepairState) -> String {
    let on = if spec.spec.auto_repair.enabled {
        "enabled"
    } else {
        "disabled"
    };
    match &r.last_pass {
        Some(p) => format!("{on}; last pass {}", p.summary()),
        None => format!("{on}; no pass yet"),
    }
}

/// The newest `last` repairs as a table, oldest of them first.
pub(crate) fn repairs_table(history: &[crate::state::RepairRecord], last: usize) -> String {
    let rows: Vec<Vec<String>> = history
        .iter()
        .skip(history.len().saturating_sub(last))
        .map(|r| {
            vec![
                r.started_at.to_string(),
                r.node.clone(),
                match (&r.replaced_by, r.units.is_empty()) {
                    (Some(new), _) => format!("{} by {new}", r.action),
                    (None, true) => r.action.to_string(),
                    (None, false) => format!("{} {}", r.action, r.units.join(",")),
                },
                r.outcome.to_string(),
                r.healed_after_secs
                    .map_or_else(|| "-".to_owned(), |s| format!("{s}s")),
                r.reason.clone(),
                r.detail.clone().unwrap_or_default(),
            ]
        })
        .collect();
    output::table(
        &[
            "STARTED", "NODE", "ACTION", "OUTCOME", "HEALED", "SEEN", "DETAIL",
        ],
        &rows,
    )
}
