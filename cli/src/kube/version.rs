//! The API server's version and what it decides: which `policy` API version serves evictions
//! and PodDisruptionBudgets.

use std::fmt;

use super::KubeError;

/// A Kubernetes server version as `/version` reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerVersion {
    /// Major version (1).
    pub major: u32,
    /// Minor version (`20` also for a provider's `20+`).
    pub minor: u32,
    /// The full version, e.g. `v1.20.2`.
    pub git_version: String,
}

/// The `policy` API group version used for Eviction and PodDisruptionBudget.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PolicyApi {
    /// `policy/v1beta1`: the only one up to 1.20; removed in 1.25.
    V1beta1,
    /// `policy/v1`: PodDisruptionBudget from 1.21, Eviction from 1.22.
    V1,
}

impl PolicyApi {
    /// The apiVersion string, e.g. `policy/v1beta1`.
    pub fn api_version(self) -> &'static str {
        match self {
            PolicyApi::V1beta1 => "policy/v1beta1",
            PolicyApi::V1 => "policy/v1",
        }
    }
}

impl fmt::Display for PolicyApi {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.api_version())
    }
}

impl fmt::Display for ServerVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.git_version)
    }
}

impl ServerVersion {
    /// Reads `/version`'s fields. `minor` may carry a suffix (`"20+"` on some providers); when
    /// `major`/`minor` are empty (some builds), the numbers come from `gitVersion`.
    pub fn parse(major: &str, minor: &str, git_version: &str) -> Result<ServerVersion, KubeError> {
        let unsupported = |detail: &str| KubeError::UnsupportedVersion {
            version: format!("{git_version:?} (major {major:?}, minor {minor:?})"),
            detail: detail.to_owned(),
        };
        let number = |s: &str| -> Option<u32> {
            let digits: String = s.chars().take_while(char::is_ascii_digit).collect();
            digits.parse().ok()
        };
        let (maj, min) = match (number(major), number(minor)) {
            (Some(a), Some(b)) => (a, b),
            _ => {
                // "v1.20.2", "v1.20.2-gke.1", "1.20.2"
                let v = git_version.trim_start_matches('v');
                let mut parts = v.split('.');
                match (parts.next().and_then(number), parts.next().and_then(number)) {
                    (Some(a), Some(b)) => (a, b),
                    _ => return Err(unsupported("the version cannot be read")),
                }
            }
        };
        if maj != 1 {
            return Err(unsupported("only Kubernetes 1.x is known"));
        }
        Ok(ServerVersion {
            major: maj,
            minor: min,
            git_version: git_version.to_owned(),
        })
    }

    /// Which `policy` version to use for Eviction and PodDisruptionBudget.
    ///
    /// Up to 1.21: `policy/v1beta1`. 1.21 serves PodDisruptionBudget in both versions but
    /// Eviction only in v1beta1 (policy/v1 Eviction came with 1.22), and drain needs both
    /// kinds from one version. From 1.22: `policy/v1` (v1beta1 is gone in 1.25).
    pub fn policy_api(&self) -> PolicyApi {
        if self.minor <= 21 {
            PolicyApi::V1beta1
        } else {
            PolicyApi::V1
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_choose_the_policy_api() {
        // (major, minor, gitVersion) -> policy API, or None for an error.
        let table: &[(&str, &str, &str, Option<PolicyApi>)] = &[
            ("1", "20", "v1.20.2", Some(PolicyApi::V1beta1)),
            ("1", "20+", "v1.20.15-gke.300", Some(PolicyApi::V1beta1)),
            ("1", "19", "v1.19.16", Some(PolicyApi::V1beta1)),
            ("1", "21", "v1.21.14", Some(PolicyApi::V1beta1)),
            ("1", "22", "v1.22.0", Some(PolicyApi::V1)),
            ("1", "24", "v1.24.17", Some(PolicyApi::V1)),
            ("1", "25", "v1.25.0", Some(PolicyApi::V1)),
            ("1", "33", "v1.33.1", Some(PolicyApi::V1)),
            ("", "", "v1.20.2", Some(PolicyApi::V1beta1)),
            ("", "", "v1.23.4-eks", Some(PolicyApi::V1)),
            ("", "", "1.22.1", Some(PolicyApi::V1)),
            ("2", "0", "v2.0.0", None),
            ("", "", "garbage", None),
            ("", "", "", None),
        ];
        for (major, minor, git, want) in table {
            let got = ServerVersion::parse(major, minor, git).map(|v| v.policy_api());
            match (want, &got) {
                (Some(w), Ok(g)) => assert_eq!(w, g, "{major:?} {minor:?} {git:?}"),
                (None, Err(KubeError::UnsupportedVersion { .. })) => {}
                _ => panic!("{major:?} {minor:?} {git:?}: want {want:?}, got {got:?}"),
            }
        }
    }

    #[test]
    fn parsed_version_keeps_the_numbers_and_the_text() {
        let v = ServerVersion::parse("1", "20", "v1.20.2").unwrap_or_else(|e| panic!("{e}"));
        assert_eq!((v.major, v.minor), (1, 20));
        assert_eq!(v.to_string(), "v1.20.2");
        assert_eq!(v.policy_api().to_string(), "policy/v1beta1");
    }
}
