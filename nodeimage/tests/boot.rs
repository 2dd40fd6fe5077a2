//! Boots the real node image under QEMU (TCG) and checks its container-optimized properties.
//!
//! Selected by `CLUSTERCTL_IMAGE_TEST=1` (needs root, debootstrap, cryptsetup-bin, qemu-utils,
//! qemu-system-x86, openssh-client). Builds the image into `$CLUSTERCTL_IMAGE_DIR` (default
//! /var/cache/clusterctl/images) or reuses the cached one, then boots it:
//! 1. fresh data disk + seed: seed applied, pinned host key, root ro, verity verified, data disk
//!    formatted and mounted, /var tmpfs, /etc overlay, sshd and containerd active; then over SSH
//!    (QEMU user networking restricted to a 127.0.0.1 port forward): key login as `core`, host key
//!    checked against the pinned one, writes to / fail, password login refused, no apt.
//! 2. same data disk again: the disk is not reformatted and its boot counter says 2.
//! 3. one corrupted block in the root disk: dm-verity refuses it and the boot stops.

use std::fs;
use std::io::Read;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const MARKER_TIMEOUT: Duration = Duration::from_secs(300);

fn enabled() -> bool {
    std::env::var("CLUSTERCTL_IMAGE_TEST").is_ok_and(|v| v == "1")
}

/// Kills the QEMU process it owns when dropped, also when a check fails.
struct Vm {
    child: Child,
    console: PathBuf,
    started: Instant,
}

impl Drop for Vm {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Vm {
    fn boot(image: &nodeimage::Image, work: &Path, name: &str, root: &Path, data: &Path, seed: &Path, ssh_port: Option<u16>) -> Vm {
        let console = work.join(format!("{name}.console.log"));
        let mut cmd = Command::new("qemu-system-x86_64");
        cmd.args(["-accel", "tcg", "-m", "1024", "-smp", "2", "-display", "none", "-monitor", "none", "-no-reboot"])
            .arg("-kernel")
            .arg(image.kernel_path())
            .arg("-initrd")
            .arg(image.initrd_path())
            .arg("-append")
            .arg(format!("{} panic=-1", image.manifest.cmdline))
            .arg("-drive")
            .arg(format!("file={},if=virtio,format=qcow2", root.display()))
            .arg("-drive")
            .arg(format!("file={},if=virtio,format=qcow2", data.display()))
            .arg("-drive")
            .arg(format!("file={},if=virtio,format=raw,readonly=on", seed.display()))
            .arg("-serial")
            .arg(format!("file:{}", console.display()));
        match ssh_port {
            // restrict=on: the guest reaches nothing; only the forward from 127.0.0.1 exists.
            Some(port) => cmd.arg("-nic").arg(format!("user,model=virtio-net-pci,restrict=on,hostfwd=tcp:127.0.0.1:{port}-:22")),
            None => cmd.args(["-nic", "none"]),
        };
        let child = cmd.stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::null()).spawn().expect("start qemu-system-x86_64");
        Vm { child, console, started: Instant::now() }
    }

    fn log(&self) -> String {
        let mut s = String::new();
        if let Ok(mut f) = fs::File::open(&self.console) {
            let mut b = Vec::new();
            let _ = f.read_to_end(&mut b);
            s = String::from_utf8_lossy(&b).into_owned();
        }
        s
    }

    /// Waits for `marker` on the serial console; returns the seconds since start.
    fn wait_for(&mut self, marker: &str) -> f64 {
        loop {
            if self.log().contains(marker) {
                return self.started.elapsed().as_secs_f64();
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                if self.log().contains(marker) {
                    return self.started.elapsed().as_secs_f64();
                }
                panic!("qemu exited ({status}) before {marker:?}; console:\n{}", tail(&self.log()));
            }
            if self.started.elapsed() > MARKER_TIMEOUT {
                panic!("no {marker:?} on the console after {MARKER_TIMEOUT:?}; console:\n{}", tail(&self.log()));
            }
            std::thread::sleep(Duration::from_millis(250));
        }
    }
}

fn tail(s: &str) -> String {
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(60)..].join("\n")
}

fn run(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("running {cmd:?}: {e}"));
    assert!(out.status.success(), "{cmd:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn keygen(path: &Path, comment: &str) {
    run(Command::new("ssh-keygen").args(["-q", "-t", "ed25519", "-N", "", "-C", comment, "-f"]).arg(path));
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map(|a| a.port()).expect("free port")
}

fn qcow_overlay(base: &Path, path: &Path) {
    run(Command::new("qemu-img").args(["create", "-q", "-f", "qcow2", "-F", "qcow2", "-b"]).arg(base).arg(path));
}

fn json(s: &str) -> String {
    serde_json::Value::String(s.to_string()).to_string()
}

/// Runs a command on the VM as `core`, checking the host key against the pinned one.
fn ssh(port: u16, key: &Path, known_hosts: &Path, command: &str) -> std::process::Output {
    Command::new("ssh")
        .args(["-F", "/dev/null", "-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=yes", "-o", "ConnectTimeout=20"])
        .arg("-o")
        .arg(format!("UserKnownHostsFile={}", known_hosts.display()))
        .arg("-i")
        .arg(key)
        .args(["-p", &port.to_string(), "core@127.0.0.1", command])
        .output()
        .expect("run ssh")
}

#[test]
fn boots_verified_read_only_with_persistent_data_disk() {
    if !enabled() {
        eprintln!("skipping: set CLUSTERCTL_IMAGE_TEST=1 (needs root, debootstrap, qemu) to boot the node image");
        return;
    }
    let t = Instant::now();
    let outcome = nodeimage::build(&nodeimage::BuildOptions::new(nodeimage::default_image_dir())).expect("build node image");
    let image = outcome.image;
    eprintln!("image {} ({}) in {:.1} s", image.manifest.version, if outcome.reused { "cached" } else { "built" }, t.elapsed().as_secs_f64());

    let work = tempfile::tempdir().expect("tempdir");
    let w = work.path();
    keygen(&w.join("host"), "boot-test-host");
    keygen(&w.join("admin"), "boot-test-admin");
    let host_priv = fs::read_to_string(w.join("host")).expect("host key");
    let host_pub = fs::read_to_string(w.join("host.pub")).expect("host pub").trim().to_string();
    let admin_pub = fs::read_to_string(w.join("admin.pub")).expect("admin pub").trim().to_string();
    let host_fpr = run(Command::new("ssh-keygen").arg("-l").arg("-f").arg(w.join("host.pub")));
    let host_fpr = host_fpr.split_whitespace().nth(1).expect("fingerprint").to_string();

    // A hand-written seed in the format templates::cloudinit renders (nodeimage does not depend on templates).
    let meta = r#"{"instance-id": "boot-test-1", "local-hostname": "boot-test"}"#;
    let user = format!(
        "#cloud-config\n{{\"hostname\": \"boot-test\", \"users\": [{{\"name\": \"core\", \"sudo\": \"ALL=(ALL) NOPASSWD:ALL\", \
         \"ssh_authorized_keys\": [{}]}}], \"ssh_keys\": {{\"ed25519_private\": {}, \"ed25519_public\": {}}}, \
         \"write_files\": [{{\"path\": \"/etc/clusterctl/probe\", \"content\": \"written from the seed\\n\", \"permissions\": \"0600\"}}]}}\n",
        json(&admin_pub),
        json(&host_priv),
        json(&host_pub)
    );
    let seed = w.join("seed.img");
    nodeimage::seed::write_seed(&seed, &[("meta-data", meta.as_bytes()), ("user-data", user.as_bytes())]).expect("seed");
    let data = w.join("data.qcow2");
    run(Command::new("qemu-img").args(["create", "-q", "-f", "qcow2"]).arg(&data).arg("4G"));
    let root = w.join("root.qcow2");
    qcow_overlay(&image.root_path(), &root);

    // Boot 1: fresh data disk.
    let port = free_port();
    fs::write(w.join("known_hosts"), format!("[127.0.0.1]:{port} {host_pub}\n")).expect("known_hosts");
    let mut vm = Vm::boot(&image, w, "boot1", &root, &data, &seed, Some(port));
    vm.wait_for("clusterctl-stateful: formatting blank data disk /dev/vdb");
    vm.wait_for("clusterctl-stateful: mounted /dev/vdb at /mnt/stateful boot=1");
    vm.wait_for(&format!("clusterctl-firstboot: host key from seed: 256 {host_fpr}"));
    vm.wait_for("clusterctl-firstboot: seed applied from /dev/vdc instance-id=boot-test-1 hostname=boot-test");
    vm.wait_for("clusterctl-firstboot: root=ro verity=verified data=/dev/vdb var=tmpfs etc=overlay");
    let ready = vm.wait_for("clusterctl-ready: sshd=active containerd=active");
    let login = vm.wait_for("boot-test login:");
    eprintln!("boot 1: ready {ready:.1} s, login prompt {login:.1} s");

    let kh = w.join("known_hosts");
    let admin = w.join("admin");
    let mut out = ssh(port, &admin, &kh, "true");
    for _ in 0..20 {
        if out.status.success() {
            break;
        }
        std::thread::sleep(Duration::from_secs(3));
        out = ssh(port, &admin, &kh, "true");
    }
    assert!(out.status.success(), "ssh as core with the pinned host key: {}", String::from_utf8_lossy(&out.stderr));
    eprintln!("boot 1: ssh answered at {:.1} s", vm.started.elapsed().as_secs_f64());
    let probe = |cmd: &str| {
        let o = ssh(port, &admin, &kh, cmd);
        assert!(o.status.success(), "{cmd}: {}", String::from_utf8_lossy(&o.stderr));
        String::from_utf8_lossy(&o.stdout).trim().to_string()
    };
    assert_eq!(probe("findmnt -n -o OPTIONS / | cut -d, -f1"), "ro");
    assert_eq!(probe("findmnt -n -o SOURCE /"), "/dev/mapper/root");
    assert!(probe("sudo veritysetup status root").contains("status:      verified"));
    assert!(probe("cat /proc/cmdline").contains(&format!("clusterctl.verity={}", image.manifest.root.verity.root_hash)));
    assert_eq!(probe("touch /usr/x 2>&1 || echo refused").lines().last(), Some("refused"));
    assert_eq!(probe("sudo touch /usr/x 2>&1 || echo refused").lines().last(), Some("refused"));
    assert_eq!(probe("findmnt -n -o SOURCE /var/lib/containerd"), "/dev/vdb[/containerd]");
    assert_eq!(probe("findmnt -n -o SOURCE /var/lib/kubelet"), "/dev/vdb[/kubelet]");
    assert_eq!(probe("findmnt -n -o SOURCE /var/lib/etcd"), "/dev/vdb[/etcd]");
    assert_eq!(probe("systemctl is-active containerd"), "active");
    assert_eq!(probe("sudo cat /etc/clusterctl/probe"), "written from the seed");
    assert_eq!(probe("hostname"), "boot-test");
    assert!(probe("sudo sshd -T | grep -E '^(passwordauthentication|permitrootlogin) '").contains("passwordauthentication no"));
    assert!(probe("sudo sshd -T | grep -E '^permitrootlogin '").contains("permitrootlogin no"));
    assert_eq!(probe("command -v apt apt-get || echo none"), "none");
    assert_eq!(probe("ls /sys/fs/cgroup/ | grep -c -E '^(memory|cpu,cpuacct)$'"), "2", "cgroup v1");
    assert_eq!(probe("sysctl -n net.ipv4.ip_forward net.bridge.bridge-nf-call-iptables | tr '\\n' ' '"), "1 1");
    for tool in ["runc", "iptables", "ipset", "conntrack", "ctr"] {
        probe(&format!("command -v {tool}"));
    }
    probe("ls /usr/lib/cni/bridge /usr/lib/cni/host-local /usr/lib/cni/loopback /usr/lib/cni/portmap");
    let pw = Command::new("ssh")
        .args(["-F", "/dev/null", "-o", "BatchMode=yes", "-o", "PreferredAuthentications=password,keyboard-interactive"])
        .arg("-o")
        .arg(format!("UserKnownHostsFile={}", kh.display()))
        .args(["-p", &port.to_string(), "core@127.0.0.1", "true"])
        .output()
        .expect("ssh");
    assert!(!pw.status.success(), "password authentication must be refused");
    let _ = ssh(port, &admin, &kh, "sudo sync");
    drop(vm);

    // Boot 2: the same data disk survives.
    let mut vm = Vm::boot(&image, w, "boot2", &root, &data, &seed, None);
    vm.wait_for("clusterctl-stateful: mounted /dev/vdb at /mnt/stateful boot=2");
    vm.wait_for("clusterctl-firstboot: root=ro verity=verified data=/dev/vdb");
    assert!(!vm.log().contains("formatting blank data disk"), "data disk was reformatted on the second boot");
    drop(vm);

    // Boot 3: one flipped block in the root disk; verity must stop the boot.
    let bad = w.join("tampered.qcow2");
    qcow_overlay(&image.root_path(), &bad);
    run(Command::new("qemu-io").args(["-f", "qcow2", "-c", "write -P 0x55 0 4096"]).arg(&bad));
    let mut vm = Vm::boot(&image, w, "tampered", &bad, &data, &seed, None);
    vm.wait_for("clusterctl-verity: opening /dev/vda");
    vm.wait_for("is corrupted");
    assert!(!vm.log().contains("clusterctl-firstboot:"), "a tampered root must not boot");
    eprintln!("boot test done in {:.1} s", t.elapsed().as_secs_f64());
}
