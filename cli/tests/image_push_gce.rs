//! `clusterctl image push --provider gce` through the binary: the upload goes to fake-gcs-server
//! (the Go implementation of the Cloud Storage API, installed by tests/bed/install-host-packages.sh;
//! skipped with a message where it is absent), the image is made in the in-process fake Compute
//! API, with a service-account key file whose JWT the fake's token endpoint verifies. Every
//! Compute request and answer is checked against the discovery document.

use std::io::Write;
use std::path::Path;
use std::process::Command;

use providers::gce::fake::FakeCompute;
use providers::gce::fake_gcs;
use sha2::{Digest, Sha256};

const BIN: &str = env!("CARGO_BIN_EXE_clusterctl");
const PROJECT: &str = "clusterctl-test";
const BUCKET: &str = "clusterctl-images";

fn artifact(dir: &Path, name: &str, bytes: &[u8]) -> nodeimage::Artifact {
    std::fs::write(dir.join(name), bytes).expect("write artifact");
    nodeimage::Artifact {
        path: name.into(),
        sha256: hex::encode(Sha256::digest(bytes)),
        size: bytes.len() as u64,
    }
}

/// A node image directory as `image build` leaves it, with small artifacts.
fn image_dir(root: &Path, version: &str, gce_disk: &[u8]) {
    let dir = root.join(version);
    std::fs::create_dir_all(&dir).expect("image dir");
    let manifest = nodeimage::Manifest {
        schema: nodeimage::manifest::SCHEMA,
        version: version.into(),
        input_hash: "ab".repeat(32),
        suite: "bookworm".into(),
        sources: Vec::new(),
        created: "2026-12-02T00:00:00Z".into(),
        kernel: artifact(&dir, "vmlinuz", b"kernel"),
        initrd: artifact(&dir, "initrd.img", b"initrd"),
        root: nodeimage::RootDisk {
            file: artifact(&dir, "root.qcow2", b"root"),
            format: "qcow2".into(),
            virtual_size: 4096,
            verity: nodeimage::Verity {
                root_hash: "cd".repeat(32),
                hash_offset: 4096,
                algorithm: "sha256".into(),
                block_size: 4096,
            },
        },
        cmdline: "root=/dev/mapper/root".into(),
        packages: Vec::new(),
        installed_size_kib: 0,
        rootfs_used_bytes: 0,
        gce: Some(nodeimage::GceDisk {
            file: artifact(&dir, "gce-disk.tar.gz", gce_disk),
            disk_size_gib: 1,
            cmdline: "root=/dev/mapper/root".into(),
            root_partlabel: "clusterctl-root".into(),
            esp_bytes: 64 << 20,
        }),
    };
    let json = serde_json::to_vec_pretty(&manifest).expect("manifest");
    std::fs::write(dir.join("manifest.json"), json).expect("manifest");
}

/// A service-account key file for the fake's token endpoint.
fn key_file(fake: &FakeCompute, path: &Path) {
    use aws_lc_rs::encoding::AsDer;
    use aws_lc_rs::signature::KeyPair as _;
    use base64::Engine as _;
    let pair = aws_lc_rs::rsa::KeyPair::generate(aws_lc_rs::rsa::KeySize::Rsa2048).expect("keygen");
    let der = pair.as_der().expect("pkcs8");
    let pem = format!(
        "-----BEGIN PRIVATE KEY-----\n{}\n-----END PRIVATE KEY-----\n",
        base64::engine::general_purpose::STANDARD.encode(der.as_ref())
    );
    let email = "pusher@clusterctl-test.iam.gserviceaccount.com";
    fake.register_service_account(email, pair.public_key().as_ref());
    let key = serde_json::json!({
        "type": "service_account",
        "client_email": email,
        "private_key": pem,
        "private_key_id": "k1",
        "token_uri": fake.token_uri(),
    });
    let mut f = std::fs::File::create(path).expect("key file");
    f.write_all(key.to_string().as_bytes()).expect("key file");
}

fn push(
    images: &Path,
    key: &Path,
    fake: &FakeCompute,
    gcs: &fake_gcs::FakeGcs,
) -> std::process::Output {
    Command::new(BIN)
        .args([
            "image",
            "push",
            "--provider",
            "gce",
            "--project",
            PROJECT,
            "--bucket",
            BUCKET,
        ])
        .arg("--credentials")
        .arg(key)
        .arg("--image-dir")
        .arg(images)
        .env("CLUSTERCTL_GCE_ENDPOINT", fake.base_url())
        .env("CLUSTERCTL_GCS_ENDPOINT", &gcs.url)
        .output()
        .expect("run clusterctl")
}

#[test]
fn image_push_uploads_the_gce_disk_and_makes_the_image_once() {
    let Some(bin) = fake_gcs::binary() else {
        eprintln!(
            "skipping: fake-gcs-server not found (tests/bed/install-host-packages.sh installs it)"
        );
        return;
    };
    let gcs = fake_gcs::start(&bin, "", BUCKET);
    let fake = FakeCompute::start(PROJECT, &["us-central1-a"]);
    let tmp = tempfile::tempdir().expect("tempdir");
    let images = tmp.path().join("images");
    let disk: Vec<u8> = (0..(3u32 << 20)).map(|i| (i % 251) as u8).collect();
    image_dir(&images, "bookworm-20261202-0123456789ab", &disk);
    let key = tmp.path().join("key.json");
    key_file(&fake, &key);

    let out = push(&images, &key, &fake, &gcs);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "push failed: {stderr}");
    assert!(
        fake.resource_names().contains(&(
            "image".to_owned(),
            "clusterctl-bookworm-20261202-0123456789ab".to_owned()
        )),
        "{:?}",
        fake.resource_names()
    );
    // The object holds the archive's bytes.
    let object = reqwest::blocking::get(format!(
        "{}/storage/v1/b/{BUCKET}/o?prefix=clusterctl-",
        gcs.url
    ))
    .expect("list")
    .text()
    .expect("list body");
    assert!(
        object.contains("clusterctl-bookworm-20261202-0123456789ab"),
        "{object}"
    );

    // Again: nothing to upload, nothing to make.
    let out = push(&images, &key, &fake, &gcs);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "second push failed: {stderr}");
    let inserts = fake
        .requests()
        .iter()
        .filter(|r| r.method_id == "compute.images.insert")
        .count();
    assert_eq!(inserts, 1, "the image is made once");
    assert!(
        fake.schema_violations().is_empty(),
        "{:?}",
        fake.schema_violations()
    );
    assert!(!stderr.contains("PRIVATE KEY"), "no secret in the output");
}
