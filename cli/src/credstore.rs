//! Where a person's credential (`get-credentials --user`) is kept: the OS keyring where there is
//! one, else the kubeconfig file itself (0600).
//!
//! The keyring is reached through keyring-core. On Linux that is the kernel's keyutils store
//! (linux-keyutils-keyring-store): headless, no daemon. Its quirks, measured in
//! `../shared/TESTBED.md`: a process may find its inherited session keyring closed to it (a
//! container, a cron job, an SSH session without pam_keyinit), so clusterctl joins a new anonymous
//! session keyring of its own before it touches the store; what outlives the process is the
//! user's *persistent* keyring, which the store links every key into, and which the kernel drops
//! after `/proc/sys/kernel/keys/persistent_keyring_expiry` seconds without use (3 days by
//! default) and at reboot. Without a persistent keyring a key would die with the process, so
//! then there is no keyring as far as clusterctl is concerned.
//!
//! A kubeconfig whose token is in the keyring runs `clusterctl auth token` (kubectl's exec
//! credential plugin protocol, `client.authentication.k8s.io/v1beta1`), which reads the token
//! back and hands it to kubectl with its expiry.

use std::sync::OnceLock;

use serde::{Deserialize, Serialize};
use zeroize::{Zeroize, Zeroizing};

/// The keyring service name of clusterctl's entries.
pub const SERVICE: &str = "clusterctl";

/// The exec credential API version written into kubeconfig files and answered by `auth token`
/// (kubectl 1.11 and later).
pub const EXEC_API_VERSION: &str = "client.authentication.k8s.io/v1beta1";

/// Which store `get-credentials --user` uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum StoreChoice {
    /// The OS keyring when it works here, else the kubeconfig file.
    #[default]
    Auto,
    /// The OS keyring, or fail.
    Keyring,
    /// The kubeconfig file (mode 0600), never the keyring.
    File,
}

/// What went wrong with the keyring.
#[derive(Debug, thiserror::Error)]
pub enum KeyringError {
    /// No usable keyring on this machine.
    #[error("no OS keyring here: {0}")]
    Unavailable(String),
    /// The entry is not there (`action::iam::stored_token` says whose and what to do).
    #[error("no such credential in the OS keyring")]
    Missing,
    /// The keyring refused or failed.
    #[error("the OS keyring failed while {doing}: {detail}")]
    Store {
        /// What clusterctl was doing.
        doing: String,
        /// The store's error.
        detail: String,
    },
}

/// A token and its expiry as kept in the keyring.
pub struct StoredToken {
    /// The bearer token; wiped from memory when dropped.
    pub token: Zeroizing<String>,
    /// When it expires (RFC 3339, as the API server set it).
    pub expiration_timestamp: String,
}

/// The keyring entry's JSON.
#[derive(Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Wire {
    token: String,
    expiration_timestamp: String,
}

/// The keyring account of `user`'s credential for cluster `name` of ID `id` (the ID keeps two
/// clusters of one name, in two state directories, apart).
pub fn account(name: &str, id: &str, user: &str) -> String {
    format!("{name}.{id}/{user}")
}

/// Opens the kernel keyring store once per process (see the module docs); the outcome is kept.
fn keyring() -> Result<(), KeyringError> {
    static OPENED: OnceLock<Result<(), String>> = OnceLock::new();
    OPENED
        .get_or_init(open_keyring)
        .clone()
        .map_err(KeyringError::Unavailable)
}

#[cfg(target_os = "linux")]
fn open_keyring() -> Result<(), String> {
    join_session_keyring()?;
    linux_keyutils::KeyRing::get_persistent(linux_keyutils::KeyRingIdentifier::Session).map_err(
        |e| {
            format!(
                "the kernel has no persistent keyring for this user ({e:?}), so a stored key would die with the process"
            )
        },
    )?;
    let store = linux_keyutils_keyring_store::Store::new()
        .map_err(|e| format!("cannot open the kernel keyring store: {e}"))?;
    keyring_core::set_default_store(store);
    Ok(())
}

#[cfg(not(target_os = "linux"))]
fn open_keyring() -> Result<(), String> {
    Err("clusterctl knows only the Linux kernel keyring so far".to_owned())
}

/// `keyctl(KEYCTL_JOIN_SESSION_KEYRING, NULL)`: this process (and what it starts) gets a new
/// anonymous session keyring, which it may use whatever session it was started in.
#[cfg(target_os = "linux")]
#[allow(unsafe_code)]
fn join_session_keyring() -> Result<(), String> {
    const KEYCTL_JOIN_SESSION_KEYRING: libc::c_long = 1;
    // SAFETY: keyctl takes the operation and, for this one, a pointer to a NUL-terminated name
    // or NULL for an anonymous keyring; NULL is passed, nothing is read or written through it.
    let id = unsafe {
        libc::syscall(
            libc::SYS_keyctl,
            KEYCTL_JOIN_SESSION_KEYRING,
            std::ptr::null::<libc::c_char>(),
        )
    };
    if id < 0 {
        return Err(format!(
            "cannot join a session keyring: {}",
            std::io::Error::last_os_error()
        ));
    }
    Ok(())
}

/// Whether the keyring works here; `Err` says why not.
pub fn available() -> Result<(), KeyringError> {
    keyring()
}

fn entry(account: &str) -> Result<keyring_core::Entry, KeyringError> {
    keyring()?;
    keyring_core::Entry::new(SERVICE, account).map_err(|e| KeyringError::Store {
        doing: "naming the entry".to_owned(),
        detail: e.to_string(),
    })
}

/// Keeps `token` under `account` (see [`account`]), replacing an earlier one.
pub fn save(account: &str, token: &StoredToken) -> Result<(), KeyringError> {
    let entry = entry(account)?;
    let mut wire = Wire {
        token: token.token.to_string(),
        expiration_timestamp: token.expiration_timestamp.clone(),
    };
    let value = serde_json::to_string(&wire).map(Zeroizing::new);
    wire.token.zeroize();
    let value = value.map_err(|e| KeyringError::Store {
        doing: "encoding the credential".to_owned(),
        detail: e.to_string(),
    })?;
    entry.set_password(&value).map_err(|e| KeyringError::Store {
        doing: format!("storing credential {account:?}"),
        detail: e.to_string(),
    })
}

/// The token kept under `account`.
pub fn load(account: &str) -> Result<StoredToken, KeyringError> {
    let entry = entry(account)?;
    let value = match entry.get_password() {
        Ok(v) => Zeroizing::new(v),
        Err(keyring_core::Error::NoEntry) => return Err(KeyringError::Missing),
        Err(e) => {
            return Err(KeyringError::Store {
                doing: format!("reading credential {account:?}"),
                detail: e.to_string(),
            });
        }
    };
    let mut wire: Wire = serde_json::from_str(&value).map_err(|e| KeyringError::Store {
        doing: format!("reading credential {account:?}"),
        detail: format!("the entry is not clusterctl's: {e}"),
    })?;
    Ok(StoredToken {
        // The string moves, its buffer with it: wiped when the Zeroizing drops.
        token: Zeroizing::new(std::mem::take(&mut wire.token)),
        expiration_timestamp: wire.expiration_timestamp,
    })
}

/// Removes the token kept under `account`; `false` if there was none.
pub fn delete(account: &str) -> Result<bool, KeyringError> {
    let entry = entry(account)?;
    match entry.delete_credential() {
        Ok(()) => Ok(true),
        Err(keyring_core::Error::NoEntry) => Ok(false),
        Err(e) => Err(KeyringError::Store {
            doing: format!("removing credential {account:?}"),
            detail: e.to_string(),
        }),
    }
}

/// The `ExecCredential` document `clusterctl auth token` prints for kubectl.
pub fn exec_credential(token: &StoredToken) -> Zeroizing<String> {
    let doc = serde_json::json!({
        "apiVersion": EXEC_API_VERSION,
        "kind": "ExecCredential",
        "status": {
            "token": token.token.as_str(),
            "expirationTimestamp": token.expiration_timestamp,
        }
    });
    let mut text = Zeroizing::new(doc.to_string());
    text.push('\n');
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_exec_credential_is_what_kubectl_reads() {
        let token = StoredToken {
            token: Zeroizing::new("abc.def".to_owned()),
            expiration_timestamp: "2026-12-02T10:00:00Z".to_owned(),
        };
        let doc: serde_json::Value = serde_json::from_str(&exec_credential(&token)).expect("json");
        assert_eq!(doc["apiVersion"], EXEC_API_VERSION);
        assert_eq!(doc["kind"], "ExecCredential");
        assert_eq!(doc["status"]["token"], "abc.def");
        assert_eq!(doc["status"]["expirationTimestamp"], "2026-12-02T10:00:00Z");
    }

    /// The real kernel keyring of this machine: kept, replaced, read back, removed. (Another
    /// process reading it back, as kubectl's exec plugin does, is `tests/get_credentials.rs`.)
    #[test]
    fn the_kernel_keyring_keeps_a_token() {
        if let Err(e) = available() {
            panic!("{e}: the kernel keyring is part of the test bed (see ../shared/TESTBED.md)");
        }
        let alice = account("test", &std::process::id().to_string(), "alice");
        let bob = account("test", &std::process::id().to_string(), "bob");
        let token = StoredToken {
            token: Zeroizing::new("first".to_owned()),
            expiration_timestamp: "2026-12-02T10:00:00Z".to_owned(),
        };
        save(&alice, &token).expect("save");
        let again = StoredToken {
            token: Zeroizing::new("second".to_owned()),
            expiration_timestamp: "2026-12-02T11:00:00Z".to_owned(),
        };
        save(&alice, &again).expect("save again");
        let read = load(&alice).expect("load");
        assert_eq!(read.token.as_str(), "second");
        assert_eq!(read.expiration_timestamp, "2026-12-02T11:00:00Z");
        assert!(matches!(load(&bob), Err(KeyringError::Missing)));
        assert!(delete(&alice).expect("delete"));
        assert!(!delete(&alice).expect("delete twice"));
        assert!(matches!(load(&alice), Err(KeyringError::Missing)));
    }
}
