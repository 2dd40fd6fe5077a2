//! Bad Kubernetes input is refused before anything exists, driven through the built binary with
//! the fake provider: a bundle whose file does not match its checksum, a bundle of another
//! version than the spec names, and a version clusterctl cannot bootstrap (refused by `plan`
//! and by `create`), and a spec asking for something not implemented yet (refused by `plan` and
//! `create` as an invalid spec). After each refusal no machine, no state and no kubeconfig
//! entry exists. On an existing cluster, a re-apply that changes a field fixed for the cluster's
//! life (pod network) or one only a future command may change (control-plane count) is refused
//! by `plan` and `create` naming the field's line, and the cluster is left as it was.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use sha2::{Digest, Sha256};

type Result<T> = std::result::Result<T, Box<dyn std::error::Error>>;

struct Bed {
    root: tempfile::TempDir,
}

impl Bed {
    fn new() -> Result<Bed> {
        Ok(Bed {
            root: tempfile::tempdir()?,
        })
    }

    fn path(&self, rel: &str) -> PathBuf {
        self.root.path().join(rel)
    }

    /// A small but well-formed bundle of `version` (binaries are a few bytes each).
    fn bundle(&self, version: &str) -> Result<PathBuf> {
        let dir = self.path("bundle");
        fs::create_dir_all(dir.join("bin"))?;
        fs::create_dir_all(dir.join("images"))?;
        let mut files = Vec::new();
        let mut add = |rel: &str, content: &[u8]| -> Result<()> {
            fs::write(dir.join(rel), content)?;
            files.push(serde_json::json!({
                "path": rel,
                "sha256": hex::encode(Sha256::digest(content)),
                "size": content.len(),
            }));
            Ok(())
        };
        for b in clusterctl::bundle::manifest::REQUIRED_BINARIES {
            add(
                &format!("bin/{b}"),
                format!("#!/bin/sh\necho {b}\n").as_bytes(),
            )?;
        }
        add("images/pause.tar", b"not really a tar")?;
        let manifest = serde_json::json!({
            "formatVersion": 1,
            "kubernetesVersion": version,
            "etcdVersion": "3.4.23",
            "pauseImage": "localhost/clusterctl/pause:3.4",
            "images": [{"reference": "localhost/clusterctl/pause:3.4", "path": "images/pause.tar"}],
            "files": files,
        });
        fs::write(
            dir.join("bundle.json"),
            serde_json::to_vec_pretty(&manifest)?,
        )?;
        Ok(dir)
    }

    fn spec(&self, kubernetes: &str) -> Result<PathBuf> {
        let path = self.path("cluster.yaml");
        let text = format!(
            "apiVersion: clusterctl.io/v1alpha1\nkind: Cluster\nmetadata:\n  name: refused\nspec:\n  provider:\n    fake:\n      directory: {}\n  kubernetes:\n{kubernetes}  nodePools:\n    - name: workers\n      count: 2\n",
            self.path("fake").display()
        );
        fs::write(&path, text)?;
        Ok(path)
    }

    fn run(&self, args: &[&str]) -> Result<Output> {
        Ok(Command::new(env!("CARGO_BIN_EXE_clusterctl"))
            .args(args)
            .current_dir(self.root.path())
            .env("CLUSTERCTL_STATE_DIR", self.path("state"))
            .env("KUBECONFIG", self.path("kubeconfig"))
            .env("HOME", self.root.path())
            .env("CLUSTERCTL_IMAGE_DIR", self.path("images"))
            .env_remove("CLUSTERCTL_LOG")
            .output()?)
    }

    /// Nothing was made: no machine in the fake provider, no cluster state, no kubeconfig.
    fn assert_nothing_made(&self) -> Result<()> {
        let fake_entries = match fs::read_dir(self.path("fake")) {
            Ok(d) => d.count(),
            Err(_) => 0,
        };
        assert_eq!(fake_entries, 0, "the fake provider holds machines");
        assert!(
            !self.path("state/refused").exists(),
            "a state directory was made"
        );
        assert!(
            !self.path("kubeconfig").exists(),
            "a kubeconfig was written"
        );
        Ok(())
    }
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn bundle_spec(path: &Path, version: Option<&str>) -> String {
    let mut s = String::new();
    if let Some(v) = version {
        s.push_str(&format!("    version: \"{v}\"\n"));
    } else {
        s.push_str("    channel: stable\n");
    }
    s.push_str(&format!(
        "    artifacts:\n      bundle:\n        path: {}\n",
        path.display()
    ));
    s
}

#[test]
fn a_bundle_file_that_does_not_match_its_checksum_is_refused_before_anything_exists() -> Result<()>
{
    let bed = Bed::new()?;
    let bundle = bed.bundle("1.20.2")?;
    // Same size, different content: only the checksum can tell.
    fs::write(bundle.join("bin/kubelet"), b"#!/bin/sh\necho kubelex\n")?;
    let spec = bed.spec(&bundle_spec(&bundle, Some("1.20.2")))?;
    let out = bed.run(&["create", "-f", spec.to_str().unwrap_or_default()])?;
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("bin/kubelet"),
        "the error names the file: {err}"
    );
    assert!(
        err.to_lowercase().contains("sha256") || err.to_lowercase().contains("checksum"),
        "the error says it is a checksum mismatch: {err}"
    );
    assert!(!err.contains("==> Creating machines"), "{err}");
    bed.assert_nothing_made()?;

    // The intact bundle passes the same check (the test can fail for the right reason only).
    fs::write(bundle.join("bin/kubelet"), b"#!/bin/sh\necho kubelet\n")?;
    let out = bed.run(&["plan", "-f", spec.to_str().unwrap_or_default()])?;
    assert!(out.status.success(), "{}", stderr(&out));
    Ok(())
}

#[test]
fn an_unsupported_version_is_refused_at_plan_time_and_by_create() -> Result<()> {
    let bed = Bed::new()?;
    let spec = bed.spec("    version: \"1.19.4\"\n")?;
    let file = spec.to_str().unwrap_or_default();
    for cmd in ["plan", "create"] {
        let out = bed.run(&[cmd, "-f", file])?;
        let err = stderr(&out);
        assert_eq!(out.status.code(), Some(1), "{cmd}: {err}");
        assert!(err.contains("1.19.4"), "{cmd} names the version: {err}");
        assert!(
            err.contains("1.20"),
            "{cmd} names the supported versions: {err}"
        );
        assert!(err.contains("cluster.yaml"), "{cmd} names the file: {err}");
    }
    bed.assert_nothing_made()?;

    let ok = bed.spec("    version: \"1.20.2\"\n")?;
    let out = bed.run(&["plan", "-f", ok.to_str().unwrap_or_default()])?;
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("Kubernetes 1.20.2"),
        "plan shows the version"
    );
    Ok(())
}

#[test]
fn a_bundle_of_another_version_than_the_spec_is_refused() -> Result<()> {
    let bed = Bed::new()?;
    let bundle = bed.bundle("1.20.2")?;
    let spec = bed.spec(&bundle_spec(&bundle, Some("1.20.3")))?;
    let out = bed.run(&["create", "-f", spec.to_str().unwrap_or_default()])?;
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("holds Kubernetes 1.20.2") && err.contains("1.20.3"),
        "{err}"
    );
    bed.assert_nothing_made()?;
    // With a channel the bundle's version is used.
    let spec = bed.spec(&bundle_spec(&bundle, None))?;
    let out = bed.run(&["plan", "-f", spec.to_str().unwrap_or_default()])?;
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(String::from_utf8_lossy(&out.stdout).contains("Kubernetes 1.20.2"));
    Ok(())
}

#[test]
fn a_field_not_implemented_yet_is_refused_by_plan_and_create_as_an_invalid_spec() -> Result<()> {
    let bed = Bed::new()?;
    let path = bed.spec("    version: \"1.20.2\"\n")?;
    let text = fs::read_to_string(&path)?;
    fs::write(
        &path,
        format!("{text}  ssh:\n    bastion:\n      host: jump.example.com\n"),
    )?;
    let file = path.to_str().unwrap_or_default();
    for cmd in ["plan", "create"] {
        let out = bed.run(&[cmd, "-f", file])?;
        let err = stderr(&out);
        assert_eq!(out.status.code(), Some(2), "{cmd}: {err}");
        assert!(
            err.contains(
                "cluster.yaml:15:5: spec.ssh.bastion: connecting through a bastion is not implemented yet"
            ),
            "{cmd}: {err}"
        );
        assert!(!err.contains("==> Creating machines"), "{err}");
    }
    bed.assert_nothing_made()?;

    // Without it the same spec is planned.
    fs::write(&path, &text)?;
    let out = bed.run(&["plan", "-f", file])?;
    assert!(out.status.success(), "{}", stderr(&out));
    Ok(())
}

#[test]
fn a_reapply_that_changes_an_immutable_field_is_refused_and_changes_nothing() -> Result<()> {
    let bed = Bed::new()?;
    let path = bed.spec("    version: \"1.20.2\"\n")?;
    let file = path.to_str().unwrap_or_default();
    let out = bed.run(&["create", "-f", file])?;
    assert!(out.status.success(), "{}", stderr(&out));
    let state = bed.path("state/refused/cluster.json");
    let before = fs::read_to_string(&state)?;
    let machines = fs::read_to_string(bed.path("fake/machines.json"))?;
    let text = fs::read_to_string(&path)?;
    let changed = text
        .replace(
            "    version: \"1.20.2\"\n",
            "    version: \"1.20.2\"\n    podCIDR: 10.250.0.0/16\n",
        )
        .replace(
            "  nodePools:\n",
            "  controlPlane:\n    machine:\n      cpus: 8\n      disk: 40Gi\n  nodePools:\n",
        )
        .replace("      count: 2\n", "      count: 3\n");
    fs::write(&path, &changed)?;
    for cmd in ["plan", "create"] {
        let out = bed.run(&[cmd, "-f", file])?;
        let err = stderr(&out);
        assert_eq!(out.status.code(), Some(2), "{cmd}: {err}");
        assert!(
            err.contains("cluster.yaml:11:14: spec.kubernetes.podCIDR: cannot change from 10.244.0.0/16 to 10.250.0.0/16"),
            "{cmd}: {err}"
        );
        assert!(
            err.contains("spec.controlPlane.machine.disk: cannot change from 20Gi to 40Gi on existing control-plane machines"),
            "{cmd}: {err}"
        );
        assert!(err.contains("hint: keep the stored value"), "{cmd}: {err}");
        assert!(!err.contains("==> Creating machines"), "{err}");
    }
    assert_eq!(fs::read_to_string(&state)?, before, "the state changed");
    assert_eq!(
        fs::read_to_string(bed.path("fake/machines.json"))?,
        machines,
        "machines changed"
    );
    // A count change alone is what a re-apply is for.
    fs::write(&path, text.replace("      count: 2\n", "      count: 3\n"))?;
    let out = bed.run(&["plan", "-f", file])?;
    assert!(out.status.success(), "{}", stderr(&out));
    Ok(())
}

#[test]
fn a_pool_size_change_is_planned_as_replacements_and_saved() -> Result<()> {
    let bed = Bed::new()?;
    let path = bed.spec("    version: \"1.20.2\"\n")?;
    let file = path.to_str().unwrap_or_default();
    let out = bed.run(&["create", "-f", file])?;
    assert!(out.status.success(), "{}", stderr(&out));
    let text = fs::read_to_string(&path)?;
    fs::write(
        &path,
        text.replace(
            "      count: 2\n",
            "      count: 2\n      machine:\n        cpus: 4\n",
        ),
    )?;
    let out = bed.run(&["plan", "-f", file])?;
    let plan = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        plan.contains("0 to create, 0 to start, 0 to delete, 2 to replace (new size), 0 to resize in place, 1 unchanged"),
        "{plan}"
    );
    assert_eq!(
        plan.lines()
            .filter(|l| l.starts_with("replace (new size)")
                && l.contains("4 cpu, 2048 MiB, 20 GiB disk (is 2 cpu, 2048 MiB, 20 GiB disk)"))
            .count(),
        2,
        "{plan}"
    );
    let out = bed.run(&["-o", "json", "plan", "-f", file])?;
    let json: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    assert_eq!(
        json["plan"]["replacements"].as_array().map(Vec::len),
        Some(2),
        "{json}"
    );
    // The fake boots nothing: the spec is saved, the replacement waits for a running cluster.
    let out = bed.run(&["create", "-f", file])?;
    let err = stderr(&out);
    assert!(out.status.success(), "{err}");
    assert!(
        err.contains("2 machine(s) have another size than their spec"),
        "{err}"
    );
    let record: serde_json::Value =
        serde_json::from_str(&fs::read_to_string(bed.path("state/refused/cluster.json"))?)?;
    assert_eq!(
        record["spec"]["spec"]["nodePools"][0]["machine"]["cpus"],
        serde_json::json!(4),
        "{record}"
    );
    Ok(())
}

#[test]
fn reset_power_cycles_through_the_provider_and_is_journaled() -> Result<()> {
    let bed = Bed::new()?;
    let path = bed.spec("    version: \"1.20.2\"\n")?;
    let file = path.to_str().unwrap_or_default();
    let out = bed.run(&["create", "-f", file])?;
    assert!(out.status.success(), "{}", stderr(&out));
    let record: serde_json::Value =
        serde_json::from_str(&fs::read_to_string(bed.path("state/refused/cluster.json"))?)?;
    let workers: Vec<String> = record["pool_members"]["workers"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|n| n.as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default();
    assert_eq!(workers.len(), 2, "{record}");
    let mut all = vec!["refused-cp-0".to_owned()];
    all.extend(workers.iter().cloned());
    all.sort();
    let worker = workers[0].as_str();
    let out = bed.run(&["reset", "refused", "refused-nosuch"])?;
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(
        stderr(&out).contains(&format!(
            "cluster \"refused\" has no machine \"refused-nosuch\"; its machines are {}",
            all.join(", ")
        )),
        "{}",
        stderr(&out)
    );
    let boots = |machines: &str| -> Result<u64> {
        let v: serde_json::Value = serde_json::from_str(machines)?;
        Ok(v["machines"]
            .as_array()
            .and_then(|a| a.iter().find(|m| m["name"] == worker))
            .and_then(|m| m["boots"].as_u64())
            .unwrap_or(0))
    };
    let before = boots(&fs::read_to_string(bed.path("fake/machines.json"))?)?;
    // The fake provider's machines boot nothing, so no kubelet ever reports a new boot ID: the
    // reset happens, and the wait for the node ends at its timeout with an error saying so.
    let out = bed.run(&["reset", "refused", worker, "--timeout", "1"])?;
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains(&format!(
            "machine {worker} was reset, but its node did not come back"
        )) && err.contains(&format!("node {worker} was not Ready within 1 s")),
        "{err}"
    );
    let after = boots(&fs::read_to_string(bed.path("fake/machines.json"))?)?;
    assert_eq!(after, before + 1, "the machine was not power-cycled");
    let journal = fs::read_to_string(bed.path("state/refused/journal.jsonl"))?;
    assert!(
        journal.contains(&format!(
            "\"action\":\"reset-machine\",\"target\":\"{worker}\""
        )),
        "{journal}"
    );
    Ok(())
}

#[test]
fn upgrade_refuses_bad_input_and_changes_nothing() -> Result<()> {
    let bed = Bed::new()?;
    fs::create_dir_all(bed.path("images"))?;
    let path = bed.spec("    version: \"1.20.2\"\n")?;
    let file = path.to_str().unwrap_or_default();
    let out = bed.run(&["create", "-f", file])?;
    assert!(out.status.success(), "{}", stderr(&out));
    let state = bed.path("state/refused/cluster.json");
    let before = fs::read_to_string(&state)?;
    let record: serde_json::Value = serde_json::from_str(&before)?;
    assert_eq!(
        record["node_image"]["version"], "fake-no-image",
        "create pins the image: {record}"
    );
    let cases: [(&[&str], &str); 4] = [
        (
            &["upgrade", "refused", "--kubernetes-version", "1.20.3"],
            "cluster \"refused\" runs no Kubernetes yet: run `clusterctl create` for it first",
        ),
        (
            &["upgrade", "refused"],
            "say which node image to roll out: `clusterctl upgrade refused --node-image VERSION`",
        ),
        (
            &["upgrade", "refused", "--node-image", "nope"],
            "node image \"nope\" is not built in",
        ),
        (
            &["upgrade", "nosuch", "--node-image", "nope"],
            "cluster \"nosuch\" not found",
        ),
    ];
    for (args, want) in cases {
        let out = bed.run(args)?;
        let err = stderr(&out);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {err}");
        assert!(err.contains(want), "{args:?}: {err}");
    }
    assert_eq!(fs::read_to_string(&state)?, before, "the state changed");

    for args in [
        &["upgrade", "refused", "--bundle", "/tmp/b"][..],
        &["upgrade", "refused", "--kubernetes-version", "1.x"][..],
        &[
            "upgrade",
            "refused",
            "--kubernetes-version",
            "1.20.3",
            "--node-image",
            "v",
        ][..],
    ] {
        let out = bed.run(args)?;
        assert_eq!(out.status.code(), Some(2), "{args:?}: {}", stderr(&out));
    }
    // Auto-upgrade: bad input is refused before anything is read; off, it does nothing.
    let out = bed.run(&["upgrade", "refused", "--auto", "--node-image", "x"])?;
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    let missing = bed.path("no-channels.yaml");
    let missing = missing.to_str().unwrap_or_default();
    let out = bed.run(&["upgrade", "refused", "--auto", "--channel-file", missing])?;
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(
        stderr(&out).contains(&format!("reading the channel file {missing}")),
        "{}",
        stderr(&out)
    );
    let out = bed.run(&["upgrade", "refused", "--auto"])?;
    assert!(out.status.success(), "{}", stderr(&out));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("auto-upgrade of cluster \"refused\" is off: nothing done"),
        "{text}"
    );
    let out = bed.run(&["plan", "refused", "--next", "30d"])?;
    assert!(out.status.success(), "{}", stderr(&out));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("is off: nothing upgrades by itself in the next 30d"),
        "{text}"
    );
    let out = bed.run(&["plan", "refused"])?;
    assert_eq!(
        out.status.code(),
        Some(2),
        "plan NAME without --next: {}",
        stderr(&out)
    );
    let record: serde_json::Value = serde_json::from_str(&fs::read_to_string(&state)?)?;
    assert_eq!(
        record["auto_upgrade"]["lastRun"]["summary"], "auto-upgrade is off",
        "{record}"
    );
    Ok(())
}
