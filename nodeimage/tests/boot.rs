//! Boots the real node image under QEMU (TCG) and checks its container-optimized properties.
//!
//! Selected by `CLUSTERCTL_IMAGE_TEST=1` (needs root, debootstrap, cryptsetup-bin, qemu-utils,
//! qemu-system-x86, openssh-client). Boots the image in `$CLUSTERCTL_TEST_IMAGE` when set (the
//! directory `clusterctl image build` printed), else builds the image into `$CLUSTERCTL_IMAGE_DIR`
//! (default /var/cache/clusterctl/images) or reuses the cached one, then boots it:
//! 1. fresh data disk + seed: seed applied, pinned host key, root ro, verity verified, data disk
//!    formatted and mounted, /var tmpfs, /etc overlay, sshd and containerd active; then over SSH
//!    (QEMU user networking restricted to a 127.0.0.1 port forward): key login as `core`, host key
//!    checked against the pinned one, writes to / fail, password login refused, no apt.
//! 2. same data disk again: the disk is not reformatted and its boot counter says 2.
//! 3. one corrupted block in the root disk: dm-verity refuses it and the boot stops.

use std::fs;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Run over SSH as `core`; prints one key=value line per observation.
const PROBE_SCRIPT: &str = r#"
echo "root_opts=$(findmnt -n -o OPTIONS / | cut -d, -f1)"
echo "root_src=$(findmnt -n -o SOURCE /)"
echo "verity=$(sudo veritysetup status root | sed -n 's/^ *status: *//p')"
echo "cmdline=$(cat /proc/cmdline)"
if touch /usr/x 2>/dev/null; then echo user_write_usr=allowed; else echo user_write_usr=refused; fi
if sudo touch /usr/x 2>/dev/null; then echo root_write_usr=allowed; else echo root_write_usr=refused; fi
for d in containerd kubelet etcd clusterctl; do echo "data_$d=$(findmnt -n -o SOURCE /var/lib/$d)"; done
echo "var=$(findmnt -n -o FSTYPE /var)"
echo "etc=$(findmnt -n -o FSTYPE /etc)"
echo "tmp=$(findmnt -n -o FSTYPE /tmp)"
if touch /tmp/clusterctl-probe 2>/dev/null; then echo user_write_tmp=allowed; else echo user_write_tmp=refused; fi
echo "containerd=$(systemctl is-active containerd)"
echo "probe=$(sudo cat /etc/clusterctl/probe)"
echo "hostname=$(hostname)"
sudo sshd -T | awk '/^(passwordauthentication|permitrootlogin|kbdinteractiveauthentication) / { print "sshd_" $1 "=" $2 }'
echo "ssh_host_keys=$(ls /etc/ssh | grep -c '^ssh_host_.*_key$')"
if command -v apt >/dev/null || command -v apt-get >/dev/null; then echo apt=present; else echo apt=absent; fi
if [ -d /sys/fs/cgroup/memory ] && [ -d /sys/fs/cgroup/cpu,cpuacct ]; then echo cgroup_v1=yes; else echo cgroup_v1=no; fi
echo "ip_forward=$(cat /proc/sys/net/ipv4/ip_forward)"
echo "bridge_nf=$(cat /proc/sys/net/bridge/bridge-nf-call-iptables)"
for t in runc iptables ipset conntrack ctr containerd; do echo "tool_$t=$(sudo sh -c "command -v $t" || echo missing)"; done
for p in bridge host-local loopback portmap; do if [ -x /usr/lib/cni/$p ]; then echo "cni_$p=yes"; else echo "cni_$p=no"; fi; done
sudo sync
"#;

mod support;

use support::{Vm, enabled, free_port, run, ssh};

/// Boots the image directly (kernel, initrd, command line), as libvirt does.
#[allow(clippy::too_many_arguments)]
fn boot_vm(
    image: &nodeimage::Image,
    work: &Path,
    name: &str,
    root: &Path,
    data: &Path,
    seed: &Path,
    ssh_port: Option<u16>,
) -> Vm {
    let console = work.join(format!("{name}.console.log"));
    let mut cmd = Command::new("qemu-system-x86_64");
    cmd.args([
        "-accel",
        "tcg",
        "-m",
        "1024",
        "-smp",
        "2",
        "-display",
        "none",
        "-monitor",
        "none",
        "-no-reboot",
    ])
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
    .arg(format!(
        "file={},if=virtio,format=raw,readonly=on",
        seed.display()
    ))
    .arg("-serial")
    .arg(format!("file:{}", console.display()));
    match ssh_port {
        // restrict=on: the guest reaches nothing; only the forward from 127.0.0.1 exists.
        Some(port) => cmd.arg("-nic").arg(format!(
            "user,model=virtio-net-pci,restrict=on,hostfwd=tcp:127.0.0.1:{port}-:22"
        )),
        None => cmd.args(["-nic", "none"]),
    };
    cmd.stderr(Stdio::null());
    Vm::spawn(&mut cmd, console)
}

fn keygen(path: &Path, comment: &str) {
    run(Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-C", comment, "-f"])
        .arg(path));
}

fn qcow_overlay(base: &Path, path: &Path) {
    run(Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2", "-F", "qcow2", "-b"])
        .arg(base)
        .arg(path));
}

fn json(s: &str) -> String {
    serde_json::Value::String(s.to_string()).to_string()
}

#[test]
fn boots_verified_read_only_with_persistent_data_disk() {
    if !enabled() {
        eprintln!(
            "skipping: set CLUSTERCTL_IMAGE_TEST=1 (needs root, debootstrap, qemu) to boot the node image"
        );
        return;
    }
    let t = Instant::now();
    // The image the caller built (tests/run-all.sh passes the directory `clusterctl image build`
    // printed), so every stage tests the same image; else build (or reuse) one here.
    let image = match std::env::var_os("CLUSTERCTL_TEST_IMAGE").filter(|v| !v.is_empty()) {
        Some(dir) => {
            let image = nodeimage::load(Path::new(&dir)).expect("load CLUSTERCTL_TEST_IMAGE");
            eprintln!(
                "image {} (CLUSTERCTL_TEST_IMAGE={})",
                image.manifest.version,
                image.dir.display()
            );
            image
        }
        None => {
            let outcome =
                nodeimage::build(&nodeimage::BuildOptions::new(nodeimage::default_image_dir()))
                    .expect("build node image");
            eprintln!(
                "image {} ({}) in {:.1} s",
                outcome.image.manifest.version,
                if outcome.reused { "cached" } else { "built" },
                t.elapsed().as_secs_f64()
            );
            outcome.image
        }
    };

    let work = tempfile::tempdir().expect("tempdir");
    let w = work.path();
    keygen(&w.join("host"), "boot-test-host");
    keygen(&w.join("admin"), "boot-test-admin");
    let host_priv = fs::read_to_string(w.join("host")).expect("host key");
    let host_pub = fs::read_to_string(w.join("host.pub"))
        .expect("host pub")
        .trim()
        .to_string();
    let admin_pub = fs::read_to_string(w.join("admin.pub"))
        .expect("admin pub")
        .trim()
        .to_string();
    let host_fpr = run(Command::new("ssh-keygen")
        .arg("-l")
        .arg("-f")
        .arg(w.join("host.pub")));
    let host_fpr = host_fpr
        .split_whitespace()
        .nth(1)
        .expect("fingerprint")
        .to_string();

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
    nodeimage::seed::write_seed(
        &seed,
        &[
            ("meta-data", meta.as_bytes()),
            ("user-data", user.as_bytes()),
        ],
    )
    .expect("seed");
    let data = w.join("data.qcow2");
    run(Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2"])
        .arg(&data)
        .arg("4G"));
    let root = w.join("root.qcow2");
    qcow_overlay(&image.root_path(), &root);

    // Boot 1: fresh data disk.
    let port = free_port();
    fs::write(
        w.join("known_hosts"),
        format!("[127.0.0.1]:{port} {host_pub}\n"),
    )
    .expect("known_hosts");
    let mut vm = boot_vm(&image, w, "boot1", &root, &data, &seed, Some(port));
    vm.wait_for("clusterctl-stateful: formatting blank data disk /dev/vdb");
    vm.wait_for("clusterctl-stateful: mounted /dev/vdb at /mnt/stateful boot=1");
    vm.wait_for(&format!(
        "clusterctl-firstboot: host key from seed: 256 {host_fpr}"
    ));
    vm.wait_for("clusterctl-firstboot: seed applied from /dev/vdc instance-id=boot-test-1 hostname=boot-test");
    vm.wait_for(
        "clusterctl-firstboot: root=ro verity=verified data=/dev/vdb var=tmpfs etc=overlay",
    );
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
    assert!(
        out.status.success(),
        "ssh as core with the pinned host key: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    eprintln!(
        "boot 1: ssh answered at {:.1} s",
        vm.started.elapsed().as_secs_f64()
    );
    // One SSH session collects every observation as key=value lines (each session costs seconds
    // under a loaded TCG guest).
    let o = ssh(port, &admin, &kh, PROBE_SCRIPT);
    assert!(
        o.status.success(),
        "probe script: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    let out = String::from_utf8_lossy(&o.stdout).into_owned();
    let facts: std::collections::BTreeMap<&str, &str> =
        out.lines().filter_map(|l| l.split_once('=')).collect();
    let fact = |k: &str| {
        *facts
            .get(k)
            .unwrap_or_else(|| panic!("probe printed no {k}; output:\n{out}"))
    };
    assert_eq!(fact("root_opts"), "ro", "root mounted read-only");
    assert_eq!(fact("tmp"), "tmpfs", "/tmp is a tmpfs (runc writes there)");
    assert_eq!(fact("user_write_tmp"), "allowed", "/tmp is writable");
    assert_eq!(fact("root_src"), "/dev/mapper/root");
    assert_eq!(fact("verity"), "verified");
    assert!(fact("cmdline").contains(&format!(
        "clusterctl.verity={}",
        image.manifest.root.verity.root_hash
    )));
    assert_eq!(fact("user_write_usr"), "refused");
    assert_eq!(
        fact("root_write_usr"),
        "refused",
        "even root cannot write the verified root"
    );
    for d in ["containerd", "kubelet", "etcd", "clusterctl"] {
        assert_eq!(
            fact(&format!("data_{d}")),
            format!("/dev/vdb[/{d}]"),
            "/var/lib/{d} on the data disk"
        );
    }
    assert_eq!(fact("var"), "tmpfs");
    assert_eq!(fact("etc"), "overlay");
    assert_eq!(fact("containerd"), "active");
    assert_eq!(fact("probe"), "written from the seed");
    assert_eq!(fact("hostname"), "boot-test");
    assert_eq!(fact("sshd_passwordauthentication"), "no");
    assert_eq!(fact("sshd_kbdinteractiveauthentication"), "no");
    assert_eq!(fact("sshd_permitrootlogin"), "no");
    assert_eq!(
        fact("ssh_host_keys"),
        "1",
        "only the seed's ed25519 host key"
    );
    assert_eq!(fact("apt"), "absent");
    assert_eq!(fact("cgroup_v1"), "yes");
    assert_eq!(fact("ip_forward"), "1");
    assert_eq!(fact("bridge_nf"), "1");
    for t in [
        "runc",
        "iptables",
        "ipset",
        "conntrack",
        "ctr",
        "containerd",
    ] {
        assert_ne!(fact(&format!("tool_{t}")), "missing", "{t} installed");
    }
    for p in ["bridge", "host-local", "loopback", "portmap"] {
        assert_eq!(fact(&format!("cni_{p}")), "yes", "CNI plugin {p}");
    }
    let pw = Command::new("ssh")
        .args([
            "-F",
            "/dev/null",
            "-o",
            "BatchMode=yes",
            "-o",
            "PreferredAuthentications=password,keyboard-interactive",
        ])
        .arg("-o")
        .arg(format!("UserKnownHostsFile={}", kh.display()))
        .args(["-p", &port.to_string(), "core@127.0.0.1", "true"])
        .output()
        .expect("ssh");
    assert!(
        !pw.status.success(),
        "password authentication must be refused"
    );
    // Nothing saved yet; then save a file and a unit for /etc, as clusterctl's bootstrap does.
    assert!(
        vm.log()
            .contains("clusterctl-restore: nothing saved in /var/lib/clusterctl/etc"),
        "clusterctl-restore did not run on boot 1"
    );
    let save = "set -e; sudo mkdir -p /var/lib/clusterctl/etc/clusterctl-test /var/lib/clusterctl/etc/systemd/system; \
        echo restored-from-the-data-disk | sudo tee /var/lib/clusterctl/etc/clusterctl-test/probe >/dev/null; \
        printf '[Service]\\nType=oneshot\\nExecStart=/bin/sh -c \"echo clusterctl-probe: $$(cat /etc/clusterctl-test/probe)\"\\nStandardOutput=journal+console\\n' \
          | sudo tee /var/lib/clusterctl/etc/systemd/system/clusterctl-probe.service >/dev/null; \
        echo clusterctl-probe.service | sudo tee /var/lib/clusterctl/boot-units >/dev/null; sync";
    let out = ssh(port, &admin, &kh, save);
    assert!(
        out.status.success(),
        "saving /etc files: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    drop(vm);

    // Boot 2: the same data disk survives, and what was saved for /etc is back and started.
    let mut vm = boot_vm(&image, w, "boot2", &root, &data, &seed, None);
    vm.wait_for("clusterctl-stateful: mounted /dev/vdb at /mnt/stateful boot=2");
    vm.wait_for("clusterctl-firstboot: root=ro verity=verified data=/dev/vdb");
    vm.wait_for(
        "clusterctl-restore: restored 2 file(s) into /etc; started: clusterctl-probe.service",
    );
    vm.wait_for("clusterctl-probe: restored-from-the-data-disk");
    vm.wait_for("clusterctl-ready: sshd=active containerd=active");
    assert!(
        !vm.log().contains("formatting blank data disk"),
        "data disk was reformatted on the second boot"
    );
    drop(vm);

    // Boot 3: one flipped block in the root disk; verity must stop the boot.
    let bad = w.join("tampered.qcow2");
    qcow_overlay(&image.root_path(), &bad);
    run(Command::new("qemu-io")
        .args(["-f", "qcow2", "-c", "write -P 0x55 0 4096"])
        .arg(&bad));
    let mut vm = boot_vm(&image, w, "tampered", &bad, &data, &seed, None);
    vm.wait_for("clusterctl-verity: opening /dev/vda");
    vm.wait_for("is corrupted");
    assert!(
        !vm.log().contains("clusterctl-firstboot:"),
        "a tampered root must not boot"
    );
    eprintln!("boot test done in {:.1} s", t.elapsed().as_secs_f64());
}
