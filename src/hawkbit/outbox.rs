//! Durable feedback and the client's own state, in the store (tables
//! `hawkbit_outbox` and `hawkbit_state`, local to this node).
//!
//! Feedback is written here before it is sent and deleted only when the
//! server acknowledged it, so a link down for days, a power cut or a
//! rollback to the old slot (whose binary has the same table) loses none.
//! Unsent `proceeding` rows of an action are replaced by its next
//! feedback (only the newest progress matters); `closed` rows never are, and are written in the
//! same transaction as the action's end, so an action cannot end without
//! its feedback queued, nor be reported twice.

use serde::{Deserialize, Serialize};

use super::ddi::Execution;
use super::HawkbitError;
use crate::store::{Store, StoreError};

/// The action in hand, persisted (`hawkbit_state` key `action`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub(crate) struct ActionRec {
    pub id: String,
    pub version: String,
    pub phase: Phase,
    /// Why it was refused or failed before the handover.
    pub error: String,
    /// The last progress queued (a coordinator state, or the device
    /// rollouts' summary), so a restart does not repeat it.
    pub reported: String,
    /// The action has an OS chunk for the A/B coordinator.
    pub host: bool,
    /// Its device chunks: a firmware rollout each, once the host is done.
    pub devices: Vec<super::devices::DeviceChunk>,
    /// How the host part ended (the slot committed), for the closing
    /// feedback of an action that then waits on its devices.
    pub host_done: String,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub(crate) enum Phase {
    /// Downloading the artifact (resumable).
    #[default]
    Downloading,
    /// Downloaded and checked; waiting for `update` or the window.
    Downloaded,
    /// Given to the A/B coordinator.
    Handed,
    /// The host part is done (or there was none); the device rollouts run.
    Devices,
    /// `closed` feedback queued; nothing more to do.
    Closed,
}

/// One queued feedback.
#[derive(Debug, Clone)]
pub(crate) struct Pending {
    pub seq: i64,
    pub action: String,
    pub execution: String,
    pub body: String,
}

pub(crate) async fn load_state(store: &Store, key: &'static str) -> Result<String, HawkbitError> {
    Ok(store
        .call(move |db| {
            db.conn()
                .query_row(
                    "SELECT value FROM hawkbit_state WHERE key = ?1",
                    [key],
                    |r| r.get::<_, String>(0),
                )
                .or_else(|e| match e {
                    rusqlite::Error::QueryReturnedNoRows => Ok(String::new()),
                    e => Err(db.sql_error("hawkbit state", e)),
                })
        })
        .await??)
}

fn put_state(c: &rusqlite::Connection, key: &str, value: &str) -> rusqlite::Result<()> {
    c.execute(
        "INSERT INTO hawkbit_state (key, value) VALUES (?1, ?2)
         ON CONFLICT (key) DO UPDATE SET value = excluded.value",
        [key, value],
    )
    .map(drop)
}

pub(crate) async fn save_state(
    store: &Store,
    key: &'static str,
    value: String,
) -> Result<(), HawkbitError> {
    store
        .call(move |db| {
            put_state(db.conn(), key, &value).map_err(|e| db.sql_error("hawkbit state", e))
        })
        .await??;
    Ok(())
}

pub(crate) async fn load_action(store: &Store) -> Result<Option<ActionRec>, HawkbitError> {
    let s = load_state(store, "action").await?;
    if s.is_empty() {
        return Ok(None);
    }
    Ok(serde_json::from_str(&s).ok())
}

/// Saves `rec` and, with it, queues `feedback` for its action (if any;
/// the outbox names the feedback's path, `deploymentBase/<id>`).
pub(crate) async fn commit(
    store: &Store,
    rec: &ActionRec,
    feedback: Option<(Execution, serde_json::Value)>,
) -> Result<(), HawkbitError> {
    let rec_json = serde_json::to_string(rec).unwrap_or_default();
    let action = format!("deploymentBase/{}", rec.id);
    store
        .call(move |db| {
            db.tx(|tx| {
                let c = tx.conn();
                put_state(c, "action", &rec_json).map_err(|e| tx.sql_error("hawkbit state", e))?;
                if let Some((ex, body)) = feedback {
                    // Newer progress, or the end, replaces unsent progress.
                    {
                        c.execute(
                            "DELETE FROM hawkbit_outbox WHERE action = ?1 AND execution = 'proceeding'",
                            [&action],
                        )
                        .map_err(|e| tx.sql_error("hawkbit outbox", e))?;
                    }
                    insert(c, &action, ex, &body)
                        .map_err(|e| tx.sql_error("hawkbit outbox", e))?;
                }
                Ok::<_, StoreError>(())
            })
        })
        .await??;
    Ok(())
}

/// One feedback row, stamped now.
fn insert(
    c: &rusqlite::Connection,
    action: &str,
    ex: Execution,
    body: &serde_json::Value,
) -> rusqlite::Result<()> {
    c.execute(
        "INSERT INTO hawkbit_outbox (action, execution, body, created_ms)
         VALUES (?1, ?2, ?3, ?4)",
        rusqlite::params![
            action,
            ex.as_str(),
            body.to_string(),
            crate::clock::wall_millis() as i64
        ],
    )
    .map(drop)
}

/// Queues a feedback for another action (a refused cancel) without
/// touching the action in hand.
pub(crate) async fn queue(
    store: &Store,
    action: String,
    ex: Execution,
    body: serde_json::Value,
) -> Result<(), HawkbitError> {
    store
        .call(move |db| {
            insert(db.conn(), &action, ex, &body).map_err(|e| db.sql_error("hawkbit outbox", e))
        })
        .await??;
    Ok(())
}

/// The oldest unsent feedback.
pub(crate) async fn oldest(store: &Store) -> Result<Option<Pending>, HawkbitError> {
    Ok(store
        .call(|db| {
            db.conn()
                .query_row(
                    "SELECT seq, action, execution, body FROM hawkbit_outbox ORDER BY seq LIMIT 1",
                    [],
                    |r| {
                        Ok(Pending {
                            seq: r.get(0)?,
                            action: r.get(1)?,
                            execution: r.get(2)?,
                            body: r.get(3)?,
                        })
                    },
                )
                .map(Some)
                .or_else(|e| match e {
                    rusqlite::Error::QueryReturnedNoRows => Ok(None),
                    e => Err(db.sql_error("hawkbit outbox", e)),
                })
        })
        .await??)
}

pub(crate) async fn sent(store: &Store, seq: i64) -> Result<(), HawkbitError> {
    store
        .call(move |db| {
            db.conn()
                .execute("DELETE FROM hawkbit_outbox WHERE seq = ?1", [seq])
                .map(drop)
                .map_err(|e| db.sql_error("hawkbit outbox", e))
        })
        .await??;
    Ok(())
}

pub(crate) async fn count(store: &Store) -> Result<u64, HawkbitError> {
    Ok(store
        .call(|db| {
            db.conn()
                .query_row("SELECT COUNT(*) FROM hawkbit_outbox", [], |r| {
                    r.get::<_, i64>(0)
                })
                .map(|n| n as u64)
                .map_err(|e| db.sql_error("hawkbit outbox", e))
        })
        .await??)
}

/// Whether feedback for `action` (`deploymentBase/<id>`) is still queued.
pub(crate) async fn pending_for(store: &Store, action: String) -> Result<bool, HawkbitError> {
    Ok(store
        .call(move |db| {
            db.conn()
                .query_row(
                    "SELECT EXISTS (SELECT 1 FROM hawkbit_outbox WHERE action = ?1)",
                    [&action],
                    |r| r.get::<_, bool>(0),
                )
                .map_err(|e| db.sql_error("hawkbit outbox", e))
        })
        .await??)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn open(dir: &std::path::Path) -> Store {
        Store::open(crate::store::StoreOptions {
            path: dir.join("k.db"),
            max_size: 8 << 20,
            node_id: "t".into(),
        })
        .unwrap()
    }

    #[test]
    fn progress_coalesces_closed_stays_and_all_survive_a_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path());
        let mut r = ActionRec {
            id: "7".into(),
            ..Default::default()
        };
        smol::block_on(async {
            for n in 1..=3 {
                let fb = (Execution::Proceeding, json!({ "n": n }));
                commit(&store, &r, Some(fb)).await.unwrap();
            }
            assert_eq!(count(&store).await.unwrap(), 1, "unsent progress replaced");
            let cancel = json!({"c": 1});
            queue(&store, "cancelAction/8".into(), Execution::Canceled, cancel)
                .await
                .unwrap();
            r.phase = Phase::Closed;
            commit(&store, &r, Some((Execution::Closed, json!({"end": 1}))))
                .await
                .unwrap();
            assert_eq!(
                count(&store).await.unwrap(),
                2,
                "closed replaced the progress"
            );
        });
        store.close();

        let store = open(dir.path());
        smol::block_on(async {
            assert_eq!(load_action(&store).await.unwrap(), Some(r.clone()));
            let first = oldest(&store).await.unwrap().unwrap();
            assert_eq!(first.action, "cancelAction/8", "oldest first");
            sent(&store, first.seq).await.unwrap();
            let next = oldest(&store).await.unwrap().unwrap();
            assert_eq!(
                (next.action.as_str(), next.execution.as_str()),
                ("deploymentBase/7", "closed")
            );
            assert!(pending_for(&store, "deploymentBase/7".into())
                .await
                .unwrap());
            sent(&store, next.seq).await.unwrap();
            assert!(!pending_for(&store, "deploymentBase/7".into())
                .await
                .unwrap());
            assert!(oldest(&store).await.unwrap().is_none());
        });
        store.close();
    }
}
