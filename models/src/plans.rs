//! The per-model cache of specialised plans: bounded, least recently used out first, and one
//! build per key at a time (callers asking for a key being built wait for that build instead
//! of starting their own).
//!
//! Keys are whatever identifies a plan (a batch size, or the input shapes): clients choose
//! them, so the cache must neither grow without bound nor let the first shapes it saw keep
//! their places for good.

use std::collections::HashMap;
use std::hash::Hash;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock, RwLock};

/// A slot: the plan once built (or why it could not be), and when it was last used.
struct Slot<V> {
    value: OnceLock<Result<V, String>>,
    used: AtomicU64,
}

/// At most `capacity` plans by key.
pub struct PlanCache<K, V> {
    slots: RwLock<HashMap<K, Arc<Slot<V>>>>,
    clock: AtomicU64,
    capacity: usize,
}

impl<K, V> std::fmt::Debug for PlanCache<K, V> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PlanCache")
            .field("capacity", &self.capacity)
            .finish_non_exhaustive()
    }
}

impl<K: Hash + Eq + Clone, V: Clone> PlanCache<K, V> {
    pub fn new(capacity: usize) -> PlanCache<K, V> {
        PlanCache {
            slots: RwLock::new(HashMap::new()),
            clock: AtomicU64::new(0),
            capacity: capacity.max(1),
        }
    }

    /// The plan for `key`, built with `build` unless it is cached or being built. A failed
    /// build is remembered like a plan (the same shape fails the same way) until it is evicted.
    pub fn get_or_build(
        &self,
        key: &K,
        build: impl FnOnce() -> Result<V, String>,
    ) -> Result<V, String> {
        let now = self.clock.fetch_add(1, Ordering::Relaxed);
        let found = self
            .slots
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(key)
            .cloned();
        let slot = match found {
            Some(slot) => slot,
            None => {
                let mut slots = self.slots.write().unwrap_or_else(|p| p.into_inner());
                if !slots.contains_key(key) && slots.len() >= self.capacity {
                    let oldest = slots
                        .iter()
                        .min_by_key(|(_, s)| s.used.load(Ordering::Relaxed))
                        .map(|(k, _)| k.clone());
                    if let Some(k) = oldest {
                        slots.remove(&k);
                    }
                }
                slots
                    .entry(key.clone())
                    .or_insert_with(|| {
                        Arc::new(Slot {
                            value: OnceLock::new(),
                            used: AtomicU64::new(now),
                        })
                    })
                    .clone()
            }
        };
        slot.used.fetch_max(now, Ordering::Relaxed);
        // OnceLock runs one initialiser; concurrent callers for this key wait for it.
        slot.value.get_or_init(build).clone()
    }

    /// Forgets every plan (after the model moved to another runtime).
    pub fn clear(&self) {
        self.slots
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .clear();
    }

    pub fn len(&self) -> usize {
        self.slots.read().unwrap_or_else(|p| p.into_inner()).len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn contains(&self, key: &K) -> bool {
        self.slots
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .contains_key(key)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use std::sync::atomic::AtomicUsize;

    #[test]
    fn the_least_recently_used_plan_goes_first() {
        let cache: PlanCache<u32, u32> = PlanCache::new(3);
        let builds = AtomicUsize::new(0);
        let get = |k: u32| {
            cache
                .get_or_build(&k, || {
                    builds.fetch_add(1, Ordering::SeqCst);
                    Ok(k * 10)
                })
                .unwrap()
        };
        // (key asked for, keys cached afterwards, builds so far)
        let steps: [(u32, &[u32], usize); 7] = [
            (1, &[1], 1),
            (2, &[1, 2], 2),
            (3, &[1, 2, 3], 3),
            (1, &[1, 2, 3], 3), // a hit: 1 is now the most recent
            (4, &[1, 3, 4], 4), // 2 was least recently used
            (5, &[1, 4, 5], 5), // then 3
            (1, &[1, 4, 5], 5),
        ];
        for (i, (key, cached, built)) in steps.into_iter().enumerate() {
            assert_eq!(get(key), key * 10, "step {i}");
            assert_eq!(builds.load(Ordering::SeqCst), built, "step {i}: builds");
            assert_eq!(cache.len(), cached.len(), "step {i}");
            for k in cached {
                assert!(cache.contains(k), "step {i}: {k} cached");
            }
        }
    }

    #[test]
    fn early_odd_shapes_do_not_keep_a_later_common_shape_out() {
        let cache: PlanCache<u32, u32> = PlanCache::new(16);
        for odd in 100..116 {
            cache.get_or_build(&odd, || Ok(odd)).unwrap();
        }
        let builds = AtomicUsize::new(0);
        for _ in 0..50 {
            cache
                .get_or_build(&8, || {
                    builds.fetch_add(1, Ordering::SeqCst);
                    Ok(8)
                })
                .unwrap();
        }
        assert_eq!(
            builds.load(Ordering::SeqCst),
            1,
            "the common shape is planned once"
        );
    }

    #[test]
    fn concurrent_callers_share_one_build_and_a_failure_is_remembered() {
        let cache: Arc<PlanCache<u32, u32>> = Arc::new(PlanCache::new(4));
        let builds = Arc::new(AtomicUsize::new(0));
        let threads: Vec<_> = (0..8)
            .map(|_| {
                let (cache, builds) = (cache.clone(), builds.clone());
                std::thread::spawn(move || {
                    cache.get_or_build(&7, || {
                        builds.fetch_add(1, Ordering::SeqCst);
                        std::thread::sleep(std::time::Duration::from_millis(100));
                        Ok(70)
                    })
                })
            })
            .collect();
        for t in threads {
            assert_eq!(t.join().unwrap(), Ok(70));
        }
        assert_eq!(builds.load(Ordering::SeqCst), 1);
        let err = cache.get_or_build(&9, || Err("no plan".into()));
        assert_eq!(err, Err("no plan".to_owned()));
        assert_eq!(cache.get_or_build(&9, || Ok(1)), Err("no plan".to_owned()));
        cache.clear();
        assert!(cache.is_empty());
    }
}
