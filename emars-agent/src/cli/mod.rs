//! The command line's side: the API client (`client`), what the commands print of its answers
//! (`render`), its way through the agent's local socket (`local`), which config is the agent's
//! and how to reach that agent (`locate`), the demo workload (`demo`), the SVG report of what
//! the agent measured (`report`), and the local limit sweep (`tune`).

pub mod client;
pub mod demo;
pub mod local;
pub mod locate;
pub mod render;
pub mod report;
pub mod tune;
