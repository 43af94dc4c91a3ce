//! Offline-first sync with real processes: a hub and edges on ephemeral
//! ports, each with its own SQLite file. The tests, by job:
//! `convergence` (records flow both ways, conflicts, offline edges, kill -9,
//! a lost disk), `hostile` (bad bodies, tokens, mutual TLS, tombstone
//! collection) and `topology` (paging, the hub's own limits, a hub syncing
//! upstream, the offline queue).

#[path = "../common/mod.rs"]
mod common;

mod convergence;
mod hostile;
mod topology;

use std::path::Path;

use common::*;
use serde_json::Value;

fn hub_config(dir: &Path, listen: &str, extra: &str) {
    std::fs::write(
        dir.join("edge.yaml"),
        format!(
            "node_id: hub\nstorage: {{path: {}}}\nhttp: {{listen: '{listen}'}}\n{extra}",
            dir.join("hub.db").display()
        ),
    )
    .unwrap();
}

fn edge_config(dir: &Path, id: &str, hub: &str, extra: &str) {
    std::fs::write(
        dir.join("edge.yaml"),
        format!(
            "node_id: {id}\nstorage: {{path: {}, max_size: 64Mi}}\nhttp: {{listen: '127.0.0.1:0'}}\n\
             services: {{max_local_services: 1000}}\n\
             cloud: {{server_address: 'http://{hub}', sync_interval: 1h}}\n{extra}",
            dir.join("edge.db").display()
        ),
    )
    .unwrap();
}

struct Net {
    _dirs: Vec<tempfile::TempDir>,
    hub_dir: std::path::PathBuf,
    hub: Option<Daemon>,
    edges: Vec<Daemon>,
}

/// A hub and `n` edges (edge-a, edge-b, ...).
fn net(n: usize, edge_extra: &str) -> Net {
    let hub_dir = tempfile::tempdir().unwrap();
    hub_config(hub_dir.path(), "127.0.0.1:0", "");
    let hub = Daemon::start_hub(hub_dir.path());
    let hub_addr = hub.addr.clone();
    // Pin the port so the hub can come back on the same address.
    hub_config(hub_dir.path(), &hub_addr, "");
    let mut dirs = vec![];
    let mut edges = vec![];
    for i in 0..n {
        let d = tempfile::tempdir().unwrap();
        let id = format!("edge-{}", (b'a' + i as u8) as char);
        edge_config(d.path(), &id, &hub_addr, edge_extra);
        edges.push(Daemon::start(d.path()));
        dirs.push(d);
    }
    let hub_path = hub_dir.path().to_path_buf();
    dirs.push(hub_dir);
    Net {
        _dirs: dirs,
        hub_dir: hub_path,
        hub: Some(hub),
        edges,
    }
}

impl Net {
    fn hub(&self) -> &Daemon {
        self.hub.as_ref().expect("hub running")
    }
}

/// Asks `d` to sync and waits until a sync finished after the request with
/// nothing pending.
fn sync(d: &Daemon) {
    let before = d.get("/v1/edge/sync").json()["last_sync_ms"]
        .as_u64()
        .unwrap_or(0);
    let r = d.req("POST", "/v1/edge/sync/now", None);
    assert_eq!(r.status, 202, "{}", r.text());
    eventually("a completed sync", || {
        let s = d.get("/v1/edge/sync").json();
        s["last_sync_ms"].as_u64().unwrap_or(0) > before && s["pending_changes"] == 0
    });
}

fn kv(d: &Daemon, key: &str) -> Option<String> {
    let r = d.get(&format!("/kv/{key}"));
    (r.status == 200).then(|| r.json()["value"].as_str().unwrap().to_owned())
}

/// The addresses of every service `d` lists, sorted.
fn service_addresses(d: &Daemon) -> Vec<String> {
    let mut addrs: Vec<String> = d
        .get("/services/")
        .json()
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["address"].as_str().unwrap().to_owned())
        .collect();
    addrs.sort();
    addrs
}
