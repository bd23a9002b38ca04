//! Dynamic batching, one batcher task per model: take the first queued request, wait for a free
//! inference worker, gather more until `max_batch_size` rows or `max_queue_delay`, run them
//! as one call on a blocking thread, and hand each caller its own rows. When no other batch of
//! the model is running and nothing else is queued, the request runs at once: a lone request
//! never pays the queue delay.
//!
//! The queue is bounded: a full queue refuses at once (503), it never grows. A request whose
//! deadline passed while it waited is dropped before it runs (its caller has been answered 504
//! already, or is about to be). tract runs only on the blocking threads, never on the async
//! workers; a panic there answers the batch's callers `internal` (500), is counted, and leaves
//! the batcher serving.

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
    /// Past this, running the request is wasted work.
    deadline: Instant,
    reply: oneshot::Sender<Result<Result<Outcome, ModelError>, Refused>>,
}

/// Why a request was not run.
#[derive(Debug, PartialEq, Eq)]
pub enum Refused {
    QueueFull,
    Stopped,
    /// Its deadline passed before it could run.
    Expired,
    /// The engine panicked on the batch it was in.
    Panicked,
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

    /// Queues validated inputs (in model order) of `rows` rows, to run before `deadline`;
    /// waits for the outcome.
    pub async fn submit(
        &self,
        inputs: Vec<Tensor>,
        rows: usize,
        deadline: Instant,
    ) -> Result<Result<Outcome, ModelError>, Refused> {
        let (reply, rx) = oneshot::channel();
        let job = Job {
            inputs,
            rows,
            enqueued: Instant::now(),
            deadline,
            reply,
        };
        self.tx.try_send(job).map_err(|e| match e {
            mpsc::error::TrySendError::Full(_) => Refused::QueueFull,
            mpsc::error::TrySendError::Closed(_) => Refused::Stopped,
        })?;
        rx.await.map_err(|_| Refused::Stopped)?
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
    let live = |job: Job| -> Option<Job> {
        if job.deadline <= Instant::now() {
            metrics.expired.inc();
            let _ = job.reply.send(Err(Refused::Expired));
            None
        } else {
            Some(job)
        }
    };
    loop {
        let first = match carried.take() {
            Some(job) => job,
            None => match rx.recv().await {
                Some(job) => job,
                None => return,
            },
        };
        let Some(first) = live(first) else { continue };
        // Then a free worker: while all are busy, requests pile up and the next batch is full.
        // (Taking the permit before there is work would let idle models starve busy ones.)
        let Ok(permit) = workers.clone().acquire_owned().await else {
            return;
        };
        // The first request may have waited for the worker past its deadline.
        let Some(first) = live(first) else {
            drop(permit);
            continue;
        };
        let deadline = tokio::time::Instant::from_std(first.enqueued)
            .checked_add(cfg.max_queue_delay)
            .unwrap_or_else(tokio::time::Instant::now);
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
            let Some(job) = live(job) else { continue };
            if rows + job.rows > max_rows {
                carried = Some(job);
                break;
            }
            rows += job.rows;
            jobs.push(job);
        }
        let model = model.clone();
        let metrics = metrics.clone();
        let running_now = Running::start(running.clone());
        tokio::task::spawn_blocking(move || {
            let started = Instant::now();
            let (inputs, meta): (Vec<_>, Vec<_>) = jobs
                .into_iter()
                .map(|j| (j.inputs, (j.enqueued, j.reply)))
                .unzip();
            let results = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                model.infer_batch(inputs)
            }));
            let compute = started.elapsed();
            // Done computing: no longer running, and the worker is free, before any reply goes.
            // A requester answered first could otherwise send its next lone request while this
            // batch still counts as running, and that request would wait out the queue delay
            // for company that never comes.
            drop(running_now);
            drop(permit);
            metrics.observe_batch(model.name(), rows);
            let Ok(results) = results else {
                metrics.panics.inc();
                tracing::error!(model = %model.name(), rows, "The engine panicked on a batch; its requests are answered 500 and the model keeps serving.");
                for (_, reply) in meta {
                    let _ = reply.send(Err(Refused::Panicked));
                }
                return;
            };
            for (result, (enqueued, reply)) in results.into_iter().zip(meta) {
                let queue = started.saturating_duration_since(enqueued);
                let _ = reply.send(Ok(result.map(|outputs| Outcome {
                    outputs,
                    queue,
                    compute,
                    batch_rows: rows,
                })));
            }
        });
    }
}

/// One batch counted as running until dropped, whatever happens to it.
struct Running(Arc<AtomicUsize>);

impl Running {
    fn start(count: Arc<AtomicUsize>) -> Running {
        count.fetch_add(1, Ordering::AcqRel);
        Running(count)
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}
