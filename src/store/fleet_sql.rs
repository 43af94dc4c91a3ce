//! The SQL behind the hub's fleet view (`/v1/edge/fleet/...`): edges with
//! their device and active alert counts and latest host OTA report,
//! devices and alerts with the edge they came from, and a device's newest
//! telemetry point received from its edge.
//!
//! Every query here is one scan (grouped by owner where SQL can), never one
//! query per edge: a hub with 1,000 edges and 10,000 devices answers the
//! edges list from one pass over the device and one over the alert records.
//! Rows come back as JSON values and every column is read as text through
//! one row reader: the page's routes cost the binary a few KB, not one
//! generic instantiation per row type (the edge binary has a size budget).

use serde_json::{json, Map, Value};

use super::{sql_err, Db, StoreError};

fn parse(body: &str) -> Value {
    serde_json::from_str(body).unwrap_or(Value::Null)
}

fn num(s: &str) -> u64 {
    s.parse().unwrap_or(0)
}

impl Db {
    /// Every row of `sql` (bound to `arg`, if any), each column as text
    /// ('' for NULL; the SQL casts numbers).
    fn text_rows(
        &self,
        op: &'static str,
        sql: &str,
        arg: Option<&str>,
    ) -> Result<Vec<Vec<String>>, StoreError> {
        let err = || sql_err(&self.path, op);
        let mut stmt = self.conn.prepare_cached(sql).map_err(err())?;
        let n = stmt.column_count();
        let params: Vec<&dyn rusqlite::ToSql> = match &arg {
            Some(a) => vec![a],
            None => Vec::new(),
        };
        let rows = stmt
            .query_map(params.as_slice(), |r| {
                (0..n)
                    .map(|i| Ok(r.get::<_, Option<String>>(i)?.unwrap_or_default()))
                    .collect::<rusqlite::Result<Vec<String>>>()
            })
            .map_err(err())?;
        rows.collect::<Result<_, _>>().map_err(err())
    }

    /// Every edge that ever synced, with its device and active alert
    /// counts, from its latest host OTA report the deployment's state,
    /// version and slots ('' without one), and what it last said of itself
    /// (version, pending changes, sync failures; null if it never did).
    pub fn fleet_edges(&self) -> Result<Vec<Value>, StoreError> {
        // Counts per edge in serde_json's map, which the binary carries
        // anyway (a map type of our own costs its code).
        let mut devices = Map::new();
        for r in self.text_rows(
            "fleet device counts",
            "SELECT owner, CAST(count(*) AS TEXT) FROM records
             WHERE kind = 'device' AND tombstone = 0 GROUP BY owner",
            None,
        )? {
            devices.insert(r[0].clone(), num(&r[1]).into());
        }
        // Alert bodies are read here: the SQLite builds we link may lack
        // the JSON functions.
        let mut alerts = Map::new();
        for r in self.fleet_alerts()? {
            if parse(&r[1])["active"] == true {
                let n = alerts.get(&r[0]).and_then(Value::as_u64).unwrap_or(0);
                alerts.insert(r[0].clone(), (n + 1).into());
            }
        }
        let mut conflicts = Map::new();
        for r in self.text_rows(
            "fleet conflicts",
            "SELECT edge, CAST(count(*) AS TEXT) FROM conflicts GROUP BY edge",
            None,
        )? {
            conflicts.insert(r[0].clone(), num(&r[1]).into());
        }
        let mut ota = Map::new();
        for r in self.text_rows(
            "fleet ota reports",
            "SELECT body FROM records WHERE kind = 'rollout' AND tombstone = 0
             AND key > 'status/' AND key < 'status0'",
            None,
        )? {
            let v = parse(&r[0]);
            let s = |k: &str| v[k].as_str().unwrap_or("").to_owned();
            let slot = match (s("from_slot"), s("target_slot")) {
                (f, t) if t.is_empty() => f,
                (f, t) if f.is_empty() => t,
                (f, t) => format!("{f} -> {t}"),
            };
            ota.insert(s("node_id"), json!([s("state"), s("version"), slot]));
        }
        let count = |m: &Map<String, Value>, k: &str| m.get(k).and_then(Value::as_u64).unwrap_or(0);
        Ok(self
            .text_rows(
                "fleet edges",
                "SELECT edge_id, CAST(last_seen_ms AS TEXT), CAST(last_index AS TEXT),
                        CAST(applied AS TEXT), status FROM edges",
                None,
            )?
            .into_iter()
            .map(|r| {
                let o = ota
                    .get(&r[0])
                    .cloned()
                    .unwrap_or_else(|| json!(["", "", ""]));
                // The edge's self-report; null fields for an edge too old
                // to send one.
                let said = parse(&r[4]);
                json!({
                    "edge_id": r[0],
                    "last_seen_ms": num(&r[1]),
                    "last_index": num(&r[2]),
                    "applied": num(&r[3]),
                    "conflicts": count(&conflicts, &r[0]),
                    "devices": count(&devices, &r[0]),
                    "alerts": count(&alerts, &r[0]),
                    "ota_state": o[0],
                    "ota_version": o[1],
                    "ota_slot": o[2],
                    "version": said["version"],
                    "pending_changes": said["pending_changes"],
                    "failed_rounds": said["failed_rounds"],
                    "last_error": said["last_error"],
                    "last_error_ms": said["last_error_ms"],
                })
            })
            .collect())
    }

    /// Live device records as [key, owning edge ('' = this node's own), body].
    pub fn fleet_devices(&self) -> Result<Vec<Vec<String>>, StoreError> {
        self.text_rows(
            "fleet devices",
            "SELECT key, owner, body FROM records WHERE kind = 'device' AND tombstone = 0",
            None,
        )
    }

    /// Live alert records as [owning edge, body].
    pub fn fleet_alerts(&self) -> Result<Vec<Vec<String>>, StoreError> {
        self.text_rows(
            "fleet alerts",
            "SELECT owner, body FROM records WHERE kind = 'alert' AND tombstone = 0",
            None,
        )
    }

    /// The newest telemetry point received for `device`: (ts_ms, payload).
    pub fn last_received(&self, device: &str) -> Result<Option<(u64, Value)>, StoreError> {
        Ok(self
            .text_rows(
                "last telemetry received",
                "SELECT CAST(ts_ms AS TEXT), CAST(payload AS TEXT) FROM telemetry_in
                 WHERE device_id = ?1 ORDER BY seq DESC LIMIT 1",
                Some(device),
            )?
            .into_iter()
            .next()
            .map(|r| (num(&r[0]), parse(&r[1]))))
    }
}
