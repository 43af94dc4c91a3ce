//! The connection on the store thread: transactions (with the size
//! budget's checks around them), record reads, figures, error mapping.

use std::path::{Path, PathBuf};

use rusqlite::{params, Connection, ErrorCode, OptionalExtension};

use super::budget::{self, Budget};
use super::tx::{get_record, row_to_record};
use super::{Kind, Record, Stats, StoreError, Tx};
use crate::clock::HlcClock;

/// The connection and the per-node write state; lives on the store thread.
pub struct Db {
    pub(super) conn: Connection,
    pub(super) clock: HlcClock,
    pub(super) node_id: String,
    pub(super) path: PathBuf,
    pub(super) max_size: u64,
    pub(super) page_size: u64,
    pub(super) budget: Budget,
}

pub(super) fn sql_err<'a>(
    path: &'a Path,
    op: &'static str,
) -> impl FnOnce(rusqlite::Error) -> StoreError + 'a {
    move |source| classify(path, op, source, None)
}

/// Turns SQLITE_FULL into the error a user can act on. SQLite reports
/// both the `max_page_count` limit and a full disk as SQLITE_FULL; with the
/// connection at hand we can tell them apart by the page count.
pub(super) fn classify(
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
    pub(super) fn meta_u64(&self, key: &str) -> Result<u64, StoreError> {
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

    pub(super) fn close(self) {
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
    /// Telemetry is evicted first when the store is near its limit; a
    /// transaction that grows the live data past the soft limit rolls back
    /// with `LimitReached` unless it called [`Tx::use_headroom`].
    pub fn tx<R, E>(&mut self, f: impl FnOnce(&mut Tx<'_>) -> Result<R, E>) -> Result<R, E>
    where
        E: From<StoreError>,
    {
        self.relieve_pressure();
        self.run_tx(f)
    }

    pub(super) fn run_tx<R, E>(
        &mut self,
        f: impl FnOnce(&mut Tx<'_>) -> Result<R, E>,
    ) -> Result<R, E>
    where
        E: From<StoreError>,
    {
        let path = self.path.clone();
        let max = self.max_size;
        let soft = self.budget.soft_pages;
        let out = {
            let inner = self
                .conn
                .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
                .map_err(|e| classify(&path, "begin", e, None))?;
            let used_before = budget::used_pages(&inner)
                .map_err(|e| classify(&path, "read page count", e, None))?;
            let mut tx = Tx {
                inner,
                clock: &mut self.clock,
                node_id: &self.node_id,
                path: &path,
                max,
                stamped: false,
                headroom: false,
            };
            let out = f(&mut tx)?;
            if tx.stamped {
                let last = tx.clock.last().0.to_string();
                tx.inner
                    .execute("UPDATE meta SET value = ?1 WHERE key = 'hlc'", [last])
                    .map_err(|e| classify(&path, "persist hlc", e, Some((&tx.inner, max))))?;
            }
            if !tx.headroom {
                let used = budget::used_pages(&tx.inner)
                    .map_err(|e| classify(&path, "read page count", e, None))?;
                if used > soft && used > used_before {
                    // Dropping the transaction rolls it back.
                    return Err(StoreError::LimitReached {
                        path: path.clone(),
                        limit: max,
                    }
                    .into());
                }
            }
            let committed = tx.inner.commit();
            committed.map_err(|e| classify(&path, "commit", e, None))?;
            out
        };
        self.bound_wal();
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
        Ok(Stats {
            live,
            tombstones,
            outbox: outbox as u64,
            // What counts against storage.max_size: database, WAL, SHM.
            file_bytes: budget::footprint(&self.path),
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
