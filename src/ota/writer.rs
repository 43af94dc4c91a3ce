//! Blocking jobs that write: the staging copy, the slot writer and the
//! bootloader tools. Each runs on the blocking pool with a cancel flag it
//! checks per chunk, and is counted while its thread runs.
//!
//! Dropping a job's future (a step timeout drops the whole step) sets its
//! flag but cannot stop the thread; that is why the count exists. The
//! coordinator awaits [`Jobs::idle`] before it records a failed step, and
//! installs are refused while a job lives: otherwise a timed-out writer
//! could still be writing the slot while a new install writes it too.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// How long [`Jobs::idle`] waits between warnings about a job that does
/// not stop (a device that hangs in `write`).
const STUCK_WARN: Duration = Duration::from_secs(30);

/// The live jobs of one coordinator.
#[derive(Default)]
pub(crate) struct Jobs {
    live: AtomicUsize,
    ended: event_listener::Event,
}

impl Jobs {
    pub(crate) fn live(&self) -> usize {
        self.live.load(Ordering::SeqCst)
    }

    /// Resolves once no job's thread runs.
    pub(crate) async fn idle(&self) {
        loop {
            let ended = self.ended.listen();
            let n = self.live();
            if n == 0 {
                return;
            }
            let warn = async {
                async_io::Timer::after(STUCK_WARN).await;
                log::warn!("ota: waiting for {n} stopped job(s) to end (a device that hangs?)");
            };
            smol::future::or(ended, warn).await;
        }
    }
}

/// Decrements the count when the job's closure is done (or dropped
/// unstarted).
struct Live(Arc<Jobs>);

impl Drop for Live {
    fn drop(&mut self) {
        self.0.live.fetch_sub(1, Ordering::SeqCst);
        self.0.ended.notify(usize::MAX);
    }
}

/// Sets the flag when the awaiting future goes away.
struct CancelOnDrop(Arc<AtomicBool>);

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::SeqCst);
    }
}

/// Runs `f` on the blocking pool as a counted job. `f` gets the cancel
/// flag and should return early once it is set.
pub(crate) async fn run<T, F>(jobs: &Arc<Jobs>, f: F) -> T
where
    T: Send + 'static,
    F: FnOnce(&AtomicBool) -> T + Send + 'static,
{
    let cancel = Arc::new(AtomicBool::new(false));
    let _on_drop = CancelOnDrop(cancel.clone());
    jobs.live.fetch_add(1, Ordering::SeqCst);
    let live = Live(jobs.clone());
    smol::unblock(move || {
        let _live = live;
        f(&cancel)
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_dropped_job_is_cancelled_and_counted_until_its_thread_ends() {
        smol::block_on(async {
            let jobs = Arc::new(Jobs::default());
            let (tx, rx) = std::sync::mpsc::channel::<()>();
            let job = run(&jobs, move |cancel| {
                // Holds the thread until the test lets go, like a write
                // blocked on a slow device.
                let _ = rx.recv();
                cancel.load(Ordering::SeqCst)
            });
            // Started, then dropped as a step timeout would.
            let started = smol::future::or(async { Some(job.await) }, async {
                async_io::Timer::after(Duration::from_millis(50)).await;
                None
            })
            .await;
            assert!(started.is_none());
            assert_eq!(jobs.live(), 1, "the thread still runs");
            let idle = jobs.idle();
            let early = smol::future::or(
                async {
                    idle.await;
                    true
                },
                async {
                    async_io::Timer::after(Duration::from_millis(50)).await;
                    false
                },
            )
            .await;
            assert!(!early, "idle must wait for the thread");
            tx.send(()).unwrap();
            jobs.idle().await;
            assert_eq!(jobs.live(), 0);
        });
    }
}
