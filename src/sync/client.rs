//! The edge's sync client: an actor that drains the outbox to the hub and
//! applies what the hub sends back.
//!
//! A round: read a batch from the outbox (bounded in encoded bytes for thin
//! links), POST it with the edge's last applied hub index, then in ONE store
//! transaction apply the hub's updates, acknowledge exactly the outbox rows
//! that were sent (a key rewritten meanwhile has a new seq and stays
//! queued) and advance the index. Repeat while the outbox has more or the
//! hub says `more`. A crash anywhere before that commit leaves the outbox
//! and index as they were; the retry carries the same batch id (a content
//! hash), which the hub recognises, so nothing is lost or applied twice.
//!
//! A request stays within what a hub accepts (`wire`'s limits): at most
//! [`wire::MAX_UPDATES`] updates and [`wire::UPDATE_BYTES`] of them (or
//! `sync.max_batch_bytes` if smaller), at most [`wire::MAX_TELEMETRY`]
//! points and [`wire::TELEMETRY_BYTES`] of them. The hub's answer is
//! trusted no more than an edge's request: its clock and every stamp in it
//! must be within `clock::MAX_AHEAD_MS` of our wall clock, or the round
//! fails with nothing applied and the clock untouched.
//!
//! Scheduling: every `cloud.sync_interval`, at once on `SyncNow`, and while
//! the hub is unreachable with exponential backoff and jitter (1 s doubling
//! up to the interval), so the first round after the link returns drains
//! the queue. No timer runs faster than that.

use std::sync::atomic::Ordering;
use std::time::Duration;

use prost::Message;
use smol::future::FutureExt;

use crate::clock::{check_remote, wall_millis, Hlc};
use crate::config::{Config, RetryBackoff, SyncMode};
use crate::crdt::MergeStrategy;
use crate::registry::{ChangeOp, Registry};
use crate::store::{Kind, StoreError};

use super::engine::{self, Direction};
use super::transport::{Client, Endpoint, TransportError};
use super::wire::{self, EdgeSyncRequest, EdgeSyncResponse, WireError, CONTENT_TYPE};
use super::SyncHandle;

/// Outbox rows read per batch before the byte bound applies: as many as a
/// hub takes in one request.
const MAX_BATCH_ROWS: usize = wire::MAX_UPDATES;
/// Rounds in one sync before yielding to the schedule (bounds one sync's
/// duration when changes keep arriving).
const MAX_ROUNDS: usize = 10_000;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error(transparent)]
    Transport(#[from] TransportError),
    #[error("hub response: {0}")]
    Wire(#[from] WireError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("{path}: {source}")]
    Token {
        path: String,
        source: std::io::Error,
    },
}

pub struct SyncClient {
    registry: Registry,
    handle: SyncHandle,
    http: Client,
    interval: Duration,
    backoff: RetryBackoff,
    compress: bool,
    always_full: bool,
    strategy: MergeStrategy,
    max_batch_bytes: usize,
    /// Caps `max_batch_bytes`, the response page and telemetry per round
    /// from `resources.memory_limit`, lower while shedding.
    limits: crate::limits::Limits,
    queue_limit: u64,
    tombstone_retention_ms: u64,
}

pub fn strategy(config: &Config) -> MergeStrategy {
    match config.sync.conflict_resolution {
        crate::config::ConflictResolution::LastWriteWins => MergeStrategy::LastWriteWins,
        crate::config::ConflictResolution::Crdt => MergeStrategy::FieldWise,
    }
}

/// The HTTP(S) client for `cloud.server_address` (TLS, client
/// certificate and token from the config): sync, and firmware fetches.
// Set-up, before the executor runs.
#[allow(clippy::disallowed_methods)]
pub fn hub_client(config: &Config) -> Result<Client, ClientError> {
    let c = &config.cloud;
    let endpoint = Endpoint::parse(&c.server_address)?;
    let tls = if endpoint.https {
        let client = c.client_cert.as_deref().zip(c.client_key.as_deref());
        Some(super::transport::client_tls(c.ca_file.as_deref(), client)?)
    } else {
        None
    };
    let token = match &c.token_file {
        Some(p) => Some(
            std::fs::read_to_string(p)
                .map_err(|source| ClientError::Token {
                    path: p.display().to_string(),
                    source,
                })?
                .trim()
                .to_owned(),
        ),
        None => None,
    };
    Ok(Client {
        endpoint,
        tls,
        token,
        timeout: Duration::from_secs(60),
    })
}

impl SyncClient {
    pub fn new(
        config: &Config,
        registry: Registry,
        handle: SyncHandle,
        limits: crate::limits::Limits,
    ) -> Result<SyncClient, ClientError> {
        let c = &config.cloud;
        let http = hub_client(config)?;
        Ok(SyncClient {
            registry,
            handle,
            http,
            interval: c.sync_interval.0,
            backoff: c.retry_backoff,
            compress: config.sync.compression,
            always_full: config.sync.mode == SyncMode::Full,
            strategy: strategy(config),
            max_batch_bytes: (config.sync.max_batch_bytes.0 as usize).min(wire::UPDATE_BYTES),
            limits,
            queue_limit: c.offline_queue_size,
            tombstone_retention_ms: config.sync.tombstone_retention.0.as_millis() as u64,
        })
    }

    /// Runs until dropped.
    pub async fn run(self) {
        let mut failures: u32 = 0;
        loop {
            match self.sync().await {
                Ok(()) => {
                    failures = 0;
                }
                Err(e) => {
                    self.handle
                        .counters()
                        .failures
                        .fetch_add(1, Ordering::Relaxed);
                    failures = failures.saturating_add(1);
                    if failures == 1 {
                        log::warn!(
                            "sync with {} failed: {e}; retrying with backoff",
                            self.http.endpoint.url
                        );
                    } else {
                        log::debug!("sync attempt {failures} failed: {e}");
                    }
                    let msg = e.to_string();
                    self.handle.update(|s| {
                        s.online = false;
                        s.last_error = Some(msg);
                    });
                }
            }
            self.refresh_pending().await;
            let wait = if failures == 0 {
                self.interval
            } else {
                self.retry_delay(failures)
            };
            let timer = async {
                async_io::Timer::after(wait).await;
            };
            timer.or(self.handle.requested()).await;
        }
    }

    fn retry_delay(&self, failures: u32) -> Duration {
        let base = match self.backoff {
            RetryBackoff::Fixed => self.interval.min(Duration::from_secs(30)),
            RetryBackoff::Exponential => {
                Duration::from_secs(1u64 << failures.saturating_sub(1).min(16)).min(self.interval)
            }
        };
        // +-20 % so a fleet that lost its uplink together does not return
        // in lockstep.
        let jitter = 0.8 + fastrand::f64() * 0.4;
        base.mul_f64(jitter).max(Duration::from_millis(200))
    }

    async fn refresh_pending(&self) {
        // Read and publish on the store thread: `track_outbox` publishes the
        // same figure, and doing both there orders the updates the way the
        // reads happened, so a stale count cannot land after a fresh one.
        let handle = self.handle.clone();
        let limit = self.queue_limit;
        let _ = self
            .registry
            .store()
            .call(move |db| {
                let stats = db.stats()?;
                let over = stats.outbox > limit;
                if over && !handle.status().queue_over_limit {
                    log::warn!(
                        "{} changes wait for the hub, over cloud.offline_queue_size ({limit}); \
                         they are kept (one entry per key), but the link needs attention",
                        stats.outbox
                    );
                }
                handle.update(|s| {
                    s.pending_changes = stats.outbox;
                    s.queue_over_limit = over;
                });
                Ok::<_, crate::store::StoreError>(())
            })
            .await;
    }

    /// One sync: rounds until the outbox is drained and the hub has no more.
    pub async fn sync(&self) -> Result<(), ClientError> {
        // `sync.mode: full` pulls everything again once per sync.
        let mut restart = self.always_full;
        for _ in 0..MAX_ROUNDS {
            let max_bytes = self.limits.batch_bytes(self.max_batch_bytes);
            let (since, batch, seqs, full_pending) = self
                .registry
                .store()
                .call(move |db| read_batch(db, max_bytes))
                .await??;
            let since = if std::mem::take(&mut restart) {
                0
            } else {
                since
            };
            // From index 0 (new or wiped database, or a restart) the hub
            // sends everything, our own versions included.
            let full = full_pending || since == 0;
            let edge_id = self.registry.store().node_id().to_owned();
            let req = EdgeSyncRequest {
                batch_id: if batch.is_empty() {
                    String::new()
                } else {
                    wire::batch_id(&edge_id, &batch)
                },
                edge_id,
                last_sync_index: since as i64,
                pending_updates: batch,
                full_sync: full,
                max_response_bytes: u32::try_from(
                    self.limits.response_bytes(super::server::DEFAULT_PAGE),
                )
                .unwrap_or(u32::MAX),
                hlc: Hlc::new(wall_millis(), 0).0,
                ..Default::default()
            };
            let mut req = req;
            let points_cap = self.limits.telemetry_points(TELEMETRY_BATCH);
            let (telemetry, telemetry_last) = self
                .registry
                .store()
                .call(move |db| read_telemetry(db, points_cap))
                .await??;
            let points = telemetry.len();
            if points > 0 {
                req.telemetry = Some(wire::pb::TelemetryBatch { points: telemetry });
            }
            let sent = req.pending_updates.len();
            let body = wire::encode(&req, self.compress);
            let counters = self.handle.counters();
            counters.requests.fetch_add(1, Ordering::Relaxed);
            counters
                .bytes_sent
                .fetch_add(body.len() as u64, Ordering::Relaxed);
            let encoding = if self.compress { "snappy" } else { "identity" };
            let resp_bytes = self
                .http
                .post(
                    "/v1/edge/sync",
                    body,
                    &[
                        ("content-type", CONTENT_TYPE),
                        ("content-encoding", encoding),
                        ("accept-encoding", encoding),
                    ],
                    wire::MAX_COMPRESSED,
                )
                .await?;
            counters
                .bytes_received
                .fetch_add(resp_bytes.len() as u64, Ordering::Relaxed);
            let resp: EdgeSyncResponse =
                wire::decode(&resp_bytes, self.compress, "EdgeSyncResponse")?;
            if resp.full_sync_required {
                log::warn!("hub collected deletes this edge has not seen; starting a full sync");
                self.registry
                    .store()
                    .call(|db| {
                        db.tx(|tx| {
                            tx.meta_set("full_sync", "1")?;
                            tx.meta_set("sync_index", "0")
                        })
                    })
                    .await??;
                continue;
            }
            let more = resp.more;
            let got = resp.cloud_updates.len();
            let changed = self.apply(resp, seqs, full, telemetry_last).await?;
            counters
                .updates_sent
                .fetch_add(sent as u64, Ordering::Relaxed);
            counters
                .updates_received
                .fetch_add(got as u64, Ordering::Relaxed);
            counters
                .telemetry_sent
                .fetch_add(points as u64, Ordering::Relaxed);
            for (kind, key, op) in changed {
                self.registry.notify(kind, &key, op);
            }
            log::debug!("sync round: sent {sent}, received {got}, more: {more}");
            self.handle.update(|s| {
                s.online = true;
                s.last_error = None;
            });
            if !more && sent == 0 && points == 0 {
                // Without this an edge keeps every delete it ever made.
                let retention = self.tombstone_retention_ms;
                self.registry
                    .store()
                    .call(move |db| {
                        db.tx(|tx| super::server::collect_garbage(tx, wall_millis(), retention))
                    })
                    .await??;
                self.handle.update(|s| s.last_sync_ms = Some(wall_millis()));
                return Ok(());
            }
        }
        Ok(())
    }

    async fn apply(
        &self,
        resp: EdgeSyncResponse,
        seqs: Vec<u64>,
        full: bool,
        telemetry_last: Option<u64>,
    ) -> Result<Vec<(Kind, String, ChangeOp)>, ClientError> {
        // Before anything observes a stamp: a refused answer leaves the
        // clock where it was.
        check_remote(|| "hub response clock".into(), Hlc(resp.hlc), wall_millis())
            .map_err(WireError::from)?;
        let mut incoming = Vec::with_capacity(resp.cloud_updates.len());
        for (i, u) in resp.cloud_updates.into_iter().enumerate() {
            incoming.push(wire::from_update(i, u)?);
        }
        let strategy = self.strategy;
        let index = resp.current_index.max(0) as u64;
        let more = resp.more;
        let out = self
            .registry
            .store()
            .call(move |db| {
                db.tx(|tx| {
                    let now = wall_millis();
                    tx.observe(Hlc(resp.hlc));
                    if full && tx.meta_get("full_sync_from")?.is_none() {
                        // Everything at or below this index that the full
                        // sync does not touch is gone from the hub.
                        let from = tx.current_index()?;
                        tx.meta_set("full_sync_from", &from.to_string())?;
                    }
                    let mut changed = Vec::new();
                    for inc in incoming {
                        let (kind, key, tomb) = (inc.kind, inc.key.clone(), inc.version.tombstone);
                        let a =
                            engine::apply(tx, inc, strategy, &Direction::FromHub { full }, now)?;
                        if a.changed {
                            changed.push((
                                kind,
                                key,
                                if tomb {
                                    ChangeOp::Delete
                                } else {
                                    ChangeOp::Upsert
                                },
                            ));
                        }
                    }
                    tx.ack_outbox(&seqs)?;
                    if let Some(last) = telemetry_last {
                        tx.meta_set("telemetry_sent", &last.to_string())?;
                    }
                    tx.meta_set("sync_index", &index.to_string())?;
                    if full && !more {
                        if let Some(from) = tx
                            .meta_get("full_sync_from")?
                            .and_then(|v| v.parse::<u64>().ok())
                        {
                            let dropped = tx.drop_stale(from)?;
                            if dropped > 0 {
                                log::info!(
                                    "full sync: removed {dropped} records the hub no longer has"
                                );
                            }
                        }
                        tx.meta_set("full_sync", "0")?;
                        tx.meta_set("full_sync_from", "")?;
                    }
                    Ok::<_, StoreError>(changed)
                })
            })
            .await??;
        Ok(out)
    }
}

/// Telemetry points per request: append-only history, shipped oldest first.
const TELEMETRY_BATCH: usize = wire::MAX_TELEMETRY;

/// Telemetry recorded since the last acknowledged point (at most `limit`
/// points and [`wire::TELEMETRY_BYTES`] encoded), and the rowid to
/// remember once the hub has it (the hub stores each (device, seq) once, so
/// a resend after a crash is harmless). A point that alone exceeds the byte
/// bound could never be sent: it is skipped with a warning rather than
/// holding up every later one.
fn read_telemetry(
    db: &mut crate::store::Db,
    limit: usize,
) -> Result<(Vec<wire::pb::TelemetryPoint>, Option<u64>), StoreError> {
    let after: u64 = db
        .meta_get("telemetry_sent")?
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let mut points = Vec::new();
    let mut last = None;
    let mut used = 0;
    for r in db.telemetry_after(after, limit)? {
        let p = wire::pb::TelemetryPoint {
            device_id: r.device,
            seq: r.seq,
            ts_ms: r.ts_ms,
            payload: r.body.into_bytes(),
        };
        let len = p.encoded_len() + 4;
        if len > wire::TELEMETRY_BYTES {
            log::warn!(
                "telemetry point {} of {} ({len} bytes) is over the {}-byte request bound; \
                 not sent",
                p.seq,
                p.device_id,
                wire::TELEMETRY_BYTES
            );
            last = Some(r.rowid);
            continue;
        }
        if used + len > wire::TELEMETRY_BYTES {
            break;
        }
        used += len;
        last = Some(r.rowid);
        points.push(p);
    }
    Ok((points, last))
}

type Batch = (u64, Vec<wire::ServiceUpdate>, Vec<u64>, bool);

/// The edge's last applied hub index, the next batch of pending updates
/// (bounded by `max_bytes` encoded), their outbox seqs, and whether a full
/// sync is pending.
fn read_batch(db: &mut crate::store::Db, max_bytes: usize) -> Result<Batch, StoreError> {
    let since = db
        .meta_get("sync_index")?
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let full = db.meta_get("full_sync")?.as_deref() == Some("1");
    let mut batch = Vec::new();
    let mut seqs = Vec::new();
    let mut used = 0;
    for (seq, kind, key) in db.outbox(MAX_BATCH_ROWS)? {
        match db.get(kind, &key)? {
            Some(rec) => {
                let u = wire::to_update(&rec);
                let len = u.encoded_len() + 4;
                if used + len > max_bytes && !batch.is_empty() {
                    break;
                }
                used += len;
                batch.push(u);
                seqs.push(seq);
            }
            // Collected meanwhile: nothing to send, acknowledge the row.
            None => seqs.push(seq),
        }
    }
    Ok((since, batch, seqs, full))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{Store, StoreOptions};

    /// Telemetry history with bodies of these sizes, then what one request
    /// would carry: (seqs sent, rowid remembered).
    fn batch_of(sizes: &[usize]) -> (Vec<u64>, Option<u64>) {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(StoreOptions {
            path: dir.path().join("t.db"),
            max_size: 64 << 20,
            node_id: "edge-a".into(),
        })
        .unwrap();
        let sizes = sizes.to_vec();
        let out = smol::block_on(store.call(move |db| {
            db.tx(|tx| {
                for (i, n) in sizes.iter().enumerate() {
                    tx.conn()
                        .execute(
                            "INSERT INTO telemetry (device, seq, ts_ms, body) VALUES ('d', ?1, 0, ?2)",
                            rusqlite::params![i as i64 + 1, "x".repeat(*n)],
                        )
                        .map_err(|e| tx.sql_error("insert", e))?;
                }
                Ok::<_, StoreError>(())
            })?;
            read_telemetry(db, TELEMETRY_BATCH)
        }))
        .unwrap()
        .unwrap();
        store.close();
        (out.0.iter().map(|p| p.seq).collect(), out.1)
    }

    #[test]
    fn telemetry_batches_fit_what_a_hub_accepts() {
        // 100 KiB points: five fit in the byte bound, the sixth waits.
        assert_eq!(batch_of(&[100 << 10; 8]), (vec![1, 2, 3, 4, 5], Some(5)));
        // A point that could never fit is passed over, not sent forever.
        let huge = wire::TELEMETRY_BYTES + 1;
        assert_eq!(batch_of(&[10, huge, 10]), (vec![1, 3], Some(3)));
        assert_eq!(batch_of(&[huge]), (vec![], Some(1)));
        // Small points: the count bound.
        let (sent, _) = batch_of(&[10; wire::MAX_TELEMETRY + 5]);
        assert_eq!(sent.len(), wire::MAX_TELEMETRY);
    }
}
