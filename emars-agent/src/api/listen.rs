//! Where the API listens, settled first thing at start-up, before anything slow: sockets
//! handed over by a service manager (socket activation: `LISTEN_FDS`, e.g. `emars.socket`), or
//! bound here. Either way the port is held from the agent's first moment, and with activation
//! across restarts too, so no other local user can take it meanwhile.
//!
//! Two kinds of listener:
//! - TCP (`api.listen`): for platforms and browsers; writes need the token.
//! - the local socket (`api.socket`, unix domain): for the CLI; every peer is checked by its
//!   kernel credentials ([`PeerRule`]), in a directory of the agent's own that nobody else can
//!   write, so a write never travels to a listener nobody verified.

use std::{
    net::SocketAddr,
    os::{
        fd::AsFd,
        unix::fs::{DirBuilderExt, FileTypeExt, MetadataExt, PermissionsExt},
    },
    path::{Path, PathBuf},
};

use crate::config::ApiConfig;

#[derive(Debug, thiserror::Error)]
pub enum ListenError {
    #[error("binding the API to {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("the API socket {path}: {source}")]
    Socket {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the API socket's directory {path} {why}: remove it or set api.socket elsewhere")]
    UnsafeDir { path: PathBuf, why: String },
    #[error("{path} exists and is not a socket: remove it or set api.socket elsewhere")]
    NotASocket { path: PathBuf },
    #[error("api.socket_group {0:?} is not a group on this host")]
    NoSuchGroup(String),
    #[error("looking up api.socket_group {group:?}: {source}")]
    GroupLookup { group: String, source: nix::Error },
    #[error("socket {index} handed over by the service manager (LISTEN_FDS): {source}")]
    Inherited {
        index: usize,
        source: std::io::Error,
    },
    #[error(
        "the service manager handed over a TCP socket on {0}, which is not loopback: set \
         api.allow_remote = true to serve on it, or make the socket unit listen on 127.0.0.1"
    )]
    InheritedRemote(SocketAddr),
}

/// Who may use the local socket besides root (and the agent's own user).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PeerRule {
    /// `api.socket_group`, resolved.
    pub group: Option<u32>,
}

impl PeerRule {
    /// Whether a peer with these kernel credentials may use the socket. Supplementary groups
    /// are read from /proc (the peer connected a moment ago and holds the connection open).
    pub fn allows(&self, uid: u32, gid: u32, pid: Option<i32>) -> bool {
        // SAFETY: geteuid has no preconditions.
        if uid == 0 || uid == unsafe { libc::geteuid() } {
            return true;
        }
        let Some(group) = self.group else {
            return false;
        };
        gid == group || pid.is_some_and(|p| supplementary_groups(p).contains(&group))
    }
}

/// The `Groups:` line of /proc/PID/status.
fn supplementary_groups(pid: i32) -> Vec<u32> {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines().find_map(|l| l.strip_prefix("Groups:")).map(|g| {
                g.split_whitespace()
                    .filter_map(|n| n.parse().ok())
                    .collect()
            })
        })
        .unwrap_or_default()
}

/// The API's listeners, bound or inherited, not yet serving.
#[derive(Debug, Default)]
pub struct Listeners {
    pub tcp: Option<std::net::TcpListener>,
    /// The local socket, the path it is at (when known) and who may use it.
    pub local: Option<(std::os::unix::net::UnixListener, Option<PathBuf>, PeerRule)>,
    /// Handed over by a service manager.
    pub inherited: bool,
}

/// Sockets handed over by a service manager, taken from the environment (and the variables
/// removed, so that no child process inherits them). Must run before any other thread starts:
/// it changes the environment. Empty without socket activation.
#[derive(Debug, Default)]
pub struct Inherited {
    tcp: Option<std::net::TcpListener>,
    unix: Option<std::os::unix::net::UnixListener>,
    /// What was handed over that the API does not serve (said at start-up).
    pub ignored: Vec<String>,
    error: Option<ListenError>,
}

impl Inherited {
    pub fn take_from_env() -> Inherited {
        let mut fds = listenfd::ListenFd::from_env();
        let mut got = Inherited::default();
        for index in 0..fds.len() {
            if let Err(e) = got.take_one(&mut fds, index) {
                got.error.get_or_insert(e);
            }
        }
        for var in ["LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES"] {
            // Before any other thread runs (the caller's contract), so nothing reads it meanwhile.
            std::env::remove_var(var);
        }
        got
    }

    fn take_one(&mut self, fds: &mut listenfd::ListenFd, index: usize) -> Result<(), ListenError> {
        let err = |source| ListenError::Inherited { index, source };
        // A TCP socket first: take_tcp_listener refuses other families without taking them.
        if self.tcp.is_none() {
            if let Ok(Some(l)) = fds.take_tcp_listener(index) {
                set_cloexec(&l).map_err(err)?;
                self.tcp = Some(l);
                return Ok(());
            }
        }
        if self.unix.is_none() {
            if let Ok(Some(l)) = fds.take_unix_listener(index) {
                set_cloexec(&l).map_err(err)?;
                self.unix = Some(l);
                return Ok(());
            }
        }
        self.ignored.push(format!(
            "descriptor {} (LISTEN_FDS index {index})",
            3 + index
        ));
        Ok(())
    }

    pub fn is_empty(&self) -> bool {
        self.tcp.is_none() && self.unix.is_none() && self.error.is_none()
    }
}

/// systemd passes its sockets without FD_CLOEXEC; the agent's own children must not get them.
fn set_cloexec(fd: &impl AsFd) -> std::io::Result<()> {
    let flags = rustix::io::fcntl_getfd(fd)?;
    rustix::io::fcntl_setfd(fd, flags | rustix::io::FdFlags::CLOEXEC)?;
    Ok(())
}

/// The listeners the API serves on: what a service manager handed over (its unit says
/// where), and for what it did not hand over, bound here from `config`.
pub fn open(config: &ApiConfig, inherited: Inherited) -> Result<Listeners, ListenError> {
    let rule = PeerRule {
        group: resolve_group(&config.socket_group)?,
    };
    if let Some(e) = inherited.error {
        return Err(e);
    }
    let was_inherited = inherited.tcp.is_some() || inherited.unix.is_some();
    let tcp = match inherited.tcp {
        Some(l) => {
            let addr = l
                .local_addr()
                .map_err(|source| ListenError::Inherited { index: 0, source })?;
            if !addr.ip().is_loopback() && !config.allow_remote {
                return Err(ListenError::InheritedRemote(addr));
            }
            l
        }
        None => bind_tcp(config.listen)?,
    };
    let local = match inherited.unix {
        Some(l) => {
            let path = l
                .local_addr()
                .ok()
                .and_then(|a| a.as_pathname().map(Path::to_owned));
            Some((l, path, rule))
        }
        None if config.socket.as_os_str().is_empty() => None,
        None => Some((
            bind_local(&config.socket, rule)?,
            Some(config.socket.clone()),
            rule,
        )),
    };
    Ok(Listeners {
        tcp: Some(tcp),
        local,
        inherited: was_inherited,
    })
}

fn bind_tcp(addr: SocketAddr) -> Result<std::net::TcpListener, ListenError> {
    let err = |source| ListenError::Bind { addr, source };
    let l = std::net::TcpListener::bind(addr).map_err(err)?;
    l.set_nonblocking(true).map_err(err)?;
    deepen_backlog(&l).map_err(err)?;
    Ok(l)
}

/// Connections that may wait for the agent to accept them (the kernel caps it at
/// net.core.somaxconn). std's 128 is soon full when many clients connect at once, and a full
/// backlog drops new SYNs, which their clients retry only after a second or more.
const BACKLOG: i32 = 4096;

/// Listening again on a listening socket sets its backlog.
fn deepen_backlog(l: &impl std::os::fd::AsRawFd) -> std::io::Result<()> {
    // SAFETY: a listening socket's descriptor, owned by the caller for the call.
    if unsafe { libc::listen(l.as_raw_fd(), BACKLOG) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

fn resolve_group(name: &str) -> Result<Option<u32>, ListenError> {
    if name.is_empty() {
        return Ok(None);
    }
    match nix::unistd::Group::from_name(name) {
        Ok(Some(g)) => Ok(Some(g.gid.as_raw())),
        Ok(None) => Err(ListenError::NoSuchGroup(name.to_owned())),
        Err(source) => Err(ListenError::GroupLookup {
            group: name.to_owned(),
            source,
        }),
    }
}

/// Binds the local socket at `path`: in a directory of the agent's own (made 0700, or 0750
/// for a socket group; an existing one must be a real directory of the agent's user that no
/// one else can write), a stale socket from an earlier run replaced, the socket 0600 (0660
/// with the group).
fn bind_local(
    path: &Path,
    rule: PeerRule,
) -> Result<std::os::unix::net::UnixListener, ListenError> {
    let sock_err = |source| ListenError::Socket {
        path: path.to_owned(),
        source,
    };
    let dir = path.parent().ok_or_else(|| ListenError::UnsafeDir {
        path: path.to_owned(),
        why: "is missing".into(),
    })?;
    private_dir(dir, rule)?;
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_socket() => std::fs::remove_file(path).map_err(sock_err)?,
        Ok(_) => {
            return Err(ListenError::NotASocket {
                path: path.to_owned(),
            })
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(sock_err(e)),
    }
    let listener = std::os::unix::net::UnixListener::bind(path).map_err(sock_err)?;
    listener.set_nonblocking(true).map_err(sock_err)?;
    deepen_backlog(&listener).map_err(sock_err)?;
    // The directory keeps everyone else out already; the socket's own mode says the same.
    let mode = if rule.group.is_some() { 0o660 } else { 0o600 };
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).map_err(sock_err)?;
    if let Some(gid) = rule.group {
        std::os::unix::fs::lchown(path, None, Some(gid)).map_err(sock_err)?;
    }
    Ok(listener)
}

/// Makes (or checks) the socket's directory: the agent's user's, a real directory, writable
/// by no one else, and searchable by the socket group when there is one.
fn private_dir(dir: &Path, rule: PeerRule) -> Result<(), ListenError> {
    let unsafe_dir = |why: String| ListenError::UnsafeDir {
        path: dir.to_owned(),
        why,
    };
    let io = |source| ListenError::Socket {
        path: dir.to_owned(),
        source,
    };
    let mode = if rule.group.is_some() { 0o750 } else { 0o700 };
    // Its parents are ordinary directories (/run on hosts that have none yet).
    if let Some(parent) = dir.parent().filter(|p| !p.exists()) {
        std::fs::create_dir_all(parent).map_err(io)?;
    }
    match std::fs::DirBuilder::new().mode(mode).create(dir) {
        Ok(()) => {
            // The umask may have taken bits: set them exactly.
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(mode)).map_err(io)?;
            if let Some(gid) = rule.group {
                std::os::unix::fs::lchown(dir, None, Some(gid)).map_err(io)?;
            }
            tracing::info!(
                "created the API socket's directory {} (mode {mode:o})",
                dir.display()
            );
        }
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(io(e)),
    }
    let meta = std::fs::symlink_metadata(dir).map_err(io)?;
    if !meta.file_type().is_dir() {
        return Err(unsafe_dir("is not a directory (a symlink or other)".into()));
    }
    // SAFETY: geteuid has no preconditions.
    let me = unsafe { libc::geteuid() };
    if meta.uid() != me {
        return Err(unsafe_dir(format!(
            "belongs to uid {}, not to the agent (uid {me})",
            meta.uid()
        )));
    }
    if meta.mode() & 0o022 != 0 {
        return Err(unsafe_dir(format!(
            "is writable by others (mode {:o}): anyone could put a socket of their own there",
            meta.mode() & 0o7777
        )));
    }
    if rule.group.is_some() && meta.mode() & 0o010 == 0 && meta.gid() != me {
        tracing::warn!(
            "api.socket_group is set but {} is not searchable by its group (mode {:o}): only \
             root can reach the socket",
            dir.display(),
            meta.mode() & 0o7777
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(dir: &Path) -> ApiConfig {
        ApiConfig {
            listen: "127.0.0.1:0".parse().unwrap(),
            socket: dir.join("run/api.sock"),
            ..ApiConfig::default()
        }
    }

    #[test]
    fn binds_tcp_and_a_private_socket() {
        let tmp = tempfile::tempdir().unwrap();
        let cfg = config(tmp.path());
        let l = open(&cfg, Inherited::default()).unwrap();
        assert!(l.tcp.is_some() && !l.inherited);
        let (_, path, rule) = l.local.as_ref().unwrap();
        assert_eq!(path.as_deref(), Some(cfg.socket.as_path()));
        assert_eq!(*rule, PeerRule::default());
        let dir = std::fs::metadata(tmp.path().join("run")).unwrap();
        assert_eq!(dir.mode() & 0o7777, 0o700);
        let sock = std::fs::symlink_metadata(&cfg.socket).unwrap();
        assert!(sock.file_type().is_socket());
        assert_eq!(sock.mode() & 0o777, 0o600);
        // A stale socket of an earlier run is replaced.
        drop(l);
        let again = open(&cfg, Inherited::default()).unwrap();
        assert!(again.local.is_some());
    }

    #[test]
    fn refuses_a_shared_directory_and_a_planted_file() {
        let tmp = tempfile::tempdir().unwrap();
        let cfg = config(tmp.path());
        let run = tmp.path().join("run");
        std::fs::create_dir(&run).unwrap();
        std::fs::set_permissions(&run, std::fs::Permissions::from_mode(0o777)).unwrap();
        let e = open(&cfg, Inherited::default()).unwrap_err();
        assert!(matches!(e, ListenError::UnsafeDir { .. }), "{e}");
        assert!(e.to_string().contains("writable by others"), "{e}");

        std::fs::set_permissions(&run, std::fs::Permissions::from_mode(0o700)).unwrap();
        std::fs::write(&cfg.socket, b"planted").unwrap();
        let e = open(&cfg, Inherited::default()).unwrap_err();
        assert!(matches!(e, ListenError::NotASocket { .. }), "{e}");
        assert_eq!(std::fs::read(&cfg.socket).unwrap(), b"planted");

        // A symlinked directory is not the agent's directory.
        let other = tmp.path().join("elsewhere");
        std::fs::create_dir(&other).unwrap();
        let linked = tmp.path().join("linked");
        std::os::unix::fs::symlink(&other, &linked).unwrap();
        let cfg = ApiConfig {
            socket: linked.join("api.sock"),
            ..config(tmp.path())
        };
        let e = open(&cfg, Inherited::default()).unwrap_err();
        assert!(e.to_string().contains("not a directory"), "{e}");
        assert!(!other.join("api.sock").exists());
    }

    #[test]
    fn peer_rule() {
        let root_only = PeerRule::default();
        assert!(root_only.allows(0, 0, None));
        assert!(!root_only.allows(65534, 65534, None));
        let group = PeerRule { group: Some(4242) };
        assert!(group.allows(1000, 4242, None));
        assert!(!group.allows(1000, 1000, None));
        // Our own process: its supplementary groups come from /proc.
        let mine = supplementary_groups(std::process::id() as i32);
        if let Some(g) = mine.iter().find(|g| **g != 0) {
            let rule = PeerRule { group: Some(*g) };
            assert!(rule.allows(1000, 1000, Some(std::process::id() as i32)));
        }
    }

    #[test]
    fn unknown_group_is_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let cfg = ApiConfig {
            socket_group: "emars-no-such-group".into(),
            ..config(tmp.path())
        };
        let e = open(&cfg, Inherited::default()).unwrap_err();
        assert!(matches!(e, ListenError::NoSuchGroup(_)), "{e}");
    }
}
