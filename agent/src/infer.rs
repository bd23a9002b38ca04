//! One inference request through the local engine: V2 request in, V2 response out, with the
//! classifier's top classes attached. Blocking (it runs the model): call it from a worker thread.

use std::time::Instant;

use models::engine::LoadedModel;
use models::v2::{InferenceRequest, InferenceResponse, ResponseOutput};
use models::{ModelError, Tensor};
use serde_json::{Map, Value, json};

/// How many classes a classifier reply lists.
pub const DEFAULT_TOP_K: usize = 3;

/// Decodes, validates and runs a request, and builds its response. Errors are the caller's
/// to report (they carry a code and a sentence).
pub fn run_request(
    model: &LoadedModel,
    request: &InferenceRequest,
    top_k: usize,
) -> Result<InferenceResponse, ModelError> {
    let inputs = request.decode_inputs(model.max_elements())?;
    run_decoded(model, request, inputs, top_k)
}

/// [`run_request`] for inputs already decoded from `request`.
pub fn run_decoded(
    model: &LoadedModel,
    request: &InferenceRequest,
    inputs: Vec<Tensor>,
    top_k: usize,
) -> Result<InferenceResponse, ModelError> {
    let started = Instant::now();
    let outputs = model.infer(inputs)?;
    let mut response = build_response(model, request.id.clone(), &outputs, top_k);
    filter_outputs(&mut response, request)?;
    let params = response.parameters.get_or_insert_with(Map::new);
    params.insert(
        "latency_ms".into(),
        json!(round_ms(started.elapsed().as_secs_f64() * 1e3)),
    );
    Ok(response)
}

/// The V2 response for some outputs: `model_version`, the outputs, and for classifiers
/// `parameters.classes`, one list of `{label, probability}` per batch row.
pub fn build_response(
    model: &LoadedModel,
    id: Option<String>,
    outputs: &[Tensor],
    top_k: usize,
) -> InferenceResponse {
    let mut parameters = Map::new();
    parameters.insert("variant".into(), json!(model.variant().variant.as_str()));
    if let Some(rows) = model.top_k(outputs, top_k) {
        let classes: Vec<Value> = rows
            .into_iter()
            .map(|row| {
                row.into_iter()
                    .map(|(label, p)| json!({"label": label, "probability": round6(p)}))
                    .collect()
            })
            .collect();
        parameters.insert("classes".into(), Value::Array(classes));
    }
    InferenceResponse {
        model_name: model.name().to_owned(),
        model_version: Some(model.spec().version.clone()),
        id,
        parameters: Some(parameters),
        outputs: outputs
            .iter()
            .cloned()
            .map(ResponseOutput::from_tensor)
            .collect(),
    }
}

/// Keeps only the outputs a request asked for, if it asked.
fn filter_outputs(
    response: &mut InferenceResponse,
    request: &InferenceRequest,
) -> Result<(), ModelError> {
    let Some(wanted) = &request.outputs else {
        return Ok(());
    };
    if let Some(missing) = wanted
        .iter()
        .find(|w| !response.outputs.iter().any(|o| o.name == w.name))
    {
        let names: Vec<&str> = response.outputs.iter().map(|o| o.name.as_str()).collect();
        return Err(ModelError::BadRequest(format!(
            "model `{}` has no output named `{}`; its outputs are: {}",
            response.model_name,
            missing.name,
            names.join(", ")
        )));
    }
    response
        .outputs
        .retain(|o| wanted.iter().any(|w| w.name == o.name));
    Ok(())
}

/// Probabilities to six decimals: enough to rank, and short on the wire.
fn round6(p: f32) -> f64 {
    (f64::from(p) * 1e6).round() / 1e6
}

fn round_ms(ms: f64) -> f64 {
    (ms * 1000.0).round() / 1000.0
}
