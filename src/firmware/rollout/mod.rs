//! Staged rollouts of an artifact to MQTT devices.
//!
//! A rollout and each device's progress in it are replicated records
//! (`Kind::Rollout`, keys `{id}` and `{id}/{device}`), written through
//! `registry::commit`, so the hub sees progress per edge and per device,
//! and all of it is in SQLite: after `kill -9` the engine reloads it and
//! carries on from the same wave, offering nothing twice that was already
//! finished.
//!
//! The engine is one task that recomputes the next step in one store
//! transaction ("tick") whenever something it depends on changes: a status
//! report, a registration or heartbeat (the bridge wakes it), a device or
//! rollout record changing (the registry's change feed, which includes
//! records arriving from the hub), an API command, or the earliest
//! per-device deadline (the only timer; none while nothing is in flight).
//! Wakes that arrive while a tick runs coalesce into one more tick.
//! Rollouts from the hub may arrive before their artifact: the engine
//! fetches it with the shared `sync::transport::Fetcher` (Range resume,
//! `firmware.bandwidth_limit`). Host rollouts (`ota::rollout`) share the
//! record kind under keys `host/{id}`, which this engine never reads.
//!
//! Who writes what. The node that created a rollout (`created_by`) owns
//! its `{id}` record: on a standalone edge the engine keeps its state
//! there (resolved, targets, halted, complete). A rollout defined at the
//! hub is global and several edges run it, so there `{id}` is only the
//! definition and the operator's intent (running, paused, aborted, set by
//! commands at the hub), and an edge never writes it: LWW would let one
//! edge's view (its targets, its completion, its threshold halt) overwrite
//! the others'. Each edge keeps its own execution in `edge/{id}/{edge}`
//! ([`EdgeRun`]: state, reason, targets, threshold, `resumes` seen), an
//! edge-owned record that flows up to the hub and back to that edge only,
//! like its `{id}/{device}` progress; no schema change, so an older binary
//! after an A/B rollback reads the same file (it skips `edge/...` keys:
//! they contain a `/` and no rollout is called `edge`). The edge lays its
//! record over the definition (`overlay`): an operator abort ends it; its
//! own complete stands; its threshold halt stands until a resume at the
//! hub, which every resume signals by bumping `resumes` (so a resume of a
//! rollout the hub still shows as running reaches a halted edge);
//! otherwise it runs or pauses as the operator says. Commands on a hub
//! rollout at an edge are refused (409): the operator is at the hub. The
//! hub shows the operator's state, every edge's record (`edges`) and
//! `edges_complete` (every edge that has reported is complete; an edge
//! that has not synced since it saw the rollout is not counted). Device
//! ids should be unique under a hub: a second edge's device with the same
//! id is kept apart there (`sync::engine`, per-edge keys) but not listed in
//! the hub's view of the rollout.
//!
//! A tick, per rollout that is running, paused or halted (here: for a
//! hub rollout, in this edge's execution):
//! 1. on first sight, resolve the targets (devices of the type, or the
//!    listed ones, not yet at the version; sorted by id) and number their
//!    waves (`wave_size`, or `wave_percent` of the targets);
//! 2. a device whose registration or heartbeat reports the version is
//!    complete; an in-flight device past its deadline has failed an
//!    attempt; a failed attempt is retried (re-offered) up to
//!    `max_retries` times, then the device has failed;
//! 3. `failure_threshold` failed devices halt the rollout (nothing more is
//!    offered; devices in flight are still tracked); all devices finished
//!    completes it;
//! 4. while running, devices of the current wave (the first with an
//!    unfinished online device) and of earlier waves that are waiting and
//!    online get the offer on `devices/{id}/update`. Offline devices do
//!    not hold a wave back; they get the offer when they are seen again.
//!
//! The parts, one job each: `model` (the records and the API's types),
//! `records` (reading and writing them, and laying an edge's execution
//! over a hub rollout), `tick` (one step of every live rollout, and the
//! devices' status reports), `engine` (the task that runs the ticks and
//! fetches missing artifacts); this file is the handle the doors call.

mod engine;
mod model;
mod records;
mod tick;

use std::collections::BTreeMap;
use std::sync::Arc;

use super::{Artifacts, FirmwareError};
use crate::clock::wall_millis;
use crate::devices::payload::UpdateReport;
use crate::registry::Registry;
use crate::store::{Kind, StoreError};
use crate::sync::transport::Fetcher;

pub use model::Offer;
pub(crate) use model::{Command, DevState, DeviceRollout, Rollout, Spec, State, Summary};
pub(crate) use records::pinned_artifacts;
use records::{
    get_rollout, load_local, load_progress, localize, summary, write_rollout, RUN_PREFIX,
};
use tick::apply_reports;

/// Offers waiting for the MQTT bridge; past this the offer is dropped and
/// the device's deadline brings it back.
const OFFER_QUEUE: usize = 8192;

/// The rollout engine's handle. Cheap to clone.
#[derive(Clone)]
pub struct Rollouts {
    inner: Arc<Inner>,
}

struct Inner {
    registry: Registry,
    artifacts: Artifacts,
    /// Fetches the artifacts of rollouts from the hub (capped at
    /// `firmware.bandwidth_limit`).
    fetcher: Option<Fetcher>,
    wake_tx: async_channel::Sender<()>,
    wake_rx: async_channel::Receiver<()>,
    offers_tx: async_channel::Sender<Offer>,
    /// Notified after every tick, for those that wait on a rollout's end.
    ticked: event_listener::Event,
}

fn valid_id(id: &str) -> bool {
    crate::devices::payload::valid_id(id) && id.len() <= 64
}

impl Rollouts {
    /// The handle and the offers for the bridge to publish.
    pub(crate) fn new(
        registry: Registry,
        artifacts: Artifacts,
        fetcher: Option<Fetcher>,
    ) -> (Rollouts, async_channel::Receiver<Offer>) {
        let (wake_tx, wake_rx) = async_channel::bounded(1);
        let (offers_tx, offers_rx) = async_channel::bounded(OFFER_QUEUE);
        (
            Rollouts {
                inner: Arc::new(Inner {
                    registry,
                    artifacts,
                    fetcher,
                    wake_tx,
                    wake_rx,
                    offers_tx,
                    ticked: event_listener::Event::new(),
                }),
            },
            offers_rx,
        )
    }

    pub(crate) fn artifacts(&self) -> &Artifacts {
        &self.inner.artifacts
    }

    /// Fires after the next tick (a rollout may have moved on). Take it
    /// before reading the rollouts, so no tick falls in between.
    #[cfg_attr(not(feature = "hawkbit"), allow(dead_code))]
    pub(crate) fn ticked(&self) -> event_listener::EventListener {
        self.inner.ticked.listen()
    }

    /// Asks for a tick; wakes coalesce.
    pub(crate) fn wake(&self) {
        let _ = self.inner.wake_tx.try_send(());
    }

    /// Status reports from `devices/{id}/update/status`, in one
    /// transaction. Only the MQTT bridge calls it.
    #[cfg_attr(not(feature = "mqtt"), allow(dead_code))]
    pub(crate) async fn report(
        &self,
        reports: Vec<(String, UpdateReport)>,
    ) -> Result<(), StoreError> {
        let changed = self
            .inner
            .registry
            .store()
            .call(move |db| db.tx(|tx| apply_reports(tx, &reports)))
            .await??;
        if changed {
            self.wake();
        }
        Ok(())
    }

    /// Creates a rollout (running) after re-verifying its artifact.
    pub(crate) async fn create(&self, spec: Spec) -> Result<Rollout, FirmwareError> {
        let (id, deadline) = self.check(&spec)?;
        let defaults = &self.inner.artifacts.settings().defaults;
        let artifact = self
            .inner
            .artifacts
            .resolve(spec.version.clone(), Some(spec.device_type.clone()))
            .await?;
        // Verified before use: the bytes on disk and the signature, now.
        self.inner.artifacts.verify_stored(&artifact).await?;
        let r = Rollout {
            id: id.clone(),
            device_type: spec.device_type,
            version: spec.version,
            sha256: artifact.sha256,
            size: artifact.size,
            signature: artifact.signature,
            devices: spec.devices,
            wave_size: spec.wave_size.unwrap_or(defaults.wave_size),
            wave_percent: spec.wave_percent,
            failure_threshold: spec.failure_threshold.unwrap_or(defaults.failure_threshold),
            device_deadline_ms: deadline.0.as_millis() as u64,
            max_retries: spec.max_retries.unwrap_or(defaults.max_retries),
            state: State::Running,
            reason: String::new(),
            resolved: false,
            targets: 0,
            created_ms: wall_millis(),
            created_by: String::new(),
            resumes: 0,
        };
        let r = self
            .inner
            .registry
            .store()
            .call(move |db| {
                db.tx(|tx| {
                    if tx.get(Kind::Rollout, &r.id)?.is_some() {
                        return Err(FirmwareError::Conflict {
                            what: format!("rollout {} already exists", r.id),
                        });
                    }
                    let r = Rollout {
                        created_by: tx.node_id().to_owned(),
                        ..r
                    };
                    write_rollout(tx, &r)?;
                    Ok(r)
                })
            })
            .await??;
        log::info!("rollout {id} created: {} {}", r.device_type, r.version);
        self.wake();
        Ok(r)
    }

    /// The spec's checks that need no store: its id (the one given, or a
    /// new one) and device deadline, or the field at fault.
    pub(crate) fn check(
        &self,
        spec: &Spec,
    ) -> Result<(String, crate::config::Duration), FirmwareError> {
        let defaults = &self.inner.artifacts.settings().defaults;
        let invalid = |field, message: String| FirmwareError::Invalid { field, message };
        let id = spec.id.clone().unwrap_or_else(|| {
            format!(
                "{}-{}-{:06x}",
                spec.device_type,
                spec.version,
                fastrand::u32(..0xFF_FFFF)
            )
        });
        if !valid_id(&id) {
            return Err(invalid(
                "id",
                format!("`{}`: 1-64 of A-Z a-z 0-9 - _ . :", id.escape_debug()),
            ));
        }
        if id == "host" || id == "status" || id == RUN_PREFIX {
            // `{id}/...` would take in the host rollouts (`host/{id}`),
            // the OTA reports (`status/{node}`) or the per-edge executions
            // (`edge/{rollout}/{edge}`) as this rollout's devices.
            return Err(invalid("id", format!("`{id}` is reserved")));
        }
        if spec
            .devices
            .iter()
            .any(|d| !crate::devices::payload::valid_id(d))
        {
            return Err(invalid(
                "devices",
                "device ids are 1-128 of A-Z a-z 0-9 - _ . :".into(),
            ));
        }
        if spec.wave_size == Some(0) {
            return Err(invalid("wave_size", "must be at least 1".into()));
        }
        if spec.wave_percent.is_some_and(|p| !(1..=100).contains(&p)) {
            return Err(invalid("wave_percent", "must be 1-100".into()));
        }
        let deadline = match &spec.device_deadline {
            None => defaults.device_deadline,
            Some(s) => s
                .parse::<crate::config::Duration>()
                .map_err(|e| invalid("device_deadline", e))?,
        };
        if deadline.is_zero() {
            return Err(invalid("device_deadline", "must be greater than 0s".into()));
        }
        Ok((id, deadline))
    }

    pub(crate) async fn list(&self) -> Result<Vec<Summary>, FirmwareError> {
        Ok(self
            .inner
            .registry
            .store()
            .call(|db| {
                db.tx(|tx| {
                    let mut out = Vec::new();
                    for l in load_local(tx)? {
                        let mut counts = BTreeMap::new();
                        for d in load_progress(tx, &l.rollout.id)? {
                            let k = serde_json::to_value(d.state)
                                .ok()
                                .and_then(|v| v.as_str().map(str::to_owned))
                                .unwrap_or_default();
                            *counts.entry(k).or_insert(0) += 1;
                        }
                        out.push(summary(tx, l.rollout, Some(counts))?);
                    }
                    Ok::<_, StoreError>(out)
                })
            })
            .await??)
    }

    /// One rollout (without counts) and its devices' progress.
    pub(crate) async fn get(
        &self,
        id: String,
    ) -> Result<(Summary, Vec<DeviceRollout>), FirmwareError> {
        let what = format!("rollout {id}");
        let found = self
            .inner
            .registry
            .store()
            .call(move |db| {
                db.tx(|tx| {
                    let Some((r, owner)) = get_rollout(tx, &id)? else {
                        return Ok(None);
                    };
                    let l = localize(tx, r, &owner)?;
                    let devices = load_progress(tx, &id)?;
                    Ok::<_, StoreError>(Some((summary(tx, l.rollout, None)?, devices)))
                })
            })
            .await??;
        found.ok_or(FirmwareError::NotFound { what })
    }

    /// Pause, resume or abort. On an edge under a hub, only rollouts this
    /// edge created: the hub's are commanded at the hub.
    pub(crate) async fn command(&self, id: String, cmd: Command) -> Result<Rollout, FirmwareError> {
        let upstream = self.inner.fetcher.is_some();
        let r = self
            .inner
            .registry
            .store()
            .call(move |db| {
                db.tx(|tx| {
                    let Some((mut r, _)) = get_rollout(tx, &id)? else {
                        return Err(FirmwareError::NotFound {
                            what: format!("rollout {id}"),
                        });
                    };
                    if upstream && r.created_by != tx.node_id() {
                        // Its operator is at the hub, for every edge; a
                        // local write would be merged away (LWW) or stop
                        // the other edges.
                        return Err(FirmwareError::Conflict {
                            what: format!(
                                "rollout {id} was defined at the hub (node {}); pause, resume or abort it there",
                                r.created_by
                            ),
                        });
                    }
                    let next = match (cmd, r.state) {
                        (Command::Pause, State::Running | State::Paused) => State::Paused,
                        // Resuming a halted rollout is the operator's
                        // override of the threshold.
                        (Command::Resume, State::Paused | State::Running | State::Halted) => {
                            State::Running
                        }
                        (Command::Abort, s) if s.is_live() => State::Aborted,
                        (_, s) => {
                            return Err(FirmwareError::Conflict {
                                what: format!("rollout {id} is {s:?}; cannot {cmd:?}")
                                    .to_lowercase(),
                            })
                        }
                    };
                    // Every resume is written, even of a running rollout:
                    // it is how the edges running a hub rollout learn to
                    // clear their own threshold halts (`resumes`).
                    if next != r.state || cmd == Command::Resume {
                        if cmd == Command::Resume {
                            r.resumes = r.resumes.saturating_add(1);
                        }
                        if cmd == Command::Resume && r.state == State::Halted {
                            // The threshold counts from here again.
                            r.failure_threshold = r.failure_threshold.saturating_add(
                                load_progress(tx, &id)?
                                    .iter()
                                    .filter(|d| d.state == DevState::Failed)
                                    .count() as u32,
                            );
                        }
                        r.state = next;
                        r.reason = format!("{cmd:?} by operator").to_lowercase();
                        write_rollout(tx, &r)?;
                    }
                    Ok(r)
                })
            })
            .await??;
        log::info!("rollout {}: {:?}", r.id, r.state);
        self.wake();
        Ok(r)
    }
}
