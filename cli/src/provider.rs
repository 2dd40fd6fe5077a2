//! From a spec's provider block to a live [`Provider`], and from a spec to the node image its
//! machines boot. Each provider adds its arm here.

use std::path::{Path, PathBuf};

use providers::{ImageRef, Provider, ProviderError};

use crate::spec;

/// The provider a spec asks for.
pub fn provider_for(spec: &spec::Cluster) -> Result<Box<dyn Provider>, ProviderError> {
    match &spec.spec.provider {
        #[cfg(feature = "fake")]
        spec::Provider::Fake(f) => {
            let options = providers::fake::FakeOptions::from_env()?;
            Ok(Box::new(providers::fake::FakeProvider::new(
                &f.directory,
                options,
            )?))
        }
        #[cfg(not(feature = "fake"))]
        spec::Provider::Fake(_) => Err(ProviderError::Invalid(
            "this clusterctl was built without the fake provider (cargo feature `fake`)".into(),
        )),
        #[cfg(feature = "libvirt")]
        spec::Provider::Libvirt(l) => {
            let config = libvirt_config(l)?;
            Ok(Box::new(providers::libvirt::LibvirtProvider::connect(
                config,
            )?))
        }
        #[cfg(not(feature = "libvirt"))]
        spec::Provider::Libvirt(_) => Err(ProviderError::Invalid(
            "this clusterctl was built without the libvirt provider (cargo feature `libvirt`)"
                .into(),
        )),
        spec::Provider::Gce(_) => Err(ProviderError::Invalid(
            "the gce provider is not implemented yet (validation refuses it); use `provider: {libvirt: ...}`".into(),
        )),
    }
}

/// The libvirt provider's settings from the spec's `provider.libvirt` block.
#[cfg(feature = "libvirt")]
fn libvirt_config(
    l: &spec::LibvirtProvider,
) -> Result<providers::libvirt::LibvirtConfig, ProviderError> {
    use providers::libvirt::{Accelerator, LibvirtConfig};
    let mut config = LibvirtConfig::new(l.uri.clone());
    config.storage_root = l
        .storage_dir
        .to_str()
        .ok_or_else(|| {
            ProviderError::Invalid(format!(
                "provider.libvirt.storageDir {} is not valid UTF-8; choose another directory",
                l.storage_dir.display()
            ))
        })?
        .to_owned();
    config.accelerator = match l.accelerator {
        spec::Accelerator::Kvm => Accelerator::Kvm,
        spec::Accelerator::Tcg => Accelerator::Tcg,
        spec::Accelerator::Auto => Accelerator::Auto,
    };
    config.network_cidr = match (l.network.mode, l.network.cidr) {
        (spec::NetworkMode::Isolated, ipnet::IpNet::V4(net)) => {
            Some((net.network(), net.prefix_len()))
        }
        (spec::NetworkMode::Isolated, ipnet::IpNet::V6(net)) => {
            return Err(ProviderError::Invalid(format!(
                "provider.libvirt.network.cidr {net} is IPv6; the libvirt provider needs an IPv4 machine network"
            )));
        }
        (mode, _) => {
            return Err(ProviderError::Invalid(format!(
                "provider.libvirt.network.mode {mode:?} is not supported by the libvirt provider yet; use mode: isolated"
            )));
        }
    };
    Ok(config)
}

/// Makes paths in the provider block absolute (relative ones are relative to the spec file), so
/// that the spec stored in the cluster state works from any directory, e.g. for `clusterctl delete`.
pub fn absolutize_paths(spec: &mut spec::Cluster, spec_file: &Path) {
    let base = std::path::absolute(spec_file).unwrap_or_else(|_| spec_file.to_path_buf());
    if let spec::Provider::Fake(f) = &mut spec.spec.provider {
        f.directory = spec::resolve_path(&base, &f.directory);
    }
    if let Some(key) = &mut spec.spec.ssh.private_key {
        *key = spec::resolve_path(&base, key);
    }
}

/// Errors of choosing the node image.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    /// No image is built.
    #[error(
        "no node image is built in {}; build one with `clusterctl image build` (as root), or set {} to the directory holding images",
        dir.display(),
        nodeimage::IMAGE_DIR_ENV
    )]
    NoneBuilt {
        /// The image directory searched.
        dir: PathBuf,
    },
    /// The spec names a version that is not built.
    #[error(
        "node image {version:?} (spec.nodeImage.version) is not in {}; `clusterctl image list` shows the built ones, `clusterctl image build` builds the current one",
        dir.display()
    )]
    VersionMissing {
        /// The version asked for.
        version: String,
        /// The image directory searched.
        dir: PathBuf,
    },
    /// An upgrade names an image that is not built.
    #[error(
        "node image {version:?} is not built in {}; `clusterctl image list` shows the built ones, `clusterctl image build` builds one",
        dir.display()
    )]
    NotBuilt {
        /// The version asked for.
        version: String,
        /// The image directory searched.
        dir: PathBuf,
    },
    /// The spec names another image than the one the cluster runs.
    #[error(
        "spec.nodeImage.version is {spec:?}, but the cluster's machines boot {pinned:?} (pinned at create, changed only by an upgrade); remove the field or set it to {pinned:?}, or run `clusterctl upgrade NAME --node-image {spec}`"
    )]
    PinnedDiffers {
        /// The version the spec names.
        spec: String,
        /// The cluster's image.
        pinned: String,
    },
    /// The cluster's image is gone or was rebuilt with other content.
    #[error(
        "the cluster's node image {version:?} (digest {digest}) is not in {}; new machines must boot the same image as the others: restore it there, or upgrade the cluster to a built image with `clusterctl upgrade NAME --node-image VERSION`",
        dir.display()
    )]
    PinnedMissing {
        /// Its version.
        version: String,
        /// Its digest.
        digest: String,
        /// The image directory searched.
        dir: PathBuf,
    },
    /// Listing or verifying images failed.
    #[error("checking node image in {}", dir.display())]
    Image {
        /// The image directory.
        dir: PathBuf,
        /// Why.
        #[source]
        source: nodeimage::NodeImageError,
    },
}

/// The node image a spec's machines boot. For an existing cluster, the image pinned in its
/// record (`pinned`): a spec naming another version is refused (that is an upgrade). For a new
/// one, `spec.nodeImage.version` if given, else the newest image built in `image_dir`. Every
/// artifact is verified against the manifest's checksums, so a damaged image is refused before
/// any machine is created.
pub fn node_image(
    spec: &spec::Cluster,
    pinned: Option<&crate::state::PinnedImage>,
    image_dir: &Path,
) -> Result<ImageRef, ImageError> {
    if let spec::Provider::Fake(f) = &spec.spec.provider {
        // The fake provider boots nothing.
        return Ok(ImageRef {
            version: "fake-no-image".into(),
            dir: f.directory.clone(),
            digest: "fake-no-image".into(),
        });
    }
    let wrap = |source| ImageError::Image {
        dir: image_dir.to_path_buf(),
        source,
    };
    let images = nodeimage::list(image_dir).map_err(wrap)?;
    if let Some(p) = pinned {
        if let Some(v) = &spec.spec.node_image.version
            && *v != p.version
        {
            return Err(ImageError::PinnedDiffers {
                spec: v.clone(),
                pinned: p.version.clone(),
            });
        }
        let missing = || ImageError::PinnedMissing {
            version: p.version.clone(),
            digest: p.digest.clone(),
            dir: image_dir.to_path_buf(),
        };
        return match load_version(&images, &p.version, image_dir) {
            Ok(i) if i.digest == p.digest => Ok(i),
            Ok(_) | Err(ImageError::VersionMissing { .. }) => Err(missing()),
            Err(e) => Err(e),
        };
    }
    let chosen = match &spec.spec.node_image.version {
        Some(version) => images
            .iter()
            .find(|i| &i.manifest.version == version)
            .ok_or_else(|| ImageError::VersionMissing {
                version: version.clone(),
                dir: image_dir.to_path_buf(),
            })?,
        // `list` sorts oldest first.
        None => images.last().ok_or_else(|| ImageError::NoneBuilt {
            dir: image_dir.to_path_buf(),
        })?,
    };
    let image = nodeimage::load(&chosen.dir).map_err(wrap)?;
    Ok(ImageRef {
        version: image.manifest.version.clone(),
        dir: image.dir.clone(),
        digest: image.digest.clone(),
    })
}

/// A built node image by version (for an upgrade's target), every artifact verified.
pub fn built_image(version: &str, image_dir: &Path) -> Result<ImageRef, ImageError> {
    let images = nodeimage::list(image_dir).map_err(|source| ImageError::Image {
        dir: image_dir.to_path_buf(),
        source,
    })?;
    load_version(&images, version, image_dir).map_err(|e| match e {
        ImageError::VersionMissing { version, dir } => ImageError::NotBuilt { version, dir },
        other => other,
    })
}

/// A built node image by manifest digest (to roll a machine back to what it booted), verified;
/// `None` if no built image has that digest.
pub fn built_image_by_digest(digest: &str, image_dir: &Path) -> Option<ImageRef> {
    let images = nodeimage::list(image_dir).ok()?;
    let version = &images.iter().find(|i| i.digest == digest)?.manifest.version;
    load_version(&images, version, image_dir)
        .ok()
        .filter(|i| i.digest == digest)
}

fn load_version(
    images: &[nodeimage::Image],
    version: &str,
    image_dir: &Path,
) -> Result<ImageRef, ImageError> {
    let found = images
        .iter()
        .find(|i| i.manifest.version == version)
        .ok_or_else(|| ImageError::VersionMissing {
            version: version.to_owned(),
            dir: image_dir.to_path_buf(),
        })?;
    let image = nodeimage::load(&found.dir).map_err(|source| ImageError::Image {
        dir: image_dir.to_path_buf(),
        source,
    })?;
    Ok(ImageRef {
        version: image.manifest.version.clone(),
        dir: image.dir.clone(),
        digest: image.digest.clone(),
    })
}
