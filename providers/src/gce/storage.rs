//! Cloud Storage, for exactly what `clusterctl image push --provider gce` needs, and the push
//! itself ([`push_image`]): the node image's GCE disk archive goes to a bucket with a resumable
//! upload, then `images.insert` makes the Compute image from it.
//!
//! The upload follows <https://cloud.google.com/storage/docs/performing-resumable-uploads>:
//! - a session is started with `POST .../upload/storage/v1/b/BUCKET/o?uploadType=resumable`
//!   (the object's metadata in the body, its size in `X-Upload-Content-Length`); its URI comes
//!   back in `Location`;
//! - the file goes in chunks (a multiple of 256 KiB) with `Content-Range: bytes A-B/TOTAL`; a
//!   308 with `Range: bytes=0-N` says the server has everything up to N;
//! - a chunk that failed (5xx, 429, a dropped connection, no answer) is retried with backoff
//!   from where the session says it is (`PUT` with `Content-Range: bytes */TOTAL`, no body);
//! - 404 or 410 on the session: it expired (after a week), and a new one is started.
//!
//! The session URI, with the file's size and sha256, is kept in `<archive>.upload.json` (mode
//! 0600: the URI alone lets anyone finish the upload) so that a killed `image push` resumes
//! where the server says it is; the file is removed when the upload is done. An object that
//! already holds the same bytes (its `clusterctl-sha256` metadata) is not uploaded again.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::api::{GuestOsFeature, Image, RawDisk};
use super::auth::{AuthError, TokenSource, urlencode};
use super::client::{Compute, RetryPolicy, backoff};
use super::{digest8, encode_label, image_name, map_err};
use crate::{ImageRef, ProviderError};

/// Cloud Storage's endpoint.
pub const DEFAULT_ENDPOINT: &str = "https://storage.googleapis.com";
/// Object metadata key that records the hex sha256 of the uploaded file.
pub const SHA256_METADATA: &str = "clusterctl-sha256";
/// Chunks (but the last) must be a multiple of this (256 KiB).
pub const CHUNK_QUANTUM: u64 = 256 * 1024;
/// Default chunk size (8 MiB).
pub const DEFAULT_CHUNK_SIZE: u64 = 8 * 1024 * 1024;
/// Label key (before encoding) that carries the first 8 hex digits of the image digest.
pub const LABEL_DIGEST8: &str = "clusterctl.io/digest8";
/// Label key (before encoding) that carries the image version.
pub const LABEL_VERSION: &str = "clusterctl.io/version";
/// Guest OS features every clusterctl node image has.
pub const GUEST_OS_FEATURES: [&str; 3] = ["UEFI_COMPATIBLE", "VIRTIO_SCSI_MULTIQUEUE", "GVNIC"];
/// At most this many sessions are started for one upload (each after the last one expired).
const MAX_SESSIONS: u32 = 3;

/// What a Cloud Storage call failed with.
#[derive(Debug, Clone, thiserror::Error)]
pub enum StorageError {
    /// The API answered with an error status (after retries, for retryable ones).
    #[error("{operation}: HTTP {status}: {message}")]
    Http {
        /// What was being done.
        operation: String,
        /// HTTP status.
        status: u16,
        /// Google's message.
        message: String,
    },
    /// No answer, a failed connection, or an unreadable answer (after retries).
    #[error("{0}")]
    Transport(String),
    /// No token.
    #[error(transparent)]
    Auth(#[from] AuthError),
    /// The local file (archive or upload state) could not be read or written.
    #[error("{path}: {detail}")]
    File {
        /// The file.
        path: String,
        /// What went wrong.
        detail: String,
    },
    /// The upload kept failing; the session is kept for the next run.
    #[error(
        "uploading {object} kept failing: {detail}; run the command again to resume the upload"
    )]
    GaveUp {
        /// `gs://bucket/object`.
        object: String,
        /// The last failure.
        detail: String,
    },
}

/// What pushing an image failed with.
#[derive(Debug, thiserror::Error)]
pub enum PushError {
    /// The project has an image of that name made from another build.
    #[error(
        "image {image} in project {project} holds another build (digest {have}, this build {want}); delete it with `gcloud compute images delete {image} --project {project}` and push again"
    )]
    Conflict {
        /// Image name.
        image: String,
        /// Project.
        project: String,
        /// The digest8 label it has (`none` without one).
        have: String,
        /// The digest8 of the image being pushed.
        want: String,
    },
    /// The image exists but its creation failed.
    #[error(
        "image {image} in project {project} is {status}; delete it with `gcloud compute images delete {image} --project {project}` and push again"
    )]
    Unusable {
        /// Image name.
        image: String,
        /// Project.
        project: String,
        /// Its status.
        status: String,
    },
    /// The upload failed.
    #[error("uploading the disk archive: {0}")]
    Storage(#[from] StorageError),
    /// A Compute API call failed.
    #[error(transparent)]
    Provider(#[from] ProviderError),
}

/// Progress of [`push_image`] and [`Storage::upload_file`], reported through a callback.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PushProgress {
    /// The image exists in the project with this build's digest: nothing to do.
    ImageExists {
        /// Image name.
        image: String,
    },
    /// The archive is being hashed.
    Hashing {
        /// Its size.
        bytes: u64,
    },
    /// The object already holds these bytes: no upload.
    UploadSkipped {
        /// `gs://bucket/object`.
        object: String,
    },
    /// A new upload session was started.
    SessionStarted {
        /// `gs://bucket/object`.
        object: String,
        /// Bytes to send.
        total: u64,
    },
    /// An upload session left by an earlier run goes on from `from`.
    Resumed {
        /// `gs://bucket/object`.
        object: String,
        /// Bytes the server already has.
        from: u64,
        /// Size of the file.
        total: u64,
    },
    /// The server has `sent` of `total` bytes.
    Uploaded {
        /// Bytes the server has.
        sent: u64,
        /// Size of the file.
        total: u64,
    },
    /// A chunk failed and is tried again.
    Retrying {
        /// Failures in a row so far.
        attempt: u32,
        /// What went wrong.
        detail: String,
    },
    /// The upload session expired; a new one starts from the beginning.
    SessionExpired,
    /// `images.insert` was sent; waiting for the image.
    CreatingImage {
        /// Image name.
        image: String,
        /// `rawDisk.source`.
        source: String,
    },
}

/// What [`Storage::upload_file`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UploadOutcome {
    /// The object already held these bytes.
    AlreadyUploaded,
    /// The file was uploaded; `resumed_from` bytes were already there from an earlier run.
    Uploaded {
        /// Bytes an earlier run's session already had.
        resumed_from: u64,
    },
}

/// What [`push_image`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PushOutcome {
    /// The image was there already with this build's digest.
    AlreadyPushed {
        /// Image name.
        image: String,
    },
    /// The image was created.
    Created {
        /// Image name.
        image: String,
        /// `rawDisk.source` it was made from.
        source: String,
        /// What the upload did.
        upload: UploadOutcome,
    },
}

/// An object's metadata as `objects.get` returns it (the fields clusterctl reads).
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
pub struct ObjectInfo {
    /// Object name.
    pub name: String,
    /// Size in bytes (a decimal string in the API).
    #[serde(default)]
    pub size: Option<String>,
    /// Custom metadata.
    #[serde(default)]
    pub metadata: BTreeMap<String, String>,
}

/// The upload state kept next to the archive between runs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct UploadState {
    session_uri: String,
    bucket: String,
    object: String,
    size: u64,
    sha256: String,
}

/// Where a session stands.
enum SessionStatus {
    /// The server has bytes `0..n`.
    At(u64),
    /// The object is complete.
    Done,
    /// 404 or 410: the session is gone.
    Expired,
}

/// An HTTP answer, as the upload needs it.
struct Reply {
    status: u16,
    /// For a 308: bytes the server has (from `Range`).
    persisted: Option<u64>,
    /// `Location` (the session URI of a session start).
    location: Option<String>,
    text: String,
}

/// One exchange: an answer, or what kept it from coming.
enum Answer {
    Reply(Reply),
    Failed(String),
}

/// A Cloud Storage JSON API client.
pub struct Storage {
    http: reqwest::blocking::Client,
    endpoint: String,
    tokens: TokenSource,
    /// Retry bounds (attempts per chunk or call, backoff).
    pub retry: RetryPolicy,
    /// Chunk size; rounded down to a multiple of [`CHUNK_QUANTUM`] (at least one).
    pub chunk_size: u64,
}

impl std::fmt::Debug for Storage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Storage")
            .field("endpoint", &self.endpoint)
            .field("tokens", &self.tokens)
            .field("chunk_size", &self.chunk_size)
            .finish_non_exhaustive()
    }
}

/// The state file of an archive: `<archive>.upload.json`.
pub fn state_path(archive: &Path) -> PathBuf {
    let mut s = archive.as_os_str().to_owned();
    s.push(".upload.json");
    PathBuf::from(s)
}

fn file_err(path: &Path, e: impl std::fmt::Display) -> StorageError {
    StorageError::File {
        path: path.display().to_string(),
        detail: e.to_string(),
    }
}

/// Hex sha256 of a file.
fn sha256_file(path: &Path) -> Result<String, StorageError> {
    use aws_lc_rs::digest;
    let mut f = File::open(path).map_err(|e| file_err(path, e))?;
    let mut ctx = digest::Context::new(&digest::SHA256);
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).map_err(|e| file_err(path, e))?;
        if n == 0 {
            break;
        }
        ctx.update(&buf[..n]);
    }
    Ok(ctx
        .finish()
        .as_ref()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect())
}

fn read_state(path: &Path) -> Option<UploadState> {
    let text = std::fs::read_to_string(path).ok()?;
    serde_json::from_str(&text).ok()
}

/// Writes the state file atomically (a temporary file, then a rename), mode 0600.
fn write_state(path: &Path, state: &UploadState) -> Result<(), StorageError> {
    let text = serde_json::to_string_pretty(state).map_err(|e| file_err(path, e))?;
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt as _;
        opts.mode(0o600);
    }
    let mut f = opts.open(&tmp).map_err(|e| file_err(&tmp, e))?;
    f.write_all(text.as_bytes())
        .and_then(|()| f.sync_all())
        .map_err(|e| file_err(&tmp, e))?;
    std::fs::rename(&tmp, path).map_err(|e| file_err(path, e))
}

fn remove_state(path: &Path) -> Result<(), StorageError> {
    match std::fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(file_err(path, e)),
    }
}

/// The end of `Range: bytes=0-N` plus one: how many bytes the server has (0 without a header).
fn persisted(range: Option<&str>) -> Option<u64> {
    let Some(r) = range else { return Some(0) };
    let end = r.trim().strip_prefix("bytes=")?.split_once('-')?.1;
    end.trim().parse::<u64>().ok().map(|n| n + 1)
}

fn retryable(status: u16) -> bool {
    matches!(status, 408 | 429 | 500 | 502 | 503 | 504)
}

impl Storage {
    /// A client of `endpoint` ([`DEFAULT_ENDPOINT`], or a fake's base URL); each HTTP exchange
    /// (one chunk, at most) is limited to `request_timeout`. `tokens` must carry
    /// [`super::auth::STORAGE_SCOPE`].
    pub fn new(
        endpoint: &str,
        tokens: TokenSource,
        request_timeout: Duration,
    ) -> Result<Self, StorageError> {
        let http = reqwest::blocking::Client::builder()
            .timeout(request_timeout)
            .connect_timeout(Duration::from_secs(10).min(request_timeout))
            .user_agent(concat!("clusterctl/", env!("CARGO_PKG_VERSION")))
            // A 308 is the protocol's "go on", never a redirect to follow.
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .map_err(|e| StorageError::Transport(format!("cannot build the HTTP client: {e}")))?;
        Ok(Storage {
            http,
            endpoint: endpoint.trim_end_matches('/').to_owned(),
            tokens,
            retry: RetryPolicy::default(),
            chunk_size: DEFAULT_CHUNK_SIZE,
        })
    }

    fn chunk(&self) -> u64 {
        (self.chunk_size / CHUNK_QUANTUM).max(1) * CHUNK_QUANTUM
    }

    fn pause(&self, attempt: u32) {
        std::thread::sleep(backoff(
            &self.retry,
            attempt.saturating_sub(1),
            None,
            rand::random::<f64>(),
        ));
    }

    /// One HTTP exchange with a token; a 401 drops the cached token and is tried once more.
    fn exchange(
        &self,
        what: &str,
        build: &dyn Fn() -> reqwest::blocking::RequestBuilder,
    ) -> Result<Answer, StorageError> {
        let mut reauthed = false;
        loop {
            let token = self.tokens.token(&self.http)?;
            let outcome = build().bearer_auth(token).send().and_then(|r| {
                let status = r.status().as_u16();
                let header = |name: &str| {
                    r.headers()
                        .get(name)
                        .and_then(|v| v.to_str().ok())
                        .map(str::to_owned)
                };
                let range = header("range");
                let location = header("location");
                r.text().map(|t| (status, range, location, t))
            });
            match outcome {
                Err(e) => return Ok(Answer::Failed(super::client::transport_detail(what, &e))),
                Ok((401, ..)) if !reauthed => {
                    reauthed = true;
                    self.tokens.invalidate();
                }
                Ok((status, range, location, text)) => {
                    let persisted = match status {
                        308 => match persisted(range.as_deref()) {
                            Some(n) => Some(n),
                            None => {
                                return Ok(Answer::Failed(format!(
                                    "{what}: unreadable Range header {range:?}"
                                )));
                            }
                        },
                        _ => None,
                    };
                    return Ok(Answer::Reply(Reply {
                        status,
                        persisted,
                        location,
                        text,
                    }));
                }
            }
        }
    }

    /// A call retried on transient failures; the answer of the first non-transient status.
    fn call(
        &self,
        what: &str,
        build: &dyn Fn() -> reqwest::blocking::RequestBuilder,
    ) -> Result<Reply, StorageError> {
        let mut attempt = 0;
        loop {
            let detail = match self.exchange(what, build)? {
                Answer::Reply(r) if !retryable(r.status) => return Ok(r),
                Answer::Reply(r) => {
                    format!(
                        "{what}: HTTP {}: {}",
                        r.status,
                        super::client::error_fields(&r.text).1
                    )
                }
                Answer::Failed(d) => d,
            };
            attempt += 1;
            if attempt >= self.retry.max_attempts {
                return Err(StorageError::Transport(detail));
            }
            tracing::debug!(attempt, %detail, "retrying storage call");
            self.pause(attempt);
        }
    }

    /// `objects.get` (metadata); `None` for a 404.
    pub fn object(&self, bucket: &str, object: &str) -> Result<Option<ObjectInfo>, StorageError> {
        let url = format!(
            "{}/storage/v1/b/{}/o/{}",
            self.endpoint,
            urlencode(bucket),
            urlencode(object)
        );
        let what = format!("reading gs://{bucket}/{object}");
        let r = self.call(&what, &|| self.http.get(&url))?;
        match r.status {
            200 => serde_json::from_str(&r.text)
                .map(Some)
                .map_err(|e| StorageError::Transport(format!("{what}: unreadable answer: {e}"))),
            404 => Ok(None),
            status => Err(StorageError::Http {
                operation: what,
                status,
                message: super::client::error_fields(&r.text).1,
            }),
        }
    }

    /// Starts a resumable upload session; its URI.
    fn start_session(
        &self,
        bucket: &str,
        object: &str,
        size: u64,
        sha256: &str,
    ) -> Result<String, StorageError> {
        let url = format!(
            "{}/upload/storage/v1/b/{}/o?uploadType=resumable&name={}",
            self.endpoint,
            urlencode(bucket),
            urlencode(object)
        );
        let body = serde_json::json!({
            "name": object,
            "contentType": "application/gzip",
            "metadata": { SHA256_METADATA: sha256 },
        })
        .to_string();
        let what = format!("starting the upload of gs://{bucket}/{object}");
        let r = self.call(&what, &|| {
            self.http
                .post(&url)
                .header("Content-Type", "application/json; charset=UTF-8")
                .header("X-Upload-Content-Type", "application/gzip")
                .header("X-Upload-Content-Length", size.to_string())
                .body(body.clone())
        })?;
        match (r.status, r.location) {
            (200 | 201, Some(uri)) if uri.starts_with("http") => Ok(uri),
            (200 | 201, _) => Err(StorageError::Transport(format!(
                "{what}: the answer has no Location header with the session URI"
            ))),
            (status, _) => Err(StorageError::Http {
                operation: what,
                status,
                message: super::client::error_fields(&r.text).1,
            }),
        }
    }

    /// Where the session stands (`PUT` with `Content-Range: bytes */TOTAL`, no body).
    fn status(&self, uri: &str, size: u64) -> Result<SessionStatus, StorageError> {
        let what = "asking the upload session for its status";
        let r = self.call(what, &|| {
            self.http
                .put(uri)
                .header("Content-Range", format!("bytes */{size}"))
                .body(Vec::new())
        })?;
        match r.status {
            200 | 201 => Ok(SessionStatus::Done),
            308 => Ok(SessionStatus::At(r.persisted.unwrap_or(0))),
            404 | 410 => Ok(SessionStatus::Expired),
            status => Err(StorageError::Http {
                operation: what.to_owned(),
                status,
                message: super::client::error_fields(&r.text).1,
            }),
        }
    }

    /// Uploads `path` as `gs://bucket/object` with a resumable upload, resuming a session an
    /// earlier run left in the state file ([`state_path`]); nothing is sent when the object
    /// already holds these bytes.
    pub fn upload_file(
        &self,
        bucket: &str,
        object: &str,
        path: &Path,
        report: &mut dyn FnMut(PushProgress),
    ) -> Result<UploadOutcome, StorageError> {
        let gs = format!("gs://{bucket}/{object}");
        let size = std::fs::metadata(path)
            .map_err(|e| file_err(path, e))?
            .len();
        report(PushProgress::Hashing { bytes: size });
        let sha256 = sha256_file(path)?;
        let state_file = state_path(path);
        if let Some(o) = self.object(bucket, object)?
            && o.metadata.get(SHA256_METADATA) == Some(&sha256)
            && o.size.as_deref().and_then(|s| s.parse::<u64>().ok()) == Some(size)
        {
            remove_state(&state_file)?;
            report(PushProgress::UploadSkipped { object: gs });
            return Ok(UploadOutcome::AlreadyUploaded);
        }
        let mut saved = read_state(&state_file).filter(|s| {
            s.bucket == bucket && s.object == object && s.size == size && s.sha256 == sha256
        });
        if saved.is_none() {
            remove_state(&state_file)?;
        }
        let mut file = File::open(path).map_err(|e| file_err(path, e))?;
        let mut sessions = 0;
        let mut resumed_from;
        loop {
            let (uri, offset) = match saved.take() {
                Some(s) => match self.status(&s.session_uri, size)? {
                    SessionStatus::Done => {
                        remove_state(&state_file)?;
                        report(PushProgress::Uploaded {
                            sent: size,
                            total: size,
                        });
                        return Ok(UploadOutcome::Uploaded { resumed_from: size });
                    }
                    SessionStatus::Expired => {
                        remove_state(&state_file)?;
                        report(PushProgress::SessionExpired);
                        continue;
                    }
                    SessionStatus::At(n) => {
                        resumed_from = n;
                        report(PushProgress::Resumed {
                            object: gs.clone(),
                            from: n,
                            total: size,
                        });
                        (s.session_uri, n)
                    }
                },
                None => {
                    sessions += 1;
                    if sessions > MAX_SESSIONS {
                        return Err(StorageError::GaveUp {
                            object: gs,
                            detail: format!("{MAX_SESSIONS} upload sessions expired in a row"),
                        });
                    }
                    let uri = self.start_session(bucket, object, size, &sha256)?;
                    write_state(
                        &state_file,
                        &UploadState {
                            session_uri: uri.clone(),
                            bucket: bucket.to_owned(),
                            object: object.to_owned(),
                            size,
                            sha256: sha256.clone(),
                        },
                    )?;
                    resumed_from = 0;
                    report(PushProgress::SessionStarted {
                        object: gs.clone(),
                        total: size,
                    });
                    (uri, 0)
                }
            };
            match self.send_chunks(&uri, &mut file, path, offset, size, &gs, report)? {
                SessionStatus::Done => {
                    remove_state(&state_file)?;
                    return Ok(UploadOutcome::Uploaded { resumed_from });
                }
                SessionStatus::Expired => {
                    remove_state(&state_file)?;
                    report(PushProgress::SessionExpired);
                }
                SessionStatus::At(_) => {}
            }
        }
    }

    /// Sends the file from `offset` on; `Done`, or `Expired` when the session is gone.
    #[allow(clippy::too_many_arguments)]
    fn send_chunks(
        &self,
        uri: &str,
        file: &mut File,
        path: &Path,
        mut offset: u64,
        size: u64,
        gs: &str,
        report: &mut dyn FnMut(PushProgress),
    ) -> Result<SessionStatus, StorageError> {
        let chunk = self.chunk();
        let mut failures = 0u32;
        loop {
            let end = size.min(offset.saturating_add(chunk));
            let mut buf = vec![0u8; usize::try_from(end.saturating_sub(offset)).unwrap_or(0)];
            file.seek(SeekFrom::Start(offset))
                .and_then(|_| file.read_exact(&mut buf))
                .map_err(|e| file_err(path, e))?;
            let range = if buf.is_empty() {
                // Nothing left to send (an empty file, or the server has it all): finalize.
                format!("bytes */{size}")
            } else {
                format!("bytes {offset}-{}/{size}", end - 1)
            };
            let what = format!("uploading bytes {offset}-{end} of {gs}");
            let answer = self.exchange(&what, &|| {
                self.http
                    .put(uri)
                    .header("Content-Range", range.clone())
                    .body(buf.clone())
            })?;
            let detail = match answer {
                Answer::Failed(d) => d,
                Answer::Reply(r) => match r.status {
                    200 | 201 => {
                        report(PushProgress::Uploaded {
                            sent: size,
                            total: size,
                        });
                        return Ok(SessionStatus::Done);
                    }
                    308 if r.persisted.unwrap_or(0) > offset => {
                        offset = r.persisted.unwrap_or(0).min(size);
                        failures = 0;
                        report(PushProgress::Uploaded {
                            sent: offset,
                            total: size,
                        });
                        continue;
                    }
                    // The server kept none of the chunk: a failure like any other.
                    308 => format!("{what}: the server kept none of it"),
                    404 | 410 => return Ok(SessionStatus::Expired),
                    s if retryable(s) => format!(
                        "{what}: HTTP {s}: {}",
                        super::client::error_fields(&r.text).1
                    ),
                    s => {
                        return Err(StorageError::Http {
                            operation: what,
                            status: s,
                            message: super::client::error_fields(&r.text).1,
                        });
                    }
                },
            };
            failures += 1;
            if failures >= self.retry.max_attempts {
                return Err(StorageError::GaveUp {
                    object: gs.to_owned(),
                    detail,
                });
            }
            report(PushProgress::Retrying {
                attempt: failures,
                detail,
            });
            self.pause(failures);
            offset = match self.status(uri, size) {
                Ok(SessionStatus::At(n)) => n.min(size),
                Ok(other) => return Ok(other),
                Err(StorageError::Transport(d)) => {
                    return Err(StorageError::GaveUp {
                        object: gs.to_owned(),
                        detail: d,
                    });
                }
                Err(e) => return Err(e),
            };
        }
    }
}

/// The object name an image's archive is uploaded as: `<image name>-<digest8>.tar.gz`, so an
/// object another build's image was made from is never overwritten.
pub fn object_name(image: &ImageRef) -> String {
    format!("{}-{}.tar.gz", image_name(image), digest8(&image.digest))
}

/// Pushes a node image: uploads `archive` (the image's GCE disk tar.gz) to `bucket` and creates
/// the Compute image `clusterctl-<version>` from it, labelled with the image's digest8 and
/// version, in `family` when given. Nothing is done when the project has the image with this
/// digest already; an image of that name from another build is refused, never deleted.
pub fn push_image(
    compute: &dyn Compute,
    storage: &Storage,
    bucket: &str,
    archive: &Path,
    image: &ImageRef,
    family: Option<&str>,
    report: &mut dyn FnMut(PushProgress),
) -> Result<PushOutcome, PushError> {
    let name = image_name(image);
    let want = digest8(&image.digest);
    let digest_key = encode_label(LABEL_DIGEST8, true)?;
    let project = compute.project().to_owned();
    let check = |found: Image| -> Result<PushOutcome, PushError> {
        let have = found.labels.get(&digest_key).cloned();
        if have.as_deref() != Some(want.as_str()) {
            return Err(PushError::Conflict {
                image: name.clone(),
                project: project.clone(),
                have: have.unwrap_or_else(|| "none".into()),
                want: want.clone(),
            });
        }
        match found.status.as_deref() {
            Some("FAILED" | "DELETING") => Err(PushError::Unusable {
                image: name.clone(),
                project: project.clone(),
                status: found.status.unwrap_or_default(),
            }),
            _ => Ok(PushOutcome::AlreadyPushed {
                image: name.clone(),
            }),
        }
    };
    let get = |what: &str| {
        compute
            .get_image(&name)
            .map_err(|e| map_err(&format!("{what} image {name:?}"), e))
    };
    if let Some(found) = get("reading")? {
        let outcome = check(found)?;
        report(PushProgress::ImageExists {
            image: name.clone(),
        });
        return Ok(outcome);
    }
    let object = object_name(image);
    let upload = storage.upload_file(bucket, &object, archive, report)?;
    let source = format!("https://storage.googleapis.com/{bucket}/{object}");
    let mut labels = BTreeMap::new();
    labels.insert(digest_key.clone(), want.clone());
    if let Ok(v) = encode_label(&image.version, false) {
        labels.insert(encode_label(LABEL_VERSION, true)?, v);
    }
    let request = Image {
        name: name.clone(),
        labels,
        family: family.map(str::to_owned),
        description: Some(format!(
            "clusterctl node image {} ({})",
            image.version, image.digest
        )),
        raw_disk: Some(RawDisk {
            source: Some(source.clone()),
            ..RawDisk::default()
        }),
        guest_os_features: GUEST_OS_FEATURES
            .iter()
            .map(|f| GuestOsFeature {
                kind: (*f).to_owned(),
            })
            .collect(),
        ..Image::default()
    };
    report(PushProgress::CreatingImage {
        image: name.clone(),
        source: source.clone(),
    });
    let what = format!("creating image {name:?}");
    match compute
        .insert_image(&request)
        .and_then(|op| compute.wait(op))
    {
        Ok(_) => {}
        // A retry after a lost answer, or another push meanwhile: look at what is there.
        Err(e) if e.is_already_exists() => {
            let found = get("reading")?.ok_or_else(|| map_err(&what, e))?;
            check(found)?;
        }
        Err(e) => return Err(map_err(&what, e).into()),
    }
    Ok(PushOutcome::Created {
        image: name,
        source,
        upload,
    })
}

#[cfg(all(test, feature = "fake"))]
mod tests {
    //! The upload against two servers: `fake-gcs-server` (the Go implementation of the Cloud
    //! Storage API; `CLUSTERCTL_FAKE_GCS` names the binary, else `fake-gcs-server` on `PATH`;
    //! the tests that need it are skipped without it) and a small in-test server that follows
    //! the documented resumable-upload protocol. Faults and resumption are tested against the
    //! latter only: fake-gcs-server finalizes an upload on a status query (`bytes */TOTAL`)
    //! and appends a chunk whatever its start offset, so a resumed upload cannot be checked
    //! against it. A fault-injecting TCP proxy sits between the client and either server.

    use std::collections::{BTreeSet, HashMap};
    use std::io::{BufRead, BufReader};
    use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::{Arc, Mutex};

    use super::*;
    use crate::gce::auth::Credentials;
    use crate::gce::client::RestCompute;
    use crate::gce::fake::FakeCompute;

    const MIB: u64 = 1024 * 1024;
    const BUCKET: &str = "clusterctl-images";

    fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
        m.lock().unwrap_or_else(|p| p.into_inner())
    }

    // --- HTTP/1.1 framing shared by the proxy and the protocol server ------------------------

    /// A request head: the request line and headers.
    struct Head {
        raw: Vec<u8>,
        method: String,
        target: String,
        headers: Vec<(String, String)>,
    }

    impl Head {
        fn header(&self, name: &str) -> Option<&str> {
            self.headers
                .iter()
                .find(|(k, _)| k.eq_ignore_ascii_case(name))
                .map(|(_, v)| v.as_str())
        }

        fn content_length(&self) -> usize {
            self.header("content-length")
                .and_then(|v| v.trim().parse().ok())
                .unwrap_or(0)
        }

        /// `(start, end)` of a chunk's `Content-Range: bytes A-B/T`.
        fn chunk_range(&self) -> Option<(u64, u64)> {
            let r = self.header("content-range")?.strip_prefix("bytes ")?;
            let (a, b) = r.split_once('/')?.0.split_once('-')?;
            Some((a.parse().ok()?, b.parse().ok()?))
        }
    }

    fn read_head(r: &mut impl BufRead) -> Option<Head> {
        let mut raw = Vec::new();
        let mut lines = Vec::new();
        loop {
            let mut line = String::new();
            if r.read_line(&mut line).ok()? == 0 {
                return None;
            }
            raw.extend_from_slice(line.as_bytes());
            let l = line.trim_end().to_owned();
            if l.is_empty() {
                break;
            }
            lines.push(l);
        }
        let mut first = lines.first()?.split(' ');
        let method = first.next()?.to_owned();
        let target = first.next()?.to_owned();
        let headers = lines[1..]
            .iter()
            .filter_map(|l| l.split_once(':'))
            .map(|(k, v)| (k.trim().to_owned(), v.trim().to_owned()))
            .collect();
        Some(Head {
            raw,
            method,
            target,
            headers,
        })
    }

    // --- the fault-injecting proxy ------------------------------------------------------------

    #[derive(Default)]
    struct ProxyState {
        upstream: Option<SocketAddr>,
        /// Chunk requests seen (1-based count).
        chunks_seen: usize,
        /// Drop the chunk requests with these numbers.
        drop: BTreeSet<usize>,
        /// Drop every chunk request from this number on.
        drop_from: Option<usize>,
        /// Ranges of the chunk requests forwarded whole.
        forwarded: Vec<(u64, u64)>,
    }

    /// A TCP proxy on 127.0.0.1 that reads each request, counts chunk uploads (`PUT` with a
    /// numeric `Content-Range`) and drops the chosen ones halfway through their body.
    struct Proxy {
        addr: SocketAddr,
        state: Arc<Mutex<ProxyState>>,
        stop: Arc<AtomicBool>,
    }

    impl Proxy {
        fn start() -> Proxy {
            let listener = TcpListener::bind("127.0.0.1:0").expect("proxy listens");
            let addr = listener.local_addr().expect("proxy address");
            let state = Arc::new(Mutex::new(ProxyState::default()));
            let stop = Arc::new(AtomicBool::new(false));
            let (st, sp) = (Arc::clone(&state), Arc::clone(&stop));
            std::thread::spawn(move || {
                for conn in listener.incoming() {
                    if sp.load(Ordering::SeqCst) {
                        break;
                    }
                    let Ok(conn) = conn else { continue };
                    let st = Arc::clone(&st);
                    std::thread::spawn(move || proxy_conn(conn, &st));
                }
            });
            Proxy { addr, state, stop }
        }

        fn url(&self) -> String {
            format!("http://{}", self.addr)
        }

        fn forwarded_bytes(&self) -> u64 {
            lock(&self.state)
                .forwarded
                .iter()
                .map(|(a, b)| b - a + 1)
                .sum()
        }

        fn reset(&self) {
            let mut s = lock(&self.state);
            s.chunks_seen = 0;
            s.drop.clear();
            s.drop_from = None;
            s.forwarded.clear();
        }
    }

    impl Drop for Proxy {
        fn drop(&mut self) {
            self.stop.store(true, Ordering::SeqCst);
            let _ = TcpStream::connect(self.addr);
        }
    }

    fn proxy_conn(client: TcpStream, state: &Mutex<ProxyState>) {
        let Some(up) = lock(state).upstream else {
            return;
        };
        let Ok(upstream) = TcpStream::connect(up) else {
            return;
        };
        let (Ok(mut up_read), Ok(mut client_write), Ok(client_read)) =
            (upstream.try_clone(), client.try_clone(), client.try_clone())
        else {
            return;
        };
        std::thread::spawn(move || {
            let _ = std::io::copy(&mut up_read, &mut client_write);
            let _ = client_write.shutdown(Shutdown::Both);
        });
        let mut reader = BufReader::new(client_read);
        let mut upstream_w = upstream;
        while let Some(head) = read_head(&mut reader) {
            let mut body = vec![0u8; head.content_length()];
            if reader.read_exact(&mut body).is_err() {
                break;
            }
            let chunk = (head.method == "PUT").then(|| head.chunk_range()).flatten();
            let dropped = chunk.is_some() && {
                let mut s = lock(state);
                s.chunks_seen += 1;
                let n = s.chunks_seen;
                s.drop.contains(&n) || s.drop_from.is_some_and(|f| n >= f)
            };
            if dropped {
                // Half the chunk reaches the server, then the connection dies.
                let _ = upstream_w.write_all(&head.raw);
                let _ = upstream_w.write_all(&body[..body.len() / 2]);
                break;
            }
            if upstream_w
                .write_all(&head.raw)
                .and_then(|()| upstream_w.write_all(&body))
                .is_err()
            {
                break;
            }
            if let Some(r) = chunk {
                lock(state).forwarded.push(r);
            }
        }
        let _ = upstream_w.shutdown(Shutdown::Both);
        let _ = client.shutdown(Shutdown::Both);
    }

    // --- an in-test server of the documented resumable-upload protocol ------------------------

    struct Session {
        bucket: String,
        object: String,
        total: u64,
        metadata: serde_json::Value,
        data: Vec<u8>,
    }

    #[derive(Default)]
    struct ProtoState {
        sessions: HashMap<String, Session>,
        objects: HashMap<(String, String), (Vec<u8>, serde_json::Value)>,
        sessions_started: usize,
        status_queries: usize,
        next_id: u64,
    }

    /// Follows <https://cloud.google.com/storage/docs/performing-resumable-uploads>: offsets
    /// are honoured (a chunk that overlaps what the server has is cut, one past it refused),
    /// `bytes */T` asks for the status, a session it forgot answers 404, a chunk whose body
    /// did not arrive whole is not kept.
    struct ProtoServer {
        addr: SocketAddr,
        state: Arc<Mutex<ProtoState>>,
    }

    impl ProtoServer {
        fn start() -> ProtoServer {
            let listener = TcpListener::bind("127.0.0.1:0").expect("server listens");
            let addr = listener.local_addr().expect("server address");
            let state = Arc::new(Mutex::new(ProtoState::default()));
            let st = Arc::clone(&state);
            std::thread::spawn(move || {
                for conn in listener.incoming().flatten() {
                    let st = Arc::clone(&st);
                    std::thread::spawn(move || proto_conn(conn, &st));
                }
            });
            ProtoServer { addr, state }
        }

        fn expire_sessions(&self) {
            lock(&self.state).sessions.clear();
        }

        fn object(&self, bucket: &str, object: &str) -> Option<Vec<u8>> {
            lock(&self.state)
                .objects
                .get(&(bucket.to_owned(), object.to_owned()))
                .map(|(d, _)| d.clone())
        }
    }

    fn query(target: &str) -> (String, HashMap<String, String>) {
        let (path, q) = target.split_once('?').unwrap_or((target, ""));
        let map = q
            .split('&')
            .filter_map(|kv| kv.split_once('='))
            .map(|(k, v)| (k.to_owned(), percent_decode(v)))
            .collect();
        (percent_decode(path), map)
    }

    fn percent_decode(s: &str) -> String {
        let b = s.as_bytes();
        let mut out = Vec::new();
        let mut i = 0;
        while i < b.len() {
            if b[i] == b'%'
                && let Some(v) = s
                    .get(i + 1..i + 3)
                    .and_then(|h| u8::from_str_radix(h, 16).ok())
            {
                out.push(v);
                i += 3;
            } else {
                out.push(b[i]);
                i += 1;
            }
        }
        String::from_utf8_lossy(&out).into_owned()
    }

    fn respond(w: &mut TcpStream, status: u16, headers: &[(&str, String)], body: &[u8]) -> bool {
        let mut head = format!("HTTP/1.1 {status} X\r\nContent-Length: {}\r\n", body.len());
        for (k, v) in headers {
            head.push_str(&format!("{k}: {v}\r\n"));
        }
        head.push_str("\r\n");
        w.write_all(head.as_bytes())
            .and_then(|()| w.write_all(body))
            .is_ok()
    }

    fn object_json(name: &str, size: usize, metadata: &serde_json::Value) -> Vec<u8> {
        serde_json::json!({"name": name, "size": size.to_string(), "metadata": metadata})
            .to_string()
            .into_bytes()
    }

    fn proto_conn(conn: TcpStream, state: &Mutex<ProtoState>) {
        let Ok(read) = conn.try_clone() else { return };
        let mut reader = BufReader::new(read);
        let mut w = conn;
        while let Some(head) = read_head(&mut reader) {
            let mut body = vec![0u8; head.content_length()];
            if reader.read_exact(&mut body).is_err() {
                return; // a cut chunk: nothing of it is kept
            }
            let (path, q) = query(&head.target);
            let mut st = lock(state);
            let (status, headers, out): (u16, Vec<(&str, String)>, Vec<u8>) = if head.method
                == "POST"
                && q.get("uploadType").map(String::as_str) == Some("resumable")
            {
                let bucket = path
                    .trim_start_matches("/upload/storage/v1/b/")
                    .trim_end_matches("/o")
                    .to_owned();
                let meta: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
                let total = head
                    .header("x-upload-content-length")
                    .and_then(|v| v.parse().ok());
                match (q.get("name"), total) {
                    (Some(name), Some(total)) if meta["name"] == name.as_str() => {
                        st.next_id += 1;
                        st.sessions_started += 1;
                        let id = format!("s{}", st.next_id);
                        st.sessions.insert(
                            id.clone(),
                            Session {
                                bucket,
                                object: name.clone(),
                                total,
                                metadata: meta["metadata"].clone(),
                                data: Vec::new(),
                            },
                        );
                        let host = head.header("host").unwrap_or("").to_owned();
                        let loc = format!(
                            "http://{host}/upload/storage/v1/b/x/o?uploadType=resumable&upload_id={id}"
                        );
                        (200, vec![("Location", loc)], Vec::new())
                    }
                    _ => (
                        400,
                        vec![],
                        b"{\"error\":{\"message\":\"bad start\"}}".to_vec(),
                    ),
                }
            } else if head.method == "PUT" {
                let id = q.get("upload_id").cloned().unwrap_or_default();
                let range = head.header("content-range").unwrap_or("").to_owned();
                let chunk = head.chunk_range();
                if chunk.is_none() {
                    st.status_queries += 1;
                }
                match st.sessions.get_mut(&id) {
                    None => (
                        404,
                        vec![],
                        b"{\"error\":{\"message\":\"no such upload\"}}".to_vec(),
                    ),
                    Some(s) => {
                        let have = s.data.len() as u64;
                        let ok = match chunk {
                            Some((a, b)) if a <= have && b + 1 == a + body.len() as u64 => {
                                let skip = usize::try_from(have - a).unwrap_or(0);
                                if skip < body.len() {
                                    s.data.extend_from_slice(&body[skip..]);
                                }
                                true
                            }
                            Some(_) => false,
                            None => range.starts_with("bytes */") && body.is_empty(),
                        };
                        let have = s.data.len() as u64;
                        if !ok {
                            (
                                400,
                                vec![],
                                b"{\"error\":{\"message\":\"bad range\"}}".to_vec(),
                            )
                        } else if have == s.total {
                            let s = st.sessions.remove(&id).expect("session is there");
                            let json = object_json(&s.object, s.data.len(), &s.metadata);
                            st.objects
                                .insert((s.bucket, s.object), (s.data, s.metadata));
                            (200, vec![], json)
                        } else if have == 0 {
                            (308, vec![], Vec::new())
                        } else {
                            (
                                308,
                                vec![("Range", format!("bytes=0-{}", have - 1))],
                                Vec::new(),
                            )
                        }
                    }
                }
            } else if head.method == "GET" && path.starts_with("/storage/v1/b/") {
                let rest = path.trim_start_matches("/storage/v1/b/");
                let (bucket, object) = rest.split_once("/o/").unwrap_or((rest, ""));
                match st.objects.get(&(bucket.to_owned(), object.to_owned())) {
                    None => (
                        404,
                        vec![],
                        b"{\"error\":{\"message\":\"no such object\"}}".to_vec(),
                    ),
                    Some((d, _)) if q.get("alt").map(String::as_str) == Some("media") => {
                        (200, vec![], d.clone())
                    }
                    Some((d, m)) => (200, vec![], object_json(object, d.len(), m)),
                }
            } else {
                (
                    400,
                    vec![],
                    b"{\"error\":{\"message\":\"unknown call\"}}".to_vec(),
                )
            };
            drop(st);
            if !respond(&mut w, status, &headers, &out) {
                return;
            }
        }
    }

    // --- fake-gcs-server -----------------------------------------------------------------------

    // --- helpers --------------------------------------------------------------------------------

    fn storage(endpoint: &str, max_attempts: u32) -> Storage {
        let mut s = Storage::new(
            endpoint,
            TokenSource::new(Credentials::Static("test-token".into())),
            Duration::from_secs(5),
        )
        .expect("client");
        s.retry = RetryPolicy {
            max_attempts,
            base: Duration::from_millis(5),
            max_backoff: Duration::from_millis(40),
            max_retry_after: Duration::from_secs(1),
            call_deadline: Duration::from_secs(20),
        };
        s.chunk_size = CHUNK_QUANTUM;
        s
    }

    /// A 3 MiB archive of varied bytes in a temporary directory.
    fn archive(dir: &Path, seed: u32) -> PathBuf {
        let mut x = seed | 1;
        let bytes: Vec<u8> = (0..3 * MIB)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 17;
                x ^= x << 5;
                (x >> 24) as u8
            })
            .collect();
        let p = dir.join("gce-disk.tar.gz");
        std::fs::write(&p, bytes).expect("archive written");
        p
    }

    fn download(base: &str, object: &str) -> Vec<u8> {
        let r = reqwest::blocking::Client::new()
            .get(format!(
                "{base}/storage/v1/b/{BUCKET}/o/{}?alt=media",
                urlencode(object)
            ))
            .send()
            .expect("download");
        assert!(r.status().is_success(), "{r:?}");
        r.bytes().expect("body").to_vec()
    }

    fn collect() -> (Arc<Mutex<Vec<PushProgress>>>, impl FnMut(PushProgress)) {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let s = Arc::clone(&seen);
        (seen, move |p| lock(&s).push(p))
    }

    fn image(version: &str, digest: &str) -> ImageRef {
        ImageRef {
            version: version.into(),
            dir: "/nonexistent".into(),
            digest: digest.into(),
        }
    }

    // --- tests ------------------------------------------------------------------------------------

    #[test]
    fn a_dropped_chunk_is_retried_from_where_the_session_is() {
        let server = ProtoServer::start();
        let proxy = Proxy::start();
        lock(&proxy.state).upstream = Some(server.addr);
        lock(&proxy.state).drop.insert(5);
        let dir = tempfile::tempdir().expect("tempdir");
        let file = archive(dir.path(), 7);
        let (seen, mut report) = collect();
        let out = storage(&proxy.url(), 4)
            .upload_file(BUCKET, "a.tar.gz", &file, &mut report)
            .expect("upload survives one dropped chunk");
        assert_eq!(out, UploadOutcome::Uploaded { resumed_from: 0 });
        assert_eq!(
            server.object(BUCKET, "a.tar.gz").as_deref(),
            Some(std::fs::read(&file).expect("read").as_slice())
        );
        let st = lock(&proxy.state);
        assert_eq!(st.chunks_seen, 13, "12 chunks and the dropped one again");
        assert_eq!(st.forwarded.len(), 12);
        assert_eq!(st.forwarded[4], (4 * CHUNK_QUANTUM, 5 * CHUNK_QUANTUM - 1));
        drop(st);
        assert!(lock(&server.state).status_queries >= 1, "status asked");
        assert!(
            lock(&seen)
                .iter()
                .any(|p| matches!(p, PushProgress::Retrying { attempt: 1, .. }))
        );
        assert!(!state_path(&file).exists(), "state file removed");
    }

    #[test]
    fn a_killed_upload_resumes_from_the_state_file_and_an_expired_one_starts_over() {
        let server = ProtoServer::start();
        let proxy = Proxy::start();
        lock(&proxy.state).upstream = Some(server.addr);
        let dir = tempfile::tempdir().expect("tempdir");
        let file = archive(dir.path(), 11);
        let bytes = std::fs::read(&file).expect("read");
        let size = bytes.len() as u64;

        // The first run gets 4 chunks through, then every chunk fails until it gives up.
        lock(&proxy.state).drop_from = Some(5);
        let err = storage(&proxy.url(), 2)
            .upload_file(BUCKET, "b.tar.gz", &file, &mut |_| {})
            .expect_err("the first run gives up");
        assert!(matches!(err, StorageError::GaveUp { .. }), "{err}");
        assert!(err.to_string().contains("run the command again"), "{err}");
        let state = state_path(&file);
        let saved = read_state(&state).expect("state file kept");
        assert_eq!((saved.size, saved.bucket.as_str()), (size, BUCKET));
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt as _;
            let mode = std::fs::metadata(&state)
                .expect("stat")
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600);
        }

        // A new client (a new process) goes on from the server's 1 MiB: only the rest is sent.
        proxy.reset();
        let (seen, mut report) = collect();
        let out = storage(&proxy.url(), 4)
            .upload_file(BUCKET, "b.tar.gz", &file, &mut report)
            .expect("resumed");
        assert_eq!(
            out,
            UploadOutcome::Uploaded {
                resumed_from: 4 * CHUNK_QUANTUM
            }
        );
        assert_eq!(proxy.forwarded_bytes(), size - 4 * CHUNK_QUANTUM);
        assert_eq!(lock(&proxy.state).forwarded[0].0, 4 * CHUNK_QUANTUM);
        assert_eq!(lock(&server.state).sessions_started, 1, "same session");
        assert!(lock(&seen).contains(&PushProgress::Resumed {
            object: format!("gs://{BUCKET}/b.tar.gz"),
            from: 4 * CHUNK_QUANTUM,
            total: size,
        }));
        assert_eq!(server.object(BUCKET, "b.tar.gz"), Some(bytes.clone()));
        assert!(!state.exists(), "state file removed");

        // Done already: a new run sends nothing.
        proxy.reset();
        let out = storage(&proxy.url(), 4)
            .upload_file(BUCKET, "b.tar.gz", &file, &mut |_| {})
            .expect("no-op");
        assert_eq!(out, UploadOutcome::AlreadyUploaded);
        assert_eq!(lock(&proxy.state).chunks_seen, 0);

        // A session that expired between runs: a new one, from the start.
        lock(&proxy.state).drop_from = Some(3);
        storage(&proxy.url(), 2)
            .upload_file(BUCKET, "c.tar.gz", &file, &mut |_| {})
            .expect_err("gives up");
        assert!(state.exists());
        server.expire_sessions();
        proxy.reset();
        let (seen, mut report) = collect();
        let out = storage(&proxy.url(), 4)
            .upload_file(BUCKET, "c.tar.gz", &file, &mut report)
            .expect("starts over");
        assert_eq!(out, UploadOutcome::Uploaded { resumed_from: 0 });
        assert!(lock(&seen).contains(&PushProgress::SessionExpired));
        assert_eq!(proxy.forwarded_bytes(), size);
        assert_eq!(lock(&server.state).sessions_started, 3);
        assert_eq!(server.object(BUCKET, "c.tar.gz"), Some(bytes));
        assert!(!state.exists());
    }

    /// The whole push: upload, image created in the fake Compute API, a second push a no-op,
    /// another build under the same name refused.
    fn push_scenario(storage_url: &str, proxy: &Proxy, download_base: &str) {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = archive(dir.path(), 23);
        let bytes = std::fs::read(&file).expect("read");
        let fake = FakeCompute::start("clusterctl-test", &["us-central1-a"]);
        let compute = RestCompute::new(
            &fake.base_url(),
            "clusterctl-test",
            TokenSource::new(Credentials::Static(fake.issue_token())),
            Duration::from_secs(5),
        )
        .expect("compute client");
        let store = storage(storage_url, 4);
        let v1 = image("bookworm-20261202-eaaa25c3621b", "sha256:0123456789abcdef");
        let (seen, mut report) = collect();
        let out = push_image(
            &compute,
            &store,
            BUCKET,
            &file,
            &v1,
            Some("clusterctl-bookworm"),
            &mut report,
        )
        .expect("pushed");
        let name = "clusterctl-bookworm-20261202-eaaa25c3621b";
        let object = format!("{name}-01234567.tar.gz");
        let source = format!("https://storage.googleapis.com/{BUCKET}/{object}");
        assert_eq!(
            out,
            PushOutcome::Created {
                image: name.into(),
                source: source.clone(),
                upload: UploadOutcome::Uploaded { resumed_from: 0 },
            }
        );
        assert_eq!(lock(&proxy.state).forwarded.len(), 12, "3 MiB in 256 KiB");
        assert_eq!(download(download_base, &object), bytes);
        let info = store
            .object(BUCKET, &object)
            .expect("object read")
            .expect("object there");
        assert_eq!(
            info.metadata.get(SHA256_METADATA),
            Some(&sha256_file(&file).expect("hash"))
        );
        assert!(
            lock(&seen)
                .iter()
                .any(|p| matches!(p, PushProgress::CreatingImage { .. }))
        );

        let created = compute
            .get_image(name)
            .expect("read image")
            .expect("image there");
        assert_eq!(
            created.raw_disk.and_then(|r| r.source),
            Some(source.clone())
        );
        assert_eq!(
            created
                .labels
                .get("clusterctl_dio_sdigest8")
                .map(String::as_str),
            Some("01234567")
        );
        assert_eq!(
            created
                .labels
                .get("clusterctl_dio_sversion")
                .map(String::as_str),
            Some("bookworm-20261202-eaaa25c3621b")
        );
        assert_eq!(created.family.as_deref(), Some("clusterctl-bookworm"));
        let features: Vec<_> = created
            .guest_os_features
            .iter()
            .map(|f| f.kind.as_str())
            .collect();
        assert_eq!(features, GUEST_OS_FEATURES);

        // Again: nothing to do, nothing sent.
        proxy.reset();
        let (seen, mut report) = collect();
        let out = push_image(&compute, &store, BUCKET, &file, &v1, None, &mut report)
            .expect("second push");
        assert_eq!(out, PushOutcome::AlreadyPushed { image: name.into() });
        assert_eq!(lock(&proxy.state).chunks_seen, 0);
        assert_eq!(
            *lock(&seen),
            vec![PushProgress::ImageExists { image: name.into() }]
        );
        let inserts = fake
            .requests()
            .iter()
            .filter(|r| r.method_id == "compute.images.insert")
            .count();
        assert_eq!(inserts, 1);

        // Another build under the same version: refused, the image left alone.
        let other = image("bookworm-20261202-eaaa25c3621b", "sha256:fedcba9876543210");
        let err = push_image(&compute, &store, BUCKET, &file, &other, None, &mut |_| {})
            .expect_err("refused");
        let msg = err.to_string();
        assert!(matches!(err, PushError::Conflict { .. }), "{msg}");
        assert!(
            msg.contains(&format!("gcloud compute images delete {name}")),
            "{msg}"
        );
        assert!(
            !fake
                .requests()
                .iter()
                .any(|r| r.method_id == "compute.images.delete")
        );
        assert_eq!(fake.schema_violations(), Vec::<String>::new());
    }

    #[test]
    fn push_against_the_protocol_server() {
        let server = ProtoServer::start();
        let proxy = Proxy::start();
        lock(&proxy.state).upstream = Some(server.addr);
        let direct = format!("http://{}", server.addr);
        push_scenario(&proxy.url(), &proxy, &direct);
    }

    #[test]
    fn push_against_fake_gcs_server() {
        let Some(bin) = crate::gce::fake_gcs::binary() else {
            eprintln!(
                "skipped: fake-gcs-server not found (set CLUSTERCTL_FAKE_GCS to its binary, or put it on PATH)"
            );
            return;
        };
        let proxy = Proxy::start();
        let gcs = crate::gce::fake_gcs::start(&bin, &proxy.url(), BUCKET);
        let up: SocketAddr = gcs
            .url
            .trim_start_matches("http://")
            .parse()
            .expect("address");
        lock(&proxy.state).upstream = Some(up);
        push_scenario(&proxy.url(), &proxy, &gcs.url);

        // The object holds these bytes: a second upload is skipped without a session.
        let dir = tempfile::tempdir().expect("tempdir");
        let file = archive(dir.path(), 23);
        proxy.reset();
        let object = "clusterctl-bookworm-20261202-eaaa25c3621b-01234567.tar.gz";
        let out = storage(&proxy.url(), 4)
            .upload_file(BUCKET, object, &file, &mut |_| {})
            .expect("skip");
        assert_eq!(out, UploadOutcome::AlreadyUploaded);
        assert_eq!(lock(&proxy.state).chunks_seen, 0);
    }

    #[test]
    fn range_headers_and_state_paths() {
        assert_eq!(persisted(None), Some(0));
        assert_eq!(persisted(Some("bytes=0-262143")), Some(262_144));
        assert_eq!(persisted(Some("nonsense")), None);
        assert_eq!(
            state_path(Path::new("/i/v1/gce-disk.tar.gz")),
            PathBuf::from("/i/v1/gce-disk.tar.gz.upload.json")
        );
        let s = Storage::new(
            "http://127.0.0.1:1/",
            TokenSource::new(Credentials::Static("t".into())),
            Duration::from_secs(1),
        )
        .expect("client");
        assert_eq!(s.chunk(), DEFAULT_CHUNK_SIZE);
        let mut s = s;
        s.chunk_size = CHUNK_QUANTUM + 5;
        assert_eq!(s.chunk(), CHUNK_QUANTUM);
        s.chunk_size = 1;
        assert_eq!(s.chunk(), CHUNK_QUANTUM);
    }
}
