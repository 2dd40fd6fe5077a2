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
    /// sha256 over every build input (package list, files, build script version).
    pub input_hash: String,
    /// Debian suite the packages come from.
    pub suite: String,
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
    let bytes = fs::read(&path).map_err(|source| NodeImageError::Io { path: path.clone(), source })?;
    let manifest: Manifest = serde_json::from_slice(&bytes)
        .map_err(|source| NodeImageError::Manifest { path: path.clone(), source })?;
    if manifest.schema != SCHEMA {
        return Err(NodeImageError::Schema { path, found: manifest.schema, supported: SCHEMA });
    }
    Ok((manifest, hex::encode(Sha256::digest(&bytes))))
}

/// Loads the image in `dir` and verifies the sha256 and size of every artifact.
pub fn load(dir: &Path) -> Result<Image, NodeImageError> {
    let (manifest, digest) = read(dir)?;
    for artifact in [&manifest.kernel, &manifest.initrd, &manifest.root.file] {
        verify_artifact(dir, artifact)?;
    }
    Ok(Image { dir: dir.to_path_buf(), digest, manifest })
}

fn verify_artifact(dir: &Path, artifact: &Artifact) -> Result<(), NodeImageError> {
    if artifact.path.contains('/') || artifact.path.starts_with('.') {
        return Err(NodeImageError::BadArtifactPath { path: artifact.path.clone() });
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
    let io = |source| NodeImageError::Io { path: path.to_path_buf(), source };
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
        Err(source) => return Err(NodeImageError::Io { path: image_dir.to_path_buf(), source }),
    };
    let mut images = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|source| NodeImageError::Io { path: image_dir.to_path_buf(), source })?;
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
