//! What the agent keeps of a live instance besides its record ([`crate::model::kept`]), in
//! `instance_state`: kept, read, forgotten, dropped with the instance's end, and checked at
//! open.

use crate::model::containers::KubernetesNames;
use crate::model::kept::{BurstWatch, KeptState, RuntimeLimit, SqueezeHold};
use crate::model::live::InstanceKey;

use super::codec::{decode_v2, log_key, quarantine_key, u64_of};
use super::{Store, StoreError, FORMAT_V2, TREE_INSTANCE_STATE, TREE_QUARANTINE};

/// Key of an `instance_state` entry: the instance's record key, then the kind.
pub(super) fn state_key(key: InstanceKey, kind: u8) -> [u8; 17] {
    let mut k = [0u8; 17];
    k[..16].copy_from_slice(&log_key(key.0, key.1));
    k[16] = kind;
    k
}

pub(super) fn display_state_key(k: &[u8]) -> String {
    match k.len() {
        17 => format!("{}/{}#{}", u64_of(&k[..8]), u64_of(&k[8..16]), k[16]),
        _ => k.escape_ascii().to_string(),
    }
}

impl Store {
    /// Keeps `state` of the live instance `key`, in place of what was kept of that kind. It
    /// reaches the disk with the store's next flush ([`Store::flush`] to have it there now),
    /// and goes when the instance's record is written as ended.
    pub fn keep_state<T: KeptState>(&self, key: InstanceKey, state: &T) -> Result<(), StoreError> {
        let k = state_key(key, T::KIND);
        let mut value = vec![FORMAT_V2];
        postcard::to_io(state, &mut value).map_err(|e| StoreError::Encode {
            tree: TREE_INSTANCE_STATE,
            key: display_state_key(&k),
            reason: e.to_string(),
        })?;
        self.instance_state.insert(k, value)?;
        Ok(())
    }

    /// What is kept of kind `T` for the live instance `key`.
    pub fn kept_state<T: KeptState>(&self, key: InstanceKey) -> Result<Option<T>, StoreError> {
        let k = state_key(key, T::KIND);
        let Some(raw) = self.instance_state.get(k)? else {
            return Ok(None);
        };
        decode_v2(&raw)
            .map(Some)
            .map_err(|reason| StoreError::Corrupt {
                tree: TREE_INSTANCE_STATE,
                key: display_state_key(&k),
                reason,
            })
    }

    /// Drops what is kept of kind `T` for the instance `key`.
    pub fn forget_state<T: KeptState>(&self, key: InstanceKey) -> Result<(), StoreError> {
        self.instance_state.remove(state_key(key, T::KIND))?;
        Ok(())
    }

    /// Everything kept of kind `T`, by instance (read at start-up; an open has moved what does
    /// not decode aside).
    pub fn kept_states<T: KeptState>(&self) -> Result<Vec<(InstanceKey, T)>, StoreError> {
        let mut out = Vec::new();
        for item in self.instance_state.iter() {
            let (k, raw) = item?;
            if k.len() != 17 || k[16] != T::KIND {
                continue;
            }
            match decode_v2(&raw) {
                Ok(v) => out.push(((u64_of(&k[..8]), u64_of(&k[8..16])), v)),
                Err(reason) => tracing::error!(
                    "{} of {}: {reason}; ignored",
                    T::NAME,
                    display_state_key(&k)
                ),
            }
        }
        Ok(out)
    }

    /// Drops everything kept of the instance whose record key is `key`.
    pub(super) fn drop_states(&self, key: &[u8; 16]) -> Result<(), StoreError> {
        for k in self.instance_state.scan_prefix(key).keys() {
            self.instance_state.remove(k?)?;
        }
        Ok(())
    }

    /// At open: drops what is kept of instances that are not live (a write that raced the
    /// instance's end, or an end recorded while the entry was not yet on disk), and moves
    /// aside values that do not decode.
    pub(super) fn drop_orphan_states(&mut self) -> Result<(), StoreError> {
        let (mut orphans, mut corrupt) = (0u64, 0u64);
        for item in self.instance_state.iter() {
            let (k, raw) = item?;
            let decodes = k.len() == 17
                && match k[16] {
                    RuntimeLimit::KIND => decode_v2::<RuntimeLimit>(&raw).is_ok(),
                    BurstWatch::KIND => decode_v2::<BurstWatch>(&raw).is_ok(),
                    SqueezeHold::KIND => decode_v2::<SqueezeHold>(&raw).is_ok(),
                    KubernetesNames::KIND => decode_v2::<KubernetesNames>(&raw).is_ok(),
                    _ => false,
                };
            if !decodes {
                tracing::error!(
                    "`{TREE_INSTANCE_STATE}` value at {} does not decode; moved to \
                     `{TREE_QUARANTINE}`",
                    display_state_key(&k)
                );
                self.quarantine
                    .insert(quarantine_key(TREE_INSTANCE_STATE, &k), raw)?;
                self.instance_state.remove(&k)?;
                corrupt += 1;
            } else if !self.live_tree.contains_key(&k[..16])? {
                self.instance_state.remove(&k)?;
                orphans += 1;
            }
        }
        if orphans > 0 {
            tracing::info!("{orphans} kept states of instances that are not live dropped");
        }
        self.corrupt_at_open += corrupt;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::*;
    use crate::store::test_util::*;
    use crate::store::*;

    /// What is kept of a live instance survives a reopen (clean or not), goes when the
    /// instance ends, and an open drops entries of instances that are not live and moves
    /// aside values that do not decode.
    #[test]
    fn kept_state_lives_and_ends_with_its_instance() {
        use crate::model::kept::RuntimeLimitSource;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db");
        let hold = SqueezeHold {
            before: Limits {
                max_bytes: Some(64 * MIB),
                high_bytes: Some(48 * MIB),
            },
            hold_bytes: 12 * MIB,
            taken_at_ms: 1_500,
        };
        let watch = BurstWatch {
            ceiling_bytes: 128 * MIB,
            base_bytes: 32 * MIB,
            since_ms: 1_200,
        };
        let limit = RuntimeLimit {
            bytes: 64 * MIB,
            source: RuntimeLimitSource::Metadata,
        };
        {
            let s = Store::open(&path).unwrap();
            for (started, id) in [(1_000, 7), (1_001, 8)] {
                s.put_instance(&rec("f", started, id)).unwrap();
                s.keep_state((started, id), &hold).unwrap();
                s.keep_state((started, id), &watch).unwrap();
            }
            s.keep_state((1_000, 7), &limit).unwrap();
            assert_eq!(s.kept_state::<SqueezeHold>((1_000, 7)).unwrap(), Some(hold));
            assert_eq!(s.kept_state::<RuntimeLimit>((1_001, 8)).unwrap(), None);
            // Another instance on the same cgroup id (inode reused) has nothing kept.
            assert_eq!(s.kept_state::<SqueezeHold>((2_000, 7)).unwrap(), None);
            s.forget_state::<BurstWatch>((1_001, 8)).unwrap();
            // A write that raced the end of an instance never recorded as live.
            s.keep_state((3_000, 9), &hold).unwrap();
            // As a crash leaves it: no checkpoint, sled's own flush at drop.
        }
        let s = Store::open(&path).unwrap();
        assert_eq!(
            s.kept_state::<SqueezeHold>((3_000, 9)).unwrap(),
            None,
            "orphan dropped"
        );
        let mut holds = s.kept_states::<SqueezeHold>().unwrap();
        holds.sort_by_key(|(k, _)| *k);
        assert_eq!(holds, vec![((1_000, 7), hold), ((1_001, 8), hold)]);
        assert_eq!(
            s.kept_states::<BurstWatch>().unwrap(),
            vec![((1_000, 7), watch)]
        );
        assert_eq!(
            s.kept_state::<RuntimeLimit>((1_000, 7)).unwrap(),
            Some(limit)
        );
        // The instance ends: everything kept of it goes, the other's stays.
        let mut ended = rec("f", 1_000, 7);
        ended.ended_at_ms = Some(5_000);
        s.put_instance(&ended).unwrap();
        assert_eq!(s.kept_state::<SqueezeHold>((1_000, 7)).unwrap(), None);
        assert_eq!(s.kept_state::<RuntimeLimit>((1_000, 7)).unwrap(), None);
        assert_eq!(s.kept_states::<SqueezeHold>().unwrap().len(), 1);
        // A value that does not decode is an error to read, and moved aside at the next open.
        s.instance_state
            .insert(
                state_key((1_001, 8), BurstWatch::KIND),
                &[FORMAT_V2, 0xff][..],
            )
            .unwrap();
        assert!(s.kept_state::<BurstWatch>((1_001, 8)).is_err());
        s.checkpoint().unwrap();
        drop(s);
        let s = Store::open(&path).unwrap();
        assert_eq!(s.kept_state::<BurstWatch>((1_001, 8)).unwrap(), None);
        assert_eq!(s.corrupt_at_open(), 1);
        assert_eq!(s.raw_tree(TREE_QUARANTINE).len(), 1);
        assert_eq!(s.kept_state::<SqueezeHold>((1_001, 8)).unwrap(), Some(hold));
    }
}
