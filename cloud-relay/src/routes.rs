//! The HTTP routes: the Open Inference Protocol (health, server and model metadata, readiness,
//! inference in JSON or with binary tensors), model artifacts for device updates, and metrics.
//! Every error leaves as `{"error": "..."}` with its status.

use std::time::Instant;

use axum::Router;
use axum::body::Body;
use axum::extract::{Path, Query, State as AxState};
use axum::http::{HeaderMap, HeaderName, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use models::Variant;
use models::v2::{InferenceResponse, ResponseOutput};
use serde::Deserialize;
use serde_json::{Value, json};

use crate::State;
use crate::auth::Device;
use crate::batcher::Refused;
use crate::binary;
use crate::error::ApiError;
use crate::tfserving;

/// The relay's router.
pub fn app(state: State) -> Router {
    Router::new()
        .route("/v2", get(server_metadata))
        .route("/v2/", get(server_metadata))
        .route(
            "/v2/health/live",
            get(|| async { axum::Json(json!({"live": true})) }),
        )
        .route("/v2/health/ready", get(server_ready))
        .route("/v2/models/{name}", get(model_metadata))
        .route(
            "/v2/models/{name}/versions/{version}",
            get(model_metadata_version),
        )
        .route("/v2/models/{name}/ready", get(model_ready))
        .route(
            "/v2/models/{name}/versions/{version}/ready",
            get(model_ready_version),
        )
        .route("/v2/models/{name}/infer", post(infer))
        .route(
            "/v2/models/{name}/versions/{version}/infer",
            post(infer_version),
        )
        .route(
            "/v2/models/{name}/versions/{version}/artifact",
            get(artifact),
        )
        // TensorFlow Serving's REST API (tfserving.rs); `:predict` ends the last segment.
        .route("/v1/models/{name}", get(tf_status).post(tf_predict))
        .route("/v1/models/{name}/metadata", get(tf_metadata))
        .route(
            "/v1/models/{name}/versions/{version}",
            get(tf_status_version).post(tf_predict_version),
        )
        .route(
            "/v1/models/{name}/versions/{version}/metadata",
            get(tf_metadata_version),
        )
        .route("/metrics", get(metrics))
        .fallback(|| async {
            ApiError::not_found("no such endpoint; see the Open Inference Protocol's /v2 routes and TF Serving's /v1 routes")
        })
        .layer(axum::extract::DefaultBodyLimit::disable())
        .with_state(state)
}

fn timed_out(name: &str, state: &State) -> ApiError {
    ApiError::new(
        StatusCode::GATEWAY_TIMEOUT,
        format!(
            "model `{name}` did not answer within this request's deadline ({} ms at most: limits.request_timeout_ms, or the caller's {BUDGET_HEADER})",
            state.now().request_timeout.as_millis()
        ),
    )
}

async fn server_metadata() -> Response {
    axum::Json(json!({
        "name": "tether-relay",
        "version": crate::VERSION,
        "extensions": ["binary_tensor_data"],
    }))
    .into_response()
}

/// `{"ready": true}` (200) once a model is served, as the protocol's health API defines it.
async fn server_ready(AxState(state): AxState<State>) -> Response {
    let ready =
        state.0.engine.models().next().is_some() || state.0.upstream.models().next().is_some();
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, axum::Json(json!({ "ready": ready }))).into_response()
}

/// Authenticates (when tokens are configured) and checks the device may use `model`.
fn authorize(state: &State, headers: &HeaderMap, model: &str) -> Result<Option<Device>, ApiError> {
    let auth = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok());
    let device = state.now().auth.authenticate(auth)?;
    if let Some(d) = &device {
        d.check_model(model)?;
    }
    Ok(device)
}

fn unknown_model(state: &State, name: &str) -> ApiError {
    let mut known: Vec<String> = state
        .0
        .engine
        .models()
        .map(|m| m.name().to_owned())
        .collect();
    known.extend(state.0.upstream.models().cloned());
    known.sort();
    known.dedup();
    ApiError::not_found(format!(
        "unknown model `{name}`; the models served here are: {}",
        known.join(", ")
    ))
}

/// The version a request names must be the one served.
fn check_version(state: &State, name: &str, version: Option<&str>) -> Result<(), ApiError> {
    let Some(version) = version else {
        return Ok(());
    };
    if state.0.upstream.get(name).is_some() {
        return Ok(()); // the upstream decides
    }
    let model = state
        .0
        .engine
        .model(name)
        .map_err(|_| unknown_model(state, name))?;
    if model.spec().version == version {
        Ok(())
    } else {
        Err(ApiError::not_found(format!(
            "model `{name}` has no version `{version}`; this relay serves version {}",
            model.spec().version
        )))
    }
}

async fn model_metadata(
    AxState(state): AxState<State>,
    Path(name): Path<String>,
    headers: HeaderMap,
) -> Response {
    metadata(&state, &name, None, &headers)
        .await
        .into_response()
}

async fn model_metadata_version(
    AxState(state): AxState<State>,
    Path((name, version)): Path<(String, String)>,
    headers: HeaderMap,
) -> Response {
    metadata(&state, &name, Some(&version), &headers)
        .await
        .into_response()
}

async fn metadata(
    state: &State,
    name: &str,
    version: Option<&str>,
    headers: &HeaderMap,
) -> Result<Response, ApiError> {
    authorize(state, headers, name)?;
    check_version(state, name, version)?;
    if let Some(up) = state.0.upstream.get(name) {
        return Ok(axum::Json(state.0.upstream.metadata(up, name).await?).into_response());
    }
    let model = state
        .0
        .engine
        .model(name)
        .map_err(|_| unknown_model(state, name))?;
    let spec = model.spec();
    let tensors = |ts: &[models::manifest::TensorSpec]| -> Vec<Value> {
        ts.iter()
            .map(|t| json!({"name": t.name, "datatype": t.datatype.as_str(), "shape": t.shape}))
            .collect()
    };
    Ok(axum::Json(json!({
        "name": spec.name,
        "versions": [spec.version],
        "platform": "tract_onnx",
        "inputs": tensors(&spec.inputs),
        "outputs": tensors(&spec.outputs),
        "parameters": {
            "variant": model.variant().variant.as_str(),
            "sha256": model.sha256(),
            "max_batch_size": state.0.batchers.get(name).map_or(1, crate::batcher::Batcher::max_rows),
            "labels": spec.labels,
        },
    }))
    .into_response())
}

async fn model_ready(
    AxState(state): AxState<State>,
    Path(name): Path<String>,
    headers: HeaderMap,
) -> Response {
    ready(&state, &name, None, &headers).await.into_response()
}

async fn model_ready_version(
    AxState(state): AxState<State>,
    Path((name, version)): Path<(String, String)>,
    headers: HeaderMap,
) -> Response {
    ready(&state, &name, Some(&version), &headers)
        .await
        .into_response()
}

async fn ready(
    state: &State,
    name: &str,
    version: Option<&str>,
    headers: &HeaderMap,
) -> Result<axum::Json<Value>, ApiError> {
    authorize(state, headers, name)?;
    check_version(state, name, version)?;
    let ready = axum::Json(json!({"name": name, "ready": true}));
    if let Some(up) = state.0.upstream.get(name) {
        return if state.0.upstream.ready(up, name).await {
            Ok(ready)
        } else {
            Err(ApiError::unavailable(format!(
                "the upstream server of model `{name}` is not ready"
            )))
        };
    }
    if state.0.batchers.contains_key(name) {
        Ok(ready)
    } else {
        Err(unknown_model(state, name))
    }
}

async fn infer(
    AxState(state): AxState<State>,
    Path(name): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    infer_any(state, name, None, headers, body, Instant::now()).await
}

async fn infer_version(
    AxState(state): AxState<State>,
    Path((name, version)): Path<(String, String)>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    infer_any(state, name, Some(version), headers, body, Instant::now()).await
}

/// Serves an inference whose request arrived at `started`: its deadline runs from then.
async fn infer_any(
    state: State,
    name: String,
    version: Option<String>,
    headers: HeaderMap,
    body: Body,
    started: Instant,
) -> Response {
    let result = match deadline(&state, &headers, started) {
        Ok(deadline) => {
            infer_inner(&state, &name, version.as_deref(), &headers, body, deadline).await
        }
        Err(e) => Err(e),
    };
    // Count under the model's name only when it exists, so a scan of names cannot blow up the
    // metrics' label space.
    let label = if state.0.batchers.contains_key(&name) || state.0.upstream.get(&name).is_some() {
        name.as_str()
    } else {
        "_unknown"
    };
    match result {
        Ok(response) => {
            state.0.metrics.count(label, "ok");
            state.0.metrics.observe_latency(label, started.elapsed());
            response
        }
        Err(e) => {
            tracing::debug!(model = %name, status = e.status.as_u16(), error = %e.message, "Request refused.");
            state.0.metrics.count(label, e.code());
            e.into_response()
        }
    }
}

/// The header in which a caller (the agent) says how long it can still wait, in milliseconds.
pub const BUDGET_HEADER: &str = "tether-budget-ms";

/// When this request must be answered: the relay's `limits.request_timeout_ms` from its start,
/// or sooner when the caller's budget header says so.
fn deadline(state: &State, headers: &HeaderMap, started: Instant) -> Result<Instant, ApiError> {
    let mut allowed = state.now().request_timeout;
    if let Some(v) = headers.get(BUDGET_HEADER) {
        let ms = v
            .to_str()
            .ok()
            .and_then(|s| s.trim().parse::<u64>().ok())
            .filter(|ms| *ms > 0)
            .ok_or_else(|| {
                ApiError::bad_request(format!(
                    "{BUDGET_HEADER} must be a whole number of milliseconds above 0"
                ))
            })?;
        allowed = allowed.min(std::time::Duration::from_millis(ms));
    }
    Ok(started.checked_add(allowed).unwrap_or(started))
}

async fn infer_inner(
    state: &State,
    name: &str,
    version: Option<&str>,
    headers: &HeaderMap,
    body: Body,
    deadline: Instant,
) -> Result<Response, ApiError> {
    let device = authorize(state, headers, name)?;
    if let Some(d) = &device {
        state.now().auth.admit(&d.id, Instant::now())?;
    }
    check_version(state, name, version)?;
    // Refused on the header alone, before a byte of the body is read, when it says too much.
    let bytes = read_body(state, headers, body, deadline).await?;
    let deadline_at = tokio::time::Instant::from_std(deadline);
    let header_length = headers
        .get(binary::HEADER)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let json_len = match &header_length {
        Some(v) => Some(v.trim().parse::<usize>().map_err(|_| {
            ApiError::bad_request(format!(
                "Inference-Header-Content-Length `{v}` is not a byte count"
            ))
        })?),
        None => None,
    };
    let timeout = deadline.saturating_duration_since(Instant::now());

    if let Some(up) = state.0.upstream.get(name) {
        let fwd = state
            .0
            .upstream
            .infer(up, name, bytes, header_length.as_deref(), timeout)
            .await?;
        let mut resp = Response::new(Body::from(fwd.body));
        *resp.status_mut() = fwd.status;
        if let Some(len) = fwd
            .header_length
            .and_then(|v| HeaderValue::from_str(&v).ok())
        {
            resp.headers_mut().insert(binary::HEADER, len);
        }
        if let Some(ct) = fwd
            .content_type
            .and_then(|v| HeaderValue::from_str(&v).ok())
        {
            resp.headers_mut().insert(header::CONTENT_TYPE, ct);
        }
        return Ok(resp);
    }

    let model = state
        .0
        .engine
        .model(name)
        .map_err(|_| unknown_model(state, name))?
        .clone();
    let batcher = state
        .0
        .batchers
        .get(name)
        .ok_or_else(|| unknown_model(state, name))?;
    // Parsing costs memory in proportion to the body: bodies being parsed at once are bounded
    // in bytes (limits.max_parse_bytes), so a burst of large bodies takes turns.
    let kib = u32::try_from(bytes.len().div_ceil(1024).max(1)).unwrap_or(u32::MAX);
    let permit = tokio::time::timeout_at(deadline_at, state.0.parse_kib.acquire_many(kib))
        .await
        .map_err(|_| timed_out(name, state))?
        .map_err(|_| {
            ApiError::unavailable("the relay is shutting down; retry on another instance")
        })?;
    let parsed = binary::parse_request(&bytes, json_len, state.now().max_elements);
    drop(permit);
    drop(bytes);
    let (request, inputs) = parsed?;
    if let Some(wanted) = &request.outputs
        && let Some(missing) = wanted
            .iter()
            .find(|w| !model.spec().outputs.iter().any(|o| o.name == w.name))
    {
        return Err(ApiError::bad_request(format!(
            "model `{name}` has no output named `{}`",
            missing.name
        )));
    }
    let (ordered, rows) = model.validate(inputs)?;
    let outcome = tokio::time::timeout_at(deadline_at, batcher.submit(ordered, rows, deadline))
        .await
        .map_err(|_| timed_out(name, state))?
        .map_err(|refused| match refused {
            Refused::QueueFull => ApiError::unavailable(format!(
                "model `{name}` has a full queue; retry later (batching.queue bounds it)"
            )),
            Refused::Stopped => {
                ApiError::unavailable("the relay is shutting down; retry on another instance")
            }
            Refused::Expired => timed_out(name, state),
            Refused::Panicked => ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("model `{name}` failed on this request's batch (an internal error, logged); retry"),
            ),
        })?
        .map_err(ApiError::from)?;
    state
        .0
        .metrics
        .observe_parts(name, outcome.queue, outcome.compute);
    let mut outputs: Vec<ResponseOutput> = outcome
        .outputs
        .into_iter()
        .map(ResponseOutput::from_tensor)
        .collect();
    if let Some(wanted) = &request.outputs {
        outputs.retain(|o| wanted.iter().any(|w| w.name == o.name));
    }
    let response = InferenceResponse {
        model_name: name.to_owned(),
        model_version: Some(model.spec().version.clone()),
        id: request.id.clone(),
        parameters: Some(
            [
                ("queue_ms".to_owned(), json!(ms(outcome.queue))),
                ("compute_ms".to_owned(), json!(ms(outcome.compute))),
                ("batch_rows".to_owned(), json!(outcome.batch_rows)),
            ]
            .into_iter()
            .collect(),
        ),
        outputs,
    };
    let (body, json_len) = binary::encode_response(response, &request);
    let mut resp = Response::new(Body::from(body));
    match json_len {
        Some(len) => {
            resp.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/octet-stream"),
            );
            resp.headers_mut()
                .insert(binary::HEADER, HeaderValue::from(len));
        }
        None => {
            resp.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            );
        }
    }
    Ok(resp)
}

/// A locally served model for the TF Serving API, after the same checks as `/v2`.
fn tf_model(
    state: &State,
    headers: &HeaderMap,
    name: &str,
    version: Option<&str>,
) -> Result<std::sync::Arc<models::LoadedModel>, ApiError> {
    authorize(state, headers, name)?;
    if state.0.upstream.get(name).is_some() {
        return Err(ApiError::not_found(format!(
            "model `{name}` is forwarded to an upstream server: call it through /v2/models/{name}/infer"
        )));
    }
    check_version(state, name, version)?;
    state
        .0
        .engine
        .model(name)
        .cloned()
        .map_err(|_| unknown_model(state, name))
}

async fn tf_status(
    AxState(state): AxState<State>,
    Path(name): Path<String>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let model = tf_model(&state, &headers, &name, None)?;
    Ok(axum::Json(tfserving::status(&model.spec().version)).into_response())
}

async fn tf_status_version(
    AxState(state): AxState<State>,
    Path((name, version)): Path<(String, String)>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let model = tf_model(&state, &headers, &name, Some(&version))?;
    Ok(axum::Json(tfserving::status(&model.spec().version)).into_response())
}

async fn tf_metadata(
    AxState(state): AxState<State>,
    Path(name): Path<String>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let model = tf_model(&state, &headers, &name, None)?;
    Ok(axum::Json(tfserving::metadata(model.spec())).into_response())
}

async fn tf_metadata_version(
    AxState(state): AxState<State>,
    Path((name, version)): Path<(String, String)>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let model = tf_model(&state, &headers, &name, Some(&version))?;
    Ok(axum::Json(tfserving::metadata(model.spec())).into_response())
}

/// `name:predict` (or `version:predict`) as its two parts.
fn split_verb(segment: &str) -> Result<(&str, &str), ApiError> {
    match segment.rsplit_once(':') {
        Some((head, "predict")) => Ok((head, "predict")),
        Some((_, verb)) => Err(ApiError::bad_request(format!(
            "`:{verb}` is not served; this relay answers TF Serving's `:predict`"
        ))),
        None => Err(ApiError::new(
            StatusCode::METHOD_NOT_ALLOWED,
            "POST to `/v1/models/{name}:predict`",
        )),
    }
}

async fn tf_predict(
    AxState(state): AxState<State>,
    Path(segment): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    match split_verb(&segment) {
        Ok((name, _)) => predict(state, name.to_owned(), None, headers, body).await,
        Err(e) => e.into_response(),
    }
}

async fn tf_predict_version(
    AxState(state): AxState<State>,
    Path((name, segment)): Path<(String, String)>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    match split_verb(&segment) {
        Ok((version, _)) => predict(state, name, Some(version.to_owned()), headers, body).await,
        Err(e) => e.into_response(),
    }
}

/// A TF Serving predict: translated into a V2 request and served by the `/v2` path (its
/// authentication, rate limit, limits, deadline and batching), then translated back.
async fn predict(
    state: State,
    name: String,
    version: Option<String>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let started = Instant::now();
    let translated = async {
        let model = tf_model(&state, &headers, &name, version.as_deref())?;
        let deadline = deadline(&state, &headers, started)?;
        let bytes = read_body(&state, &headers, body, deadline).await?;
        let kib = u32::try_from(bytes.len().div_ceil(1024).max(1)).unwrap_or(u32::MAX);
        let _parsing = state.0.parse_kib.acquire_many(kib).await.map_err(|_| {
            ApiError::unavailable("the relay is shutting down; retry on another instance")
        })?;
        let tf: Value = serde_json::from_slice(&bytes)
            .map_err(|e| ApiError::bad_request(format!("the body is not JSON: {e}")))?;
        let (v2, format) = tfserving::to_v2(&tf, model.spec(), state.now().max_elements)
            .map_err(ApiError::bad_request)?;
        let v2 = serde_json::to_vec(&v2).map_err(|e| ApiError::bad_request(e.to_string()))?;
        Ok::<_, ApiError>((v2, format))
    }
    .await;
    let (v2, format) = match translated {
        Ok(t) => t,
        Err(e) => return e.into_response(),
    };
    // Only what the V2 path reads of the caller's headers; the body is the translation.
    let mut forwarded = HeaderMap::new();
    for h in [
        header::AUTHORIZATION,
        HeaderName::from_static(BUDGET_HEADER),
    ] {
        if let Some(v) = headers.get(&h) {
            forwarded.insert(h, v.clone());
        }
    }
    // The deadline runs from the TF request's arrival: translating it does not extend it.
    let answer = infer_any(
        state.clone(),
        name,
        version,
        forwarded,
        Body::from(v2),
        started,
    )
    .await;
    if answer.status() != StatusCode::OK {
        return answer; // `{"error": "..."}`: TF Serving's error body too
    }
    let limit = usize::MAX;
    let converted = match axum::body::to_bytes(answer.into_body(), limit).await {
        Ok(bytes) => serde_json::from_slice::<Value>(&bytes)
            .map_err(|e| e.to_string())
            .and_then(|v| tfserving::from_v2(&v, format)),
        Err(e) => Err(e.to_string()),
    };
    match converted {
        Ok(v) => axum::Json(v).into_response(),
        Err(e) => ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("the model's answer could not be translated: {e}"),
        )
        .into_response(),
    }
}

/// Reads a request body within the relay's size limit (refused on Content-Length alone when
/// it says more) and by `deadline`.
async fn read_body(
    state: &State,
    headers: &HeaderMap,
    body: Body,
    deadline: Instant,
) -> Result<axum::body::Bytes, ApiError> {
    let limit = state.now().max_body_bytes;
    let too_large = || {
        ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!(
                "the request body is over this relay's limit of {limit} bytes (limits.max_body_bytes)"
            ),
        )
    };
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok());
    if declared.is_some_and(|n| usize::try_from(n).map_or(true, |n| n > limit)) {
        return Err(too_large());
    }
    let deadline_at = tokio::time::Instant::from_std(deadline);
    tokio::time::timeout_at(deadline_at, axum::body::to_bytes(body, limit))
        .await
        .map_err(|_| {
            ApiError::new(
                StatusCode::REQUEST_TIMEOUT,
                format!(
                    "the request body did not arrive within {} ms (limits.request_timeout_ms)",
                    state.now().request_timeout.as_millis()
                ),
            )
        })?
        .map_err(|_| too_large())
}

fn ms(d: std::time::Duration) -> f64 {
    (d.as_secs_f64() * 1e6).round() / 1e3
}

#[derive(Debug, Deserialize)]
struct ArtifactQuery {
    variant: Option<String>,
}

/// A model file for device updates: `?variant=device` (the default) or `cloud` or `source`.
/// The sha256 is the ETag (`If-None-Match` answers 304); `Range: bytes=a-b` resumes an
/// interrupted download, honoured only while `If-Range`, when sent, still names the file.
/// Streamed from disk in 64 KiB reads: a download costs the same memory whatever the file's
/// size, and HEAD answers the headers alone.
async fn artifact(
    AxState(state): AxState<State>,
    Path((name, version)): Path<(String, String)>,
    Query(q): Query<ArtifactQuery>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    authorize(&state, &headers, &name)?;
    let manifest = state.0.engine.manifest();
    let spec = manifest
        .model(&name)
        .map_err(|_| unknown_model(&state, &name))?;
    let variant: Variant = q
        .variant
        .as_deref()
        .unwrap_or("device")
        .parse()
        .map_err(ApiError::bad_request)?;
    // The model's own version, or a candidate of it (device files only).
    let file: (String, String) = if spec.version == version {
        let v = spec
            .variant(variant)
            .ok_or_else(|| ApiError::not_found(format!("model `{name}` has no {variant} file")))?;
        (v.file.clone(), v.sha256.clone())
    } else {
        match manifest.candidate(&name, &version) {
            Some(c) if variant == Variant::Device => (c.file.clone(), c.sha256.clone()),
            Some(_) => {
                return Err(ApiError::not_found(format!(
                    "candidate {version} of `{name}` is a device file only"
                )));
            }
            None => {
                let mut held = vec![spec.version.clone()];
                held.extend(
                    manifest
                        .candidates()
                        .iter()
                        .filter(|c| c.model == name)
                        .map(|c| c.version.clone()),
                );
                return Err(ApiError::not_found(format!(
                    "model `{name}` has no version `{version}`; the zoo holds {}",
                    held.join(", ")
                )));
            }
        }
    };
    let (file_name, sha256) = file;
    let etag = format!("\"{sha256}\"");
    if headers
        .get(header::IF_NONE_MATCH)
        .and_then(|v| v.to_str().ok())
        == Some(etag.as_str())
    {
        return Ok((StatusCode::NOT_MODIFIED, [(header::ETAG, etag)]).into_response());
    }
    let unreadable = |e: std::io::Error| {
        ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("cannot read {file_name}: {e}"),
        )
    };
    let mut opened = tokio::fs::File::open(manifest.path_of(&file_name))
        .await
        .map_err(unreadable)?;
    let total = opened.metadata().await.map_err(unreadable)?.len();
    // A resumed download of a file that changed since must start again from the beginning.
    let same_file = headers
        .get(header::IF_RANGE)
        .is_none_or(|v| v.to_str().ok() == Some(etag.as_str()));
    let range = headers
        .get(header::RANGE)
        .and_then(|v| v.to_str().ok())
        .filter(|_| same_file);
    let (status, start, end) = match range {
        None => (StatusCode::OK, 0, total),
        Some(r) => match parse_range(r, total) {
            Some((s, e)) => (StatusCode::PARTIAL_CONTENT, s, e),
            None => {
                return Ok((
                    StatusCode::RANGE_NOT_SATISFIABLE,
                    [(header::CONTENT_RANGE, format!("bytes */{total}"))],
                    axum::Json(json!({"error": format!("range `{r}` is not satisfiable for a file of {total} bytes")})),
                )
                    .into_response());
            }
        },
    };
    {
        use tokio::io::AsyncSeekExt;
        opened
            .seek(std::io::SeekFrom::Start(start))
            .await
            .map_err(unreadable)?;
    }
    let length = end.saturating_sub(start);
    let stream = tokio_util::io::ReaderStream::with_capacity(
        tokio::io::AsyncReadExt::take(opened, length),
        64 * 1024,
    );
    let mut resp = Response::new(Body::from_stream(stream));
    *resp.status_mut() = status;
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/octet-stream"),
    );
    h.insert(header::ACCEPT_RANGES, HeaderValue::from_static("bytes"));
    h.insert(header::CONTENT_LENGTH, HeaderValue::from(length));
    if let Ok(v) = HeaderValue::from_str(&etag) {
        h.insert(header::ETAG, v);
    }
    if status == StatusCode::PARTIAL_CONTENT
        && let Ok(v) = HeaderValue::from_str(&format!("bytes {start}-{}/{total}", end - 1))
    {
        h.insert(header::CONTENT_RANGE, v);
    }
    Ok(resp)
}

/// One `bytes=a-b`, `bytes=a-` or `bytes=-n` range, as a half-open interval.
fn parse_range(r: &str, total: u64) -> Option<(u64, u64)> {
    let spec = r.trim().strip_prefix("bytes=")?;
    if spec.contains(',') {
        return None; // one range is all a resuming download needs
    }
    let (a, b) = spec.split_once('-')?;
    let (start, end) = match (a.trim(), b.trim()) {
        ("", n) => {
            let n: u64 = n.parse().ok()?;
            (total.checked_sub(n.min(total))?, total)
        }
        (s, "") => (s.parse().ok()?, total),
        (s, e) => (
            s.parse().ok()?,
            e.parse::<u64>().ok()?.checked_add(1)?.min(total),
        ),
    };
    (start < end && start < total).then_some((start, end))
}

async fn metrics(AxState(state): AxState<State>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        state.0.metrics.render(),
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::parse_range;

    #[test]
    fn ranges() {
        assert_eq!(parse_range("bytes=0-9", 100), Some((0, 10)));
        assert_eq!(parse_range("bytes=90-", 100), Some((90, 100)));
        assert_eq!(parse_range("bytes=-10", 100), Some((90, 100)));
        assert_eq!(parse_range("bytes=95-200", 100), Some((95, 100)));
        assert_eq!(parse_range("bytes=100-", 100), None);
        assert_eq!(parse_range("bytes=5-2", 100), None);
        assert_eq!(parse_range("bytes=0-1,4-5", 100), None);
        assert_eq!(parse_range("items=0-1", 100), None);
    }
}
