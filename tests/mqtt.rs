//! The MQTT bridge and device registry against a real mosquitto broker and
//! the real daemon. Each test runs its own broker on an ephemeral port in a
//! private temp directory; the test plays the devices with a paho client.
//! Every wait is on observable state (a message, a log line, an HTTP
//! answer) with a deadline: no sleep stands in for synchronisation.

mod common;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Instant;

use common::broker::Broker;
use common::device::Device;
use common::*;
use serde_json::{json, Value};

// --- a device ----------------------------------------------------------------

impl Device {
    /// Messages on `topic` matching `pred`, skipping others.
    fn expect_where(&self, topic: &str, pred: impl Fn(&Value) -> bool) -> Value {
        let end = Instant::now() + DEADLINE;
        loop {
            assert!(Instant::now() < end, "no matching message on {topic}");
            let v = self.expect(topic);
            if pred(&v) {
                return v;
            }
        }
    }

    fn register(&self, id: &str, extra: Value) -> Value {
        let mut body =
            json!({"type": "sensor", "name": format!("sensor {id}"), "telemetry_interval": "1h"});
        if let (Some(b), Some(e)) = (body.as_object_mut(), extra.as_object()) {
            for (k, v) in e {
                b.insert(k.clone(), v.clone());
            }
        }
        self.publish(&format!("devices/{id}/register"), body.to_string(), 1);
        self.expect(&format!("devices/{id}/ack"))
    }
}

// --- the daemon, wired to the broker -------------------------------------------

/// `mqtt_extra` and `devices_extra` are more keys (indented) for those
/// sections.
fn mqtt_config(dir: &Path, broker: &Broker, qos: u8, mqtt_extra: &str, devices_extra: &str) {
    write_config(
        dir,
        &format!(
            "mqtt:\n  enabled: true\n  broker: {}\n  client_id: edge-{}\n  qos: {qos}\n  \
             max_payload_size: 1Ki\n{mqtt_extra}\
             devices:\n  stale_after_missed: 1\n  offline_after_missed: 2\n  low_battery_percent: 20\n\
             {devices_extra}",
            broker.url(),
            broker.port
        ),
    );
}

fn start_connected(dir: &Path) -> Daemon {
    let d = Daemon::start(dir);
    // The bridge may connect before the ready line is logged: wait_log
    // also looks at the lines read while waiting for ready.
    d.wait_log(|l| l.contains("mqtt::bridge: connected to "))
        .expect("daemon did not connect to the broker");
    d
}

/// 0 when the sample is not there (yet).
fn metric(d: &Daemon, line_start: &str) -> u64 {
    d.metric(line_start).unwrap_or(0)
}

// --- the tests -------------------------------------------------------------------

#[test]
fn register_acks_after_commit_and_shows_device_and_service() {
    let dir = tempfile::tempdir().unwrap();
    let broker = Broker::start(dir.path());
    mqtt_config(dir.path(), &broker, 1, "", "");
    let mut d = start_connected(dir.path());
    let dev = Device::connect(&broker, "dev-1", &["devices/d1/ack", "edges/+/status"]);
    assert_eq!(dev.expect("edges/test-node/status")["status"], "online");

    let ack = dev.register(
        "d1",
        json!({"id": "d1", "location": "dock 3", "metadata": {"zone": "a"},
               "firmware_version": "1.2.0", "ip": "10.1.2.3", "port": 8080, "battery": 90, "signal": -61}),
    );
    assert_eq!(ack["status"], "registered");
    assert_eq!(ack["id"], "d1");
    assert_eq!(ack["created"], true);
    let index = ack["modify_index"].as_u64().unwrap();

    let v = d.get("/v1/edge/devices/d1").json();
    assert_eq!(v["type"], "sensor");
    assert_eq!(v["location"], "dock 3");
    assert_eq!(v["firmware_version"], "1.2.0");
    assert_eq!(v["battery"], 90);
    assert_eq!(v["signal"], -61);
    assert_eq!(v["health"], "online");
    assert_eq!(v["modify_index"].as_u64(), Some(index));
    let s = d.get("/services/d1").json();
    assert_eq!(s["name"], "sensor");
    assert_eq!(s["address"], "10.1.2.3");
    assert_eq!(s["port"], 8080);
    assert_eq!(s["tags"], json!(["iot", "mqtt"]));
    assert_eq!(s["meta"]["zone"], "a");
    assert_eq!(
        d.get("/v1/edge/devices").json().as_array().unwrap().len(),
        1
    );
    assert_eq!(d.get("/v1/edge/devices/nope").status, 404);
    let m = d.get("/metrics").text();
    assert!(m.contains("konsul_edge_devices{state=\"online\"} 1"), "{m}");
    assert!(
        m.contains("konsul_edge_mqtt_received_total{kind=\"register\"} 1"),
        "{m}"
    );
    assert!(m.contains("konsul_edge_mqtt_connected 1"), "{m}");

    // A clean stop leaves "offline" as the retained status.
    d.stop();
    let watcher = Device::connect(&broker, "watcher", &["edges/test-node/status"]);
    assert_eq!(
        watcher.expect("edges/test-node/status")["status"],
        "offline"
    );
}

#[test]
fn telemetry_history_retention_and_heartbeats() {
    let dir = tempfile::tempdir().unwrap();
    let broker = Broker::start(dir.path());
    // ~300 bytes a row: 30 rows fit in 10Ki, so 60 messages must prune.
    mqtt_config(dir.path(), &broker, 1, "", "  telemetry_max_size: 10Ki\n");
    let d = start_connected(dir.path());
    let dev = Device::connect(&broker, "dev-2", &["devices/d2/ack"]);
    dev.register("d2", json!({}));
    let pad = "p".repeat(250);
    for i in 1..=60 {
        dev.publish(
            "devices/d2/telemetry",
            json!({"temp": i, "pad": pad}).to_string(),
            1,
        );
    }
    let v = eventually_some("60 telemetry messages applied", || {
        let v = d.get("/v1/edge/devices/d2").json();
        (v["telemetry_seq"] == 60).then_some(v)
    });
    assert_eq!(v["last_telemetry"]["temp"], 60);
    let t = d.get("/v1/edge/devices/d2/telemetry?limit=1000").json();
    let seqs: Vec<u64> = t["history"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["seq"].as_u64().unwrap())
        .collect();
    assert_eq!(*seqs.last().unwrap(), 60, "the newest are kept");
    assert!(
        seqs[0] > 1 && seqs.len() < 40,
        "pruned to the size limit: {seqs:?}"
    );
    assert!(
        seqs.windows(2).all(|w| w[1] == w[0] + 1),
        "no holes: {seqs:?}"
    );
    assert_eq!(t["last"]["temp"], 60);
    let page = d
        .get(&format!(
            "/v1/edge/devices/d2/telemetry?since={}&limit=5",
            seqs[0]
        ))
        .json();
    assert_eq!(page["history"].as_array().unwrap().len(), 5);
    assert_eq!(page["history"][0]["seq"].as_u64(), Some(seqs[0] + 1));
    assert_eq!(d.get("/v1/edge/devices/d2/telemetry?limit=0").status, 400);
    assert_eq!(d.get("/v1/edge/devices/d2/telemetry?since=x").status, 400);

    dev.publish("devices/d2/heartbeat", r#"{"battery":55,"signal":-70}"#, 0);
    eventually_some("heartbeat applied", || {
        let v = d.get("/v1/edge/devices/d2").json();
        (v["battery"] == 55 && v["signal"] == -70).then_some(())
    });
    // Heartbeats and telemetry are not replicated writes.
    let status = d.get("/v1/edge/status").json();
    assert_eq!(
        status["outbox_pending"], 2,
        "device + service only: {status}"
    );
}

#[test]
fn a_silent_device_goes_offline_with_an_alert_that_clears_when_it_returns() {
    let dir = tempfile::tempdir().unwrap();
    let broker = Broker::start(dir.path());
    mqtt_config(dir.path(), &broker, 1, "", "");
    let d = start_connected(dir.path());
    let dev = Device::connect(&broker, "dev-3", &["devices/d3/ack", "alerts/d3"]);
    dev.register("d3", json!({"telemetry_interval": "1s"}));
    // stale after 1 missed interval, offline after 2
    let alert = dev.expect_where("alerts/d3", |a| a["name"] == "offline");
    assert_eq!(alert["active"], true);
    assert_eq!(alert["device_id"], "d3");
    assert_eq!(d.get("/v1/edge/devices/d3").json()["health"], "offline");
    let active = d.get("/v1/edge/alerts?active=true").json();
    assert_eq!(active.as_array().unwrap().len(), 1, "{active}");
    assert_eq!(active[0]["name"], "offline");

    // It comes back, low on battery and with a slower interval (so it does
    // not go silent again mid-test): offline clears, low_battery raises.
    dev.register("d3", json!({"telemetry_interval": "1h", "battery": 5}));
    let cleared = dev.expect_where("alerts/d3", |a| a["name"] == "offline");
    assert_eq!(cleared["active"], false);
    let low = dev.expect_where("alerts/d3", |a| a["name"] == "low_battery");
    assert_eq!(low["active"], true);
    assert_eq!(d.get("/v1/edge/devices/d3").json()["health"], "online");
    let active = d.get("/v1/edge/alerts?active=true&device=d3").json();
    assert_eq!(active.as_array().unwrap().len(), 1, "{active}");
    assert_eq!(active[0]["name"], "low_battery");
    // Alerts are replicated records: in the outbox for the hub.
    let outbox = d.get("/v1/edge/status").json()["outbox_pending"].as_u64();
    assert_eq!(outbox, Some(4), "device, service, 2 alerts");
}

#[test]
fn a_last_will_marks_the_device_offline_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let broker = Broker::start(dir.path());
    mqtt_config(dir.path(), &broker, 1, "", "");
    let d = start_connected(dir.path());
    let dev = Device::connect(&broker, "dev-4", &["devices/d4/ack", "alerts/d4"]);
    // interval 1h: only the will can make it offline within the test
    dev.register("d4", json!({}));
    // The device's own connection, with its last will, dies without a
    // DISCONNECT (kill -9).
    let mut sub = Command::new("mosquitto_sub")
        .args([
            "-h",
            "127.0.0.1",
            "-p",
            &broker.port.to_string(),
            "-i",
            "d4-conn",
        ])
        .args([
            "-t",
            "devices/d4/update",
            "--will-topic",
            "devices/d4/status",
        ])
        .args(["--will-payload", "offline", "--will-qos", "1"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("mosquitto_sub (apt-get install mosquitto-clients)");
    eventually_some("the device connection is up", || {
        broker.log().contains(" as d4-conn").then_some(())
    });
    let _ = sub.kill();
    let _ = sub.wait();
    let alert = dev.expect_where("alerts/d4", |a| a["name"] == "offline");
    assert_eq!(alert["active"], true);
    assert_eq!(d.get("/v1/edge/devices/d4").json()["health"], "offline");
    // "online" status brings it back
    dev.publish("devices/d4/status", "online", 1);
    let alert = dev.expect_where("alerts/d4", |a| a["name"] == "offline");
    assert_eq!(alert["active"], false);
}

#[test]
fn a_registration_sent_while_the_daemon_is_down_is_processed_after_start() {
    let dir = tempfile::tempdir().unwrap();
    let broker = Broker::start(dir.path());
    mqtt_config(dir.path(), &broker, 1, "", "");
    // First run creates the persistent session, then the daemon stops.
    let mut d = start_connected(dir.path());
    d.stop();
    let dev = Device::connect(&broker, "dev-5", &["devices/d5/ack"]);
    // QoS 1: the broker has it (PUBACK) before publish returns.
    dev.publish(
        "devices/d5/register",
        json!({"type": "meter"}).to_string(),
        1,
    );
    dev.publish("devices/d5/telemetry", r#"{"kwh":12.5}"#, 1);
    let d = start_connected(dir.path());
    let ack = dev.expect("devices/d5/ack");
    assert_eq!(ack["created"], true);
    let v = eventually_some("queued telemetry applied", || {
        let v = d.get("/v1/edge/devices/d5").json();
        (v["telemetry_seq"] == 1).then_some(v)
    });
    assert_eq!(v["type"], "meter");
    assert_eq!(v["last_telemetry"]["kwh"], 12.5);
}

#[test]
fn kill_9_right_after_an_ack_loses_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let broker = Broker::start(dir.path());
    mqtt_config(dir.path(), &broker, 1, "", "");
    let mut d = start_connected(dir.path());
    let dev = Device::connect(&broker, "dev-6", &["devices/+/ack"]);
    dev.register("d6", json!({}));
    for i in 1..=20 {
        dev.publish("devices/d6/telemetry", json!({"n": i}).to_string(), 1);
    }
    // Messages are applied in order: once the later registration is
    // acked, the telemetry before it is committed too.
    let ack = dev.register("d6b", json!({}));
    d.kill9();
    let d = start_connected(dir.path());
    let v = d.get("/v1/edge/devices/d6b").json();
    assert_eq!(v["modify_index"], ack["modify_index"]);
    assert_eq!(d.get("/v1/edge/devices/d6").json()["telemetry_seq"], 20);
    let h = d.get("/v1/edge/devices/d6/telemetry").json();
    assert_eq!(h["history"].as_array().unwrap().len(), 20);
    assert_eq!(d.get("/services/d6b").status, 200);
}

#[test]
fn a_broker_restart_reconnects_resubscribes_and_duplicates_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let mut broker = Broker::start(dir.path());
    mqtt_config(dir.path(), &broker, 1, "", "");
    let d = start_connected(dir.path());
    let dev = Device::connect(&broker, "dev-7", &["devices/d7/ack"]);
    let first = dev.register("d7", json!({}));
    let before = d.get("/v1/edge/status").json()["modify_index"].clone();
    drop(dev);

    // Restart the broker and throw its persistence away: the session is
    // gone, so only the daemon's own resubscription brings messages back.
    broker.stop();
    d.wait_log(|l| l.contains("mqtt::bridge: connection to") && l.contains("lost"))
        .expect("the daemon notices");
    let _ = std::fs::remove_file(dir.path().join("mosquitto.db"));
    broker.restart();
    d.wait_log(|l| l.contains("mqtt::bridge: connected to "))
        .expect("the daemon reconnects");

    let dev = Device::connect(&broker, "dev-7", &["devices/d7/ack"]);
    let again = dev.register("d7", json!({}));
    assert_eq!(again["created"], false);
    assert_eq!(again["modify_index"], first["modify_index"]);
    dev.publish("devices/d7/telemetry", r#"{"after":"restart"}"#, 1);
    eventually_some("telemetry after the restart", || {
        (d.get("/v1/edge/devices/d7").json()["telemetry_seq"] == 1).then_some(())
    });
    assert_eq!(
        d.get("/v1/edge/status").json()["modify_index"],
        before,
        "no new versions"
    );
    assert_eq!(
        d.get("/v1/edge/devices").json().as_array().unwrap().len(),
        1
    );
    assert_eq!(d.get("/services/").json().as_array().unwrap().len(), 1);
    assert_eq!(metric(&d, "konsul_edge_mqtt_connects_total"), 2);
}

#[test]
fn qos_0_and_2_subscriptions_work() {
    for qos in [0u8, 2] {
        let dir = tempfile::tempdir().unwrap();
        let broker = Broker::start(dir.path());
        mqtt_config(dir.path(), &broker, qos, "", "");
        let d = start_connected(dir.path());
        let dev = Device::connect(&broker, "dev-q", &["devices/dq/ack"]);
        dev.publish(
            "devices/dq/register",
            json!({"type": "sensor"}).to_string(),
            qos as i32,
        );
        dev.expect("devices/dq/ack");
        dev.publish("devices/dq/telemetry", r#"{"v":1}"#, qos as i32);
        eventually_some("telemetry", || {
            (d.get("/v1/edge/devices/dq").json()["telemetry_seq"] == 1).then_some(())
        });
        assert!(
            broker
                .log()
                .contains(&format!("edge-{} {qos} devices/+/register", broker.port)),
            "subscribed at QoS {qos}: {}",
            broker.log()
        );
    }
}

#[test]
fn bad_input_is_rejected_counted_explained_and_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let broker = Broker::start(dir.path());
    // `devices/#`: unknown topic levels reach the edge (with the default
    // topics the broker never delivers them), and so do the edge's own
    // acks and errors, which it must ignore rather than answer.
    mqtt_config(dir.path(), &broker, 1, "  topics: [\"devices/#\"]\n", "");
    let d = start_connected(dir.path());
    let dev = Device::connect(&broker, "dev-8", &["devices/d8/ack", "devices/+/error"]);
    dev.register("d8", json!({"battery": 50}));
    let before = (
        d.snapshot(),
        d.get("/v1/edge/devices").json(),
        d.get("/v1/edge/alerts").json(),
    );

    let big = format!(r#"{{"x":"{}"}}"#, "y".repeat(2048));
    let cases: Vec<(&str, String, &str)> = vec![
        ("devices/d8/register", "{not json".into(), "malformed_json"),
        ("devices/d8/register", r#"{"type": 7}"#.into(), "wrong_type"),
        (
            "devices/d8/register",
            r#"{"type":"s","battery":"full"}"#.into(),
            "wrong_type",
        ),
        (
            "devices/d8/register",
            r#"{"type":"s","colour":"red"}"#.into(),
            "wrong_type",
        ),
        (
            "devices/d8/register",
            r#"{"type":"s","battery":150}"#.into(),
            "invalid",
        ),
        (
            "devices/d8/register",
            r#"{"id":"other","type":"s"}"#.into(),
            "id_mismatch",
        ),
        ("devices/d8/telemetry", big, "too_large"),
        ("devices/d8/telemetry", "[1,2,3]".into(), "wrong_type"),
        (
            "devices/d8/telemetry",
            r#"{"id":"d9","t":1}"#.into(),
            "id_mismatch",
        ),
        (
            "devices/d8/heartbeat",
            r#"{"battery":-1}"#.into(),
            "wrong_type",
        ),
        (
            "devices/d8/events",
            r#"{"what":"no type"}"#.into(),
            "invalid",
        ),
        ("devices/d8/bogus", "{}".into(), "unknown_topic"),
        ("devices/d8/telemetry/extra", "{}".into(), "unknown_topic"),
        (
            "devices/ghost/telemetry",
            r#"{"t":1}"#.into(),
            "unregistered",
        ),
        (
            "devices/bad id/telemetry",
            r#"{"t":1}"#.into(),
            "invalid_id",
        ),
    ];
    for (topic, payload, reason) in &cases {
        dev.publish(topic, payload.as_bytes().to_vec(), 1);
        let id = topic.split('/').nth(1).unwrap();
        let e = dev.expect(&format!("devices/{id}/error"));
        assert_eq!(e["error"], *reason, "{topic} {payload:.60}: {e}");
        assert!(!e["message"].as_str().unwrap_or("").is_empty());
    }
    // Still alive, still answering, and nothing changed.
    let after = (
        d.snapshot(),
        d.get("/v1/edge/devices").json(),
        d.get("/v1/edge/alerts").json(),
    );
    assert_eq!(before, after);
    for (reason, n) in [
        ("malformed_json", 1),
        ("wrong_type", 5),
        ("invalid", 2),
        ("id_mismatch", 2),
        ("too_large", 1),
        ("unknown_topic", 2),
        ("unregistered", 1),
        ("invalid_id", 1),
    ] {
        assert_eq!(
            metric(
                &d,
                &format!("konsul_edge_mqtt_rejected_total{{reason=\"{reason}\"}}")
            ),
            n,
            "{reason}"
        );
    }
    // Logged once per device per minute, however many it sent.
    let logged: Vec<String> = std::iter::from_fn(|| d.log.try_recv().ok())
        .filter(|l| l.contains("mqtt::bridge: rejected") && l.contains("devices/d8/"))
        .collect();
    assert_eq!(logged.len(), 1, "{logged:#?}");
}

#[test]
fn devices_alerts_and_telemetry_sync_up_to_the_hub() {
    let broker_dir = tempfile::tempdir().unwrap();
    let broker = Broker::start(broker_dir.path());
    let hub_dir = tempfile::tempdir().unwrap();
    std::fs::write(
        hub_dir.path().join("edge.yaml"),
        format!(
            "node_id: hub\nstorage: {{path: {}}}\nhttp: {{listen: '127.0.0.1:0'}}\n",
            hub_dir.path().join("hub.db").display()
        ),
    )
    .unwrap();
    let hub = Daemon::start_hub(hub_dir.path());
    let dir = tempfile::tempdir().unwrap();
    mqtt_config(
        dir.path(),
        &broker,
        1,
        "",
        &format!(
            "cloud:\n  server_address: http://{}\n  sync_interval: 1h\n",
            hub.addr
        ),
    );
    let d = start_connected(dir.path());
    let dev = Device::connect(&broker, "dev-sync", &["devices/s9/ack"]);
    dev.register("s9", json!({"battery": 5}));
    for i in 1..=5 {
        dev.publish("devices/s9/telemetry", json!({"temp": i}).to_string(), 1);
    }
    eventually_some("telemetry applied at the edge", || {
        (d.get("/v1/edge/devices/s9").json()["telemetry_seq"] == 5).then_some(())
    });
    eventually_some("a low-battery alert", || {
        let a = d.get("/v1/edge/alerts?active=true").json();
        (!a.as_array()?.is_empty()).then_some(())
    });
    assert_eq!(d.req("POST", "/v1/edge/sync/now", None).status, 202);
    let points = eventually_some("telemetry at the hub", || {
        let t = hub.get("/v1/edge/telemetry?device=s9&limit=100").json();
        (t.as_array()?.len() == 5).then_some(t)
    });
    assert_eq!(points[0]["seq"], 5, "newest first");
    assert_eq!(points[0]["values"]["temp"], 5);
    assert_eq!(points[0]["edge"], "test-node");
    // the device (as a service) and its alert are replicated records
    assert_eq!(
        hub.get("/services/s9").json()["tags"],
        json!(["iot", "mqtt"])
    );
    let hub_metrics = hub.get("/metrics").text();
    assert!(
        hub_metrics.contains("konsul_edge_records{kind=\"device\"} 1"),
        "{hub_metrics}"
    );
    assert!(!hub_metrics.contains("konsul_edge_records{kind=\"alert\"} 0"));
    // a second sync sends no telemetry twice
    assert_eq!(d.req("POST", "/v1/edge/sync/now", None).status, 202);
    eventually_some("the second sync", || {
        (metric(&d, "konsul_edge_sync_requests_total") >= 2).then_some(())
    });
    assert_eq!(metric(&d, "konsul_edge_sync_telemetry_sent_total"), 5);
    assert_eq!(
        hub.get("/v1/edge/telemetry?device=s9&limit=100")
            .json()
            .as_array()
            .unwrap()
            .len(),
        5
    );
}
