//! Machine names of node pools: `<cluster>-<pool>-<5 random characters>`, never reused.
//!
//! A pool's machines are named when they are first wanted, and the names are kept in the cluster
//! record ([`PoolMembers`], in the order they were given out) before any machine holding them is
//! made, so a killed run resumes with the same names, and a machine that replaces another (a
//! repair, a surge upgrade) gets a name of its own instead of the old one: the old machine's
//! Node, host key and journal records can never be mistaken for the new one's. Names given up are
//! remembered ([`RETIRED_KEPT`] of them) and never handed out again.
//!
//! Control-plane machines keep `<cluster>-cp-<i>`: they are never replaced (an upgrade swaps
//! their boot disk and keeps their data disk, so etcd's member name and their certificates stay).
//!
//! Clusters made before names were random keep their machines: a pool with no members in the
//! record adopts the machines it already has (`<cluster>-<pool>-<i>`, from the last observation
//! and the pinned host keys) in index order.
//!
//! [`assign`] is pure: the random part comes from the `fresh` function it is given, so tests pin it.

use std::collections::{BTreeMap, BTreeSet};

use providers::{Machine, MachineRole};

use crate::spec;

/// Names of each node pool's machines, in the order they were given out.
pub type PoolMembers = BTreeMap<String, Vec<String>>;

/// Characters of the random part: no vowels (no words), no `0`/`1`/`3` (read as o, l, e), as
/// Kubernetes' own generated names.
pub const SUFFIX_ALPHABET: &[u8] = b"bcdfghjklmnpqrstvwxz2456789";
/// Length of the random part: 20 x 27^4, about 10 million names per pool.
pub const SUFFIX_LEN: usize = 5;
/// How many given-up names the record remembers so they are not handed out again.
pub const RETIRED_KEPT: usize = 1000;

/// The letters of [`SUFFIX_ALPHABET`]: a suffix starts with one, so it is never all digits
/// (`<cluster>-cp-<digits>` and the indexed names of older clusters stay apart).
const SUFFIX_LETTERS: usize = 20;

/// A new random suffix.
pub fn random_suffix() -> String {
    (0..SUFFIX_LEN)
        .map(|i| {
            let range = if i == 0 {
                SUFFIX_LETTERS
            } else {
                SUFFIX_ALPHABET.len()
            };
            SUFFIX_ALPHABET[rand::random_range(0..range)] as char
        })
        .collect()
}

/// The name of a pool machine with the given suffix.
pub fn pool_machine_name(cluster: &str, pool: &str, suffix: &str) -> String {
    format!("{cluster}-{pool}-{suffix}")
}

/// The name of control-plane machine `i`.
pub fn control_plane_name(cluster: &str, i: u32) -> String {
    format!("{cluster}-cp-{i}")
}

/// What [`assign`] changed.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Assigned {
    /// Names given out now, as `(pool, name)`.
    pub added: Vec<(String, String)>,
    /// Names no longer wanted (a smaller pool, a pool gone), retired.
    pub dropped: Vec<(String, String)>,
    /// Pools that adopted the machines of a cluster named before names were random.
    pub adopted: Vec<String>,
}

/// What the record knows that [`assign`] reads.
pub struct Known<'a> {
    /// Machines as last observed.
    pub machines: &'a [Machine],
    /// Names with a pinned host key (pinned before a machine is made, so complete).
    pub host_keys: &'a BTreeSet<String>,
    /// Machines a pool has beyond its count for now and keeps (a surge upgrade's new machines
    /// while the ones they replace still run).
    pub surge: &'a BTreeSet<String>,
}

/// Brings `members` to what `desired` asks for: each pool with exactly `count` names (plus its
/// surge machines, [`Known::surge`]). A pool
/// that has more keeps its oldest (the newest go first, as node pools scale down); a pool with
/// fewer gets new names from `fresh` (a suffix), each unused by any member, retired name, pinned
/// host key or observed machine. Pools the spec no longer has are dropped. Dropped names go to
/// `retired` (the newest [`RETIRED_KEPT`] kept).
pub fn assign(
    desired: &spec::Cluster,
    members: &mut PoolMembers,
    retired: &mut Vec<String>,
    known: &Known<'_>,
    fresh: &mut dyn FnMut() -> String,
) -> Assigned {
    let cluster = desired.metadata.name.as_str();
    let mut out = Assigned::default();
    let mut taken: BTreeSet<String> = members.values().flatten().cloned().collect();
    taken.extend(retired.iter().cloned());
    taken.extend(known.host_keys.iter().cloned());
    taken.extend(known.machines.iter().map(|m| m.name.clone()));
    let wanted_pools: BTreeSet<&str> = desired
        .spec
        .node_pools
        .iter()
        .map(|p| p.name.as_str())
        .collect();
    let gone: Vec<String> = members
        .keys()
        .filter(|p| !wanted_pools.contains(p.as_str()))
        .cloned()
        .collect();
    for pool in gone {
        for name in members.remove(&pool).unwrap_or_default() {
            out.dropped.push((pool.clone(), name));
        }
    }
    for pool in &desired.spec.node_pools {
        let list = members.entry(pool.name.clone()).or_insert_with(|| {
            let legacy = legacy_names(cluster, &pool.name, known);
            if !legacy.is_empty() {
                out.adopted.push(pool.name.clone());
            }
            legacy
        });
        // Surge machines are on top of the count; the newest others go first.
        let count = pool.count as usize + list.iter().filter(|n| known.surge.contains(*n)).count();
        while list.len() > count {
            let Some(i) = list.iter().rposition(|n| !known.surge.contains(n)) else {
                break;
            };
            out.dropped.push((pool.name.clone(), list.remove(i)));
        }
        while list.len() < count {
            // 10 million names per pool: a handful of tries always finds a free one; the bound
            // only keeps a broken `fresh` from looping for ever.
            let name = (0..1000)
                .map(|_| pool_machine_name(cluster, &pool.name, &fresh()))
                .find(|n| !taken.contains(n));
            let Some(name) = name else { break };
            taken.insert(name.clone());
            list.push(name.clone());
            out.added.push((pool.name.clone(), name));
        }
    }
    retire(
        retired,
        out.dropped
            .iter()
            .map(|(_, n)| n.clone())
            .collect::<Vec<_>>(),
    );
    out
}

/// Adds `names` to the retired list, keeping the newest [`RETIRED_KEPT`].
pub fn retire(retired: &mut Vec<String>, names: impl IntoIterator<Item = String>) {
    for n in names {
        if !retired.contains(&n) {
            retired.push(n);
        }
    }
    if retired.len() > RETIRED_KEPT {
        let extra = retired.len() - RETIRED_KEPT;
        retired.drain(..extra);
    }
}

/// A new name for `pool` unused by anything in `members`, `retired` or `also`.
pub fn fresh_name(
    cluster: &str,
    pool: &str,
    members: &PoolMembers,
    retired: &[String],
    also: &BTreeSet<String>,
    fresh: &mut dyn FnMut() -> String,
) -> Option<String> {
    (0..1000)
        .map(|_| pool_machine_name(cluster, pool, &fresh()))
        .find(|n| {
            !also.contains(n) && !retired.contains(n) && !members.values().flatten().any(|m| m == n)
        })
}

/// Machines of `pool` named `<cluster>-<pool>-<i>` that the record knows, in index order.
fn legacy_names(cluster: &str, pool: &str, known: &Known<'_>) -> Vec<String> {
    let prefix = format!("{cluster}-{pool}-");
    let index = |n: &str| -> Option<u64> {
        let rest = n.strip_prefix(&prefix)?;
        if rest.is_empty() || !rest.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        rest.parse().ok()
    };
    let mut found: BTreeMap<u64, String> = BTreeMap::new();
    for m in known.machines {
        if m.role == MachineRole::Worker
            && m.pool.as_deref() == Some(pool)
            && let Some(i) = index(&m.name)
        {
            found.insert(i, m.name.clone());
        }
    }
    for n in known.host_keys {
        if let Some(i) = index(n) {
            found.insert(i, n.clone());
        }
    }
    found.into_values().collect()
}

/// A deterministic `fresh` for tests: `x0001`, `x0002`, ...
pub fn counting_suffixes() -> impl FnMut() -> String {
    let mut n = 0u32;
    move || {
        n += 1;
        format!("x{n:04}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(pools: &[(&str, u32)]) -> spec::Cluster {
        let mut text = String::from(
            "apiVersion: clusterctl.io/v1alpha1\nkind: Cluster\nmetadata:\n  name: c1\nspec:\n  provider:\n    fake:\n      directory: /tmp/fake\n  kubernetes:\n    channel: stable\n  ssh:\n    agent: true\n  controlPlane:\n    count: 1\n  nodePools:\n",
        );
        for (name, count) in pools {
            text.push_str(&format!("    - name: {name}\n      count: {count}\n"));
        }
        if pools.is_empty() {
            text.push_str("    []\n");
        }
        match spec::parse_str(&text, "test.yaml") {
            Ok(c) => c,
            Err(e) => panic!("test spec: {e}"),
        }
    }

    fn worker(name: &str, pool: &str) -> Machine {
        Machine {
            provider_id: format!("fake://{name}"),
            name: name.into(),
            role: MachineRole::Worker,
            pool: Some(pool.into()),
            state: providers::MachineState::Running,
            addresses: vec![],
            failure_domain: None,
            image_digest: None,
            size: None,
            labels: Default::default(),
        }
    }

    #[test]
    fn random_suffixes_use_the_alphabet() {
        for _ in 0..100 {
            let s = random_suffix();
            assert_eq!(s.len(), SUFFIX_LEN);
            assert!(s.bytes().all(|b| SUFFIX_ALPHABET.contains(&b)), "{s}");
            assert!(s.as_bytes()[0].is_ascii_lowercase(), "{s}");
        }
    }

    #[test]
    fn a_new_cluster_gets_fresh_names_and_a_rerun_keeps_them() {
        let desired = spec(&[("a", 2), ("b", 1)]);
        let mut members = PoolMembers::new();
        let mut retired = Vec::new();
        let keys = BTreeSet::new();
        let known = Known {
            machines: &[],
            host_keys: &keys,
            surge: &keys,
        };
        let mut fresh = counting_suffixes();
        let got = assign(&desired, &mut members, &mut retired, &known, &mut fresh);
        assert_eq!(members["a"], ["c1-a-x0001", "c1-a-x0002"]);
        assert_eq!(members["b"], ["c1-b-x0003"]);
        assert_eq!(got.added.len(), 3);
        let again = assign(&desired, &mut members, &mut retired, &known, &mut fresh);
        assert_eq!(again, Assigned::default());
        assert_eq!(members["a"], ["c1-a-x0001", "c1-a-x0002"]);
    }

    #[test]
    fn scale_down_drops_the_newest_and_never_reuses_them() {
        let mut members = PoolMembers::new();
        let mut retired = Vec::new();
        let keys = BTreeSet::new();
        let known = Known {
            machines: &[],
            host_keys: &keys,
            surge: &keys,
        };
        let mut fresh = counting_suffixes();
        assign(
            &spec(&[("a", 3)]),
            &mut members,
            &mut retired,
            &known,
            &mut fresh,
        );
        let got = assign(
            &spec(&[("a", 1)]),
            &mut members,
            &mut retired,
            &known,
            &mut fresh,
        );
        assert_eq!(members["a"], ["c1-a-x0001"]);
        assert_eq!(
            got.dropped,
            [
                ("a".to_owned(), "c1-a-x0003".to_owned()),
                ("a".to_owned(), "c1-a-x0002".to_owned())
            ]
        );
        // A generator that repeats itself cannot hand a retired name out again.
        let mut repeating = {
            let mut calls = 0;
            move || {
                calls += 1;
                if calls <= 2 {
                    "x0002".into()
                } else {
                    "x0009".into()
                }
            }
        };
        assign(
            &spec(&[("a", 2)]),
            &mut members,
            &mut retired,
            &known,
            &mut repeating,
        );
        assert_eq!(members["a"], ["c1-a-x0001", "c1-a-x0009"]);
    }

    #[test]
    fn surge_machines_are_kept_on_top_of_the_count() {
        let mut members = PoolMembers::new();
        let mut retired = Vec::new();
        let none = BTreeSet::new();
        let mut fresh = counting_suffixes();
        let plain = Known {
            machines: &[],
            host_keys: &none,
            surge: &none,
        };
        assign(
            &spec(&[("a", 2)]),
            &mut members,
            &mut retired,
            &plain,
            &mut fresh,
        );
        // An upgrade adds a surge machine to the pool.
        members.get_mut("a").map(|l| l.push("c1-a-s0001".into()));
        let surge: BTreeSet<String> = ["c1-a-s0001".to_owned()].into();
        let held = Known {
            machines: &[],
            host_keys: &none,
            surge: &surge,
        };
        let got = assign(
            &spec(&[("a", 2)]),
            &mut members,
            &mut retired,
            &held,
            &mut fresh,
        );
        assert_eq!(got, Assigned::default());
        assert_eq!(members["a"], ["c1-a-x0001", "c1-a-x0002", "c1-a-s0001"]);
        // A smaller pool during a surge drops an old machine, never the surge one.
        assign(
            &spec(&[("a", 1)]),
            &mut members,
            &mut retired,
            &held,
            &mut fresh,
        );
        assert_eq!(members["a"], ["c1-a-x0001", "c1-a-s0001"]);
    }

    #[test]
    fn a_removed_pool_is_dropped() {
        let mut members = PoolMembers::new();
        let mut retired = Vec::new();
        let keys = BTreeSet::new();
        let known = Known {
            machines: &[],
            host_keys: &keys,
            surge: &keys,
        };
        let mut fresh = counting_suffixes();
        assign(
            &spec(&[("a", 1), ("b", 1)]),
            &mut members,
            &mut retired,
            &known,
            &mut fresh,
        );
        let got = assign(
            &spec(&[("a", 1)]),
            &mut members,
            &mut retired,
            &known,
            &mut fresh,
        );
        assert!(!members.contains_key("b"));
        assert_eq!(got.dropped, [("b".to_owned(), "c1-b-x0002".to_owned())]);
        assert_eq!(retired, ["c1-b-x0002"]);
    }

    #[test]
    fn an_older_cluster_keeps_its_indexed_machines() {
        // Observed: c1-a-0 and c1-a-10; c1-a-1 has a pinned key only (killed before it was made).
        let machines = vec![worker("c1-a-10", "a"), worker("c1-a-0", "a")];
        let keys: BTreeSet<String> = ["c1-cp-0", "c1-a-1", "c1-a-x-0"]
            .into_iter()
            .map(String::from)
            .collect();
        let none = BTreeSet::new();
        let known = Known {
            machines: &machines,
            host_keys: &keys,
            surge: &none,
        };
        let mut members = PoolMembers::new();
        let mut retired = Vec::new();
        let got = assign(
            &spec(&[("a", 4)]),
            &mut members,
            &mut retired,
            &known,
            &mut counting_suffixes(),
        );
        assert_eq!(got.adopted, ["a"]);
        assert_eq!(members["a"], ["c1-a-0", "c1-a-1", "c1-a-10", "c1-a-x0001"]);
    }

    #[test]
    fn retired_names_are_bounded() {
        let mut retired = Vec::new();
        retire(&mut retired, (0..RETIRED_KEPT + 5).map(|i| format!("n{i}")));
        assert_eq!(retired.len(), RETIRED_KEPT);
        assert_eq!(retired[0], "n5");
    }
}
