//! Interned strings: function names and cgroup parent directories by id (`strings`), both ways,
//! in memory and on disk. Retention takes them out ([`super::prune`]).

use std::collections::HashMap;
use std::sync::{Arc, MutexGuard};

use super::codec::u32_of;
use super::{Store, StoreError};

/// Function names and cgroup parent paths by id, both ways.
#[derive(Debug, Default)]
pub(super) struct Strings {
    pub(super) ids: HashMap<Arc<str>, u32>,
    pub(super) by_id: HashMap<u32, Arc<str>>,
    pub(super) next: u32,
}

impl Store {
    pub(super) fn load_strings(&self) -> Result<(), StoreError> {
        let mut s = self.strings();
        for item in self.strings_tree.iter() {
            let (key, raw) = item?;
            let id = u32_of(&key);
            let text: Arc<str> = Arc::from(String::from_utf8_lossy(&raw).as_ref());
            s.ids.insert(text.clone(), id);
            s.by_id.insert(id, text);
            s.next = s.next.max(id.saturating_add(1));
        }
        Ok(())
    }

    /// The id of `text`, added to `strings` if new.
    pub(super) fn intern(&self, text: &str) -> Result<u32, StoreError> {
        let mut s = self.strings();
        if let Some(id) = s.ids.get(text) {
            return Ok(*id);
        }
        // Ids go up and wrap (strings are removed with retention): the next one not in use.
        let mut id = s.next;
        while s.by_id.contains_key(&id) {
            id = id.wrapping_add(1);
        }
        // Written before any record that uses it: sled recovers writes in order.
        self.strings_tree
            .insert(id.to_be_bytes(), text.as_bytes())?;
        let text: Arc<str> = Arc::from(text);
        s.ids.insert(text.clone(), id);
        s.by_id.insert(id, text);
        s.next = id.wrapping_add(1);
        Ok(id)
    }

    pub(super) fn string(&self, id: u32) -> Option<Arc<str>> {
        self.strings().by_id.get(&id).cloned()
    }

    pub(super) fn strings(&self) -> MutexGuard<'_, Strings> {
        self.strings.lock().unwrap_or_else(|p| p.into_inner())
    }
}
