//! The DDI client's one loop (module note in `hawkbit`): poll, follow the
//! coordinator (or the device rollouts), flush the feedback outbox, sleep
//! until the next deadline.
//! What happens to one action is in `action`.

use std::future::Future;
use std::pin::Pin;
use std::time::{Duration, Instant};

use serde_json::json;

use super::ddi::{self, DeploymentBase};
use super::outbox::{self, ActionRec, Phase};
use super::{Hawkbit, HawkbitError};
use crate::ota::State;

/// Progress steps reported as `cnt` of this.
pub(super) const STEPS: u32 = 6;
/// When the server names no (readable) sleep.
const DEFAULT_SLEEP: Duration = Duration::from_secs(300);
const MAX_SLEEP: Duration = Duration::from_secs(86_400);
const BACKOFF_MIN: Duration = Duration::from_secs(2);
const BACKOFF_MAX: Duration = Duration::from_secs(300);
/// Log lines of the coordinator sent with a `closed` feedback.
pub(super) const DETAIL_LINES: usize = 10;

pub(super) type Download = Pin<Box<dyn Future<Output = Result<(), HawkbitError>> + Send>>;

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
            // Device rollouts move on in the engine's ticks: while the
            // action waits on them, each tick is a reason to look.
            let ticked = match (&self.inner.rollouts, &rec) {
                (Some(ro), Some(r)) if r.phase == Phase::Devices => Some(ro.ticked()),
                _ => None,
            };
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
            let devices_started = self.inner.rollouts.is_some()
                && rec.as_ref().is_some_and(|r| r.phase == Phase::Devices);
            if ticked.is_none() && devices_started {
                // The rollouts just started: round again with a listener
                // on their ticks, or a device finishing before the next
                // poll would go unseen until then.
                continue;
            }
            let wake_at = match retry_send {
                Some(t) if pending > 0 => t.min(next_poll),
                _ => next_poll,
            };
            let sleep = async {
                let ticked = async {
                    match ticked {
                        Some(t) => t.await,
                        None => std::future::pending().await,
                    }
                };
                smol::future::or(smol::future::or(changed, ticked), async {
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
        // bundles against; SWUpdate-based servers read `hw_boardname` and
        // `hw_revision`, from /etc/hwrevision as SWUpdate does.
        let compatible = match self.inner.ota.bootloader().await {
            Ok(b) => b["compatible"].as_str().unwrap_or_default().to_owned(),
            Err(_) => String::new(),
        };
        let hwrevision = smol::fs::read_to_string(&self.inner.cfg.hwrevision_file)
            .await
            .unwrap_or_default();
        let mut hw = hwrevision.split_whitespace().map(str::to_owned);
        let (hw_board, hw_revision) = (hw.next(), hw.next());
        let mut attrs = json!({
            "node_id": self.inner.node_id,
            "hw_boardname": match (compatible.is_empty(), hw_board) {
                (false, _) => compatible,
                (true, Some(b)) => b,
                (true, None) => board.clone(),
            },
            "version": version,
            // What SWUpdate-based servers (gooseBit) read as the version.
            "sw_version": version,
            "booted_slot": st.booted_slot,
            "board": board,
            "konsul_edge": env!("CARGO_PKG_VERSION"),
        });
        if let Some(rev) = hw_revision {
            attrs["hw_revision"] = json!(rev);
        }
        attrs
    }
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
