//! The one-time slot of a generated private key.
//!
//! When a create makes the key pair, the private key is handed to the
//! browser that asked, once: it waits here, in memory only, under the
//! session's id, until that session downloads it (then it is removed) or
//! for at most [`KEEP`]. It is never written to the database or to disk, so
//! a restart forgets it; the account's owner can then add a key of their
//! own in Settings (the API's create response is the other way to get one).

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// How long an undownloaded key waits.
pub const KEEP: Duration = Duration::from_secs(30 * 60);

#[derive(Default)]
pub struct KeySlots {
    slots: Mutex<HashMap<String, (String, Instant)>>,
}

impl KeySlots {
    fn locked(&self) -> std::sync::MutexGuard<'_, HashMap<String, (String, Instant)>> {
        self.slots.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn put(&self, session_id: &str, private_key: String) {
        let mut slots = self.locked();
        slots.retain(|_, (_, at)| at.elapsed() < KEEP);
        slots.insert(session_id.to_owned(), (private_key, Instant::now()));
    }

    /// Whether a key waits for this session.
    pub fn has(&self, session_id: &str) -> bool {
        self.locked()
            .get(session_id)
            .is_some_and(|(_, at)| at.elapsed() < KEEP)
    }

    /// The key, removed: a second call gets nothing.
    pub fn take(&self, session_id: &str) -> Option<String> {
        self.locked()
            .remove(session_id)
            .filter(|(_, at)| at.elapsed() < KEEP)
            .map(|(k, _)| k)
    }

    pub fn forget(&self, session_id: &str) {
        self.locked().remove(session_id);
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_key_is_handed_out_once() {
        let s = super::KeySlots::default();
        s.put("a", "KEY".into());
        assert!(s.has("a"));
        assert!(!s.has("b"));
        assert_eq!(s.take("a").as_deref(), Some("KEY"));
        assert!(!s.has("a"));
        assert_eq!(s.take("a"), None);
    }
}
