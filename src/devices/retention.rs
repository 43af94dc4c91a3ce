//! Retention of the local history: telemetry and events older than
//! `devices.telemetry_retention` go, and telemetry is kept under
//! `devices.telemetry_max_size` (oldest first, down to 90%). The byte
//! total is kept in `meta` so a check costs one read, not a scan.

use rusqlite::params;

use super::{Devices, Settings};
use crate::clock::wall_millis;
use crate::store::{StoreError, Tx};

/// Per-row overhead counted against `devices.telemetry_max_size` besides
/// the body and the device id (rowid, seq, timestamp, b-tree cell); the
/// store's eviction under `storage.max_size` counts the same.
const ROW_OVERHEAD: u64 = crate::store::TELEMETRY_ROW_OVERHEAD;
/// Events are kept at most this many (besides the age limit).
const MAX_EVENTS: i64 = 10_000;

impl Devices {
    /// Applies the retention now.
    pub(crate) async fn prune_now(&self) -> Result<(), StoreError> {
        let settings = self.settings;
        self.registry
            .store()
            .call(move |db| {
                db.tx(|tx| {
                    // Pruning frees space: it must succeed on a full store.
                    tx.use_headroom();
                    prune(tx, settings, wall_millis())
                })
            })
            .await?
    }

    /// When the oldest telemetry or event row outlives the retention (for
    /// the monitor's timer); None when there is nothing to expire.
    pub(crate) async fn next_expiry(&self) -> Result<Option<u64>, StoreError> {
        let retention = self.settings.retention_ms;
        self.registry
            .store()
            .call(move |db| {
                let oldest: Option<i64> = db
                    .conn()
                    .query_row(
                        "SELECT min(m) FROM (SELECT min(ts_ms) AS m FROM telemetry
                         UNION ALL SELECT min(ts_ms) FROM device_events)",
                        [],
                        |r| r.get(0),
                    )
                    .map_err(|e| db.sql_error("oldest telemetry", e))?;
                Ok(oldest.map(|o| (o as u64).saturating_add(retention)))
            })
            .await?
    }
}

pub(super) fn row_bytes(device: &str, body: &str) -> u64 {
    (device.len() + body.len()) as u64 + ROW_OVERHEAD
}

pub(super) fn add_bytes(tx: &Tx<'_>, delta: i64) -> Result<(), StoreError> {
    tx.conn()
        .prepare_cached(
            "UPDATE meta SET value = max(0, CAST(value AS INTEGER) + ?1) WHERE key = 'telemetry_bytes'",
        )
        .and_then(|mut s| s.execute([delta]))
        .map_err(|e| tx.sql_error("account telemetry size", e))?;
    Ok(())
}

/// Drops telemetry and events past the retention, then the oldest
/// telemetry while the history exceeds `max_history_bytes` (down to 90%).
pub(super) fn prune(tx: &Tx<'_>, s: Settings, now: u64) -> Result<(), StoreError> {
    let c = tx.conn();
    let err = |e| tx.sql_error("prune telemetry", e);
    let cutoff = now.saturating_sub(s.retention_ms) as i64;
    let freed: i64 = c
        .prepare_cached(
            "DELETE FROM telemetry WHERE ts_ms < ?1 RETURNING length(device) + length(body) + ?2",
        )
        .and_then(|mut st| {
            st.query_map(params![cutoff, ROW_OVERHEAD as i64], |r| r.get::<_, i64>(0))?
                .sum::<Result<i64, _>>()
        })
        .map_err(err)?;
    c.prepare_cached("DELETE FROM device_events WHERE ts_ms < ?1")
        .and_then(|mut st| st.execute([cutoff]))
        .map_err(err)?;
    c.prepare_cached(
        "DELETE FROM device_events WHERE id <= (SELECT max(id) FROM device_events) - ?1",
    )
    .and_then(|mut st| st.execute([MAX_EVENTS]))
    .map_err(err)?;
    if freed > 0 {
        add_bytes(tx, -freed)?;
    }
    let total: i64 = c
        .query_row(
            "SELECT CAST(value AS INTEGER) FROM meta WHERE key = 'telemetry_bytes'",
            [],
            |r| r.get(0),
        )
        .map_err(err)?;
    if total as u64 <= s.max_history_bytes {
        return Ok(());
    }
    let target = (s.max_history_bytes / 10 * 9) as i64;
    let mut freed = 0i64;
    let mut cut = None;
    {
        let mut st = c
            .prepare_cached(
                "SELECT id, length(device) + length(body) + ?1 FROM telemetry ORDER BY id",
            )
            .map_err(err)?;
        let mut rows = st.query([ROW_OVERHEAD as i64]).map_err(err)?;
        while let Some(r) = rows.next().map_err(err)? {
            let (id, n): (i64, i64) = (r.get(0).map_err(err)?, r.get(1).map_err(err)?);
            freed += n;
            cut = Some(id);
            if total - freed <= target {
                break;
            }
        }
    }
    if let Some(cut) = cut {
        c.prepare_cached("DELETE FROM telemetry WHERE id <= ?1")
            .and_then(|mut st| st.execute([cut]))
            .map_err(err)?;
        add_bytes(tx, -freed)?;
        log::debug!("telemetry history over devices.telemetry_max_size: pruned {freed} bytes");
    }
    Ok(())
}
