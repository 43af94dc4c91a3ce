//! The bridge (cargo feature `mqtt`): our client ([`super::client`]), the
//! connection loop with backoff, the publisher and ingest, all futures on
//! the executor. See the module docs of [`crate::mqtt`].

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use smol::future::FutureExt;

use super::client::session::{self, Ended, Serve};
use super::client::{ClientError, Connect, Incoming, Link, Message, Options, Version, Will};
use super::gate::ByteGate;
use super::ingest::{Ingest, MAX_BATCH};
use super::outbox::Outbox;
use super::rejections::LogBudget;
use super::{MqttError, Settings};
use crate::devices::{Alert, Devices};
use crate::firmware::rollout::{Offer, Rollouts};
use crate::metrics::{Metrics, Published};
use crate::support::Shutdown;

/// Messages the reader may hand ingest before it waits (and stops reading
/// the socket). No smaller than the broker's window, so QoS 1/2 traffic
/// never makes the reader wait.
const QUEUE: usize = 2 * MAX_BATCH;
/// The MQTT 5 receive maximum: unacknowledged QoS 1/2 messages the broker
/// may have out to us. Two batches, so the next batch arrives while one
/// commits; with one batch the broker's window was used up during every
/// commit and receiving stalled (52 % of the broker's ceiling, not 80 %).
const WINDOW: u16 = QUEUE as u16;
const BACKOFF_MIN: Duration = Duration::from_millis(500);
const BACKOFF_MAX: Duration = Duration::from_secs(60);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
const KEEP_ALIVE: u16 = 30;
/// Room for a topic (MQTT caps it at 64 KiB) and the headers above the
/// largest payload: larger payloads up to this reach ingest, which
/// explains the refusal to the device; beyond it the broker (MQTT 5)
/// drops them, or (3.1.1) the connection ends.
const PACKET_OVERHEAD: usize = (64 << 10) + 64;

pub struct Bridge {
    opts: Options,
    settings: Settings,
    devices: Devices,
    metrics: Arc<Metrics>,
    link: Arc<Link>,
    gate: Arc<ByteGate>,
    outbox: Outbox,
    alerts: async_channel::Receiver<Alert>,
    /// The rollout engine (status reports in, offers out).
    rollouts: Option<(Rollouts, async_channel::Receiver<Offer>)>,
}

impl Bridge {
    /// Checks the URL and the TLS set-up; nothing connects until
    /// [`run`](Self::run).
    pub fn new(
        settings: Settings,
        devices: Devices,
        metrics: Arc<Metrics>,
        alerts: async_channel::Receiver<Alert>,
        rollouts: Option<(Rollouts, async_channel::Receiver<Offer>)>,
    ) -> Result<Bridge, MqttError> {
        let client_err = |e: ClientError| MqttError::Client {
            url: settings.url.clone(),
            message: e.to_string(),
        };
        let (host, port, tls) = session::parse_url(&settings.url).map_err(client_err)?;
        let tls = if tls {
            // The same rustls set-up as sync: TLS 1.3, the CA file or the
            // system's CAs.
            let config = crate::sync::transport::client_tls(settings.ca_file.as_deref(), None)
                .map_err(|e| match &settings.ca_file {
                    Some(path) => MqttError::CaFile {
                        path: path.clone(),
                        message: e.to_string(),
                    },
                    None => MqttError::Client {
                        url: settings.url.clone(),
                        message: e.to_string(),
                    },
                })?;
            Some(config)
        } else {
            None
        };
        let max_packet = settings
            .max_payload
            .saturating_add(PACKET_OVERHEAD)
            .min(super::client::codec::MAX_REMAINING);
        let offline = status_message(&settings, false);
        let opts = Options {
            url: settings.url.clone(),
            host,
            port,
            tls,
            connect: Connect {
                client_id: settings.client_id.clone(),
                keep_alive: KEEP_ALIVE,
                clean_session: false,
                will: Some(Will {
                    topic: offline.topic,
                    payload: offline.payload,
                    qos: 1,
                    retain: true,
                }),
                username: settings.username.clone(),
                password: settings.password.clone(),
                receive_maximum: WINDOW,
                maximum_packet_size: u32::try_from(max_packet).unwrap_or(u32::MAX),
            },
            filters: settings
                .topics
                .iter()
                .map(|t| (t.clone(), settings.qos as u8))
                .collect(),
            max_packet,
            timeout: CONNECT_TIMEOUT,
        };
        let gate = Arc::new(ByteGate::new(settings.memory_limit, max_packet));
        Ok(Bridge {
            gate,
            opts,
            settings,
            devices,
            outbox: Outbox::new(metrics.clone()),
            metrics,
            link: Arc::new(Link::default()),
            alerts,
            rollouts,
        })
    }

    /// Runs until `shutdown`: keeps the connection, ingests, publishes
    /// alerts. On shutdown it acknowledges what ingest committed, says
    /// goodbye (offline status, disconnect) and applies every message it
    /// had already received.
    pub async fn run(self, shutdown: Shutdown) {
        let stop_ingest = Shutdown::default();
        self.metrics.mqtt.ingest_limit(self.gate.limit());
        let (in_tx, in_rx) = async_channel::bounded(QUEUE);
        let ingest = Ingest {
            outbox: self.outbox.clone(),
            link: self.link.clone(),
            gate: self.gate.clone(),
            devices: self.devices.clone(),
            metrics: self.metrics.clone(),
            max_payload: self.settings.max_payload,
            budget: LogBudget::new(),
            rollouts: self.rollouts.as_ref().map(|(r, _)| r.clone()),
        };
        let connection = async {
            self.connection(&shutdown, &in_tx).await;
            // Disconnected: nothing new arrives; let ingest drain.
            stop_ingest.trigger();
        };
        let publisher = self.outbox.run(&self.link, &shutdown);
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
                        Message::new(format!("alerts/{}", a.device_id), body),
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
                    .send(Published::Offer, Message::new(o.topic, o.payload))
                    .await;
            }
        };
        smol::future::zip(
            smol::future::zip(connection, publisher),
            smol::future::zip(
                smol::future::zip(alerts, offers),
                ingest.run(in_rx, stop_ingest.clone()),
            ),
        )
        .await;
    }

    async fn connection(&self, shutdown: &Shutdown, incoming: &async_channel::Sender<Incoming>) {
        let mut attempt: u32 = 0;
        let mut version = Version::V5;
        log::info!(
            "connecting to {} as {}",
            self.settings.url,
            self.settings.client_id
        );
        loop {
            let connected = async { Some(session::connect(&self.opts, version).await) }
                .or(async {
                    shutdown.wait().await;
                    None
                })
                .await;
            match connected {
                None => return,
                Some(Ok(c)) => {
                    attempt = 0;
                    let ended = session::serve(
                        c,
                        Serve {
                            opts: &self.opts,
                            link: &self.link,
                            incoming,
                            gate: &self.gate,
                            metrics: &self.metrics,
                            online: Some(status_message(&self.settings, true)),
                            offline: Some(status_message(&self.settings, false)),
                            shutdown,
                        },
                    )
                    .await;
                    match ended {
                        Ended::Shutdown => return,
                        Ended::Lost(e) => log::warn!(
                            "connection to {} lost ({e}); reconnecting",
                            self.settings.url
                        ),
                    }
                }
                Some(Err(ClientError::NoV5 { .. })) if version == Version::V5 => {
                    log::info!(
                        "{} does not speak MQTT 5; using 3.1.1 (batches as large as the broker's window)",
                        self.settings.url
                    );
                    version = Version::V311;
                    continue;
                }
                Some(Err(e)) => {
                    // Every failure while the broker is away would flood the
                    // log: say it on the first attempts, then every 10th.
                    if attempt < 3 || attempt.is_multiple_of(10) {
                        log::warn!("cannot connect (attempt {}): {e}", attempt + 1);
                    }
                }
            }
            self.metrics.mqtt.connected.store(0, Ordering::Relaxed);
            if !backoff(&mut attempt, shutdown).await {
                return;
            }
        }
    }
}

/// Sleeps the next reconnect backoff step (and counts the attempt); false
/// if shutdown came first.
pub(crate) async fn backoff(attempt: &mut u32, shutdown: &Shutdown) -> bool {
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

fn status_message(s: &Settings, online: bool) -> Message {
    Message {
        topic: s.status_topic(),
        payload: s.status_json(online).into_bytes(),
        retain: true,
    }
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
