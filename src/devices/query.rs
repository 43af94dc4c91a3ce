//! What the doors read: devices with their local state, telemetry
//! history, alerts, and the devices-by-health figures for `/metrics`.
//! Read-only; every write is ingest's or the monitor's.

use rusqlite::{params, OptionalExtension};
use serde::Serialize;
use serde_json::Value;

use super::health::Health;
use super::{Alert, Device, DeviceError, Devices};
use crate::clock::rfc3339;
use crate::store::{Db, Kind, StoreError};

/// Telemetry rows returned by a history query when no limit is given.
pub(crate) const DEFAULT_HISTORY_LIMIT: usize = 100;
pub(crate) const MAX_HISTORY_LIMIT: usize = 10_000;

/// A device as the API shows it: the record plus its local state.
#[derive(Debug, Clone, Serialize)]
pub struct DeviceView {
    #[serde(flatten)]
    pub(crate) device: Device,
    pub(crate) telemetry_interval: String,
    pub(crate) health: Health,
    pub(crate) last_seen: String,
    pub(crate) last_seen_ms: u64,
    pub(crate) battery: Option<u8>,
    pub(crate) signal: Option<i16>,
    pub(crate) last_telemetry: Option<Value>,
    pub(crate) last_telemetry_at: Option<String>,
    pub(crate) telemetry_seq: u64,
    pub(crate) create_index: u64,
    pub(crate) modify_index: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct TelemetryPoint {
    pub(crate) seq: u64,
    pub(crate) received_at: String,
    pub(crate) received_at_ms: u64,
    pub(crate) values: Value,
}

/// The label of the `konsul_edge_devices` gauge (`state="online"`, ...):
/// `metrics` renders it without importing this module.
impl AsRef<str> for Health {
    fn as_ref(&self) -> &str {
        self.as_str()
    }
}

impl Devices {
    pub(crate) async fn list(&self) -> Result<Vec<DeviceView>, DeviceError> {
        self.registry
            .store()
            .call(|db| {
                let mut out = Vec::new();
                for rec in db.list(Kind::Device, None)? {
                    if let Some(v) = view(db, &rec)? {
                        out.push(v);
                    }
                }
                Ok(out)
            })
            .await?
    }

    pub(crate) async fn get(&self, id: String) -> Result<DeviceView, DeviceError> {
        self.registry
            .store()
            .call(move |db| {
                let rec = db.get(Kind::Device, &id)?.filter(|r| !r.tombstone);
                match rec {
                    Some(rec) => view(db, &rec)?.ok_or(DeviceError::NotFound { id }),
                    None => Err(DeviceError::NotFound { id }),
                }
            })
            .await?
    }

    /// History after `since` (a sequence number; 0 = from the oldest kept),
    /// oldest first, at most `limit` points.
    pub(crate) async fn telemetry(
        &self,
        id: String,
        since: u64,
        limit: usize,
    ) -> Result<Vec<TelemetryPoint>, DeviceError> {
        self.registry
            .store()
            .call(move |db| {
                if db
                    .get(Kind::Device, &id)?
                    .filter(|r| !r.tombstone)
                    .is_none()
                {
                    return Err(DeviceError::NotFound { id });
                }
                let mut stmt = db
                    .conn()
                    .prepare_cached(
                        "SELECT seq, ts_ms, body FROM telemetry WHERE device = ?1 AND seq > ?2
                         ORDER BY seq LIMIT ?3",
                    )
                    .map_err(|e| db.sql_error("read telemetry", e))?;
                let rows = stmt
                    .query_map(params![id, since as i64, limit as i64], |r| {
                        Ok((
                            r.get::<_, i64>(0)?,
                            r.get::<_, i64>(1)?,
                            r.get::<_, String>(2)?,
                        ))
                    })
                    .map_err(|e| db.sql_error("read telemetry", e))?;
                let mut out = Vec::new();
                for row in rows {
                    let (seq, ts, body) = row.map_err(|e| db.sql_error("read telemetry", e))?;
                    out.push(TelemetryPoint {
                        seq: seq as u64,
                        received_at: rfc3339(ts as u64),
                        received_at_ms: ts as u64,
                        values: serde_json::from_str(&body).unwrap_or(Value::Null),
                    });
                }
                Ok(out)
            })
            .await?
    }

    /// Alerts, newest first; `active_only` drops cleared ones; `device`
    /// narrows to one device.
    pub(crate) async fn alerts(
        &self,
        active_only: bool,
        device: Option<String>,
    ) -> Result<Vec<Alert>, DeviceError> {
        self.registry
            .store()
            .call(move |db| {
                let mut out: Vec<Alert> = Vec::new();
                for rec in db.list(Kind::Alert, None)? {
                    let a: Alert =
                        serde_json::from_str(&rec.body).map_err(|e| StoreError::BadRecord {
                            kind: "alert".into(),
                            key: rec.key.clone(),
                            detail: e.to_string(),
                        })?;
                    if (active_only && !a.active)
                        || device.as_deref().is_some_and(|d| d != a.device_id)
                    {
                        continue;
                    }
                    out.push(a);
                }
                out.sort_by_key(|a| std::cmp::Reverse(a.raised_at_ms));
                Ok(out)
            })
            .await?
    }

    /// Devices by health, for `/metrics`.
    pub(crate) async fn counts(&self) -> Result<Vec<(Health, u64)>, StoreError> {
        self.registry
            .store()
            .call(|db| {
                let mut out: Vec<(Health, u64)> = Health::ALL.iter().map(|h| (*h, 0)).collect();
                let mut stmt = db
                    .conn()
                    .prepare_cached("SELECT health, count(*) FROM device_state GROUP BY health")
                    .map_err(|e| db.sql_error("count devices", e))?;
                let rows = stmt
                    .query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?)))
                    .map_err(|e| db.sql_error("count devices", e))?;
                for row in rows {
                    let (h, n) = row.map_err(|e| db.sql_error("count devices", e))?;
                    let h = Health::parse(&h);
                    if let Some(slot) = out.iter_mut().find(|(k, _)| *k == h) {
                        slot.1 += n as u64;
                    }
                }
                Ok(out)
            })
            .await?
    }
}

fn view(db: &Db, rec: &crate::store::Record) -> Result<Option<DeviceView>, StoreError> {
    let device: Device = serde_json::from_str(&rec.body).map_err(|e| StoreError::BadRecord {
        kind: "device".into(),
        key: rec.key.clone(),
        detail: e.to_string(),
    })?;
    type Row = (
        i64,
        String,
        Option<u8>,
        Option<i16>,
        Option<String>,
        Option<i64>,
        i64,
    );
    let state: Option<Row> = db
        .conn()
        .prepare_cached(
            "SELECT last_seen_ms, health, battery, signal, last_telemetry, last_telemetry_ms,
                    telemetry_seq FROM device_state WHERE id = ?1",
        )
        .and_then(|mut s| {
            s.query_row([&rec.key], |r| {
                Ok((
                    r.get(0)?,
                    r.get(1)?,
                    r.get(2)?,
                    r.get(3)?,
                    r.get(4)?,
                    r.get(5)?,
                    r.get(6)?,
                ))
            })
            .optional()
        })
        .map_err(|e| db.sql_error("read device state", e))?;
    // A device synced from elsewhere has no local state until it talks to
    // this edge: it is shown as offline, never seen here.
    let (seen, health, battery, signal, last, last_ms, seq) =
        state.unwrap_or((0, "offline".into(), None, None, None, None, 0));
    Ok(Some(DeviceView {
        telemetry_interval: crate::config::Duration(std::time::Duration::from_millis(
            device.telemetry_interval_ms,
        ))
        .to_string(),
        device,
        health: Health::parse(&health),
        last_seen: if seen > 0 {
            rfc3339(seen as u64)
        } else {
            String::new()
        },
        last_seen_ms: seen as u64,
        battery,
        signal,
        last_telemetry: last.and_then(|b| serde_json::from_str(&b).ok()),
        last_telemetry_at: last_ms.map(|m| rfc3339(m as u64)),
        telemetry_seq: seq as u64,
        create_index: rec.create_index,
        modify_index: rec.modify_index,
    }))
}
