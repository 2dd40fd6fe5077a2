//! `clusterctl image build|list|diff|push`: the container-optimized node image.

mod push;

use std::path::PathBuf;
use std::time::Instant;

use anyhow::Context as _;
use serde::Serialize;

use crate::cmd::Global;
use crate::output::{self, Format};

/// Node image commands.
#[derive(Debug, clap::Subcommand)]
pub enum ImageCommand {
    /// Build the node image (a no-op when an image with the same inputs exists). Needs root.
    Build(BuildArgs),
    /// List built node images.
    List(DirArgs),
    /// Show what changed from one built image to another: packages added, removed, upgraded.
    Diff(DiffArgs),
    /// Upload a built node image to a cloud (resumes an interrupted upload when run again).
    Push(push::PushArgs),
}

/// Options of `clusterctl image diff`.
#[derive(Debug, clap::Args)]
pub struct DiffArgs {
    /// Where images live.
    #[command(flatten)]
    pub dir: DirArgs,
    /// The image upgraded from (a version `image list` shows).
    pub from: String,
    /// The image upgraded to.
    pub to: String,
}

/// Where images live.
#[derive(Debug, clap::Args)]
pub struct DirArgs {
    /// Directory holding node images.
    #[arg(long, env = nodeimage::IMAGE_DIR_ENV, value_name = "DIR", default_value = nodeimage::DEFAULT_IMAGE_DIR)]
    pub image_dir: PathBuf,
}

/// Options of `clusterctl image build`.
#[derive(Debug, clap::Args)]
pub struct BuildArgs {
    /// Where images live.
    #[command(flatten)]
    pub dir: DirArgs,
    /// Debian suite to build from.
    #[arg(long, default_value = "bookworm")]
    pub suite: String,
    /// Debian mirror for debootstrap (not part of the image's input hash).
    #[arg(long, env = "CLUSTERCTL_DEBIAN_MIRROR", default_value = nodeimage::DEFAULT_MIRROR)]
    pub mirror: String,
    /// Extra Debian package to install (repeatable); changes the image version.
    #[arg(long = "add-package", value_name = "PACKAGE")]
    pub add_packages: Vec<String>,
    /// Rebuild even when an image with the same inputs exists.
    #[arg(long)]
    pub force: bool,
    /// Keep the work directory (root tree and build log) after a successful build.
    #[arg(long)]
    pub keep_work: bool,
}

/// One image as `list` and `build` print it.
#[derive(Debug, Serialize)]
struct ImageRow {
    version: String,
    dir: PathBuf,
    digest: String,
    created: String,
    packages: usize,
    installed_size_kib: u64,
    root_disk_bytes: u64,
    cmdline: String,
}

impl From<&nodeimage::Image> for ImageRow {
    fn from(i: &nodeimage::Image) -> Self {
        Self {
            version: i.manifest.version.clone(),
            dir: i.dir.clone(),
            digest: i.digest.clone(),
            created: i.manifest.created.clone(),
            packages: i.manifest.packages.len(),
            installed_size_kib: i.manifest.installed_size_kib,
            root_disk_bytes: i.manifest.root.file.size,
            cmdline: i.manifest.cmdline.clone(),
        }
    }
}

/// The provider contract's image reference for a loaded image (nodeimage does not know providers).
pub fn image_ref(image: &nodeimage::Image) -> providers::ImageRef {
    providers::ImageRef {
        version: image.manifest.version.clone(),
        dir: image.dir.clone(),
        digest: image.digest.clone(),
    }
}

/// Runs an image subcommand.
pub fn run(global: &Global, command: ImageCommand) -> anyhow::Result<()> {
    match command {
        ImageCommand::Build(args) => build(global, args),
        ImageCommand::List(args) => list(global.output, &args),
        ImageCommand::Diff(args) => diff(global.output, &args),
        ImageCommand::Push(args) => push::push(global, args),
    }
}

fn diff(format: Format, args: &DiffArgs) -> anyhow::Result<()> {
    let images = nodeimage::list(&args.dir.image_dir)
        .with_context(|| format!("listing node images in {}", args.dir.image_dir.display()))?;
    let find = |v: &str| {
        images.iter().find(|i| i.manifest.version == v).ok_or_else(|| {
            anyhow::anyhow!(
                "node image {v:?} is not built in {}; `clusterctl image list` shows the built ones",
                args.dir.image_dir.display()
            )
        })
    };
    let (a, b) = (find(&args.from)?, find(&args.to)?);
    let d = nodeimage::package_diff(&a.manifest.packages, &b.manifest.packages);
    if format != Format::Table {
        print!("{}", output::to_string(format, &d)?);
        return Ok(());
    }
    if d.is_empty() {
        println!(
            "{} and {} have the same packages, same versions",
            args.from, args.to
        );
        return Ok(());
    }
    let mut rows: Vec<Vec<String>> = Vec::new();
    rows.extend(d.added.iter().map(|p| {
        vec![
            p.name.clone(),
            "added".into(),
            "-".into(),
            p.version.clone(),
        ]
    }));
    rows.extend(d.removed.iter().map(|p| {
        vec![
            p.name.clone(),
            "removed".into(),
            p.version.clone(),
            "-".into(),
        ]
    }));
    rows.extend(d.changed.iter().map(|c| {
        vec![
            c.name.clone(),
            "changed".into(),
            c.from.clone(),
            c.to.clone(),
        ]
    }));
    rows.sort();
    print!(
        "{}",
        output::table(
            &["PACKAGE", "CHANGE", args.from.as_str(), args.to.as_str()],
            &rows
        )
    );
    Ok(())
}

fn build(global: &Global, args: BuildArgs) -> anyhow::Result<()> {
    let mut opts = nodeimage::BuildOptions::new(args.dir.image_dir.clone());
    opts.suite = args.suite;
    opts.mirror = args.mirror;
    opts.packages.extend(args.add_packages);
    opts.force = args.force;
    opts.keep_work = args.keep_work;
    if !global.quiet {
        eprintln!("==> Building node image in {}", opts.image_dir.display());
    }
    let started = Instant::now();
    let outcome = nodeimage::build(&opts).context("building the node image")?;
    let image = &outcome.image;
    if !global.quiet {
        if outcome.reused {
            eprintln!(
                "image {} is up to date (inputs unchanged), nothing built",
                image.manifest.version
            );
        } else {
            for (step, took) in &outcome.timings {
                eprintln!("    {step:<12} {:>7.1} s", took.as_secs_f64());
            }
            eprintln!(
                "built image {} in {:.1} s",
                image.manifest.version,
                started.elapsed().as_secs_f64()
            );
        }
    }
    let row = ImageRow::from(image);
    match global.output {
        Format::Table => println!("{}", image.dir.display()),
        format => print!("{}", output::to_string(format, &row)?),
    }
    Ok(())
}

fn list(format: Format, args: &DirArgs) -> anyhow::Result<()> {
    let images = nodeimage::list(&args.image_dir)
        .with_context(|| format!("listing node images in {}", args.image_dir.display()))?;
    let rows: Vec<ImageRow> = images.iter().map(ImageRow::from).collect();
    match format {
        Format::Table => {
            let cells: Vec<Vec<String>> = rows
                .iter()
                .map(|r| {
                    vec![
                        r.version.clone(),
                        r.created.clone(),
                        r.packages.to_string(),
                        format!("{} MiB", r.installed_size_kib / 1024),
                        format!("{} MiB", r.root_disk_bytes >> 20),
                        r.digest[..12.min(r.digest.len())].to_string(),
                    ]
                })
                .collect();
            print!(
                "{}",
                output::table(
                    &[
                        "VERSION",
                        "CREATED",
                        "PACKAGES",
                        "INSTALLED",
                        "DISK",
                        "DIGEST"
                    ],
                    &cells
                )
            );
        }
        format => print!("{}", output::to_string(format, &rows)?),
    }
    Ok(())
}
