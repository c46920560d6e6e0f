//! The agent's identity: `meta/agent_id`, 32 lowercase hex digits drawn from the kernel's
//! random source at the store's first open and kept from then on. It names this agent's
//! series among a fleet's (`emars_agent_info{agent_id}`), so that an agent reading the fleet
//! back from Prometheus can leave its own out without anyone configuring a host name. A store
//! moved aside as corrupt takes its id with it: the fresh store gets a new one.

use super::{Store, StoreError, TREE_META};

pub(super) const KEY_AGENT_ID: &str = "agent_id";

/// Random bytes in an id (hex-encoded: 32 characters).
const ID_BYTES: usize = 16;

impl Store {
    /// This agent's id (see the module's doc).
    pub fn agent_id(&self) -> &str {
        &self.agent_id
    }

    /// The id kept in `meta`, or a new one written there (an id that does not read as one,
    /// which only a damaged store holds, is replaced rather than failing the open).
    pub(super) fn load_agent_id(&mut self) -> Result<(), StoreError> {
        if let Some(raw) = self.meta.get(KEY_AGENT_ID)? {
            if is_agent_id(&raw) {
                self.agent_id = String::from_utf8_lossy(&raw).into();
                return Ok(());
            }
            tracing::error!(
                "`{TREE_META}/{KEY_AGENT_ID}` is not an agent id ({}): a new one replaces it",
                raw.escape_ascii()
            );
        }
        let id = new_agent_id().map_err(|source| StoreError::AgentId { source })?;
        self.meta.insert(KEY_AGENT_ID, id.as_bytes())?;
        tracing::info!("this agent's id is {id} (new store)");
        self.agent_id = id.into();
        Ok(())
    }
}

fn is_agent_id(raw: &[u8]) -> bool {
    raw.len() == 2 * ID_BYTES && raw.iter().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

fn new_agent_id() -> std::io::Result<String> {
    let mut raw = [0u8; ID_BYTES];
    let mut filled = 0;
    while filled < raw.len() {
        filled +=
            rustix::rand::getrandom(&mut raw[filled..], rustix::rand::GetRandomFlags::empty())?;
    }
    Ok(raw.iter().map(|b| format!("{b:02x}")).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_id_is_made_once_and_survives_a_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("store");
        let first = {
            let s = Store::open(&path).unwrap();
            s.agent_id().to_owned()
        };
        assert!(is_agent_id(first.as_bytes()), "{first:?}");
        // After an unclean stop too (no checkpoint: the open reads the records).
        let again = Store::open_rebuilding(&path).unwrap();
        assert_eq!(again.agent_id(), first);
        drop(again);
        assert_eq!(Store::open(&path).unwrap().agent_id(), first);

        let other = tempfile::tempdir().unwrap();
        let theirs = Store::open(&other.path().join("store")).unwrap();
        assert_ne!(theirs.agent_id(), first, "each store draws its own id");
    }

    #[test]
    fn a_damaged_id_is_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("store");
        {
            let s = Store::open(&path).unwrap();
            s.meta.insert(KEY_AGENT_ID, &b"not-an-id"[..]).unwrap();
        }
        let s = Store::open(&path).unwrap();
        assert!(is_agent_id(s.agent_id().as_bytes()), "{}", s.agent_id());
    }
}
