//! The inference workers: threads that take requests from the local queue, run their model
//! (tract never runs on the network threads), cache the result, and answer. A low-confidence
//! answer goes to the relay's bigger model first (escalation). A panic while running answers
//! that request `internal`, is counted, and the worker takes the next one.

use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Instant;

use models::engine::LoadedModel;
use models::sha256::Sha256;
use models::v2::InferenceResponse;

use super::reply::{Answer, Journey, finish_response, top1};
use super::{Job, Prepared, Shared, observe, relay};
use crate::config::HistoryInputs;
use crate::infer::run_decoded;
use crate::policy;
use crate::protocol::ErrorCode;
use crate::store::{HistoryRecord, now_ms};

pub(super) struct Worker {
    shared: Arc<Shared>,
}

/// What a worker does with a request it has run.
enum Outcome {
    Answer(Answer),
    /// A low-confidence local answer: ask the relay's model, falling back to this one.
    Escalate {
        local: InferenceResponse,
        queue_ms: f64,
    },
}

impl Worker {
    pub(super) fn new(shared: Arc<Shared>) -> Worker {
        Worker { shared }
    }

    /// Serves the local queue until it closes.
    pub(super) fn run(self, jobs_rx: &flume::Receiver<Job>) {
        for job in jobs_rx.iter() {
            self.serve(job);
        }
    }

    /// Runs one request and answers it. Also called by the front stage, which runs a quick
    /// model itself when nothing waits (see `front::INLINE_BELOW_MS`).
    pub(super) fn serve(&self, job: Job) {
        if !job.slot.is_open() {
            // Its budget ran out in the queue and it was answered then: not run.
            return;
        }
        let in_service = &self.shared.routing.in_service;
        in_service.fetch_add(1, Ordering::Relaxed);
        let outcome = std::panic::catch_unwind(AssertUnwindSafe(|| self.process(&job)));
        in_service.fetch_sub(1, Ordering::Relaxed);
        match outcome {
            Ok(Outcome::Answer(answer)) => {
                if !job.slot.answer(&answer) {
                    // Its deadline passed while it ran: it was answered then.
                    self.shared.metrics.late_result();
                } else if let Answer::Response(response) = &answer {
                    // Answered: audits and shadow runs come after, on other threads.
                    observe::offer(&self.shared, job, response);
                }
            }
            Ok(Outcome::Escalate { local, queue_ms }) => {
                relay::escalate(&self.shared, job, local, queue_ms);
            }
            Err(_) => {
                self.shared.metrics.panic("worker");
                tracing::error!(model = %job.model, "A model run panicked; the request is answered `internal` and the worker goes on.");
                job.slot.answer(&Answer::error(
                    ErrorCode::Internal,
                    "the model run failed inside the agent (a fault, logged on the device); retry it",
                ));
            }
        }
    }

    /// Runs one prepared request through its model.
    fn process(&self, job: &Job) -> Outcome {
        #[cfg(test)]
        if job.prepared.request.id.as_deref() == Some(super::tests::PANIC_IN_WORKER) {
            panic!("a fault injected by a test, in a worker");
        }
        #[cfg(test)]
        if job.prepared.request.id.as_deref() == Some(super::tests::HOLD_IN_WORKER) {
            std::thread::sleep(std::time::Duration::from_millis(30));
        }
        let shared = &self.shared;
        let queue_ms = job.received.elapsed().as_secs_f64() * 1e3;
        let result = self.answer(&job.prepared.model, &job.prepared);
        shared.routing.health.count(result.is_ok());
        let response = match result {
            Ok(r) => r,
            Err(e) => {
                let code = ErrorCode::from(e.code());
                shared.metrics.refused(code);
                return Outcome::Answer(Answer::error(code, e.to_string()));
            }
        };
        self.maybe_record(&job.prepared, &response);
        let threshold = shared.routing.live.get().policy.escalate_below(&job.model);
        let remaining_ms = job
            .deadline
            .saturating_duration_since(Instant::now())
            .as_secs_f64()
            * 1e3;
        if let Some(p) = top1(&response)
            && policy::should_escalate(p, threshold, remaining_ms, shared.routing.relay(&job.model))
        {
            return Outcome::Escalate {
                local: response,
                queue_ms,
            };
        }
        Outcome::Answer(finish_response(
            shared,
            response,
            Journey {
                route: "local",
                reason: job.reason,
                model: &job.model,
                received: job.received,
                budget_ms: u64::try_from(job.budget.as_millis()).unwrap_or(u64::MAX),
                queue_ms: Some(queue_ms),
            },
        ))
    }

    /// Runs the model on a prepared request, and caches the result.
    fn answer(
        &self,
        model: &LoadedModel,
        prepared: &Prepared,
    ) -> Result<InferenceResponse, models::ModelError> {
        let shared = &self.shared;
        // A model not built yet is built first, outside the timing: its build is not what a
        // run costs, and one slow first sample would tilt the policy towards offloading.
        model.load()?;
        let started = Instant::now();
        let result = run_decoded(
            model,
            &prepared.request,
            prepared.inputs.clone(),
            shared.top_k,
        );
        if model.take_fallback_news().is_some() {
            shared.metrics.engine_fallback(model.name());
        }
        let mut response = result?;
        if let Some(rest) = shared.emulated_service.checked_sub(started.elapsed()) {
            std::thread::sleep(rest);
        }
        shared
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
                shared.store.cache_put(key, model.name(), value, ttl);
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
    fn maybe_record(&self, prepared: &Prepared, response: &InferenceResponse) {
        let h = &self.shared.history;
        if h.sample <= 0.0 || fastrand::f64() >= h.sample {
            return;
        }
        let input = prepared.body();
        self.shared.store.record(HistoryRecord {
            ts_ms: now_ms(),
            model: response.model_name.clone(),
            model_sha256: prepared.model.sha256().to_owned(),
            input_sha256: Sha256::digest(&input),
            input: (h.inputs == HistoryInputs::Store).then(|| input.to_vec()),
            output: serde_json::to_vec(&response.outputs).unwrap_or_default(),
            route: "local".to_owned(),
            confidence: top1(response),
        });
    }
}
