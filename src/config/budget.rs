//! `resources.storage_limit`: one budget for everything the daemon writes
//! to disk, split into the parts each subsystem enforces on its own.
//!
//! The parts and the rules (docs/decisions/0015-one-storage-budget.md):
//! - the database with its WAL and SHM, `storage.max_size` (the store's
//!   budget); default 20% of the limit;
//! - telemetry history, which lives inside the database,
//!   `devices.telemetry_max_size`; default 20% of `storage.max_size`, at
//!   most half of it (state writes must keep room);
//! - OTA staging, `ota.staging_max_size` (the largest bundle staged),
//!   counted only with an OTA backend; default 30% of the limit, or what
//!   the named parts leave if that is less;
//! - firmware artifacts, `firmware.max_size`; default what the others
//!   leave, at least 1Mi; `firmware.max_upload_size` defaults to 64Mi or
//!   the firmware share if smaller, and a named one must fit in it.
//!
//! A part the configuration names is taken as given; only unnamed parts
//! are derived, so a config keeps meaning what it says. "Named" is read
//! from the merged YAML tree, before defaults fill it in. A config whose
//! parts add up to more than the limit is refused, with the key to change.

use serde_norway::Value;

use super::{ByteSize, Config, ConfigError, OtaBackend};

/// Which parts the configuration names itself.
#[derive(Debug, Clone, Copy, Default)]
pub(super) struct Named {
    db: bool,
    telemetry: bool,
    firmware: bool,
    upload: bool,
    staging: bool,
}

impl Named {
    pub(super) fn from_tree(tree: &Value) -> Named {
        let has = |section: &str, key: &str| {
            tree.get(section)
                .and_then(|s| s.get(key))
                .is_some_and(|v| !v.is_null())
        };
        Named {
            db: has("storage", "max_size"),
            telemetry: has("devices", "telemetry_max_size"),
            firmware: has("firmware", "max_size"),
            upload: has("firmware", "max_upload_size"),
            staging: has("ota", "staging_max_size"),
        }
    }
}

/// Rounded down to whole KiB, so derived sizes print readably.
fn share(total: u64, percent: u64) -> ByteSize {
    ByteSize((total / 100 * percent + total % 100 * percent / 100) & !1023)
}

impl Config {
    /// Fills in the parts the configuration does not name (the rules in the
    /// module note). Runs before `validate`, which checks the fit.
    pub(super) fn split_storage(&mut self, named: Named) {
        let limit = self.resources.storage_limit.0;
        if !named.db {
            self.storage.max_size = share(limit, 20);
        }
        if !named.telemetry {
            self.devices.telemetry_max_size = share(self.storage.max_size.0, 20);
        }
        if !named.staging {
            // Never more than the named parts leave, so a derived share
            // alone never makes a config refused.
            let named_fw = if named.firmware {
                self.firmware.max_size.0
            } else {
                0
            };
            let left = limit.saturating_sub(self.storage.max_size.0 + named_fw);
            self.ota.staging_max_size = ByteSize(share(limit, 30).0.min(left & !1023));
        }
        if !named.firmware {
            let taken = self.storage.max_size.0 + self.staging_part();
            self.firmware.max_size = ByteSize(limit.saturating_sub(taken) & !1023);
        }
        if !named.upload {
            let cap = self
                .firmware
                .max_upload_size
                .0
                .min(self.firmware.max_size.0);
            self.firmware.max_upload_size = ByteSize(cap);
        }
    }

    /// OTA staging counts only when there is an OTA backend to stage for.
    fn staging_part(&self) -> u64 {
        if self.ota.backend == OtaBackend::None {
            0
        } else {
            self.ota.staging_max_size.0
        }
    }

    /// Refuses parts that cannot fit inside `resources.storage_limit`.
    pub(super) fn check_storage(&self) -> Result<(), ConfigError> {
        let bad = |key: &str, message: String| ConfigError::Invalid {
            origin: "configuration".into(),
            key: key.into(),
            message,
        };
        let limit = self.resources.storage_limit;
        let (db, fw, staging) = (
            self.storage.max_size,
            self.firmware.max_size,
            self.staging_part(),
        );
        let sum = db.0.saturating_add(fw.0).saturating_add(staging);
        if sum > limit.0 {
            let staging = if staging > 0 {
                format!(" + ota.staging_max_size {}", ByteSize(staging))
            } else {
                String::new()
            };
            return Err(bad(
                "resources.storage_limit",
                format!(
                    "{limit} cannot hold its parts: storage.max_size {db} + \
                     firmware.max_size {fw}{staging} = {}; raise the limit or \
                     shrink a part",
                    ByteSize(sum)
                ),
            ));
        }
        if staging == 0 && self.ota.backend != OtaBackend::None {
            return Err(bad(
                "ota.staging_max_size",
                format!("is 0: {limit} leaves no room to stage a bundle"),
            ));
        }
        if self.devices.telemetry_max_size.0 > db.0 / 2 {
            return Err(bad(
                "devices.telemetry_max_size",
                format!(
                    "{} is more than half of storage.max_size {db}: telemetry \
                     lives in the database and state writes need the rest",
                    self.devices.telemetry_max_size
                ),
            ));
        }
        if fw.0 < (1 << 20) {
            return Err(bad(
                "firmware.max_size",
                format!(
                    "{fw}: below 1Mi (resources.storage_limit {limit} leaves that after the \
                     database and OTA staging)"
                ),
            ));
        }
        if self.firmware.max_upload_size.0 > fw.0 {
            return Err(bad(
                "firmware.max_upload_size",
                format!(
                    "{} does not fit in firmware.max_size {fw} (with \
                     resources.storage_limit {limit}, firmware gets what the \
                     database and OTA staging leave)",
                    self.firmware.max_upload_size
                ),
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(yaml: &str) -> Result<Config, ConfigError> {
        Config::from_yaml(yaml, "test")
    }

    #[test]
    fn the_default_split_is_the_old_defaults() {
        let c = load("mode: edge\n").unwrap();
        assert_eq!(c.storage.max_size, ByteSize(100 << 20));
        assert_eq!(c.devices.telemetry_max_size, ByteSize(20 << 20));
        assert_eq!(c.firmware.max_size, ByteSize(400 << 20));
        let d = Config::default();
        assert_eq!(
            (d.storage.max_size, d.devices.telemetry_max_size),
            (c.storage.max_size, c.devices.telemetry_max_size)
        );
        assert_eq!(d.firmware.max_size, c.firmware.max_size);
    }

    #[test]
    fn named_parts_are_kept_and_the_rest_shares_what_is_left() {
        let c = load(
            "resources: {storage_limit: 300Mi}\nstorage: {max_size: 100Mi}\n\
             ota: {backend: rauc}\n",
        )
        .unwrap();
        assert_eq!(c.storage.max_size, ByteSize(100 << 20));
        assert_eq!(c.ota.staging_max_size, ByteSize(90 << 20));
        assert_eq!(c.firmware.max_size, ByteSize(110 << 20));
        assert_eq!(c.devices.telemetry_max_size, ByteSize(20 << 20));
    }

    #[test]
    fn parts_that_do_not_fit_are_refused_with_the_key() {
        let e = load(
            "resources: {storage_limit: 200Mi}\nstorage: {max_size: 150Mi}\n\
             firmware: {max_size: 100Mi}\n",
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("resources.storage_limit"), "{e}");
        assert!(e.contains("250Mi"), "{e}");
        // OTA staging counts only with a backend.
        let e = load(
            "resources: {storage_limit: 200Mi}\nstorage: {max_size: 50Mi}\n\
             firmware: {max_size: 100Mi}\nota: {backend: rauc, staging_max_size: 60Mi}\n",
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("ota.staging_max_size 60Mi"), "{e}");
        load(
            "resources: {storage_limit: 200Mi}\nstorage: {max_size: 50Mi}\n\
             firmware: {max_size: 100Mi}\nota: {staging_max_size: 60Mi}\n",
        )
        .unwrap();
        let e = load("storage: {max_size: 10Mi}\ndevices: {telemetry_max_size: 6Mi}\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("devices.telemetry_max_size"), "{e}");
        // An unnamed upload cap follows a small firmware share; a named
        // one must fit in it.
        let c = load("resources: {storage_limit: 100Mi}\nstorage: {max_size: 90Mi}\n").unwrap();
        assert_eq!(c.firmware.max_upload_size, ByteSize(10 << 20));
        let e = load(
            "resources: {storage_limit: 100Mi}\nstorage: {max_size: 90Mi}\n\
             firmware: {max_upload_size: 20Mi}\n",
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("firmware.max_upload_size"), "{e}");
        let e = load("resources: {storage_limit: 100Mi}\nstorage: {max_size: 100Mi}\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("firmware.max_size"), "{e}");
    }
}
