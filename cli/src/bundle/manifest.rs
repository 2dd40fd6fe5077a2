//! The bundle manifest, `bundle.json`: what a bundle contains and the checksum of every file.
//!
//! ```json
//! {
//!   "formatVersion": 1,
//!   "kubernetesVersion": "1.20.2",
//!   "etcdVersion": "3.4.23",
//!   "pauseImage": "localhost/clusterctl/pause:3.4",
//!   "images": [{"reference": "localhost/clusterctl/pause:3.4", "path": "images/pause.tar"}],
//!   "files": [{"path": "bin/kube-apiserver", "sha256": "<64 hex>", "size": 123}],
//!   "source": {"kind": "debian-source-package", "sameCodeAs": null, "...": "..."}
//! }
//! ```
//! `tests/bed/build-k8s-bundle.sh` writes it for the offline test bundle; the upstream source
//! writes it after downloading and verifying the official release files.

use std::collections::{BTreeMap, HashSet};
use std::path::{Component, Path};

use serde::{Deserialize, Serialize};

use super::BundleError;
use super::version::KubeVersion;

/// The only manifest format this clusterctl reads and writes.
pub const FORMAT_VERSION: u32 = 1;

/// The manifest's file name at the root of a bundle.
pub const MANIFEST_FILE: &str = "bundle.json";

/// Binaries every bundle must carry, under `bin/`.
pub const REQUIRED_BINARIES: &[&str] = &[
    "kube-apiserver",
    "kube-controller-manager",
    "kube-scheduler",
    "kubelet",
    "kube-proxy",
    "kubectl",
    "etcd",
    "etcdctl",
];

/// Contents of `bundle.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Manifest {
    /// Manifest format; must equal [`FORMAT_VERSION`].
    pub format_version: u32,
    /// The Kubernetes version the binaries report.
    pub kubernetes_version: KubeVersion,
    /// The etcd version of `bin/etcd`.
    pub etcd_version: String,
    /// Image reference containerd and kubelet must use as the pod sandbox image.
    pub pause_image: String,
    /// Container image archives in the bundle (docker-archive tars for `ctr images import`).
    #[serde(default)]
    pub images: Vec<ImageEntry>,
    /// Every file of the bundle with its checksum; nothing unlisted is ever installed.
    pub files: Vec<FileEntry>,
    /// Where the bundle came from (informational, but `sameCodeAs` must be shown where used).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<BundleSource>,
}

/// A container image archive shipped in the bundle.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ImageEntry {
    /// The reference the archive is tagged with.
    pub reference: String,
    /// Path of the archive, relative to the bundle root; also listed in `files`.
    pub path: String,
}

/// One file with its expected size and sha256.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct FileEntry {
    /// Path relative to the bundle root (`bin/kubelet`).
    pub path: String,
    /// Lowercase hex sha256 of the content.
    pub sha256: String,
    /// Size in bytes.
    pub size: u64,
}

/// Provenance of a bundle.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct BundleSource {
    /// `debian-source-package` (the offline test bundle) or `upstream`.
    pub kind: String,
    /// Set when the binaries are another release's code stamped with a different version string
    /// (the test bundle's second version for upgrade tests): the version whose code this is.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub same_code_as: Option<String>,
    /// Further details (package versions, checksums of the inputs, toolchain).
    #[serde(flatten)]
    pub details: BTreeMap<String, serde_json::Value>,
}

impl Manifest {
    /// Parses and validates a manifest; `origin` names it in errors.
    pub fn from_json(bytes: &[u8], origin: &Path) -> Result<Manifest, BundleError> {
        let manifest: Manifest =
            serde_json::from_slice(bytes).map_err(|source| BundleError::ParseManifest {
                path: origin.to_path_buf(),
                source,
            })?;
        manifest.validate(origin)?;
        Ok(manifest)
    }

    /// Checks the manifest's internal consistency (not the files: that is [`super::Bundle::verify`]).
    pub fn validate(&self, origin: &Path) -> Result<(), BundleError> {
        let invalid = |reason: String| BundleError::InvalidManifest {
            path: origin.to_path_buf(),
            reason,
        };
        if self.format_version != FORMAT_VERSION {
            return Err(BundleError::UnsupportedFormat {
                path: origin.to_path_buf(),
                found: self.format_version,
                supported: FORMAT_VERSION,
            });
        }
        let mut seen = HashSet::new();
        for file in &self.files {
            check_relative_path(&file.path)?;
            if !seen.insert(file.path.as_str()) {
                return Err(invalid(format!("{} is listed twice", file.path)));
            }
            if file.sha256.len() != 64
                || !file
                    .sha256
                    .bytes()
                    .all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
            {
                return Err(invalid(format!(
                    "{} has a malformed sha256 {:?}",
                    file.path, file.sha256
                )));
            }
        }
        for name in REQUIRED_BINARIES {
            let path = format!("bin/{name}");
            if !seen.contains(path.as_str()) {
                return Err(invalid(format!("required binary {path} is not listed")));
            }
        }
        for image in &self.images {
            if !seen.contains(image.path.as_str()) {
                return Err(invalid(format!(
                    "image archive {} is not listed in files",
                    image.path
                )));
            }
        }
        if self.pause_image.trim().is_empty() {
            return Err(invalid("pauseImage is empty".to_string()));
        }
        if self.etcd_version.trim().is_empty() {
            return Err(invalid("etcdVersion is empty".to_string()));
        }
        Ok(())
    }

    /// The entry for `path`, if listed.
    pub fn file(&self, path: &str) -> Option<&FileEntry> {
        self.files.iter().find(|f| f.path == path)
    }

    /// Whether the pause image ships in the bundle (otherwise nodes must pull it).
    pub fn ships_pause_image(&self) -> bool {
        self.images.iter().any(|i| i.reference == self.pause_image)
    }
}

/// Refuses absolute paths, `..`, and anything else that could leave the bundle directory.
pub(crate) fn check_relative_path(path: &str) -> Result<(), BundleError> {
    let unsafe_path = || BundleError::UnsafePath {
        path: path.to_string(),
    };
    // Plain `/`-separated names only: no empty, `.` or `..` segments, so each file has exactly one
    // spelling and duplicates cannot hide behind `bin/./kubelet`.
    let plain = path
        .split('/')
        .all(|seg| !seg.is_empty() && seg != "." && seg != ".." && !seg.contains(['\\', '\0']));
    if !plain
        || !matches!(
            Path::new(path).components().next(),
            Some(Component::Normal(_))
        )
    {
        return Err(unsafe_path());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn sample_json() -> serde_json::Value {
        let files: Vec<_> = REQUIRED_BINARIES
            .iter()
            .map(|b| serde_json::json!({"path": format!("bin/{b}"), "sha256": "0".repeat(64), "size": 1}))
            .chain([serde_json::json!({"path": "images/pause.tar", "sha256": "a".repeat(64), "size": 2})])
            .collect();
        serde_json::json!({
            "formatVersion": 1,
            "kubernetesVersion": "1.20.2",
            "etcdVersion": "3.4.23",
            "pauseImage": "localhost/clusterctl/pause:3.4",
            "images": [{"reference": "localhost/clusterctl/pause:3.4", "path": "images/pause.tar"}],
            "files": files,
            "source": {"kind": "debian-source-package", "sameCodeAs": "1.20.2", "go": "go1.19.8"}
        })
    }

    fn parse(v: &serde_json::Value) -> Result<Manifest, BundleError> {
        Manifest::from_json(v.to_string().as_bytes(), Path::new("b/bundle.json"))
    }

    #[test]
    fn parses_a_valid_manifest_and_round_trips() {
        let m = parse(&sample_json()).unwrap();
        assert_eq!(m.kubernetes_version.to_string(), "1.20.2");
        assert!(m.ships_pause_image());
        let source = m.source.as_ref().unwrap();
        assert_eq!(source.same_code_as.as_deref(), Some("1.20.2"));
        assert_eq!(source.details["go"], "go1.19.8");
        let again = Manifest::from_json(&serde_json::to_vec(&m).unwrap(), Path::new("x")).unwrap();
        assert_eq!(again, m);
    }

    #[test]
    fn truncated_manifest_is_a_parse_error_naming_the_file() {
        let text = sample_json().to_string();
        let err = Manifest::from_json(
            &text.as_bytes()[..text.len() / 2],
            Path::new("b/bundle.json"),
        )
        .unwrap_err();
        assert!(matches!(err, BundleError::ParseManifest { .. }), "{err}");
        assert!(err.to_string().contains("b/bundle.json"), "{err}");
    }

    #[test]
    fn unknown_fields_wrong_format_and_bad_entries_are_refused() {
        let mut v = sample_json();
        v["surprise"] = serde_json::json!(1);
        assert!(matches!(
            parse(&v).unwrap_err(),
            BundleError::ParseManifest { .. }
        ));

        let mut v = sample_json();
        v["formatVersion"] = serde_json::json!(2);
        assert_eq!(
            parse(&v).unwrap_err().to_string(),
            "bundle manifest b/bundle.json has format version 2, this clusterctl reads version 1; use a \
             matching clusterctl or rebuild the bundle"
        );

        let mut v = sample_json();
        v["files"][0]["sha256"] = serde_json::json!("ABC");
        assert!(
            parse(&v)
                .unwrap_err()
                .to_string()
                .contains("malformed sha256")
        );

        let mut v = sample_json();
        let first = v["files"][0].clone();
        v["files"].as_array_mut().unwrap().push(first);
        assert!(parse(&v).unwrap_err().to_string().contains("listed twice"));

        let mut v = sample_json();
        v["files"].as_array_mut().unwrap().remove(0);
        assert!(
            parse(&v)
                .unwrap_err()
                .to_string()
                .contains("required binary bin/kube-apiserver")
        );

        let mut v = sample_json();
        v["kubernetesVersion"] = serde_json::json!("1.20");
        assert!(matches!(
            parse(&v).unwrap_err(),
            BundleError::ParseManifest { .. }
        ));
    }

    #[test]
    fn unsafe_paths_are_refused() {
        for bad in [
            "/etc/passwd",
            "../x",
            "bin/../../x",
            "",
            "a\\b",
            "./bin/x",
            "bin/./x",
            "bin//x",
            "bin/",
        ] {
            let mut v = sample_json();
            v["files"][0]["path"] = serde_json::json!(bad);
            let err = parse(&v).unwrap_err();
            assert!(
                matches!(err, BundleError::UnsafePath { .. }),
                "{bad}: {err}"
            );
        }
    }
}
