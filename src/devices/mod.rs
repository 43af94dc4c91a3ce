//! The device registry: registrations, telemetry, heartbeats, events,
//! health and alerts. Transport-free: the MQTT bridge parses messages
//! ([`crate::mqtt::payload`]) and hands them here in batches; HTTP (and
//! later D-Bus) read through the query methods.
//!
//! What is replicated and what is local:
//! - a device (the seed's model: type, name, location, metadata, firmware
//!   and target version, update status, telemetry interval) is a replicated
//!   record, `Kind::Device`, key = the device id, and it is registered as a
//!   service (id = device id, name = type, tags `iot`,`mqtt`) in the same
//!   transaction, so the two never disagree;
//! - alerts are replicated records, `Kind::Alert`, key = `{device}/{name}`;
//!   clearing one writes it again with `active: false`, so the hub sees the
//!   clear;
//! - what changes with every message (last seen, battery, signal, last
//!   telemetry, health) lives in the local `device_state` table, and the
//!   telemetry history in the local append-only `telemetry` table with a
//!   per-device sequence number (the sync stream is idempotent by device +
//!   sequence). Heartbeats never become replicated writes.
//!
//! A batch of messages is applied in one store transaction (one fsync for
//! the batch, not one per message). A message refused for its content
//! (limits, unknown device) is an outcome, not an error, so it does not
//! roll back its batch; a store error rolls the batch back and the bridge
//! retries the messages one by one, so one bad write cannot take healthy
//! messages down with it.
//!
//! Retention: telemetry and events older than `devices.telemetry_retention`
//! are pruned, and the history is kept under `devices.telemetry_max_size`
//! (oldest first, down to 90% so pruning is not paid on every message).
//! Pruning runs with ingest and on the monitor's timer (at the oldest row's
//! expiry), never on a polling loop.

pub mod health;

use std::collections::BTreeMap;

use rusqlite::{params, OptionalExtension};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::clock::{rfc3339, wall_millis};
use crate::mqtt::payload::{self, Inbound, Reason, Registration};
use crate::registry::{self, ChangeOp, Registry, ServiceInput};
use crate::store::{Db, Kind, StoreError, Tx};
use health::{Health, Rules, Signal, Transition};

/// Per-row overhead counted against `devices.telemetry_max_size` besides
/// the body and the device id (rowid, seq, timestamp, b-tree cell); the
/// store's eviction under `storage.max_size` counts the same.
const ROW_OVERHEAD: u64 = crate::store::TELEMETRY_ROW_OVERHEAD;
/// Events are kept at most this many (besides the age limit).
const MAX_EVENTS: i64 = 10_000;
/// Telemetry rows returned by a history query when no limit is given.
pub const DEFAULT_HISTORY_LIMIT: usize = 100;
pub const MAX_HISTORY_LIMIT: usize = 10_000;

#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    #[error("device not found: {id}")]
    NotFound { id: String },
    #[error("devices.max_devices ({limit}) reached; device {id} not registered")]
    DeviceLimit { id: String, limit: u64 },
    #[error("services.max_local_services ({limit}) reached; device {id} not registered")]
    ServiceLimit { id: String, limit: u64 },
    #[error("device {id}: service id `{id}` belongs to a service not registered over MQTT")]
    ServiceTaken { id: String },
    #[error("device {id} is not registered; publish to devices/{id}/register first")]
    Unregistered { id: String },
    #[error("device {id}: {message}")]
    Invalid { id: String, message: String },
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl DeviceError {
    /// The label for the MQTT rejection metric.
    pub fn reason(&self) -> Reason {
        match self {
            DeviceError::NotFound { .. } | DeviceError::Unregistered { .. } => Reason::Unregistered,
            DeviceError::DeviceLimit { .. } | DeviceError::ServiceLimit { .. } => Reason::Limit,
            DeviceError::ServiceTaken { .. } | DeviceError::Invalid { .. } => Reason::Invalid,
            DeviceError::Store(_) => Reason::Store,
        }
    }
}

/// The replicated part of a device (the record body).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Device {
    pub id: String,
    #[serde(rename = "type")]
    pub device_type: String,
    #[serde(default)]
    pub name: String,
    #[serde(default)]
    pub location: String,
    #[serde(default)]
    pub metadata: BTreeMap<String, String>,
    #[serde(default)]
    pub firmware_version: String,
    #[serde(default)]
    pub target_version: String,
    #[serde(default)]
    pub update_status: String,
    pub telemetry_interval_ms: u64,
    #[serde(default)]
    pub address: String,
    #[serde(default)]
    pub port: u16,
}

/// A device as the API shows it: the record plus its local state.
#[derive(Debug, Clone, Serialize)]
pub struct DeviceView {
    #[serde(flatten)]
    pub device: Device,
    pub telemetry_interval: String,
    pub health: Health,
    pub last_seen: String,
    pub last_seen_ms: u64,
    pub battery: Option<u8>,
    pub signal: Option<i16>,
    pub last_telemetry: Option<Value>,
    pub last_telemetry_at: Option<String>,
    pub telemetry_seq: u64,
    pub create_index: u64,
    pub modify_index: u64,
}

/// An alert (the record body of `Kind::Alert`), as stored, published on
/// `alerts/{device_id}` and listed by the API.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Alert {
    pub device_id: String,
    /// `offline`, `low_battery`, or `event:{name}` for device-raised ones.
    pub name: String,
    pub severity: String,
    pub message: String,
    pub active: bool,
    pub raised_at_ms: u64,
    #[serde(default)]
    pub cleared_at_ms: Option<u64>,
}

impl Alert {
    pub fn key(&self) -> String {
        format!("{}/{}", self.device_id, self.name)
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct TelemetryPoint {
    pub seq: u64,
    pub received_at: String,
    pub received_at_ms: u64,
    pub values: Value,
}

/// What became of one message.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// A registration is committed: ack it.
    Registered {
        device: String,
        modify_index: u64,
        created: bool,
    },
    /// Stored (telemetry, heartbeat, event, status), nothing to answer.
    Stored,
    /// Nothing to do (a topic that is not input).
    Ignored,
    /// Refused for its content; explain on `devices/{id}/error`.
    Rejected {
        device: String,
        reason: Reason,
        message: String,
    },
}

#[derive(Debug, Clone, Copy)]
pub struct Settings {
    pub rules: Rules,
    pub max_devices: u64,
    pub retention_ms: u64,
    pub max_history_bytes: u64,
}

impl Settings {
    pub fn from_config(c: &crate::config::Devices) -> Settings {
        Settings {
            rules: Rules {
                stale_after_missed: c.stale_after_missed,
                offline_after_missed: c.offline_after_missed,
                low_battery_percent: c.low_battery_percent,
            },
            max_devices: c.max_devices,
            retention_ms: c.telemetry_retention.0.as_millis() as u64,
            max_history_bytes: c.telemetry_max_size.0,
        }
    }
}

/// The device registry handle. Cheap to clone.
#[derive(Clone)]
pub struct Devices {
    registry: Registry,
    settings: Settings,
    signals: async_channel::Sender<Vec<Signal>>,
    alerts: async_channel::Sender<Alert>,
}

/// The receiving ends the daemon wires: the monitor's input and the alerts
/// to publish.
pub struct Channels {
    pub signals: async_channel::Receiver<Vec<Signal>>,
    pub alerts: async_channel::Receiver<Alert>,
}

impl Devices {
    pub fn new(registry: Registry, settings: Settings) -> (Devices, Channels) {
        let (signals, signals_rx) = async_channel::bounded(64);
        let (alerts, alerts_rx) = async_channel::bounded(1024);
        (
            Devices {
                registry,
                settings,
                signals,
                alerts,
            },
            Channels {
                signals: signals_rx,
                alerts: alerts_rx,
            },
        )
    }

    pub fn settings(&self) -> Settings {
        self.settings
    }

    /// Applies a batch of parsed messages; one outcome per message, in
    /// order. A store error fails the whole batch (nothing of it is
    /// committed); the caller may retry the messages singly.
    pub async fn apply(&self, batch: Vec<Inbound>) -> Result<Vec<Outcome>, StoreError> {
        let settings = self.settings;
        let limits = self.registry.limits();
        // Validation that needs no store runs here, off the store thread.
        let prepared: Vec<Prepared> = batch.into_iter().map(prepare).collect();
        let (outcomes, effects) = self
            .registry
            .store()
            .call(move |db| {
                db.tx(|tx| {
                    let now = wall_millis();
                    let mut fx = Effects::default();
                    let mut outcomes = Vec::with_capacity(prepared.len());
                    for p in prepared {
                        let o = apply_one(tx, p, settings, limits, now, &mut fx)?;
                        outcomes.push(o);
                    }
                    if fx.telemetry_bytes > 0 {
                        add_bytes(tx, fx.telemetry_bytes)?;
                    }
                    if fx.telemetry_rows > 0 {
                        prune(tx, settings, now)?;
                    }
                    Ok::<_, StoreError>((outcomes, fx))
                })
            })
            .await??;
        self.announce(effects).await;
        Ok(outcomes)
    }

    async fn announce(&self, mut fx: Effects) {
        fx.coalesce_signals();
        for (kind, key) in fx.changed {
            self.registry.notify(kind, &key, ChangeOp::Upsert);
        }
        for a in fx.alerts {
            // Full means nobody drains (MQTT off) or the broker is far
            // behind; the alert is stored either way.
            let _ = self.alerts.try_send(a);
        }
        if !fx.signals.is_empty() {
            let _ = self.signals.send(fx.signals).await;
        }
    }

    /// Loads the monitor's state: every device's last seen, interval,
    /// health and low-battery alert. Devices last seen before `since_ms`
    /// (the daemon's start) count from `since_ms`: a device is not declared
    /// offline for the time the edge itself was down.
    pub async fn machine(&self, since_ms: u64) -> Result<health::Machine, StoreError> {
        let rules = self.settings.rules;
        self.registry
            .store()
            .call(move |db| {
                let mut m = health::Machine::new(rules);
                let active: std::collections::HashSet<String> = db
                    .list(Kind::Alert, None)?
                    .into_iter()
                    .filter_map(|r| serde_json::from_str::<Alert>(&r.body).ok())
                    .filter(|a| a.active && a.name == "low_battery")
                    .map(|a| a.device_id)
                    .collect();
                let mut stmt = db
                    .conn()
                    .prepare("SELECT id, last_seen_ms, interval_ms, health FROM device_state")
                    .map_err(|e| db.sql_error("load device state", e))?;
                let rows = stmt
                    .query_map([], |r| {
                        Ok((
                            r.get::<_, String>(0)?,
                            r.get::<_, i64>(1)?,
                            r.get::<_, i64>(2)?,
                            r.get::<_, String>(3)?,
                        ))
                    })
                    .map_err(|e| db.sql_error("load device state", e))?;
                for row in rows {
                    let (id, seen, interval, h) =
                        row.map_err(|e| db.sql_error("load device state", e))?;
                    let low_battery = active.contains(&id);
                    m.load(
                        &id,
                        health::Tracked {
                            last_seen_ms: (seen as u64).max(since_ms),
                            interval_ms: interval as u64,
                            health: Health::parse(&h),
                            low_battery,
                        },
                    );
                }
                Ok(m)
            })
            .await?
    }

    /// Persists the monitor's decisions: health columns and alerts, in one
    /// transaction; then announces and queues the alerts for publishing.
    pub async fn record(&self, transitions: Vec<Transition>) -> Result<(), StoreError> {
        let settings = self.settings;
        let fx = self
            .registry
            .store()
            .call(move |db| {
                db.tx(|tx| {
                    let now = wall_millis();
                    let mut fx = Effects::default();
                    for t in transitions {
                        match t {
                            Transition::Health { device, from, to } => {
                                tx.conn()
                                    .prepare_cached(
                                        "UPDATE device_state SET health = ?2 WHERE id = ?1",
                                    )
                                    .and_then(|mut s| s.execute(params![device, to.as_str()]))
                                    .map_err(|e| tx.sql_error("write device health", e))?;
                                log::info!("device {device}: {} -> {}", from.as_str(), to.as_str());
                                if to == Health::Offline {
                                    let msg = format!("device {device} is offline");
                                    set_alert(
                                        tx, &device, "offline", "critical", &msg, true, now,
                                        &mut fx,
                                    )?;
                                } else if from == Health::Offline {
                                    let msg = format!("device {device} is back online");
                                    set_alert(
                                        tx, &device, "offline", "critical", &msg, false, now,
                                        &mut fx,
                                    )?;
                                }
                            }
                            Transition::LowBattery {
                                device,
                                battery,
                                active,
                            } => {
                                let msg = format!(
                                    "battery at {battery}% (devices.low_battery_percent = {})",
                                    settings.rules.low_battery_percent
                                );
                                set_alert(
                                    tx,
                                    &device,
                                    "low_battery",
                                    "warning",
                                    &msg,
                                    active,
                                    now,
                                    &mut fx,
                                )?;
                            }
                        }
                    }
                    prune(tx, settings, now)?;
                    Ok::<_, StoreError>(fx)
                })
            })
            .await??;
        self.announce(fx).await;
        Ok(())
    }

    /// Applies the retention now.
    pub async fn prune_now(&self) -> Result<(), StoreError> {
        let settings = self.settings;
        self.registry
            .store()
            .call(move |db| {
                db.tx(|tx| {
                    // Pruning frees space: it must succeed on a full store.
                    tx.use_headroom();
                    prune(tx, settings, wall_millis())
                })
            })
            .await?
    }

    /// When the oldest telemetry or event row outlives the retention (for
    /// the monitor's timer); None when there is nothing to expire.
    pub async fn next_expiry(&self) -> Result<Option<u64>, StoreError> {
        let retention = self.settings.retention_ms;
        self.registry
            .store()
            .call(move |db| {
                let oldest: Option<i64> = db
                    .conn()
                    .query_row(
                        "SELECT min(m) FROM (SELECT min(ts_ms) AS m FROM telemetry
                         UNION ALL SELECT min(ts_ms) FROM device_events)",
                        [],
                        |r| r.get(0),
                    )
                    .map_err(|e| db.sql_error("oldest telemetry", e))?;
                Ok(oldest.map(|o| (o as u64).saturating_add(retention)))
            })
            .await?
    }

    pub async fn list(&self) -> Result<Vec<DeviceView>, DeviceError> {
        self.registry
            .store()
            .call(|db| {
                let mut out = Vec::new();
                for rec in db.list(Kind::Device, None)? {
                    if let Some(v) = view(db, &rec)? {
                        out.push(v);
                    }
                }
                Ok(out)
            })
            .await?
    }

    pub async fn get(&self, id: String) -> Result<DeviceView, DeviceError> {
        self.registry
            .store()
            .call(move |db| {
                let rec = db.get(Kind::Device, &id)?.filter(|r| !r.tombstone);
                match rec {
                    Some(rec) => view(db, &rec)?.ok_or(DeviceError::NotFound { id }),
                    None => Err(DeviceError::NotFound { id }),
                }
            })
            .await?
    }

    /// History after `since` (a sequence number; 0 = from the oldest kept),
    /// oldest first, at most `limit` points.
    pub async fn telemetry(
        &self,
        id: String,
        since: u64,
        limit: usize,
    ) -> Result<Vec<TelemetryPoint>, DeviceError> {
        self.registry
            .store()
            .call(move |db| {
                if db
                    .get(Kind::Device, &id)?
                    .filter(|r| !r.tombstone)
                    .is_none()
                {
                    return Err(DeviceError::NotFound { id });
                }
                let mut stmt = db
                    .conn()
                    .prepare_cached(
                        "SELECT seq, ts_ms, body FROM telemetry WHERE device = ?1 AND seq > ?2
                         ORDER BY seq LIMIT ?3",
                    )
                    .map_err(|e| db.sql_error("read telemetry", e))?;
                let rows = stmt
                    .query_map(params![id, since as i64, limit as i64], |r| {
                        Ok((
                            r.get::<_, i64>(0)?,
                            r.get::<_, i64>(1)?,
                            r.get::<_, String>(2)?,
                        ))
                    })
                    .map_err(|e| db.sql_error("read telemetry", e))?;
                let mut out = Vec::new();
                for row in rows {
                    let (seq, ts, body) = row.map_err(|e| db.sql_error("read telemetry", e))?;
                    out.push(TelemetryPoint {
                        seq: seq as u64,
                        received_at: rfc3339(ts as u64),
                        received_at_ms: ts as u64,
                        values: serde_json::from_str(&body).unwrap_or(Value::Null),
                    });
                }
                Ok(out)
            })
            .await?
    }

    /// Alerts, newest first; `active_only` drops cleared ones; `device`
    /// narrows to one device.
    pub async fn alerts(
        &self,
        active_only: bool,
        device: Option<String>,
    ) -> Result<Vec<Alert>, DeviceError> {
        self.registry
            .store()
            .call(move |db| {
                let mut out: Vec<Alert> = Vec::new();
                for rec in db.list(Kind::Alert, None)? {
                    let a: Alert =
                        serde_json::from_str(&rec.body).map_err(|e| StoreError::BadRecord {
                            kind: "alert".into(),
                            key: rec.key.clone(),
                            detail: e.to_string(),
                        })?;
                    if (active_only && !a.active)
                        || device.as_deref().is_some_and(|d| d != a.device_id)
                    {
                        continue;
                    }
                    out.push(a);
                }
                out.sort_by_key(|a| std::cmp::Reverse(a.raised_at_ms));
                Ok(out)
            })
            .await?
    }

    /// Devices by health, for `/metrics`.
    pub async fn counts(&self) -> Result<Vec<(Health, u64)>, StoreError> {
        self.registry
            .store()
            .call(|db| {
                let mut out: Vec<(Health, u64)> = Health::ALL.iter().map(|h| (*h, 0)).collect();
                let mut stmt = db
                    .conn()
                    .prepare_cached("SELECT health, count(*) FROM device_state GROUP BY health")
                    .map_err(|e| db.sql_error("count devices", e))?;
                let rows = stmt
                    .query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?)))
                    .map_err(|e| db.sql_error("count devices", e))?;
                for row in rows {
                    let (h, n) = row.map_err(|e| db.sql_error("count devices", e))?;
                    let h = Health::parse(&h);
                    if let Some(slot) = out.iter_mut().find(|(k, _)| *k == h) {
                        slot.1 += n as u64;
                    }
                }
                Ok(out)
            })
            .await?
    }
}

/// Side effects of a committed batch, acted on after the commit.
#[derive(Default)]
struct Effects {
    changed: Vec<(Kind, String)>,
    alerts: Vec<Alert>,
    signals: Vec<Signal>,
    telemetry_rows: usize,
    /// Added to the history's byte total once per batch.
    telemetry_bytes: i64,
}

impl Effects {
    /// One `Seen` per device per batch (the latest time, the latest
    /// battery reading): at 1,000 msg/s the monitor need not hear each
    /// message. An `Offline` keeps its place in the order.
    fn coalesce_signals(&mut self) {
        let mut out: Vec<Signal> = Vec::with_capacity(self.signals.len());
        let mut at: std::collections::HashMap<String, usize> = std::collections::HashMap::new();
        for s in self.signals.drain(..) {
            match s {
                Signal::Seen {
                    device,
                    at_ms,
                    interval_ms,
                    battery,
                } => match at.get(&device).and_then(|i| out.get_mut(*i)) {
                    Some(Signal::Seen {
                        at_ms: a,
                        interval_ms: iv,
                        battery: b,
                        ..
                    }) => {
                        *a = (*a).max(at_ms);
                        *iv = interval_ms;
                        *b = battery.or(*b);
                    }
                    _ => {
                        at.insert(device.clone(), out.len());
                        out.push(Signal::Seen {
                            device,
                            at_ms,
                            interval_ms,
                            battery,
                        });
                    }
                },
                Signal::Offline { device } => {
                    at.remove(&device);
                    out.push(Signal::Offline { device });
                }
            }
        }
        self.signals = out;
    }
}

/// A message after the checks that need no store.
enum Prepared {
    Register {
        device: Device,
        service: registry::Service,
        battery: Option<u8>,
        signal: Option<i16>,
    },
    Other(Inbound),
    Rejected {
        device: String,
        error: DeviceError,
    },
}

fn prepare(m: Inbound) -> Prepared {
    let Inbound::Register { device, reg } = m else {
        return Prepared::Other(m);
    };
    let (dev, input) = to_device(&device, &reg);
    match registry::validate_service(input, 0) {
        Ok((service, _)) => Prepared::Register {
            device: dev,
            service,
            battery: reg.battery,
            signal: reg.signal,
        },
        Err(e) => Prepared::Rejected {
            device: device.clone(),
            error: DeviceError::Invalid {
                id: device,
                message: e.to_string(),
            },
        },
    }
}

/// The device record and its service entry, from a registration.
fn to_device(id: &str, r: &Registration) -> (Device, ServiceInput) {
    let device = Device {
        id: id.to_owned(),
        device_type: r.device_type.clone(),
        name: r.name.clone().unwrap_or_default(),
        location: r.location.clone().unwrap_or_default(),
        metadata: r.metadata.clone(),
        firmware_version: r.firmware_version.clone().unwrap_or_default(),
        target_version: r.target_version.clone().unwrap_or_default(),
        update_status: r.update_status.clone().unwrap_or_default(),
        telemetry_interval_ms: r.telemetry_interval.unwrap_or(payload::DEFAULT_INTERVAL_MS),
        // A device without an address is reached through its topics.
        address: r.address.clone().unwrap_or_else(|| format!("devices/{id}")),
        port: r.port.unwrap_or(1883),
    };
    let input = ServiceInput {
        id: Some(id.to_owned()),
        name: r.device_type.clone(),
        address: device.address.clone(),
        port: device.port as i64,
        tags: vec!["iot".into(), "mqtt".into()],
        meta: r.metadata.clone(),
        ..Default::default()
    };
    (device, input)
}

fn apply_one(
    tx: &mut Tx<'_>,
    p: Prepared,
    settings: Settings,
    limits: registry::Limits,
    now: u64,
    fx: &mut Effects,
) -> Result<Outcome, StoreError> {
    let rejected = |device: &str, e: DeviceError| Outcome::Rejected {
        device: device.to_owned(),
        reason: e.reason(),
        message: e.to_string(),
    };
    match p {
        Prepared::Rejected { device, error } => Ok(rejected(&device, error)),
        Prepared::Register {
            device,
            service,
            battery,
            signal,
        } => match register(
            tx, device, service, battery, signal, settings, limits, now, fx,
        ) {
            Ok(o) => Ok(o),
            Err(DeviceError::Store(e)) => Err(e),
            Err(e) => {
                let id = match &e {
                    DeviceError::DeviceLimit { id, .. }
                    | DeviceError::ServiceLimit { id, .. }
                    | DeviceError::ServiceTaken { id }
                    | DeviceError::Unregistered { id }
                    | DeviceError::NotFound { id }
                    | DeviceError::Invalid { id, .. } => id.clone(),
                    DeviceError::Store(_) => String::new(),
                };
                Ok(rejected(&id, e))
            }
        },
        Prepared::Other(Inbound::Ignored) => Ok(Outcome::Ignored),
        Prepared::Other(Inbound::Register { .. }) => Ok(Outcome::Ignored),
        // The rollout engine's input; the bridge routes it there.
        Prepared::Other(Inbound::UpdateStatus { .. }) => Ok(Outcome::Ignored),
        Prepared::Other(Inbound::Status { device, online }) => {
            // A last will for a device we do not know is not an error: the
            // broker sends it for anything that had set one.
            let Some(interval) = interval_of(tx, &device)? else {
                return Ok(Outcome::Ignored);
            };
            if online {
                touch(tx, &device, now, None, None)?;
                fx.signals.push(Signal::Seen {
                    device,
                    at_ms: now,
                    interval_ms: interval,
                    battery: None,
                });
            } else {
                fx.signals.push(Signal::Offline { device });
            }
            Ok(Outcome::Stored)
        }
        Prepared::Other(Inbound::Heartbeat { device, heartbeat }) => {
            let Some(interval) = interval_of(tx, &device)? else {
                return Ok(rejected(
                    &device.clone(),
                    DeviceError::Unregistered { id: device },
                ));
            };
            touch(tx, &device, now, heartbeat.battery, heartbeat.signal)?;
            if let Some(v) = heartbeat.firmware_version {
                set_firmware_version(tx, &device, v, fx)?;
            }
            fx.signals.push(Signal::Seen {
                device,
                at_ms: now,
                interval_ms: interval,
                battery: heartbeat.battery,
            });
            Ok(Outcome::Stored)
        }
        Prepared::Other(Inbound::Telemetry { device, telemetry }) => {
            let body = telemetry.raw;
            // One statement finds the device and updates it: the hottest
            // path of the bridge (no row = not registered).
            let updated: Option<(i64, i64)> = tx
                .conn()
                .prepare_cached(
                    "UPDATE device_state SET telemetry_seq = telemetry_seq + 1, last_seen_ms = ?2,
                       last_telemetry = ?3, last_telemetry_ms = ?2,
                       battery = coalesce(?4, battery), signal = coalesce(?5, signal)
                     WHERE id = ?1 RETURNING telemetry_seq, interval_ms",
                )
                .and_then(|mut s| {
                    s.query_row(
                        params![
                            device,
                            now as i64,
                            body,
                            telemetry.battery,
                            telemetry.signal
                        ],
                        |r| Ok((r.get(0)?, r.get(1)?)),
                    )
                    .optional()
                })
                .map_err(|e| tx.sql_error("write device state", e))?;
            let Some((seq, interval)) = updated else {
                return Ok(rejected(
                    &device.clone(),
                    DeviceError::Unregistered { id: device },
                ));
            };
            let interval = interval as u64;
            tx.conn()
                .prepare_cached(
                    "INSERT INTO telemetry (device, seq, ts_ms, body) VALUES (?1, ?2, ?3, ?4)",
                )
                .and_then(|mut s| s.execute(params![device, seq, now as i64, body]))
                .map_err(|e| tx.sql_error("write telemetry", e))?;
            fx.telemetry_bytes += row_bytes(&device, &body) as i64;
            fx.telemetry_rows += 1;
            fx.signals.push(Signal::Seen {
                device,
                at_ms: now,
                interval_ms: interval,
                battery: telemetry.battery,
            });
            Ok(Outcome::Stored)
        }
        Prepared::Other(Inbound::Event { device, event }) => {
            let Some(interval) = interval_of(tx, &device)? else {
                return Ok(rejected(
                    &device.clone(),
                    DeviceError::Unregistered { id: device },
                ));
            };
            let body = Value::Object(event.body).to_string();
            tx.conn()
                .prepare_cached(
                    "INSERT INTO device_events (device, ts_ms, type, body) VALUES (?1, ?2, ?3, ?4)",
                )
                .and_then(|mut s| s.execute(params![device, now as i64, event.event_type, body]))
                .map_err(|e| tx.sql_error("write event", e))?;
            touch(tx, &device, now, None, None)?;
            if let Some(a) = event.alert {
                let name = format!("event:{}", a.name);
                let message = if a.message.is_empty() {
                    format!("device {device} raised {}", a.name)
                } else {
                    a.message
                };
                set_alert(tx, &device, &name, &a.severity, &message, a.active, now, fx)?;
            }
            fx.telemetry_rows += 1;
            fx.signals.push(Signal::Seen {
                device,
                at_ms: now,
                interval_ms: interval,
                battery: None,
            });
            Ok(Outcome::Stored)
        }
    }
}

#[allow(clippy::too_many_arguments)]
fn register(
    tx: &mut Tx<'_>,
    mut device: Device,
    service: registry::Service,
    battery: Option<u8>,
    signal: Option<i16>,
    settings: Settings,
    limits: registry::Limits,
    now: u64,
    fx: &mut Effects,
) -> Result<Outcome, DeviceError> {
    let id = device.id.clone();
    let prev = tx.get(Kind::Device, &id)?.filter(|r| !r.tombstone);
    if let Some(p) = &prev {
        // The OTA side owns these once set; a registration that does not
        // mention them keeps them.
        if let Ok(old) = serde_json::from_str::<Device>(&p.body) {
            if device.target_version.is_empty() {
                device.target_version = old.target_version;
            }
            if device.update_status.is_empty() {
                device.update_status = old.update_status;
            }
        }
    } else if tx.count_live(Kind::Device)? >= settings.max_devices {
        return Err(DeviceError::DeviceLimit {
            id,
            limit: settings.max_devices,
        });
    }
    let prev_svc = tx.get(Kind::Service, &id)?.filter(|r| !r.tombstone);
    match &prev_svc {
        Some(p) => {
            let s: registry::Service =
                serde_json::from_str(&p.body).map_err(|e| StoreError::BadRecord {
                    kind: "service".into(),
                    key: id.clone(),
                    detail: e.to_string(),
                })?;
            if !s.tags.iter().any(|t| t == "mqtt") {
                return Err(DeviceError::ServiceTaken { id });
            }
        }
        None => {
            if tx.count_live(Kind::Service)? >= limits.max_services {
                return Err(DeviceError::ServiceLimit {
                    id,
                    limit: limits.max_services,
                });
            }
        }
    }
    let body = to_json(&device)?;
    let mut modify_index = prev.as_ref().map_or(0, |p| p.modify_index);
    // The same registration again (a device rebooting, a QoS 1 redelivery
    // after a broker restart) is not a new version: nothing to sync.
    if prev.as_ref().is_none_or(|p| p.body != body) {
        let rec = registry::commit(tx, Kind::Device, &id, Some(&device.device_type), Some(body))?;
        modify_index = rec.modify_index;
        fx.changed.push((Kind::Device, id.clone()));
    }
    let svc_body = to_json(&service)?;
    if prev_svc.as_ref().is_none_or(|p| p.body != svc_body) {
        tx.set_service_ttl(&id, None, now)?;
        registry::commit(tx, Kind::Service, &id, Some(&service.name), Some(svc_body))?;
        fx.changed.push((Kind::Service, id.clone()));
    }
    tx.conn()
        .prepare_cached(
            "INSERT INTO device_state (id, last_seen_ms, interval_ms, battery, signal)
             VALUES (?1, ?2, ?3, ?4, ?5)
             ON CONFLICT (id) DO UPDATE SET last_seen_ms = excluded.last_seen_ms,
               interval_ms = excluded.interval_ms,
               battery = coalesce(excluded.battery, battery),
               signal = coalesce(excluded.signal, signal)",
        )
        .and_then(|mut s| {
            s.execute(params![
                id,
                now as i64,
                device.telemetry_interval_ms as i64,
                battery,
                signal
            ])
        })
        .map_err(|e| tx.sql_error("write device state", e))?;
    fx.signals.push(Signal::Seen {
        device: id.clone(),
        at_ms: now,
        interval_ms: device.telemetry_interval_ms,
        battery,
    });
    Ok(Outcome::Registered {
        device: id,
        modify_index,
        created: prev.is_none(),
    })
}

use crate::registry::to_body as to_json;

/// A heartbeat reporting another firmware version: a replicated write of
/// the device record, only when the version changed (heartbeats are
/// otherwise local state).
fn set_firmware_version(
    tx: &mut Tx<'_>,
    id: &str,
    version: String,
    fx: &mut Effects,
) -> Result<(), StoreError> {
    let Some(rec) = tx.get(Kind::Device, id)?.filter(|r| !r.tombstone) else {
        return Ok(());
    };
    let mut device: Device =
        serde_json::from_str(&rec.body).map_err(|e| StoreError::BadRecord {
            kind: "device".into(),
            key: id.into(),
            detail: e.to_string(),
        })?;
    if device.firmware_version == version {
        return Ok(());
    }
    device.firmware_version = version;
    let body = to_json(&device)?;
    registry::commit(tx, Kind::Device, id, Some(&device.device_type), Some(body))?;
    fx.changed.push((Kind::Device, id.to_owned()));
    Ok(())
}

fn interval_of(tx: &Tx<'_>, device: &str) -> Result<Option<u64>, StoreError> {
    tx.conn()
        .prepare_cached("SELECT interval_ms FROM device_state WHERE id = ?1")
        .and_then(|mut s| s.query_row([device], |r| r.get::<_, i64>(0)).optional())
        .map(|v| v.map(|v| v as u64))
        .map_err(|e| tx.sql_error("read device state", e))
}

fn touch(
    tx: &Tx<'_>,
    device: &str,
    now: u64,
    battery: Option<u8>,
    signal: Option<i16>,
) -> Result<(), StoreError> {
    tx.conn()
        .prepare_cached(
            "UPDATE device_state SET last_seen_ms = max(last_seen_ms, ?2),
               battery = coalesce(?3, battery), signal = coalesce(?4, signal) WHERE id = ?1",
        )
        .and_then(|mut s| s.execute(params![device, now as i64, battery, signal]))
        .map_err(|e| tx.sql_error("write device state", e))?;
    Ok(())
}

/// Raises (`active`) or clears an alert; a clear of an alert that is not
/// active, or a raise of one that is, writes nothing.
#[allow(clippy::too_many_arguments)]
fn set_alert(
    tx: &mut Tx<'_>,
    device: &str,
    name: &str,
    severity: &str,
    message: &str,
    active: bool,
    now: u64,
    fx: &mut Effects,
) -> Result<(), StoreError> {
    let key = format!("{device}/{name}");
    let prev: Option<Alert> = tx
        .get(Kind::Alert, &key)?
        .filter(|r| !r.tombstone)
        .and_then(|r| serde_json::from_str(&r.body).ok());
    let was_active = prev.as_ref().is_some_and(|a| a.active);
    if was_active == active {
        return Ok(());
    }
    let alert = Alert {
        device_id: device.to_owned(),
        name: name.to_owned(),
        severity: severity.to_owned(),
        message: message.to_owned(),
        active,
        raised_at_ms: match (&prev, active) {
            (Some(p), false) => p.raised_at_ms,
            _ => now,
        },
        cleared_at_ms: (!active).then_some(now),
    };
    registry::commit(tx, Kind::Alert, &key, Some(device), Some(to_json(&alert)?))?;
    if active {
        log::warn!("alert raised: {key}: {message}");
    } else {
        log::info!("alert cleared: {key}: {message}");
    }
    fx.changed.push((Kind::Alert, key));
    fx.alerts.push(alert);
    Ok(())
}

fn row_bytes(device: &str, body: &str) -> u64 {
    (device.len() + body.len()) as u64 + ROW_OVERHEAD
}

fn add_bytes(tx: &Tx<'_>, delta: i64) -> Result<(), StoreError> {
    tx.conn()
        .prepare_cached(
            "UPDATE meta SET value = max(0, CAST(value AS INTEGER) + ?1) WHERE key = 'telemetry_bytes'",
        )
        .and_then(|mut s| s.execute([delta]))
        .map_err(|e| tx.sql_error("account telemetry size", e))?;
    Ok(())
}

/// Drops telemetry and events past the retention, then the oldest
/// telemetry while the history exceeds `max_history_bytes` (down to 90%).
fn prune(tx: &Tx<'_>, s: Settings, now: u64) -> Result<(), StoreError> {
    let c = tx.conn();
    let err = |e| tx.sql_error("prune telemetry", e);
    let cutoff = now.saturating_sub(s.retention_ms) as i64;
    let freed: i64 = c
        .prepare_cached(
            "DELETE FROM telemetry WHERE ts_ms < ?1 RETURNING length(device) + length(body) + ?2",
        )
        .and_then(|mut st| {
            st.query_map(params![cutoff, ROW_OVERHEAD as i64], |r| r.get::<_, i64>(0))?
                .sum::<Result<i64, _>>()
        })
        .map_err(err)?;
    c.prepare_cached("DELETE FROM device_events WHERE ts_ms < ?1")
        .and_then(|mut st| st.execute([cutoff]))
        .map_err(err)?;
    c.prepare_cached(
        "DELETE FROM device_events WHERE id <= (SELECT max(id) FROM device_events) - ?1",
    )
    .and_then(|mut st| st.execute([MAX_EVENTS]))
    .map_err(err)?;
    if freed > 0 {
        add_bytes(tx, -freed)?;
    }
    let total: i64 = c
        .query_row(
            "SELECT CAST(value AS INTEGER) FROM meta WHERE key = 'telemetry_bytes'",
            [],
            |r| r.get(0),
        )
        .map_err(err)?;
    if total as u64 <= s.max_history_bytes {
        return Ok(());
    }
    let target = (s.max_history_bytes / 10 * 9) as i64;
    let mut freed = 0i64;
    let mut cut = None;
    {
        let mut st = c
            .prepare_cached(
                "SELECT id, length(device) + length(body) + ?1 FROM telemetry ORDER BY id",
            )
            .map_err(err)?;
        let mut rows = st.query([ROW_OVERHEAD as i64]).map_err(err)?;
        while let Some(r) = rows.next().map_err(err)? {
            let (id, n): (i64, i64) = (r.get(0).map_err(err)?, r.get(1).map_err(err)?);
            freed += n;
            cut = Some(id);
            if total - freed <= target {
                break;
            }
        }
    }
    if let Some(cut) = cut {
        c.prepare_cached("DELETE FROM telemetry WHERE id <= ?1")
            .and_then(|mut st| st.execute([cut]))
            .map_err(err)?;
        add_bytes(tx, -freed)?;
        log::debug!("telemetry history over devices.telemetry_max_size: pruned {freed} bytes");
    }
    Ok(())
}

fn view(db: &Db, rec: &crate::store::Record) -> Result<Option<DeviceView>, StoreError> {
    let device: Device = serde_json::from_str(&rec.body).map_err(|e| StoreError::BadRecord {
        kind: "device".into(),
        key: rec.key.clone(),
        detail: e.to_string(),
    })?;
    type Row = (
        i64,
        String,
        Option<u8>,
        Option<i16>,
        Option<String>,
        Option<i64>,
        i64,
    );
    let state: Option<Row> = db
        .conn()
        .prepare_cached(
            "SELECT last_seen_ms, health, battery, signal, last_telemetry, last_telemetry_ms,
                    telemetry_seq FROM device_state WHERE id = ?1",
        )
        .and_then(|mut s| {
            s.query_row([&rec.key], |r| {
                Ok((
                    r.get(0)?,
                    r.get(1)?,
                    r.get(2)?,
                    r.get(3)?,
                    r.get(4)?,
                    r.get(5)?,
                    r.get(6)?,
                ))
            })
            .optional()
        })
        .map_err(|e| db.sql_error("read device state", e))?;
    // A device synced from elsewhere has no local state until it talks to
    // this edge: it is shown as offline, never seen here.
    let (seen, health, battery, signal, last, last_ms, seq) =
        state.unwrap_or((0, "offline".into(), None, None, None, None, 0));
    Ok(Some(DeviceView {
        telemetry_interval: crate::config::Duration(std::time::Duration::from_millis(
            device.telemetry_interval_ms,
        ))
        .to_string(),
        device,
        health: Health::parse(&health),
        last_seen: if seen > 0 {
            rfc3339(seen as u64)
        } else {
            String::new()
        },
        last_seen_ms: seen as u64,
        battery,
        signal,
        last_telemetry: last.and_then(|b| serde_json::from_str(&b).ok()),
        last_telemetry_at: last_ms.map(|m| rfc3339(m as u64)),
        telemetry_seq: seq as u64,
        create_index: rec.create_index,
        modify_index: rec.modify_index,
    }))
}

/// The JSON published on `devices/{id}/ack`.
pub fn ack_json(device: &str, modify_index: u64, created: bool) -> Vec<u8> {
    json!({
        "status": "registered",
        "id": device,
        "created": created,
        "modify_index": modify_index,
    })
    .to_string()
    .into_bytes()
}

#[cfg(test)]
mod tests;
