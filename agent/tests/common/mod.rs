//! Test harness: agents started in process on free ports, and MQTT clients (v5 and 3.1.1) that
//! send requests and collect replies by correlation.

#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

pub mod mosquitto;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::Duration;

use agent::Running;
use agent::config::{RawConfig, RawEmbeddedBroker};
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::mqttbytes::v5::{Packet, PublishProperties};
use rumqttc::v5::{AsyncClient, Event, MqttOptions};
use serde_json::Value;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;

/// A fresh directory under the system's temporary directory, unique to this call.
pub fn scratch_dir(name: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "tether-test-{name}-{}-{}",
        std::process::id(),
        fastrand::u64(..)
    ));
    std::fs::create_dir_all(&dir).expect("a scratch directory");
    dir
}

/// A message as a subscriber saw it: when it came, whether it was a retained copy, its JSON.
#[derive(Debug, Clone)]
pub struct Seen {
    pub at: std::time::Instant,
    pub retained: bool,
    pub body: Value,
}

/// Subscribes to `filter` (QoS 1) and returns once the subscription is in place; every JSON
/// message that arrives afterwards comes out of the receiver.
pub async fn subscribe(addr: SocketAddr, filter: &str) -> mpsc::UnboundedReceiver<Seen> {
    let mut o = MqttOptions::new(
        format!("sub-{}", fastrand::u64(..)),
        addr.ip().to_string(),
        addr.port(),
    );
    o.set_keep_alive(Duration::from_secs(30));
    let (client, mut eventloop) = AsyncClient::new(o, 64);
    let (tx, rx) = mpsc::unbounded_channel();
    let (ready_tx, ready_rx) = oneshot::channel();
    let mut ready_tx = Some(ready_tx);
    let filter = filter.to_owned();
    tokio::spawn(async move {
        loop {
            match eventloop.poll().await {
                Ok(Event::Incoming(Packet::ConnAck(_))) => {
                    let _ = client.try_subscribe(filter.clone(), QoS::AtLeastOnce);
                }
                Ok(Event::Incoming(Packet::SubAck(_))) => {
                    if let Some(t) = ready_tx.take() {
                        let _ = t.send(());
                    }
                }
                Ok(Event::Incoming(Packet::Publish(p))) => {
                    if let Ok(body) = serde_json::from_slice(&p.payload) {
                        let seen = Seen {
                            at: std::time::Instant::now(),
                            retained: p.retain,
                            body,
                        };
                        if tx.send(seen).is_err() {
                            return;
                        }
                    }
                }
                Ok(_) => {}
                Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
    });
    tokio::time::timeout(Duration::from_secs(5), ready_rx)
        .await
        .unwrap()
        .unwrap();
    rx
}

/// Publishes `payload` retained with QoS 1 and returns once the broker has acknowledged it.
pub async fn publish_retained(addr: SocketAddr, topic: &str, payload: Vec<u8>) {
    let mut o = MqttOptions::new(
        format!("pub-{}", fastrand::u64(..)),
        addr.ip().to_string(),
        addr.port(),
    );
    o.set_keep_alive(Duration::from_secs(30))
        .set_max_packet_size(Some(64 << 20));
    let (client, mut eventloop) = AsyncClient::new(o, 16);
    let publish = async {
        loop {
            match eventloop.poll().await.expect("the broker is reachable") {
                Event::Incoming(Packet::ConnAck(_)) => {
                    client
                        .try_publish(topic, QoS::AtLeastOnce, true, payload.clone())
                        .unwrap();
                }
                Event::Incoming(Packet::PubAck(_)) => return,
                _ => {}
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(10), publish)
        .await
        .expect("the broker acknowledges the publish within 10 s");
    let _ = client.try_disconnect();
}

/// A running agent and the means to stop it.
pub struct TestAgent {
    pub running: Running,
    shutdown: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<Result<(), agent::AgentError>>>,
}

impl TestAgent {
    /// Starts an agent with the zoo, a device id, and whatever `tweak` changes. Unless `tweak`
    /// sets a broker, the agent starts its own embedded broker on free ports.
    pub async fn start(device_id: &str, tweak: impl FnOnce(&mut RawConfig)) -> TestAgent {
        let mut raw = RawConfig {
            device_id: Some(device_id.to_owned()),
            models_dir: Some(models::default_zoo_dir()),
            embedded_broker: Some(RawEmbeddedBroker {
                listen: "127.0.0.1:0".into(),
                ..Default::default()
            }),
            shutdown_grace_ms: 5_000,
            ..RawConfig::default()
        };
        raw.inference.workers = Some(2);
        raw.store.path = Some(scratch_dir(device_id).join("tether.db"));
        raw.mqtt.reconnect_min_ms = 50;
        raw.mqtt.reconnect_max_ms = 500;
        tweak(&mut raw);
        let config = raw.validate(|| None).expect("valid test config");
        let (shutdown_tx, shutdown_rx) = oneshot::channel::<()>();
        let (started_tx, started_rx) = oneshot::channel();
        let task = tokio::spawn(agent::run(
            config,
            async move {
                let _ = shutdown_rx.await;
            },
            Some(started_tx),
        ));
        let running = started_rx.await.expect("the agent starts");
        for mut connected in
            std::iter::once(running.connected.clone()).chain(running.pool_connected.clone())
        {
            tokio::time::timeout(Duration::from_secs(10), connected.wait_for(|c| *c))
                .await
                .expect("the agent connects and subscribes within 10 s")
                .unwrap();
        }
        TestAgent {
            running,
            shutdown: Some(shutdown_tx),
            task: Some(task),
        }
    }

    pub fn v5_addr(&self) -> SocketAddr {
        self.running.embedded_broker.expect("embedded broker").v5
    }

    pub fn v311_addr(&self) -> SocketAddr {
        self.running.embedded_broker.expect("embedded broker").v311
    }

    /// Asks the agent to stop and waits for it.
    pub async fn stop(mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(task) = self.task.take() {
            tokio::time::timeout(Duration::from_secs(15), task)
                .await
                .expect("the agent stops within its grace period")
                .unwrap()
                .unwrap();
        }
    }
}

/// A reply as received.
#[derive(Debug, Clone)]
pub struct Reply {
    pub topic: String,
    pub correlation: Option<Vec<u8>>,
    pub body: Value,
    pub had_properties: bool,
    /// The reply's MQTT v5 Message Expiry Interval, as the broker forwarded it.
    pub expiry: Option<u32>,
    /// The payload as it came.
    pub raw: Vec<u8>,
}

/// An MQTT v5 client that publishes requests with a response topic and correlation data.
pub struct Requester {
    pub client: AsyncClient,
    pub reply_topic: String,
    replies: mpsc::UnboundedReceiver<Reply>,
}

impl Requester {
    pub async fn connect(addr: SocketAddr, name: &str) -> Requester {
        Requester::connect_with(addr, name, false).await
    }

    /// A requester with a persistent session, that rides out broker restarts.
    pub async fn connect_persistent(addr: SocketAddr, name: &str) -> Requester {
        Requester::connect_with(addr, name, true).await
    }

    async fn connect_with(addr: SocketAddr, name: &str, persistent: bool) -> Requester {
        let mut o = MqttOptions::new(
            format!("test-{name}-{}", fastrand::u64(..)),
            addr.ip().to_string(),
            addr.port(),
        );
        o.set_keep_alive(Duration::from_secs(30))
            .set_max_packet_size(Some(64 << 20));
        o.set_network_options(agent::mqtt::no_delay());
        if persistent {
            o.set_clean_start(false)
                .set_session_expiry_interval(Some(600));
        }
        let (client, mut eventloop) = AsyncClient::new(o, 1000);
        let reply_topic = format!("replies/{name}");
        let (tx, replies) = mpsc::unbounded_channel();
        let (subscribed_tx, subscribed_rx) = oneshot::channel();
        let mut subscribed_tx = Some(subscribed_tx);
        let filter = format!("{reply_topic}/#");
        let resubscriber = client.clone();
        tokio::spawn(async move {
            loop {
                match eventloop.poll().await {
                    Ok(Event::Incoming(Packet::ConnAck(_))) => {
                        let _ = resubscriber.try_subscribe(filter.clone(), QoS::AtLeastOnce);
                    }
                    Ok(Event::Incoming(Packet::SubAck(_))) => {
                        if let Some(tx) = subscribed_tx.take() {
                            let _ = tx.send(());
                        }
                    }
                    Ok(Event::Incoming(Packet::Publish(p))) => {
                        let reply = Reply {
                            topic: String::from_utf8_lossy(&p.topic).into_owned(),
                            correlation: p
                                .properties
                                .as_ref()
                                .and_then(|pr| pr.correlation_data.as_ref().map(|c| c.to_vec())),
                            had_properties: p.properties.is_some(),
                            expiry: p
                                .properties
                                .as_ref()
                                .and_then(|pr| pr.message_expiry_interval),
                            raw: p.payload.to_vec(),
                            body: serde_json::from_slice(&p.payload).unwrap_or(Value::Null),
                        };
                        if tx.send(reply).is_err() {
                            return;
                        }
                    }
                    Ok(_) => {}
                    Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
                }
            }
        });
        tokio::time::timeout(Duration::from_secs(5), subscribed_rx)
            .await
            .unwrap()
            .unwrap();
        Requester {
            client,
            reply_topic,
            replies,
        }
    }

    /// Publishes a request with a response topic and correlation data.
    pub async fn send(&self, topic: &str, body: &[u8], correlation: &[u8]) {
        let props = PublishProperties {
            response_topic: Some(self.reply_topic.clone()),
            correlation_data: Some(correlation.to_vec().into()),
            ..Default::default()
        };
        self.client
            .publish_with_properties(topic, QoS::AtLeastOnce, false, body.to_vec(), props)
            .await
            .unwrap();
    }

    /// Publishes a request with a response topic, correlation data and any other properties
    /// given (MQTT v5), at QoS 1.
    pub async fn send_with(&self, topic: &str, body: &[u8], props: PublishProperties) {
        self.client
            .publish_with_properties(topic, QoS::AtLeastOnce, false, body.to_vec(), props)
            .await
            .unwrap();
    }

    /// The properties of a request answered on this requester's reply topic.
    pub fn props(&self, correlation: &[u8]) -> PublishProperties {
        PublishProperties {
            response_topic: Some(self.reply_topic.clone()),
            correlation_data: Some(correlation.to_vec().into()),
            ..Default::default()
        }
    }

    /// A reply that has already arrived, if any.
    pub fn try_next(&mut self) -> Option<Reply> {
        self.replies.try_recv().ok()
    }

    /// Waits for the next reply, however long it takes.
    pub async fn next_any(&mut self) -> Reply {
        self.replies.recv().await.unwrap()
    }

    /// Waits for the next reply.
    pub async fn next(&mut self, within: Duration) -> Reply {
        tokio::time::timeout(within, self.replies.recv())
            .await
            .expect("a reply in time")
            .unwrap()
    }

    /// Sends a digits request to `device` and returns the budget its reply says was in force,
    /// which tells a test which policy the agent runs. Each probe is a new request (its own
    /// correlation data): a repeated one would be answered with the first one's reply.
    pub async fn answered_budget(&mut self, device: &str) -> u64 {
        let correlation = format!("probe-{:x}", fastrand::u64(..));
        self.send(
            &format!("tether/{device}/infer/digits"),
            &golden("digits"),
            correlation.as_bytes(),
        )
        .await;
        let reply = self.next(Duration::from_secs(10)).await;
        assert!(reply.body.get("error").is_none(), "{}", reply.body);
        reply.body["parameters"]["budget_ms"].as_u64().unwrap()
    }

    /// Collects `n` replies, keyed by correlation data.
    pub async fn collect(&mut self, n: usize, within: Duration) -> HashMap<Vec<u8>, Vec<Reply>> {
        let mut out: HashMap<Vec<u8>, Vec<Reply>> = HashMap::new();
        let deadline = tokio::time::Instant::now() + within;
        for _ in 0..n {
            let r = tokio::time::timeout_at(deadline, self.replies.recv())
                .await
                .unwrap_or_else(|_| {
                    panic!(
                        "only {} of {n} replies arrived",
                        out.values().map(Vec::len).sum::<usize>()
                    )
                })
                .unwrap();
            out.entry(r.correlation.clone().unwrap_or_default())
                .or_default()
                .push(r);
        }
        out
    }

    /// True if no further reply arrives within `wait`.
    pub async fn quiet_for(&mut self, wait: Duration) -> bool {
        tokio::time::timeout(wait, self.replies.recv())
            .await
            .is_err()
    }
}

/// A message as a spy saw it.
#[derive(Debug, Clone)]
pub struct Spied {
    pub topic: String,
    pub payload: Vec<u8>,
    pub retain: bool,
}

/// Subscribes to `filter` (QoS 1) and returns once the subscription is in place; every message
/// that arrives afterwards, JSON or not, comes out of the receiver.
pub async fn spy(addr: SocketAddr, filter: &str) -> mpsc::UnboundedReceiver<Spied> {
    let mut o = MqttOptions::new(
        format!("spy-{}", fastrand::u64(..)),
        addr.ip().to_string(),
        addr.port(),
    );
    o.set_keep_alive(Duration::from_secs(30))
        .set_max_packet_size(Some(64 << 20));
    let (client, mut eventloop) = AsyncClient::new(o, 64);
    let (tx, rx) = mpsc::unbounded_channel();
    let (ready_tx, ready_rx) = oneshot::channel();
    let mut ready_tx = Some(ready_tx);
    let filter = filter.to_owned();
    tokio::spawn(async move {
        loop {
            match eventloop.poll().await {
                Ok(Event::Incoming(Packet::ConnAck(_))) => {
                    let _ = client.try_subscribe(filter.clone(), QoS::AtLeastOnce);
                }
                Ok(Event::Incoming(Packet::SubAck(_))) => {
                    if let Some(t) = ready_tx.take() {
                        let _ = t.send(());
                    }
                }
                Ok(Event::Incoming(Packet::Publish(p))) => {
                    let seen = Spied {
                        topic: String::from_utf8_lossy(&p.topic).into_owned(),
                        payload: p.payload.to_vec(),
                        retain: p.retain,
                    };
                    if tx.send(seen).is_err() {
                        return;
                    }
                }
                Ok(_) => {}
                Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
    });
    tokio::time::timeout(Duration::from_secs(5), ready_rx)
        .await
        .unwrap()
        .unwrap();
    rx
}

/// `GET /metrics` over a plain TCP connection; returns the body.
pub async fn scrape(addr: SocketAddr) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: agent\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).await.unwrap();
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    text
}

/// The value of one metric sample (`name{labels}` exactly as exposed), 0 when absent.
pub fn metric(text: &str, sample: &str) -> f64 {
    text.lines()
        .find_map(|l| {
            l.strip_prefix(sample)
                .and_then(|rest| rest.strip_prefix(' '))
                .and_then(|v| v.trim().parse().ok())
        })
        .unwrap_or(0.0)
}

/// A zoo golden request, as bytes, with an id.
pub fn golden(model: &str) -> Vec<u8> {
    let manifest = models::Manifest::load(models::default_zoo_dir()).unwrap();
    std::fs::read(models::golden::request_path(&manifest, model)).unwrap()
}

/// A golden request with its parameters replaced.
pub fn golden_with(model: &str, parameters: Value) -> Vec<u8> {
    let mut v: Value = serde_json::from_slice(&golden(model)).unwrap();
    v["parameters"] = parameters;
    serde_json::to_vec(&v).unwrap()
}

/// A TCP proxy in front of a broker, whose link can be cut and restored: the injected fault
/// of a device losing its network. While cut, open connections are dropped and new ones are
/// closed at once. Stalled, it holds what either side sends, without closing (a link that
/// has gone silent): what is in flight stays in flight.
pub struct Proxy {
    pub addr: SocketAddr,
    state_tx: tokio::sync::watch::Sender<Link>,
}

/// What the proxy does with traffic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Link {
    Up,
    Stalled,
    Cut,
}

/// Copies one direction while the link is up; holds while stalled; ends when cut.
async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    mut state: tokio::sync::watch::Receiver<Link>,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = tokio::select! {
            r = from.read(&mut buf) => match r {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            },
            _ = state.wait_for(|s| *s == Link::Cut) => return,
        };
        match state.wait_for(|s| *s != Link::Stalled).await {
            Ok(s) if *s == Link::Up => {}
            _ => return,
        }
        if to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}

impl Proxy {
    pub async fn start(upstream: SocketAddr) -> Proxy {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (state_tx, state_rx) = tokio::sync::watch::channel(Link::Up);
        tokio::spawn(async move {
            loop {
                let Ok((inbound, _)) = listener.accept().await else {
                    return;
                };
                if *state_rx.borrow() == Link::Cut {
                    drop(inbound);
                    continue;
                }
                let state = state_rx.clone();
                tokio::spawn(async move {
                    let Ok(outbound) = tokio::net::TcpStream::connect(upstream).await else {
                        return;
                    };
                    let _ = inbound.set_nodelay(true);
                    let _ = outbound.set_nodelay(true);
                    let (ir, iw) = inbound.into_split();
                    let (or, ow) = outbound.into_split();
                    tokio::join!(pump(ir, ow, state.clone()), pump(or, iw, state));
                });
            }
        });
        Proxy { addr, state_tx }
    }

    pub fn cut(&self) {
        self.state_tx.send_replace(Link::Cut);
    }

    /// Holds traffic both ways without closing the connections.
    pub fn stall(&self) {
        self.state_tx.send_replace(Link::Stalled);
    }

    pub fn restore(&self) {
        self.state_tx.send_replace(Link::Up);
    }
}

/// A relay serving the zoo's cloud models on a free port (for offloads and model artifacts);
/// it stops when the sender is dropped or sent to.
pub async fn relay() -> (SocketAddr, oneshot::Sender<()>) {
    let mut raw = cloud_relay::config::RawConfig {
        listen: "127.0.0.1:0".into(),
        models_dir: Some(models::default_zoo_dir()),
        workers: Some(1),
        ..Default::default()
    };
    raw.shutdown_grace_ms = 0;
    let cfg = raw.validate().unwrap();
    let state = tokio::task::spawn_blocking(move || cloud_relay::State::build(cfg))
        .await
        .unwrap()
        .unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = oneshot::channel::<()>();
    tokio::spawn(cloud_relay::serve(state, listener, async move {
        let _ = rx.await;
    }));
    (addr, tx)
}
