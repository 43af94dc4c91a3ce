//! The D-Bus API: `io.konsul.Edge1` at `/io/konsul/Edge1`.
//!
//! Thin by design: each method checks access (mutations only), calls the
//! registry or the sync handle, and maps the result. Nothing here keeps
//! state of its own. Two tasks turn internal events into D-Bus traffic:
//! registry changes become `ServiceChanged` / `KeyChanged` /
//! `DeviceChanged` / `AlertRaised` signals, and sync state changes become
//! `PropertiesChanged` on `io.konsul.Edge1.Sync`. Neither polls.
//!
//! The connection runs on the daemon's smol executor
//! (`internal_executor(false)` plus a task that ticks zbus's executor), so
//! D-Bus adds no thread and shares async-io's reactor with HTTP.
//!
//! The name is requested with `DoNotQueue` after every interface is in
//! place, before the daemon reports READY: a client that sees the name
//! can call every method, and a second daemon fails at start instead of
//! waiting in the queue.
//!
//! The interface document is `docs/dbus/io.konsul.Edge1.xml`; a test
//! compares it with what the running service introspects.

pub mod access;
pub mod convert;
mod interfaces;

use std::sync::Arc;

use async_broadcast::RecvError;
use zbus::fdo::RequestNameFlags;
use zbus::object_server::SignalEmitter;

use crate::app::{App, AppError};
use crate::registry::ChangeOp;
use crate::store::Kind;

pub use interfaces::{DevicesIface, FirmwareIface, KvIface, OtaIface, RegistryIface, SyncIface};

/// The well-known bus name.
pub const NAME: &str = "io.konsul.Edge1";
/// The one object.
pub const PATH: &str = "/io/konsul/Edge1";
pub const IFACE_REGISTRY: &str = "io.konsul.Edge1.Registry";
pub const IFACE_KV: &str = "io.konsul.Edge1.Kv";
pub const IFACE_DEVICES: &str = "io.konsul.Edge1.Devices";
pub const IFACE_SYNC: &str = "io.konsul.Edge1.Sync";
pub const IFACE_OTA: &str = "io.konsul.Edge1.Ota";
pub const IFACE_FIRMWARE: &str = "io.konsul.Edge1.Firmware";

/// Errors on the wire: `io.konsul.Edge1.Error.<Variant>`. The set is
/// documented in `docs/dbus/io.konsul.Edge1.xml` and the README.
#[derive(Debug, zbus::DBusError)]
#[zbus(prefix = "io.konsul.Edge1.Error")]
pub enum Error {
    /// Transport errors from zbus itself.
    #[zbus(error)]
    ZBus(zbus::Error),
    /// A malformed argument: validation failed, an unknown option key, a
    /// wrong value type.
    InvalidArgument(String),
    /// No such service, key, device or alert.
    NotFound(String),
    /// The CAS index did not match.
    CasConflict(String),
    /// The current state does not allow it (an update in progress, a
    /// rollout that is not running).
    Conflict(String),
    /// `services.max_local_services` reached.
    LimitReached(String),
    /// `storage.max_size` reached or the disk is full; nothing was written.
    StorageFull(String),
    /// Temporarily not possible: shutting down, or sync disabled.
    Unavailable(String),
    /// A storage fault; details are in the daemon log.
    Failed(String),
    /// The access policy refuses this caller (see `acl` in the README).
    AccessDenied(String),
}

/// Maps every application error to a D-Bus error name, exhaustively: a new
/// class does not compile until it has a name. The classes and messages are
/// the ones HTTP answers with ([`crate::app::AppError`]).
impl From<AppError> for Error {
    fn from(e: AppError) -> Self {
        match e {
            AppError::Invalid(m) => Error::InvalidArgument(m),
            AppError::NotFound(m) => Error::NotFound(m),
            AppError::CasConflict(m) => Error::CasConflict(m),
            AppError::Conflict(m) => Error::Conflict(m),
            AppError::Limit(m) | AppError::TooLarge(m) => Error::LimitReached(m),
            AppError::StorageFull(m) => Error::StorageFull(m),
            AppError::Unavailable(m) | AppError::Upstream(m) => Error::Unavailable(m),
            e @ (AppError::Unauthenticated | AppError::Forbidden { .. }) => {
                Error::AccessDenied(e.to_string())
            }
            AppError::Internal(m) => Error::Failed(m.into()),
        }
    }
}

/// Every subsystem error reaches a D-Bus caller through [`AppError`]'s one
/// exhaustive map.
pub(crate) fn app_err(e: impl Into<AppError>) -> Error {
    e.into().into()
}

/// Setting up the service.
#[derive(Debug, thiserror::Error)]
pub enum DbusError {
    #[error("cannot connect to the D-Bus {bus} bus: {source}")]
    Connect { bus: String, source: zbus::Error },
    #[error("cannot own {NAME} on the {bus} bus: {source} (is another konsul-edge running, or does the bus policy not allow this user to own it? see systemd/io.konsul.Edge1.conf)")]
    Name { bus: String, source: zbus::Error },
    #[error("D-Bus set-up on the {bus} bus: {source}")]
    Setup { bus: String, source: zbus::Error },
}

pub use crate::support::bus::builder;

/// A running D-Bus service. Dropping it closes the connection (the bus
/// then releases the name).
pub struct Service {
    _conn: zbus::Connection,
}

/// Connects, exports the interfaces, starts the signal tasks and owns the
/// name. Returns once the name is ours, so the caller can report READY.
pub async fn serve(
    bus: &str,
    api: Arc<App>,
    ex: &Arc<smol::Executor<'static>>,
) -> Result<Service, DbusError> {
    let setup = |source| DbusError::Setup {
        bus: bus.to_owned(),
        source,
    };
    let conn = builder(bus)
        .map(|b| b.internal_executor(false))
        .map_err(|source| DbusError::Connect {
            bus: bus.to_owned(),
            source,
        })?
        .build()
        .await
        .map_err(|source| DbusError::Connect {
            bus: bus.to_owned(),
            source,
        })?;
    // From here on zbus's tasks (socket reader, object server) need ticking.
    {
        let conn = conn.clone();
        ex.spawn(async move {
            loop {
                conn.executor().tick().await;
            }
        })
        .detach();
    }
    let access = access::Access::new(&conn).await.map_err(setup)?;
    let ctx = Arc::new(interfaces::Ctx {
        api: api.clone(),
        access,
    });
    let server = conn.object_server();
    server
        .at(PATH, RegistryIface::new(ctx.clone()))
        .await
        .map_err(setup)?;
    server
        .at(PATH, KvIface::new(ctx.clone()))
        .await
        .map_err(setup)?;
    server
        .at(PATH, DevicesIface::new(ctx.clone()))
        .await
        .map_err(setup)?;
    server
        .at(PATH, SyncIface::new(ctx.clone()))
        .await
        .map_err(setup)?;
    server
        .at(PATH, OtaIface::new(ctx.clone()))
        .await
        .map_err(setup)?;
    server
        .at(PATH, FirmwareIface::new(ctx.clone()))
        .await
        .map_err(setup)?;

    // Subscribed before the name is ours: a change made the moment a client
    // sees the name still produces its signal.
    let changes = api.registry.subscribe();
    ex.spawn(pump_changes(conn.clone(), api.clone(), changes))
        .detach();
    ex.spawn(pump_sync(conn.clone(), api.sync.clone())).detach();
    ex.spawn(pump_ota(conn.clone(), api.ota.clone())).detach();

    conn.request_name_with_flags(NAME, RequestNameFlags::DoNotQueue.into())
        .await
        .map_err(|source| DbusError::Name {
            bus: bus.to_owned(),
            source,
        })?;
    log::info!("D-Bus: own {NAME} on the {bus} bus");
    Ok(Service { _conn: conn })
}

fn op_str(op: ChangeOp) -> &'static str {
    match op {
        ChangeOp::Upsert => "upsert",
        ChangeOp::Delete => "delete",
    }
}

/// Registry changes -> signals. A slow bus cannot slow writers down: the
/// broadcast channel drops the oldest events, and we log how many.
async fn pump_changes(
    conn: zbus::Connection,
    api: Arc<App>,
    mut changes: async_broadcast::Receiver<crate::registry::Change>,
) {
    let emitter = match SignalEmitter::new(&conn, PATH) {
        Ok(e) => e,
        Err(e) => {
            log::error!("D-Bus: no signal emitter for {PATH}: {e}");
            return;
        }
    };
    loop {
        let change = match changes.recv().await {
            Ok(c) => c,
            Err(RecvError::Overflowed(n)) => {
                log::warn!("D-Bus: {n} change signals dropped (bus clients too slow)");
                continue;
            }
            Err(RecvError::Closed) => return,
        };
        let op = op_str(change.op);
        let sent = match change.kind {
            Kind::Service => RegistryIface::service_changed(&emitter, &change.key, op).await,
            Kind::Kv => KvIface::key_changed(&emitter, &change.key, op).await,
            Kind::Device => DevicesIface::device_changed(&emitter, &change.key, op).await,
            Kind::Alert => match change.op {
                ChangeOp::Upsert => match api.registry.record(Kind::Alert, change.key).await {
                    Ok(view) => {
                        let alert = interfaces::record_dict(&view);
                        DevicesIface::alert_raised(&emitter, &view.key, alert).await
                    }
                    // Gone again before we read it: nothing to raise.
                    Err(_) => Ok(()),
                },
                ChangeOp::Delete => Ok(()),
            },
            // Rollouts get signals with the OTA work.
            Kind::Rollout => Ok(()),
        };
        if let Err(e) = sent {
            log::warn!("D-Bus: signal not sent: {e}");
        }
    }
}

/// Sync state -> `PropertiesChanged`: one signal per property whose value
/// changed (zbus emits them one by one), none for unchanged ones.
async fn pump_sync(conn: zbus::Connection, sync: crate::sync::SyncHandle) {
    let iface = match conn.object_server().interface::<_, SyncIface>(PATH).await {
        Ok(i) => i,
        Err(e) => {
            log::error!("D-Bus: sync interface missing: {e}");
            return;
        }
    };
    let mut last = sync.status();
    loop {
        // Registered before reading, so a change in between is not missed.
        let listener = sync.changed();
        let now = sync.status();
        let emitter = iface.signal_emitter();
        let i = iface.get().await;
        let mut results = Vec::new();
        if now.enabled != last.enabled {
            results.push(i.enabled_changed(emitter).await);
        }
        if now.online != last.online {
            results.push(i.online_changed(emitter).await);
        }
        if now.last_sync_ms != last.last_sync_ms {
            results.push(i.last_sync_changed(emitter).await);
        }
        if now.pending_changes != last.pending_changes {
            results.push(i.pending_changes_changed(emitter).await);
        }
        if now.last_error != last.last_error {
            results.push(i.last_error_changed(emitter).await);
        }
        drop(i);
        for r in results {
            if let Err(e) = r {
                log::warn!("D-Bus: PropertiesChanged not sent: {e}");
            }
        }
        last = now;
        listener.await;
    }
}

/// OTA state -> `PropertiesChanged`, as for sync: one signal per property
/// that changed.
async fn pump_ota(conn: zbus::Connection, ota: crate::ota::Ota) {
    let iface = match conn.object_server().interface::<_, OtaIface>(PATH).await {
        Ok(i) => i,
        Err(e) => {
            log::error!("D-Bus: OTA interface missing: {e}");
            return;
        }
    };
    let mut last = ota.status();
    loop {
        let listener = ota.changed();
        let now = ota.status();
        let emitter = iface.signal_emitter();
        let i = iface.get().await;
        let mut results = Vec::new();
        let (a, b) = (&last.deployment, &now.deployment);
        if a.state != b.state {
            results.push(i.state_changed(emitter).await);
        }
        if last.progress != now.progress || last.phase != now.phase {
            results.push(i.progress_changed(emitter).await);
        }
        if a.last_error != b.last_error {
            results.push(i.last_error_changed(emitter).await);
        }
        if last.booted_slot != now.booted_slot {
            results.push(i.booted_slot_changed(emitter).await);
        }
        if a.target_slot != b.target_slot {
            results.push(i.target_slot_changed(emitter).await);
        }
        if a.version != b.version {
            results.push(i.version_changed(emitter).await);
        }
        drop(i);
        for r in results {
            if let Err(e) = r {
                log::warn!("D-Bus: PropertiesChanged not sent: {e}");
            }
        }
        last = now;
        listener.await;
    }
}
