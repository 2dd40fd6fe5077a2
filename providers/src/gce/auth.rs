//! OAuth 2.0 access tokens for the Compute API.
//!
//! Sources, as Google's client libraries take them:
//! - a service-account key file (`"type": "service_account"`): a JWT signed with the key (RS256)
//!   is exchanged at the key's `token_uri` (RFC 7523 grant);
//! - application default credentials: the file `GOOGLE_APPLICATION_CREDENTIALS` names, else
//!   gcloud's `~/.config/gcloud/application_default_credentials.json` (a service-account key or
//!   an `authorized_user` refresh token), else the metadata server of the GCE machine we run on
//!   (`GCE_METADATA_HOST` overrides its address);
//! - a fixed token (tests, or a token a wrapper already has).
//!
//! Tokens are cached until a minute before they expire; a 401 from the API drops the cache.
//! Nothing here logs or displays a token or a key: the `Debug` impls print only where a
//! credential came from.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use serde::Deserialize;

/// OAuth scope clusterctl asks for to manage Compute Engine resources.
pub const COMPUTE_SCOPE: &str = "https://www.googleapis.com/auth/compute";
/// OAuth scope for reading and writing Cloud Storage objects (`image push` uploads).
pub const STORAGE_SCOPE: &str = "https://www.googleapis.com/auth/devstorage.read_write";
/// Google's token endpoint (the default `token_uri`).
pub const GOOGLE_TOKEN_URI: &str = "https://oauth2.googleapis.com/token";
const METADATA_HOST: &str = "metadata.google.internal";

/// Why no token could be had.
#[derive(Debug, Clone, thiserror::Error)]
pub enum AuthError {
    /// The credentials file is missing, unreadable or not a credential clusterctl knows.
    #[error("credentials {path}: {detail}")]
    File {
        /// The file.
        path: String,
        /// What is wrong with it.
        detail: String,
    },
    /// No credentials were found anywhere.
    #[error(
        "no Google credentials found: set provider.gce.credentials to a service account key file, or GOOGLE_APPLICATION_CREDENTIALS, or run `gcloud auth application-default login`"
    )]
    NotFound,
    /// The token endpoint refused (a revoked key, a wrong clock, a disabled account).
    #[error("token endpoint {endpoint} refused the credentials: {detail}")]
    Refused {
        /// The endpoint.
        endpoint: String,
        /// What it said.
        detail: String,
    },
    /// The token endpoint could not be reached or answered nonsense: worth another try.
    #[error("token endpoint {endpoint} failed: {detail}")]
    Transient {
        /// The endpoint.
        endpoint: String,
        /// What happened.
        detail: String,
    },
}

/// A service-account key (the JSON file the console downloads).
#[derive(Clone, Deserialize)]
pub struct ServiceAccountKey {
    /// The account's e-mail address (the JWT's issuer).
    pub client_email: String,
    /// PKCS#8 PEM private key.
    pub private_key: String,
    /// Key ID (the JWT header's `kid`).
    #[serde(default)]
    pub private_key_id: Option<String>,
    /// Token endpoint.
    #[serde(default = "default_token_uri")]
    pub token_uri: String,
}

/// gcloud's user credential (`gcloud auth application-default login`).
#[derive(Clone, Deserialize)]
pub struct AuthorizedUser {
    /// OAuth client ID.
    pub client_id: String,
    /// OAuth client secret.
    pub client_secret: String,
    /// Refresh token.
    pub refresh_token: String,
    /// Token endpoint.
    #[serde(default = "default_token_uri")]
    pub token_uri: String,
}

fn default_token_uri() -> String {
    GOOGLE_TOKEN_URI.to_owned()
}

/// Where tokens come from.
#[derive(Clone)]
pub enum Credentials {
    /// A service-account key.
    ServiceAccount(ServiceAccountKey),
    /// A user's refresh token.
    AuthorizedUser(AuthorizedUser),
    /// The metadata server at this base URL (`http://metadata.google.internal/`).
    MetadataServer(String),
    /// A fixed token.
    Static(String),
}

impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Credentials::ServiceAccount(k) => write!(f, "service account {}", k.client_email),
            Credentials::AuthorizedUser(u) => {
                write!(f, "user credential of client {}", u.client_id)
            }
            Credentials::MetadataServer(u) => write!(f, "metadata server {u}"),
            Credentials::Static(_) => f.write_str("fixed token"),
        }
    }
}

#[derive(Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum CredentialFile {
    ServiceAccount(ServiceAccountKey),
    AuthorizedUser(AuthorizedUser),
}

impl Credentials {
    /// Reads a credentials file (a service-account key or an authorized-user file).
    pub fn from_file(path: &Path) -> Result<Self, AuthError> {
        let err = |detail: String| AuthError::File {
            path: path.display().to_string(),
            detail,
        };
        let text = std::fs::read_to_string(path).map_err(|e| err(e.to_string()))?;
        match serde_json::from_str::<CredentialFile>(&text) {
            Ok(CredentialFile::ServiceAccount(k)) => {
                pkcs8_der(&k.private_key).map_err(err)?;
                Ok(Credentials::ServiceAccount(k))
            }
            Ok(CredentialFile::AuthorizedUser(u)) => Ok(Credentials::AuthorizedUser(u)),
            Err(e) => Err(err(format!(
                "not a service account key or authorized-user file ({e}); download a JSON key for a service account"
            ))),
        }
    }

    /// Application default credentials, looked up as Google's libraries do.
    pub fn application_default() -> Result<Self, AuthError> {
        if let Some(p) = std::env::var_os("GOOGLE_APPLICATION_CREDENTIALS") {
            return Credentials::from_file(Path::new(&p));
        }
        if let Some(home) = std::env::var_os("HOME") {
            let p = PathBuf::from(home).join(".config/gcloud/application_default_credentials.json");
            if p.exists() {
                return Credentials::from_file(&p);
            }
        }
        match std::env::var("GCE_METADATA_HOST") {
            Ok(host) if !host.is_empty() => {
                Ok(Credentials::MetadataServer(format!("http://{host}/")))
            }
            _ if on_gce() => Ok(Credentials::MetadataServer(format!(
                "http://{METADATA_HOST}/"
            ))),
            _ => Err(AuthError::NotFound),
        }
    }
}

/// Whether this machine is a GCE VM (its DMI product name says so; no network probe).
fn on_gce() -> bool {
    std::fs::read_to_string("/sys/class/dmi/id/product_name")
        .is_ok_and(|s| s.trim() == "Google Compute Engine")
}

/// The DER bytes of a PKCS#8 PEM private key.
fn pkcs8_der(pem: &str) -> Result<Vec<u8>, String> {
    let body: String = pem
        .lines()
        .map(str::trim)
        .skip_while(|l| *l != "-----BEGIN PRIVATE KEY-----")
        .skip(1)
        .take_while(|l| *l != "-----END PRIVATE KEY-----")
        .collect();
    if body.is_empty() {
        return Err("private_key is not a PKCS#8 PEM key (BEGIN PRIVATE KEY)".into());
    }
    base64::engine::general_purpose::STANDARD
        .decode(body)
        .map_err(|e| format!("private_key is not valid base64: {e}"))
}

fn b64url(bytes: &[u8]) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

/// Percent-encodes a form or query value (RFC 3986 unreserved characters kept).
pub fn urlencode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// The signed JWT assertion of a service account (RFC 7523) for `scopes` (sent space-separated,
/// as the `scope` claim wants them), valid for an hour from `now`.
pub fn jwt_assertion(
    key: &ServiceAccountKey,
    scopes: &[&str],
    now: SystemTime,
) -> Result<String, String> {
    if scopes.is_empty() {
        return Err("no OAuth scope to ask for".to_owned());
    }
    let scope = scopes.join(" ");
    use aws_lc_rs::{rand::SystemRandom, signature};
    let der = pkcs8_der(&key.private_key)?;
    let pair = signature::RsaKeyPair::from_pkcs8(&der)
        .map_err(|e| format!("private_key is not an RSA key: {e}"))?;
    let iat = now
        .duration_since(UNIX_EPOCH)
        .map_err(|_| "the clock is before 1970".to_owned())?
        .as_secs();
    let mut header = serde_json::json!({"alg": "RS256", "typ": "JWT"});
    if let Some(kid) = &key.private_key_id {
        header["kid"] = kid.clone().into();
    }
    let claims = serde_json::json!({
        "iss": key.client_email,
        "scope": scope,
        "aud": key.token_uri,
        "iat": iat,
        "exp": iat + 3600,
    });
    let signing_input = format!(
        "{}.{}",
        b64url(header.to_string().as_bytes()),
        b64url(claims.to_string().as_bytes())
    );
    let mut sig = vec![0; pair.public_modulus_len()];
    pair.sign(
        &signature::RSA_PKCS1_SHA256,
        &SystemRandom::new(),
        signing_input.as_bytes(),
        &mut sig,
    )
    .map_err(|_| "signing the token request failed".to_owned())?;
    Ok(format!("{signing_input}.{}", b64url(&sig)))
}

#[derive(Deserialize)]
struct TokenResponse {
    access_token: String,
    #[serde(default)]
    expires_in: Option<u64>,
}

/// Access tokens from [`Credentials`], cached until shortly before they expire.
pub struct TokenSource {
    credentials: Credentials,
    /// OAuth scopes a service-account token asks for.
    scopes: Vec<&'static str>,
    cached: Mutex<Option<(String, Instant)>>,
}

impl fmt::Debug for TokenSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "TokenSource({:?})", self.credentials)
    }
}

impl TokenSource {
    /// A token source over `credentials` for the Compute API ([`COMPUTE_SCOPE`]).
    pub fn new(credentials: Credentials) -> Self {
        TokenSource::with_scopes(credentials, &[COMPUTE_SCOPE])
    }

    /// A token source over `credentials` whose service-account tokens carry every one of
    /// `scopes` (e.g. [`COMPUTE_SCOPE`] and [`STORAGE_SCOPE`] for `image push`). User and
    /// metadata-server tokens carry the scopes they were granted; fixed tokens, their own.
    pub fn with_scopes(credentials: Credentials, scopes: &[&'static str]) -> Self {
        TokenSource {
            credentials,
            scopes: scopes.to_vec(),
            cached: Mutex::new(None),
        }
    }

    /// Drops the cached token (after the API answered 401).
    pub fn invalidate(&self) {
        *self.cached.lock().unwrap_or_else(|p| p.into_inner()) = None;
    }

    /// A valid access token: the cached one, or a new one.
    pub fn token(&self, http: &reqwest::blocking::Client) -> Result<String, AuthError> {
        let mut cached = self.cached.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((t, until)) = cached.as_ref()
            && Instant::now() < *until
        {
            return Ok(t.clone());
        }
        let (token, lifetime) = self.fetch(http)?;
        // Refresh a minute early (or at half-life for short tokens) so no call carries a token
        // that expires on its way.
        let margin = Duration::from_secs(60).min(lifetime / 2);
        *cached = Some((token.clone(), Instant::now() + lifetime - margin));
        Ok(token)
    }

    fn fetch(&self, http: &reqwest::blocking::Client) -> Result<(String, Duration), AuthError> {
        let (endpoint, request) = match &self.credentials {
            Credentials::Static(t) => return Ok((t.clone(), Duration::from_secs(3600))),
            Credentials::ServiceAccount(k) => {
                let assertion =
                    jwt_assertion(k, &self.scopes, SystemTime::now()).map_err(|detail| {
                        AuthError::File {
                            path: format!("service account {}", k.client_email),
                            detail,
                        }
                    })?;
                let body = format!(
                    "grant_type={}&assertion={}",
                    urlencode("urn:ietf:params:oauth:grant-type:jwt-bearer"),
                    urlencode(&assertion)
                );
                (
                    k.token_uri.clone(),
                    http.post(&k.token_uri)
                        .body(body)
                        .header("Content-Type", "application/x-www-form-urlencoded"),
                )
            }
            Credentials::AuthorizedUser(u) => {
                let body = format!(
                    "grant_type=refresh_token&client_id={}&client_secret={}&refresh_token={}",
                    urlencode(&u.client_id),
                    urlencode(&u.client_secret),
                    urlencode(&u.refresh_token)
                );
                (
                    u.token_uri.clone(),
                    http.post(&u.token_uri)
                        .body(body)
                        .header("Content-Type", "application/x-www-form-urlencoded"),
                )
            }
            Credentials::MetadataServer(base) => {
                let url =
                    format!("{base}computeMetadata/v1/instance/service-accounts/default/token");
                (
                    url.clone(),
                    http.get(&url).header("Metadata-Flavor", "Google"),
                )
            }
        };
        let transient = |detail: String| AuthError::Transient {
            endpoint: endpoint.clone(),
            detail,
        };
        let response = request.send().map_err(|e| transient(e.to_string()))?;
        let status = response.status();
        let text = response.text().map_err(|e| transient(e.to_string()))?;
        if status.is_server_error() || status.as_u16() == 429 {
            return Err(transient(format!("HTTP {status}")));
        }
        if !status.is_success() {
            // OAuth errors are {"error": "...", "error_description": "..."}; say only those.
            let detail = serde_json::from_str::<serde_json::Value>(&text)
                .ok()
                .map(|v| {
                    format!(
                        "{} {}",
                        v["error"].as_str().unwrap_or(""),
                        v["error_description"].as_str().unwrap_or("")
                    )
                })
                .unwrap_or_default();
            return Err(AuthError::Refused {
                endpoint: endpoint.clone(),
                detail: format!("HTTP {status}: {}", detail.trim()),
            });
        }
        let parsed: TokenResponse = serde_json::from_str(&text)
            .map_err(|e| transient(format!("unreadable answer: {e}")))?;
        let lifetime = Duration::from_secs(parsed.expires_in.unwrap_or(3600).clamp(1, 86_400));
        Ok((parsed.access_token, lifetime))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credential_files_are_read_and_bad_ones_named() {
        let dir = tempfile::tempdir().expect("tempdir");
        let user = dir.path().join("adc.json");
        std::fs::write(
            &user,
            r#"{"type":"authorized_user","client_id":"c","client_secret":"s","refresh_token":"r"}"#,
        )
        .expect("write");
        match Credentials::from_file(&user).expect("user file") {
            Credentials::AuthorizedUser(u) => assert_eq!(u.token_uri, GOOGLE_TOKEN_URI),
            other => panic!("{other:?}"),
        }
        let bad = dir.path().join("bad.json");
        std::fs::write(
            &bad,
            r#"{"type":"service_account","client_email":"a@b","private_key":"nope"}"#,
        )
        .expect("write");
        let e = Credentials::from_file(&bad).expect_err("no PEM key");
        assert!(e.to_string().contains("PKCS#8"), "{e}");
        let e = Credentials::from_file(&dir.path().join("missing.json")).expect_err("missing");
        assert!(e.to_string().contains("missing.json"), "{e}");
    }

    #[test]
    fn urlencode_keeps_unreserved_only() {
        assert_eq!(urlencode("labels.a = \"b\""), "labels.a%20%3D%20%22b%22");
        assert_eq!(urlencode("a-b_c.d~e"), "a-b_c.d~e");
    }
}
