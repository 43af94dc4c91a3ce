//! Fleet view load check, run by hand (not in CI):
//!
//!     cargo bench --bench fleet_view
//!     BENCH_EDGES=1000 BENCH_DEVICES=10 BENCH_LOOKS=200 cargo bench --bench fleet_view
//!
//! A hub fed by BENCH_EDGES simulated edges (one sync request each,
//! carrying BENCH_DEVICES device records and an active alert for one of
//! them), then the time of the fleet page's requests at the hub, p50/p99
//! over BENCH_LOOKS requests each on one keep-alive connection: the first
//! page of edges, edges sorted by device count with a text filter, the
//! first page of devices and of alerts, and the whole `/v1/edge/edges`.

use std::time::{Duration, Instant};

use common::{call, connect, env_usize, start};
use konsul_edge::sync::testing;

#[path = "common.rs"]
mod common;

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let edges = env_usize("BENCH_EDGES", 1000);
    let devices = env_usize("BENCH_DEVICES", 10);
    let looks = env_usize("BENCH_LOOKS", 200);

    let tmp = tempfile::tempdir().unwrap();
    let config = tmp.path().join("edge.yaml");
    let token = tmp.path().join("admin.token");
    std::fs::write(&token, "fleet-bench-admin-token").unwrap();
    std::fs::set_permissions(&token, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    std::fs::write(
        &config,
        format!(
            "node_id: hub\nlog_level: warn\nresources: {{storage_limit: 2Gi}}\nstorage: {{path: {}, max_size: 1Gi}}\n\
             http: {{listen: '127.0.0.1:0', max_body_size: 8Mi}}\ncloud: {{sync_interval: 5m}}\n\
             acl: {{enabled: true, tokens: [{{name: bench, file: {}, policies: ['builtin:admin']}}]}}\n",
            tmp.path().join("hub.db").display(),
            token.display()
        ),
    )
    .unwrap();
    let hub = start("hub", &config);
    let mut c = connect(&hub.addr);
    let t = Instant::now();
    for e in 0..edges {
        let body = testing::fleet_batch(&format!("sim-{e:04}"), devices, 1, true);
        let (st, resp) = call(
            &mut c,
            "POST",
            "/v1/edge/sync",
            &body,
            "Content-Type: application/x-protobuf\r\nContent-Encoding: snappy\r\n",
        );
        assert_eq!(st, 200, "{}", String::from_utf8_lossy(&resp));
    }
    println!(
        "hub loaded: {edges} edges, {} devices, {edges} active alerts in {:.1} s",
        edges * devices,
        t.elapsed().as_secs_f64()
    );

    let mut time = |what: &str, path: &str, check: &dyn Fn(&serde_json::Value)| {
        let mut lat: Vec<Duration> = (0..looks)
            .map(|_| {
                let t = Instant::now();
                let (st, body) = call(
                    &mut c,
                    "GET",
                    path,
                    b"",
                    "Authorization: Bearer fleet-bench-admin-token\r\n",
                );
                let took = t.elapsed();
                assert_eq!(st, 200, "{path}: {}", String::from_utf8_lossy(&body));
                check(&serde_json::from_slice(&body).unwrap());
                took
            })
            .collect();
        lat.sort();
        let pct = |p: f64| lat[((lat.len() - 1) as f64 * p) as usize].as_secs_f64() * 1e3;
        println!(
            "{what:<44} p50 {:>7.2} ms  p99 {:>7.2} ms  ({path})",
            pct(0.5),
            pct(0.99)
        );
    };
    let total = move |want: usize| {
        move |v: &serde_json::Value| assert_eq!(v["total"], want, "{}", v["total"])
    };
    time(
        "edges, first page of 50",
        "/v1/edge/fleet/edges",
        &total(edges),
    );
    time(
        "edges by device count, filtered",
        "/v1/edge/fleet/edges?sort=devices&desc=1&q=sim-09",
        &|v| assert!(v["items"].as_array().is_some_and(|i| !i.is_empty())),
    );
    time(
        "devices, first page of 50",
        "/v1/edge/fleet/devices",
        &total(edges * devices),
    );
    time(
        "alerts, first page of 50",
        "/v1/edge/fleet/alerts",
        &total(edges),
    );
    time("the whole /v1/edge/edges", "/v1/edge/edges", &|v| {
        assert_eq!(v.as_array().map(Vec::len), Some(edges))
    });
}
