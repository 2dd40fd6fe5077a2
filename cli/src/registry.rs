//! A pull-only client of the OCI Distribution API (the Docker Registry HTTP API v2), so that a
//! bundle can carry the images a cluster needs (pause, CoreDNS) and nodes never reach a registry:
//! the air-gapped path. An image is pulled for one platform (linux/amd64) into an OCI image
//! layout archive (`oci-layout`, `index.json`, `blobs/sha256/...`) that `ctr images import`
//! loads under its full reference (the `io.containerd.image.name` annotation).
//!
//! - References are read as containerd reads them (`busybox:1.29` is
//!   `docker.io/library/busybox:1.29`); Docker Hub's API host is `registry-1.docker.io`.
//! - Manifests are asked for in all four current media types (OCI index and manifest, Docker
//!   manifest list and schema 2); an index picks linux/amd64; schema 1 is refused.
//! - Every manifest and blob is checked against its digest (and blobs against their size) before
//!   it is kept; a tag's manifest is checked against `Docker-Content-Digest` when the registry
//!   sends one. Nothing unverified reaches the archive.
//! - Authentication: anonymous; a `Bearer` challenge is answered from the token service it names
//!   (with basic credentials if given, as `docker login` stores them), one token per repository;
//!   a `Basic` challenge with the credentials.
//! - HTTPS only, with the system's roots plus an extra CA if given; plain HTTP only to loopback.
//! - A mirror (`registry.k8s.io` -> `https://mirror.internal:5000`) serves a registry's
//!   repositories under the same names, as containerd's `hosts.toml` mirrors do; the archive
//!   keeps the original reference.

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

use reqwest::StatusCode;
use reqwest::header::{ACCEPT, AUTHORIZATION, HeaderMap, WWW_AUTHENTICATE};
use serde::Deserialize;
use sha2::{Digest, Sha256};

/// Media types of manifests.
pub mod media {
    /// OCI image index.
    pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
    /// OCI image manifest.
    pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
    /// Docker manifest list.
    pub const DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
    /// Docker image manifest, schema 2.
    pub const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
}

/// The largest manifest accepted (registries cap them at 4 MiB).
const MAX_MANIFEST: usize = 4 << 20;

/// Errors pulling an image.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    /// The reference cannot be read.
    #[error(
        "{reference:?} is not an image reference ({why}); write it as [REGISTRY/]REPOSITORY[:TAG][@sha256:DIGEST]"
    )]
    BadReference {
        /// The reference.
        reference: String,
        /// What is wrong.
        why: String,
    },
    /// A URL would be plain HTTP to a host that is not loopback.
    #[error(
        "refusing plain http to {url}: registries are reached over https (plain http only on loopback)"
    )]
    Insecure {
        /// The URL.
        url: String,
    },
    /// The request failed (connection, TLS, timeout).
    #[error(
        "cannot reach the registry at {url}: {detail}; check the network, the proxy or the registry's CA and run the command again"
    )]
    Http {
        /// The URL.
        url: String,
        /// The cause chain.
        detail: String,
    },
    /// The registry answered with an error status.
    #[error("{url}: the registry answered {status}{detail}")]
    Status {
        /// The URL.
        url: String,
        /// HTTP status.
        status: u16,
        /// What the registry said, or what to do.
        detail: String,
    },
    /// Content did not match its digest or size.
    #[error(
        "{what} from {url} does not match its digest: expected {expected}, got {actual}; the registry or a proxy changed it: nothing was kept"
    )]
    Digest {
        /// What was checked.
        what: String,
        /// The URL.
        url: String,
        /// Expected digest or size.
        expected: String,
        /// What arrived.
        actual: String,
    },
    /// A manifest the client cannot use.
    #[error("{reference}: {why}")]
    Manifest {
        /// The reference.
        reference: String,
        /// Why.
        why: String,
    },
    /// Writing the archive failed.
    #[error("cannot write {path}: {source}")]
    Write {
        /// The path.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
}

/// An image reference, normalized as containerd stores it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageRef {
    /// `registry.k8s.io`, `docker.io`, `127.0.0.1:5000`.
    pub registry: String,
    /// `pause`, `library/busybox`, `coredns/coredns`.
    pub repository: String,
    /// The tag, if any (`latest` when neither tag nor digest is given).
    pub tag: Option<String>,
    /// `sha256:<hex>`, if given.
    pub digest: Option<String>,
}

impl ImageRef {
    /// Parses `[REGISTRY/]REPOSITORY[:TAG][@DIGEST]`.
    pub fn parse(reference: &str) -> Result<ImageRef, RegistryError> {
        let bad = |why: &str| RegistryError::BadReference {
            reference: reference.to_owned(),
            why: why.to_owned(),
        };
        if reference.is_empty() || reference.len() > 4096 {
            return Err(bad("empty or too long"));
        }
        let (rest, digest) = match reference.split_once('@') {
            Some((r, d)) => {
                let hex = d
                    .strip_prefix("sha256:")
                    .ok_or_else(|| bad("only sha256 digests are supported"))?;
                if hex.len() != 64
                    || !hex
                        .bytes()
                        .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
                {
                    return Err(bad("a sha256 digest is 64 lowercase hex digits"));
                }
                (r, Some(d.to_owned()))
            }
            None => (reference, None),
        };
        // A tag follows the last ':' after the last '/'; a ':' before it is the registry's port.
        let last_slash = rest.rfind('/').map_or(0, |i| i + 1);
        let (name, tag) = match rest[last_slash..].rfind(':') {
            Some(i) => (
                &rest[..last_slash + i],
                Some(rest[last_slash + i + 1..].to_owned()),
            ),
            None => (rest, None),
        };
        if let Some(t) = &tag
            && (t.is_empty()
                || t.len() > 128
                || !t
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"_.-".contains(&b))
                || t.starts_with(['.', '-']))
        {
            return Err(bad(
                "a tag is up to 128 of [A-Za-z0-9_.-], not starting with '.' or '-'",
            ));
        }
        let (registry, repository) = match name.split_once('/') {
            Some((first, repo)) if first.contains(['.', ':']) || first == "localhost" => {
                (first.to_owned(), repo.to_owned())
            }
            Some(_) => ("docker.io".to_owned(), name.to_owned()),
            None => ("docker.io".to_owned(), format!("library/{name}")),
        };
        let repository = if registry == "docker.io" && !repository.contains('/') {
            format!("library/{repository}")
        } else {
            repository
        };
        let component_ok = |c: &str| {
            !c.is_empty()
                && c.bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-".contains(&b))
                && c.bytes().next().is_some_and(|b| b.is_ascii_alphanumeric())
                && c.bytes().last().is_some_and(|b| b.is_ascii_alphanumeric())
        };
        let host_ok = |h: &str| {
            let (host, port) = h.split_once(':').unwrap_or((h, "1"));
            !host.is_empty()
                && host
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b".-".contains(&b))
                && port.parse::<u16>().is_ok_and(|p| p > 0)
        };
        if !host_ok(&registry) {
            return Err(bad("the registry is HOST or HOST:PORT"));
        }
        if !repository.split('/').all(component_ok) {
            return Err(bad(
                "repository path components are lowercase letters, digits and . _ -",
            ));
        }
        let tag = if tag.is_none() && digest.is_none() {
            Some("latest".to_owned())
        } else {
            tag
        };
        Ok(ImageRef {
            registry,
            repository,
            tag,
            digest,
        })
    }

    /// The full reference (`docker.io/library/busybox:1.29`, `...@sha256:...`).
    pub fn full(&self) -> String {
        let mut s = format!("{}/{}", self.registry, self.repository);
        if let Some(t) = &self.tag {
            s.push(':');
            s.push_str(t);
        }
        if let Some(d) = &self.digest {
            s.push('@');
            s.push_str(d);
        }
        s
    }

    /// What the manifest is asked for by: the digest if given, else the tag.
    fn manifest_key(&self) -> &str {
        self.digest
            .as_deref()
            .or(self.tag.as_deref())
            .unwrap_or("latest")
    }
}

/// A pulled image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PulledImage {
    /// The full reference the archive names.
    pub reference: String,
    /// The digest of the platform manifest in the archive.
    pub manifest_digest: String,
    /// Bytes fetched from the registry (manifests and blobs).
    pub bytes_fetched: u64,
    /// Blobs in the archive (config and layers).
    pub blobs: usize,
}

/// A pull-only registry client.
pub struct RegistryClient {
    http: reqwest::Client,
    mirrors: HashMap<String, reqwest::Url>,
    basic: Option<(String, String)>,
    tokens: Mutex<HashMap<String, String>>,
}

#[derive(Deserialize)]
struct Descriptor {
    #[serde(rename = "mediaType", default)]
    media_type: String,
    digest: String,
    size: u64,
    #[serde(default)]
    platform: Option<Platform>,
}

#[derive(Deserialize)]
struct Platform {
    architecture: String,
    os: String,
}

#[derive(Deserialize)]
struct Manifest {
    #[serde(rename = "schemaVersion")]
    schema_version: u32,
    #[serde(rename = "mediaType", default)]
    media_type: Option<String>,
    #[serde(default)]
    manifests: Option<Vec<Descriptor>>,
    #[serde(default)]
    config: Option<Descriptor>,
    #[serde(default)]
    layers: Option<Vec<Descriptor>>,
}

fn sha256_digest(bytes: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(bytes)))
}

fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(c) = src {
        s.push_str(": ");
        s.push_str(&c.to_string());
        src = c.source();
    }
    s
}

impl RegistryClient {
    /// A client trusting the system's roots and, if given, the PEM certificates in `extra_ca`.
    pub fn new(extra_ca: Option<&[u8]>) -> Result<RegistryClient, RegistryError> {
        let mut b = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(30))
            .read_timeout(Duration::from_secs(120))
            .user_agent(concat!("clusterctl/", env!("CARGO_PKG_VERSION")));
        if let Some(pem) = extra_ca {
            let certs =
                reqwest::Certificate::from_pem_bundle(pem).map_err(|e| RegistryError::Http {
                    url: "(the registry CA)".into(),
                    detail: format!("the CA file is not PEM certificates: {}", chain(&e)),
                })?;
            b = b.tls_certs_merge(certs);
        }
        let http = b.build().map_err(|e| RegistryError::Http {
            url: "(client)".into(),
            detail: chain(&e),
        })?;
        Ok(RegistryClient {
            http,
            mirrors: HashMap::new(),
            basic: None,
            tokens: Mutex::new(HashMap::new()),
        })
    }

    /// Serves `registry`'s repositories from `url` (`https://host:port`).
    pub fn with_mirror(
        mut self,
        registry: &str,
        url: &str,
    ) -> Result<RegistryClient, RegistryError> {
        let parsed = check_url(url)?;
        self.mirrors.insert(registry.to_owned(), parsed);
        Ok(self)
    }

    /// Basic credentials for the registries' token services (or `Basic` challenges).
    pub fn with_credentials(mut self, user: &str, password: &str) -> RegistryClient {
        self.basic = Some((user.to_owned(), password.to_owned()));
        self
    }

    fn base(&self, registry: &str) -> Result<reqwest::Url, RegistryError> {
        if let Some(u) = self.mirrors.get(registry) {
            return Ok(u.clone());
        }
        let host = if registry == "docker.io" {
            "registry-1.docker.io"
        } else {
            registry
        };
        check_url(&format!("https://{host}/"))
    }

    /// GET `url` for `repo` (scope of its token), answering one auth challenge.
    async fn get(
        &self,
        repo_key: &str,
        url: &reqwest::Url,
        accept: Option<&str>,
    ) -> Result<reqwest::Response, RegistryError> {
        let mut tried_auth = false;
        loop {
            let mut req = self.http.get(url.clone());
            if let Some(a) = accept {
                req = req.header(ACCEPT, a);
            }
            let token = self
                .tokens
                .lock()
                .ok()
                .and_then(|t| t.get(repo_key).cloned());
            if let Some(t) = &token {
                req = req.header(AUTHORIZATION, t);
            }
            let resp = req.send().await.map_err(|e| RegistryError::Http {
                url: url.to_string(),
                detail: chain(&e),
            })?;
            if resp.status() == StatusCode::UNAUTHORIZED && !tried_auth {
                tried_auth = true;
                let header = self.authorize(url, resp.headers()).await?;
                if let Ok(mut t) = self.tokens.lock() {
                    t.insert(repo_key.to_owned(), header);
                }
                continue;
            }
            if !resp.status().is_success() {
                let status = resp.status().as_u16();
                let body = resp.text().await.unwrap_or_default();
                let detail = registry_error_detail(status, &body);
                return Err(RegistryError::Status {
                    url: url.to_string(),
                    status,
                    detail,
                });
            }
            return Ok(resp);
        }
    }

    /// The Authorization header that answers a 401's challenge.
    async fn authorize(
        &self,
        url: &reqwest::Url,
        headers: &HeaderMap,
    ) -> Result<String, RegistryError> {
        let challenge = headers
            .get(WWW_AUTHENTICATE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("");
        let status_err = |detail: &str| RegistryError::Status {
            url: url.to_string(),
            status: 401,
            detail: format!(": {detail}"),
        };
        let (scheme, params) = challenge.split_once(' ').unwrap_or((challenge, ""));
        let params = parse_challenge(params);
        if scheme.eq_ignore_ascii_case("basic") {
            let (u, p) = self.basic.as_ref().ok_or_else(|| {
                status_err("the registry wants credentials (Basic) and none were given")
            })?;
            use base64::Engine as _;
            return Ok(format!(
                "Basic {}",
                base64::engine::general_purpose::STANDARD.encode(format!("{u}:{p}"))
            ));
        }
        if !scheme.eq_ignore_ascii_case("bearer") {
            return Err(status_err(&format!(
                "unsupported authentication challenge {challenge:?}"
            )));
        }
        let realm = params
            .get("realm")
            .ok_or_else(|| status_err("a Bearer challenge without a realm"))?;
        let mut token_url = check_url(realm)?;
        {
            let mut q = token_url.query_pairs_mut();
            if let Some(s) = params.get("service") {
                q.append_pair("service", s);
            }
            if let Some(s) = params.get("scope") {
                q.append_pair("scope", s);
            }
        }
        let mut req = self.http.get(token_url.clone());
        if let Some((u, p)) = &self.basic {
            req = req.basic_auth(u, Some(p));
        }
        let resp = req.send().await.map_err(|e| RegistryError::Http {
            url: token_url.to_string(),
            detail: chain(&e),
        })?;
        if !resp.status().is_success() {
            let status = resp.status().as_u16();
            return Err(RegistryError::Status {
                url: token_url.to_string(),
                status,
                detail: ": the token service refused (are the credentials right, may they pull this repository?)".into(),
            });
        }
        #[derive(Deserialize)]
        struct Token {
            token: Option<String>,
            access_token: Option<String>,
        }
        let body = resp.bytes().await.map_err(|e| RegistryError::Http {
            url: token_url.to_string(),
            detail: chain(&e),
        })?;
        let t: Token = serde_json::from_slice(&body).map_err(|_| RegistryError::Status {
            url: token_url.to_string(),
            status: 200,
            detail: ": the token service's answer is not a token document".into(),
        })?;
        let token = t
            .token
            .or(t.access_token)
            .filter(|t| !t.is_empty())
            .ok_or_else(|| RegistryError::Status {
                url: token_url.to_string(),
                status: 200,
                detail: ": the token service's answer has no token".into(),
            })?;
        Ok(format!("Bearer {token}"))
    }

    /// Fetches a manifest by tag or digest; returns (media type, bytes, digest), verified.
    async fn manifest(
        &self,
        r: &ImageRef,
        key: &str,
        expected: Option<&str>,
    ) -> Result<(String, Vec<u8>, String), RegistryError> {
        let base = self.base(&r.registry)?;
        let url = join(&base, &format!("v2/{}/manifests/{key}", r.repository))?;
        let accept = [
            media::OCI_INDEX,
            media::DOCKER_LIST,
            media::OCI_MANIFEST,
            media::DOCKER_MANIFEST,
        ]
        .join(", ");
        let resp = self
            .get(
                &format!("{}/{}", r.registry, r.repository),
                &url,
                Some(&accept),
            )
            .await?;
        let header_digest = resp
            .headers()
            .get("docker-content-digest")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        let content_type = resp
            .headers()
            .get(reqwest::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .map(|s| s.split(';').next().unwrap_or("").trim().to_owned())
            .unwrap_or_default();
        let body = read_capped(resp, MAX_MANIFEST, &url).await?;
        let actual = sha256_digest(&body);
        if let Some(e) = expected.or(header_digest
            .as_deref()
            .filter(|d| d.starts_with("sha256:")))
            && e != actual
        {
            return Err(RegistryError::Digest {
                what: format!("the manifest {key}"),
                url: url.to_string(),
                expected: e.to_owned(),
                actual,
            });
        }
        Ok((content_type, body, actual))
    }

    /// Pulls `reference` for linux/amd64 into an OCI image layout archive at `dest` (written
    /// beside it and renamed into place when complete and verified).
    pub async fn pull_to_archive(
        &self,
        reference: &str,
        dest: &Path,
    ) -> Result<PulledImage, RegistryError> {
        let r = ImageRef::parse(reference)?;
        let manifest_err = |why: String| RegistryError::Manifest {
            reference: r.full(),
            why,
        };
        let (mut media_type, mut body, mut digest) = self
            .manifest(&r, r.manifest_key(), r.digest.as_deref())
            .await?;
        let mut fetched = body.len() as u64;
        let mut m: Manifest = serde_json::from_slice(&body)
            .map_err(|e| manifest_err(format!("its manifest is not valid JSON: {e}")))?;
        if m.schema_version != 2 {
            return Err(manifest_err(format!(
                "its manifest is schema {} (Docker schema 1 is deprecated and unsupported); push the image again with a current client",
                m.schema_version
            )));
        }
        let effective = |m: &Manifest, header: &str| {
            m.media_type
                .clone()
                .filter(|t| !t.is_empty())
                .unwrap_or_else(|| header.to_owned())
        };
        let mut kind = effective(&m, &media_type);
        if kind == media::OCI_INDEX
            || kind == media::DOCKER_LIST
            || (kind.is_empty() && m.manifests.is_some())
        {
            let chosen = m
                .manifests
                .as_deref()
                .unwrap_or_default()
                .iter()
                .find(|d| {
                    d.platform
                        .as_ref()
                        .is_some_and(|p| p.os == "linux" && p.architecture == "amd64")
                })
                .map(|d| (d.digest.clone(), d.media_type.clone()))
                .ok_or_else(|| manifest_err("it has no linux/amd64 image".into()))?;
            let (d, chosen_type) = chosen;
            (media_type, body, digest) = self.manifest(&r, &d, Some(&d)).await?;
            fetched += body.len() as u64;
            m = serde_json::from_slice(&body).map_err(|e| {
                manifest_err(format!("its linux/amd64 manifest is not valid JSON: {e}"))
            })?;
            kind = effective(&m, &media_type);
            if kind.is_empty() {
                kind = if chosen_type.is_empty() {
                    media::OCI_MANIFEST.to_owned()
                } else {
                    chosen_type
                };
            }
        }
        if kind != media::OCI_MANIFEST
            && kind != media::DOCKER_MANIFEST
            && !(kind.is_empty() && m.config.is_some())
        {
            return Err(manifest_err(format!(
                "its manifest has media type {kind:?}, not an image manifest"
            )));
        }
        if kind.is_empty() {
            kind = media::OCI_MANIFEST.to_owned();
        }
        let config = m
            .config
            .ok_or_else(|| manifest_err("its manifest has no config".into()))?;
        let layers = m.layers.unwrap_or_default();

        let partial = dest.with_extension("partial");
        let write_err = |path: &Path| {
            let path = path.to_owned();
            move |source| RegistryError::Write { path, source }
        };
        let _ = std::fs::remove_dir_all(&partial);
        let blobs_dir = partial.join("blobs/sha256");
        std::fs::create_dir_all(&blobs_dir).map_err(write_err(&blobs_dir))?;
        let base = self.base(&r.registry)?;
        let mut blob_count = 0;
        for d in std::iter::once(&config).chain(layers.iter()) {
            let hex = d
                .digest
                .strip_prefix("sha256:")
                .filter(|h| h.len() == 64 && h.bytes().all(|b| b.is_ascii_hexdigit()))
                .ok_or_else(|| {
                    manifest_err(format!(
                        "a blob has digest {:?}; only sha256 is supported",
                        d.digest
                    ))
                })?;
            let path = blobs_dir.join(hex);
            if path.exists() {
                continue;
            }
            let url = join(&base, &format!("v2/{}/blobs/{}", r.repository, d.digest))?;
            fetched += self
                .fetch_blob(&format!("{}/{}", r.registry, r.repository), &url, d, &path)
                .await?;
            blob_count += 1;
        }
        let hex = &digest["sha256:".len()..];
        std::fs::write(blobs_dir.join(hex), &body).map_err(write_err(&blobs_dir))?;
        let mut annotations = serde_json::Map::new();
        annotations.insert("io.containerd.image.name".into(), r.full().into());
        if let Some(t) = &r.tag {
            annotations.insert("org.opencontainers.image.ref.name".into(), t.clone().into());
        }
        let index = serde_json::json!({
            "schemaVersion": 2,
            "mediaType": media::OCI_INDEX,
            "manifests": [{"mediaType": kind, "digest": digest, "size": body.len(),
                           "platform": {"architecture": "amd64", "os": "linux"},
                           "annotations": annotations}],
        });
        std::fs::write(
            partial.join("index.json"),
            serde_json::to_vec(&index).unwrap_or_default(),
        )
        .map_err(write_err(&partial))?;
        std::fs::write(
            partial.join("oci-layout"),
            br#"{"imageLayoutVersion":"1.0.0"}"#,
        )
        .map_err(write_err(&partial))?;
        let tmp_tar = dest.with_extension("tar.partial");
        write_tar(&partial, &tmp_tar).map_err(write_err(&tmp_tar))?;
        std::fs::rename(&tmp_tar, dest).map_err(write_err(dest))?;
        let _ = std::fs::remove_dir_all(&partial);
        Ok(PulledImage {
            reference: r.full(),
            manifest_digest: digest,
            bytes_fetched: fetched,
            blobs: blob_count,
        })
    }

    /// Streams a blob to `path`, verifying size and digest; returns its size.
    async fn fetch_blob(
        &self,
        repo: &str,
        url: &reqwest::Url,
        d: &Descriptor,
        path: &Path,
    ) -> Result<u64, RegistryError> {
        let mut resp = self.get(repo, url, None).await?;
        let tmp = path.with_extension("part");
        let write_err = |source| RegistryError::Write {
            path: tmp.clone(),
            source,
        };
        let mut file = std::fs::File::create(&tmp).map_err(write_err)?;
        let mut hasher = Sha256::new();
        let mut n: u64 = 0;
        while let Some(chunk) = resp.chunk().await.map_err(|e| RegistryError::Http {
            url: url.to_string(),
            detail: chain(&e),
        })? {
            n += chunk.len() as u64;
            if n > d.size {
                break;
            }
            hasher.update(&chunk);
            file.write_all(&chunk).map_err(write_err)?;
        }
        let actual = format!("sha256:{}", hex::encode(hasher.finalize()));
        if n != d.size || actual != d.digest {
            let _ = std::fs::remove_file(&tmp);
            let (expected, actual) = if n != d.size {
                (
                    format!("{} bytes", d.size),
                    format!("{}{n} bytes", if n > d.size { "more than " } else { "" }),
                )
            } else {
                (d.digest.clone(), actual)
            };
            return Err(RegistryError::Digest {
                what: format!("blob {}", d.digest),
                url: url.to_string(),
                expected,
                actual,
            });
        }
        file.sync_all().map_err(write_err)?;
        std::fs::rename(&tmp, path).map_err(|source| RegistryError::Write {
            path: path.to_owned(),
            source,
        })?;
        Ok(n)
    }
}

/// The registry's own error text (`{"errors":[{"code":..,"message":..}]}`), with what to do.
fn registry_error_detail(status: u16, body: &str) -> String {
    #[derive(Deserialize)]
    struct Errors {
        errors: Vec<ErrorItem>,
    }
    #[derive(Deserialize)]
    struct ErrorItem {
        #[serde(default)]
        code: String,
        #[serde(default)]
        message: String,
    }
    let said = serde_json::from_str::<Errors>(body)
        .ok()
        .map(|e| {
            e.errors
                .iter()
                .map(|i| format!("{} ({})", i.message, i.code))
                .collect::<Vec<_>>()
                .join("; ")
        })
        .filter(|s| !s.is_empty());
    let hint = match status {
        404 => "; check the reference (repository and tag) or the mirror",
        401 | 403 => "; the registry refuses this client: give credentials that may pull it",
        429 => "; the registry is rate-limiting: wait and run the command again",
        _ => "",
    };
    match said {
        Some(s) => format!(": {s}{hint}"),
        None => hint.to_owned(),
    }
}

/// `key="value", key=value` pairs of a challenge.
fn parse_challenge(s: &str) -> HashMap<String, String> {
    let mut out = HashMap::new();
    let mut rest = s.trim();
    while !rest.is_empty() {
        let Some((k, after)) = rest.split_once('=') else {
            break;
        };
        let k = k.trim().trim_start_matches(',').trim().to_ascii_lowercase();
        let after = after.trim_start();
        let (v, next) = if let Some(q) = after.strip_prefix('"') {
            match q.find('"') {
                Some(end) => (&q[..end], &q[end + 1..]),
                None => (q, ""),
            }
        } else {
            match after.find(',') {
                Some(end) => (&after[..end], &after[end..]),
                None => (after, ""),
            }
        };
        out.insert(k, v.to_owned());
        rest = next.trim_start().trim_start_matches(',').trim_start();
    }
    out
}

fn check_url(url: &str) -> Result<reqwest::Url, RegistryError> {
    let insecure = || RegistryError::Insecure {
        url: url.to_owned(),
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

fn join(base: &reqwest::Url, path: &str) -> Result<reqwest::Url, RegistryError> {
    let mut b = base.clone();
    if !b.path().ends_with('/') {
        let p = format!("{}/", b.path());
        b.set_path(&p);
    }
    b.join(path).map_err(|_| RegistryError::Insecure {
        url: format!("{base}{path}"),
    })
}

async fn read_capped(
    mut resp: reqwest::Response,
    cap: usize,
    url: &reqwest::Url,
) -> Result<Vec<u8>, RegistryError> {
    let mut body = Vec::new();
    while let Some(chunk) = resp.chunk().await.map_err(|e| RegistryError::Http {
        url: url.to_string(),
        detail: chain(&e),
    })? {
        if body.len() + chunk.len() > cap {
            return Err(RegistryError::Status {
                url: url.to_string(),
                status: 200,
                detail: format!(": the manifest is larger than {} MiB", cap >> 20),
            });
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}

/// Writes the layout directory `dir` as an uncompressed tar (files sorted, so the same image
/// makes the same archive).
fn write_tar(dir: &Path, dest: &Path) -> std::io::Result<()> {
    let file = std::fs::File::create(dest)?;
    let mut b = tar::Builder::new(std::io::BufWriter::new(file));
    b.mode(tar::HeaderMode::Deterministic);
    let mut files = Vec::new();
    for name in ["oci-layout", "index.json"] {
        files.push(PathBuf::from(name));
    }
    let mut blobs: Vec<_> = std::fs::read_dir(dir.join("blobs/sha256"))?
        .filter_map(|e| e.ok())
        .map(|e| PathBuf::from("blobs/sha256").join(e.file_name()))
        .collect();
    blobs.sort();
    files.extend(blobs);
    for f in files {
        b.append_path_with_name(dir.join(&f), &f)?;
    }
    let mut w = b.into_inner()?;
    w.flush()?;
    w.into_inner().map_err(|e| e.into_error())?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn references_read_as_containerd_reads_them() {
        let r = ImageRef::parse("busybox:1.29").unwrap();
        assert_eq!(
            (r.registry.as_str(), r.repository.as_str(), r.tag.as_deref()),
            ("docker.io", "library/busybox", Some("1.29"))
        );
        assert_eq!(r.full(), "docker.io/library/busybox:1.29");
        assert_eq!(
            ImageRef::parse("nginx").unwrap().full(),
            "docker.io/library/nginx:latest"
        );
        assert_eq!(
            ImageRef::parse("bitnami/redis:7").unwrap().full(),
            "docker.io/bitnami/redis:7"
        );
        let r = ImageRef::parse("127.0.0.1:5000/team/app:v1").unwrap();
        assert_eq!(
            (r.registry.as_str(), r.repository.as_str()),
            ("127.0.0.1:5000", "team/app")
        );
        let r = ImageRef::parse("localhost/pause").unwrap();
        assert_eq!(r.full(), "localhost/pause:latest");
        let d = format!("sha256:{}", "a".repeat(64));
        let r = ImageRef::parse(&format!("registry.k8s.io/pause:3.2@{d}")).unwrap();
        assert_eq!(
            (r.tag.as_deref(), r.digest.as_deref(), r.manifest_key()),
            (Some("3.2"), Some(d.as_str()), d.as_str())
        );
        let r = ImageRef::parse(&format!("registry.k8s.io/pause@{d}")).unwrap();
        assert_eq!(r.tag, None);
        assert_eq!(r.full(), format!("registry.k8s.io/pause@{d}"));
    }

    #[test]
    fn bad_references_say_what_is_wrong() {
        for bad in [
            "",
            "UPPER/case",
            "a:b:c/d",
            "x@md5:00",
            "x@sha256:abc",
            "x:",
            "x:-tag",
            "a//b",
            "a/b/",
        ] {
            let e = ImageRef::parse(bad).unwrap_err().to_string();
            assert!(e.contains("is not an image reference"), "{bad}: {e}");
        }
    }

    #[test]
    fn challenges_are_parsed() {
        let c = parse_challenge(
            r#"realm="https://auth.docker.io/token",service="registry.docker.io",scope="repository:library/busybox:pull""#,
        );
        assert_eq!(c["realm"], "https://auth.docker.io/token");
        assert_eq!(c["service"], "registry.docker.io");
        assert_eq!(c["scope"], "repository:library/busybox:pull");
        let c = parse_challenge("realm=https://x/t, service=reg");
        assert_eq!(
            (c["realm"].as_str(), c["service"].as_str()),
            ("https://x/t", "reg")
        );
    }

    #[test]
    fn plain_http_only_to_loopback() {
        assert!(check_url("http://127.0.0.1:5000/").is_ok());
        assert!(check_url("http://localhost:5000/").is_ok());
        assert!(check_url("http://[::1]:5000/").is_ok());
        assert!(matches!(
            check_url("http://mirror.internal:5000/"),
            Err(RegistryError::Insecure { .. })
        ));
        assert!(check_url("https://mirror.internal:5000/").is_ok());
    }

    /// A registry that wants a Bearer token from its token service (as Docker Hub, ghcr.io and
    /// registry.k8s.io's backends do): answered once per repository, then reused.
    #[tokio::test]
    async fn bearer_challenges_are_answered_from_the_token_service() {
        use std::sync::{Arc, Mutex as StdMutex};
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        let config =
            br#"{"architecture":"amd64","os":"linux","rootfs":{"type":"layers","diff_ids":[]}}"#
                .to_vec();
        let cfg_digest = sha256_digest(&config);
        let manifest = serde_json::to_vec(&serde_json::json!({
            "schemaVersion": 2, "mediaType": media::DOCKER_MANIFEST,
            "config": {"mediaType": "application/vnd.docker.container.image.v1+json",
                       "digest": cfg_digest, "size": config.len()},
            "layers": [],
        }))
        .unwrap();
        let log = Arc::new(StdMutex::new(Vec::<String>::new()));
        let (log2, base2, cfg_d2) = (log.clone(), base.clone(), cfg_digest.clone());
        let server = tokio::spawn(async move {
            loop {
                let Ok((mut conn, _)) = listener.accept().await else {
                    return;
                };
                let mut req = Vec::new();
                let mut buf = [0u8; 4096];
                while !req.windows(4).any(|w| w == b"\r\n\r\n") {
                    match conn.read(&mut buf).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => req.extend_from_slice(&buf[..n]),
                    }
                }
                let head = String::from_utf8_lossy(&req).into_owned();
                let path = head.split_whitespace().nth(1).unwrap_or("/").to_owned();
                let authed = head
                    .lines()
                    .any(|l| l.eq_ignore_ascii_case("authorization: Bearer tok-123"));
                log2.lock().unwrap().push(format!("{path} {authed}"));
                let (status, extra, body): (&str, String, Vec<u8>) = if path.starts_with("/token?")
                {
                    if path.contains("service=svc")
                        && path.contains("scope=repository%3Ateam%2Fapp%3Apull")
                    {
                        ("200 OK", String::new(), br#"{"token":"tok-123"}"#.to_vec())
                    } else {
                        ("400 Bad Request", String::new(), Vec::new())
                    }
                } else if !authed {
                    let challenge = format!(
                        "WWW-Authenticate: Bearer realm=\"{base2}/token\",service=\"svc\",scope=\"repository:team/app:pull\"\r\n"
                    );
                    ("401 Unauthorized", challenge, Vec::new())
                } else if path == "/v2/team/app/manifests/1.0" {
                    (
                        "200 OK",
                        format!("Content-Type: {}\r\n", media::DOCKER_MANIFEST),
                        manifest.clone(),
                    )
                } else if path == format!("/v2/team/app/blobs/{cfg_d2}") {
                    ("200 OK", String::new(), config.clone())
                } else {
                    ("404 Not Found", String::new(), Vec::new())
                };
                let head = format!(
                    "HTTP/1.1 {status}\r\n{extra}Content-Length: {}\r\nConnection: close\r\n\r\n",
                    body.len()
                );
                let _ = conn.write_all(head.as_bytes()).await;
                let _ = conn.write_all(&body).await;
                let _ = conn.shutdown().await;
            }
        });
        let tmp = tempfile::tempdir().unwrap();
        let client = RegistryClient::new(None)
            .unwrap()
            .with_mirror("registry.example", &base)
            .unwrap();
        let pulled = client
            .pull_to_archive("registry.example/team/app:1.0", &tmp.path().join("app.tar"))
            .await
            .unwrap();
        assert_eq!(pulled.reference, "registry.example/team/app:1.0");
        assert_eq!(pulled.blobs, 1);
        let log = log.lock().unwrap().clone();
        server.abort();
        // One 401, one token, then the manifest and the config with the token.
        assert_eq!(
            log,
            vec![
                "/v2/team/app/manifests/1.0 false".to_owned(),
                "/token?service=svc&scope=repository%3Ateam%2Fapp%3Apull false".to_owned(),
                "/v2/team/app/manifests/1.0 true".to_owned(),
                format!("/v2/team/app/blobs/{cfg_digest} true"),
            ]
        );
    }

    #[test]
    fn registry_errors_are_read_and_explained() {
        let d = registry_error_detail(
            404,
            r#"{"errors":[{"code":"MANIFEST_UNKNOWN","message":"manifest unknown"}]}"#,
        );
        assert!(
            d.contains("manifest unknown (MANIFEST_UNKNOWN)") && d.contains("check the reference"),
            "{d}"
        );
        assert_eq!(registry_error_detail(500, "oops"), "");
    }
}
