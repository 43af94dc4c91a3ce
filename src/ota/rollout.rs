//! Host rollouts: A/B updates of the edges themselves, defined on a hub.
//!
//! A host rollout is one replicated record (`Kind::Rollout`, key
//! `host/{id}`) written on the hub through `registry::commit`. Written at
//! the hub it is global, so it reaches every edge by ordinary sync, an
//! edge that was offline when it was created included (its next delta sync
//! starts from its last index). The key holds a `/`, so the firmware
//! engine, which reads only top-level rollout keys, never sees it.
//!
//! It carries what a bundle manifest carries (version, size, sha256,
//! ed25519 signature: see `bundle`), where to download the image (`url`;
//! empty = the hub's artifact store, `/v1/edge/firmware/{sha256}`, which
//! serves Range), the target edges (empty = all) and optionally a
//! maintenance window that replaces `ota.maintenance_window` for it.
//!
//! An edge answers with its usual OTA report (`status/{node}`, owned by the
//! edge, so it flows up and back only to that edge), which names the
//! rollout; the hub's per-rollout view is the reports that name it.
//!
//! Which rollout an edge acts on: the newest (`created_ms`, then id) that
//! targets it, if newer than the last one it acted on (`rollout_seen` in
//! the `ota` row, kept across deployments). Acting is installing,
//! skipping (that version is already committed or under way) or refusing
//! (bad signature), each recorded and reported. A rollout is never acted on
//! twice: after a failure the operator creates a new one.

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use super::bundle::Manifest;
use super::OtaError;
use crate::store::{Kind, StoreError};

/// Key prefix of host rollouts among `Kind::Rollout` records.
pub const PREFIX: &str = "host/";

/// The record (key `host/{id}`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HostRollout {
    pub id: String,
    pub version: String,
    pub size: u64,
    pub sha256: String,
    pub signature: String,
    /// Where edges download the bundle; empty: the hub's artifact store.
    #[serde(default)]
    pub url: String,
    /// Node ids; empty: every edge.
    #[serde(default)]
    pub edges: Vec<String>,
    /// Replaces `ota.maintenance_window` for this update's reboot.
    #[serde(default)]
    pub maintenance_window: Option<String>,
    pub created_ms: u64,
}

impl HostRollout {
    pub fn targets(&self, node: &str) -> bool {
        self.edges.is_empty() || self.edges.iter().any(|e| e == node)
    }

    pub fn manifest(&self) -> Manifest {
        Manifest {
            version: self.version.clone(),
            size: self.size,
            sha256: self.sha256.clone(),
            signature: self.signature.clone(),
        }
    }

    /// The order rollouts supersede each other in.
    pub fn mark(&self) -> (u64, String) {
        (self.created_ms, self.id.clone())
    }

    /// The download source: the URL, or the hub's artifact route.
    pub fn source(&self) -> String {
        if self.url.is_empty() {
            format!("/v1/edge/firmware/{}", self.sha256)
        } else {
            self.url.clone()
        }
    }
}

/// What `POST /v1/edge/ota/rollouts` takes. Unknown fields are refused: a
/// misspelt `edges` must not turn into "every edge".
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Spec {
    #[serde(default)]
    pub id: Option<String>,
    pub version: String,
    pub size: u64,
    pub sha256: String,
    pub signature: String,
    #[serde(default)]
    pub url: Option<String>,
    #[serde(default)]
    pub edges: Vec<String>,
    #[serde(default)]
    pub maintenance_window: Option<String>,
}

fn valid_id(id: &str) -> bool {
    crate::devices::payload::valid_id(id) && id.len() <= 64
}

/// Validates a spec into the record (not yet stored).
pub fn from_spec(spec: Spec, now_ms: u64) -> Result<HostRollout, OtaError> {
    let invalid = |m: String| OtaError::Invalid(m);
    let m = Manifest {
        version: spec.version,
        size: spec.size,
        sha256: spec.sha256,
        signature: spec.signature,
    }
    .checked()
    .map_err(invalid)?;
    if m.size == 0 {
        return Err(invalid("size: the bundle's size in bytes, > 0".into()));
    }
    let id = spec
        .id
        .unwrap_or_else(|| format!("{}-{:06x}", m.version, fastrand::u32(..0xFF_FFFF)));
    if !valid_id(&id) {
        return Err(invalid(format!(
            "id `{}`: 1-64 of A-Z a-z 0-9 - _ . :",
            id.escape_debug()
        )));
    }
    let url = spec.url.unwrap_or_default();
    if !url.is_empty() {
        crate::sync::transport::Endpoint::parse(&url).map_err(|e| invalid(format!("url: {e}")))?;
    }
    if let Some(e) = spec
        .edges
        .iter()
        .find(|e| !crate::devices::payload::valid_id(e))
    {
        return Err(invalid(format!(
            "edges: `{}` is not a node id",
            e.escape_debug()
        )));
    }
    if let Some(w) = &spec.maintenance_window {
        crate::config::parse_window(w).map_err(|e| invalid(format!("maintenance_window: {e}")))?;
    }
    Ok(HostRollout {
        id,
        version: m.version,
        size: m.size,
        sha256: m.sha256,
        signature: m.signature,
        url,
        edges: spec.edges,
        maintenance_window: spec.maintenance_window,
        created_ms: now_ms,
    })
}

/// Every host rollout. Unreadable records (a newer hub's format) are
/// skipped with a warning rather than wedging updates.
pub fn load(c: &rusqlite::Connection) -> rusqlite::Result<Vec<HostRollout>> {
    // `0` sorts right after `/`: the range is exactly the prefix.
    let mut st = c.prepare_cached(
        "SELECT key, body FROM records WHERE kind = 'rollout' AND tombstone = 0
         AND key > 'host/' AND key < 'host0' ORDER BY key",
    )?;
    let rows = st
        .query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?)))?
        .collect::<rusqlite::Result<Vec<_>>>()?;
    Ok(rows
        .into_iter()
        .filter_map(|(k, b)| match serde_json::from_str(&b) {
            Ok(r) => Some(r),
            Err(e) => {
                log::warn!("ota: rollout record {k} unreadable ({e}); ignored");
                None
            }
        })
        .collect())
}

/// The newest rollout for `node`, if newer than `seen`.
pub fn pending(
    c: &rusqlite::Connection,
    node: &str,
    seen: &(u64, String),
) -> rusqlite::Result<Option<HostRollout>> {
    Ok(load(c)?
        .into_iter()
        .filter(|r| r.targets(node))
        .max_by_key(HostRollout::mark)
        .filter(|r| r.mark() > *seen))
}

/// Every edge's latest OTA report, keyed by node.
fn reports(c: &rusqlite::Connection) -> rusqlite::Result<Vec<Value>> {
    let mut st = c.prepare_cached(
        "SELECT body FROM records WHERE kind = 'rollout' AND tombstone = 0
         AND key > 'status/' AND key < 'status0' ORDER BY key",
    )?;
    let rows = st
        .query_map([], |r| r.get::<_, String>(0))?
        .collect::<rusqlite::Result<Vec<_>>>()?;
    Ok(rows
        .iter()
        .filter_map(|b| serde_json::from_str(b).ok())
        .collect())
}

/// A rollout with the edges' outcomes: the latest report of every edge
/// naming it; each listed target that has not reported on it is `pending`,
/// or `moved-on` (with its latest report) when that names another
/// deployment, since an edge reports only its current one.
fn with_outcomes(r: &HostRollout, reports: &[Value]) -> Value {
    let mut edges: Vec<Value> = reports
        .iter()
        .filter(|rep| rep["rollout"] == r.id.as_str())
        .map(|rep| {
            json!({
                "node_id": rep["node_id"],
                "state": rep["state"],
                "version": rep["version"],
                "last_error": rep["last_error"],
                "at_ms": rep["at_ms"],
                "log": rep["log"],
            })
        })
        .collect();
    for e in &r.edges {
        if edges.iter().any(|x| x["node_id"] == e.as_str()) {
            continue;
        }
        edges.push(
            match reports.iter().find(|rep| rep["node_id"] == e.as_str()) {
                Some(rep) => json!({"node_id": e, "state": "moved-on", "latest": {
                    "rollout": rep["rollout"], "deployment": rep["deployment"],
                    "state": rep["state"], "version": rep["version"],
                }}),
                None => json!({"node_id": e, "state": "pending"}),
            },
        );
    }
    let mut v = json!(r);
    v["edge_states"] = Value::Array(edges);
    v
}

pub fn list(c: &rusqlite::Connection) -> rusqlite::Result<Vec<Value>> {
    let reports = reports(c)?;
    Ok(load(c)?
        .iter()
        .map(|r| with_outcomes(r, &reports))
        .collect())
}

pub fn get(c: &rusqlite::Connection, id: &str) -> rusqlite::Result<Option<Value>> {
    let reports = reports(c)?;
    Ok(load(c)?
        .iter()
        .find(|r| r.id == id)
        .map(|r| with_outcomes(r, &reports)))
}

/// Stores a new rollout; an existing id is a conflict.
pub fn insert(tx: &mut crate::store::Tx<'_>, r: &HostRollout) -> Result<(), OtaError> {
    let key = format!("{PREFIX}{}", r.id);
    if tx.get(Kind::Rollout, &key)?.is_some_and(|x| !x.tombstone) {
        return Err(OtaError::NotApplicable(format!(
            "rollout {} already exists",
            r.id
        )));
    }
    let body = serde_json::to_string(r).map_err(|e| {
        OtaError::Store(StoreError::BadRecord {
            kind: "rollout".into(),
            key: key.clone(),
            detail: e.to_string(),
        })
    })?;
    crate::registry::commit(tx, Kind::Rollout, &key, None, Some(body))?;
    Ok(())
}

/// Withdraws a rollout (a tombstone, replicated): edges that have not
/// acted on it no longer will; one already downloading carries on.
pub fn remove(tx: &mut crate::store::Tx<'_>, id: &str) -> Result<(), OtaError> {
    let key = format!("{PREFIX}{id}");
    if tx.get(Kind::Rollout, &key)?.is_none_or(|x| x.tombstone) {
        return Err(OtaError::NotFound(format!("rollout {id}")));
    }
    crate::registry::commit(tx, Kind::Rollout, &key, None, None)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> Spec {
        Spec {
            id: Some("r1".into()),
            version: "2.0".into(),
            size: 10,
            sha256: "AB".repeat(32),
            signature: "cd".repeat(64),
            url: None,
            edges: vec![],
            maintenance_window: None,
        }
    }

    #[test]
    fn specs_are_checked_like_manifests() {
        let r = from_spec(spec(), 5).unwrap();
        assert_eq!(r.sha256, "ab".repeat(32), "digest lower-cased");
        assert_eq!(r.source(), format!("/v1/edge/firmware/{}", r.sha256));
        assert!(r.targets("any"));
        for bad in [
            Spec {
                signature: "cd".repeat(10),
                ..spec()
            },
            Spec { size: 0, ..spec() },
            Spec {
                url: Some("ftp://x/y".into()),
                ..spec()
            },
            Spec {
                edges: vec!["a b".into()],
                ..spec()
            },
            Spec {
                maintenance_window: Some("25:00-26:00".into()),
                ..spec()
            },
            Spec {
                id: Some("x/y".into()),
                ..spec()
            },
        ] {
            assert!(from_spec(bad, 0).is_err());
        }
    }

    #[test]
    fn the_newest_targeting_rollout_is_pending_until_seen() {
        let dir = tempfile::tempdir().unwrap();
        let store = crate::store::Store::open(crate::store::StoreOptions {
            path: dir.path().join("k.db"),
            max_size: 8 << 20,
            node_id: "t".into(),
        })
        .unwrap();
        let a = from_spec(spec(), 5).unwrap();
        let b = HostRollout {
            id: "r2".into(),
            edges: vec!["other".into()],
            created_ms: 9,
            ..a.clone()
        };
        let (a2, b2) = (a.clone(), b.clone());
        let pending_for = |node: &'static str, seen: (u64, String)| {
            smol::block_on(store.call(move |db| pending(db.conn(), node, &seen)))
                .unwrap()
                .unwrap()
                .map(|r| r.id)
        };
        smol::block_on(store.call(move |db| {
            db.tx(|tx| {
                insert(tx, &a2)?;
                insert(tx, &b2)?;
                assert!(insert(tx, &a2).is_err(), "ids are unique");
                Ok::<_, OtaError>(())
            })
        }))
        .unwrap()
        .unwrap();
        assert_eq!(pending_for("me", (0, String::new())).as_deref(), Some("r1"));
        assert_eq!(pending_for("me", a.mark()), None, "acted on once");
        assert_eq!(pending_for("other", a.mark()).as_deref(), Some("r2"));
        assert_eq!(pending_for("other", b.mark()), None);
        smol::block_on(store.call(|db| db.tx(|tx| remove(tx, "r2"))))
            .unwrap()
            .unwrap();
        assert_eq!(
            pending_for("other", (0, String::new())).as_deref(),
            Some("r1"),
            "a deleted rollout is withdrawn"
        );
        store.close();
    }
}
