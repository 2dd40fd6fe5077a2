//! Merging a cluster's admin context into the user's kubeconfig, the way
//! `gcloud container clusters get-credentials` does, and removing it again on delete.
//!
//! clusterctl owns exactly three entries per cluster, all named after it (see [`names_for`]):
//! the cluster `clusterctl-<name>`, the user `clusterctl-<name>-admin` and the context
//! `clusterctl-<name>`. [`merge`] replaces those whole (keeping only the context's `namespace`,
//! which users set with `kubectl config set-context --current --namespace`) or appends them;
//! [`remove`] deletes them. Every other entry, field and unknown key is kept with its value and
//! in its order.
//!
//! The file is rewritten from its values: comments, anchors and quoting styles are lost when
//! clusterctl changes the file (kubectl's own `config` commands do the same). A file that is
//! unchanged by a merge or removal is not rewritten at all. A file that is not a kubeconfig is
//! never overwritten: the error names the file, and the line and column when the YAML itself is
//! broken.
//!
//! Writes are atomic (temporary file in the same directory, flushed, renamed over the file, the
//! directory flushed) and the file gets mode 0600. A symbolic link (a kubeconfig kept in a
//! dotfiles repository) is followed and its target replaced, the link kept. While reading and
//! writing, clusterctl holds kubectl's lock protocol: it creates `<path>.lock` exclusively (so a
//! concurrent `kubectl config` fails instead of losing our change, and the reverse), takes a
//! `flock` on it (so a waiting clusterctl can tell a live holder from a file left by a crash) and
//! removes it afterwards. A lock file clusterctl did not create is never removed.

mod yaml;

use std::ffi::{OsStr, OsString};
use std::fmt;
use std::fs::{self, File, OpenOptions, TryLockError};
use std::io::{self, Read as _, Write as _};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use zeroize::{Zeroize, Zeroizing};

use crate::state::{ClusterRecord, StateError, StateStore, fsio};
use yaml::Node;

/// Subdirectory of a cluster's state directory that holds its PKI (`ca.crt`, `admin.crt`,
/// `admin.key`, ... in kubeadm's layout).
pub const PKI_DIR: &str = "pki";
/// Prefix of every kubeconfig entry clusterctl writes.
pub const NAME_PREFIX: &str = "clusterctl-";
/// How long to wait for another writer's `<path>.lock` to go away. kubectl holds it for
/// milliseconds.
/// Tests use a short one.
const LOCK_TIMEOUT: Duration = Duration::from_secs(if cfg!(test) { 1 } else { 10 });
/// What clusterctl writes into a lock file it holds, followed by its pid.
const LOCK_MARKER: &str = "clusterctl pid ";

/// Errors reading, changing or writing a kubeconfig, or gathering the credentials for it.
#[derive(Debug, thiserror::Error)]
pub enum KubeconfigError {
    /// Neither `KUBECONFIG` nor `HOME` names a place for the kubeconfig.
    #[error(
        "cannot find the kubeconfig: KUBECONFIG and HOME are both unset or empty; set KUBECONFIG or pass --kubeconfig"
    )]
    NoHome,
    /// A file-system operation failed.
    #[error("cannot {action} {}", path.display())]
    Io {
        /// What was being done, e.g. `read`, `create directory`.
        action: &'static str,
        /// The path involved.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// Writing the kubeconfig (atomically) failed.
    #[error("cannot write kubeconfig {}", path.display())]
    Write {
        /// The kubeconfig.
        path: PathBuf,
        /// What failed.
        #[source]
        source: StateError,
    },
    /// The file is not valid YAML.
    #[error(
        "kubeconfig {} is not valid YAML{}: {message}; clusterctl does not overwrite it: fix it or move it aside, or write another file with --kubeconfig",
        path.display(),
        Position(*line, *column)
    )]
    Syntax {
        /// The file.
        path: PathBuf,
        /// 1-based line, when known.
        line: Option<u64>,
        /// 1-based column, when known.
        column: Option<u64>,
        /// What the parser found wrong (never a quote of the file, which may hold keys).
        message: String,
    },
    /// The file is YAML but not a kubeconfig.
    #[error(
        "{} is not a kubeconfig: {detail}; clusterctl does not overwrite it: fix it or move it aside, or write another file with --kubeconfig",
        path.display()
    )]
    NotKubeconfig {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        detail: String,
    },
    /// Another program holds the kubeconfig's lock file.
    #[error(
        "kubeconfig {} is locked: {} exists ({holder}); if no kubectl or clusterctl is changing the file, remove {} and retry",
        path.display(),
        lock.display(),
        lock.display()
    )]
    Locked {
        /// The kubeconfig.
        path: PathBuf,
        /// Its lock file.
        lock: PathBuf,
        /// Who holds it, as far as can be told.
        holder: String,
    },
    /// The cluster has no Kubernetes (yet), so there is nothing to connect to.
    #[error(
        "cluster {cluster:?} has no Kubernetes yet; run `clusterctl create -f FILE` with its cluster file to finish it"
    )]
    NoKubernetes {
        /// The cluster.
        cluster: String,
    },
    /// An admin credential file is missing from the cluster's state.
    #[error(
        "{} of cluster {cluster:?} is missing; it is made when Kubernetes is bootstrapped: run `clusterctl create -f FILE` with the cluster's file to make it again",
        path.display()
    )]
    MissingCredential {
        /// The cluster.
        cluster: String,
        /// The missing file.
        path: PathBuf,
    },
    /// An admin credential file exists but cannot be used.
    #[error(
        "{} of cluster {cluster:?} cannot be used: {detail}; run `clusterctl create -f FILE` with the cluster's file to re-issue it",
        path.display()
    )]
    BadCredential {
        /// The cluster.
        cluster: String,
        /// The file.
        path: PathBuf,
        /// What is wrong.
        detail: String,
    },
    /// The state store refused (an invalid cluster name, a key readable by others).
    #[error(transparent)]
    State(#[from] StateError),
}

/// ` at line L, column C` when known.
struct Position(Option<u64>, Option<u64>);

impl fmt::Display for Position {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (self.0, self.1) {
            (Some(l), Some(c)) => write!(f, " at line {l}, column {c}"),
            (Some(l), None) => write!(f, " at line {l}"),
            _ => Ok(()),
        }
    }
}

fn io_err<'a>(
    action: &'static str,
    path: &'a Path,
) -> impl FnOnce(io::Error) -> KubeconfigError + 'a {
    move |source| KubeconfigError::Io {
        action,
        path: path.to_path_buf(),
        source,
    }
}

/// The kubeconfig clusterctl writes to when none is named: the first non-empty entry of
/// `$KUBECONFIG` (a `:`-separated list), else `$HOME/.kube/config`.
///
/// This is where `gcloud container clusters get-credentials` writes. kubectl's own rule for a
/// `KUBECONFIG` list with several entries differs slightly (the first file that exists, else the
/// last entry); with one entry, or none, they agree.
pub fn default_path() -> Result<PathBuf, KubeconfigError> {
    default_path_with(|k| std::env::var_os(k))
}

fn default_path_with(env: impl Fn(&str) -> Option<OsString>) -> Result<PathBuf, KubeconfigError> {
    if let Some(list) = env("KUBECONFIG")
        && let Some(first) = std::env::split_paths(&list).find(|p| !p.as_os_str().is_empty())
    {
        return Ok(first);
    }
    match env("HOME").filter(|h| !h.is_empty()) {
        Some(home) => Ok(PathBuf::from(home).join(".kube").join("config")),
        None => Err(KubeconfigError::NoHome),
    }
}

/// The names of cluster `cluster_name`'s kubeconfig entries: `(context, cluster, user)` =
/// (`clusterctl-<name>`, `clusterctl-<name>`, `clusterctl-<name>-admin`).
pub fn names_for(cluster_name: &str) -> (String, String, String) {
    let base = format!("{NAME_PREFIX}{cluster_name}");
    (base.clone(), base.clone(), format!("{base}-admin"))
}

/// The names of the entries of a person's credential for cluster `cluster_name`:
/// (`clusterctl-<name>-<user>`, `clusterctl-<name>`, `clusterctl-<name>-<user>`), the user
/// name with characters other than letters, digits, `.`, `_`, `@` and `-` replaced by `-`.
pub fn names_for_user(cluster_name: &str, user: &str) -> (String, String, String) {
    let clean: String = user
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '@' | '-') {
                c
            } else {
                '-'
            }
        })
        .collect();
    let base = format!("{NAME_PREFIX}{cluster_name}");
    let named = format!("{base}-{clean}");
    (named.clone(), base, named)
}

/// One cluster's kubeconfig entries: a cluster (server and CA), a user (client certificate and
/// key) and a context joining them. All certificates and the key are embedded as base64 data.
/// `Debug` shows names and the server only: the key is never formatted.
pub struct Entry {
    /// Context name.
    pub context: String,
    /// Cluster entry name.
    pub cluster: String,
    /// User entry name.
    pub user: String,
    /// API server URL (`https://10.77.0.11:6443`).
    pub server: String,
    /// The cluster CA certificate, PEM.
    pub ca_pem: String,
    /// How the user proves who it is.
    pub credential: Credential,
}

/// The user part of a kubeconfig entry.
pub enum Credential {
    /// A client certificate (the cluster admin's).
    ClientCertificate {
        /// The client certificate, PEM.
        cert_pem: String,
        /// The client key, PEM; wiped from memory when dropped.
        key_pem: Zeroizing<String>,
    },
    /// A bearer token acting as another user (`as:`): a person's credential from
    /// `get-credentials --user`.
    Token {
        /// The bearer token; wiped from memory when dropped.
        token: Zeroizing<String>,
        /// The user name the requests act as.
        impersonate: String,
    },
    /// A person's credential whose token kubectl gets from a command (kubectl's `exec`
    /// credential plugin, `clusterctl auth token`): the token itself is in the OS keyring.
    Exec {
        /// The command, an absolute path.
        command: String,
        /// Its arguments.
        args: Vec<String>,
        /// The user name the requests act as.
        impersonate: String,
    },
}

impl fmt::Debug for Entry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Entry")
            .field("context", &self.context)
            .field("cluster", &self.cluster)
            .field("user", &self.user)
            .field("server", &self.server)
            .finish_non_exhaustive()
    }
}

/// What [`merge`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MergeOutcome {
    /// The file that holds the entry (the target, when the given path is a symbolic link).
    pub path: PathBuf,
    /// The context name.
    pub context: String,
    /// The file did not exist before.
    pub created: bool,
    /// Entries of these names existed and were replaced (rather than appended).
    pub replaced: bool,
    /// The file changed; `false` if it already held exactly this entry.
    pub changed: bool,
    /// `current-context` names this entry's context now.
    pub current: bool,
}

impl fmt::Display for MergeOutcome {
    /// `kubeconfig entry "clusterctl-demo" written to /home/u/.kube/config (current context)`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "kubeconfig entry {:?} ", self.context)?;
        if self.changed {
            write!(f, "written to {}", self.path.display())?;
        } else {
            write!(f, "in {} is up to date", self.path.display())?;
        }
        if self.current {
            f.write_str(" (current context)")?;
        }
        Ok(())
    }
}

/// Merges `entry` into the kubeconfig at `path`: creates the file (and its directory, 0700) if
/// missing, replaces the cluster, user and context entries of the same names or appends them,
/// and with `set_current` makes the context the current one. Everything else in the file is
/// kept. See the module documentation for locking, atomicity and what is lost on rewrite.
pub fn merge(
    path: &Path,
    entry: &Entry,
    set_current: bool,
) -> Result<MergeOutcome, KubeconfigError> {
    let target = resolve_target(path)?;
    if let Some(dir) = target.parent().filter(|d| !d.as_os_str().is_empty()) {
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(io_err("create directory", dir))?;
    }
    tracing::info!(path = %target.display(), context = %entry.context, "merging kubeconfig entry");
    let _lock = LockFile::acquire(path)?;
    let existing = read(&target)?;
    let created = existing.is_none();
    let old = Wiped(match existing {
        Some(node) => checked(&target, node)?,
        None => new_config(),
    });
    let mut new = Wiped(old.0.clone());
    let Node::Map(top) = &mut new.0 else {
        // `checked` and `new_config` only return mappings.
        return Err(KubeconfigError::NotKubeconfig {
            path: target,
            detail: "the top level is not a mapping".to_owned(),
        });
    };
    let cluster_item = named(
        &entry.cluster,
        "cluster",
        vec![
            ("certificate-authority-data", STANDARD.encode(&entry.ca_pem)),
            ("server", entry.server.clone()),
        ],
    );
    // The secret fields are copied into the document; the copies there are wiped with it.
    let user_fields: Vec<(&str, Node)> = match &entry.credential {
        Credential::ClientCertificate { cert_pem, key_pem } => vec![
            (
                "client-certificate-data",
                Node::Str(STANDARD.encode(cert_pem)),
            ),
            (
                "client-key-data",
                Node::Str(Zeroizing::new(STANDARD.encode(key_pem.as_bytes())).to_string()),
            ),
        ],
        Credential::Token { token, impersonate } => vec![
            ("as", Node::Str(impersonate.clone())),
            ("token", Node::Str(token.to_string())),
        ],
        Credential::Exec {
            command,
            args,
            impersonate,
        } => vec![
            ("as", Node::Str(impersonate.clone())),
            (
                "exec",
                Node::Map(vec![
                    (
                        "apiVersion".to_owned(),
                        Node::Str(crate::credstore::EXEC_API_VERSION.to_owned()),
                    ),
                    (
                        "args".to_owned(),
                        Node::Seq(args.iter().cloned().map(Node::Str).collect()),
                    ),
                    ("command".to_owned(), Node::Str(command.clone())),
                ]),
            ),
        ],
    };
    let user_item = named_nodes(&entry.user, "user", user_fields);
    let mut context_fields = vec![
        ("cluster", entry.cluster.clone()),
        ("user", entry.user.clone()),
    ];
    // The one field of our context users change themselves: keep it.
    if let Some(ns) = list(top, "contexts")
        .iter()
        .find(|item| item_name(item) == Some(entry.context.as_str()))
        .and_then(|item| item.get("context")?.get("namespace")?.as_str())
    {
        context_fields.push(("namespace", ns.to_owned()));
    }
    let context_item = named(&entry.context, "context", context_fields);
    let mut replaced = upsert(top, "clusters", &entry.cluster, cluster_item);
    replaced |= upsert(top, "users", &entry.user, user_item);
    replaced |= upsert(top, "contexts", &entry.context, context_item);
    if set_current {
        set_key(top, "current-context", Node::Str(entry.context.clone()));
    }
    let current =
        new.0.get("current-context").and_then(Node::as_str) == Some(entry.context.as_str());
    let changed = created || new.0 != old.0;
    if changed {
        write(&target, &new.0)?;
    } else {
        // Unchanged, but the file holds a private key: make sure only its owner can read it.
        fsio::tighten(&target, fsio::FILE_MODE).map_err(|source| KubeconfigError::Write {
            path: target.clone(),
            source,
        })?;
    }
    Ok(MergeOutcome {
        path: target,
        context: entry.context.clone(),
        created,
        replaced,
        changed,
        current,
    })
}

/// Removes cluster `cluster_name`'s context, cluster and user entries (see [`names_for`]) from
/// the kubeconfig at `path`, and clears `current-context` if it named that context. Returns
/// whether the file changed; a missing file is `Ok(false)`.
pub fn remove(path: &Path, cluster_name: &str) -> Result<bool, KubeconfigError> {
    let target = resolve_target(path)?;
    if !target.exists() {
        return Ok(false);
    }
    tracing::info!(path = %target.display(), cluster = cluster_name, "removing kubeconfig entries");
    let _lock = LockFile::acquire(path)?;
    let Some(node) = read(&target)? else {
        return Ok(false);
    };
    let old = Wiped(checked(&target, node)?);
    let mut new = Wiped(old.0.clone());
    let Node::Map(top) = &mut new.0 else {
        return Ok(false);
    };
    let (context, cluster, user) = names_for(cluster_name);
    for (key, name) in [
        ("clusters", &cluster),
        ("users", &user),
        ("contexts", &context),
    ] {
        if let Some((_, Node::Seq(items))) = top.iter_mut().find(|(k, _)| k == key) {
            items.retain(|item| item_name(item) != Some(name.as_str()));
        }
    }
    if let Some((_, value)) = top.iter_mut().find(|(k, _)| k == "current-context")
        && value.as_str() == Some(context.as_str())
    {
        *value = Node::Str(String::new());
    }
    if new.0 == old.0 {
        return Ok(false);
    }
    write(&target, &new.0)?;
    Ok(true)
}

/// Builds an [`Entry`] for cluster `record` from the admin credentials in its state directory
/// (`pki/ca.crt`, `pki/admin.crt`, `pki/admin.key`) and merges it into the kubeconfig at `path`
/// as the current context. `create` calls this when it finishes; `get-credentials` is the same
/// step on its own.
pub fn write_admin_context(
    store: &StateStore,
    record: &ClusterRecord,
    path: &Path,
) -> Result<MergeOutcome, KubeconfigError> {
    let entry = admin_entry(store, record)?;
    let outcome = merge(path, &entry, true)?;
    if let Err(e) = remember(store, &record.name, path) {
        tracing::warn!(path = %path.display(), error = %e, "cannot record the kubeconfig file in the cluster's state; `delete` will not clean it");
    }
    Ok(outcome)
}

/// File in a cluster's state directory that lists the kubeconfig files clusterctl merged the
/// cluster's context into (one absolute path per line), so `delete` takes it out of each.
pub const WRITTEN_LIST: &str = "kubeconfigs";

fn remember(store: &StateStore, cluster: &str, path: &Path) -> Result<(), StateError> {
    use std::os::unix::ffi::OsStrExt as _;
    let file = store.cluster_dir(cluster)?.join(WRITTEN_LIST);
    let absolute = std::path::absolute(path).map_err(|source| StateError::Io {
        action: "make absolute",
        path: path.to_path_buf(),
        source,
    })?;
    let mut list = remembered_in(&file)?;
    // A path with a line break cannot be listed; its context is then left to the user.
    if list.contains(&absolute) || absolute.as_os_str().as_bytes().contains(&b'\n') {
        return Ok(());
    }
    list.push(absolute);
    let mut content = Vec::new();
    for p in &list {
        content.extend_from_slice(p.as_os_str().as_bytes());
        content.push(b'\n');
    }
    fsio::write_atomic(&file, &content, 0o600)
}

fn remembered_in(file: &Path) -> Result<Vec<PathBuf>, StateError> {
    use std::os::unix::ffi::OsStrExt as _;
    let Some(content) = fsio::read_optional(file)? else {
        return Ok(Vec::new());
    };
    Ok(content
        .split(|b| *b == b'\n')
        .filter(|l| !l.is_empty())
        .map(|l| PathBuf::from(OsStr::from_bytes(l)))
        .collect())
}

/// The kubeconfig files clusterctl merged cluster `cluster`'s context into (see [`WRITTEN_LIST`]).
pub fn remembered(store: &StateStore, cluster: &str) -> Result<Vec<PathBuf>, StateError> {
    remembered_in(&store.cluster_dir(cluster)?.join(WRITTEN_LIST))
}

/// The admin [`Entry`] of cluster `record`, read and checked from its state directory: the CA
/// and the client certificate must be certificates, the key must be private to its owner and
/// match the certificate, and the certificate must be signed by the CA.
pub fn admin_entry(store: &StateStore, record: &ClusterRecord) -> Result<Entry, KubeconfigError> {
    let cluster = record.name.as_str();
    let Some(kubernetes) = record.kubernetes.as_ref() else {
        return Err(KubeconfigError::NoKubernetes {
            cluster: cluster.to_owned(),
        });
    };
    let pki = store.cluster_dir(cluster)?.join(PKI_DIR);
    let ca_path = pki.join("ca.crt");
    let cert_path = pki.join("admin.crt");
    let key_path = pki.join("admin.key");
    let read_file = |path: &Path| -> Result<Zeroizing<String>, KubeconfigError> {
        match fs::read(path) {
            Ok(bytes) => String::from_utf8(bytes).map(Zeroizing::new).map_err(|e| {
                let mut bytes = e.into_bytes();
                bytes.zeroize();
                KubeconfigError::BadCredential {
                    cluster: cluster.to_owned(),
                    path: path.to_path_buf(),
                    detail: "it is not PEM text".to_owned(),
                }
            }),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                Err(KubeconfigError::MissingCredential {
                    cluster: cluster.to_owned(),
                    path: path.to_path_buf(),
                })
            }
            Err(source) => Err(KubeconfigError::Io {
                action: "read",
                path: path.to_path_buf(),
                source,
            }),
        }
    };
    let ca_pem = read_file(&ca_path)?;
    let cert_pem = read_file(&cert_path)?;
    if key_path.exists() {
        fsio::check_secret_mode(&key_path)?;
    }
    let key_pem = read_file(&key_path)?;
    let bad = |path: &Path, detail: String| KubeconfigError::BadCredential {
        cluster: cluster.to_owned(),
        path: path.to_path_buf(),
        detail,
    };
    let key_spki = rcgen::KeyPair::from_pem(&key_pem)
        .map(|k| rcgen::PublicKeyData::subject_public_key_info(&k))
        .map_err(|e| bad(&key_path, format!("not a private key: {e}")))?;
    let ca_der = pem_certificate(&ca_pem).map_err(|d| bad(&ca_path, d))?;
    let cert_der = pem_certificate(&cert_pem).map_err(|d| bad(&cert_path, d))?;
    let ca = parse_der(&ca_der).map_err(|d| bad(&ca_path, d))?;
    let cert = parse_der(&cert_der).map_err(|d| bad(&cert_path, d))?;
    if cert.public_key().raw != key_spki.as_slice() {
        return Err(bad(
            &key_path,
            format!("it does not match {}", cert_path.display()),
        ));
    }
    if cert.verify_signature(Some(ca.public_key())).is_err() {
        return Err(bad(
            &cert_path,
            format!("it is not signed by {}", ca_path.display()),
        ));
    }
    let (context, cluster_entry, user) = names_for(cluster);
    Ok(Entry {
        context,
        cluster: cluster_entry,
        user,
        server: kubernetes.api_server.clone(),
        ca_pem: ca_pem.to_string(),
        credential: Credential::ClientCertificate {
            cert_pem: cert_pem.to_string(),
            key_pem,
        },
    })
}

/// The DER of the first certificate in a PEM text.
fn pem_certificate(pem: &str) -> Result<Vec<u8>, String> {
    let (_, block) = x509_parser::pem::parse_x509_pem(pem.as_bytes())
        .map_err(|e| format!("not a PEM certificate: {e}"))?;
    if block.label != "CERTIFICATE" {
        return Err(format!("holds a {} instead of a CERTIFICATE", block.label));
    }
    Ok(block.contents)
}

fn parse_der(der: &[u8]) -> Result<x509_parser::certificate::X509Certificate<'_>, String> {
    use x509_parser::prelude::FromDer as _;
    x509_parser::certificate::X509Certificate::from_der(der)
        .map(|(_, c)| c)
        .map_err(|e| format!("not an X.509 certificate: {e}"))
}

/// A value whose strings (the file's keys and tokens among them) are wiped when dropped.
struct Wiped(Node);

impl Drop for Wiped {
    fn drop(&mut self) {
        fn wipe(node: &mut Node) {
            match node {
                Node::Str(s) => s.zeroize(),
                Node::Seq(items) => items.iter_mut().for_each(wipe),
                Node::Map(entries) => entries.iter_mut().for_each(|(_, v)| wipe(v)),
                _ => {}
            }
        }
        wipe(&mut self.0);
    }
}

/// The file to read and replace: `path` itself, or the file a symbolic link points to.
fn resolve_target(path: &Path) -> Result<PathBuf, KubeconfigError> {
    match fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_symlink() => {
            fs::canonicalize(path).map_err(io_err("follow the symbolic link", path))
        }
        Ok(meta) if meta.is_dir() => Err(KubeconfigError::NotKubeconfig {
            path: path.to_path_buf(),
            detail: "it is a directory".to_owned(),
        }),
        // Absolute, so that the directory of a bare `config` is `.` and not empty.
        Ok(_) => std::path::absolute(path).map_err(io_err("resolve", path)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            std::path::absolute(path).map_err(io_err("resolve", path))
        }
        Err(source) => Err(KubeconfigError::Io {
            action: "read metadata of",
            path: path.to_path_buf(),
            source,
        }),
    }
}

/// Reads and parses the file; `Ok(None)` if it does not exist.
fn read(path: &Path) -> Result<Option<Node>, KubeconfigError> {
    let bytes = match fs::read(path) {
        Ok(b) => Zeroizing::new(b),
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(source) => {
            return Err(KubeconfigError::Io {
                action: "read",
                path: path.to_path_buf(),
                source,
            });
        }
    };
    let text = std::str::from_utf8(&bytes).map_err(|e| KubeconfigError::NotKubeconfig {
        path: path.to_path_buf(),
        detail: format!(
            "it is not UTF-8 text (invalid byte at offset {})",
            e.valid_up_to()
        ),
    })?;
    yaml::parse(text)
        .map(Some)
        .map_err(|e| KubeconfigError::Syntax {
            path: path.to_path_buf(),
            line: e.line,
            column: e.column,
            message: e.message,
        })
}

/// A fresh, empty kubeconfig in kubectl's field order.
fn new_config() -> Node {
    Node::Map(vec![
        ("apiVersion".into(), Node::Str("v1".into())),
        ("clusters".into(), Node::Seq(Vec::new())),
        ("contexts".into(), Node::Seq(Vec::new())),
        ("current-context".into(), Node::Str(String::new())),
        ("kind".into(), Node::Str("Config".into())),
        ("preferences".into(), Node::Map(Vec::new())),
        ("users".into(), Node::Seq(Vec::new())),
    ])
}

/// Checks that a parsed file is a kubeconfig clusterctl can change without losing anything:
/// a mapping (an empty document counts as an empty kubeconfig), `kind: Config` and
/// `apiVersion: v1` when given, and `clusters`, `users`, `contexts` lists (or null) of mappings
/// whose `name`s are strings.
fn checked(path: &Path, node: Node) -> Result<Node, KubeconfigError> {
    let not = |detail: String| KubeconfigError::NotKubeconfig {
        path: path.to_path_buf(),
        detail,
    };
    let node = match node {
        Node::Null => return Ok(new_config()),
        Node::Map(entries) => Node::Map(entries),
        other => {
            return Err(not(format!(
                "the top level is {}, not a mapping",
                other.kind()
            )));
        }
    };
    for (key, want) in [("kind", "Config"), ("apiVersion", "v1")] {
        match node.get(key) {
            None | Some(Node::Null) => {}
            Some(Node::Str(s)) if s == want => {}
            Some(Node::Str(s)) => return Err(not(format!("`{key}` is {s:?}, not {want:?}"))),
            Some(other) => return Err(not(format!("`{key}` is {}, not {want:?}", other.kind()))),
        }
    }
    for key in ["clusters", "users", "contexts"] {
        match node.get(key) {
            None | Some(Node::Null) => {}
            Some(Node::Seq(items)) => {
                for (i, item) in items.iter().enumerate() {
                    let Node::Map(_) = item else {
                        return Err(not(format!(
                            "`{key}[{i}]` is {}, not a mapping",
                            item.kind()
                        )));
                    };
                    match item.get("name") {
                        None | Some(Node::Str(_)) => {}
                        Some(other) => {
                            return Err(not(format!(
                                "`{key}[{i}].name` is {}, not a string",
                                other.kind()
                            )));
                        }
                    }
                }
            }
            Some(other) => return Err(not(format!("`{key}` is {}, not a list", other.kind()))),
        }
    }
    Ok(node)
}

fn item_name(item: &Node) -> Option<&str> {
    item.get("name").and_then(Node::as_str)
}

/// `- name: NAME` / `  FIELD: {fields}`, in kubectl's (alphabetical) order.
fn named(name: &str, field: &str, fields: Vec<(&str, String)>) -> Node {
    named_nodes(
        name,
        field,
        fields.into_iter().map(|(k, v)| (k, Node::Str(v))).collect(),
    )
}

/// `named` with values of any shape.
fn named_nodes(name: &str, field: &str, fields: Vec<(&str, Node)>) -> Node {
    let body = (
        field.to_owned(),
        Node::Map(fields.into_iter().map(|(k, v)| (k.to_owned(), v)).collect()),
    );
    let name = ("name".to_owned(), Node::Str(name.to_owned()));
    Node::Map(if body.0.as_str() < "name" {
        vec![body, name]
    } else {
        vec![name, body]
    })
}

/// The items of list `key` (empty if absent or not a list).
fn list<'a>(top: &'a [(String, Node)], key: &str) -> &'a [Node] {
    match top.iter().find(|(k, _)| k == key) {
        Some((_, Node::Seq(items))) => items,
        _ => &[],
    }
}

/// In list `key` of the top-level mapping, replaces the first item named `name` with `item` and
/// drops any further ones (kubectl refuses a file with duplicate names), or appends `item`; an
/// absent or null list becomes a new one ([`checked`] has refused anything else). Returns
/// whether an item of that name existed.
fn upsert(top: &mut Vec<(String, Node)>, key: &str, name: &str, item: Node) -> bool {
    let slot = match top.iter().position(|(k, _)| k == key) {
        Some(i) => &mut top[i].1,
        None => {
            top.push((key.to_owned(), Node::Null));
            let last = top.len() - 1;
            &mut top[last].1
        }
    };
    let Node::Seq(items) = slot else {
        *slot = Node::Seq(vec![item]);
        return false;
    };
    match items.iter().position(|i| item_name(i) == Some(name)) {
        Some(first) => {
            items[first] = item;
            let mut index = 0;
            items.retain(|i| {
                let keep = index <= first || item_name(i) != Some(name);
                index += 1;
                keep
            });
            true
        }
        None => {
            items.push(item);
            false
        }
    }
}

fn set_key(top: &mut Vec<(String, Node)>, key: &str, value: Node) {
    match top.iter_mut().find(|(k, _)| k == key) {
        Some(slot) => slot.1 = value,
        None => top.push((key.to_owned(), value)),
    }
}

/// Writes `node` to `path` atomically with mode 0600.
fn write(path: &Path, node: &Node) -> Result<(), KubeconfigError> {
    let text = Zeroizing::new(yaml::emit(node));
    fsio::write_atomic(path, text.as_bytes(), fsio::FILE_MODE).map_err(|source| {
        KubeconfigError::Write {
            path: path.to_path_buf(),
            source,
        }
    })
}

/// `<path>.lock`, the lock file kubectl's `clientcmd` uses.
fn lock_path_for(path: &Path) -> PathBuf {
    let mut s: OsString = path.as_os_str().to_owned();
    s.push(OsStr::new(".lock"));
    PathBuf::from(s)
}

/// A `<path>.lock` this process created; removed (only if it is still the same file) on drop.
struct LockFile {
    path: PathBuf,
    file: File,
}

impl LockFile {
    /// Creates `<path>.lock` exclusively, waiting up to [`LOCK_TIMEOUT`] for another holder.
    fn acquire(path: &Path) -> Result<LockFile, KubeconfigError> {
        let lock = lock_path_for(path);
        let deadline = Instant::now() + LOCK_TIMEOUT;
        let locked = |holder: String| KubeconfigError::Locked {
            path: path.to_path_buf(),
            lock: lock.clone(),
            holder,
        };
        loop {
            match OpenOptions::new()
                .read(true)
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&lock)
            {
                Ok(mut file) => {
                    let held = LockFile {
                        path: lock.clone(),
                        file: file.try_clone().map_err(io_err("lock", &lock))?,
                    };
                    // Blocking: the only other flock on a fresh file is a waiter's short look.
                    file.lock().map_err(io_err("lock", &lock))?;
                    file.set_permissions(fs::Permissions::from_mode(0o600))
                        .and_then(|()| writeln!(file, "{LOCK_MARKER}{}", std::process::id()))
                        .map_err(io_err("write", &lock))?;
                    return Ok(held);
                }
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => match inspect(&lock) {
                    Holder::Gone => continue,
                    Holder::Dead(pid) => {
                        return Err(locked(format!(
                            "left by clusterctl pid {pid}, which is no longer running"
                        )));
                    }
                    Holder::Alive(who) if Instant::now() >= deadline => {
                        return Err(locked(format!(
                            "held by {who} for more than {} s",
                            LOCK_TIMEOUT.as_secs()
                        )));
                    }
                    Holder::Alive(_) => std::thread::sleep(Duration::from_millis(50)),
                },
                Err(source) => {
                    return Err(KubeconfigError::Io {
                        action: "create lock file",
                        path: lock,
                        source,
                    });
                }
            }
        }
    }
}

impl Drop for LockFile {
    fn drop(&mut self) {
        // Remove only the file this process created: if someone removed it by hand and another
        // writer made a new one, that one is not ours.
        let ours = match (self.file.metadata(), fs::symlink_metadata(&self.path)) {
            (Ok(a), Ok(b)) => a.dev() == b.dev() && a.ino() == b.ino(),
            _ => false,
        };
        if ours && let Err(e) = fs::remove_file(&self.path) {
            tracing::warn!(path = %self.path.display(), error = %e, "cannot remove kubeconfig lock file");
        }
    }
}

/// Who holds an existing lock file.
enum Holder {
    /// The file is gone already: try again.
    Gone,
    /// A live holder (kubectl, another clusterctl, or unknown).
    Alive(String),
    /// A clusterctl process that died holding it.
    Dead(u32),
}

fn inspect(lock: &Path) -> Holder {
    let Ok(file) = File::open(lock) else {
        return Holder::Gone;
    };
    let mut text = String::new();
    let _ = (&file).take(256).read_to_string(&mut text);
    let Some(pid) = text
        .trim()
        .strip_prefix(LOCK_MARKER)
        .and_then(|p| p.parse::<u32>().ok())
    else {
        // kubectl writes nothing into its lock file.
        return Holder::Alive("kubectl or another program".to_owned());
    };
    match file.try_lock_shared() {
        Err(TryLockError::WouldBlock) => Holder::Alive(format!("clusterctl pid {pid}")),
        Err(TryLockError::Error(_)) => Holder::Alive(format!("clusterctl pid {pid}")),
        Ok(()) => {
            // Nobody holds the flock. Either the holder died, or it released the lock between
            // our open and our look: then the path no longer names the file we opened.
            let same = match (file.metadata(), fs::symlink_metadata(lock)) {
                (Ok(a), Ok(b)) => a.dev() == b.dev() && a.ino() == b.ino(),
                _ => false,
            };
            if same {
                Holder::Dead(pid)
            } else {
                Holder::Gone
            }
        }
    }
}

#[cfg(test)]
mod tests;
