//! `clusterctl load NAME ARCHIVE...`: side-load container image archives into the containerd of
//! every node, over the cluster's pinned SSH connections (as `kind load image-archive`, `k3d
//! image import` and `minikube image load` do for their clusters). This is how an air-gapped
//! cluster gets images no registry can serve it: test images, a vendor's images, a hot fix.
//!
//! The archives are read here first: each must be an uncompressed image archive, a
//! docker-archive (`docker save`: `manifest.json` with `RepoTags`) or an OCI image layout
//! (`index.json` with `io.containerd.image.name` or `org.opencontainers.image.ref.name`
//! annotations), and must name at least one image. Nothing is sent before every archive passed.
//!
//! On each node (all nodes at once): the references already in containerd's `k8s.io` namespace
//! are listed; an archive whose references are all there is skipped (so a re-run after a kill,
//! or a second run, sends nothing); otherwise it is uploaded (verified by sha256) to
//! [`STAGING`], imported with `ctr -n k8s.io images import`, checked for every reference it
//! names, and removed (containerd keeps the content). Loading takes no node down, so it takes no
//! cluster lock and writes no journal: every step is idempotent and a re-run finishes it.

use std::collections::BTreeSet;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context as _, bail};

use super::{load_cluster, pinned_endpoint, runtime};
use crate::engine::Reporter;
use crate::engine::access;
use crate::ssh::{ExecOptions, RetryPolicy, Target, shell_quote};
use crate::state::StateStore;

/// Where archives wait on a node while containerd imports them.
pub const STAGING: &str = "/var/lib/clusterctl/staging/load";

/// How long one node may take to import one archive.
const IMPORT_TIMEOUT: Duration = Duration::from_secs(600);

/// An image archive checked on the admin machine.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Archive {
    /// The file.
    pub path: PathBuf,
    /// The image references it holds (sorted).
    pub references: Vec<String>,
}

/// What `load` did on one node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeLoad {
    /// The node (its machine's name).
    pub node: String,
    /// References imported by this run.
    pub imported: Vec<String>,
    /// References that were there already (their archives were not sent).
    pub present: Vec<String>,
    /// Bytes uploaded to this node.
    pub bytes_sent: u64,
}

/// Reads the image references an archive holds, refusing what `ctr images import` cannot load.
pub fn inspect(path: &Path) -> anyhow::Result<Archive> {
    let mut file = std::fs::File::open(path)
        .with_context(|| format!("cannot open image archive {}", path.display()))?;
    let mut magic = [0u8; 2];
    let n = file.read(&mut magic).unwrap_or(0);
    if n == 2 && magic == [0x1f, 0x8b] {
        bail!(
            "{} is gzip-compressed; containerd imports uncompressed archives: `gunzip` it (or `docker save` without `| gzip`) and load the .tar",
            path.display()
        );
    }
    let file = std::fs::File::open(path)
        .with_context(|| format!("cannot open image archive {}", path.display()))?;
    let mut tar = tar::Archive::new(file);
    let mut docker: Option<Vec<u8>> = None;
    let mut oci: Option<Vec<u8>> = None;
    let entries = tar
        .entries()
        .with_context(|| format!("{} is not a tar archive", path.display()))?;
    for entry in entries {
        let mut entry =
            entry.with_context(|| format!("{} is not a readable tar archive", path.display()))?;
        let name = entry
            .path()?
            .to_string_lossy()
            .trim_start_matches("./")
            .to_owned();
        let slot = match name.as_str() {
            "manifest.json" => &mut docker,
            "index.json" => &mut oci,
            _ => continue,
        };
        let mut bytes = Vec::new();
        entry
            .by_ref()
            .take(16 << 20)
            .read_to_end(&mut bytes)
            .with_context(|| format!("reading {name} in {}", path.display()))?;
        *slot = Some(bytes);
    }
    let mut references = BTreeSet::new();
    if let Some(bytes) = &docker {
        let doc: serde_json::Value = serde_json::from_slice(bytes)
            .with_context(|| format!("manifest.json in {} is not valid JSON", path.display()))?;
        for image in doc.as_array().into_iter().flatten() {
            for tag in image["RepoTags"].as_array().into_iter().flatten() {
                if let Some(tag) = tag.as_str() {
                    references.insert(normalize(tag));
                }
            }
        }
    } else if let Some(bytes) = &oci {
        let doc: serde_json::Value = serde_json::from_slice(bytes)
            .with_context(|| format!("index.json in {} is not valid JSON", path.display()))?;
        for m in doc["manifests"].as_array().into_iter().flatten() {
            let ann = &m["annotations"];
            if let Some(name) = ann["io.containerd.image.name"]
                .as_str()
                .or_else(|| ann["org.opencontainers.image.ref.name"].as_str())
                .filter(|n| n.contains(':') || n.contains('@'))
            {
                references.insert(normalize(name));
            }
        }
    } else {
        bail!(
            "{} is not an image archive: it has neither manifest.json (docker save) nor index.json (an OCI image layout)",
            path.display()
        );
    }
    if references.is_empty() {
        bail!(
            "{} names no image (no RepoTags, no image-name annotation), so the image would be loaded without a name pods could use; tag it before saving (`docker save REPO:TAG`)",
            path.display()
        );
    }
    Ok(Archive {
        path: path.to_owned(),
        references: references.into_iter().collect(),
    })
}

/// The name containerd gives a reference: Docker Hub's short names made full
/// (`busybox:1.29` -> `docker.io/library/busybox:1.29`), as `ctr images import` stores them.
pub fn normalize(reference: &str) -> String {
    let (first, rest) = match reference.split_once('/') {
        Some((first, rest)) => (first, Some(rest)),
        None => (reference, None),
    };
    let is_host = |s: &str| s.contains('.') || s.contains(':') || s == "localhost";
    match rest {
        None => format!("docker.io/library/{reference}"),
        Some(_) if is_host(first) => reference.to_owned(),
        Some(_) => format!("docker.io/{reference}"),
    }
}

/// Loads `archives` into every node of cluster `name` (or only into `only`, if given).
pub fn load(
    store: &StateStore,
    name: &str,
    archives: &[PathBuf],
    only: &[String],
    report: Reporter,
) -> anyhow::Result<Vec<NodeLoad>> {
    if archives.is_empty() {
        bail!("name at least one image archive to load");
    }
    let archives = archives
        .iter()
        .map(|p| inspect(p))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let record = load_cluster(store, name)?;
    for node in only {
        if !record.machines.iter().any(|m| &m.name == node) {
            let known: Vec<&str> = record.machines.iter().map(|m| m.name.as_str()).collect();
            bail!(
                "cluster {name:?} has no node {node:?}; its nodes are {}",
                known.join(", ")
            );
        }
    }
    let machines: Vec<&providers::Machine> = record
        .machines
        .iter()
        .filter(|m| only.is_empty() || only.contains(&m.name))
        .collect();
    if machines.is_empty() {
        bail!("cluster {name:?} has no machines yet; run `clusterctl create` first");
    }
    let mut pins = Vec::new();
    for m in &machines {
        pins.push((m.name.clone(), pinned_endpoint(&record, m)?));
    }
    let rt = runtime()?;
    let identity = rt.block_on(access::client_identity(
        &record.spec.spec.ssh,
        store,
        name,
        None,
    ))?;
    let client = access::pinned_client(
        &identity,
        &pins.iter().map(|(_, p)| p.clone()).collect::<Vec<_>>(),
        RetryPolicy::for_up_to(Duration::from_secs(30)),
    )?;
    let total: usize = archives.iter().map(|a| a.references.len()).sum();
    report.phase(&format!(
        "Loading {total} image(s) from {} archive(s) into {} node(s)",
        archives.len(),
        machines.len()
    ));
    let lines = report.lines();
    let archives = std::sync::Arc::new(archives);
    let results = rt.block_on(async {
        let mut set = tokio::task::JoinSet::new();
        for (i, (node, (endpoint, _))) in pins.iter().enumerate() {
            let target = Target::new(endpoint.host.clone(), endpoint.port, identity.user.clone());
            let line = std::sync::Arc::new(lines.line(node));
            let client = client.clone();
            let archives = archives.clone();
            let node = node.clone();
            set.spawn(async move {
                let result = load_node(&client, &target, &node, &archives, &line).await;
                match &result {
                    Ok(done) => line.finish(&format!(
                        "{} imported, {} already there ({:.1} MiB sent)",
                        done.imported.len(),
                        done.present.len(),
                        done.bytes_sent as f64 / f64::from(1u32 << 20)
                    )),
                    Err(e) => line.finish(&format!("failed: {e:#}")),
                }
                (i, result)
            });
        }
        let mut results = Vec::new();
        while let Some(joined) = set.join_next().await {
            results.push(
                joined.unwrap_or_else(|e| {
                    (usize::MAX, Err(anyhow::anyhow!("a load task died: {e}")))
                }),
            );
        }
        results.sort_by_key(|(i, _)| *i);
        results.into_iter().map(|(_, r)| r).collect::<Vec<_>>()
    });
    let mut done = Vec::new();
    let mut failed = Vec::new();
    for r in results {
        match r {
            Ok(n) => done.push(n),
            Err(e) => failed.push(format!("{e:#}")),
        }
    }
    if !failed.is_empty() {
        bail!(
            "loading failed on {} of {} node(s): {}; run the same `clusterctl load` again: what is loaded already is not sent twice",
            failed.len(),
            machines.len(),
            failed.join("; ")
        );
    }
    Ok(done)
}

async fn load_node(
    client: &crate::ssh::SshClient,
    target: &Target,
    node: &str,
    archives: &[Archive],
    line: &crate::engine::report::MachineLine,
) -> anyhow::Result<NodeLoad> {
    line.say("connecting");
    let session = client
        .connect(target)
        .await
        .with_context(|| format!("node {node}: connecting"))?;
    let result = async {
        let have = root(&session, "ctr -n k8s.io images ls -q", Duration::from_secs(60))
            .await
            .with_context(|| format!("node {node}: listing containerd's images"))?;
        let have: BTreeSet<&str> = have.lines().map(str::trim).collect();
        let mut out = NodeLoad {
            node: node.to_owned(),
            imported: Vec::new(),
            present: Vec::new(),
            bytes_sent: 0,
        };
        for archive in archives {
            if archive.references.iter().all(|r| have.contains(r.as_str())) {
                out.present.extend(archive.references.iter().cloned());
                continue;
            }
            let file = archive
                .path
                .file_name()
                .map_or_else(|| "archive.tar".into(), |f| f.to_string_lossy().into_owned());
            line.say(&format!("uploading {file}"));
            let remote = format!("{STAGING}/{}", sanitize(&file));
            let up = session
                .upload_file(&archive.path, &remote, 0o600)
                .await
                .with_context(|| format!("node {node}: uploading {}", archive.path.display()))?;
            if let crate::ssh::UploadOutcome::Uploaded { bytes, .. } = up {
                out.bytes_sent += bytes;
            }
            line.say(&format!("importing {file}"));
            let mut script = format!(
                "set -eu\nctr -n k8s.io images import {r} >/dev/null\nhave=$(ctr -n k8s.io images ls -q)\nrm -f {r}\n",
                r = shell_quote(&remote)
            );
            for reference in &archive.references {
                script.push_str(&format!(
                    "printf '%s\\n' \"$have\" | grep -qxF {q} || {{ echo \"containerd has no image {reference} after importing {file}\" >&2; exit 1; }}\n",
                    q = shell_quote(reference)
                ));
            }
            root(&session, &script, IMPORT_TIMEOUT)
                .await
                .with_context(|| format!("node {node}: importing {}", archive.path.display()))?;
            out.imported.extend(archive.references.iter().cloned());
        }
        Ok(out)
    }
    .await;
    session.close().await;
    result
}

/// Runs `script` as root on the node; its stdout, or an error with its last words.
async fn root(
    session: &crate::ssh::Session,
    script: &str,
    timeout: Duration,
) -> anyhow::Result<String> {
    let out = session
        .exec_with(
            "sudo -n sh -s",
            ExecOptions {
                timeout: Some(timeout),
                stdin: Some(script.as_bytes()),
                ..Default::default()
            },
        )
        .await?;
    if !out.success() {
        let mut detail = out.stderr_text().trim().to_owned();
        if detail.is_empty() {
            detail = out.stdout_text().trim().to_owned();
        }
        bail!(
            "exit status {}: {detail}",
            out.exit_status.map_or("none".into(), |s| s.to_string())
        );
    }
    Ok(out.stdout_text())
}

/// A file name safe to use on the node (no path separators, no leading dots).
fn sanitize(file: &str) -> String {
    let s: String = file
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "-_.".contains(c) {
                c
            } else {
                '_'
            }
        })
        .collect();
    let s = s.trim_start_matches('.').to_owned();
    if s.is_empty() {
        "archive.tar".into()
    } else {
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tar_with(files: &[(&str, &[u8])]) -> tempfile::NamedTempFile {
        let f = tempfile::NamedTempFile::new().unwrap();
        let mut b = tar::Builder::new(f.reopen().unwrap());
        for (name, data) in files {
            let mut h = tar::Header::new_gnu();
            h.set_size(data.len() as u64);
            h.set_mode(0o644);
            h.set_cksum();
            b.append_data(&mut h, name, *data).unwrap();
        }
        b.finish().unwrap();
        f
    }

    #[test]
    fn docker_archives_name_their_tags_normalized() {
        let f = tar_with(&[
            ("abc/layer.tar", b"x"),
            (
                "manifest.json",
                br#"[{"Config":"c.json","RepoTags":["busybox:1.29","localhost/x/agnhost:2.21"],"Layers":["abc/layer.tar"]}]"#,
            ),
        ]);
        let a = inspect(f.path()).unwrap();
        assert_eq!(
            a.references,
            vec![
                "docker.io/library/busybox:1.29".to_owned(),
                "localhost/x/agnhost:2.21".to_owned()
            ]
        );
    }

    #[test]
    fn oci_layouts_name_their_annotated_images() {
        let f = tar_with(&[
            ("oci-layout", br#"{"imageLayoutVersion":"1.0.0"}"#),
            (
                "index.json",
                br#"{"schemaVersion":2,"manifests":[{"digest":"sha256:00","annotations":{"io.containerd.image.name":"k8s.gcr.io/pause:3.2","org.opencontainers.image.ref.name":"3.2"}}]}"#,
            ),
        ]);
        assert_eq!(
            inspect(f.path()).unwrap().references,
            vec!["k8s.gcr.io/pause:3.2".to_owned()]
        );
    }

    #[test]
    fn what_cannot_be_loaded_is_refused_with_what_to_do() {
        let untagged = tar_with(&[("manifest.json", br#"[{"Config":"c.json","RepoTags":null}]"#)]);
        let e = format!("{:#}", inspect(untagged.path()).unwrap_err());
        assert!(
            e.contains("names no image") && e.contains("docker save REPO:TAG"),
            "{e}"
        );
        let other = tar_with(&[("hello.txt", b"hi")]);
        let e = format!("{:#}", inspect(other.path()).unwrap_err());
        assert!(e.contains("is not an image archive"), "{e}");
        let gz = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(gz.path(), [0x1f, 0x8b, 8, 0]).unwrap();
        let e = format!("{:#}", inspect(gz.path()).unwrap_err());
        assert!(e.contains("gzip-compressed") && e.contains("gunzip"), "{e}");
        let bad = tar_with(&[("manifest.json", b"{not json")]);
        let e = format!("{:#}", inspect(bad.path()).unwrap_err());
        assert!(e.contains("not valid JSON"), "{e}");
        let e = format!(
            "{:#}",
            inspect(Path::new("/nonexistent/x.tar")).unwrap_err()
        );
        assert!(
            e.contains("cannot open image archive /nonexistent/x.tar"),
            "{e}"
        );
    }

    #[test]
    fn references_are_normalized_as_containerd_stores_them() {
        assert_eq!(
            normalize("nginx:1.14-alpine"),
            "docker.io/library/nginx:1.14-alpine"
        );
        assert_eq!(normalize("library/nginx:1"), "docker.io/library/nginx:1");
        assert_eq!(normalize("k8s.gcr.io/pause:3.2"), "k8s.gcr.io/pause:3.2");
        assert_eq!(normalize("localhost/a/b:1"), "localhost/a/b:1");
        assert_eq!(normalize("reg:5000/a:1"), "reg:5000/a:1");
    }

    #[test]
    fn staged_names_stay_in_the_staging_directory() {
        assert_eq!(sanitize("../../etc/passwd"), "_.._etc_passwd");
        assert_eq!(sanitize("agnhost 2.21.tar"), "agnhost_2.21.tar");
        assert_eq!(sanitize("..."), "archive.tar");
    }
}
