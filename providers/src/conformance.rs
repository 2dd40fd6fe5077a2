//! The provider conformance suite: the contract of [`Provider`], checked against a live provider.
//!
//! Every provider runs the same checks (the fake one in its unit tests, libvirt against a real
//! libvirtd, clouds against their emulators):
//!
//! ```no_run
//! # use providers::{MachineSpec, Provider};
//! # use providers::conformance::{self, ConformanceError, Fixture};
//! # fn check(provider: &dyn Provider, machine_template: MachineSpec) -> Result<(), ConformanceError> {
//! let other_image = machine_template.image.clone(); // a second image, in reality
//! let fixture = Fixture::new("cf", machine_template, other_image);
//! conformance::run_all(provider, &fixture)?;
//! // or one check at a time, e.g. as separate #[test]s:
//! for (_name, check) in conformance::CHECKS {
//!     check(provider, &fixture)?;
//! }
//! # Ok(())
//! # }
//! ```
//!
//! The fixture supplies a [`MachineSpec`] template (a real image, size and user data for the
//! provider at hand), a second image to replace boot disks with, a short name prefix and,
//! optionally, a [`MachineProbe`] that looks inside machines (data disk, boot count) the way only
//! a test of that provider can. Each check derives its own machine names and fresh random cluster
//! IDs, so checks never see each other's machines or anything left over from earlier runs. Each
//! check deletes what it created, also when it fails.

use std::collections::BTreeMap;
use std::fmt;
use std::io::Read;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::{
    AddressKind, ClusterRef, ErrorKind, ImageRef, Machine, MachineRole, MachineSpec, MachineState,
    Provider, ProviderError,
};

/// Looks inside a provider's machines, as only a test of that provider can: the conformance
/// checks of boot-disk replacement and reset use it to see that data survived and that the
/// machine really booted again.
pub trait MachineProbe: Send + Sync {
    /// Writes the byte `marker` on the machine's data disk. It may stop the machine to do so (and
    /// leave it stopped).
    fn write_data_marker(
        &self,
        provider: &dyn Provider,
        cluster: &ClusterRef,
        machine: &str,
        marker: u8,
    ) -> Result<(), String>;

    /// The byte [`MachineProbe::write_data_marker`] wrote, or `None` if the disk holds none.
    fn read_data_marker(
        &self,
        provider: &dyn Provider,
        cluster: &ClusterRef,
        machine: &str,
    ) -> Result<Option<u8>, String>;

    /// A count that grows by one each time the machine boots.
    fn boot_count(
        &self,
        provider: &dyn Provider,
        cluster: &ClusterRef,
        machine: &str,
    ) -> Result<u64, String>;
}

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
#[derive(Clone)]
pub struct Fixture {
    /// Prefix of every machine and cluster name the suite creates (a short DNS-1123 label).
    pub prefix: String,
    /// Template for the machines: image, size, user data and extra labels are taken from it;
    /// name, role and pool are set by each check.
    pub template: MachineSpec,
    /// A second image (another digest) that boot disks are replaced with.
    pub other_image: ImageRef,
    /// Looks inside machines; without one the data-disk and boot-count parts are not checked.
    pub probe: Option<Arc<dyn MachineProbe>>,
    /// How long a machine may take to show a boot to the probe.
    pub boot_timeout: Duration,
}

impl fmt::Debug for Fixture {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Fixture")
            .field("prefix", &self.prefix)
            .field("template", &self.template)
            .field("other_image", &self.other_image)
            .field("probe", &self.probe.is_some())
            .finish()
    }
}

impl Fixture {
    /// A fixture with the given name prefix, machine template and second image, without a probe.
    pub fn new(prefix: impl Into<String>, template: MachineSpec, other_image: ImageRef) -> Self {
        Fixture {
            prefix: prefix.into(),
            template,
            other_image,
            probe: None,
            boot_timeout: Duration::from_secs(60),
        }
    }

    /// The same fixture with a probe.
    #[must_use]
    pub fn with_probe(mut self, probe: Arc<dyn MachineProbe>) -> Self {
        self.probe = Some(probe);
        self
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

    /// A fresh cluster for one check, deleted (with all it holds) when the guard is dropped.
    fn isolated<'p>(
        &self,
        provider: &'p dyn Provider,
        check: &'static str,
        suffix: &str,
    ) -> Result<(ClusterRef, Cleanup<'p>), ConformanceError> {
        let cluster = self.cluster(check, suffix)?;
        let cleanup = Cleanup {
            provider,
            clusters: vec![cluster.clone()],
        };
        Ok((cluster, cleanup))
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
    (
        "running_machines_have_addresses_labels_and_a_failure_domain",
        running_machines_have_addresses_labels_and_a_failure_domain,
    ),
    ("parallel_ensures", parallel_ensures),
    (
        "stop_and_ensure_starts_a_stopped_machine",
        stop_and_ensure_starts_a_stopped_machine,
    ),
    ("reset_reboots", reset_reboots),
    (
        "resize_keeps_data_and_identity",
        resize_keeps_data_and_identity,
    ),
    (
        "replace_boot_disk_keeps_data_and_identity",
        replace_boot_disk_keeps_data_and_identity,
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
    let (cluster, _cleanup) = fx.isolated(p, C, "idem")?;
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
    let (cluster, _cleanup) = fx.isolated(p, C, "del")?;
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
    let made = call(C, "inventory before delete_cluster", p.inventory(&doomed))?;
    if made.len() < 3 {
        return Err(fail(
            C,
            format!("the inventory of a cluster with 3 machines lists only {made:?}"),
        ));
    }
    call(C, "delete_cluster", p.delete_cluster(&doomed))?;
    let left = call(C, "list after delete_cluster", p.list_machines(&doomed))?;
    if !left.is_empty() {
        return Err(fail(C, format!("delete_cluster left {:?}", names(&left))));
    }
    let left = call(C, "inventory after delete_cluster", p.inventory(&doomed))?;
    if !left.is_empty() {
        return Err(fail(
            C,
            format!("delete_cluster left these resources: {left:?}"),
        ));
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

fn find<'m>(
    check: &'static str,
    listed: &'m [Machine],
    name: &str,
) -> Result<&'m Machine, ConformanceError> {
    listed.iter().find(|m| m.name == name).ok_or_else(|| {
        fail(
            check,
            format!("{name:?} is not listed: {:?}", names(listed)),
        )
    })
}

fn expect_kind<T: fmt::Debug>(
    check: &'static str,
    what: &str,
    r: Result<T, ProviderError>,
    want: &[ErrorKind],
) -> Result<(), ConformanceError> {
    match r {
        Err(e) if want.contains(&e.kind()) => Ok(()),
        Err(e) => Err(fail(
            check,
            format!(
                "{what} failed with {e} (kind {:?}); want {want:?}",
                e.kind()
            ),
        )),
        Ok(v) => Err(fail(
            check,
            format!("{what} succeeded ({v:?}); want an error of kind {want:?}"),
        )),
    }
}

/// Waits until the probe's boot count of `machine` reaches `want`.
fn wait_for_boots(
    check: &'static str,
    p: &dyn Provider,
    fx: &Fixture,
    cluster: &ClusterRef,
    machine: &str,
    want: u64,
) -> Result<u64, ConformanceError> {
    let Some(probe) = &fx.probe else {
        return Ok(want);
    };
    let deadline = Instant::now() + fx.boot_timeout;
    loop {
        let n = probe
            .boot_count(p, cluster, machine)
            .map_err(|e| fail(check, format!("probe: boot count of {machine:?}: {e}")))?;
        if n >= want {
            return Ok(n);
        }
        if Instant::now() >= deadline {
            return Err(fail(
                check,
                format!(
                    "{machine:?} booted {n} time(s) within {:?}; want {want}",
                    fx.boot_timeout
                ),
            ));
        }
        std::thread::sleep(Duration::from_millis(250));
    }
}

fn internal_addresses(m: &Machine) -> Vec<std::net::IpAddr> {
    m.addresses_of(AddressKind::Internal).collect()
}

/// A running machine has an internal address, carries the extra labels it was ensured with (keys
/// with `.` and `/` included, read back decoded) and reports a failure domain.
pub fn running_machines_have_addresses_labels_and_a_failure_domain(
    p: &dyn Provider,
    fx: &Fixture,
) -> Result<(), ConformanceError> {
    const C: &str = "running_machines_have_addresses_labels_and_a_failure_domain";
    let (cluster, _cleanup) = fx.isolated(p, C, "addr")?;
    let mut spec = fx.machine("addr-w-0", MachineRole::Worker, Some("w"));
    let extra = BTreeMap::from([
        ("example.com/team".to_string(), "blue".to_string()),
        ("tier".to_string(), "batch-1".to_string()),
    ]);
    spec.labels.extend(extra.clone());
    let ensured = call(C, "ensure", p.ensure_machine(&cluster, &spec))?;
    let listed = call(C, "list", p.list_machines(&cluster))?;
    let m = find(C, &listed, &spec.name)?;
    if m.state == MachineState::Running && internal_addresses(m).is_empty() {
        return Err(fail(
            C,
            format!(
                "running machine {:?} has no internal address: {:?}",
                m.name, m.addresses
            ),
        ));
    }
    for (k, v) in &spec.labels {
        if m.labels.get(k) != Some(v) {
            return Err(fail(
                C,
                format!(
                    "label {k:?}={v:?} is not read back: the machine lists {:?}",
                    m.labels
                ),
            ));
        }
    }
    if m.labels
        .keys()
        .any(|k| k.starts_with("clusterctl.io/cluster-"))
    {
        return Err(fail(
            C,
            format!(
                "the cluster's own labels are listed as extra labels: {:?}",
                m.labels
            ),
        ));
    }
    if m.failure_domain.as_deref().is_none_or(str::is_empty) {
        return Err(fail(C, format!("{:?} reports no failure domain", m.name)));
    }
    // The planner replaces a machine whose size differs from the spec's: a provider must read
    // back exactly the size it was asked for.
    if m.size.as_ref() != Some(&spec.size) {
        return Err(fail(
            C,
            format!(
                "{:?} was made with size {:?} but lists size {:?}",
                m.name, spec.size, m.size
            ),
        ));
    }
    if ensured.labels != m.labels {
        return Err(fail(
            C,
            format!(
                "ensure returns labels {:?} but list reads {:?}",
                ensured.labels, m.labels
            ),
        ));
    }
    Ok(())
}

/// Machines of one cluster ensured from several threads at once are all created, each once, with
/// distinct addresses.
pub fn parallel_ensures(p: &dyn Provider, fx: &Fixture) -> Result<(), ConformanceError> {
    const C: &str = "parallel_ensures";
    let (cluster, _cleanup) = fx.isolated(p, C, "par")?;
    let specs: Vec<MachineSpec> = (0..3)
        .map(|i| fx.machine(&format!("par-w-{i}"), MachineRole::Worker, Some("w")))
        .collect();
    let results: Vec<Result<Machine, ProviderError>> = std::thread::scope(|s| {
        let handles: Vec<_> = specs
            .iter()
            .map(|spec| s.spawn(|| p.ensure_machine(&cluster, spec)))
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join().unwrap_or_else(|_| {
                    Err(ProviderError::Invalid("an ensure thread panicked".into()))
                })
            })
            .collect()
    });
    for (spec, r) in specs.iter().zip(results) {
        call(C, &format!("parallel ensure of {:?}", spec.name), r)?;
    }
    let listed = call(C, "list", p.list_machines(&cluster))?;
    let mut want: Vec<&str> = specs.iter().map(|s| s.name.as_str()).collect();
    want.sort_unstable();
    if names(&listed) != want {
        return Err(fail(
            C,
            format!(
                "after parallel ensures the cluster lists {:?}; want {want:?}",
                names(&listed)
            ),
        ));
    }
    let mut addrs: Vec<std::net::IpAddr> = listed.iter().flat_map(internal_addresses).collect();
    let running = listed
        .iter()
        .filter(|m| m.state == MachineState::Running)
        .count();
    addrs.sort_unstable();
    addrs.dedup();
    if addrs.len() < running {
        return Err(fail(
            C,
            format!("{running} running machines share addresses: {listed:?}"),
        ));
    }
    Ok(())
}

/// `stop_machine` stops a machine (twice is fine, a missing one is not found) and `ensure`
/// starts it again: the same machine, booted once more.
pub fn stop_and_ensure_starts_a_stopped_machine(
    p: &dyn Provider,
    fx: &Fixture,
) -> Result<(), ConformanceError> {
    const C: &str = "stop_and_ensure_starts_a_stopped_machine";
    let (cluster, _cleanup) = fx.isolated(p, C, "stop")?;
    let spec = fx.machine("stop-w-0", MachineRole::Worker, Some("w"));
    let first = call(C, "ensure", p.ensure_machine(&cluster, &spec))?;
    let boots = wait_for_boots(C, p, fx, &cluster, &spec.name, 1)?;
    let stopped = call(C, "stop", p.stop_machine(&cluster, &spec.name))?;
    call(C, "second stop", p.stop_machine(&cluster, &spec.name))?;
    let listed = call(C, "list after stop", p.list_machines(&cluster))?;
    let m = find(C, &listed, &spec.name)?;
    if stopped.state != MachineState::Stopped || m.state != MachineState::Stopped {
        return Err(fail(
            C,
            format!(
                "after stop the machine is {:?} (stop returned {:?}); want stopped",
                m.state, stopped.state
            ),
        ));
    }
    let again = call(
        C,
        "ensure of the stopped machine",
        p.ensure_machine(&cluster, &spec),
    )?;
    if again.provider_id != first.provider_id {
        return Err(fail(
            C,
            format!(
                "ensure of a stopped machine made a new one ({:?} -> {:?}); want it started",
                first.provider_id, again.provider_id
            ),
        ));
    }
    expect_booting(C, &again)?;
    wait_for_boots(C, p, fx, &cluster, &spec.name, boots + 1)?;
    expect_kind(
        C,
        "stop of a machine that does not exist",
        p.stop_machine(&cluster, &format!("{}-never", fx.prefix)),
        &[ErrorKind::NotFound],
    )
}

/// `resize_machine` gives a machine other CPUs and memory through a reboot, keeping its
/// provider ID, addresses and data disk; the same size again changes nothing; another data disk
/// size is refused as invalid; a missing machine is not found.
pub fn resize_keeps_data_and_identity(
    p: &dyn Provider,
    fx: &Fixture,
) -> Result<(), ConformanceError> {
    const C: &str = "resize_keeps_data_and_identity";
    let (cluster, _cleanup) = fx.isolated(p, C, "rsz")?;
    let spec = fx.machine("rsz-cp-0", MachineRole::ControlPlane, None);
    call(C, "ensure", p.ensure_machine(&cluster, &spec))?;
    let boots = wait_for_boots(C, p, fx, &cluster, &spec.name, 1)?;
    let before = find(C, &call(C, "list", p.list_machines(&cluster))?, &spec.name)?.clone();
    if let Some(probe) = &fx.probe {
        probe
            .write_data_marker(p, &cluster, &spec.name, 0x3c)
            .map_err(|e| fail(C, format!("probe: writing the data disk: {e}")))?;
    }
    let bigger = crate::MachineSize {
        cpus: spec.size.cpus + 1,
        memory_mib: spec.size.memory_mib + 256,
        disk_gib: spec.size.disk_gib,
    };
    let resized = call(C, "resize", p.resize_machine(&cluster, &spec.name, &bigger))?;
    let check = |m: &Machine, want: &crate::MachineSize, what: &str| {
        if m.size.as_ref() != Some(want) {
            return Err(fail(
                C,
                format!(
                    "{what}: the machine reports size {:?}; want {want:?}",
                    m.size
                ),
            ));
        }
        if m.provider_id != before.provider_id {
            return Err(fail(
                C,
                format!(
                    "{what}: the provider ID changed {:?} -> {:?}",
                    before.provider_id, m.provider_id
                ),
            ));
        }
        if m.state == MachineState::Running
            && before.state == MachineState::Running
            && internal_addresses(m) != internal_addresses(&before)
        {
            return Err(fail(
                C,
                format!(
                    "{what}: the addresses changed {:?} -> {:?}",
                    before.addresses, m.addresses
                ),
            ));
        }
        expect_booting(C, m)
    };
    check(&resized, &bigger, "after the resize")?;
    let listed = call(C, "list after the resize", p.list_machines(&cluster))?;
    check(
        find(C, &listed, &spec.name)?,
        &bigger,
        "listed after the resize",
    )?;
    let boots = wait_for_boots(C, p, fx, &cluster, &spec.name, boots + 1)?;
    if let Some(probe) = &fx.probe {
        let got = probe
            .read_data_marker(p, &cluster, &spec.name)
            .map_err(|e| fail(C, format!("probe: reading the data disk: {e}")))?;
        if got != Some(0x3c) {
            return Err(fail(
                C,
                format!("the data disk holds {got:?} after the resize; want Some(0x3c)"),
            ));
        }
    }
    let again = call(
        C,
        "second resize to the same size",
        p.resize_machine(&cluster, &spec.name, &bigger),
    )?;
    check(&again, &bigger, "after a repeated resize")?;
    if let Some(probe) = &fx.probe {
        std::thread::sleep(Duration::from_secs(1));
        let n = probe
            .boot_count(p, &cluster, &spec.name)
            .map_err(|e| fail(C, format!("probe: boot count: {e}")))?;
        if n != boots {
            return Err(fail(
                C,
                format!(
                    "a repeated resize to the same size rebooted the machine ({boots} -> {n} boots)"
                ),
            ));
        }
    }
    expect_kind(
        C,
        "resize of the data disk",
        p.resize_machine(
            &cluster,
            &spec.name,
            &crate::MachineSize {
                disk_gib: spec.size.disk_gib + 1,
                ..bigger.clone()
            },
        ),
        &[ErrorKind::Permanent],
    )?;
    let back = call(
        C,
        "resize back",
        p.resize_machine(&cluster, &spec.name, &spec.size),
    )?;
    check(&back, &spec.size, "after resizing back")?;
    wait_for_boots(C, p, fx, &cluster, &spec.name, boots + 1)?;
    expect_kind(
        C,
        "resize of a machine that does not exist",
        p.resize_machine(&cluster, &format!("{}-never", fx.prefix), &spec.size),
        &[ErrorKind::NotFound],
    )
}

/// `reset_machine` power-cycles a running machine (it boots again, same machine), starts a
/// stopped one, and names a missing one as not found.
pub fn reset_reboots(p: &dyn Provider, fx: &Fixture) -> Result<(), ConformanceError> {
    const C: &str = "reset_reboots";
    let (cluster, _cleanup) = fx.isolated(p, C, "rst")?;
    let spec = fx.machine("rst-w-0", MachineRole::Worker, Some("w"));
    let first = call(C, "ensure", p.ensure_machine(&cluster, &spec))?;
    let boots = wait_for_boots(C, p, fx, &cluster, &spec.name, 1)?;
    let reset = call(C, "reset", p.reset_machine(&cluster, &spec.name))?;
    if reset.provider_id != first.provider_id {
        return Err(fail(
            C,
            format!(
                "reset changed the provider ID {:?} -> {:?}",
                first.provider_id, reset.provider_id
            ),
        ));
    }
    expect_booting(C, &reset)?;
    let boots = wait_for_boots(C, p, fx, &cluster, &spec.name, boots + 1)?;
    call(C, "stop", p.stop_machine(&cluster, &spec.name))?;
    let started = call(
        C,
        "reset of a stopped machine",
        p.reset_machine(&cluster, &spec.name),
    )?;
    expect_booting(C, &started)?;
    wait_for_boots(C, p, fx, &cluster, &spec.name, boots + 1)?;
    expect_kind(
        C,
        "reset of a machine that does not exist",
        p.reset_machine(&cluster, &format!("{}-never", fx.prefix)),
        &[ErrorKind::NotFound],
    )
}

/// `replace_boot_disk` boots a machine from the other image while its data disk, addresses and
/// provider ID stay; repeating it changes nothing; replacing back (the rollback) works the same
/// way; a missing machine is not found and another cluster's machine is left untouched.
pub fn replace_boot_disk_keeps_data_and_identity(
    p: &dyn Provider,
    fx: &Fixture,
) -> Result<(), ConformanceError> {
    const C: &str = "replace_boot_disk_keeps_data_and_identity";
    if fx.other_image.digest == fx.template.image.digest {
        return Err(ConformanceError::setup(
            "the fixture's other image has the template image's digest; give it a different image",
        ));
    }
    let cluster = fx.cluster(C, "rpl")?;
    let other = fx.cluster(C, "rplx")?;
    let _cleanup = Cleanup {
        provider: p,
        clusters: vec![cluster.clone(), other.clone()],
    };
    let spec = fx.machine("rpl-w-0", MachineRole::Worker, Some("w"));
    call(C, "ensure", p.ensure_machine(&cluster, &spec))?;
    let boots = wait_for_boots(C, p, fx, &cluster, &spec.name, 1)?;
    let before = find(C, &call(C, "list", p.list_machines(&cluster))?, &spec.name)?.clone();
    if let Some(probe) = &fx.probe {
        probe
            .write_data_marker(p, &cluster, &spec.name, 0x5a)
            .map_err(|e| fail(C, format!("probe: writing the data disk: {e}")))?;
    }
    let replaced = call(
        C,
        "replace with the other image",
        p.replace_boot_disk(&cluster, &spec.name, &fx.other_image),
    )?;
    let check_machine = |m: &Machine, image: &ImageRef, what: &str| {
        if m.image_digest.as_deref() != Some(image.digest.as_str()) {
            return Err(fail(
                C,
                format!(
                    "{what}: the machine boots {:?}; want {:?}",
                    m.image_digest, image.digest
                ),
            ));
        }
        if m.provider_id != before.provider_id {
            return Err(fail(
                C,
                format!(
                    "{what}: the provider ID changed {:?} -> {:?}",
                    before.provider_id, m.provider_id
                ),
            ));
        }
        if m.state == MachineState::Running
            && before.state == MachineState::Running
            && internal_addresses(m) != internal_addresses(&before)
        {
            return Err(fail(
                C,
                format!(
                    "{what}: the addresses changed {:?} -> {:?}",
                    before.addresses, m.addresses
                ),
            ));
        }
        expect_booting(C, m)
    };
    check_machine(&replaced, &fx.other_image, "after replacement")?;
    let listed = call(C, "list after replacement", p.list_machines(&cluster))?;
    check_machine(
        find(C, &listed, &spec.name)?,
        &fx.other_image,
        "listed after replacement",
    )?;
    let boots = wait_for_boots(C, p, fx, &cluster, &spec.name, boots + 1)?;
    if let Some(probe) = &fx.probe {
        let got = probe
            .read_data_marker(p, &cluster, &spec.name)
            .map_err(|e| fail(C, format!("probe: reading the data disk: {e}")))?;
        if got != Some(0x5a) {
            return Err(fail(
                C,
                format!("the data disk holds {got:?} after the replacement; want Some(0x5a)"),
            ));
        }
    }
    let again = call(
        C,
        "second replacement with the same image",
        p.replace_boot_disk(&cluster, &spec.name, &fx.other_image),
    )?;
    check_machine(&again, &fx.other_image, "after a repeated replacement")?;
    if let Some(probe) = &fx.probe {
        std::thread::sleep(Duration::from_secs(1));
        let n = probe
            .boot_count(p, &cluster, &spec.name)
            .map_err(|e| fail(C, format!("probe: boot count: {e}")))?;
        if n != boots {
            return Err(fail(
                C,
                format!(
                    "a repeated replacement with the same image rebooted the machine ({boots} -> {n} boots)"
                ),
            ));
        }
    }
    let back = call(
        C,
        "rollback to the first image",
        p.replace_boot_disk(&cluster, &spec.name, &fx.template.image),
    )?;
    check_machine(&back, &fx.template.image, "after the rollback")?;
    wait_for_boots(C, p, fx, &cluster, &spec.name, boots + 1)?;
    if let Some(probe) = &fx.probe {
        let got = probe
            .read_data_marker(p, &cluster, &spec.name)
            .map_err(|e| fail(C, format!("probe: reading the data disk: {e}")))?;
        if got != Some(0x5a) {
            return Err(fail(
                C,
                format!("the data disk holds {got:?} after the rollback; want Some(0x5a)"),
            ));
        }
    }
    expect_kind(
        C,
        "replacement of a machine that does not exist",
        p.replace_boot_disk(&cluster, &format!("{}-never", fx.prefix), &fx.other_image),
        &[ErrorKind::NotFound],
    )?;
    // Another cluster naming this machine: refused, and the machine is untouched.
    expect_kind(
        C,
        "replacement by another cluster",
        p.replace_boot_disk(&other, &spec.name, &fx.other_image),
        &[ErrorKind::NotFound, ErrorKind::AlreadyExists],
    )?;
    let listed = call(
        C,
        "list after the foreign replacement",
        p.list_machines(&cluster),
    )?;
    check_machine(
        find(C, &listed, &spec.name)?,
        &fx.template.image,
        "after a foreign replacement",
    )
}
