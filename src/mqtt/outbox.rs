//! Everything the bridge publishes goes through one bounded queue, drained
//! by [`Outbox::run`] into the client's [`Link`] (QoS 1, re-sent until the
//! broker acknowledges it). The queue keeps the executor's callers from
//! ever waiting on the broker:
//! - [`Outbox::reply`] (acks and errors to devices) never waits: when the
//!   queue is full the reply is dropped and counted
//!   (`konsul_edge_mqtt_replies_dropped_total`). A device that gets no ack
//!   re-sends; a flood of bad input must not cost more than a full queue.
//! - [`Outbox::send`] (alerts, firmware offers) waits asynchronously for
//!   room: they are few, and losing one would mislead an operator.
//!
//! While the broker is away the drain waits for a connection and the
//! queue fills: replies are then dropped and counted, sends wait. The
//! online/offline status does not use this queue (the connection publishes
//! it itself), so a full queue cannot hold up a connect.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use smol::future::FutureExt;

use super::client::{Link, Message};
use crate::metrics::{Metrics, Published};
use crate::support::Shutdown;

/// Messages waiting for the broker's window.
const QUEUE: usize = 1024;

struct Outgoing {
    what: Published,
    msg: Message,
}

#[derive(Clone)]
pub(crate) struct Outbox {
    tx: async_channel::Sender<Outgoing>,
    rx: async_channel::Receiver<Outgoing>,
    metrics: Arc<Metrics>,
}

impl Outbox {
    pub(crate) fn new(metrics: Arc<Metrics>) -> Outbox {
        let (tx, rx) = async_channel::bounded(QUEUE);
        Outbox { tx, rx, metrics }
    }

    /// Drains the queue into `link` until shutdown.
    pub(crate) async fn run(&self, link: &Link, shutdown: &Shutdown) {
        loop {
            let next = async { self.rx.recv().await.ok() }
                .or(async {
                    shutdown.wait().await;
                    None
                })
                .await;
            let Some(o) = next else { return };
            let sent = async {
                link.publish(o.msg).await;
                true
            }
            .or(async {
                shutdown.wait().await;
                false
            })
            .await;
            if !sent {
                return;
            }
            self.metrics.mqtt.published(o.what);
        }
    }

    /// An ack or error for a device: queued if there is room, else dropped
    /// and counted. Never waits.
    pub(crate) fn reply(&self, what: Published, msg: Message) {
        if self.tx.try_send(Outgoing { what, msg }).is_err() {
            self.metrics
                .mqtt
                .replies_dropped
                .fetch_add(1, Ordering::Relaxed);
        }
    }

    /// An alert or offer: waits (asynchronously) for room.
    pub(crate) async fn send(&self, what: Published, msg: Message) {
        if self.tx.send(Outgoing { what, msg }).await.is_err() {
            self.metrics
                .mqtt
                .publish_failed
                .fetch_add(1, Ordering::Relaxed);
        }
    }
}
