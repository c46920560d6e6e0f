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

pub use crate::config_error::ConfigError;
pub use crate::kernel::cgroupfs::CgroupMode;
pub use crate::kernel::probes::ProbesConfig;
use crate::model::registry::{normalize_root_path, InvalidRule, Registry, DEFAULT_PATTERN};
pub use crate::model::registry::{RootConfig, RuleConfig};
pub use crate::policy::fleet::FleetConfig;
pub use crate::policy::reactive::ReactiveConfig;
pub use crate::policy::{EnforceMode, FunctionPolicy, PolicyConfig};

/// The embedded default configuration, fully commented.
pub const DEFAULT_CONFIG_TOML: &str = include_str!("default-config.toml");

pub const DEFAULT_LISTEN_PORT: u16 = 9750;
pub const DEFAULT_STORE_PATH: &str = "/var/lib/emars/store";
pub const DEFAULT_RETENTION_DAYS: u32 = 14;
pub const RETENTION_DAYS_RANGE: RangeInclusive<u32> = 1..=3650;
pub use crate::store::DEFAULT_MAX_FUNCTIONS;
/// Allowed `store.max_functions`: each function costs its history's memory and its share of
/// /metrics (docs/config.md says how much), so a million is already far beyond what one host
/// runs.
pub const MAX_FUNCTIONS_RANGE: RangeInclusive<usize> = 1..=1_000_000;
pub const DEFAULT_ROOT: &str = "/emars";
pub const DEFAULT_PEAK_STEP_BYTES: u64 = 1 << 20;
/// One page: a smaller step would only multiply events without adding precision.
pub const MIN_PEAK_STEP_BYTES: u64 = 4096;
pub const DEFAULT_RING_BUFFER_BYTES: u32 = 4 << 20;
pub const RING_BUFFER_BYTES_RANGE: RangeInclusive<u32> = (64 << 10)..=(256 << 20);

impl From<InvalidRule> for ConfigError {
    fn from(e: InvalidRule) -> Self {
        ConfigError::Invalid {
            key: e.key,
            value: e.value,
            reason: e.reason,
        }
    }
}

/// `value` of `key` within `range` (both ends allowed), or the error that says so.
fn in_range<T: PartialOrd + std::fmt::Display>(
    key: &str,
    value: T,
    range: &std::ops::RangeInclusive<T>,
) -> Result<(), ConfigError> {
    if range.contains(&value) {
        return Ok(());
    }
    Err(invalid(
        key,
        value,
        format!("must be between {} and {}", range.start(), range.end()),
    ))
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
    pub policy: PolicyConfig,
    pub reactive: ReactiveConfig,
    pub fleet: FleetConfig,
}

pub const DEFAULT_PERIOD_SECS: u64 = 86_400;
pub const MIN_PERIOD_SECS: u64 = 60;
pub const DEFAULT_EXPORT_DIR: &str = "/var/lib/emars/export";
pub const DEFAULT_HEADROOM_BYTES: u64 = 8 << 20;

impl Default for PolicyConfig {
    fn default() -> Self {
        PolicyConfig {
            mode: EnforceMode::Observe,
            period_secs: DEFAULT_PERIOD_SECS,
            export_dir: PathBuf::from(DEFAULT_EXPORT_DIR),
            headroom_bytes: DEFAULT_HEADROOM_BYTES,
            override_runtime_limits: false,
            defaults: FunctionPolicy::default(),
            functions: Vec::new(),
            keepalive: Default::default(),
            prior: Default::default(),
            sized: Default::default(),
        }
    }
}

impl FunctionPolicy {
    /// `self` over `base`, key by key.
    pub fn or(&self, base: &FunctionPolicy) -> FunctionPolicy {
        FunctionPolicy {
            name: self.name.clone(),
            percentile: self.percentile.or(base.percentile),
            margin: self.margin.or(base.margin),
            low_confidence_margin: self.low_confidence_margin.or(base.low_confidence_margin),
            high_fraction: self.high_fraction.or(base.high_fraction),
            floor_bytes: self.floor_bytes.or(base.floor_bytes),
            ceiling_bytes: self.ceiling_bytes.or(base.ceiling_bytes),
            half_life_hours: self.half_life_hours.or(base.half_life_hours),
            pin_max_bytes: self.pin_max_bytes.or(base.pin_max_bytes),
            pin_high_bytes: self.pin_high_bytes.or(base.pin_high_bytes),
        }
    }

    fn validate(&self, key: &str) -> Result<(), ConfigError> {
        let k = |f: &str| format!("{key}.{f}");
        if let Some(p) = self.percentile {
            // A fraction (0.95) is the 0.95th percentile: limits near the smallest peaks,
            // OOM kills in enforce mode. Refused rather than guessed.
            if p > 0.0 && p < 1.0 {
                return Err(invalid(
                    &k("percentile"),
                    p,
                    format!(
                        "is a percentile from 1 to 100, not a fraction: {p} would size limits \
                         to the {p}th percentile of peaks; did you mean {}?",
                        (p * 100.0 * 1000.0).round() / 1000.0
                    ),
                ));
            }
            if !(1.0..=100.0).contains(&p) {
                return Err(invalid(
                    &k("percentile"),
                    p,
                    "must be from 1 to 100 (99 is the 99th percentile of peaks)",
                ));
            }
        }
        if let Some(m) = self.margin {
            if !(0.0..=10.0).contains(&m) {
                return Err(invalid(&k("margin"), m, "must be between 0 and 10"));
            }
        }
        if let Some(m) = self.low_confidence_margin {
            if !(0.0..=10.0).contains(&m) {
                return Err(invalid(
                    &k("low_confidence_margin"),
                    m,
                    "must be between 0 and 10",
                ));
            }
        }
        if let Some(h) = self.high_fraction {
            if !(h > 0.0 && h <= 1.0) {
                return Err(invalid(&k("high_fraction"), h, "must be in (0, 1]"));
            }
        }
        if let Some(h) = self.half_life_hours {
            if !(h > 0.0 && h <= 24.0 * 365.0) {
                return Err(invalid(&k("half_life_hours"), h, "must be in (0, 8760]"));
            }
        }
        if let (Some(f), Some(c)) = (self.floor_bytes, self.ceiling_bytes) {
            if f > c {
                return Err(invalid(
                    &k("floor_bytes"),
                    f,
                    format!("must not exceed ceiling_bytes ({c})"),
                ));
            }
        }
        for (name, v) in [
            ("floor_bytes", self.floor_bytes),
            ("ceiling_bytes", self.ceiling_bytes),
            ("pin_max_bytes", self.pin_max_bytes),
            ("pin_high_bytes", self.pin_high_bytes),
        ] {
            if let Some(v) = v {
                if v < 4096 {
                    return Err(invalid(&k(name), v, "must be at least 4096 (one page)"));
                }
            }
        }
        if let (Some(h), Some(m)) = (self.pin_high_bytes, self.pin_max_bytes) {
            if h > m {
                return Err(invalid(
                    &k("pin_high_bytes"),
                    h,
                    format!("must not exceed pin_max_bytes ({m})"),
                ));
            }
        }
        Ok(())
    }
}

impl PolicyConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        self.keepalive.validate()?;
        self.prior.validate()?;
        self.sized.validate()?;
        if self.period_secs < MIN_PERIOD_SECS {
            return Err(invalid(
                "policy.period_secs",
                self.period_secs,
                format!("must be at least {MIN_PERIOD_SECS}"),
            ));
        }
        if !self.export_dir.is_absolute() {
            return Err(invalid(
                "policy.export_dir",
                self.export_dir.display(),
                "must be an absolute path",
            ));
        }
        if let Some(n) = &self.defaults.name {
            return Err(invalid(
                "policy.defaults.name",
                n,
                "names belong in [[policy.functions]] entries",
            ));
        }
        self.defaults.validate("policy.defaults")?;
        for (i, f) in self.functions.iter().enumerate() {
            let key = format!("policy.functions[{i}]");
            let name = f.name.as_deref().unwrap_or("");
            if !crate::model::registry::valid_function_name(name) {
                return Err(invalid(
                    &format!("{key}.name"),
                    name,
                    "must be 1 to 128 characters of A-Z a-z 0-9 . _ : -",
                ));
            }
            if self.functions[..i].iter().any(|o| o.name == f.name) {
                return Err(invalid(&format!("{key}.name"), name, "is listed twice"));
            }
            f.or(&self.defaults).validate(&key)?;
        }
        Ok(())
    }

    /// The effective policy of a function.
    pub fn for_function(&self, name: &str) -> FunctionPolicy {
        match self
            .functions
            .iter()
            .find(|f| f.name.as_deref() == Some(name))
        {
            Some(f) => f.or(&self.defaults),
            None => self.defaults.clone(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct ApiConfig {
    /// Address of the HTTP API. Loopback by default.
    pub listen: SocketAddr,
    /// The write token: generated at first start, readable by root only; every write request
    /// must present it.
    pub token_file: PathBuf,
    /// Must be true to listen on a non-loopback address (writes stay token-only).
    pub allow_remote: bool,
    /// Host names besides localhost/127.0.0.1/[::1] that requests may carry in their Host
    /// header (the names of this host, when `allow_remote` is set).
    pub allowed_hosts: Vec<String>,
    /// The local API socket (unix domain): the CLI's way in. Peers are checked by their
    /// kernel credentials (root, or `socket_group`), so writes need no token there and never
    /// travel to a listener nobody verified. An empty path turns it off.
    pub socket: PathBuf,
    /// A group whose members may use the socket besides root (its file then mode 0660, its
    /// directory 0750); empty: root only.
    pub socket_group: String,
}

pub const DEFAULT_TOKEN_FILE: &str = "/var/lib/emars/api-token";
pub const DEFAULT_SOCKET: &str = "/run/emars/api.sock";
/// Longest unix socket path the kernel takes (`sun_path` is 108 bytes with its NUL).
pub const MAX_SOCKET_PATH: usize = 107;

impl Default for ApiConfig {
    fn default() -> Self {
        ApiConfig {
            listen: SocketAddr::from((Ipv4Addr::LOCALHOST, DEFAULT_LISTEN_PORT)),
            token_file: PathBuf::from(DEFAULT_TOKEN_FILE),
            allow_remote: false,
            allowed_hosts: Vec::new(),
            socket: PathBuf::from(DEFAULT_SOCKET),
            socket_group: String::new(),
        }
    }
}

impl ApiConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        if !self.listen.ip().is_loopback() && !self.allow_remote {
            return Err(invalid(
                "api.listen",
                self.listen,
                "is not a loopback address: the API would be reachable from other hosts; set \
                 api.allow_remote = true to allow it (writes still need the token of \
                 api.token_file), or listen on 127.0.0.1",
            ));
        }
        if !self.token_file.is_absolute() {
            return Err(invalid(
                "api.token_file",
                self.token_file.display(),
                "must be an absolute path",
            ));
        }
        for (i, h) in self.allowed_hosts.iter().enumerate() {
            let ok = !h.is_empty()
                && h.len() <= 253
                && !h.contains(':')
                && h.chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '.' || c == '-');
            if !ok {
                return Err(invalid(
                    &format!("api.allowed_hosts[{i}]"),
                    h,
                    "must be a host name or IPv4 address without port (letters, digits, '.', '-')",
                ));
            }
        }
        self.validate_socket()
    }

    fn validate_socket(&self) -> Result<(), ConfigError> {
        if self.socket.as_os_str().is_empty() {
            if !self.socket_group.is_empty() {
                return Err(invalid(
                    "api.socket_group",
                    &self.socket_group,
                    "is set but api.socket is empty (the socket is off)",
                ));
            }
            return Ok(());
        }
        if !self.socket.is_absolute() || self.socket.parent().is_none_or(|p| p == Path::new("/")) {
            return Err(invalid(
                "api.socket",
                self.socket.display(),
                "must be an absolute path in a directory of the agent's own, such as                  /run/emars/api.sock (or \"\" to turn the socket off)",
            ));
        }
        if self.socket.as_os_str().len() > MAX_SOCKET_PATH {
            return Err(invalid(
                "api.socket",
                self.socket.display(),
                format!("is longer than the {MAX_SOCKET_PATH} bytes a unix socket path may have"),
            ));
        }
        let group_ok = self.socket_group.is_empty()
            || (self.socket_group.len() <= 32
                && self
                    .socket_group
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.')));
        if !group_ok {
            return Err(invalid(
                "api.socket_group",
                &self.socket_group,
                "must be a group name (letters, digits, '_', '-', '.'; at most 32)",
            ));
        }
        Ok(())
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
    /// Functions known at most: a new name past it is refused and counted (names come from
    /// tenants' cgroups and API calls, and each costs memory and /metrics series).
    pub max_functions: usize,
}

impl Default for StoreConfig {
    fn default() -> Self {
        StoreConfig {
            path: PathBuf::from(DEFAULT_STORE_PATH),
            retention_days: DEFAULT_RETENTION_DAYS,
            max_functions: DEFAULT_MAX_FUNCTIONS,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct CgroupConfig {
    pub mode: CgroupMode,
    /// Mount point of the hierarchy holding the memory controller; auto-detected when None.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mount: Option<PathBuf>,
    /// How long a new cgroup whose rule reads its container's metadata file waits for the
    /// runtime to write it, before the later rules decide.
    pub metadata_wait_ms: u64,
    pub roots: Vec<RootConfig>,
}

/// Allowed `cgroup.metadata_wait_ms`.
pub const METADATA_WAIT_MS_RANGE: std::ops::RangeInclusive<u64> = 100..=600_000;

impl Default for CgroupConfig {
    fn default() -> Self {
        CgroupConfig {
            mode: CgroupMode::Auto,
            mount: None,
            metadata_wait_ms: crate::model::tracker::DEFAULT_METADATA_WAIT_MS,
            roots: vec![RootConfig {
                path: DEFAULT_ROOT.to_string(),
                create: true,
                rules: vec![RuleConfig {
                    pattern: Some(DEFAULT_PATTERN.to_string()),
                    ..RuleConfig::default()
                }],
            }],
        }
    }
}

pub const DEFAULT_MAX_WATCHED_CGROUPS: u32 = 65_536;
pub const DEFAULT_MAX_TASKS: u32 = 131_072;
pub const TABLE_ENTRIES_RANGE: RangeInclusive<u32> = 1..=(1 << 24);

impl Default for ProbesConfig {
    fn default() -> Self {
        ProbesConfig {
            disable: Vec::new(),
            charge_events: Default::default(),
            peak_step_bytes: DEFAULT_PEAK_STEP_BYTES,
            ring_buffer_bytes: DEFAULT_RING_BUFFER_BYTES,
            max_watched_cgroups: DEFAULT_MAX_WATCHED_CGROUPS,
            max_tasks: DEFAULT_MAX_TASKS,
            pin: true,
            pin_path: DEFAULT_PIN_PATH.into(),
        }
    }
}

/// Where the kernel side is pinned by default (bpffs).
pub const DEFAULT_PIN_PATH: &str = "/sys/fs/bpf/emars";

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
        self.api.validate()?;
        self.store.validate()?;
        self.cgroup.validate()?;
        self.probes.validate()?;
        self.policy.validate()?;
        self.reactive.validate()?;
        self.fleet.validate()?;
        if self.reactive.enabled == Some(true) && self.policy.mode != EnforceMode::Enforce {
            return Err(invalid(
                "reactive.enabled",
                true,
                "needs policy.mode = \"enforce\": in observe mode the agent writes no limits, \
                 so the burst guard would watch and never raise one (admission answers \
                 without it)",
            ));
        }
        Ok(())
    }

    /// What only the host can tell (`emars check-config` and the agent's start): the pin
    /// directory must be on bpffs, or below /sys/fs/bpf where the agent mounts it.
    pub fn check_host(&self) -> Result<(), ConfigError> {
        let p = &self.probes;
        if !p.pin
            || p.pin_path
                .starts_with(crate::kernel::probes::pins::BPF_MOUNT)
        {
            return Ok(());
        }
        let existing = p.pin_path.ancestors().find(|a| a.exists());
        let Some(existing) = existing else {
            return Ok(());
        };
        match rustix::fs::statfs(existing) {
            Ok(st) if crate::kernel::probes::pins::is_bpffs(&st) => Ok(()),
            Ok(st) => Err(invalid(
                "probes.pin_path",
                p.pin_path.display(),
                format!(
                    "is not on a BPF filesystem ({} is on filesystem type {:#x}): pins cannot \
                     be made there, and the kernel side would detach at every restart; use a \
                     path under /sys/fs/bpf",
                    existing.display(),
                    st.f_type
                ),
            )),
            Err(e) => Err(invalid(
                "probes.pin_path",
                p.pin_path.display(),
                format!("cannot check its filesystem at {}: {e}", existing.display()),
            )),
        }
    }

    fn parse(s: &str, path: Option<&Path>) -> Result<Config, ConfigError> {
        let with_bytes = sizes_to_bytes(s)?;
        let s = with_bytes.as_deref().unwrap_or(s);
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

/// Every `*_bytes` key takes a size with a unit too (`"64Mi"`, [`crate::size`]): such strings
/// become integers before the document is deserialised, in place, so that the parser's line
/// numbers still hold. None when there was none (or the document is not TOML: the parser says
/// why).
fn sizes_to_bytes(text: &str) -> Result<Option<String>, ConfigError> {
    let Ok(mut doc) = text.parse::<toml_edit::DocumentMut>() else {
        return Ok(None);
    };
    let mut changed = false;
    sizes_in_table(doc.as_table_mut(), "", &mut changed)?;
    Ok(changed.then(|| doc.to_string()))
}

fn dotted(prefix: &str, key: &str) -> String {
    if prefix.is_empty() {
        key.to_owned()
    } else {
        format!("{prefix}.{key}")
    }
}

fn sizes_in_table(
    table: &mut toml_edit::Table,
    prefix: &str,
    changed: &mut bool,
) -> Result<(), ConfigError> {
    for (key, item) in table.iter_mut() {
        let name = dotted(prefix, key.get());
        let is_size = key.get().ends_with("_bytes");
        match item {
            toml_edit::Item::Table(t) => sizes_in_table(t, &name, changed)?,
            toml_edit::Item::ArrayOfTables(a) => {
                for (i, t) in a.iter_mut().enumerate() {
                    sizes_in_table(t, &format!("{name}[{i}]"), changed)?;
                }
            }
            toml_edit::Item::Value(v) => sizes_in_value(v, &name, is_size, changed)?,
            toml_edit::Item::None => {}
        }
    }
    Ok(())
}

fn sizes_in_value(
    value: &mut toml_edit::Value,
    key: &str,
    is_size: bool,
    changed: &mut bool,
) -> Result<(), ConfigError> {
    match value {
        toml_edit::Value::InlineTable(t) => {
            for (k, v) in t.iter_mut() {
                let size = k.get().ends_with("_bytes");
                sizes_in_value(v, &dotted(key, k.get()), size, changed)?;
            }
        }
        toml_edit::Value::Array(a) => {
            for (i, v) in a.iter_mut().enumerate() {
                sizes_in_value(v, &format!("{key}[{i}]"), false, changed)?;
            }
        }
        toml_edit::Value::String(text) if is_size => {
            let text = text.value().clone();
            let bytes =
                crate::size::parse_size(&text).map_err(|e| invalid(key, &text, e.to_string()))?;
            // TOML integers are i64.
            let bytes = i64::try_from(bytes).map_err(|_| {
                invalid(
                    key,
                    &text,
                    format!("is above the largest TOML integer, {}", i64::MAX),
                )
            })?;
            let decor = value.decor().clone();
            *value = toml_edit::Value::from(bytes);
            *value.decor_mut() = decor;
            *changed = true;
        }
        _ => {}
    }
    Ok(())
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
        in_range(
            "store.retention_days",
            self.retention_days,
            &RETENTION_DAYS_RANGE,
        )?;
        in_range(
            "store.max_functions",
            self.max_functions,
            &MAX_FUNCTIONS_RANGE,
        )
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
        in_range(
            "cgroup.metadata_wait_ms",
            self.metadata_wait_ms,
            &METADATA_WAIT_MS_RANGE,
        )?;
        Registry::new(&self.roots)
            .map(drop)
            .map_err(ConfigError::from)
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
            let known = || {
                emars_common::names::PROGRAMS
                    .iter()
                    .chain([&emars_common::names::NET_INGRESS])
            };
            if !known().any(|p| p == name) {
                let known: Vec<&str> = known().copied().collect();
                return Err(invalid(
                    &key,
                    name,
                    format!("is not a program of EMARS; known: {}", known.join(", ")),
                ));
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
        if self.pin && !self.pin_path.is_absolute() {
            return Err(invalid(
                "probes.pin_path",
                self.pin_path.display(),
                "must be an absolute path on bpffs (e.g. /sys/fs/bpf/emars)",
            ));
        }
        for (key, v) in [
            ("probes.max_watched_cgroups", self.max_watched_cgroups),
            ("probes.max_tasks", self.max_tasks),
        ] {
            if !TABLE_ENTRIES_RANGE.contains(&v) {
                return Err(invalid(
                    key,
                    v,
                    format!("must be between 1 and {}", TABLE_ENTRIES_RANGE.end()),
                ));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn invalid_parts(err: ConfigError) -> (String, String, String) {
        match err {
            ConfigError::Invalid { key, value, reason } => (key, value, reason),
            other => panic!("expected Invalid, got {other:?}"),
        }
    }

    fn parse_message(err: ConfigError) -> String {
        match err {
            ConfigError::Parse { message, .. } => message,
            other => panic!("expected Parse, got {other:?}"),
        }
    }

    fn assert_invalid(toml: &str, key: &str, value: &str) -> String {
        let err = Config::from_toml_str(toml).unwrap_err();
        let shown = err.to_string();
        let (k, v, reason) = invalid_parts(err);
        assert_eq!((k.as_str(), v.as_str()), (key, value), "{toml}");
        assert!(shown.contains(key) && shown.contains(value), "{shown}");
        reason
    }

    #[test]
    fn embedded_default_is_the_default() {
        let parsed = Config::from_toml_str(DEFAULT_CONFIG_TOML).unwrap();
        assert_eq!(parsed, Config::default());
        assert_eq!(Config::embedded_default(), Config::default());
    }

    #[test]
    fn defaults() {
        let c = Config::default();
        assert_eq!(c.api.listen, "127.0.0.1:9750".parse().unwrap());
        assert_eq!(c.store.path, PathBuf::from("/var/lib/emars/store"));
        assert_eq!(c.store.retention_days, 14);
        assert_eq!(c.store.max_functions, 10_000);
        assert_eq!(c.cgroup.mode, CgroupMode::Auto);
        assert_eq!(c.cgroup.mount, None);
        assert_eq!(c.cgroup.roots.len(), 1);
        assert_eq!(c.cgroup.roots[0].path, "/emars");
        assert_eq!(
            c.cgroup.roots[0].rules,
            vec![RuleConfig {
                pattern: Some("{function}/{instance}".into()),
                ..RuleConfig::default()
            }]
        );
        assert!(c.probes.disable.is_empty());
        assert_eq!(c.probes.peak_step_bytes, 1 << 20);
        assert_eq!(c.probes.ring_buffer_bytes, 4 << 20);
        c.validate().unwrap();
    }

    #[test]
    fn empty_document_and_empty_sections_are_the_default() {
        assert_eq!(Config::from_toml_str("").unwrap(), Config::default());
        let sections = "[api]\n[store]\n[cgroup]\n[probes]\n";
        assert_eq!(Config::from_toml_str(sections).unwrap(), Config::default());
    }

    #[test]
    fn every_key_can_be_set() {
        let toml = r#"
[api]
listen = "[::1]:8000"
[store]
path = "/srv/emars"
retention_days = 3650
max_functions = 250
[cgroup]
mode = "v1"
mount = "/sys/fs/cgroup/memory"
[[cgroup.roots]]
path = "docker"
[[cgroup.roots.rules]]
regex = '(?P<id>[0-9a-f]{64})'
function = "docker"
instance = "{id}"
[[cgroup.roots]]
path = "/emars/"
[probes]
disable = ["memcg_mod_memcg_lruvec_state", "oom_mark_victim"]
peak_step_bytes = 4096
ring_buffer_bytes = 65536
"#;
        let c = Config::from_toml_str(toml).unwrap();
        assert_eq!(c.api.listen, "[::1]:8000".parse().unwrap());
        assert_eq!(c.store.path, PathBuf::from("/srv/emars"));
        assert_eq!(c.store.retention_days, 3650);
        assert_eq!(c.store.max_functions, 250);
        assert_eq!(c.cgroup.mode, CgroupMode::V1);
        assert_eq!(
            c.cgroup.mount.as_deref(),
            Some(Path::new("/sys/fs/cgroup/memory"))
        );
        // Root paths are normalised to the kernel's form.
        assert_eq!(c.cgroup.roots[0].path, "/docker");
        assert_eq!(c.cgroup.roots[1].path, "/emars");
        assert!(c.cgroup.roots[1].rules.is_empty());
        assert_eq!(
            c.cgroup.roots[0].rules[0].function.as_deref(),
            Some("docker")
        );
        assert_eq!(
            c.probes.disable,
            vec!["memcg_mod_memcg_lruvec_state", "oom_mark_victim"]
        );
        assert_eq!(c.probes.peak_step_bytes, 4096);
        assert_eq!(c.probes.ring_buffer_bytes, 65536);
        for (text, mode) in [
            ("auto", CgroupMode::Auto),
            ("v1", CgroupMode::V1),
            ("v2", CgroupMode::V2),
        ] {
            let c = Config::from_toml_str(&format!("[cgroup]\nmode = \"{text}\"")).unwrap();
            assert_eq!(c.cgroup.mode, mode);
        }
    }

    #[test]
    fn serialised_config_round_trips() {
        let toml = r#"
[cgroup]
mount = "/sys/fs/cgroup"
[[cgroup.roots]]
path = "/system.slice"
[[cgroup.roots.rules]]
pattern = "docker-{id}.scope"
function = "docker"
instance = "{id}"
"#;
        for config in [Config::default(), Config::from_toml_str(toml).unwrap()] {
            let text = toml::to_string_pretty(&config).unwrap();
            assert_eq!(Config::from_toml_str(&text).unwrap(), config, "{text}");
        }
    }

    #[test]
    fn invalid_message_names_key_and_value() {
        let err = Config::from_toml_str("[store]\nretention_days = 0\n").unwrap_err();
        assert_eq!(
            err.to_string(),
            "invalid value \"0\" for store.retention_days: must be between 1 and 3650"
        );
    }

    #[test]
    fn store_values_are_checked() {
        assert_invalid(
            "[store]\nretention_days = 3651",
            "store.retention_days",
            "3651",
        );
        assert_invalid("[store]\nretention_days = 0", "store.retention_days", "0");
        assert!(Config::from_toml_str("[store]\nretention_days = 1").is_ok());
        assert_invalid("[store]\nmax_functions = 0", "store.max_functions", "0");
        let reason = assert_invalid(
            "[store]\nmax_functions = 1000001",
            "store.max_functions",
            "1000001",
        );
        assert_eq!(reason, "must be between 1 and 1000000");
        assert!(Config::from_toml_str("[store]\nmax_functions = 1").is_ok());
        // A negative number is a type error, said by the parser with the key.
        let err = Config::from_toml_str("[store]\nmax_functions = -1").unwrap_err();
        assert!(parse_message(err).contains("max_functions"));
        let reason = assert_invalid(
            "[store]\npath = \"relative/store\"",
            "store.path",
            "relative/store",
        );
        assert!(reason.contains("absolute"), "{reason}");
        assert_invalid("[store]\npath = \"\"", "store.path", "");
    }

    #[test]
    fn cgroup_values_are_checked() {
        assert_invalid(
            "[cgroup]\nmount = \"sys/fs/cgroup\"",
            "cgroup.mount",
            "sys/fs/cgroup",
        );
        assert_invalid("[cgroup]\nroots = []", "cgroup.roots", "[]");
        assert_invalid(
            "[[cgroup.roots]]\npath = \"/\"",
            "cgroup.roots[0].path",
            "/",
        );
        assert_invalid(
            "[[cgroup.roots]]\npath = \"/a/../b\"",
            "cgroup.roots[0].path",
            "/a/../b",
        );
        assert_invalid(
            "[[cgroup.roots]]\npath = \"/emars\"\n[[cgroup.roots]]\npath = \"/emars/x\"",
            "cgroup.roots[1].path",
            "/emars/x",
        );
        // Root paths are normalised before validation, so the value shown is the normalised one.
        assert_invalid(
            "[[cgroup.roots]]\npath = \"/emars\"\n[[cgroup.roots]]\npath = \"emars\"",
            "cgroup.roots[1].path",
            "/emars",
        );
        let nine: String = (0..9)
            .map(|i| format!("[[cgroup.roots]]\npath = \"/r{i}\"\n"))
            .collect();
        assert_invalid(&nine, "cgroup.roots", "9 roots");
    }

    #[test]
    fn rule_values_are_checked_with_their_full_key() {
        let toml = r#"
[[cgroup.roots]]
path = "/ok"
[[cgroup.roots]]
path = "/r"
[[cgroup.roots.rules]]
pattern = "{function}/{instance}"
[[cgroup.roots.rules]]
regex = "(unclosed"
"#;
        let reason = assert_invalid(toml, "cgroup.roots[1].rules[1].regex", "(unclosed");
        assert!(reason.contains("unclosed group"), "{reason}");

        let toml = r#"
[[cgroup.roots]]
path = "/r"
[[cgroup.roots.rules]]
pattern = "docker-{id}.scope"
"#;
        let reason = assert_invalid(toml, "cgroup.roots[0].rules[0].function", "{function}");
        assert!(reason.contains("it captures {id}"), "{reason}");

        let toml = r#"
[[cgroup.roots]]
path = "/r"
[[cgroup.roots.rules]]
pattern = "{function}/{id"
"#;
        assert_invalid(toml, "cgroup.roots[0].rules[0].pattern", "{function}/{id");

        let toml = r#"
[[cgroup.roots]]
path = "/r"
[[cgroup.roots.rules]]
pattern = "{function}/{instance}"
regex = "(?P<function>.+)"
"#;
        assert_invalid(toml, "cgroup.roots[0].rules[0].regex", "(?P<function>.+)");

        let toml = r#"
[[cgroup.roots]]
path = "/r"
[[cgroup.roots.rules]]
function = "docker"
"#;
        assert_invalid(
            toml,
            "cgroup.roots[0].rules[0]",
            "{ function = \"docker\" }",
        );
    }

    #[test]
    fn probe_values_are_checked() {
        assert_invalid(
            "[probes]\npeak_step_bytes = 4095",
            "probes.peak_step_bytes",
            "4095",
        );
        assert_invalid(
            "[probes]\npeak_step_bytes = 0",
            "probes.peak_step_bytes",
            "0",
        );
        for bad in ["0", "65535", "100000", "32768", "536870912", "3145728"] {
            assert_invalid(
                &format!("[probes]\nring_buffer_bytes = {bad}"),
                "probes.ring_buffer_bytes",
                bad,
            );
        }
        for good in ["65536", "268435456", "1048576"] {
            assert!(
                Config::from_toml_str(&format!("[probes]\nring_buffer_bytes = {good}")).is_ok()
            );
        }
        assert_invalid("[probes]\ndisable = [\"\"]", "probes.disable[0]", "");
        assert_invalid("[probes]\ndisable = [\"a b\"]", "probes.disable[0]", "a b");
        let reason = assert_invalid(
            "[probes]\ndisable = [\"oom_mark_victim\", \"cgroup_mkdir\", \"oom_mark_victim\"]",
            "probes.disable[2]",
            "oom_mark_victim",
        );
        assert!(reason.contains("twice"), "{reason}");
        let reason = assert_invalid(
            "[probes]\ndisable = [\"no_such_program\"]",
            "probes.disable[0]",
            "no_such_program",
        );
        assert!(reason.contains("memcg_mod_memcg_state"), "{reason}");
    }

    #[test]
    fn unknown_keys_are_errors_naming_the_key() {
        for (toml, key) in [
            ("retention_days = 3", "retention_days"),
            ("[apu]\nlisten = \"127.0.0.1:1\"", "apu"),
            ("[api]\nport = 80", "port"),
            ("[store]\nretention = 3", "retention"),
            ("[cgroup]\nroot = \"/emars\"", "root"),
            ("[[cgroup.roots]]\npath = \"/e\"\nrule = 1", "rule"),
            (
                "[[cgroup.roots]]\npath = \"/e\"\n[[cgroup.roots.rules]]\npattern = \"{function}/{instance}\"\nfuncton = \"x\"",
                "funct",
            ),
            ("[probes]\ndisabled = []", "disabled"),
        ] {
            let message = parse_message(Config::from_toml_str(toml).unwrap_err());
            assert!(
                message.contains(&format!("unknown field `{key}")),
                "{toml}: {message}"
            );
        }
    }

    #[test]
    fn wrong_types_and_syntax_are_parse_errors() {
        for (toml, fragment) in [
            ("[store]\nretention_days = \"14\"", "retention_days"),
            ("[store]\nretention_days = -1", "retention_days"),
            (
                "[probes]\nring_buffer_bytes = 5000000000",
                "ring_buffer_bytes",
            ),
            ("[api]\nlisten = \"localhost\"", "listen"),
            ("[cgroup]\nmode = \"v3\"", "v3"),
            ("[[cgroup.roots]]\nrules = []", "path"),
            ("[store\n", "line 1"),
        ] {
            let message = parse_message(Config::from_toml_str(toml).unwrap_err());
            assert!(message.contains(fragment), "{toml}: {message}");
            assert!(!message.ends_with('\n'));
        }
    }

    fn temp_file(name: &str, text: &str) -> PathBuf {
        let path = std::env::temp_dir().join(format!(
            "emars-config-test-{}-{name}.toml",
            std::process::id()
        ));
        std::fs::write(&path, text).unwrap();
        path
    }

    #[test]
    fn load_reads_and_reports_the_path() {
        let good = temp_file("good", "[store]\nretention_days = 30\n");
        assert_eq!(Config::load(&good).unwrap().store.retention_days, 30);
        std::fs::remove_file(&good).unwrap();

        let bad = temp_file("bad", "[store]\nretention = 30\n");
        let err = Config::load(&bad).unwrap_err();
        assert!(
            err.to_string().contains(&bad.display().to_string()),
            "{err}"
        );
        match err {
            ConfigError::Parse { path, message } => {
                assert_eq!(path.as_deref(), Some(bad.as_path()));
                assert!(message.contains("retention"), "{message}");
            }
            other => panic!("{other:?}"),
        }
        std::fs::remove_file(&bad).unwrap();

        let missing = std::env::temp_dir().join("emars-config-test-does-not-exist.toml");
        let err = Config::load(&missing).unwrap_err();
        assert!(err.to_string().contains("does-not-exist"), "{err}");
        match err {
            ConfigError::Read { path, source } => {
                assert_eq!(path, missing);
                assert_eq!(source.kind(), std::io::ErrorKind::NotFound);
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn byte_keys_take_sizes_with_units() {
        let c = Config::from_toml_str(
            "[probes]\npeak_step_bytes = \"2Mi\"\nring_buffer_bytes = \"8Mi\"\n\
             [policy]\nheadroom_bytes = \"16M\"\n\
             [policy.defaults]\nfloor_bytes = \"0.5Gi\"\nceiling_bytes = 4294967296\n\
             [[policy.functions]]\nname = \"f\"\npin_max_bytes = \"1.5Gi\"\n\
             [reactive]\nhost_reserve_bytes = \"1Gi\"\nstep_min_bytes = \"64Ki\"\n\
             squeeze_headroom_bytes = \"4096\"\n",
        )
        .unwrap();
        assert_eq!(c.probes.peak_step_bytes, 2 << 20);
        assert_eq!(c.probes.ring_buffer_bytes, 8 << 20);
        assert_eq!(c.policy.headroom_bytes, 16_000_000);
        assert_eq!(c.policy.defaults.floor_bytes, Some(512 << 20));
        assert_eq!(c.policy.defaults.ceiling_bytes, Some(4 << 30));
        assert_eq!(c.policy.for_function("f").pin_max_bytes, Some(3 << 29));
        assert_eq!(c.reactive.host_reserve_bytes, 1 << 30);
        assert_eq!(c.reactive.step_min_bytes, 64 << 10);
        assert_eq!(c.reactive.squeeze_headroom_bytes, 4096);
        // Inline tables and arrays of them too.
        let c = Config::from_toml_str(
            "[policy]\nfunctions = [{ name = \"g\", pin_max_bytes = \"64Mi\" }]\n",
        )
        .unwrap();
        assert_eq!(c.policy.for_function("g").pin_max_bytes, Some(64 << 20));
        // A size still obeys the key's own rules.
        assert_invalid(
            "[probes]\nring_buffer_bytes = \"3Mi\"",
            "probes.ring_buffer_bytes",
            "3145728",
        );
    }

    #[test]
    fn bad_sizes_name_the_key_the_value_and_the_forms() {
        for (toml, key, value, why) in [
            (
                "[probes]\npeak_step_bytes = \"64Q\"",
                "probes.peak_step_bytes",
                "64Q",
                "unknown unit \"Q\"",
            ),
            (
                "[policy.defaults]\nfloor_bytes = \"64MB\"",
                "policy.defaults.floor_bytes",
                "64MB",
                "write Mi for MiB",
            ),
            (
                "[[policy.functions]]\nname = \"f\"\n[[policy.functions]]\nname = \"g\"\n\
                 pin_high_bytes = \"-1Gi\"",
                "policy.functions[1].pin_high_bytes",
                "-1Gi",
                "negative",
            ),
            (
                "[reactive]\nhost_reserve_bytes = \"1.5\"",
                "reactive.host_reserve_bytes",
                "1.5",
                "a fraction of a byte",
            ),
            (
                "[reactive]\nhost_reserve_bytes = \"15Ei\"",
                "reactive.host_reserve_bytes",
                "15Ei",
                "largest TOML integer",
            ),
        ] {
            let reason = assert_invalid(toml, key, value);
            assert!(reason.contains(why), "{toml}: {reason}");
            if why != "largest TOML integer" {
                assert!(
                    reason.contains("64Mi") && reason.contains("Ki, Mi, Gi"),
                    "{reason}"
                );
            }
        }
        // Strings elsewhere stay strings, and other types stay the parser's errors.
        let err = Config::from_toml_str("[store]\nretention_days = \"14\"").unwrap_err();
        assert!(parse_message(err).contains("retention_days"));
        let err = Config::from_toml_str("[probes]\npeak_step_bytes = 1.5").unwrap_err();
        assert!(parse_message(err).contains("peak_step_bytes"));
    }

    #[test]
    fn sizes_keep_the_line_numbers_of_later_errors() {
        let err = Config::from_toml_str(
            "[probes]\npeak_step_bytes = \"2Mi\"\n\n[store]\nretention = 3\n",
        )
        .unwrap_err();
        let message = parse_message(err);
        assert!(
            message.contains("line 5") && message.contains("retention"),
            "{message}"
        );
    }

    #[test]
    fn parse_error_without_path() {
        let err = Config::from_toml_str("nope").unwrap_err();
        assert!(err.to_string().starts_with("invalid config: "), "{err}");
    }

    #[test]
    fn policy_section() {
        let c = Config::from_toml_str(
            "[policy]\nmode = \"enforce\"\nperiod_secs = 600\n[policy.defaults]\npercentile = 99.0\n\
             [[policy.functions]]\nname = \"f\"\npin_max_bytes = 67108864\nmargin = 0.3\n",
        )
        .unwrap();
        assert_eq!(c.policy.mode, EnforceMode::Enforce);
        let f = c.policy.for_function("f");
        assert_eq!(f.percentile, Some(99.0));
        assert_eq!(f.margin, Some(0.3));
        assert_eq!(f.pin_max_bytes, Some(64 << 20));
        assert_eq!(c.policy.for_function("other").pin_max_bytes, None);
        assert_invalid("[policy]\nperiod_secs = 5", "policy.period_secs", "5");
        assert_invalid(
            "[policy.defaults]\npercentile = 0.0",
            "policy.defaults.percentile",
            "0",
        );
        assert_invalid(
            "[[policy.functions]]\nname = \"a/b\"",
            "policy.functions[0].name",
            "a/b",
        );
        assert_invalid(
            "[[policy.functions]]\nname = \"f\"\npin_max_bytes = 8192\npin_high_bytes = 16384",
            "policy.functions[0].pin_high_bytes",
            "16384",
        );
        assert!(Config::from_toml_str("[policy]\nmode = \"sometimes\"").is_err());
        assert!(Config::from_toml_str("[[policy.functions]]\nname = \"f\"\nbogus = 1").is_err());
    }
}
