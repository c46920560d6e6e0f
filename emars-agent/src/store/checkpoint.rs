//! The checkpoint: the live model and the index written to a file of their own at a clean
//! close, loaded at the next open when the store is still clean and the file carries the id
//! `meta` noted; and the ring mark kept with the records.

use super::codec::encode_json;
use super::index::State;
use super::{Store, StoreError, TREE_META};

/// Where schema 2 before checkpoint files kept the checkpoint (removed at open).
pub(super) const KEY_LIVE_CHECKPOINT: &str = "live_checkpoint";

/// The id written into the checkpoint file of the last clean close, and whether nothing was
/// written since.
pub(super) const KEY_CHECKPOINT_ID: &str = "checkpoint_id";

pub(super) const KEY_CLEAN: &str = "clean";

/// The live model as of the last clean close: a file beside sled's, not a sled value. As a
/// sled value it stayed in sled's cache after the open and went through sled's log at every
/// clean close (the figures are in docs/design.md).
pub const CHECKPOINT_FILE: &str = "checkpoint";

/// The kernel event ring (its identity) and the position up to which the records here reflect
/// its events.
pub(super) const KEY_RING_MARK: &str = "ring_mark";

/// Format of the checkpoint (its first byte); another one is ignored (the model is rebuilt
/// from the records).
pub(super) const CHECKPOINT_FORMAT: u8 = 7;

/// Gives freed heap memory back to the system (glibc keeps it as RSS otherwise; musl's
/// allocator returns memory on its own).
pub(super) fn release_free_heap() {
    #[cfg(target_env = "gnu")]
    // SAFETY: malloc_trim only releases free heap memory; no pointer is touched.
    unsafe {
        libc::malloc_trim(0);
    }
}

impl Store {
    /// The live model from the checkpoint of the last clean close, if there is a valid one:
    /// the store is clean and the file carries the id the store noted when it was written.
    pub(super) fn load_checkpoint(&self) -> bool {
        let clean = matches!(self.meta.get(KEY_CLEAN), Ok(Some(v)) if v.as_ref() == b"1");
        let id = match self.meta.get(KEY_CHECKPOINT_ID) {
            Ok(Some(v)) => v.to_vec(),
            _ => return false,
        };
        if !clean {
            return false;
        }
        let path = self.path.join(CHECKPOINT_FILE);
        let raw = match std::fs::read(&path) {
            Ok(raw) => raw,
            Err(e) => {
                tracing::warn!(
                    "cannot read {} ({e}): rebuilding from the records",
                    path.display()
                );
                return false;
            }
        };
        let Some((&format, rest)) = raw.split_first() else {
            return false;
        };
        if format != CHECKPOINT_FORMAT {
            tracing::info!("checkpoint of another format ignored: rebuilding");
            return false;
        }
        let Some(body) = rest.strip_prefix(id.as_slice()) else {
            tracing::warn!(
                "{} is not the last clean close's: rebuilding",
                path.display()
            );
            return false;
        };
        match postcard::from_bytes::<State>(body) {
            Ok(state) => {
                *self.state() = state;
                true
            }
            Err(e) => {
                tracing::warn!("unreadable checkpoint ({e}): rebuilding from the records");
                false
            }
        }
    }

    /// Writes the live model as the checkpoint the next open starts from, with every
    /// function's last-seen time, and marks the store clean. Called at a clean shutdown; any
    /// write after it makes the next open rebuild.
    pub fn checkpoint(&self) -> Result<(), StoreError> {
        let st = self.state();
        for name in st.model.names() {
            self.write_function(&st.model, &name)?;
        }
        // A new id each time: a file left by an earlier close never passes for this one.
        let id = self
            .meta
            .get(KEY_CHECKPOINT_ID)?
            .and_then(|v| <[u8; 8]>::try_from(v.as_ref()).ok())
            .map_or(1, u64::from_be_bytes)
            .wrapping_add(1)
            .to_be_bytes();
        let mut raw = vec![CHECKPOINT_FORMAT];
        raw.extend_from_slice(&id);
        postcard::to_io(&*st, &mut raw).map_err(|e| StoreError::Encode {
            tree: TREE_META,
            key: CHECKPOINT_FILE.to_owned(),
            reason: e.to_string(),
        })?;
        drop(st);
        let path = self.path.join(CHECKPOINT_FILE);
        crate::files::replace(&path, &raw, 0o600).map_err(|source| StoreError::Checkpoint {
            path: path.clone(),
            source,
        })?;
        drop(raw);
        self.meta.insert(KEY_CHECKPOINT_ID, &id[..])?;
        self.meta.insert(KEY_CLEAN, &b"1"[..])?;
        self.flush()
    }

    /// Notes that the records written so far reflect the events of ring `ring` up to `pos`:
    /// written before each flush, so that a durable mark comes with durable effects, and a
    /// restarted agent that reads those events again from a pinned ring skips them.
    pub fn set_ring_mark(&self, ring: &str, pos: u64) -> Result<(), StoreError> {
        let raw = encode_json(TREE_META, KEY_RING_MARK.as_bytes(), &(ring, pos))?;
        self.meta.insert(KEY_RING_MARK, raw)?;
        Ok(())
    }

    /// The last [`Store::set_ring_mark`] that reached the disk.
    pub fn ring_mark(&self) -> Option<(String, u64)> {
        let raw = self.meta.get(KEY_RING_MARK).ok()??;
        serde_json::from_slice(&raw).ok()
    }

    /// Whether this open took the live model from a checkpoint (else it read the records).
    pub fn opened_from_checkpoint(&self) -> bool {
        self.from_checkpoint
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::test_util::*;
    use crate::store::*;

    /// The checkpoint is a file of its own: one an earlier clean close wrote never passes for
    /// the last one's, and a checkpoint kept in sled by an older build is dropped at open.
    #[test]
    fn checkpoint_file_of_an_earlier_close_is_not_used() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db");
        let file = path.join(CHECKPOINT_FILE);
        {
            let s = Store::open(&path).unwrap();
            s.put_instance(&rec("f", 1, 1)).unwrap();
            s.checkpoint().unwrap();
        }
        let first = std::fs::read(&file).unwrap();
        {
            let s = Store::open(&path).unwrap();
            assert!(s.opened_from_checkpoint());
            s.put_instance(&rec("f", 2, 2)).unwrap();
            s.checkpoint().unwrap();
        }
        // The file of the first close put back: its id is not the store's.
        std::fs::write(&file, &first).unwrap();
        {
            let s = Store::open(&path).unwrap();
            assert!(
                !s.opened_from_checkpoint(),
                "an earlier close's checkpoint was used"
            );
            assert_eq!(s.functions().unwrap()[0].live_instances, 2);
            s.checkpoint().unwrap();
            // An older build's checkpoint value in sled.
            s.meta.insert(KEY_LIVE_CHECKPOINT, &[0u8; 64][..]).unwrap();
        }
        let s = Store::open(&path).unwrap();
        assert!(s.opened_from_checkpoint());
        assert_eq!(s.meta.get(KEY_LIVE_CHECKPOINT).unwrap(), None);
        assert_eq!(s.functions().unwrap()[0].live_instances, 2);
    }

    /// A clean close leaves a checkpoint the next open starts from; a write after it (and no
    /// clean close, as after kill -9) makes the next open rebuild from the records.
    #[test]
    fn checkpoint_after_clean_close_only() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db");
        let mut r = rec("f", 1, 1);
        {
            let s = Store::open(&path).unwrap();
            assert!(!s.opened_from_checkpoint());
            s.put_instance(&r).unwrap();
            r.ended_at_ms = Some(5);
            r.peak_bytes = 3 * MIB;
            s.put_instance(&r).unwrap();
            s.add_invocations("f", 4, 2).unwrap();
            s.checkpoint().unwrap();
        }
        let before = {
            let s = Store::open(&path).unwrap();
            assert!(s.opened_from_checkpoint());
            let live = (
                s.functions().unwrap(),
                s.export().unwrap(),
                s.hours("f").unwrap(),
            );
            // Written after the checkpoint, then "killed" (no checkpoint).
            s.put_instance(&rec("f", 9, 2)).unwrap();
            live
        };
        let s = Store::open(&path).unwrap();
        assert!(!s.opened_from_checkpoint(), "a stale checkpoint was used");
        let f = &s.functions().unwrap()[0];
        assert_eq!((f.instances, f.live_instances), (2, 1));
        assert_eq!(f.peak_bytes, before.0[0].peak_bytes);
        assert_eq!(f.invocations, 4);
        assert_eq!(s.export().unwrap(), before.1);
        assert_eq!(s.hours("f").unwrap(), before.2);
    }
}
