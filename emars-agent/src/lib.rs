//! EMARS agent: kernel probes → events → cgroup/function registry → model → store → API/CLI.

pub mod config;
pub mod model;
pub mod registry;
pub mod store;
pub mod cgroupfs;
pub mod events;
pub mod probes;
pub mod api;
pub mod client;
pub mod agent;
pub mod demo;
pub mod tracker;
