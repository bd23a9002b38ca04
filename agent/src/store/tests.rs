//! The store against real SQLite files in a scratch directory.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::PathBuf;

use super::*;
use crate::config::RawConfig;
use crate::ticket::{Delivery, Finished, Ticket};

fn scratch() -> PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "tether-store-{}-{}",
        std::process::id(),
        fastrand::u64(..)
    ));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn cfg(dir: &Path, tweak: impl FnOnce(&mut RawConfig)) -> StoreConfig {
    let mut raw = RawConfig::default();
    raw.store.path = Some(dir.join("tether.db"));
    raw.models_dir = Some(models::default_zoo_dir());
    tweak(&mut raw);
    raw.validate(|| Some("t".into())).unwrap().store
}

fn block<T>(f: impl std::future::Future<Output = T>) -> T {
    tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap()
        .block_on(f)
}

fn close(store: StoreHandle, thread: StoreThread) {
    block(store.stop());
    thread.join();
}

fn msg(i: usize) -> OutMessage {
    OutMessage {
        topic: format!("replies/{i}"),
        payload: format!("{{\"n\":{i}}}").into_bytes(),
        correlation: Some(vec![i as u8]),
        v5: i.is_multiple_of(2),
        retain: false,
        expires_ms: None,
    }
}

/// A ticket whose commit comes out of the returned receiver.
fn ticket(seq: u64) -> (Ticket, flume::Receiver<Finished>) {
    let (tx, rx) = flume::unbounded();
    (Ticket::new(tx, Delivery { epoch: 0, seq }), rx)
}

/// Stores a reply and waits for its commit; returns the row id.
fn append(store: &StoreHandle, m: OutMessage) -> i64 {
    let (t, rx) = ticket(0);
    store.reply(Reply {
        message: m,
        ticket: Some(t),
        remember: None,
    });
    assert!(rx.recv().unwrap().ack, "committed");
    *store.watermark().borrow()
}

fn key(n: u8) -> CacheKey {
    [n; 32]
}

#[test]
fn cache_hits_misses_and_expires() {
    let dir = scratch();
    let (store, thread) = open(
        &cfg(&dir, |r| r.store.cache.memory_entries = 0),
        OpenMode::Agent,
    )
    .unwrap();
    let now = now_ms();
    assert!(
        store.cache_get(&key(1), now).is_none(),
        "empty cache misses"
    );
    store.cache_put(key(1), "digits", b"one".to_vec(), Duration::from_secs(60));
    store.cache_put(key(2), "digits", b"two".to_vec(), Duration::from_millis(1));
    store.flush_blocking();
    assert_eq!(
        store.cache_get(&key(1), now_ms()).as_deref(),
        Some(&b"one".to_vec())
    );
    // Expiry is judged against the caller's clock: a minute on, the first is gone too.
    assert!(
        store.cache_get(&key(2), now_ms() + 10).is_none(),
        "expired after 1 ms"
    );
    assert!(
        store.cache_get(&key(1), now_ms() + 61_000).is_none(),
        "expired after 60 s"
    );
    assert_eq!(store.counters.cache_hits.load(Ordering::Relaxed), 1);
    assert_eq!(store.counters.cache_misses.load(Ordering::Relaxed), 3);
    store.flush_blocking();
    assert_eq!(
        store.counters.cache_rows.load(Ordering::Relaxed),
        0,
        "expired rows are deleted"
    );
    close(store, thread);
}

#[test]
fn the_memory_front_answers_without_sqlite_and_respects_ttl() {
    let dir = scratch();
    let (store, thread) = open(
        &cfg(&dir, |r| r.store.cache.memory_entries = 8),
        OpenMode::Agent,
    )
    .unwrap();
    store.cache_put(key(1), "m", b"v".to_vec(), Duration::from_secs(60));
    // Straight from memory, even before the write is committed.
    assert!(store.cache_get(&key(1), now_ms()).is_some());
    assert!(store.cache_get(&key(1), now_ms() + 61_000).is_none());
    close(store, thread);
}

#[test]
fn eviction_removes_the_least_recently_used_first_and_is_counted() {
    let dir = scratch();
    let config = cfg(&dir, |r| {
        r.store.cache.memory_entries = 0;
        r.store.cache.max_rows = 3;
    });
    let (store, thread) = open(&config, OpenMode::Agent).unwrap();
    let t0 = now_ms();
    for n in 1..=3 {
        store.cache_put(key(n), "m", vec![n], Duration::from_secs(600));
        store.flush_blocking();
        std::thread::sleep(Duration::from_millis(3));
    }
    // Use 1, so 2 is now the least recently used; adding 4 must evict 2.
    assert!(store.cache_get(&key(1), t0 + 20).is_some());
    store.cache_put(key(4), "m", vec![4], Duration::from_secs(600));
    store.flush_blocking();
    let later = now_ms() + 1;
    assert!(
        store.cache_get(&key(2), later).is_none(),
        "2 was least recently used"
    );
    for n in [1, 3, 4] {
        assert!(store.cache_get(&key(n), later).is_some(), "{n} must stay");
    }
    assert_eq!(store.counters.cache_evicted.load(Ordering::Relaxed), 1);
    assert_eq!(store.counters.cache_rows.load(Ordering::Relaxed), 3);
    let report = block(store.report()).unwrap();
    assert_eq!((report.cache.rows, report.cache.evicted), (3, 1));
    close(store, thread);
}

#[test]
fn the_byte_bound_evicts_too() {
    let dir = scratch();
    let config = cfg(&dir, |r| {
        r.store.cache.memory_entries = 0;
        r.store.cache.max_bytes = 250;
    });
    let (store, thread) = open(&config, OpenMode::Agent).unwrap();
    for n in 1..=3 {
        store.cache_put(key(n), "m", vec![n; 100], Duration::from_secs(600));
        store.flush_blocking();
    }
    assert_eq!(store.counters.cache_rows.load(Ordering::Relaxed), 2);
    assert!(store.counters.cache_bytes.load(Ordering::Relaxed) <= 250);
    close(store, thread);
}

#[test]
fn clearing_one_model_keeps_the_others() {
    let dir = scratch();
    let (store, thread) = open(&cfg(&dir, |_| {}), OpenMode::Agent).unwrap();
    store.cache_put(key(1), "a", vec![1], Duration::from_secs(600));
    store.cache_put(key(2), "b", vec![2], Duration::from_secs(600));
    store.flush_blocking();
    assert_eq!(block(store.cache_clear(Some("a".into()))).unwrap(), 1);
    assert_eq!(store.counters.cache_rows.load(Ordering::Relaxed), 1);
    assert!(store.cache_get(&key(1), now_ms()).is_none());
    assert!(store.cache_get(&key(2), now_ms()).is_some());
    let report = block(store.report()).unwrap();
    assert_eq!(report.cache.models.len(), 1);
    assert_eq!(report.cache.models[0].model, "b");
    close(store, thread);
}

#[test]
fn a_reopened_cache_still_knows_its_keys() {
    let dir = scratch();
    let config = cfg(&dir, |r| r.store.cache.memory_entries = 0);
    let (store, thread) = open(&config, OpenMode::Agent).unwrap();
    store.cache_put(key(7), "m", b"seven".to_vec(), Duration::from_secs(600));
    close(store, thread);
    let (store, thread) = open(&config, OpenMode::Agent).unwrap();
    assert_eq!(
        store.cache_get(&key(7), now_ms()).as_deref(),
        Some(&b"seven".to_vec())
    );
    assert!(store.cache_get(&key(8), now_ms()).is_none());
    close(store, thread);
}

#[test]
fn the_outbox_keeps_order_across_reopening_and_deletes_only_what_it_is_told() {
    let dir = scratch();
    let config = cfg(&dir, |_| {});
    let (store, thread) = open(&config, OpenMode::Agent).unwrap();
    let ids: Vec<i64> = (0..5).map(|i| append(&store, msg(i))).collect();
    assert!(ids.windows(2).all(|w| w[0] < w[1]), "{ids:?}");
    assert_eq!(*store.watermark().borrow(), ids[4]);
    store.try_delete(vec![ids[0], ids[2]]).unwrap();
    store.flush_blocking();
    close(store, thread);

    let (store, thread) = open(&config, OpenMode::Agent).unwrap();
    assert_eq!(store.counters.outbox_rows.load(Ordering::Relaxed), 3);
    let rows = block(store.load(0, 10)).unwrap();
    let left: Vec<i64> = rows.iter().map(|r| r.id).collect();
    assert_eq!(left, vec![ids[1], ids[3], ids[4]]);
    assert_eq!(rows[0].message, msg(1));
    assert_eq!(rows[2].message, msg(4));
    // Ids keep counting up after everything is delivered.
    store.try_delete(left).unwrap();
    store.flush_blocking();
    let next = append(&store, msg(9));
    assert!(next > ids[4], "ids are never reused");
    assert_eq!(block(store.load(ids[4], 10)).unwrap().len(), 1);
    close(store, thread);
}

#[test]
fn a_full_outbox_drops_the_oldest_and_counts_them() {
    let dir = scratch();
    let config = cfg(&dir, |r| r.store.outbox.max_rows = 3);
    let (store, thread) = open(&config, OpenMode::Agent).unwrap();
    let ids: Vec<i64> = (0..5).map(|i| append(&store, msg(i))).collect();
    let rows = block(store.load(0, 10)).unwrap();
    assert_eq!(
        rows.iter().map(|r| r.id).collect::<Vec<_>>(),
        ids[2..].to_vec()
    );
    assert_eq!(store.counters.outbox_dropped.load(Ordering::Relaxed), 2);
    close(store, thread);
    // The count survives a restart.
    let (store, thread) = open(&config, OpenMode::Agent).unwrap();
    assert_eq!(block(store.report()).unwrap().outbox.dropped, 2);
    close(store, thread);
}

#[test]
fn history_is_bounded() {
    let dir = scratch();
    let config = cfg(&dir, |r| r.store.history.max_rows = 2);
    let (store, thread) = open(&config, OpenMode::Agent).unwrap();
    for i in 0..5 {
        store.record(HistoryRecord {
            ts_ms: i,
            model: "m".into(),
            model_sha256: "s".into(),
            input_sha256: [0; 32],
            input: None,
            output: vec![],
            route: "local".into(),
            confidence: Some(0.5),
        });
    }
    store.flush_blocking();
    assert_eq!(block(store.report()).unwrap().history_rows, 2);
    close(store, thread);
}

#[test]
fn a_damaged_file_is_moved_aside_by_the_agent_but_not_by_the_command_line() {
    let dir = scratch();
    let config = cfg(&dir, |_| {});
    std::fs::write(&config.path, vec![0x5a; 8192]).unwrap();
    let err = open(&config, OpenMode::Inspect).unwrap_err().to_string();
    assert!(err.contains("damaged"), "{err}");
    assert!(config.path.exists());

    let (store, thread) = open(&config, OpenMode::Agent).unwrap();
    append(&store, msg(1));
    close(store, thread);
    let aside: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("tether.db.corrupt-"))
        .collect();
    assert_eq!(aside.len(), 1, "{aside:?}");
    assert_eq!(
        std::fs::read(dir.join(&aside[0])).unwrap(),
        vec![0x5a; 8192]
    );
}

#[test]
fn inspecting_a_missing_file_says_so() {
    let dir = scratch();
    let err = open(&cfg(&dir, |_| {}), OpenMode::Inspect).unwrap_err();
    assert!(matches!(err, StoreError::Missing(_)), "{err}");
}

#[test]
fn a_burst_of_writes_shares_commits() {
    let dir = scratch();
    let (store, thread) = open(&cfg(&dir, |_| {}), OpenMode::Agent).unwrap();
    let (tx, rx) = flume::unbounded();
    for i in 0..2000 {
        store.reply(Reply {
            message: msg(i),
            ticket: Some(Ticket::new(
                tx.clone(),
                Delivery {
                    epoch: 0,
                    seq: i as u64,
                },
            )),
            remember: None,
        });
    }
    drop(tx);
    assert_eq!(rx.iter().filter(|f| f.ack).count(), 2000);
    let commits = store.counters.commits.load(Ordering::Relaxed);
    assert!(commits < 2000, "{commits} commits for 2000 writes");
    close(store, thread);
}

#[test]
fn remembered_replies_survive_a_restart_until_they_expire() {
    let dir = scratch();
    let cfg = cfg(&dir, |_| {});
    let (store, thread) = open(&cfg, OpenMode::Agent).unwrap();
    let now = now_ms();
    let (t, rx) = ticket(0);
    store.reply(Reply {
        message: msg(1),
        ticket: Some(t),
        remember: Some(Remember {
            key: [7; 32],
            expires_ms: now + 60_000,
        }),
    });
    assert!(rx.recv().unwrap().ack);
    let (t, rx) = ticket(1);
    store.reply(Reply {
        message: msg(2),
        ticket: Some(t),
        remember: Some(Remember {
            key: [8; 32],
            expires_ms: now - 1,
        }),
    });
    assert!(rx.recv().unwrap().ack);
    close(store, thread);
    let (store, thread) = open(&cfg, OpenMode::Agent).unwrap();
    let keys = block(store.remembered_keys(now));
    assert_eq!(
        keys,
        vec![([7; 32], now + 60_000)],
        "the expired one is not listed"
    );
    assert_eq!(store.remembered([7; 32], now), Some(msg(1).payload));
    assert_eq!(store.remembered([8; 32], now), None, "expired");
    assert_eq!(store.remembered([9; 32], now), None, "never seen");
    close(store, thread);
}

#[test]
fn rows_left_unsent_are_deleted_and_counted_by_reason() {
    let dir = scratch();
    let (store, thread) = open(&cfg(&dir, |_| {}), OpenMode::Agent).unwrap();
    let a = append(&store, msg(1));
    let b = append(&store, msg(2));
    let c = append(&store, msg(3));
    store.try_unsent(vec![a], Unsent::Expired).unwrap();
    store.try_unsent(vec![b, 999], Unsent::Refused).unwrap();
    block(store.flush());
    let c1 = &store.counters;
    assert_eq!(c1.outbox_expired.load(Ordering::Relaxed), 1);
    assert_eq!(
        c1.outbox_refused.load(Ordering::Relaxed),
        1,
        "a missing row is not counted"
    );
    let rows = block(store.load(0, 10)).unwrap();
    assert_eq!(rows.iter().map(|r| r.id).collect::<Vec<_>>(), vec![c]);
    close(store, thread);
}

#[test]
fn a_stopped_store_releases_the_tickets_of_replies_it_did_not_take() {
    let dir = scratch();
    let (store, thread) = open(&cfg(&dir, |_| {}), OpenMode::Agent).unwrap();
    let handle = store.clone();
    close(store, thread);
    let (t, rx) = ticket(0);
    handle.reply(Reply {
        message: msg(1),
        ticket: Some(t),
        remember: None,
    });
    assert!(
        !rx.recv().unwrap().ack,
        "released, for the broker to deliver again"
    );
}

#[test]
fn the_wal_starts_over_while_commits_keep_coming() {
    let dir = scratch();
    let (store, thread) = open(&cfg(&dir, |_| {}), OpenMode::Agent).unwrap();
    let wal = dir.join("tether.db-wal");
    // One commit each, with a kilobyte of payload and a remembered copy: several frames per
    // commit, over three times the restart point in all, with the checkpointer running.
    let mut largest = 0;
    for i in 0..6000usize {
        let mut m = msg(i);
        m.payload = vec![b'x'; 1024];
        let (t, rx) = ticket(0);
        let mut k = [0u8; 32];
        k[..8].copy_from_slice(&i.to_le_bytes());
        store.reply(Reply {
            message: m,
            ticket: Some(t),
            remember: Some(Remember {
                key: k,
                expires_ms: i64::MAX,
            }),
        });
        assert!(rx.recv().unwrap().ack);
        largest = largest.max(std::fs::metadata(&wal).map_or(0, |m| m.len()));
    }
    let frames = 4096 + 24;
    let limit = 2 * u64::try_from(WAL_RESTART_FRAMES).unwrap() * frames;
    assert!(
        largest <= limit,
        "the WAL grew to {largest} bytes (limit {limit}): it never started over"
    );
    close(store, thread);
}
