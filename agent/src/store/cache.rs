//! The result cache's pure parts: the key of a request (what makes two requests the same) and
//! the in-memory front that answers hot keys without a trip to SQLite.
//!
//! The key covers the model's name *and its file's sha256*, so a model update can never be
//! answered with an old model's result, and everything in a request that changes its outputs.

use std::num::NonZeroUsize;
use std::sync::{Arc, Mutex};

use models::Tensor;
use models::sha256::Sha256;
use serde_json::{Map, Value};

/// A cache key: sha256 of the canonical request.
pub type CacheKey = [u8; 32];

/// Request parameters that change only where or how a reply travels, never its outputs.
const TRANSPORT_PARAMETERS: &[&str] = &["reply_to", "cache", "budget_ms", "priority"];

/// The key of a request to `model` (name and file sha256) with decoded `inputs`, the output
/// selection and the parameters that shape the response (`top_k` given by the agent).
pub fn key(
    model: &str,
    model_sha256: &str,
    inputs: &[Tensor],
    outputs: Option<&[String]>,
    parameters: Option<&Map<String, Value>>,
    top_k: usize,
) -> CacheKey {
    let mut h = Sha256::new();
    h.update(b"tether-cache-v1\0");
    field(&mut h, model.as_bytes());
    field(&mut h, model_sha256.as_bytes());
    h.update((top_k as u64).to_le_bytes());
    let mut sorted: Vec<&Tensor> = inputs.iter().collect();
    sorted.sort_by(|a, b| a.name().cmp(b.name()));
    h.update((sorted.len() as u64).to_le_bytes());
    for t in sorted {
        field(&mut h, t.name().as_bytes());
        field(&mut h, t.datatype().as_str().as_bytes());
        h.update((t.shape().len() as u64).to_le_bytes());
        for d in t.shape() {
            h.update((*d as u64).to_le_bytes());
        }
        field(&mut h, &t.data().to_le_bytes());
    }
    match outputs {
        Some(names) => {
            let mut names: Vec<&String> = names.iter().collect();
            names.sort();
            h.update((names.len() as u64 + 1).to_le_bytes());
            for n in names {
                field(&mut h, n.as_bytes());
            }
        }
        None => h.update(0u64.to_le_bytes()),
    }
    // serde_json's Map is ordered by key, so this serialisation is canonical.
    let semantic: Map<String, Value> = parameters
        .map(|p| {
            p.iter()
                .filter(|(k, _)| !TRANSPORT_PARAMETERS.contains(&k.as_str()))
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect()
        })
        .unwrap_or_default();
    field(&mut h, &serde_json::to_vec(&semantic).unwrap_or_default());
    h.finalize()
}

/// Length-prefixed, so `("ab", "c")` and `("a", "bc")` differ.
fn field(h: &mut Sha256, bytes: &[u8]) {
    h.update((bytes.len() as u64).to_le_bytes());
    h.update(bytes);
}

/// A cached result in memory: the stored response and when it stops being valid.
#[derive(Debug, Clone)]
pub struct Cached {
    pub value: Arc<Vec<u8>>,
    pub expires_ms: i64,
}

/// The in-memory front: the most recently used results, shared by the inference workers,
/// bounded in entries and in bytes.
#[derive(Debug, Clone)]
pub struct Front {
    inner: Option<Arc<Mutex<Held>>>,
    max_bytes: usize,
}

#[derive(Debug)]
struct Held {
    lru: lru::LruCache<CacheKey, Cached>,
    bytes: usize,
}

impl Held {
    fn pop(&mut self, key: &CacheKey) {
        if let Some(c) = self.lru.pop(key) {
            self.bytes = self.bytes.saturating_sub(c.value.len());
        }
    }
}

impl Front {
    /// A front of at most `entries` results and `max_bytes` bytes of them; 0 for either means
    /// none.
    pub fn new(entries: usize, max_bytes: usize) -> Front {
        let held = |n| {
            Arc::new(Mutex::new(Held {
                lru: lru::LruCache::new(n),
                bytes: 0,
            }))
        };
        Front {
            inner: NonZeroUsize::new(entries)
                .filter(|_| max_bytes > 0)
                .map(held),
            max_bytes,
        }
    }

    /// The result for `key` if it is held and still valid at `now_ms`.
    pub fn get(&self, key: &CacheKey, now_ms: i64) -> Option<Arc<Vec<u8>>> {
        let inner = self.inner.as_ref()?;
        let mut held = inner.lock().unwrap_or_else(|p| p.into_inner());
        match held.lru.get(key) {
            Some(c) if c.expires_ms > now_ms => Some(c.value.clone()),
            Some(_) => {
                held.pop(key);
                None
            }
            None => None,
        }
    }

    /// Keeps `cached`, unless it is larger than a quarter of the bytes allowed; the least
    /// recently used results go to make room.
    pub fn put(&self, key: CacheKey, cached: Cached) {
        let Some(inner) = &self.inner else {
            return;
        };
        let mut held = inner.lock().unwrap_or_else(|p| p.into_inner());
        held.pop(&key);
        let size = cached.value.len();
        if size > self.max_bytes / 4 {
            return;
        }
        while held.bytes.saturating_add(size) > self.max_bytes {
            match held.lru.pop_lru() {
                Some((_, gone)) => held.bytes = held.bytes.saturating_sub(gone.value.len()),
                None => break,
            }
        }
        if let Some((_, gone)) = held.lru.push(key, cached) {
            held.bytes = held.bytes.saturating_sub(gone.value.len());
        }
        held.bytes = held.bytes.saturating_add(size);
    }

    pub fn clear(&self) {
        if let Some(inner) = &self.inner {
            let mut held = inner.lock().unwrap_or_else(|p| p.into_inner());
            held.lru.clear();
            held.bytes = 0;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn t(name: &str, data: Vec<f32>) -> Tensor {
        let n = data.len();
        Tensor::from_f32(name, vec![1, n], data).unwrap()
    }

    fn params(v: Value) -> Map<String, Value> {
        v.as_object().unwrap().clone()
    }

    #[test]
    fn the_key_depends_on_everything_that_changes_outputs() {
        let base = key("m", "sha-a", &[t("x", vec![1.0, 2.0])], None, None, 3);
        assert_eq!(
            base,
            key("m", "sha-a", &[t("x", vec![1.0, 2.0])], None, None, 3)
        );
        let variants = [
            key("n", "sha-a", &[t("x", vec![1.0, 2.0])], None, None, 3),
            key("m", "sha-b", &[t("x", vec![1.0, 2.0])], None, None, 3),
            key("m", "sha-a", &[t("x", vec![1.0, 2.5])], None, None, 3),
            key("m", "sha-a", &[t("y", vec![1.0, 2.0])], None, None, 3),
            key(
                "m",
                "sha-a",
                &[t("x", vec![1.0, 2.0])],
                Some(&["out".into()]),
                None,
                3,
            ),
            key("m", "sha-a", &[t("x", vec![1.0, 2.0])], None, None, 5),
            key(
                "m",
                "sha-a",
                &[t("x", vec![1.0, 2.0])],
                None,
                Some(&params(json!({"threshold": 0.5}))),
                3,
            ),
        ];
        for (i, v) in variants.iter().enumerate() {
            assert_ne!(&base, v, "variant {i} collides with the base key");
        }
        // The same tensor in another shape is another request.
        let reshaped = Tensor::from_f32("x", vec![2, 1], vec![1.0, 2.0]).unwrap();
        assert_ne!(base, key("m", "sha-a", &[reshaped], None, None, 3));
    }

    #[test]
    fn transport_parameters_and_input_order_do_not_change_the_key() {
        let a = key(
            "m",
            "s",
            &[t("a", vec![1.0]), t("b", vec![2.0])],
            None,
            Some(&params(
                json!({"reply_to": "x/y", "cache": true, "budget_ms": 5}),
            )),
            3,
        );
        let b = key(
            "m",
            "s",
            &[t("b", vec![2.0]), t("a", vec![1.0])],
            None,
            None,
            3,
        );
        assert_eq!(a, b);
    }

    #[test]
    fn the_front_forgets_expired_and_least_recently_used_entries() {
        let front = Front::new(2, 1 << 20);
        let c = |v: u8, exp| Cached {
            value: Arc::new(vec![v]),
            expires_ms: exp,
        };
        front.put([1; 32], c(1, 100));
        front.put([2; 32], c(2, 1000));
        assert_eq!(front.get(&[1; 32], 50).as_deref(), Some(&vec![1]));
        assert!(front.get(&[1; 32], 100).is_none(), "expired at 100");
        front.put([3; 32], c(3, 1000));
        front.get(&[2; 32], 0);
        front.put([4; 32], c(4, 1000));
        assert!(
            front.get(&[3; 32], 0).is_none(),
            "3 was the least recently used"
        );
        assert!(front.get(&[2; 32], 0).is_some());
        assert!(Front::new(0, 1 << 20).get(&[2; 32], 0).is_none());
    }

    #[test]
    fn the_front_holds_at_most_its_bytes_and_no_single_large_result() {
        let front = Front::new(100, 1000);
        let c = |len: usize| Cached {
            value: Arc::new(vec![7; len]),
            expires_ms: i64::MAX,
        };
        for k in 0..4u8 {
            front.put([k; 32], c(250));
        }
        assert!((0..4u8).all(|k| front.get(&[k; 32], 0).is_some()));
        // A fifth pushes out the least recently used (0 was read first, so it is).
        front.put([9; 32], c(250));
        assert!(front.get(&[0; 32], 0).is_none());
        assert_eq!(
            (1..4u8)
                .filter(|&k| front.get(&[k; 32], 0).is_some())
                .count()
                + usize::from(front.get(&[9; 32], 0).is_some()),
            4
        );
        // Over a quarter of the budget: not kept, and nothing pushed out for it.
        front.put([10; 32], c(251));
        assert!(front.get(&[10; 32], 0).is_none());
        assert!(front.get(&[9; 32], 0).is_some());
        // Replacing an entry counts its bytes once.
        for _ in 0..10 {
            front.put([9; 32], c(250));
        }
        assert!((1..4u8).all(|k| front.get(&[k; 32], 0).is_some()));
        assert!(Front::new(10, 0).get(&[9; 32], 0).is_none());
    }
}
