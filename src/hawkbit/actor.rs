//! The DDI client's one loop (module note in `hawkbit`): poll, follow the
//! coordinator, flush the feedback outbox, sleep until the next deadline.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::time::{Duration, Instant};

use serde_json::json;

use super::ddi::{self, Chunk, DeploymentBase, Execution, Finished, Handling};
use super::outbox::{self, ActionRec, Phase};
use super::{Hawkbit, HawkbitError};
use crate::ota::bundle::Manifest;
use crate::ota::{External, State};

/// Progress steps reported as `cnt` of this.
const STEPS: u32 = 6;
/// When the server names no (readable) sleep.
const DEFAULT_SLEEP: Duration = Duration::from_secs(300);
const MAX_SLEEP: Duration = Duration::from_secs(86_400);
const BACKOFF_MIN: Duration = Duration::from_secs(2);
const BACKOFF_MAX: Duration = Duration::from_secs(300);
/// Log lines of the coordinator sent with a `closed` feedback.
const DETAIL_LINES: usize = 10;

type Download = Pin<Box<dyn Future<Output = Result<(), HawkbitError>> + Send>>;

/// Doubling backoff with jitter (0.5x to 1.5x), so a fleet that lost its
/// server at the same moment does not come back in step.
struct Backoff(Duration);

impl Backoff {
    fn next(&mut self) -> Duration {
        let d = self.0;
        self.0 = (self.0 * 2).min(BACKOFF_MAX);
        d.mul_f64(0.5 + fastrand::f64())
    }
    fn reset(&mut self) {
        self.0 = BACKOFF_MIN;
    }
}

fn part_path(work: &Path, action: &str) -> PathBuf {
    work.join(format!("hawkbit-{action}.part"))
}

fn manifest_part_path(work: &Path, action: &str) -> PathBuf {
    work.join(format!("hawkbit-{action}.manifest.part"))
}

fn action_ok(id: &str) -> bool {
    (1..=48).contains(&id.len())
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
}

impl Hawkbit {
    /// Runs until the process ends.
    pub async fn run(self) {
        let store = self.inner.store.clone();
        let mut rec = match outbox::load_action(&store).await {
            Ok(r) => r,
            Err(e) => {
                log::error!("hawkbit: cannot read its state: {e}; starting without");
                None
            }
        };
        let mut config_sent = outbox::load_state(&store, "config_data")
            .await
            .unwrap_or_default();
        let mut next_poll = Instant::now();
        let mut poll_backoff = Backoff(BACKOFF_MIN);
        let mut send_backoff = Backoff(BACKOFF_MIN);
        let mut retry_send: Option<Instant> = None;
        let mut download: Option<Download> = None;
        log::info!(
            "hawkbit: polling {} as {}",
            self.inner.server.base_url(),
            self.inner.controller_id
        );
        // The first configData should name the booted slot, which the
        // coordinator learns just after it starts (RAUC may answer late);
        // not for long, though: polling must not wait on a broken backend.
        let until = Instant::now() + Duration::from_secs(10);
        loop {
            let changed = self.inner.ota.changed();
            if !self.inner.ota.status().booted_slot.is_empty() || Instant::now() >= until {
                break;
            }
            smol::future::or(changed, async {
                async_io::Timer::at(until).await;
            })
            .await;
        }
        loop {
            let changed = self.inner.ota.changed();
            if let Some(r) = rec.as_mut() {
                if let Err(e) = self.follow(r).await {
                    log::error!("hawkbit: {e}");
                }
            }
            if retry_send.is_none_or(|t| t <= Instant::now()) {
                match self.flush().await {
                    Ok(()) => {
                        retry_send = None;
                        send_backoff.reset();
                    }
                    Err(e) => {
                        let wait = send_backoff.next();
                        log::warn!("hawkbit: feedback not delivered ({e}); again in {wait:?}");
                        retry_send = Some(Instant::now() + wait);
                    }
                }
            }
            if Instant::now() >= next_poll {
                let wait = match self.poll(&mut rec, &mut download, &mut config_sent).await {
                    Ok(sleep) => {
                        poll_backoff.reset();
                        self.update_status(|s| {
                            s.polls += 1;
                            s.last_poll_ms = crate::clock::wall_millis();
                            s.last_error.clear();
                        });
                        sleep
                    }
                    Err(e) => {
                        let wait = poll_backoff.next();
                        log::warn!("hawkbit: poll failed ({e}); again in {wait:?}");
                        self.update_status(|s| {
                            s.poll_errors += 1;
                            s.last_error = e.to_string();
                        });
                        wait
                    }
                };
                next_poll = Instant::now() + wait;
                self.update_status(|s| {
                    s.next_poll_ms = crate::clock::wall_millis() + wait.as_millis() as u64
                });
            }
            let pending = outbox::count(&store).await.unwrap_or(0);
            self.update_status(|s| {
                s.feedback_pending = pending;
                s.action = rec.as_ref().map(|r| r.id.clone()).unwrap_or_default();
                s.action_phase = rec
                    .as_ref()
                    .map(|r| format!("{:?}", r.phase).to_lowercase())
                    .unwrap_or_default();
            });
            let wake_at = match retry_send {
                Some(t) if pending > 0 => t.min(next_poll),
                _ => next_poll,
            };
            let sleep = async {
                smol::future::or(changed, async {
                    async_io::Timer::at(wake_at).await;
                })
                .await;
                None
            };
            let finished = match download.as_mut() {
                Some(d) => smol::future::or(async { Some(d.await) }, sleep).await,
                None => sleep.await,
            };
            if let Some(result) = finished {
                download = None;
                if let Some(r) = rec.as_mut() {
                    match self.downloaded(r, result).await {
                        // Hand over (or refuse) with the server's current
                        // `update` and window: poll now.
                        Ok(()) => next_poll = Instant::now(),
                        Err(e) => log::error!("hawkbit: {e}"),
                    }
                }
            }
        }
    }

    /// Sends queued feedback, oldest first, until the queue is empty or a
    /// send fails.
    async fn flush(&self) -> Result<(), HawkbitError> {
        let store = &self.inner.store;
        while let Some(p) = outbox::oldest(store).await? {
            let href = format!("{}/{}/feedback", self.inner.server.base_url(), p.action);
            let body: serde_json::Value = serde_json::from_str(&p.body).unwrap_or(json!({}));
            match self.inner.server.post(&href, &body).await {
                Ok(()) => {
                    log::info!(
                        "hawkbit: {} feedback for {} delivered",
                        p.execution,
                        p.action
                    );
                    self.update_status(|s| s.feedback_sent += 1);
                }
                Err(HawkbitError::Transport {
                    source: crate::sync::transport::TransportError::Status { status, .. },
                    ..
                }) if matches!(status, 404 | 410) => {
                    // The server no longer has that action (closed by an
                    // operator, deleted): nothing will ever accept it.
                    log::warn!(
                        "hawkbit: {} feedback for {} dropped: the server answered {status}",
                        p.execution,
                        p.action
                    );
                }
                Err(e) => return Err(e),
            }
            outbox::sent(store, p.seq).await?;
        }
        Ok(())
    }

    /// One poll of the controller base; returns how long to sleep.
    async fn poll(
        &self,
        rec: &mut Option<ActionRec>,
        download: &mut Option<Download>,
        config_sent: &mut String,
    ) -> Result<Duration, HawkbitError> {
        let server = &self.inner.server;
        let base: ddi::Base = server.get("").await?;
        let floor = self.inner.cfg.poll_floor.0;
        let mut sleep = ddi::parse_sleep(&base.config.polling.sleep)
            .unwrap_or(DEFAULT_SLEEP)
            .clamp(floor, MAX_SLEEP.max(floor));
        let attrs = self.attributes().await;
        let text = attrs.to_string();
        if base.links.config_data.is_some() || text != *config_sent {
            let href = base
                .links
                .config_data
                .as_ref()
                .map(|l| l.href.clone())
                .unwrap_or_else(|| format!("{}/configData", server.base_url()));
            server
                .put(&href, &json!({"mode": "merge", "data": attrs}))
                .await?;
            outbox::save_state(&self.inner.store, "config_data", text.clone()).await?;
            log::info!("hawkbit: configData sent: {text}");
            *config_sent = text;
            // The server's answer may differ now that it knows us.
            sleep = floor;
        }
        if let Some(link) = &base.links.cancel_action {
            let c: ddi::CancelAction = server.get(&link.href).await?;
            self.cancel(c, rec, download).await?;
        } else if let Some(link) = &base.links.deployment_base {
            let db: DeploymentBase = server.get(&link.href).await?;
            self.deploy(db, rec, download).await?;
        }
        Ok(sleep)
    }

    /// `configData` attributes: sent once, and again when one changes.
    async fn attributes(&self) -> serde_json::Value {
        let st = self.inner.ota.status();
        let d = &st.deployment;
        let version = if d.state == State::Committed && st.booted_slot == d.target_slot {
            d.version.clone()
        } else {
            os_version().await
        };
        let board = board().await;
        // RAUC's `compatible` is what a RAUC-aware server (gooseBit) matches
        // bundles against; SWUpdate-based servers read `hw_boardname`.
        let compatible = match self.inner.ota.bootloader().await {
            Ok(b) => b["compatible"].as_str().unwrap_or_default().to_owned(),
            Err(_) => String::new(),
        };
        json!({
            "node_id": self.inner.node_id,
            "hw_boardname": if compatible.is_empty() { board.clone() } else { compatible },
            "version": version,
            // What SWUpdate-based servers (gooseBit) read as the version.
            "sw_version": version,
            "booted_slot": st.booted_slot,
            "board": board,
            "konsul_edge": env!("CARGO_PKG_VERSION"),
        })
    }

    async fn deploy(
        &self,
        db: DeploymentBase,
        rec: &mut Option<ActionRec>,
        download: &mut Option<Download>,
    ) -> Result<(), HawkbitError> {
        let dep = &db.deployment;
        if let Some(r) = rec.as_mut().filter(|r| r.id == db.id) {
            match r.phase {
                Phase::Downloading if download.is_none() => {
                    if let Some((chunk, _)) = self.os_chunk(&db) {
                        *download = Some(self.start_download(&r.id, chunk));
                    }
                }
                Phase::Downloaded => self.hand_over(r, &db).await?,
                _ => {}
            }
            return Ok(());
        }
        if rec
            .as_ref()
            .is_some_and(|r| r.phase == Phase::Handed && r.id != db.id)
        {
            // The coordinator is still busy with the last action; its
            // outcome is reported first. The server offers this one again.
            return Ok(());
        }
        if dep.download == Handling::Skip {
            return Ok(());
        }
        if !action_ok(&db.id) {
            log::warn!(
                "hawkbit: action id `{}` refused: not a plain id",
                db.id.escape_debug()
            );
            return Ok(());
        }
        // A new action supersedes one not yet handed over.
        *download = None;
        let mut r = ActionRec {
            id: db.id.clone(),
            ..Default::default()
        };
        let chunk = match self.os_chunk(&db) {
            Some((c, None)) => c,
            Some((_, Some(why))) => {
                self.close(&mut r, Finished::Failure, vec![why]).await?;
                *rec = Some(r);
                return Ok(());
            }
            None => {
                let why = "no OS chunk with an artifact to install".to_owned();
                self.close(&mut r, Finished::Failure, vec![why]).await?;
                *rec = Some(r);
                return Ok(());
            }
        };
        r.version = chunk.version.clone();
        let fb = ddi::feedback(
            Execution::Proceeding,
            Finished::None,
            Some((1, STEPS)),
            &[format!("downloading {} {}", chunk.name, chunk.version)],
        );
        outbox::commit(&self.inner.store, &r, Some((Execution::Proceeding, fb)))
            .await
            .map(|()| log::info!("hawkbit: action {}: {} {}", r.id, chunk.name, chunk.version))?;
        *download = Some(self.start_download(&r.id, chunk));
        *rec = Some(r);
        Ok(())
    }

    /// The OS chunk, and why it cannot be installed (None: it can).
    fn os_chunk<'a>(&self, db: &'a DeploymentBase) -> Option<(&'a Chunk, Option<String>)> {
        let chunks = &db.deployment.chunks;
        let os = chunks.iter().find(|c| c.is_os())?;
        if let Some(other) = chunks.iter().find(|c| !c.is_os()) {
            return Some((
                os,
                Some(format!(
                    "chunk `{}` (part {}): only the OS chunk is supported",
                    other.name, other.part
                )),
            ));
        }
        let Some(image) = os
            .artifacts
            .iter()
            .find(|a| !a.filename.ends_with(".manifest"))
        else {
            return Some((os, Some("the OS chunk has no artifact".into())));
        };
        if image.href().is_none() {
            return Some((os, Some(format!("{}: no download link", image.filename))));
        }
        if image.hashes.sha256.is_none() && image.hashes.sha1.is_none() {
            return Some((
                os,
                Some(format!(
                    "{}: no sha256 or sha1 digest to check",
                    image.filename
                )),
            ));
        }
        Some((os, None))
    }

    /// Downloads the OS chunk's image (and its `.manifest`, if the chunk
    /// has one) into `*.part` files, then checks the image's digest.
    fn start_download(&self, action: &str, chunk: &Chunk) -> Download {
        let me = self.clone();
        let work = self.inner.ota.work_dir().to_path_buf();
        let action = action.to_owned();
        let chunk = chunk.clone();
        Box::pin(async move {
            let image = chunk
                .artifacts
                .iter()
                .find(|a| !a.filename.ends_with(".manifest"))
                .cloned()
                .unwrap_or_default();
            let href = image.href().unwrap_or_default().to_owned();
            let dest = part_path(&work, &action);
            let want = image.size;
            let from = smol::fs::metadata(&dest).await.map_or(0, |m| m.len());
            log::info!("hawkbit: action {action}: downloading {href} from byte {from} of {want}");
            let have = me
                .inner
                .server
                .download(&href, &dest, me.inner.bytes_per_sec, &|_| {})
                .await?;
            if want > 0 && have < want {
                return Err(HawkbitError::Server {
                    url: href,
                    detail: format!("{have} of {want} bytes; the next attempt resumes"),
                });
            }
            let manifest_name = format!("{}.manifest", image.filename);
            if let Some(m) = chunk.artifacts.iter().find(|a| a.filename == manifest_name) {
                let mdest = manifest_part_path(&work, &action);
                let _ = smol::fs::remove_file(&mdest).await;
                let mhref = m.href().unwrap_or_default().to_owned();
                me.inner.server.download(&mhref, &mdest, 0, &|_| {}).await?;
            }
            let (algo, hex) = match (&image.hashes.sha256, &image.hashes.sha1) {
                (Some(h), _) => (&ring::digest::SHA256, h.clone()),
                (None, Some(h)) => (&ring::digest::SHA1_FOR_LEGACY_USE_ONLY, h.clone()),
                (None, None) => unreachable_digest(),
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
                return Err(HawkbitError::Server {
                    url: href,
                    detail: format!(
                        "digest mismatch: the server gave {hex}, the file has {got}; refused before any slot write"
                    ),
                });
            }
            Ok(())
        })
    }

    /// A download ended: on success the action waits for its handover
    /// (`hand_over`, at the next poll); a bad digest closes it; other
    /// errors (the link, the server) are retried at the next poll.
    async fn downloaded(
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
            Err(e @ HawkbitError::Server { .. }) if e.to_string().contains("digest mismatch") => {
                self.close(r, Finished::Failure, vec![e.to_string()]).await
            }
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
        let work = self.inner.ota.work_dir().to_path_buf();
        let file = part_path(&work, &r.id);
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
            .and_then(|(c, _)| c.artifacts.first())
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
                let _ = smol::fs::remove_file(&file).await;
                let _ = smol::fs::remove_file(&mfile).await;
                let why = format!("refused before any slot write: {e}");
                self.close(r, Finished::Failure, vec![why]).await
            }
        }
    }

    /// Maps the coordinator's deployment to the handed action's feedback.
    async fn follow(&self, r: &mut ActionRec) -> Result<(), HawkbitError> {
        if r.phase != Phase::Handed {
            return Ok(());
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
            State::Committed if !st.booted_slot.is_empty() && st.booted_slot == d.target_slot => (
                Finished::Success,
                vec![format!(
                    "health gate passed: slot {} committed; running version {} on slot {}",
                    d.target_slot, d.version, st.booted_slot
                )],
            ),
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
    /// transaction as the record).
    async fn close(
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
        let work = self.inner.ota.work_dir().to_path_buf();
        let _ = smol::fs::remove_file(part_path(&work, &r.id)).await;
        let _ = smol::fs::remove_file(manifest_part_path(&work, &r.id)).await;
        Ok(())
    }

    /// `cancelAction`: honoured before the slot write, refused after.
    async fn cancel(
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
            // Nothing of it here (never started, or already over).
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
            Phase::Closed => Ok(()),
        };
        match honoured {
            Ok(()) => {
                r.phase = Phase::Closed;
                r.error = "cancelled by the server".into();
                let work = self.inner.ota.work_dir().to_path_buf();
                let _ = smol::fs::remove_file(part_path(&work, &r.id)).await;
                let _ = smol::fs::remove_file(manifest_part_path(&work, &r.id)).await;
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

fn unreachable_digest() -> (&'static ring::digest::Algorithm, String) {
    // `os_chunk` refuses an artifact without either digest before any
    // download starts; an empty digest never matches.
    (&ring::digest::SHA256, String::new())
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

/// `VERSION_ID` (else `VERSION`) of /etc/os-release.
async fn os_version() -> String {
    let text = smol::fs::read_to_string("/etc/os-release")
        .await
        .unwrap_or_default();
    let get = |k: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(k))
            .map(|v| v.trim_matches('"').to_owned())
    };
    get("VERSION_ID=")
        .or_else(|| get("VERSION="))
        .unwrap_or_default()
}

/// The device tree's model, else the DMI product name.
async fn board() -> String {
    for p in ["/proc/device-tree/model", "/sys/class/dmi/id/product_name"] {
        if let Ok(s) = smol::fs::read_to_string(p).await {
            let s = s.trim_matches(|c: char| c == '\0' || c.is_whitespace());
            if !s.is_empty() {
                return s.to_owned();
            }
        }
    }
    "unknown".into()
}
