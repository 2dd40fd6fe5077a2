//! Reading back what libvirt reports: the clusterctl label, NIC MACs, DHCP reservations and the
//! network's address. Only the namespaced clusterctl element counts as a label; a domain whose
//! XML merely looks similar is not ours.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;

use templates::libvirt::{DhcpHost, METADATA_ELEMENT, METADATA_NAMESPACE};

/// The clusterctl label as read back from a libvirt object.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub(crate) struct Label {
    pub cluster_id: String,
    pub cluster_name: String,
    pub attributes: BTreeMap<String, String>,
    pub labels: BTreeMap<String, String>,
}

impl Label {
    pub(crate) fn attr(&self, key: &str) -> Option<&str> {
        self.attributes.get(key).map(String::as_str)
    }
}

/// Parses XML, mapping parse failures to a short description.
fn parse(xml: &str) -> Result<roxmltree::Document<'_>, String> {
    roxmltree::Document::parse(xml).map_err(|e| format!("libvirt returned unparsable XML: {e}"))
}

/// Finds clusterctl's label inside the top-level `<metadata>` of a domain or network document.
fn label_of(doc: &roxmltree::Document<'_>) -> Option<Label> {
    let metadata = doc
        .root_element()
        .children()
        .find(|n| n.has_tag_name("metadata"))?;
    let el = metadata.children().find(|n| {
        n.is_element()
            && n.tag_name().namespace() == Some(METADATA_NAMESPACE)
            && n.tag_name().name() == METADATA_ELEMENT
    })?;
    let mut label = Label::default();
    for a in el.attributes() {
        match a.name() {
            "id" => label.cluster_id = a.value().to_string(),
            "name" => label.cluster_name = a.value().to_string(),
            other => {
                label
                    .attributes
                    .insert(other.to_string(), a.value().to_string());
            }
        }
    }
    for l in el
        .children()
        .filter(|n| n.is_element() && n.tag_name().name() == "label")
    {
        if let (Some(k), Some(v)) = (l.attribute("key"), l.attribute("value")) {
            label.labels.insert(k.to_string(), v.to_string());
        }
    }
    if label.cluster_id.is_empty() {
        None
    } else {
        Some(label)
    }
}

/// What the provider needs from a domain's XML.
#[derive(Debug, Clone, Default)]
pub(crate) struct DomainFacts {
    pub label: Option<Label>,
    pub macs: Vec<String>,
    /// (pool, volume) of every volume-backed disk.
    pub volumes: Vec<(String, String)>,
    /// `<vcpu>`: the virtual CPUs.
    pub vcpus: Option<u32>,
    /// `<memory>` in KiB.
    pub memory_kib: Option<u64>,
}

/// KiB in one of libvirt's memory units (`b`, `KiB`, `MiB`, `GiB`, ... and their SI forms).
fn to_kib(value: u64, unit: &str) -> Option<u64> {
    let bytes: u128 = match unit {
        "b" | "bytes" => 1,
        "KB" => 1000,
        "k" | "KiB" => 1 << 10,
        "MB" => 1_000_000,
        "M" | "MiB" => 1 << 20,
        "GB" => 1_000_000_000,
        "G" | "GiB" => 1 << 30,
        "TB" => 1_000_000_000_000,
        "T" | "TiB" => 1 << 40,
        _ => return None,
    };
    u64::try_from(u128::from(value) * bytes / 1024).ok()
}

pub(crate) fn domain_facts(xml: &str) -> Result<DomainFacts, String> {
    let doc = parse(xml)?;
    let mut facts = DomainFacts {
        label: label_of(&doc),
        ..DomainFacts::default()
    };
    let root = doc.root_element();
    let child = |tag: &str| root.children().find(|n| n.has_tag_name(tag));
    facts.vcpus = child("vcpu")
        .and_then(|n| n.text())
        .and_then(|t| t.trim().parse().ok());
    facts.memory_kib = child("memory").and_then(|n| {
        let value = n.text()?.trim().parse().ok()?;
        to_kib(value, n.attribute("unit").unwrap_or("KiB"))
    });
    if let Some(devices) = doc
        .root_element()
        .children()
        .find(|n| n.has_tag_name("devices"))
    {
        for dev in devices.children().filter(roxmltree::Node::is_element) {
            match dev.tag_name().name() {
                "interface" => {
                    if let Some(mac) = dev
                        .children()
                        .find(|n| n.has_tag_name("mac"))
                        .and_then(|m| m.attribute("address"))
                    {
                        facts.macs.push(mac.to_ascii_lowercase());
                    }
                }
                "disk" => {
                    if let Some(src) = dev.children().find(|n| n.has_tag_name("source"))
                        && let (Some(p), Some(v)) = (src.attribute("pool"), src.attribute("volume"))
                    {
                        facts.volumes.push((p.to_string(), v.to_string()));
                    }
                }
                _ => {}
            }
        }
    }
    Ok(facts)
}

/// What the provider needs from a network's XML.
#[derive(Debug, Clone, Default)]
pub(crate) struct NetworkFacts {
    pub label: Option<Label>,
    /// IPv4 address of the host side and prefix length, if the network has one.
    pub ipv4: Option<(Ipv4Addr, u8)>,
    pub hosts: Vec<DhcpHost>,
}

pub(crate) fn network_facts(xml: &str) -> Result<NetworkFacts, String> {
    let doc = parse(xml)?;
    let mut facts = NetworkFacts {
        label: label_of(&doc),
        ..NetworkFacts::default()
    };
    for ip in doc
        .root_element()
        .children()
        .filter(|n| n.has_tag_name("ip"))
    {
        if ip.attribute("family").is_some_and(|f| f != "ipv4") {
            continue;
        }
        let Some(addr) = ip
            .attribute("address")
            .and_then(|a| a.parse::<Ipv4Addr>().ok())
        else {
            continue;
        };
        let prefix = ip
            .attribute("prefix")
            .and_then(|p| p.parse::<u8>().ok())
            .or_else(|| {
                ip.attribute("netmask")
                    .and_then(|m| m.parse::<Ipv4Addr>().ok())
                    .map(|m| u32::from(m).count_ones() as u8)
            })
            .unwrap_or(24);
        facts.ipv4 = Some((addr, prefix));
        if let Some(dhcp) = ip.children().find(|n| n.has_tag_name("dhcp")) {
            for h in dhcp.children().filter(|n| n.has_tag_name("host")) {
                if let (Some(mac), Some(ipv4)) = (
                    h.attribute("mac"),
                    h.attribute("ip").and_then(|i| i.parse().ok()),
                ) {
                    facts.hosts.push(DhcpHost {
                        mac: mac.to_ascii_lowercase(),
                        name: h.attribute("name").unwrap_or_default().to_string(),
                        ip: ipv4,
                    });
                }
            }
        }
        break;
    }
    Ok(facts)
}

/// Path of a volume as reported in its XML (`<target><path>`).
#[cfg(test)]
pub(crate) fn volume_path(xml: &str) -> Option<String> {
    let doc = parse(xml).ok()?;
    let target = doc
        .root_element()
        .children()
        .find(|n| n.has_tag_name("target"))?;
    target
        .children()
        .find(|n| n.has_tag_name("path"))?
        .text()
        .map(str::to_string)
}

#[cfg(test)]
mod tests {
    use super::*;
    use templates::libvirt::{ClusterLabel, DomainAccel, DomainDisk, DomainXml, NetworkXml};

    fn label() -> ClusterLabel {
        ClusterLabel {
            cluster_id: "c1".into(),
            cluster_name: "demo".into(),
            attributes: vec![
                ("role".into(), "worker".into()),
                ("pool".into(), "default".into()),
            ],
            labels: vec![("k".into(), "v&w".into())],
        }
    }

    #[test]
    fn domain_round_trip() {
        let xml = DomainXml {
            uuid: None,
            name: "m".into(),
            accel: DomainAccel::Tcg { tb_cache_mib: 128 },
            vcpus: 1,
            memory_mib: 512,
            kernel: "/k".into(),
            initrd: None,
            cmdline: "x".into(),
            disks: vec![DomainDisk {
                pool: "p".into(),
                volume: "v".into(),
                format: "qcow2".into(),
                target: "vda".into(),
                readonly: false,
                serial: None,
            }],
            network: Some("n".into()),
            mac: Some("52:54:00:AA:bb:cc".into()),
            console_log: None,
            on_reboot: "restart",
            label: label(),
        }
        .render();
        let f = domain_facts(&xml).expect("parses");
        let l = f.label.expect("label");
        assert_eq!(l.cluster_id, "c1");
        assert_eq!(l.cluster_name, "demo");
        assert_eq!(l.attr("role"), Some("worker"));
        assert_eq!(l.labels.get("k").map(String::as_str), Some("v&w"));
        assert_eq!(f.macs, vec!["52:54:00:aa:bb:cc".to_string()]);
        assert_eq!(f.volumes, vec![("p".to_string(), "v".to_string())]);
        assert_eq!((f.vcpus, f.memory_kib), (Some(1), Some(512 * 1024)));
    }

    #[test]
    fn memory_is_read_in_libvirts_units() {
        // libvirtd writes `<memory unit='KiB'>` back whatever unit it was defined with.
        let read = |m: &str| {
            let xml =
                format!("<domain><name>m</name><vcpu placement='static'>3</vcpu>{m}</domain>");
            let f = domain_facts(&xml).expect("parses");
            (f.vcpus, f.memory_kib)
        };
        assert_eq!(
            read("<memory unit='KiB'>2097152</memory>"),
            (Some(3), Some(2_097_152))
        );
        assert_eq!(read("<memory>1024</memory>"), (Some(3), Some(1024)));
        assert_eq!(
            read("<memory unit='GiB'>2</memory>"),
            (Some(3), Some(2_097_152))
        );
        assert_eq!(read("<memory unit='MB'>1</memory>"), (Some(3), Some(976)));
        assert_eq!(read("<memory unit='parsecs'>1</memory>"), (Some(3), None));
        assert_eq!(read("<memory unit='KiB'>lots</memory>"), (Some(3), None));
    }

    #[test]
    fn foreign_metadata_is_not_a_label() {
        let xml = "<domain><name>x</name><metadata><c:cluster xmlns:c='https://example.com/other' id='c1'/></metadata></domain>";
        assert!(domain_facts(xml).expect("parses").label.is_none());
        let xml = "<domain><name>x</name><cluster id='c1'/></domain>";
        assert!(domain_facts(xml).expect("parses").label.is_none());
        assert!(domain_facts("<domain").is_err());
    }

    #[test]
    fn network_round_trip() {
        let xml = NetworkXml {
            name: "n".into(),
            bridge: "b".into(),
            gateway: Ipv4Addr::new(10, 0, 0, 1),
            prefix: 24,
            dhcp_start: Ipv4Addr::new(10, 0, 0, 200),
            dhcp_end: Ipv4Addr::new(10, 0, 0, 254),
            hosts: vec![DhcpHost {
                mac: "52:54:00:00:00:01".into(),
                name: "m".into(),
                ip: Ipv4Addr::new(10, 0, 0, 10),
            }],
            label: label(),
        }
        .render();
        let f = network_facts(&xml).expect("parses");
        assert_eq!(f.label.map(|l| l.cluster_id), Some("c1".into()));
        assert_eq!(f.ipv4, Some((Ipv4Addr::new(10, 0, 0, 1), 24)));
        assert_eq!(f.hosts.len(), 1);
        assert_eq!(f.hosts[0].ip, Ipv4Addr::new(10, 0, 0, 10));
    }

    #[test]
    fn volume_path_is_read() {
        assert_eq!(
            volume_path("<volume><target><path>/a/b</path></target></volume>"),
            Some("/a/b".into())
        );
    }
}
