//! Output formats for read commands and the progress/diagnostic channel.
//!
//! Machine-readable output goes to stdout; diagnostics and progress go to stderr.

use std::io::IsTerminal;

use serde::Serialize;

use crate::engine::report::{LiveLine, LiveLines, Progress, Reporter};

/// Output format of read commands (`-o table|json|yaml`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum Format {
    /// Human-readable table or text.
    #[default]
    Table,
    /// JSON document.
    Json,
    /// YAML document.
    Yaml,
}

/// Serializes `value` as JSON or YAML. For [`Format::Table`] the caller renders its own table.
pub fn to_string<T: Serialize>(format: Format, value: &T) -> anyhow::Result<String> {
    Ok(match format {
        Format::Json => {
            let mut s = serde_json::to_string_pretty(value)?;
            s.push('\n');
            s
        }
        Format::Yaml | Format::Table => serde_saphyr::to_string(value)?,
    })
}

/// Writes `text` to stdout in one go. A closed pipe (`clusterctl get | head`) is not an error:
/// the reader has all it wanted.
pub fn print(text: &str) -> std::io::Result<()> {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    match out.write_all(text.as_bytes()).and_then(|()| out.flush()) {
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        other => other,
    }
}

/// Whether progress should be drawn as bars: stderr is a terminal and the user did not ask for quiet.
pub fn fancy_progress(quiet: bool, format: Format) -> bool {
    !quiet && format == Format::Table && std::io::stderr().is_terminal()
}

/// The reporter of a command: nothing with `--quiet`; otherwise progress lines on stderr, and
/// spinners for machines waited on at once where [`fancy_progress`] says so.
pub fn reporter(quiet: bool, format: Format) -> Reporter {
    if quiet {
        Reporter::silent()
    } else if fancy_progress(quiet, format) {
        Reporter::new(&FANCY)
    } else {
        Reporter::new(&PLAIN)
    }
}

static PLAIN: Terminal = Terminal { fancy: false };
static FANCY: Terminal = Terminal { fancy: true };

/// The reporter of a command that never draws spinners: nothing with `--quiet`, else lines.
pub fn line_reporter(quiet: bool) -> Reporter {
    if quiet {
        Reporter::silent()
    } else {
        Reporter::new(&PLAIN)
    }
}

/// Progress on stderr: `==> phase`, `    machine: message`, `    note`.
struct Terminal {
    /// Spinners for machines waited on at once.
    fancy: bool,
}

impl Progress for Terminal {
    fn phase(&self, title: &str) {
        eprintln!("==> {title}");
    }

    fn machine(&self, name: &str, message: &str) {
        eprintln!("    {name}: {message}");
    }

    fn note(&self, message: &str) {
        eprintln!("    {message}");
    }

    fn live_lines(&'static self) -> Option<Box<dyn LiveLines>> {
        self.fancy
            .then(|| Box::new(Spinners(indicatif::MultiProgress::new())) as Box<dyn LiveLines>)
    }
}

/// One spinner per machine, drawn together.
struct Spinners(indicatif::MultiProgress);

impl LiveLines for Spinners {
    fn line(&self, name: &str) -> Box<dyn LiveLine> {
        let bar = self.0.add(indicatif::ProgressBar::new_spinner());
        if let Ok(style) = indicatif::ProgressStyle::with_template(
            "    {spinner} {prefix}: {wide_msg} [{elapsed}]",
        ) {
            bar.set_style(style);
        }
        bar.set_prefix(name.to_owned());
        bar.enable_steady_tick(std::time::Duration::from_millis(200));
        Box::new(Spinner(bar))
    }
}

struct Spinner(indicatif::ProgressBar);

impl LiveLine for Spinner {
    fn say(&self, message: &str) {
        self.0.set_message(message.to_owned());
    }

    fn finish(&self, message: &str) {
        if let Ok(style) = indicatif::ProgressStyle::with_template("    {prefix}: {wide_msg}") {
            self.0.set_style(style);
        }
        self.0.finish_with_message(message.to_owned());
    }
}

/// Renders rows as a left-aligned table with a header, columns separated by two spaces.
pub fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for row in rows {
        for (i, cell) in row.iter().enumerate() {
            if i < widths.len() {
                widths[i] = widths[i].max(cell.chars().count());
            }
        }
    }
    let mut out = String::new();
    let mut line = |cells: &mut dyn Iterator<Item = &str>| {
        let mut parts = Vec::new();
        for (i, c) in cells.enumerate() {
            let w = widths.get(i).copied().unwrap_or(0);
            parts.push(format!("{c:<w$}"));
        }
        out.push_str(parts.join("  ").trim_end());
        out.push('\n');
    };
    line(&mut header.iter().copied());
    for row in rows {
        line(&mut row.iter().map(String::as_str));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_aligns_columns() {
        let t = table(
            &["NAME", "STATE"],
            &[
                vec!["cp-0".into(), "running".into()],
                vec!["worker-long".into(), "x".into()],
            ],
        );
        assert_eq!(
            t,
            "NAME         STATE\ncp-0         running\nworker-long  x\n"
        );
    }
}
