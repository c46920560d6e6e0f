//! The command line's side: the API client and its rendering (`client`), the demo workload
//! (`demo`), the SVG report of what the agent measured (`report`), and the local limit sweep
//! (`tune`).

pub mod client;
pub mod demo;
pub mod report;
pub mod tune;
