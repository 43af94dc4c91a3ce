//! Ingest: messages from the client's reader are taken in batches (what
//! is queued, up to [`MAX_BATCH`]), parsed, and applied in one store
//! transaction. Once that transaction committed, the batch's QoS 1/2
//! messages are acknowledged to the broker (PUBACK/PUBREC through
//! [`Link::ack`]) and device acks and errors are queued on the outbox
//! ([`super::outbox`]). A message refused (malformed, or the store failed
//! and the device was told to try again) is acknowledged too: the answer
//! is final, a redelivery would be refused the same way.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use serde_json::json;
use smol::future::FutureExt;

use super::client::{Incoming, Link, Message};
use super::outbox::Outbox;
use super::payload::{self, Inbound, PayloadError, Reason};
use super::rejections::{LogBudget, Verdict, LINES_PER_WINDOW, WINDOW};
use crate::devices::redelivery::Seen;
use crate::devices::{ack_json, Devices, Outcome};
use crate::firmware::rollout::Rollouts;
use crate::metrics::{Metrics, Published};
use crate::support::Shutdown;

/// Logs under the bridge's name, as before ingest had a module of its own:
/// journal filters and alerts match on it.
const LOG_TARGET: &str = "konsul_edge::mqtt::bridge";

/// Messages applied per store transaction at most.
pub const MAX_BATCH: usize = 1024;

pub(super) struct Ingest {
    pub(super) outbox: Outbox,
    pub(super) link: Arc<Link>,
    pub(super) gate: Arc<super::gate::ByteGate>,
    pub(super) devices: Devices,
    pub(super) metrics: Arc<Metrics>,
    pub(super) max_payload: usize,
    pub(super) budget: LogBudget,
    pub(super) rollouts: Option<Rollouts>,
}

impl Ingest {
    pub(super) async fn run(mut self, messages: async_channel::Receiver<Incoming>, stop: Shutdown) {
        loop {
            let summary = self.budget.summary_due();
            let first = async { messages.recv().await.ok().map(Some) }
                .or(async {
                    stop.wait().await;
                    None
                })
                .or(async {
                    match summary {
                        Some(at) => async_io::Timer::at(at).await,
                        None => std::future::pending().await,
                    };
                    Some(None)
                })
                .await;
            let first = match first {
                None => break,
                Some(None) => {
                    self.log_summary();
                    continue;
                }
                Some(Some(m)) => m,
            };
            let mut batch = vec![first];
            while batch.len() < MAX_BATCH {
                match messages.try_recv() {
                    Ok(m) => batch.push(m),
                    Err(_) => break,
                }
            }
            self.process(batch).await;
        }
        // Disconnected: apply what was received before the disconnect.
        // Their acks find no connection: the broker re-sends them, and
        // the store takes a repeat as a repeat.
        let mut rest: Vec<Incoming> = std::iter::from_fn(|| messages.try_recv().ok()).collect();
        while !rest.is_empty() {
            let tail = rest.split_off(rest.len().min(MAX_BATCH));
            self.process(std::mem::replace(&mut rest, tail)).await;
        }
        // Stopping: account for the window so far.
        self.log_summary_at(Instant::now() + WINDOW);
    }

    /// The line that accounts for suppressed rejection lines, once their
    /// window has ended.
    fn log_summary(&mut self) {
        self.log_summary_at(Instant::now());
    }

    fn log_summary_at(&mut self, now: Instant) {
        if let Some(n) = self.budget.summary(now) {
            log::warn!(
                target: LOG_TARGET,
                "{n} more MQTT rejections in the last {}s were not logged (at most {LINES_PER_WINDOW} \
                 lines a window, one per device); /metrics counts them all by reason",
                WINDOW.as_secs()
            );
        }
    }

    async fn process(&mut self, batch: Vec<Incoming>) {
        self.apply(&batch).await;
        // Committed (or refused for good): now the broker may forget them.
        let acks: Vec<_> = batch.iter().filter_map(|m| m.ack).collect();
        self.link.ack(&acks).await;
        self.gate.release(batch.iter().map(|m| m.held).sum());
        self.metrics.mqtt.ingest_queued(self.gate.used());
    }

    async fn apply(&mut self, batch: &[Incoming]) {
        let mut parsed = Vec::with_capacity(batch.len());
        let mut reports = Vec::new();
        for m in batch {
            let topic = &m.topic;
            self.metrics.mqtt.received(topic);
            match payload::parse(topic, &m.payload, self.max_payload) {
                Ok(Inbound::Ignored) => {}
                Ok(Inbound::UpdateStatus { device, report }) => reports.push((device, report)),
                Ok(inbound) => parsed.push((inbound, digest(m))),
                Err(e) => self.reject_payload(&e),
            }
        }
        if let Some(r) = &self.rollouts {
            if !reports.is_empty() {
                if let Err(e) = r.report(reports).await {
                    log::warn!(target: LOG_TARGET, "firmware status reports not recorded: {e}");
                }
            }
        }
        // A device seen again may be owed an offer, or may report the new
        // version: the engine looks once this batch is committed.
        let seen = parsed.iter().any(|(m, _)| {
            matches!(
                m,
                Inbound::Register { .. } | Inbound::Heartbeat { .. } | Inbound::Status { .. }
            )
        });
        if parsed.is_empty() {
            return;
        }
        self.metrics.mqtt.batches.fetch_add(1, Ordering::Relaxed);
        let count = parsed.len();
        let first_device = parsed[0].0.device().unwrap_or_default().to_owned();
        let outcomes = match self.devices.apply_seen(parsed).await {
            Ok(o) => o,
            Err(e) if count > 1 => {
                log::warn!(target: LOG_TARGET, "a batch of {count} messages failed ({e}); applying them one by one");
                // Parsed again rather than cloned up front: this path is
                // rare, the clone was paid on every batch. Rejections were
                // already reported on the first pass.
                let again = batch.iter().filter_map(|m| {
                    match payload::parse(&m.topic, &m.payload, self.max_payload) {
                        Ok(Inbound::Ignored | Inbound::UpdateStatus { .. }) | Err(_) => None,
                        Ok(inbound) => Some((inbound, digest(m))),
                    }
                });
                let mut out = Vec::with_capacity(count);
                for m in again.collect::<Vec<_>>() {
                    let device = m.0.device().unwrap_or_default().to_owned();
                    out.push(match self.devices.apply_seen(vec![m]).await {
                        Ok(mut o) => o.pop().unwrap_or(Outcome::Ignored),
                        Err(e) => store_rejection(device, &e),
                    });
                }
                out
            }
            Err(e) => vec![store_rejection(first_device, &e)],
        };
        for o in outcomes {
            match o {
                Outcome::Registered {
                    device,
                    modify_index,
                    created,
                } => {
                    if created {
                        log::info!(target: LOG_TARGET, "device {device} registered (index {modify_index})");
                    }
                    self.outbox.reply(
                        Published::Ack,
                        Message::new(
                            format!("devices/{device}/ack"),
                            ack_json(&device, modify_index, created),
                        ),
                    );
                }
                Outcome::Rejected {
                    device,
                    reason,
                    message,
                } => self.reject(Some(&device), reason, &message, None),
                Outcome::Stored | Outcome::Ignored => {}
            }
        }
        if let (true, Some(r)) = (seen, &self.rollouts) {
            r.wake();
        }
    }

    fn reject_payload(&mut self, e: &PayloadError) {
        let topic = match e {
            PayloadError::TooLarge { topic, .. }
            | PayloadError::MalformedJson { topic, .. }
            | PayloadError::WrongType { topic, .. }
            | PayloadError::IdMismatch { topic, .. }
            | PayloadError::UnknownTopic { topic, .. }
            | PayloadError::InvalidId { topic, .. }
            | PayloadError::Invalid { topic, .. } => topic.clone(),
        };
        self.reject(e.device(), e.reason(), &e.to_string(), Some(&topic));
    }

    /// Counts, explains on `devices/{id}/error`, and logs within the
    /// budget ([`super::rejections`]).
    fn reject(&mut self, device: Option<&str>, reason: Reason, message: &str, topic: Option<&str>) {
        self.metrics.mqtt.rejected(reason);
        let now = Instant::now();
        self.log_summary();
        match self.budget.admit(device.unwrap_or(""), now) {
            Verdict::Log => log::warn!(
                target: LOG_TARGET,
                "rejected ({}): {} (further rejections for this device are not logged for {}s)",
                reason.as_str(),
                message,
                WINDOW.as_secs()
            ),
            Verdict::Suppress => {
                self.metrics
                    .mqtt
                    .log_lines_suppressed
                    .fetch_add(1, Ordering::Relaxed);
            }
        }
        if let Some(d) = device {
            let body = json!({
                "error": reason.as_str(),
                "message": message,
                "topic": topic,
            });
            self.outbox.reply(
                Published::Error,
                Message::new(format!("devices/{d}/error"), body.to_string()),
            );
        }
    }
}

/// Telemetry and events at QoS 1/2 may be redelivered and are not
/// idempotent: they carry a digest ([`crate::devices::redelivery`]).
fn digest(m: &Incoming) -> Option<Seen> {
    let appended = m.topic.ends_with("/telemetry") || m.topic.ends_with("/events");
    (appended && m.ack.is_some()).then(|| Seen::of(&m.topic, &m.payload, m.dup))
}

fn store_rejection(device: String, e: &crate::store::StoreError) -> Outcome {
    Outcome::Rejected {
        device,
        reason: Reason::Store,
        message: format!("not stored, try again later: {e}"),
    }
}
