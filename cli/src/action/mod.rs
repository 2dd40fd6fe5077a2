//! Actions: one module per command that changes a cluster. An action takes the cluster lock,
//! opens the journal, runs its steps through the engine and the API client, and reports through
//! a [`Reporter`]; `cmd/` only parses arguments and prints results.

pub mod autoupgrade;
pub mod create;
pub mod delete;
pub mod drain;
pub mod iam;
pub mod kubeupgrade;
pub mod load;
pub mod repair;
pub mod reset;
pub mod snapshot;
pub mod upgrade;

use std::time::Duration;

use anyhow::{Context as _, anyhow, bail};

use crate::engine::Reporter;
use crate::engine::access;
use crate::kube::{API_SERVER_PORT, Credentials, KubeClient};
use crate::ssh::{Endpoint, RetryPolicy, Target};
use crate::state::{ClusterGuard, ClusterRecord, LockHolder, Replay, StateStore, WaitMode};
use providers::MachineRole;

/// Takes the cluster lock, telling the user when it has to wait.
pub fn lock_cluster(
    store: &StateStore,
    name: &str,
    wait: bool,
    report: Reporter,
) -> anyhow::Result<ClusterGuard> {
    let mode = if wait {
        WaitMode::Wait
    } else {
        WaitMode::FailFast
    };
    let guard = store.lock(name, mode, &mut |holder: Option<&LockHolder>| {
        let who = match holder {
            Some(h) => format!("pid {} ({}) since {}", h.pid, h.command, h.since),
            None => "another process".to_owned(),
        };
        report.note(&format!("cluster {name:?} is locked by {who}; waiting"));
    })?;
    Ok(guard)
}

/// Opens the journal for an action (not `create`/`delete`, whose engine re-checks in-flight
/// operations against the provider), reports what an interrupted earlier run left in flight, and
/// records it as interrupted: every action's steps are idempotent and re-observe the cluster.
pub fn open_action_journal(
    guard: &ClusterGuard,
    report: Reporter,
) -> anyhow::Result<(crate::state::Journal, Replay)> {
    let (mut journal, replay) = open_journal(guard, report)?;
    for found in replay.in_flight() {
        report.note(&format!(
            "an earlier run was interrupted while it was doing {} {}; going on from where the cluster is",
            found.action, found.target
        ));
        journal.interrupted(&found)?;
    }
    Ok((journal, replay))
}

/// Opens the journal for this run and reports a torn record left by a crash.
pub fn open_journal(
    guard: &ClusterGuard,
    report: Reporter,
) -> anyhow::Result<(crate::state::Journal, Replay)> {
    let command = LockHolder::current().command;
    let (journal, replay) = guard.open_journal(&command)?;
    if let Some(t) = &replay.torn_tail {
        report.note(&format!(
            "journal {} ended in a record torn by a crash (line {}, {} bytes); dropped it",
            journal.path().display(),
            t.line,
            t.bytes
        ));
    }
    Ok((journal, replay))
}

/// A tokio runtime for the engine: provider calls run on its blocking pool.
pub fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("cannot start the async runtime")
}

/// Loads a cluster's record, or says how to find the known clusters.
pub fn load_cluster(store: &StateStore, name: &str) -> anyhow::Result<ClusterRecord> {
    store.load(name)?.ok_or_else(|| {
        anyhow!(
            "cluster {name:?} not found in {}; `clusterctl get` lists the known clusters",
            store.root().display()
        )
    })
}

/// Where a machine of the cluster answers SSH, and its pinned host key (from the state).
pub fn pinned_endpoint(
    record: &ClusterRecord,
    machine: &providers::Machine,
) -> anyhow::Result<(Endpoint, String)> {
    let Some(key) = record.ssh_host_keys.get(&machine.name) else {
        bail!(
            "no ssh host key is pinned for machine {:?} in the cluster state, so its identity cannot be verified; run `clusterctl create` for the cluster again",
            machine.name
        );
    };
    let Some(addr) = access::ssh_address(machine) else {
        bail!(
            "machine {:?} has no known address yet; run `clusterctl create` for the cluster again",
            machine.name
        );
    };
    Ok((
        Endpoint::new(addr.to_string(), access::SSH_PORT),
        key.clone(),
    ))
}

/// Runs `command` on a machine over one pinned SSH connection (host key from the state) as
/// `identity`, retrying the connection for up to `retry`, and closes it.
pub async fn run_pinned(
    identity: &access::ClientIdentity,
    (endpoint, key): (Endpoint, String),
    retry: Duration,
    command: &str,
) -> anyhow::Result<crate::ssh::ExecOutput> {
    let session = connect_pinned(identity, (endpoint, key), retry).await?;
    let out = session.exec(command).await;
    session.close().await;
    Ok(out?)
}

/// One SSH session to a machine (host key pinned from the state) as `identity`, the
/// connection retried for up to `retry`.
pub async fn connect_pinned(
    identity: &access::ClientIdentity,
    (endpoint, key): (Endpoint, String),
    retry: Duration,
) -> anyhow::Result<crate::ssh::Session> {
    let client = access::pinned_client(
        identity,
        &[(endpoint.clone(), key)],
        RetryPolicy::for_up_to(retry),
    )?;
    let target = Target::new(endpoint.host.clone(), endpoint.port, identity.user.clone());
    Ok(client.connect(&target).await?)
}

/// A new name for a machine of `pool` that replaces another (a repair, a surge upgrade): unused
/// by any pool member, retired name, pinned host key or observed machine of `record`.
pub fn new_pool_machine_name(record: &ClusterRecord, pool: &str) -> anyhow::Result<String> {
    let mut also: std::collections::BTreeSet<String> =
        record.ssh_host_keys.keys().cloned().collect();
    also.extend(record.machines.iter().map(|m| m.name.clone()));
    crate::engine::names::fresh_name(
        &record.name,
        pool,
        &record.pool_members,
        &record.retired_machine_names,
        &also,
        &mut crate::engine::names::random_suffix,
    )
    .ok_or_else(|| anyhow!("no free machine name found for node pool {pool}"))
}

/// Gives the spec's node pools their machine names in `record` (kept ones stay, new ones are
/// random, dropped ones retired) and reports what changed. The caller saves the record before
/// any machine is made.
pub fn assign_machine_names(
    record: &mut ClusterRecord,
    spec: &crate::spec::Cluster,
    report: Reporter,
) {
    use crate::engine::names;
    let host_keys: std::collections::BTreeSet<String> =
        record.ssh_host_keys.keys().cloned().collect();
    let surge = record.surge_machines();
    let known = names::Known {
        machines: &record.machines,
        host_keys: &host_keys,
        surge: &surge,
    };
    let got = names::assign(
        spec,
        &mut record.pool_members,
        &mut record.retired_machine_names,
        &known,
        &mut names::random_suffix,
    );
    for pool in &got.adopted {
        report.note(&format!(
            "node pool {pool}: keeps its machines' names from before names were random; new machines get random names"
        ));
    }
    for (pool, name) in &got.added {
        report.machine(name, &format!("named for node pool {pool}"));
    }
}

/// The cluster's first control-plane machine (by name), which the API client and the audit log
/// are reached through.
pub fn first_control_plane(record: &ClusterRecord) -> anyhow::Result<&providers::Machine> {
    record
        .machines
        .iter()
        .filter(|m| m.role == MachineRole::ControlPlane)
        .min_by(|a, b| a.name.cmp(&b.name))
        .ok_or_else(|| {
            anyhow!(
                "cluster {:?} has no control-plane machine in its state; run `clusterctl create` for it first",
                record.name
            )
        })
}

/// An API client for the cluster: through SSH to its first control-plane machine (host key
/// pinned from the state), to the API server on that machine's loopback, as the cluster admin.
pub async fn cluster_api(store: &StateStore, record: &ClusterRecord) -> anyhow::Result<KubeClient> {
    let name = record.name.as_str();
    let cp = first_control_plane(record)?;
    let (endpoint, key) = pinned_endpoint(record, cp)?;
    let identity = access::client_identity(&record.spec.spec.ssh, store, name, None).await?;
    let client = access::pinned_client(
        &identity,
        &[(endpoint.clone(), key)],
        RetryPolicy::for_up_to(Duration::from_secs(30)),
    )?;
    let target = Target::new(endpoint.host.clone(), endpoint.port, identity.user.clone());
    let credentials =
        Credentials::from_pki_dir(&store.cluster_dir(name)?.join(crate::kubeconfig::PKI_DIR))?;
    Ok(KubeClient::new(
        client,
        target,
        Endpoint::new("127.0.0.1", API_SERVER_PORT),
        &credentials,
    )?)
}

/// How often [`wait_for_node`] asks.
const NODE_POLL: Duration = Duration::from_secs(3);

/// The node's state through a fresh API client (the control plane may be the machine that just
/// rebooted, so no connection is kept), after `/readyz` answered ok; `None` if not registered.
pub async fn node_state(
    store: &StateStore,
    record: &ClusterRecord,
    node: &str,
) -> anyhow::Result<Option<crate::kube::NodeState>> {
    let api = cluster_api(store, record).await?;
    let result = tokio::time::timeout(Duration::from_secs(30), async {
        api.readyz().await?;
        api.list_nodes().await
    })
    .await;
    api.close().await;
    let nodes = result.context("the API did not answer within 30 s")??;
    Ok(nodes.into_iter().find(|n| n.name == node))
}

/// Waits until `/readyz` is ok and `node` is Ready with a boot ID other than `not_boot_id` (the
/// one it had before a reboot; `None`: any). Returns the node and how long it took; the error
/// says what was last seen.
pub async fn wait_for_node(
    store: &StateStore,
    record: &ClusterRecord,
    node: &str,
    not_boot_id: Option<&str>,
    timeout: Duration,
) -> anyhow::Result<(crate::kube::NodeState, Duration)> {
    let what = if not_boot_id.is_some() {
        "Ready with a new boot id"
    } else {
        "Ready"
    };
    wait_for_node_where(store, record, node, what, timeout, |n| {
        n.ready && Some(n.boot_id.as_str()) != not_boot_id
    })
    .await
}

/// Waits until `/readyz` is ok and `node` satisfies `ok` (`what` says what, for the error).
/// Returns the node and how long it took; the error says what was last seen.
pub async fn wait_for_node_where(
    store: &StateStore,
    record: &ClusterRecord,
    node: &str,
    what: &str,
    timeout: Duration,
    ok: impl Fn(&crate::kube::NodeState) -> bool,
) -> anyhow::Result<(crate::kube::NodeState, Duration)> {
    let started = std::time::Instant::now();
    loop {
        let last = match node_state(store, record, node).await {
            Ok(Some(n)) if ok(&n) => return Ok((n, started.elapsed())),
            Ok(Some(n)) => format!(
                "node {node} {} with boot id {}, kubelet {}",
                if n.ready { "Ready" } else { "NotReady" },
                n.boot_id,
                n.kubelet_version
            ),
            Ok(None) => format!("node {node} is not registered"),
            Err(e) => format!(
                "the API did not answer: {}",
                crate::error::error_chain(e.as_ref())
            ),
        };
        if started.elapsed() >= timeout {
            bail!(
                "node {node} was not {what} within {} s (last: {last})",
                timeout.as_secs()
            );
        }
        tokio::time::sleep(NODE_POLL).await;
    }
}
