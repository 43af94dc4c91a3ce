//! The SQL behind the hub's fleet view (`/v1/edge/fleet/...`): per-edge
//! device and alert counts, devices and alerts with the edge they came
//! from, and a device's newest telemetry point received from its edge.
//!
//! Every query here is one scan (grouped by owner where SQL can), never one
//! query per edge: a hub with 1,000 edges and 10,000 devices answers the
//! edges list from one pass over the device and one over the alert records. Paging, filtering
//! and sorting happen in the caller on these rows (a few MB at most).

use std::collections::HashMap;

use rusqlite::OptionalExtension;
use serde::Serialize;

use super::{sql_err, Db, StoreError};

/// One edge as the fleet view lists it.
#[derive(Debug, Clone, Serialize)]
pub struct FleetEdge {
    pub edge_id: String,
    pub last_seen_ms: u64,
    pub last_index: u64,
    /// Changes from this edge applied at the hub, in total.
    pub applied: u64,
    pub conflicts: u64,
    pub devices: u64,
    /// Active alerts of this edge's devices.
    pub alerts: u64,
    /// From the edge's latest host OTA report ('' without one): its
    /// deployment's state and version, and the slot it boots from or to.
    pub ota_state: String,
    pub ota_version: String,
    pub ota_slot: String,
}

/// A device record at the hub with the edge that owns it.
#[derive(Debug, Clone)]
pub struct FleetDevice {
    pub id: String,
    pub edge: String,
    pub body: String,
}

impl Db {
    /// Every edge that ever synced, with its device and active alert counts.
    pub fn fleet_edges(&self) -> Result<Vec<FleetEdge>, StoreError> {
        let err = |op| sql_err(&self.path, op);
        let mut devices: HashMap<String, u64> = HashMap::new();
        let mut stmt = self
            .conn
            .prepare_cached(
                "SELECT owner, count(*) FROM records WHERE kind = 'device' AND tombstone = 0
                 GROUP BY owner",
            )
            .map_err(err("prepare fleet counts"))?;
        let rows = stmt
            .query_map([], |r| {
                Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)? as u64))
            })
            .map_err(err("fleet counts"))?;
        for row in rows {
            let (owner, n) = row.map_err(err("fleet counts"))?;
            devices.insert(owner, n);
        }
        // Alert bodies are read here: the SQLite builds we link may lack
        // the JSON functions.
        #[derive(serde::Deserialize)]
        struct Active {
            #[serde(default)]
            active: bool,
        }
        let mut alerts: HashMap<String, u64> = HashMap::new();
        for (owner, body) in self.fleet_alerts()? {
            if serde_json::from_str::<Active>(&body).is_ok_and(|a| a.active) {
                *alerts.entry(owner).or_default() += 1;
            }
        }
        let ota = self.ota_reports()?;
        let mut conflicts: HashMap<String, u64> = HashMap::new();
        let mut stmt = self
            .conn
            .prepare_cached("SELECT edge, count(*) FROM conflicts GROUP BY edge")
            .map_err(err("prepare fleet conflicts"))?;
        let rows = stmt
            .query_map([], |r| {
                Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)? as u64))
            })
            .map_err(err("fleet conflicts"))?;
        for row in rows {
            let (edge, n) = row.map_err(err("fleet conflicts"))?;
            conflicts.insert(edge, n);
        }
        let mut stmt = self
            .conn
            .prepare_cached("SELECT edge_id, last_seen_ms, last_index, applied FROM edges")
            .map_err(err("prepare fleet edges"))?;
        let rows = stmt
            .query_map([], |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    r.get::<_, i64>(1)? as u64,
                    r.get::<_, i64>(2)? as u64,
                    r.get::<_, i64>(3)? as u64,
                ))
            })
            .map_err(err("fleet edges"))?;
        let mut out = Vec::new();
        for row in rows {
            let (edge_id, last_seen_ms, last_index, applied) = row.map_err(err("fleet edges"))?;
            let (ota_state, ota_version, ota_slot) = ota.get(&edge_id).cloned().unwrap_or_default();
            out.push(FleetEdge {
                ota_state,
                ota_version,
                ota_slot,
                conflicts: conflicts.get(&edge_id).copied().unwrap_or(0),
                devices: devices.get(&edge_id).copied().unwrap_or(0),
                alerts: alerts.get(&edge_id).copied().unwrap_or(0),
                edge_id,
                last_seen_ms,
                last_index,
                applied,
            });
        }
        Ok(out)
    }

    /// Each edge's latest host OTA report (`status/{node}` rollout
    /// records): node -> (state, version, slot).
    fn ota_reports(&self) -> Result<HashMap<String, (String, String, String)>, StoreError> {
        #[derive(serde::Deserialize)]
        struct Report {
            node_id: String,
            #[serde(default)]
            state: String,
            #[serde(default)]
            version: String,
            #[serde(default)]
            from_slot: String,
            #[serde(default)]
            target_slot: String,
        }
        let err = |op| sql_err(&self.path, op);
        let mut stmt = self
            .conn
            .prepare_cached(
                "SELECT body FROM records WHERE kind = 'rollout' AND tombstone = 0
                 AND key > 'status/' AND key < 'status0'",
            )
            .map_err(err("prepare ota reports"))?;
        let rows = stmt
            .query_map([], |r| r.get::<_, String>(0))
            .map_err(err("ota reports"))?;
        let mut out = HashMap::new();
        for row in rows {
            let body = row.map_err(err("ota reports"))?;
            if let Ok(r) = serde_json::from_str::<Report>(&body) {
                let slot = match (r.from_slot.as_str(), r.target_slot.as_str()) {
                    (f, "") => f.to_owned(),
                    ("", t) => t.to_owned(),
                    (f, t) => format!("{f} -> {t}"),
                };
                out.insert(r.node_id, (r.state, r.version, slot));
            }
        }
        Ok(out)
    }

    /// Live device records with their owning edge ('' = this node's own).
    pub fn fleet_devices(&self) -> Result<Vec<FleetDevice>, StoreError> {
        let err = |op| sql_err(&self.path, op);
        let mut stmt = self
            .conn
            .prepare_cached(
                "SELECT key, owner, body FROM records WHERE kind = 'device' AND tombstone = 0",
            )
            .map_err(err("prepare fleet devices"))?;
        let rows = stmt
            .query_map([], |r| {
                Ok(FleetDevice {
                    id: r.get(0)?,
                    edge: r.get(1)?,
                    body: r.get(2)?,
                })
            })
            .map_err(err("fleet devices"))?;
        rows.collect::<Result<_, _>>().map_err(err("fleet devices"))
    }

    /// Live alert records as (owning edge, body).
    pub fn fleet_alerts(&self) -> Result<Vec<(String, String)>, StoreError> {
        let err = |op| sql_err(&self.path, op);
        let mut stmt = self
            .conn
            .prepare_cached(
                "SELECT owner, body FROM records WHERE kind = 'alert' AND tombstone = 0",
            )
            .map_err(err("prepare fleet alerts"))?;
        let rows = stmt
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
            .map_err(err("fleet alerts"))?;
        rows.collect::<Result<_, _>>().map_err(err("fleet alerts"))
    }

    /// The newest telemetry point received for `device`: (ts_ms, payload).
    pub fn last_received(&self, device: &str) -> Result<Option<(i64, Vec<u8>)>, StoreError> {
        self.conn
            .prepare_cached(
                "SELECT ts_ms, payload FROM telemetry_in WHERE device_id = ?1
                 ORDER BY seq DESC LIMIT 1",
            )
            .and_then(|mut s| {
                s.query_row([device], |r| Ok((r.get(0)?, r.get(1)?)))
                    .optional()
            })
            .map_err(sql_err(&self.path, "last telemetry received"))
    }
}
