//! A real etcd + kube-apiserver from the offline Kubernetes bundle on 127.0.0.1, with
//! certificates from `clusterctl::pki` (the flags of `bundle_control_plane.rs`, which proves
//! them). Every process is killed by PID on drop.
//!
//! Heavy: selected by `CLUSTERCTL_BUNDLE_TEST=1`; the bundle is `$CLUSTERCTL_BUNDLE`, else what
//! `tests/bed/build-k8s-bundle.sh` prints.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use std::collections::BTreeMap;

use clusterctl::bundle::Bundle;
use clusterctl::pki::{NodeIdentity, Pki, PkiSpec};

/// Whether the heavy bundle tests are selected (says so on stderr if not).
pub fn selected() -> bool {
    if std::env::var("CLUSTERCTL_BUNDLE_TEST").as_deref() == Ok("1") {
        return true;
    }
    eprintln!("CLUSTERCTL_BUNDLE_TEST is not 1: bundle tests not selected");
    false
}

/// The bundle directory: `$CLUSTERCTL_BUNDLE`, else built (or found cached) by the script.
pub fn bundle_path() -> PathBuf {
    if let Ok(path) = std::env::var("CLUSTERCTL_BUNDLE") {
        return PathBuf::from(path);
    }
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/bed/build-k8s-bundle.sh");
    let out = Command::new("bash")
        .arg(&script)
        .stderr(Stdio::inherit())
        .output()
        .expect("bash runs");
    assert!(out.status.success(), "{} failed", script.display());
    PathBuf::from(String::from_utf8(out.stdout).expect("utf-8 path").trim())
}

/// A port that was free a moment ago on 127.0.0.1.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("bind 127.0.0.1:0")
        .port()
}

/// Processes started by the test, killed by PID on drop (TERM, then KILL after 5 s).
#[derive(Default)]
pub struct Procs {
    children: Vec<(String, Child, PathBuf)>,
}

impl Procs {
    pub fn spawn(&mut self, name: &str, cmd: &mut Command, log: PathBuf) {
        let file = std::fs::File::create(&log).expect("log file");
        let err = file.try_clone().expect("log file");
        let child = cmd
            .stdout(file)
            .stderr(err)
            .stdin(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        eprintln!("started {name} pid {}", child.id());
        self.children.push((name.to_string(), child, log));
    }

    /// Panics with the process's log tail if it has exited.
    pub fn check_alive(&mut self) {
        for (name, child, log) in &mut self.children {
            if let Ok(Some(status)) = child.try_wait() {
                panic!("{name} exited with {status}:\n{}", tail(log));
            }
        }
    }
}

impl Drop for Procs {
    fn drop(&mut self) {
        for (name, child, log) in self.children.iter_mut().rev() {
            if std::thread::panicking() {
                eprintln!("--- {name} log tail ---\n{}", tail(log));
            }
            // SIGTERM to exactly this PID through the `kill` command (the workspace denies the
            // `unsafe` that libc::kill needs; Child::kill would send SIGKILL at once).
            let _ = Command::new("kill")
                .arg("-TERM")
                .arg(child.id().to_string())
                .status();
            let deadline = Instant::now() + Duration::from_secs(5);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = child.try_wait() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            if let Ok(None) = child.try_wait() {
                let _ = child.kill();
            }
            let _ = child.wait();
        }
    }
}

pub fn tail(log: &Path) -> String {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let lines: Vec<_> = text.lines().collect();
    lines[lines.len().saturating_sub(40)..].join("\n")
}

/// etcd and kube-apiserver for one test.
pub struct ControlPlane {
    pub procs: Procs,
    pub pki: Pki,
    pub pki_dir: PathBuf,
    pub api_port: u16,
    /// etcd's client URL (`https://127.0.0.1:PORT`).
    pub etcd_url: String,
    /// Binaries from the verified bundle, by name.
    pub bins: BTreeMap<String, PathBuf>,
    /// The bundle's Kubernetes version, e.g. `1.20.2`.
    pub version: String,
    pub dir: PathBuf,
}

impl ControlPlane {
    /// Opens and verifies the bundle, makes a PKI for one control plane `cp-1` at 127.0.0.1
    /// under `dir`, and starts etcd and kube-apiserver (the API server is not awaited).
    pub fn start(dir: &Path) -> ControlPlane {
        let bundle = Bundle::open(&bundle_path()).expect("bundle opens");
        bundle.check_supported().expect("bundle version supported");
        let verified = bundle.verify().expect("bundle verifies");
        let bins = [
            "etcd",
            "etcdctl",
            "kube-apiserver",
            "kube-controller-manager",
            "kubectl",
        ]
        .iter()
        .map(|name| {
            let path = verified
                .binary(name)
                .unwrap_or_else(|| panic!("{name} in bundle"));
            (name.to_string(), path)
        })
        .collect();
        let version = verified.manifest().kubernetes_version.to_string();
        let pki_dir = dir.join("pki");
        let spec = PkiSpec {
            cluster_name: "kube-proof".to_string(),
            cluster_domain: "cluster.local".to_string(),
            service_cidr: "10.96.0.0/12".parse().expect("cidr"),
            control_plane: vec![NodeIdentity {
                name: "cp-1".to_string(),
                addresses: vec!["127.0.0.1".parse().expect("ip")],
            }],
            workers: vec![],
            extra_api_server_sans: vec![],
        };
        let (pki, _) = Pki::ensure(&pki_dir, &spec).expect("pki");
        let mut cp = ControlPlane {
            procs: Procs::default(),
            pki,
            pki_dir,
            api_port: free_port(),
            etcd_url: format!("https://127.0.0.1:{}", free_port()),
            bins,
            version,
            dir: dir.to_path_buf(),
        };
        cp.start_etcd_and_apiserver();
        cp
    }

    pub fn bin(&self, name: &str) -> PathBuf {
        self.bins
            .get(name)
            .unwrap_or_else(|| panic!("{name} in bundle"))
            .clone()
    }

    pub fn p(&self, file: &str) -> String {
        self.pki_dir.join(file).to_str().expect("utf-8").to_string()
    }

    fn start_etcd_and_apiserver(&mut self) {
        let peer_port = free_port();
        let etcd_url = self.etcd_url.clone();
        let peer_url = format!("https://127.0.0.1:{peer_port}");
        let p = |f: &str| self.p(f);
        let mut etcd = Command::new(self.bin("etcd"));
        etcd.args([
            "--name=cp-1",
            &format!("--data-dir={}", self.dir.join("etcd-data").display()),
            &format!("--listen-client-urls={etcd_url}"),
            &format!("--advertise-client-urls={etcd_url}"),
            &format!("--listen-peer-urls={peer_url}"),
            &format!("--initial-advertise-peer-urls={peer_url}"),
            &format!("--initial-cluster=cp-1={peer_url}"),
            "--initial-cluster-state=new",
            "--client-cert-auth=true",
            &format!("--trusted-ca-file={}", p("etcd/ca.crt")),
            &format!("--cert-file={}", p("etcd/server-cp-1.crt")),
            &format!("--key-file={}", p("etcd/server-cp-1.key")),
            "--peer-client-cert-auth=true",
            &format!("--peer-trusted-ca-file={}", p("etcd/ca.crt")),
            &format!("--peer-cert-file={}", p("etcd/peer-cp-1.crt")),
            &format!("--peer-key-file={}", p("etcd/peer-cp-1.key")),
        ]);
        let mut api = Command::new(self.bin("kube-apiserver"));
        api.args([
            "--advertise-address=127.0.0.1",
            "--bind-address=127.0.0.1",
            &format!("--secure-port={}", self.api_port),
            "--insecure-port=0",
            &format!("--etcd-servers={etcd_url}"),
            &format!("--etcd-cafile={}", p("etcd/ca.crt")),
            &format!("--etcd-certfile={}", p("apiserver-etcd-client.crt")),
            &format!("--etcd-keyfile={}", p("apiserver-etcd-client.key")),
            &format!("--client-ca-file={}", p("ca.crt")),
            &format!("--tls-cert-file={}", p("apiserver.crt")),
            &format!("--tls-private-key-file={}", p("apiserver.key")),
            &format!(
                "--kubelet-client-certificate={}",
                p("apiserver-kubelet-client.crt")
            ),
            &format!("--kubelet-client-key={}", p("apiserver-kubelet-client.key")),
            &format!("--service-account-key-file={}", p("sa.pub")),
            &format!("--service-account-signing-key-file={}", p("sa.key")),
            "--service-account-issuer=https://kubernetes.default.svc.cluster.local",
            "--service-cluster-ip-range=10.96.0.0/12",
            "--authorization-mode=Node,RBAC",
            "--enable-admission-plugins=NodeRestriction",
            &format!("--requestheader-client-ca-file={}", p("front-proxy-ca.crt")),
            &format!("--proxy-client-cert-file={}", p("front-proxy-client.crt")),
            &format!("--proxy-client-key-file={}", p("front-proxy-client.key")),
            "--requestheader-allowed-names=front-proxy-client",
            "--requestheader-username-headers=X-Remote-User",
            "--requestheader-group-headers=X-Remote-Group",
            "--requestheader-extra-headers-prefix=X-Remote-Extra-",
            &format!("--cert-dir={}", self.dir.join("apiserver-certs").display()),
        ]);
        let etcd_log = self.dir.join("etcd.log");
        let api_log = self.dir.join("kube-apiserver.log");
        self.procs.spawn("etcd", &mut etcd, etcd_log);
        self.procs.spawn("kube-apiserver", &mut api, api_log);
    }
}
