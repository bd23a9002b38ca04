//! The agent's SQLite database: result cache, outbox, remembered replies and history, in one
//! WAL-mode file owned by one dedicated thread. Everyone else holds a cheap [`StoreHandle`] and
//! sends it commands; the thread folds every command waiting into one transaction, so a burst
//! of writes costs one commit (group commit). No SQLite call ever runs on an async executor
//! thread.
//!
//! Replies come on a lane of their own, each with its request's delivery [`Ticket`]: once the
//! transaction holding the reply is committed, the ticket tells the MQTT driver to acknowledge
//! the request. That lane never makes a sender wait: it holds at most one reply per request in
//! flight, and the drivers' flow control bounds those.
//!
//! At start-up the file is checked (`PRAGMA quick_check`); a damaged file is moved aside, with
//! an error in the log, and a fresh one created, so a device always comes back up.

pub mod cache;
pub mod outbox;
mod schema;

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicI32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use rusqlite::{Connection, ErrorCode, OptionalExtension, TransactionBehavior, params};
use serde::Serialize;
use tokio::sync::watch;

use crate::config::{StoreConfig, Synchronous};
use crate::ticket::Ticket;
use cache::{CacheKey, Cached, Front};
use outbox::{OutMessage, OutboxRow};

/// Commands waiting for the store thread (replies have a lane of their own); beyond this,
/// senders of events wait and fire-and-forget writes (cache fills, history) are skipped.
const COMMAND_QUEUE: usize = 4096;
/// How often expired cache entries are purged.
const MAINTENANCE_EVERY: Duration = Duration::from_secs(60);
/// Committed rows waiting for the publisher before the rest are left to be loaded.
pub const ROW_FEED: usize = 256;
/// How often the checkpointer copies committed WAL pages into the database file.
const CHECKPOINT_EVERY: Duration = Duration::from_millis(250);
/// WAL frames (pages, 4 KiB each) past which the store thread catches the checkpoint up itself,
/// so the next commit starts the WAL file over: a checkpoint on another connection never
/// finishes while commits keep coming, and the file would grow without end.
const WAL_RESTART_FRAMES: i32 = 4096;

/// Why the store could not do something.
#[derive(Debug, Clone, thiserror::Error)]
pub enum StoreError {
    #[error("cannot open the database {path}: {reason}")]
    Open { path: PathBuf, reason: String },
    #[error(
        "there is no database at {0}; the agent creates it when it first runs (or pass --db PATH)"
    )]
    Missing(PathBuf),
    #[error("the database write failed: {0}")]
    Write(String),
    #[error("the store has stopped")]
    Stopped,
    #[error("the store's queue is full; the write was not made")]
    Busy,
}

impl From<rusqlite::Error> for StoreError {
    fn from(e: rusqlite::Error) -> Self {
        StoreError::Write(e.to_string())
    }
}

/// A reply to store: the message to publish, the ticket of the request it answers (committed
/// with it), and, for a request with an identity, the reply to remember for its duplicates.
#[derive(Debug)]
pub struct Reply {
    pub message: OutMessage,
    pub ticket: Option<Ticket>,
    pub remember: Option<Remember>,
}

/// A reply remembered for de-duplication until `expires_ms`.
#[derive(Debug, Clone)]
pub struct Remember {
    pub key: [u8; 32],
    pub expires_ms: i64,
}

/// Why rows leave the outbox unsent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unsent {
    /// Their requester's expiry passed.
    Expired,
    /// The broker refused them too often.
    Refused,
}

/// Live counters, readable by anyone without a trip to the store thread.
#[derive(Debug, Default)]
pub struct Counters {
    pub outbox_rows: AtomicU64,
    pub outbox_bytes: AtomicU64,
    pub outbox_dropped: AtomicU64,
    /// Replies not published because their requester's expiry had passed (since start).
    pub outbox_expired: AtomicU64,
    /// Messages the broker refused (since start).
    pub outbox_refused: AtomicU64,
    /// Replies remembered for de-duplication.
    pub replies_rows: AtomicU64,
    pub cache_rows: AtomicU64,
    pub cache_bytes: AtomicU64,
    pub cache_hits: AtomicU64,
    pub cache_misses: AtomicU64,
    pub cache_evicted: AtomicU64,
    pub history_rows: AtomicU64,
    pub history_skipped: AtomicU64,
    pub commits: AtomicU64,
    pub writes: AtomicU64,
}

/// One fleet document source's saved state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FleetRow {
    /// `device` or `group/NAME`.
    pub source: String,
    /// The highest version taken from it.
    pub seen: i64,
    /// The version in the last good configuration, and its signed envelope.
    pub good_version: Option<i64>,
    pub envelope: Option<Vec<u8>>,
}

/// Bounds of the cache and the outbox that a fleet update may change.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub cache_max_rows: u64,
    pub cache_max_bytes: u64,
    pub outbox_max_rows: u64,
    pub outbox_max_bytes: u64,
}

/// A sampled request and its result, for the history table.
#[derive(Debug, Clone)]
pub struct HistoryRecord {
    pub ts_ms: i64,
    pub model: String,
    pub model_sha256: String,
    pub input_sha256: [u8; 32],
    /// The canonical input bytes, when the config keeps them.
    pub input: Option<Vec<u8>>,
    pub output: Vec<u8>,
    pub route: String,
    /// The top-1 probability, for classifiers.
    pub confidence: Option<f64>,
}

/// An audited sample: a local answer beside the relay model's answer to the same request.
#[derive(Debug, Clone, PartialEq)]
pub struct AuditRecord {
    pub ts_ms: i64,
    pub model: String,
    pub version: String,
    /// `serving` or `shadow`: which local model answered.
    pub role: &'static str,
    pub local_label: String,
    pub local_p: f64,
    pub cloud_label: String,
    pub cloud_p: f64,
}

/// Per model version: audited samples and how many agreed with the cloud.
pub type AuditTotals = Vec<(String, String, u64, u64)>;

/// What `cache stats` and the status report.
#[derive(Debug, Clone, Serialize)]
pub struct StoreReport {
    pub path: PathBuf,
    pub file_bytes: u64,
    pub schema_version: u32,
    pub outbox: OutboxReport,
    pub cache: CacheReport,
    pub history_rows: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct OutboxReport {
    pub rows: u64,
    pub bytes: u64,
    /// Messages dropped (oldest first) because the outbox was full, ever.
    pub dropped: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct CacheReport {
    pub rows: u64,
    pub bytes: u64,
    /// Results evicted to stay within the bounds, ever.
    pub evicted: u64,
    /// Since this process started.
    pub hits: u64,
    pub misses: u64,
    pub models: Vec<ModelCacheReport>,
}

#[derive(Debug, Clone, Serialize)]
pub struct ModelCacheReport {
    pub model: String,
    pub rows: u64,
    pub bytes: u64,
}

enum Command {
    /// A reply (from the replies lane).
    Reply(Box<Reply>),
    /// An event, to publish through the outbox.
    Append {
        message: OutMessage,
    },
    Load {
        after: i64,
        limit: usize,
        reply: flume::Sender<Result<Vec<OutboxRow>, StoreError>>,
    },
    Delete {
        ids: Vec<i64>,
    },
    Unsent {
        ids: Vec<i64>,
        why: Unsent,
    },
    Remembered {
        key: [u8; 32],
        now_ms: i64,
        reply: flume::Sender<Option<Vec<u8>>>,
    },
    RememberedKeys {
        now_ms: i64,
        reply: flume::Sender<Vec<([u8; 32], i64)>>,
    },
    CacheGet {
        key: CacheKey,
        now_ms: i64,
        reply: flume::Sender<Option<Cached>>,
    },
    CachePut {
        key: CacheKey,
        model: String,
        value: Arc<Vec<u8>>,
        expires_ms: i64,
        now_ms: i64,
    },
    CacheClear {
        model: Option<String>,
        reply: flume::Sender<Result<u64, StoreError>>,
    },
    History(Box<HistoryRecord>),
    Audit(Vec<AuditRecord>),
    AuditTotals {
        reply: flume::Sender<Result<AuditTotals, StoreError>>,
    },
    Report {
        reply: flume::Sender<Result<StoreReport, StoreError>>,
    },
    Flush {
        reply: flume::Sender<()>,
    },
    FleetSave {
        rows: Vec<FleetRow>,
        reply: flume::Sender<Result<(), StoreError>>,
    },
    FleetLoad {
        reply: flume::Sender<Result<Vec<FleetRow>, StoreError>>,
    },
    SetLimits(Limits),
    Stop {
        reply: flume::Sender<()>,
    },
}

/// How a database file is opened.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OpenMode {
    /// The agent: create the file if needed, move a damaged one aside.
    Agent,
    /// The command line inspecting an agent's file: it must exist, and is never moved.
    Inspect,
}

/// The keys of every cached result in the database, so a miss is known without asking it.
/// The store thread removes keys as it deletes rows; a key may linger briefly after a failed
/// write, which costs one lookup, never a wrong answer.
type KeyIndex = Arc<Mutex<HashSet<CacheKey>>>;

/// The cheap handle to the store thread.
#[derive(Debug, Clone)]
pub struct StoreHandle {
    commands_tx: flume::Sender<Command>,
    /// Unbounded in type; holds at most one reply per request in flight.
    replies_tx: flume::Sender<Command>,
    /// Rows as they are committed, for the one publisher (the device driver).
    rows_rx: flume::Receiver<OutboxRow>,
    watermark_rx: watch::Receiver<i64>,
    front: Front,
    index: KeyIndex,
    pub counters: Arc<Counters>,
}

/// The store thread, to wait for after [`StoreHandle::stop`].
#[derive(Debug)]
pub struct StoreThread(Option<JoinHandle<()>>);

impl StoreThread {
    /// Waits for the thread to exit (after a stop).
    pub fn join(mut self) {
        if let Some(t) = self.0.take() {
            let _ = t.join();
        }
    }
}

/// Milliseconds since the Unix epoch (the clock TTLs are kept in).
pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

/// Opens (and in agent mode creates or repairs) the database and starts its thread.
pub fn open(cfg: &StoreConfig, mode: OpenMode) -> Result<(StoreHandle, StoreThread), StoreError> {
    let mut conn = open_connection(&cfg.path, cfg.synchronous, mode)?;
    let counters = Arc::new(Counters::default());
    let keys: HashSet<CacheKey> = conn
        .prepare(schema::CACHE_KEYS)?
        .query_map([], |r| r.get::<_, Vec<u8>>(0))?
        .filter_map(|k| k.ok().and_then(|k| CacheKey::try_from(k.as_slice()).ok()))
        .collect();
    let index: KeyIndex = Arc::new(Mutex::new(keys));
    let checkpointer = match mode {
        OpenMode::Agent => Checkpointer::start(&cfg.path, &mut conn),
        OpenMode::Inspect => None,
    };
    let mut worker = Worker::new(conn, cfg.clone(), counters.clone(), index.clone())?;
    worker.checkpointer = checkpointer;
    let (rows_tx, rows_rx) = flume::bounded(ROW_FEED);
    worker.rows_tx = rows_tx;
    let (watermark_tx, watermark_rx) = watch::channel(worker.last_outbox_id()?);
    let (commands_tx, commands_rx) = flume::bounded(COMMAND_QUEUE);
    let (replies_tx, replies_rx) = flume::unbounded();
    let thread = std::thread::Builder::new()
        .name("store".into())
        .spawn(move || worker.run(&replies_rx, &commands_rx, &watermark_tx))
        .map_err(|e| StoreError::Open {
            path: cfg.path.clone(),
            reason: format!("cannot start the store thread: {e}"),
        })?;
    Ok((
        StoreHandle {
            commands_tx,
            replies_tx,
            rows_rx,
            watermark_rx,
            front: Front::new(cfg.cache.memory_entries, cfg.cache.memory_bytes),
            index,
            counters,
        },
        StoreThread(Some(thread)),
    ))
}

fn open_connection(
    path: &Path,
    sync: Synchronous,
    mode: OpenMode,
) -> Result<Connection, StoreError> {
    if mode == OpenMode::Inspect && !path.exists() {
        return Err(StoreError::Missing(path.to_owned()));
    }
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(|e| StoreError::Open {
            path: path.to_owned(),
            reason: format!("cannot create its directory: {e}"),
        })?;
    }
    match prepare(path, sync) {
        Ok(conn) => Ok(conn),
        Err(e) if mode == OpenMode::Agent && is_damage(&e) => {
            let aside = move_aside(path)?;
            tracing::error!(
                path = %path.display(),
                moved_to = %aside.display(),
                error = %e,
                "The database is damaged; it was moved aside and a fresh one created. Cached results and unsent messages in it are not used."
            );
            prepare(path, sync).map_err(|e| StoreError::Open {
                path: path.to_owned(),
                reason: e.to_string(),
            })
        }
        Err(e) => Err(StoreError::Open {
            path: path.to_owned(),
            reason: match &e {
                Damage::Sql(e) if is_damage_code(e) => format!(
                    "{e}; the file is damaged (the agent moves such a file aside when it starts)"
                ),
                _ => e.to_string(),
            },
        }),
    }
}

#[derive(Debug, thiserror::Error)]
enum Damage {
    #[error(transparent)]
    Sql(#[from] rusqlite::Error),
    #[error("the integrity check failed: {0}")]
    Check(String),
    #[error("the file is from a newer agent (schema version {0}, this agent knows {1})")]
    Newer(u32, usize),
}

fn is_damage_code(e: &rusqlite::Error) -> bool {
    matches!(
        e.sqlite_error_code(),
        Some(ErrorCode::NotADatabase | ErrorCode::DatabaseCorrupt)
    )
}

fn is_damage(e: &Damage) -> bool {
    match e {
        Damage::Sql(e) => is_damage_code(e),
        Damage::Check(_) => true,
        Damage::Newer(..) => false,
    }
}

/// Opens the file, sets WAL mode and durability, checks it, and migrates it.
fn prepare(path: &Path, sync: Synchronous) -> Result<Connection, Damage> {
    let mut conn = Connection::open(path)?;
    conn.busy_timeout(Duration::from_secs(5))?;
    let mode: String = conn.query_row("PRAGMA journal_mode = WAL", [], |r| r.get(0))?;
    if !mode.eq_ignore_ascii_case("wal") {
        tracing::warn!(%mode, "SQLite refused WAL mode; writes will be slower.");
    }
    conn.execute_batch(match sync {
        Synchronous::Normal => "PRAGMA synchronous = NORMAL;",
        Synchronous::Full => "PRAGMA synchronous = FULL;",
    })?;
    let check: String = conn.query_row("PRAGMA quick_check", [], |r| r.get(0))?;
    if check != "ok" {
        return Err(Damage::Check(check));
    }
    let version: u32 = conn.query_row("PRAGMA user_version", [], |r| r.get(0))?;
    if version as usize > schema::MIGRATIONS.len() {
        return Err(Damage::Newer(version, schema::MIGRATIONS.len()));
    }
    for (i, sql) in schema::MIGRATIONS.iter().enumerate().skip(version as usize) {
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        tx.execute_batch(sql)?;
        tx.pragma_update(None, "user_version", i + 1)?;
        tx.commit()?;
        tracing::info!(version = i + 1, "Database schema migrated.");
    }
    conn.set_prepared_statement_cache_capacity(32);
    Ok(conn)
}

/// Renames the file and its WAL companions to `{name}.corrupt-{unix seconds}`.
fn move_aside(path: &Path) -> Result<PathBuf, StoreError> {
    let stamp = now_ms() / 1000;
    let aside = PathBuf::from(format!("{}.corrupt-{stamp}", path.display()));
    let fail = |e: std::io::Error| StoreError::Open {
        path: path.to_owned(),
        reason: format!(
            "the file is damaged and could not be moved aside to {}: {e}",
            aside.display()
        ),
    };
    std::fs::rename(path, &aside).map_err(fail)?;
    for suffix in ["-wal", "-shm"] {
        let companion = PathBuf::from(format!("{}{suffix}", path.display()));
        if companion.exists() {
            std::fs::rename(&companion, format!("{}{suffix}", aside.display())).map_err(fail)?;
        }
    }
    Ok(aside)
}

impl StoreHandle {
    /// Stores a reply; its ticket is committed with it. Never waits.
    pub fn reply(&self, reply: Reply) {
        // A store that has stopped drops the reply, and its ticket releases the request.
        let _ = self.replies_tx.send(Command::Reply(Box::new(reply)));
    }

    /// Writes an event to the outbox. Waits while the store's queue is full: call from a
    /// thread, never the async executor. A failed write is logged by the store.
    pub fn append_event(&self, message: OutMessage) {
        let _ = self.commands_tx.send(Command::Append { message });
    }

    /// Up to `limit` outbox rows with ids above `after`, oldest first.
    pub async fn load(&self, after: i64, limit: usize) -> Result<Vec<OutboxRow>, StoreError> {
        let (reply, rx) = flume::bounded(1);
        self.commands_tx
            .send_async(Command::Load {
                after,
                limit,
                reply,
            })
            .await
            .map_err(|_| StoreError::Stopped)?;
        rx.recv_async().await.map_err(|_| StoreError::Stopped)?
    }

    /// Deletes delivered outbox rows. Gives the ids back when the queue is full.
    pub fn try_delete(&self, ids: Vec<i64>) -> Result<(), Vec<i64>> {
        match self.commands_tx.try_send(Command::Delete { ids }) {
            Ok(()) => Ok(()),
            Err(flume::TrySendError::Full(Command::Delete { ids })) => Err(ids),
            Err(_) => Ok(()),
        }
    }

    /// Deletes outbox rows that will not be sent (expired, refused), counting them. Gives the
    /// ids back when the queue is full.
    pub fn try_unsent(&self, ids: Vec<i64>, why: Unsent) -> Result<(), Vec<i64>> {
        match self.commands_tx.try_send(Command::Unsent { ids, why }) {
            Ok(()) => Ok(()),
            Err(flume::TrySendError::Full(Command::Unsent { ids, .. })) => Err(ids),
            Err(_) => Ok(()),
        }
    }

    /// A remembered reply still valid at `now_ms` (waits for the store thread: call from a
    /// thread).
    pub fn remembered(&self, key: [u8; 32], now_ms: i64) -> Option<Vec<u8>> {
        let (reply, rx) = flume::bounded(1);
        self.commands_tx
            .send(Command::Remembered { key, now_ms, reply })
            .ok()?;
        rx.recv().ok()?
    }

    /// The keys of the replies remembered and their expiry (Unix ms), to index at start.
    pub async fn remembered_keys(&self, now_ms: i64) -> Vec<([u8; 32], i64)> {
        let (reply, rx) = flume::bounded(1);
        if self
            .commands_tx
            .send_async(Command::RememberedKeys { now_ms, reply })
            .await
            .is_err()
        {
            return Vec::new();
        }
        rx.recv_async().await.unwrap_or_default()
    }

    /// The rows committed from now on, as they are committed, for the publisher: at most
    /// [`ROW_FEED`] wait; rows that do not fit are only in the database (the watermark tells).
    pub fn committed_rows(&self) -> flume::Receiver<OutboxRow> {
        self.rows_rx.clone()
    }

    /// Whether the store thread is running.
    pub fn is_alive(&self) -> bool {
        !self.commands_tx.is_disconnected()
    }

    /// The newest committed outbox id, changing as rows are appended.
    pub fn watermark(&self) -> watch::Receiver<i64> {
        self.watermark_rx.clone()
    }

    /// A cached result still valid at `now_ms`: from memory, else from SQLite (waiting for
    /// the store thread: call from a worker thread).
    pub fn cache_get(&self, key: &CacheKey, now_ms: i64) -> Option<Arc<Vec<u8>>> {
        let found = self.front.get(key, now_ms).or_else(|| {
            if !lock(&self.index).contains(key) {
                return None;
            }
            let (reply, rx) = flume::bounded(1);
            self.commands_tx
                .send(Command::CacheGet {
                    key: *key,
                    now_ms,
                    reply,
                })
                .ok()?;
            let cached = rx.recv().ok()??;
            let value = cached.value.clone();
            self.front.put(*key, cached);
            Some(value)
        });
        let counter = if found.is_some() {
            &self.counters.cache_hits
        } else {
            &self.counters.cache_misses
        };
        counter.fetch_add(1, Ordering::Relaxed);
        found
    }

    /// Caches a result for `ttl`. Never waits: when the store is busy the result is only
    /// kept in memory.
    pub fn cache_put(&self, key: CacheKey, model: &str, value: Vec<u8>, ttl: Duration) {
        let now = now_ms();
        let expires_ms = now.saturating_add(i64::try_from(ttl.as_millis()).unwrap_or(i64::MAX));
        let value = Arc::new(value);
        lock(&self.index).insert(key);
        self.front.put(
            key,
            Cached {
                value: value.clone(),
                expires_ms,
            },
        );
        let _ = self.commands_tx.try_send(Command::CachePut {
            key,
            model: model.to_owned(),
            value,
            expires_ms,
            now_ms: now,
        });
    }

    /// Deletes cached results (of one model, or all); returns how many rows went.
    pub async fn cache_clear(&self, model: Option<String>) -> Result<u64, StoreError> {
        self.front.clear();
        let (reply, rx) = flume::bounded(1);
        self.commands_tx
            .send_async(Command::CacheClear { model, reply })
            .await
            .map_err(|_| StoreError::Stopped)?;
        rx.recv_async().await.map_err(|_| StoreError::Stopped)?
    }

    /// Records a sampled request; skipped (and counted) when the store is busy.
    pub fn record(&self, record: HistoryRecord) {
        if self
            .commands_tx
            .try_send(Command::History(Box::new(record)))
            .is_err()
        {
            self.counters
                .history_skipped
                .fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Records audited samples; skipped (and counted) when the store is busy.
    pub fn audit_record(&self, records: Vec<AuditRecord>) {
        if self.commands_tx.try_send(Command::Audit(records)).is_err() {
            self.counters
                .history_skipped
                .fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Per model version, the audited samples recorded and how many agreed with the cloud.
    pub async fn audit_totals(&self) -> Result<AuditTotals, StoreError> {
        let (reply, rx) = flume::bounded(1);
        self.commands_tx
            .send_async(Command::AuditTotals { reply })
            .await
            .map_err(|_| StoreError::Stopped)?;
        rx.recv_async().await.map_err(|_| StoreError::Stopped)?
    }

    pub async fn report(&self) -> Result<StoreReport, StoreError> {
        let (reply, rx) = flume::bounded(1);
        self.commands_tx
            .send_async(Command::Report { reply })
            .await
            .map_err(|_| StoreError::Stopped)?;
        rx.recv_async().await.map_err(|_| StoreError::Stopped)?
    }

    /// Replaces the fleet's saved state; returns once it is committed.
    pub async fn fleet_save(&self, rows: Vec<FleetRow>) -> Result<(), StoreError> {
        let (reply, rx) = flume::bounded(1);
        self.commands_tx
            .send_async(Command::FleetSave { rows, reply })
            .await
            .map_err(|_| StoreError::Stopped)?;
        rx.recv_async().await.map_err(|_| StoreError::Stopped)?
    }

    /// The fleet's saved state.
    pub async fn fleet_load(&self) -> Result<Vec<FleetRow>, StoreError> {
        let (reply, rx) = flume::bounded(1);
        self.commands_tx
            .send_async(Command::FleetLoad { reply })
            .await
            .map_err(|_| StoreError::Stopped)?;
        rx.recv_async().await.map_err(|_| StoreError::Stopped)?
    }

    /// New bounds for the cache and the outbox (a fleet update); applied at once.
    pub async fn set_limits(&self, limits: Limits) {
        let _ = self
            .commands_tx
            .send_async(Command::SetLimits(limits))
            .await;
    }

    /// Waits until everything sent before is committed.
    pub async fn flush(&self) {
        let (reply, rx) = flume::bounded(1);
        if self
            .commands_tx
            .send_async(Command::Flush { reply })
            .await
            .is_ok()
        {
            let _ = rx.recv_async().await;
        }
    }

    /// The blocking form of [`StoreHandle::flush`], for threads.
    pub fn flush_blocking(&self) {
        let (reply, rx) = flume::bounded(1);
        if self.commands_tx.send(Command::Flush { reply }).is_ok() {
            let _ = rx.recv();
        }
    }

    /// Commits what is queued and stops the thread; later commands fail with `Stopped`.
    pub async fn stop(&self) {
        let (reply, rx) = flume::bounded(1);
        if self
            .commands_tx
            .send_async(Command::Stop { reply })
            .await
            .is_ok()
        {
            let _ = rx.recv_async().await;
        }
    }

    /// Outbox rows, oldest first, for `outbox list` (the agent may be running).
    pub async fn outbox_rows(&self, limit: usize) -> Result<Vec<OutboxRow>, StoreError> {
        self.load(0, limit).await
    }
}

/// Copies committed WAL pages into the database file on a thread of its own (a PASSIVE
/// checkpoint, which never blocks the writer), so the fsync a checkpoint takes rarely lands in a
/// commit that a request waits for. SQLite's own checkpoint, off for the agent's connection,
/// runs inside the commit that takes the WAL past 1000 pages.
///
/// A checkpoint on another connection never catches up with a writer that commits all the
/// time, and SQLite starts the WAL file over only once one has: so when the WAL passes
/// [`WAL_RESTART_FRAMES`], the store thread checkpoints between two batches itself (what is
/// left since the last pass: little), and the next commit starts the file over.
#[derive(Debug)]
struct Checkpointer {
    stop_tx: flume::Sender<()>,
    thread: JoinHandle<()>,
    /// Frames in the WAL after the last commit (SQLite's WAL hook).
    wal_frames: Arc<AtomicI32>,
}

impl Checkpointer {
    /// Starts it, and turns the automatic checkpoint of `conn` off; `None` (the automatic
    /// checkpoint stays) if it cannot start.
    fn start(path: &Path, conn: &mut Connection) -> Option<Checkpointer> {
        let own =
            Connection::open(path).and_then(|c| c.busy_timeout(Duration::from_secs(5)).map(|()| c));
        let own = match own {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(error = %e, "Cannot open a second connection for checkpoints; SQLite checkpoints within commits.");
                return None;
            }
        };
        let (stop_tx, stop_rx) = flume::bounded::<()>(1);
        let thread = std::thread::Builder::new()
            .name("checkpoint".into())
            .spawn(move || {
                while let Err(flume::RecvTimeoutError::Timeout) =
                    stop_rx.recv_timeout(CHECKPOINT_EVERY)
                {
                    if let Err(e) = own.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |_| Ok(()))
                    {
                        tracing::warn!(error = %e, "A WAL checkpoint failed; the next one tries again.");
                    }
                }
            })
            .ok()?;
        if let Err(e) = conn.pragma_update(None, "wal_autocheckpoint", 0) {
            tracing::warn!(error = %e, "Cannot hand checkpoints to their own thread.");
        }
        // A WAL that grew past twice the restart point (a burst while catching up was busy)
        // is cut back when it starts over.
        let limit = i64::from(WAL_RESTART_FRAMES) * 2 * 4096;
        if let Err(e) = conn.pragma_update(None, "journal_size_limit", limit) {
            tracing::warn!(error = %e, "Cannot bound the WAL file's size.");
        }
        // After wal_autocheckpoint, which replaces the WAL hook with its own.
        let wal_frames = Arc::new(AtomicI32::new(0));
        let frames = wal_frames.clone();
        let hooked = conn.wal_hook(Some(move |_: &mut rusqlite::hooks::Wal, pages: i32| {
            frames.store(pages, Ordering::Relaxed);
            Ok(())
        }));
        if let Err(e) = hooked {
            tracing::warn!(error = %e, "Cannot watch the WAL's size; SQLite checkpoints within commits.");
            let _ = conn.pragma_update(None, "wal_autocheckpoint", 1000);
            drop(stop_tx);
            let _ = thread.join();
            return None;
        }
        Some(Checkpointer {
            stop_tx,
            thread,
            wal_frames,
        })
    }

    /// Checkpoints on the writer's connection, between two transactions, once the WAL is past
    /// [`WAL_RESTART_FRAMES`]: with every frame copied, the next commit starts the WAL over.
    fn catch_up(&self, conn: &Connection) {
        if self.wal_frames.load(Ordering::Relaxed) < WAL_RESTART_FRAMES {
            return;
        }
        let started = Instant::now();
        let result = conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |r| {
            Ok((
                r.get::<_, i64>(0)?,
                r.get::<_, i64>(1)?,
                r.get::<_, i64>(2)?,
            ))
        });
        tracing::debug!(took = ?started.elapsed(), result = ?result, "Caught the WAL checkpoint up.");
        match result {
            // Every frame is in the database file: the next commit restarts the WAL.
            Ok((0, log, done)) if log == done => self.wal_frames.store(0, Ordering::Relaxed),
            // The checkpointer was busy at the same moment; the next batch tries again.
            Ok(_) => {}
            Err(e) => {
                tracing::warn!(error = %e, "A WAL checkpoint failed; the next batch tries again.")
            }
        }
    }

    fn stop(self) {
        drop(self.stop_tx);
        let _ = self.thread.join();
    }
}

/// The store thread: the connection, and the rest of its state (kept apart so a transaction
/// on the one can run beside borrows of the other).
struct Worker {
    conn: Connection,
    state: State,
    checkpointer: Option<Checkpointer>,
    /// Rows just committed, for the publisher.
    rows_tx: flume::Sender<OutboxRow>,
}

struct State {
    cfg: StoreConfig,
    counters: Arc<Counters>,
    index: KeyIndex,
    last_outbox_id: i64,
}

fn lock(index: &KeyIndex) -> std::sync::MutexGuard<'_, HashSet<CacheKey>> {
    index.lock().unwrap_or_else(|p| p.into_inner())
}

/// What to do once a batch is committed (or rolled back).
enum After {
    Committed(Ticket),
    Flushed(flume::Sender<()>),
    Saved(flume::Sender<Result<(), StoreError>>),
}

impl Worker {
    fn new(
        conn: Connection,
        cfg: StoreConfig,
        counters: Arc<Counters>,
        index: KeyIndex,
    ) -> Result<Worker, StoreError> {
        let (rows_tx, _) = flume::bounded(0);
        let mut w = Worker {
            conn,
            checkpointer: None,
            rows_tx,
            state: State {
                cfg,
                counters,
                index,
                last_outbox_id: 0,
            },
        };
        w.reload_totals()?;
        w.state.last_outbox_id = w.last_outbox_id()?;
        Ok(w)
    }

    fn last_outbox_id(&self) -> Result<i64, StoreError> {
        // The sequence, not MAX(id): an outbox emptied by deliveries keeps counting up.
        Ok(self.conn.query_row(schema::OUTBOX_SEQ, [], |r| r.get(0))?)
    }

    fn reload_totals(&mut self) -> Result<(), StoreError> {
        let (rows, bytes): (u64, u64) = self
            .conn
            .query_row(schema::OUTBOX_TOTALS, [], |r| Ok((r.get(0)?, r.get(1)?)))?;
        self.state
            .counters
            .outbox_rows
            .store(rows, Ordering::Relaxed);
        self.state
            .counters
            .outbox_bytes
            .store(bytes, Ordering::Relaxed);
        let (rows, bytes): (u64, u64) = self
            .conn
            .query_row(schema::CACHE_TOTALS, [], |r| Ok((r.get(0)?, r.get(1)?)))?;
        self.state
            .counters
            .cache_rows
            .store(rows, Ordering::Relaxed);
        self.state
            .counters
            .cache_bytes
            .store(bytes, Ordering::Relaxed);
        let history: u64 = self
            .conn
            .query_row(schema::HISTORY_COUNT, [], |r| r.get(0))?;
        self.state
            .counters
            .history_rows
            .store(history, Ordering::Relaxed);
        let replies: u64 = self.conn.query_row(schema::REPLY_COUNT, [], |r| r.get(0))?;
        self.state
            .counters
            .replies_rows
            .store(replies, Ordering::Relaxed);
        let dropped: u64 =
            self.conn
                .query_row(schema::COUNTER_GET, [schema::OUTBOX_DROPPED], |r| r.get(0))?;
        self.state
            .counters
            .outbox_dropped
            .store(dropped, Ordering::Relaxed);
        let evicted: u64 =
            self.conn
                .query_row(schema::COUNTER_GET, [schema::CACHE_EVICTED], |r| r.get(0))?;
        self.state
            .counters
            .cache_evicted
            .store(evicted, Ordering::Relaxed);
        Ok(())
    }

    fn run(
        &mut self,
        replies_rx: &flume::Receiver<Command>,
        commands_rx: &flume::Receiver<Command>,
        watermark_tx: &watch::Sender<i64>,
    ) {
        let mut last_maintenance = Instant::now();
        loop {
            let mut batch = Vec::new();
            let first = flume::Selector::new()
                .recv(replies_rx, Result::ok)
                .recv(commands_rx, Result::ok)
                .wait_timeout(MAINTENANCE_EVERY);
            match first {
                Ok(Some(c)) => batch.push(c),
                Ok(None) if replies_rx.is_disconnected() && commands_rx.is_disconnected() => {
                    return;
                }
                Ok(None) | Err(flume::select::SelectError::Timeout) => {}
            }
            // Everything waiting joins this transaction: replies first, they hold requests.
            while batch.len() < self.state.cfg.max_batch {
                match replies_rx.try_recv().or_else(|_| commands_rx.try_recv()) {
                    Ok(c) => batch.push(c),
                    Err(_) => break,
                }
            }
            let maintain = last_maintenance.elapsed() >= MAINTENANCE_EVERY;
            if maintain {
                last_maintenance = Instant::now();
            }
            let stop = self.apply(batch, maintain, watermark_tx);
            if let Some(c) = &self.checkpointer {
                c.catch_up(&self.conn);
            }
            if let Some(reply) = stop {
                if let Some(c) = self.checkpointer.take() {
                    c.stop();
                }
                let _ = self.conn.execute_batch("PRAGMA wal_checkpoint(TRUNCATE);");
                let _ = reply.send(());
                return;
            }
        }
    }

    /// Runs one batch in one transaction. Returns the stop reply if the batch held a stop.
    fn apply(
        &mut self,
        batch: Vec<Command>,
        maintain: bool,
        watermark_tx: &watch::Sender<i64>,
    ) -> Option<flume::Sender<()>> {
        let mut after = Vec::new();
        let mut pushed: Vec<OutboxRow> = Vec::new();
        let mut stop = None;
        let mut writes = 0u64;
        let last_id_before = self.state.last_outbox_id;
        // BEGIN and COMMIT as cached statements: parsed once, not per batch.
        let result = (|| -> Result<(), rusqlite::Error> {
            self.conn.prepare_cached(schema::BEGIN)?.execute([])?;
            let tx = &self.conn;
            let mut appended = false;
            let mut cached = false;
            let mut remembered = false;
            for cmd in batch {
                match cmd {
                    Command::Reply(reply) => {
                        let Reply {
                            message,
                            ticket,
                            remember,
                        } = *reply;
                        if let Some(r) = &remember {
                            self.state.remember(tx, r, &message.payload)?;
                            remembered = true;
                        }
                        pushed.push(self.state.append(tx, message)?);
                        if let Some(t) = ticket {
                            after.push(After::Committed(t));
                        }
                        appended = true;
                        writes += 1;
                    }
                    Command::Append { message } => {
                        pushed.push(self.state.append(tx, message)?);
                        appended = true;
                        writes += 1;
                    }
                    Command::Unsent { ids, why } => {
                        let n = self.state.delete_rows(tx, &ids)?;
                        let counter = match why {
                            Unsent::Expired => &self.state.counters.outbox_expired,
                            Unsent::Refused => &self.state.counters.outbox_refused,
                        };
                        counter.fetch_add(n, Ordering::Relaxed);
                        writes += n;
                    }
                    Command::Remembered { key, now_ms, reply } => {
                        let body: Option<Vec<u8>> = tx
                            .prepare_cached(schema::REPLY_GET)?
                            .query_row(params![&key[..], now_ms], |r| r.get(0))
                            .optional()?;
                        let _ = reply.send(body);
                    }
                    Command::RememberedKeys { now_ms, reply } => {
                        let keys = tx
                            .prepare_cached(schema::REPLY_KEYS)?
                            .query_map([now_ms], |r| {
                                Ok((r.get::<_, Vec<u8>>(0)?, r.get::<_, i64>(1)?))
                            })?
                            .filter_map(|row| {
                                row.ok().and_then(|(k, e)| {
                                    <[u8; 32]>::try_from(k.as_slice()).ok().map(|k| (k, e))
                                })
                            })
                            .collect();
                        let _ = reply.send(keys);
                    }
                    Command::Load {
                        after: from,
                        limit,
                        reply,
                    } => {
                        let _ = reply.send(load_outbox(tx, from, limit).map_err(Into::into));
                    }
                    Command::Delete { ids } => {
                        writes += self.state.delete_rows(tx, &ids)?;
                    }
                    Command::CacheGet { key, now_ms, reply } => {
                        let _ = reply.send(self.state.cache_get(tx, &key, now_ms)?);
                    }
                    Command::CachePut {
                        key,
                        model,
                        value,
                        expires_ms,
                        now_ms,
                    } => {
                        self.state
                            .cache_put(tx, &key, &model, &value, expires_ms, now_ms)?;
                        cached = true;
                        writes += 1;
                    }
                    Command::CacheClear { model, reply } => {
                        let n = match &model {
                            Some(m) => {
                                let keys: Vec<Vec<u8>> = tx
                                    .prepare(schema::CACHE_CLEAR_MODEL)?
                                    .query_map([m], |r| r.get(0))?
                                    .collect::<Result<_, _>>()?;
                                let mut index = lock(&self.state.index);
                                for k in &keys {
                                    if let Ok(k) = CacheKey::try_from(k.as_slice()) {
                                        index.remove(&k);
                                    }
                                }
                                keys.len()
                            }
                            None => {
                                lock(&self.state.index).clear();
                                tx.execute(schema::CACHE_CLEAR_ALL, [])?
                            }
                        };
                        let (rows, bytes): (u64, u64) =
                            tx.query_row(schema::CACHE_TOTALS, [], |r| Ok((r.get(0)?, r.get(1)?)))?;
                        self.state
                            .counters
                            .cache_rows
                            .store(rows, Ordering::Relaxed);
                        self.state
                            .counters
                            .cache_bytes
                            .store(bytes, Ordering::Relaxed);
                        let _ = reply.send(Ok(n as u64));
                        writes += 1;
                    }
                    Command::History(record) => {
                        self.state.record(tx, &record)?;
                        writes += 1;
                    }
                    Command::Audit(records) => {
                        for r in &records {
                            tx.prepare_cached(schema::AUDIT_INSERT)?.execute(params![
                                r.ts_ms,
                                r.model,
                                r.version,
                                r.role,
                                r.local_label,
                                r.local_p,
                                r.cloud_label,
                                r.cloud_p
                            ])?;
                        }
                        tx.prepare_cached(schema::AUDIT_TRIM)?
                            .execute([schema::AUDIT_MAX_ROWS])?;
                        writes += 1;
                    }
                    Command::AuditTotals { reply } => {
                        let rows = tx
                            .prepare_cached(schema::AUDIT_TOTALS)?
                            .query_map([], |r| {
                                Ok((
                                    r.get::<_, String>(0)?,
                                    r.get::<_, String>(1)?,
                                    r.get::<_, i64>(2)?,
                                    r.get::<_, Option<i64>>(3)?,
                                ))
                            })?
                            .map(|row| {
                                row.map(|(m, v, n, agree)| {
                                    let count = |x: i64| u64::try_from(x).unwrap_or(0);
                                    (m, v, count(n), count(agree.unwrap_or(0)))
                                })
                            })
                            .collect::<Result<Vec<_>, _>>();
                        let _ = reply.send(rows.map_err(Into::into));
                    }
                    Command::Report { reply } => {
                        let _ = reply.send(self.state.report(tx).map_err(Into::into));
                    }
                    Command::Flush { reply } => after.push(After::Flushed(reply)),
                    Command::FleetSave { rows, reply } => {
                        tx.execute(schema::FLEET_CLEAR, [])?;
                        for r in &rows {
                            tx.execute(
                                schema::FLEET_PUT,
                                params![r.source, r.seen, r.good_version, r.envelope, now_ms()],
                            )?;
                        }
                        writes += 1;
                        after.push(After::Saved(reply));
                    }
                    Command::FleetLoad { reply } => {
                        let rows = tx
                            .prepare(schema::FLEET_ALL)?
                            .query_map([], |r| {
                                Ok(FleetRow {
                                    source: r.get(0)?,
                                    seen: r.get(1)?,
                                    good_version: r.get(2)?,
                                    envelope: r.get(3)?,
                                })
                            })?
                            .collect::<Result<Vec<_>, _>>();
                        let _ = reply.send(rows.map_err(Into::into));
                    }
                    Command::SetLimits(l) => {
                        let c = &mut self.state.cfg;
                        (c.cache.max_rows, c.cache.max_bytes) =
                            (l.cache_max_rows, l.cache_max_bytes);
                        (c.outbox.max_rows, c.outbox.max_bytes) =
                            (l.outbox_max_rows, l.outbox_max_bytes);
                        appended = true;
                        cached = true;
                    }
                    Command::Stop { reply } => stop = Some(reply),
                }
            }
            if appended {
                self.state.bound_outbox(tx)?;
            }
            if cached {
                self.state.bound_cache(tx)?;
            }
            if remembered || maintain {
                self.state.bound_replies(tx, maintain)?;
            }
            if maintain {
                let mut stmt = tx.prepare_cached(schema::CACHE_EXPIRED)?;
                let freed: Vec<(Vec<u8>, u64)> = stmt
                    .query_map([now_ms()], |r| Ok((r.get(0)?, r.get(1)?)))?
                    .collect::<Result<_, _>>()?;
                let mut index = lock(&self.state.index);
                for (k, _) in &freed {
                    if let Ok(k) = CacheKey::try_from(k.as_slice()) {
                        index.remove(&k);
                    }
                }
                drop(index);
                self.state
                    .counters
                    .cache_rows
                    .fetch_sub(freed.len() as u64, Ordering::Relaxed);
                self.state
                    .counters
                    .cache_bytes
                    .fetch_sub(freed.iter().map(|f| f.1).sum(), Ordering::Relaxed);
            }
            tx.prepare_cached(schema::COMMIT)?.execute([])?;
            Ok(())
        })();
        if result.is_err() && !self.conn.is_autocommit() {
            let _ = self.conn.execute_batch("ROLLBACK");
        }
        match result {
            Ok(()) => {
                // The publisher gets new rows at once, not by reading them back; what does not
                // fit, it loads (the watermark says they are there).
                for row in pushed {
                    if self.rows_tx.try_send(row).is_err() {
                        break;
                    }
                }
                let last = self.state.last_outbox_id;
                watermark_tx.send_if_modified(|w| std::mem::replace(w, last) != last);
                if writes > 0 {
                    self.state.counters.commits.fetch_add(1, Ordering::Relaxed);
                    self.state
                        .counters
                        .writes
                        .fetch_add(writes, Ordering::Relaxed);
                }
                for a in after {
                    match a {
                        After::Committed(ticket) => ticket.commit(),
                        After::Flushed(reply) => {
                            let _ = reply.send(());
                        }
                        After::Saved(reply) => {
                            let _ = reply.send(Ok(()));
                        }
                    }
                }
            }
            Err(e) => {
                tracing::error!(error = %e, "A database write failed and was rolled back; the requests it carried stay unacknowledged, for the broker to deliver again.");
                self.state.last_outbox_id = last_id_before;
                let err = StoreError::Write(e.to_string());
                for a in after {
                    match a {
                        // Not acknowledged: the broker delivers the request again.
                        After::Committed(ticket) => ticket.release(),
                        After::Flushed(reply) => {
                            let _ = reply.send(());
                        }
                        After::Saved(reply) => {
                            let _ = reply.send(Err(err.clone()));
                        }
                    }
                }
                if let Err(e) = self.reload_totals() {
                    tracing::error!(error = %e, "Cannot recount the database's contents.");
                }
            }
        }
        stop
    }
}

impl State {
    /// Appends a message to the outbox; returns it as a stored row.
    fn append(
        &mut self,
        tx: &Connection,
        message: OutMessage,
    ) -> Result<OutboxRow, rusqlite::Error> {
        let created_ms = now_ms();
        tx.prepare_cached(schema::OUTBOX_APPEND)?.execute(params![
            message.topic,
            message.payload,
            message.correlation,
            message.v5,
            message.retain,
            created_ms,
            message.expires_ms
        ])?;
        self.last_outbox_id = tx.last_insert_rowid();
        self.counters.outbox_rows.fetch_add(1, Ordering::Relaxed);
        self.counters
            .outbox_bytes
            .fetch_add(message.size(), Ordering::Relaxed);
        Ok(OutboxRow {
            id: self.last_outbox_id,
            created_ms,
            message,
        })
    }

    /// Deletes outbox rows; returns how many there were.
    fn delete_rows(&self, tx: &Connection, ids: &[i64]) -> Result<u64, rusqlite::Error> {
        let mut size_of = tx.prepare_cached(schema::OUTBOX_SIZE_OF)?;
        let mut delete = tx.prepare_cached(schema::OUTBOX_DELETE)?;
        let mut n = 0;
        for id in ids {
            let bytes: Option<u64> = size_of.query_row([id], |r| r.get(0)).optional()?;
            if let Some(bytes) = bytes {
                delete.execute([id])?;
                self.counters.outbox_rows.fetch_sub(1, Ordering::Relaxed);
                self.counters
                    .outbox_bytes
                    .fetch_sub(bytes, Ordering::Relaxed);
                n += 1;
            }
        }
        Ok(n)
    }

    fn remember(&self, tx: &Connection, r: &Remember, body: &[u8]) -> Result<(), rusqlite::Error> {
        tx.prepare_cached(schema::REPLY_PUT)?
            .execute(params![&r.key[..], body, r.expires_ms])?;
        self.counters.replies_rows.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    /// Drops expired remembered replies (`expired`), then the soonest to expire until within
    /// `store.dedupe.max_rows`.
    ///
    /// The count is kept as it goes (a reply replacing one of the same key counts twice until
    /// the next maintenance recounts), so the common case costs no scan.
    fn bound_replies(&self, tx: &Connection, maintain: bool) -> Result<(), rusqlite::Error> {
        if maintain {
            tx.prepare_cached(schema::REPLY_EXPIRED)?
                .execute([now_ms()])?;
            let rows: u64 = tx.query_row(schema::REPLY_COUNT, [], |r| r.get(0))?;
            self.counters.replies_rows.store(rows, Ordering::Relaxed);
        }
        let rows = self.counters.replies_rows.load(Ordering::Relaxed);
        let max = self.cfg.dedupe.max_rows;
        if rows > max {
            let excess = rows - max;
            let gone = tx.prepare_cached(schema::REPLY_OLDEST)?.execute([excess])?;
            self.counters
                .replies_rows
                .fetch_sub(gone as u64, Ordering::Relaxed);
        }
        Ok(())
    }

    fn cache_get(
        &self,
        tx: &Connection,
        key: &CacheKey,
        now_ms: i64,
    ) -> Result<Option<Cached>, rusqlite::Error> {
        let row: Option<(Vec<u8>, i64)> = tx
            .prepare_cached(schema::CACHE_GET)?
            .query_row([&key[..]], |r| Ok((r.get(0)?, r.get(1)?)))
            .optional()?;
        match row {
            Some((value, expires_ms)) if expires_ms > now_ms => {
                tx.prepare_cached(schema::CACHE_TOUCH)?
                    .execute(params![&key[..], now_ms])?;
                Ok(Some(Cached {
                    value: Arc::new(value),
                    expires_ms,
                }))
            }
            Some(_) => {
                lock(&self.index).remove(key);
                let bytes: Option<u64> = tx
                    .prepare_cached(schema::CACHE_DELETE)?
                    .query_row([&key[..]], |r| r.get(0))
                    .optional()?;
                if let Some(bytes) = bytes {
                    self.counters.cache_rows.fetch_sub(1, Ordering::Relaxed);
                    self.counters
                        .cache_bytes
                        .fetch_sub(bytes, Ordering::Relaxed);
                }
                Ok(None)
            }
            None => {
                lock(&self.index).remove(key);
                Ok(None)
            }
        }
    }

    fn cache_put(
        &self,
        tx: &Connection,
        key: &CacheKey,
        model: &str,
        value: &[u8],
        expires_ms: i64,
        now_ms: i64,
    ) -> Result<(), rusqlite::Error> {
        let old: Option<u64> = tx
            .prepare_cached(schema::CACHE_SIZE_OF)?
            .query_row([&key[..]], |r| r.get(0))
            .optional()?;
        let bytes = value.len() as u64;
        tx.prepare_cached(schema::CACHE_PUT)?.execute(params![
            &key[..],
            model,
            value,
            bytes,
            now_ms,
            expires_ms
        ])?;
        match old {
            Some(old) => {
                self.counters.cache_bytes.fetch_sub(old, Ordering::Relaxed);
            }
            None => {
                self.counters.cache_rows.fetch_add(1, Ordering::Relaxed);
            }
        }
        self.counters
            .cache_bytes
            .fetch_add(bytes, Ordering::Relaxed);
        Ok(())
    }

    /// Evicts least recently used results until the cache is within its bounds.
    fn bound_cache(&self, tx: &Connection) -> Result<(), rusqlite::Error> {
        let (max_rows, max_bytes) = (self.cfg.cache.max_rows, self.cfg.cache.max_bytes);
        let over = |c: &Counters| {
            c.cache_rows.load(Ordering::Relaxed) > max_rows
                || c.cache_bytes.load(Ordering::Relaxed) > max_bytes
        };
        let mut evicted = 0u64;
        while over(&self.counters) {
            let victims: Vec<(Vec<u8>, u64)> = tx
                .prepare_cached(schema::CACHE_LEAST_USED)?
                .query_map([64], |r| Ok((r.get(0)?, r.get(1)?)))?
                .collect::<Result<_, _>>()?;
            if victims.is_empty() {
                break;
            }
            for (key, bytes) in victims {
                if !over(&self.counters) {
                    break;
                }
                tx.prepare_cached(schema::CACHE_DELETE)?
                    .query_row([&key], |_| Ok(()))
                    .optional()?;
                if let Ok(k) = CacheKey::try_from(key.as_slice()) {
                    lock(&self.index).remove(&k);
                }
                self.counters.cache_rows.fetch_sub(1, Ordering::Relaxed);
                self.counters
                    .cache_bytes
                    .fetch_sub(bytes, Ordering::Relaxed);
                evicted += 1;
            }
        }
        if evicted > 0 {
            tx.prepare_cached(schema::COUNTER_ADD)?
                .execute(params![schema::CACHE_EVICTED, evicted])?;
            self.counters
                .cache_evicted
                .fetch_add(evicted, Ordering::Relaxed);
        }
        Ok(())
    }

    /// Drops the oldest messages until the outbox is within its bounds: counted and logged.
    fn bound_outbox(&self, tx: &Connection) -> Result<(), rusqlite::Error> {
        let (max_rows, max_bytes) = (self.cfg.outbox.max_rows, self.cfg.outbox.max_bytes);
        let over = |c: &Counters| {
            c.outbox_rows.load(Ordering::Relaxed) > max_rows
                || c.outbox_bytes.load(Ordering::Relaxed) > max_bytes
        };
        let mut dropped = 0u64;
        while over(&self.counters) {
            let oldest: Vec<(i64, u64)> = tx
                .prepare_cached(schema::OUTBOX_OLDEST)?
                .query_map([64], |r| Ok((r.get(0)?, r.get(1)?)))?
                .collect::<Result<_, _>>()?;
            if oldest.is_empty() {
                break;
            }
            for (id, bytes) in oldest {
                if !over(&self.counters) {
                    break;
                }
                tx.prepare_cached(schema::OUTBOX_DELETE)?.execute([id])?;
                self.counters.outbox_rows.fetch_sub(1, Ordering::Relaxed);
                self.counters
                    .outbox_bytes
                    .fetch_sub(bytes, Ordering::Relaxed);
                dropped += 1;
            }
        }
        if dropped > 0 {
            tx.prepare_cached(schema::COUNTER_ADD)?
                .execute(params![schema::OUTBOX_DROPPED, dropped])?;
            let total = self
                .counters
                .outbox_dropped
                .fetch_add(dropped, Ordering::Relaxed)
                + dropped;
            tracing::warn!(
                dropped,
                total_dropped = total,
                max_rows,
                max_bytes,
                "The outbox is full: the oldest unsent messages were dropped (store.outbox.max_rows / max_bytes)."
            );
        }
        Ok(())
    }

    fn record(&self, tx: &Connection, r: &HistoryRecord) -> Result<(), rusqlite::Error> {
        tx.prepare_cached(schema::HISTORY_INSERT)?.execute(params![
            r.ts_ms,
            r.model,
            r.model_sha256,
            &r.input_sha256[..],
            r.input,
            r.output,
            r.route,
            r.confidence
        ])?;
        let rows = self.counters.history_rows.fetch_add(1, Ordering::Relaxed) + 1;
        if rows > self.cfg.history.max_rows {
            let trimmed = tx
                .prepare_cached(schema::HISTORY_TRIM)?
                .execute([self.cfg.history.max_rows])?;
            self.counters
                .history_rows
                .fetch_sub(trimmed as u64, Ordering::Relaxed);
        }
        Ok(())
    }

    fn report(&self, tx: &Connection) -> Result<StoreReport, rusqlite::Error> {
        let models = tx
            .prepare_cached(schema::CACHE_BY_MODEL)?
            .query_map([], |r| {
                Ok(ModelCacheReport {
                    model: r.get(0)?,
                    rows: r.get(1)?,
                    bytes: r.get(2)?,
                })
            })?
            .collect::<Result<_, _>>()?;
        let (cache_rows, cache_bytes): (u64, u64) =
            tx.query_row(schema::CACHE_TOTALS, [], |r| Ok((r.get(0)?, r.get(1)?)))?;
        let (outbox_rows, outbox_bytes): (u64, u64) =
            tx.query_row(schema::OUTBOX_TOTALS, [], |r| Ok((r.get(0)?, r.get(1)?)))?;
        let dropped: u64 =
            tx.query_row(schema::COUNTER_GET, [schema::OUTBOX_DROPPED], |r| r.get(0))?;
        let evicted: u64 =
            tx.query_row(schema::COUNTER_GET, [schema::CACHE_EVICTED], |r| r.get(0))?;
        let history_rows: u64 = tx.query_row(schema::HISTORY_COUNT, [], |r| r.get(0))?;
        let schema_version: u32 = tx.query_row("PRAGMA user_version", [], |r| r.get(0))?;
        let c = &self.counters;
        Ok(StoreReport {
            path: self.cfg.path.clone(),
            file_bytes: std::fs::metadata(&self.cfg.path).map_or(0, |m| m.len())
                + std::fs::metadata(format!("{}-wal", self.cfg.path.display()))
                    .map_or(0, |m| m.len()),
            schema_version,
            outbox: OutboxReport {
                rows: outbox_rows,
                bytes: outbox_bytes,
                dropped,
            },
            cache: CacheReport {
                rows: cache_rows,
                bytes: cache_bytes,
                evicted,
                hits: c.cache_hits.load(Ordering::Relaxed),
                misses: c.cache_misses.load(Ordering::Relaxed),
                models,
            },
            history_rows,
        })
    }
}

fn load_outbox(
    tx: &Connection,
    after: i64,
    limit: usize,
) -> Result<Vec<OutboxRow>, rusqlite::Error> {
    // The limit is applied here, not bound into the SQL: SQLite prepares a statement again
    // whenever a bound LIMIT changes.
    tx.prepare_cached(schema::OUTBOX_AFTER)?
        .query_map(params![after], |r| {
            Ok(OutboxRow {
                id: r.get(0)?,
                created_ms: r.get(6)?,
                message: OutMessage {
                    topic: r.get(1)?,
                    payload: r.get(2)?,
                    correlation: r.get(3)?,
                    v5: r.get(4)?,
                    retain: r.get(5)?,
                    expires_ms: r.get(7)?,
                },
            })
        })?
        .take(limit)
        .collect()
}

#[cfg(test)]
mod tests;
