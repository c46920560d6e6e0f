//! How values and keys are written: postcard records behind a format byte, big-endian keys,
//! JSON for the logs and `functions`, and the readable renderings of keys used in errors.

use std::sync::Arc;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::model::{HourBucket, InstanceRecord, Limits, PeakSource, HOUR_MS};

use super::strings::Strings;
use super::{
    Store, StoreError, FORMAT_V2, TREE_BLOCKS, TREE_HOURS_OPEN, TREE_HOUR_BLOCKS, TREE_LIVE,
    TREE_STRINGS,
};

/// An instance record as the store holds it (after the format byte, in postcard:
/// integers are varints). Its start time and cgroup id are the key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredInstance {
    /// `strings` id of the function name.
    pub(super) function: u32,
    /// `strings` id of the cgroup's parent directory.
    pub(super) parent: u32,
    /// Last component of the cgroup path.
    pub(super) leaf: String,
    /// The instance name when it is not the last path component.
    pub(super) instance: Option<String>,
    /// Run time (ended_at_ms - started_at_ms); None while live.
    pub(super) ran_ms: Option<u64>,
    pub(super) execs: u64,
    pub(super) peak_bytes: u64,
    pub(super) peak_source: u8,
    pub(super) oom_kills: u64,
    pub(super) max_bytes: Option<u64>,
    pub(super) high_bytes: Option<u64>,
}

/// An hour bucket as the store holds it; the hour and the function are its key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub(super) struct StoredHour {
    pub(super) instances_started: u64,
    pub(super) execs: u64,
    pub(super) invocations: u64,
    pub(super) oom_kills: u64,
    pub(super) peak_bytes: u64,
}

/// One record in a block.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(super) struct BlockEntry {
    pub(super) started_at_ms: u64,
    pub(super) cgroup_id: u64,
    pub(super) record: StoredInstance,
}

/// The record a [`StoredInstance`] keyed by `(started_at_ms, cgroup_id)` stands for.
pub(super) fn build_record(
    strings: &Strings,
    started_at_ms: u64,
    cgroup_id: u64,
    s: StoredInstance,
    tree: &'static str,
) -> Result<InstanceRecord, StoreError> {
    let corrupt = |reason: String| StoreError::Corrupt {
        tree,
        key: format!("{started_at_ms}/{cgroup_id}"),
        reason,
    };
    let string = |id| {
        strings
            .by_id
            .get(&id)
            .ok_or_else(|| corrupt(format!("string id {id} is not in `{TREE_STRINGS}`")))
    };
    let function = string(s.function)?.to_string();
    let parent = string(s.parent)?;
    let peak_source = match s.peak_source {
        0 => PeakSource::None,
        1 => PeakSource::KernelWatermark,
        2 => PeakSource::ChargeEvents,
        3 => PeakSource::UseWatermark,
        4 => PeakSource::LifetimeWatermark,
        n => return Err(corrupt(format!("unknown peak source {n}"))),
    };
    Ok(InstanceRecord {
        function,
        instance: s.instance.unwrap_or_else(|| s.leaf.clone()),
        cgroup_id,
        cgroup_path: format!("{parent}/{}", s.leaf),
        started_at_ms,
        ended_at_ms: s.ran_ms.map(|r| started_at_ms.saturating_add(r)),
        execs: s.execs,
        peak_bytes: s.peak_bytes,
        peak_source,
        oom_kills: s.oom_kills,
        limits: Limits {
            max_bytes: s.max_bytes,
            high_bytes: s.high_bytes,
        },
    })
}

pub(super) fn tx_error(e: sled::transaction::TransactionError<()>) -> StoreError {
    match e {
        sled::transaction::TransactionError::Storage(e) => StoreError::Db(e),
        sled::transaction::TransactionError::Abort(()) => {
            StoreError::Db(sled::Error::Unsupported("transaction aborted".into()))
        }
    }
}

/// A schema 2 value: the format byte, then postcard.
pub(super) fn decode_v2<T: DeserializeOwned>(raw: &[u8]) -> Result<T, String> {
    match raw.split_first() {
        Some((&FORMAT_V2, body)) => postcard::from_bytes(body).map_err(|e| e.to_string()),
        Some((b, _)) => Err(format!("unknown format byte {b:#04x}")),
        None => Err("empty value".into()),
    }
}

pub(super) fn encode_block(entries: &[BlockEntry]) -> Result<Vec<u8>, StoreError> {
    let mut out = vec![FORMAT_V2];
    postcard::to_io(entries, &mut out).map_err(|e| StoreError::Encode {
        tree: TREE_BLOCKS,
        key: String::new(),
        reason: e.to_string(),
    })?;
    Ok(out)
}

pub(super) fn stored_hour(b: &HourBucket) -> StoredHour {
    StoredHour {
        instances_started: b.instances_started,
        execs: b.execs,
        invocations: b.invocations,
        oom_kills: b.oom_kills,
        peak_bytes: b.peak_bytes,
    }
}

pub(super) fn bucket_of(hour_start_ms: u64, s: &StoredHour) -> HourBucket {
    HourBucket {
        hour_start_ms,
        instances_started: s.instances_started,
        execs: s.execs,
        invocations: s.invocations,
        oom_kills: s.oom_kills,
        peak_bytes: s.peak_bytes,
    }
}

pub(super) fn encode_hour(b: &HourBucket) -> Vec<u8> {
    let mut out = vec![FORMAT_V2];
    // Plain integers into a Vec: postcard cannot fail here.
    let _ = postcard::to_io(&stored_hour(b), &mut out);
    out
}

pub(super) fn hour_block_key(hour_start_ms: u64) -> [u8; 4] {
    u32::try_from(hour_start_ms / HOUR_MS)
        .unwrap_or(u32::MAX)
        .to_be_bytes()
}

pub(super) fn log_key(started_at_ms: u64, cgroup_id: u64) -> [u8; 16] {
    let mut k = [0u8; 16];
    k[..8].copy_from_slice(&started_at_ms.to_be_bytes());
    k[8..].copy_from_slice(&cgroup_id.to_be_bytes());
    k
}

pub(super) fn hour_log_key(hour_start_ms: u64, function_id: u32) -> [u8; 8] {
    // u32 hours since the epoch last until the year 491,937.
    let hour = u32::try_from(hour_start_ms / HOUR_MS).unwrap_or(u32::MAX);
    let mut k = [0u8; 8];
    k[..4].copy_from_slice(&hour.to_be_bytes());
    k[4..].copy_from_slice(&function_id.to_be_bytes());
    k
}

pub(super) fn quarantine_key(tree: &str, key: &[u8]) -> Vec<u8> {
    let mut k = tree.as_bytes().to_vec();
    k.push(0);
    k.extend_from_slice(key);
    k
}

pub(super) fn u64_of(b: &[u8]) -> u64 {
    let mut n = [0u8; 8];
    let len = b.len().min(8);
    n[8 - len..].copy_from_slice(&b[..len]);
    u64::from_be_bytes(n)
}

pub(super) fn u32_of(b: &[u8]) -> u32 {
    u32::try_from(u64_of(&b[..b.len().min(4)])).unwrap_or(u32::MAX)
}

/// A key of big-endian numbers as `n1/n2…`.
pub(super) fn display_numbers(key: &[u8]) -> String {
    match key.len() {
        16 => format!("{}/{}", u64_of(&key[..8]), u64_of(&key[8..])),
        8 => format!("{}/{}", u32_of(&key[..4]), u32_of(&key[4..])),
        _ => key.escape_ascii().to_string(),
    }
}

pub(super) fn display_text(key: &[u8]) -> String {
    String::from_utf8_lossy(key).into_owned()
}

pub(super) fn decode_json<T: DeserializeOwned>(
    tree: &'static str,
    key: &str,
    raw: &[u8],
) -> Result<T, StoreError> {
    serde_json::from_slice(raw).map_err(|e| StoreError::Corrupt {
        tree,
        key: key.to_string(),
        reason: e.to_string(),
    })
}

pub(super) fn encode_json<T: Serialize>(
    tree: &'static str,
    key: &[u8],
    value: &T,
) -> Result<Vec<u8>, StoreError> {
    serde_json::to_vec(value).map_err(|e| StoreError::Encode {
        tree,
        key: display_numbers(key),
        reason: e.to_string(),
    })
}

impl Store {
    /// The stored value of `rec`, and the ids of its function and parent directory.
    pub(super) fn encode_instance(
        &self,
        rec: &InstanceRecord,
    ) -> Result<(Vec<u8>, [u32; 2]), StoreError> {
        let (parent, leaf) = match rec.cgroup_path.rsplit_once('/') {
            Some((p, l)) => (p, l),
            None => ("", rec.cgroup_path.as_str()),
        };
        let stored = StoredInstance {
            function: self.intern(&rec.function)?,
            parent: self.intern(parent)?,
            leaf: leaf.to_owned(),
            instance: (rec.instance != leaf).then(|| rec.instance.clone()),
            ran_ms: rec.ended_at_ms.map(|e| e.saturating_sub(rec.started_at_ms)),
            execs: rec.execs,
            peak_bytes: rec.peak_bytes,
            peak_source: match rec.peak_source {
                PeakSource::None => 0,
                PeakSource::KernelWatermark => 1,
                PeakSource::ChargeEvents => 2,
                PeakSource::UseWatermark => 3,
                PeakSource::LifetimeWatermark => 4,
            },
            oom_kills: rec.oom_kills,
            max_bytes: rec.limits.max_bytes,
            high_bytes: rec.limits.high_bytes,
        };
        let mut out = vec![FORMAT_V2];
        postcard::to_io(&stored, &mut out).map_err(|e| StoreError::Encode {
            tree: TREE_LIVE,
            key: format!("{}/{}", rec.started_at_ms, rec.cgroup_id),
            reason: e.to_string(),
        })?;
        Ok((out, [stored.function, stored.parent]))
    }

    /// A live or tail record (key: start · cgroup id).
    pub(super) fn decode_instance(
        &self,
        key: &[u8],
        raw: &[u8],
    ) -> Result<InstanceRecord, StoreError> {
        let corrupt = |reason: String| StoreError::Corrupt {
            tree: TREE_LIVE,
            key: display_numbers(key),
            reason,
        };
        if key.len() != 16 {
            return Err(corrupt(format!("key of {} bytes, not 16", key.len())));
        }
        let stored = decode_v2::<StoredInstance>(raw).map_err(corrupt)?;
        self.record_of(u64_of(&key[..8]), u64_of(&key[8..]), stored, TREE_LIVE)
    }

    pub(super) fn record_of(
        &self,
        started_at_ms: u64,
        cgroup_id: u64,
        s: StoredInstance,
        tree: &'static str,
    ) -> Result<InstanceRecord, StoreError> {
        build_record(&self.strings(), started_at_ms, cgroup_id, s, tree)
    }

    /// An open hour bucket: (function, its id, bucket).
    pub(super) fn decode_hour(
        &self,
        key: &[u8],
        raw: &[u8],
    ) -> Result<(String, u32, HourBucket), StoreError> {
        let corrupt = |reason: String| StoreError::Corrupt {
            tree: TREE_HOURS_OPEN,
            key: display_numbers(key),
            reason,
        };
        if key.len() != 8 {
            return Err(corrupt(format!("key of {} bytes, not 8", key.len())));
        }
        let (hour, id) = (u32_of(&key[..4]), u32_of(&key[4..]));
        let s: StoredHour = decode_v2(raw).map_err(corrupt)?;
        let name = self
            .string(id)
            .ok_or_else(|| corrupt(format!("string id {id} is not in `{TREE_STRINGS}`")))?;
        Ok((
            name.to_string(),
            id,
            bucket_of(u64::from(hour) * HOUR_MS, &s),
        ))
    }

    pub(super) fn decode_hour_block(
        &self,
        hour_start_ms: u64,
        raw: &[u8],
    ) -> Result<Vec<(Arc<str>, HourBucket)>, StoreError> {
        let corrupt = |reason: String| StoreError::Corrupt {
            tree: TREE_HOUR_BLOCKS,
            key: hour_start_ms.to_string(),
            reason,
        };
        let entries: Vec<(u32, StoredHour)> = decode_v2(raw).map_err(corrupt)?;
        let strings = self.strings();
        entries
            .into_iter()
            .map(|(id, s)| {
                let name =
                    strings.by_id.get(&id).cloned().ok_or_else(|| {
                        corrupt(format!("string id {id} is not in `{TREE_STRINGS}`"))
                    })?;
                Ok((name, bucket_of(hour_start_ms, &s)))
            })
            .collect()
    }
}
