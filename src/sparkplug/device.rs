//! One device as the host knows it: its properties (from the
//! registration), the latest value of each metric, the aliases its last
//! DBIRTH gave, and how far the host has its telemetry (the store's
//! per-device sequence number).

use std::collections::BTreeMap;

use serde_json::Map;

use super::payload::{self, Metric, Value};
use super::Settings;
use crate::devices::Device;

/// Metrics one device may have: bounds a DBIRTH (the telemetry payload is
/// bounded too, by `mqtt.max_payload_size`).
const MAX_METRICS: usize = 256;
const PROPERTIES: &str = "Properties/";

#[derive(Debug, Default)]
pub(super) struct DeviceState {
    props: Vec<(String, Value)>,
    values: BTreeMap<String, Value>,
    /// name -> alias, from the last DBIRTH.
    aliases: BTreeMap<String, u64>,
    pub(super) born: bool,
    /// The last telemetry sequence number the host has.
    pub(super) sent: u64,
}

/// What new telemetry means for the host.
pub(super) enum Update {
    /// Nothing changed (report by exception).
    None,
    /// These metrics changed and the birth knows them all.
    Data(Vec<String>),
    /// A new metric or a changed type: the device must be born again.
    Birth,
}

/// A device id is one topic level of `spBv1.0/.../{device}`; the MQTT
/// topics' ids (`A-Z a-z 0-9 - _ . :`) all are, this guards the rest.
pub(super) fn device_id_ok(id: &str) -> bool {
    !id.is_empty() && !id.chars().any(|c| "/+#".contains(c) || c.is_control())
}

impl DeviceState {
    /// Takes the registration's properties; true if they changed.
    pub(super) fn set_props(&mut self, d: &Device) -> bool {
        let mut props = vec![
            (
                format!("{PROPERTIES}Type"),
                Value::Text(d.device_type.clone()),
            ),
            (format!("{PROPERTIES}Name"), Value::Text(d.name.clone())),
            (
                format!("{PROPERTIES}Location"),
                Value::Text(d.location.clone()),
            ),
            (
                format!("{PROPERTIES}Firmware Version"),
                Value::Text(d.firmware_version.clone()),
            ),
        ];
        for (k, v) in &d.metadata {
            let name = format!("{PROPERTIES}Metadata/{k}");
            if payload::name_ok(&name) {
                props.push((name, Value::Text(v.clone())));
            }
        }
        let changed = props != self.props;
        self.props = props;
        changed
    }

    /// Replaces the values (a birth from the store's latest telemetry).
    pub(super) fn reset_values(&mut self, latest: Option<&serde_json::Value>, s: &Settings) {
        self.values.clear();
        if let Some(serde_json::Value::Object(m)) = latest {
            self.take(m, s);
        }
    }

    /// Merges a telemetry point in.
    pub(super) fn take(&mut self, values: &Map<String, serde_json::Value>, s: &Settings) -> Update {
        let mut changed = Vec::new();
        let mut birth = false;
        for (k, v) in values {
            if k.starts_with(PROPERTIES) || !payload::name_ok(k) || !s.wants_field(k) {
                continue;
            }
            let Some(v) = Value::from_json(v) else {
                continue;
            };
            match self.values.get(k) {
                Some(old) if *old == v => continue,
                Some(old) if !old.same_type(&v) => birth = true,
                Some(_) => {}
                None if self.values.len() >= MAX_METRICS => continue,
                None => {}
            }
            if !self.aliases.contains_key(k) {
                birth = true;
            }
            self.values.insert(k.clone(), v);
            changed.push(k.clone());
        }
        match (birth, changed.is_empty()) {
            (true, _) => Update::Birth,
            (false, true) => Update::None,
            (false, false) => Update::Data(changed),
        }
    }

    /// The DBIRTH's metrics: every property and value, each with a new
    /// alias and its datatype.
    pub(super) fn birth(&mut self) -> Vec<Metric<'_>> {
        self.aliases.clear();
        let mut out = Vec::with_capacity(self.props.len() + self.values.len());
        for (alias, (name, value)) in self
            .props
            .iter()
            .map(|(n, v)| (n, v))
            .chain(self.values.iter())
            .enumerate()
        {
            let alias = alias as u64;
            self.aliases.insert(name.clone(), alias);
            out.push(Metric {
                name: Some(name),
                alias: Some(alias),
                value,
                with_type: true,
                historical: false,
                timestamp: None,
            });
        }
        out
    }

    /// Data metrics by alias for `names` (those the birth knows).
    pub(super) fn data<'a>(
        &'a self,
        names: impl IntoIterator<Item = &'a String>,
        historical: bool,
        timestamp: u64,
    ) -> Vec<Metric<'a>> {
        names
            .into_iter()
            .filter_map(|n| {
                Some(Metric {
                    name: None,
                    alias: Some(*self.aliases.get(n)?),
                    value: self.values.get(n)?,
                    with_type: false,
                    historical,
                    timestamp: Some(timestamp),
                })
            })
            .collect()
    }

    /// A historical point: its own values (not the latest), by alias, for
    /// the metrics the birth knows with the type it gave them.
    pub(super) fn historical(&self, values: &serde_json::Value, s: &Settings) -> Vec<(u64, Value)> {
        let serde_json::Value::Object(m) = values else {
            return Vec::new();
        };
        m.iter()
            .filter(|(k, _)| s.wants_field(k))
            .filter_map(|(k, v)| {
                let alias = *self.aliases.get(k)?;
                let v = Value::from_json(v)?;
                self.values
                    .get(k)
                    .is_some_and(|born| born.same_type(&v))
                    .then_some((alias, v))
            })
            .collect()
    }

    /// A command metric's name, from its name or its alias.
    pub(super) fn name_of(&self, name: Option<&str>, alias: Option<u64>) -> Option<String> {
        match (name, alias) {
            (Some(n), _) => Some(n.to_owned()),
            (None, Some(a)) => self
                .aliases
                .iter()
                .find(|(_, v)| **v == a)
                .map(|(k, _)| k.clone()),
            (None, None) => None,
        }
    }
}
