//! The provider conformance suite: the contract of [`Provider`], checked against a live provider.
//!
//! Every provider runs the same checks (the fake one in its unit tests, libvirt against a real
//! libvirtd, clouds against their emulators):
//!
//! ```ignore
//! let fixture = providers::conformance::Fixture::new("cf", machine_template);
//! providers::conformance::run_all(&provider, &fixture)?;
//! // or one check at a time, e.g. as separate #[test]s:
//! for (name, check) in providers::conformance::CHECKS { check(&provider, &fixture)?; }
//! ```
//!
//! The fixture supplies a [`MachineSpec`] template (a real image, size and user data for the
//! provider at hand) and a short name prefix; each check derives its own machine names and fresh
//! random cluster IDs from them, so checks never see each other's machines or anything left over
//! from earlier runs. Each check deletes what it created, also when it fails.

use std::fmt;
use std::io::Read;

use crate::{ClusterRef, Machine, MachineRole, MachineSpec, MachineState, Provider, ProviderError};

/// A failed conformance check.
#[derive(Debug)]
pub struct ConformanceError {
    /// Name of the check.
    pub check: &'static str,
    /// What did not hold.
    pub detail: String,
}

impl ConformanceError {
    /// An error in setting up the suite (not a failed check).
    pub fn setup(e: impl fmt::Display) -> Self {
        ConformanceError {
            check: "setup",
            detail: e.to_string(),
        }
    }
}

impl fmt::Display for ConformanceError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "provider conformance check `{}` failed: {}",
            self.check, self.detail
        )
    }
}

impl std::error::Error for ConformanceError {}

/// What the suite needs from the caller.
#[derive(Debug, Clone)]
pub struct Fixture {
    /// Prefix of every machine and cluster name the suite creates (a short DNS-1123 label).
    pub prefix: String,
    /// Template for the machines: image, size, user data and extra labels are taken from it;
    /// name, role and pool are set by each check.
    pub template: MachineSpec,
}

impl Fixture {
    /// A fixture with the given name prefix and machine template.
    pub fn new(prefix: impl Into<String>, template: MachineSpec) -> Self {
        Fixture {
            prefix: prefix.into(),
            template,
        }
    }

    fn cluster(&self, check: &'static str, suffix: &str) -> Result<ClusterRef, ConformanceError> {
        let mut b = [0u8; 8];
        std::fs::File::open("/dev/urandom")
            .and_then(|mut f| f.read_exact(&mut b))
            .map_err(|e| fail(check, format!("cannot read random bytes: {e}")))?;
        let id = b.iter().map(|x| format!("{x:02x}")).collect::<String>();
        Ok(ClusterRef {
            name: format!("{}-{suffix}", self.prefix),
            id: format!("conformance-{id}"),
        })
    }

    fn machine(&self, name: &str, role: MachineRole, pool: Option<&str>) -> MachineSpec {
        let mut m = self.template.clone();
        m.name = format!("{}-{name}", self.prefix);
        m.role = role;
        m.pool = pool.map(Into::into);
        m
    }
}

/// A conformance check.
pub type Check = fn(&dyn Provider, &Fixture) -> Result<(), ConformanceError>;

/// All checks, by name.
pub const CHECKS: &[(&str, Check)] = &[
    ("ensure_is_idempotent", ensure_is_idempotent),
    (
        "list_finds_only_this_clusters_machines",
        list_finds_only_this_clusters_machines,
    ),
    ("delete_is_idempotent", delete_is_idempotent),
    (
        "delete_cluster_leaves_nothing",
        delete_cluster_leaves_nothing,
    ),
    (
        "name_clash_leaves_the_foreign_machine_untouched",
        name_clash_leaves_the_foreign_machine_untouched,
    ),
];

/// Runs every check in [`CHECKS`]; returns the first failure after running them all (the others
/// are logged with `tracing::error!`).
pub fn run_all(provider: &dyn Provider, fixture: &Fixture) -> Result<(), ConformanceError> {
    let mut first = None;
    for (name, check) in CHECKS {
        tracing::info!(
            provider = provider.name(),
            check = name,
            "running conformance check"
        );
        if let Err(e) = check(provider, fixture) {
            tracing::error!(provider = provider.name(), "{e}");
            first.get_or_insert(e);
        }
    }
    first.map_or(Ok(()), Err)
}

fn fail(check: &'static str, detail: impl Into<String>) -> ConformanceError {
    ConformanceError {
        check,
        detail: detail.into(),
    }
}

fn call<T>(
    check: &'static str,
    what: &str,
    r: Result<T, ProviderError>,
) -> Result<T, ConformanceError> {
    r.map_err(|e| fail(check, format!("{what}: {e}")))
}

/// Deletes the clusters' resources when dropped, so a failing check leaves nothing behind.
struct Cleanup<'a> {
    provider: &'a dyn Provider,
    clusters: Vec<ClusterRef>,
}

impl Drop for Cleanup<'_> {
    fn drop(&mut self) {
        for c in &self.clusters {
            if let Err(e) = self.provider.delete_cluster(c) {
                tracing::error!(cluster = %c.name, "conformance cleanup failed: {e}");
            }
        }
    }
}

fn names(ms: &[Machine]) -> Vec<&str> {
    let mut v: Vec<&str> = ms.iter().map(|m| m.name.as_str()).collect();
    v.sort_unstable();
    v
}

fn expect_booting(check: &'static str, m: &Machine) -> Result<(), ConformanceError> {
    if matches!(m.state, MachineState::Pending | MachineState::Running) {
        Ok(())
    } else {
        Err(fail(
            check,
            format!(
                "machine {:?} is {:?} after ensure; want pending or running",
                m.name, m.state
            ),
        ))
    }
}

/// Ensuring the same machine twice creates it once and returns the same machine; role and pool
/// are read back from the labels.
pub fn ensure_is_idempotent(p: &dyn Provider, fx: &Fixture) -> Result<(), ConformanceError> {
    const C: &str = "ensure_is_idempotent";
    let cluster = fx.cluster(C, "idem")?;
    let _cleanup = Cleanup {
        provider: p,
        clusters: vec![cluster.clone()],
    };
    let spec = fx.machine("idem-w-0", MachineRole::Worker, Some("pool-a"));
    let first = call(C, "first ensure", p.ensure_machine(&cluster, &spec))?;
    expect_booting(C, &first)?;
    let second = call(C, "second ensure", p.ensure_machine(&cluster, &spec))?;
    if first.provider_id != second.provider_id {
        return Err(fail(
            C,
            format!(
                "second ensure changed the provider ID {:?} -> {:?}",
                first.provider_id, second.provider_id
            ),
        ));
    }
    let listed = call(C, "list", p.list_machines(&cluster))?;
    if names(&listed) != vec![spec.name.as_str()] {
        return Err(fail(
            C,
            format!(
                "list after two ensures gives {:?}; want exactly [{:?}]",
                names(&listed),
                spec.name
            ),
        ));
    }
    let m = &listed[0];
    if m.role != MachineRole::Worker
        || m.pool.as_deref() != Some("pool-a")
        || m.provider_id != first.provider_id
    {
        return Err(fail(
            C,
            format!(
                "listed machine {m:?} does not match what was ensured (worker in pool-a, {:?})",
                first.provider_id
            ),
        ));
    }
    let cp = fx.machine("idem-cp-0", MachineRole::ControlPlane, None);
    let cpm = call(
        C,
        "ensure control plane machine",
        p.ensure_machine(&cluster, &cp),
    )?;
    if cpm.role != MachineRole::ControlPlane || cpm.pool.is_some() {
        return Err(fail(
            C,
            format!(
                "control plane machine reads back as {:?} in pool {:?}",
                cpm.role, cpm.pool
            ),
        ));
    }
    Ok(())
}

/// Listing returns exactly the machines labelled with the cluster's ID, not another cluster's.
pub fn list_finds_only_this_clusters_machines(
    p: &dyn Provider,
    fx: &Fixture,
) -> Result<(), ConformanceError> {
    const C: &str = "list_finds_only_this_clusters_machines";
    let a = fx.cluster(C, "la")?;
    let b = fx.cluster(C, "lb")?;
    let _cleanup = Cleanup {
        provider: p,
        clusters: vec![a.clone(), b.clone()],
    };
    let empty = call(C, "list of a new cluster", p.list_machines(&a))?;
    if !empty.is_empty() {
        return Err(fail(
            C,
            format!("a cluster with a fresh ID lists {:?}", names(&empty)),
        ));
    }
    let a0 = fx.machine("la-cp-0", MachineRole::ControlPlane, None);
    let a1 = fx.machine("la-w-0", MachineRole::Worker, Some("w"));
    let b0 = fx.machine("lb-cp-0", MachineRole::ControlPlane, None);
    for (c, s) in [(&a, &a0), (&a, &a1), (&b, &b0)] {
        call(C, "ensure", p.ensure_machine(c, s))?;
    }
    let la = call(C, "list a", p.list_machines(&a))?;
    let lb = call(C, "list b", p.list_machines(&b))?;
    let (mut wa, wb) = (
        vec![a0.name.as_str(), a1.name.as_str()],
        vec![b0.name.as_str()],
    );
    wa.sort_unstable();
    if names(&la) != wa || names(&lb) != wb {
        return Err(fail(
            C,
            format!(
                "cluster a lists {:?} (want {wa:?}), cluster b lists {:?} (want {wb:?})",
                names(&la),
                names(&lb)
            ),
        ));
    }
    Ok(())
}

/// Deleting a machine removes it; deleting it again, or a machine that never existed, succeeds.
pub fn delete_is_idempotent(p: &dyn Provider, fx: &Fixture) -> Result<(), ConformanceError> {
    const C: &str = "delete_is_idempotent";
    let cluster = fx.cluster(C, "del")?;
    let _cleanup = Cleanup {
        provider: p,
        clusters: vec![cluster.clone()],
    };
    let keep = fx.machine("del-cp-0", MachineRole::ControlPlane, None);
    let gone = fx.machine("del-w-0", MachineRole::Worker, Some("w"));
    call(C, "ensure", p.ensure_machine(&cluster, &keep))?;
    call(C, "ensure", p.ensure_machine(&cluster, &gone))?;
    call(C, "delete", p.delete_machine(&cluster, &gone.name))?;
    let listed = call(C, "list", p.list_machines(&cluster))?;
    if names(&listed) != vec![keep.name.as_str()] {
        return Err(fail(
            C,
            format!(
                "after deleting {:?} the cluster lists {:?}",
                gone.name,
                names(&listed)
            ),
        ));
    }
    call(
        C,
        "second delete of the same machine",
        p.delete_machine(&cluster, &gone.name),
    )?;
    call(
        C,
        "delete of a machine that never existed",
        p.delete_machine(&cluster, &format!("{}-never", fx.prefix)),
    )?;
    // A machine deleted and ensured again is a new machine.
    let again = call(C, "ensure after delete", p.ensure_machine(&cluster, &gone))?;
    expect_booting(C, &again)?;
    Ok(())
}

/// `delete_cluster` removes every machine of the cluster, leaves other clusters alone, and
/// succeeds again when nothing is left.
pub fn delete_cluster_leaves_nothing(
    p: &dyn Provider,
    fx: &Fixture,
) -> Result<(), ConformanceError> {
    const C: &str = "delete_cluster_leaves_nothing";
    let doomed = fx.cluster(C, "dc")?;
    let other = fx.cluster(C, "dk")?;
    let _cleanup = Cleanup {
        provider: p,
        clusters: vec![doomed.clone(), other.clone()],
    };
    for s in [
        fx.machine("dc-cp-0", MachineRole::ControlPlane, None),
        fx.machine("dc-w-0", MachineRole::Worker, Some("w")),
        fx.machine("dc-w-1", MachineRole::Worker, Some("w")),
    ] {
        call(C, "ensure", p.ensure_machine(&doomed, &s))?;
    }
    let survivor = fx.machine("dk-cp-0", MachineRole::ControlPlane, None);
    let before = call(
        C,
        "ensure other cluster's machine",
        p.ensure_machine(&other, &survivor),
    )?;
    call(C, "delete_cluster", p.delete_cluster(&doomed))?;
    let left = call(C, "list after delete_cluster", p.list_machines(&doomed))?;
    if !left.is_empty() {
        return Err(fail(C, format!("delete_cluster left {:?}", names(&left))));
    }
    call(C, "second delete_cluster", p.delete_cluster(&doomed))?;
    let others = call(C, "list other cluster", p.list_machines(&other))?;
    if others.len() != 1 || others[0].provider_id != before.provider_id {
        return Err(fail(
            C,
            format!(
                "deleting one cluster changed another: it now lists {:?}",
                names(&others)
            ),
        ));
    }
    Ok(())
}

/// Ensuring a machine whose name is taken by another cluster's machine fails with
/// [`ProviderError::NameClash`], and neither that nor deleting the name from the wrong cluster
/// touches the other cluster's machine.
pub fn name_clash_leaves_the_foreign_machine_untouched(
    p: &dyn Provider,
    fx: &Fixture,
) -> Result<(), ConformanceError> {
    const C: &str = "name_clash_leaves_the_foreign_machine_untouched";
    let owner = fx.cluster(C, "own")?;
    let intruder = fx.cluster(C, "int")?;
    let _cleanup = Cleanup {
        provider: p,
        clusters: vec![owner.clone(), intruder.clone()],
    };
    let spec = fx.machine("clash-cp-0", MachineRole::ControlPlane, None);
    let original = call(C, "ensure by owner", p.ensure_machine(&owner, &spec))?;
    match p.ensure_machine(&intruder, &spec) {
        Err(ProviderError::NameClash { name, .. }) if name == spec.name => {}
        Err(ProviderError::NameClash { name, .. }) => {
            return Err(fail(
                C,
                format!("name clash names {name:?}; want {:?}", spec.name),
            ));
        }
        Err(e) => {
            return Err(fail(
                C,
                format!("ensure by another cluster failed with {e}; want a name clash error"),
            ));
        }
        Ok(m) => {
            return Err(fail(
                C,
                format!("ensure by another cluster succeeded ({m:?}); want a name clash error"),
            ));
        }
    }
    // Deleting by name from the wrong cluster must not remove the owner's machine; whether it
    // reports success (nothing of the intruder's has that name) or a name clash is up to the provider.
    match p.delete_machine(&intruder, &spec.name) {
        Ok(()) | Err(ProviderError::NameClash { .. }) => {}
        Err(e) => {
            return Err(fail(
                C,
                format!("delete by another cluster failed with {e}; want success or a name clash"),
            ));
        }
    }
    if let Err(e) = p.delete_cluster(&intruder) {
        return Err(fail(
            C,
            format!("delete_cluster of the intruder failed: {e}"),
        ));
    }
    let listed = call(C, "list owner", p.list_machines(&owner))?;
    if listed.len() != 1
        || listed[0].provider_id != original.provider_id
        || listed[0].name != spec.name
    {
        return Err(fail(
            C,
            format!(
                "the owner's machine was changed: owner now lists {listed:?}, originally {original:?}"
            ),
        ));
    }
    let intruders = call(C, "list intruder", p.list_machines(&intruder))?;
    if !intruders.is_empty() {
        return Err(fail(
            C,
            format!("the intruder lists {:?}", names(&intruders)),
        ));
    }
    Ok(())
}
