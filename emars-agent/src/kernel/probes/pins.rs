//! The kernel side kept in bpffs: programs, their links and the maps the agent reads stay
//! pinned under `probes.pin_path`, so they go on recording while no agent runs (a crash, a
//! restart, an upgrade), and the next agent adopts them and reads what they queued.
//!
//! One directory per identity (`v<version, dots as underscores>-<hash of the eBPF object and its configuration>`):
//! an agent adopts only a set built from the same object with the same settings for the same
//! kernel, and removes any other it finds, saying so. The base directory is locked (flock) for
//! the agent's life: two agents never read one ring.

use std::{
    fs::File,
    os::{
        fd::AsRawFd,
        unix::fs::{MetadataExt as _, PermissionsExt as _},
    },
    path::{Path, PathBuf},
};

/// Pinned last in a set's directory: the set is whole.
pub const COMPLETE: &str = "complete";

/// statfs magic of bpffs.
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

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
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> PinError + '_ {
    move |source| PinError::Io {
        path: path.to_owned(),
        source,
    }
}

/// The pinned set of this agent's identity, and the lock on the base directory.
#[derive(Debug)]
pub struct PinDir {
    base: PathBuf,
    identity: String,
    /// Held while the agent runs (flock on the base directory).
    _lock: File,
    /// A complete set of this identity was there: adopt it instead of loading.
    pub complete: bool,
    /// Sets of other identities (or an incomplete one of ours) that were removed.
    pub removed: Vec<String>,
}

impl PinDir {
    /// Opens (creating) `base`, locks it, removes sets of other identities, and says whether a
    /// complete set of `identity` is there. `expected`: the file names a complete set holds.
    pub fn open(base: &Path, identity: &str, expected: &[String]) -> Result<PinDir, PinError> {
        ensure_bpffs(base)?;
        std::fs::create_dir_all(base).map_err(io(base))?;
        // /sys/fs/bpf is often world-writable (sticky): a directory someone else made first
        // is not ours to pin into.
        let owner = std::fs::metadata(base).map_err(io(base))?.uid();
        // SAFETY: geteuid has no preconditions.
        if owner != unsafe { libc::geteuid() } {
            return Err(PinError::NotOurs {
                path: base.to_owned(),
                owner,
            });
        }
        // Ours alone: nobody else may open it, so nobody else can hold its lock (and keep
        // the agent from starting) or reach the pinned objects by path.
        std::fs::set_permissions(base, std::fs::Permissions::from_mode(0o700)).map_err(io(base))?;
        let lock = lock(base)?;
        let mut removed = Vec::new();
        let mut complete = false;
        for entry in std::fs::read_dir(base).map_err(io(base))? {
            let entry = entry.map_err(io(base))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            let path = entry.path();
            if name == identity && expected.iter().all(|f| path.join(f).exists()) {
                complete = true;
                continue;
            }
            // Unpinning detaches its programs and frees its maps (no other holder).
            remove(&path)?;
            removed.push(name);
        }
        Ok(PinDir {
            base: base.to_owned(),
            identity: identity.to_owned(),
            _lock: lock,
            complete,
            removed,
        })
    }

    /// Where the set lives once published.
    pub fn dir(&self) -> PathBuf {
        self.base.join(&self.identity)
    }

    /// A fresh directory to pin a new set into. It counts as a set only once
    /// [`PinDir::publish`] has pinned its marker there (bpffs does not rename directories), so
    /// a set is either whole or removed by the next start.
    pub fn staging(&self) -> Result<PathBuf, PinError> {
        let d = self.dir();
        if d.exists() {
            remove(&d)?;
        }
        std::fs::create_dir(&d).map_err(io(&d))?;
        Ok(d)
    }

    /// Marks the set complete: `pin_marker` pins some object of the set under the name given.
    pub fn publish(
        &self,
        pin_marker: impl FnOnce(&Path) -> Result<(), String>,
    ) -> Result<(), String> {
        pin_marker(&self.dir().join(COMPLETE))
    }

    /// Drops a staging directory after a failed pin (its programs detach with it).
    pub fn discard(&self, staging: &Path) {
        if let Err(e) = remove(staging) {
            tracing::warn!("removing {}: {e}", staging.display());
        }
    }
}

/// Removes every pinned set under `base` (programs detach, maps are freed); refused while an
/// agent holds the lock. Returns the names removed.
pub fn unpin_all(base: &Path) -> Result<Vec<String>, PinError> {
    if !base.exists() {
        return Ok(Vec::new());
    }
    let _lock = lock(base)?;
    let mut removed = Vec::new();
    for entry in std::fs::read_dir(base).map_err(io(base))? {
        let entry = entry.map_err(io(base))?;
        remove(&entry.path())?;
        removed.push(entry.file_name().to_string_lossy().into_owned());
    }
    Ok(removed)
}

fn lock(base: &Path) -> Result<File, PinError> {
    let f = File::open(base).map_err(io(base))?;
    // SAFETY: flock on a descriptor we own.
    if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        let e = std::io::Error::last_os_error();
        return Err(if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
            PinError::Busy(base.to_owned())
        } else {
            PinError::Io {
                path: base.to_owned(),
                source: e,
            }
        });
    }
    Ok(f)
}

fn remove(path: &Path) -> Result<(), PinError> {
    let r = if path.is_dir() {
        std::fs::remove_dir_all(path)
    } else {
        std::fs::remove_file(path)
    };
    match r {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(io(path)(e)),
        _ => Ok(()),
    }
}

fn is_bpffs(path: &Path) -> bool {
    let Ok(c) = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()) else {
        return false;
    };
    // SAFETY: statfs into a zeroed struct we own.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    (unsafe { libc::statfs(c.as_ptr(), &mut st) } == 0) && st.f_type as i64 == BPF_FS_MAGIC
}

/// `base` must lie on bpffs: mounts it at /sys/fs/bpf when nothing is mounted there (hosts
/// without systemd, minimal VMs).
fn ensure_bpffs(base: &Path) -> Result<(), PinError> {
    let mount = Path::new("/sys/fs/bpf");
    let mut probe = base.to_path_buf();
    while !probe.exists() {
        if !probe.pop() {
            break;
        }
    }
    if is_bpffs(&probe) {
        return Ok(());
    }
    if base.starts_with(mount) && !is_bpffs(mount) {
        let _ = std::fs::create_dir_all(mount);
        let (src, dst, fs) = (c"bpf", c"/sys/fs/bpf", c"bpf");
        // SAFETY: plain mount(2) with constant strings.
        let rc =
            unsafe { libc::mount(src.as_ptr(), dst.as_ptr(), fs.as_ptr(), 0, std::ptr::null()) };
        if rc == 0 && is_bpffs(mount) {
            tracing::info!("mounted bpffs at /sys/fs/bpf");
            return Ok(());
        }
    }
    Err(PinError::NotBpffs(base.to_owned()))
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
