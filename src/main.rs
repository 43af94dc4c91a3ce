//! `konsul-edge`: arguments, logging, config, exit codes. Nothing else.
//!
//! Exit codes follow sysexits(3) so a unit can say which failures a restart
//! cannot fix (`RestartPreventExitStatus=64 65 78`).

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use konsul_edge::cli;
use konsul_edge::config::{Config, ConfigError, LogLevel};
use konsul_edge::daemon::{self, DaemonError};
use konsul_edge::store::StoreError;

const EX_USAGE: u8 = 64;
const EX_DATAERR: u8 = 65;
const EX_UNAVAILABLE: u8 = 69;
const EX_SOFTWARE: u8 = 70;
const EX_CANTCREAT: u8 = 73;
const EX_NOPERM: u8 = 77;
const EX_IOERR: u8 = 74;
const EX_TEMPFAIL: u8 = 75;
const EX_CONFIG: u8 = 78;

const USAGE: &str = "\
konsul-edge: the edge node of a Konsul deployment

USAGE:
    konsul-edge run --config FILE           run the daemon
    konsul-edge hub --config FILE           run as a sync hub (mode: hub)
    konsul-edge check-config FILE           validate FILE (+ config.d/, KONSUL_* env)
    konsul-edge init --cloud-address URL --mqtt-broker URL [--node-id ID]
                     [--output FILE] [--force]
                                            write a commented config
                                            (default /etc/konsul-edge/edge.yaml; - for stdout;
                                            node id default: this host's name;
                                            --node-id '' leaves it to each start)
    konsul-edge systemd-dropin --config FILE [--output FILE]
                                            write the unit drop-in that binds
                                            resources.memory_limit and cpu_limit
                                            (MemoryMax, MemoryHigh, CPUQuota; default
                                            /etc/systemd/system/konsul-edge.service.d/
                                            50-resources.conf; - for stdout)
    konsul-edge selftest --data-dir DIR     open a store in DIR, write, read back
    konsul-edge repair-clock --config FILE | --data-dir DIR
                                            with the daemon stopped: reset a clock
                                            that was carried into the future
                                            (DIR: the directory of konsul.db)
    konsul-edge --version | --help

  Talking to the running daemon over D-Bus (options: --json, --bus BUS):
    konsul-edge status                      node, registry, storage, sync, OTA
    konsul-edge services                    registered services and their health
    konsul-edge devices                     MQTT devices and alerts
    konsul-edge kv get KEY
    konsul-edge kv put KEY VALUE [--cas N]  needs root or group konsul
    konsul-edge sync status
    konsul-edge sync now                    needs root or group konsul
    konsul-edge firmware                    firmware artifacts stored on this node
    konsul-edge rollouts                    firmware rollouts and their progress
    konsul-edge rollout show ID             one rollout, device by device
    konsul-edge rollout start TYPE VERSION [--wave-size N]
    konsul-edge rollout pause|resume|abort ID
                                            (start/pause/resume/abort need root
                                            or group konsul)
    konsul-edge ota status                  A/B update state, slots, recent log
    konsul-edge ota install BUNDLE          needs root or group konsul (as below)
    konsul-edge ota mark-good | mark-bad    commit the new slot / roll back (or cancel)
    konsul-edge ota reboot                  reboot into the update now
    BUS is system (default), session or a D-Bus address; exit 69 when the
    daemon is not running, 77 when refused.

ENVIRONMENT:
    KONSUL_LOG=debug, KONSUL_MODE, KONSUL_CLOUD_ADDRESS, KONSUL_MQTT_ENABLED,
    KONSUL_<SECTION>_<KEY> (e.g. KONSUL_HTTP_LISTEN=127.0.0.1:8600),
    KONSUL_DBUS_BUS (the bus the CLI commands use when --bus is not given)
";

enum Command {
    Run {
        config: PathBuf,
        hub: bool,
    },
    CheckConfig {
        config: PathBuf,
    },
    Init {
        cloud_address: String,
        mqtt_broker: String,
        node_id: Option<String>,
        output: PathBuf,
        force: bool,
    },
    SelfTest {
        dir: PathBuf,
    },
    SystemdDropin {
        config: PathBuf,
        output: PathBuf,
    },
    RepairClock {
        config: Option<PathBuf>,
        dir: Option<PathBuf>,
    },
    Client {
        cmd: cli::Command,
        opts: cli::Options,
    },
    Version,
    Help,
}

fn parse_args() -> Result<Command, lexopt::Error> {
    use lexopt::prelude::*;
    let mut p = lexopt::Parser::from_env();
    let sub = match p.next()? {
        None => return Ok(Command::Help),
        Some(Long("version") | Short('V')) => return Ok(Command::Version),
        Some(Long("help") | Short('h')) => return Ok(Command::Help),
        Some(Value(v)) => v.string()?,
        Some(other) => return Err(other.unexpected()),
    };
    if matches!(
        sub.as_str(),
        "status"
            | "services"
            | "devices"
            | "kv"
            | "sync"
            | "firmware"
            | "rollout"
            | "rollouts"
            | "ota"
    ) {
        return parse_client(&sub, p);
    }
    let mut config: Option<PathBuf> = None;
    let mut cloud_address: Option<String> = None;
    let mut mqtt_broker: Option<String> = None;
    let mut node_id = None;
    let mut output = PathBuf::from("/etc/konsul-edge/edge.yaml");
    let mut force = false;
    let mut dir: Option<PathBuf> = None;
    let mut dropin: Option<PathBuf> = None;
    while let Some(arg) = p.next()? {
        match (sub.as_str(), arg) {
            (_, Long("help") | Short('h')) => return Ok(Command::Help),
            ("run" | "hub", Long("config") | Short('c')) => config = Some(p.value()?.into()),
            ("check-config", Value(v)) if config.is_none() => config = Some(v.into()),
            ("check-config", Long("config") | Short('c')) => config = Some(p.value()?.into()),
            ("init", Long("cloud-address")) => cloud_address = Some(p.value()?.string()?),
            ("init", Long("mqtt-broker")) => mqtt_broker = Some(p.value()?.string()?),
            ("init", Long("node-id")) => node_id = Some(p.value()?.string()?),
            ("init", Long("output") | Short('o')) => output = p.value()?.into(),
            ("systemd-dropin", Long("config") | Short('c')) => config = Some(p.value()?.into()),
            ("systemd-dropin", Long("output") | Short('o')) => dropin = Some(p.value()?.into()),
            ("init", Long("force")) => force = true,
            ("selftest" | "repair-clock", Long("data-dir")) => dir = Some(p.value()?.into()),
            ("repair-clock", Long("config") | Short('c')) => config = Some(p.value()?.into()),
            (_, other) => return Err(other.unexpected()),
        }
    }
    let missing = |what: &str| lexopt::Error::from(format!("{sub}: missing {what}"));
    Ok(match sub.as_str() {
        "run" | "hub" => Command::Run {
            config: config.ok_or_else(|| missing("--config FILE"))?,
            hub: sub == "hub",
        },
        "check-config" => Command::CheckConfig {
            config: config.ok_or_else(|| missing("FILE"))?,
        },
        "init" => Command::Init {
            cloud_address: cloud_address.ok_or_else(|| missing("--cloud-address URL"))?,
            mqtt_broker: mqtt_broker.ok_or_else(|| missing("--mqtt-broker URL"))?,
            node_id,
            output,
            force,
        },
        "systemd-dropin" => Command::SystemdDropin {
            config: config.ok_or_else(|| missing("--config FILE"))?,
            output: dropin.unwrap_or_else(|| PathBuf::from(DROPIN)),
        },
        "selftest" => Command::SelfTest {
            dir: dir.ok_or_else(|| missing("--data-dir DIR"))?,
        },
        "repair-clock" if config.is_some() == dir.is_some() => {
            return Err(missing("--config FILE or --data-dir DIR (one of them)"))
        }
        "repair-clock" => Command::RepairClock { config, dir },
        other => return Err(format!("unknown command `{other}`").into()),
    })
}

/// `status | services | devices | kv get/put | sync status/now`, with
/// `--json`, `--bus BUS` and `--cas N` anywhere after the command.
fn parse_client(sub: &str, mut p: lexopt::Parser) -> Result<Command, lexopt::Error> {
    use lexopt::prelude::*;
    let mut words: Vec<String> = Vec::new();
    let mut json = false;
    let mut bus = std::env::var("KONSUL_DBUS_BUS").unwrap_or_else(|_| "system".into());
    let mut cas = None;
    let mut wave_size: Option<u32> = None;
    while let Some(arg) = p.next()? {
        match arg {
            Long("help") | Short('h') => return Ok(Command::Help),
            Long("json") => json = true,
            Long("bus") => bus = p.value()?.string()?,
            Long("cas") if sub == "kv" => cas = Some(p.value()?.parse()?),
            Long("wave-size") if sub == "rollout" => wave_size = Some(p.value()?.parse()?),
            Value(v) => words.push(v.string()?),
            other => return Err(other.unexpected()),
        }
    }
    let words: Vec<&str> = words.iter().map(String::as_str).collect();
    let cmd = match (sub, words.as_slice()) {
        ("status", []) => cli::Command::Status,
        ("services", []) => cli::Command::Services,
        ("devices", []) => cli::Command::Devices,
        ("kv", ["get", key]) => cli::Command::KvGet {
            key: key.to_string(),
        },
        ("kv", ["put", key, value]) => cli::Command::KvPut {
            key: key.to_string(),
            value: value.to_string(),
            cas,
        },
        ("sync", ["status"] | []) => cli::Command::SyncStatus,
        ("sync", ["now"]) => cli::Command::SyncNow,
        ("firmware", []) => cli::Command::Firmware,
        ("rollouts", []) | ("rollout", ["list"]) => cli::Command::Rollouts,
        ("rollout", ["show", id]) => cli::Command::Rollout { id: id.to_string() },
        ("rollout", ["start", device_type, version]) => cli::Command::RolloutStart {
            device_type: device_type.to_string(),
            version: version.to_string(),
            wave_size,
        },
        ("rollout", [verb @ ("pause" | "resume" | "abort"), id]) => cli::Command::RolloutCommand {
            verb: verb.to_string(),
            id: id.to_string(),
        },
        ("rollout", _) => {
            return Err(
                "usage: rollout show ID | rollout start TYPE VERSION [--wave-size N] | rollout pause|resume|abort ID"
                    .into(),
            )
        }
        ("kv", _) => return Err("usage: kv get KEY | kv put KEY VALUE [--cas N]".into()),
        ("sync", _) => return Err("usage: sync status | sync now".into()),
        ("ota", ["status"] | []) => cli::Command::OtaStatus,
        ("ota", ["install", bundle]) => cli::Command::OtaInstall {
            // The daemon reads the file: hand it an absolute path.
            bundle: std::path::absolute(bundle)
                .map_err(|e| format!("{bundle}: {e}"))?
                .display()
                .to_string(),
        },
        ("ota", ["mark-good"]) => cli::Command::OtaMarkGood,
        ("ota", ["mark-bad"]) => cli::Command::OtaMarkBad,
        ("ota", ["reboot"]) => cli::Command::OtaReboot,
        ("ota", _) => return Err(
            "usage: ota status | ota install BUNDLE | ota mark-good | ota mark-bad | ota reboot"
                .into(),
        ),
        (_, extra) => {
            return Err(format!("{sub}: unexpected argument `{}`", extra.join(" ")).into())
        }
    };
    Ok(Command::Client {
        cmd,
        opts: cli::Options { bus, json },
    })
}

fn main() -> ExitCode {
    let started = Instant::now();
    let early_level = std::env::var("KONSUL_LOG")
        .ok()
        .and_then(|l| l.parse::<LogLevel>().ok())
        .unwrap_or_default();
    konsul_edge::logging::init(early_level.to_filter());
    let cmd = match parse_args() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("konsul-edge: {e}\n\n{USAGE}");
            return ExitCode::from(EX_USAGE);
        }
    };
    match cmd {
        Command::Help => {
            print!("{USAGE}");
            ExitCode::SUCCESS
        }
        Command::Version => {
            println!("konsul-edge {}", env!("CARGO_PKG_VERSION"));
            ExitCode::SUCCESS
        }
        Command::CheckConfig { config } => match Config::load(&config) {
            Ok((c, sources)) => {
                // What `run` refuses after the file parsed: token files
                // others can read, short tokens, bad policy files.
                if let Err(e) = daemon::check_access(&c) {
                    return daemon_failure(e);
                }
                for name in &sources.ignored_env {
                    eprintln!("warning: {name} names no configuration key; ignored");
                }
                println!(
                    "{}: OK\n  files: {}\n  environment: {}\n  mode {}, node {}, storage {} (max {}), API {}, mqtt {}, sync {}",
                    config.display(),
                    sources.files.iter().map(|f| f.display().to_string()).collect::<Vec<_>>().join(", "),
                    if sources.env.is_empty() { "none".into() } else { sources.env.join(", ") },
                    format!("{:?}", c.mode).to_lowercase(),
                    c.node_id(),
                    c.storage.path.display(),
                    c.storage.max_size,
                    c.http.listen,
                    if c.mqtt.enabled { c.mqtt.broker.as_str() } else { "disabled" },
                    if c.cloud.server_address.is_empty() { "standalone" } else { c.cloud.server_address.as_str() },
                );
                ExitCode::SUCCESS
            }
            Err(e) => config_failure(e),
        },
        Command::Init {
            cloud_address,
            mqtt_broker,
            node_id,
            output,
            force,
        } => init(&cloud_address, &mqtt_broker, node_id, &output, force),
        Command::Client { cmd, opts } => match cli::run(&cmd, &opts) {
            Ok(out) => {
                print!("{out}");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("konsul-edge: {e}");
                ExitCode::from(match e {
                    cli::CliError::NotRunning(_) => EX_UNAVAILABLE,
                    cli::CliError::Denied(_) => EX_NOPERM,
                    // Not found, CAS conflict, invalid input: the answer
                    // is "no", as grep's 1 for "no match".
                    cli::CliError::Rejected { .. } => 1,
                    cli::CliError::Bus(_) => EX_UNAVAILABLE,
                })
            }
        },
        Command::SystemdDropin { config, output } => systemd_dropin(&config, &output),
        Command::SelfTest { dir } => match daemon::selftest(&dir) {
            Ok(msg) => {
                println!("{msg}");
                ExitCode::SUCCESS
            }
            Err(e) => daemon_failure(e),
        },
        Command::RepairClock { config, dir } => repair_clock(config, dir),
        Command::Run { config, hub } => {
            let (mut config, sources) = match Config::load(&config) {
                Ok(c) => c,
                Err(e) => return config_failure(e),
            };
            if hub {
                config.mode = konsul_edge::config::Mode::Hub;
            }
            log::set_max_level(config.log_level.to_filter());
            for name in &sources.ignored_env {
                log::warn!("{name} names no configuration key; ignored");
            }
            match daemon::run(config, started) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => daemon_failure(e),
            }
        }
    }
}

fn config_failure(e: ConfigError) -> ExitCode {
    log::error!("configuration error: {e}");
    ExitCode::from(match e {
        ConfigError::Read { .. }
        | ConfigError::Refused { .. }
        | ConfigError::Parse { .. }
        | ConfigError::Invalid { .. } => EX_CONFIG,
    })
}

fn daemon_failure(e: DaemonError) -> ExitCode {
    log::error!("{e}");
    let code = match &e {
        DaemonError::Store(s) => match s {
            // Distinct messages (a wrong path vs a damaged file), one
            // code: a restart fixes neither.
            StoreError::NotKonsul { .. }
            | StoreError::Corrupt { .. }
            | StoreError::NewerSchema { .. }
            | StoreError::BadRecord { .. } => EX_DATAERR,
            StoreError::CreateDir { .. } => EX_CANTCREAT,
            StoreError::Open { .. }
            | StoreError::LimitReached { .. }
            | StoreError::DiskFull { .. }
            | StoreError::Sqlite { .. } => EX_IOERR,
            StoreError::Closed => EX_SOFTWARE,
        },
        DaemonError::Http(_) => EX_UNAVAILABLE,
        DaemonError::Signals(_) => EX_SOFTWARE,
        // Unreadable TLS material or token files: the config points at them.
        DaemonError::Sync(_) | DaemonError::Tls(_) | DaemonError::ReadFile { .. } => EX_CONFIG,
        DaemonError::SelfTest(_) => EX_SOFTWARE,
        // Not in RestartPreventExitStatus: systemd restarts the daemon.
        DaemonError::Fault(_) => EX_SOFTWARE,
        DaemonError::Mqtt(_) | DaemonError::Sparkplug(_) => EX_CONFIG,
        // An unreadable token or CA file, or a build without the client.
        DaemonError::Hawkbit(_) => EX_CONFIG,
        // No bus, or the name is taken: a restart later may succeed.
        DaemonError::Dbus(_) => EX_UNAVAILABLE,
        // The firmware directory cannot be created or read.
        DaemonError::Firmware(_) => EX_CANTCREAT,
        // Unreadable signing keys or work directory: the config points at
        // them; a store fault while loading the OTA state is I/O.
        DaemonError::Ota(konsul_edge::ota::OtaError::Store(_)) => EX_IOERR,
        DaemonError::Ota(_) => EX_CONFIG,
        DaemonError::Acl(_) => EX_CONFIG,
    };
    ExitCode::from(code)
}

fn repair_clock(config: Option<PathBuf>, dir: Option<PathBuf>) -> ExitCode {
    use konsul_edge::sync::repair::RepairError;
    let db = match (config, dir) {
        (Some(c), _) => match Config::load(&c) {
            Ok((c, _)) => c.storage.path,
            Err(e) => return config_failure(e),
        },
        (None, Some(d)) => d.join("konsul.db"),
        (None, None) => return ExitCode::from(EX_USAGE),
    };
    match konsul_edge::sync::repair::repair_clock(&db) {
        Ok(report) => {
            print!("{report}");
            ExitCode::SUCCESS
        }
        Err(RepairError::Store(e)) => daemon_failure(DaemonError::Store(e)),
        Err(e) => {
            log::error!("{e}");
            ExitCode::from(EX_TEMPFAIL)
        }
    }
}

fn init(
    cloud: &str,
    broker: &str,
    node_id: Option<String>,
    output: &std::path::Path,
    force: bool,
) -> ExitCode {
    // No --node-id pins this host's name now; `--node-id ''` leaves it
    // unset (the host name at each start), for configs built elsewhere,
    // such as the one the Debian package ships.
    let node_id = match node_id {
        Some(id) if id.is_empty() => None,
        Some(id) => Some(id),
        None => Some(Config::default().node_id()),
    };
    let text = konsul_edge::config::render_init(cloud, broker, node_id.as_deref());
    // Refuse to write what we would refuse to run.
    if let Err(e) = Config::from_yaml(&text, "generated config") {
        return config_failure(e);
    }
    if output.as_os_str() == "-" {
        print!("{text}");
        return ExitCode::SUCCESS;
    }
    if output.exists() && !force {
        log::error!("{} exists; pass --force to overwrite it", output.display());
        return ExitCode::from(EX_CANTCREAT);
    }
    match write_atomically(output, text.as_bytes()) {
        Ok(()) => {
            println!(
                "wrote {}; check it with `konsul-edge check-config {0}`, then bind its \
                 resources limits with `konsul-edge systemd-dropin --config {0}` and \
                 `systemctl daemon-reload`",
                output.display()
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            log::error!("{}: {e}", output.display());
            ExitCode::from(EX_CANTCREAT)
        }
    }
}

/// Where `systemd-dropin` writes by default.
const DROPIN: &str = "/etc/systemd/system/konsul-edge.service.d/50-resources.conf";

/// Writes the drop-in with MemoryMax/MemoryHigh/CPUQuota from the loaded
/// config (file, drop-ins and environment, as the daemon would see them).
fn systemd_dropin(config: &std::path::Path, output: &std::path::Path) -> ExitCode {
    let c = match Config::load(config) {
        Ok((c, _)) => c,
        Err(e) => return config_failure(e),
    };
    let text = konsul_edge::limits::cgroup::render_dropin(&c.resources, config);
    if output.as_os_str() == "-" {
        print!("{text}");
        return ExitCode::SUCCESS;
    }
    match write_atomically(output, text.as_bytes()) {
        Ok(()) => {
            println!(
                "wrote {}; run `systemctl daemon-reload` and restart konsul-edge",
                output.display()
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            log::error!("{}: {e}", output.display());
            ExitCode::from(EX_CANTCREAT)
        }
    }
}

/// Temp file, fsync, rename: a power cut leaves the old file or the new one.
fn write_atomically(path: &std::path::Path, data: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)?;
    }
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    let mut f = std::fs::File::create(&tmp)?;
    f.write_all(data)?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)
}
