//! Builds and describes clusterctl's container-optimized node images.
//!
//! An image is a directory `<image-dir>/<version>/` with a kernel, an initramfs, a root disk (ext4
//! plus its dm-verity hash tree, qcow2) and `manifest.json` (version, package list, kernel command
//! line with the verity root hash, sha256 of every artifact). See `nodeimage/README.md` for the
//! layout, the disks a machine needs and the first-boot seed.
//!
//! Building needs root and Debian tools (debootstrap, apt, e2fsprogs, cryptsetup-bin, qemu-utils);
//! it never mounts anything or uses loop devices. The image gets the suite's `-updates` and
//! `-security` suites on top of debootstrap's packages (see `updates.rs`). Builds are keyed by the
//! hash of their inputs, which include the exact version of every package, resolved against the
//! archive before each build: an unchanged archive makes a rebuild a no-op, a Debian security fix
//! makes it a new image version.

mod builder;
mod files;
pub mod manifest;
pub mod mirror;
pub mod seed;
pub mod updates;

use std::path::{Path, PathBuf};

pub use builder::{BuildOutcome, DEFAULT_PACKAGES, cmdline, input_hash};
pub use manifest::{
    Artifact, GceDisk, Image, Manifest, Package, PackageDiff, RootDisk, Source, Verity,
    package_diff,
};

/// Default directory for built images.
pub const DEFAULT_IMAGE_DIR: &str = "/var/cache/clusterctl/images";
/// Environment variable overriding [`DEFAULT_IMAGE_DIR`].
pub const IMAGE_DIR_ENV: &str = "CLUSTERCTL_IMAGE_DIR";
/// Default Debian mirror for debootstrap: [`mirror::AUTO_MIRROR`], the mirror the machine's apt
/// uses, else [`mirror::FALLBACK_MIRROR`] (see [`mirror`]).
pub const DEFAULT_MIRROR: &str = mirror::AUTO_MIRROR;
/// Default Debian security mirror: [`mirror::AUTO_MIRROR`], the `debian-security` archive the
/// machine's apt uses, else [`mirror::FALLBACK_SECURITY_MIRROR`].
pub const DEFAULT_SECURITY_MIRROR: &str = mirror::AUTO_MIRROR;

/// What to build and where.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BuildOptions {
    /// Directory holding images (one subdirectory per version) and the download cache.
    pub image_dir: PathBuf,
    /// Debian suite.
    pub suite: String,
    /// Debian mirror, or [`mirror::AUTO_MIRROR`]. Not part of the input hash: a mirror serves the
    /// same packages.
    pub mirror: String,
    /// Debian security mirror for `<suite>-security`, or [`mirror::AUTO_MIRROR`]. Not part of the
    /// input hash either.
    pub security_mirror: String,
    /// Resolve the updates against the package lists fetched before instead of fetching them
    /// (for a machine that cannot reach the archive now); the manifest records their dates.
    pub offline: bool,
    /// Packages to install on top of debootstrap's `minbase`.
    pub packages: Vec<String>,
    /// Build even if an image with the same inputs exists.
    pub force: bool,
    /// Keep the work directory (root tree, build log) after a successful build.
    pub keep_work: bool,
}

impl BuildOptions {
    /// Defaults: bookworm, the machine's Debian mirror, [`DEFAULT_PACKAGES`].
    pub fn new(image_dir: PathBuf) -> Self {
        Self {
            image_dir,
            suite: "bookworm".into(),
            mirror: DEFAULT_MIRROR.into(),
            security_mirror: DEFAULT_SECURITY_MIRROR.into(),
            offline: false,
            packages: DEFAULT_PACKAGES.iter().map(|p| (*p).to_string()).collect(),
            force: false,
            keep_work: false,
        }
    }
}

/// The image directory from `$CLUSTERCTL_IMAGE_DIR`, else [`DEFAULT_IMAGE_DIR`].
pub fn default_image_dir() -> PathBuf {
    std::env::var_os(IMAGE_DIR_ENV)
        .filter(|v| !v.is_empty())
        .map_or_else(|| PathBuf::from(DEFAULT_IMAGE_DIR), PathBuf::from)
}

/// Builds the image described by `opts`, or returns the existing one with the same input hash.
pub fn build(opts: &BuildOptions) -> Result<BuildOutcome, NodeImageError> {
    builder::build(opts)
}

/// Lists the images in `image_dir`, oldest first, without verifying artifacts.
pub fn list(image_dir: &Path) -> Result<Vec<Image>, NodeImageError> {
    Ok(manifest::list(image_dir)?
        .into_iter()
        .map(|(dir, manifest, digest)| Image {
            dir,
            digest,
            manifest,
        })
        .collect())
}

/// Loads one image directory and verifies every artifact against the manifest's sha256.
pub fn load(dir: &Path) -> Result<Image, NodeImageError> {
    manifest::load(dir)
}

/// Errors from building, listing or loading images.
#[derive(Debug, thiserror::Error)]
pub enum NodeImageError {
    /// A file operation failed.
    #[error("{}: {source}", path.display())]
    Io {
        /// File or directory involved.
        path: PathBuf,
        /// Underlying error.
        source: std::io::Error,
    },
    /// A manifest could not be read or written as JSON.
    #[error("image manifest {}: {source}", path.display())]
    Manifest {
        /// The manifest file.
        path: PathBuf,
        /// Underlying error.
        source: serde_json::Error,
    },
    /// A manifest has a schema this version does not know.
    #[error("image manifest {}: schema {found} is not supported (this clusterctl reads {supported}); rebuild the image with `clusterctl image build`", path.display())]
    Schema {
        /// The manifest file.
        path: PathBuf,
        /// Schema in the file.
        found: u32,
        /// Schema this code reads.
        supported: u32,
    },
    /// An artifact's content does not match the manifest.
    #[error("image artifact {} is corrupt: sha256 {actual}, manifest says {expected}; rebuild with `clusterctl image build --force`", path.display())]
    Checksum {
        /// The artifact.
        path: PathBuf,
        /// sha256 in the manifest.
        expected: String,
        /// sha256 of the file.
        actual: String,
    },
    /// A manifest names an artifact outside its directory.
    #[error("image manifest names artifact {path:?} outside the image directory")]
    BadArtifactPath {
        /// The offending path.
        path: String,
    },
    /// An option value is not acceptable.
    #[error("invalid {option} {value:?}: only letters, digits and + - . : are allowed")]
    InvalidOption {
        /// Which option.
        option: &'static str,
        /// The value given.
        value: String,
    },
    /// Building needs root (chroot, root-owned files), and so does deciding that an image is up
    /// to date (apt resolves the updates in the image directory's cache).
    #[error(
        "building a node image needs root (apt resolves the updates in the image cache, chroot, \
         root-owned files), also when the image turns out to be up to date; run as root"
    )]
    NotRoot,
    /// A required program is not installed.
    #[error(
        "{tool} not found; install the Debian package {package} (tests/bed/install-host-packages.sh does)"
    )]
    ToolMissing {
        /// Program name.
        tool: &'static str,
        /// Debian package that provides it.
        package: &'static str,
    },
    /// A program could not be started.
    #[error("{step}: starting {program}: {source}")]
    Spawn {
        /// Build step.
        step: String,
        /// Program.
        program: String,
        /// Underlying error.
        source: std::io::Error,
    },
    /// A build tool failed.
    #[error("{step} failed ({status}); full output in {}:\n{stderr}", log.display())]
    Tool {
        /// Build step.
        step: String,
        /// Exit status.
        status: String,
        /// Last lines of its error output.
        stderr: String,
        /// Build log with the full output.
        log: PathBuf,
    },
    /// The archive could not be reached to fetch the package lists or `.deb` files of the updates.
    #[error(
        "could not fetch {what}; without them the image would lack the updates and \
         security fixes it is keyed by, so nothing was built. Check the mirrors (--mirror, --security-mirror, \
         CLUSTERCTL_DEBIAN_MIRROR, CLUSTERCTL_DEBIAN_SECURITY_MIRROR), {hint}. apt said {detail}"
    )]
    ArchiveUnreachable {
        /// What could not be fetched, from which mirrors.
        what: String,
        /// Where apt's full output is and its last lines.
        detail: String,
        /// What `--offline` would use, or why it cannot help.
        hint: String,
    },
    /// `--offline` without package lists from an earlier build.
    #[error(
        "no package lists of {suites} in {}: `--offline` builds from the lists an earlier build \
         fetched; run one build with the archive reachable first",
        dir.display()
    )]
    NoPackageLists {
        /// The lists directory.
        dir: PathBuf,
        /// The suites needed.
        suites: String,
    },
    /// The upgrade in the image did not install what was resolved.
    #[error(
        "the upgrade in the image root left {package} at {found}, but the build resolved {expected} \
         (the image's apt decided differently from the host's); apt's output is in build.log in \
         the image directory's .work-* directory"
    )]
    UpgradeMismatch {
        /// Package.
        package: String,
        /// Resolved version (or "nothing").
        expected: String,
        /// Installed version (or "nothing").
        found: String,
    },
    /// Tool output was not as expected.
    #[error("could not find {what}")]
    Parse {
        /// What was looked for.
        what: String,
    },
    /// Writing a seed disk failed.
    #[error("writing seed disk {}: {source}", path.display())]
    Seed {
        /// The seed image file.
        path: PathBuf,
        /// Underlying error.
        source: std::io::Error,
    },
}
