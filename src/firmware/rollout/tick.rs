//! One step of every live rollout, in one store transaction (the
//! numbered steps in the `rollout` module docs), and the devices' status
//! reports. Pure decisions over the records and the device table; the
//! engine runs it and publishes what it returns.

use std::collections::{HashMap, HashSet};

use serde_json::json;

use super::model::{DevState, DeviceRollout, EdgeRun, Offer, Rollout, State};
use super::records::{
    bad_record, load_local, load_progress, write_device, write_rollout, write_run, Local,
};
use crate::devices::payload::UpdateReport;
use crate::store::{Kind, StoreError, Tx};

/// Progress is written (replicated) in steps of this many percent.
const PROGRESS_STEP: u8 = 10;

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
pub(super) struct Step {
    pub(super) offers: Vec<Offer>,
    pub(super) next_deadline: Option<u64>,
    /// Live rollouts whose artifact this node does not hold.
    pub(super) missing: Vec<Rollout>,
}

/// One step of every live rollout (see the module docs). `resend`:
/// publish again the offers of devices still in `offered` (the edge may
/// have died between the commit and the publish).
pub(super) fn tick(
    tx: &mut Tx<'_>,
    now: u64,
    base_url: &str,
    resend: bool,
) -> Result<Step, StoreError> {
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

/// Applies status reports; returns whether anything changed.
pub(super) fn apply_reports(
    tx: &mut Tx<'_>,
    reports: &[(String, UpdateReport)],
) -> Result<bool, StoreError> {
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
