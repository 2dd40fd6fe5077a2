//! The error type of the SSH executor.

use std::io;
use std::path::PathBuf;
use std::time::Duration;

use super::Endpoint;

/// Everything that can go wrong while talking to a machine over SSH.
///
/// Every variant that involves a remote machine names its `host:port` and the operation that
/// failed; the messages say what to do where there is something to do. A `Display` never repeats
/// its source: print the chain (`{:#}` with anyhow) to see the cause.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SshError {
    /// The TCP connection could not be made, also after retrying.
    #[error(
        "cannot connect to {endpoint} (gave up after {attempts} attempt(s) in {elapsed:.1?}); \
         check that the machine is running and sshd listens on that address"
    )]
    Connect {
        /// The address that was dialled.
        endpoint: Endpoint,
        /// How many attempts were made.
        attempts: u32,
        /// How long the attempts took in all.
        elapsed: Duration,
        /// The last error.
        #[source]
        source: io::Error,
    },

    /// A TCP connection was made but the SSH handshake did not complete in time.
    #[error(
        "ssh handshake with {endpoint} did not complete within {timeout:?} \
         (gave up after {attempts} attempt(s)); is an ssh server listening there?"
    )]
    HandshakeTimeout {
        /// The server.
        endpoint: Endpoint,
        /// The per-attempt handshake timeout.
        timeout: Duration,
        /// How many attempts were made.
        attempts: u32,
    },

    /// The SSH handshake failed (protocol error, no common algorithm, connection closed early).
    #[error("ssh handshake with {endpoint} failed (gave up after {attempts} attempt(s))")]
    Handshake {
        /// The server.
        endpoint: Endpoint,
        /// How many attempts were made.
        attempts: u32,
        /// The protocol error.
        #[source]
        source: Box<russh::Error>,
    },

    /// The server offered a host key that no pinned key and no known_hosts entry vouches for.
    #[error(
        "host key of {endpoint} is unknown: the server offered {algorithm} key {fingerprint}; \
         if that is the right machine (check the fingerprint out of band, e.g. \
         `ssh-keygen -lf /etc/ssh/ssh_host_{algorithm_short}_key.pub` on it), pin the key in the \
         cluster's known hosts or add it to a known_hosts file"
    )]
    UnknownHostKey {
        /// The server.
        endpoint: Endpoint,
        /// Algorithm of the offered key, e.g. `ssh-ed25519`.
        algorithm: String,
        /// Short algorithm name as in the OpenSSH host key file names (`ed25519`, `rsa`, `ecdsa`).
        algorithm_short: String,
        /// `SHA256:...` fingerprint of the offered key.
        fingerprint: String,
    },

    /// The server offered a host key different from the one(s) on record.
    #[error(
        "host key of {endpoint} has changed: the server offered {algorithm} key {fingerprint} \
         but the known key(s) are {expected}; someone may be intercepting the connection \
         (man-in-the-middle) or the machine was reinstalled: verify the new key out of band \
         before replacing the old entry"
    )]
    HostKeyChanged {
        /// The server.
        endpoint: Endpoint,
        /// Algorithm of the offered key.
        algorithm: String,
        /// `SHA256:...` fingerprint of the offered key.
        fingerprint: String,
        /// The keys on record, as `SHA256:... (where)` separated by commas.
        expected: String,
    },

    /// The offered host key is marked `@revoked` in a known_hosts file.
    #[error(
        "host key {fingerprint} of {endpoint} is marked @revoked in {}; refusing to connect",
        file.display()
    )]
    HostKeyRevoked {
        /// The server.
        endpoint: Endpoint,
        /// `SHA256:...` fingerprint of the offered key.
        fingerprint: String,
        /// The known_hosts file with the `@revoked` line.
        file: PathBuf,
    },

    /// A known_hosts file exists but cannot be read.
    #[error("cannot read known_hosts file {}", path.display())]
    KnownHostsFile {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: io::Error,
    },

    /// A public key given as text (pinned key, key line) does not parse.
    #[error(
        "invalid ssh public key {input:?}: expected an OpenSSH line such as `ssh-ed25519 AAAA...`"
    )]
    InvalidPublicKey {
        /// The offending text (public keys are not secret).
        input: String,
        /// The parse error.
        #[source]
        source: Box<russh::keys::Error>,
    },

    /// A private key file cannot be read.
    #[error("cannot read private key file {}", path.display())]
    KeyFile {
        /// The key file.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: io::Error,
    },

    /// A private key cannot be parsed.
    #[error(
        "cannot parse private key {}: expected an unencrypted ed25519, ecdsa or rsa key in \
         OpenSSH or PEM format",
        path.display()
    )]
    KeyParse {
        /// The key file (or `<memory>`).
        path: PathBuf,
        /// The parse error.
        #[source]
        source: Box<russh::keys::Error>,
    },

    /// A private key is protected by a passphrase.
    #[error(
        "private key {} is protected by a passphrase, which clusterctl cannot ask for: add it to \
         ssh-agent (`ssh-add {}`) and use agent authentication, or use a key without a passphrase",
        path.display(),
        path.display()
    )]
    EncryptedKey {
        /// The key file.
        path: PathBuf,
    },

    /// ssh-agent authentication was asked for but no agent can be reached.
    #[error(
        "cannot reach ssh-agent{}: {reason}; start one (`eval $(ssh-agent)`, then `ssh-add`) or \
         use a private key file",
        socket.as_ref().map(|s| format!(" at {}", s.display())).unwrap_or_default()
    )]
    AgentUnavailable {
        /// The socket path, if one was known.
        socket: Option<PathBuf>,
        /// Why the agent cannot be used.
        reason: String,
    },

    /// A request to ssh-agent failed.
    #[error("ssh-agent request failed while {op}")]
    Agent {
        /// What was being done.
        op: String,
        /// The agent error.
        #[source]
        source: Box<russh::keys::Error>,
    },

    /// The server rejected every key we offered.
    #[error(
        "{endpoint} rejected authentication as user {user:?} with {method}; check that the public \
         key is in ~{user}/.ssh/authorized_keys on the machine and that the user is right"
    )]
    AuthRejected {
        /// The server.
        endpoint: Endpoint,
        /// The remote user.
        user: String,
        /// What was tried, e.g. `key SHA256:...` or `3 ssh-agent key(s)`.
        method: String,
    },

    /// An SSH protocol operation failed on an established connection.
    #[error("cannot {op} on {endpoint}")]
    Protocol {
        /// The server.
        endpoint: Endpoint,
        /// The operation, e.g. `open a session channel`.
        op: String,
        /// The protocol error.
        #[source]
        source: Box<russh::Error>,
    },

    /// The connection broke while an operation was in progress.
    #[error("connection to {endpoint} lost while {during}")]
    ConnectionLost {
        /// The server.
        endpoint: Endpoint,
        /// What was in progress, e.g. `running "uname -a"`.
        during: String,
    },

    /// A command ran longer than its timeout; its channel was closed.
    #[error(
        "command {command:?} on {endpoint} timed out after {timeout:?}; it was sent SIGKILL and its \
         channel was closed"
    )]
    CommandTimeout {
        /// The server.
        endpoint: Endpoint,
        /// The command line.
        command: String,
        /// The timeout that expired.
        timeout: Duration,
    },

    /// A command finished unsuccessfully (see [`super::ExecOutput::check`]).
    #[error(
        "command {command:?} on {endpoint} failed with {status}{}",
        stderr_suffix(stderr)
    )]
    CommandFailed {
        /// The server.
        endpoint: Endpoint,
        /// The command line.
        command: String,
        /// `exit status N` or `signal NAME`.
        status: String,
        /// The last lines of the command's stderr.
        stderr: String,
    },

    /// The channel closed without an exit status or signal.
    #[error("command {command:?} on {endpoint} ended without reporting an exit status")]
    NoExitStatus {
        /// The server.
        endpoint: Endpoint,
        /// The command line.
        command: String,
    },

    /// An SFTP operation failed.
    #[error("sftp: cannot {op} on {endpoint}")]
    Sftp {
        /// The server.
        endpoint: Endpoint,
        /// What was attempted, with the remote path.
        op: String,
        /// The SFTP error.
        #[source]
        source: russh_sftp::client::error::Error,
    },

    /// A local file could not be read.
    #[error("cannot {op} local file {}", path.display())]
    LocalFile {
        /// The local file.
        path: PathBuf,
        /// What was attempted.
        op: &'static str,
        /// The I/O error.
        #[source]
        source: io::Error,
    },

    /// A local file does not have the sha256 its caller verified it with: it changed since.
    #[error(
        "local file {} has sha256 {actual}, not {expected} as when it was verified; something \
         changed it since: check it (a bundle: verify it again) and run the command again",
        path.display()
    )]
    LocalFileChanged {
        /// The local file.
        path: PathBuf,
        /// The sha256 it was verified with (hex).
        expected: String,
        /// The sha256 of what was read now (hex).
        actual: String,
    },

    /// The uploaded file's checksum on the remote side differs from the local one.
    #[error(
        "upload to {endpoint}:{remote_path} is corrupt: local sha256 {expected}, remote sha256 \
         {actual}; the partial file was removed, retry the upload"
    )]
    UploadCorrupt {
        /// The server.
        endpoint: Endpoint,
        /// The destination path.
        remote_path: String,
        /// The local sha256 (hex).
        expected: String,
        /// The sha256 computed on the server (hex).
        actual: String,
    },

    /// A downloaded file's checksum differs from the one the server computed.
    #[error(
        "download of {endpoint}:{remote_path} is corrupt: the server's sha256 {expected}, received \
         sha256 {actual}; nothing was kept, retry the download"
    )]
    DownloadCorrupt {
        /// The server.
        endpoint: Endpoint,
        /// The remote path.
        remote_path: String,
        /// The sha256 the server computed (hex).
        expected: String,
        /// The sha256 of what arrived (hex).
        actual: String,
    },

    /// A remote path is not usable (empty, not absolute, or contains a NUL or newline).
    #[error("invalid remote path {path:?}: {reason}")]
    InvalidRemotePath {
        /// The path.
        path: String,
        /// What is wrong with it.
        reason: &'static str,
    },

    /// The jump host could not open a connection to the target.
    #[error("jump host {jump} cannot open a connection to {target}")]
    JumpForward {
        /// The jump host (bastion).
        jump: Endpoint,
        /// The target behind it.
        target: Endpoint,
        /// The protocol error (often: the target refuses connections or does not exist).
        #[source]
        source: Box<russh::Error>,
    },

    /// The server could not open a TCP connection to `to` for a tunnel (`direct-tcpip`).
    #[error("{endpoint} cannot open a tunnel to {to}")]
    Tunnel {
        /// The SSH server asked to connect.
        endpoint: Endpoint,
        /// Where it was asked to connect, as seen from the server.
        to: Endpoint,
        /// The protocol error (`ChannelOpenFailure(ConnectFailed)`: nothing listens there;
        /// `AdministrativelyProhibited`: the server forbids TCP forwarding).
        #[source]
        source: Box<russh::Error>,
    },

    /// Generating a key pair failed.
    #[error("cannot generate {algorithm} key pair")]
    KeyGeneration {
        /// The algorithm.
        algorithm: String,
        /// The underlying error.
        #[source]
        source: Box<russh::keys::ssh_key::Error>,
    },

    /// A background task of the executor failed unexpectedly (a bug).
    #[error("internal error while {op} on {endpoint}: {detail}")]
    Internal {
        /// The server.
        endpoint: Endpoint,
        /// What was being done.
        op: String,
        /// What happened.
        detail: String,
    },
}

fn stderr_suffix(stderr: &str) -> String {
    let trimmed = stderr.trim();
    if trimmed.is_empty() {
        String::new()
    } else {
        format!(": {trimmed}")
    }
}

impl SshError {
    /// Whether retrying the same connection attempt later may succeed (machine still booting,
    /// sshd not yet listening). Host key and authentication failures are never retryable.
    pub fn is_transient(&self) -> bool {
        matches!(
            self,
            SshError::Connect { .. }
                | SshError::HandshakeTimeout { .. }
                | SshError::Handshake { .. }
                | SshError::JumpForward { .. }
                | SshError::ConnectionLost { .. }
        ) || matches!(
            self,
            SshError::Tunnel { source, .. }
                if matches!(**source, russh::Error::ChannelOpenFailure(russh::ChannelOpenFailure::ConnectFailed))
        )
    }

    /// The endpoint the error is about, if any.
    pub fn endpoint(&self) -> Option<&Endpoint> {
        match self {
            SshError::Connect { endpoint, .. }
            | SshError::HandshakeTimeout { endpoint, .. }
            | SshError::Handshake { endpoint, .. }
            | SshError::UnknownHostKey { endpoint, .. }
            | SshError::HostKeyChanged { endpoint, .. }
            | SshError::HostKeyRevoked { endpoint, .. }
            | SshError::AuthRejected { endpoint, .. }
            | SshError::Protocol { endpoint, .. }
            | SshError::ConnectionLost { endpoint, .. }
            | SshError::CommandTimeout { endpoint, .. }
            | SshError::CommandFailed { endpoint, .. }
            | SshError::NoExitStatus { endpoint, .. }
            | SshError::Sftp { endpoint, .. }
            | SshError::UploadCorrupt { endpoint, .. }
            | SshError::DownloadCorrupt { endpoint, .. }
            | SshError::Tunnel { endpoint, .. }
            | SshError::Internal { endpoint, .. } => Some(endpoint),
            SshError::JumpForward { target, .. } => Some(target),
            _ => None,
        }
    }
}
