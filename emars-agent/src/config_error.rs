//! The config's error, in a leaf module below every stage: the stages' settings types
//! (`policy::reactive::ReactiveConfig`, `policy::keepalive::KeepAlive`, ...) check their own
//! values and say what is wrong with this type, without importing `config`, which composes them.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {}", path.display())]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    /// Bad TOML, an unknown key or a value of the wrong type; toml's message names the key and
    /// shows the line.
    #[error("{}{message}", path.as_ref().map_or_else(|| "invalid config: ".to_string(), |p| format!("invalid config file {}: ", p.display())))]
    Parse {
        path: Option<PathBuf>,
        message: String,
    },
    /// A well-typed value that is out of range or inconsistent; `key` is dotted, e.g.
    /// `cgroup.roots[0].rules[1].regex`.
    #[error("invalid value \"{value}\" for {key}: {reason}")]
    Invalid {
        key: String,
        value: String,
        reason: String,
    },
}
