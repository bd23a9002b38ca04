//! Tether's models: the zoo manifest ([`manifest`]), the tract inference engine ([`engine`]),
//! typed tensors ([`tensor`]) and their Open Inference Protocol (KServe V2) JSON form ([`v2`]).
//!
//! Nothing here does network IO or spawns threads: the agent and the relay decide where the
//! blocking [`engine::LoadedModel::infer`] calls run.

pub mod engine;
pub mod error;
pub mod golden;
pub mod manifest;
pub mod plans;
pub mod sha256;
pub mod stats;
pub mod tensor;
pub mod v2;

pub use engine::{Engine, EngineConfig, LoadedModel};
pub use error::{ErrorCode, ModelError, Result};
pub use manifest::{Manifest, ModelSpec, Variant};
pub use tensor::{Datatype, Tensor, TensorData};

/// The zoo shipped in this repository, for tools and tests run from a checkout.
pub fn default_zoo_dir() -> std::path::PathBuf {
    std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("zoo")
}
