//! Reading and writing the rollout records (`Kind::Rollout`): the
//! rollouts, each edge's execution (`edge/{id}/{edge}`) and each device's
//! progress (`{id}/{device}`), all through `registry::commit`; and the
//! overlay of an edge's execution on a rollout defined at the hub (see
//! the module docs of `rollout` for who writes what). Separate from the
//! engine's logic so the key layout lives in one place.

use std::collections::{BTreeMap, HashSet};

use rusqlite::params;

use super::model::{DeviceRollout, EdgeRun, Rollout, State, Summary};
use crate::registry;
use crate::store::{Kind, StoreError, Tx};

/// What firmware needs to know of a host rollout (`ota::rollout`, which
/// sits above firmware and uses its artifact store): which bundle it
/// serves from here. Read from the record directly, so firmware does not
/// import the OTA coordinator back.
#[derive(serde::Deserialize)]
struct HostPin {
    #[serde(default)]
    url: String,
    #[serde(default)]
    sha256: String,
}

/// Host rollouts' records (`rollout/host/...`); unreadable ones pin nothing.
fn host_pins(tx: &Tx<'_>) -> rusqlite::Result<Vec<HostPin>> {
    // `0` sorts right after `/`: the range is exactly the prefix.
    let mut st = tx.conn().prepare_cached(
        "SELECT body FROM records WHERE kind = 'rollout' AND tombstone = 0
         AND key > 'host/' AND key < 'host0'",
    )?;
    let bodies = st
        .query_map([], |r| r.get::<_, String>(0))?
        .collect::<rusqlite::Result<Vec<_>>>()?;
    Ok(bodies
        .iter()
        .filter_map(|b| serde_json::from_str(b).ok())
        .collect())
}

/// Artifacts that live rollouts name, and the bundles host rollouts serve
/// from here (until deleted): never evicted.
pub(crate) fn pinned_artifacts(tx: &Tx<'_>) -> Result<HashSet<String>, StoreError> {
    let hosts = host_pins(tx).map_err(|e| tx.sql_error("list host rollouts", e))?;
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

pub(super) fn bad_record(key: &str, e: serde_json::Error) -> StoreError {
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

pub(super) fn get_rollout(tx: &Tx<'_>, id: &str) -> Result<Option<(Rollout, String)>, StoreError> {
    tx.get(Kind::Rollout, id)?
        .filter(|r| !r.tombstone)
        .map(|rec| Ok((parse_rollout(id, &rec.body, &rec.origin)?, rec.owner)))
        .transpose()
}

/// Key prefix of the per-edge executions (`edge/{rollout}/{edge}`); the
/// rollout id `edge` is reserved so `{id}/` never takes them in.
pub(super) const RUN_PREFIX: &str = "edge";

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

pub(super) fn write_run(tx: &mut Tx<'_>, run: &EdgeRun) -> Result<(), StoreError> {
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
pub(super) struct Local {
    pub(super) rollout: Rollout,
    pub(super) run: Option<Option<EdgeRun>>,
}

/// `owner`: at a hub, an edge's own rollout is shown as that edge keeps
/// it; only a global rollout this node did not create has a local run.
pub(super) fn localize(tx: &Tx<'_>, mut r: Rollout, owner: &str) -> Result<Local, StoreError> {
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

pub(super) fn load_local(tx: &Tx<'_>) -> Result<Vec<Local>, StoreError> {
    load_rollouts(tx)?
        .into_iter()
        .map(|(r, owner)| localize(tx, r, &owner))
        .collect()
}

pub(super) fn load_progress(tx: &Tx<'_>, id: &str) -> Result<Vec<DeviceRollout>, StoreError> {
    load_under(tx, &format!("{id}/"), "list rollout devices")
}

pub(super) fn write_rollout(tx: &mut Tx<'_>, r: &Rollout) -> Result<(), StoreError> {
    registry::commit(tx, Kind::Rollout, &r.id, None, Some(registry::to_body(r)?)).map(drop)
}

pub(super) fn write_device(tx: &mut Tx<'_>, d: &DeviceRollout) -> Result<(), StoreError> {
    let key = format!("{}/{}", d.rollout, d.device);
    registry::commit(tx, Kind::Rollout, &key, None, Some(registry::to_body(d)?)).map(drop)
}

pub(super) fn summary(
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
