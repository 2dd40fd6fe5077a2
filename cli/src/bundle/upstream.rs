//! The `upstream` artifact source: official Kubernetes release binaries and etcd's release,
//! downloaded once on the admin machine, each checked against its published sha256, and written
//! as a bundle directory (with its own `bundle.json`) that is then used like any local bundle.
//!
//! - Kubernetes: `https://dl.k8s.io/release/v{version}/bin/linux/amd64/{binary}`, checksum in
//!   `{binary}.sha256` next to it (the file holds the bare hex digest).
//! - etcd: `https://github.com/etcd-io/etcd/releases/download/v{etcd}/etcd-v{etcd}-linux-amd64.tar.gz`,
//!   checksum in the release's `SHA256SUMS` (`<hex>  <file name>` lines); `etcd` and `etcdctl`
//!   are taken out of the tarball.
//!
//! Checksums are fetched over HTTPS (rustls); plain `http://` is accepted only for loopback hosts,
//! which is what the tests use.
//! - Images: the pause image (`pauseImage`) and CoreDNS of the version are pulled for linux/amd64
//!   with clusterctl's registry client ([`crate::registry`], digests verified) into
//!   `images/<name>-<tag>.tar` (OCI layout archives), so nodes import them with the bundle's
//!   other files and never reach a registry.

use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use sha2::{Digest, Sha256};
use tokio::io::AsyncWriteExt;

use super::manifest::{
    BundleSource, FORMAT_VERSION, FileEntry, ImageEntry, MANIFEST_FILE, Manifest,
};
use super::version::{KubeVersion, check_supported};
use super::{Bundle, BundleError, sha256_file};

/// Official Kubernetes release downloads.
pub const KUBERNETES_RELEASE_BASE: &str = "https://dl.k8s.io/release";
/// etcd's GitHub release downloads.
pub const ETCD_RELEASE_BASE: &str = "https://github.com/etcd-io/etcd/releases/download";

/// Kubernetes binaries an upstream bundle downloads (`bin/linux/amd64/<name>`).
pub const KUBERNETES_BINARIES: &[&str] = &[
    "kube-apiserver",
    "kube-controller-manager",
    "kube-scheduler",
    "kubelet",
    "kube-proxy",
    "kubeadm",
    "kubectl",
];

/// Errors downloading an upstream release.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    /// The version is unsupported or malformed.
    #[error(transparent)]
    Bundle(#[from] BundleError),
    /// A URL is not HTTPS and not on a loopback host.
    #[error(
        "refusing to download {url} over plain http; release files and checksums must come over https"
    )]
    InsecureUrl {
        /// The URL.
        url: String,
    },
    /// The request failed (connection, TLS, timeout).
    #[error("cannot download {url}; check the network or proxy and run the command again")]
    Http {
        /// The URL.
        url: String,
        /// The client error.
        #[source]
        source: reqwest::Error,
    },
    /// The server answered with a non-success status.
    #[error("download of {url} failed with HTTP status {status}")]
    HttpStatus {
        /// The URL.
        url: String,
        /// The status code.
        status: u16,
    },
    /// The checksum file does not hold a usable sha256 for the artifact.
    #[error("checksum file {url} has no valid sha256 for {name}")]
    ChecksumFile {
        /// The checksum file's URL.
        url: String,
        /// The artifact it should describe.
        name: String,
    },
    /// The downloaded content does not match its published checksum.
    #[error(
        "{url} has sha256 {actual}, the published checksum is {expected}; the download is corrupt or was \
         tampered with and was discarded"
    )]
    ChecksumMismatch {
        /// The artifact's URL.
        url: String,
        /// Published checksum.
        expected: String,
        /// Checksum of what arrived.
        actual: String,
    },
    /// A release tarball lacks a member we need.
    #[error("release archive {url} does not contain {member}")]
    MissingMember {
        /// The archive's URL.
        url: String,
        /// The member path.
        member: String,
    },
    /// An image of the bundle could not be pulled.
    #[error("cannot pull {reference} into the bundle: {source}")]
    Image {
        /// The image.
        reference: String,
        /// Why.
        #[source]
        source: crate::registry::RegistryError,
    },
    /// Writing the downloaded files failed.
    #[error("cannot write {path}")]
    Write {
        /// The file or directory.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: io::Error,
    },
}

/// Where a download's expected sha256 is published.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ChecksumSource {
    /// A file whose content is the bare hex digest (dl.k8s.io's `<binary>.sha256`).
    DigestFile {
        /// URL of the `.sha256` file.
        url: String,
    },
    /// A `SHA256SUMS` file with `<hex>  <name>` lines.
    SumsFile {
        /// URL of the sums file.
        url: String,
        /// The name to look up.
        name: String,
    },
}

impl ChecksumSource {
    fn url(&self) -> &str {
        match self {
            ChecksumSource::DigestFile { url } | ChecksumSource::SumsFile { url, .. } => url,
        }
    }
}

/// What to do with a downloaded, verified file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Placement {
    /// Install it as this bundle path (`bin/kubelet`).
    File {
        /// Destination path in the bundle.
        path: String,
    },
    /// Take members out of a `.tar.gz` into bundle paths: `(member, bundle path)`.
    Extract {
        /// Archive members and their destinations.
        members: Vec<(String, String)>,
    },
}

/// One download with its checksum source and destination.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlannedDownload {
    /// URL of the artifact.
    pub url: String,
    /// Where its published sha256 is.
    pub checksum: ChecksumSource,
    /// Where it goes in the bundle.
    pub placement: Placement,
}

/// The full list of downloads for an upstream bundle; pure data, printable before anything runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DownloadPlan {
    /// Kubernetes version.
    pub kubernetes_version: KubeVersion,
    /// etcd version.
    pub etcd_version: String,
    /// Pause image the bundle will name.
    pub pause_image: String,
    /// The downloads, in order.
    pub downloads: Vec<PlannedDownload>,
    /// Images pulled into the bundle (the pause image and CoreDNS): `(reference, bundle path)`.
    pub images: Vec<(String, String)>,
}

/// The upstream source for one Kubernetes version.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpstreamSource {
    kubernetes_version: KubeVersion,
    etcd_version: String,
    pause_image: String,
    kubernetes_base: String,
    etcd_base: String,
    images: Vec<String>,
}

impl UpstreamSource {
    /// The official release locations for `version`; refuses versions outside the supported table.
    pub fn new(version: KubeVersion) -> Result<UpstreamSource, BundleError> {
        let supported = check_supported(&version)?;
        let mut images = vec![supported.pause_image.to_string()];
        if let Ok(profile) = templates::kubernetes::check_version(&version.to_string()) {
            images.push(profile.coredns_image.to_string());
        }
        Ok(UpstreamSource {
            kubernetes_version: version,
            etcd_version: supported.etcd_version.to_string(),
            pause_image: supported.pause_image.to_string(),
            kubernetes_base: KUBERNETES_RELEASE_BASE.to_string(),
            etcd_base: ETCD_RELEASE_BASE.to_string(),
            images,
        })
    }

    /// Replaces the images pulled into the bundle (default: the pause image and CoreDNS).
    pub fn with_images(mut self, images: Vec<String>) -> UpstreamSource {
        self.images = images;
        self
    }

    /// Replaces the release base URLs (a mirror, or a test server on 127.0.0.1).
    pub fn with_base_urls(mut self, kubernetes_base: &str, etcd_base: &str) -> UpstreamSource {
        self.kubernetes_base = kubernetes_base.trim_end_matches('/').to_string();
        self.etcd_base = etcd_base.trim_end_matches('/').to_string();
        self
    }

    /// The downloads that make up the bundle.
    pub fn plan(&self) -> DownloadPlan {
        let kv = self.kubernetes_version.with_v();
        let mut downloads: Vec<PlannedDownload> = KUBERNETES_BINARIES
            .iter()
            .map(|bin| {
                let url = format!("{}/{kv}/bin/linux/amd64/{bin}", self.kubernetes_base);
                PlannedDownload {
                    checksum: ChecksumSource::DigestFile {
                        url: format!("{url}.sha256"),
                    },
                    url,
                    placement: Placement::File {
                        path: format!("bin/{bin}"),
                    },
                }
            })
            .collect();
        let ev = &self.etcd_version;
        let tarball = format!("etcd-v{ev}-linux-amd64.tar.gz");
        let dir = format!("etcd-v{ev}-linux-amd64");
        downloads.push(PlannedDownload {
            url: format!("{}/v{ev}/{tarball}", self.etcd_base),
            checksum: ChecksumSource::SumsFile {
                url: format!("{}/v{ev}/SHA256SUMS", self.etcd_base),
                name: tarball,
            },
            placement: Placement::Extract {
                members: vec![
                    (format!("{dir}/etcd"), "bin/etcd".to_string()),
                    (format!("{dir}/etcdctl"), "bin/etcdctl".to_string()),
                ],
            },
        });
        DownloadPlan {
            kubernetes_version: self.kubernetes_version,
            etcd_version: self.etcd_version.clone(),
            pause_image: self.pause_image.clone(),
            downloads,
            images: self
                .images
                .iter()
                .map(|r| (r.clone(), image_path(r)))
                .collect(),
        }
    }
}

/// The bundle path of an image archive: `images/<last path component>-<tag>.tar`.
fn image_path(reference: &str) -> String {
    let name = reference
        .rsplit('/')
        .next()
        .unwrap_or(reference)
        .replace([':', '@'], "-");
    let name: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "._-".contains(c) {
                c
            } else {
                '_'
            }
        })
        .collect();
    format!("images/{name}.tar")
}

/// An HTTP client for release downloads: rustls with the system's roots, timeouts set.
pub fn client() -> Result<reqwest::Client, reqwest::Error> {
    reqwest::Client::builder()
        .connect_timeout(Duration::from_secs(30))
        .read_timeout(Duration::from_secs(120))
        .user_agent(concat!("clusterctl/", env!("CARGO_PKG_VERSION")))
        .build()
}

impl DownloadPlan {
    /// Downloads everything into the bundle directory `dest`, verifying each file against its
    /// published sha256 before it is placed, then writes `bundle.json` and returns the opened bundle.
    ///
    /// Idempotent: if `dest` already holds a bundle for this version whose files verify, nothing is
    /// downloaded. Files are written under `dest/.partial` and moved into place only after their
    /// checksum matched, so a killed run never leaves an unverified file where a verified one belongs.
    ///
    /// Images come from their registries through `registry` (a mirror configured there serves
    /// them), each checked against its digests.
    pub async fn fetch(
        &self,
        client: &reqwest::Client,
        registry: &crate::registry::RegistryClient,
        dest: &Path,
    ) -> Result<Bundle, UpstreamError> {
        if dest.join(MANIFEST_FILE).is_file()
            && let Ok(bundle) = Bundle::open(dest)
            && bundle.manifest().kubernetes_version == self.kubernetes_version
            && self.images.iter().all(|(r, _)| {
                let full = crate::registry::ImageRef::parse(r)
                    .map(|r| r.full())
                    .unwrap_or_default();
                bundle.manifest().images.iter().any(|i| i.reference == full)
            })
            && bundle.verify().is_ok()
        {
            tracing::info!(bundle = %dest.display(), "upstream bundle already downloaded and verified");
            return Ok(bundle);
        }
        let write_err = |path: &Path| {
            let path = path.to_path_buf();
            move |source| UpstreamError::Write { path, source }
        };
        let partial = dest.join(".partial");
        std::fs::create_dir_all(&partial).map_err(write_err(&partial))?;
        let mut placed = Vec::new();
        for download in &self.downloads {
            let expected = fetch_checksum(client, &download.checksum).await?;
            let tmp = partial.join(format!("download-{}", placed.len()));
            tracing::info!(url = %download.url, "downloading");
            let actual = download_to(client, &download.url, &tmp).await?;
            if actual != expected {
                let _ = std::fs::remove_file(&tmp);
                return Err(UpstreamError::ChecksumMismatch {
                    url: download.url.clone(),
                    expected,
                    actual,
                });
            }
            match &download.placement {
                Placement::File { path } => {
                    place(&tmp, &dest.join(path))?;
                    placed.push(path.clone());
                }
                Placement::Extract { members } => {
                    extract_members(&tmp, &download.url, members, dest)?;
                    let _ = std::fs::remove_file(&tmp);
                    placed.extend(members.iter().map(|(_, path)| path.clone()));
                }
            }
        }
        let images_dir = dest.join("images");
        if !self.images.is_empty() {
            std::fs::create_dir_all(&images_dir).map_err(write_err(&images_dir))?;
        }
        let mut images = Vec::new();
        for (reference, path) in &self.images {
            tracing::info!(image = %reference, "pulling");
            let pulled = registry
                .pull_to_archive(reference, &dest.join(path))
                .await
                .map_err(|source| UpstreamError::Image {
                    reference: reference.clone(),
                    source,
                })?;
            tracing::info!(image = %pulled.reference, digest = %pulled.manifest_digest, bytes = pulled.bytes_fetched, "pulled");
            placed.push(path.clone());
            images.push(ImageEntry {
                reference: pulled.reference,
                path: path.clone(),
            });
        }
        let _ = std::fs::remove_dir_all(&partial);

        let mut files = Vec::new();
        for path in placed {
            let on_disk = dest.join(&path);
            let sha256 = sha256_file(&on_disk).map_err(write_err(&on_disk))?;
            let size = std::fs::metadata(&on_disk)
                .map_err(write_err(&on_disk))?
                .len();
            files.push(FileEntry { path, sha256, size });
        }
        let manifest = Manifest {
            format_version: FORMAT_VERSION,
            kubernetes_version: self.kubernetes_version,
            etcd_version: self.etcd_version.clone(),
            pause_image: self.pause_image.clone(),
            images,
            files,
            source: Some(BundleSource {
                kind: "upstream".to_string(),
                same_code_as: None,
                details: self
                    .downloads
                    .iter()
                    .map(|d| {
                        (
                            d.url.clone(),
                            serde_json::Value::String(d.checksum.url().to_string()),
                        )
                    })
                    .collect(),
            }),
        };
        let manifest_path = dest.join(MANIFEST_FILE);
        let json = serde_json::to_vec_pretty(&manifest).map_err(|e| UpstreamError::Write {
            path: manifest_path.clone(),
            source: io::Error::other(e),
        })?;
        write_atomic(&manifest_path, &json)?;
        let bundle = Bundle::open(dest)?;
        bundle.verify()?;
        Ok(bundle)
    }
}

fn check_url(url: &str) -> Result<reqwest::Url, UpstreamError> {
    let insecure = || UpstreamError::InsecureUrl {
        url: url.to_string(),
    };
    let parsed = reqwest::Url::parse(url).map_err(|_| insecure())?;
    match parsed.scheme() {
        "https" => Ok(parsed),
        "http" => {
            let host = parsed.host_str().unwrap_or_default();
            let host = host.trim_start_matches('[').trim_end_matches(']');
            let loopback = host == "localhost"
                || host
                    .parse::<std::net::IpAddr>()
                    .is_ok_and(|ip| ip.is_loopback());
            if loopback {
                Ok(parsed)
            } else {
                Err(insecure())
            }
        }
        _ => Err(insecure()),
    }
}

async fn get(client: &reqwest::Client, url: &str) -> Result<reqwest::Response, UpstreamError> {
    let parsed = check_url(url)?;
    let http = |source| UpstreamError::Http {
        url: url.to_string(),
        source,
    };
    let response = client.get(parsed).send().await.map_err(http)?;
    let status = response.status();
    if !status.is_success() {
        return Err(UpstreamError::HttpStatus {
            url: url.to_string(),
            status: status.as_u16(),
        });
    }
    Ok(response)
}

/// Fetches and parses a published checksum. Checksum files are small; 64 KiB is plenty.
async fn fetch_checksum(
    client: &reqwest::Client,
    source: &ChecksumSource,
) -> Result<String, UpstreamError> {
    let url = source.url();
    let response = get(client, url).await?;
    if response.content_length().is_some_and(|n| n > 64 * 1024) {
        return Err(UpstreamError::ChecksumFile {
            url: url.to_string(),
            name: "(file too large)".to_string(),
        });
    }
    let body = response
        .text()
        .await
        .map_err(|source| UpstreamError::Http {
            url: url.to_string(),
            source,
        })?;
    let name = match source {
        ChecksumSource::DigestFile { url } => url
            .rsplit('/')
            .next()
            .unwrap_or(url)
            .trim_end_matches(".sha256"),
        ChecksumSource::SumsFile { name, .. } => name,
    };
    parse_checksum(source, &body).ok_or_else(|| UpstreamError::ChecksumFile {
        url: url.to_string(),
        name: name.to_string(),
    })
}

/// Extracts the expected digest from a checksum file's text.
pub fn parse_checksum(source: &ChecksumSource, body: &str) -> Option<String> {
    let is_hex = |s: &str| s.len() == 64 && s.bytes().all(|b| b.is_ascii_hexdigit());
    let digest = match source {
        // dl.k8s.io serves the bare digest; tolerate a trailing "  name" as sha256sum writes it.
        ChecksumSource::DigestFile { .. } => {
            body.split_whitespace().next().filter(|d| is_hex(d))?
        }
        ChecksumSource::SumsFile { name, .. } => body.lines().find_map(|line| {
            let mut parts = line.split_whitespace();
            let digest = parts.next()?;
            // sha256sum marks binary mode with a leading '*' on the name.
            let file = parts.next()?.trim_start_matches('*');
            (file == name && parts.next().is_none() && is_hex(digest)).then_some(digest)
        })?,
    };
    Some(digest.to_ascii_lowercase())
}

/// Streams `url` into `path`, hashing on the way; returns the hex sha256.
async fn download_to(
    client: &reqwest::Client,
    url: &str,
    path: &Path,
) -> Result<String, UpstreamError> {
    let mut response = get(client, url).await?;
    let write_err = |source| UpstreamError::Write {
        path: path.to_path_buf(),
        source,
    };
    let mut file = tokio::fs::File::create(path).await.map_err(write_err)?;
    let mut hasher = Sha256::new();
    while let Some(chunk) = response
        .chunk()
        .await
        .map_err(|source| UpstreamError::Http {
            url: url.to_string(),
            source,
        })?
    {
        hasher.update(&chunk);
        file.write_all(&chunk).await.map_err(write_err)?;
    }
    file.flush().await.map_err(write_err)?;
    file.sync_all().await.map_err(write_err)?;
    Ok(hex::encode(hasher.finalize()))
}

fn set_executable(path: &Path) -> Result<(), UpstreamError> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755)).map_err(|source| {
        UpstreamError::Write {
            path: path.to_path_buf(),
            source,
        }
    })
}

/// Moves a verified download into place as an executable.
fn place(tmp: &Path, target: &Path) -> Result<(), UpstreamError> {
    let write_err = |source| UpstreamError::Write {
        path: target.to_path_buf(),
        source,
    };
    if let Some(parent) = target.parent() {
        std::fs::create_dir_all(parent).map_err(write_err)?;
    }
    set_executable(tmp)?;
    std::fs::rename(tmp, target).map_err(write_err)
}

/// Takes `members` out of a verified `.tar.gz` into their bundle paths.
fn extract_members(
    archive: &Path,
    url: &str,
    members: &[(String, String)],
    dest: &Path,
) -> Result<(), UpstreamError> {
    let read_err = |source| UpstreamError::Write {
        path: archive.to_path_buf(),
        source,
    };
    let file = std::fs::File::open(archive).map_err(read_err)?;
    let mut tar = tar::Archive::new(flate2::read::GzDecoder::new(io::BufReader::new(file)));
    let mut found = vec![false; members.len()];
    for entry in tar.entries().map_err(read_err)? {
        let mut entry = entry.map_err(read_err)?;
        if entry.header().entry_type() != tar::EntryType::Regular {
            continue;
        }
        let name = entry
            .path()
            .map_err(read_err)?
            .to_string_lossy()
            .trim_start_matches("./")
            .to_string();
        let Some(i) = members.iter().position(|(member, _)| *member == name) else {
            continue;
        };
        let target = dest.join(&members[i].1);
        let tmp = target.with_extension("partial");
        if let Some(parent) = target.parent() {
            std::fs::create_dir_all(parent).map_err(|source| UpstreamError::Write {
                path: parent.to_path_buf(),
                source,
            })?;
        }
        let write_err = |source| UpstreamError::Write {
            path: tmp.clone(),
            source,
        };
        let mut out = std::fs::File::create(&tmp).map_err(write_err)?;
        let mut buf = vec![0u8; 1 << 20];
        loop {
            let n = entry.read(&mut buf).map_err(read_err)?;
            if n == 0 {
                break;
            }
            out.write_all(&buf[..n]).map_err(write_err)?;
        }
        out.sync_all().map_err(write_err)?;
        place(&tmp, &target)?;
        found[i] = true;
    }
    if let Some(i) = found.iter().position(|f| !f) {
        return Err(UpstreamError::MissingMember {
            url: url.to_string(),
            member: members[i].0.clone(),
        });
    }
    Ok(())
}

fn write_atomic(path: &Path, content: &[u8]) -> Result<(), UpstreamError> {
    let tmp = path.with_extension("tmp");
    let write_err = |source| UpstreamError::Write {
        path: path.to_path_buf(),
        source,
    };
    let mut file = std::fs::File::create(&tmp).map_err(write_err)?;
    file.write_all(content).map_err(write_err)?;
    file.sync_all().map_err(write_err)?;
    std::fs::rename(&tmp, path).map_err(write_err)
}
