//! The audit's write-ahead journal: a small append-only file beside the sled database that
//! makes an audit record durable with one `O_DSYNC` write (about 0.1 ms here) instead of a
//! flush of sled's whole log (milliseconds at the 99th percentile). Records go to sled as
//! before; the journal only has to survive until sled has flushed them, so it is replayed at
//! open and emptied after each flush of sled.
//!
//! One JSON object per line: `{"key":"<32 hex digits>","pending":true|false,"value":"<record
//! JSON>"}`. A line cut short by a crash is ignored: its write never returned, so the limit
//! write it announced never happened.
//!
//! The file keeps [`CAPACITY`] bytes written with zeros, and records overwrite them in place:
//! a write that changes neither the file's size nor its block map is made durable by O_DSYNC
//! without a commit of the filesystem's journal, so it does not wait behind sled's own fsyncs
//! (an append does: measured, up to 4 ms of the mkdir-to-limits p99). Reading stops at the
//! zeros; emptying writes zeros over what was used, the first block first.

use std::{
    fs::{File, OpenOptions},
    io::{self, Read},
    os::unix::fs::{FileExt, OpenOptionsExt},
    path::{Path, PathBuf},
};

use serde::{Deserialize, Serialize};

pub const JOURNAL_FILE: &str = "audit.journal";

/// Bytes kept written (zeros) for records to overwrite; the store empties the journal at half.
pub const CAPACITY: u64 = 1 << 20;

/// One line: an audit record as written to the `audit` tree, and whether its outcome is still
/// to come.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    pub key: String,
    pub pending: bool,
    pub value: String,
}

impl Entry {
    pub fn new(key: &[u8; 16], pending: bool, value: &[u8]) -> Self {
        Entry {
            key: key.iter().map(|b| format!("{b:02x}")).collect(),
            pending,
            value: String::from_utf8_lossy(value).into_owned(),
        }
    }

    /// The 16-byte key back from its hex; None for a line that was not written by `new`.
    pub fn key_bytes(&self) -> Option<[u8; 16]> {
        if self.key.len() != 32 {
            return None;
        }
        let mut out = [0u8; 16];
        for (i, b) in out.iter_mut().enumerate() {
            *b = u8::from_str_radix(self.key.get(2 * i..2 * i + 2)?, 16).ok()?;
        }
        Some(out)
    }
}

#[derive(Debug)]
pub struct Journal {
    file: File,
    path: PathBuf,
    /// Bytes appended since the last reset.
    pub bytes: u64,
}

impl Journal {
    /// Opens (creating) the journal in `dir`, with the entries it holds.
    pub fn open(dir: &Path) -> io::Result<(Journal, Vec<Entry>)> {
        let path = dir.join(JOURNAL_FILE);
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .custom_flags(libc::O_DSYNC | libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(&path)?;
        let mut data = Vec::new();
        file.read_to_end(&mut data)?;
        let mut entries = Vec::new();
        let mut bytes = 0u64;
        let mut pos = 0usize;
        for line in data.split_inclusive(|b| *b == b'\n') {
            // The zeros never written over: the end. A line cut short by a crash (no newline,
            // or cut JSON) is left out, and overwritten by the next record.
            if line.first() == Some(&0) {
                break;
            }
            pos += line.len();
            if line.last() != Some(&b'\n') {
                break;
            }
            if let Ok(e) = serde_json::from_slice::<Entry>(&line[..line.len() - 1]) {
                entries.push(e);
                bytes = pos as u64;
            }
        }
        let mut journal = Journal { file, path, bytes };
        journal.reserve(data.len() as u64);
        Ok((journal, entries))
    }

    /// Writes zeros up to [`CAPACITY`] (once: the file keeps them). Without the room (a full
    /// disk), records are appended instead, as durable and slower.
    fn reserve(&mut self, len: u64) {
        if len >= CAPACITY {
            return;
        }
        let zeros = vec![0u8; (CAPACITY - len) as usize];
        let r = self
            .file
            .write_all_at(&zeros, len)
            .and_then(|()| self.file.sync_all());
        if let Err(e) = r {
            tracing::warn!(
                "audit journal {}: no room to keep written ({e}); records are appended",
                self.path.display()
            );
            let _ = self.file.set_len(len.max(self.bytes));
        }
    }

    /// Writes one entry after the last; it is on disk when this returns (O_DSYNC).
    pub fn append(&mut self, entry: &Entry) -> io::Result<()> {
        let mut line = serde_json::to_vec(entry).map_err(io::Error::other)?;
        line.push(b'\n');
        // One positioned write: whole or torn, never interleaved (the caller holds the lock).
        self.file.write_all_at(&line, self.bytes)?;
        self.bytes += line.len() as u64;
        Ok(())
    }

    /// Empties the journal (its entries are durable elsewhere now): zeros over the first block
    /// first, so a crash in between leaves a journal that reads as empty, never one whose
    /// older entries come back without their later ones.
    pub fn reset(&mut self) -> io::Result<()> {
        let used = self.bytes;
        let first = used.min(4096);
        self.file.write_all_at(&vec![0u8; first as usize], 0)?;
        if used > first {
            self.file
                .write_all_at(&vec![0u8; (used - first) as usize], first)?;
        }
        // Appended beyond the room (a full disk at open): back to it.
        if self.file.metadata()?.len() > CAPACITY {
            self.file.set_len(CAPACITY)?;
            self.file.sync_all()?;
        }
        self.bytes = 0;
        Ok(())
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_survive_reopen_and_a_torn_line_is_ignored() {
        let dir = tempfile::tempdir().unwrap();
        let key = [7u8; 16];
        {
            let (mut j, old) = Journal::open(dir.path()).unwrap();
            assert!(old.is_empty());
            j.append(&Entry::new(&key, true, br#"{"a":1}"#)).unwrap();
            j.append(&Entry::new(&key, false, br#"{"a":2}"#)).unwrap();
        }
        // A crash in the middle of a third line, written where it would go.
        let path = dir.path().join(JOURNAL_FILE);
        assert_eq!(std::fs::metadata(&path).unwrap().len(), CAPACITY);
        let data = std::fs::read(&path).unwrap();
        let end = data.iter().position(|b| *b == 0).unwrap() as u64;
        let f = OpenOptions::new().write(true).open(&path).unwrap();
        f.write_all_at(br#"{"key":"0707","pend"#, end).unwrap();
        let (mut j, entries) = Journal::open(dir.path()).unwrap();
        assert_eq!(entries.len(), 2);
        // The next record takes the torn one's place and reads back, alone after the two.
        j.append(&Entry::new(&key, false, br#"{"a":3}"#)).unwrap();
        drop(j);
        let (mut j, entries) = Journal::open(dir.path()).unwrap();
        assert_eq!(entries.len(), 3);
        assert_eq!(entries[2].value, r#"{"a":3}"#);
        assert_eq!(entries[0].key_bytes(), Some(key));
        assert!(entries[0].pending && !entries[1].pending);
        assert_eq!(entries[1].value, r#"{"a":2}"#);
        j.reset().unwrap();
        drop(j);
        let (_, entries) = Journal::open(dir.path()).unwrap();
        assert!(entries.is_empty());
        // The room stays written: no record changes the file's size.
        assert_eq!(std::fs::metadata(&path).unwrap().len(), CAPACITY);
        let mode = std::fs::metadata(dir.path().join(JOURNAL_FILE))
            .map(|m| std::os::unix::fs::PermissionsExt::mode(&m.permissions()) & 0o777)
            .unwrap();
        assert_eq!(mode, 0o600);
    }
}
