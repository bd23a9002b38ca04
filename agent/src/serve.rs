//! The request pipeline: the intake (called by the MQTT driver for every request, never
//! blocking), a bounded queue, and the inference worker threads that run the models, publish
//! each reply and only then acknowledge the request to the broker.
//!
//! A full queue answers `overloaded` at once. A request is acknowledged after its reply has been
//! handed to the MQTT client, so a crash before that means the broker delivers it again.

use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Instant;

use models::Engine;
use models::v2::InferenceRequest;
use rumqttc::v5::AsyncClient;
use rumqttc::v5::mqttbytes::v5::Publish;
use serde_json::{Value, json};

use crate::config::InferenceConfig;
use crate::infer::run_request;
use crate::mqtt::{publish_reply, request_properties, try_publish_reply};
use crate::protocol::{ErrorCode, ErrorReply, ReplyRoute, Topics, reply_route};

/// One request waiting for a worker.
#[derive(Debug)]
pub struct Job {
    publish: Publish,
    model: String,
    received: Instant,
}

/// The side of the pipeline the MQTT driver calls.
#[derive(Debug, Clone)]
pub struct Intake {
    topics: Topics,
    max_payload_bytes: usize,
    client: AsyncClient,
    /// `None` once shutdown began: new requests are left unacknowledged, for redelivery.
    jobs_tx: Arc<Mutex<Option<flume::Sender<Job>>>>,
}

impl Intake {
    /// Takes one incoming publish. Never blocks.
    pub fn dispatch(&self, publish: Publish) {
        let Ok(topic) = std::str::from_utf8(&publish.topic) else {
            tracing::warn!("Ignored a message whose topic is not UTF-8.");
            self.ack(&publish);
            return;
        };
        let Some(model) = self.topics.model_of(topic).map(str::to_owned) else {
            tracing::warn!(%topic, "Ignored a message on a topic that is not a request topic.");
            self.ack(&publish);
            return;
        };
        let reject = |code: ErrorCode, error: String| {
            let route = early_route(&self.topics, &publish, &model);
            tracing::debug!(%model, ?code, %error, "Request refused.");
            let body = ErrorReply {
                id: None,
                error: &error,
                code,
            }
            .to_json();
            self.reply_now(&publish, route, body);
        };
        if publish.payload.len() > self.max_payload_bytes {
            return reject(
                ErrorCode::BadRequest,
                format!(
                    "the request is {} bytes, over this agent's limit of {} bytes (mqtt.max_payload_bytes)",
                    publish.payload.len(),
                    self.max_payload_bytes
                ),
            );
        }
        let guard = self.jobs_tx.lock().unwrap_or_else(|p| p.into_inner());
        let Some(jobs_tx) = guard.as_ref() else {
            return; // shutting down: not acknowledged, so the broker delivers it again later
        };
        match jobs_tx.try_send(Job {
            publish,
            model: model.clone(),
            received: Instant::now(),
        }) {
            Ok(()) => {}
            Err(flume::TrySendError::Full(job)) => {
                drop(guard);
                let route = early_route(&self.topics, &job.publish, &model);
                let body = ErrorReply {
                    id: None,
                    error: "the agent's inference queue is full; retry later or send to another device",
                    code: ErrorCode::Overloaded,
                }
                .to_json();
                self.reply_now(&job.publish, route, body);
            }
            Err(flume::TrySendError::Disconnected(_)) => {}
        }
    }

    /// Stops taking requests; the workers finish what is queued and exit.
    pub fn close(&self) {
        self.jobs_tx
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
    }

    fn reply_now(&self, publish: &Publish, route: ReplyRoute, body: Vec<u8>) {
        match try_publish_reply(&self.client, route, body) {
            Ok(()) => self.ack(publish),
            // Not acknowledged: the broker will deliver the request again.
            Err(e) => {
                tracing::warn!(error = %e, "Could not queue an error reply; the request stays unacknowledged.")
            }
        }
    }

    fn ack(&self, publish: &Publish) {
        if let Err(e) = self.client.try_ack(publish) {
            tracing::warn!(error = %e, "Could not queue an acknowledgement.");
        }
    }
}

/// The reply route known before the payload is parsed (no `parameters.reply_to` yet).
fn early_route(topics: &Topics, publish: &Publish, model: &str) -> ReplyRoute {
    let (response_topic, correlation) = request_properties(publish);
    let reply_to = serde_json::from_slice::<Value>(&publish.payload)
        .ok()
        .and_then(|v| {
            v.pointer("/parameters/reply_to")
                .and_then(Value::as_str)
                .map(str::to_owned)
        });
    reply_route(
        response_topic,
        correlation,
        reply_to.as_deref(),
        topics.default_reply(model),
    )
}

/// The worker threads and the intake that feeds them.
#[derive(Debug)]
pub struct Pipeline {
    pub intake: Intake,
    workers: Vec<JoinHandle<()>>,
}

impl Pipeline {
    /// Starts `cfg.workers` inference threads.
    pub fn start(
        cfg: &InferenceConfig,
        device_id: &str,
        topics: Topics,
        max_payload_bytes: usize,
        engine: Engine,
        client: AsyncClient,
        runtime: tokio::runtime::Handle,
    ) -> std::io::Result<Pipeline> {
        let (jobs_tx, jobs_rx) = flume::bounded::<Job>(cfg.queue);
        let mut workers = Vec::with_capacity(cfg.workers);
        for i in 0..cfg.workers {
            let worker = Worker {
                jobs_rx: jobs_rx.clone(),
                engine: engine.clone(),
                client: client.clone(),
                runtime: runtime.clone(),
                topics: topics.clone(),
                top_k: cfg.top_k,
                device_id: device_id.to_owned(),
            };
            workers.push(
                std::thread::Builder::new()
                    .name(format!("infer-{i}"))
                    .spawn(move || worker.run())?,
            );
        }
        let intake = Intake {
            topics,
            max_payload_bytes,
            client,
            jobs_tx: Arc::new(Mutex::new(Some(jobs_tx))),
        };
        Ok(Pipeline { intake, workers })
    }

    /// Stops intake and waits for the workers to drain the queue, up to `grace`.
    /// Returns false when the grace period ran out first.
    pub async fn drain(self, grace: std::time::Duration) -> bool {
        self.intake.close();
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
    engine: Engine,
    client: AsyncClient,
    runtime: tokio::runtime::Handle,
    topics: Topics,
    top_k: usize,
    device_id: String,
}

impl Worker {
    fn run(self) {
        for job in self.jobs_rx.iter() {
            let (route, body) = self.process(&job);
            // Blocking on the client's bounded channel is the backpressure we want here: this
            // is a worker thread, never the event loop.
            let sent = self.runtime.block_on(async {
                publish_reply(&self.client, route, body).await?;
                self.client.ack(&job.publish).await
            });
            if let Err(e) = sent {
                tracing::warn!(error = %e, "Could not hand a reply to the MQTT client; the request will be delivered again.");
            }
        }
    }

    /// Parses, routes and runs one request; returns where the reply goes and its body.
    fn process(&self, job: &Job) -> (ReplyRoute, Vec<u8>) {
        let (response_topic, correlation) = request_properties(&job.publish);
        let default = self.topics.default_reply(&job.model);
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
            .engine
            .model(&job.model)
            .map_err(|e| (ErrorCode::from(e.code()), e.to_string()))
            .and_then(|model| {
                run_request(model, &request, self.top_k)
                    .map_err(|e| (ErrorCode::from(e.code()), e.to_string()))
            });
        let body = match result {
            Ok(mut response) => {
                let params = response.parameters.get_or_insert_with(Default::default);
                params.insert("route".into(), json!("local"));
                params.insert("device_id".into(), json!(self.device_id));
                params.insert("queue_ms".into(), json!(round3(queue_ms)));
                params.insert(
                    "latency_ms".into(),
                    json!(round3(job.received.elapsed().as_secs_f64() * 1e3)),
                );
                if let Some(v) = &response.model_version {
                    params.insert("model_version".into(), json!(v));
                }
                serde_json::to_vec(&response).unwrap_or_default()
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
}

fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}
