//! SFTP uploads against a real OpenSSH server on 127.0.0.1: a 100 MB file with integrity check,
//! the skip when unchanged, mode handling, in-memory data, atomic replacement.

mod support;

use std::fs;
use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::Instant;

use clusterctl::ssh::{RemoteFile, SshError, UploadOutcome};
use sha2::{Digest, Sha256};
use support::Fixture;

/// Writes `size` bytes of pseudo-random (incompressible, non-repeating) data, different for each
/// `seed`.
fn write_random_file(path: &Path, size: usize, seed: u64) -> String {
    let mut file = fs::File::create(path).expect("create");
    let mut hasher = Sha256::new();
    let mut state: u64 = 0x9E37_79B9_7F4A_7C15 ^ seed;
    let mut chunk = vec![0u8; 1 << 20];
    let mut written = 0;
    while written < size {
        for word in chunk.chunks_exact_mut(8) {
            // xorshift64*
            state ^= state >> 12;
            state ^= state << 25;
            state ^= state >> 27;
            word.copy_from_slice(&state.wrapping_mul(0x2545_F491_4F6C_DD1D).to_le_bytes());
        }
        let n = chunk.len().min(size - written);
        file.write_all(&chunk[..n]).expect("write");
        hasher.update(&chunk[..n]);
        written += n;
    }
    hex::encode(hasher.finalize())
}

fn sha256_of(path: &Path) -> String {
    hex::encode(Sha256::digest(fs::read(path).expect("read")))
}

fn mode_of(path: &Path) -> u32 {
    fs::metadata(path).expect("metadata").permissions().mode() & 0o7777
}

fn leftovers(dir: &Path) -> Vec<String> {
    fs::read_dir(dir)
        .expect("read dir")
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains("clusterctl-") && n.ends_with(".tmp"))
        .collect()
}

#[tokio::test]
async fn hundred_megabyte_upload_is_verified_and_skipped_when_unchanged() {
    let fx = Fixture::new();
    let sshd = fx.sshd();
    let client = fx.client(sshd.pinned());
    let session = client.connect(&fx.target(&sshd)).await.expect("connect");

    let local = fx.path().join("payload.bin");
    let size = 100 << 20;
    let sum = write_random_file(&local, size, 0);
    // The "remote" machine is this one: the destination is a local path we can inspect.
    let remote_dir = fx.path().join("remote").join("opt").join("bin");
    let remote = remote_dir.join("payload.bin");
    let remote_s = remote.to_str().expect("utf-8");

    let start = Instant::now();
    let outcome = session
        .upload_file(&local, remote_s, 0o755)
        .await
        .expect("upload");
    let first = start.elapsed();
    assert_eq!(
        outcome,
        UploadOutcome::Uploaded {
            bytes: size as u64,
            sha256: sum.clone()
        }
    );
    assert_eq!(sha256_of(&remote), sum);
    assert_eq!(mode_of(&remote), 0o755);
    assert!(
        leftovers(&remote_dir).is_empty(),
        "temp files left: {:?}",
        leftovers(&remote_dir)
    );
    eprintln!(
        "100 MiB upload: {first:?} ({:.0} MiB/s)",
        100.0 / first.as_secs_f64()
    );

    // Same content again: nothing is transferred.
    let start = Instant::now();
    let outcome = session
        .upload_file(&local, remote_s, 0o755)
        .await
        .expect("re-upload");
    let second = start.elapsed();
    assert_eq!(
        outcome,
        UploadOutcome::Unchanged {
            sha256: sum.clone()
        }
    );
    assert!(
        second < first,
        "skip ({second:?}) must be cheaper than upload ({first:?})"
    );
    let inode = fs::metadata(&remote).expect("meta");
    use std::os::unix::fs::MetadataExt;
    let ino = inode.ino();

    // Same content, other mode: only the mode changes.
    let outcome = session
        .upload_file(&local, remote_s, 0o640)
        .await
        .expect("chmod");
    assert!(matches!(outcome, UploadOutcome::Unchanged { .. }));
    assert_eq!(mode_of(&remote), 0o640);
    assert_eq!(
        fs::metadata(&remote).expect("meta").ino(),
        ino,
        "file was not rewritten"
    );

    // One byte changed: uploaded again, and replaced atomically (new inode, never truncated).
    {
        let mut f = fs::OpenOptions::new()
            .write(true)
            .open(&local)
            .expect("open");
        f.write_all(b"X").expect("patch");
    }
    let new_sum = sha256_of(&local);
    assert_ne!(new_sum, sum);
    let outcome = session
        .upload_file(&local, remote_s, 0o640)
        .await
        .expect("upload change");
    assert_eq!(outcome.sha256(), new_sum);
    assert!(matches!(outcome, UploadOutcome::Uploaded { .. }));
    assert_eq!(sha256_of(&remote), new_sum);
    assert_ne!(
        fs::metadata(&remote).expect("meta").ino(),
        ino,
        "must be renamed into place"
    );
    assert!(leftovers(&remote_dir).is_empty());
}

#[tokio::test]
async fn in_memory_upload_creates_directories_and_is_atomic() {
    let fx = Fixture::new();
    let sshd = fx.sshd();
    let client = fx.client(sshd.pinned());
    let session = client.connect(&fx.target(&sshd)).await.expect("connect");

    let remote = fx
        .path()
        .join("etc")
        .join("kubernetes")
        .join("it's a config.yaml");
    let remote_s = remote.to_str().expect("utf-8");
    let data = b"apiVersion: v1\nkind: Config\n";
    let outcome = session
        .upload_bytes(data, remote_s, 0o600)
        .await
        .expect("upload bytes");
    assert!(
        matches!(outcome, UploadOutcome::Uploaded { bytes: 28, .. }),
        "{outcome:?}"
    );
    assert_eq!(fs::read(&remote).expect("read"), data);
    assert_eq!(mode_of(&remote), 0o600);
    let again = session
        .upload_bytes(data, remote_s, 0o600)
        .await
        .expect("again");
    assert!(matches!(again, UploadOutcome::Unchanged { .. }));

    // Empty content is a valid file too.
    let empty = fx.path().join("empty");
    let outcome = session
        .upload_bytes(b"", empty.to_str().expect("utf-8"), 0o644)
        .await
        .expect("empty upload");
    assert!(matches!(outcome, UploadOutcome::Uploaded { bytes: 0, .. }));
    assert_eq!(fs::read(&empty).expect("read").len(), 0);
}

#[tokio::test]
async fn upload_errors_are_clear() {
    let fx = Fixture::new();
    let sshd = fx.sshd();
    let client = fx.client(sshd.pinned());
    let session = client.connect(&fx.target(&sshd)).await.expect("connect");

    let err = session
        .upload_bytes(b"x", "relative/path", 0o644)
        .await
        .expect_err("relative path");
    assert!(matches!(err, SshError::InvalidRemotePath { .. }), "{err}");

    let missing = fx.path().join("does-not-exist");
    let err = session
        .upload_file(&missing, "/tmp/never", 0o644)
        .await
        .expect_err("missing local file");
    let msg = err.to_string();
    assert!(msg.contains("does-not-exist"), "{msg}");
    assert!(matches!(err, SshError::LocalFile { .. }), "{msg}");

    // A destination whose parent is a regular file cannot be created.
    let file = fx.path().join("plainfile");
    fs::write(&file, b"").expect("write");
    let bad = file.join("sub").join("x");
    let err = session
        .upload_bytes(b"x", bad.to_str().expect("utf-8"), 0o644)
        .await
        .expect_err("parent is a file");
    let msg = err.to_string();
    assert!(msg.contains(&format!("127.0.0.1:{}", sshd.port)), "{msg}");
    assert!(matches!(err, SshError::CommandFailed { .. }), "{msg}");
}

#[tokio::test]
async fn recorded_checksum_skips_hashing_only_while_the_file_is_untouched() {
    use std::os::unix::fs::MetadataExt;
    let fx = Fixture::new();
    let sshd = fx.sshd();
    let client = fx.client(sshd.pinned());
    let session = client.connect(&fx.target(&sshd)).await.expect("connect");

    let local = fx.path().join("tool");
    let sum = write_random_file(&local, 1 << 20, 0);
    let remote_dir = fx.path().join("remote");
    let remote = remote_dir.join("tool");
    let remote_s = remote.to_str().expect("utf-8");
    let sidecar = remote_dir.join(format!(".tool{}", clusterctl::ssh::SUM_SUFFIX));

    let outcome = session
        .upload_file(&local, remote_s, 0o755)
        .await
        .expect("upload");
    assert!(matches!(outcome, UploadOutcome::Uploaded { .. }));
    let meta = fs::metadata(&remote).expect("meta");
    let identity = format!(
        "{} {} {}.{:09}",
        meta.size(),
        meta.ino(),
        meta.ctime(),
        meta.ctime_nsec()
    );
    let record = fs::read_to_string(&sidecar).expect("checksum recorded");
    let fields: Vec<&str> = record.trim_end().splitn(3, ' ').collect();
    assert_eq!(fields.len(), 3, "{record}");
    assert_eq!(fields[0], sum);
    assert_eq!(fields[2], identity);
    let recorded_at: i64 = fields[1].parse().expect("recorded at");
    assert!(recorded_at > meta.ctime(), "{record}");

    // A record with the file's identity is believed without reading the file: a forged checksum
    // in it makes clusterctl upload the (identical) file again.
    fs::write(
        &sidecar,
        format!("{} {recorded_at} {identity}\n", "0".repeat(64)),
    )
    .expect("forge");
    let outcome = session
        .upload_file(&local, remote_s, 0o755)
        .await
        .expect("upload over a forged record");
    assert!(
        matches!(outcome, UploadOutcome::Uploaded { .. }),
        "the record is read while the identity holds: {outcome:?}"
    );
    assert_eq!(sha256_of(&remote), sum);

    // The file changed in place, same size, mtime put back: its ctime moved, so it is hashed
    // and uploaded again.
    let mtime = fs::metadata(&remote)
        .expect("meta")
        .modified()
        .expect("mtime");
    {
        let mut f = fs::OpenOptions::new()
            .write(true)
            .open(&remote)
            .expect("open remote");
        f.write_all(b"tampered").expect("write");
        f.set_modified(mtime).expect("restore mtime");
    }
    assert_ne!(sha256_of(&remote), sum);
    let outcome = session
        .upload_file(&local, remote_s, 0o755)
        .await
        .expect("upload after tampering");
    assert!(
        matches!(outcome, UploadOutcome::Uploaded { .. }),
        "a changed file was taken as unchanged: {outcome:?}"
    );
    assert_eq!(sha256_of(&remote), sum);
    // Untouched since: skipped.
    let outcome = session
        .upload_file(&local, remote_s, 0o755)
        .await
        .expect("upload unchanged");
    assert!(matches!(outcome, UploadOutcome::Unchanged { .. }));
    assert!(leftovers(&remote_dir).is_empty());
}

#[tokio::test]
async fn many_destinations_are_probed_in_one_command_and_only_what_differs_is_sent() {
    use clusterctl::ssh::FileUpload;
    let fx = Fixture::new();
    let sshd = fx.sshd();
    let client = fx.client(sshd.pinned());
    let session = client.connect(&fx.target(&sshd)).await.expect("connect");

    let (a, b) = (fx.path().join("a"), fx.path().join("b"));
    let sum_a = write_random_file(&a, 1 << 20, 1);
    let sum_b = write_random_file(&b, 1 << 20, 2);
    let remote_dir = fx.path().join("remote").join("bin");
    let (ra, rb, rc) = (
        remote_dir.join("a").display().to_string(),
        remote_dir.join("b").display().to_string(),
        remote_dir.join("missing").display().to_string(),
    );
    let marker = fx.path().join("marker");
    let mark = format!("echo replaced >> {}", marker.display());
    let uploads = [
        FileUpload {
            sha256: Some(&sum_a),
            before_replace: Some(&mark),
            ..FileUpload::new(&a, &ra, 0o755)
        },
        FileUpload {
            sha256: Some(&sum_b),
            before_replace: Some(&mark),
            ..FileUpload::new(&b, &rb, 0o755)
        },
    ];
    let before = session.exec_count();
    let there = session
        .probe_uploads(None, &[&ra, &rb, &rc])
        .await
        .expect("probe");
    assert_eq!(session.exec_count() - before, 1, "one command for all");
    assert_eq!(there.len(), 3);
    assert!(there.iter().all(|t| t.sha256().is_none()), "{there:?}");
    for (upload, there) in uploads.iter().zip(&there) {
        let outcome = session.upload_probed(upload, there).await.expect("upload");
        assert!(matches!(outcome, UploadOutcome::Uploaded { .. }));
    }
    assert_eq!(
        fs::read_to_string(&marker).expect("marker"),
        "replaced\nreplaced\n",
        "the command ran before each replacement"
    );
    assert_eq!(sha256_of(Path::new(&ra)), sum_a);

    // Probed again: a has its sum; with the sum known the local file is not even read (here it
    // is gone), and nothing runs on the server.
    fs::remove_file(&marker).expect("rm marker");
    let there = session
        .probe_uploads(None, &[&ra, &rb])
        .await
        .expect("probe");
    assert_eq!(there[0].sha256(), Some(sum_a.as_str()));
    let gone = fx.path().join("gone");
    let before = session.exec_count();
    let outcome = session
        .upload_probed(
            &FileUpload {
                sha256: Some(&sum_a),
                before_replace: Some(&mark),
                ..FileUpload::new(&gone, &ra, 0o755)
            },
            &there[0],
        )
        .await
        .expect("unchanged");
    assert_eq!(
        outcome,
        UploadOutcome::Unchanged {
            sha256: sum_a.clone()
        }
    );
    assert_eq!(session.exec_count(), before, "nothing ran");
    assert!(!marker.exists(), "nothing replaced, nothing marked");

    // b changed locally, but its caller still says the old sum (it was verified before the
    // change): refused where it would be sent, nothing put in place and nothing marked.
    let new_b = write_random_file(&b, 1 << 20, 3);
    let err = session
        .upload_probed(
            &FileUpload {
                remote: &rc,
                ..uploads[1]
            },
            &RemoteFile::default(),
        )
        .await
        .expect_err("a local file that changed since it was verified");
    assert!(matches!(err, SshError::LocalFileChanged { .. }), "{err}");
    assert!(err.to_string().contains(&new_b), "{err}");
    assert!(!Path::new(&rc).exists());
    assert!(!marker.exists());

    // The command before the replacement fails: nothing is replaced.
    let refused = FileUpload {
        sha256: Some(&new_b),
        before_replace: Some("false"),
        ..FileUpload::new(&b, &rb, 0o755)
    };
    let err = session
        .upload_probed(&refused, &there[1])
        .await
        .expect_err("before_replace failed");
    assert!(matches!(err, SshError::CommandFailed { .. }), "{err}");
    assert_eq!(sha256_of(Path::new(&rb)), sum_b);
    assert!(
        leftovers(&remote_dir).is_empty(),
        "{:?}",
        leftovers(&remote_dir)
    );
}

#[tokio::test]
async fn staged_files_are_written_private_over_one_sftp_session_and_never_over_a_file() {
    let fx = Fixture::new();
    let sshd = fx.sshd();
    let client = fx.client(sshd.pinned());
    let session = client.connect(&fx.target(&sshd)).await.expect("connect");

    let dir = fx.path().join("staging");
    fs::create_dir(&dir).expect("staging");
    let paths: Vec<String> = (0..20)
        .map(|i| dir.join(format!("f{i}")).display().to_string())
        .collect();
    let contents: Vec<Vec<u8>> = (0..20)
        .map(|i| format!("file {i}\n").into_bytes())
        .collect();
    let files: Vec<(&str, &[u8])> = paths
        .iter()
        .map(String::as_str)
        .zip(contents.iter().map(Vec::as_slice))
        .collect();
    let (execs, sftps) = (session.exec_count(), session.sftp_count());
    session.put_files(&files).await.expect("put files");
    assert_eq!(session.exec_count(), execs, "no command");
    assert_eq!(session.sftp_count(), sftps + 1, "one sftp session");
    for (path, content) in &files {
        assert_eq!(fs::read(path).expect("read").as_slice(), *content);
        assert_eq!(mode_of(Path::new(path)), 0o600);
    }
    // An existing file (or link) is never written through.
    let err = session
        .put_files(&files[..1])
        .await
        .expect_err("the file exists");
    assert!(matches!(err, SshError::Sftp { .. }), "{err}");
}
