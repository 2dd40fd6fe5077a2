//! `clusterctl validate -f FILE`: strict parsing and every semantic check of a cluster spec.

use std::path::PathBuf;

use serde::Serialize;

use crate::output::{self, Format};
use crate::spec::{self, SpecError};

/// Arguments of `clusterctl validate`.
#[derive(Debug, clap::Args)]
pub struct ValidateArgs {
    /// Cluster spec to check.
    #[arg(short = 'f', long = "file", value_name = "FILE")]
    pub file: PathBuf,
}

/// Machine-readable result of `validate -o json|yaml`.
#[derive(Debug, Serialize)]
struct Report<'a> {
    file: String,
    valid: bool,
    errors: &'a [SpecError],
}

/// Runs `validate`: prints `FILE: valid`, or returns the problems as [`spec::SpecErrors`]
/// (exit code 2). With `-o json|yaml` the report also goes to stdout as a document.
pub fn run(args: &ValidateArgs, format: Format) -> anyhow::Result<()> {
    let file = args.file.display().to_string();
    let result = spec::load(&args.file);
    let errors: &[SpecError] = match &result {
        Ok(_) => &[],
        Err(e) => &e.errors,
    };
    match format {
        Format::Table => {
            if result.is_ok() {
                println!("{file}: valid");
            }
        }
        Format::Json | Format::Yaml => {
            let report = Report {
                file,
                valid: result.is_ok(),
                errors,
            };
            let mut text = output::to_string(format, &report)?;
            if !text.ends_with('\n') {
                text.push('\n');
            }
            print!("{text}");
        }
    }
    result.map(|_| ()).map_err(anyhow::Error::new)
}
