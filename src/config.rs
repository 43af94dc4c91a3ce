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

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use serde_norway::Value;

/// Errors from loading or validating a configuration.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{path}: cannot read: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{origin}: {message}")]
    Parse { origin: String, message: String },
    #[error("{origin}: {key}: {message}")]
    Invalid {
        origin: String,
        key: String,
        message: String,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    #[default]
    Edge,
    Hub,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum LogLevel {
    Error,
    Warn,
    #[default]
    Info,
    Debug,
    Trace,
}

impl LogLevel {
    pub fn to_filter(self) -> log::LevelFilter {
        match self {
            LogLevel::Error => log::LevelFilter::Error,
            LogLevel::Warn => log::LevelFilter::Warn,
            LogLevel::Info => log::LevelFilter::Info,
            LogLevel::Debug => log::LevelFilter::Debug,
            LogLevel::Trace => log::LevelFilter::Trace,
        }
    }
}

impl FromStr for LogLevel {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.to_ascii_lowercase().as_str() {
            "error" => Ok(LogLevel::Error),
            "warn" | "warning" => Ok(LogLevel::Warn),
            "info" => Ok(LogLevel::Info),
            "debug" => Ok(LogLevel::Debug),
            "trace" => Ok(LogLevel::Trace),
            other => Err(format!(
                "unknown log level `{other}` (error, warn, info, debug, trace)"
            )),
        }
    }
}

/// A duration written as in the seed: `300s`, `5m`, `1h`, `7d`, `250ms`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "Value", into = "String")]
pub struct Duration(pub std::time::Duration);

impl Duration {
    pub const fn secs(s: u64) -> Self {
        Duration(std::time::Duration::from_secs(s))
    }
    pub fn is_zero(&self) -> bool {
        self.0.is_zero()
    }
}

impl FromStr for Duration {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let s = s.trim();
        let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
        let (num, unit) = s.split_at(split);
        let n: u64 = num
            .parse()
            .map_err(|_| format!("`{s}` is not a duration (like 300s, 5m, 1h, 7d, 250ms)"))?;
        let ms = match unit {
            "ms" => Some(n),
            "s" | "" => n.checked_mul(1_000),
            "m" => n.checked_mul(60_000),
            "h" => n.checked_mul(3_600_000),
            "d" => n.checked_mul(86_400_000),
            _ => {
                return Err(format!(
                    "`{s}`: unknown duration unit `{unit}` (ms, s, m, h, d)"
                ))
            }
        }
        .ok_or_else(|| format!("`{s}` is too large"))?;
        Ok(Duration(std::time::Duration::from_millis(ms)))
    }
}

impl TryFrom<Value> for Duration {
    type Error = String;
    fn try_from(v: Value) -> Result<Self, String> {
        match v {
            Value::String(s) => s.parse(),
            Value::Number(n) => n
                .as_u64()
                .map(Duration::secs)
                .ok_or_else(|| format!("`{n}` is not a duration")),
            other => Err(format!("expected a duration like 300s, got {other:?}")),
        }
    }
}

impl From<Duration> for String {
    fn from(d: Duration) -> String {
        d.to_string()
    }
}

impl fmt::Display for Duration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let ms = self.0.as_millis();
        if !ms.is_multiple_of(1000) {
            write!(f, "{ms}ms")
        } else {
            write!(f, "{}s", ms / 1000)
        }
    }
}

/// A size written as in the seed: `50Mi`, `1Gi`, `512Ki`, `100M`, or bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "Value", into = "String")]
pub struct ByteSize(pub u64);

impl FromStr for ByteSize {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let s = s.trim();
        let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
        let (num, unit) = s.split_at(split);
        let n: u64 = num
            .parse()
            .map_err(|_| format!("`{s}` is not a size (like 50Mi, 1Gi, 512Ki)"))?;
        let mult: u64 = match unit {
            "" | "B" => 1,
            "Ki" | "KiB" => 1 << 10,
            "Mi" | "MiB" => 1 << 20,
            "Gi" | "GiB" => 1 << 30,
            "K" | "k" | "KB" => 1_000,
            "M" | "MB" => 1_000_000,
            "G" | "GB" => 1_000_000_000,
            _ => {
                return Err(format!(
                    "`{s}`: unknown size unit `{unit}` (Ki, Mi, Gi, K, M, G)"
                ))
            }
        };
        n.checked_mul(mult)
            .map(ByteSize)
            .ok_or_else(|| format!("`{s}` is too large"))
    }
}

impl TryFrom<Value> for ByteSize {
    type Error = String;
    fn try_from(v: Value) -> Result<Self, String> {
        match v {
            Value::String(s) => s.parse(),
            Value::Number(n) => n
                .as_u64()
                .map(ByteSize)
                .ok_or_else(|| format!("`{n}` is not a size")),
            other => Err(format!("expected a size like 50Mi, got {other:?}")),
        }
    }
}

impl From<ByteSize> for String {
    fn from(b: ByteSize) -> String {
        b.to_string()
    }
}

impl fmt::Display for ByteSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let b = self.0;
        for (unit, m) in [("Gi", 1u64 << 30), ("Mi", 1 << 20), ("Ki", 1 << 10)] {
            if b >= m && b.is_multiple_of(m) {
                return write!(f, "{}{unit}", b / m);
            }
        }
        write!(f, "{b}")
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Resources {
    pub memory_limit: ByteSize,
    pub cpu_limit: f64,
    pub storage_limit: ByteSize,
}

impl Default for Resources {
    fn default() -> Self {
        Resources {
            memory_limit: ByteSize(50 << 20),
            cpu_limit: 0.1,
            storage_limit: ByteSize(500 << 20),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum RetryBackoff {
    #[default]
    Exponential,
    Fixed,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Cloud {
    /// Empty means standalone: no sync, the outbox still records changes.
    #[serde(deserialize_with = "de_cloud_url")]
    pub server_address: String,
    pub sync_interval: Duration,
    pub offline_queue_size: u64,
    pub retry_backoff: RetryBackoff,
    pub ca_file: Option<PathBuf>,
    pub client_cert: Option<PathBuf>,
    pub client_key: Option<PathBuf>,
    pub token_file: Option<PathBuf>,
}

impl Default for Cloud {
    fn default() -> Self {
        Cloud {
            server_address: String::new(),
            sync_interval: Duration::secs(300),
            offline_queue_size: 10_000,
            retry_backoff: RetryBackoff::Exponential,
            ca_file: None,
            client_cert: None,
            client_key: None,
            token_file: None,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum StorageType {
    #[default]
    Sqlite,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Storage {
    #[serde(rename = "type")]
    pub kind: StorageType,
    pub path: PathBuf,
    pub max_size: ByteSize,
}

impl Default for Storage {
    fn default() -> Self {
        Storage {
            kind: StorageType::Sqlite,
            path: PathBuf::from("/var/lib/konsul-edge/konsul.db"),
            max_size: ByteSize(100 << 20),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Mqtt {
    pub enabled: bool,
    #[serde(deserialize_with = "de_broker_url")]
    pub broker: String,
    pub client_id: String,
    #[serde(deserialize_with = "de_qos")]
    pub qos: u8,
    pub topics: Vec<String>,
    pub username: Option<String>,
    pub password_file: Option<PathBuf>,
    pub ca_file: Option<PathBuf>,
    /// Larger device payloads are rejected unparsed.
    #[serde(deserialize_with = "de_payload_size")]
    pub max_payload_size: ByteSize,
}

impl Default for Mqtt {
    fn default() -> Self {
        Mqtt {
            enabled: false,
            broker: "tcp://localhost:1883".into(),
            client_id: String::new(),
            qos: 1,
            topics: [
                "devices/+/register",
                "devices/+/telemetry",
                "devices/+/heartbeat",
                "devices/+/events",
                "devices/+/status",
            ]
            .map(String::from)
            .to_vec(),
            username: None,
            password_file: None,
            ca_file: None,
            max_payload_size: ByteSize(64 << 10),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Services {
    pub max_local_services: u64,
    pub cache_ttl: Duration,
    /// TTL given to a service registered without one; 0s: never expires.
    pub default_ttl: Duration,
}

impl Default for Services {
    fn default() -> Self {
        Services {
            max_local_services: 100,
            cache_ttl: Duration::secs(3600),
            default_ttl: Duration::secs(0),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum SyncMode {
    #[default]
    Delta,
    Full,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum ConflictResolution {
    #[default]
    LastWriteWins,
    Crdt,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Sync {
    pub mode: SyncMode,
    pub compression: bool,
    pub conflict_resolution: ConflictResolution,
    /// How long deletes are remembered; an edge offline for longer is told
    /// to do a full sync.
    pub tombstone_retention: Duration,
    /// Upper bound of one upload batch (thin links).
    pub max_batch_bytes: ByteSize,
    /// Hub side: bearer tokens accepted from edges, one per line; with it
    /// every request from another host needs one (loopback is exempt).
    /// Without it the hub accepts any edge that reaches it (use mTLS or a
    /// network boundary then).
    pub auth_token_file: Option<PathBuf>,
}

impl Default for Sync {
    fn default() -> Self {
        Sync {
            mode: SyncMode::Delta,
            compression: true,
            conflict_resolution: ConflictResolution::LastWriteWins,
            tombstone_retention: Duration::secs(30 * 86_400),
            max_batch_bytes: ByteSize(64 << 10),
            auth_token_file: None,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Http {
    #[serde(deserialize_with = "de_listen")]
    pub listen: String,
    pub max_body_size: ByteSize,
    /// Serve HTTPS with this certificate chain and key (a hub facing
    /// edges over the internet).
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
    /// Require client certificates signed by this CA (mTLS).
    pub client_ca: Option<PathBuf>,
    /// A second listener on a Unix socket: callers are known by their uid
    /// and groups (peer credentials), so local admin needs no token.
    pub unix_socket: Option<PathBuf>,
}

impl Default for Http {
    fn default() -> Self {
        Http {
            listen: "127.0.0.1:8500".into(),
            max_body_size: ByteSize(1 << 20),
            tls_cert: None,
            tls_key: None,
            client_ca: None,
            unix_socket: None,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Devices {
    pub max_devices: u64,
    pub stale_after_missed: u32,
    pub offline_after_missed: u32,
    pub low_battery_percent: u8,
    pub telemetry_retention: Duration,
    pub telemetry_max_size: ByteSize,
}

impl Default for Devices {
    fn default() -> Self {
        Devices {
            max_devices: 1000,
            stale_after_missed: 3,
            offline_after_missed: 6,
            low_battery_percent: 15,
            telemetry_retention: Duration::secs(7 * 86_400),
            telemetry_max_size: ByteSize(20 << 20),
        }
    }
}

/// Who may do what, through every door (HTTP over TCP and the Unix socket,
/// D-Bus, the CLI). Policies are Konsul's ACL JSON; see `crate::acl`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Acl {
    /// Off: every caller that is not an admin gets `builtin:open`
    /// policy (all Konsul routes), still never the edge's admin routes
    /// over anonymous TCP.
    pub enabled: bool,
    /// Konsul policy files (`*.json`), read at start and on reload.
    pub policy_dir: Option<PathBuf>,
    /// The policy of TCP callers without a token.
    pub anonymous_policy: String,
    /// The policy of local users (Unix socket, D-Bus) who are not root,
    /// not the daemon's own user and not in `admin_group`, unless
    /// `users`/`groups` grant them more.
    pub local_policy: String,
    /// Members of this group get the built-in `admin` policy.
    pub admin_group: String,
    /// Local user name -> policy names.
    pub users: BTreeMap<String, Vec<String>>,
    /// Local group name -> policy names.
    pub groups: BTreeMap<String, Vec<String>>,
    /// Bearer tokens (`X-API-Key` or `Authorization: Bearer`).
    pub tokens: Vec<AclToken>,
}

impl Default for Acl {
    fn default() -> Self {
        Acl {
            enabled: true,
            policy_dir: None,
            anonymous_policy: "builtin:anonymous".into(),
            local_policy: "builtin:anonymous".into(),
            admin_group: "konsul".into(),
            users: BTreeMap::new(),
            groups: BTreeMap::new(),
            tokens: Vec::new(),
        }
    }
}

/// One token: its secret lives in `file` (owner-only), never in the config.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AclToken {
    pub name: String,
    pub file: PathBuf,
    pub policies: Vec<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Dbus {
    pub enabled: bool,
    /// `system`, `session`, or a D-Bus address such as `unix:path=/run/x`.
    pub bus: String,
}

impl Default for Dbus {
    fn default() -> Self {
        Dbus {
            enabled: false,
            bus: "system".into(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum OtaBackend {
    #[default]
    None,
    Rauc,
    Uboot,
    Grub,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Ota {
    pub backend: OtaBackend,
    pub fw_env_config: Option<PathBuf>,
    pub grub_env: Option<PathBuf>,
    pub slots: BTreeMap<String, PathBuf>,
    #[serde(deserialize_with = "de_window")]
    pub maintenance_window: Option<String>,
    pub min_battery_percent: u8,
    pub commit_deadline: Duration,
    pub health_commands: Vec<String>,
    /// The health gate also needs the last sync with the hub to succeed.
    pub health_require_cloud: bool,
    /// ed25519 public keys (32 raw bytes or 64 hex digits per file) that
    /// may sign image manifests (uboot and grub backends; RAUC checks its
    /// own keyring).
    pub public_keys: Vec<PathBuf>,
    /// The bus RAUC's service is on: `system` or a D-Bus address.
    pub rauc_bus: String,
    /// Run through `sh -c` to reboot; tests replace it.
    pub reboot_command: String,
    /// Where the booted slot is read from (`rauc.slot=` / `konsul.slot=`).
    pub cmdline: PathBuf,
    /// Changes on every boot; tells a daemon restart from a reboot.
    pub boot_id_file: PathBuf,
    /// A sysfs `capacity` file (percent) for `min_battery_percent`.
    #[serde(deserialize_with = "de_opt_path")]
    pub battery_path: Option<PathBuf>,
    /// Boots of a new slot that may fail before the daemon runs
    /// (bootloader counter), and daemon crashes during the health gate.
    #[serde(deserialize_with = "de_attempts")]
    pub boot_attempts: u32,
    /// Boots of a new slot interrupted during the gate (power cuts,
    /// resets) before it is given up.
    #[serde(deserialize_with = "de_attempts")]
    pub max_unconfirmed_boots: u32,
    /// Bandwidth cap for staging a local bundle or downloading a hub
    /// rollout's, bytes per second (0 = none).
    pub download_rate: ByteSize,
    /// How long downloading, verifying or installing may take.
    pub step_timeout: Duration,
    /// Where bundles are staged; default: `<storage dir>/ota`.
    #[serde(deserialize_with = "de_opt_path")]
    pub work_dir: Option<PathBuf>,
}

fn de_opt_path<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<PathBuf>, D::Error> {
    let p = Option::<PathBuf>::deserialize(d)?;
    if p.as_ref().is_some_and(|p| p.as_os_str().is_empty()) {
        return Err(serde::de::Error::custom("must not be empty"));
    }
    Ok(p)
}

fn de_attempts<'de, D: serde::Deserializer<'de>>(d: D) -> Result<u32, D::Error> {
    let n = u32::deserialize(d)?;
    if !(1..=100).contains(&n) {
        return Err(serde::de::Error::custom(format!("{n}: use 1-100")));
    }
    Ok(n)
}

impl Default for Ota {
    fn default() -> Self {
        Ota {
            backend: OtaBackend::None,
            fw_env_config: None,
            grub_env: None,
            slots: BTreeMap::new(),
            maintenance_window: None,
            min_battery_percent: 0,
            commit_deadline: Duration::secs(600),
            health_commands: Vec::new(),
            health_require_cloud: false,
            public_keys: Vec::new(),
            rauc_bus: "system".into(),
            reboot_command: "systemctl reboot".into(),
            cmdline: PathBuf::from("/proc/cmdline"),
            boot_id_file: PathBuf::from("/proc/sys/kernel/random/boot_id"),
            battery_path: None,
            boot_attempts: 3,
            max_unconfirmed_boots: 10,
            download_rate: ByteSize(0),
            step_timeout: Duration::secs(3600),
            work_dir: None,
        }
    }
}

/// Firmware OTA for MQTT devices (`src/firmware/`): the artifact store and
/// rollout defaults.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Firmware {
    /// Where artifacts live; default: `firmware/` next to `storage.path`.
    pub dir: Option<PathBuf>,
    /// Total size of stored artifacts; older artifacts no rollout needs are
    /// evicted to make room.
    pub max_size: ByteSize,
    /// Largest single upload (streamed to disk, never held in memory).
    #[serde(deserialize_with = "de_upload_size")]
    pub max_upload_size: ByteSize,
    /// ed25519 public keys (base64 of the 32 raw bytes, or a PEM
    /// `PUBLIC KEY` block); an artifact must be signed by one of them.
    #[serde(deserialize_with = "de_public_keys")]
    pub public_keys: Vec<String>,
    /// The URL devices download from (`http://192.168.1.10:8500`); default:
    /// the API's own address.
    #[serde(deserialize_with = "de_base_url")]
    pub base_url: Option<String>,
    /// Bytes per second when fetching artifacts from the hub (0: no cap).
    pub bandwidth_limit: ByteSize,
    pub rollout: RolloutDefaults,
}

impl Default for Firmware {
    fn default() -> Self {
        Firmware {
            dir: None,
            max_size: ByteSize(256 << 20),
            max_upload_size: ByteSize(64 << 20),
            public_keys: Vec::new(),
            base_url: None,
            bandwidth_limit: ByteSize(0),
            rollout: RolloutDefaults::default(),
        }
    }
}

/// What a rollout that does not say otherwise uses.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RolloutDefaults {
    /// Devices per wave.
    #[serde(deserialize_with = "de_positive")]
    pub wave_size: u32,
    /// Failed devices at which the rollout halts (0: never halts).
    pub failure_threshold: u32,
    /// How long an offered device has to finish before the attempt fails.
    pub device_deadline: Duration,
    /// Offers after the first one to a device whose attempt failed.
    pub max_retries: u32,
}

impl Default for RolloutDefaults {
    fn default() -> Self {
        RolloutDefaults {
            wave_size: 10,
            failure_threshold: 3,
            device_deadline: Duration::secs(1800),
            max_retries: 2,
        }
    }
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
    pub services: Services,
    pub sync: Sync,
    pub http: Http,
    pub devices: Devices,
    pub dbus: Dbus,
    pub acl: Acl,
    pub ota: Ota,
    pub firmware: Firmware,
}

/// Environment variables the seed documents, mapped to their keys. Every
/// other `KONSUL_SECTION_KEY` is derived from the section and key names.
const ENV_ALIASES: &[(&str, &str)] = &[
    ("KONSUL_CLOUD_ADDRESS", "cloud.server_address"),
    ("KONSUL_LOG", "log_level"),
];

/// Variables that are not configuration keys (tests, tooling).
const ENV_NOT_CONFIG: &[&str] = &["KONSUL_TEST_HOOKS", "KONSUL_CONFIG"];

const SECTIONS: &[&str] = &[
    "resources",
    "cloud",
    "storage",
    "mqtt",
    "services",
    "sync",
    "http",
    "devices",
    "dbus",
    "acl",
    "ota",
    "firmware",
];

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
    /// Loads `path`, then `<dir of path>/config.d/*.yaml`, then the
    /// environment, and validates the result.
    pub fn load(path: &Path) -> Result<(Config, Sources), ConfigError> {
        Self::load_with_env(path, std::env::vars())
    }

    pub fn load_with_env(
        path: &Path,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<(Config, Sources), ConfigError> {
        let mut sources = Sources::default();
        let mut merged = Value::Mapping(Default::default());
        for file in std::iter::once(path.to_path_buf()).chain(drop_ins(path)?) {
            let text = std::fs::read_to_string(&file).map_err(|source| ConfigError::Read {
                path: file.clone(),
                source,
            })?;
            let layer = parse_layer(&text, &file.display().to_string())?;
            merge(&mut merged, layer);
            sources.files.push(file);
        }
        let mut env: Vec<(String, String)> = env.into_iter().collect();
        // Sorted, so two variables naming one key resolve the same way on
        // every boot (the later name wins).
        env.sort();
        for (name, value) in env {
            if !name.starts_with("KONSUL_") || ENV_NOT_CONFIG.contains(&name.as_str()) {
                continue;
            }
            let Some(key) = env_key(&name) else {
                sources.ignored_env.push(name);
                continue;
            };
            let origin = format!("environment {name}");
            let layer = env_layer(&key, &value);
            check_layer(layer.clone(), &origin)?;
            merge(&mut merged, layer);
            sources.env.push(name);
        }
        let config: Config = serde_norway::from_value(merged).map_err(|e| ConfigError::Parse {
            origin: "merged configuration".into(),
            message: e.to_string(),
        })?;
        config.validate()?;
        Ok((config, sources))
    }

    /// Parses one document on its own (no drop-ins, no environment).
    pub fn from_yaml(text: &str, origin: &str) -> Result<Config, ConfigError> {
        let layer = parse_layer(text, origin)?;
        let config: Config = serde_norway::from_value(layer).map_err(|e| ConfigError::Parse {
            origin: origin.into(),
            message: e.to_string(),
        })?;
        config.validate()?;
        Ok(config)
    }

    /// Cross-field rules that a single key's type cannot express.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let bad = |key: &str, message: String| ConfigError::Invalid {
            origin: "configuration".into(),
            key: key.into(),
            message,
        };
        if let Some(id) = &self.node_id {
            if id.is_empty()
                || id.len() > 128
                || !id
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
            {
                return Err(bad(
                    "node_id",
                    format!("`{id}`: use 1-128 characters of A-Z a-z 0-9 - _ ."),
                ));
            }
        }
        if self.cloud.sync_interval.is_zero() {
            return Err(bad("cloud.sync_interval", "must be greater than 0s".into()));
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
        self.validate_ota()
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
            .filter(|h| !h.is_empty())
            .unwrap_or_else(|| "konsul-edge".into())
    }
}

/// `HH:MM-HH:MM`, in minutes since midnight; may wrap past midnight.
pub fn parse_window(w: &str) -> Result<(u16, u16), String> {
    let hm = |s: &str| -> Option<u16> {
        let (h, m) = s.trim().split_once(':')?;
        let (h, m): (u16, u16) = (h.parse().ok()?, m.parse().ok()?);
        (h < 24 && m < 60).then_some(h * 60 + m)
    };
    w.split_once('-')
        .and_then(|(a, b)| Some((hm(a)?, hm(b)?)))
        .ok_or_else(|| format!("`{w}` is not a window like 02:00-04:00"))
}

fn url_error(url: &str, schemes: &[&str]) -> Option<String> {
    let ok = url
        .split_once("://")
        .is_some_and(|(scheme, rest)| schemes.contains(&scheme) && !rest.is_empty());
    (!ok).then(|| {
        format!(
            "`{url}` is not a URL with one of the schemes {}",
            schemes.join(", ")
        )
    })
}

// Per-key checks run while deserializing, so their errors carry the line.

fn de_cloud_url<'de, D: serde::Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    let url = String::deserialize(d)?;
    match url_error(&url, &["http", "https"]) {
        Some(e) if !url.is_empty() => Err(serde::de::Error::custom(e)),
        _ => Ok(url),
    }
}

fn de_broker_url<'de, D: serde::Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    let url = String::deserialize(d)?;
    match url_error(&url, &["tcp", "mqtt", "ssl", "mqtts", "ws", "wss"]) {
        Some(e) => Err(serde::de::Error::custom(e)),
        None => Ok(url),
    }
}

fn de_qos<'de, D: serde::Deserializer<'de>>(d: D) -> Result<u8, D::Error> {
    let qos = u8::deserialize(d)?;
    if qos > 2 {
        return Err(serde::de::Error::custom(format!(
            "{qos} is not an MQTT QoS (0, 1 or 2)"
        )));
    }
    Ok(qos)
}

fn de_payload_size<'de, D: serde::Deserializer<'de>>(d: D) -> Result<ByteSize, D::Error> {
    let size = ByteSize::deserialize(d)?;
    // MQTT's own limit is 256 MiB; below 256 bytes no registration fits.
    if !(256..=(256 << 20)).contains(&size.0) {
        return Err(serde::de::Error::custom(format!(
            "{size} is outside 256 bytes - 256Mi"
        )));
    }
    Ok(size)
}

fn de_listen<'de, D: serde::Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    let addr = String::deserialize(d)?;
    if addr.parse::<SocketAddr>().is_err() {
        return Err(serde::de::Error::custom(format!(
            "`{addr}` is not an address:port such as 127.0.0.1:8500"
        )));
    }
    Ok(addr)
}

fn de_upload_size<'de, D: serde::Deserializer<'de>>(d: D) -> Result<ByteSize, D::Error> {
    let size = ByteSize::deserialize(d)?;
    if size.0 == 0 {
        return Err(serde::de::Error::custom("must be greater than 0"));
    }
    Ok(size)
}

fn de_positive<'de, D: serde::Deserializer<'de>>(d: D) -> Result<u32, D::Error> {
    let n = u32::deserialize(d)?;
    if n == 0 {
        return Err(serde::de::Error::custom("must be at least 1"));
    }
    Ok(n)
}

fn de_public_keys<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    let keys = Vec::<String>::deserialize(d)?;
    for (i, k) in keys.iter().enumerate() {
        crate::firmware::parse_public_key(k)
            .map_err(|e| serde::de::Error::custom(format!("[{i}]: {e}")))?;
    }
    Ok(keys)
}

fn de_base_url<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    let url = Option::<String>::deserialize(d)?;
    if let Some(u) = &url {
        if let Some(e) = url_error(u, &["http", "https"]) {
            return Err(serde::de::Error::custom(e));
        }
    }
    Ok(url)
}

fn de_window<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    let w = Option::<String>::deserialize(d)?;
    if let Some(w) = &w {
        parse_window(w).map_err(serde::de::Error::custom)?;
    }
    Ok(w)
}

fn drop_ins(main: &Path) -> Result<Vec<PathBuf>, ConfigError> {
    let dir = main
        .parent()
        .unwrap_or_else(|| Path::new("."))
        .join("config.d");
    let entries = match std::fs::read_dir(&dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(source) => return Err(ConfigError::Read { path: dir, source }),
    };
    let mut files = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|source| ConfigError::Read {
            path: dir.clone(),
            source,
        })?;
        let path = entry.path();
        if path.extension().is_some_and(|e| e == "yaml" || e == "yml") {
            files.push(path);
        }
    }
    files.sort();
    Ok(files)
}

/// Parses one layer and checks it against the schema on its own, so that
/// errors carry this file's line numbers (a merged tree has none).
fn parse_layer(text: &str, origin: &str) -> Result<Value, ConfigError> {
    let parse_err = |e: serde_norway::Error| ConfigError::Parse {
        origin: origin.into(),
        message: e.to_string(),
    };
    let value: Value = serde_norway::from_str(text).map_err(parse_err)?;
    let value = match value {
        Value::Null => Value::Mapping(Default::default()),
        Value::Mapping(_) => value,
        _ => {
            return Err(ConfigError::Parse {
                origin: origin.into(),
                message: "the top level must be a mapping of sections".into(),
            })
        }
    };
    let de = serde_norway::Deserializer::from_str(text);
    serde_path_to_error::deserialize::<_, Config>(de).map_err(|e| {
        let path = e.path().to_string();
        ConfigError::Parse {
            origin: origin.into(),
            message: with_path(&path, &e.into_inner().to_string()),
        }
    })?;
    Ok(value)
}

/// `mqtt.qos: <message>`, without the partial path serde_norway itself
/// sometimes puts in front of the message (`mqtt: ...`).
fn with_path(path: &str, message: &str) -> String {
    if path == "." || path.is_empty() {
        return message.to_owned();
    }
    let mut msg = message;
    let parts: Vec<&str> = path.split('.').collect();
    for n in (1..=parts.len()).rev() {
        let prefix = format!("{}: ", parts[..n].join("."));
        if let Some(rest) = msg.strip_prefix(&prefix) {
            msg = rest;
            break;
        }
    }
    format!("{path}: {msg}")
}

fn check_layer(layer: Value, origin: &str) -> Result<(), ConfigError> {
    serde_path_to_error::deserialize::<_, Config>(layer)
        .map(|_| ())
        .map_err(|e| {
            let path = e.path().to_string();
            ConfigError::Parse {
                origin: origin.into(),
                message: with_path(&path, &e.into_inner().to_string()),
            }
        })
}

/// `KONSUL_MQTT_ENABLED` -> `mqtt.enabled`; `KONSUL_MODE` -> `mode`.
fn env_key(name: &str) -> Option<String> {
    if let Some((_, key)) = ENV_ALIASES.iter().find(|(n, _)| *n == name) {
        return Some((*key).into());
    }
    let rest = name.strip_prefix("KONSUL_")?.to_ascii_lowercase();
    if ["mode", "node_id", "log_level"].contains(&rest.as_str()) {
        return Some(rest);
    }
    SECTIONS.iter().find_map(|s| {
        rest.strip_prefix(s)
            .and_then(|k| k.strip_prefix('_'))
            .filter(|k| !k.is_empty())
            .map(|k| format!("{s}.{k}"))
    })
}

fn env_layer(key: &str, raw: &str) -> Value {
    // A YAML scalar, so `true`, `1` and `300s` mean what they mean in a file;
    // anything that does not parse as a scalar is taken as a plain string.
    let scalar = match serde_norway::from_str::<Value>(raw) {
        Ok(v @ (Value::Bool(_) | Value::Number(_) | Value::String(_))) => v,
        _ => Value::String(raw.into()),
    };
    key.rsplit('.').fold(scalar, |inner, part| {
        let mut m = serde_norway::Mapping::new();
        m.insert(Value::String(part.into()), inner);
        Value::Mapping(m)
    })
}

fn merge(base: &mut Value, layer: Value) {
    match (base, layer) {
        (Value::Mapping(b), Value::Mapping(l)) => {
            for (k, v) in l {
                match b.get_mut(&k) {
                    Some(existing) => merge(existing, v),
                    None => {
                        b.insert(k, v);
                    }
                }
            }
        }
        (b, l) => *b = l,
    }
}

/// The commented config `konsul-edge init` writes.
pub fn render_init(cloud_address: &str, mqtt_broker: &str, node_id: &str) -> String {
    let mqtt_enabled = !mqtt_broker.is_empty();
    let broker = if mqtt_enabled {
        mqtt_broker
    } else {
        "tcp://localhost:1883"
    };
    format!(
        r#"# konsul-edge configuration, written by `konsul-edge init`.
# Check it with `konsul-edge check-config FILE`. Drop-ins in config.d/*.yaml
# next to this file are merged over it in name order, then KONSUL_* variables
# (KONSUL_MODE, KONSUL_CLOUD_ADDRESS, KONSUL_MQTT_ENABLED, KONSUL_<SECTION>_<KEY>).
mode: edge
node_id: {node_id}
log_level: info            # error | warn | info | debug | trace (KONSUL_LOG)

resources:
  memory_limit: 50Mi       # systemd MemoryMax should match
  cpu_limit: 0.1
  storage_limit: 500Mi

cloud:
  # The hub this edge syncs with; "" runs standalone (changes stay queued).
  server_address: "{cloud_address}"
  sync_interval: 300s
  offline_queue_size: 10000
  retry_backoff: exponential

storage:
  type: sqlite
  path: /var/lib/konsul-edge/konsul.db
  max_size: 100Mi          # writes past this fail cleanly with 507

mqtt:
  enabled: {mqtt_enabled}
  broker: {broker}
  client_id: konsul-edge-{node_id}
  qos: 1
  topics:
    - devices/+/register
    - devices/+/telemetry
    - devices/+/heartbeat
    - devices/+/events
    - devices/+/status     # device last wills
  max_payload_size: 64Ki   # larger device messages are rejected

services:
  max_local_services: 100
  cache_ttl: 3600s
  default_ttl: 0s          # 0s: services without a ttl never expire

sync:
  mode: delta              # delta | full
  compression: true
  conflict_resolution: last-write-wins   # or crdt

http:
  listen: 127.0.0.1:8500   # the local Konsul-compatible API
  max_body_size: 1Mi
"#
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_and_sizes_parse_as_in_the_seed() {
        assert_eq!("300s".parse::<Duration>().unwrap(), Duration::secs(300));
        assert_eq!("5m".parse::<Duration>().unwrap(), Duration::secs(300));
        assert_eq!("7d".parse::<Duration>().unwrap(), Duration::secs(604_800));
        assert_eq!(
            "250ms".parse::<Duration>().unwrap().0,
            std::time::Duration::from_millis(250)
        );
        assert!("5 parsecs".parse::<Duration>().is_err());
        assert!("s".parse::<Duration>().is_err());
        assert_eq!("50Mi".parse::<ByteSize>().unwrap().0, 50 << 20);
        assert_eq!("1Gi".parse::<ByteSize>().unwrap().0, 1 << 30);
        assert_eq!("100M".parse::<ByteSize>().unwrap().0, 100_000_000);
        assert!("12Qi".parse::<ByteSize>().is_err());
        assert_eq!(ByteSize(50 << 20).to_string(), "50Mi");
    }

    #[test]
    fn env_names_map_to_keys() {
        assert_eq!(env_key("KONSUL_MODE").as_deref(), Some("mode"));
        assert_eq!(
            env_key("KONSUL_CLOUD_ADDRESS").as_deref(),
            Some("cloud.server_address")
        );
        assert_eq!(
            env_key("KONSUL_MQTT_ENABLED").as_deref(),
            Some("mqtt.enabled")
        );
        assert_eq!(
            env_key("KONSUL_SERVICES_MAX_LOCAL_SERVICES").as_deref(),
            Some("services.max_local_services")
        );
        assert_eq!(env_key("KONSUL_NONSENSE"), None);
    }

    #[test]
    fn merge_is_deep() {
        let mut a: Value = serde_norway::from_str("mqtt: {enabled: true, qos: 1}").unwrap();
        let b: Value = serde_norway::from_str("mqtt: {qos: 2}").unwrap();
        merge(&mut a, b);
        let c: Config = serde_norway::from_value(a).unwrap();
        assert!(c.mqtt.enabled);
        assert_eq!(c.mqtt.qos, 2);
    }

    #[test]
    fn init_output_is_a_valid_config() {
        let text = render_init("https://hub.example:8500", "tcp://localhost:1883", "n1");
        let c = Config::from_yaml(&text, "init").unwrap();
        assert!(c.mqtt.enabled);
        assert_eq!(c.cloud.server_address, "https://hub.example:8500");
    }

    #[test]
    fn windows_parse() {
        assert_eq!(parse_window("02:00-04:30").unwrap(), (120, 270));
        assert!(parse_window("25:00-01:00").is_err());
    }
}
