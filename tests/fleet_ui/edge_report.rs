//! What an edge says of itself in its sync request (version, pending
//! changes, failed rounds and the last error), as the hub's fleet list
//! shows it: from a real edge whose link to the hub was cut for a while,
//! and from crafted requests (oversized strings, an error "ago" beyond
//! the epoch, an older edge that sends no report).

use std::time::Duration;

use super::common::throttle::Throttle;
use super::common::*;
use super::post_sync;
use konsul_edge::sync::testing;
use serde_json::Value;

/// The hub's fleet row for `edge`, once `pred` holds for it.
fn edge_row(hub: &Daemon, edge: &str, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
    wait_for(what, Duration::from_secs(40), || {
        let r = hub.get(&format!("/v1/edge/fleet/edges?q={edge}"));
        assert_eq!(r.status, 200, "{}", r.text());
        let row = r.json()["items"]
            .as_array()?
            .iter()
            .find(|e| e["edge_id"] == edge)?
            .clone();
        pred(&row).then_some(row)
    })
}

#[test]
fn an_edge_reports_its_version_backlog_and_sync_failures_to_the_hub() {
    let (_hub_dir, hub) = Daemon::plain_hub();
    let link = Throttle::start(&hub.addr, 0, Duration::ZERO);
    link.set_down(true);
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("edge.yaml"),
        format!(
            "node_id: edge-r\nstorage: {{path: {}}}\nhttp: {{listen: '127.0.0.1:0'}}\n\
             cloud: {{server_address: 'http://{}', sync_interval: 1s}}\n",
            dir.path().join("edge.db").display(),
            link.addr
        ),
    )
    .unwrap();
    let edge = Daemon::start(dir.path());
    for i in 0..3 {
        assert_eq!(
            edge.put(&format!("/kv/cfg/{i}"), r#"{"value":"x"}"#).status,
            200
        );
    }
    let before_cut_ends = wall_ms();
    eventually("a failed sync round at the edge", || {
        edge.get("/v1/edge/sync").json()["last_error"].is_string()
    });
    link.set_down(false);

    let row = edge_row(&hub, "edge-r", "the edge's report at the hub", |e| {
        e["failed_rounds"].as_u64().unwrap_or(0) >= 1
    });
    assert_eq!(row["version"], env!("CARGO_PKG_VERSION"), "{row}");
    let error = row["last_error"].as_str().unwrap_or("");
    assert!(!error.is_empty(), "the last failure's message: {row}");
    let at = row["last_error_ms"].as_u64().unwrap_or(0);
    assert!(
        at >= before_cut_ends.saturating_sub(60_000) && at <= wall_ms(),
        "the failure's time, on the hub's clock: {row}"
    );
    // Once the three writes are through, the backlog the edge reports is
    // empty; the failures stay counted.
    let row = edge_row(&hub, "edge-r", "an empty backlog reported", |e| {
        e["pending_changes"] == 0 && e["applied"].as_u64().unwrap_or(0) >= 3
    });
    assert!(row["failed_rounds"].as_u64().unwrap_or(0) >= 1, "{row}");
}

#[test]
fn the_hub_bounds_what_an_edge_reports_and_keeps_it_across_older_requests() {
    let (_hub_dir, hub) = Daemon::plain_hub();
    let long = "v".repeat(10_000);
    let error = "é".repeat(5_000);
    post_sync(
        &hub,
        &testing::status_report("edge-h", Some((&long, 7, 2, &error, u64::MAX))),
    );
    let row = edge_row(&hub, "edge-h", "the crafted report", |e| {
        e["pending_changes"] == 7
    });
    assert_eq!(row["version"].as_str().map(str::len), Some(64), "{row}");
    let kept = row["last_error"].as_str().unwrap_or("");
    assert!(kept.len() <= 512 && kept.starts_with("éé"), "{row}");
    assert_eq!(row["failed_rounds"], 2, "{row}");
    // An "ago" before the epoch is not a time in the year 1970 minus
    // something: it saturates.
    assert_eq!(row["last_error_ms"], 0, "{row}");

    // An edge from before the report keeps the last one the hub had.
    post_sync(&hub, &testing::status_report("edge-h", None));
    let row = edge_row(&hub, "edge-h", "the report after an older request", |_| {
        true
    });
    assert_eq!(row["pending_changes"], 7, "{row}");

    // An edge that never reported has nulls, not zeros that look like news.
    post_sync(&hub, &testing::status_report("edge-old", None));
    let row = edge_row(&hub, "edge-old", "an edge without a report", |_| true);
    assert!(
        row["version"].is_null() && row["failed_rounds"].is_null(),
        "{row}"
    );
}

fn wall_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}
