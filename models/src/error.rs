//! The one error type of the `models` crate. Every variant names what is wrong and reads as a
//! sentence its receiver can act on; [`ModelError::code`] says which kind of caller mistake (or
//! server fault) it is, so the MQTT and HTTP front ends can map it without parsing text.

use std::path::PathBuf;

/// What kind of failure an error is, for the protocol layers (MQTT error codes, HTTP statuses).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorCode {
    /// The request is malformed or does not fit the model: the sender must fix it.
    BadRequest,
    /// No model of that name is loaded.
    UnknownModel,
    /// Something failed on our side (a file, the engine): retrying elsewhere may help.
    Internal,
}

impl ErrorCode {
    /// The wire name, as used in MQTT error replies (`"code"`).
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::BadRequest => "bad_request",
            ErrorCode::UnknownModel => "unknown_model",
            ErrorCode::Internal => "internal",
        }
    }
}

/// Everything that can go wrong loading models or running a request through them.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("unknown model `{name}`; the models loaded here are: {known}")]
    UnknownModel { name: String, known: String },

    #[error("model `{model}` has no input named `{name}`; its inputs are: {expected}")]
    UnknownInput {
        model: String,
        name: String,
        expected: String,
    },

    #[error("model `{model}` needs the input `{name}`, which the request does not carry")]
    MissingInput { model: String, name: String },

    #[error("the request gives the input `{name}` more than once")]
    DuplicateInput { name: String },

    #[error("input `{input}` has shape {got} where {expected} is expected by model `{model}`")]
    ShapeMismatch {
        model: String,
        input: String,
        got: String,
        expected: String,
    },

    #[error("input `{input}` has datatype {got} but model `{model}` expects {expected}")]
    DatatypeMismatch {
        model: String,
        input: String,
        got: String,
        expected: String,
    },

    #[error("input `{input}` has {got} values in `data` but its shape {shape} needs {expected}")]
    DataLength {
        input: String,
        got: usize,
        expected: usize,
        shape: String,
    },

    #[error("input `{input}` has an unusable shape {shape}: {reason}")]
    AbsurdShape {
        input: String,
        shape: String,
        reason: String,
    },

    #[error("input `{input}`: {reason}")]
    BadData { input: String, reason: String },

    #[error(
        "datatype `{0}` is not supported; use one of BOOL, UINT8, INT8, INT32, INT64, FP16, FP32"
    )]
    UnsupportedDatatype(String),

    #[error("the request is not a valid inference request: {0}")]
    BadRequest(String),

    #[error("{what} in a batch must all have the same shape past the batch axis: {reason}")]
    BatchMismatch { what: String, reason: String },

    #[error(
        "{path} has sha256 {actual} but the manifest says {expected}: the file is corrupt or was \
         replaced; restore it or regenerate the zoo with models/make_models.py"
    )]
    Checksum {
        path: PathBuf,
        expected: String,
        actual: String,
    },

    #[error("cannot read {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },

    #[error("the manifest {path} is invalid: {reason}")]
    Manifest { path: PathBuf, reason: String },

    #[error("model `{model}` ({path}) could not be loaded by tract: {reason}")]
    Load {
        model: String,
        path: PathBuf,
        reason: String,
    },

    #[error("model `{model}` failed while running: {reason}")]
    Run { model: String, reason: String },

    #[error(
        "the tract runtime `{0}` is not compiled into this binary; `cuda` needs a build with --features cuda (a Jetson with CUDA 12), and the default runtime needs none"
    )]
    Runtime(String),
}

impl ModelError {
    /// The protocol-level kind of this error.
    pub fn code(&self) -> ErrorCode {
        use ModelError::*;
        match self {
            UnknownModel { .. } => ErrorCode::UnknownModel,
            UnknownInput { .. }
            | MissingInput { .. }
            | DuplicateInput { .. }
            | ShapeMismatch { .. }
            | DatatypeMismatch { .. }
            | DataLength { .. }
            | AbsurdShape { .. }
            | BadData { .. }
            | UnsupportedDatatype(_)
            | BadRequest(_)
            | BatchMismatch { .. } => ErrorCode::BadRequest,
            Checksum { .. }
            | Io { .. }
            | Manifest { .. }
            | Load { .. }
            | Run { .. }
            | Runtime(_) => ErrorCode::Internal,
        }
    }
}

/// Shorthand for results of this crate.
pub type Result<T, E = ModelError> = std::result::Result<T, E>;
