//! The rendered node configuration against the real Kubernetes and etcd binaries of a bundle.
//!
//! Selected by `CLUSTERCTL_BUNDLE_DIR=/var/cache/clusterctl/bundles/<key>` (the directory holding
//! `bin/`, as `tests/bed/build-k8s-bundle.sh` prints it). With the variable set, a missing binary
//! is a failure, not a skip. For every unit this renders (control plane and worker), each
//! `--flag` must appear in `<binary> --help` of that version, and the whole rendered command line
//! followed by `--help` must parse (an unknown flag or a malformed value makes the binary exit
//! non-zero before it prints help). The binaries report a version that [`check_version`]
//! accepts, and kube-proxy loads and validates the rendered KubeProxyConfiguration strictly
//! (`--write-config-to`).
//!
//! `CLUSTERCTL_BUNDLE_DIR=... cargo test -p templates --test kubernetes_bundle`; no root, ~10 s.

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::Command;

use templates::kubernetes::{
    ClusterInput, EtcdClusterState, Layout, NodeFiles, NodeInput, Role, Taint, TaintEffect,
    check_version, render_node,
};

fn bundle_dir() -> Option<PathBuf> {
    std::env::var_os("CLUSTERCTL_BUNDLE_DIR").map(PathBuf::from)
}

fn cluster() -> ClusterInput {
    let node = |name: &str, last: u8, role: Role, index: u32| NodeInput {
        name: name.to_owned(),
        ip: Ipv4Addr::new(10, 77, 0, last),
        role,
        pod_cidr_index: index,
        labels: BTreeMap::from([
            ("node.kubernetes.io/pool".to_owned(), "p".to_owned()),
            ("example.com/tier".to_owned(), "batch".to_owned()),
        ]),
        taints: vec![
            Taint {
                key: "node-role.kubernetes.io/master".to_owned(),
                value: None,
                effect: TaintEffect::NoSchedule,
            },
            Taint {
                key: "dedicated".to_owned(),
                value: Some("batch".to_owned()),
                effect: TaintEffect::NoExecute,
            },
        ],
    };
    ClusterInput {
        kubernetes_version: "1.20.2".to_owned(),
        cluster_name: "flags".to_owned(),
        service_cidr: "10.96.0.0/12".parse().expect("cidr"),
        dns_service_ip: Ipv4Addr::new(10, 96, 0, 10),
        pod_cidr: "10.244.0.0/16".parse().expect("cidr"),
        cluster_domain: "cluster.local".to_owned(),
        api_server_port: 6443,
        api_server_host: None,
        etcd_cluster_state: EtcdClusterState::New,
        pause_image: "localhost/clusterctl/pause:3.4.1".to_owned(),
        // Render every optional flag so that each one is checked.
        controller_manager_signs: true,
        layout: Layout::default(),
        nodes: vec![
            node("cp-1", 11, Role::ControlPlane, 0),
            node("w-1", 12, Role::Worker, 1),
        ],
    }
}

/// `(binary name, arguments)` of every `ExecStart=` of a long-running unit in `bin_dir`.
fn commands(files: &NodeFiles, bin_dir: &str) -> Vec<(String, Vec<String>)> {
    let mut out = Vec::new();
    for f in files.files.iter().filter(|f| f.path.ends_with(".service")) {
        let mut lines = f.contents.lines();
        while let Some(line) = lines.next() {
            let Some(first) = line.strip_prefix("ExecStart=") else {
                continue;
            };
            let mut words: Vec<String> = Vec::new();
            let mut current = first;
            loop {
                let continued = current.ends_with(" \\");
                words.extend(
                    current
                        .trim_end_matches('\\')
                        .split_whitespace()
                        .map(str::to_owned),
                );
                if !continued {
                    break;
                }
                current = lines.next().expect("continuation line");
            }
            let exe = words.remove(0);
            if let Some(name) = exe.strip_prefix(&format!("{bin_dir}/")) {
                out.push((name.to_owned(), words));
            }
        }
    }
    out
}

fn flag_name(arg: &str) -> &str {
    arg.trim_start_matches("--")
        .split('=')
        .next()
        .unwrap_or_default()
}

fn help_mentions(help: &str, flag: &str) -> bool {
    let needle = format!("--{flag}");
    help.match_indices(&needle).any(|(i, _)| {
        help[i + needle.len()..]
            .chars()
            .next()
            .is_none_or(|c| !(c.is_ascii_alphanumeric() || c == '-'))
    })
}

fn run(bin: &Path, args: &[String]) -> (bool, String) {
    let out = Command::new(bin)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", bin.display()));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

#[test]
fn rendered_flags_exist_in_the_bundle_binaries() {
    let Some(dir) = bundle_dir() else {
        eprintln!("CLUSTERCTL_BUNDLE_DIR is not set: the bundle flag check did not run");
        return;
    };
    let c = cluster();
    let bin_dir = c.layout.bin_dir.clone();
    let mut checked: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    let mut failures = Vec::new();
    for node in ["cp-1", "w-1"] {
        let files = render_node(&c, node).unwrap_or_else(|e| panic!("render {node}: {e}"));
        for (name, args) in commands(&files, &bin_dir) {
            let bin = dir.join("bin").join(&name);
            assert!(
                bin.is_file(),
                "{} is missing: CLUSTERCTL_BUNDLE_DIR must point at a built bundle",
                bin.display()
            );
            let (ok, help) = run(&bin, &["--help".to_owned()]);
            assert!(ok, "{name} --help failed:\n{help}");
            for arg in &args {
                let flag = flag_name(arg);
                if !help_mentions(&help, flag) {
                    failures.push(format!("{name}: --{flag} is not in `{name} --help`"));
                }
                checked
                    .entry(name.clone())
                    .or_default()
                    .insert(flag.to_owned());
            }
            let mut with_help = args.clone();
            with_help.push("--help".to_owned());
            let (ok, text) = run(&bin, &with_help);
            if !ok || text.contains("unknown flag") || text.contains("not defined") {
                failures.push(format!(
                    "{name} on {node}: the rendered command line does not parse:\n{}",
                    text.lines().take(5).collect::<Vec<_>>().join("\n")
                ));
            }
        }
    }
    for binary in [
        "etcd",
        "kube-apiserver",
        "kube-controller-manager",
        "kube-scheduler",
        "kubelet",
        "kube-proxy",
    ] {
        assert!(checked.contains_key(binary), "no unit runs {binary}");
    }
    let total: usize = checked.values().map(BTreeSet::len).sum();
    eprintln!(
        "checked {total} distinct flags of {} binaries",
        checked.len()
    );
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn bundle_version_is_supported_and_kube_proxy_accepts_its_config() {
    let Some(dir) = bundle_dir() else {
        eprintln!("CLUSTERCTL_BUNDLE_DIR is not set: the bundle config check did not run");
        return;
    };
    for name in ["kube-apiserver", "kubelet", "kube-proxy"] {
        let bin = dir.join("bin").join(name);
        assert!(bin.is_file(), "{} is missing", bin.display());
        let (ok, out) = run(&bin, &["--version".to_owned()]);
        assert!(ok, "{name} --version failed:\n{out}");
        // "Kubernetes v1.20.2"
        let version = out
            .split_whitespace()
            .find(|w| w.starts_with('v'))
            .unwrap_or_else(|| panic!("no version in {out:?}"));
        check_version(version).unwrap_or_else(|e| panic!("{name}: {e}"));
    }

    let c = cluster();
    let files = render_node(&c, "w-1").expect("render");
    let config = files
        .files
        .iter()
        .find(|f| f.path.ends_with("/kube-proxy-config.yaml"))
        .expect("kube-proxy config");
    let tmp = tempfile::tempdir().expect("tempdir");
    let input = tmp.path().join("kube-proxy-config.yaml");
    let output = tmp.path().join("written.yaml");
    std::fs::write(&input, &config.contents).expect("write config");
    let (ok, text) = run(
        &dir.join("bin/kube-proxy"),
        &[
            format!("--config={}", input.display()),
            format!("--write-config-to={}", output.display()),
        ],
    );
    assert!(ok, "kube-proxy refused the rendered config:\n{text}");
    assert!(
        !text.contains("lenient"),
        "kube-proxy needed lenient decoding (unknown or misspelled field):\n{text}"
    );
    let written = std::fs::read_to_string(&output).expect("kube-proxy wrote its config");
    for needle in [
        "mode: iptables",
        "clusterCIDR: 10.244.0.0/16",
        "hostnameOverride: w-1",
    ] {
        assert!(
            written.contains(needle),
            "missing {needle:?} in:\n{written}"
        );
    }
}
