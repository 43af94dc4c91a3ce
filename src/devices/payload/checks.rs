//! The limits applied to a parsed payload (text lengths, control
//! characters, ranges, the id in the payload against the topic's), each
//! failure an [`PayloadError`] naming the topic and the field.

use serde::Deserialize;
use serde_json::{Map, Value};

use super::schema::Registration;
use super::{PayloadError, MAX_INTERVAL_MS, MAX_TEXT_LEN, MIN_INTERVAL_MS, UPDATE_STATUSES};

pub(super) struct Ctx<'a> {
    pub(super) topic: &'a str,
    pub(super) device: String,
}

impl Ctx<'_> {
    pub(super) fn json<T: for<'de> Deserialize<'de>>(
        &self,
        payload: &[u8],
    ) -> Result<T, PayloadError> {
        serde_json::from_slice(payload).map_err(|e| match e.classify() {
            serde_json::error::Category::Data => self.wrong_type(e.to_string()),
            _ => PayloadError::MalformedJson {
                topic: self.topic.into(),
                device: self.device.clone(),
                detail: e.to_string(),
            },
        })
    }

    pub(super) fn field<T: for<'de> Deserialize<'de>>(
        &self,
        m: &Map<String, Value>,
        key: &str,
    ) -> Result<T, PayloadError> {
        let v = m.get(key).cloned().unwrap_or(Value::Null);
        serde_json::from_value(v).map_err(|e| self.wrong_type(format!("{key}: {e}")))
    }

    pub(super) fn wrong_type(&self, detail: String) -> PayloadError {
        PayloadError::WrongType {
            topic: self.topic.into(),
            device: self.device.clone(),
            detail,
        }
    }

    pub(super) fn invalid(&self, field: &'static str, message: String) -> PayloadError {
        PayloadError::Invalid {
            topic: self.topic.into(),
            device: self.device.clone(),
            field,
            message,
        }
    }

    pub(super) fn check_id(&self, id: Option<&str>) -> Result<(), PayloadError> {
        match id {
            Some(id) if id != self.device => Err(PayloadError::IdMismatch {
                topic: self.topic.into(),
                device: self.device.clone(),
                payload_id: id.into(),
            }),
            _ => Ok(()),
        }
    }

    pub(super) fn check_text(
        &self,
        field: &'static str,
        s: &str,
        max: usize,
        allow_empty: bool,
    ) -> Result<(), PayloadError> {
        if s.is_empty() && !allow_empty {
            return Err(self.invalid(field, "must not be empty".into()));
        }
        if s.len() > max {
            return Err(self.invalid(field, format!("{} bytes (max {max})", s.len())));
        }
        if s.chars().any(char::is_control) {
            return Err(self.invalid(field, "contains a control character".into()));
        }
        Ok(())
    }

    pub(super) fn check_health_values(
        &self,
        battery: Option<u8>,
        signal: Option<i16>,
    ) -> Result<(), PayloadError> {
        if battery.is_some_and(|b| b > 100) {
            return Err(self.invalid("battery", "a percentage, 0-100".into()));
        }
        if signal.is_some_and(|s| !(-200..=200).contains(&s)) {
            return Err(self.invalid("signal", "dBm or percent, -200..200".into()));
        }
        Ok(())
    }

    pub(super) fn check_registration(&self, r: &Registration) -> Result<(), PayloadError> {
        // The type becomes the service name: Konsul's name rules apply.
        self.check_text("type", &r.device_type, MAX_TEXT_LEN, false)?;
        if r.device_type
            .chars()
            .any(|c| c.is_whitespace() || "/?#".contains(c))
        {
            return Err(self.invalid("type", "contains whitespace, / ? or #".into()));
        }
        for (field, v) in [
            ("name", &r.name),
            ("location", &r.location),
            ("firmware_version", &r.firmware_version),
            ("target_version", &r.target_version),
            ("address", &r.address),
        ] {
            if let Some(v) = v {
                self.check_text(field, v, MAX_TEXT_LEN, field != "address")?;
            }
        }
        if let Some(s) = &r.update_status {
            if !UPDATE_STATUSES.contains(&s.as_str()) {
                return Err(self.invalid(
                    "update_status",
                    format!(
                        "`{}`: use one of {}",
                        s.escape_debug(),
                        UPDATE_STATUSES.join(", ")
                    ),
                ));
            }
        }
        if let Some(ms) = r.telemetry_interval {
            if !(MIN_INTERVAL_MS..=MAX_INTERVAL_MS).contains(&ms) {
                return Err(self.invalid("telemetry_interval", "must be between 1s and 7d".into()));
            }
        }
        if r.port == Some(0) {
            return Err(self.invalid("port", "must be 1-65535".into()));
        }
        self.check_health_values(r.battery, r.signal)
    }
}
