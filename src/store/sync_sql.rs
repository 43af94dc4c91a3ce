//! The SQL behind sync: the change feed, outbox acknowledgement, conflicts,
//! the hub's list of edges, replayed batches and tombstone collection.
//! Kept in the store so SQL stays in one place; the sync module decides
//! what to do with it.

use rusqlite::{params, OptionalExtension};
use serde::Serialize;

use super::{row_to_record, sql_err, Db, Kind, Record, StoreError, Tx};
use crate::clock::Hlc;
use std::path::Path;

/// A recorded conflict, as operators list it.
#[derive(Debug, Clone, Serialize)]
pub struct ConflictRow {
    pub id: u64,
    pub kind: String,
    pub key: String,
    /// The edge whose batch revealed it ('' when found on an edge).
    pub edge: String,
    pub local: serde_json::Value,
    pub remote: serde_json::Value,
    pub winner: String,
    pub at_ms: u64,
}

/// A point of the local telemetry history, for shipping upstream.
#[derive(Debug, Clone)]
pub struct TelemetryRow {
    pub rowid: u64,
    pub device: String,
    pub seq: u64,
    pub ts_ms: i64,
    pub body: String,
}

/// A telemetry point a hub received from an edge.
#[derive(Debug, Clone)]
pub struct ReceivedPoint {
    pub seq: u64,
    pub ts_ms: i64,
    pub edge: String,
    pub payload: Vec<u8>,
}

/// The hub's view of one edge.
#[derive(Debug, Clone, Serialize)]
pub struct EdgeRow {
    pub edge_id: String,
    pub last_seen_ms: u64,
    pub last_index: u64,
    pub applied: u64,
    pub pending_conflicts: u64,
}

impl Db {
    pub fn meta_get(&self, key: &str) -> Result<Option<String>, StoreError> {
        self.conn
            .query_row("SELECT value FROM meta WHERE key = ?1", [key], |r| r.get(0))
            .optional()
            .map_err(sql_err(&self.path, "read meta"))
    }

    pub fn current_index(&self) -> Result<u64, StoreError> {
        self.meta_u64("index")
    }

    /// Telemetry received from edges (hub side) for one device, newest
    /// first: (seq, ts_ms, edge, payload).
    pub fn telemetry_received(
        &self,
        device: &str,
        limit: usize,
    ) -> Result<Vec<ReceivedPoint>, StoreError> {
        let mut stmt = self
            .conn
            .prepare_cached(
                "SELECT seq, ts_ms, edge_id, payload FROM telemetry_in WHERE device_id = ?1
                 ORDER BY seq DESC LIMIT ?2",
            )
            .map_err(sql_err(&self.path, "prepare received telemetry"))?;
        let rows = stmt
            .query_map(params![device, limit as i64], |r| {
                Ok(ReceivedPoint {
                    seq: r.get::<_, i64>(0)? as u64,
                    ts_ms: r.get(1)?,
                    edge: r.get(2)?,
                    payload: r.get(3)?,
                })
            })
            .map_err(sql_err(&self.path, "received telemetry"))?;
        rows.collect::<Result<_, _>>()
            .map_err(sql_err(&self.path, "received telemetry"))
    }

    /// Local telemetry history after `rowid`, oldest first:
    /// (rowid, device, seq, ts_ms, body).
    pub fn telemetry_after(
        &self,
        rowid: u64,
        limit: usize,
    ) -> Result<Vec<TelemetryRow>, StoreError> {
        let mut stmt = self
            .conn
            .prepare_cached(
                "SELECT id, device, seq, ts_ms, body FROM telemetry WHERE id > ?1 ORDER BY id LIMIT ?2",
            )
            .map_err(sql_err(&self.path, "prepare telemetry"))?;
        let rows = stmt
            .query_map(params![rowid as i64, limit as i64], |r| {
                Ok(TelemetryRow {
                    rowid: r.get::<_, i64>(0)? as u64,
                    device: r.get(1)?,
                    seq: r.get::<_, i64>(2)? as u64,
                    ts_ms: r.get(3)?,
                    body: r.get(4)?,
                })
            })
            .map_err(sql_err(&self.path, "telemetry"))?;
        rows.collect::<Result<_, _>>()
            .map_err(sql_err(&self.path, "telemetry"))
    }

    pub fn conflicts(&self, limit: usize) -> Result<Vec<ConflictRow>, StoreError> {
        let mut stmt = self
            .conn
            .prepare_cached(
                "SELECT id, kind, key, edge, local, remote, winner, at_ms FROM conflicts
                 ORDER BY id DESC LIMIT ?1",
            )
            .map_err(sql_err(&self.path, "prepare conflicts"))?;
        let rows = stmt
            .query_map([limit as i64], |r| {
                let json = |i: usize| -> rusqlite::Result<serde_json::Value> {
                    let s: String = r.get(i)?;
                    Ok(serde_json::from_str(&s).unwrap_or(serde_json::Value::String(s)))
                };
                Ok(ConflictRow {
                    id: r.get::<_, i64>(0)? as u64,
                    kind: r.get(1)?,
                    key: r.get(2)?,
                    edge: r.get(3)?,
                    local: json(4)?,
                    remote: json(5)?,
                    winner: r.get(6)?,
                    at_ms: r.get::<_, i64>(7)? as u64,
                })
            })
            .map_err(sql_err(&self.path, "conflicts"))?;
        rows.collect::<Result<_, _>>()
            .map_err(sql_err(&self.path, "conflicts"))
    }

    pub fn edges(&self) -> Result<Vec<EdgeRow>, StoreError> {
        let mut stmt = self
            .conn
            .prepare_cached(
                "SELECT e.edge_id, e.last_seen_ms, e.last_index, e.applied,
                        (SELECT count(*) FROM conflicts c WHERE c.edge = e.edge_id)
                 FROM edges e ORDER BY e.edge_id",
            )
            .map_err(sql_err(&self.path, "prepare edges"))?;
        let rows = stmt
            .query_map([], |r| {
                Ok(EdgeRow {
                    edge_id: r.get(0)?,
                    last_seen_ms: r.get::<_, i64>(1)? as u64,
                    last_index: r.get::<_, i64>(2)? as u64,
                    applied: r.get::<_, i64>(3)? as u64,
                    pending_conflicts: r.get::<_, i64>(4)? as u64,
                })
            })
            .map_err(sql_err(&self.path, "edges"))?;
        rows.collect::<Result<_, _>>()
            .map_err(sql_err(&self.path, "edges"))
    }
}

impl Tx<'_> {
    /// Records changed after `since` that edge `edge` may see, in index
    /// order, at most `limit`. `owner` scoping: global records ('') and the
    /// edge's own; `echo`: whether to include versions the edge itself
    /// supplied (yes after it lost data).
    pub fn changes_since(
        &self,
        since: u64,
        edge: &str,
        echo: bool,
        limit: usize,
    ) -> Result<Vec<Record>, StoreError> {
        let mut stmt = self
            .inner
            .prepare_cached(select_records!(
                "WHERE modify_index > ?1 AND (owner = '' OR owner = ?2) AND (?3 OR src != ?2)
                 ORDER BY modify_index LIMIT ?4"
            ))
            .map_err(self.err("prepare changes"))?;
        let rows = stmt
            .query_map(
                params![since as i64, edge, echo, limit as i64],
                row_to_record,
            )
            .map_err(self.err("changes"))?;
        let out: rusqlite::Result<Vec<Record>> = rows.collect();
        out.map_err(self.err("changes"))
    }

    pub fn meta_set(&mut self, key: &str, value: &str) -> Result<(), StoreError> {
        self.inner
            .execute(
                "INSERT INTO meta (key, value) VALUES (?1, ?2)
                 ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                params![key, value],
            )
            .map_err(self.err("write meta"))?;
        Ok(())
    }

    pub fn meta_get(&self, key: &str) -> Result<Option<String>, StoreError> {
        self.inner
            .query_row("SELECT value FROM meta WHERE key = ?1", [key], |r| r.get(0))
            .optional()
            .map_err(self.err("read meta"))
    }

    pub fn current_index(&self) -> Result<u64, StoreError> {
        let v: Option<String> = self.meta_get("index")?;
        Ok(v.and_then(|v| v.parse().ok()).unwrap_or(0))
    }

    /// Removes acknowledged outbox rows. A key written again after it was
    /// sent has a new seq and stays queued.
    pub fn ack_outbox(&mut self, seqs: &[u64]) -> Result<(), StoreError> {
        let mut stmt = self
            .inner
            .prepare_cached("DELETE FROM outbox WHERE seq = ?1")
            .map_err(self.err("prepare ack"))?;
        for seq in seqs {
            stmt.execute([*seq as i64])
                .map_err(self.err("ack outbox"))?;
        }
        Ok(())
    }

    /// Drops a key from the outbox (its pending version was superseded by
    /// the one the hub sent).
    pub fn dequeue(&mut self, kind: Kind, key: &str) -> Result<(), StoreError> {
        self.inner
            .prepare_cached("DELETE FROM outbox WHERE kind = ?1 AND key = ?2")
            .and_then(|mut s| s.execute(params![kind.as_str(), key]))
            .map_err(self.err("dequeue"))?;
        Ok(())
    }

    #[allow(clippy::too_many_arguments)]
    pub fn record_conflict(
        &mut self,
        kind: Kind,
        key: &str,
        edge: &str,
        local: &str,
        remote: &str,
        winner: &str,
        at_ms: u64,
    ) -> Result<(), StoreError> {
        self.inner
            .prepare_cached(
                "INSERT INTO conflicts (kind, key, edge, local, remote, winner, at_ms)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
            )
            .and_then(|mut s| {
                s.execute(params![
                    kind.as_str(),
                    key,
                    edge,
                    local,
                    remote,
                    winner,
                    at_ms as i64
                ])
            })
            .map_err(self.err("record conflict"))?;
        Ok(())
    }

    /// True when this edge's batch was applied before (a retry).
    pub fn batch_seen(&self, edge: &str, batch: &str) -> Result<bool, StoreError> {
        let n: i64 = self
            .inner
            .query_row(
                "SELECT count(*) FROM applied_batches WHERE edge_id = ?1 AND batch_id = ?2",
                params![edge, batch],
                |r| r.get(0),
            )
            .map_err(self.err("check batch"))?;
        Ok(n > 0)
    }

    pub fn batch_applied(&mut self, edge: &str, batch: &str, at_ms: u64) -> Result<(), StoreError> {
        self.inner
            .execute(
                "INSERT OR IGNORE INTO applied_batches (edge_id, batch_id, at_ms) VALUES (?1, ?2, ?3)",
                params![edge, batch, at_ms as i64],
            )
            .map_err(self.err("remember batch"))?;
        // A retry comes within minutes; a week of ids is plenty.
        self.inner
            .execute(
                "DELETE FROM applied_batches WHERE at_ms < ?1",
                [at_ms.saturating_sub(7 * 86_400_000) as i64],
            )
            .map_err(self.err("prune batches"))?;
        Ok(())
    }

    /// Records a sync from `edge`; `status` (the edge's self-report as
    /// JSON) replaces the kept one when the edge sent one.
    pub fn edge_seen(
        &mut self,
        edge: &str,
        at_ms: u64,
        index: u64,
        applied: u64,
        status: Option<&str>,
    ) -> Result<(), StoreError> {
        self.inner
            .execute(
                "INSERT INTO edges (edge_id, last_seen_ms, last_index, applied, status)
                 VALUES (?1, ?2, ?3, ?4, coalesce(?5, ''))
                 ON CONFLICT (edge_id) DO UPDATE SET last_seen_ms = excluded.last_seen_ms,
                   last_index = excluded.last_index, applied = applied + excluded.applied,
                   status = coalesce(?5, status)",
                params![edge, at_ms as i64, index as i64, applied as i64, status],
            )
            .map_err(self.err("record edge"))?;
        Ok(())
    }

    /// Deletes tombstones older than `cutoff_hlc` that are not waiting in
    /// the outbox; returns the highest modify index removed (the horizon
    /// below which a delta sync can no longer be complete).
    pub fn collect_tombstones(&mut self, cutoff_hlc: u64) -> Result<Option<u64>, StoreError> {
        // Collection frees space: it must succeed on a full store.
        self.use_headroom();
        let horizon: Option<i64> = self
            .inner
            .query_row(
                "SELECT max(modify_index) FROM records r WHERE tombstone = 1 AND hlc < ?1
                 AND NOT EXISTS (SELECT 1 FROM outbox o WHERE o.kind = r.kind AND o.key = r.key)",
                [cutoff_hlc as i64],
                |r| r.get(0),
            )
            .map_err(self.err("find tombstones"))?;
        if horizon.is_none() {
            return Ok(None);
        }
        self.inner
            .execute(
                "DELETE FROM records WHERE tombstone = 1 AND hlc < ?1
                 AND NOT EXISTS (SELECT 1 FROM outbox o WHERE o.kind = records.kind AND o.key = records.key)",
                [cutoff_hlc as i64],
            )
            .map_err(self.err("collect tombstones"))?;
        Ok(horizon.map(|h| h as u64))
    }

    /// Stores telemetry points from an edge once per (device, seq);
    /// returns how many were new.
    pub fn store_telemetry(
        &mut self,
        edge: &str,
        points: &[(String, u64, i64, Vec<u8>)],
    ) -> Result<usize, StoreError> {
        let mut stmt = self
            .inner
            .prepare_cached(
                "INSERT OR IGNORE INTO telemetry_in (device_id, seq, edge_id, ts_ms, payload)
                 VALUES (?1, ?2, ?3, ?4, ?5)",
            )
            .map_err(self.err("prepare telemetry"))?;
        let mut n = 0;
        for (device, seq, ts, payload) in points {
            n += stmt
                .execute(params![device, *seq as i64, edge, ts, payload])
                .map_err(self.err("store telemetry"))?;
        }
        Ok(n)
    }

    /// Local records not refreshed since `index` and not queued: after a
    /// full sync these are gone from the hub for good.
    pub fn drop_stale(&mut self, index: u64) -> Result<usize, StoreError> {
        self.inner
            .execute(
                "DELETE FROM records WHERE modify_index <= ?1
                 AND NOT EXISTS (SELECT 1 FROM outbox o WHERE o.kind = records.kind AND o.key = records.key)",
                [index as i64],
            )
            .map_err(self.err("drop stale records"))
    }

    /// Moves a record to a new modify index without changing it (marks it
    /// as seen during a full sync).
    pub fn touch(&mut self, kind: Kind, key: &str) -> Result<(), StoreError> {
        let index = self.next_index()?;
        self.inner
            .prepare_cached("UPDATE records SET modify_index = ?3 WHERE kind = ?1 AND key = ?2")
            .and_then(|mut s| s.execute(params![kind.as_str(), key, index as i64]))
            .map_err(self.err("touch"))?;
        Ok(())
    }
}

/// What [`reset_clock`] found and did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClockReset {
    /// The persisted clock it found.
    pub was: Hlc,
    /// The persisted clock it left (`was` when nothing was ahead).
    pub now: Hlc,
    /// Records stamped after the wall clock, given fresh stamps.
    pub restamped: u64,
}

/// Offline repair of a clock carried ahead of `wall_ms` (`konsul-edge
/// repair-clock`): records stamped after `wall_ms` get fresh stamps from
/// `wall_ms` on, in their old order (field stamps ahead of it too), and
/// the persisted clock is set to the last stamp issued, or to `wall_ms`.
/// Such records would otherwise win every merge and be refused by peers.
/// Their modify index is kept: the peers that refused them have not moved
/// past it. Nothing is written when nothing is ahead.
///
/// Takes the database exclusively, so it fails (SQLITE_BUSY) while a
/// daemon has it open rather than changing the clock under it.
pub fn reset_clock(path: &Path, wall_ms: u64) -> Result<ClockReset, StoreError> {
    use crate::clock::HlcClock;
    use crate::crdt::FieldStamps;
    use rusqlite::{Connection, OpenFlags, TransactionBehavior};

    // No CREATE: a missing file is an error, not a new database. What the
    // file is, SQLite and the application_id below say.
    let mut conn = Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .map_err(|source| StoreError::Open {
        path: path.into(),
        source,
    })?;
    let err = |op| sql_err(path, op);
    conn.busy_timeout(std::time::Duration::ZERO)
        .map_err(err("busy_timeout"))?;
    // Before the first access: a WAL database then takes the file lock
    // itself instead of sharing memory with other connections.
    conn.pragma_update(None, "locking_mode", "EXCLUSIVE")
        .map_err(err("set locking_mode"))?;
    let tx = conn
        .transaction_with_behavior(TransactionBehavior::Exclusive)
        .map_err(err("lock the database"))?;
    let app_id: i32 = tx
        .query_row("PRAGMA application_id", [], |r| r.get(0))
        .map_err(err("read application_id"))?;
    if app_id != super::APPLICATION_ID {
        return Err(StoreError::NotKonsul {
            path: path.into(),
            detail: format!("application_id {app_id:#x}"),
        });
    }
    let was: String = tx
        .query_row("SELECT value FROM meta WHERE key = 'hlc'", [], |r| r.get(0))
        .map_err(err("read hlc"))?;
    let was = Hlc(was.parse().unwrap_or(0));
    let ceiling = Hlc::new(wall_ms, u16::MAX).0;
    let ahead: Vec<(String, String, String)> = {
        let mut stmt = tx
            .prepare(
                "SELECT kind, key, fields FROM records WHERE hlc > ?1 ORDER BY hlc, modify_index",
            )
            .map_err(err("prepare records ahead"))?;
        let rows = stmt
            .query_map([ceiling as i64], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
            .map_err(err("records ahead"))?;
        rows.collect::<Result<_, _>>()
            .map_err(err("records ahead"))?
    };
    if was.0 <= ceiling && ahead.is_empty() {
        return Ok(ClockReset {
            was,
            now: was,
            restamped: 0,
        });
    }
    // Never below a stamp that stays: the clock must stay past them all.
    let kept: Option<i64> = tx
        .query_row(
            "SELECT max(hlc) FROM records WHERE hlc <= ?1",
            [ceiling as i64],
            |r| r.get(0),
        )
        .map_err(err("newest record"))?;
    let floor = Hlc(kept.unwrap_or(0) as u64).max(Hlc::new(wall_ms, 0));
    let mut clock = HlcClock::with_wall(floor, Box::new(move || wall_ms));
    let mut last = floor;
    for (kind, key, fields) in &ahead {
        let stamp = clock.now();
        last = stamp;
        let mut stamps: FieldStamps = serde_json::from_str(fields).unwrap_or_default();
        for s in stamps.values_mut().filter(|s| s.hlc > ceiling) {
            s.hlc = stamp.0;
        }
        let fields = serde_json::to_string(&stamps).map_err(|e| StoreError::BadRecord {
            kind: kind.clone(),
            key: key.clone(),
            detail: e.to_string(),
        })?;
        tx.execute(
            "UPDATE records SET hlc = ?3, fields = ?4 WHERE kind = ?1 AND key = ?2",
            params![kind, key, stamp.0 as i64, fields],
        )
        .map_err(err("restamp record"))?;
    }
    tx.execute(
        "UPDATE meta SET value = ?1 WHERE key = 'hlc'",
        [last.0.to_string()],
    )
    .map_err(err("write hlc"))?;
    tx.commit().map_err(err("commit"))?;
    Ok(ClockReset {
        was,
        now: last,
        restamped: ahead.len() as u64,
    })
}
