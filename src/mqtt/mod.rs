//! The MQTT bridge: the broker connection, topic routing and the payload
//! schemas ([`payload`]).
//!
//! Eclipse Paho (C library, bundled) through paho-mqtt; why, and how TLS is
//! linked, is in `docs/decisions/0020-paho-mqtt.md`.
//!
//! Threads. Paho runs two threads of its own (receive and send) and calls
//! us back on the receive thread *while holding Paho's process-wide
//! mutex*; every Paho call (connect, subscribe, publish, disconnect,
//! destroy) takes that same mutex. So:
//! - messages: the callback does a blocking send into a bounded channel
//!   (`QUEUE` in `bridge`). When ingest falls behind, the receive thread
//!   waits there, TCP reads stop and the broker holds the messages:
//!   back-pressure instead of memory growth or drops. (Paho's own
//!   `get_stream` drops messages when full.) While it waits it holds the
//!   mutex: Paho's send thread waits too (no keep-alive pings go out), and
//!   so would anything else that calls into Paho.
//! - therefore nothing on the executor calls into Paho. Publishes go
//!   through [`outbox`]: a bounded queue and a thread of its own; acks and
//!   errors are dropped and counted when the queue is full instead of
//!   waiting (a flood of bad input cannot stall ingest), statuses, alerts
//!   and offers wait asynchronously for room. Connect, subscribe and
//!   disconnect run on blocking threads (`smol::unblock`) and the executor
//!   awaits their tokens with timeouts. The chain receive thread -> ingest
//!   channel -> executor -> store thread never leads back to the mutex, so
//!   it cannot close into a cycle. (Before this, the executor published
//!   acks itself: a flood of messages needing replies filled the channel
//!   with the receive thread waiting on it holding the mutex, and the
//!   executor waiting for the mutex: HTTP, D-Bus and SIGTERM froze.)
//! - connection lost: a signal into a capacity-1 channel (`try_send`).
//! - shutdown: the ingest channel is closed (a waiting callback returns)
//!   and the client is dropped on a blocking thread.
//!
//! Session: `clean_session = false` with a stable client id
//! (`mqtt.client_id`, else `konsul-edge-{node_id}`), so the broker keeps
//! our subscriptions and queues QoS 1/2 messages while the daemon is down;
//! they arrive on reconnect. We still resubscribe after every connect (the
//! broker may have lost the session: a restart without persistence).
//!
//! Reconnect: our own loop, exponential backoff (0.5 s doubling to 60 s)
//! with full jitter in the upper half, so a fleet of edges does not hammer
//! a broker that comes back. Paho's automatic reconnect has no jitter.
//!
//! Status: `edges/{node_id}/status` is `{"status":"online"}` retained while
//! connected and `{"status":"offline"}` retained as our last will (and
//! published before a clean disconnect, which fires no will).
//!
//! Ingest ([`ingest`]): messages are taken in batches (what is queued, up
//! to [`MAX_BATCH`]) and applied in one store transaction; device acks are
//! queued after that transaction commits. A registration therefore is acked
//! to the device only once it is durable. Paho, however, acknowledges QoS
//! 1/2 to the broker (PUBACK/PUBREC) as soon as our callback returns, before
//! the commit; see `docs/decisions/0021-mqtt-acks-after-commit.md`.
//!
//! Rejections are counted by reason, explained to the device and logged
//! within a budget ([`rejections`]).

#[cfg(feature = "mqtt")]
mod bridge;
#[cfg(feature = "mqtt")]
mod ingest;
#[cfg(feature = "mqtt")]
mod outbox;
/// The device message schema lives with the devices it describes; the
/// bridge only carries it.
pub use crate::devices::payload;
#[cfg(feature = "mqtt")]
mod rejections;

use std::path::PathBuf;

use serde_json::json;

#[cfg(feature = "mqtt")]
pub use bridge::{backoff_delay, Bridge};
#[cfg(feature = "mqtt")]
pub use ingest::MAX_BATCH;

#[derive(Debug, thiserror::Error)]
pub enum MqttError {
    #[error("mqtt.broker `{url}`: TLS is not in this build (rebuild with `--features mqtt-tls`)")]
    NoTls { url: String },
    #[error("mqtt.password_file {path}: {source}")]
    PasswordFile {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("mqtt.password_file is set, but mqtt.username is not")]
    PasswordWithoutUser,
    #[error("mqtt.ca_file {path}: {message}")]
    CaFile { path: PathBuf, message: String },
    #[error("mqtt: cannot create a client for {url}: {message}")]
    Client { url: String, message: String },
    #[error("mqtt.enabled is set, but this build has no MQTT bridge (cargo feature `mqtt`)")]
    NotBuilt,
}

/// Everything the bridge needs from the configuration.
#[derive(Debug, Clone)]
pub struct Settings {
    pub url: String,
    pub client_id: String,
    pub qos: i32,
    pub topics: Vec<String>,
    pub username: Option<String>,
    pub password: Option<String>,
    pub ca_file: Option<PathBuf>,
    pub node_id: String,
    pub max_payload: usize,
}

impl Settings {
    // Set-up, before the executor runs.
    #[allow(clippy::disallowed_methods)]
    pub fn from_config(c: &crate::config::Config, node_id: &str) -> Result<Settings, MqttError> {
        let m = &c.mqtt;
        let password = match &m.password_file {
            None => None,
            Some(_) if m.username.is_none() => return Err(MqttError::PasswordWithoutUser),
            Some(path) => Some(
                std::fs::read_to_string(path)
                    .map_err(|source| MqttError::PasswordFile {
                        path: path.clone(),
                        source,
                    })?
                    .trim_end_matches(['\r', '\n'])
                    .to_owned(),
            ),
        };
        Ok(Settings {
            url: m.broker.clone(),
            client_id: if m.client_id.is_empty() {
                format!("konsul-edge-{node_id}")
            } else {
                m.client_id.clone()
            },
            qos: m.qos as i32,
            topics: with_update_status(&m.topics),
            username: m.username.clone(),
            password,
            ca_file: m.ca_file.clone(),
            node_id: node_id.to_owned(),
            max_payload: m.max_payload_size.0 as usize,
        })
    }

    pub fn status_topic(&self) -> String {
        format!("edges/{}/status", self.node_id)
    }

    /// The retained payload of `edges/{node_id}/status`.
    pub fn status_json(&self, online: bool) -> String {
        json!({
            "status": if online { "online" } else { "offline" },
            "node_id": self.node_id,
        })
        .to_string()
    }
}

/// `mqtt://` and `mqtts://` as paho spells them everywhere.
pub fn paho_uri(url: &str) -> (String, bool) {
    let (scheme, rest) = url.split_once("://").unwrap_or(("tcp", url));
    let (scheme, tls) = match scheme {
        "mqtt" | "tcp" => ("tcp", false),
        "mqtts" | "ssl" => ("ssl", true),
        "wss" => ("wss", true),
        other => (other, false),
    };
    (format!("{scheme}://{rest}"), tls)
}

/// The configured topics plus `devices/+/update/status` (firmware rollout
/// progress) unless a configured filter already covers it: rollouts depend
/// on it, so it is not left to the config.
fn with_update_status(topics: &[String]) -> Vec<String> {
    const UPDATE_STATUS: &str = "devices/+/update/status";
    let mut out = topics.to_vec();
    let covered = topics
        .iter()
        .any(|t| t == "#" || t == "devices/#" || t == "devices/+/update/#" || t == UPDATE_STATUS);
    if !covered {
        out.push(UPDATE_STATUS.into());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn broker_urls_map_to_paho_schemes() {
        assert_eq!(paho_uri("mqtt://h:1883"), ("tcp://h:1883".into(), false));
        assert_eq!(paho_uri("tcp://h:1883"), ("tcp://h:1883".into(), false));
        assert_eq!(paho_uri("mqtts://h:8883"), ("ssl://h:8883".into(), true));
        assert_eq!(paho_uri("ssl://h:8883"), ("ssl://h:8883".into(), true));
        assert_eq!(paho_uri("ws://h:80/mqtt"), ("ws://h:80/mqtt".into(), false));
        assert_eq!(paho_uri("wss://h/mqtt"), ("wss://h/mqtt".into(), true));
    }

    #[test]
    fn update_status_is_always_subscribed() {
        let t =
            |v: &[&str]| with_update_status(&v.iter().map(|s| s.to_string()).collect::<Vec<_>>());
        assert_eq!(
            t(&["devices/+/register"]),
            ["devices/+/register", "devices/+/update/status"]
        );
        assert_eq!(t(&["devices/#"]), ["devices/#"]);
    }
}
