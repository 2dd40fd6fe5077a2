//! Boots the node image's GCE disk (`gce-disk.tar.gz`) the way Compute Engine does: UEFI firmware
//! (OVMF, as GCE's), the disk on virtio-scsi with GCE's SCSI identity (vendor `Google`, product
//! `PersistentDisk`, serial = the device name), no seed disk, and a metadata server at
//! 169.254.169.254 that serves the seed and takes guest attributes.
//!
//! Selected by `CLUSTERCTL_IMAGE_TEST=1` with `CLUSTERCTL_TEST_IMAGE` naming a built image (needs
//! qemu-system-x86, ovmf, openssh-client, python3, GNU tar). Checks:
//! 1. the archive is what GCE imports: one `disk.raw`, oldgnu sparse tar, size in whole GiB;
//! 2. first boot: the firmware boots the unified kernel image, the verity root is found by its
//!    partition name and verified, the blank data disk (found by GCE's device name) formatted; the
//!    seed comes from the metadata server (which insists on `Metadata-Flavor: Google`), and the
//!    machine reports its own host key as guest attribute `hostkeys/ssh-ed25519`; SSH with that
//!    key pinned (StrictHostKeyChecking=yes) logs in as the seed's user;
//! 3. a new boot disk from the same archive with the same data disk (GCE's boot-disk
//!    replacement): the same host key, the data disk's boot counter at 2.
//!
//! The metadata server is a per-connection script behind QEMU's `guestfwd` (user networking with
//! `restrict=on`): the guest reaches nothing else, and nothing leaves the machine.

use std::fs;
use std::io::Read;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
const OVMF_CODE: &str = "/usr/share/OVMF/OVMF_CODE_4M.fd";
const OVMF_VARS: &str = "/usr/share/OVMF/OVMF_VARS_4M.fd";

/// One HTTP/1.1 exchange per run, on stdin/stdout (QEMU starts it for each guest connection):
/// GET instance/{id,name,attributes/user-data} from files in the directory argv[1], PUT
/// instance/guest-attributes/NS/KEY into `ga-NS-KEY`; 403 without `Metadata-Flavor: Google`,
/// as the real server answers. Every request is logged to `requests.log`.
const METADATA_SERVER: &str = r#"
import os, sys
root = sys.argv[1]
inp, out = sys.stdin.buffer, sys.stdout.buffer
while True:
    line = inp.readline()
    if not line:
        break
    parts = line.decode("latin-1").split(" ")
    if len(parts) < 2:
        break
    method, path = parts[0], parts[1].split("?")[0]
    headers = {}
    while True:
        h = inp.readline().decode("latin-1")
        if h in ("\r\n", "\n", ""):
            break
        k, _, v = h.partition(":")
        headers[k.strip().lower()] = v.strip()
    body = inp.read(int(headers.get("content-length") or 0))
    with open(os.path.join(root, "requests.log"), "a") as f:
        f.write("%s %s %s\n" % (method, path, headers.get("metadata-flavor", "-")))
    status, payload = 404, b"not found"
    pre = "/computeMetadata/v1/instance/"
    files = {"id": "id", "name": "name", "attributes/user-data": "user-data"}
    if headers.get("metadata-flavor") != "Google":
        status, payload = 403, b"Missing required header: Metadata-Flavor"
    elif path.startswith(pre):
        rest = path[len(pre):]
        if method == "GET" and rest in files and os.path.exists(os.path.join(root, files[rest])):
            status, payload = 200, open(os.path.join(root, files[rest]), "rb").read()
        elif method == "PUT" and rest.startswith("guest-attributes/") and rest.count("/") == 2:
            _, ns, key = rest.split("/")
            with open(os.path.join(root, "ga-%s-%s" % (ns, key)), "wb") as f:
                f.write(body)
            status, payload = 200, b""
    out.write(b"HTTP/1.1 %d X\r\nMetadata-Flavor: Google\r\nContent-Type: application/text\r\nContent-Length: %d\r\n\r\n" % (status, len(payload)) + payload)
    out.flush()
"#;

mod support;

use support::{Vm, enabled, free_port, run, ssh};

/// Boots a GCE disk as Compute Engine does: UEFI, virtio-scsi with GCE's disk identity.
fn gce_vm(w: &Path, name: &str, boot_disk: &Path, data: &Path, ssh_port: u16) -> Vm {
    let console = w.join(format!("{name}.console.log"));
    let vars = w.join(format!("{name}.vars.fd"));
    fs::copy(OVMF_VARS, &vars).expect("copy OVMF variables");
    let mut cmd = Command::new("qemu-system-x86_64");
    cmd.args(["-machine", "q35", "-accel", "tcg", "-m", "1536", "-smp", "2"])
            .args(["-display", "none", "-monitor", "none", "-no-reboot"])
            .arg("-drive")
            .arg(format!("if=pflash,format=raw,readonly=on,file={OVMF_CODE}"))
            .arg("-drive")
            .arg(format!("if=pflash,format=raw,file={}", vars.display()))
            .args(["-device", "virtio-scsi-pci,id=scsi"])
            .arg("-drive")
            .arg(format!("if=none,id=boot,format=qcow2,file={}", boot_disk.display()))
            .args([
                "-device",
                "scsi-hd,drive=boot,bus=scsi.0,vendor=Google,product=PersistentDisk,serial=boot,bootindex=0",
            ])
            .arg("-drive")
            .arg(format!("if=none,id=data,format=qcow2,file={}", data.display()))
            .args([
                "-device",
                "scsi-hd,drive=data,bus=scsi.0,vendor=Google,product=PersistentDisk,serial=data",
            ])
            // restrict=on: only the SSH forward from 127.0.0.1 and the metadata server exist.
            .arg("-nic")
            .arg(format!(
                "user,model=virtio-net-pci,restrict=on,net=169.254.169.0/24,host=169.254.169.2,\
                 dhcpstart=169.254.169.15,hostfwd=tcp:127.0.0.1:{ssh_port}-:22,\
                 guestfwd=tcp:169.254.169.254:80-cmd:python3 {} {}",
                w.join("metadata.py").display(),
                w.join("md").display()
            ))
            .arg("-serial")
            .arg(format!("file:{}", console.display()));
    cmd.stderr(Stdio::from(
        fs::File::create(w.join(format!("{name}.qemu.log"))).expect("qemu log"),
    ));
    Vm::spawn(&mut cmd, console)
}

fn overlay(base: &Path, path: &Path) {
    run(Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2", "-F", "raw", "-b"])
        .arg(base)
        .arg(path));
}

#[test]
fn gce_disk_boots_on_uefi_with_its_seed_from_the_metadata_server() {
    if !enabled() {
        eprintln!(
            "skipping: set CLUSTERCTL_IMAGE_TEST=1 and CLUSTERCTL_TEST_IMAGE to boot the GCE disk"
        );
        return;
    }
    let Some(dir) = std::env::var_os("CLUSTERCTL_TEST_IMAGE").filter(|v| !v.is_empty()) else {
        panic!(
            "CLUSTERCTL_TEST_IMAGE must name a built image (the directory `clusterctl image build` printed)"
        );
    };
    let image = nodeimage::load(Path::new(&dir)).expect("load CLUSTERCTL_TEST_IMAGE");
    let gce = image
        .manifest
        .gce
        .clone()
        .expect("the image has a GCE disk (built by a clusterctl that makes them)");
    let work = tempfile::tempdir().expect("tempdir");
    let w = work.path();

    // 1. The archive GCE imports.
    let t = Instant::now();
    let archive = image.dir.join(&gce.file.path);
    let listing = run(Command::new("tar").arg("-tvzf").arg(&archive));
    let names: Vec<&str> = listing
        .lines()
        .filter_map(|l| l.split_whitespace().last())
        .collect();
    assert_eq!(names, ["disk.raw"], "{listing}");
    // GNU tar's old format marks a sparse member with type 'S' in the header's typeflag.
    let mut header = [0u8; 512];
    flate2_free_gunzip_header(&archive, &mut header);
    assert_eq!(
        header[156], b'S',
        "disk.raw is a sparse member of an oldgnu tar"
    );
    assert_eq!(&header[257..265], b"ustar  \0", "oldgnu magic");
    run(Command::new("tar")
        .args(["-xSzf"])
        .arg(&archive)
        .arg("-C")
        .arg(w));
    let raw = w.join("disk.raw");
    let size = fs::metadata(&raw).expect("disk.raw").len();
    assert_eq!(
        size % (1 << 30),
        0,
        "disk.raw is {size} bytes: not whole GiB"
    );
    assert_eq!(size >> 30, gce.disk_size_gib);
    eprintln!(
        "archive checked and unpacked in {:.1} s",
        t.elapsed().as_secs_f64()
    );

    // The seed on the metadata server: a user with our key, and no host key at all.
    run(Command::new("ssh-keygen")
        .args([
            "-q",
            "-t",
            "ed25519",
            "-N",
            "",
            "-C",
            "gce-boot-admin",
            "-f",
        ])
        .arg(w.join("admin")));
    let admin_pub = fs::read_to_string(w.join("admin.pub")).expect("admin pub");
    let md = w.join("md");
    fs::create_dir(&md).expect("md dir");
    fs::write(w.join("metadata.py"), METADATA_SERVER).expect("metadata server");
    fs::write(md.join("id"), "4711471147114711").expect("id");
    fs::write(md.join("name"), "gce-boot").expect("name");
    let user = serde_json::json!({
        "hostname": "gce-boot",
        "users": [{"name": "core", "sudo": "ALL=(ALL) NOPASSWD:ALL", "ssh_authorized_keys": [admin_pub.trim()]}],
    });
    fs::write(md.join("user-data"), format!("#cloud-config\n{user}\n")).expect("user-data");
    let data = w.join("data.qcow2");
    run(Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2"])
        .arg(&data)
        .arg("4G"));

    // 2. First boot.
    let boot1 = w.join("boot1.qcow2");
    overlay(&raw, &boot1);
    let port = free_port();
    let mut vm = gce_vm(w, "gce1", &boot1, &data, port);
    let t_root = vm.wait_for("clusterctl-verity: opening /dev/disk/by-partlabel/clusterctl-root");
    vm.wait_for("clusterctl-stateful: formatting blank data disk /dev/disk/by-id/scsi-0Google_PersistentDisk_data");
    vm.wait_for("clusterctl-firstboot: no cidata seed found: the metadata server is asked");
    let t_seed = vm.wait_for("clusterctl-firstboot: seed applied from the metadata server instance-id=4711471147114711 hostname=gce-boot");
    vm.wait_for("clusterctl-firstboot: host key reported as guest attribute hostkeys/ssh-ed25519");
    vm.wait_for("root=ro verity=verified");
    eprintln!("first boot: verity root opened at {t_root:.0} s, seed applied at {t_seed:.0} s");
    let requests = fs::read_to_string(md.join("requests.log")).expect("requests");
    assert!(
        requests.lines().all(|l| l.ends_with(" Google")),
        "every request says Metadata-Flavor: Google:\n{requests}"
    );
    let reported =
        fs::read_to_string(md.join("ga-hostkeys-ssh-ed25519")).expect("host key reported");
    let known_hosts = w.join("known_hosts");
    fs::write(
        &known_hosts,
        format!("[127.0.0.1]:{port} ssh-ed25519 {}\n", reported.trim()),
    )
    .expect("known_hosts");
    let probe = "echo cmdline=$(cat /proc/cmdline); echo root=$(findmnt -n -o SOURCE /); \
                 echo verity=$(sudo veritysetup status root | sed -n 's/^ *status: *//p'); \
                 echo data=$(findmnt -n -o SOURCE /mnt/stateful); echo hostname=$(hostname); \
                 echo efi=$(test -d /sys/firmware/efi && echo yes || echo no)";
    let mut out = ssh(port, &w.join("admin"), &known_hosts, probe);
    for _ in 0..20 {
        if out.status.success() {
            break;
        }
        std::thread::sleep(Duration::from_secs(3));
        out = ssh(port, &w.join("admin"), &known_hosts, probe);
    }
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "ssh with the reported host key pinned: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    for want in [
        "clusterctl.verity_data=PARTLABEL=clusterctl-root",
        "root=/dev/mapper/root",
        "verity=verified",
        "hostname=gce-boot",
        "efi=yes",
    ] {
        assert!(stdout.contains(want), "{want:?} in\n{stdout}");
    }
    assert!(
        stdout.contains("data=/dev/sd"),
        "data disk mounted\n{stdout}"
    );
    let _ = ssh(port, &w.join("admin"), &known_hosts, "sudo sync");
    drop(vm);

    // 3. A new boot disk from the same archive, the same data disk: the same host key.
    fs::remove_file(md.join("ga-hostkeys-ssh-ed25519")).expect("clear");
    let boot2 = w.join("boot2.qcow2");
    overlay(&raw, &boot2);
    let mut vm = gce_vm(w, "gce2", &boot2, &data, port);
    vm.wait_for("clusterctl-stateful: mounted");
    vm.wait_for("boot=2");
    vm.wait_for("clusterctl-firstboot: host key reported as guest attribute hostkeys/ssh-ed25519");
    let again =
        fs::read_to_string(md.join("ga-hostkeys-ssh-ed25519")).expect("host key reported again");
    assert_eq!(
        again.trim(),
        reported.trim(),
        "host identity kept on the data disk"
    );
    assert!(
        !vm.log().contains("formatting blank data disk"),
        "data disk not reformatted"
    );
    eprintln!(
        "second boot (new boot disk, same data disk) in {:.0} s",
        vm.started.elapsed().as_secs_f64()
    );
}

/// Reads the first 512 bytes of the tar inside the gzip archive (gzip -dc, head).
fn flate2_free_gunzip_header(archive: &Path, header: &mut [u8; 512]) {
    let mut child = Command::new("gzip")
        .arg("-dc")
        .arg(archive)
        .stdout(Stdio::piped())
        .spawn()
        .expect("gzip");
    child
        .stdout
        .as_mut()
        .expect("stdout")
        .read_exact(header)
        .expect("tar header");
    let _ = child.kill();
    let _ = child.wait();
}
