//! Operator commands (install, mark good or bad, reboot) and host
//! rollouts defined on the hub: each one a transition under `inner.lock`,
//! persisted with its log line and hub report before it is published.

use std::path::{Path, PathBuf};

use super::backend::Backend;
use super::bundle::{self, Manifest};
use super::{now_ms, rollout, Deployment, Ota, OtaError, State};

impl Ota {
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
        let meta = smol::fs::metadata(&path).await;
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
                    self.check_staging(m.size)?;
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
        let superseded = self.make_way(backend, &cur).await?;
        let id = format!("local-{}", now_ms());
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
    pub(super) async fn start_rollout(&self, backend: &Backend) -> Result<bool, OtaError> {
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
        if !cur.state.accepts_install()
            || r.mark() <= cur.rollout_seen
            || self.inner.jobs.live() > 0
        {
            // An operator command came first, or the last step's writer is
            // still stopping; look again when it ends.
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
        let refused = backend
            .check_signature(&m)
            .and_then(|()| self.check_staging(m.size))
            .err();
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

    /// A bundle larger than its share of `resources.storage_limit` is
    /// refused before anything is staged.
    fn check_staging(&self, size: u64) -> Result<(), OtaError> {
        let limit = self.inner.cfg.staging_max_size;
        if size > limit.0 {
            return Err(OtaError::Invalid(format!(
                "the bundle ({size} bytes) is larger than ota.staging_max_size ({limit})"
            )));
        }
        Ok(())
    }

    /// What a new deployment from any input needs before it replaces
    /// `cur` (called under `inner.lock`): `cur` accepts an install and no
    /// writer of the last one is still alive (a second writer on one
    /// slot). An update awaiting its reboot is cancelled first (the booted
    /// slot is primary again), so a failure of the new one cannot leave
    /// the bootloader set to boot an update nothing tracks any more; the
    /// answer names it for the new deployment's first log line. Clears the
    /// staging directory.
    pub(super) async fn make_way(
        &self,
        backend: &Backend,
        cur: &Deployment,
    ) -> Result<String, OtaError> {
        if !cur.state.accepts_install() {
            return Err(OtaError::Busy(cur.state.as_str()));
        }
        if self.inner.jobs.live() > 0 {
            return Err(OtaError::Busy("stopping the last install's writer"));
        }
        let superseded = if cur.state == State::PendingReboot {
            backend.rollback(&cur.target_slot, &cur.from_slot).await?;
            format!(" (cancels {} {} awaiting its reboot)", cur.id, cur.version)
        } else {
            String::new()
        };
        self.clean_work_dir().await;
        Ok(superseded)
    }

    pub(super) async fn clean_work_dir(&self) {
        let wd = self.inner.work_dir.clone();
        smol::unblock(move || remove_staged(&wd)).await;
    }
}

/// Deletes every staged bundle in `wd`.
// Runs on the blocking pool (`clean_work_dir`), never on the executor.
#[allow(clippy::disallowed_methods)]
fn remove_staged(wd: &Path) {
    if let Ok(entries) = std::fs::read_dir(wd) {
        for e in entries.flatten() {
            if e.path().extension().is_some_and(|x| x == "bundle") {
                let _ = std::fs::remove_file(e.path());
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
