//! `resources.memory_limit` and `cpu_limit` bind: the kernel enforces
//! them (the systemd drop-in `konsul-edge systemd-dropin` writes, checked
//! against the daemon's own cgroup at start), the daemon sizes its larger
//! buffers from them, and it sheds under memory pressure.
//!
//! - `cgroup`: where the daemon's cgroup is, what `memory.max`/`cpu.max`
//!   say, the warning when they are absent or disagree, the drop-in.
//! - `pressure`: the cgroup's `memory.events` watched with inotify (the
//!   kernel signals a modify event on every counter change, so nothing
//!   polls). When the `high` counter rises the daemon sheds: SQLite's page
//!   cache (where recent telemetry and records sit) is released, sync
//!   batches, sync response pages and telemetry points per round shrink
//!   to a quarter. It stays shed until no `high` event came for
//!   [`SHED_HOLD`] (a timer, not a poll), then says so and restores.
//!
//! Sizes from `memory_limit` (docs/decisions/0016-memory-limit-binds.md):
//! an upload batch at most 1/32 of it (and `sync.max_batch_bytes`), a
//! response page asked of the hub at most 1/16 of it (and the hub's
//! default page). A round holds the batch, its encoding and the decoded
//! answer at once; 50Mi allows 1.6Mi and 3.2Mi, above the 64Ki batch and
//! 256Ki page defaults, while a 4Mi device gets 128Ki and 256Ki.

pub mod cgroup;
mod pressure;

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

pub use pressure::watch;

/// How long the daemon stays shed after the last `high` event.
pub const SHED_HOLD: Duration = Duration::from_secs(60);
/// While shedding, batch sizes are divided by this.
const SHED_FACTOR: usize = 4;

#[derive(Debug, thiserror::Error)]
pub enum LimitsError {
    #[error("{}: {source}", .path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{}: {message}", .path.display())]
    Parse { path: PathBuf, message: String },
    #[error("watching {}: {source}", .path.display())]
    Watch { path: PathBuf, source: nix::Error },
}

#[derive(Debug, Default)]
struct Inner {
    memory_limit: u64,
    cgroup_memory_max: AtomicU64,
    shedding: AtomicBool,
    high_events: AtomicU64,
    sheds: AtomicU64,
}

/// Shared by the sync client (sizes), the pressure watcher (state) and
/// `/metrics`. Cheap to clone.
#[derive(Debug, Clone, Default)]
pub struct Limits {
    inner: Arc<Inner>,
}

impl Limits {
    pub fn new(memory_limit: u64) -> Limits {
        Limits {
            inner: Arc::new(Inner {
                memory_limit,
                ..Default::default()
            }),
        }
    }

    pub fn memory_limit(&self) -> u64 {
        self.inner.memory_limit
    }

    pub fn shedding(&self) -> bool {
        self.inner.shedding.load(Ordering::Relaxed)
    }

    fn shed_div(&self, n: usize) -> usize {
        if self.shedding() {
            (n / SHED_FACTOR).max(1)
        } else {
            n
        }
    }

    /// Bytes of updates in one upload: `configured` capped at 1/32 of
    /// `memory_limit` (at least 1 KiB), a quarter of it while shedding.
    pub fn batch_bytes(&self, configured: usize) -> usize {
        let cap = (self.inner.memory_limit / 32).max(1024) as usize;
        self.shed_div(configured.min(cap)).max(1024)
    }

    /// The response page to ask of the hub: its `default` page capped at
    /// 1/16 of `memory_limit`, a quarter while shedding (the hub clamps it
    /// to its own bounds).
    pub fn response_bytes(&self, default: usize) -> usize {
        self.shed_div(default.min((self.inner.memory_limit / 16) as usize))
    }

    /// Telemetry points in one upload: `configured`, a quarter while
    /// shedding.
    pub fn telemetry_points(&self, configured: usize) -> usize {
        self.shed_div(configured)
    }

    pub(crate) fn set_cgroup_memory_max(&self, bytes: u64) {
        self.inner.cgroup_memory_max.store(bytes, Ordering::Relaxed);
    }

    /// The figures in Prometheus text, appended to `out`.
    pub fn render_metrics(&self, out: &mut String) {
        let i = &self.inner;
        for (kind, name, help, v) in [
            (
                "gauge",
                "konsul_edge_memory_limit_bytes",
                "resources.memory_limit.",
                i.memory_limit,
            ),
            (
                "gauge",
                "konsul_edge_cgroup_memory_max_bytes",
                "The daemon's cgroup memory.max (0: absent or unlimited).",
                i.cgroup_memory_max.load(Ordering::Relaxed),
            ),
            (
                "gauge",
                "konsul_edge_memory_shedding",
                "1 while the daemon sheds after a memory.events high event.",
                u64::from(self.shedding()),
            ),
            (
                "counter",
                "konsul_edge_memory_high_events_total",
                "The cgroup's memory.events high counter (reclaim past MemoryHigh).",
                i.high_events.load(Ordering::Relaxed),
            ),
            (
                "counter",
                "konsul_edge_memory_sheds_total",
                "Times the daemon released caches and shrank batches under pressure.",
                i.sheds.load(Ordering::Relaxed),
            ),
        ] {
            crate::metrics::sample(out, kind, name, help, v);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_follow_the_memory_limit_and_shrink_while_shedding() {
        let l = Limits::new(4 << 20);
        assert_eq!(l.batch_bytes(1 << 20), 128 << 10);
        assert_eq!(l.batch_bytes(64 << 10), 64 << 10);
        assert_eq!(l.response_bytes(4 << 20), 256 << 10);
        assert_eq!(l.response_bytes(128 << 10), 128 << 10);
        l.inner.shedding.store(true, Ordering::Relaxed);
        assert_eq!(l.batch_bytes(64 << 10), 16 << 10);
        assert_eq!(l.response_bytes(4 << 20), 64 << 10);
        assert_eq!(l.telemetry_points(500), 125);
        assert_eq!(l.batch_bytes(2048), 1024, "never below 1 KiB");
    }
}
