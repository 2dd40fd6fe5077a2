//! Node-image upgrade: the pure plan (which machines, in which order) and preflight decision.
//!
//! The immutable-node path: a machine's OS changes by replacing its boot disk from the new image
//! while its data disk (etcd, kubelet and containerd state, `/etc` as restored at boot, host
//! keys) stays (`Provider::replace_boot_disk`). Control plane first, then each node pool in spec
//! order. In place by default, one machine at a time. A node pool with `upgradeSettings.maxSurge`
//! is upgraded by surge instead ([`batches`]): new machines on the target image are made and
//! gated first, then the old ones drained and deleted, `maxSurge` at a time after a first batch
//! of one (the canary). A machine that already boots the target is not replaced again, but still
//! gated (Ready) and uncordoned if clusterctl cordoned it, so a run killed anywhere is finished by
//! running it again.

use std::collections::{BTreeMap, BTreeSet};

use providers::{Machine, MachineRole, MachineSize, MachineState};
use serde::Serialize;

use crate::bundle::KubeVersion;
use crate::kube::NodeState;
use crate::state::{PinnedImage, UpgradeStatus};

/// What happens to one machine.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct NodeStep {
    /// Machine (and node) name.
    pub machine: String,
    /// Its role.
    pub role: MachineRole,
    /// Its pool, for workers.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pool: Option<String>,
    /// Whether its boot disk is replaced (false: it boots the target already; only checked).
    pub replace: bool,
    /// The image digest it boots now.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub current_digest: Option<String>,
    /// Its pool's `upgradeSettings.maxSurge`: more than 0 replaces it by a new machine (surge);
    /// 0 replaces its boot disk in place.
    #[serde(skip_serializing_if = "is_zero")]
    pub max_surge: u32,
    /// Its size, when it differs from the size the spec asks for: a worker is replaced by a new
    /// machine of the spec's size (a boot disk cannot change a size), by surge in a surge pool,
    /// else drained and deleted first ([`Batch::Recreate`]); a control plane, which keeps its
    /// etcd data, is resized in place (`Provider::resize_machine`: drained, CPUs and memory
    /// changed through a reboot, gated, resized back if it fails its gate).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub resize: Option<Resize>,
}

/// A machine's size as it is and as its spec asks.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Resize {
    /// As the provider reports it.
    pub from: MachineSize,
    /// As the spec asks.
    pub to: MachineSize,
}

/// The sizes the spec asks for.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Sizes {
    /// The control plane's (`None`: left alone).
    pub control_plane: Option<MachineSize>,
    /// Per node pool.
    pub pools: BTreeMap<String, MachineSize>,
}

fn is_zero(n: &u32) -> bool {
    *n == 0
}

/// The unit an upgrade carries out at once.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Batch {
    /// One machine in place: drain, new boot disk, gate, uncordon (or only the gate, for a
    /// machine on the target already).
    InPlace(NodeStep),
    /// Machines of one pool replaced by surge: a new machine for each, all gated, then each old
    /// one drained and deleted.
    Surge {
        /// The pool.
        pool: String,
        /// The machines replaced.
        steps: Vec<NodeStep>,
    },
    /// A worker of a pool without surge replaced by a new machine (its size changed): drained
    /// and deleted first, then the new one made and gated (`maxUnavailable: 1`, no extra
    /// capacity needed). A new machine that does not get Ready stops the upgrade; the old one is
    /// gone by then, so there is nothing to roll back to.
    Recreate {
        /// The pool.
        pool: String,
        /// The machine replaced.
        step: NodeStep,
    },
}

impl Batch {
    /// The machines of the batch.
    pub fn machines(&self) -> Vec<&str> {
        match self {
            Batch::InPlace(s) | Batch::Recreate { step: s, .. } => vec![s.machine.as_str()],
            Batch::Surge { steps, .. } => steps.iter().map(|s| s.machine.as_str()).collect(),
        }
    }
}

/// The plan's steps as the batches an upgrade runs, in order. Pure.
///
/// `skip`: machines not to touch (the new machines of surge replacements under way; their
/// batch gates them). In surge pools, the machines to replace go `maxSurge` at a time, except
/// that a pool's first batch is one machine (the canary) unless `canary_done` names the pool
/// (an earlier run replaced one there already); a batch is at most `limit` machines (auto-upgrade's
/// steps left in this run).
pub fn batches(
    plan: &UpgradePlan,
    skip: &BTreeSet<String>,
    canary_done: &BTreeSet<String>,
    limit: Option<usize>,
) -> Vec<Batch> {
    let mut out: Vec<Batch> = Vec::new();
    let mut seen_pool: BTreeSet<String> = canary_done.clone();
    // How many machines the last batch (a surge one) may still take.
    let mut room = 0usize;
    for s in plan.steps.iter().filter(|s| !skip.contains(&s.machine)) {
        let surge_pool = s.pool.clone().filter(|_| s.replace && s.max_surge > 0);
        let Some(pool) = surge_pool else {
            match &s.pool {
                Some(pool) if s.resize.is_some() && s.role == MachineRole::Worker => {
                    out.push(Batch::Recreate {
                        pool: pool.clone(),
                        step: s.clone(),
                    });
                }
                _ => out.push(Batch::InPlace(s.clone())),
            }
            room = 0;
            continue;
        };
        if let Some(Batch::Surge { pool: p, steps }) = out.last_mut()
            && *p == pool
            && room > 0
        {
            steps.push(s.clone());
            room -= 1;
            continue;
        }
        let size = if seen_pool.contains(&pool) {
            s.max_surge as usize
        } else {
            1
        };
        let size = limit.map_or(size, |l| size.min(l.max(1)));
        out.push(Batch::Surge {
            pool: pool.clone(),
            steps: vec![s.clone()],
        });
        room = size - 1;
        seen_pool.insert(pool);
    }
    out
}

/// The machines of an upgrade, in order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct UpgradePlan {
    /// The image the cluster boots before (the rollback target).
    pub from: PinnedImage,
    /// The image rolled out.
    pub to: PinnedImage,
    /// Control plane first (by name), then workers by pool (in `pool_order`) and name.
    pub steps: Vec<NodeStep>,
}

impl UpgradePlan {
    /// How many boot disks are replaced.
    pub fn replacements(&self) -> usize {
        self.steps.iter().filter(|s| s.replace).count()
    }

    /// How many machines are replaced because their size changed.
    pub fn resizes(&self) -> usize {
        self.steps.iter().filter(|s| s.resize.is_some()).count()
    }
}

/// Orders the machines: control plane by name, then the pools in `pool_order` (pools the spec no
/// longer names last), each by name; `max_surge` gives the pools upgraded by surge, `sizes` the
/// size each pool's machines must have (a worker whose reported size differs is replaced). Pure.
pub fn plan(
    machines: &[Machine],
    pool_order: &[String],
    max_surge: &BTreeMap<String, u32>,
    sizes: &Sizes,
    from: &PinnedImage,
    to: &PinnedImage,
) -> UpgradePlan {
    let mut ordered: Vec<&Machine> = machines.iter().collect();
    let rank = |m: &Machine| match (&m.role, &m.pool) {
        (MachineRole::ControlPlane, _) => 0,
        (MachineRole::Worker, Some(p)) => pool_order
            .iter()
            .position(|q| q == p)
            .map_or(usize::MAX, |i| i + 1),
        (MachineRole::Worker, None) => usize::MAX,
    };
    ordered.sort_by(|a, b| (rank(a), &a.name).cmp(&(rank(b), &b.name)));
    UpgradePlan {
        from: from.clone(),
        to: to.clone(),
        steps: ordered
            .into_iter()
            .map(|m| {
                let pool = m.pool.as_ref().filter(|_| m.role == MachineRole::Worker);
                let want = match m.role {
                    MachineRole::ControlPlane => sizes.control_plane.as_ref(),
                    MachineRole::Worker => pool.and_then(|p| sizes.pools.get(p)),
                };
                let resize = match (want, &m.size) {
                    (Some(want), Some(have)) => {
                        let mut want = want.clone();
                        if m.role == MachineRole::ControlPlane {
                            // Resized in place: its data disk (etcd) keeps its size.
                            want.disk_gib = have.disk_gib;
                        }
                        (want != *have).then(|| Resize {
                            from: have.clone(),
                            to: want,
                        })
                    }
                    _ => None,
                };
                NodeStep {
                    machine: m.name.clone(),
                    role: m.role,
                    pool: m.pool.clone(),
                    replace: m.image_digest.as_deref() != Some(to.digest.as_str())
                        || resize.is_some(),
                    current_digest: m.image_digest.clone(),
                    max_surge: pool.and_then(|p| max_surge.get(p).copied()).unwrap_or(0),
                    resize,
                }
            })
            .collect(),
    }
}

/// Why an upgrade may not start. Pure: of the machines and nodes as observed, the target, and an
/// unfinished upgrade.
///
/// Every machine must be running with its node Ready, except: a machine already on the target
/// may still be booting (an interrupted run replaced it), and when an unfinished upgrade to the
/// same target is resumed, one machine may be down (the one it was replacing when it was killed).
pub fn preflight(
    machines: &[Machine],
    nodes: &[NodeState],
    to: &PinnedImage,
    unfinished: Option<&UpgradeStatus>,
) -> Vec<String> {
    let mut problems = Vec::new();
    if let Some(u) = unfinished
        && u.to.digest != to.digest
        && u.from.digest != to.digest
    {
        problems.push(format!(
            "an upgrade from {} to {} is unfinished: run `clusterctl upgrade NAME` to finish it, or `--node-image {}` to roll it back, before upgrading to {}",
            u.from.version, u.to.version, u.from.version, to.version
        ));
    }
    if machines.is_empty() {
        problems.push("the cluster has no machines".to_owned());
    }
    let resuming = unfinished.is_some_and(|u| u.to.digest == to.digest);
    let mut down = Vec::new();
    for m in machines {
        let on_target = m.image_digest.as_deref() == Some(to.digest.as_str());
        let node = nodes.iter().find(|n| n.name == m.name);
        if m.state != MachineState::Running {
            down.push(format!(
                "machine {} is {:?}, not running: run `clusterctl create` for the cluster (or `clusterctl reset`) first",
                m.name, m.state
            ));
            continue;
        }
        match node {
            None => problems.push(format!(
                "machine {} has no Kubernetes node: run `clusterctl create` for the cluster first",
                m.name
            )),
            Some(n) if !n.ready && !on_target => down.push(format!(
                "node {} is not Ready: repair it (`clusterctl reset`) before upgrading",
                m.name
            )),
            Some(_) => {}
        }
    }
    if !(resuming && down.len() <= 1) {
        problems.extend(down);
    }
    problems
}

/// Why a Kubernetes version upgrade from `current` to `target` may not start. Pure.
///
/// Refused: an unsupported target, the same version, a downgrade, a skipped minor, another
/// major; except that an unfinished upgrade (`unfinished`: from, to) may be finished (its `to`)
/// or rolled back (its `from`), and nothing else may start meanwhile.
pub fn kubernetes_preflight(
    current: KubeVersion,
    target: KubeVersion,
    unfinished: Option<(KubeVersion, KubeVersion)>,
) -> Vec<String> {
    let mut problems = Vec::new();
    if let Err(e) = crate::bundle::check_supported(&target) {
        problems.push(e.to_string());
    }
    if let Some((from, to)) = unfinished {
        if target != from && target != to {
            problems.push(format!(
                "an upgrade from Kubernetes {from} to {to} is unfinished: finish it (`--kubernetes-version {to}`) or roll it back (`--kubernetes-version {from}`) before upgrading to {target}"
            ));
        }
        return problems;
    }
    if target.major != current.major {
        problems.push(format!(
            "Kubernetes {current} cannot be upgraded to another major version ({target})"
        ));
    } else if target == current {
        problems.push(format!("the cluster runs Kubernetes {current} already"));
    } else if target < current {
        problems.push(format!(
            "Kubernetes {target} is older than the {current} the cluster runs: downgrades are not supported (etcd's data may already use the newer version's schema); only an unfinished upgrade is rolled back"
        ));
    } else if target.minor > current.minor + 1 {
        problems.push(format!(
            "Kubernetes {current} to {target} skips a minor version: upgrade to {}.{}.x first (the version-skew policy allows one minor at a time)",
            current.major,
            current.minor + 1
        ));
    }
    problems
}

/// The machines of a Kubernetes upgrade in order: the control plane first (so no kubelet is
/// ever newer than the API server), then the pools in `pool_order`, each by name. Pure.
pub fn kubernetes_order(machines: &[Machine], pool_order: &[String]) -> Vec<(String, MachineRole)> {
    let to = PinnedImage {
        version: String::new(),
        digest: String::new(),
    };
    plan(
        machines,
        pool_order,
        &BTreeMap::new(),
        &Sizes::default(),
        &to,
        &to,
    )
    .steps
    .into_iter()
    .map(|s| (s.machine, s.role))
    .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn image(v: &str) -> PinnedImage {
        PinnedImage {
            version: v.into(),
            digest: format!("sha256:{v}"),
        }
    }

    fn machine(name: &str, pool: Option<&str>, digest: &str) -> Machine {
        Machine {
            name: name.into(),
            provider_id: format!("fake://{name}"),
            role: if pool.is_some() {
                MachineRole::Worker
            } else {
                MachineRole::ControlPlane
            },
            pool: pool.map(Into::into),
            state: MachineState::Running,
            addresses: vec![],
            failure_domain: None,
            image_digest: Some(format!("sha256:{digest}")),
            size: None,
            labels: Default::default(),
        }
    }

    fn node(name: &str, ready: bool) -> NodeState {
        NodeState {
            name: name.into(),
            ready,
            kubelet_version: "v1.20.2".into(),
            unschedulable: false,
            boot_id: "b".into(),
            ..Default::default()
        }
    }

    #[test]
    fn control_plane_first_then_pools_in_spec_order_and_done_machines_only_checked() {
        let ms = vec![
            machine("c1-b-0", Some("b"), "v1"),
            machine("c1-a-1", Some("a"), "v2"),
            machine("c1-a-0", Some("a"), "v1"),
            machine("c1-gone-0", Some("gone"), "v1"),
            machine("c1-cp-0", None, "v1"),
        ];
        let p = plan(
            &ms,
            &["a".into(), "b".into()],
            &BTreeMap::new(),
            &Sizes::default(),
            &image("v1"),
            &image("v2"),
        );
        let order: Vec<(&str, bool)> = p
            .steps
            .iter()
            .map(|s| (s.machine.as_str(), s.replace))
            .collect();
        assert_eq!(
            order,
            [
                ("c1-cp-0", true),
                ("c1-a-0", true),
                ("c1-a-1", false),
                ("c1-b-0", true),
                ("c1-gone-0", true),
            ]
        );
        assert_eq!(p.replacements(), 4);
    }

    #[test]
    fn surge_pools_go_in_batches_of_max_surge_after_a_canary_of_one() {
        let ms = vec![
            machine("c1-cp-0", None, "v1"),
            machine("c1-a-b", Some("a"), "v1"),
            machine("c1-a-c", Some("a"), "v1"),
            machine("c1-a-d", Some("a"), "v1"),
            machine("c1-a-e", Some("a"), "v1"),
            machine("c1-a-f", Some("a"), "v2"),
            machine("c1-b-b", Some("b"), "v1"),
            machine("c1-b-c", Some("b"), "v1"),
        ];
        let surge: BTreeMap<String, u32> = [("a".to_owned(), 2)].into();
        let p = plan(
            &ms,
            &["a".into(), "b".into()],
            &surge,
            &Sizes::default(),
            &image("v1"),
            &image("v2"),
        );
        let shape = |bs: &[Batch]| -> Vec<String> {
            bs.iter()
                .map(|b| match b {
                    Batch::InPlace(s) => format!("in-place {}", s.machine),
                    Batch::Recreate { pool, step } => format!("recreate {pool}: {}", step.machine),
                    Batch::Surge { pool, steps } => format!(
                        "surge {pool}: {}",
                        steps
                            .iter()
                            .map(|s| s.machine.as_str())
                            .collect::<Vec<_>>()
                            .join(" ")
                    ),
                })
                .collect()
        };
        let none = BTreeSet::new();
        assert_eq!(
            shape(&batches(&p, &none, &none, None)),
            [
                "in-place c1-cp-0",
                "surge a: c1-a-b",
                "surge a: c1-a-c c1-a-d",
                "surge a: c1-a-e",
                // On the target already: only gated, in place.
                "in-place c1-a-f",
                // Pool b has no maxSurge: in place, one at a time.
                "in-place c1-b-b",
                "in-place c1-b-c",
            ]
        );
        // Resumed: the canary was done, a surge machine is skipped, one step left in this run.
        let skip: BTreeSet<String> = ["c1-a-f".to_owned()].into();
        let canary: BTreeSet<String> = ["a".to_owned()].into();
        assert_eq!(
            shape(&batches(&p, &skip, &canary, Some(1)))[..3],
            ["in-place c1-cp-0", "surge a: c1-a-b", "surge a: c1-a-c"]
        );
        assert_eq!(
            shape(&batches(&p, &skip, &canary, None))[1..3],
            ["surge a: c1-a-b c1-a-c", "surge a: c1-a-d c1-a-e"]
        );
    }

    #[test]
    fn a_changed_pool_size_replaces_its_workers_by_surge_or_drain_first() {
        let size = |cpus, memory_mib| MachineSize {
            cpus,
            memory_mib,
            disk_gib: 20,
        };
        let sized = |name: &str, pool: Option<&str>, s: MachineSize| Machine {
            size: Some(s),
            ..machine(name, pool, "v1")
        };
        let ms = vec![
            // The spec leaves the control plane's size alone here (`control_plane: None`).
            sized("c1-cp-0", None, size(4, 4096)),
            sized("c1-a-b", Some("a"), size(2, 2048)),
            sized("c1-a-c", Some("a"), size(2, 4096)),
            // A provider that cannot tell the size: left alone.
            machine("c1-a-d", Some("a"), "v1"),
            sized("c1-b-b", Some("b"), size(2, 2048)),
            sized("c1-b-c", Some("b"), size(2, 2048)),
        ];
        let mut sizes = Sizes {
            control_plane: None,
            pools: [
                ("a".to_owned(), size(2, 4096)),
                ("b".to_owned(), size(2, 4096)),
            ]
            .into(),
        };
        let surge: BTreeMap<String, u32> = [("b".to_owned(), 1)].into();
        // The same image: only the sizes change.
        let p = plan(
            &ms,
            &["a".into(), "b".into()],
            &surge,
            &sizes,
            &image("v1"),
            &image("v1"),
        );
        let replaced: Vec<(&str, bool)> = p
            .steps
            .iter()
            .map(|s| (s.machine.as_str(), s.replace))
            .collect();
        assert_eq!(
            replaced,
            [
                ("c1-cp-0", false),
                ("c1-a-b", true),
                ("c1-a-c", false),
                ("c1-a-d", false),
                ("c1-b-b", true),
                ("c1-b-c", true),
            ]
        );
        assert_eq!((p.replacements(), p.resizes()), (3, 3));
        let step = &p.steps[1];
        assert_eq!(
            step.resize,
            Some(Resize {
                from: size(2, 2048),
                to: size(2, 4096)
            })
        );
        let none = BTreeSet::new();
        let shapes: Vec<String> = batches(&p, &none, &none, None)
            .iter()
            .map(|b| match b {
                Batch::InPlace(s) => format!("in-place {} {}", s.machine, s.replace),
                Batch::Recreate { pool, step } => format!("recreate {pool}: {}", step.machine),
                Batch::Surge { pool, steps } => format!(
                    "surge {pool}: {}",
                    steps
                        .iter()
                        .map(|s| s.machine.as_str())
                        .collect::<Vec<_>>()
                        .join(" ")
                ),
            })
            .collect();
        assert_eq!(
            shapes,
            [
                "in-place c1-cp-0 false",
                // Pool a has no surge: drained and deleted first, then the new one.
                "recreate a: c1-a-b",
                "in-place c1-a-c false",
                "in-place c1-a-d false",
                "surge b: c1-b-b",
                "surge b: c1-b-c",
            ]
        );
        // With a new image too, the resized in-place worker is still recreated (a boot disk
        // cannot change its size) and the others get new boot disks.
        let p = plan(
            &ms,
            &["a".into(), "b".into()],
            &BTreeMap::new(),
            &sizes,
            &image("v1"),
            &image("v2"),
        );
        let kinds: Vec<&str> = batches(&p, &none, &none, None)
            .iter()
            .map(|b| match b {
                Batch::InPlace(_) => "in-place",
                Batch::Recreate { .. } => "recreate",
                Batch::Surge { .. } => "surge",
            })
            .collect();
        assert_eq!(
            kinds,
            [
                "in-place", "recreate", "in-place", "in-place", "recreate", "recreate"
            ]
        );
        // A control plane of another size is resized in place, first.
        sizes.control_plane = Some(size(4, 8192));
        let p = plan(
            &ms,
            &["a".into(), "b".into()],
            &surge,
            &sizes,
            &image("v1"),
            &image("v1"),
        );
        assert_eq!(
            (p.steps[0].replace, p.steps[0].resize.clone()),
            (
                true,
                Some(Resize {
                    from: size(4, 4096),
                    to: size(4, 8192)
                })
            )
        );
        assert!(matches!(
            batches(&p, &none, &none, None).first(),
            Some(Batch::InPlace(s)) if s.machine == "c1-cp-0"
        ));
    }

    #[test]
    fn kubernetes_preflight_refuses_downgrades_skipped_minors_and_crossing_upgrades() {
        let v = |s: &str| s.parse::<KubeVersion>().expect("version");
        assert!(kubernetes_preflight(v("1.20.2"), v("1.20.3"), None).is_empty());
        let one = |c: &str, t: &str, u: Option<(&str, &str)>| {
            let p = kubernetes_preflight(v(c), v(t), u.map(|(a, b)| (v(a), v(b))));
            assert_eq!(p.len(), 1, "{c} -> {t}: {p:?}");
            p[0].clone()
        };
        assert!(one("1.20.3", "1.20.2", None).contains("downgrades are not supported"));
        assert!(one("1.20.2", "1.20.2", None).contains("runs Kubernetes 1.20.2 already"));
        // 1.22 is not supported by the templates either: two problems.
        let p = kubernetes_preflight(v("1.20.2"), v("1.22.0"), None);
        assert_eq!(p.len(), 2, "{p:?}");
        assert!(
            p[1].contains("skips a minor version: upgrade to 1.21.x first"),
            "{p:?}"
        );
        let p = kubernetes_preflight(v("1.20.2"), v("2.20.2"), None);
        assert!(
            p.iter().any(|m| m.contains("another major version")),
            "{p:?}"
        );
        // An unfinished upgrade: finished or rolled back, nothing else.
        let u = Some(("1.20.2", "1.20.3"));
        assert!(
            kubernetes_preflight(v("1.20.2"), v("1.20.3"), u.map(|(a, b)| (v(a), v(b)))).is_empty()
        );
        assert!(
            kubernetes_preflight(v("1.20.3"), v("1.20.2"), u.map(|(a, b)| (v(a), v(b)))).is_empty()
        );
        assert!(
            one("1.20.2", "1.20.4", u)
                .contains("an upgrade from Kubernetes 1.20.2 to 1.20.3 is unfinished")
        );
    }

    #[test]
    fn preflight_refuses_unready_nodes_stopped_machines_and_a_crossing_upgrade() {
        let ms = vec![
            machine("c1-cp-0", None, "v1"),
            machine("c1-a-0", Some("a"), "v2"),
            machine("c1-a-1", Some("a"), "v1"),
        ];
        let ready = vec![
            node("c1-cp-0", true),
            node("c1-a-0", true),
            node("c1-a-1", true),
        ];
        assert_eq!(
            preflight(&ms, &ready, &image("v2"), None),
            Vec::<String>::new()
        );
        // A node on the target that is not Ready yet (an interrupted replacement) is no obstacle;
        // one on the old image is.
        let mut nodes = ready.clone();
        nodes[1].ready = false;
        assert_eq!(
            preflight(&ms, &nodes, &image("v2"), None),
            Vec::<String>::new()
        );
        nodes[2].ready = false;
        let p = preflight(&ms, &nodes, &image("v2"), None);
        assert_eq!(p.len(), 1, "{p:?}");
        assert!(p[0].contains("node c1-a-1 is not Ready"), "{p:?}");
        let mut stopped = ms.clone();
        stopped[0].state = MachineState::Stopped;
        let p = preflight(&stopped, &ready, &image("v2"), None);
        assert!(p[0].contains("machine c1-cp-0 is Stopped"), "{p:?}");
        let unfinished = UpgradeStatus {
            from: image("v1"),
            to: image("v2"),
            started_at: crate::state::Timestamp::now(),
            stopped: None,
            automatic: false,
            snapshot: None,
            surge: Vec::new(),
        };
        // Finishing it, or rolling it back, is allowed; a third image is not.
        assert!(preflight(&ms, &ready, &image("v2"), Some(&unfinished)).is_empty());
        assert!(preflight(&ms, &ready, &image("v1"), Some(&unfinished)).is_empty());
        let p = preflight(&ms, &ready, &image("v3"), Some(&unfinished));
        assert!(
            p[0].contains("an upgrade from v1 to v2 is unfinished"),
            "{p:?}"
        );
    }
}
