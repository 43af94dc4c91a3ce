//! The bytes of device messages between the socket and ingest, bounded by
//! `resources.memory_limit` rather than by a message count alone.
//!
//! The reader hands ingest up to two batches of messages (`bridge`), and
//! QoS 0 messages are outside the broker's window altogether. At the
//! default `mqtt.max_payload_size` of 64 KiB two batches are 128 MiB, more
//! than the whole 50 MiB memory limit. So the reader also takes each
//! payload's bytes from this gate before it queues the message, and ingest
//! gives them back once the batch is committed. When the gate is empty the
//! reader waits (asynchronously): TCP reads stop and the broker holds the
//! rest, the same back-pressure as the count bound. Small messages never
//! notice it.

use std::sync::atomic::{AtomicUsize, Ordering};

use event_listener::Event;

/// The share of `memory_limit` that queued payloads may take.
const SHARE: u64 = 8;

#[derive(Debug)]
pub(crate) struct ByteGate {
    limit: usize,
    used: AtomicUsize,
    freed: Event,
}

impl ByteGate {
    /// An eighth of `memory_limit`, and never less than room for two of
    /// the largest messages (one being committed, one arriving).
    pub(crate) fn new(memory_limit: u64, largest: usize) -> ByteGate {
        let share = usize::try_from(memory_limit / SHARE).unwrap_or(usize::MAX);
        ByteGate {
            limit: share.max(largest.saturating_mul(2)),
            used: AtomicUsize::new(0),
            freed: Event::new(),
        }
    }

    pub(crate) fn limit(&self) -> usize {
        self.limit
    }

    /// Bytes taken now.
    pub(crate) fn used(&self) -> usize {
        self.used.load(Ordering::Relaxed)
    }

    /// Takes `n` bytes (at most the whole gate), waiting until they are
    /// free. Returns what was taken, to give back with [`release`](Self::release).
    pub(crate) async fn acquire(&self, n: usize) -> usize {
        let n = n.min(self.limit);
        loop {
            if self.try_acquire(n) {
                return n;
            }
            let freed = self.freed.listen();
            // Released between the attempt and the listen: try again
            // before waiting.
            if self.try_acquire(n) {
                return n;
            }
            freed.await;
        }
    }

    fn try_acquire(&self, n: usize) -> bool {
        self.used
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |used| {
                (used + n <= self.limit).then_some(used + n)
            })
            .is_ok()
    }

    pub(crate) fn release(&self, n: usize) {
        if n == 0 {
            return;
        }
        let _ = self
            .used
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |used| {
                Some(used.saturating_sub(n))
            });
        self.freed.notify(usize::MAX);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_gate_waits_until_bytes_come_back() {
        smol::block_on(async {
            let gate = ByteGate::new(8 << 20, 64 << 10);
            assert_eq!(gate.limit(), 1 << 20);
            let a = gate.acquire(700 << 10).await;
            // 700 Ki + 700 Ki does not fit in 1 Mi: the second waits.
            let second = gate.acquire(700 << 10);
            assert!(
                smol::future::poll_once(second).await.is_none(),
                "the second acquire waits"
            );
            gate.release(a);
            assert_eq!(gate.acquire(700 << 10).await, 700 << 10);
            // More than the whole gate is capped, not a deadlock.
            gate.release(700 << 10);
            assert_eq!(gate.acquire(5 << 20).await, 1 << 20);
            assert_eq!(gate.used(), 1 << 20);
        });
    }

    #[test]
    fn a_small_limit_still_holds_two_of_the_largest_messages() {
        let gate = ByteGate::new(4 << 20, 1 << 20);
        assert_eq!(gate.limit(), 2 << 20);
    }
}
