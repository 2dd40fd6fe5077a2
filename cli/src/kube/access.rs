//! Access objects through the API: reading what clusterctl made (by label), applying one
//! [`Change`](crate::engine::iam::Change) at a time (each idempotent: an object already there
//! or already gone counts as done), and issuing a user's bound token (TokenRequest).

use std::collections::BTreeMap;
use std::time::Duration;

use k8s_openapi::api::authentication::v1::{TokenRequest, TokenRequestSpec};
use k8s_openapi::api::core::v1::{Namespace, ServiceAccount};
use k8s_openapi::api::rbac::v1::{
    ClusterRole, ClusterRoleBinding, PolicyRule, RoleBinding, RoleRef, Subject as RbacSubject,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::{Api, DeleteParams, ListParams, PostParams};
use zeroize::Zeroizing;

use super::{KubeClient, KubeError};
use crate::engine::iam::{
    ACCESS_LABEL, ACCESS_NAMESPACE, Binding, Change, KIND_BINDING, KIND_USER, MANAGED_BY, Observed,
    Scope, Subject, USER_ANNOTATION, UserAccount, selector,
};

const RBAC_GROUP: &str = "rbac.authorization.k8s.io";

fn labels(kind: &str) -> BTreeMap<String, String> {
    BTreeMap::from([
        (MANAGED_BY.0.to_owned(), MANAGED_BY.1.to_owned()),
        (ACCESS_LABEL.to_owned(), kind.to_owned()),
    ])
}

fn meta(name: &str, namespace: Option<&str>, kind: &str) -> ObjectMeta {
    ObjectMeta {
        name: Some(name.to_owned()),
        namespace: namespace.map(str::to_owned),
        labels: Some(labels(kind)),
        ..ObjectMeta::default()
    }
}

fn code(e: &KubeError) -> Option<u16> {
    match e {
        KubeError::Api { code, .. } => Some(*code),
        _ => None,
    }
}

/// `Ok` for a 404 (already gone).
fn gone_ok(r: Result<(), KubeError>) -> Result<(), KubeError> {
    match r {
        Err(e) if code(&e) == Some(404) => Ok(()),
        other => other,
    }
}

/// `Ok` for a 409 (already there).
fn exists_ok(r: Result<(), KubeError>) -> Result<(), KubeError> {
    match r {
        Err(e) if code(&e) == Some(409) => Ok(()),
        other => other,
    }
}

fn to_rbac(s: &Subject) -> RbacSubject {
    RbacSubject {
        kind: s.kind.clone(),
        name: s.name.clone(),
        namespace: s.namespace.clone(),
        api_group: (s.kind != "ServiceAccount").then(|| RBAC_GROUP.to_owned()),
    }
}

fn from_rbac(s: &RbacSubject) -> Subject {
    Subject {
        kind: s.kind.clone(),
        name: s.name.clone(),
        namespace: s.namespace.clone().filter(|n| !n.is_empty()),
    }
}

fn role_ref(cluster_role: &str) -> RoleRef {
    RoleRef {
        api_group: RBAC_GROUP.to_owned(),
        kind: "ClusterRole".to_owned(),
        name: cluster_role.to_owned(),
    }
}

fn binding_of(
    scope: Scope,
    meta: &ObjectMeta,
    role: &RoleRef,
    subjects: Option<&Vec<RbacSubject>>,
) -> Binding {
    let mut subjects: Vec<Subject> = subjects
        .map(|s| s.iter().map(from_rbac).collect())
        .unwrap_or_default();
    subjects.sort();
    Binding {
        scope,
        name: meta.name.clone().unwrap_or_default(),
        // Only ClusterRoles are ours to bind; anything else reads as "to be replaced".
        cluster_role: if role.kind == "ClusterRole" {
            role.name.clone()
        } else {
            format!("{}/{}", role.kind, role.name)
        },
        subjects,
    }
}

impl KubeClient {
    /// clusterctl's access objects in the cluster, found by their labels, and its namespaces.
    pub async fn observe_access(&self) -> Result<Observed, KubeError> {
        let c = self.client();
        let bindings_sel = ListParams::default().labels(&selector(KIND_BINDING));
        let users_sel = ListParams::default().labels(&selector(KIND_USER));
        let mut observed = Observed::default();

        let crbs: Api<ClusterRoleBinding> = Api::all(c.clone());
        for b in self
            .call(
                "listing clusterctl's ClusterRoleBindings",
                crbs.list(&bindings_sel),
            )
            .await?
        {
            observed.bindings.push(binding_of(
                Scope::Cluster,
                &b.metadata,
                &b.role_ref,
                b.subjects.as_ref(),
            ));
        }
        let rbs: Api<RoleBinding> = Api::all(c.clone());
        for b in self
            .call("listing clusterctl's RoleBindings", rbs.list(&bindings_sel))
            .await?
        {
            let ns = b.metadata.namespace.clone().unwrap_or_default();
            observed.bindings.push(binding_of(
                Scope::Namespace(ns),
                &b.metadata,
                &b.role_ref,
                b.subjects.as_ref(),
            ));
        }
        let accounts: Api<ServiceAccount> = Api::namespaced(c.clone(), ACCESS_NAMESPACE);
        for a in self
            .call("listing the users' accounts", accounts.list(&users_sel))
            .await?
        {
            let user = a
                .metadata
                .annotations
                .as_ref()
                .and_then(|m| m.get(USER_ANNOTATION))
                .cloned()
                .unwrap_or_default();
            observed.accounts.push(UserAccount {
                user,
                account: a.metadata.name.unwrap_or_default(),
            });
        }
        let roles: Api<ClusterRole> = Api::all(c.clone());
        for r in self
            .call(
                "listing the users' impersonation roles",
                roles.list(&users_sel),
            )
            .await?
        {
            if let Some(n) = r.metadata.name {
                observed.impersonators.insert(n);
            }
        }
        let namespaces: Api<Namespace> = Api::all(c);
        for n in self
            .call(
                "listing namespaces",
                namespaces.list(&ListParams::default()),
            )
            .await?
        {
            if let Some(name) = n.metadata.name {
                observed.namespaces.insert(name);
            }
        }
        observed
            .bindings
            .sort_by(|a, b| (&a.scope, &a.name).cmp(&(&b.scope, &b.name)));
        observed.accounts.sort();
        Ok(observed)
    }

    /// Applies one change. Idempotent: re-applying a change that took effect succeeds.
    pub async fn apply_access_change(&self, change: &Change) -> Result<(), KubeError> {
        let c = self.client();
        let pp = PostParams::default();
        let dp = DeleteParams::default();
        match change {
            Change::CreateNamespace(ns) => {
                let api: Api<Namespace> = Api::all(c);
                let obj = Namespace {
                    metadata: ObjectMeta {
                        name: Some(ns.clone()),
                        labels: Some(BTreeMap::from([(
                            MANAGED_BY.0.to_owned(),
                            MANAGED_BY.1.to_owned(),
                        )])),
                        ..ObjectMeta::default()
                    },
                    ..Namespace::default()
                };
                let op = format!("creating namespace {ns}");
                exists_ok(self.call(&op, api.create(&pp, &obj)).await.map(drop))
            }
            Change::CreateUser(u) => self.create_user(u).await,
            Change::DeleteUser(u) => {
                // The account first: that is what ends its tokens.
                let accounts: Api<ServiceAccount> = Api::namespaced(c.clone(), ACCESS_NAMESPACE);
                let op = format!("deleting the account of user {:?}", u.user);
                gone_ok(
                    self.call(&op, accounts.delete(&u.account, &dp))
                        .await
                        .map(drop),
                )?;
                let crbs: Api<ClusterRoleBinding> = Api::all(c.clone());
                let op = format!("deleting ClusterRoleBinding {}", u.impersonator());
                gone_ok(
                    self.call(&op, crbs.delete(&u.impersonator(), &dp))
                        .await
                        .map(drop),
                )?;
                let roles: Api<ClusterRole> = Api::all(c);
                let op = format!("deleting ClusterRole {}", u.impersonator());
                gone_ok(
                    self.call(&op, roles.delete(&u.impersonator(), &dp))
                        .await
                        .map(drop),
                )
            }
            Change::CreateBinding(b) => self.create_binding(b).await,
            Change::UpdateBinding(b) => self.update_binding(b).await,
            Change::ReplaceBinding(b) => {
                self.delete_binding(b).await?;
                self.create_binding(b).await
            }
            Change::DeleteBinding(b) => self.delete_binding(b).await,
        }
    }

    async fn create_user(&self, u: &UserAccount) -> Result<(), KubeError> {
        let c = self.client();
        let pp = PostParams::default();
        let mut sa_meta = meta(&u.account, Some(ACCESS_NAMESPACE), KIND_USER);
        sa_meta.annotations = Some(BTreeMap::from([(
            USER_ANNOTATION.to_owned(),
            u.user.clone(),
        )]));
        let sa = ServiceAccount {
            metadata: sa_meta,
            // Its tokens are only ever requested through TokenRequest: no secret is mounted.
            automount_service_account_token: Some(false),
            ..ServiceAccount::default()
        };
        let accounts: Api<ServiceAccount> = Api::namespaced(c.clone(), ACCESS_NAMESPACE);
        let op = format!("creating the account of user {:?}", u.user);
        exists_ok(self.call(&op, accounts.create(&pp, &sa)).await.map(drop))?;

        let name = u.impersonator();
        let role = ClusterRole {
            metadata: meta(&name, None, KIND_USER),
            rules: Some(vec![PolicyRule {
                api_groups: Some(vec![String::new()]),
                resources: Some(vec!["users".to_owned()]),
                verbs: vec!["impersonate".to_owned()],
                resource_names: Some(vec![u.user.clone()]),
                ..PolicyRule::default()
            }]),
            ..ClusterRole::default()
        };
        let roles: Api<ClusterRole> = Api::all(c.clone());
        let op = format!("creating ClusterRole {name}");
        exists_ok(self.call(&op, roles.create(&pp, &role)).await.map(drop))?;
        let binding = ClusterRoleBinding {
            metadata: meta(&name, None, KIND_USER),
            role_ref: role_ref(&name),
            subjects: Some(vec![RbacSubject {
                kind: "ServiceAccount".to_owned(),
                name: u.account.clone(),
                namespace: Some(ACCESS_NAMESPACE.to_owned()),
                api_group: None,
            }]),
        };
        let crbs: Api<ClusterRoleBinding> = Api::all(c);
        let op = format!("creating ClusterRoleBinding {name}");
        exists_ok(self.call(&op, crbs.create(&pp, &binding)).await.map(drop))
    }

    async fn create_binding(&self, b: &Binding) -> Result<(), KubeError> {
        let c = self.client();
        let pp = PostParams::default();
        let subjects = Some(b.subjects.iter().map(to_rbac).collect());
        match &b.scope {
            Scope::Cluster => {
                let api: Api<ClusterRoleBinding> = Api::all(c);
                let obj = ClusterRoleBinding {
                    metadata: meta(&b.name, None, KIND_BINDING),
                    role_ref: role_ref(&b.cluster_role),
                    subjects,
                };
                let op = format!("creating ClusterRoleBinding {}", b.name);
                match self.call(&op, api.create(&pp, &obj)).await {
                    Err(e) if code(&e) == Some(409) => self.update_binding(b).await,
                    r => r.map(drop),
                }
            }
            Scope::Namespace(ns) => {
                let api: Api<RoleBinding> = Api::namespaced(c, ns);
                let obj = RoleBinding {
                    metadata: meta(&b.name, Some(ns), KIND_BINDING),
                    role_ref: role_ref(&b.cluster_role),
                    subjects,
                };
                let op = format!("creating RoleBinding {} in {ns}", b.name);
                match self.call(&op, api.create(&pp, &obj)).await {
                    Err(e) if code(&e) == Some(409) => self.update_binding(b).await,
                    r => r.map(drop),
                }
            }
        }
    }

    /// Sets a binding's subjects (read, change, replace: a concurrent change is a 409, retried
    /// by a re-run). A binding of that name that is not clusterctl's is refused.
    async fn update_binding(&self, b: &Binding) -> Result<(), KubeError> {
        let c = self.client();
        let pp = PostParams::default();
        let subjects: Vec<RbacSubject> = b.subjects.iter().map(to_rbac).collect();
        let not_ours = |what: String| KubeError::Unexpected {
            op: format!("updating {what}"),
            detail: format!(
                "it exists without clusterctl's label {ACCESS_LABEL}={KIND_BINDING}, so clusterctl leaves it alone; rename or delete it to let clusterctl manage {what}"
            ),
        };
        let ours = |m: &ObjectMeta| {
            m.labels
                .as_ref()
                .and_then(|l| l.get(ACCESS_LABEL))
                .is_some_and(|v| v == KIND_BINDING)
        };
        match &b.scope {
            Scope::Cluster => {
                let api: Api<ClusterRoleBinding> = Api::all(c);
                let op = format!("reading ClusterRoleBinding {}", b.name);
                let mut obj = self.call(&op, api.get(&b.name)).await?;
                if !ours(&obj.metadata) {
                    return Err(not_ours(format!("ClusterRoleBinding {}", b.name)));
                }
                if obj.role_ref != role_ref(&b.cluster_role) {
                    self.delete_binding(b).await?;
                    return Box::pin(self.create_binding(b)).await;
                }
                obj.subjects = Some(subjects);
                let op = format!("updating ClusterRoleBinding {}", b.name);
                self.call(&op, api.replace(&b.name, &pp, &obj))
                    .await
                    .map(drop)
            }
            Scope::Namespace(ns) => {
                let api: Api<RoleBinding> = Api::namespaced(c, ns);
                let op = format!("reading RoleBinding {} in {ns}", b.name);
                let mut obj = self.call(&op, api.get(&b.name)).await?;
                if !ours(&obj.metadata) {
                    return Err(not_ours(format!("RoleBinding {} in {ns}", b.name)));
                }
                if obj.role_ref != role_ref(&b.cluster_role) {
                    self.delete_binding(b).await?;
                    return Box::pin(self.create_binding(b)).await;
                }
                obj.subjects = Some(subjects);
                let op = format!("updating RoleBinding {} in {ns}", b.name);
                self.call(&op, api.replace(&b.name, &pp, &obj))
                    .await
                    .map(drop)
            }
        }
    }

    async fn delete_binding(&self, b: &Binding) -> Result<(), KubeError> {
        let c = self.client();
        let dp = DeleteParams::default();
        match &b.scope {
            Scope::Cluster => {
                let api: Api<ClusterRoleBinding> = Api::all(c);
                let op = format!("deleting ClusterRoleBinding {}", b.name);
                gone_ok(self.call(&op, api.delete(&b.name, &dp)).await.map(drop))
            }
            Scope::Namespace(ns) => {
                let api: Api<RoleBinding> = Api::namespaced(c, ns);
                let op = format!("deleting RoleBinding {} in {ns}", b.name);
                gone_ok(self.call(&op, api.delete(&b.name, &dp)).await.map(drop))
            }
        }
    }

    /// A bound token of `account` in [`ACCESS_NAMESPACE`] valid for `ttl` (the API's minimum is
    /// 10 minutes), with the expiry the API server set (RFC 3339).
    pub async fn user_token(
        &self,
        account: &str,
        ttl: Duration,
    ) -> Result<(Zeroizing<String>, String), KubeError> {
        let api: Api<ServiceAccount> = Api::namespaced(self.client(), ACCESS_NAMESPACE);
        let request = TokenRequest {
            spec: TokenRequestSpec {
                audiences: Vec::new(),
                expiration_seconds: Some(i64::try_from(ttl.as_secs()).unwrap_or(i64::MAX)),
                bound_object_ref: None,
            },
            ..TokenRequest::default()
        };
        let op = format!("requesting a token of {ACCESS_NAMESPACE}/{account}");
        let answer = self
            .call(
                &op,
                api.create_token_request(account, &PostParams::default(), &request),
            )
            .await?;
        let Some(status) = answer.status else {
            return Err(KubeError::Unexpected {
                op,
                detail: "the answer has no status (no token)".into(),
            });
        };
        let expires = status.expiration_timestamp.0.to_string();
        Ok((Zeroizing::new(status.token), expires))
    }
}
