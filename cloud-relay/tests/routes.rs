//! Every route and error path of the relay, through `tower::ServiceExt::oneshot` on the router,
//! with the zoo's cloud models loaded.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use axum::body::Body;
use axum::http::{Request, StatusCode, header};
use cloud_relay::config::{RawConfig, RawModel, RawToken};
use cloud_relay::{State, app, auth::hash_token};
use http_body_util::BodyExt;
use models::{Manifest, Variant, golden};
use serde_json::{Value, json};
use tower::ServiceExt;

fn state_with(tweak: impl FnOnce(&mut RawConfig)) -> State {
    let mut raw = RawConfig {
        models_dir: Some(models::default_zoo_dir()),
        ..RawConfig::default()
    };
    tweak(&mut raw);
    State::build(raw.validate().unwrap()).unwrap()
}

async fn call(state: &State, req: Request<Body>) -> (StatusCode, axum::http::HeaderMap, Vec<u8>) {
    let resp = app(state.clone()).oneshot(req).await.unwrap();
    let status = resp.status();
    let headers = resp.headers().clone();
    let body = resp
        .into_body()
        .collect()
        .await
        .unwrap()
        .to_bytes()
        .to_vec();
    (status, headers, body)
}

async fn get(state: &State, uri: &str) -> (StatusCode, Vec<u8>) {
    let (s, _, b) = call(state, Request::get(uri).body(Body::empty()).unwrap()).await;
    (s, b)
}

async fn post_json(state: &State, uri: &str, body: Vec<u8>) -> (StatusCode, Value) {
    let (s, _, b) = call(
        state,
        Request::post(uri)
            .header(header::CONTENT_TYPE, "application/json")
            .body(Body::from(body))
            .unwrap(),
    )
    .await;
    (s, serde_json::from_slice(&b).unwrap_or(Value::Null))
}

fn golden_body(model: &str) -> Vec<u8> {
    let manifest = Manifest::load(models::default_zoo_dir()).unwrap();
    std::fs::read(golden::request_path(&manifest, model)).unwrap()
}

fn error_of(v: &Value) -> &str {
    v["error"]
        .as_str()
        .unwrap_or_else(|| panic!("a V2 error body, got {v}"))
}

#[tokio::test]
async fn health_and_server_metadata() {
    let state = state_with(|_| {});
    // The protocol's health bodies, which the kserve SDK's clients read.
    let (s, body) = get(&state, "/v2/health/live").await;
    assert_eq!(
        (s, serde_json::from_slice::<Value>(&body).unwrap()),
        (StatusCode::OK, json!({"live": true}))
    );
    let (s, body) = get(&state, "/v2/health/ready").await;
    assert_eq!(
        (s, serde_json::from_slice::<Value>(&body).unwrap()),
        (StatusCode::OK, json!({"ready": true}))
    );
    let (s, body) = get(&state, "/v2/models/digits/ready").await;
    assert_eq!(
        (s, serde_json::from_slice::<Value>(&body).unwrap()),
        (StatusCode::OK, json!({"name": "digits", "ready": true}))
    );
    // `GET /v2/` as the protocol's text writes it, and `/v2`.
    assert_eq!(get(&state, "/v2/").await.0, StatusCode::OK);
    let (s, body) = get(&state, "/v2").await;
    assert_eq!(s, StatusCode::OK);
    let v: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(v["name"], "tether-relay");
    assert!(
        v["extensions"]
            .as_array()
            .unwrap()
            .contains(&json!("binary_tensor_data"))
    );
    let (s, body) = get(&state, "/v3/nothing").await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    assert!(error_of(&serde_json::from_slice(&body).unwrap()).contains("no such endpoint"));
}

#[tokio::test]
async fn model_metadata_and_readiness() {
    let state = state_with(|_| {});
    let (s, body) = get(&state, "/v2/models/digits").await;
    assert_eq!(s, StatusCode::OK);
    let v: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(v["name"], "digits");
    assert_eq!(v["versions"], json!(["1.0.0"]));
    assert_eq!(
        v["inputs"],
        json!([{"name": "input", "datatype": "FP32", "shape": [-1, 1, 8, 8]}])
    );
    assert_eq!(v["parameters"]["variant"], "cloud");
    assert_eq!(
        get(&state, "/v2/models/digits/versions/1.0.0").await.0,
        StatusCode::OK
    );
    assert_eq!(
        get(&state, "/v2/models/digits/ready").await.0,
        StatusCode::OK
    );
    assert_eq!(
        get(&state, "/v2/models/digits/versions/1.0.0/ready")
            .await
            .0,
        StatusCode::OK
    );
    let (s, body) = get(&state, "/v2/models/digits/versions/9/ready").await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    assert!(error_of(&serde_json::from_slice(&body).unwrap()).contains("has no version `9`"));
    let (s, body) = get(&state, "/v2/models/resnet").await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    assert_eq!(
        error_of(&serde_json::from_slice(&body).unwrap()),
        "unknown model `resnet`; the models served here are: digits, ocr_det, vad, vibration"
    );
    assert_eq!(
        get(&state, "/v2/models/resnet/ready").await.0,
        StatusCode::NOT_FOUND
    );
}

#[tokio::test]
async fn json_inference_matches_the_cloud_goldens() {
    let state = state_with(|_| {});
    let manifest = Manifest::load(models::default_zoo_dir()).unwrap();
    for model in ["digits", "vibration", "vad", "ocr_det"] {
        let (s, v) = post_json(
            &state,
            &format!("/v2/models/{model}/infer"),
            golden_body(model),
        )
        .await;
        assert_eq!(s, StatusCode::OK, "{model}: {v}");
        assert_eq!(v["model_name"], model);
        let variant = if ["digits", "vibration"].contains(&model) {
            Variant::Cloud
        } else {
            Variant::Device
        };
        let expected = golden::response(&manifest, model, variant).unwrap();
        for (got, want) in v["outputs"]
            .as_array()
            .unwrap()
            .iter()
            .zip(&expected.outputs)
        {
            let got: models::v2::ResponseOutput = serde_json::from_value(got.clone()).unwrap();
            let (g, w) = (got.to_tensor().unwrap(), want.to_tensor().unwrap());
            assert_eq!(g.shape(), w.shape());
            let worst = g.max_abs_diff(&w);
            assert!(worst <= 1e-4, "{model}: {worst}");
        }
    }
    // A versioned route and a chosen output.
    let mut req: Value = serde_json::from_slice(&golden_body("digits")).unwrap();
    req["outputs"] = json!([{"name": "probabilities"}]);
    let (s, v) = post_json(
        &state,
        "/v2/models/digits/versions/1.0.0/infer",
        serde_json::to_vec(&req).unwrap(),
    )
    .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(v["outputs"].as_array().unwrap().len(), 1);
}

#[tokio::test]
async fn binary_tensors_in_and_out() {
    let state = state_with(|_| {});
    let data: Vec<f32> = (0..64).map(|i| (i % 16) as f32 / 16.0).collect();
    let head = serde_json::to_vec(&json!({
        "inputs": [{"name": "input", "shape": [1, 1, 8, 8], "datatype": "FP32", "parameters": {"binary_data_size": 256}}],
        "outputs": [{"name": "probabilities", "parameters": {"binary_data": true}}]
    }))
    .unwrap();
    let mut body = head.clone();
    body.extend(data.iter().flat_map(|x| x.to_le_bytes()));
    let req = Request::post("/v2/models/digits/infer")
        .header("inference-header-content-length", head.len())
        .header(header::CONTENT_TYPE, "application/octet-stream")
        .body(Body::from(body))
        .unwrap();
    let (s, headers, bytes) = call(&state, req).await;
    assert_eq!(s, StatusCode::OK, "{}", String::from_utf8_lossy(&bytes));
    let json_len: usize = headers
        .get("inference-header-content-length")
        .unwrap()
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    let v: Value = serde_json::from_slice(&bytes[..json_len]).unwrap();
    assert_eq!(v["outputs"][0]["parameters"]["binary_data_size"], 40);
    let probs: Vec<f32> = bytes[json_len..]
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect();
    assert_eq!(probs.len(), 10);
    assert!(
        (probs.iter().sum::<f32>() - 1.0).abs() < 1e-4,
        "softmax sums to one"
    );
    // The same input as JSON gives the same probabilities.
    let (_, jv) = post_json(
        &state,
        "/v2/models/digits/infer",
        serde_json::to_vec(&json!({"inputs": [{"name": "input", "shape": [1, 1, 8, 8], "datatype": "FP32", "data": data}]})).unwrap(),
    )
    .await;
    let json_probs: Vec<f32> = jv["outputs"][0]["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap() as f32)
        .collect();
    for (a, b) in probs.iter().zip(&json_probs) {
        assert!((a - b).abs() < 1e-6);
    }
    // A bad Inference-Header-Content-Length.
    let req = Request::post("/v2/models/digits/infer")
        .header("inference-header-content-length", "lots")
        .body(Body::from("{}"))
        .unwrap();
    let (s, _, b) = call(&state, req).await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    assert!(error_of(&serde_json::from_slice(&b).unwrap()).contains("is not a byte count"));
}

#[tokio::test]
async fn bad_requests_get_400_with_a_reason() {
    let state = state_with(|_| {});
    let cases: [(&str, Vec<u8>, &str); 5] = [
        ("digits", b"{not json".to_vec(), "not a valid inference request"),
        ("digits", br#"{"inputs":[{"name":"input","shape":[1,64],"datatype":"FP32","data":[0]}]}"#.to_vec(), "has 1 values in `data` but its shape [1,64] needs 64"),
        ("digits", serde_json::to_vec(&json!({"inputs":[{"name":"input","shape":[1,64],"datatype":"FP32","data":vec![0.0;64]}]})).unwrap(), "where [N,1,8,8] is expected"),
        ("digits", serde_json::to_vec(&json!({"inputs":[{"name":"input","shape":[1,1,8,8],"datatype":"INT32","data":vec![0;64]}]})).unwrap(), "has datatype INT32 but model `digits` expects FP32"),
        ("digits", serde_json::to_vec(&json!({"inputs":[{"name":"input","shape":[1,1,8,8],"datatype":"FP32","data":vec![0.0;64]}],"outputs":[{"name":"logits"}]})).unwrap(), "has no output named `logits`"),
    ];
    for (model, body, text) in cases {
        let (s, v) = post_json(&state, &format!("/v2/models/{model}/infer"), body).await;
        assert_eq!(s, StatusCode::BAD_REQUEST, "{v}");
        assert!(error_of(&v).contains(text), "`{text}` not in {v}");
    }
    let (s, v) = post_json(&state, "/v2/models/resnet/infer", golden_body("digits")).await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    assert!(error_of(&v).starts_with("unknown model `resnet`"));
    let (s, v) = post_json(
        &state,
        "/v2/models/digits/versions/2/infer",
        golden_body("digits"),
    )
    .await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    assert!(error_of(&v).contains("has no version `2`"));
}

#[tokio::test]
async fn limits_on_body_size_and_elements() {
    let state = state_with(|raw| {
        raw.limits.max_body_bytes = 4096;
        raw.limits.max_elements = 1000;
    });
    let (s, v) = post_json(&state, "/v2/models/digits/infer", vec![b' '; 5000]).await;
    assert_eq!(s, StatusCode::PAYLOAD_TOO_LARGE);
    assert!(error_of(&v).contains("over this relay's limit of 4096 bytes"));
    let (s, v) = post_json(
        &state,
        "/v2/models/ocr_det/infer",
        br#"{"inputs":[{"name":"x","shape":[1,3,320,320],"datatype":"FP32","data":[]}]}"#.to_vec(),
    )
    .await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    assert!(
        error_of(&v).contains("307200 elements exceed the limit of 1000"),
        "{v}"
    );
}

#[tokio::test]
async fn a_timeout_answers_504() {
    let state = state_with(|raw| raw.limits.request_timeout_ms = 1);
    // ocr_det on a large frame takes far longer than a millisecond.
    let x = vec![0.0f32; 3 * 256 * 256];
    let body = serde_json::to_vec(
        &json!({"inputs":[{"name":"x","shape":[1,3,256,256],"datatype":"FP32","data":x}]}),
    )
    .unwrap();
    let (s, v) = post_json(&state, "/v2/models/ocr_det/infer", body).await;
    assert_eq!(s, StatusCode::GATEWAY_TIMEOUT, "{v}");
    assert!(error_of(&v).contains("did not answer within this request's deadline (1 ms"));
}

#[tokio::test]
async fn auth_tokens_forbidden_models_and_rate_limits() {
    let state = state_with(|raw| {
        raw.auth.tokens = vec![
            RawToken {
                device_id: "pi-1".into(),
                sha256: hash_token("tok-1"),
                models: None,
            },
            RawToken {
                device_id: "pi-2".into(),
                sha256: hash_token("tok-2"),
                models: Some(vec!["vad".into()]),
            },
        ];
        raw.auth.rate_limit_rps = 0.001;
        raw.auth.rate_limit_burst = 2.0;
    });
    let infer = |token: Option<&'static str>| {
        let mut req = Request::post("/v2/models/digits/infer")
            .header(header::CONTENT_TYPE, "application/json");
        if let Some(t) = token {
            req = req.header(header::AUTHORIZATION, format!("Bearer {t}"));
        }
        req.body(Body::from(golden_body("digits"))).unwrap()
    };
    let (s, _, b) = call(&state, infer(None)).await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    assert!(error_of(&serde_json::from_slice(&b).unwrap()).contains("needs a device token"));
    let (s, _, b) = call(&state, infer(Some("wrong"))).await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    assert!(error_of(&serde_json::from_slice(&b).unwrap()).contains("not known to this relay"));
    let (s, _, b) = call(&state, infer(Some("tok-2"))).await;
    assert_eq!(s, StatusCode::FORBIDDEN);
    assert!(
        error_of(&serde_json::from_slice(&b).unwrap())
            .contains("device `pi-2` is not allowed to use model `digits`")
    );
    assert_eq!(call(&state, infer(Some("tok-1"))).await.0, StatusCode::OK);
    assert_eq!(call(&state, infer(Some("tok-1"))).await.0, StatusCode::OK);
    let (s, h, b) = call(&state, infer(Some("tok-1"))).await;
    assert_eq!(s, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(
        h.get(header::RETRY_AFTER).map(|v| v.as_bytes()),
        Some(&b"1"[..])
    );
    assert!(error_of(&serde_json::from_slice(&b).unwrap()).contains("over its rate limit"));
    // Health stays open for load balancers.
    assert_eq!(get(&state, "/v2/health/ready").await.0, StatusCode::OK);
    assert_eq!(
        get(&state, "/v2/models/digits").await.0,
        StatusCode::UNAUTHORIZED
    );
}

#[tokio::test]
async fn a_full_queue_answers_503() {
    let state = state_with(|raw| {
        raw.workers = Some(1);
        raw.batching.queue = 1;
        raw.batching.max_batch_size = 1;
    });
    let x = vec![0.0f32; 3 * 128 * 128];
    let body = serde_json::to_vec(
        &json!({"inputs":[{"name":"x","shape":[1,3,128,128],"datatype":"FP32","data":x}]}),
    )
    .unwrap();
    let calls: Vec<_> = (0..12)
        .map(|_| {
            let (state, body) = (state.clone(), body.clone());
            async move { post_json(&state, "/v2/models/ocr_det/infer", body).await }
        })
        .collect();
    let results = futures_join(calls).await;
    let full = results
        .iter()
        .filter(|(s, _)| *s == StatusCode::SERVICE_UNAVAILABLE)
        .count();
    let ok = results.iter().filter(|(s, _)| *s == StatusCode::OK).count();
    assert!(full > 0, "12 requests into a queue of 1 must overflow");
    assert_eq!(full + ok, 12);
    let (_, v) = results
        .iter()
        .find(|(s, _)| *s == StatusCode::SERVICE_UNAVAILABLE)
        .unwrap();
    assert!(error_of(v).contains("has a full queue"));
}

async fn futures_join<F>(fs: Vec<F>) -> Vec<F::Output>
where
    F: std::future::Future + Send + 'static,
    F::Output: Send + 'static,
{
    let handles: Vec<_> = fs.into_iter().map(tokio::spawn).collect();
    let mut out = Vec::new();
    for h in handles {
        out.push(h.await.unwrap());
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_requests_form_batches_and_each_gets_its_own_rows() {
    let state = state_with(|raw| {
        raw.workers = Some(1);
        raw.batching.max_batch_size = 8;
        raw.batching.max_queue_delay_us = 20_000;
    });
    let manifest = Manifest::load(models::default_zoo_dir()).unwrap();
    let split = manifest
        .test_split(manifest.model("digits").unwrap())
        .unwrap();
    let calls: Vec<_> = (0..32)
        .map(|i| {
            let state = state.clone();
            let body = serde_json::to_vec(&json!({"id": format!("r{i}"), "inputs":[{"name":"input","shape":[1,1,8,8],"datatype":"FP32","data": split.samples(i, i + 1)}]})).unwrap();
            async move { post_json(&state, "/v2/models/digits/infer", body).await }
        })
        .collect();
    let results = futures_join(calls).await;
    let mut max_batch = 0;
    let mut correct = 0;
    for (i, (s, v)) in results.iter().enumerate() {
        assert_eq!(*s, StatusCode::OK, "{v}");
        assert_eq!(v["id"], format!("r{i}"), "each caller gets its own answer");
        max_batch = max_batch.max(v["parameters"]["batch_rows"].as_u64().unwrap());
        let probs: Vec<f64> = v["outputs"][0]["data"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_f64().unwrap())
            .collect();
        let best = (0..10)
            .max_by(|&a, &b| probs[a].total_cmp(&probs[b]))
            .unwrap();
        correct += usize::from(best == usize::from(split.labels[i]));
    }
    assert!(max_batch > 1, "batches larger than one form under load");
    assert!(
        correct >= 31,
        "the rows are not mixed up between callers: {correct}/32 right"
    );
    let (_, body) = get(&state, "/metrics").await;
    let text = String::from_utf8(body).unwrap();
    assert!(
        text.contains("tether_relay_requests_total{model=\"digits\",code=\"ok\"} 32"),
        "{text}"
    );
    assert!(text.contains("tether_relay_batch_rows_bucket"), "{text}");
    assert!(text.contains("tether_relay_queue_seconds"), "{text}");
}

#[tokio::test]
async fn artifacts_with_etag_and_ranges() {
    let state = state_with(|_| {});
    let manifest = Manifest::load(models::default_zoo_dir()).unwrap();
    let spec = manifest
        .model("digits")
        .unwrap()
        .variant(Variant::Device)
        .unwrap()
        .clone();
    let file = std::fs::read(manifest.path_of(&spec.file)).unwrap();
    let uri = "/v2/models/digits/versions/1.0.0/artifact";
    let (s, h, body) = call(&state, Request::get(uri).body(Body::empty()).unwrap()).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(body, file);
    assert_eq!(h[header::ETAG], format!("\"{}\"", spec.sha256).as_str());
    let (s, h, body) = call(
        &state,
        Request::get(uri)
            .header(header::RANGE, "bytes=100-")
            .body(Body::empty())
            .unwrap(),
    )
    .await;
    assert_eq!(s, StatusCode::PARTIAL_CONTENT);
    assert_eq!(body, &file[100..]);
    assert_eq!(
        h[header::CONTENT_RANGE],
        format!("bytes 100-{}/{}", file.len() - 1, file.len()).as_str()
    );
    // If-Range naming this file resumes; naming another (the file changed) starts over.
    let (s, _, body) = call(
        &state,
        Request::get(uri)
            .header(header::RANGE, "bytes=100-")
            .header(header::IF_RANGE, format!("\"{}\"", spec.sha256))
            .body(Body::empty())
            .unwrap(),
    )
    .await;
    assert_eq!(
        (s, body.len()),
        (StatusCode::PARTIAL_CONTENT, file.len() - 100)
    );
    let (s, _, body) = call(
        &state,
        Request::get(uri)
            .header(header::RANGE, "bytes=100-")
            .header(header::IF_RANGE, "\"0000\"")
            .body(Body::empty())
            .unwrap(),
    )
    .await;
    assert_eq!((s, body), (StatusCode::OK, file.clone()));
    // HEAD: the headers alone.
    let (s, h, body) = call(&state, Request::head(uri).body(Body::empty()).unwrap()).await;
    assert_eq!(s, StatusCode::OK);
    assert!(body.is_empty());
    assert_eq!(h[header::CONTENT_LENGTH], file.len().to_string().as_str());
    let (s, _, _) = call(
        &state,
        Request::get(uri)
            .header(header::IF_NONE_MATCH, format!("\"{}\"", spec.sha256))
            .body(Body::empty())
            .unwrap(),
    )
    .await;
    assert_eq!(s, StatusCode::NOT_MODIFIED);
    let (s, _, _) = call(
        &state,
        Request::get(uri)
            .header(header::RANGE, "bytes=999999-")
            .body(Body::empty())
            .unwrap(),
    )
    .await;
    assert_eq!(s, StatusCode::RANGE_NOT_SATISFIABLE);
    let (s, _, body) = call(
        &state,
        Request::get(format!("{uri}?variant=cloud"))
            .body(Body::empty())
            .unwrap(),
    )
    .await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(
        body.len(),
        usize::try_from(
            manifest
                .model("digits")
                .unwrap()
                .variant(Variant::Cloud)
                .unwrap()
                .bytes
        )
        .unwrap()
    );
    assert_eq!(
        get(&state, "/v2/models/digits/versions/0.9/artifact")
            .await
            .0,
        StatusCode::NOT_FOUND
    );
    assert_eq!(
        get(&state, &format!("{uri}?variant=tiny")).await.0,
        StatusCode::BAD_REQUEST
    );
    // A rollout candidate of the model: its device file, under its own version.
    let candidate = manifest.candidate("digits", "1.1.0").unwrap();
    let c_uri = "/v2/models/digits/versions/1.1.0/artifact";
    let (s, h, body) = call(&state, Request::get(c_uri).body(Body::empty()).unwrap()).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(
        body,
        std::fs::read(manifest.path_of(&candidate.file)).unwrap()
    );
    assert_eq!(
        h[header::ETAG],
        format!("\"{}\"", candidate.sha256).as_str()
    );
    assert_eq!(
        get(&state, &format!("{c_uri}?variant=cloud")).await.0,
        StatusCode::NOT_FOUND,
        "a candidate is a device file only"
    );
    let (s, _, body) = call(
        &state,
        Request::get("/v2/models/digits/versions/..%2F1.1.0/artifact")
            .body(Body::empty())
            .unwrap(),
    )
    .await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    let text = String::from_utf8_lossy(&body);
    assert!(
        text.contains("1.0.0, 1.1.0, 1.2.0"),
        "the versions held: {text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_mode_forwards_to_a_second_relay() {
    // The upstream: a real relay on a loopback port chosen by the OS.
    let upstream_state = state_with(|raw| {
        raw.auth.tokens = vec![RawToken {
            device_id: "relay-a".into(),
            sha256: hash_token("up-token"),
            models: None,
        }];
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(cloud_relay::serve(
        upstream_state,
        listener,
        std::future::pending(),
    ));
    // The front relay forwards `digits` there, keeping its own auth.
    let front = state_with(|raw| {
        raw.models.insert(
            "digits".into(),
            RawModel {
                upstream: Some(format!("http://{addr}")),
                upstream_token: Some("up-token".into()),
                ..RawModel::default()
            },
        );
        raw.auth.tokens = vec![RawToken {
            device_id: "pi-1".into(),
            sha256: hash_token("tok-1"),
            models: None,
        }];
    });
    let req = |uri: &str| {
        Request::post(uri)
            .header(header::AUTHORIZATION, "Bearer tok-1")
            .header(header::CONTENT_TYPE, "application/json")
            .body(Body::from(golden_body("digits")))
            .unwrap()
    };
    let (s, _, b) = call(&front, req("/v2/models/digits/infer")).await;
    let v: Value = serde_json::from_slice(&b).unwrap();
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(v["model_name"], "digits");
    let (s, b) = {
        let (s, _, b) = call(
            &front,
            Request::get("/v2/models/digits")
                .header(header::AUTHORIZATION, "Bearer tok-1")
                .body(Body::empty())
                .unwrap(),
        )
        .await;
        (s, b)
    };
    assert_eq!(s, StatusCode::OK);
    assert_eq!(
        serde_json::from_slice::<Value>(&b).unwrap()["inputs"][0]["name"],
        "input"
    );
    // The front's auth still applies.
    let (s, _, _) = call(
        &front,
        Request::post("/v2/models/digits/infer")
            .body(Body::from(golden_body("digits")))
            .unwrap(),
    )
    .await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    // An upstream that is down: 502 with a reason.
    let dead = state_with(|raw| {
        raw.models.insert(
            "digits".into(),
            RawModel {
                upstream: Some("http://127.0.0.1:9".into()),
                ..RawModel::default()
            },
        );
    });
    let (s, v) = post_json(&dead, "/v2/models/digits/infer", golden_body("digits")).await;
    assert_eq!(s, StatusCode::BAD_GATEWAY, "{v}");
    assert!(error_of(&v).contains("did not answer"));
}

#[tokio::test]
async fn a_reload_names_the_keys_only_a_restart_applies() {
    let state = state_with(|_| {});
    let mut raw = RawConfig {
        models_dir: Some(models::default_zoo_dir()),
        ..RawConfig::default()
    };
    raw.listen = state.0.config.listen.to_string();
    raw.workers = Some(state.0.config.workers + 1);
    raw.limits.max_connections = 7;
    raw.limits.max_body_bytes = 4096;
    let config = raw.validate().unwrap();
    let restart = state.reload(&config);
    // max_parse_bytes follows max_body_bytes by default: the parse budget is sized at start.
    assert_eq!(
        restart,
        [
            "workers",
            "limits.max_connections",
            "limits.max_parse_bytes"
        ]
    );
    assert_eq!(state.now().max_body_bytes, 4096, "applied at once");
    assert!(state.reload(&state.0.config.clone()).is_empty());
}

/// TensorFlow Serving's REST API, with request and response bodies in the format TF Serving
/// documents (https://www.tensorflow.org/tfx/serving/api_rest): status, metadata, predict in
/// the row and columnar formats, and its `{"error"}` body.
#[tokio::test]
async fn tensorflow_servings_rest_api() {
    let state = state_with(|_| {});
    let (s, b) = get(&state, "/v1/models/digits").await;
    assert_eq!(s, StatusCode::OK);
    let v: Value = serde_json::from_slice(&b).unwrap();
    assert_eq!(v["model_version_status"][0]["state"], "AVAILABLE");
    assert_eq!(v["model_version_status"][0]["status"]["error_code"], "OK");
    assert_eq!(
        get(&state, "/v1/models/digits/versions/1.0.0").await.0,
        StatusCode::OK
    );
    assert_eq!(
        get(&state, "/v1/models/digits/versions/7").await.0,
        StatusCode::NOT_FOUND
    );
    let (s, b) = get(&state, "/v1/models/digits/metadata").await;
    assert_eq!(s, StatusCode::OK);
    let v: Value = serde_json::from_slice(&b).unwrap();
    let sig = &v["metadata"]["signature_def"]["signature_def"]["serving_default"];
    assert_eq!(sig["inputs"]["input"]["dtype"], "DT_FLOAT");
    let dims: Vec<&str> = sig["inputs"]["input"]["tensor_shape"]["dim"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["size"].as_str().unwrap())
        .collect();
    assert_eq!(dims, ["-1", "1", "8", "8"]);
    assert_eq!(sig["method_name"], "tensorflow/serving/predict");
    assert_eq!(v["model_spec"]["name"], "digits");

    // The golden request's four images, as TF Serving rows and as one column.
    let golden: Value = serde_json::from_slice(
        &std::fs::read(models::default_zoo_dir().join("golden/digits.request.json")).unwrap(),
    )
    .unwrap();
    let flat: Vec<f64> = golden["inputs"][0]["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap())
        .collect();
    let image = |i: usize| -> Value {
        let rows: Vec<Vec<f64>> = (0..8)
            .map(|r| flat[i * 64 + r * 8..i * 64 + r * 8 + 8].to_vec())
            .collect();
        json!([rows])
    };
    let instances: Vec<Value> = (0..4).map(image).collect();
    let (s, row) = post_json(
        &state,
        "/v1/models/digits:predict",
        serde_json::to_vec(&json!({ "instances": instances })).unwrap(),
    )
    .await;
    assert_eq!(s, StatusCode::OK, "{row}");
    let predictions = row["predictions"].as_array().unwrap();
    assert_eq!(predictions.len(), 4);
    assert_eq!(predictions[0].as_array().unwrap().len(), 10);
    let (s, col) = post_json(
        &state,
        "/v1/models/digits/versions/1.0.0:predict",
        serde_json::to_vec(&json!({ "signature_name": "serving_default", "inputs": instances }))
            .unwrap(),
    )
    .await;
    assert_eq!(s, StatusCode::OK, "{col}");
    assert_eq!(
        col["outputs"], row["predictions"],
        "one answer, two formats"
    );
    // The same numbers as the V2 route gives for the same images.
    let (s, v2) = post_json(
        &state,
        "/v2/models/digits/infer",
        serde_json::to_vec(&golden).unwrap(),
    )
    .await;
    assert_eq!(s, StatusCode::OK);
    let v2_flat: Vec<f64> = v2["outputs"][0]["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap())
        .collect();
    let tf_flat: Vec<f64> = predictions
        .iter()
        .flat_map(|p| p.as_array().unwrap().iter().map(|x| x.as_f64().unwrap()))
        .collect();
    assert_eq!(tf_flat, v2_flat);

    // Errors: TF Serving's body, a sentence under "error".
    for (uri, body, status, needle) in [
        (
            "/v1/models/digits:predict",
            json!({"instances": [[[1.0]]]}),
            StatusCode::BAD_REQUEST,
            "shape",
        ),
        (
            "/v1/models/digits:predict",
            json!({"instance": []}),
            StatusCode::BAD_REQUEST,
            "unknown key",
        ),
        (
            "/v1/models/digits:classify",
            json!({"instances": []}),
            StatusCode::BAD_REQUEST,
            ":predict",
        ),
        (
            "/v1/models/nope:predict",
            json!({"instances": [1]}),
            StatusCode::NOT_FOUND,
            "nope",
        ),
    ] {
        let (s, v) = post_json(&state, uri, serde_json::to_vec(&body).unwrap()).await;
        assert_eq!(s, status, "{uri}: {v}");
        assert!(
            v["error"].as_str().is_some_and(|e| e.contains(needle)),
            "{uri}: {v}"
        );
    }
    let (s, v) = post_json(&state, "/v1/models/digits:predict", b"{not json".to_vec()).await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    assert!(v["error"].as_str().unwrap().contains("not JSON"), "{v}");
}
