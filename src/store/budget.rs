//! How `storage.max_size` is shared out, and what gives way when it runs
//! out.
//!
//! The budget covers everything the store puts on disk: the database file,
//! its WAL and the WAL's shared-memory index. SQLite only limits the
//! database file (`max_page_count`), and by default lets the WAL grow to
//! about 4 MiB before it checkpoints, and never shrinks it: on a small
//! partition the WAL alone filled the disk. So the budget is split:
//!
//! - `SHM_RESERVE` for the `-shm` file (32 KiB covers a WAL of ~4000
//!   frames, far more than the WAL limit below allows);
//! - twice `wal_limit` for the WAL: `wal_autocheckpoint` checkpoints once
//!   the WAL holds `wal_limit` of pages (we are the only connection, so the
//!   checkpoint always completes) and the next commit writes the WAL from
//!   its start again, over blocks the file already has; `journal_size_limit`
//!   cuts a file left longer back to `wal_limit`. So the WAL never holds
//!   more than `wal_limit` plus one transaction. Only a commit that leaves
//!   the file well past that (one large transaction) checkpoints with
//!   TRUNCATE at once ([`Db::bound_wal`]). Truncating at every cycle would
//!   bound it too, but then every commit grows the file and each fsync
//!   also writes the inode: register throughput fell by a sixth that way;
//! - the rest for the database file, as `max_page_count` (the hard limit).
//!
//! Inside the database file a `headroom` of pages is kept for writes that
//! free space: a transaction that grows the live data (pages in use, not
//! counting the freelist) past `soft_pages` is rolled back with
//! `LimitReached` (HTTP 507), unless it was marked with
//! [`Tx::use_headroom`] (deletes, tombstone collection, telemetry
//! pruning). Those may use the headroom up to the hard limit, so an
//! operator can always delete, and the space they free is reused before
//! the file grows again.
//!
//! Order under pressure: telemetry first, then 507 for state. Before a
//! write, when the live data is within `margin` of the soft limit, the
//! oldest telemetry is evicted (down to two margins below it). Only when
//! there is no telemetry left to evict are state writes refused.
//!
//! Slack: a single transaction larger than `wal_limit` (max_size/8, at
//! most 4 MiB) can push the WAL past its share until the commit that
//! checkpoints it; nothing else exceeds `storage.max_size`.

use std::path::{Path, PathBuf};

use rusqlite::Connection;

use super::{Db, StoreError};

/// Bytes kept for the WAL's shared-memory index.
pub(crate) const SHM_RESERVE: u64 = 32 << 10;
/// Per-row overhead counted for a telemetry row, on top of its device id
/// and body (shared with the devices module's size accounting).
pub(crate) const TELEMETRY_ROW_OVERHEAD: u64 = 32;
/// Telemetry rows deleted per eviction transaction.
const EVICT_CHUNK: i64 = 256;

#[derive(Debug, Clone, Copy)]
pub(crate) struct Budget {
    /// WAL bytes after which a commit checkpoints and truncates the WAL.
    pub wal_limit: u64,
    /// `max_page_count`: only writes that free space may reach it.
    pub hard_pages: u64,
    /// Live pages past which a growing write is refused.
    pub soft_pages: u64,
    /// Eviction starts within this many pages of the soft limit.
    pub margin: u64,
}

impl Budget {
    pub fn new(max_size: u64, page_size: u64) -> Budget {
        let page_size = page_size.max(512);
        let wal_limit = (max_size / 8).clamp(32 << 10, 4 << 20);
        let db_bytes = max_size.saturating_sub(2 * wal_limit + SHM_RESERVE);
        let hard_pages = (db_bytes / page_size).max(32);
        let headroom = (hard_pages / 16).clamp(8, 256);
        let soft_pages = hard_pages - headroom;
        Budget {
            wal_limit,
            hard_pages,
            soft_pages,
            margin: (soft_pages / 32).max(4),
        }
    }
}

/// Pages holding data: the file's pages minus the freelist.
pub(crate) fn used_pages(c: &Connection) -> rusqlite::Result<u64> {
    let q = |sql: &str| c.query_row(sql, [], |r| r.get::<_, i64>(0));
    Ok((q("PRAGMA page_count")? - q("PRAGMA freelist_count")?).max(0) as u64)
}

pub(crate) fn wal_path(db: &Path) -> PathBuf {
    let mut p = db.as_os_str().to_owned();
    p.push("-wal");
    PathBuf::from(p)
}

/// Bytes on disk of the database, its WAL and its shared-memory file.
pub(crate) fn footprint(db: &Path) -> u64 {
    let len = |p: &Path| std::fs::metadata(p).map(|m| m.len()).unwrap_or(0);
    let mut shm = db.as_os_str().to_owned();
    shm.push("-shm");
    len(db) + len(&wal_path(db)) + len(Path::new(&shm))
}

impl Db {
    /// Sets the limits SQLite enforces itself: the hard page limit and the
    /// WAL's size.
    pub(super) fn apply_budget(&self) -> Result<(), StoreError> {
        let b = self.budget;
        let page_size = self.page_size.max(512);
        // These pragmas take bare numbers; pragma_update would quote them.
        for sql in [
            format!("PRAGMA max_page_count = {}", b.hard_pages),
            format!("PRAGMA journal_size_limit = {}", b.wal_limit),
            format!(
                "PRAGMA wal_autocheckpoint = {}",
                (b.wal_limit / page_size).max(8)
            ),
        ] {
            self.conn
                .query_row(&sql, [], |_| Ok(()))
                .map_err(super::sql_err(&self.path, "apply storage budget"))?;
        }
        Ok(())
    }

    /// After a commit: checkpoints and truncates a WAL that one large
    /// transaction left well past its share. The regular cycle is SQLite's
    /// own auto-checkpoint (see the module note); this threshold sits above
    /// it (frame headers add 24 bytes a page), so it never truncates a WAL
    /// that is about to be reused.
    pub(super) fn bound_wal(&self) {
        let wal = std::fs::metadata(wal_path(&self.path)).map_or(0, |m| m.len());
        if wal <= self.budget.wal_limit + self.budget.wal_limit / 4 {
            return;
        }
        if let Err(e) = self
            .conn
            .query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()))
        {
            log::warn!(
                "{}: WAL checkpoint at {wal} bytes failed: {e}",
                self.path.display()
            );
        }
    }

    /// Before a write: when live data is near the soft limit, evicts the
    /// oldest telemetry (down to two margins below it), each chunk in its
    /// own transaction on the headroom. Telemetry gives way before state.
    pub(super) fn relieve_pressure(&mut self) {
        let b = self.budget;
        // page_count >= used: one pragma decides the common case.
        let pages: i64 = self
            .conn
            .query_row("PRAGMA page_count", [], |r| r.get(0))
            .unwrap_or(0);
        if (pages as u64) + b.margin <= b.soft_pages
            || used_pages(&self.conn).unwrap_or(0) + b.margin <= b.soft_pages
        {
            return;
        }
        let target = b.soft_pages.saturating_sub(2 * b.margin);
        let mut rows = 0usize;
        while used_pages(&self.conn).unwrap_or(0) > target {
            match self.evict_telemetry_chunk() {
                Ok(0) => break,
                Ok(n) => rows += n,
                Err(e) => {
                    log::warn!("{e}");
                    break;
                }
            }
        }
        if rows > 0 {
            log::warn!(
                "{}: near storage.max_size ({} bytes): evicted the {rows} oldest telemetry rows",
                self.path.display(),
                self.max_size
            );
        }
    }

    fn evict_telemetry_chunk(&mut self) -> Result<usize, StoreError> {
        // run_tx, not tx: eviction must not ask for eviction again.
        self.run_tx(|tx| {
            tx.use_headroom();
            let c = tx.conn();
            let (rows, bytes): (i64, i64) = c
                .query_row(
                    "SELECT count(*), coalesce(sum(length(device) + length(body) + ?2), 0)
                     FROM (SELECT device, body FROM telemetry ORDER BY id LIMIT ?1)",
                    [EVICT_CHUNK, TELEMETRY_ROW_OVERHEAD as i64],
                    |r| Ok((r.get(0)?, r.get(1)?)),
                )
                .map_err(|e| tx.sql_error("find telemetry to evict", e))?;
            if rows == 0 {
                return Ok(0);
            }
            c.execute(
                "DELETE FROM telemetry WHERE id IN (SELECT id FROM telemetry ORDER BY id LIMIT ?1)",
                [EVICT_CHUNK],
            )
            .map_err(|e| tx.sql_error("evict telemetry", e))?;
            c.execute(
                "UPDATE meta SET value = max(0, CAST(value AS INTEGER) - ?1) WHERE key = 'telemetry_bytes'",
                [bytes],
            )
            .map_err(|e| tx.sql_error("account evicted telemetry", e))?;
            Ok(rows as usize)
        })
    }
}
