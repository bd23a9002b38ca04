//! The bytes of requests the pipeline holds (queued, running locally or waiting on the relay),
//! bounded: a device with 512 MB cannot hold `inference.queue` requests of `max_payload_bytes`
//! each. A request whose bytes would pass the bound finds the queue full, as a request past
//! its count does. A [`Permit`] gives its bytes back when dropped, whatever became of the
//! request.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use bytes::Bytes;
use models::Tensor;

/// The bound and what is held against it; cheap to clone.
#[derive(Debug, Clone)]
pub(crate) struct HeldBytes {
    held: Arc<AtomicUsize>,
    max: usize,
}

/// Bytes taken from a [`HeldBytes`], given back on drop.
#[derive(Debug)]
pub(crate) struct Permit {
    held: Arc<AtomicUsize>,
    bytes: usize,
}

impl HeldBytes {
    pub(crate) fn new(max: usize) -> HeldBytes {
        HeldBytes {
            held: Arc::new(AtomicUsize::new(0)),
            max,
        }
    }

    /// Takes `bytes`, unless that would pass the bound. One request alone may always be
    /// held (nothing else held): the payload limit bounds it already.
    pub(crate) fn try_take(&self, bytes: usize) -> Option<Permit> {
        self.held
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |held| {
                let after = held.checked_add(bytes)?;
                (held == 0 || after <= self.max).then_some(after)
            })
            .ok()
            .map(|_| Permit {
                held: self.held.clone(),
                bytes,
            })
    }

    /// Bytes held now.
    #[cfg(test)]
    pub(crate) fn held(&self) -> usize {
        self.held.load(Ordering::Acquire)
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        self.held.fetch_sub(self.bytes, Ordering::AcqRel);
    }
}

/// What a request holds in memory: the payload as received and its decoded inputs.
pub(crate) fn request_bytes(body: Option<&Bytes>, inputs: &[Tensor]) -> usize {
    inputs
        .iter()
        .map(|t| t.data().len().saturating_mul(t.datatype().size_of()))
        .fold(body.map_or(0, Bytes::len), usize::saturating_add)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn permits_are_bounded_and_given_back_on_drop() {
        let h = HeldBytes::new(100);
        let a = h.try_take(60).unwrap();
        assert!(h.try_take(41).is_none(), "60 + 41 passes 100");
        let b = h.try_take(40).unwrap();
        assert_eq!(h.held(), 100);
        assert!(h.try_take(1).is_none());
        drop(a);
        assert_eq!(h.held(), 40);
        drop(b);
        assert_eq!(h.held(), 0);
        // Alone, a request larger than the bound is still taken (the payload limit bounds it).
        let big = h.try_take(1000).unwrap();
        assert!(h.try_take(1).is_none());
        drop(big);
        assert!(h.try_take(usize::MAX).is_some(), "no overflow on the way");
        assert_eq!(h.held(), 0);
    }

    #[test]
    fn a_request_counts_its_payload_and_decoded_inputs() {
        let t = Tensor::from_f32("x", vec![2, 3], vec![0.0; 6]).unwrap();
        let body = Bytes::from_static(b"0123456789");
        assert_eq!(
            request_bytes(Some(&body), std::slice::from_ref(&t)),
            10 + 24
        );
        assert_eq!(request_bytes(None, &[]), 0);
    }
}
