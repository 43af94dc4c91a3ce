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

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::clock::{wall_millis, VersionVector};
use crate::crdt::{self, Stamp};
use crate::store::{Kind, Record, Store, StoreError, Tx};

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

    /// Registers (or re-registers) a service; returns it with its modify
    /// index. With `cas`, `Some(0)` means "only if new" and `Some(n)` means
    /// "only if its modify index is still n".
    pub async fn register(
        &self,
        input: ServiceInput,
        cas: Option<u64>,
    ) -> Result<(Service, u64), RegistryError> {
        let (service, ttl_ms) = validate_service(input, self.limits.default_ttl_ms)?;
        let limits = self.limits;
        let id = service.id.clone();
        let (service, index, changed) = self
            .store
            .call(move |db| {
                db.tx(|tx| {
                    let prev = live(tx.get(Kind::Service, &service.id)?);
                    check_cas(&service.id, prev.as_ref(), cas)?;
                    let now = wall_millis();
                    tx.set_service_ttl(&service.id, ttl_ms, now)?;
                    let body = to_body(&service)?;
                    if let Some(p) = prev.as_ref().filter(|p| p.body == body) {
                        // Same registration again (a client restarting):
                        // refresh the TTL, but it is not a change to sync.
                        return Ok((service, p.modify_index, false));
                    }
                    if prev.is_none() {
                        let n = tx.count_live(Kind::Service)?;
                        if n >= limits.max_services {
                            return Err(RegistryError::ServiceLimit {
                                limit: limits.max_services,
                            });
                        }
                    }
                    let rec = commit(
                        tx,
                        Kind::Service,
                        &service.id,
                        Some(&service.name),
                        Some(body),
                    )?;
                    Ok((service, rec.modify_index, true))
                })
            })
            .await??;
        if changed {
            self.notify(Kind::Service, &id, ChangeOp::Upsert);
        }
        Ok((service, index))
    }

    pub async fn deregister(&self, id: String, cas: Option<u64>) -> Result<(), RegistryError> {
        let key = id.clone();
        self.store
            .call(move |db| {
                db.tx(|tx| {
                    let prev = live(tx.get(Kind::Service, &id)?);
                    let Some(prev) = prev else {
                        return Err(RegistryError::NotFound {
                            what: "service",
                            key: id,
                        });
                    };
                    check_cas(&id, Some(&prev), cas)?;
                    tx.set_service_ttl(&id, None, 0)?;
                    commit(tx, Kind::Service, &id, prev.name.as_deref(), None)?;
                    Ok(())
                })
            })
            .await??;
        self.notify(Kind::Service, &key, ChangeOp::Delete);
        Ok(())
    }

    /// Moves a TTL service's deadline; returns the service.
    pub async fn heartbeat(&self, id: String) -> Result<Service, RegistryError> {
        self.store
            .call(move |db| {
                let rec =
                    live(db.get(Kind::Service, &id)?).ok_or_else(|| RegistryError::NotFound {
                        what: "service",
                        key: id.clone(),
                    })?;
                db.touch_service(&id, wall_millis())?;
                Ok(from_body::<Service>(&rec)?)
            })
            .await?
    }

    /// All services; with `include_critical` false, only passing ones.
    pub async fn services(
        &self,
        include_critical: bool,
    ) -> Result<Vec<ServiceEntry>, RegistryError> {
        self.store
            .call(move |db| {
                let now = wall_millis();
                let mut out = Vec::new();
                for rec in db.list(Kind::Service, None)? {
                    let e = entry(db, &rec, now)?;
                    if include_critical || e.health == Health::Passing {
                        out.push(e);
                    }
                }
                Ok(out)
            })
            .await?
    }

    /// A service by id, else the first passing instance with that name.
    pub async fn service(&self, id_or_name: String) -> Result<ServiceEntry, RegistryError> {
        self.store
            .call(move |db| {
                let now = wall_millis();
                if let Some(rec) = live(db.get(Kind::Service, &id_or_name)?) {
                    let e = entry(db, &rec, now)?;
                    if e.health == Health::Passing {
                        return Ok(e);
                    }
                }
                for rec in db.list(Kind::Service, Some(&id_or_name))? {
                    let e = entry(db, &rec, now)?;
                    if e.health == Health::Passing {
                        return Ok(e);
                    }
                }
                Err(RegistryError::NotFound {
                    what: "service",
                    key: id_or_name,
                })
            })
            .await?
    }

    pub async fn kv_get(&self, key: String) -> Result<KvEntry, RegistryError> {
        self.store
            .call(move |db| {
                let rec = live(db.get(Kind::Kv, &key)?)
                    .ok_or(RegistryError::NotFound { what: "key", key })?;
                kv_entry(&rec)
            })
            .await?
    }

    pub async fn kv_keys(&self) -> Result<Vec<String>, RegistryError> {
        Ok(self.store.call(|db| db.keys(Kind::Kv)).await??)
    }

    /// Sets a key; returns the new modify index. CAS as in [`register`].
    pub async fn kv_put(
        &self,
        key: String,
        value: String,
        flags: u64,
        cas: Option<u64>,
    ) -> Result<u64, RegistryError> {
        validate_key(&key)?;
        if value.len() > MAX_VALUE_LEN {
            return Err(invalid(
                "value",
                format!("{} bytes (max {MAX_VALUE_LEN})", value.len()),
            ));
        }
        let k = key.clone();
        let index = self
            .store
            .call(move |db| {
                db.tx(|tx| {
                    let prev = live(tx.get(Kind::Kv, &key)?);
                    check_cas(&key, prev.as_ref(), cas)?;
                    let body = to_body(&KvBody { value, flags })?;
                    let rec = commit(tx, Kind::Kv, &key, None, Some(body))?;
                    Ok::<_, RegistryError>(rec.modify_index)
                })
            })
            .await??;
        self.notify(Kind::Kv, &k, ChangeOp::Upsert);
        Ok(index)
    }

    /// Sets many keys in one transaction (one fsync): all or none.
    pub async fn kv_put_many(&self, items: Vec<(String, String)>) -> Result<u64, RegistryError> {
        if items.len() > MAX_BATCH {
            return Err(invalid(
                "items",
                format!("{} items (max {MAX_BATCH})", items.len()),
            ));
        }
        for (key, value) in &items {
            validate_key(key)?;
            if value.len() > MAX_VALUE_LEN {
                return Err(invalid(
                    "value",
                    format!("{key}: {} bytes (max {MAX_VALUE_LEN})", value.len()),
                ));
            }
        }
        let keys: Vec<String> = items.iter().map(|(k, _)| k.clone()).collect();
        let index = self
            .store
            .call(move |db| {
                db.tx(|tx| {
                    let mut last = 0;
                    for (key, value) in items {
                        let body = to_body(&KvBody { value, flags: 0 })?;
                        last = commit(tx, Kind::Kv, &key, None, Some(body))?.modify_index;
                    }
                    Ok::<_, RegistryError>(last)
                })
            })
            .await??;
        for k in keys {
            self.notify(Kind::Kv, &k, ChangeOp::Upsert);
        }
        Ok(index)
    }

    /// Deletes many keys in one transaction; missing keys are skipped.
    pub async fn kv_delete_many(&self, keys: Vec<String>) -> Result<Vec<String>, RegistryError> {
        if keys.len() > MAX_BATCH {
            return Err(invalid(
                "keys",
                format!("{} keys (max {MAX_BATCH})", keys.len()),
            ));
        }
        for key in &keys {
            validate_key(key)?;
        }
        let deleted = self
            .store
            .call(move |db| {
                db.tx(|tx| {
                    let mut deleted = Vec::new();
                    for key in keys {
                        if live(tx.get(Kind::Kv, &key)?).is_some() {
                            commit(tx, Kind::Kv, &key, None, None)?;
                            deleted.push(key);
                        }
                    }
                    Ok::<_, RegistryError>(deleted)
                })
            })
            .await??;
        for k in &deleted {
            self.notify(Kind::Kv, k, ChangeOp::Delete);
        }
        Ok(deleted)
    }

    pub async fn kv_delete(&self, key: String, cas: Option<u64>) -> Result<(), RegistryError> {
        validate_key(&key)?;
        let k = key.clone();
        let deleted = self
            .store
            .call(move |db| {
                db.tx(|tx| {
                    let prev = live(tx.get(Kind::Kv, &key)?);
                    match (prev, cas) {
                        (None, Some(_)) => Err(RegistryError::NotFound { what: "key", key }),
                        // Deleting what is not there is a no-op, as in Konsul.
                        (None, None) => Ok(false),
                        (Some(p), cas) => {
                            check_cas(&key, Some(&p), cas)?;
                            commit(tx, Kind::Kv, &key, None, None)?;
                            Ok(true)
                        }
                    }
                })
            })
            .await??;
        if deleted {
            self.notify(Kind::Kv, &k, ChangeOp::Delete);
        }
        Ok(())
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

fn entry(db: &crate::store::Db, rec: &Record, now: u64) -> Result<ServiceEntry, StoreError> {
    let service: Service = from_body(rec)?;
    let expires_at_ms = db.service_health(&rec.key)?.map(|(_, exp)| exp);
    let health = match expires_at_ms {
        Some(exp) if exp <= now => Health::Critical,
        _ => Health::Passing,
    };
    Ok(ServiceEntry {
        service,
        create_index: rec.create_index,
        modify_index: rec.modify_index,
        expires_at_ms,
        health,
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

fn kv_entry(rec: &Record) -> Result<KvEntry, RegistryError> {
    let body: KvBody = from_body(rec)?;
    Ok(KvEntry {
        key: rec.key.clone(),
        value: body.value,
        flags: body.flags,
        create_index: rec.create_index,
        modify_index: rec.modify_index,
    })
}

fn validate_ident(field: &'static str, s: &str) -> Result<(), RegistryError> {
    if s.is_empty() {
        return Err(invalid(field, "is required"));
    }
    if s.len() > MAX_NAME_LEN {
        return Err(invalid(
            field,
            format!("{} chars (max {MAX_NAME_LEN})", s.len()),
        ));
    }
    if s.chars()
        .any(|c| c.is_control() || c.is_whitespace() || c == '/' || c == '?' || c == '#')
    {
        return Err(invalid(
            field,
            format!(
                "`{}` contains whitespace, a control character, / ? or #",
                s.escape_debug()
            ),
        ));
    }
    Ok(())
}

fn validate_key(key: &str) -> Result<(), RegistryError> {
    if key.is_empty() {
        return Err(invalid("key", "is required"));
    }
    if key.len() > MAX_KEY_LEN {
        return Err(invalid(
            "key",
            format!("{} bytes (max {MAX_KEY_LEN})", key.len()),
        ));
    }
    if key.chars().any(char::is_control) {
        return Err(invalid("key", "contains a control character"));
    }
    Ok(())
}

/// Konsul's rules, plus the edge's id and ttl. Returns the service and its
/// TTL in milliseconds.
pub fn validate_service(
    input: ServiceInput,
    default_ttl_ms: u64,
) -> Result<(Service, Option<u64>), RegistryError> {
    validate_ident("name", &input.name)?;
    let id = input.id.unwrap_or_else(|| input.name.clone());
    validate_ident("id", &id)?;
    if input.address.is_empty() {
        return Err(invalid("address", "is required"));
    }
    if input.address.len() > MAX_NAME_LEN
        || input
            .address
            .chars()
            .any(|c| c.is_control() || c.is_whitespace())
    {
        return Err(invalid(
            "address",
            format!(
                "`{}` is not a host name or address",
                input.address.escape_debug()
            ),
        ));
    }
    if input.port == 0 {
        return Err(invalid("port", "is required"));
    }
    let port = u16::try_from(input.port)
        .ok()
        .filter(|p| *p >= 1)
        .ok_or_else(|| invalid("port", format!("{} is not between 1 and 65535", input.port)))?;
    if input.tags.len() > MAX_TAGS {
        return Err(invalid(
            "tags",
            format!("{} tags (max {MAX_TAGS})", input.tags.len()),
        ));
    }
    let mut seen = std::collections::HashSet::new();
    for tag in &input.tags {
        if tag.is_empty() {
            return Err(invalid("tags", "empty tag not allowed"));
        }
        if tag.len() > MAX_TAG_LEN {
            return Err(invalid(
                "tags",
                format!("tag of {} chars (max {MAX_TAG_LEN})", tag.len()),
            ));
        }
        if !tag
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_:./".contains(c))
        {
            return Err(invalid(
                "tags",
                format!(
                    "`{}`: allowed are A-Z a-z 0-9 - _ : . /",
                    tag.escape_debug()
                ),
            ));
        }
        if !seen.insert(tag) {
            return Err(invalid("tags", format!("duplicate tag `{tag}`")));
        }
    }
    if input.meta.len() > MAX_META_KEYS {
        return Err(invalid(
            "meta",
            format!("{} keys (max {MAX_META_KEYS})", input.meta.len()),
        ));
    }
    for (k, v) in &input.meta {
        if k.is_empty() {
            return Err(invalid("meta", "empty key not allowed"));
        }
        if k.len() > MAX_META_KEY_LEN {
            return Err(invalid(
                "meta",
                format!("key of {} chars (max {MAX_META_KEY_LEN})", k.len()),
            ));
        }
        if !k
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        {
            return Err(invalid(
                "meta",
                format!("key `{}`: allowed are A-Z a-z 0-9 - _", k.escape_debug()),
            ));
        }
        if RESERVED_META_PREFIXES.iter().any(|p| k.starts_with(p)) {
            return Err(invalid(
                "meta",
                format!("key `{k}` uses a reserved prefix (konsul_, _)"),
            ));
        }
        if v.len() > MAX_META_VALUE_LEN {
            return Err(invalid(
                "meta",
                format!(
                    "value of `{k}`: {} chars (max {MAX_META_VALUE_LEN})",
                    v.len()
                ),
            ));
        }
    }
    if input.checks.len() > MAX_CHECKS {
        return Err(invalid(
            "checks",
            format!("{} checks (max {MAX_CHECKS})", input.checks.len()),
        ));
    }
    if input.checks.iter().any(|c| !c.is_object()) {
        return Err(invalid("checks", "each check must be an object"));
    }
    let ttl_ms = match &input.ttl {
        Some(t) => {
            let d: crate::config::Duration = t.parse().map_err(|e: String| invalid("ttl", e))?;
            let ms = d.0.as_millis() as u64;
            if !(1_000..=86_400_000).contains(&ms) {
                return Err(invalid("ttl", format!("`{t}` is outside 1s-24h")));
            }
            Some(ms)
        }
        None => (default_ttl_ms > 0).then_some(default_ttl_ms),
    };
    let service = Service {
        id,
        name: input.name,
        address: input.address,
        port,
        tags: input.tags,
        meta: input.meta,
        checks: input.checks,
        ttl: input.ttl,
    };
    Ok((service, ttl_ms))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::Causality;
    use crate::store::StoreOptions;

    fn registry(dir: &std::path::Path) -> Registry {
        let store = Store::open(StoreOptions {
            path: dir.join("r.db"),
            max_size: 8 << 20,
            node_id: "edge-a".into(),
        })
        .unwrap();
        Registry::new(
            store,
            Limits {
                max_services: 3,
                default_ttl_ms: 0,
            },
        )
    }

    fn svc(name: &str) -> ServiceInput {
        ServiceInput {
            name: name.into(),
            address: "10.0.0.1".into(),
            port: 80,
            ..Default::default()
        }
    }

    #[test]
    fn validation_follows_konsul() {
        let ok = |i: ServiceInput| validate_service(i, 0).map(|_| ());
        assert!(ok(svc("web")).is_ok());
        assert!(ok(ServiceInput {
            port: 0,
            ..svc("web")
        })
        .is_err());
        assert!(ok(ServiceInput {
            port: 65536,
            ..svc("web")
        })
        .is_err());
        assert!(ok(ServiceInput {
            address: String::new(),
            ..svc("web")
        })
        .is_err());
        assert!(ok(svc("")).is_err());
        assert!(ok(ServiceInput {
            tags: vec!["a b".into()],
            ..svc("web")
        })
        .is_err());
        assert!(ok(ServiceInput {
            tags: vec!["x".into(), "x".into()],
            ..svc("web")
        })
        .is_err());
        assert!(ok(ServiceInput {
            tags: (0..65).map(|i| format!("t{i}")).collect(),
            ..svc("web")
        })
        .is_err());
        let meta = |k: &str, v: &str| BTreeMap::from([(k.to_string(), v.to_string())]);
        assert!(ok(ServiceInput {
            meta: meta("konsul_x", "1"),
            ..svc("web")
        })
        .is_err());
        assert!(ok(ServiceInput {
            meta: meta("_x", "1"),
            ..svc("web")
        })
        .is_err());
        assert!(ok(ServiceInput {
            meta: meta("ok", &"v".repeat(513)),
            ..svc("web")
        })
        .is_err());
        assert!(ok(ServiceInput {
            meta: meta("ok-key_1", &"v".repeat(512)),
            ..svc("web")
        })
        .is_ok());
        assert!(ok(ServiceInput {
            ttl: Some("10x".into()),
            ..svc("web")
        })
        .is_err());
    }

    #[test]
    fn every_write_stamps_and_queues() {
        let d = tempfile::tempdir().unwrap();
        let r = registry(d.path());
        smol::block_on(async {
            let (_, i1) = r.register(svc("web"), None).await.unwrap();
            let (_, i2) = r
                .register(
                    ServiceInput {
                        port: 81,
                        ..svc("web")
                    },
                    None,
                )
                .await
                .unwrap();
            assert!(i2 > i1);
            // identical re-registration is not a new version
            let (_, i3) = r
                .register(
                    ServiceInput {
                        port: 81,
                        ..svc("web")
                    },
                    None,
                )
                .await
                .unwrap();
            assert_eq!(i3, i2);
            let (rec, outbox) = r
                .store()
                .call(|db| {
                    (
                        db.get(Kind::Service, "web").unwrap().unwrap(),
                        db.outbox(10).unwrap(),
                    )
                })
                .await
                .unwrap();
            assert_eq!(rec.vv.get("edge-a"), 2);
            assert_eq!(outbox.len(), 1, "outbox coalesces per key");
            r.deregister("web".into(), None).await.unwrap();
            let rec2 = r
                .store()
                .call(|db| db.get(Kind::Service, "web").unwrap().unwrap())
                .await
                .unwrap();
            assert!(rec2.tombstone);
            assert!(rec2.hlc > rec.hlc);
            assert_eq!(rec2.vv.compare(&rec.vv), Causality::Dominates);
        });
    }

    #[test]
    fn committed_changes_are_announced_and_refused_ones_are_not() {
        let d = tempfile::tempdir().unwrap();
        let r = registry(d.path());
        let mut rx = r.subscribe();
        smol::block_on(async {
            r.register(svc("web"), None).await.unwrap();
            r.kv_put("k".into(), "v".into(), 0, None).await.unwrap();
            assert!(r.kv_put("k".into(), "v".into(), 0, Some(0)).await.is_err());
            r.kv_delete("k".into(), None).await.unwrap();
            r.kv_delete("k".into(), None).await.unwrap(); // no-op: nothing to announce
            let got: Vec<_> = std::iter::from_fn(|| rx.try_recv().ok()).collect();
            let want = [
                (Kind::Service, "web", ChangeOp::Upsert),
                (Kind::Kv, "k", ChangeOp::Upsert),
                (Kind::Kv, "k", ChangeOp::Delete),
            ];
            assert_eq!(got.len(), want.len(), "{got:?}");
            for (c, (k, key, op)) in got.iter().zip(want) {
                assert_eq!((c.kind, c.key.as_str(), c.op), (k, key, op));
            }
            let views = r.records(Kind::Service).await.unwrap();
            assert_eq!(views[0].body["name"], "web");
        });
    }

    #[test]
    fn cas_semantics() {
        let d = tempfile::tempdir().unwrap();
        let r = registry(d.path());
        smol::block_on(async {
            let i1 = r.kv_put("a".into(), "1".into(), 0, Some(0)).await.unwrap();
            assert!(matches!(
                r.kv_put("a".into(), "2".into(), 0, Some(0)).await,
                Err(RegistryError::CasConflict { .. })
            ));
            assert!(matches!(
                r.kv_put("a".into(), "2".into(), 0, Some(i1 + 100)).await,
                Err(RegistryError::CasConflict { .. })
            ));
            assert!(matches!(
                r.kv_put("missing".into(), "2".into(), 0, Some(5)).await,
                Err(RegistryError::NotFound { .. })
            ));
            let i2 = r.kv_put("a".into(), "2".into(), 7, Some(i1)).await.unwrap();
            let e = r.kv_get("a".into()).await.unwrap();
            assert_eq!(
                (e.value.as_str(), e.flags, e.modify_index, e.create_index),
                ("2", 7, i2, i1)
            );
            assert!(matches!(
                r.kv_delete("a".into(), Some(i1)).await,
                Err(RegistryError::CasConflict { .. })
            ));
            r.kv_delete("a".into(), Some(i2)).await.unwrap();
            assert!(matches!(
                r.kv_get("a".into()).await,
                Err(RegistryError::NotFound { .. })
            ));
            // re-created after a delete: a fresh create index
            let i3 = r.kv_put("a".into(), "3".into(), 0, Some(0)).await.unwrap();
            assert_eq!(r.kv_get("a".into()).await.unwrap().create_index, i3);
        });
    }

    #[test]
    fn service_limit_is_enforced_and_changes_nothing() {
        let d = tempfile::tempdir().unwrap();
        let r = registry(d.path());
        smol::block_on(async {
            for n in ["a", "b", "c"] {
                r.register(svc(n), None).await.unwrap();
            }
            let e = r.register(svc("d"), None).await.unwrap_err();
            assert!(matches!(e, RegistryError::ServiceLimit { limit: 3 }), "{e}");
            // updating an existing one is still allowed
            r.register(
                ServiceInput {
                    port: 99,
                    ..svc("a")
                },
                None,
            )
            .await
            .unwrap();
            assert_eq!(r.services(true).await.unwrap().len(), 3);
            let outbox = r.store().call(|db| db.outbox(100).unwrap()).await.unwrap();
            assert!(outbox.iter().all(|(_, _, k)| k != "d"));
        });
    }

    #[test]
    fn several_instances_share_a_name() {
        let d = tempfile::tempdir().unwrap();
        let r = registry(d.path());
        smol::block_on(async {
            r.register(
                ServiceInput {
                    id: Some("web-1".into()),
                    ..svc("web")
                },
                None,
            )
            .await
            .unwrap();
            r.register(
                ServiceInput {
                    id: Some("web-2".into()),
                    port: 81,
                    ..svc("web")
                },
                None,
            )
            .await
            .unwrap();
            assert_eq!(r.services(false).await.unwrap().len(), 2);
            let e = r.service("web".into()).await.unwrap();
            assert_eq!(e.service.name, "web");
            assert_eq!(r.service("web-2".into()).await.unwrap().service.port, 81);
        });
    }

    #[test]
    fn ttl_services_turn_critical_and_heartbeats_revive_them() {
        let d = tempfile::tempdir().unwrap();
        let r = registry(d.path());
        smol::block_on(async {
            r.register(
                ServiceInput {
                    ttl: Some("1s".into()),
                    ..svc("ttl")
                },
                None,
            )
            .await
            .unwrap();
            assert_eq!(r.services(false).await.unwrap().len(), 1);
            // Move the deadline into the past instead of sleeping.
            r.store()
                .call(|db| db.touch_service("ttl", wall_millis() - 5_000).unwrap())
                .await
                .unwrap();
            assert!(r.services(false).await.unwrap().is_empty());
            assert_eq!(r.services(true).await.unwrap()[0].health, Health::Critical);
            assert!(matches!(
                r.service("ttl".into()).await,
                Err(RegistryError::NotFound { .. })
            ));
            r.heartbeat("ttl".into()).await.unwrap();
            assert_eq!(r.services(false).await.unwrap().len(), 1);
            let outbox = r.store().call(|db| db.outbox(10).unwrap()).await.unwrap();
            assert_eq!(outbox.len(), 1, "heartbeats are not replicated writes");
        });
    }
}
