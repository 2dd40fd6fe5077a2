//! Fast tests against libvirt's `test:///default` driver (in-process, no daemon). It keeps one
//! shared state per process, so every test uses its own cluster ID.

use std::collections::BTreeMap;

use super::*;
use crate::{ImageRef, MachineSize};

fn provider() -> LibvirtProvider {
    let mut config = LibvirtConfig::new("test:///default");
    config.accelerator = Accelerator::Tcg;
    config.cache_dir = None;
    LibvirtProvider::connect(config).expect("the test driver always connects")
}

fn cluster(id: &str) -> ClusterRef {
    ClusterRef {
        name: format!("demo-{id}"),
        id: id.into(),
    }
}

fn spec(name: &str, image_dir: &std::path::Path) -> MachineSpec {
    MachineSpec {
        name: name.into(),
        role: MachineRole::Worker,
        pool: Some("default".into()),
        size: MachineSize {
            cpus: 1,
            memory_mib: 512,
            disk_gib: 1,
        },
        image: ImageRef {
            version: "v1".into(),
            dir: image_dir.to_path_buf(),
            digest: "sha256:00aa".into(),
        },
        user_data: "#cloud-config\n".into(),
        labels: BTreeMap::new(),
        failure_domain: None,
    }
}

fn labelled_domain(p: &LibvirtProvider, c: &ClusterRef, name: &str, role: &str) -> Domain {
    let xml = DomainXml {
        uuid: None,
        name: name.into(),
        accel: DomainAccel::Tcg { tb_cache_mib: 128 },
        vcpus: 1,
        memory_mib: 256,
        kernel: "/boot/vmlinuz".into(),
        initrd: None,
        cmdline: "console=ttyS0".into(),
        disks: vec![],
        network: None,
        mac: None,
        console_log: None,
        on_reboot: "restart",
        label: p.label(
            c,
            vec![
                (ATTR_KIND.into(), "machine".into()),
                (ATTR_ROLE.into(), role.into()),
                (ATTR_IMAGE.into(), "sha256:00aa".into()),
            ],
        ),
    }
    .render();
    p.conn
        .define_domain_xml(&xml)
        .expect("the test driver accepts the rendered domain")
}

#[test]
fn unreachable_uri_is_a_clear_error() {
    let err = LibvirtProvider::connect(LibvirtConfig::new(
        "qemu:///system?socket=/nonexistent/clusterctl/libvirt-sock",
    ))
    .expect_err("no daemon there");
    let msg = err.to_string();
    assert!(matches!(err, ProviderError::Unreachable { .. }), "{msg}");
    assert!(
        msg.contains(
            "cannot connect to qemu:///system?socket=/nonexistent/clusterctl/libvirt-sock"
        ),
        "{msg}"
    );
    assert!(
        msg.contains("/nonexistent/clusterctl/libvirt-sock"),
        "{msg}"
    );
}

#[test]
fn name_clash_with_foreign_domain_leaves_it_untouched() {
    let p = provider();
    // The test driver ships a running domain called "test" that clusterctl did not create.
    let foreign = p
        .conn
        .lookup_domain_by_name("test")
        .expect("test driver domain");
    let before = foreign.xml_desc(0).expect("xml");
    let dir = tempfile::tempdir().expect("tempdir");
    let err = p
        .ensure_machine(&cluster("clash1"), &spec("test", dir.path()))
        .expect_err("clash");
    assert!(
        matches!(err, ProviderError::NameClash { kind: "domain", .. }),
        "{err}"
    );
    assert!(
        err.to_string()
            .contains("domain \"test\" already exists and was not created by this cluster"),
        "{err}"
    );
    assert_eq!(foreign.xml_desc(0).expect("xml"), before);
    assert!(foreign.is_active().expect("state"));
    // Deleting "our" machine of that name leaves the foreign domain alone too.
    p.delete_machine(&cluster("clash1"), "test")
        .expect("nothing of ours to delete");
    assert!(
        p.conn
            .lookup_domain_by_name("test")
            .expect("still there")
            .is_active()
            .expect("state")
    );
    // Nothing was created for the cluster.
    assert!(
        p.lookup_network("clusterctl-clash1")
            .expect("lookup")
            .is_none()
    );
}

#[test]
fn missing_image_is_a_clear_error_and_creates_nothing() {
    let p = provider();
    let c = cluster("noimage1");
    let err = p
        .ensure_machine(
            &c,
            &spec("noimage-0", std::path::Path::new("/nonexistent/image")),
        )
        .expect_err("no image");
    let msg = err.to_string();
    assert!(matches!(err, ProviderError::ImageMissing { .. }), "{msg}");
    assert!(msg.contains("/nonexistent/image/manifest.json"), "{msg}");
    assert!(msg.contains("clusterctl image build"), "{msg}");
    assert!(
        p.lookup_network("clusterctl-noimage1")
            .expect("lookup")
            .is_none()
    );
    assert!(
        p.lookup_pool("clusterctl-noimage1")
            .expect("lookup")
            .is_none()
    );
    assert!(p.lookup_domain("noimage-0").expect("lookup").is_none());
}

#[test]
fn invalid_names_are_refused() {
    let p = provider();
    let dir = tempfile::tempdir().expect("tempdir");
    let err = p
        .ensure_machine(&cluster("bad/id"), &spec("m", dir.path()))
        .expect_err("bad id");
    assert!(err.to_string().contains("cluster id"), "{err}");
    let err = p
        .ensure_machine(&cluster("ok1"), &spec("Bad_Name", dir.path()))
        .expect_err("bad name");
    assert!(err.to_string().contains("DNS-1123"), "{err}");
}

#[test]
fn list_finds_only_labelled_domains_and_existing_ones_are_not_redefined() {
    let p = provider();
    let c = cluster("list1");
    let other = cluster("list2");
    labelled_domain(&p, &c, "list1-cp-0", "control-plane");
    labelled_domain(&p, &c, "list1-w-0", "worker");
    labelled_domain(&p, &other, "list2-w-0", "worker");
    let machines = p.list_machines(&c).expect("list");
    let names: Vec<&str> = machines.iter().map(|m| m.name.as_str()).collect();
    assert_eq!(names, ["list1-cp-0", "list1-w-0"]);
    assert_eq!(machines[0].role, MachineRole::ControlPlane);
    assert_eq!(machines[0].state, MachineState::Stopped);
    assert_eq!(machines[0].image_digest.as_deref(), Some("sha256:00aa"));
    assert!(
        machines[0].provider_id.starts_with("libvirt://"),
        "{}",
        machines[0].provider_id
    );

    // Ensuring an existing machine starts it and changes nothing else (the image is not even read).
    let dom = p.conn.lookup_domain_by_name("list1-w-0").expect("defined");
    let before = dom
        .xml_desc(virt::sys::VIR_DOMAIN_XML_INACTIVE)
        .expect("xml");
    let m = p
        .ensure_machine(&c, &spec("list1-w-0", std::path::Path::new("/nonexistent")))
        .expect("ensure existing");
    assert_eq!(m.state, MachineState::Running);
    assert_eq!(
        dom.xml_desc(virt::sys::VIR_DOMAIN_XML_INACTIVE)
            .expect("xml"),
        before
    );
    let again = p
        .ensure_machine(&c, &spec("list1-w-0", std::path::Path::new("/nonexistent")))
        .expect("ensure again");
    assert_eq!(again, m);
    assert_eq!(p.list_machines(&c).expect("list").len(), 2);

    // Another cluster's machine is a name clash for this one.
    let err = p
        .ensure_machine(&c, &spec("list2-w-0", std::path::Path::new("/nonexistent")))
        .expect_err("clash");
    assert!(matches!(err, ProviderError::NameClash { .. }), "{err}");

    p.delete_machine(&c, "list1-w-0").expect("delete");
    p.delete_machine(&c, "list1-w-0")
        .expect("delete is idempotent");
    assert_eq!(p.list_machines(&c).expect("list").len(), 1);

    p.delete_cluster(&c).expect("delete cluster");
    assert!(p.list_machines(&c).expect("list").is_empty());
    assert_eq!(
        p.list_machines(&other).expect("list").len(),
        1,
        "the other cluster is untouched"
    );
    p.delete_cluster(&other).expect("delete other");
    p.delete_cluster(&other)
        .expect("delete_cluster is idempotent");
}

#[test]
fn network_is_created_isolated_with_reservations_and_deleted_by_label() {
    let p = provider();
    let c = cluster("net1");
    let (net, facts) = p.ensure_network(&c).expect("network");
    assert!(net.is_active().expect("active"));
    let (gw, prefix) = facts.ipv4.expect("ipv4");
    assert_eq!(prefix, 24);
    assert_eq!(gw.octets()[..2], [10, 213]);
    let xml = net.xml_desc(0).expect("xml");
    assert!(
        !xml.contains("<forward ") && !xml.contains("<forward>"),
        "isolated: {xml}"
    );

    let a = p.ensure_reservation(&c, &net, "net1-a").expect("reserve a");
    let b = p.ensure_reservation(&c, &net, "net1-b").expect("reserve b");
    assert_ne!(a.ip, b.ip);
    assert_ne!(a.mac, b.mac);
    assert_eq!(
        p.ensure_reservation(&c, &net, "net1-a").expect("again"),
        a,
        "reservations are stable"
    );
    // Ensuring the network again reuses it (same subnet, same reservations).
    let (_, again) = p.ensure_network(&c).expect("network again");
    assert_eq!(again.ipv4, facts.ipv4);
    assert_eq!(again.hosts.len(), 2);
    LibvirtProvider::remove_reservation(&net, "net1-a").expect("remove");
    // The deleted machine's address stays held by a tombstone (dnsmasq may still hold its
    // lease): the next machine gets another address.
    let hosts = LibvirtProvider::network_facts(&net).expect("facts").hosts;
    assert_eq!(hosts.len(), 2, "{hosts:?}");
    assert!(
        hosts
            .iter()
            .any(|h| h.ip == a.ip && h.mac == a.mac && names::retired_at(&h.name).is_some()),
        "{hosts:?}"
    );
    assert!(hosts.contains(&b), "{hosts:?}");
    let c2 = p.ensure_reservation(&c, &net, "net1-c").expect("reserve c");
    assert!(c2.ip != a.ip && c2.ip != b.ip, "{c2:?} reuses an address");

    // A second cluster gets a different subnet.
    let (_, f2) = p.ensure_network(&cluster("net2")).expect("network 2");
    assert_ne!(f2.ipv4, facts.ipv4);

    p.delete_cluster(&c).expect("delete");
    assert!(
        p.lookup_network("clusterctl-net1")
            .expect("lookup")
            .is_none()
    );
    assert!(
        p.lookup_network("clusterctl-net2")
            .expect("lookup")
            .is_some(),
        "other cluster untouched"
    );
    assert!(
        p.lookup_network("default").expect("lookup").is_some(),
        "foreign network untouched"
    );
    p.delete_cluster(&cluster("net2")).expect("delete 2");
}

#[test]
fn foreign_network_with_our_name_is_a_clash() {
    let p = provider();
    let xml = "<network><name>clusterctl-foreignnet</name><bridge name='virbr77'/><ip address='10.77.0.1' prefix='24'/></network>";
    let net = p.conn.define_network_xml(xml).expect("define foreign");
    let err = p.ensure_network(&cluster("foreignnet")).expect_err("clash");
    assert!(
        matches!(
            err,
            ProviderError::NameClash {
                kind: "network",
                ..
            }
        ),
        "{err}"
    );
    p.delete_cluster(&cluster("foreignnet"))
        .expect("delete finds nothing of ours");
    assert!(
        p.lookup_network("clusterctl-foreignnet")
            .expect("lookup")
            .is_some(),
        "foreign network untouched"
    );
    net.undefine().expect("cleanup");
}
