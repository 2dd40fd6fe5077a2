//! Tests of bundle opening and verification on real files, and of upstream downloads against a
//! real HTTP server on 127.0.0.1.

use std::collections::HashMap;
use std::io::Write;
use std::path::Path;
use std::sync::Arc;

use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::manifest::REQUIRED_BINARIES;
use super::upstream::{ChecksumSource, UpstreamError, UpstreamSource, parse_checksum};
use super::*;

fn sha(data: &[u8]) -> String {
    hex::encode(Sha256::digest(data))
}

/// Writes a small but complete bundle directory; returns the manifest JSON it wrote.
fn write_bundle(root: &Path, version: &str) -> serde_json::Value {
    std::fs::create_dir_all(root.join("bin")).unwrap();
    std::fs::create_dir_all(root.join("images")).unwrap();
    let mut files = Vec::new();
    let mut add = |path: String, content: Vec<u8>| {
        std::fs::write(root.join(&path), &content).unwrap();
        files.push(
            serde_json::json!({"path": path, "sha256": sha(&content), "size": content.len()}),
        );
    };
    for bin in REQUIRED_BINARIES {
        add(
            format!("bin/{bin}"),
            format!("#!/bin/sh\necho {bin}\n").into_bytes(),
        );
    }
    add("images/pause.tar".to_string(), vec![7u8; 4096]);
    let manifest = serde_json::json!({
        "formatVersion": 1,
        "kubernetesVersion": version,
        "etcdVersion": "3.4.23",
        "pauseImage": "localhost/clusterctl/pause:3.4",
        "images": [{"reference": "localhost/clusterctl/pause:3.4", "path": "images/pause.tar"}],
        "files": files,
    });
    std::fs::write(
        root.join(MANIFEST_FILE),
        serde_json::to_vec_pretty(&manifest).unwrap(),
    )
    .unwrap();
    manifest
}

#[test]
fn a_complete_bundle_opens_and_verifies() {
    let dir = tempfile::tempdir().unwrap();
    write_bundle(dir.path(), "1.20.2");
    let bundle = Bundle::open(dir.path()).unwrap();
    assert_eq!(bundle.check_supported().unwrap().minor, 20);
    let verified = bundle.verify().unwrap();
    assert_eq!(
        verified.binary("kubelet").unwrap(),
        dir.path().join("bin/kubelet")
    );
    assert!(verified.binary("not-there").is_none());
    assert_eq!(verified.files().count(), REQUIRED_BINARIES.len() + 1);
    assert_eq!(
        verified.images().next().unwrap().1,
        dir.path().join("images/pause.tar")
    );
}

#[test]
fn a_wrong_checksum_is_refused_and_names_the_file() {
    let dir = tempfile::tempdir().unwrap();
    write_bundle(dir.path(), "1.20.2");
    // Same size, different content: only the checksum can catch it.
    std::fs::write(dir.path().join("images/pause.tar"), vec![8u8; 4096]).unwrap();
    let bundle = Bundle::open(dir.path()).unwrap();
    let err = bundle.verify().unwrap_err();
    match &err {
        BundleError::ChecksumMismatch { path, actual, .. } => {
            assert_eq!(path, "images/pause.tar");
            assert_eq!(*actual, sha(&[8u8; 4096]));
        }
        other => panic!("expected a checksum mismatch, got {other}"),
    }
    assert!(
        err.to_string()
            .starts_with("bundle file images/pause.tar has sha256 "),
        "{err}"
    );
}

#[test]
fn a_missing_file_is_refused_and_named() {
    let dir = tempfile::tempdir().unwrap();
    write_bundle(dir.path(), "1.20.2");
    std::fs::remove_file(dir.path().join("bin/etcd")).unwrap();
    let err = Bundle::open(dir.path()).unwrap().verify().unwrap_err();
    assert!(
        matches!(&err, BundleError::MissingFile { path, .. } if path == "bin/etcd"),
        "{err}"
    );
    assert!(
        err.to_string().contains("bundle file bin/etcd is missing"),
        "{err}"
    );
}

#[test]
fn a_truncated_file_is_refused_by_size() {
    let dir = tempfile::tempdir().unwrap();
    write_bundle(dir.path(), "1.20.2");
    std::fs::write(dir.path().join("images/pause.tar"), vec![7u8; 100]).unwrap();
    let err = Bundle::open(dir.path()).unwrap().verify().unwrap_err();
    assert!(
        matches!(&err, BundleError::SizeMismatch { path, expected: 4096, actual: 100 } if path == "images/pause.tar"),
        "{err}"
    );
}

#[test]
fn a_symlinked_file_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    write_bundle(dir.path(), "1.20.2");
    let kubelet = dir.path().join("bin/kubelet");
    let elsewhere = dir.path().join("elsewhere");
    std::fs::rename(&kubelet, &elsewhere).unwrap();
    std::os::unix::fs::symlink(&elsewhere, &kubelet).unwrap();
    let err = Bundle::open(dir.path()).unwrap().verify().unwrap_err();
    assert!(
        matches!(&err, BundleError::NotARegularFile { path, .. } if path == "bin/kubelet"),
        "{err}"
    );
}

#[test]
fn a_truncated_manifest_is_refused_with_its_path() {
    let dir = tempfile::tempdir().unwrap();
    write_bundle(dir.path(), "1.20.2");
    let path = dir.path().join(MANIFEST_FILE);
    let text = std::fs::read(&path).unwrap();
    std::fs::write(&path, &text[..text.len() - 40]).unwrap();
    let err = Bundle::open(dir.path()).unwrap_err();
    assert!(matches!(err, BundleError::ParseManifest { .. }), "{err}");
    assert!(
        err.to_string().contains(&path.display().to_string()),
        "{err}"
    );
}

#[test]
fn a_directory_without_manifest_or_a_plain_file_is_not_a_bundle() {
    let dir = tempfile::tempdir().unwrap();
    assert!(matches!(
        Bundle::open(dir.path()).unwrap_err(),
        BundleError::NoManifest { .. }
    ));
    let file = dir.path().join("x.txt");
    std::fs::write(&file, "x").unwrap();
    assert!(matches!(
        Bundle::open(&file).unwrap_err(),
        BundleError::NotABundle { .. }
    ));
    assert!(matches!(
        Bundle::open(&dir.path().join("absent")).unwrap_err(),
        BundleError::NotABundle { .. }
    ));
}

#[test]
fn an_unsupported_version_is_refused_clearly() {
    let dir = tempfile::tempdir().unwrap();
    write_bundle(dir.path(), "1.25.0");
    let bundle = Bundle::open(dir.path()).unwrap();
    let err = bundle.check_supported().unwrap_err();
    assert_eq!(
        err.to_string(),
        "kubernetes 1.25.0 is not supported: this clusterctl supports 1.20; choose a supported version or upgrade \
         clusterctl"
    );
    assert!(matches!(
        UpstreamSource::new("1.19.1".parse().unwrap()),
        Err(BundleError::UnsupportedVersion { .. })
    ));
}

fn tar_gz(dir: &Path, name: &str, entries: &[(&str, &[u8], u32)]) -> std::path::PathBuf {
    let path = dir.join(name);
    let file = std::fs::File::create(&path).unwrap();
    let mut builder = tar::Builder::new(flate2::write::GzEncoder::new(
        file,
        flate2::Compression::fast(),
    ));
    for (name, data, mode) in entries {
        let mut header = tar::Header::new_gnu();
        header.set_size(data.len() as u64);
        header.set_mode(*mode);
        header.set_entry_type(tar::EntryType::Regular);
        // set_path refuses "..", so write the raw name for hostile-archive tests.
        let raw = &mut header.as_old_mut().name;
        raw[..name.len()].copy_from_slice(name.as_bytes());
        header.set_cksum();
        builder.append(&header, *data).unwrap();
    }
    builder
        .into_inner()
        .unwrap()
        .finish()
        .unwrap()
        .flush()
        .unwrap();
    path
}

#[test]
fn a_tarball_with_a_top_directory_opens_verifies_and_keeps_modes() {
    let src = tempfile::tempdir().unwrap();
    write_bundle(&src.path().join("bundle-1.20.2"), "1.20.2");
    let out = tempfile::tempdir().unwrap();
    let archive = out.path().join("b.tar.gz");
    let status = std::process::Command::new("tar")
        .arg("-czf")
        .arg(&archive)
        .arg("-C")
        .arg(src.path())
        .arg("bundle-1.20.2")
        .status()
        .unwrap();
    assert!(status.success());
    let bundle = Bundle::open(&archive).unwrap();
    let root = bundle.root().to_path_buf();
    assert!(root.ends_with("bundle-1.20.2"), "{}", root.display());
    bundle.verify().unwrap();
    drop(bundle);
    assert!(
        !root.exists(),
        "the unpacked copy is removed with the bundle"
    );
}

#[test]
fn a_tarball_escaping_its_directory_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let archive = tar_gz(dir.path(), "evil.tgz", &[("../escaped", b"x", 0o644)]);
    let err = Bundle::open(&archive).unwrap_err();
    assert!(
        matches!(&err, BundleError::UnsafeArchiveEntry { entry, .. } if entry == "../escaped"),
        "{err}"
    );
    assert!(!dir.path().parent().unwrap().join("escaped").exists());
}

#[test]
fn a_corrupt_tarball_is_an_archive_error() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("broken.tar.gz");
    std::fs::write(&path, b"\x1f\x8b\x08\x00garbage").unwrap();
    assert!(matches!(
        Bundle::open(&path).unwrap_err(),
        BundleError::Archive { .. }
    ));
}

#[test]
fn checksum_files_parse_like_dl_k8s_io_and_sha256sums() {
    let d = "ab".repeat(32);
    let digest = ChecksumSource::DigestFile {
        url: "https://x/kubelet.sha256".into(),
    };
    assert_eq!(
        parse_checksum(&digest, &format!("{d}\n")).as_deref(),
        Some(d.as_str())
    );
    assert_eq!(
        parse_checksum(&digest, &format!("{}  kubelet\n", d.to_uppercase())).as_deref(),
        Some(d.as_str())
    );
    assert_eq!(parse_checksum(&digest, "not-a-digest"), None);
    assert_eq!(parse_checksum(&digest, ""), None);
    let sums = ChecksumSource::SumsFile {
        url: "https://x/SHA256SUMS".into(),
        name: "etcd.tar.gz".into(),
    };
    let body = format!("{}  etcd-other.tar.gz\n{d} *etcd.tar.gz\n", "cd".repeat(32));
    assert_eq!(parse_checksum(&sums, &body).as_deref(), Some(d.as_str()));
    assert_eq!(parse_checksum(&sums, &format!("{d}  other\n")), None);
}

#[test]
fn the_plan_uses_official_release_urls() {
    let plan = UpstreamSource::new("1.20.2".parse().unwrap())
        .unwrap()
        .plan();
    let first = &plan.downloads[0];
    assert_eq!(
        first.url,
        "https://dl.k8s.io/release/v1.20.2/bin/linux/amd64/kube-apiserver"
    );
    assert_eq!(
        first.checksum,
        ChecksumSource::DigestFile {
            url: "https://dl.k8s.io/release/v1.20.2/bin/linux/amd64/kube-apiserver.sha256".into()
        }
    );
    let etcd = plan.downloads.last().unwrap();
    assert_eq!(
        etcd.url,
        "https://github.com/etcd-io/etcd/releases/download/v3.4.13/etcd-v3.4.13-linux-amd64.tar.gz"
    );
    assert_eq!(
        etcd.checksum,
        ChecksumSource::SumsFile {
            url: "https://github.com/etcd-io/etcd/releases/download/v3.4.13/SHA256SUMS".into(),
            name: "etcd-v3.4.13-linux-amd64.tar.gz".into()
        }
    );
    assert_eq!(plan.pause_image, "registry.k8s.io/pause:3.2");
    assert_eq!(
        plan.images,
        vec![
            (
                "registry.k8s.io/pause:3.2".to_owned(),
                "images/pause-3.2.tar".to_owned()
            ),
            (
                "registry.k8s.io/coredns:1.7.0".to_owned(),
                "images/coredns-1.7.0.tar".to_owned()
            ),
        ]
    );
}

/// A minimal HTTP/1.1 file server on 127.0.0.1 for the download tests; stops when dropped.
struct FileServer {
    base: String,
    hits: Arc<std::sync::Mutex<Vec<String>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for FileServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn serve(files: HashMap<String, Vec<u8>>) -> FileServer {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let files = Arc::new(files);
    let hits = Arc::new(std::sync::Mutex::new(Vec::new()));
    let hits2 = hits.clone();
    let task = tokio::spawn(async move {
        loop {
            let Ok((mut conn, _)) = listener.accept().await else {
                return;
            };
            let files = files.clone();
            let hits = hits2.clone();
            tokio::spawn(async move {
                let mut req = Vec::new();
                let mut buf = [0u8; 1024];
                while !req.windows(4).any(|w| w == b"\r\n\r\n") {
                    match conn.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => req.extend_from_slice(&buf[..n]),
                    }
                }
                let head = String::from_utf8_lossy(&req).into_owned();
                let path = head.split_whitespace().nth(1).unwrap_or("/").to_string();
                hits.lock().unwrap().push(path.clone());
                let (status, body) = match files.get(&path) {
                    Some(body) => ("200 OK", body.clone()),
                    None => ("404 Not Found", b"not found".to_vec()),
                };
                let header = format!(
                    "HTTP/1.1 {status}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                    body.len()
                );
                let _ = conn.write_all(header.as_bytes()).await;
                let _ = conn.write_all(&body).await;
                let _ = conn.shutdown().await;
            });
        }
    });
    FileServer { base, hits, task }
}

/// The files of a fake upstream release (1.20.2 binaries and the etcd 3.4.13 tarball) with their
/// published checksums, at the paths the real release servers use.
fn release_files(tmp: &Path) -> HashMap<String, Vec<u8>> {
    let mut files = HashMap::new();
    for bin in super::upstream::KUBERNETES_BINARIES {
        let body = format!("binary {bin}\n").into_bytes();
        files.insert(
            format!("/k8s/v1.20.2/bin/linux/amd64/{bin}.sha256"),
            sha(&body).into_bytes(),
        );
        files.insert(format!("/k8s/v1.20.2/bin/linux/amd64/{bin}"), body);
    }
    let tarball = tar_gz(
        tmp,
        "etcd.tar.gz",
        &[
            ("etcd-v3.4.13-linux-amd64/README.md", b"readme", 0o644),
            ("etcd-v3.4.13-linux-amd64/etcd", b"etcd binary", 0o755),
            ("etcd-v3.4.13-linux-amd64/etcdctl", b"etcdctl binary", 0o755),
        ],
    );
    let tarball = std::fs::read(tarball).unwrap();
    let sums = format!(
        "{}  etcd-v3.4.13-darwin-amd64.zip\n{}  etcd-v3.4.13-linux-amd64.tar.gz\n",
        "0".repeat(64),
        sha(&tarball)
    );
    files.insert("/etcd/v3.4.13/SHA256SUMS".to_string(), sums.into_bytes());
    files.insert(
        "/etcd/v3.4.13/etcd-v3.4.13-linux-amd64.tar.gz".to_string(),
        tarball,
    );
    files
}

fn local_source(server: &FileServer) -> UpstreamSource {
    UpstreamSource::new("1.20.2".parse().unwrap())
        .unwrap()
        .with_base_urls(
            &format!("{}/k8s", server.base),
            &format!("{}/etcd", server.base),
        )
        // Images come from registries: tests/registry.rs pulls them from a real one.
        .with_images(Vec::new())
}

fn no_registry() -> crate::registry::RegistryClient {
    crate::registry::RegistryClient::new(None).unwrap()
}

#[tokio::test]
async fn upstream_download_verifies_and_writes_a_bundle_then_is_a_no_op() {
    let tmp = tempfile::tempdir().unwrap();
    let server = serve(release_files(tmp.path())).await;
    let dest = tmp.path().join("upstream-1.20.2");
    let client = upstream::client().unwrap();
    let plan = local_source(&server).plan();

    let bundle = plan.fetch(&client, &no_registry(), &dest).await.unwrap();
    let verified = bundle.verify().unwrap();
    assert_eq!(verified.manifest().kubernetes_version.to_string(), "1.20.2");
    assert_eq!(verified.manifest().etcd_version, "3.4.13");
    assert_eq!(
        std::fs::read(dest.join("bin/etcdctl")).unwrap(),
        b"etcdctl binary"
    );
    assert_eq!(
        std::fs::read(dest.join("bin/kubelet")).unwrap(),
        b"binary kubelet\n"
    );
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(dest.join("bin/kubelet"))
            .unwrap()
            .permissions()
            .mode()
            & 0o777,
        0o755
    );
    assert!(!dest.join(".partial").exists());
    assert!(!verified.manifest().ships_pause_image());
    let requests = server.hits.lock().unwrap().len();
    assert_eq!(requests, 2 * super::upstream::KUBERNETES_BINARIES.len() + 2);

    // A second fetch finds the verified bundle and downloads nothing.
    plan.fetch(&client, &no_registry(), &dest).await.unwrap();
    assert_eq!(server.hits.lock().unwrap().len(), requests);
}

#[tokio::test]
async fn upstream_download_with_a_wrong_published_checksum_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let mut files = release_files(tmp.path());
    files.insert(
        "/k8s/v1.20.2/bin/linux/amd64/kubelet".to_string(),
        b"tampered kubelet\n".to_vec(),
    );
    let server = serve(files).await;
    let dest = tmp.path().join("b");
    let err = local_source(&server)
        .plan()
        .fetch(&upstream::client().unwrap(), &no_registry(), &dest)
        .await
        .unwrap_err();
    match &err {
        UpstreamError::ChecksumMismatch { url, actual, .. } => {
            assert!(
                url.ends_with("/k8s/v1.20.2/bin/linux/amd64/kubelet"),
                "{url}"
            );
            assert_eq!(*actual, sha(b"tampered kubelet\n"));
        }
        other => panic!("expected a checksum mismatch, got {other}"),
    }
    assert!(
        !dest.join("bin/kubelet").exists(),
        "an unverified file must not be placed"
    );
    assert!(!dest.join(MANIFEST_FILE).exists());
}

#[tokio::test]
async fn upstream_download_with_a_tampered_etcd_tarball_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let mut files = release_files(tmp.path());
    files.insert(
        "/etcd/v3.4.13/etcd-v3.4.13-linux-amd64.tar.gz".to_string(),
        b"not the release".to_vec(),
    );
    let server = serve(files).await;
    let dest = tmp.path().join("b");
    let err = local_source(&server)
        .plan()
        .fetch(&upstream::client().unwrap(), &no_registry(), &dest)
        .await
        .unwrap_err();
    assert!(
        matches!(&err, UpstreamError::ChecksumMismatch { url, .. } if url.ends_with(".tar.gz")),
        "{err}"
    );
    assert!(!dest.join("bin/etcd").exists());
}

#[tokio::test]
async fn upstream_download_with_a_missing_or_garbled_checksum_fails_clearly() {
    let tmp = tempfile::tempdir().unwrap();
    let mut files = release_files(tmp.path());
    files.remove("/k8s/v1.20.2/bin/linux/amd64/kube-scheduler.sha256");
    let server = serve(files).await;
    let err = local_source(&server)
        .plan()
        .fetch(
            &upstream::client().unwrap(),
            &no_registry(),
            &tmp.path().join("b"),
        )
        .await
        .unwrap_err();
    assert!(
        matches!(&err, UpstreamError::HttpStatus { url, status: 404 } if url.ends_with("kube-scheduler.sha256")),
        "{err}"
    );

    let mut files = release_files(tmp.path());
    files.insert(
        "/etcd/v3.4.13/SHA256SUMS".to_string(),
        b"garbage\n".to_vec(),
    );
    let server = serve(files).await;
    let err = local_source(&server)
        .plan()
        .fetch(
            &upstream::client().unwrap(),
            &no_registry(),
            &tmp.path().join("c"),
        )
        .await
        .unwrap_err();
    assert!(
        matches!(&err, UpstreamError::ChecksumFile { name, .. } if name == "etcd-v3.4.13-linux-amd64.tar.gz"),
        "{err}"
    );
}

#[tokio::test]
async fn plain_http_to_a_remote_host_is_refused_before_connecting() {
    let source = UpstreamSource::new("1.20.2".parse().unwrap())
        .unwrap()
        .with_base_urls("http://dl.k8s.io.invalid/release", "http://github.invalid");
    let tmp = tempfile::tempdir().unwrap();
    let err = source
        .plan()
        .fetch(&upstream::client().unwrap(), &no_registry(), tmp.path())
        .await
        .unwrap_err();
    assert!(matches!(err, UpstreamError::InsecureUrl { .. }), "{err}");
}
