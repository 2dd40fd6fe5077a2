//! Which Kubernetes a cluster gets and where its files come from: the spec's version or release
//! channel, resolved against the artifact source (`upstream` downloads or a local `bundle`), every
//! file verified against its checksum before anything is installed.
//!
//! [`check_spec`] is the plan-time check (no download, no hashing): an unsupported version is
//! refused before any machine exists. [`resolve`] opens (or downloads) and verifies the bundle.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use crate::bundle::upstream::UpstreamSource;
use crate::bundle::{self, Bundle, BundleError, KubeVersion};
use crate::spec::{self, ArtifactSource, ReleaseChannel};

/// The Kubernetes version each release channel follows with `upstream` artifacts. Only one minor
/// is supported, so every channel follows its newest patch release; with a `bundle` the bundle's
/// version is used.
pub fn channel_version(channel: ReleaseChannel) -> KubeVersion {
    let _ = channel;
    KubeVersion {
        major: 1,
        minor: 20,
        patch: 15,
    }
}

/// Why a cluster's Kubernetes artifacts cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ArtifactError {
    /// The version is outside what the templates and the bundle format support.
    #[error("kubernetes.version {version}: {reason}")]
    Unsupported {
        /// The version asked for.
        version: String,
        /// Why, naming what is supported.
        reason: String,
    },
    /// The bundle holds another version than the spec asks for.
    #[error(
        "the bundle {path} holds Kubernetes {bundle} but kubernetes.version is {spec}; use a bundle of {spec} or set kubernetes.version: \"{bundle}\""
    )]
    VersionMismatch {
        /// The bundle.
        path: PathBuf,
        /// Its version.
        bundle: String,
        /// The spec's version.
        spec: String,
    },
    /// The bundle cannot be opened or does not verify.
    #[error("kubernetes.artifacts.bundle {path}")]
    Bundle {
        /// The bundle path.
        path: PathBuf,
        /// What is wrong with it.
        #[source]
        source: BundleError,
    },
    /// Downloading the upstream release failed.
    #[error(
        "downloading Kubernetes {version} from the upstream release (an air-gapped site sets kubernetes.artifacts.bundle instead)"
    )]
    Download {
        /// The version.
        version: String,
        /// What failed.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// The bundle lacks a file the nodes need.
    #[error("the bundle {path} has no {what}; rebuild it")]
    Missing {
        /// The bundle.
        path: PathBuf,
        /// What is missing.
        what: String,
    },
}

/// One verified file to copy to nodes.
#[derive(Debug, Clone)]
pub struct ArtifactFile {
    /// Local path (in the bundle).
    pub path: PathBuf,
    /// sha256 (hex) from the manifest, verified.
    pub sha256: String,
}

impl ArtifactFile {
    /// The verified sha256, if the manifest gave one (an image archive the manifest does not
    /// list as a file has none): uploads then compare it with a node's copy without hashing
    /// the file again.
    pub fn known_sha256(&self) -> Option<String> {
        let hex = self.sha256.len() == 64 && self.sha256.bytes().all(|b| b.is_ascii_hexdigit());
        hex.then(|| self.sha256.to_ascii_lowercase())
    }
}

/// One container image archive to import on every node.
#[derive(Debug, Clone)]
pub struct ArtifactImage {
    /// Image reference the archive is tagged with.
    pub reference: String,
    /// The archive.
    pub file: ArtifactFile,
}

/// The verified artifacts of one Kubernetes version.
pub struct Artifacts {
    /// Kubernetes version without `v` (`1.20.2`).
    pub version: String,
    /// etcd version.
    pub etcd_version: String,
    /// Pod sandbox image reference.
    pub pause_image: String,
    /// Binaries by name (`kubelet`, `etcd`, ...).
    pub binaries: BTreeMap<String, ArtifactFile>,
    /// Image archives.
    pub images: Vec<ArtifactImage>,
    /// Where they came from, for messages.
    pub origin: String,
    // An unpacked tarball lives as long as this.
    _bundle: Bundle,
}

impl std::fmt::Debug for Artifacts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Artifacts")
            .field("version", &self.version)
            .field("origin", &self.origin)
            .finish_non_exhaustive()
    }
}

impl Artifacts {
    /// A binary by name, or an error naming the bundle.
    pub fn binary(&self, name: &str) -> Result<&ArtifactFile, ArtifactError> {
        self.binaries
            .get(name)
            .ok_or_else(|| ArtifactError::Missing {
                path: PathBuf::from(&self.origin),
                what: format!("bin/{name}"),
            })
    }
}

fn check_version(version: &KubeVersion) -> Result<(), ArtifactError> {
    let unsupported = |reason: String| ArtifactError::Unsupported {
        version: version.to_string(),
        reason,
    };
    bundle::check_supported(version).map_err(|e| unsupported(e.to_string()))?;
    templates::kubernetes::check_version(&version.to_string())
        .map_err(|e| unsupported(e.to_string()))?;
    Ok(())
}

fn spec_version(k: &spec::Kubernetes) -> Option<KubeVersion> {
    k.version.as_ref().map(|v| KubeVersion {
        major: v.major,
        minor: v.minor,
        patch: v.patch,
    })
}

/// The plan-time check: the version the spec asks for (or the bundle holds) is supported and,
/// with a bundle, matches it. Reads only the bundle's manifest; hashes nothing, downloads
/// nothing. Returns the version.
pub fn check_spec(spec: &spec::Cluster) -> Result<KubeVersion, ArtifactError> {
    checked_spec(spec).map(|(version, _)| version)
}

/// [`check_spec`], also returning the bundle it opened (a tarball is unpacked once per run).
fn checked_spec(spec: &spec::Cluster) -> Result<(KubeVersion, Option<Bundle>), ArtifactError> {
    let k = &spec.spec.kubernetes;
    let mut opened = None;
    let version = match &k.artifacts {
        ArtifactSource::Upstream => spec_version(k)
            .unwrap_or_else(|| channel_version(k.channel.unwrap_or(ReleaseChannel::Stable))),
        ArtifactSource::Bundle(b) => {
            let bundle = Bundle::open(&b.path).map_err(|source| ArtifactError::Bundle {
                path: b.path.clone(),
                source,
            })?;
            let have = bundle.manifest().kubernetes_version;
            if let Some(want) = spec_version(k)
                && want != have
            {
                return Err(ArtifactError::VersionMismatch {
                    path: b.path.clone(),
                    bundle: have.to_string(),
                    spec: want.to_string(),
                });
            }
            opened = Some(bundle);
            have
        }
    };
    check_version(&version)?;
    Ok((version, opened))
}

/// Resolves and verifies the artifacts of `spec`: opens the bundle, or downloads the upstream
/// release into `download_root/<version>` (reused when it verifies), then checks every file's
/// sha256 against the manifest. Nothing is installed anywhere before this succeeds.
pub async fn resolve(
    spec: &spec::Cluster,
    download_root: &Path,
) -> Result<Artifacts, ArtifactError> {
    let (version, opened) = checked_spec(spec)?;
    let (bundle, path) = match &spec.spec.kubernetes.artifacts {
        ArtifactSource::Bundle(b) => (
            match opened {
                Some(bundle) => bundle,
                None => Bundle::open(&b.path).map_err(|source| ArtifactError::Bundle {
                    path: b.path.clone(),
                    source,
                })?,
            },
            b.path.clone(),
        ),
        ArtifactSource::Upstream => {
            let dest = download_root.join(version.to_string());
            let source = UpstreamSource::new(version).map_err(|e| ArtifactError::Unsupported {
                version: version.to_string(),
                reason: e.to_string(),
            })?;
            let client = bundle::upstream::client().map_err(|e| ArtifactError::Download {
                version: version.to_string(),
                source: Box::new(e),
            })?;
            let registry = crate::registry::RegistryClient::new(None).map_err(|e| {
                ArtifactError::Download {
                    version: version.to_string(),
                    source: Box::new(e),
                }
            })?;
            let bundle = source
                .plan()
                .fetch(&client, &registry, &dest)
                .await
                .map_err(|e| ArtifactError::Download {
                    version: version.to_string(),
                    source: Box::new(e),
                })?;
            (bundle, dest)
        }
    };
    // Hashing half a gigabyte is CPU work: off the async threads.
    type Collected = (Bundle, BTreeMap<String, ArtifactFile>, Vec<ArtifactImage>);
    let (bundle, binaries, images) =
        tokio::task::spawn_blocking(move || -> Result<Collected, BundleError> {
            let verified = bundle.verify()?;
            let mut binaries = BTreeMap::new();
            for (entry, local) in verified.files() {
                if let Some(name) = entry.path.strip_prefix("bin/") {
                    binaries.insert(
                        name.to_owned(),
                        ArtifactFile {
                            path: local,
                            sha256: entry.sha256.clone(),
                        },
                    );
                }
            }
            let images = verified
                .images()
                .map(|(entry, local)| ArtifactImage {
                    reference: entry.reference.clone(),
                    file: ArtifactFile {
                        path: local,
                        sha256: verified
                            .manifest()
                            .file(&entry.path)
                            .map(|f| f.sha256.clone())
                            .unwrap_or_default(),
                    },
                })
                .collect();

            Ok((bundle, binaries, images))
        })
        .await
        .map_err(|e| ArtifactError::Download {
            version: version.to_string(),
            source: Box::new(e),
        })?
        .map_err(|source| ArtifactError::Bundle {
            path: path.clone(),
            source,
        })?;
    let manifest = bundle.manifest();
    Ok(Artifacts {
        version: manifest.kubernetes_version.to_string(),
        etcd_version: manifest.etcd_version.clone(),
        pause_image: manifest.pause_image.clone(),
        binaries,
        images,
        origin: path.display().to_string(),
        _bundle: bundle,
    })
}
