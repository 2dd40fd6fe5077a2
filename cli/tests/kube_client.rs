//! The Kubernetes API client against real parts: etcd + kube-apiserver 1.20 from the offline
//! bundle on 127.0.0.1, reached only through a real OpenSSH sshd's `direct-tcpip` forwarding,
//! with the PKI's admin certificate.
//!
//! Proves: the readiness wait rides out an API server that is still starting (tunnel refused,
//! then 5xx) and then sees it ready; `/version` is read (1.20.2 -> policy/v1beta1); a Node
//! created and patched Ready through the client is seen by the node wait, which also times out
//! while it is not Ready; many requests share one SSH connection; a bastion in between works;
//! drain's calls (cordon, eviction with a PodDisruptionBudget: 429) and the drain loop (held by
//! the budget until its timeout, which names the pod and why; with force, the pods left deleted
//! at once); an sshd that forbids
//! forwarding, a wrong host key pin, a client certificate from another CA and a server
//! certificate from another CA each fail at once with a message saying what to do.
//!
//! Heavy: selected by `CLUSTERCTL_BUNDLE_TEST=1` (see `support/control_plane.rs`).

mod support;

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use clusterctl::engine::iam;
use clusterctl::kube::drain::{self, Blocker, PodRef, Replicas};
use clusterctl::kube::drainer::{self, DrainError, DrainEvent, DrainOptions};
use clusterctl::kube::{
    Credentials, Disposition, KubeClient, KubeError, PolicyApi, TokioClock, TunnelFailure,
    WaitPolicy,
};
use clusterctl::pki::{NodeIdentity, Pki, PkiSpec};
use clusterctl::ssh::{Endpoint, KnownHosts};
use k8s_openapi::api::core::v1::Node;
use k8s_openapi::api::core::v1::{Pod, ServiceAccount};
use kube::api::{Api, Patch, PatchParams, PostParams};
use support::control_plane::{self, ControlPlane};
use support::{Fixture, SshdOptions, keygen};

fn other_pki(dir: &std::path::Path) -> std::path::PathBuf {
    let pki_dir = dir.join("other-pki");
    let spec = PkiSpec {
        cluster_name: "other".to_string(),
        cluster_domain: "cluster.local".to_string(),
        service_cidr: "10.96.0.0/12".parse().expect("cidr"),
        control_plane: vec![NodeIdentity {
            name: "cp-1".to_string(),
            addresses: vec!["127.0.0.1".parse().expect("ip")],
        }],
        workers: vec![],
        extra_api_server_sans: vec![],
    };
    Pki::ensure(&pki_dir, &spec).expect("other pki");
    pki_dir
}

fn read(path: std::path::PathBuf) -> String {
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_client_through_ssh_against_a_real_apiserver() {
    if !control_plane::selected() {
        return;
    }
    let tmp = tempfile::tempdir().expect("tempdir");
    let t0 = Instant::now();
    let mut cp = ControlPlane::start(tmp.path());
    eprintln!("control plane starting (bundle {})", cp.version);

    let fx = Fixture::new();
    let sshd = fx.sshd();
    let ssh = fx.client(sshd.pinned());
    let api = Endpoint::new("127.0.0.1", cp.api_port);
    let creds = Credentials::from_pki_dir(&cp.pki_dir).expect("credentials");
    let client =
        KubeClient::new(ssh.clone(), fx.target(&sshd), api.clone(), &creds).expect("client");

    // Readiness wait from the moment the API server process started: it must ride out the
    // refused tunnel (nothing listening yet) and the 5xx of a starting server.
    let mut lines = Vec::new();
    let t_api = Instant::now();
    client
        .wait_for_api_ready(
            &WaitPolicy::for_up_to(Duration::from_secs(300)),
            &TokioClock,
            &mut |s: &str| {
                eprintln!("  {s}");
                lines.push(s.to_owned());
            },
        )
        .await
        .unwrap_or_else(|e| {
            cp.procs.check_alive();
            panic!(
                "API server not ready: {}",
                clusterctl::engine::apply::error_chain(&e)
            )
        });
    eprintln!(
        "API server ready through ssh after {:?}; statuses seen: {lines:#?}",
        t_api.elapsed()
    );
    // Whether the first look found nothing listening yet or a server still starting (500)
    // depends on timing; either is a transient state the wait went through.
    assert!(
        lines
            .iter()
            .any(|l| l.starts_with("API server not ready, retrying")),
        "the wait never saw the API server starting: {lines:#?}"
    );
    // Nothing listening at the address (as the API server before it binds): transient.
    let nowhere = KubeClient::new(
        ssh.clone(),
        fx.target(&sshd),
        Endpoint::new("127.0.0.1", control_plane::free_port()),
        &creds,
    )
    .expect("client");
    let err = nowhere.readyz().await.expect_err("nothing listens");
    assert_eq!(
        err.connect_failure(),
        Some(TunnelFailure::Refused),
        "{err:?}"
    );
    assert_eq!(err.disposition(), Disposition::Retry);
    assert!(err.to_string().contains("cannot connect to the API server"));
    nowhere.close().await;

    let version = client.server_version().await.expect("version");
    assert_eq!(version.git_version, format!("v{}", cp.version));
    assert_eq!((version.major, version.minor), (1, 20));
    assert_eq!(version.policy_api(), PolicyApi::V1beta1);

    // A Node made through the client; without a kubelet it stays not Ready until its status
    // says so.
    let nodes: Api<Node> = Api::all(client.client());
    let node: Node = serde_json::from_value(serde_json::json!({
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {"name": "node-a", "labels": {"clusterctl.io/test": "kube-client"}},
    }))
    .expect("node");
    nodes
        .create(&PostParams::default(), &node)
        .await
        .map_err(|e| KubeClient::error("creating node-a", e))
        .expect("create node");
    let wanted: BTreeSet<String> = ["node-a".to_string()].into();
    let short = WaitPolicy {
        timeout: Duration::from_secs(4),
        poll: Duration::from_secs(1),
        backoff: Duration::from_secs(1),
    };
    let mut seen = Vec::new();
    let err = client
        .wait_for_nodes_ready(&wanted, &short, &TokioClock, &mut |s: &str| {
            seen.push(s.to_owned())
        })
        .await
        .expect_err("node-a is not Ready yet");
    assert!(matches!(err, KubeError::Timeout { .. }), "{err}");
    assert!(err.to_string().contains("not Ready: node-a"), "{err}");

    let now = "2026-01-01T00:00:00Z";
    let status = serde_json::json!({
        "status": {"conditions": [{
            "type": "Ready", "status": "True", "reason": "KubeletReady",
            "message": "set by the kube_client test", "lastHeartbeatTime": now,
            "lastTransitionTime": now,
        }], "nodeInfo": {
            "kubeletVersion": "v1.20.2", "machineID": "", "systemUUID": "", "bootID": "",
            "kernelVersion": "", "osImage": "", "containerRuntimeVersion": "",
            "kubeProxyVersion": "", "operatingSystem": "linux", "architecture": "amd64",
        }}
    });
    nodes
        .patch_status("node-a", &PatchParams::default(), &Patch::Merge(&status))
        .await
        .map_err(|e| KubeClient::error("patching node-a's status", e))
        .expect("patch status");
    let t_wait = Instant::now();
    let ready = client
        .wait_for_nodes_ready(
            &wanted,
            &WaitPolicy::for_up_to(Duration::from_secs(30)),
            &TokioClock,
            &mut |_: &str| {},
        )
        .await
        .expect("node-a Ready");
    assert_eq!(ready.len(), 1);
    assert!(ready[0].ready);
    assert_eq!(ready[0].kubelet_version, "v1.20.2");
    eprintln!("node wait saw node-a Ready in {:?}", t_wait.elapsed());

    // Drain's calls on 1.20: cordon, the simulation from listed pods and v1beta1 budgets,
    // eviction through policy/v1beta1 (a free pod goes; a budget with no disruption allowed
    // answers 429, which the error policy calls Wait), uncordon.
    drain_calls(&client, &version.policy_api()).await;

    // Many requests, one SSH connection, a few channels (hyper's pool reuses connections).
    let t_many = Instant::now();
    for _ in 0..50 {
        client.list_nodes().await.expect("list");
    }
    let per_request = t_many.elapsed() / 50;
    eprintln!(
        "50 node listings in {:?} ({per_request:?} each); ssh connections {}, channels {}",
        t_many.elapsed(),
        client.ssh_connections(),
        client.channels_opened()
    );
    assert_eq!(client.ssh_connections(), 1);
    assert!(
        (1..=8).contains(&client.channels_opened()),
        "{}",
        client.channels_opened()
    );

    // Through a bastion: the SSH connection to the control plane is itself tunnelled through
    // a jump host (both host keys pinned); the API requests then ride on it as before.
    let bastion = fx.sshd();
    let mut both = sshd.pinned();
    both.pin_line(bastion.endpoint(), &bastion.host_public_line())
        .expect("pin bastion");
    let via_bastion = KubeClient::new(
        fx.client(both),
        fx.target(&sshd).via(fx.target(&bastion)),
        api.clone(),
        &creds,
    )
    .expect("client");
    let seen = via_bastion
        .list_nodes()
        .await
        .expect("list through the bastion");
    // The gate between control planes: the API server's own check of its etcd.
    via_bastion.etcd_ready().await.expect("/readyz/etcd");
    assert!(seen.iter().any(|n| n.name == "node-a" && n.ready));
    assert_eq!(
        via_bastion.server_version().await.expect("version").minor,
        20
    );
    eprintln!(
        "through a bastion: ssh connections {}, channels {}",
        via_bastion.ssh_connections(),
        via_bastion.channels_opened()
    );
    via_bastion.close().await;

    // The only way in is sshd's forwarding: with forwarding off, the same client setup fails
    // at once, for good, and says what to change.
    let closed = fx.sshd_with(SshdOptions {
        extra: vec!["AllowTcpForwarding=no".into()],
        ..Default::default()
    });
    let no_fwd = KubeClient::new(
        fx.client(closed.pinned()),
        fx.target(&closed),
        api.clone(),
        &creds,
    )
    .expect("client");
    let t = Instant::now();
    let err = no_fwd.readyz().await.expect_err("forwarding is off");
    eprintln!(
        "forwarding off: {:?}: {}",
        t.elapsed(),
        clusterctl::engine::apply::error_chain(&err)
    );
    assert_eq!(
        err.connect_failure(),
        Some(TunnelFailure::Prohibited),
        "{err:?}"
    );
    assert_eq!(err.disposition(), Disposition::Fail);
    assert!(
        clusterctl::engine::apply::error_chain(&err).contains("AllowTcpForwarding"),
        "{err}"
    );

    // A wrong host key pin: refused before any request.
    let stranger = keygen(fx.path(), "stranger_host_key", "ed25519", &[]);
    let mut wrong_pin = KnownHosts::new();
    wrong_pin
        .pin_line(sshd.endpoint(), &read(stranger.with_extension("pub")))
        .expect("pin");
    let pinned_wrong = KubeClient::new(fx.client(wrong_pin), fx.target(&sshd), api.clone(), &creds)
        .expect("client");
    let err = pinned_wrong.readyz().await.expect_err("wrong pin");
    let text = clusterctl::engine::apply::error_chain(&err);
    eprintln!("wrong pin: {text}");
    assert_eq!(
        err.connect_failure(),
        Some(TunnelFailure::SshFatal),
        "{text}"
    );
    assert!(text.to_lowercase().contains("host key"), "{text}");
    assert_eq!(pinned_wrong.channels_opened(), 0);

    // A client certificate from another cluster's CA: the API server refuses it (401), the
    // wait fails at once and says what to do.
    let other = other_pki(tmp.path());
    let foreign_cert = Credentials::from_pem(
        &read(cp.pki_dir.join("ca.crt")),
        &read(other.join("admin.crt")),
        &read(other.join("admin.key")),
        other.clone(),
    );
    let wrong_client =
        KubeClient::new(ssh.clone(), fx.target(&sshd), api.clone(), &foreign_cert).expect("client");
    let t = Instant::now();
    let err = wrong_client
        .wait_for_nodes_ready(
            &wanted,
            &WaitPolicy::for_up_to(Duration::from_secs(120)),
            &TokioClock,
            &mut |_: &str| {},
        )
        .await
        .expect_err("foreign client certificate");
    let took = t.elapsed();
    let text = clusterctl::engine::apply::error_chain(&err);
    eprintln!("foreign client certificate: failed in {took:?}: {text}");
    assert_eq!(err.disposition(), Disposition::Fail, "{text}");
    assert!(took < Duration::from_secs(10), "{took:?}");
    assert!(
        err.status_code() == Some(401)
            || err.connect_failure() == Some(TunnelFailure::HandshakeRejected),
        "{text}"
    );
    assert!(text.contains("admin client certificate"), "{text}");

    // The state's CA does not vouch for the server: TLS mismatch, fail fast.
    let foreign_ca = Credentials::from_pem(
        &read(other.join("ca.crt")),
        &read(cp.pki_dir.join("admin.crt")),
        &read(cp.pki_dir.join("admin.key")),
        other.clone(),
    );
    let wrong_ca =
        KubeClient::new(ssh.clone(), fx.target(&sshd), api.clone(), &foreign_ca).expect("client");
    let err = wrong_ca.readyz().await.expect_err("foreign CA");
    let text = clusterctl::engine::apply::error_chain(&err);
    eprintln!("foreign CA: {text}");
    assert_eq!(
        err.connect_failure(),
        Some(TunnelFailure::ServerCertificate),
        "{text}"
    );
    assert_eq!(err.disposition(), Disposition::Fail);

    access_calls(&client, &cp, tmp.path()).await;
    cluster_dns_calls(&client).await;
    let session = ssh.connect(&fx.target(&sshd)).await.expect("ssh session");
    etcd_snapshot_calls(&client, &cp, &session, tmp.path()).await;
    session.close().await;

    client.close().await;
    cp.procs.check_alive();
    eprintln!("total {:?}", t0.elapsed());
}

/// An etcd snapshot as upgrades and `clusterctl snapshot` take it, through the SSH session:
/// etcdctl uploaded, `snapshot save` with the API server's etcd client certificate, the file
/// downloaded (0600, checksum as recorded) and nothing left on the "node". Then the proof that
/// it is a rollback point: restored with etcdctl into a new data directory and served by a
/// second etcd on loopback, it holds a ConfigMap written before it and not one written after.
/// A snapshot etcd refuses leaves no file behind and says why.
async fn etcd_snapshot_calls(
    client: &KubeClient,
    cp: &ControlPlane,
    session: &clusterctl::ssh::Session,
    dir: &std::path::Path,
) {
    use clusterctl::etcd::{self, EtcdAccess};
    use k8s_openapi::api::core::v1::ConfigMap;
    use std::os::unix::fs::PermissionsExt;
    let t = Instant::now();
    let maps: Api<ConfigMap> = Api::namespaced(client.client(), "default");
    let token = format!("token-{:x}", rand::random::<u64>());
    let map = |name: &str, value: &str| -> ConfigMap {
        serde_json::from_value(serde_json::json!({
            "metadata": {"name": name}, "data": {"proof": value}
        }))
        .expect("configmap")
    };
    maps.create(&PostParams::default(), &map("before-snapshot", &token))
        .await
        .expect("configmap before");
    let remote = dir.join("node");
    let access = EtcdAccess {
        endpoint: cp.etcd_url.clone(),
        cacert: cp.p("etcd/ca.crt"),
        cert: cp.p("apiserver-etcd-client.crt"),
        key: cp.p("apiserver-etcd-client.key"),
        etcdctl: remote.join("bin/etcdctl").display().to_string(),
        work_dir: remote.join("snapshots").display().to_string(),
        as_root: String::new(),
    };
    let local = dir.join("state-snapshots");
    std::fs::create_dir_all(&local).expect("local dir");
    let dest = local.join("etcd-1.db");
    let snap = etcd::snapshot(session, &access, &cp.bin("etcdctl"), "cp-1", "test", &dest)
        .await
        .unwrap_or_else(|e| panic!("snapshot: {e:#}"));
    eprintln!("etcd snapshot in {:?}: {snap:?}", t.elapsed());
    let bytes = std::fs::read(&dest).expect("snapshot file");
    assert_eq!(bytes.len() as u64, snap.bytes);
    assert_eq!(
        hex::encode(<sha2::Sha256 as sha2::Digest>::digest(&bytes)),
        snap.sha256
    );
    let mode = std::fs::metadata(&dest).expect("meta").permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "a snapshot holds every Secret: 0600");
    assert!(snap.revision > 0 && snap.keys > 0, "{snap:?}");
    assert_eq!(snap.file, "etcd-1.db");
    assert!(!local.join("etcd-1.db.part").exists());
    let left: Vec<_> = std::fs::read_dir(remote.join("snapshots"))
        .expect("work dir")
        .map(|e| e.expect("entry").file_name())
        .collect();
    assert!(left.is_empty(), "left on the node: {left:?}");
    maps.create(&PostParams::default(), &map("after-snapshot", "later"))
        .await
        .expect("configmap after");

    // Restore into a new data directory and serve it: the rollback point holds what was there.
    let restored = dir.join("restored");
    let (client_port, peer_port) = (control_plane::free_port(), control_plane::free_port());
    let peer = format!("http://127.0.0.1:{peer_port}");
    let out = std::process::Command::new(cp.bin("etcdctl"))
        .env("ETCDCTL_API", "3")
        .args(["snapshot", "restore"])
        .arg(&dest)
        .arg(format!("--data-dir={}", restored.display()))
        .args([
            "--name=restored",
            &format!("--initial-cluster=restored={peer}"),
        ])
        .arg(format!("--initial-advertise-peer-urls={peer}"))
        .output()
        .expect("etcdctl restore");
    assert!(
        out.status.success(),
        "restore: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let url = format!("http://127.0.0.1:{client_port}");
    let mut procs = control_plane::Procs::default();
    procs.spawn(
        "restored etcd",
        std::process::Command::new(cp.bin("etcd")).args([
            "--name=restored",
            &format!("--data-dir={}", restored.display()),
            &format!("--listen-client-urls={url}"),
            &format!("--advertise-client-urls={url}"),
            &format!("--listen-peer-urls={peer}"),
            &format!("--initial-advertise-peer-urls={peer}"),
            &format!("--initial-cluster=restored={peer}"),
        ]),
        dir.join("restored-etcd.log"),
    );
    let get = |key: &str| {
        std::process::Command::new(cp.bin("etcdctl"))
            .env("ETCDCTL_API", "3")
            .args([
                &format!("--endpoints={url}"),
                "--command-timeout=5s",
                "get",
                key,
                "--print-value-only",
            ])
            .output()
            .expect("etcdctl get")
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    let before = loop {
        let out = get("/registry/configmaps/default/before-snapshot");
        if out.status.success() {
            break out.stdout;
        }
        procs.check_alive();
        assert!(
            Instant::now() < deadline,
            "restored etcd never answered: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    assert!(
        String::from_utf8_lossy(&before).contains(&token),
        "the restored snapshot lacks the ConfigMap written before it"
    );
    let after = get("/registry/configmaps/default/after-snapshot");
    assert!(
        after.status.success() && after.stdout.is_empty(),
        "a ConfigMap written after the snapshot is in it"
    );
    drop(procs);

    // etcd refuses the client (a key that does not match the certificate): no file, and why.
    let wrong = EtcdAccess {
        key: cp.p("apiserver.key"),
        ..access
    };
    let dest = local.join("etcd-2.db");
    let err = etcd::snapshot(session, &wrong, &cp.bin("etcdctl"), "cp-1", "test", &dest)
        .await
        .expect_err("a key that does not match its certificate");
    let text = format!("{err:#}");
    eprintln!("refused snapshot: {text}");
    assert!(text.contains("etcdctl snapshot save failed"), "{text}");
    assert!(!dest.exists() && !local.join("etcd-2.db.part").exists());
    eprintln!("etcd snapshot calls done in {:?}", t.elapsed());
}

/// Cluster DNS as `create` renders it, checked by the real API server: a server-side dry run
/// stores nothing, an apply makes the kube-dns Service at the kubelets' clusterDNS and the
/// CoreDNS Deployment, and a second apply changes nothing.
async fn cluster_dns_calls(client: &KubeClient) {
    use k8s_openapi::api::apps::v1::Deployment;
    use k8s_openapi::api::core::v1::Service;
    let yaml = templates::kubernetes::render_cluster_dns(&templates::kubernetes::ClusterDnsInput {
        version: "1.20.2".into(),
        cluster_dns: clusterctl::engine::bootstrap::cluster_dns_ip("10.96.0.0/12".parse().unwrap())
            .expect("dns ip"),
        cluster_domain: "cluster.local".into(),
        image: None,
        replicas: 2,
    })
    .expect("render");
    let services: Api<Service> = Api::namespaced(client.client(), "kube-system");
    let deployments: Api<Deployment> = Api::namespaced(client.client(), "kube-system");
    let dry = client
        .apply_manifests(&yaml, true)
        .await
        .expect("server-side dry run");
    assert_eq!(dry.len(), 6, "{dry:?}");
    assert!(
        services.get_opt("kube-dns").await.expect("get").is_none(),
        "a dry run stored the Service"
    );
    let applied = client.apply_manifests(&yaml, false).await.expect("apply");
    eprintln!("cluster DNS applied: {applied:?}");
    let svc = services.get("kube-dns").await.expect("kube-dns Service");
    assert_eq!(
        svc.spec.as_ref().and_then(|s| s.cluster_ip.as_deref()),
        Some("10.96.0.10")
    );
    let dep = deployments
        .get("coredns")
        .await
        .expect("coredns Deployment");
    let image = dep
        .spec
        .as_ref()
        .and_then(|s| s.template.spec.as_ref())
        .map(|p| p.containers[0].image.clone());
    assert_eq!(
        image.flatten().as_deref(),
        Some("registry.k8s.io/coredns:1.7.0")
    );
    let before = dep.metadata.resource_version.clone();
    client
        .apply_manifests(&yaml, false)
        .await
        .expect("apply again");
    let again = deployments
        .get("coredns")
        .await
        .expect("coredns Deployment");
    assert_eq!(
        again.metadata.resource_version, before,
        "a second apply changed the Deployment"
    );
}

/// Brings the cluster's access objects to what `access` wants; returns the changes made.
async fn sync_access(client: &KubeClient, access: &clusterctl::spec::Access) -> Vec<String> {
    let observed = client.observe_access().await.expect("observe access");
    let changes = iam::changes(&iam::desired(access), &observed);
    for c in &changes {
        client
            .apply_access_change(c)
            .await
            .unwrap_or_else(|e| panic!("{c}: {}", clusterctl::engine::apply::error_chain(&e)));
    }
    changes.iter().map(ToString::to_string).collect()
}

/// Runs the bundle's kubectl with a person's kubeconfig; (success, stdout + stderr).
fn kubectl_as(cp: &ControlPlane, kubeconfig: &std::path::Path, args: &[&str]) -> (bool, String) {
    let out = std::process::Command::new(cp.bin("kubectl"))
        .arg("--kubeconfig")
        .arg(kubeconfig)
        .args(["--request-timeout", "20s"])
        .args(args)
        .output()
        .expect("run kubectl");
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

/// IAM-scoped access against the real API server: bindings reconciled (created, updated,
/// replaced, deleted; a same-named binding that is not clusterctl's refused), a person's bound
/// token acting as them through impersonation, scoped to a namespace, and revoked at once by
/// deleting their account. (The aggregated `view`/`edit` roles need the controller manager,
/// which this control plane does not run: the cluster e2e checks those.)
async fn access_calls(client: &KubeClient, cp: &ControlPlane, dir: &std::path::Path) {
    use clusterctl::spec::Role;
    let mut access = clusterctl::spec::Access::default();
    iam::grant(
        &mut access,
        "user:alice@example.com",
        Role::ClusterAdmin,
        &["team-a".into()],
    )
    .expect("grant");
    let made = sync_access(client, &access).await;
    eprintln!("access changes: {made:#?}");
    assert_eq!(
        made.len(),
        4,
        "namespaces, the user, the binding: {made:#?}"
    );
    assert_eq!(
        sync_access(client, &access).await,
        Vec::<String>::new(),
        "in step"
    );

    let alice = iam::UserAccount::of("alice@example.com");
    let t = Instant::now();
    let (token, expires) = client
        .user_token(&alice.account, Duration::from_secs(600))
        .await
        .expect("token");
    eprintln!("token issued in {:?}, expires {expires}", t.elapsed());
    let raw_token = token.clone();
    // A kubeconfig with the server and CA only: the token is given on the command line.
    let bare = dir.join("bare.kubeconfig");
    std::fs::write(
        &bare,
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: c\n  cluster:\n    server: https://127.0.0.1:{}\n    certificate-authority: {}\ncontexts:\n- name: c\n  context:\n    cluster: c\n    user: u\ncurrent-context: c\nusers:\n- name: u\n  user: {{}}\n",
            cp.api_port,
            cp.pki_dir.join("ca.crt").display()
        ),
    )
    .expect("bare kubeconfig");
    let (ok, out) = kubectl_as(
        cp,
        &bare,
        &["--token", raw_token.as_str(), "get", "--raw", "/apis"],
    );
    assert!(ok, "the bare token authenticates: {out}");
    let server = format!("https://127.0.0.1:{}", cp.api_port);
    let kubeconfig = dir.join("alice.kubeconfig");
    let (context, cluster, user) =
        clusterctl::kubeconfig::names_for_user("local", "alice@example.com");
    let entry = clusterctl::kubeconfig::Entry {
        context,
        cluster,
        user,
        server,
        ca_pem: read(cp.pki_dir.join("ca.crt")),
        credential: clusterctl::kubeconfig::Credential::Token {
            token,
            impersonate: "alice@example.com".into(),
        },
    };
    clusterctl::kubeconfig::merge(&kubeconfig, &entry, true).expect("write kubeconfig");

    // RBAC changes reach the API server's authorizer through its informers: allow a moment.
    let t = Instant::now();
    loop {
        let (ok, out) = kubectl_as(cp, &kubeconfig, &["-n", "team-a", "get", "pods"]);
        if ok {
            eprintln!(
                "alice allowed {:?} after her grant was applied",
                t.elapsed()
            );
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(15),
            "alice reads team-a: {out}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let (ok, out) = kubectl_as(
        cp,
        &kubeconfig,
        &[
            "-n",
            "team-a",
            "create",
            "configmap",
            "by-alice",
            "--from-literal=a=b",
        ],
    );
    assert!(ok, "alice writes in team-a: {out}");
    let (ok, out) = kubectl_as(cp, &kubeconfig, &["-n", "team-b", "get", "pods"]);
    assert!(!ok && out.contains("Forbidden"), "team-b: {out}");
    assert!(
        out.contains("\"alice@example.com\""),
        "denied as alice herself: {out}"
    );
    let (ok, out) = kubectl_as(cp, &kubeconfig, &["get", "nodes"]);
    assert!(!ok && out.contains("Forbidden"), "nodes: {out}");
    // The account can act as alice and nobody else.
    let (ok, out) = kubectl_as(
        cp,
        &kubeconfig,
        &["--as", "bob", "-n", "team-a", "get", "pods"],
    );
    assert!(
        !ok && out.contains("Forbidden"),
        "impersonating someone else: {out}"
    );

    // More members: an update; another role of the same scope: another binding.
    iam::grant(
        &mut access,
        "group:ops",
        Role::ClusterAdmin,
        &["team-a".into()],
    )
    .expect("grant");
    let made = sync_access(client, &access).await;
    assert!(
        matches!(&made[..], [c] if c.starts_with("update RoleBinding clusterctl:cluster-admin in team-a")),
        "{made:#?}"
    );

    // A binding of clusterctl's name that clusterctl did not make is left alone.
    let foreign: Api<k8s_openapi::api::rbac::v1::ClusterRoleBinding> = Api::all(client.client());
    let obj: k8s_openapi::api::rbac::v1::ClusterRoleBinding = serde_json::from_value(serde_json::json!({
        "metadata": {"name": "clusterctl:viewer"},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "view"},
        "subjects": [{"kind": "User", "apiGroup": "rbac.authorization.k8s.io", "name": "someone"}]
    }))
    .expect("binding");
    foreign
        .create(&PostParams::default(), &obj)
        .await
        .expect("foreign binding");
    let mut with_viewer = access.clone();
    iam::grant(&mut with_viewer, "user:carol", Role::Viewer, &[]).expect("grant");
    let observed = client.observe_access().await.expect("observe");
    let mut refused = None;
    for c in iam::changes(&iam::desired(&with_viewer), &observed) {
        if let Err(e) = client.apply_access_change(&c).await {
            refused = Some(clusterctl::engine::apply::error_chain(&e));
        }
    }
    let refused = refused.expect("the foreign binding is refused");
    assert!(refused.contains("without clusterctl's label"), "{refused}");
    let kept = foreign.get("clusterctl:viewer").await.expect("still there");
    assert_eq!(kept.subjects.unwrap_or_default()[0].name, "someone");
    foreign
        .delete("clusterctl:viewer", &Default::default())
        .await
        .expect("clean up");
    // carol's account was made before the refusal; the spec without her removes it again.

    // Revoked: alice's account goes, and her unexpired token with it.
    iam::revoke(&mut access, "user:alice@example.com", None, &[]).expect("revoke");
    let t = Instant::now();
    let made = sync_access(client, &access).await;
    eprintln!("revoke changes: {made:#?}");
    assert!(
        made.iter()
            .any(|c| c.starts_with("delete the account of user alice@example.com")),
        "{made:#?}"
    );
    let denied_after = loop {
        let (ok, out) = kubectl_as(cp, &kubeconfig, &["-n", "team-a", "get", "pods"]);
        if !ok {
            assert!(
                out.contains("Unauthorized") || out.contains("Forbidden"),
                "{out}"
            );
            break t.elapsed();
        }
        assert!(
            t.elapsed() < Duration::from_secs(60),
            "still allowed after 60 s: {out}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    // Not only denied: the token itself is dead (a later grant of the same name would not
    // bring it back), even for what every authenticated user may read.
    let dead_after = loop {
        let (ok, out) = kubectl_as(
            cp,
            &bare,
            &["--token", raw_token.as_str(), "get", "--raw", "/apis"],
        );
        if !ok {
            assert!(out.contains("Unauthorized"), "{out}");
            break t.elapsed();
        }
        assert!(
            t.elapsed() < Duration::from_secs(60),
            "token still accepted after 60 s: {out}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    eprintln!("revoke -> denied: {denied_after:?}, token rejected: {dead_after:?}");
    let err = client
        .user_token(&alice.account, Duration::from_secs(600))
        .await
        .expect_err("no account, no token");
    assert_eq!(err.status_code(), Some(404), "{err}");

    // Everything of clusterctl's goes with an empty spec; namespaces stay.
    let made = sync_access(client, &clusterctl::spec::Access::default()).await;
    eprintln!("emptied: {made:#?}");
    let observed = client.observe_access().await.expect("observe");
    assert!(
        observed.bindings.is_empty()
            && observed.accounts.is_empty()
            && observed.impersonators.is_empty(),
        "{observed:#?}"
    );
    assert!(observed.namespaces.contains("team-a"));
}

async fn drain_calls(client: &KubeClient, policy: &PolicyApi) {
    let policy = *policy;
    let t = Instant::now();
    client
        .set_unschedulable("node-a", true)
        .await
        .expect("cordon");
    let listed = client.list_nodes().await.expect("list");
    assert!(listed.iter().any(|n| n.name == "node-a" && n.unschedulable));

    // Two bare pods bound to node-a (no kubelet runs them: their status is set by hand to
    // Running and Ready, since the API server lets Pending pods, and unready ones while the
    // budget is met, go regardless of budgets).
    // Without a controller-manager nobody makes the namespace's default ServiceAccount (which
    // pod admission wants) or its token (not mounted, then).
    let accounts: Api<ServiceAccount> = Api::namespaced(client.client(), "default");
    let account: ServiceAccount = serde_json::from_value(serde_json::json!({
        "apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": "default"}}))
    .expect("service account");
    accounts
        .create(&PostParams::default(), &account)
        .await
        .map_err(|e| KubeClient::error("creating the default service account", e))
        .expect("service account");
    let pods: Api<Pod> = Api::namespaced(client.client(), "default");
    for (name, app) in [("free", "free"), ("guarded", "guarded")] {
        let pod: Pod = serde_json::from_value(serde_json::json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": "default", "labels": {"app": app}},
            "spec": {"nodeName": "node-a", "automountServiceAccountToken": false,
                     "containers": [{"name": "c", "image": "busybox"}]},
        }))
        .expect("pod");
        pods.create(&PostParams::default(), &pod)
            .await
            .map_err(|e| KubeClient::error("creating a pod", e))
            .expect("create pod");
        pods.patch_status(
            name,
            &PatchParams::default(),
            &Patch::Merge(&serde_json::json!({"status": {"phase": "Running",
                "conditions": [{"type": "Ready", "status": "True"}]}})),
        )
        .await
        .map_err(|e| KubeClient::error("setting a pod Running", e))
        .expect("pod status");
    }

    // A policy/v1beta1 budget allowing no disruption for app=guarded. No controller-manager
    // runs here, so its status is written the way the disruption controller would.
    let pdb = serde_json::json!({
        "apiVersion": "policy/v1beta1", "kind": "PodDisruptionBudget",
        "metadata": {"name": "guarded", "namespace": "default"},
        "spec": {"maxUnavailable": 0, "selector": {"matchLabels": {"app": "guarded"}}},
    });
    let raw = client.client();
    let created: serde_json::Value = raw
        .request(
            http::Request::post("/apis/policy/v1beta1/namespaces/default/poddisruptionbudgets")
                .header("content-type", "application/json")
                .body(serde_json::to_vec(&pdb).expect("json"))
                .expect("request"),
        )
        .await
        .expect("create pdb");
    let generation = created["metadata"]["generation"].as_i64().unwrap_or(1);
    let status = serde_json::json!({"status": {
        "observedGeneration": generation, "disruptionsAllowed": 0, "currentHealthy": 1,
        "desiredHealthy": 1, "expectedPods": 1}});
    let _: serde_json::Value = raw
        .request(
            http::Request::patch(
                "/apis/policy/v1beta1/namespaces/default/poddisruptionbudgets/guarded/status",
            )
            .header("content-type", "application/merge-patch+json")
            .body(serde_json::to_vec(&status).expect("json"))
            .expect("request"),
        )
        .await
        .expect("pdb status");

    let on_node = client.pods_on("node-a").await.expect("pods on node-a");
    let budgets = client.disruption_budgets(policy).await.expect("pdbs");
    let sim = drain::simulate("node-a", &on_node, &budgets, &Replicas::new(), policy);
    eprintln!("drain simulation for node-a: {sim:?}");

    let blockers = |name: &str| {
        sim.evict
            .iter()
            .find(|(p, _)| p.name == name)
            .map(|(_, b)| b.clone())
            .unwrap_or_else(|| panic!("{name} in the simulation"))
    };
    assert!(blockers("guarded").contains(&Blocker::Budget {
        pdb: "default/guarded".into()
    }));
    assert!(
        !blockers("free")
            .iter()
            .any(|b| matches!(b, Blocker::Budget { .. }))
    );
    assert!(!sim.clear());

    let free = PodRef {
        namespace: "default".into(),
        name: "free".into(),
    };
    let guarded = PodRef {
        namespace: "default".into(),
        name: "guarded".into(),
    };
    client
        .evict(&free, policy)
        .await
        .expect("evict the free pod");
    let err = client
        .evict(&guarded, policy)
        .await
        .expect_err("the budget forbids it");
    eprintln!("evicting the guarded pod: {err}");
    assert_eq!(err.status_code(), Some(429), "{err}");
    assert_eq!(err.disposition(), Disposition::Wait);
    let left: Vec<String> = client
        .pods_on("node-a")
        .await
        .expect("pods")
        .iter()
        .filter(|p| p.metadata.deletion_timestamp.is_none())
        .filter_map(|p| p.metadata.name.clone())
        .collect();
    assert_eq!(
        left,
        ["guarded"],
        "the free pod is evicted, the guarded one stays"
    );

    // The drain loop against the real server. First: the pods have no controller, so a drain
    // without force refuses before it evicts anything, naming them.
    let opts = DrainOptions {
        timeout: Duration::from_secs(4),
        force: false,
        poll: Duration::from_millis(500),
    };
    let err = drainer::drain_node(client, "node-a", policy, &opts, &TokioClock, &mut |_| {})
        .await
        .expect_err("bare pods refused");
    match &err {
        DrainError::Refused { pods, .. } => {
            let names: Vec<&str> = pods.iter().map(|(p, _)| p.name.as_str()).collect();
            assert_eq!(names, ["free", "guarded"], "{err}");
        }
        other => panic!("want a refusal, got {other}"),
    }
    assert!(err.to_string().contains("--force"), "{err}");
    // Given a controller (a ReplicaSet, as a Deployment's pods have): `free` is terminating
    // (no kubelet confirms its end), `guarded` is held by its budget until the timeout, which
    // names it and why.
    for name in ["free", "guarded"] {
        pods.patch(
            name,
            &PatchParams::default(),
            &Patch::Merge(&serde_json::json!({"metadata": {"ownerReferences": [{
                "apiVersion": "apps/v1", "kind": "ReplicaSet", "name": format!("{name}-rs"),
                "uid": "00000000-0000-0000-0000-000000000001", "controller": true}]}})),
        )
        .await
        .map_err(|e| KubeClient::error("giving a pod a controller", e))
        .expect("owner");
    }
    let mut events = Vec::new();
    let err = drainer::drain_node(client, "node-a", policy, &opts, &TokioClock, &mut |e| {
        events.push(e)
    })
    .await
    .expect_err("held by the budget");
    eprintln!("drain with a 4 s timeout: {err}");
    match &err {
        DrainError::TimedOut { pods, .. } => {
            let names: Vec<&str> = pods.iter().map(|(p, _)| p.name.as_str()).collect();
            assert_eq!(names, ["free", "guarded"], "{err}");
            assert!(pods[0].1.contains("terminating"), "{err}");
            assert!(
                pods[1].1.contains("PodDisruptionBudget default/guarded"),
                "{err}"
            );
        }
        other => panic!("want a timeout, got {other}"),
    }
    assert!(
        events
            .iter()
            .any(|e| matches!(e, DrainEvent::Held { pod, .. } if pod.name == "guarded")),
        "{events:?}"
    );
    // Forced, after the timeout: every pod left is deleted at once, the node is empty.
    let forced = DrainOptions {
        timeout: Duration::ZERO,
        force: true,
        ..opts
    };
    let report = drainer::drain_node(client, "node-a", policy, &forced, &TokioClock, &mut |_| {})
        .await
        .expect("forced drain");
    let mut deleted: Vec<&str> = report.deleted.iter().map(|p| p.name.as_str()).collect();
    deleted.sort_unstable();
    assert_eq!(deleted, ["free", "guarded"], "{report}");
    assert!(client.pods_on("node-a").await.expect("pods").is_empty());

    client
        .set_unschedulable("node-a", false)
        .await
        .expect("uncordon");
    let listed = client.list_nodes().await.expect("list");
    assert!(
        listed
            .iter()
            .any(|n| n.name == "node-a" && !n.unschedulable)
    );
    eprintln!("cordon, simulate, evict x2, uncordon in {:?}", t.elapsed());
}
