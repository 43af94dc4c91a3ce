//! Wires the actors together, runs them on one smol executor and shuts
//! them down in order.
//!
//! Start-up order is what makes READY=1 honest: the store is opened,
//! checked and migrated, the HTTP socket is bound, signal handlers are
//! installed, and only then does systemd hear READY. Shutdown reverses it:
//! STOPPING=1, stop accepting, let open requests finish (bounded), then
//! close the store, which drains queued writes and checkpoints the WAL.

use std::sync::Arc;
use std::time::{Duration, Instant};

use async_signal::{Signal, Signals};
use smol::stream::StreamExt;

use crate::config::{Config, Mode};
use crate::http::{Api, HttpError, Server, Shutdown};
use crate::metrics::Metrics;
use crate::registry::{Limits, Registry, ServiceInput};
use crate::store::{Store, StoreError, StoreOptions};

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
    #[error("mode: {0} is not implemented in this build yet")]
    Unsupported(&'static str),
    #[error("selftest: {0}")]
    SelfTest(String),
    #[error(transparent)]
    Dbus(Box<crate::dbus::DbusError>),
}

fn open_store(config: &Config) -> Result<Store, StoreError> {
    Store::open(StoreOptions {
        path: config.storage.path.clone(),
        max_size: config.storage.max_size.0,
        node_id: config.node_id(),
    })
}

/// Runs the edge daemon until SIGTERM or SIGINT.
pub fn run(config: Config, started: Instant) -> Result<(), DaemonError> {
    if config.mode == Mode::Hub {
        return Err(DaemonError::Unsupported("hub"));
    }
    warn_unimplemented(&config);
    let store = open_store(&config)?;
    let registry = Registry::new(
        store.clone(),
        Limits {
            max_services: config.services.max_local_services,
            default_ttl_ms: config.services.default_ttl.0.as_millis() as u64,
        },
    );
    let server = match Server::bind(&config.http.listen) {
        Ok(s) => s,
        Err(e) => {
            store.close();
            return Err(e.into());
        }
    };
    let mut signals = match Signals::new([Signal::Term, Signal::Int]) {
        Ok(s) => s,
        Err(e) => {
            store.close();
            return Err(DaemonError::Signals(e));
        }
    };
    let addr = server
        .local_addr()
        .map(|a| a.to_string())
        .unwrap_or_else(|_| config.http.listen.clone());
    let sync = crate::sync::SyncHandle::new(!config.cloud.server_address.is_empty());
    let api = Arc::new(Api {
        registry,
        sync: sync.clone(),
        metrics: Arc::new(Metrics::default()),
        max_body: config.http.max_body_size.0,
        test_hooks: std::env::var_os("KONSUL_TEST_HOOKS").is_some_and(|v| v == "1"),
    });
    if api.test_hooks {
        log::warn!("KONSUL_TEST_HOOKS=1: debug routes enabled; never set this in production");
    }

    let ex = Arc::new(smol::Executor::new());
    ex.spawn(crate::sync::track_outbox(
        api.registry.clone(),
        sync.clone(),
    ))
    .detach();
    let shutdown = Shutdown::default();
    let http_task = ex.spawn(server.serve(api.clone(), ex.clone(), shutdown.clone(), DRAIN));
    let watchdog_task = crate::systemd::watchdog_interval().map(|every| {
        log::info!("systemd watchdog: pinging every {every:?} while the store answers");
        ex.spawn(crate::systemd::watchdog(store.clone(), every))
    });

    let ota_state = match config.ota.backend {
        // Until the OTA work lands, a configured backend is simply idle.
        crate::config::OtaBackend::None => "unavailable",
        _ => "idle",
    };
    let result = smol::block_on(ex.run(async {
        // The bus name is part of "ready": clients started after READY=1
        // (systemd ordering, D-Bus activation) must find it.
        let dbus = if config.dbus.enabled {
            match crate::dbus::serve(&config.dbus.bus, api.clone(), ota_state, &ex).await {
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
            "node {} ready in {} ms: API on http://{addr}, store {} ({initial})",
            store.node_id(),
            started.elapsed().as_millis(),
            store.path().display()
        );
        crate::systemd::ready(&initial);

        let signal = match signals.next().await {
            Some(Ok(Signal::Int)) => "SIGINT",
            Some(Ok(_)) => "SIGTERM",
            // The signal stream cannot end while we hold it; treat an error
            // like a stop request rather than run on unstoppable.
            Some(Err(_)) | None => "signal stream error",
        };
        log::info!("{signal} received; shutting down");
        crate::systemd::stopping();
        // Give up the name first: new D-Bus clients get ServiceUnknown (or
        // activate a fresh instance) rather than calls into a closing store.
        drop(dbus);
        shutdown.trigger();
        if let Some(w) = watchdog_task {
            w.cancel().await;
        }
        http_task.await;
        Ok(())
    }));
    let s = store.clone();
    // Joining the store thread blocks; the executor has nothing left to run.
    s.close();
    log::info!("store closed cleanly");
    result
}

fn warn_unimplemented(config: &Config) {
    if config.mqtt.enabled {
        log::warn!(
            "mqtt.enabled is set, but the MQTT bridge is not in this build yet; ignoring it"
        );
    }
    if !config.cloud.server_address.is_empty() {
        log::warn!(
            "cloud.server_address is set, but the sync client is not in this build yet; \
             changes stay queued in the outbox"
        );
    }
}

/// Opens a store in `dir`, writes, reads back, closes, reopens and checks:
/// a quick proof that SQLite and the write path work on this target (run
/// under qemu for the cross builds).
pub fn selftest(dir: &std::path::Path) -> Result<String, DaemonError> {
    let path = dir.join("konsul-selftest.db");
    let _ = std::fs::remove_file(&path);
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
    let _ = std::fs::remove_file(&path);
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
