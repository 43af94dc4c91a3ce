//! Device chunks (module note in `hawkbit`): a chunk of another part than
//! the OS whose metadata names MQTT devices becomes a firmware rollout
//! (`firmware::rollout`) to them, so one DDI action covers the host and
//! its leaf devices.
//!
//! A device chunk carries one artifact with a `sha256`, and metadata (a
//! hawkBit software module's target-visible metadata): `device_type`
//! (required), `devices` (ids, comma or space separated; none: every
//! device of the type) and `signature` (ed25519 over the image's SHA-256
//! digest, base64 or hex, checked against `firmware.public_keys` as an
//! upload is). Every chunk is downloaded and verified before the host's
//! slot is written, so a bad device image refuses the whole action with
//! nothing written. The rollouts start once the host part has committed
//! on its new slot (or at once, without an OS chunk): a host that fails
//! its gate leaves every device on its old firmware. The action closes
//! when every rollout has ended: `success` only if all are complete with
//! no failed device.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::actor::{DETAIL_LINES, STEPS};
use super::ddi::{self, DeploymentBase, Execution, Finished};
use super::outbox::{self, ActionRec, Phase};
use super::{Hawkbit, HawkbitError};
use crate::firmware::rollout::{DevState, Spec, State};
use crate::firmware::{check_meta, FirmwareError, NewArtifact};

/// One device chunk of an action, persisted with it (`ActionRec`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub(crate) struct DeviceChunk {
    /// Also the rollout's id: `hawkbit-<action>-<chunk index>`.
    pub rollout: String,
    pub name: String,
    pub device_type: String,
    pub version: String,
    pub devices: Vec<String>,
    pub sha256: String,
    pub signature: String,
    pub size: u64,
    pub href: String,
}

impl DeviceChunk {
    /// Its image's partial download, in the artifact directory `dir`.
    pub(super) fn part_path(&self, dir: &Path) -> PathBuf {
        dir.join(format!(".{}.part", self.rollout))
    }

    fn spec(&self) -> Spec {
        Spec {
            id: Some(self.rollout.clone()),
            device_type: self.device_type.clone(),
            version: self.version.clone(),
            devices: self.devices.clone(),
            ..Default::default()
        }
    }

    fn artifact(&self) -> NewArtifact {
        NewArtifact {
            device_type: self.device_type.clone(),
            version: self.version.clone(),
            sha256: self.sha256.clone(),
            signature: self.signature.clone(),
            notes: format!("hawkBit chunk {} ({})", self.name, self.rollout),
        }
    }
}

impl Hawkbit {
    /// The action's device chunks, or why it cannot be taken: every chunk
    /// that is not the OS must name devices and be verifiable.
    pub(super) fn device_chunks(&self, db: &DeploymentBase) -> Result<Vec<DeviceChunk>, String> {
        let mut out = Vec::new();
        for (i, c) in db.deployment.chunks.iter().enumerate() {
            if c.is_os() {
                continue;
            }
            let what = format!("chunk `{}` (part {})", c.name, c.part);
            let meta = |k: &str| {
                c.metadata
                    .iter()
                    .find(|m| m.key == k)
                    .map(|m| m.value.trim().to_owned())
                    .filter(|v| !v.is_empty())
            };
            let Some(device_type) = meta("device_type") else {
                return Err(format!(
                    "{what}: names no MQTT devices (metadata `device_type`, optionally `devices`); only the OS chunk and device chunks are supported"
                ));
            };
            let Some(ro) = &self.inner.rollouts else {
                return Err(format!("{what}: this node runs no firmware rollouts"));
            };
            if ro.artifacts().settings().keys.is_empty() {
                return Err(format!(
                    "{what}: no firmware.public_keys configured to check device firmware"
                ));
            }
            let [a] = c.artifacts.as_slice() else {
                return Err(format!("{what}: a device chunk has exactly one artifact"));
            };
            let (Some(sha256), Some(href)) = (&a.hashes.sha256, a.href()) else {
                return Err(format!("{}: no sha256 or no download link", a.filename));
            };
            let Some(signature) = meta("signature") else {
                return Err(format!("{what}: no `signature` metadata"));
            };
            let chunk = DeviceChunk {
                rollout: format!("hawkbit-{}-{i}", db.id),
                name: c.name.clone(),
                device_type,
                version: c.version.clone(),
                devices: meta("devices")
                    .unwrap_or_default()
                    .split([',', ' '])
                    .filter(|d| !d.is_empty())
                    .map(str::to_owned)
                    .collect(),
                sha256: sha256.to_ascii_lowercase(),
                signature,
                size: a.size,
                href: href.to_owned(),
            };
            // Everything that can be checked before a byte is fetched
            // (names, digest and signature format, device ids), with the
            // same rules as an upload and a rollout from the API: a
            // mistake must not surface after the host's slot was written.
            check_meta(&chunk.artifact())
                .and_then(|()| ro.check(&chunk.spec()))
                .map_err(|e| format!("{what}: {e}"))?;
            out.push(chunk);
        }
        Ok(out)
    }

    /// Downloads each device chunk's image into the artifact directory
    /// (resumed across errors and restarts) and stores it as firmware,
    /// with the digest and signature checked.
    pub(super) async fn fetch_devices(&self, chunks: &[DeviceChunk]) -> Result<(), HawkbitError> {
        let Some(ro) = &self.inner.rollouts else {
            return Ok(());
        };
        let store = ro.artifacts();
        for c in chunks {
            let stored = store.resolve(c.sha256.clone(), None).await;
            if stored.is_ok_and(|a| a.device_type == c.device_type && a.version == c.version) {
                continue;
            }
            let part = c.part_path(&store.settings().dir);
            let have = self
                .inner
                .server
                .download(&c.href, &part, self.inner.bytes_per_sec, &|_| {})
                .await?;
            if have < c.size {
                return Err(HawkbitError::Server {
                    url: c.href.clone(),
                    detail: format!("{have} of {} bytes; the next attempt resumes", c.size),
                });
            }
            store
                .import_file(part, c.artifact())
                .await
                .map_err(|source| HawkbitError::Firmware {
                    chunk: c.name.clone(),
                    source: Box::new(source),
                })?;
        }
        Ok(())
    }

    /// The host part is done (or there is none): one rollout per device
    /// chunk. Idempotent: a rollout created before a restart stays.
    pub(super) async fn start_devices(&self, r: &mut ActionRec) -> Result<(), HawkbitError> {
        let Some(ro) = &self.inner.rollouts else {
            let why = "this node runs no firmware rollouts".to_owned();
            return self.close(r, Finished::Failure, vec![why]).await;
        };
        for c in &r.devices {
            match ro.create(c.spec()).await {
                Ok(_) | Err(FirmwareError::Conflict { .. }) => {}
                Err(e) => {
                    let mut why = vec![format!("{}: rollout not created: {e}", c.name)];
                    why.extend((!r.host_done.is_empty()).then(|| r.host_done.clone()));
                    return self.close(r, Finished::Failure, why).await;
                }
            }
        }
        r.phase = Phase::Devices;
        let names: Vec<&str> = r.devices.iter().map(|c| c.rollout.as_str()).collect();
        r.reported = format!("firmware rollouts {} started", names.join(", "));
        let mut lines = vec![r.reported.clone()];
        lines.extend((!r.host_done.is_empty()).then(|| r.host_done.clone()));
        let fb = ddi::feedback(
            Execution::Proceeding,
            Finished::None,
            Some((5, STEPS)),
            &lines,
        );
        outbox::commit(&self.inner.store, r, Some((Execution::Proceeding, fb))).await
    }

    /// Progress of the device rollouts; closes the action when all ended.
    pub(super) async fn follow_devices(&self, r: &mut ActionRec) -> Result<(), HawkbitError> {
        let Some(ro) = &self.inner.rollouts else {
            return Ok(());
        };
        let (mut ended, mut ok, mut lines) = (true, true, Vec::new());
        let mut failures = Vec::new();
        for c in &r.devices {
            let (sum, devs) = match ro.get(c.rollout.clone()).await {
                Ok(x) => x,
                Err(FirmwareError::NotFound { what }) => {
                    ok = false;
                    lines.push(format!("{what} is gone"));
                    continue;
                }
                Err(FirmwareError::Store(e)) => return Err(e.into()),
                Err(e) => {
                    log::warn!("hawkbit: reading rollout {}: {e}", c.rollout);
                    return Ok(());
                }
            };
            let state = sum.rollout.state;
            match state {
                State::Running | State::Paused => ended = false,
                State::Complete => {}
                State::Halted | State::Aborted => ok = false,
            }
            let done = devs
                .iter()
                .filter(|d| d.state == DevState::Complete)
                .count();
            let failed = devs.iter().filter(|d| d.state == DevState::Failed);
            failures.extend(failed.map(|d| format!("{}: {}", d.device, d.error)));
            // The engine's reason says why it ended (a threshold, an
            // abort, the count when complete); while it runs, the count.
            let how = match sum.rollout.reason.as_str() {
                "" => format!("{done} of {} devices updated", devs.len()),
                why => why.to_owned(),
            };
            lines.push(format!(
                "rollout {} of {} {}: {}: {how}",
                c.rollout,
                c.device_type,
                c.version,
                format!("{state:?}").to_lowercase(),
            ));
        }
        ok &= failures.is_empty();
        let summary = lines.join("; ");
        if !ended {
            if r.reported == summary {
                return Ok(());
            }
            r.reported = summary;
            let fb = ddi::feedback(
                Execution::Proceeding,
                Finished::None,
                Some((5, STEPS)),
                &lines,
            );
            return outbox::commit(&self.inner.store, r, Some((Execution::Proceeding, fb))).await;
        }
        // The failed devices first: the first line is the action's error.
        let mut details: Vec<String> = failures.into_iter().take(DETAIL_LINES).collect();
        details.extend(lines);
        details.extend((!r.host_done.is_empty()).then(|| r.host_done.clone()));
        let finished = if ok {
            Finished::Success
        } else {
            Finished::Failure
        };
        self.close(r, finished, details).await
    }
}
