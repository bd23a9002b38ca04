//! The model zoo's `MANIFEST.toml`: what each model is, its tensors, its variant files and their
//! sha256. Owns parsing, validation and checksum verification of files; never runs a model.

use std::collections::HashSet;
use std::fmt;
use std::path::{Path, PathBuf};

use crate::sha256::Sha256;
use serde::Deserialize;

use crate::error::{ModelError, Result};
use crate::tensor::Datatype;

/// The manifest file name inside a model directory.
pub const MANIFEST_FILE: &str = "MANIFEST.toml";

/// A parsed, validated manifest plus the directory its relative paths resolve against.
#[derive(Debug, Clone)]
pub struct Manifest {
    dir: PathBuf,
    models: Vec<ModelSpec>,
    candidates: Vec<CandidateSpec>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawManifest {
    manifest_version: u32,
    #[serde(default, rename = "model")]
    models: Vec<ModelSpec>,
    #[serde(default, rename = "candidate")]
    candidates: Vec<CandidateSpec>,
}

/// Another version of a model's device file, for rollouts: same interface as the model it
/// names, a file of its own.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CandidateSpec {
    pub model: String,
    pub version: String,
    #[serde(default)]
    pub description: String,
    pub file: String,
    pub precision: String,
    #[serde(default)]
    pub parameters: Option<u64>,
    #[serde(default)]
    pub test_accuracy: Option<f64>,
    pub sha256: String,
    pub bytes: u64,
}

/// One model: its interface and its files.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelSpec {
    pub name: String,
    pub version: String,
    #[serde(default)]
    pub description: String,
    /// `classification`, `voice_activity`, `segmentation`, ...
    pub task: String,
    pub origin: String,
    pub licence: String,
    #[serde(default)]
    pub preprocessing: String,
    /// Class labels, in output order, for classifiers.
    #[serde(default)]
    pub labels: Option<Vec<String>>,
    pub inputs: Vec<TensorSpec>,
    pub outputs: Vec<TensorSpec>,
    pub variants: Vec<VariantSpec>,
    #[serde(default)]
    pub test_split: Option<TestSplitSpec>,
}

/// A tensor of the model interface. `-1` in `shape` is a dynamic dimension.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct TensorSpec {
    pub name: String,
    pub datatype: Datatype,
    pub shape: Vec<i64>,
}

/// Which build of a model a file is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Variant {
    /// What runs on the device (int8 for the models trained here).
    Device,
    /// The fp32 original the device variant was quantized from.
    Source,
    /// The larger model the relay runs.
    Cloud,
}

impl Variant {
    pub fn as_str(self) -> &'static str {
        match self {
            Variant::Device => "device",
            Variant::Source => "source",
            Variant::Cloud => "cloud",
        }
    }
}

impl fmt::Display for Variant {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(self.as_str())
    }
}

impl std::str::FromStr for Variant {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "device" => Ok(Variant::Device),
            "source" => Ok(Variant::Source),
            "cloud" => Ok(Variant::Cloud),
            other => Err(format!(
                "unknown variant `{other}`: use device, source or cloud"
            )),
        }
    }
}

/// One file of a model.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VariantSpec {
    pub variant: Variant,
    pub file: String,
    pub sha256: String,
    pub bytes: u64,
    /// `int8`, `fp32`, ...
    pub precision: String,
    #[serde(default)]
    pub parameters: Option<u64>,
    /// Accuracy on the committed test split, as measured by make_models.py with ONNX Runtime.
    #[serde(default)]
    pub test_accuracy: Option<f64>,
}

/// A held-out test split: raw little-endian f32 samples and u8 labels.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TestSplitSpec {
    pub inputs: String,
    pub labels: String,
    pub count: usize,
    pub sample_shape: Vec<usize>,
    pub inputs_sha256: String,
    pub labels_sha256: String,
}

/// A loaded test split.
#[derive(Debug, Clone)]
pub struct TestSplit {
    /// Row-major samples, `count * product(sample_shape)` values.
    pub inputs: Vec<f32>,
    pub labels: Vec<u8>,
    pub sample_shape: Vec<usize>,
}

impl TestSplit {
    pub fn len(&self) -> usize {
        self.labels.len()
    }

    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }

    /// Values in one sample.
    pub fn sample_len(&self) -> usize {
        self.sample_shape.iter().product()
    }

    /// Samples `start..end` as one flat buffer.
    pub fn samples(&self, start: usize, end: usize) -> &[f32] {
        &self.inputs[start * self.sample_len()..end * self.sample_len()]
    }
}

impl Manifest {
    /// Reads and validates `dir/MANIFEST.toml`, reporting every problem at once.
    pub fn load(dir: impl AsRef<Path>) -> Result<Manifest> {
        let dir = dir.as_ref().to_path_buf();
        let path = dir.join(MANIFEST_FILE);
        let text = std::fs::read_to_string(&path).map_err(|source| ModelError::Io {
            path: path.clone(),
            source,
        })?;
        Manifest::parse(&dir, &text)
    }

    /// Parses manifest text whose paths are relative to `dir`.
    pub fn parse(dir: &Path, text: &str) -> Result<Manifest> {
        let path = dir.join(MANIFEST_FILE);
        let invalid = |reason: String| ModelError::Manifest {
            path: path.clone(),
            reason,
        };
        let raw: RawManifest = toml::from_str(text).map_err(|e| invalid(e.to_string()))?;
        if raw.manifest_version != 1 {
            return Err(invalid(format!(
                "manifest_version {} is not supported by this build (it reads version 1)",
                raw.manifest_version
            )));
        }
        let mut problems: Vec<String> = validate(&raw.models);
        for c in &raw.candidates {
            match raw.models.iter().find(|m| m.name == c.model) {
                None => problems.push(format!(
                    "candidate {} of `{}` names no model in the manifest",
                    c.version, c.model
                )),
                Some(m) if m.version == c.version => problems.push(format!(
                    "candidate {} of `{}` has the model's own version",
                    c.version, c.model
                )),
                Some(_) => {}
            }
            file_problems(&c.file, &c.sha256, &mut problems);
        }
        if !problems.is_empty() {
            return Err(invalid(problems.join("; ")));
        }
        Ok(Manifest {
            dir: dir.to_path_buf(),
            models: raw.models,
            candidates: raw.candidates,
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn models(&self) -> &[ModelSpec] {
        &self.models
    }

    /// Other versions of device models, for rollouts.
    pub fn candidates(&self) -> &[CandidateSpec] {
        &self.candidates
    }

    /// The candidate `version` of `model`.
    pub fn candidate(&self, model: &str, version: &str) -> Option<&CandidateSpec> {
        self.candidates
            .iter()
            .find(|c| c.model == model && c.version == version)
    }

    /// The model of that name.
    pub fn model(&self, name: &str) -> Result<&ModelSpec> {
        self.models
            .iter()
            .find(|m| m.name == name)
            .ok_or_else(|| ModelError::UnknownModel {
                name: name.to_owned(),
                known: self.model_names(),
            })
    }

    /// Comma-separated model names, for messages.
    pub fn model_names(&self) -> String {
        let names: Vec<&str> = self.models.iter().map(|m| m.name.as_str()).collect();
        names.join(", ")
    }

    /// Absolute path of a file named in the manifest.
    pub fn path_of(&self, file: &str) -> PathBuf {
        self.dir.join(file)
    }

    /// Reads a variant's file and checks its sha256 against the manifest.
    pub fn read_verified(&self, variant: &VariantSpec) -> Result<Vec<u8>> {
        read_verified(&self.path_of(&variant.file), &variant.sha256)
    }

    /// Loads a model's committed test split, checking both files' sha256.
    pub fn test_split(&self, model: &ModelSpec) -> Result<TestSplit> {
        let spec = model
            .test_split
            .as_ref()
            .ok_or_else(|| ModelError::Manifest {
                path: self.dir.join(MANIFEST_FILE),
                reason: format!("model `{}` has no test split", model.name),
            })?;
        let inputs = read_verified(&self.path_of(&spec.inputs), &spec.inputs_sha256)?;
        let labels = read_verified(&self.path_of(&spec.labels), &spec.labels_sha256)?;
        let sample: usize = spec.sample_shape.iter().product();
        if inputs.len() != spec.count * sample * 4 || labels.len() != spec.count {
            return Err(ModelError::Manifest {
                path: self.dir.join(MANIFEST_FILE),
                reason: format!(
                    "the test split of `{}` does not hold {} samples",
                    model.name, spec.count
                ),
            });
        }
        let inputs = inputs
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        Ok(TestSplit {
            inputs,
            labels,
            sample_shape: spec.sample_shape.clone(),
        })
    }
}

impl ModelSpec {
    /// The file of a variant, if the model has it.
    pub fn variant(&self, variant: Variant) -> Option<&VariantSpec> {
        self.variants.iter().find(|v| v.variant == variant)
    }

    /// True when the first dimension of every input and output is dynamic, so requests can be
    /// stacked along it.
    pub fn batchable(&self) -> bool {
        self.inputs
            .iter()
            .chain(&self.outputs)
            .all(|t| t.shape.first() == Some(&-1))
    }
}

impl TensorSpec {
    /// `[N,1,8,8]` style: `N` for a dynamic batch axis, `?` for other dynamic axes.
    pub fn shape_display(&self) -> String {
        let dims: Vec<String> = self
            .shape
            .iter()
            .enumerate()
            .map(|(i, &d)| match (i, d) {
                (0, -1) => "N".to_owned(),
                (_, -1) => "?".to_owned(),
                (_, d) => d.to_string(),
            })
            .collect();
        format!("[{}]", dims.join(","))
    }

    /// True when a concrete shape fits this spec.
    pub fn accepts(&self, shape: &[usize]) -> bool {
        shape.len() == self.shape.len()
            && self
                .shape
                .iter()
                .zip(shape)
                .all(|(&want, &got)| want == -1 || usize::try_from(want).is_ok_and(|w| w == got))
    }
}

fn validate(models: &[ModelSpec]) -> Vec<String> {
    let mut problems = Vec::new();
    let mut names = HashSet::new();
    for m in models {
        if !names.insert(m.name.as_str()) {
            problems.push(format!("model `{}` is listed twice", m.name));
        }
        if m.name.is_empty()
            || !m
                .name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
        {
            problems.push(format!(
                "model name `{}` must be non-empty ASCII letters, digits, `_` or `-`",
                m.name
            ));
        }
        if m.inputs.is_empty() || m.outputs.is_empty() {
            problems.push(format!(
                "model `{}` must declare at least one input and one output",
                m.name
            ));
        }
        for t in m.inputs.iter().chain(&m.outputs) {
            if t.shape.iter().any(|&d| d == 0 || d < -1) {
                problems.push(format!(
                    "tensor `{}` of model `{}` has shape {:?}: dimensions are positive, or -1 for dynamic",
                    t.name, m.name, t.shape
                ));
            }
        }
        if m.variant(Variant::Device).is_none() {
            problems.push(format!("model `{}` has no device variant", m.name));
        }
        let mut seen = HashSet::new();
        for v in &m.variants {
            if !seen.insert(v.variant) {
                problems.push(format!(
                    "model `{}` lists the {} variant twice",
                    m.name, v.variant
                ));
            }
            file_problems(&v.file, &v.sha256, &mut problems);
        }
        if let (Some(labels), Some(out)) = (&m.labels, m.outputs.first())
            && out
                .shape
                .last()
                .is_some_and(|&d| d != -1 && usize::try_from(d).ok() != Some(labels.len()))
        {
            problems.push(format!(
                "model `{}` has {} labels but its output `{}` has shape {:?}",
                m.name,
                labels.len(),
                out.name,
                out.shape
            ));
        }
    }
    problems
}

/// What is wrong with a file the manifest names: its sha256 not 64 hex digits, its path not
/// inside the model directory.
fn file_problems(file: &str, sha256: &str, problems: &mut Vec<String>) {
    if sha256.len() != 64 || !sha256.chars().all(|c| c.is_ascii_hexdigit()) {
        problems.push(format!("the sha256 of `{file}` is not 64 hex digits"));
    }
    if file.contains("..") || Path::new(file).is_absolute() {
        problems.push(format!(
            "the file `{file}` must be a path inside the model directory"
        ));
    }
}

/// Reads a file and checks its sha256.
pub fn read_verified(path: &Path, expected: &str) -> Result<Vec<u8>> {
    let bytes = std::fs::read(path).map_err(|source| ModelError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let actual = sha256_hex(&bytes);
    if !actual.eq_ignore_ascii_case(expected) {
        return Err(ModelError::Checksum {
            path: path.to_path_buf(),
            expected: expected.to_owned(),
            actual,
        });
    }
    Ok(bytes)
}

/// Lower-case hex sha256 of some bytes.
pub fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
manifest_version = 1
[[model]]
name = "m"
version = "1"
task = "classification"
origin = "test"
licence = "MIT"
labels = ["a", "b"]
[[model.inputs]]
name = "input"
datatype = "FP32"
shape = [-1, 3]
[[model.outputs]]
name = "p"
datatype = "FP32"
shape = [-1, 2]
[[model.variants]]
variant = "device"
file = "m.onnx"
sha256 = "0000000000000000000000000000000000000000000000000000000000000000"
bytes = 1
precision = "fp32"
"#;

    #[test]
    fn parses_a_good_manifest() {
        let m = Manifest::parse(Path::new("/zoo"), GOOD).unwrap();
        let spec = m.model("m").unwrap();
        assert!(spec.batchable());
        assert_eq!(spec.inputs[0].shape_display(), "[N,3]");
        assert!(spec.inputs[0].accepts(&[5, 3]));
        assert!(!spec.inputs[0].accepts(&[5, 4]));
        assert!(!spec.inputs[0].accepts(&[3]));
        assert_eq!(m.path_of("m.onnx"), Path::new("/zoo/m.onnx"));
    }

    #[test]
    fn reports_every_problem_at_once() {
        let bad = GOOD
            .replace("shape = [-1, 3]", "shape = [-1, 0]")
            .replace("variant = \"device\"", "variant = \"cloud\"")
            .replace("labels = [\"a\", \"b\"]", "labels = [\"a\"]");
        let err = Manifest::parse(Path::new("/zoo"), &bad)
            .unwrap_err()
            .to_string();
        assert!(err.contains("has shape [-1, 0]"), "{err}");
        assert!(err.contains("has no device variant"), "{err}");
        assert!(err.contains("has 1 labels"), "{err}");
    }

    fn with_candidate(model: &str, version: &str, file: &str, sha: &str) -> String {
        format!(
            "{GOOD}[[candidate]]\nmodel = \"{model}\"\nversion = \"{version}\"\nfile = \"{file}\"\nprecision = \"int8\"\nsha256 = \"{sha}\"\nbytes = 1\n"
        )
    }

    #[test]
    fn candidates_name_a_model_another_version_and_a_file_inside() {
        let zeros = "0".repeat(64);
        let good = with_candidate("m", "2", "m2.onnx", &zeros);
        let m = Manifest::parse(Path::new("/zoo"), &good).unwrap();
        assert_eq!(m.candidate("m", "2").unwrap().file, "m2.onnx");
        assert!(m.candidate("m", "1").is_none());
        let cases = [
            (
                with_candidate("x", "2", "m2.onnx", &zeros),
                "names no model",
            ),
            (with_candidate("m", "1", "m2.onnx", &zeros), "own version"),
            (
                with_candidate("m", "2", "../m2.onnx", &zeros),
                "inside the model directory",
            ),
            (
                with_candidate("m", "2", "m2.onnx", "abc"),
                "not 64 hex digits",
            ),
        ];
        for (text, want) in cases {
            let err = Manifest::parse(Path::new("/zoo"), &text)
                .unwrap_err()
                .to_string();
            assert!(err.contains(want), "{want}: {err}");
        }
    }

    #[test]
    fn unknown_keys_are_rejected() {
        let bad = GOOD.replace("licence = \"MIT\"", "licence = \"MIT\"\nlicense = \"MIT\"");
        let err = Manifest::parse(Path::new("/zoo"), &bad)
            .unwrap_err()
            .to_string();
        assert!(err.contains("unknown field `license`"), "{err}");
    }

    #[test]
    fn unknown_model_lists_the_known_ones() {
        let m = Manifest::parse(Path::new("/zoo"), GOOD).unwrap();
        let err = m.model("nope").unwrap_err();
        assert_eq!(
            err.to_string(),
            "unknown model `nope`; the models loaded here are: m"
        );
    }

    #[test]
    fn checksum_mismatch_is_refused() {
        let dir = std::env::temp_dir().join(format!("tether-manifest-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("f.bin");
        std::fs::write(&file, b"hello").unwrap();
        let good = sha256_hex(b"hello");
        assert_eq!(read_verified(&file, &good).unwrap(), b"hello");
        std::fs::write(&file, b"hellO").unwrap();
        let err = read_verified(&file, &good).unwrap_err();
        assert!(matches!(err, ModelError::Checksum { .. }));
        assert!(
            err.to_string()
                .contains(&format!("but the manifest says {good}")),
            "{err}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
