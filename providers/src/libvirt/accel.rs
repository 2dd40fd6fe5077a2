//! Choosing the accelerator: KVM where it really boots a guest, QEMU's TCG otherwise.
//!
//! `/dev/kvm` existing proves nothing: on some hosts (nested, paravirtual KVM) a normal guest
//! kernel dies with "emulation failure" or hangs. `auto` therefore boots the image's own kernel
//! once with KVM, without disks or network and with `panic=1 root=/dev/nonexistent`, and watches
//! the serial console: a kernel that gets as far as failing to mount its root has proven that KVM
//! runs it. The probe domain is transient and destroys itself on the panic's reboot; the verdict
//! is cached per libvirt host so the probe runs once.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use templates::libvirt::{ClusterLabel, DomainAccel, DomainXml};
use virt::connect::Connect;
use virt::domain::Domain;
use virt::stream::Stream;

/// Accelerator requested by the cluster spec or `CLUSTERCTL_ACCELERATOR`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Accelerator {
    /// Hardware virtualization; fails where the host has none.
    Kvm,
    /// Software emulation; works everywhere, slowly.
    Tcg,
    /// KVM if a probe guest boots with it on this host, TCG otherwise.
    Auto,
}

impl std::str::FromStr for Accelerator {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim().to_ascii_lowercase().as_str() {
            "kvm" => Ok(Self::Kvm),
            "tcg" | "qemu" => Ok(Self::Tcg),
            "auto" => Ok(Self::Auto),
            other => Err(format!(
                "unknown accelerator {other:?}; use kvm, tcg or auto"
            )),
        }
    }
}

/// Environment variable that overrides the configured accelerator.
pub const ACCELERATOR_ENV: &str = "CLUSTERCTL_ACCELERATOR";

/// Applies the environment override.
pub(crate) fn requested(configured: Accelerator) -> Result<Accelerator, String> {
    match std::env::var(ACCELERATOR_ENV) {
        Ok(v) if !v.trim().is_empty() => v.parse().map_err(|e| format!("{ACCELERATOR_ENV}: {e}")),
        _ => Ok(configured),
    }
}

/// Result of a KVM probe, as cached on disk.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ProbeVerdict {
    /// Whether KVM booted the probe kernel.
    pub kvm_works: bool,
    /// How long the probe took, in milliseconds.
    pub probe_ms: u64,
    /// What was observed (last console line or the error).
    pub detail: String,
    /// The libvirt host the verdict is for.
    pub host: String,
}

/// Console lines that prove the kernel initialised fully under KVM.
const PROGRESS_MARKERS: &[&str] = &[
    "VFS: Unable to mount root",
    "VFS: Cannot open root device",
    "Kernel panic",
    "Run /init",
    "Freeing unused kernel",
];

/// Cache file for one libvirt host.
pub(crate) fn cache_file(cache_dir: &Path, uri: &str, hostname: &str) -> PathBuf {
    use sha2::{Digest, Sha256};
    let key: String = Sha256::digest(format!("{uri}\n{hostname}").as_bytes())
        .iter()
        .take(8)
        .map(|b| format!("{b:02x}"))
        .collect();
    cache_dir.join(format!("kvm-probe-{key}.json"))
}

pub(crate) fn read_cache(path: &Path) -> Option<ProbeVerdict> {
    serde_json::from_slice(&std::fs::read(path).ok()?).ok()
}

pub(crate) fn write_cache(path: &Path, verdict: &ProbeVerdict) {
    let Ok(bytes) = serde_json::to_vec_pretty(verdict) else {
        return;
    };
    if let Some(dir) = path.parent() {
        let _ = std::fs::create_dir_all(dir);
    }
    let tmp = path.with_extension("json.tmp");
    if std::fs::write(&tmp, bytes).is_ok() {
        let _ = std::fs::rename(&tmp, path);
    }
}

/// Boots `kernel` (a path on the libvirt host) with KVM for at most `timeout` and reports whether
/// it reached a progress marker on the serial console.
pub(crate) fn probe(
    conn: &Connect,
    kernel: &str,
    label: ClusterLabel,
    timeout: Duration,
) -> ProbeVerdict {
    let started = Instant::now();
    let host = conn.hostname().unwrap_or_default();
    let name = format!("clusterctl-kvm-probe-{}", std::process::id());
    let xml = DomainXml {
        uuid: None,
        name: name.clone(),
        accel: DomainAccel::Kvm,
        vcpus: 1,
        memory_mib: 256,
        kernel: kernel.to_string(),
        initrd: None,
        cmdline: "console=ttyS0 panic=1 root=/dev/nonexistent".into(),
        disks: vec![],
        network: None,
        mac: None,
        console_log: None,
        on_reboot: "destroy",
        label,
    }
    .render();
    let verdict = |ok: bool, detail: String| ProbeVerdict {
        kvm_works: ok,
        probe_ms: started.elapsed().as_millis() as u64,
        detail,
        host: host.clone(),
    };
    let dom = match conn.create_domain_xml(&xml, virt::sys::VIR_DOMAIN_START_PAUSED) {
        Ok(d) => d,
        Err(e) => {
            return verdict(
                false,
                format!("starting a kvm guest failed: {}", e.message()),
            );
        }
    };
    let result = watch_console(conn, &dom, timeout);
    // Transient: destroying it removes it. It may already be gone after its panic reboot.
    let _ = dom.destroy();
    match result {
        Ok(line) => verdict(true, line),
        Err(detail) => verdict(false, detail),
    }
}

fn watch_console(conn: &Connect, dom: &Domain, timeout: Duration) -> Result<String, String> {
    let stream = Stream::new(conn, virt::sys::VIR_STREAM_NONBLOCK)
        .map_err(|e| format!("opening a stream: {}", e.message()))?;
    dom.open_console(None, &stream, 0)
        .map_err(|e| format!("opening the probe console: {}", e.message()))?;
    dom.resume()
        .map_err(|e| format!("resuming the probe: {}", e.message()))?;
    let deadline = Instant::now() + timeout;
    let mut output = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match stream.recv(&mut buf) {
            Ok(n) if n > 0 => {
                output.extend_from_slice(&buf[..n as usize]);
                let text = String::from_utf8_lossy(&output);
                if let Some(line) = text
                    .lines()
                    .find(|l| PROGRESS_MARKERS.iter().any(|m| l.contains(m)))
                {
                    let line = line.trim().to_string();
                    let _ = stream.abort();
                    return Ok(line);
                }
            }
            // -2: no data yet on a non-blocking stream.
            Ok(-2) => std::thread::sleep(Duration::from_millis(100)),
            Ok(_) => {
                return Err(format!(
                    "the guest stopped before booting: {}",
                    last_line(&output)
                ));
            }
            Err(e) => {
                return Err(format!(
                    "the console failed: {}; last output: {}",
                    e.message(),
                    last_line(&output)
                ));
            }
        }
        if Instant::now() > deadline {
            let _ = stream.abort();
            return Err(format!(
                "no boot progress within {} s; last output: {}",
                timeout.as_secs(),
                last_line(&output)
            ));
        }
        // KVM's "emulation failure" pauses or kills the guest: no need to wait for the timeout.
        match dom.state() {
            Ok((
                virt::enumutil::Enum::Known(
                    virt::domain::DomainState::Running | virt::domain::DomainState::Blocked,
                ),
                _,
            )) => {}
            Ok((state, reason)) => {
                return Err(format!(
                    "the guest stopped ({state:?}, {reason:?}); last output: {}",
                    last_line(&output)
                ));
            }
            Err(e) => {
                return Err(format!(
                    "the guest is gone ({}); last output: {}",
                    e.message(),
                    last_line(&output)
                ));
            }
        }
    }
}

fn last_line(output: &[u8]) -> String {
    let text = String::from_utf8_lossy(output);
    let line = text
        .lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .unwrap_or("(none)")
        .trim();
    line.chars().take(200).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_accelerators() {
        assert_eq!("KVM".parse::<Accelerator>(), Ok(Accelerator::Kvm));
        assert_eq!("tcg".parse::<Accelerator>(), Ok(Accelerator::Tcg));
        assert_eq!("auto".parse::<Accelerator>(), Ok(Accelerator::Auto));
        assert!(
            "xen"
                .parse::<Accelerator>()
                .expect_err("unknown")
                .contains("kvm, tcg or auto")
        );
    }

    #[test]
    fn cache_round_trip() {
        let d = tempfile::tempdir().expect("tempdir");
        let p = cache_file(d.path(), "qemu:///system", "host1");
        assert_ne!(p, cache_file(d.path(), "qemu:///system", "host2"));
        assert!(read_cache(&p).is_none());
        let v = ProbeVerdict {
            kvm_works: false,
            probe_ms: 12,
            detail: "x".into(),
            host: "host1".into(),
        };
        write_cache(&p, &v);
        assert_eq!(read_cache(&p), Some(v));
    }
}
