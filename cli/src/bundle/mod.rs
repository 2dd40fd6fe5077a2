//! Kubernetes artifact bundles: the binaries, etcd and container images a cluster is built from.
//!
//! A bundle is a directory (or a `.tar.gz` of one) with a [`Manifest`] (`bundle.json`) naming the
//! Kubernetes and etcd versions, the pause image reference and the sha256 and size of every file.
//! Two sources produce one:
//! - `bundle`: a local directory or tarball for air-gapped sites ([`Bundle::open`]); the offline
//!   test bundle is built by `tests/bed/build-k8s-bundle.sh`.
//! - `upstream`: the official release binaries and etcd's release, downloaded once on the admin
//!   machine with checksum verification ([`upstream`]), then copied to nodes, which need no internet.
//!
//! Nothing is installed from a bundle before [`Bundle::verify`] has checked every file; the
//! [`VerifiedBundle`] it returns is the only way to reach the files for installation.

mod archive;
pub mod manifest;
pub mod upstream;
pub mod version;

use std::fs::File;
use std::io::{self, Read};
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

pub use manifest::{BundleSource, FileEntry, ImageEntry, MANIFEST_FILE, Manifest};
pub use version::{KubeVersion, SUPPORTED_MINORS, SupportedMinor, check_supported};

/// Errors opening, checking or fetching a bundle.
#[derive(Debug, thiserror::Error)]
pub enum BundleError {
    /// The bundle path does not exist or is neither a directory nor a `.tar.gz`.
    #[error(
        "bundle {path} is neither a directory nor a .tar.gz file; pass a bundle directory or its tarball"
    )]
    NotABundle {
        /// The path given.
        path: PathBuf,
    },
    /// A bundle directory lacks `bundle.json`.
    #[error(
        "no bundle.json in {path}; this is not a clusterctl bundle (build one with tests/bed/build-k8s-bundle.sh)"
    )]
    NoManifest {
        /// The directory searched.
        path: PathBuf,
    },
    /// `bundle.json` could not be read.
    #[error("cannot read bundle manifest {path}")]
    ReadManifest {
        /// The manifest path.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: io::Error,
    },
    /// `bundle.json` is not valid JSON of the expected shape (truncated, wrong types, unknown fields).
    #[error("bundle manifest {path} is malformed or truncated; rebuild or re-download the bundle")]
    ParseManifest {
        /// The manifest path.
        path: PathBuf,
        /// The JSON error, with line and column.
        #[source]
        source: serde_json::Error,
    },
    /// The manifest's format version is not the one this clusterctl reads.
    #[error(
        "bundle manifest {path} has format version {found}, this clusterctl reads version {supported}; use a \
         matching clusterctl or rebuild the bundle"
    )]
    UnsupportedFormat {
        /// The manifest path.
        path: PathBuf,
        /// The version found.
        found: u32,
        /// The version supported.
        supported: u32,
    },
    /// The manifest parsed but is inconsistent.
    #[error("bundle manifest {path} is invalid: {reason}")]
    InvalidManifest {
        /// The manifest path.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// A path in the manifest or archive could leave the bundle directory.
    #[error(
        "bundle lists an unsafe path {path:?}: paths must be relative, without `.` or `..` segments"
    )]
    UnsafePath {
        /// The offending path.
        path: String,
    },
    /// A version string is not `MAJOR.MINOR.PATCH`.
    #[error(
        "{value:?} is not a Kubernetes release version (expected MAJOR.MINOR.PATCH, e.g. 1.20.2)"
    )]
    InvalidVersion {
        /// The string given.
        value: String,
    },
    /// The Kubernetes minor version is not in [`SUPPORTED_MINORS`].
    #[error(
        "kubernetes {version} is not supported: this clusterctl supports {supported}; choose a supported version \
         or upgrade clusterctl"
    )]
    UnsupportedVersion {
        /// The version asked for.
        version: KubeVersion,
        /// The supported minor versions.
        supported: String,
    },
    /// A file listed in the manifest is absent.
    #[error(
        "bundle file {path} is missing from {root}; the bundle is incomplete, rebuild or re-download it"
    )]
    MissingFile {
        /// The bundle root.
        root: PathBuf,
        /// The file's path in the bundle.
        path: String,
    },
    /// A listed file is a symlink, directory or device rather than a regular file.
    #[error(
        "bundle file {path} in {root} is not a regular file; the bundle was altered, rebuild or re-download it"
    )]
    NotARegularFile {
        /// The bundle root.
        root: PathBuf,
        /// The file's path in the bundle.
        path: String,
    },
    /// A listed file has another size than the manifest says.
    #[error(
        "bundle file {path} has {actual} bytes, the manifest says {expected}; the file is truncated or altered, \
         rebuild or re-download the bundle"
    )]
    SizeMismatch {
        /// The file's path in the bundle.
        path: String,
        /// Size from the manifest.
        expected: u64,
        /// Size on disk.
        actual: u64,
    },
    /// A listed file has another sha256 than the manifest says.
    #[error(
        "bundle file {path} has sha256 {actual}, the manifest says {expected}; the file is corrupt or altered, \
         rebuild or re-download the bundle"
    )]
    ChecksumMismatch {
        /// The file's path in the bundle.
        path: String,
        /// Checksum from the manifest.
        expected: String,
        /// Checksum of the content.
        actual: String,
    },
    /// Reading a bundle file failed.
    #[error("cannot read bundle file {path}")]
    ReadFile {
        /// The file on disk.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: io::Error,
    },
    /// Unpacking a bundle tarball failed.
    #[error("cannot unpack bundle archive {path}")]
    Archive {
        /// The archive.
        path: PathBuf,
        /// The I/O error (corrupt gzip or tar, disk full).
        #[source]
        source: io::Error,
    },
    /// A tarball holds an entry that is not a plain file or directory inside the bundle.
    #[error(
        "bundle archive {path} holds {entry:?}, which is not a plain file or directory inside the bundle; refusing \
         to unpack it"
    )]
    UnsafeArchiveEntry {
        /// The archive.
        path: PathBuf,
        /// The entry's name.
        entry: String,
    },
}

/// An opened bundle: its root directory and parsed manifest. Files are not yet checked.
pub struct Bundle {
    root: PathBuf,
    manifest: Manifest,
    // Keeps an unpacked tarball alive as long as the bundle; removed on drop.
    _unpacked: Option<tempfile::TempDir>,
}

impl std::fmt::Debug for Bundle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Bundle")
            .field("root", &self.root)
            .field("kubernetes_version", &self.manifest.kubernetes_version)
            .finish_non_exhaustive()
    }
}

impl Bundle {
    /// Opens a bundle directory, or a `.tar.gz`/`.tgz` of one (unpacked into a temporary directory
    /// that lives as long as the returned value). Parses and validates the manifest only.
    pub fn open(path: &Path) -> Result<Bundle, BundleError> {
        if path.is_dir() {
            return Self::open_dir(path.to_path_buf(), None);
        }
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        if path.is_file() && (name.ends_with(".tar.gz") || name.ends_with(".tgz")) {
            let dir = tempfile::Builder::new()
                .prefix("clusterctl-bundle-")
                .tempdir()
                .map_err(|source| BundleError::Archive {
                    path: path.to_path_buf(),
                    source,
                })?;
            let root = archive::unpack_tar_gz(path, dir.path())?;
            return Self::open_dir(root, Some(dir));
        }
        Err(BundleError::NotABundle {
            path: path.to_path_buf(),
        })
    }

    fn open_dir(root: PathBuf, unpacked: Option<tempfile::TempDir>) -> Result<Bundle, BundleError> {
        let manifest_path = root.join(MANIFEST_FILE);
        let bytes = match std::fs::read(&manifest_path) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Err(BundleError::NoManifest { path: root });
            }
            Err(source) => {
                return Err(BundleError::ReadManifest {
                    path: manifest_path,
                    source,
                });
            }
        };
        let manifest = Manifest::from_json(&bytes, &manifest_path)?;
        Ok(Bundle {
            root,
            manifest,
            _unpacked: unpacked,
        })
    }

    /// The bundle's root directory (the unpacked copy for a tarball).
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The parsed manifest.
    pub fn manifest(&self) -> &Manifest {
        &self.manifest
    }

    /// The supported-versions entry for this bundle's Kubernetes version, or a clear error.
    pub fn check_supported(&self) -> Result<&'static SupportedMinor, BundleError> {
        check_supported(&self.manifest.kubernetes_version)
    }

    /// Checks every listed file's size and sha256 against the manifest. Sizes are checked for all
    /// files first, so a missing or truncated file is reported without hashing hundreds of MB.
    /// The error names the first bad file.
    pub fn verify(&self) -> Result<VerifiedBundle<'_>, BundleError> {
        for entry in &self.manifest.files {
            let path = self.root.join(&entry.path);
            let meta = match std::fs::symlink_metadata(&path) {
                Ok(meta) => meta,
                Err(e) if e.kind() == io::ErrorKind::NotFound => {
                    return Err(BundleError::MissingFile {
                        root: self.root.clone(),
                        path: entry.path.clone(),
                    });
                }
                Err(source) => return Err(BundleError::ReadFile { path, source }),
            };
            if !meta.file_type().is_file() {
                return Err(BundleError::NotARegularFile {
                    root: self.root.clone(),
                    path: entry.path.clone(),
                });
            }
            if meta.len() != entry.size {
                return Err(BundleError::SizeMismatch {
                    path: entry.path.clone(),
                    expected: entry.size,
                    actual: meta.len(),
                });
            }
        }
        for entry in &self.manifest.files {
            let path = self.root.join(&entry.path);
            let actual =
                sha256_file(&path).map_err(|source| BundleError::ReadFile { path, source })?;
            if actual != entry.sha256 {
                return Err(BundleError::ChecksumMismatch {
                    path: entry.path.clone(),
                    expected: entry.sha256.clone(),
                    actual,
                });
            }
        }
        Ok(VerifiedBundle { bundle: self })
    }
}

/// A bundle whose files all matched the manifest when [`Bundle::verify`] ran.
#[derive(Debug, Clone, Copy)]
pub struct VerifiedBundle<'a> {
    bundle: &'a Bundle,
}

impl<'a> VerifiedBundle<'a> {
    /// The manifest.
    pub fn manifest(&self) -> &'a Manifest {
        &self.bundle.manifest
    }

    /// The bundle root.
    pub fn root(&self) -> &'a Path {
        &self.bundle.root
    }

    /// Path on disk of a binary under `bin/` (e.g. `kube-apiserver`), if the manifest lists it.
    pub fn binary(&self, name: &str) -> Option<PathBuf> {
        let rel = format!("bin/{name}");
        self.bundle
            .manifest
            .file(&rel)
            .map(|_| self.bundle.root.join(rel))
    }

    /// Every listed file: its manifest entry and its path on disk.
    pub fn files(&self) -> impl Iterator<Item = (&'a FileEntry, PathBuf)> + 'a {
        let root = &self.bundle.root;
        self.bundle
            .manifest
            .files
            .iter()
            .map(move |f| (f, root.join(&f.path)))
    }

    /// The image archives with their paths on disk.
    pub fn images(&self) -> impl Iterator<Item = (&'a ImageEntry, PathBuf)> + 'a {
        let root = &self.bundle.root;
        self.bundle
            .manifest
            .images
            .iter()
            .map(move |i| (i, root.join(&i.path)))
    }
}

/// Lowercase hex sha256 of a file's content, read in 1 MiB chunks.
pub fn sha256_file(path: &Path) -> io::Result<String> {
    let mut file = File::open(path)?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut buf)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(hex::encode(hasher.finalize()))
}

#[cfg(test)]
mod tests;
