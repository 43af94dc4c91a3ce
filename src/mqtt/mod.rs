//! The MQTT bridge: the broker connection, topic routing and the payload
//! schemas ([`payload`]).
//!
//! The client is our own ([`client`], MQTT 3.1.1 and 5 on async-io); why
//! not Paho any more is in `docs/decisions/0021-mqtt-acks-after-commit.md`.
//!
//! Threads. None of its own: the connection (reader, writer, keep-alive),
//! the publisher ([`outbox`]) and ingest are futures on the executor, and
//! the only lock (the client's session state, [`client::link`]) is never
//! held across an await. So:
//! - messages: the reader hands them to ingest through a bounded channel
//!   (`QUEUE` in `bridge`). When ingest falls behind, the reader waits
//!   there (asynchronously), TCP reads stop and the broker holds the
//!   messages: back-pressure instead of memory growth or drops. The
//!   broker's window (MQTT 5 receive maximum = two batches, so one arrives
//!   while the other commits; or its own 3.1.1 window) keeps QoS 1/2 traffic below that bound.
//!   The queued payloads' bytes are bounded too, by a share of
//!   `resources.memory_limit` ([`gate`]): QoS 0 has no window, and two
//!   batches of large payloads would not fit the memory limit.
//! - publishes go through [`outbox`]: a bounded queue; acks and errors to
//!   devices are dropped and counted when it is full instead of waiting (a
//!   flood of bad input cannot stall ingest), alerts and offers wait
//!   asynchronously for room. The queue drains into the connection's
//!   writer as the broker's window allows. Nothing the executor runs waits
//!   for something that waits for the executor (the issue-13 deadlock, a
//!   foreign thread holding a mutex while it waited for us, cannot exist).
//! - shutdown: the reader stops taking messages, ingest acknowledges what
//!   it has (bounded wait), the offline status goes out, DISCONNECT.
//!
//! Session: `clean_session = false` (MQTT 5: session expiry "never") with
//! a stable client id (`mqtt.client_id`, else `konsul-edge-{node_id}`), so
//! the broker keeps our subscriptions and queues QoS 1/2 messages while the
//! daemon is down; they arrive on reconnect. We still resubscribe after
//! every connect (the broker may have lost the session: a restart without
//! persistence).
//!
//! Reconnect: our own loop, exponential backoff (0.5 s doubling to 60 s)
//! with full jitter in the upper half, so a fleet of edges does not hammer
//! a broker that comes back. MQTT 5 first; a broker that refuses the
//! protocol version gets 3.1.1 from then on.
//!
//! Status: `edges/{node_id}/status` is `{"status":"online"}` retained while
//! connected and `{"status":"offline"}` retained as our last will (and
//! published before a clean disconnect, which fires no will).
//!
//! Ingest ([`ingest`]): messages are taken in batches (what is queued, up
//! to [`MAX_BATCH`]) and applied in one store transaction; only after that
//! transaction commits does the broker get its PUBACK (QoS 1) or PUBREC
//! (QoS 2) for them, and devices their acks. So what the broker considers
//! delivered is durable; a crash between commit and PUBACK makes the broker
//! re-send, and the store takes the repeat as a repeat (delivery into the
//! store is at least once, see [`client`]).
//!
//! Rejections are counted by reason, explained to the device and logged
//! within a budget ([`rejections`]).

#[cfg(feature = "mqtt")]
mod bridge;
#[cfg(feature = "mqtt")]
pub mod client;
#[cfg(feature = "mqtt")]
pub(crate) mod gate;
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
pub(crate) use bridge::backoff;
#[cfg(feature = "mqtt")]
pub use bridge::{backoff_delay, Bridge};
#[cfg(feature = "mqtt")]
pub use ingest::MAX_BATCH;

#[derive(Debug, thiserror::Error)]
pub enum MqttError {
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
    /// `resources.memory_limit`: bounds the bytes queued for ingest
    /// (`gate`).
    pub memory_limit: u64,
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
            memory_limit: c.resources.memory_limit.0,
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
