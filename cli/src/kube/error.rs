//! The API client's errors and the one policy that says, for each, whether to retry, wait or
//! stop.

use std::path::PathBuf;
use std::time::Duration;

use super::tunnel::{TunnelError, TunnelFailure};

/// What a caller should do after an error (the single error policy of the API client).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Disposition {
    /// Try again soon: the API server is starting, restarting or briefly overloaded
    /// (connection refused, connection reset, 5xx, request timeout).
    Retry,
    /// The server asked to come back later (429 Too Many Requests; for an eviction: a
    /// PodDisruptionBudget allows no disruption now). Wait longer, then try again.
    Wait,
    /// Trying again cannot help (credentials refused, certificate mismatch, bad request).
    Fail,
}

/// Errors of the Kubernetes API client.
#[derive(Debug, thiserror::Error)]
pub enum KubeError {
    /// The admin credential could not be read from the cluster's state.
    #[error("cannot read the admin credential {}", path.display())]
    CredentialFile {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },

    /// The admin credential is unusable.
    #[error("unusable admin credential {}: {detail}", path.display())]
    BadCredential {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        detail: String,
    },

    /// No connection to the API server could be made (SSH, tunnel or TLS).
    #[error("cannot connect to the API server while {op}")]
    Connect {
        /// What was being done, e.g. `reading /version`.
        op: String,
        /// Why (its kind decides the disposition).
        #[source]
        source: TunnelError,
    },

    /// The API server answered with an error status.
    #[error("{op}: the API server answered {code} {reason}: {message}{hint}", hint = hint(*code))]
    Api {
        /// What was being done.
        op: String,
        /// HTTP status code.
        code: u16,
        /// The status reason, e.g. `Forbidden`, `TooManyRequests`.
        reason: String,
        /// The status message.
        message: String,
        /// What the server asked for with 429 (`Retry-After` / `retryAfterSeconds`), if anything.
        retry_after: Option<Duration>,
    },

    /// The request failed on an established connection (broken mid-request, bad response).
    #[error("{op} failed")]
    Request {
        /// What was being done.
        op: String,
        /// The client's error.
        #[source]
        source: Box<kube::Error>,
    },

    /// The server's answer could not be understood.
    #[error("{op}: unexpected answer from the API server: {detail}")]
    Unexpected {
        /// What was being done.
        op: String,
        /// What was wrong with it.
        detail: String,
    },

    /// The server runs a Kubernetes version clusterctl cannot talk to.
    #[error(
        "the API server runs Kubernetes {version}, which clusterctl does not support: {detail}"
    )]
    UnsupportedVersion {
        /// The version as reported.
        version: String,
        /// Why it is not supported.
        detail: String,
    },

    /// A wait ran out of time.
    #[error("{what} not reached after {} s; {state}", waited.as_secs())]
    Timeout {
        /// What was awaited, e.g. `nodes Ready`.
        what: String,
        /// How long it was awaited.
        waited: Duration,
        /// The last observation or error.
        state: String,
    },
}

fn hint(code: u16) -> &'static str {
    match code {
        401 => {
            "; the API server does not accept the admin client certificate from the cluster's \
             state (signed by another CA, or expired): compare the state's pki/ca.crt with the \
             control plane's, or re-run `clusterctl create` to renew certificates"
        }
        403 => {
            "; the admin certificate is accepted but not authorized (it must be in the \
             system:masters group): check the state's pki/admin.crt"
        }
        _ => "",
    }
}

impl KubeError {
    /// What to do after this error: see [`Disposition`].
    pub fn disposition(&self) -> Disposition {
        match self {
            KubeError::Connect { source, .. } => {
                if source.kind.is_transient() {
                    Disposition::Retry
                } else {
                    Disposition::Fail
                }
            }
            KubeError::Api { code, .. } => disposition_of_status(*code),
            KubeError::Request { source, .. } => match **source {
                // Broken connections and timeouts on the way; the API server restarting.
                kube::Error::HyperError(_) | kube::Error::Service(_) => Disposition::Retry,
                kube::Error::ReadEvents(_) => Disposition::Retry,
                _ => Disposition::Fail,
            },
            KubeError::CredentialFile { .. }
            | KubeError::BadCredential { .. }
            | KubeError::Unexpected { .. }
            | KubeError::UnsupportedVersion { .. }
            | KubeError::Timeout { .. } => Disposition::Fail,
        }
    }

    /// The HTTP status code, if the API server answered with an error status.
    pub fn status_code(&self) -> Option<u16> {
        match self {
            KubeError::Api { code, .. } => Some(*code),
            _ => None,
        }
    }

    /// The kind of connection failure, if no connection could be made.
    pub fn connect_failure(&self) -> Option<TunnelFailure> {
        match self {
            KubeError::Connect { source, .. } => Some(source.kind),
            _ => None,
        }
    }

    /// Converts a kube-rs error met while doing `op`: API statuses become [`KubeError::Api`],
    /// failures of our SSH/TLS transport (found in the error's source chain) become
    /// [`KubeError::Connect`].
    pub(crate) fn from_kube(op: &str, error: kube::Error) -> KubeError {
        if let kube::Error::Api(status) = &error {
            let retry_after = status
                .details
                .as_ref()
                .map(|d| d.retry_after_seconds)
                .filter(|s| *s > 0)
                .map(|s| Duration::from_secs(u64::from(s)));
            // kube-rs makes a Status from a plain-text error body with this reason.
            let reason = if status.reason == "Failed to parse error data" {
                http::StatusCode::from_u16(status.code)
                    .ok()
                    .and_then(|c| c.canonical_reason())
                    .unwrap_or_default()
                    .to_owned()
            } else {
                status.reason.clone()
            };
            return KubeError::Api {
                op: op.to_owned(),
                code: status.code,
                reason,
                message: summarize(&status.message),
                retry_after,
            };
        }
        if let Some(tunnel) = find_tunnel_error(&error) {
            return KubeError::Connect {
                op: op.to_owned(),
                source: tunnel,
            };
        }
        KubeError::Request {
            op: op.to_owned(),
            source: Box::new(error),
        }
    }
}

/// A message in one line: a health check's report (`[+]ping ok` ... `[-]etcd failed` ...
/// `readyz check failed`) becomes its failed checks; anything else is cut at 300 characters.
fn summarize(message: &str) -> String {
    let message = message.trim();
    let failed: Vec<&str> = message
        .lines()
        .filter_map(|l| l.strip_prefix("[-]"))
        .map(|l| l.split_whitespace().next().unwrap_or_default())
        .collect();
    if !failed.is_empty() {
        return format!("checks failing: {}", failed.join(", "));
    }
    let line = message.lines().collect::<Vec<_>>().join(" ");
    if line.chars().count() > 300 {
        format!("{}...", line.chars().take(300).collect::<String>())
    } else {
        line
    }
}

/// The disposition of an HTTP error status.
pub fn disposition_of_status(code: u16) -> Disposition {
    match code {
        429 => Disposition::Wait,
        // Request timeout, and every server-side error: the API server (or etcd behind it) is
        // starting, restarting, or overloaded. 501 is the one 5xx that cannot mend itself.
        408 => Disposition::Retry,
        501 => Disposition::Fail,
        500..=599 => Disposition::Retry,
        _ => Disposition::Fail,
    }
}

fn find_tunnel_error(error: &kube::Error) -> Option<TunnelError> {
    let mut current: Option<&(dyn std::error::Error + 'static)> = Some(error);
    while let Some(e) = current {
        if let Some(t) = e.downcast_ref::<TunnelError>() {
            return Some(t.clone());
        }
        current = e.source();
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn health_reports_shrink_to_their_failed_checks() {
        let report = "[+]ping ok\n[+]etcd ok\n[-]informer-sync failed: reason withheld\n\
                      [-]poststarthook/rbac/bootstrap-roles failed: reason withheld\nreadyz check failed\n";
        assert_eq!(
            summarize(report),
            "checks failing: informer-sync, poststarthook/rbac/bootstrap-roles"
        );
        assert_eq!(summarize(" forbidden\n"), "forbidden");
        assert_eq!(summarize(&"x".repeat(400)).len(), 303);
    }
}
