//! The device registry: registrations, telemetry, heartbeats, events,
//! health and alerts. Transport-free: the MQTT bridge parses messages
//! ([`crate::devices::payload`]) and hands them here in batches; HTTP (and
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
//!
//! The feed: with the Sparkplug edge node on, every committed registration,
//! telemetry point and offline transition is also handed to it
//! ([`Devices::feed`]) after the commit, with the values already parsed, so
//! it need not read the store per message. The channel is bounded and never
//! waited on (ingest must not slow down for a slow broker): when it is full,
//! the event is dropped and `lost` is set, and the node rebuilds its view
//! from the store (a rebirth).
//!
//! The parts, one job each: `ingest` (a batch of MQTT messages in one
//! transaction), `monitor` (the health monitor's state in the store, and
//! alerts), `retention` (pruning by age and size), `query` (what HTTP and
//! D-Bus read, and the figures for `/metrics`), [`health`] (the pure rules
//! and the monitor task); this file holds the types they share and the
//! handle.

pub mod health;
pub mod payload;
// The MQTT bridge is ingest's only caller.
#[cfg_attr(not(feature = "mqtt"), allow(dead_code))]
mod ingest;
mod monitor;
mod query;
pub(crate) mod redelivery;
mod retention;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::devices::payload::Reason;
use crate::registry::{ChangeOp, Registry};
use crate::store::{Kind, StoreError};
use health::{Rules, Signal};

pub use query::{DeviceView, TelemetryPoint};
pub(crate) use query::{DEFAULT_HISTORY_LIMIT, MAX_HISTORY_LIMIT};

#[derive(Debug, thiserror::Error)]
pub(crate) enum DeviceError {
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
    pub(crate) fn reason(&self) -> Reason {
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
pub(crate) struct Device {
    pub(crate) id: String,
    #[serde(rename = "type")]
    pub(crate) device_type: String,
    #[serde(default)]
    pub(crate) name: String,
    #[serde(default)]
    pub(crate) location: String,
    #[serde(default)]
    pub(crate) metadata: BTreeMap<String, String>,
    #[serde(default)]
    pub(crate) firmware_version: String,
    #[serde(default)]
    pub(crate) target_version: String,
    #[serde(default)]
    pub(crate) update_status: String,
    pub(crate) telemetry_interval_ms: u64,
    #[serde(default)]
    pub(crate) address: String,
    #[serde(default)]
    pub(crate) port: u16,
}

/// An alert (the record body of `Kind::Alert`), as stored, published on
/// `alerts/{device_id}` and listed by the API.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Alert {
    pub(crate) device_id: String,
    /// `offline`, `low_battery`, or `event:{name}` for device-raised ones.
    pub(crate) name: String,
    pub(crate) severity: String,
    pub(crate) message: String,
    pub(crate) active: bool,
    pub(crate) raised_at_ms: u64,
    #[serde(default)]
    pub(crate) cleared_at_ms: Option<u64>,
}

/// What became of one message.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Outcome {
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
pub(crate) struct Settings {
    pub(crate) rules: Rules,
    pub(crate) max_devices: u64,
    pub(crate) retention_ms: u64,
    pub(crate) max_history_bytes: u64,
}

impl Settings {
    pub(crate) fn from_config(c: &crate::config::Devices) -> Settings {
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

/// A committed change, for the Sparkplug edge node.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Feed {
    Registered(Device),
    Telemetry {
        device: String,
        /// The device's telemetry sequence number in the store.
        seq: u64,
        ts_ms: u64,
        values: serde_json::Map<String, serde_json::Value>,
    },
    Offline {
        device: String,
    },
}

/// The receiving end of the feed.
#[cfg_attr(not(feature = "sparkplug"), allow(dead_code))]
pub(crate) struct FeedRx {
    pub(crate) rx: async_channel::Receiver<Feed>,
    /// Set when an event was dropped on a full channel: the receiver must
    /// rebuild its view from the store.
    pub(crate) lost: Arc<AtomicBool>,
}

/// Events the feed holds before it drops (a few seconds of a 1,000-device
/// site at full rate).
const FEED_QUEUE: usize = 4096;

/// The device registry handle. Cheap to clone.
#[derive(Clone)]
pub struct Devices {
    registry: Registry,
    settings: Settings,
    signals: async_channel::Sender<Vec<Signal>>,
    alerts: async_channel::Sender<Alert>,
    feed: Option<(async_channel::Sender<Feed>, Arc<AtomicBool>)>,
}

/// The receiving ends the daemon wires: the monitor's input and the alerts
/// to publish.
pub(crate) struct Channels {
    pub(crate) signals: async_channel::Receiver<Vec<Signal>>,
    /// Drained by the MQTT bridge.
    #[cfg_attr(not(feature = "mqtt"), allow(dead_code))]
    pub(crate) alerts: async_channel::Receiver<Alert>,
}

impl Devices {
    pub(crate) fn new(registry: Registry, settings: Settings) -> (Devices, Channels) {
        let (signals, signals_rx) = async_channel::bounded(64);
        let (alerts, alerts_rx) = async_channel::bounded(1024);
        (
            Devices {
                registry,
                settings,
                signals,
                alerts,
                feed: None,
            },
            Channels {
                signals: signals_rx,
                alerts: alerts_rx,
            },
        )
    }

    pub(crate) fn settings(&self) -> Settings {
        self.settings
    }

    /// Turns the feed on; call before the handle is cloned (clones made
    /// earlier do not feed).
    #[cfg_attr(not(feature = "sparkplug"), allow(dead_code))]
    pub(crate) fn feed(&mut self) -> FeedRx {
        let (tx, rx) = async_channel::bounded(FEED_QUEUE);
        let lost = Arc::new(AtomicBool::new(false));
        self.feed = Some((tx, lost.clone()));
        FeedRx { rx, lost }
    }

    fn feeding(&self) -> bool {
        self.feed.is_some()
    }

    async fn announce(&self, mut fx: Effects) {
        fx.coalesce_signals();
        for (kind, key) in fx.changed {
            self.registry.notify(kind, &key, ChangeOp::Upsert);
        }
        if let Some((tx, lost)) = &self.feed {
            for f in fx.feed {
                if tx.try_send(f).is_err() {
                    lost.store(true, Ordering::Relaxed);
                }
            }
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
    /// Collect `feed` (the feed is on).
    feeding: bool,
    feed: Vec<Feed>,
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

/// The JSON published on `devices/{id}/ack`.
#[cfg_attr(not(feature = "mqtt"), allow(dead_code))]
pub(crate) fn ack_json(device: &str, modify_index: u64, created: bool) -> Vec<u8> {
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
