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

/// (local address, owner's uid) of every TCP socket listening on `port`.
fn listeners(port: u16) -> Vec<(IpAddr, u32)> {
    let mut out = Vec::new();
    for (file, v6) in [("/proc/net/tcp", false), ("/proc/net/tcp6", true)] {
        let Ok(text) = std::fs::read_to_string(file) else {
            continue;
        };
        out.extend(
            text.lines()
                .skip(1)
                .filter_map(|l| listener_line(l, v6, port)),
        );
    }
    out
}

/// One line of /proc/net/tcp{,6}: `sl local rem st tx:rx tr:when retrnsmt uid …`, addresses
/// as hex words in the kernel's byte order, `st` 0A for LISTEN.
fn listener_line(line: &str, v6: bool, port: u16) -> Option<(IpAddr, u32)> {
    let fields: Vec<&str> = line.split_whitespace().collect();
    let (local, state, uid) = (fields.get(1)?, fields.get(3)?, fields.get(7)?);
    if *state != "0A" {
        return None;
    }
    let (ip_hex, port_hex) = local.split_once(':')?;
    if u16::from_str_radix(port_hex, 16).ok()? != port {
        return None;
    }
    let word = |i: usize| -> Option<[u8; 4]> {
        let w = u32::from_str_radix(ip_hex.get(i * 8..i * 8 + 8)?, 16).ok()?;
        Some(w.to_ne_bytes())
    };
    let ip = if v6 {
        let mut b = [0u8; 16];
        for i in 0..4 {
            b[i * 4..i * 4 + 4].copy_from_slice(&word(i)?);
        }
        let v6 = Ipv6Addr::from(b);
        v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4)
    } else {
        IpAddr::V4(Ipv4Addr::from(word(0)?))
    };
    Some((ip, uid.parse().ok()?))
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
    fn proc_net_tcp_lines() {
        let v4 = "   0: 0100007F:2616 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 4242 1 0000000000000000 100 0 0 10 0";
        let port = 0x2616;
        let loopback = IpAddr::V4(Ipv4Addr::from(0x0100_007F_u32.to_ne_bytes()));
        assert_eq!(listener_line(v4, false, port), Some((loopback, 0)));
        assert_eq!(listener_line(v4, false, port + 1), None);
        let established = v4.replacen(" 0A ", " 01 ", 1);
        assert_eq!(listener_line(&established, false, port), None);
        let v6 = "   0: 00000000000000000000000000000000:2616 00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 00000000  1000        0 4243 1";
        assert_eq!(
            listener_line(v6, true, port),
            Some((IpAddr::V6(Ipv6Addr::UNSPECIFIED), 1000))
        );
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
    }
}
