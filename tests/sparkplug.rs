//! The Sparkplug B edge node against a real mosquitto, the real daemon and
//! a third-party Sparkplug host application (pysparkplug, in the venv
//! `scripts/test.sh` makes; `KONSUL_TEST_PYTHON` names its python). The
//! host decodes every message with its own protobuf code and prints it as
//! a JSON line; the test plays the devices with a paho client. Every wait
//! is on a message or an HTTP answer, with a deadline. Built with the
//! cargo feature `sparkplug` (`scripts/test.sh` runs it so).

mod common;

use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc;
use std::time::Instant;

use common::broker::Broker;
use common::device::Device;
use common::*;
use serde_json::{json, Value};

const GROUP: &str = "plant";
const EDGE: &str = "test-node";

// --- the host application ----------------------------------------------------------

struct Host {
    child: Child,
    stdin: ChildStdin,
    rx: mpsc::Receiver<Value>,
    /// Every message from our edge node, in arrival order.
    seen: Vec<Value>,
}

fn python() -> String {
    match std::env::var("KONSUL_TEST_PYTHON") {
        Ok(p) if Path::new(&p).exists() => p,
        _ => panic!(
            "KONSUL_TEST_PYTHON is not set to a python with pysparkplug: run scripts/test.sh \
             (it makes the venv and sets it), or set it to that venv's bin/python"
        ),
    }
}

impl Host {
    fn start(broker: &Broker) -> Host {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/sparkplug_host.py");
        let mut child = Command::new(python())
            .arg("-u")
            .arg(script)
            .args(["127.0.0.1", &broker.port.to_string()])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start the Sparkplug host application");
        let stdout = child.stdout.take().unwrap();
        let stdin = child.stdin.take().unwrap();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                let v: Value = serde_json::from_str(&line).unwrap_or(json!({ "unparsed": line }));
                if tx.send(v).is_err() {
                    break;
                }
            }
        });
        let mut h = Host {
            child,
            stdin,
            rx,
            seen: Vec::new(),
        };
        h.next_where("host ready", |v| v["ready"] == true);
        h
    }

    fn send(&mut self, cmd: Value) {
        writeln!(self.stdin, "{cmd}").unwrap();
        self.stdin.flush().unwrap();
    }

    /// The next line matching `pred`; our node's messages are kept in
    /// `seen`, and a message the host could not decode fails the test.
    fn next_where(&mut self, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
        let end = Instant::now() + DEADLINE;
        loop {
            let left = end
                .checked_duration_since(Instant::now())
                .unwrap_or_else(|| panic!("host: no {what} within {DEADLINE:?}"));
            let v = self
                .rx
                .recv_timeout(left)
                .unwrap_or_else(|_| panic!("host: no {what} within {DEADLINE:?}"));
            let topic = v["topic"].as_str().unwrap_or_default();
            // Commands are the host's own (some deliberately malformed).
            let command = topic.contains("/NCMD/") || topic.contains("/DCMD/");
            assert!(
                command || v.get("error").is_none(),
                "the host could not decode: {v}"
            );
            let ours = !command && topic.starts_with(&format!("spBv1.0/{GROUP}/"));
            if ours {
                self.seen.push(v.clone());
            }
            if pred(&v) {
                return v;
            }
        }
    }

    fn next_of(&mut self, kind: &str, device: Option<&str>) -> Value {
        let what = format!("{kind} {device:?}");
        self.next_where(&what, |v| {
            v["type"] == kind && v["device"].as_str() == device && v["topic"].is_string()
        })
    }

    /// What the host has received in `window`: nothing of `kind` may come.
    fn none_of_since(&self, kind: &str, from: usize) -> bool {
        self.seen[from..].iter().all(|v| v["type"] != kind)
    }
}

impl Drop for Host {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn metric<'a>(msg: &'a Value, name: &str) -> &'a Value {
    msg["metrics"]
        .as_array()
        .and_then(|ms| ms.iter().find(|m| m["name"] == name))
        .unwrap_or_else(|| panic!("no metric {name} in {msg}"))
}

// --- devices and the daemon --------------------------------------------------------

impl Device {
    fn register(&self, id: &str) {
        self.publish(
            &format!("devices/{id}/register"),
            json!({"type": "sensor", "name": format!("sensor {id}"), "location": "hall 2",
                   "telemetry_interval": "1h", "metadata": {"line": "a"}})
            .to_string(),
            1,
        );
        assert_eq!(
            self.expect(&format!("devices/{id}/ack"))["status"],
            "registered"
        );
    }
}

fn config(dir: &Path, broker: &Broker, sparkplug_extra: &str) {
    write_config(
        dir,
        &format!(
            "mqtt:\n  enabled: true\n  broker: {}\n  client_id: edge-{}\n\
             sparkplug:\n  enabled: true\n  group_id: {GROUP}\n{sparkplug_extra}",
            broker.url(),
            broker.port
        ),
    );
}

/// Starts the daemon and waits for the bridge's connection (a device's
/// first registration would otherwise go to a broker nobody listens on).
fn start(dir: &Path) -> Daemon {
    let d = Daemon::start(dir);
    d.wait_log(|l| l.contains("mqtt::bridge: connected to ") && !l.contains("-sparkplug "))
        .expect("the bridge connects");
    d
}

/// Waits until the store has `seq` telemetry points of `id`.
fn stored(d: &Daemon, id: &str, seq: u64) {
    eventually("telemetry stored", || {
        d.get(&format!("/v1/edge/devices/{id}")).json()["telemetry_seq"].as_u64() == Some(seq)
    });
}

// --- the tests -----------------------------------------------------------------------

#[test]
fn births_decode_with_types_and_seq_wraps_past_255() {
    let dir = tempfile::tempdir().unwrap();
    let broker = Broker::start(dir.path());
    let mut host = Host::start(&broker);
    config(dir.path(), &broker, "");
    let _d = start(dir.path());

    let nbirth = host.next_of("NBIRTH", None);
    assert_eq!(nbirth["seq"], 0);
    assert_eq!(metric(&nbirth, "bdSeq")["datatype"], "INT64");
    assert_eq!(
        metric(&nbirth, "Node Control/Rebirth")["datatype"],
        "BOOLEAN"
    );
    assert_eq!(metric(&nbirth, "Node Control/Rebirth")["value"], false);
    assert_eq!(metric(&nbirth, "Properties/Version")["datatype"], "STRING");
    assert_eq!(metric(&nbirth, "Properties/Devices")["datatype"], "INT64");
    assert_eq!(
        metric(&nbirth, "Properties/Sync State")["value"],
        "disabled"
    );

    let dev = Device::connect(&broker, "dev-1", &["devices/d1/ack"]);
    dev.register("d1");
    let dbirth = host.next_of("DBIRTH", Some("d1"));
    assert_eq!(metric(&dbirth, "Properties/Type")["value"], "sensor");
    assert_eq!(metric(&dbirth, "Properties/Location")["value"], "hall 2");
    assert_eq!(metric(&dbirth, "Properties/Metadata/line")["value"], "a");

    // New metrics: the device is born again with them, types from JSON.
    dev.publish(
        "devices/d1/telemetry",
        json!({"temperature": 21.5, "count": 0, "ok": true, "mode": "auto"}).to_string(),
        1,
    );
    let dbirth = host.next_where("DBIRTH with telemetry", |v| {
        v["type"] == "DBIRTH"
            && v["metrics"]
                .as_array()
                .is_some_and(|m| m.iter().any(|m| m["name"] == "temperature"))
    });
    assert_eq!(metric(&dbirth, "temperature")["datatype"], "DOUBLE");
    assert_eq!(metric(&dbirth, "temperature")["value"], 21.5);
    assert_eq!(metric(&dbirth, "count")["datatype"], "INT64");
    assert_eq!(metric(&dbirth, "ok")["datatype"], "BOOLEAN");
    assert_eq!(metric(&dbirth, "mode")["datatype"], "STRING");
    assert!(metric(&dbirth, "count")["alias"].is_u64());

    // 300 data messages: seq goes past 255 and wraps to 0.
    for i in 1..=300 {
        dev.publish("devices/d1/telemetry", json!({"count": i}).to_string(), 1);
    }
    let last = host.next_where("DDATA count 300", |v| {
        v["type"] == "DDATA" && v["metrics"][0]["value"] == 300
    });
    assert_eq!(last["metrics"][0]["name"], "count");
    assert_eq!(last["metrics"][0]["datatype"], "INT64");
    // Report by exception: only `count` changed.
    assert_eq!(last["metrics"].as_array().unwrap().len(), 1);
    let seqs: Vec<u64> = host.seen.iter().filter_map(|v| v["seq"].as_u64()).collect();
    assert_eq!(seqs[0], 0);
    for w in seqs.windows(2) {
        assert_eq!(w[1], (w[0] + 1) % 256, "seq gap in {seqs:?}");
    }
    assert!(
        seqs.contains(&255) && seqs.len() > 256,
        "seq never wrapped: {seqs:?}"
    );
    let counts: Vec<i64> = host
        .seen
        .iter()
        .filter(|v| v["type"] == "DDATA")
        .filter_map(|v| v["metrics"][0]["value"].as_i64())
        .collect();
    assert_eq!(counts, (1..=300).collect::<Vec<_>>());
}

#[test]
fn kill9_delivers_ndeath_and_the_restart_births_the_next_bd_seq() {
    let dir = tempfile::tempdir().unwrap();
    let broker = Broker::start(dir.path());
    let mut host = Host::start(&broker);
    config(dir.path(), &broker, "");
    let mut d = start(dir.path());
    let nbirth = host.next_of("NBIRTH", None);
    let bd = metric(&nbirth, "bdSeq")["value"].as_i64().unwrap();

    d.kill9();
    let ndeath = host.next_of("NDEATH", None);
    assert_eq!(metric(&ndeath, "bdSeq")["value"].as_i64(), Some(bd));

    let _d = start(dir.path());
    let nbirth = host.next_of("NBIRTH", None);
    assert_eq!(
        metric(&nbirth, "bdSeq")["value"].as_i64(),
        Some((bd + 1) % 256)
    );
}

#[test]
fn rebirth_ncmd_births_everything_again_and_bad_commands_change_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let broker = Broker::start(dir.path());
    let mut host = Host::start(&broker);
    config(dir.path(), &broker, "");
    let d = start(dir.path());
    host.next_of("NBIRTH", None);
    let dev = Device::connect(&broker, "dev-1", &["devices/d1/ack"]);
    dev.register("d1");
    host.next_of("DBIRTH", Some("d1"));

    // Garbage and an unknown metric: a log line each, no birth.
    let from = host.seen.len();
    host.send(
        json!({"op": "raw", "topic": format!("spBv1.0/{GROUP}/NCMD/{EDGE}"), "hex": "ffffff"}),
    );
    d.wait_log(|l| l.contains("malformed command: not a Sparkplug B payload"))
        .expect("a malformed NCMD is logged");
    host.send(json!({"op": "ncmd", "group": GROUP, "edge": EDGE,
                     "metrics": [["Node Control/Reboot", "BOOLEAN", true]]}));
    d.wait_log(|l| l.contains("unknown node metric Node Control/Reboot"))
        .expect("an unknown node metric is logged");
    assert!(host.none_of_since("NBIRTH", from));

    host.send(json!({"op": "ncmd", "group": GROUP, "edge": EDGE,
                     "metrics": [["Node Control/Rebirth", "BOOLEAN", true]]}));
    let nbirth = host.next_of("NBIRTH", None);
    assert_eq!(nbirth["seq"], 0);
    let dbirth = host.next_of("DBIRTH", Some("d1"));
    assert_eq!(dbirth["seq"], 1);
    assert_eq!(metric(&dbirth, "Properties/Type")["value"], "sensor");
}

#[test]
fn dcmd_reaches_the_device_topic() {
    let dir = tempfile::tempdir().unwrap();
    let broker = Broker::start(dir.path());
    let mut host = Host::start(&broker);
    config(dir.path(), &broker, "");
    let _d = start(dir.path());
    host.next_of("NBIRTH", None);
    let dev = Device::connect(&broker, "dev-1", &["devices/d1/ack", "devices/d1/command"]);
    dev.register("d1");
    host.next_of("DBIRTH", Some("d1"));

    host.send(
        json!({"op": "dcmd", "group": GROUP, "edge": EDGE, "device": "d1",
                     "metrics": [["setpoint", "DOUBLE", 42.5], ["run", "BOOLEAN", true]]}),
    );
    let cmd = dev.expect("devices/d1/command");
    assert_eq!(cmd, json!({"setpoint": 42.5, "run": true}));
    // The device answers with telemetry: the host sees it as DDATA.
    dev.publish(
        "devices/d1/telemetry",
        json!({"setpoint": 42.5}).to_string(),
        1,
    );
    host.next_where("setpoint", |v| {
        (v["type"] == "DBIRTH" || v["type"] == "DDATA")
            && v["device"] == "d1"
            && v["metrics"].as_array().is_some_and(|m| {
                m.iter()
                    .any(|m| m["name"] == "setpoint" && m["value"] == 42.5)
            })
    });
}

#[test]
fn with_the_primary_host_offline_telemetry_is_kept_and_replayed_as_history() {
    let dir = tempfile::tempdir().unwrap();
    let broker = Broker::start(dir.path());
    let mut host = Host::start(&broker);
    host.send(json!({"op": "state", "host": "scada", "online": false}));
    config(dir.path(), &broker, "  primary_host_id: scada\n");
    let d = start(dir.path());
    d.wait_log(|l| l.contains("sparkplug: edge node"))
        .expect("the node starts");
    let dev = Device::connect(&broker, "dev-1", &["devices/d1/ack"]);
    dev.register("d1");
    for i in 1..=5 {
        dev.publish("devices/d1/telemetry", json!({"count": i}).to_string(), 1);
    }
    stored(&d, "d1", 5);
    assert!(
        host.seen.is_empty(),
        "published while the host was offline: {:?}",
        host.seen
    );

    host.send(json!({"op": "state", "host": "scada", "online": true}));
    let nbirth = host.next_of("NBIRTH", None);
    assert_eq!(nbirth["seq"], 0);
    let dbirth = host.next_of("DBIRTH", Some("d1"));
    assert_eq!(metric(&dbirth, "count")["value"], 5);
    let mut history = Vec::new();
    while history.len() < 5 {
        let v = host.next_of("DDATA", Some("d1"));
        assert_eq!(v["metrics"][0]["historical"], true, "{v}");
        history.push(v["metrics"][0]["value"].as_i64().unwrap());
    }
    assert_eq!(history, vec![1, 2, 3, 4, 5]);

    // Live again.
    dev.publish("devices/d1/telemetry", json!({"count": 6}).to_string(), 1);
    let live = host.next_of("DDATA", Some("d1"));
    assert_eq!(live["metrics"][0]["value"], 6);
    assert_eq!(live["metrics"][0]["historical"], false);
    let seqs: Vec<u64> = host.seen.iter().filter_map(|v| v["seq"].as_u64()).collect();
    assert_eq!(seqs, (0..seqs.len() as u64).collect::<Vec<_>>());

    // Offline again: nothing live; back online: the gap is replayed.
    host.send(json!({"op": "state", "host": "scada", "online": false}));
    d.wait_log(|l| l.contains("primary host offline"))
        .expect("the node hears the host go");
    dev.publish("devices/d1/telemetry", json!({"count": 7}).to_string(), 1);
    stored(&d, "d1", 7);
    host.send(json!({"op": "state", "host": "scada", "online": true}));
    host.next_of("NBIRTH", None);
    let v = host.next_of("DDATA", Some("d1"));
    assert_eq!(v["metrics"][0]["value"], 7);
    assert_eq!(v["metrics"][0]["historical"], true);
}
