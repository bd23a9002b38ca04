//! The relay against slow, hostile and oversized clients, over real TCP: slow headers, a body
//! trickled in, a Content-Length over the limit, a connection flood, work whose deadline passed
//! in the queue, and a batch that panics.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::time::{Duration, Instant};

mod support;

use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Reads until the peer closes or `limit` passes; returns what came and whether it closed.
async fn read_until_closed(sock: &mut TcpStream, limit: Duration) -> (String, bool) {
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        match tokio::time::timeout_at(deadline, sock.read(&mut buf)).await {
            Err(_) => return (String::from_utf8_lossy(&out).into_owned(), false),
            Ok(Ok(0) | Err(_)) => return (String::from_utf8_lossy(&out).into_owned(), true),
            Ok(Ok(n)) => out.extend_from_slice(&buf[..n]),
        }
    }
}

fn digits_body() -> String {
    let data: Vec<f32> = (0..64u8).map(f32::from).collect();
    json!({"inputs": [{"name": "input", "shape": [1, 1, 8, 8], "datatype": "FP32", "data": data}]})
        .to_string()
}

/// One request on a fresh connection; the status code and body.
async fn post(addr: SocketAddr, path: &str, body: &str, extra: &str) -> (u16, String) {
    let mut sock = TcpStream::connect(addr).await.unwrap();
    let head = format!(
        "POST {path} HTTP/1.1\r\nhost: relay\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n{extra}\r\n",
        body.len()
    );
    sock.write_all(head.as_bytes()).await.unwrap();
    sock.write_all(body.as_bytes()).await.unwrap();
    let (text, _) = read_until_closed(&mut sock, Duration::from_secs(20)).await;
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let body = text.split("\r\n\r\n").nth(1).unwrap_or_default().to_owned();
    (status, body)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_headers_are_closed_at_the_header_deadline() {
    let (addr, _state, _stop) = support::relay(|raw| raw.limits.header_timeout_ms = 500).await;
    let started = Instant::now();
    let mut slow = Vec::new();
    for _ in 0..20 {
        let mut sock = TcpStream::connect(addr).await.unwrap();
        sock.write_all(b"GET /v2/health/live HTTP/1.1\r\nhost: r")
            .await
            .unwrap();
        slow.push(sock);
    }
    // A byte now and then keeps no connection open past the deadline.
    let mut closed = 0;
    for sock in &mut slow {
        let _ = sock.write_all(b"x").await;
        let (_, was_closed) = read_until_closed(sock, Duration::from_secs(5)).await;
        closed += usize::from(was_closed);
    }
    assert_eq!(closed, 20, "every slow connection was closed");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
    // And the relay still answers.
    let (status, body) = post(addr, "/v2/models/digits/infer", &digits_body(), "").await;
    assert_eq!(status, 200, "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trickled_body_is_cut_off_and_an_oversized_length_is_refused_unread() {
    let (addr, _state, _stop) = support::relay(|raw| {
        raw.limits.request_timeout_ms = 800;
        raw.limits.max_body_bytes = 4096;
    })
    .await;
    let mut sock = TcpStream::connect(addr).await.unwrap();
    sock.write_all(
        b"POST /v2/models/digits/infer HTTP/1.1\r\nhost: r\r\ncontent-length: 1000\r\n\r\n{\"in",
    )
    .await
    .unwrap();
    let (text, closed) = read_until_closed(&mut sock, Duration::from_secs(5)).await;
    assert!(text.starts_with("HTTP/1.1 408"), "{text}");
    assert!(text.contains("did not arrive within 800 ms"), "{text}");
    let _ = closed;

    // Content-Length over the limit: 413 before a byte of the body is sent.
    let mut sock = TcpStream::connect(addr).await.unwrap();
    sock.write_all(
        b"POST /v2/models/digits/infer HTTP/1.1\r\nhost: r\r\ncontent-length: 999999999\r\n\r\n",
    )
    .await
    .unwrap();
    let (text, _) = read_until_closed(&mut sock, Duration::from_secs(5)).await;
    assert!(text.starts_with("HTTP/1.1 413"), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_over_the_limit_wait_until_one_closes() {
    let (addr, state, _stop) = support::relay(|raw| raw.limits.max_connections = 4).await;
    let mut held = Vec::new();
    for _ in 0..4 {
        let mut sock = TcpStream::connect(addr).await.unwrap();
        sock.write_all(b"GET /v2/health/live HTTP/1.1\r\nhost: r\r\n\r\n")
            .await
            .unwrap();
        let mut buf = [0u8; 512];
        let n = sock.read(&mut buf).await.unwrap();
        assert!(buf[..n].starts_with(b"HTTP/1.1 200"));
        held.push(sock); // kept alive
    }
    let metrics = state.0.metrics.clone();
    assert_eq!(metrics.connections.get(), 4);
    // A fifth is accepted by the kernel but not served while four are open...
    let body = digits_body();
    let extra = tokio::spawn(async move { post(addr, "/v2/models/digits/infer", &body, "").await });
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(!extra.is_finished(), "served past the connection limit");
    // ...and is served as soon as one closes.
    drop(held.pop());
    let (status, _) = tokio::time::timeout(Duration::from_secs(10), extra)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn work_past_its_deadline_is_dropped_and_a_panicking_batch_answers_500() {
    // One worker; a long batching delay, which a lone request must never pay (it would if a
    // panicking batch left the model counted as busy).
    let (addr, state, _stop) = support::relay(|raw| {
        raw.workers = Some(1);
        raw.batching.max_queue_delay_us = 1_000_000;
    })
    .await;
    // Keep the one worker busy with the heavy model...
    let frame: Vec<f32> = vec![0.5; 3 * 256 * 256];
    let heavy = json!({"inputs": [{"name": "x", "shape": [1, 3, 256, 256], "datatype": "FP32", "data": frame}]})
        .to_string();
    let busy: Vec<_> = (0..6)
        .map(|_| {
            let h = heavy.clone();
            tokio::spawn(async move { post(addr, "/v2/models/ocr_det/infer", &h, "").await })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(300)).await;
    // ...so a request that allows 1 ms cannot run in time: it is answered 504 and dropped from
    // the queue rather than computed for nobody.
    let (status, body) = post(
        addr,
        "/v2/models/digits/infer",
        &digits_body(),
        "tether-budget-ms: 1\r\n",
    )
    .await;
    assert_eq!(status, 504, "{body}");
    for b in busy {
        assert_eq!(b.await.unwrap().0, 200);
    }
    let text = String::from_utf8(reqwest_free_get(addr, "/metrics").await.into_bytes()).unwrap();
    assert!(text.contains("tether_relay_expired_total 1"), "{text}");
    let (status, body) = post(
        addr,
        "/v2/models/digits/infer",
        &digits_body(),
        "tether-budget-ms: x\r\n",
    )
    .await;
    assert_eq!(status, 400, "{body}");

    // A batch whose engine call panics: its caller gets 500, the panic is counted, and the
    // model keeps serving lone requests at once (the running count was not leaked).
    state
        .0
        .engine
        .model("digits")
        .unwrap()
        .inject_batch_panics(1);
    let (status, body) = post(addr, "/v2/models/digits/infer", &digits_body(), "").await;
    assert_eq!(status, 500, "{body}");
    let v: Value = serde_json::from_str(&body).unwrap();
    assert!(v["error"].as_str().unwrap().contains("internal"), "{v}");
    for _ in 0..3 {
        let (status, body) = post(addr, "/v2/models/digits/infer", &digits_body(), "").await;
        assert_eq!(status, 200, "{body}");
        let v: Value = serde_json::from_str(&body).unwrap();
        let queued = v["parameters"]["queue_ms"].as_f64().unwrap();
        assert!(
            queued < 500.0,
            "a lone request waited {queued} ms for a batch"
        );
    }
    let text = reqwest_free_get(addr, "/metrics").await;
    assert!(text.contains("tether_relay_batch_panics_total 1"), "{text}");
}

/// A GET over a fresh connection; the body.
async fn reqwest_free_get(addr: SocketAddr, path: &str) -> String {
    let mut sock = TcpStream::connect(addr).await.unwrap();
    sock.write_all(
        format!("GET {path} HTTP/1.1\r\nhost: r\r\nconnection: close\r\n\r\n").as_bytes(),
    )
    .await
    .unwrap();
    let (text, _) = read_until_closed(&mut sock, Duration::from_secs(10)).await;
    text.split("\r\n\r\n").nth(1).unwrap_or_default().to_owned()
}
