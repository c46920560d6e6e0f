//! The agent's end of the kernel's event ring buffer, with the commit left to the caller.
//!
//! aya's `RingBuf` hands the kernel each record's room back as soon as the record is read.
//! EMARS reads a batch, applies it, and gives the room back (commits) only once the store has
//! made the batch's effects durable: the ring is pinned in bpffs, so an agent killed between
//! reading and saving leaves the records there, and the next agent reads them again. The
//! layout is the kernel's (kernel/bpf/ringbuf.c): a consumer page the reader writes, a
//! producer page, and the data pages mapped twice so that no record wraps.

use std::{
    os::fd::{AsFd as _, AsRawFd, RawFd},
    sync::atomic::{AtomicU32, AtomicU64, Ordering},
};

use aya::maps::MapData;

/// Record header bits (BPF_RINGBUF_BUSY_BIT, BPF_RINGBUF_DISCARD_BIT) and size.
const BUSY: u32 = 1 << 31;
const DISCARD: u32 = 1 << 30;
const HEADER: u64 = 8;

#[derive(Debug, thiserror::Error)]
pub enum RingError {
    #[error("reading the ring buffer's map info: {0}")]
    Info(String),
    #[error("ring buffer of {0} bytes: not a power-of-two number of pages")]
    Size(u64),
    #[error("mapping the ring buffer: {0}")]
    Mmap(std::io::Error),
}

struct Mapping {
    ptr: *mut libc::c_void,
    len: usize,
}

impl Mapping {
    fn new(fd: RawFd, len: usize, prot: libc::c_int, offset: usize) -> Result<Self, RingError> {
        // SAFETY: a fresh shared mapping of the map's fd; the kernel checks length and offset.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                prot,
                libc::MAP_SHARED,
                fd,
                offset as libc::off_t,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(RingError::Mmap(std::io::Error::last_os_error()));
        }
        Ok(Self { ptr, len })
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: our own mapping, unmapped once.
        unsafe { libc::munmap(self.ptr, self.len) };
    }
}

pub struct EventRing {
    map: MapData,
    consumer: Mapping,
    producer: Mapping,
    page: usize,
    mask: u64,
    /// Next record to read.
    read_pos: u64,
    /// What the kernel has been told it may reuse.
    committed: u64,
    /// This ring among all rings ever made: the boot and the kernel's map id.
    identity: String,
}

// SAFETY: the mappings are owned by this value and only touched through &mut self (reads of
// the kernel's side are atomic loads).
unsafe impl Send for EventRing {}

impl EventRing {
    pub fn new(map: MapData) -> Result<Self, RingError> {
        let info = map.info().map_err(|e| RingError::Info(e.to_string()))?;
        let size = u64::from(info.max_entries());
        // Positions count from 0 in each ring: a position means something only with the ring.
        let boot = std::fs::read_to_string("/proc/sys/kernel/random/boot_id").unwrap_or_default();
        let identity = format!("{}:{}", boot.trim(), info.id());
        // SAFETY: sysconf has no preconditions.
        let page = match unsafe { libc::sysconf(libc::_SC_PAGESIZE) } {
            n if n > 0 => n as usize,
            _ => 4096,
        };
        if !size.is_power_of_two() || size < page as u64 {
            return Err(RingError::Size(size));
        }
        let fd = map.fd().as_fd().as_raw_fd();
        let consumer = Mapping::new(fd, page, libc::PROT_READ | libc::PROT_WRITE, 0)?;
        let producer = Mapping::new(fd, page + 2 * size as usize, libc::PROT_READ, page)?;
        let mut ring = Self {
            map,
            consumer,
            producer,
            page,
            mask: size - 1,
            read_pos: 0,
            committed: 0,
            identity,
        };
        // Where the last reader (this agent's predecessor, for a pinned ring) left off.
        ring.committed = ring.consumer_pos().load(Ordering::Acquire);
        ring.read_pos = ring.committed;
        Ok(ring)
    }

    fn consumer_pos(&self) -> &AtomicU64 {
        // SAFETY: the first word of the consumer page, 8-byte aligned, shared with the kernel.
        unsafe { &*(self.consumer.ptr as *const AtomicU64) }
    }

    fn producer_pos(&self) -> &AtomicU64 {
        // SAFETY: the first word of the producer page.
        unsafe { &*(self.producer.ptr as *const AtomicU64) }
    }

    /// Hands every complete record not read yet to `f` with the position after it, in ring
    /// order, without giving their room back; returns how many were read.
    pub fn read(&mut self, mut f: impl FnMut(u64, &[u8])) -> usize {
        let (n, end) = self.walk(self.read_pos, &mut f);
        self.read_pos = end;
        n
    }

    /// How many complete records wait to be read, reading none.
    pub fn pending(&self) -> usize {
        self.walk(self.read_pos, &mut |_, _| {}).0
    }

    /// Hands `f` every complete record from position `from` on; returns how many, and the
    /// position after the last.
    fn walk(&self, from: u64, f: &mut impl FnMut(u64, &[u8])) -> (usize, u64) {
        let produced = self.producer_pos().load(Ordering::Acquire);
        // SAFETY: the data pages follow the producer page.
        let data = unsafe { (self.producer.ptr as *const u8).add(self.page) };
        let (mut n, mut pos) = (0, from);
        while pos < produced {
            let off = (pos & self.mask) as usize;
            // SAFETY: `off` is inside the first copy of the data pages; the header is 8-byte
            // aligned; the kernel publishes it with a release store.
            let head = unsafe { &*(data.add(off) as *const AtomicU32) }.load(Ordering::Acquire);
            if head & BUSY != 0 {
                // Reserved, not submitted yet: later records wait behind it.
                break;
            }
            let len = head & !(BUSY | DISCARD);
            let end = pos + (u64::from(len) + HEADER).next_multiple_of(8);
            if head & DISCARD == 0 {
                // SAFETY: the record lies in the doubly mapped area, so it never wraps.
                let rec = unsafe {
                    std::slice::from_raw_parts(data.add(off + HEADER as usize), len as usize)
                };
                f(end, rec);
                n += 1;
            }
            pos = end;
        }
        (n, pos)
    }

    /// The position after the last record read: what to commit once it is saved.
    pub fn position(&self) -> u64 {
        self.read_pos
    }

    /// Gives the kernel back the room of every record before `pos`.
    pub fn commit(&mut self, pos: u64) {
        let pos = pos.min(self.read_pos);
        if pos > self.committed {
            self.committed = pos;
            self.consumer_pos().store(pos, Ordering::Release);
        }
    }

    /// Which ring this is (boot id and map id): positions of another ring mean nothing here.
    pub fn identity(&self) -> &str {
        &self.identity
    }

    /// Bytes of the ring's data area.
    pub fn size(&self) -> u64 {
        self.mask + 1
    }

    /// Read and not yet committed.
    pub fn uncommitted(&self) -> u64 {
        self.read_pos - self.committed
    }
}

impl AsRawFd for EventRing {
    fn as_raw_fd(&self) -> RawFd {
        self.map.fd().as_fd().as_raw_fd()
    }
}
