//! The Tether agent: the device process. `main.rs` is only the command line; each module here
//! owns one responsibility and is testable alone.

pub mod bench;
pub mod infer;

use std::path::PathBuf;

/// Where the model zoo is: the explicit choice, else `./models/zoo` when run from a checkout,
/// else the zoo of the source tree this binary was built from.
pub fn models_dir(explicit: Option<PathBuf>) -> PathBuf {
    if let Some(dir) = explicit {
        return dir;
    }
    let local = PathBuf::from("models/zoo");
    if local.join(models::manifest::MANIFEST_FILE).exists() {
        return local;
    }
    models::default_zoo_dir()
}
