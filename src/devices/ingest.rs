//! Ingest: a batch of parsed MQTT messages (registrations, telemetry,
//! heartbeats, events, device status) applied in one store transaction,
//! one outcome per message. The hot path of the bridge, kept apart from
//! the queries and the monitor so its statements and checks are in one
//! place.

use rusqlite::{params, OptionalExtension};
use serde_json::Value;

use super::health::Signal;
use super::monitor::set_alert;
use super::redelivery::{self, Seen};
use super::retention::{add_bytes, prune, row_bytes};
use super::{Device, DeviceError, Devices, Effects, Feed, Outcome, Settings};
use crate::clock::wall_millis;
use crate::devices::payload::{self, Inbound, Registration};
use crate::registry::{self, to_body as to_json, ServiceInput};
use crate::store::{Kind, StoreError, Tx};

impl Devices {
    /// Applies a batch of parsed messages; one outcome per message, in
    /// order. A store error fails the whole batch (nothing of it is
    /// committed); the caller may retry the messages singly.
    #[cfg(test)]
    pub(crate) async fn apply(&self, batch: Vec<Inbound>) -> Result<Vec<Outcome>, StoreError> {
        self.apply_seen(batch.into_iter().map(|m| (m, None)).collect())
            .await
    }

    /// As [`apply`](Self::apply), for messages that may be redelivered
    /// ([`super::redelivery`]): a DUP message already stored by one of the
    /// last batches is not stored again (its outcome is `Stored`).
    pub(crate) async fn apply_seen(
        &self,
        batch: Vec<(Inbound, Option<Seen>)>,
    ) -> Result<Vec<Outcome>, StoreError> {
        let settings = self.settings;
        let feeding = self.feeding();
        let limits = self.registry.limits();
        // Validation that needs no store runs here, off the store thread.
        let prepared: Vec<(Prepared, Option<Seen>)> =
            batch.into_iter().map(|(m, s)| (prepare(m), s)).collect();
        let (outcomes, effects) = self
            .registry
            .store()
            .call(move |db| {
                db.tx(|tx| {
                    let now = wall_millis();
                    let mut fx = Effects {
                        feeding,
                        ..Effects::default()
                    };
                    let mut outcomes = Vec::with_capacity(prepared.len());
                    let recent = if prepared.iter().any(|(_, s)| s.is_some_and(|s| s.dup)) {
                        redelivery::recent(tx)?
                    } else {
                        Default::default()
                    };
                    let mut digests = Vec::new();
                    for (p, seen) in prepared {
                        if let Some(s) = seen {
                            if s.dup && recent.contains(&s.digest) {
                                outcomes.push(Outcome::Stored);
                                continue;
                            }
                            digests.extend_from_slice(&s.digest);
                        }
                        let o = apply_one(tx, p, settings, limits, now, &mut fx)?;
                        outcomes.push(o);
                    }
                    if !digests.is_empty() {
                        redelivery::record(tx, &digests)?;
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
            if fx.feeding {
                fx.feed.push(Feed::Telemetry {
                    device: device.clone(),
                    seq: seq as u64,
                    ts_ms: now,
                    values: telemetry.values,
                });
            }
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
    if fx.feeding {
        fx.feed.push(Feed::Registered(device));
    }
    Ok(Outcome::Registered {
        device: id,
        modify_index,
        created: prev.is_none(),
    })
}

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
