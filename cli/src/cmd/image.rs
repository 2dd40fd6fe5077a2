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
    /// Build the node image (a no-op when an image with the same inputs exists; the inputs include
    /// the package versions of <suite>-updates and <suite>-security, fetched each time). Needs root.
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
    /// Debian mirror for debootstrap and <suite>-updates (not part of the image's input hash).
    #[arg(long, env = "CLUSTERCTL_DEBIAN_MIRROR", default_value = nodeimage::DEFAULT_MIRROR)]
    pub mirror: String,
    /// Debian security mirror for <suite>-security; `auto` is the debian-security archive the
    /// machine's apt uses, else http://deb.debian.org/debian-security (not part of the input hash).
    #[arg(long, env = "CLUSTERCTL_DEBIAN_SECURITY_MIRROR", default_value = nodeimage::DEFAULT_SECURITY_MIRROR)]
    pub security_mirror: String,
    /// Do not fetch package lists: resolve the updates against the lists an earlier build
    /// fetched (the manifest records their dates), for when the archive is unreachable.
    #[arg(long, env = "CLUSTERCTL_IMAGE_OFFLINE")]
    pub offline: bool,
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
    /// The suites that went in, with their Release dates.
    sources: Vec<nodeimage::Source>,
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
            sources: i.manifest.sources.clone(),
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
    let suite = |s: &Option<String>| s.clone().unwrap_or_else(|| "-".into());
    rows.extend(d.added.iter().map(|p| {
        vec![
            p.name.clone(),
            "added".into(),
            "-".into(),
            p.version.clone(),
            suite(&p.suite),
        ]
    }));
    rows.extend(d.removed.iter().map(|p| {
        vec![
            p.name.clone(),
            "removed".into(),
            p.version.clone(),
            "-".into(),
            "-".into(),
        ]
    }));
    rows.extend(d.changed.iter().map(|c| {
        vec![
            c.name.clone(),
            "changed".into(),
            c.from.clone(),
            c.to.clone(),
            suite(&c.suite),
        ]
    }));
    rows.sort();
    print!(
        "{}",
        output::table(
            &[
                "PACKAGE",
                "CHANGE",
                args.from.as_str(),
                args.to.as_str(),
                "FROM SUITE"
            ],
            &rows
        )
    );
    let from_security = |s: &Option<String>| s.as_deref().is_some_and(|s| s.contains("-security"));
    let security = d.changed.iter().filter(|c| from_security(&c.suite)).count()
        + d.added.iter().filter(|p| from_security(&p.suite)).count();
    println!(
        "{} added, {} removed, {} changed; {security} from a security suite",
        d.added.len(),
        d.removed.len(),
        d.changed.len()
    );
    for (label, image) in [(&args.from, a), (&args.to, b)] {
        if !image.manifest.sources.is_empty() {
            println!(
                "{label}: {}",
                nodeimage::updates::describe(&image.manifest.sources)
            );
        }
    }
    Ok(())
}

fn build(global: &Global, args: BuildArgs) -> anyhow::Result<()> {
    let mut opts = nodeimage::BuildOptions::new(args.dir.image_dir.clone());
    opts.suite = args.suite;
    opts.mirror = args.mirror;
    opts.security_mirror = args.security_mirror;
    opts.offline = args.offline;
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
            let upgraded: Vec<String> = {
                let mut n = std::collections::BTreeMap::new();
                for p in &image.manifest.packages {
                    if let Some(s) = &p.suite {
                        *n.entry(s.as_str()).or_insert(0) += 1;
                    }
                }
                n.iter().map(|(s, n)| format!("{n} from {s}")).collect()
            };
            eprintln!(
                "packages: {} ({}), lists of {}",
                image.manifest.packages.len(),
                if upgraded.is_empty() {
                    "no updates".to_string()
                } else {
                    upgraded.join(", ")
                },
                nodeimage::updates::describe(&image.manifest.sources)
            );
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
                        r.sources
                            .iter()
                            .find(|s| s.suite.ends_with("-security"))
                            .map_or_else(|| "-".into(), |s| s.date.clone()),
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
                        "SECURITY LISTS OF",
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
