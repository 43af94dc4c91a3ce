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

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use rusqlite::params;
use serde::{Deserialize, Serialize};
use serde_json::json;
use smol::future::FutureExt;

use super::{Artifacts, FirmwareError};
use crate::clock::wall_millis;
use crate::mqtt::payload::UpdateReport;
use crate::registry::{self, Registry};
use crate::store::{Kind, StoreError, Tx};
use crate::support::Shutdown;
use crate::sync::transport::{Fetcher, FETCH_RETRY};

/// Offers waiting for the MQTT bridge; past this the offer is dropped and
/// the device's deadline brings it back.
const OFFER_QUEUE: usize = 8192;
/// Progress is written (replicated) in steps of this many percent.
const PROGRESS_STEP: u8 = 10;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum State {
    Running,
    Paused,
    Halted,
    Aborted,
    Complete,
}

impl State {
    /// Still tracks devices (and pins its artifact).
    pub fn is_live(self) -> bool {
        matches!(self, State::Running | State::Paused | State::Halted)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DevState {
    Waiting,
    Offered,
    Downloading,
    Installing,
    /// The device said `complete`; done once it reports the version.
    Installed,
    Complete,
    Failed,
}

impl DevState {
    fn in_flight(self) -> bool {
        matches!(
            self,
            DevState::Offered | DevState::Downloading | DevState::Installing | DevState::Installed
        )
    }
    fn finished(self) -> bool {
        matches!(self, DevState::Complete | DevState::Failed)
    }
}

/// The rollout record (key `{id}`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Rollout {
    pub id: String,
    pub device_type: String,
    pub version: String,
    pub sha256: String,
    pub size: u64,
    pub signature: String,
    /// Explicit targets; empty = every device of the type.
    #[serde(default)]
    pub devices: Vec<String>,
    pub wave_size: u32,
    #[serde(default)]
    pub wave_percent: Option<u32>,
    pub failure_threshold: u32,
    pub device_deadline_ms: u64,
    pub max_retries: u32,
    pub state: State,
    #[serde(default)]
    pub reason: String,
    /// Targets resolved (the device records exist).
    #[serde(default)]
    pub resolved: bool,
    #[serde(default)]
    pub targets: u32,
    pub created_ms: u64,
    /// The node that created the rollout: the only one that writes this
    /// record besides operator commands. Records from before this field
    /// take the record's origin.
    #[serde(default)]
    pub created_by: String,
    /// Operator resumes so far. An edge running a rollout from the hub
    /// clears its own threshold halt when this passes the count it last
    /// acted on (`EdgeRun::resumes`).
    #[serde(default)]
    pub resumes: u32,
}

/// One edge's execution of a rollout it did not create (one defined at
/// the hub), key `edge/{rollout}/{edge}`. Written only by that edge, so
/// it flows up to the hub and back to that edge alone; edges never write
/// the shared `{rollout}` record, which several of them would otherwise
/// overwrite by LWW. Its absence means "targets not resolved yet".
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EdgeRun {
    pub rollout: String,
    pub edge: String,
    /// This edge's state: running or paused as the operator says, or its
    /// own halted (threshold) or complete; aborted once the operator was.
    pub state: State,
    #[serde(default)]
    pub reason: String,
    /// Devices of this edge in the rollout.
    pub targets: u32,
    /// The threshold in force here: a resume after a halt raises it by
    /// the failures so far, as on a standalone edge.
    pub failure_threshold: u32,
    /// The rollout's `resumes` this edge has acted on.
    pub resumes: u32,
}

/// One device's progress in a rollout (key `{rollout}/{device}`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeviceRollout {
    pub rollout: String,
    pub device: String,
    pub wave: u32,
    pub state: DevState,
    pub attempts: u32,
    pub progress: u8,
    #[serde(default)]
    pub error: String,
    #[serde(default)]
    pub offered_ms: u64,
    #[serde(default)]
    pub deadline_ms: u64,
}

/// What `POST /v1/edge/rollouts` takes; unset fields come from
/// `firmware.rollout` in the config.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Spec {
    #[serde(default)]
    pub id: Option<String>,
    pub device_type: String,
    pub version: String,
    #[serde(default)]
    pub devices: Vec<String>,
    #[serde(default)]
    pub wave_size: Option<u32>,
    #[serde(default)]
    pub wave_percent: Option<u32>,
    #[serde(default)]
    pub failure_threshold: Option<u32>,
    /// `30s`, `10m`, ...
    #[serde(default)]
    pub device_deadline: Option<String>,
    #[serde(default)]
    pub max_retries: Option<u32>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    Pause,
    Resume,
    Abort,
}

/// A rollout as this node sees it, with its per-state device counts (in
/// the list). For a rollout from the hub, an edge shows its own execution
/// in `state`, `reason`, `targets`; the hub shows the operator's state
/// (running, paused, aborted) and each edge's execution in `edges`.
#[derive(Debug, Clone, Serialize)]
pub struct Summary {
    #[serde(flatten)]
    pub rollout: Rollout,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub counts: Option<BTreeMap<String, u32>>,
    /// The per-edge executions this node holds: every edge's at the hub,
    /// its own at an edge.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub edges: Vec<EdgeRun>,
    /// Every edge in `edges` is complete. Only edges that have synced
    /// since they saw the rollout are there: an edge that has not yet is
    /// not waited for.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub edges_complete: Option<bool>,
}

/// An offer for the bridge to publish.
#[derive(Debug, Clone)]
pub struct Offer {
    pub topic: String,
    pub payload: Vec<u8>,
}

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
}

/// Artifacts that live rollouts name, and the bundles host rollouts serve
/// from here (`ota::rollout`, until deleted): never evicted.
pub fn pinned_artifacts(tx: &Tx<'_>) -> Result<HashSet<String>, StoreError> {
    let hosts =
        crate::ota::rollout::load(tx.conn()).map_err(|e| tx.sql_error("list host rollouts", e))?;
    Ok(load_local(tx)?
        .into_iter()
        .filter(|l| l.rollout.state.is_live())
        .map(|l| l.rollout.sha256)
        .chain(
            hosts
                .into_iter()
                .filter(|r| r.url.is_empty())
                .map(|r| r.sha256),
        )
        .collect())
}

fn bad_record(key: &str, e: serde_json::Error) -> StoreError {
    StoreError::BadRecord {
        kind: "rollout".into(),
        key: key.into(),
        detail: e.to_string(),
    }
}

/// A rollout record's body; `origin` stands in for `created_by` in
/// records from before that field.
fn parse_rollout(key: &str, body: &str, origin: &str) -> Result<Rollout, StoreError> {
    let mut r: Rollout = serde_json::from_str(body).map_err(|e| bad_record(key, e))?;
    if r.created_by.is_empty() {
        r.created_by = origin.to_owned();
    }
    Ok(r)
}

/// Every rollout, with its record's owner (the downstream edge it came
/// from at a hub, '' for this node's own or a global one).
fn load_rollouts(tx: &Tx<'_>) -> Result<Vec<(Rollout, String)>, StoreError> {
    let rows: Vec<(String, String, String, String)> = tx
        .conn()
        .prepare_cached(
            "SELECT key, body, origin, owner FROM records WHERE kind = 'rollout'
             AND tombstone = 0 AND instr(key, '/') = 0 ORDER BY key",
        )
        .and_then(|mut s| {
            s.query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)))?
                .collect()
        })
        .map_err(|e| tx.sql_error("list rollouts", e))?;
    rows.into_iter()
        .map(|(k, b, o, owner)| Ok((parse_rollout(&k, &b, &o)?, owner)))
        .collect()
}

fn get_rollout(tx: &Tx<'_>, id: &str) -> Result<Option<(Rollout, String)>, StoreError> {
    tx.get(Kind::Rollout, id)?
        .filter(|r| !r.tombstone)
        .map(|rec| Ok((parse_rollout(id, &rec.body, &rec.origin)?, rec.owner)))
        .transpose()
}

/// Key prefix of the per-edge executions (`edge/{rollout}/{edge}`); the
/// rollout id `edge` is reserved so `{id}/` never takes them in.
const RUN_PREFIX: &str = "edge";

fn run_key(rollout: &str, edge: &str) -> String {
    format!("{RUN_PREFIX}/{rollout}/{edge}")
}

/// Every edge's execution of `id` held here.
fn load_runs(tx: &Tx<'_>, id: &str) -> Result<Vec<EdgeRun>, StoreError> {
    load_under(tx, &format!("{RUN_PREFIX}/{id}/"), "list rollout edges")
}

/// The rollout records whose keys start with `prefix` (which ends in `/`),
/// in key order. `0` sorts right after `/`, so the range is exactly the
/// prefix.
fn load_under<T: serde::de::DeserializeOwned>(
    tx: &Tx<'_>,
    prefix: &str,
    what: &'static str,
) -> Result<Vec<T>, StoreError> {
    let end = format!("{}0", prefix.trim_end_matches('/'));
    let rows: Vec<(String, String)> = tx
        .conn()
        .prepare_cached(
            "SELECT key, body FROM records WHERE kind = 'rollout' AND tombstone = 0
             AND key > ?1 AND key < ?2 ORDER BY key",
        )
        .and_then(|mut s| {
            s.query_map(params![prefix, end], |r| Ok((r.get(0)?, r.get(1)?)))?
                .collect()
        })
        .map_err(|e| tx.sql_error(what, e))?;
    rows.into_iter()
        .map(|(k, b)| serde_json::from_str(&b).map_err(|e| bad_record(&k, e)))
        .collect()
}

fn load_run(tx: &Tx<'_>, id: &str, edge: &str) -> Result<Option<EdgeRun>, StoreError> {
    let key = run_key(id, edge);
    tx.get(Kind::Rollout, &key)?
        .filter(|r| !r.tombstone)
        .map(|rec| serde_json::from_str(&rec.body).map_err(|e| bad_record(&key, e)))
        .transpose()
}

fn write_run(tx: &mut Tx<'_>, run: &EdgeRun) -> Result<(), StoreError> {
    let key = run_key(&run.rollout, &run.edge);
    registry::commit(tx, Kind::Rollout, &key, None, Some(registry::to_body(run)?)).map(drop)
}

/// Lays this edge's execution over a rollout it did not create: the
/// operator's abort ends it, this edge's own complete (or abort) stands,
/// its threshold halt stands until the operator resumes again (`resumes`
/// grew), and otherwise it runs or pauses as the operator says.
fn overlay(r: &mut Rollout, run: &EdgeRun) {
    r.resolved = true;
    r.targets = run.targets;
    r.failure_threshold = run.failure_threshold;
    let own = match (r.state, run.state) {
        (State::Aborted, _) => false,
        (_, State::Complete | State::Aborted) => true,
        (_, State::Halted) => r.resumes == run.resumes,
        // Only engines write these, never the operator: an older edge's
        // view (during an upgrade), not this edge's business.
        (State::Complete | State::Halted, _) => true,
        _ => false,
    };
    if own {
        r.state = run.state;
        r.reason = run.reason.clone();
    }
}

/// A rollout as this node runs it: `run` is `Some` for one it did not
/// create (the execution so far, `None` inside when not resolved yet).
struct Local {
    rollout: Rollout,
    run: Option<Option<EdgeRun>>,
}

/// `owner`: at a hub, an edge's own rollout is shown as that edge keeps
/// it; only a global rollout this node did not create has a local run.
fn localize(tx: &Tx<'_>, mut r: Rollout, owner: &str) -> Result<Local, StoreError> {
    if r.created_by == tx.node_id() || !owner.is_empty() {
        return Ok(Local {
            rollout: r,
            run: None,
        });
    }
    let run = load_run(tx, &r.id, tx.node_id())?;
    if let Some(run) = &run {
        overlay(&mut r, run);
    }
    Ok(Local {
        rollout: r,
        run: Some(run),
    })
}

fn load_local(tx: &Tx<'_>) -> Result<Vec<Local>, StoreError> {
    load_rollouts(tx)?
        .into_iter()
        .map(|(r, owner)| localize(tx, r, &owner))
        .collect()
}

fn load_progress(tx: &Tx<'_>, id: &str) -> Result<Vec<DeviceRollout>, StoreError> {
    load_under(tx, &format!("{id}/"), "list rollout devices")
}

fn write_rollout(tx: &mut Tx<'_>, r: &Rollout) -> Result<(), StoreError> {
    registry::commit(tx, Kind::Rollout, &r.id, None, Some(registry::to_body(r)?)).map(drop)
}

fn write_device(tx: &mut Tx<'_>, d: &DeviceRollout) -> Result<(), StoreError> {
    let key = format!("{}/{}", d.rollout, d.device);
    registry::commit(tx, Kind::Rollout, &key, None, Some(registry::to_body(d)?)).map(drop)
}

/// What the tick needs to know of a device.
struct DeviceInfo {
    device_type: String,
    firmware_version: String,
    online: bool,
}

fn device_infos(tx: &Tx<'_>) -> Result<HashMap<String, DeviceInfo>, StoreError> {
    let state: HashMap<String, String> = tx
        .conn()
        .prepare_cached("SELECT id, health FROM device_state")
        .and_then(|mut s| s.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?.collect())
        .map_err(|e| tx.sql_error("read device state", e))?;
    let rows: Vec<(String, String)> = tx
        .conn()
        .prepare_cached("SELECT key, body FROM records WHERE kind = 'device' AND tombstone = 0")
        .and_then(|mut s| s.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?.collect())
        .map_err(|e| tx.sql_error("list devices", e))?;
    let mut out = HashMap::with_capacity(rows.len());
    for (id, body) in rows {
        let Ok(d) = serde_json::from_str::<crate::devices::Device>(&body) else {
            continue;
        };
        // The health monitor's view. Its transitions raise or clear the
        // offline alert, a change the engine wakes on, so a device coming
        // back is offered as soon as the monitor has recorded it.
        let online = state.get(&id).is_some_and(|h| h != "offline");
        out.insert(
            id,
            DeviceInfo {
                device_type: d.device_type,
                firmware_version: d.firmware_version,
                online,
            },
        );
    }
    Ok(out)
}

/// A failed attempt: retried while retries are left, else final.
fn fail_attempt(d: &mut DeviceRollout, r: &Rollout, error: String) {
    d.error = error;
    d.progress = 0;
    d.deadline_ms = 0;
    d.state = if d.attempts > r.max_retries {
        DevState::Failed
    } else {
        DevState::Waiting
    };
}

fn offer_for(r: &Rollout, d: &DeviceRollout, base_url: &str) -> Offer {
    let payload = json!({
        "rollout": r.id,
        "version": r.version,
        "url": format!("{base_url}/v1/edge/firmware/{}", r.sha256),
        "size": r.size,
        "sha256": r.sha256,
        "signature": r.signature,
        "attempt": d.attempts,
    });
    Offer {
        topic: format!("devices/{}/update", d.device),
        payload: payload.to_string().into_bytes(),
    }
}

/// What a tick did.
#[derive(Default)]
struct Step {
    offers: Vec<Offer>,
    next_deadline: Option<u64>,
    /// Live rollouts whose artifact this node does not hold.
    missing: Vec<Rollout>,
}

/// One step of every live rollout (see the module docs). `resend`:
/// publish again the offers of devices still in `offered` (the edge may
/// have died between the commit and the publish).
fn tick(tx: &mut Tx<'_>, now: u64, base_url: &str, resend: bool) -> Result<Step, StoreError> {
    let mut step = Step::default();
    let mut rollouts = Vec::new();
    for l in load_local(tx)? {
        if l.rollout.state.is_live() {
            rollouts.push(l);
        } else if let Some(Some(run)) = &l.run {
            if run.state.is_live() {
                // Aborted at the hub: this edge's execution says so too.
                let r = &l.rollout;
                let done = EdgeRun {
                    state: r.state,
                    reason: r.reason.clone(),
                    ..run.clone()
                };
                write_run(tx, &done)?;
            }
        }
    }
    if rollouts.is_empty() {
        return Ok(step);
    }
    let infos = device_infos(tx)?;
    for Local {
        rollout: mut r,
        run,
    } in rollouts
    {
        let before = r.clone();
        let mut devs = load_progress(tx, &r.id)?;
        let mut dirty: Vec<bool> = vec![false; devs.len()];
        if let Some(None) = &run {
            // Not resolved here yet: whatever an older edge wrote into the
            // shared record is not this edge's execution.
            r.resolved = false;
            r.targets = 0;
        }
        if let Some(Some(prev)) = &run {
            if prev.state == State::Halted && r.state != State::Halted {
                // A resume at the hub since this edge halted: the
                // operator's override, so the threshold counts from the
                // failures so far, as a resume on a standalone edge does.
                let failed = devs.iter().filter(|d| d.state == DevState::Failed).count();
                r.failure_threshold = r.failure_threshold.saturating_add(failed as u32);
            }
        }
        if !r.resolved {
            let mut ids: Vec<&String> = if r.devices.is_empty() {
                infos
                    .iter()
                    .filter(|(_, i)| i.device_type == r.device_type)
                    .map(|(id, _)| id)
                    .collect()
            } else {
                r.devices
                    .iter()
                    .filter(|id| infos.contains_key(*id))
                    .collect()
            };
            ids.sort();
            let n = ids.len() as u32;
            let wave = match r.wave_percent {
                Some(p) => (n * p.clamp(1, 100)).div_ceil(100).max(1),
                None => r.wave_size.max(1),
            };
            // Progress this edge already holds is kept: a rollout an older
            // binary resolved (it said so in the shared record) has no
            // execution record here yet, and must not start over.
            let known: HashSet<String> = devs.iter().map(|d| d.device.clone()).collect();
            for (i, id) in ids.into_iter().enumerate() {
                if known.contains(id) {
                    continue;
                }
                devs.push(DeviceRollout {
                    rollout: r.id.clone(),
                    device: id.clone(),
                    wave: i as u32 / wave,
                    state: DevState::Waiting,
                    attempts: 0,
                    progress: 0,
                    error: String::new(),
                    offered_ms: 0,
                    deadline_ms: 0,
                });
                dirty.push(true);
            }
            r.resolved = true;
            r.targets = n;
            log::info!(
                "rollout {}: {} {} to {n} devices in waves of {wave}",
                r.id,
                r.device_type,
                r.version
            );
        }
        // 2: completions and deadlines.
        for (d, dirty) in devs.iter_mut().zip(dirty.iter_mut()) {
            if d.state.finished() {
                continue;
            }
            let info = infos.get(&d.device);
            if info.is_some_and(|i| i.firmware_version == r.version) {
                d.state = DevState::Complete;
                d.progress = 100;
                d.deadline_ms = 0;
                d.error.clear();
                *dirty = true;
            } else if d.state.in_flight() && d.deadline_ms > 0 && now >= d.deadline_ms {
                fail_attempt(
                    d,
                    &r,
                    format!("not updated within {} ms", r.device_deadline_ms),
                );
                *dirty = true;
            }
        }
        // 3: threshold and completion.
        let failed = devs.iter().filter(|d| d.state == DevState::Failed).count() as u32;
        if r.state == State::Running && r.failure_threshold > 0 && failed >= r.failure_threshold {
            r.state = State::Halted;
            r.reason = format!(
                "{failed} devices failed (failure_threshold {}); no further offers",
                r.failure_threshold
            );
            log::warn!("rollout {} halted: {}", r.id, r.reason);
        }
        if devs.iter().all(|d| d.state.finished()) {
            r.state = State::Complete;
            r.reason = format!(
                "{} of {} devices updated",
                devs.len() as u32 - failed,
                devs.len()
            );
            log::info!("rollout {} complete: {}", r.id, r.reason);
        }
        // 4: offers, only of an artifact this node holds (a rollout from the
        // hub may arrive before its image does).
        let have = tx
            .conn()
            .prepare_cached("SELECT 1 FROM firmware WHERE sha256 = ?1")
            .and_then(|mut s| s.exists([&r.sha256]))
            .map_err(|e| tx.sql_error("read firmware", e))?;
        if !have && r.state.is_live() {
            step.missing.push(r.clone());
        }
        if r.state == State::Running && have {
            let online = |d: &DeviceRollout| infos.get(&d.device).is_some_and(|i| i.online);
            let current = devs
                .iter()
                .filter(|d| !d.state.finished() && (d.state != DevState::Waiting || online(d)))
                .map(|d| d.wave)
                .min();
            for (d, dirty) in devs.iter_mut().zip(dirty.iter_mut()) {
                let due = d.state == DevState::Waiting
                    && current.is_some_and(|c| d.wave <= c)
                    && online(d);
                if due {
                    d.state = DevState::Offered;
                    d.attempts += 1;
                    d.progress = 0;
                    d.offered_ms = now;
                    d.deadline_ms = now + r.device_deadline_ms;
                    *dirty = true;
                    step.offers.push(offer_for(&r, d, base_url));
                } else if resend && d.state == DevState::Offered {
                    step.offers.push(offer_for(&r, d, base_url));
                }
            }
        }
        for d in &devs {
            if d.state.in_flight() && d.deadline_ms > 0 {
                step.next_deadline = Some(
                    step.next_deadline
                        .map_or(d.deadline_ms, |n| n.min(d.deadline_ms)),
                );
            }
        }
        for (d, dirty) in devs.iter().zip(&dirty) {
            if *dirty {
                write_device(tx, d)?;
            }
        }
        match run {
            None if r != before => write_rollout(tx, &r)?,
            None => {}
            // Not this node's rollout: its execution goes to its own
            // record, never into the shared one.
            Some(prev) => {
                let next = EdgeRun {
                    rollout: r.id.clone(),
                    edge: tx.node_id().to_owned(),
                    state: r.state,
                    reason: r.reason.clone(),
                    targets: r.targets,
                    failure_threshold: r.failure_threshold,
                    resumes: r.resumes,
                };
                if prev.as_ref() != Some(&next) {
                    write_run(tx, &next)?;
                }
            }
        }
    }
    Ok(step)
}

fn summary(
    tx: &Tx<'_>,
    rollout: Rollout,
    counts: Option<BTreeMap<String, u32>>,
) -> Result<Summary, StoreError> {
    let edges = load_runs(tx, &rollout.id)?;
    let edges_complete =
        (!edges.is_empty()).then(|| edges.iter().all(|e| e.state == State::Complete));
    Ok(Summary {
        rollout,
        counts,
        edges,
        edges_complete,
    })
}

/// Applies status reports; returns whether anything changed.
fn apply_reports(tx: &mut Tx<'_>, reports: &[(String, UpdateReport)]) -> Result<bool, StoreError> {
    let rollouts: Vec<Rollout> = load_local(tx)?
        .into_iter()
        .map(|l| l.rollout)
        .filter(|r| r.state.is_live())
        .collect();
    let mut changed = false;
    for (device, rep) in reports {
        for r in &rollouts {
            if rep.rollout.as_deref().is_some_and(|id| id != r.id) {
                continue;
            }
            let key = format!("{}/{device}", r.id);
            let Some(rec) = tx.get(Kind::Rollout, &key)?.filter(|x| !x.tombstone) else {
                continue;
            };
            let mut d: DeviceRollout =
                serde_json::from_str(&rec.body).map_err(|e| bad_record(&key, e))?;
            if !d.state.in_flight() {
                continue;
            }
            let before = d.clone();
            let progress = rep.progress.unwrap_or(d.progress).min(100);
            match rep.status.as_str() {
                "pending" => {}
                "downloading" | "installing" => {
                    let s = if rep.status == "downloading" {
                        DevState::Downloading
                    } else {
                        DevState::Installing
                    };
                    // Progress is replicated in steps, not per report.
                    if s != d.state
                        || progress >= d.progress.saturating_add(PROGRESS_STEP)
                        || progress == 100
                    {
                        d.state = s;
                        d.progress = progress;
                    }
                }
                "complete" => {
                    d.state = DevState::Installed;
                    d.progress = 100;
                }
                "failed" => {
                    let error = rep
                        .error
                        .clone()
                        .unwrap_or_else(|| "the device reported failure".into());
                    fail_attempt(&mut d, r, error);
                }
                _ => {}
            }
            if d != before {
                write_device(tx, &d)?;
                changed = true;
            }
        }
    }
    Ok(changed)
}

fn valid_id(id: &str) -> bool {
    crate::mqtt::payload::valid_id(id) && id.len() <= 64
}

impl Rollouts {
    /// The handle and the offers for the bridge to publish.
    pub fn new(
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
                }),
            },
            offers_rx,
        )
    }

    pub fn artifacts(&self) -> &Artifacts {
        &self.inner.artifacts
    }

    /// Asks for a tick; wakes coalesce.
    pub fn wake(&self) {
        let _ = self.inner.wake_tx.try_send(());
    }

    /// Status reports from `devices/{id}/update/status`, in one
    /// transaction.
    pub async fn report(&self, reports: Vec<(String, UpdateReport)>) -> Result<(), StoreError> {
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
    pub async fn create(&self, spec: Spec) -> Result<Rollout, FirmwareError> {
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
            .any(|d| !crate::mqtt::payload::valid_id(d))
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

    pub async fn list(&self) -> Result<Vec<Summary>, FirmwareError> {
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
    pub async fn get(&self, id: String) -> Result<(Summary, Vec<DeviceRollout>), FirmwareError> {
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
    pub async fn command(&self, id: String, cmd: Command) -> Result<Rollout, FirmwareError> {
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

    /// The engine: ticks on wakes, on device and rollout changes, and at
    /// the next deadline; until `shutdown`.
    pub async fn run(self, shutdown: Shutdown) {
        let (fetch_tx, fetch_rx) = async_channel::unbounded::<Rollout>();
        let fetching = std::sync::Mutex::new(HashSet::<String>::new());
        let engine = self.engine(&shutdown, &fetch_tx, &fetching);
        let fetch = self.fetch_loop(&shutdown, fetch_rx, &fetching);
        smol::future::zip(engine, fetch).await;
    }

    /// Fetches, one artifact at a time, what `missing` rollouts need.
    async fn fetch_loop(
        &self,
        shutdown: &Shutdown,
        queue: async_channel::Receiver<Rollout>,
        fetching: &std::sync::Mutex<HashSet<String>>,
    ) {
        let Some(f) = &self.inner.fetcher else { return };
        loop {
            let next = async { queue.recv().await.ok() }
                .or(async {
                    shutdown.wait().await;
                    None
                })
                .await;
            let Some(r) = next else { return };
            let meta = super::NewArtifact {
                device_type: r.device_type.clone(),
                version: r.version.clone(),
                sha256: r.sha256.clone(),
                signature: r.signature.clone(),
                notes: format!("fetched from the hub for rollout {}", r.id),
            };
            log::info!(
                "rollout {}: fetching firmware {} from the hub",
                r.id,
                r.sha256
            );
            let done = async { Some(self.inner.artifacts.fetch(f, meta, r.size).await) }
                .or(async {
                    shutdown.wait().await;
                    None
                })
                .await;
            match done {
                None => return,
                Some(Ok(a)) => log::info!(
                    "rollout {}: firmware {} fetched ({} bytes)",
                    r.id,
                    a.sha256,
                    a.size
                ),
                Some(Err(e)) => {
                    log::warn!(
                        "rollout {}: fetching firmware {}: {e}; retrying in {FETCH_RETRY:?}",
                        r.id,
                        r.sha256
                    );
                    let slept = async {
                        async_io::Timer::after(FETCH_RETRY).await;
                        true
                    }
                    .or(async {
                        shutdown.wait().await;
                        false
                    })
                    .await;
                    if !slept {
                        return;
                    }
                }
            }
            if let Ok(mut set) = fetching.lock() {
                set.remove(&r.sha256);
            }
            self.wake();
        }
    }

    async fn engine(
        &self,
        shutdown: &Shutdown,
        fetch: &async_channel::Sender<Rollout>,
        fetching: &std::sync::Mutex<HashSet<String>>,
    ) {
        let mut changes = self.inner.registry.subscribe();
        let base_url = self.inner.artifacts.settings().base_url.clone();
        let mut resend = true;
        loop {
            let now = wall_millis();
            let url = base_url.clone();
            let result = self
                .inner
                .registry
                .store()
                .call(move |db| db.tx(|tx| tick(tx, now, &url, resend)))
                .await;
            let next = match result {
                Ok(Ok(step)) => {
                    resend = false;
                    if self.inner.fetcher.is_some() {
                        for r in step.missing {
                            let new = fetching
                                .lock()
                                .is_ok_and(|mut s| s.insert(r.sha256.clone()));
                            if new {
                                let _ = fetch.try_send(r);
                            }
                        }
                    }
                    for o in step.offers {
                        match self.inner.offers_tx.try_send(o) {
                            Ok(()) => {}
                            Err(async_channel::TrySendError::Full(o)) => log::warn!(
                                "firmware offer queue full, {} not sent now; its deadline brings it back",
                                o.topic
                            ),
                            Err(async_channel::TrySendError::Closed(o)) => log::warn!(
                                "no MQTT bridge (mqtt.enabled: false): {} cannot be offered",
                                o.topic
                            ),
                        }
                    }
                    step.next_deadline
                }
                Err(StoreError::Closed) | Ok(Err(StoreError::Closed)) => return,
                Ok(Err(e)) | Err(e) => {
                    log::error!("rollout engine: {e}; retrying in 5s");
                    Some(wall_millis() + 5000)
                }
            };
            let timer = async {
                match next {
                    Some(at) => {
                        let wait = at.saturating_sub(wall_millis());
                        async_io::Timer::after(Duration::from_millis(wait)).await;
                    }
                    None => std::future::pending::<()>().await,
                }
                true
            };
            let woken = async {
                let _ = self.inner.wake_rx.recv().await;
                true
            };
            let changed = async {
                loop {
                    match changes.recv().await {
                        Ok(c) if matches!(c.kind, Kind::Device | Kind::Rollout | Kind::Alert) => {
                            return true
                        }
                        Ok(_) => continue,
                        Err(async_broadcast::RecvError::Overflowed(_)) => return true,
                        Err(async_broadcast::RecvError::Closed) => {
                            std::future::pending::<()>().await
                        }
                    }
                }
            };
            let stop = async {
                shutdown.wait().await;
                false
            };
            if !timer.or(woken).or(changed).or(stop).await {
                return;
            }
            // Coalesce whatever else arrived meanwhile into this tick.
            while changes.try_recv().is_ok() {}
            while self.inner.wake_rx.try_recv().is_ok() {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn def(state: State, resumes: u32) -> Rollout {
        Rollout {
            id: "r".into(),
            device_type: "sensor".into(),
            version: "2".into(),
            sha256: String::new(),
            size: 0,
            signature: String::new(),
            devices: Vec::new(),
            wave_size: 1,
            wave_percent: None,
            failure_threshold: 1,
            device_deadline_ms: 1000,
            max_retries: 0,
            state,
            reason: "operator".into(),
            resolved: false,
            targets: 0,
            created_ms: 1,
            created_by: "hub".into(),
            resumes,
        }
    }

    fn run(state: State, resumes: u32) -> EdgeRun {
        EdgeRun {
            rollout: "r".into(),
            edge: "e".into(),
            state,
            reason: "edge".into(),
            targets: 3,
            failure_threshold: 2,
            resumes,
        }
    }

    fn laid(d: Rollout, e: EdgeRun) -> (State, String) {
        let mut r = d;
        overlay(&mut r, &e);
        assert!(r.resolved);
        assert_eq!((r.targets, r.failure_threshold), (3, 2));
        (r.state, r.reason)
    }

    #[test]
    fn an_edge_lays_its_execution_over_the_operators_intent() {
        use State::*;
        let edge = |s| (s, "edge".to_string());
        let op = |s| (s, "operator".to_string());
        // Running or paused as the operator says.
        assert_eq!(laid(def(Paused, 0), run(Running, 0)), op(Paused));
        assert_eq!(laid(def(Running, 0), run(Paused, 0)), op(Running));
        // Its own completion stands; the operator's abort ends it.
        assert_eq!(laid(def(Running, 0), run(Complete, 0)), edge(Complete));
        assert_eq!(laid(def(Aborted, 0), run(Running, 0)), op(Aborted));
        // Its halt stands until a resume it has not seen.
        assert_eq!(laid(def(Running, 0), run(Halted, 0)), edge(Halted));
        assert_eq!(laid(def(Paused, 0), run(Halted, 0)), edge(Halted));
        assert_eq!(laid(def(Running, 1), run(Halted, 0)), op(Running));
        // Complete or halted in the shared record is an older edge's.
        assert_eq!(laid(def(Complete, 0), run(Running, 0)), edge(Running));
        assert_eq!(laid(def(Halted, 0), run(Running, 0)), edge(Running));
    }
}
