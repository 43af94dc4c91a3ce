//! The paho side of the bridge (cargo feature `mqtt`): the client, its
//! callbacks and the connection loop. See the module docs of
//! [`crate::mqtt`] for the threading. Every call into Paho made here runs
//! on a blocking thread (`smol::unblock`) and only its token is awaited:
//! Paho's calls take the mutex its receive thread holds while our message
//! callback waits for ingest, which runs on the executor.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use paho_mqtt as paho;
use smol::future::FutureExt;

use super::ingest::Ingest;
use super::outbox::Outbox;
use super::rejections::LogBudget;
use super::{paho_uri, MqttError, Settings};
use crate::devices::{Alert, Devices};
use crate::firmware::rollout::{Offer, Rollouts};
use crate::metrics::{Metrics, Published};
use crate::support::Shutdown;

/// Messages paho may hand us before its thread waits for ingest.
const QUEUE: usize = 2048;
const BACKOFF_MIN: Duration = Duration::from_millis(500);
const BACKOFF_MAX: Duration = Duration::from_secs(60);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
const KEEP_ALIVE: Duration = Duration::from_secs(30);
/// How long shutdown waits for the offline status and the disconnect.
const GOODBYE: Duration = Duration::from_secs(2);

pub struct Bridge {
    client: paho::AsyncClient,
    outbox: Outbox,
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
        let outbox =
            Outbox::start(client.clone(), metrics.clone()).map_err(|e| MqttError::Client {
                url: settings.url.clone(),
                message: format!("cannot start the publish thread: {e}"),
            })?;
        Ok(Bridge {
            client,
            outbox,
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
            outbox: self.outbox.clone(),
            devices: self.devices.clone(),
            metrics: self.metrics.clone(),
            max_payload: self.settings.max_payload,
            budget: LogBudget::new(),
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
                self.outbox
                    .send(
                        Published::Alert,
                        paho::Message::new(format!("alerts/{}", a.device_id), body, 1),
                    )
                    .await;
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
                self.outbox
                    .send(Published::Offer, paho::Message::new(o.topic, o.payload, 1))
                    .await;
            }
        };
        smol::future::zip(
            smol::future::zip(connection, smol::future::zip(alerts, offers)),
            ingest.run(self.messages.clone(), stop_ingest.clone()),
        )
        .await;
        // Paho's callback may be waiting to hand us one more message while
        // holding Paho's mutex: closing the channel releases it. Paho's
        // destroy (the last clone's drop) takes that mutex, so it runs off
        // the executor: here on a blocking thread, or on the publish thread,
        // which drops its clone once its queue closes. Bounded all the same.
        self.messages.close();
        let Bridge { client, outbox, .. } = self;
        drop(outbox);
        smol::unblock(move || drop(client))
            .or(async {
                async_io::Timer::after(GOODBYE).await;
            })
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
            let connected = async {
                let (c, opts) = (self.client.clone(), self.connect.clone());
                Some(Some(smol::unblock(move || c.connect(opts)).await.await))
            }
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
                    let c = self.client.clone();
                    smol::unblock(move || drop(c.disconnect(None))).detach();
                    if !self.backoff(&mut attempt, shutdown).await {
                        return;
                    }
                    continue;
                }
            };
            match result {
                Ok(rsp) => {
                    let session = rsp.connect_response().is_some_and(|c| c.session_present);
                    let subscribed = async {
                        let (c, t, q) = (self.client.clone(), topics.clone(), qos.clone());
                        Some(smol::unblock(move || c.subscribe_many(&t, &q)).await.await)
                    }
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
                            let c = self.client.clone();
                            async {
                                let _ = smol::unblock(move || c.disconnect(None)).await.await;
                            }
                            .or(async {
                                async_io::Timer::after(GOODBYE).await;
                            })
                            .await;
                            self.backoff(&mut attempt, shutdown).await;
                            continue;
                        }
                    }
                    self.outbox
                        .send(Published::Status, status_message(&self.settings, true))
                        .await;
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
            let (c, msg) = (self.client.clone(), status_message(&self.settings, false));
            let _ = smol::unblock(move || c.publish(msg)).await.await;
        };
        sent.or(async {
            async_io::Timer::after(GOODBYE).await;
        })
        .await;
        let opts = paho::DisconnectOptionsBuilder::new()
            .timeout(GOODBYE)
            .finalize();
        let done = async {
            let c = self.client.clone();
            let _ = smol::unblock(move || c.disconnect(opts)).await.await;
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
