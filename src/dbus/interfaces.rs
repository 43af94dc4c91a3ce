//! The six interfaces of `/io/konsul/Edge1`.
//!
//! Records are `a{sv}` built from the HTTP API's JSON (see
//! [`convert`](super::convert)); CAS and flags travel in an `options`
//! dictionary so that an option can be added later without changing a
//! method's signature (which would break generated bindings).

use std::sync::Arc;

use serde_json::{json, Value as Json};
use zbus::interface;
use zbus::message::Header;
use zbus::object_server::SignalEmitter;

use super::access::Access;
use super::convert::{dict_to_json, to_dict, Dict};
use super::{app_err, Error};
use crate::acl::{Capability, Resource};
use crate::app::App;
use crate::registry::{RecordView, ServiceEntry, ServiceInput};
use crate::store::Kind;

/// What every interface shares.
pub struct Ctx {
    pub api: Arc<App>,
    pub access: Access,
}

impl Ctx {
    /// The shared access decision for this call.
    async fn allow(
        &self,
        hdr: &Header<'_>,
        resource: Resource,
        cap: Capability,
    ) -> Result<crate::acl::Principal, Error> {
        self.access.allow(&self.api, hdr, resource, cap).await
    }
}

/// A service with its health and indices, flattened into one dictionary.
fn service_dict(e: &ServiceEntry) -> Dict {
    let mut j = serde_json::to_value(&e.service).unwrap_or_else(|_| json!({}));
    if let Some(map) = j.as_object_mut() {
        map.insert("health".into(), json!(e.health));
        map.insert("create_index".into(), json!(e.create_index));
        map.insert("modify_index".into(), json!(e.modify_index));
        if let Some(at) = e.expires_at_ms {
            map.insert("expires_at_ms".into(), json!(at));
        }
    }
    to_dict(&j)
}

/// A device or alert record: its body's fields plus `id` and the indices.
pub fn record_dict(v: &RecordView) -> Dict {
    let mut map = match &v.body {
        Json::Object(m) => m.clone(),
        other => {
            let mut m = serde_json::Map::new();
            m.insert("body".into(), other.clone());
            m
        }
    };
    map.insert("id".into(), json!(v.key));
    map.insert("create_index".into(), json!(v.create_index));
    map.insert("modify_index".into(), json!(v.modify_index));
    to_dict(&Json::Object(map))
}

/// Options common to the CAS-capable methods. Unknown keys are refused so a
/// misspelt `cas` fails loudly instead of writing unconditionally.
#[derive(Default)]
struct Options {
    cas: Option<u64>,
    flags: u64,
}

fn options(d: &Dict, allowed: &[&str]) -> Result<Options, Error> {
    let mut o = Options::default();
    for (k, v) in d {
        if !allowed.contains(&k.as_str()) {
            return Err(Error::InvalidArgument(format!(
                "unknown option `{k}` (allowed: {})",
                allowed.join(", ")
            )));
        }
        let n = super::convert::to_json(v).as_u64().ok_or_else(|| {
            Error::InvalidArgument(format!("option `{k}` must be an unsigned integer"))
        })?;
        match k.as_str() {
            "cas" => o.cas = Some(n),
            "flags" => o.flags = n,
            _ => {}
        }
    }
    Ok(o)
}

pub struct RegistryIface(Arc<Ctx>);
pub struct KvIface(Arc<Ctx>);
pub struct DevicesIface(Arc<Ctx>);
pub struct SyncIface(Arc<Ctx>);
pub struct OtaIface(Arc<Ctx>);
pub struct FirmwareIface(Arc<Ctx>);

macro_rules! ctor {
    ($($t:ident),*) => {$(
        impl $t {
            pub fn new(ctx: Arc<Ctx>) -> Self {
                $t(ctx)
            }
        }
    )*};
}
ctor!(
    RegistryIface,
    KvIface,
    DevicesIface,
    SyncIface,
    OtaIface,
    FirmwareIface
);

#[interface(name = "io.konsul.Edge1.Registry")]
impl RegistryIface {
    /// Every registered service, critical ones included. Keys of each
    /// entry: id, name, address (s), port (t), tags (as), meta (a{sv} of
    /// s), checks (av), ttl (s), health ("passing" or "critical"),
    /// create_index, modify_index (t), expires_at_ms (t, TTL services only).
    /// Empty fields are left out. Open to every local user.
    #[zbus(out_args("services"))]
    async fn list_services(&self, #[zbus(header)] hdr: Header<'_>) -> Result<Vec<Dict>, Error> {
        self.0
            .allow(&hdr, Resource::Service("*".into()), Capability::List)
            .await?;
        let list = self.0.api.registry.services(true).await.map_err(app_err)?;
        Ok(list.iter().map(service_dict).collect())
    }

    /// A service by id, else the first passing instance with that name;
    /// keys as in ListServices. Errors: io.konsul.Edge1.Error.NotFound.
    #[zbus(out_args("service"))]
    async fn get_service(
        &self,
        id_or_name: String,
        #[zbus(header)] hdr: Header<'_>,
    ) -> Result<Dict, Error> {
        self.0
            .allow(
                &hdr,
                Resource::Service(id_or_name.clone()),
                Capability::Read,
            )
            .await?;
        let e = self
            .0
            .api
            .registry
            .service(id_or_name)
            .await
            .map_err(app_err)?;
        Ok(service_dict(&e))
    }

    /// Registers or replaces a service; returns its modify index. service
    /// keys: name, address, port (required), id (default: name), tags
    /// (as), meta (a{ss} or a{sv}), ttl (s, "30s"). options: cas (t; 0 =
    /// only if new, n = only if its modify index is still n). Needs the
    /// access policy's consent. Errors: InvalidArgument, CasConflict, NotFound (cas on
    /// a missing service), LimitReached, StorageFull, AccessDenied.
    #[zbus(out_args("modify_index"))]
    async fn register_service(
        &self,
        service: Dict,
        options: Dict,
        #[zbus(header)] hdr: Header<'_>,
    ) -> Result<u64, Error> {
        let who = self.0.access.principal(&self.0.api, &hdr).await?;
        let o = super::interfaces::options(&options, &["cas"])?;
        let input: ServiceInput = serde_json::from_value(dict_to_json(&service))
            .map_err(|e| Error::InvalidArgument(format!("service: {e}")))?;
        self.0.api.may_register(&who, &input).await?;
        let (_, index) = self
            .0
            .api
            .registry
            .register(input, o.cas)
            .await
            .map_err(app_err)?;
        Ok(index)
    }

    /// Removes a service. options: cas (t). Needs root or group konsul.
    /// Errors: NotFound, CasConflict, StorageFull, AccessDenied.
    async fn deregister_service(
        &self,
        id: String,
        options: Dict,
        #[zbus(header)] hdr: Header<'_>,
    ) -> Result<(), Error> {
        self.0
            .allow(&hdr, Resource::Service(id.clone()), Capability::Deregister)
            .await?;
        let o = super::interfaces::options(&options, &["cas"])?;
        self.0
            .api
            .registry
            .deregister(id, o.cas)
            .await
            .map_err(app_err)
    }

    /// Node and store summary: node_id, version (s), uptime_seconds,
    /// services, keys, devices, alerts, outbox_pending, db_bytes,
    /// db_max_bytes, modify_index (t).
    #[zbus(out_args("status"))]
    async fn status(&self, #[zbus(header)] hdr: Header<'_>) -> Result<Dict, Error> {
        self.0
            .allow(&hdr, Resource::Edge("status".into()), Capability::Read)
            .await?;
        Ok(to_dict(&self.0.api.status().await?))
    }

    /// This edge node's id (storage keeps the id it was created with).
    #[zbus(property(emits_changed_signal = "const"))]
    fn node_id(&self) -> String {
        self.0.api.registry.store().node_id().to_owned()
    }

    /// konsul-edge's version.
    #[zbus(property(emits_changed_signal = "const"))]
    fn version(&self) -> String {
        env!("CARGO_PKG_VERSION").to_owned()
    }

    /// A service was registered, changed or removed (locally, over HTTP,
    /// or by sync). op: "upsert" or "delete". Read it with GetService.
    #[zbus(signal)]
    pub async fn service_changed(
        emitter: &SignalEmitter<'_>,
        id: &str,
        op: &str,
    ) -> zbus::Result<()>;
}

#[interface(name = "io.konsul.Edge1.Kv")]
impl KvIface {
    /// A key's entry: key, value (s), flags, create_index, modify_index
    /// (t). Errors: NotFound.
    #[zbus(out_args("entry"))]
    async fn get(&self, key: String, #[zbus(header)] hdr: Header<'_>) -> Result<Dict, Error> {
        self.0
            .allow(&hdr, Resource::Kv(key.clone()), Capability::Read)
            .await?;
        let e = self.0.api.registry.kv_get(key).await.map_err(app_err)?;
        Ok(to_dict(&json!(e)))
    }

    /// Sets a key; returns its modify index. options: cas (t; 0 = create
    /// only), flags (t). Needs root or group konsul. Errors:
    /// InvalidArgument, CasConflict, NotFound (cas on a missing key),
    /// StorageFull, AccessDenied.
    #[zbus(out_args("modify_index"))]
    async fn put(
        &self,
        key: String,
        value: String,
        options: Dict,
        #[zbus(header)] hdr: Header<'_>,
    ) -> Result<u64, Error> {
        self.0
            .allow(&hdr, Resource::Kv(key.clone()), Capability::Write)
            .await?;
        let o = super::interfaces::options(&options, &["cas", "flags"])?;
        self.0
            .api
            .registry
            .kv_put(key, value, o.flags, o.cas)
            .await
            .map_err(app_err)
    }

    /// Deletes a key (a missing key is a no-op unless cas is given).
    /// options: cas (t). Needs root or group konsul. Errors: CasConflict,
    /// NotFound, AccessDenied.
    async fn delete(
        &self,
        key: String,
        options: Dict,
        #[zbus(header)] hdr: Header<'_>,
    ) -> Result<(), Error> {
        self.0
            .allow(&hdr, Resource::Kv(key.clone()), Capability::Delete)
            .await?;
        let o = super::interfaces::options(&options, &["cas"])?;
        self.0
            .api
            .registry
            .kv_delete(key, o.cas)
            .await
            .map_err(app_err)
    }

    /// Key names starting with prefix ("" for all), sorted.
    #[zbus(out_args("keys"))]
    async fn list(
        &self,
        prefix: String,
        #[zbus(header)] hdr: Header<'_>,
    ) -> Result<Vec<String>, Error> {
        self.0
            .allow(&hdr, Resource::Kv("*".into()), Capability::List)
            .await?;
        let keys = self.0.api.registry.kv_keys().await.map_err(app_err)?;
        let mut keys: Vec<String> = keys
            .into_iter()
            .filter(|k| k.starts_with(&prefix))
            .collect();
        keys.sort();
        Ok(keys)
    }

    /// A key was set or deleted. op: "upsert" or "delete".
    #[zbus(signal)]
    pub async fn key_changed(emitter: &SignalEmitter<'_>, key: &str, op: &str) -> zbus::Result<()>;
}

#[interface(name = "io.konsul.Edge1.Devices")]
impl DevicesIface {
    /// Every device known to this edge (registered over MQTT). Each entry
    /// holds the device record's fields plus id, create_index and
    /// modify_index (t). Empty when MQTT is disabled.
    #[zbus(out_args("devices"))]
    async fn list_devices(&self, #[zbus(header)] hdr: Header<'_>) -> Result<Vec<Dict>, Error> {
        self.0
            .allow(&hdr, Resource::Edge("devices".into()), Capability::List)
            .await?;
        let list = self.0.api.devices().await?;
        Ok(list.as_array().into_iter().flatten().map(to_dict).collect())
    }

    /// One device; keys as in ListDevices. Errors: NotFound.
    #[zbus(out_args("device"))]
    async fn get_device(&self, id: String, #[zbus(header)] hdr: Header<'_>) -> Result<Dict, Error> {
        self.0
            .allow(
                &hdr,
                Resource::Edge(format!("devices/{id}")),
                Capability::Read,
            )
            .await?;
        Ok(to_dict(&self.0.api.device(id).await?))
    }

    /// Current alerts (device health monitor): each alert record's fields
    /// plus id, create_index and modify_index (t).
    #[zbus(out_args("alerts"))]
    async fn list_alerts(&self, #[zbus(header)] hdr: Header<'_>) -> Result<Vec<Dict>, Error> {
        self.0
            .allow(&hdr, Resource::Edge("alerts".into()), Capability::List)
            .await?;
        let list = self
            .0
            .api
            .registry
            .records(Kind::Alert)
            .await
            .map_err(app_err)?;
        Ok(list.iter().map(record_dict).collect())
    }

    /// A device record was created, changed or removed. op: "upsert" or
    /// "delete".
    #[zbus(signal)]
    pub async fn device_changed(
        emitter: &SignalEmitter<'_>,
        id: &str,
        op: &str,
    ) -> zbus::Result<()>;

    /// An alert was raised or updated; alert holds the record as in
    /// ListAlerts.
    #[zbus(signal)]
    pub async fn alert_raised(
        emitter: &SignalEmitter<'_>,
        id: &str,
        alert: Dict,
    ) -> zbus::Result<()>;
}

#[interface(name = "io.konsul.Edge1.Sync")]
impl SyncIface {
    /// Asks the sync client to sync with the hub as soon as it can; returns
    /// at once (watch LastSync and LastError). Needs root or group konsul.
    /// Errors: Unavailable (no hub configured), AccessDenied.
    async fn sync_now(&self, #[zbus(header)] hdr: Header<'_>) -> Result<(), Error> {
        self.0
            .allow(&hdr, Resource::Edge("sync".into()), Capability::Write)
            .await?;
        self.0.api.sync.sync_now().map_err(app_err)
    }

    /// A hub is configured (`cloud.server_address`).
    #[zbus(property)]
    fn enabled(&self) -> bool {
        self.0.api.sync.status().enabled
    }

    /// The last sync attempt reached the hub.
    #[zbus(property)]
    fn online(&self) -> bool {
        self.0.api.sync.status().online
    }

    /// Milliseconds since the epoch of the last successful sync; 0 = never.
    #[zbus(property)]
    fn last_sync(&self) -> u64 {
        self.0.api.sync.status().last_sync_ms.unwrap_or(0)
    }

    /// Changed records not yet acknowledged by the hub (the outbox depth).
    #[zbus(property)]
    fn pending_changes(&self) -> u64 {
        self.0.api.sync.status().pending_changes
    }

    /// Why the last sync attempt failed; "" when it succeeded.
    #[zbus(property)]
    fn last_error(&self) -> String {
        self.0.api.sync.status().last_error.unwrap_or_default()
    }

    /// The next round's bound on encoded updates, adapted to the link
    /// (0 before the first round).
    #[zbus(property)]
    fn batch_bytes(&self) -> u64 {
        self.0.api.sync.status().link.map_or(0, |l| l.batch_bytes)
    }

    /// The link's measured rate in bytes per second (0: not measured yet).
    #[zbus(property)]
    fn link_rate(&self) -> u64 {
        self.0
            .api
            .sync
            .status()
            .link
            .map_or(0, |l| l.rate_bytes_per_sec)
    }

    /// `cloud.data_budget` for this period in bytes; 0 = no budget.
    #[zbus(property)]
    fn data_budget(&self) -> u64 {
        self.0.api.sync.status().data_budget.map_or(0, |b| b.limit)
    }

    /// Bytes used on the link this budget period.
    #[zbus(property)]
    fn data_budget_used(&self) -> u64 {
        self.0.api.sync.status().data_budget.map_or(0, |b| b.used)
    }

    /// Bytes left this budget period.
    #[zbus(property)]
    fn data_budget_remaining(&self) -> u64 {
        self.0
            .api
            .sync
            .status()
            .data_budget
            .map_or(0, |b| b.remaining)
    }
}

#[interface(name = "io.konsul.Edge1.Ota")]
impl OtaIface {
    /// Installs a local bundle (absolute path, read by the daemon): a RAUC
    /// bundle with ota.backend rauc, else an image with its signed
    /// `<path>.manifest`. Returns at once with the deployment id; watch
    /// State and Progress. Accepted when no update is in flight (a pending
    /// reboot is superseded). Needs root or group konsul. Errors:
    /// InvalidArgument (path, manifest, signature), Unavailable (no
    /// backend, busy), AccessDenied.
    #[zbus(out_args("deployment_id"))]
    async fn install(
        &self,
        bundle: String,
        #[zbus(header)] hdr: Header<'_>,
    ) -> Result<String, Error> {
        let who = self
            .0
            .allow(&hdr, Resource::Edge("ota".into()), Capability::Write)
            .await?;
        self.0
            .api
            .check_file(&who, std::path::Path::new(&bundle))
            .await?;
        self.0.api.ota.install(&bundle).await.map_err(app_err)
    }

    /// Commits the booted new slot now (state booted-pending-commit),
    /// verified by reading the bootloader state back. Needs root or group
    /// konsul. Errors: Unavailable (nothing to commit), Failed.
    async fn mark_good(&self, #[zbus(header)] hdr: Header<'_>) -> Result<(), Error> {
        self.0
            .allow(&hdr, Resource::Edge("ota".into()), Capability::Write)
            .await?;
        self.0.api.ota.mark_good().await.map_err(app_err)
    }

    /// On the new slot: marks it bad and reboots into the old one. Before
    /// the reboot (pending-reboot): cancels the update. Needs root or group
    /// konsul. Errors: Unavailable, Failed.
    async fn mark_bad(&self, #[zbus(header)] hdr: Header<'_>) -> Result<(), Error> {
        self.0
            .allow(&hdr, Resource::Edge("ota".into()), Capability::Write)
            .await?;
        self.0.api.ota.mark_bad().await.map_err(app_err)
    }

    /// Reboots into the installed update now, outside the maintenance
    /// window and battery rule. Needs root or group konsul. Errors:
    /// Unavailable (no update waits for a reboot).
    async fn reboot(&self, #[zbus(header)] hdr: Header<'_>) -> Result<(), Error> {
        self.0
            .allow(&hdr, Resource::Edge("ota".into()), Capability::Write)
            .await?;
        self.0.api.ota.reboot().await.map_err(app_err)
    }

    /// Everything at once: backend, state, progress, phase, booted_slot,
    /// target_slot, from_slot, version, id, source, last_error, since_ms,
    /// crashes, boots (t), bootloader (a{sv}: the environment variables or
    /// RAUC's slots) and log (aa{sv}: recent transitions).
    #[zbus(out_args("status"))]
    async fn get_status(&self, #[zbus(header)] hdr: Header<'_>) -> Result<Dict, Error> {
        self.0
            .allow(&hdr, Resource::Edge("ota".into()), Capability::Read)
            .await?;
        Ok(to_dict(&self.0.api.ota_status().await))
    }

    /// "unavailable" (ota.backend: none), idle, downloading, verifying,
    /// installing, pending-reboot, booted-pending-commit, committed,
    /// rolled-back or failed.
    #[zbus(property)]
    fn state(&self) -> String {
        self.0.api.ota_state()
    }

    /// Percent done of the current step and what it is doing.
    #[zbus(property)]
    fn progress(&self) -> (u32, String) {
        let s = self.0.api.ota.status();
        (u32::from(s.progress), s.phase)
    }

    /// Why the last deployment failed or rolled back; "" otherwise.
    #[zbus(property)]
    fn last_error(&self) -> String {
        self.0.api.ota.status().deployment.last_error
    }

    /// The slot running now (boot name, e.g. "A").
    #[zbus(property)]
    fn booted_slot(&self) -> String {
        self.0.api.ota.status().booted_slot
    }

    /// The slot the current deployment went into; "" before install.
    #[zbus(property)]
    fn target_slot(&self) -> String {
        self.0.api.ota.status().deployment.target_slot
    }

    /// The current deployment's version (from its manifest); may be "".
    #[zbus(property)]
    fn version(&self) -> String {
        self.0.api.ota.status().deployment.version
    }
}

impl FirmwareIface {
    fn rollouts(&self) -> Result<&crate::firmware::rollout::Rollouts, Error> {
        self.0
            .api
            .rollouts
            .as_ref()
            .ok_or_else(|| Error::Unavailable("firmware is not enabled on this node".into()))
    }

    async fn command(
        &self,
        hdr: &Header<'_>,
        id: String,
        cmd: crate::firmware::rollout::Command,
    ) -> Result<Dict, Error> {
        self.0
            .allow(
                hdr,
                Resource::Edge(format!("rollouts/{id}")),
                Capability::Write,
            )
            .await?;
        let r = self.rollouts()?.command(id, cmd).await.map_err(app_err)?;
        Ok(to_dict(&json!(r)))
    }
}

#[interface(name = "io.konsul.Edge1.Firmware")]
impl FirmwareIface {
    /// Firmware artifacts stored on this node: sha256, device_type,
    /// version, size (t), signature, notes, created_ms (t). Upload them
    /// over HTTP (`PUT /v1/edge/firmware`): images do not travel over the
    /// bus.
    #[zbus(out_args("artifacts"))]
    async fn list_artifacts(&self, #[zbus(header)] hdr: Header<'_>) -> Result<Vec<Dict>, Error> {
        self.0
            .allow(&hdr, Resource::Edge("firmware".into()), Capability::List)
            .await?;
        let list = self.rollouts()?.artifacts().list().await.map_err(app_err)?;
        Ok(list.iter().map(|a| to_dict(&json!(a))).collect())
    }

    /// Rollouts with their settings, state (running, paused, halted,
    /// aborted, complete), reason and counts (device state -> number).
    /// A rollout defined at the hub shows, on an edge, that edge's own
    /// execution; on the hub, the operator's state, and per edge in
    /// edges (edge, state, reason, targets), with edges_complete.
    #[zbus(out_args("rollouts"))]
    async fn list_rollouts(&self, #[zbus(header)] hdr: Header<'_>) -> Result<Vec<Dict>, Error> {
        self.0
            .allow(&hdr, Resource::Edge("rollouts".into()), Capability::List)
            .await?;
        let list = self.rollouts()?.list().await.map_err(app_err)?;
        Ok(list.iter().map(|r| to_dict(&json!(r))).collect())
    }

    /// One rollout and each target device's progress: device, wave,
    /// state (waiting, offered, downloading, installing, installed,
    /// complete, failed), attempts, progress, error. Errors: NotFound.
    #[zbus(out_args("rollout", "devices"))]
    async fn get_rollout(
        &self,
        id: String,
        #[zbus(header)] hdr: Header<'_>,
    ) -> Result<(Dict, Vec<Dict>), Error> {
        self.0
            .allow(
                &hdr,
                Resource::Edge(format!("rollouts/{id}")),
                Capability::Read,
            )
            .await?;
        let (r, devices) = self.rollouts()?.get(id).await.map_err(app_err)?;
        Ok((
            to_dict(&json!(r)),
            devices.iter().map(|d| to_dict(&json!(d))).collect(),
        ))
    }

    /// Starts a rollout. spec: device_type, version (s, required); id (s),
    /// devices (as), wave_size, wave_percent, failure_threshold,
    /// max_retries (u), device_deadline (s, like "10m"); unset ones come
    /// from firmware.rollout. Needs root or group konsul. Errors:
    /// InvalidArgument, NotFound (no such artifact), CasConflict (id
    /// taken), AccessDenied.
    #[zbus(out_args("rollout"))]
    async fn start_rollout(
        &self,
        spec: Dict,
        #[zbus(header)] hdr: Header<'_>,
    ) -> Result<Dict, Error> {
        self.0
            .allow(&hdr, Resource::Edge("rollouts".into()), Capability::Write)
            .await?;
        let spec: crate::firmware::rollout::Spec = serde_json::from_value(dict_to_json(&spec))
            .map_err(|e| Error::InvalidArgument(format!("spec: {e}")))?;
        let r = self.rollouts()?.create(spec).await.map_err(app_err)?;
        Ok(to_dict(&json!(r)))
    }

    /// Stops offering (devices in flight are still tracked). Needs root
    /// or group konsul. Errors: NotFound, CasConflict (not running, or
    /// defined at the hub: command it there).
    #[zbus(out_args("rollout"))]
    async fn pause_rollout(
        &self,
        id: String,
        #[zbus(header)] hdr: Header<'_>,
    ) -> Result<Dict, Error> {
        self.command(&hdr, id, crate::firmware::rollout::Command::Pause)
            .await
    }

    /// Continues a paused rollout, or one the failure threshold halted.
    /// Needs root or group konsul.
    #[zbus(out_args("rollout"))]
    async fn resume_rollout(
        &self,
        id: String,
        #[zbus(header)] hdr: Header<'_>,
    ) -> Result<Dict, Error> {
        self.command(&hdr, id, crate::firmware::rollout::Command::Resume)
            .await
    }

    /// Ends a rollout for good; its artifact may then be evicted. Needs
    /// root or group konsul.
    #[zbus(out_args("rollout"))]
    async fn abort_rollout(
        &self,
        id: String,
        #[zbus(header)] hdr: Header<'_>,
    ) -> Result<Dict, Error> {
        self.command(&hdr, id, crate::firmware::rollout::Command::Abort)
            .await
    }
}
