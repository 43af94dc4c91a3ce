//! The operator CLI: `konsul-edge status | services | devices | kv get/put |
//! sync status/now | firmware | rollouts | rollout ...`, a D-Bus client of the running daemon (like `rauc
//! status`).
//!
//! It speaks only the public D-Bus API, so it shows exactly what other
//! programs on the device see and obeys the same access rules (mutations
//! need root or group `konsul`). Output is a readable table by default and
//! JSON with `--json`; failures are classified so `main` can map them to
//! sysexits codes: the daemon not running or the bus unreachable is
//! [`CliError::NotRunning`] (69, EX_UNAVAILABLE), a refusal for lack of
//! rights is [`CliError::Denied`] (77, EX_NOPERM).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::time::Duration;

use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::{json, Value as Json};
use zbus::zvariant::{DynamicType, Type};

use crate::dbus::convert::{dict_to_json, Dict};
use crate::dbus::{
    IFACE_DEVICES, IFACE_FIRMWARE, IFACE_KV, IFACE_OTA, IFACE_REGISTRY, IFACE_SYNC, NAME, PATH,
};

/// A hung daemon must not hang the operator's shell.
const CALL_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    Status,
    Services,
    Devices,
    KvGet {
        key: String,
    },
    KvPut {
        key: String,
        value: String,
        cas: Option<u64>,
    },
    SyncStatus,
    SyncNow,
    Firmware,
    Rollouts,
    Rollout {
        id: String,
    },
    RolloutStart {
        device_type: String,
        version: String,
        wave_size: Option<u32>,
    },
    /// pause, resume or abort.
    RolloutCommand {
        verb: String,
        id: String,
    },
    OtaStatus,
    OtaInstall {
        /// Absolute: the daemon opens it.
        bundle: String,
    },
    OtaMarkGood,
    OtaMarkBad,
    OtaReboot,
}

#[derive(Debug, Clone)]
pub struct Options {
    /// `system`, `session` or a D-Bus address.
    pub bus: String,
    pub json: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum CliError {
    /// Nothing owns the name, or there is no bus to ask.
    #[error("{0}")]
    NotRunning(String),
    #[error("{0}")]
    Denied(String),
    /// The daemon answered with an error (not found, CAS conflict, ...).
    #[error("{message} ({name})")]
    Rejected { name: String, message: String },
    /// Anything else on the bus (a timeout, a malformed reply).
    #[error("D-Bus: {0}")]
    Bus(String),
}

fn bus_label(bus: &str) -> String {
    match bus {
        "system" | "session" => format!("{bus} bus"),
        addr => format!("bus at {addr}"),
    }
}

/// Runs one command; returns what to print on stdout.
pub fn run(cmd: &Command, opts: &Options) -> Result<String, CliError> {
    smol::block_on(async {
        let conn = crate::support::bus::builder(&opts.bus)
            .map(|b| b.method_timeout(CALL_TIMEOUT))
            .map_err(|e| not_reachable(&opts.bus, e))?
            .build()
            .await
            .map_err(|e| not_reachable(&opts.bus, e))?;
        let c = Client {
            conn: &conn,
            bus: &opts.bus,
        };
        match cmd {
            Command::Status => status(&c, opts.json).await,
            Command::Services => services(&c, opts.json).await,
            Command::Devices => devices(&c, opts.json).await,
            Command::KvGet { key } => {
                let entry: Dict = c.call(IFACE_KV, "Get", &(key.as_str(),)).await?;
                let j = dict_to_json(&entry);
                Ok(if opts.json {
                    pretty(&j)
                } else {
                    format!("{}\n", j["value"].as_str().unwrap_or_default())
                })
            }
            Command::KvPut { key, value, cas } => {
                let mut options: BTreeMap<&str, zbus::zvariant::Value<'_>> = BTreeMap::new();
                if let Some(cas) = cas {
                    options.insert("cas", (*cas).into());
                }
                let index: u64 = c
                    .call(IFACE_KV, "Put", &(key.as_str(), value.as_str(), options))
                    .await?;
                Ok(if opts.json {
                    pretty(&json!({"key": key, "modify_index": index}))
                } else {
                    format!("{key} set (modify index {index})\n")
                })
            }
            Command::SyncStatus => {
                let s = sync_json(&c).await?;
                Ok(if opts.json {
                    pretty(&s)
                } else {
                    format!("sync: {}\n", sync_line(&s))
                })
            }
            Command::Firmware => firmware(&c, opts.json).await,
            Command::Rollouts => rollouts(&c, opts.json).await,
            Command::Rollout { id } => rollout(&c, id, opts.json).await,
            Command::RolloutStart {
                device_type,
                version,
                wave_size,
            } => {
                let mut spec: BTreeMap<&str, zbus::zvariant::Value<'_>> = BTreeMap::new();
                spec.insert("device_type", device_type.as_str().into());
                spec.insert("version", version.as_str().into());
                if let Some(n) = wave_size {
                    spec.insert("wave_size", (*n).into());
                }
                let r: Dict = c.call(IFACE_FIRMWARE, "StartRollout", &(spec,)).await?;
                let r = dict_to_json(&r);
                Ok(if opts.json {
                    pretty(&r)
                } else {
                    format!("rollout {} started\n", cell(&r["id"]))
                })
            }
            Command::RolloutCommand { verb, id } => {
                let method = match verb.as_str() {
                    "pause" => "PauseRollout",
                    "resume" => "ResumeRollout",
                    _ => "AbortRollout",
                };
                let r: Dict = c.call(IFACE_FIRMWARE, method, &(id.as_str(),)).await?;
                let r = dict_to_json(&r);
                Ok(if opts.json {
                    pretty(&r)
                } else {
                    format!("rollout {id}: {}\n", cell(&r["state"]))
                })
            }
            Command::OtaStatus => {
                let st: Dict = c.call(IFACE_OTA, "GetStatus", &()).await?;
                let j = dict_to_json(&st);
                Ok(if opts.json { pretty(&j) } else { ota_text(&j) })
            }
            Command::OtaInstall { bundle } => {
                let id: String = c.call(IFACE_OTA, "Install", &(bundle.as_str(),)).await?;
                Ok(if opts.json {
                    pretty(&json!({"deployment": id}))
                } else {
                    format!("install {id} started; `konsul-edge ota status` follows it\n")
                })
            }
            Command::OtaMarkGood | Command::OtaMarkBad | Command::OtaReboot => {
                let (method, done) = match cmd {
                    Command::OtaMarkGood => ("MarkGood", "slot committed"),
                    Command::OtaMarkBad => ("MarkBad", "marked bad; rolling back (or cancelled)"),
                    _ => ("Reboot", "reboot requested"),
                };
                c.call::<()>(IFACE_OTA, method, &()).await?;
                Ok(if opts.json {
                    pretty(&json!({"ok": true}))
                } else {
                    format!("{done}\n")
                })
            }
            Command::SyncNow => {
                c.call::<()>(IFACE_SYNC, "SyncNow", &()).await?;
                Ok(if opts.json {
                    pretty(&json!({"requested": true}))
                } else {
                    "sync requested; `konsul-edge sync status` shows the result\n".into()
                })
            }
        }
    })
}

fn not_reachable(bus: &str, e: zbus::Error) -> CliError {
    CliError::NotRunning(format!(
        "cannot connect to the D-Bus {}: {e}; is dbus running? (pick another with --bus or KONSUL_DBUS_BUS)",
        bus_label(bus)
    ))
}

struct Client<'a> {
    conn: &'a zbus::Connection,
    bus: &'a str,
}

impl Client<'_> {
    async fn call<R: DeserializeOwned + Type>(
        &self,
        iface: &str,
        method: &str,
        body: &(impl Serialize + DynamicType),
    ) -> Result<R, CliError> {
        let reply = self
            .conn
            .call_method(Some(NAME), PATH, Some(iface), method, body)
            .await
            .map_err(|e| self.classify(e))?;
        reply
            .body()
            .deserialize::<R>()
            .map_err(|e| CliError::Bus(format!("{iface}.{method}: unexpected reply: {e}")))
    }

    async fn property(&self, iface: &str, name: &str) -> Result<Json, CliError> {
        let v: zbus::zvariant::OwnedValue = self
            .call("org.freedesktop.DBus.Properties", "Get", &(iface, name))
            .await?;
        Ok(crate::dbus::convert::to_json(&v))
    }

    fn classify(&self, e: zbus::Error) -> CliError {
        let zbus::Error::MethodError(name, message, _) = &e else {
            return CliError::Bus(e.to_string());
        };
        let message = message.clone().unwrap_or_default();
        let name = name.as_str();
        let not_running = matches!(
            name,
            "org.freedesktop.DBus.Error.ServiceUnknown"
                | "org.freedesktop.DBus.Error.NameHasNoOwner"
                | "org.freedesktop.systemd1.NoSuchUnit"
                | "org.freedesktop.systemd1.UnitMasked"
        ) || name.starts_with("org.freedesktop.DBus.Error.Spawn.");
        if not_running {
            return CliError::NotRunning(format!(
                "konsul-edge is not running: nothing owns {NAME} on the {} ({message}); \
                 start it with `systemctl start konsul-edge`",
                bus_label(self.bus)
            ));
        }
        if name == "io.konsul.Edge1.Error.AccessDenied"
            || name == "org.freedesktop.DBus.Error.AccessDenied"
        {
            return CliError::Denied(format!(
                "permission denied: {message}; run as root or as a member of group konsul, \
                 or ask for rights in the daemon's acl configuration"
            ));
        }
        CliError::Rejected {
            name: name.to_owned(),
            message,
        }
    }
}

/// `ota status` for people: one line per fact, then the recent log.
fn ota_text(j: &Json) -> String {
    let s = |k: &str| j[k].as_str().unwrap_or_default().to_owned();
    let mut out = String::new();
    let _ = writeln!(out, "backend:     {}", s("backend"));
    let _ = writeln!(out, "state:       {}", s("state"));
    let _ = writeln!(out, "booted slot: {}", s("booted_slot"));
    if !s("id").is_empty() {
        let _ = writeln!(
            out,
            "deployment:  {} {} ({} -> {})",
            s("id"),
            s("version"),
            s("from_slot"),
            s("target_slot")
        );
    }
    if !s("rollout").is_empty() {
        let _ = writeln!(out, "rollout:     {} (from the hub)", s("rollout"));
    }
    if !s("source").is_empty() {
        let _ = writeln!(out, "source:      {}", s("source"));
    }
    if !s("phase").is_empty() {
        let _ = writeln!(out, "progress:    {}% {}", j["progress"], s("phase"));
    }
    if !s("last_error").is_empty() {
        let _ = writeln!(out, "last error:  {}", s("last_error"));
    }
    if let Some(h) = j.get("hawkbit").filter(|h| h.is_object()) {
        let hs = |k: &str| h[k].as_str().unwrap_or_default().to_owned();
        let _ = writeln!(
            out,
            "hawkbit:     {} as {}",
            hs("server"),
            hs("controller_id")
        );
        if !hs("action").is_empty() {
            let _ = writeln!(
                out,
                "  action:    {} ({})",
                hs("action"),
                hs("action_phase")
            );
        }
        let _ = writeln!(
            out,
            "  polls:     {} ({} failed), feedback sent {}, pending {}",
            h["polls"], h["poll_errors"], h["feedback_sent"], h["feedback_pending"]
        );
        if !hs("last_error").is_empty() {
            let _ = writeln!(out, "  error:     {}", hs("last_error"));
        }
    }
    for l in j["log"].as_array().into_iter().flatten() {
        let at = l["at_ms"].as_u64().unwrap_or(0);
        let _ = writeln!(
            out,
            "  {} {:<22} {}",
            crate::clock::rfc3339(at),
            l["state"].as_str().unwrap_or_default(),
            l["message"].as_str().unwrap_or_default()
        );
    }
    out
}

fn pretty(j: &Json) -> String {
    let mut s = serde_json::to_string_pretty(j).unwrap_or_default();
    s.push('\n');
    s
}

async fn sync_json(c: &Client<'_>) -> Result<Json, CliError> {
    let all: Dict = c
        .call("org.freedesktop.DBus.Properties", "GetAll", &(IFACE_SYNC,))
        .await?;
    let p = dict_to_json(&all);
    let last_sync = p["LastSync"].as_u64().filter(|ms| *ms > 0);
    let last_error = p["LastError"].as_str().filter(|e| !e.is_empty());
    Ok(json!({
        "enabled": p["Enabled"],
        "online": p["Online"],
        "last_sync_ms": last_sync,
        "pending_changes": p["PendingChanges"],
        "last_error": last_error,
        "batch_bytes": p["BatchBytes"],
        "link_rate_bytes_per_sec": p["LinkRate"],
        "data_budget": (p["DataBudget"].as_u64().unwrap_or(0) > 0).then(|| json!({
            "limit": p["DataBudget"],
            "used": p["DataBudgetUsed"],
            "remaining": p["DataBudgetRemaining"],
        })),
    }))
}

fn sync_line(s: &Json) -> String {
    let pending = s["pending_changes"].as_u64().unwrap_or(0);
    if s["enabled"] != json!(true) {
        return format!("standalone (no hub configured), {pending} changes pending");
    }
    let last = s["last_sync_ms"]
        .as_u64()
        .map_or_else(|| "never".to_owned(), crate::clock::rfc3339);
    let mut line = format!(
        "{}, last sync {last}, {pending} changes pending",
        if s["online"] == json!(true) {
            "online"
        } else {
            "offline"
        }
    );
    if let Some(b) = s["data_budget"].as_object() {
        let _ = write!(
            line,
            ", data budget {} of {} bytes used",
            b["used"].as_u64().unwrap_or(0),
            b["limit"].as_u64().unwrap_or(0)
        );
    }
    if let Some(e) = s["last_error"].as_str() {
        let _ = write!(line, ", last error: {e}");
    }
    line
}

async fn status(c: &Client<'_>, as_json: bool) -> Result<String, CliError> {
    let st: Dict = c.call(IFACE_REGISTRY, "Status", &()).await?;
    let mut st = dict_to_json(&st);
    let sync = sync_json(c).await?;
    let ota = c.property(IFACE_OTA, "State").await?;
    if as_json {
        // Older daemons' Status lacks sync and ota; newer ones carry the
        // same fields as GET /v1/edge/status.
        if let Some(map) = st.as_object_mut() {
            map.entry("sync").or_insert(sync);
            map.entry("ota").or_insert(json!({ "state": ota }));
        }
        return Ok(pretty(&st));
    }
    let n = |k: &str| st[k].as_u64().unwrap_or(0);
    let s = |k: &str| st[k].as_str().unwrap_or("?").to_owned();
    Ok(format!(
        "konsul-edge {} on node {}, up {}\n\
         registry: {} services, {} keys, {} devices, {} alerts (modify index {})\n\
         storage:  {} KiB of {} KiB\n\
         sync:     {}\n\
         ota:      {}\n",
        s("version"),
        s("node_id"),
        human_duration(n("uptime_seconds")),
        n("services"),
        n("keys"),
        n("devices"),
        n("alerts"),
        n("modify_index"),
        n("db_bytes") / 1024,
        n("db_max_bytes") / 1024,
        sync_line(&sync),
        ota.as_str().unwrap_or("?"),
    ))
}

fn human_duration(secs: u64) -> String {
    match secs {
        s if s < 60 => format!("{s}s"),
        s if s < 3600 => format!("{}m{}s", s / 60, s % 60),
        s if s < 86_400 => format!("{}h{}m", s / 3600, (s % 3600) / 60),
        s => format!("{}d{}h", s / 86_400, (s % 86_400) / 3600),
    }
}

async fn list(c: &Client<'_>, iface: &str, method: &str) -> Result<Vec<Json>, CliError> {
    let items: Vec<Dict> = c.call(iface, method, &()).await?;
    let mut items: Vec<Json> = items.iter().map(dict_to_json).collect();
    items.sort_by(|a, b| a["id"].as_str().cmp(&b["id"].as_str()));
    Ok(items)
}

async fn services(c: &Client<'_>, as_json: bool) -> Result<String, CliError> {
    let items = list(c, IFACE_REGISTRY, "ListServices").await?;
    if as_json {
        return Ok(pretty(&Json::Array(items)));
    }
    let rows = items
        .iter()
        .map(|s| {
            vec![
                cell(&s["id"]),
                cell(&s["name"]),
                cell(&s["address"]),
                cell(&s["port"]),
                cell(&s["health"]),
                s["tags"]
                    .as_array()
                    .map(|t| t.iter().map(cell).collect::<Vec<_>>().join(","))
                    .filter(|t| !t.is_empty())
                    .unwrap_or_else(|| "-".into()),
            ]
        })
        .collect::<Vec<_>>();
    Ok(table(
        &["ID", "NAME", "ADDRESS", "PORT", "HEALTH", "TAGS"],
        &rows,
        "no services registered",
    ))
}

async fn devices(c: &Client<'_>, as_json: bool) -> Result<String, CliError> {
    let devices = list(c, IFACE_DEVICES, "ListDevices").await?;
    let alerts = list(c, IFACE_DEVICES, "ListAlerts").await?;
    if as_json {
        return Ok(pretty(&json!({"devices": devices, "alerts": alerts})));
    }
    // The device schema belongs to the MQTT bridge; show the common fields
    // when present and leave the rest to --json.
    let rows = devices
        .iter()
        .map(|d| {
            ["id", "type", "name", "health", "firmware_version"]
                .iter()
                .map(|k| cell(&d[*k]))
                .collect()
        })
        .collect::<Vec<_>>();
    let mut out = table(
        &["ID", "TYPE", "NAME", "HEALTH", "FIRMWARE"],
        &rows,
        "no devices registered",
    );
    if !alerts.is_empty() {
        let _ = writeln!(out, "\n{} alerts (see --json)", alerts.len());
    }
    Ok(out)
}

async fn firmware(c: &Client<'_>, as_json: bool) -> Result<String, CliError> {
    let items: Vec<Dict> = c.call(IFACE_FIRMWARE, "ListArtifacts", &()).await?;
    let items: Vec<Json> = items.iter().map(dict_to_json).collect();
    if as_json {
        return Ok(pretty(&Json::Array(items)));
    }
    let rows = items
        .iter()
        .map(|a| {
            vec![
                cell(&a["device_type"]),
                cell(&a["version"]),
                cell(&a["size"]),
                a["sha256"]
                    .as_str()
                    .unwrap_or("-")
                    .chars()
                    .take(16)
                    .collect(),
            ]
        })
        .collect::<Vec<_>>();
    Ok(table(
        &["TYPE", "VERSION", "SIZE", "SHA256"],
        &rows,
        "no firmware stored",
    ))
}

async fn rollouts(c: &Client<'_>, as_json: bool) -> Result<String, CliError> {
    let items: Vec<Dict> = c.call(IFACE_FIRMWARE, "ListRollouts", &()).await?;
    let items: Vec<Json> = items.iter().map(dict_to_json).collect();
    if as_json {
        return Ok(pretty(&Json::Array(items)));
    }
    let rows = items
        .iter()
        .map(|r| {
            let counts = r["counts"]
                .as_object()
                .map(|m| {
                    m.iter()
                        .map(|(k, v)| format!("{k}={}", cell(v)))
                        .collect::<Vec<_>>()
                        .join(",")
                })
                .filter(|s| !s.is_empty())
                .unwrap_or_else(|| "-".into());
            vec![
                cell(&r["id"]),
                cell(&r["device_type"]),
                cell(&r["version"]),
                cell(&r["state"]),
                counts,
            ]
        })
        .collect::<Vec<_>>();
    Ok(table(
        &["ID", "TYPE", "VERSION", "STATE", "DEVICES"],
        &rows,
        "no rollouts",
    ))
}

async fn rollout(c: &Client<'_>, id: &str, as_json: bool) -> Result<String, CliError> {
    let (r, devices): (Dict, Vec<Dict>) = c.call(IFACE_FIRMWARE, "GetRollout", &(id,)).await?;
    let r = dict_to_json(&r);
    let devices: Vec<Json> = devices.iter().map(dict_to_json).collect();
    if as_json {
        return Ok(pretty(&json!({"rollout": r, "devices": devices})));
    }
    let mut out = format!(
        "rollout {}: {} {} {} ({})\n\n",
        cell(&r["id"]),
        cell(&r["device_type"]),
        cell(&r["version"]),
        cell(&r["state"]),
        cell(&r["reason"])
    );
    // A hub rollout at the hub: each edge's own execution.
    if let Some(edges) = r["edges"].as_array().filter(|e| !e.is_empty()) {
        let rows = edges
            .iter()
            .map(|e| {
                ["edge", "state", "targets", "reason"]
                    .iter()
                    .map(|k| cell(&e[*k]))
                    .collect()
            })
            .collect::<Vec<_>>();
        out.push_str(&table(&["EDGE", "STATE", "TARGETS", "REASON"], &rows, ""));
        out.push('\n');
    }
    let rows = devices
        .iter()
        .map(|d| {
            ["device", "wave", "state", "attempts", "progress", "error"]
                .iter()
                .map(|k| cell(&d[*k]))
                .collect()
        })
        .collect::<Vec<_>>();
    out.push_str(&table(
        &["DEVICE", "WAVE", "STATE", "ATTEMPTS", "PROGRESS", "ERROR"],
        &rows,
        "no target devices",
    ));
    Ok(out)
}

fn cell(v: &Json) -> String {
    match v {
        Json::Null => "-".into(),
        Json::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// Left-aligned columns, two spaces apart.
fn table(headers: &[&str], rows: &[Vec<String>], empty: &str) -> String {
    if rows.is_empty() {
        return format!("{empty}\n");
    }
    let mut widths: Vec<usize> = headers.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (w, c) in widths.iter_mut().zip(row) {
            *w = (*w).max(c.chars().count());
        }
    }
    let mut out = String::new();
    let mut line = |cells: &mut dyn Iterator<Item = &str>| {
        let mut l = String::new();
        for (c, w) in cells.zip(&widths) {
            let _ = write!(l, "{c:<w$}  ");
        }
        out.push_str(l.trim_end());
        out.push('\n');
    };
    line(&mut headers.iter().copied());
    for row in rows {
        line(&mut row.iter().map(String::as_str));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_align_and_say_when_empty() {
        let t = table(
            &["ID", "PORT"],
            &[
                vec!["web".into(), "80".into()],
                vec!["a".into(), "8080".into()],
            ],
            "none",
        );
        assert_eq!(t, "ID   PORT\nweb  80\na    8080\n");
        assert_eq!(table(&["ID"], &[], "none"), "none\n");
    }

    #[test]
    fn sync_lines() {
        let s = json!({"enabled": false, "pending_changes": 3});
        assert_eq!(
            sync_line(&s),
            "standalone (no hub configured), 3 changes pending"
        );
        let s = json!({"enabled": true, "online": false, "last_sync_ms": null,
                       "pending_changes": 0, "last_error": "refused"});
        assert_eq!(
            sync_line(&s),
            "offline, last sync never, 0 changes pending, last error: refused"
        );
        assert_eq!(human_duration(3725), "1h2m");
    }
}
