//! Command-line surface (clap only). Each subcommand lives in its own file and calls into the
//! library; only this module knows about argument parsing, exit codes and terminals.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{CommandFactory, Parser, Subcommand};

use crate::output::Format;

pub mod access;
pub mod autoupgrade;
pub mod create;
pub mod credentials;
pub mod delete;
pub mod drain;
pub mod get;
pub mod image;
pub mod load;
pub mod operations;
pub mod plan;
pub mod repair;
pub mod reset;
pub mod snapshot;
pub mod ssh;
pub mod upgrade;
pub mod validate;

/// Exit code for a failed command.
pub const EXIT_FAILURE: u8 = 1;
/// Exit code for bad usage or invalid input (a bad cluster file).
pub const EXIT_INVALID: u8 = 2;
/// Exit code when another clusterctl command holds the cluster's lock (try again later, or pass
/// `--wait`): a timer or a loop can tell "busy" from "failed".
pub const EXIT_LOCKED: u8 = 3;
/// Exit code when a drain stopped with pods still on the node (a PodDisruptionBudget held them
/// past the timeout) or refused pods it would lose for good; the node is as it was before.
pub const EXIT_DRAIN_BLOCKED: u8 = 4;

/// clusterctl: GKE-style managed Kubernetes on machines you own and on clouds.
#[derive(Debug, Parser)]
#[command(name = "clusterctl", version, about, propagate_version = true)]
pub struct Cli {
    /// Global options.
    #[command(flatten)]
    pub global: Global,
    /// The command to run.
    #[command(subcommand)]
    pub command: Command,
}

/// Options every command accepts.
#[derive(Debug, clap::Args)]
pub struct Global {
    /// Directory holding cluster state (default: $XDG_STATE_HOME/clusterctl or ~/.local/state/clusterctl).
    #[arg(long, global = true, env = "CLUSTERCTL_STATE_DIR", value_name = "DIR")]
    pub state_dir: Option<PathBuf>,
    /// Output format of read commands.
    #[arg(short = 'o', long, global = true, value_enum, default_value_t = Format::Table)]
    pub output: Format,
    /// Print no progress, only results and errors.
    #[arg(short, long, global = true)]
    pub quiet: bool,
    /// More log output (-v info, -vv debug, -vvv trace).
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    pub verbose: u8,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Show the spec with defaults and the steps `create` would take.
    Plan(plan::PlanArgs),
    /// Create the cluster's machines (resumes if run again after a failure).
    Create(create::CreateArgs),
    /// Delete every machine of the cluster and its state.
    Delete(delete::DeleteArgs),
    /// List clusters, or show one cluster with its node pools, machines, nodes and versions.
    #[command(visible_alias = "describe")]
    Get(get::GetArgs),
    /// Write a kubeconfig context for the cluster (merged into ~/.kube/config or $KUBECONFIG).
    GetCredentials(credentials::GetCredentialsArgs),
    /// Print a shell completion script.
    Completions {
        /// Shell to generate completions for.
        shell: clap_complete::Shell,
    },
    /// Check a cluster spec: strict parsing and every semantic rule, all problems at once.
    Validate(validate::ValidateArgs),
    /// Cordon a node and evict its pods, honouring PodDisruptionBudgets (`--dry-run`: only
    /// show what would be evicted and what blocks it).
    Drain(drain::DrainArgs),
    /// Make a node schedulable again.
    Uncordon(drain::UncordonArgs),
    /// Roll a new node image out to every machine: control plane first, one machine at a time
    /// (drain, new boot disk with the data disk kept, health gate, uncordon), a machine that
    /// fails its gate rolled back (`--dry-run`: the order and what blocks each drain).
    Upgrade(upgrade::UpgradeArgs),
    /// Power-cycle a hung node's machine (a hard reset, no drain) and wait until it has booted
    /// again and is Ready.
    Reset(reset::ResetArgs),
    /// Take an etcd snapshot of the cluster into its state (`--list`: the ones kept); upgrades
    /// take one before they touch the control plane.
    Snapshot(snapshot::SnapshotArgs),
    /// One auto-repair pass: observe every node, decide (with brakes), make at most one repair
    /// (restart units, power-cycle, replace a worker), report (`--dry-run`: decide only).
    Repair(repair::RepairArgs),
    /// Install, remove or show the schedule that runs `repair` (systemd timer or cron).
    #[command(subcommand)]
    Autorepair(repair::AutorepairCommand),
    /// Install, remove or show the schedule that runs `upgrade --auto` (systemd timer or cron).
    #[command(subcommand)]
    Autoupgrade(autoupgrade::AutoupgradeCommand),
    /// Who may do what in the cluster: grant and revoke roles (RBAC), list them, read the
    /// audit log. `get-credentials --user` gives a person an expiring credential.
    #[command(subcommand)]
    Access(access::AccessCommand),
    /// Credential plugin for kubectl: `auth token` prints the token `get-credentials --user`
    /// kept in the OS keyring (kubectl runs it; the kubeconfig names it).
    #[command(subcommand)]
    Auth(credentials::AuthCommand),
    /// List the operations run on a cluster (commands, repairs), newest last.
    Operations(operations::OperationsArgs),
    /// Run a command on a machine of a cluster (host key verified against the pinned one).
    Ssh(ssh::SshArgs),
    /// Side-load container image archives into every node's containerd over the pinned SSH
    /// connections (for images no registry can serve the cluster); what is there is not sent.
    Load(load::LoadArgs),
    /// Build and list container-optimized node images.
    #[command(subcommand)]
    Image(image::ImageCommand),
}

/// Entry point used by the binary: parse, run, print the error chain, map to an exit code.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    init_tracing(&cli.global);
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {err:#}");
            ExitCode::from(exit_code_for(&err))
        }
    }
}

fn init_tracing(global: &Global) {
    let default = match global.verbose {
        0 => "warn",
        1 => "info",
        2 => "debug",
        _ => "trace",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_env("CLUSTERCTL_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        .try_init();
}

/// Maps an error to the process exit code.
fn exit_code_for(err: &anyhow::Error) -> u8 {
    if let Some(remote) = err.downcast_ref::<ssh::RemoteExit>() {
        return remote.status;
    }
    if err.downcast_ref::<crate::spec::SpecErrors>().is_some() {
        return EXIT_INVALID;
    }
    for cause in err.chain() {
        if matches!(
            cause.downcast_ref::<crate::state::StateError>(),
            Some(crate::state::StateError::Locked { .. })
        ) {
            return EXIT_LOCKED;
        }
        if matches!(
            cause.downcast_ref::<crate::kube::drainer::DrainError>(),
            Some(
                crate::kube::drainer::DrainError::TimedOut { .. }
                    | crate::kube::drainer::DrainError::Refused { .. }
            )
        ) {
            return EXIT_DRAIN_BLOCKED;
        }
    }
    EXIT_FAILURE
}

/// Runs a parsed command line.
pub fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Plan(args) => plan::run(&cli.global, &args),
        Command::Create(args) => create::run(&cli.global, &args),
        Command::Delete(args) => delete::run(&cli.global, &args),
        Command::Get(args) => get::run(&cli.global, &args),
        Command::GetCredentials(args) => credentials::run(&cli.global, &args),
        Command::Auth(command) => credentials::run_auth(&command),
        Command::Completions { shell } => {
            let mut cmd = Cli::command();
            clap_complete::generate(shell, &mut cmd, "clusterctl", &mut std::io::stdout());
            Ok(())
        }
        Command::Validate(args) => validate::run(&args, cli.global.output),
        Command::Image(command) => image::run(&cli.global, command),
        Command::Ssh(args) => ssh::run(&cli.global, &args),
        Command::Load(args) => load::run(&cli.global, &args),
        Command::Drain(args) => drain::run(&cli.global, &args),
        Command::Uncordon(args) => drain::run_uncordon(&cli.global, &args),
        Command::Reset(args) => reset::run(&cli.global, &args),
        Command::Snapshot(args) => snapshot::run(&cli.global, &args),
        Command::Upgrade(args) => upgrade::run(&cli.global, &args),
        Command::Repair(args) => repair::run(&cli.global, &args),
        Command::Autorepair(command) => repair::run_autorepair(&cli.global, &command),
        Command::Autoupgrade(command) => autoupgrade::run(&cli.global, &command),
        Command::Operations(args) => operations::run(&cli.global, &args),
        Command::Access(command) => access::run(&cli.global, &command),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kube::drainer::DrainError;

    /// clap checks a command's arguments only when that command is parsed: this checks every
    /// subcommand at once (a positional `version` once clashed with `--version` in `image push`).
    #[test]
    fn every_command_is_well_formed() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }

    #[test]
    fn exit_codes_follow_the_error_kind_through_the_chain() {
        let blocked = || DrainError::TimedOut {
            node: "w1".into(),
            waited: std::time::Duration::from_secs(3600),
            pods: Vec::new(),
        };
        // `clusterctl drain`: the DrainError under context.
        let direct = anyhow::Error::from(blocked()).context("draining node w1");
        assert_eq!(exit_code_for(&direct), EXIT_DRAIN_BLOCKED);
        // `create`'s scale-down: the DrainError boxed in the engine's error, under a phase.
        let engine = crate::engine::EngineError::Phase {
            title: "Deleting machines no longer in the spec".into(),
            source: Box::new(crate::engine::EngineError::NodeRemoval {
                action: "draining",
                node: "w1".into(),
                source: Box::new(blocked()),
            }),
        };
        let via_create = anyhow::Error::from(engine).context("creating cluster");
        assert_eq!(exit_code_for(&via_create), EXIT_DRAIN_BLOCKED);
        let other = anyhow::anyhow!("something else");
        assert_eq!(exit_code_for(&other), EXIT_FAILURE);
    }
}
