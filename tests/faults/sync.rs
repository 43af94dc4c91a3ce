//! kill -9 during sync drains: an edge with many pending outbox changes
//! syncs to its hub in small batches, and the edge, the hub or both are
//! killed at a random point of the drain. After restarting and syncing to
//! convergence the hub must hold every edge write, with its latest value,
//! exactly once in effect: no lost key, no extra key (such as a second,
//! qualified copy), no conflict with itself, and an `applied` count equal
//! to the changes the edge made.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde_json::{json, Value};

use crate::common::{eventually, Daemon};
use crate::{integrity, kill_point, kv_values, runs};

/// New keys per run (one batch request) and keys overwritten every run.
const FRESH: usize = 600;
const HOT: usize = 20;

fn hub_config(dir: &Path, listen: &str) {
    std::fs::write(
        dir.join("edge.yaml"),
        format!(
            "node_id: hub\nstorage: {{path: {}, max_size: 64Mi}}\nhttp: {{listen: '{listen}'}}\n",
            dir.join("hub.db").display()
        ),
    )
    .unwrap();
}

/// Small batches, so a drain takes many rounds and a kill lands inside.
fn edge_config(dir: &Path, hub: &str) {
    std::fs::write(
        dir.join("edge.yaml"),
        format!(
            "node_id: edge-a\nstorage: {{path: {}, max_size: 64Mi}}\nhttp: {{listen: '127.0.0.1:0'}}\n\
             cloud: {{server_address: 'http://{hub}', sync_interval: 1h}}\n\
             sync: {{max_batch_bytes: 8Ki}}\n",
            dir.join("edge.db").display()
        ),
    )
    .unwrap();
}

/// Asks `d` to sync and waits until a sync finished after the request with
/// nothing pending.
fn sync_to_end(d: &Daemon) {
    let before = d.get("/v1/edge/sync").json()["last_sync_ms"]
        .as_u64()
        .unwrap_or(0);
    let r = d.req("POST", "/v1/edge/sync/now", None);
    assert_eq!(r.status, 202, "{}", r.text());
    eventually("a completed sync with nothing pending", || {
        let s = d.get("/v1/edge/sync").json();
        s["last_sync_ms"].as_u64().unwrap_or(0) > before && s["pending_changes"] == 0
    });
}

fn check_integrity(db: &Path, what: &str, out: &mut Vec<String>) {
    let check = integrity(db);
    if check != "ok" {
        out.push(format!("{what}: {check}"));
    }
}

struct Node {
    dir: PathBuf,
    db: PathBuf,
    daemon: Daemon,
}

#[test]
fn sync_drains_survive_kill9_of_edge_and_hub() {
    let hub_dir = tempfile::tempdir().unwrap();
    hub_config(hub_dir.path(), "127.0.0.1:0");
    let first = Daemon::start_hub(hub_dir.path());
    // Pinned, so the hub comes back where the edge looks for it.
    hub_config(hub_dir.path(), &first.addr);
    let mut hub = Node {
        dir: hub_dir.path().into(),
        db: hub_dir.path().join("hub.db"),
        daemon: first,
    };
    let edge_dir = tempfile::tempdir().unwrap();
    edge_config(edge_dir.path(), &hub.daemon.addr);
    let mut edge = Node {
        dir: edge_dir.path().into(),
        db: edge_dir.path().join("edge.db"),
        daemon: Daemon::start(edge_dir.path()),
    };

    let n = runs(9, 150);
    // What the edge was told it has: key -> latest value.
    let mut expected: BTreeMap<String, String> = BTreeMap::new();
    let mut changes = 0u64;
    let mut kills = [0usize; 2];
    let mut mid_drain = 0;
    let mut integrity_failures = Vec::new();
    for run in 0..n {
        let mut items: BTreeMap<String, String> = (0..FRESH)
            .map(|i| (format!("fresh/r{run}/{i}"), format!("v{run}-{i}")))
            .collect();
        items.extend((0..HOT).map(|j| (format!("hot/{j}"), format!("r{run}"))));
        let r = edge.daemon.req(
            "POST",
            "/batch/kv/set",
            Some(&json!({ "items": items }).to_string()),
        );
        assert_eq!(r.status, 200, "{}", r.text());
        changes += items.len() as u64;
        expected.extend(items);

        let r = edge.daemon.req("POST", "/v1/edge/sync/now", None);
        assert_eq!(r.status, 202, "{}", r.text());
        std::thread::sleep(kill_point(250));
        // Edge, hub, both, in turn.
        let (kill_edge, kill_hub) = match run % 3 {
            0 => (true, false),
            1 => (false, true),
            _ => (true, true),
        };
        if kill_edge {
            edge.daemon.kill9();
            kills[0] += 1;
        }
        if kill_hub {
            hub.daemon.kill9();
            kills[1] += 1;
        }
        if kill_edge {
            check_integrity(
                &edge.db,
                &format!("edge, run {run}"),
                &mut integrity_failures,
            );
            edge.daemon = Daemon::start(&edge.dir);
        }
        if kill_hub {
            check_integrity(&hub.db, &format!("hub, run {run}"), &mut integrity_failures);
            hub.daemon = Daemon::start_hub(&hub.dir);
        }
        // Where the kill landed: changes the edge still had to send.
        let pending = edge.daemon.get("/v1/edge/status").json()["outbox_pending"]
            .as_u64()
            .unwrap_or(0);
        if pending > 0 && pending < (FRESH + HOT) as u64 {
            mid_drain += 1;
        }
        sync_to_end(&edge.daemon);
    }

    let keys: Vec<String> = expected.keys().cloned().collect();
    let mut lost = Vec::new();
    for (who, d) in [("edge", &edge.daemon), ("hub", &hub.daemon)] {
        let have = kv_values(d, &keys);
        for (k, v) in &expected {
            if have.get(k) != Some(v) {
                lost.push(format!("{who}: {k}={v} (found {:?})", have.get(k)));
            }
        }
    }
    let mut duplicated = Vec::new();
    let hub_keys = hub.daemon.get("/kv/").json();
    let hub_keys = hub_keys.as_array().expect("key listing");
    if hub_keys.len() != expected.len() {
        let extra: Vec<&Value> = hub_keys
            .iter()
            .filter(|k| !k.as_str().is_some_and(|k| expected.contains_key(k)))
            .take(10)
            .collect();
        duplicated.push(format!(
            "the hub lists {} keys for {} written, e.g. extra {extra:?}",
            hub_keys.len(),
            expected.len()
        ));
    }
    let edges = hub.daemon.get("/v1/edge/edges").json();
    let applied = edges[0]["applied"].as_u64().unwrap_or(0);
    if applied != changes {
        duplicated.push(format!(
            "the hub applied {applied} changes for {changes} made: {edges}"
        ));
    }
    let conflicts = hub.daemon.get("/v1/edge/conflicts").json();
    if conflicts.as_array().is_none_or(|c| !c.is_empty()) {
        duplicated.push(format!("conflicts with itself: {conflicts}"));
    }
    edge.daemon.stop();
    hub.daemon.stop();
    check_integrity(&edge.db, "edge, clean stop", &mut integrity_failures);
    check_integrity(&hub.db, "hub, clean stop", &mut integrity_failures);

    crate::summary(format!(
        "faults sync-kill9: runs={n} kills(edge={}, hub={}, mid-drain={mid_drain}) acked={changes} lost={} duplicated={} integrity={}",
        kills[0],
        kills[1],
        lost.len(),
        duplicated.len(),
        if integrity_failures.is_empty() { "ok" } else { "FAILED" }
    ));
    assert!(
        lost.is_empty(),
        "{} lost, e.g. {:?}",
        lost.len(),
        &lost[..lost.len().min(20)]
    );
    assert!(duplicated.is_empty(), "{duplicated:?}");
    assert!(integrity_failures.is_empty(), "{integrity_failures:?}");
}
