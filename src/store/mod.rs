//! The SQLite store: one connection, owned by one thread, fed by a bounded
//! channel of jobs.
//!
//! SQLite calls block, so they never run on the executor. Async code sends a
//! closure with [`Store::call`] and awaits its result; jobs run one at a
//! time, in order, which makes this thread the database's only writer and
//! lets a job read-check-write without locks. The bounded channel is the
//! back-pressure: when the disk is slow, producers wait instead of piling up
//! memory. A liveness probe is just an empty job: if the thread is wedged,
//! the probe times out and the systemd watchdog stops being fed; the
//! readiness probe ([`Store::is_ready`]) gives up after `READY_WITHIN`.
//!
//! Durability: WAL with `synchronous=FULL`, so a write is on disk when its
//! job returns (acknowledged data survives kill -9 and power loss).
//!
//! Size: `storage.max_size` bounds the database, its WAL and its SHM file
//! together (see `budget`): the WAL is checkpointed and truncated under
//! pressure, deletes and collection have headroom so a full store can
//! always shrink, and when space runs short telemetry is evicted first;
//! only then are state writes refused (`LimitReached`, HTTP 507). A limit
//! or a full disk rolls the whole transaction back.
//!
//! Opening (see `open`): a file that is ours but damaged is `Corrupt`, one
//! that is another program's is `NotKonsul`; a database that vanished or
//! was emptied next to the identity marker this node wrote is data loss,
//! logged as an error and answered with a full sync from the hub.
//!
//! Parts: `open` (checks, identity, migration), `db` (transactions and
//! reads), `tx` (the write transaction), `budget` (the size budget),
//! `schema`, `sync_sql` (SQL behind sync).

// Blocking by design: the database and its files are touched on the store's
// own thread, and in `Store::open` before the executor runs.
#![allow(clippy::disallowed_methods)]

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use crate::clock::{Hlc, VersionVector};
use crate::crdt::FieldStamps;
use db::sql_err;
use tx::row_to_record;

pub(crate) use budget::TELEMETRY_ROW_OVERHEAD;
pub use db::Db;
pub(crate) use open::marker_path;
pub use schema::{APPLICATION_ID, LATEST as SCHEMA_VERSION};
pub use tx::Tx;

/// How long the readiness probe waits for the store thread.
const READY_WITHIN: Duration = Duration::from_millis(500);

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

// After the macro: these modules use it.
mod budget;
mod db;
#[cfg(feature = "fleet-ui")]
mod fleet_sql;
mod open;
mod schema;
mod sync_sql;
mod tx;
pub use sync_sql::{reset_clock, ClockReset, ConflictRow, EdgeRow, ReceivedPoint, TelemetryRow};

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
    #[error("{path}: database is corrupt ({detail}); restore it from a backup, or move it away to resync from the hub")]
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

    /// Whether the store thread answers within `READY_WITHIN`: the
    /// readiness probe fails fast on a wedged or shut-down store instead of
    /// waiting as long as the wedge lasts.
    pub async fn is_ready(&self) -> bool {
        let probe = async { self.call(|_| ()).await.is_ok() };
        let late = async {
            async_io::Timer::after(READY_WITHIN).await;
            false
        };
        smol::future::or(probe, late).await
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

#[cfg(test)]
mod tests;
