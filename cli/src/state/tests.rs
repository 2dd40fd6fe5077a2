//! Tests of the store as a whole: layout, permissions, record round trip, damaged records, and a
//! real crash (SIGKILL) in the middle of a stream of atomic writes.

use std::ffi::OsString;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use super::*;

fn mode_of(p: &Path) -> u32 {
    fs::metadata(p).map(|m| m.mode() & 0o7777).unwrap_or(0)
}

fn sample_spec() -> StoredSpec {
    let text = "apiVersion: clusterctl.io/v1alpha1\nkind: Cluster\nmetadata:\n  name: c1\nspec:\n  provider:\n    fake:\n      directory: /tmp/fake\n  kubernetes:\n    channel: stable\n  ssh:\n    agent: true\n  nodePools:\n    - name: a\n      count: 1\n";
    match crate::spec::parse_str(text, "sample.yaml") {
        Ok(s) => s,
        Err(e) => panic!("sample spec is invalid: {e}"),
    }
}

fn no_wait(_: Option<&LockHolder>) {}

#[test]
fn resolve_prefers_flag_then_xdg_then_home() -> anyhow::Result<()> {
    let env = |pairs: &'static [(&'static str, &'static str)]| {
        move |k: &str| {
            pairs
                .iter()
                .find(|(n, _)| *n == k)
                .map(|(_, v)| OsString::from(v))
        }
    };
    let s = StateStore::resolve_with(Some(Path::new("/x/y")), env(&[("XDG_STATE_HOME", "/xdg")]))?;
    assert_eq!(s.root(), Path::new("/x/y"));
    let s = StateStore::resolve_with(
        None,
        env(&[("XDG_STATE_HOME", "/xdg"), ("HOME", "/home/u")]),
    )?;
    assert_eq!(s.root(), Path::new("/xdg/clusterctl"));
    let s = StateStore::resolve_with(
        None,
        env(&[("XDG_STATE_HOME", "relative"), ("HOME", "/home/u")]),
    )?;
    assert_eq!(s.root(), Path::new("/home/u/.local/state/clusterctl"));
    assert!(matches!(
        StateStore::resolve_with(None, env(&[])),
        Err(StateError::NoStateHome)
    ));
    Ok(())
}

#[test]
fn record_round_trips_with_private_permissions() -> anyhow::Result<()> {
    let tmp = tempfile::tempdir()?;
    let store = StateStore::new(tmp.path().join("state"));
    assert_eq!(store.names()?, Vec::<String>::new());
    assert!(store.load("c1")?.is_none());

    let guard = store.lock("c1", WaitMode::FailFast, &mut no_wait)?;
    assert!(guard.load()?.is_none());
    let mut rec = ClusterRecord::new("c1", sample_spec())?;
    let created = rec.created_at;
    guard.save(&mut rec)?;
    let (mut j, _) = guard.open_journal("clusterctl create")?;
    j.finish(true)?;
    guard.write_secret("ssh-key", b"PRIVATE")?;

    assert_eq!(mode_of(store.root()), 0o700);
    assert_eq!(mode_of(guard.dir()), 0o700);
    for f in [
        RECORD_FILE,
        journal::JOURNAL_FILE,
        lock::LOCK_FILE,
        lock::HOLDER_FILE,
        "ssh-key",
    ] {
        assert_eq!(mode_of(&guard.dir().join(f)), 0o600, "{f}");
    }
    drop(guard);

    let loaded = store
        .load("c1")?
        .ok_or_else(|| anyhow::anyhow!("record missing"))?;
    assert_eq!(loaded.id, rec.id);
    assert_eq!(loaded.created_at, created);
    assert_eq!(loaded.status, ClusterStatus::Creating);
    assert_eq!(loaded.spec, sample_spec());
    assert_eq!(store.names()?, vec!["c1".to_owned()]);
    // The ID is a version 4 UUID and differs between clusters.
    assert_eq!(rec.id.len(), 36);
    assert_eq!(&rec.id[14..15], "4");
    assert_ne!(ClusterRecord::new("c2", sample_spec())?.id, rec.id);
    Ok(())
}

#[test]
fn widened_permissions_are_narrowed_but_a_widened_secret_is_refused() -> anyhow::Result<()> {
    let tmp = tempfile::tempdir()?;
    let store = StateStore::new(tmp.path().join("state"));
    let guard = store.lock("c1", WaitMode::FailFast, &mut no_wait)?;
    guard.save(&mut ClusterRecord::new("c1", sample_spec())?)?;
    guard.write_secret("ca.key", b"KEY")?;
    let rec_path = guard.dir().join(RECORD_FILE);
    fs::set_permissions(&rec_path, fs::Permissions::from_mode(0o644))?;
    fs::set_permissions(guard.dir(), fs::Permissions::from_mode(0o755))?;
    fs::set_permissions(
        guard.dir().join("ca.key"),
        fs::Permissions::from_mode(0o640),
    )?;
    drop(guard);

    store.load("c1")?;
    assert_eq!(
        mode_of(&rec_path),
        0o600,
        "loading narrows the record's mode"
    );
    let guard = store.lock("c1", WaitMode::FailFast, &mut no_wait)?;
    assert_eq!(
        mode_of(guard.dir()),
        0o700,
        "locking narrows the directory's mode"
    );
    let err = guard
        .read_secret("ca.key")
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    assert!(
        err.contains("has mode 0640") && err.contains("chmod 600"),
        "{err}"
    );
    assert!(guard.write_secret("../escape", b"x").is_err());
    assert!(guard.write_secret(RECORD_FILE, b"x").is_err());
    Ok(())
}

#[test]
fn an_existing_state_root_keeps_its_mode_but_cluster_directories_are_private() -> anyhow::Result<()>
{
    let tmp = tempfile::tempdir()?;
    let root = tmp.path().join("shared");
    fs::create_dir(&root)?;
    fs::set_permissions(&root, fs::Permissions::from_mode(0o1777))?;
    let store = StateStore::new(&root);
    let guard = store.lock("c1", WaitMode::FailFast, &mut no_wait)?;
    assert_eq!(
        mode_of(&root),
        0o1777,
        "a directory the user named (think /tmp) is not ours to chmod"
    );
    assert_eq!(mode_of(guard.dir()), 0o700);
    Ok(())
}

#[test]
fn damaged_records_give_clear_errors_and_are_left_alone() -> anyhow::Result<()> {
    let tmp = tempfile::tempdir()?;
    let store = StateStore::new(tmp.path().join("state"));
    let guard = store.lock("c1", WaitMode::FailFast, &mut no_wait)?;
    let mut rec = ClusterRecord::new("c1", sample_spec())?;
    guard.save(&mut rec)?;
    let path = guard.dir().join(RECORD_FILE);
    let good = fs::read_to_string(&path)?;
    let shown = path.display().to_string();

    let cases: Vec<(String, String)> = vec![
        (
            good[..good.len() / 2].to_owned(),
            format!("state file {shown} is corrupt: EOF while parsing"),
        ),
        (
            "".to_owned(),
            format!("state file {shown} is corrupt: EOF while parsing a value at line 1 column 0"),
        ),
        (
            "[1,2]".to_owned(),
            format!("state file {shown} is corrupt: missing field `schema_version`"),
        ),
        (
            good.replace("\"schema_version\": 2", "\"schema_version\": \"1\""),
            format!("state file {shown} is corrupt: `schema_version` is not"),
        ),
        (
            good.replace("\"schema_version\": 2", "\"schema_version\": 7"),
            format!("state file {shown} has schema version 7, newer than the 2"),
        ),
        (
            good.replace("\"status\": \"creating\"", "\"status\": \"sideways\""),
            format!("state file {shown} is corrupt: unknown variant `sideways`"),
        ),
        (
            good.replace("\"name\": \"c1\",", "\"name\": \"c2\","),
            format!("state file {shown} is corrupt: it names cluster \"c2\""),
        ),
        (
            good.replace("\"id\":", "\"surprise\": 1, \"id\":"),
            format!("state file {shown} is corrupt: unknown field `surprise`"),
        ),
    ];
    for (content, want) in cases {
        fs::write(&path, &content)?;
        let err = guard
            .load()
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(
            err.starts_with(&want),
            "content {content:?}\n got: {err}\nwant: {want}..."
        );
        assert_eq!(
            fs::read_to_string(&path)?,
            content,
            "a failed load never rewrites the file"
        );
    }
    Ok(())
}

#[test]
fn invalid_names_are_refused_before_touching_the_disk() -> anyhow::Result<()> {
    let tmp = tempfile::tempdir()?;
    let store = StateStore::new(tmp.path().join("state"));
    for bad in ["", "..", "a/b", "C1", "-a", "a-", &"x".repeat(64)] {
        assert!(
            matches!(store.load(bad), Err(StateError::InvalidName { .. })),
            "{bad:?}"
        );
        assert!(
            store.lock(bad, WaitMode::FailFast, &mut no_wait).is_err(),
            "{bad:?}"
        );
    }
    assert!(!store.root().exists());
    Ok(())
}

#[test]
fn remove_deletes_the_cluster_directory() -> anyhow::Result<()> {
    let tmp = tempfile::tempdir()?;
    let store = StateStore::new(tmp.path().join("state"));
    let guard = store.lock("c1", WaitMode::FailFast, &mut no_wait)?;
    guard.save(&mut ClusterRecord::new("c1", sample_spec())?)?;
    let dir = guard.dir().to_path_buf();
    guard.remove()?;
    assert!(!dir.exists());
    assert_eq!(store.names()?, Vec::<String>::new());
    // The lock is free again.
    drop(store.lock("c1", WaitMode::FailFast, &mut no_wait)?);
    Ok(())
}

/// Environment variable that turns [`crash_writer_child`] into the child of
/// [`sigkill_during_writes_leaves_a_complete_record`].
const CRASH_CHILD_ENV: &str = "CLUSTERCTL_TEST_CRASH_CHILD_DIR";

/// Child half of the crash test: rewrites the record in a loop, each time with a bigger machine
/// list, until it is killed. Does nothing when run as an ordinary test.
#[test]
fn crash_writer_child() -> anyhow::Result<()> {
    let Some(root) = std::env::var_os(CRASH_CHILD_ENV) else {
        return Ok(());
    };
    let store = StateStore::new(PathBuf::from(root));
    let guard = store.lock("c1", WaitMode::FailFast, &mut no_wait)?;
    let mut rec = ClusterRecord::new("c1", sample_spec())?;
    let mut i: u64 = 0;
    loop {
        // A large record so that a kill often lands inside a write.
        rec.machines.push(Machine {
            name: format!("c1-pool-{i}-{}", "x".repeat(200)),
            provider_id: format!("fake://{i}"),
            role: providers::MachineRole::Worker,
            pool: Some("p".into()),
            state: providers::MachineState::Running,
            addresses: vec![],
            failure_domain: None,
            image_digest: None,
            size: None,
            labels: Default::default(),
        });
        guard.save(&mut rec)?;
        i += 1;
    }
}

#[test]
fn sigkill_during_writes_leaves_a_complete_record() -> anyhow::Result<()> {
    let tmp = tempfile::tempdir()?;
    let root = tmp.path().join("state");
    let exe = std::env::current_exe()?;
    for round in 0..5 {
        let mut child = Command::new(&exe)
            .args([
                "--exact",
                "state::tests::crash_writer_child",
                "--test-threads=1",
                "--nocapture",
            ])
            .env(CRASH_CHILD_ENV, &root)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()?;
        // Let it write for a while (the first round also creates the record).
        let record = root.join("c1").join(RECORD_FILE);
        let deadline = Instant::now() + Duration::from_secs(30);
        while !record.exists() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        std::thread::sleep(Duration::from_millis(150 + 37 * round));
        child.kill()?; // SIGKILL
        let status = child.wait()?;
        anyhow::ensure!(
            status.code().is_none(),
            "child exited by itself ({status}) instead of being killed"
        );

        let store = StateStore::new(&root);
        let rec = store
            .load("c1")?
            .ok_or_else(|| anyhow::anyhow!("record missing after kill"))?;
        assert!(!rec.machines.is_empty(), "round {round}");
        // The next lock holder removes a temporary file the killed writer may have left.
        let guard = store.lock("c1", WaitMode::FailFast, &mut no_wait)?;
        let strays = fs::read_dir(guard.dir())?
            .filter_map(|e| e.ok())
            .filter(|e| e.file_name().to_str().is_some_and(fsio::is_temp_name))
            .count();
        assert_eq!(strays, 0);
        drop(guard);
    }
    Ok(())
}
