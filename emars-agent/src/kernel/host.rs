//! The host's memory, from /proc/meminfo (through procfs): the one place the agent reads it.
//! The policy receives these figures; it does not read them itself.

use procfs::Current as _;

/// MemTotal in bytes; u64::MAX when unreadable, so that no limit is refused for it.
pub fn memory_total_bytes() -> u64 {
    procfs::Meminfo::current()
        .map(|m| m.mem_total)
        .unwrap_or(u64::MAX)
}

/// MemAvailable in bytes (one read of /proc/meminfo); None when unreadable.
pub fn memory_available_bytes() -> Option<u64> {
    procfs::Meminfo::current().ok()?.mem_available
}

#[cfg(test)]
mod tests {
    #[test]
    fn host_memory_is_read() {
        assert!(super::memory_available_bytes().unwrap_or(0) > 0);
        assert!(super::memory_total_bytes() > 0);
    }
}
