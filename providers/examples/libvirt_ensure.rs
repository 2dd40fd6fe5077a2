//! Test helper for the libvirt end-to-end suite: ensures the machines listed in a JSON request
//! file one after another, printing `ensured NAME` after each, so a test can kill it mid-way.
//!
//! Usage: `libvirt_ensure REQUEST.json` where the request is
//! `{"uri": "...", "storage_root": "...", "cluster": {"name": .., "id": ..}, "machines": [MachineSpec, ...]}`.

use std::io::Write;

use providers::libvirt::{Accelerator, LibvirtConfig, LibvirtProvider};
use providers::{ClusterRef, MachineSpec, Provider};
use serde::Deserialize;

#[derive(Deserialize)]
struct Request {
    uri: String,
    storage_root: String,
    cluster: ClusterRef,
    machines: Vec<MachineSpec>,
}

fn main() {
    let Some(path) = std::env::args().nth(1) else {
        eprintln!("usage: libvirt_ensure REQUEST.json");
        std::process::exit(2);
    };
    let request: Request = match std::fs::read(&path)
        .map_err(|e| e.to_string())
        .and_then(|b| serde_json::from_slice(&b).map_err(|e| e.to_string()))
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("reading {path}: {e}");
            std::process::exit(2);
        }
    };
    let mut config = LibvirtConfig::new(request.uri);
    config.storage_root = request.storage_root;
    config.accelerator = Accelerator::Tcg;
    let provider = match LibvirtProvider::connect(config) {
        Ok(p) => p,
        Err(e) => {
            eprintln!("{e}");
            std::process::exit(1);
        }
    };
    for spec in &request.machines {
        match provider.ensure_machine(&request.cluster, spec) {
            Ok(m) => {
                println!("ensured {}", m.name);
                let _ = std::io::stdout().flush();
            }
            Err(e) => {
                eprintln!("ensuring {}: {e}", spec.name);
                std::process::exit(1);
            }
        }
    }
}
