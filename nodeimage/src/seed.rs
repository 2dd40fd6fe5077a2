//! Writes a cloud-init NoCloud seed disk: a FAT filesystem labelled `cidata` holding `meta-data`,
//! `user-data` and optionally `network-config`. Pure Rust (no mkfs.vfat, no mounts), so any
//! machine running clusterctl can make one. The node image's first-boot agent and cloud-init both
//! read this format.

use std::fs::OpenOptions;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use crate::NodeImageError;

/// Volume label cloud-init's NoCloud data source looks for.
pub const LABEL: &str = "cidata";

/// Size of the seed image: FAT12 with room for large write_files payloads.
const SEED_BYTES: u64 = 4 << 20;

/// Writes the seed image to `path` (mode 0600: user-data carries the machine's private host key).
/// `files` are (name, contents) pairs, typically `meta-data`, `user-data`, `network-config`.
pub fn write_seed(path: &Path, files: &[(&str, &[u8])]) -> Result<(), NodeImageError> {
    let err = |source| NodeImageError::Seed {
        path: path.to_path_buf(),
        source,
    };
    let total: usize = files.iter().map(|(_, c)| c.len()).sum();
    if total as u64 > SEED_BYTES - (512 << 10) {
        return Err(err(std::io::Error::other(format!(
            "{total} bytes of seed data do not fit in {SEED_BYTES} bytes"
        ))));
    }
    let mut file = OpenOptions::new()
        .create(true)
        .truncate(true)
        .read(true)
        .write(true)
        .mode(0o600)
        .open(path)
        .map_err(err)?;
    file.set_len(SEED_BYTES).map_err(err)?;
    let mut label = [b' '; 11];
    label[..LABEL.len()].copy_from_slice(LABEL.as_bytes());
    fatfs::format_volume(
        &mut file,
        fatfs::FormatVolumeOptions::new().volume_label(label),
    )
    .map_err(err)?;
    {
        let fs = fatfs::FileSystem::new(&mut file, fatfs::FsOptions::new()).map_err(err)?;
        {
            let root = fs.root_dir();
            for (name, contents) in files {
                let mut f = root.create_file(name).map_err(err)?;
                f.truncate().map_err(err)?;
                f.write_all(contents).map_err(err)?;
                f.flush().map_err(err)?;
            }
        }
        fs.unmount().map_err(err)?;
    }
    file.sync_all().map_err(err)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    #[test]
    fn seed_roundtrip_with_label() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("seed.img");
        let user = b"#cloud-config\n{\"hostname\": \"n1\"}\n";
        write_seed(&path, &[("meta-data", b"{}"), ("user-data", user)]).expect("write seed");
        let mut file = std::fs::File::open(&path).expect("open");
        let fs = fatfs::FileSystem::new(&mut file, fatfs::FsOptions::new()).expect("read fat");
        assert_eq!(fs.volume_label().trim_end(), LABEL);
        let mut got = Vec::new();
        fs.root_dir()
            .open_file("user-data")
            .expect("user-data")
            .read_to_end(&mut got)
            .expect("read");
        assert_eq!(got, user);
        let names: Vec<String> = fs
            .root_dir()
            .iter()
            .filter_map(Result::ok)
            .map(|e| e.file_name())
            .collect();
        assert!(names.contains(&"meta-data".to_string()), "{names:?}");
        let mode = std::os::unix::fs::PermissionsExt::mode(
            &std::fs::metadata(&path).expect("meta").permissions(),
        );
        assert_eq!(mode & 0o777, 0o600);
    }

    #[test]
    fn oversized_seed_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let big = vec![b'x'; 5 << 20];
        let e = write_seed(&dir.path().join("s.img"), &[("user-data", &big)]).expect_err("too big");
        assert!(e.to_string().contains("do not fit"), "{e}");
    }
}
