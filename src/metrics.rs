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

use crate::devices::payload::Reason;
use crate::store::{Kind, Stats};

/// What the MQTT bridge publishes, for the published counter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Published {
    Ack,
    Error,
    Alert,
    Status,
    Offer,
}

impl Published {
    const ALL: [Published; 5] = [
        Published::Ack,
        Published::Error,
        Published::Alert,
        Published::Status,
        Published::Offer,
    ];
    fn as_str(self) -> &'static str {
        match self {
            Published::Ack => "ack",
            Published::Error => "error",
            Published::Alert => "alert",
            Published::Status => "status",
            Published::Offer => "firmware_offer",
        }
    }
}

/// Topic kinds counted on receipt (`devices/{id}/{kind}`; `other` for the
/// rest). Fixed labels: a device cannot grow the metric set.
const RECEIVED_KINDS: [&str; 6] = [
    "register",
    "telemetry",
    "heartbeat",
    "events",
    "status",
    "other",
];

/// MQTT bridge counters.
#[derive(Default)]
pub struct MqttMetrics {
    /// 1 while connected to the broker.
    pub connected: AtomicU64,
    /// Successful connections (the first one and every reconnect).
    pub connects: AtomicU64,
    received: [AtomicU64; RECEIVED_KINDS.len()],
    rejected: [AtomicU64; Reason::ALL.len()],
    published: [AtomicU64; Published::ALL.len()],
    pub publish_failed: AtomicU64,
    /// Acks and errors dropped because the publish queue was full.
    pub replies_dropped: AtomicU64,
    /// Rejection log lines not written (rate limit).
    pub log_lines_suppressed: AtomicU64,
    /// Store transactions that applied messages.
    pub batches: AtomicU64,
    /// Payload bytes between the socket and ingest (`mqtt::gate`): now,
    /// the most so far, and the bound.
    ingest_queued: AtomicU64,
    ingest_queued_peak: AtomicU64,
    ingest_limit: AtomicU64,
}

impl MqttMetrics {
    pub fn received(&self, topic: &str) {
        let kind = topic.split('/').nth(2).unwrap_or("other");
        let i = RECEIVED_KINDS
            .iter()
            .position(|k| *k == kind)
            .unwrap_or(RECEIVED_KINDS.len() - 1);
        self.received[i].fetch_add(1, Ordering::Relaxed);
    }

    pub fn rejected(&self, r: Reason) {
        if let Some(i) = Reason::ALL.iter().position(|x| *x == r) {
            self.rejected[i].fetch_add(1, Ordering::Relaxed);
        }
    }

    pub fn rejected_count(&self, r: Reason) -> u64 {
        Reason::ALL
            .iter()
            .position(|x| *x == r)
            .map_or(0, |i| self.rejected[i].load(Ordering::Relaxed))
    }

    pub fn published(&self, p: Published) {
        if let Some(i) = Published::ALL.iter().position(|x| *x == p) {
            self.published[i].fetch_add(1, Ordering::Relaxed);
        }
    }

    /// The gate's bound, once per bridge.
    pub fn ingest_limit(&self, limit: usize) {
        self.ingest_limit.store(limit as u64, Ordering::Relaxed);
    }

    pub fn ingest_queued(&self, used: usize) {
        self.ingest_queued.store(used as u64, Ordering::Relaxed);
        self.ingest_queued_peak
            .fetch_max(used as u64, Ordering::Relaxed);
    }

    fn render(&self, out: &mut String) {
        for (name, help, v) in [
            (
                "konsul_edge_mqtt_ingest_queued_bytes",
                "Device payload bytes read from the broker and not yet committed.",
                &self.ingest_queued,
            ),
            (
                "konsul_edge_mqtt_ingest_queued_peak_bytes",
                "The most payload bytes ever queued for ingest.",
                &self.ingest_queued_peak,
            ),
            (
                "konsul_edge_mqtt_ingest_limit_bytes",
                "The bound on queued payload bytes (resources.memory_limit / 8).",
                &self.ingest_limit,
            ),
        ] {
            sample(out, "gauge", name, help, v.load(Ordering::Relaxed));
        }
        let _ = writeln!(
            out,
            "# HELP konsul_edge_mqtt_connected 1 while connected to the MQTT broker.\n\
             # TYPE konsul_edge_mqtt_connected gauge\nkonsul_edge_mqtt_connected {}",
            self.connected.load(Ordering::Relaxed)
        );
        for (name, help, v) in [
            (
                "konsul_edge_mqtt_connects_total",
                "Successful connections to the broker (first and reconnects).",
                &self.connects,
            ),
            (
                "konsul_edge_mqtt_publish_failures_total",
                "Publishes the bridge could not queue (it was stopping).",
                &self.publish_failed,
            ),
            (
                "konsul_edge_mqtt_replies_dropped_total",
                "Acks and errors to devices dropped because the publish queue was full.",
                &self.replies_dropped,
            ),
            (
                "konsul_edge_mqtt_log_lines_suppressed_total",
                "MQTT rejection log lines not written (rate limit; every rejection is counted by reason).",
                &self.log_lines_suppressed,
            ),
            (
                "konsul_edge_mqtt_batches_total",
                "Store transactions that applied MQTT messages.",
                &self.batches,
            ),
        ] {
            sample(out, "counter", name, help, v.load(Ordering::Relaxed));
        }
        let load = |v: &AtomicU64| v.load(Ordering::Relaxed);
        family(
            out,
            "counter",
            "konsul_edge_mqtt_received_total",
            "MQTT messages received by topic kind.",
            "kind",
            RECEIVED_KINDS
                .iter()
                .copied()
                .zip(self.received.iter().map(load)),
        );
        family(
            out,
            "counter",
            "konsul_edge_mqtt_rejected_total",
            "MQTT messages refused, by reason.",
            "reason",
            Reason::ALL
                .iter()
                .map(|r| r.as_str())
                .zip(self.rejected.iter().map(load)),
        );
        family(
            out,
            "counter",
            "konsul_edge_mqtt_published_total",
            "MQTT messages published, by kind.",
            "kind",
            Published::ALL
                .iter()
                .map(|p| p.as_str())
                .zip(self.published.iter().map(load)),
        );
    }
}

pub struct Metrics {
    started: Instant,
    pub mqtt: MqttMetrics,
    /// (route, status code) -> count. Routes are templates, never raw paths,
    /// so a client cannot grow this map.
    requests: Mutex<BTreeMap<(&'static str, u16), u64>>,
    pub store_errors: AtomicU64,
    pub rejected_bodies: AtomicU64,
    /// Access decisions: [allowed, denied].
    acl: [AtomicU64; 2],
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics {
            started: Instant::now(),
            mqtt: MqttMetrics::default(),
            requests: Mutex::new(BTreeMap::new()),
            store_errors: AtomicU64::new(0),
            rejected_bodies: AtomicU64::new(0),
            acl: [AtomicU64::new(0), AtomicU64::new(0)],
        }
    }
}

impl Metrics {
    pub fn request(&self, route: &'static str, status: u16) {
        if let Ok(mut m) = self.requests.lock() {
            *m.entry((route, status)).or_insert(0) += 1;
        }
    }

    pub fn acl_decision(&self, allowed: bool) {
        self.acl[usize::from(!allowed)].fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }

    pub fn uptime_secs(&self) -> u64 {
        self.started.elapsed().as_secs()
    }

    /// MQTT counters and device counts by health (read at scrape time).
    /// A state is anything that reads as its label (`AsRef<str>`), so this
    /// module needs none of the devices' types.
    pub fn render_devices<L: AsRef<str>>(&self, counts: &[(L, u64)], out: &mut String) {
        family(
            out,
            "gauge",
            "konsul_edge_devices",
            "Registered devices by health.",
            "state",
            counts.iter().map(|(h, n)| (h.as_ref(), *n)),
        );
        self.mqtt.render(out);
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
        family(
            &mut out,
            "counter",
            "konsul_edge_acl_decisions_total",
            "Access decisions, by result.",
            "result",
            ["allow", "deny"].into_iter().zip(
                self.acl
                    .iter()
                    .map(|a| a.load(std::sync::atomic::Ordering::Relaxed)),
            ),
        );
        family(
            &mut out,
            "gauge",
            "konsul_edge_records",
            "Live replicated records by kind.",
            "kind",
            Kind::ALL.into_iter().map(|kind| {
                let n = stats
                    .live
                    .iter()
                    .find(|(k, _)| *k == kind)
                    .map_or(0, |(_, n)| *n);
                (kind.as_str(), n)
            }),
        );
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
                "Bytes on disk of the database, its WAL and SHM (what storage.max_size bounds).",
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
            sample(&mut out, "gauge", name, help, v);
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
            sample(&mut out, "counter", name, help, v.load(Ordering::Relaxed));
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

/// One unlabelled sample with its HELP and TYPE lines.
pub fn sample(out: &mut String, kind: &str, name: &str, help: &str, value: u64) {
    let _ = writeln!(
        out,
        "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}"
    );
}

/// A metric with one label: HELP and TYPE, then a sample per label value.
pub(crate) fn family<'a>(
    out: &mut String,
    kind: &str,
    name: &str,
    help: &str,
    label: &str,
    values: impl IntoIterator<Item = (&'a str, u64)>,
) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
    for (v, n) in values {
        let _ = writeln!(out, "{name}{{{label}=\"{v}\"}} {n}");
    }
}

pub(crate) fn escape(s: &str) -> String {
    s.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// Resident set size from /proc/self/statm (pages -> bytes); 0 if unknown.
// procfs is answered from memory: this read never waits for a disk.
#[allow(clippy::disallowed_methods)]
pub fn rss_bytes() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
    let pages: u64 = statm
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    pages * 4096
}
