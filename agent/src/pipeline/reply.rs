//! Answering a request: the [`Responder`] each admitted request owns until it is answered, the
//! answer-once [`Slot`] that a worker, a relay task and the deadline watch may race for, and
//! the agent's parameters added to every response.
//!
//! A responder answers exactly once: with a reply (written to the outbox, its request
//! acknowledged once that is committed), or released at shutdown (not acknowledged, for the
//! broker to deliver again). One dropped without either — a panic unwound through it, a stage
//! that lost it — answers `internal` on its own, and is counted: no request is left waiting
//! and no acknowledgement order is blocked.

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use models::v2::InferenceResponse;
use serde_json::{Value, json};

use super::Shared;
use crate::policy::Reason;
use crate::protocol::{ErrorCode, ErrorReply, ReplyRoute};
use crate::store::outbox::OutMessage;
use crate::store::{Remember, Reply, now_ms};
use crate::ticket::Ticket;

/// What a request made inside the agent (a sensor's window) gets back.
pub type LocalAnswer = Result<InferenceResponse, LocalError>;

/// A coded error, for a request made inside the agent.
#[derive(Debug, Clone, PartialEq)]
pub struct LocalError {
    pub code: ErrorCode,
    pub error: String,
}

/// Where a request came from, and so how its answer travels.
#[derive(Debug)]
pub(crate) enum Origin {
    /// From a broker: the reply goes through the outbox, then the ticket is committed.
    Mqtt(Ticket),
    /// From inside the agent: the answer goes back on this channel.
    Local(flume::Sender<LocalAnswer>),
}

/// An answer, before it is shaped for its requester.
#[derive(Debug, Clone)]
pub(crate) enum Answer {
    Response(InferenceResponse),
    Error {
        code: ErrorCode,
        error: String,
        reason: Option<Reason>,
    },
    /// A remembered reply to the same request, as it was sent.
    Remembered(Arc<Vec<u8>>),
}

impl Answer {
    pub(crate) fn error(code: ErrorCode, error: impl Into<String>) -> Answer {
        Answer::Error {
            code,
            error: error.into(),
            reason: None,
        }
    }

    pub(crate) fn refused(reason: Reason, error: impl Into<String>) -> Answer {
        Answer::Error {
            code: ErrorCode::Overloaded,
            error: error.into(),
            reason: Some(reason),
        }
    }

    /// The reply's bytes, as published.
    fn body(&self, id: Option<&str>) -> Arc<Vec<u8>> {
        match self {
            Answer::Response(r) => Arc::new(serde_json::to_vec(r).unwrap_or_else(|_| {
                ErrorReply {
                    id,
                    error: "the response could not be encoded",
                    code: ErrorCode::Internal,
                    reason: None,
                }
                .to_json()
            })),
            Answer::Error {
                code,
                error,
                reason,
            } => Arc::new(
                ErrorReply {
                    id,
                    error,
                    code: *code,
                    reason: reason.map(Reason::as_str),
                }
                .to_json(),
            ),
            Answer::Remembered(body) => body.clone(),
        }
    }
}

/// The one who answers a request.
#[derive(Debug)]
pub(crate) struct Responder {
    origin: Option<Origin>,
    route: ReplyRoute,
    id: Option<String>,
    /// Remember the reply for duplicates of this request.
    remember: Option<Remember>,
    /// When the requester stops waiting.
    expiry: Option<Expiry>,
    shared: Arc<Shared>,
}

/// When a requester stops waiting: on the monotonic clock (the one deadlines are kept on, so a
/// budget that is its expiry runs out with it), and in Unix ms for the stored reply.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Expiry {
    pub at: Instant,
    pub unix_ms: i64,
}

impl Expiry {
    /// `after` from `received` (the moment the message arrived).
    pub(crate) fn after(received: Instant, after: Duration) -> Option<Expiry> {
        let at = received.checked_add(after)?;
        let left = at.saturating_duration_since(Instant::now());
        let unix_ms = now_ms().saturating_add(i64::try_from(left.as_millis()).unwrap_or(i64::MAX));
        Some(Expiry { at, unix_ms })
    }

    fn passed(&self) -> bool {
        self.at <= Instant::now()
    }
}

impl Responder {
    pub(crate) fn new(
        shared: &Arc<Shared>,
        origin: Origin,
        route: ReplyRoute,
        id: Option<String>,
        remember: Option<Remember>,
        expiry: Option<Expiry>,
    ) -> Responder {
        shared.responders.fetch_add(1, Ordering::Relaxed);
        Responder {
            origin: Some(origin),
            route,
            id,
            remember,
            expiry,
            shared: shared.clone(),
        }
    }

    /// Answers this request alone.
    pub(crate) fn answer(self, answer: &Answer) {
        answer_all(self, Vec::new(), answer);
    }

    /// Not answered and not acknowledged: the broker delivers it again (shutdown).
    pub(crate) fn release(mut self) {
        if let Some(key) = self.remember.as_ref().map(|r| r.key) {
            self.shared.registry().abandon(&key);
        }
        match self.origin.take() {
            Some(Origin::Mqtt(ticket)) => ticket.release(),
            // The sensor hears that nobody will answer.
            Some(Origin::Local(_)) | None => {}
        }
        self.consumed();
    }

    /// Sends one reply's bytes (or typed answer) to this requester; `remember` writes the reply
    /// for duplicates too (the first delivery's; a duplicate's reply is remembered already).
    fn send(mut self, answer: &Answer, body: &Arc<Vec<u8>>, remember: bool) {
        match self.origin.take() {
            Some(Origin::Local(tx)) => {
                let _ = tx.send(match answer {
                    Answer::Response(r) => Ok(r.clone()),
                    Answer::Error { code, error, .. } => Err(LocalError {
                        code: *code,
                        error: error.clone(),
                    }),
                    Answer::Remembered(_) => Err(LocalError {
                        code: ErrorCode::Internal,
                        error: "a remembered reply for a request made inside the agent".into(),
                    }),
                });
            }
            Some(Origin::Mqtt(ticket)) => {
                if self.expiry.is_some_and(|e| e.passed()) {
                    // Its requester has stopped waiting: nothing is published, and the request
                    // is done with.
                    self.shared.metrics.reply_expired();
                    ticket.commit();
                } else {
                    self.shared.store.reply(Reply {
                        message: OutMessage::reply(
                            self.route.clone(),
                            body.to_vec(),
                            self.expiry.map(|e| e.unix_ms),
                        ),
                        ticket: Some(ticket),
                        remember: self.remember.clone().filter(|_| remember),
                    });
                }
            }
            None => {}
        }
        self.consumed();
    }

    fn consumed(&mut self) {
        self.shared.responders.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Drop for Responder {
    fn drop(&mut self) {
        if self.origin.is_none() {
            return;
        }
        if self.shared.abandoning.load(Ordering::Relaxed) {
            // Past the shutdown grace period: left for the broker to deliver again.
            if let Some(Origin::Mqtt(ticket)) = self.origin.take() {
                ticket.release();
            }
            self.origin = None;
            self.consumed();
            return;
        }
        // Dropped unanswered: a fault on our side (a panic unwound through its holder).
        self.shared.metrics.lost_request();
        tracing::error!(
            id = ?self.id,
            topic = %self.route.topic,
            "A request was dropped unanswered by a fault in the agent; it is answered `internal`."
        );
        let answer = Answer::error(
            ErrorCode::Internal,
            "the agent failed while answering this request (an internal fault, logged on the device); retry it",
        );
        let body = answer.body(self.id.as_deref());
        let origin = self.origin.take();
        let stand_in = Responder {
            origin,
            route: self.route.clone(),
            id: self.id.take(),
            remember: self.remember.take(),
            expiry: self.expiry,
            shared: self.shared.clone(),
        };
        // `send` counts the stand-in out; this one was counted in.
        self.shared.responders.fetch_add(1, Ordering::Relaxed);
        stand_in.send(&answer, &body, true);
        self.consumed();
    }
}

/// Answers a request and the duplicates that waited for it, with one body.
pub(crate) fn answer_all(leader: Responder, followers: Vec<Responder>, answer: &Answer) {
    let body = answer.body(leader.id.as_deref());
    if let Some(r) = &leader.remember {
        let publishable = leader.expiry.is_none_or(|e| !e.passed());
        let mut registry = leader.shared.registry();
        if publishable {
            registry.complete(r.key, body.clone(), r.expires_ms);
        } else {
            registry.abandon(&r.key);
        }
    }
    let first = !matches!(answer, Answer::Remembered(_));
    for f in followers {
        f.send(answer, &body, false);
    }
    leader.send(answer, &body, first);
}

/// The answer-once place of a request that waits (for a worker, the relay, or its deadline):
/// whoever takes it first answers; the others find it empty. Duplicates of the request that
/// arrive meanwhile wait here too, and get the same answer.
#[derive(Debug)]
pub(crate) struct Slot {
    state: Mutex<Option<(Responder, Vec<Responder>)>>,
}

impl Slot {
    pub(crate) fn new(responder: Responder) -> Arc<Slot> {
        Arc::new(Slot {
            state: Mutex::new(Some((responder, Vec::new()))),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Option<(Responder, Vec<Responder>)>> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Still waiting for its answer?
    pub(crate) fn is_open(&self) -> bool {
        self.lock().is_some()
    }

    /// Answers it (and its duplicates), unless someone did first. Returns whether this did.
    pub(crate) fn answer(&self, answer: &Answer) -> bool {
        // Taken and answered under the lock, so a duplicate that finds the slot closed finds
        // the reply remembered.
        let mut state = self.lock();
        match state.take() {
            Some((leader, followers)) => {
                answer_all(leader, followers, answer);
                true
            }
            None => false,
        }
    }

    /// A duplicate of this request waits for its answer; given back if it came too late.
    #[allow(
        clippy::result_large_err,
        reason = "the responder is moved by value everywhere; it comes back unboxed"
    )]
    pub(crate) fn follow(&self, r: Responder) -> Result<(), Responder> {
        match self.lock().as_mut() {
            Some((_, followers)) => {
                followers.push(r);
                Ok(())
            }
            None => Err(r),
        }
    }

    /// Shutdown: released unanswered, duplicates too.
    pub(crate) fn release(&self) {
        let taken = self.lock().take();
        if let Some((leader, followers)) = taken {
            for f in followers {
                f.release();
            }
            leader.release();
        }
    }
}

/// What a successful response says about its journey.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Journey<'a> {
    pub route: &'a str,
    pub reason: Reason,
    pub model: &'a str,
    pub received: Instant,
    pub budget_ms: u64,
    pub queue_ms: Option<f64>,
}

/// Adds the agent's parameters to a response: route, reason, device, latency, budget, queue
/// time; and counts it.
pub(crate) fn finish_response(
    shared: &Shared,
    mut response: InferenceResponse,
    j: Journey<'_>,
) -> Answer {
    shared.metrics.routed(j.route, j.reason);
    let params = response.parameters.get_or_insert_with(Default::default);
    params.insert("route".into(), json!(j.route));
    params.insert("reason".into(), json!(j.reason.as_str()));
    params.insert("device_id".into(), json!(shared.device_id));
    if let Some(q) = j.queue_ms {
        params.insert("queue_ms".into(), json!(round3(q)));
    }
    let latency = j.received.elapsed().as_secs_f64();
    shared.metrics.latency(j.model, j.route, latency);
    params.insert("latency_ms".into(), json!(round3(latency * 1e3)));
    params.insert("budget_ms".into(), json!(j.budget_ms));
    if let Some(v) = &response.model_version {
        params.insert("model_version".into(), json!(v));
    }
    Answer::Response(response)
}

/// A classifier's top-1 probability (of the first row), from `parameters.classes`.
pub(crate) fn top1(response: &InferenceResponse) -> Option<f64> {
    response
        .parameters
        .as_ref()
        .and_then(|p| p.get("classes"))
        .and_then(|c| c.get(0))
        .and_then(|row| row.get(0))
        .and_then(|top| top.get("probability"))
        .and_then(Value::as_f64)
}

pub(crate) fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}
