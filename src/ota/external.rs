//! A third input besides local bundles and hub rollouts: an update server
//! outside Konsul (a hawkBit DDI server, `crate::hawkbit`). Its client
//! downloads and checks the artifact's digest itself (the server's own
//! protocol, credentials and retry rules), then hands the file over here;
//! the deployment starts at `verifying`, so from there on it is the same
//! state machine, health gate and rollback as every other update.
//!
//! The deployment's `external` names the server's job (`hawkbit:<action>`)
//! so its client can map this deployment's outcome back to it, after a
//! reboot too.

use std::path::Path;

use super::bundle::Manifest;
use super::{Deployment, Ota, OtaError, State};

/// What an external update server hands over.
#[derive(Debug, Clone)]
pub struct External {
    /// The deployment id (`[A-Za-z0-9-_.:]`, at most 64).
    pub id: String,
    /// `hawkbit:<action>`: kept on the deployment for its client.
    pub origin: String,
    pub version: String,
    /// Where it was downloaded from (for status and reports).
    pub source: String,
    /// The signed manifest (uboot/grub); RAUC bundles carry their own.
    pub manifest: Option<Manifest>,
    /// Replaces `ota.maintenance_window` for this update's reboot.
    pub maintenance_window: Option<String>,
}

impl Ota {
    /// Where an external client may keep partial downloads: the work
    /// directory, which the coordinator cleans of staged `*.bundle` files
    /// only (so a resumable `*.part` survives a new deployment).
    pub fn work_dir(&self) -> &Path {
        &self.inner.work_dir
    }

    /// Starts a deployment from a file an external server's client
    /// downloaded and digest-checked; `file` is moved into staging. A bad
    /// manifest signature is refused here, before the file is staged or any
    /// slot written.
    pub async fn start_external(&self, ext: External, file: &Path) -> Result<(), OtaError> {
        let backend = self.backend()?;
        if let Some(m) = &ext.manifest {
            backend.check_signature(m)?;
        }
        let _g = self.inner.lock.lock().await;
        if self.status().booted_slot.is_empty() {
            return Err(OtaError::NotApplicable(
                "the booted slot is not known yet; see `konsul-edge ota status`".into(),
            ));
        }
        let cur = self.deployment();
        if cur.id == ext.id {
            // Handed over before a restart: nothing to do again.
            return Ok(());
        }
        let superseded = self.make_way(backend, &cur).await?;
        let staged = self.staged_path(&ext.id);
        smol::fs::rename(file, &staged)
            .await
            .map_err(|source| OtaError::Io {
                what: format!("moving {} to {}", file.display(), staged.display()),
                source,
            })?;
        let d = Deployment {
            id: ext.id.clone(),
            version: ext.version.clone(),
            source: ext.source.clone(),
            external: ext.origin.clone(),
            maintenance_window: ext.maintenance_window.clone(),
            manifest: ext.manifest,
            state: State::Verifying,
            rollout_seen: cur.rollout_seen.clone(),
            ..Default::default()
        };
        self.save(
            d,
            format!(
                "{}: version {} downloaded from {}{superseded}",
                ext.origin, ext.version, ext.source
            ),
        )
        .await?;
        self.inner.wake.notify(usize::MAX);
        Ok(())
    }

    /// Cancels an external deployment before its slot is written
    /// (`downloading` or `verifying`): Err once the write has begun.
    pub async fn cancel_external(&self, origin: &str) -> Result<(), OtaError> {
        let _g = self.inner.lock.lock().await;
        let d = self.deployment();
        if d.external != origin {
            return Err(OtaError::NotFound(format!("deployment for {origin}")));
        }
        match d.state {
            State::Downloading | State::Verifying => {
                // The verify step may still be running: it only reads the
                // staged file, and `advance` will not move a deployment
                // that is no longer in its state.
                self.save(
                    Deployment {
                        state: State::Failed,
                        last_error: format!("cancelled by {origin}'s server"),
                        ..d
                    },
                    format!("{origin}: cancelled by the server before the slot write"),
                )
                .await?;
                self.inner.wake.notify(usize::MAX);
                Ok(())
            }
            s => Err(OtaError::NotApplicable(format!(
                "the update is {}: the slot write has begun or it has ended",
                s.as_str()
            ))),
        }
    }
}
