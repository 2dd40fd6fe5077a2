//! Test harness: real OpenSSH `sshd` processes on 127.0.0.1, started and killed by the tests.
//!
//! Each [`Sshd`] runs `/usr/sbin/sshd -D` as the current user on a free port with its own host
//! key and the fixture's authorized_keys; dropping it kills the server's process group by PID.
//! No test is skipped when sshd is missing: it fails and says how to install it.

#![allow(dead_code)]

pub mod control_plane;

use std::fs;
use std::io::Read;
use std::net::{TcpListener, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use clusterctl::ssh::{
    Auth, ClientConfig, ClientKey, Endpoint, KnownHosts, RetryPolicy, SshClient, Target,
};

pub const SSHD: &str = "/usr/sbin/sshd";

/// Fails the test with install advice if a required program is missing.
pub fn require_program(path: &str) {
    assert!(
        Path::new(path).exists() || which(path),
        "{path} is not installed: run tests/bed/install-host-packages.sh (it installs \
         openssh-server and openssh-client) and re-run the tests"
    );
}

fn which(name: &str) -> bool {
    std::env::var_os("PATH")
        .map(|paths| std::env::split_paths(&paths).any(|dir| dir.join(name).is_file()))
        .unwrap_or(false)
}

/// The current user's login name (sshd runs as this user and accepts only it).
pub fn current_user() -> String {
    let out = Command::new("id").arg("-un").output().expect("run id -un");
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// Runs a command and panics with its stderr if it fails.
pub fn sh(program: &str, args: &[&str]) -> String {
    let out = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {program}: {e}"));
    assert!(
        out.status.success(),
        "{program} {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Generates a key with ssh-keygen; returns the private key path.
pub fn keygen(dir: &Path, name: &str, kind: &str, extra: &[&str]) -> PathBuf {
    require_program("ssh-keygen");
    let path = dir.join(name);
    let path_s = path.to_str().expect("utf-8 path");
    let mut args = vec!["-q", "-t", kind, "-N", "", "-C", name, "-f", path_s];
    args.extend_from_slice(extra);
    sh("ssh-keygen", &args);
    path
}

/// A temp directory with client keys and an authorized_keys file that accepts them.
pub struct Fixture {
    pub dir: tempfile::TempDir,
    pub user: String,
    pub client_key: PathBuf,
    pub authorized_keys: PathBuf,
}

impl Fixture {
    pub fn new() -> Fixture {
        require_program(SSHD);
        let dir = tempfile::tempdir().expect("tempdir");
        // Root's sshd needs its privilege separation directory, normally made by the service
        // manager at boot; an unprivileged user's sshd does not use it.
        if current_user() == "root" && !Path::new("/run/sshd").exists() {
            fs::create_dir_all("/run/sshd").expect("create /run/sshd");
            fs::set_permissions("/run/sshd", fs::Permissions::from_mode(0o755)).expect("chmod");
        }
        let client_key = keygen(dir.path(), "client_ed25519", "ed25519", &[]);
        let authorized_keys = dir.path().join("authorized_keys");
        fs::copy(client_key.with_extension("pub"), &authorized_keys).expect("authorized_keys");
        Fixture {
            dir,
            user: current_user(),
            client_key,
            authorized_keys,
        }
    }

    /// Adds the public half of `private_key` (path to `.pub` next to it) to authorized_keys.
    pub fn authorize(&self, public_line: &str) {
        let mut text = fs::read_to_string(&self.authorized_keys).expect("read authorized_keys");
        text.push_str(public_line.trim());
        text.push('\n');
        fs::write(&self.authorized_keys, text).expect("write authorized_keys");
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Starts an sshd with a fresh ed25519 host key made by ssh-keygen.
    pub fn sshd(&self) -> Sshd {
        self.sshd_with(SshdOptions::default())
    }

    pub fn sshd_with(&self, options: SshdOptions) -> Sshd {
        Sshd::start(self, options)
    }

    /// A client that authenticates with the fixture's key and trusts exactly `known`.
    pub fn client(&self, known: KnownHosts) -> SshClient {
        SshClient::new(self.config(known))
    }

    pub fn config(&self, known: KnownHosts) -> ClientConfig {
        let mut config = ClientConfig::new(
            Auth::Key(ClientKey::from_file(&self.client_key).expect("client key loads")),
            known,
        );
        config.retry = RetryPolicy::none();
        config.connect_timeout = Duration::from_secs(10);
        config
    }

    pub fn target(&self, sshd: &Sshd) -> Target {
        Target::new("127.0.0.1", sshd.port, self.user.clone())
    }
}

/// How to run one sshd.
#[derive(Default)]
pub struct SshdOptions {
    /// Host key files (private); default: a fresh ed25519 key.
    pub host_keys: Vec<PathBuf>,
    /// Fixed port instead of a free one.
    pub port: Option<u16>,
    /// Extra `-o` options.
    pub extra: Vec<String>,
}

/// A running sshd; killed (its whole process group) on drop.
pub struct Sshd {
    pub port: u16,
    pub dir: PathBuf,
    pub host_keys: Vec<PathBuf>,
    pub log: PathBuf,
    child: Option<Child>,
}

/// A port that is free right now on 127.0.0.1.
pub fn free_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    listener.local_addr().expect("local addr").port()
}

impl Sshd {
    fn start(fixture: &Fixture, options: SshdOptions) -> Sshd {
        let dir = tempfile::Builder::new()
            .prefix("sshd-")
            .tempdir_in(fixture.path())
            .expect("sshd dir")
            .keep();
        // Sessions get an empty home of their own: Debian's bash reads ~/.bashrc for commands run
        // by sshd, and the account's rc files (a pyenv rehash racing its twin from a parallel test,
        // seen in CI) would otherwise print into the output the tests compare. SetEnv overrides the
        // HOME sshd takes from the password database.
        let home = dir.join("home");
        fs::create_dir_all(&home).expect("sshd session home");
        let host_keys = if options.host_keys.is_empty() {
            vec![keygen(&dir, "ssh_host_ed25519_key", "ed25519", &[])]
        } else {
            options.host_keys.clone()
        };
        for attempt in 0..20 {
            let port = options.port.unwrap_or_else(free_port);
            let log = dir.join(format!("sshd-{port}.log"));
            let mut command = Command::new(SSHD);
            command
                .args(["-f", "/dev/null", "-D", "-e", "-p", &port.to_string()])
                .args(["-o", "ListenAddress=127.0.0.1"])
                .args([
                    "-o",
                    &format!("AuthorizedKeysFile={}", fixture.authorized_keys.display()),
                ])
                .args([
                    "-o",
                    "PasswordAuthentication=no",
                    "-o",
                    "KbdInteractiveAuthentication=no",
                ])
                .args(["-o", "StrictModes=no", "-o", "UseDNS=no"])
                .args([
                    "-o",
                    &format!("PidFile={}", dir.join(format!("sshd-{port}.pid")).display()),
                ])
                .args(["-o", "Subsystem=sftp internal-sftp"])
                .args(["-o", &format!("SetEnv=HOME={}", home.display())])
                // Many simultaneous handshakes in the 20-host tests; MaxSessions stays at
                // OpenSSH's default (10 channels per connection), as on real machines.
                .args(["-o", "MaxStartups=200"]);
            for key in &host_keys {
                command.args(["-h", key.to_str().expect("utf-8 path")]);
            }
            for extra in &options.extra {
                command.args(["-o", extra]);
            }
            let log_file = fs::File::create(&log).expect("sshd log");
            command
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(log_file)
                .process_group(0);
            let child = command.spawn().unwrap_or_else(|e| {
                panic!(
                    "cannot start {SSHD}: {e}; run tests/bed/install-host-packages.sh to install \
                     openssh-server"
                )
            });
            let mut sshd = Sshd {
                port,
                dir: dir.clone(),
                host_keys: host_keys.clone(),
                log,
                child: Some(child),
            };
            match sshd.wait_ready(Duration::from_secs(10)) {
                Ok(()) => return sshd,
                Err(why) if options.port.is_none() && attempt < 19 => {
                    // Most likely another test took the port between our probe and sshd's bind.
                    eprintln!("sshd on port {port} did not start ({why}); trying another port");
                    sshd.kill();
                }
                Err(why) => panic!(
                    "sshd on port {port} did not start: {why}\n{}",
                    sshd.log_text()
                ),
            }
        }
        unreachable!("loop returns or panics")
    }

    fn wait_ready(&mut self, limit: Duration) -> Result<(), String> {
        let start = Instant::now();
        while start.elapsed() < limit {
            if let Some(child) = self.child.as_mut()
                && let Ok(Some(status)) = child.try_wait()
            {
                return Err(format!("sshd exited with {status}: {}", self.log_text()));
            }
            if let Ok(mut stream) = TcpStream::connect(("127.0.0.1", self.port)) {
                let _ = stream.set_read_timeout(Some(Duration::from_secs(2)));
                let mut banner = [0u8; 8];
                if stream.read_exact(&mut banner).is_ok() && &banner == b"SSH-2.0-" {
                    return Ok(());
                }
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Err("timed out waiting for the ssh banner".to_string())
    }

    pub fn endpoint(&self) -> Endpoint {
        Endpoint::new("127.0.0.1", self.port)
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    pub fn log_text(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The public key of the first host key.
    pub fn host_public_line(&self) -> String {
        fs::read_to_string(self.host_keys[0].with_extension("pub")).expect("host .pub")
    }

    /// A KnownHosts that pins this server's first host key.
    pub fn pinned(&self) -> KnownHosts {
        let mut known = KnownHosts::new();
        known
            .pin_line(self.endpoint(), &self.host_public_line())
            .expect("pin host key");
        known
    }

    /// Kills the server like a crash would: SIGKILL to the listener and to every process it
    /// forked (per-connection sshd processes call setsid(), so they are not in the listener's
    /// process group), then to the commands those ran. Then reaps the listener.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            for pid in descendants(child.id()) {
                kill_pid(pid);
            }
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// `root` and all its descendants, parents before children.
pub fn descendants(root: u32) -> Vec<u32> {
    let mut parent_of = Vec::new();
    if let Ok(entries) = fs::read_dir("/proc") {
        for entry in entries.flatten() {
            let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
                continue;
            };
            let Ok(stat) = fs::read_to_string(format!("/proc/{pid}/stat")) else {
                continue;
            };
            // "pid (comm) state ppid ...": comm may contain spaces, so parse after the last ')'.
            let ppid = stat
                .rsplit_once(')')
                .and_then(|(_, rest)| rest.split_whitespace().nth(1))
                .and_then(|p| p.parse::<u32>().ok());
            if let Some(ppid) = ppid {
                parent_of.push((pid, ppid));
            }
        }
    }
    let mut out = vec![root];
    let mut i = 0;
    while i < out.len() {
        let parent = out[i];
        out.extend(
            parent_of
                .iter()
                .filter(|(_, p)| *p == parent)
                .map(|(c, _)| *c),
        );
        i += 1;
    }
    out
}

impl Drop for Sshd {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Kills a process by PID if it still runs (for remote commands the tests started).
pub fn kill_pid(pid: u32) {
    let _ = Command::new("kill")
        .args(["-KILL", &pid.to_string()])
        .stderr(Stdio::null())
        .status();
}

/// Whether a process with this PID exists.
pub fn pid_alive(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
        && !fs::read_to_string(format!("/proc/{pid}/stat"))
            .map(|s| s.contains(") Z "))
            .unwrap_or(true)
}
