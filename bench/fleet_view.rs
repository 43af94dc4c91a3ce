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

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::env_usize;
use konsul_edge::sync::testing;

#[path = "common.rs"]
mod common;

const BIN: &str = env!("CARGO_BIN_EXE_konsul-edge");

struct Proc {
    child: Child,
    addr: String,
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_hub(config: &Path) -> Proc {
    let mut child = Command::new(BIN)
        .args(["hub", "--config"])
        .arg(config)
        .env("KONSUL_LOG", "info")
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let ready = lines
        .by_ref()
        .map_while(Result::ok)
        .find(|l| l.contains(" ready in "))
        .expect("ready line");
    std::thread::spawn(move || for _ in lines {});
    let addr = ready
        .split("://")
        .nth(1)
        .and_then(|s| s.split(',').next())
        .expect("address in the ready line")
        .to_string();
    Proc { child, addr }
}

/// One request on a keep-alive connection; returns (status, body).
fn call(
    conn: &mut (BufReader<TcpStream>, TcpStream),
    method: &str,
    path: &str,
    body: &[u8],
    headers: &str,
) -> (u16, Vec<u8>) {
    write!(
        conn.1,
        "{method} {path} HTTP/1.1\r\nHost: b\r\n{headers}Content-Length: {}\r\n\r\n",
        body.len()
    )
    .unwrap();
    conn.1.write_all(body).unwrap();
    let mut line = String::new();
    conn.0.read_line(&mut line).unwrap();
    let status = line.split_whitespace().nth(1).unwrap().parse().unwrap();
    let mut len = 0;
    loop {
        line.clear();
        conn.0.read_line(&mut line).unwrap();
        if line == "\r\n" {
            break;
        }
        if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
            len = v.trim().parse().unwrap();
        }
    }
    let mut b = vec![0; len];
    conn.0.read_exact(&mut b).unwrap();
    (status, b)
}

fn connect(addr: &str) -> (BufReader<TcpStream>, TcpStream) {
    let s = TcpStream::connect(addr).unwrap();
    s.set_nodelay(true).unwrap();
    (BufReader::new(s.try_clone().unwrap()), s)
}

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
    let hub = start_hub(&config);
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
