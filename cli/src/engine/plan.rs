//! The planner: a pure function from the desired spec and the observed machines to an ordered
//! list of steps that leaves no choices to execution.
//!
//! Machines are named `<cluster>-cp-<i>` for the control plane; a node pool's machines have the
//! names the cluster record gives them ([`super::names`]: `<cluster>-<pool>-<5 random
//! characters>`, handed out before the machines are made). The observed inventory is what the
//! provider lists for the cluster's ID, so every observed machine is the cluster's own: one that
//! the spec no longer wants is deleted.
//!
//! Deliberately absent for now: resizing (providers do not report a machine's size yet; a changed
//! size is applied by the upgrade flow that replaces machines) and anything after provisioning
//! (bootstrap steps come with the bootstrap issue).

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use providers::{Machine, MachineRole, MachineSize, MachineState};
use serde::{Deserialize, Serialize};

use super::names::{self, PoolMembers};
use crate::spec;

/// What the provider reports for a cluster: its machines.
pub type Inventory = Vec<Machine>;

/// A machine the spec asks for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DesiredMachine {
    /// Machine name, also the host name.
    pub name: String,
    /// Role in the cluster.
    pub role: MachineRole,
    /// Node pool of a worker.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pool: Option<String>,
    /// Size.
    pub size: MachineSize,
}

/// One step of a plan.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "action", rename_all = "kebab-case")]
pub enum Step {
    /// Create a machine that does not exist.
    CreateMachine {
        /// The machine.
        machine: DesiredMachine,
    },
    /// Start a machine of the spec that exists but is not running (ensure starts it).
    StartMachine {
        /// The machine.
        machine: DesiredMachine,
        /// Its observed state.
        observed: MachineState,
    },
    /// Delete a machine of the cluster that the spec no longer asks for.
    DeleteMachine {
        /// Machine name.
        name: String,
        /// Its role as observed.
        role: MachineRole,
        /// Its pool as observed.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pool: Option<String>,
    },
}

impl Step {
    /// Name of the machine the step acts on.
    pub fn machine_name(&self) -> &str {
        match self {
            Step::CreateMachine { machine } | Step::StartMachine { machine, .. } => &machine.name,
            Step::DeleteMachine { name, .. } => name,
        }
    }

    /// Short verb for tables: `create`, `start`, `delete`.
    pub fn verb(&self) -> &'static str {
        match self {
            Step::CreateMachine { .. } => "create",
            Step::StartMachine { .. } => "start",
            Step::DeleteMachine { .. } => "delete",
        }
    }
}

/// A machine of the spec that exists with another size than the spec asks for. A worker is
/// replaced by a new machine of the spec's size, by its pool's `upgradeSettings` (surge: the new
/// one first; else drained and deleted first); a control plane, which keeps its etcd data, is
/// resized in place. `create` does it after the machine steps (`action::upgrade`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Replacement {
    /// The machine, as the spec asks for it (its new size).
    pub machine: DesiredMachine,
    /// Its size as the provider reports it.
    pub observed: MachineSize,
    /// Resized in place (a control plane) rather than replaced by a new machine.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub in_place: bool,
}

/// The ordered steps that take the observed cluster to the desired one.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Plan {
    /// Cluster name.
    pub cluster: String,
    /// Steps in execution order: control plane machines, node pools in spec order, then deletions.
    pub steps: Vec<Step>,
    /// Machines of the spec that exist and need nothing from the machine steps (the ones in
    /// `replacements` among them).
    pub unchanged: Vec<DesiredMachine>,
    /// Machines whose size changed: workers to replace by new machines, control planes to
    /// resize in place.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub replacements: Vec<Replacement>,
}

impl Plan {
    /// Whether there is nothing to do.
    pub fn is_empty(&self) -> bool {
        self.steps.is_empty() && self.replacements.is_empty()
    }

    /// The steps that ensure a machine (create or start), in order.
    pub fn ensure_steps(&self) -> impl Iterator<Item = &DesiredMachine> {
        self.steps.iter().filter_map(|s| match s {
            Step::CreateMachine { machine } | Step::StartMachine { machine, .. } => Some(machine),
            Step::DeleteMachine { .. } => None,
        })
    }

    /// Names of the machines to delete, in order.
    pub fn delete_steps(&self) -> impl Iterator<Item = &str> {
        self.steps.iter().filter_map(|s| match s {
            Step::DeleteMachine { name, .. } => Some(name.as_str()),
            _ => None,
        })
    }
}

/// A spec the planner cannot turn into machines.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PlanError {
    /// Two machines of the spec would get the same name.
    #[error(
        "machine name {name:?} would be used twice (control plane machines are named <cluster>-cp-<i>); rename the node pool that collides"
    )]
    DuplicateName {
        /// The name.
        name: String,
    },
    /// A node pool of the spec has no machine names in the record (a bug: names are given out
    /// before planning).
    #[error(
        "node pool {pool:?} wants {count} machine(s) but the cluster record names {named}; this is a bug in clusterctl: re-run the command, and report it if it repeats"
    )]
    Unnamed {
        /// The pool.
        pool: String,
        /// Machines it wants.
        count: u32,
        /// Names the record has for it.
        named: usize,
    },
}

const MIB: u64 = 1024 * 1024;
const GIB: u64 = 1024 * MIB;

/// Provider machine size from a spec machine size (memory in MiB and disk in GiB, rounded up).
pub fn machine_size(size: &spec::MachineSize) -> MachineSize {
    MachineSize {
        cpus: size.cpus,
        memory_mib: size.memory.bytes().div_ceil(MIB),
        disk_gib: size.disk.bytes().div_ceil(GIB),
    }
}

/// The machines the spec asks for, in order: control plane, then each node pool with the names
/// `members` gives its machines (`count` of them, more during a surge upgrade).
pub fn desired_machines(
    desired: &spec::Cluster,
    members: &PoolMembers,
) -> Result<Vec<DesiredMachine>, PlanError> {
    let cluster = &desired.metadata.name;
    let cp = &desired.spec.control_plane;
    let mut out: Vec<DesiredMachine> = (0..cp.count)
        .map(|i| DesiredMachine {
            name: names::control_plane_name(cluster, i),
            role: MachineRole::ControlPlane,
            pool: None,
            size: machine_size(&cp.machine),
        })
        .collect();
    for pool in &desired.spec.node_pools {
        let named = members.get(&pool.name).map(Vec::as_slice).unwrap_or(&[]);
        if named.len() < pool.count as usize {
            return Err(PlanError::Unnamed {
                pool: pool.name.clone(),
                count: pool.count,
                named: named.len(),
            });
        }
        out.extend(named.iter().map(|name| DesiredMachine {
            name: name.clone(),
            role: MachineRole::Worker,
            pool: Some(pool.name.clone()),
            size: machine_size(&pool.machine),
        }));
    }
    Ok(out)
}

/// The names of [`desired_machines`].
pub fn desired_names(
    desired: &spec::Cluster,
    members: &PoolMembers,
) -> Result<Vec<String>, PlanError> {
    Ok(desired_machines(desired, members)?
        .into_iter()
        .map(|m| m.name)
        .collect())
}

/// Plans the steps from the observed machines to the desired spec, the pools' machines named by
/// `members`. Pure: same input, same plan.
pub fn plan(
    desired: &spec::Cluster,
    members: &PoolMembers,
    observed: &Inventory,
) -> Result<Plan, PlanError> {
    let want = desired_machines(desired, members)?;
    let mut seen = BTreeSet::new();
    for m in &want {
        if !seen.insert(m.name.as_str()) {
            return Err(PlanError::DuplicateName {
                name: m.name.clone(),
            });
        }
    }
    let have: BTreeMap<&str, &Machine> = observed.iter().map(|m| (m.name.as_str(), m)).collect();
    let mut steps = Vec::new();
    let mut unchanged = Vec::new();
    let mut replacements = Vec::new();
    for m in &want {
        if let Some(observed) = have.get(m.name.as_str()).and_then(|o| o.size.as_ref()) {
            let in_place = m.role == MachineRole::ControlPlane;
            let mut wanted = m.clone();
            if in_place {
                // A control plane keeps its data disk (its size is not changed in place).
                wanted.size.disk_gib = observed.disk_gib;
            }
            if *observed != wanted.size {
                replacements.push(Replacement {
                    machine: wanted,
                    observed: observed.clone(),
                    in_place,
                });
            }
        }
        match have.get(m.name.as_str()) {
            None => steps.push(Step::CreateMachine { machine: m.clone() }),
            Some(o) if matches!(o.state, MachineState::Running | MachineState::Pending) => {
                unchanged.push(m.clone())
            }
            Some(o) => steps.push(Step::StartMachine {
                machine: m.clone(),
                observed: o.state,
            }),
        }
    }
    // Unwanted machines: workers before control plane, and within each the highest index first
    // (names of clusters from before random names), then by name.
    let mut extra: Vec<&Machine> = observed
        .iter()
        .filter(|m| !seen.contains(m.name.as_str()))
        .collect();
    extra.sort_by(|a, b| {
        let key = |m: &Machine| {
            (
                m.role == MachineRole::ControlPlane,
                m.pool.clone(),
                std::cmp::Reverse(index_of(&m.name)),
                m.name.clone(),
            )
        };
        key(a).cmp(&key(b))
    });
    steps.extend(extra.into_iter().map(|m| Step::DeleteMachine {
        name: m.name.clone(),
        role: m.role,
        pool: m.pool.clone(),
    }));
    Ok(Plan {
        cluster: desired.metadata.name.clone(),
        steps,
        unchanged,
        replacements,
    })
}

/// The trailing index of a machine name (`c1-pool-a-10` -> 10), for ordering.
fn index_of(name: &str) -> Option<u64> {
    name.rsplit_once('-').and_then(|(_, i)| i.parse().ok())
}

impl fmt::Display for MachineSizeDisplay<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} cpu, {} MiB, {} GiB disk",
            self.0.cpus, self.0.memory_mib, self.0.disk_gib
        )
    }
}

/// Displays a machine size as `2 cpu, 2048 MiB, 20 GiB disk`.
pub struct MachineSizeDisplay<'a>(pub &'a MachineSize);

/// Renders a plan as a table: one row per step, then unchanged machines.
pub fn render_table(plan: &Plan) -> String {
    let mut rows = Vec::new();
    for s in &plan.steps {
        let (role, pool, size) = match s {
            Step::CreateMachine { machine } | Step::StartMachine { machine, .. } => (
                machine.role,
                machine.pool.clone(),
                MachineSizeDisplay(&machine.size).to_string(),
            ),
            Step::DeleteMachine { role, pool, .. } => (*role, pool.clone(), String::new()),
        };
        let verb = match s {
            Step::StartMachine { observed, .. } => format!("start (is {})", state_word(*observed)),
            _ => s.verb().to_owned(),
        };
        rows.push(vec![
            verb,
            s.machine_name().to_owned(),
            role_word(role).to_owned(),
            pool.unwrap_or_else(|| "-".into()),
            size,
        ]);
    }
    for m in &plan.unchanged {
        let replaced = plan.replacements.iter().find(|r| r.machine.name == m.name);
        rows.push(vec![
            match replaced {
                Some(r) if r.in_place => "resize (in place)".into(),
                Some(_) => "replace (new size)".into(),
                None => "keep".into(),
            },
            m.name.clone(),
            role_word(m.role).to_owned(),
            m.pool.clone().unwrap_or_else(|| "-".into()),
            match replaced {
                Some(r) => format!(
                    "{} (is {})",
                    MachineSizeDisplay(&r.machine.size),
                    MachineSizeDisplay(&r.observed)
                ),
                None => MachineSizeDisplay(&m.size).to_string(),
            },
        ]);
    }
    crate::output::table(&["ACTION", "MACHINE", "ROLE", "POOL", "SIZE"], &rows)
}

/// The role as written in tables and labels.
pub fn role_word(r: MachineRole) -> &'static str {
    match r {
        MachineRole::ControlPlane => "control-plane",
        MachineRole::Worker => "worker",
    }
}

/// The machine state as written in tables.
pub fn state_word(s: MachineState) -> &'static str {
    match s {
        MachineState::Pending => "pending",
        MachineState::Running => "running",
        MachineState::Stopped => "stopped",
        MachineState::Failed => "failed",
        MachineState::Unknown => "unknown",
    }
}

#[cfg(test)]
mod tests {
    //! Data-driven planner tests: each `testdata/plan/*.yaml` holds a spec and the observed
    //! machines; the snapshot is the rendered plan (or the planning error).

    use serde::Deserialize;

    use super::*;

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Case {
        spec: String,
        #[serde(default)]
        observed: Vec<Observed>,
    }

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Observed {
        name: String,
        role: MachineRole,
        #[serde(default)]
        pool: Option<String>,
        state: MachineState,
        /// As the provider reports it; absent: it cannot tell.
        #[serde(default)]
        size: Option<MachineSize>,
    }

    fn run_case(text: &str) -> Result<String, String> {
        let case: Case = serde_saphyr::from_str(text).map_err(|e| format!("bad case file: {e}"))?;
        let desired = spec::parse_str(&case.spec, "case.spec")
            .map_err(|e| format!("bad spec in case: {e}"))?;
        let observed: Inventory = case
            .observed
            .into_iter()
            .map(|o| Machine {
                provider_id: format!("fake://{}", o.name),
                name: o.name,
                role: o.role,
                pool: o.pool,
                state: o.state,
                addresses: vec![],
                failure_domain: None,
                image_digest: None,
                size: o.size,
                labels: Default::default(),
            })
            .collect();
        // Names as the record would give them: older clusters' machines adopted, new ones
        // from a counting generator.
        let mut members = names::PoolMembers::new();
        let mut retired = Vec::new();
        let keys = Default::default();
        let known = names::Known {
            machines: &observed,
            host_keys: &keys,
            surge: &keys,
        };
        names::assign(
            &desired,
            &mut members,
            &mut retired,
            &known,
            &mut names::counting_suffixes(),
        );
        let first = plan(&desired, &members, &observed);
        // Pure: the same input gives the same plan, whatever the order of the inventory.
        let mut reversed = observed.clone();
        reversed.reverse();
        if plan(&desired, &members, &reversed) != first {
            return Err("the plan depends on the order of the inventory".into());
        }
        Ok(match first {
            Ok(p) => render_table(&p),
            Err(e) => format!("error: {e}\n"),
        })
    }

    #[test]
    fn plan_snapshots() {
        insta::glob!("testdata/plan/*.yaml", |path| {
            let text =
                std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            match run_case(&text) {
                Ok(out) => insta::assert_snapshot!(out),
                Err(e) => panic!("{}: {e}", path.display()),
            }
        });
    }

    #[test]
    fn sizes_round_up_to_whole_units() -> Result<(), spec::ValueError> {
        let size = spec::MachineSize {
            cpus: 3,
            memory: "1500M".parse()?,
            disk: "10000M".parse()?,
        };
        assert_eq!(
            machine_size(&size),
            MachineSize {
                cpus: 3,
                memory_mib: 1431,
                disk_gib: 10
            }
        );
        Ok(())
    }
}
