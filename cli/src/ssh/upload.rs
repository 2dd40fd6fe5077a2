//! Atomic, verified file uploads over SFTP.
//!
//! An upload (1) hashes the local data, (2) asks the server for the sha256 and mode of the
//! destination and stops there if both already match, (3) streams the data over SFTP into a
//! temporary file next to the destination (created with mode 0600, fsynced), (4) has the server
//! compute the temporary file's sha256 and, only if it equals the local one, sets the mode and
//! renames it over the destination (`mv -f`, an atomic `rename(2)` in the same directory).
//! A reader of the destination thus sees the old file or the complete new one, never a partial
//! one. The remote side needs a POSIX shell, `sha256sum`, `stat`, `chmod`, `mv` and the SFTP
//! subsystem.
//!
//! A file uploaded from disk gets `.<name>.clusterctl-sha256` beside it: its checksum, when it was
//! recorded and the file's identity (size, inode, ctime). Step (2) reports that checksum without
//! reading the file while the identity holds and the ctime is older than the record (as git does
//! with racily clean files); any write, chmod or replacement moves the ctime, which no user can
//! set, so a changed file is always hashed again.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use russh_sftp::client::{Config as SftpConfig, SftpSession};
use russh_sftp::protocol::{FileAttributes, OpenFlags};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::OwnedSemaphorePermit;

use super::SshError;
use super::exec::{ExecOptions, Session};

/// Exit status of the finishing script when the remote checksum differs.
const CORRUPT_STATUS: u32 = 91;
/// Suffix of the file beside an upload (`.<name><suffix>`) that records its checksum and identity.
pub const SUM_SUFFIX: &str = ".clusterctl-sha256";
/// A file's identity for the recorded checksum: size, inode and ctime (nanoseconds, last).
const IDENTITY: &str = "%s %i %.9Z";
/// Shell that writes the record of checksum `$s` for identity `$id` to `$q`, atomically; a
/// record that cannot be written is removed (the file is then hashed next time).
const WRITE_RECORD: &str = "{ printf '%s %s %s\\n' \"$s\" \"$(date +%s)\" \"$id\" > \"$q.tmp\" \
     && mv -f -- \"$q.tmp\" \"$q\"; } || rm -f -- \"$q\" \"$q.tmp\"";
/// Read and write chunk size.
const CHUNK: usize = 256 << 10;

/// What an upload did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UploadOutcome {
    /// The data was written (and verified) at the destination.
    Uploaded {
        /// Bytes transferred.
        bytes: u64,
        /// sha256 of the content (hex).
        sha256: String,
    },
    /// The destination already had this content; nothing was transferred (the mode was
    /// corrected if it differed).
    Unchanged {
        /// sha256 of the content (hex).
        sha256: String,
    },
}

impl UploadOutcome {
    /// The sha256 of the content now at the destination (hex).
    pub fn sha256(&self) -> &str {
        match self {
            UploadOutcome::Uploaded { sha256, .. } | UploadOutcome::Unchanged { sha256 } => sha256,
        }
    }
}

/// Quotes `text` for a POSIX shell: `'...'` with embedded single quotes escaped.
pub fn shell_quote(text: &str) -> String {
    let mut out = String::with_capacity(text.len() + 2);
    out.push('\'');
    for c in text.chars() {
        if c == '\'' {
            out.push_str("'\\''");
        } else {
            out.push(c);
        }
    }
    out.push('\'');
    out
}

/// Where the data comes from.
enum Source<'a> {
    File(&'a Path),
    Bytes(&'a [u8]),
}

impl Session {
    /// Uploads a local file to `remote_path` (absolute) with permission bits `mode` (e.g.
    /// `0o755`), atomically and verified; skips the transfer if the remote file already has the
    /// same sha256. Missing parent directories are created. The file is streamed, never held in
    /// memory as a whole.
    pub async fn upload_file(
        &self,
        local_path: &Path,
        remote_path: &str,
        mode: u32,
    ) -> Result<UploadOutcome, SshError> {
        self.upload(Source::File(local_path), remote_path, mode)
            .await
    }

    /// Uploads in-memory bytes (a rendered config, say) with the same semantics as
    /// [`Session::upload_file`].
    pub async fn upload_bytes(
        &self,
        data: &[u8],
        remote_path: &str,
        mode: u32,
    ) -> Result<UploadOutcome, SshError> {
        self.upload(Source::Bytes(data), remote_path, mode).await
    }

    async fn upload(
        &self,
        source: Source<'_>,
        remote_path: &str,
        mode: u32,
    ) -> Result<UploadOutcome, SshError> {
        let (dir, name) = split_remote_path(remote_path)?;
        let mode = mode & 0o7777;
        let started = Instant::now();
        if let Source::File(path) = &source {
            // Fail on a missing or unreadable local file before touching the remote side.
            tokio::fs::File::open(path)
                .await
                .map_err(|source| SshError::LocalFile {
                    path: path.to_path_buf(),
                    op: "open",
                    source,
                })?;
        }
        // Hash the local file in the background while the server reports what it has; the
        // hash is only needed if there is a remote file to compare with.
        let cancel = Arc::new(AtomicBool::new(false));
        let pre_hash = match &source {
            Source::File(path) => Some(tokio::task::spawn_blocking({
                let path = path.to_path_buf();
                let cancel = cancel.clone();
                move || hash_file(&path, &cancel)
            })),
            Source::Bytes(_) => None,
        };
        let _stop_hashing = CancelOnDrop(cancel.clone());

        // 1. What is there now? (Also creates the parent directory.) A file uploaded from disk
        // has its checksum recorded beside it with its identity (size, inode, ctime); while that
        // identity holds, the file was not written to, so the recorded checksum is reported
        // without reading it (hashing 450 MB under emulation took minutes). A stale record is
        // brought up to date when the file is hashed.
        let sidecar = format!("{dir}/.{name}{SUM_SUFFIX}");
        let probe = format!(
            "d={dir}; p={path}; q={sidecar}; [ -d \"$d\" ] || mkdir -p -- \"$d\" || exit 1; \
             if [ -f \"$p\" ]; then id=$(stat -c '{IDENTITY}' -- \"$p\") || exit 1; c=${{id##* }}; \
             if [ -f \"$q\" ] && read -r rs rat rid < \"$q\" && [ \"$rid\" = \"$id\" ] \
             && [ \"${{c%.*}}\" -lt \"$rat\" ]; then echo \"$rs\"; \
             else s=$(sha256sum < \"$p\") || exit 1; s=${{s%% *}}; echo \"$s\"; \
             if [ -f \"$q\" ]; then {WRITE_RECORD}; fi; fi; \
             stat -c %a -- \"$p\"; fi",
            dir = shell_quote(dir),
            path = shell_quote(remote_path),
            sidecar = shell_quote(&sidecar),
        );
        let output = self.run(&probe).await?;
        let text = output.stdout_text();
        let mut lines = text.lines();
        if let (Some(remote_sum), Some(remote_mode)) = (lines.next(), lines.next()) {
            let local_sum = match (&source, pre_hash) {
                (Source::Bytes(data), _) => hex::encode(Sha256::digest(data)),
                (Source::File(path), Some(task)) => join_hash(path, task.await)?,
                (Source::File(path), None) => join_hash(path, Ok(hash_file(path, &cancel)))?,
            };
            if remote_sum.trim() == local_sum {
                if u32::from_str_radix(remote_mode.trim(), 8).ok() != Some(mode) {
                    self.run(&format!("chmod {mode:o} -- {}", shell_quote(remote_path)))
                        .await?;
                }
                tracing::debug!(node = %self.endpoint(), path = remote_path, "upload skipped: content unchanged");
                return Ok(UploadOutcome::Unchanged { sha256: local_sum });
            }
        } else {
            // Nothing to compare with: the transfer hashes what it sends instead.
            cancel.store(true, Ordering::Relaxed);
        }

        // 2. Stream into a temporary file beside the destination, hashing what is sent.
        let temp = format!(
            "{dir}/.{name}.clusterctl-{:016x}.tmp",
            rand::random::<u64>()
        );
        tracing::debug!(node = %self.endpoint(), path = remote_path, "uploading file");
        let (size, sha256) = match self.write_temp(&source, &temp).await {
            Ok(sent) => sent,
            Err(error) => {
                let _ = self.exec(&format!("rm -f -- {}", shell_quote(&temp))).await;
                return Err(error);
            }
        };

        // 3. Verify on the server, then set the mode and rename into place; a file from disk
        // gets its checksum recorded (see step 1; the identity is taken after the rename).
        let record = match source {
            // The record is written in a later second than the file's ctime, so any later write
            // to the file gives it another ctime, however coarse the clock.
            Source::File(_) => format!(
                "; q={sidecar}; id=$(stat -c '{IDENTITY}' -- \"$p\") && c=${{id##* }} && \
                 while [ \"$(date +%s)\" -le \"${{c%.*}}\" ]; do sleep 0.2; done && {WRITE_RECORD}",
                sidecar = shell_quote(&sidecar),
            ),
            Source::Bytes(_) => String::new(),
        };
        let finish = format!(
            "t={temp}; p={path}; s=$(sha256sum < \"$t\") || {{ rm -f -- \"$t\"; exit 1; }}; \
             s=${{s%% *}}; if [ \"$s\" != {sha256} ]; then rm -f -- \"$t\"; echo \"$s\"; \
             exit {CORRUPT_STATUS}; fi; chmod {mode:o} -- \"$t\" && mv -f -- \"$t\" \"$p\" \
             || {{ rm -f -- \"$t\"; exit 1; }}{record}",
            temp = shell_quote(&temp),
            path = shell_quote(remote_path),
        );
        let output = self.exec_with(&finish, ExecOptions::default()).await?;
        if output.exit_status == Some(CORRUPT_STATUS) {
            return Err(SshError::UploadCorrupt {
                endpoint: self.endpoint().clone(),
                remote_path: remote_path.to_string(),
                expected: sha256,
                actual: output.stdout_text().trim().to_string(),
            });
        }
        output.check()?;
        tracing::debug!(
            node = %self.endpoint(),
            path = remote_path,
            bytes = size,
            elapsed = ?started.elapsed(),
            "upload verified"
        );
        Ok(UploadOutcome::Uploaded {
            bytes: size,
            sha256,
        })
    }

    /// An SFTP session on a channel of its own, with the channel slot it holds.
    pub(super) async fn sftp(&self) -> Result<(OwnedSemaphorePermit, SftpSession), SshError> {
        let endpoint = self.endpoint().clone();
        let slot = self.channel_slot("sftp").await?;
        let channel = self.open_session_channel("sftp").await?;
        self.count_sftp();
        channel
            .request_subsystem(true, "sftp")
            .await
            .map_err(|source| SshError::Protocol {
                endpoint: endpoint.clone(),
                op: "start the sftp subsystem".to_string(),
                source: Box::new(source),
            })?;
        let config = SftpConfig {
            // Deep pipelining of large writes keeps the link busy on high-latency paths.
            max_concurrent_writes: 64,
            max_write_packet_len: 255 << 10,
            // fsync of a large file on a slow disk can take a while.
            request_timeout_secs: 300,
            ..SftpConfig::default()
        };
        let sftp = SftpSession::new_with_config(channel.into_stream(), config)
            .await
            .map_err(|source| SshError::Sftp {
                endpoint,
                op: "start an sftp session".to_string(),
                source,
            })?;
        Ok((slot, sftp))
    }

    /// Writes the data to `temp` over SFTP; returns the size and sha256 of what was sent.
    async fn write_temp(&self, source: &Source<'_>, temp: &str) -> Result<(u64, String), SshError> {
        let endpoint = self.endpoint().clone();
        let sftp_error = |op: String| {
            let endpoint = endpoint.clone();
            move |source| SshError::Sftp {
                endpoint,
                op,
                source,
            }
        };
        let (_slot, sftp) = self.sftp().await?;
        let mut attributes = FileAttributes::empty();
        attributes.permissions = Some(0o600);
        let mut file = sftp
            .open_with_flags_and_attributes(
                temp,
                OpenFlags::CREATE | OpenFlags::EXCLUDE | OpenFlags::WRITE | OpenFlags::TRUNCATE,
                attributes,
            )
            .await
            .map_err(sftp_error(format!("create {temp}")))?;
        let write_error = |source: std::io::Error| SshError::Sftp {
            endpoint: endpoint.clone(),
            op: format!("write {temp}"),
            source: source.into(),
        };
        let mut hasher = Sha256::new();
        let mut size = 0u64;
        match source {
            Source::Bytes(data) => {
                hasher.update(data);
                size = data.len() as u64;
                file.write_all(data).await.map_err(write_error)?
            }
            Source::File(path) => {
                let mut local =
                    tokio::fs::File::open(path)
                        .await
                        .map_err(|source| SshError::LocalFile {
                            path: path.to_path_buf(),
                            op: "open",
                            source,
                        })?;
                let mut buffer = vec![0u8; CHUNK];
                loop {
                    let n =
                        local
                            .read(&mut buffer)
                            .await
                            .map_err(|source| SshError::LocalFile {
                                path: path.to_path_buf(),
                                op: "read",
                                source,
                            })?;
                    if n == 0 {
                        break;
                    }
                    hasher.update(&buffer[..n]);
                    size += n as u64;
                    file.write_all(&buffer[..n]).await.map_err(write_error)?;
                }
            }
        }
        // `flush` waits for every pending write and fsyncs (fsync@openssh.com); `close` then
        // releases the handle. Only a durable temp file gets renamed over the destination.
        file.flush().await.map_err(write_error)?;
        file.close().await.map_err(write_error)?;
        let _ = sftp.close().await;
        Ok((size, hex::encode(hasher.finalize())))
    }
}

/// Splits an absolute remote path into directory and file name, rejecting unusable paths.
fn split_remote_path(path: &str) -> Result<(&str, &str), SshError> {
    let invalid = |reason| SshError::InvalidRemotePath {
        path: path.to_string(),
        reason,
    };
    if !path.starts_with('/') {
        return Err(invalid("it must be absolute"));
    }
    if path.contains('\0') || path.contains('\n') {
        return Err(invalid("it contains a NUL or newline character"));
    }
    let (dir, name) = path
        .rsplit_once('/')
        .ok_or_else(|| invalid("it must be absolute"))?;
    if name.is_empty() || name == "." || name == ".." {
        return Err(invalid("it must name a file"));
    }
    Ok((if dir.is_empty() { "/" } else { dir }, name))
}

/// Sets the flag when dropped, so a background hash stops when the upload ends early.
struct CancelOnDrop(Arc<AtomicBool>);

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

/// sha256 (hex) of a local file, read in chunks; `Ok(None)` if cancelled.
fn hash_file(path: &Path, cancel: &AtomicBool) -> std::io::Result<Option<String>> {
    use std::io::Read;
    let mut file = std::fs::File::open(path)?;
    let mut hasher = Sha256::new();
    let mut buffer = vec![0u8; 1 << 20];
    loop {
        if cancel.load(Ordering::Relaxed) {
            return Ok(None);
        }
        let n = file.read(&mut buffer)?;
        if n == 0 {
            break;
        }
        hasher.update(&buffer[..n]);
    }
    Ok(Some(hex::encode(hasher.finalize())))
}

/// The result of a background [`hash_file`], as an error naming the file if it failed.
fn join_hash(
    path: &Path,
    joined: Result<std::io::Result<Option<String>>, tokio::task::JoinError>,
) -> Result<String, SshError> {
    let error = |source| SshError::LocalFile {
        path: path.to_path_buf(),
        op: "read",
        source,
    };
    match joined {
        Ok(Ok(Some(sum))) => Ok(sum),
        Ok(Ok(None)) => Err(error(std::io::Error::other("hashing was cancelled"))),
        Ok(Err(source)) => Err(error(source)),
        Err(join) => Err(error(std::io::Error::other(join.to_string()))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quoting_survives_single_quotes() {
        assert_eq!(shell_quote("/etc/a b"), "'/etc/a b'");
        assert_eq!(shell_quote("it's"), "'it'\\''s'");
    }

    #[test]
    fn remote_paths_are_checked() {
        assert_eq!(
            split_remote_path("/etc/k/x.conf").ok(),
            Some(("/etc/k", "x.conf"))
        );
        assert_eq!(split_remote_path("/x").ok(), Some(("/", "x")));
        assert!(split_remote_path("relative/x").is_err());
        assert!(split_remote_path("/etc/").is_err());
        assert!(split_remote_path("/etc/a\nb").is_err());
    }
}
