//! File-system primitives of the state store: atomic replacement, private directories and files,
//! permission checks.
//!
//! Every write of a whole file goes through [`write_atomic`]: the new content is written to a
//! temporary file in the same directory, flushed to disk, renamed over the old file, and the
//! directory is flushed so the rename itself is durable. A crash at any point leaves either the
//! old or the new content, never a mix; at worst a stray temporary file remains, which
//! [`remove_stray_temp_files`] cleans up under the cluster lock.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use super::StateError;

/// Mode of every directory the store creates.
pub const DIR_MODE: u32 = 0o700;
/// Mode of every file the store creates.
pub const FILE_MODE: u32 = 0o600;

/// Marker in the names of temporary files, so that stray ones can be recognised and removed.
const TEMP_MARKER: &str = ".tmp.";

fn io_err<'a>(action: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> StateError + 'a {
    move |source| StateError::Io {
        action,
        path: path.to_path_buf(),
        source,
    }
}

/// Creates `dir` and its missing parents with mode 0700 (parents that already exist are left as
/// they are), and makes sure `dir` itself is not accessible to other users.
pub fn ensure_private_dir(dir: &Path) -> Result<(), StateError> {
    fs::DirBuilder::new()
        .recursive(true)
        .mode(DIR_MODE)
        .create(dir)
        .map_err(io_err("create directory", dir))?;
    tighten(dir, DIR_MODE)
}

/// Creates `dir` and its missing parents with mode 0700, but leaves an existing `dir` as it is.
/// For directories clusterctl does not own outright, such as a `--state-dir` the user named (which
/// could be `/tmp`): narrowing their mode could break other programs. What is inside is private
/// anyway.
pub fn ensure_dir(dir: &Path) -> Result<(), StateError> {
    fs::DirBuilder::new()
        .recursive(true)
        .mode(DIR_MODE)
        .create(dir)
        .map_err(io_err("create directory", dir))
}

/// Removes group and other permission bits from `path` if it has any. The store's own files and
/// directories are private; a wider mode means someone changed it, and narrowing it is safe.
pub fn tighten(path: &Path, wanted: u32) -> Result<(), StateError> {
    let meta = fs::metadata(path).map_err(io_err("read metadata of", path))?;
    let mode = meta.mode() & 0o7777;
    if mode & 0o077 != 0 {
        tracing::warn!(path = %path.display(), mode = format_args!("{mode:04o}"), "narrowing permissions of state path");
        fs::set_permissions(path, fs::Permissions::from_mode(wanted))
            .map_err(io_err("set permissions of", path))?;
    }
    Ok(())
}

/// Refuses a secret file that other users could read or write: unlike ordinary state, narrowing
/// the mode after the fact does not undo a leak, so the user has to look.
pub fn check_secret_mode(path: &Path) -> Result<(), StateError> {
    let meta = fs::metadata(path).map_err(io_err("read metadata of", path))?;
    let mode = meta.mode() & 0o7777;
    if mode & 0o077 != 0 {
        return Err(StateError::InsecurePermissions {
            path: path.to_path_buf(),
            mode,
        });
    }
    Ok(())
}

/// Flushes a directory so that renames and creations inside it survive a power loss.
pub fn sync_dir(dir: &Path) -> Result<(), StateError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_err("flush directory", dir))
}

fn temp_path_for(path: &Path) -> Result<PathBuf, StateError> {
    let name = path
        .file_name()
        .and_then(|n| n.to_str())
        .ok_or_else(|| StateError::Io {
            action: "name a temporary file for",
            path: path.to_path_buf(),
            source: io::Error::new(io::ErrorKind::InvalidInput, "path has no UTF-8 file name"),
        })?;
    let nonce = super::random_hex(4).map_err(io_err("read random bytes for", path))?;
    Ok(path.with_file_name(format!(
        ".{name}{TEMP_MARKER}{}.{nonce}",
        std::process::id()
    )))
}

/// Replaces the content of `path` atomically and durably with `content`, creating the file with
/// mode `mode` (0600 for everything the store writes).
pub fn write_atomic(path: &Path, content: &[u8], mode: u32) -> Result<(), StateError> {
    write_atomic_inner(path, content, mode, &mut |_| Ok(()))
}

/// Points inside [`write_atomic`] at which a test can simulate a crash.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Step {
    /// The temporary file is written and flushed; the rename has not happened.
    TempWritten,
}

/// Like [`write_atomic`] but calls `hook` at each [`Step`]; an error from the hook aborts the
/// write there without cleaning up, as a crash would.
#[cfg(test)]
pub(crate) fn write_atomic_with_hook(
    path: &Path,
    content: &[u8],
    mode: u32,
    hook: &mut dyn FnMut(Step) -> io::Result<()>,
) -> Result<(), StateError> {
    write_atomic_inner(path, content, mode, hook)
}

fn write_atomic_inner(
    path: &Path,
    content: &[u8],
    mode: u32,
    hook: &mut dyn FnMut(Step) -> io::Result<()>,
) -> Result<(), StateError> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let tmp = temp_path_for(path)?;
    let result = (|| {
        let mut f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(&tmp)
            .map_err(io_err("create temporary file", &tmp))?;
        // The umask can only narrow the mode given above; set it exactly in case the file system
        // ignores the creation mode.
        f.set_permissions(fs::Permissions::from_mode(mode))
            .map_err(io_err("set permissions of", &tmp))?;
        f.write_all(content).map_err(io_err("write", &tmp))?;
        f.sync_all().map_err(io_err("flush", &tmp))?;
        Ok(())
    })();
    if let Err(e) = result {
        let _ = fs::remove_file(&tmp);
        return Err(e);
    }
    if let Err(source) = hook(Step::TempWritten) {
        // Simulated crash: leave the temporary file behind, exactly as a killed process would.
        return Err(StateError::Io {
            action: "write (simulated crash)",
            path: path.to_path_buf(),
            source,
        });
    }
    if let Err(source) = fs::rename(&tmp, path) {
        let _ = fs::remove_file(&tmp);
        return Err(StateError::Io {
            action: "rename temporary file over",
            path: path.to_path_buf(),
            source,
        });
    }
    sync_dir(dir)
}

/// Whether `name` is the name of a temporary file made by [`write_atomic`].
pub fn is_temp_name(name: &str) -> bool {
    name.starts_with('.') && name.contains(TEMP_MARKER)
}

/// Removes temporary files left by a process that died inside [`write_atomic`]. Only call this
/// while holding the directory's lock: otherwise a live writer's temporary file could vanish.
/// Returns how many were removed.
pub fn remove_stray_temp_files(dir: &Path) -> Result<usize, StateError> {
    let entries = match fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(0),
        Err(source) => {
            return Err(StateError::Io {
                action: "list directory",
                path: dir.to_path_buf(),
                source,
            });
        }
    };
    let mut removed = 0;
    for entry in entries {
        let entry = entry.map_err(io_err("list directory", dir))?;
        let name = entry.file_name();
        if name.to_str().is_some_and(is_temp_name) {
            let p = entry.path();
            match fs::remove_file(&p) {
                Ok(()) => removed += 1,
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(source) => {
                    return Err(StateError::Io {
                        action: "remove stray temporary file",
                        path: p,
                        source,
                    });
                }
            }
        }
    }
    if removed > 0 {
        sync_dir(dir)?;
    }
    Ok(removed)
}

/// Reads a whole file; `Ok(None)` if it does not exist.
pub fn read_optional(path: &Path) -> Result<Option<Vec<u8>>, StateError> {
    match fs::read(path) {
        Ok(b) => Ok(Some(b)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(StateError::Io {
            action: "read",
            path: path.to_path_buf(),
            source,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mode_of(p: &Path) -> u32 {
        fs::metadata(p).map(|m| m.mode() & 0o7777).unwrap_or(0)
    }

    #[test]
    fn atomic_write_creates_private_file_and_replaces_content() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let p = dir.path().join("f.json");
        write_atomic(&p, b"one", FILE_MODE)?;
        assert_eq!(fs::read(&p)?, b"one");
        assert_eq!(mode_of(&p), 0o600);
        write_atomic(&p, b"two", FILE_MODE)?;
        assert_eq!(fs::read(&p)?, b"two");
        assert_eq!(mode_of(&p), 0o600);
        let names: Vec<_> = fs::read_dir(dir.path())?
            .filter_map(|e| e.ok())
            .map(|e| e.file_name())
            .collect();
        assert_eq!(names.len(), 1, "no temporary file may remain: {names:?}");
        Ok(())
    }

    #[test]
    fn crash_before_rename_keeps_old_content_and_stray_temp_is_removed() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let p = dir.path().join("f.json");
        write_atomic(&p, b"old", FILE_MODE)?;
        let err = write_atomic_with_hook(&p, b"new", FILE_MODE, &mut |_| {
            Err(io::Error::other("killed"))
        });
        assert!(err.is_err());
        assert_eq!(
            fs::read(&p)?,
            b"old",
            "a crash before the rename must leave the old content"
        );
        let strays: Vec<_> = fs::read_dir(dir.path())?
            .filter_map(|e| e.ok())
            .filter(|e| e.file_name().to_str().is_some_and(is_temp_name))
            .collect();
        assert_eq!(
            strays.len(),
            1,
            "the simulated crash leaves its temporary file"
        );
        assert_eq!(remove_stray_temp_files(dir.path())?, 1);
        assert_eq!(remove_stray_temp_files(dir.path())?, 0);
        assert_eq!(fs::read(&p)?, b"old");
        Ok(())
    }

    #[test]
    fn private_dir_is_0700_even_with_permissive_umask_and_is_tightened() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let d = dir.path().join("a/b");
        ensure_private_dir(&d)?;
        assert_eq!(mode_of(&d), 0o700);
        fs::set_permissions(&d, fs::Permissions::from_mode(0o755))?;
        ensure_private_dir(&d)?;
        assert_eq!(mode_of(&d), 0o700);
        Ok(())
    }

    #[test]
    fn secret_with_wide_mode_is_refused() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let p = dir.path().join("key");
        write_atomic(&p, b"secret", FILE_MODE)?;
        check_secret_mode(&p)?;
        fs::set_permissions(&p, fs::Permissions::from_mode(0o644))?;
        let err = check_secret_mode(&p)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(err.contains("0644") && err.contains("chmod 600"), "{err}");
        Ok(())
    }
}
