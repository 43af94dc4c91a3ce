//! Sync benchmark, run by hand (not in CI):
//!
//!     cargo bench --bench sync_load
//!     BENCH_EDGES=1000 BENCH_REQUESTS=20000 cargo bench --bench sync_load
//!
//! 1. bytes on the wire per changed service in a batch of 100 (encoded and
//!    snappy-compressed exactly as an edge sends it), and the same measured
//!    end to end from the edge's `konsul_edge_sync_bytes_sent_total`;
//! 2. time for a real edge to drain 10,000 queued changes to a real hub;
//! 3. hub sync requests per second from simulated edges (each request from
//!    one of BENCH_EDGES edge ids, carrying one changed service), p50/p99.
//!
//! On a throttled link instead (a proxy at BENCH_RATE bytes/s, default
//! 10,000, with BENCH_LATENCY_MS each way, default 300):
//!
//!     cargo bench --bench sync_load -- --throttled
//!     BENCH_BIN=/path/to/older/konsul-edge cargo bench --bench sync_load -- --throttled
//!
//! BENCH_CHANGES (default 5,000) services registered, then drained with
//! `sync now`: bytes on the link per
//! changed service, drain time and the longest round (one connection per
//! round). BENCH_BIN runs another build of the daemon (before/after).

use std::path::Path;
use std::time::{Duration, Instant};

use common::{call, connect, env_usize, metric, start};
use konsul_edge::sync::testing;

#[path = "common.rs"]
mod common;
// The bench uses a fixed link; the tests also change it mid-run.
#[allow(dead_code)]
#[path = "../tests/common/throttle.rs"]
mod throttle;

fn get_json(addr: &str, path: &str) -> serde_json::Value {
    let mut c = connect(addr);
    let (_, b) = call(&mut c, "GET", path, b"", "");
    serde_json::from_slice(&b).unwrap()
}

fn wait(what: &str, mut cond: impl FnMut() -> bool) {
    let end = Instant::now() + Duration::from_secs(600);
    while !cond() {
        assert!(Instant::now() < end, "timed out: {what}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    if std::env::args().any(|a| a == "--throttled") {
        return throttled();
    }
    let edges = env_usize("BENCH_EDGES", 1000);
    let requests = env_usize("BENCH_REQUESTS", 10_000);

    // 1a. Encoding alone.
    let plain = testing::service_batch("edge-0001", 0, 100, false).len();
    let snappy = testing::service_batch("edge-0001", 0, 100, true).len();
    println!(
        "wire: batch of 100 changed services = {plain} B protobuf, {snappy} B with snappy ({:.0} B per service)",
        snappy as f64 / 100.0
    );

    let tmp = tempfile::tempdir().unwrap();
    let hub_dir = tmp.path().join("hub");
    let edge_dir = tmp.path().join("edge");
    std::fs::create_dir_all(&hub_dir).unwrap();
    std::fs::create_dir_all(&edge_dir).unwrap();
    std::fs::write(
        hub_dir.join("edge.yaml"),
        format!(
            "node_id: hub\nlog_level: warn\nresources: {{storage_limit: 2Gi}}\nstorage: {{path: {}, max_size: 1Gi}}\nhttp: {{listen: '127.0.0.1:0', max_body_size: 8Mi}}\nacl: {{enabled: false}}\n",
            hub_dir.join("hub.db").display()
        ),
    )
    .unwrap();
    let hub = start("hub", &hub_dir.join("edge.yaml"));
    let (acl, auth) = admin(&edge_dir);
    std::fs::write(
        edge_dir.join("edge.yaml"),
        format!(
            "node_id: bench-edge\nlog_level: warn\nresources: {{storage_limit: 2Gi}}\nstorage: {{path: {}, max_size: 1Gi}}\nhttp: {{listen: '127.0.0.1:0'}}\n\
             services: {{max_local_services: 1000}}\ncloud: {{server_address: 'http://{}', sync_interval: 1h}}\n{acl}",
            edge_dir.join("edge.db").display(),
            hub.addr
        ),
    )
    .unwrap();
    let edge = start("run", &edge_dir.join("edge.yaml"));

    // 1b. End to end: 100 registrations, one sync.
    let mut c = connect(&edge.addr);
    for i in 0..100 {
        let body = format!(
            r#"{{"name":"svc-{i}","address":"10.0.{}.{}","port":8080,"tags":["pos","v2"]}}"#,
            i / 256,
            i % 256
        );
        assert_eq!(call(&mut c, "PUT", "/register", body.as_bytes(), "").0, 200);
    }
    let before = metric(&edge.addr, "konsul_edge_sync_bytes_sent_total");
    assert_eq!(call(&mut c, "POST", "/v1/edge/sync/now", b"", &auth).0, 202);
    wait("first sync", || {
        get_json(&edge.addr, "/v1/edge/status")["sync"]["pending_changes"] == 0
            && metric(&edge.addr, "konsul_edge_sync_requests_total") > 0
    });
    let sent = metric(&edge.addr, "konsul_edge_sync_bytes_sent_total") - before;
    println!(
        "wire, end to end: 100 registrations synced in {sent} B sent ({:.0} B per service)",
        sent as f64 / 100.0
    );

    // 2. Drain 10,000 queued changes.
    for chunk in 0..10 {
        let items: serde_json::Map<String, serde_json::Value> = (chunk * 1000..(chunk + 1) * 1000)
            .map(|i| {
                (
                    format!("sensor/{i}"),
                    serde_json::Value::String(format!("reading {i}")),
                )
            })
            .collect();
        let body = serde_json::json!({ "items": items }).to_string();
        assert_eq!(
            call(&mut c, "POST", "/batch/kv/set", body.as_bytes(), "").0,
            200
        );
    }
    let requests_before = metric(&edge.addr, "konsul_edge_sync_requests_total");
    let t = Instant::now();
    assert_eq!(call(&mut c, "POST", "/v1/edge/sync/now", b"", &auth).0, 202);
    wait("drain", || {
        get_json(&edge.addr, "/v1/edge/status")["sync"]["pending_changes"] == 0
            && get_json(&edge.addr, "/v1/edge/status")["outbox_pending"] == 0
    });
    println!(
        "drain: 10,000 queued changes in {:.2} s, {} requests",
        t.elapsed().as_secs_f64(),
        metric(&edge.addr, "konsul_edge_sync_requests_total") - requests_before
    );

    // 3. Hub throughput with simulated edges.
    let clients = 4;
    let t = Instant::now();
    let mut lat: Vec<Duration> = std::thread::scope(|s| {
        let hs: Vec<_> = (0..clients)
            .map(|cl| {
                let addr = hub.addr.clone();
                s.spawn(move || {
                    let mut conn = connect(&addr);
                    let mut lat = Vec::new();
                    for r in (cl..requests).step_by(clients) {
                        let edge = format!("sim-{:04}", r % edges);
                        let body = testing::service_batch(&edge, 0, 1, true);
                        let t = Instant::now();
                        let (st, resp) = call(
                            &mut conn,
                            "POST",
                            "/v1/edge/sync",
                            &body,
                            "Content-Type: application/x-protobuf\r\nContent-Encoding: snappy\r\n",
                        );
                        lat.push(t.elapsed());
                        assert_eq!(st, 200, "{}", String::from_utf8_lossy(&resp));
                        testing::response_summary(&resp, true).unwrap();
                    }
                    lat
                })
            })
            .collect();
        hs.into_iter().flat_map(|h| h.join().unwrap()).collect()
    });
    let total = t.elapsed();
    lat.sort();
    let pct = |p: f64| lat[((lat.len() - 1) as f64 * p) as usize].as_secs_f64() * 1e3;
    println!(
        "hub: {requests} sync requests from {edges} simulated edges, {clients} connections: {:.0} req/s, p50 {:.2} ms, p99 {:.2} ms",
        requests as f64 / total.as_secs_f64(),
        pct(0.5),
        pct(0.99)
    );
    let listed = get_json(&hub.addr, "/v1/edge/edges");
    println!(
        "hub lists {} edges",
        listed.as_array().map_or(0, |a| a.len())
    );
}

/// An admin token for the daemon in `dir` ("sync now" needs one even
/// with ACLs off: the one access rule): its `acl:` line and the header.
fn admin(dir: &Path) -> (String, String) {
    let token = "bench-admin-token";
    let path = dir.join("admin.token");
    std::fs::write(&path, token).unwrap();
    std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    (
        format!(
            "acl: {{tokens: [{{name: bench, file: {}, policies: ['builtin:admin']}}]}}\n",
            path.display()
        ),
        format!("X-API-Key: {token}\r\n"),
    )
}

fn throttled() {
    let rate = env_usize("BENCH_RATE", 10_000) as u64;
    let latency = Duration::from_millis(env_usize("BENCH_LATENCY_MS", 300) as u64);
    let changes = env_usize("BENCH_CHANGES", 5_000);
    let tmp = tempfile::tempdir().unwrap();
    let (hub_dir, edge_dir) = (tmp.path().join("hub"), tmp.path().join("edge"));
    std::fs::create_dir_all(&hub_dir).unwrap();
    std::fs::create_dir_all(&edge_dir).unwrap();
    std::fs::write(
        hub_dir.join("edge.yaml"),
        format!(
            "node_id: hub\nlog_level: warn\nstorage: {{path: {}}}\nhttp: {{listen: '127.0.0.1:0'}}\nacl: {{enabled: false}}\n",
            hub_dir.join("hub.db").display()
        ),
    )
    .unwrap();
    let hub = start("hub", &hub_dir.join("edge.yaml"));
    let link = throttle::Throttle::start(&hub.addr, rate, latency);
    let (acl, auth) = admin(&edge_dir);
    // Only keys every release knows, so BENCH_BIN can run an older build.
    std::fs::write(
        edge_dir.join("edge.yaml"),
        format!(
            "node_id: bench-edge\nlog_level: info\nstorage: {{path: {}, max_size: 256Mi}}\nhttp: {{listen: '127.0.0.1:0'}}\n\
             services: {{max_local_services: {}}}\ncloud: {{server_address: 'http://{}', sync_interval: 1h}}\n{acl}",
            edge_dir.join("edge.db").display(),
            changes + 100,
            link.addr,
        ),
    )
    .unwrap();
    let edge = start("run", &edge_dir.join("edge.yaml"));
    wait("start-up sync", || {
        get_json(&edge.addr, "/v1/edge/status")["sync"]["last_sync_ms"].is_u64()
    });
    let mut c = connect(&edge.addr);
    for i in 0..changes {
        let body = format!(
            r#"{{"name":"svc-{i}","address":"10.{}.{}.{}","port":8080,"tags":["pos","v2"]}}"#,
            i >> 16 & 255,
            i >> 8 & 255,
            i & 255
        );
        assert_eq!(call(&mut c, "PUT", "/register", body.as_bytes(), "").0, 200);
    }
    let bytes_before = link.bytes();
    let t = Instant::now();
    assert_eq!(call(&mut c, "POST", "/v1/edge/sync/now", b"", &auth).0, 202);
    wait("drain", || {
        get_json(&edge.addr, "/v1/edge/status")["outbox_pending"] == 0
            && get_json(&edge.addr, "/v1/edge/status")["sync"]["pending_changes"] == 0
    });
    let drained = t.elapsed();
    let bytes = link.bytes() - bytes_before;
    println!(
        "throttled link {rate} B/s, {} ms each way: {changes} changed services drained in {:.1} s, \
         {bytes} B on the link ({:.1} B per service), {} rounds, longest round {:.2} s",
        latency.as_millis(),
        drained.as_secs_f64(),
        bytes as f64 / changes as f64,
        metric(&edge.addr, "konsul_edge_sync_requests_total"),
        link.longest().as_secs_f64()
    );
}
