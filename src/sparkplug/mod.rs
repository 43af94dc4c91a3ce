//! The Sparkplug B edge node (cargo feature `sparkplug`, config
//! `sparkplug:`): the devices registered over MQTT, as SCADA and MES
//! systems see them. docs/decisions/0022-sparkplug-b.md has the why.
//!
//! - Its own connection, on our MQTT client ([`crate::mqtt::client`]) with
//!   the `mqtt:` broker settings: Sparkplug needs the NDEATH to be the last
//!   will of the very session that published the NBIRTH, with a clean
//!   session, while the bridge's session is persistent and its will is the
//!   edge's status. A fresh [`Link`](crate::mqtt::client::Link) per
//!   connection: nothing of an old session is re-sent into a new one.
//! - `bdSeq`: read from the store's `meta` table before CONNECT (it goes
//!   into the will), the next value written once the broker accepted the
//!   will, so a restart (even after kill -9) births with the next one.
//! - `seq`: 0 in NBIRTH, then +1 (mod 256) on every node message.
//! - What it publishes comes from the devices subsystem: the store at a
//!   birth ([`crate::devices::Devices::list`]), then the feed of committed
//!   changes ([`crate::devices::Devices::feed`]). A device's store
//!   sequence number says what the host has seen, so a feed event the
//!   birth already covered is skipped, and what the host missed while it
//!   was away is replayed from the store with `is_historical`.
//! - Commands: NCMD `Node Control/Rebirth` (a full rebirth), `Node
//!   Control/Next Server` (reconnect); DCMD becomes a JSON object of the
//!   metrics' values published on `devices/{id}/command`. A malformed
//!   command is logged and changes nothing.
//! - Primary host (`primary_host_id`): no birth until its STATE says
//!   online; while offline nothing is published, and the next birth is
//!   followed by the stored telemetry it missed.
//!
//! Split by job: [`payload`] (the protobuf, values, commands), `node` (the
//! actor), `device` (one device's metrics and aliases).

mod device;
mod node;
pub(crate) mod payload;

use std::path::PathBuf;

pub(crate) use node::Node;

#[derive(Debug, thiserror::Error)]
pub(crate) enum SparkplugError {
    #[error("sparkplug: {topic}: malformed command: {message}")]
    Command { topic: String, message: String },
    #[error("sparkplug: mqtt.ca_file {path}: {message}")]
    Tls { path: PathBuf, message: String },
    #[error("sparkplug: broker `{url}`: {message}")]
    Broker { url: String, message: String },
    #[error("sparkplug: meta key {key}: {message}")]
    Meta { key: &'static str, message: String },
}

/// The `sparkplug:` section resolved against the node id and `mqtt:`.
#[derive(Debug, Clone)]
pub(crate) struct Settings {
    pub(crate) group_id: String,
    pub(crate) edge_node_id: String,
    pub(crate) primary_host_id: Option<String>,
    pub(crate) device_types: Vec<String>,
    pub(crate) fields: Vec<String>,
    pub(crate) broker: crate::mqtt::Settings,
}

impl Settings {
    pub(crate) fn from_config(
        c: &crate::config::Sparkplug,
        broker: crate::mqtt::Settings,
    ) -> Settings {
        Settings {
            group_id: c.group_id.clone(),
            edge_node_id: if c.edge_node_id.is_empty() {
                broker.node_id.clone()
            } else {
                c.edge_node_id.clone()
            },
            primary_host_id: c.primary_host_id.clone(),
            device_types: c.device_types.clone(),
            fields: c.fields.clone(),
            broker,
        }
    }

    fn topic(&self, kind: &str) -> String {
        format!("spBv1.0/{}/{kind}/{}", self.group_id, self.edge_node_id)
    }

    fn device_topic(&self, kind: &str, device: &str) -> String {
        format!(
            "spBv1.0/{}/{kind}/{}/{device}",
            self.group_id, self.edge_node_id
        )
    }

    fn state_topic(&self) -> Option<String> {
        self.primary_host_id
            .as_ref()
            .map(|h| format!("spBv1.0/STATE/{h}"))
    }

    /// Whether a device of this type is published.
    fn wants_type(&self, device_type: &str) -> bool {
        self.device_types.is_empty() || self.device_types.iter().any(|t| t == device_type)
    }

    /// Whether this telemetry field becomes a metric.
    fn wants_field(&self, field: &str) -> bool {
        self.fields.is_empty() || self.fields.iter().any(|f| f == field)
    }
}
