//! One struct per config section, with the defaults a missing key takes
//! and the checks a single key can make while it is deserialized (so its
//! error carries the file's line). Cross-field rules are in `validate`.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::keys::parse_public_key;
use super::types::{ByteSize, Duration};

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Resources {
    /// The unit's MemoryMax (`konsul-edge systemd-dropin` writes it); the
    /// daemon's larger buffers are sized from it (`crate::limits`).
    pub memory_limit: ByteSize,
    /// CPUs' worth, the unit's CPUQuota.
    pub cpu_limit: f64,
    /// Everything the daemon writes to disk (`budget`).
    pub storage_limit: ByteSize,
    /// Where the cgroup v2 hierarchy is mounted (`/sys/fs/cgroup/unified`
    /// on hybrid hosts): the start-up check reads the daemon's own
    /// `memory.max`, `cpu.max` and `memory.events` under it.
    pub cgroup_root: PathBuf,
}

impl Default for Resources {
    fn default() -> Self {
        Resources {
            memory_limit: ByteSize(50 << 20),
            cpu_limit: 0.1,
            storage_limit: ByteSize(500 << 20),
            cgroup_root: PathBuf::from("/sys/fs/cgroup"),
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
    /// The longest wait between syncs (a sync also runs on demand).
    pub sync_interval: Duration,
    /// The shortest: when changes pile up on a good link, or a sync
    /// stopped with changes queued. Default: 30s, or `sync_interval` if
    /// that is shorter. `crate::sync` (adapt) has the rules.
    pub sync_interval_min: Option<Duration>,
    /// What one sync round (one request and its answer) may take; batches
    /// are sized to take half of it on the measured link.
    pub sync_round_budget: Duration,
    /// Bytes per day or month for a metered link (absent: no budget).
    pub data_budget: Option<DataBudget>,
    pub offline_queue_size: u64,
    pub retry_backoff: RetryBackoff,
    pub ca_file: Option<PathBuf>,
    pub client_cert: Option<PathBuf>,
    pub client_key: Option<PathBuf>,
    pub token_file: Option<PathBuf>,
}

impl Cloud {
    pub fn interval_floor(&self) -> std::time::Duration {
        self.sync_interval_min
            .map_or(std::time::Duration::from_secs(30), |d| d.0)
            .min(self.sync_interval.0)
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DataBudget {
    pub limit: ByteSize,
    #[serde(default)]
    pub period: BudgetPeriod,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum BudgetPeriod {
    #[default]
    Day,
    Month,
}

impl BudgetPeriod {
    pub fn name(self) -> &'static str {
        match self {
            BudgetPeriod::Day => "day",
            BudgetPeriod::Month => "month",
        }
    }
}

impl Default for Cloud {
    fn default() -> Self {
        Cloud {
            server_address: String::new(),
            sync_interval: Duration::secs(300),
            sync_interval_min: None,
            sync_round_budget: Duration::secs(10),
            data_budget: None,
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

/// The Sparkplug B edge node (`crate::sparkplug`): the devices registered
/// over MQTT, seen by SCADA. It connects with the `mqtt:` broker settings.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Sparkplug {
    pub enabled: bool,
    pub group_id: String,
    /// Empty: the node id.
    pub edge_node_id: String,
    /// Births wait for this host application's STATE `online`; while it is
    /// offline, telemetry is kept in the store and replayed as historical.
    pub primary_host_id: Option<String>,
    /// Device types that become Sparkplug devices; empty: all.
    pub device_types: Vec<String>,
    /// Telemetry fields that become metrics; empty: every number, boolean
    /// and string field.
    pub fields: Vec<String>,
}

impl Default for Sparkplug {
    fn default() -> Self {
        Sparkplug {
            enabled: false,
            group_id: "konsul".into(),
            edge_node_id: String::new(),
            primary_host_id: None,
            device_types: Vec::new(),
            fields: Vec::new(),
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
    /// The largest bundle staged in `work_dir`: its share of
    /// `resources.storage_limit` (default 30% of it; see `budget`).
    pub staging_max_size: ByteSize,
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
            staging_max_size: ByteSize(150 << 20),
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
    /// evicted to make room. Default: what `resources.storage_limit` leaves
    /// after the database and OTA staging (see `budget`).
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
            max_size: ByteSize(400 << 20),
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
    // The bridge's own client speaks MQTT over TCP and TLS only
    // (docs/decisions/0021-mqtt-acks-after-commit.md).
    if url.starts_with("ws://") || url.starts_with("wss://") {
        return Err(serde::de::Error::custom(format!(
            "`{url}`: MQTT over WebSockets (ws://, wss://) is not supported; \
             use mqtt:// (tcp://) or mqtts:// (ssl://)"
        )));
    }
    match url_error(&url, &["tcp", "mqtt", "ssl", "mqtts"]) {
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
        parse_public_key(k).map_err(|e| serde::de::Error::custom(format!("[{i}]: {e}")))?;
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn windows_parse() {
        assert_eq!(parse_window("02:00-04:30").unwrap(), (120, 270));
        assert!(parse_window("25:00-01:00").is_err());
    }
}
