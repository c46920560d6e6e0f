//! Where the store keeps what the live model holds: blocks and their end-time range, the
//! tail, the open and sealed hours, each string's latest end, and the id of the block
//! holding each ended record ([`BlockId`], which the model keeps beside the record without
//! reading it).

use std::collections::{BTreeMap, BTreeSet, HashMap};

use serde::{Deserialize, Serialize};

use crate::model::live::{InstanceKey, LiveModel};

/// The live model and where the store keeps what it holds: one lock, so that the two never
/// disagree. Saved whole in the checkpoint.
#[derive(Debug, Default, Serialize, Deserialize)]
pub(super) struct State {
    pub(super) model: LiveModel<BlockId>,
    pub(super) index: LogIndex,
}

/// Where the records are: blocks and their end-time range, the tail, the open and the
/// sealed hours.
#[derive(Debug, Default, Serialize, Deserialize)]
pub(super) struct LogIndex {
    pub(super) next_block: u64,
    pub(super) blocks: BTreeMap<u64, BlockInfo>,
    /// Ended records not sealed into a block yet, with their function.
    pub(super) tail: BTreeMap<InstanceKey, String>,
    /// (hour start, function id) of the buckets in `hours_open`.
    pub(super) open_hours: BTreeSet<(u64, u32)>,
    /// Hours whose buckets are in `hour_blocks`.
    pub(super) sealed_hours: BTreeSet<u64>,
    pub(super) newest_hour: u64,
    /// Per string id, the latest end of an ended record naming it (function or parent
    /// directory): once that is before the retention's cutoff, pruning removed every such
    /// record ([`Store::prune`] then removes the string unless something else uses it).
    pub(super) string_ends: HashMap<u32, u64>,
}

impl LogIndex {
    /// An ended record naming the strings `ids`, ended at `end_ms`.
    pub(super) fn note_end(&mut self, ids: [u32; 2], end_ms: u64) {
        for id in ids {
            let e = self.string_ends.entry(id).or_insert(end_ms);
            *e = (*e).max(end_ms);
        }
    }
}

#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize)]
pub(super) struct BlockInfo {
    pub(super) min_ended: u64,
    pub(super) max_ended: u64,
}

/// Which block holds an ended record, or the tail (not sealed into a block yet; where every
/// ended record goes first, hence the default). The live model keeps one beside each ended
/// record, in 4 of its 32 bytes, and hands it back without reading it; in the checkpoint it
/// is the plain `u32` it wraps.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub(super) struct BlockId(u32);

impl BlockId {
    /// Not in a block: in `instances_tail`.
    pub(super) const TAIL: BlockId = BlockId(u32::MAX);

    /// Block `seq` (4 billion blocks of [`BLOCK_RECORDS`](super::BLOCK_RECORDS) records; later ones share the last
    /// id, which only costs a lookup that reads the wrong block).
    pub(super) fn of_seq(seq: u64) -> BlockId {
        BlockId(u32::try_from(seq).unwrap_or(u32::MAX - 1).min(u32::MAX - 1))
    }

    /// The block's sequence number in `instance_blocks`; None for the tail.
    pub(super) fn seq(self) -> Option<u64> {
        (self != Self::TAIL).then_some(u64::from(self.0))
    }
}

impl Default for BlockId {
    fn default() -> Self {
        BlockId::TAIL
    }
}
