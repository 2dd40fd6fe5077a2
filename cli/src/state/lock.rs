//! The per-cluster exclusive lock that every mutating command holds.
//!
//! The lock itself is `flock(2)` on the file `lock` in the cluster directory (through
//! [`std::fs::File::lock`], which is `flock` on Linux): the kernel releases it when the holder
//! exits, however it exits, so a crashed command never blocks the next one. Beside it the holder
//! writes `holder.json` (pid, command line, start time) so that a blocked command can say who it is
//! waiting for. That record is informational only: a record left by a dead process is simply
//! overwritten by the next holder.
//!
//! `clusterctl delete` removes the cluster directory, lock file included, while holding the lock.
//! A command that was waiting on the old lock file would then hold a lock nobody else can see, so
//! after locking we check that the path still names the file we locked, and start over otherwise.

use std::fs::{self, File, OpenOptions, TryLockError};
use std::io;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::fsio::{self, FILE_MODE};
use super::{StateError, Timestamp};

/// File name of the lock file inside a cluster directory.
pub const LOCK_FILE: &str = "lock";
/// File name of the holder record inside a cluster directory.
pub const HOLDER_FILE: &str = "holder.json";

/// Who holds a cluster's lock.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LockHolder {
    /// Process ID of the holder.
    pub pid: u32,
    /// The holder's command line, e.g. `clusterctl create -f cluster.yaml`.
    pub command: String,
    /// When the holder took the lock.
    pub since: Timestamp,
}

impl LockHolder {
    /// A holder record for the current process.
    pub fn current() -> Self {
        let mut args = std::env::args();
        let program = args
            .next()
            .map(|p| {
                Path::new(&p)
                    .file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or(p)
            })
            .unwrap_or_else(|| "clusterctl".to_owned());
        let command = std::iter::once(program)
            .chain(args)
            .collect::<Vec<_>>()
            .join(" ");
        LockHolder {
            pid: std::process::id(),
            command,
            since: Timestamp::now(),
        }
    }
}

/// What to do when another process holds the lock.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WaitMode {
    /// Fail at once with [`StateError::Locked`] naming the holder.
    FailFast,
    /// Block until the holder releases the lock.
    Wait,
}

/// A held cluster lock. Dropping it releases the lock and removes the holder record.
#[derive(Debug)]
pub struct ClusterLock {
    file: File,
    dir: PathBuf,
}

impl ClusterLock {
    /// Takes the exclusive lock of the cluster directory `dir` (creating the directory if needed).
    ///
    /// With [`WaitMode::FailFast`] a held lock gives [`StateError::Locked`]; with
    /// [`WaitMode::Wait`], `on_wait` is called once with the current holder (if it could be read)
    /// and the call blocks until the lock is free.
    pub fn acquire(
        dir: &Path,
        cluster: &str,
        holder: &LockHolder,
        wait: WaitMode,
        on_wait: &mut dyn FnMut(Option<&LockHolder>),
    ) -> Result<ClusterLock, StateError> {
        let lock_path = dir.join(LOCK_FILE);
        let mut told = false;
        loop {
            fsio::ensure_private_dir(dir)?;
            let file = OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .mode(FILE_MODE)
                .open(&lock_path)
                .map_err(|source| StateError::Io {
                    action: "open lock file",
                    path: lock_path.clone(),
                    source,
                })?;
            match file.try_lock() {
                Ok(()) => {}
                Err(TryLockError::WouldBlock) => {
                    let current = read_holder(dir);
                    match wait {
                        WaitMode::FailFast => {
                            return Err(StateError::Locked {
                                cluster: cluster.to_owned(),
                                holder: current,
                            });
                        }
                        WaitMode::Wait => {
                            if !told {
                                on_wait(current.as_ref());
                                told = true;
                            }
                            file.lock().map_err(|source| StateError::Io {
                                action: "wait for lock file",
                                path: lock_path.clone(),
                                source,
                            })?;
                        }
                    }
                }
                Err(TryLockError::Error(source)) => {
                    return Err(StateError::Io {
                        action: "lock",
                        path: lock_path.clone(),
                        source,
                    });
                }
            }
            if !still_linked(&file, &lock_path)? {
                // The directory was removed (cluster deleted) while we waited: lock afresh.
                continue;
            }
            let lock = ClusterLock {
                file,
                dir: dir.to_path_buf(),
            };
            let record = serde_json::to_vec_pretty(holder).map_err(|e| StateError::Io {
                action: "encode holder record for",
                path: dir.join(HOLDER_FILE),
                source: io::Error::other(e),
            })?;
            fsio::write_atomic(&dir.join(HOLDER_FILE), &record, FILE_MODE)?;
            fsio::tighten(&lock_path, FILE_MODE)?;
            let removed = fsio::remove_stray_temp_files(dir)?;
            if removed > 0 {
                tracing::info!(
                    cluster,
                    removed,
                    "removed temporary files left by an interrupted write"
                );
            }
            return Ok(lock);
        }
    }

    /// The locked cluster directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

impl Drop for ClusterLock {
    fn drop(&mut self) {
        // Best effort: the record is informational, and a stale one never blocks anybody.
        let _ = fs::remove_file(self.dir.join(HOLDER_FILE));
        let _ = self.file.unlock();
    }
}

/// Whether `path` still names the open `file` (same device and inode).
fn still_linked(file: &File, path: &Path) -> Result<bool, StateError> {
    let held = file.metadata().map_err(|source| StateError::Io {
        action: "read metadata of",
        path: path.to_path_buf(),
        source,
    })?;
    match fs::metadata(path) {
        Ok(now) => Ok(now.dev() == held.dev() && now.ino() == held.ino()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
        Err(source) => Err(StateError::Io {
            action: "read metadata of",
            path: path.to_path_buf(),
            source,
        }),
    }
}

/// Reads the holder record of a locked directory. Returns `None` when there is none, it cannot be
/// parsed (the holder may be writing it right now), or its process no longer exists (the record
/// is left over from a dead process and the real holder has not written its own yet).
pub fn read_holder(dir: &Path) -> Option<LockHolder> {
    let bytes = fs::read(dir.join(HOLDER_FILE)).ok()?;
    let holder: LockHolder = serde_json::from_slice(&bytes).ok()?;
    if Path::new("/proc").join(holder.pid.to_string()).exists() {
        Some(holder)
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use std::sync::mpsc;
    use std::time::{Duration, Instant};

    use super::*;

    fn holder(pid: u32, command: &str) -> LockHolder {
        LockHolder {
            pid,
            command: command.to_owned(),
            since: Timestamp::now(),
        }
    }

    #[test]
    fn second_writer_fails_fast_naming_the_holder() -> anyhow::Result<()> {
        let tmp = tempfile::tempdir()?;
        let dir = tmp.path().join("c1");
        let me = holder(std::process::id(), "clusterctl create -f c1.yaml");
        let _held = ClusterLock::acquire(&dir, "c1", &me, WaitMode::FailFast, &mut |_| {})?;
        // flock conflicts between open file descriptions, so a second open in the same process
        // contends exactly like a second process would.
        let err = ClusterLock::acquire(
            &dir,
            "c1",
            &holder(1, "other"),
            WaitMode::FailFast,
            &mut |_| {},
        )
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
        let want = format!(
            "cluster \"c1\" is locked by pid {} (clusterctl create -f c1.yaml) since {}; wait for it or pass --wait",
            std::process::id(),
            me.since
        );
        assert_eq!(err, want);
        Ok(())
    }

    #[test]
    fn waiter_gets_the_lock_when_the_holder_releases_it() -> anyhow::Result<()> {
        let tmp = tempfile::tempdir()?;
        let dir = tmp.path().join("c1");
        let held = ClusterLock::acquire(
            &dir,
            "c1",
            &holder(std::process::id(), "first"),
            WaitMode::FailFast,
            &mut |_| {},
        )?;
        let (tx, rx) = mpsc::channel();
        let d2 = dir.clone();
        let waiter = std::thread::spawn(move || -> Result<Duration, String> {
            let start = Instant::now();
            let mut seen = None;
            let lock = ClusterLock::acquire(
                &d2,
                "c1",
                &holder(std::process::id(), "second"),
                WaitMode::Wait,
                &mut |h| {
                    seen = h.map(|h| h.command.clone());
                    let _ = tx.send(());
                },
            )
            .map_err(|e| e.to_string())?;
            if seen.as_deref() != Some("first") {
                return Err(format!("waiter saw holder {seen:?}"));
            }
            let h = read_holder(lock.dir()).map(|h| h.command);
            if h.as_deref() != Some("second") {
                return Err(format!("holder record after acquiring is {h:?}"));
            }
            Ok(start.elapsed())
        });
        rx.recv_timeout(Duration::from_secs(10))?;
        std::thread::sleep(Duration::from_millis(300));
        drop(held);
        let waited = waiter
            .join()
            .map_err(|_| anyhow::anyhow!("waiter panicked"))?
            .map_err(anyhow::Error::msg)?;
        assert!(
            waited >= Duration::from_millis(250),
            "waiter returned after {waited:?}, before the release"
        );
        Ok(())
    }

    #[test]
    fn stale_holder_record_of_a_dead_process_does_not_block() -> anyhow::Result<()> {
        let tmp = tempfile::tempdir()?;
        let dir = tmp.path().join("c1");
        fsio::ensure_private_dir(&dir)?;
        // A child that has exited and been reaped: its pid is not alive.
        let mut child = std::process::Command::new("true").spawn()?;
        let dead = child.id();
        child.wait()?;
        fs::write(
            dir.join(HOLDER_FILE),
            serde_json::to_vec(&holder(dead, "clusterctl create"))?,
        )?;
        fs::write(dir.join(LOCK_FILE), b"")?;
        assert_eq!(
            read_holder(&dir),
            None,
            "a dead holder is not reported as holding"
        );
        let lock = ClusterLock::acquire(
            &dir,
            "c1",
            &holder(std::process::id(), "me"),
            WaitMode::FailFast,
            &mut |_| {},
        )?;
        assert_eq!(
            read_holder(lock.dir()).map(|h| h.command),
            Some("me".to_owned())
        );
        drop(lock);
        assert!(
            !dir.join(HOLDER_FILE).exists(),
            "release removes the holder record"
        );
        Ok(())
    }

    /// Environment variable that turns [`lock_holder_child`] into the child of
    /// [`lock_is_released_when_the_holding_process_is_killed`].
    const HOLDER_CHILD_ENV: &str = "CLUSTERCTL_TEST_LOCK_HOLDER_DIR";

    /// Child half of the kill test: takes the lock, says so, and sleeps until killed. Does
    /// nothing when run as an ordinary test.
    #[test]
    fn lock_holder_child() -> anyhow::Result<()> {
        let Some(dir) = std::env::var_os(HOLDER_CHILD_ENV) else {
            return Ok(());
        };
        let _lock = ClusterLock::acquire(
            Path::new(&dir),
            "c1",
            &LockHolder::current(),
            WaitMode::FailFast,
            &mut |_| {},
        )?;
        println!("LOCKED");
        std::thread::sleep(Duration::from_secs(120));
        Ok(())
    }

    #[test]
    fn lock_is_released_when_the_holding_process_is_killed() -> anyhow::Result<()> {
        use std::io::BufRead;
        let tmp = tempfile::tempdir()?;
        let dir = tmp.path().join("c1");
        let mut child = std::process::Command::new(std::env::current_exe()?)
            .args([
                "--exact",
                "state::lock::tests::lock_holder_child",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(HOLDER_CHILD_ENV, &dir)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .spawn()?;
        let stdout = child
            .stdout
            .take()
            .ok_or_else(|| anyhow::anyhow!("no child stdout"))?;
        let mut lines = std::io::BufReader::new(stdout).lines();
        let locked = lines.any(|l| l.map(|l| l.contains("LOCKED")).unwrap_or(false));
        if !locked {
            let _ = child.kill();
            let _ = child.wait();
            anyhow::bail!("child never took the lock");
        }
        let err = ClusterLock::acquire(
            &dir,
            "c1",
            &holder(std::process::id(), "me"),
            WaitMode::FailFast,
            &mut |_| {},
        );
        let held_by = match err {
            Err(StateError::Locked {
                holder: Some(h), ..
            }) => h.pid,
            other => {
                let _ = child.kill();
                let _ = child.wait();
                anyhow::bail!("want Locked with the child's holder record, got {other:?}");
            }
        };
        assert_eq!(held_by, child.id());
        child.kill()?; // SIGKILL: no destructor runs, the holder record stays behind
        child.wait()?;
        assert!(
            dir.join(HOLDER_FILE).exists(),
            "the killed holder leaves its record"
        );
        let lock = ClusterLock::acquire(
            &dir,
            "c1",
            &holder(std::process::id(), "me"),
            WaitMode::FailFast,
            &mut |_| {},
        )?;
        assert_eq!(
            read_holder(lock.dir()).map(|h| h.command),
            Some("me".to_owned())
        );
        Ok(())
    }

    #[test]
    fn waiter_on_a_removed_directory_locks_the_new_one() -> anyhow::Result<()> {
        let tmp = tempfile::tempdir()?;
        let dir = tmp.path().join("c1");
        let held = ClusterLock::acquire(
            &dir,
            "c1",
            &holder(std::process::id(), "delete"),
            WaitMode::FailFast,
            &mut |_| {},
        )?;
        let (tx, rx) = mpsc::channel();
        let d2 = dir.clone();
        let waiter = std::thread::spawn(move || {
            ClusterLock::acquire(
                &d2,
                "c1",
                &holder(std::process::id(), "create"),
                WaitMode::Wait,
                &mut |_| {
                    let _ = tx.send(());
                },
            )
            .map_err(|e| e.to_string())
        });
        rx.recv_timeout(Duration::from_secs(10))?;
        // Delete the cluster while holding the lock, as `clusterctl delete` does.
        fs::remove_dir_all(&dir)?;
        drop(held);
        let lock = waiter
            .join()
            .map_err(|_| anyhow::anyhow!("waiter panicked"))?
            .map_err(anyhow::Error::msg)?;
        assert!(
            dir.join(LOCK_FILE).exists(),
            "the waiter recreated the directory and its lock file"
        );
        // The waiter's lock is the one a newcomer contends with.
        let again =
            ClusterLock::acquire(&dir, "c1", &holder(1, "x"), WaitMode::FailFast, &mut |_| {});
        assert!(matches!(again, Err(StateError::Locked { .. })), "{again:?}");
        drop(lock);
        Ok(())
    }
}
