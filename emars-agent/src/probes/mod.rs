//! Kernel probes: tracefs formats, memcg stat items from BTF, and the eBPF loader.

pub mod loader;
pub mod memcg_items;
pub mod tracefs;

pub use loader::{ProbeError, ProbeReport, Probes};
