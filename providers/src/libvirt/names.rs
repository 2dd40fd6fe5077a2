//! Names, MAC addresses and address plans derived from the cluster ID.
//!
//! Conventions (documented in the module docs of [`super`]):
//! - network and storage pool: `clusterctl-<cluster-id>`; bridge `ccbr<8 hex of sha256(id)>`;
//! - pool directory: `<storage root>/<cluster-id>`; owner marker volume `clusterctl-owner-<cluster-id>`;
//! - image volumes: `image-<digest16>-{kernel,initrd,root}` and the completion marker
//!   `image-<digest16>.complete`;
//! - machine volumes: `<machine>-root.qcow2`, `<machine>-data.qcow2`, `<machine>-seed.img`.

use std::net::Ipv4Addr;

use sha2::{Digest, Sha256};

use crate::ProviderError;

/// Checks that a cluster ID is usable inside libvirt object names and file names.
pub(crate) fn check_cluster_id(id: &str) -> Result<(), ProviderError> {
    let ok = !id.is_empty()
        && id.len() <= 64
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        && id.starts_with(|c: char| c.is_ascii_alphanumeric());
    if ok {
        Ok(())
    } else {
        Err(ProviderError::Invalid(format!(
            "cluster id {id:?} must be 1-64 characters of letters, digits, '-' and '_', starting with a letter or digit"
        )))
    }
}

pub(crate) use crate::check_machine_name;

/// Name of the cluster's network and storage pool.
pub(crate) fn cluster_object_name(cluster_id: &str) -> String {
    format!("clusterctl-{cluster_id}")
}

/// Name of the volume whose presence marks a storage pool as the cluster's.
pub(crate) fn owner_marker_volume(cluster_id: &str) -> String {
    format!("clusterctl-owner-{cluster_id}")
}

fn sha256_hex(data: &str) -> String {
    let digest = Sha256::digest(data.as_bytes());
    digest.iter().map(|b| format!("{b:02x}")).collect()
}

/// Bridge device name (Linux limits interface names to 15 characters).
pub(crate) fn bridge_name(cluster_id: &str) -> String {
    format!("ccbr{}", &sha256_hex(cluster_id)[..8])
}

/// Short, name-safe form of an image digest (the digest may carry an algorithm prefix).
pub(crate) fn image_tag(digest: &str) -> String {
    let hex: String = digest
        .rsplit(':')
        .next()
        .unwrap_or(digest)
        .chars()
        .filter(char::is_ascii_alphanumeric)
        .take(16)
        .collect();
    if hex.is_empty() {
        sha256_hex(digest)[..16].to_string()
    } else {
        hex
    }
}

/// Volumes of one image inside the cluster's pool.
#[derive(Debug, Clone)]
pub(crate) struct ImageVolumeNames {
    pub kernel: String,
    pub initrd: String,
    pub root: String,
    pub complete: String,
}

pub(crate) fn image_volumes(digest: &str) -> ImageVolumeNames {
    let tag = image_tag(digest);
    ImageVolumeNames {
        kernel: format!("image-{tag}-kernel"),
        initrd: format!("image-{tag}-initrd"),
        root: format!("image-{tag}-root"),
        complete: format!("image-{tag}.complete"),
    }
}

/// Volumes of one machine inside the cluster's pool.
#[derive(Debug, Clone)]
pub(crate) struct MachineVolumeNames {
    pub root: String,
    pub data: String,
    pub seed: String,
}

impl MachineVolumeNames {
    pub(crate) fn all(&self) -> [&str; 3] {
        [&self.root, &self.data, &self.seed]
    }
}

pub(crate) fn machine_volumes(machine: &str) -> MachineVolumeNames {
    MachineVolumeNames {
        root: format!("{machine}-root.qcow2"),
        data: format!("{machine}-data.qcow2"),
        seed: format!("{machine}-seed.img"),
    }
}

/// The `attempt`-th candidate MAC for a machine: locally administered QEMU prefix 52:54:00 plus
/// three bytes of sha256(cluster id, machine name, attempt). Deterministic, so a re-run picks the
/// same address; the attempt counter resolves the rare collision inside one network.
pub(crate) fn candidate_mac(cluster_id: &str, machine: &str, attempt: u32) -> String {
    let digest = Sha256::digest(format!("{cluster_id}/{machine}/{attempt}").as_bytes());
    format!(
        "52:54:00:{:02x}:{:02x}:{:02x}",
        digest[0], digest[1], digest[2]
    )
}

/// The name of the tombstone that keeps a deleted machine's address reserved (see
/// [`AddressPlan::choose`]): when it was deleted, and its MAC (unique in the network).
pub(crate) fn retired_host_name(unix_secs: u64, mac: &str) -> String {
    let mac: String = mac.chars().filter(char::is_ascii_hexdigit).collect();
    format!("retired-{unix_secs}-{}", mac.to_ascii_lowercase())
}

/// When a tombstone ([`retired_host_name`]) was made; `None` for a machine's reservation.
pub(crate) fn retired_at(name: &str) -> Option<u64> {
    name.strip_prefix("retired-")?
        .split('-')
        .next()?
        .parse()
        .ok()
}

/// Address plan of a cluster network: gateway, reserved range for machines, dynamic range.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct AddressPlan {
    pub network: Ipv4Addr,
    pub prefix: u8,
    pub gateway: Ipv4Addr,
    pub first_reserved: Ipv4Addr,
    pub last_reserved: Ipv4Addr,
    pub dhcp_start: Ipv4Addr,
    pub dhcp_end: Ipv4Addr,
}

impl AddressPlan {
    /// Plans a network: `.1` is the gateway, machines get reservations from `.10` on, the last
    /// quarter (at most 32 addresses) is the dynamic DHCP range for anything unexpected.
    pub(crate) fn new(network: Ipv4Addr, prefix: u8) -> Result<Self, ProviderError> {
        if !(8..=26).contains(&prefix) {
            return Err(ProviderError::Invalid(format!(
                "network prefix /{prefix} is not supported; use a prefix between /8 and /26"
            )));
        }
        let size: u32 = 1 << (32 - u32::from(prefix));
        let base = u32::from(network) & (u32::MAX << (32 - u32::from(prefix)));
        let dynamic = (size / 4).min(32);
        let broadcast = base + size - 1;
        Ok(Self {
            network: Ipv4Addr::from(base),
            prefix,
            gateway: Ipv4Addr::from(base + 1),
            first_reserved: Ipv4Addr::from(base + 10),
            last_reserved: Ipv4Addr::from(broadcast - dynamic - 1),
            dhcp_start: Ipv4Addr::from(broadcast - dynamic),
            dhcp_end: Ipv4Addr::from(broadcast - 1),
        })
    }

    /// Whether two networks overlap.
    pub(crate) fn overlaps(&self, other_net: Ipv4Addr, other_prefix: u8) -> bool {
        let p = self.prefix.min(other_prefix);
        let mask = if p == 0 {
            0
        } else {
            u32::MAX << (32 - u32::from(p))
        };
        (u32::from(self.network) & mask) == (u32::from(other_net) & mask)
    }

    /// The address for a new machine's reservation, given every `<host>` of the network as
    /// (address, name): the lowest address no reservation holds, tombstones of deleted machines
    /// ([`retired_host_name`]) included, so a new machine never gets the address a deleted one
    /// had while dnsmasq may still hold that one's lease (it would hand the new machine a
    /// dynamic address instead, and nothing would find it). Only when the range is full is the
    /// oldest tombstone's address taken back; the tombstone to drop is returned with it.
    pub(crate) fn choose(
        &self,
        hosts: &[(Ipv4Addr, String)],
    ) -> Option<(Ipv4Addr, Option<String>)> {
        let used: Vec<Ipv4Addr> = hosts.iter().map(|(ip, _)| *ip).collect();
        if let Some(ip) = self.first_free(&used) {
            return Some((ip, None));
        }
        hosts
            .iter()
            .filter_map(|(ip, name)| retired_at(name).map(|t| (t, *ip, name)))
            .filter(|(_, ip, _)| {
                (u32::from(self.first_reserved)..=u32::from(self.last_reserved))
                    .contains(&u32::from(*ip))
            })
            .min()
            .map(|(_, ip, name)| (ip, Some(name.clone())))
    }

    /// Lowest reserved-range address not in `used`.
    pub(crate) fn first_free(&self, used: &[Ipv4Addr]) -> Option<Ipv4Addr> {
        (u32::from(self.first_reserved)..=u32::from(self.last_reserved))
            .map(Ipv4Addr::from)
            .find(|ip| !used.contains(ip))
    }
}

/// Default network candidates: /24s in 10.213.0.0/16, starting at a slot derived from the
/// cluster ID so that clusters on one host usually land on different subnets at the first try.
pub(crate) fn default_network_candidates(cluster_id: &str) -> impl Iterator<Item = Ipv4Addr> {
    let digest = Sha256::digest(cluster_id.as_bytes());
    let start = u32::from(digest[0]);
    (0..256u32).map(move |i| Ipv4Addr::new(10, 213, ((start + i) % 256) as u8, 0))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_and_names_are_checked() {
        assert!(check_cluster_id("0f3c-aa_1").is_ok());
        assert!(check_cluster_id("").is_err());
        assert!(check_cluster_id("a/b").is_err());
        assert!(check_cluster_id("-a").is_err());
        assert!(check_machine_name("demo-cp-0").is_ok());
        assert!(check_machine_name("Demo").is_err());
        assert!(check_machine_name("a-").is_err());
    }

    #[test]
    fn bridge_names_fit_linux_limit() {
        assert!(bridge_name("a-very-long-cluster-id-0123456789abcdef").len() <= 15);
    }

    #[test]
    fn macs_are_deterministic_and_local() {
        let a = candidate_mac("c1", "m0", 0);
        assert_eq!(a, candidate_mac("c1", "m0", 0));
        assert_ne!(a, candidate_mac("c1", "m0", 1));
        assert_ne!(a, candidate_mac("c2", "m0", 0));
        assert!(a.starts_with("52:54:00:"));
        assert_eq!(a.len(), 17);
    }

    #[test]
    fn a_deleted_machines_address_is_not_handed_out_again_while_others_are_free() {
        let p = AddressPlan::new(Ipv4Addr::new(10, 0, 0, 0), 24).expect("plan");
        let ip = |n: u8| Ipv4Addr::new(10, 0, 0, n);
        let tomb = retired_host_name(1_000, "52:54:00:C0:51:31");
        assert_eq!(tomb, "retired-1000-525400c05131");
        assert_eq!(retired_at(&tomb), Some(1_000));
        assert_eq!(retired_at("c1-workers-bcdfg"), None);
        let hosts = vec![
            (ip(10), "c1-cp-0".to_owned()),
            (ip(11), "c1-w-bbbbb".to_owned()),
            (ip(12), tomb.clone()),
        ];
        assert_eq!(p.choose(&hosts), Some((ip(13), None)));
        // A full range gives back the oldest tombstone's address.
        let mut full: Vec<(Ipv4Addr, String)> = (10..=p.last_reserved.octets()[3])
            .map(|n| (ip(n), format!("m{n}")))
            .collect();
        full[5] = (ip(15), retired_host_name(2_000, "52:54:00:00:00:15"));
        full[7] = (ip(17), retired_host_name(1_500, "52:54:00:00:00:17"));
        assert_eq!(
            p.choose(&full),
            Some((ip(17), Some(retired_host_name(1_500, "52:54:00:00:00:17"))))
        );
        full[5].1 = "m15".into();
        full[7].1 = "m17".into();
        assert_eq!(p.choose(&full), None);
    }

    #[test]
    fn address_plan_for_slash_24() {
        let p = AddressPlan::new(Ipv4Addr::new(10, 213, 7, 99), 24).expect("valid plan");
        assert_eq!(p.network, Ipv4Addr::new(10, 213, 7, 0));
        assert_eq!(p.gateway, Ipv4Addr::new(10, 213, 7, 1));
        assert_eq!(p.first_reserved, Ipv4Addr::new(10, 213, 7, 10));
        assert_eq!(p.last_reserved, Ipv4Addr::new(10, 213, 7, 222));
        assert_eq!(p.dhcp_start, Ipv4Addr::new(10, 213, 7, 223));
        assert_eq!(p.dhcp_end, Ipv4Addr::new(10, 213, 7, 254));
        let used = [Ipv4Addr::new(10, 213, 7, 10), Ipv4Addr::new(10, 213, 7, 11)];
        assert_eq!(p.first_free(&used), Some(Ipv4Addr::new(10, 213, 7, 12)));
        assert!(p.overlaps(Ipv4Addr::new(10, 213, 0, 0), 16));
        assert!(!p.overlaps(Ipv4Addr::new(10, 213, 8, 0), 24));
        assert!(AddressPlan::new(Ipv4Addr::new(10, 0, 0, 0), 30).is_err());
    }

    #[test]
    fn image_tags_are_short_and_safe() {
        assert_eq!(image_tag("sha256:0123456789abcdef0123"), "0123456789abcdef");
        assert_eq!(image_volumes("abc").root, "image-abc-root");
    }
}
