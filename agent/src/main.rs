//! `tether-agent`: the device's command line — run the agent, and inspect its models, its result
//! cache and its outbox. Parsing and printing only; the work is in the library. The developer's
//! and operator's commands (demo, benchmarks, fleet management) are the `tether` binary of the
//! `tools` crate.

use std::io::IsTerminal;
use std::path::PathBuf;

use agent::cli::{current_thread, print_stdout, read_stdin};
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
    /// The database file (default: store.path of the configuration, else found as the service
    /// finds it: $STATE_DIRECTORY, /var/lib/tether, the working directory).
    #[arg(long, global = true, value_name = "PATH")]
    db: Option<PathBuf>,
    /// agent.toml, to find the database in (default: $TETHER_CONFIG,
    /// $CONFIGURATION_DIRECTORY/agent.toml, /etc/tether/agent.toml).
    #[arg(long, global = true, value_name = "FILE")]
    config: Option<PathBuf>,
}

#[derive(Debug, Subcommand)]
enum ConfigAction {
    /// Validate agent.toml with the environment's overrides; print every problem and exit 78
    /// on any.
    Check {
        /// The file (default: found as `run` finds it).
        file: Option<PathBuf>,
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
    /// Check a configuration file without starting the agent.
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

fn main() -> std::process::ExitCode {
    use tracing_subscriber::prelude::*;
    use tracing_subscriber::{EnvFilter, fmt, reload};
    let initial = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| "info,rumqttd=off,rumqttc=warn".into());
    let initial_text = initial.to_string();
    // The filter can be swapped at run time: fleet documents may set `log_level`.
    let (filter, handle) = reload::Layer::new(initial);
    type Output = Box<dyn tracing_subscriber::Layer<tracing_subscriber::Registry> + Send + Sync>;
    // JSON lines on request; the journal, with priorities, when systemd connected stderr to
    // it (it sets JOURNAL_STREAM); plain text otherwise.
    let json = std::env::var("TETHER_LOG_FORMAT").is_ok_and(|f| f.eq_ignore_ascii_case("json"));
    let journal = if json || std::env::var_os("JOURNAL_STREAM").is_none() {
        None
    } else {
        tracing_journald::layer().ok()
    };
    let output: Output = match (json, journal) {
        (true, _) => fmt::layer().json().with_writer(std::io::stderr).boxed(),
        (false, Some(journal)) => journal
            .with_syslog_identifier("tether-agent".into())
            .boxed(),
        (false, None) => fmt::layer()
            .with_writer(std::io::stderr)
            // Colours only on a terminal: logs that go to files stay plain.
            .with_ansi(std::io::stderr().is_terminal())
            .boxed(),
    };
    tracing_subscriber::registry()
        .with(output)
        .with(filter)
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
            std::process::ExitCode::from(agent::exit::code_for(&e))
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    let models = cli.models;
    match cli.command {
        Command::Run { config, flags } => run_agent(models, config, flags),
        Command::Cache { action, db } => cache_command(action, &db),
        Command::Config { action } => config_command(action),
        Command::Outbox { action, db } => outbox_command(action, &db),
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
    }
}

/// `run`'s flags, which override agent.toml.
#[derive(Debug, clap::Args)]
struct RunFlags {
    /// The broker to connect to: mqtt://host:port or mqtts://host:port.
    #[arg(long, value_name = "URL")]
    broker: Option<String>,
    /// Start an in-process MQTT broker on ADDR (MQTT 5 and 3.1.1 on one port) and connect to
    /// it; builds with the `embedded-broker` feature (the default; not the device build).
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
    let config = find_config(config.as_deref());
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
        raw.policy.mode = p
            .parse()
            .map_err(|e| agent::config::ConfigErrors(vec![format!("--policy: {e}")]))?;
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
    // One thread for the MQTT connection, the publisher and the HTTP endpoints: none of them
    // computes, and every request crossing between two runtime threads cost wake-ups (perf:
    // a third of the agent's CPU at one request in flight went to futex and scheduling).
    // The model, the store and the front stage have threads of their own.
    let runtime = tokio::runtime::Builder::new_current_thread()
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

/// The store configuration the `cache` and `outbox` commands use.
/// agent.toml as every subcommand finds it (agent::config::discover), said in the log.
fn find_config(explicit: Option<&std::path::Path>) -> Option<PathBuf> {
    let found =
        agent::config::discover::config_file(explicit, &|k| std::env::var(k).ok(), &|p| p.exists());
    match &found {
        Some(p) => tracing::info!(path = %p.display(), "Configuration file."),
        None => tracing::info!(
            "No configuration file (none given, none in $TETHER_CONFIG, $CONFIGURATION_DIRECTORY or /etc/tether): running on defaults and the environment."
        ),
    }
    found
}

/// `config check`: every problem of a configuration, or that it is valid.
fn config_command(action: ConfigAction) -> anyhow::Result<()> {
    let ConfigAction::Check { file } = action;
    let file = find_config(file.as_deref());
    let raw = RawConfig::load(file.as_deref(), |k| std::env::var(k).ok())?;
    let cfg = raw.validate(|| hostname::get().ok().and_then(|h| h.into_string().ok()))?;
    let name = file.map_or_else(|| "the defaults".to_owned(), |f| f.display().to_string());
    println!(
        "{name}: valid (device {}, broker {}:{}, database {}).",
        cfg.device_id,
        cfg.mqtt.host,
        cfg.mqtt.port,
        cfg.store.path.display()
    );
    Ok(())
}

fn store_config(args: &DbArgs) -> anyhow::Result<agent::config::StoreConfig> {
    let config = find_config(args.config.as_deref());
    let mut raw = RawConfig::load(config.as_deref(), |k| std::env::var(k).ok())?;
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
