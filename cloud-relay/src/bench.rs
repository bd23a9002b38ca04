//! `tether-relay bench`: throughput and latency of the relay over real HTTP on loopback, with
//! batching off and on, at several concurrencies, against the engine called in process. The
//! load comes from closed-loop clients (each sends a one-row request and waits for the answer).

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use models::Tensor;
use models::stats::percentile;
use models::v2::InferenceRequest;

use crate::config::RawConfig;

/// One line of the report.
#[derive(Debug, Clone)]
pub struct Line {
    pub model: String,
    pub mode: String,
    pub concurrency: usize,
    pub requests: usize,
    pub errors: usize,
    pub requests_per_s: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
}

/// A one-row request for a model, from its test split.
pub fn one_row(raw: &RawConfig, model: &str) -> anyhow::Result<(Vec<u8>, Tensor)> {
    let dir = raw
        .models_dir
        .clone()
        .unwrap_or_else(models::default_zoo_dir);
    let manifest = models::Manifest::load(&dir)?;
    let spec = manifest.model(model)?;
    let split = manifest.test_split(spec)?;
    let mut shape = vec![1];
    shape.extend_from_slice(&split.sample_shape);
    let tensor = Tensor::from_f32(
        spec.inputs[0].name.clone(),
        shape,
        split.samples(0, 1).to_vec(),
    )?;
    let body = serde_json::to_vec(&InferenceRequest::from_tensors(
        None,
        std::slice::from_ref(&tensor),
    ))?;
    Ok((body, tensor))
}

/// Calls the engine in process, on one thread, for `duration`.
pub fn engine_line(raw: &RawConfig, model: &str, duration: Duration) -> anyhow::Result<Line> {
    let config = raw.validate()?;
    let engine = models::EngineConfig {
        variant: config.variant,
        only: vec![model.to_owned()],
        max_elements: config.max_elements,
        ..models::EngineConfig::default()
    }
    .build(&config.models_dir)?;
    let m = engine.model(model)?;
    let (_, tensor) = one_row(raw, model)?;
    let mut lat = Vec::new();
    let started = Instant::now();
    while started.elapsed() < duration {
        let t0 = Instant::now();
        m.infer(vec![tensor.clone()])?;
        lat.push(t0.elapsed().as_secs_f64() * 1e3);
    }
    lat.sort_by(f64::total_cmp);
    #[allow(clippy::cast_precision_loss)]
    Ok(Line {
        model: model.to_owned(),
        mode: "engine in process".into(),
        concurrency: 1,
        requests: lat.len(),
        errors: 0,
        requests_per_s: lat.len() as f64 / started.elapsed().as_secs_f64(),
        p50_ms: percentile(&lat, 0.5),
        p99_ms: percentile(&lat, 0.99),
    })
}

/// Drives `concurrency` closed-loop clients against a relay at `addr`.
pub async fn http_line(
    addr: SocketAddr,
    model: &str,
    mode: &str,
    body: Vec<u8>,
    concurrency: usize,
    duration: Duration,
) -> Line {
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(concurrency.max(1))
        .build()
        .unwrap_or_default();
    let url = format!("http://{addr}/v2/models/{model}/infer");
    let deadline = Instant::now() + duration;
    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..concurrency.max(1) {
        let (client, url, body) = (client.clone(), url.clone(), body.clone());
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            let mut errors = 0usize;
            while Instant::now() < deadline {
                let t0 = Instant::now();
                let ok = match client
                    .post(&url)
                    .header("content-type", "application/json")
                    .body(body.clone())
                    .send()
                    .await
                {
                    Ok(r) => r.status().is_success() && r.bytes().await.is_ok(),
                    Err(_) => false,
                };
                if ok {
                    lat.push(t0.elapsed().as_secs_f64() * 1e3);
                } else {
                    errors += 1;
                }
            }
            (lat, errors)
        }));
    }
    let mut lat = Vec::new();
    let mut errors = 0;
    for t in tasks {
        if let Ok((l, e)) = t.await {
            lat.extend(l);
            errors += e;
        }
    }
    let elapsed = started.elapsed().as_secs_f64();
    lat.sort_by(f64::total_cmp);
    #[allow(clippy::cast_precision_loss)]
    Line {
        model: model.to_owned(),
        mode: mode.to_owned(),
        concurrency,
        requests: lat.len(),
        errors,
        requests_per_s: lat.len() as f64 / elapsed,
        p50_ms: percentile(&lat, 0.5),
        p99_ms: percentile(&lat, 0.99),
    }
}

/// The report as a table.
pub fn format_table(lines: &[Line]) -> String {
    let mut out = format!(
        "{:<10} {:<22} {:>11} {:>9} {:>7} {:>11} {:>9} {:>9}\n",
        "model", "mode", "concurrency", "requests", "errors", "requests/s", "p50 ms", "p99 ms"
    );
    for l in lines {
        out.push_str(&format!(
            "{:<10} {:<22} {:>11} {:>9} {:>7} {:>11.1} {:>9.3} {:>9.3}\n",
            l.model,
            l.mode,
            l.concurrency,
            l.requests,
            l.errors,
            l.requests_per_s,
            l.p50_ms,
            l.p99_ms
        ));
    }
    out
}
