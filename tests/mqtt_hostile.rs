//! Hostile MQTT clients against the real daemon and a real mosquitto: a
//! flood of messages that each need a reply, a flood of made-up device ids
//! (log amplification), and QoS 1 messages that must not be acknowledged to
//! the broker before they are committed. Waits are on observable state
//! (metrics, the broker's log, log lines) with deadlines.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::broker::Broker;
use common::*;
use paho_mqtt as paho;

/// How long a probe may take while the daemon is flooded.
const PROBE_LIMIT: Duration = Duration::from_secs(5);

fn mqtt_config(dir: &Path, broker: &Broker, extra: &str) {
    write_config(
        dir,
        &format!(
            "mqtt:\n  enabled: true\n  broker: {}\n  client_id: edge-{}\n  qos: 1\n{extra}",
            broker.url(),
            broker.port
        ),
    );
}

fn start_connected(dir: &Path, env: &[(&str, &str)]) -> Daemon {
    let d = Daemon::start_with(dir, env);
    d.wait_log(|l| l.contains("mqtt::bridge: connected to "))
        .expect("daemon did not connect to the broker");
    d
}

/// A publisher that never re-sends: clean session, no persistence.
fn publisher(broker: &Broker, id: &str) -> paho::AsyncClient {
    let cli = paho::CreateOptionsBuilder::new()
        .server_uri(broker.url())
        .client_id(id)
        .persistence(paho::PersistenceType::None)
        .max_buffered_messages(100_000)
        .create_client()
        .unwrap();
    cli.connect(
        paho::ConnectOptionsBuilder::new_v3()
            .clean_session(true)
            .connect_timeout(DEADLINE)
            .finalize(),
    )
    .wait_for(DEADLINE)
    .expect("publisher connects");
    cli
}

/// GET `path` with a time limit: Some(status) if answered in time.
fn probe(addr: &str, path: &str, limit: Duration) -> Option<u16> {
    let mut s = TcpStream::connect(addr).ok()?;
    s.set_read_timeout(Some(limit)).ok()?;
    s.set_write_timeout(Some(limit)).ok()?;
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes())
        .ok()?;
    let mut head = [0u8; 12];
    s.read_exact(&mut head).ok()?;
    std::str::from_utf8(&head[9..12]).ok()?.parse().ok()
}

/// The sum of a metric family's samples (all labels).
fn metric_sum(d: &Daemon, name: &str) -> u64 {
    d.get("/metrics")
        .text()
        .lines()
        .filter(|l| l.starts_with(name) && !l.starts_with('#'))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum()
}

/// Every remaining line of the daemon's stderr (call after it exited).
fn rest_of_log(d: &Daemon) -> Vec<String> {
    std::iter::from_fn(|| d.log.recv_timeout(DEADLINE).ok()).collect()
}

#[test]
fn a_reply_flood_does_not_freeze_http_dbus_or_sigterm() {
    let dir = tempfile::tempdir().unwrap();
    let broker = Broker::start(dir.path());
    let (mut bus, address) = private_bus(dir.path());
    mqtt_config(
        dir.path(),
        &broker,
        &format!("dbus:\n  enabled: true\n  bus: \"{address}\"\n"),
    );
    let mut d = start_connected(dir.path(), &[]);

    // A prober that keeps asking over HTTP during the flood.
    let stop = Arc::new(AtomicBool::new(false));
    let prober = {
        let (addr, stop) = (d.addr.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut worst = Duration::ZERO;
            let mut failed = 0;
            while !stop.load(Ordering::Relaxed) {
                let t = Instant::now();
                if probe(&addr, "/health/live", PROBE_LIMIT) != Some(200) {
                    failed += 1;
                }
                worst = worst.max(t.elapsed());
                std::thread::sleep(Duration::from_millis(50));
            }
            (worst, failed)
        })
    };

    // 20,000 QoS 0 messages, each of which makes the daemon publish: bad
    // JSON and invalid values (an error each) and re-registrations (an
    // ack each), as fast as the client can send them.
    const FLOOD: usize = 20_000;
    let cli = publisher(&broker, "flooder");
    for i in 0..FLOOD {
        let (topic, body) = match i % 3 {
            0 => (format!("devices/bad-{i}/register"), "{".to_string()),
            1 => (
                format!("devices/inv-{i}/register"),
                r#"{"type":"s","battery":101}"#.to_string(),
            ),
            _ => (
                format!("devices/re-{}/register", i % 50),
                r#"{"type":"sensor"}"#.to_string(),
            ),
        };
        cli.try_publish(paho::Message::new(topic, body, 0))
            .expect("queue the flood");
    }
    // Every message has left the flooder once this QoS 1 marker is acked.
    cli.publish(paho::Message::new("flood/done", "", 1))
        .wait_for(DEADLINE)
        .expect("the flood reached the broker");

    // The daemon works through it, answering HTTP all along.
    wait_for(
        "the daemon to take in the flood",
        Duration::from_secs(60),
        || {
            (probe(&d.addr, "/health/live", PROBE_LIMIT)? == 200
                && metric_sum(&d, "konsul_edge_mqtt_received_total") >= (FLOOD / 2) as u64)
                .then_some(())
        },
    );
    stop.store(true, Ordering::Relaxed);
    let (worst, failed) = prober.join().unwrap();
    assert_eq!(
        failed, 0,
        "HTTP probes went unanswered during the flood (worst {worst:?})"
    );

    // Afterwards: HTTP, D-Bus and the replies' accounting.
    assert_eq!(probe(&d.addr, "/v1/edge/status", PROBE_LIMIT), Some(200));
    let node = std::process::Command::new("timeout")
        .args([
            "10",
            "busctl",
            &format!("--address={address}"),
            "--timeout=5",
        ])
        .args(["get-property", "io.konsul.Edge1", "/io/konsul/Edge1"])
        .args(["io.konsul.Edge1.Registry", "NodeId"])
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&node.stdout).trim(),
        r#"s "test-node""#,
        "D-Bus after the flood: {}",
        String::from_utf8_lossy(&node.stderr)
    );
    let replied = metric_sum(&d, "konsul_edge_mqtt_published_total{kind=\"error\"}")
        + metric_sum(&d, "konsul_edge_mqtt_published_total{kind=\"ack\"}")
        + metric_sum(&d, "konsul_edge_mqtt_replies_dropped_total");
    assert!(replied > 0, "no replies published or dropped");
    eprintln!(
        "flood of {FLOOD}: worst probe {worst:?}, replies published or dropped {replied}, dropped {}",
        metric_sum(&d, "konsul_edge_mqtt_replies_dropped_total")
    );

    // SIGTERM still works (wait_exit fails the test after DEADLINE).
    let t = Instant::now();
    let st = d.stop();
    assert!(st.success(), "exit status {st:?}");
    assert!(
        t.elapsed() < Duration::from_secs(10),
        "SIGTERM took {:?}",
        t.elapsed()
    );
    let _ = bus.kill();
    let _ = bus.wait();
}

#[test]
fn a_flood_of_made_up_ids_costs_a_bounded_number_of_log_lines() {
    let dir = tempfile::tempdir().unwrap();
    let broker = Broker::start(dir.path());
    mqtt_config(dir.path(), &broker, "");
    let mut d = start_connected(dir.path(), &[]);

    // QoS 1, and no more than the broker queues for one client
    // (max_queued_messages, 1,000 by default), so it drops none of them:
    // every one is a rejection.
    const IDS: u64 = 1_000;
    let cli = publisher(&broker, "liar");
    for i in 0..IDS {
        cli.try_publish(paho::Message::new(
            format!("devices/made-up-{i}/register"),
            "{",
            1,
        ))
        .expect("queue");
    }
    cli.publish(paho::Message::new("flood/done", "", 1))
        .wait_for(DEADLINE)
        .expect("the flood reached the broker");
    wait_for("every made-up id rejected", Duration::from_secs(60), || {
        (metric_sum(
            &d,
            "konsul_edge_mqtt_rejected_total{reason=\"malformed_json\"}",
        ) >= IDS)
            .then_some(())
    });
    let suppressed = metric_sum(&d, "konsul_edge_mqtt_log_lines_suppressed_total");
    d.stop();
    let lines: Vec<String> = rest_of_log(&d)
        .into_iter()
        .filter(|l| l.contains("made-up-") || l.contains("not logged"))
        .collect();
    eprintln!(
        "{IDS} made-up ids: {} log lines, {suppressed} suppressed",
        lines.len()
    );
    assert!(
        lines.len() <= 40,
        "{} log lines for {IDS} made-up ids; first: {:?}",
        lines.len(),
        lines.first()
    );
    assert!(
        suppressed + lines.len() as u64 >= IDS,
        "suppressed {suppressed} + logged {} should account for {IDS}",
        lines.len()
    );
}

/// Lines of the broker's log that mention `what` and `topic_part`.
fn broker_lines(broker: &Broker, what: &str, topic_part: &str) -> usize {
    broker
        .log()
        .lines()
        .filter(|l| l.contains(what) && l.contains(topic_part))
        .count()
}

#[test]
fn qos1_messages_the_broker_considers_delivered_are_committed() {
    let dir = tempfile::tempdir().unwrap();
    let broker = Broker::start(dir.path());
    mqtt_config(dir.path(), &broker, "");
    let hooks = [("KONSUL_TEST_HOOKS", "1")];
    let mut d = start_connected(dir.path(), &hooks);
    let client = format!("edge-{}", broker.port);

    // Hold every commit back: the store thread sleeps.
    let r = d.req("POST", "/v1/edge/debug/wedge-store?ms=120000", None);
    assert_eq!(r.status, 200, "{}", r.text());

    // 30 registrations at QoS 1 from a device that never re-sends: once
    // the broker has them, only the broker's copy is left.
    const N: usize = 30;
    let cli = publisher(&broker, "once");
    for i in 0..N {
        cli.publish(paho::Message::new(
            format!("devices/held-{i}/register"),
            r#"{"type":"sensor"}"#,
            1,
        ))
        .wait_for(DEADLINE)
        .expect("the broker took the registration");
    }
    // Wait until the broker has handed over all it will: either the daemon
    // acknowledged all of them (acks before commit), or it holds at least
    // a full in-flight window (mosquitto's max_inflight_messages, 20, for
    // MQTT 3.1.1; our receive maximum, above N, for MQTT 5) and has
    // acknowledged none (acks after commit, and nothing can commit).
    let inflight = 20;
    eventually("the broker to hand over all it will", || {
        let sent = broker_lines(&broker, &format!("Sending PUBLISH to {client}"), "held-");
        let acked = broker_lines(&broker, &format!("Received PUBACK from {client}"), "");
        acked == N || (sent >= N.min(inflight) && acked == 0)
    });

    // Power cut while nothing is committed, then a restart: whatever the
    // daemon did not acknowledge, the broker sends again.
    d.kill9();
    let d = start_connected(dir.path(), &hooks);
    // Polled with a deadline: the count is what the failure reports.
    let end = Instant::now() + DEADLINE;
    let stored = loop {
        let devices = d.get("/v1/edge/devices").json();
        let n = devices.as_array().map_or(0, Vec::len);
        if n == N || Instant::now() > end {
            break n;
        }
        std::thread::sleep(Duration::from_millis(25));
    };
    assert_eq!(
        stored, N,
        "registrations committed after the power cut: the rest had been acknowledged to the broker and were lost"
    );
}

#[test]
fn queued_payload_bytes_stay_within_a_share_of_the_memory_limit() {
    let dir = tempfile::tempdir().unwrap();
    let broker = Broker::start(dir.path());
    // 4 MiB: the gate is 512 KiB (an eighth), room for two of the largest
    // packets (64 KiB payload plus the topic allowance).
    mqtt_config(
        dir.path(),
        &broker,
        "  max_payload_size: 64Ki\nresources: {memory_limit: 4Mi}\n",
    );
    let d = start_connected(dir.path(), &[("KONSUL_TEST_HOOKS", "1")]);
    let limit = wait_for("the gate's bound in /metrics", DEADLINE, || {
        d.metric("konsul_edge_mqtt_ingest_limit_bytes ")
            .filter(|v| *v > 0)
    });
    assert_eq!(limit, 512 << 10);
    // Nothing commits for a while: every message read stays queued.
    // (/metrics reads the store too, so the figures are read after.)
    let r = d.req("POST", "/v1/edge/debug/wedge-store?ms=5000", None);
    assert_eq!(r.status, 200, "{}", r.text());
    // 2.4 MiB of QoS 0 payloads (outside any broker window).
    let cli = publisher(&broker, "big");
    let body = format!(r#"{{"blob":"{}"}}"#, "x".repeat(60 << 10));
    for i in 0..40 {
        cli.publish(paho::Message::new(
            format!("devices/big-{i}/telemetry"),
            body.clone(),
            0,
        ))
        .wait_for(DEADLINE)
        .expect("the broker took it");
    }
    // Once the store is back every message is read and dealt with
    // (unknown devices: refused), nothing dropped on the way.
    wait_for("all 40 read", DEADLINE, || {
        (metric_sum(&d, "konsul_edge_mqtt_received_total") == 40).then_some(())
    });
    let peak = d
        .metric("konsul_edge_mqtt_ingest_queued_peak_bytes ")
        .unwrap();
    assert!(peak <= limit, "{peak} bytes queued, over the {limit} bound");
    assert!(
        peak + (128 << 10) > limit,
        "the reader filled the gate while the store was held ({peak} of {limit})"
    );
    eventually("the gate empty again", || {
        d.metric("konsul_edge_mqtt_ingest_queued_bytes ") == Some(0)
    });
}
