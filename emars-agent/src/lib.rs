//! EMARS agent: kernel probes → events → cgroup/function registry → model → store → API/CLI.

pub mod agent;
pub mod api;
pub mod cgroupfs;
pub mod client;
pub mod config;
pub mod demo;
pub mod events;
pub mod model;
pub mod probes;
pub mod registry;
pub mod store;
pub mod tracker;
