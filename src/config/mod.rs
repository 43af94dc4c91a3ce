//! Configuration: the seed's `edge-config.yaml` schema, `config.d/*.yaml`
//! drop-ins and `KONSUL_*` environment overrides.
//!
//! Layers apply in order: built-in defaults, the main file, each drop-in in
//! lexical order (deep-merged: a drop-in only names what it changes), then the
//! environment. Every layer is checked on its own before it is merged, so an
//! error names the file, the key's path and the line. Unknown keys are errors:
//! a typo in a field config must not silently fall back to a default.
//! Sections that no subsystem uses yet are still parsed and validated, so a
//! config written today keeps working when the feature lands.
//!
//! Layout, by job: `types` (durations, sizes, levels), `sections` (one
//! struct per section with its defaults and per-key checks), `load`
//! (files, drop-ins, environment, merging), `guard` (what a hostile file
//! cannot do: size, file type, nesting, control characters in messages),
//! `validate` (cross-field rules), `budget` (`resources.storage_limit`
//! split into the parts each subsystem enforces), `init` (the file
//! `konsul-edge init` writes) and `keys` (the signing-key format a key
//! check needs).
//!
//! This module sits at the bottom of the crate: it imports nothing from it,
//! so every subsystem may depend on it and it on none of them.

// Start-up only: the files are read in main before the executor and the
// watchdog run (and `node_id` reads /proc, which waits for no disk).
#![allow(clippy::disallowed_methods)]

mod budget;
mod guard;
mod hawkbit;
mod init;
mod keys;
mod load;
mod sections;
mod types;
mod validate;

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

pub use hawkbit::Hawkbit;
pub use init::render_init;
#[cfg(test)]
pub(crate) use keys::ED25519_SPKI_PREFIX;
pub use keys::{base64_decode, parse_public_key};
pub use sections::{
    parse_window, Acl, AclToken, BudgetPeriod, Cloud, ConflictResolution, DataBudget, Dbus,
    Devices, Firmware, Http, Mqtt, Ota, OtaBackend, Resources, RetryBackoff, RolloutDefaults,
    Services, Sparkplug, Storage, StorageType, Sync, SyncMode,
};
pub use types::{ByteSize, Duration, LogLevel, Mode};

/// Errors from loading or validating a configuration. Every text that came
/// from a file or the environment is shown with control characters escaped
/// (a NUL or a terminal escape sequence must not reach a terminal or the
/// journal raw).
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{}: cannot read: {source}", guard::escape(&.path.display().to_string()))]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    /// Refused before parsing: too large, not a regular file, too deeply
    /// nested, empty.
    #[error("{}: {}", guard::escape(&.path.display().to_string()), guard::escape(.message))]
    Refused { path: PathBuf, message: String },
    #[error("{}: {}", guard::escape(.origin), guard::escape(.message))]
    Parse { origin: String, message: String },
    #[error("{}: {}: {}", guard::escape(.origin), guard::escape(.key), guard::escape(.message))]
    Invalid {
        origin: String,
        key: String,
        message: String,
    },
}

/// The whole configuration, defaults filled in.
#[derive(Debug, Clone, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub mode: Mode,
    pub node_id: Option<String>,
    pub log_level: LogLevel,
    pub resources: Resources,
    pub cloud: Cloud,
    pub storage: Storage,
    pub mqtt: Mqtt,
    pub sparkplug: Sparkplug,
    pub services: Services,
    pub sync: Sync,
    pub http: Http,
    pub devices: Devices,
    pub dbus: Dbus,
    pub acl: Acl,
    pub ota: Ota,
    pub firmware: Firmware,
    pub hawkbit: Hawkbit,
}

/// Where a loaded config came from, for `check-config` and the start-up log.
#[derive(Debug, Clone, Default)]
pub struct Sources {
    pub files: Vec<PathBuf>,
    pub env: Vec<String>,
    /// `KONSUL_*` variables that name no key: worth a warning, not a failure,
    /// since the environment is shared with other programs.
    pub ignored_env: Vec<String>,
}

impl Config {
    /// The node id: configured, else the host name, else `konsul-edge`.
    pub fn node_id(&self) -> String {
        if let Some(id) = &self.node_id {
            return id.clone();
        }
        std::fs::read_to_string("/proc/sys/kernel/hostname")
            .ok()
            .map(|h| {
                h.trim()
                    .chars()
                    .map(|c| {
                        if c.is_ascii_alphanumeric() || "-_.".contains(c) {
                            c
                        } else {
                            '-'
                        }
                    })
                    .collect::<String>()
            })
            .filter(|h| validate::node_id_ok(h))
            .unwrap_or_else(|| "konsul-edge".into())
    }
}
