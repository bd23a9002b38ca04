//! Fleet management: signed, versioned configuration and model updates over MQTT, with
//! acknowledgement, automatic rollback, persistence of the last good configuration, telemetry,
//! and the operator's side (`tether-agent fleet keygen | sign | push | status`).
//!
//! An update goes: envelope checked (`envelope`), document parsed and its version checked
//! against the highest taken from that source, documents merged and validated (`doc`), model
//! files fetched and verified (`download`), models loaded — and only then the switch, one
//! pointer swap (`crate::live`). The first local runs after it are the health check (`health`);
//! if they fail, the previous settings come back. Every outcome is published, retained, on
//! `{prefix}/{device_id}/config/status`.

pub mod doc;
pub mod download;
pub mod envelope;
pub mod health;
pub mod telemetry;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use models::manifest::{Variant, VariantSpec};
use models::{Engine, EngineConfig};
use serde::Serialize;
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

use crate::config::{Config, RawConfig};
use crate::live::{Live, Settings, Switch};
use crate::mqtt::{Client, Message};
use crate::pipeline::RunCounters;
use crate::store::{FleetRow, StoreHandle, now_ms};
use doc::{Desired, DocTopics, Document, ModelUpdate, Source};
use download::Fetcher;
use envelope::{Open as _, TrustedKeys};
use health::{HealthRule, Verdict};
use models::engine::LoadedModel;

/// Why a document was not applied, with the sentence its sender reads.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Rejection {
    NotSigned(String),
    UnknownKey(String),
    BadSignature(String),
    BadDocument(String),
    /// Signed for another topic (a group's document replayed as the device's, or another
    /// group's).
    WrongTarget(String),
    /// At or below the version already taken, and not a rollback.
    Stale(String),
    Invalid(String),
    Download(String),
    Checksum(String),
    NoSpace(String),
    /// A new model would not load: the device stays on what it ran.
    LoadFailed(String),
    /// The health check failed after the switch: the device went back.
    Unhealthy(String),
}

impl Rejection {
    pub fn code(&self) -> &'static str {
        match self {
            Rejection::NotSigned(_) => "not_signed",
            Rejection::UnknownKey(_) => "unknown_key",
            Rejection::BadSignature(_) => "bad_signature",
            Rejection::BadDocument(_) => "bad_document",
            Rejection::WrongTarget(_) => "wrong_target",
            Rejection::Stale(_) => "stale_version",
            Rejection::Invalid(_) => "invalid",
            Rejection::Download(_) => "download_failed",
            Rejection::Checksum(_) => "checksum_mismatch",
            Rejection::NoSpace(_) => "no_space",
            Rejection::LoadFailed(_) => "model_load_failed",
            Rejection::Unhealthy(_) => "unhealthy",
        }
    }

    pub fn message(&self) -> &str {
        match self {
            Rejection::NotSigned(m)
            | Rejection::UnknownKey(m)
            | Rejection::BadSignature(m)
            | Rejection::BadDocument(m)
            | Rejection::WrongTarget(m)
            | Rejection::Stale(m)
            | Rejection::Invalid(m)
            | Rejection::Download(m)
            | Rejection::Checksum(m)
            | Rejection::NoSpace(m)
            | Rejection::LoadFailed(m)
            | Rejection::Unhealthy(m) => m,
        }
    }

    /// The health check failed (at load or after the switch): reported as `rolled_back`, and
    /// the version counts as taken so a retained copy is not tried again.
    fn is_health(&self) -> bool {
        matches!(self, Rejection::LoadFailed(_) | Rejection::Unhealthy(_))
    }

    /// Refused before its signature was verified: says nothing about any trusted document, so
    /// it is reported without replacing the retained status.
    fn is_unauthenticated(&self) -> bool {
        matches!(
            self,
            Rejection::NotSigned(_) | Rejection::UnknownKey(_) | Rejection::BadSignature(_)
        )
    }
}

impl std::fmt::Display for Rejection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.message())
    }
}

/// The outcome of one document, as published on the status topic.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum State {
    Applied,
    Rejected,
    RolledBack,
}

/// A status message.
#[derive(Debug, Clone, Serialize)]
pub struct Status {
    pub device_id: String,
    pub source: Option<String>,
    pub version: Option<u64>,
    pub state: State,
    pub code: Option<&'static str>,
    pub error: Option<String>,
    /// The configuration in force after this outcome.
    pub config_version: Option<String>,
    pub ts_ms: i64,
    /// Published retained (the device's standing status). Reports about input that was never
    /// verified are not: junk must not replace what the operator reads.
    #[serde(skip)]
    pub retain: bool,
}

pub use crate::live::LogControl;

/// A document in force, with the envelope it came in.
#[derive(Debug, Clone)]
struct Held {
    doc: Document,
    envelope: Vec<u8>,
}

/// A switch whose health check is running.
#[derive(Debug)]
struct Pending {
    source: Source,
    version: u64,
    since: Instant,
    runs_at_switch: (usize, usize),
    previous: Arc<Settings>,
    previous_desired: Option<Desired>,
    previous_docs: BTreeMap<Source, Held>,
}

/// What the fleet task needs from the rest of the agent.
pub struct FleetContext {
    /// The local configuration (agent.toml), as loaded.
    pub config: Config,
    pub base_raw: RawConfig,
    pub keys: TrustedKeys,
    pub topics: DocTopics,
    /// Puts settings in force (and holds the live settings).
    pub switch: Switch,
    /// The zoo's models as loaded at start: what a document that names no model runs.
    pub base_engine: Engine,
    pub engine_config: EngineConfig,
    pub store: StoreHandle,
    pub fetcher: Fetcher,
    pub runs: Arc<RunCounters>,
    pub health: HealthRule,
}

impl std::fmt::Debug for FleetContext {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FleetContext")
            .field("topics", &self.topics)
            .finish_non_exhaustive()
    }
}

/// The fleet task's state.
#[derive(Debug)]
pub struct Fleet {
    cx: FleetContext,
    in_force: BTreeMap<Source, Held>,
    good: BTreeMap<Source, Held>,
    seen: BTreeMap<Source, u64>,
    /// The last payload per source that was applied or failed its health check: a retained
    /// copy of it arriving again (every reconnection) is not news.
    settled: BTreeMap<Source, Vec<u8>>,
    /// Versions whose health check the agent did not live to finish (taken, never good): when
    /// their retained copy comes again it is reported as rolled back, not tried again (it may
    /// be what stopped the agent).
    interrupted: BTreeMap<Source, u64>,
    desired: Option<Desired>,
    pending: Option<Pending>,
}

impl Fleet {
    pub fn new(cx: FleetContext) -> Fleet {
        Fleet {
            cx,
            in_force: BTreeMap::new(),
            good: BTreeMap::new(),
            seen: BTreeMap::new(),
            settled: BTreeMap::new(),
            interrupted: BTreeMap::new(),
            desired: None,
            pending: None,
        }
    }

    /// The document topics to subscribe to.
    pub fn filters(&self) -> Vec<String> {
        self.cx.topics.filters()
    }

    /// Comes back on the last good configuration saved in the database (before serving, so
    /// a reboot without a broker runs what the fleet last set).
    pub async fn restore(&mut self) {
        let rows = match self.cx.store.fleet_load().await {
            Ok(r) => r,
            Err(e) => {
                tracing::error!(error = %e, "Cannot read the saved fleet configuration; running on agent.toml.");
                return;
            }
        };
        for row in rows {
            let Some(source) = Source::from_label(&row.source) else {
                continue;
            };
            if row.seen > row.good_version.unwrap_or(0) {
                self.interrupted
                    .insert(source.clone(), u64::try_from(row.seen).unwrap_or(0));
            }
            self.seen
                .insert(source.clone(), u64::try_from(row.seen).unwrap_or(0));
            let Some(envelope) = row.envelope else {
                continue;
            };
            let opened = self
                .cx
                .keys
                .open(&envelope)
                .and_then(|p| Document::parse(&p));
            match opened {
                Ok(doc) if doc.target != source.target(&self.cx.config.device_id) => {
                    tracing::warn!(source = %row.source, target = %doc.target, "A saved fleet document was signed for another target; leaving it out.")
                }
                Ok(doc) => {
                    self.good.insert(source, Held { doc, envelope });
                }
                Err(e) => {
                    tracing::warn!(source = %row.source, error = %e, "A saved fleet document no longer verifies (was its key removed?); leaving it out.")
                }
            }
        }
        if self.good.is_empty() {
            return;
        }
        let docs = self.good.clone();
        match self.build(&docs).await {
            Ok((settings, desired)) => {
                let version = settings.config_version.clone();
                self.switch(settings, &desired);
                self.desired = Some(desired);
                self.in_force = docs;
                tracing::info!(
                    config_version = version.as_deref().unwrap_or("local"),
                    "Running the last good fleet configuration, from the database."
                );
            }
            Err(e) => {
                tracing::error!(error = %e, "The saved fleet configuration cannot be applied; running on agent.toml until the next update.");
            }
        }
    }

    /// The configuration version label of a set of documents: `group/lab@3 device@7`.
    fn label(&self, docs: &BTreeMap<Source, Held>) -> Option<String> {
        let mut v: Vec<_> = docs.iter().collect();
        v.sort_by_key(|(s, _)| self.cx.topics.rank(s));
        let parts: Vec<String> = v
            .iter()
            .map(|(s, h)| format!("{}@{}", s.label(), h.doc.version))
            .collect();
        (!parts.is_empty()).then(|| parts.join(" "))
    }

    /// Validates `docs`, fetches and loads their models: everything short of the switch.
    async fn build(&self, docs: &BTreeMap<Source, Held>) -> Result<(Settings, Desired), Rejection> {
        let mut ordered: Vec<(&Source, &Held)> = docs.iter().collect();
        ordered.sort_by_key(|(s, _)| self.cx.topics.rank(s));
        let list: Vec<&Document> = ordered.iter().map(|(_, h)| &h.doc).collect();
        let desired = doc::desired(
            &self.cx.base_raw,
            &self.cx.config.device_id,
            &list,
            self.cx.base_engine.manifest(),
        )?;
        let current = self.cx.switch.live.get();
        let mut changes = Vec::new();
        for (name, entry) in &desired.models {
            let loaded = match entry {
                Some(update) => Some(self.model_for(name, update, &current).await?),
                None => None,
            };
            changes.push((name.clone(), loaded));
        }
        let mut shadows = BTreeMap::new();
        for (name, shadow) in &desired.shadows {
            let model = self.model_for(name, &shadow.model, &current).await?;
            shadows.insert(
                name.clone(),
                crate::live::Shadow {
                    model,
                    share: shadow.share,
                },
            );
        }
        let settings = Settings {
            engine: self.cx.base_engine.with_changes(changes),
            policy: desired.config.policy.clone(),
            cache: desired.config.store.cache.clone(),
            config_version: self.label(docs),
            shadows,
            rollouts: desired.rollouts.clone(),
        };
        Ok((settings, desired))
    }

    /// The model a document's entry names: one already loaded with the same file (serving,
    /// shadowing or in the zoo), else fetched, verified and loaded.
    async fn model_for(
        &self,
        name: &str,
        update: &ModelUpdate,
        current: &Settings,
    ) -> Result<Arc<LoadedModel>, Rejection> {
        let same = |m: &Arc<LoadedModel>| {
            (m.sha256().eq_ignore_ascii_case(&update.sha256) && m.spec().version == update.version)
                .then(|| m.clone())
        };
        if let Some(m) = current
            .engine
            .model(name)
            .ok()
            .and_then(same)
            .or_else(|| current.shadows.get(name).and_then(|s| same(&s.model)))
            .or_else(|| self.cx.base_engine.model(name).ok().and_then(same))
        {
            return Ok(m);
        }
        let path = self.cx.fetcher.fetch(name, update).await?;
        let mut spec = match &update.spec {
            Some(s) => s.clone(),
            None => self
                .cx
                .base_engine
                .manifest()
                .model(name)
                .map_err(|e| Rejection::Invalid(e.to_string()))?
                .clone(),
        };
        spec.version = update.version.clone();
        let variant = VariantSpec {
            variant: Variant::Device,
            file: path.to_string_lossy().into_owned(),
            sha256: update.sha256.to_lowercase(),
            bytes: std::fs::metadata(&path).map_or(0, |m| m.len()),
            precision: spec
                .variant(Variant::Device)
                .map_or_else(|| "unknown".to_owned(), |v| v.precision.clone()),
            parameters: None,
            test_accuracy: None,
        };
        spec.variants = vec![variant.clone()];
        let engine_config = self.cx.engine_config.clone();
        let manifest = self.cx.base_engine.manifest().clone();
        let loaded = tokio::task::spawn_blocking(move || {
            engine_config.load_model(&manifest, &spec, &variant)
        })
        .await
        .map_err(|e| Rejection::LoadFailed(e.to_string()))?
        .map_err(|e| {
            Rejection::LoadFailed(format!(
                "model `{name}` version {} failed its health check: it does not load ({e}); the previous configuration keeps serving",
                update.version
            ))
        })?;
        tracing::info!(model = %name, version = %update.version, "New model loaded.");
        Ok(loaded)
    }

    /// Puts settings in force, with everything that is not read per request.
    fn switch(&self, settings: Settings, desired: &Desired) {
        self.switch_arc(Arc::new(settings), Some(desired));
    }

    fn switch_arc(&self, settings: Arc<Settings>, desired: Option<&Desired>) {
        let config = desired.map_or(&self.cx.config, |d| &d.config);
        let interval = desired
            .and_then(|d| d.telemetry_interval)
            .unwrap_or(config.fleet.telemetry_interval);
        self.cx.switch.apply(
            settings,
            config,
            interval,
            desired.and_then(|d| d.log_level.as_deref()),
        );
    }

    /// agent.toml was read again (SIGHUP): the documents in force are applied again on the
    /// new base, through the same switch, without a health check (no model changes hands).
    /// Only what the switch applies changes: the rest of `config` waits for a restart.
    pub async fn rebase(&mut self, config: Config) {
        self.cx.base_raw = config.raw;
        let docs = self.in_force.clone();
        match self.build(&docs).await {
            Ok((settings, desired)) => {
                self.switch(settings, &desired);
                self.desired = Some(desired);
                tracing::info!("agent.toml applied beneath the fleet documents in force.");
            }
            Err(e) => {
                tracing::error!(error = %e, "agent.toml was read again but cannot be applied beneath the fleet documents in force; the configuration in force stays.");
            }
        }
    }

    fn status(
        &self,
        source: Option<&Source>,
        version: Option<u64>,
        outcome: Result<(), &Rejection>,
    ) -> Status {
        let (state, code, error) = match outcome {
            Ok(()) => (State::Applied, None, None),
            Err(r) if r.is_health() => (
                State::RolledBack,
                Some(r.code()),
                Some(r.message().to_owned()),
            ),
            Err(r) => (
                State::Rejected,
                Some(r.code()),
                Some(r.message().to_owned()),
            ),
        };
        let retain = !outcome.is_err_and(Rejection::is_unauthenticated);
        Status {
            retain,
            device_id: self.cx.config.device_id.clone(),
            source: source.map(Source::label),
            version,
            state,
            code,
            error,
            config_version: self.cx.switch.live.get().config_version.clone(),
            ts_ms: now_ms(),
        }
    }

    /// One message from a document topic, and what to report: nothing for a retained copy of
    /// what is already settled or a cleared topic; otherwise its outcome, preceded by the
    /// outcome of a health check it cut short.
    ///
    /// Nothing that fails verification (signature, target, version) changes any fleet state:
    /// not the running health check, not the versions taken, not the files kept.
    pub async fn handle(&mut self, topic: &str, payload: &[u8]) -> Vec<Status> {
        let Some(source) = self.cx.topics.source_of(topic) else {
            return Vec::new();
        };
        if payload.is_empty() {
            tracing::info!(source = %source.label(), "A fleet document topic was cleared; the configuration in force stays (publish a new version to change it).");
            return Vec::new();
        }
        if self.settled.get(&source).is_some_and(|p| p == payload)
            || self
                .in_force
                .get(&source)
                .is_some_and(|h| h.envelope == payload)
        {
            return Vec::new();
        }
        let doc = match self.verify(&source, payload) {
            Ok(doc) => doc,
            Err((version, r)) => {
                tracing::warn!(source = %source.label(), code = r.code(), error = %r, "Fleet document rejected.");
                return vec![self.status(Some(&source), version, Err(&r))];
            }
        };
        let version = doc.version;
        if self.interrupted.get(&source) == Some(&version) {
            self.interrupted.remove(&source);
            self.settled.insert(source.clone(), payload.to_vec());
            let r = Rejection::Unhealthy(format!(
                "the agent stopped during the health check of version {version} from {}; it came back on the last good configuration (publish a new version to try again)",
                source.label()
            ));
            tracing::warn!(error = %r, "Fleet document not applied again.");
            return vec![self.status(Some(&source), Some(version), Err(&r))];
        }
        let seen = self.seen.get(&source).copied().unwrap_or(0);
        // A verified, applicable document while a health check runs: judge the last switch on
        // what ran so far, and report that before the new outcome.
        let mut out: Vec<Status> = self.settle(true).await.into_iter().collect();
        let mut candidate = self.in_force.clone();
        candidate.insert(
            source.clone(),
            Held {
                doc,
                envelope: payload.to_vec(),
            },
        );
        tracing::info!(source = %source.label(), version, "Applying a fleet document.");
        match self.build(&candidate).await {
            Ok((settings, desired)) => {
                let previous = self.cx.switch.live.get();
                self.switch(settings, &desired);
                let previous_desired = self.desired.replace(desired);
                let previous_docs = std::mem::replace(&mut self.in_force, candidate);
                // The highest version taken stays, after a rollback too: older documents
                // cannot be replayed.
                self.seen.insert(source.clone(), seen.max(version));
                self.settled.insert(source.clone(), payload.to_vec());
                self.pending = Some(Pending {
                    source: source.clone(),
                    version,
                    since: Instant::now(),
                    runs_at_switch: self.cx.runs.read(),
                    previous,
                    previous_desired,
                    previous_docs,
                });
                self.save().await;
                tracing::info!(source = %source.label(), version, config_version = self.cx.switch.live.get().config_version.as_deref().unwrap_or("local"), "Fleet configuration applied; health check running.");
                out.push(self.status(Some(&source), Some(version), Ok(())));
            }
            Err(r) => {
                if r.is_health() {
                    self.seen.insert(source.clone(), seen.max(version));
                    self.save().await;
                }
                // Settled either way: the same document arriving again (every reconnection
                // brings the retained copy) is not tried again; a new version or signature is.
                self.settled.insert(source.clone(), payload.to_vec());
                tracing::warn!(source = %source.label(), version, code = r.code(), error = %r, "Fleet document not applied; the configuration in force keeps serving.");
                out.push(self.status(Some(&source), Some(version), Err(&r)));
            }
        }
        out
    }

    /// The envelope opened, the document parsed, its target and version checked: a document
    /// this device may apply from `source`, or why not (with its version once known).
    fn verify(
        &self,
        source: &Source,
        payload: &[u8],
    ) -> Result<Document, (Option<u64>, Rejection)> {
        let doc = self
            .cx
            .keys
            .open(payload)
            .and_then(|p| Document::parse(&p))
            .map_err(|r| (None, r))?;
        let version = doc.version;
        let expected = source.target(&self.cx.config.device_id);
        if doc.target != expected {
            return Err((
                Some(version),
                Rejection::WrongTarget(format!(
                    "this document was signed for `{}` but arrived on the topic of `{expected}`; sign one for `{expected}` (tether fleet sign --target {expected})",
                    doc.target
                )),
            ));
        }
        let seen = self.seen.get(source).copied().unwrap_or(0);
        if version <= seen && self.interrupted.get(source) != Some(&version) {
            let why = match doc.rollback_from {
                Some(from) if from == seen => None,
                Some(from) => Some(format!(
                    "this rollback replaces version {from}, but the version taken from {} is {seen}: a rollback only replaces the version it names",
                    source.label()
                )),
                None => Some(format!(
                    "version {version} from {} is not newer than version {seen}, already taken; to go back, sign a document with \"rollback\": true and \"rollback_from\": {seen}",
                    source.label()
                )),
            };
            if let Some(why) = why {
                return Err((Some(version), Rejection::Stale(why)));
            }
        }
        Ok(doc)
    }

    /// Judges a running health check; `now` judges it on what ran so far.
    pub async fn settle(&mut self, now: bool) -> Option<Status> {
        let p = self.pending.as_ref()?;
        let (ok, failed) = self.cx.runs.read();
        let (ok, failed) = (ok - p.runs_at_switch.0, failed - p.runs_at_switch.1);
        let elapsed = if now {
            self.cx.health.window
        } else {
            p.since.elapsed()
        };
        match health::verdict(&self.cx.health, ok, failed, elapsed) {
            Verdict::Pending => None,
            Verdict::Healthy => {
                let old_good = std::mem::replace(&mut self.good, self.in_force.clone());
                self.pending = None;
                self.save().await;
                let mut keep = model_files(&self.cx.fetcher, &self.good);
                keep.extend(model_files(&self.cx.fetcher, &old_good));
                self.cx.fetcher.prune(&keep);
                tracing::info!(
                    ok,
                    failed,
                    config_version = self
                        .cx
                        .switch
                        .live
                        .get()
                        .config_version
                        .as_deref()
                        .unwrap_or("local"),
                    "Fleet configuration healthy; saved as the last good one."
                );
                None
            }
            Verdict::Unhealthy => {
                let p = self.pending.take()?;
                self.switch_arc(p.previous.clone(), p.previous_desired.as_ref());
                self.desired = p.previous_desired;
                self.in_force = p.previous_docs;
                let r = Rejection::Unhealthy(format!(
                    "version {} from {} failed its health check: {failed} of the first {} local runs failed (more than {:.0} % allowed); back on the last good configuration",
                    p.version,
                    p.source.label(),
                    ok + failed,
                    self.cx.health.max_error_rate * 100.0
                ));
                tracing::error!(error = %r, "Fleet configuration rolled back.");
                Some(self.status(Some(&p.source), Some(p.version), Err(&r)))
            }
        }
    }

    async fn save(&self) {
        let mut rows: BTreeMap<Source, FleetRow> = BTreeMap::new();
        for (s, v) in &self.seen {
            rows.insert(
                s.clone(),
                FleetRow {
                    source: s.label(),
                    seen: i64::try_from(*v).unwrap_or(i64::MAX),
                    good_version: None,
                    envelope: None,
                },
            );
        }
        for (s, h) in &self.good {
            let row = rows.entry(s.clone()).or_insert_with(|| FleetRow {
                source: s.label(),
                seen: 0,
                good_version: None,
                envelope: None,
            });
            row.good_version = i64::try_from(h.doc.version).ok();
            row.envelope = Some(h.envelope.clone());
        }
        if let Err(e) = self.cx.store.fleet_save(rows.into_values().collect()).await {
            tracing::error!(error = %e, "Cannot save the fleet configuration; after a restart the agent may come back on an older one.");
        }
    }

    /// Runs until `stop`: takes documents in order, acknowledges each once handled, publishes
    /// each outcome, and watches health checks.
    pub async fn run(
        mut self,
        mut rx: mpsc::Receiver<Message>,
        mut reloads: mpsc::Receiver<Config>,
        client: Client,
        stop: CancellationToken,
    ) {
        let status_topic =
            DocTopics::status(&self.cx.config.topic_prefix, &self.cx.config.device_id);
        let mut tick = tokio::time::interval(Duration::from_millis(100));
        loop {
            let status = tokio::select! {
                () = stop.cancelled() => {
                    // A clean stop is no failure: judge a running health check on what ran,
                    // and say so.
                    if let Some(s) = self.settle(true).await {
                        publish_status(&client, &status_topic, &s);
                    }
                    return;
                }
                m = rx.recv() => {
                    let Some(m) = m else { return };
                    let topic = String::from_utf8_lossy(&m.topic).into_owned();
                    let s = self.handle(&topic, &m.payload).await;
                    // Handled (and what it changed saved): the driver acknowledges it.
                    m.ticket.commit();
                    s
                }
                Some(config) = reloads.recv() => {
                    self.rebase(config).await;
                    Vec::new()
                }
                _ = tick.tick() => self.settle(false).await.into_iter().collect(),
            };
            for s in &status {
                publish_status(&client, &status_topic, s);
            }
        }
    }
}

/// Publishes a status: retained when it is the device's standing status, plain otherwise.
fn publish_status(client: &Client, topic: &str, status: &Status) {
    let Ok(body) = serde_json::to_vec(status) else {
        return;
    };
    let sent = if status.retain {
        client.try_publish_retained(topic, body)
    } else {
        client.try_publish_volatile(topic, body)
    };
    if let Err(e) = sent {
        tracing::warn!(error = %e, "Cannot publish the configuration status.");
    }
}

/// The model files a set of documents uses: serving, shadows and rollout candidates.
fn model_files(fetcher: &Fetcher, docs: &BTreeMap<Source, Held>) -> Vec<PathBuf> {
    use serde_json::Value;
    let sha = |v: &Value| v.get("sha256").and_then(Value::as_str).map(str::to_owned);
    let mut out = Vec::new();
    for h in docs.values() {
        if let Some(Value::Object(models)) = h.doc.body.get("models") {
            for (name, entry) in models {
                for s in [sha(entry), entry.get("shadow").and_then(sha)]
                    .into_iter()
                    .flatten()
                {
                    out.push(fetcher.path_for(name, &s));
                }
            }
        }
        if let Some(r) = h.doc.body.get("rollout")
            && let (Some(name), Some(s)) = (
                r.get("model").and_then(Value::as_str),
                r.get("candidate").and_then(sha),
            )
        {
            out.push(fetcher.path_for(name, &s));
        }
    }
    out
}

/// What the telemetry task reads and where it publishes.
pub struct Telemetry {
    pub client: Client,
    /// `{prefix}/{device_id}/telemetry`.
    pub topic: String,
    /// `{prefix}/{device_id}/quality`: the quality report, retained.
    pub quality_topic: String,
    pub device_id: String,
    pub interval: watch::Receiver<Duration>,
    pub load: watch::Receiver<crate::monitor::Load>,
    pub metrics: crate::metrics::Metrics,
    pub counters: Arc<crate::store::Counters>,
    pub live: Live,
    pub sensors: crate::sensors::SensorsView,
    pub quality: Arc<crate::quality::Quality>,
}

impl std::fmt::Debug for Telemetry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Telemetry")
            .field("topic", &self.topic)
            .finish_non_exhaustive()
    }
}

impl Telemetry {
    /// Publishes telemetry and the quality report every interval (which the fleet may change;
    /// 0 pauses both) until `stop`.
    pub async fn run(mut self, stop: CancellationToken) {
        use std::sync::atomic::Ordering::Relaxed;
        let counters = self.counters.clone();
        let mut last_cache = (
            counters.cache_hits.load(Relaxed),
            counters.cache_misses.load(Relaxed),
        );
        loop {
            let every = *self.interval.borrow_and_update();
            let wait = async {
                if every.is_zero() {
                    std::future::pending::<()>().await;
                }
                tokio::time::sleep(every).await;
            };
            tokio::select! {
                () = stop.cancelled() => return,
                r = self.interval.changed() => {
                    if r.is_err() {
                        return;
                    }
                    continue;
                }
                () = wait => {}
            }
            let window = self.metrics.take_window();
            let cache = (
                counters.cache_hits.load(Relaxed),
                counters.cache_misses.load(Relaxed),
            );
            let settings = self.live.get();
            let body = telemetry::message(&telemetry::Inputs {
                device_id: &self.device_id,
                ts_ms: now_ms(),
                interval_secs: every.as_secs_f64(),
                load: *self.load.borrow(),
                window: &window,
                cache_hits: cache.0 - last_cache.0,
                cache_misses: cache.1 - last_cache.1,
                outbox_rows: counters.outbox_rows.load(Relaxed),
                outbox_dropped: counters.outbox_dropped.load(Relaxed),
                config_version: settings.config_version.as_deref(),
                models: settings
                    .engine
                    .models()
                    .map(|m| (m.name().to_owned(), m.spec().version.clone()))
                    .collect(),
                sensors: serde_json::Value::Object(
                    self.sensors
                        .counters
                        .iter()
                        .map(|(k, c)| (k.clone(), c.to_json()))
                        .collect(),
                ),
            });
            last_cache = cache;
            if let Err(e) = self
                .client
                .try_publish_volatile(&self.topic, body.to_string().into_bytes())
            {
                tracing::debug!(error = %e, "Telemetry not sent.");
            }
            let tallies = self.quality.snapshot();
            let report = crate::quality::report(&crate::quality::ReportInputs {
                device_id: &self.device_id,
                ts_ms: now_ms(),
                config_version: settings.config_version.as_deref(),
                serving: settings
                    .engine
                    .models()
                    .map(|m| {
                        (
                            m.name().to_owned(),
                            m.spec().version.clone(),
                            settings.policy.audit_rate(m.name()),
                        )
                    })
                    .collect(),
                shadows: settings
                    .shadows
                    .iter()
                    .map(|(name, s)| (name.clone(), s.model.spec().version.clone(), s.share))
                    .collect(),
                rollouts: &settings.rollouts,
                tallies: &tallies,
                counters: &self.quality.counters,
            });
            if let Err(e) = self
                .client
                .try_publish_retained(&self.quality_topic, report.to_string().into_bytes())
            {
                tracing::debug!(error = %e, "Quality report not sent.");
            }
        }
    }
}
