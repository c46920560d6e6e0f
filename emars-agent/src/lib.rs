//! EMARS agent. The modules follow the pipeline:
//! kernel probes (`probes`) → events (`events`) → cgroup/function registry (`registry`,
//! `cgroupfs`) → model (`model`, `tracker`) → store (`store`) → policy (`recommend`, `policy`)
//! → actuator (`actuator`) → API/CLI (`api`, `client`); `agent` wires them into the daemon.

pub mod probes;

pub mod events;

pub mod cgroupfs;
pub mod config;
pub mod registry;

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
