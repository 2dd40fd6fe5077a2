//! PKI tests: generated files checked with the real `openssl` CLI, idempotence, permissions, and
//! kubeconfigs checked with the real `kubectl`.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;

use super::*;

fn node(name: &str, ip: &str) -> NodeIdentity {
    NodeIdentity {
        name: name.to_string(),
        addresses: vec![ip.parse().unwrap()],
    }
}

fn spec() -> PkiSpec {
    PkiSpec {
        cluster_name: "demo".to_string(),
        cluster_domain: "cluster.local".to_string(),
        service_cidr: "10.96.0.0/12".parse().unwrap(),
        control_plane: vec![node("cp-1", "192.0.2.10")],
        workers: vec![
            node("worker-1", "192.0.2.11"),
            node("worker-2", "192.0.2.12"),
        ],
        extra_api_server_sans: vec!["api.demo.example".to_string()],
    }
}

fn openssl(args: &[&str]) -> String {
    let out = Command::new("openssl")
        .args(args)
        .output()
        .expect("openssl runs");
    assert!(
        out.status.success(),
        "openssl {args:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn text(dir: &Path, stem: &str) -> String {
    openssl(&[
        "x509",
        "-noout",
        "-text",
        "-in",
        dir.join(format!("{stem}.crt")).to_str().unwrap(),
    ])
}

fn all_files(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p)
            } else {
                out.push(p)
            }
        }
    }
    out.sort();
    out
}

#[test]
fn first_service_ip_is_network_plus_one() {
    assert_eq!(
        first_service_ip(&"10.96.0.0/12".parse().unwrap())
            .unwrap()
            .to_string(),
        "10.96.0.1"
    );
    assert_eq!(
        first_service_ip(&"fd00:10::/108".parse().unwrap())
            .unwrap()
            .to_string(),
        "fd00:10::1"
    );
    assert!(first_service_ip(&"10.0.0.0/31".parse().unwrap()).is_err());
    assert!(first_service_ip(&"10.0.0.7/32".parse().unwrap()).is_err());
}

#[test]
fn the_plan_has_kubeadm_names_sans_and_groups() {
    let certs = plan_certificates(&spec()).unwrap();
    let get = |stem: &str| {
        certs
            .iter()
            .find(|c| c.stem == stem)
            .unwrap_or_else(|| panic!("{stem} planned"))
    };
    let api = get("apiserver");
    for dns in [
        "kubernetes",
        "kubernetes.default",
        "kubernetes.default.svc",
        "kubernetes.default.svc.cluster.local",
        "localhost",
        "cp-1",
        "api.demo.example",
    ] {
        assert!(
            api.dns_names.iter().any(|d| d == dns),
            "{dns} in {:?}",
            api.dns_names
        );
    }
    let ips: Vec<String> = api.ips.iter().map(|i| i.to_string()).collect();
    assert_eq!(ips, ["10.96.0.1", "127.0.0.1", "192.0.2.10"]);
    assert_eq!(api.usage, Usage::Server);
    assert_eq!(get("admin").organizations, ["system:masters"]);
    assert_eq!(
        get("kubelet/worker-2-client").common_name,
        "system:node:worker-2"
    );
    assert_eq!(
        get("kubelet/worker-2-client").organizations,
        ["system:nodes"]
    );
    assert_eq!(
        get("kubelet/worker-2-serving").ips,
        ["192.0.2.12".parse::<IpAddr>().unwrap()]
    );
    assert_eq!(get("etcd/peer-cp-1").usage, Usage::ServerAndClient);
    assert_eq!(get("etcd/server-cp-1").ca, CaKind::Etcd);
    assert_eq!(get("apiserver-etcd-client").ca, CaKind::Etcd);
    assert_eq!(get("front-proxy-client").ca, CaKind::FrontProxy);
    assert_eq!(
        get("controller-manager").common_name,
        "system:kube-controller-manager"
    );
    assert_eq!(get("scheduler").common_name, "system:kube-scheduler");
    assert_eq!(get("kube-proxy").common_name, "system:kube-proxy");
    assert!(
        certs.iter().all(|c| c.stem != "etcd/server-worker-1"),
        "workers are not etcd members"
    );
}

#[test]
fn bad_identities_are_refused() {
    let mut s = spec();
    s.workers.push(node("../evil", "192.0.2.99"));
    assert!(
        plan_certificates(&s)
            .unwrap_err()
            .to_string()
            .contains("\"../evil\" is not a DNS-1123 name")
    );
    let mut s = spec();
    s.workers.push(node("cp-1", "192.0.2.99"));
    assert!(
        plan_certificates(&s)
            .unwrap_err()
            .to_string()
            .contains("cp-1 is used twice")
    );
    let mut s = spec();
    s.control_plane.clear();
    assert!(plan_certificates(&s).is_err());
}

#[test]
fn generated_pki_verifies_with_openssl_and_has_the_right_extensions() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("pki");
    let (pki, report) = Pki::ensure(&dir, &spec()).unwrap();
    assert!(
        report.iter().all(|r| r.action == Action::Created),
        "{report:?}"
    );

    // Every leaf verifies against its own CA, and the key belongs to the certificate.
    for cert in pki.certificates() {
        let ca = dir.join(format!("{}.crt", cert.ca.stem()));
        let crt = pki.cert_path(&cert.stem);
        let purpose = match cert.usage {
            Usage::Client => "sslclient",
            _ => "sslserver",
        };
        let out = openssl(&[
            "verify",
            "-purpose",
            purpose,
            "-CAfile",
            ca.to_str().unwrap(),
            crt.to_str().unwrap(),
        ]);
        assert!(out.trim_end().ends_with(": OK"), "{}: {out}", cert.stem);
        let from_cert = openssl(&["x509", "-noout", "-pubkey", "-in", crt.to_str().unwrap()]);
        let from_key = openssl(&[
            "pkey",
            "-pubout",
            "-in",
            pki.key_path(&cert.stem).to_str().unwrap(),
        ]);
        assert_eq!(from_cert, from_key, "{} key matches", cert.stem);
    }
    // A leaf does not verify against another CA.
    let wrong = Command::new("openssl")
        .args(["verify", "-CAfile"])
        .arg(dir.join("etcd/ca.crt"))
        .arg(dir.join("apiserver.crt"))
        .output()
        .unwrap();
    assert!(!wrong.status.success());

    let ca = text(&dir, "ca");
    assert!(ca.contains("CA:TRUE"), "{ca}");
    assert!(ca.contains("Certificate Sign, CRL Sign"), "{ca}");
    assert!(ca.contains("Subject: CN = kubernetes"), "{ca}");
    assert!(text(&dir, "etcd/ca").contains("Subject: CN = etcd-ca"));

    let api = text(&dir, "apiserver");
    for want in [
        "DNS:kubernetes,",
        "DNS:kubernetes.default,",
        "DNS:kubernetes.default.svc,",
        "DNS:kubernetes.default.svc.cluster.local",
        "DNS:localhost",
        "DNS:cp-1",
        "IP Address:10.96.0.1",
        "IP Address:127.0.0.1",
        "IP Address:192.0.2.10",
        "Digital Signature, Key Encipherment",
        "TLS Web Server Authentication",
        "CA:FALSE",
        "Issuer: CN = kubernetes",
    ] {
        assert!(api.contains(want), "apiserver lacks {want}:\n{api}");
    }
    assert!(!api.contains("TLS Web Client Authentication"));

    let admin = text(&dir, "admin");
    assert!(
        admin.contains("Subject: O = system:masters, CN = kubernetes-admin"),
        "{admin}"
    );
    assert!(admin.contains("TLS Web Client Authentication"));
    assert!(!admin.contains("Subject Alternative Name"));

    let kubelet = text(&dir, "kubelet/worker-1-client");
    assert!(
        kubelet.contains("Subject: O = system:nodes, CN = system:node:worker-1"),
        "{kubelet}"
    );
    let serving = text(&dir, "kubelet/worker-1-serving");
    assert!(
        serving.contains("DNS:worker-1, IP Address:192.0.2.11"),
        "{serving}"
    );

    let peer = text(&dir, "etcd/peer-cp-1");
    assert!(
        peer.contains("TLS Web Server Authentication, TLS Web Client Authentication"),
        "{peer}"
    );
    assert!(peer.contains("IP Address:0:0:0:0:0:0:0:1"), "{peer}");
    assert!(peer.contains("Issuer: CN = etcd-ca"), "{peer}");

    // Leaf validity is one year, CA ten years.
    let end = openssl(&[
        "x509",
        "-noout",
        "-checkend",
        &(300 * 86400).to_string(),
        "-in",
        dir.join("admin.crt").to_str().unwrap(),
    ]);
    assert!(end.contains("will not expire"));
    let soon = Command::new("openssl")
        .args([
            "x509",
            "-noout",
            "-checkend",
            &(400 * 86400).to_string(),
            "-in",
        ])
        .arg(dir.join("admin.crt"))
        .output()
        .unwrap();
    assert!(!soon.status.success(), "a leaf must not outlive a year");

    // The service-account public key is the private key's.
    let sa_pub = openssl(&["pkey", "-pubout", "-in", dir.join(SA_KEY).to_str().unwrap()]);
    assert_eq!(sa_pub, std::fs::read_to_string(dir.join(SA_PUB)).unwrap());
}

#[test]
fn files_are_0600_and_directories_0700() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("pki");
    Pki::ensure(&dir, &spec()).unwrap();
    let files = all_files(&dir);
    assert!(files.len() > 30, "{}", files.len());
    for f in &files {
        let mode = std::fs::metadata(f).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "{}", f.display());
        assert!(
            !f.file_name().unwrap().to_string_lossy().contains(".tmp-"),
            "no temp file left: {}",
            f.display()
        );
    }
    for d in [dir.clone(), dir.join("etcd"), dir.join("kubelet")] {
        assert_eq!(
            std::fs::metadata(&d).unwrap().permissions().mode() & 0o777,
            0o700,
            "{}",
            d.display()
        );
    }
    // A restored backup with loose permissions is tightened on the next run.
    std::fs::set_permissions(dir.join("ca.key"), std::fs::Permissions::from_mode(0o644)).unwrap();
    Pki::ensure(&dir, &spec()).unwrap();
    assert_eq!(
        std::fs::metadata(dir.join("ca.key"))
            .unwrap()
            .permissions()
            .mode()
            & 0o777,
        0o600
    );
}

#[test]
fn ensure_is_idempotent_and_never_rotates_cas() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("pki");
    Pki::ensure(&dir, &spec()).unwrap();
    let before: Vec<_> = all_files(&dir)
        .into_iter()
        .map(|f| (f.clone(), std::fs::read(&f).unwrap()))
        .collect();

    let (_, report) = Pki::ensure(&dir, &spec()).unwrap();
    assert!(
        report.iter().all(|r| r.action == Action::Reused),
        "{report:?}"
    );
    let after: Vec<_> = all_files(&dir)
        .into_iter()
        .map(|f| (f.clone(), std::fs::read(&f).unwrap()))
        .collect();
    assert_eq!(before, after, "a second run changes no byte");

    // A new control-plane address re-issues exactly the certificates that carry it.
    let mut changed = spec();
    changed.control_plane[0]
        .addresses
        .push("192.0.2.20".parse().unwrap());
    let (_, report) = Pki::ensure(&dir, &changed).unwrap();
    let reissued: Vec<_> = report
        .iter()
        .filter(|r| matches!(r.action, Action::Reissued(_)))
        .map(|r| r.stem.as_str())
        .collect();
    assert_eq!(
        reissued,
        [
            "apiserver",
            "etcd/server-cp-1",
            "etcd/peer-cp-1",
            "kubelet/cp-1-serving"
        ]
    );
    assert!(
        matches!(&report.iter().find(|r| r.stem == "apiserver").unwrap().action,
        Action::Reissued(why) if why == "subject alternative names changed")
    );
    for stem in ["ca", "etcd/ca", "front-proxy-ca"] {
        for ext in ["crt", "key"] {
            let f = dir.join(format!("{stem}.{ext}"));
            let old = &before.iter().find(|(p, _)| *p == f).unwrap().1;
            assert_eq!(
                &std::fs::read(&f).unwrap(),
                old,
                "{} unchanged",
                f.display()
            );
        }
    }
    assert!(text(&dir, "apiserver").contains("IP Address:192.0.2.20"));

    // A new worker gets its certificates; nothing else moves.
    let mut more = changed.clone();
    more.workers.push(node("worker-3", "192.0.2.13"));
    let (_, report) = Pki::ensure(&dir, &more).unwrap();
    let touched: Vec<_> = report
        .iter()
        .filter(|r| r.action != Action::Reused)
        .map(|r| r.stem.as_str())
        .collect();
    assert_eq!(
        touched,
        ["kubelet/worker-3-client", "kubelet/worker-3-serving"]
    );
}

#[test]
fn a_leaf_from_a_foreign_ca_or_with_a_wrong_key_is_reissued() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("pki");
    let other = tmp.path().join("other");
    Pki::ensure(&dir, &spec()).unwrap();
    Pki::ensure(&other, &spec()).unwrap();
    std::fs::copy(other.join("admin.crt"), dir.join("admin.crt")).unwrap();
    std::fs::copy(other.join("admin.key"), dir.join("admin.key")).unwrap();
    std::fs::copy(other.join("scheduler.key"), dir.join("scheduler.key")).unwrap();
    let (_, report) = Pki::ensure(&dir, &spec()).unwrap();
    let action = |stem: &str| {
        report
            .iter()
            .find(|r| r.stem == stem)
            .unwrap()
            .action
            .clone()
    };
    assert_eq!(
        action("admin"),
        Action::Reissued("not signed by the current ca CA".to_string())
    );
    assert_eq!(
        action("scheduler"),
        Action::Reissued("certificate and key do not match".to_string())
    );
    let ca = dir.join("ca.crt");
    for stem in ["admin", "scheduler"] {
        openssl(&[
            "verify",
            "-CAfile",
            ca.to_str().unwrap(),
            dir.join(format!("{stem}.crt")).to_str().unwrap(),
        ]);
    }
}

#[test]
fn a_ca_missing_half_is_an_error_not_a_new_ca() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("pki");
    Pki::ensure(&dir, &spec()).unwrap();
    std::fs::remove_file(dir.join("etcd/ca.key")).unwrap();
    let err = Pki::ensure(&dir, &spec()).unwrap_err();
    assert!(matches!(err, PkiError::HalfPresent { .. }), "{err}");
    assert!(err.to_string().contains("etcd/ca.key is missing"), "{err}");
    assert!(!dir.join("etcd/ca.key").exists(), "no new key was made");

    std::fs::write(dir.join("etcd/ca.key"), "garbage").unwrap();
    let err = Pki::ensure(&dir, &spec()).unwrap_err();
    assert!(
        matches!(
            err,
            PkiError::Unusable {
                what: "private key",
                ..
            }
        ),
        "{err}"
    );

    std::fs::remove_file(dir.join(SA_KEY)).unwrap();
    std::fs::remove_file(dir.join("etcd/ca.crt")).unwrap();
    std::fs::remove_file(dir.join("etcd/ca.key")).unwrap();
    let err = Pki::ensure(&dir, &spec());
    // The etcd CA is made anew (both halves absent), but sa.pub without sa.key is refused.
    assert!(matches!(err, Err(PkiError::HalfPresent { .. })), "{err:?}");
}

#[test]
fn debug_output_and_errors_never_contain_key_material() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("pki");
    let (pki, report) = Pki::ensure(&dir, &spec()).unwrap();
    let ca_key = std::fs::read_to_string(dir.join("ca.key")).unwrap();
    let key_body: String = ca_key.lines().nth(1).unwrap().to_string();
    let printed = format!("{pki:?} {report:?}");
    assert!(!printed.contains("PRIVATE KEY"), "{printed}");
    assert!(!printed.contains(&key_body), "{printed}");
    assert!(printed.contains("apiserver"));
}

#[test]
fn the_admin_kubeconfig_is_accepted_by_kubectl() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("demo");
    let (pki, _) = Pki::ensure(&dir, &spec()).unwrap();
    let kubeconfig = pki.kubeconfig("admin", "https://127.0.0.1:6443").unwrap();
    let path = tmp.path().join("admin.kubeconfig");
    std::fs::write(&path, kubeconfig.as_bytes()).unwrap();

    let view = |extra: &[&str]| {
        let out = Command::new("kubectl")
            .args(["config", "view", "--kubeconfig"])
            .arg(&path)
            .args(extra)
            .env_remove("KUBECONFIG")
            .output()
            .expect("kubectl runs");
        assert!(
            out.status.success(),
            "kubectl: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let shown = view(&[]);
    assert!(shown.contains("server: https://127.0.0.1:6443"), "{shown}");
    assert!(
        shown.contains("current-context: kubernetes-admin@demo"),
        "{shown}"
    );
    assert!(!shown.contains("PRIVATE KEY"));
    let user = view(&["-o", "jsonpath={.users[0].name}"]);
    assert_eq!(user, "kubernetes-admin");
    // kubectl decodes the embedded data back to exactly our PEM files.
    let key = view(&["--raw", "-o", "jsonpath={.users[0].user.client-key-data}"]);
    use base64::Engine;
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(key.trim())
        .unwrap();
    assert_eq!(decoded, std::fs::read(dir.join("admin.key")).unwrap());

    // Only cluster client certificates make kubeconfigs.
    assert!(pki.kubeconfig("apiserver", "https://x").is_err());
    assert!(
        pki.kubeconfig("apiserver-etcd-client", "https://x")
            .is_err()
    );
    assert!(
        pki.kubeconfig("kubelet/worker-1-client", "https://x")
            .is_ok()
    );
}

#[test]
fn kubeconfig_rendering_quotes_awkward_names() {
    let rendered = render_kubeconfig(&KubeconfigInput {
        cluster_name: "a: b # c",
        server: "https://[::1]:6443",
        ca_pem: "ca",
        user_name: "system:node:x",
        client_cert_pem: "cert",
        client_key_pem: "key",
    });
    assert!(
        rendered.contains("- name: \"a: b # c\"\n"),
        "{}",
        rendered.as_str()
    );
    assert!(rendered.contains("current-context: \"system:node:x@a: b # c\"\n"));
    assert!(rendered.contains("client-key-data: a2V5\n"));
}
