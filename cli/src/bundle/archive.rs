//! Safe unpacking of bundle tarballs (`.tar.gz`).

use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};

use flate2::read::GzDecoder;

use super::BundleError;
use super::manifest::{MANIFEST_FILE, check_relative_path};

/// Unpacks `archive` into `dest` and returns the bundle root inside it: `dest` itself when
/// `bundle.json` is at the top, or the single top-level directory that holds it.
///
/// Only regular files and directories are unpacked; links, devices, absolute paths and `..` are
/// refused, so a hostile archive cannot write outside `dest`. Permissions are kept (the executable
/// bit matters for binaries), ownership is not.
pub(super) fn unpack_tar_gz(archive: &Path, dest: &Path) -> Result<PathBuf, BundleError> {
    let archive_err = |source: io::Error| BundleError::Archive {
        path: archive.to_path_buf(),
        source,
    };
    let file = File::open(archive).map_err(archive_err)?;
    let mut tar = tar::Archive::new(GzDecoder::new(io::BufReader::new(file)));
    tar.set_preserve_permissions(false);
    tar.set_unpack_xattrs(false);
    tar.set_overwrite(false);
    for entry in tar.entries().map_err(archive_err)? {
        let mut entry = entry.map_err(archive_err)?;
        let raw = entry
            .path()
            .map_err(archive_err)?
            .to_string_lossy()
            .into_owned();
        let unsafe_entry = || BundleError::UnsafeArchiveEntry {
            path: archive.to_path_buf(),
            entry: raw.clone(),
        };
        // `tar` and `docker save` write "./" prefixes and trailing slashes on directories.
        let name = raw.trim_start_matches("./").trim_end_matches('/');
        if name.is_empty() || name == "." {
            continue;
        }
        check_relative_path(name).map_err(|_| unsafe_entry())?;
        let target = dest.join(name);
        match entry.header().entry_type() {
            tar::EntryType::Directory => {
                std::fs::create_dir_all(&target).map_err(archive_err)?;
            }
            tar::EntryType::Regular | tar::EntryType::Continuous => {
                if let Some(parent) = target.parent() {
                    std::fs::create_dir_all(parent).map_err(archive_err)?;
                }
                // `unpack` (not `unpack_in`) is safe here: `name` was checked to stay inside `dest`
                // and no symlink can exist under `dest` because none is ever unpacked.
                entry.unpack(&target).map_err(archive_err)?;
            }
            // PAX and GNU long-name headers are consumed by the tar crate before we see entries.
            _ => return Err(unsafe_entry()),
        }
    }
    if dest.join(MANIFEST_FILE).is_file() {
        return Ok(dest.to_path_buf());
    }
    let mut tops = std::fs::read_dir(dest)
        .map_err(archive_err)?
        .collect::<Result<Vec<_>, _>>()
        .map_err(archive_err)?;
    if tops.len() == 1 {
        let top = tops.remove(0).path();
        if top.join(MANIFEST_FILE).is_file() {
            return Ok(top);
        }
    }
    Err(BundleError::NoManifest {
        path: archive.to_path_buf(),
    })
}
