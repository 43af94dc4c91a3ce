//! Load generator for the local HTTP API, run by hand (not in CI):
//!
//!     cargo bench --bench http_api                # 10,000 registrations
//!     BENCH_N=50000 BENCH_CLIENTS=8 cargo bench --bench http_api
//!
//! Starts the real daemon (built with the release profile settings) on an
//! ephemeral port with a fresh database, then measures: binary size, start
//! to READY, RSS idle, register throughput and p50/p99 latency over
//! keep-alive connections, lookup throughput and latency, RSS after the
//! registrations.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::env_usize;

#[path = "common.rs"]
mod common;

const BIN: &str = env!("CARGO_BIN_EXE_konsul-edge");

struct Conn {
    r: BufReader<TcpStream>,
    w: TcpStream,
}

impl Conn {
    fn new(addr: &str) -> Conn {
        let s = TcpStream::connect(addr).expect("connect");
        s.set_nodelay(true).unwrap();
        Conn {
            r: BufReader::new(s.try_clone().unwrap()),
            w: s,
        }
    }

    fn call(&mut self, method: &str, path: &str, body: &str) -> u16 {
        write!(
            self.w,
            "{method} {path} HTTP/1.1\r\nHost: b\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        )
        .unwrap();
        let mut line = String::new();
        self.r.read_line(&mut line).unwrap();
        let status: u16 = line.split_whitespace().nth(1).unwrap().parse().unwrap();
        let mut len = 0usize;
        loop {
            line.clear();
            self.r.read_line(&mut line).unwrap();
            if line == "\r\n" {
                break;
            }
            if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                len = v.trim().parse().unwrap();
            }
        }
        let mut body = vec![0; len];
        self.r.read_exact(&mut body).unwrap();
        status
    }
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

fn run_phase(
    name: &str,
    addr: &str,
    clients: usize,
    n: usize,
    req: impl Fn(usize) -> (&'static str, String, String) + Sync,
) {
    let started = Instant::now();
    let mut lat: Vec<Duration> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..clients)
            .map(|c| {
                let req = &req;
                s.spawn(move || {
                    let mut conn = Conn::new(addr);
                    let mut lat = Vec::with_capacity(n / clients + 1);
                    for i in (c..n).step_by(clients) {
                        let (m, p, b) = req(i);
                        let t = Instant::now();
                        let st = conn.call(m, &p, &b);
                        lat.push(t.elapsed());
                        assert_eq!(st, 200, "{m} {p}");
                    }
                    lat
                })
            })
            .collect();
        handles
            .into_iter()
            .flat_map(|h| h.join().unwrap())
            .collect()
    });
    let total = started.elapsed();
    lat.sort();
    println!(
        "{name:<10} {n} requests, {clients} clients: {:.0} req/s, p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
        n as f64 / total.as_secs_f64(),
        percentile(&lat, 0.50).as_secs_f64() * 1e3,
        percentile(&lat, 0.99).as_secs_f64() * 1e3,
        lat.last().unwrap().as_secs_f64() * 1e3,
    );
}

fn main() {
    // `cargo bench` passes --bench; `cargo test --benches` would too. Only
    // run when asked for explicitly.
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let n = env_usize("BENCH_N", 10_000);
    let clients = env_usize("BENCH_CLIENTS", 4);
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("edge.yaml");
    std::fs::write(
        &cfg,
        format!(
            "node_id: bench\nresources: {{storage_limit: 2Gi}}\nstorage: {{path: {}, max_size: 1Gi}}\nhttp: {{listen: '127.0.0.1:0'}}\nservices: {{max_local_services: {}}}\nlog_level: warn\nacl: {{enabled: false}}\n",
            dir.path().join("k.db").display(),
            n + 10
        ),
    )
    .unwrap();
    println!(
        "binary: {} bytes ({}, profile settings of `release`)",
        std::fs::metadata(BIN).unwrap().len(),
        BIN
    );
    let t0 = Instant::now();
    let mut child = Command::new(BIN)
        .args(["run", "--config"])
        .arg(&cfg)
        .env("KONSUL_LOG", "info")
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = BufReader::new(child.stderr.take().unwrap());
    let mut lines = stderr.lines();
    let ready = lines
        .by_ref()
        .map_while(Result::ok)
        .find(|l| l.contains(" ready in "))
        .expect("daemon ready line");
    let ready_wall = t0.elapsed();
    let addr = ready
        .split("API on http://")
        .nth(1)
        .unwrap()
        .split(',')
        .next()
        .unwrap()
        .to_string();
    std::thread::spawn(move || for _ in lines {});
    let pid = child.id();
    println!(
        "start: READY after {:.1} ms wall (daemon reports: {})",
        ready_wall.as_secs_f64() * 1e3,
        ready
            .split(" ready in ")
            .nth(1)
            .and_then(|s| s.split(':').next())
            .unwrap_or("?")
    );
    std::thread::sleep(Duration::from_secs(2));
    println!("rss idle: {} KiB", rss_kib(pid));

    run_phase("register", &addr, clients, n, |i| {
        (
            "PUT",
            "/register".into(),
            format!(
                r#"{{"name":"svc-{i}","address":"10.{}.{}.{}","port":8080,"tags":["bench","v1"],"meta":{{"zone":"z{}"}}}}"#,
                i >> 16 & 255,
                i >> 8 & 255,
                i & 255,
                i % 7
            ),
        )
    });
    run_phase("lookup", &addr, clients, n, |i| {
        (
            "GET",
            format!("/services/svc-{}", (i * 7919) % n),
            String::new(),
        )
    });
    run_phase("kv put", &addr, clients, n / 2, |i| {
        (
            "PUT",
            format!("/kv/bench/{i}"),
            r#"{"value":"some config value"}"#.into(),
        )
    });
    println!("rss after {n} registrations: {} KiB", rss_kib(pid));
    let db = std::fs::metadata(dir.path().join("k.db"))
        .map(|m| m.len())
        .unwrap_or(0);
    println!("db file: {} KiB", db / 1024);
    let _ = Command::new("kill").arg(pid.to_string()).status();
    let _ = child.wait();
}
