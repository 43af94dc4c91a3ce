//! The health monitor's side in the store: loading its state at start,
//! persisting its transitions (health columns, `offline` and
//! `low_battery` alerts) in one transaction, and raising or clearing an
//! alert (also used by ingest for device-raised ones). The rules
//! themselves are pure and live in [`super::health`].

use rusqlite::params;

use super::health::{self, Health, Transition};
use super::retention::prune;
use super::{Alert, Devices, Effects, Feed};
use crate::clock::wall_millis;
use crate::registry::{self, to_body as to_json};
use crate::store::{Kind, StoreError, Tx};

impl Devices {
    /// Loads the monitor's state: every device's last seen, interval,
    /// health and low-battery alert. Devices last seen before `since_ms`
    /// (the daemon's start) count from `since_ms`: a device is not declared
    /// offline for the time the edge itself was down.
    pub(crate) async fn machine(&self, since_ms: u64) -> Result<health::Machine, StoreError> {
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
    pub(crate) async fn record(&self, transitions: Vec<Transition>) -> Result<(), StoreError> {
        let settings = self.settings;
        let feeding = self.feeding();
        let fx = self
            .registry
            .store()
            .call(move |db| {
                db.tx(|tx| {
                    let now = wall_millis();
                    let mut fx = Effects {
                        feeding,
                        ..Effects::default()
                    };
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
                                if to == Health::Offline && feeding {
                                    fx.feed.push(Feed::Offline {
                                        device: device.clone(),
                                    });
                                }
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
}

/// Raises (`active`) or clears an alert; a clear of an alert that is not
/// active, or a raise of one that is, writes nothing.
#[allow(clippy::too_many_arguments)]
pub(super) fn set_alert(
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
