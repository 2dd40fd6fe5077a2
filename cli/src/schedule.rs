//! Schedules for `clusterctl repair` (auto-repair) and `clusterctl upgrade --auto`
//! (auto-upgrade), one [`Job`] each per cluster: a systemd timer where systemd runs, else a
//! crontab entry.
//! Rendering is pure ([`cron_line`], [`systemd_units`]); [`install`], [`remove`] and [`find`]
//! do the I/O (`crontab -l`/`crontab -`, unit files + `systemctl`).
//!
//! Two runs never overlap: the run takes the cluster lock without waiting, and a second one
//! exits at once with the "locked" exit code (3). A systemd timer also never starts a oneshot
//! service that is still running. Output goes where the scheduler puts it: the journal
//! (`journalctl -u clusterctl-autorepair-NAME`), or for cron `autorepair.log` (`autoupgrade.log`)
//! in the cluster's state directory.

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
    "CLUSTERCTL_CHANNEL_FILE",
    "SSH_AUTH_SOCK",
];

/// What a schedule runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Job {
    /// `clusterctl repair NAME --scheduled`.
    Repair,
    /// `clusterctl upgrade NAME --auto --scheduled`.
    Upgrade,
}

impl Job {
    /// `autorepair` / `autoupgrade`: the command that manages it, and the stem of its names.
    pub fn name(self) -> &'static str {
        match self {
            Job::Repair => "autorepair",
            Job::Upgrade => "autoupgrade",
        }
    }

    fn what(self) -> &'static str {
        match self {
            Job::Repair => "auto-repair",
            Job::Upgrade => "auto-upgrade",
        }
    }

    fn args(self) -> &'static str {
        match self {
            Job::Repair => "repair {} --scheduled",
            Job::Upgrade => "upgrade {} --auto --scheduled",
        }
    }
}

/// One cluster's schedule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// What it runs.
    pub job: Job,
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
pub fn cron_marker(job: Job, cluster: &str) -> String {
    format!("# clusterctl-{}:{cluster}", job.name())
}

/// The systemd unit name (without suffix) of a cluster's schedule.
pub fn unit_name(job: Job, cluster: &str) -> String {
    format!("clusterctl-{}-{cluster}", job.name())
}

fn sh_quote(s: &str) -> String {
    crate::ssh::shell_quote(s)
}

/// The log file of cron runs.
pub fn cron_log(state_dir: &Path, job: Job, cluster: &str) -> PathBuf {
    state_dir.join(cluster).join(format!("{}.log", job.name()))
}

/// A cron log larger than this is rotated by the next scheduled run.
pub const LOG_MAX_BYTES: u64 = 1 << 20;

/// Keeps a cron log small: over [`LOG_MAX_BYTES`] it becomes `autorepair.log.1` (replacing the
/// previous one); this run's output still goes to the renamed file (the shell opened it), the
/// next run's to a new one. Returns whether it rotated.
pub fn rotate_log(state_dir: &Path, job: Job, cluster: &str) -> std::io::Result<bool> {
    let log = cron_log(state_dir, job, cluster);
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
        "{} --state-dir {} {}",
        sh_quote(&exe),
        sh_quote(&dir),
        e.job.args().replace("{}", &sh_quote(&e.cluster))
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
    let log = cron_log(&e.state_dir, e.job, &e.cluster);
    // umask 077: the log is private like everything in the state directory.
    let line = format!(
        "{fields} umask 077; env {} {} >> {} 2>&1 {}",
        env.join(" "),
        command(e),
        sh_quote(&log.to_string_lossy()),
        cron_marker(e.job, &e.cluster)
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
        "[Unit]\nDescription=clusterctl {what} of cluster {c}\nAfter=network-online.target\n\n[Service]\nType=oneshot\n{env}ExecStart=/bin/sh -c {cmd}\n",
        what = e.job.what(),
        c = e.cluster,
        cmd = sh_quote(&command(e)),
    );
    let timer = format!(
        "[Unit]\nDescription=Run clusterctl {what} of cluster {c} every {every}\n\n[Timer]\nOnActiveSec=1min\nOnUnitInactiveSec={secs}s\nAccuracySec=5s\n\n[Install]\nWantedBy=timers.target\n",
        what = e.job.what(),
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

/// `text` without the line of `cluster`'s `job` schedule. Pure.
pub fn without_entry(text: &str, job: Job, cluster: &str) -> String {
    let marker = cron_marker(job, cluster);
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
            let mut text = without_entry(&read_crontab()?, e.job, &e.cluster);
            text.push_str(&line);
            text.push('\n');
            write_crontab(&text)?;
            Ok(format!(
                "crontab entry: {line}\nlog: {}",
                cron_log(&e.state_dir, e.job, &e.cluster).display()
            ))
        }
        Scheduler::Systemd => {
            let (dir, scope) = systemd_dir()?;
            std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
            let (service, timer) = systemd_units(e);
            let unit = unit_name(e.job, &e.cluster);
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

/// Removes `cluster`'s `job` schedule from wherever it is; returns what was removed.
pub fn remove(job: Job, cluster: &str) -> anyhow::Result<Vec<String>> {
    let mut removed = Vec::new();
    if let Ok(text) = read_crontab() {
        let kept = without_entry(&text, job, cluster);
        if kept != text {
            write_crontab(&kept)?;
            removed.push("crontab entry".to_owned());
        }
    }
    let (dir, scope) = systemd_dir()?;
    let unit = unit_name(job, cluster);
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

/// Where `cluster`'s `job` schedule is installed, and its definition.
pub fn find(job: Job, cluster: &str) -> Option<(Scheduler, String)> {
    if let Ok(text) = read_crontab()
        && let Some(line) = text
            .lines()
            .find(|l| l.trim_end().ends_with(&cron_marker(job, cluster)))
    {
        return Some((Scheduler::Cron, line.to_owned()));
    }
    let (dir, _) = systemd_dir().ok()?;
    let timer = dir.join(format!("{}.timer", unit_name(job, cluster)));
    std::fs::read_to_string(&timer)
        .ok()
        .map(|t| (Scheduler::Systemd, format!("{}:\n{t}", timer.display())))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(every: u64) -> Entry {
        Entry {
            job: Job::Repair,
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
        let mut up = entry(600);
        up.job = Job::Upgrade;
        assert_eq!(
            cron_line(&up)?,
            "*/10 * * * * umask 077; env PATH='/usr/bin:/bin' '/opt/cc/clusterctl' --state-dir '/var/lib/cc state' upgrade 'c1' --auto --scheduled >> '/var/lib/cc state/c1/autoupgrade.log' 2>&1 # clusterctl-autoupgrade:c1"
        );
        Ok(())
    }

    #[test]
    fn a_large_cron_log_is_rotated_and_a_small_one_left() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        std::fs::create_dir(dir.path().join("c1"))?;
        assert!(!rotate_log(dir.path(), Job::Repair, "c1")?, "no log yet");
        let log = cron_log(dir.path(), Job::Repair, "c1");
        std::fs::write(&log, vec![b'x'; 10])?;
        assert!(!rotate_log(dir.path(), Job::Repair, "c1")?);
        std::fs::write(&log, vec![b'x'; (LOG_MAX_BYTES + 1) as usize])?;
        assert!(rotate_log(dir.path(), Job::Repair, "c1")?);
        assert!(!log.exists());
        assert_eq!(
            std::fs::metadata(dir.path().join("c1/autorepair.log.1"))?.len(),
            LOG_MAX_BYTES + 1
        );
        Ok(())
    }

    #[test]
    fn removing_an_entry_keeps_every_other_line() {
        let text = "MAILTO=x\n* * * * * other # clusterctl-autorepair:c10\n*/5 * * * * a # clusterctl-autorepair:c1\n*/5 * * * * u # clusterctl-autoupgrade:c1\n";
        assert_eq!(
            without_entry(text, Job::Repair, "c1"),
            "MAILTO=x\n* * * * * other # clusterctl-autorepair:c10\n*/5 * * * * u # clusterctl-autoupgrade:c1\n"
        );
        assert_eq!(
            without_entry(text, Job::Upgrade, "c1"),
            "MAILTO=x\n* * * * * other # clusterctl-autorepair:c10\n*/5 * * * * a # clusterctl-autorepair:c1\n"
        );
    }

    /// The units pass `systemd-analyze verify` (Debian's systemd package; no running systemd
    /// needed).
    #[test]
    fn systemd_units_verify() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        for job in [Job::Repair, Job::Upgrade] {
            let mut e = entry(300);
            e.job = job;
            e.exe = PathBuf::from("/bin/true");
            e.state_dir = dir.path().to_path_buf();
            let (service, timer) = systemd_units(&e);
            assert!(timer.contains("OnUnitInactiveSec=300s"), "{timer}");
            let unit = unit_name(job, "c1");
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
        }
        Ok(())
    }
}
