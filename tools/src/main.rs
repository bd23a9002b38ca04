//! `tether`: the developer's and the fleet operator's commands — the demo, the benchmarks, one
//! request through a broker, and fleet management. Parsing and printing only; the work is in
//! the library. Nothing here runs on a device: that is `tether-agent`.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::time::Duration;

use agent::cli::{current_thread, print_stdout, read_stdin};
use agent::config::RawConfig;
use anyhow::{Context, bail};
use clap::{Parser, Subcommand};
use models::{EngineConfig, Manifest, Variant, golden};
use tools::bench::{BenchConfig, bench_model, format_table};

#[derive(Debug, Parser)]
#[command(
    name = "tether",
    version,
    about = "Tether's developer and fleet operator commands: demo, benchmarks, requests, fleet management."
)]
struct Cli {
    /// The model directory holding MANIFEST.toml (default: ./models/zoo, else the build's zoo).
    #[arg(long, global = true, env = "TETHER_MODELS", value_name = "DIR")]
    models: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
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
    /// Sign a document (a JSON object with a `version`) for one target: prints the envelope to
    /// push. A device applies a document only from the topic it was signed for.
    Sign {
        /// `group/NAME` or `device/ID`: where the document may be applied (written into it as
        /// `target`; optional when the document names it already).
        #[arg(long)]
        target: Option<String>,
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
    /// Model rollouts judged by audited samples: start one for a cohort, read the devices'
    /// reports and the rule's verdict, promote it to the whole group or roll it back.
    Rollout {
        #[command(subcommand)]
        action: Box<RolloutAction>,
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

/// Where the broker is and which group's rollout.
#[derive(Debug, clap::Args)]
struct RolloutWhere {
    #[arg(long, default_value = "mqtt://127.0.0.1:1883")]
    broker: String,
    #[arg(long, default_value = "tether")]
    prefix: String,
    /// The devices' group: the rollout goes to {prefix}/fleet/{group}/rollout.
    #[arg(long)]
    group: String,
    /// How long to listen for the retained document and the devices' reports.
    #[arg(long, default_value_t = 2.0, value_name = "SECS")]
    listen: f64,
}

#[derive(Debug, Subcommand)]
enum RolloutAction {
    /// Start a rollout: the cohort shadows the candidate (or, with --serve, answers with it)
    /// while every device of the group audits its answers against the relay's model.
    Start {
        #[command(flatten)]
        at: RolloutWhere,
        /// The model to replace.
        #[arg(long)]
        model: String,
        /// The candidate's version: a candidate in the zoo's MANIFEST.toml, or any version
        /// with --file.
        #[arg(long)]
        version: String,
        /// The candidate's file (its sha256 and size are read from it); default: the zoo's.
        #[arg(long, value_name = "FILE")]
        file: Option<PathBuf>,
        /// Where devices download it; default: the relay's artifact URL under --relay.
        #[arg(long, conflicts_with = "relay")]
        url: Option<String>,
        /// The relay that serves the zoo's candidates: {relay}/v2/models/{model}/versions/{version}/artifact.
        #[arg(long)]
        relay: Option<String>,
        /// The cohort: this share of the group's devices, by a stable hash of the device id.
        #[arg(long, default_value_t = 0.1, conflicts_with = "cohort_group")]
        share: f64,
        /// The cohort: the devices that list this group in fleet.groups.
        #[arg(long)]
        cohort_group: Option<String>,
        /// The cohort answers with the candidate (a canary) instead of shadowing it.
        #[arg(long)]
        serve: bool,
        /// The share of requests the cohort shadows the candidate on.
        #[arg(long, default_value_t = 1.0)]
        shadow_share: f64,
        /// Audited samples each version needs before the rule decides.
        #[arg(long, default_value_t = 200)]
        min_samples: u64,
        /// How far below the serving version's agreement with the cloud the candidate's may be
        /// and still be promoted (0.02: two points).
        #[arg(long, default_value_t = 0.02)]
        margin: f64,
        /// The rollout's id (default: MODEL-VERSION).
        #[arg(long)]
        id: Option<String>,
        /// The private key that signs the document.
        #[arg(long, value_name = "FILE")]
        key: PathBuf,
    },
    /// What the devices report about the rollout in force and what the rule says. With --wait,
    /// until the rule decides; with --apply, then pushes the promotion or the rollback.
    Status {
        #[command(flatten)]
        at: RolloutWhere,
        /// Keep reading the reports until the rule decides, at most this long.
        #[arg(long, value_name = "SECS")]
        wait: Option<f64>,
        /// Push what the rule decided (needs --key).
        #[arg(long, requires = "key")]
        apply: bool,
        #[arg(long, value_name = "FILE")]
        key: Option<PathBuf>,
        /// Print the standing as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Promote the candidate: every device of the group serves it.
    Promote {
        #[command(flatten)]
        at: RolloutWhere,
        #[arg(long, value_name = "FILE")]
        key: PathBuf,
    },
    /// Roll the candidate back: no device runs it.
    Abort {
        #[command(flatten)]
        at: RolloutWhere,
        #[arg(long, value_name = "FILE")]
        key: PathBuf,
    },
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Start a broker, a relay and an agent here, and drive them with a request stream that
    /// rises to three times the agent's local capacity: a live view, then a summary.
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
    /// Fleet management: signing keys, signed documents, publishing them, and a live table of
    /// devices.
    Fleet {
        #[command(subcommand)]
        action: FleetAction,
    },
    /// Write tether-agent's man page and bash, zsh and fish completions into DIR, for the
    /// Debian package (run before `cargo deb`).
    PackageAssets {
        #[arg(long, value_name = "DIR", default_value = "target/assets")]
        out: PathBuf,
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
}

fn main() -> std::process::ExitCode {
    use tracing_subscriber::EnvFilter;
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "info,rumqttd=off,rumqttc=warn".into()),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
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
    let models = cli.models;
    match cli.command {
        Command::Demo {
            seconds,
            policy,
            service_ms,
            budget_ms,
        } => demo(models, seconds, &policy, service_ms, budget_ms),
        Command::BenchEscalation { threshold } => {
            let reports = tools::escalation::run(
                &agent::models_dir(models),
                &["digits", "vibration"],
                &threshold,
            )?;
            print!("{}", tools::escalation::format_table(&reports));
            Ok(())
        }
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
                tools::store_bench::run(&agent::models_dir(models), dir.as_deref(), seconds, sync)?;
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
        Command::Fleet { action } => fleet_command(action, models),
        Command::PackageAssets { out } => {
            for path in tools::package::write_assets(&out)? {
                print_stdout(&path.display().to_string())?;
            }
            Ok(())
        }
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
    let cfg = tools::demo::DemoConfig {
        seconds,
        mode: policy.parse().map_err(anyhow::Error::msg)?,
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
        tools::demo::run(cfg, stop).await
    })?;
    println!(
        "\nSummary (per load step; shares of requests sent; \"in budget\" = answered within {budget_ms:.0} ms):\n{table}"
    );
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
    use tools::loadgen;
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
    let reply = runtime.block_on(tools::client::request(
        addr,
        &topic,
        body,
        Duration::from_millis(timeout_ms),
    ))?;
    print_stdout(&String::from_utf8_lossy(&reply))
}

fn broker_addr(broker: &str) -> anyhow::Result<std::net::SocketAddr> {
    let url =
        url::Url::parse(broker).with_context(|| format!("--broker `{broker}` is not a URL"))?;
    let host = url.host_str().context("--broker names no host")?;
    std::net::ToSocketAddrs::to_socket_addrs(&(host, url.port().unwrap_or(1883)))?
        .next()
        .with_context(|| format!("cannot resolve {host}"))
}

fn fleet_command(action: FleetAction, models: Option<PathBuf>) -> anyhow::Result<()> {
    use agent::fleet::{doc::Document, envelope::SigningKey};
    use tools::operator;
    let sign =
        |key: &std::path::Path, key_name: Option<String>, text: String, target: Option<&str>| {
            let name = key_name.unwrap_or_else(|| {
                key.file_stem()
                    .map_or_else(|| "ops".into(), |s| s.to_string_lossy().into_owned())
            });
            let text = operator::with_target(text, target).map_err(anyhow::Error::msg)?;
            Document::parse(&text)
                .map_err(|e| anyhow::anyhow!("the document is not valid: {e}"))?;
            let key = SigningKey::load(key, name).map_err(anyhow::Error::msg)?;
            anyhow::Ok(serde_json::to_string_pretty(&key.sign(text))?)
        };
    match action {
        FleetAction::Rollout { action } => rollout_command(*action, models, &sign),
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
            target,
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
            let envelope = sign(&key, key_name, text, target.as_deref())?;
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
            let target = match (&group, &device) {
                (Some(g), _) => format!("group/{g}"),
                (None, Some(d)) => format!("device/{d}"),
                (None, None) => bail!("name one of --group or --device"),
            };
            let payload = match key {
                Some(k) => sign(&k, None, text, Some(&target))?,
                None => {
                    let env: agent::fleet::envelope::Envelope = serde_json::from_str(&text)
                        .with_context(|| format!("{} is not a signed envelope; sign it with `tether fleet sign` or pass --key", file.display()))?;
                    let doc = Document::parse(&env.payload)
                        .map_err(|e| anyhow::anyhow!("the signed document is not valid: {e}"))?;
                    if doc.target != target {
                        bail!(
                            "{} was signed for `{}`, so devices would refuse it on the topic of `{target}`; sign it again with --target {target}",
                            file.display(),
                            doc.target
                        );
                    }
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

/// Signs a document: (key file, key name, text, target) to an envelope.
type Signer<'a> =
    dyn Fn(&std::path::Path, Option<String>, String, Option<&str>) -> anyhow::Result<String> + 'a;

fn rollout_command(
    action: RolloutAction,
    models: Option<PathBuf>,
    sign: &Signer<'_>,
) -> anyhow::Result<()> {
    use agent::rollout::{Cohort, Rollout, RolloutState, Rule};
    use tools::rollout::{self as ro, Verdict};
    let gather = |at: &RolloutWhere| -> anyhow::Result<ro::Heard> {
        if !(at.listen.is_finite() && (0.1..=600.0).contains(&at.listen)) {
            bail!("--listen must be 0.1 to 600 seconds, not {}", at.listen);
        }
        let addr = broker_addr(&at.broker)?;
        current_thread()?
            .block_on(ro::gather(
                addr,
                &at.prefix,
                &at.group,
                Duration::from_secs_f64(at.listen),
            ))
            .map_err(anyhow::Error::msg)
    };
    let push = |at: &RolloutWhere, key: &std::path::Path, version: u64, r: &Rollout| {
        let text = ro::document(&at.group, version, r).map_err(anyhow::Error::msg)?;
        let target = format!("rollout/{}", at.group);
        let envelope = sign(key, None, text, Some(&target))?;
        let topic = agent::fleet::doc::DocTopics::rollout(&at.prefix, &at.group);
        let addr = broker_addr(&at.broker)?;
        current_thread()?
            .block_on(tools::operator::push(
                addr,
                &topic,
                envelope.into_bytes(),
                None,
            ))
            .map_err(anyhow::Error::msg)?;
        eprintln!(
            "Published rollout {} ({}) as version {version} on {topic} (retained).",
            r.id,
            r.state.as_str()
        );
        anyhow::Ok(())
    };
    let current = |at: &RolloutWhere| -> anyhow::Result<(u64, Rollout, ro::Heard)> {
        let heard = gather(at)?;
        let Some((version, r)) = heard.current.clone() else {
            bail!(
                "no rollout document is retained for group {} on {}: start one with `tether fleet rollout start`",
                at.group,
                at.broker
            );
        };
        Ok((version, r, heard))
    };
    let promote = matches!(action, RolloutAction::Promote { .. });
    match action {
        RolloutAction::Start {
            at,
            model,
            version,
            file,
            url,
            relay,
            share,
            cohort_group,
            serve,
            shadow_share,
            min_samples,
            margin,
            id,
            key,
        } => {
            let (sha256, bytes) = match &file {
                Some(f) => {
                    let data =
                        std::fs::read(f).with_context(|| format!("cannot read {}", f.display()))?;
                    (
                        models::manifest::sha256_hex(&data),
                        u64::try_from(data.len())?,
                    )
                }
                None => {
                    let manifest = Manifest::load(agent::models_dir(models))?;
                    let c = manifest.candidate(&model, &version).with_context(|| {
                        format!(
                            "the zoo has no candidate {version} of `{model}` ({}); pass --file",
                            manifest
                                .candidates()
                                .iter()
                                .map(|c| format!("{} {}", c.model, c.version))
                                .collect::<Vec<_>>()
                                .join(", ")
                        )
                    })?;
                    (c.sha256.clone(), c.bytes)
                }
            };
            let url = match (url, relay) {
                (Some(u), _) => u,
                (None, Some(r)) => format!(
                    "{}/v2/models/{model}/versions/{version}/artifact",
                    r.trim_end_matches('/')
                ),
                (None, None) => bail!("say where devices download the candidate: --url or --relay"),
            };
            let cohort = match cohort_group {
                Some(group) => Cohort::Group { group },
                None => Cohort::Share { share },
            };
            let rollout = Rollout::parse(&serde_json::json!({
                "id": id.unwrap_or_else(|| format!("{model}-{version}")),
                "model": model,
                "candidate": {"version": version, "sha256": sha256, "url": url, "bytes": bytes},
                "cohort": cohort,
                "serve": serve,
                "shadow_share": shadow_share,
                "state": "running",
                "rule": Rule { min_samples, margin },
            }))
            .map_err(anyhow::Error::msg)?;
            let heard = gather(&at)?;
            if let Some((_, r)) = &heard.current
                && r.state == RolloutState::Running
            {
                bail!(
                    "rollout {} is still running in group {}: promote or abort it first",
                    r.id,
                    at.group
                );
            }
            let next = match heard.current {
                Some((v, _)) => ro::next_version(v).map_err(anyhow::Error::msg)?,
                None => 1,
            };
            push(&at, &key, next, &rollout)
        }
        RolloutAction::Status {
            at,
            wait,
            apply,
            key,
            json,
        } => {
            let until = match wait {
                Some(w) if w.is_finite() && (0.0..=86_400.0).contains(&w) => {
                    Some(std::time::Instant::now() + Duration::from_secs_f64(w))
                }
                Some(w) => bail!("--wait must be 0 to 86400 seconds, not {w}"),
                None => None,
            };
            let (version, rollout, standing) = loop {
                let (version, rollout, heard) = current(&at)?;
                let standing = ro::standing(&at.group, version, &rollout, &heard.reports);
                let waiting = matches!(standing.verdict, Verdict::Pending { .. })
                    && rollout.state == RolloutState::Running
                    && until.is_some_and(|u| std::time::Instant::now() < u);
                if !waiting {
                    break (version, rollout, standing);
                }
                eprintln!(
                    "waiting: {} audited samples of {}, {} of {} (each needs {})",
                    standing.serving.audited,
                    standing.serving_version.as_deref().unwrap_or("?"),
                    standing.candidate.audited,
                    rollout.candidate_version(),
                    rollout.rule.min_samples
                );
            };
            if json {
                print_stdout(&serde_json::to_string_pretty(&standing)?)?;
            } else {
                print_stdout(ro::render(&standing).trim_end())?;
            }
            if apply && rollout.state == RolloutState::Running {
                let key = key.context("--apply needs --key")?;
                let state = match standing.verdict {
                    Verdict::Promote => RolloutState::Promoted,
                    Verdict::RollBack => RolloutState::RolledBack,
                    Verdict::Pending { .. } => {
                        bail!("the rule has not decided yet: nothing pushed")
                    }
                };
                let next = ro::next_version(version).map_err(anyhow::Error::msg)?;
                push(&at, &key, next, &ro::with_state(&rollout, state))?;
            }
            Ok(())
        }
        RolloutAction::Promote { at, key } | RolloutAction::Abort { at, key } => {
            let state = if promote {
                RolloutState::Promoted
            } else {
                RolloutState::RolledBack
            };
            let (version, rollout, _) = current(&at)?;
            let next = ro::next_version(version).map_err(anyhow::Error::msg)?;
            push(&at, &key, next, &ro::with_state(&rollout, state))
        }
    }
}

/// The knobs of `tether bench`.
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
