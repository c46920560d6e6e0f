//! The audit's write-ahead journal: a small file beside the sled database that makes an audit
//! record durable with one `O_DSYNC` write instead of a flush of sled's whole log (the
//! figures are in docs/design.md, "The audit journal"). Records go to sled as before; the journal
//! only has to survive until sled has flushed them, so it is replayed at open and emptied
//! after each flush of sled.
//!
//! Layout: a header of [`HEADER_LEN`] bytes (magic, epoch, CRC-32 of both), then records, each
//! framed as `crc32 | payload length | epoch | payload` (little-endian; the CRC covers the rest
//! of the frame), the payload being the 16-byte key, a pending byte and the record's JSON.
//! Only records of the header's epoch are read: emptying the journal is one write of a new
//! header with the next epoch, and every record written before it is stale from that moment,
//! wherever its bytes still lie. That write touches only the first 512-byte sector (which
//! devices write whole); one cut short leaves a header whose CRC does not match, which is read
//! as emptied (the records were in sled before the reset began) and replaced by one with a
//! random epoch. A record cut short by a crash, or damaged, fails its CRC and is left out
//! alone: reading goes on at the next whole record of the epoch.
//!
//! The file keeps [`CAPACITY`] bytes written, and records overwrite them in place: a write
//! that changes neither the file's size nor its block map is made durable by O_DSYNC without
//! a commit of the filesystem's journal, so it does not wait behind sled's own fsyncs (an
//! append does).
//!
//! A journal of the previous format (one JSON object per line, emptied with zeros) is read as
//! such once, replayed by the store, and replaced at the reset that follows.

use std::{
    fs::{File, OpenOptions},
    io::{self, Read},
    os::unix::fs::{FileExt, OpenOptionsExt},
    path::{Path, PathBuf},
};

use serde::{Deserialize, Serialize};

pub const JOURNAL_FILE: &str = "audit.journal";

/// Bytes kept written for records to overwrite; the store empties the journal at half.
pub const CAPACITY: u64 = 1 << 20;

/// The header's room: one sector, written whole by every reset.
pub const HEADER_LEN: u64 = 512;

const MAGIC: &[u8; 8] = b"EMARSAJ2";
/// crc32 (4), payload length (4), epoch (8).
const FRAME_HEAD: usize = 16;
/// Key (16) and pending flag (1).
const PAYLOAD_MIN: usize = 17;

/// One audit record as written to the `audit` tree, and whether its outcome is still to come.
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

    /// The record framed for `epoch`.
    fn frame(&self, epoch: u64) -> io::Result<Vec<u8>> {
        let key = self
            .key_bytes()
            .ok_or_else(|| io::Error::other(format!("audit key {:?} is not 16 bytes", self.key)))?;
        let len = PAYLOAD_MIN + self.value.len();
        let len32 = u32::try_from(len)
            .ok()
            .filter(|l| u64::from(*l) <= CAPACITY)
            .ok_or_else(|| io::Error::other("audit record larger than the journal"))?;
        let mut out = Vec::with_capacity(FRAME_HEAD + len);
        out.extend_from_slice(&[0; 4]);
        out.extend_from_slice(&len32.to_le_bytes());
        out.extend_from_slice(&epoch.to_le_bytes());
        out.extend_from_slice(&key);
        out.push(u8::from(self.pending));
        out.extend_from_slice(self.value.as_bytes());
        let crc = crc32fast::hash(&out[4..]);
        out[..4].copy_from_slice(&crc.to_le_bytes());
        Ok(out)
    }

    /// The whole record of `epoch` framed at `data[pos..]`, and where the next one begins.
    fn read(data: &[u8], pos: usize, epoch: u64) -> Option<(Entry, usize)> {
        let head = data.get(pos..pos.checked_add(FRAME_HEAD)?)?;
        let word =
            |at: usize| u32::from_le_bytes([head[at], head[at + 1], head[at + 2], head[at + 3]]);
        let len = word(4) as usize;
        if head[8..16] != epoch.to_le_bytes() || len < PAYLOAD_MIN {
            return None;
        }
        let end = pos.checked_add(FRAME_HEAD)?.checked_add(len)?;
        let payload = data.get(pos + FRAME_HEAD..end)?;
        if crc32fast::hash(&data[pos + 4..end]) != word(0) {
            return None;
        }
        let pending = match payload[16] {
            0 => false,
            1 => true,
            _ => return None,
        };
        let key: [u8; 16] = payload[..16].try_into().ok()?;
        let value = std::str::from_utf8(&payload[PAYLOAD_MIN..]).ok()?;
        Some((Entry::new(&key, pending, value.as_bytes()), end))
    }
}

/// The header for `epoch`, as the reset writes it.
fn header(epoch: u64) -> Vec<u8> {
    let mut h = vec![0u8; HEADER_LEN as usize];
    h[..8].copy_from_slice(MAGIC);
    h[8..16].copy_from_slice(&epoch.to_le_bytes());
    let crc = crc32fast::hash(&h[..16]);
    h[16..20].copy_from_slice(&crc.to_le_bytes());
    h
}

/// The epoch of a whole header at the start of `data`.
fn epoch_of(data: &[u8]) -> Option<u64> {
    let h = data.get(..20)?;
    let crc = u32::from_le_bytes([h[16], h[17], h[18], h[19]]);
    (h[..8] == MAGIC[..] && crc32fast::hash(&h[..16]) == crc)
        .then(|| u64::from_le_bytes([h[8], h[9], h[10], h[11], h[12], h[13], h[14], h[15]]))
}

/// Every whole record of `epoch` after the header, and the end of the last one. A frame that
/// does not check out is skipped: the next record of the epoch is looked for after it.
fn records(data: &[u8], epoch: u64) -> (Vec<Entry>, usize) {
    let mut entries = Vec::new();
    let start = HEADER_LEN as usize;
    let mut end = start;
    let mut pos = start;
    let tag = epoch.to_le_bytes();
    while pos + FRAME_HEAD <= data.len() {
        if let Some((e, next)) = Entry::read(data, pos, epoch) {
            entries.push(e);
            pos = next;
            end = next;
            continue;
        }
        // The next place the epoch's tag could sit in a frame's head.
        match memchr::memmem::find(&data[pos + 9..], &tag) {
            Some(i) => pos = pos + 9 + i - 8,
            None => break,
        }
    }
    (entries, end)
}

/// The previous format: JSON lines, read up to the first zero byte or line cut short.
fn legacy_lines(data: &[u8]) -> Vec<Entry> {
    let mut entries = Vec::new();
    for line in data.split_inclusive(|b| *b == b'\n') {
        if line.first() == Some(&0) || line.last() != Some(&b'\n') {
            break;
        }
        if let Ok(e) = serde_json::from_slice::<Entry>(&line[..line.len() - 1]) {
            entries.push(e);
        }
    }
    entries
}

#[derive(Debug)]
pub struct Journal {
    file: File,
    path: PathBuf,
    /// Records of another epoch are stale. None: the file still holds records of the
    /// previous format, to be replayed before the next reset.
    epoch: Option<u64>,
    /// Bytes of records appended since the last reset.
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
        let mut journal = Journal {
            file,
            path,
            epoch: None,
            bytes: 0,
        };
        let entries = match epoch_of(&data) {
            Some(epoch) => {
                let (entries, end) = records(&data, epoch);
                journal.epoch = Some(epoch);
                journal.bytes = end as u64 - HEADER_LEN;
                entries
            }
            None => {
                let legacy = if data.first() == Some(&b'{') {
                    legacy_lines(&data)
                } else {
                    Vec::new()
                };
                if legacy.is_empty() && data.iter().any(|b| *b != 0) {
                    // Only a reset writes the header, and only once sled holds every record.
                    tracing::warn!(
                        "audit journal {}: header unreadable (a reset cut short): emptied",
                        journal.path.display()
                    );
                }
                legacy
            }
        };
        journal.reserve(data.len() as u64);
        if entries.is_empty() && journal.epoch.is_none() {
            // Whatever records lie in the file carry another epoch than a random one.
            let mut seed = [0u8; 8];
            rustix::rand::getrandom(&mut seed, rustix::rand::GetRandomFlags::empty())?;
            journal.write_header(u64::from_le_bytes(seed))?;
        }
        Ok((journal, entries))
    }

    /// Writes zeros up to [`CAPACITY`] (once: the file keeps them). Without the room (a full
    /// disk), records are appended instead, as durable and slower.
    fn reserve(&mut self, len: u64) {
        let len = len.max(HEADER_LEN);
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
            let _ = self.file.set_len(len.max(HEADER_LEN + self.bytes));
        }
    }

    /// Writes one entry after the last; it is on disk when this returns (O_DSYNC).
    pub fn append(&mut self, entry: &Entry) -> io::Result<()> {
        let epoch = self.epoch.ok_or_else(|| {
            io::Error::other("the journal's records of the previous format are not replayed yet")
        })?;
        let frame = entry.frame(epoch)?;
        // One positioned write: whole or torn, never interleaved (the caller holds the lock).
        self.file.write_all_at(&frame, HEADER_LEN + self.bytes)?;
        self.bytes += frame.len() as u64;
        Ok(())
    }

    /// The writes that empty the journal, in order: one, the header of the next epoch.
    fn reset_writes(&self) -> Vec<(u64, Vec<u8>)> {
        let next = self.epoch.map_or(1, |e| e.wrapping_add(1));
        vec![(0, header(next))]
    }

    /// Empties the journal (its entries are durable elsewhere now): one write of the header
    /// of the next epoch, after which every record before it is stale.
    pub fn reset(&mut self) -> io::Result<()> {
        for (at, bytes) in self.reset_writes() {
            self.file.write_all_at(&bytes, at)?;
        }
        self.epoch = Some(self.epoch.map_or(1, |e| e.wrapping_add(1)));
        self.bytes = 0;
        // Appended beyond the room (a full disk at open): back to it.
        if self.file.metadata()?.len() > CAPACITY {
            self.file.set_len(CAPACITY)?;
            self.file.sync_all()?;
        }
        Ok(())
    }

    fn write_header(&mut self, epoch: u64) -> io::Result<()> {
        self.file.write_all_at(&header(epoch), 0)?;
        self.epoch = Some(epoch);
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

    fn entry(i: usize, len: usize) -> Entry {
        let key = [i as u8; 16];
        let value = format!(r#"{{"n":{i},"pad":"{}"}}"#, "x".repeat(len));
        Entry::new(&key, i.is_multiple_of(2), value.as_bytes())
    }

    fn reopen(dir: &Path) -> Vec<Entry> {
        Journal::open(dir).unwrap().1
    }

    /// Where each record's frame lies in the file (the journal's own reading).
    fn frames(data: &[u8]) -> Vec<(usize, usize)> {
        let epoch = epoch_of(data).unwrap();
        let mut out = Vec::new();
        let mut pos = HEADER_LEN as usize;
        while let Some((_, next)) = Entry::read(data, pos, epoch) {
            out.push((pos, next));
            pos = next;
        }
        out
    }

    #[test]
    fn entries_survive_reopen_and_a_torn_record_is_ignored() {
        let dir = tempfile::tempdir().unwrap();
        let key = [7u8; 16];
        {
            let (mut j, old) = Journal::open(dir.path()).unwrap();
            assert!(old.is_empty());
            j.append(&Entry::new(&key, true, br#"{"a":1}"#)).unwrap();
            j.append(&Entry::new(&key, false, br#"{"a":2}"#)).unwrap();
        }
        // A crash in the middle of a third record, written where it would go.
        let path = dir.path().join(JOURNAL_FILE);
        assert_eq!(std::fs::metadata(&path).unwrap().len(), CAPACITY);
        let data = std::fs::read(&path).unwrap();
        let end = frames(&data).last().unwrap().1;
        let epoch = epoch_of(&data).unwrap();
        let third = Entry::new(&key, false, br#"{"a":"torn"}"#)
            .frame(epoch)
            .unwrap();
        let f = OpenOptions::new().write(true).open(&path).unwrap();
        f.write_all_at(&third[..third.len() - 3], end as u64)
            .unwrap();
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
        assert!(reopen(dir.path()).is_empty());
        // The room stays written: no record changes the file's size.
        assert_eq!(std::fs::metadata(&path).unwrap().len(), CAPACITY);
        let mode = std::fs::metadata(dir.path().join(JOURNAL_FILE))
            .map(|m| std::os::unix::fs::PermissionsExt::mode(&m.permissions()) & 0o777)
            .unwrap();
        assert_eq!(mode, 0o600);
    }

    /// A reset cut short after any byte of what it writes: the journal reads either as it was
    /// (nothing of the reset reached the disk that changes a byte) or as empty, never with
    /// some of the older records; and records written after it come back, all of them, never
    /// mixed with older ones, also when they reach past the first block over older records.
    #[test]
    fn a_reset_cut_at_any_byte_never_brings_old_records_back() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(JOURNAL_FILE);
        let old: Vec<Entry> = (0..60).map(|i| entry(i, 20 + i * 7)).collect();
        let (mut j, _) = Journal::open(dir.path()).unwrap();
        // An earlier cycle, so that stale records of an older epoch lie there too.
        for e in &old[..30] {
            j.append(e).unwrap();
        }
        j.reset().unwrap();
        for e in &old {
            j.append(e).unwrap();
        }
        assert_eq!(reopen(dir.path()), old);
        let before = std::fs::read(&path).unwrap();
        let writes = j.reset_writes();
        drop(j);
        let total: usize = writes.iter().map(|w| w.1.len()).sum();
        let new: Vec<Entry> = (100..103).map(|i| entry(i, 3000)).collect();
        let (mut emptied, mut unchanged) = (0, 0);
        for cut in 0..=total {
            std::fs::write(&path, &before).unwrap();
            let f = OpenOptions::new().write(true).open(&path).unwrap();
            let mut left = cut;
            for (at, bytes) in &writes {
                let n = left.min(bytes.len());
                f.write_all_at(&bytes[..n], *at).unwrap();
                left -= n;
            }
            drop(f);
            let now = std::fs::read(&path).unwrap();
            let expected = if now[..HEADER_LEN as usize] == before[..HEADER_LEN as usize] {
                unchanged += 1;
                old.clone()
            } else {
                emptied += 1;
                Vec::new()
            };
            let (mut j, entries) = Journal::open(dir.path()).unwrap();
            assert_eq!(entries, expected, "reset cut after {cut} bytes");
            for e in &new {
                j.append(e).unwrap();
            }
            drop(j);
            let mut want = expected;
            want.extend(new.iter().cloned());
            assert_eq!(
                reopen(dir.path()),
                want,
                "records after a reset cut at {cut}"
            );
        }
        // Both outcomes were met: the cut before the first changed byte, and after it.
        assert!(
            unchanged >= 1 && emptied >= total - 20,
            "{unchanged} {emptied}"
        );
    }

    /// Any byte of a record damaged: that record is left out, every other one comes back.
    #[test]
    fn a_damaged_record_is_left_out_alone() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(JOURNAL_FILE);
        let all: Vec<Entry> = (0..5).map(|i| entry(i, 10 + i * 30)).collect();
        let (mut j, _) = Journal::open(dir.path()).unwrap();
        for e in &all {
            j.append(e).unwrap();
        }
        drop(j);
        let data = std::fs::read(&path).unwrap();
        let spans = frames(&data);
        assert_eq!(spans.len(), all.len());
        let f = OpenOptions::new().write(true).open(&path).unwrap();
        for (i, (start, end)) in spans.iter().enumerate() {
            for at in *start..*end {
                f.write_all_at(&[data[at] ^ 0xff], at as u64).unwrap();
                let mut want = all.clone();
                want.remove(i);
                assert_eq!(reopen(dir.path()), want, "record {i}, byte {at} damaged");
                f.write_all_at(&data[at..=at], at as u64).unwrap();
            }
        }
        assert_eq!(reopen(dir.path()), all);
    }

    /// A journal of the previous format (JSON lines) is read once, takes no new records until
    /// the store has replayed it and reset it, and then reads as empty.
    #[test]
    fn a_journal_of_the_previous_format_is_replayed_then_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(JOURNAL_FILE);
        let lines: Vec<Entry> = (0..3).map(|i| entry(i, 5)).collect();
        let mut text = Vec::new();
        for e in &lines {
            text.extend(serde_json::to_vec(e).unwrap());
            text.push(b'\n');
        }
        text.extend(b"{\"key\":\"07"); // cut short
        text.resize(CAPACITY as usize, 0);
        std::fs::write(&path, &text).unwrap();
        let (mut j, entries) = Journal::open(dir.path()).unwrap();
        assert_eq!(entries, lines);
        assert!(j.append(&entry(9, 1)).is_err());
        j.reset().unwrap();
        j.append(&entry(9, 1)).unwrap();
        drop(j);
        assert_eq!(reopen(dir.path()), vec![entry(9, 1)]);
    }
}
