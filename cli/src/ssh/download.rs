//! Verified file downloads over SFTP.
//!
//! A download (1) has the server compute the remote file's sha256, (2) streams the file over
//! SFTP into `<local>.part` (created 0600, never readable by others while it is written),
//! hashing what arrives, (3) fsyncs it and, only if the checksums agree, renames it over the
//! destination. A reader of the destination sees nothing or the complete file; a failed or
//! killed download leaves at most the `.part` file, which the next one replaces.

use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::SshError;
use super::exec::Session;
use super::upload::shell_quote;

/// Read chunk size.
const CHUNK: usize = 256 << 10;

/// What a download brought.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Downloaded {
    /// Bytes received.
    pub bytes: u64,
    /// sha256 of the file (hex), the same on both sides.
    pub sha256: String,
}

impl Session {
    /// Downloads the remote file `remote_path` (absolute, readable by the login user) to
    /// `local_path`, mode 0600, atomically and verified against the server's sha256. The
    /// file is streamed, never held in memory as a whole.
    pub async fn download_file(
        &self,
        remote_path: &str,
        local_path: &Path,
    ) -> Result<Downloaded, SshError> {
        let remote_sum = self
            .run(&format!("sha256sum < {}", shell_quote(remote_path)))
            .await?
            .stdout_text();
        let remote_sum = remote_sum
            .split_whitespace()
            .next()
            .unwrap_or_default()
            .to_owned();
        let part = part_path(local_path);
        let local_error = |path: &Path, op: &'static str| {
            let path = path.to_path_buf();
            move |source| SshError::LocalFile { path, op, source }
        };
        let result = self.receive(remote_path, &part).await;
        let received = match result {
            Ok(r) => r,
            Err(e) => {
                let _ = tokio::fs::remove_file(&part).await;
                return Err(e);
            }
        };
        if received.sha256 != remote_sum {
            let _ = tokio::fs::remove_file(&part).await;
            return Err(SshError::DownloadCorrupt {
                endpoint: self.endpoint().clone(),
                remote_path: remote_path.to_owned(),
                expected: remote_sum,
                actual: received.sha256,
            });
        }
        tokio::fs::rename(&part, local_path)
            .await
            .map_err(local_error(local_path, "rename into place"))?;
        Ok(received)
    }

    async fn receive(&self, remote_path: &str, part: &Path) -> Result<Downloaded, SshError> {
        let endpoint = self.endpoint().clone();
        let (_slot, sftp) = self.sftp().await?;
        let mut remote = sftp
            .open(remote_path)
            .await
            .map_err(|source| SshError::Sftp {
                endpoint: endpoint.clone(),
                op: format!("open {remote_path}"),
                source,
            })?;
        let local_error = |op: &'static str| {
            let path = part.to_path_buf();
            move |source| SshError::LocalFile { path, op, source }
        };
        let _ = tokio::fs::remove_file(part).await;
        let mut local = tokio::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(part)
            .await
            .map_err(local_error("create"))?;
        let mut hasher = Sha256::new();
        let mut bytes = 0u64;
        let mut buffer = vec![0u8; CHUNK];
        loop {
            let n = remote
                .read(&mut buffer)
                .await
                .map_err(|source| SshError::Sftp {
                    endpoint: endpoint.clone(),
                    op: format!("read {remote_path}"),
                    source: source.into(),
                })?;
            if n == 0 {
                break;
            }
            hasher.update(&buffer[..n]);
            bytes += n as u64;
            local
                .write_all(&buffer[..n])
                .await
                .map_err(local_error("write"))?;
        }
        local.sync_all().await.map_err(local_error("fsync"))?;
        let _ = sftp.close().await;
        Ok(Downloaded {
            bytes,
            sha256: hex::encode(hasher.finalize()),
        })
    }
}

/// `<file>.part` beside the destination.
fn part_path(local_path: &Path) -> PathBuf {
    let mut name = local_path.file_name().unwrap_or_default().to_os_string();
    name.push(".part");
    local_path.with_file_name(name)
}
