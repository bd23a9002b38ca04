//! The zoo against tract: every model loads, outputs match ONNX Runtime's goldens, the trained
//! classifiers reach their accuracy on the committed test splits, bad input gets its specific
//! error, and a corrupted file is refused.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};

use models::engine::LoadedModel;
use models::v2::InferenceRequest;
use models::{Engine, EngineConfig, ErrorCode, ModelError, Tensor, Variant, golden};
use serde_json::json;

fn zoo() -> PathBuf {
    models::default_zoo_dir()
}

fn engine(variant: Variant) -> Engine {
    EngineConfig {
        variant,
        ..EngineConfig::default()
    }
    .build(zoo())
    .expect("the zoo loads")
}

fn decode(model: &LoadedModel, v: serde_json::Value) -> Result<Vec<Tensor>, ModelError> {
    let request: InferenceRequest = serde_json::from_value(v).expect("request JSON");
    request.decode_inputs(model.max_elements())
}

#[test]
fn every_variant_of_every_model_loads() {
    for variant in [Variant::Device, Variant::Source, Variant::Cloud] {
        let engine = engine(variant);
        let names: Vec<&str> = engine.models().map(|m| m.name()).collect();
        assert_eq!(
            names,
            ["digits", "ocr_det", "vad", "vibration"],
            "{variant}"
        );
    }
}

/// fp32 within 1e-4 of ONNX Runtime; int8 models (QDQ, which tract executes with the same
/// integer arithmetic) within the same bound, measured well inside it.
#[test]
fn outputs_match_the_onnx_runtime_goldens() {
    for variant in [Variant::Device, Variant::Source, Variant::Cloud] {
        let engine = engine(variant);
        for model in engine.models() {
            let device_file = &model.spec().variant(Variant::Device).unwrap().file;
            if variant != Variant::Device && &model.variant().file == device_file {
                continue; // the same file as the device variant, checked there
            }
            let request = golden::request(engine.manifest(), model.name()).unwrap();
            let expected = golden::response(engine.manifest(), model.name(), variant).unwrap();
            let outputs = model
                .infer(request.decode_inputs(model.max_elements()).unwrap())
                .unwrap();
            assert_eq!(outputs.len(), expected.outputs.len());
            for (got, want) in outputs.iter().zip(&expected.outputs) {
                let want = want.to_tensor().unwrap();
                assert_eq!(
                    got.shape(),
                    want.shape(),
                    "{} {variant} {}",
                    model.name(),
                    want.name()
                );
                let worst = got.max_abs_diff(&want);
                eprintln!(
                    "golden {} {variant} {}: max abs diff {worst:e}",
                    model.name(),
                    want.name()
                );
                assert!(
                    worst <= 1e-4,
                    "{} {variant} {}: max abs diff {worst}",
                    model.name(),
                    want.name()
                );
            }
        }
    }
}

fn accuracy(engine: &Engine, name: &str) -> f64 {
    let model = engine.model(name).unwrap();
    let split = engine.manifest().test_split(model.spec()).unwrap();
    let mut correct = 0usize;
    for start in (0..split.len()).step_by(32) {
        let end = (start + 32).min(split.len());
        let mut shape = vec![end - start];
        shape.extend_from_slice(&split.sample_shape);
        let x = Tensor::from_f32("input", shape, split.samples(start, end).to_vec()).unwrap();
        let out = model.infer(vec![x]).unwrap();
        let classes = model.spec().labels.as_ref().unwrap().len();
        for (row, &label) in out[0]
            .as_f32()
            .unwrap()
            .chunks(classes)
            .zip(&split.labels[start..end])
        {
            let best = (0..classes)
                .max_by(|&a, &b| row[a].total_cmp(&row[b]))
                .unwrap();
            correct += usize::from(best == usize::from(label));
        }
    }
    correct as f64 / split.len() as f64
}

#[test]
fn int8_device_models_reach_their_accuracy_in_rust() {
    let device = engine(Variant::Device);
    let digits = accuracy(&device, "digits");
    let vibration = accuracy(&device, "vibration");
    assert!(digits >= 0.97, "digits int8 accuracy {digits}");
    assert!(vibration >= 0.93, "vibration int8 accuracy {vibration}");
    // And tract agrees with what make_models.py measured with ONNX Runtime.
    for (name, acc) in [("digits", digits), ("vibration", vibration)] {
        let recorded = device.model(name).unwrap().variant().test_accuracy.unwrap();
        assert!(
            (acc - recorded).abs() < 1e-3,
            "{name}: tract {acc}, onnxruntime {recorded}"
        );
    }
    let cloud = engine(Variant::Cloud);
    assert!(
        accuracy(&cloud, "digits") > digits,
        "the cloud digits model is more accurate"
    );
    assert!(
        accuracy(&cloud, "vibration") > vibration,
        "the cloud vibration model is more accurate"
    );
}

#[test]
fn a_batch_gives_each_request_its_own_rows() {
    let engine = engine(Variant::Device);
    let model = engine.model("digits").unwrap();
    let split = engine.manifest().test_split(model.spec()).unwrap();
    let requests: Vec<Vec<Tensor>> = (0..5)
        .map(|i| {
            let rows = 1 + i % 2; // batches of 1 and 2 rows, mixed
            vec![
                Tensor::from_f32(
                    "input",
                    vec![rows, 1, 8, 8],
                    split.samples(i, i + rows).to_vec(),
                )
                .unwrap(),
            ]
        })
        .collect();
    let single: Vec<Vec<Tensor>> = requests
        .iter()
        .map(|r| model.infer(r.clone()).unwrap())
        .collect();
    let batched = model.infer_batch(requests);
    for (b, s) in batched.into_iter().zip(single) {
        let b = b.unwrap();
        assert_eq!(b[0].shape(), s[0].shape());
        let worst = b[0].max_abs_diff(&s[0]);
        assert!(worst < 1e-5, "batched and single results differ by {worst}");
    }
}

#[test]
fn a_bad_request_in_a_batch_fails_alone() {
    let engine = engine(Variant::Device);
    let model = engine.model("digits").unwrap();
    let good = vec![Tensor::from_f32("input", vec![1, 1, 8, 8], vec![0.5; 64]).unwrap()];
    let bad = vec![Tensor::from_f32("input", vec![1, 64], vec![0.5; 64]).unwrap()];
    let results = model.infer_batch(vec![good.clone(), bad, good]);
    assert!(results[0].is_ok() && results[2].is_ok());
    assert!(matches!(results[1], Err(ModelError::ShapeMismatch { .. })));
}

#[test]
fn unknown_model() {
    let err = engine(Variant::Device).model("resnet").unwrap_err();
    assert_eq!(err.code(), ErrorCode::UnknownModel);
    assert_eq!(
        err.to_string(),
        "unknown model `resnet`; the models loaded here are: digits, ocr_det, vad, vibration"
    );
}

#[test]
fn wrong_shape_names_both_shapes() {
    let engine = engine(Variant::Device);
    let model = engine.model("digits").unwrap();
    let inputs = decode(
        model,
        json!({"inputs":[{"name":"input","shape":[1,64],"datatype":"FP32","data":vec![0.0;64]}]}),
    )
    .unwrap();
    let err = model.infer(inputs).unwrap_err();
    assert_eq!(err.code(), ErrorCode::BadRequest);
    assert_eq!(
        err.to_string(),
        "input `input` has shape [1,64] where [N,1,8,8] is expected by model `digits`"
    );
}

#[test]
fn unknown_and_missing_inputs() {
    let engine = engine(Variant::Device);
    let vad = engine.model("vad").unwrap();
    let only_audio = decode(
        vad,
        json!({"inputs":[{"name":"input","shape":[1,576],"datatype":"FP32","data":vec![0.0;576]}]}),
    )
    .unwrap();
    let err = vad.infer(only_audio).unwrap_err();
    assert_eq!(
        err.to_string(),
        "model `vad` needs the input `state`, which the request does not carry"
    );
    let digits = engine.model("digits").unwrap();
    let wrong_name = decode(digits, json!({"inputs":[{"name":"image","shape":[1,1,8,8],"datatype":"FP32","data":vec![0.0;64]}]})).unwrap();
    let err = digits.infer(wrong_name).unwrap_err();
    assert_eq!(
        err.to_string(),
        "model `digits` has no input named `image`; its inputs are: input"
    );
    let twice = decode(
        digits,
        json!({"inputs":[
        {"name":"input","shape":[1,1,8,8],"datatype":"FP32","data":vec![0.0;64]},
        {"name":"input","shape":[1,1,8,8],"datatype":"FP32","data":vec![0.0;64]}]}),
    )
    .unwrap();
    assert!(matches!(
        digits.infer(twice),
        Err(ModelError::DuplicateInput { .. })
    ));
}

#[test]
fn datatype_mismatch() {
    let engine = engine(Variant::Device);
    let model = engine.model("digits").unwrap();
    let inputs = decode(
        model,
        json!({"inputs":[{"name":"input","shape":[1,1,8,8],"datatype":"INT32","data":vec![0;64]}]}),
    )
    .unwrap();
    let err = model.infer(inputs).unwrap_err();
    assert_eq!(
        err.to_string(),
        "input `input` has datatype INT32 but model `digits` expects FP32"
    );
}

#[test]
fn data_length_not_matching_the_shape() {
    let engine = engine(Variant::Device);
    let model = engine.model("digits").unwrap();
    let err = decode(model, json!({"inputs":[{"name":"input","shape":[2,1,8,8],"datatype":"FP32","data":vec![0.0;64]}]})).unwrap_err();
    assert_eq!(
        err.to_string(),
        "input `input` has 64 values in `data` but its shape [2,1,8,8] needs 128"
    );
}

#[test]
fn absurd_shapes() {
    let engine = engine(Variant::Device);
    let model = engine.model("digits").unwrap();
    let err = decode(model, json!({"inputs":[{"name":"input","shape":[1000000,1,8000,8000],"datatype":"FP32","data":[]}]})).unwrap_err();
    assert!(matches!(err, ModelError::AbsurdShape { .. }), "{err}");
    assert!(err.to_string().contains("exceed the limit"), "{err}");
    let zero = Tensor::from_f32("input", vec![0, 1, 8, 8], vec![]).unwrap();
    let err = model.infer(vec![zero]).unwrap_err();
    assert_eq!(
        err.to_string(),
        "input `input` has an unusable shape [0,1,8,8]: a dimension is zero"
    );
    let ocr = engine.model("ocr_det").unwrap();
    // A 3-channel image must be given as such, whatever its size.
    let err = ocr
        .infer(vec![
            Tensor::from_f32("x", vec![1, 4, 32, 32], vec![0.0; 4096]).unwrap(),
        ])
        .unwrap_err();
    assert_eq!(
        err.to_string(),
        "input `x` has shape [1,4,32,32] where [N,3,?,?] is expected by model `ocr_det`"
    );
}

#[test]
fn ocr_det_runs_on_any_multiple_of_32() {
    let engine = engine(Variant::Device);
    let model = engine.model("ocr_det").unwrap();
    for (h, w) in [(32, 64), (64, 32)] {
        let x = Tensor::from_f32("x", vec![1, 3, h, w], vec![0.0; 3 * h * w]).unwrap();
        let out = model.infer(vec![x]).unwrap();
        assert_eq!(out[0].shape(), &[1, 1, h, w]);
    }
}

fn copy_zoo(to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(zoo()).unwrap() {
        let entry = entry.unwrap();
        if entry.file_type().unwrap().is_file() {
            std::fs::copy(entry.path(), to.join(entry.file_name())).unwrap();
        }
    }
}

#[test]
fn a_corrupted_model_file_is_refused_with_its_sha256() {
    let dir = std::env::temp_dir().join(format!("tether-corrupt-zoo-{}", std::process::id()));
    copy_zoo(&dir);
    let file = dir.join("digits.int8.onnx");
    let mut bytes = std::fs::read(&file).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x01;
    std::fs::write(&file, bytes).unwrap();
    let err = EngineConfig::default().build(&dir).unwrap_err();
    std::fs::remove_dir_all(&dir).unwrap();
    assert!(matches!(err, ModelError::Checksum { .. }), "{err}");
    let text = err.to_string();
    assert!(text.contains("digits.int8.onnx has sha256"), "{text}");
    assert!(
        text.contains("the file is corrupt or was replaced"),
        "{text}"
    );
}

fn lazy(dir: &Path) -> Result<Engine, ModelError> {
    EngineConfig {
        lazy: true,
        ..EngineConfig::default()
    }
    .build(dir)
}

fn digits_input() -> Tensor {
    Tensor::from_f32("input", vec![1, 1, 8, 8], vec![0.5; 64]).unwrap()
}

#[test]
fn lazy_models_are_verified_at_start_and_built_on_their_first_run() {
    let engine = lazy(&zoo()).unwrap();
    assert!(engine.models().all(|m| !m.is_loaded()), "nothing built yet");
    let digits = engine.model("digits").unwrap();
    let out = digits.infer(vec![digits_input()]).unwrap();
    assert_eq!(out[0].shape(), &[1, 10]);
    assert!(digits.is_loaded());
    assert!(!engine.model("ocr_det").unwrap().is_loaded());
    engine.model("vad").unwrap().load().unwrap();
    assert!(engine.model("vad").unwrap().is_loaded());

    // Verification still happens at start-up: a damaged file is refused before any request.
    let dir = std::env::temp_dir().join(format!("tether-lazy-corrupt-{}", std::process::id()));
    copy_zoo(&dir);
    let file = dir.join("digits.int8.onnx");
    let mut bytes = std::fs::read(&file).unwrap();
    bytes[10] ^= 0x01;
    std::fs::write(&file, &bytes).unwrap();
    let err = lazy(&dir).unwrap_err();
    std::fs::remove_dir_all(&dir).unwrap();
    assert!(matches!(err, ModelError::Checksum { .. }), "{err}");
}

#[test]
fn a_lazy_model_that_does_not_parse_fails_its_requests_while_the_others_serve() {
    let dir = std::env::temp_dir().join(format!("tether-lazy-junk-{}", std::process::id()));
    copy_zoo(&dir);
    // Junk with a manifest that vouches for it: it passes verification and fails to build.
    let file = dir.join("digits.int8.onnx");
    let old = models::manifest::sha256_hex(&std::fs::read(&file).unwrap());
    let junk = b"this is not an ONNX model".to_vec();
    std::fs::write(&file, &junk).unwrap();
    let manifest = dir.join("MANIFEST.toml");
    let text = std::fs::read_to_string(&manifest).unwrap();
    std::fs::write(
        &manifest,
        text.replace(&old, &models::manifest::sha256_hex(&junk)),
    )
    .unwrap();
    let engine = lazy(&dir).unwrap();
    let eager = EngineConfig::default().build(&dir).unwrap_err();
    assert!(matches!(eager, ModelError::Load { .. }), "{eager}");
    let digits = engine.model("digits").unwrap();
    for _ in 0..2 {
        let err = digits.infer(vec![digits_input()]).unwrap_err();
        assert!(matches!(err, ModelError::Load { .. }), "{err}");
        assert_eq!(err.code(), ErrorCode::Internal);
    }
    assert!(!digits.is_loaded());
    let x = Tensor::from_f32("input", vec![1, 3, 128], vec![0.0; 384]).unwrap();
    let vibration = engine.model("vibration").unwrap().infer(vec![x]);
    std::fs::remove_dir_all(&dir).unwrap();
    assert_eq!(vibration.unwrap()[0].shape(), &[1, 3]);
}

#[test]
fn a_lazy_models_file_replaced_after_start_is_refused_until_it_is_restored() {
    let dir = std::env::temp_dir().join(format!("tether-lazy-swap-{}", std::process::id()));
    copy_zoo(&dir);
    let engine = lazy(&dir).unwrap();
    let file = dir.join("digits.int8.onnx");
    let good = std::fs::read(&file).unwrap();
    let mut bad = good.clone();
    bad[10] ^= 0x01;
    std::fs::write(&file, &bad).unwrap();
    let digits = engine.model("digits").unwrap();
    let err = digits.infer(vec![digits_input()]).unwrap_err();
    assert!(matches!(err, ModelError::Checksum { .. }), "{err}");
    // A file that could not be read or verified is not remembered as failed.
    std::fs::write(&file, &good).unwrap();
    let out = digits.infer(vec![digits_input()]);
    std::fs::remove_dir_all(&dir).unwrap();
    assert_eq!(out.unwrap()[0].shape(), &[1, 10]);
}
