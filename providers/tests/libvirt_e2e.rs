//! End-to-end tests of the libvirt provider against a real libvirtd and real QEMU guests.
//!
//! Selected by `CLUSTERCTL_LIBVIRT_E2E=1`, which `tests/bed/libvirt-env.sh test` sets after it has
//! started libvirtd inside a network namespace and built (or found) the node image. Everything
//! here runs inside that namespace.
//!
//! What these tests prove is the provider's contract with libvirt, not the node image: no test
//! here logs in to a guest. Booting the real image, SSH with pinned host keys, a reboot, a killed
//! and resumed `create`, the exact libvirt inventory of a cluster and its deletion are proven
//! once, by the cluster e2e (`tests/bed/cli-e2e.sh`); the image's own properties (read-only
//! verified root, data disk kept across boots) by `nodeimage/tests/boot.rs`. Machines here boot
//! a "halt image" made on the fly: a 45-byte multiboot kernel that prints `B` on the serial
//! console (so a test counts boots in the console log) and halts its CPU, so a domain reaches
//! libvirt's "running" state at no CPU cost and the upload is a few MiB instead of the real
//! image's ~175 MiB per cluster. The conformance suite looks at data disks with `qemu-io`.
//!
//! Every libvirt call a test makes runs under a watchdog, and libvirtd is asked with a bounded
//! `virsh`: a wedged libvirtd fails the test with a message saying so instead of hanging it.
//!
//! Environment:
//! - `CLUSTERCTL_LIBVIRT_URI` (default `qemu:///system`)
//! - `CLUSTERCTL_TEST_IMAGE`: node image directory (with `manifest.json`); only its kernel and
//!   initrd are used, by the KVM probe test (the probe needs a kernel that prints)
//! - `CLUSTERCTL_E2E_STORAGE_ROOT` (default `/var/lib/libvirt/images/clusterctl-e2e`)
//! - `CLUSTERCTL_E2E_KILL_REPEAT` (default 1): how many times the kill test goes through its
//!   kill points
//! - `CLUSTERCTL_E2E_KILL_ROOT_MIB` (default 64): size of the kill test's image root, i.e. how
//!   long its upload stream is open

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use providers::libvirt::{Accelerator, LibvirtConfig, LibvirtProvider};
use providers::{
    ClusterRef, ImageRef, MachineRole, MachineSize, MachineSpec, MachineState, Provider,
    ProviderError,
};
use sha2::{Digest, Sha256};

const NS: &str = "https://clusterctl.io/xmlns/v1";
/// Longest any single provider or libvirt call of these tests may take before libvirtd counts as
/// wedged. The slowest legitimate call is an ensure that waits for a domain whose start was
/// interrupted to reappear (up to 60 s) on a loaded 2-core host.
const CALL_LIMIT: Duration = Duration::from_secs(300);
/// How long `virsh list` may take to answer.
const VIRSH_LIMIT: Duration = Duration::from_secs(30);

fn enabled() -> bool {
    std::env::var("CLUSTERCTL_LIBVIRT_E2E").is_ok_and(|v| v == "1")
}

fn uri() -> String {
    std::env::var("CLUSTERCTL_LIBVIRT_URI").unwrap_or_else(|_| "qemu:///system".into())
}

fn storage_root() -> String {
    std::env::var("CLUSTERCTL_E2E_STORAGE_ROOT")
        .unwrap_or_else(|_| "/var/lib/libvirt/images/clusterctl-e2e".into())
}

/// Runs `virsh ARGS` against the bed's libvirtd, killed after [`VIRSH_LIMIT`].
fn virsh(args: &[&str]) -> Result<String, String> {
    let start = Instant::now();
    let out = Command::new("timeout")
        .args([
            "-k",
            "5",
            &VIRSH_LIMIT.as_secs().to_string(),
            "virsh",
            "-q",
            "-c",
        ])
        .arg(uri())
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("cannot run virsh: {e}"))?;
    match out.status.code() {
        Some(0) => Ok(String::from_utf8_lossy(&out.stdout).trim().to_string()),
        Some(124 | 137) => Err(format!(
            "`virsh {}` did not answer within {VIRSH_LIMIT:?}: libvirtd is wedged",
            args.join(" ")
        )),
        _ => Err(format!(
            "`virsh {}` failed after {:.1}s: {}",
            args.join(" "),
            start.elapsed().as_secs_f64(),
            String::from_utf8_lossy(&out.stderr).trim()
        )),
    }
}

/// Ends the test process if `what` has not returned within `limit`: a libvirt call blocked on a
/// wedged daemon cannot be cancelled, and a clear failure beats a CI job that hangs.
struct Watchdog {
    _cancel: mpsc::Sender<()>,
}

impl Watchdog {
    fn new(what: &str, limit: Duration) -> Self {
        let (cancel, wait) = mpsc::channel::<()>();
        let what = what.to_string();
        std::thread::spawn(move || {
            if let Err(mpsc::RecvTimeoutError::Timeout) = wait.recv_timeout(limit) {
                let state = virsh(&["list", "--all"]).unwrap_or_else(|e| e);
                eprintln!(
                    "FAIL: {what} did not return within {limit:?}: libvirtd looks wedged; \
                     `virsh list --all` says: {state}"
                );
                std::process::exit(3);
            }
        });
        Self { _cancel: cancel }
    }
}

/// Runs `f` under a [`Watchdog`] of [`CALL_LIMIT`].
fn bounded<T>(what: &str, f: impl FnOnce() -> T) -> T {
    let _w = Watchdog::new(what, CALL_LIMIT);
    f()
}

/// The node image of the bed (only its kernel and initrd are used).
fn real_image_dir() -> PathBuf {
    PathBuf::from(
        std::env::var("CLUSTERCTL_TEST_IMAGE")
            .expect("CLUSTERCTL_TEST_IMAGE must name the node image directory"),
    )
}

/// Writes `manifest` into `dir` and returns the image reference the provider gets for it.
fn image_ref(dir: &Path, manifest: &serde_json::Value) -> ImageRef {
    let bytes = serde_json::to_vec_pretty(manifest).expect("json");
    std::fs::write(dir.join("manifest.json"), &bytes).expect("write manifest");
    let digest = Sha256::digest(&bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect::<String>();
    ImageRef {
        version: manifest["version"].as_str().unwrap_or("test").to_string(),
        dir: dir.to_path_buf(),
        digest: format!("sha256:{digest}"),
    }
}

/// A multiboot kernel (QEMU loads it like a Linux one from `<kernel>`) whose code writes `B\n` to
/// the first serial port, then `cli; hlt; jmp hlt`: the guest announces each boot and stops, and
/// QEMU stays up, idle.
fn halt_kernel() -> Vec<u8> {
    const MAGIC: u32 = 0x1BAD_B002;
    // Bit 16: the load addresses below are valid (no ELF needed).
    const FLAGS: u32 = 0x0001_0000;
    const LOAD: u32 = 0x0010_0000;
    let mut k = Vec::new();
    for word in [
        MAGIC,
        FLAGS,
        0u32.wrapping_sub(MAGIC.wrapping_add(FLAGS)),
        LOAD,      // header_addr: the header is the first byte loaded
        LOAD,      // load_addr
        0,         // load_end_addr: the whole file
        0,         // bss_end_addr: no bss
        LOAD + 32, // entry_addr: right after this header
    ] {
        k.extend_from_slice(&word.to_le_bytes());
    }
    k.extend_from_slice(&[
        0x66, 0xBA, 0xF8, 0x03, // mov dx, 0x3f8 (COM1)
        0xB0, b'B', 0xEE, // mov al, 'B'; out dx, al
        0xB0, b'\n', 0xEE, // mov al, '\n'; out dx, al
        0xFA, 0xF4, 0xEB, 0xFD, // cli; hlt; jmp hlt
    ]);
    k
}

/// A halt image: the halt kernel, a 512-byte initrd and a raw root of `root_mib` MiB of zeros
/// (only ever read as the overlays' backing file). Its digest is unique to this test process, so
/// every cluster uploads it afresh.
fn halt_image(root_mib: u64) -> (tempfile::TempDir, ImageRef) {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(dir.path().join("halt.bin"), halt_kernel()).expect("write kernel");
    std::fs::write(dir.path().join("initrd.img"), [0u8; 512]).expect("write initrd");
    std::fs::File::create(dir.path().join("root.raw"))
        .and_then(|f| f.set_len(root_mib << 20))
        .expect("write root");
    let image = image_ref(
        dir.path(),
        &serde_json::json!({
            "version": format!("halt-{}-{root_mib}m", std::process::id()),
            "kernel": "halt.bin",
            "initrd": "initrd.img",
            "root": { "file": "root.raw", "format": "raw" },
            "cmdline": "console=ttyS0",
        }),
    );
    (dir, image)
}

fn provider() -> LibvirtProvider {
    let mut config = LibvirtConfig::new(uri());
    config.storage_root = storage_root();
    config.accelerator = Accelerator::Tcg;
    bounded("connecting to libvirtd", || {
        LibvirtProvider::connect(config)
    })
    .expect("libvirtd of the test bed is reachable")
}

fn unique_id(tag: &str) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    format!("e2e{tag}{:x}{:x}", std::process::id(), nanos)
}

/// Deletes the cluster's resources when dropped, also when a test panics.
struct ClusterGuard<'a> {
    provider: &'a LibvirtProvider,
    cluster: ClusterRef,
}

impl Drop for ClusterGuard<'_> {
    fn drop(&mut self) {
        if let Err(e) = bounded("deleting the cluster", || {
            self.provider.delete_cluster(&self.cluster)
        }) {
            eprintln!("cleanup of cluster {} failed: {e}", self.cluster.id);
        }
    }
}

/// A machine of the test size. The guests never read their user data.
fn spec(name: &str, role: MachineRole, image: &ImageRef) -> MachineSpec {
    MachineSpec {
        name: name.into(),
        role,
        pool: (role == MachineRole::Worker).then(|| "default".to_string()),
        size: MachineSize {
            cpus: 1,
            memory_mib: 128,
            disk_gib: 1,
        },
        image: image.clone(),
        user_data: "#cloud-config\n{}\n".into(),
        labels: BTreeMap::from([("clusterctl.io/test".to_string(), "e2e".to_string())]),
        failure_domain: None,
    }
}

/// Direct libvirt view, to count what carries the cluster's label independently of the provider.
#[derive(Debug)]
struct Inventory {
    domains: Vec<String>,
    networks: Vec<String>,
    pools: Vec<String>,
    volumes: Vec<String>,
}

impl Inventory {
    fn is_empty(&self) -> bool {
        self.domains.is_empty()
            && self.networks.is_empty()
            && self.pools.is_empty()
            && self.volumes.is_empty()
    }
}

fn inventory(cluster_id: &str) -> Inventory {
    bounded("reading the libvirt inventory", || {
        inventory_unbounded(cluster_id)
    })
}

fn inventory_unbounded(cluster_id: &str) -> Inventory {
    let conn = virt::connect::Connect::open(Some(&uri())).expect("connect");
    let label = format!("id=\"{cluster_id}\"");
    let mut domains: Vec<String> = conn
        .list_all_domains(0)
        .expect("domains")
        .into_iter()
        .filter(|d| {
            d.metadata(virt::sys::VIR_DOMAIN_METADATA_ELEMENT as i32, Some(NS), 0)
                .is_ok_and(|m| m.contains(&label))
        })
        .filter_map(|d| d.name().ok())
        .collect();
    domains.sort();
    let networks = conn
        .list_all_networks(0)
        .expect("networks")
        .into_iter()
        .filter(|n| {
            n.xml_desc(0)
                .is_ok_and(|x| x.contains(NS) && x.contains(&label))
        })
        .filter_map(|n| n.name().ok())
        .collect();
    let mut pools = Vec::new();
    let mut volumes = Vec::new();
    for p in conn.list_all_storage_pools(0).expect("pools") {
        let name = p.name().unwrap_or_default();
        if !name.contains(cluster_id) {
            continue;
        }
        if p.is_active().unwrap_or(false) {
            let _ = p.refresh(0);
            volumes.extend(p.list_volumes().unwrap_or_default());
        }
        pools.push(name);
    }
    volumes.sort();
    Inventory {
        domains,
        networks,
        pools,
        volumes,
    }
}

#[test]
fn bad_input_gives_clear_errors() {
    if !enabled() {
        eprintln!("skipped: set CLUSTERCTL_LIBVIRT_E2E=1 (tests/bed/libvirt-env.sh test does)");
        return;
    }
    // Unreachable URIs: a socket that does not exist, and a TCP port on loopback nobody listens on.
    for bad in [
        "qemu:///system?socket=/nonexistent/libvirt-sock",
        "qemu+tcp://127.0.0.1:1/system",
    ] {
        let err = LibvirtProvider::connect(LibvirtConfig::new(bad)).expect_err("unreachable");
        let msg = err.to_string();
        assert!(matches!(err, ProviderError::Unreachable { .. }), "{msg}");
        assert!(
            msg.contains(&format!("cannot connect to {bad}"))
                && msg.contains("check that the service is running"),
            "{msg}"
        );
    }

    let p = provider();
    let (_dir, image) = halt_image(1);
    let cluster = ClusterRef {
        name: "bad".into(),
        id: unique_id("bad"),
    };
    let _guard = ClusterGuard {
        provider: &p,
        cluster: cluster.clone(),
    };

    // A missing image.
    let mut missing = spec("e2e-missing-0", MachineRole::Worker, &image);
    missing.image.dir = PathBuf::from("/nonexistent/clusterctl-image");
    let err = bounded("ensure with a missing image", || {
        p.ensure_machine(&cluster, &missing)
    })
    .expect_err("missing image");
    assert!(matches!(err, ProviderError::ImageMissing { .. }), "{err}");
    assert!(
        err.to_string()
            .contains("/nonexistent/clusterctl-image/manifest.json"),
        "{err}"
    );

    // A domain clusterctl did not create.
    let conn = virt::connect::Connect::open(Some(&uri())).expect("connect");
    let foreign_name = format!("e2e-foreign-{}", std::process::id());
    let foreign = conn
        .define_domain_xml(&format!(
            "<domain type='qemu'><name>{foreign_name}</name><memory unit='MiB'>64</memory><os><type arch='x86_64'>hvm</type></os></domain>"
        ))
        .expect("define foreign domain");
    let before = foreign
        .xml_desc(virt::sys::VIR_DOMAIN_XML_INACTIVE)
        .expect("xml");
    let err = p
        .ensure_machine(&cluster, &spec(&foreign_name, MachineRole::Worker, &image))
        .expect_err("clash");
    assert!(
        matches!(err, ProviderError::NameClash { kind: "domain", .. }),
        "{err}"
    );
    assert!(
        err.to_string().contains("was not created by this cluster"),
        "{err}"
    );
    p.delete_machine(&cluster, &foreign_name)
        .expect("nothing of ours to delete");
    p.delete_cluster(&cluster).expect("delete cluster");
    let after = conn
        .lookup_domain_by_name(&foreign_name)
        .expect("foreign domain still defined");
    assert_eq!(
        after
            .xml_desc(virt::sys::VIR_DOMAIN_XML_INACTIVE)
            .expect("xml"),
        before,
        "foreign domain untouched"
    );
    after.undefine().expect("remove the foreign domain");
    let inv = inventory(&cluster.id);
    assert!(
        inv.domains.is_empty() && inv.networks.is_empty() && inv.pools.is_empty(),
        "nothing left"
    );
}

/// What the cluster e2e does not exercise: accelerator `auto` (the cluster e2e asks for `tcg`),
/// a machine stopped behind the provider's back and started again by `ensure`, and the removal
/// of one machine (domain, its three volumes, its address reservation) from a cluster that stays.
#[test]
fn auto_accelerator_stopped_machine_and_single_delete() {
    if !enabled() {
        eprintln!("skipped: set CLUSTERCTL_LIBVIRT_E2E=1 (tests/bed/libvirt-env.sh test does)");
        return;
    }
    let suite_start = Instant::now();

    // --- accelerator `auto`: the KVM probe decides, once, and its verdict is used ---
    // The probe boots the image's kernel and waits for it to print, so this image has the real
    // kernel and initrd; its root is a few MiB of zeros (the machine is deleted before it could
    // get anywhere).
    let real = real_image_dir();
    let real_manifest: serde_json::Value = serde_json::from_slice(
        &std::fs::read(real.join("manifest.json")).expect("the test image has a manifest.json"),
    )
    .expect("manifest.json is JSON");
    let file_of = |field: &str| -> PathBuf {
        let v = &real_manifest[field];
        real.join(
            v.as_str()
                .or_else(|| v["path"].as_str())
                .or_else(|| v["file"].as_str())
                .unwrap_or_else(|| panic!("the manifest names no {field}")),
        )
    };
    let probe_dir = tempfile::tempdir().expect("tempdir");
    std::os::unix::fs::symlink(file_of("kernel"), probe_dir.path().join("vmlinuz"))
        .expect("link kernel");
    std::os::unix::fs::symlink(file_of("initrd"), probe_dir.path().join("initrd.img"))
        .expect("link initrd");
    std::fs::File::create(probe_dir.path().join("root.raw"))
        .and_then(|f| f.set_len(4 << 20))
        .expect("write root");
    let probe_image = image_ref(
        probe_dir.path(),
        &serde_json::json!({
            "version": format!("probe-{}", std::process::id()),
            "kernel": "vmlinuz",
            "initrd": "initrd.img",
            "root": { "file": "root.raw", "format": "raw" },
            "cmdline": "console=ttyS0 panic=-1",
        }),
    );
    let solo = ClusterRef {
        name: "solo".into(),
        id: unique_id("solo"),
    };
    {
        let cache = tempfile::tempdir().expect("tempdir");
        let mut config = LibvirtConfig::new(uri());
        config.storage_root = storage_root();
        config.accelerator = Accelerator::Auto;
        config.cache_dir = Some(cache.path().to_path_buf());
        let auto = bounded("connecting", || LibvirtProvider::connect(config)).expect("connect");
        let _guard = ClusterGuard {
            provider: &auto,
            cluster: solo.clone(),
        };
        let start = Instant::now();
        let m = bounded("ensure with accelerator auto", || {
            auto.ensure_machine(
                &solo,
                &spec("e2e-solo-0", MachineRole::ControlPlane, &probe_image),
            )
        })
        .expect("ensure solo");
        let verdict = auto.probe_verdict().expect("auto ran the KVM probe");
        eprintln!(
            "FIGURE kvm probe: kvm_works={} in {} ms ({}); ensure {:.1}s",
            verdict.kvm_works,
            verdict.probe_ms,
            verdict.detail,
            start.elapsed().as_secs_f64()
        );
        let xml = virsh(&["dumpxml", &m.name]).expect("dumpxml");
        let expected_type = if verdict.kvm_works {
            "type='kvm'"
        } else {
            "type='qemu'"
        };
        assert!(
            xml.starts_with(&format!("<domain {expected_type}")),
            "the probe's verdict is used: {}",
            &xml[..60.min(xml.len())]
        );
        if !verdict.kvm_works {
            let mib = LibvirtConfig::new(uri()).tcg_tb_cache_mib;
            assert!(
                xml.contains(&format!("<tb-cache unit='KiB'>{}</tb-cache>", mib * 1024))
                    || xml.contains(&format!("<tb-cache unit='MiB'>{mib}</tb-cache>")),
                "TCG guests get the configured translation cache ({mib} MiB): {xml}"
            );
        }
        // The verdict is cached per libvirt host, so the probe runs once.
        let cached: Vec<_> = std::fs::read_dir(cache.path())
            .expect("cache dir")
            .filter_map(Result::ok)
            .collect();
        assert_eq!(cached.len(), 1, "one cached verdict");
        let text = std::fs::read_to_string(cached[0].path()).expect("cache file");
        assert!(
            text.contains(&format!("\"kvm_works\": {}", verdict.kvm_works)),
            "{text}"
        );
    }
    let inv = inventory(&solo.id);
    assert!(inv.is_empty(), "{inv:?}");

    // --- a stopped machine, and deleting one machine of a cluster ---
    let p = provider();
    let (_dir, image) = halt_image(4);
    let cluster = ClusterRef {
        name: "pair".into(),
        id: unique_id("pair"),
    };
    let guard = ClusterGuard {
        provider: &p,
        cluster: cluster.clone(),
    };
    let specs = [
        spec("e2e-pair-cp-0", MachineRole::ControlPlane, &image),
        spec("e2e-pair-w-0", MachineRole::Worker, &image),
    ];
    for sp in &specs {
        let m = bounded("ensure", || p.ensure_machine(&cluster, sp)).expect("ensure");
        assert_eq!(m.state, MachineState::Running, "{m:?}");
    }
    let listed = bounded("list", || p.list_machines(&cluster)).expect("list");
    assert!(
        listed
            .iter()
            .all(|m| m.image_digest.as_deref() == Some(image.digest.as_str())),
        "the image digest is read back from the label: {listed:?}"
    );
    virsh(&["destroy", "e2e-pair-w-0"]).expect("stop e2e-pair-w-0 behind the provider's back");
    let listed = bounded("list", || p.list_machines(&cluster)).expect("list");
    assert_eq!(listed[1].state, MachineState::Stopped, "{listed:?}");
    assert!(
        listed[1].addresses.is_empty(),
        "a stopped machine has no address: {listed:?}"
    );
    let again = bounded("ensure a stopped machine", || {
        p.ensure_machine(&cluster, &specs[1])
    })
    .expect("restart");
    assert_eq!(again.state, MachineState::Running);
    assert_eq!(
        again.provider_id, listed[1].provider_id,
        "started, not recreated"
    );

    let reservations =
        || virsh(&["net-dumpxml", &format!("clusterctl-{}", cluster.id)]).expect("net-dumpxml");
    assert!(
        reservations().contains("name='e2e-pair-w-0'"),
        "{}",
        reservations()
    );
    bounded("delete machine", || {
        p.delete_machine(&cluster, "e2e-pair-w-0")
    })
    .expect("delete machine");
    bounded("delete machine again", || {
        p.delete_machine(&cluster, "e2e-pair-w-0")
    })
    .expect("delete machine again");
    let inv = inventory(&cluster.id);
    assert_eq!(inv.domains, ["e2e-pair-cp-0"]);
    assert!(
        !inv.volumes.iter().any(|v| v.starts_with("e2e-pair-w-0-")),
        "{:?}",
        inv.volumes
    );
    assert!(
        inv.volumes
            .iter()
            .filter(|v| v.starts_with("e2e-pair-cp-0-"))
            .count()
            == 3,
        "the other machine keeps its volumes: {:?}",
        inv.volumes
    );
    let xml = reservations();
    assert!(
        !xml.contains("name='e2e-pair-w-0'") && xml.contains("name='e2e-pair-cp-0'"),
        "only the deleted machine's address reservation is gone: {xml}"
    );
    // Its address stays held (dnsmasq may still hold its lease) by a tombstone with its MAC.
    assert!(
        xml.contains("name='retired-"),
        "the deleted machine's address is not kept back: {xml}"
    );
    drop(guard);
    let inv = inventory(&cluster.id);
    assert!(inv.is_empty(), "{inv:?}");
    eprintln!(
        "FIGURE auto accelerator, stopped machine, single delete: {:.1}s",
        suite_start.elapsed().as_secs_f64()
    );
}

#[test]
fn conformance_suite_passes_against_real_libvirt() {
    if !enabled() {
        eprintln!("skipped: set CLUSTERCTL_LIBVIRT_E2E=1 (tests/bed/libvirt-env.sh test does)");
        return;
    }
    let mut config = LibvirtConfig::new(uri());
    config.storage_root = storage_root();
    config.accelerator = Accelerator::Tcg;
    // The halt kernel ignores ACPI: do not wait the default two minutes for it to power off.
    config.shutdown_grace = Duration::from_secs(2);
    let p = bounded("connecting to libvirtd", || {
        LibvirtProvider::connect(config)
    })
    .expect("libvirtd of the test bed is reachable");
    // The contract needs machines that reach "running", not machines that boot an OS.
    let (_dir, image) = halt_image(4);
    let (_dir2, other) = halt_image(5);
    let template = spec("template", MachineRole::Worker, &image);
    // Machine names unique to this run, so console logs of earlier runs do not count as boots.
    let prefix = format!("cf{:x}", std::process::id() % 0xfffff);
    let fixture = providers::conformance::Fixture::new(prefix, template, other)
        .with_probe(std::sync::Arc::new(LibvirtProbe));
    let start = Instant::now();
    for (name, check) in providers::conformance::CHECKS {
        let t = Instant::now();
        if let Err(e) = bounded(name, || check(&p, &fixture)) {
            panic!("{e}");
        }
        eprintln!(
            "conformance {name}: ok in {:.1}s",
            t.elapsed().as_secs_f64()
        );
    }
    eprintln!(
        "FIGURE conformance suite against libvirt: {:.1}s",
        start.elapsed().as_secs_f64()
    );
}

/// Looks inside libvirt machines: the data disk with `qemu-io` on its volume (written while the
/// machine is stopped, read with shared locks while it runs), boots by the halt kernel's `B` in
/// the console log.
struct LibvirtProbe;

impl LibvirtProbe {
    fn data_volume(cluster: &ClusterRef, machine: &str) -> Result<String, String> {
        virsh(&[
            "vol-path",
            "--pool",
            &format!("clusterctl-{}", cluster.id),
            &format!("{machine}-data.qcow2"),
        ])
    }

    fn qemu_io(args: &[&str]) -> Result<String, String> {
        let out = Command::new("timeout")
            .args(["60", "qemu-io"])
            .args(args)
            .stdin(Stdio::null())
            .output()
            .map_err(|e| format!("cannot run qemu-io: {e}"))?;
        let stdout = String::from_utf8_lossy(&out.stdout).to_string();
        if out.status.success() && !stdout.contains("failed") {
            Ok(stdout)
        } else {
            Err(format!(
                "`qemu-io {}` failed: {stdout} {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr).trim()
            ))
        }
    }
}

impl providers::conformance::MachineProbe for LibvirtProbe {
    fn write_data_marker(
        &self,
        provider: &dyn Provider,
        cluster: &ClusterRef,
        machine: &str,
        marker: u8,
    ) -> Result<(), String> {
        provider
            .stop_machine(cluster, machine)
            .map_err(|e| e.to_string())?;
        let path = Self::data_volume(cluster, machine)?;
        Self::qemu_io(&[
            "-f",
            "qcow2",
            "-c",
            &format!("write -P 0x{marker:02x} 0 4096"),
            &path,
        ])
        .map(|_| ())
    }

    fn read_data_marker(
        &self,
        _: &dyn Provider,
        cluster: &ClusterRef,
        machine: &str,
    ) -> Result<Option<u8>, String> {
        let path = Self::data_volume(cluster, machine)?;
        let out = Self::qemu_io(&["-f", "qcow2", "-U", "-r", "-c", "read -v 0 16", &path])?;
        // "00000000:  5a 5a 5a ...  ZZZ..."
        let first = out
            .lines()
            .find_map(|l| l.strip_prefix("00000000:"))
            .and_then(|rest| rest.split_whitespace().next())
            .ok_or_else(|| format!("unexpected qemu-io output: {out}"))?;
        let byte = u8::from_str_radix(first, 16)
            .map_err(|e| format!("unexpected qemu-io output {first:?}: {e}"))?;
        Ok((byte != 0).then_some(byte))
    }

    fn boot_count(&self, _: &dyn Provider, _: &ClusterRef, machine: &str) -> Result<u64, String> {
        let log = format!("/var/log/libvirt/qemu/{machine}-console.log");
        match std::fs::read(&log) {
            Ok(bytes) => Ok(String::from_utf8_lossy(&bytes)
                .lines()
                .filter(|l| l.trim() == "B")
                .count() as u64),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(0),
            Err(e) => Err(format!("cannot read {log}: {e}")),
        }
    }
}

/// Where the kill test SIGKILLs the helper that is ensuring three machines one after another.
#[derive(Debug, Clone, Copy)]
enum KillPoint {
    /// This long after it was started (connecting, creating the network).
    AfterMs(u64),
    /// This long after the cluster's pool holds a volume whose name contains this.
    Volume(&'static str, u64),
    /// As soon as this machine's domain is defined (its start may be under way).
    Domain(&'static str),
    /// This long after the helper reported this many machines ensured.
    AfterEnsured(usize, u64),
}

const KILL_POINTS: &[KillPoint] = &[
    KillPoint::AfterMs(0),
    // The pool's owner marker: the image upload is next.
    KillPoint::Volume("clusterctl-owner-", 0),
    // The image root is being streamed (virStorageVolUpload): at its start and in its middle.
    KillPoint::Volume("-root", 0),
    KillPoint::Volume("-root", 250),
    // The image is complete; the first machine's disks are being made.
    KillPoint::Volume(".complete", 0),
    // The first machine's seed is being streamed.
    KillPoint::Volume("e2e-kill-0-seed.img", 0),
    // The first machine is defined and being started (virDomainCreate).
    KillPoint::Domain("e2e-kill-0"),
    KillPoint::AfterEnsured(1, 0),
    KillPoint::Domain("e2e-kill-1"),
    KillPoint::AfterEnsured(2, 30),
];

fn helper_path() -> PathBuf {
    std::env::current_exe()
        .ok()
        .and_then(|e| {
            e.parent()
                .and_then(Path::parent)
                .map(|d| d.join("examples/libvirt_ensure"))
        })
        .filter(|p| p.exists())
        .expect("build the helper first: cargo build -p providers --features libvirt --example libvirt_ensure")
}

/// Waits until the kill point is reached; false if the helper finished first.
fn reach(
    point: KillPoint,
    cluster_id: &str,
    started: Instant,
    lines: &mpsc::Receiver<String>,
    seen: &mut Vec<String>,
    child: &mut std::process::Child,
) -> bool {
    let conn =
        bounded("connecting", || virt::connect::Connect::open(Some(&uri()))).expect("connect");
    let pool_name = format!("clusterctl-{cluster_id}");
    let deadline = Instant::now() + Duration::from_secs(240);
    let _w = Watchdog::new("polling libvirt for the kill point", CALL_LIMIT);
    let reached = loop {
        while let Ok(l) = lines.try_recv() {
            seen.push(l);
        }
        let hit = match point {
            KillPoint::AfterMs(ms) => started.elapsed() >= Duration::from_millis(ms),
            KillPoint::AfterEnsured(n, _) => seen.len() >= n,
            KillPoint::Volume(part, _) => conn
                .lookup_storage_pool_by_name(&pool_name)
                .ok()
                .and_then(|p| p.list_volumes().ok())
                .is_some_and(|vs| vs.iter().any(|v| v.contains(part))),
            KillPoint::Domain(name) => conn.lookup_domain_by_name(name).is_ok(),
        };
        if hit {
            break true;
        }
        if child.try_wait().ok().flatten().is_some() || Instant::now() > deadline {
            break false;
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    if let KillPoint::AfterEnsured(_, ms) | KillPoint::Volume(_, ms) = point {
        std::thread::sleep(Duration::from_millis(ms));
    }
    reached
}

/// A process SIGKILLed while it ensures machines (mid-upload, mid-start, between machines) leaves
/// libvirtd answering and nothing that a re-run cannot finish: after each kill `virsh list`
/// answers within 30 s, and ensuring again converges to exactly the cluster's objects.
/// (`create` is killed only once, mid-provisioning, in the cluster e2e; this walks the kill
/// points one by one on a halt image, a fresh cluster each.)
///
/// be3efeb parked the first version of this test after libvirtd once stopped answering
/// (`virsh list` hung) after such a kill. Not reproduced since: 50 kills over the 10 points
/// (64 MiB and 512 MiB image roots, libvirt 11.3, host load 8-10), `virsh list` answered within
/// 0.34 s every time and every cluster converged. Should it happen again, the bounds above turn
/// it into a failure that says so, with what `virsh list` answered.
#[test]
fn killed_ensure_leaves_libvirtd_answering_and_resumes_without_orphans() {
    if !enabled() {
        eprintln!("skipped: set CLUSTERCTL_LIBVIRT_E2E=1 (tests/bed/libvirt-env.sh test does)");
        return;
    }
    let repeat: usize = std::env::var("CLUSTERCTL_E2E_KILL_REPEAT")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1);
    let p = provider();
    let helper = helper_path();
    // A root large enough that its upload takes a while, so the kill lands inside the stream.
    let root_mib: u64 = std::env::var("CLUSTERCTL_E2E_KILL_ROOT_MIB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(64);
    let (dir, image) = halt_image(root_mib);
    let specs: Vec<MachineSpec> = (0..3)
        .map(|i| spec(&format!("e2e-kill-{i}"), MachineRole::Worker, &image))
        .collect();
    let test_start = Instant::now();
    let mut round = 0;
    for _ in 0..repeat {
        for &point in KILL_POINTS {
            round += 1;
            let cluster = ClusterRef {
                name: "kill".into(),
                id: unique_id(&format!("kill{round}")),
            };
            let guard = ClusterGuard {
                provider: &p,
                cluster: cluster.clone(),
            };
            let request = dir.path().join("request.json");
            std::fs::write(
                &request,
                serde_json::to_vec(&serde_json::json!({
                    "uri": uri(), "storage_root": storage_root(), "cluster": cluster, "machines": specs,
                }))
                .expect("json"),
            )
            .expect("write request");
            let started = Instant::now();
            let mut child = Command::new(&helper)
                .arg(&request)
                .stdout(Stdio::piped())
                .spawn()
                .expect("spawn helper");
            let stdout = child.stdout.take().expect("stdout");
            let (tx, lines) = mpsc::channel();
            std::thread::spawn(move || {
                for l in BufReader::new(stdout).lines().map_while(Result::ok) {
                    if tx.send(l).is_err() {
                        break;
                    }
                }
            });
            let mut seen = Vec::new();
            let reached = reach(point, &cluster.id, started, &lines, &mut seen, &mut child);
            let killed_at = started.elapsed();
            let _ = child.kill();
            let status = child.wait().expect("wait");
            assert!(
                reached,
                "round {round}: the helper finished ({status}) before kill point {point:?}"
            );
            assert!(
                status.code().is_none(),
                "round {round}: the helper exited ({status}) before it was killed at {point:?}"
            );
            let t = Instant::now();
            let listed = virsh(&["list", "--all"])
                .unwrap_or_else(|e| panic!("round {round}, killed at {point:?}: {e}"));
            let answered = t.elapsed();
            let before = inventory(&cluster.id);
            eprintln!(
                "round {round}: killed at {point:?} after {:.2}s ({} ensured); virsh list answered in {:.2}s ({} domains); left: {:?} {:?}",
                killed_at.as_secs_f64(),
                seen.len(),
                answered.as_secs_f64(),
                listed.lines().count(),
                before.domains,
                before.volumes
            );

            let t = Instant::now();
            for sp in &specs {
                let m = bounded("ensure after the kill", || p.ensure_machine(&cluster, sp))
                    .unwrap_or_else(|e| {
                        panic!(
                            "round {round}, killed at {point:?}: ensure {}: {e}",
                            sp.name
                        )
                    });
                assert_eq!(m.state, MachineState::Running, "round {round}: {m:?}");
            }
            let inv = inventory(&cluster.id);
            assert_eq!(
                inv.domains,
                ["e2e-kill-0", "e2e-kill-1", "e2e-kill-2"],
                "round {round}"
            );
            // 3 machines x (root, data, seed) + image (kernel, initrd, root, complete) + owner marker.
            assert_eq!(
                inv.volumes.len(),
                3 * 3 + 4 + 1,
                "round {round}, killed at {point:?}: no orphaned volumes: {:?}",
                inv.volumes
            );
            assert_eq!(inv.networks.len(), 1, "round {round}");
            let machines = bounded("list", || p.list_machines(&cluster)).expect("list");
            let mut ips: Vec<String> = machines
                .iter()
                .filter_map(|m| m.addresses.first().map(ToString::to_string))
                .collect();
            ips.sort();
            ips.dedup();
            assert_eq!(
                ips.len(),
                3,
                "round {round}: distinct reserved addresses: {ips:?}"
            );
            eprintln!(
                "round {round}: converged in {:.1}s",
                t.elapsed().as_secs_f64()
            );
            drop(guard);
            let inv = inventory(&cluster.id);
            assert!(inv.is_empty(), "round {round}: {inv:?}");
        }
    }
    eprintln!(
        "FIGURE kill test: {round} kills, all converged, in {:.1}s",
        test_start.elapsed().as_secs_f64()
    );
}
