//! The hub side of `POST /v1/edge/sync`.
//!
//! One request is one store transaction: the edge's batch is validated as a
//! whole before anything is applied (a bad update rejects the batch and
//! changes nothing), applied unless this edge already sent the same batch
//! id, and answered with the records in the edge's scope changed since its
//! last index, paged by encoded size. Because apply and answer share the
//! transaction, the answer reflects the batch, and a crash before commit
//! leaves neither.
//!
//! Hostile input: the request is decoded within `wire`'s limits (4 MiB
//! decoded, 1000 updates, 500 telemetry points) and its updates are walked
//! twice, one decoded update at a time: once to validate them all, once to
//! apply them. Holding them all decoded would cost a hub hundreds of bytes
//! per update. The request's clock is checked like every stamp (at most
//! `clock::MAX_AHEAD_MS` ahead of the hub's wall clock) before anything is
//! observed, so a refused request moves neither the clock in memory nor
//! the persisted one.

use std::collections::BTreeMap;

use prost::Message;

use crate::clock::{check_remote, wall_millis, Hlc};
use crate::crdt::MergeStrategy;
use crate::registry::{ChangeOp, Registry};
use crate::store::StoreError;

use super::engine::{self, Direction};
use super::wire::{self, EdgeSyncResponse, WireError};

/// Smallest and default page of a response (encoded bytes).
const MIN_PAGE: usize = 4 << 10;
pub(crate) const DEFAULT_PAGE: usize = 256 << 10;
const MAX_PAGE: usize = 4 << 20;
/// Rows read per query while filling a page.
const CHUNK: usize = 256;

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error(transparent)]
    Wire(#[from] WireError),
    #[error("edge_id {0:?} is not a valid node id")]
    BadEdge(String),
    #[error("missing or wrong bearer token")]
    Unauthorized,
    #[error(transparent)]
    Store(#[from] StoreError),
}

pub struct Hub {
    pub registry: Registry,
    pub strategy: MergeStrategy,
    pub tombstone_retention_ms: u64,
    /// Accepted bearer tokens; empty: no token required.
    pub tokens: Vec<String>,
    /// `cloud.sync_interval`: how often its edges are expected to sync.
    pub sync_interval_ms: u64,
}

fn valid_edge_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 128
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
}

impl Hub {
    /// An edge that has not synced for two intervals (and a few seconds
    /// for a slow round) is stale in the fleet view.
    #[cfg(feature = "fleet-ui")]
    pub fn stale_after_ms(&self) -> u64 {
        self.sync_interval_ms.saturating_mul(2) + 5_000
    }

    pub fn authorize(&self, header: Option<&str>) -> Result<(), ServeError> {
        if self.tokens.is_empty() {
            return Ok(());
        }
        let presented = header.and_then(|h| h.strip_prefix("Bearer ")).unwrap_or("");
        // Compare every token in full so timing says nothing about prefixes.
        let ok = self.tokens.iter().fold(false, |acc, t| {
            let eq = t.len() == presented.len()
                && t.bytes()
                    .zip(presented.bytes())
                    .fold(0u8, |d, (a, b)| d | (a ^ b))
                    == 0;
            acc | eq
        });
        if ok {
            Ok(())
        } else {
            Err(ServeError::Unauthorized)
        }
    }

    /// Handles one sync request body; returns the encoded response.
    pub async fn handle(&self, body: &[u8], compressed: bool) -> Result<Vec<u8>, ServeError> {
        let mut request = wire::decode_request(body, compressed)?;
        let req = &request.head;
        if !valid_edge_id(&req.edge_id) {
            return Err(ServeError::BadEdge(req.edge_id.clone()));
        }
        let remote_hlc = Hlc(req.hlc);
        check_remote(
            || format!("sync request clock from {}", req.edge_id),
            remote_hlc,
            wall_millis(),
        )
        .map_err(WireError::from)?;
        // Validate every update before the store sees any: a bad one
        // refuses the batch before the clock observes its neighbours.
        for u in request.updates() {
            u?;
        }
        let telemetry: Vec<(String, u64, i64, Vec<u8>)> = request
            .head
            .telemetry
            .take()
            .map(|t| {
                t.points
                    .into_iter()
                    .filter(|p| !p.device_id.is_empty() && p.device_id.len() <= 128)
                    .map(|p| (p.device_id, p.seq, p.ts_ms, p.payload))
                    .collect()
            })
            .unwrap_or_default();
        let status = request.head.status.take();
        let req = &request.head;
        let page = match req.max_response_bytes as usize {
            0 => DEFAULT_PAGE,
            n => n.clamp(MIN_PAGE, MAX_PAGE),
        };
        log::debug!(
            "sync from {}: {} updates, {} telemetry points, batch {:?}, since {}",
            req.edge_id,
            request.update_count,
            telemetry.len(),
            req.batch_id,
            req.last_sync_index
        );
        let strategy = self.strategy;
        let retention = self.tombstone_retention_ms;
        let edge = req.edge_id.clone();
        let batch = req.batch_id.clone();
        let since = req.last_sync_index.max(0) as u64;
        let full = req.full_sync || since == 0;
        let (resp, changed) = self
            .registry
            .store()
            .call(move |db| {
                db.tx(|tx| {
                    let now = wall_millis();
                    tx.observe(remote_hlc);
                    let mut resp = EdgeSyncResponse::default();
                    let mut changed = Vec::new();
                    let replay = !batch.is_empty() && tx.batch_seen(&edge, &batch)?;
                    if !replay {
                        for inc in request.updates() {
                            let inc = inc?;
                            let (kind, key) = (inc.kind, inc.key.clone());
                            let a =
                                engine::apply(tx, inc, strategy, &Direction::FromEdge(&edge), now)?;
                            if a.changed {
                                resp.applied += 1;
                                changed.push((kind, key));
                            }
                            if let Some((k, key)) = a.conflict {
                                resp.conflicts.push(format!("{k}/{key}"));
                            }
                        }
                        if !telemetry.is_empty() {
                            tx.store_telemetry(&edge, &telemetry)?;
                        }
                        if !batch.is_empty() {
                            tx.batch_applied(&edge, &batch, now)?;
                        }
                    }
                    let mut acked: BTreeMap<String, u64> = BTreeMap::new();
                    for (d, seq, _, _) in &telemetry {
                        let e = acked.entry(d.clone()).or_insert(0);
                        *e = (*e).max(*seq);
                    }
                    resp.telemetry_acked = acked;
                    collect_garbage(tx, now, retention)?;
                    let horizon: u64 = tx
                        .meta_get("gc_horizon")?
                        .and_then(|v| v.parse().ok())
                        .unwrap_or(0);
                    if !full && since < horizon {
                        resp.full_sync_required = true;
                        resp.current_index = since as i64;
                    } else {
                        fill_page(tx, &mut resp, since, &edge, full, page)?;
                    }
                    tx.edge_seen(
                        &edge,
                        now,
                        resp.current_index as u64,
                        u64::from(resp.applied),
                        status.as_ref().map(|s| edge_status_json(s, now)).as_deref(),
                    )?;
                    resp.batch_id = batch.clone();
                    let own = tx.current_index()?;
                    resp.server_vector_clock
                        .insert(tx.node_id().to_owned(), own);
                    resp.hlc = tx.now().0;
                    Ok::<_, ServeError>((resp, changed))
                })
            })
            .await??;
        for (kind, key) in changed {
            self.registry.notify(kind, &key, ChangeOp::Upsert);
        }
        Ok(wire::encode(&resp, compressed))
    }
}

/// An edge's self-report as the hub keeps it for the fleet view: strings
/// cut to a size a table cell can show (the request's own limits already
/// bound them), the failure's time put on the hub's clock.
fn edge_status_json(s: &wire::pb::EdgeStatus, now: u64) -> String {
    fn clip(s: &str, max: usize) -> &str {
        let mut end = s.len().min(max);
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        &s[..end]
    }
    let last_error_ms = match s.last_error.is_empty() {
        true => 0,
        false => now.saturating_sub(s.last_error_ago_ms),
    };
    serde_json::json!({
        "version": clip(&s.version, 64),
        "pending_changes": s.pending_changes,
        "failed_rounds": s.failed_rounds,
        "last_error": clip(&s.last_error, 512),
        "last_error_ms": last_error_ms,
    })
    .to_string()
}

/// Adds changed records to `resp` until `page` encoded bytes; sets
/// `current_index` and `more`.
fn fill_page(
    tx: &mut crate::store::Tx<'_>,
    resp: &mut EdgeSyncResponse,
    since: u64,
    edge: &str,
    echo: bool,
    page: usize,
) -> Result<(), StoreError> {
    // Read the head first: rows committed later belong to the next sync.
    let head = tx.current_index()?;
    let mut cursor = since;
    let mut used = 0usize;
    loop {
        let rows = tx.changes_since(cursor, edge, echo, CHUNK)?;
        let exhausted = rows.len() < CHUNK;
        for r in rows {
            let mut u = wire::to_update(&r);
            let own = super::engine::edge_key(&r.key, &r.owner, edge);
            if own.len() != r.key.len() {
                u.key = own.to_owned();
            }
            let len = u.encoded_len() + 4;
            if used + len > page && !resp.cloud_updates.is_empty() {
                resp.more = true;
                resp.current_index = cursor as i64;
                return Ok(());
            }
            used += len;
            cursor = r.modify_index;
            resp.cloud_updates.push(u);
        }
        if exhausted {
            // Everything up to the head was considered, including rows out
            // of this edge's scope: the edge may skip past them.
            resp.current_index = head as i64;
            return Ok(());
        }
    }
}

/// Drops tombstones older than the retention that are not waiting in the
/// outbox, at most once an hour (or once a retention, if shorter). Hubs
/// run it as edges sync; edges after each successful sync, since by then
/// the hub has every delete they made (the outbox holds the rest).
pub(crate) fn collect_garbage(
    tx: &mut crate::store::Tx<'_>,
    now: u64,
    retention_ms: u64,
) -> Result<(), StoreError> {
    let last: u64 = tx
        .meta_get("gc_at")?
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    if now.saturating_sub(last) < retention_ms.min(3_600_000) {
        return Ok(());
    }
    tx.meta_set("gc_at", &now.to_string())?;
    let cutoff = Hlc::new(now.saturating_sub(retention_ms), 0).0;
    if let Some(h) = tx.collect_tombstones(cutoff)? {
        let old: u64 = tx
            .meta_get("gc_horizon")?
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        tx.meta_set("gc_horizon", &h.max(old).to_string())?;
        log::info!("collected tombstones older than {retention_ms} ms (horizon index {h})");
    }
    Ok(())
}
