//! The image manifest (`manifest.json`): what an image is and how to boot it.

use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::NodeImageError;

/// File name of the manifest inside an image directory.
pub const MANIFEST_FILE: &str = "manifest.json";

/// Current manifest schema version.
pub const SCHEMA: u32 = 1;

/// Description of one built node image, stored as `<image-dir>/<version>/manifest.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    /// Manifest schema version ([`SCHEMA`]).
    pub schema: u32,
    /// Image version, `<suite>-<yyyymmdd>-<first 12 hex of the input hash>`.
    pub version: String,
    /// sha256 over every build input (the exact version of every package, files, build script
    /// version).
    pub input_hash: String,
    /// Debian suite the packages come from.
    pub suite: String,
    /// The suites whose packages went in (the suite, `<suite>-updates`, `<suite>-security`), with
    /// the Release date of the package lists the build resolved against (images built before
    /// the updates step have none).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub sources: Vec<Source>,
    /// Build time, RFC 3339 UTC.
    pub created: String,
    /// Kernel to boot directly.
    pub kernel: Artifact,
    /// initramfs that opens the verity root.
    pub initrd: Artifact,
    /// Root filesystem disk: ext4 followed by its dm-verity hash tree; attach as the first virtio
    /// disk (`/dev/vda`), read-only or as the backing file of a copy-on-write overlay.
    pub root: RootDisk,
    /// Kernel command line to boot with (carries the verity root hash).
    pub cmdline: String,
    /// Installed Debian packages.
    pub packages: Vec<Package>,
    /// Sum of the packages' installed sizes, KiB (dpkg's `Installed-Size`).
    pub installed_size_kib: u64,
    /// Bytes used by files in the root filesystem.
    pub rootfs_used_bytes: u64,
    /// The same image as a GCE-bootable disk (images built before GCE disks have none).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gce: Option<GceDisk>,
}

/// File name of the GCE disk archive inside an image directory.
pub const GCE_DISK_FILE: &str = "gce-disk.tar.gz";

/// The image as GCE imports it: `disk.raw` (GPT: an EFI system partition with a unified kernel
/// image, then the verity root partition) in a sparse GNU tar, gzipped.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GceDisk {
    /// The archive.
    pub file: Artifact,
    /// Size of `disk.raw`, whole GiB as GCE requires.
    pub disk_size_gib: u64,
    /// Kernel command line inside the unified kernel image.
    pub cmdline: String,
    /// GPT partition name of the root partition.
    pub root_partlabel: String,
    /// Size of the EFI system partition, bytes.
    pub esp_bytes: u64,
}

/// One file of the image.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Artifact {
    /// File name relative to the image directory.
    pub path: String,
    /// Hex sha256 of the file.
    pub sha256: String,
    /// Size in bytes.
    pub size: u64,
}

/// The root disk artifact plus how to verify it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RootDisk {
    /// The disk file.
    #[serde(flatten)]
    pub file: Artifact,
    /// Disk format as QEMU names it (`qcow2`).
    pub format: String,
    /// Size of the disk the guest sees, bytes.
    pub virtual_size: u64,
    /// dm-verity parameters.
    pub verity: Verity,
}

/// dm-verity parameters of the root disk.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Verity {
    /// Root hash (hex); also on the kernel command line.
    pub root_hash: String,
    /// Byte offset of the hash tree on the disk (the ext4 filesystem ends there).
    pub hash_offset: u64,
    /// Hash algorithm.
    pub algorithm: String,
    /// Data and hash block size, bytes.
    pub block_size: u32,
}

/// A Debian suite an image's packages come from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Source {
    /// Suite (codename), e.g. `bookworm-security`.
    pub suite: String,
    /// Mirror it was fetched from.
    pub uri: String,
    /// `Date:` of its Release file as the archive wrote it: the archive's state the image has.
    pub date: String,
}

/// An installed Debian package.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Package {
    /// Package name.
    pub name: String,
    /// Exact version.
    pub version: String,
    /// Installed size, KiB.
    pub installed_size_kib: u64,
    /// The suite(s) the upgrade step installed this version from (`bookworm-security`,
    /// comma-separated when several carry it); absent for what debootstrap installed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub suite: Option<String>,
}

/// What changed in the package list from one image to another.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PackageDiff {
    /// Packages only in the second image.
    pub added: Vec<PackageVersion>,
    /// Packages only in the first image.
    pub removed: Vec<PackageVersion>,
    /// Packages in both with another version.
    pub changed: Vec<PackageChange>,
}

/// A package at a version.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PackageVersion {
    /// Package name.
    pub name: String,
    /// Its version.
    pub version: String,
    /// The suite that version came from in the image it is in, if the upgrade step installed it
    /// (see [`Package::suite`]).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub suite: Option<String>,
}

/// A package whose version changed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PackageChange {
    /// Package name.
    pub name: String,
    /// Version in the first image.
    pub from: String,
    /// Version in the second image.
    pub to: String,
    /// The suite the second image's version came from (`bookworm-security` for a security fix),
    /// if its upgrade step installed it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub suite: Option<String>,
}

impl PackageDiff {
    /// Whether the package lists are the same.
    pub fn is_empty(&self) -> bool {
        self.added.is_empty() && self.removed.is_empty() && self.changed.is_empty()
    }
}

/// The package changes from `from` to `to`, each list sorted by name. Pure.
pub fn package_diff(from: &[Package], to: &[Package]) -> PackageDiff {
    use std::collections::BTreeMap;
    let by_name = |ps: &'_ [Package]| -> BTreeMap<String, (String, Option<String>)> {
        ps.iter()
            .map(|p| (p.name.clone(), (p.version.clone(), p.suite.clone())))
            .collect()
    };
    let (a, b) = (by_name(from), by_name(to));
    let mut d = PackageDiff::default();
    for (name, (v, suite)) in &b {
        match a.get(name) {
            None => d.added.push(PackageVersion {
                name: name.clone(),
                version: v.clone(),
                suite: suite.clone(),
            }),
            Some((old, _)) if old != v => d.changed.push(PackageChange {
                name: name.clone(),
                from: old.clone(),
                to: v.clone(),
                suite: suite.clone(),
            }),
            Some(_) => {}
        }
    }
    for (name, (v, suite)) in &a {
        if !b.contains_key(name) {
            d.removed.push(PackageVersion {
                name: name.clone(),
                version: v.clone(),
                suite: suite.clone(),
            });
        }
    }
    d
}

/// A loaded, verified image: where it is, its manifest and the manifest's digest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Image {
    /// Image directory (`<image-dir>/<version>`).
    pub dir: PathBuf,
    /// sha256 of `manifest.json` (hex): identifies the image content.
    pub digest: String,
    /// The parsed manifest.
    pub manifest: Manifest,
}

impl Image {
    /// Absolute path of the kernel.
    pub fn kernel_path(&self) -> PathBuf {
        self.dir.join(&self.manifest.kernel.path)
    }
    /// Absolute path of the initrd.
    pub fn initrd_path(&self) -> PathBuf {
        self.dir.join(&self.manifest.initrd.path)
    }
    /// Absolute path of the root disk.
    pub fn root_path(&self) -> PathBuf {
        self.dir.join(&self.manifest.root.file.path)
    }
}

/// Reads the manifest in `dir` without checking the artifacts (fast; for listings).
pub fn read(dir: &Path) -> Result<(Manifest, String), NodeImageError> {
    let path = dir.join(MANIFEST_FILE);
    let bytes = fs::read(&path).map_err(|source| NodeImageError::Io {
        path: path.clone(),
        source,
    })?;
    let manifest: Manifest =
        serde_json::from_slice(&bytes).map_err(|source| NodeImageError::Manifest {
            path: path.clone(),
            source,
        })?;
    if manifest.schema != SCHEMA {
        return Err(NodeImageError::Schema {
            path,
            found: manifest.schema,
            supported: SCHEMA,
        });
    }
    Ok((manifest, hex::encode(Sha256::digest(&bytes))))
}

/// Loads the image in `dir` and verifies the sha256 and size of every artifact.
pub fn load(dir: &Path) -> Result<Image, NodeImageError> {
    let (manifest, digest) = read(dir)?;
    for artifact in [&manifest.kernel, &manifest.initrd, &manifest.root.file]
        .into_iter()
        .chain(manifest.gce.as_ref().map(|g| &g.file))
    {
        verify_artifact(dir, artifact)?;
    }
    Ok(Image {
        dir: dir.to_path_buf(),
        digest,
        manifest,
    })
}

fn verify_artifact(dir: &Path, artifact: &Artifact) -> Result<(), NodeImageError> {
    if artifact.path.contains('/') || artifact.path.starts_with('.') {
        return Err(NodeImageError::BadArtifactPath {
            path: artifact.path.clone(),
        });
    }
    let path = dir.join(&artifact.path);
    let (sha256, size) = sha256_file(&path)?;
    if sha256 != artifact.sha256 || size != artifact.size {
        return Err(NodeImageError::Checksum {
            path,
            expected: artifact.sha256.clone(),
            actual: sha256,
        });
    }
    Ok(())
}

/// Hex sha256 and size of a file.
pub(crate) fn sha256_file(path: &Path) -> Result<(String, u64), NodeImageError> {
    let io = |source| NodeImageError::Io {
        path: path.to_path_buf(),
        source,
    };
    let mut file = fs::File::open(path).map_err(io)?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut size = 0u64;
    loop {
        let n = file.read(&mut buf).map_err(io)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        size += n as u64;
    }
    Ok((hex::encode(hasher.finalize()), size))
}

/// Lists the images under `image_dir` (each subdirectory with a readable manifest), oldest first.
/// Directories without a manifest (unfinished builds, caches) are skipped; a manifest that does not
/// parse is an error, so a damaged image is noticed.
pub fn list(image_dir: &Path) -> Result<Vec<(PathBuf, Manifest, String)>, NodeImageError> {
    let entries = match fs::read_dir(image_dir) {
        Ok(entries) => entries,
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(source) => {
            return Err(NodeImageError::Io {
                path: image_dir.to_path_buf(),
                source,
            });
        }
    };
    let mut images = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|source| NodeImageError::Io {
            path: image_dir.to_path_buf(),
            source,
        })?;
        let dir = entry.path();
        if !dir.join(MANIFEST_FILE).is_file() {
            continue;
        }
        let (manifest, digest) = read(&dir)?;
        images.push((dir, manifest, digest));
    }
    images.sort_by(|a, b| (&a.1.created, &a.1.version).cmp(&(&b.1.created, &b.1.version)));
    Ok(images)
}

#[cfg(test)]
pub(crate) mod tests {

    #[test]
    fn package_diff_lists_added_removed_and_changed_by_name() {
        let p = |n: &str, v: &str| Package {
            name: n.into(),
            version: v.into(),
            installed_size_kib: 1,
            suite: None,
        };
        let a = [
            p("libc6", "2.36-9"),
            p("openssl", "3.0.11"),
            p("vim", "9.0"),
        ];
        let b = [
            Package {
                suite: Some("bookworm-security".into()),
                ..p("libc6", "2.36-9+deb12u1")
            },
            p("less", "590"),
            p("openssl", "3.0.11"),
        ];
        let d = package_diff(&a, &b);
        let pv = |n: &str, v: &str| PackageVersion {
            name: n.into(),
            version: v.into(),
            suite: None,
        };
        assert_eq!(d.added, [pv("less", "590")]);
        assert_eq!(d.removed, [pv("vim", "9.0")]);
        assert_eq!(
            d.changed,
            [PackageChange {
                name: "libc6".into(),
                from: "2.36-9".into(),
                to: "2.36-9+deb12u1".into(),
                suite: Some("bookworm-security".into()),
            }]
        );
        assert!(package_diff(&a, &a).is_empty());
    }

    use super::*;

    /// Writes a small but complete image directory (fake artifact contents) and returns its manifest.
    pub(crate) fn fake_image(dir: &Path, version: &str, input_hash: &str) -> Manifest {
        fs::create_dir_all(dir).expect("mkdir");
        let mut arts = Vec::new();
        for (name, body) in [
            ("vmlinuz", "kernel"),
            ("initrd.img", "initrd"),
            ("root.qcow2", "root"),
        ] {
            fs::write(dir.join(name), body).expect("write artifact");
            let (sha256, size) = sha256_file(&dir.join(name)).expect("hash");
            arts.push(Artifact {
                path: name.into(),
                sha256,
                size,
            });
        }
        let m = Manifest {
            schema: SCHEMA,
            version: version.into(),
            input_hash: input_hash.into(),
            suite: "bookworm".into(),
            sources: Vec::new(),
            created: "2026-11-26T00:00:00Z".into(),
            kernel: arts[0].clone(),
            initrd: arts[1].clone(),
            root: RootDisk {
                file: arts[2].clone(),
                format: "qcow2".into(),
                virtual_size: 4096,
                verity: Verity {
                    root_hash: "00".repeat(32),
                    hash_offset: 4096,
                    algorithm: "sha256".into(),
                    block_size: 4096,
                },
            },
            cmdline: "ro".into(),
            packages: vec![Package {
                name: "containerd".into(),
                version: "1.6.20~ds1-1".into(),
                installed_size_kib: 100,
                suite: None,
            }],
            installed_size_kib: 100,
            rootfs_used_bytes: 1000,
            gce: None,
        };
        fs::write(
            dir.join(MANIFEST_FILE),
            serde_json::to_vec_pretty(&m).expect("json"),
        )
        .expect("write manifest");
        m
    }

    #[test]
    fn load_verifies_and_digests() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = tmp.path().join("v1");
        let m = fake_image(&dir, "v1", "h1");
        let image = load(&dir).expect("load");
        assert_eq!(image.manifest, m);
        let bytes = fs::read(dir.join(MANIFEST_FILE)).expect("read");
        assert_eq!(image.digest, hex::encode(Sha256::digest(&bytes)));
        assert_eq!(image.root_path(), dir.join("root.qcow2"));
    }

    #[test]
    fn corrupt_artifact_is_refused() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = tmp.path().join("v1");
        fake_image(&dir, "v1", "h1");
        fs::write(dir.join("root.qcow2"), "r00t").expect("tamper");
        match load(&dir) {
            Err(NodeImageError::Checksum { path, .. }) => assert_eq!(path, dir.join("root.qcow2")),
            other => panic!("expected checksum error, got {other:?}"),
        }
        fs::remove_file(dir.join("vmlinuz")).expect("rm");
        assert!(matches!(load(&dir), Err(NodeImageError::Io { .. })));
    }

    #[test]
    fn bad_manifests_are_errors_not_panics() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = tmp.path().join("v1");
        let mut m = fake_image(&dir, "v1", "h1");
        m.schema = 99;
        fs::write(
            dir.join(MANIFEST_FILE),
            serde_json::to_vec(&m).expect("json"),
        )
        .expect("write");
        let e = load(&dir).expect_err("schema");
        assert!(e.to_string().contains("schema 99 is not supported"), "{e}");
        m.schema = SCHEMA;
        m.kernel.path = "../../etc/passwd".into();
        fs::write(
            dir.join(MANIFEST_FILE),
            serde_json::to_vec(&m).expect("json"),
        )
        .expect("write");
        assert!(matches!(
            load(&dir),
            Err(NodeImageError::BadArtifactPath { .. })
        ));
        fs::write(dir.join(MANIFEST_FILE), "{\"schema\": 1, \"version\": ").expect("write");
        assert!(matches!(load(&dir), Err(NodeImageError::Manifest { .. })));
    }

    #[test]
    fn list_skips_unfinished_and_sorts() {
        let tmp = tempfile::tempdir().expect("tempdir");
        fake_image(&tmp.path().join("bookworm-b"), "bookworm-b", "h2");
        fake_image(&tmp.path().join("a"), "a", "h1");
        fs::create_dir_all(tmp.path().join(".work-123/rootfs")).expect("work dir");
        fs::create_dir_all(tmp.path().join("cache")).expect("cache dir");
        let names: Vec<String> = list(tmp.path())
            .expect("list")
            .into_iter()
            .map(|(_, m, _)| m.version)
            .collect();
        assert_eq!(names, ["a", "bookworm-b"]);
        assert!(
            list(&tmp.path().join("missing"))
                .expect("missing dir")
                .is_empty()
        );
    }
}
