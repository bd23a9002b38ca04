//! `tether-agent bench`: latency percentiles and throughput of the local engine, per model and
//! variant, at a batch size and a thread count. Inputs come from the zoo (test splits for the
//! classifiers, golden requests for the others), so figures are comparable run to run.

use std::time::{Duration, Instant};

use models::engine::LoadedModel;
use models::manifest::{Manifest, TestSplit};
use models::stats::percentile;
use models::{ModelError, Tensor, TensorData, golden};

/// What to measure.
#[derive(Debug, Clone)]
pub struct BenchConfig {
    /// Requests per call, stacked along the batch axis (unbatchable models always run 1).
    pub batch: usize,
    /// Measuring time per model and variant.
    pub duration: Duration,
    /// Threads calling the shared model at once.
    pub threads: usize,
    /// Unmeasured calls first, so plans are built and caches warm.
    pub warmup_calls: usize,
}

/// The figures for one model and variant.
#[derive(Debug, Clone)]
pub struct BenchReport {
    pub model: String,
    pub variant: String,
    pub precision: String,
    pub batch: usize,
    pub threads: usize,
    pub calls: usize,
    pub p50_ms: f64,
    pub p90_ms: f64,
    pub p99_ms: f64,
    /// Samples (rows) per second across all threads.
    pub samples_per_s: f64,
}

/// The inputs of one call of `batch` rows for a model, drawn from the zoo.
pub fn sample_inputs(
    manifest: &Manifest,
    model: &LoadedModel,
    batch: usize,
) -> Result<Vec<Tensor>, ModelError> {
    let spec = model.spec();
    if spec.test_split.is_some() && spec.inputs.len() == 1 {
        let split = manifest.test_split(spec)?;
        return Ok(vec![split_batch(&split, &spec.inputs[0].name, 0, batch)?]);
    }
    let request = golden::request(manifest, model.name())?;
    let inputs = request.decode_inputs(model.max_elements())?;
    if batch <= 1 || !spec.batchable() {
        return Ok(inputs);
    }
    inputs.into_iter().map(|t| repeat_rows(&t, batch)).collect()
}

/// Rows `start..start+batch` of a test split (wrapping around) as one tensor.
pub fn split_batch(
    split: &TestSplit,
    name: &str,
    start: usize,
    batch: usize,
) -> Result<Tensor, ModelError> {
    let mut data = Vec::with_capacity(batch * split.sample_len());
    for i in 0..batch {
        let row = (start + i) % split.len().max(1);
        data.extend_from_slice(split.samples(row, row + 1));
    }
    let mut shape = vec![batch];
    shape.extend_from_slice(&split.sample_shape);
    Tensor::from_f32(name, shape, data)
}

fn repeat_rows(t: &Tensor, batch: usize) -> Result<Tensor, ModelError> {
    let mut data = TensorData::with_capacity(t.datatype(), t.data().len() * batch);
    for _ in 0..batch {
        data.extend_from(t.data()).map_err(ModelError::BadRequest)?;
    }
    let mut shape = t.shape().to_vec();
    shape[0] *= batch;
    Tensor::new(t.name(), shape, data)
}

/// Measures one model.
pub fn bench_model(
    manifest: &Manifest,
    model: &LoadedModel,
    config: &BenchConfig,
) -> Result<BenchReport, ModelError> {
    let batch = if model.spec().batchable() {
        config.batch.max(1)
    } else {
        1
    };
    let inputs = sample_inputs(manifest, model, batch)?;
    let (ordered, rows) = model.validate(inputs)?;
    for _ in 0..config.warmup_calls {
        model.run_validated(&ordered, rows)?;
    }
    let threads = config.threads.max(1);
    let started = Instant::now();
    let deadline = started + config.duration;
    let per_thread: Vec<Result<Vec<f64>, ModelError>> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..threads)
            .map(|_| {
                scope.spawn(|| {
                    let mut latencies = Vec::new();
                    // At least one call per thread, however short the duration.
                    loop {
                        let t0 = Instant::now();
                        model.run_validated(&ordered, rows)?;
                        latencies.push(t0.elapsed().as_secs_f64() * 1e3);
                        if Instant::now() >= deadline {
                            return Ok(latencies);
                        }
                    }
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join().unwrap_or_else(|_| {
                    Err(ModelError::BadRequest("a bench thread panicked".into()))
                })
            })
            .collect()
    });
    let elapsed = started.elapsed().as_secs_f64();
    let mut latencies = Vec::new();
    for r in per_thread {
        latencies.extend(r?);
    }
    latencies.sort_by(f64::total_cmp);
    let calls = latencies.len();
    #[allow(clippy::cast_precision_loss)]
    let samples_per_s = (calls * rows) as f64 / elapsed;
    Ok(BenchReport {
        model: model.name().to_owned(),
        variant: model.variant().variant.to_string(),
        precision: model.variant().precision.clone(),
        batch: rows,
        threads,
        calls,
        p50_ms: percentile(&latencies, 0.50),
        p90_ms: percentile(&latencies, 0.90),
        p99_ms: percentile(&latencies, 0.99),
        samples_per_s,
    })
}

/// A plain-text table of reports.
pub fn format_table(reports: &[BenchReport]) -> String {
    let mut out = format!(
        "{:<10} {:<7} {:<5} {:>5} {:>7} {:>7} {:>9} {:>9} {:>9} {:>11}\n",
        "model",
        "variant",
        "prec",
        "batch",
        "threads",
        "calls",
        "p50 ms",
        "p90 ms",
        "p99 ms",
        "samples/s"
    );
    for r in reports {
        out.push_str(&format!(
            "{:<10} {:<7} {:<5} {:>5} {:>7} {:>7} {:>9.3} {:>9.3} {:>9.3} {:>11.1}\n",
            r.model,
            r.variant,
            r.precision,
            r.batch,
            r.threads,
            r.calls,
            r.p50_ms,
            r.p90_ms,
            r.p99_ms,
            r.samples_per_s
        ));
    }
    out
}
