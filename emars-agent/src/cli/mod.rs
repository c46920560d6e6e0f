//! The command line's side: the API client and its rendering (`client`), and the demo
//! workload (`demo`).

pub mod client;
pub mod demo;
