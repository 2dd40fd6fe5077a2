//! Drain simulation: before a node is touched, what evicting its pods would do, and what will
//! block it. A pure function of the pods, the PodDisruptionBudgets and the workloads' replica
//! counts as listed from the API (see [`simulate`]), so `plan` can show it and tests feed it
//! recorded lists.
//!
//! What drain skips (as `kubectl drain` does): DaemonSet pods (their controller would put them
//! back at once, and they tolerate the cordon), mirror pods (static pods of the kubelet; the
//! API cannot delete them), and finished pods (nothing to disrupt).
//!
//! What blocks or hurts:
//! - a PodDisruptionBudget covering the pod that allows no disruption now: the Eviction API
//!   answers 429 until the budget allows one, so drain waits (up to its timeout);
//! - a pod with no controller: nothing recreates it, so eviction deletes it for good (drain
//!   refuses it unless forced);
//! - a pod with local storage (`emptyDir`): its data is lost (drain refuses it unless forced);
//! - the only replica of a workload: evicting it is an outage of that workload until the new
//!   pod runs (a warning: drain proceeds).

use std::collections::BTreeMap;
use std::fmt;

use k8s_openapi::api::core::v1::{Node, Pod};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::api::{Api, ListParams, Patch, PatchParams};

use super::{KubeClient, KubeError, PolicyApi};

/// A PodDisruptionBudget as both `policy/v1beta1` and `policy/v1` serve it (the fields drain
/// reads have the same names and shapes in both; k8s-openapi no longer carries v1beta1).
#[derive(Debug, Clone, Default, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PodDisruptionBudget {
    /// Name and namespace.
    #[serde(default)]
    pub metadata: ObjectMeta,
    /// What the budget asks for.
    #[serde(default)]
    pub spec: PdbSpec,
    /// What the disruption controller computed.
    #[serde(default)]
    pub status: PdbStatus,
}

/// `spec` of a [`PodDisruptionBudget`].
#[derive(Debug, Clone, Default, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PdbSpec {
    /// Which pods the budget covers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<LabelSelector>,
    /// Pods that must stay available.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_available: Option<IntOrString>,
    /// Pods that may be unavailable.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_unavailable: Option<IntOrString>,
}

/// `status` of a [`PodDisruptionBudget`].
#[derive(Debug, Clone, Default, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PdbStatus {
    /// Evictions allowed right now.
    #[serde(default)]
    pub disruptions_allowed: i32,
    /// Healthy pods covered.
    #[serde(default)]
    pub current_healthy: i32,
    /// Healthy pods wanted.
    #[serde(default)]
    pub desired_healthy: i32,
    /// Pods covered.
    #[serde(default)]
    pub expected_pods: i32,
}

/// A list of [`PodDisruptionBudget`]s as the API returns it.
#[derive(Debug, Clone, Default, serde::Deserialize)]
pub struct PdbList {
    /// The budgets.
    #[serde(default)]
    pub items: Vec<PodDisruptionBudget>,
}

/// A pod, named `namespace/name`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct PodRef {
    /// Namespace.
    pub namespace: String,
    /// Name.
    pub name: String,
}

impl fmt::Display for PodRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// Why drain leaves a pod alone.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Skip {
    /// Managed by a DaemonSet.
    DaemonSet,
    /// A mirror pod (a kubelet's static pod).
    Mirror,
    /// Succeeded or Failed: nothing runs.
    Finished,
}

/// What will stop or hurt a drain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Blocker {
    /// A PodDisruptionBudget covering the pod allows no disruption now (eviction gets 429).
    Budget {
        /// The budget, `namespace/name`.
        pdb: String,
    },
    /// No controller: eviction deletes the pod for good (only with `--force`).
    NoController,
    /// `emptyDir` volumes: their data is lost (only with `--force`).
    LocalStorage {
        /// The volumes.
        volumes: Vec<String>,
    },
    /// The only replica of its workload: an outage until its replacement runs (a warning).
    SingleReplica {
        /// The workload, `Kind/name`.
        workload: String,
    },
}

impl Blocker {
    /// Whether it stops the drain (as opposed to a warning).
    pub fn blocks(&self) -> bool {
        !matches!(self, Blocker::SingleReplica { .. })
    }
}

impl fmt::Display for Blocker {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Blocker::Budget { pdb } => {
                write!(f, "PodDisruptionBudget {pdb} allows no disruption now")
            }
            Blocker::NoController => f.write_str("no controller: evicting deletes it for good"),
            Blocker::LocalStorage { volumes } => {
                write!(f, "local storage lost on eviction: {}", volumes.join(", "))
            }
            Blocker::SingleReplica { workload } => {
                write!(f, "the only replica of {workload}: down until rescheduled")
            }
        }
    }
}

/// What draining one node would do.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DrainSimulation {
    /// Pods that would be evicted, each with what blocks or hurts its eviction (empty: none).
    pub evict: Vec<(PodRef, Vec<Blocker>)>,
    /// Pods drain leaves alone, and why.
    pub skip: Vec<(PodRef, Skip)>,
}

impl DrainSimulation {
    /// Whether nothing blocks the drain (warnings aside).
    pub fn clear(&self) -> bool {
        self.evict
            .iter()
            .all(|(_, b)| b.iter().all(|b| !b.blocks()))
    }

    /// Every (pod, blocker or warning) pair, in pod order.
    pub fn findings(&self) -> impl Iterator<Item = (&PodRef, &Blocker)> {
        self.evict
            .iter()
            .flat_map(|(pod, blockers)| blockers.iter().map(move |b| (pod, b)))
    }
}

/// The replica count of workloads, by `(namespace, Kind, name)`, for the owners pods name
/// (ReplicaSet, StatefulSet, ReplicationController, ...). A workload not listed is not judged
/// for [`Blocker::SingleReplica`].
pub type Replicas = BTreeMap<(String, String, String), i32>;

/// What draining `node` would do, from the cluster's pods (any node; others are ignored), its
/// PodDisruptionBudgets and the workloads' replica counts. `policy` says how budgets are read:
/// an empty selector covers no pod in `policy/v1beta1` and every pod of the namespace in
/// `policy/v1`.
pub fn simulate(
    node: &str,
    pods: &[Pod],
    budgets: &[PodDisruptionBudget],
    replicas: &Replicas,
    policy: PolicyApi,
) -> DrainSimulation {
    let mut out = DrainSimulation::default();
    let mut on_node: Vec<&Pod> = pods
        .iter()
        .filter(|p| p.spec.as_ref().and_then(|s| s.node_name.as_deref()) == Some(node))
        .collect();
    on_node.sort_by_key(|p| (p.metadata.namespace.clone(), p.metadata.name.clone()));
    for pod in on_node {
        let meta = &pod.metadata;
        let namespace = meta.namespace.clone().unwrap_or_default();
        let pod_ref = PodRef {
            namespace: namespace.clone(),
            name: meta.name.clone().unwrap_or_default(),
        };
        let controller = meta
            .owner_references
            .as_ref()
            .and_then(|o| o.iter().find(|o| o.controller == Some(true)));
        let phase = pod.status.as_ref().and_then(|s| s.phase.as_deref());
        let mirror = meta
            .annotations
            .as_ref()
            .is_some_and(|a| a.contains_key("kubernetes.io/config.mirror"));
        if mirror {
            out.skip.push((pod_ref, Skip::Mirror));
            continue;
        }
        if controller.is_some_and(|c| c.kind == "DaemonSet") {
            out.skip.push((pod_ref, Skip::DaemonSet));
            continue;
        }
        if matches!(phase, Some("Succeeded") | Some("Failed")) {
            out.skip.push((pod_ref, Skip::Finished));
            continue;
        }
        let mut blockers = Vec::new();
        let labels = meta.labels.clone().unwrap_or_default();
        for pdb in budgets
            .iter()
            .filter(|b| b.metadata.namespace.as_deref() == Some(namespace.as_str()))
        {
            let covers = match &pdb.spec.selector {
                None => false,
                Some(sel) if selector_is_empty(sel) => policy == PolicyApi::V1,
                Some(sel) => selector_matches(sel, &labels),
            };
            if covers && pdb.status.disruptions_allowed <= 0 {
                blockers.push(Blocker::Budget {
                    pdb: format!(
                        "{namespace}/{}",
                        pdb.metadata.name.as_deref().unwrap_or_default()
                    ),
                });
            }
        }
        match controller {
            None => blockers.push(Blocker::NoController),
            Some(c) => {
                let key = (namespace.clone(), c.kind.clone(), c.name.clone());
                if replicas.get(&key) == Some(&1) {
                    blockers.push(Blocker::SingleReplica {
                        workload: format!("{}/{}", c.kind, c.name),
                    });
                }
            }
        }
        let local: Vec<String> = pod
            .spec
            .as_ref()
            .and_then(|s| s.volumes.as_ref())
            .map(|v| {
                v.iter()
                    .filter(|v| v.empty_dir.is_some())
                    .map(|v| v.name.clone())
                    .collect()
            })
            .unwrap_or_default();
        if !local.is_empty() {
            blockers.push(Blocker::LocalStorage { volumes: local });
        }
        out.evict.push((pod_ref, blockers));
    }
    out
}

fn selector_is_empty(sel: &LabelSelector) -> bool {
    sel.match_labels.as_ref().is_none_or(BTreeMap::is_empty)
        && sel.match_expressions.as_ref().is_none_or(Vec::is_empty)
}

/// Whether `labels` satisfy `sel` (matchLabels and matchExpressions: In, NotIn, Exists,
/// DoesNotExist; an unknown operator matches nothing, as the API server would reject it).
pub fn selector_matches(sel: &LabelSelector, labels: &BTreeMap<String, String>) -> bool {
    let by_labels = sel
        .match_labels
        .iter()
        .flatten()
        .all(|(k, v)| labels.get(k) == Some(v));
    let by_expressions = sel.match_expressions.iter().flatten().all(|e| {
        let value = labels.get(&e.key);
        let values = e.values.as_deref().unwrap_or_default();
        match e.operator.as_str() {
            "In" => value.is_some_and(|v| values.contains(v)),
            "NotIn" => value.is_none_or(|v| !values.contains(v)),
            "Exists" => value.is_some(),
            "DoesNotExist" => value.is_none(),
            _ => false,
        }
    });
    by_labels && by_expressions
}

/// Drain's API calls.
impl KubeClient {
    /// Cordons (`true`) or uncordons (`false`) a node: `spec.unschedulable`.
    pub async fn set_unschedulable(
        &self,
        node: &str,
        unschedulable: bool,
    ) -> Result<(), KubeError> {
        let nodes: Api<Node> = Api::all(self.client());
        let patch = serde_json::json!({"spec": {"unschedulable": unschedulable}});
        let op = format!(
            "{} node {node}",
            if unschedulable {
                "cordoning"
            } else {
                "uncordoning"
            }
        );
        self.call(
            &op,
            nodes.patch(node, &PatchParams::default(), &Patch::Merge(&patch)),
        )
        .await
        .map(|_| ())
    }

    /// The pods bound to `node`, in every namespace.
    pub async fn pods_on(&self, node: &str) -> Result<Vec<Pod>, KubeError> {
        let pods: Api<Pod> = Api::all(self.client());
        let params = ListParams::default().fields(&format!("spec.nodeName={node}"));
        let op = format!("listing the pods of node {node}");
        Ok(self.call(&op, pods.list(&params)).await?.items)
    }

    /// Every PodDisruptionBudget, from the `policy` version `policy` serves.
    pub async fn disruption_budgets(
        &self,
        policy: PolicyApi,
    ) -> Result<Vec<PodDisruptionBudget>, KubeError> {
        let op = format!("listing {policy} PodDisruptionBudgets");
        let request = http::Request::get(format!("/apis/{policy}/poddisruptionbudgets"))
            .body(Vec::new())
            .map_err(|e| KubeError::Unexpected {
                op: op.clone(),
                detail: e.to_string(),
            })?;
        let list: PdbList = self.call(&op, self.client().request(request)).await?;
        Ok(list.items)
    }

    /// Evicts a pod through the Eviction API of `policy`'s version, so PodDisruptionBudgets
    /// are honoured: a budget that allows no disruption now makes this fail with a 429
    /// ([`KubeError::disposition`] says `Wait`: try again later).
    pub async fn evict(&self, pod: &PodRef, policy: PolicyApi) -> Result<(), KubeError> {
        let op = format!("evicting pod {pod}");
        let body = serde_json::json!({
            "apiVersion": policy.api_version(),
            "kind": "Eviction",
            "metadata": {"name": pod.name, "namespace": pod.namespace},
        });
        let request = http::Request::post(format!(
            "/api/v1/namespaces/{}/pods/{}/eviction",
            pod.namespace, pod.name
        ))
        .header(http::header::CONTENT_TYPE, "application/json")
        .body(serde_json::to_vec(&body).unwrap_or_default())
        .map_err(|e| KubeError::Unexpected {
            op: op.clone(),
            detail: e.to_string(),
        })?;
        self.call(&op, self.client().request_text(request))
            .await
            .map(|_| ())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Pods of node `n1` (and one elsewhere), the way `GET /api/v1/pods` lists them.
    fn pods() -> Vec<Pod> {
        let owner = |kind: &str, name: &str| {
            serde_json::json!([{"apiVersion": "apps/v1", "kind": kind, "name": name,
                "uid": "u", "controller": true}])
        };
        let pod = |ns: &str, name: &str, labels: serde_json::Value, owners: serde_json::Value| {
            serde_json::json!({
                "metadata": {"namespace": ns, "name": name, "labels": labels,
                             "ownerReferences": owners},
                "spec": {"nodeName": "n1", "containers": [{"name": "c"}]},
                "status": {"phase": "Running"},
            })
        };
        let mut list = vec![
            pod(
                "default",
                "web-1",
                serde_json::json!({"app": "web"}),
                owner("ReplicaSet", "web-rs"),
            ),
            pod(
                "default",
                "web-2",
                serde_json::json!({"app": "web"}),
                owner("ReplicaSet", "web-rs"),
            ),
            pod(
                "default",
                "db-0",
                serde_json::json!({"app": "db"}),
                owner("StatefulSet", "db"),
            ),
            pod(
                "default",
                "lonely",
                serde_json::json!({}),
                serde_json::json!([]),
            ),
            pod(
                "kube-system",
                "proxy-x",
                serde_json::json!({"k8s-app": "kube-proxy"}),
                owner("DaemonSet", "kube-proxy"),
            ),
            pod(
                "team",
                "cache-1",
                serde_json::json!({"app": "cache", "tier": "gold"}),
                owner("ReplicaSet", "cache-rs"),
            ),
            pod("team", "job-1", serde_json::json!({}), owner("Job", "job")),
        ];
        list[3]["metadata"]
            .as_object_mut()
            .expect("object")
            .remove("ownerReferences");
        list[5]["spec"]["volumes"] = serde_json::json!([{"name": "scratch", "emptyDir": {}},
                                                        {"name": "cfg", "configMap": {"name": "x"}}]);
        list[6]["status"]["phase"] = serde_json::json!("Succeeded");
        list.push(serde_json::json!({
            "metadata": {"namespace": "kube-system", "name": "kube-apiserver-n1",
                         "annotations": {"kubernetes.io/config.mirror": "abc"}},
            "spec": {"nodeName": "n1", "containers": [{"name": "c"}]},
        }));
        list.push(serde_json::json!({
            "metadata": {"namespace": "default", "name": "elsewhere"},
            "spec": {"nodeName": "n2", "containers": [{"name": "c"}]},
        }));
        list.into_iter()
            .map(|v| serde_json::from_value(v).expect("pod"))
            .collect()
    }

    /// Budgets as `GET /apis/policy/v1beta1/poddisruptionbudgets` lists them.
    fn budgets() -> Vec<PodDisruptionBudget> {
        let list: PdbList = serde_json::from_value(serde_json::json!({
            "apiVersion": "policy/v1beta1", "kind": "PodDisruptionBudgetList",
            "items": [
                {"metadata": {"namespace": "default", "name": "web"},
                 "spec": {"maxUnavailable": 1, "selector": {"matchLabels": {"app": "web"}}},
                 "status": {"disruptionsAllowed": 1, "currentHealthy": 2, "desiredHealthy": 1, "expectedPods": 2}},
                {"metadata": {"namespace": "default", "name": "db"},
                 "spec": {"maxUnavailable": 0, "selector": {"matchLabels": {"app": "db"}}},
                 "status": {"disruptionsAllowed": 0}},
                {"metadata": {"namespace": "team", "name": "gold"},
                 "spec": {"minAvailable": "100%", "selector": {"matchExpressions": [
                     {"key": "tier", "operator": "In", "values": ["gold", "silver"]}]}},
                 "status": {"disruptionsAllowed": 0}},
                {"metadata": {"namespace": "team", "name": "everything"},
                 "spec": {"maxUnavailable": 0, "selector": {}},
                 "status": {"disruptionsAllowed": 0}},
                {"metadata": {"namespace": "other", "name": "web"},
                 "spec": {"maxUnavailable": 0, "selector": {"matchLabels": {"app": "web"}}},
                 "status": {"disruptionsAllowed": 0}}
            ]
        }))
        .expect("pdb list");
        list.items
    }

    fn render(sim: &DrainSimulation) -> Vec<String> {
        let mut lines: Vec<String> = sim
            .evict
            .iter()
            .map(|(pod, blockers)| {
                let b: Vec<String> = blockers.iter().map(ToString::to_string).collect();
                format!(
                    "evict {pod}: {}",
                    if b.is_empty() {
                        "ok".into()
                    } else {
                        b.join("; ")
                    }
                )
            })
            .collect();
        lines.extend(
            sim.skip
                .iter()
                .map(|(pod, why)| format!("skip {pod}: {why:?}")),
        );
        lines
    }

    #[test]
    fn simulation_lists_what_blocks_each_pod() {
        let replicas: Replicas = [
            (("default".into(), "ReplicaSet".into(), "web-rs".into()), 2),
            (("default".into(), "StatefulSet".into(), "db".into()), 1),
            (("team".into(), "ReplicaSet".into(), "cache-rs".into()), 3),
        ]
        .into();
        let sim = simulate("n1", &pods(), &budgets(), &replicas, PolicyApi::V1beta1);
        let want = [
            "evict default/db-0: PodDisruptionBudget default/db allows no disruption now; the only replica of StatefulSet/db: down until rescheduled",
            "evict default/lonely: no controller: evicting deletes it for good",
            "evict default/web-1: ok",
            "evict default/web-2: ok",
            "evict team/cache-1: PodDisruptionBudget team/gold allows no disruption now; local storage lost on eviction: scratch",
            "skip kube-system/kube-apiserver-n1: Mirror",
            "skip kube-system/proxy-x: DaemonSet",
            "skip team/job-1: Finished",
        ];
        assert_eq!(render(&sim), want);
        assert!(!sim.clear());
        assert_eq!(sim.findings().filter(|(_, b)| b.blocks()).count(), 4);

        // policy/v1: the empty selector of team/everything now covers every pod of `team`.
        let sim = simulate("n1", &pods(), &budgets(), &replicas, PolicyApi::V1);
        let cache = &sim
            .evict
            .iter()
            .find(|(p, _)| p.name == "cache-1")
            .expect("cache-1")
            .1;
        assert!(cache.contains(&Blocker::Budget {
            pdb: "team/everything".into()
        }));
    }

    #[test]
    fn a_node_with_only_replicated_pods_is_clear() {
        let sim = simulate(
            "n1",
            &pods()[..2],
            &budgets(),
            &Replicas::new(),
            PolicyApi::V1beta1,
        );
        assert!(sim.clear(), "{:?}", render(&sim));
        let sim = simulate(
            "n9",
            &pods(),
            &budgets(),
            &Replicas::new(),
            PolicyApi::V1beta1,
        );
        assert_eq!(sim, DrainSimulation::default());
    }

    #[test]
    fn selector_operators() {
        let sel: LabelSelector = serde_json::from_value(serde_json::json!({
            "matchLabels": {"app": "web"},
            "matchExpressions": [
                {"key": "tier", "operator": "NotIn", "values": ["bronze"]},
                {"key": "canary", "operator": "DoesNotExist"},
                {"key": "zone", "operator": "Exists"}
            ]
        }))
        .expect("selector");
        let labels = |pairs: &[(&str, &str)]| -> BTreeMap<String, String> {
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect()
        };
        let table: &[(&[(&str, &str)], bool)] = &[
            (&[("app", "web"), ("zone", "a")], true),
            (&[("app", "web"), ("zone", "a"), ("tier", "gold")], true),
            (&[("app", "web"), ("zone", "a"), ("tier", "bronze")], false),
            (&[("app", "web"), ("zone", "a"), ("canary", "")], false),
            (&[("app", "web")], false),
            (&[("app", "api"), ("zone", "a")], false),
        ];
        for (pairs, want) in table {
            assert_eq!(selector_matches(&sel, &labels(pairs)), *want, "{pairs:?}");
        }
        let odd: LabelSelector = serde_json::from_value(serde_json::json!({
            "matchExpressions": [{"key": "a", "operator": "Gt", "values": ["1"]}]
        }))
        .expect("selector");
        assert!(!selector_matches(&odd, &labels(&[("a", "2")])));
    }
}
