//! Host key verification: keys pinned per cluster and OpenSSH known_hosts files.
//!
//! The rules follow OpenSSH: a host is looked up as `host` when it listens on port 22 and as
//! `[host]:port` otherwise; known_hosts lines may list several comma-separated patterns with `*`
//! and `?` wildcards and `!` negation, or be hashed (`|1|salt|hash`, HMAC-SHA1). A key that
//! matches an `@revoked` line is refused; `@cert-authority` lines are ignored (host certificates
//! are not used). A host with no key on record is refused (never trusted on first use); a host
//! whose recorded keys do not include the offered one is refused as changed.

use std::collections::BTreeSet;
use std::io;
use std::path::PathBuf;

use hmac::{KeyInit, Mac};
use russh::keys::ssh_encoding::base64::{Base64, Encoding};
use russh::keys::{Algorithm, PublicKey};

use super::keys::{fingerprint, parse_public_key, short_algorithm_name};
use super::{Endpoint, SshError};

/// The set of host keys clusterctl trusts: keys pinned per endpoint (for machines clusterctl
/// created and whose host keys it generated) plus OpenSSH known_hosts files (for existing hosts).
///
/// known_hosts files are read at each verification, so edits take effect without a restart;
/// a missing file counts as empty.
#[derive(Debug, Clone, Default)]
pub struct KnownHosts {
    pinned: Vec<(Endpoint, PublicKey)>,
    files: Vec<PathBuf>,
}

/// Where a trusted key came from, for error messages.
#[derive(Debug, Clone)]
enum Origin {
    Pinned,
    File { path: PathBuf, line: usize },
}

struct Candidate {
    key: PublicKey,
    origin: Origin,
}

impl KnownHosts {
    /// An empty set: every host is unknown until keys are pinned or files added.
    pub fn new() -> Self {
        Self::default()
    }

    /// Trusts `key` as a host key of `endpoint` (same host string and port).
    pub fn pin(&mut self, endpoint: Endpoint, key: PublicKey) -> &mut Self {
        let mut key = key;
        key.set_comment("");
        self.pinned.push((endpoint, key));
        self
    }

    /// Trusts the key in an OpenSSH public key line (`ssh-ed25519 AAAA... [comment]`).
    pub fn pin_line(&mut self, endpoint: Endpoint, line: &str) -> Result<&mut Self, SshError> {
        let key = parse_public_key(line)?;
        Ok(self.pin(endpoint, key))
    }

    /// Also consults an OpenSSH known_hosts file.
    pub fn add_file(&mut self, path: impl Into<PathBuf>) -> &mut Self {
        self.files.push(path.into());
        self
    }

    /// The user's `~/.ssh/known_hosts`, if a home directory is known.
    pub fn user_file() -> Option<PathBuf> {
        std::env::home_dir().map(|home| home.join(".ssh").join("known_hosts"))
    }

    /// The pinned keys.
    pub fn pinned(&self) -> impl Iterator<Item = (&Endpoint, &PublicKey)> {
        self.pinned.iter().map(|(e, k)| (e, k))
    }

    /// The known_hosts files consulted.
    pub fn files(&self) -> &[PathBuf] {
        &self.files
    }

    /// A known_hosts line for `key` at `endpoint` (`[host]:port ALGORITHM BASE64`, or `host ...`
    /// for port 22), to write into a known_hosts file.
    pub fn known_hosts_line(endpoint: &Endpoint, key: &PublicKey) -> String {
        format!(
            "{} {}",
            lookup_name(endpoint),
            super::keys::public_key_line(key)
        )
    }

    /// Algorithms of the keys on record for `endpoint`, so that the handshake can ask the server
    /// for a key we can verify (as OpenSSH does) rather than one of another type.
    pub(crate) fn known_algorithms(&self, endpoint: &Endpoint) -> Vec<Algorithm> {
        let mut seen = BTreeSet::new();
        let mut out = Vec::new();
        if let Ok((candidates, _)) = self.candidates(endpoint) {
            for c in candidates {
                let algorithm = c.key.algorithm();
                if seen.insert(algorithm.as_str().to_string()) {
                    out.push(algorithm);
                }
            }
        }
        out
    }

    /// Checks the key a server offered. `Ok(())` only if a pinned key or a known_hosts entry for
    /// this endpoint equals it and no `@revoked` line names it.
    pub fn verify(&self, endpoint: &Endpoint, offered: &PublicKey) -> Result<(), SshError> {
        let (candidates, revoked) = self.candidates(endpoint)?;
        let offered_fp = fingerprint(offered);
        if let Some(path) = revoked
            .iter()
            .find(|(key, _)| key.key_data() == offered.key_data())
            .map(|(_, path)| path.clone())
        {
            return Err(SshError::HostKeyRevoked {
                endpoint: endpoint.clone(),
                fingerprint: offered_fp,
                file: path,
            });
        }
        if candidates
            .iter()
            .any(|c| c.key.key_data() == offered.key_data())
        {
            return Ok(());
        }
        let algorithm = offered.algorithm();
        if candidates.is_empty() {
            return Err(SshError::UnknownHostKey {
                endpoint: endpoint.clone(),
                algorithm: algorithm.as_str().to_string(),
                algorithm_short: short_algorithm_name(&algorithm).to_string(),
                fingerprint: offered_fp,
            });
        }
        let expected = candidates
            .iter()
            .map(|c| {
                let origin = match &c.origin {
                    Origin::Pinned => "pinned".to_string(),
                    Origin::File { path, line } => format!("{}:{line}", path.display()),
                };
                format!(
                    "{} {} ({origin})",
                    c.key.algorithm().as_str(),
                    fingerprint(&c.key)
                )
            })
            .collect::<Vec<_>>()
            .join(", ");
        Err(SshError::HostKeyChanged {
            endpoint: endpoint.clone(),
            algorithm: algorithm.as_str().to_string(),
            fingerprint: offered_fp,
            expected,
        })
    }

    /// All trusted keys for the endpoint and all revoked keys (with the file naming them).
    #[allow(clippy::type_complexity)]
    fn candidates(
        &self,
        endpoint: &Endpoint,
    ) -> Result<(Vec<Candidate>, Vec<(PublicKey, PathBuf)>), SshError> {
        let mut trusted: Vec<Candidate> = self
            .pinned
            .iter()
            .filter(|(e, _)| e.host.eq_ignore_ascii_case(&endpoint.host) && e.port == endpoint.port)
            .map(|(_, key)| Candidate {
                key: key.clone(),
                origin: Origin::Pinned,
            })
            .collect();
        let mut revoked = Vec::new();
        let name = lookup_name(endpoint);
        for path in &self.files {
            let text = match std::fs::read_to_string(path) {
                Ok(text) => text,
                Err(err) if err.kind() == io::ErrorKind::NotFound => continue,
                Err(source) => {
                    return Err(SshError::KnownHostsFile {
                        path: path.clone(),
                        source,
                    });
                }
            };
            for entry in parse_known_hosts(&text, &name) {
                match entry.marker {
                    Marker::None => trusted.push(Candidate {
                        key: entry.key,
                        origin: Origin::File {
                            path: path.clone(),
                            line: entry.line,
                        },
                    }),
                    Marker::Revoked => revoked.push((entry.key, path.clone())),
                    Marker::CertAuthority => {}
                }
            }
        }
        Ok((trusted, revoked))
    }
}

/// The name a host is recorded under in known_hosts: `host` on port 22, `[host]:port` otherwise.
fn lookup_name(endpoint: &Endpoint) -> String {
    let host = endpoint.host.to_ascii_lowercase();
    if endpoint.port == 22 {
        host
    } else {
        format!("[{host}]:{}", endpoint.port)
    }
}

#[derive(Debug, PartialEq, Eq)]
enum Marker {
    None,
    Revoked,
    CertAuthority,
}

struct KnownHostEntry {
    line: usize,
    marker: Marker,
    key: PublicKey,
}

/// The entries of a known_hosts text whose host patterns match `name`. Malformed lines are
/// skipped, as OpenSSH does.
fn parse_known_hosts(text: &str, name: &str) -> Vec<KnownHostEntry> {
    let mut out = Vec::new();
    for (index, raw) in text.lines().enumerate() {
        let line = raw.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let mut fields = line.split_whitespace();
        let Some(mut first) = fields.next() else {
            continue;
        };
        let marker = match first {
            "@revoked" => Marker::Revoked,
            "@cert-authority" => Marker::CertAuthority,
            _ => Marker::None,
        };
        if marker != Marker::None {
            let Some(next) = fields.next() else {
                continue;
            };
            first = next;
        }
        let patterns = first;
        let (Some(algorithm), Some(blob)) = (fields.next(), fields.next()) else {
            continue;
        };
        if !hosts_match(patterns, name) {
            continue;
        }
        let Ok(key) = parse_public_key(&format!("{algorithm} {blob}")) else {
            tracing::warn!(
                line = index + 1,
                "skipping known_hosts line with an unparsable key"
            );
            continue;
        };
        out.push(KnownHostEntry {
            line: index + 1,
            marker,
            key,
        });
    }
    out
}

/// Whether a known_hosts host field matches `name` (already in `host` or `[host]:port` form).
fn hosts_match(patterns: &str, name: &str) -> bool {
    if let Some(hashed) = patterns.strip_prefix("|1|") {
        return hashed_match(hashed, name);
    }
    let mut matched = false;
    for pattern in patterns.split(',') {
        let (negated, pattern) = match pattern.strip_prefix('!') {
            Some(rest) => (true, rest),
            None => (false, pattern),
        };
        if glob_match(&pattern.to_ascii_lowercase(), name) {
            if negated {
                return false;
            }
            matched = true;
        }
    }
    matched
}

fn hashed_match(hashed: &str, name: &str) -> bool {
    let Some((salt, hash)) = hashed.split_once('|') else {
        return false;
    };
    let (Ok(salt), Ok(hash)) = (Base64::decode_vec(salt), Base64::decode_vec(hash)) else {
        return false;
    };
    let Ok(mut mac) = hmac::Hmac::<sha1::Sha1>::new_from_slice(&salt) else {
        return false;
    };
    mac.update(name.as_bytes());
    mac.verify_slice(&hash).is_ok()
}

/// OpenSSH-style wildcard match: `*` any run of characters, `?` exactly one.
fn glob_match(pattern: &str, text: &str) -> bool {
    let p: Vec<char> = pattern.chars().collect();
    let t: Vec<char> = text.chars().collect();
    let (mut pi, mut ti) = (0usize, 0usize);
    let (mut star, mut star_ti) = (None::<usize>, 0usize);
    while ti < t.len() {
        if pi < p.len() && (p[pi] == '?' || p[pi] == t[ti]) {
            pi += 1;
            ti += 1;
        } else if pi < p.len() && p[pi] == '*' {
            star = Some(pi);
            star_ti = ti;
            pi += 1;
        } else if let Some(s) = star {
            pi = s + 1;
            star_ti += 1;
            ti = star_ti;
        } else {
            return false;
        }
    }
    while pi < p.len() && p[pi] == '*' {
        pi += 1;
    }
    pi == p.len()
}

#[cfg(test)]
mod tests {
    use super::*;

    const ED: &str =
        "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIJdD7y3aLq454yWBdwLWbieU1ebz9/cu7/QEXn9OIeZJ";

    fn ep(host: &str, port: u16) -> Endpoint {
        Endpoint::new(host, port)
    }

    fn key() -> PublicKey {
        parse_public_key(ED).expect("test key parses")
    }

    #[test]
    fn glob_matches_like_openssh() {
        assert!(glob_match("*.example.org", "a.example.org"));
        assert!(!glob_match("*.example.org", "example.org"));
        assert!(glob_match("10.0.0.?", "10.0.0.7"));
        assert!(!glob_match("10.0.0.?", "10.0.0.17"));
        assert!(glob_match("[127.0.0.1]:2222", "[127.0.0.1]:2222"));
    }

    #[test]
    fn negation_overrides_a_match() {
        assert!(hosts_match("*.lan,!bad.lan", "good.lan"));
        assert!(!hosts_match("*.lan,!bad.lan", "bad.lan"));
    }

    #[test]
    fn plain_port_and_hashed_entries() {
        // Hashed entry for "[127.0.0.1]:2222" made with `ssh-keygen -H`-compatible HMAC-SHA1.
        let salt = b"0123456789abcdefghij";
        let mut mac = hmac::Hmac::<sha1::Sha1>::new_from_slice(salt).expect("hmac key");
        mac.update(b"[127.0.0.1]:2222");
        let hash = mac.finalize().into_bytes();
        let hashed = format!(
            "|1|{}|{} {ED}\n",
            Base64::encode_string(salt),
            Base64::encode_string(&hash)
        );
        let text = format!("# comment\nhost.lan {ED}\n{hashed}@revoked other {ED}\n");
        assert_eq!(parse_known_hosts(&text, "host.lan").len(), 1);
        assert_eq!(parse_known_hosts(&text, "[127.0.0.1]:2222").len(), 1);
        assert_eq!(parse_known_hosts(&text, "127.0.0.1").len(), 0);
        let revoked = parse_known_hosts(&text, "other");
        assert_eq!(revoked.len(), 1);
        assert_eq!(revoked[0].marker, Marker::Revoked);
    }

    #[test]
    fn pinned_keys_verify_by_host_and_port() {
        let mut kh = KnownHosts::new();
        kh.pin(ep("10.0.0.5", 22), key());
        assert!(kh.verify(&ep("10.0.0.5", 22), &key()).is_ok());
        let err = kh
            .verify(&ep("10.0.0.5", 2222), &key())
            .expect_err("other port is unknown");
        assert!(matches!(err, SshError::UnknownHostKey { .. }), "{err}");
        let other = crate::ssh::keys::generate_host_key().expect("keygen");
        let err = kh
            .verify(&ep("10.0.0.5", 22), other.public_key())
            .expect_err("changed key");
        let msg = err.to_string();
        assert!(msg.contains("10.0.0.5:22"), "{msg}");
        assert!(msg.contains(&other.fingerprint()), "{msg}");
        assert!(msg.contains("man-in-the-middle"), "{msg}");
    }

    #[test]
    fn known_hosts_line_roundtrips() {
        let line = KnownHosts::known_hosts_line(&ep("127.0.0.1", 2200), &key());
        assert!(line.starts_with("[127.0.0.1]:2200 ssh-ed25519 "), "{line}");
        assert_eq!(parse_known_hosts(&line, "[127.0.0.1]:2200").len(), 1);
    }
}
