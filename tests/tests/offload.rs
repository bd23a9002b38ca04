//! Agent + relay + broker, end to end: offloading under three times the local capacity, a relay
//! killed and brought back mid-run, and confidence escalation.
//!
//! The agent runs digits with one worker whose every inference is held to 10 ms
//! (`inference.emulated_service_ms`): on this development machine the model itself takes tens
//! of microseconds, and the relay shares the same two cores, so without it local capacity
//! would never be the bottleneck. The relay runs the real cloud model, in a runtime of its own
//! that is shut down to kill it.

#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "../../agent/tests/common/mod.rs"]
mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::TestAgent;
use serde_json::{Value, json};
use tools::stream::{self, Outcome, Phase, StreamConfig};

/// One worker at 10 ms an inference: about 100 requests a second.
const SERVICE_MS: f64 = 10.0;
const LOCAL_CAPACITY: f64 = 1000.0 / SERVICE_MS;
/// Room for the broker and a noisy, shared 2-core machine on top of the budget.
const SLACK_MS: f64 = 25.0;
const BUDGET_MS: f64 = 150.0;

/// The tests here measure latency against a budget on a 2-core machine: run side by side (the
/// test harness's default), each one's load starves the others and a request can wait a hundred
/// milliseconds before the agent even sees it. One at a time.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// A relay in a runtime of its own; dropping or killing it closes every socket at once.
struct Relay {
    addr: SocketAddr,
    stop_tx: Option<std::sync::mpsc::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Relay {
    fn start(addr: &str) -> Relay {
        let mut raw = cloud_relay::config::RawConfig {
            listen: addr.into(),
            models_dir: Some(models::default_zoo_dir()),
            workers: Some(1),
            ..Default::default()
        };
        raw.shutdown_grace_ms = 0;
        let config = raw.validate().unwrap();
        let state = cloud_relay::State::build(config).unwrap();
        let (addr_tx, addr_rx) = std::sync::mpsc::channel();
        let (stop_tx, stop_rx) = std::sync::mpsc::channel::<()>();
        let listen = addr.to_owned();
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .enable_all()
                .build()
                .unwrap();
            let listener = rt.block_on(tokio::net::TcpListener::bind(&listen)).unwrap();
            addr_tx.send(listener.local_addr().unwrap()).unwrap();
            rt.spawn(cloud_relay::serve(state, listener, std::future::pending()));
            let _ = stop_rx.recv();
            // Like a killed process: every task and socket goes at once.
            rt.shutdown_background();
        });
        Relay {
            addr: addr_rx.recv().unwrap(),
            stop_tx: Some(stop_tx),
            thread: Some(thread),
        }
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn kill(&mut self) {
        if let Some(tx) = self.stop_tx.take() {
            let _ = tx.send(());
        }
        if let Some(t) = self.thread.take() {
            t.join().unwrap();
        }
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Digits requests from the test split, each different (so the cache plays no part).
fn digits_payloads(n: usize) -> Vec<Vec<u8>> {
    let manifest = models::Manifest::load(models::default_zoo_dir()).unwrap();
    let split = manifest
        .test_split(manifest.model("digits").unwrap())
        .unwrap();
    (0..n)
        .map(|i| {
            let sample = split.samples(i % split.len(), i % split.len() + 1);
            serde_json::to_vec(&json!({
                "id": format!("r{i}"),
                "parameters": {"budget_ms": BUDGET_MS, "cache": false},
                "inputs": [{"name": "input", "shape": [1, 1, 8, 8], "datatype": "FP32", "data": sample}],
            }))
            .unwrap()
        })
        .collect()
}

async fn agent_with(device: &str, relay_url: Option<String>) -> TestAgent {
    TestAgent::start(device, move |raw| {
        raw.inference.workers = Some(1);
        raw.inference.queue = 256;
        raw.inference.emulated_service_ms = SERVICE_MS;
        // Built before the stream starts: these tests measure routing under load, not the
        // first request's wait for its model (which a budget-bound deployment preloads too).
        raw.inference.preload = vec!["digits".into()];
        raw.store.cache.enabled = false;
        raw.policy.default_budget_ms = BUDGET_MS as u64;
        if let Some(url) = relay_url {
            let mut r = agent::config::RawRelay::new(url);
            r.breaker_open_ms = 500;
            raw.relay = Some(r);
        }
    })
    .await
}

fn stream_config(agent: &TestAgent, device: &str, phases: Vec<Phase>) -> StreamConfig {
    StreamConfig {
        broker: agent.v5_addr(),
        topic: format!("tether/{device}/infer/digits"),
        payloads: digits_payloads(450),
        phases,
        linger: Duration::from_secs(3),
        stop: None,
    }
}

fn describe(outcomes: &[Outcome]) -> String {
    let s = stream::summarize(outcomes, 1.0, BUDGET_MS);
    let mut refused: std::collections::BTreeMap<String, usize> = std::collections::BTreeMap::new();
    for o in outcomes.iter().filter(|o| o.code.is_some()) {
        *refused
            .entry(format!("{}/{}", o.code.as_deref().unwrap_or(""), o.reason))
            .or_default() += 1;
    }
    let agent_max = outcomes
        .iter()
        .filter_map(|o| o.agent_ms)
        .fold(0.0_f64, f64::max);
    // Which refusal it was (the policy's estimate or the deadline watch) and when.
    let first_refusal = outcomes
        .iter()
        .find(|o| o.code.is_some())
        .map(|o| {
            format!(
                "; first refusal sent at {:.2} s, answered after {:.1} ms: {}",
                o.sent_at.as_secs_f64(),
                o.latency_ms.unwrap_or(f64::NAN),
                o.error.as_deref().unwrap_or("")
            )
        })
        .unwrap_or_default();
    format!(
        "sent {} answered {} rejected {} lost {} p50 {:.1} ms p99 {:.1} ms (agent's own max {agent_max:.1} ms) routes {:?} refused {:?}{first_refusal}",
        s.sent, s.answered, s.rejected, s.lost, s.p50_ms, s.p99_ms, s.routes, refused
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn at_three_times_local_capacity_offload_keeps_p99_within_budget() {
    let _alone = ONE_AT_A_TIME.lock().await;
    let relay = Relay::start("127.0.0.1:0");
    let device = "offload-3x";
    let agent = agent_with(device, Some(relay.url())).await;
    let outcomes = stream::run(
        stream_config(
            &agent,
            device,
            vec![Phase {
                rate_per_s: 3.0 * LOCAL_CAPACITY,
                duration: Duration::from_secs(5),
            }],
        ),
        |_| {},
    )
    .await
    .unwrap();
    let s = stream::summarize(&outcomes, 5.0, BUDGET_MS);
    eprintln!("3x local capacity with the relay: {}", describe(&outcomes));
    assert_eq!(s.lost, 0, "every request gets a reply");
    // A request is either answered or refused `overloaded`: a refusal is the budget kept (the
    // deadline watch answers a request whose budget ran out) and never another error.
    for o in outcomes.iter().filter(|o| o.code.is_some()) {
        assert_eq!(o.code.as_deref(), Some("overloaded"), "{o:?}");
    }
    // The promise at three times local capacity: 99 % of all requests answered with a result
    // within the budget, refusals counted as misses. The budget is the agent's; the broker's
    // round trip comes on top, and this machine is shared, so a few milliseconds of slack (the
    // run quoted in the README: p99 124.7 ms, nothing refused). Not "nothing refused": on a
    // shared CI machine the agent once held requests up to 147 ms and refused 10 of 1,499 at
    // their deadline, which is the budget kept, not broken. Without the relay about two
    // thirds would be refused, so this still fails if offloading does not work.
    let answered_in_time = outcomes
        .iter()
        .filter(|o| o.code.is_none() && o.latency_ms.is_some_and(|ms| ms <= BUDGET_MS + SLACK_MS))
        .count();
    assert!(
        answered_in_time as f64 >= 0.99 * s.sent as f64,
        "fewer than 99 % of the requests were answered within the budget: {answered_in_time} of {}: {}",
        s.sent,
        describe(&outcomes)
    );
    let cloud = s.routes.get("cloud").copied().unwrap_or(0);
    let local = s.routes.get("local").copied().unwrap_or(0);
    assert!(local > 0 && cloud > 0, "both routes used: {:?}", s.routes);
    assert!(
        cloud as f64 > 0.4 * s.answered as f64,
        "most of the excess goes to the relay: {:?}",
        s.routes
    );
    agent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_relay_opens_the_circuit_and_offload_resumes_when_it_returns() {
    let _alone = ONE_AT_A_TIME.lock().await;
    let mut relay = Relay::start("127.0.0.1:0");
    let addr = relay.addr;
    let device = "offload-kill";
    let agent = agent_with(device, Some(relay.url())).await;
    let rate = 3.0 * LOCAL_CAPACITY;
    let phase = |s| Phase {
        rate_per_s: rate,
        duration: Duration::from_secs(s),
    };
    // 0-3 s relay up, 3-7 s relay dead, 7-11 s relay back (on the same address).
    let killer = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_secs(3)).await;
        tokio::task::spawn_blocking(move || relay.kill())
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_secs(4)).await;
        tokio::task::spawn_blocking(move || Relay::start(&addr.to_string()))
            .await
            .unwrap()
    });
    let outcomes = stream::run(
        stream_config(&agent, device, vec![phase(3), phase(4), phase(4)]),
        |_| {},
    )
    .await
    .unwrap();
    let _relay = killer.await.unwrap();
    for (i, name) in ["relay up", "relay dead", "relay back"].iter().enumerate() {
        let of_phase: Vec<Outcome> = outcomes.iter().filter(|o| o.phase == i).cloned().collect();
        eprintln!("{name}: {}", describe(&of_phase));
    }
    // Every request either succeeds or is refused `overloaded`, and the agent holds none past
    // its budget by its own clock (the budget is the agent's promise; the deadline watch keeps
    // it). The requester's clock adds the broker's legs and this process's scheduling: the
    // relay restarting at 7 s builds its model on the same two cores, and in CI a reply that
    // the agent answered in time has reached the requester 294 ms after it was sent. So the
    // requester's view is held to its 99th percentile, not to its worst request.
    for o in &outcomes {
        assert!(o.latency_ms.is_some(), "a request got no reply: {o:?}");
        if let Some(code) = &o.code {
            assert_eq!(code, "overloaded", "{o:?}");
        }
        if let Some(ms) = o.agent_ms {
            assert!(
                ms <= BUDGET_MS + SLACK_MS,
                "the agent held a request {ms:.1} ms: {o:?}"
            );
        }
    }
    assert!(
        outcomes.iter().any(|o| o.agent_ms.is_some()),
        "the replies carry the agent's own latency"
    );
    for phase in 0..3 {
        let of_phase: Vec<Outcome> = outcomes
            .iter()
            .filter(|o| o.phase == phase)
            .cloned()
            .collect();
        let s = stream::summarize(&of_phase, 4.0, BUDGET_MS);
        assert!(
            s.p99_ms <= BUDGET_MS + 3.0 * SLACK_MS,
            "phase {phase}: p99 {:.1} ms as the requester saw it",
            s.p99_ms
        );
    }
    // While the relay is dead (after the circuit has had a moment to open) nothing goes there.
    let dead: Vec<&Outcome> = outcomes
        .iter()
        .filter(|o| o.phase == 1 && o.sent_at >= Duration::from_secs(4))
        .collect();
    assert!(
        dead.iter().all(|o| o.route != "cloud"),
        "cloud answers from a dead relay"
    );
    assert!(
        dead.iter().any(|o| o.route == "local"),
        "local keeps serving"
    );
    // Back: offload resumes.
    let back: Vec<&Outcome> = outcomes
        .iter()
        .filter(|o| o.phase == 2 && o.sent_at >= Duration::from_secs(8))
        .collect();
    let cloud_back = back.iter().filter(|o| o.route == "cloud").count();
    assert!(
        cloud_back as f64 > 0.3 * back.len() as f64,
        "offload resumed: {cloud_back} of {}",
        back.len()
    );
    agent.stop().await;
}

/// A digits image between two classes: the average of the first test samples of two digits.
fn ambiguous_digit() -> Vec<f32> {
    let manifest = models::Manifest::load(models::default_zoo_dir()).unwrap();
    let split = manifest
        .test_split(manifest.model("digits").unwrap())
        .unwrap();
    let first = |label: u8| {
        let i = split.labels.iter().position(|l| *l == label).unwrap();
        split.samples(i, i + 1).to_vec()
    };
    let (a, b) = (first(3), first(8));
    a.iter().zip(&b).map(|(x, y)| (x + y) / 2.0).collect()
}

fn request(data: &[f32]) -> Vec<u8> {
    serde_json::to_vec(&json!({
        "inputs": [{"name": "input", "shape": [1, 1, 8, 8], "datatype": "FP32", "data": data}],
        "parameters": {"cache": false},
    }))
    .unwrap()
}

async fn ask(agent: &TestAgent, device: &str, body: &[u8]) -> Value {
    let mut req =
        common::Requester::connect(agent.v5_addr(), &format!("esc-{}", fastrand::u32(..))).await;
    req.send(&format!("tether/{device}/infer/digits"), body, b"c")
        .await;
    req.next(Duration::from_secs(20)).await.body
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_low_confidence_answer_is_escalated_to_the_cloud_model() {
    let _alone = ONE_AT_A_TIME.lock().await;
    let relay = Relay::start("127.0.0.1:0");
    let device = "escalate";
    let threshold = 0.9;
    let agent = TestAgent::start(device, |raw| {
        let r = agent::config::RawRelay::new(relay.url());
        raw.relay = Some(r);
        raw.policy.models.insert(
            "digits".into(),
            agent::config::RawModelPolicy {
                budget_ms: Some(2000),
                escalate_below: Some(threshold),
                ..Default::default()
            },
        );
    })
    .await;
    let unsure = ask(&agent, device, &request(&ambiguous_digit())).await;
    assert_eq!(unsure["parameters"]["route"], "cloud", "{unsure}");
    assert_eq!(unsure["parameters"]["reason"], "escalated", "{unsure}");
    let local_top1 = unsure["parameters"]["escalated_from"]["top1"]
        .as_f64()
        .unwrap();
    assert!(local_top1 < threshold, "{unsure}");
    assert_eq!(unsure["model_name"], "digits");

    // A clear digit stays local.
    let manifest = models::Manifest::load(models::default_zoo_dir()).unwrap();
    let split = manifest
        .test_split(manifest.model("digits").unwrap())
        .unwrap();
    let clear = ask(&agent, device, &request(split.samples(0, 1))).await;
    assert_eq!(clear["parameters"]["route"], "local", "{clear}");
    agent.stop().await;
    drop(relay);

    // With the relay gone the escalation fails and the local answer stands, marked so.
    let dead = Relay::start("127.0.0.1:0");
    let url = dead.url();
    drop(dead);
    let agent = TestAgent::start("escalate-dead", |raw| {
        raw.relay = Some(agent::config::RawRelay::new(url));
        raw.policy.models.insert(
            "digits".into(),
            agent::config::RawModelPolicy {
                budget_ms: Some(2000),
                escalate_below: Some(threshold),
                ..Default::default()
            },
        );
    })
    .await;
    let reply = ask(&agent, "escalate-dead", &request(&ambiguous_digit())).await;
    assert_eq!(reply["parameters"]["route"], "local", "{reply}");
    assert_eq!(
        reply["parameters"]["reason"], "escalation_failed",
        "{reply}"
    );
    assert!(reply["parameters"]["classes"].is_array(), "{reply}");
    agent.stop().await;
}
