//! Which Debian mirrors the build downloads from: the archive (debootstrap, and the
//! `<suite>-updates` suite) and the security archive (`<suite>-security`).
//!
//! By default ([`AUTO_MIRROR`]) the image is built from the Debian mirror the machine's apt is
//! configured with, the same one `tests/bed/install-host-packages.sh` installs the host's packages
//! from: on a machine whose only way to Debian is a local mirror, `deb.debian.org` is unreachable.
//! An explicit mirror (`clusterctl image build --mirror`, `CLUSTERCTL_DEBIAN_MIRROR`) wins; with no
//! usable apt entry the fallback is [`FALLBACK_MIRROR`]. The security archive is found the same way
//! ([`resolve_security`]: the first `debian-security` archive in the apt sources), overridden by
//! `--security-mirror` / `CLUSTERCTL_DEBIAN_SECURITY_MIRROR`, else [`FALLBACK_SECURITY_MIRROR`].
//!
//! The mirrors are not part of an image's input hash: every Debian mirror serves the same `.deb`
//! files for a suite, and the hash names the suites and the exact version of every package the
//! image gets (resolved against the archive before each build, see `updates.rs`). Keying on the
//! mirror would only rebuild identical images on machines configured with different mirrors.

use std::path::Path;

/// The mirror value that means "the one the machine's apt uses, else [`FALLBACK_MIRROR`]".
pub const AUTO_MIRROR: &str = "auto";
/// Debian's redirector, used when apt names no Debian mirror.
pub const FALLBACK_MIRROR: &str = "http://deb.debian.org/debian";
/// Debian's security archive, used when apt names no security mirror.
pub const FALLBACK_SECURITY_MIRROR: &str = "http://deb.debian.org/debian-security";
/// apt's one-line sources file.
pub const APT_SOURCES_LIST: &str = "/etc/apt/sources.list";
/// apt's directory of `*.list` and deb822 `*.sources` files.
pub const APT_SOURCES_DIR: &str = "/etc/apt/sources.list.d";
/// The sources file the test bed writes from the mirror it found; never read back as evidence,
/// so a wrong mirror written once does not perpetuate itself.
const OWN_SOURCES_FILE: &str = "clusterctl-bed.sources";

/// A mirror and where it came from, for the build's log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mirror {
    /// Base URL handed to debootstrap.
    pub url: String,
    /// Why this one: "given", the apt file it was found in, or "fallback".
    pub source: String,
}

/// Resolves the requested mirror: [`AUTO_MIRROR`] (or empty) reads the machine's apt sources.
pub fn resolve(requested: &str) -> Mirror {
    let requested = requested.trim();
    if !requested.is_empty() && requested != AUTO_MIRROR {
        return Mirror {
            url: requested.to_string(),
            source: "given".into(),
        };
    }
    from_apt_files(&apt_source_files()).unwrap_or_else(|| Mirror {
        url: FALLBACK_MIRROR.into(),
        source: "fallback: no Debian mirror in the apt sources".into(),
    })
}

/// Resolves the requested security mirror: [`AUTO_MIRROR`] (or empty) reads the machine's apt
/// sources for a `debian-security` archive, else [`FALLBACK_SECURITY_MIRROR`].
pub fn resolve_security(requested: &str) -> Mirror {
    let requested = requested.trim();
    if !requested.is_empty() && requested != AUTO_MIRROR {
        return Mirror {
            url: requested.trim_end_matches('/').to_string(),
            source: "given".into(),
        };
    }
    security_from_apt_files(&apt_source_files()).unwrap_or_else(|| Mirror {
        url: FALLBACK_SECURITY_MIRROR.into(),
        source: "fallback: no Debian security mirror in the apt sources".into(),
    })
}

/// The machine's apt source files with their contents, in apt's order: `sources.list`, then
/// `sources.list.d/*.list` and `*.sources` by name. Unreadable files are skipped.
fn apt_source_files() -> Vec<(String, String)> {
    let mut names = vec![APT_SOURCES_LIST.to_string()];
    if let Ok(dir) = std::fs::read_dir(APT_SOURCES_DIR) {
        let mut more: Vec<String> = dir
            .filter_map(Result::ok)
            .map(|e| e.path().display().to_string())
            .collect();
        more.sort();
        names.extend(more);
    }
    names
        .into_iter()
        .filter_map(|n| std::fs::read_to_string(&n).ok().map(|c| (n, c)))
        .collect()
}

/// The first Debian mirror named by enabled `deb` entries in `files` (path, contents), in order.
/// Reads one-line `.list` files and deb822 `.sources` files; ignores comments, disabled stanzas,
/// `deb-src`-only entries, files apt would not read, the test bed's own file, security archives
/// and repositories that are not a Debian archive (the URL's last path segment must be `debian`).
pub fn from_apt_files(files: &[(String, String)]) -> Option<Mirror> {
    find_in_apt_files(files, is_debian_archive)
}

/// The first Debian security archive (the URL's last path segment is `debian-security`) named by
/// enabled `deb` entries in `files`, read like [`from_apt_files`].
pub fn security_from_apt_files(files: &[(String, String)]) -> Option<Mirror> {
    find_in_apt_files(files, is_security_archive)
}

fn find_in_apt_files(files: &[(String, String)], wanted: fn(&str) -> bool) -> Option<Mirror> {
    files.iter().find_map(|(path, contents)| {
        let name = Path::new(path)
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or_default();
        let uris = if name == OWN_SOURCES_FILE {
            Vec::new()
        } else if path == APT_SOURCES_LIST || name.ends_with(".list") {
            one_line_uris(contents)
        } else if name.ends_with(".sources") {
            deb822_uris(contents)
        } else {
            Vec::new()
        };
        uris.into_iter().find(|u| wanted(u)).map(|u| Mirror {
            url: u.trim_end_matches('/').to_string(),
            source: path.clone(),
        })
    })
}

/// URIs of `deb` lines: `deb [option=value ...] URI SUITE [COMPONENT...]`.
fn one_line_uris(contents: &str) -> Vec<String> {
    contents
        .lines()
        .map(|l| l.split('#').next().unwrap_or_default().trim())
        .filter_map(|l| {
            let rest = l.strip_prefix("deb")?;
            if !rest.starts_with([' ', '\t']) {
                return None; // deb-src, or not an entry
            }
            let rest = rest.trim_start();
            let rest = match rest.strip_prefix('[') {
                Some(opts) => opts.split_once(']')?.1.trim_start(),
                None => rest,
            };
            rest.split_whitespace().next().map(str::to_string)
        })
        .collect()
}

/// URIs of deb822 stanzas whose `Types` include `deb` and that are not `Enabled: no`.
fn deb822_uris(contents: &str) -> Vec<String> {
    let mut uris = Vec::new();
    let lines: Vec<&str> = contents
        .lines()
        .filter(|l| !l.trim_start().starts_with('#'))
        .collect();
    for stanza in lines.split(|l| l.trim().is_empty()) {
        let field = |key: &str| {
            stanza.iter().find_map(|l| {
                let (k, v) = l.split_once(':')?;
                k.trim()
                    .eq_ignore_ascii_case(key)
                    .then(|| v.trim().to_string())
            })
        };
        let is_deb = field("Types").is_some_and(|t| t.split_whitespace().any(|t| t == "deb"));
        let enabled = field("Enabled").is_none_or(|e| !e.eq_ignore_ascii_case("no"));
        if is_deb
            && enabled
            && let Some(u) = field("URIs")
        {
            uris.extend(u.split_whitespace().map(str::to_string));
        }
    }
    uris
}

/// An http(s) Debian archive (the last path segment is `debian`), not a security archive.
fn is_debian_archive(uri: &str) -> bool {
    !uri.contains("security") && last_segment(uri) == Some("debian")
}

/// An http(s) Debian security archive (the last path segment is `debian-security`).
fn is_security_archive(uri: &str) -> bool {
    last_segment(uri) == Some("debian-security")
}

/// The last path segment of an http(s) URL with a path.
fn last_segment(uri: &str) -> Option<&str> {
    let rest = uri
        .strip_prefix("http://")
        .or_else(|| uri.strip_prefix("https://"))?;
    if !rest.contains('/') {
        return None;
    }
    rest.trim_end_matches('/').rsplit('/').next()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(files: &[(&str, &str)], expect: Option<(&str, &str)>) {
        let files: Vec<(String, String)> = files
            .iter()
            .map(|(p, c)| ((*p).to_string(), (*c).to_string()))
            .collect();
        let got = from_apt_files(&files).map(|m| (m.url, m.source));
        assert_eq!(
            got,
            expect.map(|(u, s)| (u.to_string(), s.to_string())),
            "{files:?}"
        );
    }

    const DEBIAN_IMAGE: &str = "Types: deb
# http://snapshot.debian.org/archive/debian/20250520T000000Z
URIs: http://deb.debian.org/debian
Suites: bookworm bookworm-updates
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb
# http://snapshot.debian.org/archive/debian-security/20250520T000000Z
URIs: http://deb.debian.org/debian-security
Suites: bookworm-security
Components: main
";

    #[test]
    fn debian_cloud_image_deb822() {
        check(
            &[("/etc/apt/sources.list.d/debian.sources", DEBIAN_IMAGE)],
            Some((
                "http://deb.debian.org/debian",
                "/etc/apt/sources.list.d/debian.sources",
            )),
        );
    }

    #[test]
    fn local_mirror_in_deb822_security_first() {
        let f = "Types: deb\nURIs: http://mirror.internal/debian-security\nSuites: bookworm-security\n\n\
                 Types: deb deb-src\nURIs: http://mirror.internal:3142/debian/\nSuites: bookworm\n";
        check(
            &[("/etc/apt/sources.list.d/local.sources", f)],
            Some((
                "http://mirror.internal:3142/debian",
                "/etc/apt/sources.list.d/local.sources",
            )),
        );
    }

    #[test]
    fn one_line_format_with_options_and_comments() {
        let f = "# deb http://commented.example/debian bookworm main\n\
                 deb-src http://src-only.example/debian bookworm main\n\
                 deb http://security.debian.org/debian-security bookworm-security main\n\
                 deb [arch=amd64 signed-by=/usr/share/keyrings/k.gpg] https://mirror.example.org/debian bookworm main # eu\n";
        check(
            &[("/etc/apt/sources.list", f)],
            Some(("https://mirror.example.org/debian", "/etc/apt/sources.list")),
        );
    }

    #[test]
    fn skips_disabled_stanzas_other_repositories_and_files_apt_ignores() {
        let disabled =
            "Types: deb\nURIs: http://off.example/debian\nSuites: bookworm\nEnabled: no\n";
        let vendor = "deb https://packages.cloud.google.com/apt cloud-sdk-bookworm main\n";
        let node = "Types: deb\nURIs: https://deb.nodesource.com/node_20.x\nSuites: nodistro\n";
        let renamed = "deb http://renamed.example/debian bookworm main\n";
        check(
            &[
                ("/etc/apt/sources.list.d/a.sources", disabled),
                ("/etc/apt/sources.list.d/google.list", vendor),
                ("/etc/apt/sources.list.d/nodesource.sources", node),
                ("/etc/apt/sources.list.d/x.list.disabled-by-farm", renamed),
            ],
            None,
        );
    }

    #[test]
    fn the_beds_own_file_is_not_evidence() {
        let own =
            "Types: deb deb-src\nURIs: http://stale.example/debian\nSuites: bookworm-backports\n";
        check(
            &[
                ("/etc/apt/sources.list.d/clusterctl-bed.sources", own),
                ("/etc/apt/sources.list.d/debian.sources", DEBIAN_IMAGE),
            ],
            Some((
                "http://deb.debian.org/debian",
                "/etc/apt/sources.list.d/debian.sources",
            )),
        );
    }

    #[test]
    fn security_mirror_from_the_same_files() {
        let files = |f: &[(&str, &str)]| -> Vec<(String, String)> {
            f.iter()
                .map(|(p, c)| ((*p).to_string(), (*c).to_string()))
                .collect()
        };
        let got = security_from_apt_files(&files(&[(
            "/etc/apt/sources.list.d/debian.sources",
            DEBIAN_IMAGE,
        )]));
        assert_eq!(
            got.map(|m| m.url).as_deref(),
            Some("http://deb.debian.org/debian-security")
        );
        let one_line = "deb http://mirror.example/debian bookworm main\n\
                        deb [signed-by=/k.gpg] http://mirror.example/debian-security/ bookworm-security main\n";
        let got = security_from_apt_files(&files(&[("/etc/apt/sources.list", one_line)]));
        assert_eq!(
            got.map(|m| (m.url, m.source)),
            Some((
                "http://mirror.example/debian-security".to_string(),
                "/etc/apt/sources.list".to_string()
            ))
        );
        // The archive itself and the bed's own file are no security mirror.
        let own =
            "Types: deb\nURIs: http://stale.example/debian-security\nSuites: bookworm-security\n";
        assert_eq!(
            security_from_apt_files(&files(&[
                ("/etc/apt/sources.list.d/clusterctl-bed.sources", own),
                (
                    "/etc/apt/sources.list",
                    "deb http://m.example/debian bookworm main\n"
                ),
            ])),
            None
        );
        let given = resolve_security("http://given.example/debian-security/");
        assert_eq!(given.url, "http://given.example/debian-security");
        assert!(is_security_archive(&resolve_security(AUTO_MIRROR).url));
    }

    #[test]
    fn explicit_mirror_wins_and_auto_falls_back() {
        let m = resolve("http://given.example/debian");
        assert_eq!(m.url, "http://given.example/debian");
        assert_eq!(m.source, "given");
        // `auto` reads this machine's files: whatever it finds is an http(s) Debian archive.
        let auto = resolve(AUTO_MIRROR);
        assert!(is_debian_archive(&auto.url), "{auto:?}");
    }
}
