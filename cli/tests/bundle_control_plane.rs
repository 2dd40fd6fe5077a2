//! Real proof of the bundle and the PKI: etcd and kube-apiserver from the offline test bundle run
//! on the host, bound to 127.0.0.1 only, with certificates from `clusterctl::pki`; `/readyz` and
//! `kubectl get ns` go through the rendered admin kubeconfig. The bundle's image archives are
//! imported into a private containerd and the busybox image is run.
//!
//! Heavy (needs the bundle, ~450 MB, and root for containerd): selected by
//! `CLUSTERCTL_BUNDLE_TEST=1`. The bundle is `$CLUSTERCTL_BUNDLE` if set, else whatever
//! `tests/bed/build-k8s-bundle.sh` prints (a no-op when the bundle is cached, a 6-18 min build
//! otherwise). Every process started here is killed by PID when the test ends, also on failure.

mod support;

use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use clusterctl::bundle::Bundle;
use clusterctl::pki::{NodeIdentity, Pki, PkiSpec};
use support::control_plane::{Procs, bundle_path, free_port, selected};

fn run(cmd: &mut Command) -> Output {
    cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"))
}

/// Retries `f` every 500 ms until it returns true or `timeout` passes.
fn wait_for(
    what: &str,
    timeout: Duration,
    procs: &mut Procs,
    mut f: impl FnMut() -> bool,
) -> Duration {
    let start = Instant::now();
    loop {
        if f() {
            return start.elapsed();
        }
        procs.check_alive();
        assert!(
            start.elapsed() < timeout,
            "{what} not ready after {timeout:?}"
        );
        std::thread::sleep(Duration::from_millis(500));
    }
}

#[test]
fn etcd_and_apiserver_from_the_bundle_serve_with_our_pki() {
    if !selected() {
        return;
    }
    let t0 = Instant::now();
    let bundle = Bundle::open(&bundle_path()).expect("bundle opens");
    bundle.check_supported().expect("bundle version supported");
    let verified = bundle.verify().expect("bundle verifies");
    eprintln!(
        "bundle {} verified in {:?}",
        bundle.root().display(),
        t0.elapsed()
    );
    let version = verified.manifest().kubernetes_version;
    let bin = |name: &str| {
        verified
            .binary(name)
            .unwrap_or_else(|| panic!("{name} in bundle"))
    };

    let tmp = tempfile::tempdir().expect("tempdir");
    let pki_dir = tmp.path().join("bundle-proof");
    let spec = PkiSpec {
        cluster_name: "bundle-proof".to_string(),
        cluster_domain: "cluster.local".to_string(),
        service_cidr: "10.96.0.0/12".parse().expect("cidr"),
        control_plane: vec![NodeIdentity {
            name: "cp-1".to_string(),
            addresses: vec!["127.0.0.1".parse().expect("ip")],
        }],
        workers: vec![],
        extra_api_server_sans: vec![],
    };
    let (pki, _) = Pki::ensure(&pki_dir, &spec).expect("pki");
    let p = |f: &str| pki_dir.join(f).to_str().expect("utf-8").to_string();

    let (etcd_port, peer_port, api_port) = (free_port(), free_port(), free_port());
    let etcd_url = format!("https://127.0.0.1:{etcd_port}");
    let peer_url = format!("https://127.0.0.1:{peer_port}");
    let mut procs = Procs::default();

    let t_etcd = Instant::now();
    procs.spawn(
        "etcd",
        Command::new(bin("etcd")).args([
            "--name=cp-1",
            &format!("--data-dir={}", tmp.path().join("etcd-data").display()),
            &format!("--listen-client-urls={etcd_url}"),
            &format!("--advertise-client-urls={etcd_url}"),
            &format!("--listen-peer-urls={peer_url}"),
            &format!("--initial-advertise-peer-urls={peer_url}"),
            &format!("--initial-cluster=cp-1={peer_url}"),
            "--initial-cluster-state=new",
            "--client-cert-auth=true",
            &format!("--trusted-ca-file={}", p("etcd/ca.crt")),
            &format!("--cert-file={}", p("etcd/server-cp-1.crt")),
            &format!("--key-file={}", p("etcd/server-cp-1.key")),
            "--peer-client-cert-auth=true",
            &format!("--peer-trusted-ca-file={}", p("etcd/ca.crt")),
            &format!("--peer-cert-file={}", p("etcd/peer-cp-1.crt")),
            &format!("--peer-key-file={}", p("etcd/peer-cp-1.key")),
        ]),
        tmp.path().join("etcd.log"),
    );
    let etcdctl = |args: &[&str]| {
        run(Command::new(bin("etcdctl"))
            .env("ETCDCTL_API", "3")
            .arg(format!("--endpoints={etcd_url}"))
            .arg(format!("--cacert={}", p("etcd/ca.crt")))
            .arg(format!("--cert={}", p("etcd/healthcheck-client.crt")))
            .arg(format!("--key={}", p("etcd/healthcheck-client.key")))
            .args(args))
    };
    let took = wait_for("etcd", Duration::from_secs(60), &mut procs, || {
        etcdctl(&["endpoint", "health"]).status.success()
    });
    eprintln!("etcd healthy after {took:?}");
    // Without a client certificate from the etcd CA, etcd refuses the connection.
    let anonymous = run(Command::new(bin("etcdctl")).env("ETCDCTL_API", "3").args([
        &format!("--endpoints={etcd_url}"),
        &format!("--cacert={}", p("etcd/ca.crt")),
        "--command-timeout=3s",
        "endpoint",
        "health",
    ]));
    assert!(
        !anonymous.status.success(),
        "etcd must require client certificates"
    );
    let _ = t_etcd;

    let t_api = Instant::now();
    procs.spawn(
        "kube-apiserver",
        Command::new(bin("kube-apiserver")).args([
            "--advertise-address=127.0.0.1",
            "--bind-address=127.0.0.1",
            &format!("--secure-port={api_port}"),
            "--insecure-port=0",
            &format!("--etcd-servers={etcd_url}"),
            &format!("--etcd-cafile={}", p("etcd/ca.crt")),
            &format!("--etcd-certfile={}", p("apiserver-etcd-client.crt")),
            &format!("--etcd-keyfile={}", p("apiserver-etcd-client.key")),
            &format!("--client-ca-file={}", p("ca.crt")),
            &format!("--tls-cert-file={}", p("apiserver.crt")),
            &format!("--tls-private-key-file={}", p("apiserver.key")),
            &format!(
                "--kubelet-client-certificate={}",
                p("apiserver-kubelet-client.crt")
            ),
            &format!("--kubelet-client-key={}", p("apiserver-kubelet-client.key")),
            &format!("--service-account-key-file={}", p("sa.pub")),
            &format!("--service-account-signing-key-file={}", p("sa.key")),
            "--service-account-issuer=https://kubernetes.default.svc.cluster.local",
            "--service-cluster-ip-range=10.96.0.0/12",
            "--authorization-mode=Node,RBAC",
            "--enable-admission-plugins=NodeRestriction",
            &format!("--requestheader-client-ca-file={}", p("front-proxy-ca.crt")),
            &format!("--proxy-client-cert-file={}", p("front-proxy-client.crt")),
            &format!("--proxy-client-key-file={}", p("front-proxy-client.key")),
            "--requestheader-allowed-names=front-proxy-client",
            "--requestheader-username-headers=X-Remote-User",
            "--requestheader-group-headers=X-Remote-Group",
            "--requestheader-extra-headers-prefix=X-Remote-Extra-",
            &format!(
                "--cert-dir={}",
                tmp.path().join("apiserver-certs").display()
            ),
        ]),
        tmp.path().join("kube-apiserver.log"),
    );

    let kubeconfig = tmp.path().join("admin.kubeconfig");
    let rendered = pki
        .kubeconfig("admin", &format!("https://127.0.0.1:{api_port}"))
        .expect("kubeconfig");
    std::fs::write(&kubeconfig, rendered.as_bytes()).expect("write kubeconfig");
    let kubectl = |args: &[&str]| {
        run(Command::new(bin("kubectl"))
            .arg(format!("--kubeconfig={}", kubeconfig.display()))
            .args(args))
    };

    let took = wait_for(
        "kube-apiserver /readyz",
        Duration::from_secs(300),
        &mut procs,
        || {
            let out = kubectl(&["get", "--raw", "/readyz"]);
            out.status.success() && String::from_utf8_lossy(&out.stdout).trim() == "ok"
        },
    );
    eprintln!(
        "kube-apiserver ready after {took:?} ({:?} since start)",
        t_api.elapsed()
    );

    // The default namespaces exist once the apiserver's bootstrap controllers ran.
    wait_for(
        "default namespaces",
        Duration::from_secs(60),
        &mut procs,
        || {
            let out = kubectl(&["get", "ns", "-o", "name"]);
            let names = String::from_utf8_lossy(&out.stdout);
            out.status.success()
                && ["default", "kube-system", "kube-public"]
                    .iter()
                    .all(|n| names.contains(&format!("namespace/{n}")))
        },
    );
    let out = kubectl(&["version", "-o", "json"]);
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).expect("version json");
    assert_eq!(json["serverVersion"]["gitVersion"], format!("v{version}"));

    // RBAC works on our identities: the admin (system:masters) may do anything, the scheduler's
    // certificate is a different user with narrower rights.
    let scheduler_kc = tmp.path().join("scheduler.kubeconfig");
    let rendered = pki
        .kubeconfig("scheduler", &format!("https://127.0.0.1:{api_port}"))
        .expect("kubeconfig");
    std::fs::write(&scheduler_kc, rendered.as_bytes()).expect("write kubeconfig");
    let can = |kc: &Path, verb: &str, res: &str| {
        let out = run(Command::new(bin("kubectl"))
            .arg(format!("--kubeconfig={}", kc.display()))
            .args(["auth", "can-i", verb, res]));
        String::from_utf8_lossy(&out.stdout).trim() == "yes"
    };
    assert!(can(&kubeconfig, "delete", "namespaces"));
    assert!(can(&scheduler_kc, "list", "pods"));
    assert!(!can(&scheduler_kc, "delete", "namespaces"));

    // Custom resources: the API server encodes and decodes them as unstructured maps through
    // json-iterator. With the tree's vendored reflect2 v1.0.1 built by Go >= 1.18 that map
    // iteration faults (`fatal error: fault`, SIGSEGV in reflect2 UnsafeIterate) and the API
    // server dies, taking every CRD-based tool (cert-manager, ingress controllers, policy
    // engines) with it. The bundle builder replaces reflect2 and json-iterator (vendor
    // overrides, recorded in bundle.json); this proves the API server survives CRDs whose objects
    // are nested maps, written, read, listed, patched and watched.
    let manifest = serde_json::from_slice::<serde_json::Value>(
        &std::fs::read(bundle.root().join("bundle.json")).expect("read bundle.json"),
    )
    .expect("bundle.json");
    let overrides = manifest["source"]["vendorOverrides"].to_string();
    assert!(
        overrides.contains("github.com/modern-go/reflect2"),
        "bundle.json records no reflect2 override: {overrides}"
    );
    let apply = |yaml: &str| {
        let path = tmp.path().join("apply.yaml");
        std::fs::write(&path, yaml).expect("write manifest");
        let out = kubectl(&["apply", "-f", &path.display().to_string()]);
        assert!(
            out.status.success(),
            "kubectl apply: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    apply(
        r#"apiVersion: apiextensions.k8s.io/v1
kind: CustomResourceDefinition
metadata: {name: widgets.e2e.clusterctl.io}
spec:
  group: e2e.clusterctl.io
  scope: Namespaced
  names: {plural: widgets, singular: widget, kind: Widget, listKind: WidgetList}
  versions:
  - name: v1
    served: true
    storage: true
    subresources: {status: {}}
    schema:
      openAPIV3Schema:
        type: object
        properties:
          spec:
            type: object
            properties:
              labels: {type: object, additionalProperties: {type: string}}
              nested: {type: object, x-kubernetes-preserve-unknown-fields: true}
"#,
    );
    wait_for(
        "CRD established",
        Duration::from_secs(60),
        &mut procs,
        || {
            let out = kubectl(&[
                "get",
                "crd",
                "widgets.e2e.clusterctl.io",
                "-o",
                "jsonpath={.status.conditions[?(@.type=='Established')].status}",
            ]);
            String::from_utf8_lossy(&out.stdout).trim() == "True"
        },
    );
    let watch = Command::new(bin("kubectl"))
        .arg(format!("--kubeconfig={}", kubeconfig.display()))
        .args(["get", "widgets", "-A", "--watch", "-o", "name"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .stdin(Stdio::null())
        .spawn()
        .expect("kubectl watch");
    let mut wanted = Vec::new();
    for i in 0..5 {
        apply(&format!(
            r#"apiVersion: e2e.clusterctl.io/v1
kind: Widget
metadata: {{name: w{i}, namespace: default, labels: {{app: w{i}}}, annotations: {{a: b, c: d}}}}
spec:
  labels: {{tier: t{i}, zone: z{i}, owner: clusterctl}}
  nested: {{a: {{b: {{c: [1, 2, {{d: e}}]}}}}, m: {{x: "1", y: "2"}}}}
"#
        ));
        wanted.push(format!("widget.e2e.clusterctl.io/w{i}"));
    }
    let out = kubectl(&["get", "widgets", "-o", "json"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let list: serde_json::Value = serde_json::from_slice(&out.stdout).expect("widget list json");
    assert_eq!(list["items"].as_array().map(Vec::len), Some(5), "{list}");
    assert_eq!(list["items"][3]["spec"]["labels"]["zone"], "z3", "{list}");
    assert_eq!(
        list["items"][3]["spec"]["nested"]["a"]["b"]["c"][2]["d"], "e",
        "{list}"
    );
    let out = kubectl(&[
        "patch",
        "widget",
        "w1",
        "--type=merge",
        "-p",
        r#"{"spec":{"labels":{"patched":"yes"}},"metadata":{"labels":{"x":"y"}}}"#,
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = kubectl(&[
        "get",
        "widget",
        "w1",
        "-o",
        "jsonpath={.spec.labels.patched}",
    ]);
    assert_eq!(String::from_utf8_lossy(&out.stdout), "yes");
    // The watch saw every object (its stream is encoded by the same code path).
    std::thread::sleep(Duration::from_secs(2));
    let _ = Command::new("kill").arg(watch.id().to_string()).status();
    let watched = watch.wait_with_output().expect("kubectl watch output");
    let seen = String::from_utf8_lossy(&watched.stdout);
    for w in &wanted {
        assert!(
            seen.lines().any(|l| l == w),
            "watch did not see {w}: {seen}"
        );
    }
    procs.check_alive();
    eprintln!("custom resources: 5 written, listed, patched and watched; kube-apiserver alive");

    // The Go client in /usr/bin/kubectl (another build) accepts the kubeconfig too.
    let out = run(Command::new("kubectl")
        .arg(format!("--kubeconfig={}", kubeconfig.display()))
        .args(["get", "ns"]));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    eprintln!("total {:?}", t0.elapsed());
}

#[test]
fn bundle_images_import_into_containerd_and_run() {
    if !selected() {
        return;
    }
    let bundle = Bundle::open(&bundle_path()).expect("bundle opens");
    let verified = bundle.verify().expect("bundle verifies");
    let manifest = verified.manifest();
    assert!(
        manifest.ships_pause_image(),
        "the test bundle ships its pause image"
    );

    // A private containerd: own root, state and socket under a temp dir; no CRI plugin (it would
    // look for CNI configs), so nothing outside the temp dir is touched.
    let tmp = tempfile::tempdir().expect("tempdir");
    let sock = tmp.path().join("containerd.sock");
    let config = tmp.path().join("config.toml");
    std::fs::write(
        &config,
        format!(
            "version = 2\nroot = \"{root}\"\nstate = \"{state}\"\ndisabled_plugins = [\"io.containerd.grpc.v1.cri\"]\n\
             [grpc]\n  address = \"{sock}\"\n[ttrpc]\n  address = \"{sock}.ttrpc\"\n",
            root = tmp.path().join("root").display(),
            state = tmp.path().join("state").display(),
            sock = sock.display(),
        ),
    )
    .expect("config");
    let mut procs = Procs::default();
    procs.spawn(
        "containerd",
        Command::new("containerd").arg("--config").arg(&config),
        tmp.path().join("containerd.log"),
    );
    let ctr = |args: &[&str]| {
        run(Command::new("ctr")
            .arg("--address")
            .arg(&sock)
            .args(["-n", "k8s.io"])
            .args(args))
    };
    wait_for("containerd", Duration::from_secs(30), &mut procs, || {
        ctr(&["version"]).status.success()
    });

    for (image, path) in verified.images() {
        let out = ctr(&["images", "import", path.to_str().expect("utf-8")]);
        assert!(
            out.status.success(),
            "import {}: {}",
            path.display(),
            String::from_utf8_lossy(&out.stderr)
        );
        let list = ctr(&["images", "ls", "-q"]);
        assert!(
            String::from_utf8_lossy(&list.stdout)
                .lines()
                .any(|l| l == image.reference),
            "{} listed",
            image.reference
        );
        // Unpacked for the default snapshotter, as the CRI plugin needs it.
        let check = ctr(&["images", "check", &format!("name=={}", image.reference)]);
        let text = String::from_utf8_lossy(&check.stdout);
        assert!(text.contains("complete"), "{}: {text}", image.reference);
    }

    let busybox = manifest
        .images
        .iter()
        .find(|i| i.reference.contains("busybox"))
        .expect("busybox image");
    let out = ctr(&[
        "run",
        "--rm",
        &busybox.reference,
        "bundle-busybox",
        "sh",
        "-c",
        "echo hello from $(busybox | head -n1 | cut -d' ' -f1-2)",
    ]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.contains("hello from BusyBox v1"),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // The pause binary runs as the image's entrypoint and stays up until killed.
    let out = ctr(&["run", "-d", &manifest.pause_image, "bundle-pause"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    std::thread::sleep(Duration::from_secs(1));
    let tasks = ctr(&["tasks", "ls"]);
    let listing = String::from_utf8_lossy(&tasks.stdout);
    assert!(
        listing
            .lines()
            .any(|l| l.starts_with("bundle-pause") && l.contains("RUNNING")),
        "{listing}"
    );
    let _ = ctr(&["tasks", "kill", "-s", "SIGKILL", "bundle-pause"]);
    wait_for(
        "pause task to stop",
        Duration::from_secs(20),
        &mut procs,
        || ctr(&["tasks", "delete", "bundle-pause"]).status.success(),
    );
    let _ = ctr(&["containers", "delete", "bundle-pause"]);
}
