//! `clusterctl create -f FILE [--wait]`: provisions the cluster's machines and bootstraps
//! Kubernetes (`action::create`), then writes the kubeconfig context and prints the outcome.

use std::path::PathBuf;

use anyhow::Context as _;

use super::Global;
use crate::action::create::CreateOptions;
use crate::engine::access;
use crate::state::{ClusterStatus, StateStore};

pub(crate) use crate::action::create::load_spec;

/// Arguments of `clusterctl create`.
#[derive(Debug, clap::Args)]
pub struct CreateArgs {
    /// The cluster spec (cluster.yaml).
    #[arg(short = 'f', long = "file", value_name = "FILE")]
    pub file: PathBuf,
    /// If another command holds the cluster's lock, wait for it instead of failing.
    #[arg(long)]
    pub wait: bool,
    /// Seconds each machine may take to answer SSH after it was started.
    #[arg(long, value_name = "SECONDS", default_value_t = access::DEFAULT_SSH_TIMEOUT.as_secs())]
    pub ssh_timeout: u64,
    /// When the spec has fewer workers than the running cluster: seconds each node being
    /// removed may take to drain (PodDisruptionBudgets honoured) before `create` stops with a
    /// report and the node uncordoned (default: one hour, as GKE).
    #[arg(long, value_name = "SECONDS", default_value_t = crate::action::drain::DEFAULT_TIMEOUT.as_secs())]
    pub drain_timeout: u64,
}

/// Runs `clusterctl create`.
pub fn run(global: &Global, args: &CreateArgs) -> anyhow::Result<()> {
    let report = crate::output::reporter(global.quiet, global.output);
    let store = StateStore::resolve(global.state_dir.as_deref())?;
    let opts = CreateOptions {
        wait_lock: args.wait,
        ssh_timeout: std::time::Duration::from_secs(args.ssh_timeout),
        drain_timeout: std::time::Duration::from_secs(args.drain_timeout),
    };
    let record = crate::action::create::create(&store, &args.file, opts, report)?;
    let name = record.name.as_str();
    if record.status == ClusterStatus::Running {
        // Like `gcloud container clusters create`: kubectl is configured for the new cluster.
        let path = crate::kubeconfig::default_path()?;
        let outcome = crate::kubeconfig::write_admin_context(&store, &record, &path)
            .with_context(|| format!("writing the kubeconfig entry of cluster {name:?}; `clusterctl get-credentials {name}` tries again"))?;
        if !global.quiet {
            eprintln!("{outcome}");
        }
    }
    if global.output != crate::output::Format::Table {
        crate::output::print(&crate::output::to_string(global.output, &record)?)?;
    }
    if !global.quiet {
        match &record.kubernetes {
            Some(k) if record.status == ClusterStatus::Running => {
                let ready = k.nodes.iter().filter(|n| n.ready).count();
                eprintln!(
                    "Cluster {name:?} is running: Kubernetes {}, {ready}/{} node(s) Ready, API server {}.",
                    k.version,
                    k.nodes.len(),
                    k.api_server
                );
            }
            _ => {
                eprintln!(
                    "Cluster {name:?}: {} machine(s) provisioned through the {} provider.",
                    record.machines.len(),
                    record.spec.spec.provider.name()
                );
                eprintln!(
                    "Kubernetes is NOT installed: the fake provider boots no machines, so there is nothing to bootstrap."
                );
            }
        }
    }
    Ok(())
}
