//! Request/response semantics a requester can rely on, through Mosquitto: a request delivered
//! again (same response topic and correlation data) is answered without running again — before,
//! during and after its first run, and after a restart; a budget or an expiry that runs out is
//! acted on at that moment; replies carry what is left of their requester's expiry and are not
//! published once it has passed; acknowledgements never cross a reconnect, and republished
//! replies carry DUP; and a stream of thousands of QoS 1 requests through two broker restarts
//! is answered in full, with nothing refused.
//!
//! What the agent sends and acknowledges is read from Mosquitto's own log (`log_type all`).
//! Opt-in, like every test that needs Mosquitto: `cargo test -p agent --test rpc -- --ignored`
//! (CI runs it).

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::{HashMap, HashSet};
use std::sync::atomic::Ordering;
use std::time::Duration;

use agent::config::RawConfig;
use common::mosquitto::Mosquitto;
use common::{Proxy, Requester, TestAgent, golden_with, metric, scrape};
use serde_json::{Value, json};

const NEEDS: &str = "needs Mosquitto: cargo test -p agent --test rpc -- --ignored";
const WAIT: Duration = Duration::from_secs(20);

/// An agent on `broker` (a URL), with metrics, one worker held to `service_ms` a run.
async fn agent_on(
    device: &str,
    broker: String,
    service_ms: f64,
    tweak: impl FnOnce(&mut RawConfig),
) -> TestAgent {
    TestAgent::start(device, move |raw| {
        raw.embedded_broker = None;
        raw.mqtt.broker = broker;
        raw.inference.workers = Some(1);
        raw.inference.emulated_service_ms = service_ms;
        raw.metrics.listen = Some("127.0.0.1:0".into());
        tweak(raw);
    })
    .await
}

async fn metrics(agent: &TestAgent) -> String {
    scrape(agent.running.metrics_addr.unwrap()).await
}

/// A digits request that always runs the model (the result cache is bypassed).
fn uncached() -> Vec<u8> {
    golden_with("digits", json!({"cache": false}))
}

/// What one client did on one of its connections, as Mosquitto logged it.
#[derive(Debug, Default)]
struct Conn {
    /// Message ids of the QoS 1 publishes Mosquitto sent it.
    sent: Vec<u16>,
    /// Message ids it acknowledged.
    acked: Vec<u16>,
    /// Publishes it sent: DUP flag and topic.
    published: Vec<(bool, String)>,
}

/// Mosquitto's log of `client`, split into its connections.
fn connections(log: &str, client: &str) -> Vec<Conn> {
    let mut out: Vec<Conn> = Vec::new();
    let field = |line: &str, key: &str| -> Option<u16> {
        let rest = &line[line.find(key)? + key.len()..];
        rest.split(|c: char| !c.is_ascii_digit())
            .next()?
            .parse()
            .ok()
    };
    for line in log.lines() {
        if line.contains("New client connected from") && line.contains(&format!(" as {client} (")) {
            out.push(Conn::default());
        } else if let Some(c) = out.last_mut() {
            if line.contains(&format!("Sending PUBLISH to {client} (")) && line.contains(", q1,") {
                c.sent.extend(field(line, ", m"));
            } else if line.contains(&format!("Received PUBACK from {client} (")) {
                c.acked.extend(field(line, "Mid: "));
            } else if line.contains(&format!("Received PUBLISH from {client} (")) {
                let dup = line.contains(&format!("from {client} (d1,"));
                let topic = line.split('\'').nth(1).unwrap_or_default().to_owned();
                c.published.push((dup, topic));
            }
        }
    }
    out
}

/// Every acknowledgement on a connection answers a publish sent on that same connection, and
/// none is sent twice for one delivery.
fn assert_acks_stay_on_their_connection(conns: &[Conn]) {
    for (i, c) in conns.iter().enumerate() {
        let mut outstanding: HashMap<u16, usize> = HashMap::new();
        for m in &c.sent {
            *outstanding.entry(*m).or_default() += 1;
        }
        for m in &c.acked {
            let n = outstanding.get_mut(m).filter(|n| **n > 0).unwrap_or_else(|| {
                panic!("connection {i}: PUBACK for message id {m}, which was not delivered on this connection (or was acknowledged twice): {c:?}")
            });
            *n -= 1;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs Mosquitto: cargo test -p agent --test rpc -- --ignored"]
async fn a_duplicate_is_never_run_twice_before_during_or_after_the_first_run() {
    let _ = NEEDS;
    let broker = Mosquitto::start();
    let agent = agent_on("dup-dev", broker.url(), 300.0, |_| {}).await;
    let mut req = Requester::connect(broker.addr(), "dup").await;
    let topic = "tether/dup-dev/infer/digits";
    // One worker, busy with `busy`: `a` waits in the queue, and its duplicate arrives while it
    // waits (before its run).
    req.send(topic, &uncached(), b"busy").await;
    tokio::time::sleep(Duration::from_millis(50)).await;
    req.send(topic, &uncached(), b"a").await;
    tokio::time::sleep(Duration::from_millis(50)).await;
    req.send(topic, &uncached(), b"a").await;
    let got = req.collect(3, WAIT).await;
    let a = &got[&b"a".to_vec()];
    assert_eq!(a.len(), 2, "each delivery of `a` is answered");
    assert_eq!(a[0].raw, a[1].raw, "with the same reply");
    assert_eq!(a[0].body["parameters"]["route"], "local");
    // `b` runs alone; its duplicate arrives during the run.
    req.send(topic, &uncached(), b"b").await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    req.send(topic, &uncached(), b"b").await;
    let got = req.collect(2, WAIT).await;
    let b = &got[&b"b".to_vec()];
    assert_eq!(b[0].raw, b[1].raw);
    // After the run: replayed at once.
    req.send(topic, &uncached(), b"a").await;
    let again = req.next(WAIT).await;
    assert_eq!(again.raw, a[0].raw, "the remembered reply");
    assert!(req.quiet_for(Duration::from_millis(400)).await);
    let m = metrics(&agent).await;
    let runs = metric(
        &m,
        "tether_agent_requests_total{route=\"local\",reason=\"within_budget\"}",
    );
    assert_eq!(runs, 3.0, "busy, a and b ran once each:\n{m}");
    assert_eq!(
        metric(&m, "tether_agent_duplicates_total{how=\"joined\"}"),
        2.0
    );
    assert_eq!(
        metric(&m, "tether_agent_duplicates_total{how=\"replayed\"}"),
        1.0
    );
    agent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs Mosquitto: cargo test -p agent --test rpc -- --ignored"]
async fn a_duplicate_after_a_restart_is_answered_from_the_database() {
    let broker = Mosquitto::start();
    let db = common::scratch_dir("dup-restart").join("tether.db");
    let at = |db: std::path::PathBuf| move |raw: &mut RawConfig| raw.store.path = Some(db);
    let agent = agent_on("dupr-dev", broker.url(), 0.0, at(db.clone())).await;
    let mut req = Requester::connect(broker.addr(), "dupr").await;
    let topic = "tether/dupr-dev/infer/digits";
    req.send(topic, &uncached(), b"once").await;
    let first = req.next(WAIT).await;
    agent.stop().await;
    let agent = agent_on("dupr-dev", broker.url(), 0.0, at(db)).await;
    req.send(topic, &uncached(), b"once").await;
    let again = req.next(WAIT).await;
    assert_eq!(again.raw, first.raw);
    let m = metrics(&agent).await;
    assert_eq!(
        metric(&m, "tether_agent_duplicates_total{how=\"replayed\"}"),
        1.0
    );
    assert!(
        !m.contains("route=\"local\""),
        "the model did not run again:\n{m}"
    );
    agent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs Mosquitto: cargo test -p agent --test rpc -- --ignored"]
async fn a_budget_that_runs_out_is_answered_at_that_moment_queued_or_running() {
    let broker = Mosquitto::start();
    let agent = agent_on("budget-dev", broker.url(), 400.0, |_| {}).await;
    let mut req = Requester::connect(broker.addr(), "budget").await;
    let topic = "tether/budget-dev/infer/digits";
    // Queued behind a 400 ms run with a budget of 100 ms: refused before that run ends.
    req.send(topic, &uncached(), b"long").await;
    tokio::time::sleep(Duration::from_millis(30)).await;
    req.send(
        topic,
        &golden_with("digits", json!({"cache": false, "budget_ms": 100})),
        b"short",
    )
    .await;
    let first = req.next(WAIT).await;
    assert_eq!(first.correlation.as_deref(), Some(&b"short"[..]));
    assert_eq!(first.body["code"], "overloaded", "{}", first.body);
    assert_eq!(first.body["reason"], "would_miss_budget");
    let error = first.body["error"].as_str().unwrap();
    assert!(error.contains("budget of 100 ms ran out"), "{error}");
    let second = req.next(WAIT).await;
    assert_eq!(second.correlation.as_deref(), Some(&b"long"[..]));
    assert_eq!(second.body["model_name"], "digits");
    // Running past its budget: answered at the deadline, and the late result is dropped. (A
    // model that has not run yet, so the policy's estimate lets it in.)
    req.send(
        "tether/budget-dev/infer/vibration",
        &golden_with("vibration", json!({"cache": false, "budget_ms": 150})),
        b"overrun",
    )
    .await;
    let r = req.next(WAIT).await;
    assert_eq!(r.body["code"], "overloaded", "{}", r.body);
    assert!(
        req.quiet_for(Duration::from_millis(700)).await,
        "no late answer"
    );
    let m = metrics(&agent).await;
    assert_eq!(metric(&m, "tether_agent_late_results_total"), 1.0, "{m}");
    assert_eq!(metric(&m, "tether_agent_deadlines_total"), 2.0, "{m}");
    agent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs Mosquitto: cargo test -p agent --test rpc -- --ignored"]
async fn replies_carry_the_expiry_left_and_an_expired_requester_gets_none() {
    let broker = Mosquitto::start();
    let agent = agent_on("exp-dev", broker.url(), 1500.0, |_| {}).await;
    let mut req = Requester::connect(broker.addr(), "exp").await;
    let topic = "tether/exp-dev/infer/digits";
    let with_expiry = |req: &Requester, c: &[u8], secs| {
        let mut p = req.props(c);
        p.message_expiry_interval = Some(secs);
        p
    };
    // A reply carries what is left of its requester's expiry.
    req.send_with(topic, &uncached(), with_expiry(&req, b"exp-30", 30))
        .await;
    let r = req.next(WAIT).await;
    let left = r.expiry.expect("the reply has a Message Expiry");
    assert!((1..=30).contains(&left), "{left}");
    // Expiry while queued: one second, behind a run of 1.5 s. No reply is published (its
    // requester has gone), and the request is acknowledged.
    // (`exp-1` asks a model that has not run yet, so the policy's estimate admits it rather
    // than refusing it at once.)
    req.send(topic, &uncached(), b"ahead").await;
    tokio::time::sleep(Duration::from_millis(30)).await;
    req.send_with(
        "tether/exp-dev/infer/vibration",
        &golden_with("vibration", json!({"cache": false})),
        with_expiry(&req, b"exp-1", 1),
    )
    .await;
    let r = req.next(WAIT).await;
    assert_eq!(r.correlation.as_deref(), Some(&b"ahead"[..]), "{}", r.body);
    let extra = tokio::time::timeout(Duration::from_secs(2), req.next_any()).await;
    assert!(
        extra.is_err(),
        "nothing for exp-1: {:?}",
        extra.map(|r| r.body)
    );
    let m = metrics(&agent).await;
    assert_eq!(metric(&m, "tether_agent_replies_expired_total"), 1.0, "{m}");
    agent.stop().await;
    let conns = connections(&broker.log(), "tether-exp-dev");
    assert_acks_stay_on_their_connection(&conns);
    let delivered: usize = conns.iter().map(|c| c.sent.len()).sum();
    let acked: usize = conns.iter().map(|c| c.acked.len()).sum();
    assert_eq!(
        acked, delivered,
        "every request was acknowledged: {conns:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs Mosquitto: cargo test -p agent --test rpc -- --ignored"]
async fn a_reply_whose_requester_expired_while_disconnected_is_not_published() {
    let broker = Mosquitto::start();
    let proxy = Proxy::start(broker.addr()).await;
    let agent = agent_on("expd-dev", format!("mqtt://{}", proxy.addr), 1000.0, |_| {}).await;
    let mut req = Requester::connect(broker.addr(), "expd").await;
    let mut p = req.props(b"x");
    p.message_expiry_interval = Some(2);
    req.send_with("tether/expd-dev/infer/digits", &uncached(), p)
        .await;
    // Taken, and running, when the link goes; the run ends (the reply is stored) while the
    // link is down, and the link comes back after the requester's two seconds.
    tokio::time::sleep(Duration::from_millis(300)).await;
    proxy.cut();
    tokio::time::sleep(Duration::from_millis(3000)).await;
    proxy.restore();
    let mut connected = agent.running.connected.clone();
    tokio::time::timeout(WAIT, connected.wait_for(|c| *c))
        .await
        .unwrap()
        .unwrap();
    assert!(
        req.quiet_for(Duration::from_secs(2)).await,
        "an expired reply is not published"
    );
    let counters = &agent.running.store.counters;
    assert_eq!(counters.outbox_expired.load(Ordering::Relaxed), 1);
    assert_eq!(counters.outbox_rows.load(Ordering::Relaxed), 0);
    agent.stop().await;
    let conns = connections(&broker.log(), "tether-expd-dev");
    assert!(conns.len() >= 2, "{conns:?}");
    assert_acks_stay_on_their_connection(&conns);
    assert!(
        conns[1..].iter().all(|c| c.acked.is_empty()),
        "the request of the first connection is not acknowledged on a later one: {conns:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs Mosquitto: cargo test -p agent --test rpc -- --ignored"]
async fn acknowledgements_never_cross_a_reconnect_and_republished_replies_carry_dup() {
    let broker = Mosquitto::start();
    let proxy = Proxy::start(broker.addr()).await;
    let agent = agent_on("ack-dev", format!("mqtt://{}", proxy.addr), 150.0, |raw| {
        raw.policy.default_budget_ms = 30_000
    })
    .await;
    let mut req = Requester::connect_persistent(broker.addr(), "ack").await;
    let n = 8;
    for i in 0..n {
        req.send(
            "tether/ack-dev/infer/digits",
            &uncached(),
            format!("k{i}").as_bytes(),
        )
        .await;
    }
    // The first reply is in; the link then goes silent (what is sent stays in flight: replies
    // without their PUBACK, acknowledgements not received), and is cut a second later.
    let first = req.next(WAIT).await;
    proxy.stall();
    tokio::time::sleep(Duration::from_millis(1000)).await;
    proxy.cut();
    tokio::time::sleep(Duration::from_millis(300)).await;
    proxy.restore();
    // Every request is answered (some twice: a redelivered request is answered again, with
    // its remembered reply).
    let mut answered: HashMap<Vec<u8>, Vec<Vec<u8>>> = HashMap::new();
    answered
        .entry(first.correlation.clone().unwrap())
        .or_default()
        .push(first.raw);
    let deadline = tokio::time::Instant::now() + WAIT;
    while answered.len() < n {
        let r = tokio::time::timeout_at(deadline, req.next_any())
            .await
            .unwrap_or_else(|_| panic!("answered: {:?}", answered.keys()));
        assert_eq!(r.body["model_name"], "digits", "{}", r.body);
        answered
            .entry(r.correlation.unwrap())
            .or_default()
            .push(r.raw);
    }
    for (c, replies) in &answered {
        assert!(
            replies.windows(2).all(|w| w[0] == w[1]),
            "{}: every reply to one request is the same",
            String::from_utf8_lossy(c)
        );
    }
    let m = metrics(&agent).await;
    let ran = metric(
        &m,
        "tether_agent_requests_total{route=\"local\",reason=\"within_budget\"}",
    );
    assert_eq!(ran, n as f64, "each request ran once:\n{m}");
    agent.stop().await;
    let conns = connections(&broker.log(), "tether-ack-dev");
    assert!(conns.len() >= 2, "{conns:?}");
    assert_acks_stay_on_their_connection(&conns);
    let republished: Vec<&(bool, String)> = conns[1..]
        .iter()
        .flat_map(|c| &c.published)
        .filter(|(dup, topic)| *dup && topic.starts_with("replies/"))
        .collect();
    assert!(
        !republished.is_empty(),
        "replies in flight when the link broke go out again with DUP: {conns:?}"
    );
    assert!(
        conns[0]
            .published
            .iter()
            .filter(|(_, t)| t.starts_with("replies/"))
            .all(|(dup, _)| !dup),
        "a first send has no DUP"
    );
}

/// Replies by correlation data, and those that are not a model's answer.
#[derive(Default)]
struct Tally {
    answered: HashSet<String>,
    replies: usize,
    refused: Vec<Value>,
}

impl Tally {
    fn take(&mut self, r: common::Reply) {
        self.replies += 1;
        if r.body["model_name"] != "digits" {
            self.refused.push(r.body.clone());
        }
        self.answered
            .insert(String::from_utf8(r.correlation.unwrap_or_default()).unwrap_or_default());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs Mosquitto: cargo test -p agent --test rpc -- --ignored"]
async fn thousands_of_requests_through_two_broker_restarts_are_all_answered() {
    let mut broker = Mosquitto::start();
    let agent = TestAgent::start("restart2-dev", |raw| {
        raw.embedded_broker = None;
        raw.mqtt.broker = broker.url();
    })
    .await;
    let mut req = Requester::connect_persistent(broker.addr(), "restart2").await;
    let n = 3000;
    let body = uncached();
    let topic = "tether/restart2-dev/infer/digits";
    let mut tally = Tally::default();
    for i in 0..n {
        if i == n / 3 || i == 2 * n / 3 {
            // Graceful restarts: Mosquitto saves its sessions and queues, and loads them again.
            broker.stop();
            tokio::time::sleep(Duration::from_millis(300)).await;
            broker.spawn();
        }
        req.send(topic, &body, format!("r{i}").as_bytes()).await;
        // Take what has come back, so the requester's own buffers never fill.
        while let Some(r) = req.try_next() {
            tally.take(r);
        }
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    while tally.answered.len() < n {
        let Ok(r) = tokio::time::timeout_at(deadline, req.next_any()).await else {
            let missing: Vec<usize> = (0..n)
                .filter(|i| !tally.answered.contains(&format!("r{i}")))
                .collect();
            panic!(
                "{} of {n} requests answered; missing {} (first {:?})",
                tally.answered.len(),
                missing.len(),
                &missing[..missing.len().min(20)]
            );
        };
        tally.take(r);
    }
    let Tally {
        replies, refused, ..
    } = tally;
    assert!(
        refused.is_empty(),
        "every request is served, none refused: {} refused, first {:?}",
        refused.len(),
        refused.first()
    );
    eprintln!("{n} requests, {replies} replies (duplicates are redeliveries answered again)");
    agent.stop().await;
}
