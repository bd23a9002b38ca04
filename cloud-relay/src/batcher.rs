//! Dynamic batching, one batcher task per model: take the first queued request, wait for a free
//! inference worker, gather more until `max_batch_size` rows or `max_queue_delay`, run them
//! as one call on a blocking thread, and hand each caller its own rows. When no other batch of
//! the model is running and nothing else is queued, the request runs at once: a lone request
//! never pays the queue delay.
//!
//! The queue is bounded: a full queue refuses at once (503), it never grows. tract runs only on
//! the blocking threads, never on the async workers.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use models::engine::LoadedModel;
use models::{ModelError, Tensor};
use tokio::sync::{Semaphore, mpsc, oneshot};

use crate::config::BatchConfig;
use crate::metrics::Metrics;

/// What a caller gets back.
#[derive(Debug)]
pub struct Outcome {
    pub outputs: Vec<Tensor>,
    pub queue: Duration,
    pub compute: Duration,
    /// Rows in the call this request was part of.
    pub batch_rows: usize,
}

struct Job {
    inputs: Vec<Tensor>,
    rows: usize,
    enqueued: Instant,
    reply: oneshot::Sender<Result<Outcome, ModelError>>,
}

/// Why a request could not be queued.
#[derive(Debug, PartialEq, Eq)]
pub enum Refused {
    QueueFull,
    Stopped,
}

/// The handle to one model's batcher.
#[derive(Debug, Clone)]
pub struct Batcher {
    tx: mpsc::Sender<Job>,
    max_rows: usize,
}

impl std::fmt::Debug for Job {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Job")
            .field("rows", &self.rows)
            .finish_non_exhaustive()
    }
}

impl Batcher {
    /// Starts the batcher task of a model. `workers` bounds inference calls across all models.
    pub fn spawn(
        model: Arc<LoadedModel>,
        cfg: BatchConfig,
        workers: Arc<Semaphore>,
        metrics: Arc<Metrics>,
    ) -> Batcher {
        let (tx, rx) = mpsc::channel(cfg.queue);
        let max_rows = if model.spec().batchable() {
            cfg.max_batch_size
        } else {
            1
        };
        tokio::spawn(run(rx, model, cfg, max_rows, workers, metrics));
        Batcher { tx, max_rows }
    }

    /// Queues validated inputs (in model order) of `rows` rows; waits for the outcome.
    pub async fn submit(
        &self,
        inputs: Vec<Tensor>,
        rows: usize,
    ) -> Result<Result<Outcome, ModelError>, Refused> {
        let (reply, rx) = oneshot::channel();
        let job = Job {
            inputs,
            rows,
            enqueued: Instant::now(),
            reply,
        };
        self.tx.try_send(job).map_err(|e| match e {
            mpsc::error::TrySendError::Full(_) => Refused::QueueFull,
            mpsc::error::TrySendError::Closed(_) => Refused::Stopped,
        })?;
        rx.await.map_err(|_| Refused::Stopped)
    }

    /// The largest batch this model's calls carry.
    pub fn max_rows(&self) -> usize {
        self.max_rows
    }
}

async fn run(
    mut rx: mpsc::Receiver<Job>,
    model: Arc<LoadedModel>,
    cfg: BatchConfig,
    max_rows: usize,
    workers: Arc<Semaphore>,
    metrics: Arc<Metrics>,
) {
    let mut carried: Option<Job> = None;
    // Batches of this model being computed right now.
    let running = Arc::new(AtomicUsize::new(0));
    loop {
        let first = match carried.take() {
            Some(job) => job,
            None => match rx.recv().await {
                Some(job) => job,
                None => return,
            },
        };
        // Then a free worker: while all are busy, requests pile up and the next batch is full.
        // (Taking the permit before there is work would let idle models starve busy ones.)
        let Ok(permit) = workers.clone().acquire_owned().await else {
            return;
        };
        let deadline = tokio::time::Instant::from_std(first.enqueued + cfg.max_queue_delay);
        let mut rows = first.rows;
        let mut jobs = vec![first];
        while rows < max_rows {
            let next = match rx.try_recv() {
                Ok(job) => Some(job),
                // Nothing else of this model is running: there is no load to batch with, and
                // waiting would only add the queue delay to a lone request.
                Err(mpsc::error::TryRecvError::Empty) if running.load(Ordering::Acquire) == 0 => {
                    None
                }
                Err(mpsc::error::TryRecvError::Empty) => {
                    // None once the first request has waited long enough.
                    tokio::time::timeout_at(deadline, rx.recv())
                        .await
                        .ok()
                        .flatten()
                }
                Err(mpsc::error::TryRecvError::Disconnected) => None,
            };
            let Some(job) = next else { break };
            if rows + job.rows > max_rows {
                carried = Some(job);
                break;
            }
            rows += job.rows;
            jobs.push(job);
        }
        let model = model.clone();
        let metrics = metrics.clone();
        let running_now = running.clone();
        running_now.fetch_add(1, Ordering::AcqRel);
        tokio::task::spawn_blocking(move || {
            let started = Instant::now();
            let (inputs, meta): (Vec<_>, Vec<_>) = jobs
                .into_iter()
                .map(|j| (j.inputs, (j.enqueued, j.reply)))
                .unzip();
            let results = model.infer_batch(inputs);
            let compute = started.elapsed();
            metrics.observe_batch(model.name(), rows);
            for (result, (enqueued, reply)) in results.into_iter().zip(meta) {
                let queue = started.saturating_duration_since(enqueued);
                let _ = reply.send(result.map(|outputs| Outcome {
                    outputs,
                    queue,
                    compute,
                    batch_rows: rows,
                }));
            }
            running_now.fetch_sub(1, Ordering::AcqRel);
            drop(permit);
        });
    }
}
