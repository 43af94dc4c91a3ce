//! Opening the database: what the file is, who it belongs to, migrations.
//!
//! Before SQLite sees the file we read its 100-byte header ourselves, so
//! the answer does not depend on which statement happens to fail first:
//! - no file, or 0 bytes: a new database, unless the identity marker says
//!   this node had one (then it is data loss, see below);
//! - the SQLite magic with our `application_id`: ours. Anything wrong from
//!   then on (a file shorter than its header says, a failed quick_check,
//!   SQLite reporting it malformed) is `Corrupt`;
//! - not SQLite, or another `application_id`, or an unmarked file with
//!   tables: `NotKonsul`. Both exit 65; the messages differ because the
//!   operator's fix differs (restore or resync, versus a wrong path);
//! - a WAL with frames next to it (after kill -9): page 1 may live in the
//!   WAL, so SQLite's `application_id` decides instead of the file header.
//!
//! The identity marker (`<db>.identity`, one line: the node id) is written
//! next to the database once it has been initialised, outside the file it
//! vouches for. A missing or empty database next to it means this node's
//! state was lost (a wiped partition, a bad restore): that is logged at
//! error level, the node keeps its id (version vectors name it) and asks
//! the hub for a full sync instead of starting silently as a new node.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use rusqlite::{Connection, ErrorCode, OpenFlags, OptionalExtension};

use super::budget::{wal_path, Budget};
use super::db::sql_err;
use super::{schema, Db, StoreError, StoreOptions, APPLICATION_ID};
use crate::clock::{Hlc, HlcClock};

const MAGIC: &[u8; 16] = b"SQLite format 3\0";

/// What the header says the file is.
enum Found {
    /// No file, or an empty one.
    Nothing,
    Ours,
    /// SQLite, but not marked as ours (0 for a plain SQLite file).
    Other {
        app_id: i32,
    },
    /// A WAL with frames sits next to the file: page 1 may be newer there
    /// (after kill -9, even the migration that marked the file), so SQLite
    /// has to say.
    InWal,
}

impl Db {
    pub(super) fn open(opts: &StoreOptions) -> Result<Db, StoreError> {
        let path = opts.path.clone();
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|source| StoreError::CreateDir {
                path: path.clone(),
                dir: dir.into(),
                source,
            })?;
        }
        let marker = read_marker(&path);
        let found = inspect(&path)?;
        let mut node_id = opts.node_id.clone();
        let lost = match (&found, &marker) {
            (Found::Nothing, Some(id)) => {
                log::error!(
                    "{}: the database is missing or empty, but node `{id}` had state here \
                     ({} exists): treating this as data loss; keeping node id `{id}` and \
                     requesting a full sync from the hub",
                    path.display(),
                    marker_path(&path).display()
                );
                // WAL frames without their database cannot be applied.
                for stale in [wal_path(&path), side_file(&path, "-shm")] {
                    if std::fs::remove_file(&stale).is_ok() {
                        log::warn!("{}: removed with the lost database", stale.display());
                    }
                }
                node_id = id.clone();
                true
            }
            _ => false,
        };
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
        let app_id = match found {
            Found::Ours => APPLICATION_ID,
            Found::Other { app_id } => app_id,
            Found::Nothing => 0,
            Found::InWal => conn
                .query_row("PRAGMA application_id", [], |r| r.get(0))
                .map_err(|e| StoreError::NotKonsul {
                    path: path.clone(),
                    detail: e.to_string(),
                })?,
        };
        let ours = app_id == APPLICATION_ID;
        // Once the file is known to be ours, any failure to read it is
        // damage, not a stranger.
        let damaged = |op: &'static str| {
            let path = path.clone();
            move |e: rusqlite::Error| {
                let code = e.sqlite_error_code();
                if ours
                    || matches!(
                        code,
                        Some(ErrorCode::DatabaseCorrupt | ErrorCode::NotADatabase)
                    )
                {
                    if ours {
                        return StoreError::Corrupt {
                            path,
                            detail: format!("{op}: {e}"),
                        };
                    }
                    return StoreError::NotKonsul {
                        path,
                        detail: e.to_string(),
                    };
                }
                sql_err(&path, op)(e)
            }
        };
        let version: i64 = conn
            .query_row("PRAGMA user_version", [], |r| r.get(0))
            .map_err(damaged("read user_version"))?;
        if !ours {
            // One statement, one snapshot: another opener of the same new
            // file may commit its first migration between two reads (an id
            // of 0 with tables would look like a stranger's file).
            let (app_id, tables, version): (i32, i64, i64) = conn
                .query_row(
                    "SELECT a.application_id, (SELECT count(*) FROM sqlite_schema), u.user_version
                     FROM pragma_application_id a, pragma_user_version u",
                    [],
                    |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
                )
                .map_err(damaged("list tables"))?;
            if app_id != APPLICATION_ID && (app_id != 0 || tables > 0 || version != 0) {
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
        enable_wal(&conn).map_err(damaged("enable WAL"))?;
        conn.pragma_update(None, "synchronous", "FULL")
            .map_err(damaged("set synchronous"))?;
        conn.pragma_update(None, "foreign_keys", "ON")
            .map_err(damaged("enable foreign keys"))?;
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
        let page_size = conn
            .query_row("PRAGMA page_size", [], |r| r.get::<_, i64>(0))
            .map_err(damaged("read page_size"))?
            .max(512) as u64;
        let mut db = Db {
            conn,
            clock: HlcClock::new(Hlc(0)),
            node_id,
            path,
            max_size: opts.max_size,
            page_size,
            budget: Budget::new(opts.max_size, page_size),
        };
        db.apply_budget()?;
        db.migrate()?;
        db.load_identity()?;
        if lost {
            db.run_tx(|tx| {
                // What the sync client does when the hub says the edge fell
                // behind: start from index 0, with our own versions echoed.
                tx.meta_set("full_sync", "1")?;
                tx.meta_set("sync_index", "0")
            })?;
        }
        if marker.as_deref() != Some(db.node_id.as_str()) {
            if let Err(e) = write_marker(&db.path, &db.node_id) {
                // Without it a later loss goes unnoticed; not a reason to
                // refuse to run.
                log::warn!("{}: {e}", marker_path(&db.path).display());
            }
        }
        Ok(db)
    }

    /// Brings the schema to [`schema::LATEST`], one migration per
    /// transaction. Each takes the write lock first (IMMEDIATE) and reads
    /// the version again under it: another process opening the same new
    /// file may have migrated since `open` read it, and SQLite would
    /// otherwise let both run migration 1.
    fn migrate(&mut self) -> Result<(), StoreError> {
        let path = self.path.clone();
        loop {
            let tx = self
                .conn
                .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
                .map_err(sql_err(&path, "begin migration"))?;
            let from: i64 = tx
                .query_row("PRAGMA user_version", [], |r| r.get(0))
                .map_err(sql_err(&path, "read user_version"))?;
            let Some(sql) = usize::try_from(from)
                .ok()
                .and_then(|i| schema::MIGRATIONS.get(i))
            else {
                return Ok(());
            };
            if from == 0 {
                tx.pragma_update(None, "application_id", APPLICATION_ID)
                    .map_err(sql_err(&path, "set application_id"))?;
            }
            let to = from + 1;
            tx.execute_batch(sql).map_err(sql_err(&path, "migrate"))?;
            tx.pragma_update(None, "user_version", to)
                .map_err(sql_err(&path, "set user_version"))?;
            tx.commit().map_err(sql_err(&path, "commit migration"))?;
            log::info!("{}: schema migrated to version {to}", path.display());
        }
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
                     (version vectors name it; remove the database and its .identity file to re-identify)",
                    path.display(),
                    self.node_id
                );
                self.node_id = id;
            }
            Some(_) => {}
            None => {
                // Another process opening the new file may have written
                // it since the read: keep the first, as above.
                self.conn
                    .execute(
                        "INSERT OR IGNORE INTO meta (key, value) VALUES ('node_id', ?1)",
                        [&self.node_id],
                    )
                    .map_err(sql_err(&path, "write node_id"))?;
                let id: String = self
                    .conn
                    .query_row("SELECT value FROM meta WHERE key = 'node_id'", [], |r| {
                        r.get(0)
                    })
                    .map_err(sql_err(&path, "read node_id"))?;
                self.node_id = id;
            }
        }
        let hlc: u64 = self.meta_u64("hlc")?;
        self.clock = HlcClock::new(Hlc(hlc));
        Ok(())
    }
}

/// Switching a new file to WAL takes it exclusively for a moment, and
/// SQLite answers "busy" at once rather than calling the busy handler, so
/// a second opener of the same new file waits here (at most 5 s, as the
/// busy timeout). Runs on the store's own thread, before it serves.
fn enable_wal(conn: &Connection) -> rusqlite::Result<()> {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    loop {
        match conn.pragma_update(None, "journal_mode", "WAL") {
            Err(e)
                if e.sqlite_error_code() == Some(ErrorCode::DatabaseBusy)
                    && std::time::Instant::now() < deadline =>
            {
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
            done => return done,
        }
    }
}

fn side_file(db: &Path, suffix: &str) -> PathBuf {
    let mut p = db.as_os_str().to_owned();
    p.push(suffix);
    PathBuf::from(p)
}

/// `<db>.identity`: the node id of the database that lived at `db`.
pub(crate) fn marker_path(db: &Path) -> PathBuf {
    side_file(db, ".identity")
}

fn read_marker(db: &Path) -> Option<String> {
    let text = std::fs::read_to_string(marker_path(db)).ok()?;
    let id = text.lines().next()?.trim();
    (!id.is_empty()).then(|| id.to_owned())
}

/// Temp file, fsync, rename, fsync of the directory: the marker is there
/// or not, never half-written.
fn write_marker(db: &Path, node_id: &str) -> std::io::Result<()> {
    let path = marker_path(db);
    let tmp = side_file(db, ".identity.tmp");
    let mut f = std::fs::File::create(&tmp)?;
    f.write_all(format!("{node_id}\n").as_bytes())?;
    f.sync_all()?;
    std::fs::rename(&tmp, &path)?;
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::File::open(dir)?.sync_all()?;
    }
    Ok(())
}

/// Reads the header (see the module note). A file of ours that is shorter
/// than its header says, with no WAL that could hold the rest, is
/// truncated: corrupt. With WAL frames present, SQLite decides.
fn inspect(path: &Path) -> Result<Found, StoreError> {
    let wal = std::fs::metadata(wal_path(path)).map_or(0, |m| m.len());
    let mut f = match std::fs::File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && wal > 0 => return Ok(Found::InWal),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Found::Nothing),
        Err(e) => {
            return Err(StoreError::Open {
                path: path.into(),
                source: rusqlite::Error::ToSqlConversionFailure(Box::new(e)),
            })
        }
    };
    let mut head = Vec::with_capacity(100);
    let read = Read::by_ref(&mut f).take(100).read_to_end(&mut head);
    let len = f.metadata().map(|m| m.len()).unwrap_or(0);
    if read.is_err() || head.is_empty() {
        return Ok(if wal > 0 {
            Found::InWal
        } else {
            Found::Nothing
        });
    }
    let corrupt = |detail: String| StoreError::Corrupt {
        path: path.into(),
        detail,
    };
    if !head.starts_with(MAGIC) {
        if MAGIC.starts_with(&head) {
            return Err(corrupt(format!("truncated to {len} bytes")));
        }
        return Err(StoreError::NotKonsul {
            path: path.into(),
            detail: "not an SQLite file".into(),
        });
    }
    if head.len() < 100 {
        return Err(corrupt(format!(
            "truncated inside the SQLite header ({len} bytes)"
        )));
    }
    let be32 = |at: usize| u32::from_be_bytes([head[at], head[at + 1], head[at + 2], head[at + 3]]);
    if wal > 0 {
        return Ok(Found::InWal);
    }
    let app_id = be32(68) as i32;
    if app_id != APPLICATION_ID {
        return Ok(Found::Other { app_id });
    }
    let page_size = match u16::from_be_bytes([head[16], head[17]]) {
        1 => 65536,
        n => u64::from(n),
    };
    // The header's page count is valid when its change counter matches
    // "version-valid-for" (SQLite file format, offsets 24 and 92).
    let pages = u64::from(be32(28));
    if be32(24) == be32(92) && len < pages * page_size {
        return Err(corrupt(format!(
            "truncated: {len} bytes, the header says {pages} pages of {page_size}"
        )));
    }
    Ok(Found::Ours)
}
