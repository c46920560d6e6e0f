//! A store that cannot be opened because its database is corrupt is moved aside, kept as it
//! was, and the agent starts on a fresh one instead of failing at every start (a restart
//! loop that records nothing). Every other failure (locked by a running agent, permission
//! denied, disk full, a schema too new) stays fatal: a fresh store would hide it.
//!
//! What sled 0.34 does with a damaged log, measured: a log whose segment headers are all
//! unreadable opens as an empty database and is overwritten at once; a damaged first segment
//! with readable later ones panics ("tried to serialize Uninitialized") after extending the
//! file; a damaged record makes it report corruption, after it may have zeroed the log from
//! there; damage in the last records reads to it as a write cut short by a crash, which it
//! drops, and it opens (which this cannot tell). So corruption is: [`sled_log_unreadable`]
//! before sled opens anything (the copy is then byte for byte what was there), a panic while
//! opening, sled's `Corruption` error, the store's schema version that does not decode, or
//! a log that kept none of the store's records ([`StoreError::LogLost`]). Where sled
//! opened the log before failing, the copy holds it as sled left it, cut back to its length,
//! and every other file as it was.

use std::{
    fs,
    io::Read as _,
    path::{Path, PathBuf},
};

use rustix::fs::{FlockOperation, RenameFlags, CWD};

use super::{Store, StoreError};
use crate::model::StoreMovedAside;

/// Moved-aside copies kept beside the store; older ones are removed.
pub const KEEP_MOVED_ASIDE: usize = 3;

/// In a store started fresh after a move-aside: where the old one went, and why.
const MARKER: &str = "moved-aside.json";

/// sled's default segment size, which the store keeps.
const SEGMENT_BYTES: u64 = 512 * 1024;
/// sled's segment header: crc32 (xored with !0) of the next 16 bytes, then two LSNs.
const SEGMENT_HEADER: usize = 20;

impl Store {
    /// [`Store::open`], except that a store whose database is corrupt is renamed to
    /// `<path>.corrupt-<unix seconds>` (kept whole, at most [`KEEP_MOVED_ASIDE`] copies) and a
    /// fresh one opened in its place; the second value says so.
    pub fn open_or_move_aside(path: &Path) -> Result<(Store, Option<StoreMovedAside>), StoreError> {
        if !path.join("db").exists() {
            return Ok((Store::open(path)?, None));
        }
        let reason = match sled_log_unreadable(path) {
            Some(reason) => reason,
            None => {
                let files = Files::of(path);
                match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| Store::open(path))) {
                    Ok(Ok(store)) => return Ok((store, None)),
                    Ok(Err(e)) if is_corruption(&e) => {
                        files.restore(path);
                        reason(&e)
                    }
                    Ok(Err(e)) => return Err(e),
                    Err(panic) => {
                        files.restore(path);
                        format!("sled panicked while opening it ({})", panic_text(&panic))
                    }
                }
            }
        };
        let moved = move_aside(path, &reason)?;
        let store = Store::open(path)?;
        if let Ok(text) = serde_json::to_vec_pretty(&moved) {
            if let Err(e) = crate::files::replace(&path.join(MARKER), &text, 0o600) {
                tracing::warn!("noting the move-aside in {}: {e}", path.display());
            }
        }
        Ok((store, Some(moved)))
    }
}

/// Whether a failed open says the database is damaged (not: locked, not allowed, full).
fn is_corruption(e: &StoreError) -> bool {
    match e {
        StoreError::Open { source, .. } | StoreError::Db(source) => {
            matches!(source, sled::Error::Corruption { .. })
        }
        // The one value of the store's own that an open cannot do without. (Others are
        // quarantined at open; a failure to decode what was encoded in memory is a bug.)
        StoreError::Corrupt { tree, key, .. } => {
            *tree == super::TREE_META && key == super::KEY_SCHEMA_VERSION
        }
        StoreError::LogLost { .. } => true,
        _ => false,
    }
}

/// Why a corrupt store could not be opened, in words (sled's own rendering of its
/// corruption error carries an empty backtrace).
fn reason(e: &StoreError) -> String {
    match e {
        StoreError::Open {
            source: sled::Error::Corruption { at, .. },
            ..
        }
        | StoreError::Db(sled::Error::Corruption { at, .. }) => match at {
            Some(at) => format!("sled reports corrupted data in its log at {at:?}"),
            None => "sled reports corrupted data in its log".to_owned(),
        },
        e => e.to_string(),
    }
}

/// A non-empty log in which no segment header checks out: sled would take it for a new
/// database and overwrite it. Checked before sled opens it, so the bytes are kept.
fn sled_log_unreadable(path: &Path) -> Option<String> {
    let db = path.join("db");
    let mut file = fs::File::open(&db).ok()?;
    let len = file.metadata().ok()?.len();
    if len == 0 {
        return None;
    }
    let mut data = Vec::new();
    let mut segments = 0u64;
    for at in (0..len).step_by(SEGMENT_BYTES as usize) {
        let mut header = [0u8; SEGMENT_HEADER];
        std::io::Seek::seek(&mut file, std::io::SeekFrom::Start(at)).ok()?;
        data.clear();
        (&mut file)
            .take(SEGMENT_HEADER as u64)
            .read_to_end(&mut data)
            .ok()?;
        if data.len() < SEGMENT_HEADER {
            break;
        }
        header.copy_from_slice(&data);
        segments += 1;
        let stored = u32::from_le_bytes([header[0], header[1], header[2], header[3]]) ^ !0;
        if crc32fast::hash(&header[4..]) == stored {
            return None;
        }
    }
    Some(format!(
        "none of the {segments} segment headers of sled's log {} ({len} bytes) is readable: \
         sled would take it for an empty database and overwrite it",
        db.display()
    ))
}

/// The store's files as they were before an open that failed: sled may extend the log or
/// write a snapshot before it gives up, which [`Files::restore`] takes back.
struct Files(Vec<(PathBuf, u64)>);

impl Files {
    fn of(path: &Path) -> Files {
        let mut out = Vec::new();
        for dir in [path.to_path_buf(), path.join("blobs")] {
            for entry in fs::read_dir(&dir).into_iter().flatten().flatten() {
                if let Ok(m) = entry.metadata() {
                    if m.is_file() {
                        out.push((entry.path(), m.len()));
                    }
                }
            }
        }
        Files(out)
    }

    fn restore(&self, path: &Path) {
        let now = Files::of(path);
        for (file, len) in now.0 {
            let before = self.0.iter().find(|(f, _)| *f == file).map(|(_, l)| *l);
            let r = match before {
                Some(was) if len > was => fs::OpenOptions::new()
                    .write(true)
                    .open(&file)
                    .and_then(|f| f.set_len(was)),
                Some(_) => Ok(()),
                None => fs::remove_file(&file),
            };
            if let Err(e) = r {
                tracing::warn!(
                    "undoing the failed open's change to {}: {e}",
                    file.display()
                );
            }
        }
    }
}

fn panic_text(panic: &Box<dyn std::any::Any + Send>) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "no message".into())
}

/// Renames the store to `<path>.corrupt-<unix seconds>` (never over anything), unless an
/// agent holds it; removes the oldest copies beyond [`KEEP_MOVED_ASIDE`].
fn move_aside(path: &Path, reason: &str) -> Result<StoreMovedAside, StoreError> {
    let io = |source: std::io::Error| StoreError::MoveAside {
        path: path.to_path_buf(),
        reason: reason.to_owned(),
        source,
    };
    // sled's own lock: a store an agent holds is never moved, whatever it looked like.
    let db = fs::File::open(path.join("db")).map_err(io)?;
    rustix::fs::flock(&db, FlockOperation::NonBlockingLockExclusive).map_err(|e| {
        StoreError::Open {
            path: path.to_path_buf(),
            source: sled::Error::Io(std::io::Error::other(format!(
                "could not acquire lock on {}: {e} (another agent runs on this store)",
                path.join("db").display()
            ))),
        }
    })?;
    let again = path.join(MARKER).exists();
    let at_ms = crate::clock::now_ms();
    let name = path
        .file_name()
        .ok_or_else(|| io(std::io::Error::other("the store path has no name")))?
        .to_string_lossy()
        .into_owned();
    let parent = path.parent().unwrap_or(Path::new("/"));
    let secs = at_ms / 1000;
    // Named after the second, numbered after the copies of that second already there: the
    // names sort in the order the copies were made.
    let mut n = copies(parent, &name)
        .iter()
        .filter(|((s, _), _)| *s == secs)
        .map(|((_, n), _)| n + 1)
        .max()
        .unwrap_or(0);
    let target = loop {
        let target = match n {
            0 => parent.join(format!("{name}.corrupt-{secs}")),
            n => parent.join(format!("{name}.corrupt-{secs}-{n}")),
        };
        match rustix::fs::renameat_with(CWD, path, CWD, &target, RenameFlags::NOREPLACE) {
            Ok(()) => break target,
            Err(rustix::io::Errno::EXIST) if n < 1000 => n += 1,
            Err(e) => return Err(io(e.into())),
        }
    };
    if let Ok(d) = fs::File::open(parent) {
        let _ = d.sync_all();
    }
    drop(db);
    let removed = prune(parent, &name);
    let moved = StoreMovedAside {
        path: target.display().to_string(),
        reason: reason.to_owned(),
        at_ms,
        again,
        removed,
    };
    tracing::error!(
        "the store at {} cannot be opened ({reason}): moved aside to {}, as it was; starting \
         with a fresh store{}",
        path.display(),
        moved.path,
        if again {
            " (again: the store moved aside had itself been started fresh after an earlier \
             one was; check the disk)"
        } else {
            ""
        }
    );
    Ok(moved)
}

/// The moved-aside copies of store `name` in `parent` (directories, not symlinks), oldest
/// first, by the (second, number) of their names.
fn copies(parent: &Path, name: &str) -> Vec<((u64, u64), PathBuf)> {
    let prefix = format!("{name}.corrupt-");
    let mut copies: Vec<((u64, u64), PathBuf)> = fs::read_dir(parent)
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
        .filter_map(|e| {
            let file = e.file_name().to_str()?.to_owned();
            let rest = file.strip_prefix(&prefix)?;
            let (secs, n) = rest.split_once('-').unwrap_or((rest, "0"));
            Some(((secs.parse().ok()?, n.parse().ok()?), e.path()))
        })
        .collect();
    copies.sort();
    copies
}

/// Removes the oldest `<name>.corrupt-*` directories in `parent` beyond [`KEEP_MOVED_ASIDE`];
/// returns what it removed.
fn prune(parent: &Path, name: &str) -> Vec<String> {
    let copies = copies(parent, name);
    let excess = copies.len().saturating_sub(KEEP_MOVED_ASIDE);
    let mut removed = Vec::new();
    for (_, dir) in copies.into_iter().take(excess) {
        match fs::remove_dir_all(&dir) {
            Ok(()) => {
                tracing::warn!(
                    "removed {}: at most {KEEP_MOVED_ASIDE} moved-aside stores are kept",
                    dir.display()
                );
                removed.push(dir.display().to_string());
            }
            Err(e) => tracing::warn!("removing {}: {e}", dir.display()),
        }
    }
    removed
}

#[cfg(test)]
mod tests {
    use super::*;

    fn filled(path: &Path) {
        let store = Store::open(path).unwrap();
        store.add_invocations("fa", 3, 1_000).unwrap();
        store.flush().unwrap();
    }

    /// A real store's log checks out; the same log overwritten does not; no log, or an empty
    /// one, is no corruption (sled makes a new database).
    #[test]
    fn an_unreadable_log_is_told_before_sled_opens_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("store");
        filled(&path);
        assert_eq!(sled_log_unreadable(&path), None);
        let db = path.join("db");
        let len = fs::metadata(&db).unwrap().len() as usize;
        fs::write(&db, vec![0xab; len]).unwrap();
        let why = sled_log_unreadable(&path).unwrap();
        assert!(why.contains("segment headers"), "{why}");
        fs::write(&db, b"").unwrap();
        assert_eq!(sled_log_unreadable(&path), None);
    }

    /// 16 bytes of sled's log damaged at any place: the store always opens (moved aside, or
    /// as sled recovered it) and takes writes, so a damaged log never keeps the agent from
    /// starting. What sled 0.34 makes of each place is printed: its segment header (caught
    /// before sled opens it), a record (sled's corruption error), or the last records, which
    /// read as a write cut short by a crash (sled drops them and opens).
    #[test]
    fn a_damaged_log_never_keeps_the_store_from_opening() {
        let used = {
            let dir = tempfile::tempdir().unwrap();
            filled(&dir.path().join("store"));
            let log = fs::read(dir.path().join("store/db")).unwrap();
            log.iter().rposition(|b| *b != 0).unwrap()
        };
        let mut outcomes = std::collections::BTreeMap::new();
        for at in (0..used.saturating_sub(16)).step_by(29) {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("store");
            filled(&path);
            let db = path.join("db");
            let mut log = fs::read(&db).unwrap();
            log[at..at + 16].iter_mut().for_each(|b| *b ^= 0x5a);
            fs::write(&db, &log).unwrap();
            let (store, moved) =
                Store::open_or_move_aside(&path).unwrap_or_else(|e| panic!("damage at {at}: {e}"));
            store.add_invocations("fb", 1, 2_000).unwrap();
            store.flush().unwrap();
            let outcome = match moved {
                Some(m) => {
                    let copy = fs::read(Path::new(&m.path).join("db")).unwrap();
                    // Caught before sled opened it: byte for byte. Else sled may have zeroed
                    // the log past the damage before it gave up: its length is kept.
                    if m.reason.contains("segment headers") {
                        assert_eq!(copy, log, "damage at {at}");
                    } else {
                        assert_eq!(copy.len(), log.len(), "damage at {at}");
                    }
                    m.reason
                        .split(" of sled")
                        .next()
                        .unwrap_or_default()
                        .to_owned()
                }
                None => "opened as sled recovered it".to_owned(),
            };
            *outcomes.entry(outcome).or_insert(0) += 1;
        }
        println!("{used} bytes of log: {outcomes:?}");
        assert!(outcomes.len() >= 2, "{outcomes:?}");
    }

    /// A store whose log looks unreadable but whose lock another process holds (as a running
    /// agent's sled does) is never moved aside: the open fails, naming the lock.
    #[test]
    fn a_store_in_use_is_never_moved() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("store");
        filled(&path);
        let db = path.join("db");
        let len = fs::metadata(&db).unwrap().len() as usize;
        fs::write(&db, vec![0xab; len]).unwrap();
        let held = fs::File::open(&db).unwrap();
        rustix::fs::flock(&held, FlockOperation::NonBlockingLockExclusive).unwrap();
        let err = Store::open_or_move_aside(&path).unwrap_err();
        assert!(err.to_string().contains("could not acquire lock"), "{err}");
        assert!(copies(dir.path(), "store").is_empty());
        assert_eq!(fs::read(&db).unwrap(), vec![0xab; len]);
    }

    /// Locked, not allowed, full or too new is never corruption.
    #[test]
    fn only_damage_counts_as_corruption() {
        let open = |source| StoreError::Open {
            path: "/s".into(),
            source,
        };
        assert!(is_corruption(&open(sled::Error::Corruption {
            at: None,
            bt: ()
        })));
        for kind in [
            std::io::ErrorKind::PermissionDenied,
            std::io::ErrorKind::StorageFull,
            std::io::ErrorKind::Other,
        ] {
            assert!(!is_corruption(&open(sled::Error::Io(kind.into()))));
        }
        let corrupt = |tree, key: &str| StoreError::Corrupt {
            tree,
            key: key.to_owned(),
            reason: "bad".into(),
        };
        assert!(is_corruption(&corrupt(
            super::super::TREE_META,
            super::super::KEY_SCHEMA_VERSION
        )));
        assert!(!is_corruption(&corrupt(
            super::super::TREE_META,
            "checkpoint"
        )));
        assert!(!is_corruption(&StoreError::SchemaTooNew {
            path: "/s".into(),
            found: 9,
            supported: 2
        }));
    }

    /// Every move-aside keeps the bytes and names the copy; the fifth leaves the newest three.
    #[test]
    fn copies_are_bounded_oldest_removed() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("store");
        let mut moved = Vec::new();
        for round in 0..5u8 {
            filled(&path);
            let db = path.join("db");
            let len = fs::metadata(&db).unwrap().len() as usize;
            let garbage = vec![round; len];
            fs::write(&db, &garbage).unwrap();
            let (store, m) = Store::open_or_move_aside(&path).unwrap();
            drop(store);
            let m = m.unwrap();
            assert_eq!(fs::read(Path::new(&m.path).join("db")).unwrap(), garbage);
            // From the second on, the store moved aside was a fresh one of a move-aside.
            assert_eq!(m.again, round > 0, "{m:?}");
            moved.push(m);
        }
        let left: Vec<String> = fs::read_dir(dir.path())
            .unwrap()
            .flatten()
            .map(|e| e.path().display().to_string())
            .filter(|p| p.contains(".corrupt-"))
            .collect();
        assert_eq!(left.len(), KEEP_MOVED_ASIDE, "{left:?}");
        for m in &moved[2..] {
            assert!(left.contains(&m.path), "{} not kept: {left:?}", m.path);
        }
        let removed: Vec<&String> = moved.iter().flat_map(|m| &m.removed).collect();
        assert_eq!(removed, vec![&moved[0].path, &moved[1].path]);
    }
}
