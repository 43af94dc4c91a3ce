//! A one-shot shutdown flag that any task can await: the daemon triggers it
//! once, on SIGTERM/SIGINT or a fatal fault, and every actor winds down.
//! It lives at the bottom so that doors and subsystems can share it without
//! importing each other.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

/// A one-shot, clonable shutdown flag that tasks can await.
#[derive(Clone, Default)]
pub struct Shutdown {
    inner: Arc<(AtomicBool, event_listener::Event)>,
}

impl Shutdown {
    pub fn trigger(&self) {
        self.inner.0.store(true, Ordering::SeqCst);
        self.inner.1.notify(usize::MAX);
    }

    pub fn is_triggered(&self) -> bool {
        self.inner.0.load(Ordering::SeqCst)
    }

    pub async fn wait(&self) {
        loop {
            if self.is_triggered() {
                return;
            }
            let listener = self.inner.1.listen();
            if self.is_triggered() {
                return;
            }
            listener.await;
        }
    }
}
