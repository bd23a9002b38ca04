//! Telemetry: what an agent publishes on `{prefix}/{device_id}/telemetry` every
//! `telemetry_interval_secs` — load, per-model latency, route shares, cache hit rate, outbox
//! depth. Building the message is pure; the task in `fleet/mod.rs` sends it.

use serde_json::{Value, json};

use crate::metrics::Window;
use crate::monitor::Load;

/// What one message is made of.
#[derive(Debug)]
pub struct Inputs<'a> {
    pub device_id: &'a str,
    pub ts_ms: i64,
    pub interval_secs: f64,
    pub load: Load,
    pub window: &'a Window,
    /// Cache hits and misses during the window.
    pub cache_hits: u64,
    pub cache_misses: u64,
    pub outbox_rows: u64,
    pub outbox_dropped: u64,
    pub config_version: Option<&'a str>,
    /// (name, version) of the models served.
    pub models: Vec<(String, String)>,
    /// Per sensor source: windows, failures, dropped, inference errors since start.
    pub sensors: Value,
}

/// The `q` quantile (0..=1) of unsorted samples, by nearest rank.
pub fn quantile(samples: &[f32], q: f64) -> Option<f64> {
    if samples.is_empty() {
        return None;
    }
    let mut s = samples.to_vec();
    s.sort_by(f32::total_cmp);
    let rank = ((q * s.len() as f64).ceil() as usize).clamp(1, s.len());
    Some(f64::from(s[rank - 1]))
}

fn round2(x: f64) -> f64 {
    (x * 100.0).round() / 100.0
}

pub fn message(i: &Inputs<'_>) -> Value {
    let mut models = serde_json::Map::new();
    for (name, version) in &i.models {
        let samples: Vec<f32> = i
            .window
            .latency_ms
            .get(name)
            .map(|d| d.iter().copied().collect())
            .unwrap_or_default();
        let samples = samples.as_slice();
        models.insert(
            name.clone(),
            json!({
                "version": version,
                "requests": samples.len(),
                "p50_ms": quantile(samples, 0.5).map(round2),
                "p99_ms": quantile(samples, 0.99).map(round2),
            }),
        );
    }
    let total: u64 = i.window.routes.values().sum();
    let share = |route: &str| {
        (total > 0)
            .then(|| round2(i.window.routes.get(route).copied().unwrap_or(0) as f64 / total as f64))
    };
    let lookups = i.cache_hits + i.cache_misses;
    json!({
        "device_id": i.device_id,
        "ts_ms": i.ts_ms,
        "interval_secs": i.interval_secs,
        "config_version": i.config_version,
        "cpu_percent": i.load.cpu_percent.map(round2),
        "memory": {"used_bytes": i.load.memory_used_bytes, "total_bytes": i.load.memory_total_bytes},
        "temperature_c": i.load.temperature_c.map(round2),
        "throttled": i.load.throttled,
        "requests": total,
        "routes": {
            "local": share("local"),
            "cloud": share("cloud"),
            "cache": share("cache"),
            "reject": share("reject"),
        },
        "models": models,
        "cache_hit_rate": (lookups > 0).then(|| round2(i.cache_hits as f64 / lookups as f64)),
        "outbox": {"rows": i.outbox_rows, "dropped": i.outbox_dropped},
        "sensors": i.sensors,
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn quantiles_by_nearest_rank() {
        let s: Vec<f32> = (1..=100).map(|x| x as f32).collect();
        assert_eq!(quantile(&s, 0.5), Some(50.0));
        assert_eq!(quantile(&s, 0.99), Some(99.0));
        assert_eq!(quantile(&[3.0], 0.99), Some(3.0));
        assert_eq!(quantile(&[], 0.5), None);
    }

    #[test]
    fn a_message_carries_shares_rates_and_per_model_latency() {
        let mut w = Window::default();
        w.latency_ms
            .insert("digits".into(), (1..=10).map(|x| x as f32).collect());
        w.routes.insert("local".into(), 6);
        w.routes.insert("cloud".into(), 3);
        w.routes.insert("cache".into(), 1);
        let m = message(&Inputs {
            device_id: "pi-1",
            ts_ms: 1,
            interval_secs: 10.0,
            load: Load {
                cpu_percent: Some(41.234),
                memory_used_bytes: 5,
                memory_total_bytes: 10,
                temperature_c: None,
                throttled: false,
            },
            window: &w,
            cache_hits: 1,
            cache_misses: 3,
            outbox_rows: 2,
            outbox_dropped: 0,
            config_version: Some("device@3"),
            models: vec![("digits".into(), "1".into()), ("vad".into(), "5".into())],
            sensors: json!({"pump-1": {"failures": 2}}),
        });
        assert_eq!(m["routes"]["cloud"], 0.3);
        assert_eq!(m["routes"]["reject"], 0.0);
        assert_eq!(m["cache_hit_rate"], 0.25);
        assert_eq!(m["models"]["digits"]["p50_ms"], 5.0);
        assert_eq!(m["models"]["digits"]["p99_ms"], 10.0);
        assert_eq!(m["models"]["vad"]["requests"], 0);
        assert!(m["models"]["vad"]["p99_ms"].is_null());
        assert_eq!(m["cpu_percent"], 41.23);
        assert_eq!(m["config_version"], "device@3");
        assert_eq!(m["sensors"]["pump-1"]["failures"], 2);
    }
}
