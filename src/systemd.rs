//! systemd integration through the `sd_notify` protocol: READY, STATUS,
//! STOPPING and a liveness-gated watchdog.
//!
//! The watchdog ping is a claim that the daemon works, not that the process
//! exists: each ping is sent only after the store thread has answered a
//! query within half the watchdog interval (which also proves the executor
//! is turning, since the answer is awaited on it). A wedged store thread, a
//! hung disk or a blocked executor stops the pings and systemd restarts us.
//! Without `NOTIFY_SOCKET` every call here is a no-op.

use std::time::Duration;

use sd_notify::NotifyState;
use smol::future::FutureExt;

use crate::store::{Stats, Store};

fn send(states: &[NotifyState<'_>]) {
    if let Err(e) = sd_notify::notify(states) {
        log::warn!("sd_notify failed: {e}");
    }
}

pub fn ready(status: &str) {
    send(&[NotifyState::Ready, NotifyState::Status(status)]);
}

pub fn stopping() {
    send(&[NotifyState::Stopping, NotifyState::Status("shutting down")]);
}

/// Half of `WATCHDOG_USEC`, as sd_watchdog_enabled(3) recommends; `None`
/// when the service has no watchdog.
pub fn watchdog_interval() -> Option<Duration> {
    sd_notify::watchdog_enabled().map(|d| d / 2)
}

/// The one-line summary systemd shows in `systemctl status`.
pub fn summary(stats: &Stats) -> String {
    let count = |k| {
        stats
            .live
            .iter()
            .find(|(kind, _)| *kind == k)
            .map_or(0, |(_, n)| *n)
    };
    format!(
        "{} services, {} keys, {} changes pending sync, db {} KiB",
        count(crate::store::Kind::Service),
        count(crate::store::Kind::Kv),
        stats.outbox,
        stats.file_bytes / 1024
    )
}

/// Pings the watchdog every `interval` while the store answers; updates
/// STATUS when the summary changes. Runs until dropped.
pub async fn watchdog(store: Store, interval: Duration) {
    let mut last_status = String::new();
    let mut healthy = true;
    loop {
        async_io::Timer::after(interval).await;
        let probe = async { Some(store.call(|db| db.stats()).await) };
        let timeout = async {
            async_io::Timer::after(interval).await;
            None
        };
        match probe.or(timeout).await {
            Some(Ok(Ok(stats))) => {
                if !healthy {
                    log::info!("store answers again; watchdog pings resume");
                    healthy = true;
                }
                let s = summary(&stats);
                if s != last_status {
                    send(&[NotifyState::Watchdog, NotifyState::Status(&s)]);
                    last_status = s;
                } else {
                    send(&[NotifyState::Watchdog]);
                }
            }
            Some(Ok(Err(e))) if healthy => {
                log::error!("store liveness probe failed: {e}; withholding watchdog pings");
                healthy = false;
            }
            Some(Err(e)) if healthy => {
                log::error!("store liveness probe failed: {e}; withholding watchdog pings");
                healthy = false;
            }
            None if healthy => {
                log::error!(
                    "store thread did not answer within {interval:?}; withholding watchdog pings"
                );
                healthy = false;
            }
            _ => {}
        }
    }
}
