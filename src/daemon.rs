//! Wires the actors together, runs them on one smol executor and shuts
//! them down in order.
//!
//! Start-up order is what makes READY=1 honest: the store is opened,
//! checked and migrated, the HTTP socket is bound, signal handlers are
//! installed, and only then does systemd hear READY. Shutdown reverses it:
//! STOPPING=1, stop accepting, let open requests finish (bounded), then
//! close the store, which drains queued writes and checkpoints the WAL.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_signal::{Signal, Signals};
use smol::stream::StreamExt;

use crate::app::App;
use crate::config::{Config, Mode};
use crate::devices::Devices;
use crate::http::{HttpError, Server};
use crate::metrics::Metrics;
use crate::registry::{Limits, Registry, ServiceInput};
use crate::store::{Store, StoreError, StoreOptions};
use crate::support::Shutdown;

/// How long open HTTP requests get to finish at shutdown.
const DRAIN: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Http(#[from] HttpError),
    #[error("cannot install signal handlers: {0}")]
    Signals(std::io::Error),
    #[error("sync: {0}")]
    Sync(#[from] crate::sync::client::ClientError),
    #[error("http TLS: {0}")]
    Tls(#[from] crate::sync::TransportError),
    #[error("{path}: {source}")]
    ReadFile {
        path: String,
        source: std::io::Error,
    },
    #[error("selftest: {0}")]
    SelfTest(String),
    #[error(transparent)]
    Mqtt(#[from] crate::mqtt::MqttError),
    #[error(transparent)]
    Dbus(Box<crate::dbus::DbusError>),
    #[error("{0}")]
    Sparkplug(String),
    #[error("firmware: {0}")]
    Firmware(#[from] crate::firmware::FirmwareError),
    #[error("ota: {0}")]
    Ota(#[from] crate::ota::OtaError),
    #[error("{0}")]
    Hawkbit(String),
    #[error(transparent)]
    Acl(#[from] crate::acl::AclError),
    /// Something inside the daemon broke while it ran.
    #[error("internal fault: {0}")]
    Fault(String),
}

fn firmware_settings(
    config: &Config,
    api_url: &str,
) -> Result<crate::firmware::Settings, crate::firmware::FirmwareError> {
    let s = crate::firmware::Settings::from_config(config, api_url)?;
    if config.firmware.base_url.is_none() && api_url.contains("://0.0.0.0:") {
        log::warn!("firmware.base_url is not set and the API listens on 0.0.0.0: devices will be offered {api_url} URLs; set firmware.base_url to an address they can reach");
    }
    Ok(s)
}

/// Compares the daemon's cgroup with `resources` (a warning per limit that
/// is absent or disagrees) and returns the `memory.events` to watch, if
/// the cgroup has one.
// Before the executor runs; cgroupfs has no disk behind it.
#[allow(clippy::disallowed_methods)]
fn check_cgroup(config: &Config, limits: &crate::limits::Limits) -> Option<PathBuf> {
    use crate::limits::cgroup::{Cgroup, Found};
    let cg = match Cgroup::read_own(&config.resources.cgroup_root) {
        Ok(cg) => cg,
        Err(e) => {
            log::warn!("resources: cannot find this daemon's cgroup ({e}); resources.memory_limit and cpu_limit are not checked");
            return None;
        }
    };
    for w in cg.disagreements(&config.resources) {
        log::warn!("resources: {w}");
    }
    if let Found::Limit(m) = cg.memory_max {
        limits.set_cgroup_memory_max(m);
    }
    let events = cg.dir.join("memory.events");
    if events.is_file() {
        Some(events)
    } else {
        log::info!(
            "memory pressure: {} is absent; the daemon will not shed under pressure",
            events.display()
        );
        None
    }
}

fn open_store(config: &Config) -> Result<Store, StoreError> {
    Store::open(StoreOptions {
        path: config.storage.path.clone(),
        max_size: config.storage.max_size.0,
        node_id: config.node_id(),
    })
}

/// Stops glibc from handing memory back to the kernel after every SQLite
/// statement. SQLite frees its in-memory statement journal at the end of
/// each write; on the store thread's malloc arena that free shrinks the
/// heap with `madvise`, and each `madvise` flushes the TLB of every CPU
/// (an IPI per statement). Measured with `bench/mqtt_load.rs`: telemetry
/// ingest 28,249 -> ~39,500 msg/s, peak RSS unchanged (11.1 MiB). glibc
/// still trims above 1 MiB of free memory per arena. musl has no arenas
/// to trim this way and no `mallopt`.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn keep_freed_memory_for_reuse() {
    const M_TRIM_THRESHOLD: std::ffi::c_int = -1;
    extern "C" {
        fn mallopt(param: std::ffi::c_int, value: std::ffi::c_int) -> std::ffi::c_int;
    }
    // SAFETY: mallopt only sets a malloc parameter; it is called before
    // the daemon starts its threads, and a failure (return 0) just leaves
    // glibc's default in place.
    if unsafe { mallopt(M_TRIM_THRESHOLD, 1 << 20) } == 0 {
        log::debug!("mallopt(M_TRIM_THRESHOLD) refused; keeping glibc's default");
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn keep_freed_memory_for_reuse() {}

/// Runs the edge daemon until SIGTERM or SIGINT.
pub fn run(config: Config, started: Instant) -> Result<(), DaemonError> {
    keep_freed_memory_for_reuse();
    let store = open_store(&config)?;
    let registry = Registry::new(
        store.clone(),
        Limits {
            max_services: config.services.max_local_services,
            default_ttl_ms: config.services.default_ttl.0.as_millis() as u64,
        },
    );
    let prepared = prepare(&config, &registry);
    let (server, unix_server, hub) = match prepared {
        Ok(p) => p,
        Err(e) => {
            store.close();
            return Err(e);
        }
    };
    let acl = match crate::acl::Acl::load(&config.acl, admin_token_files(&config)) {
        Ok(a) => a,
        Err(e) => {
            store.close();
            return Err(e.into());
        }
    };
    let mut signals = match Signals::new([Signal::Term, Signal::Int, Signal::Hup]) {
        Ok(s) => s,
        Err(e) => {
            store.close();
            return Err(DaemonError::Signals(e));
        }
    };
    let scheme = if config.http.tls_cert.is_some() {
        "https"
    } else {
        "http"
    };
    let addr = server
        .local_addr()
        .map(|a| a.to_string())
        .unwrap_or_else(|_| config.http.listen.clone());
    let sync = crate::sync::SyncHandle::new(!config.cloud.server_address.is_empty());
    let limits = crate::limits::Limits::new(config.resources.memory_limit.0);
    let memory_events = check_cgroup(&config, &limits);
    let client = if config.cloud.server_address.is_empty() {
        None
    } else {
        match crate::sync::SyncClient::new(&config, registry.clone(), sync.clone(), limits.clone())
        {
            Ok(c) => Some(c),
            Err(e) => {
                store.close();
                return Err(e.into());
            }
        }
    };
    let metrics = Arc::new(Metrics::default());
    #[allow(unused_mut)]
    let (mut devices, device_channels) = Devices::new(
        registry.clone(),
        crate::devices::Settings::from_config(&config.devices),
    );
    // Before any clone: ingest and the monitor feed the edge node.
    #[cfg(feature = "sparkplug")]
    let feed = config.sparkplug.enabled.then(|| devices.feed());
    #[cfg(not(feature = "sparkplug"))]
    if config.sparkplug.enabled {
        store.close();
        return Err(DaemonError::Sparkplug(
            "sparkplug.enabled is set, but this build has no Sparkplug edge node (cargo feature `sparkplug`)".into(),
        ));
    }
    let firmware = match firmware_settings(&config, &format!("{scheme}://{addr}")) {
        Ok(f) => smol::block_on(crate::firmware::Artifacts::open(store.clone(), f)),
        Err(e) => Err(e),
    };
    // An edge with a hub fetches the artifacts of rollouts defined there,
    // and the bundles of host rollouts (each under its own cap).
    let fetcher = if config.mode == Mode::Edge && !config.cloud.server_address.is_empty() {
        match crate::sync::client::hub_client(&config) {
            Ok(hub) => Some(crate::sync::transport::Fetcher {
                hub,
                bytes_per_sec: config.firmware.bandwidth_limit.0,
            }),
            Err(e) => {
                store.close();
                return Err(e.into());
            }
        }
    } else {
        None
    };
    let (rollouts, offers) = match firmware {
        Ok(a) => crate::firmware::rollout::Rollouts::new(registry.clone(), a, fetcher.clone()),
        Err(e) => {
            store.close();
            return Err(e.into());
        }
    };
    // Only an edge runs rollouts: it has the devices. A hub stores
    // artifacts and rollout records, which flow down to the edges.
    let engine = (config.mode == Mode::Edge).then(|| rollouts.clone());
    let bridge = match start_bridge(
        &config,
        store.node_id(),
        &devices,
        &metrics,
        &device_channels,
        engine.clone().map(|r| (r, offers)),
    ) {
        Ok(b) => b,
        Err(e) => {
            store.close();
            return Err(e.into());
        }
    };
    let ota = match smol::block_on(crate::ota::Ota::open(
        &config.ota,
        registry.clone(),
        sync.clone(),
        &config.storage.path,
        fetcher,
    )) {
        Ok(o) => o,
        Err(e) => {
            store.close();
            return Err(e.into());
        }
    };
    // The DDI client drives the coordinator; only an edge has a slot to
    // update (check-config refuses it without an OTA backend).
    #[cfg(feature = "hawkbit")]
    let hawkbit = if config.hawkbit.enabled() && config.mode == Mode::Edge {
        match smol::block_on(crate::hawkbit::Hawkbit::open(
            &config.hawkbit,
            &config.ota,
            ota.clone(),
            engine.clone(),
            store.clone(),
        )) {
            Ok(h) => Some(h),
            Err(e) => {
                store.close();
                return Err(DaemonError::Hawkbit(e.to_string()));
            }
        }
    } else {
        None
    };
    #[cfg(not(feature = "hawkbit"))]
    if config.hawkbit.enabled() {
        store.close();
        return Err(DaemonError::Hawkbit(
            "hawkbit.server is set, but this build has no DDI client (cargo feature `hawkbit`)"
                .into(),
        ));
    }
    let api = Arc::new(App {
        acl,
        ota: ota.clone(),
        #[cfg(feature = "hawkbit")]
        hawkbit: hawkbit.clone(),
        registry,
        devices: devices.clone(),
        sync: sync.clone(),
        hub,
        metrics,
        limits: limits.clone(),
        max_body: config.http.max_body_size.0,
        test_hooks: std::env::var_os("KONSUL_TEST_HOOKS").is_some_and(|v| v == "1"),
        rollouts: Some(rollouts),
    });
    if api.test_hooks {
        log::warn!("KONSUL_TEST_HOOKS=1: debug routes enabled; never set this in production");
    }

    let ex = Arc::new(smol::Executor::new());
    if let Some(events) = memory_events {
        let (limits, store) = (limits.clone(), store.clone());
        ex.spawn(async move {
            if let Err(e) = crate::limits::watch(limits, store, events).await {
                log::warn!("memory pressure: not watched: {e}");
            }
        })
        .detach();
    }
    ex.spawn(crate::sync::track_outbox(
        api.registry.clone(),
        sync.clone(),
    ))
    .detach();
    if let Some(client) = client {
        log::info!("syncing with {}", config.cloud.server_address);
        ex.spawn(client.run()).detach();
    }
    let started_ms = crate::clock::wall_millis();
    ex.spawn(monitor(
        devices.clone(),
        device_channels.signals,
        started_ms,
    ))
    .detach();
    ex.spawn(retention(devices.clone())).detach();
    let shutdown = Shutdown::default();
    if let Some(engine) = engine {
        ex.spawn(engine.run(shutdown.clone())).detach();
    }
    let mqtt_task = bridge.map(|b| ex.spawn(b.run(shutdown.clone())));
    #[cfg(feature = "sparkplug")]
    let sparkplug_task = match feed {
        None => None,
        Some(feed) => {
            let node = crate::mqtt::Settings::from_config(&config, store.node_id())
                .map_err(|e| e.to_string())
                .and_then(|b| {
                    let s = crate::sparkplug::Settings::from_config(&config.sparkplug, b);
                    crate::sparkplug::Node::new(s, api.clone(), feed).map_err(|e| e.to_string())
                });
            match node {
                Ok(n) => Some(ex.spawn(n.run(shutdown.clone()))),
                Err(e) => {
                    shutdown.trigger();
                    store.close();
                    return Err(DaemonError::Sparkplug(e));
                }
            }
        }
    };
    let http_task = ex.spawn(server.serve(api.clone(), ex.clone(), shutdown.clone(), DRAIN));
    let unix_task =
        unix_server.map(|u| ex.spawn(u.serve(api.clone(), ex.clone(), shutdown.clone(), DRAIN)));
    let watchdog_task = crate::systemd::watchdog_interval().map(|every| {
        log::info!("systemd watchdog: pinging every {every:?} while the store answers");
        ex.spawn(crate::systemd::watchdog(store.clone(), every))
    });

    let result = smol::block_on(ex.run(async {
        // The bus name is part of "ready": clients started after READY=1
        // (systemd ordering, D-Bus activation) must find it.
        let dbus = if config.dbus.enabled {
            match crate::dbus::serve(&config.dbus.bus, api.clone(), &ex).await {
                Ok(service) => Some(service),
                Err(e) => {
                    shutdown.trigger();
                    http_task.await;
                    return Err(DaemonError::Dbus(Box::new(e)));
                }
            }
        } else {
            None
        };
        let initial = store
            .call(|db| db.stats())
            .await
            .ok()
            .and_then(Result::ok)
            .map(|s| crate::systemd::summary(&s))
            .unwrap_or_default();
        log::info!(
            "{} {} ready in {} ms: API on {scheme}://{addr}, store {} ({initial})",
            if config.mode == Mode::Hub {
                "hub"
            } else {
                "node"
            },
            store.node_id(),
            started.elapsed().as_millis(),
            store.path().display()
        );
        crate::systemd::ready(&initial);
        // After READY: the health gate's "daemon healthy" means what
        // systemd and clients see, and the coordinator's first log line
        // (booted slot, state) always follows the ready line.
        ex.spawn(ota.run()).detach();
        #[cfg(feature = "hawkbit")]
        if let Some(h) = hawkbit {
            ex.spawn(h.run()).detach();
        }

        // Test hook: an error on the signal stream, on demand, so the
        // fault path (and its exit code) can be checked end to end.
        let mut injected = api.test_hooks
            && std::env::var_os("KONSUL_TEST_FAULT").is_some_and(|v| v == "signal-stream");
        // The signal stream cannot end or fail while we hold it; if it does
        // anyway we cannot be stopped cleanly any more. Shut down in order,
        // but as a fault: a non-zero exit makes systemd (Restart=on-failure)
        // start us again, where exit 0 would leave the node down.
        let fault = loop {
            let next = if std::mem::take(&mut injected) {
                Some(Err(std::io::Error::other("injected by KONSUL_TEST_FAULT")))
            } else {
                signals.next().await
            };
            match next {
                // SIGHUP: access policies and tokens take effect without
                // a restart; a broken file keeps the old set in force.
                Some(Ok(Signal::Hup)) => {
                    let acl = api.acl.clone();
                    match smol::unblock(move || acl.reload()).await {
                        Ok(()) => {}
                        Err(e) => log::error!("SIGHUP: {e}; the previous access rules stay"),
                    }
                }
                Some(Ok(Signal::Int)) => {
                    log::info!("SIGINT received; shutting down");
                    break None;
                }
                Some(Ok(_)) => {
                    log::info!("SIGTERM received; shutting down");
                    break None;
                }
                Some(Err(e)) => {
                    break Some(DaemonError::Fault(format!("signal stream failed: {e}")))
                }
                None => break Some(DaemonError::Fault("signal stream ended".into())),
            }
        };
        if let Some(e) = &fault {
            log::error!("{e}; shutting down to be restarted");
        }
        crate::systemd::stopping();
        // Give up the name first: new D-Bus clients get ServiceUnknown (or
        // activate a fresh instance) rather than calls into a closing store.
        drop(dbus);
        shutdown.trigger();
        if let Some(w) = watchdog_task {
            w.cancel().await;
        }
        http_task.await;
        if let Some(t) = unix_task {
            t.await;
        }
        if let Some(t) = mqtt_task {
            // Says goodbye to the broker and applies what it had received.
            t.await;
        }
        #[cfg(feature = "sparkplug")]
        if let Some(t) = sparkplug_task {
            // NDEATH before the disconnect, as Sparkplug asks.
            t.await;
        }
        fault.map_or(Ok(()), Err)
    }));
    let s = store.clone();
    // Joining the store thread blocks; the executor has nothing left to run.
    s.close();
    log::info!("store closed cleanly");
    result
}

/// The listeners (TCP with TLS when configured, the Unix socket) and, in
/// hub mode, the hub.
// Set-up, before the executor runs (no watchdog yet).
#[allow(clippy::disallowed_methods)]
fn prepare(
    config: &Config,
    registry: &Registry,
) -> Result<(Server, Option<Server>, Option<crate::sync::Hub>), DaemonError> {
    let mut server = Server::bind(&config.http.listen)?;
    let unix_server = match &config.http.unix_socket {
        Some(path) => Some(Server::bind_unix(path)?),
        None => None,
    };
    if let (Some(cert), Some(key)) = (&config.http.tls_cert, &config.http.tls_key) {
        let tls = crate::sync::server_tls(cert, key, config.http.client_ca.as_deref())?;
        server = server.with_tls(tls);
    }
    let hub = match config.mode {
        Mode::Edge => None,
        Mode::Hub => {
            let tokens = match &config.sync.auth_token_file {
                Some(p) => std::fs::read_to_string(p)
                    .map_err(|source| DaemonError::ReadFile {
                        path: p.display().to_string(),
                        source,
                    })?
                    .lines()
                    .map(str::trim)
                    .filter(|l| !l.is_empty() && !l.starts_with('#'))
                    .map(str::to_owned)
                    .collect(),
                None => Vec::new(),
            };
            if tokens.is_empty() && config.http.client_ca.is_none() {
                log::warn!("hub accepts sync from any edge that reaches it: set sync.auth_token_file or http.client_ca");
            }
            Some(crate::sync::Hub {
                registry: registry.clone(),
                strategy: crate::sync::client::strategy(config),
                tombstone_retention_ms: config.sync.tombstone_retention.0.as_millis() as u64,
                tokens,
                sync_interval_ms: config.cloud.sync_interval.0.as_millis() as u64,
            })
        }
    };
    Ok((server, unix_server, hub))
}

#[cfg(feature = "mqtt")]
fn start_bridge(
    config: &Config,
    node_id: &str,
    devices: &Devices,
    metrics: &Arc<Metrics>,
    channels: &crate::devices::Channels,
    rollouts: Option<(
        crate::firmware::rollout::Rollouts,
        async_channel::Receiver<crate::firmware::rollout::Offer>,
    )>,
) -> Result<Option<crate::mqtt::Bridge>, crate::mqtt::MqttError> {
    if !config.mqtt.enabled {
        return Ok(None);
    }
    let settings = crate::mqtt::Settings::from_config(config, node_id)?;
    crate::mqtt::Bridge::new(
        settings,
        devices.clone(),
        metrics.clone(),
        channels.alerts.clone(),
        rollouts,
    )
    .map(Some)
}

/// Without the `mqtt` feature there is no bridge to start: a config that
/// enables one is refused rather than silently ignored.
#[cfg(not(feature = "mqtt"))]
fn start_bridge(
    config: &Config,
    _node_id: &str,
    _devices: &Devices,
    _metrics: &Arc<Metrics>,
    _channels: &crate::devices::Channels,
    _rollouts: Option<(
        crate::firmware::rollout::Rollouts,
        async_channel::Receiver<crate::firmware::rollout::Offer>,
    )>,
) -> Result<Option<NoBridge>, crate::mqtt::MqttError> {
    if config.mqtt.enabled {
        return Err(crate::mqtt::MqttError::NotBuilt);
    }
    Ok(None)
}

#[cfg(not(feature = "mqtt"))]
enum NoBridge {}

#[cfg(not(feature = "mqtt"))]
impl NoBridge {
    async fn run(self, _shutdown: Shutdown) {
        match self {}
    }
}

/// The device health monitor (see `devices::health`).
async fn monitor(
    devices: Devices,
    signals: async_channel::Receiver<Vec<crate::devices::health::Signal>>,
    started_ms: u64,
) {
    let machine = match devices.machine(started_ms).await {
        Ok(m) => m,
        Err(e) => {
            log::error!("device health monitor not started: {e}");
            return;
        }
    };
    crate::devices::health::run(machine, signals, move |t| {
        let devices = devices.clone();
        async move {
            if let Err(e) = devices.record(t).await {
                log::error!("device health: cannot record transitions: {e}");
            }
        }
    })
    .await;
}

/// Prunes telemetry and events when the oldest row outlives the retention,
/// on a timer set to that moment (ingest prunes as it writes, too). When
/// the history is empty it checks again after one retention period.
async fn retention(devices: Devices) {
    // Coalesce: age pruning to the minute is plenty.
    const MIN_WAIT: Duration = Duration::from_secs(60);
    let retention = Duration::from_millis(devices.settings().retention_ms.max(1000));
    loop {
        let wait = match devices.next_expiry().await {
            Ok(Some(at)) => Duration::from_millis(at.saturating_sub(crate::clock::wall_millis())),
            Ok(None) => retention,
            Err(crate::store::StoreError::Closed) => return,
            Err(e) => {
                log::warn!("telemetry retention: {e}");
                retention
            }
        };
        async_io::Timer::after(wait.max(MIN_WAIT)).await;
        match devices.prune_now().await {
            Ok(()) => {}
            Err(crate::store::StoreError::Closed) => return,
            Err(e) => log::warn!("telemetry retention: {e}"),
        }
    }
}

/// Opens a store in `dir`, writes, reads back, closes, reopens and checks:
/// a quick proof that SQLite and the write path work on this target (run
/// under qemu for the cross builds).
// A CLI command: no executor, nothing else to stall.
#[allow(clippy::disallowed_methods)]
pub fn selftest(dir: &std::path::Path) -> Result<String, DaemonError> {
    let path = dir.join("konsul-selftest.db");
    // The identity marker goes with the file: a leftover one would make
    // the next selftest report its fresh database as lost data.
    let remove = |p: &std::path::Path| {
        let _ = std::fs::remove_file(p);
        let _ = std::fs::remove_file(crate::store::marker_path(p));
    };
    remove(&path);
    let opts = || StoreOptions {
        path: path.clone(),
        max_size: 4 << 20,
        node_id: "selftest".into(),
    };
    let limits = Limits {
        max_services: 10,
        default_ttl_ms: 0,
    };
    let fail = |m: String| DaemonError::SelfTest(m);
    let registry = Registry::new(Store::open(opts())?, limits);
    let index = smol::block_on(async {
        let input = ServiceInput {
            name: "selftest".into(),
            address: "127.0.0.1".into(),
            port: 1,
            tags: vec!["selftest".into()],
            ..Default::default()
        };
        registry.register(input, Some(0)).await?;
        registry
            .kv_put("selftest/key".into(), "value".into(), 0, Some(0))
            .await
    })
    .map_err(|e| fail(e.to_string()))?;
    registry.store().close();
    let registry = Registry::new(Store::open(opts())?, limits);
    let (service, kv) = smol::block_on(async {
        let s = registry.service("selftest".into()).await?;
        let k = registry.kv_get("selftest/key".into()).await?;
        Ok::<_, crate::registry::RegistryError>((s, k))
    })
    .map_err(|e| fail(e.to_string()))?;
    registry.store().close();
    remove(&path);
    if service.service.port != 1 || kv.value != "value" || kv.modify_index != index {
        return Err(fail(
            "read back something other than what was written".into(),
        ));
    }
    Ok(format!(
        "selftest OK: SQLite {}, schema v{}, write/read/reopen at {}",
        rusqlite::version(),
        crate::store::SCHEMA_VERSION,
        dir.display()
    ))
}

/// A hub's sync tokens are admin tokens too.
fn admin_token_files(config: &Config) -> Vec<PathBuf> {
    match (&config.mode, &config.sync.auth_token_file) {
        (Mode::Hub, Some(file)) => vec![file.clone()],
        _ => Vec::new(),
    }
}

/// Loads the access policy as a start would (token files' modes and
/// lengths, policy files), so `check-config` passes only what starts.
pub fn check_access(config: &Config) -> Result<(), DaemonError> {
    crate::acl::Acl::load(&config.acl, admin_token_files(config))
        .map(drop)
        .map_err(Into::into)
}
