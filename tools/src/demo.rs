//! `tether-agent demo`: everything in one process — an embedded broker, a relay and an agent
//! with one local worker — and a request stream through MQTT that rises to three times the
//! agent's local capacity, with a live view and a summary.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::Duration;

use serde_json::json;

use crate::stream::{self, Outcome, Phase, StreamConfig, Tick};
use agent::config::{RawConfig, RawEmbeddedBroker, RawRelay};
use agent::policy::Mode;

/// What the demo runs.
#[derive(Debug, Clone)]
pub struct DemoConfig {
    /// Total length; `None` runs until Ctrl-C.
    pub seconds: Option<f64>,
    pub mode: Mode,
    /// Each local inference is held to this long, standing in for a small device.
    pub service_ms: f64,
    pub budget_ms: f64,
    /// Share of requests that repeat an earlier one (and can be answered from the cache).
    pub repeat_share: f64,
    pub models_dir: PathBuf,
}

impl Default for DemoConfig {
    fn default() -> Self {
        DemoConfig {
            seconds: None,
            mode: Mode::LocalFirst,
            service_ms: 10.0,
            budget_ms: 150.0,
            repeat_share: 0.1,
            models_dir: agent::models_dir(None),
        }
    }
}

/// Why the demo could not run.
#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    #[error("{0}")]
    Setup(String),
    #[error(transparent)]
    Agent(#[from] agent::AgentError),
}

/// The multiples of local capacity the stream steps through.
const STEPS: [f64; 4] = [0.5, 1.0, 2.0, 3.0];

fn payloads(
    dir: &Path,
    n: usize,
    repeat_share: f64,
    budget_ms: f64,
) -> Result<Vec<Vec<u8>>, DemoError> {
    let manifest = models::Manifest::load(dir).map_err(|e| DemoError::Setup(e.to_string()))?;
    let spec = manifest
        .model("digits")
        .map_err(|e| DemoError::Setup(e.to_string()))?;
    let split = manifest
        .test_split(spec)
        .map_err(|e| DemoError::Setup(e.to_string()))?;
    let mut rng = fastrand::Rng::with_seed(7);
    let mut out: Vec<Vec<u8>> = Vec::with_capacity(n);
    for i in 0..n {
        if i > 0 && rng.f64() < repeat_share {
            let earlier = out[rng.usize(..i)].clone();
            out.push(earlier);
            continue;
        }
        let k = rng.usize(..split.len());
        // A little sensor noise: every fresh request is a new input for the cache.
        let data: Vec<f32> = split
            .samples(k, k + 1)
            .iter()
            .map(|v| (v + (rng.f32() - 0.5) * 0.01).clamp(0.0, 1.0))
            .collect();
        out.push(
            serde_json::to_vec(&json!({
                "parameters": {"budget_ms": budget_ms},
                "inputs": [{"name": "input", "shape": [1, 1, 8, 8], "datatype": "FP32", "data": data}],
            }))
            .map_err(|e| DemoError::Setup(e.to_string()))?,
        );
    }
    Ok(out)
}

fn tick_line(t: &Tick) -> String {
    let mut line = format!(
        "{:>5.0}s  {:>3.1}x  offered {:>5.0}/s  answered {:>5.0}/s",
        t.elapsed.as_secs_f64(),
        STEPS[t.phase.min(STEPS.len() - 1)],
        t.offered_per_s,
        t.answered_per_s
    );
    let total: usize = t.routes.values().map(|r| r.0).sum::<usize>() + t.rejected;
    for route in ["local", "cloud", "cache"] {
        match t.routes.get(route) {
            Some((n, p50, p99)) => {
                let _ = write!(line, " | {route} {n:>4} p50 {p50:>5.1} p99 {p99:>6.1} ms");
            }
            None => {
                let _ = write!(line, " | {route}    0");
            }
        }
    }
    let cloud = t.routes.get("cloud").map_or(0, |r| r.0);
    let _ = write!(
        line,
        " | offload {:>3.0}% | rejected {}",
        100.0 * cloud as f64 / total.max(1) as f64,
        t.rejected
    );
    line
}

/// A table of one phase per row.
pub fn summary_table(outcomes: &[Outcome], phases: &[Phase], budget_ms: f64) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:>5} {:>9} {:>7} {:>12} {:>8} {:>8} {:>7} {:>7} {:>7} {:>9} {:>10}",
        "load",
        "offered/s",
        "sent",
        "answered/s",
        "p50 ms",
        "p99 ms",
        "local",
        "cloud",
        "cache",
        "rejected",
        "in budget"
    );
    for (i, p) in phases.iter().enumerate() {
        let of: Vec<&Outcome> = outcomes.iter().filter(|o| o.phase == i).collect();
        let s = stream::summarize(of.iter().copied(), p.duration.as_secs_f64(), budget_ms);
        let share = |r: &str| {
            format!(
                "{:.0}%",
                100.0 * s.routes.get(r).copied().unwrap_or(0) as f64 / s.sent.max(1) as f64
            )
        };
        let _ = writeln!(
            out,
            "{:>4.1}x {:>9.0} {:>7} {:>12.0} {:>8.1} {:>8.1} {:>7} {:>7} {:>7} {:>9} {:>9.1}%",
            STEPS[i.min(STEPS.len() - 1)],
            p.rate_per_s,
            s.sent,
            s.throughput_per_s,
            s.p50_ms,
            s.p99_ms,
            share("local"),
            share("cloud"),
            share("cache"),
            s.rejected + s.lost,
            100.0 * s.within_budget as f64 / s.sent.max(1) as f64
        );
    }
    out
}

/// Runs the demo, printing to stdout; `stop` ends an open-ended run.
pub async fn run(cfg: DemoConfig, stop: Arc<AtomicBool>) -> Result<String, DemoError> {
    let scratch = std::env::temp_dir().join(format!("tether-demo-{}", std::process::id()));
    std::fs::create_dir_all(&scratch).map_err(|e| DemoError::Setup(e.to_string()))?;

    // The relay, in this process, on a port of its own.
    let mut relay_raw = cloud_relay::config::RawConfig {
        listen: "127.0.0.1:0".into(),
        models_dir: Some(cfg.models_dir.clone()),
        workers: Some(1),
        ..Default::default()
    };
    relay_raw.shutdown_grace_ms = 0;
    let relay_cfg = relay_raw
        .validate()
        .map_err(|e| DemoError::Setup(e.to_string()))?;
    let state = tokio::task::spawn_blocking(move || cloud_relay::State::build(relay_cfg))
        .await
        .map_err(|e| DemoError::Setup(e.to_string()))?
        .map_err(|e| DemoError::Setup(e.to_string()))?;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .map_err(|e| DemoError::Setup(format!("cannot start the relay: {e}")))?;
    let relay_addr = listener
        .local_addr()
        .map_err(|e| DemoError::Setup(e.to_string()))?;
    let (relay_stop_tx, relay_stop_rx) = tokio::sync::oneshot::channel::<()>();
    let relay = tokio::spawn(cloud_relay::serve(state, listener, async move {
        let _ = relay_stop_rx.await;
    }));

    // The agent: embedded broker, one worker, the relay.
    let mut raw = RawConfig {
        device_id: Some("demo".into()),
        models_dir: Some(cfg.models_dir.clone()),
        embedded_broker: Some(RawEmbeddedBroker {
            listen: "127.0.0.1:0".into(),
            ..Default::default()
        }),
        shutdown_grace_ms: 2000,
        ..RawConfig::default()
    };
    raw.inference.workers = Some(1);
    raw.inference.queue = 1024;
    raw.inference.emulated_service_ms = cfg.service_ms;
    raw.store.path = Some(scratch.join("tether.db"));
    raw.policy.mode = cfg.mode;
    raw.policy.default_budget_ms = cfg.budget_ms as u64;
    raw.relay = Some(RawRelay::new(format!("http://{relay_addr}")));
    let config = raw
        .validate(|| None)
        .map_err(|e| DemoError::Setup(e.to_string()))?;
    let (agent_stop_tx, agent_stop_rx) = tokio::sync::oneshot::channel::<()>();
    let (started_tx, started_rx) = tokio::sync::oneshot::channel();
    let agent = tokio::spawn(agent::run(
        config,
        async move {
            let _ = agent_stop_rx.await;
        },
        Some(started_tx),
    ));
    let running = started_rx
        .await
        .map_err(|_| DemoError::Setup("the agent did not start".into()))?;
    let mut connected = running.connected.clone();
    let _ = tokio::time::timeout(Duration::from_secs(10), connected.wait_for(|c| *c)).await;
    let broker = running
        .embedded_broker
        .ok_or_else(|| DemoError::Setup("no embedded broker".into()))?
        .v5;

    let capacity = 1000.0 / cfg.service_ms;
    let step_secs = cfg.seconds.map_or(15.0, |s| s / STEPS.len() as f64);
    let mut phases: Vec<Phase> = STEPS
        .iter()
        .map(|m| Phase {
            rate_per_s: m * capacity,
            duration: Duration::from_secs_f64(step_secs),
        })
        .collect();
    if cfg.seconds.is_none()
        && let Some(last) = phases.last_mut()
    {
        last.duration = Duration::from_secs(24 * 3600);
    }
    println!(
        "Tether demo: an embedded MQTT broker ({broker}), a relay (http://{relay_addr}) and an agent,\n\
         all in this process. The agent serves the digits model with one local worker whose every\n\
         inference is held to {:.0} ms, standing in for a small device (here the model itself takes\n\
         microseconds), so its local capacity is about {capacity:.0} requests/s. This machine's other\n\
         core runs the relay, so offloading adds real capacity. Requests carry a {:.0} ms budget and\n\
         rise through {} times the local capacity; {:.0}% repeat an earlier input. Policy: {:?}.{}\n",
        cfg.service_ms,
        cfg.budget_ms,
        STEPS
            .iter()
            .map(|s| format!("{s}"))
            .collect::<Vec<_>>()
            .join(", "),
        cfg.repeat_share * 100.0,
        cfg.mode,
        if cfg.seconds.is_none() {
            " Ctrl-C ends it."
        } else {
            ""
        }
    );
    let total: f64 = phases
        .iter()
        .map(|p| p.rate_per_s * p.duration.as_secs_f64().min(3600.0))
        .sum();
    let payloads = payloads(
        &cfg.models_dir,
        (total as usize).clamp(1000, 200_000),
        cfg.repeat_share,
        cfg.budget_ms,
    )?;
    let outcomes = stream::run(
        StreamConfig {
            broker,
            topic: "tether/demo/infer/digits".into(),
            payloads,
            phases: phases.clone(),
            linger: Duration::from_secs(3),
            stop: Some(stop),
        },
        |t| println!("{}", tick_line(t)),
    )
    .await
    .map_err(DemoError::Setup)?;
    let used: Vec<Phase> = phases
        .iter()
        .enumerate()
        .filter(|(i, _)| outcomes.iter().any(|o| o.phase == *i))
        .map(|(i, p)| {
            let mut p = *p;
            if let Some(last) = outcomes
                .iter()
                .filter(|o| o.phase == i)
                .map(|o| o.sent_at)
                .max()
            {
                let first = outcomes
                    .iter()
                    .filter(|o| o.phase == i)
                    .map(|o| o.sent_at)
                    .min()
                    .unwrap_or(last);
                p.duration = p.duration.min((last - first).max(Duration::from_millis(1)));
            }
            p
        })
        .collect();
    let table = summary_table(&outcomes, &used, cfg.budget_ms);
    let _ = agent_stop_tx.send(());
    let _ = agent.await;
    let _ = relay_stop_tx.send(());
    let _ = relay.await;
    let _ = std::fs::remove_dir_all(&scratch);
    Ok(table)
}
