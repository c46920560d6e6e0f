//! Drawings and text of what the agent and `emars tune` measured, for people: SVG plots
//! (`plot`), and bytes, times and tables as text (`text`).

pub mod plot;
pub mod text;
