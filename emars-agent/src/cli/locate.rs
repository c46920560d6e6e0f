//! Which config is the agent's, for `emars agent` and the client commands alike, and how a
//! client command reaches the agent that config describes: its socket, its TCP port, its
//! token, its pinned kernel side.
//!
//! The config is `--config FILE` (or `EMARS_CONFIG`), else [`DEFAULT_CONFIG_PATH`] where that
//! file exists (where the packaged service keeps it), else the built-in default: the agent and
//! the CLI look in the same places, so a CLI without flags finds the agent that runs without
//! them.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::{Path, PathBuf};

use super::client::Client;
use crate::config::{Config, ConfigError};

/// Where `emars agent` and the CLI look for the config when none is named.
pub const DEFAULT_CONFIG_PATH: &str = "/etc/emars/config.toml";

/// Where a config came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    /// `--config FILE` or `EMARS_CONFIG`.
    Given(PathBuf),
    /// [`DEFAULT_CONFIG_PATH`], which exists.
    DefaultPath(PathBuf),
    /// No file: the built-in default.
    Embedded,
}

impl fmt::Display for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Source::Given(p) => write!(f, "{}", p.display()),
            Source::DefaultPath(p) => write!(f, "{} (the default path)", p.display()),
            Source::Embedded => write!(
                f,
                "the built-in default config, as no --config, EMARS_CONFIG or \
                 {DEFAULT_CONFIG_PATH} names another"
            ),
        }
    }
}

/// A config and where it came from.
#[derive(Debug, Clone)]
pub struct Located {
    pub config: Config,
    pub source: Source,
}

/// The agent's config: `given` (`--config`, `EMARS_CONFIG`), else [`DEFAULT_CONFIG_PATH`]
/// where it exists, else the built-in default.
pub fn find(given: Option<&Path>) -> Result<Located, ConfigError> {
    find_in(given, Path::new(DEFAULT_CONFIG_PATH))
}

fn find_in(given: Option<&Path>, default_path: &Path) -> Result<Located, ConfigError> {
    if let Some(path) = given {
        return Ok(Located {
            config: Config::load(path)?,
            source: Source::Given(path.to_owned()),
        });
    }
    // A file there that cannot be read or is invalid is an error, not a reason to fall back
    // to the built-in default: that would be another agent's socket and pins.
    if std::fs::symlink_metadata(default_path).is_ok() {
        return Ok(Located {
            config: Config::load(default_path)?,
            source: Source::DefaultPath(default_path.to_owned()),
        });
    }
    Ok(Located {
        config: Config::embedded_default(),
        source: Source::Embedded,
    })
}

/// The address a client on this host connects to for an agent listening at `listen`: its
/// loopback address where it listens on all of them; None for port 0 (a port the kernel
/// chose, which the config cannot tell).
pub fn loopback_address(listen: SocketAddr) -> Option<SocketAddr> {
    if listen.port() == 0 {
        return None;
    }
    let ip = match listen.ip() {
        IpAddr::V4(v4) if v4.is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST),
        IpAddr::V6(v6) if v6.is_unspecified() => IpAddr::V6(Ipv6Addr::LOCALHOST),
        ip => ip,
    };
    Some(SocketAddr::new(ip, listen.port()))
}

/// The client for the agent `located` describes.
///
/// Its socket when it has one (as root or `api.socket_group`: no token needed; other users
/// read over its TCP port, without a token). With the socket off (`api.socket = ""`), TCP is
/// the agent's only way in, and writes need the token: its `api.token_file` is sent to its
/// `api.listen`, both named by the agent's own config (as a user names them with `--addr` and
/// `--token-file`). A port is anyone's to take while the agent is down, so the token goes
/// only to a listener owned by the token file's owner ([`listener_owned_by_token_owner`]):
/// never to a squatter.
pub fn client(located: &Located) -> Result<Client, String> {
    let api = &located.config.api;
    let tcp = loopback_address(api.listen);
    if !api.socket.as_os_str().is_empty() {
        let c = Client::local(&api.socket).tried(format!("api.socket of {}", located.source));
        return Ok(match tcp {
            Some(addr) => c.with_read_fallback(&addr.to_string()),
            None => c,
        });
    }
    let Some(addr) = tcp else {
        return Err(format!(
            "the agent's config {} turns its socket off (api.socket = \"\") and listens on port 0 \
             (api.listen = {}), whose number only the agent knows: give --addr HOST:PORT",
            located.source, api.listen
        ));
    };
    let c = Client::new(&addr.to_string()).tried(format!(
        "api.listen of {}, whose socket is off",
        located.source
    ));
    Ok(match listener_owned_by_token_owner(addr, &api.token_file) {
        Ok(()) => c.with_token_file(&api.token_file),
        Err(why) => c.refuse_writes(&format!(
            "writes go with the agent's token, and {why}; is the agent running?"
        )),
    })
}

/// Whether the process listening on `addr` (this host's, per /proc/net/tcp and tcp6) runs as
/// the user owning `token_file`, the agent's own; else why the token is not sent there.
pub fn listener_owned_by_token_owner(addr: SocketAddr, token_file: &Path) -> Result<(), String> {
    use std::os::unix::fs::MetadataExt as _;
    let owner = std::fs::metadata(token_file)
        .map_err(|e| format!("the token file {}: {e}", token_file.display()))?
        .uid();
    let listeners = listeners(addr.port());
    let found = listeners
        .iter()
        .find(|(ip, _)| *ip == addr.ip() || ip.is_unspecified());
    match found {
        Some((_, uid)) if *uid == owner => Ok(()),
        Some((ip, uid)) => Err(format!(
            "{} is held by uid {uid}, not by the agent's user (uid {owner}, the owner of {})",
            SocketAddr::new(*ip, addr.port()),
            token_file.display()
        )),
        None => Err(format!("nothing on this host listens on {addr}")),
    }
}

/// (local address, owner's uid) of every TCP socket listening on `port` (/proc/net/tcp and
/// tcp6, read by procfs); a v4-mapped v6 address as the v4 one.
fn listeners(port: u16) -> Vec<(IpAddr, u32)> {
    [procfs::net::tcp(), procfs::net::tcp6()]
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| e.state == procfs::net::TcpState::Listen && e.local_address.port() == port)
        .map(|e| {
            let ip = match e.local_address.ip() {
                IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4),
                v4 => v4,
            };
            (ip, e.uid)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_named_config_then_the_default_path_then_the_built_in_one() {
        let dir = tempfile::tempdir().unwrap();
        let default_path = dir.path().join("config.toml");
        let given = dir.path().join("mine.toml");
        std::fs::write(&given, "[api]\nsocket = \"/run/mine/api.sock\"\n").unwrap();

        let l = find_in(None, &default_path).unwrap();
        assert_eq!(l.source, Source::Embedded);
        assert_eq!(l.config, Config::embedded_default());

        std::fs::write(&default_path, "[api]\nsocket = \"/run/other/api.sock\"\n").unwrap();
        let l = find_in(None, &default_path).unwrap();
        assert_eq!(l.source, Source::DefaultPath(default_path.clone()));
        assert_eq!(l.config.api.socket, Path::new("/run/other/api.sock"));
        assert!(l.source.to_string().contains("(the default path)"));

        let l = find_in(Some(&given), &default_path).unwrap();
        assert_eq!(l.source, Source::Given(given.clone()));
        assert_eq!(l.config.api.socket, Path::new("/run/mine/api.sock"));

        // A broken file at the default path is an error naming it, not a silent default.
        std::fs::write(&default_path, "[api]\nport = 1\n").unwrap();
        let err = find_in(None, &default_path).unwrap_err().to_string();
        assert!(err.contains(&default_path.display().to_string()), "{err}");
        let err = find_in(Some(&dir.path().join("nope.toml")), &default_path).unwrap_err();
        assert!(err.to_string().contains("nope.toml"), "{err}");
    }

    #[test]
    fn loopback_addresses() {
        let a = |s: &str| loopback_address(s.parse().unwrap()).map(|a| a.to_string());
        assert_eq!(a("0.0.0.0:9750").as_deref(), Some("127.0.0.1:9750"));
        assert_eq!(a("[::]:9750").as_deref(), Some("[::1]:9750"));
        assert_eq!(a("127.0.0.2:80").as_deref(), Some("127.0.0.2:80"));
        assert_eq!(a("127.0.0.1:0"), None);
    }

    #[test]
    fn the_token_goes_only_to_a_listener_of_its_owner() {
        let dir = tempfile::tempdir().unwrap();
        let token = dir.path().join("token");
        std::fs::write(&token, "x").unwrap();
        // This process listens: the token file is this user's too.
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        assert_eq!(listener_owned_by_token_owner(addr, &token), Ok(()));
        // Another owner: refused, naming both.
        let other = 4242 + rustix::process::geteuid().as_raw();
        std::os::unix::fs::chown(&token, Some(other), None).ok();
        let owner = std::fs::metadata(&token).map(|m| std::os::unix::fs::MetadataExt::uid(&m));
        // (Only root may give a file away: as another user, that half is not checked.)
        if owner.ok() == Some(other) {
            let err = listener_owned_by_token_owner(addr, &token).unwrap_err();
            assert!(err.contains(&format!("uid {other}")), "{err}");
        }
        drop(l);
        let err = listener_owned_by_token_owner(addr, &token).unwrap_err();
        assert!(err.contains("nothing on this host listens"), "{err}");
        // A v6 wildcard listener (tcp6) serves a loopback v4 address on its port.
        std::os::unix::fs::chown(&token, Some(rustix::process::geteuid().as_raw()), None).ok();
        if let Ok(l6) = std::net::TcpListener::bind("[::]:0") {
            let port = l6.local_addr().unwrap().port();
            let v4 = SocketAddr::from(([127, 0, 0, 1], port));
            assert_eq!(listener_owned_by_token_owner(v4, &token), Ok(()));
        }
    }
}
