//! `tether-agent bench-mqtt`: round trips through a real broker. Closed-loop lanes (each sends a
//! request and waits for its reply before the next) at each concurrency, reporting requests/s
//! and p50/p99 round trip. An echo responder, which answers every request with its own payload,
//! measures the broker alone: the floor under any agent figure.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::mqttbytes::v5::{Packet, PublishProperties};
use rumqttc::v5::{AsyncClient, Event, MqttOptions};
use tokio::sync::oneshot;

use models::stats::percentile;

/// One concurrency level's figures.
#[derive(Debug, Clone)]
pub struct LoadReport {
    pub target: String,
    pub concurrency: usize,
    pub requests: usize,
    pub errors: usize,
    pub requests_per_s: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
}

type Pending = Arc<Mutex<HashMap<Vec<u8>, oneshot::Sender<Vec<u8>>>>>;

fn client(addr: SocketAddr, name: &str) -> (AsyncClient, rumqttc::v5::EventLoop) {
    let mut o = MqttOptions::new(
        format!("{name}-{}", fastrand::u32(..)),
        addr.ip().to_string(),
        addr.port(),
    );
    o.set_keep_alive(Duration::from_secs(30))
        .set_max_packet_size(Some(64 << 20));
    o.set_network_options(agent::mqtt::no_delay());
    AsyncClient::new(o, 4096)
}

/// Starts a responder that answers `{prefix}/echo/infer/+` with the request's own payload.
pub async fn start_echo(addr: SocketAddr, prefix: &str) -> AsyncClient {
    let (client, mut eventloop) = client(addr, "tether-echo");
    let filter = format!("{prefix}/echo/infer/+");
    let (ready_tx, ready_rx) = oneshot::channel();
    let responder = client.clone();
    tokio::spawn(async move {
        let mut ready_tx = Some(ready_tx);
        if responder.subscribe(filter, QoS::AtLeastOnce).await.is_err() {
            return;
        }
        loop {
            match eventloop.poll().await {
                Ok(Event::Incoming(Packet::SubAck(_))) => {
                    if let Some(tx) = ready_tx.take() {
                        let _ = tx.send(());
                    }
                }
                Ok(Event::Incoming(Packet::Publish(p))) => {
                    let Some(props) = p.properties else { continue };
                    let Some(topic) = props.response_topic else {
                        continue;
                    };
                    let reply = PublishProperties {
                        correlation_data: props.correlation_data,
                        ..Default::default()
                    };
                    let _ = responder.try_publish_with_properties(
                        topic,
                        QoS::AtLeastOnce,
                        false,
                        p.payload,
                        reply,
                    );
                }
                Ok(_) => {}
                Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
    });
    let _ = tokio::time::timeout(Duration::from_secs(5), ready_rx).await;
    client
}

/// Runs closed-loop lanes against `topic` for `duration` at one concurrency.
pub async fn run_load(
    addr: SocketAddr,
    topic: &str,
    payload: Vec<u8>,
    concurrency: usize,
    duration: Duration,
) -> LoadReport {
    let (client, mut eventloop) = client(addr, "tether-bench");
    let reply_topic = format!("tether-bench/replies/{}", fastrand::u32(..));
    let pending: Pending = Arc::new(Mutex::new(HashMap::new()));
    let (ready_tx, ready_rx) = oneshot::channel();
    let poller_pending = pending.clone();
    let _ = client
        .subscribe(format!("{reply_topic}/#"), QoS::AtLeastOnce)
        .await;
    let poller = tokio::spawn(async move {
        let mut ready_tx = Some(ready_tx);
        loop {
            match eventloop.poll().await {
                Ok(Event::Incoming(Packet::SubAck(_))) => {
                    if let Some(tx) = ready_tx.take() {
                        let _ = tx.send(());
                    }
                }
                Ok(Event::Incoming(Packet::Publish(p))) => {
                    let corr = p
                        .properties
                        .and_then(|pr| pr.correlation_data)
                        .map(|c| c.to_vec())
                        .unwrap_or_default();
                    let waiter = poller_pending
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .remove(&corr);
                    if let Some(w) = waiter {
                        let _ = w.send(p.payload.to_vec());
                    }
                }
                Ok(_) => {}
                Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
            }
        }
    });
    let _ = tokio::time::timeout(Duration::from_secs(5), ready_rx).await;
    let started = Instant::now();
    let deadline = started + duration;
    let mut lanes = Vec::new();
    for lane in 0..concurrency {
        let client = client.clone();
        let pending = pending.clone();
        let payload = payload.clone();
        let topic = topic.to_owned();
        let reply_topic = reply_topic.clone();
        lanes.push(tokio::spawn(async move {
            let mut latencies = Vec::new();
            let mut errors = 0usize;
            let mut seq = 0u64;
            while Instant::now() < deadline {
                seq += 1;
                let corr = format!("{lane}:{seq}").into_bytes();
                let (tx, rx) = oneshot::channel();
                pending
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .insert(corr.clone(), tx);
                let props = PublishProperties {
                    response_topic: Some(reply_topic.clone()),
                    correlation_data: Some(corr.clone().into()),
                    ..Default::default()
                };
                let t0 = Instant::now();
                if client
                    .publish_with_properties(
                        topic.as_str(),
                        QoS::AtLeastOnce,
                        false,
                        payload.clone(),
                        props,
                    )
                    .await
                    .is_err()
                {
                    errors += 1;
                    continue;
                }
                match tokio::time::timeout(Duration::from_secs(10), rx).await {
                    Ok(Ok(body)) => {
                        if body.windows(8).any(|w| w == b"\"error\":") {
                            errors += 1;
                        } else {
                            latencies.push(t0.elapsed().as_secs_f64() * 1e3);
                        }
                    }
                    _ => {
                        pending
                            .lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .remove(&corr);
                        errors += 1;
                    }
                }
            }
            (latencies, errors)
        }));
    }
    let mut latencies = Vec::new();
    let mut errors = 0;
    for lane in lanes {
        if let Ok((l, e)) = lane.await {
            latencies.extend(l);
            errors += e;
        }
    }
    let elapsed = started.elapsed().as_secs_f64();
    poller.abort();
    let _ = client.try_disconnect();
    latencies.sort_by(f64::total_cmp);
    #[allow(clippy::cast_precision_loss)]
    let requests_per_s = latencies.len() as f64 / elapsed;
    LoadReport {
        target: topic.to_owned(),
        concurrency,
        requests: latencies.len(),
        errors,
        requests_per_s,
        p50_ms: percentile(&latencies, 0.5),
        p99_ms: percentile(&latencies, 0.99),
    }
}

/// A plain-text table of load reports.
pub fn format_table(reports: &[LoadReport]) -> String {
    let mut out = format!(
        "{:<32} {:>11} {:>9} {:>7} {:>11} {:>9} {:>9}\n",
        "target", "concurrency", "requests", "errors", "requests/s", "p50 ms", "p99 ms"
    );
    for r in reports {
        out.push_str(&format!(
            "{:<32} {:>11} {:>9} {:>7} {:>11.1} {:>9.3} {:>9.3}\n",
            r.target, r.concurrency, r.requests, r.errors, r.requests_per_s, r.p50_ms, r.p99_ms
        ));
    }
    out
}
