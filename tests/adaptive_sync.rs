//! Adaptive sync over a throttled link: a hub, an edge and a throttling TCP
//! proxy between them (tests/common/throttle.rs), all real processes and
//! sockets on loopback. The link is 10 KB/s with 300 ms of latency each
//! way, then 1 MB/s; the edge must size its rounds to the link, put state
//! changes before telemetry and keep a daily data budget.

mod common;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::broker::Broker;
use common::throttle::Throttle;
use common::*;
use serde_json::Value;

const SLOW: u64 = 10_000;
const FAST: u64 = 1_000_000;
const LATENCY: Duration = Duration::from_millis(300);
const LONG: Duration = Duration::from_secs(120);

fn edge_config(dir: &Path, hub: &str, cloud_extra: &str, extra: &str) {
    std::fs::write(
        dir.join("edge.yaml"),
        format!(
            "node_id: edge-a\nstorage: {{path: {}, max_size: 64Mi}}\nhttp: {{listen: '127.0.0.1:0'}}\n\
             cloud: {{server_address: 'http://{hub}', sync_interval: 1h, sync_interval_min: 1s, \
             sync_round_budget: 4s{cloud_extra}}}\n{extra}",
            dir.join("edge.db").display()
        ),
    )
    .unwrap();
}

fn sync_status(d: &Daemon) -> Value {
    d.get("/v1/edge/sync").json()
}

fn metric(d: &Daemon, name: &str) -> u64 {
    d.metric(&format!("{name} ")).unwrap_or(0)
}

/// `n` KV writes through Konsul's batch route, 1,000 per transaction.
fn write_keys(d: &Daemon, prefix: &str, n: usize) {
    for chunk in (0..n).step_by(1000) {
        let items: serde_json::Map<String, Value> = (chunk..(chunk + 1000).min(n))
            .map(|i| {
                (
                    format!("{prefix}/{i}"),
                    Value::String(format!("reading {i}")),
                )
            })
            .collect();
        let r = d.req(
            "POST",
            "/batch/kv/set",
            Some(&serde_json::json!({ "items": items }).to_string()),
        );
        assert_eq!(r.status, 200, "{}", r.text());
    }
}

#[test]
fn a_throttled_link_gets_batches_sized_to_it_and_ten_thousand_changes_drain_within_budget() {
    let (_hub_dir, hub) = Daemon::plain_hub();
    let link = Throttle::start(&hub.addr, SLOW, LATENCY);
    let dir = tempfile::tempdir().unwrap();
    edge_config(
        dir.path(),
        &link.addr,
        "",
        "sync: {max_batch_bytes: 256Ki}\n",
    );
    let edge = Daemon::start(dir.path());
    eventually("the start-up sync", || {
        sync_status(&edge)["last_sync_ms"].is_u64()
    });
    // No "sync now": 10,000 changes piling up bring the sync forward from
    // the one-hour interval.
    write_keys(&edge, "sensor", 10_000);
    wait_for("1,500 changes through the slow link", LONG, || {
        (metric(&edge, "konsul_edge_sync_updates_sent_total") >= 1500).then_some(())
    });
    let slow = sync_status(&edge)["link"].clone();
    let slow_batch = slow["batch_bytes"].as_u64().unwrap();
    let slow_rate = slow["rate_bytes_per_sec"].as_u64().unwrap();
    eprintln!("on 10 KB/s: {slow}");
    assert!(
        slow_rate <= 2 * SLOW,
        "the measured rate ({slow_rate} B/s) is about the link's"
    );
    edge.wait_log(|l| l.contains("sync link:") && l.contains("-> "))
        .expect("batch changes are logged with the link's figures");

    link.set(FAST, LATENCY);
    wait_for("the outbox drained", LONG, || {
        (sync_status(&edge)["pending_changes"] == 0
            && metric(&edge, "konsul_edge_sync_updates_sent_total") >= 10_000)
            .then_some(())
    });
    let fast = sync_status(&edge)["link"].clone();
    eprintln!("on 1 MB/s: {fast}");
    let fast_batch = fast["batch_bytes"].as_u64().unwrap();
    assert!(
        fast_batch >= 2 * slow_batch,
        "the batch grows with the link: {slow_batch} -> {fast_batch}"
    );
    assert_eq!(
        metric(&edge, "konsul_edge_sync_rounds_over_budget_total"),
        0,
        "no round took longer than cloud.sync_round_budget"
    );
    let summary = edge
        .wait_log(|l| l.contains("sync: ") && l.contains("rounds"))
        .expect("a summary of the sync with its figures");
    eprintln!("{summary}");
    let keys = hub.get("/kv/").json();
    assert_eq!(
        keys.as_array().map(Vec::len),
        Some(10_000),
        "all at the hub"
    );
    assert_eq!(hub.get("/v1/edge/edges").json()[0]["applied"], 10_000);
    // Drained: the next sync is the interval away, not the floor.
    let next = sync_status(&edge)["link"]["next_sync_ms"].as_u64().unwrap();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    assert!(next > now + 50 * 60_000, "next sync {next}, now {now}");
}

/// A device registered through the broker with `n` telemetry points queued
/// (each ~300 bytes of incompressible text).
fn queue_telemetry(broker: &Broker, edge: &Daemon, n: usize) {
    // A registration published before the bridge subscribed is lost
    // (QoS 1 to no subscriber): wait for the bridge first.
    edge.wait_log(|l| l.contains("mqtt::bridge: connected to "))
        .expect("the bridge connects to the broker");
    let publish = |topic: &str, input: String, lines: bool| {
        let mut cmd = Command::new("mosquitto_pub");
        cmd.args(["-h", "127.0.0.1", "-p", &broker.port.to_string(), "-q", "1"])
            .args(["-i", "test-device", "-t", topic]);
        if lines {
            cmd.arg("-l");
        } else {
            cmd.args(["-m", &input]);
        }
        let mut child = cmd.stdin(Stdio::piped()).spawn().unwrap();
        use std::io::Write;
        let mut stdin = child.stdin.take().unwrap();
        if lines {
            stdin.write_all(input.as_bytes()).unwrap();
        }
        drop(stdin);
        assert!(child.wait().unwrap().success());
    };
    publish(
        "devices/d1/register",
        r#"{"type":"sensor","name":"meter","telemetry_interval":"1h"}"#.into(),
        false,
    );
    eventually("d1 registered", || {
        edge.get("/v1/edge/devices/d1").status == 200
    });
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut text = String::new();
    for i in 0..n {
        let mut noise = String::new();
        for _ in 0..16 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            noise.push_str(&format!("{x:016x}"));
        }
        text.push_str(&format!("{{\"n\":{i},\"noise\":\"{noise}\"}}\n"));
    }
    publish("devices/d1/telemetry", text, true);
    wait_for("telemetry stored", LONG, || {
        (edge.get("/v1/edge/devices/d1").json()["telemetry_seq"] == n as u64).then_some(())
    });
}

fn mqtt_extra(broker: &Broker) -> String {
    format!(
        "mqtt: {{enabled: true, broker: '{}', client_id: edge-a-bridge, qos: 1}}\n",
        broker.url()
    )
}

#[test]
fn state_changes_overtake_queued_telemetry() {
    let dir = tempfile::tempdir().unwrap();
    let broker = Broker::start(dir.path());
    let (_hub_dir, hub) = Daemon::plain_hub();
    let link = Throttle::start(&hub.addr, SLOW, LATENCY);
    edge_config(dir.path(), &link.addr, "", &mqtt_extra(&broker));
    let edge = Daemon::start(dir.path());
    // 600 points of ~300 bytes: a minute of the slow link.
    queue_telemetry(&broker, &edge, 600);
    assert_eq!(edge.req("POST", "/v1/edge/sync/now", None).status, 202);
    wait_for("telemetry on its way", LONG, || {
        (metric(&edge, "konsul_edge_sync_telemetry_sent_total") > 0).then_some(())
    });
    let written = Instant::now();
    assert_eq!(
        edge.put("/kv/valve/state", r#"{"value":"closed"}"#).status,
        200
    );
    // The change goes in the next round, whose size is bounded by the
    // round budget (4 s): it does not wait behind a minute of telemetry.
    wait_for(
        "the state change at the hub",
        Duration::from_secs(12),
        || (hub.get("/kv/valve/state").status == 200).then_some(()),
    );
    let sent = metric(&edge, "konsul_edge_sync_telemetry_sent_total");
    eprintln!(
        "state change at the hub after {:?} with {sent} of 600 points sent",
        written.elapsed()
    );
    assert!(sent < 600, "telemetry was still queued: {sent} of 600 sent");
    link.set(FAST, Duration::ZERO);
    wait_for("all telemetry sent", LONG, || {
        (metric(&edge, "konsul_edge_sync_telemetry_sent_total") == 600).then_some(())
    });
}

#[test]
fn a_daily_data_budget_holds_telemetry_back_but_not_state_changes() {
    let dir = tempfile::tempdir().unwrap();
    let broker = Broker::start(dir.path());
    let (_hub_dir, hub) = Daemon::plain_hub();
    let link = Throttle::start(&hub.addr, 0, Duration::ZERO);
    let budget = 64 * 1024;
    edge_config(
        dir.path(),
        &link.addr,
        ", data_budget: {limit: 64Ki, period: day}",
        &mqtt_extra(&broker),
    );
    let mut edge = Daemon::start(dir.path());
    // ~180 KB of telemetry against a 64 KiB day, and state changes.
    queue_telemetry(&broker, &edge, 600);
    write_keys(&edge, "config", 40);
    assert_eq!(edge.req("POST", "/v1/edge/sync/now", None).status, 202);
    let status = wait_for("telemetry held back", LONG, || {
        let s = sync_status(&edge);
        (s["data_budget"]["telemetry_held"] == true && s["pending_changes"] == 0).then_some(s)
    });
    eprintln!("{status}");
    let used = status["data_budget"]["used"].as_u64().unwrap();
    assert!(link.bytes() <= budget, "{} bytes on the link", link.bytes());
    assert!(
        used >= link.bytes() * 9 / 10 && used <= link.bytes(),
        "the edge counts what went over the link: {used} of {}",
        link.bytes()
    );
    let sent = metric(&edge, "konsul_edge_sync_telemetry_sent_total");
    assert!(sent > 0 && sent < 600, "{sent} of 600 points sent");
    assert_eq!(hub.get("/kv/config/39").status, 200, "state changes synced");
    assert_eq!(
        metric(&edge, "konsul_edge_sync_data_budget_telemetry_held"),
        1
    );
    // Past the telemetry line state changes still go.
    assert_eq!(edge.put("/kv/late", r#"{"value":"1"}"#).status, 200);
    assert_eq!(edge.req("POST", "/v1/edge/sync/now", None).status, 202);
    eventually("the late change at the hub", || {
        hub.get("/kv/late").status == 200
    });
    assert!(link.bytes() <= budget, "{} bytes on the link", link.bytes());
    assert_eq!(
        metric(&edge, "konsul_edge_sync_telemetry_sent_total"),
        sent,
        "no telemetry past the line"
    );
    // The count survives a restart: the day is not handed out again.
    let before = sync_status(&edge)["data_budget"]["used"].as_u64().unwrap();
    edge.stop();
    let edge = Daemon::start(dir.path());
    let after = wait_for("the budget restored", LONG, || {
        sync_status(&edge)["data_budget"]["used"].as_u64()
    });
    assert!(
        after >= before,
        "used {before} before the restart, {after} after"
    );
    assert!(link.bytes() <= budget, "{} bytes on the link", link.bytes());
}
