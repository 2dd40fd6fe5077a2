//! `clusterctl image push --provider gce`: the node image's GCE disk archive to Cloud Storage
//! (a resumable upload: a re-run after an interruption goes on where the last one stopped), then
//! the Compute image `clusterctl-<version>` made from it.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use providers::gce::auth::{COMPUTE_SCOPE, Credentials, STORAGE_SCOPE, TokenSource};
use providers::gce::client::RestCompute;
use providers::gce::storage::{self, PushOutcome, PushProgress, Storage, UploadOutcome};
use serde::Serialize;

use super::DirArgs;
use crate::cmd::Global;
use crate::output::{self, Format};

/// Overrides the Compute API endpoint (tests point it at a fake).
const COMPUTE_ENDPOINT_ENV: &str = "CLUSTERCTL_GCE_ENDPOINT";
/// Overrides the Cloud Storage endpoint (tests point it at a fake).
const STORAGE_ENDPOINT_ENV: &str = "CLUSTERCTL_GCS_ENDPOINT";

/// Where an image can be pushed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum PushProvider {
    /// Google Compute Engine: a Compute image made from a Cloud Storage object.
    Gce,
}

/// Options of `clusterctl image push`.
#[derive(Debug, clap::Args)]
pub struct PushArgs {
    /// Where images live.
    #[command(flatten)]
    pub dir: DirArgs,
    /// The cloud to push to.
    #[arg(long, value_enum)]
    pub provider: PushProvider,
    /// GCP project the image is made in.
    #[arg(long, value_name = "PROJECT")]
    pub project: String,
    /// Cloud Storage bucket the disk archive is uploaded to.
    #[arg(long, value_name = "BUCKET")]
    pub bucket: String,
    /// Service account key or authorized-user file (default: application default credentials).
    #[arg(long, value_name = "FILE")]
    pub credentials: Option<PathBuf>,
    /// The image version to push (default: the newest built image).
    #[arg(value_name = "VERSION")]
    pub image: Option<String>,
}

/// What `push` prints for `-o json|yaml`.
#[derive(Debug, Serialize)]
struct PushRow {
    image: String,
    project: String,
    created: bool,
    source: Option<String>,
    uploaded: bool,
}

/// Runs `clusterctl image push`.
pub fn push(global: &Global, args: PushArgs) -> anyhow::Result<()> {
    let PushProvider::Gce = args.provider;
    let images = nodeimage::list(&args.dir.image_dir)
        .with_context(|| format!("listing node images in {}", args.dir.image_dir.display()))?;
    let image = match &args.image {
        Some(v) => images.iter().find(|i| &i.manifest.version == v).ok_or_else(|| {
            anyhow::anyhow!(
                "node image {v:?} is not built in {}; `clusterctl image list` shows the built ones",
                args.dir.image_dir.display()
            )
        })?,
        None => images.last().ok_or_else(|| {
            anyhow::anyhow!(
                "no node image is built in {}; build one with `clusterctl image build`",
                args.dir.image_dir.display()
            )
        })?,
    };
    // The manifest names the archive (and load() verified its checksum).
    let Some(gce) = image.manifest.gce.as_ref() else {
        anyhow::bail!(
            "node image {} has no GCE disk (built before clusterctl made them); rebuild it: `clusterctl image build --force`",
            image.manifest.version
        );
    };
    let archive = image.dir.join(&gce.file.path);
    let image_ref = super::image_ref(image);
    let suite = &image.manifest.suite;
    let family = (!suite.is_empty()
        && suite
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-'))
    .then(|| format!("clusterctl-{suite}"));

    let credentials = match &args.credentials {
        Some(f) => Credentials::from_file(f)?,
        None => Credentials::application_default()?,
    };
    let scopes = [COMPUTE_SCOPE, STORAGE_SCOPE];
    let compute_endpoint = std::env::var(COMPUTE_ENDPOINT_ENV)
        .ok()
        .filter(|e| !e.is_empty())
        .unwrap_or_else(|| providers::gce::client::DEFAULT_ENDPOINT.to_owned());
    let storage_endpoint = std::env::var(STORAGE_ENDPOINT_ENV)
        .ok()
        .filter(|e| !e.is_empty())
        .unwrap_or_else(|| storage::DEFAULT_ENDPOINT.to_owned());
    let compute = Arc::new(
        RestCompute::new(
            &compute_endpoint,
            &args.project,
            TokenSource::with_scopes(credentials.clone(), &scopes),
            Duration::from_secs(60),
        )
        .context("setting up the Compute API client")?,
    );
    let storage = Storage::new(
        &storage_endpoint,
        TokenSource::with_scopes(credentials, &scopes),
        Duration::from_secs(300),
    )
    .context("setting up the Cloud Storage client")?;

    if !global.quiet {
        eprintln!(
            "==> Pushing node image {} to project {} (bucket {})",
            image.manifest.version, args.project, args.bucket
        );
    }
    let quiet = global.quiet;
    let mut last_tenth = None;
    let mut report = |p: PushProgress| {
        if quiet {
            return;
        }
        match p {
            PushProgress::ImageExists { image } => {
                eprintln!("image {image} is already in the project with this build, nothing to do");
            }
            PushProgress::Hashing { bytes } => {
                eprintln!("    hashing {} ({} MiB)", archive.display(), bytes >> 20);
            }
            PushProgress::UploadSkipped { object } => {
                eprintln!("    {object} already holds this archive, not uploading it again");
            }
            PushProgress::SessionStarted { object, total } => {
                eprintln!("    uploading {} MiB to {object}", total >> 20);
            }
            PushProgress::Resumed {
                object,
                from,
                total,
            } => {
                eprintln!(
                    "    resuming the upload to {object} at {} of {} MiB",
                    from >> 20,
                    total >> 20
                );
            }
            PushProgress::Uploaded { sent, total } => {
                let tenth = (sent * 10).checked_div(total).unwrap_or(10);
                if last_tenth != Some(tenth) {
                    last_tenth = Some(tenth);
                    eprintln!(
                        "    {:>3}% ({} of {} MiB)",
                        tenth * 10,
                        sent >> 20,
                        total >> 20
                    );
                }
            }
            PushProgress::Retrying { attempt, detail } => {
                eprintln!("    retrying (attempt {attempt}): {detail}");
            }
            PushProgress::SessionExpired => {
                eprintln!("    the upload session expired; starting a new one");
            }
            PushProgress::CreatingImage { image, source } => {
                eprintln!("    creating image {image} from {source}");
            }
        }
    };
    let outcome = storage::push_image(
        compute.as_ref(),
        &storage,
        &args.bucket,
        &archive,
        &image_ref,
        family.as_deref(),
        &mut report,
    )
    .with_context(|| format!("pushing node image {}", image.manifest.version))?;
    let row = match outcome {
        PushOutcome::AlreadyPushed { image } => PushRow {
            image,
            project: args.project.clone(),
            created: false,
            source: None,
            uploaded: false,
        },
        PushOutcome::Created {
            image,
            source,
            upload,
        } => {
            if !global.quiet {
                eprintln!("pushed image {image}");
            }
            PushRow {
                image,
                project: args.project.clone(),
                created: true,
                source: Some(source),
                uploaded: matches!(upload, UploadOutcome::Uploaded { .. }),
            }
        }
    };
    match global.output {
        Format::Table => println!("projects/{}/global/images/{}", row.project, row.image),
        format => print!("{}", output::to_string(format, &row)?),
    }
    Ok(())
}
