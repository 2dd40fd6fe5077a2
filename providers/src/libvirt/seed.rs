//! NoCloud seed disks built in memory: a small FAT filesystem labelled `CIDATA` holding
//! `meta-data`, `user-data` and `network-config`. Building it in-process needs no mkfs, mtools,
//! loop devices or root, and the bytes are uploaded as a volume, so remote hosts work too.

use std::io::{Cursor, Write};

/// Size of the seed image. FAT12 with 1 MiB holds far more than any first-boot configuration.
const SEED_BYTES: usize = 1024 * 1024;
/// Upper bound on the files' total size, leaving room for FAT metadata.
const MAX_CONTENT_BYTES: usize = 900 * 1024;

/// Builds the seed image; fails if the content does not fit or the FAT writer fails.
pub(crate) fn build(files: &[(&str, &str)]) -> Result<Vec<u8>, String> {
    let total: usize = files.iter().map(|(_, c)| c.len()).sum();
    if total > MAX_CONTENT_BYTES {
        return Err(format!(
            "first-boot configuration is {total} bytes; the seed disk holds at most {MAX_CONTENT_BYTES}"
        ));
    }
    let mut disk = Cursor::new(vec![0u8; SEED_BYTES]);
    fatfs::format_volume(
        &mut disk,
        fatfs::FormatVolumeOptions::new().volume_label(*b"CIDATA     "),
    )
    .map_err(|e| format!("formatting the seed image: {e}"))?;
    disk.set_position(0);
    {
        let fs = fatfs::FileSystem::new(&mut disk, fatfs::FsOptions::new())
            .map_err(|e| format!("opening the seed image: {e}"))?;
        {
            let root = fs.root_dir();
            for (name, content) in files {
                let mut f = root
                    .create_file(name)
                    .map_err(|e| format!("creating {name} on the seed image: {e}"))?;
                f.truncate()
                    .map_err(|e| format!("writing {name} on the seed image: {e}"))?;
                f.write_all(content.as_bytes())
                    .map_err(|e| format!("writing {name} on the seed image: {e}"))?;
                f.flush()
                    .map_err(|e| format!("writing {name} on the seed image: {e}"))?;
            }
        }
        fs.unmount()
            .map_err(|e| format!("closing the seed image: {e}"))?;
    }
    Ok(disk.into_inner())
}

#[cfg(test)]
mod tests {
    use std::io::Read;

    use super::*;

    #[test]
    fn seed_holds_files_and_label() {
        let img = build(&[
            ("meta-data", "instance-id: a\n"),
            ("user-data", "#cloud-config\n"),
            ("network-config", "version: 2\n"),
        ])
        .expect("builds");
        assert_eq!(img.len(), SEED_BYTES);
        let mut disk = Cursor::new(img);
        let fs = fatfs::FileSystem::new(&mut disk, fatfs::FsOptions::new()).expect("opens");
        assert_eq!(fs.volume_label(), "CIDATA");
        let mut s = String::new();
        fs.root_dir()
            .open_file("network-config")
            .expect("present")
            .read_to_string(&mut s)
            .expect("reads");
        assert_eq!(s, "version: 2\n");
        let names: Vec<String> = fs
            .root_dir()
            .iter()
            .filter_map(|e| e.ok())
            .map(|e| e.file_name())
            .collect();
        assert!(names.contains(&"meta-data".to_string()), "{names:?}");
    }

    #[test]
    fn oversized_content_is_refused() {
        let big = "x".repeat(MAX_CONTENT_BYTES + 1);
        let err = build(&[("user-data", &big)]).expect_err("too big");
        assert!(err.contains("seed disk holds at most"), "{err}");
    }
}
