//! End-to-end tests of the mutating commands with the fake provider: the built binary is killed
//! with SIGKILL in the middle of `create` and `delete` and re-run; two `create`s contend for the
//! cluster lock. The fake provider keeps its machines in a file, so what a killed process left
//! behind is there to inspect, as VMs would be.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use serde_json::Value;

const BIN: &str = env!("CARGO_BIN_EXE_clusterctl");

struct Bed {
    _tmp: tempfile::TempDir,
    root: PathBuf,
}

impl Bed {
    fn new() -> Result<Self> {
        let tmp = tempfile::tempdir()?;
        let root = tmp.path().to_path_buf();
        Ok(Bed { _tmp: tmp, root })
    }

    fn state_dir(&self) -> PathBuf {
        self.root.join("state")
    }

    fn fake_dir(&self) -> PathBuf {
        self.root.join("fake")
    }

    /// Writes a spec for cluster `name` with one control plane machine and `pools` (name, count);
    /// the fake directory is given relative to the spec file on purpose.
    fn spec(&self, name: &str, pools: &[(&str, u32)]) -> Result<PathBuf> {
        let mut s = format!(
            "apiVersion: clusterctl.io/v1alpha1\nkind: Cluster\nmetadata:\n  name: {name}\nspec:\n  provider:\n    fake:\n      directory: fake\n  kubernetes:\n    channel: stable\n  ssh:\n    agent: true\n  controlPlane:\n    count: 1\n  nodePools:\n"
        );
        for (pool, count) in pools {
            s.push_str(&format!("    - name: {pool}\n      count: {count}\n"));
        }
        let path = self.root.join(format!("{name}.yaml"));
        std::fs::write(&path, s)?;
        Ok(path)
    }

    fn cmd(&self, args: &[&str], delay_ms: u64) -> Command {
        let mut c = Command::new(BIN);
        c.args(args)
            .current_dir(&self.root)
            .env("CLUSTERCTL_STATE_DIR", self.state_dir())
            // delete removes the cluster's kubeconfig context: never from the tester's own.
            .env("KUBECONFIG", self.root.join("kubeconfig"))
            .env("CLUSTERCTL_FAKE_DELAY_MS", delay_ms.to_string())
            .env_remove("CLUSTERCTL_FAKE_FAIL_ENSURE")
            .env_remove("CLUSTERCTL_LOG")
            .stdin(Stdio::null());
        c
    }

    fn run(&self, args: &[&str], delay_ms: u64) -> Result<Output> {
        Ok(self.cmd(args, delay_ms).output()?)
    }

    fn spawn(&self, args: &[&str], delay_ms: u64) -> Result<Child> {
        Ok(self
            .cmd(args, delay_ms)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()?)
    }

    fn journal(&self, cluster: &str) -> Result<Vec<Value>> {
        let path = self.state_dir().join(cluster).join("journal.jsonl");
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(e.into()),
        };
        // A line being written right now may be incomplete: only count complete ones.
        let complete = match text.rfind('\n') {
            Some(i) => &text[..=i],
            None => "",
        };
        complete
            .lines()
            .map(|l| serde_json::from_str(l).with_context(|| format!("journal line {l:?}")))
            .collect()
    }

    fn record(&self, cluster: &str) -> Result<Value> {
        let path = self.state_dir().join(cluster).join("cluster.json");
        Ok(serde_json::from_slice(
            &std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?,
        )?)
    }

    /// Names of the fake machines labelled with `cluster_id`.
    fn machines_of(&self, cluster_id: &str) -> Result<BTreeSet<String>> {
        let path = self.fake_dir().join("machines.json");
        let store: Value = match std::fs::read(&path) {
            Ok(b) => serde_json::from_slice(&b)?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(BTreeSet::new()),
            Err(e) => return Err(e.into()),
        };
        let mut out = BTreeSet::new();
        for m in store["machines"]
            .as_array()
            .context("machines is not a list")?
        {
            if m["labels"]["clusterctl.io/cluster-id"] == cluster_id {
                out.insert(
                    m["name"]
                        .as_str()
                        .context("machine without name")?
                        .to_owned(),
                );
            }
        }
        Ok(out)
    }
}

fn events<'a>(journal: &'a [Value], kind: &str) -> Vec<&'a Value> {
    journal.iter().filter(|r| r["event"] == kind).collect()
}

/// Intents without `done`, `failed` or `interrupted` record.
fn open_intents(journal: &[Value]) -> BTreeSet<String> {
    let closed: BTreeSet<&str> = journal
        .iter()
        .filter(|r| r["event"] != "intent")
        .filter_map(|r| r["op"].as_str())
        .collect();
    events(journal, "intent")
        .into_iter()
        .filter_map(|r| r["op"].as_str())
        .filter(|op| !closed.contains(op))
        .map(str::to_owned)
        .collect()
}

fn text(o: &Output) -> String {
    format!(
        "status {}\nstdout:\n{}\nstderr:\n{}",
        o.status,
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

fn poll<T>(what: &str, timeout: Duration, mut f: impl FnMut() -> Result<Option<T>>) -> Result<T> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f()? {
            return Ok(v);
        }
        if Instant::now() > deadline {
            bail!("timed out waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Kills `child` with SIGKILL and checks that it was the kill that ended it.
fn sigkill(mut child: Child) -> Result<()> {
    child.kill()?;
    let status = child.wait()?;
    ensure!(
        status.code().is_none(),
        "the command ended by itself ({status}) before it could be killed"
    );
    Ok(())
}

/// The machines the record names for a cluster of [`Bed::spec`] with pools `pool-a` and `pool-b`
/// of 2 each: `<cluster>-cp-0`, and `<cluster>-<pool>-<5 random characters>` for the pools.
fn expected(bed: &Bed, cluster: &str) -> Result<BTreeSet<String>> {
    let record = bed.record(cluster)?;
    let mut out = BTreeSet::from([format!("{cluster}-cp-0")]);
    for pool in ["pool-a", "pool-b"] {
        let names: Vec<String> = record["pool_members"][pool]
            .as_array()
            .with_context(|| format!("pool_members.{pool} in {record}"))?
            .iter()
            .filter_map(|n| n.as_str().map(str::to_owned))
            .collect();
        ensure!(names.len() == 2, "pool {pool} has names {names:?}");
        for name in &names {
            let suffix = name
                .strip_prefix(&format!("{cluster}-{pool}-"))
                .with_context(|| format!("{name} is not a machine name of pool {pool}"))?;
            ensure!(
                suffix.len() == 5
                    && suffix.as_bytes()[0].is_ascii_lowercase()
                    && suffix
                        .bytes()
                        .all(|b| b"bcdfghjklmnpqrstvwxz2456789".contains(&b)),
                "{name}: the suffix is not 5 random characters"
            );
        }
        out.extend(names);
    }
    Ok(out)
}

#[test]
fn create_killed_mid_run_is_finished_by_running_it_again() -> Result<()> {
    let bed = Bed::new()?;
    let spec = bed.spec("c1", &[("pool-a", 2), ("pool-b", 2)])?;
    let spec_s = spec.to_string_lossy().into_owned();

    // 5 machines, 4 at a time, 400 ms each: kill once some are done and others are in flight.
    let child = bed.spawn(&["create", "-f", &spec_s], 400)?;
    let open_at_kill = poll(
        "some done and some in-flight intents",
        Duration::from_secs(60),
        || {
            let j = bed.journal("c1")?;
            let open = open_intents(&j);
            Ok((!events(&j, "done").is_empty() && !open.is_empty()).then_some(open))
        },
    )?;
    sigkill(child)?;

    let record = bed.record("c1")?;
    let id = record["id"]
        .as_str()
        .context("record has no id")?
        .to_owned();
    assert_eq!(record["status"], "creating");
    let partial = bed.machines_of(&id)?;
    assert!(partial.len() < 5, "the kill came too late: {partial:?}");
    let open_after_kill = open_intents(&bed.journal("c1")?);
    assert!(open_after_kill.is_superset(&open_at_kill) && !open_after_kill.is_empty());
    // The lock died with the process: the informational holder record may remain, but must not block.

    let out = bed.run(&["create", "-f", &spec_s], 0)?;
    assert!(out.status.success(), "{}", text(&out));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("==> Recovering operations interrupted in an earlier run"),
        "{stderr}"
    );
    assert!(stderr.contains("was interrupted"), "{stderr}");
    assert!(
        stderr.contains("Kubernetes is NOT installed"),
        "create must say honestly that it stops at machines: {stderr}"
    );

    // Exactly the requested machines exist, all carrying the same cluster ID.
    assert_eq!(bed.machines_of(&id)?, expected(&bed, "c1")?);
    let all: Value = serde_json::from_slice(&std::fs::read(bed.fake_dir().join("machines.json"))?)?;
    assert_eq!(
        all["machines"].as_array().map(Vec::len),
        Some(5),
        "no duplicate or foreign machines: {all}"
    );

    // The journal shows the recovery: every op left open by the kill is marked interrupted.
    let j = bed.journal("c1")?;
    let interrupted: BTreeSet<String> = events(&j, "interrupted")
        .iter()
        .filter_map(|r| r["op"].as_str())
        .map(str::to_owned)
        .collect();
    assert_eq!(interrupted, open_after_kill);
    assert!(open_intents(&j).is_empty());
    assert_eq!(events(&j, "run-started").len(), 2);
    assert_eq!(
        j.last().map(|r| r["event"].clone()),
        Some(Value::from("run-finished"))
    );
    assert_eq!(j.last().map(|r| r["ok"].clone()), Some(Value::from(true)));

    // The state is intact: same ID, provisioned, inventory recorded.
    let record = bed.record("c1")?;
    assert_eq!(record["id"], id.as_str());
    assert_eq!(record["status"], "provisioned");
    let names: BTreeSet<String> = record["machines"]
        .as_array()
        .context("machines")?
        .iter()
        .filter_map(|m| m["name"].as_str().map(str::to_owned))
        .collect();
    assert_eq!(names, expected(&bed, "c1")?);

    // A third run has nothing to do and creates nothing new.
    let out = bed.run(&["create", "-f", &spec_s], 0)?;
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        !String::from_utf8_lossy(&out.stderr).contains("==> Creating machines"),
        "{}",
        text(&out)
    );
    assert_eq!(bed.machines_of(&id)?, expected(&bed, "c1")?);
    Ok(())
}

#[test]
fn delete_killed_mid_run_is_finished_by_running_it_again() -> Result<()> {
    let bed = Bed::new()?;
    let spec = bed.spec("c2", &[("pool-a", 2), ("pool-b", 2)])?;
    let other = bed.spec("bystander", &[("pool-a", 1)])?;
    for s in [&spec, &other] {
        let out = bed.run(&["create", "-f", &s.to_string_lossy()], 0)?;
        assert!(out.status.success(), "{}", text(&out));
    }
    let id = bed.record("c2")?["id"].as_str().context("id")?.to_owned();
    let other_id = bed.record("bystander")?["id"]
        .as_str()
        .context("id")?
        .to_owned();
    assert_eq!(bed.machines_of(&id)?, expected(&bed, "c2")?);

    let child = bed.spawn(&["delete", "c2"], 300)?;
    poll("some machines deleted", Duration::from_secs(60), || {
        let n = bed.machines_of(&id)?.len();
        Ok((n > 0 && n < 5).then_some(()))
    })?;
    sigkill(child)?;
    assert!(!bed.machines_of(&id)?.is_empty(), "the kill came too late");
    assert_eq!(bed.record("c2")?["status"], "deleting");

    // `get` shows the half-deleted cluster.
    let out = bed.run(&["get"], 0)?;
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("deleting"),
        "{}",
        text(&out)
    );

    // A half-deleted cluster is not created again by accident.
    let out = bed.run(&["create", "-f", &spec.to_string_lossy()], 0)?;
    assert!(!out.status.success(), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("cluster \"c2\" is being deleted"),
        "{}",
        text(&out)
    );

    let out = bed.run(&["delete", "c2"], 0)?;
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("was interrupted"),
        "{}",
        text(&out)
    );
    assert_eq!(
        bed.machines_of(&id)?,
        BTreeSet::new(),
        "nothing of the cluster is left"
    );
    assert!(!bed.state_dir().join("c2").exists(), "its state is gone");
    let bystander = bed.record("bystander")?;
    let bystanders: BTreeSet<String> = [
        "bystander-cp-0",
        bystander["pool_members"]["pool-a"][0]
            .as_str()
            .context("the bystander's pool member")?,
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    assert_eq!(
        bed.machines_of(&other_id)?,
        bystanders,
        "another cluster's machines are untouched"
    );

    // Deleting again says it is not there.
    let out = bed.run(&["delete", "c2"], 0)?;
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("cluster \"c2\" not found"),
        "{}",
        text(&out)
    );
    Ok(())
}

#[test]
fn delete_after_a_killed_create_leaves_nothing() -> Result<()> {
    let bed = Bed::new()?;
    let spec = bed.spec("c7", &[("pool-a", 2), ("pool-b", 2)])?;
    let child = bed.spawn(&["create", "-f", &spec.to_string_lossy()], 400)?;
    poll("a machine created", Duration::from_secs(60), || {
        Ok(events(&bed.journal("c7")?, "done").first().map(|_| ()))
    })?;
    sigkill(child)?;
    let id = bed.record("c7")?["id"].as_str().context("id")?.to_owned();
    assert!(!bed.machines_of(&id)?.is_empty());

    let out = bed.run(&["delete", "c7"], 0)?;
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(bed.machines_of(&id)?, BTreeSet::new());
    assert!(!bed.state_dir().join("c7").exists());
    Ok(())
}

#[test]
fn second_create_fails_fast_naming_the_holder_and_waits_with_wait() -> Result<()> {
    let bed = Bed::new()?;
    let spec = bed.spec("c3", &[("pool-a", 2), ("pool-b", 2)])?;
    let spec_s = spec.to_string_lossy().into_owned();
    // 5 machines, 4 at a time, 1.5 s each: the first create holds the lock for about 3 s.
    let mut first = bed.spawn(&["create", "-f", &spec_s], 1500)?;
    let holder = bed.state_dir().join("c3").join("holder.json");
    poll(
        "the first create to take the lock",
        Duration::from_secs(30),
        || Ok(holder.exists().then_some(())),
    )?;

    let started = Instant::now();
    let out = bed.run(&["create", "-f", &spec_s], 0)?;
    assert!(!out.status.success(), "{}", text(&out));
    // "Busy" has its own exit code (3), apart from "failed" (1) and "invalid input" (2).
    assert_eq!(out.status.code(), Some(3), "{}", text(&out));
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "the second create did not fail fast"
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    let want = format!(
        "cluster \"c3\" is locked by pid {} (clusterctl create -f {spec_s}) since ",
        first.id()
    );
    assert!(stderr.contains(&want), "want {want:?} in:\n{stderr}");
    assert!(stderr.contains("; wait for it or pass --wait"), "{stderr}");

    ensure!(
        first.try_wait()?.is_none(),
        "the first create ended before the waiting one started"
    );
    let waiter = bed.spawn(&["create", "--wait", "-f", &spec_s], 0)?;
    let first_out = first.wait_with_output()?;
    assert!(first_out.status.success(), "{}", text(&first_out));
    let waited = waiter.wait_with_output()?;
    assert!(waited.status.success(), "{}", text(&waited));
    let stderr = String::from_utf8_lossy(&waited.stderr);
    assert!(
        stderr.contains("is locked by pid") && stderr.contains("waiting"),
        "{stderr}"
    );
    let id = bed.record("c3")?["id"].as_str().context("id")?.to_owned();
    assert_eq!(bed.machines_of(&id)?, expected(&bed, "c3")?);
    Ok(())
}

#[test]
fn failed_create_says_how_to_resume_and_resumes() -> Result<()> {
    let bed = Bed::new()?;
    let spec = bed.spec("c4", &[("pool-a", 2), ("pool-b", 2)])?;
    let spec_s = spec.to_string_lossy().into_owned();
    let out = bed
        .cmd(&["create", "-f", &spec_s], 0)
        .env("CLUSTERCTL_FAKE_FAIL_ENSURE", "c4-pool-a-*")
        .output()?;
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    let failed = bed.record("c4")?["pool_members"]["pool-a"]
        .as_array()
        .context("pool-a's names")?
        .iter()
        .filter_map(|n| n.as_str().map(str::to_owned))
        .find(|n| stderr.contains(&format!("{n}: failed:")));
    assert!(failed.is_some(), "{stderr}");
    assert!(
        stderr.contains(&format!("error: creating cluster \"c4\" stopped; run `clusterctl create -f {spec_s}` again to resume")),
        "{stderr}"
    );
    assert!(
        stderr.contains("failure injected by CLUSTERCTL_FAKE_FAIL_ENSURE"),
        "{stderr}"
    );
    let j = bed.journal("c4")?;
    assert_eq!(events(&j, "failed").len(), 1);
    assert_eq!(j.last().map(|r| r["ok"].clone()), Some(Value::from(false)));
    assert_eq!(bed.record("c4")?["status"], "creating");

    let out = bed.run(&["create", "-f", &spec_s], 0)?;
    assert!(out.status.success(), "{}", text(&out));
    let id = bed.record("c4")?["id"].as_str().context("id")?.to_owned();
    assert_eq!(bed.machines_of(&id)?, expected(&bed, "c4")?);
    Ok(())
}

#[test]
fn plan_and_get_show_the_cluster() -> Result<()> {
    let bed = Bed::new()?;
    let spec = bed.spec("c5", &[("pool-a", 2), ("pool-b", 2)])?;
    let spec_s = spec.to_string_lossy().into_owned();

    let out = bed.run(&["plan", "-f", &spec_s], 0)?;
    assert!(out.status.success(), "{}", text(&out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("state:          new cluster"), "{stdout}");
    assert!(
        stdout.contains("Plan: 5 to create, 0 to start, 0 to delete, 0 to replace (new size), 0 to resize in place, 0 unchanged"),
        "{stdout}"
    );
    // New machines get their random names when they are made.
    assert!(
        stdout.contains("create  c5-pool-b-<new-4>  worker"),
        "{stdout}"
    );
    assert!(!bed.state_dir().join("c5").exists(), "plan changes nothing");

    let out = bed.run(&["plan", "-o", "json", "-f", &spec_s], 0)?;
    assert!(out.status.success(), "{}", text(&out));
    let v: Value = serde_json::from_slice(&out.stdout)?;
    assert_eq!(v["plan"]["steps"].as_array().map(Vec::len), Some(5));
    assert_eq!(v["plan"]["steps"][0]["action"], "create-machine");
    assert_eq!(v["plan"]["steps"][0]["machine"]["name"], "c5-cp-0");
    // The spec is shown with defaults filled in.
    assert_eq!(v["spec"]["spec"]["controlPlane"]["machine"]["cpus"], 2);
    assert_eq!(
        v["spec"]["spec"]["provider"]["fake"]["directory"],
        bed.fake_dir().to_string_lossy().as_ref()
    );

    let out = bed.run(&["create", "-q", "-f", &spec_s], 0)?;
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        out.stderr.is_empty(),
        "--quiet prints nothing on success: {}",
        text(&out)
    );

    let out = bed.run(&["plan", "-f", &spec_s], 0)?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("Plan: 0 to create, 0 to start, 0 to delete, 0 to replace (new size), 0 to resize in place, 5 unchanged"),
        "{}",
        text(&out)
    );

    let out = bed.run(&["get"], 0)?;
    assert!(out.status.success(), "{}", text(&out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.starts_with("NAME  STATUS       PROVIDER  MACHINES  VERSION  READY  CREATED"),
        "{stdout}"
    );
    assert!(
        stdout.contains("c5    provisioned  fake      5"),
        "{stdout}"
    );

    let out = bed.run(&["get", "c5", "-o", "yaml"], 0)?;
    assert!(out.status.success(), "{}", text(&out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("status: provisioned") && stdout.contains("name: c5-pool-b-"),
        "{stdout}"
    );

    let out = bed.run(&["get", "c5", "-o", "json"], 0)?;
    let v: Value = serde_json::from_slice(&out.stdout)?;
    assert_eq!(v["machines"].as_array().map(Vec::len), Some(5));
    assert_eq!(v["machines"][0]["state"], "running");
    // A stable interface in camelCase, like the spec and kubectl.
    assert!(v["machines"][0]["providerId"].is_string(), "{v}");
    assert!(v["createdAt"].is_string(), "{v}");
    assert!(
        v["sshHostKeys"].is_null() || v["sshHostKeys"].is_object(),
        "{v}"
    );
    let text = String::from_utf8_lossy(&out.stdout);
    for snake in ["provider_id", "created_at", "updated_at", "ssh_host_keys"] {
        assert!(!text.contains(snake), "{snake} in get -o json:\n{text}");
    }
    Ok(())
}

#[test]
fn corrupt_state_is_reported_with_its_path_and_left_alone() -> Result<()> {
    let bed = Bed::new()?;
    let spec = bed.spec("c6", &[("pool-a", 1)])?;
    let spec_s = spec.to_string_lossy().into_owned();
    let out = bed.run(&["create", "-f", &spec_s], 0)?;
    assert!(out.status.success(), "{}", text(&out));
    let path: &Path = &bed.state_dir().join("c6").join("cluster.json");
    std::fs::write(path, b"{\"schema_version\": 1, \"name\": ")?;
    for args in [
        vec!["get", "c6"],
        vec!["create", "-f", &spec_s],
        vec!["delete", "c6"],
    ] {
        let out = bed.run(&args, 0)?;
        assert!(!out.status.success(), "{args:?}: {}", text(&out));
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            stderr.contains(&format!("state file {} is corrupt", path.display())),
            "{args:?}: {stderr}"
        );
        assert!(!stderr.contains("panicked"), "{stderr}");
        assert_eq!(std::fs::read(path)?, b"{\"schema_version\": 1, \"name\": ");
    }
    // `get` without a name still lists the cluster, marked as broken.
    let out = bed.run(&["get"], 0)?;
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("c6    error"),
        "{}",
        text(&out)
    );
    Ok(())
}

/// `repair`'s surface on the fake provider (which boots nothing, so no cluster of it ever runs
/// Kubernetes): a pass on a cluster that is not running skips it and says why; a scheduled pass
/// skips a cluster with auto-repair off; a pass while another command holds the lock exits at
/// once with the "locked" code (3), so two scheduled runs never overlap; `operations` lists the
/// runs from the journal; `autorepair status` reads the record. The repairs themselves are proven
/// on real VMs (tests/bed/cli-e2e.sh, phase repair).
#[test]
fn repair_skips_what_it_must_and_never_overlaps_another_command() -> Result<()> {
    let bed = Bed::new()?;
    let spec = bed.spec("c9", &[("pool-a", 2)])?;
    let spec_s = spec.to_string_lossy().into_owned();
    let out = bed.run(&["create", "-f", &spec_s], 0)?;
    assert!(out.status.success(), "{}", text(&out));

    let out = bed.run(&["repair", "c9"], 0)?;
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        text(&out).contains("c9: skipped: cluster \"c9\" is provisioned, not running"),
        "{}",
        text(&out)
    );
    let out = bed.run(&["-o", "json", "repair", "--all"], 0)?;
    assert!(out.status.success(), "{}", text(&out));
    let reports: Value = serde_json::from_slice(&out.stdout)?;
    assert!(
        reports[0]["skipped"]
            .as_str()
            .is_some_and(|s| s.contains("autoRepair.enabled is false")),
        "{reports}"
    );
    let out = bed.run(&["repair", "nosuch"], 0)?;
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(
        text(&out).contains("cluster \"nosuch\" not found"),
        "{}",
        text(&out)
    );

    // 4 new machines, 1.5 s each: a create holding the lock for a moment.
    let bigger = bed.spec("c9", &[("pool-a", 6)])?;
    let mut first = bed.spawn(&["create", "-f", &bigger.to_string_lossy()], 1500)?;
    let holder = bed.state_dir().join("c9").join("holder.json");
    poll("create to take the lock", Duration::from_secs(30), || {
        Ok(holder.exists().then_some(()))
    })?;
    let started = Instant::now();
    let out = bed.run(&["repair", "c9"], 0)?;
    assert_eq!(out.status.code(), Some(3), "{}", text(&out));
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "repair did not fail fast"
    );
    assert!(text(&out).contains("is locked by pid"), "{}", text(&out));
    // A dry run only reads: it does not wait for the lock.
    let out = bed.run(&["repair", "c9", "--dry-run"], 0)?;
    assert!(out.status.success(), "{}", text(&out));
    assert!(first.wait()?.success());

    let out = bed.run(&["operations", "c9"], 0)?;
    assert!(out.status.success(), "{}", text(&out));
    let listing = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        listing.matches("succeeded").count(),
        2,
        "two creates, each succeeded: {listing}"
    );
    // The second create made the pool's 4 new machines, the names the record gave them.
    let names = bed.record("c9")?["pool_members"]["pool-a"]
        .as_array()
        .context("pool-a's names")?
        .clone();
    assert_eq!(names.len(), 6, "{names:?}");
    for n in &names[2..] {
        let n = n.as_str().unwrap_or_default();
        assert!(
            listing.contains(&format!("ensure-machine {n}: done")),
            "{n}: {listing}"
        );
    }
    let out = bed.run(&["autorepair", "status", "c9"], 0)?;
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("auto-repair: disabled"),
        "{}",
        text(&out)
    );
    Ok(())
}
