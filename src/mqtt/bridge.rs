//! The paho side of the bridge (cargo feature `mqtt`): the client, its
//! callbacks, the connection loop and ingest. See the module docs of
//! [`crate::mqtt`] for the design.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use paho_mqtt as paho;
use serde_json::json;
use smol::future::FutureExt;

use super::payload::{self, Inbound, PayloadError, Reason};
use super::{paho_uri, MqttError, Settings};
use crate::devices::{ack_json, Alert, Devices, Outcome};
use crate::firmware::rollout::{Offer, Rollouts};
use crate::metrics::{Metrics, Published};
use crate::support::Shutdown;

/// Messages applied per store transaction at most.
pub const MAX_BATCH: usize = 1024;
/// Messages paho may hand us before its thread waits for ingest.
const QUEUE: usize = 2048;
const BACKOFF_MIN: Duration = Duration::from_millis(500);
const BACKOFF_MAX: Duration = Duration::from_secs(60);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
const KEEP_ALIVE: Duration = Duration::from_secs(30);
/// Bad input from one device is logged at most this often.
const LOG_EVERY: Duration = Duration::from_secs(60);
/// How long shutdown waits for the offline status and the disconnect.
const GOODBYE: Duration = Duration::from_secs(2);

pub struct Bridge {
    client: paho::AsyncClient,
    settings: Settings,
    connect: paho::ConnectOptions,
    devices: Devices,
    metrics: Arc<Metrics>,
    messages: async_channel::Receiver<paho::Message>,
    lost: async_channel::Receiver<()>,
    alerts: async_channel::Receiver<Alert>,
    /// The rollout engine (status reports in, offers out).
    rollouts: Option<(Rollouts, async_channel::Receiver<Offer>)>,
}

impl Bridge {
    /// Creates the client and its callbacks; nothing connects until
    /// [`run`](Self::run).
    pub fn new(
        settings: Settings,
        devices: Devices,
        metrics: Arc<Metrics>,
        alerts: async_channel::Receiver<Alert>,
        rollouts: Option<(Rollouts, async_channel::Receiver<Offer>)>,
    ) -> Result<Bridge, MqttError> {
        let (uri, tls) = paho_uri(&settings.url);
        if tls && !cfg!(feature = "mqtt-tls") {
            return Err(MqttError::NoTls {
                url: settings.url.clone(),
            });
        }
        let client = paho::CreateOptionsBuilder::new()
            .server_uri(&uri)
            .client_id(&settings.client_id)
            // Sessions live on the broker; paho's file persistence would
            // write into the working directory, which the unit keeps
            // read-only.
            .persistence(paho::PersistenceType::None)
            // Acks and alerts published during a short disconnect go out on
            // reconnect instead of failing.
            .send_while_disconnected(true)
            .max_buffered_messages(1000)
            .delete_oldest_messages(true)
            .create_client()
            .map_err(|e| MqttError::Client {
                url: settings.url.clone(),
                message: e.to_string(),
            })?;
        let mut opts = paho::ConnectOptionsBuilder::new_v3();
        opts.clean_session(false)
            .keep_alive_interval(KEEP_ALIVE)
            .connect_timeout(CONNECT_TIMEOUT)
            .will_message(status_message(&settings, false));
        if let Some(u) = &settings.username {
            opts.user_name(u);
        }
        if let Some(p) = &settings.password {
            opts.password(p.as_str());
        }
        if tls {
            let mut ssl = paho::SslOptionsBuilder::new();
            if let Some(ca) = &settings.ca_file {
                ssl.trust_store(ca).map_err(|e| MqttError::CaFile {
                    path: ca.clone(),
                    message: e.to_string(),
                })?;
            }
            opts.ssl_options(ssl.finalize());
        }
        let (msg_tx, messages) = async_channel::bounded(QUEUE);
        client.set_message_callback(move |_, msg| {
            if let Some(m) = msg {
                // Blocks paho's receive thread while ingest is behind: the
                // back-pressure described above. Err: we are shutting down.
                let _ = msg_tx.send_blocking(m);
            }
        });
        let (lost_tx, lost) = async_channel::bounded(1);
        client.set_connection_lost_callback(move |_| {
            let _ = lost_tx.try_send(());
        });
        Ok(Bridge {
            client,
            settings,
            connect: opts.finalize(),
            devices,
            metrics,
            messages,
            lost,
            alerts,
            rollouts,
        })
    }

    /// Runs until `shutdown`: keeps the connection, ingests, publishes
    /// alerts. On shutdown it says goodbye (offline status, disconnect) and
    /// applies every message it had already received.
    pub async fn run(self, shutdown: Shutdown) {
        let stop_ingest = Shutdown::default();
        let ingest = Ingest {
            client: self.client.clone(),
            devices: self.devices.clone(),
            metrics: self.metrics.clone(),
            max_payload: self.settings.max_payload,
            logged: HashMap::new(),
            rollouts: self.rollouts.as_ref().map(|(r, _)| r.clone()),
        };
        let connection = async {
            self.connection(&shutdown).await;
            // Disconnected: nothing new arrives; let ingest drain.
            stop_ingest.trigger();
        };
        let alerts = async {
            loop {
                let next = async { self.alerts.recv().await.ok() }
                    .or(async {
                        shutdown.wait().await;
                        None
                    })
                    .await;
                let Some(a) = next else { return };
                let body = serde_json::to_vec(&a).unwrap_or_default();
                publish(
                    &self.client,
                    &self.metrics,
                    Published::Alert,
                    paho::Message::new(format!("alerts/{}", a.device_id), body, 1),
                );
            }
        };
        let offers = async {
            let Some((_, offers)) = &self.rollouts else {
                return;
            };
            loop {
                let next = async { offers.recv().await.ok() }
                    .or(async {
                        shutdown.wait().await;
                        None
                    })
                    .await;
                let Some(o) = next else { return };
                publish(
                    &self.client,
                    &self.metrics,
                    Published::Offer,
                    paho::Message::new(o.topic, o.payload, 1),
                );
            }
        };
        smol::future::zip(
            smol::future::zip(connection, smol::future::zip(alerts, offers)),
            ingest.run(self.messages.clone(), stop_ingest.clone()),
        )
        .await;
    }

    async fn connection(&self, shutdown: &Shutdown) {
        let mut attempt: u32 = 0;
        let topics = self.settings.topics.clone();
        let qos = vec![self.settings.qos; topics.len()];
        log::info!(
            "connecting to {} as {}",
            self.settings.url,
            self.settings.client_id
        );
        loop {
            while self.lost.try_recv().is_ok() {}
            // Paho enforces CONNECT_TIMEOUT itself; the outer bound is a
            // guard against a token that never completes, which would
            // otherwise leave the bridge waiting forever.
            let connected = async { Some(Some(self.client.connect(self.connect.clone()).await)) }
                .or(async {
                    async_io::Timer::after(CONNECT_TIMEOUT * 2).await;
                    Some(None)
                })
                .or(async {
                    shutdown.wait().await;
                    None
                })
                .await;
            let result = match connected {
                None => return,
                Some(Some(r)) => r,
                Some(None) => {
                    log::warn!(
                        "connecting to {} did not finish within {:?}; retrying",
                        self.settings.url,
                        CONNECT_TIMEOUT * 2
                    );
                    // Abandon the attempt; the token is not awaited (it may never end).
                    drop(self.client.disconnect(None));
                    if !self.backoff(&mut attempt, shutdown).await {
                        return;
                    }
                    continue;
                }
            };
            match result {
                Ok(rsp) => {
                    let session = rsp.connect_response().is_some_and(|c| c.session_present);
                    let subscribed =
                        async { Some(self.client.subscribe_many(&topics, &qos).await) }
                            .or(async {
                                async_io::Timer::after(CONNECT_TIMEOUT).await;
                                None
                            })
                            .await
                            .unwrap_or(Err(paho::Error::General("subscribe timed out")));
                    match subscribed {
                        Ok(rsp) => {
                            let granted = rsp.subscribe_many_response().unwrap_or_default();
                            if granted.iter().any(|q| *q >= 0x80) {
                                log::warn!(
                                    "the broker refused some subscriptions ({topics:?} -> {granted:?})"
                                );
                            }
                        }
                        Err(e) => {
                            log::warn!("subscribe failed: {e}; reconnecting");
                            let _ = self.client.disconnect(None).await;
                            self.backoff(&mut attempt, shutdown).await;
                            continue;
                        }
                    }
                    publish(
                        &self.client,
                        &self.metrics,
                        Published::Status,
                        status_message(&self.settings, true),
                    );
                    self.metrics.mqtt.connected.store(1, Ordering::Relaxed);
                    self.metrics.mqtt.connects.fetch_add(1, Ordering::Relaxed);
                    log::info!(
                        "connected to {} as {} (session present: {session}), subscribed to {} at QoS {}",
                        self.settings.url,
                        self.settings.client_id,
                        topics.join(", "),
                        self.settings.qos
                    );
                    attempt = 0;
                    let lost = async {
                        let _ = self.lost.recv().await;
                        true
                    }
                    .or(async {
                        shutdown.wait().await;
                        false
                    })
                    .await;
                    self.metrics.mqtt.connected.store(0, Ordering::Relaxed);
                    if !lost {
                        self.goodbye().await;
                        return;
                    }
                    log::warn!("connection to {} lost; reconnecting", self.settings.url);
                }
                Err(e) => {
                    // Every failure while the broker is away would flood the
                    // log: say it on the first attempts, then every 10th.
                    if attempt < 3 || attempt.is_multiple_of(10) {
                        log::warn!(
                            "cannot connect to {} (attempt {}): {e}",
                            self.settings.url,
                            attempt + 1
                        );
                    }
                }
            }
            if !self.backoff(&mut attempt, shutdown).await {
                return;
            }
        }
    }

    /// Sleeps the next backoff step; false if shutdown came first.
    async fn backoff(&self, attempt: &mut u32, shutdown: &Shutdown) -> bool {
        let delay = backoff_delay(*attempt, fastrand::f64());
        *attempt = attempt.saturating_add(1);
        async {
            async_io::Timer::after(delay).await;
            true
        }
        .or(async {
            shutdown.wait().await;
            false
        })
        .await
    }

    /// Clean shutdown: a clean disconnect fires no will, so the offline
    /// status is published by hand first.
    async fn goodbye(&self) {
        let sent = async {
            let _ = self
                .client
                .publish(status_message(&self.settings, false))
                .await;
        };
        sent.or(async {
            async_io::Timer::after(GOODBYE).await;
        })
        .await;
        let opts = paho::DisconnectOptionsBuilder::new()
            .timeout(GOODBYE)
            .finalize();
        let done = async {
            let _ = self.client.disconnect(opts).await;
        };
        done.or(async {
            async_io::Timer::after(GOODBYE * 2).await;
        })
        .await;
        log::info!("disconnected from {}", self.settings.url);
    }
}

fn status_message(s: &Settings, online: bool) -> paho::Message {
    paho::Message::new_retained(s.status_topic(), s.status_json(online), 1)
}

/// `attempt` 0 -> 0.5 s, doubling to 60 s; `jitter` in [0, 1) picks a
/// point in the upper half, so retries spread out but still back off.
pub fn backoff_delay(attempt: u32, jitter: f64) -> Duration {
    let base = BACKOFF_MIN
        .saturating_mul(1u32.checked_shl(attempt.min(16)).unwrap_or(u32::MAX))
        .min(BACKOFF_MAX);
    base.mul_f64(0.5 + 0.5 * jitter.clamp(0.0, 1.0))
}

fn publish(client: &paho::AsyncClient, metrics: &Metrics, what: Published, msg: paho::Message) {
    // try_publish only queues (the send happens on paho's thread); the
    // delivery token is dropped: nothing on our side waits for a PUBACK.
    match client.try_publish(msg) {
        Ok(_) => metrics.mqtt.published(what),
        Err(e) => {
            metrics.mqtt.publish_failed.fetch_add(1, Ordering::Relaxed);
            log::debug!("publish failed: {e}");
        }
    }
}

struct Ingest {
    client: paho::AsyncClient,
    devices: Devices,
    metrics: Arc<Metrics>,
    max_payload: usize,
    /// device -> when its last rejection was logged.
    logged: HashMap<String, Instant>,
    rollouts: Option<Rollouts>,
}

impl Ingest {
    async fn run(mut self, messages: async_channel::Receiver<paho::Message>, stop: Shutdown) {
        loop {
            let first = async { messages.recv().await.ok() }
                .or(async {
                    stop.wait().await;
                    None
                })
                .await;
            let Some(first) = first else { break };
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
        let rest: Vec<paho::Message> = std::iter::from_fn(|| messages.try_recv().ok()).collect();
        for chunk in rest.chunks(MAX_BATCH) {
            self.process(chunk.to_vec()).await;
        }
    }

    async fn process(&mut self, batch: Vec<paho::Message>) {
        let mut parsed = Vec::with_capacity(batch.len());
        let mut reports = Vec::new();
        for m in &batch {
            let topic = m.topic();
            self.metrics.mqtt.received(topic);
            match payload::parse(topic, m.payload(), self.max_payload) {
                Ok(Inbound::Ignored) => {}
                Ok(Inbound::UpdateStatus { device, report }) => reports.push((device, report)),
                Ok(inbound) => parsed.push(inbound),
                Err(e) => self.reject_payload(&e),
            }
        }
        if let Some(r) = &self.rollouts {
            if !reports.is_empty() {
                if let Err(e) = r.report(reports).await {
                    log::warn!("firmware status reports not recorded: {e}");
                }
            }
        }
        // A device seen again may be owed an offer, or may report the new
        // version: the engine looks once this batch is committed.
        let seen = parsed.iter().any(|m| {
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
        let first_device = parsed[0].device().unwrap_or_default().to_owned();
        let outcomes = match self.devices.apply(parsed).await {
            Ok(o) => o,
            Err(e) if count > 1 => {
                log::warn!("a batch of {count} messages failed ({e}); applying them one by one");
                // Parsed again rather than cloned up front: this path is
                // rare, the clone was paid on every batch. Rejections were
                // already reported on the first pass.
                let again = batch.iter().filter_map(|m| {
                    match payload::parse(m.topic(), m.payload(), self.max_payload) {
                        Ok(Inbound::Ignored | Inbound::UpdateStatus { .. }) | Err(_) => None,
                        Ok(inbound) => Some(inbound),
                    }
                });
                let mut out = Vec::with_capacity(count);
                for m in again.collect::<Vec<_>>() {
                    let device = m.device().unwrap_or_default().to_owned();
                    out.push(match self.devices.apply(vec![m]).await {
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
                        log::info!("device {device} registered (index {modify_index})");
                    }
                    publish(
                        &self.client,
                        &self.metrics,
                        Published::Ack,
                        paho::Message::new(
                            format!("devices/{device}/ack"),
                            ack_json(&device, modify_index, created),
                            1,
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

    /// Counts, explains on `devices/{id}/error`, and logs (at most once per
    /// device per minute).
    fn reject(&mut self, device: Option<&str>, reason: Reason, message: &str, topic: Option<&str>) {
        self.metrics.mqtt.rejected(reason);
        let key = device.unwrap_or("").to_owned();
        let now = Instant::now();
        let due = self
            .logged
            .get(&key)
            .is_none_or(|t| now.duration_since(*t) >= LOG_EVERY);
        if due {
            log::warn!(
                "rejected ({}): {message} (further rejections for this device are not logged for {}s)",
                reason.as_str(),
                LOG_EVERY.as_secs()
            );
            if self.logged.len() >= 4096 {
                // Bound the map against a flood of made-up ids.
                self.logged
                    .retain(|_, t| now.duration_since(*t) < LOG_EVERY);
            }
            self.logged.insert(key, now);
        }
        if let Some(d) = device {
            let body = json!({
                "error": reason.as_str(),
                "message": message,
                "topic": topic,
            });
            publish(
                &self.client,
                &self.metrics,
                Published::Error,
                paho::Message::new(format!("devices/{d}/error"), body.to_string(), 1),
            );
        }
    }
}

fn store_rejection(device: String, e: &crate::store::StoreError) -> Outcome {
    Outcome::Rejected {
        device,
        reason: Reason::Store,
        message: format!("not stored, try again later: {e}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_is_capped_and_jittered() {
        assert_eq!(backoff_delay(0, 1.0), Duration::from_millis(500));
        assert_eq!(backoff_delay(0, 0.0), Duration::from_millis(250));
        assert_eq!(backoff_delay(3, 1.0), Duration::from_secs(4));
        assert_eq!(backoff_delay(30, 1.0), BACKOFF_MAX);
        assert_eq!(backoff_delay(u32::MAX, 0.0), BACKOFF_MAX / 2);
    }
}
