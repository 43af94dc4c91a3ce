//! Unit tests of the store: opening, identity, limits.

use std::path::Path;

use rusqlite::Connection;

use super::*;
use crate::clock::Hlc;

fn open(dir: &Path, max: u64) -> Store {
    Store::open(StoreOptions {
        path: dir.join("k.db"),
        max_size: max,
        node_id: "n1".into(),
    })
    .unwrap()
}

#[test]
fn refuses_files_that_are_not_ours() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path().join("k.db");
    std::fs::write(&p, b"hello, I am a text file").unwrap();
    let e = Store::open(StoreOptions {
        path: p.clone(),
        max_size: 1 << 20,
        node_id: "n".into(),
    })
    .err()
    .unwrap();
    assert!(matches!(e, StoreError::NotKonsul { .. }), "{e}");

    let other = d.path().join("other.db");
    let c = Connection::open(&other).unwrap();
    c.execute_batch("CREATE TABLE x (y)").unwrap();
    drop(c);
    let e = Store::open(StoreOptions {
        path: other,
        max_size: 1 << 20,
        node_id: "n".into(),
    })
    .err()
    .unwrap();
    assert!(matches!(e, StoreError::NotKonsul { .. }), "{e}");
}

#[test]
fn refuses_a_newer_schema() {
    let d = tempfile::tempdir().unwrap();
    open(d.path(), 1 << 20).close();
    let c = Connection::open(d.path().join("k.db")).unwrap();
    c.pragma_update(None, "user_version", SCHEMA_VERSION + 1)
        .unwrap();
    drop(c);
    let e = Store::open(StoreOptions {
        path: d.path().join("k.db"),
        max_size: 1 << 20,
        node_id: "n1".into(),
    })
    .err()
    .unwrap();
    assert!(matches!(e, StoreError::NewerSchema { .. }), "{e}");
}

#[test]
fn keeps_the_node_id_it_was_created_with() {
    let d = tempfile::tempdir().unwrap();
    open(d.path(), 1 << 20).close();
    let s = Store::open(StoreOptions {
        path: d.path().join("k.db"),
        max_size: 1 << 20,
        node_id: "other".into(),
    })
    .unwrap();
    assert_eq!(s.node_id(), "n1");
    s.close();
}

#[test]
fn hlc_is_persisted_across_restarts() {
    let d = tempfile::tempdir().unwrap();
    let s = open(d.path(), 1 << 20);
    let first = smol::block_on(s.call(|db| db.tx(|tx| Ok::<_, StoreError>(tx.now()))))
        .unwrap()
        .unwrap();
    s.close();
    // Pretend the stored clock was far in the future (board RTC reset).
    let c = Connection::open(d.path().join("k.db")).unwrap();
    let future = Hlc::new(first.millis() + 86_400_000, 0);
    c.execute(
        "UPDATE meta SET value = ?1 WHERE key = 'hlc'",
        [future.0.to_string()],
    )
    .unwrap();
    drop(c);
    let s = open(d.path(), 1 << 20);
    let next = smol::block_on(s.call(|db| db.tx(|tx| Ok::<_, StoreError>(tx.now()))))
        .unwrap()
        .unwrap();
    assert!(next > future);
    s.close();
}

#[test]
fn a_full_store_rolls_back_the_whole_transaction() {
    let d = tempfile::tempdir().unwrap();
    let s = open(d.path(), 1 << 20);
    let big = "x".repeat(64 * 1024);
    let mut i = 0;
    let err = loop {
        let body = big.clone();
        let r = smol::block_on(s.call(move |db| {
            db.tx(|tx| {
                let idx = tx.next_index()?;
                let hlc = tx.now();
                let rec = Record {
                    kind: Kind::Kv,
                    key: format!("k{i}"),
                    name: None,
                    body,
                    hlc,
                    origin: "n1".into(),
                    vv: VersionVector::default(),
                    tombstone: false,
                    create_index: idx,
                    modify_index: idx,
                    fields: Default::default(),
                    owner: String::new(),
                    src: String::new(),
                };
                tx.put(&rec)?;
                tx.enqueue(Kind::Kv, &rec.key)
            })
        }))
        .unwrap();
        if let Err(e) = r {
            break e;
        }
        i += 1;
        assert!(i < 1000, "limit never hit");
    };
    assert!(matches!(err, StoreError::LimitReached { .. }), "{err}");
    let (keys, stats) =
        smol::block_on(s.call(|db| (db.keys(Kind::Kv).unwrap(), db.stats().unwrap()))).unwrap();
    assert_eq!(keys.len(), i);
    assert_eq!(
        stats.outbox as usize, i,
        "outbox and records commit together"
    );
    assert_eq!(stats.index as usize, i, "the index bump rolled back too");
    s.close();
}

fn put_kv(s: &Store, key: String, body: String) -> Result<(), StoreError> {
    smol::block_on(s.call(move |db| {
        db.tx(|tx| {
            let idx = tx.next_index()?;
            let hlc = tx.now();
            let rec = Record {
                kind: Kind::Kv,
                key,
                name: None,
                body,
                hlc,
                origin: "n1".into(),
                vv: VersionVector::default(),
                tombstone: false,
                create_index: idx,
                modify_index: idx,
                fields: Default::default(),
                owner: String::new(),
                src: String::new(),
            };
            tx.put(&rec)?;
            tx.enqueue(Kind::Kv, &rec.key)
        })
    }))
    .unwrap()
}

#[test]
fn telemetry_is_evicted_before_state_writes_are_refused() {
    let d = tempfile::tempdir().unwrap();
    let s = open(d.path(), 1 << 20);
    // Telemetry fills most of the budget (written as ingest would).
    let rows: i64 = smol::block_on(s.call(|db| {
        let mut n = 0;
        loop {
            let r = db.tx(|tx| {
                for _ in 0..50 {
                    tx.conn()
                        .execute(
                            "INSERT INTO telemetry (device, seq, ts_ms, body) VALUES ('d', ?1, 0, ?2)",
                            rusqlite::params![n, "t".repeat(1000)],
                        )
                        .map_err(|e| tx.sql_error("insert", e))?;
                    n += 1;
                }
                Ok::<_, StoreError>(())
            });
            if r.is_err() {
                break n;
            }
        }
    }))
    .unwrap();
    assert!(rows > 200, "{rows}");
    // State writes still go through: the oldest telemetry makes room.
    for i in 0..20 {
        put_kv(
            &s,
            format!("k{i}"),
            format!("{{\"v\":\"{}\"}}", "x".repeat(8000)),
        )
        .unwrap_or_else(|e| panic!("state write {i} refused while telemetry remained: {e}"));
    }
    let (left, first): (i64, i64) = smol::block_on(s.call(|db| {
        db.conn()
            .query_row(
                "SELECT count(*), coalesce(min(seq), -1) FROM telemetry",
                [],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .unwrap()
    }))
    .unwrap();
    assert!(left < rows, "nothing evicted");
    assert!(first > 0, "the oldest rows go first");
    // Once telemetry is gone, state writes are refused: 507, not a crash.
    let err = (0..200)
        .find_map(|i| {
            put_kv(
                &s,
                format!("m{i}"),
                format!("{{\"v\":\"{}\"}}", "y".repeat(8000)),
            )
            .err()
        })
        .expect("the limit was never reached");
    assert!(matches!(err, StoreError::LimitReached { .. }), "{err}");
    let left: i64 = smol::block_on(s.call(|db| {
        db.conn()
            .query_row("SELECT count(*) FROM telemetry", [], |r| r.get(0))
            .unwrap()
    }))
    .unwrap();
    assert_eq!(left, 0, "state was refused while telemetry remained");
    s.close();
}

/// Two processes opening one new database at once (the daemon and a CLI
/// tool, or a unit restarted over a slow start) both get it: migrations
/// and the identity are written once, by whoever takes the write lock
/// first, and the other sees them.
#[test]
fn openers_racing_on_one_new_database_all_open_it() {
    use std::sync::{Arc, Barrier};
    for round in 0..8 {
        let d = tempfile::tempdir().unwrap();
        let start = Arc::new(Barrier::new(4));
        let openers: Vec<_> = (0..4)
            .map(|_| {
                let path = d.path().join("k.db");
                let start = start.clone();
                std::thread::spawn(move || {
                    start.wait();
                    Store::open(StoreOptions {
                        path,
                        max_size: 8 << 20,
                        node_id: "n1".into(),
                    })
                    .map(|s| {
                        let id = s.node_id().to_owned();
                        s.close();
                        id
                    })
                })
            })
            .collect();
        for o in openers {
            match o.join().unwrap() {
                Ok(id) => assert_eq!(id, "n1"),
                Err(e) => panic!("round {round}: {e}"),
            }
        }
    }
}
