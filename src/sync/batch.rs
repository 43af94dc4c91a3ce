//! What one sync round carries, read on the store thread: state changes
//! from the outbox first, then telemetry in whatever room they leave.
//!
//! State changes go before telemetry: a round carries telemetry only when
//! every queued state change fit in it, so a new service or KV write never
//! waits behind a backlog of readings (on a thin link that backlog can be
//! hours long). Telemetry then gets the rest of the round's byte bound,
//! and at least [`MIN_TELEMETRY_BYTES`] so it still moves when state
//! changes fill the bound every round but never overflow it.

use prost::Message;

use crate::store::StoreError;

use super::wire;

/// Outbox rows read per batch before the byte bound applies: as many as a
/// hub takes in one request.
const MAX_BATCH_ROWS: usize = wire::MAX_UPDATES;
/// Telemetry points per request: append-only history, shipped oldest first.
pub(super) const TELEMETRY_BATCH: usize = wire::MAX_TELEMETRY;
const MIN_TELEMETRY_BYTES: usize = 1 << 10;

/// State changes for one round.
pub(super) struct StateBatch {
    /// The edge's last applied hub index.
    pub since: u64,
    pub updates: Vec<wire::ServiceUpdate>,
    /// Outbox rows the round acknowledges once the hub has it.
    pub seqs: Vec<u64>,
    /// A full sync is pending.
    pub full: bool,
    /// Encoded bytes of `updates`.
    pub bytes: usize,
    /// The outbox holds more than this round carries.
    pub more: bool,
}

impl StateBatch {
    /// The bytes telemetry may use in the same round: none while state
    /// changes are still queued behind this batch.
    pub(super) fn telemetry_room(&self, max_bytes: usize) -> usize {
        if self.more {
            0
        } else {
            max_bytes
                .saturating_sub(self.bytes)
                .clamp(MIN_TELEMETRY_BYTES, wire::TELEMETRY_BYTES)
        }
    }
}

/// The next batch of pending updates (bounded by `max_bytes` encoded, and
/// at least one update so an oversized one still goes).
pub(super) fn read_batch(
    db: &mut crate::store::Db,
    max_bytes: usize,
) -> Result<StateBatch, StoreError> {
    let since = db
        .meta_get("sync_index")?
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let full = db.meta_get("full_sync")?.as_deref() == Some("1");
    let mut updates = Vec::new();
    let mut seqs = Vec::new();
    let mut used = 0;
    // One row more than a hub takes tells whether anything is left over.
    let rows = db.outbox(MAX_BATCH_ROWS + 1)?;
    let mut more = rows.len() > MAX_BATCH_ROWS;
    for (seq, kind, key) in rows.into_iter().take(MAX_BATCH_ROWS) {
        match db.get(kind, &key)? {
            Some(rec) => {
                let u = wire::to_update(&rec);
                let len = u.encoded_len() + 4;
                if used + len > max_bytes && !updates.is_empty() {
                    more = true;
                    break;
                }
                used += len;
                updates.push(u);
                seqs.push(seq);
            }
            // Collected meanwhile: nothing to send, acknowledge the row.
            None => seqs.push(seq),
        }
    }
    Ok(StateBatch {
        since,
        updates,
        seqs,
        full,
        bytes: used,
        more,
    })
}

/// Telemetry recorded since the last acknowledged point (at most `limit`
/// points and `max_bytes` encoded, which is at most
/// [`wire::TELEMETRY_BYTES`]), and the rowid to remember once the hub has
/// it (the hub stores each (device, seq) once, so a resend after a crash is
/// harmless). A point that alone exceeds the request bound could never be
/// sent: it is skipped with a warning rather than holding up every later
/// one.
pub(super) fn read_telemetry(
    db: &mut crate::store::Db,
    limit: usize,
    max_bytes: usize,
) -> Result<(Vec<wire::pb::TelemetryPoint>, Option<u64>), StoreError> {
    let max_bytes = max_bytes.min(wire::TELEMETRY_BYTES);
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
        if used + len > max_bytes && !points.is_empty() {
            break;
        }
        used += len;
        last = Some(r.rowid);
        points.push(p);
    }
    Ok((points, last))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{Store, StoreOptions};

    fn store() -> (tempfile::TempDir, Store) {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(StoreOptions {
            path: dir.path().join("t.db"),
            max_size: 64 << 20,
            node_id: "edge-a".into(),
        })
        .unwrap();
        (dir, store)
    }

    /// Telemetry history with bodies of these sizes, then what one request
    /// of `max_bytes` would carry: (seqs sent, rowid remembered).
    fn telemetry_of(sizes: &[usize], max_bytes: usize) -> (Vec<u64>, Option<u64>) {
        let (_dir, store) = store();
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
            read_telemetry(db, TELEMETRY_BATCH, max_bytes)
        }))
        .unwrap()
        .unwrap();
        store.close();
        (out.0.iter().map(|p| p.seq).collect(), out.1)
    }

    #[test]
    fn telemetry_batches_fit_what_a_hub_accepts() {
        let all = wire::TELEMETRY_BYTES;
        // 100 KiB points: five fit in the byte bound, the sixth waits.
        assert_eq!(
            telemetry_of(&[100 << 10; 8], all),
            (vec![1, 2, 3, 4, 5], Some(5))
        );
        // A point that could never fit is passed over, not sent forever.
        let huge = wire::TELEMETRY_BYTES + 1;
        assert_eq!(telemetry_of(&[10, huge, 10], all), (vec![1, 3], Some(3)));
        assert_eq!(telemetry_of(&[huge], all), (vec![], Some(1)));
        // Small points: the count bound.
        let (sent, _) = telemetry_of(&[10; wire::MAX_TELEMETRY + 5], all);
        assert_eq!(sent.len(), wire::MAX_TELEMETRY);
        // A thin link's round: the smaller bound, but always one point.
        assert_eq!(telemetry_of(&[1000; 8], 2500), (vec![1, 2], Some(2)));
        assert_eq!(telemetry_of(&[5000, 10], 2500), (vec![1], Some(1)));
    }

    #[test]
    fn telemetry_gets_room_only_when_every_state_change_fit() {
        let (_dir, store) = store();
        let batch = |max: usize| {
            smol::block_on(store.call(move |db| {
                db.tx(|tx| {
                    for i in 0..50 {
                        let idx = tx.next_index()?;
                        let hlc = tx.now();
                        let rec = crate::store::Record {
                            kind: crate::store::Kind::Kv,
                            key: format!("k{i}"),
                            name: None,
                            body: format!(r#"{{"value":"{}"}}"#, "v".repeat(100)),
                            hlc,
                            origin: "edge-a".into(),
                            vv: Default::default(),
                            tombstone: false,
                            create_index: idx,
                            modify_index: idx,
                            fields: Default::default(),
                            owner: String::new(),
                            src: String::new(),
                        };
                        tx.put(&rec)?;
                        tx.enqueue(rec.kind, &rec.key)?;
                    }
                    Ok::<_, StoreError>(())
                })?;
                read_batch(db, max)
            }))
            .unwrap()
            .unwrap()
        };
        let small = batch(2 << 10);
        assert!(small.more && small.updates.len() < 50);
        assert_eq!(small.telemetry_room(2 << 10), 0, "state changes first");
        let large = batch(1 << 20);
        assert!(!large.more);
        assert_eq!(large.updates.len(), 50);
        assert_eq!(
            large.telemetry_room(64 << 10),
            (64 << 10) - large.bytes,
            "telemetry gets what the state changes left"
        );
        store.close();
    }
}
