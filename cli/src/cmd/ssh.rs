//! `clusterctl ssh NAME MACHINE -- CMD...`: runs a command on a machine of the cluster as the
//! cluster's SSH user, trusting only the host key pinned for that machine in the cluster state.
//! The remote command's output goes to stdout/stderr and its exit status becomes clusterctl's.

use std::io::Write as _;

use anyhow::{Context as _, bail};

use super::Global;
use crate::action::runtime;
use crate::engine::access;
use crate::ssh::{ExecOptions, OutputStream, RetryPolicy, Target};
use crate::state::StateStore;

/// Arguments of `clusterctl ssh`.
#[derive(Debug, clap::Args)]
pub struct SshArgs {
    /// Name of the cluster.
    pub name: String,
    /// Name of the machine (`clusterctl get NAME` lists them).
    pub machine: String,
    /// The command to run, after `--` (run by the remote user's shell).
    #[arg(last = true, required = true, value_name = "CMD")]
    pub command: Vec<String>,
}

/// The remote command exited with a non-zero status (clusterctl exits with the same status).
#[derive(Debug, thiserror::Error)]
#[error("the command on machine {machine:?} exited with status {status}")]
pub struct RemoteExit {
    /// The machine.
    pub machine: String,
    /// The remote exit status (1 when the command died of a signal).
    pub status: u8,
}

/// Runs `clusterctl ssh`.
pub fn run(global: &Global, args: &SshArgs) -> anyhow::Result<()> {
    let store = StateStore::resolve(global.state_dir.as_deref())?;
    let name = args.name.as_str();
    let record = store.load(name)?.ok_or_else(|| {
        anyhow::anyhow!(
            "cluster {name:?} not found in {}; `clusterctl get` lists the known clusters",
            store.root().display()
        )
    })?;
    let Some(machine) = record.machines.iter().find(|m| m.name == args.machine) else {
        let known: Vec<&str> = record.machines.iter().map(|m| m.name.as_str()).collect();
        bail!(
            "cluster {name:?} has no machine {:?} (known: {}); `clusterctl get {name}` lists them",
            args.machine,
            if known.is_empty() {
                "none".to_owned()
            } else {
                known.join(", ")
            }
        );
    };
    let (endpoint, key) = crate::action::pinned_endpoint(&record, machine)?;
    let rt = runtime()?;
    let identity = rt.block_on(access::client_identity(
        &record.spec.spec.ssh,
        &store,
        name,
        None,
    ))?;
    let client = access::pinned_client(
        &identity,
        &[(endpoint.clone(), key)],
        RetryPolicy::for_up_to(std::time::Duration::from_secs(10)),
    )?;
    let command = args.command.join(" ");
    let target = Target::new(endpoint.host.clone(), endpoint.port, identity.user.clone());
    let out = rt
        .block_on(async {
            let session = client.connect(&target).await?;
            let mut print = |line: crate::ssh::OutputLine<'_>| {
                let _ = match line.stream {
                    OutputStream::Stdout => writeln!(std::io::stdout(), "{}", line.line),
                    OutputStream::Stderr => writeln!(std::io::stderr(), "{}", line.line),
                };
            };
            let out = session
                .exec_with(
                    &command,
                    ExecOptions {
                        on_line: Some(&mut print),
                        max_capture: Some(0),
                        ..ExecOptions::default()
                    },
                )
                .await;
            session.close().await;
            out
        })
        .with_context(|| {
            format!(
                "running {command:?} on machine {:?} ({endpoint})",
                machine.name
            )
        })?;
    match out.exit_status {
        Some(0) => Ok(()),
        Some(status) => Err(RemoteExit {
            machine: machine.name.clone(),
            status: u8::try_from(status).unwrap_or(1).max(1),
        }
        .into()),
        None => Err(RemoteExit {
            machine: machine.name.clone(),
            status: 1,
        }
        .into()),
    }
}
