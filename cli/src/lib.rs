//! clusterctl: GKE-style managed Kubernetes on machines you own and on clouds.
//!
//! The binary is a thin shell over this library. Layout (see ARCHITECTURE.md):
//! `cmd` (clap only) -> actions -> `engine` (plan + phases) over `spec`, `state`, `ssh` and the
//! `providers` crate.

pub mod action;
pub mod bundle;
pub mod cmd;
pub mod credstore;
pub mod engine;
pub mod error;
pub mod etcd;
pub mod kube;
pub mod kubeconfig;
pub mod output;
pub mod pki;
pub mod provider;
pub mod registry;
pub mod schedule;
pub mod spec;
pub mod ssh;
pub mod state;
