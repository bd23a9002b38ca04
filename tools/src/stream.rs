//! An open-loop request stream through a real broker: requests go out at a scheduled rate
//! whatever the replies do (as sensors and cameras send them), and every reply is recorded with
//! its latency, route and reason. The demo and the offload tests drive the agent with it.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::mqttbytes::v5::{Packet, PublishProperties};
use rumqttc::v5::{AsyncClient, Event, MqttOptions};
use serde::Deserialize;

use models::stats::percentile;

/// A stretch of the stream at one rate.
#[derive(Debug, Clone, Copy)]
pub struct Phase {
    pub rate_per_s: f64,
    pub duration: Duration,
}

/// What to send.
#[derive(Debug, Clone)]
pub struct StreamConfig {
    pub broker: SocketAddr,
    /// The request topic, `tether/{device}/infer/{model}`.
    pub topic: String,
    /// Request bodies, sent in turn.
    pub payloads: Vec<Vec<u8>>,
    pub phases: Vec<Phase>,
    /// How long to wait for the last replies after the last request.
    pub linger: Duration,
    /// Set to end the stream early.
    pub stop: Option<Arc<std::sync::atomic::AtomicBool>>,
}

/// One request's fate.
#[derive(Debug, Clone)]
pub struct Outcome {
    pub phase: usize,
    /// Since the stream started.
    pub sent_at: Duration,
    /// `None`: no reply arrived.
    pub latency_ms: Option<f64>,
    /// The agent's own account of how long it held the request (`parameters.latency_ms`):
    /// from its arrival at the agent to its answer, without the broker's legs or the
    /// requester's own scheduling. Absent in refusals.
    pub agent_ms: Option<f64>,
    /// `local`, `cache`, `cloud`, or `error` (with `code`).
    pub route: String,
    pub reason: String,
    pub code: Option<String>,
    /// A refusal's sentence (the reply's `error`), cut to 200 characters.
    pub error: Option<String>,
}

/// The live view's numbers for the last second.
#[derive(Debug, Clone, Default)]
pub struct Tick {
    pub elapsed: Duration,
    pub phase: usize,
    pub offered_per_s: f64,
    pub answered_per_s: f64,
    /// Route -> (count, p50 ms, p99 ms) over the last second.
    pub routes: BTreeMap<String, (usize, f64, f64)>,
    pub rejected: usize,
}

#[derive(Debug, Deserialize)]
struct ReplyProbe {
    parameters: Option<ReplyParams>,
    code: Option<String>,
    reason: Option<String>,
    error: Option<String>,
}

#[derive(Debug, Deserialize)]
struct ReplyParams {
    route: Option<String>,
    reason: Option<String>,
    latency_ms: Option<f64>,
}

#[derive(Debug, Default)]
struct Book {
    sent: Vec<(usize, Duration)>,
    outcomes: Vec<Option<Outcome>>,
}

/// Runs the stream; calls `on_tick` about once a second; returns every request's outcome.
pub async fn run(
    cfg: StreamConfig,
    mut on_tick: impl FnMut(&Tick),
) -> Result<Vec<Outcome>, String> {
    if cfg.payloads.is_empty() {
        return Err("no request payloads to send".into());
    }
    let mut o = MqttOptions::new(
        format!("tether-stream-{}", fastrand::u32(..)),
        cfg.broker.ip().to_string(),
        cfg.broker.port(),
    );
    o.set_keep_alive(Duration::from_secs(30))
        .set_max_packet_size(Some(64 << 20));
    o.set_network_options(agent::mqtt::no_delay());
    let (client, mut eventloop) = AsyncClient::new(o, 10_000);
    let reply_topic = format!("tether-stream/{}", fastrand::u32(..));
    let book = Arc::new(Mutex::new(Book::default()));
    let start = Instant::now();
    let (subscribed_tx, subscribed_rx) = tokio::sync::oneshot::channel();
    {
        let book = book.clone();
        let client = client.clone();
        let filter = format!("{reply_topic}/#");
        tokio::spawn(async move {
            let mut subscribed_tx = Some(subscribed_tx);
            loop {
                match eventloop.poll().await {
                    Ok(Event::Incoming(Packet::ConnAck(_))) => {
                        let _ = client.try_subscribe(filter.clone(), QoS::AtLeastOnce);
                    }
                    Ok(Event::Incoming(Packet::SubAck(_))) => {
                        if let Some(tx) = subscribed_tx.take() {
                            let _ = tx.send(());
                        }
                    }
                    Ok(Event::Incoming(Packet::Publish(p))) => {
                        let Some(seq) = p
                            .properties
                            .as_ref()
                            .and_then(|pr| pr.correlation_data.as_ref())
                            .and_then(|c| <[u8; 8]>::try_from(&c[..]).ok())
                            .map(|b| u64::from_le_bytes(b) as usize)
                        else {
                            continue;
                        };
                        let probe: Option<ReplyProbe> = serde_json::from_slice(&p.payload).ok();
                        let (route, reason, code, agent_ms, error) = match probe {
                            Some(ReplyProbe {
                                code: Some(code),
                                reason,
                                error,
                                ..
                            }) => (
                                "error".to_owned(),
                                reason.unwrap_or_default(),
                                Some(code),
                                None,
                                error.map(|e| e.chars().take(200).collect()),
                            ),
                            Some(ReplyProbe {
                                parameters:
                                    Some(ReplyParams {
                                        route,
                                        reason,
                                        latency_ms,
                                    }),
                                ..
                            }) => (
                                route.unwrap_or_else(|| "?".into()),
                                reason.unwrap_or_default(),
                                None,
                                latency_ms.filter(|ms| ms.is_finite()),
                                None,
                            ),
                            _ => ("?".to_owned(), String::new(), None, None, None),
                        };
                        let now = start.elapsed();
                        let mut b = book.lock().unwrap_or_else(|p| p.into_inner());
                        if let Some(&(phase, sent_at)) = b.sent.get(seq)
                            && b.outcomes.get(seq).is_some_and(Option::is_none)
                        {
                            b.outcomes[seq] = Some(Outcome {
                                phase,
                                sent_at,
                                latency_ms: Some(now.saturating_sub(sent_at).as_secs_f64() * 1e3),
                                agent_ms,
                                route,
                                reason,
                                code,
                                error,
                            });
                        }
                    }
                    Ok(_) => {}
                    Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
                }
            }
        });
    }
    tokio::time::timeout(Duration::from_secs(10), subscribed_rx)
        .await
        .map_err(|_| "the broker did not confirm the reply subscription within 10 s".to_owned())?
        .map_err(|_| "the stream's MQTT client stopped".to_owned())?;

    let start = Instant::now();
    let mut seq = 0usize;
    let mut last_tick = start;
    let mut ticked = 0usize;
    for (phase, p) in cfg.phases.iter().enumerate() {
        let phase_start = Instant::now();
        let mut sent_in_phase = 0u64;
        let stopped = || {
            cfg.stop
                .as_ref()
                .is_some_and(|s| s.load(std::sync::atomic::Ordering::Relaxed))
        };
        if stopped() {
            break;
        }
        while phase_start.elapsed() < p.duration && !stopped() {
            // Send what the schedule owes by now, then sleep a millisecond.
            let due = (phase_start.elapsed().as_secs_f64() * p.rate_per_s) as u64;
            while sent_in_phase < due {
                let body = cfg.payloads[seq % cfg.payloads.len()].clone();
                {
                    let mut b = book.lock().unwrap_or_else(|p| p.into_inner());
                    b.sent.push((phase, start.elapsed()));
                    b.outcomes.push(None);
                }
                let props = PublishProperties {
                    response_topic: Some(format!("{reply_topic}/r")),
                    correlation_data: Some((seq as u64).to_le_bytes().to_vec().into()),
                    ..Default::default()
                };
                client
                    .publish_with_properties(
                        cfg.topic.clone(),
                        QoS::AtLeastOnce,
                        false,
                        body,
                        props,
                    )
                    .await
                    .map_err(|e| format!("cannot publish: {e}"))?;
                seq += 1;
                sent_in_phase += 1;
            }
            if last_tick.elapsed() >= Duration::from_secs(1) {
                let tick = tick_of(&book, start, last_tick, phase, &mut ticked);
                on_tick(&tick);
                last_tick = Instant::now();
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }
    let linger_end = Instant::now() + cfg.linger;
    while Instant::now() < linger_end {
        let done = {
            let b = book.lock().unwrap_or_else(|p| p.into_inner());
            b.outcomes.iter().all(Option::is_some)
        };
        if done {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let _ = client.disconnect().await;
    let b = book.lock().unwrap_or_else(|p| p.into_inner());
    Ok(b.outcomes
        .iter()
        .zip(&b.sent)
        .map(|(o, &(phase, sent_at))| {
            o.clone().unwrap_or(Outcome {
                phase,
                sent_at,
                latency_ms: None,
                agent_ms: None,
                route: "lost".into(),
                reason: String::new(),
                code: None,
                error: None,
            })
        })
        .collect())
}

fn tick_of(
    book: &Mutex<Book>,
    start: Instant,
    since: Instant,
    phase: usize,
    ticked: &mut usize,
) -> Tick {
    let b = book.lock().unwrap_or_else(|p| p.into_inner());
    let from = since.duration_since(start);
    let window = since.elapsed().as_secs_f64().max(1e-3);
    let offered = b.sent.iter().filter(|(_, t)| *t >= from).count();
    let mut routes: BTreeMap<String, Vec<f64>> = BTreeMap::new();
    let mut rejected = 0;
    let mut answered = 0;
    for o in b.outcomes.iter().flatten() {
        let Some(lat) = o.latency_ms else { continue };
        let received = o.sent_at + Duration::from_secs_f64(lat / 1e3);
        if received < from {
            continue;
        }
        answered += 1;
        if o.code.is_some() {
            rejected += 1;
        } else {
            routes.entry(o.route.clone()).or_default().push(lat);
        }
    }
    *ticked += 1;
    Tick {
        elapsed: start.elapsed(),
        phase,
        offered_per_s: offered as f64 / window,
        answered_per_s: answered as f64 / window,
        routes: routes
            .into_iter()
            .map(|(r, mut v)| {
                v.sort_by(f64::total_cmp);
                (r, (v.len(), percentile(&v, 0.5), percentile(&v, 0.99)))
            })
            .collect(),
        rejected,
    }
}

/// Figures over a set of outcomes.
#[derive(Debug, Clone, Default)]
pub struct Summary {
    pub sent: usize,
    pub answered: usize,
    pub rejected: usize,
    pub lost: usize,
    /// Answered (not rejected) requests per second over the stretch.
    pub throughput_per_s: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    /// Route -> count.
    pub routes: BTreeMap<String, usize>,
    /// Answered within `budget_ms`.
    pub within_budget: usize,
}

/// Summarises `outcomes` (of one phase, or all) against a budget.
pub fn summarize<'a>(
    outcomes: impl IntoIterator<Item = &'a Outcome>,
    seconds: f64,
    budget_ms: f64,
) -> Summary {
    let mut s = Summary::default();
    let mut lat = Vec::new();
    for o in outcomes {
        s.sent += 1;
        match (&o.code, o.latency_ms) {
            (_, None) => s.lost += 1,
            (Some(_), Some(_)) => s.rejected += 1,
            (None, Some(ms)) => {
                s.answered += 1;
                lat.push(ms);
                if ms <= budget_ms {
                    s.within_budget += 1;
                }
                *s.routes.entry(o.route.clone()).or_default() += 1;
            }
        }
    }
    lat.sort_by(f64::total_cmp);
    s.p50_ms = percentile(&lat, 0.5);
    s.p99_ms = percentile(&lat, 0.99);
    s.throughput_per_s = s.answered as f64 / seconds.max(1e-9);
    s
}
