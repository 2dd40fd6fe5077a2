use std::collections::BTreeMap;
use std::fmt::Write as _;

use super::*;

/// One control plane and two workers, as `examples/local.yaml` makes them.
pub(crate) fn cluster() -> ClusterInput {
    let node = |name: &str, last: u8, role: Role, index: u32| NodeInput {
        name: name.to_owned(),
        ip: Ipv4Addr::new(10, 77, 0, last),
        role,
        pod_cidr_index: index,
        labels: BTreeMap::new(),
        taints: Vec::new(),
    };
    let mut cp = node("local-cp-1", 11, Role::ControlPlane, 0);
    cp.taints.push(Taint {
        key: "node-role.kubernetes.io/master".to_owned(),
        value: None,
        effect: TaintEffect::NoSchedule,
    });
    cp.labels.insert(
        "node.kubernetes.io/pool".to_owned(),
        "control-plane".to_owned(),
    );
    let mut w1 = node("local-workers-1", 12, Role::Worker, 1);
    w1.labels
        .insert("node.kubernetes.io/pool".to_owned(), "workers".to_owned());
    w1.labels
        .insert("example.com/tier".to_owned(), "batch".to_owned());
    w1.taints.push(Taint {
        key: "dedicated".to_owned(),
        value: Some("batch".to_owned()),
        effect: TaintEffect::PreferNoSchedule,
    });
    let w2 = node("local-workers-2", 13, Role::Worker, 2);
    ClusterInput {
        kubernetes_version: "1.20.2".to_owned(),
        cluster_name: "local".to_owned(),
        service_cidr: "10.96.0.0/12".parse().expect("cidr"),
        dns_service_ip: Ipv4Addr::new(10, 96, 0, 10),
        pod_cidr: "10.244.0.0/16".parse().expect("cidr"),
        cluster_domain: "cluster.local".to_owned(),
        api_server_port: 6443,
        api_server_host: None,
        etcd_cluster_state: EtcdClusterState::New,
        pause_image: "localhost/clusterctl/pause:3.4.1".to_owned(),
        controller_manager_signs: true,
        layout: Layout::default(),
        nodes: vec![cp, w1, w2],
    }
}

fn show(files: &NodeFiles) -> String {
    let mut s = String::new();
    for f in &files.files {
        let _ = writeln!(s, "==> {} ({:o})\n{}", f.path, f.mode, f.contents);
    }
    let _ = writeln!(
        s,
        "==> units to restart, in order\n{}\n",
        files.units.join("\n")
    );
    let _ = writeln!(s, "==> files provided by the caller");
    for e in &files.external {
        let _ = match &e.source {
            Source::Pki(rel) => writeln!(s, "{} <- pki {rel}", e.path),
            Source::Kubeconfig { cert, server } => {
                writeln!(s, "{} <- kubeconfig {cert} @ {server}", e.path)
            }
        };
    }
    s
}

fn render(c: &ClusterInput, node: &str) -> NodeFiles {
    render_node(c, node).unwrap_or_else(|e| panic!("render {node}: {e}"))
}

fn file<'a>(files: &'a NodeFiles, path: &str) -> &'a str {
    files
        .files
        .iter()
        .find(|f| f.path == path)
        .map(|f| f.contents.as_str())
        .unwrap_or_else(|| panic!("no {path}"))
}

#[test]
fn control_plane_node_snapshot() {
    insta::assert_snapshot!("control_plane", show(&render(&cluster(), "local-cp-1")));
}

#[test]
fn worker_node_snapshot() {
    insta::assert_snapshot!("worker", show(&render(&cluster(), "local-workers-1")));
}

#[test]
fn every_config_parses_and_says_what_it_should() {
    let c = cluster();
    for node in ["local-cp-1", "local-workers-2"] {
        let files = render(&c, node);
        for f in &files.files {
            if f.path.ends_with(".yaml") {
                let v: serde_json::Value = serde_saphyr::from_str(&f.contents)
                    .unwrap_or_else(|e| panic!("{}: {e}\n{}", f.path, f.contents));
                assert!(
                    v["apiVersion"].is_string() && v["kind"].is_string(),
                    "{}",
                    f.path
                );
            }
            if f.path.ends_with(".conflist") {
                let v: serde_json::Value = serde_json::from_str(&f.contents)
                    .unwrap_or_else(|e| panic!("{}: {e}\n{}", f.path, f.contents));
                let types: Vec<&str> = v["plugins"]
                    .as_array()
                    .expect("plugins")
                    .iter()
                    .filter_map(|p| p["type"].as_str())
                    .collect();
                assert_eq!(types, ["bridge", "portmap"]);
                assert_eq!(v["plugins"][0]["ipam"]["type"], "host-local");
            }
            if f.path.ends_with(".toml") {
                // No TOML parser in the workspace: every line is a comment, a table header or a
                // `key = value` with a quoted string, boolean or integer value.
                for line in f.contents.lines().map(str::trim) {
                    let ok = line.is_empty()
                        || line.starts_with('#')
                        || (line.starts_with('[') && line.ends_with(']'))
                        || line.split_once(" = ").is_some_and(|(k, v)| {
                            !k.contains(' ')
                                && (serde_json::from_str::<String>(v).is_ok()
                                    || v == "true"
                                    || v == "false"
                                    || v.parse::<i64>().is_ok())
                        });
                    assert!(ok, "{}: bad line {line:?}", f.path);
                }
            }
            if f.path.ends_with(".service") {
                let head: Vec<&str> = f.contents.lines().filter(|l| l.starts_with('[')).collect();
                assert_eq!(head, ["[Unit]", "[Service]", "[Install]"], "{}", f.path);
                // A continued line ends with " \" and the last flag line does not.
                assert!(!f.contents.contains("\\\n\n"), "{}", f.path);
                // No systemd specifiers or variable expansion: `%` never, `$` only as `$$`
                // (systemd's escape for a literal `$`) inside a `/bin/sh -c` command.
                assert!(!f.contents.contains('%'), "{}", f.path);
                for line in f.contents.lines().filter(|l| l.contains('$')) {
                    assert!(
                        (line.starts_with("ExecStart=/bin/sh -c ")
                            || line.starts_with("ExecStartPre=/bin/sh -c "))
                            && !line.replace("$$", "").contains('$'),
                        "{}: unescaped $ or $ outside a shell command: {line}",
                        f.path
                    );
                }
            }
        }
        let kubelet: serde_json::Value = serde_saphyr::from_str(file(
            &files,
            "/var/lib/clusterctl/kubernetes/kubelet-config.yaml",
        ))
        .expect("kubelet config");
        assert_eq!(kubelet["apiVersion"], "kubelet.config.k8s.io/v1beta1");
        assert_eq!(kubelet["cgroupDriver"], "cgroupfs");
        assert_eq!(kubelet["clusterDNS"][0], "10.96.0.10");
        assert_eq!(
            kubelet["authentication"]["x509"]["clientCAFile"],
            "/var/lib/clusterctl/kubernetes/pki/ca.crt"
        );
        assert_eq!(kubelet["authorization"]["mode"], "Webhook");
        assert_eq!(
            kubelet["tlsCertFile"],
            format!("/var/lib/clusterctl/kubernetes/pki/kubelet/{node}-serving.crt")
        );
        let proxy: serde_json::Value = serde_saphyr::from_str(file(
            &files,
            "/var/lib/clusterctl/kubernetes/kube-proxy-config.yaml",
        ))
        .expect("kube-proxy config");
        assert_eq!(proxy["mode"], "iptables");
        assert_eq!(proxy["clusterCIDR"], "10.244.0.0/16");
        assert_eq!(proxy["hostnameOverride"], node);
    }
}

/// Field names of the rendered configs exist in the 1.20 API types
/// (`staging/src/k8s.io/kubelet/config/v1beta1/types.go`, `kube-proxy/config/v1alpha1`); kubelet
/// falls back to lenient decoding on an unknown field and only logs it, so a typo would be silent.
#[test]
fn config_fields_are_known_to_the_1_20_api() {
    fn keys(v: &serde_json::Value, out: &mut Vec<String>) {
        if let Some(m) = v.as_object() {
            for (k, v) in m {
                out.push(k.clone());
                keys(v, out);
            }
        }
    }
    let kubelet_fields = [
        "apiVersion",
        "kind",
        "authentication",
        "anonymous",
        "enabled",
        "webhook",
        "cacheTTL",
        "x509",
        "clientCAFile",
        "authorization",
        "mode",
        "cacheAuthorizedTTL",
        "cacheUnauthorizedTTL",
        "cgroupDriver",
        "clusterDNS",
        "clusterDomain",
        "tlsCertFile",
        "tlsPrivateKeyFile",
        "rotateCertificates",
        "serverTLSBootstrap",
        "readOnlyPort",
        "healthzBindAddress",
        "healthzPort",
    ];
    let proxy_fields = [
        "apiVersion",
        "kind",
        "clientConnection",
        "kubeconfig",
        "hostnameOverride",
        "mode",
        "clusterCIDR",
        "metricsBindAddress",
    ];
    let files = render(&cluster(), "local-workers-2");
    for (path, known) in [
        (
            "/var/lib/clusterctl/kubernetes/kubelet-config.yaml",
            &kubelet_fields[..],
        ),
        (
            "/var/lib/clusterctl/kubernetes/kube-proxy-config.yaml",
            &proxy_fields[..],
        ),
    ] {
        let v: serde_json::Value = serde_saphyr::from_str(file(&files, path)).expect("yaml");
        let mut found = Vec::new();
        keys(&v, &mut found);
        for k in found {
            assert!(
                known.contains(&k.as_str()),
                "{path}: field {k} is not in the 1.20 API"
            );
        }
    }
}

#[test]
fn pod_ranges_and_routes_between_nodes() {
    let pods: Ipv4Net = "10.244.0.0/16".parse().expect("cidr");
    assert_eq!(
        node_pod_cidr(pods, 0).expect("0").to_string(),
        "10.244.0.0/24"
    );
    assert_eq!(
        node_pod_cidr(pods, 7).expect("7").to_string(),
        "10.244.7.0/24"
    );
    assert_eq!(
        node_pod_cidr(pods, 255).expect("255").to_string(),
        "10.244.255.0/24"
    );
    let err = node_pod_cidr(pods, 256).expect_err("256");
    assert_eq!(
        err.to_string(),
        "invalid pod_cidr_index: index 256 is outside 10.244.0.0/16, which has 256 /24 ranges"
    );
    assert!(node_pod_cidr("10.244.0.0/25".parse().expect("cidr"), 0).is_err());

    let c = cluster();
    let w2 = render(&c, "local-workers-2");
    let net = file(&w2, "/etc/systemd/system/clusterctl-pod-network.service");
    assert!(net.contains("ExecStartPre=/usr/sbin/ip route replace 10.244.0.0/24 via 10.77.0.11\n"));
    assert!(net.contains("ExecStartPre=/usr/sbin/ip route replace 10.244.1.0/24 via 10.77.0.12\n"));
    assert!(
        !net.contains("via 10.77.0.13"),
        "no route to itself:\n{net}"
    );
    assert!(net.contains("-s 10.244.2.0/24 ! -d 10.244.0.0/16"));
    // The node itself reaches Service IPs (webhooks called by the API server): the service CIDR
    // is routed out of the interface holding the node's address, from that address.
    let svc = c.service_cidr.to_string();
    let route = net
        .lines()
        .find(|l| l.starts_with("ExecStartPre=") && l.contains(&format!("route replace {svc} dev")))
        .unwrap_or_else(|| panic!("no route for the service CIDR {svc}:\n{net}"));
    assert!(
        route.contains("addr show to 10.77.0.13/32") && route.ends_with("src 10.77.0.13'"),
        "{route}"
    );
    // The unit keeps every route and the masquerade rule applied: its ExecStart re-runs each
    // ExecStartPre step every 15 s and says in the journal when a route had gone.
    let watch = net
        .lines()
        .find_map(|l| l.strip_prefix("ExecStart="))
        .unwrap_or_else(|| panic!("no ExecStart:\n{net}"));
    assert!(
        watch.starts_with("/bin/sh -c 'while sleep 15; do "),
        "{watch}"
    );
    for pre in net.lines().filter_map(|l| l.strip_prefix("ExecStartPre=")) {
        let step = pre
            .strip_prefix("/bin/sh -c '")
            .and_then(|s| s.strip_suffix('\''))
            .unwrap_or(pre);
        assert!(
            watch.contains(step),
            "ExecStart does not re-apply {step}: {watch}"
        );
    }
    for dst in ["10.244.0.0/24", "10.244.1.0/24", "10.96.0.0/12"] {
        assert!(
            watch.contains(&format!(" {dst}")),
            "{dst} not checked: {watch}"
        );
    }
    assert!(net.contains("Restart=always\n"), "{net}");
    let cni = file(&w2, "/etc/cni/net.d/10-clusterctl.conflist");
    assert!(
        cni.contains("\"subnet\": \"10.244.2.0/24\", \"gateway\": \"10.244.2.1\""),
        "{cni}"
    );
}

#[test]
fn worker_gets_no_control_plane_and_talks_to_the_first_control_plane() {
    let mut c = cluster();
    let w = render(&c, "local-workers-2");
    let paths: Vec<&str> = w.files.iter().map(|f| f.path.as_str()).collect();
    assert!(
        !paths
            .iter()
            .any(|p| p.contains("etcd") || p.contains("apiserver"))
    );
    assert!(
        !w.units
            .iter()
            .any(|u| u.starts_with("etcd") || u.starts_with("kube-api"))
    );
    assert!(w.external.contains(&ExternalFile {
        path: "/var/lib/clusterctl/kubernetes/kubelet.conf".into(),
        source: Source::Kubeconfig {
            cert: "kubelet/local-workers-2-client".into(),
            server: "https://10.77.0.11:6443".into(),
        },
    }));
    // Secrets of other nodes are never asked for.
    assert!(
        !w.external
            .iter()
            .any(|e| e.path.contains("local-workers-1"))
    );
    c.api_server_host = Some("10.77.0.100".parse().expect("ip"));
    let w = render(&c, "local-workers-2");
    assert!(w.external.iter().any(|e| matches!(&e.source,
        Source::Kubeconfig { server, .. } if server == "https://10.77.0.100:6443")));
}

#[test]
fn three_control_planes_form_one_etcd_cluster() {
    let mut c = cluster();
    for (i, name) in ["local-cp-2", "local-cp-3"].iter().enumerate() {
        let mut n = c.nodes[0].clone();
        n.name = (*name).to_owned();
        n.ip = Ipv4Addr::new(10, 77, 0, 21 + u8::try_from(i).expect("small"));
        n.pod_cidr_index = 10 + u32::try_from(i).expect("small");
        c.nodes.push(n);
    }
    let cp2 = render(&c, "local-cp-2");
    let etcd = file(&cp2, "/etc/systemd/system/etcd.service");
    assert!(etcd.contains(
        "--initial-cluster=local-cp-1=https://10.77.0.11:2380,local-cp-2=https://10.77.0.21:2380,local-cp-3=https://10.77.0.22:2380"
    ), "{etcd}");
    assert!(etcd.contains("--name=local-cp-2 "));
    let api = file(&cp2, "/etc/systemd/system/kube-apiserver.service");
    assert!(api.contains("--advertise-address=10.77.0.21 "));
    assert!(api.contains(
        "--etcd-servers=https://10.77.0.11:2379,https://10.77.0.21:2379,https://10.77.0.22:2379 "
    ));
    // Several control planes: one controller-manager and one scheduler lead, by lease.
    for unit in ["kube-controller-manager", "kube-scheduler"] {
        let text = file(&cp2, &format!("/etc/systemd/system/{unit}.service"));
        assert!(text.contains("--leader-elect=true "), "{text}");
        assert!(
            text.contains("--leader-elect-renew-deadline=40s "),
            "{text}"
        );
    }
    let cp1 = render(&cluster(), "local-cp-1");
    for unit in ["kube-controller-manager", "kube-scheduler"] {
        let text = file(&cp1, &format!("/etc/systemd/system/{unit}.service"));
        assert!(text.contains("--leader-elect=false"), "{text}");
        assert!(!text.contains("--leader-elect-lease"), "{text}");
    }
    c.etcd_cluster_state = EtcdClusterState::Existing;
    let cp3 = render(&c, "local-cp-3");
    assert!(
        file(&cp3, "/etc/systemd/system/etcd.service")
            .contains("--initial-cluster-state=existing ")
    );
}

#[test]
fn ca_key_reaches_the_node_only_when_the_controller_manager_signs() {
    let mut c = cluster();
    let cp = render(&c, "local-cp-1");
    assert!(
        cp.external
            .iter()
            .any(|e| e.source == Source::Pki("ca.key".into()))
    );
    c.controller_manager_signs = false;
    let cp = render(&c, "local-cp-1");
    assert!(
        !cp.external
            .iter()
            .any(|e| e.source == Source::Pki("ca.key".into()))
    );
    let cm = file(&cp, "/etc/systemd/system/kube-controller-manager.service");
    assert!(!cm.contains("cluster-signing"), "{cm}");
}

#[test]
fn unsupported_versions_are_refused_naming_the_supported_ones() {
    for v in [
        "1.20.2",
        "v1.20.2",
        "1.20.5+really1.20.2",
        "v1.20.0-rc.1",
        "1.20",
    ] {
        assert_eq!(check_version(v).map(|p| p.minor).ok(), Some("1.20"), "{v}");
    }
    for v in [
        "1.21.0", "1.19.16", "v2.20.0", "1.2.0", "1.200.1", "", "latest", "1.20.x", "1..20",
    ] {
        let err = check_version(v).expect_err(v);
        assert!(
            matches!(&err, RenderError::UnsupportedVersion { version, supported } if version == v && supported == "1.20"),
            "{v}: {err:?}"
        );
    }
    let mut c = cluster();
    c.kubernetes_version = "1.30.2".to_owned();
    let err = render_node(&c, "local-cp-1").expect_err("1.30");
    assert_eq!(
        err.to_string(),
        "kubernetes version 1.30.2 is not supported (supported minor versions: 1.20)"
    );
}

#[test]
fn bad_inputs_are_refused_naming_the_field() {
    type Mutation = Box<dyn Fn(&mut ClusterInput)>;
    let cases: Vec<(&str, Mutation)> = vec![
        (
            "nodes[1].labels",
            Box::new(|c| {
                c.nodes[1]
                    .labels
                    .insert("node-role.kubernetes.io/worker".into(), String::new());
            }),
        ),
        (
            "nodes[1].labels",
            Box::new(|c| {
                c.nodes[1].labels.insert("bad key".into(), "x".into());
            }),
        ),
        (
            "nodes[2].taints",
            Box::new(|c| {
                c.nodes[2].taints.push(Taint {
                    key: "a".into(),
                    value: Some("$(reboot)".into()),
                    effect: TaintEffect::NoExecute,
                });
            }),
        ),
        (
            "nodes[2].pod_cidr_index",
            Box::new(|c| c.nodes[2].pod_cidr_index = 1),
        ),
        (
            "nodes[2].ip",
            Box::new(|c| c.nodes[2].ip = Ipv4Addr::new(10, 77, 0, 11)),
        ),
        (
            "nodes[2].ip",
            Box::new(|c| c.nodes[2].ip = Ipv4Addr::new(10, 244, 9, 9)),
        ),
        (
            "nodes[2].name",
            Box::new(|c| c.nodes[2].name = "local-cp-1".into()),
        ),
        (
            "nodes[0].name",
            Box::new(|c| c.nodes[0].name = "CP 1".into()),
        ),
        (
            "pod_cidr_index",
            Box::new(|c| c.nodes[2].pod_cidr_index = 300),
        ),
        (
            "pod_cidr",
            Box::new(|c| c.pod_cidr = "10.96.0.0/16".parse().expect("cidr")),
        ),
        (
            "dns_service_ip",
            Box::new(|c| c.dns_service_ip = Ipv4Addr::new(10, 244, 0, 10)),
        ),
        (
            "layout.bin_dir",
            Box::new(|c| c.layout.bin_dir = "/opt/my bin".into()),
        ),
        (
            "layout.pki_dir",
            Box::new(|c| c.layout.pki_dir = "pki".into()),
        ),
        (
            "layout.config_dir",
            Box::new(|c| c.layout.config_dir = "/etc/%n".into()),
        ),
        (
            "pause_image",
            Box::new(|c| c.pause_image = "pause\"; rm".into()),
        ),
        (
            "cluster_name",
            Box::new(|c| c.cluster_name = "Local".into()),
        ),
        (
            "cluster_domain",
            Box::new(|c| c.cluster_domain = "cluster..local".into()),
        ),
        (
            "nodes",
            Box::new(|c| c.nodes.retain(|n| n.role == Role::Worker)),
        ),
        (
            "node_name",
            Box::new(|c| c.nodes[0].name = "local-cp-9".into()),
        ),
    ];
    for (field, mutate) in cases {
        let mut c = cluster();
        mutate(&mut c);
        match render_node(&c, "local-cp-1") {
            Err(RenderError::Invalid { field: f, reason }) => {
                assert_eq!(f, field, "{reason}");
                assert!(!reason.is_empty());
            }
            other => panic!("{field}: expected an invalid-input error, got {other:?}"),
        }
    }
}

#[test]
fn kubelet_label_namespaces_follow_kubelet_1_20() {
    for ok in [
        "tier",
        "example.com/tier",
        "node.kubernetes.io/pool",
        "pool.node.kubernetes.io/x",
        "kubelet.kubernetes.io/x",
        "topology.kubernetes.io/zone",
        "kubernetes.io/hostname",
        "notkubernetes.io/x",
    ] {
        assert!(kubelet_may_set_label(ok), "{ok}");
    }
    for bad in [
        "kubernetes.io/role",
        "node-role.kubernetes.io/worker",
        "k8s.io/x",
        "team.k8s.io/x",
        "topology.kubernetes.io/rack",
    ] {
        assert!(!kubelet_may_set_label(bad), "{bad}");
    }
}

#[test]
fn rendering_is_deterministic() {
    let c = cluster();
    assert_eq!(render(&c, "local-cp-1"), render(&c, "local-cp-1"));
}

mod cluster_dns {
    use super::super::*;

    fn input() -> ClusterDnsInput {
        ClusterDnsInput {
            version: "1.20.2".into(),
            cluster_dns: "10.96.0.10".parse().unwrap(),
            cluster_domain: "cluster.local".into(),
            image: None,
            replicas: 2,
        }
    }

    #[test]
    fn coredns_of_the_version_at_the_kubelets_cluster_dns() {
        let yaml = render_cluster_dns(&input()).unwrap();
        insta::assert_snapshot!("coredns", yaml);
        assert!(yaml.contains("image: \"registry.k8s.io/coredns:1.7.0\""));
        assert!(yaml.contains("clusterIP: \"10.96.0.10\""));
        assert!(yaml.contains("kubernetes cluster.local in-addr.arpa ip6.arpa"));
        // Every document parses as YAML with a kind and a name.
        let docs: Vec<serde_json::Value> = yaml
            .split("\n---\n")
            .map(|d| serde_saphyr::from_str(d).unwrap())
            .collect();
        let kinds: Vec<&str> = docs.iter().map(|d| d["kind"].as_str().unwrap()).collect();
        assert_eq!(
            kinds,
            [
                "ServiceAccount",
                "ClusterRole",
                "ClusterRoleBinding",
                "ConfigMap",
                "Deployment",
                "Service"
            ]
        );
        for d in &docs {
            assert_eq!(d["metadata"]["labels"][ADDON_LABEL], "coredns", "{d}");
        }
        let mut own = input();
        own.image = Some("registry.example/coredns:1.7.0".into());
        assert!(
            render_cluster_dns(&own)
                .unwrap()
                .contains("image: \"registry.example/coredns:1.7.0\"")
        );
    }

    #[test]
    fn bad_input_is_refused_naming_the_field() {
        let mut bad = input();
        bad.cluster_domain = "cluster.local {\n}".into();
        let e = render_cluster_dns(&bad).unwrap_err().to_string();
        assert!(e.contains("cluster_domain"), "{e}");
        let mut zero = input();
        zero.replicas = 0;
        assert!(
            render_cluster_dns(&zero)
                .unwrap_err()
                .to_string()
                .contains("replicas")
        );
        let mut old = input();
        old.version = "1.19.0".into();
        assert!(render_cluster_dns(&old).is_err());
    }
}
