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
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Address to listen on (default 127.0.0.1:8080).
    #[arg(long, value_name = "ADDR")]
    listen: Option<String>,
    /// Model directory with MANIFEST.toml (default: the zoo's cloud variants).
    #[arg(long, value_name = "DIR", env = "TETHER_RELAY_MODELS")]
    models: Option<PathBuf>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Print the sha256 of a device token, for `[[auth.tokens]]` in relay.toml.
    HashToken {
        /// The token (read from stdin when absent, so it stays out of the shell history).
        token: Option<String>,
    },
}

fn main() -> std::process::ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
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
    let mut raw = RawConfig::load(cli.config.as_deref())?;
    if let Some(listen) = cli.listen {
        raw.listen = listen;
    }
    if cli.models.is_some() {
        raw.models_dir = cli.models;
    }
    let config = raw.validate()?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("relay-io")
        .build()?;
    runtime.block_on(async move {
        let listener = tokio::net::TcpListener::bind(config.listen)
            .await
            .with_context(|| format!("cannot listen on {}", config.listen))?;
        let state = cloud_relay::State::build(config)?;
        cloud_relay::serve(state, listener, shutdown_signal()).await?;
        anyhow::Ok(())
    })
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
