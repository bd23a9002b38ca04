//! The request pipeline: the intake (called by an MQTT driver for every request, never
//! blocking), a bounded queue, and the inference worker threads that answer each request from
//! the result cache or the model, write the reply to the outbox and only then acknowledge the
//! request to the broker.
//!
//! Each request is routed as it arrives, by [`crate::policy::decide`]: to the local queue, to the
//! relay (an async task, never a worker), or refused at once with `overloaded`. A worker takes a
//! request only while its budget lasts, answers it from the cache or the model, and may
//! escalate a low-confidence answer to the relay's model.
//!
//! A full queue answers `overloaded` at once. A request is acknowledged once its reply is
//! committed to the outbox, so a crash before that means the broker delivers it again, and a
//! crash after it means the reply is sent when the agent is back.
//! Acknowledgements go out in the order the requests arrived, as MQTT requires of QoS 1
//! (MQTT-4.6.0-2), however the workers finish: rumqttd refuses out-of-order acks.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use models::engine::LoadedModel;
use models::v2::{InferenceRequest, InferenceResponse};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use tokio::sync::watch;

use crate::cloud::{Cloud, CloudError};
use crate::config::{HistoryConfig, HistoryInputs, InferenceConfig};
use crate::infer::run_decoded;
use crate::live::{Live, Settings};
use crate::monitor::Load;
use crate::mqtt::{Client, Incoming};
use crate::policy::{self, Reason, Relay, Route, Signals};
use crate::protocol::{ErrorCode, ErrorReply, ReplyRoute, Topics, reply_route};
use crate::store::outbox::OutMessage;
use crate::store::{HistoryRecord, StoreHandle, cache, now_ms};

/// One MQTT connection as the pipeline sees it: the client to reply and acknowledge through,
/// and the order its requests arrived in.
#[derive(Debug)]
pub struct Link {
    client: Client,
    acks: Mutex<AckOrder>,
}

/// Releases acknowledgements in arrival order: request `n` is acknowledged only once every
/// request before it has been.
#[derive(Debug, Default)]
struct AckOrder {
    issued: u64,
    next: u64,
    /// Finished requests waiting for earlier ones; `None` means "nothing to acknowledge".
    done: BTreeMap<u64, Option<Incoming>>,
}

impl Link {
    pub fn new(client: Client) -> Arc<Link> {
        Arc::new(Link {
            client,
            acks: Mutex::new(AckOrder::default()),
        })
    }

    fn ticket(&self) -> u64 {
        let mut acks = self.acks.lock().unwrap_or_else(|p| p.into_inner());
        acks.issued += 1;
        acks.issued - 1
    }

    /// Marks a request finished; with `ack` false it stays unacknowledged (for redelivery).
    fn finish(&self, ticket: u64, publish: Incoming, ack: bool) {
        let mut acks = self.acks.lock().unwrap_or_else(|p| p.into_inner());
        acks.done.insert(ticket, ack.then_some(publish));
        loop {
            let next = acks.next;
            let Some(done) = acks.done.remove(&next) else {
                break;
            };
            acks.next += 1;
            if let Some(p) = done
                && let Err(e) = self.client.try_ack(&p)
            {
                tracing::warn!(error = %e, "Could not queue an acknowledgement; the request will be delivered again.");
            }
        }
    }
}

/// One request waiting for a worker.
#[derive(Debug)]
pub struct Job {
    publish: Incoming,
    ticket: u64,
    link: Arc<Link>,
    model: String,
    received: Instant,
    /// When the request's latency budget runs out.
    deadline: Instant,
    budget: Duration,
    /// Why it is here (the policy's reason, or `offload_failed`).
    reason: Reason,
    /// The request as the front stage parsed it.
    prepared: Prepared,
    /// Where its reply goes.
    route: ReplyRoute,
}

/// A request parsed, validated and looked up in the cache by the front stage.
#[derive(Debug)]
struct Prepared {
    request: InferenceRequest,
    /// The model it runs on, fixed at admission: a model switched meanwhile does not matter.
    model: Arc<LoadedModel>,
    inputs: Vec<models::Tensor>,
    /// The cache key and how long a result stays, when the result is to be cached.
    cache: Option<(cache::CacheKey, Duration)>,
}

/// A request on its way to the front stage.
#[derive(Debug)]
struct Arrival {
    publish: Incoming,
    ticket: u64,
    model: String,
    received: Instant,
    intake: Intake,
}

/// Recent local service times per model, for the policy's estimates.
#[derive(Debug, Default)]
pub struct ServiceTimes {
    inner: Mutex<HashMap<String, VecDeque<f64>>>,
}

/// Service times kept per model.
const SERVICE_WINDOW: usize = 128;

impl ServiceTimes {
    pub fn record(&self, model: &str, ms: f64) {
        let mut inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let w = inner.entry(model.to_owned()).or_default();
        if w.len() == SERVICE_WINDOW {
            w.pop_front();
        }
        w.push_back(ms);
    }

    /// The moving p50 and p95, once the model has run.
    pub fn percentiles(&self, model: &str) -> (Option<f64>, Option<f64>) {
        let inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let Some(w) = inner.get(model).filter(|w| !w.is_empty()) else {
            return (None, None);
        };
        let mut v: Vec<f64> = w.iter().copied().collect();
        drop(inner);
        v.sort_by(f64::total_cmp);
        (
            Some(models::stats::percentile(&v, 0.5)),
            Some(models::stats::percentile(&v, 0.95)),
        )
    }
}

/// What routing needs, shared by the intakes and the workers.
#[derive(Debug, Clone)]
pub struct Routing {
    /// The models, policy and cache rules in force (the fleet may switch them).
    pub live: Live,
    /// Local runs since start, for the fleet's health check after a switch.
    pub health: Arc<RunCounters>,
    pub cloud: Option<Cloud>,
    pub load_rx: watch::Receiver<Load>,
    pub times: Arc<ServiceTimes>,
    /// Requests a worker is running now.
    pub in_service: Arc<AtomicUsize>,
    pub runtime: tokio::runtime::Handle,
    pub metrics: crate::metrics::Metrics,
}

impl Routing {
    fn relay(&self, model: &str) -> Relay {
        match &self.cloud {
            Some(c) => c.relay_signal(model, Instant::now()),
            None => Relay::None,
        }
    }
}

/// Local model runs that answered and that failed, counted since start.
#[derive(Debug, Default)]
pub struct RunCounters {
    ok: AtomicUsize,
    failed: AtomicUsize,
}

impl RunCounters {
    fn count(&self, ok: bool) {
        let c = if ok { &self.ok } else { &self.failed };
        c.fetch_add(1, Ordering::Relaxed);
    }

    /// (answered, failed) so far.
    pub fn read(&self) -> (usize, usize) {
        (
            self.ok.load(Ordering::Relaxed),
            self.failed.load(Ordering::Relaxed),
        )
    }
}

type JobsTx = Arc<Mutex<Option<flume::Sender<Job>>>>;

/// The side of the pipeline an MQTT driver calls, one per connection.
#[derive(Debug, Clone)]
pub struct Intake {
    topics: Topics,
    max_payload_bytes: usize,
    link: Arc<Link>,
    /// `None` once shutdown began: new requests are left unacknowledged, for redelivery.
    jobs_tx: JobsTx,
    store: StoreHandle,
    routing: Routing,
    queue_capacity: usize,
    workers: usize,
    device_id: String,
    front_tx: flume::Sender<Arrival>,
    front: Arc<FrontContext>,
    closing: Arc<std::sync::atomic::AtomicBool>,
}

/// What the front stage needs to parse requests and answer from the cache.
#[derive(Debug)]
struct FrontContext {
    top_k: usize,
}

impl Intake {
    /// Takes one incoming publish. Never blocks.
    pub fn dispatch(&self, publish: Incoming) {
        let ticket = self.link.ticket();
        let Ok(topic) = std::str::from_utf8(&publish.topic) else {
            tracing::warn!("Ignored a message whose topic is not UTF-8.");
            return self.link.finish(ticket, publish, true);
        };
        let Some(model) = self.topics.model_of(topic).map(str::to_owned) else {
            tracing::warn!(%topic, "Ignored a message on a topic that is not a request topic.");
            return self.link.finish(ticket, publish, true);
        };
        if publish.payload.len() > self.max_payload_bytes {
            let error = format!(
                "the request is {} bytes, over this agent's limit of {} bytes (mqtt.max_payload_bytes)",
                publish.payload.len(),
                self.max_payload_bytes
            );
            return self.refuse(ticket, publish, &model, ErrorCode::BadRequest, &error);
        }
        if self.closing.load(Ordering::Relaxed) {
            // Shutting down: not acknowledged, so the broker delivers it again later.
            return self.link.finish(ticket, publish, false);
        }
        let arrival = Arrival {
            publish,
            ticket,
            model,
            received: Instant::now(),
            intake: self.clone(),
        };
        if let Err(flume::TrySendError::Full(a) | flume::TrySendError::Disconnected(a)) =
            self.front_tx.try_send(arrival)
        {
            let error = "the agent cannot take more requests now (its front queue is full); retry later or send to another device";
            self.routing.metrics.routed("reject", Reason::QueueFull);
            self.refuse_inner(
                a.ticket,
                a.publish,
                &a.model,
                ErrorCode::Overloaded,
                error,
                Some(Reason::QueueFull),
            );
        }
    }

    /// The front stage's work on one request (on the front thread): parse and validate it,
    /// answer it from the cache, or route it.
    fn admit(&self, a: Arrival) {
        let Arrival {
            publish,
            ticket,
            model,
            received,
            ..
        } = a;
        // One snapshot of the live settings for the whole admission.
        let settings = self.routing.live.get();
        let prepared = match self.prepare(&settings, &publish.payload, &model) {
            Ok(p) => p,
            Err((code, error, id)) => {
                let route = early_route(&self.topics, &publish, &model);
                let body = ErrorReply {
                    id: id.as_deref(),
                    error: &error,
                    code,
                    reason: None,
                }
                .to_json();
                return self.reply_blocking(ticket, publish, route, body);
            }
        };
        let params = prepared.request.parameters.as_ref();
        let reply_to = params
            .and_then(|p| p.get("reply_to"))
            .and_then(Value::as_str)
            .map(str::to_owned);
        let budget_param = params
            .and_then(|p| p.get("budget_ms"))
            .and_then(Value::as_f64);
        let budget = match (budget_param, publish.expiry_secs) {
            (Some(ms), _) if ms.is_finite() && ms > 0.0 => Duration::from_secs_f64(ms / 1e3),
            (_, Some(secs)) if secs > 0 => Duration::from_secs(u64::from(secs)),
            _ => settings.policy.budget_for(&model),
        };
        let route = reply_route(
            publish.response_topic.as_deref(),
            publish.correlation.as_deref(),
            reply_to.as_deref(),
            self.topics.default_reply(&model),
        );
        let job = Job {
            publish,
            ticket,
            link: self.link.clone(),
            model,
            received,
            deadline: received + budget,
            budget,
            reason: Reason::Cached,
            prepared,
            route,
        };
        // The cache first: a hit never waits behind the model.
        if let Some((key, _)) = &job.prepared.cache
            && let Some(value) = self.store.cache_get(key, now_ms())
        {
            match serde_json::from_slice::<InferenceResponse>(&value) {
                Ok(mut response) => {
                    response.id = job.prepared.request.id.clone();
                    self.routing.metrics.routed("cache", Reason::Cached);
                    let body = finish_response(
                        &self.routing.metrics,
                        response,
                        "cache",
                        Reason::Cached,
                        &self.device_id,
                        &job,
                        None,
                    );
                    return self.reply_job(job, body);
                }
                Err(e) => {
                    tracing::warn!(error = %e, model = %job.model, "A cached result does not parse; running the model.");
                }
            }
        }
        let Some(jobs_tx) = self
            .jobs_tx
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
        else {
            return self.link.finish(job.ticket, job.publish, false);
        };
        let signals = self.signals(&job.model, jobs_tx.len());
        let left_ms = job
            .deadline
            .saturating_duration_since(Instant::now())
            .as_secs_f64()
            * 1e3;
        let decision = policy::decide(&settings.policy.policy, &signals, left_ms);
        let job = Job {
            reason: decision.reason,
            ..job
        };
        match decision.route {
            Route::Reject => {
                let error = match decision.reason {
                    Reason::QueueFull => "the agent's inference queue is full and the relay cannot take the request; retry later or send to another device".to_owned(),
                    _ => format!(
                        "answering locally would take about {:.0} ms, over the request's budget of {} ms, and the relay cannot take it; retry later, raise budget_ms, or send to another device",
                        decision.local_estimate_ms,
                        job.budget.as_millis()
                    ),
                };
                self.routing.metrics.routed("reject", decision.reason);
                let body = ErrorReply {
                    id: job.prepared.request.id.as_deref(),
                    error: &error,
                    code: ErrorCode::Overloaded,
                    reason: Some(decision.reason.as_str()),
                }
                .to_json();
                self.reply_job(job, body);
            }
            Route::Cloud => self.offload(job),
            Route::Local => self.enqueue(&jobs_tx, job),
        }
    }

    /// Parses, validates and keys a request. Errors carry the code, a sentence and the id.
    #[allow(clippy::type_complexity)]
    fn prepare(
        &self,
        settings: &Settings,
        payload: &[u8],
        model_name: &str,
    ) -> Result<Prepared, (ErrorCode, String, Option<String>)> {
        let request = InferenceRequest::from_json(payload)
            .map_err(|e| (ErrorCode::BadRequest, e.to_string(), None))?;
        let fail =
            |e: models::ModelError| (ErrorCode::from(e.code()), e.to_string(), request.id.clone());
        let model = settings.engine.model(model_name).map_err(fail)?.clone();
        let inputs = request.decode_inputs(model.max_elements()).map_err(fail)?;
        let bypass = request
            .parameters
            .as_ref()
            .and_then(|p| p.get("cache"))
            .and_then(Value::as_bool)
            == Some(false);
        let cache = settings
            .cache
            .ttl_for(model.name())
            .filter(|_| !bypass)
            .map(|ttl| {
                let outputs: Option<Vec<String>> = request
                    .outputs
                    .as_ref()
                    .map(|o| o.iter().map(|o| o.name.clone()).collect());
                let key = cache::key(
                    model.name(),
                    model.sha256(),
                    &inputs,
                    outputs.as_deref(),
                    request.parameters.as_ref(),
                    self.front.top_k,
                );
                (key, ttl)
            });
        Ok(Prepared {
            request,
            model,
            inputs,
            cache,
        })
    }

    fn reply_job(&self, job: Job, body: Vec<u8>) {
        reply_blocking(&self.store, job, body);
    }

    /// Writes a reply to the outbox from a thread (waiting for room in the store's queue); the
    /// request is acknowledged once it is committed.
    fn reply_blocking(&self, ticket: u64, publish: Incoming, route: ReplyRoute, body: Vec<u8>) {
        if let Some(tx) = publish.local_reply() {
            let _ = tx.send(body);
            return self.link.finish(ticket, publish, true);
        }
        self.store.append(
            OutMessage::reply(route, body),
            acknowledge(self.link.clone(), ticket, publish),
        );
    }

    fn enqueue(&self, jobs_tx: &flume::Sender<Job>, job: Job) {
        match jobs_tx.try_send(job) {
            Ok(()) => {}
            Err(flume::TrySendError::Full(job)) => {
                let error =
                    "the agent's inference queue is full; retry later or send to another device";
                self.routing.metrics.routed("reject", Reason::QueueFull);
                self.refuse_with(job, ErrorCode::Overloaded, error, Some(Reason::QueueFull));
            }
            Err(flume::TrySendError::Disconnected(job)) => {
                self.link.finish(job.ticket, job.publish, false);
            }
        }
    }

    /// Sends a request to the relay on a task of its own; on failure it runs locally while
    /// its budget allows.
    fn offload(&self, job: Job) {
        let Some(cloud) = self.routing.cloud.clone() else {
            let jobs_tx = self
                .jobs_tx
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .clone();
            return match jobs_tx {
                Some(tx) => self.enqueue(&tx, job),
                None => self.link.finish(job.ticket, job.publish, false),
            };
        };
        let intake = self.clone();
        self.routing.runtime.spawn(async move {
            let remaining = job.deadline.saturating_duration_since(Instant::now());
            let result = cloud
                .infer(&job.model, job.publish.payload.clone(), remaining)
                .await;
            match result {
                Ok(response) => {
                    intake.routing.metrics.routed("cloud", job.reason);
                    let body = finish_response(&intake.routing.metrics, response,
                        "cloud",
                        job.reason,
                        &intake.device_id,
                        &job,
                        None,
                    );
                    reply_async(&intake.store, job, body).await;
                }
                Err(CloudError::Refused { message, .. }) => {
                    let error = format!("the relay refused the request: {message}");
                    intake.routing.metrics.routed("cloud", job.reason);
                    let body = ErrorReply {
                        id: None,
                        error: &error,
                        code: ErrorCode::BadRequest,
                        reason: None,
                    }
                    .to_json();
                    reply_async(&intake.store, job, body).await;
                }
                Err(e) => {
                    tracing::debug!(error = %e, model = %job.model, "Offload failed; trying locally.");
                    let left = job.deadline.saturating_duration_since(Instant::now());
                    let local =
                        policy::local_estimate_ms(&intake.signals(&job.model, intake.queued()));
                    let jobs_tx = intake.jobs_tx.lock().unwrap_or_else(|p| p.into_inner()).clone();
                    match jobs_tx {
                        Some(tx) if local <= left.as_secs_f64() * 1e3 => {
                            let job = Job {
                                reason: Reason::OffloadFailed,
                                ..job
                            };
                            intake.enqueue(&tx, job);
                        }
                        _ => {
                            let error = format!(
                                "the relay could not answer ({e}) and running locally would miss the request's budget of {} ms; retry later",
                                job.budget.as_millis()
                            );
                            intake.routing.metrics.routed("reject", Reason::OffloadFailed);
                            let body = ErrorReply {
                                id: None,
                                error: &error,
                                code: ErrorCode::Overloaded,
                                reason: Some(Reason::OffloadFailed.as_str()),
                            }
                            .to_json();
                            reply_async(&intake.store, job, body).await;
                        }
                    }
                }
            }
        });
    }

    /// What the policy knows about `model` now, with `queued` requests waiting for a worker.
    fn signals(&self, model: &str, queued: usize) -> Signals {
        let load = *self.routing.load_rx.borrow();
        let (p50, p95) = self.routing.times.percentiles(model);
        Signals {
            local_p50_ms: p50,
            local_p95_ms: p95,
            queue_depth: queued + self.routing.in_service.load(Ordering::Relaxed),
            queue_capacity: self.queue_capacity + self.workers,
            workers: self.workers,
            cpu_percent: load.cpu_percent,
            temperature_c: load.temperature_c,
            throttled: load.throttled,
            relay: self.routing.relay(model),
        }
    }

    fn queued(&self) -> usize {
        self.jobs_tx
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
            .map_or(0, flume::Sender::len)
    }

    fn refuse_with(&self, job: Job, code: ErrorCode, error: &str, reason: Option<Reason>) {
        let Job {
            publish,
            ticket,
            model,
            ..
        } = job;
        self.refuse_inner(ticket, publish, &model, code, error, reason);
    }

    /// Replies with a coded error at once, from the driver's task: the reply goes to the
    /// outbox without waiting, and the request is acknowledged once it is committed.
    fn refuse(&self, ticket: u64, publish: Incoming, model: &str, code: ErrorCode, error: &str) {
        self.refuse_inner(ticket, publish, model, code, error, None);
    }

    fn refuse_inner(
        &self,
        ticket: u64,
        publish: Incoming,
        model: &str,
        code: ErrorCode,
        error: &str,
        reason: Option<Reason>,
    ) {
        tracing::debug!(%model, ?code, %error, "Request refused.");
        let route = early_route(&self.topics, &publish, model);
        let body = ErrorReply {
            id: None,
            error,
            code,
            reason: reason.map(Reason::as_str),
        }
        .to_json();
        if let Some(tx) = publish.local_reply() {
            let _ = tx.send(body);
            return self.link.finish(ticket, publish, true);
        }
        self.store.try_append(
            OutMessage::reply(route, body),
            acknowledge(self.link.clone(), ticket, publish),
        );
    }
}

/// Writes a job's reply to the outbox from a thread (waiting for room in the store's queue);
/// the request is acknowledged once the reply is committed.
fn reply_blocking(store: &StoreHandle, job: Job, body: Vec<u8>) {
    let Job {
        publish,
        ticket,
        link,
        route,
        ..
    } = job;
    if let Some(tx) = publish.local_reply() {
        let _ = tx.send(body);
        return link.finish(ticket, publish, true);
    }
    store.append(
        OutMessage::reply(route, body),
        acknowledge(link, ticket, publish),
    );
}

/// [`reply_blocking`] from an async task.
async fn reply_async(store: &StoreHandle, job: Job, body: Vec<u8>) {
    let Job {
        publish,
        ticket,
        link,
        route,
        ..
    } = job;
    if let Some(tx) = publish.local_reply() {
        let _ = tx.send(body);
        return link.finish(ticket, publish, true);
    }
    store
        .append_async(
            OutMessage::reply(route, body),
            acknowledge(link, ticket, publish),
        )
        .await;
}

/// What to do once a reply is stored: acknowledge its request, or leave it for redelivery.
fn acknowledge(link: Arc<Link>, ticket: u64, publish: Incoming) -> crate::store::Done {
    Box::new(move |stored| {
        if let Err(e) = &stored {
            tracing::warn!(error = %e, "Could not store a reply; the request will be delivered again.");
        }
        link.finish(ticket, publish, stored.is_ok());
    })
}

/// What the intake reads of a request without building a JSON tree of its tensors (it runs
/// on the MQTT driver's task).
#[derive(Debug, Default, serde::Deserialize)]
struct Probe {
    reply_to: Option<String>,
}

impl Probe {
    fn read(payload: &[u8]) -> Probe {
        #[derive(serde::Deserialize)]
        struct Outer {
            parameters: Option<Probe>,
        }
        serde_json::from_slice::<Outer>(payload)
            .ok()
            .and_then(|o| o.parameters)
            .unwrap_or_default()
    }
}

/// The reply route known before the payload is fully parsed.
fn early_route(topics: &Topics, publish: &Incoming, model: &str) -> ReplyRoute {
    let probe = Probe::read(&publish.payload);
    reply_route(
        publish.response_topic.as_deref(),
        publish.correlation.as_deref(),
        probe.reply_to.as_deref(),
        topics.default_reply(model),
    )
}

/// Adds the agent's parameters to a response and serialises it.
fn finish_response(
    metrics: &crate::metrics::Metrics,
    mut response: InferenceResponse,
    route: &str,
    reason: Reason,
    device_id: &str,
    job: &Job,
    queue_ms: Option<f64>,
) -> Vec<u8> {
    let params = response.parameters.get_or_insert_with(Default::default);
    params.insert("route".into(), json!(route));
    params.insert("reason".into(), json!(reason.as_str()));
    params.insert("device_id".into(), json!(device_id));
    if let Some(q) = queue_ms {
        params.insert("queue_ms".into(), json!(round3(q)));
    }
    let latency = job.received.elapsed().as_secs_f64();
    metrics.latency(&job.model, route, latency);
    params.insert("latency_ms".into(), json!(round3(latency * 1e3)));
    params.insert("budget_ms".into(), json!(job.budget.as_millis() as u64));
    if let Some(v) = &response.model_version {
        params.insert("model_version".into(), json!(v));
    }
    serde_json::to_vec(&response).unwrap_or_default()
}

/// The worker threads and the queue that feeds them.
#[derive(Debug)]
pub struct Pipeline {
    topics: Topics,
    max_payload_bytes: usize,
    jobs_tx: JobsTx,
    workers: Vec<JoinHandle<()>>,
    store: StoreHandle,
    routing: Routing,
    queue_capacity: usize,
    device_id: String,
    front_tx: flume::Sender<Arrival>,
    front: Arc<FrontContext>,
    model_workers: usize,
    /// Set when shutdown begins: no new requests are taken.
    closing: Arc<std::sync::atomic::AtomicBool>,
}

/// The queue's depth, readable from anywhere.
#[derive(Debug, Clone)]
pub struct QueueProbe(JobsTx);

impl QueueProbe {
    pub fn len(&self) -> usize {
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
            .map_or(0, flume::Sender::len)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// What the workers need besides the queue.
#[derive(Debug, Clone)]
pub struct WorkerContext {
    pub device_id: String,
    pub topics: Topics,
    pub top_k: usize,
    pub store: StoreHandle,
    pub history: HistoryConfig,
    pub routing: Routing,
    /// See `inference.emulated_service_ms`.
    pub emulated_service: Duration,
}

impl Pipeline {
    /// Starts `cfg.workers` inference threads.
    pub fn start(
        cfg: &InferenceConfig,
        max_payload_bytes: usize,
        context: WorkerContext,
    ) -> std::io::Result<Pipeline> {
        let (jobs_tx, jobs_rx) = flume::bounded::<Job>(cfg.queue);
        let (front_tx, front_rx) = flume::bounded::<Arrival>(cfg.queue.max(64));
        let jobs_tx: JobsTx = Arc::new(Mutex::new(Some(jobs_tx)));
        let closing = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let front_closing = closing.clone();
        let mut workers = Vec::with_capacity(cfg.workers + 1);
        let front = Arc::new(FrontContext {
            top_k: context.top_k,
        });
        // The front stage: parsing, the cache and routing, on a thread of its own so that
        // neither the MQTT driver nor a queue of model runs stands in their way.
        workers.push(
            std::thread::Builder::new()
                .name("front".into())
                .spawn(move || {
                    let closing = front_closing;
                    loop {
                        match front_rx.recv_timeout(Duration::from_millis(50)) {
                            Ok(arrival) => {
                                let intake = arrival.intake.clone();
                                intake.admit(arrival);
                            }
                            // Once shutdown has begun and the queue is empty, stop.
                            Err(flume::RecvTimeoutError::Timeout) => {
                                if closing.load(Ordering::Relaxed) {
                                    return;
                                }
                            }
                            Err(flume::RecvTimeoutError::Disconnected) => return,
                        }
                    }
                })?,
        );
        let topics = context.topics.clone();
        let store = context.store.clone();
        let routing = context.routing.clone();
        let device_id = context.device_id.clone();
        for i in 0..cfg.workers {
            let worker = Worker {
                jobs_rx: jobs_rx.clone(),
                cx: context.clone(),
            };
            workers.push(
                std::thread::Builder::new()
                    .name(format!("infer-{i}"))
                    .spawn(move || worker.run())?,
            );
        }
        Ok(Pipeline {
            topics,
            max_payload_bytes,
            jobs_tx,
            workers,
            store,
            routing,
            queue_capacity: cfg.queue,
            device_id,
            front_tx,
            front,
            model_workers: cfg.workers,
            closing,
        })
    }

    /// Reads the queue's depth, for metrics.
    pub fn probe(&self) -> QueueProbe {
        QueueProbe(self.jobs_tx.clone())
    }

    /// The intake for requests arriving on one connection.
    pub fn intake(&self, link: Arc<Link>) -> Intake {
        Intake {
            topics: self.topics.clone(),
            max_payload_bytes: self.max_payload_bytes,
            link,
            jobs_tx: self.jobs_tx.clone(),
            store: self.store.clone(),
            routing: self.routing.clone(),
            queue_capacity: self.queue_capacity,
            workers: self.model_workers,
            device_id: self.device_id.clone(),
            front_tx: self.front_tx.clone(),
            front: self.front.clone(),
            closing: self.closing.clone(),
        }
    }

    /// Stops intake and waits for the workers to drain the queue, up to `grace`.
    /// Returns false when the grace period ran out first.
    pub async fn drain(self, grace: std::time::Duration) -> bool {
        // Requests already taken finish: first the front stage empties its queue (routing
        // them), then the model queue is closed and the workers finish what it holds.
        self.closing.store(true, Ordering::Relaxed);
        let deadline = Instant::now() + grace;
        let mut workers = self.workers.into_iter();
        if let Some(front) = workers.next() {
            while !front.is_finished() {
                if Instant::now() >= deadline {
                    return false;
                }
                tokio::time::sleep(std::time::Duration::from_millis(5)).await;
            }
            let _ = front.join();
        }
        self.jobs_tx
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        for w in workers {
            while !w.is_finished() {
                if Instant::now() >= deadline {
                    return false;
                }
                tokio::time::sleep(std::time::Duration::from_millis(5)).await;
            }
            let _ = w.join();
        }
        true
    }
}

struct Worker {
    jobs_rx: flume::Receiver<Job>,
    cx: WorkerContext,
}

/// What a worker does with a request it has answered.
enum Outcome {
    Reply(Vec<u8>),
    /// A low-confidence local answer: ask the relay's model, falling back to this one.
    Escalate {
        local: InferenceResponse,
        queue_ms: f64,
    },
}

impl Worker {
    fn run(self) {
        for job in self.jobs_rx.iter() {
            if Instant::now() >= job.deadline {
                self.expired(job);
                continue;
            }
            let routing = &self.cx.routing;
            routing.in_service.fetch_add(1, Ordering::Relaxed);
            let outcome = self.process(&job);
            routing.in_service.fetch_sub(1, Ordering::Relaxed);
            match outcome {
                Outcome::Reply(body) => reply_blocking(&self.cx.store, job, body),
                Outcome::Escalate { local, queue_ms } => self.escalate(job, local, queue_ms),
            }
        }
    }

    /// A request whose budget ran out in the queue: refused, not run.
    fn expired(&self, job: Job) {
        let error = format!(
            "the request waited {} ms for a local worker, past its budget of {} ms; retry later or send to another device",
            job.received.elapsed().as_millis(),
            job.budget.as_millis()
        );
        self.cx
            .routing
            .metrics
            .routed("reject", Reason::WouldMissBudget);
        let body = ErrorReply {
            id: job.prepared.request.id.as_deref(),
            error: &error,
            code: ErrorCode::Overloaded,
            reason: Some(Reason::WouldMissBudget.as_str()),
        }
        .to_json();
        reply_blocking(&self.cx.store, job, body);
    }

    /// Hands a low-confidence answer to an async task that asks the relay's model.
    fn escalate(&self, job: Job, local: InferenceResponse, queue_ms: f64) {
        let Some(cloud) = self.cx.routing.cloud.clone() else {
            let body = finish_response(
                &self.cx.routing.metrics,
                local,
                "local",
                job.reason,
                &self.cx.device_id,
                &job,
                Some(queue_ms),
            );
            return reply_blocking(&self.cx.store, job, body);
        };
        let cx = self.cx.clone();
        self.cx.routing.runtime.clone().spawn(async move {
            let remaining = job.deadline.saturating_duration_since(Instant::now());
            let result = cloud
                .infer(&job.model, job.publish.payload.clone(), remaining)
                .await;
            let body = match result {
                Ok(mut response) => {
                    cx.routing.metrics.routed("cloud", Reason::Escalated);
                    if let Some(p) = top1(&local) {
                        response
                            .parameters
                            .get_or_insert_with(Default::default)
                            .insert("escalated_from".into(), json!({"route": "local", "top1": p}));
                    }
                    finish_response(&cx.routing.metrics, response, "cloud", Reason::Escalated, &cx.device_id, &job, Some(queue_ms))
                }
                Err(e) => {
                    tracing::debug!(error = %e, model = %job.model, "Escalation failed; the local answer stands.");
                    cx.routing.metrics.routed("local", Reason::EscalationFailed);
                    finish_response(&cx.routing.metrics, local, "local", Reason::EscalationFailed, &cx.device_id, &job, Some(queue_ms))
                }
            };
            reply_async(&cx.store, job, body).await;
        });
    }

    /// Runs one prepared request through its model.
    fn process(&self, job: &Job) -> Outcome {
        let queue_ms = job.received.elapsed().as_secs_f64() * 1e3;
        let result = self
            .answer(&job.prepared.model, &job.prepared)
            .map_err(|e| (ErrorCode::from(e.code()), e.to_string()));
        self.cx.routing.health.count(result.is_ok());
        match result {
            Ok(response) => {
                self.maybe_record(
                    &job.prepared.model,
                    &job.publish.payload,
                    &response,
                    "local",
                );
                let routing = &self.cx.routing;
                let top1 = top1(&response);
                let threshold = routing.live.get().policy.escalate_below(&job.model);
                let remaining_ms = job
                    .deadline
                    .saturating_duration_since(Instant::now())
                    .as_secs_f64()
                    * 1e3;
                if let Some(p) = top1
                    && policy::should_escalate(
                        p,
                        threshold,
                        remaining_ms,
                        routing.relay(&job.model),
                    )
                {
                    return Outcome::Escalate {
                        local: response,
                        queue_ms,
                    };
                }
                routing.metrics.routed("local", job.reason);
                Outcome::Reply(finish_response(
                    &routing.metrics,
                    response,
                    "local",
                    job.reason,
                    &self.cx.device_id,
                    job,
                    Some(queue_ms),
                ))
            }
            Err((code, error)) => Outcome::Reply(
                ErrorReply {
                    id: job.prepared.request.id.as_deref(),
                    error: &error,
                    code,
                    reason: None,
                }
                .to_json(),
            ),
        }
    }

    /// Runs the model on a prepared request, and caches the result.
    fn answer(
        &self,
        model: &LoadedModel,
        prepared: &Prepared,
    ) -> Result<InferenceResponse, models::ModelError> {
        let started = Instant::now();
        let mut response = run_decoded(
            model,
            &prepared.request,
            prepared.inputs.clone(),
            self.cx.top_k,
        )?;
        if let Some(rest) = self.cx.emulated_service.checked_sub(started.elapsed()) {
            std::thread::sleep(rest);
        }
        self.cx
            .routing
            .times
            .record(model.name(), started.elapsed().as_secs_f64() * 1e3);
        if let Some((key, ttl)) = prepared.cache {
            let mut stored = response.clone();
            stored.id = None;
            if let Some(p) = stored.parameters.as_mut() {
                p.remove("latency_ms");
            }
            if let Ok(value) = serde_json::to_vec(&stored) {
                self.cx.store.cache_put(key, model.name(), value, ttl);
            }
        }
        if let Some(p) = response.parameters.as_mut() {
            // The model's own run time, apart from the queue.
            if let Some(ms) = p.remove("latency_ms") {
                p.insert("inference_ms".into(), ms);
            }
        }
        Ok(response)
    }

    /// Records the request in the history, if it is sampled.
    fn maybe_record(
        &self,
        model: &LoadedModel,
        payload: &[u8],
        response: &InferenceResponse,
        route: &str,
    ) {
        let h = &self.cx.history;
        if h.sample <= 0.0 || fastrand::f64() >= h.sample {
            return;
        }
        let confidence = top1(response);
        self.cx.store.record(HistoryRecord {
            ts_ms: now_ms(),
            model: response.model_name.clone(),
            model_sha256: model.sha256().to_owned(),
            input_sha256: Sha256::digest(payload).into(),
            input: (h.inputs == HistoryInputs::Store).then(|| payload.to_vec()),
            output: serde_json::to_vec(&response.outputs).unwrap_or_default(),
            route: route.to_owned(),
            confidence,
        });
    }
}

/// A classifier's top-1 probability (of the first row), from `parameters.classes`.
fn top1(response: &InferenceResponse) -> Option<f64> {
    response
        .parameters
        .as_ref()
        .and_then(|p| p.get("classes"))
        .and_then(|c| c.get(0))
        .and_then(|row| row.get(0))
        .and_then(|top| top.get("probability"))
        .and_then(Value::as_f64)
}

fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}
