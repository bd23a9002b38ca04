//! The requests seen lately, by identity (response topic and correlation data, or `reply_to`
//! and `id`): running now, or answered with this reply. The front stage asks it about every
//! request that has an identity; the answer path records each reply. Bounded in entries and
//! in reply bytes held: what does not fit in memory is read back from SQLite, where the store
//! keeps every remembered reply (so a restart keeps them too).

use std::num::NonZeroUsize;
use std::sync::{Arc, Weak};

use lru::LruCache;

use super::reply::Slot;

/// A de-duplication key.
pub(crate) type Key = [u8; 32];

#[derive(Debug)]
enum Entry {
    /// The first delivery is being answered: duplicates wait in its slot.
    Running(Weak<Slot>),
    /// Answered; the reply is in memory, or only in SQLite (`None`).
    Done {
        body: Option<Arc<Vec<u8>>>,
        expires_ms: i64,
    },
}

/// What is known of a request.
#[derive(Debug)]
pub(crate) enum Seen {
    /// Nothing: run it.
    New,
    /// Its first delivery is being answered.
    Running(Arc<Slot>),
    /// Answered with this reply.
    Done(Arc<Vec<u8>>),
    /// Answered; the reply is in SQLite.
    OnDisk,
}

/// The registry; behind a mutex in the pipeline's shared state.
#[derive(Debug)]
pub(crate) struct Registry {
    entries: LruCache<Key, Entry>,
    held_bytes: usize,
    max_bytes: usize,
}

impl Registry {
    pub(crate) fn new(max_entries: usize, max_bytes: usize) -> Registry {
        Registry {
            entries: LruCache::new(NonZeroUsize::new(max_entries).unwrap_or(NonZeroUsize::MIN)),
            held_bytes: 0,
            max_bytes,
        }
    }

    /// What is known of `key` at `now_ms`.
    pub(crate) fn seen(&mut self, key: &Key, now_ms: i64) -> Seen {
        let seen = match self.entries.get(key) {
            None => return Seen::New,
            Some(Entry::Running(slot)) => match slot.upgrade() {
                Some(slot) => return Seen::Running(slot),
                // The first delivery's slot is gone without an answer recorded.
                None => Seen::New,
            },
            Some(Entry::Done { expires_ms, .. }) if *expires_ms <= now_ms => Seen::New,
            Some(Entry::Done {
                body: Some(body), ..
            }) => return Seen::Done(body.clone()),
            Some(Entry::Done { body: None, .. }) => return Seen::OnDisk,
        };
        self.remove(key);
        seen
    }

    /// The first delivery of `key` is being answered in `slot`.
    pub(crate) fn running(&mut self, key: Key, slot: &Arc<Slot>) {
        self.put(key, Entry::Running(Arc::downgrade(slot)));
    }

    /// `key` was answered with `body`, remembered until `expires_ms`.
    pub(crate) fn complete(&mut self, key: Key, body: Arc<Vec<u8>>, expires_ms: i64) {
        let body = (self.held_bytes.saturating_add(body.len()) <= self.max_bytes).then_some(body);
        self.put(key, Entry::Done { body, expires_ms });
    }

    /// A reply remembered in SQLite (at start).
    pub(crate) fn on_disk(&mut self, key: Key, expires_ms: i64) {
        self.put(
            key,
            Entry::Done {
                body: None,
                expires_ms,
            },
        );
    }

    /// The first delivery of `key` was released unanswered: forget it.
    pub(crate) fn abandon(&mut self, key: &Key) {
        if let Some(Entry::Running(_)) = self.entries.peek(key) {
            self.remove(key);
        }
    }

    fn put(&mut self, key: Key, entry: Entry) {
        self.held_bytes = self.held_bytes.saturating_add(held(&entry));
        let old = self.entries.push(key, entry);
        if let Some((_, old)) = old {
            self.held_bytes = self.held_bytes.saturating_sub(held(&old));
        }
    }

    fn remove(&mut self, key: &Key) {
        if let Some(old) = self.entries.pop(key) {
            self.held_bytes = self.held_bytes.saturating_sub(held(&old));
        }
    }

    #[cfg(test)]
    fn held_bytes(&self) -> usize {
        self.held_bytes
    }
}

fn held(e: &Entry) -> usize {
    match e {
        Entry::Done {
            body: Some(body), ..
        } => body.len(),
        _ => 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn k(n: u8) -> Key {
        [n; 32]
    }

    #[test]
    fn done_entries_answer_until_they_expire() {
        let mut r = Registry::new(10, 1000);
        assert!(matches!(r.seen(&k(1), 0), Seen::New));
        r.complete(k(1), Arc::new(b"reply".to_vec()), 100);
        assert!(matches!(r.seen(&k(1), 99), Seen::Done(b) if b.as_slice() == b"reply"));
        assert!(matches!(r.seen(&k(1), 100), Seen::New), "expired");
        assert!(matches!(r.seen(&k(1), 0), Seen::New), "and forgotten");
        r.on_disk(k(2), 100);
        assert!(matches!(r.seen(&k(2), 50), Seen::OnDisk));
    }

    #[test]
    fn bodies_beyond_the_byte_bound_stay_on_disk_and_entries_are_bounded() {
        let mut r = Registry::new(2, 10);
        r.complete(k(1), Arc::new(vec![0; 8]), 100);
        r.complete(k(2), Arc::new(vec![0; 8]), 100);
        assert!(matches!(r.seen(&k(2), 0), Seen::OnDisk), "over 10 bytes");
        assert_eq!(r.held_bytes(), 8);
        r.complete(k(3), Arc::new(vec![0; 1]), 100);
        assert!(
            matches!(r.seen(&k(1), 0), Seen::New),
            "the least recent went"
        );
        assert_eq!(r.held_bytes(), 1);
    }

    #[test]
    fn an_abandoned_first_delivery_is_forgotten() {
        let mut r = Registry::new(10, 1000);
        r.abandon(&k(9));
        r.complete(k(1), Arc::new(vec![1]), 100);
        r.abandon(&k(1));
        assert!(
            matches!(r.seen(&k(1), 0), Seen::Done(_)),
            "only a running entry is abandoned"
        );
    }
}
