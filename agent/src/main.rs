//! `tether-agent`: the command line. Parsing and printing only; the work is in the library.

use std::io::{IsTerminal, Read};
use std::path::PathBuf;
use std::time::Duration;

use agent::bench::{BenchConfig, bench_model, format_table};
use agent::config::RawConfig;
use agent::infer::{DEFAULT_TOP_K, run_request};
use anyhow::{Context, bail};
use clap::{Parser, Subcommand};
use models::v2::InferenceRequest;
use models::{EngineConfig, Manifest, Variant, golden};

#[derive(Debug, Parser)]
#[command(
    name = "tether-agent",
    version,
    about = "Tether's on-device inference agent."
)]
struct Cli {
    /// The model directory holding MANIFEST.toml (default: ./models/zoo, else the build's zoo).
    #[arg(long, global = true, env = "TETHER_MODELS", value_name = "DIR")]
    models: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

/// Which database the `cache` and `outbox` commands open.
#[derive(Debug, clap::Args)]
struct DbArgs {
    /// The database file (default: store.path of --config, else tether.db).
    #[arg(long, global = true, value_name = "PATH")]
    db: Option<PathBuf>,
    /// agent.toml, to find the database in.
    #[arg(long, global = true, value_name = "FILE")]
    config: Option<PathBuf>,
}

#[derive(Debug, Subcommand)]
enum FleetAction {
    /// Make an ed25519 signing key: NAME.key (PKCS#8 PEM, private: keep it off the devices) and
    /// NAME.pub; prints the line that makes agents trust it.
    Keygen {
        /// The key's name, as documents and agent.toml's [fleet.keys] name it.
        #[arg(long, default_value = "ops")]
        name: String,
        /// Directory for the two files.
        #[arg(long, default_value = ".")]
        out: PathBuf,
        /// Overwrite existing files.
        #[arg(long)]
        force: bool,
    },
    /// Sign a document (a JSON object with a `version`): prints the envelope to push.
    Sign {
        /// The private key file from `fleet keygen` (or `openssl genpkey -algorithm ed25519`).
        #[arg(long, value_name = "FILE")]
        key: PathBuf,
        /// The key's name (default: the key file's name without `.key`).
        #[arg(long)]
        key_name: Option<String>,
        /// The document, or `-` for stdin.
        document: PathBuf,
        /// Write the envelope here instead of stdout.
        #[arg(long, value_name = "FILE")]
        out: Option<PathBuf>,
    },
    /// Publish a signed document (retained, QoS 1) for a group or one device.
    Push {
        #[arg(long, default_value = "mqtt://127.0.0.1:1883")]
        broker: String,
        #[arg(long, default_value = "tether")]
        prefix: String,
        /// For every device in this group: {prefix}/fleet/{group}/config.
        #[arg(long, required_unless_present = "device", conflicts_with = "device")]
        group: Option<String>,
        /// For this device only: {prefix}/{device}/config (overrides its groups).
        #[arg(long)]
        device: Option<String>,
        /// The envelope from `fleet sign`; with --key, a bare document signed on the way.
        file: PathBuf,
        /// Sign `file` with this key first.
        #[arg(long, value_name = "FILE")]
        key: Option<PathBuf>,
        /// With --device: wait this long for the device's outcome and print it; fails unless
        /// it was applied.
        #[arg(long)]
        wait_secs: Option<u64>,
    },
    /// A live table of the devices heard on the broker: online, configuration version, models,
    /// p99, offload share, last seen, the last update's outcome.
    Status {
        #[arg(long, default_value = "mqtt://127.0.0.1:1883")]
        broker: String,
        #[arg(long, default_value = "tether")]
        prefix: String,
        /// Listen this many seconds, print the table once and exit (default: refresh every two
        /// seconds until Ctrl-C).
        #[arg(long, value_name = "SECS")]
        once: Option<f64>,
        /// With --once: the devices as JSON.
        #[arg(long, requires = "once")]
        json: bool,
    },
}

#[derive(Debug, Subcommand)]
enum CacheAction {
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
enum OutboxAction {
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
enum Command {
    /// Connect to an MQTT broker and serve inference requests until SIGINT or SIGTERM.
    Run {
        /// agent.toml; every key is optional (see README.md).
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
    /// Measure the database: committed writes per second with batched commits against one
    /// commit per write, and what the result cache adds to a request on a hit and on a miss.
    BenchStore {
        /// Measuring time per case.
        #[arg(long, default_value_t = 3.0)]
        seconds: f64,
        /// Where to put the scratch database (default: a temporary directory).
        #[arg(long, value_name = "DIR")]
        dir: Option<PathBuf>,
        /// Durability to measure: normal or full.
        #[arg(long, default_value = "normal")]
        synchronous: String,
    },
    /// Start a broker, a relay and an agent here, and drive them with a request stream that
    /// rises to three times the agent's local capacity: a live view, then a summary.
    #[cfg(feature = "demo")]
    Demo {
        /// End after this many seconds with a summary table (default: run until Ctrl-C).
        #[arg(long)]
        seconds: Option<f64>,
        /// Routing policy: local-first, local-only or cloud-first.
        #[arg(long, default_value = "local-first")]
        policy: String,
        /// How long each local inference is held, standing in for a small device.
        #[arg(long, default_value_t = 10.0)]
        service_ms: f64,
        /// The requests' latency budget.
        #[arg(long, default_value_t = 150.0)]
        budget_ms: f64,
    },
    /// Accuracy of the classifiers on their test splits: device model only, device model with
    /// low-confidence answers escalated to the cloud model, cloud model only.
    BenchEscalation {
        /// Top-1 probability under which an answer is escalated, comma-separated.
        #[arg(long, value_delimiter = ',', default_value = "0.5,0.7,0.9")]
        threshold: Vec<f64>,
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
    /// Fleet management: signing keys, signed documents, publishing them, and a live table of
    /// devices.
    Fleet {
        #[command(subcommand)]
        action: FleetAction,
    },
    /// Send one inference request to an agent through a broker (MQTT v5) and print the reply.
    Request {
        /// The broker: mqtt://host:port.
        #[arg(long, default_value = "mqtt://127.0.0.1:1883")]
        broker: String,
        /// The agent's device id.
        #[arg(long)]
        device_id: String,
        #[arg(long)]
        model: String,
        /// A V2 request JSON file, or `-` for stdin.
        #[arg(long, value_name = "FILE")]
        input: Option<PathBuf>,
        /// Send the zoo's golden request for this model.
        #[arg(long, conflicts_with = "input")]
        example: bool,
        #[arg(long, default_value_t = 10_000)]
        timeout_ms: u64,
    },
    /// Measure round trips through an MQTT broker: an echo responder (the broker alone) and the
    /// agent, at several concurrencies. Starts its own broker and agent unless --broker is given.
    BenchMqtt {
        /// Use this broker (mqtt://host:port) instead of an embedded one; the agent under test
        /// still runs in this process.
        #[arg(long, value_name = "URL")]
        broker: Option<String>,
        /// The model to request.
        #[arg(long, default_value = "digits")]
        model: String,
        /// Concurrent closed-loop requesters, comma-separated.
        #[arg(long, value_delimiter = ',', default_value = "1,8,64")]
        concurrency: Vec<usize>,
        /// Measuring time per concurrency and target.
        #[arg(long, default_value_t = 5.0)]
        seconds: f64,
        /// Inference worker threads of the agent under test (default: one per core).
        #[arg(long)]
        workers: Option<usize>,
    },
    /// Measure latency percentiles and throughput of the local engine.
    Bench {
        /// Models to measure (repeatable; all by default).
        #[arg(long)]
        model: Vec<String>,
        /// Variants to measure, comma-separated: device, source, cloud.
        #[arg(long, value_delimiter = ',', default_value = "device,source")]
        variant: Vec<Variant>,
        /// Rows per call, stacked along the batch axis.
        #[arg(long, default_value_t = 1)]
        batch: usize,
        /// Measuring time per model and variant.
        #[arg(long, default_value_t = 3.0)]
        seconds: f64,
        /// Threads calling each model at once.
        #[arg(long, default_value_t = 1)]
        threads: usize,
        /// Run every batch size on the one symbolic-batch plan instead of a plan specialised to
        /// the batch size (to measure what specialisation buys).
        #[arg(long)]
        generic_plan: bool,
    },
}

fn main() -> std::process::ExitCode {
    use tracing_subscriber::prelude::*;
    use tracing_subscriber::{EnvFilter, fmt, reload};
    let initial = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| "info,rumqttd=off,rumqttc=warn".into());
    let initial_text = initial.to_string();
    // The filter can be swapped at run time: fleet documents may set `log_level`.
    let (filter, handle) = reload::Layer::new(initial);
    tracing_subscriber::registry()
        .with(filter)
        .with(
            fmt::layer()
                .with_writer(std::io::stderr)
                // Colours only on a terminal: logs that go to files and journald stay plain.
                .with_ansi(std::io::stderr().is_terminal()),
        )
        .init();
    agent::set_log_control(std::sync::Arc::new(move |level: Option<&str>| {
        let filter =
            EnvFilter::try_new(level.unwrap_or(&initial_text)).map_err(|e| e.to_string())?;
        handle.reload(filter).map_err(|e| e.to_string())
    }));
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    let models = cli.models;
    match cli.command {
        Command::Run { config, flags } => run_agent(models, config, flags),
        #[cfg(feature = "demo")]
        Command::Demo {
            seconds,
            policy,
            service_ms,
            budget_ms,
        } => demo(models, seconds, &policy, service_ms, budget_ms),
        Command::BenchEscalation { threshold } => {
            let reports = agent::escalation::run(
                &agent::models_dir(models),
                &["digits", "vibration"],
                &threshold,
            )?;
            print!("{}", agent::escalation::format_table(&reports));
            Ok(())
        }
        Command::Cache { action, db } => cache_command(action, &db),
        Command::Outbox { action, db } => outbox_command(action, &db),
        Command::BenchStore {
            seconds,
            dir,
            synchronous,
        } => {
            let sync = match synchronous.as_str() {
                "normal" => agent::config::Synchronous::Normal,
                "full" => agent::config::Synchronous::Full,
                other => bail!("--synchronous is `{other}`; use normal or full"),
            };
            if !(seconds.is_finite() && seconds > 0.0) {
                bail!("--seconds must be a positive number, not {seconds}");
            }
            let report =
                agent::store_bench::run(&agent::models_dir(models), dir.as_deref(), seconds, sync)?;
            println!("{report}");
            Ok(())
        }
        Command::BenchMqtt {
            broker,
            model,
            concurrency,
            seconds,
            workers,
        } => bench_mqtt(models, broker, &model, &concurrency, seconds, workers),
        Command::Models { check } => models_table(&agent::models_dir(models), check),
        Command::Infer {
            model,
            input,
            example,
            variant,
            top,
            golden,
        } => infer(
            &agent::models_dir(models),
            &model,
            input,
            example,
            variant,
            top,
            golden,
        ),
        Command::Fleet { action } => fleet_command(action),
        Command::Request {
            broker,
            device_id,
            model,
            input,
            example,
            timeout_ms,
        } => send_request(
            &agent::models_dir(models),
            &broker,
            &device_id,
            &model,
            input,
            example,
            timeout_ms,
        ),
        Command::Bench {
            model,
            variant,
            batch,
            seconds,
            threads,
            generic_plan,
        } => {
            let settings = BenchSettings {
                batch,
                seconds,
                threads,
                batch_plans: !generic_plan,
            };
            bench(&agent::models_dir(models), model, variant, &settings)
        }
    }
}

fn parse_mode(p: &str) -> anyhow::Result<agent::policy::Mode> {
    Ok(match p {
        "local-first" => agent::policy::Mode::LocalFirst,
        "local-only" => agent::policy::Mode::LocalOnly,
        "cloud-first" => agent::policy::Mode::CloudFirst,
        other => bail!("--policy is `{other}`; use local-first, local-only or cloud-first"),
    })
}

#[cfg(feature = "demo")]
fn demo(
    models: Option<PathBuf>,
    seconds: Option<f64>,
    policy: &str,
    service_ms: f64,
    budget_ms: f64,
) -> anyhow::Result<()> {
    if let Some(s) = seconds
        && !(s.is_finite() && s >= 4.0)
    {
        bail!("--seconds must be at least 4 (one second per load step), not {s}");
    }
    if !(service_ms.is_finite() && service_ms >= 1.0 && budget_ms.is_finite() && budget_ms > 0.0) {
        bail!("--service-ms must be at least 1 and --budget-ms positive");
    }
    let cfg = agent::demo::DemoConfig {
        seconds,
        mode: parse_mode(policy)?,
        service_ms,
        budget_ms,
        models_dir: agent::models_dir(models),
        ..Default::default()
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    let table = runtime.block_on(async {
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = stop.clone();
        tokio::spawn(async move {
            if tokio::signal::ctrl_c().await.is_ok() {
                flag.store(true, std::sync::atomic::Ordering::Relaxed);
            }
        });
        agent::demo::run(cfg, stop).await
    })?;
    println!(
        "\nSummary (per load step; shares of requests sent; \"in budget\" = answered within {budget_ms:.0} ms):\n{table}"
    );
    Ok(())
}

/// `run`'s flags, which override agent.toml.
#[derive(Debug, clap::Args)]
struct RunFlags {
    /// The broker to connect to: mqtt://host:port or mqtts://host:port.
    #[arg(long, value_name = "URL")]
    broker: Option<String>,
    /// Start an in-process MQTT broker on ADDR (MQTT v5; 3.1.1 on the next port) and
    /// connect to it.
    #[arg(long, value_name = "ADDR", num_args = 0..=1, default_missing_value = agent::config::DEFAULT_EMBEDDED_LISTEN)]
    embedded_broker: Option<String>,
    /// This device's id (default: the hostname).
    #[arg(long)]
    device_id: Option<String>,
    /// Inference worker threads (default: one per core).
    #[arg(long)]
    workers: Option<usize>,
    /// The agent's SQLite database (default: store.path, else tether.db).
    #[arg(long, value_name = "PATH")]
    db: Option<PathBuf>,
    /// The Tether relay to offload to (http:// or https://); without one, every request
    /// runs here.
    #[arg(long, value_name = "URL")]
    relay: Option<String>,
    /// The device's relay token, from this file.
    #[arg(long, value_name = "FILE", requires = "relay")]
    relay_token_file: Option<PathBuf>,
    /// Serve Prometheus metrics at http://ADDR/metrics.
    #[arg(long, value_name = "ADDR")]
    metrics: Option<String>,
    /// Routing policy: local-first, local-only or cloud-first.
    #[arg(long, value_name = "MODE")]
    policy: Option<String>,
}

fn run_agent(
    models: Option<PathBuf>,
    config: Option<PathBuf>,
    flags: RunFlags,
) -> anyhow::Result<()> {
    let RunFlags {
        broker,
        embedded_broker,
        device_id,
        workers,
        db,
        relay,
        relay_token_file,
        metrics,
        policy,
    } = flags;
    let mut raw = RawConfig::load(config.as_deref(), |k| std::env::var(k).ok())?;
    if db.is_some() {
        raw.store.path = db;
    }
    if let Some(url) = relay {
        let r = raw
            .relay
            .get_or_insert_with(|| agent::config::RawRelay::new(String::new()));
        r.url = url;
        if relay_token_file.is_some() {
            r.token_file = relay_token_file;
        }
    }
    if metrics.is_some() {
        raw.metrics.listen = metrics;
    }
    if let Some(p) = policy {
        raw.policy.mode = parse_mode(&p)?;
    }
    if models.is_some() {
        raw.models_dir = models;
    }
    if let Some(b) = broker {
        raw.mqtt.broker = b;
    }
    // A broker named on the command line or in the file means: run a broker here, but
    // connect there.
    let broker_given = raw.mqtt.broker != agent::config::RawMqtt::default().broker;
    if let Some(listen) = embedded_broker {
        let b = raw.embedded_broker.get_or_insert_with(Default::default);
        b.listen = listen;
        b.connect = !broker_given;
    }
    if device_id.is_some() {
        raw.device_id = device_id;
    }
    if workers.is_some() {
        raw.inference.workers = workers;
    }
    let cfg = raw.validate(|| hostname::get().ok().and_then(|h| h.into_string().ok()))?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .thread_name("tether-io")
        .build()
        .context("cannot start the async runtime")?;
    runtime.block_on(async {
        // Signals are caught from here on, so a SIGTERM during start-up is not fatal: the
        // agent finishes starting, then stops cleanly.
        let shutdown = shutdown_signal().context("cannot listen for SIGINT and SIGTERM")?;
        anyhow::Ok(agent::run(cfg, shutdown, None).await?)
    })?;
    Ok(())
}

fn bench_mqtt(
    models: Option<PathBuf>,
    broker: Option<String>,
    model: &str,
    concurrency: &[usize],
    seconds: f64,
    workers: Option<usize>,
) -> anyhow::Result<()> {
    use agent::loadgen;
    if !(seconds.is_finite() && seconds > 0.0) {
        bail!("--seconds must be a positive number, not {seconds}");
    }
    let mut raw = RawConfig {
        device_id: Some("bench".into()),
        models_dir: models,
        ..RawConfig::default()
    };
    raw.inference.workers = workers;
    raw.inference.queue = 1024;
    // Every request of the load generator is the same: measure the model, not the cache.
    raw.store.cache.enabled = false;
    let scratch = std::env::temp_dir().join(format!("tether-bench-mqtt-{}", std::process::id()));
    raw.store.path = Some(scratch.join("tether.db"));
    match &broker {
        Some(url) => raw.mqtt.broker = url.clone(),
        None => {
            raw.embedded_broker = Some(agent::config::RawEmbeddedBroker {
                listen: "127.0.0.1:0".into(),
                ..Default::default()
            })
        }
    }
    let cfg = raw.validate(|| None)?;
    let external =
        std::net::ToSocketAddrs::to_socket_addrs(&(cfg.mqtt.host.as_str(), cfg.mqtt.port))
            .ok()
            .and_then(|mut a| a.next());
    let payload = {
        let dir = cfg.models_dir.clone();
        let manifest = models::Manifest::load(&dir)?;
        std::fs::read(golden::request_path(&manifest, model))?
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let (started_tx, started_rx) = tokio::sync::oneshot::channel();
        let agent_task = tokio::spawn(agent::run(
            cfg,
            async move {
                let _ = stop_rx.await;
            },
            Some(started_tx),
        ));
        let running = started_rx
            .await
            .context("the agent under test did not start")?;
        let addr = running
            .embedded_broker
            .map(|b| b.v5)
            .or(external)
            .context("no broker address")?;
        let mut connected = running.connected.clone();
        tokio::time::timeout(Duration::from_secs(10), connected.wait_for(|c| *c))
            .await
            .context("the agent under test did not connect to the broker within 10 s")??;
        let _echo = loadgen::start_echo(addr, "tether").await;
        let duration = Duration::from_secs_f64(seconds);
        let mut reports = Vec::new();
        for &c in concurrency {
            for topic in [
                "tether/echo/infer/echo".to_owned(),
                format!("tether/bench/infer/{model}"),
            ] {
                eprintln!("bench-mqtt: {topic}, concurrency {c}, {seconds} s");
                reports.push(
                    loadgen::run_load(addr, &topic, payload.clone(), c.max(1), duration).await,
                );
            }
        }
        print_stdout(loadgen::format_table(&reports).trim_end())?;
        let _ = stop_tx.send(());
        let _ = agent_task.await;
        anyhow::Ok(())
    })
}

/// Completes on SIGINT (Ctrl-C) or SIGTERM.
/// Resolves on SIGINT or SIGTERM; the handlers are in place as soon as this returns.
fn shutdown_signal() -> std::io::Result<impl std::future::Future<Output = ()>> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut interrupt = signal(SignalKind::interrupt())?;
    let mut terminate = signal(SignalKind::terminate())?;
    Ok(async move {
        tokio::select! {
            _ = interrupt.recv() => tracing::info!("SIGINT received."),
            _ = terminate.recv() => tracing::info!("SIGTERM received."),
        }
    })
}

fn models_table(dir: &std::path::Path, check: bool) -> anyhow::Result<()> {
    let manifest = Manifest::load(dir)?;
    let mut table = format!(
        "{:<10} {:<8} {:<7} {:<5} {:>9}  {:<40} {}",
        "model", "version", "variant", "prec", "size", "inputs", "outputs"
    );
    table.push('\n');
    for spec in manifest.models() {
        let fmt_tensors = |ts: &[models::manifest::TensorSpec]| {
            ts.iter()
                .map(|t| format!("{} {} {}", t.name, t.datatype, t.shape_display()))
                .collect::<Vec<_>>()
                .join(", ")
        };
        for v in &spec.variants {
            manifest.read_verified(v)?;
            table.push_str(&format!(
                "{:<10} {:<8} {:<7} {:<5} {:>9}  {:<40} {}\n",
                spec.name,
                spec.version,
                v.variant,
                v.precision,
                human_size(v.bytes),
                fmt_tensors(&spec.inputs),
                fmt_tensors(&spec.outputs)
            ));
        }
    }
    print_stdout(table.trim_end())?;
    if check {
        for variant in [Variant::Device, Variant::Source, Variant::Cloud] {
            let engine = EngineConfig {
                variant,
                ..EngineConfig::default()
            }
            .build(dir)?;
            eprintln!(
                "{variant}: {} models built with tract",
                engine.models().count()
            );
        }
    }
    Ok(())
}

fn human_size(bytes: u64) -> String {
    #[allow(clippy::cast_precision_loss)]
    let b = bytes as f64;
    if b >= 1024.0 * 1024.0 {
        format!("{:.1} MB", b / 1024.0 / 1024.0)
    } else {
        format!("{:.1} kB", b / 1024.0)
    }
}

fn infer(
    dir: &std::path::Path,
    model: &str,
    input: Option<PathBuf>,
    example: bool,
    variant: Variant,
    top: usize,
    compare_golden: bool,
) -> anyhow::Result<()> {
    let engine = EngineConfig {
        variant,
        only: vec![model.to_owned()],
        ..EngineConfig::default()
    }
    .build(dir)?;
    let request = if example {
        golden::request(engine.manifest(), model)?
    } else {
        let bytes = match input {
            Some(path) if path.as_os_str() != "-" => std::fs::read(&path)
                .with_context(|| format!("cannot read the request file {}", path.display()))?,
            Some(_) => read_stdin()?,
            None if !std::io::stdin().is_terminal() => read_stdin()?,
            None => bail!(
                "no input: pass --input FILE, pipe a V2 request on stdin, or use --example \
                 (the zoo's golden request, {})",
                golden::request_path(engine.manifest(), model).display()
            ),
        };
        InferenceRequest::from_json(&bytes)?
    };
    let response = run_request(engine.model(model)?, &request, top)?;
    if compare_golden {
        let golden = golden::response(engine.manifest(), model, variant)?;
        let mut worst = 0.0f64;
        for want in &golden.outputs {
            let got = response
                .outputs
                .iter()
                .find(|o| o.name == want.name)
                .with_context(|| format!("output `{}` is missing", want.name))?;
            let diff = got.to_tensor()?.max_abs_diff(&want.to_tensor()?);
            worst = worst.max(diff);
        }
        if worst > 1e-4 || worst.is_nan() {
            bail!(
                "{model} ({variant:?}) differs from its golden response by {worst:e}, over the 1e-4 allowed"
            );
        }
        return print_stdout(&format!(
            "{model}: matches the golden response (max abs diff {worst:.2e})"
        ));
    }
    print_stdout(&serde_json::to_string_pretty(&response)?)
}

fn send_request(
    dir: &std::path::Path,
    broker: &str,
    device_id: &str,
    model: &str,
    input: Option<PathBuf>,
    example: bool,
    timeout_ms: u64,
) -> anyhow::Result<()> {
    let addr = broker_addr(broker)?;
    let body = if example {
        let manifest = Manifest::load(dir)?;
        std::fs::read(golden::request_path(&manifest, model))?
    } else {
        match input {
            Some(path) if path.as_os_str() != "-" => std::fs::read(&path)
                .with_context(|| format!("cannot read the request file {}", path.display()))?,
            _ => read_stdin()?,
        }
    };
    let runtime = current_thread()?;
    let topic = format!("tether/{device_id}/infer/{model}");
    let reply = runtime.block_on(agent::client::request(
        addr,
        &topic,
        body,
        Duration::from_millis(timeout_ms),
    ))?;
    print_stdout(&String::from_utf8_lossy(&reply))
}

/// Prints to stdout; a closed pipe (`| head`) is not an error worth a panic.
fn print_stdout(text: &str) -> anyhow::Result<()> {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    match writeln!(out, "{text}").and_then(|()| out.flush()) {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => Err(e.into()),
        _ => Ok(()),
    }
}

fn broker_addr(broker: &str) -> anyhow::Result<std::net::SocketAddr> {
    let url =
        url::Url::parse(broker).with_context(|| format!("--broker `{broker}` is not a URL"))?;
    let host = url.host_str().context("--broker names no host")?;
    std::net::ToSocketAddrs::to_socket_addrs(&(host, url.port().unwrap_or(1883)))?
        .next()
        .with_context(|| format!("cannot resolve {host}"))
}

fn current_thread() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")
}

fn fleet_command(action: FleetAction) -> anyhow::Result<()> {
    use agent::fleet::{doc::Document, envelope::SigningKey, operator};
    let sign = |key: &std::path::Path, key_name: Option<String>, text: String| {
        let name = key_name.unwrap_or_else(|| {
            key.file_stem()
                .map_or_else(|| "ops".into(), |s| s.to_string_lossy().into_owned())
        });
        Document::parse(&text).map_err(|e| anyhow::anyhow!("the document is not valid: {e}"))?;
        let key = SigningKey::load(key, name).map_err(anyhow::Error::msg)?;
        anyhow::Ok(serde_json::to_string_pretty(&key.sign(text))?)
    };
    match action {
        FleetAction::Keygen { name, out, force } => {
            let private = out.join(format!("{name}.key"));
            let public = out.join(format!("{name}.pub"));
            if !force && (private.exists() || public.exists()) {
                bail!(
                    "{} or {} exists already; pass --force to replace them (documents signed with the old key stop verifying)",
                    private.display(),
                    public.display()
                );
            }
            let (pem, hex) = SigningKey::generate().map_err(anyhow::Error::msg)?;
            std::fs::create_dir_all(&out)?;
            {
                use std::io::Write;
                use std::os::unix::fs::OpenOptionsExt;
                let mut f = std::fs::OpenOptions::new()
                    .write(true)
                    .create(true)
                    .truncate(true)
                    .mode(0o600)
                    .open(&private)
                    .with_context(|| format!("cannot write {}", private.display()))?;
                f.write_all(pem.as_bytes())?;
            }
            std::fs::write(&public, format!("{hex}\n"))?;
            eprintln!(
                "Private key: {} (keep it off the devices). Public key: {}.",
                private.display(),
                public.display()
            );
            print_stdout(&format!("[fleet.keys]\n{name} = \"{hex}\""))
        }
        FleetAction::Sign {
            key,
            key_name,
            document,
            out,
        } => {
            let text = if document.as_os_str() == "-" {
                String::from_utf8(read_stdin()?).context("the document is not UTF-8")?
            } else {
                std::fs::read_to_string(&document)
                    .with_context(|| format!("cannot read {}", document.display()))?
            };
            let envelope = sign(&key, key_name, text)?;
            match out {
                Some(path) => std::fs::write(&path, envelope + "\n")
                    .with_context(|| format!("cannot write {}", path.display()))?,
                None => print_stdout(&envelope)?,
            }
            Ok(())
        }
        FleetAction::Push {
            broker,
            prefix,
            group,
            device,
            file,
            key,
            wait_secs,
        } => {
            let text = std::fs::read_to_string(&file)
                .with_context(|| format!("cannot read {}", file.display()))?;
            let payload = match key {
                Some(k) => sign(&k, None, text)?,
                None => {
                    let env: agent::fleet::envelope::Envelope = serde_json::from_str(&text)
                        .with_context(|| format!("{} is not a signed envelope; sign it with `tether-agent fleet sign` or pass --key", file.display()))?;
                    Document::parse(&env.payload)
                        .map_err(|e| anyhow::anyhow!("the signed document is not valid: {e}"))?;
                    text
                }
            };
            let version = serde_json::from_str::<agent::fleet::envelope::Envelope>(&payload)
                .ok()
                .and_then(|e| Document::parse(&e.payload).ok())
                .map_or(0, |d| d.version);
            let topic = operator::document_topic(&prefix, group.as_deref(), device.as_deref())
                .context("name one of --group or --device")?;
            let wait = match (wait_secs, &device) {
                (Some(s), Some(d)) => Some((
                    agent::fleet::doc::DocTopics::status(&prefix, d),
                    version,
                    Duration::from_secs(s),
                )),
                (Some(_), None) => {
                    bail!("--wait-secs needs --device: a group has no single status to wait for")
                }
                _ => None,
            };
            let addr = broker_addr(&broker)?;
            let outcome = current_thread()?
                .block_on(operator::push(addr, &topic, payload.into_bytes(), wait))
                .map_err(anyhow::Error::msg)?;
            eprintln!("Published version {version} on {topic} (retained).");
            if let Some(status) = outcome {
                print_stdout(&serde_json::to_string_pretty(&status)?)?;
                if status.get("state").and_then(|s| s.as_str()) != Some("applied") {
                    bail!(
                        "the device did not apply version {version}: {}",
                        status
                            .get("error")
                            .and_then(|s| s.as_str())
                            .unwrap_or("no reason given")
                    );
                }
            }
            Ok(())
        }
        FleetAction::Status {
            broker,
            prefix,
            once,
            json,
        } => {
            let addr = broker_addr(&broker)?;
            let listen = once.map(Duration::from_secs_f64);
            let live = listen.is_none();
            let board = current_thread()?
                .block_on(async {
                    let watch =
                        operator::watch(addr, &prefix, listen, Duration::from_secs(2), |b| {
                            if live {
                                // Clear the screen and redraw.
                                print!("\x1b[2J\x1b[H{}", b.render(agent::store::now_ms()));
                            }
                        });
                    tokio::select! {
                        r = watch => r,
                        _ = tokio::signal::ctrl_c() => Ok(operator::Board::new(&prefix)),
                    }
                })
                .map_err(anyhow::Error::msg)?;
            if !live {
                if json {
                    let rows: Vec<_> = board.devices.values().collect();
                    print_stdout(&serde_json::to_string_pretty(&rows)?)?;
                } else {
                    print_stdout(board.render(agent::store::now_ms()).trim_end())?;
                }
            }
            Ok(())
        }
    }
}

fn read_stdin() -> anyhow::Result<Vec<u8>> {
    let mut bytes = Vec::new();
    std::io::stdin()
        .read_to_end(&mut bytes)
        .context("cannot read the request from stdin")?;
    Ok(bytes)
}

/// The knobs of `tether-agent bench`.
#[derive(Debug)]
struct BenchSettings {
    batch: usize,
    seconds: f64,
    threads: usize,
    batch_plans: bool,
}

fn bench(
    dir: &std::path::Path,
    models: Vec<String>,
    variants: Vec<Variant>,
    settings: &BenchSettings,
) -> anyhow::Result<()> {
    let BenchSettings {
        batch,
        seconds,
        threads,
        batch_plans,
    } = *settings;
    if !(seconds.is_finite() && seconds > 0.0) {
        bail!("--seconds must be a positive number, not {seconds}");
    }
    let config = BenchConfig {
        batch,
        duration: Duration::from_secs_f64(seconds),
        threads,
        warmup_calls: 3,
    };
    let mut reports = Vec::new();
    for variant in variants {
        let engine = EngineConfig {
            variant,
            only: models.clone(),
            batch_plans,
            ..EngineConfig::default()
        }
        .build(dir)?;
        for model in engine.models() {
            if model.variant().variant != variant {
                continue; // no file of this variant: already measured under another
            }
            eprintln!(
                "bench: {} ({variant}), batch {batch}, {threads} thread(s), {seconds} s",
                model.name()
            );
            reports.push(bench_model(engine.manifest(), model, &config)?);
        }
    }
    print_stdout(format_table(&reports).trim_end())
}

/// The store configuration the `cache` and `outbox` commands use.
fn store_config(args: &DbArgs) -> anyhow::Result<agent::config::StoreConfig> {
    let mut raw = RawConfig::load(args.config.as_deref(), |k| std::env::var(k).ok())?;
    if args.db.is_some() {
        raw.store.path = args.db.clone();
    }
    Ok(raw.validate(|| Some("cli".into()))?.store)
}

/// Opens an agent's database for inspection, runs `f` on it, and closes it.
fn with_store<T>(
    args: &DbArgs,
    f: impl AsyncFnOnce(&agent::store::StoreHandle) -> anyhow::Result<T>,
) -> anyhow::Result<T> {
    let cfg = store_config(args)?;
    let runtime = current_thread()?;
    runtime.block_on(async {
        let (store, thread) = agent::store::open(&cfg, agent::store::OpenMode::Inspect)?;
        let result = f(&store).await;
        store.stop().await;
        thread.join();
        result
    })
}

fn cache_command(action: CacheAction, args: &DbArgs) -> anyhow::Result<()> {
    match action {
        CacheAction::Stats { json } => {
            let report = with_store(args, async |s| Ok(s.report().await?))?;
            if json {
                println!("{}", serde_json::to_string_pretty(&report)?);
                return Ok(());
            }
            println!("database  {}", report.path.display());
            println!("file      {}", human_bytes(report.file_bytes));
            println!(
                "cache     {} results, {} (evicted so far: {})",
                report.cache.rows,
                human_bytes(report.cache.bytes),
                report.cache.evicted
            );
            for m in &report.cache.models {
                println!(
                    "  {:<16} {:>8} results {:>12}",
                    m.model,
                    m.rows,
                    human_bytes(m.bytes)
                );
            }
            println!(
                "outbox    {} messages, {} (dropped so far: {})",
                report.outbox.rows,
                human_bytes(report.outbox.bytes),
                report.outbox.dropped
            );
            println!("history   {} records", report.history_rows);
            Ok(())
        }
        CacheAction::Clear { model } => {
            let n = with_store(args, async |s| Ok(s.cache_clear(model.clone()).await?))?;
            match model {
                Some(m) => println!("Cleared {n} cached results of {m}."),
                None => println!("Cleared {n} cached results."),
            }
            println!(
                "A running agent still answers from its in-memory front (store.cache.memory_entries) until it restarts."
            );
            Ok(())
        }
    }
}

fn outbox_command(action: OutboxAction, args: &DbArgs) -> anyhow::Result<()> {
    let OutboxAction::List { limit, json } = action;
    let (rows, report) = with_store(args, async |s| {
        Ok((s.outbox_rows(limit).await?, s.report().await?))
    })?;
    let now = agent::store::now_ms();
    if json {
        for r in &rows {
            let m = &r.message;
            println!(
                "{}",
                serde_json::json!({
                    "id": r.id,
                    "age_ms": now - r.created_ms,
                    "topic": m.topic,
                    "retain": m.retain,
                    "correlation": m.correlation.as_ref().map(|c| String::from_utf8_lossy(c).into_owned()),
                    "payload": String::from_utf8_lossy(&m.payload),
                })
            );
        }
        return Ok(());
    }
    println!(
        "{} messages waiting ({}), {} dropped so far because the outbox was full.",
        report.outbox.rows,
        human_bytes(report.outbox.bytes),
        report.outbox.dropped
    );
    if !rows.is_empty() {
        println!("{:>10}  {:>10}  {:>9}  topic", "id", "age", "bytes");
    }
    for r in &rows {
        let age = std::time::Duration::from_millis(u64::try_from(now - r.created_ms).unwrap_or(0));
        println!(
            "{:>10}  {:>10}  {:>9}  {}",
            r.id,
            humantime::format_duration(std::time::Duration::from_secs(age.as_secs())).to_string(),
            r.message.payload.len(),
            r.message.topic
        );
    }
    if report.outbox.rows > rows.len() as u64 {
        println!("(first {} shown; --limit N for more)", rows.len());
    }
    Ok(())
}

fn human_bytes(b: u64) -> String {
    if b >= 1 << 20 {
        format!("{:.1} MiB", b as f64 / f64::from(1 << 20))
    } else if b >= 1 << 10 {
        format!("{:.1} KiB", b as f64 / 1024.0)
    } else {
        format!("{b} B")
    }
}
