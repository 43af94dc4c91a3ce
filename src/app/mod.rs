//! The application core: what the node can do, behind every door.
//!
//! HTTP (TCP and the Unix socket), D-Bus and the CLI (a D-Bus client) are
//! adapters: they say who is asking ([`Caller`]), ask [`App::identify`] and
//! [`App::check`] (the one access decision, [`crate::acl::Acl::decide`]),
//! call a use case, and translate an [`AppError`] into their own wire form
//! with one exhaustive map each. Views that more than one door shows (the
//! node status, devices with their health) are assembled here once, so the
//! doors cannot drift apart.
//!
//! A request that names a file on this machine (an OTA bundle path) is
//! served only when the caller could read that file itself: the daemon
//! runs with rights its callers may lack and must not lend them
//! ([`App::check_file`]).

mod error;

use std::path::Path;
use std::sync::Arc;

use serde_json::{json, Value};

pub use error::AppError;

use crate::acl::{Acl, Caller, Capability, Principal, PrincipalKind, Resource};
use crate::metrics::Metrics;
use crate::registry::Registry;

pub struct App {
    pub registry: Registry,
    pub devices: crate::devices::Devices,
    pub sync: crate::sync::SyncHandle,
    /// Set in hub mode: serves `POST /v1/edge/sync` and `/v1/edge/edges`.
    pub hub: Option<crate::sync::Hub>,
    pub metrics: Arc<Metrics>,
    /// Memory budget and pressure (`resources.memory_limit`).
    pub limits: crate::limits::Limits,
    /// The A/B OTA coordinator.
    pub ota: crate::ota::Ota,
    /// The hawkBit DDI client driving it, if configured.
    #[cfg(feature = "hawkbit")]
    pub hawkbit: Option<crate::hawkbit::Hawkbit>,
    pub max_body: u64,
    /// `KONSUL_TEST_HOOKS=1`: enables `/v1/edge/debug/*`.
    pub test_hooks: bool,
    /// Firmware artifacts and rollouts.
    pub rollouts: Option<crate::firmware::rollout::Rollouts>,
    pub acl: Acl,
}

impl App {
    /// The OTA status every door shows: the coordinator's, with the
    /// update server driving it (`hawkbit`) when there is one.
    pub async fn ota_status(&self) -> Value {
        #[allow(unused_mut)]
        let mut j = self.ota.status_json().await;
        #[cfg(feature = "hawkbit")]
        if let (Some(h), Some(m)) = (&self.hawkbit, j.as_object_mut()) {
            m.insert("hawkbit".into(), json!(h.status()));
        }
        j
    }

    /// The OTA metrics, with the update server's.
    pub fn render_ota_metrics(&self, out: &mut String) {
        crate::ota::render_metrics(&self.ota.status(), self.ota.enabled(), out);
        #[cfg(feature = "hawkbit")]
        if let Some(h) = &self.hawkbit {
            h.render_metrics(out);
        }
    }

    /// Who is asking. A wrong token is an error, never anonymous.
    pub async fn identify(&self, caller: Caller) -> Result<Principal, AppError> {
        Ok(self.acl.identify_async(caller).await?)
    }

    /// The one access decision every door calls.
    pub fn check(
        &self,
        who: &Principal,
        resource: Resource,
        cap: Capability,
    ) -> Result<(), AppError> {
        let decided = self.acl.decide(who, &resource, cap);
        self.metrics.acl_decision(decided.is_ok());
        Ok(decided?)
    }

    /// A path named in a request is used only if the caller could read it.
    /// Local callers are judged by their uid and groups; a token caller's
    /// identity on this machine is unknown, so only an admin token may name
    /// a path (it could install the same bundle by uploading it anyway).
    pub async fn check_file(&self, who: &Principal, path: &Path) -> Result<(), AppError> {
        let refused = || AppError::Forbidden {
            resource: "edge",
            capability: "read",
            path: "file named in the request".into(),
        };
        match (&who.kind, &who.creds) {
            (PrincipalKind::Internal, _) => Ok(()),
            (PrincipalKind::Local, Some(creds)) => {
                let creds = creds.clone();
                let path = path.to_path_buf();
                let readable = smol::unblock(move || crate::acl::may_read(&creds, &path)).await;
                if readable {
                    Ok(())
                } else {
                    log::info!("{} named a file it cannot read; refused", who.name);
                    Err(refused())
                }
            }
            (PrincipalKind::Token, _) if who.is_admin() => Ok(()),
            _ => Err(refused()),
        }
    }

    /// Registering needs `register` on the service's name. Replacing an
    /// existing registration that differs needs `write` on it too, so an
    /// app allowed to register cannot take over another's service (the
    /// address of `web` swapped for its own).
    pub async fn may_register(
        &self,
        who: &Principal,
        input: &crate::registry::ServiceInput,
    ) -> Result<(), AppError> {
        self.check(
            who,
            Resource::Service(input.name.clone()),
            Capability::Register,
        )?;
        if self.acl.allows(
            who,
            &Resource::Service(input.name.clone()),
            Capability::Write,
        ) {
            return Ok(());
        }
        let id = input.id.clone().unwrap_or_else(|| input.name.clone());
        let existing = match self.registry.service(id).await {
            Ok(e) => e.service,
            Err(crate::registry::RegistryError::NotFound { .. }) => return Ok(()),
            Err(e) => return Err(e.into()),
        };
        let same = existing.name == input.name
            && existing.address == input.address
            && i64::from(existing.port) == input.port
            && existing.tags == input.tags
            && existing.meta == input.meta;
        if same {
            return Ok(());
        }
        self.check(who, Resource::Service(existing.name), Capability::Write)
    }

    /// The node's status: one view for `GET /v1/edge/status`, D-Bus
    /// `Status` and `konsul-edge status`.
    pub async fn status(&self) -> Result<Value, AppError> {
        let stats = self.registry.store().call(|db| db.stats()).await??;
        let count = |k: crate::store::Kind| {
            stats
                .live
                .iter()
                .find(|(kind, _)| *kind == k)
                .map_or(0, |(_, n)| *n)
        };
        use crate::store::Kind;
        Ok(json!({
            "node_id": self.registry.store().node_id(),
            "version": env!("CARGO_PKG_VERSION"),
            "mode": if self.hub.is_some() { "hub" } else { "edge" },
            "uptime_seconds": self.metrics.uptime_secs(),
            "summary": crate::systemd::summary(&stats),
            "services": count(Kind::Service),
            "keys": count(Kind::Kv),
            "devices": count(Kind::Device),
            "alerts": count(Kind::Alert),
            "outbox_pending": stats.outbox,
            "db_bytes": stats.file_bytes,
            "db_max_bytes": stats.max_bytes,
            "modify_index": stats.index,
            "sync": self.sync.status(),
            "memory": {
                "limit_bytes": self.limits.memory_limit(),
                "shedding": self.limits.shedding(),
            },
            "ota": {"state": self.ota_state()},
        }))
    }

    /// "unavailable" without a backend, else the deployment's state.
    pub fn ota_state(&self) -> String {
        if !self.ota.enabled() {
            return "unavailable".into();
        }
        self.ota.status().deployment.state.as_str().to_owned()
    }

    /// Devices with their health, battery, signal and last-seen times:
    /// the same view over HTTP and D-Bus.
    pub async fn devices(&self) -> Result<Value, AppError> {
        Ok(json!(self.devices.list().await?))
    }

    pub async fn device(&self, id: String) -> Result<Value, AppError> {
        Ok(json!(self.devices.get(id).await?))
    }
}
