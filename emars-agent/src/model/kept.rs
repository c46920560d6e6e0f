//! What the agent keeps of a live instance besides its record, so that a restarted agent goes
//! on where the last one stopped: the memory limit the container's runtime gave it, the burst
//! guard's watch (its fixed ceiling) and a squeeze's hold (what its release puts back). The
//! store keeps each in its `instance_state` tree under the instance's key and drops them when
//! the instance ends.

use serde::{de::DeserializeOwned, Deserialize, Serialize};

use crate::model::Limits;

/// One kind of kept state: its tag in the store's key, and its name for messages.
pub trait KeptState: Serialize + DeserializeOwned {
    const KIND: u8;
    const NAME: &'static str;
}

/// How the agent learned a container's runtime limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum RuntimeLimitSource {
    /// The runtime's metadata file (runc's state.json `config.cgroups.memory`, an OCI
    /// bundle's `linux.resources.memory.limit`), read when the instance opened.
    Metadata,
    /// memory.max as the agent found it when it first saw the cgroup, before writing into it.
    FirstSeen,
    /// memory.max written by another writer after the agent's own last write: a runtime that
    /// writes its limit after the mkdir (runc does), or `docker update`.
    LaterWrite,
}

/// The memory limit a container was given by its runtime (`docker run --memory`, a bundle's
/// `linux.resources.memory.limit`): the agent writes no memory.max above it unless
/// `policy.override_runtime_limits` is set.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct RuntimeLimit {
    pub bytes: u64,
    pub source: RuntimeLimitSource,
}

impl KeptState for RuntimeLimit {
    const KIND: u8 = 1;
    const NAME: &'static str = "runtime limit";
}

/// The burst guard's watch of an instance: raises stop at `ceiling_bytes`, set once when the
/// watch started (`ceiling_factor` x `base_bytes`, the function's recommended memory.max, else
/// the limit then in force), or by a later explicit write through the API; never by the
/// guard's own raises.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct BurstWatch {
    pub ceiling_bytes: u64,
    pub base_bytes: u64,
    pub since_ms: u64,
}

impl KeptState for BurstWatch {
    const KIND: u8 = 2;
    const NAME: &'static str = "burst watch";
}

/// A squeeze's hold on an instance: memory.high (v2) or the soft limit (v1) set to
/// `hold_bytes` at `taken_at_ms`; its release puts back `before`'s (memory.max where it had no
/// memory.high of its own). Kept, and made durable, before the hold is written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct SqueezeHold {
    pub before: Limits,
    pub hold_bytes: u64,
    pub taken_at_ms: u64,
}

impl SqueezeHold {
    /// The memory.high (soft limit) a release writes: the one before the hold, or, where there
    /// was none below the max, the max (a hold at memory.max holds nothing).
    pub fn release_to(&self) -> Option<u64> {
        self.before.high_bytes.or(self.before.max_bytes)
    }
}

impl KeptState for SqueezeHold {
    const KIND: u8 = 3;
    const NAME: &'static str = "squeeze hold";
}

/// Whether two limit values are the same to the kernel, which keeps limits in whole pages
/// (it rounds a written value down): a value read back against the one written.
pub fn same_limit(a: Option<u64>, b: Option<u64>) -> bool {
    let page = page_size();
    a.map(|v| v / page) == b.map(|v| v / page)
}

fn page_size() -> u64 {
    // SAFETY: sysconf has no preconditions.
    match unsafe { libc::sysconf(libc::_SC_PAGESIZE) } {
        n if n > 0 => n as u64,
        _ => 4096,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_compare_in_whole_pages() {
        let page = page_size();
        assert!(same_limit(Some(10 * page + 17), Some(10 * page)));
        assert!(!same_limit(Some(10 * page), Some(11 * page)));
        assert!(!same_limit(None, Some(page)));
        assert!(same_limit(None, None));
    }

    #[test]
    fn a_release_puts_back_high_else_max() {
        let hold = |high| SqueezeHold {
            before: Limits {
                max_bytes: Some(100),
                high_bytes: high,
            },
            hold_bytes: 10,
            taken_at_ms: 0,
        };
        assert_eq!(hold(Some(90)).release_to(), Some(90));
        assert_eq!(hold(None).release_to(), Some(100));
    }
}
