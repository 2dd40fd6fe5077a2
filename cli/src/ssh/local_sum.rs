//! sha256 of local files, computed at most once per process for a file that does not change.
//!
//! The bootstrap copies the same binaries and image archives (hundreds of MB) to every node,
//! from a host whose few cores the machines themselves may share; hashing a file again for each
//! node and each run of a reconcile loop cost more than the copies it saved. A sum is kept under
//! the file's identity: path, device, inode, size, mtime and ctime (nanoseconds). Any write,
//! chmod or replacement moves the ctime, which no user can set back, so a changed file has
//! another identity and is hashed again. A file whose times are within [`RACY`] of the moment
//! hashing began could still be written within the same timestamp tick unseen (git's "racily
//! clean" files): its sum is computed but not kept.

use std::collections::HashMap;
use std::io::Read;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, LazyLock, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use sha2::{Digest, Sha256};
use tokio::sync::OnceCell;

use super::SshError;

/// How recent a file's mtime or ctime may be for its sum to be kept (coarse file system clocks
/// tick in up to 2 s).
const RACY: Duration = Duration::from_secs(2);

/// What identifies one version of a file.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct Identity {
    path: PathBuf,
    dev: u64,
    ino: u64,
    size: u64,
    mtime: (i64, i64),
    ctime: (i64, i64),
}

impl Identity {
    fn of(path: &Path, meta: &std::fs::Metadata) -> Identity {
        Identity {
            path: path.to_path_buf(),
            dev: meta.dev(),
            ino: meta.ino(),
            size: meta.size(),
            mtime: (meta.mtime(), meta.mtime_nsec()),
            ctime: (meta.ctime(), meta.ctime_nsec()),
        }
    }

    /// Whether a write after `now` could leave this identity as it is.
    fn racy(&self, now: SystemTime) -> bool {
        let limit = now
            .checked_sub(RACY)
            .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
            .map_or(i64::MIN, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX));
        self.mtime.0 >= limit || self.ctime.0 >= limit
    }
}

/// The sums computed so far, by identity; a cell is filled once, however many tasks ask at once.
static SUMS: LazyLock<Mutex<HashMap<Identity, Arc<OnceCell<String>>>>> =
    LazyLock::new(|| Mutex::new(HashMap::new()));

fn read_error(path: &Path, op: &'static str) -> impl FnOnce(std::io::Error) -> SshError {
    let path = path.to_path_buf();
    move |source| SshError::LocalFile { path, op, source }
}

/// The sha256 (hex) of the local file `path`, hashed off the async threads unless this process
/// hashed the same version of it before.
pub(super) async fn sha256(path: &Path) -> Result<String, SshError> {
    sha256_at(path, SystemTime::now()).await.map(|(sum, _)| sum)
}

/// [`sha256`] as if it were `now`; also says whether the file was hashed by this call.
async fn sha256_at(path: &Path, now: SystemTime) -> Result<(String, bool), SshError> {
    let meta = tokio::fs::metadata(path)
        .await
        .map_err(read_error(path, "read"))?;
    let identity = Identity::of(path, &meta);
    if identity.racy(now) {
        return Ok((hash(path, identity).await?, true));
    }
    let cell = {
        let mut sums = SUMS.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        sums.entry(identity.clone()).or_default().clone()
    };
    let mut hashed = false;
    let sum = cell
        .get_or_try_init(|| {
            hashed = true;
            hash(path, identity)
        })
        .await?;
    Ok((sum.clone(), hashed))
}

/// Hashes `path` on a blocking thread; fails if the file is not `identity` before or after (it
/// changed while it was read, so the sum is of no version of it).
async fn hash(path: &Path, identity: Identity) -> Result<String, SshError> {
    let owned = path.to_path_buf();
    let hashed = tokio::task::spawn_blocking(move || -> std::io::Result<Option<String>> {
        let mut file = std::fs::File::open(&owned)?;
        if Identity::of(&owned, &file.metadata()?) != identity {
            return Ok(None);
        }
        let mut hasher = Sha256::new();
        let mut buffer = vec![0u8; 1 << 20];
        loop {
            let n = file.read(&mut buffer)?;
            if n == 0 {
                break;
            }
            hasher.update(&buffer[..n]);
        }
        let after = std::fs::metadata(&owned)?;
        Ok((Identity::of(&owned, &after) == identity).then(|| hex::encode(hasher.finalize())))
    })
    .await
    .map_err(|join| read_error(path, "read")(std::io::Error::other(join.to_string())))?
    .map_err(read_error(path, "read"))?;
    hashed.ok_or_else(|| {
        read_error(path, "hash")(std::io::Error::other(
            "it changed while it was read; make sure nothing writes to it and run again",
        ))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(path: &Path, data: &[u8]) {
        if let Err(e) = std::fs::write(path, data) {
            panic!("write {}: {e}", path.display());
        }
    }

    #[tokio::test]
    async fn a_file_is_hashed_once_per_version() {
        let Ok(dir) = tempfile::tempdir() else {
            panic!("no temp dir");
        };
        let path = dir.path().join("artifact");
        write(&path, b"one");
        let sum_of = |data: &[u8]| hex::encode(Sha256::digest(data));
        // Written just now: racy, so hashed each time and not kept.
        let now = SystemTime::now();
        for _ in 0..2 {
            let got = sha256_at(&path, now).await.ok();
            assert_eq!(got, Some((sum_of(b"one"), true)));
        }
        // Seen from later on: hashed once, then taken from the memo.
        let later = now + Duration::from_secs(10);
        assert_eq!(
            sha256_at(&path, later).await.ok(),
            Some((sum_of(b"one"), true))
        );
        assert_eq!(
            sha256_at(&path, later).await.ok(),
            Some((sum_of(b"one"), false))
        );
        // Rewritten with the same size: another version, hashed again.
        write(&path, b"two");
        let later = SystemTime::now() + Duration::from_secs(10);
        assert_eq!(
            sha256_at(&path, later).await.ok(),
            Some((sum_of(b"two"), true))
        );
        assert_eq!(
            sha256_at(&path, later).await.ok(),
            Some((sum_of(b"two"), false))
        );
        // A missing file is an error naming it.
        let missing = dir.path().join("missing");
        let err = sha256(&missing).await.err().map(|e| e.to_string());
        assert!(
            err.as_deref().is_some_and(|e| e.contains("missing")),
            "{err:?}"
        );
    }
}
