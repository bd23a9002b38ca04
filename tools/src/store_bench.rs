//! `tether-agent bench-store`: what the database costs. Committed outbox writes per second
//! with batched commits against one commit per write, and the time the result cache adds to a
//! request: building the key and looking it up, on a hit (in memory, and in SQLite) and on a
//! miss, next to the model's own run time.

use std::fmt::Write as _;
use std::path::Path;

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use models::stats::percentile;
use models::{EngineConfig, Variant, golden};

use agent::config::{RawConfig, StoreConfig, Synchronous};
use agent::store::outbox::OutMessage;
use agent::store::{self, OpenMode, cache};

/// Why the benchmark could not run.
#[derive(Debug, thiserror::Error)]
pub enum BenchStoreError {
    #[error(transparent)]
    Store(#[from] store::StoreError),
    #[error(transparent)]
    Models(#[from] models::ModelError),
    #[error("cannot make a scratch directory: {0}")]
    Scratch(std::io::Error),
    #[error("the store configuration is invalid: {0}")]
    Config(String),
    #[error("{0} cache lookups gave the wrong answer, so the figures would be meaningless")]
    WrongAnswers(usize),
}

fn config(
    dir: &Path,
    name: &str,
    sync: Synchronous,
    max_batch: usize,
    front: usize,
) -> Result<StoreConfig, BenchStoreError> {
    let mut raw = RawConfig::default();
    raw.store.path = Some(dir.join(name));
    raw.store.synchronous = sync;
    raw.store.max_batch = max_batch;
    raw.store.cache.memory_entries = front;
    raw.store.cache.max_rows = 1_000_000;
    raw.store.cache.max_bytes = 1 << 30;
    raw.store.outbox.max_rows = 10_000_000;
    raw.store.outbox.max_bytes = 1 << 32;
    raw.models_dir = Some(models::default_zoo_dir());
    Ok(raw
        .validate(|| Some("bench".into()))
        .map_err(|e| BenchStoreError::Config(e.to_string()))?
        .store)
}

/// Appends as fast as the store takes them for `seconds`; returns committed writes per second
/// and the commits it took.
fn write_rate(cfg: &StoreConfig, seconds: f64) -> Result<(f64, u64), BenchStoreError> {
    let (store, thread) = store::open(cfg, OpenMode::Agent)?;
    let payload = vec![b'x'; 320];
    let commits_before = store.counters.commits.load(Ordering::Relaxed);
    let writes_before = store.counters.writes.load(Ordering::Relaxed);
    let started = Instant::now();
    let until = started + Duration::from_secs_f64(seconds);
    while Instant::now() < until {
        // The outbox write path every reply takes (the store's queue makes this wait).
        store.append_event(OutMessage {
            topic: "tether/bench/reply".into(),
            payload: payload.clone(),
            correlation: Some(b"0123456789abcdef".to_vec()),
            v5: true,
            retain: false,
            expires_ms: None,
        });
    }
    store.flush_blocking();
    let elapsed = started.elapsed().as_secs_f64();
    let commits = store.counters.commits.load(Ordering::Relaxed) - commits_before;
    let committed = store.counters.writes.load(Ordering::Relaxed) - writes_before;
    stop(store, thread);
    Ok((committed as f64 / elapsed, commits))
}

fn stop(store: store::StoreHandle, thread: store::StoreThread) {
    let rt = tokio::runtime::Builder::new_current_thread().build();
    if let Ok(rt) = rt {
        rt.block_on(store.stop());
    }
    thread.join();
}

/// Times `f` for about `seconds`; returns the samples in microseconds.
fn time_us(seconds: f64, mut f: impl FnMut()) -> Vec<f64> {
    let mut samples = Vec::new();
    let until = Instant::now() + Duration::from_secs_f64(seconds);
    while Instant::now() < until || samples.len() < 100 {
        let t = Instant::now();
        f();
        samples.push(t.elapsed().as_secs_f64() * 1e6);
    }
    samples
}

/// Runs the benchmark; returns the report as text.
pub fn run(
    models_dir: &Path,
    dir: Option<&Path>,
    seconds: f64,
    sync: Synchronous,
) -> Result<String, BenchStoreError> {
    let scratch = match dir {
        Some(d) => d.to_owned(),
        None => std::env::temp_dir().join(format!("tether-bench-store-{}", std::process::id())),
    };
    std::fs::create_dir_all(&scratch).map_err(BenchStoreError::Scratch)?;
    let mut out = String::new();
    let _ = writeln!(out, "synchronous = {sync:?}, scratch {}", scratch.display());

    let (batched, batched_commits) =
        write_rate(&config(&scratch, "batched.db", sync, 512, 0)?, seconds)?;
    let (single, single_commits) =
        write_rate(&config(&scratch, "single.db", sync, 1, 0)?, seconds)?;
    let _ = writeln!(
        out,
        "\noutbox appends (320-byte replies), committed per second:"
    );
    let _ = writeln!(
        out,
        "  batched commits (max_batch 512): {batched:>10.0}/s  ({batched_commits} commits)"
    );
    let _ = writeln!(
        out,
        "  one commit per write:            {single:>10.0}/s  ({single_commits} commits)"
    );
    let _ = writeln!(
        out,
        "  batched / single:                {:>10.1}x",
        batched / single.max(1e-9)
    );

    // The cache on the digits model's golden request.
    let engine = EngineConfig {
        variant: Variant::Device,
        only: vec!["digits".into()],
        ..EngineConfig::default()
    }
    .build(models_dir)?;
    let model = engine.model("digits")?;
    let request = golden::request(engine.manifest(), "digits")?;
    let inputs = request.decode_inputs(model.max_elements())?;
    let key_of = |inputs: &[models::Tensor]| {
        cache::key(
            model.name(),
            model.sha256(),
            inputs,
            None,
            request.parameters.as_ref(),
            3,
        )
    };
    let value =
        serde_json::to_vec(&agent::infer::run_request(model, &request, 3)?).unwrap_or_default();
    let mut rows = Vec::new();
    // A lookup that went the wrong way would make the figures meaningless.
    let wrong = std::cell::Cell::new(0usize);
    for (name, front) in [("hit, in memory", 256), ("hit, in SQLite", 0)] {
        let (store, thread) = store::open(
            &config(&scratch, &format!("cache-{front}.db"), sync, 512, front)?,
            OpenMode::Agent,
        )?;
        store.cache_put(
            key_of(&inputs),
            "digits",
            value.clone(),
            Duration::from_secs(3600),
        );
        store.flush_blocking();
        let samples = time_us(seconds, || {
            let k = key_of(&inputs);
            wrong.set(wrong.get() + usize::from(store.cache_get(&k, store::now_ms()).is_none()));
        });
        rows.push((name, samples));
        if front == 0 {
            let mut n = 0u64;
            let samples = time_us(seconds, || {
                n += 1;
                let mut k = key_of(&inputs);
                k[..8].copy_from_slice(&n.to_le_bytes());
                wrong
                    .set(wrong.get() + usize::from(store.cache_get(&k, store::now_ms()).is_some()));
            });
            rows.push(("miss (key + key index)", samples));
        }
        stop(store, thread);
    }
    if wrong.get() > 0 {
        return Err(BenchStoreError::WrongAnswers(wrong.get()));
    }
    let samples = time_us(seconds, || {
        let _ = model.infer(inputs.clone());
    });
    rows.push(("digits int8 model run, for scale", samples));
    let elements: usize = inputs.iter().map(|t| t.data().len()).sum();
    let _ = writeln!(
        out,
        "\nresult cache, per request (digits: {elements} floats in, {} bytes cached):",
        value.len()
    );
    let _ = writeln!(out, "  {:<34} {:>10} {:>10}", "case", "p50 us", "p99 us");
    for (name, mut s) in rows {
        s.sort_by(f64::total_cmp);
        let _ = writeln!(
            out,
            "  {:<34} {:>10.1} {:>10.1}",
            name,
            percentile(&s, 0.5),
            percentile(&s, 0.99)
        );
    }
    if dir.is_none() {
        let _ = std::fs::remove_dir_all(&scratch);
    }
    Ok(out)
}
