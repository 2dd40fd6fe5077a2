//! The `clusterctl` binary: parses arguments, runs the command, prints errors as a chain.

use std::process::ExitCode;

fn main() -> ExitCode {
    clusterctl::cmd::main()
}
