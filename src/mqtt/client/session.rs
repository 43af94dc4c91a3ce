//! One connection to the broker: TCP (and TLS), CONNECT/CONNACK, then
//! [`serve`] runs the reader, the writer and the keep-alive as one future
//! until the connection fails or shutdown has said goodbye. Everything is
//! an async-io future on the executor; the writer owns the socket's write
//! half and takes byte buffers from a bounded channel, so a reader that
//! answers (PUBCOMP) and ingest that acknowledges never write concurrently.

use std::net::ToSocketAddrs;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_io::{Async, Timer};
use rustls::pki_types::ServerName;
use smol::future::FutureExt;
use smol::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use super::codec::{self, Connect, Packet};
use super::link::{Delivery, Link, Message};
use super::{Ack, ClientError, Version};
use crate::metrics::Metrics;
use crate::support::Shutdown;

/// Logs under the bridge's name: journal filters and alerts match on it.
const LOG_TARGET: &str = "konsul_edge::mqtt::bridge";

/// Byte buffers waiting for the writer (each is one or many packets).
const WRITE_QUEUE: usize = 256;
const SUBSCRIBE_ID: u16 = 1;
/// How long shutdown waits for acks, the offline status and DISCONNECT.
pub(crate) const GOODBYE: Duration = Duration::from_secs(2);
/// An empty buffer tells the writer to flush and stop.
const CLOSE: Vec<u8> = Vec::new();

pub(crate) trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

/// A message for ingest.
#[derive(Debug)]
pub(crate) struct Incoming {
    pub(crate) topic: String,
    pub(crate) payload: Vec<u8>,
    /// What the broker is owed once the message is committed (QoS 1/2).
    pub(crate) ack: Option<Ack>,
    /// The broker sent it before (DUP): it may be stored already.
    pub(crate) dup: bool,
    /// Bytes taken from the ingest gate for it, given back once ingest
    /// has committed it.
    pub(crate) held: usize,
}

/// How to reach the broker and what to say on connect.
pub(crate) struct Options {
    pub(crate) url: String,
    pub(crate) host: String,
    pub(crate) port: u16,
    pub(crate) tls: Option<Arc<rustls::ClientConfig>>,
    pub(crate) connect: Connect,
    pub(crate) filters: Vec<(String, u8)>,
    /// Incoming packets larger than this end the connection.
    pub(crate) max_packet: usize,
    pub(crate) timeout: Duration,
}

/// `scheme://host[:port]` -> (host, port, TLS). WebSockets are not
/// spoken; the configuration refuses them before this runs.
pub(crate) fn parse_url(url: &str) -> Result<(String, u16, bool), ClientError> {
    let bad = |message: &str| ClientError::Url {
        url: url.into(),
        message: message.into(),
    };
    let (scheme, rest) = url.split_once("://").ok_or_else(|| bad("not a URL"))?;
    let (tls, default_port) = match scheme {
        "mqtt" | "tcp" => (false, 1883),
        "mqtts" | "ssl" => (true, 8883),
        _ => {
            return Err(bad(
                "only mqtt:// (tcp://) and mqtts:// (ssl://) brokers are supported",
            ))
        }
    };
    let authority = rest.split('/').next().unwrap_or_default();
    let (host, port) = match authority.rsplit_once(':') {
        Some((h, p)) if !h.ends_with(':') && (!h.contains(':') || h.starts_with('[')) => {
            (h, p.parse().map_err(|_| bad("the port is not a number"))?)
        }
        _ => (authority, default_port),
    };
    let host = host.trim_start_matches('[').trim_end_matches(']');
    if host.is_empty() {
        return Err(bad("no host"));
    }
    Ok((host.to_owned(), port, tls))
}

/// A connection the broker accepted.
pub(crate) struct Connection {
    io: Box<dyn Io>,
    reader: PacketReader,
    pub(crate) version: Version,
    pub(crate) session_present: bool,
    receive_maximum: usize,
}

/// Connects, sends CONNECT and waits for CONNACK, all within
/// `opts.timeout`. [`ClientError::NoV5`]: retry with 3.1.1.
pub(crate) async fn connect(opts: &Options, version: Version) -> Result<Connection, ClientError> {
    let url = &opts.url;
    let work = async {
        let mut io = open(opts).await?;
        let mut bytes = Vec::new();
        Packet::Connect(Box::new(opts.connect.clone())).encode(version, &mut bytes);
        write(&mut io, &bytes, url).await?;
        let mut reader = PacketReader::default();
        match reader.next(&mut io, version, opts.max_packet, url).await? {
            Packet::ConnAck {
                session_present,
                code: 0,
                receive_maximum,
            } => Ok(Connection {
                io,
                reader,
                version,
                session_present,
                receive_maximum: usize::from(receive_maximum.unwrap_or(u16::MAX)),
            }),
            // 3.1.1's "unacceptable protocol version", 5's "unsupported".
            Packet::ConnAck {
                code: 0x01 | 0x84, ..
            } if version == Version::V5 => Err(ClientError::NoV5 { url: url.clone() }),
            Packet::ConnAck { code, .. } => Err(ClientError::Refused {
                url: url.clone(),
                code,
            }),
            other => Err(ClientError::Protocol {
                url: url.clone(),
                what: format!("expected CONNACK, got {other:?}"),
            }),
        }
    };
    work.or(timeout(opts.timeout, url, "CONNACK")).await
}

async fn open(opts: &Options) -> Result<Box<dyn Io>, ClientError> {
    let url = &opts.url;
    let io_err = |what, source| ClientError::Io {
        url: url.clone(),
        what,
        source,
    };
    let lookup = (opts.host.clone(), opts.port);
    // getaddrinfo blocks: keep it off the executor.
    let addrs = smol::unblock(move || lookup.to_socket_addrs().map(|a| a.collect::<Vec<_>>()))
        .await
        .map_err(|e| io_err("cannot resolve", e))?;
    let mut last = std::io::Error::new(std::io::ErrorKind::NotFound, "no address");
    let mut tcp = None;
    for a in addrs {
        match Async::<std::net::TcpStream>::connect(a).await {
            Ok(s) => {
                tcp = Some(s);
                break;
            }
            Err(e) => last = e,
        }
    }
    let tcp = tcp.ok_or_else(|| io_err("cannot connect", last))?;
    // Acks are small and latency matters more than packet count.
    let _ = tcp.get_ref().set_nodelay(true);
    let Some(tls) = &opts.tls else {
        return Ok(Box::new(tcp));
    };
    let name = ServerName::try_from(opts.host.clone()).map_err(|_| ClientError::Url {
        url: url.clone(),
        message: "not a valid TLS server name".into(),
    })?;
    let stream = futures_rustls::TlsConnector::from(tls.clone())
        .connect(name, tcp)
        .await
        .map_err(|e| io_err("TLS handshake failed", e))?;
    Ok(Box::new(stream))
}

async fn write<W: AsyncWrite + Unpin>(
    w: &mut W,
    bytes: &[u8],
    url: &str,
) -> Result<(), ClientError> {
    let e = |source| ClientError::Io {
        url: url.into(),
        what: "write",
        source,
    };
    w.write_all(bytes).await.map_err(e)?;
    w.flush().await.map_err(e)
}

async fn timeout<T>(after: Duration, url: &str, what: &'static str) -> Result<T, ClientError> {
    Timer::after(after).await;
    Err(ClientError::Timeout {
        url: url.into(),
        what,
        secs: after.as_secs(),
    })
}

/// Reads whole packets from a byte stream.
#[derive(Default)]
struct PacketReader {
    buf: Vec<u8>,
    start: usize,
}

impl PacketReader {
    async fn next<R: AsyncRead + Unpin>(
        &mut self,
        io: &mut R,
        version: Version,
        max: usize,
        url: &str,
    ) -> Result<Packet, ClientError> {
        loop {
            match codec::decode_packet(&self.buf[self.start..], version, max) {
                Ok(Some((p, n))) => {
                    self.start += n;
                    return Ok(p);
                }
                Ok(None) => {}
                Err(source) => {
                    return Err(ClientError::Codec {
                        url: url.into(),
                        source,
                    })
                }
            }
            // What is left is part of one packet: move it to the front.
            self.buf.drain(..self.start);
            self.start = 0;
            let old = self.buf.len();
            self.buf.resize(old + (64 << 10), 0);
            let n = io
                .read(&mut self.buf[old..])
                .await
                .map_err(|source| ClientError::Io {
                    url: url.into(),
                    what: "read",
                    source,
                })?;
            self.buf.truncate(old + n);
            if n == 0 {
                return Err(ClientError::Closed { url: url.into() });
            }
        }
    }
}

/// How a connection ended.
pub(crate) enum Ended {
    /// Shutdown: goodbye said (or its time ran out).
    Shutdown,
    Lost(ClientError),
}

/// What [`serve`] needs besides the connection.
pub(crate) struct Serve<'a> {
    pub(crate) opts: &'a Options,
    pub(crate) link: &'a Link,
    pub(crate) incoming: &'a async_channel::Sender<Incoming>,
    pub(crate) gate: &'a crate::mqtt::gate::ByteGate,
    pub(crate) metrics: &'a Metrics,
    /// Published once subscribed (the bridge's retained status); none for
    /// a client that publishes its own (the Sparkplug node's births).
    pub(crate) online: Option<Message>,
    /// Published before a clean disconnect, which fires no will.
    pub(crate) offline: Option<Message>,
    pub(crate) shutdown: &'a Shutdown,
}

/// Runs a connection: subscribes, publishes `online`, hands messages to
/// ingest and sends what the link queues, until the connection fails or
/// shutdown. On shutdown: stops taking messages, waits (bounded) for
/// ingest to acknowledge what it has, publishes `offline` (a clean
/// disconnect fires no will) and disconnects.
pub(crate) async fn serve(c: Connection, s: Serve<'_>) -> Ended {
    let Connection {
        io,
        mut reader,
        version,
        session_present,
        receive_maximum,
    } = c;
    let url = &s.opts.url;
    let (mut rd, mut wr) = smol::io::split(io);
    let (wtx, wrx) = async_channel::bounded::<Vec<u8>>(WRITE_QUEUE);
    s.link
        .attach(wtx.clone(), version, session_present, receive_maximum);
    let mut sub = Vec::new();
    Packet::Subscribe {
        id: SUBSCRIBE_ID,
        filters: s.opts.filters.clone(),
    }
    .encode(version, &mut sub);
    let _ = wtx.send(sub).await;
    let (sub_tx, sub_rx) = async_channel::bounded::<Vec<u8>>(1);
    let start = Instant::now();
    // Milliseconds since `start` of the last packet read.
    let last_rx = AtomicU64::new(0);
    // The reader waits for room in ingest's queue: silence is ours.
    let blocked = AtomicBool::new(false);
    let stopping = AtomicBool::new(false);
    let keep_alive = Duration::from_secs(u64::from(s.opts.connect.keep_alive.max(1)));

    let read = async {
        loop {
            let p = reader
                .next(&mut rd, version, s.opts.max_packet, url)
                .await?;
            last_rx.store(start.elapsed().as_millis() as u64, Ordering::Relaxed);
            let reply = |p: Packet| {
                let mut b = Vec::new();
                p.encode(version, &mut b);
                b
            };
            match p {
                Packet::Publish(p) => {
                    if stopping.load(Ordering::Relaxed) {
                        // Not acknowledged: the broker keeps it for the
                        // next session.
                        continue;
                    }
                    let ack = match p.id {
                        None => None,
                        Some(id) => match s.link.received(id, p.qos) {
                            Delivery::Ingest(a) => Some(a),
                            Delivery::Drop => continue,
                            Delivery::Rec => {
                                let _ = wtx.send(reply(Packet::PubRec(id))).await;
                                continue;
                            }
                        },
                    };
                    blocked.store(true, Ordering::Relaxed);
                    let held = s.gate.acquire(p.payload.len()).await;
                    s.metrics.mqtt.ingest_queued(s.gate.used());
                    let sent = s
                        .incoming
                        .send(Incoming {
                            topic: p.topic,
                            payload: p.payload,
                            ack,
                            dup: p.dup,
                            held,
                        })
                        .await;
                    blocked.store(false, Ordering::Relaxed);
                    if sent.is_err() {
                        s.gate.release(held);
                    }
                    last_rx.store(start.elapsed().as_millis() as u64, Ordering::Relaxed);
                    if sent.is_err() {
                        return Err(ClientError::Closed { url: url.clone() });
                    }
                }
                Packet::PubAck(id) => s.link.puback(id),
                // We publish at QoS 1 only; finish the exchange anyway.
                Packet::PubRec(id) => {
                    let _ = wtx.send(reply(Packet::PubRel(id))).await;
                }
                Packet::PubRel(id) => {
                    s.link.released(id);
                    let _ = wtx.send(reply(Packet::PubComp(id))).await;
                }
                Packet::SubAck { codes, .. } => {
                    let _ = sub_tx.try_send(codes);
                }
                Packet::PubComp(_) | Packet::PingResp | Packet::UnsubAck(_) => {}
                Packet::Disconnect { reason } => {
                    return Err(ClientError::Protocol {
                        url: url.clone(),
                        what: format!("the broker sent DISCONNECT (reason {reason:#04x})"),
                    })
                }
                other => {
                    return Err(ClientError::Protocol {
                        url: url.clone(),
                        what: format!("unexpected {other:?}"),
                    })
                }
            }
        }
    };
    let write = async {
        while let Ok(mut bytes) = wrx.recv().await {
            let mut close = bytes.is_empty();
            while !close {
                match wrx.try_recv() {
                    Ok(more) if more.is_empty() => close = true,
                    Ok(more) => bytes.extend_from_slice(&more),
                    Err(_) => break,
                }
            }
            write(&mut wr, &bytes, url).await?;
            if close {
                let _ = wr.close().await;
                return Ok(());
            }
        }
        Ok(())
    };
    let ping = async {
        let mut ping = Vec::new();
        Packet::PingReq.encode(version, &mut ping);
        loop {
            Timer::after(keep_alive / 2).await;
            let silent = start
                .elapsed()
                .saturating_sub(Duration::from_millis(last_rx.load(Ordering::Relaxed)));
            if silent > keep_alive * 3 / 2 && !blocked.load(Ordering::Relaxed) {
                return Err(ClientError::Timeout {
                    url: url.clone(),
                    what: "answer to PINGREQ",
                    secs: silent.as_secs(),
                });
            }
            let _ = wtx.send(ping.clone()).await;
        }
    };
    let up = async {
        let codes = async { Ok(sub_rx.recv().await.unwrap_or_default()) }
            .or(timeout(s.opts.timeout, url, "SUBACK"))
            .await?;
        if codes.iter().any(|c| *c >= 0x80) {
            log::warn!(
                target: LOG_TARGET,
                "the broker refused some subscriptions ({:?} -> {codes:?})",
                s.opts.filters
            );
        }
        s.metrics.mqtt.connected.store(1, Ordering::Relaxed);
        s.metrics.mqtt.connects.fetch_add(1, Ordering::Relaxed);
        log::info!(
            target: LOG_TARGET,
            "connected to {url} as {} (MQTT {}, session present: {session_present}), subscribed to {}",
            s.opts.connect.client_id,
            if version == Version::V5 { "5" } else { "3.1.1" },
            s.opts
                .filters
                .iter()
                .map(|(f, q)| format!("{f} (QoS {q})"))
                .collect::<Vec<_>>()
                .join(", ")
        );
        if let Some(online) = &s.online {
            s.link.publish(online.clone()).await;
            s.metrics.mqtt.published(crate::metrics::Published::Status);
        }
        std::future::pending::<Result<(), ClientError>>().await
    };
    let stop = async {
        s.shutdown.wait().await;
        Ok(())
    };
    smol::pin!(read, write, ping);
    let first = read
        .as_mut()
        .or(write.as_mut())
        .or(ping.as_mut())
        .or(up.or(stop))
        .await;
    s.metrics.mqtt.connected.store(0, Ordering::Relaxed);
    if let Err(e) = first {
        s.link.detach();
        return Ended::Lost(e);
    }
    stopping.store(true, Ordering::Relaxed);
    let goodbye = async {
        s.link
            .drained()
            .or(async {
                Timer::after(GOODBYE).await;
            })
            .await;
        if let Some(offline) = &s.offline {
            s.link.publish(offline.clone()).await;
        }
        s.link.flushed().await;
        let mut bytes = Vec::new();
        Packet::Disconnect { reason: 0 }.encode(version, &mut bytes);
        let _ = wtx.send(bytes).await;
        let _ = wtx.send(CLOSE).await;
        std::future::pending::<Result<(), ClientError>>().await
    };
    let _ = write
        .as_mut()
        .or(read.as_mut())
        .or(goodbye.or(async {
            Timer::after(GOODBYE * 2).await;
            Ok(())
        }))
        .await;
    s.link.detach();
    log::info!(target: LOG_TARGET, "disconnected from {url}");
    Ended::Shutdown
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn broker_urls() {
        assert_eq!(
            parse_url("mqtt://h:1884").unwrap(),
            ("h".into(), 1884, false)
        );
        assert_eq!(parse_url("tcp://h").unwrap(), ("h".into(), 1883, false));
        assert_eq!(parse_url("mqtts://h").unwrap(), ("h".into(), 8883, true));
        assert_eq!(parse_url("ssl://[::1]:9").unwrap(), ("::1".into(), 9, true));
        assert!(parse_url("ws://h:80/mqtt").is_err());
        assert!(parse_url("mqtt://h:x").is_err());
        assert!(parse_url("h:1883").is_err());
    }
}
