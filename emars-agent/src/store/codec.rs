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
    /// The bind's size hint (POST /v1/bind `input_bytes`). Not in the postcard body of a
    /// [`FORMAT_V2`] value: a record with a hint is written as [`FORMAT_V2_INPUT`], the hint
    /// after the body (see [`encode_instance_value`]), so that records without one, and every
    /// record written before hints existed, are the same bytes as before.
    #[serde(skip)]
    pub(super) input_bytes: Option<u64>,
    /// Kernel-counted connections and requests. Not in the postcard body either: a record
    /// with either above 0 is written as [`FORMAT_V2_COUNTS`], them after the body.
    #[serde(skip)]
    pub(super) connections: u64,
    #[serde(skip)]
    pub(super) requests: u64,
}

/// Format byte of an instance value or block that carries size hints: the [`FORMAT_V2`]
/// body, then postcard of the hint (a value) or of the list of hints in entry order (a block).
/// Values and blocks without a hint keep [`FORMAT_V2`], byte for byte.
pub(super) const FORMAT_V2_INPUT: u8 = 3;

/// Format byte of a value or block that carries kernel-counted connections and requests: the
/// [`FORMAT_V2`] body, then postcard of [`InstanceExtra`] (an instance value), of the list of
/// every entry's [`InstanceExtra`] in order (an instance block), of [`HourExtra`] (an open
/// hour) or of the list of every entry's [`HourExtra`] (an hour block). Values and blocks
/// without counts keep the format they had before counts existed, byte for byte.
pub(super) const FORMAT_V2_COUNTS: u8 = 4;

/// What a [`FORMAT_V2_COUNTS`] instance value or block entry carries after the body.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub(super) struct InstanceExtra {
    input_bytes: Option<u64>,
    connections: u64,
    requests: u64,
}

impl InstanceExtra {
    fn of(s: &StoredInstance) -> Self {
        InstanceExtra {
            input_bytes: s.input_bytes,
            connections: s.connections,
            requests: s.requests,
        }
    }

    fn set(self, s: &mut StoredInstance) {
        s.input_bytes = self.input_bytes;
        s.connections = self.connections;
        s.requests = self.requests;
    }
}

impl StoredInstance {
    fn has_counts(&self) -> bool {
        self.connections > 0 || self.requests > 0
    }
}

/// An instance value: [`FORMAT_V2`] + postcard, [`FORMAT_V2_INPUT`] + postcard + the hint,
/// or (with counts) [`FORMAT_V2_COUNTS`] + postcard + [`InstanceExtra`].
pub(super) fn encode_instance_value(stored: &StoredInstance) -> Result<Vec<u8>, String> {
    let format = if stored.has_counts() {
        FORMAT_V2_COUNTS
    } else if stored.input_bytes.is_some() {
        FORMAT_V2_INPUT
    } else {
        FORMAT_V2
    };
    let mut out = vec![format];
    postcard::to_io(stored, &mut out).map_err(|e| e.to_string())?;
    match (format, stored.input_bytes) {
        (FORMAT_V2_COUNTS, _) => {
            postcard::to_io(&InstanceExtra::of(stored), &mut out).map_err(|e| e.to_string())?;
        }
        (_, Some(input)) => {
            postcard::to_io(&input, &mut out).map_err(|e| e.to_string())?;
        }
        (_, None) => {}
    }
    Ok(out)
}

/// An instance value of any format ([`encode_instance_value`]).
pub(super) fn decode_instance_value(raw: &[u8]) -> Result<StoredInstance, String> {
    match raw.split_first() {
        Some((&FORMAT_V2, body)) => postcard::from_bytes(body).map_err(|e| e.to_string()),
        Some((&FORMAT_V2_INPUT, body)) => {
            let (mut stored, rest): (StoredInstance, _) =
                postcard::take_from_bytes(body).map_err(|e| e.to_string())?;
            let input: u64 = postcard::from_bytes(rest).map_err(|e| e.to_string())?;
            stored.input_bytes = Some(input);
            Ok(stored)
        }
        Some((&FORMAT_V2_COUNTS, body)) => {
            let (mut stored, rest): (StoredInstance, _) =
                postcard::take_from_bytes(body).map_err(|e| e.to_string())?;
            let extra: InstanceExtra = postcard::from_bytes(rest).map_err(|e| e.to_string())?;
            extra.set(&mut stored);
            Ok(stored)
        }
        Some((b, _)) => Err(format!("unknown format byte {b:#04x}")),
        None => Err("empty value".into()),
    }
}

/// What follows a block's entries, one per entry, in order: fewer or more is corruption.
fn decode_trailer<T: DeserializeOwned>(rest: &[u8], entries: usize) -> Result<Vec<T>, String> {
    let trailer: Vec<T> = postcard::from_bytes(rest).map_err(|e| e.to_string())?;
    if trailer.len() != entries {
        return Err(format!(
            "{} trailing entries for {entries} records",
            trailer.len()
        ));
    }
    Ok(trailer)
}

/// A block of any format: [`FORMAT_V2`] + postcard of the entries, [`FORMAT_V2_INPUT`] + the
/// same + postcard of every entry's hint, in order, or [`FORMAT_V2_COUNTS`] + the same +
/// postcard of every entry's [`InstanceExtra`], in order.
pub(super) fn decode_block(raw: &[u8]) -> Result<Vec<BlockEntry>, String> {
    match raw.split_first() {
        Some((&FORMAT_V2, body)) => postcard::from_bytes(body).map_err(|e| e.to_string()),
        Some((&FORMAT_V2_INPUT, body)) => {
            let (mut entries, rest): (Vec<BlockEntry>, _) =
                postcard::take_from_bytes(body).map_err(|e| e.to_string())?;
            let inputs: Vec<Option<u64>> = decode_trailer(rest, entries.len())?;
            for (e, input) in entries.iter_mut().zip(inputs) {
                e.record.input_bytes = input;
            }
            Ok(entries)
        }
        Some((&FORMAT_V2_COUNTS, body)) => {
            let (mut entries, rest): (Vec<BlockEntry>, _) =
                postcard::take_from_bytes(body).map_err(|e| e.to_string())?;
            let extras: Vec<InstanceExtra> = decode_trailer(rest, entries.len())?;
            for (e, extra) in entries.iter_mut().zip(extras) {
                extra.set(&mut e.record);
            }
            Ok(entries)
        }
        Some((b, _)) => Err(format!("unknown format byte {b:#04x}")),
        None => Err("empty value".into()),
    }
}

/// An hour bucket as the store holds it; the hour and the function are its key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub(super) struct StoredHour {
    pub(super) instances_started: u64,
    pub(super) execs: u64,
    pub(super) invocations: u64,
    pub(super) oom_kills: u64,
    pub(super) peak_bytes: u64,
    /// Kernel-counted connections and requests: after the body, under
    /// [`FORMAT_V2_COUNTS`], when either is above 0.
    #[serde(skip)]
    pub(super) connections: u64,
    #[serde(skip)]
    pub(super) requests: u64,
}

/// What a [`FORMAT_V2_COUNTS`] hour value or hour block entry carries after the body.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub(super) struct HourExtra {
    connections: u64,
    requests: u64,
}

impl StoredHour {
    fn extra(&self) -> HourExtra {
        HourExtra {
            connections: self.connections,
            requests: self.requests,
        }
    }

    fn has_counts(&self) -> bool {
        self.connections > 0 || self.requests > 0
    }

    fn set(&mut self, extra: HourExtra) {
        self.connections = extra.connections;
        self.requests = extra.requests;
    }
}

/// An open hour's value: [`FORMAT_V2`] + postcard, or (with counts) [`FORMAT_V2_COUNTS`] +
/// postcard + [`HourExtra`].
pub(super) fn encode_hour_value(s: &StoredHour) -> Vec<u8> {
    let counts = s.has_counts();
    let mut out = vec![if counts { FORMAT_V2_COUNTS } else { FORMAT_V2 }];
    // Plain integers into a Vec: postcard cannot fail here.
    let _ = postcard::to_io(s, &mut out);
    if counts {
        let _ = postcard::to_io(&s.extra(), &mut out);
    }
    out
}

pub(super) fn decode_hour_value(raw: &[u8]) -> Result<StoredHour, String> {
    match raw.split_first() {
        Some((&FORMAT_V2_COUNTS, body)) => {
            let (mut s, rest): (StoredHour, _) =
                postcard::take_from_bytes(body).map_err(|e| e.to_string())?;
            s.set(postcard::from_bytes(rest).map_err(|e| e.to_string())?);
            Ok(s)
        }
        _ => decode_v2(raw),
    }
}

/// An hour block: [`FORMAT_V2`] + postcard of (function id, [`StoredHour`]) entries, or (when
/// any has counts) [`FORMAT_V2_COUNTS`] + the same + postcard of every entry's [`HourExtra`].
pub(super) fn encode_hour_block(entries: &[(u32, StoredHour)]) -> Result<Vec<u8>, String> {
    let counts = entries.iter().any(|(_, h)| h.has_counts());
    let mut out = vec![if counts { FORMAT_V2_COUNTS } else { FORMAT_V2 }];
    postcard::to_io(entries, &mut out).map_err(|e| e.to_string())?;
    if counts {
        let extras: Vec<HourExtra> = entries.iter().map(|(_, h)| h.extra()).collect();
        postcard::to_io(&extras, &mut out).map_err(|e| e.to_string())?;
    }
    Ok(out)
}

pub(super) fn decode_hour_block_value(raw: &[u8]) -> Result<Vec<(u32, StoredHour)>, String> {
    match raw.split_first() {
        Some((&FORMAT_V2_COUNTS, body)) => {
            let (mut entries, rest): (Vec<(u32, StoredHour)>, _) =
                postcard::take_from_bytes(body).map_err(|e| e.to_string())?;
            let extras: Vec<HourExtra> = decode_trailer(rest, entries.len())?;
            for ((_, h), extra) in entries.iter_mut().zip(extras) {
                h.set(extra);
            }
            Ok(entries)
        }
        _ => decode_v2(raw),
    }
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
        input_bytes: s.input_bytes,
        connections: s.connections,
        requests: s.requests,
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
    let encode_error = |e: postcard::Error| StoreError::Encode {
        tree: TREE_BLOCKS,
        key: String::new(),
        reason: e.to_string(),
    };
    let counted = entries.iter().any(|e| e.record.has_counts());
    let hinted = entries.iter().any(|e| e.record.input_bytes.is_some());
    let format = match (counted, hinted) {
        (true, _) => FORMAT_V2_COUNTS,
        (false, true) => FORMAT_V2_INPUT,
        (false, false) => FORMAT_V2,
    };
    let mut out = vec![format];
    postcard::to_io(entries, &mut out).map_err(encode_error)?;
    if counted {
        let extras: Vec<InstanceExtra> = entries
            .iter()
            .map(|e| InstanceExtra::of(&e.record))
            .collect();
        postcard::to_io(&extras, &mut out).map_err(encode_error)?;
    } else if hinted {
        let inputs: Vec<Option<u64>> = entries.iter().map(|e| e.record.input_bytes).collect();
        postcard::to_io(&inputs, &mut out).map_err(encode_error)?;
    }
    Ok(out)
}

pub(super) fn stored_hour(b: &HourBucket) -> StoredHour {
    StoredHour {
        instances_started: b.instances_started,
        execs: b.execs,
        invocations: b.invocations,
        oom_kills: b.oom_kills,
        peak_bytes: b.peak_bytes,
        connections: b.connections,
        requests: b.requests,
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
        connections: s.connections,
        requests: s.requests,
    }
}

pub(super) fn encode_hour(b: &HourBucket) -> Vec<u8> {
    encode_hour_value(&stored_hour(b))
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
            input_bytes: rec.input_bytes,
            connections: rec.connections,
            requests: rec.requests,
        };
        let out = encode_instance_value(&stored).map_err(|reason| StoreError::Encode {
            tree: TREE_LIVE,
            key: format!("{}/{}", rec.started_at_ms, rec.cgroup_id),
            reason,
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
        let stored = decode_instance_value(raw).map_err(corrupt)?;
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
        let s = decode_hour_value(raw).map_err(corrupt)?;
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
        let entries = decode_hour_block_value(raw).map_err(corrupt)?;
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::test_util::{rec, MIB};
    use crate::store::BLOCK_RECORDS;

    /// The record as every build before size hints wrote it.
    #[derive(Serialize)]
    struct BeforeHints {
        function: u32,
        parent: u32,
        leaf: String,
        instance: Option<String>,
        ran_ms: Option<u64>,
        execs: u64,
        peak_bytes: u64,
        peak_source: u8,
        oom_kills: u64,
        max_bytes: Option<u64>,
        high_bytes: Option<u64>,
    }

    fn stored(input_bytes: Option<u64>) -> StoredInstance {
        StoredInstance {
            function: 3,
            parent: 4,
            leaf: "cg-1".into(),
            instance: Some("use-9".into()),
            ran_ms: Some(250),
            execs: 1,
            peak_bytes: 40 * MIB,
            peak_source: 3,
            oom_kills: 0,
            max_bytes: Some(64 * MIB),
            high_bytes: Some(60 * MIB),
            input_bytes,
            connections: 0,
            requests: 0,
        }
    }

    fn counted(input_bytes: Option<u64>, connections: u64, requests: u64) -> StoredInstance {
        StoredInstance {
            connections,
            requests,
            ..stored(input_bytes)
        }
    }

    fn before_hints() -> Vec<u8> {
        let old = BeforeHints {
            function: 3,
            parent: 4,
            leaf: "cg-1".into(),
            instance: Some("use-9".into()),
            ran_ms: Some(250),
            execs: 1,
            peak_bytes: 40 * MIB,
            peak_source: 3,
            oom_kills: 0,
            max_bytes: Some(64 * MIB),
            high_bytes: Some(60 * MIB),
        };
        let mut out = vec![FORMAT_V2];
        postcard::to_io(&old, &mut out).unwrap();
        out
    }

    /// Old values decode unchanged (no hint), and a record without a hint is still written
    /// byte for byte as before; one with a hint round-trips under its own format byte.
    #[test]
    fn values_before_hints_decode_and_are_written_unchanged() {
        let old = before_hints();
        assert_eq!(decode_instance_value(&old).unwrap(), stored(None));
        assert_eq!(encode_instance_value(&stored(None)).unwrap(), old);
        let hinted = encode_instance_value(&stored(Some(5 * MIB))).unwrap();
        assert_eq!(hinted[0], FORMAT_V2_INPUT);
        assert_eq!(
            hinted[1..old.len()],
            old[1..],
            "the hint only follows the body"
        );
        assert_eq!(
            decode_instance_value(&hinted).unwrap(),
            stored(Some(5 * MIB))
        );
        // Cut short: refused, not read as a record without a hint.
        assert!(decode_instance_value(&hinted[..hinted.len() - 1]).is_err());
        assert!(decode_instance_value(&[9, 0]).is_err());
    }

    #[test]
    fn blocks_keep_each_entrys_hint_and_old_blocks_decode() {
        let entry = |i: u64, input| BlockEntry {
            started_at_ms: 1_000 + i,
            cgroup_id: i,
            record: stored(input),
        };
        let plain = vec![entry(1, None), entry(2, None)];
        let bytes = encode_block(&plain).unwrap();
        assert_eq!(bytes[0], FORMAT_V2);
        let mut old = vec![FORMAT_V2];
        postcard::to_io(&plain, &mut old).unwrap();
        assert_eq!(bytes, old);
        let back = decode_block(&bytes).unwrap();
        assert!(back.iter().all(|e| e.record.input_bytes.is_none()));
        let mixed = vec![entry(1, None), entry(2, Some(MIB)), entry(3, Some(0))];
        let back = decode_block(&encode_block(&mixed).unwrap()).unwrap();
        let inputs: Vec<_> = back.iter().map(|e| e.record.input_bytes).collect();
        assert_eq!(inputs, [None, Some(MIB), Some(0)]);
    }

    /// Hints survive sealing into blocks and a rebuild of the model from the records, and
    /// reach the fit's samples (ended ones only).
    #[test]
    fn hints_survive_blocks_and_a_rebuild() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db");
        let n = BLOCK_RECORDS as u64 + 10;
        let mut written = Vec::new();
        {
            let s = Store::open(&path).unwrap();
            for i in 0..n {
                let mut r = rec("f", 1_000 + i * 10, i);
                r.input_bytes = (i % 2 == 0).then_some(i * MIB);
                r.peak_bytes = (i + 1) * MIB;
                r.ended_at_ms = Some(r.started_at_ms + 5);
                s.put_instance(&r).unwrap();
                written.push(r);
            }
            let mut live = rec("f", 900_000, 10_000);
            live.input_bytes = Some(7);
            s.put_instance(&live).unwrap();
            assert!(!s.state().index.blocks.is_empty(), "nothing was sealed");
            // No clean close: the next open rebuilds from the records.
        }
        let _ = std::fs::remove_file(path.join(super::super::CHECKPOINT_FILE));
        let s = Store::open(&path).unwrap();
        assert!(!s.opened_from_checkpoint());
        let back = s.instances("f").unwrap();
        assert_eq!(&back[..written.len()], &written[..]);
        assert_eq!(back.last().unwrap().input_bytes, Some(7));
        let mut samples: Vec<(u64, u64)> = s
            .sized_samples("f", usize::MAX)
            .unwrap()
            .iter()
            .map(|x| (x.input_bytes, x.peak_bytes))
            .collect();
        samples.sort_unstable();
        let expected: Vec<(u64, u64)> = written
            .iter()
            .filter_map(|r| r.input_bytes.map(|i| (i, r.peak_bytes)))
            .collect();
        assert_eq!(samples, expected);
        // The fit asks for the most recent few only.
        let recent: Vec<u64> = s
            .sized_samples("f", 3)
            .unwrap()
            .iter()
            .map(|x| x.input_bytes)
            .collect();
        let newest: Vec<u64> = expected.iter().rev().take(3).map(|e| e.0).collect();
        assert_eq!(recent, newest);
    }

    /// Counts go after the body under their own format byte, with or without a hint; a value
    /// without counts keeps the bytes it had before counts existed (both older formats).
    #[test]
    fn instance_values_with_counts_round_trip_and_others_are_unchanged() {
        let old = before_hints();
        let hinted_old = encode_instance_value(&stored(Some(5 * MIB))).unwrap();
        assert_eq!(hinted_old[0], FORMAT_V2_INPUT);
        for (input, connections, requests) in [(None, 1, 0), (None, 0, 1), (Some(5 * MIB), 3, 70)] {
            let value = counted(input, connections, requests);
            let bytes = encode_instance_value(&value).unwrap();
            assert_eq!(bytes[0], FORMAT_V2_COUNTS);
            assert_eq!(
                bytes[1..old.len()],
                old[1..],
                "the counts only follow the body"
            );
            assert_eq!(decode_instance_value(&bytes).unwrap(), value);
            assert!(decode_instance_value(&bytes[..bytes.len() - 1]).is_err());
        }
        assert_eq!(encode_instance_value(&counted(None, 0, 0)).unwrap(), old);
        let back = decode_instance_value(&hinted_old).unwrap();
        assert_eq!((back.connections, back.requests), (0, 0));
    }

    #[test]
    fn blocks_with_counts_keep_each_entrys_counts_and_others_are_unchanged() {
        let entry = |i: u64, record| BlockEntry {
            started_at_ms: 1_000 + i,
            cgroup_id: i,
            record,
        };
        // Blocks without counts: the bytes of before (plain and hinted).
        for block in [
            vec![entry(1, stored(None)), entry(2, stored(None))],
            vec![entry(1, stored(None)), entry(2, stored(Some(MIB)))],
        ] {
            let mut old = vec![if block[1].record.input_bytes.is_some() {
                FORMAT_V2_INPUT
            } else {
                FORMAT_V2
            }];
            postcard::to_io(&block, &mut old).unwrap();
            if old[0] == FORMAT_V2_INPUT {
                postcard::to_io(&vec![None, Some(MIB)], &mut old).unwrap();
            }
            assert_eq!(encode_block(&block).unwrap(), old);
        }
        let mixed = vec![
            entry(1, stored(None)),
            entry(2, counted(Some(MIB), 4, 0)),
            entry(3, counted(None, 5, 900)),
        ];
        let bytes = encode_block(&mixed).unwrap();
        assert_eq!(bytes[0], FORMAT_V2_COUNTS);
        let back: Vec<StoredInstance> = decode_block(&bytes)
            .unwrap()
            .into_iter()
            .map(|e| e.record)
            .collect();
        let expected: Vec<StoredInstance> = mixed.iter().map(|e| e.record.clone()).collect();
        assert_eq!(back, expected);
        // A trailer of another length than the entries is corruption.
        let mut short = vec![FORMAT_V2_COUNTS];
        postcard::to_io(&mixed, &mut short).unwrap();
        postcard::to_io(&vec![InstanceExtra::default()], &mut short).unwrap();
        assert!(decode_block(&short).is_err());
    }

    fn hour(connections: u64, requests: u64) -> StoredHour {
        StoredHour {
            instances_started: 1,
            execs: 2,
            invocations: 3,
            oom_kills: 4,
            peak_bytes: 5 * MIB,
            connections,
            requests,
        }
    }

    /// The hour as every build before counts wrote it: five varints behind 0x02.
    fn hour_before_counts() -> Vec<u8> {
        let mut out = vec![FORMAT_V2];
        postcard::to_io(&(1u64, 2u64, 3u64, 4u64, 5 * MIB), &mut out).unwrap();
        out
    }

    #[test]
    fn hour_values_and_blocks_with_counts_round_trip_and_others_are_unchanged() {
        let old = hour_before_counts();
        assert_eq!(decode_hour_value(&old).unwrap(), hour(0, 0));
        assert_eq!(encode_hour_value(&hour(0, 0)), old);
        for (c, r) in [(1, 0), (0, 1), (40, 70)] {
            let bytes = encode_hour_value(&hour(c, r));
            assert_eq!(bytes[0], FORMAT_V2_COUNTS);
            assert_eq!(bytes[1..old.len()], old[1..]);
            assert_eq!(decode_hour_value(&bytes).unwrap(), hour(c, r));
            assert!(decode_hour_value(&bytes[..bytes.len() - 1]).is_err());
        }
        let plain = vec![(7u32, hour(0, 0)), (9, hour(0, 0))];
        let old_fields = (1u64, 2u64, 3u64, 4u64, 5 * MIB);
        let mut old_block = vec![FORMAT_V2];
        // A list (length first), as the block's Vec is written.
        postcard::to_io(
            &vec![(7u32, old_fields), (9u32, old_fields)],
            &mut old_block,
        )
        .unwrap();
        assert_eq!(encode_hour_block(&plain).unwrap(), old_block);
        assert_eq!(decode_hour_block_value(&old_block).unwrap(), plain);
        let mixed = vec![(7u32, hour(0, 0)), (9, hour(2, 30))];
        let bytes = encode_hour_block(&mixed).unwrap();
        assert_eq!(bytes[0], FORMAT_V2_COUNTS);
        assert_eq!(decode_hour_block_value(&bytes).unwrap(), mixed);
        assert!(decode_hour_block_value(&bytes[..bytes.len() - 1]).is_err());
    }

    /// Kernel counts survive sealing into instance and hour blocks and a rebuild of the model
    /// from the records (no checkpoint), and reach the summary, the hours and the export.
    #[test]
    fn counts_survive_blocks_and_a_rebuild() {
        use crate::model::{HourDelta, RequestSource};
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db");
        let n = BLOCK_RECORDS as u64 + 10;
        let mut written = Vec::new();
        let (summary, hours) = {
            let s = Store::open(&path).unwrap();
            for i in 0..n {
                let mut r = rec("f", 1_000 + i * 10, i);
                r.requests = i % 3 * 10;
                r.connections = i % 3;
                r.ended_at_ms = Some(r.started_at_ms + 5);
                s.put_instance(&r).unwrap();
                written.push(r);
            }
            let mut live = rec("f", 900_000, 10_000);
            (live.connections, live.requests) = (2, 7);
            s.put_instance(&live).unwrap();
            assert!(!s.state().index.blocks.is_empty(), "nothing was sealed");
            for h in 0..5u64 {
                let delta = HourDelta {
                    execs: 1,
                    connections: h,
                    requests: 10 * h,
                    ..HourDelta::default()
                };
                s.add_hour("f", h * HOUR_MS, delta).unwrap();
            }
            assert!(!s.state().index.sealed_hours.is_empty(), "no hour sealed");
            (s.function("f").unwrap().unwrap(), s.hours("f").unwrap())
        };
        assert_eq!(
            summary.connections,
            written.iter().map(|r| r.connections).sum::<u64>() + 2
        );
        assert_eq!(
            summary.requests,
            written.iter().map(|r| r.requests).sum::<u64>() + 7
        );
        assert_eq!(summary.requests_source, RequestSource::KernelRequests);
        assert_eq!(summary.requests_per_hour, 40);
        let _ = std::fs::remove_file(path.join(super::super::CHECKPOINT_FILE));
        let s = Store::open(&path).unwrap();
        assert!(!s.opened_from_checkpoint());
        let back = s.instances("f").unwrap();
        assert_eq!(&back[..written.len()], &written[..]);
        assert_eq!(s.hours("f").unwrap(), hours);
        assert_eq!(s.function("f").unwrap().unwrap(), summary);
        // And from a checkpoint.
        s.checkpoint().unwrap();
        drop(s);
        let s = Store::open(&path).unwrap();
        assert!(s.opened_from_checkpoint());
        assert_eq!(s.hours("f").unwrap(), hours);
        assert_eq!(s.function("f").unwrap().unwrap(), summary);
        let export = s.export().unwrap();
        assert_eq!(
            (export[0].requests_per_hour, export[0].requests_source),
            (40, RequestSource::KernelRequests)
        );
    }
}
