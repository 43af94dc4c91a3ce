//! Cross-field rules that a single key's type cannot express, checked on
//! the merged configuration.

use super::{Config, ConfigError, OtaBackend};

/// A node id is a topic level (`edges/{id}/status`) and a URL path segment
/// (`/v1/edge/edges/{id}`), so it must survive both unchanged: `.` and `..`
/// are dot segments a client or proxy resolves away.
pub(super) fn node_id_ok(id: &str) -> bool {
    (1..=128).contains(&id.len())
        && id != "."
        && id != ".."
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
}

/// A Sparkplug group, edge node or host id is one topic level.
pub(crate) fn sparkplug_id_ok(id: &str) -> bool {
    (1..=128).contains(&id.len()) && !id.chars().any(|c| "/+#".contains(c) || c.is_control())
}

impl Config {
    /// Cross-field rules that a single key's type cannot express.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let bad = |key: &str, message: String| ConfigError::Invalid {
            origin: "configuration".into(),
            key: key.into(),
            message,
        };
        if let Some(id) = &self.node_id {
            if !node_id_ok(id) {
                return Err(bad(
                    "node_id",
                    format!(
                        "`{id}`: use 1-128 characters of A-Z a-z 0-9 - _ . \
                         (not `.` or `..`: the id is a URL path segment)"
                    ),
                ));
            }
        }
        if !(self.resources.cpu_limit > 0.0 && self.resources.cpu_limit <= 1024.0) {
            return Err(bad(
                "resources.cpu_limit",
                format!(
                    "{}: use CPUs' worth above 0, such as 0.1",
                    self.resources.cpu_limit
                ),
            ));
        }
        if self.resources.memory_limit.0 < (4 << 20) {
            return Err(bad(
                "resources.memory_limit",
                format!("{} is below the 4Mi minimum", self.resources.memory_limit),
            ));
        }
        if self.sparkplug.enabled {
            if !self.mqtt.enabled {
                return Err(bad(
                    "sparkplug.enabled",
                    "needs mqtt.enabled: the edge node uses the mqtt: broker settings".into(),
                ));
            }
            let ids = [
                ("sparkplug.group_id", Some(&self.sparkplug.group_id)),
                ("sparkplug.edge_node_id", Some(&self.sparkplug.edge_node_id)),
                (
                    "sparkplug.primary_host_id",
                    self.sparkplug.primary_host_id.as_ref(),
                ),
            ];
            for (key, id) in ids {
                // An empty edge_node_id takes the node id, checked above.
                let Some(id) = id.filter(|id| !(key == "sparkplug.edge_node_id" && id.is_empty()))
                else {
                    continue;
                };
                if !sparkplug_id_ok(id) {
                    return Err(bad(
                        key,
                        format!("`{id}`: use 1-128 characters, none of / + # or control characters (it is a topic level)"),
                    ));
                }
            }
        }
        if self.cloud.sync_interval.is_zero() {
            return Err(bad("cloud.sync_interval", "must be greater than 0s".into()));
        }
        if let Some(min) = self.cloud.sync_interval_min {
            if min.is_zero() || min.0 > self.cloud.sync_interval.0 {
                return Err(bad(
                    "cloud.sync_interval_min",
                    format!(
                        "{min} must be above 0s and at most cloud.sync_interval ({})",
                        self.cloud.sync_interval
                    ),
                ));
            }
        }
        if self.cloud.sync_round_budget.0 < std::time::Duration::from_secs(1) {
            return Err(bad(
                "cloud.sync_round_budget",
                format!("{} is below the 1s minimum", self.cloud.sync_round_budget),
            ));
        }
        if let Some(b) = &self.cloud.data_budget {
            // Below this a day's budget is gone in a handful of rounds
            // (each costs about a kilobyte in headers alone).
            if b.limit.0 < (64 << 10) {
                return Err(bad(
                    "cloud.data_budget.limit",
                    format!("{} is below the 64Ki minimum", b.limit),
                ));
            }
        }
        if self.cloud.offline_queue_size == 0 {
            return Err(bad("cloud.offline_queue_size", "must be at least 1".into()));
        }
        if self.cloud.client_cert.is_some() != self.cloud.client_key.is_some() {
            return Err(bad(
                "cloud.client_cert",
                "client_cert and client_key go together".into(),
            ));
        }
        if self.storage.path.as_os_str().is_empty() {
            return Err(bad("storage.path", "must not be empty".into()));
        }
        if self.storage.max_size.0 < (1 << 20) {
            return Err(bad(
                "storage.max_size",
                format!("{} is below the 1Mi minimum", self.storage.max_size),
            ));
        }
        if self.mqtt.enabled && self.mqtt.topics.is_empty() {
            return Err(bad("mqtt.topics", "list at least one topic".into()));
        }
        for (i, t) in self.mqtt.topics.iter().enumerate() {
            if t.is_empty() || t.contains('\0') || t.split('/').any(|l| l.contains('#') && l != "#")
            {
                return Err(bad(
                    &format!("mqtt.topics[{i}]"),
                    format!("`{t}` is not a valid topic filter"),
                ));
            }
        }
        if self.services.max_local_services == 0 {
            return Err(bad(
                "services.max_local_services",
                "must be at least 1".into(),
            ));
        }
        if self.http.tls_cert.is_some() != self.http.tls_key.is_some() {
            return Err(bad(
                "http.tls_cert",
                "tls_cert and tls_key go together".into(),
            ));
        }
        if self.http.client_ca.is_some() && self.http.tls_cert.is_none() {
            return Err(bad(
                "http.client_ca",
                "mTLS needs tls_cert and tls_key".into(),
            ));
        }
        if self.sync.max_batch_bytes.0 < 1024 {
            return Err(bad("sync.max_batch_bytes", "must be at least 1Ki".into()));
        }
        if self.http.max_body_size.0 < 1024 {
            return Err(bad("http.max_body_size", "must be at least 1Ki".into()));
        }
        if self.devices.stale_after_missed == 0
            || self.devices.offline_after_missed <= self.devices.stale_after_missed
        {
            return Err(bad(
                "devices.offline_after_missed",
                "must be greater than stale_after_missed, which must be at least 1".into(),
            ));
        }
        if self.devices.low_battery_percent > 100 {
            return Err(bad("devices.low_battery_percent", "must be 0-100".into()));
        }
        if !matches!(self.dbus.bus.as_str(), "system" | "session") && !self.dbus.bus.contains(':') {
            return Err(bad(
                "dbus.bus",
                format!(
                    "`{}`: use system, session or a D-Bus address",
                    self.dbus.bus
                ),
            ));
        }
        self.check_storage()?;
        self.validate_ota()?;
        self.hawkbit.check().map_err(|(key, m)| bad(key, m))?;
        if self.hawkbit.enabled() && self.ota.backend == OtaBackend::None {
            return Err(bad(
                "hawkbit.server",
                "the DDI client installs through the A/B coordinator: set ota.backend".into(),
            ));
        }
        Ok(())
    }

    fn validate_ota(&self) -> Result<(), ConfigError> {
        let bad = |key: &str, message: String| ConfigError::Invalid {
            origin: "configuration".into(),
            key: key.into(),
            message,
        };
        let ota = &self.ota;
        if ota.min_battery_percent > 100 {
            return Err(bad("ota.min_battery_percent", "must be 0-100".into()));
        }
        let needs_slots = match ota.backend {
            OtaBackend::Uboot => {
                if ota.fw_env_config.is_none() {
                    return Err(bad(
                        "ota.fw_env_config",
                        "required by the uboot backend".into(),
                    ));
                }
                true
            }
            OtaBackend::Grub => {
                if ota.grub_env.is_none() {
                    return Err(bad("ota.grub_env", "required by the grub backend".into()));
                }
                true
            }
            OtaBackend::Rauc | OtaBackend::None => false,
        };
        if ota.commit_deadline.is_zero() || ota.step_timeout.is_zero() {
            return Err(bad(
                "ota.commit_deadline",
                "commit_deadline and step_timeout must be greater than 0s".into(),
            ));
        }
        if ota.min_battery_percent > 0
            && ota.battery_path.is_none()
            && ota.backend != OtaBackend::None
        {
            return Err(bad(
                "ota.battery_path",
                "min_battery_percent needs battery_path (a sysfs capacity file)".into(),
            ));
        }
        if needs_slots && !(ota.slots.contains_key("A") && ota.slots.contains_key("B")) {
            return Err(bad(
                "ota.slots",
                "the uboot and grub backends need slots A and B (device paths)".into(),
            ));
        }
        if needs_slots && ota.public_keys.is_empty() {
            return Err(bad(
                "ota.public_keys",
                "the uboot and grub backends need at least one manifest signing key".into(),
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::node_id_ok;

    #[test]
    fn node_ids_round_trip_through_a_url_path() {
        for ok in ["edge-1", "pi.4", "a..b", "...", "_"] {
            assert!(node_id_ok(ok), "{ok}");
        }
        let long = "x".repeat(129);
        for bad in ["", ".", "..", "a/b", "a b", "é", "a%2e", long.as_str()] {
            assert!(!node_id_ok(bad), "{bad}");
        }
    }
}
