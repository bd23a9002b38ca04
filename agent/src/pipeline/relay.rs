//! Requests the relay answers, on async tasks (never a worker): offloaded by the policy, with a
//! local run when the offload fails and the budget allows, and low-confidence local answers
//! escalated to the relay's bigger model.

use std::sync::Arc;
use std::time::Instant;

use models::v2::InferenceResponse;
use serde_json::json;

use super::reply::{Answer, Journey, finish_response, top1};
use super::{Job, Shared};
use crate::cloud::CloudError;
use crate::policy::{self, Reason};
use crate::protocol::ErrorCode;

fn budget_ms(job: &Job) -> u64 {
    u64::try_from(job.budget.as_millis()).unwrap_or(u64::MAX)
}

/// Puts a request on the local queue.
pub(super) fn enqueue(shared: &Shared, jobs_tx: &flume::Sender<Job>, job: Job) {
    match jobs_tx.try_send(job) {
        Ok(()) => {}
        Err(flume::TrySendError::Full(job)) => {
            shared.metrics.routed("reject", Reason::QueueFull);
            job.slot.answer(&Answer::refused(
                Reason::QueueFull,
                "the agent's inference queue is full; retry later or send to another device",
            ));
        }
        // Shutting down: left for the broker to deliver again.
        Err(flume::TrySendError::Disconnected(job)) => job.slot.release(),
    }
}

/// Sends a request to the relay on a task of its own; on failure it runs locally while its
/// budget allows.
pub(super) fn offload(shared: &Arc<Shared>, job: Job, jobs_tx: flume::Sender<Job>) {
    let Some(cloud) = shared.routing.cloud.clone() else {
        return enqueue(shared, &jobs_tx, job);
    };
    let shared = shared.clone();
    shared.routing.runtime.clone().spawn(async move {
        let remaining = job.deadline.saturating_duration_since(Instant::now());
        let result = cloud
            .infer(&job.model, job.prepared.body(), remaining)
            .await;
        match result {
            Ok(response) => {
                let answer = finish_response(
                    &shared,
                    response,
                    Journey {
                        route: "cloud",
                        reason: job.reason,
                        model: &job.model,
                        received: job.received,
                        budget_ms: budget_ms(&job),
                        queue_ms: None,
                    },
                );
                job.slot.answer(&answer);
            }
            Err(CloudError::Refused { message, .. }) => {
                shared.metrics.routed("cloud", job.reason);
                job.slot.answer(&Answer::error(
                    ErrorCode::BadRequest,
                    format!("the relay refused the request: {message}"),
                ));
            }
            Err(e) => {
                tracing::debug!(error = %e, model = %job.model, "Offload failed; trying locally.");
                let left = job.deadline.saturating_duration_since(Instant::now());
                let local =
                    policy::local_estimate_ms(&shared.signals(&job.model, jobs_tx.len(), false));
                if local <= left.as_secs_f64() * 1e3 {
                    let job = Job {
                        reason: Reason::OffloadFailed,
                        ..job
                    };
                    enqueue(&shared, &jobs_tx, job);
                } else {
                    let error = format!(
                        "the relay could not answer ({e}) and running locally would miss the request's budget of {} ms; retry later",
                        budget_ms(&job)
                    );
                    shared.metrics.routed("reject", Reason::OffloadFailed);
                    job.slot
                        .answer(&Answer::refused(Reason::OffloadFailed, error));
                }
            }
        }
    });
}

/// Asks the relay's model about a low-confidence local answer; the local answer stands if the
/// relay fails.
pub(super) fn escalate(shared: &Arc<Shared>, job: Job, local: InferenceResponse, queue_ms: f64) {
    let Some(cloud) = shared.routing.cloud.clone() else {
        let answer = finish_response(shared, local, journey(&job, "local", job.reason, queue_ms));
        job.slot.answer(&answer);
        return;
    };
    let shared = shared.clone();
    shared.routing.runtime.clone().spawn(async move {
        let remaining = job.deadline.saturating_duration_since(Instant::now());
        let result = cloud
            .infer(&job.model, job.prepared.body(), remaining)
            .await;
        let answer = match result {
            Ok(mut response) => {
                if let Some(p) = top1(&local) {
                    response
                        .parameters
                        .get_or_insert_with(Default::default)
                        .insert("escalated_from".into(), json!({"route": "local", "top1": p}));
                }
                finish_response(
                    &shared,
                    response,
                    journey(&job, "cloud", Reason::Escalated, queue_ms),
                )
            }
            Err(e) => {
                tracing::debug!(error = %e, model = %job.model, "Escalation failed; the local answer stands.");
                finish_response(
                    &shared,
                    local,
                    journey(&job, "local", Reason::EscalationFailed, queue_ms),
                )
            }
        };
        job.slot.answer(&answer);
    });
}

fn journey<'a>(job: &'a Job, route: &'a str, reason: Reason, queue_ms: f64) -> Journey<'a> {
    Journey {
        route,
        reason,
        model: &job.model,
        received: job.received,
        budget_ms: budget_ms(job),
        queue_ms: Some(queue_ms),
    }
}
