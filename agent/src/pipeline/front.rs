//! The front stage, on a thread of its own: every request is decoded and validated, answered
//! from its earlier reply (a duplicate) or from the result cache when it can be, and otherwise
//! routed by the policy to the local queue or the relay, so a cache hit never waits behind the
//! model and the MQTT driver never parses tensors.
//!
//! It also watches deadlines: a request still unanswered when its budget runs out, queued or
//! running, is answered `overloaded` at that moment; a result that comes later is dropped.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use bytes::Bytes;
use models::v2::{InferenceRequest, InferenceResponse};
use serde_json::Value;

use super::decode::{Decoded, Undecodable, decode};
use super::dedupe::{Key, Seen};
use super::reply::{Answer, Expiry, Journey, Origin, Responder, Slot, finish_response};
use super::worker::Worker;
use super::{Arrival, Job, LocalAnswer, LocalRequest, Prepared, Shared, held, relay};
use crate::live::Settings;
use crate::mqtt::Message;
use crate::policy::{self, Reason, Route};
use crate::protocol::ErrorCode;
use crate::store::{Remember, cache, now_ms};

/// How long the front stage waits for work before looking at its deadlines and stop flag.
const IDLE: Duration = Duration::from_millis(50);

/// A request waiting for its answer, as the deadline watch sees it.
#[derive(Debug)]
struct Watched {
    slot: Weak<Slot>,
    budget: Duration,
    received: Instant,
}

pub(super) struct Front {
    shared: Arc<Shared>,
    arrivals_rx: flume::Receiver<Arrival>,
    jobs_tx: flume::Sender<Job>,
    /// Runs quick models here when nothing waits.
    inline: Worker,
    stop: Arc<AtomicBool>,
    deadlines: BinaryHeap<Reverse<(Instant, u64)>>,
    watched: HashMap<u64, Watched>,
    next_watch: u64,
    /// Sweep answered requests out of the watch past this many.
    sweep_at: usize,
}

/// Models whose recent p95 run is at most this many milliseconds run on the front stage's own
/// thread when nothing else waits ([`Front::runs_inline`]); a deadline is then looked at at
/// most this late.
pub(super) const INLINE_BELOW_MS: f64 = 0.5;

/// The watch is swept no sooner than at this size.
const SWEEP_MIN: usize = 4096;

impl Front {
    pub(super) fn new(
        shared: Arc<Shared>,
        arrivals_rx: flume::Receiver<Arrival>,
        jobs_tx: flume::Sender<Job>,
        stop: Arc<AtomicBool>,
    ) -> Front {
        Front {
            inline: Worker::new(shared.clone()),
            shared,
            arrivals_rx,
            jobs_tx,
            stop,
            deadlines: BinaryHeap::new(),
            watched: HashMap::new(),
            next_watch: 0,
            sweep_at: SWEEP_MIN,
        }
    }

    pub(super) fn run(mut self) {
        loop {
            if self.stop.load(Ordering::Relaxed) {
                // Past the grace period: what has not been taken is left to the broker.
                for a in self.arrivals_rx.drain() {
                    if let Arrival::Mqtt(m) = a {
                        m.ticket.release();
                    }
                }
                return;
            }
            let wait = self
                .next_deadline()
                .map_or(IDLE, |at| at.saturating_duration_since(Instant::now()))
                .min(IDLE);
            match self.arrivals_rx.recv_timeout(wait) {
                Ok(arrival) => {
                    let admitted =
                        std::panic::catch_unwind(AssertUnwindSafe(|| self.admit(arrival)));
                    if admitted.is_err() {
                        self.shared.metrics.panic("front");
                        tracing::error!(
                            "The front stage failed on a request (a panic, logged above); the request is answered `internal` and the stage goes on."
                        );
                    }
                }
                Err(flume::RecvTimeoutError::Timeout) => {}
                Err(flume::RecvTimeoutError::Disconnected) => return,
            }
            self.reap(Instant::now());
        }
    }

    fn admit(&mut self, arrival: Arrival) {
        match arrival {
            Arrival::Mqtt(m) => self.admit_mqtt(m),
            Arrival::Local {
                request,
                reply,
                received,
            } => self.admit_local(request, reply, received),
        }
    }

    fn admit_mqtt(&mut self, m: Message) {
        let shared = self.shared.clone();
        let Message {
            topic,
            payload,
            response_topic,
            correlation,
            expiry_secs,
            received,
            ticket,
        } = m;
        let now = now_ms();
        let decoded = decode(
            &shared.topics,
            &shared.limits,
            &topic,
            &payload,
            response_topic.as_deref(),
            correlation.as_deref(),
            expiry_secs,
        );
        let d = match decoded {
            Ok(d) => d,
            Err(Undecodable::NotARequest(why)) => {
                tracing::warn!(%why, "Ignored a message that is not a request.");
                // Acknowledged: delivering it again would not make it one.
                ticket.commit();
                return;
            }
            Err(Undecodable::Refused(r)) => {
                tracing::debug!(model = %r.model, code = ?r.code, error = %r.error, "Request refused.");
                shared.metrics.refused(r.code);
                let expires = r.expiry.and_then(|e| Expiry::after(received, e));
                Responder::new(&shared, Origin::Mqtt(ticket), r.route, r.id, None, expires)
                    .answer(&Answer::error(r.code, r.error));
                return;
            }
        };
        let Decoded {
            model,
            request,
            route,
            budget,
            bypass_cache,
            expiry,
            identity,
        } = d;
        let remember = identity.map(|(key, window)| Remember {
            key,
            expires_ms: now.saturating_add(millis(window)),
        });
        let mut responder = Responder::new(
            &shared,
            Origin::Mqtt(ticket),
            route,
            request.id.clone(),
            remember,
            expiry.and_then(|e| Expiry::after(received, e)),
        );
        let key = identity.map(|(key, _)| key);
        if let Some(key) = key {
            match self.duplicate(key, responder, now) {
                Some(r) => responder = r,
                None => return,
            }
        }
        let settings = shared.routing.live.get();
        let budget = budget.unwrap_or_else(|| settings.policy.budget_for(&model));
        let prepared = match self.prepare(&settings, &model, request, Some(payload), bypass_cache) {
            Ok(p) => p,
            Err(Refused(code, error)) => return responder.answer(&Answer::error(code, error)),
        };
        self.route(responder, &settings, model, prepared, budget, received, key);
    }

    fn admit_local(
        &mut self,
        request: LocalRequest,
        reply: flume::Sender<LocalAnswer>,
        received: Instant,
    ) {
        let shared = self.shared.clone();
        let LocalRequest {
            model,
            id,
            inputs,
            budget,
            cache,
        } = request;
        let route = crate::protocol::ReplyRoute {
            topic: shared.topics.request(&model),
            correlation: None,
            v5: false,
        };
        let responder = Responder::new(
            &shared,
            Origin::Local(reply),
            route,
            Some(id.clone()),
            None,
            None,
        );
        #[cfg(test)]
        if id == super::tests::PANIC_IN_FRONT {
            panic!("a fault injected by a test, in the front stage");
        }
        let settings = shared.routing.live.get();
        let budget = budget
            .unwrap_or_else(|| settings.policy.budget_for(&model))
            .min(shared.limits.max_budget);
        let mut v2 = InferenceRequest::from_tensors(Some(id), &inputs);
        if !cache {
            v2.parameters =
                Some(std::iter::once(("cache".to_owned(), Value::Bool(false))).collect());
        }
        let prepared = match self.prepare_decoded(&settings, &model, v2, Ok(inputs), None, !cache) {
            Ok(p) => p,
            Err(Refused(code, error)) => return responder.answer(&Answer::error(code, error)),
        };
        self.route(
            responder, &settings, model, prepared, budget, received, None,
        );
    }

    /// Answers a duplicate from its first delivery (waiting for it if it is still running), or
    /// gives the responder back when the request is new.
    fn duplicate(&mut self, key: Key, mut responder: Responder, now: i64) -> Option<Responder> {
        let shared = self.shared.clone();
        // Twice at most: a first delivery answered between the look-up and joining it is
        // found answered the second time.
        for _ in 0..2 {
            let seen = shared.registry().seen(&key, now);
            match seen {
                Seen::New => return Some(responder),
                Seen::Running(slot) => match slot.follow(responder) {
                    Ok(()) => {
                        shared.metrics.duplicate("joined");
                        return None;
                    }
                    Err(r) => responder = r,
                },
                Seen::Done(body) => {
                    shared.metrics.duplicate("replayed");
                    responder.answer(&Answer::Remembered(body));
                    return None;
                }
                Seen::OnDisk => {
                    return match shared.store.remembered(key, now) {
                        Some(body) => {
                            shared.metrics.duplicate("replayed");
                            responder.answer(&Answer::Remembered(Arc::new(body)));
                            None
                        }
                        None => Some(responder),
                    };
                }
            }
        }
        Some(responder)
    }

    /// Parses and validates a request's inputs against its model, and keys it for the cache.
    fn prepare(
        &self,
        settings: &Settings,
        model_name: &str,
        request: InferenceRequest,
        body: Option<Bytes>,
        bypass_cache: bool,
    ) -> Result<Prepared, Refused> {
        let max = settings
            .engine
            .model(model_name)
            .map(|m| m.max_elements())
            .unwrap_or(0);
        let inputs = request.decode_inputs(max);
        self.prepare_decoded(settings, model_name, request, inputs, body, bypass_cache)
    }

    fn prepare_decoded(
        &self,
        settings: &Settings,
        model_name: &str,
        request: InferenceRequest,
        inputs: Result<Vec<models::Tensor>, models::ModelError>,
        body: Option<Bytes>,
        bypass_cache: bool,
    ) -> Result<Prepared, Refused> {
        let fail = |e: models::ModelError| {
            let code = ErrorCode::from(e.code());
            self.shared.metrics.refused(code);
            Refused(code, e.to_string())
        };
        let model = settings.engine.model(model_name).map_err(fail)?.clone();
        let inputs = inputs.map_err(fail)?;
        let cache = settings
            .cache
            .ttl_for(model.name())
            .filter(|_| !bypass_cache)
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
                    self.shared.top_k,
                );
                (key, ttl)
            });
        Ok(Prepared {
            request,
            model,
            inputs,
            cache,
            body,
        })
    }

    /// Answers from the cache, or routes: refused, to the relay, or to the local queue.
    #[allow(clippy::too_many_arguments)]
    fn route(
        &mut self,
        responder: Responder,
        settings: &Settings,
        model: String,
        prepared: Prepared,
        budget: Duration,
        received: Instant,
        key: Option<Key>,
    ) {
        let shared = self.shared.clone();
        let budget_ms = u64::try_from(budget.as_millis()).unwrap_or(u64::MAX);
        if let Some((ckey, _)) = &prepared.cache
            && let Some(value) = shared.store.cache_get(ckey, now_ms())
        {
            match serde_json::from_slice::<InferenceResponse>(&value) {
                Ok(mut response) => {
                    response.id = prepared.request.id.clone();
                    let answer = finish_response(
                        &shared,
                        response,
                        Journey {
                            route: "cache",
                            reason: Reason::Cached,
                            model: &model,
                            received,
                            budget_ms,
                            queue_ms: None,
                        },
                    );
                    return responder.answer(&answer);
                }
                Err(e) => {
                    tracing::warn!(error = %e, %model, "A cached result does not parse; running the model.");
                }
            }
        }
        // Budgets are at most policy.max_budget_ms (a day): this cannot overflow, but is checked.
        let deadline = received
            .checked_add(budget)
            .unwrap_or_else(|| received + shared.limits.max_budget);
        let slot = Slot::new(responder);
        if let Some(key) = key {
            shared.registry().running(key, &slot);
        }
        self.watch(&slot, deadline, budget, received);
        let left_ms = deadline
            .saturating_duration_since(Instant::now())
            .as_secs_f64()
            * 1e3;
        let held = shared.held_bytes.try_take(held::request_bytes(
            prepared.body.as_ref(),
            &prepared.inputs,
        ));
        let decision = policy::decide(
            &settings.policy.policy,
            &shared.signals(&model, self.jobs_tx.len(), held.is_none()),
            left_ms,
        );
        let job = Job {
            slot,
            model,
            received,
            deadline,
            budget,
            reason: decision.reason,
            prepared,
            _held: held,
        };
        match decision.route {
            Route::Reject => {
                let error = match decision.reason {
                    Reason::QueueFull => "the agent's inference queue is full and the relay cannot take the request; retry later or send to another device".to_owned(),
                    _ => {
                        let headroom = settings.policy.policy.headroom;
                        format!(
                            "answering locally would take about {:.1} ms, more than the {:.1} ms an estimate may fill of the {left_ms:.0} ms left of the request's budget (policy.headroom {headroom}), and the relay cannot take it; retry later, raise budget_ms, or send to another device",
                            // Rounded apart, so the two never print as equal.
                            (decision.local_estimate_ms * 10.0).ceil() / 10.0,
                            (left_ms * headroom * 10.0).floor() / 10.0,
                        )
                    }
                };
                shared.metrics.routed("reject", decision.reason);
                job.slot.answer(&Answer::refused(decision.reason, error));
            }
            Route::Cloud => relay::offload(&shared, job, self.jobs_tx.clone()),
            Route::Local if self.runs_inline(&job.model) => {
                shared.metrics.ran_inline();
                self.inline.serve(job);
            }
            Route::Local => relay::enqueue(&shared, &self.jobs_tx, job),
        }
    }

    /// Whether to run a request here rather than hand it to a worker: when its model is quick
    /// (p95 under [`INLINE_BELOW_MS`]), nothing else waits (no arrival, nothing queued) and a
    /// worker is free anyway. A hand-over costs two thread wake-ups, several times the run of a
    /// small model; under load the queue is rarely empty and the workers take everything.
    fn runs_inline(&self, model: &str) -> bool {
        let routing = &self.shared.routing;
        self.jobs_tx.is_empty()
            && self.arrivals_rx.is_empty()
            && routing.in_service.load(Ordering::Relaxed) < self.shared.workers
            && routing
                .times
                .percentiles(model)
                .1
                .is_some_and(|p95| p95 <= INLINE_BELOW_MS)
    }

    /// Watches a waiting request's deadline.
    fn watch(&mut self, slot: &Arc<Slot>, deadline: Instant, budget: Duration, received: Instant) {
        let id = self.next_watch;
        self.next_watch += 1;
        self.deadlines.push(Reverse((deadline, id)));
        self.watched.insert(
            id,
            Watched {
                slot: Arc::downgrade(slot),
                budget,
                received,
            },
        );
        // Answered requests leave the watch at their deadline; with long budgets and many
        // requests, sweep them out sooner, so the watch stays about as large as what waits.
        if self.watched.len() > self.sweep_at {
            self.watched
                .retain(|_, w| w.slot.upgrade().is_some_and(|s| s.is_open()));
            let watched = &self.watched;
            self.deadlines
                .retain(|Reverse((_, id))| watched.contains_key(id));
            self.sweep_at = SWEEP_MIN.max(2 * self.watched.len());
        }
    }

    /// The earliest deadline of a request still waiting. Requests answered in time leave the
    /// watch here, so the stage does not wake up at each one's deadline for nothing (at one
    /// request in flight, that was a wake-up a request).
    fn next_deadline(&mut self) -> Option<Instant> {
        while let Some(&Reverse((at, id))) = self.deadlines.peek() {
            let waiting = self
                .watched
                .get(&id)
                .and_then(|w| w.slot.upgrade())
                .is_some_and(|s| s.is_open());
            if waiting {
                return Some(at);
            }
            self.deadlines.pop();
            self.watched.remove(&id);
        }
        None
    }

    /// Answers every request whose budget has run out.
    fn reap(&mut self, now: Instant) {
        while let Some(&Reverse((at, id))) = self.deadlines.peek() {
            if at > now {
                return;
            }
            self.deadlines.pop();
            let Some(w) = self.watched.remove(&id) else {
                continue;
            };
            let Some(slot) = w.slot.upgrade() else {
                continue;
            };
            let error = format!(
                "the request's budget of {} ms ran out before it could be answered (it was {} ms in the agent); retry later, raise budget_ms, or send to another device",
                w.budget.as_millis(),
                w.received.elapsed().as_millis()
            );
            if slot.answer(&Answer::refused(Reason::WouldMissBudget, error)) {
                self.shared
                    .metrics
                    .routed("reject", Reason::WouldMissBudget);
                self.shared.metrics.deadline_passed();
            }
        }
    }
}

/// A request its model cannot take: the code and the sentence.
struct Refused(ErrorCode, String);

fn millis(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

/// The request as the relay gets it: as received, or (made inside the agent) encoded now.
impl Prepared {
    pub(super) fn body(&self) -> Bytes {
        match &self.body {
            Some(b) => b.clone(),
            None => Bytes::from(serde_json::to_vec(&self.request).unwrap_or_default()),
        }
    }
}
