//! The session state that outlives one connection, shared by the
//! connection, the publisher and ingest. A std mutex guards it, held only
//! for a few map operations and never across an await; waiting (for a
//! connection, for a free packet id) is on an [`Event`].
//!
//! Connections are numbered: an [`Ack`] carries the number of the
//! connection its message came in on, and acks for an older connection
//! are dropped. Packet ids belong to a connection's exchange, and the
//! broker re-sends what the old connection left unacknowledged.

use std::collections::{HashMap, VecDeque};
use std::sync::{Mutex, MutexGuard};

use event_listener::Event;

use super::codec::{Packet, Publish};
use super::Version;

/// Outgoing QoS 1 publishes awaiting PUBACK at most, unless the broker's
/// receive maximum is lower.
pub(crate) const MAX_INFLIGHT: usize = 64;

/// An outgoing message; everything we publish is QoS 1.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Message {
    pub(crate) topic: String,
    pub(crate) payload: Vec<u8>,
    pub(crate) retain: bool,
}

impl Message {
    pub(crate) fn new(topic: impl Into<String>, payload: impl Into<Vec<u8>>) -> Message {
        Message {
            topic: topic.into(),
            payload: payload.into(),
            retain: false,
        }
    }

    fn packet(&self, id: u16, dup: bool) -> Packet {
        Packet::Publish(Publish {
            dup,
            qos: 1,
            retain: self.retain,
            topic: self.topic.clone(),
            id: Some(id),
            payload: self.payload.clone(),
        })
    }
}

/// The acknowledgement an incoming QoS 1/2 message is owed once committed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Ack {
    pub(crate) id: u16,
    /// PUBREC (QoS 2) rather than PUBACK (QoS 1).
    pub(crate) rec: bool,
    pub(crate) conn: u64,
}

/// What the broker is owed for a QoS 2 packet id.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Received {
    /// Handed to ingest, not committed yet: a re-sent PUBLISH is dropped.
    Pending,
    /// Committed and PUBRECed: a re-sent PUBLISH gets another PUBREC.
    Recorded,
}

#[derive(Default)]
struct State {
    conn: u64,
    writer: Option<async_channel::Sender<Vec<u8>>>,
    version: Option<Version>,
    max_inflight: usize,
    inflight: VecDeque<(u16, Message)>,
    next_id: u16,
    qos2: HashMap<u16, Received>,
    /// QoS 1/2 messages of this connection handed to ingest and not yet
    /// acknowledged.
    unacked: usize,
}

#[derive(Default)]
pub(crate) struct Link {
    state: Mutex<State>,
    changed: Event,
}

impl Link {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding it cannot leave the maps half-updated in a
        // way that matters more than stopping would.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A new connection is up: returns its number. Unacknowledged
    /// publishes are queued on `writer` first (with DUP if the broker kept
    /// the session), before anything else can be.
    pub(crate) fn attach(
        &self,
        writer: async_channel::Sender<Vec<u8>>,
        version: Version,
        session_present: bool,
        max_inflight: usize,
    ) -> u64 {
        let mut s = self.lock();
        s.conn += 1;
        s.version = Some(version);
        s.max_inflight = max_inflight.clamp(1, MAX_INFLIGHT);
        s.unacked = 0;
        if session_present {
            // Released by the broker's PUBREL, which it re-sends.
            s.qos2.retain(|_, r| *r == Received::Recorded);
        } else {
            s.qos2.clear();
        }
        let mut resend = Vec::new();
        for (id, m) in &s.inflight {
            m.packet(*id, session_present).encode(version, &mut resend);
        }
        if !resend.is_empty() {
            // The channel is new and empty: this cannot fail for lack of room.
            let _ = writer.try_send(resend);
        }
        s.writer = Some(writer);
        let conn = s.conn;
        drop(s);
        self.changed.notify(usize::MAX);
        conn
    }

    /// The connection is gone; publishes wait for the next one.
    pub(crate) fn detach(&self) {
        self.lock().writer = None;
        self.changed.notify(usize::MAX);
    }

    /// Publishes `m` at QoS 1: waits (asynchronously) for a connection and
    /// a free slot in the window, then hands it to the writer. It stays
    /// until its PUBACK, re-sent after every reconnect.
    pub(crate) async fn publish(&self, m: Message) {
        let mut m = Some(m);
        loop {
            match self.try_publish(&mut m) {
                Ok((w, bytes)) => {
                    // Fails only if the connection just died: the message
                    // is in `inflight` and goes out again on the next one.
                    let _ = w.send(bytes).await;
                    return;
                }
                Err(listener) => listener.await,
            }
        }
    }

    /// Publishes `m` at QoS 0: waits (asynchronously) for a connection and
    /// hands it to the writer, whose bounded queue is the back-pressure.
    /// Nothing is kept: a message the connection loses is gone, which is
    /// what Sparkplug asks of births and data (a new connection births
    /// again) and what lets them past the broker's QoS 1 window.
    #[cfg_attr(not(feature = "sparkplug"), allow(dead_code))]
    pub(crate) async fn publish_qos0(&self, m: Message) {
        loop {
            let ready = {
                let s = self.lock();
                match (&s.writer, s.version) {
                    (Some(w), Some(v)) => Ok((w.clone(), v)),
                    _ => Err(self.changed.listen()),
                }
            };
            match ready {
                Ok((w, v)) => {
                    let mut bytes = Vec::new();
                    Packet::Publish(Publish {
                        dup: false,
                        qos: 0,
                        retain: m.retain,
                        topic: m.topic,
                        id: None,
                        payload: m.payload,
                    })
                    .encode(v, &mut bytes);
                    let _ = w.send(bytes).await;
                    return;
                }
                Err(listener) => listener.await,
            }
        }
    }

    /// Takes `m` into the window if there is a connection and room: the
    /// writer and the bytes to send; else something to wait on.
    #[allow(clippy::type_complexity)]
    fn try_publish(
        &self,
        m: &mut Option<Message>,
    ) -> Result<(async_channel::Sender<Vec<u8>>, Vec<u8>), event_listener::EventListener> {
        let mut s = self.lock();
        match (&s.writer, s.version, m.take()) {
            (Some(w), Some(v), Some(msg)) if s.inflight.len() < s.max_inflight => {
                let w = w.clone();
                let id = next_id(&mut s);
                let mut bytes = Vec::new();
                msg.packet(id, false).encode(v, &mut bytes);
                s.inflight.push_back((id, msg));
                Ok((w, bytes))
            }
            (_, _, msg) => {
                *m = msg;
                Err(self.changed.listen())
            }
        }
    }

    /// Waits until every publish has been acknowledged by the broker.
    pub(crate) async fn flushed(&self) {
        loop {
            let listener = {
                if self.lock().inflight.is_empty() {
                    return;
                }
                self.changed.listen()
            };
            listener.await;
        }
    }

    pub(crate) fn puback(&self, id: u16) {
        let mut s = self.lock();
        if let Some(i) = s.inflight.iter().position(|(i, _)| *i == id) {
            s.inflight.remove(i);
            drop(s);
            self.changed.notify(usize::MAX);
        }
    }

    /// The reader got a QoS 1/2 message for ingest on connection `conn`.
    /// For QoS 2: whether to hand it on, and whether to re-send PUBREC
    /// instead (a duplicate of a message already recorded).
    pub(crate) fn received(&self, id: u16, qos: u8) -> Delivery {
        let mut s = self.lock();
        if qos == 2 {
            match s.qos2.get(&id) {
                Some(Received::Pending) => return Delivery::Drop,
                Some(Received::Recorded) => return Delivery::Rec,
                None => {
                    s.qos2.insert(id, Received::Pending);
                }
            }
        }
        s.unacked += 1;
        Delivery::Ingest(Ack {
            id,
            rec: qos == 2,
            conn: s.conn,
        })
    }

    /// PUBREL: the broker will not re-send this QoS 2 message.
    pub(crate) fn released(&self, id: u16) {
        self.lock().qos2.remove(&id);
    }

    /// Ingest committed the messages these acks belong to: sends the
    /// PUBACKs and PUBRECs (one write) if their connection still stands.
    pub(crate) async fn ack(&self, acks: &[Ack]) {
        if acks.is_empty() {
            return;
        }
        let Some((writer, bytes)) = self.encode_acks(acks) else {
            return;
        };
        self.changed.notify(usize::MAX);
        if !bytes.is_empty() {
            // Err: that connection just died; the broker re-sends.
            let _ = writer.send(bytes).await;
        }
    }

    fn encode_acks(&self, acks: &[Ack]) -> Option<(async_channel::Sender<Vec<u8>>, Vec<u8>)> {
        let mut s = self.lock();
        let (Some(w), Some(v)) = (s.writer.clone(), s.version) else {
            return None;
        };
        let conn = s.conn;
        let mut bytes = Vec::with_capacity(4 * acks.len());
        let mut n = 0;
        for a in acks.iter().filter(|a| a.conn == conn) {
            n += 1;
            if a.rec {
                s.qos2.insert(a.id, Received::Recorded);
                Packet::PubRec(a.id).encode(v, &mut bytes);
            } else {
                Packet::PubAck(a.id).encode(v, &mut bytes);
            }
        }
        s.unacked = s.unacked.saturating_sub(n);
        Some((w, bytes))
    }

    /// Waits until ingest has acknowledged everything this connection
    /// handed it.
    pub(crate) async fn drained(&self) {
        loop {
            let listener = {
                if self.lock().unacked == 0 {
                    return;
                }
                self.changed.listen()
            };
            listener.await;
        }
    }
}

/// What the reader does with an incoming QoS 1/2 PUBLISH.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Delivery {
    Ingest(Ack),
    Drop,
    Rec,
}

/// The next packet id not in flight (1..=65535; 0 is not an id).
fn next_id(s: &mut State) -> u16 {
    loop {
        s.next_id = s.next_id.checked_add(1).unwrap_or(1);
        let id = s.next_id;
        if !s.inflight.iter().any(|(i, _)| *i == id) {
            return id;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn acks_for_an_old_connection_are_dropped_and_qos2_duplicates_are_not_ingested_twice() {
        smol::block_on(async {
            let link = Link::default();
            let (tx, rx) = async_channel::bounded(16);
            link.attach(tx.clone(), Version::V311, false, 10);
            let Delivery::Ingest(a) = link.received(7, 2) else {
                panic!("first delivery is ingested")
            };
            assert_eq!(link.received(7, 2), Delivery::Drop, "pending duplicate");
            link.ack(&[a]).await;
            assert_eq!(rx.try_recv().unwrap(), vec![0x50, 2, 0, 7], "PUBREC 7");
            assert_eq!(link.received(7, 2), Delivery::Rec, "recorded duplicate");
            link.released(7);
            let Delivery::Ingest(b) = link.received(8, 1) else {
                panic!("QoS 1 is ingested")
            };
            link.attach(tx, Version::V311, true, 10);
            link.ack(&[b]).await;
            assert!(rx.try_recv().is_err(), "ack for the old connection dropped");
        });
    }

    #[test]
    fn qos0_publishes_take_no_window_and_are_not_resent() {
        smol::block_on(async {
            let link = Link::default();
            let (tx, rx) = async_channel::bounded(16);
            link.attach(tx.clone(), Version::V311, false, 1);
            for _ in 0..3 {
                link.publish_qos0(Message::new("a", "1")).await;
            }
            for _ in 0..3 {
                assert_eq!(rx.try_recv().unwrap(), vec![0x30, 4, 0, 1, b'a', b'1']);
            }
            link.flushed().await;
            link.attach(tx, Version::V311, true, 1);
            assert!(rx.try_recv().is_err(), "nothing re-sent");
        });
    }

    #[test]
    fn unacknowledged_publishes_are_resent_with_dup_after_reconnect() {
        smol::block_on(async {
            let link = Link::default();
            let (tx, rx) = async_channel::bounded(16);
            link.attach(tx.clone(), Version::V311, false, 10);
            link.publish(Message::new("a", "1")).await;
            link.publish(Message::new("b", "2")).await;
            let first = rx.try_recv().unwrap();
            assert_eq!(first[0], 0x32, "QoS 1, no DUP");
            rx.try_recv().unwrap();
            link.puback(1);
            link.attach(tx, Version::V311, true, 10);
            let again = rx.try_recv().unwrap();
            assert_eq!(again[0], 0x3a, "QoS 1 with DUP");
            assert_eq!(&again[2..5], &[0, 1, b'b'], "only the unacknowledged one");
        });
    }
}
