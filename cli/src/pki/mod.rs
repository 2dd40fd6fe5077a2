//! The cluster's PKI, made by clusterctl (rcgen): cluster CA, etcd CA, front-proxy CA, the
//! service-account key pair and every component's certificate, in kubeadm's file layout.
//!
//! [`Pki::ensure`] generates what is missing and reuses what exists, so re-running `create` never
//! rotates a CA. A leaf certificate is re-issued (with a fresh key) only when it no longer fits:
//! wrong signer, subject, SANs or usage, a key that does not match, or less than
//! [`RENEW_BEFORE_DAYS`] days left. A CA cert without its key (or the reverse) is an error, never a
//! silent new CA: every certificate of the cluster would change.
//!
//! Files live in one directory (the cluster's state dir, or a subdirectory of it): directories
//! 0700, every file 0600, written atomically. Keys are ECDSA P-256 in PKCS#8 PEM, which etcd 3.4
//! and Kubernetes 1.20 accept. Key material is never logged: no type here prints a key in `Debug`.
//!
//! Layout (relative to the directory):
//! `ca`, `etcd/ca`, `front-proxy-ca` (`.crt` + `.key`); `sa.key`, `sa.pub`; and the leaves of
//! [`plan_certificates`], e.g. `apiserver`, `etcd/server-<node>`, `kubelet/<node>-client`.

mod files;
mod kubeconfig;
mod plan;

use std::collections::BTreeSet;
use std::io;
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, PublicKeyData, SanType,
};
use time::{Duration, OffsetDateTime};
use x509_parser::certificate::X509Certificate;
use x509_parser::extensions::GeneralName;
use x509_parser::prelude::FromDer;
use zeroize::Zeroizing;

pub use kubeconfig::{KubeconfigInput, render_kubeconfig};
pub use plan::{
    CaKind, CertSpec, NodeIdentity, PkiSpec, Usage, first_service_ip, plan_certificates,
};

/// CA certificates are valid this long (kubeadm: 10 years).
pub const CA_VALIDITY_DAYS: i64 = 3650;
/// Leaf certificates are valid this long (kubeadm: 1 year).
pub const LEAF_VALIDITY_DAYS: i64 = 365;
/// A leaf with fewer days left is re-issued by [`Pki::ensure`].
pub const RENEW_BEFORE_DAYS: i64 = 30;
/// Service-account signing key (`--service-account-signing-key-file`, controller-manager's
/// `--service-account-private-key-file`).
pub const SA_KEY: &str = "sa.key";
/// Service-account public key (`--service-account-key-file`).
pub const SA_PUB: &str = "sa.pub";

/// Errors making or reading the PKI.
#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    /// The cluster identity cannot produce valid certificates.
    #[error("cannot plan certificates: {reason}")]
    InvalidSpec {
        /// What is wrong.
        reason: String,
    },
    /// Reading or writing a PKI file failed.
    #[error("cannot access PKI file {path}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: io::Error,
    },
    /// Half of a CA or of the service-account key pair is missing.
    #[error(
        "{present} exists but {missing} is missing; restore {missing} from a backup (making a new one would \
         change every certificate of the cluster)"
    )]
    HalfPresent {
        /// The file that exists.
        present: PathBuf,
        /// The file that is missing.
        missing: PathBuf,
    },
    /// A CA or key file exists but cannot be used.
    #[error("{path} is not a usable {what}: {reason}; restore it from a backup")]
    Unusable {
        /// The file.
        path: PathBuf,
        /// What it should be (CA certificate, private key).
        what: &'static str,
        /// Why it cannot be used.
        reason: String,
    },
    /// rcgen failed to build a key or certificate.
    #[error("cannot generate {what}")]
    Generate {
        /// What was being generated.
        what: String,
        /// rcgen's error.
        #[source]
        source: rcgen::Error,
    },
}

/// What [`Pki::ensure`] did with one file pair.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Newly generated.
    Created,
    /// Existing and still valid: kept as is.
    Reused,
    /// Existing but no longer fitting: re-issued with a fresh key, for the given reason.
    Reissued(String),
}

/// One line of [`Pki::ensure`]'s report: a stem (`apiserver`, `ca`, `sa`) and what happened.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReportEntry {
    /// File stem relative to the PKI directory.
    pub stem: String,
    /// What was done.
    pub action: Action,
}

/// A loaded CA: its certificate (PEM) and an issuer holding its key. `Debug` omits the key.
struct Ca {
    cert_pem: String,
    issuer: Issuer<'static, KeyPair>,
    public_key_spki: Vec<u8>,
}

/// A cluster's PKI directory after [`Pki::ensure`]: the CAs are loaded, every file exists.
pub struct Pki {
    dir: PathBuf,
    certs: Vec<CertSpec>,
    cas: Vec<(CaKind, Ca)>,
}

impl std::fmt::Debug for Pki {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Paths and names only: keys are never formatted.
        f.debug_struct("Pki")
            .field("dir", &self.dir)
            .field(
                "certificates",
                &self.certs.iter().map(|c| &c.stem).collect::<Vec<_>>(),
            )
            .finish_non_exhaustive()
    }
}

impl Pki {
    /// Makes `dir` hold a complete PKI for `spec`: generates what is missing, keeps what fits,
    /// re-issues leaves that do not. Returns the PKI and a report of what was done, in order.
    pub fn ensure(dir: &Path, spec: &PkiSpec) -> Result<(Pki, Vec<ReportEntry>), PkiError> {
        let certs = plan_certificates(spec)?;
        files::ensure_private_dir(dir)?;
        let mut report = Vec::new();
        let mut cas = Vec::new();
        for kind in CaKind::ALL {
            let (ca, action) = ensure_ca(dir, kind)?;
            tracing::debug!(stem = kind.stem(), ?action, "certificate authority");
            report.push(ReportEntry {
                stem: kind.stem().to_string(),
                action,
            });
            cas.push((kind, ca));
        }
        let action = ensure_sa(dir)?;
        report.push(ReportEntry {
            stem: "sa".to_string(),
            action,
        });
        let now = OffsetDateTime::now_utc();
        for cert in &certs {
            let ca = &cas
                .iter()
                .find(|(k, _)| *k == cert.ca)
                .map(|(_, ca)| ca)
                .ok_or_else(|| PkiError::InvalidSpec {
                    reason: format!("no CA {:?} for {}", cert.ca, cert.stem),
                })?;
            let action = ensure_leaf(dir, cert, ca, now)?;
            tracing::debug!(stem = %cert.stem, ?action, "certificate");
            report.push(ReportEntry {
                stem: cert.stem.clone(),
                action,
            });
        }
        Ok((
            Pki {
                dir: dir.to_path_buf(),
                certs,
                cas,
            },
            report,
        ))
    }

    /// The PKI directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The leaf certificates of this PKI.
    pub fn certificates(&self) -> &[CertSpec] {
        &self.certs
    }

    /// Path of a certificate (`<stem>.crt`).
    pub fn cert_path(&self, stem: &str) -> PathBuf {
        self.dir.join(format!("{stem}.crt"))
    }

    /// Path of a private key (`<stem>.key`).
    pub fn key_path(&self, stem: &str) -> PathBuf {
        self.dir.join(format!("{stem}.key"))
    }

    /// A CA's certificate in PEM.
    pub fn ca_pem(&self, kind: CaKind) -> &str {
        self.cas
            .iter()
            .find(|(k, _)| *k == kind)
            .map(|(_, ca)| ca.cert_pem.as_str())
            .unwrap_or_default()
    }

    /// Renders a kubeconfig for the client certificate `stem` (e.g. `admin`,
    /// `controller-manager`, `kubelet/node-1-client`) talking to `server`.
    pub fn kubeconfig(&self, stem: &str, server: &str) -> Result<Zeroizing<String>, PkiError> {
        let cert = self
            .certs
            .iter()
            .find(|c| c.stem == stem && c.usage == Usage::Client && c.ca == CaKind::Cluster)
            .ok_or_else(|| PkiError::InvalidSpec {
                reason: format!("{stem} is not a cluster client certificate"),
            })?;
        let cert_pem = files::read_string(&self.cert_path(stem))?;
        let key_pem = Zeroizing::new(files::read_string(&self.key_path(stem))?);
        let cluster = self
            .dir
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        Ok(render_kubeconfig(&KubeconfigInput {
            cluster_name: &cluster,
            server,
            ca_pem: self.ca_pem(CaKind::Cluster),
            user_name: &cert.common_name,
            client_cert_pem: &cert_pem,
            client_key_pem: &key_pem,
        }))
    }
}

fn generate_key(what: &str) -> Result<KeyPair, PkiError> {
    KeyPair::generate().map_err(|source| PkiError::Generate {
        what: what.to_string(),
        source,
    })
}

fn load_key(path: &Path) -> Result<KeyPair, PkiError> {
    let pem = Zeroizing::new(files::read_string(path)?);
    KeyPair::from_pem(&pem).map_err(|e| PkiError::Unusable {
        path: path.to_path_buf(),
        what: "private key",
        reason: e.to_string(),
    })
}

/// Parses a PEM certificate and runs `f` on it; certificate errors become text.
fn with_cert<T>(
    pem: &str,
    f: impl FnOnce(&X509Certificate<'_>) -> Result<T, String>,
) -> Result<T, String> {
    let (_, block) =
        x509_parser::pem::parse_x509_pem(pem.as_bytes()).map_err(|e| format!("not PEM: {e}"))?;
    let cert = block
        .parse_x509()
        .map_err(|e| format!("not an X.509 certificate: {e}"))?;
    f(&cert)
}

fn ensure_ca(dir: &Path, kind: CaKind) -> Result<(Ca, Action), PkiError> {
    let crt = dir.join(format!("{}.crt", kind.stem()));
    let key = dir.join(format!("{}.key", kind.stem()));
    match (crt.exists(), key.exists()) {
        (true, true) => {
            let cert_pem = files::read_string(&crt)?;
            let key_pair = load_key(&key)?;
            let spki = key_pair.subject_public_key_info();
            let unusable = |reason: String| PkiError::Unusable {
                path: crt.clone(),
                what: "CA certificate",
                reason,
            };
            with_cert(&cert_pem, |c| {
                if !c.is_ca() {
                    return Err("it is not a CA certificate".to_string());
                }
                if c.public_key().raw != spki.as_slice() {
                    return Err(format!("it does not match {}", key.display()));
                }
                Ok(())
            })
            .map_err(unusable)?;
            let issuer = Issuer::from_ca_cert_pem(&cert_pem, key_pair)
                .map_err(|e| unusable(e.to_string()))?;
            files::fix_mode(&key)?;
            files::fix_mode(&crt)?;
            Ok((
                Ca {
                    cert_pem,
                    issuer,
                    public_key_spki: spki,
                },
                Action::Reused,
            ))
        }
        (false, false) => {
            let key_pair = generate_key(kind.stem())?;
            let mut params = CertificateParams::default();
            let mut dn = DistinguishedName::new();
            dn.push(DnType::CommonName, kind.common_name());
            params.distinguished_name = dn;
            params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
            params.key_usages = vec![
                KeyUsagePurpose::DigitalSignature,
                KeyUsagePurpose::KeyCertSign,
                KeyUsagePurpose::CrlSign,
            ];
            let now = OffsetDateTime::now_utc();
            params.not_before = now - Duration::minutes(5);
            params.not_after = now + Duration::days(CA_VALIDITY_DAYS);
            let cert = params
                .self_signed(&key_pair)
                .map_err(|source| PkiError::Generate {
                    what: kind.stem().to_string(),
                    source,
                })?;
            let cert_pem = cert.pem();
            let key_pem = Zeroizing::new(key_pair.serialize_pem());
            // Key first: a crash in between leaves a key without cert, which the next run reports
            // instead of silently making a second CA.
            files::write_private(&key, key_pem.as_bytes())?;
            files::write_private(&crt, cert_pem.as_bytes())?;
            let spki = key_pair.subject_public_key_info();
            Ok((
                Ca {
                    cert_pem,
                    issuer: Issuer::new(params, key_pair),
                    public_key_spki: spki,
                },
                Action::Created,
            ))
        }
        (true, false) => Err(PkiError::HalfPresent {
            present: crt,
            missing: key,
        }),
        (false, true) => Err(PkiError::HalfPresent {
            present: key,
            missing: crt,
        }),
    }
}

fn ensure_sa(dir: &Path) -> Result<Action, PkiError> {
    let key = dir.join(SA_KEY);
    let pub_path = dir.join(SA_PUB);
    if key.exists() {
        let key_pair = load_key(&key)?;
        let want = key_pair.public_key_pem();
        files::fix_mode(&key)?;
        match std::fs::read_to_string(&pub_path) {
            Ok(have) if have == want => {
                files::fix_mode(&pub_path)?;
                Ok(Action::Reused)
            }
            _ => {
                files::write_private(&pub_path, want.as_bytes())?;
                Ok(Action::Reissued(format!(
                    "{SA_PUB} did not match {SA_KEY}; rewritten from the key"
                )))
            }
        }
    } else if pub_path.exists() {
        Err(PkiError::HalfPresent {
            present: pub_path,
            missing: key,
        })
    } else {
        let key_pair = generate_key("service-account key")?;
        let key_pem = Zeroizing::new(key_pair.serialize_pem());
        files::write_private(&key, key_pem.as_bytes())?;
        files::write_private(&pub_path, key_pair.public_key_pem().as_bytes())?;
        Ok(Action::Created)
    }
}

/// Why an existing leaf no longer fits `spec`, or `None` if it can be kept.
fn leaf_mismatch(
    cert_pem: &str,
    key: &KeyPair,
    spec: &CertSpec,
    ca: &Ca,
    now: OffsetDateTime,
) -> Option<String> {
    let result = with_cert(cert_pem, |c| {
        let Ok((_, ca_spki)) =
            x509_parser::x509::SubjectPublicKeyInfo::from_der(&ca.public_key_spki)
        else {
            return Ok(Some("the CA's public key cannot be read".to_string()));
        };
        if c.verify_signature(Some(&ca_spki)).is_err() {
            return Ok(Some(format!(
                "not signed by the current {} CA",
                spec.ca.stem()
            )));
        }
        if c.public_key().raw != key.subject_public_key_info().as_slice() {
            return Ok(Some("certificate and key do not match".to_string()));
        }
        let cn: Vec<_> = c
            .subject()
            .iter_common_name()
            .filter_map(|a| a.as_str().ok())
            .collect();
        let orgs: BTreeSet<_> = c
            .subject()
            .iter_organization()
            .filter_map(|a| a.as_str().ok())
            .collect();
        let want_orgs: BTreeSet<_> = spec.organizations.iter().map(String::as_str).collect();
        if cn != [spec.common_name.as_str()] || orgs != want_orgs {
            return Ok(Some("subject changed".to_string()));
        }
        let mut dns = BTreeSet::new();
        let mut ips = BTreeSet::new();
        if let Ok(Some(san)) = c.subject_alternative_name() {
            for name in &san.value.general_names {
                match name {
                    GeneralName::DNSName(d) => {
                        dns.insert(d.to_string());
                    }
                    GeneralName::IPAddress(raw) => match raw.len() {
                        4 => {
                            ips.insert(IpAddr::from(<[u8; 4]>::try_from(*raw).unwrap_or_default()));
                        }
                        16 => {
                            ips.insert(IpAddr::from(
                                <[u8; 16]>::try_from(*raw).unwrap_or_default(),
                            ));
                        }
                        _ => return Ok(Some("malformed IP SAN".to_string())),
                    },
                    _ => return Ok(Some("unexpected SAN type".to_string())),
                }
            }
        }
        if dns != spec.dns_names.iter().cloned().collect()
            || ips != spec.ips.iter().copied().collect()
        {
            return Ok(Some("subject alternative names changed".to_string()));
        }
        let (server, client) = match c.extended_key_usage() {
            Ok(Some(eku)) => (eku.value.server_auth, eku.value.client_auth),
            _ => (false, false),
        };
        let want = match spec.usage {
            Usage::Server => (true, false),
            Usage::Client => (false, true),
            Usage::ServerAndClient => (true, true),
        };
        if (server, client) != want {
            return Ok(Some("extended key usage changed".to_string()));
        }
        let left = c.validity().not_after.timestamp() - now.unix_timestamp();
        if left < RENEW_BEFORE_DAYS * 86_400 {
            return Ok(Some(format!(
                "expires in less than {RENEW_BEFORE_DAYS} days"
            )));
        }
        Ok(None)
    });
    result.unwrap_or_else(Some)
}

fn ensure_leaf(
    dir: &Path,
    spec: &CertSpec,
    ca: &Ca,
    now: OffsetDateTime,
) -> Result<Action, PkiError> {
    let crt = dir.join(format!("{}.crt", spec.stem));
    let key = dir.join(format!("{}.key", spec.stem));
    let reason = match (crt.exists(), key.exists()) {
        (true, true) => {
            let cert_pem = files::read_string(&crt)?;
            let mismatch = match load_key(&key) {
                Ok(key_pair) => leaf_mismatch(&cert_pem, &key_pair, spec, ca, now),
                Err(_) => Some("the key cannot be read".to_string()),
            };
            match mismatch {
                None => {
                    files::fix_mode(&key)?;
                    files::fix_mode(&crt)?;
                    return Ok(Action::Reused);
                }
                Some(reason) => Some(reason),
            }
        }
        (false, false) => None,
        _ => Some("only one of certificate and key existed".to_string()),
    };
    issue_leaf(spec, ca, now, &crt, &key)?;
    Ok(match reason {
        None => Action::Created,
        Some(reason) => Action::Reissued(reason),
    })
}

fn issue_leaf(
    spec: &CertSpec,
    ca: &Ca,
    now: OffsetDateTime,
    crt: &Path,
    key: &Path,
) -> Result<(), PkiError> {
    let gen_err = |source| PkiError::Generate {
        what: spec.stem.clone(),
        source,
    };
    let key_pair = generate_key(&spec.stem)?;
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    for org in &spec.organizations {
        dn.push(DnType::OrganizationName, org.as_str());
    }
    dn.push(DnType::CommonName, spec.common_name.as_str());
    params.distinguished_name = dn;
    for name in &spec.dns_names {
        params
            .subject_alt_names
            .push(SanType::DnsName(name.as_str().try_into().map_err(gen_err)?));
    }
    for ip in &spec.ips {
        params.subject_alt_names.push(SanType::IpAddress(*ip));
    }
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyEncipherment,
    ];
    params.extended_key_usages = match spec.usage {
        Usage::Server => vec![ExtendedKeyUsagePurpose::ServerAuth],
        Usage::Client => vec![ExtendedKeyUsagePurpose::ClientAuth],
        Usage::ServerAndClient => vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ],
    };
    params.use_authority_key_identifier_extension = true;
    params.not_before = now - Duration::minutes(5);
    params.not_after = now + Duration::days(LEAF_VALIDITY_DAYS);
    let cert = params.signed_by(&key_pair, &ca.issuer).map_err(gen_err)?;
    let key_pem = Zeroizing::new(key_pair.serialize_pem());
    // Key before certificate: a crash in between leaves a pair that does not match, which the
    // next run detects and re-issues.
    files::write_private(key, key_pem.as_bytes())?;
    files::write_private(crt, cert.pem().as_bytes())?;
    Ok(())
}

#[cfg(test)]
mod tests;
