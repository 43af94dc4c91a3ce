//! The edge node actor: one task on the executor. Per connection: the
//! will (NDEATH with this connection's bdSeq), births once the primary
//! host (if any) is online, then the feed of committed device changes and
//! the host's commands, one at a time, so `seq` needs no lock.
//!
//! QoS: births, live data and DDEATH go out at QoS 0, as Sparkplug says
//! (the QoS 1 window would cap the node below ingest's rate, and a lost
//! one is healed by the rebirth of the next connection); historical data
//! (the host's only copy of what it missed) and device commands at QoS 1;
//! the NDEATH will at QoS 1.

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use smol::future::FutureExt;

use super::device::{device_id_ok, DeviceState, Update};
use super::payload::{self, Metric, Value};
use super::{Settings, SparkplugError};
use crate::app::App;
use crate::clock::wall_millis;
use crate::devices::health::Health;
use crate::devices::{Feed, FeedRx};
use crate::metrics::Metrics;
use crate::mqtt::backoff;
use crate::mqtt::client::session::{self, Ended, Serve};
use crate::mqtt::client::{ClientError, Connect, Incoming, Link, Message, Options, Version, Will};
use crate::mqtt::gate::ByteGate;
use crate::support::Shutdown;

const BD_SEQ_KEY: &str = "sparkplug.bd_seq";
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
const KEEP_ALIVE: u16 = 30;
/// Commands and STATE waiting for the node.
const INCOMING: usize = 64;
/// Stored telemetry read per query during a replay.
const REPLAY_PAGE: usize = 500;

pub(crate) struct Node {
    settings: Settings,
    app: Arc<App>,
    feed: FeedRx,
    opts: Options,
    /// The gauges `serve` keeps; not exported (the bridge's are).
    metrics: Metrics,
}

/// What lives across connections.
#[derive(Default)]
struct State {
    devices: BTreeMap<String, DeviceState>,
    seq: u8,
    /// Births sent on this connection and the host is listening.
    live: bool,
}

/// Why a connection's work ended.
enum Leave {
    NextServer,
}

impl Node {
    /// Checks the broker URL and TLS; nothing connects until [`run`](Self::run).
    pub(crate) fn new(
        settings: Settings,
        app: Arc<App>,
        feed: FeedRx,
    ) -> Result<Node, SparkplugError> {
        let b = &settings.broker;
        let (host, port, tls) = session::parse_url(&b.url).map_err(|e| SparkplugError::Broker {
            url: b.url.clone(),
            message: e.to_string(),
        })?;
        let tls = if tls {
            Some(
                crate::sync::transport::client_tls(b.ca_file.as_deref(), None).map_err(|e| {
                    SparkplugError::Tls {
                        path: b.ca_file.clone().unwrap_or_default(),
                        message: e.to_string(),
                    }
                })?,
            )
        } else {
            None
        };
        let mut filters = vec![
            (settings.topic("NCMD"), 0),
            (settings.device_topic("DCMD", "+"), 0),
        ];
        if let Some(t) = settings.state_topic() {
            filters.push((t, 1));
        }
        let max_packet = payload::MAX_COMMAND_BYTES + (64 << 10);
        let opts = Options {
            url: b.url.clone(),
            host,
            port,
            tls,
            connect: Connect {
                client_id: format!("{}-sparkplug", b.client_id),
                keep_alive: KEEP_ALIVE,
                // Sparkplug: a session lives exactly as long as its
                // connection, so its will is its death certificate.
                clean_session: true,
                will: None,
                username: b.username.clone(),
                password: b.password.clone(),
                receive_maximum: INCOMING as u16,
                maximum_packet_size: max_packet as u32,
            },
            filters,
            max_packet,
            timeout: CONNECT_TIMEOUT,
        };
        Ok(Node {
            settings,
            app,
            feed,
            opts,
            metrics: Metrics::default(),
        })
    }

    pub(crate) async fn run(mut self, shutdown: Shutdown) {
        let mut st = State::default();
        // The host has what existed before we started; history is replayed
        // from here on.
        match self.app.devices.list().await {
            Ok(list) => {
                for v in list {
                    if self.settings.wants_type(&v.device.device_type) && device_id_ok(&v.device.id)
                    {
                        st.devices.entry(v.device.id.clone()).or_default().sent = v.telemetry_seq;
                    }
                }
            }
            Err(e) => log::warn!("sparkplug: cannot read the devices: {e}"),
        }
        let mut attempt: u32 = 0;
        let mut version = Version::V5;
        log::info!(
            "sparkplug: edge node {}/{} on {}",
            self.settings.group_id,
            self.settings.edge_node_id,
            self.opts.url
        );
        loop {
            let bd_seq = self.load_bd_seq().await;
            self.opts.connect.will = Some(Will {
                topic: self.settings.topic("NDEATH"),
                payload: ndeath(bd_seq),
                qos: 1,
                retain: false,
            });
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
                    // The broker holds this bdSeq's will: the next session
                    // (after a crash too) takes the next number.
                    self.store_bd_seq(bd_seq.wrapping_add(1)).await;
                    let link = Link::default();
                    // Per connection too: bytes of commands a lost
                    // connection leaves unread are not given back.
                    let gate =
                        ByteGate::new(self.settings.broker.memory_limit, self.opts.max_packet);
                    let (in_tx, in_rx) = async_channel::bounded(INCOMING);
                    let ended = session::serve(
                        c,
                        Serve {
                            opts: &self.opts,
                            link: &link,
                            incoming: &in_tx,
                            gate: &gate,
                            metrics: &self.metrics,
                            online: None,
                            offline: Some(Message::new(
                                self.settings.topic("NDEATH"),
                                ndeath(bd_seq),
                            )),
                            shutdown: &shutdown,
                        },
                    )
                    .or(async {
                        match self.session(&mut st, &link, &gate, &in_rx, bd_seq).await {
                            Leave::NextServer => Ended::Lost(ClientError::Closed {
                                url: self.opts.url.clone(),
                            }),
                        }
                    })
                    .await;
                    st.live = false;
                    match ended {
                        Ended::Shutdown => return,
                        Ended::Lost(e) => {
                            log::warn!("sparkplug: connection lost ({e}); reconnecting")
                        }
                    }
                }
                Some(Err(ClientError::NoV5 { .. })) if version == Version::V5 => {
                    version = Version::V311;
                    continue;
                }
                Some(Err(e)) => {
                    if attempt < 3 || attempt.is_multiple_of(10) {
                        log::warn!("sparkplug: cannot connect (attempt {}): {e}", attempt + 1);
                    }
                }
            }
            if !backoff(&mut attempt, &shutdown).await {
                return;
            }
        }
    }

    async fn load_bd_seq(&self) -> u8 {
        let got = self
            .app
            .registry
            .store()
            .call(|db| db.meta_get(BD_SEQ_KEY))
            .await
            .and_then(|r| r);
        match got {
            Ok(v) => v.and_then(|v| v.parse::<u8>().ok()).unwrap_or(0),
            Err(e) => {
                log::warn!(
                    "{}",
                    SparkplugError::Meta {
                        key: BD_SEQ_KEY,
                        message: e.to_string()
                    }
                );
                0
            }
        }
    }

    async fn store_bd_seq(&self, next: u8) {
        let r = self
            .app
            .registry
            .store()
            .call(move |db| db.tx(|tx| tx.meta_set(BD_SEQ_KEY, &next.to_string())))
            .await
            .and_then(|r| r);
        if let Err(e) = r {
            log::warn!(
                "{}",
                SparkplugError::Meta {
                    key: BD_SEQ_KEY,
                    message: e.to_string()
                }
            );
        }
    }

    /// One connection's work: births, then feed and commands, until the
    /// host asks for the next server (shutdown and a lost connection end
    /// `serve`, which drops this).
    async fn session(
        &self,
        st: &mut State,
        link: &Link,
        gate: &ByteGate,
        incoming: &async_channel::Receiver<Incoming>,
        bd_seq: u8,
    ) -> Leave {
        st.live = false;
        let mut host_online = self.settings.primary_host_id.is_none();
        if host_online {
            self.birth(st, link, bd_seq).await;
        }
        loop {
            enum Next {
                In(Incoming),
                Feed(Feed),
            }
            let next = async { incoming.recv().await.ok().map(Next::In) }
                .or(async { self.feed.rx.recv().await.ok().map(Next::Feed) })
                .await;
            match next {
                None => return std::future::pending().await,
                Some(Next::In(m)) => {
                    // A command is bounded and handled at once, not queued.
                    gate.release(m.held);
                    if let Some(a) = m.ack {
                        link.ack(&[a]).await;
                    }
                    if self.settings.state_topic().as_deref() == Some(m.topic.as_str()) {
                        let online = host_state(&m.payload);
                        if online && !host_online {
                            log::info!("sparkplug: primary host online: birth");
                            host_online = true;
                            self.birth(st, link, bd_seq).await;
                        } else if !online && host_online {
                            log::info!("sparkplug: primary host offline: telemetry is kept for it");
                            host_online = false;
                            st.live = false;
                        }
                    } else if m.topic == self.settings.topic("NCMD") {
                        match self.node_command(&m.topic, &m.payload) {
                            Ok(NodeCommand::Rebirth) if host_online => {
                                log::info!("sparkplug: rebirth requested");
                                self.birth(st, link, bd_seq).await;
                            }
                            Ok(NodeCommand::NextServer) => {
                                log::info!("sparkplug: next server requested: reconnecting");
                                return Leave::NextServer;
                            }
                            Ok(_) => {}
                            Err(e) => log::warn!("{e}"),
                        }
                    } else if let Err(e) = self.device_command(st, link, &m.topic, &m.payload).await
                    {
                        log::warn!("{e}");
                    }
                }
                Some(Next::Feed(f)) => {
                    if !st.live {
                        // The next birth reads the store.
                        continue;
                    }
                    self.apply(st, link, f).await;
                }
            }
            if st.live && self.feed.lost.load(Ordering::Relaxed) {
                log::warn!(
                    "sparkplug: device changes came faster than the broker took them: rebirth"
                );
                self.birth(st, link, bd_seq).await;
            }
        }
    }

    fn next_seq(st: &mut State) -> u8 {
        let s = st.seq;
        st.seq = st.seq.wrapping_add(1);
        s
    }

    /// NBIRTH, a DBIRTH per device, then what the host missed (stored
    /// telemetry, historical), then DDEATH for devices that are offline.
    async fn birth(&self, st: &mut State, link: &Link, bd_seq: u8) {
        self.feed.lost.store(false, Ordering::Relaxed);
        let list = match self.app.devices.list().await {
            Ok(l) => l,
            Err(e) => {
                log::warn!("sparkplug: no birth, cannot read the devices: {e}");
                return;
            }
        };
        let status = self.app.status().await.unwrap_or_default();
        let count = |k: &str| Value::Int(status.get(k).and_then(|v| v.as_i64()).unwrap_or(0));
        let sync = &status["sync"];
        let sync_state = if !sync["enabled"].as_bool().unwrap_or(false) {
            "disabled"
        } else if sync["online"].as_bool().unwrap_or(false) {
            "online"
        } else {
            "offline"
        };
        let node: Vec<(&str, Value)> = vec![
            ("bdSeq", Value::Int(i64::from(bd_seq))),
            ("Node Control/Rebirth", Value::Bool(false)),
            ("Node Control/Next Server", Value::Bool(false)),
            (
                "Properties/Version",
                Value::Text(env!("CARGO_PKG_VERSION").into()),
            ),
            ("Properties/Uptime", count("uptime_seconds")),
            ("Properties/Services", count("services")),
            ("Properties/Devices", count("devices")),
            ("Properties/Sync State", Value::Text(sync_state.into())),
        ];
        let metrics: Vec<Metric<'_>> = node
            .iter()
            .map(|(n, v)| Metric {
                name: Some(n),
                alias: None,
                value: v,
                with_type: true,
                historical: false,
                timestamp: None,
            })
            .collect();
        st.seq = 0;
        let now = wall_millis();
        let seq = Self::next_seq(st);
        link.publish_qos0(Message::new(
            self.settings.topic("NBIRTH"),
            payload::encode(now, Some(seq), &metrics),
        ))
        .await;
        let mut seen = Vec::with_capacity(list.len());
        for v in list {
            let id = v.device.id.clone();
            if !self.settings.wants_type(&v.device.device_type) || !device_id_ok(&id) {
                continue;
            }
            seen.push(id.clone());
            // A device first seen now: all its stored telemetry is news.
            let mut d = st.devices.remove(&id).unwrap_or_default();
            d.set_props(&v.device);
            d.reset_values(v.last_telemetry.as_ref(), &self.settings);
            self.dbirth(st, link, &id, &mut d).await;
            if d.sent < v.telemetry_seq {
                self.replay(st, link, &id, &mut d).await;
            }
            d.sent = d.sent.max(v.telemetry_seq);
            if v.health == Health::Offline {
                self.ddeath(st, link, &id, &mut d).await;
            }
            st.devices.insert(id, d);
        }
        st.devices.retain(|id, _| seen.contains(id));
        st.live = true;
    }

    async fn dbirth(&self, st: &mut State, link: &Link, id: &str, d: &mut DeviceState) {
        let seq = Self::next_seq(st);
        let bytes = payload::encode(wall_millis(), Some(seq), &d.birth());
        d.born = true;
        link.publish_qos0(Message::new(
            self.settings.device_topic("DBIRTH", id),
            bytes,
        ))
        .await;
    }

    async fn ddeath(&self, st: &mut State, link: &Link, id: &str, d: &mut DeviceState) {
        if !d.born {
            return;
        }
        d.born = false;
        let seq = Self::next_seq(st);
        link.publish_qos0(Message::new(
            self.settings.device_topic("DDEATH", id),
            payload::encode(wall_millis(), Some(seq), &[]),
        ))
        .await;
    }

    /// The device's stored telemetry after `d.sent`, oldest first, as
    /// historical DDATA (one message per point, at its own time).
    async fn replay(&self, st: &mut State, link: &Link, id: &str, d: &mut DeviceState) {
        loop {
            let page = match self
                .app
                .devices
                .telemetry(id.to_owned(), d.sent, REPLAY_PAGE)
                .await
            {
                Ok(p) => p,
                Err(e) => {
                    log::warn!("sparkplug: device {id}: cannot read its history: {e}");
                    return;
                }
            };
            let full = page.len() == REPLAY_PAGE;
            for p in page {
                d.sent = p.seq;
                let values = d.historical(&p.values, &self.settings);
                if values.is_empty() {
                    continue;
                }
                let metrics: Vec<Metric<'_>> = values
                    .iter()
                    .map(|(alias, v)| Metric {
                        name: None,
                        alias: Some(*alias),
                        value: v,
                        with_type: false,
                        historical: true,
                        timestamp: Some(p.received_at_ms),
                    })
                    .collect();
                let seq = Self::next_seq(st);
                link.publish(Message::new(
                    self.settings.device_topic("DDATA", id),
                    payload::encode(wall_millis(), Some(seq), &metrics),
                ))
                .await;
            }
            if !full {
                return;
            }
        }
    }

    /// A committed change, live.
    async fn apply(&self, st: &mut State, link: &Link, f: Feed) {
        match f {
            Feed::Registered(dev) => {
                let id = dev.id.clone();
                if !self.settings.wants_type(&dev.device_type) || !device_id_ok(&id) {
                    if let Some(mut d) = st.devices.remove(&id) {
                        self.ddeath(st, link, &id, &mut d).await;
                    }
                    return;
                }
                let mut d = st.devices.remove(&id).unwrap_or_default();
                if d.set_props(&dev) || !d.born {
                    self.dbirth(st, link, &id, &mut d).await;
                }
                st.devices.insert(id, d);
            }
            Feed::Telemetry {
                device,
                seq,
                ts_ms,
                values,
            } => {
                let Some(mut d) = st.devices.remove(&device) else {
                    return;
                };
                if seq > d.sent {
                    if seq > d.sent + 1 {
                        // Points the feed lost: from the store, after a
                        // birth that brings the values up to date.
                        d.take(&values, &self.settings);
                        self.dbirth(st, link, &device, &mut d).await;
                        self.replay(st, link, &device, &mut d).await;
                    } else {
                        d.sent = seq;
                        match d.take(&values, &self.settings) {
                            Update::Birth => self.dbirth(st, link, &device, &mut d).await,
                            Update::None if d.born => {}
                            Update::None => self.dbirth(st, link, &device, &mut d).await,
                            Update::Data(names) if d.born => {
                                let s = Self::next_seq(st);
                                let bytes = payload::encode(
                                    wall_millis(),
                                    Some(s),
                                    &d.data(&names, false, ts_ms),
                                );
                                link.publish_qos0(Message::new(
                                    self.settings.device_topic("DDATA", &device),
                                    bytes,
                                ))
                                .await;
                            }
                            Update::Data(_) => self.dbirth(st, link, &device, &mut d).await,
                        }
                    }
                }
                st.devices.insert(device, d);
            }
            Feed::Offline { device } => {
                if let Some(d) = st.devices.get_mut(&device) {
                    let mut d = std::mem::take(d);
                    self.ddeath(st, link, &device, &mut d).await;
                    st.devices.insert(device, d);
                }
            }
        }
    }

    fn node_command(&self, topic: &str, bytes: &[u8]) -> Result<NodeCommand, SparkplugError> {
        let mut out = NodeCommand::Nothing;
        for c in payload::decode_command(topic, bytes)? {
            match (c.name.as_deref(), c.value) {
                (Some("Node Control/Rebirth"), Value::Bool(true)) => out = NodeCommand::Rebirth,
                (Some("Node Control/Next Server"), Value::Bool(true)) => {
                    return Ok(NodeCommand::NextServer)
                }
                (Some("Node Control/Rebirth" | "Node Control/Next Server"), _) => {}
                (name, _) => {
                    return Err(SparkplugError::Command {
                        topic: topic.to_owned(),
                        message: format!("unknown node metric {}", name.unwrap_or("(alias)")),
                    })
                }
            }
        }
        Ok(out)
    }

    /// DCMD -> `devices/{id}/command`: a JSON object of the metrics'
    /// values, by name. The device answers with telemetry (its next DDATA).
    async fn device_command(
        &self,
        st: &State,
        link: &Link,
        topic: &str,
        bytes: &[u8],
    ) -> Result<(), SparkplugError> {
        let bad = |message: String| SparkplugError::Command {
            topic: topic.to_owned(),
            message,
        };
        let prefix = self.settings.device_topic("DCMD", "");
        let id = topic
            .strip_prefix(&prefix)
            .ok_or_else(|| bad("not a topic of this node".into()))?;
        let d = st
            .devices
            .get(id)
            .ok_or_else(|| bad(format!("device {id} is not one of this node's")))?;
        let mut body = serde_json::Map::new();
        for c in payload::decode_command(topic, bytes)? {
            let name = d
                .name_of(c.name.as_deref(), c.alias)
                .ok_or_else(|| bad(format!("alias {:?} is not one of device {id}'s", c.alias)))?;
            body.insert(name, c.value.to_json());
        }
        link.publish(Message::new(
            format!("devices/{id}/command"),
            serde_json::Value::Object(body).to_string(),
        ))
        .await;
        Ok(())
    }
}

enum NodeCommand {
    Nothing,
    Rebirth,
    NextServer,
}

/// The NDEATH payload: the bdSeq its NBIRTH carries, no seq.
fn ndeath(bd_seq: u8) -> Vec<u8> {
    let v = Value::Int(i64::from(bd_seq));
    payload::encode(
        wall_millis(),
        None,
        &[Metric {
            name: Some("bdSeq"),
            alias: None,
            value: &v,
            with_type: true,
            historical: false,
            timestamp: None,
        }],
    )
}

/// Sparkplug 3.0 STATE: `{"online": bool, "timestamp": ms}`. Anything
/// else reads as offline: births wait for a clear online.
fn host_state(payload: &[u8]) -> bool {
    serde_json::from_slice::<serde_json::Value>(payload)
        .ok()
        .and_then(|v| v.get("online")?.as_bool())
        .unwrap_or(false)
}
