//! `clusterctl access grant|revoke|list|sync|log NAME` (see `action::access`).

use super::Global;
use crate::action::iam as action;
use crate::engine::Reporter;
use crate::engine::iam::Grant;
use crate::output::{self, Format};
use crate::spec::Role;
use crate::state::StateStore;

/// `clusterctl access` subcommands.
#[derive(Debug, clap::Subcommand)]
pub enum AccessCommand {
    /// Grant a member a role, on the whole cluster or in namespaces (creates the RBAC
    /// binding now; the cluster record keeps it).
    Grant(GrantArgs),
    /// Take a member's grants away (all of them, or of one role, or in some namespaces); a
    /// user left with no grant loses their account, so every credential of theirs stops
    /// working at once.
    Revoke(RevokeArgs),
    /// List the grants in the cluster record.
    List(NameArg),
    /// Bring the cluster's RBAC bindings and users' accounts in step with the record.
    Sync(SyncArgs),
    /// Show recent API requests from the API server's audit log (who, as whom, what, answer).
    Log(LogArgs),
}

/// Just the cluster name.
#[derive(Debug, clap::Args)]
pub struct NameArg {
    /// Name of the cluster.
    pub name: String,
}

/// Arguments of `access grant`.
#[derive(Debug, clap::Args)]
pub struct GrantArgs {
    /// Name of the cluster.
    pub name: String,
    /// Who: user:NAME, group:NAME or serviceAccount:NAMESPACE/NAME.
    #[arg(long)]
    pub member: String,
    /// The role: viewer (view), developer (edit), admin, cluster-admin.
    #[arg(long)]
    pub role: Role,
    /// Grant it only in this namespace (repeatable; created if missing). Default: the whole
    /// cluster.
    #[arg(long = "namespace", short = 'n', value_name = "NAMESPACE")]
    pub namespaces: Vec<String>,
    /// If another command holds the cluster's lock, wait for it instead of failing.
    #[arg(long)]
    pub wait: bool,
}

/// Arguments of `access revoke`.
#[derive(Debug, clap::Args)]
pub struct RevokeArgs {
    /// Name of the cluster.
    pub name: String,
    /// Who: user:NAME, group:NAME or serviceAccount:NAMESPACE/NAME.
    #[arg(long)]
    pub member: String,
    /// Only this role (default: every role of the member).
    #[arg(long)]
    pub role: Option<Role>,
    /// Only in this namespace (repeatable; default: everywhere).
    #[arg(long = "namespace", short = 'n', value_name = "NAMESPACE")]
    pub namespaces: Vec<String>,
    /// If another command holds the cluster's lock, wait for it instead of failing.
    #[arg(long)]
    pub wait: bool,
}

/// Arguments of `access sync`.
#[derive(Debug, clap::Args)]
pub struct SyncArgs {
    /// Name of the cluster.
    pub name: String,
    /// If another command holds the cluster's lock, wait for it instead of failing.
    #[arg(long)]
    pub wait: bool,
}

/// Arguments of `access log`.
#[derive(Debug, clap::Args)]
pub struct LogArgs {
    /// Name of the cluster.
    pub name: String,
    /// Only requests made by or as this user (a person's name, or a full Kubernetes user name
    /// such as system:serviceaccount:NS:NAME).
    #[arg(long)]
    pub user: Option<String>,
    /// How many of the newest events to show.
    #[arg(long, default_value_t = 50)]
    pub limit: usize,
}

#[derive(Debug, serde::Serialize)]
#[serde(rename_all = "camelCase")]
struct GrantDoc<'a> {
    member: &'a str,
    role: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    namespace: Option<&'a str>,
}

fn grant_docs(grants: &[Grant]) -> Vec<GrantDoc<'_>> {
    grants
        .iter()
        .map(|g| GrantDoc {
            member: &g.member,
            role: g.role.as_str(),
            namespace: g.scope.namespace(),
        })
        .collect()
}

#[derive(Debug, serde::Serialize)]
#[serde(rename_all = "camelCase")]
struct OutcomeDoc<'a> {
    grants: Vec<GrantDoc<'a>>,
    changes: &'a [String],
}

fn reporter(global: &Global) -> Reporter {
    crate::output::line_reporter(global.quiet)
}

/// Runs `clusterctl access`.
pub fn run(global: &Global, command: &AccessCommand) -> anyhow::Result<()> {
    let store = StateStore::resolve(global.state_dir.as_deref())?;
    let report = reporter(global);
    match command {
        AccessCommand::Grant(a) => {
            let o = action::grant(
                &store,
                &a.name,
                &a.member,
                a.role,
                &a.namespaces,
                a.wait,
                report,
            )?;
            print_outcome(global.output, "granted", &o)
        }
        AccessCommand::Revoke(a) => {
            let o = action::revoke(
                &store,
                &a.name,
                &a.member,
                a.role,
                &a.namespaces,
                a.wait,
                report,
            )?;
            print_outcome(global.output, "revoked", &o)
        }
        AccessCommand::Sync(a) => {
            let o = action::sync(&store, &a.name, a.wait, report)?;
            print_outcome(global.output, "", &o)
        }
        AccessCommand::List(a) => {
            let grants = action::list(&store, &a.name)?;
            if global.output == Format::Table {
                let rows: Vec<Vec<String>> = grants
                    .iter()
                    .map(|g| {
                        vec![
                            g.member.clone(),
                            g.role.to_string(),
                            g.role.cluster_role().to_owned(),
                            g.scope.namespace().unwrap_or("(cluster)").to_owned(),
                        ]
                    })
                    .collect();
                output::print(&output::table(
                    &["MEMBER", "ROLE", "CLUSTERROLE", "NAMESPACE"],
                    &rows,
                ))?;
                return Ok(());
            }
            output::print(&output::to_string(global.output, &grant_docs(&grants))?)?;
            Ok(())
        }
        AccessCommand::Log(a) => {
            let events = action::audit_log(&store, &a.name, a.user.as_deref(), a.limit)?;
            if global.output == Format::Table {
                let rows: Vec<Vec<String>> = events
                    .iter()
                    .map(|e| {
                        let via = if e.impersonated_user.is_some() {
                            format!(" (via {})", e.user.username)
                        } else {
                            String::new()
                        };
                        let object = e.object_ref.as_ref().map_or_else(
                            || e.request_uri.clone(),
                            |o| {
                                let mut s = o.resource.clone();
                                if let Some(sub) = &o.subresource {
                                    s = format!("{s}/{sub}");
                                }
                                match (&o.namespace, &o.name) {
                                    (Some(ns), Some(n)) => format!("{s} {ns}/{n}"),
                                    (Some(ns), None) => format!("{s} -n {ns}"),
                                    (None, Some(n)) => format!("{s} {n}"),
                                    (None, None) => s,
                                }
                            },
                        );
                        let code = e.response_status.as_ref().map_or(0, |s| s.code);
                        vec![
                            e.stage_timestamp.clone(),
                            format!("{}{via}", e.person()),
                            e.verb.clone(),
                            object,
                            code.to_string(),
                            if e.denied() { "denied" } else { "allowed" }.to_owned(),
                        ]
                    })
                    .collect();
                output::print(&output::table(
                    &["TIME", "USER", "VERB", "OBJECT", "CODE", "DECISION"],
                    &rows,
                ))?;
                return Ok(());
            }
            output::print(&output::to_string(global.output, &events)?)?;
            Ok(())
        }
    }
}

fn print_outcome(format: Format, verb: &str, o: &action::AccessOutcome) -> anyhow::Result<()> {
    if format == Format::Table {
        for g in &o.grants {
            println!("{verb} {g}");
        }
        if o.changes.is_empty() {
            println!("the cluster's access objects are in step with the record");
        } else {
            println!("{} change(s) applied to the cluster", o.changes.len());
        }
        return Ok(());
    }
    let doc = OutcomeDoc {
        grants: grant_docs(&o.grants),
        changes: &o.changes,
    };
    output::print(&output::to_string(format, &doc)?)?;
    Ok(())
}
