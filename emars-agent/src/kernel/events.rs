//! Decoding of the ring buffer records sent by emars-ebpf.

use emars_common::{EventHeader, EventKind, EVENT_HEADER_LEN, EVENT_NAME_LEN};

/// A kernel event, typed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KernelEvent {
    CgroupMkdir {
        id: u64,
        path: String,
        level: i32,
        /// The path filled the event's buffer: it may be cut short.
        truncated: bool,
    },
    /// `peak`: the in-kernel charge-event peak (0 without memcg events); `watermark`: the
    /// kernel's own watermark read as the cgroup went away (0 when the kernel layout is unknown).
    CgroupRmdir {
        id: u64,
        path: String,
        peak: u64,
        watermark: u64,
    },
    TaskAttach {
        id: u64,
        pid: u32,
    },
    Exec {
        id: u64,
        pid: u32,
        filename: String,
    },
    Exit {
        id: u64,
        pid: u32,
    },
    MemPeak {
        id: u64,
        peak: u64,
    },
    /// `id` is 0 when the kernel side did not know the victim's cgroup.
    OomVictim {
        id: u64,
        pid: u32,
    },
}

impl KernelEvent {
    /// The cgroup the event is about (0: not known to the kernel side).
    pub fn cgroup_id(&self) -> u64 {
        match self {
            KernelEvent::CgroupMkdir { id, .. }
            | KernelEvent::CgroupRmdir { id, .. }
            | KernelEvent::TaskAttach { id, .. }
            | KernelEvent::Exec { id, .. }
            | KernelEvent::Exit { id, .. }
            | KernelEvent::MemPeak { id, .. }
            | KernelEvent::OomVictim { id, .. } => *id,
        }
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DecodeError {
    #[error("record of {0} bytes is shorter than an event")]
    Short(usize),
    #[error("unknown event kind {0}")]
    Kind(u32),
}

/// A decoded event and its kernel timestamp (CLOCK_MONOTONIC ns).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Timed {
    pub ts_ns: u64,
    pub event: KernelEvent,
}

/// Decodes one record: an [`EventHeader`] and, for kinds with a name, the name after it.
pub fn decode(bytes: &[u8]) -> Result<Timed, DecodeError> {
    if bytes.len() < EVENT_HEADER_LEN {
        return Err(DecodeError::Short(bytes.len()));
    }
    // SAFETY: length checked; EventHeader is plain data; read_unaligned copes with any alignment.
    let ev: EventHeader = unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast()) };
    let tail = &bytes[EVENT_HEADER_LEN..];
    // Never past the record, whatever name_len says.
    let name_len = (ev.name_len as usize).min(tail.len());
    let name = || String::from_utf8_lossy(&tail[..name_len]).into_owned();
    let kind = EventKind::from_u32(ev.kind).ok_or(DecodeError::Kind(ev.kind))?;
    let id = ev.cgroup_id;
    let event = match kind {
        EventKind::CgroupMkdir => KernelEvent::CgroupMkdir {
            id,
            path: name(),
            level: ev.level,
            // The kernel copies at most EVENT_NAME_LEN - 1 bytes and a NUL.
            truncated: ev.name_len as usize >= EVENT_NAME_LEN - 1,
        },
        EventKind::CgroupRmdir => KernelEvent::CgroupRmdir {
            id,
            path: name(),
            peak: ev.value,
            watermark: ev.aux,
        },
        EventKind::TaskAttach => KernelEvent::TaskAttach { id, pid: ev.pid },
        EventKind::Exec => KernelEvent::Exec {
            id,
            pid: ev.pid,
            filename: name(),
        },
        EventKind::Exit => KernelEvent::Exit { id, pid: ev.pid },
        EventKind::MemPeak => KernelEvent::MemPeak { id, peak: ev.value },
        EventKind::OomVictim => KernelEvent::OomVictim { id, pid: ev.pid },
    };
    Ok(Timed {
        ts_ns: ev.ts_ns,
        event,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A record as the kernel side sends it: the header, then the name and its NUL (kinds
    /// without a name send the header alone).
    fn raw(kind: u32, name: &str) -> Vec<u8> {
        // As the kernel copies: at most EVENT_NAME_LEN - 1 bytes and a NUL.
        let n = name.len().min(EVENT_NAME_LEN - 1);
        let head = EventHeader {
            kind,
            pid: 42,
            cgroup_id: 7,
            value: 1 << 20,
            aux: 5,
            ts_ns: 99,
            hierarchy: 4,
            level: 2,
            _pad: 0,
            name_len: n as u32,
        };
        // SAFETY: EventHeader is plain data.
        let mut out = unsafe {
            std::slice::from_raw_parts((&head as *const EventHeader).cast::<u8>(), EVENT_HEADER_LEN)
        }
        .to_vec();
        if !name.is_empty() {
            out.extend_from_slice(&name.as_bytes()[..n]);
            out.push(0);
        }
        out
    }

    #[test]
    fn decodes_each_kind() {
        let t = decode(&raw(1, "/emars/f/1")).unwrap();
        assert_eq!(t.ts_ns, 99);
        assert_eq!(
            t.event,
            KernelEvent::CgroupMkdir {
                id: 7,
                path: "/emars/f/1".into(),
                level: 2,
                truncated: false,
            }
        );
        let long = format!("/emars/f/{}", "x".repeat(300));
        let t = decode(&raw(1, &long)).unwrap();
        let KernelEvent::CgroupMkdir {
            path, truncated, ..
        } = t.event
        else {
            panic!("not a mkdir: {t:?}");
        };
        assert!(truncated);
        assert_eq!(path.len(), EVENT_NAME_LEN - 1);
        assert_eq!(
            decode(&raw(2, "/x")).unwrap().event,
            KernelEvent::CgroupRmdir {
                id: 7,
                path: "/x".into(),
                peak: 1 << 20,
                watermark: 5
            }
        );
        assert_eq!(
            decode(&raw(6, "")).unwrap().event,
            KernelEvent::MemPeak {
                id: 7,
                peak: 1 << 20
            }
        );
        assert_eq!(decode(&raw(99, "")), Err(DecodeError::Kind(99)));
        assert_eq!(decode(&[0u8; 8]), Err(DecodeError::Short(8)));
        // Records are as long as what they carry.
        assert_eq!(raw(6, "").len(), EVENT_HEADER_LEN);
        assert_eq!(raw(1, "/emars/f/1").len(), EVENT_HEADER_LEN + 11);
    }

    #[test]
    fn name_len_is_clamped() {
        let mut b = raw(4, "/bin/sh");
        // Corrupt name_len to something huge: must not read past the record.
        let off = std::mem::offset_of!(EventHeader, name_len);
        b[off..off + 4].copy_from_slice(&u32::MAX.to_le_bytes());
        let KernelEvent::Exec { filename, .. } = decode(&b).unwrap().event else {
            panic!("not an exec");
        };
        // The whole record after the header, NUL included, and nothing beyond it.
        assert_eq!(filename, "/bin/sh\0");
    }
}
