//! A/B OTA coordination for the device's own root filesystem.
//!
//! One persisted state machine per device:
//!
//! ```text
//! idle -> downloading -> verifying -> installing -> pending-reboot
//!      -> booted-pending-commit -> committed | rolled-back | failed
//! ```
//!
//! The current deployment is one SQLite row (`ota`), rewritten in the same
//! transaction as the log line and the hub report of each transition, so
//! a power cut leaves either the old state or the new one. What each state
//! does after a restart, and how it ends:
//!
//! | state | after a power cut / restart | exit (never stuck) |
//! |---|---|---|
//! | downloading | the copy (or a hub rollout's download, with Range) resumes at the staged file's length | done, error, `ota.step_timeout` -> failed |
//! | verifying | verifies again (idempotent) | ok -> installing, bad -> failed |
//! | installing | installs again (the slot was unbootable while written); at most 3 tries | done -> pending-reboot, error/timeout -> failed |
//! | pending-reboot | booted the target -> booted-pending-commit; rebooted into the old slot -> rolled-back | reboot in the window, operator reboot, a newer install or hub rollout supersedes it, mark-bad cancels, 7 days -> failed |
//! | booted-pending-commit | counted (below), gate restarts | gate passes -> committed; fails -> rolled-back |
//! | committed, rolled-back, failed | - | terminal: a new install is always accepted |
//!
//! **Crash loop vs quick power cycle.** Three counters, each counting one
//! kind of failure so that none of them fires on a power cut:
//! - the bootloader's counter (`BOOT_x_LEFT` / `x_TRY`) covers boots that
//!   never reach the daemon (kernel panic, broken rootfs). The daemon
//!   refills it as soon as it runs on the new slot, so only *consecutive*
//!   boots that die before userspace can exhaust it;
//! - `crashes`: the daemon started the gate in this very boot (same
//!   `boot_id`) and is starting again, so it crashed or was killed
//!   (systemd restarted it). `ota.boot_attempts` of those roll back;
//! - `boots`: the gate was interrupted by a reboot (a new `boot_id`): a
//!   power cut, a reset or a watchdog. Not a verdict on the image; only
//!   `ota.max_unconfirmed_boots` of them (default 10) give up, which
//!   bounds a panic loop that strikes after the daemon started.
//!
//! A failed health gate is a verdict: mark bad, boot the old slot now.
//!
//! **Mark-good is verified**: every bootloader write is read back (see
//! `backend`); a commit that does not read back is treated as a failed
//! gate, never reported as committed.
//!
//! **Two inputs.** A local bundle (`install`: CLI, D-Bus, HTTP) is copied
//! from its path. A host rollout defined on the hub (`rollout`) arrives as
//! a replicated record; the coordinator acts on it once (it may adopt it
//! when that version is already committed or awaiting its reboot, refuses
//! it on a bad signature before anything is fetched, or starts a
//! deployment whose id is the rollout's) and downloads the bundle from its
//! URL or the hub's artifact store with the shared `sync::transport::Fetcher`
//! (Range resume, `ota.download_rate`). From `verifying` on both are the
//! same. A rollout or a local install superseding a pending reboot cancels
//! that update first (the booted slot is primary again). Every
//! report names the rollout (empty for local installs) and the source.
//!
//! No polling: the coordinator sleeps until the next deadline (the step
//! timeout, the maintenance window, the gate's next check) or until an
//! operator command or a change to a host rollout record wakes it.
//!
//! **One thread for everything, the watchdog included.** The coordinator,
//! the API and the systemd watchdog ping share the executor thread, so a
//! stall there during the health gate would look like a crash (and a
//! watchdog reset like a power cut). Nothing in this module blocks it:
//! - files and the bootloader tools run on the blocking pool as *jobs*
//!   (`writer`): a job checks a cancel flag per chunk and is counted while
//!   its thread runs. A step timeout (or any dropped step) sets the flag,
//!   and the coordinator waits for the thread to end before it records
//!   the failure; no install starts while a job lives, so one slot never
//!   has two writers;
//! - operator commands (health checks, the reboot command) are async
//!   child processes in their own process group; a timeout kills the
//!   whole group (`shell`);
//! - `clippy.toml` disallows blocking `std::fs` and `std::process` calls,
//!   and this module allows them only in functions that run on the
//!   blocking pool.
//!
//! The jobs live in their files: `commands` (operator commands and hub
//! rollouts), `coordinator` (the state machine's steps), `gate` (the
//! health gate and rollback), `shell`, `writer`.

pub mod backend;
pub mod bundle;
mod commands;
mod coordinator;
mod external;
mod gate;
mod metrics;
pub mod rollout;
mod shell;
mod writer;

pub use external::External;
pub use metrics::render_metrics;

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::json;

use self::backend::{Backend, Progress};
use self::bundle::{BundleError, Manifest};
use crate::config::Ota as OtaConfig;
use crate::registry::Registry;
use crate::store::{Kind, Store, StoreError};
use crate::sync::transport::{Fetcher, TransportError};
use crate::sync::SyncHandle;

/// How often an install may be restarted by power cuts before giving up.
const MAX_INSTALL_TRIES: u32 = 3;
/// How long an installed update may wait for its reboot (no window, low
/// battery) before it is abandoned and the booted slot made primary again.
const PENDING_REBOOT_MAX: Duration = Duration::from_secs(7 * 86_400);
/// After running the reboot command: if we are still alive this much
/// later, the reboot did not happen; try again (window permitting).
const REBOOT_GRACE: Duration = Duration::from_secs(600);
/// Battery re-check interval inside the window.
const BATTERY_RECHECK: Duration = Duration::from_secs(300);
/// Log lines kept locally and sent with the hub report.
const LOG_KEEP: i64 = 200;
const LOG_REPORT: usize = 10;

#[derive(Debug, thiserror::Error)]
pub enum OtaError {
    #[error("OTA is not configured (ota.backend: none)")]
    Disabled,
    #[error("an update is in progress (state {0}); wait until it ends")]
    Busy(&'static str),
    #[error("{0}")]
    NotApplicable(String),
    #[error("{0}")]
    Invalid(String),
    #[error("{0} not found")]
    NotFound(String),
    #[error("download: {0}")]
    Fetch(#[from] TransportError),
    #[error(transparent)]
    Bundle(#[from] BundleError),
    #[error("{what}: {source}")]
    Io {
        what: String,
        source: std::io::Error,
    },
    #[error("bootloader: {0}")]
    Backend(String),
    #[error("bootloader state not confirmed: {0}")]
    Unconfirmed(String),
    #[error("{0}")]
    Rejected(String),
    #[error("RAUC D-Bus: {0}")]
    Rauc(zbus::Error),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("{state} did not finish within {after:?}")]
    Timeout {
        state: &'static str,
        after: Duration,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum State {
    #[default]
    Idle,
    Downloading,
    Verifying,
    Installing,
    PendingReboot,
    BootedPendingCommit,
    Committed,
    RolledBack,
    Failed,
}

impl State {
    pub const ALL: [State; 9] = [
        State::Idle,
        State::Downloading,
        State::Verifying,
        State::Installing,
        State::PendingReboot,
        State::BootedPendingCommit,
        State::Committed,
        State::RolledBack,
        State::Failed,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            State::Idle => "idle",
            State::Downloading => "downloading",
            State::Verifying => "verifying",
            State::Installing => "installing",
            State::PendingReboot => "pending-reboot",
            State::BootedPendingCommit => "booted-pending-commit",
            State::Committed => "committed",
            State::RolledBack => "rolled-back",
            State::Failed => "failed",
        }
    }

    /// A new install may start (or supersede this one).
    fn accepts_install(self) -> bool {
        matches!(
            self,
            State::Idle
                | State::Committed
                | State::RolledBack
                | State::Failed
                | State::PendingReboot
        )
    }
}

/// The persisted deployment (the `ota` row).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Deployment {
    pub id: String,
    pub version: String,
    /// Where the bundle came from (a local path, or the URL of a hub
    /// rollout's bundle).
    pub source: String,
    /// The hub rollout this deployment carries out; empty for a local
    /// install.
    pub rollout: String,
    /// The external update server's job this deployment carries out
    /// (`hawkbit:<action>`, `external`); empty otherwise.
    pub external: String,
    /// The rollout's override of `ota.maintenance_window`.
    pub maintenance_window: Option<String>,
    /// (`created_ms`, id) of the newest hub rollout this node has acted on;
    /// kept across deployments so none is acted on twice (`rollout`).
    pub rollout_seen: (u64, String),
    pub manifest: Option<Manifest>,
    pub state: State,
    /// Wall-clock ms when `state` was entered.
    pub since_ms: u64,
    pub last_error: String,
    /// Slot booted when the install started; the rollback target.
    pub from_slot: String,
    /// Slot the update went into.
    pub target_slot: String,
    pub install_tries: u32,
    /// `boot_id` when the update was installed.
    pub install_boot_id: String,
    /// The operator asked to reboot now.
    pub reboot_now: bool,
    /// The reboot command ran (in `install_boot_id`'s boot).
    pub reboot_issued: bool,
    /// `boot_id` of the boot whose daemon began the current health gate.
    pub gate_boot_id: String,
    /// Gate attempts ended by the daemon dying within one boot.
    pub crashes: u32,
    /// Gate attempts ended by a reboot (power cut, reset).
    pub boots: u32,
}

/// What operators see: the deployment plus live, unpersisted detail.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Status {
    pub backend: &'static str,
    pub booted_slot: String,
    pub progress: u8,
    pub phase: String,
    #[serde(flatten)]
    pub deployment: Deployment,
}

struct Inner {
    cfg: OtaConfig,
    backend: Option<Backend>,
    store: Store,
    /// Its change feed brings hub rollouts (records arriving by sync).
    registry: Registry,
    /// Downloads hub rollouts' bundles (capped at `ota.download_rate`);
    /// None without a hub.
    fetcher: Option<Fetcher>,
    sync: SyncHandle,
    work_dir: PathBuf,
    boot_id: String,
    /// Blocking jobs that write (slot, staged bundle, boot environment).
    jobs: Arc<writer::Jobs>,
    /// Serialises transitions (operator commands vs the coordinator).
    lock: smol::lock::Mutex<()>,
    status: Mutex<Status>,
    /// Operators' view changed (D-Bus PropertiesChanged).
    changed: event_listener::Event,
    /// The coordinator should look again (a command changed the state).
    wake: event_listener::Event,
}

/// Handle to the coordinator. Cheap to clone.
#[derive(Clone)]
pub struct Ota {
    inner: Arc<Inner>,
}

fn now_ms() -> u64 {
    crate::clock::wall_millis()
}

/// What the coordinator does after a step.
enum Wait {
    Now,
    For(Duration),
    Woken,
}

impl Ota {
    /// Loads the persisted deployment. `storage_path` places the default
    /// work directory next to the database.
    pub async fn open(
        cfg: &OtaConfig,
        registry: Registry,
        sync: SyncHandle,
        storage_path: &Path,
        fetcher: Option<Fetcher>,
    ) -> Result<Ota, OtaError> {
        let store = registry.store().clone();
        let fetcher = fetcher.map(|f| f.with_cap(cfg.download_rate.0));
        let jobs = Arc::new(writer::Jobs::default());
        // Reads the public keys: off the executor.
        let backend = {
            let (cfg, jobs) = (cfg.clone(), jobs.clone());
            smol::unblock(move || Backend::from_config(&cfg, &jobs)).await?
        };
        let work_dir = cfg.work_dir.clone().unwrap_or_else(|| {
            storage_path
                .parent()
                .unwrap_or_else(|| Path::new("."))
                .join("ota")
        });
        if backend.is_some() {
            smol::fs::create_dir_all(&work_dir)
                .await
                .map_err(|source| OtaError::Io {
                    what: format!("creating {}", work_dir.display()),
                    source,
                })?;
        }
        let boot_id = read_boot_id(&cfg.boot_id_file).await;
        let body: Option<String> = store
            .call(|db| {
                db.conn()
                    .query_row("SELECT body FROM ota WHERE id = 1", [], |r| r.get(0))
                    .map(Some)
                    .or_else(|e| match e {
                        rusqlite::Error::QueryReturnedNoRows => Ok(None),
                        e => Err(db.sql_error("load ota", e)),
                    })
            })
            .await??;
        let deployment = match body {
            Some(b) => serde_json::from_str(&b).unwrap_or_else(|e| {
                // Unreadable state must not wedge updates forever.
                log::error!("ota: stored state unreadable ({e}); starting from idle");
                Deployment::default()
            }),
            None => Deployment::default(),
        };
        let status = Status {
            backend: backend.as_ref().map_or("none", |b| b.name()),
            deployment,
            ..Default::default()
        };
        Ok(Ota {
            inner: Arc::new(Inner {
                cfg: cfg.clone(),
                backend,
                store,
                registry,
                fetcher,
                sync,
                work_dir,
                boot_id,
                jobs,
                lock: smol::lock::Mutex::new(()),
                status: Mutex::new(status),
                changed: event_listener::Event::new(),
                wake: event_listener::Event::new(),
            }),
        })
    }

    pub fn enabled(&self) -> bool {
        self.inner.backend.is_some()
    }

    pub fn status(&self) -> Status {
        self.inner
            .status
            .lock()
            .map(|s| s.clone())
            .unwrap_or_default()
    }

    /// Resolves at the next visible change after this call.
    pub fn changed(&self) -> event_listener::EventListener {
        self.inner.changed.listen()
    }

    fn deployment(&self) -> Deployment {
        self.status().deployment
    }

    fn backend(&self) -> Result<&Backend, OtaError> {
        self.inner.backend.as_ref().ok_or(OtaError::Disabled)
    }

    fn update_status(&self, f: impl FnOnce(&mut Status)) {
        if let Ok(mut s) = self.inner.status.lock() {
            f(&mut s);
        }
        self.inner.changed.notify(usize::MAX);
    }

    fn progress(&self) -> Progress {
        let me = self.clone();
        Arc::new(move |pct, phase: &str| {
            let changed = me
                .inner
                .status
                .lock()
                .map(|mut s| {
                    let c = s.progress != pct || s.phase != phase;
                    s.progress = pct;
                    s.phase = phase.to_owned();
                    c
                })
                .unwrap_or(false);
            if changed {
                me.inner.changed.notify(usize::MAX);
            }
        })
    }

    /// Persists `d` with a log line (and the hub report when the state
    /// changed), then publishes it. Callers hold `inner.lock`.
    async fn save(&self, mut d: Deployment, message: String) -> Result<(), OtaError> {
        let prev = self.deployment();
        if prev.state != d.state || prev.id != d.id {
            d.since_ms = now_ms();
        }
        let body = serde_json::to_string(&d).unwrap_or_default();
        let state = d.state;
        let report = prev.state != d.state || prev.id != d.id || prev.rollout != d.rollout;
        let node = self.inner.store.node_id().to_owned();
        let d2 = d.clone();
        let msg = message.clone();
        self.inner
            .store
            .call(move |db| {
                db.tx(|tx| {
                    let c = tx.conn();
                    c.execute(
                        "INSERT INTO ota (id, body) VALUES (1, ?1)
                         ON CONFLICT (id) DO UPDATE SET body = excluded.body",
                        [&body],
                    )
                    .map_err(|e| tx.sql_error("save ota", e))?;
                    c.execute(
                        "INSERT INTO ota_log (at_ms, state, message) VALUES (?1, ?2, ?3)",
                        rusqlite::params![now_ms() as i64, state.as_str(), msg],
                    )
                    .map_err(|e| tx.sql_error("ota log", e))?;
                    c.execute(
                        "DELETE FROM ota_log WHERE id <= (SELECT MAX(id) FROM ota_log) - ?1",
                        [LOG_KEEP],
                    )
                    .map_err(|e| tx.sql_error("ota log prune", e))?;
                    if report {
                        let log =
                            recent_log(c, LOG_REPORT).map_err(|e| tx.sql_error("ota log", e))?;
                        let report = json!({
                            "node_id": node,
                            "deployment": d2.id,
                            "rollout": d2.rollout,
                            "source": d2.source,
                            "external": d2.external,
                            "version": d2.version,
                            "state": d2.state.as_str(),
                            "from_slot": d2.from_slot,
                            "target_slot": d2.target_slot,
                            "last_error": d2.last_error,
                            "at_ms": now_ms(),
                            "log": log,
                        });
                        crate::registry::commit(
                            tx,
                            Kind::Rollout,
                            &format!("status/{node}"),
                            None,
                            Some(report.to_string()),
                        )?;
                    }
                    Ok::<_, StoreError>(())
                })
            })
            .await??;
        if state == State::Failed || state == State::RolledBack {
            log::warn!(
                "ota: {} -> {}: {message}",
                prev.state.as_str(),
                state.as_str()
            );
        } else {
            log::info!(
                "ota: {} -> {}: {message}",
                prev.state.as_str(),
                state.as_str()
            );
        }
        self.update_status(|s| {
            if s.deployment.state != d.state {
                s.progress = if d.state == State::Committed { 100 } else { 0 };
                s.phase = String::new();
            }
            s.deployment = d;
        });
        Ok(())
    }

    /// The last `n` log lines, oldest first.
    pub async fn log(&self, n: usize) -> Result<Vec<serde_json::Value>, OtaError> {
        Ok(self
            .inner
            .store
            .call(move |db| recent_log(db.conn(), n).map_err(|e| db.sql_error("ota log", e)))
            .await??)
    }

    /// Bootloader / RAUC view, for status output.
    pub async fn bootloader(&self) -> Result<serde_json::Value, OtaError> {
        self.backend()?.describe().await
    }

    /// The status as JSON (HTTP `/v1/edge/ota`, D-Bus `GetStatus`): the
    /// deployment, live progress, the bootloader's view and recent log.
    pub async fn status_json(&self) -> serde_json::Value {
        let s = self.status();
        let mut j = serde_json::to_value(&s).unwrap_or_else(|_| json!({}));
        if let Some(m) = j.as_object_mut() {
            m.remove("manifest");
            if self.enabled() {
                let boot = self
                    .bootloader()
                    .await
                    .unwrap_or_else(|e| json!({"error": e.to_string()}));
                m.insert("bootloader".into(), boot);
            } else {
                m.insert("state".into(), json!("unavailable"));
            }
            m.insert("log".into(), json!(self.log(20).await.unwrap_or_default()));
        }
        j
    }

    fn staged_path(&self, id: &str) -> PathBuf {
        self.inner.work_dir.join(format!("{id}.bundle"))
    }
}

fn recent_log(c: &rusqlite::Connection, n: usize) -> rusqlite::Result<Vec<serde_json::Value>> {
    let mut st =
        c.prepare_cached("SELECT at_ms, state, message FROM ota_log ORDER BY id DESC LIMIT ?1")?;
    let mut rows: Vec<serde_json::Value> = st
        .query_map([n as i64], |r| {
            Ok(json!({
                "at_ms": r.get::<_, i64>(0)?,
                "state": r.get::<_, String>(1)?,
                "message": r.get::<_, String>(2)?,
            }))
        })?
        .collect::<Result<_, _>>()?;
    rows.reverse();
    Ok(rows)
}

async fn read_boot_id(path: &Path) -> String {
    match smol::fs::read_to_string(path).await {
        Ok(s) => s.trim().to_owned(),
        Err(e) => {
            // Without a boot id every restart looks like a reboot: crashes
            // then count as boots (the larger limit) instead of crashes.
            log::warn!("ota: cannot read {}: {e}", path.display());
            String::new()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn states_round_trip_as_kebab_case() {
        for s in State::ALL {
            let j = serde_json::to_string(&s).unwrap();
            assert_eq!(j, format!("\"{}\"", s.as_str()));
        }
    }
}
