//! clusterctl's registry client against a real registry: Debian's `docker-registry` (the CNCF
//! Distribution registry) on 127.0.0.1, over TLS from a test CA, with htpasswd (Basic)
//! authentication, serving images this test builds and pushes itself. Then an `upstream`
//! bundle fetched with that registry as the mirror of `registry.k8s.io`: its pause and CoreDNS
//! images land in the bundle, verified, and a real containerd imports them under their names.
//!
//! Needs `docker-registry`, `python3` (a bcrypt htpasswd line; a static file server for the
//! release files), `containerd` and `ctr` (tests/bed/install-host-packages.sh installs them).

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use clusterctl::registry::{RegistryClient, RegistryError};
use sha2::{Digest, Sha256};

const USER: &str = "puller";
const PASSWORD: &str = "s3cret-pw";

fn need(bin: &str) -> PathBuf {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .map(|d| d.join(bin))
        .find(|p| p.is_file())
        .unwrap_or_else(|| {
            panic!("{bin} not found on PATH: run tests/bed/install-host-packages.sh")
        })
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A child process killed (by its PID, which this test started) when dropped.
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

struct Registry {
    _proc: Proc,
    url: String,
    ca_pem: String,
    data: PathBuf,
}

/// A test CA and a server certificate for 127.0.0.1 signed by it: (CA PEM, cert PEM, key PEM).
fn tls_material() -> (String, String, String) {
    use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "clusterctl registry test CA");
    let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate().unwrap()).unwrap();
    let params =
        CertificateParams::new(vec!["127.0.0.1".to_owned(), "localhost".to_owned()]).unwrap();
    let key = KeyPair::generate().unwrap();
    let cert = params.signed_by(&key, &ca).unwrap();
    (ca.pem(), cert.pem(), key.serialize_pem())
}

fn start_registry(dir: &Path) -> Registry {
    let bin = need("docker-registry");
    let (ca_pem, cert_pem, key_pem) = tls_material();
    std::fs::write(dir.join("cert.pem"), &cert_pem).unwrap();
    std::fs::write(dir.join("key.pem"), &key_pem).unwrap();
    let hash = Command::new(need("python3"))
        .args([
            "-W",
            "ignore",
            "-c",
            "import crypt,sys; print(crypt.crypt(sys.argv[1], crypt.mksalt(crypt.METHOD_BLOWFISH, rounds=16)))",
            PASSWORD,
        ])
        .output()
        .unwrap();
    assert!(
        hash.status.success(),
        "python3 could not make a bcrypt hash"
    );
    let hash = String::from_utf8(hash.stdout).unwrap();
    std::fs::write(dir.join("htpasswd"), format!("{USER}:{}\n", hash.trim())).unwrap();
    let port = free_port();
    let data = dir.join("data");
    let config = format!(
        "version: 0.1\nlog:\n  level: warn\nstorage:\n  filesystem:\n    rootdirectory: {data}\n\
         auth:\n  htpasswd:\n    realm: clusterctl-test\n    path: {dir}/htpasswd\n\
         http:\n  addr: 127.0.0.1:{port}\n  tls:\n    certificate: {dir}/cert.pem\n    key: {dir}/key.pem\n",
        data = data.display(),
        dir = dir.display()
    );
    std::fs::write(dir.join("config.yml"), config).unwrap();
    let log = std::fs::File::create(dir.join("registry.log")).unwrap();
    let child = Command::new(bin)
        .arg("serve")
        .arg(dir.join("config.yml"))
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap();
    let proc = Proc(child);
    let deadline = Instant::now() + Duration::from_secs(30);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            Instant::now() < deadline,
            "docker-registry did not listen: {}",
            std::fs::read_to_string(dir.join("registry.log")).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    Registry {
        _proc: proc,
        url: format!("https://127.0.0.1:{port}"),
        ca_pem,
        data,
    }
}

fn digest(bytes: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(bytes)))
}

/// Pushes blobs and manifests the way `docker push` does (monolithic uploads).
struct Pusher {
    http: reqwest::Client,
    base: String,
}

impl Pusher {
    async fn blob(&self, repo: &str, bytes: &[u8]) -> serde_json::Value {
        let d = digest(bytes);
        let r = self
            .http
            .post(format!("{}/v2/{repo}/blobs/uploads/", self.base))
            .basic_auth(USER, Some(PASSWORD))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status().as_u16(), 202, "starting an upload");
        let loc = r.headers()["location"].to_str().unwrap().to_owned();
        let loc = if loc.starts_with("http") {
            loc
        } else {
            format!("{}{loc}", self.base)
        };
        let sep = if loc.contains('?') { '&' } else { '?' };
        let r = self
            .http
            .put(format!("{loc}{sep}digest={d}"))
            .basic_auth(USER, Some(PASSWORD))
            .header("content-type", "application/octet-stream")
            .body(bytes.to_vec())
            .send()
            .await
            .unwrap();
        assert_eq!(r.status().as_u16(), 201, "finishing an upload");
        serde_json::json!({"digest": d, "size": bytes.len()})
    }

    async fn manifest(&self, repo: &str, tag: &str, media_type: &str, body: &[u8]) -> String {
        let r = self
            .http
            .put(format!("{}/v2/{repo}/manifests/{tag}", self.base))
            .basic_auth(USER, Some(PASSWORD))
            .header("content-type", media_type)
            .body(body.to_vec())
            .send()
            .await
            .unwrap();
        let status = r.status().as_u16();
        assert_eq!(
            status,
            201,
            "pushing manifest {repo}:{tag}: {}",
            r.text().await.unwrap_or_default()
        );
        digest(body)
    }

    /// An image of one layer holding `files`; returns (manifest digest, manifest bytes, layer digest).
    async fn image(
        &self,
        repo: &str,
        tag: Option<&str>,
        oci: bool,
        arch: &str,
        files: &[(&str, &[u8])],
    ) -> (String, Vec<u8>, String) {
        let mut tar = tar::Builder::new(Vec::new());
        for (name, body) in files {
            let mut h = tar::Header::new_gnu();
            h.set_size(body.len() as u64);
            h.set_mode(0o644);
            h.set_mtime(0);
            h.set_cksum();
            tar.append_data(&mut h, name, *body).unwrap();
        }
        let raw = tar.into_inner().unwrap();
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        gz.write_all(&raw).unwrap();
        let layer = gz.finish().unwrap();
        let config = serde_json::to_vec(&serde_json::json!({
            "architecture": arch, "os": "linux",
            "config": {"Cmd": ["/hello"]},
            "rootfs": {"type": "layers", "diff_ids": [digest(&raw)]},
        }))
        .unwrap();
        let (mt, cfg_t, layer_t) = if oci {
            (
                "application/vnd.oci.image.manifest.v1+json",
                "application/vnd.oci.image.config.v1+json",
                "application/vnd.oci.image.layer.v1.tar+gzip",
            )
        } else {
            (
                "application/vnd.docker.distribution.manifest.v2+json",
                "application/vnd.docker.container.image.v1+json",
                "application/vnd.docker.image.rootfs.diff.tar.gzip",
            )
        };
        let mut c = self.blob(repo, &config).await;
        c["mediaType"] = cfg_t.into();
        let mut l = self.blob(repo, &layer).await;
        l["mediaType"] = layer_t.into();
        let layer_digest = l["digest"].as_str().unwrap().to_owned();
        let manifest = serde_json::to_vec(&serde_json::json!({
            "schemaVersion": 2, "mediaType": mt, "config": c, "layers": [l],
        }))
        .unwrap();
        let reference = tag.map(str::to_owned).unwrap_or_else(|| digest(&manifest));
        let d = self.manifest(repo, &reference, mt, &manifest).await;
        (d, manifest, layer_digest)
    }
}

/// Every file of an archive: path -> bytes.
fn archive_files(path: &Path) -> BTreeMap<String, Vec<u8>> {
    let mut out = BTreeMap::new();
    let mut a = tar::Archive::new(std::fs::File::open(path).unwrap());
    for e in a.entries().unwrap() {
        let mut e = e.unwrap();
        let name = e.path().unwrap().to_string_lossy().into_owned();
        let mut body = Vec::new();
        std::io::Read::read_to_end(&mut e, &mut body).unwrap();
        out.insert(name, body);
    }
    out
}

fn blob_path(d: &str) -> String {
    format!("blobs/sha256/{}", d.trim_start_matches("sha256:"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pulls_from_a_real_registry_into_bundles_containerd_imports() {
    let tmp = tempfile::tempdir().unwrap();
    let reg = start_registry(tmp.path());
    let ca = reqwest::Certificate::from_pem(reg.ca_pem.as_bytes()).unwrap();
    let pusher = Pusher {
        http: reqwest::Client::builder()
            .tls_certs_only([ca])
            .build()
            .unwrap(),
        base: reg.url.clone(),
    };
    let host = reg.url.trim_start_matches("https://").to_owned();

    // Our own images: a Docker schema 2 image, an OCI image, and a two-platform OCI index.
    let (hello_d, hello_m, hello_layer) = pusher
        .image(
            "clusterctl/hello",
            Some("1.0"),
            false,
            "amd64",
            &[("hello.txt", b"hello from clusterctl\n")],
        )
        .await;
    let (pause_d, _, _) = pusher
        .image(
            "pause",
            Some("3.2"),
            true,
            "amd64",
            &[("pause", b"pause binary")],
        )
        .await;
    let (amd_d, amd_m, amd_layer) = pusher
        .image("coredns", None, true, "amd64", &[("coredns", b"amd64")])
        .await;
    let (arm_d, arm_m, arm_layer) = pusher
        .image("coredns", None, true, "arm64", &[("coredns", b"arm64")])
        .await;
    let index = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [
            {"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": arm_d, "size": arm_m.len(),
             "platform": {"architecture": "arm64", "os": "linux"}},
            {"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": amd_d, "size": amd_m.len(),
             "platform": {"architecture": "amd64", "os": "linux"}},
        ],
    }))
    .unwrap();
    let index_d = pusher
        .manifest(
            "coredns",
            "1.7.0",
            "application/vnd.oci.image.index.v1+json",
            &index,
        )
        .await;

    let client = || {
        RegistryClient::new(Some(reg.ca_pem.as_bytes()))
            .unwrap()
            .with_credentials(USER, PASSWORD)
    };
    let out = tmp.path().join("out");
    std::fs::create_dir_all(&out).unwrap();

    // A Docker image by tag: the archive is an OCI layout naming it, bytes as pushed.
    let hello_ref = format!("{host}/clusterctl/hello:1.0");
    let dest = out.join("hello.tar");
    let pulled = client()
        .pull_to_archive(&hello_ref, &dest)
        .await
        .expect("pull hello");
    assert_eq!(pulled.manifest_digest, hello_d);
    assert_eq!(pulled.blobs, 2);
    let files = archive_files(&dest);
    assert_eq!(files[&blob_path(&hello_d)], hello_m);
    assert!(files.contains_key(&blob_path(&hello_layer)));
    assert!(files.contains_key("oci-layout"));
    let index_json: serde_json::Value = serde_json::from_slice(&files["index.json"]).unwrap();
    assert_eq!(
        index_json["manifests"][0]["mediaType"],
        "application/vnd.docker.distribution.manifest.v2+json"
    );
    assert_eq!(
        index_json["manifests"][0]["annotations"]["io.containerd.image.name"],
        hello_ref.as_str()
    );
    let inspected = clusterctl::action::load::inspect(&dest).expect("load reads the archive");
    assert_eq!(inspected.references, vec![hello_ref.clone()]);
    // By digest too (the digest is checked against what arrives).
    let by_digest = format!("{host}/clusterctl/hello@{hello_d}");
    client()
        .pull_to_archive(&by_digest, &out.join("hello-d.tar"))
        .await
        .expect("pull by digest");

    // An index: the linux/amd64 image is taken, the arm64 one is not fetched.
    let dest = out.join("coredns.tar");
    let pulled = client()
        .pull_to_archive(&format!("{host}/coredns:1.7.0"), &dest)
        .await
        .expect("pull index");
    assert_eq!(pulled.manifest_digest, amd_d);
    assert_ne!(pulled.manifest_digest, index_d);
    let files = archive_files(&dest);
    assert!(files.contains_key(&blob_path(&amd_layer)));
    assert!(!files.contains_key(&blob_path(&arm_layer)));

    // Refusals, each saying what is wrong; nothing is left at the destination.
    let bad = out.join("bad.tar");
    let e = client()
        .pull_to_archive(&format!("{host}/clusterctl/hello:2.0"), &bad)
        .await
        .unwrap_err();
    assert!(
        matches!(e, RegistryError::Status { status: 404, .. }),
        "{e}"
    );
    assert!(e.to_string().contains("check the reference"), "{e}");
    let e = RegistryClient::new(Some(reg.ca_pem.as_bytes()))
        .unwrap()
        .pull_to_archive(&hello_ref, &bad)
        .await
        .unwrap_err();
    assert!(e.to_string().contains("wants credentials"), "{e}");
    let e = RegistryClient::new(Some(reg.ca_pem.as_bytes()))
        .unwrap()
        .with_credentials(USER, "wrong")
        .pull_to_archive(&hello_ref, &bad)
        .await
        .unwrap_err();
    assert!(
        matches!(e, RegistryError::Status { status: 401, .. }),
        "{e}"
    );
    let e = RegistryClient::new(None)
        .unwrap()
        .pull_to_archive(&hello_ref, &bad)
        .await
        .unwrap_err();
    assert!(
        matches!(e, RegistryError::Http { .. }),
        "an unknown CA must be refused: {e}"
    );
    let wrong = format!("{host}/clusterctl/hello@sha256:{}", "0".repeat(64));
    let e = client().pull_to_archive(&wrong, &bad).await.unwrap_err();
    assert!(
        matches!(
            e,
            RegistryError::Status { .. } | RegistryError::Digest { .. }
        ),
        "{e}"
    );
    // A layer changed in the registry's storage (a bad disk, a tampering proxy) is caught.
    let hex = hello_layer.trim_start_matches("sha256:");
    let stored = reg.data.join(format!(
        "docker/registry/v2/blobs/sha256/{}/{hex}/data",
        &hex[..2]
    ));
    let mut body = std::fs::read(&stored).unwrap();
    let last = body.len() - 1;
    body[last] ^= 0xff;
    std::fs::write(&stored, &body).unwrap();
    let e = client()
        .pull_to_archive(&hello_ref, &bad)
        .await
        .unwrap_err();
    assert!(matches!(e, RegistryError::Digest { .. }), "{e}");
    assert!(e.to_string().contains("nothing was kept"), "{e}");
    assert!(!bad.exists());

    // An upstream bundle with this registry as registry.k8s.io's mirror: its pause and CoreDNS
    // images come into the bundle, named as upstream names them.
    let releases = tmp.path().join("releases");
    let release = releases.join("k8s/v1.20.2/bin/linux/amd64");
    std::fs::create_dir_all(&release).unwrap();
    for bin in clusterctl::bundle::upstream::KUBERNETES_BINARIES {
        let body = format!("binary {bin}\n");
        std::fs::write(release.join(bin), &body).unwrap();
        std::fs::write(
            release.join(format!("{bin}.sha256")),
            hex::encode(Sha256::digest(&body)),
        )
        .unwrap();
    }
    let etcd_dir = releases.join("etcd/v3.4.13");
    std::fs::create_dir_all(&etcd_dir).unwrap();
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    {
        let mut t = tar::Builder::new(&mut gz);
        for (name, body) in [
            ("etcd", b"etcd binary".as_slice()),
            ("etcdctl", b"etcdctl binary"),
        ] {
            let mut h = tar::Header::new_gnu();
            h.set_size(body.len() as u64);
            h.set_mode(0o755);
            h.set_cksum();
            t.append_data(&mut h, format!("etcd-v3.4.13-linux-amd64/{name}"), body)
                .unwrap();
        }
        t.finish().unwrap();
    }
    let tarball = gz.finish().unwrap();
    std::fs::write(etcd_dir.join("etcd-v3.4.13-linux-amd64.tar.gz"), &tarball).unwrap();
    std::fs::write(
        etcd_dir.join("SHA256SUMS"),
        format!(
            "{}  etcd-v3.4.13-linux-amd64.tar.gz\n",
            hex::encode(Sha256::digest(&tarball))
        ),
    )
    .unwrap();
    let http_port = free_port();
    let server = Proc(
        Command::new(need("python3"))
            .args([
                "-m",
                "http.server",
                "--bind",
                "127.0.0.1",
                &http_port.to_string(),
                "--directory",
            ])
            .arg(&releases)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::net::TcpStream::connect(("127.0.0.1", http_port)).is_err() {
        assert!(
            Instant::now() < deadline,
            "python3 -m http.server did not listen"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let base = format!("http://127.0.0.1:{http_port}");
    // The unchanged layer again: the tampered copy would fail the digest check.
    std::fs::write(&stored, {
        body[last] ^= 0xff;
        &body
    })
    .unwrap();
    let mirror = client().with_mirror("registry.k8s.io", &reg.url).unwrap();
    let plan = clusterctl::bundle::upstream::UpstreamSource::new("1.20.2".parse().unwrap())
        .unwrap()
        .with_base_urls(&format!("{base}/k8s"), &format!("{base}/etcd"))
        .plan();
    let dest = tmp.path().join("bundle");
    let bundle = plan
        .fetch(
            &clusterctl::bundle::upstream::client().unwrap(),
            &mirror,
            &dest,
        )
        .await
        .expect("upstream bundle with images from the mirror");
    let verified = bundle.verify().expect("bundle verifies");
    let m = verified.manifest();
    assert!(m.ships_pause_image(), "the bundle ships its pause image");
    let refs: Vec<_> = m.images.iter().map(|i| i.reference.as_str()).collect();
    assert_eq!(
        refs,
        ["registry.k8s.io/pause:3.2", "registry.k8s.io/coredns:1.7.0"]
    );
    let pause_files = archive_files(&dest.join("images/pause-3.2.tar"));
    assert!(pause_files.contains_key(&blob_path(&pause_d)));
    drop(server);
    // A second fetch finds the bundle complete and verified: nothing is pulled (the registry is
    // gone now, so a pull would fail).
    drop(reg);
    plan.fetch(
        &clusterctl::bundle::upstream::client().unwrap(),
        &mirror,
        &dest,
    )
    .await
    .expect("a complete bundle is reused");

    containerd_imports(
        tmp.path(),
        &[
            dest.join("images/pause-3.2.tar"),
            dest.join("images/coredns-1.7.0.tar"),
        ],
        &refs,
    );
}

/// A real containerd (its own root, state and socket in `dir`) imports the archives with `ctr
/// images import`, as `load` and the bootstrap do on nodes, and lists `refs`.
fn containerd_imports(dir: &Path, archives: &[PathBuf], refs: &[&str]) {
    let c = dir.join("containerd");
    std::fs::create_dir_all(&c).unwrap();
    let sock = c.join("containerd.sock");
    let config = format!(
        "version = 2\nroot = \"{root}\"\nstate = \"{state}\"\ndisabled_plugins = [\"io.containerd.grpc.v1.cri\"]\n[grpc]\n  address = \"{sock}\"\n[ttrpc]\n  address = \"{sock}.ttrpc\"\n[debug]\n  address = \"\"\n",
        root = c.join("root").display(),
        state = c.join("state").display(),
        sock = sock.display()
    );
    std::fs::write(c.join("config.toml"), config).unwrap();
    let log = std::fs::File::create(c.join("containerd.log")).unwrap();
    let _daemon = Proc(
        Command::new(need("containerd"))
            .arg("--config")
            .arg(c.join("config.toml"))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap(),
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    while std::os::unix::net::UnixStream::connect(&sock).is_err() {
        assert!(
            Instant::now() < deadline,
            "containerd did not start: {}",
            std::fs::read_to_string(c.join("containerd.log")).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let ctr = |args: &[&std::ffi::OsStr]| {
        let out = Command::new(need("ctr"))
            .arg("--address")
            .arg(&sock)
            .args(["--namespace", "k8s.io"])
            .args(args)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "ctr {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    };
    // Imported and unpacked, as on a node (ctr's default).
    for a in archives {
        ctr(&["images".as_ref(), "import".as_ref(), a.as_os_str()]);
    }
    let listed = ctr(&["images".as_ref(), "ls".as_ref(), "-q".as_ref()]);
    for r in refs {
        assert!(
            listed.lines().any(|l| l == *r),
            "containerd lists {listed:?}, not {r}"
        );
    }
    let check = ctr(&["images".as_ref(), "check".as_ref()]);
    // Complete content, unpacked into the snapshotter as on a node (last column: UNPACKED).
    assert!(
        check
            .lines()
            .skip(1)
            .all(|l| l.contains("complete") && l.trim_end().ends_with("true")),
        "{check}"
    );
}
