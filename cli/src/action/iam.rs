//! `clusterctl access grant|revoke|list|sync|log` and `get-credentials --user`: IAM-scoped
//! access (see `engine::iam` for the model).
//!
//! The cluster record's spec (`spec.access.bindings`) is the desired state; every command that
//! changes it takes the cluster lock, first brings the cluster in step with the record (so a
//! run killed between saving the record and changing the cluster is finished by the next
//! one), edits the record, then applies the difference, journaling each change
//! (`access-change`). `create` re-applied with a cluster file applies that file's bindings.

use std::time::Duration;

use anyhow::{Context as _, bail};
use serde::{Deserialize, Serialize};

use super::{
    cluster_api, load_cluster, lock_cluster, open_action_journal, pinned_endpoint, run_pinned,
    runtime,
};
use crate::engine::Reporter;
use crate::engine::access as ssh_access;
use crate::engine::iam::{self, Change, Grant};
use crate::kube::KubeClient;
use crate::spec::Role;
use crate::state::{ClusterRecord, ClusterStatus, Journal, StateStore};

/// Journal action: one change to the cluster's access objects.
pub const ACCESS_CHANGE: &str = "access-change";

/// Shortest credential lifetime (the TokenRequest API's minimum).
pub const MIN_TTL: Duration = Duration::from_secs(600);
/// Longest credential lifetime `get-credentials --user` hands out.
pub const MAX_TTL: Duration = Duration::from_secs(24 * 3600);
/// Default credential lifetime: a working day.
pub const DEFAULT_TTL: Duration = Duration::from_secs(8 * 3600);

/// Where kube-apiserver writes its audit log on a control-plane machine.
pub fn audit_log_path() -> String {
    templates::kubernetes::audit_log_path(&templates::kubernetes::Layout::default())
}

/// What a grant, revoke or sync did.
#[derive(Debug, Clone, Default)]
pub struct AccessOutcome {
    /// The grants added or removed.
    pub grants: Vec<Grant>,
    /// The changes applied to the cluster, in order.
    pub changes: Vec<String>,
}

fn check_running(record: &ClusterRecord) -> anyhow::Result<()> {
    if record.kubernetes.is_none()
        || matches!(
            record.status,
            ClusterStatus::Creating | ClusterStatus::Provisioned | ClusterStatus::Deleting
        )
    {
        bail!(
            "cluster {:?} has no running Kubernetes (status {}); access is managed on a cluster `clusterctl create` finished",
            record.name,
            record.status
        );
    }
    Ok(())
}

/// Brings the cluster's access objects in step with `access`, journaling each change. Returns
/// the changes made.
pub async fn reconcile(
    api: &KubeClient,
    access: &crate::spec::Access,
    journal: &mut Journal,
    report: Reporter,
) -> anyhow::Result<Vec<String>> {
    let desired = iam::desired(access);
    let observed = api.observe_access().await?;
    let changes = iam::changes(&desired, &observed);
    let mut done = Vec::new();
    for change in &changes {
        let text = change.to_string();
        let op = journal.intent(ACCESS_CHANGE, &change_target(change))?;
        match api.apply_access_change(change).await {
            Ok(()) => journal.done(&op)?,
            Err(e) => {
                journal.failed(&op, &crate::error::error_chain(&e))?;
                return Err(anyhow::Error::from(e).context(format!(
                    "applying the access change \"{text}\"; the cluster record holds the wanted access, `clusterctl access sync` applies the rest"
                )));
            }
        }
        report.note(&text);
        done.push(text);
    }
    Ok(done)
}

fn change_target(c: &Change) -> String {
    match c {
        Change::CreateNamespace(ns) => format!("namespace/{ns}"),
        Change::CreateUser(u) | Change::DeleteUser(u) => format!("user/{}", u.account),
        Change::CreateBinding(b)
        | Change::UpdateBinding(b)
        | Change::ReplaceBinding(b)
        | Change::DeleteBinding(b) => match b.scope.namespace() {
            Some(ns) => format!("rolebinding/{ns}/{}", b.name),
            None => format!("clusterrolebinding/{}", b.name),
        },
    }
}

/// An edit of the record's access: grant or revoke.
enum Edit<'a> {
    Grant {
        member: &'a str,
        role: Role,
        namespaces: &'a [String],
    },
    Revoke {
        member: &'a str,
        role: Option<Role>,
        namespaces: &'a [String],
    },
}

fn check_edit(member: &str, namespaces: &[String]) -> anyhow::Result<()> {
    if let Some((problem, hint)) = crate::spec::member_problem(member) {
        bail!("--member: {problem}; {hint}");
    }
    for ns in namespaces {
        if !crate::spec::is_dns1123_label(ns) {
            bail!(
                "--namespace: invalid namespace {ns:?}; write a Kubernetes namespace name: lowercase letters, digits and '-', at most 63 characters"
            );
        }
    }
    let mut seen = std::collections::BTreeSet::new();
    for ns in namespaces {
        if !seen.insert(ns) {
            bail!("--namespace: {ns:?} is given twice; give each namespace once");
        }
    }
    Ok(())
}

/// `clusterctl access grant NAME --member M --role R [--namespace N]...`.
pub fn grant(
    store: &StateStore,
    name: &str,
    member: &str,
    role: Role,
    namespaces: &[String],
    wait_lock: bool,
    report: Reporter,
) -> anyhow::Result<AccessOutcome> {
    check_edit(member, namespaces)?;
    edit(
        store,
        name,
        Edit::Grant {
            member,
            role,
            namespaces,
        },
        wait_lock,
        report,
    )
}

/// `clusterctl access revoke NAME --member M [--role R] [--namespace N]...`.
pub fn revoke(
    store: &StateStore,
    name: &str,
    member: &str,
    role: Option<Role>,
    namespaces: &[String],
    wait_lock: bool,
    report: Reporter,
) -> anyhow::Result<AccessOutcome> {
    check_edit(member, namespaces)?;
    let outcome = edit(
        store,
        name,
        Edit::Revoke {
            member,
            role,
            namespaces,
        },
        wait_lock,
        report,
    )?;
    // The token `get-credentials --user` kept in this machine's keyring is dead once the person
    // has no grant (their account is gone): the entry goes too. Best effort: the revocation
    // itself is done and is what counts.
    if let Some(user) = member.strip_prefix("user:")
        && let Ok(record) = load_cluster(store, name)
        && !iam::desired(&record.spec.spec.access)
            .users
            .iter()
            .any(|u| u.user == user)
        && crate::credstore::available().is_ok()
    {
        let account = crate::credstore::account(name, &record.cluster_ref().id, user);
        match crate::credstore::delete(&account) {
            Ok(true) => report.note(&format!(
                "removed the credential of {user:?} kept in this machine's OS keyring"
            )),
            Ok(false) => {}
            Err(e) => report.note(&format!("warning: {e}")),
        }
    }
    Ok(outcome)
}

/// `clusterctl access sync NAME`: applies the record's access to the cluster.
pub fn sync(
    store: &StateStore,
    name: &str,
    wait_lock: bool,
    report: Reporter,
) -> anyhow::Result<AccessOutcome> {
    let record = load_cluster(store, name)?;
    check_running(&record)?;
    let guard = lock_cluster(store, name, wait_lock, report)?;
    let record = guard.load()?.unwrap_or(record);
    let (mut journal, _) = open_action_journal(&guard, report)?;
    let rt = runtime()?;
    let result = rt.block_on(async {
        let api = cluster_api(store, &record).await?;
        let r = reconcile(&api, &record.spec.spec.access, &mut journal, report).await;
        api.close().await;
        r
    });
    journal.finish(result.is_ok())?;
    Ok(AccessOutcome {
        grants: Vec::new(),
        changes: result?,
    })
}

fn edit(
    store: &StateStore,
    name: &str,
    edit: Edit<'_>,
    wait_lock: bool,
    report: Reporter,
) -> anyhow::Result<AccessOutcome> {
    let record = load_cluster(store, name)?;
    check_running(&record)?;
    let guard = lock_cluster(store, name, wait_lock, report)?;
    let mut record = guard.load()?.unwrap_or(record);
    let (mut journal, _) = open_action_journal(&guard, report)?;
    let rt = runtime()?;
    let result = rt.block_on(async {
        let api = cluster_api(store, &record).await?;
        let r = async {
            // What an interrupted run left: the record is ahead of the cluster.
            let mut changes =
                reconcile(&api, &record.spec.spec.access, &mut journal, report).await?;
            let mut access = record.spec.spec.access.clone();
            let grants = match edit {
                Edit::Grant {
                    member,
                    role,
                    namespaces,
                } => iam::grant(&mut access, member, role, namespaces)?,
                Edit::Revoke {
                    member,
                    role,
                    namespaces,
                } => iam::revoke(&mut access, member, role, namespaces)?,
            };
            record.spec.spec.access = access;
            guard.save(&mut record)?;
            changes.extend(reconcile(&api, &record.spec.spec.access, &mut journal, report).await?);
            Ok::<_, anyhow::Error>(AccessOutcome { grants, changes })
        }
        .await;
        api.close().await;
        r
    });
    journal.finish(result.is_ok())?;
    result
}

/// `clusterctl access list NAME`: the grants in the cluster record.
pub fn list(store: &StateStore, name: &str) -> anyhow::Result<Vec<Grant>> {
    let record = load_cluster(store, name)?;
    Ok(iam::grants(&record.spec.spec.access).into_iter().collect())
}

/// A credential `get-credentials --user` made.
pub struct UserCredential {
    /// The kubeconfig entry (impersonation, and the token or the command that reads it).
    pub entry: crate::kubeconfig::Entry,
    /// When the token expires (RFC 3339, as the API server set it).
    pub expires: String,
    /// Where the token is kept.
    pub stored: TokenStore,
}

/// Where a person's token was put.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TokenStore {
    /// The OS keyring; the kubeconfig runs `clusterctl auth token` to read it.
    Keyring,
    /// The kubeconfig file (0600). `why`: why not the keyring, when it was not asked for.
    File {
        /// Why the keyring was not used (`auto` found none), if it was not ruled out.
        why: Option<String>,
    },
}

/// A bound token for `user` valid for `ttl`, as a kubeconfig entry that acts as the user,
/// with the token kept where `choice` says (the keyring is tried before the API is asked, so
/// `--credential-store keyring` on a machine without one changes nothing).
pub fn user_credential(
    store: &StateStore,
    name: &str,
    user: &str,
    ttl: Duration,
    choice: crate::credstore::StoreChoice,
) -> anyhow::Result<UserCredential> {
    use crate::credstore::{self, StoreChoice};
    // Where the token goes: Ok(the binary the kubeconfig runs to read it from the keyring), or
    // Err(why not the keyring, unless `file` ruled it out).
    let current_exe = || {
        std::env::current_exe()
            .context("finding the clusterctl binary, which the kubeconfig runs to read the token")
    };
    let keyring: Result<std::path::PathBuf, Option<String>> = match choice {
        StoreChoice::File => Err(None),
        StoreChoice::Keyring => match credstore::available() {
            Ok(()) => Ok(current_exe()?),
            Err(e) => bail!(
                "--credential-store keyring: {e}; use --credential-store file to keep the token in the kubeconfig file (0600)"
            ),
        },
        StoreChoice::Auto => match credstore::available() {
            Ok(()) => Ok(current_exe()?),
            Err(e) => Err(Some(e.to_string())),
        },
    };
    if ttl < MIN_TTL || ttl > MAX_TTL {
        bail!(
            "--ttl {}: a credential lives between {} and {} (the API's minimum, clusterctl's maximum); ask for one in that range",
            crate::spec::Duration::from_secs(ttl.as_secs()),
            crate::spec::Duration::from_secs(MIN_TTL.as_secs()),
            crate::spec::Duration::from_secs(MAX_TTL.as_secs()),
        );
    }
    let record = load_cluster(store, name)?;
    check_running(&record)?;
    let desired = iam::desired(&record.spec.spec.access);
    let Some(account) = desired.users.iter().find(|u| u.user == user).cloned() else {
        bail!(
            "user {user:?} has no grant in cluster {name:?}, so there is no credential to give; grant a role first: `clusterctl access grant {name} --member user:{user} --role viewer`"
        );
    };
    let mut entry = crate::kubeconfig::admin_entry(store, &record)?;
    let rt = runtime()?;
    let (token, expires) = rt.block_on(async {
        let api = cluster_api(store, &record).await?;
        let r = async {
            let observed = api.observe_access().await?;
            if !observed.accounts.contains(&account) {
                bail!(
                    "the account of user {user:?} is not in the cluster yet (an access change did not finish); run `clusterctl access sync {name}`"
                );
            }
            Ok::<_, anyhow::Error>(api.user_token(&account.account, ttl).await?)
        }
        .await;
        api.close().await;
        r
    })?;
    let (context, cluster_entry, user_entry) = crate::kubeconfig::names_for_user(name, user);
    entry.context = context;
    entry.cluster = cluster_entry;
    entry.user = user_entry;
    let stored = match keyring {
        Ok(exe) => {
            let id = record.cluster_ref().id;
            credstore::save(
                &credstore::account(name, &id, user),
                &credstore::StoredToken {
                    token,
                    expiration_timestamp: expires.clone(),
                },
            )?;
            let args = vec![
                "auth".to_owned(),
                "token".to_owned(),
                name.to_owned(),
                "--user".to_owned(),
                user.to_owned(),
                "--cluster-id".to_owned(),
                id,
            ];
            entry.credential = crate::kubeconfig::Credential::Exec {
                command: exe.display().to_string(),
                args,
                impersonate: user.to_owned(),
            };
            TokenStore::Keyring
        }
        Err(why) => {
            entry.credential = crate::kubeconfig::Credential::Token {
                token,
                impersonate: user.to_owned(),
            };
            TokenStore::File { why }
        }
    };
    Ok(UserCredential {
        entry,
        expires,
        stored,
    })
}

/// `clusterctl auth token NAME --user USER --cluster-id ID`: the token `get-credentials --user`
/// kept in the OS keyring, refused once expired (it cannot be renewed without the administrator).
pub fn stored_token(
    name: &str,
    id: &str,
    user: &str,
) -> anyhow::Result<crate::credstore::StoredToken> {
    let token = match crate::credstore::load(&crate::credstore::account(name, id, user)) {
        Ok(token) => token,
        Err(crate::credstore::KeyringError::Missing) => bail!(
            "no such credential in the OS keyring: user {user:?} of cluster {name:?} (the kernel keyring forgets entries at reboot and after 3 days unused); ask the cluster's administrator for a new one (`clusterctl get-credentials {name} --user {user} --kubeconfig FILE`)"
        ),
        Err(e) => return Err(e.into()),
    };
    if let Ok(expires) = chrono::DateTime::parse_from_rfc3339(&token.expiration_timestamp)
        && expires <= chrono::Utc::now()
    {
        bail!(
            "the credential of user {user:?} for cluster {name:?} expired at {}; ask the cluster's administrator for a new one (`clusterctl get-credentials {name} --user {user} --kubeconfig FILE`)",
            token.expiration_timestamp
        );
    }
    Ok(token)
}

/// One audit log event, the fields `access log` shows (audit.k8s.io/v1 `Event`).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AuditEvent {
    /// When the API server answered.
    #[serde(default)]
    pub stage_timestamp: String,
    /// The authenticated identity.
    #[serde(default)]
    pub user: AuditUser,
    /// The identity it acted as, for an impersonated request.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub impersonated_user: Option<AuditUser>,
    /// `get`, `list`, `create`, ...
    #[serde(default)]
    pub verb: String,
    /// The request path.
    #[serde(default)]
    pub request_uri: String,
    /// The object.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub object_ref: Option<AuditObject>,
    /// The answer's status.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub response_status: Option<AuditStatus>,
    /// Where the request came from.
    #[serde(default, rename = "sourceIPs", skip_serializing_if = "Vec::is_empty")]
    pub source_ips: Vec<String>,
}

/// An identity in an audit event.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct AuditUser {
    /// The user name.
    #[serde(default)]
    pub username: String,
    /// Its groups.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub groups: Vec<String>,
}

/// The object of an audited request.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AuditObject {
    /// `pods`, `deployments`, ...
    #[serde(default)]
    pub resource: String,
    /// Its namespace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    /// Its name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// `log`, `exec`, `token`, ...
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subresource: Option<String>,
}

/// The answer's status.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct AuditStatus {
    /// HTTP status code.
    #[serde(default)]
    pub code: u16,
}

impl AuditEvent {
    /// The person the request acted as: the impersonated user, else the authenticated one.
    pub fn person(&self) -> &str {
        self.impersonated_user
            .as_ref()
            .map_or(&self.user.username, |u| &u.username)
    }

    /// Whether the request was refused (401 or 403).
    pub fn denied(&self) -> bool {
        self.response_status
            .as_ref()
            .is_some_and(|s| s.code == 401 || s.code == 403)
    }
}

/// Parses audit log lines; lines that are not events are skipped (a line cut by rotation).
pub fn parse_audit(text: &str, user: Option<&str>) -> Vec<AuditEvent> {
    text.lines()
        .filter_map(|l| serde_json::from_str::<AuditEvent>(l).ok())
        .filter(|e| user.is_none_or(|u| e.person() == u || e.user.username == u))
        .collect()
}

/// `clusterctl access log NAME [--user U] [--limit N]`: the newest audit events of the first
/// control plane's API server, oldest first.
pub fn audit_log(
    store: &StateStore,
    name: &str,
    user: Option<&str>,
    limit: usize,
) -> anyhow::Result<Vec<AuditEvent>> {
    let record = load_cluster(store, name)?;
    check_running(&record)?;
    let cp = super::first_control_plane(&record)?;
    let path = audit_log_path();
    let quoted = crate::ssh::shell_quote(&path);
    // Only the lines that can match leave the machine: a JSON-quoted user name.
    let command = match user {
        Some(u) => {
            let needle = format!("\"username\":{}", serde_json::to_string(u)?);
            format!(
                "sudo -n grep -F -e {} -- {quoted} | tail -n {}",
                crate::ssh::shell_quote(&needle),
                limit.max(1)
            )
        }
        None => format!("sudo -n tail -n {} -- {quoted}", limit.max(1)),
    };
    let endpoint = pinned_endpoint(&record, cp)?;
    let rt = runtime()?;
    let out = rt.block_on(async {
        let identity =
            ssh_access::client_identity(&record.spec.spec.ssh, store, name, None).await?;
        run_pinned(&identity, endpoint, Duration::from_secs(30), &command).await
    })?;
    match out.exit_status {
        // grep finds nothing: 1; tail of a missing file: 1 with a message.
        Some(0) | Some(1) if out.stderr.is_empty() => {}
        _ => bail!(
            "reading the audit log {path} on {} failed: {}; it is written by kube-apiserver since clusterctl enabled auditing (a cluster made before needs `clusterctl create -f` again)",
            cp.name,
            String::from_utf8_lossy(&out.stderr).trim()
        ),
    }
    let text = String::from_utf8_lossy(&out.stdout);
    Ok(parse_audit(&text, user))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn audit_events_name_the_person_through_impersonation() {
        let text = concat!(
            r#"{"kind":"Event","apiVersion":"audit.k8s.io/v1","level":"Metadata","auditID":"1","stage":"ResponseComplete","requestURI":"/api/v1/namespaces/default/pods","verb":"create","user":{"username":"system:serviceaccount:clusterctl-access:u-alice-1","groups":["system:serviceaccounts"]},"impersonatedUser":{"username":"alice"},"sourceIPs":["127.0.0.1"],"objectRef":{"resource":"pods","namespace":"default","apiVersion":"v1"},"responseStatus":{"metadata":{},"status":"Failure","reason":"Forbidden","code":403},"requestReceivedTimestamp":"2026-12-01T10:00:00.000000Z","stageTimestamp":"2026-12-01T10:00:00.010000Z"}"#,
            "\n",
            r#"{"kind":"Event","verb":"list","user":{"username":"kubernetes-admin"},"responseStatus":{"code":200},"stageTimestamp":"2026-12-01T10:00:01Z"}"#,
            "\n",
            r#"{"kind":"Event","verb":"get","user":{"usern"#,
            "\n"
        );
        let all = parse_audit(text, None);
        assert_eq!(all.len(), 2);
        assert_eq!(all[0].person(), "alice");
        assert!(all[0].denied());
        assert!(!all[1].denied());
        let alice = parse_audit(text, Some("alice"));
        assert_eq!(alice.len(), 1);
        assert_eq!(
            alice[0].object_ref.as_ref().map(|o| o.resource.as_str()),
            Some("pods")
        );
    }
}
