//! The drain loop: evicts a cordoned node's pods through the Eviction API until none is left,
//! honouring PodDisruptionBudgets (an eviction refused with 429 is tried again later), up to a
//! per-node timeout (default one hour, as GKE); after it, the drain stops with a report naming
//! the pods left and what holds them, or with `force` deletes them.
//!
//! What to do next is a pure function, [`decide`], of the pods still on the node, the pods
//! whose eviction was accepted, the time spent and the options; the loop ([`drain_node`]) only
//! lists, evicts, deletes and sleeps on a [`Clock`], so the decisions are tested with a fixed
//! clock. Cordoning is not done here: the caller cordons first and journals it, so that it can
//! uncordon exactly the nodes it cordoned (see `action::drain`).

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::time::Duration;

use k8s_openapi::api::apps::v1::{ReplicaSet, StatefulSet};
use k8s_openapi::api::core::v1::{Pod, ReplicationController};
use kube::api::{Api, DeleteParams, ListParams};

use super::drain::{Blocker, DrainSimulation, PodRef, Replicas, simulate};
use super::readiness::Clock;
use super::{Disposition, KubeClient, KubeError, PolicyApi};

/// The default per-node drain timeout (GKE's, for PodDisruptionBudgets during upgrades).
pub const DEFAULT_DRAIN_TIMEOUT: Duration = Duration::from_secs(3600);

/// How long forced deletions (after the timeout, with `force`) may take before the drain
/// gives up.
pub const FORCE_GRACE: Duration = Duration::from_secs(60);

/// How a drain behaves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DrainOptions {
    /// Give up (or, with `force`, delete) after this long.
    pub timeout: Duration,
    /// Evict pods with no controller and pods with local storage, and delete what is still
    /// there when the timeout expires (bypassing PodDisruptionBudgets).
    pub force: bool,
    /// Look again after this long.
    pub poll: Duration,
}

impl Default for DrainOptions {
    fn default() -> Self {
        DrainOptions {
            timeout: DEFAULT_DRAIN_TIMEOUT,
            force: false,
            poll: Duration::from_secs(5),
        }
    }
}

/// The next step of a drain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// No pod to move is left on the node.
    Done,
    /// Pods that need force and do not have it (no controller, local storage): nothing is
    /// evicted. Only decided before the first eviction.
    Refuse(Vec<(PodRef, Blocker)>),
    /// Evict these (never evicted, or evicted and still not terminating), then look again.
    /// Empty: only wait (accepted evictions are terminating).
    Evict(Vec<PodRef>),
    /// The timeout expired and `force` is set: delete these at once (grace period 0, like
    /// `kubectl delete --force --grace-period=0`: also what a dead node's pods need).
    Delete(Vec<PodRef>),
    /// The timeout expired: stop with these pods still on the node.
    TimedOut(Vec<PodRef>),
}

/// What to do next, from the node's simulation (its pods as listed now), the pods already
/// terminating, whether any eviction was sent yet, the time spent and the options.
pub fn decide(
    sim: &DrainSimulation,
    terminating: &BTreeSet<PodRef>,
    started: bool,
    elapsed: Duration,
    opts: &DrainOptions,
) -> Decision {
    if sim.evict.is_empty() {
        return Decision::Done;
    }
    if !started && !opts.force {
        let refused: Vec<(PodRef, Blocker)> = sim
            .findings()
            .filter(|(_, b)| matches!(b, Blocker::NoController | Blocker::LocalStorage { .. }))
            .map(|(p, b)| (p.clone(), b.clone()))
            .collect();
        if !refused.is_empty() {
            return Decision::Refuse(refused);
        }
    }
    let pending: Vec<PodRef> = sim.evict.iter().map(|(p, _)| p.clone()).collect();
    if elapsed >= opts.timeout {
        // Forced deletions that do not take (a finalizer holds the pod) end the drain too.
        return if opts.force && elapsed < opts.timeout + FORCE_GRACE {
            Decision::Delete(pending)
        } else {
            Decision::TimedOut(pending)
        };
    }
    Decision::Evict(
        pending
            .into_iter()
            .filter(|p| !terminating.contains(p))
            .collect(),
    )
}

/// What a drain reports as it goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DrainEvent {
    /// The eviction of a pod was accepted.
    Evicted(PodRef),
    /// An eviction was refused for now (a PodDisruptionBudget allows no disruption): the
    /// server's message. Reported once per pod and message.
    Held {
        /// The pod.
        pod: PodRef,
        /// Why, as the API server said it.
        reason: String,
    },
    /// A pod was deleted (`force`, after the timeout).
    Deleted(PodRef),
    /// A transient API error; the loop goes on.
    Retrying(String),
}

/// What a finished drain did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DrainReport {
    /// Pods whose eviction was accepted.
    pub evicted: Vec<PodRef>,
    /// Pods deleted after the timeout (`force`).
    pub deleted: Vec<PodRef>,
    /// Pods left alone (DaemonSet, mirror, finished).
    pub skipped: usize,
    /// How long it took.
    pub took: Duration,
}

/// Why a drain stopped before the node was empty.
#[derive(Debug, thiserror::Error)]
pub enum DrainError {
    /// Pods that need `--force`: nothing was evicted.
    #[error(
        "node {node} has pods that draining would lose for good: {}; nothing was evicted. Move them first, or drain with --force to evict them anyway",
        list(pods)
    )]
    Refused {
        /// The node.
        node: String,
        /// The pods and why.
        pods: Vec<(PodRef, Blocker)>,
    },
    /// The timeout expired with pods still on the node.
    #[error("node {node} still runs {} pod(s) after {} s of draining: {}. Fix what holds them (usually a PodDisruptionBudget that allows no disruption), raise --timeout, or drain with --force to delete them after the timeout", pods.len(), waited.as_secs(), list_reasons(pods))]
    TimedOut {
        /// The node.
        node: String,
        /// How long the drain ran.
        waited: Duration,
        /// The pods left, each with what held it (the last refusal, or a blocker found).
        pods: Vec<(PodRef, String)>,
    },
    /// An API call failed for good.
    #[error("draining node {node}")]
    Api {
        /// The node.
        node: String,
        /// The error.
        #[source]
        source: KubeError,
    },
}

fn list(pods: &[(PodRef, Blocker)]) -> String {
    pods.iter()
        .map(|(p, b)| format!("{p} ({b})"))
        .collect::<Vec<_>>()
        .join(", ")
}

fn list_reasons(pods: &[(PodRef, String)]) -> String {
    pods.iter()
        .map(|(p, r)| {
            if r.is_empty() {
                p.to_string()
            } else {
                format!("{p} ({r})")
            }
        })
        .collect::<Vec<_>>()
        .join(", ")
}

impl fmt::Display for DrainReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} pod(s) evicted, {} deleted, {} left alone (DaemonSet, static or finished) in {:.0} s",
            self.evicted.len(),
            self.deleted.len(),
            self.skipped,
            self.took.as_secs_f64()
        )
    }
}

impl KubeClient {
    /// The replica counts of the workloads pods can name as controller (ReplicaSets,
    /// StatefulSets, ReplicationControllers), for [`simulate`]'s single-replica warning.
    pub async fn workload_replicas(&self) -> Result<Replicas, KubeError> {
        let mut out = Replicas::new();
        let lp = ListParams::default();
        let rs: Api<ReplicaSet> = Api::all(self.client());
        for r in self.call("listing ReplicaSets", rs.list(&lp)).await?.items {
            let replicas = r.spec.and_then(|s| s.replicas).unwrap_or(1);
            out.insert(key(&r.metadata, "ReplicaSet"), replicas);
        }
        let sts: Api<StatefulSet> = Api::all(self.client());
        for s in self
            .call("listing StatefulSets", sts.list(&lp))
            .await?
            .items
        {
            let replicas = s.spec.and_then(|s| s.replicas).unwrap_or(1);
            out.insert(key(&s.metadata, "StatefulSet"), replicas);
        }
        let rc: Api<ReplicationController> = Api::all(self.client());
        for r in self
            .call("listing ReplicationControllers", rc.list(&lp))
            .await?
            .items
        {
            let replicas = r.spec.and_then(|s| s.replicas).unwrap_or(1);
            out.insert(key(&r.metadata, "ReplicationController"), replicas);
        }
        Ok(out)
    }

    /// What draining `node` would do now: its pods, judged against every PodDisruptionBudget
    /// and the workloads' replica counts. Touches nothing.
    pub async fn simulate_drain(
        &self,
        node: &str,
        policy: PolicyApi,
    ) -> Result<DrainSimulation, KubeError> {
        let pods = self.pods_on(node).await?;
        let budgets = self.disruption_budgets(policy).await?;
        let replicas = self.workload_replicas().await?;
        Ok(simulate(node, &pods, &budgets, &replicas, policy))
    }

    /// Deletes the Node object `node` (gone already is fine).
    pub async fn delete_node(&self, node: &str) -> Result<(), KubeError> {
        let api: Api<k8s_openapi::api::core::v1::Node> = Api::all(self.client());
        let op = format!("deleting node {node}");
        match self
            .call(&op, api.delete(node, &DeleteParams::default()))
            .await
        {
            Ok(_) => Ok(()),
            Err(e) if e.status_code() == Some(404) => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Deletes a pod at once (grace period 0: the API object goes without waiting for the
    /// kubelet); a pod already gone is fine.
    pub async fn force_delete_pod(&self, pod: &PodRef) -> Result<(), KubeError> {
        let api: Api<Pod> = Api::namespaced(self.client(), &pod.namespace);
        let op = format!("deleting pod {pod}");
        let params = DeleteParams {
            grace_period_seconds: Some(0),
            ..DeleteParams::default()
        };
        match self.call(&op, api.delete(&pod.name, &params)).await {
            Ok(_) => Ok(()),
            Err(e) if e.status_code() == Some(404) => Ok(()),
            Err(e) => Err(e),
        }
    }
}

fn key(
    meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta,
    kind: &str,
) -> (String, String, String) {
    (
        meta.namespace.clone().unwrap_or_default(),
        kind.to_owned(),
        meta.name.clone().unwrap_or_default(),
    )
}

/// Drains a node that the caller has cordoned: see the module documentation.
pub async fn drain_node(
    client: &KubeClient,
    node: &str,
    policy: PolicyApi,
    opts: &DrainOptions,
    clock: &dyn Clock,
    on_event: &mut (dyn FnMut(DrainEvent) + Send),
) -> Result<DrainReport, DrainError> {
    let api_err = |source: KubeError| DrainError::Api {
        node: node.to_owned(),
        source,
    };
    let start = clock.now();
    let mut report = DrainReport::default();
    let mut accepted: BTreeSet<PodRef> = BTreeSet::new();
    let mut held: BTreeMap<PodRef, String> = BTreeMap::new();
    let mut started = false;
    loop {
        let elapsed = clock.now().saturating_duration_since(start);
        let pods = match client.pods_on(node).await {
            Ok(p) => p,
            Err(e) if e.disposition() != Disposition::Fail && elapsed < opts.timeout => {
                on_event(DrainEvent::Retrying(super::chain(&e)));
                clock.sleep(opts.poll).await;
                continue;
            }
            Err(e) => return Err(api_err(e)),
        };
        let sim = simulate(node, &pods, &[], &Replicas::new(), policy);
        report.skipped = sim.skip.len();
        let terminating: BTreeSet<PodRef> = pods
            .iter()
            .filter(|p| p.metadata.deletion_timestamp.is_some())
            .map(|p| PodRef {
                namespace: p.metadata.namespace.clone().unwrap_or_default(),
                name: p.metadata.name.clone().unwrap_or_default(),
            })
            .collect();
        match decide(&sim, &terminating, started, elapsed, opts) {
            Decision::Done => {
                report.took = elapsed;
                return Ok(report);
            }
            Decision::Refuse(pods) => {
                return Err(DrainError::Refused {
                    node: node.to_owned(),
                    pods,
                });
            }
            Decision::TimedOut(pending) => {
                // Name what holds each pod: the server's last refusal, else a blocker found now.
                let found = client
                    .simulate_drain(node, policy)
                    .await
                    .unwrap_or_default();
                let pods = pending
                    .into_iter()
                    .map(|p| {
                        // The budget by name if one is found now, else the server's refusal.
                        let reason = found
                            .evict
                            .iter()
                            .find(|(q, _)| *q == p)
                            .and_then(|(_, b)| b.iter().find(|b| b.blocks()))
                            .map(ToString::to_string)
                            .or_else(|| held.get(&p).cloned());
                        let reason = reason.unwrap_or_else(|| {
                            if accepted.contains(&p) || terminating.contains(&p) {
                                "evicted, still terminating".into()
                            } else {
                                String::new()
                            }
                        });
                        (p, reason)
                    })
                    .collect();
                return Err(DrainError::TimedOut {
                    node: node.to_owned(),
                    waited: elapsed,
                    pods,
                });
            }
            Decision::Delete(pods) => {
                for pod in pods {
                    client.force_delete_pod(&pod).await.map_err(api_err)?;
                    if !report.deleted.contains(&pod) {
                        on_event(DrainEvent::Deleted(pod.clone()));
                        report.deleted.push(pod);
                    }
                }
            }
            Decision::Evict(pods) => {
                started = true;
                for pod in pods {
                    match client.evict(&pod, policy).await {
                        Ok(()) => {
                            held.remove(&pod);
                            if accepted.insert(pod.clone()) {
                                report.evicted.push(pod.clone());
                            }
                            on_event(DrainEvent::Evicted(pod));
                        }
                        // Gone meanwhile.
                        Err(e) if e.status_code() == Some(404) => {}
                        Err(e) if e.disposition() == Disposition::Fail => return Err(api_err(e)),
                        Err(e) => {
                            let reason = match &e {
                                KubeError::Api {
                                    code: 429, message, ..
                                } => message.clone(),
                                other => super::chain(other),
                            };
                            if e.status_code() == Some(429) {
                                if held.get(&pod) != Some(&reason) {
                                    on_event(DrainEvent::Held {
                                        pod: pod.clone(),
                                        reason: reason.clone(),
                                    });
                                }
                                held.insert(pod, reason);
                            } else {
                                on_event(DrainEvent::Retrying(reason));
                            }
                        }
                    }
                }
            }
        }
        clock.sleep(opts.poll).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(name: &str) -> PodRef {
        PodRef {
            namespace: "default".into(),
            name: name.into(),
        }
    }

    fn sim(pods: &[(&str, Vec<Blocker>)]) -> DrainSimulation {
        DrainSimulation {
            evict: pods.iter().map(|(n, b)| (pod(n), b.clone())).collect(),
            skip: Vec::new(),
        }
    }

    const HOUR: Duration = Duration::from_secs(3600);

    #[test]
    fn an_empty_node_is_done() {
        let opts = DrainOptions::default();
        assert_eq!(
            decide(&sim(&[]), &BTreeSet::new(), false, Duration::ZERO, &opts),
            Decision::Done
        );
    }

    #[test]
    fn pods_lost_for_good_are_refused_before_any_eviction_unless_forced() {
        let s = sim(&[
            ("web-1", vec![]),
            ("bare", vec![Blocker::NoController]),
            (
                "cache",
                vec![Blocker::LocalStorage {
                    volumes: vec!["scratch".into()],
                }],
            ),
            (
                "solo",
                vec![Blocker::SingleReplica {
                    workload: "ReplicaSet/solo".into(),
                }],
            ),
        ]);
        let opts = DrainOptions::default();
        match decide(&s, &BTreeSet::new(), false, Duration::ZERO, &opts) {
            Decision::Refuse(pods) => {
                let names: Vec<&str> = pods.iter().map(|(p, _)| p.name.as_str()).collect();
                assert_eq!(names, ["bare", "cache"]);
            }
            other => panic!("want a refusal, got {other:?}"),
        }
        let forced = DrainOptions {
            force: true,
            ..opts
        };
        assert_eq!(
            decide(&s, &BTreeSet::new(), false, Duration::ZERO, &forced),
            Decision::Evict(vec![pod("web-1"), pod("bare"), pod("cache"), pod("solo")])
        );
    }

    #[test]
    fn budgets_do_not_refuse_they_make_the_drain_wait() {
        let s = sim(&[(
            "web-1",
            vec![Blocker::Budget {
                pdb: "default/web".into(),
            }],
        )]);
        let opts = DrainOptions::default();
        assert_eq!(
            decide(&s, &BTreeSet::new(), false, Duration::ZERO, &opts),
            Decision::Evict(vec![pod("web-1")])
        );
        // Still there after 59 minutes: evicted again (the budget may allow it now).
        assert_eq!(
            decide(
                &s,
                &BTreeSet::new(),
                true,
                HOUR - Duration::from_secs(60),
                &opts
            ),
            Decision::Evict(vec![pod("web-1")])
        );
    }

    #[test]
    fn terminating_pods_are_waited_for_not_evicted_again() {
        let s = sim(&[("web-1", vec![]), ("web-2", vec![])]);
        let terminating: BTreeSet<PodRef> = [pod("web-1")].into();
        assert_eq!(
            decide(
                &s,
                &terminating,
                true,
                Duration::from_secs(10),
                &DrainOptions::default()
            ),
            Decision::Evict(vec![pod("web-2")])
        );
        let all: BTreeSet<PodRef> = [pod("web-1"), pod("web-2")].into();
        assert_eq!(
            decide(
                &s,
                &all,
                true,
                Duration::from_secs(10),
                &DrainOptions::default()
            ),
            Decision::Evict(vec![])
        );
    }

    #[test]
    fn the_timeout_stops_the_drain_or_with_force_deletes() {
        let s = sim(&[("web-1", vec![]), ("web-2", vec![])]);
        let terminating: BTreeSet<PodRef> = [pod("web-2")].into();
        let opts = DrainOptions::default();
        assert_eq!(
            decide(&s, &terminating, true, HOUR, &opts),
            Decision::TimedOut(vec![pod("web-1"), pod("web-2")])
        );
        let forced = DrainOptions {
            force: true,
            ..opts
        };
        // Forced: every pod left goes at once, terminating ones too (a dead node's kubelet
        // never confirms their end).
        assert_eq!(
            decide(&s, &terminating, true, HOUR, &forced),
            Decision::Delete(vec![pod("web-1"), pod("web-2")])
        );
        // Deletions that do not take (finalizers) end it after FORCE_GRACE.
        assert_eq!(
            decide(&s, &terminating, true, HOUR + FORCE_GRACE, &forced),
            Decision::TimedOut(vec![pod("web-1"), pod("web-2")])
        );
    }
}
