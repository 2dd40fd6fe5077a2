//! The Compute API calls the provider makes ([`Compute`]) and their REST implementation
//! ([`RestCompute`]).
//!
//! Behaviour every call shares:
//! - every insert and every other mutating call carries a `requestId` (a UUID made once per
//!   logical call and kept across its retries), so a retry after a lost answer acts once;
//! - 429, 403 `rateLimitExceeded`/`userRateLimitExceeded`, 5xx, timeouts, dropped connections
//!   and unreadable answers are retried with exponential backoff and full jitter, never sooner
//!   than a `Retry-After` asks, at most [`RetryPolicy::max_attempts`] times and never past the
//!   call's deadline;
//! - a 401 drops the cached token and is tried once more with a new one;
//! - operations are waited for (`operations.wait`, which the server holds for a while) under a
//!   deadline of our own ([`RestCompute::operation_timeout`]); an operation stuck past it is an
//!   error that says which operation to look at.

use std::time::{Duration, Instant};

use serde::Serialize;
use serde::de::DeserializeOwned;

use super::api::{
    AttachedDisk, Disk, Firewall, GuestAttributes, Image, Instance, List, Metadata, Operation,
    Route,
};
use super::auth::{AuthError, TokenSource, urlencode};

/// What a Compute API call failed with.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ApiError {
    /// The API answered with an error status (after retries, for retryable ones).
    #[error("HTTP {status} {reason}: {message}")]
    Http {
        /// HTTP status.
        status: u16,
        /// Google's reason (`notFound`, `alreadyExists`, `rateLimitExceeded`, ...).
        reason: String,
        /// Google's message.
        message: String,
    },
    /// An operation finished with errors.
    #[error("operation {operation} failed: {code}: {message}")]
    Operation {
        /// Operation name.
        operation: String,
        /// First error code (`QUOTA_EXCEEDED`, `RESOURCE_NOT_FOUND`, ...).
        code: String,
        /// Its message.
        message: String,
    },
    /// No answer in time, the connection failed, or the answer was unreadable (after retries).
    #[error("{0}")]
    Transport(String),
    /// An operation did not finish before our deadline.
    #[error(
        "operation {operation} still {status} after {waited:?}; look at it with `gcloud compute operations describe {operation}`"
    )]
    OperationTimeout {
        /// Operation name.
        operation: String,
        /// Its last status.
        status: String,
        /// How long we waited.
        waited: Duration,
    },
    /// No token.
    #[error(transparent)]
    Auth(#[from] AuthError),
}

impl ApiError {
    /// Whether this is a 404.
    pub fn is_not_found(&self) -> bool {
        matches!(self, ApiError::Http { status: 404, .. })
    }

    /// Whether this is a 409 `alreadyExists`.
    pub fn is_already_exists(&self) -> bool {
        matches!(self, ApiError::Http { status: 409, .. })
    }
}

/// The Compute API's public endpoint.
pub const DEFAULT_ENDPOINT: &str = "https://compute.googleapis.com/";

/// Retry bounds of [`RestCompute`].
#[derive(Debug, Clone)]
pub struct RetryPolicy {
    /// Attempts per call, the first included.
    pub max_attempts: u32,
    /// First backoff; doubled per attempt (with full jitter).
    pub base: Duration,
    /// Longest backoff.
    pub max_backoff: Duration,
    /// Longest `Retry-After` honoured (a longer one ends the retries).
    pub max_retry_after: Duration,
    /// Time limit of one call, retries included.
    pub call_deadline: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            max_attempts: 6,
            base: Duration::from_secs(1),
            max_backoff: Duration::from_secs(32),
            max_retry_after: Duration::from_secs(120),
            call_deadline: Duration::from_secs(300),
        }
    }
}

/// The backoff before attempt `attempt + 1` (0-based `attempt` that just failed): full jitter
/// over `base * 2^attempt` capped at `max_backoff`, never less than `retry_after`.
pub fn backoff(
    policy: &RetryPolicy,
    attempt: u32,
    retry_after: Option<Duration>,
    unit: f64,
) -> Duration {
    let cap = policy
        .base
        .saturating_mul(1u32.checked_shl(attempt.min(20)).unwrap_or(u32::MAX))
        .min(policy.max_backoff);
    let jittered = cap.mul_f64(unit.clamp(0.0, 1.0));
    jittered.max(retry_after.unwrap_or_default())
}

/// Whether an error answer is worth another try.
fn retryable(status: u16, reason: &str) -> bool {
    matches!(status, 429 | 500 | 502 | 503 | 504)
        || (status == 403 && matches!(reason, "rateLimitExceeded" | "userRateLimitExceeded"))
}

/// A new request ID: a random UUID (version 4), as the API asks.
pub fn request_id() -> String {
    let mut b: [u8; 16] = rand::random();
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let h = |r: std::ops::Range<usize>| b[r].iter().map(|x| format!("{x:02x}")).collect::<String>();
    format!(
        "{}-{}-{}-{}-{}",
        h(0..4),
        h(4..6),
        h(6..8),
        h(8..10),
        h(10..16)
    )
}

/// The Compute API calls the provider makes. A call that mutates returns the operation; the
/// caller waits for it with [`Compute::wait`]. `get_*` answers `None` for a 404.
pub trait Compute: Send + Sync {
    /// The project.
    fn project(&self) -> &str;
    /// Waits for an operation to finish; an operation that finished with errors is an error.
    fn wait(&self, op: Operation) -> Result<Operation, ApiError>;

    /// `instances.insert`.
    fn insert_instance(&self, zone: &str, instance: &Instance) -> Result<Operation, ApiError>;
    /// `instances.get`.
    fn get_instance(&self, zone: &str, name: &str) -> Result<Option<Instance>, ApiError>;
    /// `instances.list` with a filter, every page.
    fn list_instances(&self, zone: &str, filter: &str) -> Result<Vec<Instance>, ApiError>;
    /// `instances.delete`.
    fn delete_instance(&self, zone: &str, name: &str) -> Result<Operation, ApiError>;
    /// `instances.start`.
    fn start_instance(&self, zone: &str, name: &str) -> Result<Operation, ApiError>;
    /// `instances.stop`.
    fn stop_instance(&self, zone: &str, name: &str) -> Result<Operation, ApiError>;
    /// `instances.reset`.
    fn reset_instance(&self, zone: &str, name: &str) -> Result<Operation, ApiError>;
    /// `instances.setMachineType` (the instance must be stopped); `machine_type` as
    /// `zones/Z/machineTypes/T`.
    fn set_machine_type(
        &self,
        zone: &str,
        name: &str,
        machine_type: &str,
    ) -> Result<Operation, ApiError>;
    /// `instances.setMetadata` (with the fingerprint read last).
    fn set_metadata(
        &self,
        zone: &str,
        name: &str,
        metadata: &Metadata,
    ) -> Result<Operation, ApiError>;
    /// `instances.attachDisk`.
    fn attach_disk(
        &self,
        zone: &str,
        name: &str,
        disk: &AttachedDisk,
    ) -> Result<Operation, ApiError>;
    /// `instances.detachDisk`.
    fn detach_disk(&self, zone: &str, name: &str, device_name: &str)
    -> Result<Operation, ApiError>;
    /// `instances.getGuestAttributes`.
    fn guest_attributes(
        &self,
        zone: &str,
        name: &str,
        query_path: &str,
    ) -> Result<Option<GuestAttributes>, ApiError>;

    /// `disks.insert` (the image to fill it from, if any, in `disk.source_image`).
    fn insert_disk(&self, zone: &str, disk: &Disk) -> Result<Operation, ApiError>;
    /// `disks.get`.
    fn get_disk(&self, zone: &str, name: &str) -> Result<Option<Disk>, ApiError>;
    /// `disks.list` with a filter, every page.
    fn list_disks(&self, zone: &str, filter: &str) -> Result<Vec<Disk>, ApiError>;
    /// `disks.delete`.
    fn delete_disk(&self, zone: &str, name: &str) -> Result<Operation, ApiError>;

    /// `images.get`.
    fn get_image(&self, name: &str) -> Result<Option<Image>, ApiError>;
    /// `images.insert`.
    fn insert_image(&self, image: &Image) -> Result<Operation, ApiError>;
    /// `images.delete`.
    fn delete_image(&self, name: &str) -> Result<Operation, ApiError>;

    /// `firewalls.insert`.
    fn insert_firewall(&self, firewall: &Firewall) -> Result<Operation, ApiError>;
    /// `firewalls.list` with a filter, every page.
    fn list_firewalls(&self, filter: &str) -> Result<Vec<Firewall>, ApiError>;
    /// `firewalls.delete`.
    fn delete_firewall(&self, name: &str) -> Result<Operation, ApiError>;
    /// `routes.list` with a filter, every page.
    fn list_routes(&self, filter: &str) -> Result<Vec<Route>, ApiError>;
    /// `routes.delete`.
    fn delete_route(&self, name: &str) -> Result<Operation, ApiError>;
}

/// The Compute API over HTTPS (or a fake's HTTP on loopback).
pub struct RestCompute {
    http: reqwest::blocking::Client,
    /// `https://compute.googleapis.com/compute/v1/projects/P/` (or the fake's).
    project_url: String,
    project: String,
    tokens: TokenSource,
    /// Retry bounds.
    pub retry: RetryPolicy,
    /// How long an operation may take.
    pub operation_timeout: Duration,
    /// How long the server may hold one `operations.wait` call.
    pub wait_call_timeout: Duration,
}

impl std::fmt::Debug for RestCompute {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RestCompute")
            .field("project_url", &self.project_url)
            .field("tokens", &self.tokens)
            .finish_non_exhaustive()
    }
}

enum Verb {
    Get,
    Post,
    Delete,
}

impl RestCompute {
    /// A client of `endpoint` (`https://compute.googleapis.com/`, or a fake's base URL) for
    /// `project`, each HTTP exchange limited to `request_timeout`.
    pub fn new(
        endpoint: &str,
        project: &str,
        tokens: TokenSource,
        request_timeout: Duration,
    ) -> Result<Self, ApiError> {
        let http = reqwest::blocking::Client::builder()
            .timeout(request_timeout)
            .connect_timeout(Duration::from_secs(10).min(request_timeout))
            .user_agent(concat!("clusterctl/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| ApiError::Transport(format!("cannot build the HTTP client: {e}")))?;
        let endpoint = endpoint.trim_end_matches('/');
        Ok(RestCompute {
            http,
            project_url: format!("{endpoint}/compute/v1/projects/{project}/"),
            project: project.to_owned(),
            tokens,
            retry: RetryPolicy::default(),
            operation_timeout: Duration::from_secs(600),
            wait_call_timeout: Duration::from_secs(150),
        })
    }

    /// One logical call: retried as the module says. `path` is relative to the project URL.
    fn call<T: DeserializeOwned>(
        &self,
        verb: Verb,
        path: &str,
        query: &[(&str, &str)],
        body: Option<String>,
        timeout: Option<Duration>,
    ) -> Result<T, ApiError> {
        let mut url = format!("{}{path}", self.project_url);
        for (i, (k, v)) in query.iter().enumerate() {
            url.push(if i == 0 { '?' } else { '&' });
            url.push_str(k);
            url.push('=');
            url.push_str(&urlencode(v));
        }
        let started = Instant::now();
        let mut reauthed = false;
        let mut attempt = 0u32;
        loop {
            let token = self.tokens.token(&self.http)?;
            let mut req = match verb {
                Verb::Get => self.http.get(&url),
                Verb::Post => self.http.post(&url),
                Verb::Delete => self.http.delete(&url),
            }
            .bearer_auth(token);
            if let Some(t) = timeout {
                req = req.timeout(t);
            }
            if let Some(b) = &body {
                req = req
                    .header("Content-Type", "application/json")
                    .body(b.clone());
            }
            let outcome = req.send().and_then(|r| {
                let status = r.status().as_u16();
                let retry_after = r
                    .headers()
                    .get("retry-after")
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.trim().parse::<u64>().ok())
                    .map(Duration::from_secs);
                r.text().map(|text| (status, retry_after, text))
            });
            let (err, retry_after) = match outcome {
                Err(e) => (ApiError::Transport(transport_detail(&url, &e)), None),
                Ok((status, retry_after, text)) if (200..300).contains(&status) => {
                    match serde_json::from_str::<T>(&text) {
                        Ok(v) => return Ok(v),
                        Err(e) => (
                            ApiError::Transport(format!("unreadable answer from {url}: {e}")),
                            retry_after,
                        ),
                    }
                }
                Ok((status, retry_after, text)) => {
                    let (reason, message) = error_fields(&text);
                    if status == 401 && !reauthed {
                        reauthed = true;
                        self.tokens.invalidate();
                        continue;
                    }
                    let err = ApiError::Http {
                        status,
                        reason: reason.clone(),
                        message,
                    };
                    if !retryable(status, &reason) {
                        return Err(err);
                    }
                    (err, retry_after)
                }
            };
            attempt += 1;
            if attempt >= self.retry.max_attempts
                || retry_after.is_some_and(|d| d > self.retry.max_retry_after)
            {
                return Err(err);
            }
            let pause = backoff(&self.retry, attempt - 1, retry_after, rand::random::<f64>());
            if started.elapsed() + pause > self.retry.call_deadline {
                return Err(err);
            }
            tracing::debug!(%url, attempt, ?pause, error = %err, "retrying compute call");
            std::thread::sleep(pause);
        }
    }

    fn get<T: DeserializeOwned>(
        &self,
        path: &str,
        query: &[(&str, &str)],
    ) -> Result<Option<T>, ApiError> {
        match self.call(Verb::Get, path, query, None, None) {
            Ok(v) => Ok(Some(v)),
            Err(e) if e.is_not_found() => Ok(None),
            Err(e) => Err(e),
        }
    }

    fn list<T: DeserializeOwned>(&self, path: &str, filter: &str) -> Result<Vec<T>, ApiError> {
        let mut items = Vec::new();
        let mut token: Option<String> = None;
        for _ in 0..10_000 {
            let mut query = vec![("maxResults", "500")];
            if !filter.is_empty() {
                query.push(("filter", filter));
            }
            if let Some(t) = &token {
                query.push(("pageToken", t));
            }
            let page: List<T> = self.call(Verb::Get, path, &query, None, None)?;
            items.extend(page.items);
            match page.next_page_token {
                Some(t) if !t.is_empty() => token = Some(t),
                _ => return Ok(items),
            }
        }
        Err(ApiError::Transport(format!(
            "{path}: more than 10000 pages"
        )))
    }

    /// A mutating call with a request ID (one per logical call, kept across its retries).
    fn mutate(
        &self,
        verb: Verb,
        path: &str,
        extra: &[(&str, &str)],
        body: Option<String>,
    ) -> Result<Operation, ApiError> {
        let rid = request_id();
        let mut query = extra.to_vec();
        query.push(("requestId", &rid));
        self.call(verb, path, &query, body, None)
    }

    fn insert<B: Serialize>(
        &self,
        path: &str,
        extra: &[(&str, &str)],
        body: &B,
    ) -> Result<Operation, ApiError> {
        let body = serde_json::to_string(body)
            .map_err(|e| ApiError::Transport(format!("cannot encode the request: {e}")))?;
        self.mutate(Verb::Post, path, extra, Some(body))
    }
}

/// What went wrong in an HTTP exchange about `context` (a URL, an operation), with reqwest's causes.
pub(super) fn transport_detail(context: &str, e: &reqwest::Error) -> String {
    let what = if e.is_timeout() {
        "no answer in time"
    } else if e.is_connect() {
        "cannot connect"
    } else {
        "the exchange failed"
    };
    let mut detail = format!("{context}: {what}");
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        detail.push_str(&format!(": {s}"));
        source = s.source();
    }
    detail
}

/// Google's error body: the first error's reason, and the message.
pub(super) fn error_fields(text: &str) -> (String, String) {
    let v: serde_json::Value = serde_json::from_str(text).unwrap_or_default();
    let e = &v["error"];
    let reason = e["errors"][0]["reason"]
        .as_str()
        .or_else(|| e["status"].as_str())
        .unwrap_or("unknown")
        .to_owned();
    let message = e["message"]
        .as_str()
        .map(str::to_owned)
        .unwrap_or_else(|| text.chars().take(200).collect());
    (reason, message)
}

/// The last path segment of a URL (`.../zones/us-east1-b` -> `us-east1-b`).
pub fn last_segment(url: &str) -> &str {
    url.rsplit('/').next().unwrap_or(url)
}

impl Compute for RestCompute {
    fn project(&self) -> &str {
        &self.project
    }

    fn wait(&self, mut op: Operation) -> Result<Operation, ApiError> {
        let started = Instant::now();
        while !op.is_done() {
            if started.elapsed() > self.operation_timeout {
                return Err(ApiError::OperationTimeout {
                    operation: op.name,
                    status: op.status,
                    waited: started.elapsed(),
                });
            }
            let path = match &op.zone {
                Some(z) => format!("zones/{}/operations/{}/wait", last_segment(z), op.name),
                None => format!("global/operations/{}/wait", op.name),
            };
            let next: Operation =
                self.call(Verb::Post, &path, &[], None, Some(self.wait_call_timeout))?;
            op = next;
        }
        match op.error.as_ref().and_then(|e| e.errors.first()) {
            Some(e) => Err(ApiError::Operation {
                operation: op.name.clone(),
                code: e.code.clone(),
                message: e.message.clone(),
            }),
            None => Ok(op),
        }
    }

    fn insert_instance(&self, zone: &str, instance: &Instance) -> Result<Operation, ApiError> {
        self.insert(&format!("zones/{zone}/instances"), &[], instance)
    }

    fn get_instance(&self, zone: &str, name: &str) -> Result<Option<Instance>, ApiError> {
        self.get(&format!("zones/{zone}/instances/{name}"), &[])
    }

    fn list_instances(&self, zone: &str, filter: &str) -> Result<Vec<Instance>, ApiError> {
        self.list(&format!("zones/{zone}/instances"), filter)
    }

    fn delete_instance(&self, zone: &str, name: &str) -> Result<Operation, ApiError> {
        self.mutate(
            Verb::Delete,
            &format!("zones/{zone}/instances/{name}"),
            &[],
            None,
        )
    }

    fn start_instance(&self, zone: &str, name: &str) -> Result<Operation, ApiError> {
        self.mutate(
            Verb::Post,
            &format!("zones/{zone}/instances/{name}/start"),
            &[],
            None,
        )
    }

    fn stop_instance(&self, zone: &str, name: &str) -> Result<Operation, ApiError> {
        self.mutate(
            Verb::Post,
            &format!("zones/{zone}/instances/{name}/stop"),
            &[],
            None,
        )
    }

    fn reset_instance(&self, zone: &str, name: &str) -> Result<Operation, ApiError> {
        self.mutate(
            Verb::Post,
            &format!("zones/{zone}/instances/{name}/reset"),
            &[],
            None,
        )
    }

    fn set_machine_type(
        &self,
        zone: &str,
        name: &str,
        machine_type: &str,
    ) -> Result<Operation, ApiError> {
        self.insert(
            &format!("zones/{zone}/instances/{name}/setMachineType"),
            &[],
            &serde_json::json!({ "machineType": machine_type }),
        )
    }

    fn set_metadata(
        &self,
        zone: &str,
        name: &str,
        metadata: &Metadata,
    ) -> Result<Operation, ApiError> {
        self.insert(
            &format!("zones/{zone}/instances/{name}/setMetadata"),
            &[],
            metadata,
        )
    }

    fn attach_disk(
        &self,
        zone: &str,
        name: &str,
        disk: &AttachedDisk,
    ) -> Result<Operation, ApiError> {
        self.insert(
            &format!("zones/{zone}/instances/{name}/attachDisk"),
            &[],
            disk,
        )
    }

    fn detach_disk(
        &self,
        zone: &str,
        name: &str,
        device_name: &str,
    ) -> Result<Operation, ApiError> {
        self.mutate(
            Verb::Post,
            &format!("zones/{zone}/instances/{name}/detachDisk"),
            &[("deviceName", device_name)],
            None,
        )
    }

    fn guest_attributes(
        &self,
        zone: &str,
        name: &str,
        query_path: &str,
    ) -> Result<Option<GuestAttributes>, ApiError> {
        self.get(
            &format!("zones/{zone}/instances/{name}/getGuestAttributes"),
            &[("queryPath", query_path)],
        )
    }

    fn insert_disk(&self, zone: &str, disk: &Disk) -> Result<Operation, ApiError> {
        self.insert(&format!("zones/{zone}/disks"), &[], disk)
    }

    fn get_disk(&self, zone: &str, name: &str) -> Result<Option<Disk>, ApiError> {
        self.get(&format!("zones/{zone}/disks/{name}"), &[])
    }

    fn list_disks(&self, zone: &str, filter: &str) -> Result<Vec<Disk>, ApiError> {
        self.list(&format!("zones/{zone}/disks"), filter)
    }

    fn delete_disk(&self, zone: &str, name: &str) -> Result<Operation, ApiError> {
        self.mutate(
            Verb::Delete,
            &format!("zones/{zone}/disks/{name}"),
            &[],
            None,
        )
    }

    fn get_image(&self, name: &str) -> Result<Option<Image>, ApiError> {
        self.get(&format!("global/images/{name}"), &[])
    }

    fn insert_image(&self, image: &Image) -> Result<Operation, ApiError> {
        self.insert("global/images", &[], image)
    }

    fn delete_image(&self, name: &str) -> Result<Operation, ApiError> {
        self.mutate(Verb::Delete, &format!("global/images/{name}"), &[], None)
    }

    fn insert_firewall(&self, firewall: &Firewall) -> Result<Operation, ApiError> {
        self.insert("global/firewalls", &[], firewall)
    }

    fn list_firewalls(&self, filter: &str) -> Result<Vec<Firewall>, ApiError> {
        self.list("global/firewalls", filter)
    }

    fn delete_firewall(&self, name: &str) -> Result<Operation, ApiError> {
        self.mutate(Verb::Delete, &format!("global/firewalls/{name}"), &[], None)
    }

    fn list_routes(&self, filter: &str) -> Result<Vec<Route>, ApiError> {
        self.list("global/routes", filter)
    }

    fn delete_route(&self, name: &str) -> Result<Operation, ApiError> {
        self.mutate(Verb::Delete, &format!("global/routes/{name}"), &[], None)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_with_jitter_and_honours_retry_after() {
        let p = RetryPolicy::default();
        assert_eq!(backoff(&p, 0, None, 1.0), Duration::from_secs(1));
        assert_eq!(backoff(&p, 3, None, 1.0), Duration::from_secs(8));
        assert_eq!(
            backoff(&p, 30, None, 1.0),
            Duration::from_secs(32),
            "capped"
        );
        assert_eq!(
            backoff(&p, 3, None, 0.5),
            Duration::from_secs(4),
            "jittered"
        );
        assert_eq!(
            backoff(&p, 0, Some(Duration::from_secs(7)), 0.1),
            Duration::from_secs(7)
        );
    }

    #[test]
    fn request_ids_are_uuid_v4() {
        let a = request_id();
        assert_eq!(a.len(), 36);
        assert_eq!(&a[14..15], "4");
        assert_ne!(a, request_id());
    }

    #[test]
    fn only_throttling_and_server_errors_are_retried() {
        assert!(retryable(429, "rateLimitExceeded"));
        assert!(retryable(403, "rateLimitExceeded"));
        assert!(retryable(503, "backendError"));
        assert!(!retryable(403, "forbidden"));
        assert!(!retryable(403, "quotaExceeded"));
        assert!(!retryable(404, "notFound"));
        assert!(!retryable(409, "alreadyExists"));
    }
}
