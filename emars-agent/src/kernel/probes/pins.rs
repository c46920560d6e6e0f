//! The kernel side kept in bpffs: programs, their links and the maps the agent reads stay
//! pinned under `probes.pin_path`, so they go on recording while no agent runs (a crash, a
//! restart, an upgrade), and the next agent adopts them and reads what they queued.
//!
//! One directory per identity (`v<version, dots as underscores>-<hash of the eBPF object and its configuration>`):
//! an agent adopts only a set built from the same object with the same settings for the same
//! kernel, and replaces any other it finds, saying so: the loader first reads what the other
//! set's ring still holds (see `loader`), retiring it ([`PinDir::retire`]: programs detached,
//! ring kept) until those records are saved. The base directory is locked (flock) for the
//! agent's life: two agents never read one ring.

use std::{
    ffi::OsStr,
    os::{
        fd::{AsFd, BorrowedFd, OwnedFd},
        unix::ffi::OsStrExt as _,
    },
    path::{Component, Path, PathBuf},
};

use rustix::{
    fs::{AtFlags, FlockOperation, Mode, OFlags, ResolveFlags},
    io::Errno,
};

/// Pinned last in a set's directory: the set is whole.
pub const COMPLETE: &str = "complete";

/// statfs magic of bpffs.
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

/// Where bpffs is mounted when nothing is (the agent's own mount, root's alone).
pub(crate) const BPF_MOUNT: &str = "/sys/fs/bpf";

/// Deepest directory tree removed below the base (a pinned set is one level).
const MAX_DEPTH: usize = 8;

#[derive(Debug, thiserror::Error)]
pub enum PinError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{0} is not on a BPF filesystem (bpffs) and none could be mounted at /sys/fs/bpf")]
    NotBpffs(PathBuf),
    #[error("{0} is in use by another running agent (its lock is held)")]
    Busy(PathBuf),
    #[error("{path} belongs to uid {owner}, not to the agent: remove it, or set probes.pin_path")]
    NotOurs { path: PathBuf, owner: u32 },
    #[error(
        "{0} is a symlink, or is reached through one: the pin directory and the path to it are \
         never followed through symlinks (another tool's pins could be behind it); remove it, \
         or set probes.pin_path"
    )]
    Symlink(PathBuf),
    #[error("{0}: probes.pin_path must be an absolute path without \"..\"")]
    BadPath(PathBuf),
}

fn io(path: &Path) -> impl FnOnce(Errno) -> PinError + '_ {
    move |e| match e {
        // ELOOP: a symlink where a directory was expected; EXDEV: a ".." escape.
        Errno::LOOP | Errno::XDEV => PinError::Symlink(path.to_owned()),
        e => PinError::Io {
            path: path.to_owned(),
            source: e.into(),
        },
    }
}

/// The pinned set of this agent's identity, and the lock on the base directory.
#[derive(Debug)]
pub struct PinDir {
    /// As configured: for messages only. Every operation goes through `fd`.
    base: PathBuf,
    /// The base directory, opened without following symlinks; flocked while the agent runs.
    fd: OwnedFd,
    identity: String,
    /// A complete set of this identity was there: adopt it instead of loading.
    pub complete: bool,
    /// Sets of other identities (or an incomplete one of ours), left as found: the loader
    /// retires or removes each.
    pub others: Vec<String>,
}

impl PinDir {
    /// Opens (creating) `base`, locks it, lists sets of other identities, and says whether a
    /// complete set of `identity` is there. `expected`: the file names a complete set holds.
    ///
    /// `base` and every directory on the way to it are opened one at a time without following
    /// symlinks, and everything after that goes through the open descriptor: a symlink
    /// planted at `/sys/fs/bpf/emars` (world-writable on many hosts) to another tool's pins
    /// is refused, never chmodded or emptied.
    pub fn open(base: &Path, identity: &str, expected: &[String]) -> Result<PinDir, PinError> {
        ensure_bpffs_mounted(base);
        let fd = open_base(base, true)?.ok_or_else(|| PinError::NotBpffs(base.to_owned()))?;
        // Ours alone: nobody else may open it, so nobody else can hold its lock (and keep
        // the agent from starting) or reach the pinned objects by path.
        rustix::fs::fchmod(&fd, Mode::from_raw_mode(0o700)).map_err(io(base))?;
        lock(&fd, base)?;
        let mut others = Vec::new();
        let mut complete = false;
        for name in entries(&fd, base)? {
            if name.as_bytes() == identity.as_bytes() && holds_all(&fd, &name, expected) {
                complete = true;
                continue;
            }
            match name.to_str() {
                Some(text) => others.push(text.to_owned()),
                // Not a name this agent makes: nothing of it can be read; it goes now.
                None => remove_at(fd.as_fd(), &name, &base.join(&name), 0)?,
            }
        }
        Ok(PinDir {
            base: base.to_owned(),
            fd,
            identity: identity.to_owned(),
            complete,
            others,
        })
    }

    /// Where the set `name` (one of [`PinDir::others`], or this identity's) lives, reached
    /// through the open base directory as [`PinDir::dir`] is.
    pub fn dir_of(&self, name: &str) -> PathBuf {
        use std::os::fd::AsRawFd as _;
        PathBuf::from(format!("/proc/self/fd/{}", self.fd.as_raw_fd())).join(name)
    }

    /// The names pinned in the set `name` (none when it is not a directory).
    pub fn files_of(&self, name: &str) -> Vec<String> {
        let Ok(set) = open_child(self.fd.as_fd(), OsStr::new(name), OFlags::RDONLY) else {
            return Vec::new();
        };
        entries(&set, &self.base.join(name))
            .unwrap_or_default()
            .into_iter()
            .filter_map(|n| n.into_string().ok())
            .collect()
    }

    /// Retires the set `name`: unpins everything in it but what `keep` names (its ring), which
    /// detaches its programs and frees the rest. Without its marker it is never adopted, and
    /// the next start finds it among the others again should this agent die before
    /// [`PinDir::remove`].
    pub fn retire(&self, name: &str, keep: impl Fn(&str) -> bool) -> Result<(), PinError> {
        let shown = self.base.join(name);
        let set =
            open_child(self.fd.as_fd(), OsStr::new(name), OFlags::RDONLY).map_err(io(&shown))?;
        // The marker first: a set half retired is never taken for a whole one.
        let mut names = entries(&set, &shown)?;
        names.sort_by_key(|n| n.as_bytes() != COMPLETE.as_bytes());
        for file in names {
            if !file.to_str().is_some_and(&keep) {
                remove_at(set.as_fd(), &file, &shown.join(&file), 1)?;
            }
        }
        Ok(())
    }

    /// Removes the set `name`: its programs detach and its maps are freed once no agent holds
    /// them open.
    pub fn remove(&self, name: &str) -> Result<(), PinError> {
        remove_at(self.fd.as_fd(), OsStr::new(name), &self.base.join(name), 0)
    }

    /// The base directory as configured: for messages.
    pub fn base(&self) -> &Path {
        &self.base
    }

    /// Where the set lives once published, for pinning and opening its objects: reached
    /// through the open base directory (`/proc/self/fd/N/<identity>`), never through the
    /// configured path, which could be swapped after the checks.
    pub fn dir(&self) -> PathBuf {
        self.dir_of(&self.identity)
    }

    /// The set's directory as configured: what messages and GET /v1/info show.
    pub fn shown(&self) -> PathBuf {
        self.base.join(&self.identity)
    }

    /// A fresh directory to pin a new set into. It counts as a set only once
    /// [`PinDir::publish`] has pinned its marker there (bpffs does not rename directories), so
    /// a set is either whole or removed by the next start.
    pub fn staging(&self) -> Result<PathBuf, PinError> {
        let shown = self.shown();
        remove_at(self.fd.as_fd(), OsStr::new(&self.identity), &shown, 0)?;
        rustix::fs::mkdirat(&self.fd, self.identity.as_str(), Mode::from_raw_mode(0o700))
            .map_err(io(&shown))?;
        Ok(self.dir())
    }

    /// Marks the set complete: `pin_marker` pins some object of the set under the name given.
    pub fn publish(
        &self,
        pin_marker: impl FnOnce(&Path) -> Result<(), String>,
    ) -> Result<(), String> {
        pin_marker(&self.dir().join(COMPLETE))
    }

    /// Drops a staging directory after a failed pin (its programs detach with it).
    pub fn discard(&self) {
        let shown = self.shown();
        if let Err(e) = remove_at(self.fd.as_fd(), OsStr::new(&self.identity), &shown, 0) {
            tracing::warn!("removing {}: {e}", shown.display());
        }
    }
}

/// Removes every pinned set under `base` (programs detach, maps are freed); refused while an
/// agent holds the lock, and under the same rules as the agent's own open: no symlink on the
/// way, on bpffs, the agent's user's directory. Returns the names removed.
pub fn unpin_all(base: &Path) -> Result<Vec<String>, PinError> {
    let Some(fd) = open_base(base, false)? else {
        return Ok(Vec::new());
    };
    lock(&fd, base)?;
    let mut removed = Vec::new();
    for name in entries(&fd, base)? {
        remove_at(fd.as_fd(), &name, &base.join(&name), 0)?;
        removed.push(name.to_string_lossy().into_owned());
    }
    // The emptied directory too (the agent made it); reached the same checked way, and left
    // where anything is in it (another agent's pins written meanwhile).
    if let (Some(parent), Some(name)) = (base.parent(), base.file_name()) {
        if let Ok(Some(pfd)) = open_base(parent, false) {
            if let Err(e) = rustix::fs::unlinkat(&pfd, name, rustix::fs::AtFlags::REMOVEDIR) {
                tracing::debug!("removing {}: {e}", base.display());
            }
        }
    }
    Ok(removed)
}

/// Opens `base` one component at a time from `/`, never through a symlink (ELOOP is
/// [`PinError::Symlink`]), creating what is missing when `create` (only on bpffs); then checks
/// that it is on bpffs and belongs to the agent's user. None: it does not exist (`create`
/// false).
fn open_base(base: &Path, create: bool) -> Result<Option<OwnedFd>, PinError> {
    if !base.is_absolute() {
        return Err(PinError::BadPath(base.to_owned()));
    }
    let root = Path::new("/");
    let mut fd = rustix::fs::open(
        root,
        OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map_err(io(root))?;
    let mut at = PathBuf::from("/");
    let names: Vec<&OsStr> = base
        .components()
        .filter_map(|c| match c {
            Component::Normal(n) => Some(Ok(n)),
            Component::RootDir | Component::CurDir => None,
            Component::ParentDir | Component::Prefix(_) => Some(Err(())),
        })
        .collect::<Result<_, ()>>()
        .map_err(|()| PinError::BadPath(base.to_owned()))?;
    for (i, name) in names.iter().enumerate() {
        at.push(name);
        // The base is read (listed, locked, chmodded); the directories on the way only walked.
        let flags = if i + 1 == names.len() {
            OFlags::RDONLY
        } else {
            OFlags::PATH
        };
        fd = match open_child(fd.as_fd(), name, flags) {
            Ok(child) => child,
            Err(Errno::NOENT) if create => {
                if !on_bpffs(&fd) {
                    return Err(PinError::NotBpffs(base.to_owned()));
                }
                // The base is made 0700 below; directories on the way as `mkdir -p` would.
                match rustix::fs::mkdirat(&fd, *name, Mode::from_raw_mode(0o755)) {
                    Ok(()) | Err(Errno::EXIST) => {}
                    Err(e) => return Err(io(&at)(e)),
                }
                open_child(fd.as_fd(), name, flags).map_err(io(&at))?
            }
            Err(Errno::NOENT) => return Ok(None),
            Err(e) => return Err(io(&at)(e)),
        };
    }
    if !on_bpffs(&fd) {
        return Err(PinError::NotBpffs(base.to_owned()));
    }
    // /sys/fs/bpf is often world-writable (sticky): a directory someone else made first is
    // not ours to pin into.
    let owner = rustix::fs::fstat(&fd).map_err(io(base))?.st_uid;
    if owner != rustix::process::geteuid().as_raw() {
        return Err(PinError::NotOurs {
            path: base.to_owned(),
            owner,
        });
    }
    Ok(Some(fd))
}

/// One directory below `dir`, not through a symlink (not even the last component) and not
/// outside it.
/// RESOLVE_NO_SYMLINKS covers the last component too (ELOOP); O_NOFOLLOW is left out because
/// with O_DIRECTORY it turns a symlink into ENOTDIR.
fn open_child(dir: BorrowedFd<'_>, name: &OsStr, flags: OFlags) -> Result<OwnedFd, Errno> {
    rustix::fs::openat2(
        dir,
        name,
        flags | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
        ResolveFlags::BENEATH | ResolveFlags::NO_SYMLINKS | ResolveFlags::NO_MAGICLINKS,
    )
}

fn on_bpffs(fd: &OwnedFd) -> bool {
    rustix::fs::fstatfs(fd).is_ok_and(|st| is_bpffs(&st))
}

/// Whether a statfs answer is a BPF filesystem's.
// f_type's integer type differs between architectures.
#[allow(clippy::unnecessary_cast)]
pub(crate) fn is_bpffs(st: &rustix::fs::StatFs) -> bool {
    st.f_type as i64 == BPF_FS_MAGIC
}

fn lock(fd: &OwnedFd, base: &Path) -> Result<(), PinError> {
    rustix::fs::flock(fd, FlockOperation::NonBlockingLockExclusive).map_err(|e| match e {
        Errno::WOULDBLOCK => PinError::Busy(base.to_owned()),
        e => io(base)(e),
    })
}

/// The names in a directory (without `.` and `..`).
fn entries(fd: &OwnedFd, path: &Path) -> Result<Vec<std::ffi::OsString>, PinError> {
    let mut out = Vec::new();
    for entry in rustix::fs::Dir::read_from(fd).map_err(io(path))? {
        let entry = entry.map_err(io(path))?;
        let name = entry.file_name().to_bytes();
        if name != b"." && name != b".." {
            out.push(OsStr::from_bytes(name).to_owned());
        }
    }
    Ok(out)
}

/// Whether the set `name` under `base` holds every file of `expected` (looked up without
/// following symlinks).
fn holds_all(base: &OwnedFd, name: &OsStr, expected: &[String]) -> bool {
    let Ok(set) = open_child(base.as_fd(), name, OFlags::PATH) else {
        return false;
    };
    expected
        .iter()
        .all(|f| rustix::fs::statat(&set, f.as_str(), AtFlags::SYMLINK_NOFOLLOW).is_ok())
}

/// Removes `name` from the directory `dir`, with everything below it when it is a directory,
/// relative to the open descriptors all the way (a symlink is removed, never followed). A
/// name already gone is no error. `shown`: its path, for errors.
fn remove_at(
    dir: BorrowedFd<'_>,
    name: &OsStr,
    shown: &Path,
    depth: usize,
) -> Result<(), PinError> {
    match rustix::fs::unlinkat(dir, name, AtFlags::empty()) {
        Ok(()) | Err(Errno::NOENT) => return Ok(()),
        // Linux answers EISDIR for a directory.
        Err(Errno::ISDIR) if depth < MAX_DEPTH => {}
        Err(e) => return Err(io(shown)(e)),
    }
    let sub = match open_child(dir, name, OFlags::RDONLY) {
        Ok(fd) => fd,
        Err(Errno::NOENT) => return Ok(()),
        Err(e) => return Err(io(shown)(e)),
    };
    for entry in entries(&sub, shown)? {
        remove_at(sub.as_fd(), &entry, &shown.join(&entry), depth + 1)?;
    }
    match rustix::fs::unlinkat(dir, name, AtFlags::REMOVEDIR) {
        Ok(()) | Err(Errno::NOENT) => Ok(()),
        Err(e) => Err(io(shown)(e)),
    }
}

/// `base` below /sys/fs/bpf, where nothing is mounted (hosts without systemd, minimal VMs):
/// mounts bpffs there, mode 0700 (bpffs's own default is world-writable and sticky), so the
/// agent's own mount is root's alone. Nothing to do elsewhere; [`open_base`] then checks
/// that `base` lies on bpffs.
fn ensure_bpffs_mounted(base: &Path) {
    let mount = Path::new(BPF_MOUNT);
    if !base.starts_with(mount) {
        return;
    }
    let opened = rustix::fs::open(
        mount,
        OFlags::PATH | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
    );
    if opened.as_ref().is_ok_and(on_bpffs) {
        return;
    }
    if opened.is_err() {
        let _ = std::fs::create_dir(mount);
    }
    let (src, dst, fs, data) = (c"bpf", c"/sys/fs/bpf", c"bpf", c"mode=0700");
    // SAFETY: plain mount(2) with constant NUL-terminated strings.
    let rc = unsafe {
        libc::mount(
            src.as_ptr(),
            dst.as_ptr(),
            fs.as_ptr(),
            0,
            data.as_ptr().cast(),
        )
    };
    if rc == 0 {
        tracing::info!("mounted bpffs at /sys/fs/bpf (mode 0700)");
    } else {
        tracing::warn!(
            "mounting bpffs at /sys/fs/bpf: {}",
            std::io::Error::last_os_error()
        );
    }
}

/// FNV-1a: a stable hash (std's may change between Rust versions) naming a pinned set.
pub fn fnv1a(parts: &[&[u8]]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for p in parts {
        for b in p.iter().chain(&[0xff]) {
            h ^= u64::from(*b);
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
    h
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hash_is_stable_and_separates_parts() {
        assert_eq!(fnv1a(&[b"emars"]), fnv1a(&[b"emars"]));
        assert_ne!(fnv1a(&[b"ab", b"c"]), fnv1a(&[b"a", b"bc"]));
        // Pinned down: a new agent must find the set an older build of the same code named.
        assert_eq!(fnv1a(&[b""]), 0xaf64_724c_8602_eb6e);
    }
}
