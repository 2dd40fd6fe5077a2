//! The node image artifacts the provider boots, read from the image directory's manifest.
//!
//! The provider needs four things: the kernel, the initrd, the root filesystem image (raw or
//! qcow2; with dm-verity the hash tree is part of it and the root hash is on the command line)
//! and the kernel command line. `manifest.json` names them relative to the image directory.

use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::{ImageRef, ProviderError};

/// Resolved, existing image artifacts.
#[derive(Debug, Clone)]
pub(crate) struct ImageArtifacts {
    pub kernel: PathBuf,
    pub initrd: PathBuf,
    pub root: PathBuf,
    /// `raw` or `qcow2`.
    pub root_format: String,
    /// Kernel command line from the manifest (root device, verity root hash, console).
    pub cmdline: String,
}

#[derive(Deserialize)]
struct Manifest {
    kernel: ArtifactField,
    initrd: ArtifactField,
    root: ArtifactField,
    cmdline: String,
}

/// An artifact is named either by a bare file name or by an object with `file` (and `format`).
#[derive(Deserialize)]
#[serde(untagged)]
enum ArtifactField {
    File(String),
    Object {
        #[serde(alias = "path")]
        file: String,
        #[serde(default)]
        format: Option<String>,
    },
}

impl ArtifactField {
    fn file(&self) -> &str {
        match self {
            ArtifactField::File(f) | ArtifactField::Object { file: f, .. } => f,
        }
    }
    fn format(&self) -> Option<&str> {
        match self {
            ArtifactField::File(_) => None,
            ArtifactField::Object { format, .. } => format.as_deref(),
        }
    }
}

fn missing(image: &ImageRef, detail: String) -> ProviderError {
    ProviderError::ImageMissing {
        image: format!("{} ({})", image.version, image.dir.display()),
        detail,
    }
}

impl ImageArtifacts {
    /// Reads the manifest and checks that every artifact exists.
    pub(crate) fn load(image: &ImageRef) -> Result<Self, ProviderError> {
        let manifest_path = image.dir.join("manifest.json");
        let text = std::fs::read_to_string(&manifest_path).map_err(|e| {
            missing(
                image,
                format!("cannot read {}: {e}", manifest_path.display()),
            )
        })?;
        let m: Manifest = serde_json::from_str(&text).map_err(|e| {
            missing(
                image,
                format!(
                    "{} is not a valid image manifest: {e}",
                    manifest_path.display()
                ),
            )
        })?;
        let resolve = |field: &ArtifactField, what: &str| -> Result<PathBuf, ProviderError> {
            let name = field.file();
            if name.is_empty()
                || Path::new(name).is_absolute()
                || name.split('/').any(|c| c == "..")
            {
                return Err(missing(
                    image,
                    format!(
                        "the manifest's {what} path {name:?} must be relative to the image directory"
                    ),
                ));
            }
            let p = image.dir.join(name);
            if p.is_file() {
                Ok(p)
            } else {
                Err(missing(
                    image,
                    format!("{what} {} does not exist", p.display()),
                ))
            }
        };
        let root = resolve(&m.root, "root image")?;
        let root_format = match m.root.format() {
            Some(f) => f.to_string(),
            None => sniff_format(&root)
                .map_err(|e| missing(image, format!("cannot read {}: {e}", root.display())))?,
        };
        if root_format != "raw" && root_format != "qcow2" {
            return Err(missing(
                image,
                format!("root image format {root_format:?} is not raw or qcow2"),
            ));
        }
        Ok(Self {
            kernel: resolve(&m.kernel, "kernel")?,
            initrd: resolve(&m.initrd, "initrd")?,
            root,
            root_format,
            cmdline: m.cmdline,
        })
    }
}

/// `qcow2` if the file starts with the qcow2 magic, else `raw`.
fn sniff_format(path: &Path) -> std::io::Result<String> {
    use std::io::Read;
    let mut magic = [0u8; 4];
    let mut f = std::fs::File::open(path)?;
    let n = f.read(&mut magic)?;
    Ok(if n == 4 && &magic == b"QFI\xfb" {
        "qcow2"
    } else {
        "raw"
    }
    .to_string())
}

/// Virtual size of a disk image: the qcow2 header's size field, or the file size for raw.
pub(crate) fn virtual_size(path: &Path, format: &str) -> std::io::Result<u64> {
    use std::io::Read;
    let len = std::fs::metadata(path)?.len();
    if format != "qcow2" {
        return Ok(len);
    }
    let mut header = [0u8; 32];
    std::fs::File::open(path)?.read_exact(&mut header)?;
    let mut size = [0u8; 8];
    size.copy_from_slice(&header[24..32]);
    Ok(u64::from_be_bytes(size))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn image(dir: &Path) -> ImageRef {
        ImageRef {
            version: "v1".into(),
            dir: dir.to_path_buf(),
            digest: "sha256:abc".into(),
        }
    }

    #[test]
    fn loads_a_complete_image() {
        let d = tempfile::tempdir().expect("tempdir");
        for f in ["vmlinuz", "initrd.img"] {
            std::fs::write(d.path().join(f), b"x").expect("write");
        }
        let mut q = b"QFI\xfb".to_vec();
        q.extend_from_slice(&[0u8; 20]);
        q.extend_from_slice(&(2u64 << 30).to_be_bytes());
        std::fs::write(d.path().join("root.qcow2"), &q).expect("write");
        std::fs::write(
            d.path().join("manifest.json"),
            r#"{"kernel":"vmlinuz","initrd":{"file":"initrd.img"},"root":{"file":"root.qcow2"},"cmdline":"ro"}"#,
        )
        .expect("write");
        let a = ImageArtifacts::load(&image(d.path())).expect("loads");
        assert_eq!(a.root_format, "qcow2");
        assert_eq!(virtual_size(&a.root, "qcow2").expect("size"), 2 << 30);
    }

    #[test]
    fn missing_pieces_are_named() {
        let d = tempfile::tempdir().expect("tempdir");
        let err = ImageArtifacts::load(&image(d.path()))
            .expect_err("no manifest")
            .to_string();
        assert!(err.contains("manifest.json"), "{err}");
        assert!(err.contains("clusterctl image build"), "{err}");
        std::fs::write(
            d.path().join("manifest.json"),
            r#"{"kernel":"k","initrd":"i","root":"r","cmdline":""}"#,
        )
        .expect("write");
        let err = ImageArtifacts::load(&image(d.path()))
            .expect_err("no files")
            .to_string();
        assert!(
            err.contains("root image") && err.contains("does not exist"),
            "{err}"
        );
        std::fs::write(
            d.path().join("manifest.json"),
            r#"{"kernel":"../k","initrd":"i","root":"r","cmdline":""}"#,
        )
        .expect("write");
        std::fs::write(d.path().join("r"), b"x").expect("write");
        let err = ImageArtifacts::load(&image(d.path()))
            .expect_err("escape")
            .to_string();
        assert!(err.contains("relative"), "{err}");
    }
}
