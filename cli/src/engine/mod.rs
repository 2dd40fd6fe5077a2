//! The engine: plan, then apply.
//!
//! [`plan::plan`] is a pure function from the desired spec and the machines the provider reports
//! to an ordered [`plan::Plan`]. [`apply`] executes plans as phases that journal every side effect
//! and can be re-run to resume.

pub mod access;
pub mod apply;
pub mod artifacts;
pub mod autoupgrade;
pub mod bootstrap;
pub mod iam;
pub mod install;
pub mod names;
pub mod plan;
pub mod repair;
pub mod report;
pub mod upgrade;

pub use apply::{
    ApplyContext, DeleteContext, EngineError, Env, MachineTemplate, Phase, run_phases,
};
pub use plan::{
    DesiredMachine, Inventory, Plan, PlanError, Step, desired_machines, desired_names, plan,
};
pub use report::Reporter;
