//! Offline-first sync with the cloud hub.
//!
//! This module will hold the wire types (prost, never leaving this module),
//! the edge client and the hub. For now it holds what other subsystems
//! consume: [`SyncHandle`], the sync state (online, last sync, pending
//! changes, last error) that the HTTP API and D-Bus expose, and the
//! "sync now" trigger. In standalone mode (no `cloud.server_address`) the
//! handle still tracks the outbox depth, so operators see what would be
//! sent once a hub is configured.

use std::sync::{Arc, Mutex};

use serde::Serialize;

pub mod client;
mod engine;
pub mod server;
pub mod transport;
mod wire;

pub use client::SyncClient;
pub use server::Hub;
pub use transport::{server_tls, TransportError};

use crate::registry::Registry;

#[derive(Debug, thiserror::Error)]
pub enum SyncError {
    #[error("sync is disabled: cloud.server_address is empty")]
    Disabled,
}

/// What the operator sees of sync.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct SyncStatus {
    /// A hub is configured.
    pub enabled: bool,
    /// The last sync attempt reached the hub.
    pub online: bool,
    /// Milliseconds since the epoch of the last successful sync.
    pub last_sync_ms: Option<u64>,
    /// Changed keys not yet acknowledged by the hub (the outbox depth).
    pub pending_changes: u64,
    /// The outbox holds more than `cloud.offline_queue_size` keys. Nothing
    /// is dropped (state changes coalesce per key); this says the link
    /// needs attention.
    pub queue_over_limit: bool,
    pub last_error: Option<String>,
}

struct Inner {
    status: Mutex<SyncStatus>,
    changed: event_listener::Event,
    now: async_channel::Sender<()>,
    now_rx: async_channel::Receiver<()>,
}

/// Shared view of the sync state plus the sync-now trigger. Cheap to clone.
#[derive(Clone)]
pub struct SyncHandle {
    inner: Arc<Inner>,
}

impl SyncHandle {
    pub fn new(enabled: bool) -> SyncHandle {
        // Capacity 1: many "sync now" requests before the client wakes up
        // collapse into one sync.
        let (now, now_rx) = async_channel::bounded(1);
        SyncHandle {
            inner: Arc::new(Inner {
                status: Mutex::new(SyncStatus {
                    enabled,
                    ..Default::default()
                }),
                changed: event_listener::Event::new(),
                now,
                now_rx,
            }),
        }
    }

    pub fn status(&self) -> SyncStatus {
        self.inner
            .status
            .lock()
            .map(|s| s.clone())
            .unwrap_or_default()
    }

    /// Applies `f` to the state; wakes [`changed`](Self::changed) waiters
    /// only when something actually changed.
    pub fn update(&self, f: impl FnOnce(&mut SyncStatus)) {
        let changed = match self.inner.status.lock() {
            Ok(mut s) => {
                let before = s.clone();
                f(&mut s);
                *s != before
            }
            Err(_) => false,
        };
        if changed {
            self.inner.changed.notify(usize::MAX);
        }
    }

    /// Resolves at the next change after this call (the listener is
    /// registered now, so a change between this call and the await is not
    /// missed).
    pub fn changed(&self) -> event_listener::EventListener {
        self.inner.changed.listen()
    }

    /// Asks the client to sync as soon as it can.
    pub fn sync_now(&self) -> Result<(), SyncError> {
        if !self.status().enabled {
            return Err(SyncError::Disabled);
        }
        // Full means a sync is already requested: nothing to add.
        let _ = self.inner.now.try_send(());
        Ok(())
    }

    /// For the client: resolves when a sync was requested.
    pub async fn requested(&self) {
        let _ = self.inner.now_rx.recv().await;
    }
}

/// Keeps `pending_changes` equal to the outbox depth, woken by registry
/// changes (no timer). The sync client takes this over when it runs.
pub async fn track_outbox(registry: Registry, handle: SyncHandle) {
    let mut changes = registry.subscribe();
    loop {
        if let Ok(Ok(stats)) = registry.store().call(|db| db.stats()).await {
            handle.update(|s| s.pending_changes = stats.outbox);
        }
        if changes.recv().await.is_err() {
            return;
        }
        // Coalesce a burst of changes into one count.
        while changes.try_recv().is_ok() {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_changes_wake_waiters_and_sync_now_needs_a_hub() {
        let h = SyncHandle::new(false);
        assert!(matches!(h.sync_now(), Err(SyncError::Disabled)));
        let h = SyncHandle::new(true);
        h.sync_now().unwrap();
        h.sync_now().unwrap(); // coalesces
        smol::block_on(async {
            h.requested().await;
            let waiter = h.changed();
            h.update(|s| s.online = true);
            waiter.await;
            assert!(h.status().online);
        });
    }
}
