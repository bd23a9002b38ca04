//! The observer: what happens to a local answer after its reply has gone. A share of answers is
//! audited (also asked of the relay's model) and a share runs through a shadow candidate; both
//! are compared and tallied per model version ([`crate::quality`]). It never delays a reply:
//! the worker hands the request on (never blocking; a full queue drops it, counted) and goes
//! back to its queue; shadow runs happen on the observer's own thread, audits on async tasks.
//!
//! What is chosen, and what is skipped when the device is over its limits, the relay is down,
//! audits are over their rate or requests wait (a shadow run takes only idle time), is
//! [`crate::quality::choose`].

use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use bytes::Bytes;
use models::Tensor;
use models::engine::LoadedModel;
use models::v2::InferenceResponse;

use super::{Arrival, Job, QueueProbe, Routing, Shared};
use crate::cloud::Cloud;
use crate::metrics::Metrics;
use crate::quality::{self, Conditions, Quality, Rates, TokenBucket, Top1};
use crate::store::{AuditRecord, StoreHandle, now_ms};

/// Observations waiting for the observer thread; more are dropped (counted).
const QUEUE: usize = 32;
/// Requests larger than this are not observed: the queue holds their inputs.
const MAX_OBSERVED_BYTES: usize = 1 << 20;
/// How long an audit waits for the relay.
const AUDIT_TIMEOUT: Duration = Duration::from_secs(10);

/// Puts the calling thread at the lowest scheduling priority (nice 19): shadow runs take the
/// CPU only when the request path leaves it idle. Linux sets nice per thread.
#[allow(
    unsafe_code,
    reason = "one FFI call with no pointers to manage: setpriority on the calling thread"
)]
fn lower_priority() {
    #[cfg(target_os = "linux")]
    {
        // SAFETY: setpriority takes plain integers; `who` 0 is the calling thread on Linux.
        let r = unsafe { libc::setpriority(libc::PRIO_PROCESS, 0, 19) };
        if r != 0 {
            tracing::debug!("The observer thread keeps its priority (setpriority failed).");
        }
    }
}

/// One audit counted in flight from its choice to its end, however it ends.
struct InFlight(Arc<AtomicUsize>);

impl InFlight {
    fn new(n: &Arc<AtomicUsize>) -> InFlight {
        n.fetch_add(1, Ordering::Relaxed);
        InFlight(n.clone())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A local answer to audit or shadow.
struct Observation {
    model: String,
    serving_version: String,
    labels: Arc<Vec<String>>,
    serving: Top1,
    inputs: Vec<Tensor>,
    body: Bytes,
    shadow: Option<Arc<LoadedModel>>,
    audit: Option<InFlight>,
}

/// The workers' side: chooses and hands on.
#[derive(Debug)]
pub(super) struct Observer {
    tx: flume::Sender<Observation>,
    bucket: Mutex<TokenBucket>,
    in_flight: Arc<AtomicUsize>,
    /// The local queue and the front stage's: what waits.
    queue: QueueProbe,
    arrivals: flume::WeakSender<Arrival>,
}

impl std::fmt::Debug for Observation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Observation")
            .field("model", &self.model)
            .finish_non_exhaustive()
    }
}

/// The observer thread.
pub(super) struct Stage {
    rx: flume::Receiver<Observation>,
    quality: Arc<Quality>,
    cloud: Option<Cloud>,
    runtime: tokio::runtime::Handle,
    store: StoreHandle,
    stop: Arc<AtomicBool>,
    /// Where a caught panic is counted at once (the status's `panics` sums every stage).
    metrics: Metrics,
}

/// Makes the observer's two sides.
pub(super) fn channel(
    queue: QueueProbe,
    arrivals: flume::WeakSender<Arrival>,
    routing: &Routing,
    store: StoreHandle,
    stop: Arc<AtomicBool>,
) -> (Observer, Stage) {
    let (tx, rx) = flume::bounded(QUEUE);
    (
        Observer {
            tx,
            bucket: Mutex::new(TokenBucket::new(0.0, 1.0)),
            in_flight: Arc::new(AtomicUsize::new(0)),
            queue,
            arrivals,
        },
        Stage {
            rx,
            quality: routing.quality.clone(),
            cloud: routing.cloud.clone(),
            runtime: routing.runtime.clone(),
            store,
            stop,
            metrics: routing.metrics.clone(),
        },
    )
}

/// Offers a local answer, already sent, for auditing and shadowing. Never blocks.
pub(super) fn offer(shared: &Shared, job: Job, response: &InferenceResponse) {
    let settings = shared.routing.live.get();
    let shadow = settings.shadows.get(&job.model);
    let rates = Rates {
        audit: settings.policy.audit_rate(&job.model),
        shadow: shadow.map_or(0.0, |s| s.share),
    };
    if rates.audit <= 0.0 && rates.shadow <= 0.0 {
        return;
    }
    let obs = &shared.observer;
    let quality = &shared.routing.quality;
    let queued = obs.queue.len();
    let arriving = obs.arrivals.upgrade().map_or(0, |a| a.len());
    let running = shared.routing.in_service.load(Ordering::Relaxed);
    let signals = shared.signals(&job.model, queued, false);
    let conditions = Conditions {
        over_limits: quality::over_limits(&settings.policy.policy, &signals),
        relay_up: quality::relay_up(signals.relay),
        audits_in_flight: obs.in_flight.load(Ordering::Relaxed),
        busy: queued + arriving > 0 || running >= shared.workers,
    };
    let choice = {
        let mut bucket = obs.bucket.lock().unwrap_or_else(|p| p.into_inner());
        let per_s = settings.policy.audit_max_per_s;
        if bucket.rate() != per_s {
            *bucket = TokenBucket::new(per_s, per_s.max(1.0));
        }
        quality::choose(
            rates,
            conditions,
            (fastrand::f64(), fastrand::f64()),
            &mut bucket,
            Instant::now(),
        )
    };
    if let Some(s) = choice.skipped {
        quality.counters.skipped(s);
    }
    if !(choice.audit || choice.shadow) {
        return;
    }
    let spec = job.prepared.model.spec();
    let labels = spec.labels.clone().unwrap_or_default();
    let Some(serving) = quality::top1_of(response, &labels) else {
        // Not a classifier: nothing to compare.
        return;
    };
    let body = job.prepared.body();
    if body.len() > MAX_OBSERVED_BYTES {
        quality.counters.dropped.fetch_add(1, Ordering::Relaxed);
        return;
    }
    let observation = Observation {
        model: job.model.clone(),
        serving_version: spec.version.clone(),
        labels: Arc::new(labels),
        serving,
        inputs: job.prepared.inputs,
        body,
        shadow: if choice.shadow {
            shadow.map(|s| s.model.clone())
        } else {
            None
        },
        audit: choice.audit.then(|| InFlight::new(&obs.in_flight)),
    };
    if obs.tx.try_send(observation).is_err() {
        quality.counters.dropped.fetch_add(1, Ordering::Relaxed);
    }
}

impl Stage {
    /// Starts the observer thread; it ends once `stop` is set and its queue is empty.
    pub(super) fn spawn(self) -> std::io::Result<JoinHandle<()>> {
        std::thread::Builder::new()
            .name("observe".into())
            .spawn(move || {
                lower_priority();
                self.run();
            })
    }

    fn run(self) {
        loop {
            match self.rx.recv_timeout(Duration::from_millis(100)) {
                Ok(o) => {
                    let model = o.model.clone();
                    if std::panic::catch_unwind(AssertUnwindSafe(|| self.process(o))).is_err() {
                        self.metrics.panic("observer");
                        self.quality.counters.panics.fetch_add(1, Ordering::Relaxed);
                        tracing::error!(model = %model, "An audit or shadow run panicked; it is dropped and the observer goes on.");
                    }
                }
                Err(flume::RecvTimeoutError::Timeout) => {
                    if self.stop.load(Ordering::Relaxed) {
                        return;
                    }
                }
                Err(flume::RecvTimeoutError::Disconnected) => return,
            }
        }
    }

    fn process(&self, o: Observation) {
        #[cfg(test)]
        if o.shadow
            .as_ref()
            .is_some_and(|m| m.spec().version == super::tests::PANIC_IN_OBSERVER)
        {
            panic!("a fault injected by a test, in the observer");
        }
        let counters = &self.quality.counters;
        let shadow = o.shadow.as_ref().and_then(|m| {
            let outcome = m
                .load()
                .and_then(|()| m.infer(o.inputs.clone()))
                .map(|outputs| m.top_k(&outputs, 1));
            match outcome {
                Ok(Some(rows)) => {
                    let (label, p) = rows.into_iter().next()?.into_iter().next()?;
                    counters.shadow_runs.fetch_add(1, Ordering::Relaxed);
                    let top = Top1 {
                        label,
                        probability: f64::from(p),
                    };
                    self.quality.compared(
                        &o.model,
                        &m.spec().version,
                        top.label == o.serving.label,
                    );
                    Some((m.spec().version.clone(), top))
                }
                Ok(None) => None,
                Err(e) => {
                    counters.shadow_failed.fetch_add(1, Ordering::Relaxed);
                    tracing::debug!(model = %o.model, error = %e, "A shadow run failed.");
                    None
                }
            }
        });
        let Some(in_flight) = o.audit else { return };
        let Some(cloud) = self.cloud.clone() else {
            return;
        };
        let quality = self.quality.clone();
        let store = self.store.clone();
        let (model, serving_version, serving, body, labels) =
            (o.model, o.serving_version, o.serving, o.body, o.labels);
        self.runtime.spawn(async move {
            let _in_flight = in_flight;
            let counters = &quality.counters;
            let cloud_top = match cloud.infer(&model, body, AUDIT_TIMEOUT).await {
                Ok(response) => quality::top1_of(&response, &labels),
                Err(e) => {
                    tracing::debug!(model = %model, error = %e, "An audit got no answer from the relay.");
                    None
                }
            };
            let Some(cloud_top) = cloud_top else {
                counters.audits_failed.fetch_add(1, Ordering::Relaxed);
                return;
            };
            counters.audits.fetch_add(1, Ordering::Relaxed);
            let ts_ms = now_ms();
            let mut records = Vec::with_capacity(2);
            let mut record = |version: &str, role: &'static str, local: &Top1| {
                quality.audited(&model, version, local.label == cloud_top.label);
                records.push(AuditRecord {
                    ts_ms,
                    model: model.clone(),
                    version: version.to_owned(),
                    role,
                    local_label: local.label.clone(),
                    local_p: local.probability,
                    cloud_label: cloud_top.label.clone(),
                    cloud_p: cloud_top.probability,
                });
            };
            record(&serving_version, "serving", &serving);
            if let Some((version, top)) = &shadow {
                record(version, "shadow", top);
            }
            store.audit_record(records);
        });
    }
}
