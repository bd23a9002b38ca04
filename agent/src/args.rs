//! `tether-agent`'s command line, declared with clap: parsed by the binary, and read by the
//! tools crate to generate the shell completions and the man page the Debian package installs
//! (`tether package-assets`), so neither generator is linked into the device binary.

use std::path::PathBuf;

use clap::{Parser, Subcommand};
use models::Variant;

use crate::infer::DEFAULT_TOP_K;

#[derive(Debug, Parser)]
#[command(
    name = "tether-agent",
    version,
    about = "Tether's on-device inference agent."
)]
pub struct Cli {
    /// The model directory holding MANIFEST.toml (default: ./models/zoo, else the build's zoo).
    #[arg(long, global = true, env = "TETHER_MODELS", value_name = "DIR")]
    pub models: Option<PathBuf>,
    #[command(subcommand)]
    pub command: Command,
}

/// Which database the `cache` and `outbox` commands open.
#[derive(Debug, clap::Args)]
pub struct DbArgs {
    /// The database file (default: store.path of the configuration, else found as the service
    /// finds it: $STATE_DIRECTORY, /var/lib/tether, the working directory).
    #[arg(long, global = true, value_name = "PATH")]
    pub db: Option<PathBuf>,
    /// agent.toml, to find the database in (default: $TETHER_CONFIG,
    /// $CONFIGURATION_DIRECTORY/agent.toml, /etc/tether/agent.toml).
    #[arg(long, global = true, value_name = "FILE")]
    pub config: Option<PathBuf>,
}

#[derive(Debug, Subcommand)]
pub enum ConfigAction {
    /// Validate agent.toml with the environment's overrides; print every problem and exit 78
    /// on any.
    Check {
        /// The file (default: found as `run` finds it).
        file: Option<PathBuf>,
    },
    /// Print every key with its default value and what it does: a starting agent.toml.
    Defaults,
}

#[derive(Debug, Subcommand)]
pub enum CacheAction {
    /// Rows and bytes per model, evictions, the file's size.
    Stats {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Delete cached results (all, or one model's).
    Clear {
        #[arg(long)]
        model: Option<String>,
    },
}

#[derive(Debug, Subcommand)]
pub enum OutboxAction {
    /// The waiting messages, oldest first.
    List {
        /// Most messages to list.
        #[arg(long, default_value_t = 50)]
        limit: usize,
        /// Print JSON lines (with payloads) instead of a table.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Connect to an MQTT broker and serve inference requests until SIGINT or SIGTERM.
    Run {
        /// agent.toml; every key is optional (see README.md). Default: $TETHER_CONFIG, else
        /// $CONFIGURATION_DIRECTORY/agent.toml, else /etc/tether/agent.toml, else none.
        #[arg(long, value_name = "FILE")]
        config: Option<PathBuf>,
        #[command(flatten)]
        flags: RunFlags,
    },
    /// Inspect or clear the result cache of an agent's database (the agent may be running).
    Cache {
        #[command(subcommand)]
        action: CacheAction,
        #[command(flatten)]
        db: DbArgs,
    },
    /// Inspect the outbox: messages waiting for the broker.
    Outbox {
        #[command(subcommand)]
        action: OutboxAction,
        #[command(flatten)]
        db: DbArgs,
    },
    /// Check a configuration file, or print the defaults, without starting the agent.
    Config {
        #[command(subcommand)]
        action: ConfigAction,
    },
    /// List the models of the zoo, one line per variant file.
    Models {
        /// Also build every model with tract, to prove it loads.
        #[arg(long)]
        check: bool,
    },
    /// Run one V2 inference request through a local model and print the V2 response.
    Infer {
        /// The model name, as listed by `tether-agent models`.
        #[arg(long)]
        model: String,
        /// A V2 request JSON file, or `-` for stdin (the default when stdin is piped).
        #[arg(long, value_name = "FILE")]
        input: Option<PathBuf>,
        /// Use the zoo's golden request for this model as the input.
        #[arg(long, conflicts_with = "input")]
        example: bool,
        /// Which file of the model to run: device, source or cloud.
        #[arg(long, default_value = "device")]
        variant: Variant,
        /// Classes to list for classifiers.
        #[arg(long, default_value_t = DEFAULT_TOP_K)]
        top: usize,
        /// With --example: compare the outputs to the zoo's golden response (ONNX Runtime's)
        /// and fail if any value differs by more than 1e-4.
        #[arg(long, requires = "example")]
        golden: bool,
    },
}

/// `run`'s flags, which override agent.toml.
#[derive(Debug, Clone, clap::Args)]
pub struct RunFlags {
    /// The broker to connect to: mqtt://host:port or mqtts://host:port.
    #[arg(long, value_name = "URL")]
    pub broker: Option<String>,
    /// Start an in-process MQTT broker on ADDR (MQTT 5 and 3.1.1 on one port) and connect to
    /// it; builds with the `embedded-broker` feature (the default; not the device build).
    #[arg(long, value_name = "ADDR", num_args = 0..=1, default_missing_value = crate::config::DEFAULT_EMBEDDED_LISTEN)]
    pub embedded_broker: Option<String>,
    /// This device's id (default: the hostname).
    #[arg(long)]
    pub device_id: Option<String>,
    /// Inference worker threads (default: one per core).
    #[arg(long)]
    pub workers: Option<usize>,
    /// The agent's SQLite database (default: store.path, else tether.db).
    #[arg(long, value_name = "PATH")]
    pub db: Option<PathBuf>,
    /// The Tether relay to offload to (http:// or https://); without one, every request
    /// runs here.
    #[arg(long, value_name = "URL")]
    pub relay: Option<String>,
    /// The device's relay token, from this file.
    #[arg(long, value_name = "FILE", requires = "relay")]
    pub relay_token_file: Option<PathBuf>,
    /// Serve Prometheus metrics at http://ADDR/metrics.
    #[arg(long, value_name = "ADDR")]
    pub metrics: Option<String>,
    /// Routing policy: local-first, local-only or cloud-first.
    #[arg(long, value_name = "MODE")]
    pub policy: Option<String>,
}
