//! What the VM boot tests share: a QEMU process owned by the test (killed when dropped, also
//! when a check fails) with its serial console in a file, and small helpers.

#![allow(dead_code)]

use std::fs;
use std::io::Read;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

// Generous: TCG on a shared 2-core machine has been seen at 200 s to a login prompt.
pub const MARKER_TIMEOUT: Duration = Duration::from_secs(600);

/// Whether the VM tests are selected (`CLUSTERCTL_IMAGE_TEST=1`).
pub fn enabled() -> bool {
    std::env::var("CLUSTERCTL_IMAGE_TEST").is_ok_and(|v| v == "1")
}

/// Kills the QEMU process it owns when dropped, also when a check fails.
pub struct Vm {
    child: Child,
    console: PathBuf,
    /// When it was started.
    pub started: Instant,
}

impl Drop for Vm {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Vm {
    /// Starts `cmd` (a qemu-system-x86_64 command whose serial console goes to `console`).
    pub fn spawn(cmd: &mut Command, console: PathBuf) -> Vm {
        let child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .spawn()
            .expect("start qemu-system-x86_64");
        Vm {
            child,
            console,
            started: Instant::now(),
        }
    }

    /// The serial console so far.
    pub fn log(&self) -> String {
        let mut b = Vec::new();
        if let Ok(mut f) = fs::File::open(&self.console) {
            let _ = f.read_to_end(&mut b);
        }
        String::from_utf8_lossy(&b).into_owned()
    }

    /// Waits for `marker` on the serial console; returns the seconds since start.
    pub fn wait_for(&mut self, marker: &str) -> f64 {
        loop {
            if self.log().contains(marker) {
                return self.started.elapsed().as_secs_f64();
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                if self.log().contains(marker) {
                    return self.started.elapsed().as_secs_f64();
                }
                panic!(
                    "qemu exited ({status}) before {marker:?}; console:\n{}",
                    tail(&self.log())
                );
            }
            if self.started.elapsed() > MARKER_TIMEOUT {
                panic!(
                    "no {marker:?} on the console after {MARKER_TIMEOUT:?}; console:\n{}",
                    tail(&self.log())
                );
            }
            std::thread::sleep(Duration::from_millis(250));
        }
    }
}

/// The last 60 lines.
pub fn tail(s: &str) -> String {
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(60)..].join("\n")
}

/// Runs a command that must succeed; its stdout.
pub fn run(cmd: &mut Command) -> String {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("running {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A free TCP port on 127.0.0.1.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

/// Runs a command on the VM as `core`, checking the host key against the pinned one.
pub fn ssh(port: u16, key: &Path, known_hosts: &Path, command: &str) -> std::process::Output {
    Command::new("ssh")
        .args([
            "-F",
            "/dev/null",
            "-o",
            "BatchMode=yes",
            "-o",
            "StrictHostKeyChecking=yes",
            "-o",
            "ConnectTimeout=20",
        ])
        .arg("-o")
        .arg(format!("UserKnownHostsFile={}", known_hosts.display()))
        .arg("-i")
        .arg(key)
        .args(["-p", &port.to_string(), "core@127.0.0.1", command])
        .output()
        .expect("run ssh")
}
