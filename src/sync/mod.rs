//! Offline-first sync with the cloud hub.
//!
//! This module will hold the wire types (prost, never leaving this module),
//! the edge client and the hub. For now it holds what other subsystems
//! consume: [`SyncHandle`], the sync state (online, last sync, pending
//! changes, last error) that the HTTP API and D-Bus expose, and the
//! "sync now" trigger. In standalone mode (no `cloud.server_address`) the
//! handle still tracks the outbox depth, so operators see what would be
//! sent once a hub is configured.
//!
//! What a hub takes from the wire is bounded (per-request limits, clocks
//! at most a year ahead: see `wire` and `server`); `repair` fixes, offline,
//! a clock that an older release let run ahead.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use serde::Serialize;

mod adapt;
mod batch;
pub mod budget;
pub mod client;
mod engine;
pub mod metered;
pub mod repair;
pub mod server;
pub mod transport;
pub(crate) mod wire;

pub use client::SyncClient;
pub use server::Hub;
pub use transport::{server_tls, TransportError};

/// Entry points for `fuzz/` and `bench/`: not a stable API.
#[doc(hidden)]
pub mod testing {
    use super::wire;

    /// Decodes bytes as a request and as a response and validates every
    /// update, as the hub and the client do; never panics.
    pub fn decode_untrusted(data: &[u8]) {
        for compressed in [false, true] {
            if let Ok(req) = wire::decode_request(data, compressed) {
                for u in req.updates() {
                    let _ = u;
                }
            }
            if let Ok(resp) = wire::decode::<wire::EdgeSyncResponse>(data, compressed, "response") {
                for (i, u) in resp.cloud_updates.into_iter().enumerate() {
                    let _ = wire::from_update(i, u);
                }
            }
        }
    }

    /// A version `edge` made of `key`, as its outbox would send it.
    fn own_update(
        edge: &str,
        kind: i32,
        key: String,
        body: String,
        hlc: u64,
    ) -> wire::ServiceUpdate {
        wire::ServiceUpdate {
            kind,
            key,
            body: body.into_bytes(),
            hlc,
            origin: edge.into(),
            vector_clock: [(edge.to_string(), 1)].into_iter().collect(),
            ..Default::default()
        }
    }

    /// `edge`'s request carrying `updates`, encoded.
    fn request(
        edge: &str,
        updates: Vec<wire::ServiceUpdate>,
        since: i64,
        hlc: u64,
        compress: bool,
    ) -> Vec<u8> {
        let req = wire::EdgeSyncRequest {
            edge_id: edge.into(),
            last_sync_index: since,
            batch_id: wire::batch_id(edge, &updates),
            pending_updates: updates,
            hlc,
            ..Default::default()
        };
        wire::encode(&req, compress)
    }

    /// A request from `edge` carrying `n` changed services, as an edge
    /// would send it (for load generators).
    pub fn service_batch(edge: &str, since: i64, n: usize, compress: bool) -> Vec<u8> {
        let now = crate::clock::wall_millis();
        let updates = (0..n)
            .map(|i| wire::ServiceUpdate {
                name: format!("svc-{i}"),
                ..own_update(
                    edge,
                    wire::RecordKind::Service as i32,
                    format!("{edge}-svc-{i}"),
                    format!(
                        r#"{{"address":"10.{}.{}.{}","id":"{edge}-svc-{i}","name":"svc-{i}","port":8080,"tags":["pos","v2"]}}"#,
                        i >> 16 & 255,
                        i >> 8 & 255,
                        i & 255
                    ),
                    crate::clock::Hlc::new(now, i as u16).0,
                )
            })
            .collect();
        request(edge, updates, since, 0, compress)
    }

    /// A request from `edge` carrying `devices` device records
    /// (`{edge}-d{i}`, type sensor, firmware 1.0.0) and an active alert
    /// for each of the first `alerts` of them: a simulated edge for the
    /// fleet view's load check.
    pub fn fleet_batch(edge: &str, devices: usize, alerts: usize, compress: bool) -> Vec<u8> {
        let now = crate::clock::wall_millis();
        let mut records = Vec::new();
        for i in 0..devices {
            let id = format!("{edge}-d{i}");
            records.push((
                "device",
                id.clone(),
                format!(
                    r#"{{"id":"{id}","type":"sensor","firmware_version":"1.0.0","telemetry_interval_ms":60000}}"#
                ),
            ));
            if i < alerts {
                records.push((
                    "alert",
                    format!("{id}/low_battery"),
                    format!(
                        r#"{{"device_id":"{id}","name":"low_battery","severity":"warning","message":"battery 9%","active":true,"raised_at_ms":{now}}}"#
                    ),
                ));
            }
        }
        record_batch(edge, &records, compress)
    }

    /// A request from `edge` carrying records given as (kind, key, body),
    /// kind as the store names it (`device`, `alert`, `rollout`, ...).
    pub fn record_batch(edge: &str, records: &[(&str, String, String)], compress: bool) -> Vec<u8> {
        let now = crate::clock::wall_millis();
        let updates = records
            .iter()
            .enumerate()
            .filter_map(|(i, (kind, key, body))| {
                let kind = crate::store::Kind::ALL
                    .into_iter()
                    .find(|k| k.as_str() == *kind)?;
                Some(own_update(
                    edge,
                    wire::kind_to_wire(kind) as i32,
                    key.clone(),
                    body.clone(),
                    crate::clock::Hlc::new(now, i as u16).0,
                ))
            })
            .collect();
        request(edge, updates, 0, 0, compress)
    }

    /// A request from `edge` with no records, only its self-report
    /// (`status`: version, pending changes, failed rounds, last error and
    /// how many ms ago); `None` sends a request from before the report
    /// existed.
    pub fn status_report(edge: &str, status: Option<(&str, u64, u64, &str, u64)>) -> Vec<u8> {
        let req = wire::EdgeSyncRequest {
            edge_id: edge.into(),
            status: status.map(
                |(version, pending, failed, error, ago)| wire::pb::EdgeStatus {
                    version: version.into(),
                    pending_changes: pending,
                    failed_rounds: failed,
                    last_error: error.into(),
                    last_error_ago_ms: ago,
                },
            ),
            ..Default::default()
        };
        wire::encode(&req, false)
    }

    /// A request from `edge` whose clock (`hlc`) reads `clock_ms`, carrying
    /// `n` KV updates stamped now: `distinct` gives each its own key
    /// (`{key}-{i}`) and a value of `value_len` bytes; otherwise all `n`
    /// are the same small update, which snappy shrinks about twentyfold
    /// (what a hostile sender would use to pack a request).
    pub fn kv_request(
        edge: &str,
        clock_ms: u64,
        n: usize,
        distinct: bool,
        value_len: usize,
        compress: bool,
    ) -> Vec<u8> {
        let now = crate::clock::Hlc::new(crate::clock::wall_millis(), 0).0;
        let value = "x".repeat(value_len);
        let updates = (0..n)
            .map(|i| {
                let key = if distinct {
                    format!("{edge}/k-{i}")
                } else {
                    format!("{edge}/k")
                };
                let body = format!(r#"{{"value":"{value}"}}"#);
                own_update(edge, wire::RecordKind::Kv as i32, key, body, now)
            })
            .collect();
        let hlc = crate::clock::Hlc::new(clock_ms, 0).0;
        request(edge, updates, 0, hlc, compress)
    }

    /// An empty response whose clock reads `clock_ms` (a hub that lost
    /// track of time, for edge tests).
    pub fn response_with_clock(clock_ms: u64, compress: bool) -> Vec<u8> {
        let resp = wire::EdgeSyncResponse {
            hlc: crate::clock::Hlc::new(clock_ms, 0).0,
            ..Default::default()
        };
        wire::encode(&resp, compress)
    }

    /// A response carrying one KV record whose body is `len` bytes of
    /// one letter: tiny compressed, `len` decoded (a hub, or something
    /// posing as one, that ignores the page the edge asked for).
    pub fn response_of_bytes(len: usize) -> Vec<u8> {
        let resp = wire::EdgeSyncResponse {
            cloud_updates: vec![own_update(
                "hub",
                wire::RecordKind::Kv as i32,
                "big".into(),
                "x".repeat(len),
                crate::clock::Hlc::new(crate::clock::wall_millis(), 0).0,
            )],
            current_index: 1,
            ..Default::default()
        };
        wire::encode(&resp, true)
    }

    /// (updates, current_index, more) of an encoded response.
    pub fn response_summary(data: &[u8], compressed: bool) -> Result<(usize, i64, bool), String> {
        let r: wire::EdgeSyncResponse =
            wire::decode(data, compressed, "response").map_err(|e| e.to_string())?;
        Ok((r.cloud_updates.len(), r.current_index, r.more))
    }
}

use crate::registry::Registry;

#[derive(Debug, thiserror::Error)]
pub enum SyncError {
    #[error("sync is disabled: cloud.server_address is empty")]
    Disabled,
}

/// What the operator sees of sync.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct SyncStatus {
    /// A hub is configured.
    pub enabled: bool,
    /// The last sync attempt reached the hub.
    pub online: bool,
    /// Milliseconds since the epoch of the last successful sync.
    pub last_sync_ms: Option<u64>,
    /// Changed keys not yet acknowledged by the hub (the outbox depth).
    pub pending_changes: u64,
    /// The outbox holds more than `cloud.offline_queue_size` keys. Nothing
    /// is dropped (state changes coalesce per key); this says the link
    /// needs attention.
    pub queue_over_limit: bool,
    pub last_error: Option<String>,
    /// The link as the last rounds measured it (absent until a round ran).
    pub link: Option<LinkStatus>,
    /// `cloud.data_budget`'s count this period (absent without one).
    pub data_budget: Option<budget::BudgetStatus>,
}

/// The adaptive sync's view of the link (`adapt`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct LinkStatus {
    pub rate_bytes_per_sec: u64,
    pub rtt_ms: u64,
    /// The next round's bound on encoded updates.
    pub batch_bytes: u64,
    /// `cloud.sync_round_budget`.
    pub round_budget_ms: u64,
    /// Epoch ms of the next scheduled sync (sooner if changes pile up or a
    /// sync is requested).
    pub next_sync_ms: u64,
}

/// Counters for `/metrics`, kept by the client (edge side) and the hub.
#[derive(Default)]
pub struct Counters {
    pub requests: AtomicU64,
    pub failures: AtomicU64,
    pub bytes_sent: AtomicU64,
    pub bytes_received: AtomicU64,
    pub updates_sent: AtomicU64,
    pub updates_received: AtomicU64,
    pub telemetry_sent: AtomicU64,
    pub rounds_over_budget: AtomicU64,
}

struct Inner {
    counters: Counters,
    status: Mutex<SyncStatus>,
    changed: event_listener::Event,
    now: async_channel::Sender<()>,
    now_rx: async_channel::Receiver<()>,
}

/// Shared view of the sync state plus the sync-now trigger. Cheap to clone.
#[derive(Clone)]
pub struct SyncHandle {
    inner: Arc<Inner>,
}

impl SyncHandle {
    pub fn new(enabled: bool) -> SyncHandle {
        // Capacity 1: many "sync now" requests before the client wakes up
        // collapse into one sync.
        let (now, now_rx) = async_channel::bounded(1);
        SyncHandle {
            inner: Arc::new(Inner {
                counters: Counters::default(),
                status: Mutex::new(SyncStatus {
                    enabled,
                    ..Default::default()
                }),
                changed: event_listener::Event::new(),
                now,
                now_rx,
            }),
        }
    }

    pub fn counters(&self) -> &Counters {
        &self.inner.counters
    }

    /// The sync figures in Prometheus text, appended to `out`.
    pub fn render_metrics(&self, out: &mut String) {
        let s = self.status();
        let c = &self.inner.counters;
        let mut gauges = vec![
            (
                "konsul_edge_sync_online",
                "1 when the last sync reached the hub.",
                u64::from(s.online),
            ),
            (
                "konsul_edge_sync_last_success_ms",
                "Epoch ms of the last complete sync (0: never).",
                s.last_sync_ms.unwrap_or(0),
            ),
            (
                "konsul_edge_sync_queue_over_limit",
                "1 when the outbox holds more keys than cloud.offline_queue_size.",
                u64::from(s.queue_over_limit),
            ),
        ];
        if let Some(l) = s.link {
            gauges.extend([
                (
                    "konsul_edge_sync_link_rate_bytes",
                    "Measured link rate, bytes per second on the wire.",
                    l.rate_bytes_per_sec,
                ),
                (
                    "konsul_edge_sync_link_rtt_ms",
                    "Measured round-trip time to the hub.",
                    l.rtt_ms,
                ),
                (
                    "konsul_edge_sync_batch_bytes",
                    "The next round's bound on encoded updates (adaptive).",
                    l.batch_bytes,
                ),
                (
                    "konsul_edge_sync_next_ms",
                    "Epoch ms of the next scheduled sync.",
                    l.next_sync_ms,
                ),
            ]);
        }
        if let Some(b) = s.data_budget {
            gauges.extend([
                (
                    "konsul_edge_sync_data_budget_bytes",
                    "cloud.data_budget: bytes allowed this period.",
                    b.limit,
                ),
                (
                    "konsul_edge_sync_data_budget_used_bytes",
                    "Bytes on the link this period (TCP payload, both ways).",
                    b.used,
                ),
                (
                    "konsul_edge_sync_data_budget_remaining_bytes",
                    "Bytes left this period.",
                    b.remaining,
                ),
                (
                    "konsul_edge_sync_data_budget_telemetry_held",
                    "1 while telemetry waits for the next period.",
                    u64::from(b.telemetry_held),
                ),
            ]);
        }
        for (name, help, v) in gauges {
            crate::metrics::sample(out, "gauge", name, help, v);
        }
        let counters = [
            (
                "konsul_edge_sync_requests_total",
                "Sync requests sent to the hub.",
                &c.requests,
            ),
            (
                "konsul_edge_sync_failures_total",
                "Sync attempts that failed.",
                &c.failures,
            ),
            (
                "konsul_edge_sync_bytes_sent_total",
                "Request bytes on the wire (compressed).",
                &c.bytes_sent,
            ),
            (
                "konsul_edge_sync_bytes_received_total",
                "Response bytes on the wire (compressed).",
                &c.bytes_received,
            ),
            (
                "konsul_edge_sync_updates_sent_total",
                "Record versions sent up.",
                &c.updates_sent,
            ),
            (
                "konsul_edge_sync_updates_received_total",
                "Record versions received.",
                &c.updates_received,
            ),
            (
                "konsul_edge_sync_telemetry_sent_total",
                "Telemetry points sent up.",
                &c.telemetry_sent,
            ),
            (
                "konsul_edge_sync_rounds_over_budget_total",
                "Sync rounds that took longer than cloud.sync_round_budget.",
                &c.rounds_over_budget,
            ),
        ];
        for (name, help, v) in counters {
            crate::metrics::sample(out, "counter", name, help, v.load(Ordering::Relaxed));
        }
    }

    pub fn status(&self) -> SyncStatus {
        self.inner
            .status
            .lock()
            .map(|s| s.clone())
            .unwrap_or_default()
    }

    /// Applies `f` to the state; wakes [`changed`](Self::changed) waiters
    /// only when something actually changed.
    pub fn update(&self, f: impl FnOnce(&mut SyncStatus)) {
        let changed = match self.inner.status.lock() {
            Ok(mut s) => {
                let before = s.clone();
                f(&mut s);
                *s != before
            }
            Err(_) => false,
        };
        if changed {
            self.inner.changed.notify(usize::MAX);
        }
    }

    /// Resolves at the next change after this call (the listener is
    /// registered now, so a change between this call and the await is not
    /// missed).
    pub fn changed(&self) -> event_listener::EventListener {
        self.inner.changed.listen()
    }

    /// Asks the client to sync as soon as it can.
    pub fn sync_now(&self) -> Result<(), SyncError> {
        if !self.status().enabled {
            return Err(SyncError::Disabled);
        }
        // Full means a sync is already requested: nothing to add.
        let _ = self.inner.now.try_send(());
        Ok(())
    }

    /// For the client: resolves when a sync was requested.
    pub async fn requested(&self) {
        let _ = self.inner.now_rx.recv().await;
    }
}

/// Keeps `pending_changes` equal to the outbox depth, woken by registry
/// changes (no timer). The sync client takes this over when it runs.
pub async fn track_outbox(registry: Registry, handle: SyncHandle) {
    let mut changes = registry.subscribe();
    loop {
        // Published from the store thread, like the sync client's refresh:
        // updates then land in the order of the reads they report.
        let h = handle.clone();
        let _ = registry
            .store()
            .call(move |db| {
                let stats = db.stats()?;
                h.update(|s| s.pending_changes = stats.outbox);
                Ok::<_, crate::store::StoreError>(())
            })
            .await;
        if changes.recv().await.is_err() {
            return;
        }
        // Coalesce a burst of changes into one count.
        while changes.try_recv().is_ok() {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_changes_wake_waiters_and_sync_now_needs_a_hub() {
        let h = SyncHandle::new(false);
        assert!(matches!(h.sync_now(), Err(SyncError::Disabled)));
        let h = SyncHandle::new(true);
        h.sync_now().unwrap();
        h.sync_now().unwrap(); // coalesces
        smol::block_on(async {
            h.requested().await;
            let waiter = h.changed();
            h.update(|s| s.online = true);
            waiter.await;
            assert!(h.status().online);
        });
    }
}
