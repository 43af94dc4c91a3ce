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

pub mod backend;
pub mod bundle;
pub mod rollout;

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use serde_json::json;

use self::backend::{Backend, Progress};
use self::bundle::{BundleError, Manifest};
use crate::config::Ota as OtaConfig;
use crate::registry::Registry;
use crate::store::{Kind, Store, StoreError};
use crate::sync::transport::{Fetcher, TransportError, FETCH_RETRY};
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
        let backend = Backend::from_config(cfg)?;
        let work_dir = cfg.work_dir.clone().unwrap_or_else(|| {
            storage_path
                .parent()
                .unwrap_or_else(|| Path::new("."))
                .join("ota")
        });
        if backend.is_some() {
            let wd = work_dir.clone();
            smol::unblock(move || std::fs::create_dir_all(&wd))
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

    // ---- operator commands -------------------------------------------

    /// Starts a manual install of a local bundle; returns the deployment
    /// id. A bad manifest signature is refused here, before anything is
    /// copied or written.
    pub async fn install(&self, path: &str) -> Result<String, OtaError> {
        let backend = self.backend()?;
        let path = PathBuf::from(path);
        if !path.is_absolute() {
            return Err(OtaError::Invalid(format!(
                "{}: give an absolute path",
                path.display()
            )));
        }
        let p = path.clone();
        let meta = smol::unblock(move || std::fs::metadata(&p)).await;
        if !meta.as_ref().is_ok_and(|m| m.is_file()) {
            return Err(OtaError::Invalid(format!(
                "{}: not a readable file",
                path.display()
            )));
        }
        let manifest = {
            let p = path.clone();
            match backend {
                Backend::Env(_) => {
                    let m = smol::unblock(move || bundle::Manifest::load(&p)).await?;
                    backend.manifest_for_checked(m)?
                }
                Backend::Rauc(_) => None,
            }
        };
        let _g = self.inner.lock.lock().await;
        if self.status().booted_slot.is_empty() {
            // The coordinator has not started (or cannot read the booted
            // slot): nothing would drive the deployment or its timeouts.
            return Err(OtaError::NotApplicable(
                "the booted slot is not known yet; see `konsul-edge ota status`".into(),
            ));
        }
        let cur = self.deployment();
        if !cur.state.accepts_install() {
            return Err(OtaError::Busy(cur.state.as_str()));
        }
        let id = format!("local-{}", now_ms());
        let superseded = if cur.state == State::PendingReboot {
            // As for a hub rollout: cancel the installed update first (the
            // booted slot is primary again), so a failure of this install
            // cannot leave the bootloader set to boot an update that
            // nothing tracks any more.
            backend.rollback(&cur.target_slot, &cur.from_slot).await?;
            format!(" (cancels {} {} awaiting its reboot)", cur.id, cur.version)
        } else {
            String::new()
        };
        self.clean_work_dir().await;
        let d = Deployment {
            id: id.clone(),
            version: manifest
                .as_ref()
                .map(|m| m.version.clone())
                .unwrap_or_default(),
            source: path.display().to_string(),
            manifest,
            state: State::Downloading,
            rollout_seen: cur.rollout_seen.clone(),
            ..Default::default()
        };
        self.save(
            d,
            format!("install of {} requested{superseded}", path.display()),
        )
        .await?;
        self.inner.wake.notify(usize::MAX);
        Ok(id)
    }

    /// Commits the booted new slot now (skipping the rest of the gate).
    pub async fn mark_good(&self) -> Result<(), OtaError> {
        let backend = self.backend()?;
        let _g = self.inner.lock.lock().await;
        let d = self.deployment();
        if d.state != State::BootedPendingCommit {
            return Err(OtaError::NotApplicable(format!(
                "nothing to commit (state {})",
                d.state.as_str()
            )));
        }
        backend.mark_good(&d.target_slot).await?;
        self.save(
            Deployment {
                state: State::Committed,
                last_error: String::new(),
                ..d.clone()
            },
            format!("slot {} marked good by the operator", d.target_slot),
        )
        .await?;
        self.inner.wake.notify(usize::MAX);
        Ok(())
    }

    /// On the new slot: mark it bad and boot the old one. Before the
    /// reboot: cancel the update (the booted slot stays primary).
    pub async fn mark_bad(&self) -> Result<(), OtaError> {
        let backend = self.backend()?;
        let _g = self.inner.lock.lock().await;
        let d = self.deployment();
        match d.state {
            State::BootedPendingCommit => {
                self.roll_back(d, "marked bad by the operator".into())
                    .await?;
            }
            State::PendingReboot => {
                backend.rollback(&d.target_slot, &d.from_slot).await?;
                self.save(
                    Deployment {
                        state: State::Failed,
                        last_error: "cancelled by the operator before the reboot".into(),
                        ..d
                    },
                    "cancelled by the operator; the booted slot stays primary".into(),
                )
                .await?;
            }
            s => {
                return Err(OtaError::NotApplicable(format!(
                    "nothing to mark bad (state {})",
                    s.as_str()
                )))
            }
        }
        self.inner.wake.notify(usize::MAX);
        Ok(())
    }

    /// Reboots into the installed update now, outside the window.
    pub async fn reboot(&self) -> Result<(), OtaError> {
        self.backend()?;
        let _g = self.inner.lock.lock().await;
        let d = self.deployment();
        if d.state != State::PendingReboot {
            return Err(OtaError::NotApplicable(format!(
                "no update waits for a reboot (state {})",
                d.state.as_str()
            )));
        }
        self.save(
            Deployment {
                reboot_now: true,
                ..d
            },
            "reboot requested by the operator".into(),
        )
        .await?;
        self.inner.wake.notify(usize::MAX);
        Ok(())
    }

    // ---- hub rollouts (`rollout`) -----------------------------------------

    /// Creates a host rollout (on a hub). Without a URL the bundle must be
    /// in this node's artifact store (`artifacts`), which then serves it
    /// and keeps it while the rollout exists.
    pub async fn create_rollout(
        &self,
        spec: rollout::Spec,
        artifacts: Option<&crate::firmware::Artifacts>,
    ) -> Result<rollout::HostRollout, OtaError> {
        let r = rollout::from_spec(spec, now_ms())?;
        if r.url.is_empty() {
            use crate::firmware::FirmwareError as F;
            let stored = match artifacts {
                Some(a) => match a.resolve(r.sha256.clone(), None).await {
                    Ok(a) => Some(a),
                    Err(F::NotFound { .. }) => None,
                    Err(F::Store(e)) => return Err(e.into()),
                    Err(e) => return Err(OtaError::Invalid(e.to_string())),
                },
                None => None,
            };
            match stored {
                Some(a) if a.size == r.size => {}
                Some(a) => {
                    return Err(OtaError::Invalid(format!(
                        "size {} does not match the stored artifact {} ({} bytes)",
                        r.size, a.sha256, a.size
                    )))
                }
                None => {
                    return Err(OtaError::Invalid(format!(
                        "no url, and no artifact {} is stored here: upload the bundle \
                         (PUT /v1/edge/firmware) or give a url",
                        r.sha256
                    )))
                }
            }
        }
        let rec = r.clone();
        self.inner
            .store
            .call(move |db| db.tx(|tx| rollout::insert(tx, &rec)))
            .await??;
        log::info!(
            "ota: host rollout {} created: version {} for {}",
            r.id,
            r.version,
            if r.edges.is_empty() {
                "every edge".to_owned()
            } else {
                r.edges.join(", ")
            }
        );
        self.inner.wake.notify(usize::MAX);
        Ok(r)
    }

    /// Host rollouts with the edges' reported outcomes.
    pub async fn rollouts(&self) -> Result<Vec<serde_json::Value>, OtaError> {
        Ok(self
            .inner
            .store
            .call(|db| rollout::list(db.conn()).map_err(|e| db.sql_error("list rollouts", e)))
            .await??)
    }

    pub async fn rollout(&self, id: String) -> Result<serde_json::Value, OtaError> {
        let what = format!("rollout {id}");
        self.inner
            .store
            .call(move |db| {
                rollout::get(db.conn(), &id).map_err(|e| db.sql_error("read rollout", e))
            })
            .await??
            .ok_or(OtaError::NotFound(what))
    }

    pub async fn delete_rollout(&self, id: String) -> Result<(), OtaError> {
        self.inner
            .store
            .call(move |db| db.tx(|tx| rollout::remove(tx, &id)))
            .await?
    }

    /// Acts on the newest hub rollout for this node if it has not acted on
    /// it yet (module note in `rollout`); true when the deployment changed.
    async fn start_rollout(&self, backend: &Backend) -> Result<bool, OtaError> {
        let seen = self.deployment().rollout_seen;
        let node = self.inner.store.node_id().to_owned();
        let found = self
            .inner
            .store
            .call(move |db| {
                rollout::pending(db.conn(), &node, &seen)
                    .map_err(|e| db.sql_error("read rollouts", e))
            })
            .await??;
        let Some(r) = found else { return Ok(false) };
        let _g = self.inner.lock.lock().await;
        let cur = self.deployment();
        if !cur.state.accepts_install() || r.mark() <= cur.rollout_seen {
            // An operator command came first; look again when it ends.
            return Ok(false);
        }
        let seen = r.mark();
        // That version is committed, or installed and waiting for its
        // reboot: installing it again would gain nothing. The deployment
        // adopts the rollout, so the hub sees its outcome.
        if cur.version == r.version && matches!(cur.state, State::Committed | State::PendingReboot)
        {
            let msg = format!(
                "rollout {}: version {} is already {}; nothing to install",
                r.id,
                r.version,
                cur.state.as_str()
            );
            self.save(
                Deployment {
                    rollout: r.id.clone(),
                    maintenance_window: r.maintenance_window.clone(),
                    rollout_seen: seen,
                    ..cur
                },
                msg,
            )
            .await?;
            return Ok(true);
        }
        let source = match (&self.inner.fetcher, r.url.is_empty()) {
            (Some(f), true) => format!("{}{}", f.hub.endpoint.url, r.source()),
            _ => r.source(),
        };
        let m = r.manifest();
        // Before anything is downloaded or written (RAUC bundles carry
        // their own signature; their size and digest are still checked).
        let refused = backend.check_signature(&m).err();
        let mut superseded = String::new();
        if cur.state == State::PendingReboot {
            // The installed update is cancelled first (the booted slot is
            // primary again), so no outcome of this rollout leaves the
            // bootloader set to boot an update nothing tracks any more.
            backend.rollback(&cur.target_slot, &cur.from_slot).await?;
            superseded = format!(" (cancels {} {} awaiting its reboot)", cur.id, cur.version);
        }
        self.clean_work_dir().await;
        let base = Deployment {
            id: r.id.clone(),
            version: r.version.clone(),
            source: source.clone(),
            rollout: r.id.clone(),
            maintenance_window: r.maintenance_window.clone(),
            rollout_seen: seen,
            ..Default::default()
        };
        match refused {
            Some(e) => {
                let msg = format!("rollout {} refused: {e}{superseded}", r.id);
                self.save(
                    Deployment {
                        state: State::Failed,
                        last_error: e.to_string(),
                        ..base
                    },
                    msg,
                )
                .await?;
            }
            None => {
                self.save(
                    Deployment {
                        state: State::Downloading,
                        manifest: Some(m),
                        ..base
                    },
                    format!(
                        "rollout {}: version {} from {source}{superseded}",
                        r.id, r.version
                    ),
                )
                .await?;
            }
        }
        Ok(true)
    }

    async fn clean_work_dir(&self) {
        let wd = self.inner.work_dir.clone();
        smol::unblock(move || {
            if let Ok(entries) = std::fs::read_dir(&wd) {
                for e in entries.flatten() {
                    if e.path().extension().is_some_and(|x| x == "bundle") {
                        let _ = std::fs::remove_file(e.path());
                    }
                }
            }
        })
        .await;
    }

    // ---- the coordinator ---------------------------------------------

    /// Runs until the process ends. Without a backend it returns at once.
    pub async fn run(self) {
        let Some(backend) = self.inner.backend.as_ref() else {
            return;
        };
        if self.inner.fetcher.is_none() {
            return self.coordinate(backend).await;
        }
        // Hub rollouts arrive as records (by sync); a change to one wakes
        // the coordinator, which decides in `step`.
        let mut changes = self.inner.registry.subscribe();
        let watch = async {
            loop {
                match changes.recv().await {
                    Ok(c) if c.kind == Kind::Rollout && c.key.starts_with(rollout::PREFIX) => {
                        self.inner.wake.notify(usize::MAX);
                    }
                    Ok(_) => {}
                    Err(async_broadcast::RecvError::Overflowed(_)) => {
                        self.inner.wake.notify(usize::MAX);
                    }
                    Err(async_broadcast::RecvError::Closed) => std::future::pending::<()>().await,
                }
            }
        };
        smol::future::or(self.coordinate(backend), watch).await
    }

    async fn coordinate(&self, backend: &Backend) {
        // Nothing can be decided without knowing the booted slot (RAUC may
        // start after us): retry with backoff; installs are refused until
        // then (`install` checks `booted_slot`).
        let mut backoff = Duration::from_secs(2);
        let booted = loop {
            match backend.booted().await {
                Ok(b) => break b,
                Err(e) => {
                    log::error!("ota: cannot tell the booted slot: {e}; retrying in {backoff:?}");
                    self.update_status(|s| s.phase = format!("booted slot unknown: {e}"));
                    async_io::Timer::after(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(300));
                }
            }
        };
        self.update_status(|s| {
            s.booted_slot = booted.clone();
            s.phase = String::new();
        });
        log::info!(
            "ota: backend {}, booted slot {booted}, state {}",
            backend.name(),
            self.deployment().state.as_str()
        );
        if let Err(e) = self.recover(backend, &booted).await {
            log::error!("ota: recovery after start: {e}");
        }
        let mut gate_begun = false;
        loop {
            let listener = self.inner.wake.listen();
            let wait = self.step(backend, &booted, &mut gate_begun).await;
            match wait {
                Wait::Now => {}
                Wait::Woken => listener.await,
                Wait::For(t) => {
                    smol::future::or(listener, async {
                        async_io::Timer::after(t).await;
                    })
                    .await
                }
            }
        }
    }

    /// Decisions that depend on what happened while we were not running.
    async fn recover(&self, backend: &Backend, booted: &str) -> Result<(), OtaError> {
        let _g = self.inner.lock.lock().await;
        let d = self.deployment();
        let rebooted = !d.install_boot_id.is_empty() && d.install_boot_id != self.inner.boot_id;
        match d.state {
            State::Downloading | State::Verifying | State::Installing => {
                log::info!("ota: resuming {} of {}", d.state.as_str(), d.id);
            }
            State::PendingReboot if booted == d.target_slot => {
                self.save(
                    Deployment {
                        state: State::BootedPendingCommit,
                        gate_boot_id: String::new(),
                        crashes: 0,
                        boots: 0,
                        ..d.clone()
                    },
                    format!("booted the new slot {}; health gate starts", d.target_slot),
                )
                .await?;
            }
            State::PendingReboot if rebooted => {
                self.save(
                    Deployment {
                        state: State::RolledBack,
                        last_error: format!(
                            "slot {} did not come up; the bootloader fell back to {booted}",
                            d.target_slot
                        ),
                        ..d
                    },
                    "rebooted into the old slot".into(),
                )
                .await?;
            }
            State::BootedPendingCommit if booted != d.target_slot => {
                self.save(
                    Deployment {
                        state: State::RolledBack,
                        last_error: format!(
                            "slot {} was not committed; the bootloader fell back to {booted}",
                            d.target_slot
                        ),
                        ..d
                    },
                    "booted the old slot before a commit".into(),
                )
                .await?;
            }
            State::BootedPendingCommit => {
                let mut d = d;
                let why;
                if d.gate_boot_id == self.inner.boot_id {
                    d.crashes += 1;
                    why = format!(
                        "daemon restarted during the health gate in the same boot: crash {} of {}",
                        d.crashes, self.inner.cfg.boot_attempts
                    );
                } else if !d.gate_boot_id.is_empty() {
                    d.boots += 1;
                    why = format!(
                        "the system rebooted during the health gate (power cut or reset, not counted as a failure): boot {} of {}",
                        d.boots, self.inner.cfg.max_unconfirmed_boots
                    );
                } else {
                    return Ok(());
                }
                if d.crashes >= self.inner.cfg.boot_attempts {
                    self.roll_back(
                        d,
                        format!(
                            "crashed {} times during the health gate",
                            self.inner.cfg.boot_attempts
                        ),
                    )
                    .await?;
                } else if d.boots >= self.inner.cfg.max_unconfirmed_boots {
                    let why = format!("{} boots without a commit", d.boots);
                    self.roll_back(d, why).await?;
                } else {
                    d.gate_boot_id.clear();
                    self.save(d, why).await?;
                }
            }
            State::RolledBack if booted == d.target_slot && booted != d.from_slot => {
                log::warn!("ota: rolled back but still on slot {booted}: rebooting again");
                self.run_reboot().await;
            }
            State::Idle
            | State::Committed
            | State::Failed
            | State::RolledBack
            | State::PendingReboot => {
                if let Err(e) = backend.keep_good(booted).await {
                    log::warn!("ota: could not refresh slot {booted}'s boot counter: {e}");
                }
            }
        }
        Ok(())
    }

    async fn step(&self, backend: &Backend, booted: &str, gate_begun: &mut bool) -> Wait {
        if self.inner.fetcher.is_some() && self.deployment().state.accepts_install() {
            match self.start_rollout(backend).await {
                Ok(true) => return Wait::Now,
                Ok(false) => {}
                Err(e) => {
                    log::error!("ota: acting on a hub rollout: {e}");
                    return Wait::For(Duration::from_secs(30));
                }
            }
        }
        let d = self.deployment();
        let timeout = self.inner.cfg.step_timeout.0;
        let left =
            || timeout.saturating_sub(Duration::from_millis(now_ms().saturating_sub(d.since_ms)));
        let r = match d.state {
            State::Idle | State::Committed | State::RolledBack | State::Failed => {
                return Wait::Woken
            }
            State::Downloading => with_timeout(d.state, left(), self.download(&d)).await,
            State::Verifying => with_timeout(d.state, left(), self.verify(backend, &d)).await,
            State::Installing => {
                with_timeout(d.state, left(), self.do_install(backend, &d, booted)).await
            }
            State::PendingReboot => return self.pending_reboot(backend, &d).await,
            State::BootedPendingCommit => return self.gate(backend, d, gate_begun).await,
        };
        match r {
            Ok(()) => Wait::Now,
            Err(e) => {
                let _g = self.inner.lock.lock().await;
                let cur = self.deployment();
                if cur.id != d.id || cur.state != d.state {
                    // An operator moved on meanwhile; their state stands.
                    return Wait::Now;
                }
                let msg = e.to_string();
                if let Err(e) = self
                    .save(
                        Deployment {
                            state: State::Failed,
                            last_error: msg.clone(),
                            ..cur
                        },
                        format!("{} failed: {msg}", d.state.as_str()),
                    )
                    .await
                {
                    log::error!("ota: cannot record the failure: {e}");
                    return Wait::For(Duration::from_secs(30));
                }
                self.clean_work_dir().await;
                Wait::Now
            }
        }
    }

    /// Moves `d` to `next` unless someone else changed the deployment.
    async fn advance(&self, d: &Deployment, next: Deployment, msg: String) -> Result<(), OtaError> {
        let _g = self.inner.lock.lock().await;
        let cur = self.deployment();
        if cur.id != d.id || cur.state != d.state {
            return Ok(());
        }
        self.save(next, msg).await
    }

    async fn download(&self, d: &Deployment) -> Result<(), OtaError> {
        let n = if d.rollout.is_empty() {
            let src = PathBuf::from(&d.source);
            let dst = self.staged_path(&d.id);
            let rate = self.inner.cfg.download_rate.0;
            let p = self.progress();
            smol::unblock(move || {
                bundle::stage(&src, &dst, rate, |done, total| {
                    p((done * 100 / total.max(1)) as u8, "copying");
                })
            })
            .await?
        } else {
            self.fetch(d).await?
        };
        self.advance(
            d,
            Deployment {
                state: State::Verifying,
                ..d.clone()
            },
            format!("bundle staged ({n} bytes)"),
        )
        .await
    }

    /// Downloads a hub rollout's bundle into the staged file, resuming
    /// from its length (Range) after a failure or a restart. Transient
    /// failures retry; the step timeout bounds them. A refusal by the
    /// server (4xx) or a bad URL fails at once.
    async fn fetch(&self, d: &Deployment) -> Result<u64, OtaError> {
        let f = self.inner.fetcher.as_ref().ok_or_else(|| {
            OtaError::NotApplicable("no hub (cloud.server_address) to download from".into())
        })?;
        let size = d.manifest.as_ref().map_or(0, |m| m.size);
        let dst = self.staged_path(&d.id);
        let phase = format!("downloading {}", d.source);
        let progress = self.progress();
        // Called per received chunk; `progress` notifies only when the
        // percentage changes, so D-Bus and HTTP watchers see ~100 steps.
        let report = |have: u64| progress((have * 100 / size.max(1)).min(100) as u8, &phase);
        loop {
            report(smol::fs::metadata(&dst).await.map_or(0, |m| m.len()));
            match f.fetch(&d.source, &dst, size, &report).await {
                Ok(n) => return Ok(n),
                Err(e) if permanent(&e) => return Err(e.into()),
                Err(e) => {
                    log::warn!("ota: {e}; retrying in {FETCH_RETRY:?}");
                    async_io::Timer::after(FETCH_RETRY).await;
                }
            }
        }
    }

    async fn verify(&self, backend: &Backend, d: &Deployment) -> Result<(), OtaError> {
        self.progress()(0, "verifying");
        backend
            .verify(&self.staged_path(&d.id), d.manifest.as_ref())
            .await?;
        self.advance(
            d,
            Deployment {
                state: State::Installing,
                ..d.clone()
            },
            "bundle verified".into(),
        )
        .await
    }

    async fn do_install(
        &self,
        backend: &Backend,
        d: &Deployment,
        booted: &str,
    ) -> Result<(), OtaError> {
        if d.install_tries >= MAX_INSTALL_TRIES {
            return Err(OtaError::Rejected(format!(
                "install interrupted {MAX_INSTALL_TRIES} times; giving up"
            )));
        }
        let tries = d.install_tries + 1;
        // Counted before the attempt: a power cut mid-install counts.
        self.advance(
            d,
            Deployment {
                install_tries: tries,
                ..d.clone()
            },
            format!("install attempt {tries}"),
        )
        .await?;
        let d = Deployment {
            install_tries: tries,
            ..d.clone()
        };
        let staged = self.staged_path(&d.id);
        let target = backend
            .install(&staged, d.manifest.as_ref(), booted, self.progress())
            .await?;
        if target == booted {
            return Err(OtaError::Backend(format!(
                "the installer made the booted slot {booted} primary"
            )));
        }
        let st = staged.clone();
        let _ = smol::unblock(move || std::fs::remove_file(st)).await;
        self.advance(
            &d,
            Deployment {
                state: State::PendingReboot,
                from_slot: booted.to_owned(),
                target_slot: target.clone(),
                install_boot_id: self.inner.boot_id.clone(),
                ..d.clone()
            },
            format!("installed into slot {target}; waiting for the reboot"),
        )
        .await
    }

    async fn pending_reboot(&self, backend: &Backend, d: &Deployment) -> Wait {
        let age = Duration::from_millis(now_ms().saturating_sub(d.since_ms));
        if age >= PENDING_REBOOT_MAX {
            let _g = self.inner.lock.lock().await;
            let r = backend.rollback(&d.target_slot, &d.from_slot).await;
            let msg = match r {
                Ok(()) => "no reboot was allowed for 7 days; update abandoned".to_string(),
                Err(e) => format!("no reboot was allowed for 7 days; abandoning failed: {e}"),
            };
            if let Err(e) = self
                .save(
                    Deployment {
                        state: State::Failed,
                        last_error: msg.clone(),
                        ..d.clone()
                    },
                    msg,
                )
                .await
            {
                log::error!("ota: {e}");
            }
            return Wait::Now;
        }
        let cfg = &self.inner.cfg;
        let why_not = if d.reboot_now {
            None
        } else {
            let window = d
                .maintenance_window
                .as_deref()
                .or(cfg.maintenance_window.as_deref());
            reboot_blocked(cfg, window, now_ms()).await
        };
        match why_not {
            Some((reason, wait)) => {
                if self.status().phase != reason {
                    log::info!("ota: reboot deferred: {reason}");
                }
                self.progress()(100, &reason);
                Wait::For(wait.min(PENDING_REBOOT_MAX - age))
            }
            None => {
                {
                    let _g = self.inner.lock.lock().await;
                    let cur = self.deployment();
                    if cur.id != d.id || cur.state != State::PendingReboot {
                        return Wait::Now;
                    }
                    if let Err(e) = self
                        .save(
                            Deployment {
                                reboot_issued: true,
                                reboot_now: false,
                                ..cur
                            },
                            format!("rebooting into slot {}", d.target_slot),
                        )
                        .await
                    {
                        log::error!("ota: {e}");
                        return Wait::For(Duration::from_secs(30));
                    }
                }
                self.run_reboot().await;
                Wait::For(REBOOT_GRACE)
            }
        }
    }

    async fn run_reboot(&self) {
        let cmd = self.inner.cfg.reboot_command.clone();
        log::warn!("ota: running the reboot command: {cmd}");
        match run_shell(&cmd, Duration::from_secs(120)).await {
            Ok(()) => {}
            Err(e) => log::error!("ota: reboot command failed: {e}"),
        }
    }

    /// The health gate on the new slot.
    async fn gate(&self, backend: &Backend, d: Deployment, begun: &mut bool) -> Wait {
        let cfg = &self.inner.cfg;
        if !*begun {
            // This boot reached the daemon: refill the bootloader's counter
            // and note the boot, so a crash from here on is told apart from
            // a power cut (module note).
            if let Err(e) = backend.refill(&d.target_slot).await {
                log::warn!(
                    "ota: could not refill slot {}'s boot counter: {e}",
                    d.target_slot
                );
            }
            let _g = self.inner.lock.lock().await;
            let cur = self.deployment();
            if cur.id != d.id || cur.state != d.state {
                return Wait::Now;
            }
            if let Err(e) = self
                .save(
                    Deployment {
                        gate_boot_id: self.inner.boot_id.clone(),
                        ..cur
                    },
                    format!(
                        "health gate started on slot {} (deadline {:?})",
                        d.target_slot, cfg.commit_deadline.0
                    ),
                )
                .await
            {
                log::error!("ota: {e}");
                return Wait::For(Duration::from_secs(5));
            }
            *begun = true;
        }
        let deadline = Instant::now() + cfg.commit_deadline.0;
        let retry =
            (cfg.commit_deadline.0 / 5).clamp(Duration::from_millis(200), Duration::from_secs(5));
        let mut last = String::new();
        loop {
            let listener = self.inner.wake.listen();
            let cur = self.deployment();
            if cur.id != d.id || cur.state != State::BootedPendingCommit {
                return Wait::Now;
            }
            self.progress()(0, "health gate");
            match self.checks(deadline).await {
                Ok(()) => break,
                Err(why) => {
                    if why != last {
                        log::info!("ota: health gate not passed yet: {why}");
                    }
                    last = why;
                }
            }
            let Some(left) = deadline.checked_duration_since(Instant::now()) else {
                break;
            };
            if left.is_zero() {
                break;
            }
            smol::future::or(listener, async {
                async_io::Timer::after(retry.min(left)).await;
            })
            .await;
        }
        let _g = self.inner.lock.lock().await;
        let cur = self.deployment();
        if cur.id != d.id || cur.state != State::BootedPendingCommit {
            return Wait::Now;
        }
        if !last.is_empty() && Instant::now() >= deadline {
            let r = self
                .roll_back(
                    cur,
                    format!(
                        "health gate failed within {:?}: {last}",
                        cfg.commit_deadline.0
                    ),
                )
                .await;
            if let Err(e) = r {
                log::error!("ota: {e}");
            }
            return Wait::Now;
        }
        // Passed: commit, verified by read-back; a few tries for a flaky
        // environment write before it counts as a failure.
        let mut err = None;
        for i in 0..3 {
            match backend.mark_good(&cur.target_slot).await {
                Ok(()) => {
                    err = None;
                    break;
                }
                Err(e) => {
                    log::warn!("ota: mark-good attempt {} failed: {e}", i + 1);
                    err = Some(e);
                    async_io::Timer::after(Duration::from_secs(1)).await;
                }
            }
        }
        let r = match err {
            None => {
                self.save(
                    Deployment {
                        state: State::Committed,
                        last_error: String::new(),
                        ..cur.clone()
                    },
                    format!("health gate passed; slot {} committed", cur.target_slot),
                )
                .await
            }
            Some(e) => {
                self.roll_back(cur, format!("mark-good could not be confirmed: {e}"))
                    .await
            }
        };
        if let Err(e) = r {
            log::error!("ota: {e}");
        }
        Wait::Now
    }

    /// Every configured check, once. Err says which failed.
    async fn checks(&self, deadline: Instant) -> Result<(), String> {
        let cfg = &self.inner.cfg;
        match self.inner.store.call(|db| db.stats()).await {
            Ok(Ok(_)) => {}
            Ok(Err(e)) | Err(e) => return Err(format!("store: {e}")),
        }
        if cfg.health_require_cloud && !self.inner.sync.status().online {
            return Err("the hub is not reachable".into());
        }
        let left = deadline
            .saturating_duration_since(Instant::now())
            .max(Duration::from_secs(1));
        for cmd in &cfg.health_commands {
            run_shell(cmd, left.min(Duration::from_secs(60)))
                .await
                .map_err(|e| format!("`{cmd}`: {e}"))?;
        }
        Ok(())
    }

    /// Marks the target bad, the old slot primary (verified) and reboots
    /// into it at once: a bad image does not wait for the window. Caller
    /// holds the lock.
    async fn roll_back(&self, d: Deployment, reason: String) -> Result<(), OtaError> {
        let backend = self.backend()?;
        match backend.rollback(&d.target_slot, &d.from_slot).await {
            Ok(()) => {
                self.save(
                    Deployment {
                        state: State::RolledBack,
                        last_error: reason.clone(),
                        ..d.clone()
                    },
                    format!("{reason}; rolling back to slot {}", d.from_slot),
                )
                .await?;
                self.run_reboot().await;
                Ok(())
            }
            Err(e) => {
                let msg = format!("{reason}; rollback failed: {e}");
                self.save(
                    Deployment {
                        state: State::Failed,
                        last_error: msg.clone(),
                        ..d
                    },
                    msg,
                )
                .await?;
                Err(e)
            }
        }
    }
}

impl Backend {
    fn manifest_for_checked(&self, m: Manifest) -> Result<Option<Manifest>, OtaError> {
        match self {
            Backend::Env(_) => {
                self.check_signature(&m)?;
                Ok(Some(m))
            }
            Backend::Rauc(_) => Ok(None),
        }
    }
}

async fn with_timeout(
    state: State,
    left: Duration,
    f: impl std::future::Future<Output = Result<(), OtaError>>,
) -> Result<(), OtaError> {
    smol::future::or(f, async {
        async_io::Timer::after(left).await;
        Err(OtaError::Timeout {
            state: state.as_str(),
            after: left,
        })
    })
    .await
}

/// Download failures that waiting will not cure.
fn permanent(e: &TransportError) -> bool {
    match e {
        TransportError::BadUrl { .. } | TransportError::Tls { .. } | TransportError::NoRoots => {
            true
        }
        TransportError::Status { status, .. } => {
            (400..500).contains(status) && *status != 408 && *status != 429
        }
        _ => false,
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
    let p = path.to_path_buf();
    match smol::unblock(move || std::fs::read_to_string(p)).await {
        Ok(s) => s.trim().to_owned(),
        Err(e) => {
            // Without a boot id every restart looks like a reboot: crashes
            // then count as boots (the larger limit) instead of crashes.
            log::warn!("ota: cannot read {}: {e}", path.display());
            String::new()
        }
    }
}

/// `sh -c cmd` on the blocking pool; Err unless it exits 0 in time.
async fn run_shell(cmd: &str, timeout: Duration) -> Result<(), String> {
    let child = std::process::Command::new("sh")
        .arg("-c")
        .arg(cmd)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot run: {e}"))?;
    let pid = child.id();
    let wait = smol::unblock(move || child.wait_with_output());
    let out = smol::future::or(async { Some(wait.await) }, async {
        async_io::Timer::after(timeout).await;
        None
    })
    .await;
    match out {
        Some(Ok(o)) if o.status.success() => Ok(()),
        Some(Ok(o)) => Err(format!(
            "{}: {}",
            o.status,
            String::from_utf8_lossy(&o.stderr).trim()
        )),
        Some(Err(e)) => Err(e.to_string()),
        None => {
            // Kill the stuck check; its waiter thread then returns.
            let _ = nix_kill(pid);
            Err(format!("no exit within {timeout:?}"))
        }
    }
}

fn nix_kill(pid: u32) -> std::io::Result<()> {
    std::process::Command::new("kill")
        .args(["-KILL", &pid.to_string()])
        .status()
        .map(|_| ())
}

/// Minutes since midnight UTC for `ms`.
fn minute_of_day(ms: u64) -> u16 {
    ((ms / 60_000) % 1440) as u16
}

/// Whether minute `m` lies in `[start, end)`, wrapping past midnight; and
/// if not, how many minutes until it does.
pub fn window_wait(start: u16, end: u16, m: u16) -> Option<u16> {
    let inside = if start <= end {
        start <= m && m < end
    } else {
        m >= start || m < end
    };
    if inside || start == end {
        None
    } else {
        Some((start + 1440 - m) % 1440)
    }
}

/// Why a reboot may not happen now (and when to look again), or None.
/// `window` is the deployment's (a rollout's override) or the config's.
async fn reboot_blocked(
    cfg: &OtaConfig,
    window: Option<&str>,
    now: u64,
) -> Option<(String, Duration)> {
    if let Some(w) = window {
        if let Ok((start, end)) = crate::config::parse_window(w) {
            if let Some(mins) = window_wait(start, end, minute_of_day(now)) {
                let secs_into_minute = (now / 1000) % 60;
                let wait = Duration::from_secs(u64::from(mins) * 60 - secs_into_minute);
                return Some((format!("outside the maintenance window {w} (UTC)"), wait));
            }
        }
    }
    if cfg.min_battery_percent > 0 {
        let path = cfg.battery_path.clone().unwrap_or_default();
        let level = smol::unblock(move || std::fs::read_to_string(path))
            .await
            .ok()
            .and_then(|s| s.trim().parse::<u8>().ok());
        match level {
            Some(l) if l >= cfg.min_battery_percent => {}
            Some(l) => {
                return Some((
                    format!("battery at {l}% (needs {}%)", cfg.min_battery_percent),
                    BATTERY_RECHECK,
                ))
            }
            None => return Some(("battery level unreadable".into(), BATTERY_RECHECK)),
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn windows_wrap_past_midnight() {
        // 22:00-04:00
        let (s, e) = (22 * 60, 4 * 60);
        assert_eq!(window_wait(s, e, 23 * 60), None);
        assert_eq!(window_wait(s, e, 60), None);
        assert_eq!(window_wait(s, e, 4 * 60), Some(18 * 60));
        assert_eq!(window_wait(s, e, 21 * 60 + 59), Some(1));
        // 02:00-04:00
        assert_eq!(window_wait(120, 240, 119), Some(1));
        assert_eq!(window_wait(120, 240, 120), None);
        assert_eq!(window_wait(120, 240, 241), Some(1440 - 121));
    }

    #[test]
    fn battery_below_the_threshold_defers_the_reboot() {
        let dir = tempfile::tempdir().unwrap();
        let cap = dir.path().join("capacity");
        let cfg = OtaConfig {
            min_battery_percent: 40,
            battery_path: Some(cap.clone()),
            ..Default::default()
        };
        std::fs::write(&cap, "25\n").unwrap();
        let r = smol::block_on(reboot_blocked(&cfg, None, 0));
        assert!(r.is_some_and(|(why, wait)| why.contains("25%") && wait == BATTERY_RECHECK));
        std::fs::write(&cap, "40\n").unwrap();
        assert!(smol::block_on(reboot_blocked(&cfg, None, 0)).is_none());
        std::fs::remove_file(&cap).unwrap();
        assert!(
            smol::block_on(reboot_blocked(&cfg, None, 0)).is_some(),
            "unreadable blocks"
        );
    }

    #[test]
    fn states_round_trip_as_kebab_case() {
        for s in State::ALL {
            let j = serde_json::to_string(&s).unwrap();
            assert_eq!(j, format!("\"{}\"", s.as_str()));
        }
    }
}
