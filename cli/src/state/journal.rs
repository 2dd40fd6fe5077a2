//! The append-only operation journal of a cluster (`journal.jsonl`, one JSON record a line).
//!
//! Before every side effect (creating a machine, deleting one, ...) the engine appends an
//! `intent` record and flushes it to disk; after the side effect it appends `done` or `failed`.
//! Reading the journal back therefore tells which operations were in flight when a process died:
//! an intent with no outcome. The next run records that it found them (`interrupted`) and, since
//! every step is idempotent and the plan is recomputed from what the provider reports, simply
//! finishes the work.
//!
//! A crash in the middle of appending leaves a last line without its newline. Such a torn tail is
//! tolerated: it is reported and cut off before the next append. It is safe to drop because the
//! side effect of a record only starts after the record is completely written and flushed. Any
//! other damage is an error naming the file and line; the journal is never reset silently.
//!
//! Compaction keeps it small for a command run every minute for years (a repair timer): when a
//! run opens a journal of more than [`COMPACT_AT`] records, the journal is rewritten (atomically,
//! under the cluster lock) with the records of the last [`KEEP_RUNS`] runs, every operation still
//! in flight, and of everything older only the last completed operation of each (action,
//! target) pair with its outcome: what readers of the history need (whether clusterctl's last
//! word on a node was a cordon or an uncordon), in the original order and sequence numbers.

use std::collections::BTreeSet;
use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::fsio::{self, FILE_MODE};
use super::{StateError, Timestamp};

/// File name of the journal inside a cluster directory.
pub const JOURNAL_FILE: &str = "journal.jsonl";

/// A journal with more records than this is compacted when a run opens it.
pub const COMPACT_AT: usize = 4000;

/// How many of the latest runs compaction keeps whole.
pub const KEEP_RUNS: usize = 50;

/// The records compaction keeps, in their order: every record of the last `keep_runs` runs,
/// in-flight intents, and for older records the last completed operation of each (action,
/// target) with its outcome. Pure.
pub fn compact(records: &[Record], keep_runs: usize) -> Vec<Record> {
    use std::collections::{BTreeMap, HashMap};
    // Runs in order of their first record.
    let mut runs: Vec<&str> = Vec::new();
    let mut seen = BTreeSet::new();
    for r in records {
        if seen.insert(r.run.as_str()) {
            runs.push(&r.run);
        }
    }
    let recent: BTreeSet<&str> = runs.iter().rev().take(keep_runs).copied().collect();
    // The first outcome record of each operation.
    let mut outcome: HashMap<&str, usize> = HashMap::new();
    for (i, r) in records.iter().enumerate() {
        if let Event::Done { op } | Event::Failed { op, .. } | Event::Interrupted { op, .. } =
            &r.event
        {
            outcome.entry(op).or_insert(i);
        }
    }
    // The last completed operation per (action, target), by its intent's position.
    let mut last: BTreeMap<(&str, &str), usize> = BTreeMap::new();
    for (i, r) in records.iter().enumerate() {
        if let Event::Intent { op, action, target } = &r.event
            && outcome.contains_key(op.as_str())
        {
            last.insert((action, target), i);
        }
    }
    let mut keep = vec![false; records.len()];
    for (i, r) in records.iter().enumerate() {
        if recent.contains(r.run.as_str()) {
            keep[i] = true;
        }
        if let Event::Intent { op, .. } = &r.event
            && !outcome.contains_key(op.as_str())
        {
            keep[i] = true;
        }
    }
    for &i in last.values() {
        keep[i] = true;
        if let Event::Intent { op, .. } = &records[i].event
            && let Some(&o) = outcome.get(op.as_str())
        {
            keep[o] = true;
        }
    }
    records
        .iter()
        .zip(keep)
        .filter(|(_, k)| *k)
        .map(|(r, _)| r.clone())
        .collect()
}

/// One line of the journal.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    /// Sequence number, increasing over the life of the journal (by one per record; compaction
    /// leaves gaps).
    pub seq: u64,
    /// When the record was written.
    pub at: Timestamp,
    /// ID of the command run that wrote the record.
    pub run: String,
    /// What happened.
    #[serde(flatten)]
    pub event: Event,
}

/// What a journal record says.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "kebab-case")]
pub enum Event {
    /// A command run took the cluster lock and starts working.
    RunStarted {
        /// Process ID of the run.
        pid: u32,
        /// Its command line.
        command: String,
    },
    /// A side effect is about to happen.
    Intent {
        /// Operation ID, unique in the journal (`<run>.<n>`).
        op: String,
        /// What kind of side effect, e.g. `ensure-machine`, `delete-machine`, `delete-cluster`.
        action: String,
        /// What it acts on, e.g. the machine name `c1-cp-0`.
        target: String,
    },
    /// The side effect of `op` completed.
    Done {
        /// Operation ID of the intent.
        op: String,
    },
    /// The side effect of `op` failed.
    Failed {
        /// Operation ID of the intent.
        op: String,
        /// The error, as printed to the user.
        error: String,
    },
    /// A later run found `op` in flight: the run that started it died before recording an
    /// outcome. The later run re-checks the target against the provider.
    Interrupted {
        /// Operation ID of the interrupted intent.
        op: String,
        /// Its action.
        action: String,
        /// Its target.
        target: String,
        /// The run that started it.
        started_by: String,
    },
    /// A command run ends normally (successfully or with an error it reported).
    RunFinished {
        /// Whether the run succeeded.
        ok: bool,
    },
}

/// A torn last line: the process died while appending it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TornTail {
    /// 1-based line number of the torn line.
    pub line: usize,
    /// How many bytes it had.
    pub bytes: usize,
}

/// An intent without an outcome: the operation was in flight when its run died.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InFlight {
    /// Operation ID.
    pub op: String,
    /// Action of the intent.
    pub action: String,
    /// Target of the intent.
    pub target: String,
    /// The run that wrote the intent.
    pub run: String,
    /// When the intent was written.
    pub at: Timestamp,
}

/// The parsed content of a journal.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Replay {
    /// All complete records, in order.
    pub records: Vec<Record>,
    /// A torn last line, if any (not included in `records`).
    pub torn_tail: Option<TornTail>,
    /// Byte length of the complete records (where a torn tail starts).
    valid_len: u64,
}

impl Replay {
    /// Intents that have no outcome and were not already reported as interrupted, in order.
    pub fn in_flight(&self) -> Vec<InFlight> {
        let mut closed = BTreeSet::new();
        for r in &self.records {
            match &r.event {
                Event::Done { op } | Event::Failed { op, .. } | Event::Interrupted { op, .. } => {
                    closed.insert(op.as_str());
                }
                _ => {}
            }
        }
        self.records
            .iter()
            .filter_map(|r| match &r.event {
                Event::Intent { op, action, target } if !closed.contains(op.as_str()) => {
                    Some(InFlight {
                        op: op.clone(),
                        action: action.clone(),
                        target: target.clone(),
                        run: r.run.clone(),
                        at: r.at,
                    })
                }
                _ => None,
            })
            .collect()
    }
}

/// Reads and parses the journal at `path`. A missing file is an empty journal.
pub fn read(path: &Path) -> Result<Replay, StateError> {
    let Some(bytes) = fsio::read_optional(path)? else {
        return Ok(Replay::default());
    };
    parse(path, &bytes)
}

fn parse(path: &Path, bytes: &[u8]) -> Result<Replay, StateError> {
    let mut replay = Replay::default();
    let mut offset = 0usize;
    let mut line_no = 0usize;
    while offset < bytes.len() {
        line_no += 1;
        let rest = &bytes[offset..];
        let Some(nl) = rest.iter().position(|&b| b == b'\n') else {
            // No newline: the append of this record never completed.
            replay.torn_tail = Some(TornTail {
                line: line_no,
                bytes: rest.len(),
            });
            break;
        };
        let line = &rest[..nl];
        let record: Record =
            serde_json::from_slice(line).map_err(|e| StateError::CorruptJournal {
                path: path.to_path_buf(),
                line: line_no,
                detail: e.to_string(),
            })?;
        replay.records.push(record);
        offset += nl + 1;
        replay.valid_len = offset as u64;
    }
    Ok(replay)
}

/// An open journal, appending records for one command run. Only open it while holding the
/// cluster lock.
#[derive(Debug)]
pub struct Journal {
    file: File,
    path: PathBuf,
    run: String,
    next_seq: u64,
    next_op: u64,
}

impl Journal {
    /// Opens (creating if needed) the journal at `path` for a new run of `command`: reads it, cuts
    /// off a torn tail, and appends a `run-started` record. Returns the journal and what it held
    /// before this run.
    pub fn open(path: &Path, command: &str) -> Result<(Journal, Replay), StateError> {
        let mut replay = read(path)?;
        if replay.records.len() > COMPACT_AT {
            let kept = compact(&replay.records, KEEP_RUNS);
            let mut bytes = Vec::new();
            for r in &kept {
                serde_json::to_writer(&mut bytes, r).map_err(|e| StateError::Io {
                    action: "encode journal record for",
                    path: path.to_path_buf(),
                    source: io::Error::other(e),
                })?;
                bytes.push(b'\n');
            }
            tracing::info!(
                path = %path.display(),
                before = replay.records.len(),
                after = kept.len(),
                "compacting the journal"
            );
            // Atomic: a crash leaves the old journal or the compacted one, never a mix.
            fsio::write_atomic(path, &bytes, FILE_MODE)?;
            replay = Replay {
                records: kept,
                torn_tail: None,
                valid_len: bytes.len() as u64,
            };
        }
        // Append mode: every write goes to the end, whatever the file offset.
        let file = OpenOptions::new()
            .append(true)
            .create(true)
            .mode(FILE_MODE)
            .open(path)
            .map_err(|source| StateError::Io {
                action: "open journal",
                path: path.to_path_buf(),
                source,
            })?;
        fsio::tighten(path, FILE_MODE)?;
        if let Some(torn) = &replay.torn_tail {
            tracing::warn!(
                path = %path.display(),
                line = torn.line,
                bytes = torn.bytes,
                "journal ends in a torn record from an interrupted write; dropping it"
            );
            file.set_len(replay.valid_len)
                .and_then(|()| file.sync_all())
                .map_err(|source| StateError::Io {
                    action: "cut torn record off journal",
                    path: path.to_path_buf(),
                    source,
                })?;
        }
        if let Some(dir) = path.parent() {
            fsio::sync_dir(dir)?;
        }
        let next_seq = replay.records.last().map_or(1, |r| r.seq + 1);
        let run = super::random_hex(4).map_err(|source| StateError::Io {
            action: "read random bytes for",
            path: path.to_path_buf(),
            source,
        })?;
        let mut journal = Journal {
            file,
            path: path.to_path_buf(),
            run,
            next_seq,
            next_op: 1,
        };
        journal.append(Event::RunStarted {
            pid: std::process::id(),
            command: command.to_owned(),
        })?;
        Ok((journal, replay))
    }

    /// ID of this run, as written in its records.
    pub fn run_id(&self) -> &str {
        &self.run
    }

    /// Path of the journal file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Appends one record and flushes it to disk before returning.
    pub fn append(&mut self, event: Event) -> Result<(), StateError> {
        let record = Record {
            seq: self.next_seq,
            at: Timestamp::now(),
            run: self.run.clone(),
            event,
        };
        let mut line = serde_json::to_vec(&record).map_err(|e| StateError::Io {
            action: "encode journal record for",
            path: self.path.clone(),
            source: io::Error::other(e),
        })?;
        line.push(b'\n');
        // One write per record: a crash can only tear the last line, which `open` handles.
        self.file
            .write_all(&line)
            .and_then(|()| self.file.sync_data())
            .map_err(|source| StateError::Io {
                action: "append to journal",
                path: self.path.clone(),
                source,
            })?;
        self.next_seq += 1;
        Ok(())
    }

    /// Records the intent to perform `action` on `target` and returns its operation ID.
    pub fn intent(&mut self, action: &str, target: &str) -> Result<String, StateError> {
        let op = format!("{}.{}", self.run, self.next_op);
        self.next_op += 1;
        self.append(Event::Intent {
            op: op.clone(),
            action: action.to_owned(),
            target: target.to_owned(),
        })?;
        Ok(op)
    }

    /// Records that `op` completed.
    pub fn done(&mut self, op: &str) -> Result<(), StateError> {
        self.append(Event::Done { op: op.to_owned() })
    }

    /// Records that `op` failed with `error`.
    pub fn failed(&mut self, op: &str, error: &str) -> Result<(), StateError> {
        self.append(Event::Failed {
            op: op.to_owned(),
            error: error.to_owned(),
        })
    }

    /// Records that an operation of an earlier run was found in flight.
    pub fn interrupted(&mut self, found: &InFlight) -> Result<(), StateError> {
        self.append(Event::Interrupted {
            op: found.op.clone(),
            action: found.action.clone(),
            target: found.target.clone(),
            started_by: found.run.clone(),
        })
    }

    /// Records the end of this run.
    pub fn finish(&mut self, ok: bool) -> Result<(), StateError> {
        self.append(Event::RunFinished { ok })
    }
}

#[cfg(test)]
mod tests {
    use std::fs;
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    #[test]
    fn a_long_journal_is_compacted_keeping_recent_runs_in_flight_ops_and_each_last_word()
    -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join(JOURNAL_FILE);
        // An old run leaves one op in flight and cordons a node for good.
        let (mut j, _) = Journal::open(&path, "clusterctl upgrade")?;
        let cordon = j.intent("cordon-node", "c1-w-0")?;
        j.done(&cordon)?;
        j.intent("replace-boot-disk", "c1-w-0")?;
        drop(j);
        // Then a year of a timer: many runs, each cordoning and uncordoning another node
        // (written straight into the file: appending them one by one with fsync takes long).
        let mut text = fs::read_to_string(&path)?;
        let mut seq = read(&path)?.records.last().map_or(0, |r| r.seq);
        let mut push = |run: &str, event: Event| -> anyhow::Result<()> {
            seq += 1;
            let r = Record {
                seq,
                at: Timestamp::now(),
                run: run.to_owned(),
                event,
            };
            text.push_str(&serde_json::to_string(&r)?);
            text.push('\n');
            Ok(())
        };
        for i in 0..COMPACT_AT / 5 + 10 {
            let run = format!("r{i}");
            push(
                &run,
                Event::RunStarted {
                    pid: 1,
                    command: "clusterctl repair".into(),
                },
            )?;
            for (n, action) in ["cordon-node", "uncordon-node"].into_iter().enumerate() {
                let op = format!("{run}.{n}");
                push(
                    &run,
                    Event::Intent {
                        op: op.clone(),
                        action: action.into(),
                        target: "c1-w-1".into(),
                    },
                )?;
                push(&run, Event::Done { op })?;
            }
            push(&run, Event::RunFinished { ok: true })?;
        }
        fs::write(&path, text)?;
        let before = read(&path)?;
        let (j, replay) = Journal::open(&path, "clusterctl get")?;
        drop(j);
        let after = read(&path)?;
        assert!(
            after.records.len() < before.records.len() / 4,
            "{} -> {} records",
            before.records.len(),
            after.records.len()
        );
        assert_eq!(replay.records.len() + 1, after.records.len());
        // The in-flight op is still in flight; the old cordon of c1-w-0 is still its last word;
        // c1-w-1's last word is its last uncordon.
        let flying = after.in_flight();
        assert_eq!(flying.len(), 1, "{flying:?}");
        assert_eq!(flying[0].action, "replace-boot-disk");
        let last = |target: &str| {
            after
                .records
                .iter()
                .filter_map(|r| match &r.event {
                    Event::Intent {
                        action, target: t, ..
                    } if t == target && action.contains("cordon") => Some(action.clone()),
                    _ => None,
                })
                .next_back()
        };
        assert_eq!(last("c1-w-0").as_deref(), Some("cordon-node"));
        assert_eq!(last("c1-w-1").as_deref(), Some("uncordon-node"));
        // Order and sequence numbers are kept; the file stays private.
        assert!(after.records.windows(2).all(|w| w[0].seq < w[1].seq));
        assert_eq!(fs::metadata(&path)?.permissions().mode() & 0o777, 0o600);
        Ok(())
    }

    #[test]
    fn records_round_trip_and_in_flight_lists_intents_without_outcome() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join(JOURNAL_FILE);
        let (mut j, before) = Journal::open(&path, "clusterctl create")?;
        assert!(before.records.is_empty());
        let a = j.intent("ensure-machine", "c1-cp-0")?;
        j.done(&a)?;
        let b = j.intent("ensure-machine", "c1-pool-a-0")?;
        j.failed(&b, "boom")?;
        let c = j.intent("ensure-machine", "c1-pool-a-1")?;
        let run1 = j.run_id().to_owned();
        drop(j); // the process "dies" with `c` in flight

        let replay = read(&path)?;
        assert_eq!(replay.records.len(), 6);
        assert_eq!(
            replay.records.iter().map(|r| r.seq).collect::<Vec<_>>(),
            vec![1, 2, 3, 4, 5, 6]
        );
        let inflight = replay.in_flight();
        assert_eq!(inflight.len(), 1);
        assert_eq!(
            (inflight[0].op.as_str(), inflight[0].target.as_str()),
            (c.as_str(), "c1-pool-a-1")
        );
        assert_eq!(inflight[0].run, run1);

        let (mut j2, before) = Journal::open(&path, "clusterctl create")?;
        assert_ne!(j2.run_id(), run1);
        for f in before.in_flight() {
            j2.interrupted(&f)?;
        }
        j2.finish(true)?;
        let after = read(&path)?;
        assert!(
            after.in_flight().is_empty(),
            "reported interruptions are not reported again"
        );
        assert_eq!(after.records.last().map(|r| r.seq), Some(9));
        assert_eq!(fs::metadata(&path)?.permissions().mode() & 0o777, 0o600);
        Ok(())
    }

    #[test]
    fn torn_last_line_is_reported_and_cut_before_appending() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join(JOURNAL_FILE);
        let (mut j, _) = Journal::open(&path, "clusterctl create")?;
        let op = j.intent("ensure-machine", "c1-cp-0")?;
        drop(j);
        // Simulate a crash in the middle of appending the next record.
        let mut f = OpenOptions::new().append(true).open(&path)?;
        f.write_all(br#"{"seq":3,"at":"2026-11-26T20:00:00Z","run":"x","event":"do"#)?;
        drop(f);

        let replay = read(&path)?;
        assert_eq!(replay.records.len(), 2);
        assert_eq!(replay.torn_tail, Some(TornTail { line: 3, bytes: 58 }));
        assert_eq!(
            replay.in_flight().len(),
            1,
            "the torn `done` does not count"
        );

        let (mut j2, before) = Journal::open(&path, "clusterctl create")?;
        assert_eq!(before.torn_tail.as_ref().map(|t| t.line), Some(3));
        j2.interrupted(&before.in_flight()[0])?;
        drop(j2);
        let after = read(&path)?;
        assert_eq!(after.torn_tail, None, "the torn tail was cut off");
        assert_eq!(after.records.len(), 4);
        assert!(matches!(&after.records[3].event, Event::Interrupted { op: o, .. } if *o == op));
        Ok(())
    }

    #[test]
    fn corruption_before_the_end_is_an_error_naming_file_and_line() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join(JOURNAL_FILE);
        let (mut j, _) = Journal::open(&path, "clusterctl create")?;
        j.intent("ensure-machine", "c1-cp-0")?;
        drop(j);
        let mut text = fs::read_to_string(&path)?;
        text = text.replacen("\"seq\":2", "\"seq\":\"two\"", 1);
        fs::write(&path, &text)?;
        let err = read(&path).err().map(|e| e.to_string()).unwrap_or_default();
        assert!(
            err.starts_with(&format!("journal {} is corrupt at line 2:", path.display())),
            "{err}"
        );
        assert!(err.contains("move the file aside"), "{err}");
        // Opening for a new run fails the same way and does not touch the file.
        assert!(Journal::open(&path, "x").is_err());
        assert_eq!(fs::read_to_string(&path)?, text);

        // A complete but garbled last line (it has its newline) is corruption, not a torn tail.
        fs::write(&path, "not json\n")?;
        assert!(matches!(
            read(&path),
            Err(StateError::CorruptJournal { line: 1, .. })
        ));
        Ok(())
    }
}
