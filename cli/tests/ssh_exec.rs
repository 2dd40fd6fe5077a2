//! Running commands over SSH against real OpenSSH servers on 127.0.0.1: exit codes, output,
//! streaming, timeouts, a server killed mid-command, retries, concurrency.

mod support;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use clusterctl::ssh::{ExecOptions, OutputLine, OutputStream, RetryPolicy, SshError, Target};
use support::{Fixture, SshdOptions, free_port, kill_pid, pid_alive};

#[tokio::test]
async fn exit_codes_stdout_and_stderr() {
    let fx = Fixture::new();
    let sshd = fx.sshd();
    let client = fx.client(sshd.pinned());
    let session = client.connect(&fx.target(&sshd)).await.expect("connect");

    let ok = session.exec("echo out; echo err >&2").await.expect("exec");
    assert_eq!(ok.exit_status, Some(0));
    assert!(ok.success());
    assert_eq!(ok.stdout_text(), "out\n");
    assert_eq!(ok.stderr_text(), "err\n");

    let failed = session
        .exec("echo partial; echo boom >&2; exit 42")
        .await
        .expect("exec");
    assert_eq!(failed.exit_status, Some(42));
    assert!(!failed.success());
    assert_eq!(failed.stdout_text(), "partial\n");
    let err = failed
        .check()
        .expect_err("non-zero exit is an error after check");
    let msg = err.to_string();
    assert!(msg.contains("exit status 42"), "{msg}");
    assert!(msg.contains("boom"), "{msg}");
    assert!(msg.contains(&format!("127.0.0.1:{}", sshd.port)), "{msg}");

    let err = session
        .run("false")
        .await
        .expect_err("run checks the status");
    assert!(matches!(err, SshError::CommandFailed { .. }), "{err}");

    // A command killed by a signal reports the signal, not an exit status.
    let killed = session.exec("kill -TERM $$").await.expect("exec");
    assert_eq!(killed.exit_status, None);
    assert_eq!(killed.exit_signal.as_deref(), Some("TERM"));

    // stdin is passed through; binary output survives.
    let out = session
        .exec_with(
            "cat; printf '\\000\\377'",
            ExecOptions {
                stdin: Some(b"from stdin\n"),
                ..Default::default()
            },
        )
        .await
        .expect("exec with stdin");
    assert_eq!(out.stdout, b"from stdin\n\x00\xff");
}

#[tokio::test]
async fn one_connection_serves_many_concurrent_commands() {
    let fx = Fixture::new();
    let sshd = fx.sshd();
    let client = fx.client(sshd.pinned());
    let session = client.connect(&fx.target(&sshd)).await.expect("connect");

    // Eight commands that each wait until all eight have started: they can only finish if
    // they run at the same time, each on its own channel of the one connection.
    let rendezvous = fx.path().join("rendezvous");
    std::fs::create_dir(&rendezvous).expect("mkdir");
    let mut tasks = Vec::new();
    for i in 0..8 {
        let session = session.clone();
        let command = format!(
            "touch {dir}/{i}; for _ in $(seq 300); do [ $(ls {dir} | wc -l) -ge 8 ] && break; \
             sleep 0.1; done; echo {i} $(ls {dir} | wc -l)",
            dir = rendezvous.display()
        );
        tasks.push(tokio::spawn(async move { session.run(&command).await }));
    }
    for (i, task) in tasks.into_iter().enumerate() {
        let out = task.await.expect("join").expect("command");
        assert_eq!(out.stdout_text().trim(), format!("{i} 8"));
    }
    // More concurrent commands than sshd allows channels per connection (MaxSessions 10):
    // they queue for a channel instead of failing.
    let mut tasks = Vec::new();
    for i in 0..16 {
        let session = session.clone();
        tasks.push(tokio::spawn(async move {
            session.run(&format!("echo {i}")).await
        }));
    }
    for (i, task) in tasks.into_iter().enumerate() {
        let out = task.await.expect("join").expect("queued command");
        assert_eq!(out.stdout_text().trim(), i.to_string());
    }
    for _ in 0..5 {
        session.run("true").await.expect("sequential command");
    }
    let accepted = sshd.log_text().matches("Accepted publickey").count();
    assert_eq!(
        accepted,
        1,
        "all commands must share one connection:\n{}",
        sshd.log_text()
    );
}

#[tokio::test]
async fn output_lines_stream_while_the_command_runs() {
    let fx = Fixture::new();
    let sshd = fx.sshd();
    let client = fx.client(sshd.pinned());
    let session = client.connect(&fx.target(&sshd)).await.expect("connect");

    // The command prints a line, then waits for a file that only our line callback creates:
    // it finishes with "go" only if the first line reached us while it was still running.
    let go = fx.path().join("go");
    let seen: Arc<Mutex<Vec<(OutputStream, String)>>> = Arc::default();
    let sink = seen.clone();
    let go_file = go.clone();
    let mut on_line = move |line: OutputLine<'_>| {
        if line.line == "one" {
            std::fs::write(&go_file, b"").expect("create go file");
        }
        sink.lock()
            .expect("lock")
            .push((line.stream, line.line.to_string()));
    };
    let command = format!(
        "echo one; for _ in $(seq 300); do [ -e {go} ] && break; sleep 0.1; done; \
         [ -e {go} ] && echo go >&2 || echo stalled >&2; printf 'no newline'",
        go = go.display()
    );
    let out = session
        .exec_with(
            &command,
            ExecOptions {
                on_line: Some(&mut on_line),
                ..Default::default()
            },
        )
        .await
        .expect("exec");
    assert!(out.success());
    let seen = seen.lock().expect("lock");
    let lines: Vec<(OutputStream, &str)> = seen.iter().map(|(s, l)| (*s, l.as_str())).collect();
    assert_eq!(
        lines,
        vec![
            (OutputStream::Stdout, "one"),
            (OutputStream::Stderr, "go"),
            (OutputStream::Stdout, "no newline"),
        ]
    );
    assert_eq!(out.stdout_text(), "one\nno newline");
}

#[tokio::test]
async fn timeout_kills_the_command_and_names_it() {
    let fx = Fixture::new();
    let sshd = fx.sshd_with(SshdOptions {
        extra: vec!["LogLevel=DEBUG1".into()],
        ..Default::default()
    });
    let client = fx.client(sshd.pinned());
    let session = client.connect(&fx.target(&sshd)).await.expect("connect");
    let pidfile = fx.path().join("timeout.pid");
    let command = format!("echo $$ > {}; exec sleep 30", pidfile.display());

    let start = Instant::now();
    let err = session
        .exec_with(
            &command,
            ExecOptions {
                // Long enough for the shell to start on a heavily loaded machine.
                timeout: Some(Duration::from_secs(4)),
                ..Default::default()
            },
        )
        .await
        .expect_err("must time out");
    let elapsed = start.elapsed();
    // Generous bound: the machine running the tests may be heavily loaded.
    assert!(
        elapsed >= Duration::from_secs(4),
        "returned early: {elapsed:?}"
    );
    assert!(
        elapsed < Duration::from_secs(10),
        "timeout took {elapsed:?}"
    );
    let msg = err.to_string();
    assert!(matches!(err, SshError::CommandTimeout { .. }), "{msg}");
    assert!(msg.contains(&format!("127.0.0.1:{}", sshd.port)), "{msg}");
    assert!(msg.contains("sleep 30"), "{msg}");
    assert!(msg.contains("timed out after 4s"), "{msg}");

    // The remote process was killed, and the connection is still usable.
    let pid: u32 = std::fs::read_to_string(&pidfile)
        .expect("pidfile")
        .trim()
        .parse()
        .expect("pid");
    let deadline = Instant::now() + Duration::from_secs(3);
    while pid_alive(pid) && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let alive = pid_alive(pid);
    kill_pid(pid);
    assert!(
        !alive,
        "remote command {pid} survived its timeout\n{}",
        sshd.log_text()
    );
    assert_eq!(
        session
            .run("echo still here")
            .await
            .expect("reuse")
            .stdout_text(),
        "still here\n"
    );
}

#[tokio::test]
async fn server_killed_mid_command_gives_a_clear_error_quickly() {
    let fx = Fixture::new();
    let mut sshd = fx.sshd();
    let client = fx.client(sshd.pinned());
    let session = client.connect(&fx.target(&sshd)).await.expect("connect");
    let pidfile = fx.path().join("killed.pid");
    let command = format!(
        "echo $$ > {}; echo started; exec sleep 30",
        pidfile.display()
    );

    let (started_tx, started_rx) = tokio::sync::oneshot::channel::<()>();
    let task = {
        let session = session.clone();
        let command = command.clone();
        tokio::spawn(async move {
            let mut started = Some(started_tx);
            let mut on_line = move |line: OutputLine<'_>| {
                if line.line == "started"
                    && let Some(tx) = started.take()
                {
                    let _ = tx.send(());
                }
            };
            session
                .exec_with(
                    &command,
                    ExecOptions {
                        on_line: Some(&mut on_line),
                        ..Default::default()
                    },
                )
                .await
        })
    };
    tokio::time::timeout(Duration::from_secs(10), started_rx)
        .await
        .expect("command started in time")
        .expect("started signal");
    let killed_at = Instant::now();
    sshd.kill();
    let result = tokio::time::timeout(Duration::from_secs(10), task)
        .await
        .expect("exec must return, not hang")
        .expect("exec task must not panic");
    let elapsed = killed_at.elapsed();
    if let Ok(Ok(pid)) = std::fs::read_to_string(&pidfile).map(|s| s.trim().parse::<u32>()) {
        kill_pid(pid);
    }
    let err = result.expect_err("the command cannot succeed");
    let msg = err.to_string();
    assert_eq!(
        msg,
        format!(
            "connection to 127.0.0.1:{} lost while running {command:?}",
            sshd.port
        )
    );
    assert!(
        elapsed < Duration::from_secs(5),
        "noticed after {elapsed:?}"
    );
    let deadline = Instant::now() + Duration::from_secs(1);
    while !session.is_closed() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(session.is_closed());
    let again = session.exec("true").await.expect_err("session is dead");
    assert!(matches!(again, SshError::ConnectionLost { .. }), "{again}");
}

#[tokio::test]
async fn connect_retries_until_sshd_starts_late() {
    let fx = Fixture::new();
    let port = free_port();
    let mut config = fx.config(Default::default());
    config.retry = RetryPolicy {
        initial_delay: Duration::from_millis(100),
        max_delay: Duration::from_millis(500),
        max_elapsed: Duration::from_secs(20),
    };
    // The host key is generated up front so it can be pinned before the server exists, as for
    // a machine that is still booting.
    let host_key = support::keygen(fx.path(), "late_host_key", "ed25519", &[]);
    let mut known = clusterctl::ssh::KnownHosts::new();
    let line = std::fs::read_to_string(host_key.with_extension("pub")).expect("pub");
    known
        .pin_line(clusterctl::ssh::Endpoint::new("127.0.0.1", port), &line)
        .expect("pin");
    config.known_hosts = known;
    let client = clusterctl::ssh::SshClient::new(config);
    let target = Target::new("127.0.0.1", port, fx.user.clone());

    let start = Instant::now();
    let connect = tokio::spawn({
        let client = client.clone();
        let target = target.clone();
        async move { client.connect(&target).await }
    });
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(!connect.is_finished(), "connect must still be retrying");
    let _sshd = fx.sshd_with(SshdOptions {
        host_keys: vec![host_key],
        port: Some(port),
        ..Default::default()
    });
    let session = connect.await.expect("join").expect("connect after retries");
    assert!(start.elapsed() >= Duration::from_millis(1400));
    assert_eq!(
        session.run("echo up").await.expect("run").stdout_text(),
        "up\n"
    );
}

#[tokio::test]
async fn connect_gives_up_with_a_clear_error() {
    let fx = Fixture::new();
    let port = free_port();
    let mut config = fx.config(Default::default());
    config.retry = RetryPolicy {
        initial_delay: Duration::from_millis(100),
        max_delay: Duration::from_millis(200),
        max_elapsed: Duration::from_millis(800),
    };
    let client = clusterctl::ssh::SshClient::new(config);
    let start = Instant::now();
    let err = client
        .connect(&Target::new("127.0.0.1", port, fx.user.clone()))
        .await
        .expect_err("nothing listens");
    assert!(
        start.elapsed() < Duration::from_secs(8),
        "gave up after {:?}",
        start.elapsed()
    );
    let SshError::Connect { attempts, .. } = &err else {
        panic!("unexpected error: {err}");
    };
    assert!(*attempts >= 3, "only {attempts} attempts");
    let msg = err.to_string();
    assert!(
        msg.starts_with(&format!("cannot connect to 127.0.0.1:{port}")),
        "{msg}"
    );
}

#[tokio::test]
async fn twenty_hosts_in_parallel_with_a_bound() {
    let fx = Fixture::new();
    // Twenty real sshd processes, one per "host", each with its own host key.
    let servers: Vec<support::Sshd> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..20).map(|_| scope.spawn(|| fx.sshd())).collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("sshd thread"))
            .collect()
    });
    let mut known = clusterctl::ssh::KnownHosts::new();
    for sshd in &servers {
        known
            .pin_line(sshd.endpoint(), &sshd.host_public_line())
            .expect("pin");
    }
    let client = fx.client(known);
    let targets: Vec<Target> = servers.iter().map(|s| fx.target(s)).collect();

    // All twenty at once: every command waits until all twenty have started.
    let all = fx.path().join("all");
    std::fs::create_dir(&all).expect("mkdir");
    let command = format!(
        "touch {dir}/$$; for _ in $(seq 600); do [ $(ls {dir} | wc -l) -ge 20 ] && break; \
         sleep 0.1; done; echo $(ls {dir} | wc -l) $SSH_CONNECTION",
        dir = all.display()
    );
    let start = Instant::now();
    let results = client.run_on_all(&targets, &command, 20).await;
    let unbounded = start.elapsed();
    assert_eq!(results.len(), 20);
    for (result, sshd) in results.iter().zip(&servers) {
        let out = result.result.as_ref().expect("command on every host");
        assert!(out.success());
        let text = out.stdout_text();
        assert!(text.starts_with("20 "), "not all 20 ran at once: {text}");
        // SSH_CONNECTION ends with the server port: each result belongs to its own host.
        assert!(text.trim().ends_with(&format!(" {}", sshd.port)), "{text}");
    }

    // Four at a time: each command reports how many are running beside it.
    let running = fx.path().join("running");
    std::fs::create_dir(&running).expect("mkdir");
    let command = format!(
        "touch {dir}/$$; ls {dir} | wc -l; sleep 0.3; rm {dir}/$$",
        dir = running.display()
    );
    let start = Instant::now();
    let results = client.run_on_all(&targets, &command, 4).await;
    let bounded = start.elapsed();
    let counts: Vec<usize> = results
        .iter()
        .map(|r| {
            let out = r.result.as_ref().expect("bounded run");
            out.stdout_text().trim().parse().expect("count")
        })
        .collect();
    assert!(
        counts.iter().all(|&c| c <= 4),
        "more than 4 at once: {counts:?}"
    );
    eprintln!("20 hosts: all at once {unbounded:?}, 4 at a time {bounded:?}");

    // A dead host yields an error for that host only.
    let mut with_dead = targets.clone();
    with_dead.push(Target::new("127.0.0.1", free_port(), fx.user.clone()));
    let results = client.run_on_all(&with_dead, "true", 8).await;
    assert!(results[..20].iter().all(|r| r.result.is_ok()));
    let last = results[20].result.as_ref().expect_err("dead host");
    assert!(matches!(last, SshError::Connect { .. }), "{last}");
}

#[tokio::test]
async fn frozen_server_is_detected_by_keepalives() {
    let fx = Fixture::new();
    let sshd = fx.sshd();
    let mut config = fx.config(sshd.pinned());
    config.keepalive_interval = Some(Duration::from_millis(500));
    let client = clusterctl::ssh::SshClient::new(config);
    let session = client.connect(&fx.target(&sshd)).await.expect("connect");
    session.run("true").await.expect("warm");

    // Freeze every sshd process: TCP stays open but nothing answers, as when a machine hangs
    // or the network drops packets.
    let pids = support::descendants(sshd.pid().expect("pid"));
    let signal = |sig: &str| {
        for pid in &pids {
            let _ = std::process::Command::new("kill")
                .args([sig, &pid.to_string()])
                .status();
        }
    };
    signal("-STOP");
    let start = Instant::now();
    let result = tokio::time::timeout(Duration::from_secs(20), session.exec("echo hi")).await;
    let elapsed = start.elapsed();
    signal("-CONT");
    let err = result
        .expect("must not hang")
        .expect_err("server is frozen");
    assert!(matches!(err, SshError::ConnectionLost { .. }), "{err}");
    assert!(
        err.to_string()
            .contains(&format!("127.0.0.1:{}", sshd.port)),
        "{err}"
    );
    // Three missed keepalives at 0.5 s, plus scheduling slack on a loaded machine.
    assert!(
        elapsed < Duration::from_secs(10),
        "detected after {elapsed:?}"
    );
}
