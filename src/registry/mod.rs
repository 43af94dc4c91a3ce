//! Services and KV: validation, CAS, TTL health, and the one write path.
//!
//! Every replicated change goes through [`commit`]: inside one store
//! transaction it bumps the modify index, stamps an HLC timestamp, advances
//! the record's version vector for this node and queues the key in the
//! outbox. A write is either all of that or nothing, so the sync client can
//! trust that every committed change is in the outbox, and a limit or a full
//! disk leaves no half-written state behind.
//!
//! Validation follows the Konsul server (name, address, port 1-65535, <= 64
//! tags of <= 255 chars `[A-Za-z0-9-_:./]`, <= 64 meta keys of <= 128 chars
//! `[A-Za-z0-9-_]`, values <= 512, `konsul_`/`_` prefixes reserved), so a
//! client that works against a Konsul server works against a device.
//!
//! TTL health is local state: a service with a TTL is `passing` until its
//! deadline and `critical` after; heartbeats move the deadline without a
//! replicated write. Like Konsul, the catalogue routes hide critical
//! services; `/v1/edge/services` shows them with their health.
//!
//! Deletes write bodiless tombstones and use the store's headroom, so an
//! operator can free space on a full store.
//!
//! Parts: this file (types, the write path), `services`, `kv`, `validate`.

mod kv;
mod services;
mod validate;

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::clock::{wall_millis, VersionVector};
use crate::crdt::{self, Stamp};
use crate::store::{Kind, Record, Store, StoreError, Tx};
pub use validate::validate_service;

pub const MAX_TAGS: usize = 64;
pub const MAX_TAG_LEN: usize = 255;
pub const MAX_META_KEYS: usize = 64;
pub const MAX_META_KEY_LEN: usize = 128;
pub const MAX_META_VALUE_LEN: usize = 512;
pub const MAX_NAME_LEN: usize = 255;
pub const MAX_CHECKS: usize = 32;
pub const MAX_KEY_LEN: usize = 512;
pub const MAX_VALUE_LEN: usize = 512 * 1024;
/// Konsul's limit for batch KV requests.
pub const MAX_BATCH: usize = 1000;
const RESERVED_META_PREFIXES: [&str; 2] = ["konsul_", "_"];

#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error("{field}: {message}")]
    Invalid {
        field: &'static str,
        message: String,
    },
    #[error("{what} not found: {key}")]
    NotFound { what: &'static str, key: String },
    #[error("CAS conflict on {key}: expected index {expected}, current index {current}")]
    CasConflict {
        key: String,
        expected: u64,
        current: u64,
    },
    #[error("service limit reached: services.max_local_services = {limit}")]
    ServiceLimit { limit: u64 },
    #[error(transparent)]
    Store(#[from] StoreError),
}

fn invalid(field: &'static str, message: impl Into<String>) -> RegistryError {
    RegistryError::Invalid {
        field,
        message: message.into(),
    }
}

/// A service as Konsul clients send it, plus the edge's `id` and `ttl`.
/// Unknown fields are ignored, as the Konsul server does.
#[derive(Debug, Clone, Deserialize, Default)]
pub struct ServiceInput {
    #[serde(default)]
    pub id: Option<String>,
    #[serde(default)]
    pub name: String,
    #[serde(default)]
    pub address: String,
    #[serde(default)]
    pub port: i64,
    #[serde(default)]
    pub tags: Vec<String>,
    #[serde(default)]
    pub meta: BTreeMap<String, String>,
    #[serde(default)]
    pub checks: Vec<serde_json::Value>,
    /// `30s`-style; absent means `services.default_ttl`.
    #[serde(default)]
    pub ttl: Option<String>,
}

/// A registered service: the record body and the API's JSON shape.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Service {
    pub id: String,
    pub name: String,
    pub address: String,
    pub port: u16,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tags: Vec<String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub meta: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub checks: Vec<serde_json::Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ttl: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Health {
    Passing,
    Critical,
}

#[derive(Debug, Clone, Serialize)]
pub struct ServiceEntry {
    pub service: Service,
    pub create_index: u64,
    pub modify_index: u64,
    /// Milliseconds since the epoch; `None` for services without a TTL.
    pub expires_at_ms: Option<u64>,
    pub health: Health,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct KvBody {
    value: String,
    #[serde(default)]
    flags: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct KvEntry {
    pub key: String,
    pub value: String,
    pub flags: u64,
    pub create_index: u64,
    pub modify_index: u64,
}

/// What changed, published after the change committed. Subscribers (D-Bus
/// signals, MQTT publishes, the sync client's "sync soon" trigger) get
/// every change that happens while they listen; a subscriber that falls
/// more than [`EVENT_BACKLOG`] behind loses the oldest events rather than
/// slowing writers down.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Change {
    pub kind: Kind,
    pub key: String,
    pub op: ChangeOp,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChangeOp {
    Upsert,
    Delete,
}

pub const EVENT_BACKLOG: usize = 1024;

/// A generic view of a replicated record, for APIs that list any kind.
#[derive(Debug, Clone, Serialize)]
pub struct RecordView {
    pub key: String,
    pub body: serde_json::Value,
    pub create_index: u64,
    pub modify_index: u64,
}

#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub max_services: u64,
    /// 0: services without an explicit ttl never expire.
    pub default_ttl_ms: u64,
}

/// The registry API. Cheap to clone; every call is one store job.
#[derive(Clone)]
pub struct Registry {
    store: Store,
    limits: Limits,
    events: async_broadcast::Sender<Change>,
    // Keeps the channel open while nobody subscribes.
    _events_keepalive: async_broadcast::InactiveReceiver<Change>,
}

impl Registry {
    pub fn new(store: Store, limits: Limits) -> Self {
        let (mut events, rx) = async_broadcast::broadcast(EVENT_BACKLOG);
        events.set_overflow(true);
        Registry {
            store,
            limits,
            events,
            _events_keepalive: rx.deactivate(),
        }
    }

    pub fn store(&self) -> &Store {
        &self.store
    }

    pub fn limits(&self) -> Limits {
        self.limits
    }

    /// Every change committed from now on.
    pub fn subscribe(&self) -> async_broadcast::Receiver<Change> {
        self.events.new_receiver()
    }

    /// Announces a committed change. Modules that commit their own records
    /// (devices, sync) call this after their store job returned.
    pub fn notify(&self, kind: Kind, key: &str, op: ChangeOp) {
        // Never blocks: with overflow on, a full backlog drops the oldest.
        let _ = self.events.try_broadcast(Change {
            kind,
            key: key.to_owned(),
            op,
        });
    }

    /// Live records of any kind, as JSON.
    pub async fn records(&self, kind: Kind) -> Result<Vec<RecordView>, RegistryError> {
        self.store
            .call(move |db| db.list(kind, None)?.iter().map(record_view).collect())
            .await?
    }

    /// One live record of any kind, as JSON.
    pub async fn record(&self, kind: Kind, key: String) -> Result<RecordView, RegistryError> {
        self.store
            .call(move |db| {
                let rec = live(db.get(kind, &key)?).ok_or(RegistryError::NotFound {
                    what: kind.as_str(),
                    key,
                })?;
                record_view(&rec)
            })
            .await?
    }
}

/// The one write path for replicated records. `body: None` writes a
/// tombstone. Returns the version written.
pub fn commit(
    tx: &mut Tx<'_>,
    kind: Kind,
    key: &str,
    name: Option<&str>,
    body: Option<String>,
) -> Result<Record, StoreError> {
    let prev = tx.get(kind, key)?;
    let index = tx.next_index()?;
    let hlc = tx.now();
    let mut vv = prev
        .as_ref()
        .map(|p| p.vv.clone())
        .unwrap_or_else(VersionVector::default);
    vv.increment(tx.node_id());
    let create_index = match &prev {
        Some(p) if !p.tombstone => p.create_index,
        _ => index,
    };
    let origin = tx.node_id().to_owned();
    let stamp = Stamp {
        hlc: hlc.0,
        origin: origin.clone(),
    };
    let tombstone = body.is_none();
    let (body, fields) = match (body, &prev) {
        (Some(b), _) => {
            // Sorted keys: equal content is equal text on every replica.
            let b = crdt::canonical(&b).map_err(|detail| StoreError::BadRecord {
                kind: kind.as_str().into(),
                key: key.into(),
                detail,
            })?;
            let live_prev = prev.as_ref().filter(|p| !p.tombstone);
            let fields = crdt::restamp(live_prev.map(|p| (p.body.as_str(), &p.fields)), &b, &stamp);
            (b, fields)
        }
        // A tombstone keeps no body: a delete writes "absent" into every
        // field it knew, with the delete's stamp. Field-wise merge stays a
        // join (each field is still a maximum over (stamp, value)), and an
        // older concurrent value cannot bring the body back, because the
        // delete's stamp is newer than every stamp it replaced.
        (None, Some(p)) => {
            let fields = p
                .fields
                .keys()
                .map(|k| (k.clone(), stamp.clone()))
                .collect();
            ("{}".into(), fields)
        }
        (None, None) => ("{}".into(), Default::default()),
    };
    if tombstone {
        // A delete frees space: it must succeed on a full store.
        tx.use_headroom();
    }
    let rec = Record {
        kind,
        key: key.to_owned(),
        name: name.map(str::to_owned),
        tombstone,
        body,
        hlc,
        origin,
        vv,
        create_index,
        modify_index: index,
        fields,
        owner: prev.as_ref().map(|p| p.owner.clone()).unwrap_or_default(),
        // A local write flows to every edge, including the one that
        // supplied the previous version.
        src: String::new(),
    };
    tx.put(&rec)?;
    tx.enqueue(kind, key)?;
    Ok(rec)
}

fn live(rec: Option<Record>) -> Option<Record> {
    rec.filter(|r| !r.tombstone)
}

fn check_cas(key: &str, prev: Option<&Record>, cas: Option<u64>) -> Result<(), RegistryError> {
    match (cas, prev) {
        (None, _) => Ok(()),
        (Some(0), None) => Ok(()),
        (Some(0), Some(p)) => Err(RegistryError::CasConflict {
            key: key.into(),
            expected: 0,
            current: p.modify_index,
        }),
        (Some(_), None) => Err(RegistryError::NotFound {
            what: "key",
            key: key.into(),
        }),
        (Some(n), Some(p)) if p.modify_index == n => Ok(()),
        (Some(n), Some(p)) => Err(RegistryError::CasConflict {
            key: key.into(),
            expected: n,
            current: p.modify_index,
        }),
    }
}

/// Canonical JSON (via `Value`, whose maps are sorted), as `commit` stores
/// it, so an unchanged registration compares equal.
pub fn to_body<T: Serialize>(v: &T) -> Result<String, StoreError> {
    serde_json::to_value(v)
        .and_then(|v| serde_json::to_string(&v))
        .map_err(|e| StoreError::BadRecord {
            kind: "body".into(),
            key: String::new(),
            detail: e.to_string(),
        })
}

fn from_body<T: for<'de> Deserialize<'de>>(rec: &Record) -> Result<T, StoreError> {
    serde_json::from_str(&rec.body).map_err(|e| StoreError::BadRecord {
        kind: rec.kind.as_str().into(),
        key: rec.key.clone(),
        detail: e.to_string(),
    })
}

fn record_view(rec: &Record) -> Result<RecordView, RegistryError> {
    Ok(RecordView {
        key: rec.key.clone(),
        body: from_body(rec)?,
        create_index: rec.create_index,
        modify_index: rec.modify_index,
    })
}

#[cfg(test)]
mod tests;
