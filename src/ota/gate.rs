//! The health gate on a freshly booted slot, and rollback: the gate's
//! checks run while the executor keeps pinging the watchdog, so every
//! check is async (store call, sync status, `shell` commands with a
//! timeout that kills their whole process group).

use std::time::{Duration, Instant};

use super::backend::Backend;
use super::shell::run_shell;
use super::{Deployment, Ota, OtaError, State, Wait};

impl Ota {
    /// The health gate on the new slot.
    pub(super) async fn gate(&self, backend: &Backend, d: Deployment, begun: &mut bool) -> Wait {
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
    pub(super) async fn roll_back(&self, d: Deployment, reason: String) -> Result<(), OtaError> {
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
