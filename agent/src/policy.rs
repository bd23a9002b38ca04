//! Where a request goes: a pure function from what the agent knows (signals), what the request
//! asks (its budget) and the configured policy to a route and the reason for it. No IO, no
//! clock: every input is passed in, so tables of cases test it.
//!
//! Also pure: the circuit breaker that keeps a dead relay from costing anything, and the rule
//! for escalating a low-confidence local answer.

use std::time::Instant;

use serde::Serialize;

pub use crate::config::{BreakerConfig, Limits, Mode, Policy};

/// What the agent knows when a request arrives.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Signals {
    /// Local service time of this model (moving percentiles), in ms; `None` before the first
    /// run.
    pub local_p50_ms: Option<f64>,
    pub local_p95_ms: Option<f64>,
    /// Requests queued or running locally, and the workers serving them.
    pub queue_depth: usize,
    pub queue_capacity: usize,
    /// The request's bytes do not fit beside what the pipeline holds
    /// (`inference.queue_bytes`): the queue counts as full.
    pub queue_bytes_full: bool,
    pub workers: usize,
    pub cpu_percent: Option<f64>,
    pub temperature_c: Option<f64>,
    pub throttled: bool,
    pub relay: Relay,
}

/// The relay as the agent sees it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Relay {
    /// No relay configured: local only.
    None,
    /// The circuit is open: the relay is failing and is not tried.
    Down,
    /// The relay may be tried; `rtt_ms` is its round-trip estimate for this model, if known.
    Up { rtt_ms: Option<f64> },
}

/// Why a request went where it went; part of every reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Reason {
    /// The local estimate meets the budget.
    WithinBudget,
    /// Local would miss the budget; the cloud estimate meets it.
    OverBudget,
    /// Neither meets the budget; this is the faster estimate.
    Faster,
    /// The configured mode says so (`local-only`, `cloud-first`).
    Mode,
    CpuLimit,
    TemperatureLimit,
    Throttled,
    QueueLimit,
    /// The relay's circuit is open, or no relay is configured.
    RelayUnavailable,
    /// Local would miss the budget and the cloud cannot be used.
    WouldMissBudget,
    /// The local queue is full and the cloud cannot be used.
    QueueFull,
    /// A cached result.
    Cached,
    /// A low-confidence local answer was sent to the cloud model.
    Escalated,
    /// The offload failed and the request ran locally.
    OffloadFailed,
    /// The escalation failed; the local answer stands.
    EscalationFailed,
}

impl Reason {
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::WithinBudget => "within_budget",
            Reason::OverBudget => "over_budget",
            Reason::Faster => "faster",
            Reason::Mode => "mode",
            Reason::CpuLimit => "cpu_limit",
            Reason::TemperatureLimit => "temperature_limit",
            Reason::Throttled => "throttled",
            Reason::QueueLimit => "queue_limit",
            Reason::RelayUnavailable => "relay_unavailable",
            Reason::WouldMissBudget => "would_miss_budget",
            Reason::QueueFull => "queue_full",
            Reason::Cached => "cached",
            Reason::Escalated => "escalated",
            Reason::OffloadFailed => "offload_failed",
            Reason::EscalationFailed => "escalation_failed",
        }
    }
}

/// Where to send a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    Local,
    Cloud,
    /// Answer `overloaded` at once.
    Reject,
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Decision {
    pub route: Route,
    pub reason: Reason,
    /// The estimates the decision compared, in ms (for the reply and the logs).
    pub local_estimate_ms: f64,
    pub cloud_estimate_ms: Option<f64>,
}

/// The relay's round trip assumed before any was measured.
pub const DEFAULT_RELAY_RTT_MS: f64 = 50.0;
/// The local service time assumed before the model has run.
pub const DEFAULT_SERVICE_MS: f64 = 5.0;

/// The expected time to answer locally: the wait for the requests ahead, spread over the
/// workers, plus this request's own (95th percentile) service time.
pub fn local_estimate_ms(s: &Signals) -> f64 {
    let p50 = s.local_p50_ms.unwrap_or(DEFAULT_SERVICE_MS);
    let p95 = s.local_p95_ms.unwrap_or(p50);
    let ahead = s.queue_depth as f64 / s.workers.max(1) as f64;
    ahead * p50 + p95
}

/// Decides where a request with `budget_ms` left goes.
pub fn decide(policy: &Policy, s: &Signals, budget_ms: f64) -> Decision {
    let local = local_estimate_ms(s);
    let cloud = match s.relay {
        Relay::Up { rtt_ms } => Some(rtt_ms.unwrap_or(DEFAULT_RELAY_RTT_MS)),
        Relay::None | Relay::Down => None,
    };
    let d = |route, reason| Decision {
        route,
        reason,
        local_estimate_ms: local,
        cloud_estimate_ms: cloud,
    };
    let queue_full = s.queue_depth >= s.queue_capacity || s.queue_bytes_full;
    let usable = budget_ms * policy.headroom;
    let local_fits = local <= usable && !queue_full;
    let cloud_fits = cloud.is_some_and(|c| c <= usable);

    if policy.mode == Mode::LocalOnly || cloud.is_none() {
        let unavailable = policy.mode != Mode::LocalOnly;
        // Before the model's first run its time is a guess (DEFAULT_SERVICE_MS), and a guess
        // is no reason to refuse: a fresh agent under a burst of tight budgets would turn away
        // work it does in a fraction of a millisecond. A request whose budget runs out while
        // it waits is still refused then, by the deadline watch.
        let measured = s.local_p50_ms.is_some();
        return if queue_full {
            d(Route::Reject, Reason::QueueFull)
        } else if local_fits || !measured {
            d(
                Route::Local,
                if unavailable && s.relay == Relay::Down {
                    Reason::RelayUnavailable
                } else if policy.mode == Mode::LocalOnly {
                    Reason::Mode
                } else {
                    Reason::WithinBudget
                },
            )
        } else {
            d(Route::Reject, Reason::WouldMissBudget)
        };
    }

    // A relay is there from here on.
    let forced = if s.throttled {
        Some(Reason::Throttled)
    } else if s
        .temperature_c
        .is_some_and(|t| t >= policy.limits.temperature_c)
    {
        Some(Reason::TemperatureLimit)
    } else if s
        .cpu_percent
        .is_some_and(|c| c >= policy.limits.cpu_percent)
    {
        Some(Reason::CpuLimit)
    } else if s.queue_depth >= policy.limits.queue {
        Some(Reason::QueueLimit)
    } else if s.queue_bytes_full {
        Some(Reason::QueueFull)
    } else {
        None
    };
    if let Some(reason) = forced {
        return d(Route::Cloud, reason);
    }
    match policy.mode {
        Mode::CloudFirst if cloud_fits => d(Route::Cloud, Reason::Mode),
        _ if local_fits => d(Route::Local, Reason::WithinBudget),
        _ if cloud_fits => d(Route::Cloud, Reason::OverBudget),
        _ if queue_full => d(Route::Cloud, Reason::QueueFull),
        _ => {
            if cloud.is_some_and(|c| c < local) {
                d(Route::Cloud, Reason::Faster)
            } else {
                d(Route::Local, Reason::Faster)
            }
        }
    }
}

/// Whether a local answer with top-1 probability `top1` goes to the cloud model.
pub fn should_escalate(top1: f64, threshold: Option<f64>, remaining_ms: f64, relay: Relay) -> bool {
    let Some(threshold) = threshold else {
        return false;
    };
    let Relay::Up { rtt_ms } = relay else {
        return false;
    };
    top1 < threshold && rtt_ms.unwrap_or(DEFAULT_RELAY_RTT_MS) <= remaining_ms
}

/// The breaker's state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BreakerState {
    Closed,
    Open,
    /// One probe is in flight; its outcome closes or reopens the circuit.
    HalfOpen,
}

impl BreakerState {
    pub fn as_str(self) -> &'static str {
        match self {
            BreakerState::Closed => "closed",
            BreakerState::Open => "open",
            BreakerState::HalfOpen => "half_open",
        }
    }
}

/// A circuit breaker over the relay: closed (calls go through), open (no calls, so a dead relay
/// costs nothing), half-open (one probe). Time is passed in.
#[derive(Debug, Clone)]
pub struct Breaker {
    cfg: BreakerConfig,
    state: BreakerState,
    failures_in_a_row: u32,
    recent: std::collections::VecDeque<bool>,
    opened_at: Option<Instant>,
}

impl Breaker {
    pub fn new(cfg: BreakerConfig) -> Breaker {
        Breaker {
            cfg,
            state: BreakerState::Closed,
            failures_in_a_row: 0,
            recent: std::collections::VecDeque::with_capacity(cfg.window),
            opened_at: None,
        }
    }

    pub fn state(&self) -> BreakerState {
        self.state
    }

    /// Whether a call may go out now. An open circuit whose time is up lets exactly one probe
    /// through (and is half-open until its outcome is recorded).
    pub fn allow(&mut self, now: Instant) -> bool {
        match self.state {
            BreakerState::Closed => true,
            BreakerState::HalfOpen => false,
            BreakerState::Open => {
                if self
                    .opened_at
                    .is_some_and(|t| now.duration_since(t) >= self.cfg.open_for)
                {
                    self.state = BreakerState::HalfOpen;
                    true
                } else {
                    false
                }
            }
        }
    }

    /// Whether a call would be allowed, without taking the probe.
    pub fn would_allow(&self, now: Instant) -> bool {
        match self.state {
            BreakerState::Closed => true,
            BreakerState::HalfOpen => false,
            BreakerState::Open => self
                .opened_at
                .is_some_and(|t| now.duration_since(t) >= self.cfg.open_for),
        }
    }

    /// Records a call's outcome.
    pub fn record(&mut self, ok: bool, now: Instant) {
        if self.recent.len() == self.cfg.window {
            self.recent.pop_front();
        }
        self.recent.push_back(ok);
        match (self.state, ok) {
            (BreakerState::HalfOpen, true) => {
                self.state = BreakerState::Closed;
                self.failures_in_a_row = 0;
                self.recent.clear();
            }
            (BreakerState::HalfOpen, false) => self.open(now),
            (_, true) => self.failures_in_a_row = 0,
            (_, false) => {
                self.failures_in_a_row += 1;
                let failed = self.recent.iter().filter(|ok| !**ok).count();
                let rate_tripped = self.recent.len() == self.cfg.window
                    && failed as f64 / self.cfg.window as f64 >= self.cfg.error_rate;
                if self.failures_in_a_row >= self.cfg.consecutive_failures || rate_tripped {
                    self.open(now);
                }
            }
        }
    }

    fn open(&mut self, now: Instant) {
        self.state = BreakerState::Open;
        self.opened_at = Some(now);
        self.failures_in_a_row = 0;
        self.recent.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    const POLICY: Policy = Policy {
        mode: Mode::LocalFirst,
        limits: Limits {
            cpu_percent: 90.0,
            temperature_c: 80.0,
            queue: 32,
        },
        headroom: 1.0,
    };

    fn signals() -> Signals {
        Signals {
            local_p50_ms: Some(4.0),
            local_p95_ms: Some(5.0),
            queue_depth: 0,
            queue_capacity: 64,
            queue_bytes_full: false,
            workers: 1,
            cpu_percent: Some(20.0),
            temperature_c: Some(45.0),
            throttled: false,
            relay: Relay::Up { rtt_ms: Some(10.0) },
        }
    }

    fn with(mode: Mode) -> Policy {
        Policy { mode, ..POLICY }
    }

    #[test]
    fn local_estimate_counts_the_queue_per_worker() {
        let mut s = signals();
        assert_eq!(local_estimate_ms(&s), 5.0);
        s.queue_depth = 10;
        assert_eq!(local_estimate_ms(&s), 45.0);
        s.workers = 2;
        assert_eq!(local_estimate_ms(&s), 25.0);
        s.local_p50_ms = None;
        s.local_p95_ms = None;
        assert_eq!(
            local_estimate_ms(&s),
            5.0 * DEFAULT_SERVICE_MS + DEFAULT_SERVICE_MS
        );
    }

    /// (description, mode, tweak, budget, expected route, expected reason)
    type Case = (&'static str, Mode, fn(&mut Signals), f64, Route, Reason);

    #[test]
    fn the_decision_table() {
        let cases: &[Case] = &[
            // local-first
            (
                "idle, generous budget",
                Mode::LocalFirst,
                |_| {},
                100.0,
                Route::Local,
                Reason::WithinBudget,
            ),
            (
                "queue pushes local over budget",
                Mode::LocalFirst,
                |s| s.queue_depth = 20,
                50.0,
                Route::Cloud,
                Reason::OverBudget,
            ),
            (
                "neither fits, cloud faster",
                Mode::LocalFirst,
                |s| s.queue_depth = 20,
                8.0,
                Route::Cloud,
                Reason::Faster,
            ),
            (
                "neither fits, local faster",
                Mode::LocalFirst,
                |s| {
                    s.relay = Relay::Up {
                        rtt_ms: Some(500.0),
                    }
                },
                2.0,
                Route::Local,
                Reason::Faster,
            ),
            (
                "unknown relay rtt uses the default",
                Mode::LocalFirst,
                |s| {
                    s.queue_depth = 20;
                    s.relay = Relay::Up { rtt_ms: None }
                },
                60.0,
                Route::Cloud,
                Reason::OverBudget,
            ),
            (
                "cpu over the limit",
                Mode::LocalFirst,
                |s| s.cpu_percent = Some(95.0),
                100.0,
                Route::Cloud,
                Reason::CpuLimit,
            ),
            (
                "cpu at the limit",
                Mode::LocalFirst,
                |s| s.cpu_percent = Some(90.0),
                100.0,
                Route::Cloud,
                Reason::CpuLimit,
            ),
            (
                "hot",
                Mode::LocalFirst,
                |s| s.temperature_c = Some(85.0),
                100.0,
                Route::Cloud,
                Reason::TemperatureLimit,
            ),
            (
                "throttled",
                Mode::LocalFirst,
                |s| s.throttled = true,
                100.0,
                Route::Cloud,
                Reason::Throttled,
            ),
            (
                "queue over its limit",
                Mode::LocalFirst,
                |s| s.queue_depth = 32,
                10_000.0,
                Route::Cloud,
                Reason::QueueLimit,
            ),
            (
                "unknown cpu and temperature force nothing",
                Mode::LocalFirst,
                |s| {
                    s.cpu_percent = None;
                    s.temperature_c = None
                },
                100.0,
                Route::Local,
                Reason::WithinBudget,
            ),
            (
                "queue full, cloud over budget too",
                Mode::LocalFirst,
                |s| {
                    s.queue_depth = 64;
                    s.queue_capacity = 64;
                    s.relay = Relay::Up {
                        rtt_ms: Some(900.0),
                    }
                },
                10_000.0,
                Route::Cloud,
                Reason::QueueLimit,
            ),
            // relay down or absent: local when it fits, else reject
            (
                "relay down, fits",
                Mode::LocalFirst,
                |s| s.relay = Relay::Down,
                100.0,
                Route::Local,
                Reason::RelayUnavailable,
            ),
            (
                "relay down, would miss",
                Mode::LocalFirst,
                |s| {
                    s.relay = Relay::Down;
                    s.queue_depth = 20
                },
                50.0,
                Route::Reject,
                Reason::WouldMissBudget,
            ),
            (
                "relay down, queue full",
                Mode::LocalFirst,
                |s| {
                    s.relay = Relay::Down;
                    s.queue_depth = 64
                },
                10_000.0,
                Route::Reject,
                Reason::QueueFull,
            ),
            (
                "relay down, the request's bytes do not fit: queue full",
                Mode::LocalFirst,
                |s| {
                    s.relay = Relay::Down;
                    s.queue_bytes_full = true
                },
                10_000.0,
                Route::Reject,
                Reason::QueueFull,
            ),
            (
                "bytes do not fit, relay up: offloaded",
                Mode::LocalFirst,
                |s| s.queue_bytes_full = true,
                10_000.0,
                Route::Cloud,
                Reason::QueueFull,
            ),
            (
                "relay down, hot: still local",
                Mode::LocalFirst,
                |s| {
                    s.relay = Relay::Down;
                    s.temperature_c = Some(90.0)
                },
                100.0,
                Route::Local,
                Reason::RelayUnavailable,
            ),
            (
                "no relay, fits",
                Mode::LocalFirst,
                |s| s.relay = Relay::None,
                100.0,
                Route::Local,
                Reason::WithinBudget,
            ),
            (
                "no relay, would miss",
                Mode::LocalFirst,
                |s| {
                    s.relay = Relay::None;
                    s.queue_depth = 30
                },
                50.0,
                Route::Reject,
                Reason::WouldMissBudget,
            ),
            (
                "no relay, not run yet: the guess does not refuse",
                Mode::LocalFirst,
                |s| {
                    s.relay = Relay::None;
                    s.queue_depth = 30;
                    s.local_p50_ms = None;
                    s.local_p95_ms = None;
                },
                50.0,
                Route::Local,
                Reason::WithinBudget,
            ),
            (
                "relay down, not run yet",
                Mode::LocalFirst,
                |s| {
                    s.relay = Relay::Down;
                    s.queue_depth = 30;
                    s.local_p50_ms = None;
                },
                50.0,
                Route::Local,
                Reason::RelayUnavailable,
            ),
            (
                "local-only, not run yet",
                Mode::LocalOnly,
                |s| {
                    s.queue_depth = 30;
                    s.local_p50_ms = None;
                },
                50.0,
                Route::Local,
                Reason::Mode,
            ),
            (
                "no relay, not run yet, queue full",
                Mode::LocalFirst,
                |s| {
                    s.relay = Relay::None;
                    s.queue_depth = 1000;
                    s.local_p50_ms = None;
                },
                50.0,
                Route::Reject,
                Reason::QueueFull,
            ),
            // local-only
            (
                "local-only fits",
                Mode::LocalOnly,
                |_| {},
                100.0,
                Route::Local,
                Reason::Mode,
            ),
            (
                "local-only hot: still local",
                Mode::LocalOnly,
                |s| s.cpu_percent = Some(99.0),
                100.0,
                Route::Local,
                Reason::Mode,
            ),
            (
                "local-only would miss",
                Mode::LocalOnly,
                |s| s.queue_depth = 30,
                50.0,
                Route::Reject,
                Reason::WouldMissBudget,
            ),
            (
                "local-only queue full",
                Mode::LocalOnly,
                |s| s.queue_depth = 64,
                10_000.0,
                Route::Reject,
                Reason::QueueFull,
            ),
            // cloud-first
            (
                "cloud-first, cloud fits",
                Mode::CloudFirst,
                |_| {},
                100.0,
                Route::Cloud,
                Reason::Mode,
            ),
            (
                "cloud-first, cloud too slow, local fits",
                Mode::CloudFirst,
                |s| {
                    s.relay = Relay::Up {
                        rtt_ms: Some(300.0),
                    }
                },
                100.0,
                Route::Local,
                Reason::WithinBudget,
            ),
            (
                "cloud-first, relay down",
                Mode::CloudFirst,
                |s| s.relay = Relay::Down,
                100.0,
                Route::Local,
                Reason::RelayUnavailable,
            ),
            (
                "cloud-first, hot",
                Mode::CloudFirst,
                |s| s.temperature_c = Some(81.0),
                100.0,
                Route::Cloud,
                Reason::TemperatureLimit,
            ),
        ];
        for (what, mode, tweak, budget, route, reason) in cases {
            let mut s = signals();
            tweak(&mut s);
            let d = decide(&with(*mode), &s, *budget);
            assert_eq!((d.route, d.reason), (*route, *reason), "{what}: {d:?}");
        }
    }

    #[test]
    fn headroom_keeps_part_of_the_budget_free() {
        let s = signals(); // local estimate 5 ms, cloud 10 ms
        let tight = Policy {
            headroom: 0.5,
            ..POLICY
        };
        assert_eq!(decide(&tight, &s, 10.0).route, Route::Local);
        assert_eq!(
            decide(&tight, &s, 9.0).reason,
            Reason::Faster,
            "5 ms is over half of 9"
        );
        assert_eq!(decide(&POLICY, &s, 9.0).reason, Reason::WithinBudget);
    }

    #[test]
    fn escalation_needs_low_confidence_a_threshold_a_relay_and_time() {
        let up = Relay::Up { rtt_ms: Some(20.0) };
        assert!(should_escalate(0.4, Some(0.6), 100.0, up));
        assert!(
            !should_escalate(0.7, Some(0.6), 100.0, up),
            "confident enough"
        );
        assert!(
            !should_escalate(0.6, Some(0.6), 100.0, up),
            "at the threshold"
        );
        assert!(
            !should_escalate(0.4, None, 100.0, up),
            "no threshold: never"
        );
        assert!(!should_escalate(0.4, Some(0.6), 10.0, up), "no time left");
        assert!(!should_escalate(0.4, Some(0.6), 100.0, Relay::Down));
        assert!(!should_escalate(0.4, Some(0.6), 100.0, Relay::None));
    }

    fn breaker() -> Breaker {
        Breaker::new(BreakerConfig {
            consecutive_failures: 3,
            error_rate: 0.5,
            window: 10,
            open_for: Duration::from_secs(5),
        })
    }

    #[test]
    fn the_breaker_opens_after_failures_in_a_row_and_probes_once() {
        let t0 = Instant::now();
        let mut b = breaker();
        b.record(false, t0);
        b.record(false, t0);
        assert_eq!(b.state(), BreakerState::Closed);
        b.record(false, t0);
        assert_eq!(b.state(), BreakerState::Open);
        assert!(!b.allow(t0 + Duration::from_secs(4)), "still open");
        assert!(b.would_allow(t0 + Duration::from_secs(5)));
        assert!(b.allow(t0 + Duration::from_secs(5)), "the probe");
        assert_eq!(b.state(), BreakerState::HalfOpen);
        assert!(!b.allow(t0 + Duration::from_secs(5)), "only one probe");
        b.record(false, t0 + Duration::from_secs(6));
        assert_eq!(b.state(), BreakerState::Open, "a failed probe reopens");
        assert!(
            !b.allow(t0 + Duration::from_secs(10)),
            "open again from the probe's failure"
        );
        assert!(b.allow(t0 + Duration::from_secs(11)));
        b.record(true, t0 + Duration::from_secs(11));
        assert_eq!(b.state(), BreakerState::Closed, "a good probe closes");
        assert!(b.allow(t0 + Duration::from_secs(11)));
    }

    #[test]
    fn the_breaker_opens_on_the_error_rate_and_successes_reset_the_run() {
        let t0 = Instant::now();
        let mut b = breaker();
        // Alternating: never three in a row, but half of the window fails.
        for i in 0..9 {
            b.record(i % 2 == 1, t0);
            assert_eq!(b.state(), BreakerState::Closed, "call {i}");
        }
        b.record(false, t0);
        assert_eq!(b.state(), BreakerState::Open, "5 of the last 10 failed");
    }
}
