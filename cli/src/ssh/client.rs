//! Connecting: configuration, authentication, host key checks, retries, jump hosts, and
//! bounded parallelism across many machines.

use std::borrow::Cow;
use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::path::PathBuf;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use russh::client::{self, Handle};
use russh::keys::agent::client::AgentClient;
use russh::keys::{Algorithm, PrivateKeyWithHashAlg, PublicKey, PublicKeyOrCertificate};
use russh::{Preferred, cipher};
use tokio::net::TcpStream;
use tokio::sync::{Mutex, Semaphore};
use tokio::task::JoinSet;

use super::exec::{ExecOutput, Session};
use super::{ClientKey, Endpoint, KnownHosts, SshError};

/// How a client proves its identity to servers.
#[derive(Debug, Clone)]
pub enum Auth {
    /// A private key (loaded once; see [`ClientKey::from_file`]).
    Key(ClientKey),
    /// Keys held by ssh-agent. `socket: None` means the `SSH_AUTH_SOCK` environment variable.
    Agent {
        /// The agent's unix socket, or `None` for `SSH_AUTH_SOCK`.
        socket: Option<PathBuf>,
    },
}

impl Auth {
    /// Authenticates with the unencrypted private key in `path` (read and checked now).
    pub fn key_file(path: impl Into<PathBuf>) -> Result<Self, SshError> {
        Ok(Auth::Key(ClientKey::from_file(path.into())?))
    }

    /// Authenticates with the keys of the ssh-agent at `SSH_AUTH_SOCK`.
    pub fn agent() -> Self {
        Auth::Agent { socket: None }
    }
}

/// Exponential backoff for connection attempts (machines that are still booting refuse or do
/// not answer connections for a while).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Delay before the second attempt.
    pub initial_delay: Duration,
    /// Upper bound of the delay between attempts (the delay doubles each time until this).
    pub max_delay: Duration,
    /// No new attempt starts after this much time since the first one.
    pub max_elapsed: Duration,
}

impl RetryPolicy {
    /// A single attempt, no retries.
    pub fn none() -> Self {
        RetryPolicy {
            initial_delay: Duration::ZERO,
            max_delay: Duration::ZERO,
            max_elapsed: Duration::ZERO,
        }
    }

    /// Retries for up to `max_elapsed` with the default delays (250 ms doubling up to 5 s).
    pub fn for_up_to(max_elapsed: Duration) -> Self {
        RetryPolicy {
            max_elapsed,
            ..RetryPolicy::default()
        }
    }
}

impl Default for RetryPolicy {
    /// 250 ms doubling up to 5 s between attempts, for up to 30 s.
    fn default() -> Self {
        RetryPolicy {
            initial_delay: Duration::from_millis(250),
            max_delay: Duration::from_secs(5),
            max_elapsed: Duration::from_secs(30),
        }
    }
}

/// Settings shared by all connections of an [`SshClient`].
#[derive(Debug, Clone)]
pub struct ClientConfig {
    /// How to authenticate.
    pub auth: Auth,
    /// Which host keys to trust.
    pub known_hosts: KnownHosts,
    /// Time allowed for one TCP connect, and separately for one SSH handshake plus
    /// authentication. Default 10 s.
    pub connect_timeout: Duration,
    /// Retries of the connection (TCP connect and handshake only; host key and authentication
    /// failures are never retried).
    pub retry: RetryPolicy,
    /// Send a keepalive after this much silence from the server; after 3 unanswered ones the
    /// connection counts as lost. Default 10 s. `None` disables keepalives (a server that
    /// vanishes without closing TCP then goes unnoticed until the command timeout).
    pub keepalive_interval: Option<Duration>,
    /// Default timeout of each command; [`super::ExecOptions::timeout`] overrides it.
    /// Default 10 minutes. `None`: no timeout.
    pub command_timeout: Option<Duration>,
    /// At most this many commands or transfers run at once on one session; more wait for a
    /// free slot. Default 8: OpenSSH refuses more than `MaxSessions` (default 10) channels per
    /// connection, and one channel is kept free to kill timed-out commands.
    pub max_channels_per_session: usize,
}

impl ClientConfig {
    /// A configuration with the given authentication and trusted host keys and the defaults.
    pub fn new(auth: Auth, known_hosts: KnownHosts) -> Self {
        ClientConfig {
            auth,
            known_hosts,
            connect_timeout: Duration::from_secs(10),
            retry: RetryPolicy::default(),
            keepalive_interval: Some(Duration::from_secs(10)),
            command_timeout: Some(Duration::from_secs(600)),
            max_channels_per_session: 8,
        }
    }
}

/// A machine to connect to: address, remote user and an optional jump host (bastion).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Target {
    /// Address of the ssh server, as reachable from here (or from the jump host, if any).
    pub endpoint: Endpoint,
    /// The remote user.
    pub user: String,
    /// Connect through this host (with `channel_open_direct_tcpip`); it may itself have a jump.
    pub jump: Option<Box<Target>>,
}

impl Target {
    /// A directly reachable target.
    pub fn new(host: impl Into<String>, port: u16, user: impl Into<String>) -> Self {
        Target {
            endpoint: Endpoint::new(host, port),
            user: user.into(),
            jump: None,
        }
    }

    /// The same target, reached through `jump`.
    pub fn via(mut self, jump: Target) -> Self {
        self.jump = Some(Box::new(jump));
        self
    }
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}@{}", self.user, self.endpoint)?;
        if let Some(jump) = &self.jump {
            write!(f, " via {jump}")?;
        }
        Ok(())
    }
}

/// The outcome for one machine of an operation run on many.
#[derive(Debug)]
pub struct HostResult<T> {
    /// The machine.
    pub target: Target,
    /// What happened there.
    pub result: Result<T, SshError>,
}

/// Connects to machines with one configuration. Cheap to clone; clones share the configuration,
/// the trusted host keys and the cache of jump host connections.
#[derive(Clone)]
pub struct SshClient {
    inner: Arc<ClientInner>,
}

struct ClientInner {
    config: ClientConfig,
    known_hosts: RwLock<KnownHosts>,
    /// One connection per jump host, shared by all sessions that go through it.
    jumps: std::sync::Mutex<HashMap<Target, JumpSlot>>,
}

impl fmt::Debug for SshClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SshClient")
            .field("config", &self.inner.config)
            .finish_non_exhaustive()
    }
}

type JumpSlot = Arc<Mutex<Option<Session>>>;

/// Why one connection attempt failed, and whether another attempt may help.
enum AttemptError {
    Fatal(SshError),
    Tcp(std::io::Error),
    HandshakeTimeout,
    Handshake(russh::Error),
    JumpForward {
        jump: Endpoint,
        source: russh::Error,
    },
}

impl SshClient {
    /// A client with the given configuration.
    pub fn new(config: ClientConfig) -> Self {
        let known_hosts = RwLock::new(config.known_hosts.clone());
        SshClient {
            inner: Arc::new(ClientInner {
                config,
                known_hosts,
                jumps: std::sync::Mutex::new(HashMap::new()),
            }),
        }
    }

    /// The configuration.
    pub fn config(&self) -> &ClientConfig {
        &self.inner.config
    }

    /// Trusts `key` for `endpoint` from now on (for example right after a machine was created
    /// with a host key clusterctl generated).
    pub fn pin_host_key(&self, endpoint: Endpoint, key: PublicKey) {
        let mut known = self
            .inner
            .known_hosts
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        known.pin(endpoint, key);
    }

    /// Connects and authenticates to `target`, through its jump host if it has one (the jump
    /// host connection is made once and shared), retrying per [`ClientConfig::retry`].
    pub async fn connect(&self, target: &Target) -> Result<Session, SshError> {
        let jump = match &target.jump {
            Some(jump) => Some(Box::pin(self.jump_session(jump)).await?),
            None => None,
        };
        self.connect_with_retry(target, jump).await
    }

    /// Connects to `target` through an existing session to a jump host (the target's own `jump`
    /// field is ignored). The target's host key is verified like any other.
    pub async fn connect_via(&self, jump: &Session, target: &Target) -> Result<Session, SshError> {
        self.connect_with_retry(target, Some(jump.clone())).await
    }

    async fn jump_session(&self, jump: &Target) -> Result<Session, SshError> {
        // One slot per jump host: concurrent connects through the same bastion wait for a single
        // connection instead of each opening their own; different bastions do not block each other.
        let slot = {
            let mut slots = self
                .inner
                .jumps
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner());
            slots.entry(jump.clone()).or_default().clone()
        };
        let mut slot = slot.lock().await;
        if let Some(session) = slot.as_ref()
            && !session.is_closed()
        {
            return Ok(session.clone());
        }
        let session = self.connect(jump).await?;
        *slot = Some(session.clone());
        Ok(session)
    }

    async fn connect_with_retry(
        &self,
        target: &Target,
        jump: Option<Session>,
    ) -> Result<Session, SshError> {
        let policy = &self.inner.config.retry;
        let endpoint = &target.endpoint;
        let start = Instant::now();
        let mut delay = policy.initial_delay;
        let mut attempts = 0u32;
        loop {
            attempts += 1;
            tracing::debug!(node = %endpoint, attempt = attempts, "connecting over ssh");
            let error = match self.connect_once(target, jump.as_ref()).await {
                Ok(handle) => {
                    tracing::debug!(node = %endpoint, "ssh session established");
                    return Ok(Session::new(
                        handle,
                        endpoint.clone(),
                        target.user.clone(),
                        self.inner.config.command_timeout,
                        self.inner.config.max_channels_per_session,
                        jump,
                    ));
                }
                Err(AttemptError::Fatal(error)) => return Err(error),
                Err(error) => error,
            };
            let elapsed = start.elapsed();
            if elapsed + delay > policy.max_elapsed {
                return Err(self.final_error(endpoint, error, attempts, elapsed));
            }
            tracing::debug!(node = %endpoint, ?delay, "ssh connection attempt failed; retrying");
            tokio::time::sleep(jittered(delay)).await;
            delay = (delay * 2)
                .min(policy.max_delay)
                .max(Duration::from_millis(10));
        }
    }

    fn final_error(
        &self,
        endpoint: &Endpoint,
        error: AttemptError,
        attempts: u32,
        elapsed: Duration,
    ) -> SshError {
        match error {
            AttemptError::Fatal(error) => error,
            AttemptError::Tcp(source) => SshError::Connect {
                endpoint: endpoint.clone(),
                attempts,
                elapsed,
                source,
            },
            AttemptError::HandshakeTimeout => SshError::HandshakeTimeout {
                endpoint: endpoint.clone(),
                timeout: self.inner.config.connect_timeout,
                attempts,
            },
            AttemptError::Handshake(source) => SshError::Handshake {
                endpoint: endpoint.clone(),
                attempts,
                source: Box::new(source),
            },
            AttemptError::JumpForward { jump, source } => SshError::JumpForward {
                jump,
                target: endpoint.clone(),
                source: Box::new(source),
            },
        }
    }

    /// One attempt: TCP (or a tunnel through the jump host), handshake with host key check,
    /// authentication.
    async fn connect_once(
        &self,
        target: &Target,
        jump: Option<&Session>,
    ) -> Result<Handle<ClientHandler>, AttemptError> {
        let endpoint = &target.endpoint;
        let timeout = self.inner.config.connect_timeout;
        let config = Arc::new(self.russh_config(endpoint));
        let handler = ClientHandler {
            endpoint: endpoint.clone(),
            client: self.inner.clone(),
        };
        let handshake = match jump {
            None => {
                let tcp = tokio::time::timeout(
                    timeout,
                    TcpStream::connect((endpoint.host.as_str(), endpoint.port)),
                )
                .await
                .map_err(|_| {
                    AttemptError::Tcp(std::io::Error::new(
                        std::io::ErrorKind::TimedOut,
                        format!("tcp connect timed out after {timeout:?}"),
                    ))
                })?
                .map_err(AttemptError::Tcp)?;
                // Small command round trips matter more than packet count here.
                let _ = tcp.set_nodelay(true);
                tokio::time::timeout(timeout, client::connect_stream(config, tcp, handler)).await
            }
            Some(jump) => {
                let channel = jump
                    .handle()
                    .channel_open_direct_tcpip(
                        endpoint.host.clone(),
                        endpoint.port.into(),
                        "127.0.0.1",
                        0,
                    )
                    .await
                    .map_err(|source| {
                        if jump.is_closed() {
                            AttemptError::Fatal(SshError::ConnectionLost {
                                endpoint: jump.endpoint().clone(),
                                during: format!("opening a tunnel to {endpoint}"),
                            })
                        } else {
                            AttemptError::JumpForward {
                                jump: jump.endpoint().clone(),
                                source,
                            }
                        }
                    })?;
                tokio::time::timeout(
                    timeout,
                    client::connect_stream(config, channel.into_stream(), handler),
                )
                .await
            }
        };
        let mut handle = match handshake {
            Err(_elapsed) => return Err(AttemptError::HandshakeTimeout),
            Ok(Err(HandlerError::HostKey(error))) => return Err(AttemptError::Fatal(*error)),
            Ok(Err(HandlerError::Russh(error))) => {
                return Err(if retryable(&error) {
                    AttemptError::Handshake(error)
                } else {
                    AttemptError::Fatal(SshError::Handshake {
                        endpoint: endpoint.clone(),
                        attempts: 1,
                        source: Box::new(error),
                    })
                });
            }
            Ok(Ok(handle)) => handle,
        };
        match tokio::time::timeout(timeout, self.authenticate(&mut handle, target)).await {
            Err(_elapsed) => Err(AttemptError::HandshakeTimeout),
            Ok(Err(error)) => Err(AttemptError::Fatal(error)),
            Ok(Ok(())) => Ok(handle),
        }
    }

    fn russh_config(&self, endpoint: &Endpoint) -> client::Config {
        let known = self
            .inner
            .known_hosts
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .known_algorithms(endpoint);
        let mut preferred = Preferred::default();
        // Ask for a host key type we have on record first, as OpenSSH does; otherwise a host
        // known only by its RSA key would offer ed25519 and look "changed".
        if !known.is_empty() {
            let (mut first, rest): (Vec<Algorithm>, Vec<Algorithm>) = preferred
                .key
                .iter()
                .cloned()
                .partition(|a| known.iter().any(|k| same_family(k, a)));
            first.extend(rest);
            preferred.key = Cow::Owned(first);
        }
        // AES-GCM is hardware accelerated (aws-lc-rs) and the fastest for bulk uploads.
        preferred.cipher = Cow::Borrowed(&[
            cipher::AES_256_GCM,
            cipher::CHACHA20_POLY1305,
            cipher::AES_256_CTR,
            cipher::AES_192_CTR,
            cipher::AES_128_CTR,
        ]);
        client::Config {
            preferred,
            keepalive_interval: self.inner.config.keepalive_interval,
            keepalive_max: 3,
            nodelay: true,
            ..client::Config::default()
        }
    }

    async fn authenticate(
        &self,
        handle: &mut Handle<ClientHandler>,
        target: &Target,
    ) -> Result<(), SshError> {
        let endpoint = &target.endpoint;
        let user = target.user.as_str();
        let protocol = |source| SshError::Protocol {
            endpoint: endpoint.clone(),
            op: format!("authenticate as {user:?}"),
            source: Box::new(source),
        };
        match &self.inner.config.auth {
            Auth::Key(key) => {
                let hash = if key.public_key().algorithm().is_rsa() {
                    handle
                        .best_supported_rsa_hash()
                        .await
                        .map_err(protocol)?
                        .flatten()
                } else {
                    None
                };
                let result = handle
                    .authenticate_publickey(
                        user,
                        PrivateKeyWithHashAlg::new(key.private_key(), hash),
                    )
                    .await
                    .map_err(protocol)?;
                if result.success() {
                    Ok(())
                } else {
                    Err(SshError::AuthRejected {
                        endpoint: endpoint.clone(),
                        user: user.to_string(),
                        method: format!(
                            "key {} from {}",
                            key.fingerprint(),
                            key.source().display()
                        ),
                    })
                }
            }
            Auth::Agent { socket } => {
                let socket = match socket.clone() {
                    Some(socket) => socket,
                    None => std::env::var_os("SSH_AUTH_SOCK")
                        .filter(|s| !s.is_empty())
                        .map(PathBuf::from)
                        .ok_or_else(|| SshError::AgentUnavailable {
                            socket: None,
                            reason: "SSH_AUTH_SOCK is not set".to_string(),
                        })?,
                };
                let mut agent = AgentClient::connect_uds(&socket).await.map_err(|e| {
                    SshError::AgentUnavailable {
                        socket: Some(socket.clone()),
                        reason: e.to_string(),
                    }
                })?;
                if let Some(binding) = handle.agent_session_binding() {
                    // Lets OpenSSH agents apply destination constraints; other agents may not
                    // know the extension, which is fine.
                    if let Err(e) = agent.bind_session(binding, false).await {
                        tracing::debug!(error = %e, "ssh-agent did not accept session-bind");
                    }
                }
                let identities =
                    agent
                        .request_identities()
                        .await
                        .map_err(|source| SshError::Agent {
                            op: "listing its keys".to_string(),
                            source: Box::new(source),
                        })?;
                if identities.is_empty() {
                    return Err(SshError::AgentUnavailable {
                        socket: Some(socket),
                        reason: "the agent holds no keys (add one with ssh-add)".to_string(),
                    });
                }
                let count = identities.len();
                for identity in identities {
                    let key = identity.public_key().into_owned();
                    let hash = if key.algorithm().is_rsa() {
                        handle
                            .best_supported_rsa_hash()
                            .await
                            .map_err(protocol)?
                            .flatten()
                    } else {
                        None
                    };
                    match handle
                        .authenticate_publickey_with(user, key, hash, &mut agent)
                        .await
                    {
                        Ok(result) if result.success() => return Ok(()),
                        Ok(_) => {}
                        Err(e) => tracing::debug!(error = %e, "ssh-agent could not sign"),
                    }
                }
                Err(SshError::AuthRejected {
                    endpoint: endpoint.clone(),
                    user: user.to_string(),
                    method: format!("{count} ssh-agent key(s) from {}", socket.display()),
                })
            }
        }
    }

    /// Runs `command` on every target, at most `max_parallel` machines at a time, each over its
    /// own connection (closed afterwards). Returns one result per target, in the order given.
    /// A non-zero exit status is an `Ok` result: check [`ExecOutput::success`].
    pub async fn run_on_all(
        &self,
        targets: &[Target],
        command: &str,
        max_parallel: usize,
    ) -> Vec<HostResult<ExecOutput>> {
        let command: Arc<str> = Arc::from(command);
        self.for_each_host(targets, max_parallel, move |session| {
            let command = command.clone();
            async move { session.exec(&command).await }
        })
        .await
    }

    /// Connects to every target, at most `max_parallel` at a time, and runs `work` with the
    /// session; the session is closed afterwards. Returns one result per target, in the order
    /// given (connection errors included).
    pub async fn for_each_host<T, F, Fut>(
        &self,
        targets: &[Target],
        max_parallel: usize,
        work: F,
    ) -> Vec<HostResult<T>>
    where
        T: Send + 'static,
        F: Fn(Session) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<T, SshError>> + Send + 'static,
    {
        let limit = Arc::new(Semaphore::new(max_parallel.max(1)));
        let work = Arc::new(work);
        let mut tasks = JoinSet::new();
        for (index, target) in targets.iter().enumerate() {
            let client = self.clone();
            let target = target.clone();
            let limit = limit.clone();
            let work = work.clone();
            tasks.spawn(async move {
                let result = async {
                    let _permit = limit
                        .acquire_owned()
                        .await
                        .map_err(|_| SshError::Internal {
                            endpoint: target.endpoint.clone(),
                            op: "waiting for a parallelism slot".to_string(),
                            detail: "semaphore closed".to_string(),
                        })?;
                    let session = client.connect(&target).await?;
                    let result = (*work)(session.clone()).await;
                    session.close().await;
                    result
                }
                .await;
                (index, result)
            });
        }
        let mut results: Vec<Option<Result<T, SshError>>> = targets.iter().map(|_| None).collect();
        while let Some(joined) = tasks.join_next().await {
            match joined {
                Ok((index, result)) => {
                    if let Some(slot) = results.get_mut(index) {
                        *slot = Some(result);
                    }
                }
                Err(join_error) => tracing::error!(error = %join_error, "ssh worker task failed"),
            }
        }
        targets
            .iter()
            .zip(results)
            .map(|(target, result)| HostResult {
                target: target.clone(),
                result: result.unwrap_or_else(|| {
                    Err(SshError::Internal {
                        endpoint: target.endpoint.clone(),
                        op: "running work on the host".to_string(),
                        detail: "the worker task panicked or was cancelled".to_string(),
                    })
                }),
            })
            .collect()
    }
}

fn same_family(a: &Algorithm, b: &Algorithm) -> bool {
    matches!((a, b), (Algorithm::Rsa { .. }, Algorithm::Rsa { .. })) || a == b
}

/// Whether a handshake error is worth another attempt (sshd starting up, connection reset).
fn retryable(error: &russh::Error) -> bool {
    matches!(
        error,
        russh::Error::IO(_)
            | russh::Error::Disconnect
            | russh::Error::HUP
            | russh::Error::ConnectionTimeout
            | russh::Error::SendError
            | russh::Error::RecvError
    )
}

/// The delay plus up to 20% random jitter, so that many machines do not retry in lockstep.
fn jittered(delay: Duration) -> Duration {
    let jitter = rand::random_range(0.0..0.2);
    delay.mul_f64(1.0 + jitter)
}

/// russh's event handler for one connection: verifies the server's host key.
pub(crate) struct ClientHandler {
    endpoint: Endpoint,
    client: Arc<ClientInner>,
}

/// The handler's error: a russh error, or our own host key verdict carried out of the handshake.
#[derive(Debug)]
pub(crate) enum HandlerError {
    Russh(russh::Error),
    HostKey(Box<SshError>),
}

impl From<russh::Error> for HandlerError {
    fn from(error: russh::Error) -> Self {
        HandlerError::Russh(error)
    }
}

impl client::Handler for ClientHandler {
    type Error = HandlerError;

    async fn check_server_key(
        &mut self,
        server_public_key: &PublicKeyOrCertificate,
    ) -> Result<bool, Self::Error> {
        let key = match server_public_key {
            PublicKeyOrCertificate::PublicKey { key, .. } => key.clone(),
            // Certificates are not requested (no host certificate algorithms are advertised);
            // should one arrive anyway, only its key counts, checked like a plain key.
            PublicKeyOrCertificate::Certificate(cert) => PublicKey::from(cert.public_key().clone()),
        };
        let verdict = self
            .client
            .known_hosts
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .verify(&self.endpoint, &key);
        match verdict {
            Ok(()) => {
                tracing::debug!(node = %self.endpoint, fingerprint = %super::keys::fingerprint(&key), "host key verified");
                Ok(true)
            }
            Err(error) => Err(HandlerError::HostKey(Box::new(error))),
        }
    }
}
