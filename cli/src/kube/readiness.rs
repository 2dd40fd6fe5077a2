//! Readiness waits on the API client: until `/readyz` answers ok and the given nodes are Ready.
//!
//! The loop is "observe, decide, sleep": [`decide`] is a pure function of the observation, the
//! clock and the deadline, so tests drive it (and the loop, through [`Clock`]) with a fixed
//! clock. Errors go through the client's one policy ([`KubeError::disposition`]): transient
//! ones are retried until the deadline, permanent ones end the wait at once.

use std::collections::BTreeSet;
use std::future::Future;
use std::pin::Pin;
use std::time::{Duration, Instant};

use super::{Disposition, KubeError, NodeState};

/// Time as the wait sees it: now, and sleeping. Real code uses [`TokioClock`].
pub trait Clock: Send + Sync {
    /// The current instant.
    fn now(&self) -> Instant;
    /// Sleeps for `duration`.
    fn sleep(&self, duration: Duration) -> Pin<Box<dyn Future<Output = ()> + Send + '_>>;
}

/// The real clock (tokio's timer).
#[derive(Debug, Clone, Copy, Default)]
pub struct TokioClock;

impl Clock for TokioClock {
    fn now(&self) -> Instant {
        Instant::now()
    }
    fn sleep(&self, duration: Duration) -> Pin<Box<dyn Future<Output = ()> + Send + '_>> {
        Box::pin(tokio::time::sleep(duration))
    }
}

/// How a wait paces itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WaitPolicy {
    /// Give up after this long.
    pub timeout: Duration,
    /// Look again after this long when the goal is not reached or an error is transient.
    pub poll: Duration,
    /// Look again after this long when the server asked to wait (429) without saying how long.
    pub backoff: Duration,
}

impl WaitPolicy {
    /// Polls every 2 s (5 s after a 429) for up to `timeout`.
    pub fn for_up_to(timeout: Duration) -> Self {
        WaitPolicy {
            timeout,
            poll: Duration::from_secs(2),
            backoff: Duration::from_secs(5),
        }
    }
}

/// What the wait decided after one observation.
#[derive(Debug)]
pub enum Next {
    /// Every wanted node is Ready: the nodes as listed (the wanted ones, sorted by name).
    Done(Vec<NodeState>),
    /// Look again after `after`; `status` says what is awaited (for progress output).
    Again {
        /// When to look again.
        after: Duration,
        /// What is awaited or what failed, in words.
        status: String,
    },
    /// Stop with this error.
    Fail(KubeError),
}

/// The decision after one observation (`Ok(nodes)` when `/readyz` said ok and the listing
/// worked), at `now`, for a wait that started at `started`.
pub fn decide(
    wanted: &BTreeSet<String>,
    observed: Result<Vec<NodeState>, KubeError>,
    started: Instant,
    now: Instant,
    policy: &WaitPolicy,
) -> Next {
    let elapsed = now.saturating_duration_since(started);
    let (status, after) = match observed {
        Ok(nodes) => {
            let ready: BTreeSet<&str> = nodes
                .iter()
                .filter(|n| n.ready)
                .map(|n| n.name.as_str())
                .collect();
            let missing: Vec<&str> = wanted
                .iter()
                .map(String::as_str)
                .filter(|n| !ready.contains(n))
                .collect();
            if missing.is_empty() {
                let mut done: Vec<NodeState> = nodes
                    .into_iter()
                    .filter(|n| wanted.contains(&n.name))
                    .collect();
                done.sort_by(|a, b| a.name.cmp(&b.name));
                return Next::Done(done);
            }
            let listed: BTreeSet<&str> = nodes.iter().map(|n| n.name.as_str()).collect();
            let (absent, not_ready): (Vec<&str>, Vec<&str>) =
                missing.iter().partition(|n| !listed.contains(*n));
            let mut words = Vec::new();
            if !not_ready.is_empty() {
                words.push(format!("not Ready: {}", not_ready.join(", ")));
            }
            if !absent.is_empty() {
                words.push(format!("not registered: {}", absent.join(", ")));
            }
            (
                format!("waiting for nodes ({})", words.join("; ")),
                policy.poll,
            )
        }
        Err(error) => match error.disposition() {
            Disposition::Fail => return Next::Fail(error),
            Disposition::Retry => (
                format!("API server not ready, retrying: {}", super::chain(&error)),
                policy.poll,
            ),
            Disposition::Wait => {
                let after = match &error {
                    KubeError::Api {
                        retry_after: Some(d),
                        ..
                    } => *d,
                    _ => policy.backoff,
                };
                (
                    format!("API server busy, waiting: {}", super::chain(&error)),
                    after,
                )
            }
        },
    };
    if elapsed + after > policy.timeout {
        let what = if wanted.is_empty() {
            "API server ready".to_owned()
        } else {
            format!(
                "nodes Ready ({})",
                wanted.iter().cloned().collect::<Vec<_>>().join(", ")
            )
        };
        return Next::Fail(KubeError::Timeout {
            what,
            waited: elapsed,
            state: status,
        });
    }
    Next::Again { after, status }
}

/// Waits until `observe` reports every node in `wanted` Ready, per `policy` on `clock`.
/// `progress` is called with each new status line (not repeated while it stays the same).
pub async fn wait_until_ready<F, Fut>(
    wanted: &BTreeSet<String>,
    policy: &WaitPolicy,
    clock: &dyn Clock,
    mut observe: F,
    progress: &mut (dyn FnMut(&str) + Send),
) -> Result<Vec<NodeState>, KubeError>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<Vec<NodeState>, KubeError>>,
{
    let started = clock.now();
    let mut last = String::new();
    loop {
        let observed = observe().await;
        match decide(wanted, observed, started, clock.now(), policy) {
            Next::Done(nodes) => return Ok(nodes),
            Next::Fail(error) => return Err(error),
            Next::Again { after, status } => {
                if status != last {
                    progress(&status);
                    last = status;
                }
                clock.sleep(after).await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::VecDeque;
    use std::sync::Mutex;

    use super::super::tunnel::{TunnelError, TunnelFailure};
    use super::*;

    /// A clock that stands still until slept on; sleeping advances it at once.
    struct FixedClock {
        now: Mutex<Instant>,
    }

    impl FixedClock {
        fn new(start: Instant) -> Self {
            FixedClock {
                now: Mutex::new(start),
            }
        }
    }

    impl Clock for FixedClock {
        fn now(&self) -> Instant {
            *self.now.lock().unwrap_or_else(|p| p.into_inner())
        }
        fn sleep(&self, duration: Duration) -> Pin<Box<dyn Future<Output = ()> + Send + '_>> {
            *self.now.lock().unwrap_or_else(|p| p.into_inner()) += duration;
            Box::pin(std::future::ready(()))
        }
    }

    fn node(name: &str, ready: bool) -> NodeState {
        NodeState {
            name: name.into(),
            ready,
            kubelet_version: "v1.20.2".into(),
            unschedulable: false,
            boot_id: String::new(),
            ..Default::default()
        }
    }

    fn wanted(names: &[&str]) -> BTreeSet<String> {
        names.iter().map(|s| s.to_string()).collect()
    }

    fn api(code: u16) -> KubeError {
        KubeError::Api {
            op: "listing nodes".into(),
            code,
            reason: "Reason".into(),
            message: "message".into(),
            retry_after: None,
        }
    }

    fn connect(kind: TunnelFailure) -> KubeError {
        KubeError::Connect {
            op: "reading /readyz".into(),
            source: TunnelError {
                kind,
                detail: format!("{kind:?}"),
            },
        }
    }

    /// One observation and the expected decision, at `at` seconds into a 60 s wait.
    fn check(at: u64, observed: Result<Vec<NodeState>, KubeError>, want: &str) {
        let policy = WaitPolicy::for_up_to(Duration::from_secs(60));
        let t0 = Instant::now();
        let got = decide(
            &wanted(&["a", "b"]),
            observed,
            t0,
            t0 + Duration::from_secs(at),
            &policy,
        );
        let got = match got {
            Next::Done(nodes) => format!(
                "done {}",
                nodes
                    .iter()
                    .map(|n| n.name.as_str())
                    .collect::<Vec<_>>()
                    .join(",")
            ),
            Next::Again { after, status } => format!("again {}s {status}", after.as_secs()),
            Next::Fail(e) => format!("fail {}", super::super::chain(&e)),
        };
        assert!(
            got.starts_with(want),
            "at {at}s: want {want:?}..., got {got:?}"
        );
    }

    #[test]
    fn decisions_by_observation_and_time() {
        // Goal reached: only the wanted nodes, sorted; extra nodes ignored.
        check(
            0,
            Ok(vec![node("b", true), node("x", false), node("a", true)]),
            "done a,b",
        );
        check(
            5,
            Ok(vec![node("a", true), node("b", false)]),
            "again 2s waiting for nodes (not Ready: b)",
        );
        check(
            5,
            Ok(vec![node("a", false)]),
            "again 2s waiting for nodes (not Ready: a; not registered: b)",
        );
        check(
            59,
            Ok(vec![node("a", true)]),
            "fail nodes Ready (a, b) not reached after 59 s; waiting for nodes (not registered: b)",
        );
        // Transient errors: retried until the deadline.
        check(
            1,
            Err(connect(TunnelFailure::Refused)),
            "again 2s API server not ready",
        );
        check(1, Err(connect(TunnelFailure::SshTransient)), "again 2s");
        check(1, Err(connect(TunnelFailure::HandshakeIo)), "again 2s");
        check(1, Err(api(500)), "again 2s");
        check(1, Err(api(503)), "again 2s");
        check(1, Err(api(504)), "again 2s");
        check(1, Err(api(408)), "again 2s");
        check(
            59,
            Err(api(503)),
            "fail nodes Ready (a, b) not reached after 59 s",
        );
        // 429: wait longer, or as long as the server says.
        check(1, Err(api(429)), "again 5s API server busy");
        let mut told = api(429);
        if let KubeError::Api { retry_after, .. } = &mut told {
            *retry_after = Some(Duration::from_secs(7));
        }
        check(1, Err(told), "again 7s");
        // Permanent: fail at once, with what to do.
        check(
            0,
            Err(api(401)),
            "fail listing nodes: the API server answered 401 Reason: message; the API server does \
             not accept the admin client certificate",
        );
        check(
            0,
            Err(api(403)),
            "fail listing nodes: the API server answered 403",
        );
        check(
            0,
            Err(api(404)),
            "fail listing nodes: the API server answered 404",
        );
        check(0, Err(api(501)), "fail");
        check(0, Err(connect(TunnelFailure::ServerCertificate)), "fail");
        check(0, Err(connect(TunnelFailure::HandshakeRejected)), "fail");
        check(0, Err(connect(TunnelFailure::SshFatal)), "fail");
        check(0, Err(connect(TunnelFailure::Prohibited)), "fail");
    }

    #[test]
    fn error_policy_table() {
        use Disposition::*;
        let table: &[(KubeError, Disposition)] = &[
            (api(400), Fail),
            (api(401), Fail),
            (api(403), Fail),
            (api(404), Fail),
            (api(409), Fail),
            (api(408), Retry),
            (api(429), Wait),
            (api(500), Retry),
            (api(501), Fail),
            (api(502), Retry),
            (api(503), Retry),
            (api(504), Retry),
            (connect(TunnelFailure::Refused), Retry),
            (connect(TunnelFailure::SshTransient), Retry),
            (connect(TunnelFailure::HandshakeIo), Retry),
            (connect(TunnelFailure::SshFatal), Fail),
            (connect(TunnelFailure::Prohibited), Fail),
            (connect(TunnelFailure::ServerCertificate), Fail),
            (connect(TunnelFailure::HandshakeRejected), Fail),
        ];
        for (error, want) in table {
            assert_eq!(error.disposition(), *want, "{error}");
        }
    }

    #[tokio::test]
    async fn the_loop_retries_through_a_starting_api_server_then_sees_the_nodes() {
        let start = Instant::now();
        let clock = FixedClock::new(start);
        let mut script: VecDeque<Result<Vec<NodeState>, KubeError>> = VecDeque::from(vec![
            Err(connect(TunnelFailure::Refused)),
            Err(connect(TunnelFailure::Refused)),
            Err(api(500)),
            Ok(vec![]),
            Ok(vec![node("a", false)]),
            Ok(vec![node("a", true)]),
        ]);
        let mut lines = Vec::new();
        let nodes = wait_until_ready(
            &wanted(&["a"]),
            &WaitPolicy::for_up_to(Duration::from_secs(60)),
            &clock,
            || std::future::ready(script.pop_front().unwrap_or_else(|| Ok(vec![]))),
            &mut |s: &str| lines.push(s.to_owned()),
        )
        .await
        .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(nodes.len(), 1);
        // Five sleeps of 2 s on the fixed clock; repeated statuses reported once.
        assert_eq!(clock.now() - start, Duration::from_secs(10));
        assert_eq!(lines.len(), 4, "{lines:#?}");
        assert!(lines[0].starts_with("API server not ready"));
        assert_eq!(lines[2], "waiting for nodes (not registered: a)");
        assert_eq!(lines[3], "waiting for nodes (not Ready: a)");
    }

    #[tokio::test]
    async fn the_loop_gives_up_at_the_deadline_and_fails_fast_on_a_refused_credential() {
        let start = Instant::now();
        let clock = FixedClock::new(start);
        let policy = WaitPolicy::for_up_to(Duration::from_secs(30));
        let mut calls = 0;
        let err = wait_until_ready(
            &wanted(&["a"]),
            &policy,
            &clock,
            || {
                calls += 1;
                std::future::ready(Ok(vec![node("a", false)]))
            },
            &mut |_: &str| {},
        )
        .await
        .expect_err("times out");
        assert!(matches!(err, KubeError::Timeout { .. }), "{err}");
        // Looks at 0, 2, ..., 30 s (16), and never sleeps past the deadline.
        assert_eq!(calls, 16);
        assert!(clock.now() - start <= policy.timeout);

        let clock = FixedClock::new(start);
        let mut calls = 0;
        let err = wait_until_ready(
            &wanted(&["a"]),
            &policy,
            &clock,
            || {
                calls += 1;
                std::future::ready(Err(api(401)))
            },
            &mut |_: &str| {},
        )
        .await
        .expect_err("fails");
        assert_eq!(calls, 1);
        assert_eq!(err.status_code(), Some(401));
        assert_eq!(clock.now(), start);
    }
}
