//! `tether-relay`: the command line. Parsing only; the server is in the library.

use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};
use cloud_relay::config::RawConfig;

#[derive(Debug, Parser)]
#[command(
    name = "tether-relay",
    version,
    about = "Tether's cloud relay: an Open Inference Protocol (KServe V2) server."
)]
struct Cli {
    /// relay.toml; every key is optional (see README.md).
    #[arg(long, value_name = "FILE", env = "TETHER_RELAY_CONFIG")]
    config: Option<PathBuf>,
    /// Address to listen on (default 127.0.0.1:8080).
    #[arg(long, value_name = "ADDR", env = "TETHER_RELAY_LISTEN")]
    listen: Option<String>,
    /// Model directory with MANIFEST.toml (default: the zoo's cloud variants).
    #[arg(long, value_name = "DIR", env = "TETHER_RELAY_MODELS")]
    models: Option<PathBuf>,
    #[command(flatten)]
    keys: KeyFlags,
    #[command(subcommand)]
    command: Option<Command>,
}

/// relay.toml keys a deployment sets per environment (a Kubernetes Deployment's `env:`), as
/// flags or environment variables; each overrides the file.
#[derive(Debug, Clone, clap::Args)]
struct KeyFlags {
    /// `variant`: which file of each model to serve (cloud, device or source).
    #[arg(long, value_name = "VARIANT", env = "TETHER_RELAY_VARIANT")]
    variant: Option<String>,
    /// `workers`: inference threads running at once.
    #[arg(long, value_name = "N", env = "TETHER_RELAY_WORKERS")]
    workers: Option<usize>,
    /// `shutdown_grace_ms`: how long a stop may take to drain requests in flight.
    #[arg(long, value_name = "MS", env = "TETHER_RELAY_SHUTDOWN_GRACE_MS")]
    shutdown_grace_ms: Option<u64>,
    /// `limits.max_body_bytes`: the largest request body (413 beyond).
    #[arg(long, value_name = "BYTES", env = "TETHER_RELAY_MAX_BODY_BYTES")]
    max_body_bytes: Option<usize>,
    /// `limits.request_timeout_ms`: each request's deadline, reading its body included.
    #[arg(long, value_name = "MS", env = "TETHER_RELAY_REQUEST_TIMEOUT_MS")]
    request_timeout_ms: Option<u64>,
    /// `limits.header_timeout_ms`: how long a client may take to send its headers.
    #[arg(long, value_name = "MS", env = "TETHER_RELAY_HEADER_TIMEOUT_MS")]
    header_timeout_ms: Option<u64>,
    /// `limits.max_connections`: open connections at most.
    #[arg(long, value_name = "N", env = "TETHER_RELAY_MAX_CONNECTIONS")]
    max_connections: Option<usize>,
    /// `limits.max_parse_bytes`: request bodies parsed at once, in bytes.
    #[arg(long, value_name = "BYTES", env = "TETHER_RELAY_MAX_PARSE_BYTES")]
    max_parse_bytes: Option<usize>,
    /// `auth.rate_limit_rps`: requests per second each device may make.
    #[arg(long, value_name = "RPS", env = "TETHER_RELAY_RATE_LIMIT_RPS")]
    rate_limit_rps: Option<f64>,
    /// `auth.rate_limit_burst`: the burst above it.
    #[arg(long, value_name = "N", env = "TETHER_RELAY_RATE_LIMIT_BURST")]
    rate_limit_burst: Option<f64>,
}

impl KeyFlags {
    /// Sets the keys given on `raw`.
    fn apply(self, raw: &mut RawConfig) {
        let KeyFlags {
            variant,
            workers,
            shutdown_grace_ms,
            max_body_bytes,
            request_timeout_ms,
            header_timeout_ms,
            max_connections,
            max_parse_bytes,
            rate_limit_rps,
            rate_limit_burst,
        } = self;
        if let Some(v) = variant {
            raw.variant = v;
        }
        if workers.is_some() {
            raw.workers = workers;
        }
        if let Some(v) = shutdown_grace_ms {
            raw.shutdown_grace_ms = v;
        }
        if let Some(v) = max_body_bytes {
            raw.limits.max_body_bytes = v;
        }
        if let Some(v) = request_timeout_ms {
            raw.limits.request_timeout_ms = v;
        }
        if let Some(v) = header_timeout_ms {
            raw.limits.header_timeout_ms = v;
        }
        if let Some(v) = max_connections {
            raw.limits.max_connections = v;
        }
        if max_parse_bytes.is_some() {
            raw.limits.max_parse_bytes = max_parse_bytes;
        }
        if let Some(v) = rate_limit_rps {
            raw.auth.rate_limit_rps = v;
        }
        if let Some(v) = rate_limit_burst {
            raw.auth.rate_limit_burst = v;
        }
    }
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Print the sha256 of a device token, for `[[auth.tokens]]` in relay.toml.
    HashToken {
        /// The token (read from stdin when absent, so it stays out of the shell history).
        token: Option<String>,
    },
    /// Measure the relay over HTTP on loopback, batching off and on, against the engine in
    /// process. Starts its own relays on free ports.
    Bench {
        /// Models to measure, comma-separated.
        #[arg(long, value_delimiter = ',', default_value = "digits,vibration")]
        models: Vec<String>,
        /// Concurrent closed-loop clients, comma-separated.
        #[arg(long, value_delimiter = ',', default_value = "1,8,64")]
        concurrency: Vec<usize>,
        /// Measuring time per line.
        #[arg(long, default_value_t = 5.0)]
        seconds: f64,
        /// max_batch_size when batching is on.
        #[arg(long, default_value_t = 8)]
        batch: usize,
    },
}

fn main() -> std::process::ExitCode {
    let filter =
        tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into());
    // JSON lines for log collectors (Kubernetes) on request, plain text otherwise.
    if std::env::var("TETHER_LOG_FORMAT").is_ok_and(|f| f.eq_ignore_ascii_case("json")) {
        tracing_subscriber::fmt()
            .json()
            .with_env_filter(filter)
            .with_writer(std::io::stderr)
            .init();
    } else {
        tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_writer(std::io::stderr)
            .init();
    }
    match run(Cli::parse()) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    if let Some(Command::HashToken { token }) = cli.command {
        let token = match token {
            Some(t) => t,
            None => {
                let mut line = String::new();
                std::io::stdin()
                    .read_line(&mut line)
                    .context("cannot read the token from stdin")?;
                line.trim_end_matches(['\n', '\r']).to_owned()
            }
        };
        anyhow::ensure!(!token.is_empty(), "the token is empty");
        println!("{}", cloud_relay::auth::hash_token(&token));
        return Ok(());
    }
    if let Some(Command::Bench {
        models,
        concurrency,
        seconds,
        batch,
    }) = cli.command
    {
        let mut raw = RawConfig::load(cli.config.as_deref())?;
        if cli.models.is_some() {
            raw.models_dir = cli.models;
        }
        cli.keys.apply(&mut raw);
        return bench(raw, &models, &concurrency, seconds, batch);
    }
    // relay.toml, then the environment and flags: at start, and again on SIGHUP.
    let load = move || -> anyhow::Result<cloud_relay::config::Config> {
        let mut raw = RawConfig::load(cli.config.as_deref())?;
        if let Some(listen) = cli.listen.clone() {
            raw.listen = listen;
        }
        if cli.models.is_some() {
            raw.models_dir = cli.models.clone();
        }
        cli.keys.clone().apply(&mut raw);
        Ok(raw.validate()?)
    };
    let config = load()?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("relay-io")
        .build()?;
    runtime.block_on(async move {
        let listener = tokio::net::TcpListener::bind(config.listen)
            .await
            .with_context(|| format!("cannot listen on {}", config.listen))?;
        let state = cloud_relay::State::build(config)?;
        let mut hangups =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())?;
        let reloading = state.clone();
        // SIGHUP: tokens, rate limits and per-request limits change for the next request; an
        // invalid file changes nothing; keys only a restart applies are named.
        let reloads = tokio::spawn(async move {
            while hangups.recv().await.is_some() {
                match load() {
                    Ok(config) => {
                        let restart = reloading.reload(&config);
                        if !restart.is_empty() {
                            tracing::warn!(keys = %restart.join(", "), "relay.toml changed keys that only a restart applies; they stay as they were until then.");
                        }
                        tracing::info!("relay.toml read again: tokens, rate limits and request limits applied.");
                    }
                    Err(e) => tracing::error!(error = %format!("{e:#}"), "relay.toml read again is not valid; the configuration in force stays."),
                }
            }
        });
        let served = cloud_relay::serve(state, listener, shutdown_signal()).await;
        reloads.abort();
        served?;
        anyhow::Ok(())
    })
}

fn bench(
    raw: RawConfig,
    models: &[String],
    concurrency: &[usize],
    seconds: f64,
    batch: usize,
) -> anyhow::Result<()> {
    use cloud_relay::bench;
    anyhow::ensure!(
        seconds.is_finite() && seconds > 0.0,
        "--seconds must be a positive number, not {seconds}"
    );
    let duration = std::time::Duration::from_secs_f64(seconds);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let mut lines = Vec::new();
    for model in models {
        eprintln!("bench: {model}, engine in process, {seconds} s");
        lines.push(bench::engine_line(&raw, model, duration)?);
    }
    for (mode, max_batch) in [("relay, batching off", 1), ("relay, batching on", batch)] {
        let mut cfg = raw.clone();
        cfg.listen = "127.0.0.1:0".into();
        cfg.batching.max_batch_size = max_batch;
        cfg.batching.queue = cfg.batching.queue.max(1024);
        cfg.auth.tokens.clear();
        let config = cfg.validate()?;
        let mode = format!("{mode} ({max_batch})");
        let more = runtime.block_on(async {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
            let addr = listener.local_addr()?;
            let state = cloud_relay::State::build(config)?;
            let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
            let server = tokio::spawn(cloud_relay::serve(state, listener, async move {
                let _ = stop_rx.await;
            }));
            let mut out = Vec::new();
            for model in models {
                let (body, _) = bench::one_row(&raw, model)?;
                for &c in concurrency {
                    eprintln!("bench: {model}, {mode}, concurrency {c}, {seconds} s");
                    out.push(bench::http_line(addr, model, &mode, body.clone(), c, duration).await);
                }
            }
            let _ = stop_tx.send(());
            let _ = server.await;
            anyhow::Ok(out)
        })?;
        lines.extend(more);
    }
    print!("{}", bench::format_table(&lines));
    Ok(())
}

async fn shutdown_signal() {
    let ctrl_c = async {
        if tokio::signal::ctrl_c().await.is_err() {
            std::future::pending::<()>().await;
        }
    };
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        () = ctrl_c => tracing::info!("SIGINT received."),
        () = term => tracing::info!("SIGTERM received."),
    }
}
