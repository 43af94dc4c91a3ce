//! Everything the bridge publishes leaves through one thread of its own,
//! `mqtt-publish`, fed by a bounded queue. Why a thread: every call into
//! Paho takes Paho's one process-wide mutex, and Paho's receive thread
//! holds that mutex while it runs our message callback, which waits when
//! ingest is behind. A publish made on the executor would then wait for the
//! receive thread, which waits for ingest, which runs on the executor: the
//! reply-flood deadlock. Here only this thread waits for Paho, and the
//! executor only ever puts a message in the queue.
//!
//! Two ways in:
//! - [`Outbox::reply`] (acks and errors to devices) never waits: when the
//!   queue is full the reply is dropped and counted
//!   (`konsul_edge_mqtt_replies_dropped_total`). A device that gets no ack
//!   re-sends; a flood of bad input must not cost more than a full queue.
//! - [`Outbox::send`] (status, alerts, firmware offers) waits asynchronously
//!   for room: they are few, and losing one would mislead an operator.
//!
//! Paho bounds what it holds itself (`max_buffered_messages`, oldest
//! dropped), so this thread hands messages over without tracking them.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use paho_mqtt as paho;

use crate::metrics::{Metrics, Published};

/// Messages waiting for the publish thread.
const QUEUE: usize = 1024;

struct Outgoing {
    what: Published,
    msg: paho::Message,
}

/// The executor's side of the publish thread. Dropping every clone ends the
/// thread once the queue is empty.
#[derive(Clone)]
pub(crate) struct Outbox {
    tx: async_channel::Sender<Outgoing>,
    metrics: Arc<Metrics>,
}

impl Outbox {
    /// Starts the publish thread.
    pub(crate) fn start(
        client: paho::AsyncClient,
        metrics: Arc<Metrics>,
    ) -> std::io::Result<Outbox> {
        let (tx, rx) = async_channel::bounded::<Outgoing>(QUEUE);
        let m = metrics.clone();
        std::thread::Builder::new()
            .name("mqtt-publish".into())
            .spawn(move || {
                while let Ok(o) = rx.recv_blocking() {
                    // The delivery token is dropped: nothing waits for a
                    // PUBACK, Paho retries on its own.
                    match client.try_publish(o.msg) {
                        Ok(_) => m.mqtt.published(o.what),
                        Err(e) => {
                            m.mqtt.publish_failed.fetch_add(1, Ordering::Relaxed);
                            log::debug!("publish failed: {e}");
                        }
                    }
                }
                // The last clone of the client may be this one: Paho's
                // destroy takes its mutex, so it must not run on the
                // executor either.
                drop(client);
            })?;
        Ok(Outbox { tx, metrics })
    }

    /// An ack or error for a device: queued if there is room, else dropped
    /// and counted. Never waits.
    pub(crate) fn reply(&self, what: Published, msg: paho::Message) {
        if self.tx.try_send(Outgoing { what, msg }).is_err() {
            self.metrics
                .mqtt
                .replies_dropped
                .fetch_add(1, Ordering::Relaxed);
        }
    }

    /// A status, alert or offer: waits (asynchronously) for room.
    pub(crate) async fn send(&self, what: Published, msg: paho::Message) {
        if self.tx.send(Outgoing { what, msg }).await.is_err() {
            self.metrics
                .mqtt
                .publish_failed
                .fetch_add(1, Ordering::Relaxed);
        }
    }
}
