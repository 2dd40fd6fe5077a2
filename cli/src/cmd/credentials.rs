//! `clusterctl get-credentials NAME [--kubeconfig PATH]`: merges the cluster's admin context into
//! the user's kubeconfig and makes it current, like `gcloud container clusters get-credentials`.
//! Reads the cluster's state without taking its lock (state files are replaced atomically).

use anyhow::bail;

use super::Global;
use crate::kubeconfig;
use crate::state::{ClusterStatus, StateStore};

/// Arguments of `clusterctl get-credentials`.
#[derive(Debug, clap::Args)]
pub struct GetCredentialsArgs {
    /// Name of the cluster.
    pub name: String,
    /// Kubeconfig to merge the context into (default: the first entry of $KUBECONFIG, else
    /// ~/.kube/config).
    #[arg(long, value_name = "PATH")]
    pub kubeconfig: Option<std::path::PathBuf>,
}

/// Runs `clusterctl get-credentials`.
pub fn run(global: &Global, args: &GetCredentialsArgs) -> anyhow::Result<()> {
    let name = args.name.as_str();
    let store = StateStore::resolve(global.state_dir.as_deref())?;
    let Some(record) = store.load(name)? else {
        bail!(
            "cluster {name:?} not found in {}; `clusterctl get` lists the known clusters",
            store.root().display()
        );
    };
    if record.status == ClusterStatus::Deleting {
        bail!(
            "cluster {name:?} is being deleted; run `clusterctl delete {name}` to finish, there are no credentials to get"
        );
    }
    let path = match &args.kubeconfig {
        Some(p) => p.clone(),
        None => kubeconfig::default_path()?,
    };
    let outcome = kubeconfig::write_admin_context(&store, &record, &path)?;
    if !global.quiet {
        eprintln!("{outcome}");
    }
    Ok(())
}

/// After `clusterctl delete NAME` removed the cluster: takes its context, cluster and user out of
/// the default kubeconfig. Failure is only a warning, since the cluster is gone already; the
/// warning says how to remove the entries by hand.
pub fn forget_context(name: &str, quiet: bool) {
    let result = kubeconfig::default_path()
        .and_then(|path| kubeconfig::remove(&path, name).map(|changed| (path, changed)));
    let (context, cluster, user) = kubeconfig::names_for(name);
    match result {
        Ok((path, true)) => {
            if !quiet {
                eprintln!(
                    "Removed kubeconfig context {context:?} from {}.",
                    path.display()
                );
            }
        }
        Ok((_, false)) => {}
        Err(e) => eprintln!(
            "warning: cannot remove the kubeconfig entries of cluster {name:?}: {:#}; remove them with `kubectl config delete-context {context}`, `kubectl config delete-cluster {cluster}` and `kubectl config delete-user {user}`",
            anyhow::Error::new(e)
        ),
    }
}
