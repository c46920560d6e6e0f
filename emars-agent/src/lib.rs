//! EMARS agent. The modules follow the pipeline:
//! kernel probes (`probes`) → events (`events`) → cgroup/function registry (`registry`,
//! `cgroupfs`) → model (`model`, `tracker`) → store (`store`) → policy (`recommend`, `policy`)
//! → actuator (`actuator`) → API/CLI (`api`, `client`); `agent` wires them into the daemon.

pub mod probes;

pub mod events;

pub mod cgroupfs;
pub mod config;
pub mod registry;

pub mod live;
pub mod model;
pub mod tracker;

pub mod store;

pub mod policy;
pub mod recommend;

pub mod actuator;

pub mod api;
pub mod client;

pub mod agent;
pub mod demo;

/// For unit tests that read the running kernel: a loud SKIPPED line in the form the summaries
/// count, or a failure where the kernel features are required (`EMARS_TEST_ROOT_REQUIRED=1`,
/// as `cargo xtask test` sets it under root and in CI).
#[cfg(test)]
pub(crate) fn skip_kernel_test(test: &str, why: &dyn std::fmt::Display) {
    if std::env::var("EMARS_TEST_ROOT_REQUIRED").as_deref() == Ok("1") {
        panic!("{test} needs the running kernel's features (EMARS_TEST_ROOT_REQUIRED=1): {why}");
    }
    eprintln!("\n*** SKIPPED {test}: {why} ***\n");
}
