//! `clusterctl get-credentials` and the kubeconfig part of `clusterctl delete`, driven through the
//! built binary on a cluster record with a real PKI (made by `clusterctl::pki::Pki::ensure`) and
//! a user kubeconfig that already holds another context. `HOME` points into the test's temporary
//! directory, so the user's own kubeconfig is never touched. With `CLUSTERCTL_BUNDLE_DIR` set,
//! the bundle's real `kubectl` reads the result too.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use anyhow::{Context, Result, ensure};
use base64::Engine as _;
use clusterctl::kubeconfig;
use clusterctl::pki::{NodeIdentity, Pki, PkiSpec};
use clusterctl::state::{
    ClusterRecord, ClusterStatus, KubernetesStatus, StateStore, Timestamp, WaitMode,
};
use serde_json::Value;

const BIN: &str = env!("CARGO_BIN_EXE_clusterctl");

/// The user's kubeconfig before clusterctl touches it: another cluster, reached with a token.
const OTHER: &str = "\
apiVersion: v1
kind: Config
clusters:
- name: prod
  cluster:
    server: https://203.0.113.10:6443
    insecure-skip-tls-verify: true
users:
- name: prod-user
  user:
    token: abc.def
contexts:
- name: prod
  context:
    cluster: prod
    user: prod-user
    namespace: web
current-context: prod
";

struct Bed {
    _tmp: tempfile::TempDir,
    root: PathBuf,
}

impl Bed {
    fn new() -> Result<Self> {
        let tmp = tempfile::tempdir()?;
        let root = tmp.path().to_path_buf();
        std::fs::create_dir_all(root.join("home"))?;
        Ok(Bed { _tmp: tmp, root })
    }

    /// Cluster "demo" and a `$KUBECONFIG` that holds [`OTHER`]; returns the kubeconfig's path.
    fn demo_with_other_kubeconfig(&self) -> Result<PathBuf> {
        self.cluster("demo", true)?;
        let path = self.kubeconfig();
        std::fs::create_dir_all(path.parent().context("no parent")?)?;
        std::fs::write(&path, OTHER)?;
        Ok(path)
    }

    fn state_dir(&self) -> PathBuf {
        self.root.join("state")
    }

    fn kubeconfig(&self) -> PathBuf {
        self.root.join("kube/config")
    }

    /// Writes the record of cluster `name` (with Kubernetes if `kubernetes`) and, with it, the
    /// cluster's real PKI in `<state>/<name>/pki`.
    fn cluster(&self, name: &str, kubernetes: bool) -> Result<()> {
        let text = format!(
            "apiVersion: clusterctl.io/v1alpha1\nkind: Cluster\nmetadata:\n  name: {name}\nspec:\n  provider:\n    fake:\n      directory: {}\n  kubernetes:\n    channel: stable\n  ssh:\n    agent: true\n  controlPlane:\n    count: 1\n    schedulable: true\n",
            self.root.join("fake").display()
        );
        let spec = clusterctl::spec::parse_str(&text, "cluster.yaml")
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        let store = StateStore::new(self.state_dir());
        let guard = store.lock(name, WaitMode::FailFast, &mut |_| {})?;
        let mut record = ClusterRecord::new(name, spec)?;
        if kubernetes {
            record.kubernetes = Some(KubernetesStatus {
                version: "1.20.2".into(),
                api_server: "https://127.0.0.1:6443".into(),
                nodes: Vec::new(),
                checked_at: Timestamp::now(),
            });
        }
        guard.save(&mut record)?;
        let pki_spec = PkiSpec {
            cluster_name: name.to_owned(),
            cluster_domain: "cluster.local".to_owned(),
            service_cidr: "10.96.0.0/12".parse()?,
            control_plane: vec![NodeIdentity {
                name: format!("{name}-cp-1"),
                addresses: vec!["127.0.0.1".parse()?],
            }],
            workers: Vec::new(),
            extra_api_server_sans: Vec::new(),
        };
        Pki::ensure(&guard.dir().join(kubeconfig::PKI_DIR), &pki_spec)?;
        Ok(())
    }

    fn pki_file(&self, name: &str, file: &str) -> PathBuf {
        self.state_dir()
            .join(name)
            .join(kubeconfig::PKI_DIR)
            .join(file)
    }

    fn run(&self, args: &[&str], kubeconfig_env: &str) -> Result<Output> {
        Ok(Command::new(BIN)
            .args(args)
            .current_dir(&self.root)
            .env("CLUSTERCTL_STATE_DIR", self.state_dir())
            .env("HOME", self.root.join("home"))
            .env("KUBECONFIG", kubeconfig_env)
            .env("CLUSTERCTL_FAKE_DELAY_MS", "0")
            .env_remove("XDG_STATE_HOME")
            .env_remove("CLUSTERCTL_FAKE_FAIL_ENSURE")
            .env_remove("CLUSTERCTL_LOG")
            .stdin(Stdio::null())
            .output()?)
    }
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// The kubeconfig as JSON (what kubectl itself turns it into).
fn read_config(path: &Path) -> Result<Value> {
    let text = std::fs::read_to_string(path).with_context(|| format!("read {}", path.display()))?;
    serde_saphyr::from_str(&text).with_context(|| format!("parse {}:\n{text}", path.display()))
}

fn by_name<'a>(config: &'a Value, list: &str, name: &str) -> Option<&'a Value> {
    config[list]
        .as_array()?
        .iter()
        .find(|item| item["name"] == name)
}

fn names(config: &Value, list: &str) -> Vec<String> {
    config[list]
        .as_array()
        .map(|items| {
            items
                .iter()
                .map(|i| i["name"].as_str().unwrap_or_default().to_owned())
                .collect()
        })
        .unwrap_or_default()
}

fn decode(v: &Value) -> Result<Vec<u8>> {
    Ok(base64::engine::general_purpose::STANDARD.decode(v.as_str().context("not a string")?)?)
}

fn bundle_kubectl() -> Option<PathBuf> {
    let dir = PathBuf::from(std::env::var_os("CLUSTERCTL_BUNDLE_DIR")?);
    Some(dir.join("bin/kubectl"))
}

fn kubectl(bin: &Path, file: &Path, args: &[&str]) -> Result<String> {
    let out = Command::new(bin)
        .arg("--kubeconfig")
        .arg(file)
        .args(args)
        .env_remove("KUBECONFIG")
        .output()
        .with_context(|| format!("run {}", bin.display()))?;
    ensure!(out.status.success(), "kubectl {args:?}: {}", stderr(&out));
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

#[test]
fn get_credentials_merges_beside_the_existing_context_and_remove_takes_it_out() -> Result<()> {
    let bed = Bed::new()?;
    bed.cluster("demo", true)?;
    let path = bed.kubeconfig();
    std::fs::create_dir_all(path.parent().context("no parent")?)?;
    std::fs::write(&path, OTHER)?;
    // Writes go to the first entry of a KUBECONFIG list; the second is never created.
    let second = bed.root.join("kube/second");
    let list = format!("{}:{}", path.display(), second.display());

    let out = bed.run(&["get-credentials", "demo"], &list)?;
    ensure!(
        out.status.success(),
        "get-credentials failed: {}",
        stderr(&out)
    );
    ensure!(
        stderr(&out).contains(&format!(
            "kubeconfig entry \"clusterctl-demo\" written to {} (current context)",
            path.display()
        )),
        "{}",
        stderr(&out)
    );
    ensure!(
        !second.exists(),
        "only the first KUBECONFIG entry is written"
    );
    let mode = std::fs::metadata(&path)?.permissions().mode() & 0o777;
    ensure!(mode == 0o600, "mode {mode:o}");

    let config = read_config(&path)?;
    ensure!(config["current-context"] == "clusterctl-demo", "{config}");
    ensure!(
        names(&config, "contexts") == ["prod", "clusterctl-demo"],
        "{config}"
    );
    ensure!(
        names(&config, "clusters") == ["prod", "clusterctl-demo"],
        "{config}"
    );
    ensure!(
        names(&config, "users") == ["prod-user", "clusterctl-demo-admin"],
        "{config}"
    );
    // The other context is exactly as it was.
    let before: Value = serde_saphyr::from_str(OTHER)?;
    for list in ["clusters", "users", "contexts"] {
        ensure!(
            config[list][0] == before[list][0],
            "{list}[0] changed: {} -> {}",
            before[list][0],
            config[list][0]
        );
    }
    let cluster = by_name(&config, "clusters", "clusterctl-demo").context("our cluster")?;
    ensure!(cluster["cluster"]["server"] == "https://127.0.0.1:6443");
    ensure!(
        decode(&cluster["cluster"]["certificate-authority-data"])?
            == std::fs::read(bed.pki_file("demo", "ca.crt"))?
    );
    let user = by_name(&config, "users", "clusterctl-demo-admin").context("our user")?;
    ensure!(
        decode(&user["user"]["client-certificate-data"])?
            == std::fs::read(bed.pki_file("demo", "admin.crt"))?
    );
    ensure!(
        decode(&user["user"]["client-key-data"])?
            == std::fs::read(bed.pki_file("demo", "admin.key"))?
    );
    let context = by_name(&config, "contexts", "clusterctl-demo").context("our context")?;
    ensure!(context["context"]["cluster"] == "clusterctl-demo");
    ensure!(context["context"]["user"] == "clusterctl-demo-admin");

    // Again: nothing changes.
    let text = std::fs::read(&path)?;
    let out = bed.run(&["get-credentials", "demo"], &list)?;
    ensure!(out.status.success(), "{}", stderr(&out));
    ensure!(
        stderr(&out).contains("is up to date (current context)"),
        "{}",
        stderr(&out)
    );
    ensure!(
        std::fs::read(&path)? == text,
        "an unchanged merge rewrote the file"
    );

    if let Some(bin) = bundle_kubectl() {
        let listed = kubectl(&bin, &path, &["config", "get-contexts", "-o", "name"])?;
        let mut listed: Vec<&str> = listed.lines().collect();
        listed.sort();
        ensure!(listed == ["clusterctl-demo", "prod"], "{listed:?}");
        let view: Value = serde_json::from_str(&kubectl(
            &bin,
            &path,
            &["config", "view", "--raw", "-o", "json"],
        )?)?;
        ensure!(view["current-context"] == "clusterctl-demo");
        let user = by_name(&view, "users", "clusterctl-demo-admin").context("kubectl user")?;
        ensure!(
            decode(&user["user"]["client-key-data"])?
                == std::fs::read(bed.pki_file("demo", "admin.key"))?
        );
    } else {
        eprintln!("CLUSTERCTL_BUNDLE_DIR is not set: the kubectl check did not run");
    }

    // The library's remove takes out our three entries and clears our current context.
    ensure!(kubeconfig::remove(&path, "demo")?);
    let config = read_config(&path)?;
    ensure!(names(&config, "contexts") == ["prod"], "{config}");
    ensure!(names(&config, "clusters") == ["prod"], "{config}");
    ensure!(names(&config, "users") == ["prod-user"], "{config}");
    ensure!(config["current-context"] == "", "{config}");
    ensure!(!kubeconfig::remove(&path, "demo")?);
    Ok(())
}

#[test]
fn explicit_kubeconfig_flag_wins_over_the_environment() -> Result<()> {
    let bed = Bed::new()?;
    bed.cluster("demo", true)?;
    let explicit = bed.root.join("elsewhere/demo.kubeconfig");
    let out = bed.run(
        &[
            "get-credentials",
            "demo",
            "--kubeconfig",
            explicit.to_str().context("path")?,
        ],
        bed.kubeconfig().to_str().context("path")?,
    )?;
    ensure!(out.status.success(), "{}", stderr(&out));
    ensure!(!bed.kubeconfig().exists(), "$KUBECONFIG was written");
    let config = read_config(&explicit)?;
    ensure!(
        config["apiVersion"] == "v1" && config["kind"] == "Config",
        "{config}"
    );
    ensure!(
        names(&config, "contexts") == ["clusterctl-demo"],
        "{config}"
    );
    // Without KUBECONFIG the default is ~/.kube/config (HOME is the bed's).
    let out = bed.run(&["get-credentials", "demo"], "")?;
    ensure!(out.status.success(), "{}", stderr(&out));
    let home_config = bed.root.join("home/.kube/config");
    ensure!(names(&read_config(&home_config)?, "contexts") == ["clusterctl-demo"]);
    Ok(())
}

#[test]
fn get_credentials_fails_clearly_and_writes_nothing() -> Result<()> {
    let bed = Bed::new()?;
    let path = bed.kubeconfig();
    let env = path.to_str().context("path")?;

    let out = bed.run(&["get-credentials", "nope"], env)?;
    ensure!(out.status.code() == Some(1), "{out:?}");
    ensure!(
        stderr(&out).contains("cluster \"nope\" not found")
            && stderr(&out).contains("clusterctl get"),
        "{}",
        stderr(&out)
    );

    bed.cluster("fresh", false)?;
    let out = bed.run(&["get-credentials", "fresh"], env)?;
    ensure!(out.status.code() == Some(1));
    ensure!(
        stderr(&out)
            .contains("cluster \"fresh\" has no Kubernetes yet; run `clusterctl create -f FILE`"),
        "{}",
        stderr(&out)
    );

    // A cluster being deleted has no credentials to hand out.
    bed.cluster("going", true)?;
    {
        let store = StateStore::new(bed.state_dir());
        let guard = store.lock("going", WaitMode::FailFast, &mut |_| {})?;
        let mut record = guard.load()?.context("record")?;
        record.status = ClusterStatus::Deleting;
        guard.save(&mut record)?;
    }
    let out = bed.run(&["get-credentials", "going"], env)?;
    ensure!(out.status.code() == Some(1));
    ensure!(
        stderr(&out).contains("cluster \"going\" is being deleted"),
        "{}",
        stderr(&out)
    );

    bed.cluster("demo", true)?;
    std::fs::remove_file(bed.pki_file("demo", "admin.key"))?;
    let out = bed.run(&["get-credentials", "demo"], env)?;
    ensure!(out.status.code() == Some(1));
    ensure!(
        stderr(&out).contains("admin.key of cluster \"demo\" is missing"),
        "{}",
        stderr(&out)
    );
    ensure!(!path.exists(), "nothing may be written on error");

    // A kubeconfig that is not one is refused, named, and left as it was.
    bed.cluster("good", true)?;
    std::fs::create_dir_all(path.parent().context("no parent")?)?;
    let broken = "clusters:\n  - name: a\n   cluster: {}\n";
    std::fs::write(&path, broken)?;
    let out = bed.run(&["get-credentials", "good"], env)?;
    ensure!(out.status.code() == Some(1));
    let err = stderr(&out);
    ensure!(
        err.contains(&format!(
            "kubeconfig {} is not valid YAML at line 3",
            path.display()
        )) && err.contains("move it aside"),
        "{err}"
    );
    ensure!(std::fs::read_to_string(&path)? == broken);
    Ok(())
}

#[test]
fn delete_removes_the_context_and_keeps_the_others() -> Result<()> {
    let bed = Bed::new()?;
    let path = bed.demo_with_other_kubeconfig()?;
    let env = path.to_str().context("path")?;
    let out = bed.run(&["get-credentials", "demo"], env)?;
    ensure!(out.status.success(), "{}", stderr(&out));

    let out = bed.run(&["delete", "demo"], env)?;
    ensure!(out.status.success(), "delete failed: {}", stderr(&out));
    ensure!(
        stderr(&out).contains(&format!(
            "Removed kubeconfig context \"clusterctl-demo\" from {}.",
            path.display()
        )),
        "{}",
        stderr(&out)
    );
    ensure!(!bed.state_dir().join("demo").exists(), "state removed");
    let config = read_config(&path)?;
    ensure!(names(&config, "contexts") == ["prod"], "{config}");
    ensure!(names(&config, "users") == ["prod-user"], "{config}");
    ensure!(names(&config, "clusters") == ["prod"], "{config}");
    ensure!(config["current-context"] == "", "{config}");

    // A kubeconfig that cannot be read does not fail delete: the cluster is gone either way.
    bed.cluster("second", true)?;
    std::fs::write(&path, "- not a kubeconfig\n")?;
    let out = bed.run(&["delete", "second"], env)?;
    ensure!(out.status.success(), "delete failed: {}", stderr(&out));
    let err = stderr(&out);
    ensure!(
        err.contains("warning: cannot remove the kubeconfig entries of cluster \"second\"")
            && err.contains("kubectl config delete-context clusterctl-second")
            && err.contains("Cluster \"second\" deleted."),
        "{err}"
    );
    ensure!(std::fs::read_to_string(&path)? == "- not a kubeconfig\n");
    Ok(())
}

#[test]
fn delete_removes_the_context_from_every_file_it_was_written_to() -> Result<()> {
    let bed = Bed::new()?;
    let path = bed.demo_with_other_kubeconfig()?;
    let env = path.to_str().context("path")?;
    let explicit = bed.root.join("elsewhere/demo.kubeconfig");
    let explicit_arg = explicit.to_str().context("path")?;
    for args in [
        vec!["get-credentials", "demo"],
        vec!["get-credentials", "demo", "--kubeconfig", explicit_arg],
        // Twice: listed once.
        vec!["get-credentials", "demo", "--kubeconfig", explicit_arg],
    ] {
        let out = bed.run(&args, env)?;
        ensure!(out.status.success(), "{}", stderr(&out));
    }
    let listed = std::fs::read_to_string(bed.state_dir().join("demo/kubeconfigs"))?;
    ensure!(
        listed == format!("{}\n{}\n", path.display(), explicit.display()),
        "{listed}"
    );

    let out = bed.run(&["delete", "demo"], env)?;
    ensure!(out.status.success(), "delete failed: {}", stderr(&out));
    let err = stderr(&out);
    for p in [&path, &explicit] {
        ensure!(
            err.contains(&format!(
                "Removed kubeconfig context \"clusterctl-demo\" from {}.",
                p.display()
            )),
            "{err}"
        );
    }
    ensure!(names(&read_config(&path)?, "contexts") == ["prod"]);
    ensure!(names(&read_config(&explicit)?, "contexts").is_empty());
    Ok(())
}

/// `clusterctl auth token`, kubectl's exec credential plugin, in its own process reads what
/// `get-credentials --user` kept in the real kernel keyring (another process), answers with an
/// ExecCredential, and refuses a token that has expired or is not there.
#[test]
fn auth_token_hands_kubectl_the_token_kept_in_the_keyring() -> Result<()> {
    use clusterctl::credstore::{self, StoredToken};
    if let Err(e) = credstore::available() {
        anyhow::bail!("{e}: the kernel keyring is part of the test bed (see ../shared/TESTBED.md)");
    }
    let id = format!("t{}", std::process::id());
    let auth = |user: &str| -> Result<Output> {
        Ok(Command::new(BIN)
            .args(["auth", "token", "demo", "--user", user, "--cluster-id", &id])
            .stdin(Stdio::null())
            .output()?)
    };
    let alice = credstore::account("demo", &id, "alice");
    let fresh = (chrono::Utc::now() + chrono::Duration::hours(1)).to_rfc3339();
    credstore::save(
        &alice,
        &StoredToken {
            token: zeroize::Zeroizing::new("tok.alice".to_owned()),
            expiration_timestamp: fresh.clone(),
        },
    )?;
    let out = auth("alice")?;
    ensure!(
        out.status.success(),
        "auth token failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let doc: Value = serde_json::from_slice(&out.stdout).context("ExecCredential JSON")?;
    ensure!(doc["kind"] == "ExecCredential", "{doc}");
    ensure!(
        doc["apiVersion"] == "client.authentication.k8s.io/v1beta1",
        "{doc}"
    );
    ensure!(doc["status"]["token"] == "tok.alice", "{doc}");
    ensure!(
        doc["status"]["expirationTimestamp"] == fresh.as_str(),
        "{doc}"
    );

    let past = (chrono::Utc::now() - chrono::Duration::minutes(1)).to_rfc3339();
    credstore::save(
        &alice,
        &StoredToken {
            token: zeroize::Zeroizing::new("tok.alice".to_owned()),
            expiration_timestamp: past,
        },
    )?;
    let out = auth("alice")?;
    let err = String::from_utf8_lossy(&out.stderr);
    ensure!(
        !out.status.success() && out.stdout.is_empty(),
        "an expired token was handed out"
    );
    ensure!(
        err.contains("expired at") && err.contains("get-credentials demo --user alice"),
        "{err}"
    );

    let out = auth("bob")?;
    let err = String::from_utf8_lossy(&out.stderr);
    ensure!(
        !out.status.success() && err.contains("no such credential in the OS keyring"),
        "{err}"
    );
    ensure!(
        credstore::delete(&alice)?,
        "alice's entry was not there to remove"
    );
    Ok(())
}
