//! One action's life on this node (module note in `hawkbit`): taking it
//! on, downloading and checking its chunks, handing the OS chunk to the
//! coordinator, following the deployment into feedback, and cancelling.
//! Device chunks' own steps are in `devices`.

use std::path::{Path, PathBuf};

use super::actor::{Download, DETAIL_LINES, STEPS};
use super::ddi::{self, Chunk, DeploymentBase, Execution, Finished, Handling};
use super::devices::DeviceChunk;
use super::outbox::{self, ActionRec, Phase};
use super::{Hawkbit, HawkbitError};
use crate::ota::bundle::Manifest;
use crate::ota::{External, State};

fn part_path(work: &Path, action: &str) -> PathBuf {
    work.join(format!("hawkbit-{action}.part"))
}

fn manifest_part_path(work: &Path, action: &str) -> PathBuf {
    work.join(format!("hawkbit-{action}.manifest.part"))
}

/// The image unpacked from a `.swu` download (`swu`).
fn image_path(work: &Path, action: &str) -> PathBuf {
    work.join(format!("hawkbit-{action}.img"))
}

fn action_ok(id: &str) -> bool {
    (1..=48).contains(&id.len())
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
}

impl Hawkbit {
    pub(super) async fn deploy(
        &self,
        db: DeploymentBase,
        rec: &mut Option<ActionRec>,
        download: &mut Option<Download>,
    ) -> Result<(), HawkbitError> {
        if let Some(r) = rec.as_mut().filter(|r| r.id == db.id) {
            // hawkBit never offers a closed action again; gooseBit does when
            // an operator forces a software that failed (its action id is
            // the software's): once our `closed` was acknowledged, a new
            // attempt. Before that, the server just has not heard yet.
            let again = r.phase == Phase::Closed
                && !outbox::pending_for(&self.inner.store, format!("deploymentBase/{}", r.id))
                    .await?;
            if again {
                log::info!(
                    "hawkbit: action {} offered again after it closed: a new attempt",
                    r.id
                );
                return self.begin(db, rec, download).await;
            }
            match r.phase {
                Phase::Downloading if download.is_none() => {
                    if let Ok(os) = self.os_chunk(&db) {
                        *download = Some(self.start_download(&r.id, os, r.devices.clone()));
                    }
                }
                Phase::Downloaded => self.hand_over(r, &db).await?,
                _ => {}
            }
            return Ok(());
        }
        if rec
            .as_ref()
            .is_some_and(|r| matches!(r.phase, Phase::Handed | Phase::Devices) && r.id != db.id)
        {
            // The coordinator or the device rollouts are still busy with
            // the last action; its outcome is reported first. The server
            // offers this one again.
            return Ok(());
        }
        self.begin(db, rec, download).await
    }

    /// Takes on a new action (or one offered again): its OS chunk is
    /// checked and its download starts, or it is refused with feedback.
    async fn begin(
        &self,
        db: DeploymentBase,
        rec: &mut Option<ActionRec>,
        download: &mut Option<Download>,
    ) -> Result<(), HawkbitError> {
        if db.deployment.download == Handling::Skip {
            return Ok(());
        }
        if !action_ok(&db.id) {
            log::warn!(
                "hawkbit: action id `{}` refused: not a plain id",
                db.id.escape_debug()
            );
            return Ok(());
        }
        // A new action supersedes one not yet handed over. The old one is
        // closed (the server would otherwise wait on it for ever) and its
        // partial files go (staging would keep their bytes).
        *download = None;
        if let Some(old) = rec
            .as_mut()
            .filter(|o| o.id != db.id && matches!(o.phase, Phase::Downloading | Phase::Downloaded))
        {
            let why = format!("superseded by action {} before it was installed", db.id);
            self.close(old, Finished::Failure, vec![why]).await?;
        }
        let mut r = ActionRec {
            id: db.id.clone(),
            ..Default::default()
        };
        let plan = self
            .os_chunk(&db)
            .and_then(|os| Ok((os, self.device_chunks(&db)?)))
            .and_then(|p| match p {
                (None, d) if d.is_empty() => Err("no OS chunk or device chunk to install".into()),
                p => Ok(p),
            });
        let (os, devices) = match plan {
            Ok(p) => p,
            Err(why) => {
                self.close(&mut r, Finished::Failure, vec![why]).await?;
                *rec = Some(r);
                return Ok(());
            }
        };
        let names: Vec<String> = os
            .iter()
            .map(|c| format!("{} {}", c.name, c.version))
            .chain(devices.iter().map(|c| format!("{} {}", c.name, c.version)))
            .collect();
        r.version = os.map_or_else(|| devices[0].version.clone(), |c| c.version.clone());
        r.host = os.is_some();
        r.devices = devices;
        let what = names.join(", ");
        let fb = ddi::feedback(
            Execution::Proceeding,
            Finished::None,
            Some((1, STEPS)),
            &[format!("downloading {what}")],
        );
        outbox::commit(&self.inner.store, &r, Some((Execution::Proceeding, fb)))
            .await
            .map(|()| log::info!("hawkbit: action {}: {what}", r.id))?;
        *download = Some(self.start_download(&r.id, os, r.devices.clone()));
        *rec = Some(r);
        Ok(())
    }

    /// The OS chunk (None: there is none), or why it cannot be installed.
    fn os_chunk<'a>(&self, db: &'a DeploymentBase) -> Result<Option<&'a Chunk>, String> {
        let Some(os) = db.deployment.chunks.iter().find(|c| c.is_os()) else {
            return Ok(None);
        };
        let Some(image) = os
            .artifacts
            .iter()
            .find(|a| !a.filename.ends_with(".manifest"))
        else {
            return Err("the OS chunk has no artifact".into());
        };
        if image.size > self.inner.staging_max {
            return Err(format!(
                "{}: {} bytes is larger than ota.staging_max_size ({} bytes); not downloaded",
                image.filename, image.size, self.inner.staging_max
            ));
        }
        if image.href().is_none() {
            return Err(format!("{}: no download link", image.filename));
        }
        if image.hashes.sha256.is_none() && image.hashes.sha1.is_none() {
            return Err(format!(
                "{}: no sha256 or sha1 digest to check",
                image.filename
            ));
        }
        Ok(Some(os))
    }

    /// Downloads and checks every chunk before anything is handed over:
    /// the device images first (`devices`: stored once verified, so a
    /// retry skips them), the OS image last (a `.swu` is unpacked and
    /// dropped at its end, and must not be fetched again for a retry of
    /// a device image).
    fn start_download(
        &self,
        action: &str,
        os: Option<&Chunk>,
        devices: Vec<DeviceChunk>,
    ) -> Download {
        let me = self.clone();
        let action = action.to_owned();
        let os = os.cloned();
        Box::pin(async move {
            me.fetch_devices(&devices).await?;
            match &os {
                Some(chunk) => me.download_os(&action, chunk).await,
                None => Ok(()),
            }
        })
    }

    /// Downloads the OS chunk's image (and its `.manifest`, if the chunk
    /// has one) into `*.part` files, then checks the image's digest.
    async fn download_os(&self, action: &str, chunk: &Chunk) -> Result<(), HawkbitError> {
        let work = self.inner.ota.work_dir().to_path_buf();
        let image = chunk
            .artifacts
            .iter()
            .find(|a| !a.filename.ends_with(".manifest"))
            .cloned()
            .unwrap_or_default();
        let href = image.href().unwrap_or_default().to_owned();
        let dest = part_path(&work, action);
        let want = image.size;
        let from = smol::fs::metadata(&dest).await.map_or(0, |m| m.len());
        log::info!("hawkbit: action {action}: downloading {href} from byte {from} of {want}");
        let have = self
            .inner
            .server
            .download(&href, &dest, self.inner.bytes_per_sec, &|_| {})
            .await?;
        if want > 0 && have < want {
            return Err(HawkbitError::Server {
                url: href,
                detail: format!("{have} of {want} bytes; the next attempt resumes"),
            });
        }
        let manifest_name = format!("{}.manifest", image.filename);
        if let Some(m) = chunk.artifacts.iter().find(|a| a.filename == manifest_name) {
            let mdest = manifest_part_path(&work, action);
            let _ = smol::fs::remove_file(&mdest).await;
            let mhref = m.href().unwrap_or_default().to_owned();
            self.inner
                .server
                .download(&mhref, &mdest, 0, &|_| {})
                .await?;
        }
        let (algo, hex) = match (&image.hashes.sha256, &image.hashes.sha1) {
            (Some(h), _) => (&ring::digest::SHA256, h.clone()),
            (None, Some(h)) => (&ring::digest::SHA1_FOR_LEGACY_USE_ONLY, h.clone()),
            // `os_chunk` refuses an artifact without either before any
            // download starts; an empty digest never matches.
            (None, None) => (&ring::digest::SHA256, String::new()),
        };
        let p = dest.clone();
        let got = smol::unblock(move || digest_file(&p, algo))
            .await
            .map_err(|source| HawkbitError::File {
                path: dest.clone(),
                source,
            })?;
        if !got.eq_ignore_ascii_case(hex.trim()) {
            let _ = smol::fs::remove_file(&dest).await;
            return Err(HawkbitError::Digest {
                url: href,
                want: hex,
                got,
            });
        }
        // Our image in a `.swu` (what SWUpdate-minded servers take): out
        // with it and its manifest, once, now that the digest holds. The
        // archive goes at once, so staging holds the image only once (a
        // restart before the action is marked downloaded fetches it again).
        let (img, mfile) = (image_path(&work, action), manifest_part_path(&work, action));
        // On the blocking pool: file I/O as large as the image.
        #[allow(clippy::disallowed_methods)]
        let unpacked = smol::unblock(move || {
            if !super::swu::is_swu(&dest) {
                return Ok(None);
            }
            let name = super::swu::unpack(&dest, &img, &mfile)?;
            let _ = std::fs::remove_file(&dest);
            Ok::<_, std::io::Error>(Some(name))
        })
        .await;
        match unpacked {
            Ok(Some(name)) => {
                log::info!(
                    "hawkbit: action {action}: {name} and its manifest unpacked from the .swu"
                );
                Ok(())
            }
            Ok(None) => Ok(()),
            Err(e) => Err(HawkbitError::Package {
                url: href,
                detail: format!("the .swu: {e}"),
            }),
        }
    }

    /// A download ended: on success the action waits for its handover
    /// (`hand_over`, at the next poll); a bad digest, `.swu` or device
    /// image closes it; other errors (the link, the server) are retried
    /// at the next poll.
    pub(super) async fn downloaded(
        &self,
        r: &mut ActionRec,
        result: Result<(), HawkbitError>,
    ) -> Result<(), HawkbitError> {
        match result {
            Ok(()) => {
                r.phase = Phase::Downloaded;
                let fb = ddi::feedback(
                    Execution::Proceeding,
                    Finished::None,
                    Some((2, STEPS)),
                    &["downloaded; digest checked".into()],
                );
                outbox::commit(&self.inner.store, r, Some((Execution::Proceeding, fb))).await
            }
            Err(
                e @ (HawkbitError::Digest { .. }
                | HawkbitError::Package { .. }
                | HawkbitError::Firmware { .. }),
            ) => self.close(r, Finished::Failure, vec![e.to_string()]).await,
            Err(e) => {
                log::warn!(
                    "hawkbit: download of action {}: {e}; resumes at the next poll",
                    r.id
                );
                Ok(())
            }
        }
    }

    /// Gives a downloaded action to the coordinator when the server's
    /// `update` and maintenance window allow it.
    async fn hand_over(&self, r: &mut ActionRec, db: &DeploymentBase) -> Result<(), HawkbitError> {
        let dep = &db.deployment;
        if dep.update == Handling::Skip {
            return Ok(());
        }
        if dep.update != Handling::Forced
            && dep
                .maintenance_window
                .as_deref()
                .is_some_and(|w| w.eq_ignore_ascii_case("unavailable"))
        {
            return Ok(());
        }
        if !r.host {
            return self.start_devices(r).await;
        }
        let work = self.inner.ota.work_dir().to_path_buf();
        let part = part_path(&work, &r.id);
        let unpacked = image_path(&work, &r.id);
        let file = match smol::fs::metadata(&unpacked).await {
            Ok(_) => unpacked,
            Err(_) => part.clone(),
        };
        let mfile = manifest_part_path(&work, &r.id);
        let manifest = match smol::fs::read_to_string(&mfile).await {
            Ok(text) => match serde_json::from_str::<Manifest>(&text)
                .map_err(|e| e.to_string())
                .and_then(|m| m.checked())
            {
                Ok(m) => Some(m),
                Err(e) => {
                    let why = format!("the image's manifest is unreadable: {e}");
                    return self.close(r, Finished::Failure, vec![why]).await;
                }
            },
            Err(_) => None,
        };
        let href = self
            .os_chunk(db)
            .ok()
            .flatten()
            .and_then(|c| c.artifacts.first())
            .and_then(|a| a.href())
            .unwrap_or_default()
            .to_owned();
        let ext = External {
            id: format!("hawkbit-{}", r.id),
            origin: format!("hawkbit:{}", r.id),
            version: r.version.clone(),
            source: href,
            manifest,
            maintenance_window: None,
        };
        match self.inner.ota.start_external(ext, &file).await {
            Ok(()) => {
                let _ = smol::fs::remove_file(&mfile).await;
                let _ = smol::fs::remove_file(&part).await;
                r.phase = Phase::Handed;
                r.reported = State::Verifying.as_str().into();
                let fb = ddi::feedback(
                    Execution::Proceeding,
                    Finished::None,
                    Some((3, STEPS)),
                    &["handed to the A/B coordinator: verifying".into()],
                );
                outbox::commit(&self.inner.store, r, Some((Execution::Proceeding, fb))).await
            }
            Err(crate::ota::OtaError::Busy(state)) => {
                log::info!("hawkbit: action {} waits: the coordinator is {state}", r.id);
                Ok(())
            }
            Err(e) => {
                let why = format!("refused before any slot write: {e}");
                self.close(r, Finished::Failure, vec![why]).await
            }
        }
    }

    /// Maps the coordinator's deployment to the handed action's feedback.
    pub(super) async fn follow(&self, r: &mut ActionRec) -> Result<(), HawkbitError> {
        match r.phase {
            Phase::Handed => {}
            Phase::Devices => return self.follow_devices(r).await,
            _ => return Ok(()),
        }
        let st = self.inner.ota.status();
        let d = &st.deployment;
        let origin = format!("hawkbit:{}", r.id);
        if d.external != origin {
            let why = format!(
                "superseded on the node by deployment {} ({})",
                d.id,
                d.state.as_str()
            );
            return self.close(r, Finished::Failure, vec![why]).await;
        }
        let (finished, mut details) = match d.state {
            State::Committed if !st.booted_slot.is_empty() && st.booted_slot == d.target_slot => {
                let done = format!(
                    "health gate passed: slot {} committed; running version {} on slot {}",
                    d.target_slot, d.version, st.booted_slot
                );
                if !r.devices.is_empty() {
                    r.host_done = done;
                    return self.start_devices(r).await;
                }
                (Finished::Success, vec![done])
            }
            State::Failed | State::RolledBack => (
                Finished::Failure,
                vec![format!("{}: {}", d.state.as_str(), d.last_error)],
            ),
            s => {
                if r.reported == s.as_str() || s == State::Committed {
                    return Ok(());
                }
                let cnt = match s {
                    State::Verifying | State::Downloading | State::Idle => 3,
                    State::Installing => 4,
                    State::PendingReboot => 5,
                    _ => STEPS,
                };
                r.reported = s.as_str().into();
                let fb = ddi::feedback(
                    Execution::Proceeding,
                    Finished::None,
                    Some((cnt, STEPS)),
                    &[format!("{}: {}", s.as_str(), st.phase)],
                );
                return outbox::commit(&self.inner.store, r, Some((Execution::Proceeding, fb)))
                    .await;
            }
        };
        if let Ok(log) = self.inner.ota.log(DETAIL_LINES).await {
            details.extend(log.iter().map(|l| {
                format!(
                    "{} {}",
                    l["state"].as_str().unwrap_or(""),
                    l["message"].as_str().unwrap_or("")
                )
            }));
        }
        self.close(r, finished, details).await
    }

    /// Ends the action with `closed` feedback (queued in the same
    /// transaction as the record), and removes its partial files.
    pub(super) async fn close(
        &self,
        r: &mut ActionRec,
        finished: Finished,
        details: Vec<String>,
    ) -> Result<(), HawkbitError> {
        r.phase = Phase::Closed;
        if finished == Finished::Failure {
            r.error = details.first().cloned().unwrap_or_default();
            log::warn!("hawkbit: action {} failed: {}", r.id, r.error);
        } else {
            log::info!("hawkbit: action {} succeeded", r.id);
        }
        let fb = ddi::feedback(Execution::Closed, finished, None, &details);
        outbox::commit(&self.inner.store, r, Some((Execution::Closed, fb))).await?;
        self.remove_parts(r).await;
        Ok(())
    }

    /// The action's partial downloads: the OS image, its manifest, and the
    /// device images (staging and the artifact quota keep their bytes).
    async fn remove_parts(&self, r: &ActionRec) {
        let work = self.inner.ota.work_dir().to_path_buf();
        let _ = smol::fs::remove_file(part_path(&work, &r.id)).await;
        let _ = smol::fs::remove_file(manifest_part_path(&work, &r.id)).await;
        let _ = smol::fs::remove_file(image_path(&work, &r.id)).await;
        if let Some(ro) = &self.inner.rollouts {
            let dir = &ro.artifacts().settings().dir;
            for c in &r.devices {
                let _ = smol::fs::remove_file(c.part_path(dir)).await;
            }
        }
    }

    /// `cancelAction`: honoured before the slot write, refused after.
    pub(super) async fn cancel(
        &self,
        c: ddi::CancelAction,
        rec: &mut Option<ActionRec>,
        download: &mut Option<Download>,
    ) -> Result<(), HawkbitError> {
        let stop = c.cancel_action.stop_id.clone();
        let path = format!("cancelAction/{}", c.id);
        let confirm = |details: &str| {
            ddi::feedback(
                Execution::Canceled,
                Finished::Success,
                None,
                &[details.to_owned()],
            )
        };
        let Some(r) = rec
            .as_mut()
            .filter(|r| r.id == stop && r.phase != Phase::Closed)
        else {
            // Nothing of it here (never started, or already over). One
            // answer per cancel waits in the outbox however often the
            // server asks again: one that refuses feedback meanwhile would
            // otherwise grow it by a row a poll.
            if outbox::pending_for(&self.inner.store, path.clone()).await? {
                return Ok(());
            }
            let fb = confirm("nothing in progress for that action");
            return outbox::queue(&self.inner.store, path, Execution::Canceled, fb).await;
        };
        if r.error == format!("cancel {} refused", c.id) {
            return Ok(());
        }
        let honoured = match r.phase {
            Phase::Downloading | Phase::Downloaded => {
                *download = None;
                Ok(())
            }
            Phase::Handed => self
                .inner
                .ota
                .cancel_external(&format!("hawkbit:{}", r.id))
                .await
                .map_err(|e| e.to_string()),
            Phase::Devices => Err("the device firmware rollouts have begun".to_owned()),
            Phase::Closed => Ok(()),
        };
        match honoured {
            Ok(()) => {
                r.phase = Phase::Closed;
                r.error = "cancelled by the server".into();
                self.remove_parts(r).await;
                outbox::commit(&self.inner.store, r, None).await?;
                log::info!("hawkbit: action {} cancelled by the server", r.id);
                outbox::queue(
                    &self.inner.store,
                    path,
                    Execution::Canceled,
                    confirm("cancelled before the slot write"),
                )
                .await
            }
            Err(why) => {
                r.error = format!("cancel {} refused", c.id);
                outbox::commit(&self.inner.store, r, None).await?;
                log::info!("hawkbit: cancel of action {} refused: {why}", r.id);
                let fb = ddi::feedback(
                    Execution::Rejected,
                    Finished::None,
                    None,
                    &[format!("cannot cancel: {why}")],
                );
                outbox::queue(&self.inner.store, path, Execution::Rejected, fb).await
            }
        }
    }
}

/// The file's digest as lower-case hex.
// Runs on the blocking pool (`start_download`), never on the executor.
#[allow(clippy::disallowed_methods)]
fn digest_file(path: &Path, algo: &'static ring::digest::Algorithm) -> std::io::Result<String> {
    use std::io::Read;
    let mut f = std::fs::File::open(path)?;
    let mut ctx = ring::digest::Context::new(algo);
    let mut buf = vec![0u8; 64 << 10];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        ctx.update(&buf[..n]);
    }
    Ok(crate::ota::bundle::to_hex(ctx.finish().as_ref()))
}
