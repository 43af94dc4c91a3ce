//! The SQLite store: one connection, owned by one thread, fed by a bounded
//! channel of jobs.
//!
//! SQLite calls block, so they never run on the executor. Async code sends a
//! closure with [`Store::call`] and awaits its result; jobs run one at a
//! time, in order, which makes this thread the database's only writer and
//! lets a job read-check-write without locks. The bounded channel is the
//! back-pressure: when the disk is slow, producers wait instead of piling up
//! memory. A liveness probe is just an empty job: if the thread is wedged,
//! the probe times out and the systemd watchdog stops being fed.
//!
//! Durability: WAL with `synchronous=FULL`, so a write is on disk when its
//! job returns (acknowledged data survives kill -9 and power loss).
//! `storage.max_size` is enforced by SQLite itself through
//! `max_page_count`: a write that would grow the file past it fails with
//! SQLITE_FULL and its transaction rolls back whole, exactly like a full
//! disk.

mod schema;

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use rusqlite::{params, Connection, ErrorCode, OpenFlags, OptionalExtension};

use crate::clock::{Hlc, HlcClock, VersionVector};
use crate::crdt::FieldStamps;

pub use schema::{APPLICATION_ID, LATEST as SCHEMA_VERSION};

/// `SELECT <every record column> FROM records <rest>`, in the order
/// [`row_to_record`] reads them.
macro_rules! select_records {
    ($rest:literal) => {
        concat!(
            "SELECT kind, key, name, body, hlc, origin, vv, tombstone, create_index, modify_index, \
             fields, owner, src FROM records ",
            $rest
        )
    };
}

mod sync_sql;
pub use sync_sql::{ConflictRow, EdgeRow, ReceivedPoint, TelemetryRow};

/// How many jobs may wait for the store thread before senders block.
const QUEUE_DEPTH: usize = 256;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{path}: cannot open database: {source}")]
    Open {
        path: PathBuf,
        source: rusqlite::Error,
    },
    #[error("{path}: cannot create directory {dir}: {source}")]
    CreateDir {
        path: PathBuf,
        dir: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: not a konsul-edge database ({detail}); refusing to touch it")]
    NotKonsul { path: PathBuf, detail: String },
    #[error("{path}: integrity check failed: {detail}")]
    Corrupt { path: PathBuf, detail: String },
    #[error("{path}: schema version {found} is newer than this binary supports ({supported}); was it written by a newer konsul-edge?")]
    NewerSchema {
        path: PathBuf,
        found: i64,
        supported: i64,
    },
    #[error("{path}: storage.max_size ({limit} bytes) reached; the write was not applied")]
    LimitReached { path: PathBuf, limit: u64 },
    #[error("{path}: disk full; the write was not applied")]
    DiskFull { path: PathBuf },
    #[error("{path}: {op}: {source}")]
    Sqlite {
        path: PathBuf,
        op: &'static str,
        source: rusqlite::Error,
    },
    #[error("corrupt record {kind}/{key}: {detail}")]
    BadRecord {
        kind: String,
        key: String,
        detail: String,
    },
    #[error("the store is shut down")]
    Closed,
}

/// What kind of thing a replicated record is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Kind {
    Service,
    Kv,
    Device,
    Alert,
    Rollout,
}

impl Kind {
    pub const ALL: [Kind; 5] = [
        Kind::Service,
        Kind::Kv,
        Kind::Device,
        Kind::Alert,
        Kind::Rollout,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Service => "service",
            Kind::Kv => "kv",
            Kind::Device => "device",
            Kind::Alert => "alert",
            Kind::Rollout => "rollout",
        }
    }

    pub fn parse(s: &str) -> Option<Kind> {
        Kind::ALL.into_iter().find(|k| k.as_str() == s)
    }
}

/// A replicated record as stored: the body is opaque JSON to the store.
#[derive(Debug, Clone, PartialEq)]
pub struct Record {
    pub kind: Kind,
    pub key: String,
    /// Secondary lookup key (a service's name); not part of the body's
    /// identity.
    pub name: Option<String>,
    pub body: String,
    pub hlc: Hlc,
    /// The node that made this version.
    pub origin: String,
    pub vv: VersionVector,
    pub tombstone: bool,
    pub create_index: u64,
    pub modify_index: u64,
    /// Per top-level body field: when and by whom it was last written.
    pub fields: FieldStamps,
    /// The downstream edge this record belongs to ('' = this node's own or
    /// global): decides which edges it flows down to.
    pub owner: String,
    /// The downstream edge that supplied this exact version (not echoed
    /// back to it).
    pub src: String,
}

/// Size and count figures for /metrics and the systemd STATUS line.
#[derive(Debug, Clone, Default)]
pub struct Stats {
    pub live: Vec<(Kind, u64)>,
    pub tombstones: u64,
    pub outbox: u64,
    pub file_bytes: u64,
    pub max_bytes: u64,
    pub index: u64,
}

pub struct StoreOptions {
    pub path: PathBuf,
    pub max_size: u64,
    /// The configured node id; a database keeps the id it was created with.
    pub node_id: String,
}

type Job = Box<dyn FnOnce(&mut Db) + Send>;

/// Handle to the store thread. Cheap to clone.
#[derive(Clone)]
pub struct Store {
    jobs: async_channel::Sender<Job>,
    thread: Arc<Mutex<Option<JoinHandle<()>>>>,
    node_id: Arc<str>,
    path: Arc<Path>,
}

impl Store {
    /// Opens (creating if needed), checks and migrates the database on a new
    /// thread that then serves jobs. Blocks until the database is ready.
    pub fn open(opts: StoreOptions) -> Result<Store, StoreError> {
        let (ready_tx, ready_rx) = std::sync::mpsc::sync_channel(1);
        let (jobs, rx) = async_channel::bounded::<Job>(QUEUE_DEPTH);
        let path = opts.path.clone();
        let thread = std::thread::Builder::new()
            .name("store".into())
            .spawn(move || {
                let mut db = match Db::open(&opts) {
                    Ok(db) => {
                        let _ = ready_tx.send(Ok(db.node_id.clone()));
                        db
                    }
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                        return;
                    }
                };
                while let Ok(job) = rx.recv_blocking() {
                    job(&mut db);
                }
                db.close();
            })
            .map_err(|e| StoreError::Sqlite {
                path: path.clone(),
                op: "spawn store thread",
                source: rusqlite::Error::ToSqlConversionFailure(Box::new(e)),
            })?;
        let node_id = match ready_rx.recv() {
            Ok(Ok(id)) => id,
            Ok(Err(e)) => {
                let _ = thread.join();
                return Err(e);
            }
            Err(_) => {
                let _ = thread.join();
                return Err(StoreError::Closed);
            }
        };
        Ok(Store {
            jobs,
            thread: Arc::new(Mutex::new(Some(thread))),
            node_id: node_id.into(),
            path: path.into(),
        })
    }

    /// The replica id this database was created with.
    pub fn node_id(&self) -> &str {
        &self.node_id
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Runs `f` on the store thread and returns its result.
    pub async fn call<R, F>(&self, f: F) -> Result<R, StoreError>
    where
        F: FnOnce(&mut Db) -> R + Send + 'static,
        R: Send + 'static,
    {
        let (tx, rx) = async_channel::bounded(1);
        let job: Job = Box::new(move |db| {
            let _ = tx.try_send(f(db));
        });
        self.jobs.send(job).await.map_err(|_| StoreError::Closed)?;
        rx.recv().await.map_err(|_| StoreError::Closed)
    }

    /// Queues `f` without waiting for it (test hooks only).
    pub fn spawn_job(&self, f: impl FnOnce(&mut Db) + Send + 'static) -> Result<(), StoreError> {
        self.jobs
            .try_send(Box::new(f))
            .map_err(|_| StoreError::Closed)
    }

    /// Stops taking jobs, lets the queued ones finish, checkpoints the WAL
    /// into the main file and joins the thread. Blocking: call it from a
    /// blocking context or through `blocking::unblock`.
    pub fn close(&self) {
        self.jobs.close();
        let handle = self.thread.lock().ok().and_then(|mut h| h.take());
        if let Some(h) = handle {
            let _ = h.join();
        }
    }
}

/// The connection and the per-node write state; lives on the store thread.
pub struct Db {
    conn: Connection,
    clock: HlcClock,
    node_id: String,
    path: PathBuf,
    max_size: u64,
}

fn sql_err<'a>(
    path: &'a Path,
    op: &'static str,
) -> impl FnOnce(rusqlite::Error) -> StoreError + 'a {
    move |source| classify(path, op, source, None)
}

/// Turns SQLITE_FULL into the error a user can act on. SQLite reports
/// both the `max_page_count` limit and a full disk as SQLITE_FULL; with the
/// connection at hand we can tell them apart by the page count.
fn classify(
    path: &Path,
    op: &'static str,
    source: rusqlite::Error,
    conn: Option<(&Connection, u64)>,
) -> StoreError {
    if source.sqlite_error_code() == Some(ErrorCode::DiskFull) {
        return match conn {
            Some((c, limit)) if at_page_limit(c) => StoreError::LimitReached {
                path: path.into(),
                limit,
            },
            _ => StoreError::DiskFull { path: path.into() },
        };
    }
    StoreError::Sqlite {
        path: path.into(),
        op,
        source,
    }
}

fn at_page_limit(c: &Connection) -> bool {
    let q = |sql: &str| c.query_row(sql, [], |r| r.get::<_, i64>(0)).unwrap_or(0);
    let (pages, max) = (q("PRAGMA page_count"), q("PRAGMA max_page_count"));
    // A write that needs a few pages fails before page_count reaches max.
    max > 0 && pages + 64 >= max
}

impl Db {
    fn open(opts: &StoreOptions) -> Result<Db, StoreError> {
        let path = opts.path.clone();
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|source| StoreError::CreateDir {
                path: path.clone(),
                dir: dir.into(),
                source,
            })?;
        }
        check_header(&path)?;
        let conn = Connection::open_with_flags(
            &path,
            OpenFlags::SQLITE_OPEN_READ_WRITE
                | OpenFlags::SQLITE_OPEN_CREATE
                | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )
        .map_err(|source| StoreError::Open {
            path: path.clone(),
            source,
        })?;
        let app_id: i32 = conn
            .query_row("PRAGMA application_id", [], |r| r.get(0))
            .map_err(|e| not_konsul(&path, e))?;
        let version: i64 = conn
            .query_row("PRAGMA user_version", [], |r| r.get(0))
            .map_err(sql_err(&path, "read user_version"))?;
        if app_id != APPLICATION_ID {
            let tables: i64 = conn
                .query_row("SELECT count(*) FROM sqlite_schema", [], |r| r.get(0))
                .map_err(|e| not_konsul(&path, e))?;
            if app_id != 0 || tables > 0 || version != 0 {
                return Err(StoreError::NotKonsul {
                    path,
                    detail: format!("application_id {app_id:#x}, {tables} tables"),
                });
            }
        }
        if version > schema::LATEST {
            return Err(StoreError::NewerSchema {
                path,
                found: version,
                supported: schema::LATEST,
            });
        }
        conn.busy_timeout(std::time::Duration::from_secs(5))
            .map_err(sql_err(&path, "busy_timeout"))?;
        conn.pragma_update(None, "journal_mode", "WAL")
            .map_err(sql_err(&path, "enable WAL"))?;
        conn.pragma_update(None, "synchronous", "FULL")
            .map_err(sql_err(&path, "set synchronous"))?;
        conn.pragma_update(None, "foreign_keys", "ON")
            .map_err(sql_err(&path, "enable foreign keys"))?;
        if version > 0 {
            // quick_check is integrity_check without index cross-checks:
            // linear in file size, so start-up stays fast on big databases.
            let verdict: String = conn
                .query_row("PRAGMA quick_check", [], |r| r.get(0))
                .map_err(|e| StoreError::Corrupt {
                    path: path.clone(),
                    detail: e.to_string(),
                })?;
            if verdict != "ok" {
                return Err(StoreError::Corrupt {
                    path,
                    detail: verdict,
                });
            }
        }
        let page_size: u64 = conn
            .query_row("PRAGMA page_size", [], |r| r.get::<_, i64>(0))
            .map_err(sql_err(&path, "read page_size"))? as u64;
        let max_pages = (opts.max_size / page_size.max(512)).max(16);
        // pragma_update quotes values; max_page_count wants a bare number.
        conn.query_row(&format!("PRAGMA max_page_count = {max_pages}"), [], |_| {
            Ok(())
        })
        .map_err(sql_err(&path, "set max_page_count"))?;

        let mut db = Db {
            conn,
            clock: HlcClock::new(Hlc(0)),
            node_id: opts.node_id.clone(),
            path,
            max_size: opts.max_size,
        };
        db.migrate(version)?;
        db.load_identity()?;
        Ok(db)
    }

    fn migrate(&mut self, from: i64) -> Result<(), StoreError> {
        for (i, sql) in schema::MIGRATIONS.iter().enumerate().skip(from as usize) {
            let to = i as i64 + 1;
            let path = self.path.clone();
            let tx = self
                .conn
                .transaction()
                .map_err(sql_err(&path, "begin migration"))?;
            if from == 0 && i == 0 {
                tx.pragma_update(None, "application_id", APPLICATION_ID)
                    .map_err(sql_err(&path, "set application_id"))?;
            }
            tx.execute_batch(sql).map_err(sql_err(&path, "migrate"))?;
            tx.pragma_update(None, "user_version", to)
                .map_err(sql_err(&path, "set user_version"))?;
            tx.commit().map_err(sql_err(&path, "commit migration"))?;
            log::info!("{}: schema migrated to version {to}", path.display());
        }
        Ok(())
    }

    fn load_identity(&mut self) -> Result<(), StoreError> {
        let path = self.path.clone();
        let stored: Option<String> = self
            .conn
            .query_row("SELECT value FROM meta WHERE key = 'node_id'", [], |r| {
                r.get(0)
            })
            .optional()
            .map_err(sql_err(&path, "read node_id"))?;
        match stored {
            Some(id) if id != self.node_id => {
                log::warn!(
                    "{}: database belongs to node `{id}`, config says `{}`; keeping `{id}` \
                     (version vectors name it; remove the database to re-identify)",
                    path.display(),
                    self.node_id
                );
                self.node_id = id;
            }
            Some(_) => {}
            None => {
                self.conn
                    .execute(
                        "INSERT INTO meta (key, value) VALUES ('node_id', ?1)",
                        [&self.node_id],
                    )
                    .map_err(sql_err(&path, "write node_id"))?;
            }
        }
        let hlc: u64 = self.meta_u64("hlc")?;
        self.clock = HlcClock::new(Hlc(hlc));
        Ok(())
    }

    fn meta_u64(&self, key: &str) -> Result<u64, StoreError> {
        let v: String = self
            .conn
            .query_row("SELECT value FROM meta WHERE key = ?1", [key], |r| r.get(0))
            .map_err(sql_err(&self.path, "read meta"))?;
        v.parse().map_err(|_| StoreError::BadRecord {
            kind: "meta".into(),
            key: key.into(),
            detail: format!("`{v}` is not a number"),
        })
    }

    fn close(self) {
        if let Err(e) = self
            .conn
            .query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()))
        {
            log::warn!(
                "{}: WAL checkpoint at shutdown failed: {e}",
                self.path.display()
            );
        }
        if let Err((_, e)) = self.conn.close() {
            log::warn!("{}: close failed: {e}", self.path.display());
        }
    }

    pub fn node_id(&self) -> &str {
        &self.node_id
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The connection, for a module's own local (non-replicated) tables
    /// (`service_health`, `device_state`, `telemetry`, ...). Replicated
    /// records are written only through [`Tx::put`] / `registry::commit`.
    pub fn conn(&self) -> &Connection {
        &self.conn
    }

    /// Wraps a SQLite error from [`Db::conn`] like the store's own errors
    /// (a full disk and `storage.max_size` become their own variants).
    pub fn sql_error(&self, op: &'static str, e: rusqlite::Error) -> StoreError {
        classify(&self.path, op, e, Some((&self.conn, self.max_size)))
    }

    /// Runs `f` in one IMMEDIATE transaction: all of it commits, or none.
    pub fn tx<R, E>(&mut self, f: impl FnOnce(&mut Tx<'_>) -> Result<R, E>) -> Result<R, E>
    where
        E: From<StoreError>,
    {
        let path = self.path.clone();
        let max = self.max_size;
        let inner = self
            .conn
            .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
            .map_err(|e| classify(&path, "begin", e, None))?;
        let mut tx = Tx {
            inner,
            clock: &mut self.clock,
            node_id: &self.node_id,
            path: &path,
            max,
            stamped: false,
        };
        let out = f(&mut tx)?;
        if tx.stamped {
            let last = tx.clock.last().0.to_string();
            tx.inner
                .execute("UPDATE meta SET value = ?1 WHERE key = 'hlc'", [last])
                .map_err(|e| classify(&path, "persist hlc", e, Some((&tx.inner, max))))?;
        }
        let committed = tx.inner.commit();
        committed.map_err(|e| classify(&path, "commit", e, None))?;
        Ok(out)
    }

    pub fn get(&self, kind: Kind, key: &str) -> Result<Option<Record>, StoreError> {
        get_record(&self.conn, &self.path, kind, key)
    }

    /// Live (non-tombstone) records of a kind, optionally by name, in key
    /// order.
    pub fn list(&self, kind: Kind, name: Option<&str>) -> Result<Vec<Record>, StoreError> {
        let sql = if name.is_some() {
            select_records!("WHERE kind = ?1 AND name = ?2 AND tombstone = 0 ORDER BY key")
        } else {
            select_records!("WHERE kind = ?1 AND tombstone = 0 AND ?2 IS NULL ORDER BY key")
        };
        let mut stmt = self
            .conn
            .prepare_cached(sql)
            .map_err(sql_err(&self.path, "prepare list"))?;
        let rows = stmt
            .query_map(params![kind.as_str(), name], row_to_record)
            .map_err(sql_err(&self.path, "list"))?;
        let mut out = Vec::new();
        for raw in rows {
            out.push(raw.map_err(sql_err(&self.path, "list"))?);
        }
        Ok(out)
    }

    /// Keys of live records of a kind, in order.
    pub fn keys(&self, kind: Kind) -> Result<Vec<String>, StoreError> {
        let mut stmt = self
            .conn
            .prepare_cached(
                "SELECT key FROM records WHERE kind = ?1 AND tombstone = 0 ORDER BY key",
            )
            .map_err(sql_err(&self.path, "prepare keys"))?;
        let rows = stmt
            .query_map([kind.as_str()], |r| r.get::<_, String>(0))
            .map_err(sql_err(&self.path, "keys"))?;
        rows.collect::<Result<_, _>>()
            .map_err(sql_err(&self.path, "keys"))
    }

    pub fn stats(&self) -> Result<Stats, StoreError> {
        let p = &self.path;
        let mut stmt = self
            .conn
            .prepare_cached(
                "SELECT kind, sum(tombstone = 0), sum(tombstone) FROM records GROUP BY kind",
            )
            .map_err(sql_err(p, "prepare stats"))?;
        let mut live = Vec::new();
        let mut tombstones = 0;
        let rows = stmt
            .query_map([], |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    r.get::<_, i64>(1)?,
                    r.get::<_, i64>(2)?,
                ))
            })
            .map_err(sql_err(p, "stats"))?;
        for row in rows {
            let (kind, l, t) = row.map_err(sql_err(p, "stats"))?;
            if let Some(k) = Kind::parse(&kind) {
                live.push((k, l as u64));
            }
            tombstones += t as u64;
        }
        let outbox: i64 = self
            .conn
            .query_row("SELECT count(*) FROM outbox", [], |r| r.get(0))
            .map_err(sql_err(p, "count outbox"))?;
        let pages: i64 = self
            .conn
            .query_row("PRAGMA page_count", [], |r| r.get(0))
            .map_err(sql_err(p, "page_count"))?;
        let page_size: i64 = self
            .conn
            .query_row("PRAGMA page_size", [], |r| r.get(0))
            .map_err(sql_err(p, "page_size"))?;
        Ok(Stats {
            live,
            tombstones,
            outbox: outbox as u64,
            file_bytes: (pages * page_size) as u64,
            max_bytes: self.max_size,
            index: self.meta_u64("index")?,
        })
    }

    /// Local-only TTL state of a service: (ttl_ms, expires_at_ms).
    pub fn service_health(&self, id: &str) -> Result<Option<(u64, u64)>, StoreError> {
        self.conn
            .prepare_cached("SELECT ttl_ms, expires_at_ms FROM service_health WHERE id = ?1")
            .and_then(|mut s| {
                s.query_row([id], |r| {
                    Ok((r.get::<_, i64>(0)? as u64, r.get::<_, i64>(1)? as u64))
                })
                .optional()
            })
            .map_err(sql_err(&self.path, "read service health"))
    }

    /// Extends a TTL service's deadline. Not replicated, not in the outbox.
    pub fn touch_service(&mut self, id: &str, now_ms: u64) -> Result<bool, StoreError> {
        let n = self
            .conn
            .execute(
                "UPDATE service_health SET expires_at_ms = ?2 + ttl_ms WHERE id = ?1",
                params![id, now_ms as i64],
            )
            .map_err(|e| {
                classify(
                    &self.path,
                    "heartbeat",
                    e,
                    Some((&self.conn, self.max_size)),
                )
            })?;
        Ok(n > 0)
    }

    /// Pending outbox entries in order (the sync client drains these).
    pub fn outbox(&self, limit: usize) -> Result<Vec<(u64, Kind, String)>, StoreError> {
        let mut stmt = self
            .conn
            .prepare_cached("SELECT seq, kind, key FROM outbox ORDER BY seq LIMIT ?1")
            .map_err(sql_err(&self.path, "prepare outbox"))?;
        let rows = stmt
            .query_map([limit as i64], |r| {
                Ok((
                    r.get::<_, i64>(0)? as u64,
                    r.get::<_, String>(1)?,
                    r.get::<_, String>(2)?,
                ))
            })
            .map_err(sql_err(&self.path, "read outbox"))?;
        let mut out = Vec::new();
        for row in rows {
            let (seq, kind, key) = row.map_err(sql_err(&self.path, "read outbox"))?;
            let kind = Kind::parse(&kind).ok_or_else(|| StoreError::BadRecord {
                kind: kind.clone(),
                key: key.clone(),
                detail: "unknown kind in outbox".into(),
            })?;
            out.push((seq, kind, key));
        }
        Ok(out)
    }
}

/// A write transaction. The only way to change replicated records.
pub struct Tx<'a> {
    inner: rusqlite::Transaction<'a>,
    clock: &'a mut HlcClock,
    node_id: &'a str,
    path: &'a Path,
    max: u64,
    stamped: bool,
}

impl Tx<'_> {
    pub fn node_id(&self) -> &str {
        self.node_id
    }

    fn err(&self, op: &'static str) -> impl FnOnce(rusqlite::Error) -> StoreError + '_ {
        move |e| classify(self.path, op, e, Some((&self.inner, self.max)))
    }

    /// The transaction's connection, for a module's local tables; see
    /// [`Db::conn`].
    pub fn conn(&self) -> &Connection {
        &self.inner
    }

    /// Wraps a SQLite error from [`Tx::conn`]; see [`Db::sql_error`].
    pub fn sql_error(&self, op: &'static str, e: rusqlite::Error) -> StoreError {
        classify(self.path, op, e, Some((&self.inner, self.max)))
    }

    /// A fresh HLC timestamp for a local write (persisted at commit).
    pub fn now(&mut self) -> Hlc {
        self.stamped = true;
        self.clock.now()
    }

    /// Absorbs a timestamp seen in replicated data.
    pub fn observe(&mut self, remote: Hlc) -> Hlc {
        self.stamped = true;
        self.clock.observe(remote)
    }

    pub fn get(&self, kind: Kind, key: &str) -> Result<Option<Record>, StoreError> {
        get_record(&self.inner, self.path, kind, key)
    }

    /// The next value of the store-wide modify index.
    pub fn next_index(&mut self) -> Result<u64, StoreError> {
        let v: i64 = self
            .inner
            .query_row(
                "UPDATE meta SET value = CAST(value AS INTEGER) + 1 WHERE key = 'index' RETURNING CAST(value AS INTEGER)",
                [],
                |r| r.get(0),
            )
            .map_err(self.err("bump index"))?;
        Ok(v as u64)
    }

    /// Live records of a kind that belong to this node: records a hub
    /// holds for its downstream edges (owner set) do not count against
    /// this node's own limits.
    pub fn count_live(&self, kind: Kind) -> Result<u64, StoreError> {
        let n: i64 = self
            .inner
            .query_row(
                "SELECT count(*) FROM records WHERE kind = ?1 AND tombstone = 0 AND owner = ''",
                [kind.as_str()],
                |r| r.get(0),
            )
            .map_err(self.err("count"))?;
        Ok(n as u64)
    }

    /// Writes a record version as is (stamps are the caller's business).
    pub fn put(&mut self, r: &Record) -> Result<(), StoreError> {
        let json = |v: &dyn erased::Ser| {
            v.to_json().map_err(|e| StoreError::BadRecord {
                kind: r.kind.as_str().into(),
                key: r.key.clone(),
                detail: e.to_string(),
            })
        };
        let vv = json(&r.vv)?;
        let fields = json(&r.fields)?;
        self.inner
            .prepare_cached(
                "INSERT INTO records (kind, key, name, body, hlc, origin, vv, tombstone, create_index, modify_index, fields, owner, src)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13)
                 ON CONFLICT (kind, key) DO UPDATE SET
                   name = excluded.name, body = excluded.body, hlc = excluded.hlc,
                   origin = excluded.origin, vv = excluded.vv, tombstone = excluded.tombstone,
                   create_index = excluded.create_index, modify_index = excluded.modify_index,
                   fields = excluded.fields, owner = excluded.owner, src = excluded.src",
            )
            .and_then(|mut s| {
                s.execute(params![
                    r.kind.as_str(),
                    r.key,
                    r.name,
                    r.body,
                    r.hlc.0 as i64,
                    r.origin,
                    vv,
                    r.tombstone,
                    r.create_index as i64,
                    r.modify_index as i64,
                    fields,
                    r.owner,
                    r.src
                ])
            })
            .map_err(self.err("write record"))?;
        Ok(())
    }

    /// Queues the key for the cloud; a pending entry for the same key is
    /// replaced (the sync client sends the record's state at send time).
    pub fn enqueue(&mut self, kind: Kind, key: &str) -> Result<(), StoreError> {
        self.inner
            .prepare_cached("INSERT OR REPLACE INTO outbox (kind, key) VALUES (?1, ?2)")
            .and_then(|mut s| s.execute(params![kind.as_str(), key]))
            .map_err(self.err("enqueue"))?;
        Ok(())
    }

    pub fn set_service_ttl(
        &mut self,
        id: &str,
        ttl_ms: Option<u64>,
        now_ms: u64,
    ) -> Result<(), StoreError> {
        let r = match ttl_ms {
            Some(ttl) => self.inner.execute(
                "INSERT INTO service_health (id, ttl_ms, expires_at_ms) VALUES (?1, ?2, ?3)
                 ON CONFLICT (id) DO UPDATE SET ttl_ms = excluded.ttl_ms, expires_at_ms = excluded.expires_at_ms",
                params![id, ttl as i64, (now_ms + ttl) as i64],
            ),
            None => self
                .inner
                .execute("DELETE FROM service_health WHERE id = ?1", [id]),
        };
        r.map_err(self.err("write service health"))?;
        Ok(())
    }
}

mod erased {
    /// Serialises either of the two JSON columns without a generic closure.
    pub trait Ser {
        fn to_json(&self) -> serde_json::Result<String>;
    }
    impl<T: serde::Serialize> Ser for T {
        fn to_json(&self) -> serde_json::Result<String> {
            serde_json::to_string(self)
        }
    }
}

/// Reads one row of [`select_records!`]; a corrupt JSON column or an
/// unknown kind is a conversion error naming the record.
fn row_to_record(r: &rusqlite::Row<'_>) -> rusqlite::Result<Record> {
    let kind: String = r.get(0)?;
    let key: String = r.get(1)?;
    let bad = |col: usize, detail: String| {
        rusqlite::Error::FromSqlConversionFailure(
            col,
            rusqlite::types::Type::Text,
            format!("record {kind}/{key}: {detail}").into(),
        )
    };
    let json = |col: usize| -> rusqlite::Result<String> { r.get(col) };
    let vv: VersionVector =
        serde_json::from_str(&json(6)?).map_err(|e| bad(6, format!("version vector: {e}")))?;
    let fields: FieldStamps =
        serde_json::from_str(&json(10)?).map_err(|e| bad(10, format!("field stamps: {e}")))?;
    let k = Kind::parse(&kind).ok_or_else(|| bad(0, "unknown kind".into()))?;
    Ok(Record {
        kind: k,
        name: r.get(2)?,
        body: r.get(3)?,
        hlc: Hlc(r.get::<_, i64>(4)? as u64),
        origin: r.get(5)?,
        vv,
        tombstone: r.get(7)?,
        create_index: r.get::<_, i64>(8)? as u64,
        modify_index: r.get::<_, i64>(9)? as u64,
        fields,
        owner: r.get(11)?,
        src: r.get(12)?,
        key,
    })
}

fn get_record(
    conn: &Connection,
    path: &Path,
    kind: Kind,
    key: &str,
) -> Result<Option<Record>, StoreError> {
    conn.prepare_cached(select_records!("WHERE kind = ?1 AND key = ?2"))
        .and_then(|mut s| {
            s.query_row(params![kind.as_str(), key], row_to_record)
                .optional()
        })
        .map_err(sql_err(path, "read record"))
}

fn not_konsul(path: &Path, e: rusqlite::Error) -> StoreError {
    StoreError::NotKonsul {
        path: path.into(),
        detail: e.to_string(),
    }
}

/// Refuses a non-empty file that is not SQLite before SQLite sees it: the
/// library would otherwise report "file is not a database" on first use.
fn check_header(path: &Path) -> Result<(), StoreError> {
    use std::io::Read;
    let mut f = match std::fs::File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => {
            return Err(StoreError::Open {
                path: path.into(),
                source: rusqlite::Error::ToSqlConversionFailure(Box::new(e)),
            })
        }
    };
    let mut head = [0u8; 16];
    let n = f.read(&mut head).unwrap_or(0);
    if n == 0 {
        return Ok(());
    }
    if n < 16 || &head != b"SQLite format 3\0" {
        return Err(StoreError::NotKonsul {
            path: path.into(),
            detail: "not an SQLite file".into(),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

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
}
