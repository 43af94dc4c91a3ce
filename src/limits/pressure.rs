//! The memory-pressure watcher: one task that sleeps on an inotify watch of
//! the cgroup's `memory.events` (cgroup v2 raises a modify event on each
//! counter change) and, while shed, on one timer for the end of the hold.

use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::time::Instant;

use async_io::{Async, Timer};
use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify};

use super::{Limits, LimitsError, SHED_HOLD};
use crate::store::Store;

/// The `high` counter of a `memory.events` text.
fn high_count(text: &str) -> Option<u64> {
    text.lines()
        .find_map(|l| l.strip_prefix("high "))
        .and_then(|n| n.trim().parse().ok())
}

async fn read_high(path: &Path) -> Option<u64> {
    high_count(&smol::fs::read_to_string(path).await.ok()?)
}

/// Watches `events` (a cgroup's `memory.events`) until the task is
/// dropped. Errors setting the watch up are returned; later read errors
/// are logged and the watch goes on.
pub async fn watch(limits: Limits, store: Store, events: PathBuf) -> Result<(), LimitsError> {
    let werr = |source| LimitsError::Watch {
        path: events.clone(),
        source,
    };
    let inotify = Inotify::init(InitFlags::IN_NONBLOCK | InitFlags::IN_CLOEXEC).map_err(werr)?;
    inotify
        .add_watch(&events, AddWatchFlags::IN_MODIFY)
        .map_err(werr)?;
    let inotify = Async::new(inotify).map_err(|source| LimitsError::Io {
        path: events.clone(),
        source,
    })?;
    // Events from before the start are history, not pressure now.
    let mut last = read_high(&events).await.unwrap_or(0);
    limits.inner.high_events.store(last, Ordering::Relaxed);
    log::info!(
        "memory pressure: watching {} (high events so far: {last})",
        events.display()
    );
    let mut until: Option<Instant> = None;
    let mut burst = 0u64;
    loop {
        let modified = async {
            // An error here (the fd closed under us) is reported by the
            // read below, which then sees no change.
            let _ = inotify.readable().await;
            true
        };
        let hold_over = async {
            match until {
                Some(t) => {
                    Timer::at(t).await;
                    false
                }
                None => std::future::pending().await,
            }
        };
        if !smol::future::or(modified, hold_over).await {
            until = None;
            limits.inner.shedding.store(false, Ordering::Relaxed);
            log::info!(
                "memory pressure over: no high event for {}s ({burst} in this episode); \
                 sync batch sizes restored",
                SHED_HOLD.as_secs()
            );
            burst = 0;
            continue;
        }
        // Drain the queued events; the file's content is what counts.
        let _ = inotify.get_ref().read_events();
        let Some(now) = read_high(&events).await else {
            continue;
        };
        if now <= last {
            last = now;
            continue;
        }
        let new = now - last;
        last = now;
        burst += new;
        limits.inner.high_events.store(now, Ordering::Relaxed);
        let entering = until.is_none();
        until = Some(Instant::now() + SHED_HOLD);
        shed(&limits, &store, now, new, entering).await;
    }
}

/// Sheds what can be shed: SQLite's page cache now, batch sizes from the
/// next round on (through `Limits::shedding`).
async fn shed(limits: &Limits, store: &Store, total: u64, new: u64, entering: bool) {
    limits.inner.shedding.store(true, Ordering::Relaxed);
    limits.inner.sheds.fetch_add(1, Ordering::Relaxed);
    let freed = store
        .call(|db| {
            db.conn()
                .execute_batch("PRAGMA shrink_memory")
                .map_err(|e| db.sql_error("shrink_memory", e))
        })
        .await;
    let cache = match freed {
        Ok(Ok(())) => "SQLite page cache released".to_owned(),
        Ok(Err(e)) | Err(e) => format!("SQLite page cache not released ({e})"),
    };
    if entering {
        log::warn!(
            "memory pressure: memory.events high +{new} (total {total}); shedding: {cache}; \
             sync batches, response pages and telemetry per round cut to 1/{}, until {}s \
             without a high event",
            super::SHED_FACTOR,
            SHED_HOLD.as_secs()
        );
    } else {
        log::debug!("memory pressure: high +{new} (total {total}); {cache}");
    }
}

#[cfg(test)]
mod tests {
    use super::high_count;

    #[test]
    fn the_high_counter_is_read() {
        let t = "low 0\nhigh 17\nmax 2\noom 0\noom_kill 0\n";
        assert_eq!(high_count(t), Some(17));
        assert_eq!(high_count(""), None);
    }
}
