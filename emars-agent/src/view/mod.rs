//! Drawings of what the agent and `emars tune` measured, for people: SVG plots (`plot`).

pub mod plot;
