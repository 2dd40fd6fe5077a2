//! Atomic, verified file uploads over SFTP.
//!
//! An upload (1) asks the server for the sha256 and mode of the destination and stops there if
//! both match the local data's, (2) streams the data over SFTP into a temporary file next to the
//! destination (created with mode 0600, fsynced), hashing what it sends, (3) has the server
//! compute the temporary file's sha256 and, only if it equals the local one, sets the mode and
//! renames it over the destination (`mv -f`, an atomic `rename(2)` in the same directory).
//! A reader of the destination thus sees the old file or the complete new one, never a partial
//! one. The remote side needs a POSIX shell, `sha256sum`, `stat`, `chmod`, `mv` and the SFTP
//! subsystem.
//!
//! Each step that runs on the server is one command, and a command (a login shell that sshd
//! starts) is what an upload costs on a slow machine: [`Session::probe_uploads`] asks about many
//! destinations in one command, and [`Session::upload_probed`] then sends only what differs. A
//! local file is hashed only if there is a remote file to compare it with, at most once per
//! process while it does not change ([`super::local_sum`]), and not at all when the caller
//! knows its sum ([`FileUpload::sha256`]: a verified bundle's manifest).
//!
//! A file uploaded from disk gets `.<name>.clusterctl-sha256` beside it: its checksum, when it was
//! recorded and the file's identity (size, inode, ctime). Step (1) reports that checksum without
//! reading the file while the identity holds and the ctime is older than the record (as git does
//! with racily clean files); any write, chmod or replacement moves the ctime, which no user can
//! set, so a changed file is always hashed again.

use std::path::Path;
use std::time::Instant;

use russh_sftp::client::{Config as SftpConfig, SftpSession};
use russh_sftp::protocol::{FileAttributes, OpenFlags};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::OwnedSemaphorePermit;

use super::exec::{ExecOptions, Session};
use super::{SshError, local_sum};

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

/// One file for [`Session::probe_uploads`] and [`Session::upload_probed`].
#[derive(Debug, Clone, Copy)]
pub struct FileUpload<'a> {
    /// The local file.
    pub local: &'a Path,
    /// The destination (absolute).
    pub remote: &'a str,
    /// Its permission bits (e.g. `0o755`).
    pub mode: u32,
    /// The local file's sha256 (hex) when the caller knows it (a verified bundle's manifest):
    /// the file is then never hashed to compare it, and what is sent must have this sum.
    pub sha256: Option<&'a str>,
    /// A shell command run on the server once the new content is verified there, right before
    /// it replaces the destination (a restart marker, say); if it fails, nothing is replaced.
    /// Not run when the destination already has the content.
    pub before_replace: Option<&'a str>,
}

impl<'a> FileUpload<'a> {
    /// A plain upload of `local` to `remote` with `mode`.
    pub fn new(local: &'a Path, remote: &'a str, mode: u32) -> Self {
        FileUpload {
            local,
            remote,
            mode,
            sha256: None,
            before_replace: None,
        }
    }
}

/// What the server has at an upload's destination (see [`Session::probe_uploads`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RemoteFile {
    /// sha256 (hex) and permission bits of the regular file there; `None` when there is none
    /// (or the server's answer for it made no sense: it is then uploaded).
    found: Option<(String, u32)>,
}

impl RemoteFile {
    /// The sha256 (hex) of the file there, if there is one.
    pub fn sha256(&self) -> Option<&str> {
        self.found.as_ref().map(|(sum, _)| sum.as_str())
    }
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
        split_remote_path(remote_path)?;
        // Fail on a missing or unreadable local file before touching the remote side.
        tokio::fs::File::open(local_path)
            .await
            .map_err(|source| SshError::LocalFile {
                path: local_path.to_path_buf(),
                op: "open",
                source,
            })?;
        let there = self.probe_one(remote_path).await?;
        self.upload_probed(&FileUpload::new(local_path, remote_path, mode), &there)
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
        split_remote_path(remote_path)?;
        let there = self.probe_one(remote_path).await?;
        let sum = hex::encode(Sha256::digest(data));
        if let Some(unchanged) = self.if_unchanged(remote_path, mode, &there, &sum).await? {
            return Ok(unchanged);
        }
        self.transfer(Source::Bytes(data), remote_path, mode, None, None)
            .await
    }

    /// Asks the server, in one command, what it has at each of `remote_paths` (absolute),
    /// creating missing parent directories: the sha256 and mode of each file, in order. A file
    /// uploaded from disk has its checksum recorded beside it with its identity (size, inode,
    /// ctime); while that identity holds, the file was not written to, so the recorded checksum
    /// is reported without reading the file (hashing 450 MB under emulation took minutes). A
    /// stale record is brought up to date when the file is hashed.
    ///
    /// `setup` is a shell command run first in the same command (making directories, say),
    /// which must succeed: one command less on a machine where each one is slow.
    pub async fn probe_uploads(
        &self,
        setup: Option<&str>,
        remote_paths: &[&str],
    ) -> Result<Vec<RemoteFile>, SshError> {
        if remote_paths.is_empty() && setup.is_none() {
            return Ok(Vec::new());
        }
        let mut script = String::new();
        if let Some(setup) = setup {
            script.push_str(&format!("{{ {setup}\n}} || exit 1\n"));
        }
        script.push_str(&format!(
            "p() {{ [ -d \"$4\" ] || mkdir -p -- \"$4\" || return 1; \
             if [ ! -f \"$2\" ]; then echo \"$1 -\"; return 0; fi; \
             id=$(stat -c '{IDENTITY}' -- \"$2\") || return 1; c=${{id##* }}; q=$3; \
             if [ -f \"$q\" ] && read -r rs rat rid < \"$q\" && [ \"$rid\" = \"$id\" ] \
             && [ \"${{c%.*}}\" -lt \"$rat\" ]; then s=$rs; \
             else s=$(sha256sum < \"$2\") || return 1; s=${{s%% *}}; \
             if [ -f \"$q\" ]; then {WRITE_RECORD}; fi; fi; \
             m=$(stat -c %a -- \"$2\") || return 1; echo \"$1 $s $m\"; }}\n"
        ));
        for (i, path) in remote_paths.iter().enumerate() {
            let (dir, name) = split_remote_path(path)?;
            script.push_str(&format!(
                "p {i} {path} {sidecar} {dir} || exit 1\n",
                path = shell_quote(path),
                sidecar = shell_quote(&format!("{dir}/.{name}{SUM_SUFFIX}")),
                dir = shell_quote(dir),
            ));
        }
        // The script goes on stdin: a failure then names a short command, its stderr the cause.
        let mut output = self
            .exec_with(
                "sh -s",
                ExecOptions {
                    stdin: Some(script.as_bytes()),
                    ..ExecOptions::default()
                },
            )
            .await?;
        output.command = match remote_paths {
            [one] => format!("sh -s (checking {one})"),
            all => format!("sh -s (checking {} upload destinations)", all.len()),
        };
        let output = output.check()?;
        Ok(parse_probe(&output.stdout_text(), remote_paths.len()))
    }

    /// [`Session::probe_uploads`] of one path.
    async fn probe_one(&self, remote_path: &str) -> Result<RemoteFile, SshError> {
        Ok(self
            .probe_uploads(None, &[remote_path])
            .await?
            .into_iter()
            .next()
            .unwrap_or_default())
    }

    /// Uploads `file` given what [`Session::probe_uploads`] found at its destination (`there`):
    /// nothing if the content is there already (the mode is corrected if it differs), else
    /// atomically and verified, as [`Session::upload_file`] does.
    pub async fn upload_probed(
        &self,
        file: &FileUpload<'_>,
        there: &RemoteFile,
    ) -> Result<UploadOutcome, SshError> {
        split_remote_path(file.remote)?;
        if there.found.is_some() {
            let local_sum = match file.sha256 {
                Some(sum) => sum.to_owned(),
                None => local_sum::sha256(file.local).await?,
            };
            if let Some(unchanged) = self
                .if_unchanged(file.remote, file.mode, there, &local_sum)
                .await?
            {
                return Ok(unchanged);
            }
        }
        self.transfer(
            Source::File(file.local),
            file.remote,
            file.mode,
            file.sha256,
            file.before_replace,
        )
        .await
    }

    /// `Some(Unchanged)` if `there` has `local_sum`, after correcting the mode if it differs.
    async fn if_unchanged(
        &self,
        remote_path: &str,
        mode: u32,
        there: &RemoteFile,
        local_sum: &str,
    ) -> Result<Option<UploadOutcome>, SshError> {
        let mode = mode & 0o7777;
        match &there.found {
            Some((remote_sum, remote_mode)) if remote_sum == local_sum => {
                if *remote_mode != mode {
                    self.run(&format!("chmod {mode:o} -- {}", shell_quote(remote_path)))
                        .await?;
                }
                tracing::debug!(node = %self.endpoint(), path = remote_path, "upload skipped: content unchanged");
                Ok(Some(UploadOutcome::Unchanged {
                    sha256: local_sum.to_owned(),
                }))
            }
            _ => Ok(None),
        }
    }

    /// Streams the data into a temporary file beside the destination, hashing what is sent,
    /// then has the server verify it, set its mode and rename it into place (one command).
    /// `expected`: the sum the caller says the data has; `before_replace`: see [`FileUpload`].
    async fn transfer(
        &self,
        source: Source<'_>,
        remote_path: &str,
        mode: u32,
        expected: Option<&str>,
        before_replace: Option<&str>,
    ) -> Result<UploadOutcome, SshError> {
        let (dir, name) = split_remote_path(remote_path)?;
        let mode = mode & 0o7777;
        let started = Instant::now();
        let temp = format!(
            "{dir}/.{name}.clusterctl-{:016x}.tmp",
            rand::random::<u64>()
        );
        tracing::debug!(node = %self.endpoint(), path = remote_path, "uploading file");
        let remove_temp = || async {
            let _ = self.exec(&format!("rm -f -- {}", shell_quote(&temp))).await;
        };
        let (size, sha256) = match self.write_temp(&source, &temp).await {
            Ok(sent) => sent,
            Err(error) => {
                remove_temp().await;
                return Err(error);
            }
        };
        if let (Some(expected), Source::File(path)) = (expected, &source)
            && expected != sha256
        {
            remove_temp().await;
            return Err(SshError::LocalFileChanged {
                path: path.to_path_buf(),
                expected: expected.to_owned(),
                actual: sha256,
            });
        }

        // Verify on the server, then set the mode and rename into place; a file from disk gets
        // its checksum recorded (see `probe_uploads`; the identity is taken after the rename).
        let sidecar = format!("{dir}/.{name}{SUM_SUFFIX}");
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
        let before = before_replace.map_or_else(String::new, |c| format!("{{ {c}\n}} && "));
        let finish = format!(
            "t={temp}; p={path}; s=$(sha256sum < \"$t\") || {{ rm -f -- \"$t\"; exit 1; }}; \
             s=${{s%% *}}; if [ \"$s\" != {sha256} ]; then rm -f -- \"$t\"; echo \"$s\"; \
             exit {CORRUPT_STATUS}; fi; chmod {mode:o} -- \"$t\" && {before}mv -f -- \"$t\" \"$p\" \
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

    /// Writes small files over one SFTP session, nothing else: each is created 0600 (it must not
    /// exist; a link is never followed), written and closed. Not atomic, not verified, not
    /// fsynced: for a private staging directory whose reader checks every file's sha256 on the
    /// server before it uses any (the bootstrap's install script), and which the caller cleared
    /// first.
    pub async fn put_files(&self, files: &[(&str, &[u8])]) -> Result<(), SshError> {
        if files.is_empty() {
            return Ok(());
        }
        for (path, _) in files {
            split_remote_path(path)?;
        }
        let (_slot, sftp) = self.sftp().await?;
        let mut attributes = FileAttributes::empty();
        attributes.permissions = Some(0o600);
        for (path, data) in files {
            let error = |op: &str| {
                let (endpoint, op) = (self.endpoint().clone(), format!("{op} {path}"));
                move |source| SshError::Sftp {
                    endpoint,
                    op,
                    source,
                }
            };
            let mut file = sftp
                .open_with_flags_and_attributes(
                    *path,
                    OpenFlags::CREATE | OpenFlags::EXCLUDE | OpenFlags::WRITE,
                    attributes.clone(),
                )
                .await
                .map_err(error("create"))?;
            let io = |e: std::io::Error| russh_sftp::client::error::Error::from(e);
            file.write_all(data)
                .await
                .map_err(|e| error("write")(io(e)))?;
            // `shutdown` waits for every write and closes the handle, without fsync.
            file.shutdown().await.map_err(|e| error("write")(io(e)))?;
        }
        let _ = sftp.close().await;
        Ok(())
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

/// What the server answered to a probe of `count` paths: one line per path, `<index> -` for no
/// file, `<index> <sha256> <octal mode>` for one. Anything else leaves that path unknown (it is
/// then uploaded, which is always safe).
fn parse_probe(text: &str, count: usize) -> Vec<RemoteFile> {
    let mut out = vec![RemoteFile::default(); count];
    for line in text.lines() {
        let mut fields = line.split_whitespace();
        let (Some(index), Some(sum), mode) = (
            fields.next().and_then(|i| i.parse::<usize>().ok()),
            fields.next(),
            fields.next().and_then(|m| u32::from_str_radix(m, 8).ok()),
        ) else {
            continue;
        };
        let sum_ok = sum.len() == 64 && sum.bytes().all(|b| b.is_ascii_hexdigit());
        if let (Some(slot), Some(mode), true) = (out.get_mut(index), mode, sum_ok) {
            slot.found = Some((sum.to_ascii_lowercase(), mode));
        }
    }
    out
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

    #[test]
    fn a_probe_answer_that_makes_no_sense_leaves_the_file_unknown() {
        let sum = "ab".repeat(32);
        let text = format!(
            "0 {sum} 755\n1 -\n2 {sum}\n3 xyz 644\n9 {sum} 644\nnoise\n4 {} 600\n",
            sum.to_uppercase()
        );
        let found = parse_probe(&text, 5);
        assert_eq!(found[0].sha256(), Some(sum.as_str()));
        assert_eq!(found[0].found.as_ref().map(|f| f.1), Some(0o755));
        // No file, no mode, not a sum; index 9 is out of range and ignored.
        assert!(
            found[1..4].iter().all(|f| f.sha256().is_none()),
            "{found:?}"
        );
        assert_eq!(found[4].sha256(), Some(sum.as_str()));
        // Fewer answers than paths: the rest are unknown.
        assert_eq!(parse_probe("", 2), vec![RemoteFile::default(); 2]);
    }
}
