//! Counters for `/metrics`, rendered in the Prometheus text format.
//!
//! Counters are atomics bumped on the request path; gauges (record counts,
//! database size, outbox depth) are read from the store at scrape time, so
//! nothing runs between scrapes. Hand-written rather than a metrics crate:
//! a few dozen lines against a dependency tree, on a 4 MB budget.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Instant;

use crate::store::{Kind, Stats};

pub struct Metrics {
    started: Instant,
    /// (route, status code) -> count. Routes are templates, never raw paths,
    /// so a client cannot grow this map.
    requests: Mutex<BTreeMap<(&'static str, u16), u64>>,
    pub store_errors: AtomicU64,
    pub rejected_bodies: AtomicU64,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics {
            started: Instant::now(),
            requests: Mutex::new(BTreeMap::new()),
            store_errors: AtomicU64::new(0),
            rejected_bodies: AtomicU64::new(0),
        }
    }
}

impl Metrics {
    pub fn request(&self, route: &'static str, status: u16) {
        if let Ok(mut m) = self.requests.lock() {
            *m.entry((route, status)).or_insert(0) += 1;
        }
    }

    pub fn uptime_secs(&self) -> u64 {
        self.started.elapsed().as_secs()
    }

    pub fn render(&self, stats: &Stats, node_id: &str) -> String {
        let mut out = String::with_capacity(2048);
        let _ = writeln!(
            out,
            "# HELP konsul_edge_build_info Build and node identity.\n\
             # TYPE konsul_edge_build_info gauge\n\
             konsul_edge_build_info{{version=\"{}\",node_id=\"{}\"}} 1",
            env!("CARGO_PKG_VERSION"),
            escape(node_id)
        );
        let _ = writeln!(
            out,
            "# HELP konsul_edge_uptime_seconds Seconds since the daemon started.\n\
             # TYPE konsul_edge_uptime_seconds gauge\nkonsul_edge_uptime_seconds {}",
            self.uptime_secs()
        );
        let _ = writeln!(
            out,
            "# HELP konsul_edge_records Live replicated records by kind.\n# TYPE konsul_edge_records gauge"
        );
        for kind in Kind::ALL {
            let n = stats
                .live
                .iter()
                .find(|(k, _)| *k == kind)
                .map_or(0, |(_, n)| *n);
            let _ = writeln!(out, "konsul_edge_records{{kind=\"{}\"}} {n}", kind.as_str());
        }
        for (name, help, v) in [
            (
                "konsul_edge_tombstones",
                "Deleted records kept so the delete can replicate.",
                stats.tombstones,
            ),
            (
                "konsul_edge_outbox_pending",
                "Changed keys not yet acknowledged by the cloud.",
                stats.outbox,
            ),
            (
                "konsul_edge_db_bytes",
                "Size of the SQLite database (pages in use).",
                stats.file_bytes,
            ),
            (
                "konsul_edge_db_max_bytes",
                "storage.max_size.",
                stats.max_bytes,
            ),
            (
                "konsul_edge_modify_index",
                "The store-wide modify index.",
                stats.index,
            ),
            (
                "konsul_edge_resident_memory_bytes",
                "Resident set size of the daemon.",
                rss_bytes(),
            ),
        ] {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {v}");
        }
        for (name, help, v) in [
            (
                "konsul_edge_store_errors_total",
                "Store operations that failed.",
                &self.store_errors,
            ),
            (
                "konsul_edge_http_rejected_bodies_total",
                "Request bodies refused as malformed or oversized.",
                &self.rejected_bodies,
            ),
        ] {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} counter\n{name} {}",
                v.load(Ordering::Relaxed)
            );
        }
        let _ = writeln!(
            out,
            "# HELP konsul_edge_http_requests_total HTTP requests by route and status.\n\
             # TYPE konsul_edge_http_requests_total counter"
        );
        if let Ok(m) = self.requests.lock() {
            for ((route, code), n) in m.iter() {
                let _ = writeln!(
                    out,
                    "konsul_edge_http_requests_total{{route=\"{route}\",code=\"{code}\"}} {n}"
                );
            }
        }
        out
    }
}

fn escape(s: &str) -> String {
    s.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// Resident set size from /proc/self/statm (pages -> bytes); 0 if unknown.
pub fn rss_bytes() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
    let pages: u64 = statm
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    pages * 4096
}
