//! Who talks to whom, against real OpenSSH servers on 127.0.0.1: host key verification (pinned,
//! known_hosts plain and hashed, changed, revoked, unknown), generated host keys, client key
//! types and rejection, encrypted keys, ssh-agent, and jump hosts.

mod support;

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use clusterctl::ssh::keys::{self, KeyAlgorithm};
use clusterctl::ssh::{Auth, ClientConfig, ClientKey, Endpoint, KnownHosts, SshClient, SshError};
use support::{Fixture, SshdOptions, keygen, sh};

/// `SHA256:...` fingerprint of a key file as ssh-keygen prints it (the independent reference).
fn keygen_fingerprint(pub_path: &std::path::Path) -> String {
    let out = sh(
        "ssh-keygen",
        &[
            "-l",
            "-E",
            "sha256",
            "-f",
            pub_path.to_str().expect("utf-8"),
        ],
    );
    out.split_whitespace()
        .nth(1)
        .expect("fingerprint field")
        .to_string()
}

#[tokio::test]
async fn changed_host_key_is_rejected_with_a_clear_error() {
    let fx = Fixture::new();
    let sshd = fx.sshd();
    // The cluster pinned another key for this address (say, before the machine was replaced).
    let old = keygen(fx.path(), "old_host_key", "ed25519", &[]);
    let mut known = KnownHosts::new();
    known
        .pin_line(
            sshd.endpoint(),
            &fs::read_to_string(old.with_extension("pub")).expect("pub"),
        )
        .expect("pin");
    let client = fx.client(known);
    let start = Instant::now();
    let err = client
        .connect(&fx.target(&sshd))
        .await
        .expect_err("must refuse");
    assert!(
        start.elapsed() < Duration::from_secs(10),
        "took {:?}",
        start.elapsed()
    );
    let offered = keygen_fingerprint(&sshd.host_keys[0].with_extension("pub"));
    let expected = keygen_fingerprint(&old.with_extension("pub"));
    let msg = err.to_string();
    assert!(matches!(err, SshError::HostKeyChanged { .. }), "{msg}");
    assert!(msg.contains(&format!("127.0.0.1:{}", sshd.port)), "{msg}");
    assert!(
        msg.contains(&offered),
        "offered fingerprint {offered} missing: {msg}"
    );
    assert!(
        msg.contains(&expected),
        "expected fingerprint {expected} missing: {msg}"
    );
    assert!(msg.contains("man-in-the-middle"), "{msg}");
    // No authentication was attempted: the client stopped at the host key.
    assert!(
        !sshd.log_text().contains("Accepted publickey"),
        "{}",
        sshd.log_text()
    );
}

#[tokio::test]
async fn unknown_host_key_is_rejected_never_trusted_on_first_use() {
    let fx = Fixture::new();
    let sshd = fx.sshd();
    let client = fx.client(KnownHosts::new());
    let err = client
        .connect(&fx.target(&sshd))
        .await
        .expect_err("unknown host");
    let msg = err.to_string();
    assert!(matches!(err, SshError::UnknownHostKey { .. }), "{msg}");
    assert!(msg.contains(&format!("127.0.0.1:{}", sshd.port)), "{msg}");
    assert!(
        msg.contains(&keygen_fingerprint(
            &sshd.host_keys[0].with_extension("pub")
        )),
        "{msg}"
    );
    assert!(msg.contains("pin the key"), "{msg}");
    // The same key on another port of the same host is not trusted either.
    let mut other_port = KnownHosts::new();
    other_port
        .pin_line(
            Endpoint::new("127.0.0.1", sshd.port.wrapping_add(1)),
            &sshd.host_public_line(),
        )
        .expect("pin");
    let err = fx
        .client(other_port)
        .connect(&fx.target(&sshd))
        .await
        .expect_err("port matters");
    assert!(matches!(err, SshError::UnknownHostKey { .. }), "{err}");
}

#[tokio::test]
async fn known_hosts_files_plain_hashed_and_revoked() {
    let fx = Fixture::new();
    let sshd = fx.sshd();
    let line = KnownHosts::known_hosts_line(
        &sshd.endpoint(),
        &keys::parse_public_key(&sshd.host_public_line()).expect("parse"),
    );
    assert!(line.starts_with(&format!("[127.0.0.1]:{} ssh-ed25519 ", sshd.port)));

    // Plain entry among unrelated lines.
    let plain = fx.path().join("known_hosts_plain");
    fs::write(&plain, format!("# comment\nother.example ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIJdD7y3aLq454yWBdwLWbieU1ebz9/cu7/QEXn9OIeZJ\n{line}\n"))
        .expect("write");
    let mut known = KnownHosts::new();
    known.add_file(&plain);
    let session = fx
        .client(known)
        .connect(&fx.target(&sshd))
        .await
        .expect("plain entry");
    session.run("true").await.expect("run");

    // Hashed by OpenSSH itself (`ssh-keygen -H`).
    let hashed = fx.path().join("known_hosts_hashed");
    fs::write(&hashed, format!("{line}\n")).expect("write");
    sh(
        "ssh-keygen",
        &["-q", "-H", "-f", hashed.to_str().expect("utf-8")],
    );
    let text = fs::read_to_string(&hashed).expect("read");
    assert!(
        text.starts_with("|1|") && !text.contains("127.0.0.1"),
        "not hashed: {text}"
    );
    let mut known = KnownHosts::new();
    known.add_file(&hashed);
    fx.client(known)
        .connect(&fx.target(&sshd))
        .await
        .expect("hashed entry");

    // A different key on record in a file: changed, and the message points at file and line.
    let other = keygen(fx.path(), "other_key", "ed25519", &[]);
    let other_line = KnownHosts::known_hosts_line(
        &sshd.endpoint(),
        &keys::parse_public_key(&fs::read_to_string(other.with_extension("pub")).expect("pub"))
            .expect("parse"),
    );
    let changed = fx.path().join("known_hosts_changed");
    fs::write(&changed, format!("# first line\n{other_line}\n")).expect("write");
    let mut known = KnownHosts::new();
    known.add_file(&changed);
    let err = fx
        .client(known)
        .connect(&fx.target(&sshd))
        .await
        .expect_err("changed");
    let msg = err.to_string();
    assert!(matches!(err, SshError::HostKeyChanged { .. }), "{msg}");
    assert!(msg.contains(&format!("{}:2", changed.display())), "{msg}");

    // @revoked wins over a matching entry.
    let revoked = fx.path().join("known_hosts_revoked");
    fs::write(
        &revoked,
        format!("{line}\n@revoked * {}\n", sshd.host_public_line().trim()),
    )
    .expect("write");
    let mut known = KnownHosts::new();
    known.add_file(&revoked);
    let err = fx
        .client(known)
        .connect(&fx.target(&sshd))
        .await
        .expect_err("revoked");
    assert!(matches!(err, SshError::HostKeyRevoked { .. }), "{err}");

    // A missing known_hosts file is simply empty.
    let mut known = KnownHosts::new();
    known.add_file(fx.path().join("nope"));
    let err = fx
        .client(known)
        .connect(&fx.target(&sshd))
        .await
        .expect_err("unknown");
    assert!(matches!(err, SshError::UnknownHostKey { .. }), "{err}");
}

#[tokio::test]
async fn generated_host_key_is_pinned_before_first_contact() {
    let fx = Fixture::new();
    // What a provider does for a new machine: generate the host key, inject it, pin it.
    let generated = keys::generate_host_key().expect("generate");
    assert!(
        !format!("{generated:?}").contains("PRIVATE"),
        "Debug must not show the key"
    );
    assert!(
        generated
            .private_key_openssh()
            .starts_with("-----BEGIN OPENSSH PRIVATE KEY-----")
    );
    let key_path = fx.path().join(generated.host_key_file_name());
    fs::write(&key_path, generated.private_key_openssh()).expect("write key");
    fs::set_permissions(&key_path, fs::Permissions::from_mode(0o600)).expect("chmod");
    fs::write(key_path.with_extension("pub"), generated.public_key_line()).expect("write pub");
    // ssh-keygen agrees on the fingerprint.
    assert_eq!(
        keygen_fingerprint(&key_path.with_extension("pub")),
        generated.fingerprint()
    );

    let sshd = fx.sshd_with(SshdOptions {
        host_keys: vec![key_path],
        ..Default::default()
    });
    let mut known = KnownHosts::new();
    known.pin(sshd.endpoint(), generated.public_key().clone());
    let session = fx
        .client(known)
        .connect(&fx.target(&sshd))
        .await
        .expect("pinned generated key");
    session.run("true").await.expect("run");
}

#[tokio::test]
async fn host_known_only_by_its_rsa_key_is_verified() {
    let fx = Fixture::new();
    // The server has ed25519 and rsa host keys; only the rsa one is on record.
    let ed = keygen(fx.path(), "h_ed25519", "ed25519", &[]);
    let rsa = keygen(fx.path(), "h_rsa", "rsa", &["-b", "2048"]);
    let sshd = fx.sshd_with(SshdOptions {
        host_keys: vec![ed, rsa.clone()],
        ..Default::default()
    });
    let mut known = KnownHosts::new();
    known
        .pin_line(
            sshd.endpoint(),
            &fs::read_to_string(rsa.with_extension("pub")).expect("pub"),
        )
        .expect("pin");
    fx.client(known)
        .connect(&fx.target(&sshd))
        .await
        .expect("rsa host key negotiated");
}

#[tokio::test]
async fn client_key_types_and_formats() {
    let fx = Fixture::new();
    let rsa = keygen(fx.path(), "c_rsa", "rsa", &["-b", "2048"]);
    let ecdsa = keygen(fx.path(), "c_ecdsa", "ecdsa", &["-b", "256"]);
    let pem_rsa = keygen(fx.path(), "c_rsa_pem", "rsa", &["-b", "2048", "-m", "PEM"]);
    let generated = keys::generate_client_key("clusterctl admin").expect("generate");
    let generated_ecdsa = keys::generate_key(KeyAlgorithm::EcdsaP256, "ecdsa admin").expect("gen");
    for path in [&rsa, &ecdsa, &pem_rsa] {
        fx.authorize(&fs::read_to_string(path.with_extension("pub")).expect("pub"));
    }
    fx.authorize(&generated.public_key_line());
    fx.authorize(&generated_ecdsa.public_key_line());
    let sshd = fx.sshd();

    let mut keys_to_try: Vec<(String, ClientKey)> = [&rsa, &ecdsa, &pem_rsa]
        .into_iter()
        .map(|p| {
            (
                p.display().to_string(),
                ClientKey::from_file(p).expect("load key"),
            )
        })
        .collect();
    keys_to_try.push((
        "generated ed25519".into(),
        generated.to_client_key().expect("key"),
    ));
    keys_to_try.push((
        "generated ecdsa".into(),
        generated_ecdsa.to_client_key().expect("key"),
    ));
    for (name, key) in keys_to_try {
        assert!(!format!("{key:?}").contains("PRIVATE"));
        let config = ClientConfig::new(Auth::Key(key), sshd.pinned());
        let session = SshClient::new(config)
            .connect(&fx.target(&sshd))
            .await
            .unwrap_or_else(|e| panic!("{name}: {e:#}"));
        assert_eq!(
            session.run("echo ok").await.expect("run").stdout_text(),
            "ok\n",
            "{name}"
        );
    }
}

#[tokio::test]
async fn wrong_client_key_is_rejected() {
    let fx = Fixture::new();
    let sshd = fx.sshd();
    let stranger = keygen(fx.path(), "stranger", "ed25519", &[]);
    let mut config = ClientConfig::new(Auth::key_file(&stranger).expect("load"), sshd.pinned());
    // Retries are configured, yet an authentication failure must not be retried.
    config.retry = clusterctl::ssh::RetryPolicy::for_up_to(Duration::from_secs(30));
    let start = Instant::now();
    let err = SshClient::new(config)
        .connect(&fx.target(&sshd))
        .await
        .expect_err("not authorized");
    assert!(
        start.elapsed() < Duration::from_secs(10),
        "auth failure was retried"
    );
    let msg = err.to_string();
    assert!(matches!(err, SshError::AuthRejected { .. }), "{msg}");
    assert!(msg.contains(&format!("127.0.0.1:{}", sshd.port)), "{msg}");
    assert!(msg.contains(&fx.user), "{msg}");
    assert!(
        msg.contains(&keygen_fingerprint(&stranger.with_extension("pub"))),
        "{msg}"
    );
    assert!(msg.contains("authorized_keys"), "{msg}");
}

#[test]
fn encrypted_and_broken_keys_give_clear_errors() {
    let dir = tempfile::tempdir().expect("tempdir");
    let enc = dir.path().join("enc");
    sh(
        "ssh-keygen",
        &[
            "-q",
            "-t",
            "ed25519",
            "-N",
            "secret",
            "-f",
            enc.to_str().expect("utf-8"),
        ],
    );
    let err = ClientKey::from_file(&enc).expect_err("encrypted");
    let msg = err.to_string();
    assert!(matches!(err, SshError::EncryptedKey { .. }), "{msg}");
    assert!(
        msg.contains("passphrase") && msg.contains("ssh-add"),
        "{msg}"
    );

    let enc_pem = dir.path().join("enc_pem");
    sh(
        "ssh-keygen",
        &[
            "-q",
            "-t",
            "rsa",
            "-b",
            "2048",
            "-m",
            "PEM",
            "-N",
            "secret",
            "-f",
            enc_pem.to_str().expect("utf-8"),
        ],
    );
    let err = ClientKey::from_file(&enc_pem).expect_err("encrypted pem");
    assert!(matches!(err, SshError::EncryptedKey { .. }), "{err}");

    let garbage = dir.path().join("garbage");
    fs::write(&garbage, "not a key").expect("write");
    let err = ClientKey::from_file(&garbage).expect_err("garbage");
    assert!(matches!(err, SshError::KeyParse { .. }), "{err}");
    let err = ClientKey::from_file(dir.path().join("missing")).expect_err("missing");
    assert!(
        err.to_string().starts_with("cannot read private key file"),
        "{err}"
    );
}

/// An ssh-agent started for the test (foreground mode, killed by PID on drop).
struct Agent {
    child: Child,
    socket: std::path::PathBuf,
}

impl Agent {
    fn start(dir: &std::path::Path) -> Agent {
        support::require_program("ssh-agent");
        let socket = dir.join("agent.sock");
        let child = Command::new("ssh-agent")
            .args(["-D", "-a", socket.to_str().expect("utf-8")])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start ssh-agent");
        let start = Instant::now();
        while !socket.exists() && start.elapsed() < Duration::from_secs(5) {
            std::thread::sleep(Duration::from_millis(20));
        }
        Agent { child, socket }
    }

    fn add(&self, key: &std::path::Path, passphrase: Option<&str>) {
        let mut command = Command::new("ssh-add");
        command
            .arg(key)
            .env("SSH_AUTH_SOCK", &self.socket)
            .stdin(Stdio::null());
        if let Some(passphrase) = passphrase {
            let askpass = key.with_extension("askpass");
            fs::write(&askpass, format!("#!/bin/sh\necho '{passphrase}'\n")).expect("askpass");
            fs::set_permissions(&askpass, fs::Permissions::from_mode(0o700)).expect("chmod");
            command
                .env("SSH_ASKPASS", &askpass)
                .env("SSH_ASKPASS_REQUIRE", "force");
        }
        let out = command.output().expect("ssh-add");
        assert!(
            out.status.success(),
            "ssh-add: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test]
async fn ssh_agent_authentication() {
    let fx = Fixture::new();
    let sshd = fx.sshd();
    let agent = Agent::start(fx.path());
    let socket = agent.socket.clone();

    // An empty agent: a clear error.
    let config = ClientConfig::new(
        Auth::Agent {
            socket: Some(socket.clone()),
        },
        sshd.pinned(),
    );
    let err = SshClient::new(config.clone())
        .connect(&fx.target(&sshd))
        .await
        .expect_err("empty agent");
    assert!(err.to_string().contains("holds no keys"), "{err}");

    // A passphrase-protected key works through the agent; an unrelated key is tried first.
    let unrelated = keygen(fx.path(), "unrelated", "ed25519", &[]);
    agent.add(&unrelated, None);
    let protected = fx.path().join("protected");
    sh(
        "ssh-keygen",
        &[
            "-q",
            "-t",
            "ed25519",
            "-N",
            "pass phrase",
            "-f",
            protected.to_str().expect("utf-8"),
        ],
    );
    fx.authorize(&fs::read_to_string(protected.with_extension("pub")).expect("pub"));
    agent.add(&protected, Some("pass phrase"));
    let session = SshClient::new(config)
        .connect(&fx.target(&sshd))
        .await
        .expect("agent auth");
    assert_eq!(
        session.run("echo agent").await.expect("run").stdout_text(),
        "agent\n"
    );

    // No agent at that path.
    let config = ClientConfig::new(
        Auth::Agent {
            socket: Some(fx.path().join("no-agent.sock")),
        },
        sshd.pinned(),
    );
    let err = SshClient::new(config)
        .connect(&fx.target(&sshd))
        .await
        .expect_err("no agent");
    assert!(matches!(err, SshError::AgentUnavailable { .. }), "{err}");
}

#[tokio::test]
async fn jump_host_with_its_own_host_key_check() {
    let fx = Fixture::new();
    // The bastion logs forwarding requests at DEBUG1, which proves the path taken.
    let bastion = fx.sshd_with(SshdOptions {
        extra: vec!["LogLevel=DEBUG1".into()],
        ..Default::default()
    });
    let inner = fx.sshd();
    let mut known = bastion.pinned();
    known
        .pin_line(inner.endpoint(), &inner.host_public_line())
        .expect("pin inner");
    let client = fx.client(known);
    let target = fx.target(&inner).via(fx.target(&bastion));

    let session = client
        .connect(&target)
        .await
        .expect("connect through the jump host");
    let out = session.run("echo $SSH_CONNECTION").await.expect("run");
    assert!(
        out.stdout_text()
            .trim()
            .ends_with(&format!(" {}", inner.port))
    );
    assert!(
        bastion
            .log_text()
            .contains(&format!("target 127.0.0.1 port {}", inner.port)),
        "the bastion did not forward:\n{}",
        bastion.log_text()
    );
    // A second target through the same bastion reuses its connection.
    let inner2 = fx.sshd();
    client.pin_host_key(
        inner2.endpoint(),
        keys::parse_public_key(&inner2.host_public_line()).expect("parse"),
    );
    let session2 = client
        .connect(&fx.target(&inner2).via(fx.target(&bastion)))
        .await
        .expect("second target");
    session2.run("true").await.expect("run");
    session
        .upload_bytes(
            b"via bastion",
            fx.path().join("via").to_str().expect("utf-8"),
            0o644,
        )
        .await
        .expect("upload through the jump host");
    assert_eq!(
        fs::read(fx.path().join("via")).expect("read"),
        b"via bastion"
    );
    assert_eq!(bastion.log_text().matches("Accepted publickey").count(), 1);

    // The target's host key is verified on its own: a wrong pin for it fails even though the
    // bastion is trusted, and the error names the target.
    let mut wrong = bastion.pinned();
    wrong
        .pin_line(inner.endpoint(), &bastion.host_public_line())
        .expect("pin wrong key");
    let err = fx
        .client(wrong)
        .connect(&target)
        .await
        .expect_err("target key mismatch");
    let msg = err.to_string();
    assert!(matches!(err, SshError::HostKeyChanged { .. }), "{msg}");
    assert!(msg.contains(&format!("127.0.0.1:{}", inner.port)), "{msg}");

    // A bastion that does not forward: a clear error naming both ends.
    let strict = fx.sshd_with(SshdOptions {
        extra: vec!["AllowTcpForwarding=no".into()],
        ..Default::default()
    });
    let mut known = strict.pinned();
    known
        .pin_line(inner.endpoint(), &inner.host_public_line())
        .expect("pin");
    let err = fx
        .client(known)
        .connect(&fx.target(&inner).via(fx.target(&strict)))
        .await
        .expect_err("forwarding refused");
    let msg = err.to_string();
    assert!(matches!(err, SshError::JumpForward { .. }), "{msg}");
    assert!(
        msg.contains(&format!("jump host 127.0.0.1:{}", strict.port)),
        "{msg}"
    );
    assert!(msg.contains(&format!("127.0.0.1:{}", inner.port)), "{msg}");
}
