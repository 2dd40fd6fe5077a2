//! `clusterctl get-credentials NAME [--kubeconfig PATH]`: merges the cluster's admin context into
//! the user's kubeconfig and makes it current, like `gcloud container clusters get-credentials`.
//! Reads the cluster's state without taking its lock (state files are replaced atomically).
//! With `--user NAME --kubeconfig FILE`: a person's expiring credential instead
//! (`action::iam::user_credential`), written to FILE.

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
    /// With --user: the file to write the person's credential to (its own file, 0600, to hand
    /// to them).
    #[arg(long, value_name = "PATH")]
    pub kubeconfig: Option<std::path::PathBuf>,
    /// Instead of the administrator's credential, one for this person (a user with a grant,
    /// see `clusterctl access`): a token that expires, acting as the user. Needs
    /// --kubeconfig.
    #[arg(long, value_name = "NAME", requires = "kubeconfig")]
    pub user: Option<String>,
    /// How long the person's credential lives (10m to 24h).
    #[arg(long, value_name = "DURATION", default_value = "8h", value_parser = parse_ttl, requires = "user")]
    pub ttl: std::time::Duration,
    /// With --user: where the token goes. `auto`: the OS keyring when there is one (the
    /// kubeconfig then runs `clusterctl auth token` to read it), else the kubeconfig file;
    /// `keyring`: the keyring or fail; `file`: the kubeconfig file (0600).
    #[arg(long, value_enum, default_value_t = crate::credstore::StoreChoice::Auto, requires = "user")]
    pub credential_store: crate::credstore::StoreChoice,
}

/// `clusterctl auth ...`: kubectl's credential plugin.
#[derive(Debug, clap::Subcommand)]
pub enum AuthCommand {
    /// Print the person's token kept in the OS keyring as an ExecCredential for kubectl
    /// (client.authentication.k8s.io/v1beta1). Refused once expired.
    Token(AuthTokenArgs),
}

/// Arguments of `clusterctl auth token`.
#[derive(Debug, clap::Args)]
pub struct AuthTokenArgs {
    /// Name of the cluster.
    pub name: String,
    /// The person.
    #[arg(long, value_name = "NAME")]
    pub user: String,
    /// The cluster's ID (as `get-credentials --user` wrote it into the kubeconfig).
    #[arg(long, value_name = "ID")]
    pub cluster_id: String,
}

/// Runs `clusterctl auth`.
pub fn run_auth(command: &AuthCommand) -> anyhow::Result<()> {
    match command {
        AuthCommand::Token(args) => {
            let token = crate::action::iam::stored_token(&args.name, &args.cluster_id, &args.user)?;
            crate::output::print(&crate::credstore::exec_credential(&token))?;
            Ok(())
        }
    }
}

fn parse_ttl(s: &str) -> Result<std::time::Duration, String> {
    s.parse::<crate::spec::Duration>()
        .map(|d| std::time::Duration::from_secs(d.as_secs()))
        .map_err(|e| e.to_string())
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
    if let (Some(user), Some(output)) = (&args.user, &args.kubeconfig) {
        let cred = crate::action::iam::user_credential(
            &store,
            name,
            user,
            args.ttl,
            args.credential_store,
        )?;
        let outcome = kubeconfig::merge(output, &cred.entry, true)?;
        if !global.quiet {
            let kept = match &cred.stored {
                crate::action::iam::TokenStore::Keyring => "the token is in the OS keyring (the kernel keyring: it is gone after a reboot or 3 days unused); the file runs `clusterctl auth token` to read it".to_owned(),
                crate::action::iam::TokenStore::File { why: None } => {
                    "the token is in that file (mode 0600)".to_owned()
                }
                crate::action::iam::TokenStore::File { why: Some(why) } => {
                    format!("the token is in that file (mode 0600), not in the OS keyring: {why}")
                }
            };
            eprintln!(
                "credential of user {user:?} for cluster {name:?}: {outcome}; it expires at {}; {kept}",
                cred.expires
            );
        }
        return Ok(());
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
/// the default kubeconfig and out of every file `written` lists (where `create` and
/// `get-credentials` merged them). Failure is only a warning, since the cluster is gone already;
/// the warning says how to remove the entries by hand.
pub fn forget_context(name: &str, written: &[std::path::PathBuf], quiet: bool) {
    let (context, cluster, user) = kubeconfig::names_for(name);
    let mut paths = Vec::new();
    match kubeconfig::default_path() {
        Ok(p) => paths.push(p),
        // Without HOME there is no default file; the listed ones are still cleaned.
        Err(e) if written.is_empty() => warn_forget(name, e, &context, &cluster, &user),
        Err(_) => {}
    }
    for p in written {
        let same = paths
            .iter()
            .any(|q| std::path::absolute(q).is_ok_and(|q| &q == p));
        if !same {
            paths.push(p.clone());
        }
    }
    for path in paths {
        match kubeconfig::remove(&path, name) {
            Ok(true) => {
                if !quiet {
                    eprintln!(
                        "Removed kubeconfig context {context:?} from {}.",
                        path.display()
                    );
                }
            }
            Ok(false) => {}
            Err(e) => warn_forget(name, e, &context, &cluster, &user),
        }
    }
}

fn warn_forget(
    name: &str,
    e: kubeconfig::KubeconfigError,
    context: &str,
    cluster: &str,
    user: &str,
) {
    eprintln!(
        "warning: cannot remove the kubeconfig entries of cluster {name:?}: {:#}; remove them with `kubectl config delete-context {context}`, `kubectl config delete-cluster {cluster}` and `kubectl config delete-user {user}`",
        anyhow::Error::new(e)
    );
}
