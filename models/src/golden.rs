//! The zoo's golden pairs, written by make_models.py with ONNX Runtime:
//! `golden/{model}.request.json` (a V2 request, also a ready-made example input) and
//! `golden/{model}.{variant}.response.json` (the outputs ONNX Runtime computed for it).

use std::path::PathBuf;

use crate::error::{ModelError, Result};
use crate::manifest::{Manifest, Variant};
use crate::v2::{InferenceRequest, InferenceResponse};

/// Path of a model's golden request.
pub fn request_path(manifest: &Manifest, model: &str) -> PathBuf {
    manifest
        .dir()
        .join("golden")
        .join(format!("{model}.request.json"))
}

/// Path of a model variant's golden response.
pub fn response_path(manifest: &Manifest, model: &str, variant: Variant) -> PathBuf {
    manifest
        .dir()
        .join("golden")
        .join(format!("{model}.{variant}.response.json"))
}

/// A model's golden request.
pub fn request(manifest: &Manifest, model: &str) -> Result<InferenceRequest> {
    let path = request_path(manifest, model);
    let bytes = std::fs::read(&path).map_err(|source| ModelError::Io {
        path: path.clone(),
        source,
    })?;
    InferenceRequest::from_json(&bytes)
}

/// A model variant's golden response.
pub fn response(manifest: &Manifest, model: &str, variant: Variant) -> Result<InferenceResponse> {
    let path = response_path(manifest, model, variant);
    let bytes = std::fs::read(&path).map_err(|source| ModelError::Io {
        path: path.clone(),
        source,
    })?;
    serde_json::from_slice(&bytes).map_err(|e| ModelError::Manifest {
        path,
        reason: e.to_string(),
    })
}
