//! How the engine and the actions tell the user what they are doing, without printing.
//!
//! Engine and action code call a [`Reporter`]: a phase line, a line per machine, a free note, and
//! live per-machine lines for long waits on several machines at once. Every message also goes to
//! `tracing`. Where the words end up is the caller's choice, a [`Progress`] sink: `cmd/` passes
//! the terminal's (plain lines or spinners on stderr, [`crate::output::reporter`]); tests pass
//! [`Reporter::silent`] or a recording sink.

use std::fmt;

/// Where progress goes. Implemented by the front end (`cmd/`), never printed by the engine.
pub trait Progress: Send + Sync {
    /// A phase starts (`Creating machines`).
    fn phase(&self, title: &str);
    /// Something about one machine.
    fn machine(&self, name: &str, message: &str);
    /// A free-form note.
    fn note(&self, message: &str);
    /// A set of live lines, one per machine, updated while several machines are waited on at
    /// once (spinners on a terminal). `None`: each update is a [`Progress::machine`] line.
    fn live_lines(&'static self) -> Option<Box<dyn LiveLines>> {
        None
    }
}

/// A set of live per-machine lines (see [`Progress::live_lines`]).
pub trait LiveLines: Send + Sync {
    /// Adds the line of machine `name`.
    fn line(&self, name: &str) -> Box<dyn LiveLine>;
}

/// One machine's live line.
pub trait LiveLine: Send + Sync {
    /// Replaces the line's message.
    fn say(&self, message: &str);
    /// Ends the line with its last message.
    fn finish(&self, message: &str);
}

/// The engine's handle on a [`Progress`] sink; cheap to copy into every task.
#[derive(Clone, Copy)]
pub struct Reporter {
    sink: &'static dyn Progress,
}

impl fmt::Debug for Reporter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Reporter")
    }
}

/// Says nothing (`--quiet`, tests).
struct Silent;

impl Progress for Silent {
    fn phase(&self, _title: &str) {}
    fn machine(&self, _name: &str, _message: &str) {}
    fn note(&self, _message: &str) {}
}

static SILENT: Silent = Silent;

impl Reporter {
    /// Reports to `sink`, which lives as long as the program (the front end's sinks are
    /// statics; a test may leak one).
    pub fn new(sink: &'static dyn Progress) -> Self {
        Reporter { sink }
    }

    /// Reports to `tracing` only.
    pub fn silent() -> Self {
        Reporter { sink: &SILENT }
    }

    /// A phase line, `==> Creating machines`.
    pub fn phase(&self, title: &str) {
        tracing::info!("{title}");
        self.sink.phase(title);
    }

    /// A per-machine line.
    pub fn machine(&self, name: &str, message: &str) {
        tracing::info!(node = name, "{message}");
        self.sink.machine(name, message);
    }

    /// A free-form note.
    pub fn note(&self, message: &str) {
        tracing::info!("{message}");
        self.sink.note(message);
    }

    /// Starts a group of live per-machine lines: [`MachineLines::line`] adds one.
    pub fn lines(&self) -> MachineLines {
        MachineLines {
            report: *self,
            live: self.sink.live_lines(),
        }
    }
}

/// A group of per-machine lines for machines waited on at once (see [`Reporter::lines`]).
pub struct MachineLines {
    report: Reporter,
    live: Option<Box<dyn LiveLines>>,
}

impl MachineLines {
    /// The line of machine `name`.
    pub fn line(&self, name: &str) -> MachineLine {
        MachineLine {
            report: self.report,
            name: name.to_owned(),
            live: self.live.as_ref().map(|lines| lines.line(name)),
        }
    }
}

/// One machine's progress line: a live line where the sink has them, else a line per message.
pub struct MachineLine {
    report: Reporter,
    name: String,
    live: Option<Box<dyn LiveLine>>,
}

impl MachineLine {
    /// The machine's current state.
    pub fn say(&self, message: &str) {
        self.show(message, |line| line.say(message));
    }

    /// The machine's outcome; the line stays as it is.
    pub fn finish(&self, message: &str) {
        self.show(message, |line| line.finish(message));
    }

    fn show(&self, message: &str, live: impl FnOnce(&dyn LiveLine)) {
        match &self.live {
            Some(line) => {
                tracing::info!(node = %self.name, "{message}");
                live(line.as_ref());
            }
            None => self.report.machine(&self.name, message),
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use std::sync::Mutex;

    use super::*;

    /// Records every message, in order, as text.
    #[derive(Default)]
    pub(crate) struct Recorder {
        pub(crate) lines: Mutex<Vec<String>>,
        pub(crate) live: bool,
    }

    impl Recorder {
        /// A recorder that lives for the rest of the test binary, and its reporter.
        pub(crate) fn leaked(live: bool) -> (&'static Recorder, Reporter) {
            let recorder: &'static Recorder = Box::leak(Box::new(Recorder {
                live,
                ..Recorder::default()
            }));
            (recorder, Reporter::new(recorder))
        }

        pub(crate) fn taken(&self) -> Vec<String> {
            std::mem::take(&mut *self.lines.lock().unwrap())
        }

        fn push(&self, line: String) {
            self.lines.lock().unwrap().push(line);
        }
    }

    impl Progress for Recorder {
        fn phase(&self, title: &str) {
            self.push(format!("phase {title}"));
        }
        fn machine(&self, name: &str, message: &str) {
            self.push(format!("machine {name}: {message}"));
        }
        fn note(&self, message: &str) {
            self.push(format!("note {message}"));
        }
        fn live_lines(&'static self) -> Option<Box<dyn LiveLines>> {
            self.live
                .then(|| Box::new(RecordedLines(self)) as Box<dyn LiveLines>)
        }
    }

    struct RecordedLines(&'static Recorder);

    impl LiveLines for RecordedLines {
        fn line(&self, name: &str) -> Box<dyn LiveLine> {
            Box::new(RecordedLine(self.0, name.to_owned()))
        }
    }

    struct RecordedLine(&'static Recorder, String);

    impl LiveLine for RecordedLine {
        fn say(&self, message: &str) {
            self.0.push(format!("live {}: {message}", self.1));
        }
        fn finish(&self, message: &str) {
            self.0.push(format!("done {}: {message}", self.1));
        }
    }

    #[test]
    fn lines_go_to_the_sink_in_order() {
        let (recorder, report) = Recorder::leaked(false);
        report.phase("Creating machines");
        report.machine("c1-cp-0", "created");
        report.note("3 machines");
        let lines = report.lines();
        let a = lines.line("c1-w-0");
        a.say("waiting for ssh");
        a.finish("ssh ready");
        assert_eq!(
            recorder.taken(),
            [
                "phase Creating machines",
                "machine c1-cp-0: created",
                "note 3 machines",
                "machine c1-w-0: waiting for ssh",
                "machine c1-w-0: ssh ready",
            ]
        );
    }

    #[test]
    fn live_lines_replace_machine_lines_where_the_sink_has_them() {
        let (recorder, report) = Recorder::leaked(true);
        let lines = report.lines();
        let a = lines.line("c1-w-0");
        let b = lines.line("c1-w-1");
        b.say("waiting");
        a.finish("ready");
        assert_eq!(
            recorder.taken(),
            ["live c1-w-1: waiting", "done c1-w-0: ready"]
        );
    }

    #[test]
    fn silent_reports_nothing_and_does_not_panic() {
        let report = Reporter::silent();
        report.phase("p");
        let lines = report.lines();
        lines.line("m").finish("done");
    }
}
