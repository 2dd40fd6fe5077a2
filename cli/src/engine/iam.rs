//! IAM-scoped access, the pure part: what the spec's `access.bindings` mean in Kubernetes RBAC,
//! the changes that bring a cluster there, and the grant and revoke edits of the spec.
//!
//! Roles map to the built-in ClusterRoles (`viewer` -> `view`, `developer` -> `edit`, `admin` ->
//! `admin`, `cluster-admin` -> `cluster-admin`). All members that hold one role on the whole
//! cluster share one ClusterRoleBinding `clusterctl:<role>`; in a namespace, one RoleBinding
//! `clusterctl:<role>` there. Every object clusterctl makes carries [`MANAGED_BY`] and
//! [`ACCESS_LABEL`]; objects without them are never changed or deleted.
//!
//! People get credentials through a per-user identity (see ARCHITECTURE.md, "Access"): each
//! `user:` member has a ServiceAccount in [`ACCESS_NAMESPACE`] whose only permission is to
//! impersonate that one user name (a ClusterRole and ClusterRoleBinding named
//! `clusterctl:user:<account>`). A credential is a bound token of that account (TokenRequest,
//! with an expiry) in a kubeconfig that impersonates the user (`as:`), so RBAC and the audit log
//! see the person's own name. Revoking the person's last grant deletes the account, and the API
//! server rejects every token of a deleted account at once: revocation does not wait for expiry.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use sha2::{Digest as _, Sha256};

use crate::spec::{Access, AccessBinding, MemberKind, Role, parse_member};

/// Namespace of the per-user ServiceAccounts.
pub const ACCESS_NAMESPACE: &str = "clusterctl-access";
/// Label every object clusterctl makes carries (`app.kubernetes.io/managed-by=clusterctl`).
pub const MANAGED_BY: (&str, &str) = ("app.kubernetes.io/managed-by", "clusterctl");
/// Label saying what an access object is: [`KIND_BINDING`] or [`KIND_USER`].
pub const ACCESS_LABEL: &str = "clusterctl.io/access";
/// [`ACCESS_LABEL`] value of a role binding made from the spec.
pub const KIND_BINDING: &str = "binding";
/// [`ACCESS_LABEL`] value of a per-user object (account, impersonation role and binding).
pub const KIND_USER: &str = "user";
/// Annotation on a per-user account: the user name it stands for.
pub const USER_ANNOTATION: &str = "clusterctl.io/user";

/// The label selector of clusterctl's access objects of one kind.
pub fn selector(kind: &str) -> String {
    format!("{}={},{ACCESS_LABEL}={kind}", MANAGED_BY.0, MANAGED_BY.1)
}

/// Where a role is granted.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Scope {
    /// The whole cluster: a ClusterRoleBinding.
    Cluster,
    /// One namespace: a RoleBinding there.
    Namespace(String),
}

impl Scope {
    fn from_ns(ns: &str) -> Scope {
        if ns.is_empty() {
            Scope::Cluster
        } else {
            Scope::Namespace(ns.to_owned())
        }
    }

    /// The namespace, if any.
    pub fn namespace(&self) -> Option<&str> {
        match self {
            Scope::Cluster => None,
            Scope::Namespace(ns) => Some(ns),
        }
    }
}

impl fmt::Display for Scope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Scope::Cluster => f.write_str("cluster"),
            Scope::Namespace(ns) => write!(f, "namespace {ns}"),
        }
    }
}

/// An RBAC subject.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Subject {
    /// `User`, `Group` or `ServiceAccount`.
    pub kind: String,
    /// Its name.
    pub name: String,
    /// A ServiceAccount's namespace.
    pub namespace: Option<String>,
}

impl Subject {
    /// The subject of a spec member (`user:alice` -> User alice); `None` if malformed.
    pub fn of_member(member: &str) -> Option<Subject> {
        let (kind, name) = parse_member(member)?;
        Some(match kind {
            MemberKind::User => Subject {
                kind: "User".into(),
                name: name.into(),
                namespace: None,
            },
            MemberKind::Group => Subject {
                kind: "Group".into(),
                name: name.into(),
                namespace: None,
            },
            MemberKind::ServiceAccount => {
                let (ns, n) = name.split_once('/')?;
                Subject {
                    kind: "ServiceAccount".into(),
                    name: n.into(),
                    namespace: Some(ns.into()),
                }
            }
        })
    }
}

/// A role binding as the spec wants it, or as the cluster has it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Binding {
    /// Cluster-wide or in a namespace.
    pub scope: Scope,
    /// Object name (`clusterctl:viewer`).
    pub name: String,
    /// The ClusterRole it binds (`view`).
    pub cluster_role: String,
    /// Its subjects, sorted.
    pub subjects: Vec<Subject>,
}

/// One grant: a member holds a role in a scope.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Grant {
    /// The member as the spec writes it (`user:alice`).
    pub member: String,
    /// The role.
    pub role: Role,
    /// Where.
    pub scope: Scope,
}

impl fmt::Display for Grant {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {} ({})", self.member, self.role, self.scope)
    }
}

/// Every grant of the spec, sorted and without duplicates.
pub fn grants(access: &Access) -> BTreeSet<Grant> {
    let mut out = BTreeSet::new();
    for b in &access.bindings {
        let scopes: Vec<Scope> = if b.namespaces.is_empty() {
            vec![Scope::Cluster]
        } else {
            b.namespaces.iter().map(|n| Scope::from_ns(n)).collect()
        };
        for m in &b.members {
            for s in &scopes {
                out.insert(Grant {
                    member: m.clone(),
                    role: b.role,
                    scope: s.clone(),
                });
            }
        }
    }
    out
}

/// The spec's bindings for a set of grants: members with the same role in the same namespaces
/// share a binding; ordered by role, then scope, members sorted.
pub fn bindings_of(grants: &BTreeSet<Grant>) -> Vec<AccessBinding> {
    // (member, role) -> namespaces ("" = cluster)
    let mut per_member: BTreeMap<(Role, &str), Vec<String>> = BTreeMap::new();
    for g in grants {
        per_member
            .entry((g.role, g.member.as_str()))
            .or_default()
            .push(g.scope.namespace().unwrap_or_default().to_owned());
    }
    let mut groups: BTreeMap<(Role, Vec<String>), Vec<String>> = BTreeMap::new();
    for ((role, member), mut scopes) in per_member {
        scopes.sort();
        // A cluster-wide grant and namespaced ones of the same role are kept apart.
        let cluster = scopes.iter().any(String::is_empty);
        let namespaces: Vec<String> = scopes.into_iter().filter(|s| !s.is_empty()).collect();
        if cluster {
            groups
                .entry((role, Vec::new()))
                .or_default()
                .push(member.to_owned());
        }
        if !namespaces.is_empty() {
            groups
                .entry((role, namespaces))
                .or_default()
                .push(member.to_owned());
        }
    }
    groups
        .into_iter()
        .map(|((role, namespaces), members)| AccessBinding {
            members,
            role,
            namespaces,
        })
        .collect()
}

/// Why a grant or revoke was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EditError {
    /// The member already holds the role there.
    #[error("{member} already has role {role} ({scope}); nothing changed")]
    AlreadyGranted {
        /// The member.
        member: String,
        /// The role.
        role: Role,
        /// Where.
        scope: Scope,
    },
    /// The member holds no matching grant.
    #[error(
        "{member} has no grant{what}; nothing changed (`clusterctl access list` shows the grants)"
    )]
    NoGrant {
        /// The member.
        member: String,
        /// " of role viewer in namespace team-a", or "".
        what: String,
    },
}

/// Adds `member`'s `role` in each of `namespaces` (none: the whole cluster) to `access`.
/// Refused, changing nothing, if the member already holds any of them.
pub fn grant(
    access: &mut Access,
    member: &str,
    role: Role,
    namespaces: &[String],
) -> Result<Vec<Grant>, EditError> {
    let mut all = grants(access);
    let scopes: Vec<Scope> = if namespaces.is_empty() {
        vec![Scope::Cluster]
    } else {
        namespaces.iter().map(|n| Scope::from_ns(n)).collect()
    };
    let mut added = Vec::new();
    for scope in scopes {
        let g = Grant {
            member: member.to_owned(),
            role,
            scope,
        };
        if all.contains(&g) || added.contains(&g) {
            return Err(EditError::AlreadyGranted {
                member: g.member,
                role,
                scope: g.scope,
            });
        }
        added.push(g);
    }
    all.extend(added.iter().cloned());
    access.bindings = bindings_of(&all);
    Ok(added)
}

/// Removes `member`'s grants from `access`: of `role` only if given, in `namespaces` only if
/// any are given. Refused, changing nothing, if nothing matches.
pub fn revoke(
    access: &mut Access,
    member: &str,
    role: Option<Role>,
    namespaces: &[String],
) -> Result<Vec<Grant>, EditError> {
    let all = grants(access);
    let matches = |g: &Grant| {
        g.member == member
            && role.is_none_or(|r| g.role == r)
            && (namespaces.is_empty()
                || g.scope
                    .namespace()
                    .is_some_and(|ns| namespaces.iter().any(|n| n == ns)))
    };
    let removed: Vec<Grant> = all.iter().filter(|g| matches(g)).cloned().collect();
    if removed.is_empty() {
        let mut what = String::new();
        if let Some(r) = role {
            what.push_str(&format!(" of role {r}"));
        }
        if !namespaces.is_empty() {
            what.push_str(&format!(" in namespace {}", namespaces.join(", ")));
        }
        return Err(EditError::NoGrant {
            member: member.to_owned(),
            what,
        });
    }
    let kept: BTreeSet<Grant> = all.into_iter().filter(|g| !matches(g)).collect();
    access.bindings = bindings_of(&kept);
    Ok(removed)
}

/// A person who gets credentials: a `user:` member of some grant, and the account that stands
/// for them.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct UserAccount {
    /// The user name (`alice@example.com`).
    pub user: String,
    /// The ServiceAccount's name in [`ACCESS_NAMESPACE`].
    pub account: String,
}

impl UserAccount {
    /// The account of user `user`.
    pub fn of(user: &str) -> UserAccount {
        UserAccount {
            user: user.to_owned(),
            account: account_name(user),
        }
    }

    /// Name of its impersonation ClusterRole and ClusterRoleBinding.
    pub fn impersonator(&self) -> String {
        format!("clusterctl:user:{}", self.account)
    }
}

/// The ServiceAccount name for a user: `u-`, the name in lowercase letters, digits and `-` (at
/// most 40 of them), `-` and 10 hex digits of the name's sha256, so two names never share one.
pub fn account_name(user: &str) -> String {
    let mut slug = String::new();
    for c in user.chars() {
        let c = c.to_ascii_lowercase();
        if c.is_ascii_lowercase() || c.is_ascii_digit() {
            slug.push(c);
        } else if !slug.ends_with('-') {
            slug.push('-');
        }
        if slug.len() >= 40 {
            break;
        }
    }
    let slug = slug.trim_matches('-');
    let digest = Sha256::digest(user.as_bytes());
    let hex: String = digest.iter().take(5).map(|b| format!("{b:02x}")).collect();
    if slug.is_empty() {
        format!("u-{hex}")
    } else {
        format!("u-{slug}-{hex}")
    }
}

/// What the spec wants in the cluster.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Desired {
    /// Role bindings, ordered by scope then name.
    pub bindings: Vec<Binding>,
    /// One account per `user:` member.
    pub users: Vec<UserAccount>,
    /// Namespaces the bindings need (created if missing, never deleted).
    pub namespaces: BTreeSet<String>,
}

/// The binding object name of a role: `clusterctl:<role>`.
pub fn binding_name(role: Role) -> String {
    format!("clusterctl:{role}")
}

/// What `access` means in the cluster.
pub fn desired(access: &Access) -> Desired {
    let mut by_key: BTreeMap<(Scope, Role), BTreeSet<Subject>> = BTreeMap::new();
    let mut users = BTreeSet::new();
    let mut namespaces = BTreeSet::new();
    for g in grants(access) {
        let Some(subject) = Subject::of_member(&g.member) else {
            continue; // validation refuses malformed members
        };
        if subject.kind == "User" {
            users.insert(UserAccount::of(&subject.name));
        }
        if let Scope::Namespace(ns) = &g.scope {
            namespaces.insert(ns.clone());
        }
        by_key.entry((g.scope, g.role)).or_default().insert(subject);
    }
    if !users.is_empty() {
        namespaces.insert(ACCESS_NAMESPACE.to_owned());
    }
    Desired {
        bindings: by_key
            .into_iter()
            .map(|((scope, role), subjects)| Binding {
                scope,
                name: binding_name(role),
                cluster_role: role.cluster_role().to_owned(),
                subjects: subjects.into_iter().collect(),
            })
            .collect(),
        users: users.into_iter().collect(),
        namespaces,
    }
}

/// What the cluster has of clusterctl's access objects (found by label).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Observed {
    /// Role bindings labelled [`KIND_BINDING`].
    pub bindings: Vec<Binding>,
    /// Accounts labelled [`KIND_USER`] in [`ACCESS_NAMESPACE`] (the user from the annotation).
    pub accounts: Vec<UserAccount>,
    /// Names of impersonation ClusterRoles labelled [`KIND_USER`].
    pub impersonators: BTreeSet<String>,
    /// Every namespace the cluster has.
    pub namespaces: BTreeSet<String>,
}

/// One change to the cluster.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    /// Create a namespace a binding needs.
    CreateNamespace(String),
    /// Create a user's account, its impersonation role and binding.
    CreateUser(UserAccount),
    /// Delete a user's account (every token of it stops working), role and binding.
    DeleteUser(UserAccount),
    /// Create a role binding.
    CreateBinding(Binding),
    /// Set a binding's subjects.
    UpdateBinding(Binding),
    /// Delete a binding and create it again (its role reference cannot change in place).
    ReplaceBinding(Binding),
    /// Delete a binding the spec no longer has.
    DeleteBinding(Binding),
}

impl fmt::Display for Change {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let binding = |f: &mut fmt::Formatter<'_>, verb: &str, b: &Binding| {
            let kind = match b.scope {
                Scope::Cluster => "ClusterRoleBinding",
                Scope::Namespace(_) => "RoleBinding",
            };
            let subjects: Vec<String> = b
                .subjects
                .iter()
                .map(|s| match &s.namespace {
                    Some(ns) => format!("{}:{ns}/{}", s.kind, s.name),
                    None => format!("{}:{}", s.kind, s.name),
                })
                .collect();
            let where_ = match &b.scope {
                Scope::Cluster => String::new(),
                Scope::Namespace(ns) => format!(" in {ns}"),
            };
            write!(
                f,
                "{verb} {kind} {}{where_} -> {} [{}]",
                b.name,
                b.cluster_role,
                subjects.join(", ")
            )
        };
        match self {
            Change::CreateNamespace(ns) => write!(f, "create namespace {ns}"),
            Change::CreateUser(u) => write!(
                f,
                "create the account of user {} ({ACCESS_NAMESPACE}/{})",
                u.user, u.account
            ),
            Change::DeleteUser(u) => write!(
                f,
                "delete the account of user {} ({ACCESS_NAMESPACE}/{}): its credentials stop working",
                u.user, u.account
            ),
            Change::CreateBinding(b) => binding(f, "create", b),
            Change::UpdateBinding(b) => binding(f, "update", b),
            Change::ReplaceBinding(b) => binding(f, "replace", b),
            Change::DeleteBinding(b) => binding(f, "delete", b),
        }
    }
}

/// The changes that take the cluster from `observed` to `desired`: revocations first (deleted
/// bindings and accounts), then namespaces, accounts and bindings. Empty when in step.
pub fn changes(desired: &Desired, observed: &Observed) -> Vec<Change> {
    let mut out = Vec::new();
    let key = |b: &Binding| (b.scope.clone(), b.name.clone());
    let want: BTreeMap<_, &Binding> = desired.bindings.iter().map(|b| (key(b), b)).collect();
    let have: BTreeMap<_, &Binding> = observed.bindings.iter().map(|b| (key(b), b)).collect();
    for (k, b) in &have {
        if !want.contains_key(k) {
            out.push(Change::DeleteBinding((*b).clone()));
        }
    }
    let wanted_accounts: BTreeSet<&str> =
        desired.users.iter().map(|u| u.account.as_str()).collect();
    for a in &observed.accounts {
        if !wanted_accounts.contains(a.account.as_str()) {
            out.push(Change::DeleteUser(a.clone()));
        }
    }
    // An impersonation role left without its account (a run killed while deleting a user).
    let observed_accounts: BTreeSet<&str> = observed
        .accounts
        .iter()
        .map(|u| u.account.as_str())
        .collect();
    for role in &observed.impersonators {
        let account = role.strip_prefix("clusterctl:user:").unwrap_or(role);
        if !wanted_accounts.contains(account) && !observed_accounts.contains(account) {
            out.push(Change::DeleteUser(UserAccount {
                user: String::new(),
                account: account.to_owned(),
            }));
        }
    }
    for ns in &desired.namespaces {
        if !observed.namespaces.contains(ns) {
            out.push(Change::CreateNamespace(ns.clone()));
        }
    }
    for u in &desired.users {
        let complete = observed.accounts.iter().any(|a| a == u)
            && observed.impersonators.contains(&u.impersonator());
        if !complete {
            out.push(Change::CreateUser(u.clone()));
        }
    }
    for (k, b) in &want {
        match have.get(k) {
            None => out.push(Change::CreateBinding((*b).clone())),
            Some(h) if h.cluster_role != b.cluster_role => {
                out.push(Change::ReplaceBinding((*b).clone()));
            }
            Some(h) if h.subjects != b.subjects => out.push(Change::UpdateBinding((*b).clone())),
            Some(_) => {}
        }
    }
    out
}

/// The user a `user:` member names, if it is one.
pub fn user_of(member: &str) -> Option<&str> {
    match parse_member(member) {
        Some((MemberKind::User, name)) => Some(name),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn access(yaml_bindings: &[(&[&str], Role, &[&str])]) -> Access {
        Access {
            bindings: yaml_bindings
                .iter()
                .map(|(m, r, ns)| AccessBinding {
                    members: m.iter().map(|s| s.to_string()).collect(),
                    role: *r,
                    namespaces: ns.iter().map(|s| s.to_string()).collect(),
                })
                .collect(),
        }
    }

    #[test]
    fn account_names_are_dns_labels_and_distinct() {
        let a = account_name("alice@example.com");
        assert!(a.starts_with("u-alice-example-com-"), "{a}");
        assert_eq!(a.len(), "u-alice-example-com-".len() + 10);
        assert_ne!(account_name("Alice@example.com"), a);
        assert!(crate::spec::is_dns1123_label(&account_name(
            &"x".repeat(300)
        )));
        assert!(account_name("@@@").starts_with("u-"));
        assert!(crate::spec::is_dns1123_label(&account_name("@@@")));
    }

    #[test]
    fn bindings_group_members_by_role_and_scope() {
        let a = access(&[
            (&["user:alice", "group:ops"], Role::Viewer, &[]),
            (&["user:bob"], Role::Developer, &["team-a", "team-b"]),
            (
                &["user:carol", "serviceAccount:ci/deployer"],
                Role::Viewer,
                &[],
            ),
        ]);
        let d = desired(&a);
        let names: Vec<String> = d
            .bindings
            .iter()
            .map(|b| {
                format!(
                    "{}/{}/{}/{}",
                    b.scope,
                    b.name,
                    b.cluster_role,
                    b.subjects.len()
                )
            })
            .collect();
        assert_eq!(
            names,
            [
                "cluster/clusterctl:viewer/view/4",
                "namespace team-a/clusterctl:developer/edit/1",
                "namespace team-b/clusterctl:developer/edit/1",
            ]
        );
        let users: Vec<&str> = d.users.iter().map(|u| u.user.as_str()).collect();
        assert_eq!(users, ["alice", "bob", "carol"]);
        assert_eq!(
            d.namespaces.iter().map(String::as_str).collect::<Vec<_>>(),
            [ACCESS_NAMESPACE, "team-a", "team-b"]
        );
        let sa = &d.bindings[0].subjects[0];
        assert_eq!((sa.kind.as_str(), sa.namespace.as_deref()), ("Group", None));
        assert!(
            d.bindings[0]
                .subjects
                .iter()
                .any(|s| s.kind == "ServiceAccount" && s.namespace.as_deref() == Some("ci"))
        );
    }

    #[test]
    fn grant_refuses_a_duplicate_and_revoke_one_that_is_not_there() {
        let mut a = access(&[(&["user:alice"], Role::Viewer, &[])]);
        let err = grant(&mut a, "user:alice", Role::Viewer, &[]).unwrap_err();
        assert!(
            err.to_string()
                .contains("already has role viewer (cluster)"),
            "{err}"
        );
        let before = a.clone();
        assert!(
            grant(
                &mut a,
                "user:bob",
                Role::Developer,
                &["team-a".into(), "team-a".into()]
            )
            .is_err()
        );
        assert_eq!(a, before, "a refused grant changes nothing");
        grant(&mut a, "user:bob", Role::Developer, &["team-a".into()]).unwrap();
        grant(&mut a, "user:carol", Role::Developer, &["team-a".into()]).unwrap();
        assert_eq!(a.bindings.len(), 2);
        assert_eq!(a.bindings[1].members, ["user:bob", "user:carol"]);
        let err = revoke(&mut a, "user:dave", None, &[]).unwrap_err();
        assert_eq!(
            err.to_string(),
            "user:dave has no grant; nothing changed (`clusterctl access list` shows the grants)"
        );
        let err = revoke(&mut a, "user:bob", Some(Role::Viewer), &[]).unwrap_err();
        assert!(err.to_string().contains("no grant of role viewer"), "{err}");
        let removed = revoke(&mut a, "user:bob", None, &[]).unwrap();
        assert_eq!(removed.len(), 1);
        assert_eq!(a.bindings[1].members, ["user:carol"]);
    }

    #[test]
    fn revoking_one_namespace_keeps_the_others() {
        let mut a = access(&[(&["user:bob", "user:eve"], Role::Developer, &["a", "b"])]);
        revoke(&mut a, "user:bob", None, &["a".into()]).unwrap();
        let g: Vec<String> = grants(&a).iter().map(ToString::to_string).collect();
        assert_eq!(
            g,
            [
                "user:bob developer (namespace b)",
                "user:eve developer (namespace a)",
                "user:eve developer (namespace b)",
            ]
        );
    }

    fn observed_of(d: &Desired) -> Observed {
        Observed {
            bindings: d.bindings.clone(),
            accounts: d.users.clone(),
            impersonators: d.users.iter().map(UserAccount::impersonator).collect(),
            namespaces: d.namespaces.clone(),
        }
    }

    #[test]
    fn in_step_means_no_changes_and_each_difference_one_change() {
        let a = access(&[
            (&["user:alice"], Role::Viewer, &[]),
            (&["user:bob"], Role::Developer, &["team-a"]),
        ]);
        let d = desired(&a);
        assert_eq!(changes(&d, &observed_of(&d)), []);

        // From nothing: namespaces, users, then bindings.
        let all: Vec<String> = changes(&d, &Observed::default())
            .iter()
            .map(ToString::to_string)
            .collect();
        assert_eq!(all.len(), 2 + 2 + 2, "{all:#?}");
        assert!(
            all[0].starts_with("create namespace clusterctl-access"),
            "{all:#?}"
        );
        assert!(
            all[4].starts_with("create ClusterRoleBinding clusterctl:viewer -> view [User:alice]"),
            "{all:#?}"
        );

        // Alice revoked: her binding and her account go, before anything is created.
        let mut after = a.clone();
        revoke(&mut after, "user:alice", None, &[]).unwrap();
        let c = changes(&desired(&after), &observed_of(&d));
        assert_eq!(c.len(), 2, "{c:#?}");
        assert!(matches!(&c[0], Change::DeleteBinding(b) if b.name == "clusterctl:viewer"));
        assert!(matches!(&c[1], Change::DeleteUser(u) if u.user == "alice"));

        // A changed role reference is a replacement, changed subjects an update.
        let mut o = observed_of(&d);
        o.bindings[0].cluster_role = "edit".into();
        o.bindings[1].subjects.clear();
        let c = changes(&d, &o);
        assert!(
            matches!(&c[0], Change::UpdateBinding(_)) || matches!(&c[0], Change::ReplaceBinding(_))
        );
        assert_eq!(c.len(), 2);

        // An impersonation role without its account is cleaned up.
        let mut o = observed_of(&d);
        o.impersonators
            .insert("clusterctl:user:u-gone-0000000000".into());
        let c = changes(&d, &o);
        assert!(matches!(&c[..], [Change::DeleteUser(u)] if u.account == "u-gone-0000000000"));
    }
}
