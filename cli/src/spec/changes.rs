//! What may change when a spec is applied again to an existing cluster (`create` re-run, `plan`).
//!
//! Some fields are fixed for a cluster's life: its provider (machines made through it would be
//! orphaned), its pod and Service networks and cluster domain (node pod ranges, Service IPs,
//! certificates and every pod's DNS were made from them). Others change only through a command
//! that does not exist yet: the control-plane count (HA control planes), machine sizes (machines
//! are replaced, the upgrade's job) and the Kubernetes version. (The node image is pinned in the
//! cluster's record and checked where it is chosen, `provider::node_image`: only
//! `clusterctl upgrade --node-image` changes it.) A re-apply that changes any of them is refused, naming the field, the old and new
//! value, why, and what to do instead, before anything is touched. Pool counts, new pools and
//! removed pools are what a re-apply is for.

use std::path::Path;

use super::{Cluster, PathMap, Provider, SpecError, SpecErrorKind, SpecErrors};

/// One refused change.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    /// Field path in the new spec, e.g. `spec.kubernetes.podCIDR`.
    pub path: String,
    /// What changed and why it may not.
    pub message: String,
    /// What to do instead.
    pub hint: String,
}

fn refusal(path: impl Into<String>, message: String, hint: &str) -> Refusal {
    Refusal {
        path: path.into(),
        message,
        hint: hint.to_owned(),
    }
}

const RECREATE: &str =
    "keep the stored value, or delete the cluster and create it again with the new one";
const RESIZE: &str = "keep the stored disk size: a control plane keeps its data disk (etcd), and the node image does not grow a disk's filesystem yet; its cpus and memory may change (resized in place)";
const VERSION: &str = "keep the stored value: `clusterctl upgrade NAME --kubernetes-version V` changes it (control plane first, one node at a time) and stores the new one, which this file then names";

/// The changes from `stored` to `new` that a re-apply refuses, in spec order. Pure.
pub fn refused_changes(stored: &Cluster, new: &Cluster) -> Vec<Refusal> {
    let mut out = Vec::new();
    let (s, n) = (&stored.spec, &new.spec);
    match (&s.provider, &n.provider) {
        (Provider::Libvirt(a), Provider::Libvirt(b)) => {
            let why =
                "the cluster's machines, disks and network were made there and would be orphaned";
            if a.uri != b.uri {
                out.push(refusal(
                    "spec.provider.libvirt.uri",
                    format!("cannot change from {:?} to {:?}: {why}", a.uri, b.uri),
                    RECREATE,
                ));
            }
            if a.storage_dir != b.storage_dir {
                out.push(refusal(
                    "spec.provider.libvirt.storageDir",
                    format!(
                        "cannot change from {} to {}: {why}",
                        a.storage_dir.display(),
                        b.storage_dir.display()
                    ),
                    RECREATE,
                ));
            }
            if a.network != b.network {
                out.push(refusal(
                    "spec.provider.libvirt.network",
                    format!(
                        "cannot change ({:?} {} -> {:?} {}): every machine's address was reserved in it",
                        a.network.mode, a.network.cidr, b.network.mode, b.network.cidr
                    ),
                    RECREATE,
                ));
            }
        }
        (Provider::Fake(a), Provider::Fake(b)) if a.directory != b.directory => {
            out.push(refusal(
                "spec.provider.fake.directory",
                format!(
                    "cannot change from {} to {}: the cluster's machines are recorded there",
                    a.directory.display(),
                    b.directory.display()
                ),
                RECREATE,
            ));
        }
        (a, b) if a.name() != b.name() => out.push(refusal(
            "spec.provider",
            format!(
                "cannot change from {} to {}: the cluster's machines were made by {}",
                a.name(),
                b.name(),
                a.name()
            ),
            RECREATE,
        )),
        _ => {}
    }
    let (ks, kn) = (&s.kubernetes, &n.kubernetes);
    if ks.version != kn.version {
        let show = |v: &Option<super::KubernetesVersion>| {
            v.as_ref()
                .map_or_else(|| "(none)".to_owned(), ToString::to_string)
        };
        out.push(refusal(
            "spec.kubernetes.version",
            format!(
                "cannot change from {} to {} on an existing cluster: a version change is an upgrade (control plane first, nodes drained one by one)",
                show(&ks.version),
                show(&kn.version)
            ),
            VERSION,
        ));
    }
    if ks.channel != kn.channel {
        out.push(refusal(
            "spec.kubernetes.channel",
            format!(
                "cannot change from {:?} to {:?} on an existing cluster: a channel decides upgrades, which are not implemented yet",
                ks.channel, kn.channel
            ),
            "keep the stored value",
        ));
    }
    if ks.pod_cidr != kn.pod_cidr {
        out.push(refusal(
            "spec.kubernetes.podCIDR",
            format!(
                "cannot change from {} to {}: every node's pod range and every pod's address were taken from it",
                ks.pod_cidr, kn.pod_cidr
            ),
            RECREATE,
        ));
    }
    if ks.service_cidr != kn.service_cidr {
        out.push(refusal(
            "spec.kubernetes.serviceCIDR",
            format!(
                "cannot change from {} to {}: Service IPs and the API server's certificate were made from it",
                ks.service_cidr, kn.service_cidr
            ),
            RECREATE,
        ));
    }
    if ks.cluster_domain != kn.cluster_domain {
        out.push(refusal(
            "spec.kubernetes.clusterDomain",
            format!(
                "cannot change from {:?} to {:?}: certificates, kubelets and every pod's DNS search path use it",
                ks.cluster_domain, kn.cluster_domain
            ),
            RECREATE,
        ));
    }
    if s.control_plane.count != n.control_plane.count {
        out.push(refusal(
            "spec.controlPlane.count",
            format!(
                "cannot change from {} to {}: adding or removing control-plane machines (etcd members) is not implemented yet",
                s.control_plane.count, n.control_plane.count
            ),
            "keep the stored count",
        ));
    }
    // A node pool's `machine` may change: its machines are replaced by new ones of the new size
    // (`action::upgrade`, by the pool's upgradeSettings). A control plane keeps its machines
    // (their etcd members and data disks): its cpus and memory change in place
    // (`Provider::resize_machine`), its data disk cannot.
    if s.control_plane.machine.disk != n.control_plane.machine.disk {
        out.push(refusal(
            "spec.controlPlane.machine.disk",
            format!(
                "cannot change from {} to {} on existing control-plane machines: their data disk holds etcd and stays",
                s.control_plane.machine.disk, n.control_plane.machine.disk
            ),
            RESIZE,
        ));
    }
    out
}

/// [`refused_changes`] as errors located in the spec file (line and column of each field; the
/// file is read again for the locations only).
pub fn check_reapply(file: &Path, stored: &Cluster, new: &Cluster) -> Result<(), SpecErrors> {
    let refusals = refused_changes(stored, new);
    if refusals.is_empty() {
        return Ok(());
    }
    let text = std::fs::read_to_string(file).unwrap_or_default();
    let map = PathMap::build(&text);
    let name = file.display().to_string();
    let mut errors: Vec<SpecError> = refusals
        .into_iter()
        .map(|r| {
            let pos = map.locate(&r.path);
            SpecError {
                file: name.clone(),
                line: pos.line,
                column: pos.column,
                path: r.path,
                message: r.message,
                hint: Some(r.hint),
                kind: SpecErrorKind::Semantic,
            }
        })
        .collect();
    errors.sort_by_key(|e| (e.line, e.column));
    Err(SpecErrors { errors })
}

#[cfg(test)]
mod tests {
    use super::*;

    const BASE: &str = "apiVersion: clusterctl.io/v1alpha1
kind: Cluster
metadata:
  name: c1
spec:
  provider:
    libvirt:
      uri: qemu:///system
  kubernetes:
    version: 1.20.2
  nodePools:
    - name: workers
      count: 2
";

    fn parse(text: &str) -> Cluster {
        crate::spec::parse_str(text, "c.yaml").unwrap_or_else(|e| panic!("{e}"))
    }

    #[test]
    fn counts_and_pools_may_change_nothing_else_silently() {
        let stored = parse(BASE);
        assert_eq!(refused_changes(&stored, &stored), vec![]);
        let scaled =
            parse(&BASE.replace("count: 2", "count: 5\n    - name: extra\n      count: 1"));
        assert_eq!(refused_changes(&stored, &scaled), vec![]);
        // A pool's size: its machines are replaced, not refused.
        let resized = parse(&BASE.replace(
            "count: 2",
            "count: 2\n      machine:\n        cpus: 4\n        memory: 8Gi",
        ));
        assert_eq!(refused_changes(&stored, &resized), vec![]);
    }

    #[test]
    fn immutable_and_unimplemented_changes_are_refused_with_the_field() {
        let stored = parse(BASE);
        let changed = parse(&BASE.replace(
            "    version: 1.20.2\n",
            "    version: 1.20.2\n    podCIDR: 10.250.0.0/16\n    clusterDomain: example.internal\n",
        ).replace("      uri: qemu:///system\n", "      uri: qemu:///system\n      storageDir: /srv/vms\n")
        .replace("      count: 2\n", "      count: 2\n      machine:\n        cpus: 4\n")
        .replace("  nodePools:\n", "  controlPlane:\n    machine:\n      memory: 8Gi\n      disk: 40Gi\n  nodePools:\n"));
        let got: Vec<String> = refused_changes(&stored, &changed)
            .into_iter()
            .map(|r| r.path)
            .collect();
        assert_eq!(
            got,
            [
                "spec.provider.libvirt.storageDir",
                "spec.kubernetes.podCIDR",
                "spec.kubernetes.clusterDomain",
                "spec.controlPlane.machine.disk",
            ]
        );
    }

    #[test]
    fn refusals_point_at_the_file_line_and_column() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let file = dir.path().join("c.yaml");
        let text = BASE.replace("count: 2", "count: 2\n  controlPlane:\n    count: 3");
        std::fs::write(&file, &text).unwrap_or_else(|e| panic!("{e}"));
        let stored = parse(BASE);
        // A spec the validator refuses (count 3) cannot be parsed; compare with a hand-made one.
        let mut new = stored.clone();
        new.spec.control_plane.count = 3;
        new.spec.kubernetes.service_cidr = "10.97.0.0/12".parse().unwrap_or_else(|e| panic!("{e}"));
        let err = check_reapply(&file, &stored, &new).expect_err("refused");
        let text = err.to_string();
        assert!(text.contains("2 problems"), "{text}");
        assert!(
            text.contains("c.yaml:15:12: spec.controlPlane.count: cannot change from 1 to 3"),
            "{text}"
        );
        assert!(
            text.contains(
                "spec.kubernetes.serviceCIDR: cannot change from 10.96.0.0/12 to 10.97.0.0/12"
            ),
            "{text}"
        );
        assert!(text.contains("hint: keep the stored"), "{text}");
    }
}
