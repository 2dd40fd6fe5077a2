//! The SSH executor: runs commands on and copies files to machines over SSH (russh).
//!
//! - [`SshClient`] holds what is shared by all connections of a cluster: authentication
//!   ([`Auth`]: a private key or ssh-agent), the trusted host keys ([`KnownHosts`]: keys pinned
//!   per machine and/or OpenSSH known_hosts files), timeouts and the connect retry policy.
//! - [`SshClient::connect`] opens a [`Session`] to a [`Target`] (directly, or through a jump
//!   host), retrying with exponential backoff while the machine boots. A session is one
//!   authenticated connection; it runs many commands, also concurrently, each on its own channel.
//! - [`Session::exec`] / [`Session::exec_with`] run a command with exit status, captured output,
//!   optional line streaming and a timeout; [`Session::upload_file`] / [`Session::upload_bytes`]
//!   copy files over SFTP atomically with a remote checksum check, skipping unchanged files;
//!   [`Session::probe_uploads`] and [`Session::upload_probed`] do the same for many files with
//!   one command to compare them all. [`Session::exec_count`] counts the commands a session ran.
//! - [`SshClient::run_on_all`] and [`SshClient::for_each_host`] work on many machines with a
//!   bound on parallelism and return one result per machine.
//! - [`keys`] generates host keys for machines clusterctl creates (pinned before first contact)
//!   and client key pairs.
//!
//! Host keys are always verified: an unknown or changed key is an error naming the host, the
//! port, the offered fingerprint and what to do. Private keys never appear in `Debug` output
//! or logs.

mod client;
mod download;
mod error;
mod exec;
pub mod keys;
mod known_hosts;
mod local_sum;
mod upload;

use std::fmt;

pub use client::{Auth, ClientConfig, HostResult, RetryPolicy, SshClient, Target};
pub use download::Downloaded;
pub use error::SshError;
pub use exec::{ExecOptions, ExecOutput, OutputLine, OutputStream, Session};
pub use keys::{ClientKey, GeneratedKey, KeyAlgorithm};
pub use known_hosts::KnownHosts;
pub use upload::{FileUpload, RemoteFile, SUM_SUFFIX, UploadOutcome, shell_quote};

/// A server address: host name or IP address, and TCP port.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Endpoint {
    /// Host name or IP address (IPv6 without brackets).
    pub host: String,
    /// TCP port.
    pub port: u16,
}

impl Endpoint {
    /// An endpoint from host and port.
    pub fn new(host: impl Into<String>, port: u16) -> Self {
        Endpoint {
            host: host.into(),
            port,
        }
    }
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.host.contains(':') {
            write!(f, "[{}]:{}", self.host, self.port)
        } else {
            write!(f, "{}:{}", self.host, self.port)
        }
    }
}
