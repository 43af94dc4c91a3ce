//! Redelivered MQTT messages. The bridge acknowledges a QoS 1/2 message
//! to the broker only after its batch committed, so a daemon that stops
//! between the commit and the PUBACK gets the message again (the broker
//! sets DUP). Registrations, heartbeats and status are idempotent;
//! telemetry and events are appended, so for those the digests of the last
//! [`KEEP`] batches are written in the same transaction, and a DUP message
//! whose digest is among them is taken as already stored.
//!
//! Only DUP messages are checked: a device that sends the same reading
//! twice gets two rows, as it would have before. A re-sent message can
//! only be one the broker had sent us and not seen acknowledged, which is
//! at most its window (our receive maximum) of the last batches.

use std::collections::HashSet;

use rusqlite::params;

use crate::store::{StoreError, Tx};

/// Batches whose digests are kept. The messages committed and not yet
/// acknowledged are at most the broker's window, spread over at most that
/// many batches; in practice the last few.
const KEEP: i64 = 256;

/// What ingest knows about a message that may come again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Seen {
    /// SHA-256 of topic and payload, cut to 16 bytes.
    pub(crate) digest: [u8; 16],
    /// The broker says it sent this message before.
    pub(crate) dup: bool,
}

impl Seen {
    // Only the MQTT bridge receives redeliveries.
    #[cfg_attr(not(feature = "mqtt"), allow(dead_code))]
    pub(crate) fn of(topic: &str, payload: &[u8], dup: bool) -> Seen {
        let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
        ctx.update(topic.as_bytes());
        ctx.update(&[0]);
        ctx.update(payload);
        let mut digest = [0u8; 16];
        digest.copy_from_slice(&ctx.finish().as_ref()[..16]);
        Seen { digest, dup }
    }
}

/// The digests of the last [`KEEP`] batches.
pub(super) fn recent(tx: &Tx<'_>) -> Result<HashSet<[u8; 16]>, StoreError> {
    let mut out = HashSet::new();
    let mut stmt = tx
        .conn()
        .prepare_cached("SELECT digests FROM mqtt_recent")
        .map_err(|e| tx.sql_error("read recent MQTT digests", e))?;
    let rows = stmt
        .query_map([], |r| r.get::<_, Vec<u8>>(0))
        .map_err(|e| tx.sql_error("read recent MQTT digests", e))?;
    for blob in rows {
        let blob = blob.map_err(|e| tx.sql_error("read recent MQTT digests", e))?;
        for d in blob.chunks_exact(16) {
            let mut k = [0u8; 16];
            k.copy_from_slice(d);
            out.insert(k);
        }
    }
    Ok(out)
}

/// Records a batch's digests and forgets the batches before the last
/// [`KEEP`].
pub(super) fn record(tx: &Tx<'_>, digests: &[u8]) -> Result<(), StoreError> {
    let conn = tx.conn();
    let batch: i64 = conn
        .prepare_cached(
            "INSERT INTO mqtt_recent (batch, digests)
             VALUES ((SELECT coalesce(max(batch), 0) + 1 FROM mqtt_recent), ?1)
             RETURNING batch",
        )
        .and_then(|mut s| s.query_row(params![digests], |r| r.get(0)))
        .map_err(|e| tx.sql_error("record MQTT digests", e))?;
    conn.prepare_cached("DELETE FROM mqtt_recent WHERE batch <= ?1")
        .and_then(|mut s| s.execute(params![batch - KEEP]))
        .map_err(|e| tx.sql_error("forget old MQTT digests", e))?;
    Ok(())
}
