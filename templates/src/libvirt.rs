//! libvirt XML documents for the libvirt provider: domains, networks, storage pools and volumes,
//! plus the NoCloud `meta-data` and `network-config` files the provider puts on each machine's
//! seed disk.
//!
//! Every document is built from a typed input and every text value is XML-escaped, so a machine
//! name or label can never inject markup. The clusterctl label is a single namespaced element in
//! libvirt's `<metadata>` ([`ClusterLabel`]); the provider finds its resources again by parsing
//! exactly that element, never by name patterns alone.

use std::fmt::Write as _;

/// XML namespace of clusterctl's libvirt metadata element.
pub const METADATA_NAMESPACE: &str = "https://clusterctl.io/xmlns/v1";
/// Namespace prefix used for clusterctl's metadata element.
pub const METADATA_PREFIX: &str = "clusterctl";
/// Local name of clusterctl's metadata element.
pub const METADATA_ELEMENT: &str = "cluster";

/// Escapes text for use in XML character data and in single- or double-quoted attributes.
#[must_use]
pub fn xml_escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&apos;"),
            c => out.push(c),
        }
    }
    out
}

/// The label clusterctl attaches to a libvirt object: the cluster's ID and name plus
/// object-specific attributes (`role`, `pool`, `machine`, ...) and free-form labels.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ClusterLabel {
    /// The cluster's unique ID: the identity of everything clusterctl created for the cluster.
    pub cluster_id: String,
    /// The cluster's name (informational).
    pub cluster_name: String,
    /// Further attributes, rendered in order as XML attributes; names must be XML names
    /// (letters, digits, `-`), values are escaped.
    pub attributes: Vec<(String, String)>,
    /// Free-form labels (any key and value), rendered as `<clusterctl:label key= value=/>` children.
    pub labels: Vec<(String, String)>,
}

impl ClusterLabel {
    /// Renders the element as it goes inside `<metadata>` (namespace declared on the element).
    #[must_use]
    pub fn to_xml(&self) -> String {
        let mut s = format!(
            "<{METADATA_PREFIX}:{METADATA_ELEMENT} xmlns:{METADATA_PREFIX}=\"{METADATA_NAMESPACE}\" id=\"{}\" name=\"{}\"",
            xml_escape(&self.cluster_id),
            xml_escape(&self.cluster_name)
        );
        for (k, v) in &self.attributes {
            let _ = write!(s, " {}=\"{}\"", attribute_name(k), xml_escape(v));
        }
        if self.labels.is_empty() {
            s.push_str("/>");
        } else {
            s.push('>');
            for (k, v) in &self.labels {
                let _ = write!(
                    s,
                    "<{METADATA_PREFIX}:label key=\"{}\" value=\"{}\"/>",
                    xml_escape(k),
                    xml_escape(v)
                );
            }
            let _ = write!(s, "</{METADATA_PREFIX}:{METADATA_ELEMENT}>");
        }
        s
    }
}

/// Keeps attribute names to XML-name characters; anything else becomes `-`. Attribute names are
/// chosen by the provider, so this only guards against programming mistakes producing bad XML.
fn attribute_name(name: &str) -> String {
    let cleaned: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '-'
            }
        })
        .collect();
    if cleaned.starts_with(|c: char| c.is_ascii_alphabetic()) {
        cleaned
    } else {
        format!("a{cleaned}")
    }
}

/// How the guest CPU is run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DomainAccel {
    /// Hardware virtualization (`<domain type='kvm'>`, host CPU passed through).
    Kvm,
    /// QEMU's software emulator (`<domain type='qemu'>`) with the given translation-block cache
    /// size in MiB (smaller than QEMU's default to save host memory; 0 leaves QEMU's default).
    Tcg {
        /// TCG translation-block cache size in MiB.
        tb_cache_mib: u32,
    },
}

/// A disk attached to a domain, referenced by storage pool and volume name so that the same XML
/// works against a remote libvirt host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DomainDisk {
    /// Storage pool name.
    pub pool: String,
    /// Volume name inside the pool.
    pub volume: String,
    /// Image format of the volume: `qcow2` or `raw`.
    pub format: String,
    /// Guest device name: `vda`, `vdb`, ...
    pub target: String,
    /// Whether the guest sees the disk read-only.
    pub readonly: bool,
    /// Optional serial number the guest sees (`/dev/disk/by-id/virtio-SERIAL`).
    pub serial: Option<String>,
}

/// Input for a domain (virtual machine) definition with direct kernel boot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DomainXml {
    /// Domain name.
    pub name: String,
    /// Domain UUID; `None` lets libvirt choose one. Redefining an existing domain must repeat its
    /// UUID.
    pub uuid: Option<String>,
    /// Accelerator.
    pub accel: DomainAccel,
    /// Virtual CPUs.
    pub vcpus: u32,
    /// Memory in MiB.
    pub memory_mib: u64,
    /// Path of the kernel on the libvirt host.
    pub kernel: String,
    /// Path of the initrd on the libvirt host.
    pub initrd: Option<String>,
    /// Kernel command line.
    pub cmdline: String,
    /// Disks in attachment order.
    pub disks: Vec<DomainDisk>,
    /// libvirt network to attach the single NIC to; `None` for no NIC.
    pub network: Option<String>,
    /// MAC address of the NIC.
    pub mac: Option<String>,
    /// File on the libvirt host where the serial console is logged (by virtlogd); `None` for none.
    pub console_log: Option<String>,
    /// What happens when the guest reboots: `restart` (normal machines) or `destroy` (probes).
    pub on_reboot: &'static str,
    /// clusterctl's label.
    pub label: ClusterLabel,
}

impl DomainXml {
    /// Renders the domain XML.
    #[must_use]
    pub fn render(&self) -> String {
        let mut s = String::new();
        let kind = match self.accel {
            DomainAccel::Kvm => "kvm",
            DomainAccel::Tcg { .. } => "qemu",
        };
        let _ = writeln!(s, "<domain type='{kind}'>");
        let _ = writeln!(s, "  <name>{}</name>", xml_escape(&self.name));
        if let Some(uuid) = &self.uuid {
            let _ = writeln!(s, "  <uuid>{}</uuid>", xml_escape(uuid));
        }
        let _ = writeln!(s, "  <metadata>{}</metadata>", self.label.to_xml());
        let _ = writeln!(s, "  <memory unit='MiB'>{}</memory>", self.memory_mib);
        let _ = writeln!(s, "  <vcpu placement='static'>{}</vcpu>", self.vcpus);
        s.push_str("  <os>\n    <type arch='x86_64' machine='pc'>hvm</type>\n");
        let _ = writeln!(s, "    <kernel>{}</kernel>", xml_escape(&self.kernel));
        if let Some(initrd) = &self.initrd {
            let _ = writeln!(s, "    <initrd>{}</initrd>", xml_escape(initrd));
        }
        let _ = writeln!(s, "    <cmdline>{}</cmdline>", xml_escape(&self.cmdline));
        s.push_str("  </os>\n  <features>\n    <acpi/>\n    <apic/>\n");
        if let DomainAccel::Tcg { tb_cache_mib } = self.accel
            && tb_cache_mib > 0
        {
            let _ = writeln!(
                s,
                "    <tcg>\n      <tb-cache unit='MiB'>{tb_cache_mib}</tb-cache>\n    </tcg>"
            );
        }
        s.push_str("  </features>\n");
        match self.accel {
            DomainAccel::Kvm => s.push_str("  <cpu mode='host-passthrough' check='none'/>\n"),
            // `max` enables every feature TCG can emulate (x86-64-v2 and more), which modern
            // distribution userspace expects.
            DomainAccel::Tcg { .. } => s.push_str("  <cpu mode='maximum' check='none'/>\n"),
        }
        s.push_str("  <clock offset='utc'/>\n");
        s.push_str("  <on_poweroff>destroy</on_poweroff>\n");
        let _ = writeln!(s, "  <on_reboot>{}</on_reboot>", self.on_reboot);
        s.push_str("  <on_crash>destroy</on_crash>\n");
        s.push_str("  <devices>\n");
        for d in &self.disks {
            let _ = writeln!(s, "    <disk type='volume' device='disk'>");
            let _ = writeln!(
                s,
                "      <driver name='qemu' type='{}' discard='unmap'/>",
                xml_escape(&d.format)
            );
            let _ = writeln!(
                s,
                "      <source pool='{}' volume='{}'/>",
                xml_escape(&d.pool),
                xml_escape(&d.volume)
            );
            let _ = writeln!(
                s,
                "      <target dev='{}' bus='virtio'/>",
                xml_escape(&d.target)
            );
            if d.readonly {
                s.push_str("      <readonly/>\n");
            }
            if let Some(serial) = &d.serial {
                let _ = writeln!(s, "      <serial>{}</serial>", xml_escape(serial));
            }
            s.push_str("    </disk>\n");
        }
        if let Some(net) = &self.network {
            s.push_str("    <interface type='network'>\n");
            let _ = writeln!(s, "      <source network='{}'/>", xml_escape(net));
            if let Some(mac) = &self.mac {
                let _ = writeln!(s, "      <mac address='{}'/>", xml_escape(mac));
            }
            s.push_str("      <model type='virtio'/>\n    </interface>\n");
        }
        s.push_str("    <serial type='pty'>\n");
        if let Some(log) = &self.console_log {
            let _ = writeln!(s, "      <log file='{}' append='on'/>", xml_escape(log));
        }
        s.push_str("      <target port='0'/>\n    </serial>\n");
        s.push_str(
            "    <console type='pty'>\n      <target type='serial' port='0'/>\n    </console>\n",
        );
        s.push_str("    <rng model='virtio'>\n      <backend model='random'>/dev/urandom</backend>\n    </rng>\n");
        s.push_str("    <memballoon model='none'/>\n");
        s.push_str("  </devices>\n</domain>\n");
        s
    }
}

/// A DHCP reservation: the address a MAC gets from the network's DHCP server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DhcpHost {
    /// MAC address.
    pub mac: String,
    /// Host name handed out with the lease.
    pub name: String,
    /// IPv4 address.
    pub ip: std::net::Ipv4Addr,
}

impl DhcpHost {
    /// Renders the `<host/>` element, as used inside `<dhcp>` and by `virNetworkUpdate`.
    #[must_use]
    pub fn render(&self) -> String {
        format!(
            "<host mac='{}' name='{}' ip='{}'/>",
            xml_escape(&self.mac),
            xml_escape(&self.name),
            self.ip
        )
    }
}

/// Input for an isolated libvirt network (no `<forward>`: guests reach each other and the host
/// side of the bridge, nothing else) with a DHCP server and per-MAC reservations.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetworkXml {
    /// Network name.
    pub name: String,
    /// Bridge device name (at most 15 characters).
    pub bridge: String,
    /// Address of the host side of the bridge (the gateway).
    pub gateway: std::net::Ipv4Addr,
    /// Prefix length of the network.
    pub prefix: u8,
    /// First address of the dynamic DHCP range.
    pub dhcp_start: std::net::Ipv4Addr,
    /// Last address of the dynamic DHCP range.
    pub dhcp_end: std::net::Ipv4Addr,
    /// Reservations.
    pub hosts: Vec<DhcpHost>,
    /// clusterctl's label.
    pub label: ClusterLabel,
}

impl NetworkXml {
    /// Renders the network XML.
    #[must_use]
    pub fn render(&self) -> String {
        let mut s = String::from("<network>\n");
        let _ = writeln!(s, "  <name>{}</name>", xml_escape(&self.name));
        let _ = writeln!(s, "  <metadata>{}</metadata>", self.label.to_xml());
        let _ = writeln!(
            s,
            "  <bridge name='{}' stp='off' delay='0'/>",
            xml_escape(&self.bridge)
        );
        let _ = writeln!(
            s,
            "  <ip address='{}' prefix='{}'>",
            self.gateway, self.prefix
        );
        s.push_str("    <dhcp>\n");
        let _ = writeln!(
            s,
            "      <range start='{}' end='{}'/>",
            self.dhcp_start, self.dhcp_end
        );
        for h in &self.hosts {
            let _ = writeln!(s, "      {}", h.render());
        }
        s.push_str("    </dhcp>\n  </ip>\n</network>\n");
        s
    }
}

/// Input for a directory storage pool.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DirPoolXml {
    /// Pool name.
    pub name: String,
    /// Directory on the libvirt host.
    pub path: String,
}

impl DirPoolXml {
    /// Renders the pool XML.
    #[must_use]
    pub fn render(&self) -> String {
        format!(
            "<pool type='dir'>\n  <name>{}</name>\n  <target>\n    <path>{}</path>\n    <permissions>\n      <mode>0711</mode>\n    </permissions>\n  </target>\n</pool>\n",
            xml_escape(&self.name),
            xml_escape(&self.path)
        )
    }
}

/// Input for a storage volume.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VolumeXml {
    /// Volume name.
    pub name: String,
    /// Capacity in bytes.
    pub capacity_bytes: u64,
    /// Format: `qcow2` or `raw`.
    pub format: String,
    /// Copy-on-write backing volume: its path on the libvirt host and its format.
    pub backing: Option<(String, String)>,
}

impl VolumeXml {
    /// Renders the volume XML.
    #[must_use]
    pub fn render(&self) -> String {
        let mut s = String::from("<volume>\n");
        let _ = writeln!(s, "  <name>{}</name>", xml_escape(&self.name));
        let _ = writeln!(
            s,
            "  <capacity unit='bytes'>{}</capacity>",
            self.capacity_bytes
        );
        let _ = writeln!(
            s,
            "  <target>\n    <format type='{}'/>\n    <permissions>\n      <mode>0600</mode>\n    </permissions>\n  </target>",
            xml_escape(&self.format)
        );
        if let Some((path, format)) = &self.backing {
            let _ = writeln!(
                s,
                "  <backingStore>\n    <path>{}</path>\n    <format type='{}'/>\n  </backingStore>",
                xml_escape(path),
                xml_escape(format)
            );
        }
        s.push_str("</volume>\n");
        s
    }
}

/// NoCloud `meta-data` for one machine. Written as JSON, which is valid YAML, so both cloud-init
/// and the node image's first-boot agent (which reads JSON only) understand it.
#[must_use]
pub fn nocloud_meta_data(instance_id: &str, hostname: &str) -> String {
    format!(
        "{{\"instance-id\": {}, \"local-hostname\": {}}}\n",
        json_string(instance_id),
        json_string(hostname)
    )
}

/// NoCloud `network-config` (version 2, JSON): the NIC with this MAC takes its address by DHCP,
/// where the provider's reservation hands out a fixed address.
#[must_use]
pub fn nocloud_network_config(mac: &str) -> String {
    format!(
        "{{\"version\": 2, \"ethernets\": {{\"primary\": {{\"match\": {{\"macaddress\": {}}}, \"dhcp4\": true, \"dhcp-identifier\": \"mac\"}}}}}}\n",
        json_string(mac)
    )
}

/// A JSON string literal (also a valid double-quoted YAML scalar).
fn json_string(s: &str) -> String {
    let mut out = String::from("\"");
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            c if c.is_control() => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn label() -> ClusterLabel {
        ClusterLabel {
            cluster_id: "c0ffee".into(),
            cluster_name: "demo".into(),
            attributes: vec![
                ("machine".into(), "demo-cp-0".into()),
                ("role".into(), "control-plane".into()),
            ],
            labels: vec![("team".into(), "a&b<\"'>".into())],
        }
    }

    #[test]
    fn escape_covers_markup() {
        assert_eq!(xml_escape("a<b>&\"c'"), "a&lt;b&gt;&amp;&quot;c&apos;");
    }

    #[test]
    fn label_renders_namespace_and_escaped_labels() {
        insta::assert_snapshot!(label().to_xml(), @r#"<clusterctl:cluster xmlns:clusterctl="https://clusterctl.io/xmlns/v1" id="c0ffee" name="demo" machine="demo-cp-0" role="control-plane"><clusterctl:label key="team" value="a&amp;b&lt;&quot;&apos;&gt;"/></clusterctl:cluster>"#);
    }

    #[test]
    fn tcg_domain() {
        let d = DomainXml {
            uuid: None,
            name: "demo-cp-0".into(),
            accel: DomainAccel::Tcg { tb_cache_mib: 128 },
            vcpus: 2,
            memory_mib: 1024,
            kernel: "/var/lib/clusterctl/c0ffee/image-1-kernel".into(),
            initrd: Some("/var/lib/clusterctl/c0ffee/image-1-initrd".into()),
            cmdline: "root=/dev/mapper/root ro console=ttyS0 roothash=abc".into(),
            disks: vec![
                DomainDisk {
                    pool: "clusterctl-c0ffee".into(),
                    volume: "demo-cp-0-root.qcow2".into(),
                    format: "qcow2".into(),
                    target: "vda".into(),
                    readonly: true,
                    serial: None,
                },
                DomainDisk {
                    pool: "clusterctl-c0ffee".into(),
                    volume: "demo-cp-0-data.qcow2".into(),
                    format: "qcow2".into(),
                    target: "vdb".into(),
                    readonly: false,
                    serial: Some("data".into()),
                },
            ],
            network: Some("clusterctl-c0ffee".into()),
            mac: Some("52:54:00:12:34:56".into()),
            console_log: Some("/var/log/libvirt/qemu/demo-cp-0-console.log".into()),
            on_reboot: "restart",
            label: label(),
        };
        insta::assert_snapshot!(d.render());
    }

    #[test]
    fn kvm_domain_has_no_tcg_features() {
        let d = DomainXml {
            uuid: None,
            name: "probe".into(),
            accel: DomainAccel::Kvm,
            vcpus: 1,
            memory_mib: 256,
            kernel: "/k".into(),
            initrd: None,
            cmdline: "console=ttyS0".into(),
            disks: vec![],
            network: None,
            mac: None,
            console_log: None,
            on_reboot: "destroy",
            label: label(),
        };
        let xml = d.render();
        assert!(xml.starts_with("<domain type='kvm'>"));
        assert!(!xml.contains("<tcg>"));
        assert!(!xml.contains("<interface"));
        assert!(xml.contains("<on_reboot>destroy</on_reboot>"));
        assert!(xml.contains("host-passthrough"));
    }

    #[test]
    fn isolated_network() {
        let n = NetworkXml {
            name: "clusterctl-c0ffee".into(),
            bridge: "ccbr1a2b3c4d".into(),
            gateway: "10.213.7.1"
                .parse()
                .unwrap_or(std::net::Ipv4Addr::LOCALHOST),
            prefix: 24,
            dhcp_start: "10.213.7.200"
                .parse()
                .unwrap_or(std::net::Ipv4Addr::LOCALHOST),
            dhcp_end: "10.213.7.254"
                .parse()
                .unwrap_or(std::net::Ipv4Addr::LOCALHOST),
            hosts: vec![DhcpHost {
                mac: "52:54:00:12:34:56".into(),
                name: "demo-cp-0".into(),
                ip: "10.213.7.10"
                    .parse()
                    .unwrap_or(std::net::Ipv4Addr::LOCALHOST),
            }],
            label: label(),
        };
        let xml = n.render();
        assert!(
            !xml.contains("<forward"),
            "an isolated network has no forward element"
        );
        insta::assert_snapshot!(xml);
    }

    #[test]
    fn pool_and_volumes() {
        insta::assert_snapshot!(
            DirPoolXml {
                name: "clusterctl-c0ffee".into(),
                path: "/var/lib/clusterctl/c0ffee".into()
            }
            .render()
        );
        insta::assert_snapshot!(
            VolumeXml {
                name: "demo-cp-0-root.qcow2".into(),
                capacity_bytes: 2 << 30,
                format: "qcow2".into(),
                backing: Some((
                    "/var/lib/clusterctl/c0ffee/image-1-root".into(),
                    "raw".into()
                )),
            }
            .render()
        );
    }

    #[test]
    fn nocloud_files_quote_values() {
        assert_eq!(
            nocloud_meta_data("id-1", "demo\"x"),
            "{\"instance-id\": \"id-1\", \"local-hostname\": \"demo\\\"x\"}\n"
        );
        insta::assert_snapshot!(nocloud_network_config("52:54:00:00:00:01"), @r#"{"version": 2, "ethernets": {"primary": {"match": {"macaddress": "52:54:00:00:00:01"}, "dhcp4": true, "dhcp-identifier": "mac"}}}"#);
    }
}
