//! The database schema, as an ordered list of migrations, and every SQL statement the store
//! runs. `PRAGMA user_version` records how many migrations a file has had.

/// Migration `i` takes a database from version `i` to `i + 1`. Append, never edit.
pub const MIGRATIONS: &[&str] = &[
    // 1: cache, outbox, history, counters.
    "
    CREATE TABLE cache (
        key        BLOB PRIMARY KEY,
        model      TEXT NOT NULL,
        value      BLOB NOT NULL,
        bytes      INTEGER NOT NULL,
        created_ms INTEGER NOT NULL,
        expires_ms INTEGER NOT NULL,
        used_ms    INTEGER NOT NULL
    ) WITHOUT ROWID;
    CREATE INDEX cache_by_use ON cache(used_ms);
    CREATE INDEX cache_by_expiry ON cache(expires_ms);
    -- AUTOINCREMENT: ids are never reused, so a publisher's cursor (`id > n`) stays valid
    -- even when the table empties.
    CREATE TABLE outbox (
        id          INTEGER PRIMARY KEY AUTOINCREMENT,
        topic       TEXT NOT NULL,
        payload     BLOB NOT NULL,
        correlation BLOB,
        v5          INTEGER NOT NULL,
        retain      INTEGER NOT NULL,
        created_ms  INTEGER NOT NULL
    );
    CREATE TABLE history (
        id           INTEGER PRIMARY KEY AUTOINCREMENT,
        ts_ms        INTEGER NOT NULL,
        model        TEXT NOT NULL,
        model_sha256 TEXT NOT NULL,
        input_sha256 BLOB NOT NULL,
        input        BLOB,
        output       BLOB NOT NULL,
        route        TEXT NOT NULL,
        confidence   REAL
    );
    CREATE INDEX history_by_confidence ON history(model, confidence);
    CREATE TABLE counters (
        name  TEXT PRIMARY KEY,
        value INTEGER NOT NULL
    ) WITHOUT ROWID;
    ",
    // 2: fleet documents: per source, the highest version taken (no replay after a reboot)
    // and the signed envelope of the last good configuration (a reboot without a broker comes
    // back on it).
    "
    CREATE TABLE fleet_state (
        source       TEXT PRIMARY KEY,
        seen         INTEGER NOT NULL,
        good_version INTEGER,
        envelope     BLOB,
        saved_ms     INTEGER NOT NULL
    ) WITHOUT ROWID;
    ",
    // 3: a reply's expiry (its requester's MQTT v5 Message Expiry), and the replies remembered
    // for de-duplication: a request delivered again within its window is answered from here,
    // after a restart too. Append-only in insertion order, without an index: every request
    // writes one, so it must cost an append (the last page), not a random B-tree page; the
    // oldest go first, a range at the table's start; a look-up by key (a duplicate after a
    // restart, or beyond what memory holds) is rare and scans.
    "
    ALTER TABLE outbox ADD COLUMN expires_ms INTEGER;
    CREATE TABLE replies (
        id         INTEGER PRIMARY KEY,
        key        BLOB NOT NULL,
        body       BLOB NOT NULL,
        expires_ms INTEGER NOT NULL
    );
    ",
    // 4: audited samples: a local answer and the relay model's answer to the same request,
    // per model version (serving or shadow). Rollouts are judged on their agreement.
    "
    CREATE TABLE audits (
        id          INTEGER PRIMARY KEY AUTOINCREMENT,
        ts_ms       INTEGER NOT NULL,
        model       TEXT NOT NULL,
        version     TEXT NOT NULL,
        role        TEXT NOT NULL,
        local_label TEXT NOT NULL,
        local_p     REAL NOT NULL,
        cloud_label TEXT NOT NULL,
        cloud_p     REAL NOT NULL
    );
    ",
];

pub const AUDIT_INSERT: &str =
    "INSERT INTO audits (ts_ms, model, version, role, local_label, local_p, cloud_label, cloud_p)
     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)";
pub const AUDIT_TRIM: &str = "DELETE FROM audits WHERE id <= (SELECT MAX(id) FROM audits) - ?1";
pub const AUDIT_TOTALS: &str = "SELECT model, version, COUNT(*), SUM(local_label = cloud_label)
     FROM audits GROUP BY model, version ORDER BY model, version";
/// Audits kept: the oldest go beyond this.
pub const AUDIT_MAX_ROWS: i64 = 100_000;

pub const FLEET_CLEAR: &str = "DELETE FROM fleet_state";
pub const FLEET_PUT: &str = "INSERT INTO fleet_state (source, seen, good_version, envelope, saved_ms) VALUES (?1, ?2, ?3, ?4, ?5)";
pub const FLEET_ALL: &str =
    "SELECT source, seen, good_version, envelope FROM fleet_state ORDER BY source";

pub const CACHE_GET: &str = "SELECT value, expires_ms FROM cache WHERE key = ?1";
pub const CACHE_TOUCH: &str = "UPDATE cache SET used_ms = ?2 WHERE key = ?1";
pub const CACHE_PUT: &str = "INSERT INTO cache (key, model, value, bytes, created_ms, expires_ms, used_ms)
     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?5)
     ON CONFLICT(key) DO UPDATE SET value = excluded.value, bytes = excluded.bytes,
         created_ms = excluded.created_ms, expires_ms = excluded.expires_ms, used_ms = excluded.used_ms";
pub const CACHE_SIZE_OF: &str = "SELECT bytes FROM cache WHERE key = ?1";
pub const CACHE_DELETE: &str = "DELETE FROM cache WHERE key = ?1 RETURNING bytes";
pub const CACHE_LEAST_USED: &str = "SELECT key, bytes FROM cache ORDER BY used_ms, key LIMIT ?1";
pub const CACHE_EXPIRED: &str = "DELETE FROM cache WHERE expires_ms <= ?1 RETURNING key, bytes";
pub const CACHE_KEYS: &str = "SELECT key FROM cache";
pub const CACHE_TOTALS: &str = "SELECT COUNT(*), COALESCE(SUM(bytes), 0) FROM cache";
pub const CACHE_CLEAR_ALL: &str = "DELETE FROM cache";
pub const CACHE_CLEAR_MODEL: &str = "DELETE FROM cache WHERE model = ?1 RETURNING key";
pub const CACHE_BY_MODEL: &str =
    "SELECT model, COUNT(*), COALESCE(SUM(bytes), 0) FROM cache GROUP BY model ORDER BY model";

pub const OUTBOX_APPEND: &str =
    "INSERT INTO outbox (topic, payload, correlation, v5, retain, created_ms, expires_ms)
     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)";
pub const OUTBOX_AFTER: &str =
    "SELECT id, topic, payload, correlation, v5, retain, created_ms, expires_ms
     FROM outbox WHERE id > ?1 ORDER BY id";
// Not `DELETE ... RETURNING`: SQLite prepares a RETURNING statement again on every run (it
// showed as a tenth of the store thread's time at one request in flight).
pub const OUTBOX_SIZE_OF: &str = "SELECT length(topic) + length(payload) FROM outbox WHERE id = ?1";
pub const OUTBOX_DELETE: &str = "DELETE FROM outbox WHERE id = ?1";
pub const OUTBOX_OLDEST: &str =
    "SELECT id, length(topic) + length(payload) FROM outbox ORDER BY id LIMIT ?1";
pub const OUTBOX_TOTALS: &str =
    "SELECT COUNT(*), COALESCE(SUM(length(topic) + length(payload)), 0) FROM outbox";
pub const OUTBOX_SEQ: &str =
    "SELECT COALESCE((SELECT seq FROM sqlite_sequence WHERE name = 'outbox'), 0)";

pub const BEGIN: &str = "BEGIN IMMEDIATE";
pub const COMMIT: &str = "COMMIT";

pub const REPLY_PUT: &str = "INSERT INTO replies (key, body, expires_ms) VALUES (?1, ?2, ?3)";
pub const REPLY_GET: &str =
    "SELECT body FROM replies WHERE key = ?1 AND expires_ms > ?2 ORDER BY id DESC LIMIT 1";
pub const REPLY_KEYS: &str =
    "SELECT key, MAX(expires_ms) FROM replies WHERE expires_ms > ?1 GROUP BY key";
pub const REPLY_EXPIRED: &str = "DELETE FROM replies WHERE expires_ms <= ?1";
pub const REPLY_COUNT: &str = "SELECT COUNT(*) FROM replies";
// The oldest are the lowest ids: this takes at most `?1` (fewer where expiry left gaps; the next
// batch takes the rest). Not `LIMIT ?1`: SQLite prepares a statement again whenever a bound
// LIMIT changes.
pub const REPLY_OLDEST: &str = "DELETE FROM replies WHERE id < (SELECT MIN(id) FROM replies) + ?1";

pub const HISTORY_INSERT: &str = "INSERT INTO history (ts_ms, model, model_sha256, input_sha256, input, output, route, confidence)
     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)";
pub const HISTORY_TRIM: &str = "DELETE FROM history WHERE id <= (SELECT MAX(id) FROM history) - ?1";
pub const HISTORY_COUNT: &str = "SELECT COUNT(*) FROM history";

pub const COUNTER_ADD: &str = "INSERT INTO counters (name, value) VALUES (?1, ?2)
     ON CONFLICT(name) DO UPDATE SET value = value + excluded.value";
pub const COUNTER_GET: &str = "SELECT COALESCE((SELECT value FROM counters WHERE name = ?1), 0)";

/// Names in the `counters` table.
pub const OUTBOX_DROPPED: &str = "outbox_dropped";
pub const CACHE_EVICTED: &str = "cache_evicted";
