//! `tether-agent bench-escalation`: what confidence escalation buys on the classifiers' test
//! splits. Each sample runs on the device model; those whose top-1 probability is under the
//! threshold are answered by the cloud model instead (the file the relay serves). Reports the
//! accuracy of device only, device plus escalation and cloud only, and the share escalated.

use std::fmt::Write as _;
use std::path::Path;

use models::{EngineConfig, ModelError, Variant};

use crate::bench::split_batch;

/// One model at one threshold.
#[derive(Debug, Clone)]
pub struct EscalationReport {
    pub model: String,
    pub samples: usize,
    pub threshold: f64,
    pub device_accuracy: f64,
    pub escalated_accuracy: f64,
    pub cloud_accuracy: f64,
    pub escalated_share: f64,
}

fn argmax(row: &[f32]) -> usize {
    row.iter()
        .enumerate()
        .max_by(|a, b| a.1.total_cmp(b.1))
        .map_or(0, |(i, _)| i)
}

/// Top-1 class and probability per sample, and the true labels.
type Predictions = (Vec<(usize, f32)>, Vec<u8>);

/// Top-1 index and probability of every sample of a model's test split under `variant`.
fn predictions(dir: &Path, model: &str, variant: Variant) -> Result<Predictions, ModelError> {
    let engine = EngineConfig {
        variant,
        only: vec![model.to_owned()],
        ..EngineConfig::default()
    }
    .build(dir)?;
    let m = engine.model(model)?;
    let split = engine.manifest().test_split(m.spec())?;
    let name = &m.spec().inputs[0].name;
    let mut out = Vec::with_capacity(split.len());
    let batch = 64;
    let mut start = 0;
    while start < split.len() {
        let n = batch.min(split.len() - start);
        let outputs = m.infer(vec![split_batch(&split, name, start, n)?])?;
        let probs = outputs[0].as_f32().ok_or_else(|| ModelError::Run {
            model: (*model).to_owned(),
            reason: "its output is not FP32".into(),
        })?;
        let classes = probs.len() / n;
        for row in probs.chunks(classes) {
            let i = argmax(row);
            out.push((i, row[i]));
        }
        start += n;
    }
    Ok((out, split.labels.clone()))
}

/// The reports for `models` at each threshold.
pub fn run(
    dir: &Path,
    models: &[&str],
    thresholds: &[f64],
) -> Result<Vec<EscalationReport>, ModelError> {
    let mut reports = Vec::new();
    for model in models {
        let (device, labels) = predictions(dir, model, Variant::Device)?;
        let (cloud, _) = predictions(dir, model, Variant::Cloud)?;
        let n = labels.len();
        let correct = |p: &[(usize, f32)], i: usize| p[i].0 == usize::from(labels[i]);
        let acc = |hits: usize| hits as f64 / n.max(1) as f64;
        let device_hits = (0..n).filter(|&i| correct(&device, i)).count();
        let cloud_hits = (0..n).filter(|&i| correct(&cloud, i)).count();
        for &t in thresholds {
            let mut escalated = 0;
            let mut hits = 0;
            for i in 0..n {
                let up = f64::from(device[i].1) < t;
                escalated += usize::from(up);
                hits += usize::from(if up {
                    correct(&cloud, i)
                } else {
                    correct(&device, i)
                });
            }
            reports.push(EscalationReport {
                model: (*model).to_owned(),
                samples: n,
                threshold: t,
                device_accuracy: acc(device_hits),
                escalated_accuracy: acc(hits),
                cloud_accuracy: acc(cloud_hits),
                escalated_share: escalated as f64 / n.max(1) as f64,
            });
        }
    }
    Ok(reports)
}

pub fn format_table(reports: &[EscalationReport]) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:<10} {:>7} {:>9} {:>12} {:>20} {:>11} {:>10}",
        "model",
        "samples",
        "threshold",
        "device only",
        "device + escalation",
        "cloud only",
        "escalated"
    );
    for r in reports {
        let _ = writeln!(
            out,
            "{:<10} {:>7} {:>9.2} {:>11.2}% {:>19.2}% {:>10.2}% {:>9.1}%",
            r.model,
            r.samples,
            r.threshold,
            r.device_accuracy * 100.0,
            r.escalated_accuracy * 100.0,
            r.cloud_accuracy * 100.0,
            r.escalated_share * 100.0
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escalation_lands_between_device_and_cloud_and_grows_with_the_threshold() {
        let reports = run(&models::default_zoo_dir(), &["digits"], &[0.0, 0.9, 1.01]).unwrap();
        let [none, some, all] = &reports[..] else {
            panic!("{reports:?}")
        };
        assert_eq!(none.escalated_share, 0.0);
        assert_eq!(none.escalated_accuracy, none.device_accuracy);
        assert_eq!(all.escalated_share, 1.0);
        assert_eq!(all.escalated_accuracy, all.cloud_accuracy);
        assert!(
            some.escalated_share > 0.0 && some.escalated_share < 1.0,
            "{some:?}"
        );
        assert!(some.escalated_accuracy >= some.device_accuracy, "{some:?}");
        assert!(some.device_accuracy > 0.9, "{some:?}");
    }
}
