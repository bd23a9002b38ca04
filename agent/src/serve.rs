//! The request pipeline: the intake (called by an MQTT driver for every request, never
//! blocking), a bounded queue, and the inference worker threads that answer each request from
//! the result cache or the model, write the reply to the outbox and only then acknowledge the
//! request to the broker.
//!
//! A full queue answers `overloaded` at once. A request is acknowledged once its reply is
//! committed to the outbox, so a crash before that means the broker delivers it again, and a
//! crash after it means the reply is sent when the agent is back.
//! Acknowledgements go out in the order the requests arrived, as MQTT requires of QoS 1
//! (MQTT-4.6.0-2), however the workers finish: rumqttd refuses out-of-order acks.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Instant;

use models::Engine;
use models::engine::LoadedModel;
use models::v2::{InferenceRequest, InferenceResponse};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

use crate::config::{CacheConfig, HistoryConfig, HistoryInputs, InferenceConfig};
use crate::infer::run_decoded;
use crate::mqtt::{Client, Incoming};
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
        let guard = self.jobs_tx.lock().unwrap_or_else(|p| p.into_inner());
        let Some(jobs_tx) = guard.as_ref() else {
            drop(guard);
            // Shutting down: not acknowledged, so the broker delivers it again later.
            return self.link.finish(ticket, publish, false);
        };
        let job = Job {
            publish,
            ticket,
            link: self.link.clone(),
            model,
            received: Instant::now(),
        };
        match jobs_tx.try_send(job) {
            Ok(()) => {}
            Err(flume::TrySendError::Full(job)) => {
                drop(guard);
                let error =
                    "the agent's inference queue is full; retry later or send to another device";
                self.refuse(
                    ticket,
                    job.publish,
                    &job.model,
                    ErrorCode::Overloaded,
                    error,
                );
            }
            Err(flume::TrySendError::Disconnected(job)) => {
                drop(guard);
                self.link.finish(ticket, job.publish, false);
            }
        }
    }

    /// Replies with a coded error at once, from the driver's task: the reply goes to the
    /// outbox without waiting, and the request is acknowledged once it is committed.
    fn refuse(&self, ticket: u64, publish: Incoming, model: &str, code: ErrorCode, error: &str) {
        tracing::debug!(%model, ?code, %error, "Request refused.");
        let route = early_route(&self.topics, &publish, model);
        let body = ErrorReply {
            id: None,
            error,
            code,
        }
        .to_json();
        let link = self.link.clone();
        self.store.try_append(
            OutMessage::reply(route, body),
            Box::new(move |stored| {
                if let Err(e) = &stored {
                    tracing::warn!(error = %e, "Could not store an error reply; the request stays unacknowledged.");
                }
                link.finish(ticket, publish, stored.is_ok());
            }),
        );
    }
}

/// The reply route known before the payload is parsed (no `parameters.reply_to` yet).
fn early_route(topics: &Topics, publish: &Incoming, model: &str) -> ReplyRoute {
    let (response_topic, correlation) = (
        publish.response_topic.as_deref(),
        publish.correlation.as_deref(),
    );
    // This runs on the MQTT driver's task: read `parameters.reply_to` alone, skipping the
    // tensors without building a JSON tree of them.
    #[derive(serde::Deserialize)]
    struct Probe {
        parameters: Option<ProbeParameters>,
    }
    #[derive(serde::Deserialize)]
    struct ProbeParameters {
        reply_to: Option<String>,
    }
    let reply_to = serde_json::from_slice::<Probe>(&publish.payload)
        .ok()
        .and_then(|p| p.parameters)
        .and_then(|p| p.reply_to);
    reply_route(
        response_topic,
        correlation,
        reply_to.as_deref(),
        topics.default_reply(model),
    )
}

/// The worker threads and the queue that feeds them.
#[derive(Debug)]
pub struct Pipeline {
    topics: Topics,
    max_payload_bytes: usize,
    jobs_tx: JobsTx,
    workers: Vec<JoinHandle<()>>,
    store: StoreHandle,
}

/// What the workers need besides the queue.
#[derive(Debug, Clone)]
pub struct WorkerContext {
    pub device_id: String,
    pub topics: Topics,
    pub top_k: usize,
    pub engine: Engine,
    pub store: StoreHandle,
    pub cache: CacheConfig,
    pub history: HistoryConfig,
}

impl Pipeline {
    /// Starts `cfg.workers` inference threads.
    pub fn start(
        cfg: &InferenceConfig,
        max_payload_bytes: usize,
        context: WorkerContext,
    ) -> std::io::Result<Pipeline> {
        let (jobs_tx, jobs_rx) = flume::bounded::<Job>(cfg.queue);
        let mut workers = Vec::with_capacity(cfg.workers);
        let topics = context.topics.clone();
        let store = context.store.clone();
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
            jobs_tx: Arc::new(Mutex::new(Some(jobs_tx))),
            workers,
            store,
        })
    }

    /// The intake for requests arriving on one connection.
    pub fn intake(&self, link: Arc<Link>) -> Intake {
        Intake {
            topics: self.topics.clone(),
            max_payload_bytes: self.max_payload_bytes,
            link,
            jobs_tx: self.jobs_tx.clone(),
            store: self.store.clone(),
        }
    }

    /// Stops intake and waits for the workers to drain the queue, up to `grace`.
    /// Returns false when the grace period ran out first.
    pub async fn drain(self, grace: std::time::Duration) -> bool {
        self.jobs_tx
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        let deadline = Instant::now() + grace;
        for w in self.workers {
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

/// Where an answer came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Source {
    Cache,
    Local,
}

impl Source {
    fn as_str(self) -> &'static str {
        match self {
            Source::Cache => "cache",
            Source::Local => "local",
        }
    }
}

impl Worker {
    fn run(self) {
        for job in self.jobs_rx.iter() {
            let (route, body) = self.process(&job);
            let Job {
                publish,
                ticket,
                link,
                ..
            } = job;
            // Waiting on the store's bounded queue is the backpressure we want here: this is a
            // worker thread, never the event loop.
            self.cx.store.append(
                OutMessage::reply(route, body),
                Box::new(move |stored| {
                    if let Err(e) = &stored {
                        tracing::warn!(error = %e, "Could not store a reply; the request will be delivered again.");
                    }
                    link.finish(ticket, publish, stored.is_ok());
                }),
            );
        }
    }

    /// Parses, routes and answers one request; returns where the reply goes and its body.
    fn process(&self, job: &Job) -> (ReplyRoute, Vec<u8>) {
        let (response_topic, correlation) = (
            job.publish.response_topic.as_deref(),
            job.publish.correlation.as_deref(),
        );
        let default = self.cx.topics.default_reply(&job.model);
        let request = match InferenceRequest::from_json(&job.publish.payload) {
            Ok(r) => r,
            Err(e) => {
                let route = reply_route(response_topic, correlation, None, default);
                let body = ErrorReply {
                    id: None,
                    error: &e.to_string(),
                    code: ErrorCode::BadRequest,
                }
                .to_json();
                return (route, body);
            }
        };
        let reply_to = request
            .parameters
            .as_ref()
            .and_then(|p| p.get("reply_to"))
            .and_then(Value::as_str);
        let route = reply_route(response_topic, correlation, reply_to, default);
        let queue_ms = job.received.elapsed().as_secs_f64() * 1e3;
        let result = self
            .cx
            .engine
            .model(&job.model)
            .map_err(|e| (ErrorCode::from(e.code()), e.to_string()))
            .and_then(|model| {
                self.answer(model, &request)
                    .map_err(|e| (ErrorCode::from(e.code()), e.to_string()))
            });
        let body = match result {
            Ok((mut response, source)) => {
                let params = response.parameters.get_or_insert_with(Default::default);
                params.insert("route".into(), json!(source.as_str()));
                params.insert("device_id".into(), json!(self.cx.device_id));
                params.insert("queue_ms".into(), json!(round3(queue_ms)));
                params.insert(
                    "latency_ms".into(),
                    json!(round3(job.received.elapsed().as_secs_f64() * 1e3)),
                );
                if let Some(v) = &response.model_version {
                    params.insert("model_version".into(), json!(v));
                }
                let body = serde_json::to_vec(&response).unwrap_or_default();
                self.maybe_record(&job.publish.payload, &response, source);
                body
            }
            Err((code, error)) => ErrorReply {
                id: request.id.as_deref(),
                error: &error,
                code,
            }
            .to_json(),
        };
        (route, body)
    }

    /// The response to a valid request: from the cache when allowed and held, else from the
    /// model (and then cached).
    fn answer(
        &self,
        model: &LoadedModel,
        request: &InferenceRequest,
    ) -> Result<(InferenceResponse, Source), models::ModelError> {
        let inputs = request.decode_inputs(model.max_elements())?;
        let bypass = request
            .parameters
            .as_ref()
            .and_then(|p| p.get("cache"))
            .and_then(Value::as_bool)
            == Some(false);
        let ttl = self.cx.cache.ttl_for(model.name()).filter(|_| !bypass);
        let key = ttl.map(|_| {
            let outputs: Option<Vec<String>> = request
                .outputs
                .as_ref()
                .map(|o| o.iter().map(|o| o.name.clone()).collect());
            cache::key(
                model.name(),
                model.sha256(),
                &inputs,
                outputs.as_deref(),
                request.parameters.as_ref(),
                self.cx.top_k,
            )
        });
        if let Some(key) = &key
            && let Some(value) = self.cx.store.cache_get(key, now_ms())
        {
            match serde_json::from_slice::<InferenceResponse>(&value) {
                Ok(mut response) => {
                    response.id = request.id.clone();
                    return Ok((response, Source::Cache));
                }
                Err(e) => {
                    tracing::warn!(error = %e, model = %model.name(), "A cached result does not parse; running the model.");
                }
            }
        }
        let mut response = run_decoded(model, request, inputs, self.cx.top_k)?;
        if let (Some(key), Some(ttl)) = (key, ttl) {
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
        Ok((response, Source::Local))
    }

    /// Records the request in the history, if it is sampled.
    fn maybe_record(&self, payload: &[u8], response: &InferenceResponse, source: Source) {
        let h = &self.cx.history;
        if h.sample <= 0.0 || fastrand::f64() >= h.sample {
            return;
        }
        let Ok(model) = self.cx.engine.model(&response.model_name) else {
            return;
        };
        let confidence = response
            .parameters
            .as_ref()
            .and_then(|p| p.get("classes"))
            .and_then(|c| c.get(0))
            .and_then(|row| row.get(0))
            .and_then(|top| top.get("probability"))
            .and_then(Value::as_f64);
        self.cx.store.record(HistoryRecord {
            ts_ms: now_ms(),
            model: response.model_name.clone(),
            model_sha256: model.sha256().to_owned(),
            input_sha256: Sha256::digest(payload).into(),
            input: (h.inputs == HistoryInputs::Store).then(|| payload.to_vec()),
            output: serde_json::to_vec(&response.outputs).unwrap_or_default(),
            route: source.as_str().to_owned(),
            confidence,
        });
    }
}

fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}
