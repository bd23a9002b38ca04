//! `[inference]`: the local workers and their queue.

use std::time::Duration;

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawInference {
    /// Inference worker threads (default: the number of cores). Real devices often keep one
    /// core for other work.
    pub workers: Option<usize>,
    /// Requests waiting for a worker; beyond this a request gets `overloaded` at once.
    pub queue: usize,
    /// Bytes of requests held at once (payloads and decoded inputs, queued, running or
    /// offloaded); beyond it the queue counts as full. Sized for a 512 MB device.
    pub queue_bytes: usize,
    /// Largest input tensor accepted, in elements.
    pub max_elements: usize,
    /// Classes listed in classifier replies.
    pub top_k: usize,
    /// Development only: hold every local inference to at least this many milliseconds, so a
    /// fast development machine behaves like a slow device (the demo and the offload tests use
    /// it). 0, the default, in production.
    pub emulated_service_ms: f64,
    /// The tract runtime: unset for the CPU, `cuda` on a Jetson (a build with --features cuda).
    pub runtime: Option<String>,
    /// Models built at start-up. Every other model's file is verified at start-up but built
    /// on its first request, so memory goes only to the models a device is asked for; list a
    /// model here when its first answer must meet its budget too (building ocr_det takes about
    /// 0.1 s on a desktop core, more on a Pi).
    pub preload: Vec<String>,
}

impl Default for RawInference {
    fn default() -> Self {
        RawInference {
            workers: None,
            queue: 64,
            queue_bytes: 32 << 20,
            max_elements: models::v2::DEFAULT_MAX_ELEMENTS,
            top_k: 3,
            emulated_service_ms: 0.0,
            runtime: None,
            preload: Vec::new(),
        }
    }
}

#[derive(Debug, Clone)]
pub struct InferenceConfig {
    pub workers: usize,
    pub queue: usize,
    pub queue_bytes: usize,
    pub max_elements: usize,
    pub top_k: usize,
    pub emulated_service: Duration,
    pub runtime: Option<String>,
    pub preload: Vec<String>,
}
