//! The payload schemas: what a device may send on each topic. Unknown
//! fields are refused (`deny_unknown_fields`) so a typo on the device side
//! is an error, not silently ignored data.

use std::collections::BTreeMap;

use serde::de::Error as _;
use serde::{Deserialize, Deserializer};
use serde_json::{Map, Value};

/// What a device's registration says (the seed's Device model, minus what
/// the edge observes itself: last seen, battery, signal, last telemetry).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Registration {
    #[serde(default)]
    pub id: Option<String>,
    #[serde(rename = "type")]
    pub device_type: String,
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default)]
    pub location: Option<String>,
    #[serde(default)]
    pub metadata: BTreeMap<String, String>,
    #[serde(default)]
    pub firmware_version: Option<String>,
    #[serde(default)]
    pub target_version: Option<String>,
    #[serde(default)]
    pub update_status: Option<String>,
    /// `30s`, `5m`, or a number of seconds.
    #[serde(default, deserialize_with = "de_interval")]
    pub telemetry_interval: Option<u64>,
    /// How to reach the device, for the service entry (`ip` as in the seed).
    #[serde(default, alias = "ip")]
    pub address: Option<String>,
    #[serde(default)]
    pub port: Option<u16>,
    #[serde(default)]
    pub battery: Option<u8>,
    #[serde(default)]
    pub signal: Option<i16>,
}

#[derive(Debug, Clone, PartialEq, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct Heartbeat {
    #[serde(default)]
    pub id: Option<String>,
    #[serde(default)]
    pub battery: Option<u8>,
    #[serde(default)]
    pub signal: Option<i16>,
    /// The device's own clock (ms since the epoch); informational.
    #[serde(default)]
    pub ts: Option<u64>,
    /// The firmware it runs: a changed version updates the device record
    /// (and completes a firmware rollout to that version).
    #[serde(default)]
    pub firmware_version: Option<String>,
}

/// Telemetry: a JSON object of readings. `id`, `battery` and `signal` are
/// read if present (and must have the right types); everything is kept.
#[derive(Debug, Clone, PartialEq)]
pub struct Telemetry {
    pub values: Map<String, Value>,
    /// The payload as received (a JSON object, checked above): stored as
    /// is, so ingest does not serialize it again.
    pub raw: String,
    pub battery: Option<u8>,
    pub signal: Option<i16>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Event {
    pub event_type: String,
    pub body: Map<String, Value>,
    /// Set for `"type": "alert"` events.
    pub alert: Option<EventAlert>,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct EventAlert {
    #[serde(default = "default_alert_name")]
    pub name: String,
    #[serde(default = "default_severity")]
    pub severity: String,
    #[serde(default)]
    pub message: String,
    /// `false` clears an alert the device raised earlier.
    #[serde(default = "yes")]
    pub active: bool,
}

fn default_alert_name() -> String {
    "alert".into()
}
fn default_severity() -> String {
    "warning".into()
}
fn yes() -> bool {
    true
}

pub const SEVERITIES: [&str; 3] = ["info", "warning", "critical"];

/// A device's firmware update progress.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpdateReport {
    #[serde(default)]
    pub id: Option<String>,
    /// pending, downloading, installing, complete or failed.
    pub status: String,
    /// Percent, 0-100.
    #[serde(default)]
    pub progress: Option<u8>,
    #[serde(default)]
    pub error: Option<String>,
    /// The rollout the offer named (optional).
    #[serde(default)]
    pub rollout: Option<String>,
    /// The version being installed (informational).
    #[serde(default)]
    pub version: Option<String>,
}

/// `"30s"`, `"5m"`, `30` (seconds): milliseconds.
fn de_interval<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
    match Option::<Value>::deserialize(d)? {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Number(n)) => n
            .as_u64()
            .and_then(|s| s.checked_mul(1000))
            .map(Some)
            .ok_or_else(|| {
                D::Error::custom(format!(
                    "telemetry_interval: `{n}` is not a whole number of seconds"
                ))
            }),
        Some(Value::String(s)) => s
            .parse::<crate::config::Duration>()
            .map(|d| Some(d.0.as_millis().min(u64::MAX as u128) as u64))
            .map_err(|e| D::Error::custom(format!("telemetry_interval: {e}"))),
        Some(other) => Err(D::Error::custom(format!(
            "telemetry_interval: expected a duration like \"30s\" or seconds, got {other}"
        ))),
    }
}
