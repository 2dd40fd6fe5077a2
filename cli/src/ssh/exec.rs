//! Sessions and running commands.

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use russh::client::{Handle, Msg};
use russh::{Channel, ChannelMsg, ChannelStream, Disconnect, Sig};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use super::client::ClientHandler;
use super::{Endpoint, SshError};

/// How long a session channel refused by sshd's `MaxSessions` is retried.
const SESSION_OPEN_PATIENCE: Duration = Duration::from_secs(5);

/// An authenticated connection to one machine. Cheap to clone; clones share the connection.
///
/// Each command runs on its own channel, so one session serves many commands, also
/// concurrently from several tasks. The connection closes when the last clone is dropped or
/// on [`Session::close`].
#[derive(Clone)]
pub struct Session {
    inner: Arc<SessionInner>,
}

struct SessionInner {
    handle: Handle<ClientHandler>,
    endpoint: Endpoint,
    user: String,
    command_timeout: Option<Duration>,
    /// Bounds concurrent channels (see `ClientConfig::max_channels_per_session`).
    channels: Arc<Semaphore>,
    /// Keeps the jump host connection alive as long as this session uses it.
    _jump: Option<Session>,
    /// Commands started on this connection (see [`Session::exec_count`]).
    execs: AtomicU64,
    /// SFTP sessions started on this connection (see [`Session::sftp_count`]).
    sftp_sessions: AtomicU64,
}

impl fmt::Debug for Session {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Session")
            .field("endpoint", &self.inner.endpoint)
            .field("user", &self.inner.user)
            .field("closed", &self.is_closed())
            .finish_non_exhaustive()
    }
}

/// Which output stream a line came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutputStream {
    /// Standard output.
    Stdout,
    /// Standard error.
    Stderr,
}

/// One line of a command's output, passed to [`ExecOptions::on_line`] as it arrives.
#[derive(Debug, Clone, Copy)]
pub struct OutputLine<'a> {
    /// The stream.
    pub stream: OutputStream,
    /// The line without its newline (invalid UTF-8 replaced). Very long lines arrive in pieces.
    pub line: &'a str,
}

/// Options of one command run.
#[derive(Default)]
pub struct ExecOptions<'a> {
    /// Timeout for this command; `None` uses the client's
    /// [`command_timeout`](super::ClientConfig::command_timeout).
    pub timeout: Option<Duration>,
    /// Bytes written to the command's stdin (then stdin is closed). `None`: stdin is closed at once.
    pub stdin: Option<&'a [u8]>,
    /// Called with each output line as it arrives (for progress display).
    pub on_line: Option<&'a mut (dyn FnMut(OutputLine<'_>) + Send)>,
    /// At most this many bytes of each stream are kept in [`ExecOutput`] (the rest is still
    /// streamed to `on_line`); `None` means 64 MiB.
    pub max_capture: Option<usize>,
}

const DEFAULT_MAX_CAPTURE: usize = 64 << 20;
/// Longest line passed to `on_line` in one piece.
const MAX_LINE: usize = 64 << 10;

/// What a command did.
#[derive(Debug, Clone)]
pub struct ExecOutput {
    /// The machine it ran on.
    pub endpoint: Endpoint,
    /// The command line.
    pub command: String,
    /// The exit status, if the command exited normally.
    pub exit_status: Option<u32>,
    /// The signal that killed the command (e.g. `KILL`), if it was killed by one.
    pub exit_signal: Option<String>,
    /// Captured standard output.
    pub stdout: Vec<u8>,
    /// Captured standard error.
    pub stderr: Vec<u8>,
    /// Whether output beyond [`ExecOptions::max_capture`] was dropped.
    pub truncated: bool,
}

impl ExecOutput {
    /// Whether the command exited with status 0.
    pub fn success(&self) -> bool {
        self.exit_status == Some(0)
    }

    /// Standard output as text (invalid UTF-8 replaced).
    pub fn stdout_text(&self) -> String {
        String::from_utf8_lossy(&self.stdout).into_owned()
    }

    /// Standard error as text (invalid UTF-8 replaced).
    pub fn stderr_text(&self) -> String {
        String::from_utf8_lossy(&self.stderr).into_owned()
    }

    /// `Ok(self)` if the command succeeded, otherwise [`SshError::CommandFailed`] with the exit
    /// status or signal and the last lines of stderr.
    pub fn check(self) -> Result<Self, SshError> {
        if self.success() {
            return Ok(self);
        }
        let status = match (&self.exit_status, &self.exit_signal) {
            (Some(code), _) => format!("exit status {code}"),
            (None, Some(signal)) => format!("signal {signal}"),
            (None, None) => "no exit status".to_string(),
        };
        Err(SshError::CommandFailed {
            endpoint: self.endpoint,
            command: self.command,
            status,
            stderr: tail_lines(&String::from_utf8_lossy(&self.stderr), 10, 2000),
        })
    }
}

/// The last `lines` lines of `text`, at most `max_chars` characters.
fn tail_lines(text: &str, lines: usize, max_chars: usize) -> String {
    let all: Vec<&str> = text.trim_end().lines().collect();
    let tail = all[all.len().saturating_sub(lines)..].join("\n");
    let count = tail.chars().count();
    if count > max_chars {
        tail.chars().skip(count - max_chars).collect()
    } else {
        tail
    }
}

impl Session {
    pub(crate) fn new(
        handle: Handle<ClientHandler>,
        endpoint: Endpoint,
        user: String,
        command_timeout: Option<Duration>,
        max_channels: usize,
        jump: Option<Session>,
    ) -> Self {
        Session {
            inner: Arc::new(SessionInner {
                handle,
                endpoint,
                user,
                command_timeout,
                channels: Arc::new(Semaphore::new(max_channels.max(1))),
                _jump: jump,
                execs: AtomicU64::new(0),
                sftp_sessions: AtomicU64::new(0),
            }),
        }
    }

    pub(crate) fn handle(&self) -> &Handle<ClientHandler> {
        &self.inner.handle
    }

    /// The server's address.
    pub fn endpoint(&self) -> &Endpoint {
        &self.inner.endpoint
    }

    /// The remote user.
    pub fn user(&self) -> &str {
        &self.inner.user
    }

    /// How many commands this connection has started so far: every [`Session::exec_with`] and
    /// what is built on it (the checks and finishing steps of uploads), not the kill of a timed-out
    /// command. Each one makes sshd start the login shell on the machine, which is what a remote
    /// step costs on a slow machine (about half a second on an emulated one): tests and
    /// benchmarks count them.
    pub fn exec_count(&self) -> u64 {
        self.inner.execs.load(Ordering::Relaxed)
    }

    /// How many SFTP sessions this connection has started so far (each one a channel and an
    /// `sftp-server` process on the machine).
    pub fn sftp_count(&self) -> u64 {
        self.inner.sftp_sessions.load(Ordering::Relaxed)
    }

    /// Counts an SFTP session (see [`Session::sftp_count`]).
    pub(super) fn count_sftp(&self) {
        self.inner.sftp_sessions.fetch_add(1, Ordering::Relaxed);
    }

    /// Whether the connection has ended (closed, lost, or failed keepalives).
    pub fn is_closed(&self) -> bool {
        self.inner.handle.is_closed()
    }

    /// Opens a TCP connection from the server to `to` over this connection (an SSH
    /// `direct-tcpip` channel, as `ssh -L` uses) and returns it as a byte stream. Many tunnels
    /// share the one connection; they do not count against the command slots (OpenSSH's
    /// `MaxSessions` does not cover them).
    pub async fn open_tunnel(&self, to: &Endpoint) -> Result<ChannelStream<Msg>, SshError> {
        let channel = self
            .inner
            .handle
            .channel_open_direct_tcpip(to.host.clone(), to.port.into(), "127.0.0.1", 0)
            .await
            .map_err(|source| {
                if self.is_closed() {
                    SshError::ConnectionLost {
                        endpoint: self.endpoint().clone(),
                        during: format!("opening a tunnel to {to}"),
                    }
                } else {
                    SshError::Tunnel {
                        endpoint: self.endpoint().clone(),
                        to: to.clone(),
                        source: Box::new(source),
                    }
                }
            })?;
        Ok(channel.into_stream())
    }

    /// Closes the connection for all clones of this session. Commands still running fail with
    /// [`SshError::ConnectionLost`].
    pub async fn close(&self) {
        let _ = self
            .inner
            .handle
            .disconnect(Disconnect::ByApplication, "", "en")
            .await;
    }

    /// Runs `command` (through the remote user's shell) with the default options. A non-zero
    /// exit status is not an error here: see [`ExecOutput::success`] and [`ExecOutput::check`],
    /// or use [`Session::run`].
    pub async fn exec(&self, command: &str) -> Result<ExecOutput, SshError> {
        self.exec_with(command, ExecOptions::default()).await
    }

    /// Runs `command` and fails unless it exits with status 0.
    pub async fn run(&self, command: &str) -> Result<ExecOutput, SshError> {
        self.exec(command).await?.check()
    }

    /// Runs `command` with options: timeout, stdin, line streaming, capture limit.
    ///
    /// The command runs through the remote user's login shell, which must be POSIX-compatible:
    /// it is prefixed with a line that reports the shell's PID (taken off stdout again). On
    /// timeout the command's whole process group gets SIGKILL (over a second channel), its
    /// channel is closed and [`SshError::CommandTimeout`] names the command and host; the
    /// connection stays usable. If the connection breaks meanwhile, the error is
    /// [`SshError::ConnectionLost`].
    pub async fn exec_with(
        &self,
        command: &str,
        options: ExecOptions<'_>,
    ) -> Result<ExecOutput, SshError> {
        let endpoint = &self.inner.endpoint;
        tracing::debug!(node = %endpoint, command, "running remote command");
        let _slot = self.channel_slot(command).await?;
        let mut channel = self.open_session_channel(command).await?;
        // The remote shell first reports its PID, which is also its process group (sshd starts
        // each session with setsid); a timeout then kills the whole group. OpenSSH ignores the
        // SSH "signal" request for root logins, so that alone cannot stop a command.
        let wrapped = format!("printf '{PID_MARKER}%s\\n' \"$$\"\n{command}");
        self.inner.execs.fetch_add(1, Ordering::Relaxed);
        channel
            .exec(true, wrapped)
            .await
            .map_err(|source| self.channel_error(source, command, "start"))?;
        if let Some(stdin) = options.stdin {
            channel
                .data(stdin)
                .await
                .map_err(|source| self.channel_error(source, command, "send stdin to"))?;
        }
        channel
            .eof()
            .await
            .map_err(|source| self.channel_error(source, command, "close stdin of"))?;

        let timeout = options.timeout.or(self.inner.command_timeout);
        let mut collector = Collector {
            stdout: Vec::new(),
            stderr: Vec::new(),
            max_capture: options.max_capture.unwrap_or(DEFAULT_MAX_CAPTURE),
            truncated: false,
            on_line: options.on_line,
            stdout_line: Vec::new(),
            stderr_line: Vec::new(),
            pid: PidState::Awaiting(Vec::new()),
        };
        let ended = match timeout {
            Some(limit) => {
                match tokio::time::timeout(limit, collector.collect(&mut channel)).await {
                    Ok(ended) => ended,
                    Err(_elapsed) => {
                        tracing::warn!(node = %endpoint, command, ?limit, "remote command timed out; killing it");
                        if let PidState::Known(pid) = collector.pid {
                            self.kill_process_group(pid).await;
                        }
                        // Also the protocol's way (works for non-root users), then drop the channel.
                        let _ = channel.signal(Sig::KILL).await;
                        let _ = channel.close().await;
                        return Err(SshError::CommandTimeout {
                            endpoint: endpoint.clone(),
                            command: command.to_string(),
                            timeout: limit,
                        });
                    }
                }
            }
            None => collector.collect(&mut channel).await,
        };
        collector.finish_pid();
        collector.flush_lines();
        let Ended {
            exit_status,
            exit_signal,
            closed_cleanly,
        } = ended;
        if exit_status.is_none() && exit_signal.is_none() {
            return Err(if closed_cleanly && !self.is_closed() {
                SshError::NoExitStatus {
                    endpoint: endpoint.clone(),
                    command: command.to_string(),
                }
            } else {
                SshError::ConnectionLost {
                    endpoint: endpoint.clone(),
                    during: format!("running {command:?}"),
                }
            });
        }
        Ok(ExecOutput {
            endpoint: endpoint.clone(),
            command: command.to_string(),
            exit_status,
            exit_signal,
            stdout: collector.stdout,
            stderr: collector.stderr,
            truncated: collector.truncated,
        })
    }

    /// Waits for a free channel slot on this session.
    pub(crate) async fn channel_slot(&self, what: &str) -> Result<OwnedSemaphorePermit, SshError> {
        self.inner
            .channels
            .clone()
            .acquire_owned()
            .await
            .map_err(|_| SshError::Internal {
                endpoint: self.inner.endpoint.clone(),
                op: format!("waiting for a channel for {what:?}"),
                detail: "channel limiter closed".to_string(),
            })
    }

    /// Kills the remote process group `pgid` (best effort, bounded in time) over a new channel.
    async fn kill_process_group(&self, pgid: u32) {
        let kill = async {
            let mut channel = self.inner.handle.channel_open_session().await.ok()?;
            channel
                .exec(true, format!("kill -KILL -- -{pgid} 2>/dev/null; true"))
                .await
                .ok()?;
            let _ = channel.eof().await;
            while let Some(message) = channel.wait().await {
                if matches!(message, ChannelMsg::Close) {
                    break;
                }
            }
            Some(())
        };
        if tokio::time::timeout(Duration::from_secs(5), kill)
            .await
            .is_err()
        {
            tracing::warn!(node = %self.inner.endpoint, pgid, "could not kill timed-out remote command");
        }
    }

    /// Opens a session channel, mapping a dead connection to [`SshError::ConnectionLost`].
    ///
    /// OpenSSH answers "connect failed" when the connection already has `MaxSessions` sessions.
    /// Our own limiter stays below that, but sshd frees a closed session only at its next
    /// garbage collection, after the input batch that also holds our next open request (a test
    /// saw the 11th of 16 queued commands refused), so a refusal is retried for a few seconds
    /// before it is an error.
    pub(crate) async fn open_session_channel(&self, what: &str) -> Result<Channel<Msg>, SshError> {
        let deadline = tokio::time::Instant::now() + SESSION_OPEN_PATIENCE;
        let mut delay = Duration::from_millis(20);
        loop {
            match self.inner.handle.channel_open_session().await {
                Err(russh::Error::ChannelOpenFailure(russh::ChannelOpenFailure::ConnectFailed))
                    if tokio::time::Instant::now() < deadline && !self.is_closed() =>
                {
                    tracing::debug!(node = %self.inner.endpoint, what, "sshd refused a session channel (MaxSessions); retrying");
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(Duration::from_millis(500));
                }
                result => return self.session_channel_result(result, what),
            }
        }
    }

    fn session_channel_result(
        &self,
        result: Result<Channel<Msg>, russh::Error>,
        what: &str,
    ) -> Result<Channel<Msg>, SshError> {
        result.map_err(|source| {
            if self.is_closed() {
                SshError::ConnectionLost {
                    endpoint: self.inner.endpoint.clone(),
                    during: format!("starting {what:?}"),
                }
            } else {
                SshError::Protocol {
                    endpoint: self.inner.endpoint.clone(),
                    op: format!("open a session channel for {what:?}"),
                    source: Box::new(source),
                }
            }
        })
    }

    fn channel_error(&self, source: russh::Error, command: &str, verb: &str) -> SshError {
        if self.is_closed() {
            SshError::ConnectionLost {
                endpoint: self.inner.endpoint.clone(),
                during: format!("running {command:?}"),
            }
        } else {
            SshError::Protocol {
                endpoint: self.inner.endpoint.clone(),
                op: format!("{verb} command {command:?}"),
                source: Box::new(source),
            }
        }
    }
}

struct Ended {
    exit_status: Option<u32>,
    exit_signal: Option<String>,
    /// The server closed the channel (as opposed to the connection going away).
    closed_cleanly: bool,
}

/// Prefix of the line with which the remote shell reports its PID before running the command.
const PID_MARKER: &str = "clusterctl-pid:";

/// Where we are in reading the PID line that precedes the command's own stdout.
enum PidState {
    /// Bytes of the first stdout line received so far.
    Awaiting(Vec<u8>),
    /// The remote shell's PID (= process group).
    Known(u32),
    /// The first line was not a PID line (a login script printed something); no PID.
    Unknown,
}

struct Collector<'a> {
    stdout: Vec<u8>,
    stderr: Vec<u8>,
    max_capture: usize,
    truncated: bool,
    on_line: Option<&'a mut (dyn FnMut(OutputLine<'_>) + Send)>,
    stdout_line: Vec<u8>,
    stderr_line: Vec<u8>,
    pid: PidState,
}

impl Collector<'_> {
    /// Takes the PID line off the front of stdout; passes everything else to [`Self::push`].
    fn push_stdout(&mut self, data: &[u8]) {
        let PidState::Awaiting(buffer) = &mut self.pid else {
            self.push(OutputStream::Stdout, data);
            return;
        };
        buffer.extend_from_slice(data);
        let Some(newline) = buffer.iter().position(|&b| b == b'\n') else {
            if buffer.len() > 64
                || !PID_MARKER
                    .as_bytes()
                    .starts_with(&buffer[..buffer.len().min(PID_MARKER.len())])
            {
                let pending = std::mem::take(buffer);
                self.pid = PidState::Unknown;
                self.push(OutputStream::Stdout, &pending);
            }
            return;
        };
        let line = &buffer[..newline];
        let pid = std::str::from_utf8(line)
            .ok()
            .and_then(|l| l.strip_prefix(PID_MARKER))
            .and_then(|p| p.trim().parse::<u32>().ok());
        let rest = match pid {
            Some(pid) => {
                let rest = buffer[newline + 1..].to_vec();
                self.pid = PidState::Known(pid);
                rest
            }
            None => {
                let all = std::mem::take(buffer);
                self.pid = PidState::Unknown;
                all
            }
        };
        if !rest.is_empty() {
            self.push(OutputStream::Stdout, &rest);
        }
    }

    /// At the end of the command: bytes still held back waiting for a PID line are output.
    fn finish_pid(&mut self) {
        if let PidState::Awaiting(buffer) = &mut self.pid {
            let pending = std::mem::take(buffer);
            self.pid = PidState::Unknown;
            if !pending.is_empty() {
                self.push(OutputStream::Stdout, &pending);
            }
        }
    }

    async fn collect(&mut self, channel: &mut Channel<Msg>) -> Ended {
        let mut ended = Ended {
            exit_status: None,
            exit_signal: None,
            closed_cleanly: false,
        };
        loop {
            match channel.wait().await {
                Some(ChannelMsg::Data { data }) => self.push_stdout(&data),
                Some(ChannelMsg::ExtendedData { data, ext: 1 }) => {
                    self.push(OutputStream::Stderr, &data)
                }
                Some(ChannelMsg::ExitStatus { exit_status }) => {
                    ended.exit_status = Some(exit_status)
                }
                Some(ChannelMsg::ExitSignal { signal_name, .. }) => {
                    ended.exit_signal = Some(signal_name_text(&signal_name))
                }
                Some(ChannelMsg::Close) => {
                    ended.closed_cleanly = true;
                    break;
                }
                Some(_) => {}
                None => break,
            }
        }
        ended
    }

    fn push(&mut self, stream: OutputStream, data: &[u8]) {
        let (captured, line) = match stream {
            OutputStream::Stdout => (&mut self.stdout, &mut self.stdout_line),
            OutputStream::Stderr => (&mut self.stderr, &mut self.stderr_line),
        };
        let room = self.max_capture.saturating_sub(captured.len());
        if data.len() > room {
            self.truncated = true;
        }
        captured.extend_from_slice(&data[..data.len().min(room)]);
        let Some(on_line) = self.on_line.as_deref_mut() else {
            return;
        };
        for &byte in data {
            if byte == b'\n' {
                emit(on_line, stream, line);
            } else {
                line.push(byte);
                if line.len() >= MAX_LINE {
                    emit(on_line, stream, line);
                }
            }
        }
    }

    fn flush_lines(&mut self) {
        if let Some(on_line) = self.on_line.as_deref_mut() {
            if !self.stdout_line.is_empty() {
                emit(on_line, OutputStream::Stdout, &mut self.stdout_line);
            }
            if !self.stderr_line.is_empty() {
                emit(on_line, OutputStream::Stderr, &mut self.stderr_line);
            }
        }
    }
}

fn emit(
    on_line: &mut (dyn FnMut(OutputLine<'_>) + Send),
    stream: OutputStream,
    line: &mut Vec<u8>,
) {
    if line.last() == Some(&b'\r') {
        line.pop();
    }
    let text = String::from_utf8_lossy(line);
    on_line(OutputLine {
        stream,
        line: &text,
    });
    line.clear();
}

fn signal_name_text(signal: &Sig) -> String {
    match signal {
        Sig::ABRT => "ABRT".to_string(),
        Sig::ALRM => "ALRM".to_string(),
        Sig::FPE => "FPE".to_string(),
        Sig::HUP => "HUP".to_string(),
        Sig::ILL => "ILL".to_string(),
        Sig::INT => "INT".to_string(),
        Sig::KILL => "KILL".to_string(),
        Sig::PIPE => "PIPE".to_string(),
        Sig::QUIT => "QUIT".to_string(),
        Sig::SEGV => "SEGV".to_string(),
        Sig::TERM => "TERM".to_string(),
        Sig::USR1 => "USR1".to_string(),
        Sig::Custom(name) => name.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn collector<'a>() -> Collector<'a> {
        Collector {
            stdout: Vec::new(),
            stderr: Vec::new(),
            max_capture: 1 << 20,
            truncated: false,
            on_line: None,
            stdout_line: Vec::new(),
            stderr_line: Vec::new(),
            pid: PidState::Awaiting(Vec::new()),
        }
    }

    #[test]
    fn pid_line_is_taken_off_stdout_across_chunks() {
        let mut c = collector();
        c.push_stdout(b"clusterctl-");
        c.push_stdout(b"pid:4242\nhello");
        c.push_stdout(b" world\n");
        c.finish_pid();
        assert!(matches!(c.pid, PidState::Known(4242)));
        assert_eq!(c.stdout, b"hello world\n");
    }

    #[test]
    fn output_without_pid_line_is_kept() {
        let mut c = collector();
        c.push_stdout(b"motd from .bashrc\nreal output\n");
        c.finish_pid();
        assert!(matches!(c.pid, PidState::Unknown));
        assert_eq!(c.stdout, b"motd from .bashrc\nreal output\n");
        let mut c = collector();
        c.push_stdout(b"clust");
        c.finish_pid();
        assert_eq!(c.stdout, b"clust");
    }

    #[test]
    fn tail_keeps_the_last_lines() {
        let text = (1..=20)
            .map(|i| format!("line {i}"))
            .collect::<Vec<_>>()
            .join("\n");
        let tail = tail_lines(&text, 3, 1000);
        assert_eq!(tail, "line 18\nline 19\nline 20");
        assert_eq!(tail_lines("abcdef", 3, 3), "def");
    }

    #[test]
    fn lines_are_split_and_capture_is_bounded() {
        let mut seen = Vec::new();
        let mut on_line = |l: OutputLine<'_>| seen.push((l.stream, l.line.to_string()));
        let mut c = Collector {
            stdout: Vec::new(),
            stderr: Vec::new(),
            max_capture: 8,
            truncated: false,
            on_line: Some(&mut on_line),
            stdout_line: Vec::new(),
            stderr_line: Vec::new(),
            pid: PidState::Unknown,
        };
        c.push(OutputStream::Stdout, b"one\ntw");
        c.push(OutputStream::Stderr, b"err\r\n");
        c.push(OutputStream::Stdout, b"o\nthree");
        c.flush_lines();
        assert!(c.truncated);
        assert_eq!(c.stdout, b"one\ntwo\n");
        drop(c);
        assert_eq!(
            seen,
            vec![
                (OutputStream::Stdout, "one".to_string()),
                (OutputStream::Stderr, "err".to_string()),
                (OutputStream::Stdout, "two".to_string()),
                (OutputStream::Stdout, "three".to_string()),
            ]
        );
    }
}
