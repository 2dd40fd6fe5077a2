//! The transport: every HTTP connection to the API server is an SSH `direct-tcpip` channel over
//! the cluster's one pinned SSH connection (jump host honoured), with TLS on top, verified
//! against the cluster CA and authenticated with the admin client certificate.
//!
//! hyper asks [`Tunnel`] for a connection whenever its pool has none free; the tunnel opens a
//! channel on the shared SSH session (connecting it first, or again after it was lost) and does
//! the TLS handshake. The request's URI host is never resolved: the channel goes to the API
//! server address as the SSH server sees it, and TLS checks the certificate for
//! [`super::API_SERVER_NAME`], a name every API server certificate of ours carries.

use std::fmt;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};

use hyper::Uri;
use hyper_util::client::legacy::connect::{Connected, Connection};
use hyper_util::rt::TokioIo;
use russh::ChannelStream;
use russh::client::Msg;
use rustls::pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;

use crate::ssh::{Endpoint, Session, SshClient, SshError, Target};

/// Why a connection to the API server could not be made, reduced to what decides the next
/// step, with the full explanation as text (the underlying errors are not `Clone`, and hyper
/// hands this error back only by reference inside its own).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{detail}")]
pub struct TunnelError {
    /// What went wrong.
    pub kind: TunnelFailure,
    /// The explanation, with its causes and what to do.
    pub detail: String,
}

/// The kinds of [`TunnelError`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TunnelFailure {
    /// The SSH connection could not be made or broke, in a way that another attempt may mend
    /// (machine booting, connection reset).
    SshTransient,
    /// The SSH connection was refused for good: host key mismatch, authentication rejected.
    SshFatal,
    /// The SSH server could not connect to the API server address: nothing listens there (yet).
    Refused,
    /// The SSH server forbids TCP forwarding (`AllowTcpForwarding`/`PermitOpen`).
    Prohibited,
    /// The API server's certificate does not verify against the cluster CA.
    ServerCertificate,
    /// The API server ended the TLS handshake with an alert (it refused our client certificate).
    HandshakeRejected,
    /// The connection broke during the TLS handshake (API server starting or restarting).
    HandshakeIo,
}

impl TunnelFailure {
    /// Whether another attempt later may succeed.
    pub fn is_transient(self) -> bool {
        matches!(
            self,
            TunnelFailure::SshTransient | TunnelFailure::Refused | TunnelFailure::HandshakeIo
        )
    }
}

/// Opens connections to the API server through SSH (a tower `Service<Uri>` for hyper's client).
/// Cheap to clone; clones share the SSH session.
#[derive(Clone)]
pub(crate) struct Tunnel {
    inner: Arc<TunnelInner>,
}

struct TunnelInner {
    ssh: SshClient,
    via: Target,
    api: Endpoint,
    tls: TlsConnector,
    server_name: ServerName<'static>,
    session: tokio::sync::Mutex<Option<Session>>,
    opened: AtomicU64,
    sessions: AtomicU64,
}

impl fmt::Debug for Tunnel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Tunnel")
            .field("via", &self.inner.via)
            .field("api", &self.inner.api)
            .finish_non_exhaustive()
    }
}

impl Tunnel {
    pub(crate) fn new(
        ssh: SshClient,
        via: Target,
        api: Endpoint,
        tls: Arc<rustls::ClientConfig>,
        server_name: ServerName<'static>,
    ) -> Self {
        Tunnel {
            inner: Arc::new(TunnelInner {
                ssh,
                via,
                api,
                tls: TlsConnector::from(tls),
                server_name,
                session: tokio::sync::Mutex::new(None),
                opened: AtomicU64::new(0),
                sessions: AtomicU64::new(0),
            }),
        }
    }

    /// The SSH target the tunnels go through.
    pub(crate) fn via(&self) -> &Target {
        &self.inner.via
    }

    /// The API server address as the SSH server sees it.
    pub(crate) fn api(&self) -> &Endpoint {
        &self.inner.api
    }

    /// Channels opened so far (one per HTTP connection).
    pub(crate) fn channels_opened(&self) -> u64 {
        self.inner.opened.load(Ordering::Relaxed)
    }

    /// SSH connections made so far (1 unless one was lost).
    pub(crate) fn ssh_connections(&self) -> u64 {
        self.inner.sessions.load(Ordering::Relaxed)
    }

    /// Closes the SSH connection (open HTTP connections break; the next request reconnects).
    pub(crate) async fn close(&self) {
        if let Some(session) = self.inner.session.lock().await.take() {
            session.close().await;
        }
    }

    async fn session(&self) -> Result<Session, TunnelError> {
        let mut slot = self.inner.session.lock().await;
        if let Some(session) = slot.as_ref()
            && !session.is_closed()
        {
            return Ok(session.clone());
        }
        let session = self
            .inner
            .ssh
            .connect(&self.inner.via)
            .await
            .map_err(|e| ssh_failure(&self.inner.via, &self.inner.api, e))?;
        self.inner.sessions.fetch_add(1, Ordering::Relaxed);
        *slot = Some(session.clone());
        Ok(session)
    }

    async fn open(&self) -> Result<TunnelStream, TunnelError> {
        let session = self.session().await?;
        let api = &self.inner.api;
        let channel = match session.open_tunnel(api).await {
            Ok(channel) => channel,
            Err(error) => {
                if session.is_closed() {
                    // Forget the broken connection: the next attempt reconnects.
                    let mut slot = self.inner.session.lock().await;
                    if slot.as_ref().is_some_and(Session::is_closed) {
                        *slot = None;
                    }
                }
                return Err(ssh_failure(&self.inner.via, api, error));
            }
        };
        self.inner.opened.fetch_add(1, Ordering::Relaxed);
        tracing::debug!(node = %self.inner.via.endpoint, api = %api, "tunnel to the API server opened");
        let tls = self
            .inner
            .tls
            .connect(self.inner.server_name.clone(), channel)
            .await
            .map_err(|e| tls_failure(&self.inner.via, api, &self.inner.server_name, &e))?;
        Ok(TunnelStream(tls))
    }
}

impl tower::Service<Uri> for Tunnel {
    type Response = TokioIo<TunnelStream>;
    type Error = TunnelError;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _uri: Uri) -> Self::Future {
        // The URI's host is deliberately ignored: the only way to the API server is the tunnel.
        let tunnel = self.clone();
        Box::pin(async move { tunnel.open().await.map(TokioIo::new) })
    }
}

fn ssh_failure(via: &Target, api: &Endpoint, error: SshError) -> TunnelError {
    let kind = match &error {
        SshError::Tunnel { source, .. } => match **source {
            russh::Error::ChannelOpenFailure(russh::ChannelOpenFailure::ConnectFailed) => {
                TunnelFailure::Refused
            }
            russh::Error::ChannelOpenFailure(
                russh::ChannelOpenFailure::AdministrativelyProhibited,
            ) => TunnelFailure::Prohibited,
            _ => TunnelFailure::SshTransient,
        },
        e if e.is_transient() => TunnelFailure::SshTransient,
        _ => TunnelFailure::SshFatal,
    };
    let chain = super::chain(&error);
    let detail = match kind {
        TunnelFailure::Refused => format!(
            "nothing accepts connections at {api} as seen from {} (the API server is not \
             listening yet): {chain}",
            via.endpoint
        ),
        TunnelFailure::Prohibited => format!(
            "the SSH server {} forbids TCP forwarding to {api}: {chain}; allow it \
             (`AllowTcpForwarding yes` in its sshd_config)",
            via.endpoint
        ),
        _ => format!("cannot reach the API server through SSH ({via}): {chain}"),
    };
    TunnelError { kind, detail }
}

fn tls_failure(
    via: &Target,
    api: &Endpoint,
    name: &ServerName<'static>,
    error: &io::Error,
) -> TunnelError {
    let rustls_error = error
        .get_ref()
        .and_then(|inner| inner.downcast_ref::<rustls::Error>());
    let name = name.to_str();
    match rustls_error {
        Some(e @ rustls::Error::InvalidCertificate(_)) => TunnelError {
            kind: TunnelFailure::ServerCertificate,
            detail: format!(
                "the API server at {api} (through {}) presented a certificate that the \
                 cluster CA does not vouch for as {name:?}: {e}; the cluster's state and the \
                 control plane's PKI differ (was the state restored from another cluster?)",
                via.endpoint
            ),
        },
        Some(e @ rustls::Error::AlertReceived(_)) => TunnelError {
            kind: TunnelFailure::HandshakeRejected,
            detail: format!(
                "the API server at {api} (through {}) ended the TLS handshake: {e}; it does not \
                 accept the admin client certificate",
                via.endpoint
            ),
        },
        Some(e) => TunnelError {
            kind: TunnelFailure::ServerCertificate,
            detail: format!(
                "TLS with the API server at {api} (through {}) failed: {e}",
                via.endpoint
            ),
        },
        None => TunnelError {
            kind: TunnelFailure::HandshakeIo,
            detail: format!(
                "the connection to the API server at {api} (through {}) broke during the TLS \
                 handshake: {error}",
                via.endpoint
            ),
        },
    }
}

/// One connection to the API server: TLS over an SSH channel.
pub(crate) struct TunnelStream(TlsStream<ChannelStream<Msg>>);

impl Connection for TunnelStream {
    fn connected(&self) -> Connected {
        Connected::new()
    }
}

impl AsyncRead for TunnelStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl AsyncWrite for TunnelStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.0).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_shutdown(cx)
    }
}
