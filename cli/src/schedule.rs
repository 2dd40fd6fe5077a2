//! Schedules for `clusterctl repair`: a systemd timer where systemd runs, else a crontab entry.
//! Rendering is pure ([`cron_line`], [`systemd_units`]); [`install`], [`remove`] and [`find`]
//! do the I/O (`crontab -l`/`crontab -`, unit files + `systemctl`).
//!
//! Two runs never overlap: the run takes the cluster lock without waiting, and a second one
//! exits at once with the "locked" exit code (3). A systemd timer also never starts a oneshot
//! service that is still running. Output goes where the scheduler puts it: the journal
//! (`journalctl -u clusterctl-autorepair-NAME`), or for cron `autorepair.log` in the cluster's
//! state directory.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{Context as _, bail};

/// Where a schedule lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum Scheduler {
    /// A systemd timer and oneshot service.
    Systemd,
    /// A line in the user's crontab.
    Cron,
}

impl Scheduler {
    /// systemd when it is PID 1 (`/run/systemd/system` exists), else cron.
    pub fn detect() -> Scheduler {
        if Path::new("/run/systemd/system").is_dir() {
            Scheduler::Systemd
        } else {
            Scheduler::Cron
        }
    }
}

/// Environment variables a scheduled run keeps from the shell that enabled it (cron and
/// systemd start jobs with an almost empty environment).
pub const KEPT_ENV: &[&str] = &[
    "PATH",
    "HOME",
    "LIBVIRT_DEFAULT_URI",
    "XDG_CACHE_HOME",
    "XDG_STATE_HOME",
    "CLUSTERCTL_IMAGE_DIR",
    "CLUSTERCTL_ACCELERATOR",
    "SSH_AUTH_SOCK",
];

/// One cluster's schedule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// The cluster.
    pub cluster: String,
    /// How often.
    pub every: Duration,
    /// The clusterctl binary to run.
    pub exe: PathBuf,
    /// The state directory.
    pub state_dir: PathBuf,
    /// Environment to set.
    pub env: Vec<(String, String)>,
}

/// The marker that names a cluster's crontab line.
pub fn cron_marker(cluster: &str) -> String {
    format!("# clusterctl-autorepair:{cluster}")
}

/// The systemd unit name (without suffix) of a cluster's schedule.
pub fn unit_name(cluster: &str) -> String {
    format!("clusterctl-autorepair-{cluster}")
}

fn sh_quote(s: &str) -> String {
    crate::ssh::shell_quote(s)
}

/// The log file of cron runs.
pub fn cron_log(state_dir: &Path, cluster: &str) -> PathBuf {
    state_dir.join(cluster).join("autorepair.log")
}

/// A cron log larger than this is rotated by the next scheduled run.
pub const LOG_MAX_BYTES: u64 = 1 << 20;

/// Keeps a cron log small: over [`LOG_MAX_BYTES`] it becomes `autorepair.log.1` (replacing the
/// previous one); this run's output still goes to the renamed file (the shell opened it), the
/// next run's to a new one. Returns whether it rotated.
pub fn rotate_log(state_dir: &Path, cluster: &str) -> std::io::Result<bool> {
    let log = cron_log(state_dir, cluster);
    match std::fs::metadata(&log) {
        Ok(m) if m.len() > LOG_MAX_BYTES => {
            std::fs::rename(&log, log.with_extension("log.1"))?;
            Ok(true)
        }
        Ok(_) => Ok(false),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(e),
    }
}

/// The cron time fields for `every`: whole minutes 1-59 or whole hours 1-23.
pub fn cron_fields(every: Duration) -> anyhow::Result<String> {
    let s = every.as_secs();
    if s == 0 || !s.is_multiple_of(60) {
        bail!("--every {s}s: cron runs whole minutes; use 1m or more");
    }
    let m = s / 60;
    if m < 60 {
        return Ok(if m == 1 {
            "* * * * *".to_owned()
        } else {
            format!("*/{m} * * * *")
        });
    }
    if m.is_multiple_of(60) && m / 60 < 24 {
        let h = m / 60;
        return Ok(if h == 1 {
            "0 * * * *".to_owned()
        } else {
            format!("0 */{h} * * *")
        });
    }
    bail!(
        "--every {}: cron takes whole minutes below an hour or whole hours below a day (such as 5m or 2h)",
        crate::spec::Duration::from_secs(s)
    )
}

/// The command a schedule runs.
fn command(e: &Entry) -> String {
    let exe = e.exe.to_string_lossy();
    let dir = e.state_dir.to_string_lossy();
    format!(
        "{} --state-dir {} repair {} --scheduled",
        sh_quote(&exe),
        sh_quote(&dir),
        sh_quote(&e.cluster)
    )
}

/// The crontab line of `e`. Pure.
pub fn cron_line(e: &Entry) -> anyhow::Result<String> {
    let fields = cron_fields(e.every)?;
    let env: Vec<String> = e
        .env
        .iter()
        .map(|(k, v)| format!("{k}={}", sh_quote(v)))
        .collect();
    let log = cron_log(&e.state_dir, &e.cluster);
    // umask 077: the log is private like everything in the state directory.
    let line = format!(
        "{fields} umask 077; env {} {} >> {} 2>&1 {}",
        env.join(" "),
        command(e),
        sh_quote(&log.to_string_lossy()),
        cron_marker(&e.cluster)
    );
    if line.contains('%') || line.contains('\n') {
        bail!(
            "a path or environment value contains '%' or a newline, which a crontab line cannot hold"
        );
    }
    Ok(line)
}

/// The service and timer units of `e`. Pure.
pub fn systemd_units(e: &Entry) -> (String, String) {
    let env: String = e
        .env
        .iter()
        .map(|(k, v)| {
            format!(
                "Environment=\"{k}={}\"\n",
                v.replace('\\', "\\\\").replace('"', "\\\"")
            )
        })
        .collect();
    let service = format!(
        "[Unit]\nDescription=clusterctl auto-repair of cluster {c}\nAfter=network-online.target\n\n[Service]\nType=oneshot\n{env}ExecStart=/bin/sh -c {cmd}\n",
        c = e.cluster,
        cmd = sh_quote(&command(e)),
    );
    let timer = format!(
        "[Unit]\nDescription=Run clusterctl auto-repair of cluster {c} every {every}\n\n[Timer]\nOnActiveSec=1min\nOnUnitInactiveSec={secs}s\nAccuracySec=5s\n\n[Install]\nWantedBy=timers.target\n",
        c = e.cluster,
        every = crate::spec::Duration::from_secs(e.every.as_secs()),
        secs = e.every.as_secs(),
    );
    (service, timer)
}

fn root() -> bool {
    use std::os::unix::fs::MetadataExt as _;
    // The owner of /proc/self is the effective user.
    std::fs::metadata("/proc/self").is_ok_and(|m| m.uid() == 0)
}

/// The systemd unit directory and the `systemctl` scope flag.
fn systemd_dir() -> anyhow::Result<(PathBuf, Option<&'static str>)> {
    if root() {
        return Ok((PathBuf::from("/etc/systemd/system"), None));
    }
    let home = std::env::var_os("HOME").context("HOME is not set")?;
    Ok((
        PathBuf::from(home).join(".config/systemd/user"),
        Some("--user"),
    ))
}

fn systemctl(scope: Option<&str>, args: &[&str]) -> anyhow::Result<()> {
    let mut cmd = Command::new("systemctl");
    cmd.args(scope).args(args);
    let out = cmd.output().context("running systemctl")?;
    if !out.status.success() {
        bail!(
            "systemctl {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

fn read_crontab() -> anyhow::Result<String> {
    let out = Command::new("crontab")
        .arg("-l")
        .output()
        .context("running `crontab -l` (is cron installed? Debian: apt-get install cron)")?;
    if out.status.success() {
        return Ok(String::from_utf8_lossy(&out.stdout).into_owned());
    }
    let err = String::from_utf8_lossy(&out.stderr);
    if err.contains("no crontab") {
        return Ok(String::new());
    }
    bail!("crontab -l failed: {}", err.trim())
}

fn write_crontab(text: &str) -> anyhow::Result<()> {
    let mut child = Command::new("crontab")
        .arg("-")
        .stdin(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("running `crontab -`")?;
    child
        .stdin
        .take()
        .context("crontab's stdin")?
        .write_all(text.as_bytes())?;
    let out = child.wait_with_output()?;
    if !out.status.success() {
        bail!(
            "crontab - failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// `text` without the lines of `cluster`'s schedule. Pure.
pub fn without_entry(text: &str, cluster: &str) -> String {
    let marker = cron_marker(cluster);
    text.lines()
        .filter(|l| !l.trim_end().ends_with(&marker))
        .map(|l| format!("{l}\n"))
        .collect()
}

/// Installs (or replaces) `e`'s schedule; returns where it is.
pub fn install(e: &Entry, scheduler: Scheduler) -> anyhow::Result<String> {
    match scheduler {
        Scheduler::Cron => {
            let line = cron_line(e)?;
            let mut text = without_entry(&read_crontab()?, &e.cluster);
            text.push_str(&line);
            text.push('\n');
            write_crontab(&text)?;
            Ok(format!(
                "crontab entry: {line}\nlog: {}",
                cron_log(&e.state_dir, &e.cluster).display()
            ))
        }
        Scheduler::Systemd => {
            let (dir, scope) = systemd_dir()?;
            std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
            let (service, timer) = systemd_units(e);
            let unit = unit_name(&e.cluster);
            std::fs::write(dir.join(format!("{unit}.service")), service)?;
            std::fs::write(dir.join(format!("{unit}.timer")), timer)?;
            systemctl(scope, &["daemon-reload"])?;
            systemctl(scope, &["enable", "--now", &format!("{unit}.timer")])?;
            Ok(format!(
                "systemd timer {unit}.timer in {} (logs: journalctl {}-u {unit})",
                dir.display(),
                if scope.is_some() { "--user " } else { "" }
            ))
        }
    }
}

/// Removes `cluster`'s schedule from wherever it is; returns what was removed.
pub fn remove(cluster: &str) -> anyhow::Result<Vec<String>> {
    let mut removed = Vec::new();
    if let Ok(text) = read_crontab() {
        let kept = without_entry(&text, cluster);
        if kept != text {
            write_crontab(&kept)?;
            removed.push("crontab entry".to_owned());
        }
    }
    let (dir, scope) = systemd_dir()?;
    let unit = unit_name(cluster);
    let timer = dir.join(format!("{unit}.timer"));
    if timer.exists() {
        let _ = systemctl(scope, &["disable", "--now", &format!("{unit}.timer")]);
        std::fs::remove_file(&timer)?;
        let _ = std::fs::remove_file(dir.join(format!("{unit}.service")));
        let _ = systemctl(scope, &["daemon-reload"]);
        removed.push(format!("systemd timer {unit}.timer"));
    }
    Ok(removed)
}

/// Where `cluster`'s schedule is installed, and its definition.
pub fn find(cluster: &str) -> Option<(Scheduler, String)> {
    if let Ok(text) = read_crontab()
        && let Some(line) = text
            .lines()
            .find(|l| l.trim_end().ends_with(&cron_marker(cluster)))
    {
        return Some((Scheduler::Cron, line.to_owned()));
    }
    let (dir, _) = systemd_dir().ok()?;
    let timer = dir.join(format!("{}.timer", unit_name(cluster)));
    std::fs::read_to_string(&timer)
        .ok()
        .map(|t| (Scheduler::Systemd, format!("{}:\n{t}", timer.display())))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(every: u64) -> Entry {
        Entry {
            cluster: "c1".into(),
            every: Duration::from_secs(every),
            exe: PathBuf::from("/opt/cc/clusterctl"),
            state_dir: PathBuf::from("/var/lib/cc state"),
            env: vec![("PATH".into(), "/usr/bin:/bin".into())],
        }
    }

    #[test]
    fn cron_lines_run_repair_with_the_state_dir_and_a_marker() -> anyhow::Result<()> {
        let line = cron_line(&entry(300))?;
        assert_eq!(
            line,
            "*/5 * * * * umask 077; env PATH='/usr/bin:/bin' '/opt/cc/clusterctl' --state-dir '/var/lib/cc state' repair 'c1' --scheduled >> '/var/lib/cc state/c1/autorepair.log' 2>&1 # clusterctl-autorepair:c1"
        );
        assert!(cron_line(&entry(60))?.starts_with("* * * * * "));
        assert!(cron_line(&entry(7200))?.starts_with("0 */2 * * * "));
        assert!(cron_line(&entry(90)).is_err());
        assert!(cron_line(&entry(86_400)).is_err());
        let mut bad = entry(60);
        bad.state_dir = PathBuf::from("/tmp/100%");
        assert!(cron_line(&bad).is_err());
        Ok(())
    }

    #[test]
    fn a_large_cron_log_is_rotated_and_a_small_one_left() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        std::fs::create_dir(dir.path().join("c1"))?;
        assert!(!rotate_log(dir.path(), "c1")?, "no log yet");
        let log = cron_log(dir.path(), "c1");
        std::fs::write(&log, vec![b'x'; 10])?;
        assert!(!rotate_log(dir.path(), "c1")?);
        std::fs::write(&log, vec![b'x'; (LOG_MAX_BYTES + 1) as usize])?;
        assert!(rotate_log(dir.path(), "c1")?);
        assert!(!log.exists());
        assert_eq!(
            std::fs::metadata(dir.path().join("c1/autorepair.log.1"))?.len(),
            LOG_MAX_BYTES + 1
        );
        Ok(())
    }

    #[test]
    fn removing_an_entry_keeps_every_other_line() {
        let text = "MAILTO=x\n* * * * * other # clusterctl-autorepair:c10\n*/5 * * * * a # clusterctl-autorepair:c1\n";
        assert_eq!(
            without_entry(text, "c1"),
            "MAILTO=x\n* * * * * other # clusterctl-autorepair:c10\n"
        );
    }

    /// The units pass `systemd-analyze verify` (Debian's systemd package; no running systemd
    /// needed).
    #[test]
    fn systemd_units_verify() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let mut e = entry(300);
        e.exe = PathBuf::from("/bin/true");
        e.state_dir = dir.path().to_path_buf();
        let (service, timer) = systemd_units(&e);
        assert!(timer.contains("OnUnitInactiveSec=300s"), "{timer}");
        let unit = unit_name("c1");
        let s = dir.path().join(format!("{unit}.service"));
        let t = dir.path().join(format!("{unit}.timer"));
        std::fs::write(&s, service)?;
        std::fs::write(&t, timer)?;
        let out = Command::new("systemd-analyze")
            .args(["verify", "--man=no"])
            .arg(&s)
            .arg(&t)
            .env("SYSTEMD_LOG_LEVEL", "warning")
            .output()
            .context("systemd-analyze (Debian package systemd) must be installed")?;
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "systemd-analyze verify failed: {err}");
        // Only complaints about the host's own units are tolerated.
        let ours: Vec<&str> = err.lines().filter(|l| l.contains(&unit)).collect();
        assert!(
            ours.is_empty(),
            "systemd-analyze complains about our units: {ours:?}"
        );
        Ok(())
    }
}
