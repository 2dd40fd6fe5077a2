//! Debian's `<suite>-updates` and `<suite>-security` suites: which versions they bring to the
//! image, decided before the build so that the input hash names them.
//!
//! The host's apt resolves the upgrade against the dpkg database of the cached installed tree,
//! with a private configuration in `<image-dir>/cache/apt-<suite>/` (nothing of the host's own apt
//! setup is read: `APT_CONFIG` points at our file, which moves `Dir::Etc` there):
//! `apt-get update` fetches the package lists of `<suite>`, `<suite>-updates` (same mirror) and
//! `<suite>-security` (the security mirror), and `apt-get -s dist-upgrade` says which packages
//! change to which version ([`parse_simulation`]). The resulting package set (every package at its
//! exact version, [`Resolved::package_set`]) is part of the input hash, so a Debian security fix
//! gives a new image version and an unchanged archive reuses the image already built.
//!
//! The build then downloads those `.deb` files into `<image-dir>/cache/debs/` (kept: a rebuild at
//! the same versions downloads nothing), copies the lists and the `.deb` files into the image root
//! and runs `apt-get dist-upgrade --no-download` there, so the chroot installs exactly what was
//! resolved and never talks to the network.
//!
//! An archive that cannot be reached is an error naming the mirrors; `--offline` resolves against
//! the lists fetched last time instead (the manifest records their Release dates), so an image
//! never claims security updates it does not have.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::NodeImageError;
use crate::manifest::Source;

/// The keyring apt checks the Debian archives' signatures with, on the host and in the image
/// (package `debian-archive-keyring`; apt depends on it, so the image has it too).
pub const ARCHIVE_KEYRING: &str = "/usr/share/keyrings/debian-archive-keyring.gpg";

/// One apt source: a suite on a mirror.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Suite {
    /// Suite (codename) name, e.g. `bookworm-security`.
    pub name: String,
    /// Mirror base URL.
    pub uri: String,
}

/// The suites an image is built from: the base suite and its updates on `mirror`, its security
/// suite on `security_mirror`.
pub fn suites(suite: &str, mirror: &str, security_mirror: &str) -> Vec<Suite> {
    vec![
        Suite {
            name: suite.to_string(),
            uri: mirror.to_string(),
        },
        Suite {
            name: format!("{suite}-updates"),
            uri: mirror.to_string(),
        },
        Suite {
            name: format!("{suite}-security"),
            uri: security_mirror.to_string(),
        },
    ]
}

/// apt's one-line sources for `suites` (component `main`, signatures checked with
/// [`ARCHIVE_KEYRING`]).
pub fn sources_list(suites: &[Suite]) -> String {
    suites
        .iter()
        .map(|s| {
            format!(
                "deb [signed-by={ARCHIVE_KEYRING}] {} {} main\n",
                s.uri, s.name
            )
        })
        .collect()
}

/// A change `apt-get -s dist-upgrade` announces.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    /// A package installed or upgraded to `version`, from the archives apt names
    /// (`Debian-Security:12/oldstable-security`: origin, version, archive).
    Install {
        /// Package name (without `:arch`).
        name: String,
        /// The version installed.
        version: String,
        /// The archives that carry this version, as apt prints them.
        archives: Vec<String>,
    },
    /// A package removed.
    Remove {
        /// Package name (without `:arch`).
        name: String,
    },
}

/// Parses the `Inst` and `Remv`/`Purg` lines of `apt-get -s` output (`Conf` and the prose are
/// skipped). A line that starts like a change but does not parse is an error, not a guess.
pub fn parse_simulation(out: &str) -> Result<Vec<Change>, NodeImageError> {
    let bad = |line: &str| NodeImageError::Parse {
        what: format!("a package and version in the apt-get -s line {line:?}"),
    };
    let mut changes = Vec::new();
    for line in out.lines() {
        let (kind, rest) = match line.split_once(' ') {
            Some((k @ ("Inst" | "Remv" | "Purg"), rest)) => (k, rest.trim()),
            _ => continue,
        };
        let (name, rest) = rest.split_once(' ').unwrap_or((rest, ""));
        let name = name.split(':').next().unwrap_or_default();
        if name.is_empty() {
            return Err(bad(line));
        }
        if kind != "Inst" {
            changes.push(Change::Remove { name: name.into() });
            continue;
        }
        // "Inst NAME [OLD] (NEW ARCHIVE[, ARCHIVE...] [ARCH]) [...]"; [OLD] is absent for a new
        // package.
        let rest = rest.trim_start();
        let rest = match rest.strip_prefix('[') {
            Some(r) => r.split_once(']').ok_or_else(|| bad(line))?.1.trim_start(),
            None => rest,
        };
        let inner = rest
            .strip_prefix('(')
            .and_then(|r| r.split_once(')'))
            .map(|(inner, _)| inner)
            .ok_or_else(|| bad(line))?;
        let inner = match inner.rfind(" [") {
            Some(i) => &inner[..i],
            None => inner,
        };
        let (version, archives) = inner.split_once(' ').unwrap_or((inner, ""));
        if version.is_empty() {
            return Err(bad(line));
        }
        changes.push(Change::Install {
            name: name.into(),
            version: version.into(),
            archives: archives
                .split(',')
                .map(str::trim)
                .filter(|a| !a.is_empty())
                .map(str::to_string)
                .collect(),
        });
    }
    Ok(changes)
}

/// The installed packages (name -> version) of a dpkg status file.
pub fn parse_status(status: &str) -> BTreeMap<String, String> {
    let mut installed = BTreeMap::new();
    for stanza in status.split("\n\n") {
        let field = |key: &str| {
            stanza.lines().find_map(|l| {
                l.strip_prefix(key)
                    .and_then(|r| r.strip_prefix(':'))
                    .map(str::trim)
            })
        };
        if let (Some(name), Some(version), Some(st)) =
            (field("Package"), field("Version"), field("Status"))
            && st.ends_with(" installed")
        {
            installed.insert(name.to_string(), version.to_string());
        }
    }
    installed
}

/// What a Release file says about its suite.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Release {
    /// `Suite:` (e.g. `oldstable-security`), the name apt prints in `apt-get -s` lines.
    pub suite: String,
    /// `Codename:` (e.g. `bookworm-security`).
    pub codename: String,
    /// `Date:`, as the archive wrote it (RFC 2822, UTC).
    pub date: String,
}

/// The fields of a (clear-signed or plain) Release file that name and date the suite.
pub fn parse_release(text: &str) -> Release {
    let mut r = Release::default();
    for line in text.lines() {
        if line.is_empty() && !r.codename.is_empty() {
            break; // the end of the first paragraph: the checksums and signature follow
        }
        let Some((k, v)) = line.split_once(": ") else {
            continue;
        };
        let v = v.trim().to_string();
        match k {
            "Suite" if r.suite.is_empty() => r.suite = v,
            "Codename" if r.codename.is_empty() => r.codename = v,
            "Date" if r.date.is_empty() => r.date = v,
            _ => {}
        }
    }
    r
}

/// The upgrade resolved against the archive: what the image will hold.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resolved {
    /// The suites, with the Release date of the lists the resolution used.
    pub sources: Vec<Source>,
    /// The packages of the cached installed tree, name -> version.
    pub base: BTreeMap<String, String>,
    /// The changes the upgrade makes to it.
    pub changes: Vec<Change>,
    /// Suite name (`oldstable-security`) -> codename (`bookworm-security`), from the lists.
    pub codenames: BTreeMap<String, String>,
}

impl Resolved {
    /// Every package the image holds after the upgrade, name -> version (sorted by name, so the
    /// order apt printed the changes in does not matter).
    pub fn package_set(&self) -> BTreeMap<String, String> {
        let mut set = self.base.clone();
        for c in &self.changes {
            match c {
                Change::Install { name, version, .. } => {
                    set.insert(name.clone(), version.clone());
                }
                Change::Remove { name } => {
                    set.remove(name);
                }
            }
        }
        set
    }

    /// The packages the upgrade installs, name -> (version, suites it comes from).
    pub fn installs(&self) -> BTreeMap<&str, (&str, String)> {
        self.changes
            .iter()
            .filter_map(|c| match c {
                Change::Install {
                    name,
                    version,
                    archives,
                } => Some((name.as_str(), (version.as_str(), self.suites_of(archives)))),
                Change::Remove { .. } => None,
            })
            .collect()
    }

    /// Codenames of the archives apt names (`Debian-Security:12/oldstable-security` ->
    /// `bookworm-security`), comma-separated; an archive not in the lists stays as apt wrote it.
    fn suites_of(&self, archives: &[String]) -> String {
        archives
            .iter()
            .map(|a| {
                let suite = a.rsplit('/').next().unwrap_or(a);
                self.codenames
                    .get(suite)
                    .cloned()
                    .unwrap_or_else(|| a.clone())
            })
            .collect::<Vec<_>>()
            .join(",")
    }

    /// How many packages the upgrade installs from each suite (codename), for the build's log.
    pub fn counts(&self) -> BTreeMap<String, usize> {
        let mut n = BTreeMap::new();
        for (_, (_, suites)) in self.installs() {
            *n.entry(suites).or_insert(0) += 1;
        }
        n
    }
}

/// The host's apt with a private configuration and state under `dir`.
pub(crate) struct HostApt {
    /// `<image-dir>/cache/apt-<suite>`.
    pub dir: PathBuf,
    /// Where downloaded `.deb` files are kept (`<image-dir>/cache/debs`).
    pub debs: PathBuf,
    /// The log of every apt run.
    pub log: PathBuf,
    suites: Vec<Suite>,
}

impl HostApt {
    /// Prepares the directory layout and configuration for `suites`.
    pub fn new(cache: &Path, suite: &str, suites: Vec<Suite>) -> Result<Self, NodeImageError> {
        let dir = cache.join(format!("apt-{suite}"));
        let debs = cache.join("debs");
        for d in [
            dir.join("etc/apt.conf.d"),
            dir.join("etc/preferences.d"),
            dir.join("etc/sources.list.d"),
            dir.join("etc/trusted.gpg.d"),
            dir.join("lists/partial"),
            dir.join("state"),
            dir.join("pkgcache"),
            debs.join("partial"),
        ] {
            fs::create_dir_all(&d).map_err(|e| io(&d, e))?;
        }
        let apt = Self {
            log: dir.join("apt.log"),
            dir,
            debs,
            suites,
        };
        write(
            &apt.dir.join("etc/sources.list"),
            &sources_list(&apt.suites),
        )?;
        write(&apt.dir.join("etc/apt.conf"), "")?;
        write(&apt.config_path(), &apt.config())?;
        Ok(apt)
    }

    fn config_path(&self) -> PathBuf {
        self.dir.join("apt-config")
    }

    /// apt's configuration: everything under our directory, nothing from the host's `/etc/apt`.
    fn config(&self) -> String {
        let d = self.dir.display();
        format!(
            "Dir \"/\";\n\
             Dir::Etc \"{d}/etc\";\n\
             Dir::Etc::main \"apt.conf\";\n\
             Dir::Etc::parts \"apt.conf.d\";\n\
             Dir::Etc::sourcelist \"sources.list\";\n\
             Dir::Etc::sourceparts \"sources.list.d\";\n\
             Dir::Etc::preferences \"preferences\";\n\
             Dir::Etc::preferencesparts \"preferences.d\";\n\
             Dir::Etc::trusted \"trusted.gpg\";\n\
             Dir::Etc::trustedparts \"trusted.gpg.d\";\n\
             Dir::State \"{d}/state\";\n\
             Dir::State::lists \"{d}/lists\";\n\
             Dir::Cache \"{d}/pkgcache\";\n\
             Dir::Cache::archives \"{}\";\n\
             Dir::Log \"{d}\";\n\
             APT::Architecture \"amd64\";\n\
             APT::Architectures {{ \"amd64\"; }};\n\
             APT::Install-Recommends \"false\";\n\
             APT::Install-Suggests \"false\";\n\
             Acquire::Languages \"none\";\n\
             Acquire::Retries \"2\";\n\
             Acquire::http::Timeout \"30\";\n",
            self.debs.display()
        )
    }

    fn run(&self, step: &str, args: &[&str], status: &Path) -> Result<String, NodeImageError> {
        let mut cmd = Command::new("apt-get");
        cmd.env("APT_CONFIG", self.config_path())
            .env("LC_ALL", "C")
            .env("DEBIAN_FRONTEND", "noninteractive")
            .arg("-o")
            .arg(format!("Dir::State::status={}", status.display()))
            .args(args);
        crate::builder::run_logged(&self.log, step, &mut cmd)
    }

    /// `apt-get update`. A failure (an unreachable or broken mirror) is
    /// [`NodeImageError::ArchiveUnreachable`], with what `--offline` would use. apt reports an
    /// unreachable mirror as a warning and exits 0, so its output is read too: any `Err:` or
    /// `W:`/`E:` line about fetching fails the update, and so does a suite without lists after it.
    pub fn update(&self, status: &Path) -> Result<(), NodeImageError> {
        let mut cmd = Command::new("apt-get");
        cmd.env("APT_CONFIG", self.config_path())
            .env("LC_ALL", "C")
            .env("DEBIAN_FRONTEND", "noninteractive")
            .arg("-o")
            .arg(format!("Dir::State::status={}", status.display()))
            .arg("update");
        let failure = match crate::builder::run_logged_both(&self.log, "apt-get update", &mut cmd) {
            Ok((stdout, stderr)) => update_problems(&stdout, &stderr),
            Err(NodeImageError::Tool { stderr, .. }) => Some(stderr),
            Err(e) => return Err(e),
        };
        let failure = match (failure, self.lists_of_each_suite()) {
            (Some(detail), _) => detail,
            (None, Err(missing)) => format!("no package lists of {missing} after apt-get update"),
            (None, Ok(_)) => return Ok(()),
        };
        Err(NodeImageError::ArchiveUnreachable {
            what: format!(
                "the package lists of {}",
                self.suites
                    .iter()
                    .map(|s| format!("{} from {}", s.name, s.uri))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
            detail: format!("(full output in {}):\n{failure}", self.log.display()),
            hint: match self.lists_of_each_suite() {
                Ok(sources) => format!(
                    "or build from the package lists fetched before ({}) with \
                     `--offline` (CLUSTERCTL_IMAGE_OFFLINE=1)",
                    describe(&sources)
                ),
                Err(_) => "no complete package lists from these mirrors were fetched before, \
                           so `--offline` cannot help yet"
                    .into(),
            },
        })
    }

    /// The suites with the Release date of their fetched lists, if every suite has its Release
    /// file and its `Packages` list from the mirror it is configured with; else the first suite
    /// that lacks them.
    pub fn lists_of_each_suite(&self) -> Result<Vec<Source>, String> {
        let lists = self.dir.join("lists");
        let names: Vec<String> = fs::read_dir(&lists)
            .map(|d| {
                d.filter_map(Result::ok)
                    .filter_map(|e| e.file_name().into_string().ok())
                    .collect()
            })
            .unwrap_or_default();
        let mut sources = Vec::new();
        for s in &self.suites {
            let prefix = format!("{}_dists_{}_", uri_file_name(&s.uri), s.name);
            let missing = || format!("{} from {}", s.name, s.uri);
            let release = names
                .iter()
                .find(|n| {
                    n.strip_prefix(&prefix)
                        .is_some_and(|r| r == "InRelease" || r == "Release")
                })
                .ok_or_else(missing)?;
            if !names
                .iter()
                .any(|n| n.starts_with(&format!("{prefix}main_binary-amd64_Packages")))
            {
                return Err(missing());
            }
            let text = fs::read_to_string(lists.join(release)).map_err(|_| missing())?;
            let r = parse_release(&text);
            if r.codename != s.name {
                return Err(missing());
            }
            sources.push(Source {
                suite: s.name.clone(),
                uri: s.uri.clone(),
                date: r.date,
            });
        }
        Ok(sources)
    }

    /// The Release files of the fetched lists.
    fn releases(&self) -> Result<Vec<Release>, NodeImageError> {
        let lists = self.dir.join("lists");
        let mut out = Vec::new();
        for entry in fs::read_dir(&lists).map_err(|e| io(&lists, e))? {
            let path = entry.map_err(|e| io(&lists, e))?.path();
            let name = path
                .file_name()
                .and_then(|n| n.to_str())
                .unwrap_or_default();
            if name.ends_with("_InRelease") || name.ends_with("_Release") {
                let text = fs::read_to_string(&path).map_err(|e| io(&path, e))?;
                out.push(parse_release(&text));
            }
        }
        Ok(out)
    }

    /// Resolves the upgrade of the tree whose dpkg database is `status`: `apt-get update`
    /// (unless `offline`), then `apt-get -s dist-upgrade`.
    pub fn resolve(&self, status: &Path, offline: bool) -> Result<Resolved, NodeImageError> {
        if offline {
            tracing::info!(lists = %self.dir.join("lists").display(), "offline: using the package lists fetched before");
        } else {
            tracing::info!(suites = %self.suites.iter().map(|s| s.name.as_str()).collect::<Vec<_>>().join(" "), "fetching package lists");
            self.update(status)?;
        }
        let sources =
            self.lists_of_each_suite()
                .map_err(|missing| NodeImageError::NoPackageLists {
                    dir: self.dir.join("lists"),
                    suites: missing,
                })?;
        let out = self.run("apt-get -s dist-upgrade", &["-s", "dist-upgrade"], status)?;
        let changes = parse_simulation(&out)?;
        let base_text = fs::read_to_string(status).map_err(|e| io(status, e))?;
        let base = parse_status(&base_text);
        if base.is_empty() {
            return Err(NodeImageError::Parse {
                what: format!("installed packages in {}", status.display()),
            });
        }
        let codenames = self
            .releases()?
            .into_iter()
            .map(|r| (r.suite, r.codename))
            .collect();
        Ok(Resolved {
            sources,
            base,
            changes,
            codenames,
        })
    }

    /// Downloads the `.deb` files of the upgrade into [`Self::debs`] (those already there are
    /// kept and not fetched again).
    pub fn download(&self, status: &Path) -> Result<(), NodeImageError> {
        self.run(
            "apt-get --download-only dist-upgrade",
            &["-y", "--download-only", "dist-upgrade"],
            status,
        )
        .map(|_| ())
    }

    /// The directory of the fetched package lists.
    pub fn lists(&self) -> PathBuf {
        self.dir.join("lists")
    }
}

/// The problems `apt-get update` reported about fetching, if any (it exits 0 when a mirror cannot
/// be reached).
pub fn update_problems(stdout: &str, stderr: &str) -> Option<String> {
    let bad: Vec<&str> = stdout
        .lines()
        .filter(|l| l.starts_with("Err:"))
        .chain(
            stderr
                .lines()
                .filter(|l| l.starts_with("E:") || l.starts_with("W:")),
        )
        .collect();
    (!bad.is_empty()).then(|| bad.join("\n"))
}

/// The file name prefix apt gives the lists of a mirror (`http://deb.debian.org/debian/` ->
/// `deb.debian.org_debian`).
pub fn uri_file_name(uri: &str) -> String {
    let rest = uri.split_once("://").map_or(uri, |(_, r)| r);
    let rest = rest.rsplit_once('@').map_or(rest, |(_, r)| r);
    rest.trim_end_matches('/')
        .replace('_', "%5f")
        .replace('~', "%7e")
        .replace('/', "_")
}

/// "bookworm of <date>, ..." for messages.
pub fn describe(sources: &[Source]) -> String {
    sources
        .iter()
        .map(|s| format!("{} of {}", s.suite, s.date))
        .collect::<Vec<_>>()
        .join(", ")
}

/// The `.deb` file name apt gives `name` at `version` (the epoch's colon escaped), without the
/// architecture: `libssl3_3.0.22-1~deb12u2_`.
pub fn deb_prefix(name: &str, version: &str) -> String {
    format!("{name}_{}_", version.replace(':', "%3a"))
}

/// Kernel packages (`linux-image-<version>-<flavour>`) that no kernel metapackage depends on any
/// more: after an upgrade brings a new ABI, the old one is dead weight in the image. `installed`
/// holds (package, Depends) of the installed `linux-image-*` packages.
pub fn superseded_kernels(installed: &[(String, String)]) -> Vec<String> {
    let is_versioned = |n: &str| {
        n.strip_prefix("linux-image-")
            .is_some_and(|r| r.starts_with(|c: char| c.is_ascii_digit()))
    };
    let wanted: Vec<&str> = installed
        .iter()
        .filter(|(n, _)| !is_versioned(n))
        .flat_map(|(_, deps)| deps.split([',', '|']))
        .filter_map(|d| d.split_whitespace().next())
        .collect();
    if wanted.is_empty() {
        return Vec::new(); // no metapackage: nothing says which kernel is current
    }
    installed
        .iter()
        .map(|(n, _)| n)
        .filter(|n| is_versioned(n) && !wanted.contains(&n.as_str()))
        .cloned()
        .collect()
}

/// Checks the tree after the upgrade against the resolution: every package at the version the
/// resolution (and so the input hash) names, except the kernels purged as superseded. The first
/// difference is returned as (package, expected, found).
pub fn check_upgrade(
    installed: &BTreeMap<&str, &str>,
    resolved: &Resolved,
    purged: &[String],
) -> Result<(), (String, String, String)> {
    let expected = resolved.package_set();
    for (name, version) in &expected {
        if purged.contains(name) {
            continue;
        }
        match installed.get(name.as_str()) {
            Some(v) if v == version => {}
            other => {
                return Err((
                    name.clone(),
                    version.clone(),
                    other.map_or_else(|| "nothing".into(), |v| (*v).to_string()),
                ));
            }
        }
    }
    for (name, version) in installed {
        if !expected.contains_key(*name) {
            return Err((
                (*name).to_string(),
                "nothing".into(),
                (*version).to_string(),
            ));
        }
    }
    Ok(())
}

fn io(path: &Path, source: std::io::Error) -> NodeImageError {
    NodeImageError::Io {
        path: path.to_path_buf(),
        source,
    }
}

fn write(path: &Path, contents: &str) -> Result<(), NodeImageError> {
    fs::write(path, contents).map_err(|e| io(path, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    const SIMULATION: &str = "NOTE: This is only a simulation!
Reading package lists...
Building dependency tree...
Calculating upgrade...
The following NEW packages will be installed:
  linux-image-6.1.0-57-cloud-amd64
Inst perl-base [5.36.0-7+deb12u3] (5.36.0-7+deb12u4 Debian-Security:12/oldstable-security [amd64])
Inst libpam-modules-bin [1.5.2-6+deb12u2] (1.5.2-6+deb12u3 Debian-Security:12/oldstable-security [amd64]) [libpam-modules:amd64 on libpam-modules-bin:amd64] [libpam-modules:amd64 ]
Inst tzdata [2026b-0+deb12u1] (2026f-0+deb12u1 Debian:12.13/oldstable-updates [all])
Inst zlib1g:amd64 [1:1.2.13.dfsg-1] (1:1.2.13.dfsg-1+deb12u1 Debian:12.13/oldstable, Debian-Security:12/oldstable-security [amd64])
Inst linux-image-6.1.0-57-cloud-amd64 (6.1.158-1 Debian-Security:12/oldstable-security [amd64])
Remv linux-image-6.1.0-40-cloud-amd64 [6.1.153-1]
Conf perl-base (5.36.0-7+deb12u4 Debian-Security:12/oldstable-security [amd64])
";

    fn inst(name: &str, version: &str, archives: &[&str]) -> Change {
        Change::Install {
            name: name.into(),
            version: version.into(),
            archives: archives.iter().map(|a| (*a).to_string()).collect(),
        }
    }

    #[test]
    fn simulation_lines_give_name_version_and_archives() {
        let sec = "Debian-Security:12/oldstable-security";
        assert_eq!(
            parse_simulation(SIMULATION).expect("parse"),
            [
                inst("perl-base", "5.36.0-7+deb12u4", &[sec]),
                inst("libpam-modules-bin", "1.5.2-6+deb12u3", &[sec]),
                inst(
                    "tzdata",
                    "2026f-0+deb12u1",
                    &["Debian:12.13/oldstable-updates"]
                ),
                inst(
                    "zlib1g",
                    "1:1.2.13.dfsg-1+deb12u1",
                    &["Debian:12.13/oldstable", sec]
                ),
                inst("linux-image-6.1.0-57-cloud-amd64", "6.1.158-1", &[sec]),
                Change::Remove {
                    name: "linux-image-6.1.0-40-cloud-amd64".into()
                },
            ]
        );
        assert_eq!(
            parse_simulation("Reading package lists...\n0 upgraded, 0 newly installed\n")
                .expect("nothing to do"),
            []
        );
    }

    #[test]
    fn malformed_simulation_lines_are_errors_not_panics() {
        for line in [
            "Inst foo [1.0",
            "Inst foo [1.0] 2.0",
            "Inst foo ( Debian:12/stable)",
            "Inst  ",
            "Inst",
        ] {
            let got = parse_simulation(line);
            // "Inst" alone has no space and is not a change line; the rest are errors.
            if line == "Inst" {
                assert_eq!(got.expect("skipped"), []);
            } else {
                assert!(matches!(got, Err(NodeImageError::Parse { .. })), "{line:?}");
            }
        }
    }

    #[test]
    fn status_lists_installed_packages_only() {
        let status = "Package: libc6\nStatus: install ok installed\nArchitecture: amd64\nVersion: 2.36-9+deb12u10\nDescription: x\n continued: line\n\n\
                      Package: gone\nStatus: deinstall ok config-files\nVersion: 1.0\n\n\
                      Package: zlib1g\nStatus: install ok installed\nVersion: 1:1.2.13.dfsg-1\n";
        let got = parse_status(status);
        assert_eq!(got.len(), 2, "{got:?}");
        assert_eq!(got["libc6"], "2.36-9+deb12u10");
        assert_eq!(got["zlib1g"], "1:1.2.13.dfsg-1");
    }

    #[test]
    fn release_fields_from_a_clear_signed_file() {
        let text = "-----BEGIN PGP SIGNED MESSAGE-----\nHash: SHA512\n\nOrigin: Debian\nLabel: Debian-Security\n\
                    Suite: oldstable-security\nVersion: 12\nCodename: bookworm-security\n\
                    Date: Thu, 03 Dec 2026 10:11:12 UTC\nValid-Until: Thu, 10 Dec 2026 10:11:12 UTC\n\
                    SHA256:\n 0123 10 main/binary-amd64/Packages\n\n-----BEGIN PGP SIGNATURE-----\n\nDate: nope\n";
        assert_eq!(
            parse_release(text),
            Release {
                suite: "oldstable-security".into(),
                codename: "bookworm-security".into(),
                date: "Thu, 03 Dec 2026 10:11:12 UTC".into(),
            }
        );
    }

    fn resolved(changes: Vec<Change>) -> Resolved {
        Resolved {
            sources: Vec::new(),
            base: [
                ("libc6", "2.36-9"),
                ("zlib1g", "1:1.2.13.dfsg-1"),
                ("old", "1"),
            ]
            .into_iter()
            .map(|(n, v)| (n.to_string(), v.to_string()))
            .collect(),
            changes,
            codenames: [
                ("oldstable-security", "bookworm-security"),
                ("oldstable", "bookworm"),
            ]
            .into_iter()
            .map(|(a, b)| (a.to_string(), b.to_string()))
            .collect(),
        }
    }

    #[test]
    fn package_set_applies_the_changes_and_names_their_suites() {
        let sec = "Debian-Security:12/oldstable-security";
        let r = resolved(vec![
            inst(
                "zlib1g",
                "1:1.2.13.dfsg-1+deb12u1",
                &["Debian:12.13/oldstable", sec],
            ),
            inst("new", "2", &[sec]),
            Change::Remove { name: "old".into() },
            inst("odd", "3", &["Elsewhere:1/unknown"]),
        ]);
        let set = r.package_set();
        assert_eq!(
            set.iter()
                .map(|(n, v)| format!("{n}={v}"))
                .collect::<Vec<_>>(),
            [
                "libc6=2.36-9",
                "new=2",
                "odd=3",
                "zlib1g=1:1.2.13.dfsg-1+deb12u1"
            ]
        );
        let i = r.installs();
        assert_eq!(i["zlib1g"].1, "bookworm,bookworm-security");
        assert_eq!(i["new"].1, "bookworm-security");
        assert_eq!(i["odd"].1, "Elsewhere:1/unknown");
        assert_eq!(r.counts()["bookworm-security"], 1);
    }

    #[test]
    fn the_upgraded_tree_must_hold_exactly_the_resolved_set() {
        let sec = "Debian-Security:12/oldstable-security";
        let r = resolved(vec![
            inst("zlib1g", "1:1.2.13.dfsg-1+deb12u1", &[sec]),
            inst("linux-image-2", "2", &[sec]),
            Change::Remove { name: "old".into() },
        ]);
        let mut tree: BTreeMap<&str, &str> = [
            ("libc6", "2.36-9"),
            ("zlib1g", "1:1.2.13.dfsg-1+deb12u1"),
            ("linux-image-2", "2"),
        ]
        .into_iter()
        .collect();
        assert_eq!(check_upgrade(&tree, &r, &[]), Ok(()));
        tree.insert("zlib1g", "1:1.2.13.dfsg-1");
        assert_eq!(
            check_upgrade(&tree, &r, &[]),
            Err((
                "zlib1g".into(),
                "1:1.2.13.dfsg-1+deb12u1".into(),
                "1:1.2.13.dfsg-1".into()
            ))
        );
        tree.insert("zlib1g", "1:1.2.13.dfsg-1+deb12u1");
        tree.remove("linux-image-2");
        assert!(check_upgrade(&tree, &r, &[]).is_err());
        assert_eq!(check_upgrade(&tree, &r, &["linux-image-2".into()]), Ok(()));
        tree.insert("surprise", "1");
        assert_eq!(
            check_upgrade(&tree, &r, &["linux-image-2".into()]),
            Err(("surprise".into(), "nothing".into(), "1".into()))
        );
    }

    #[test]
    fn an_unreachable_mirror_is_a_failed_update_though_apt_exits_0() {
        let stdout = "Hit:1 http://deb.debian.org/debian bookworm InRelease\n\
                      Err:2 http://127.0.0.1:9/debian-security bookworm-security InRelease\n  \
                      Could not connect to 127.0.0.1:9 (127.0.0.1). - connect (111: Connection refused)\n\
                      Reading package lists...\n";
        let stderr = "W: Failed to fetch http://127.0.0.1:9/debian-security/dists/bookworm-security/InRelease  Could not connect\n\
                      W: Some index files failed to download. They have been ignored, or old ones used instead.\n";
        let got = update_problems(stdout, stderr).expect("a problem");
        assert!(
            got.contains("Err:2 http://127.0.0.1:9/debian-security"),
            "{got}"
        );
        assert!(got.contains("W: Some index files failed"), "{got}");
        assert_eq!(
            update_problems(
                "Hit:1 http://deb.debian.org/debian bookworm InRelease\n",
                ""
            ),
            None
        );
        assert_eq!(
            uri_file_name("http://deb.debian.org/debian-security/"),
            "deb.debian.org_debian-security"
        );
        assert_eq!(
            uri_file_name("http://user:pw@127.0.0.1:3142/my_mirror/debian"),
            "127.0.0.1:3142_my%5fmirror_debian"
        );
    }

    #[test]
    fn lists_count_only_from_the_configured_mirror() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let sec = "http://deb.debian.org/debian-security";
        let apt = HostApt::new(
            tmp.path(),
            "bookworm",
            suites("bookworm", "http://deb.debian.org/debian", sec),
        )
        .expect("apt dir");
        let lists = apt.lists();
        let release = |codename: &str| {
            format!("Origin: Debian\nCodename: {codename}\nDate: Thu, 03 Dec 2026 10:00:00 UTC\n")
        };
        for (file, codename) in [
            ("deb.debian.org_debian_dists_bookworm_InRelease", "bookworm"),
            (
                "deb.debian.org_debian_dists_bookworm-updates_InRelease",
                "bookworm-updates",
            ),
            // The security suite's lists come from another mirror: they do not count.
            (
                "other.example_debian-security_dists_bookworm-security_InRelease",
                "bookworm-security",
            ),
        ] {
            fs::write(lists.join(file), release(codename)).expect("release");
            fs::write(
                lists.join(file.replace("InRelease", "main_binary-amd64_Packages")),
                "",
            )
            .expect("packages");
        }
        assert_eq!(
            apt.lists_of_each_suite(),
            Err(format!("bookworm-security from {sec}"))
        );
        fs::write(
            lists.join("deb.debian.org_debian-security_dists_bookworm-security_InRelease"),
            release("bookworm-security"),
        )
        .expect("release");
        assert!(apt.lists_of_each_suite().is_err(), "no Packages list yet");
        fs::write(
            lists.join(
                "deb.debian.org_debian-security_dists_bookworm-security_main_binary-amd64_Packages",
            ),
            "",
        )
        .expect("packages");
        let got = apt.lists_of_each_suite().expect("complete");
        assert_eq!(got.len(), 3);
        assert_eq!(got[2].uri, sec);
        assert_eq!(got[2].date, "Thu, 03 Dec 2026 10:00:00 UTC");
    }

    #[test]
    fn sources_for_the_three_suites() {
        let s = suites(
            "bookworm",
            "http://deb.debian.org/debian",
            "http://deb.debian.org/debian-security",
        );
        assert_eq!(
            sources_list(&s),
            format!(
                "deb [signed-by={ARCHIVE_KEYRING}] http://deb.debian.org/debian bookworm main\n\
                 deb [signed-by={ARCHIVE_KEYRING}] http://deb.debian.org/debian bookworm-updates main\n\
                 deb [signed-by={ARCHIVE_KEYRING}] http://deb.debian.org/debian-security bookworm-security main\n"
            )
        );
    }

    #[test]
    fn old_kernels_are_superseded_by_what_the_metapackage_wants() {
        let k = |n: &str, d: &str| (n.to_string(), d.to_string());
        let installed = [
            k(
                "linux-image-6.1.0-40-cloud-amd64",
                "kmod, linux-base (>= 4.3~)",
            ),
            k("linux-image-6.1.0-57-cloud-amd64", "kmod"),
            k(
                "linux-image-cloud-amd64",
                "linux-image-6.1.0-57-cloud-amd64 (= 6.1.158-1)",
            ),
        ];
        assert_eq!(
            superseded_kernels(&installed),
            ["linux-image-6.1.0-40-cloud-amd64"]
        );
        assert_eq!(superseded_kernels(&installed[..2]), Vec::<String>::new());
        assert_eq!(deb_prefix("zlib1g", "1:1.2.13"), "zlib1g_1%3a1.2.13_");
    }
}
