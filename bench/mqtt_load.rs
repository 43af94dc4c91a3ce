//! MQTT load benchmark, run by hand (not in CI):
//!
//!     cargo bench --bench mqtt_load
//!     BENCH_DEVICES=1000 BENCH_N=100000 BENCH_PUBLISHERS=4 cargo bench --bench mqtt_load
//!     BENCH_SPARKPLUG=1 cargo bench --bench mqtt_load
//!
//! BENCH_SPARKPLUG=1 turns the Sparkplug B edge node on (a DBIRTH per
//! device, a DDATA per telemetry message, on the same broker), so the
//! ingest figure with and without it is the node's cost; a QoS 0
//! subscriber to the node's DDATA and DBIRTH counts what a host would
//! receive (a device's first telemetry after its registration is a DBIRTH,
//! its new metrics need one; every later one a DDATA).
//!
//! Starts a private mosquitto (ephemeral port, no persistence) and the real
//! daemon (release profile) with a fresh database, then:
//! 1. registers BENCH_DEVICES devices over MQTT (QoS 1), 50 in flight, and
//!    reports register -> ack latency p50/p99 (the ack is published after
//!    the registration committed);
//! 2. publishes BENCH_N telemetry messages (QoS 1) for those devices from
//!    BENCH_PUBLISHERS connections and reports sustained ingest in msg/s:
//!    from the first publish until a sentinel registration sent after the
//!    last one is acked (messages are applied in order, so everything
//!    before it is committed);
//! 3. reports the daemon's RSS (current and peak) under that load, its
//!    CPU time per message and the messages per store transaction (from
//!    /metrics);
//! 4. replays the same telemetry load against `mosquitto_sub -q 1`
//!    consuming it instead of the daemon: the broker's ceiling on this
//!    machine, so the ingest figure reads as a ratio.
//!
//! The devices are simulated by a few connections publishing on their
//! topics: the daemon sees the same topics and payloads as from 1,000
//! separate clients, without 1,000 paho clients' threads in the bench.

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::net::{TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{env_usize, metric};
use paho_mqtt as paho;

#[path = "common.rs"]
mod common;

const BIN: &str = env!("CARGO_BIN_EXE_konsul-edge");
const DEADLINE: Duration = Duration::from_secs(600);

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

struct Kill(Child);
impl Drop for Kill {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn broker(dir: &std::path::Path) -> (Kill, u16) {
    let port = free_port();
    let conf = dir.join("mosquitto.conf");
    let mut text = format!(
        "listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n\
         max_queued_messages 1000000\n"
    );
    if std::fs::metadata("/proc/self").is_ok_and(|m| {
        use std::os::unix::fs::MetadataExt;
        m.uid() == 0
    }) {
        text.push_str("user root\n");
    }
    std::fs::write(&conf, text).unwrap();
    let child = Command::new("mosquitto")
        .arg("-c")
        .arg(&conf)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("mosquitto");
    let end = Instant::now() + Duration::from_secs(10);
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < end, "mosquitto did not start");
        std::thread::sleep(Duration::from_millis(20));
    }
    (Kill(child), port)
}

fn client(port: u16, id: &str) -> paho::AsyncClient {
    let c = paho::CreateOptionsBuilder::new()
        .server_uri(format!("tcp://127.0.0.1:{port}"))
        .client_id(id)
        .persistence(paho::PersistenceType::None)
        .max_buffered_messages(100_000)
        .create_client()
        .unwrap();
    c.connect(
        paho::ConnectOptionsBuilder::new_v3()
            .clean_session(true)
            .max_inflight(1000)
            .finalize(),
    )
    .wait()
    .expect("connect");
    c
}

fn rss_kib(pid: u32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with(field))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// User + system CPU seconds the process has used so far.
fn cpu_secs(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the parenthesised command name; utime and stime are the
    // 14th and 15th fields overall, in clock ticks (100 per second here).
    let rest = stat.rsplit_once(") ").map(|(_, r)| r).unwrap_or("");
    let f: Vec<u64> = rest
        .split_whitespace()
        .map(|v| v.parse().unwrap_or(0))
        .collect();
    f.get(11)
        .zip(f.get(12))
        .map_or(0.0, |(u, s)| (u + s) as f64 / 100.0)
}

fn pct(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

/// Publishes `n` telemetry messages round-robin over `devices`, spread over
/// `publishers` connections, QoS 1, many in flight. Returns when the broker
/// has acknowledged them all.
fn publish_telemetry(port: u16, devices: usize, n: usize, publishers: usize, tag: &str) {
    let threads: Vec<_> = (0..publishers)
        .map(|p| {
            let tag = tag.to_owned();
            std::thread::spawn(move || {
                let c = client(port, &format!("pub-{tag}-{p}"));
                let mut tokens = Vec::with_capacity(1000);
                let mut i = p;
                while i < n {
                    let d = i % devices;
                    let body = format!(
                        r#"{{"temp":{}.5,"hum":{},"n":{i}}}"#,
                        15 + i % 20,
                        30 + i % 50
                    );
                    tokens.push(c.publish(paho::Message::new(
                        format!("devices/bench-{d}/telemetry"),
                        body,
                        1,
                    )));
                    if tokens.len() >= 500 {
                        for t in tokens.drain(..) {
                            t.wait().expect("publish");
                        }
                    }
                    i += publishers;
                }
                for t in tokens {
                    t.wait().expect("publish");
                }
                let _ = c.disconnect(None).wait();
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
}

fn main() {
    let devices = env_usize("BENCH_DEVICES", 1000);
    let n = env_usize("BENCH_N", 100_000);
    let publishers = env_usize("BENCH_PUBLISHERS", 4).max(1);
    let sparkplug = env_usize("BENCH_SPARKPLUG", 0) == 1;
    let dir = tempfile::tempdir().unwrap();
    let (_broker, port) = broker(dir.path());
    let http_port = free_port();
    let api = format!("127.0.0.1:{http_port}");

    let config = dir.path().join("edge.yaml");
    std::fs::write(
        &config,
        format!(
            "node_id: bench\nresources: {{storage_limit: 1Gi}}\nstorage: {{path: {db}, max_size: 512Mi}}\n\
             http: {{listen: \"127.0.0.1:{http_port}\"}}\n\
             services: {{max_local_services: {cap}}}\n\
             devices: {{max_devices: {cap}, telemetry_max_size: 64Mi}}\n\
             mqtt: {{enabled: true, broker: \"tcp://127.0.0.1:{port}\", client_id: bench-edge, qos: 1}}\n\
             acl: {{enabled: false}}\n{spb}",
            db = dir.path().join("konsul.db").display(),
            cap = devices + 10,
            spb = if sparkplug {
                "sparkplug: {enabled: true, group_id: bench}\n"
            } else {
                ""
            },
        ),
    )
    .unwrap();
    let mut daemon = Command::new(BIN)
        .args(["run", "--config"])
        .arg(&config)
        .env("KONSUL_LOG", "warn")
        .env_remove("NOTIFY_SOCKET")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("daemon");
    let pid = daemon.id();
    // KONSUL_LOG=warn hides the ready line; wait for the subscription on
    // the broker side instead: our registration gets acked once it is up.
    let stderr = daemon.stderr.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            eprintln!("[daemon] {line}");
        }
    });
    let _daemon = Kill(daemon);
    let bin_size = std::fs::metadata(BIN).map(|m| m.len()).unwrap_or(0);

    // --- 1. registrations ---------------------------------------------------
    let acks: Arc<Mutex<HashMap<String, Instant>>> = Arc::default();
    let ack_client = client(port, "bench-acks");
    {
        let acks = acks.clone();
        ack_client.set_message_callback(move |_, m| {
            if let Some(m) = m {
                acks.lock()
                    .unwrap()
                    .insert(m.topic().to_owned(), Instant::now());
            }
        });
    }
    ack_client
        .subscribe("devices/+/ack", 1)
        .wait()
        .expect("subscribe");
    let reg = client(port, "bench-register");
    let register = |id: &str| {
        reg.publish(paho::Message::new(
            format!("devices/{id}/register"),
            format!(r#"{{"type":"sensor","name":"{id}","telemetry_interval":"1h"}}"#),
            1,
        ))
    };
    // The daemon subscribes asynchronously: probe until the first ack.
    let end = Instant::now() + Duration::from_secs(30);
    loop {
        register("bench-probe").wait().unwrap();
        std::thread::sleep(Duration::from_millis(100));
        if acks.lock().unwrap().contains_key("devices/bench-probe/ack") {
            break;
        }
        assert!(Instant::now() < end, "the daemon never acked");
    }
    let idle_rss = rss_kib(pid, "VmRSS:");

    let window = 50;
    let mut sent: Vec<(String, Instant)> = Vec::with_capacity(devices);
    let started = Instant::now();
    for d in 0..devices {
        let id = format!("bench-{d}");
        let t = Instant::now();
        register(&id);
        sent.push((format!("devices/{id}/ack"), t));
        // keep at most `window` registrations unacknowledged
        while sent.len() - acks.lock().unwrap().len().saturating_sub(1) > window {
            std::thread::sleep(Duration::from_micros(200));
            assert!(started.elapsed() < DEADLINE);
        }
    }
    while acks.lock().unwrap().len() < devices + 1 {
        std::thread::sleep(Duration::from_millis(5));
        assert!(started.elapsed() < DEADLINE, "acks missing");
    }
    let reg_time = started.elapsed();
    let mut lat: Vec<Duration> = {
        let a = acks.lock().unwrap();
        sent.iter()
            .map(|(topic, t)| a[topic].duration_since(*t))
            .collect()
    };
    lat.sort();

    // --- 2. telemetry through the daemon -------------------------------------
    let rss_peak = Arc::new(Mutex::new(0u64));
    let sampling = Arc::new(std::sync::atomic::AtomicBool::new(true));
    let sampler = {
        let (peak, on) = (rss_peak.clone(), sampling.clone());
        std::thread::spawn(move || {
            while on.load(std::sync::atomic::Ordering::Relaxed) {
                let r = rss_kib(pid, "VmRSS:");
                let mut p = peak.lock().unwrap();
                *p = (*p).max(r);
                drop(p);
                std::thread::sleep(Duration::from_millis(50));
            }
        })
    };
    // What a Sparkplug host would receive (QoS 0, as hosts subscribe).
    let ddata = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let spb_host = sparkplug.then(|| {
        let c = client(port, "bench-sparkplug-host");
        let count = ddata.clone();
        c.set_message_callback(move |_, m| {
            if m.is_some() {
                count.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
        });
        c.subscribe_many(
            &["spBv1.0/bench/DDATA/#", "spBv1.0/bench/DBIRTH/#"],
            &[0, 0],
        )
        .wait()
        .expect("subscribe");
        c
    });
    let cpu0 = cpu_secs(pid);
    let batches0 = metric(&api, "konsul_edge_mqtt_batches_total");
    let t0 = Instant::now();
    publish_telemetry(port, devices, n, publishers, "edge");
    let published = t0.elapsed();
    register("bench-sentinel").wait().unwrap();
    while !acks
        .lock()
        .unwrap()
        .contains_key("devices/bench-sentinel/ack")
    {
        std::thread::sleep(Duration::from_millis(2));
        assert!(t0.elapsed() < DEADLINE, "sentinel never acked");
    }
    let ingest = t0.elapsed();
    let cpu = cpu_secs(pid) - cpu0;
    let batches = metric(&api, "konsul_edge_mqtt_batches_total") - batches0;
    sampling.store(false, std::sync::atomic::Ordering::Relaxed);
    sampler.join().unwrap();
    let rss_load = *rss_peak.lock().unwrap();
    let hwm = rss_kib(pid, "VmHWM:");
    let ddata_seen = ddata.load(std::sync::atomic::Ordering::Relaxed);
    // The node publishes after each commit: how long until the host has
    // one DDATA or DBIRTH per message (or the count stops moving for 2 s).
    let (mut ddata_all, mut last_change, caught_up) = (ddata_seen, Instant::now(), Instant::now());
    while sparkplug && ddata_all < n as u64 && last_change.elapsed() < Duration::from_secs(2) {
        std::thread::sleep(Duration::from_millis(20));
        let now = ddata.load(std::sync::atomic::Ordering::Relaxed);
        if now != ddata_all {
            (ddata_all, last_change) = (now, Instant::now());
        }
    }
    let lag = if ddata_all >= n as u64 {
        last_change.duration_since(caught_up)
    } else {
        Duration::ZERO
    };
    drop(spb_host);

    // --- 3. the broker's ceiling: mosquitto_sub consumes the same load -------
    // A fresh broker of its own: on the first one the daemon's persistent
    // session would keep queueing a copy of every message.
    drop(_daemon);
    let cdir = tempfile::tempdir().unwrap();
    let (_cbroker, cport) = broker(cdir.path());
    // The retained probe is the first message it prints: once it has, it
    // is subscribed and nothing published after can be missed.
    let probe = client(cport, "bench-probe");
    probe
        .publish(paho::Message::new_retained(
            "devices/probe/telemetry",
            "{}",
            1,
        ))
        .wait()
        .unwrap();
    let _ = probe.disconnect(None).wait();
    let mut sub = Command::new("mosquitto_sub")
        .args(["-h", "127.0.0.1", "-p", &cport.to_string(), "-q", "1"])
        .args([
            "-t",
            "devices/+/telemetry",
            "-C",
            &n.to_string(),
            "-i",
            "bench-ceiling",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("mosquitto_sub");
    let mut out = BufReader::new(sub.stdout.take().unwrap());
    let mut first = String::new();
    out.read_line(&mut first).expect("mosquitto_sub output");
    let drain = std::thread::spawn(move || {
        let mut sink = Vec::new();
        let _ = std::io::Read::read_to_end(&mut out, &mut sink);
    });
    let t1 = Instant::now();
    publish_telemetry(cport, devices, n - 1, publishers, "ceiling");
    let ok = sub.wait().map(|s| s.success()).unwrap_or(false);
    let ceiling = t1.elapsed();
    let _ = drain.join();

    let rate = n as f64 / ingest.as_secs_f64();
    let ceiling_rate = n as f64 / ceiling.as_secs_f64();
    println!("konsul-edge MQTT load benchmark");
    println!("  binary                      {BIN} ({bin_size} bytes)");
    println!("  devices                     {devices}");
    println!(
        "  register -> ack             {} in {:.2}s; p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
        devices,
        reg_time.as_secs_f64(),
        pct(&lat, 0.50).as_secs_f64() * 1e3,
        pct(&lat, 0.99).as_secs_f64() * 1e3,
        lat.last().copied().unwrap_or_default().as_secs_f64() * 1e3
    );
    println!(
        "  telemetry ingest            {n} msgs (QoS 1, {publishers} publishers) in {:.2}s \
         (published in {:.2}s): {rate:.0} msg/s",
        ingest.as_secs_f64(),
        published.as_secs_f64()
    );
    if sparkplug {
        println!(
            "  sparkplug                   on: {ddata_seen} DDATA/DBIRTH at a QoS 0 host by the sentinel's ack, \
             {ddata_all} of {n} in all ({:.2}s later)",
            lag.as_secs_f64()
        );
    }
    println!(
        "  daemon work                 {:.1} us CPU per message ({:.2} s CPU), {:.0} messages per store transaction",
        cpu * 1e6 / n as f64,
        cpu,
        n as f64 / batches as f64
    );
    println!(
        "  broker ceiling              mosquitto_sub -q 1 consumed {n} in {:.2}s: {ceiling_rate:.0} msg/s{}",
        ceiling.as_secs_f64(),
        if ok { "" } else { " (mosquitto_sub failed!)" }
    );
    println!(
        "  ratio                       {:.0}% of the broker ceiling",
        100.0 * rate / ceiling_rate
    );
    println!(
        "  daemon RSS                  idle {:.1} MiB, under load peak {:.1} MiB (VmHWM {:.1} MiB)",
        idle_rss as f64 / 1024.0,
        rss_load as f64 / 1024.0,
        hwm as f64 / 1024.0
    );
}
