//! The inference engine: models from a manifest, verified and built once with tract into
//! immutable plans shared across threads, and run on single requests or stacked batches.
//!
//! Owns request-to-model validation (names, datatypes, shapes). Its `run` calls are blocking and
//! CPU-bound: callers on an async runtime must move them to a worker thread or `spawn_blocking`.

use std::collections::BTreeMap;
use std::fmt;
use std::path::Path;
use std::sync::Arc;

use tract::prelude::*;

use crate::error::{ModelError, Result};
use crate::manifest::{Manifest, ModelSpec, TensorSpec, Variant, VariantSpec};
use crate::plans::PlanCache;
use crate::tensor::{Datatype, Tensor, TensorData, format_shape};
use crate::v2::DEFAULT_MAX_ELEMENTS;

/// Batch sizes up to this get a plan of their own, optimised for that exact size; larger
/// batches run on the symbolic plan. Bounds the memory spent on plans.
pub const MAX_PLANNED_BATCH: usize = 64;

/// The models of one manifest, loaded for one variant (device or cloud), by name.
#[derive(Debug, Clone)]
pub struct Engine {
    manifest: Arc<Manifest>,
    models: BTreeMap<String, Arc<LoadedModel>>,
}

/// How to load an [`Engine`].
#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// Which file of each model to load.
    pub variant: Variant,
    /// Load only these models (all when empty).
    pub only: Vec<String>,
    /// Cap on the elements of one input tensor.
    pub max_elements: usize,
    /// Build a plan specialised to each batch size (up to [`MAX_PLANNED_BATCH`]); when false,
    /// every batch runs on the one plan with a symbolic batch axis. On for serving; the bench
    /// turns it off to measure what specialisation buys.
    pub batch_plans: bool,
    /// The tract runtime that runs the plans: `None` for tract's default (the CPU), or a
    /// runtime compiled in by a cargo feature (`cuda` on a Jetson).
    pub runtime: Option<String>,
    /// Verify each file now but build each model on its first run ([`LoadedModel::load`]
    /// builds one sooner): a device pays memory only for the models it is asked for.
    pub lazy: bool,
}

impl Default for EngineConfig {
    fn default() -> Self {
        EngineConfig {
            variant: Variant::Device,
            only: Vec::new(),
            max_elements: DEFAULT_MAX_ELEMENTS,
            batch_plans: true,
            runtime: None,
            lazy: false,
        }
    }
}

impl EngineConfig {
    /// Loads the manifest in `dir` and builds every selected model.
    pub fn build(&self, dir: impl AsRef<Path>) -> Result<Engine> {
        if let Some(name) = &self.runtime {
            tract::runtime_for_name(name).map_err(|_| ModelError::Runtime(name.clone()))?;
        }
        let manifest = Arc::new(Manifest::load(dir)?);
        let mut models = BTreeMap::new();
        for name in &self.only {
            manifest.model(name)?;
        }
        for spec in manifest.models() {
            if !self.only.is_empty() && !self.only.contains(&spec.name) {
                continue;
            }
            // A model without the asked-for variant falls back to its device file: the relay
            // serves vad and ocr_det, whose cloud variant is the same file, and so on.
            let variant = spec
                .variant(self.variant)
                .or_else(|| spec.variant(Variant::Device))
                .ok_or_else(|| ModelError::Manifest {
                    path: manifest.dir().to_path_buf(),
                    reason: format!("model `{}` has no {} variant", spec.name, self.variant),
                })?;
            let loaded = LoadedModel::open(&manifest, spec, variant, self, self.lazy)?;
            models.insert(spec.name.clone(), Arc::new(loaded));
        }
        Ok(Engine { manifest, models })
    }

    /// Loads one model from a file that need not be in the manifest's directory (a model
    /// update downloaded by the agent): `variant.file` may be an absolute path, and its sha256
    /// is checked against `variant.sha256`. Always built at once, lazy or not: an update is
    /// judged by whether it loads.
    pub fn load_model(
        &self,
        manifest: &Manifest,
        spec: &ModelSpec,
        variant: &VariantSpec,
    ) -> Result<Arc<LoadedModel>> {
        let loaded = LoadedModel::open(manifest, spec, variant, self, false)?;
        Ok(Arc::new(loaded))
    }
}

impl Engine {
    /// A copy of this engine with some models replaced, added (`Some`) or removed (`None`).
    /// Models in use elsewhere stay alive until their last user lets go.
    pub fn with_changes(
        &self,
        changes: impl IntoIterator<Item = (String, Option<Arc<LoadedModel>>)>,
    ) -> Engine {
        let mut models = self.models.clone();
        for (name, model) in changes {
            match model {
                Some(m) => models.insert(name, m),
                None => models.remove(&name),
            };
        }
        Engine {
            manifest: self.manifest.clone(),
            models,
        }
    }

    /// The model of that name.
    pub fn model(&self, name: &str) -> Result<&Arc<LoadedModel>> {
        self.models
            .get(name)
            .ok_or_else(|| ModelError::UnknownModel {
                name: name.to_owned(),
                known: self.models.keys().cloned().collect::<Vec<_>>().join(", "),
            })
    }

    /// All loaded models, by name.
    pub fn models(&self) -> impl Iterator<Item = &Arc<LoadedModel>> {
        self.models.values()
    }

    pub fn manifest(&self) -> &Manifest {
        &self.manifest
    }
}

/// One model, verified, and built now or on first use. Cheap to share: every method takes
/// `&self`.
pub struct LoadedModel {
    spec: ModelSpec,
    variant: VariantSpec,
    /// The verified file the model is built from.
    path: std::path::PathBuf,
    max_elements: usize,
    /// Plans per batch size (see [`EngineConfig::batch_plans`]).
    batch_plans: bool,
    /// The built model, or why it could not be built; empty until first use when lazy.
    planner: std::sync::OnceLock<std::result::Result<Planner, String>>,
    /// Held by the one caller building the model.
    loading: std::sync::Mutex<()>,
    /// The tract runtime by name; `None` for the default.
    runtime: Option<String>,
    /// Plans specialised to one batch size or input shape, built on first use.
    plans: PlanCache<Vec<usize>, Runnable>,
    /// Why the model left its runtime for the CPU, once a run failed on it.
    fallback: std::sync::OnceLock<String>,
    /// The fallback not yet reported by [`LoadedModel::take_fallback_news`].
    fallback_unreported: std::sync::atomic::AtomicBool,
    /// A symbolic model's generic plan on the CPU, made when it falls back.
    cpu_generic: std::sync::OnceLock<Runnable>,
    /// Runs on the runtime that fail, injected by tests.
    #[cfg(feature = "test-util")]
    injected_failures: std::sync::atomic::AtomicUsize,
    /// Batches that panic, injected by tests.
    #[cfg(feature = "test-util")]
    injected_panics: std::sync::atomic::AtomicUsize,
}

/// How plans are made for a model.
#[allow(
    clippy::large_enum_variant,
    reason = "one per loaded model; boxing buys nothing"
)]
enum Planner {
    /// tract analyses the model with its symbolic axes: one generic plan, plus plans
    /// specialised per batch size (a concrete batch lets tract pick better kernels).
    Symbolic {
        model: Model,
        generic: Runnable,
        batch_symbol: Option<String>,
    },
    /// tract cannot reason about the symbolic shapes (PP-OCR's `(H+31)/32` against
    /// `2*((H+15)/16)` in one Concat): re-plan from the file for each concrete input shape.
    /// The file is read (and verified) again for each new shape rather than held in memory:
    /// reading and hashing it costs a small part of planning it.
    PerShape,
}

/// Most specialised plans kept per model, the least recently used going first, so memory stays
/// bounded whatever shapes clients send.
pub const MAX_CACHED_PLANS: usize = 16;

impl fmt::Debug for LoadedModel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LoadedModel")
            .field("name", &self.spec.name)
            .field("variant", &self.variant.variant)
            .field("file", &self.variant.file)
            .finish_non_exhaustive()
    }
}

fn parse_onnx(bytes: &[u8]) -> anyhow::Result<InferenceModel> {
    // The quantizer leaves value_info with symbolic batches that tract cannot unify: ignore it
    // and let tract infer every intermediate shape.
    tract::onnx()?.load_buffer_with_options(bytes, OnnxOptions::new().ignore_value_info(true))
}

/// A runnable plan of `model` on the named tract runtime, or tract's default.
fn prepare(runtime: Option<&str>, model: Model) -> anyhow::Result<Runnable> {
    match runtime {
        Some(name) => tract::runtime_for_name(name)?.prepare(model),
        None => model.into_runnable(),
    }
}

impl LoadedModel {
    /// Checks the model's file against its sha256 and, unless `lazy`, builds it now; a lazy
    /// model is built on its first run (or [`LoadedModel::load`]) so memory goes only to the
    /// models a device is asked for.
    fn open(
        manifest: &Manifest,
        spec: &ModelSpec,
        variant: &VariantSpec,
        options: &EngineConfig,
        lazy: bool,
    ) -> Result<LoadedModel> {
        let path = manifest.path_of(&variant.file);
        // Read and hashed now even when lazy: a damaged or missing file is found at start-up.
        let bytes = crate::manifest::read_verified(&path, &variant.sha256)?;
        let model = LoadedModel {
            spec: spec.clone(),
            variant: variant.clone(),
            path,
            max_elements: options.max_elements,
            batch_plans: options.batch_plans,
            planner: std::sync::OnceLock::new(),
            loading: std::sync::Mutex::new(()),
            runtime: options.runtime.clone(),
            plans: PlanCache::new(MAX_CACHED_PLANS),
            fallback: std::sync::OnceLock::new(),
            fallback_unreported: std::sync::atomic::AtomicBool::new(false),
            cpu_generic: std::sync::OnceLock::new(),
            #[cfg(feature = "test-util")]
            injected_failures: std::sync::atomic::AtomicUsize::new(0),
            #[cfg(feature = "test-util")]
            injected_panics: std::sync::atomic::AtomicUsize::new(0),
        };
        if !lazy {
            let built = model.build_planner(&bytes);
            let _ = model.planner.set(built);
            model.planner()?;
        }
        Ok(model)
    }

    /// Builds the model now if it is not built yet. Blocking: parsing and planning a large
    /// model takes a while (about 0.1 s for ocr_det on a desktop core).
    pub fn load(&self) -> Result<()> {
        self.planner().map(|_| ())
    }

    /// True once the model is built (a lazy one has run, or been loaded).
    pub fn is_loaded(&self) -> bool {
        matches!(self.planner.get(), Some(Ok(_)))
    }

    /// The built model, building it on first use (one caller builds, the others wait for it).
    /// A file that fails to parse or plan is remembered as failed (its bytes are verified, so
    /// a retry would fail the same way); a file that cannot be read is tried again next time.
    fn planner(&self) -> Result<&Planner> {
        if let Some(built) = self.planner.get() {
            return self.remembered(built);
        }
        let _one_builder = self.loading.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(built) = self.planner.get() {
            return self.remembered(built);
        }
        let started = std::time::Instant::now();
        let bytes = crate::manifest::read_verified(&self.path, &self.variant.sha256)?;
        let built = self.planner.get_or_init(|| self.build_planner(&bytes));
        if built.is_ok() {
            tracing::info!(model = %self.spec.name, ms = started.elapsed().as_millis(), "Model loaded on first use.");
        }
        self.remembered(built)
    }

    fn remembered<'a>(
        &self,
        built: &'a std::result::Result<Planner, String>,
    ) -> Result<&'a Planner> {
        built
            .as_ref()
            .map_err(|reason| self.load_error(reason.clone()))
    }

    fn load_error(&self, reason: String) -> ModelError {
        ModelError::Load {
            model: self.spec.name.clone(),
            path: self.path.clone(),
            reason,
        }
    }

    /// Parses the verified file, checks it against the manifest and prepares its plans.
    fn build_planner(&self, bytes: &[u8]) -> std::result::Result<Planner, String> {
        let spec = &self.spec;
        let inference = parse_onnx(bytes).map_err(|e| format!("{e:#}"))?;
        check_inference_interface(spec, &inference)?;
        let planner = match inference.into_model() {
            Ok(model) => {
                let batch_symbol = if spec.batchable() && self.batch_plans {
                    model
                        .input_fact(0)
                        .and_then(|f| f.dim(0))
                        .ok()
                        .filter(|d| d.to_int64().is_err())
                        .map(|d| d.to_string())
                } else {
                    None
                };
                let generic = prepare(self.runtime.as_deref(), model.clone())
                    .map_err(|e| format!("{e:#}"))?;
                Planner::Symbolic {
                    model,
                    generic,
                    batch_symbol,
                }
            }
            Err(e)
                if spec
                    .inputs
                    .iter()
                    .any(|t| t.shape.iter().skip(1).any(|&d| d == -1)) =>
            {
                tracing::debug!(model = %spec.name, error = %format!("{e:#}"), "Symbolic analysis failed; planning per input shape.");
                Planner::PerShape
            }
            Err(e) => return Err(format!("{e:#}")),
        };
        tracing::debug!(model = %spec.name, variant = %self.variant.variant, file = %self.variant.file, "Model built.");
        Ok(planner)
    }

    pub fn name(&self) -> &str {
        &self.spec.name
    }

    pub fn spec(&self) -> &ModelSpec {
        &self.spec
    }

    pub fn variant(&self) -> &VariantSpec {
        &self.variant
    }

    /// sha256 of the loaded file: part of every cache key, so a new file never serves old results.
    pub fn sha256(&self) -> &str {
        &self.variant.sha256
    }

    /// The cap on elements of one input tensor.
    pub fn max_elements(&self) -> usize {
        self.max_elements
    }

    /// Builds the plan for these input shapes now rather than on the first request of them.
    pub fn warm_up(&self, shapes: &[Vec<usize>]) -> Result<()> {
        let batch = shapes.first().and_then(|s| s.first()).copied().unwrap_or(1);
        self.plan_for(shapes, batch).map(|_| ())
    }

    /// Checks request tensors against the model's inputs and puts them in model order.
    /// Returns the batch size (the first dimension, or 1 for unbatchable models).
    pub fn validate(&self, inputs: Vec<Tensor>) -> Result<(Vec<Tensor>, usize)> {
        let mut slots: Vec<Option<Tensor>> = vec![None; self.spec.inputs.len()];
        for t in inputs {
            let Some(idx) = self.spec.inputs.iter().position(|s| s.name == t.name()) else {
                return Err(ModelError::UnknownInput {
                    model: self.spec.name.clone(),
                    name: t.name().to_owned(),
                    expected: self.input_names(),
                });
            };
            if slots[idx].is_some() {
                return Err(ModelError::DuplicateInput {
                    name: t.name().to_owned(),
                });
            }
            slots[idx] = Some(t);
        }
        let mut ordered = Vec::with_capacity(slots.len());
        for (spec, slot) in self.spec.inputs.iter().zip(slots) {
            let t = slot.ok_or_else(|| ModelError::MissingInput {
                model: self.spec.name.clone(),
                name: spec.name.clone(),
            })?;
            self.check_tensor(spec, &t)?;
            ordered.push(t);
        }
        let batch = if self.spec.batchable() {
            ordered.first().map_or(1, |t| t.shape()[0])
        } else {
            1
        };
        if self.spec.batchable()
            && let Some(t) = ordered.iter().find(|t| t.shape()[0] != batch)
        {
            {
                return Err(ModelError::BatchMismatch {
                    what: "inputs".to_owned(),
                    reason: format!(
                        "`{}` has batch {} where the first input has {batch}",
                        t.name(),
                        t.shape()[0]
                    ),
                });
            }
        }
        Ok((ordered, batch))
    }

    fn check_tensor(&self, spec: &TensorSpec, t: &Tensor) -> Result<()> {
        if t.datatype() != spec.datatype {
            return Err(ModelError::DatatypeMismatch {
                model: self.spec.name.clone(),
                input: spec.name.clone(),
                got: t.datatype().to_string(),
                expected: spec.datatype.to_string(),
            });
        }
        if !spec.accepts(t.shape()) {
            return Err(ModelError::ShapeMismatch {
                model: self.spec.name.clone(),
                input: spec.name.clone(),
                got: format_shape(t.shape()),
                expected: spec.shape_display(),
            });
        }
        if t.shape().contains(&0) {
            return Err(ModelError::AbsurdShape {
                input: spec.name.clone(),
                shape: format_shape(t.shape()),
                reason: "a dimension is zero".to_owned(),
            });
        }
        if t.data().len() > self.max_elements {
            return Err(ModelError::AbsurdShape {
                input: spec.name.clone(),
                shape: format_shape(t.shape()),
                reason: format!(
                    "{} elements exceed the limit of {}",
                    t.data().len(),
                    self.max_elements
                ),
            });
        }
        Ok(())
    }

    fn input_names(&self) -> String {
        let names: Vec<&str> = self.spec.inputs.iter().map(|s| s.name.as_str()).collect();
        names.join(", ")
    }

    /// Runs one request: validates, then computes. Blocking.
    pub fn infer(&self, inputs: Vec<Tensor>) -> Result<Vec<Tensor>> {
        let (ordered, batch) = self.validate(inputs)?;
        self.run_validated(&ordered, batch)
    }

    /// The runtime the model runs on now: its configured one, or the CPU after a fallback.
    pub fn runtime(&self) -> &str {
        match (&self.runtime, self.fallback.get()) {
            (Some(name), None) => name,
            _ => "cpu",
        }
    }

    /// Why the model left its configured runtime for the CPU, if it did.
    pub fn fallback(&self) -> Option<&str> {
        self.fallback.get().map(String::as_str)
    }

    /// The fallback, the first time it is asked for after it happened (to count it once).
    pub fn take_fallback_news(&self) -> Option<&str> {
        self.fallback_unreported
            .swap(false, std::sync::atomic::Ordering::Relaxed)
            .then(|| self.fallback())
            .flatten()
    }

    /// Makes the next `n` calls of [`LoadedModel::infer_batch`] panic (tests only).
    #[cfg(feature = "test-util")]
    pub fn inject_batch_panics(&self, n: usize) {
        self.injected_panics
            .store(n, std::sync::atomic::Ordering::Relaxed);
    }

    /// Makes the next `n` runs on the model's configured runtime fail, as an accelerator that
    /// is gone would (tests only).
    #[cfg(feature = "test-util")]
    pub fn inject_runtime_failures(&self, n: usize) {
        self.injected_failures
            .store(n, std::sync::atomic::Ordering::Relaxed);
    }

    /// The configured runtime, unless the model has fallen back to the CPU.
    fn runtime_now(&self) -> Option<&str> {
        match self.fallback.get() {
            Some(_) => None,
            None => self.runtime.as_deref(),
        }
    }

    /// Runs inputs already put in order by [`LoadedModel::validate`]. Blocking.
    ///
    /// A model on an accelerated runtime (`inference.runtime`) whose run fails there (a
    /// runtime error, a device gone) falls back to the CPU for good: this run is retried there,
    /// and the fallback is logged and reported ([`LoadedModel::fallback`]).
    pub fn run_validated(&self, ordered: &[Tensor], batch: usize) -> Result<Vec<Tensor>> {
        let shapes: Vec<Vec<usize>> = ordered.iter().map(|t| t.shape().to_vec()).collect();
        let run_err = |reason: String| ModelError::Run {
            model: self.spec.name.clone(),
            reason,
        };
        let inputs = ordered
            .iter()
            .map(|t| {
                tract::Tensor::from_bytes(
                    to_tract_dt(t.datatype()),
                    t.shape(),
                    &t.data().to_le_bytes(),
                )
                .map_err(|e| run_err(format!("{e:#}")))
            })
            .collect::<Result<Vec<_>>>()?;
        let outputs = match self.runtime_now() {
            None => self.run_plan(&shapes, batch, inputs)?,
            Some(runtime) => match self.run_plan(&shapes, batch, inputs.clone()) {
                Ok(o) => o,
                Err(e) => {
                    let reason = format!("the {runtime} runtime failed: {e}");
                    tracing::error!(model = %self.spec.name, %reason, "The model's runtime failed at run time; it runs on the CPU from now on.");
                    if self.fallback.set(reason).is_ok() {
                        self.fallback_unreported
                            .store(true, std::sync::atomic::Ordering::Relaxed);
                    }
                    self.plans.clear();
                    self.run_plan(&shapes, batch, inputs)?
                }
            },
        };
        outputs
            .iter()
            .zip(&self.spec.outputs)
            .map(|(t, spec)| from_tract(t, &spec.name).map_err(run_err))
            .collect()
    }

    /// Runs several requests as one batch along the first axis and hands each its own outputs.
    /// A request that fails validation gets its error; the others still run together.
    pub fn infer_batch(&self, requests: Vec<Vec<Tensor>>) -> Vec<Result<Vec<Tensor>>> {
        #[cfg(feature = "test-util")]
        if self
            .injected_panics
            .fetch_update(
                std::sync::atomic::Ordering::Relaxed,
                std::sync::atomic::Ordering::Relaxed,
                |n| n.checked_sub(1),
            )
            .is_ok()
        {
            panic!("an injected panic in a batch of model `{}`", self.spec.name);
        }
        let mut results: Vec<Option<Result<Vec<Tensor>>>> = Vec::with_capacity(requests.len());
        let mut valid: Vec<(usize, Vec<Tensor>, usize)> = Vec::new();
        for (i, inputs) in requests.into_iter().enumerate() {
            match self.validate(inputs) {
                Ok((ordered, batch)) => {
                    valid.push((i, ordered, batch));
                    results.push(None);
                }
                Err(e) => results.push(Some(Err(e))),
            }
        }
        if !self.spec.batchable() || valid.len() == 1 || !same_trailing_shapes(&valid) {
            for (i, ordered, batch) in valid {
                results[i] = Some(self.run_validated(&ordered, batch));
            }
        } else {
            let total: usize = valid.iter().map(|(_, _, b)| b).sum();
            let stacked = self.stack(&valid, total);
            match stacked.and_then(|s| self.run_validated(&s, total)) {
                Ok(outputs) => {
                    let mut offset = 0;
                    for (i, _, batch) in &valid {
                        results[*i] = Some(slice_outputs(&outputs, offset, *batch));
                        offset += batch;
                    }
                }
                Err(e) => {
                    let text = e.to_string();
                    for (i, _, _) in &valid {
                        results[*i] = Some(Err(ModelError::Run {
                            model: self.spec.name.clone(),
                            reason: text.clone(),
                        }));
                    }
                }
            }
        }
        results
            .into_iter()
            .map(|r| {
                r.unwrap_or_else(|| {
                    Err(ModelError::Run {
                        model: self.spec.name.clone(),
                        reason: "no result".into(),
                    })
                })
            })
            .collect()
    }

    fn stack(&self, valid: &[(usize, Vec<Tensor>, usize)], total: usize) -> Result<Vec<Tensor>> {
        let mut stacked = Vec::with_capacity(self.spec.inputs.len());
        for (k, spec) in self.spec.inputs.iter().enumerate() {
            let first = &valid[0].1[k];
            let mut shape = first.shape().to_vec();
            shape[0] = total;
            let per_row: usize = first.shape()[1..].iter().product();
            let mut data = TensorData::with_capacity(spec.datatype, per_row * total);
            for (_, ordered, _) in valid {
                data.extend_from(ordered[k].data()).map_err(|reason| {
                    ModelError::BatchMismatch {
                        what: "requests".into(),
                        reason,
                    }
                })?;
            }
            stacked.push(Tensor::new(spec.name.clone(), shape, data)?);
        }
        Ok(stacked)
    }

    /// Plans (or takes the plan of) these shapes and runs it.
    fn run_plan(
        &self,
        shapes: &[Vec<usize>],
        batch: usize,
        inputs: Vec<tract::Tensor>,
    ) -> Result<Vec<tract::Tensor>> {
        #[cfg(feature = "test-util")]
        if self.runtime_now().is_some()
            && self
                .injected_failures
                .fetch_update(
                    std::sync::atomic::Ordering::Relaxed,
                    std::sync::atomic::Ordering::Relaxed,
                    |n| n.checked_sub(1),
                )
                .is_ok()
        {
            return Err(ModelError::Run {
                model: self.spec.name.clone(),
                reason: "an injected fault: the accelerator is gone".into(),
            });
        }
        let plan = self.plan_for(shapes, batch)?;
        plan.run(inputs).map_err(|e| ModelError::Run {
            model: self.spec.name.clone(),
            reason: format!("{e:#}"),
        })
    }

    /// The generic plan: as loaded, or on the CPU once the model has fallen back.
    fn generic(&self, loaded: &Runnable, model: &Model) -> Result<Runnable> {
        if self.fallback.get().is_none() || self.runtime.is_none() {
            return Ok(loaded.clone());
        }
        if let Some(p) = self.cpu_generic.get() {
            return Ok(p.clone());
        }
        let plan = prepare(None, model.clone()).map_err(|e| ModelError::Run {
            model: self.spec.name.clone(),
            reason: format!("could not plan the model on the CPU: {e:#}"),
        })?;
        Ok(self.cpu_generic.get_or_init(|| plan).clone())
    }

    fn plan_for(&self, shapes: &[Vec<usize>], batch: usize) -> Result<Runnable> {
        let key: Vec<usize> = match self.planner()? {
            Planner::Symbolic {
                batch_symbol: None,
                generic,
                model,
            } => return self.generic(generic, model),
            Planner::Symbolic { generic, model, .. } if batch > MAX_PLANNED_BATCH => {
                return self.generic(generic, model);
            }
            Planner::Symbolic { .. } => vec![batch],
            // rank, dims, rank, dims...: unambiguous across inputs.
            Planner::PerShape => shapes
                .iter()
                .flat_map(|s| std::iter::once(s.len()).chain(s.iter().copied()))
                .collect(),
        };
        self.plans
            .get_or_build(&key, || {
                let started = std::time::Instant::now();
                let plan = self
                    .build_plan(shapes, batch)
                    .map_err(|e| format!("could not plan input shapes {shapes:?}: {e:#}"))?;
                tracing::debug!(model = %self.spec.name, ?shapes, ms = started.elapsed().as_millis(), "Plan built.");
                Ok(plan)
            })
            .map_err(|reason| ModelError::Run {
                model: self.spec.name.clone(),
                reason,
            })
    }

    fn build_plan(&self, shapes: &[Vec<usize>], batch: usize) -> anyhow::Result<Runnable> {
        match self.planner()? {
            Planner::Symbolic {
                model,
                batch_symbol,
                generic,
            } => {
                let Some(symbol) = batch_symbol else {
                    return Ok(self.generic(generic, model)?);
                };
                let mut model = Model::clone(model);
                model.transform(SetSymbols::new().value(symbol.clone(), i64::try_from(batch)?))?;
                prepare(self.runtime_now(), model)
            }
            Planner::PerShape => {
                let bytes = crate::manifest::read_verified(&self.path, &self.variant.sha256)?;
                let mut inference = parse_onnx(&bytes)?;
                for (i, (shape, spec)) in shapes.iter().zip(&self.spec.inputs).enumerate() {
                    let dims: Vec<String> = shape.iter().map(ToString::to_string).collect();
                    let dt = format!("{:?}", to_tract_dt(spec.datatype)).to_lowercase();
                    inference.set_input_fact(i, format!("{},{dt}", dims.join(",")).as_str())?;
                }
                prepare(self.runtime_now(), inference.into_model()?)
            }
        }
    }

    /// For classifiers: the `k` most probable labels of each row of the first output.
    pub fn top_k(&self, outputs: &[Tensor], k: usize) -> Option<Vec<Vec<(String, f32)>>> {
        let labels = self.spec.labels.as_ref()?;
        let probs = outputs.first()?.as_f32()?;
        if labels.is_empty() {
            return None;
        }
        Some(
            probs
                .chunks(labels.len())
                .map(|row| top_k(row, labels, k))
                .collect(),
        )
    }
}

/// The `k` highest scores of one row with their labels, best first.
pub fn top_k(row: &[f32], labels: &[String], k: usize) -> Vec<(String, f32)> {
    let mut idx: Vec<usize> = (0..row.len().min(labels.len())).collect();
    idx.sort_by(|&a, &b| row[b].total_cmp(&row[a]));
    idx.into_iter()
        .take(k)
        .map(|i| (labels[i].clone(), row[i]))
        .collect()
}

fn same_trailing_shapes(valid: &[(usize, Vec<Tensor>, usize)]) -> bool {
    valid.windows(2).all(|w| {
        w[0].1
            .iter()
            .zip(&w[1].1)
            .all(|(a, b)| a.shape()[1..] == b.shape()[1..])
    })
}

fn slice_outputs(outputs: &[Tensor], offset: usize, batch: usize) -> Result<Vec<Tensor>> {
    outputs
        .iter()
        .map(|t| {
            let per_row: usize = t.shape()[1..].iter().product();
            let mut shape = t.shape().to_vec();
            shape[0] = batch;
            Tensor::new(
                t.name(),
                shape,
                t.data().slice(offset * per_row, (offset + batch) * per_row),
            )
        })
        .collect()
}

fn check_inference_interface(
    spec: &ModelSpec,
    model: &InferenceModel,
) -> std::result::Result<(), String> {
    let inputs = model.input_count().map_err(|e| e.to_string())?;
    let outputs = model.output_count().map_err(|e| e.to_string())?;
    if inputs != spec.inputs.len() || outputs != spec.outputs.len() {
        return Err(format!(
            "the file has {inputs} inputs and {outputs} outputs, the manifest declares {} and {}",
            spec.inputs.len(),
            spec.outputs.len()
        ));
    }
    for (i, t) in spec.inputs.iter().enumerate() {
        let name = model.input_name(i).map_err(|e| e.to_string())?;
        // Displayed as `1,3,?,?,f32`: the datum type is the last field.
        let fact = model.input_fact(i).map_err(|e| e.to_string())?.to_string();
        let dt = fact.rsplit(',').next().unwrap_or_default();
        let expected = format!("{:?}", to_tract_dt(t.datatype)).to_lowercase();
        if name != t.name || dt != expected {
            return Err(format!(
                "input {i} of the file is `{name}` ({fact}), the manifest declares `{}` {} {}",
                t.name,
                t.datatype,
                t.shape_display()
            ));
        }
    }
    // Output names are not checked: tract names outputs after their nodes, not their tensors.
    Ok(())
}

fn to_tract_dt(d: Datatype) -> DatumType {
    match d {
        Datatype::Bool => DatumType::Bool,
        Datatype::U8 => DatumType::U8,
        Datatype::I8 => DatumType::I8,
        Datatype::I32 => DatumType::I32,
        Datatype::I64 => DatumType::I64,
        Datatype::F16 => DatumType::F16,
        Datatype::F32 => DatumType::F32,
    }
}

fn from_tract(t: &tract::Tensor, name: &str) -> std::result::Result<Tensor, String> {
    let (dt, shape, bytes) = t.as_bytes().map_err(|e| e.to_string())?;
    let datatype = match dt {
        DatumType::Bool => Datatype::Bool,
        DatumType::U8 => Datatype::U8,
        DatumType::I8 => Datatype::I8,
        DatumType::I32 => Datatype::I32,
        DatumType::I64 => Datatype::I64,
        DatumType::F16 => Datatype::F16,
        DatumType::F32 => Datatype::F32,
        other => {
            return Err(format!(
                "output `{name}` has datatype {other:?}, which Tether cannot send"
            ));
        }
    };
    let data = TensorData::from_le_bytes(datatype, bytes)?;
    Tensor::new(name, shape.to_vec(), data).map_err(|e| e.to_string())
}
