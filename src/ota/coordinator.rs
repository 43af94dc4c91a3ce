//! The coordinator: one loop that drives the persisted deployment through
//! its steps (module note in `ota`), recovers after a restart, and waits
//! for the reboot window. The health gate is in `gate`.

use std::path::PathBuf;
use std::time::Duration;

use super::backend::Backend;
use super::bundle;
use super::{
    now_ms, rollout, writer, Deployment, Ota, OtaError, State, Wait, BATTERY_RECHECK,
    MAX_INSTALL_TRIES, PENDING_REBOOT_MAX, REBOOT_GRACE,
};
use crate::config::Ota as OtaConfig;
use crate::store::Kind;
use crate::sync::transport::{TransportError, FETCH_RETRY};

impl Ota {
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
        log::info!(
            "ota: start-up checks done (state {})",
            self.deployment().state.as_str()
        );
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
            State::Installing if !d.from_slot.is_empty() && booted != d.from_slot => {
                // The install had made the new slot the one booted next (it
                // does so only after the write read back) and the power went
                // before `pending-reboot` was saved: the gate decides.
                self.save(
                    Deployment {
                        state: State::BootedPendingCommit,
                        target_slot: booted.to_owned(),
                        gate_boot_id: String::new(),
                        crashes: 0,
                        boots: 0,
                        ..d.clone()
                    },
                    format!(
                        "booted the new slot {booted} (installed before the power cut); health gate starts"
                    ),
                )
                .await?;
            }
            State::Downloading | State::Verifying | State::Installing => {
                log::info!("ota: resuming {} of {}", d.state.as_str(), d.id);
                // This boot reached the daemon on the booted, committed slot:
                // its try counter is refilled, so power cuts during a long
                // download cannot exhaust it and fall back to the other slot.
                if let Err(e) = backend.keep_good(booted).await {
                    log::warn!("ota: could not refresh slot {booted}'s boot counter: {e}");
                }
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
                self.fell_back(backend, &d.target_slot, booted).await;
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
                self.fell_back(backend, &d.target_slot, booted).await;
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
                // The bootloader chose the rolled-back slot again (its try
                // flags spent by a power cut before the old slot's daemon
                // refilled them): the environment is put right before the
                // reboot, or this would repeat at every boot.
                log::warn!("ota: rolled back but still on slot {booted}: rebooting again");
                self.fell_back(backend, booted, &d.from_slot).await;
                self.run_reboot().await;
            }
            State::Failed | State::RolledBack
                if !d.target_slot.is_empty() && booted != d.target_slot =>
            {
                // A rollback whose environment write a power cut stopped is
                // finished here; a no-op (nothing written) when complete.
                self.fell_back(backend, &d.target_slot, booted).await;
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

    /// The bootloader fell back to `booted` (or a rollback ended there):
    /// the update's slot is marked bad and `booted` is the one booted next,
    /// so a later boot whose try flags are spent (a power cut before this
    /// daemon refilled them) cannot pick the rolled-back slot again.
    async fn fell_back(&self, backend: &Backend, bad: &str, booted: &str) {
        if let Err(e) = backend.settle_rollback(bad, booted).await {
            log::warn!("ota: could not mark slot {bad} bad after the fallback to {booted}: {e}");
        }
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
                // A timeout dropped the step, which told its jobs to stop;
                // their threads end at the next chunk. Nothing changes until
                // they have: a new install must not meet a live writer.
                if self.inner.jobs.live() > 0 {
                    log::warn!(
                        "ota: {} stopped ({e}); waiting for its writer to end",
                        d.state.as_str()
                    );
                }
                self.inner.jobs.idle().await;
                if d.state == State::Installing {
                    // The write may have got as far as activating the target:
                    // the booted slot is made primary again (idempotent), so
                    // a failed install never boots.
                    if let Err(e) = backend.restore_booted(booted).await {
                        log::warn!("ota: restoring slot {booted} as primary: {e}");
                    }
                }
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
            writer::run(&self.inner.jobs, move |cancel| {
                bundle::stage(&src, &dst, rate, cancel, |done, total| {
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
        // Counted before the attempt: a power cut mid-install counts. The
        // booted slot is noted first: if the power goes after the target
        // was activated, `recover` sees the other slot booted.
        self.advance(
            d,
            Deployment {
                install_tries: tries,
                from_slot: booted.to_owned(),
                ..d.clone()
            },
            format!("install attempt {tries}"),
        )
        .await?;
        let d = Deployment {
            install_tries: tries,
            from_slot: booted.to_owned(),
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
        let _ = smol::fs::remove_file(&staged).await;
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

    pub(super) async fn run_reboot(&self) {
        let cmd = self.inner.cfg.reboot_command.clone();
        log::warn!("ota: running the reboot command: {cmd}");
        match super::shell::run_shell(&cmd, Duration::from_secs(120)).await {
            Ok(()) => {}
            Err(e) => log::error!("ota: reboot command failed: {e}"),
        }
    }
}

/// Runs `f` until `left` passes. Dropping `f` on the timeout sets the
/// cancel flag of any job it started (`writer`); the caller waits for them.
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
        let level = smol::fs::read_to_string(path)
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
}
