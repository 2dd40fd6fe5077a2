//! SSH keys: loading client keys, generating host and client key pairs, fingerprints.
//!
//! Private key material never reaches a log: [`ClientKey`] and [`GeneratedKey`] print only the
//! algorithm and the public fingerprint in their `Debug` output, and the OpenSSH text of a
//! generated private key is wiped from memory when it is dropped.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use russh::keys::ssh_key::LineEnding;
use russh::keys::{Algorithm, EcdsaCurve, HashAlg, PrivateKey, PublicKey};
use zeroize::Zeroizing;

use super::SshError;

/// The `SHA256:...` fingerprint of a public key, as `ssh-keygen -l` prints it.
pub fn fingerprint(key: &PublicKey) -> String {
    key.fingerprint(HashAlg::Sha256).to_string()
}

/// Parses a public key from an OpenSSH line (`ssh-ed25519 AAAA... comment`) or a bare base64 blob.
pub fn parse_public_key(line: &str) -> Result<PublicKey, SshError> {
    let trimmed = line.trim();
    let invalid = |source| SshError::InvalidPublicKey {
        input: trimmed.chars().take(120).collect(),
        source: Box::new(source),
    };
    let mut fields = trimmed.split_whitespace();
    let first = fields.next().unwrap_or_default();
    // `ALGORITHM BASE64 [COMMENT]` or just `BASE64`.
    let blob = if first.starts_with("AAAA") {
        first
    } else {
        fields.next().unwrap_or_default()
    };
    let mut key = russh::keys::parse_public_key_base64(blob).map_err(invalid)?;
    key.set_comment("");
    Ok(key)
}

/// The OpenSSH one-line form of a public key, `ALGORITHM BASE64`, without comment.
pub fn public_key_line(key: &PublicKey) -> String {
    let mut key = key.clone();
    key.set_comment("");
    // Encoding a valid in-memory key cannot fail; fall back to the fingerprint rather than panic.
    key.to_openssh().unwrap_or_else(|_| fingerprint(&key))
}

/// The short algorithm name OpenSSH uses in host key file names (`ed25519`, `ecdsa`, `rsa`).
pub(crate) fn short_algorithm_name(algorithm: &Algorithm) -> &'static str {
    match algorithm {
        Algorithm::Ed25519 => "ed25519",
        Algorithm::Ecdsa { .. } => "ecdsa",
        Algorithm::Rsa { .. } => "rsa",
        Algorithm::Dsa => "dsa",
        _ => "*",
    }
}

/// A private key used to authenticate to servers, loaded and checked once.
///
/// Cheap to clone (the key is shared). Its `Debug` shows only the algorithm and fingerprint.
#[derive(Clone)]
pub struct ClientKey {
    key: Arc<PrivateKey>,
    source: PathBuf,
}

impl ClientKey {
    /// Loads an unencrypted private key (ed25519, ecdsa, rsa; OpenSSH or PEM format) from a file.
    ///
    /// A passphrase-protected key gives [`SshError::EncryptedKey`], which tells the user to load
    /// it into ssh-agent instead.
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self, SshError> {
        let path = path.as_ref();
        let text =
            Zeroizing::new(
                std::fs::read_to_string(path).map_err(|source| SshError::KeyFile {
                    path: path.to_path_buf(),
                    source,
                })?,
            );
        Self::parse(&text, path.to_path_buf())
    }

    /// Parses an unencrypted private key from its text (OpenSSH or PEM format).
    pub fn from_openssh(text: &str) -> Result<Self, SshError> {
        Self::parse(text, PathBuf::from("<memory>"))
    }

    fn parse(text: &str, source: PathBuf) -> Result<Self, SshError> {
        match russh::keys::decode_secret_key(text, None) {
            Ok(key) => Ok(ClientKey {
                key: Arc::new(key),
                source,
            }),
            Err(russh::keys::Error::KeyIsEncrypted) => Err(SshError::EncryptedKey { path: source }),
            // Encrypted PKCS#8 and legacy PEM keys fail deeper in the decoder; recognise them by
            // their headers so the user gets the passphrase advice, not a parse error.
            Err(_) if looks_encrypted(text) => Err(SshError::EncryptedKey { path: source }),
            Err(err) => Err(SshError::KeyParse {
                path: source,
                source: Box::new(err),
            }),
        }
    }

    /// The public half.
    pub fn public_key(&self) -> &PublicKey {
        self.key.public_key()
    }

    /// The key's `SHA256:...` fingerprint.
    pub fn fingerprint(&self) -> String {
        fingerprint(self.public_key())
    }

    /// Where the key came from (a file path or `<memory>`).
    pub fn source(&self) -> &Path {
        &self.source
    }

    pub(crate) fn private_key(&self) -> Arc<PrivateKey> {
        self.key.clone()
    }
}

fn looks_encrypted(text: &str) -> bool {
    text.contains("BEGIN ENCRYPTED PRIVATE KEY") || text.contains("Proc-Type: 4,ENCRYPTED")
}

impl fmt::Debug for ClientKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClientKey")
            .field("algorithm", &self.key.algorithm().as_str())
            .field("fingerprint", &self.fingerprint())
            .field("source", &self.source)
            .finish_non_exhaustive()
    }
}

/// Algorithms for generated keys.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum KeyAlgorithm {
    /// Ed25519: small, fast, the default.
    #[default]
    Ed25519,
    /// ECDSA on NIST P-256.
    EcdsaP256,
    /// RSA with a 4096-bit modulus (takes seconds to generate; for old servers only).
    Rsa4096,
}

impl KeyAlgorithm {
    fn to_ssh(self) -> Algorithm {
        match self {
            KeyAlgorithm::Ed25519 => Algorithm::Ed25519,
            KeyAlgorithm::EcdsaP256 => Algorithm::Ecdsa {
                curve: EcdsaCurve::NistP256,
            },
            KeyAlgorithm::Rsa4096 => Algorithm::Rsa { hash: None },
        }
    }
}

/// A freshly generated key pair: the private key in OpenSSH format plus its public half.
///
/// For a machine clusterctl creates, the provider writes [`GeneratedKey::private_key_openssh`]
/// to the machine's `/etc/ssh/ssh_host_*_key` at provisioning (cloud-init or similar) and the
/// cluster pins [`GeneratedKey::public_key`] before the first connection, so the first contact
/// is already verified. `Debug` never shows the private key.
pub struct GeneratedKey {
    private_openssh: Zeroizing<String>,
    public: PublicKey,
    algorithm: KeyAlgorithm,
}

impl GeneratedKey {
    /// The private key in OpenSSH format (`-----BEGIN OPENSSH PRIVATE KEY-----`), unencrypted.
    /// Write it with mode 0600; never log it.
    pub fn private_key_openssh(&self) -> &str {
        &self.private_openssh
    }

    /// The public key.
    pub fn public_key(&self) -> &PublicKey {
        &self.public
    }

    /// The public key as one OpenSSH line (`ssh-ed25519 AAAA... COMMENT`), suitable for
    /// `authorized_keys`, `ssh_host_*_key.pub` and (prefixed with the host) known_hosts.
    pub fn public_key_line(&self) -> String {
        self.public
            .to_openssh()
            .unwrap_or_else(|_| public_key_line(&self.public))
    }

    /// The `SHA256:...` fingerprint of the public key.
    pub fn fingerprint(&self) -> String {
        fingerprint(&self.public)
    }

    /// The algorithm.
    pub fn algorithm(&self) -> KeyAlgorithm {
        self.algorithm
    }

    /// The file name OpenSSH uses for a host key of this algorithm, e.g. `ssh_host_ed25519_key`.
    pub fn host_key_file_name(&self) -> &'static str {
        match self.algorithm {
            KeyAlgorithm::Ed25519 => "ssh_host_ed25519_key",
            KeyAlgorithm::EcdsaP256 => "ssh_host_ecdsa_key",
            KeyAlgorithm::Rsa4096 => "ssh_host_rsa_key",
        }
    }

    /// Uses the private half as a client key (for a generated client key pair).
    pub fn to_client_key(&self) -> Result<ClientKey, SshError> {
        ClientKey::from_openssh(&self.private_openssh)
    }
}

impl fmt::Debug for GeneratedKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GeneratedKey")
            .field("algorithm", &self.algorithm)
            .field("fingerprint", &self.fingerprint())
            .finish_non_exhaustive()
    }
}

/// Generates an ed25519 host key for a machine clusterctl creates.
pub fn generate_host_key() -> Result<GeneratedKey, SshError> {
    generate_key(KeyAlgorithm::Ed25519, "clusterctl host key")
}

/// Generates an ed25519 client key pair (for example the cluster's admin key).
pub fn generate_client_key(comment: &str) -> Result<GeneratedKey, SshError> {
    generate_key(KeyAlgorithm::Ed25519, comment)
}

/// Generates a key pair of the given algorithm with the given comment.
pub fn generate_key(algorithm: KeyAlgorithm, comment: &str) -> Result<GeneratedKey, SshError> {
    let ssh_algorithm = algorithm.to_ssh();
    let fail = |source| SshError::KeyGeneration {
        algorithm: ssh_algorithm.as_str().to_string(),
        source: Box::new(source),
    };
    // rand's thread-local CSPRNG, seeded from the operating system.
    let mut rng = rand::rng();
    let mut key = PrivateKey::random(&mut rng, ssh_algorithm.clone()).map_err(fail)?;
    key.set_comment(comment);
    let private_openssh = key.to_openssh(LineEnding::LF).map_err(fail)?;
    Ok(GeneratedKey {
        private_openssh,
        public: key.public_key().clone(),
        algorithm,
    })
}
