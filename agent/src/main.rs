//! `tether-agent`: the device's command line — run the agent, and inspect its models, its result
//! cache and its outbox. Parsing and printing only; the work is in the library. The developer's
//! and operator's commands (demo, benchmarks, fleet management) are the `tether` binary of the
//! `tools` crate.

use std::io::IsTerminal;
use std::path::PathBuf;

use agent::args::{CacheAction, Cli, Command, ConfigAction, DbArgs, OutboxAction, RunFlags};
use agent::cli::{current_thread, print_stdout, read_stdin};
use agent::config::RawConfig;
use agent::infer::run_request;
use anyhow::{Context, bail};
use clap::Parser;
use models::v2::InferenceRequest;
use models::{EngineConfig, Manifest, Variant, golden};

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

fn run_agent(
    models: Option<PathBuf>,
    config: Option<PathBuf>,
    flags: RunFlags,
) -> anyhow::Result<()> {
    let load = move || run_config(models.clone(), config.as_deref(), flags.clone());
    let cfg = load()?;
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
        let mut hangups = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
            .context("cannot listen for SIGHUP")?;
        let (started_tx, started_rx) = tokio::sync::oneshot::channel::<agent::Running>();
        // SIGHUP: agent.toml (with the environment and these flags) read again and applied
        // live where it can be; an invalid file changes nothing.
        let reloads = tokio::spawn(async move {
            let Ok(running) = started_rx.await else {
                return;
            };
            while hangups.recv().await.is_some() {
                tracing::info!("SIGHUP received: reading the configuration again.");
                let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Reloading]);
                match load() {
                    Ok(cfg) => {
                        running.reloader.reload(cfg).await;
                    }
                    Err(e) => tracing::error!(
                        error = %format!("{e:#}"),
                        "The configuration read again is not valid; the configuration in force stays."
                    ),
                }
                let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Ready]);
            }
        });
        let result = agent::run(cfg, shutdown, Some(started_tx)).await;
        reloads.abort();
        anyhow::Ok(result?)
    })?;
    Ok(())
}

/// The configuration `run` starts with, and reads again on SIGHUP: the file as discovered,
/// the environment, then the flags.
fn run_config(
    models: Option<PathBuf>,
    config: Option<&std::path::Path>,
    flags: RunFlags,
) -> anyhow::Result<agent::config::Config> {
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
    let config = find_config(config);
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
    Ok(raw.validate(|| hostname::get().ok().and_then(|h| h.into_string().ok()))?)
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
    let file = match action {
        ConfigAction::Defaults => {
            print!("{}", agent::config::DEFAULTS_TOML);
            return Ok(());
        }
        ConfigAction::Check { file } => file,
    };
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
