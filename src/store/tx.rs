//! A write transaction and the record rows it reads and writes.

use std::path::Path;

use rusqlite::{params, Connection, OptionalExtension};

use super::db::{classify, sql_err};
use super::{Kind, Record, StoreError};
use crate::clock::{Hlc, HlcClock, VersionVector};
use crate::crdt::FieldStamps;

/// A write transaction. The only way to change replicated records.
pub struct Tx<'a> {
    pub(super) inner: rusqlite::Transaction<'a>,
    pub(super) clock: &'a mut HlcClock,
    pub(super) node_id: &'a str,
    pub(super) path: &'a Path,
    pub(super) max: u64,
    pub(super) stamped: bool,
    pub(super) headroom: bool,
}

impl Tx<'_> {
    pub fn node_id(&self) -> &str {
        self.node_id
    }

    /// Marks this transaction as one that frees space (a delete, tombstone
    /// collection, telemetry pruning): it may use the headroom kept below
    /// `storage.max_size`, so it succeeds on a full store.
    pub fn use_headroom(&mut self) {
        self.headroom = true;
    }

    pub(super) fn err(&self, op: &'static str) -> impl FnOnce(rusqlite::Error) -> StoreError + '_ {
        move |e| classify(self.path, op, e, Some((&self.inner, self.max)))
    }

    /// The transaction's connection, for a module's local tables; see
    /// [`Db::conn`].
    pub fn conn(&self) -> &Connection {
        &self.inner
    }

    /// Wraps a SQLite error from [`Tx::conn`]; see [`Db::sql_error`].
    pub fn sql_error(&self, op: &'static str, e: rusqlite::Error) -> StoreError {
        classify(self.path, op, e, Some((&self.inner, self.max)))
    }

    /// A fresh HLC timestamp for a local write (persisted at commit).
    pub fn now(&mut self) -> Hlc {
        self.stamped = true;
        self.clock.now()
    }

    /// Absorbs a timestamp seen in replicated data.
    pub fn observe(&mut self, remote: Hlc) -> Hlc {
        self.stamped = true;
        self.clock.observe(remote)
    }

    pub fn get(&self, kind: Kind, key: &str) -> Result<Option<Record>, StoreError> {
        get_record(&self.inner, self.path, kind, key)
    }

    /// The next value of the store-wide modify index.
    pub fn next_index(&mut self) -> Result<u64, StoreError> {
        let v: i64 = self
            .inner
            .query_row(
                "UPDATE meta SET value = CAST(value AS INTEGER) + 1 WHERE key = 'index' RETURNING CAST(value AS INTEGER)",
                [],
                |r| r.get(0),
            )
            .map_err(self.err("bump index"))?;
        Ok(v as u64)
    }

    /// Live records of a kind that belong to this node: records a hub
    /// holds for its downstream edges (owner set) do not count against
    /// this node's own limits.
    pub fn count_live(&self, kind: Kind) -> Result<u64, StoreError> {
        let n: i64 = self
            .inner
            .query_row(
                "SELECT count(*) FROM records WHERE kind = ?1 AND tombstone = 0 AND owner = ''",
                [kind.as_str()],
                |r| r.get(0),
            )
            .map_err(self.err("count"))?;
        Ok(n as u64)
    }

    /// Writes a record version as is (stamps are the caller's business).
    pub fn put(&mut self, r: &Record) -> Result<(), StoreError> {
        let json = |v: &dyn erased::Ser| {
            v.to_json().map_err(|e| StoreError::BadRecord {
                kind: r.kind.as_str().into(),
                key: r.key.clone(),
                detail: e.to_string(),
            })
        };
        let vv = json(&r.vv)?;
        let fields = json(&r.fields)?;
        self.inner
            .prepare_cached(
                "INSERT INTO records (kind, key, name, body, hlc, origin, vv, tombstone, create_index, modify_index, fields, owner, src)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13)
                 ON CONFLICT (kind, key) DO UPDATE SET
                   name = excluded.name, body = excluded.body, hlc = excluded.hlc,
                   origin = excluded.origin, vv = excluded.vv, tombstone = excluded.tombstone,
                   create_index = excluded.create_index, modify_index = excluded.modify_index,
                   fields = excluded.fields, owner = excluded.owner, src = excluded.src",
            )
            .and_then(|mut s| {
                s.execute(params![
                    r.kind.as_str(),
                    r.key,
                    r.name,
                    r.body,
                    r.hlc.0 as i64,
                    r.origin,
                    vv,
                    r.tombstone,
                    r.create_index as i64,
                    r.modify_index as i64,
                    fields,
                    r.owner,
                    r.src
                ])
            })
            .map_err(self.err("write record"))?;
        Ok(())
    }

    /// Queues the key for the cloud; a pending entry for the same key is
    /// replaced (the sync client sends the record's state at send time).
    pub fn enqueue(&mut self, kind: Kind, key: &str) -> Result<(), StoreError> {
        self.inner
            .prepare_cached("INSERT OR REPLACE INTO outbox (kind, key) VALUES (?1, ?2)")
            .and_then(|mut s| s.execute(params![kind.as_str(), key]))
            .map_err(self.err("enqueue"))?;
        Ok(())
    }

    pub fn set_service_ttl(
        &mut self,
        id: &str,
        ttl_ms: Option<u64>,
        now_ms: u64,
    ) -> Result<(), StoreError> {
        let r = match ttl_ms {
            Some(ttl) => self.inner.execute(
                "INSERT INTO service_health (id, ttl_ms, expires_at_ms) VALUES (?1, ?2, ?3)
                 ON CONFLICT (id) DO UPDATE SET ttl_ms = excluded.ttl_ms, expires_at_ms = excluded.expires_at_ms",
                params![id, ttl as i64, (now_ms + ttl) as i64],
            ),
            None => self
                .inner
                .execute("DELETE FROM service_health WHERE id = ?1", [id]),
        };
        r.map_err(self.err("write service health"))?;
        Ok(())
    }
}

mod erased {
    /// Serialises either of the two JSON columns without a generic closure.
    pub trait Ser {
        fn to_json(&self) -> serde_json::Result<String>;
    }
    impl<T: serde::Serialize> Ser for T {
        fn to_json(&self) -> serde_json::Result<String> {
            serde_json::to_string(self)
        }
    }
}

/// Reads one row of [`select_records!`]; a corrupt JSON column or an
/// unknown kind is a conversion error naming the record.
pub(super) fn row_to_record(r: &rusqlite::Row<'_>) -> rusqlite::Result<Record> {
    let kind: String = r.get(0)?;
    let key: String = r.get(1)?;
    let bad = |col: usize, detail: String| {
        rusqlite::Error::FromSqlConversionFailure(
            col,
            rusqlite::types::Type::Text,
            format!("record {kind}/{key}: {detail}").into(),
        )
    };
    let json = |col: usize| -> rusqlite::Result<String> { r.get(col) };
    let vv: VersionVector =
        serde_json::from_str(&json(6)?).map_err(|e| bad(6, format!("version vector: {e}")))?;
    let fields: FieldStamps =
        serde_json::from_str(&json(10)?).map_err(|e| bad(10, format!("field stamps: {e}")))?;
    let k = Kind::parse(&kind).ok_or_else(|| bad(0, "unknown kind".into()))?;
    Ok(Record {
        kind: k,
        name: r.get(2)?,
        body: r.get(3)?,
        hlc: Hlc(r.get::<_, i64>(4)? as u64),
        origin: r.get(5)?,
        vv,
        tombstone: r.get(7)?,
        create_index: r.get::<_, i64>(8)? as u64,
        modify_index: r.get::<_, i64>(9)? as u64,
        fields,
        owner: r.get(11)?,
        src: r.get(12)?,
        key,
    })
}

pub(super) fn get_record(
    conn: &Connection,
    path: &Path,
    kind: Kind,
    key: &str,
) -> Result<Option<Record>, StoreError> {
    conn.prepare_cached(select_records!("WHERE kind = ?1 AND key = ?2"))
        .and_then(|mut s| {
            s.query_row(params![kind.as_str(), key], row_to_record)
                .optional()
        })
        .map_err(sql_err(path, "read record"))
}
