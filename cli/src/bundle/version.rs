//! Kubernetes versions and the table of minor versions clusterctl's templates support.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use super::BundleError;

/// A Kubernetes release version `MAJOR.MINOR.PATCH` (written with or without a leading `v`).
///
/// Pre-release and build suffixes are refused: bundles and upstream downloads name exact releases.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct KubeVersion {
    /// Major version (1).
    pub major: u32,
    /// Minor version (e.g. 20).
    pub minor: u32,
    /// Patch version (e.g. 2).
    pub patch: u32,
}

impl KubeVersion {
    /// The `vMAJOR.MINOR.PATCH` form used in release URLs and `--version` output.
    pub fn with_v(&self) -> String {
        format!("v{self}")
    }

    /// The `MAJOR.MINOR` pair, as used by the supported-versions table.
    pub fn minor_version(&self) -> (u32, u32) {
        (self.major, self.minor)
    }
}

impl fmt::Display for KubeVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}.{}", self.major, self.minor, self.patch)
    }
}

impl FromStr for KubeVersion {
    type Err = BundleError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let invalid = || BundleError::InvalidVersion {
            value: s.to_string(),
        };
        let digits = s.strip_prefix('v').unwrap_or(s);
        let mut parts = digits.split('.');
        let mut next = || -> Result<u32, BundleError> {
            let part = parts.next().ok_or_else(invalid)?;
            // Leading zeros and signs are not part of a release version.
            if part.is_empty()
                || !part.bytes().all(|b| b.is_ascii_digit())
                || (part.len() > 1 && part.starts_with('0'))
            {
                return Err(invalid());
            }
            part.parse().map_err(|_| invalid())
        };
        let version = KubeVersion {
            major: next()?,
            minor: next()?,
            patch: next()?,
        };
        if parts.next().is_some() {
            return Err(invalid());
        }
        Ok(version)
    }
}

impl Serialize for KubeVersion {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for KubeVersion {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let s = String::deserialize(deserializer)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// What clusterctl knows about one supported Kubernetes minor version.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SupportedMinor {
    /// Major version.
    pub major: u32,
    /// Minor version.
    pub minor: u32,
    /// The etcd release that upstream downloads use for this minor (kubeadm's choice).
    pub etcd_version: &'static str,
    /// The pause image upstream's kubelet and kubeadm default to for this minor.
    pub pause_image: &'static str,
}

/// Kubernetes minor versions whose flags and config API versions our templates know.
///
/// A version outside this table is refused at plan time rather than producing a broken cluster.
pub const SUPPORTED_MINORS: &[SupportedMinor] = &[SupportedMinor {
    major: 1,
    minor: 20,
    // kubeadm v1.20 `constants.DefaultEtcdVersion` and `PauseVersion`.
    etcd_version: "3.4.13",
    pause_image: "registry.k8s.io/pause:3.2",
}];

/// Returns the supported-versions entry for `version`, or a clear error naming what is supported.
pub fn check_supported(version: &KubeVersion) -> Result<&'static SupportedMinor, BundleError> {
    SUPPORTED_MINORS
        .iter()
        .find(|s| (s.major, s.minor) == version.minor_version())
        .ok_or_else(|| BundleError::UnsupportedVersion {
            version: *version,
            supported: supported_list(),
        })
}

/// The supported minor versions as a human-readable list, e.g. `1.20`.
pub fn supported_list() -> String {
    SUPPORTED_MINORS
        .iter()
        .map(|s| format!("{}.{}", s.major, s.minor))
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_with_and_without_v() {
        let a: KubeVersion = "v1.20.2".parse().unwrap();
        let b: KubeVersion = "1.20.2".parse().unwrap();
        assert_eq!(a, b);
        assert_eq!(a.to_string(), "1.20.2");
        assert_eq!(a.with_v(), "v1.20.2");
    }

    #[test]
    fn refuses_malformed_versions() {
        for bad in [
            "",
            "1.20",
            "1.20.2.1",
            "v1.20.x",
            "1.20.2-rc.0",
            "1.020.2",
            "+1.20.2",
            "vv1.20.2",
            "1..2",
        ] {
            let err = bad.parse::<KubeVersion>().unwrap_err();
            assert!(
                matches!(err, BundleError::InvalidVersion { .. }),
                "{bad}: {err}"
            );
        }
    }

    #[test]
    fn orders_numerically() {
        let a: KubeVersion = "1.20.10".parse().unwrap();
        let b: KubeVersion = "1.20.9".parse().unwrap();
        assert!(a > b);
    }

    #[test]
    fn supports_1_20_only() {
        let ok: KubeVersion = "1.20.3".parse().unwrap();
        assert_eq!(check_supported(&ok).unwrap().etcd_version, "3.4.13");
        let bad: KubeVersion = "1.21.0".parse().unwrap();
        let err = check_supported(&bad).unwrap_err();
        assert_eq!(
            err.to_string(),
            "kubernetes 1.21.0 is not supported: this clusterctl supports 1.20; choose a supported version \
             or upgrade clusterctl"
        );
    }
}
