//! Kubeconfig merge and removal on real files; with `CLUSTERCTL_BUNDLE_DIR` set, the merged file
//! is also read by the bundle's real `kubectl`.

use std::collections::BTreeMap;
use std::process::Command;
use std::sync::{Arc, Barrier};

use super::*;
use crate::pki::{NodeIdentity, Pki, PkiSpec};
use crate::state::{KubernetesStatus, Timestamp, WaitMode};

fn mode_of(p: &Path) -> u32 {
    fs::metadata(p).map(|m| m.mode() & 0o7777).unwrap_or(0)
}

fn entry(name: &str, server: &str) -> Entry {
    let (context, cluster, user) = names_for(name);
    Entry {
        context,
        cluster,
        user,
        server: server.to_owned(),
        ca_pem: format!("-----BEGIN CERTIFICATE-----\nCA-{name}\n-----END CERTIFICATE-----\n"),
        credential: Credential::ClientCertificate {
            cert_pem: format!(
                "-----BEGIN CERTIFICATE-----\nCERT-{name}\n-----END CERTIFICATE-----\n"
            ),
            key_pem: Zeroizing::new(format!(
                "-----BEGIN PRIVATE KEY-----\nKEY-{name}\n-----END PRIVATE KEY-----\n"
            )),
        },
    }
}

fn cert_of(e: &Entry) -> String {
    match &e.credential {
        Credential::ClientCertificate { cert_pem, .. } => cert_pem.clone(),
        Credential::Token { .. } | Credential::Exec { .. } => String::new(),
    }
}

fn key_of(e: &Entry) -> String {
    match &e.credential {
        Credential::ClientCertificate { key_pem, .. } => key_pem.to_string(),
        Credential::Token { .. } | Credential::Exec { .. } => String::new(),
    }
}

fn parse_file(p: &Path) -> Node {
    let text = fs::read_to_string(p).unwrap_or_else(|e| panic!("read {}: {e}", p.display()));
    yaml::parse(&text).unwrap_or_else(|e| panic!("{} does not parse: {e:?}\n{text}", p.display()))
}

fn names(node: &Node, list: &str) -> Vec<String> {
    match node.get(list) {
        Some(Node::Seq(items)) => items
            .iter()
            .map(|i| item_name(i).unwrap_or("<none>").to_owned())
            .collect(),
        _ => Vec::new(),
    }
}

fn item<'a>(node: &'a Node, list: &str, name: &str) -> &'a Node {
    match node.get(list) {
        Some(Node::Seq(items)) => items
            .iter()
            .find(|i| item_name(i) == Some(name))
            .unwrap_or_else(|| panic!("no {list} entry {name:?}")),
        _ => panic!("no {list} list"),
    }
}

fn field<'a>(node: &'a Node, path: &[&str]) -> Option<&'a str> {
    let mut n = node;
    for key in path {
        n = n.get(key)?;
    }
    n.as_str()
}

fn decoded(b64: Option<&str>) -> String {
    let bytes = STANDARD
        .decode(b64.unwrap_or_default())
        .unwrap_or_else(|e| panic!("not base64: {e}"));
    String::from_utf8(bytes).unwrap_or_else(|e| panic!("not UTF-8: {e}"))
}

/// Removes our three entries (and resets nothing else), to compare the rest with the original.
fn without_ours(node: &Node, name: &str) -> Node {
    let (context, cluster, user) = names_for(name);
    let Node::Map(top) = node else {
        panic!("not a mapping")
    };
    Node::Map(
        top.iter()
            .map(|(k, v)| {
                let ours = match k.as_str() {
                    "clusters" => Some(&cluster),
                    "users" => Some(&user),
                    "contexts" => Some(&context),
                    _ => None,
                };
                let v = match (ours, v) {
                    (Some(n), Node::Seq(items)) => Node::Seq(
                        items
                            .iter()
                            .filter(|i| item_name(i) != Some(n.as_str()))
                            .cloned()
                            .collect(),
                    ),
                    _ => v.clone(),
                };
                (k.clone(), v)
            })
            .collect(),
    )
}

/// A kubeconfig as people have them: other clusters with file references, an exec user, extra
/// fields, unknown top-level keys, comments, YAML 1.1 booleans and quoted numbers-as-strings.
const OTHERS: &str = r#"# my clusters
apiVersion: v1
kind: Config
preferences:
  colors: true
clusters:
- cluster:
    certificate-authority: /home/u/.minikube/ca.crt
    server: https://192.168.49.2:8443
    extensions:
    - extension:
        last-update: Mon, 01 Jan 2024 10:00:00 UTC
        provider: minikube.sigs.k8s.io
        version: "v1.32.0"
      name: cluster_info
  name: minikube
- cluster:
    insecure-skip-tls-verify: yes
    server: "https://10.0.0.1:6443"
    proxy-url: socks5://localhost:1080
  name: lab
contexts:
- context:
    cluster: minikube
    namespace: default
    user: minikube
  name: minikube
- context: {cluster: lab, user: lab-admin}
  name: lab
current-context: minikube
users:
- name: minikube
  user:
    client-certificate: /home/u/.minikube/profiles/minikube/client.crt
    client-key: /home/u/.minikube/profiles/minikube/client.key
- name: lab-admin
  user:
    exec:
      apiVersion: client.authentication.k8s.io/v1beta1
      command: gke-gcloud-auth-plugin
      args: ["--flag", "on", "0755", '', "y"]
      env: null
      interactiveMode: IfAvailable
      provideClusterInfo: true
x-tool-settings:
  retries: 3
  ratio: 0.5
  tags: [a, "b c", 'yes']
  nested: {deep: [{k: v}]}
"#;

#[test]
fn merge_into_a_missing_file_makes_a_private_kubeconfig_and_directory() {
    let tmp = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let path = tmp.path().join("home/.kube/config");
    let out = merge(&path, &entry("demo", "https://10.77.0.11:6443"), true)
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(
        out.created && out.changed && out.current && !out.replaced,
        "{out:?}"
    );
    assert_eq!(out.path, path);
    assert_eq!(out.context, "clusterctl-demo");
    assert_eq!(mode_of(&path), 0o600);
    assert_eq!(mode_of(&tmp.path().join("home/.kube")), 0o700);
    let node = parse_file(&path);
    assert_eq!(node.get("apiVersion").and_then(Node::as_str), Some("v1"));
    assert_eq!(node.get("kind").and_then(Node::as_str), Some("Config"));
    assert_eq!(
        node.get("current-context").and_then(Node::as_str),
        Some("clusterctl-demo")
    );
    assert_eq!(names(&node, "clusters"), ["clusterctl-demo"]);
    assert_eq!(names(&node, "users"), ["clusterctl-demo-admin"]);
    assert_eq!(names(&node, "contexts"), ["clusterctl-demo"]);
    let cluster = item(&node, "clusters", "clusterctl-demo");
    assert_eq!(
        field(cluster, &["cluster", "server"]),
        Some("https://10.77.0.11:6443")
    );
    assert_eq!(
        decoded(field(cluster, &["cluster", "certificate-authority-data"])),
        entry("demo", "").ca_pem
    );
    let user = item(&node, "users", "clusterctl-demo-admin");
    assert_eq!(
        decoded(field(user, &["user", "client-certificate-data"])),
        cert_of(&entry("demo", ""))
    );
    assert_eq!(
        decoded(field(user, &["user", "client-key-data"])),
        key_of(&entry("demo", ""))
    );
    let context = item(&node, "contexts", "clusterctl-demo");
    assert_eq!(
        field(context, &["context", "cluster"]),
        Some("clusterctl-demo")
    );
    assert_eq!(
        field(context, &["context", "user"]),
        Some("clusterctl-demo-admin")
    );
    // Only the kubeconfig is left: no lock file, no temporary file.
    let left: Vec<_> = fs::read_dir(tmp.path().join("home/.kube"))
        .unwrap_or_else(|e| panic!("{e}"))
        .filter_map(|e| e.ok().map(|e| e.file_name()))
        .collect();
    assert_eq!(left, [OsString::from("config")]);
}

#[test]
fn a_new_file_looks_like_one_kubectl_writes() {
    let tmp = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let path = tmp.path().join("config");
    let e = entry("demo", "https://10.77.0.11:6443");
    merge(&path, &e, true).unwrap_or_else(|e| panic!("{e}"));
    let want = format!(
        "apiVersion: v1\n\
         clusters:\n\
         - cluster:\n    \
             certificate-authority-data: {ca}\n    \
             server: https://10.77.0.11:6443\n  \
           name: clusterctl-demo\n\
         contexts:\n\
         - context:\n    \
             cluster: clusterctl-demo\n    \
             user: clusterctl-demo-admin\n  \
           name: clusterctl-demo\n\
         current-context: clusterctl-demo\n\
         kind: Config\n\
         preferences: {{}}\n\
         users:\n\
         - name: clusterctl-demo-admin\n  \
           user:\n    \
             client-certificate-data: {cert}\n    \
             client-key-data: {key}\n",
        ca = STANDARD.encode(&e.ca_pem),
        cert = STANDARD.encode(cert_of(&e)),
        key = STANDARD.encode(key_of(&e).as_bytes()),
    );
    assert_eq!(fs::read_to_string(&path).unwrap_or_default(), want);
}

#[test]
fn merge_keeps_every_other_entry_field_and_key_by_value_and_order() {
    let tmp = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let path = tmp.path().join("config");
    fs::write(&path, OTHERS).unwrap_or_else(|e| panic!("{e}"));
    fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).unwrap_or_else(|e| panic!("{e}"));
    let before = parse_file(&path);

    let out = merge(&path, &entry("demo", "https://10.77.0.11:6443"), false)
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(
        !out.created && out.changed && !out.current && !out.replaced,
        "{out:?}"
    );
    assert_eq!(mode_of(&path), 0o600, "the file holds a key now");
    let after = parse_file(&path);
    assert_eq!(
        without_ours(&after, "demo"),
        before,
        "everything else is kept by value"
    );
    assert_eq!(
        names(&after, "clusters"),
        ["minikube", "lab", "clusterctl-demo"]
    );
    assert_eq!(
        names(&after, "contexts"),
        ["minikube", "lab", "clusterctl-demo"]
    );
    assert_eq!(
        names(&after, "users"),
        ["minikube", "lab-admin", "clusterctl-demo-admin"]
    );
    assert_eq!(
        after.get("current-context").and_then(Node::as_str),
        Some("minikube")
    );
    // Spot checks of values a careless writer would change.
    let lab = item(&after, "clusters", "lab");
    assert_eq!(
        lab.get("cluster")
            .and_then(|c| c.get("insecure-skip-tls-verify")),
        Some(&Node::Bool(true))
    );
    let exec = item(&after, "users", "lab-admin");
    assert_eq!(
        exec.get("user")
            .and_then(|u| u.get("exec"))
            .and_then(|e| e.get("args")),
        Some(&Node::Seq(vec![
            Node::Str("--flag".into()),
            Node::Str("on".into()),
            Node::Str("0755".into()),
            Node::Str(String::new()),
            Node::Str("y".into()),
        ]))
    );
    let text = fs::read_to_string(&path).unwrap_or_else(|e| panic!("{e}"));
    assert!(
        text.starts_with("apiVersion: v1\nkind: Config\npreferences:\n"),
        "{text}"
    );

    // Now make it current: only current-context changes besides.
    let out = merge(&path, &entry("demo", "https://10.77.0.11:6443"), true)
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(out.changed && out.current && out.replaced, "{out:?}");
    let current = parse_file(&path);
    assert_eq!(
        current.get("current-context").and_then(Node::as_str),
        Some("clusterctl-demo")
    );
}

#[test]
fn re_merge_replaces_in_place_and_an_unchanged_merge_does_not_rewrite() {
    let tmp = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let path = tmp.path().join("config");
    fs::write(&path, OTHERS).unwrap_or_else(|e| panic!("{e}"));
    merge(&path, &entry("demo", "https://10.77.0.11:6443"), true).unwrap_or_else(|e| panic!("{e}"));
    merge(&path, &entry("other", "https://10.77.1.11:6443"), false)
        .unwrap_or_else(|e| panic!("{e}"));
    // The user picks a namespace for our context; a re-merge keeps it.
    let text = fs::read_to_string(&path).unwrap_or_else(|e| panic!("{e}"));
    let text = text.replacen(
        "    user: clusterctl-demo-admin\n  name: clusterctl-demo\n",
        "    namespace: team-a\n    user: clusterctl-demo-admin\n  name: clusterctl-demo\n",
        1,
    );
    assert!(text.contains("namespace: team-a"), "layout changed: {text}");
    fs::write(&path, &text).unwrap_or_else(|e| panic!("{e}"));

    let mut changed = entry("demo", "https://10.77.0.99:6443");
    changed.credential = Credential::ClientCertificate {
        cert_pem: cert_of(&changed),
        key_pem: Zeroizing::new(
            "-----BEGIN PRIVATE KEY-----\nNEW\n-----END PRIVATE KEY-----\n".into(),
        ),
    };
    let out = merge(&path, &changed, true).unwrap_or_else(|e| panic!("{e}"));
    assert!(out.replaced && out.changed && out.current, "{out:?}");
    let node = parse_file(&path);
    assert_eq!(
        names(&node, "clusters"),
        ["minikube", "lab", "clusterctl-demo", "clusterctl-other"],
        "replaced in place, no duplicate"
    );
    assert_eq!(
        names(&node, "users"),
        [
            "minikube",
            "lab-admin",
            "clusterctl-demo-admin",
            "clusterctl-other-admin"
        ]
    );
    assert_eq!(
        names(&node, "contexts"),
        ["minikube", "lab", "clusterctl-demo", "clusterctl-other"]
    );
    let cluster = item(&node, "clusters", "clusterctl-demo");
    assert_eq!(
        field(cluster, &["cluster", "server"]),
        Some("https://10.77.0.99:6443")
    );
    let user = item(&node, "users", "clusterctl-demo-admin");
    assert!(decoded(field(user, &["user", "client-key-data"])).contains("NEW"));
    let context = item(&node, "contexts", "clusterctl-demo");
    assert_eq!(field(context, &["context", "namespace"]), Some("team-a"));

    // The same entry again: nothing to change, the file is not rewritten (comments survive).
    let with_comment = format!(
        "# kept\n{}",
        fs::read_to_string(&path).unwrap_or_else(|e| panic!("{e}"))
    );
    fs::write(&path, &with_comment).unwrap_or_else(|e| panic!("{e}"));
    let out = merge(&path, &changed, true).unwrap_or_else(|e| panic!("{e}"));
    assert!(!out.changed && out.replaced && out.current, "{out:?}");
    assert_eq!(fs::read_to_string(&path).unwrap_or_default(), with_comment);
}

#[test]
fn duplicate_entries_of_our_names_collapse_into_one() {
    let tmp = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let path = tmp.path().join("config");
    fs::write(
        &path,
        "clusters:\n- name: clusterctl-demo\n  cluster: {server: a}\n- name: x\n  cluster: {server: x}\n- name: clusterctl-demo\n  cluster: {server: b}\n",
    )
    .unwrap_or_else(|e| panic!("{e}"));
    merge(&path, &entry("demo", "https://s:6443"), false).unwrap_or_else(|e| panic!("{e}"));
    let node = parse_file(&path);
    assert_eq!(names(&node, "clusters"), ["clusterctl-demo", "x"]);
    assert_eq!(names(&node, "users"), ["clusterctl-demo-admin"]);
}

#[test]
fn empty_and_null_files_and_lists_count_as_empty() {
    let tmp = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    for (i, text) in [
        "",
        "# nothing yet\n",
        "null\n",
        "clusters: null\nusers: ~\ncontexts:\n",
    ]
    .iter()
    .enumerate()
    {
        let path = tmp.path().join(format!("config-{i}"));
        fs::write(&path, text).unwrap_or_else(|e| panic!("{e}"));
        let out = merge(&path, &entry("demo", "https://s:6443"), true)
            .unwrap_or_else(|e| panic!("{text:?}: {e}"));
        assert!(!out.created && out.changed, "{text:?}: {out:?}");
        let node = parse_file(&path);
        assert_eq!(names(&node, "contexts"), ["clusterctl-demo"], "{text:?}");
    }
}

#[test]
fn remove_takes_out_only_our_entries_and_clears_our_current_context() {
    let tmp = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let path = tmp.path().join("config");
    fs::write(&path, OTHERS).unwrap_or_else(|e| panic!("{e}"));
    let original = parse_file(&path);
    merge(&path, &entry("demo", "https://10.77.0.11:6443"), true).unwrap_or_else(|e| panic!("{e}"));
    merge(&path, &entry("keep", "https://10.77.1.11:6443"), false)
        .unwrap_or_else(|e| panic!("{e}"));
    let with_both = parse_file(&path);

    assert!(remove(&path, "demo").unwrap_or_else(|e| panic!("{e}")));
    let node = parse_file(&path);
    assert_eq!(
        names(&node, "clusters"),
        ["minikube", "lab", "clusterctl-keep"]
    );
    assert_eq!(
        names(&node, "users"),
        ["minikube", "lab-admin", "clusterctl-keep-admin"]
    );
    assert_eq!(
        names(&node, "contexts"),
        ["minikube", "lab", "clusterctl-keep"]
    );
    assert_eq!(node.get("current-context").and_then(Node::as_str), Some(""));
    assert_eq!(
        without_ours(&node, "keep"),
        without_ours(&without_ours(&with_both, "keep"), "demo")
            .pipe_set("current-context", Node::Str(String::new()))
    );
    assert_eq!(mode_of(&path), 0o600);
    // Nothing left to remove: the file is not rewritten.
    let text = format!("# kept\n{}", fs::read_to_string(&path).unwrap_or_default());
    fs::write(&path, &text).unwrap_or_else(|e| panic!("{e}"));
    assert!(!remove(&path, "demo").unwrap_or_else(|e| panic!("{e}")));
    assert_eq!(fs::read_to_string(&path).unwrap_or_default(), text);

    // Removing a cluster that is not current leaves current-context alone.
    fs::write(&path, OTHERS).unwrap_or_else(|e| panic!("{e}"));
    merge(&path, &entry("keep", "https://10.77.1.11:6443"), false)
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(remove(&path, "keep").unwrap_or_else(|e| panic!("{e}")));
    assert_eq!(parse_file(&path), original);

    // A missing file has nothing to remove, and is not created.
    let missing = tmp.path().join("nope/config");
    assert!(!remove(&missing, "demo").unwrap_or_else(|e| panic!("{e}")));
    assert!(!missing.exists() && !tmp.path().join("nope").exists());
}

trait PipeSet {
    fn pipe_set(self, key: &str, value: Node) -> Node;
}

impl PipeSet for Node {
    fn pipe_set(mut self, key: &str, value: Node) -> Node {
        if let Node::Map(top) = &mut self {
            set_key(top, key, value);
        }
        self
    }
}

#[test]
fn files_that_are_not_kubeconfigs_are_refused_and_left_alone() {
    let tmp = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let cases: &[(&str, &[u8], &[&str])] = &[
        (
            "syntax",
            b"clusters:\n- name: a\n  cluster:\n    server: x\n   bad: [\n",
            &["not valid YAML", "at line"],
        ),
        (
            "tab",
            b"clusters:\n\t- name: a\n",
            &["not valid YAML", "at line"],
        ),
        (
            "list",
            b"- a\n- b\n",
            &["the top level is a list, not a mapping"],
        ),
        (
            "scalar",
            b"hello\n",
            &["the top level is a string, not a mapping"],
        ),
        (
            "kind",
            b"apiVersion: v1\nkind: Pod\nmetadata: {name: x}\n",
            &["`kind` is \"Pod\", not \"Config\""],
        ),
        (
            "version",
            b"apiVersion: v2\nkind: Config\n",
            &["`apiVersion` is \"v2\""],
        ),
        (
            "clusters-map",
            b"clusters:\n  a: {server: x}\n",
            &["`clusters` is a mapping, not a list"],
        ),
        (
            "users-string",
            b"users: nobody\n",
            &["`users` is a string, not a list"],
        ),
        (
            "item",
            b"contexts:\n- just-a-name\n",
            &["`contexts[0]` is a string, not a mapping"],
        ),
        (
            "name",
            b"clusters:\n- name: [a]\n  cluster: {}\n",
            &["`clusters[0].name` is a list, not a string"],
        ),
        ("binary", b"\xff\xfe\x00junk", &["not UTF-8"]),
    ];
    for (name, content, wants) in cases {
        let path = tmp.path().join(name);
        fs::write(&path, content).unwrap_or_else(|e| panic!("{e}"));
        for result in [
            merge(&path, &entry("demo", "https://s:6443"), true).map(|_| ()),
            remove(&path, "demo").map(|_| ()),
        ] {
            let err = match result {
                Err(e) => e.to_string(),
                Ok(()) => panic!("{name}: accepted"),
            };
            assert!(err.contains(&path.display().to_string()), "{name}: {err}");
            assert!(
                err.contains("move it aside"),
                "{name}: says what to do: {err}"
            );
            for want in *wants {
                assert!(err.contains(want), "{name}: {err:?} lacks {want:?}");
            }
            assert_eq!(
                fs::read(&path).unwrap_or_default(),
                *content,
                "{name}: file untouched"
            );
            assert!(!lock_path_for(&path).exists(), "{name}: lock file removed");
        }
    }
    // A directory where the file should be.
    let dir = tmp.path().join("dir");
    fs::create_dir(&dir).unwrap_or_else(|e| panic!("{e}"));
    let err = merge(&dir, &entry("demo", "https://s:6443"), true)
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    assert!(err.contains("it is a directory"), "{err}");
}

#[test]
fn parse_errors_never_quote_the_file() {
    let tmp = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let path = tmp.path().join("config");
    fs::write(
        &path,
        "users:\n- name: a\n  user:\n    client-key-data: TOPSECRETKEYMATERIAL\n    token: [TOPSECRETTOKEN\n",
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let err = merge(&path, &entry("demo", "https://s:6443"), true)
        .err()
        .map(|e| format!("{e:?} {e}"))
        .unwrap_or_default();
    assert!(err.contains("not valid YAML"), "{err}");
    assert!(!err.contains("TOPSECRET"), "{err}");
}

#[test]
fn a_symlinked_kubeconfig_keeps_its_link_and_the_target_is_replaced() {
    let tmp = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let target = tmp.path().join("dotfiles/kubeconfig");
    fs::create_dir_all(target.parent().unwrap_or(tmp.path())).unwrap_or_else(|e| panic!("{e}"));
    fs::write(&target, OTHERS).unwrap_or_else(|e| panic!("{e}"));
    let link = tmp.path().join("config");
    std::os::unix::fs::symlink(&target, &link).unwrap_or_else(|e| panic!("{e}"));
    let out =
        merge(&link, &entry("demo", "https://s:6443"), true).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(out.path, fs::canonicalize(&target).unwrap_or_default());
    assert!(
        fs::symlink_metadata(&link)
            .map(|m| m.file_type().is_symlink())
            .unwrap_or(false)
    );
    assert_eq!(
        names(&parse_file(&target), "contexts"),
        ["minikube", "lab", "clusterctl-demo"]
    );
    assert!(remove(&link, "demo").unwrap_or_else(|e| panic!("{e}")));
    assert_eq!(names(&parse_file(&target), "contexts"), ["minikube", "lab"]);
}

#[test]
fn a_foreign_lock_file_is_waited_for_then_reported_and_never_removed() {
    let tmp = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let path = tmp.path().join("config");
    fs::write(&path, OTHERS).unwrap_or_else(|e| panic!("{e}"));
    let lock = lock_path_for(&path);
    // kubectl's lock file: empty, no flock.
    fs::write(&lock, "").unwrap_or_else(|e| panic!("{e}"));
    let started = Instant::now();
    let err = merge(&path, &entry("demo", "https://s:6443"), true)
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    assert!(started.elapsed() >= LOCK_TIMEOUT, "waited for the holder");
    assert!(
        err.contains("is locked") && err.contains("kubectl or another program"),
        "{err}"
    );
    assert!(err.contains(&format!("remove {}", lock.display())), "{err}");
    assert!(lock.exists(), "a lock file clusterctl did not make stays");
    assert_eq!(fs::read_to_string(&path).unwrap_or_default(), OTHERS);

    // A lock file left by a clusterctl that died: reported at once, still not removed.
    fs::write(&lock, format!("{LOCK_MARKER}4000000\n")).unwrap_or_else(|e| panic!("{e}"));
    let started = Instant::now();
    let err = remove(&path, "demo")
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    assert!(
        started.elapsed() < LOCK_TIMEOUT,
        "a dead holder is not waited for"
    );
    assert!(
        err.contains("left by clusterctl pid 4000000, which is no longer running"),
        "{err}"
    );
    assert!(lock.exists());

    // Once it is gone, merging works and cleans up after itself.
    fs::remove_file(&lock).unwrap_or_else(|e| panic!("{e}"));
    merge(&path, &entry("demo", "https://s:6443"), true).unwrap_or_else(|e| panic!("{e}"));
    assert!(!lock.exists());
}

#[test]
fn a_live_holder_is_waited_for() {
    let tmp = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let path = tmp.path().join("config");
    let held = LockFile::acquire(&path).unwrap_or_else(|e| panic!("{e}"));
    let lock = lock_path_for(&path);
    assert!(
        fs::read_to_string(&lock)
            .unwrap_or_default()
            .starts_with(LOCK_MARKER),
        "the holder says who it is"
    );
    let p = path.clone();
    let waiter = std::thread::spawn(move || merge(&p, &entry("demo", "https://s:6443"), true));
    std::thread::sleep(Duration::from_millis(300));
    assert!(!path.exists(), "the merge waits for the lock");
    drop(held);
    let out = waiter
        .join()
        .unwrap_or_else(|_| panic!("merge thread panicked"))
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(out.created);
    assert!(!lock.exists());
}

#[test]
fn concurrent_merges_of_different_clusters_lose_nothing() {
    let tmp = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let path = tmp.path().join("config");
    fs::write(&path, OTHERS).unwrap_or_else(|e| panic!("{e}"));
    let n = 8;
    let barrier = Arc::new(Barrier::new(n));
    let threads: Vec<_> = (0..n)
        .map(|i| {
            let (p, b) = (path.clone(), barrier.clone());
            std::thread::spawn(move || {
                b.wait();
                merge(&p, &entry(&format!("c{i}"), "https://s:6443"), i == 0)
            })
        })
        .collect();
    for t in threads {
        t.join()
            .unwrap_or_else(|_| panic!("merge thread panicked"))
            .unwrap_or_else(|e| panic!("{e}"));
    }
    let node = parse_file(&path);
    let mut contexts = names(&node, "contexts");
    contexts.sort();
    let mut want: Vec<String> = (0..n).map(|i| format!("clusterctl-c{i}")).collect();
    want.extend(["lab".to_owned(), "minikube".to_owned()]);
    want.sort();
    assert_eq!(contexts, want);
}

#[test]
fn default_path_is_the_first_kubeconfig_entry_else_home() {
    let env = |pairs: &'static [(&'static str, &'static str)]| {
        move |k: &str| {
            pairs
                .iter()
                .find(|(n, _)| *n == k)
                .map(|(_, v)| OsString::from(v))
        }
    };
    static HOME: [(&str, &str); 1] = [("HOME", "/home/u")];
    assert_eq!(
        default_path_with(env(&[("KUBECONFIG", "/a/one:/b/two"), ("HOME", "/home/u")])).ok(),
        Some(PathBuf::from("/a/one"))
    );
    assert_eq!(
        default_path_with(env(&[("KUBECONFIG", "::/b/two"), ("HOME", "/home/u")])).ok(),
        Some(PathBuf::from("/b/two"))
    );
    assert_eq!(
        default_path_with(env(&[("KUBECONFIG", ""), ("HOME", "/home/u")])).ok(),
        Some(PathBuf::from("/home/u/.kube/config"))
    );
    assert_eq!(
        default_path_with(env(&HOME)).ok(),
        Some(PathBuf::from("/home/u/.kube/config"))
    );
    assert!(matches!(
        default_path_with(env(&[("HOME", "")])),
        Err(KubeconfigError::NoHome)
    ));
}

#[test]
fn entry_debug_never_shows_the_key() {
    let e = entry("demo", "https://s:6443");
    let shown = format!("{e:?}");
    assert!(
        shown.contains("clusterctl-demo") && !shown.contains("KEY-demo"),
        "{shown}"
    );
}

// --- admin credentials from the cluster's state ---------------------------------------------

fn sample_record(name: &str, kubernetes: bool) -> ClusterRecord {
    let text = format!(
        "apiVersion: clusterctl.io/v1alpha1\nkind: Cluster\nmetadata:\n  name: {name}\nspec:\n  provider:\n    fake:\n      directory: /tmp/fake\n  kubernetes:\n    channel: stable\n  ssh:\n    agent: true\n  nodePools:\n    - name: a\n      count: 1\n"
    );
    let spec = crate::spec::parse_str(&text, "sample.yaml").unwrap_or_else(|e| panic!("{e}"));
    let mut record = ClusterRecord::new(name, spec).unwrap_or_else(|e| panic!("{e}"));
    if kubernetes {
        record.kubernetes = Some(KubernetesStatus {
            version: "1.20.2".into(),
            api_server: "https://127.0.0.1:6443".into(),
            nodes: Vec::new(),
            checked_at: Timestamp::now(),
        });
    }
    record
}

fn pki_spec(name: &str) -> PkiSpec {
    PkiSpec {
        cluster_name: name.to_owned(),
        cluster_domain: "cluster.local".to_owned(),
        service_cidr: "10.96.0.0/12".parse().unwrap_or_else(|e| panic!("{e}")),
        control_plane: vec![NodeIdentity {
            name: format!("{name}-cp-1"),
            addresses: vec!["127.0.0.1".parse().unwrap_or_else(|e| panic!("{e}"))],
        }],
        workers: Vec::new(),
        extra_api_server_sans: Vec::new(),
    }
}

/// A store with cluster `name`'s record and a real PKI in its `pki` directory.
fn store_with_cluster(root: &Path, name: &str) -> (StateStore, ClusterRecord) {
    let store = StateStore::new(root);
    let guard = store
        .lock(name, WaitMode::FailFast, &mut |_| {})
        .unwrap_or_else(|e| panic!("{e}"));
    let mut record = sample_record(name, true);
    guard.save(&mut record).unwrap_or_else(|e| panic!("{e}"));
    Pki::ensure(&guard.dir().join(PKI_DIR), &pki_spec(name)).unwrap_or_else(|e| panic!("{e}"));
    (store, record)
}

#[test]
fn admin_context_comes_from_the_clusters_pki() {
    let tmp = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let (store, record) = store_with_cluster(&tmp.path().join("state"), "demo");
    let pki = store
        .cluster_dir("demo")
        .unwrap_or_else(|e| panic!("{e}"))
        .join(PKI_DIR);
    let path = tmp.path().join("kube/config");
    let out = write_admin_context(&store, &record, &path).unwrap_or_else(|e| panic!("{e}"));
    assert!(out.created && out.current, "{out:?}");
    let node = parse_file(&path);
    let user = item(&node, "users", "clusterctl-demo-admin");
    assert_eq!(
        decoded(field(user, &["user", "client-key-data"])),
        fs::read_to_string(pki.join("admin.key")).unwrap_or_default()
    );
    assert_eq!(
        decoded(field(user, &["user", "client-certificate-data"])),
        fs::read_to_string(pki.join("admin.crt")).unwrap_or_default()
    );
    let cluster = item(&node, "clusters", "clusterctl-demo");
    assert_eq!(
        decoded(field(cluster, &["cluster", "certificate-authority-data"])),
        fs::read_to_string(pki.join("ca.crt")).unwrap_or_default()
    );
    assert_eq!(
        field(cluster, &["cluster", "server"]),
        Some("https://127.0.0.1:6443")
    );
}

#[test]
fn admin_context_errors_say_what_is_missing_and_what_to_do() {
    let tmp = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let (store, record) = store_with_cluster(&tmp.path().join("state"), "demo");
    let pki = store
        .cluster_dir("demo")
        .unwrap_or_else(|e| panic!("{e}"))
        .join(PKI_DIR);
    let path = tmp.path().join("config");
    let err_of = |record: &ClusterRecord| {
        write_admin_context(&store, record, &path)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default()
    };

    let err = err_of(&sample_record("demo", false));
    assert!(
        err.contains("has no Kubernetes yet") && err.contains("clusterctl create -f"),
        "{err}"
    );

    // Key readable by others: refused like every secret of the store.
    fs::set_permissions(pki.join("admin.key"), fs::Permissions::from_mode(0o644))
        .unwrap_or_else(|e| panic!("{e}"));
    let err = err_of(&record);
    assert!(err.contains("chmod 600"), "{err}");
    fs::set_permissions(pki.join("admin.key"), fs::Permissions::from_mode(0o600))
        .unwrap_or_else(|e| panic!("{e}"));

    // A key that does not belong to the certificate.
    let admin_key = fs::read(pki.join("admin.key")).unwrap_or_default();
    fs::copy(pki.join("apiserver.key"), pki.join("admin.key")).unwrap_or_else(|e| panic!("{e}"));
    let err = err_of(&record);
    assert!(
        err.contains("admin.key") && err.contains("does not match"),
        "{err}"
    );
    fs::write(pki.join("admin.key"), &admin_key).unwrap_or_else(|e| panic!("{e}"));

    // A certificate from another CA.
    let ca_crt = fs::read(pki.join("ca.crt")).unwrap_or_default();
    fs::copy(pki.join("etcd/ca.crt"), pki.join("ca.crt")).unwrap_or_else(|e| panic!("{e}"));
    let err = err_of(&record);
    assert!(
        err.contains("admin.crt") && err.contains("is not signed by"),
        "{err}"
    );
    fs::write(pki.join("ca.crt"), &ca_crt).unwrap_or_else(|e| panic!("{e}"));

    // Something that is not a certificate.
    let admin_crt = fs::read(pki.join("admin.crt")).unwrap_or_default();
    fs::write(pki.join("admin.crt"), b"not a certificate").unwrap_or_else(|e| panic!("{e}"));
    let err = err_of(&record);
    assert!(
        err.contains("admin.crt") && err.contains("not a PEM certificate"),
        "{err}"
    );
    fs::write(pki.join("admin.crt"), &admin_crt).unwrap_or_else(|e| panic!("{e}"));

    // Missing files.
    for file in ["ca.crt", "admin.crt", "admin.key"] {
        let saved = fs::read(pki.join(file)).unwrap_or_default();
        fs::remove_file(pki.join(file)).unwrap_or_else(|e| panic!("{e}"));
        let err = err_of(&record);
        assert!(
            err.contains(file)
                && err.contains("is missing")
                && err.contains("clusterctl create -f"),
            "{err}"
        );
        fs::write(pki.join(file), &saved).unwrap_or_else(|e| panic!("{e}"));
        fs::set_permissions(pki.join(file), fs::Permissions::from_mode(0o600))
            .unwrap_or_else(|e| panic!("{e}"));
    }
    assert!(!path.exists(), "nothing is written on error");
    // Restored: it works again.
    write_admin_context(&store, &record, &path).unwrap_or_else(|e| panic!("{e}"));
}

/// The bundle's kubectl, when `CLUSTERCTL_BUNDLE_DIR` selects the bundle tests.
fn bundle_kubectl() -> Option<PathBuf> {
    let dir = PathBuf::from(std::env::var_os("CLUSTERCTL_BUNDLE_DIR")?);
    let kubectl = dir.join("bin/kubectl");
    assert!(
        kubectl.is_file(),
        "{} is missing: CLUSTERCTL_BUNDLE_DIR must point at a built bundle",
        kubectl.display()
    );
    Some(kubectl)
}

fn kubectl(bin: &Path, file: &Path, args: &[&str]) -> String {
    let out = Command::new(bin)
        .arg("--kubeconfig")
        .arg(file)
        .args(args)
        .env_remove("KUBECONFIG")
        .output()
        .unwrap_or_else(|e| panic!("run {}: {e}", bin.display()));
    assert!(
        out.status.success(),
        "kubectl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn the_bundles_kubectl_reads_the_merged_file() {
    let Some(bin) = bundle_kubectl() else {
        eprintln!(
            "CLUSTERCTL_BUNDLE_DIR is not set: the kubectl check of the merged kubeconfig did not run"
        );
        return;
    };
    let tmp = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let (store, record) = store_with_cluster(&tmp.path().join("state"), "demo");
    let pki = store
        .cluster_dir("demo")
        .unwrap_or_else(|e| panic!("{e}"))
        .join(PKI_DIR);
    let path = tmp.path().join("config");
    // kubectl refuses file references that do not exist only when connecting, not in `config`.
    fs::write(&path, OTHERS).unwrap_or_else(|e| panic!("{e}"));
    write_admin_context(&store, &record, &path).unwrap_or_else(|e| panic!("{e}"));

    let view: serde_json::Value = serde_json::from_str(&kubectl(
        &bin,
        &path,
        &["config", "view", "--raw", "-o", "json"],
    ))
    .unwrap_or_else(|e| panic!("kubectl json: {e}"));
    assert_eq!(view["current-context"], "clusterctl-demo");
    let by_name = |list: &str| -> BTreeMap<String, serde_json::Value> {
        view[list]
            .as_array()
            .unwrap_or_else(|| panic!("{list} is not a list"))
            .iter()
            .map(|i| (i["name"].as_str().unwrap_or_default().to_owned(), i.clone()))
            .collect()
    };
    let clusters = by_name("clusters");
    let users = by_name("users");
    let contexts = by_name("contexts");
    assert_eq!(
        clusters.keys().collect::<Vec<_>>(),
        ["clusterctl-demo", "lab", "minikube"]
    );
    assert_eq!(
        clusters["clusterctl-demo"]["cluster"]["server"],
        "https://127.0.0.1:6443"
    );
    assert_eq!(clusters["lab"]["cluster"]["insecure-skip-tls-verify"], true);
    assert_eq!(
        clusters["lab"]["cluster"]["proxy-url"],
        "socks5://localhost:1080"
    );
    let key = users["clusterctl-demo-admin"]["user"]["client-key-data"]
        .as_str()
        .unwrap_or_default();
    assert_eq!(
        decoded(Some(key)),
        fs::read_to_string(pki.join("admin.key")).unwrap_or_default()
    );
    assert_eq!(
        users["lab-admin"]["user"]["exec"]["args"],
        serde_json::json!(["--flag", "on", "0755", "", "y"])
    );
    assert_eq!(
        contexts["clusterctl-demo"]["context"]["user"],
        "clusterctl-demo-admin"
    );
    assert_eq!(contexts["lab"]["context"]["cluster"], "lab");

    let listed = kubectl(&bin, &path, &["config", "get-contexts", "-o", "name"]);
    let mut listed: Vec<&str> = listed.lines().collect();
    listed.sort();
    assert_eq!(listed, ["clusterctl-demo", "lab", "minikube"]);
    assert_eq!(
        kubectl(&bin, &path, &["config", "current-context"]).trim(),
        "clusterctl-demo"
    );

    assert!(remove(&path, "demo").unwrap_or_else(|e| panic!("{e}")));
    let listed = kubectl(&bin, &path, &["config", "get-contexts", "-o", "name"]);
    let mut listed: Vec<&str> = listed.lines().collect();
    listed.sort();
    assert_eq!(listed, ["lab", "minikube"]);
}

/// The arguments of the exec entry in the keyring credential test.
const EXEC_ARGS: [&str; 7] = [
    "auth",
    "token",
    "demo",
    "--user",
    "alice@example.com",
    "--cluster-id",
    "c0ffee",
];

/// A person's credential kept in the OS keyring: the user entry impersonates them and runs
/// `clusterctl auth token` through kubectl's exec plugin; no token is in the file. The bundle's
/// kubectl, when there is one, reads it back as such.
#[test]
fn a_keyring_credential_is_an_exec_plugin_with_no_token_in_the_file() {
    let tmp = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let path = tmp.path().join("alice.kubeconfig");
    let mut e = entry("demo", "https://10.77.0.11:6443");
    let (context, cluster, user) = names_for_user("demo", "alice@example.com");
    e.context = context;
    e.cluster = cluster;
    e.user = user.clone();
    e.credential = Credential::Exec {
        command: "/usr/local/bin/clusterctl".to_owned(),
        args: EXEC_ARGS.map(str::to_owned).to_vec(),
        impersonate: "alice@example.com".to_owned(),
    };
    merge(&path, &e, true).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(mode_of(&path), 0o600);
    let text = fs::read_to_string(&path).unwrap_or_else(|e| panic!("{e}"));
    assert!(!text.contains("token:"), "{text}");
    let doc = parse_file(&path);
    let u = item(&doc, "users", &user);
    assert_eq!(field(u, &["user", "as"]), Some("alice@example.com"));
    assert_eq!(
        field(u, &["user", "exec", "apiVersion"]),
        Some("client.authentication.k8s.io/v1beta1")
    );
    assert_eq!(
        field(u, &["user", "exec", "command"]),
        Some("/usr/local/bin/clusterctl")
    );
    let Some(bin) = bundle_kubectl() else {
        eprintln!(
            "CLUSTERCTL_BUNDLE_DIR is not set: the kubectl check of the exec entry did not run"
        );
        return;
    };
    let view: serde_json::Value = serde_json::from_str(&kubectl(
        &bin,
        &path,
        &["config", "view", "--raw", "-o", "json"],
    ))
    .unwrap_or_else(|e| panic!("kubectl json: {e}"));
    let user_doc = &view["users"][0]["user"];
    assert_eq!(user_doc["as"], "alice@example.com");
    assert_eq!(user_doc["exec"]["command"], "/usr/local/bin/clusterctl");
    assert_eq!(user_doc["exec"]["args"], serde_json::json!(EXEC_ARGS));
    assert_eq!(
        user_doc["exec"]["apiVersion"],
        "client.authentication.k8s.io/v1beta1"
    );
}
