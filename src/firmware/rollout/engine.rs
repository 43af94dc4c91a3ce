//! The engine task: ticks on wakes, on device and rollout changes and at
//! the next deadline (no polling), hands the offers to the MQTT bridge,
//! and fetches, one at a time, the artifacts that rollouts from the hub
//! need. Separate from `tick` so the decisions stay free of async and I/O.

use std::collections::HashSet;
use std::time::Duration;

use smol::future::FutureExt;

use super::model::Rollout;
use super::tick::tick;
use super::Rollouts;
use crate::clock::wall_millis;
use crate::store::{Kind, StoreError};
use crate::support::Shutdown;
use crate::sync::transport::FETCH_RETRY;

impl Rollouts {
    /// The engine: ticks on wakes, on device and rollout changes, and at
    /// the next deadline; until `shutdown`.
    pub(crate) async fn run(self, shutdown: Shutdown) {
        let (fetch_tx, fetch_rx) = async_channel::unbounded::<Rollout>();
        let fetching = std::sync::Mutex::new(HashSet::<String>::new());
        let engine = self.engine(&shutdown, &fetch_tx, &fetching);
        let fetch = self.fetch_loop(&shutdown, fetch_rx, &fetching);
        smol::future::zip(engine, fetch).await;
    }

    /// Fetches, one artifact at a time, what `missing` rollouts need.
    async fn fetch_loop(
        &self,
        shutdown: &Shutdown,
        queue: async_channel::Receiver<Rollout>,
        fetching: &std::sync::Mutex<HashSet<String>>,
    ) {
        let Some(f) = &self.inner.fetcher else { return };
        loop {
            let next = async { queue.recv().await.ok() }
                .or(async {
                    shutdown.wait().await;
                    None
                })
                .await;
            let Some(r) = next else { return };
            let meta = crate::firmware::NewArtifact {
                device_type: r.device_type.clone(),
                version: r.version.clone(),
                sha256: r.sha256.clone(),
                signature: r.signature.clone(),
                notes: format!("fetched from the hub for rollout {}", r.id),
            };
            log::info!(
                "rollout {}: fetching firmware {} from the hub",
                r.id,
                r.sha256
            );
            let done = async { Some(self.inner.artifacts.fetch(f, meta, r.size).await) }
                .or(async {
                    shutdown.wait().await;
                    None
                })
                .await;
            match done {
                None => return,
                Some(Ok(a)) => log::info!(
                    "rollout {}: firmware {} fetched ({} bytes)",
                    r.id,
                    a.sha256,
                    a.size
                ),
                Some(Err(e)) => {
                    log::warn!(
                        "rollout {}: fetching firmware {}: {e}; retrying in {FETCH_RETRY:?}",
                        r.id,
                        r.sha256
                    );
                    let slept = async {
                        async_io::Timer::after(FETCH_RETRY).await;
                        true
                    }
                    .or(async {
                        shutdown.wait().await;
                        false
                    })
                    .await;
                    if !slept {
                        return;
                    }
                }
            }
            if let Ok(mut set) = fetching.lock() {
                set.remove(&r.sha256);
            }
            self.wake();
        }
    }

    async fn engine(
        &self,
        shutdown: &Shutdown,
        fetch: &async_channel::Sender<Rollout>,
        fetching: &std::sync::Mutex<HashSet<String>>,
    ) {
        let mut changes = self.inner.registry.subscribe();
        let base_url = self.inner.artifacts.settings().base_url.clone();
        let mut resend = true;
        loop {
            let now = wall_millis();
            let url = base_url.clone();
            let result = self
                .inner
                .registry
                .store()
                .call(move |db| db.tx(|tx| tick(tx, now, &url, resend)))
                .await;
            let next = match result {
                Ok(Ok(step)) => {
                    resend = false;
                    if self.inner.fetcher.is_some() {
                        for r in step.missing {
                            let new = fetching
                                .lock()
                                .is_ok_and(|mut s| s.insert(r.sha256.clone()));
                            if new {
                                let _ = fetch.try_send(r);
                            }
                        }
                    }
                    for o in step.offers {
                        match self.inner.offers_tx.try_send(o) {
                            Ok(()) => {}
                            Err(async_channel::TrySendError::Full(o)) => log::warn!(
                                "firmware offer queue full, {} not sent now; its deadline brings it back",
                                o.topic
                            ),
                            Err(async_channel::TrySendError::Closed(o)) => log::warn!(
                                "no MQTT bridge (mqtt.enabled: false): {} cannot be offered",
                                o.topic
                            ),
                        }
                    }
                    self.inner.ticked.notify(usize::MAX);
                    step.next_deadline
                }
                Err(StoreError::Closed) | Ok(Err(StoreError::Closed)) => return,
                Ok(Err(e)) | Err(e) => {
                    log::error!("rollout engine: {e}; retrying in 5s");
                    Some(wall_millis() + 5000)
                }
            };
            let timer = async {
                match next {
                    Some(at) => {
                        let wait = at.saturating_sub(wall_millis());
                        async_io::Timer::after(Duration::from_millis(wait)).await;
                    }
                    None => std::future::pending::<()>().await,
                }
                true
            };
            let woken = async {
                let _ = self.inner.wake_rx.recv().await;
                true
            };
            let changed = async {
                loop {
                    match changes.recv().await {
                        Ok(c) if matches!(c.kind, Kind::Device | Kind::Rollout | Kind::Alert) => {
                            return true
                        }
                        Ok(_) => continue,
                        Err(async_broadcast::RecvError::Overflowed(_)) => return true,
                        Err(async_broadcast::RecvError::Closed) => {
                            std::future::pending::<()>().await
                        }
                    }
                }
            };
            let stop = async {
                shutdown.wait().await;
                false
            };
            if !timer.or(woken).or(changed).or(stop).await {
                return;
            }
            // Coalesce whatever else arrived meanwhile into this tick.
            while changes.try_recv().is_ok() {}
            while self.inner.wake_rx.try_recv().is_ok() {}
        }
    }
}
