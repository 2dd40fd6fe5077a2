//! Benchmark of the SSH executor against the OpenSSH client, measured in the same run on
//! loopback against real sshd processes.
//!
//! `cargo run --release -p clusterctl --example ssh_bench` (needs openssh-server and
//! openssh-client: tests/bed/install-host-packages.sh). Prints exec round trips (our reused
//! connection vs `ssh` with ControlMaster, and fresh connections for both), 100 MiB upload
//! throughput (ours vs `scp` and `sftp`), and the time to run a command on 20 hosts (ours vs 20
//! parallel `ssh` processes), with ratios.

#[path = "../tests/support/mod.rs"]
mod support;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use clusterctl::ssh::{KnownHosts, Target};
use support::{Fixture, Sshd};

fn ssh_base_args(fx: &Fixture, sshd: &Sshd, known_hosts: &Path) -> Vec<String> {
    vec![
        "-i".into(),
        fx.client_key.display().to_string(),
        "-p".into(),
        sshd.port.to_string(),
        "-o".into(),
        format!("UserKnownHostsFile={}", known_hosts.display()),
        "-o".into(),
        "StrictHostKeyChecking=yes".into(),
        "-o".into(),
        "BatchMode=yes".into(),
        "-o".into(),
        "IdentitiesOnly=yes".into(),
        "-F".into(),
        "/dev/null".into(),
    ]
}

fn run_ok(command: &mut Command) {
    let out = command.stdin(Stdio::null()).output().expect("spawn");
    assert!(
        out.status.success(),
        "{command:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn per_op(total: Duration, n: u32) -> Duration {
    total / n
}

fn ratio(ours: Duration, theirs: Duration) -> String {
    format!("{:.2}x", theirs.as_secs_f64() / ours.as_secs_f64())
}

#[tokio::main]
async fn main() {
    let fx = Fixture::new();
    let sshd = fx.sshd();
    let known_hosts = fx.path().join("known_hosts");
    std::fs::write(
        &known_hosts,
        format!(
            "{}\n",
            KnownHosts::known_hosts_line(
                &sshd.endpoint(),
                &clusterctl::ssh::keys::parse_public_key(&sshd.host_public_line()).expect("key")
            )
        ),
    )
    .expect("known_hosts");
    let client = fx.client(sshd.pinned());
    let target = fx.target(&sshd);
    let dest = format!("{}@127.0.0.1", fx.user);
    let base = ssh_base_args(&fx, &sshd, &known_hosts);

    println!(
        "SSH executor benchmark (loopback, OpenSSH sshd, {} cores, load average {})",
        num_cpus(),
        std::fs::read_to_string("/proc/loadavg")
            .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
            .unwrap_or_default()
    );
    println!("higher ratio = ours faster; ratio = openssh time / our time\n");

    // 1. Exec round trip on a reused connection.
    let session = client.connect(&target).await.expect("connect");
    for _ in 0..10 {
        session.run("true").await.expect("warm up");
    }
    let n = 100;
    let start = Instant::now();
    for _ in 0..n {
        session.run("true").await.expect("exec");
    }
    let ours_reused = per_op(start.elapsed(), n);

    let control = fx.path().join("cm.sock");
    let mut master = Command::new("ssh");
    master
        .args(&base)
        .args(["-o", "ControlMaster=yes", "-o", "ControlPersist=no"])
        .args(["-S", control.to_str().expect("utf-8"), "-N", &dest])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    let mut master = master.spawn().expect("ssh master");
    let wait = Instant::now();
    while !control.exists() && wait.elapsed() < Duration::from_secs(10) {
        std::thread::sleep(Duration::from_millis(20));
    }
    let mux = |count: u32| {
        let start = Instant::now();
        for _ in 0..count {
            run_ok(Command::new("ssh").args(&base).args([
                "-S",
                control.to_str().expect("utf-8"),
                &dest,
                "true",
            ]));
        }
        start.elapsed()
    };
    mux(5);
    let n_mux = 50;
    let openssh_mux = per_op(mux(n_mux), n_mux);
    let _ = master.kill();
    let _ = master.wait();

    // Fresh connection per command.
    let n_fresh = 10;
    let start = Instant::now();
    for _ in 0..n_fresh {
        let s = client.connect(&target).await.expect("connect");
        s.run("true").await.expect("exec");
        s.close().await;
    }
    let ours_fresh = per_op(start.elapsed(), n_fresh);
    let start = Instant::now();
    for _ in 0..n_fresh {
        run_ok(Command::new("ssh").args(&base).args([&dest, "true"]));
    }
    let openssh_fresh = per_op(start.elapsed(), n_fresh);

    println!("exec round trip (`true`):");
    println!(
        "  ours, reused connection        {:>9.2?}  (n={n})",
        ours_reused
    );
    println!(
        "  ssh + ControlMaster (mux)      {:>9.2?}  (n={n_mux})  ratio {}",
        openssh_mux,
        ratio(ours_reused, openssh_mux)
    );
    println!(
        "  ours, fresh connection each    {:>9.2?}  (n={n_fresh})",
        ours_fresh
    );
    println!(
        "  ssh, fresh connection each     {:>9.2?}  (n={n_fresh})  ratio {}",
        openssh_fresh,
        ratio(ours_fresh, openssh_fresh)
    );

    // 2. Upload throughput, 100 MiB of incompressible data.
    let local = fx.path().join("payload.bin");
    let size_mib = 100;
    {
        let mut data = vec![0u8; size_mib << 20];
        let mut state: u64 = 0x243F_6A88_85A3_08D3;
        for word in data.chunks_exact_mut(8) {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            word.copy_from_slice(&state.to_le_bytes());
        }
        std::fs::write(&local, &data).expect("payload");
    }
    let remote_dir = fx.path().join("remote");
    std::fs::create_dir_all(&remote_dir).expect("remote dir");
    let mib_s = |d: Duration| size_mib as f64 / d.as_secs_f64();
    let mut ours = Vec::new();
    let mut scp = Vec::new();
    let mut sftp = Vec::new();
    let mut scp_verified = Vec::new();
    for round in 0..2 {
        let remote = remote_dir.join(format!("ours-{round}.bin"));
        let start = Instant::now();
        session
            .upload_file(&local, remote.to_str().expect("utf-8"), 0o644)
            .await
            .expect("upload");
        ours.push(start.elapsed());

        let remote = remote_dir.join(format!("scp-{round}.bin"));
        let start = Instant::now();
        run_ok(
            Command::new("scp")
                .args(["-q", "-i"])
                .arg(&fx.client_key)
                .args(["-P", &sshd.port.to_string(), "-F", "/dev/null"])
                .args([
                    "-o",
                    &format!("UserKnownHostsFile={}", known_hosts.display()),
                ])
                .args(["-o", "BatchMode=yes"])
                .arg(&local)
                .arg(format!("{dest}:{}", remote.display())),
        );
        scp.push(start.elapsed());

        let remote = remote_dir.join(format!("sftp-{round}.bin"));
        let batch = fx.path().join("batch");
        std::fs::write(
            &batch,
            format!("put {} {}\n", local.display(), remote.display()),
        )
        .expect("batch");
        let start = Instant::now();
        run_ok(
            Command::new("sftp")
                .args(["-q", "-b"])
                .arg(&batch)
                .arg("-i")
                .arg(&fx.client_key)
                .args(["-P", &sshd.port.to_string(), "-F", "/dev/null"])
                .args([
                    "-o",
                    &format!("UserKnownHostsFile={}", known_hosts.display()),
                ])
                .arg(&dest),
        );
        sftp.push(start.elapsed());

        // scp followed by a remote sha256sum: an unoptimized verified upload with OpenSSH.
        let remote = remote_dir.join(format!("scpv-{round}.bin"));
        let start = Instant::now();
        run_ok(
            Command::new("scp")
                .args(["-q", "-i"])
                .arg(&fx.client_key)
                .args(["-P", &sshd.port.to_string(), "-F", "/dev/null"])
                .args([
                    "-o",
                    &format!("UserKnownHostsFile={}", known_hosts.display()),
                ])
                .args(["-o", "BatchMode=yes"])
                .arg(&local)
                .arg(format!("{dest}:{}", remote.display())),
        );
        run_ok(
            Command::new("ssh")
                .args(&base)
                .args([&dest, &format!("sha256sum {}", remote.display())]),
        );
        scp_verified.push(start.elapsed());
        for f in std::fs::read_dir(&remote_dir).expect("dir").flatten() {
            let _ = std::fs::remove_file(f.path());
        }
    }
    let best = |v: &Vec<Duration>| v.iter().copied().min().unwrap_or_default();
    // The skip path: same content already there.
    let remote = remote_dir.join("skip.bin");
    session
        .upload_file(&local, remote.to_str().expect("utf-8"), 0o644)
        .await
        .expect("upload");
    let start = Instant::now();
    session
        .upload_file(&local, remote.to_str().expect("utf-8"), 0o644)
        .await
        .expect("skip");
    let skip = start.elapsed();
    println!("\nupload of {size_mib} MiB (best of 2):");
    println!(
        "  ours (sha256 local + sftp + fsync + remote sha256sum + rename)  {:>8.2?}  {:>6.0} MiB/s",
        best(&ours),
        mib_s(best(&ours))
    );
    println!(
        "  scp (sftp protocol, no verification)                            {:>8.2?}  {:>6.0} MiB/s  ratio {}",
        best(&scp),
        mib_s(best(&scp)),
        ratio(best(&ours), best(&scp))
    );
    println!(
        "  sftp put (no verification)                                      {:>8.2?}  {:>6.0} MiB/s  ratio {}",
        best(&sftp),
        mib_s(best(&sftp)),
        ratio(best(&ours), best(&sftp))
    );
    println!(
        "  scp + ssh sha256sum (verified, not atomic)                      {:>8.2?}  {:>6.0} MiB/s  ratio {}",
        best(&scp_verified),
        mib_s(best(&scp_verified)),
        ratio(best(&ours), best(&scp_verified))
    );
    println!("  ours, unchanged file (checksum only, skipped)                   {skip:>8.2?}");
    session.close().await;
    drop(sshd);

    // 3. Twenty hosts.
    let servers: Vec<Sshd> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..20).map(|_| scope.spawn(|| fx.sshd())).collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("sshd"))
            .collect()
    });
    let mut known = KnownHosts::new();
    let mut known_lines = String::new();
    for s in &servers {
        known
            .pin_line(s.endpoint(), &s.host_public_line())
            .expect("pin");
        known_lines.push_str(&KnownHosts::known_hosts_line(
            &s.endpoint(),
            &clusterctl::ssh::keys::parse_public_key(&s.host_public_line()).expect("key"),
        ));
        known_lines.push('\n');
    }
    std::fs::write(&known_hosts, known_lines).expect("known_hosts");
    let client = fx.client(known);
    let targets: Vec<Target> = servers.iter().map(|s| fx.target(s)).collect();
    let mut ours = Vec::new();
    let mut theirs = Vec::new();
    for _ in 0..2 {
        let start = Instant::now();
        let results = client.run_on_all(&targets, "uname -n", 20).await;
        ours.push(start.elapsed());
        assert!(
            results
                .iter()
                .all(|r| r.result.as_ref().is_ok_and(|o| o.success()))
        );

        let start = Instant::now();
        let children: Vec<_> = servers
            .iter()
            .map(|s| {
                Command::new("ssh")
                    .args(ssh_base_args(&fx, s, &known_hosts))
                    .args([&dest, "uname -n"])
                    .stdin(Stdio::null())
                    .stdout(Stdio::null())
                    .stderr(Stdio::piped())
                    .spawn()
                    .expect("ssh")
            })
            .collect();
        for child in children {
            let out = child.wait_with_output().expect("wait");
            assert!(
                out.status.success(),
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        theirs.push(start.elapsed());
    }
    println!("\n20 hosts (20 sshd processes), connect + `uname -n` + disconnect, best of 2:");
    println!(
        "  ours, run_on_all(max_parallel=20)   {:>8.2?}",
        best(&ours)
    );
    println!(
        "  20 parallel ssh processes           {:>8.2?}  ratio {}",
        best(&theirs),
        ratio(best(&ours), best(&theirs))
    );
}

fn num_cpus() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
}
