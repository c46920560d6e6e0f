//! The agent's TOML configuration, documented in docs/config.md and in the embedded
//! `default-config.toml` ([`DEFAULT_CONFIG_TOML`], a commented starting point to print).
//!
//! Every section and key is optional; unknown keys are errors, so that a typo cannot silently
//! leave a default in force. Values are checked at load time, and every error names the key and
//! the value, because the config is usually written by someone who is not reading the code.

use std::net::{Ipv4Addr, SocketAddr};
use std::ops::RangeInclusive;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::registry::{normalize_root_path, Registry, DEFAULT_PATTERN};

/// The embedded default configuration, fully commented.
pub const DEFAULT_CONFIG_TOML: &str = include_str!("default-config.toml");

pub const DEFAULT_LISTEN_PORT: u16 = 9750;
pub const DEFAULT_STORE_PATH: &str = "/var/lib/emars/store";
pub const DEFAULT_RETENTION_DAYS: u32 = 14;
pub const RETENTION_DAYS_RANGE: RangeInclusive<u32> = 1..=3650;
pub const DEFAULT_ROOT: &str = "/emars";
pub const DEFAULT_PEAK_STEP_BYTES: u64 = 1 << 20;
/// One page: a smaller step would only multiply events without adding precision.
pub const MIN_PEAK_STEP_BYTES: u64 = 4096;
pub const DEFAULT_RING_BUFFER_BYTES: u32 = 4 << 20;
pub const RING_BUFFER_BYTES_RANGE: RangeInclusive<u32> = (64 << 10)..=(256 << 20);

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

fn invalid(key: &str, value: impl ToString, reason: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key: key.to_string(),
        value: value.to_string(),
        reason: reason.into(),
    }
}

#[derive(Debug, Clone, PartialEq, Default, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    pub api: ApiConfig,
    pub store: StoreConfig,
    pub cgroup: CgroupConfig,
    pub probes: ProbesConfig,
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct ApiConfig {
    /// Address of the HTTP API. Loopback by default: the API accepts writes.
    pub listen: SocketAddr,
}

impl Default for ApiConfig {
    fn default() -> Self {
        ApiConfig {
            listen: SocketAddr::from((Ipv4Addr::LOCALHOST, DEFAULT_LISTEN_PORT)),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct StoreConfig {
    /// Directory of the on-disk store; absolute, because the agent's working directory is
    /// whatever the service manager chose.
    pub path: PathBuf,
    /// Days of instance records and hourly buckets kept.
    pub retention_days: u32,
}

impl Default for StoreConfig {
    fn default() -> Self {
        StoreConfig {
            path: PathBuf::from(DEFAULT_STORE_PATH),
            retention_days: DEFAULT_RETENTION_DAYS,
        }
    }
}

/// Which cgroup version holds the memory controller.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum CgroupMode {
    /// Detect from /proc/self/mountinfo.
    #[default]
    Auto,
    V1,
    V2,
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct CgroupConfig {
    pub mode: CgroupMode,
    /// Mount point of the hierarchy holding the memory controller; auto-detected when None.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mount: Option<PathBuf>,
    pub roots: Vec<RootConfig>,
}

impl Default for CgroupConfig {
    fn default() -> Self {
        CgroupConfig {
            mode: CgroupMode::Auto,
            mount: None,
            roots: vec![RootConfig {
                path: DEFAULT_ROOT.to_string(),
                rules: vec![RuleConfig {
                    pattern: Some(DEFAULT_PATTERN.to_string()),
                    ..RuleConfig::default()
                }],
            }],
        }
    }
}

/// A watched sub-tree of the memory hierarchy and the rules that name its cgroups.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RootConfig {
    /// Relative to the hierarchy root, as the kernel reports it: `/emars`. Normalised at load.
    pub path: String,
    /// Tried in order; empty means the default rule `{function}/{instance}`.
    #[serde(default)]
    pub rules: Vec<RuleConfig>,
}

/// How to read a function and an instance out of a path below a root (see docs/config.md).
#[derive(Debug, Clone, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RuleConfig {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pattern: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub regex: Option<String>,
    /// Template; None means `{function}`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub function: Option<String>,
    /// Template; None means `{instance}`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub instance: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct ProbesConfig {
    /// eBPF programs not to attach, by name (as listed by GET /v1/info).
    pub disable: Vec<String>,
    /// Growth of a cgroup's in-kernel peak between two peak events.
    pub peak_step_bytes: u64,
    /// Size of the kernel → agent ring buffer.
    pub ring_buffer_bytes: u32,
}

impl Default for ProbesConfig {
    fn default() -> Self {
        ProbesConfig {
            disable: Vec::new(),
            peak_step_bytes: DEFAULT_PEAK_STEP_BYTES,
            ring_buffer_bytes: DEFAULT_RING_BUFFER_BYTES,
        }
    }
}

impl Config {
    /// Parses, normalises and validates a TOML document.
    pub fn from_toml_str(s: &str) -> Result<Config, ConfigError> {
        Self::parse(s, None)
    }

    /// Reads and parses a config file; errors carry its path.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Self::parse(&text, Some(path))
    }

    /// The embedded `default-config.toml`, which a test keeps equal to `Config::default()`.
    pub fn embedded_default() -> Config {
        Self::from_toml_str(DEFAULT_CONFIG_TOML).unwrap_or_default()
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        self.store.validate()?;
        self.cgroup.validate()?;
        self.probes.validate()
    }

    fn parse(s: &str, path: Option<&Path>) -> Result<Config, ConfigError> {
        let mut config: Config = toml::from_str(s).map_err(|e| ConfigError::Parse {
            path: path.map(Path::to_path_buf),
            message: e.to_string().trim_end().to_string(),
        })?;
        config.normalize();
        config.validate()?;
        Ok(config)
    }

    /// Puts root paths in the kernel's form; invalid ones are left for `validate` to report.
    fn normalize(&mut self) {
        for root in &mut self.cgroup.roots {
            if let Ok(path) = normalize_root_path(&root.path) {
                root.path = path;
            }
        }
    }
}

impl StoreConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        if !self.path.is_absolute() {
            return Err(invalid(
                "store.path",
                self.path.display(),
                "must be an absolute path",
            ));
        }
        if !RETENTION_DAYS_RANGE.contains(&self.retention_days) {
            return Err(invalid(
                "store.retention_days",
                self.retention_days,
                format!(
                    "must be between {} and {}",
                    RETENTION_DAYS_RANGE.start(),
                    RETENTION_DAYS_RANGE.end()
                ),
            ));
        }
        Ok(())
    }
}

impl CgroupConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        if let Some(mount) = &self.mount {
            if !mount.is_absolute() {
                return Err(invalid(
                    "cgroup.mount",
                    mount.display(),
                    "must be an absolute path, e.g. /sys/fs/cgroup",
                ));
            }
        }
        Registry::new(&self.roots).map(drop)
    }
}

impl ProbesConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        for (i, name) in self.disable.iter().enumerate() {
            let key = format!("probes.disable[{i}]");
            if name.is_empty() || name.chars().any(|c| c.is_whitespace() || c.is_control()) {
                return Err(invalid(
                    &key,
                    name,
                    "must be a program name, without spaces",
                ));
            }
            if self.disable[..i].contains(name) {
                return Err(invalid(&key, name, "is listed twice"));
            }
        }
        if self.peak_step_bytes < MIN_PEAK_STEP_BYTES {
            return Err(invalid(
                "probes.peak_step_bytes",
                self.peak_step_bytes,
                format!("must be at least {MIN_PEAK_STEP_BYTES} (one page)"),
            ));
        }
        let ring = self.ring_buffer_bytes;
        if !ring.is_power_of_two() || !RING_BUFFER_BYTES_RANGE.contains(&ring) {
            return Err(invalid(
                "probes.ring_buffer_bytes",
                ring,
                format!(
                    "must be a power of two between {} (64 KiB) and {} (256 MiB)",
                    RING_BUFFER_BYTES_RANGE.start(),
                    RING_BUFFER_BYTES_RANGE.end()
                ),
            ));
        }
        Ok(())
    }
}
